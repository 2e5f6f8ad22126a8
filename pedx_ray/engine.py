"""The training engine both Ray Train jobs share (pretraining and fine-tuning), run on every worker.

A job's ``train_loop_per_worker`` builds its model, optimizer, scheduler, data, loss and metrics and
hands them to `fit` as a `TrainingJob`; the engine resumes from Ray Train's checkpoint, prepares
the model (device, DDP), runs `train_one_epoch` and the job's evaluation each epoch, and reports
from every rank with rank 0 checkpointing (`report_checkpoint`).

A checkpoint is contract 4 (``model.pt`` of the unwrapped model, ``config.json``, ``metrics.json``,
see `pedx_ray.models`) plus ``train_state.pt``: the epoch, the best score so far and the optimizer
and scheduler states.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pedx_ray.cluster.placement import record_worker_start
from pedx_ray.faults import Fault
from pedx_ray.models import MODEL_FILE, save_checkpoint, unwrap

TRAIN_STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainingJob:
    """What a job brings; the engine does the rest. ``loss(model, batch)`` returns (mean loss, batch
    size); ``evaluate(model)`` the epoch's eval metrics, called on every rank (a collective when the
    eval data is sharded; a job that scores on rank 0 only returns {} elsewhere)."""

    config: Any  # PretrainConfig or FinetuneConfig: saved with each checkpoint
    model: nn.Module  # built (and initialised), not yet on the device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per epoch
    train_batches: Callable[[int], Iterable]  # 0-based epoch -> that epoch's training batches
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
    evaluate: Callable[[nn.Module], dict]
    score_metric: str  # higher is better; the best so far is reported as best_<score_metric>
    summary: Callable[[dict], str]  # the epoch line's tail after the loss
    train_mode: Callable[[nn.Module], None] = nn.Module.train
    bf16: bool = False  # autocast (CUDA only)
    channels_last: bool = False  # CUDA only
    compile: bool = False  # CUDA only
    tensorboard_dir: Path | str | None = None  # rank 0 logs every numeric metric there
    run_dir: Path | str | None = None  # each worker records its node and start epoch there (placement)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)


def train_one_epoch(
    model: nn.Module,
    loss_of: Callable[[nn.Module, Any], tuple[torch.Tensor, int]],
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    device: torch.device,
    epoch: int,
    *,
    bf16: bool = False,
    fault: Fault | None = None,
) -> dict:
    """One pass over ``batches`` (the model already in train mode); returns the train metrics summed
    over all workers: mean loss, samples, images/s and the share of the epoch spent waiting for input."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, samples
    wait_s, started = 0.0, time.perf_counter()
    iterator = iter(batches)
    while True:
        fetch = time.perf_counter()
        batch = next(iterator, None)
        wait_s += time.perf_counter() - fetch
        if batch is None:
            break
        with autocast(device, bf16):
            loss, n = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # No .item(): a host sync per step would stall the GPU.
        totals += torch.stack([loss.detach().double() * n, torch.tensor(n, device=device).double()])
        if fault is not None:
            fault.strike(epoch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    loss_sum, samples = all_reduce_sum(totals).tolist()
    timing = all_reduce_sum(torch.tensor([elapsed, wait_s], dtype=torch.float64, device=device)).tolist()
    return {
        "train_loss": loss_sum / max(samples, 1),
        "train_samples": int(samples),
        "train_images_per_s": samples / max(timing[0] / world_size(), 1e-9),
        "train_data_wait_fraction": timing[1] / max(timing[0], 1e-9),
    }


def evaluate(
    model: nn.Module, batches: Iterable, metric, device: torch.device, *, bf16: bool = False
) -> dict:
    """Score ``model`` on ``batches`` in eval mode without gradients: ``metric.update(model, batch)`` for
    each batch, then ``metric.compute()`` (which sums over workers when the split is sharded)."""
    model.eval()
    with torch.no_grad(), autocast(device, bf16):
        for batch in batches:
            metric.update(model, batch)
    return metric.compute()


def load_train_state(checkpoint, model: nn.Module, optimizer, scheduler) -> tuple[int, float]:
    """Restore model, optimizer and scheduler from a checkpoint; returns (epochs done, best score)."""
    with checkpoint.as_directory() as directory:
        model.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True))
        state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The restored rates followed the saved run's schedule; a resume may change epochs, so recompute them.
    for group, base_lr, rule in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * rule(state["epoch"])
    return state["epoch"], state["best_score"]


def resume(model: nn.Module, optimizer, scheduler) -> tuple[int, float]:
    """(epochs done, best score) of Ray Train's latest checkpoint, restored into model, optimizer and
    scheduler; (0, -inf) for a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, -math.inf
    return load_train_state(checkpoint, model, optimizer, scheduler)


def report_checkpoint(
    model, config, metrics: dict, epoch: int, best_score: float, optimizer, scheduler
) -> None:
    """Rank 0's epoch end: the model as contract 4 plus the optimizer state for resuming, reported to Ray."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, config, metrics)
        torch.save(
            {
                "epoch": epoch,
                "best_score": best_score,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            Path(tmp) / TRAIN_STATE_FILE,
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )


def _optimizer_state_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Restored optimizer moments follow the parameters onto the device (Adam keeps ``step`` on the CPU)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def fit(job: TrainingJob) -> None:
    """Train ``job`` from Ray Train's latest checkpoint (or from the start) to ``config.epochs``."""
    import ray.train
    import ray.train.torch

    config = job.config
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    on_cuda = device.type == "cuda"
    fault = Fault.from_env() if rank == 0 else None

    start_epoch, best_score = resume(job.model, job.optimizer, job.scheduler)
    if job.run_dir is not None:
        record_worker_start(job.run_dir, rank, start_epoch)
    net = job.model
    if on_cuda and job.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # prepare_model moves the net (and so the optimizer's parameters) to the device and wraps DDP.
    train_model = ray.train.torch.prepare_model(net)
    eval_model = unwrap(train_model)  # no DDP in eval: workers may hold unequal eval shards
    if on_cuda and job.compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)
    _optimizer_state_to(job.optimizer, device)

    writer = None
    if rank == 0 and job.tensorboard_dir is not None:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(job.tensorboard_dir))
    for epoch in range(start_epoch, config.epochs):
        # The last group is the head's, which trains in every fine-tuning mode.
        lr = job.optimizer.param_groups[-1]["lr"]
        job.train_mode(train_model)
        train = train_one_epoch(
            train_model,
            job.loss,
            job.optimizer,
            job.train_batches(epoch),
            device,
            epoch,
            bf16=job.bf16,
            fault=fault,
        )
        job.scheduler.step()
        metrics = {"epoch": epoch + 1, "start_epoch": start_epoch, "lr": lr} | train
        metrics |= job.evaluate(eval_model)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        best_score = max(best_score, metrics[job.score_metric])
        metrics["best_" + job.score_metric] = best_score
        report_checkpoint(eval_model, config, metrics, epoch + 1, best_score, job.optimizer, job.scheduler)
        print(
            f"epoch {epoch + 1}/{config.epochs}: loss {metrics['train_loss']:.4f}, {job.summary(metrics)}",
            flush=True,
        )
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    writer.add_scalar(key, value, epoch + 1)
            writer.flush()
    if writer is not None:
        writer.close()
