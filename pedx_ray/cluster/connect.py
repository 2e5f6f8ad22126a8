"""Joining the Ray cluster a training job runs on, with a resource check that says how to fix a shortfall."""

from __future__ import annotations

import math
import os

import torch

from ingest.storage import ray_storage
from pedx_ray.faults import worker_env_vars


def connect_ray(
    *,
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    use_gpu: bool,
    extra_cpus: int = 0,
    extra_what: str = "",
    error: type[Exception] = RuntimeError,
):
    """Connect to RAY_ADDRESS's cluster, else start a local Ray sized for the workers (+ ``extra_cpus``).

    Raises ``error`` when the cluster cannot hold the workers: Ray would otherwise wait for
    resources forever without a word."""
    import ray

    needed_cpus = math.ceil(num_workers * cpus_per_worker) + extra_cpus
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, needed_cpus),
                num_gpus=torch.cuda.device_count() if use_gpu else 0,
            )
    resources = ray.cluster_resources()
    if resources.get("CPU", 0) < needed_cpus:
        plus = f" plus {extra_cpus} for {extra_what}" if extra_cpus else ""
        raise error(
            f"the Ray cluster has {resources.get('CPU', 0):g} CPUs but {num_workers} workers "
            f"× {cpus_per_worker:g} CPUs{plus} need {needed_cpus}; use fewer --num-workers or a smaller "
            "--cpus-per-worker"
        )
    needed_gpus = num_workers * gpus_per_worker
    if use_gpu and resources.get("GPU", 0) < needed_gpus:
        raise error(
            f"--use-gpu with {num_workers} workers × {gpus_per_worker:g} GPUs needs "
            f"{needed_gpus:g} GPUs; the Ray cluster has {resources.get('GPU', 0):g}"
        )
    return ray


def train_job_configs(config, *, storage: str, score_metric: str, callbacks=()):
    """(ScalingConfig, RunConfig) of a job config: workers and their resources, failure retries, the run
    storage (a directory or an object-store URI, ingest.storage), and the checkpoints kept (the best
    ``num_to_keep`` by ``score_metric``, higher is better). The workers'
    environment gets the test-only fault setting (`pedx_ray.faults`) when the driver has it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    scaling = ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=config.use_gpu,
        resources_per_worker={"CPU": config.cpus_per_worker}
        | ({"GPU": config.gpus_per_worker} if config.use_gpu else {}),
    )
    path, filesystem = ray_storage(storage)
    run = RunConfig(
        name=config.name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.max_failures),
        callbacks=list(callbacks),
        worker_runtime_env={"env_vars": worker_env_vars()},  # empty outside the recovery test
        checkpoint_config=CheckpointConfig(
            num_to_keep=config.num_to_keep,
            checkpoint_score_attribute=score_metric,
            checkpoint_score_order="max",
        ),
    )
    return scaling, run
