"""PedX-Ray training side: models, shard loading, pretraining on Ray Train (see pedx_ray.pretrain)."""
