"""Ray Tune sweeps of PedXnet pretraining and fine-tuning (spaces, runner, report)."""

from pedx_ray.dependencies import exit_if_run_without_dependencies

exit_if_run_without_dependencies()
