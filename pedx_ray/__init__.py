"""PedX-Ray training side: models, shard loading, pretraining on Ray Train (see pedx_ray.pretrain)."""

from pedx_ray.dependencies import exit_if_run_without_dependencies

exit_if_run_without_dependencies()
