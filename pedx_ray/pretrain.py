"""PedXnet upstream pretraining (view classification) as a Ray Train job.

``python -m pedx_ray.pretrain --shards DIR --granularity 7 --epochs 100 --num-workers 2 [--use-gpu]``

The same command runs on a laptop (local Ray with the CPUs it needs) and on a cluster
(``RAY_ADDRESS`` set, or ``ray job submit -- python -m pedx_ray.pretrain ...``; ``--storage`` must
then be shared storage: a shared mount, or ``s3://bucket/prefix`` on S3-compatible object storage
configured by the AWS environment variables, see docs/guide/storage.md; ``--shards`` too).
Configuration is resolved as defaults < ``--config`` YAML < command-line flags (on ``--resume`` the
run's saved config.json takes the defaults' place) and saved as ``STORAGE/NAME/config.json``. Each
epoch trains on the train split, evaluates the val and finetune splits on all workers, reports
the metrics with ``ray.train.report`` and checkpoints from rank 0; Ray Train keeps the best
checkpoints by the finetune split's macro F1, restarts failed workers from the latest checkpoint
(``--max-failures``) and ``--resume`` continues a stopped run. At the end the best checkpoint is
exported to ``STORAGE/NAME/best/`` (contract 4). TensorBoard logs go to ``STORAGE/NAME/tensorboard/``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from ingest import storage
from pedx_ray.cluster.connect import connect_ray, train_job_configs
from pedx_ray.config import (
    ARCHITECTURES,
    GRANULARITIES,
    ConfigError,
    PretrainConfig,
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
from pedx_ray.engine import TrainingJob, all_reduce_sum, evaluate, fit
from pedx_ray.metrics import classification_metrics, confusion_matrix
from pedx_ray.models import CONFIG_FILE, METRICS_FILE, MODEL_FILE, build_model
from pedx_ray.schedule import build_scheduler

BEST_DIR = "best"
SCORE_METRIC = "finetune_f1"


class PretrainError(RuntimeError):
    """The run cannot start or failed; the message says why and what to do."""


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path | str  # a str when the run storage is an object-store URI
    best_dir: Path | str
    best_metrics: dict
    last_metrics: dict


# ---------------------------------------------------------------- worker side


class SplitConfusion:
    """Macro metrics of one eval split on all workers: local confusion matrices summed across ranks."""

    def __init__(self, num_classes: int, device: torch.device, channels_last: bool) -> None:
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.device, self.channels_last = device, channels_last

    def update(self, model, batch) -> None:
        images, labels = batch
        logits = model(to_model_input(images, self.device, self.channels_last))
        self.cm += confusion_matrix(labels.to(self.device), logits.argmax(1), len(self.cm))

    def compute(self) -> dict:
        return classification_metrics(all_reduce_sum(self.cm).cpu().numpy())


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: runs on every worker."""
    import ray.train
    import ray.train.torch

    config = PretrainConfig.from_dict(loop_config["config"])
    run_dir = loop_config["run_dir"]
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
    train_data = ray.train.get_dataset_shard("train")
    eval_data = {split: ray.train.get_dataset_shard(split) for split in EVAL_SPLITS}
    eval_collate = BatchCollator()
    cross_entropy = torch.nn.CrossEntropyLoss()

    def loss(model, batch):
        images, labels = batch
        x, y = to_model_input(images, device, channels_last), labels.to(device, non_blocking=True)
        return cross_entropy(model(x), y), len(y)

    def evaluate_splits(model) -> dict:
        metrics = {}
        for split, iterator in eval_data.items():
            batches = iterator.iter_torch_batches(
                batch_size=config.per_worker_batch_size,
                collate_fn=eval_collate,
                prefetch_batches=config.prefetch_batches,
            )
            scores = evaluate(
                model,
                batches,
                SplitConfusion(config.granularity, device, channels_last),
                device,
                bf16=config.bf16,
            )
            metrics |= {f"{split}_{k}": v for k, v in scores.items()}
        return metrics

    def summary(metrics: dict) -> str:
        return (
            f"{metrics['train_images_per_s']:.1f} img/s, val F1 {metrics['val_f1']:.4f}, "
            f"finetune F1 {metrics['finetune_f1']:.4f}"
        )

    fit(
        TrainingJob(
            config=config,
            model=net,
            optimizer=optimizer,
            scheduler=scheduler,
            train_batches=lambda epoch: train_batches(train_data, config, epoch, pin_memory=on_cuda),
            loss=loss,
            evaluate=evaluate_splits,
            score_metric=SCORE_METRIC,
            summary=summary,
            bf16=config.bf16,
            channels_last=config.channels_last,
            compile=config.compile,
            tensorboard_dir=storage.join(run_dir, "tensorboard") if config.tensorboard else None,
            run_dir=run_dir,
        )
    )


# ---------------------------------------------------------------- driver side


def _storage_root(config) -> Path | str:
    """Where runs live: an absolute directory (a shared mount on a cluster) or an object-store URI."""
    return storage.location(config.storage)


def fit_and_export_best(trainer, config, run_dir: Path | str, score_metric: str, error: type[Exception]):
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
    best_dir = storage.join(run_dir, BEST_DIR)
    _export_best(best, best_dir)
    return result, best_dir


def _export_best(best_checkpoint, best_dir: Path | str) -> None:
    """Copy the best checkpoint's contract-4 files to ``best_dir`` (a directory, replaced atomically,
    or an object-store prefix, replaced file by file with model.pt first and metrics.json last)."""
    with best_checkpoint.as_directory() as directory:
        storage.replace_tree(directory, best_dir, names=(MODEL_FILE, CONFIG_FILE, METRICS_FILE))


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
    root = _storage_root(config)
    run_dir = storage.join(root, config.name)
    saved = storage.exists(storage.join(run_dir, CONFIG_FILE))
    if saved and not resume:
        raise PretrainError(
            f"run {run_dir} already exists; pass --resume to continue it or choose another --name"
        )
    if resume and not saved:
        raise PretrainError(f"nothing to resume: {run_dir} holds no run (no {CONFIG_FILE})")
    storage.makedirs(run_dir)
    storage.write_json_atomic(storage.join(run_dir, CONFIG_FILE), config.to_dict())

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
        config, storage=str(root), score_metric=SCORE_METRIC, callbacks=callbacks
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
        best_metrics=storage.read_json(storage.join(best_dir, METRICS_FILE)),
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
    parser.add_argument(
        "--shards", help="shard directory (or s3://bucket/prefix) written by `python -m ingest shards`"
    )
    parser.add_argument("--granularity", type=int, choices=GRANULARITIES)
    parser.add_argument("--config", type=Path, help="YAML file of PretrainConfig fields")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument(
        "--storage",
        help="directory or s3://bucket/prefix holding runs (shared storage on a cluster; default ./runs)",
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
    parser.add_argument("--arch", choices=ARCHITECTURES)
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
        root = cli["storage"] or yaml_layer.get("storage") or PretrainConfig.storage
        if not name:
            raise ConfigError("--resume needs --name: the run to continue is STORAGE/NAME")
        saved = storage.join(root, name, CONFIG_FILE)
        if not storage.is_file(saved):
            raise ConfigError(f"nothing to resume: {saved} does not exist")
        base = PretrainConfig.from_dict(storage.read_json(saved), source=str(saved))
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
    except (ConfigError, ShardSetError, PretrainError, storage.StorageError) as exc:
        parser.exit(2, f"error: {exc}\n")
    best = result.best_metrics
    print(
        f"run: {result.run_dir}\n"
        f"best checkpoint (epoch {best['epoch']}, finetune F1 {best['finetune_f1']:.4f}, "
        f"val F1 {best['val_f1']:.4f}): {result.best_dir}\n"
        f"metrics: {storage.join(result.best_dir, METRICS_FILE)}\n"
        f"tensorboard: tensorboard --logdir {storage.join(result.run_dir, 'tensorboard')}",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
