"""PedXnet upstream pretraining (view classification) as a Ray Train job.

``python -m pedx_ray.pretrain --shards DIR --granularity 7 --epochs 100 --num-workers 2 [--use-gpu]``

The same command runs on a laptop (local Ray with the CPUs it needs) and on a cluster
(``RAY_ADDRESS`` set, or ``ray job submit -- python -m pedx_ray.pretrain ...``; ``--storage`` must
then be shared storage). Configuration is resolved as defaults < ``--config`` YAML < command-line
flags (on ``--resume`` the run's saved config.json takes the defaults' place) and saved as
``STORAGE/NAME/config.json``. Each epoch trains on the train split, evaluates the val and finetune
splits on all workers, reports the metrics with ``ray.train.report`` and checkpoints from rank 0;
Ray Train keeps the best checkpoints by the finetune split's macro F1, restarts failed workers from
the latest checkpoint (``--max-failures``) and ``--resume`` continues a stopped run. At the end the
best checkpoint is exported to ``STORAGE/NAME/best/`` (contract 4). TensorBoard logs go to
``STORAGE/NAME/tensorboard/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from ingest.files import write_json_atomic
from pedx_ray.cluster.connect import connect_ray, train_job_configs
from pedx_ray.cluster.placement import record_worker_start
from pedx_ray.config import (
    GRANULARITIES,
    ConfigError,
    PretrainConfig,
    load_config_json,
    read_yaml,
    resolve_config,
)
from pedx_ray.data import (
    EVAL_SPLITS,
    BatchCollator,
    PretrainDataConfig,
    ShardSetError,
    build_datasets,
    check_manifest,
    read_manifest,
    to_model_input,
    train_batches,
    verify_shards,
)
from pedx_ray.metrics import classification_metrics, confusion_matrix
from pedx_ray.models import CONFIG_FILE, METRICS_FILE, MODEL_FILE, build_model, save_checkpoint, unwrap
from pedx_ray.schedule import build_scheduler

TRAIN_STATE_FILE = "train_state.pt"
BEST_DIR = "best"
SCORE_METRIC = "finetune_f1"
FAULT_MARKER = ".fault-injected"


class PretrainError(RuntimeError):
    """The run cannot start or failed; the message says why and what to do."""


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    best_dir: Path
    best_metrics: dict
    last_metrics: dict


# ---------------------------------------------------------------- worker side


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _autocast(device: torch.device, config: PretrainConfig):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16)


def _evaluate(model, iterator, config: PretrainConfig, device: torch.device, channels_last: bool) -> dict:
    """Macro metrics over this split on all workers: local confusion matrices summed across ranks."""
    model.eval()
    cm = torch.zeros(config.granularity, config.granularity, dtype=torch.int64, device=device)
    collate = BatchCollator(augment_p=None, seed=config.seed, epoch=0)
    with torch.no_grad(), _autocast(device, config):
        for images, labels in iterator.iter_torch_batches(
            batch_size=config.per_worker_batch_size,
            collate_fn=collate,
            prefetch_batches=config.prefetch_batches,
        ):
            logits = model(to_model_input(images, device, channels_last))
            cm += confusion_matrix(labels.to(device), logits.argmax(1), config.granularity)
    return classification_metrics(_all_reduce_sum(cm).cpu().numpy())


def _load_train_state(checkpoint, net, optimizer, scheduler) -> tuple[int, float]:
    with checkpoint.as_directory() as directory:
        net.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True))
        state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The restored rate followed the saved run's schedule; a resume may change epochs, so recompute it.
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * scheduler.lr_lambdas[0](state["epoch"])
    return state["epoch"], state["best_score"]


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


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: runs on every worker."""
    import ray.train
    import ray.train.torch

    config = PretrainConfig.from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    on_cuda = device.type == "cuda"
    channels_last = on_cuda and config.channels_last

    torch.manual_seed(config.seed)
    net = build_model(config)
    optimizer = torch.optim.Adam(
        net.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    scheduler = build_scheduler(
        optimizer, epochs=config.epochs, warmup_epochs=config.warmup_epochs, power=config.poly_power
    )
    start_epoch, best_score = 0, -1.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_epoch, best_score = _load_train_state(checkpoint, net, optimizer, scheduler)
    record_worker_start(run_dir, rank, start_epoch)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    # prepare_model moves the net (and so the optimizer's parameters) to the device and wraps DDP.
    train_model = ray.train.torch.prepare_model(net)
    eval_model = unwrap(train_model)  # no DDP in eval: workers may hold unequal eval shards
    if on_cuda and config.compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)
    for state in optimizer.state.values():  # restored optimizer moments follow the parameters
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)

    writer = None
    if rank == 0 and config.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    loss_fn = torch.nn.CrossEntropyLoss()
    train_data = ray.train.get_dataset_shard("train")
    eval_data = {split: ray.train.get_dataset_shard(split) for split in EVAL_SPLITS}

    for epoch in range(start_epoch, config.epochs):
        lr = optimizer.param_groups[0]["lr"]
        train_model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, samples
        wait_s, started = 0.0, time.perf_counter()
        batches = iter(train_batches(train_data, config, epoch, pin_memory=on_cuda))
        while True:
            fetch = time.perf_counter()
            batch = next(batches, None)
            wait_s += time.perf_counter() - fetch
            if batch is None:
                break
            images, labels = batch
            x, y = to_model_input(images, device, channels_last), labels.to(device, non_blocking=True)
            with _autocast(device, config):
                loss = loss_fn(train_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.stack(
                [loss.detach().double() * len(y), torch.tensor(len(y), device=device).double()]
            )
            if (
                config.fail_after_epoch
                and epoch == config.fail_after_epoch
                and rank == 0
                and not (run_dir / FAULT_MARKER).exists()
            ):
                (run_dir / FAULT_MARKER).touch()
                time.sleep(5)  # let the controller register the last checkpoint before the worker dies
                os._exit(1)
        if on_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        scheduler.step()
        loss_sum, samples = _all_reduce_sum(totals).tolist()
        timing = _all_reduce_sum(torch.tensor([elapsed, wait_s], dtype=torch.float64, device=device)).tolist()
        world = context.get_world_size()
        metrics = {
            "epoch": epoch + 1,
            "start_epoch": start_epoch,
            "lr": lr,
            "train_loss": loss_sum / max(samples, 1),
            "train_samples": int(samples),
            "train_images_per_s": samples / max(timing[0] / world, 1e-9),
            "train_data_wait_fraction": timing[1] / max(timing[0], 1e-9),
        }
        for split, iterator in eval_data.items():
            scores = _evaluate(eval_model, iterator, config, device, channels_last)
            metrics |= {f"{split}_{k}": v for k, v in scores.items()}
        best_score = max(best_score, metrics[SCORE_METRIC])
        metrics["best_" + SCORE_METRIC] = best_score

        if rank == 0:
            report_checkpoint(eval_model, config, metrics, epoch + 1, best_score, optimizer, scheduler)
            print(
                f"epoch {epoch + 1}/{config.epochs}: loss {metrics['train_loss']:.4f}, "
                f"{metrics['train_images_per_s']:.1f} img/s, val F1 {metrics['val_f1']:.4f}, "
                f"finetune F1 {metrics['finetune_f1']:.4f}",
                flush=True,
            )
            if writer is not None:
                for key, value in metrics.items():
                    if isinstance(value, int | float):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
        else:
            ray.train.report(metrics, checkpoint=None)
    if writer is not None:
        writer.close()


# ---------------------------------------------------------------- driver side


def _storage_root(config: PretrainConfig) -> Path:
    if "://" in config.storage:
        raise PretrainError(
            f"--storage {config.storage}: give a filesystem path (a shared mount such as NFS on "
            "a cluster); URIs are not supported because the run's config and TensorBoard logs are "
            "written there directly"
        )
    return Path(config.storage).expanduser().resolve()


def fit_and_export_best(trainer, config, run_dir: Path, score_metric: str, error: type[Exception]):
    """Run ``trainer``, export its best checkpoint (by ``score_metric``, higher is better) to
    ``run_dir/best``; returns (the Ray result, the best directory). Failures raise ``error``.

    ``config`` is the job's PretrainConfig or FinetuneConfig (its ``name`` and ``max_failures``)."""
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise error(
            f"training failed after {config.max_failures} automatic restarts: {exc}; worker logs are in "
            f"the Ray session logs; continue with --resume --name {config.name}"
        ) from exc
    best = result.get_best_checkpoint(metric=score_metric, mode="max")
    if best is None:
        raise error(f"run {run_dir} finished without a checkpoint")
    best_dir = run_dir / BEST_DIR
    _export_best(best, best_dir)
    return result, best_dir


def _export_best(best_checkpoint, best_dir: Path) -> None:
    """Copy the best checkpoint's contract-4 files to ``best_dir``, replacing it atomically."""
    staging = best_dir.with_name(f".{best_dir.name}.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    with best_checkpoint.as_directory() as directory:
        for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE):
            shutil.copy2(Path(directory) / name, staging / name)
    old = best_dir.with_name(f".{best_dir.name}.old.{uuid.uuid4().hex[:8]}")
    if best_dir.exists():
        os.replace(best_dir, old)
    os.replace(staging, best_dir)
    shutil.rmtree(old, ignore_errors=True)


def run_pretraining(
    config: PretrainConfig, *, resume: bool = False, progress: bool = True, callbacks=()
) -> PretrainResult:
    """Check the shard set, start (or resume) the Ray Train run, export the best checkpoint.

    ``callbacks`` are Ray Train callbacks (a Tune sweep passes ``TuneReportCallback``)."""
    manifest = read_manifest(config.shards)
    check_manifest(manifest, config.granularity, config.shards)
    if config.classes and tuple(manifest["classes"]) != config.classes:
        raise ShardSetError(
            f"{config.shards} lists classes {manifest['classes']} but the run was started with "
            f"{list(config.classes)}; resume with the run's own shard set"
        )
    config = config.replace(
        classes=tuple(manifest["classes"]),
        name=config.name or f"pedx-{config.granularity}c-{datetime.now():%Y%m%d-%H%M%S}",
    )
    if config.verify_checksums:
        verify_shards(manifest, config.shards, progress=progress)
    storage = _storage_root(config)
    run_dir = storage / config.name
    if (run_dir / CONFIG_FILE).exists() and not resume:
        raise PretrainError(
            f"run {run_dir} already exists; pass --resume to continue it or choose another --name"
        )
    if resume and not (run_dir / CONFIG_FILE).exists():
        raise PretrainError(f"nothing to resume: {run_dir} holds no run (no {CONFIG_FILE})")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_FILE, config.to_dict())

    connect_ray(
        num_workers=config.num_workers,
        cpus_per_worker=config.cpus_per_worker,
        gpus_per_worker=config.gpus_per_worker,
        use_gpu=config.use_gpu,
        extra_cpus=1,  # Ray Data read tasks
        extra_what="data loading",
        error=PretrainError,
    )
    scaling_config, run_config = train_job_configs(
        config, storage=str(storage), score_metric=SCORE_METRIC, callbacks=callbacks
    )
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "run_dir": str(run_dir)},
        scaling_config=scaling_config,
        run_config=run_config,
        datasets=build_datasets(
            manifest, config.shards, config.classes, config.granularity, config.image_size, config.seed
        ),
        dataset_config=PretrainDataConfig(),
    )
    result, best_dir = fit_and_export_best(trainer, config, run_dir, SCORE_METRIC, PretrainError)
    return PretrainResult(
        run_dir=run_dir,
        best_dir=best_dir,
        best_metrics=json.loads((best_dir / METRICS_FILE).read_text()),
        last_metrics=dict(result.metrics or {}),
    )


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pedx_ray.pretrain",
        description=__doc__.split("\n\n")[0],
        epilog="Precedence: defaults < --config YAML < flags. On --resume the run's "
        "saved config.json replaces the defaults.",
    )
    # Flags default to None so that only flags actually given override the YAML.
    parser.add_argument("--shards", help="shard directory written by `python -m ingest shards`")
    parser.add_argument("--granularity", type=int, choices=GRANULARITIES)
    parser.add_argument("--config", type=Path, help="YAML file of PretrainConfig fields")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument(
        "--storage", help="directory holding runs (shared storage on a cluster; default ./runs)"
    )
    parser.add_argument("--name", help="run name (default pedx-<G>c-<timestamp>); the run is STORAGE/NAME")
    parser.add_argument(
        "--resume", action="store_true", help="continue run --name from its latest checkpoint"
    )
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split across workers (default 60)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup-epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--arch", choices=("inception_v3", "tiny_cnn"))
    parser.add_argument("--max-failures", type=int)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--verify-checksums", action=argparse.BooleanOptionalAction, default=None)
    return parser


CLI_FIELDS = (
    "shards",
    "granularity",
    "epochs",
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "storage",
    "name",
    "image_size",
    "batch_size",
    "lr",
    "warmup_epochs",
    "seed",
    "arch",
    "max_failures",
    "compile",
    "bf16",
    "channels_last",
    "augment",
    "verify_checksums",
)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    cli = {name: getattr(args, name) for name in CLI_FIELDS}
    yaml_layer = read_yaml(args.config) if args.config else {}
    base = None
    if args.resume:
        name = cli["name"] or yaml_layer.get("name")
        storage = cli["storage"] or yaml_layer.get("storage") or PretrainConfig.storage
        if not name:
            raise ConfigError("--resume needs --name: the run to continue is STORAGE/NAME")
        saved = Path(storage) / name / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"nothing to resume: {saved} does not exist")
        base = load_config_json(saved)
    config = resolve_config(yaml_layer, cli, base=base)
    if not config.shards:
        raise ConfigError("no shard set given: pass --shards DIR or set `shards:` in the --config YAML")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        result = run_pretraining(config, resume=args.resume)
    except (ConfigError, ShardSetError, PretrainError) as exc:
        parser.exit(2, f"error: {exc}\n")
    best = result.best_metrics
    print(
        f"run: {result.run_dir}\n"
        f"best checkpoint (epoch {best['epoch']}, finetune F1 {best['finetune_f1']:.4f}, "
        f"val F1 {best['val_f1']:.4f}): {result.best_dir}\n"
        f"metrics: {result.best_dir / METRICS_FILE}\n"
        f"tensorboard: tensorboard --logdir {result.run_dir / 'tensorboard'}",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
