"""PedXnet downstream fine-tuning (bone age, fracture) as a Ray Train job.

``python -m pedx_ray.finetune --task bone_age --data phantom:DIR --init pedxnet:CKPT --epochs 30``

Configuration is resolved as defaults < ``--config`` YAML (a recipe) < flags and saved as
``STORAGE/NAME/config.json``. The driver builds the data table (`pedx_ray.datasets`), preprocesses
every image once into the on-disk cache and starts the Ray Train run; each epoch trains on the
train split, scores the val split (MAE for bone age, AUC for fracture) and checkpoints from rank
0 (contract 4: config.json rebuilds the task model alone). Ray Train keeps the best checkpoints,
restarts failed workers from the latest one (``--max-failures``) and ``--resume`` continues a
stopped run. The initialisation's transfer report is printed and saved as
``STORAGE/NAME/init_report.json``. At the end the best checkpoint is exported to
``STORAGE/NAME/best/`` and its predictions for val and test are written to
``STORAGE/NAME/predictions_{val,test}.csv`` (columns ``id,target,prediction,sex,age_months,split``,
with a ``.json`` sidecar) for `pedx_ray.evaluate`. ``--storage`` and the ``pedxnet:`` checkpoint may be
``s3://bucket/prefix`` URIs on S3-compatible object storage (docs/guide/storage.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ingest import storage
from pedx_ray.augment import augment_images, build_augmentation
from pedx_ray.cluster.connect import connect_ray, train_job_configs
from pedx_ray.config import MIN_INCEPTION_SIZE, ConfigError, from_known_fields, read_yaml, training_checks
from pedx_ray.data import to_model_input
from pedx_ray.datasets import (
    BUILTIN_ENHANCE,
    DatasetError,
    cache_images,
    load_table,
    parse_data,
    read_images,
)
from pedx_ray.engine import TrainingJob, evaluate, fit
from pedx_ray.initialize import (
    MODES,
    InitError,
    initialize,
    lr_gates,
    parameter_groups,
    parse_init,
    set_train_mode,
)
from pedx_ray.models import CONFIG_FILE, METRICS_FILE, MODEL_FILE, CheckpointError
from pedx_ray.pretrain import _storage_root, fit_and_export_best
from pedx_ray.schedule import lr_factor
from pedx_ray.tasks import DEFAULT_HEAD, HEADS, TASKS, build_task_model

BEST_DIR = "best"
INIT_REPORT = "init_report.json"
SCORE_METRIC = "val_score"  # higher is better: -MAE (bone age) or AUC (fracture)
PREDICTION_COLUMNS = ("id", "target", "prediction", "sex", "age_months", "split")


class FinetuneError(RuntimeError):
    """The run cannot start or failed; the message says why and what to do."""


@dataclass(frozen=True)
class FinetuneConfig:
    # Task and data
    task: str = "bone_age"
    data: str = ""  # KIND:PATH, see pedx_ray.datasets
    images: str = ""  # PNG folder (rsna, grazpedwri)
    labels: str = ""  # labels CSV (dicom)
    val_list: str = ""  # RSNA official validation list
    test_list: str = ""  # RSNA official test list
    val_fraction: float = 0.15  # per patient, for sets without official splits
    test_fraction: float = 0.15
    split_seed: int = 0
    train_fraction: float = 1.0  # data-size ablation: subsample train only
    train_size: int = 0  # ... or an absolute number of training images (wins when > 0)
    cache_dir: str = ""  # preprocessed-image cache; default STORAGE/cache, ./cache for s3:// storage
    # Model and initialisation
    init: str = "scratch"  # scratch | imagenet:PATH | pedxnet:CHECKPOINT
    mode: str = "full"  # full | linear_probe | gradual
    unfreeze_every: int = 1  # gradual: epochs between unfreezing one more backbone block
    backbone: str = "inception_v3"
    head: str = ""  # default per task: regression_sex (bone age), binary (fracture)
    enhance: str = "clahe"  # none | clahe | an enhancer of pedx_ray.enhance
    age_bins: int = 0  # head age_bins: number of age ranges (3, 5 or 10)
    recipe: str = ""  # the recipe this run follows (for reports); set from --config's file name
    hidden: int = 1024
    dropout: float = 0.5
    # Filled from the training split (bone age): the head predicts in units of these
    target_mean: float = 0.0
    target_std: float = 1.0
    # Optimisation (the paper's downstream recipe)
    image_size: int = 512
    epochs: int = 30
    batch_size: int = 20  # global: split evenly across workers
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    poly_power: float = 0.9
    seed: int = 0
    augment: bool = True
    augment_p: float = 0.5
    # Ray
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction lets the runs of a sweep share a GPU
    storage: str = "runs"
    name: str = ""
    max_failures: int = 2
    num_to_keep: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.task in TASKS and not self.head:
            object.__setattr__(self, "head", DEFAULT_HEAD[self.task])
        checks = [
            (self.task in TASKS, f"task must be one of {TASKS}, not {self.task!r}"),
            (
                self.task not in TASKS or self.head in HEADS[self.task],
                f"head {self.head!r} does not fit task {self.task!r}; use one of {HEADS.get(self.task)}",
            ),
            (
                (self.head == "age_bins") == (self.age_bins in (3, 5, 10)),
                f"head age_bins needs age_bins 3, 5 or 10 (and other heads none), not {self.age_bins}",
            ),
            (self.mode in MODES, f"mode must be one of {MODES}, not {self.mode!r}"),
            (self.unfreeze_every >= 1, f"unfreeze_every must be at least 1, not {self.unfreeze_every}"),
            (
                self.backbone != "inception_v3" or self.image_size >= MIN_INCEPTION_SIZE,
                f"image_size {self.image_size} is too small for InceptionV3; "
                f"use at least {MIN_INCEPTION_SIZE}",
            ),
            (
                0 < self.train_fraction <= 1,
                f"train_fraction must be in (0, 1], not {self.train_fraction}",
            ),
            (
                self.train_size >= 0,
                f"train_size must be >= 0 (0 = use train_fraction), not {self.train_size}",
            ),
            (
                0 <= self.val_fraction < 1
                and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1,
                f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} must leave "
                "a training share (each in [0, 1), sum below 1)",
            ),
            *training_checks(self),
            (self.hidden >= 1, f"hidden must be at least 1, not {self.hidden}"),
            (self.target_std > 0, f"target_std must be positive, not {self.target_std}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parse_init(self.init)
        if self.data:
            try:
                parse_data(self.data)
            except DatasetError as exc:
                raise ConfigError(str(exc)) from exc
        if self.backbone not in _known_backbones():
            raise ConfigError(f"backbone must be one of {_known_backbones()}, not {self.backbone!r}")
        if self.enhance not in BUILTIN_ENHANCE:
            known = BUILTIN_ENHANCE + tuple(_recipe_enhancers())
            if self.enhance not in known:
                raise ConfigError(f"enhance must be one of {known}, not {self.enhance!r}")

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FinetuneConfig:
        return from_known_fields(cls, data, source)


def _known_backbones() -> tuple[str, ...]:
    try:
        from pedx_ray.backbones import BACKBONES
    except ImportError:
        return ("inception_v3", "resnet18", "tiny_cnn")
    return BACKBONES


def _recipe_enhancers() -> list[str]:
    try:
        from pedx_ray.enhance import ENHANCERS
    except ImportError:
        return []
    return list(ENHANCERS)


def resolve_finetune_config(*layers: dict[str, Any], base: FinetuneConfig | None = None) -> FinetuneConfig:
    """Apply ``layers`` in order over ``base`` (defaults when None); later layers win, None means unset."""
    merged = (base or FinetuneConfig()).to_dict()
    for layer in layers:
        given = {k: v for k, v in layer.items() if v is not None}
        if given.get("task", merged["task"]) != merged["task"] and "head" not in given:
            merged["head"] = ""  # the earlier task's default head: the new task gets its own
        merged |= given
    return FinetuneConfig.from_dict(merged)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """A recipe / config YAML over the defaults; ``recipe`` defaults to the file's name."""
    layer = read_yaml(path)
    return resolve_finetune_config({"recipe": Path(path).stem}, layer)


def load_finetuned(
    directory: str | Path, map_location: str = "cpu"
) -> tuple[torch.nn.Module, FinetuneConfig]:
    """Rebuild a fine-tuned model from its checkpoint's ``config.json`` and load ``model.pt`` (eval mode).

    ``directory`` may be an object-store URI (ingest.storage): its files are downloaded first."""
    path = storage.join(directory)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not storage.is_file(storage.join(path, name))]
    if missing:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint: missing {', '.join(missing)}")
    with storage.local_copy(path) as local:
        config = FinetuneConfig.from_dict(
            json.loads((local / CONFIG_FILE).read_text()), source=str(storage.join(path, CONFIG_FILE))
        )
        model = build_task_model(config)
        model.load_state_dict(torch.load(local / MODEL_FILE, map_location=map_location, weights_only=True))
    return model.eval(), config


# ---------------------------------------------------------------- scores and predictions


def roc_auc(target: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half); NaN when only one class is present."""
    from scipy.stats import rankdata

    positives = target == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def split_scores(task: str, target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    if task == "bone_age":
        mae = float(np.abs(prediction - target).mean())
        return {"mae": mae, "mse": float(((prediction - target) ** 2).mean()), "score": -mae}
    auc = roc_auc(target, prediction)
    accuracy = float(((prediction >= 0.5) == (target == 1)).mean())
    # One class only (tiny val sets): no AUC; rank by accuracy so the best checkpoint is still defined.
    return {"auc": auc, "accuracy": accuracy, "score": accuracy if math.isnan(auc) else auc}


@torch.no_grad()
def predict(model, images: np.ndarray, sex: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Predictions in the CSV's units (months, or fracture probability) for uint8 (N, H, W) images."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(torch.from_numpy(images[start : start + batch_size]).unsqueeze(1), device, False)
        s = torch.from_numpy(sex[start : start + batch_size]).float().to(device)
        out.append(model.predict(model(x, s)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def write_predictions(path: Path | str, frame: pd.DataFrame, sidecar: dict) -> Path | str:
    """The predictions CSV and its ``.json`` sidecar, each written atomically (a path or a URI)."""
    storage.write_bytes(path, frame[list(PREDICTION_COLUMNS)].to_csv(index=False))
    storage.write_json_atomic(f"{path}.json", sidecar)
    return path


# ---------------------------------------------------------------- worker side


class _Batches(torch.utils.data.Dataset):
    """The split held in memory: index → (image uint8 (H, W), sex, target, id)."""

    def __init__(self, records: dict) -> None:
        self.images = read_images(records["image"])
        self.sex = np.asarray(records["sex"], dtype=np.float32)
        self.target = np.asarray(records["target"], dtype=np.float32)
        self.ids = list(records["id"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.images[i], self.sex[i], self.target[i], self.ids[i]


class _Collate:
    """Stacks a batch; augments training batches reproducibly per (seed, epoch, image id)."""

    def __init__(self, augment_p: float | None, seed: int) -> None:
        self.transform = build_augmentation(augment_p) if augment_p is not None else None
        self.seed, self.epoch = seed, 0

    def __call__(self, batch):
        images, sex, target, ids = zip(*batch, strict=True)
        images = np.stack(images)
        if self.transform is not None:
            images = augment_images(self.transform, images, ids, seed=self.seed, epoch=self.epoch)
        return (
            torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
            torch.from_numpy(np.array(sex, dtype=np.float32)),
            torch.from_numpy(np.array(target, dtype=np.float32)),
        )


class _ValScores:
    """The task's val scores (MAE or AUC) from this worker's predictions; fine-tuning scores on rank 0."""

    def __init__(self, task: str, device: torch.device) -> None:
        self.task, self.device = task, device
        self.targets: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []

    def update(self, model, batch) -> None:
        images, sex, target = batch
        output = model(to_model_input(images, self.device, False), sex.to(self.device))
        self.predictions.append(model.predict(output).float().cpu())
        self.targets.append(target)

    def compute(self) -> dict:
        target, prediction = torch.cat(self.targets).numpy(), torch.cat(self.predictions).numpy()
        return split_scores(self.task, target, prediction)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: runs on every worker."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    config = FinetuneConfig.from_dict(loop_config["config"])
    splits = loop_config["splits"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.seed)
    net = build_task_model(config)
    groups = parameter_groups(net, config.mode)
    gates = lr_gates(len(groups), config.mode, config.unfreeze_every)
    optimizer = torch.optim.Adam(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    def schedule(gate):
        return lambda e: (
            gate(e)
            * lr_factor(e, epochs=config.epochs, warmup_epochs=config.warmup_epochs, power=config.poly_power)
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(g) for g in gates])
    if ray.train.get_checkpoint() is None:  # a restart or resume loads the checkpoint's weights instead
        initialize(net, config.init, config.backbone)

    # Fine-tuning sets are small (thousands of images at most): each worker holds its split in
    # memory as uint8 and a torch DataLoader (sharded by prepare_data_loader's DistributedSampler)
    # feeds it, which avoids Ray Data's per-epoch task overhead; the driver already preprocessed
    # every image into the cache, so workers only read PNGs.
    train_set = _Batches(splits["train"])
    collate = _Collate(config.augment_p if config.augment else None, config.seed)
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(
            train_set,
            batch_size=config.per_worker_batch_size,
            shuffle=True,
            collate_fn=collate,
            # BatchNorm cannot train on a single image; drop the ragged last batch when a full one exists.
            drop_last=len(train_set) >= config.batch_size,
        )
    )
    val = (
        DataLoader(
            _Batches(splits["val"]), batch_size=config.per_worker_batch_size, collate_fn=_Collate(None, 0)
        )
        if rank == 0
        else None
    )

    def epoch_batches(epoch: int):
        collate.epoch = epoch
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        return loader

    def loss(model, batch):
        images, sex, target = batch
        output = model(to_model_input(images, device, False), sex.to(device))
        return net.loss(output, target.to(device), sex.to(device)), len(target)

    def evaluate_val(model) -> dict:
        if val is None:
            return {}
        return {
            f"val_{k}": v for k, v in evaluate(model, val, _ValScores(config.task, device), device).items()
        }

    def summary(metrics: dict) -> str:
        if config.task == "bone_age":
            return f"val MAE {metrics['val_mae']:.2f} months"
        return f"val AUC {metrics['val_auc']:.4f}, accuracy {metrics['val_accuracy']:.4f}"

    fit(
        TrainingJob(
            config=config,
            model=net,
            optimizer=optimizer,
            scheduler=scheduler,
            train_batches=epoch_batches,
            loss=loss,
            evaluate=evaluate_val,
            score_metric=SCORE_METRIC,
            summary=summary,
            train_mode=lambda model: set_train_mode(model, config.mode),
        )
    )


# ---------------------------------------------------------------- driver side


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path | str  # a str when the run storage is an object-store URI
    best_dir: Path | str
    best_metrics: dict
    predictions: dict[str, Path | str]  # split → CSV


def prepare_data(config: FinetuneConfig, *, progress: bool = True) -> tuple[FinetuneConfig, pd.DataFrame]:
    """The table with cached images, and the config with the bone-age target scale filled in."""
    table = load_table(config)
    cache_dir = config.cache_dir or str(_default_cache_dir(config))
    table = cache_images(
        table, image_size=config.image_size, enhance=config.enhance, cache_dir=cache_dir, progress=progress
    )
    if config.task == "bone_age" and (config.target_mean, config.target_std) == (0.0, 1.0):
        train = table.loc[table["split"] == "train", "target"]
        config = config.replace(target_mean=float(train.mean()), target_std=float(train.std(ddof=0)) or 1.0)
    return config, table


def _default_cache_dir(config: FinetuneConfig) -> Path:
    """STORAGE/cache; with object-store run storage the images are read as files, so ./cache (on a
    multi-node cluster pass --cache-dir on a shared mount)."""
    root = _storage_root(config)
    return Path("cache").resolve() if storage.is_uri(root) else root / "cache"


def _records(frame: pd.DataFrame) -> dict:
    return {c: frame[c].tolist() for c in ("id", "image", "sex", "target")}


def _with_absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """Ray Train workers run in their own working directory, and a resume may start elsewhere: every
    path the run reads is fixed relative to the directory the job was started from."""

    def absolute(path: str) -> str:
        return storage.resolve(path) if path else path

    def absolute_spec(spec: str) -> str:
        kind, sep, path = spec.partition(":")
        return f"{kind}{sep}{absolute(path)}" if sep else spec

    return config.replace(
        init=absolute_spec(config.init),
        data=absolute_spec(config.data),
        **{
            f: absolute(getattr(config, f))
            for f in ("images", "labels", "val_list", "test_list", "cache_dir")
        },
    )


def run_finetuning(
    config: FinetuneConfig, *, resume: bool = False, progress: bool = True, callbacks=()
) -> FinetuneResult:
    """Prepare the data, run (or resume) the Ray Train job, export the best checkpoint and predictions.

    ``callbacks`` are Ray Train callbacks (a Tune sweep passes ``TuneReportCallback``)."""
    if not config.data:
        raise FinetuneError("no data given: pass --data KIND:PATH or set `data:` in the --config YAML")
    config = _with_absolute_paths(
        config.replace(name=config.name or f"{config.task}-{datetime.now():%Y%m%d-%H%M%S}")
    )
    root = _storage_root(config)
    run_dir = storage.join(root, config.name)
    saved = storage.exists(storage.join(run_dir, CONFIG_FILE))
    if saved and not resume:
        raise FinetuneError(
            f"run {run_dir} already exists; pass --resume to continue it or choose another --name"
        )
    if resume and not saved:
        raise FinetuneError(f"nothing to resume: {run_dir} holds no run (no {CONFIG_FILE})")
    # Apply the initialisation once here: a bad weights file fails before Ray starts, and the
    # transfer report is shown and kept with the run (workers repeat it to get the weights).
    report = initialize(build_task_model(config), config.init, config.backbone)
    config, table = prepare_data(config, progress=progress)
    storage.makedirs(run_dir)
    if report is not None:
        print(report.summary())
        storage.write_bytes(storage.join(run_dir, INIT_REPORT), json.dumps(report.to_dict(), indent=2))
    storage.write_json_atomic(storage.join(run_dir, CONFIG_FILE), config.to_dict())
    counts = {split: int((table["split"] == split).sum()) for split in ("train", "val", "test")}
    print("data: " + ", ".join(f"{n} {split}" for split, n in counts.items()) + " images")

    connect_ray(
        num_workers=config.num_workers,
        cpus_per_worker=config.cpus_per_worker,
        gpus_per_worker=config.gpus_per_worker,
        use_gpu=config.use_gpu,
        error=FinetuneError,
    )
    scaling_config, run_config = train_job_configs(
        config, storage=str(root), score_metric=SCORE_METRIC, callbacks=callbacks
    )
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "splits": {s: _records(table[table["split"] == s]) for s in ("train", "val")},
        },
        scaling_config=scaling_config,
        run_config=run_config,
    )
    _, best_dir = fit_and_export_best(trainer, config, run_dir, SCORE_METRIC, FinetuneError)
    predictions = predict_splits(best_dir, table, run_dir)
    return FinetuneResult(
        run_dir=run_dir,
        best_dir=best_dir,
        best_metrics=storage.read_json(storage.join(best_dir, METRICS_FILE)),
        predictions=predictions,
    )


def predict_splits(
    checkpoint: Path | str, table: pd.DataFrame, out_dir: Path | str, splits=("val", "test")
) -> dict[str, Path | str]:
    """Score ``splits`` of the (cached) table with a fine-tuned checkpoint; one CSV per split."""
    model, config = load_finetuned(checkpoint)
    device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    written = {}
    for split in splits:
        rows = table[table["split"] == split]
        if rows.empty:
            continue
        prediction = predict(
            model,
            read_images(rows["image"].tolist()),
            rows["sex"].to_numpy(np.float32),
            config.batch_size,
            device,
        )
        sidecar = {
            "task": config.task,
            "checkpoint": str(checkpoint),
            "init": config.init,
            "recipe": config.recipe,
        }
        written[split] = write_predictions(
            storage.join(out_dir, f"predictions_{split}.csv"), rows.assign(prediction=prediction), sidecar
        )
    return written


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pedx_ray.finetune",
        description=__doc__.split("\n\n")[0],
        epilog="Precedence: defaults < --config YAML < flags. On --resume the run's saved config.json "
        "replaces the defaults.",
    )
    # Flags default to None so that only flags actually given override the YAML.
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--data", help="phantom:DIR | rsna:CSV | grazpedwri:CSV | dicom:CATALOG")
    parser.add_argument("--images", help="PNG folder (rsna, grazpedwri)")
    parser.add_argument("--labels", help="labels CSV: sop_instance_uid + bone_age_months or fracture (dicom)")
    parser.add_argument("--val-list", help="RSNA official validation CSV")
    parser.add_argument("--test-list", help="RSNA official test CSV")
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--train-fraction", type=float, help="keep this fraction of the training images")
    parser.add_argument("--train-size", type=int, help="keep this many training images")
    parser.add_argument(
        "--config", type=Path, help="YAML of FinetuneConfig fields (e.g. configs/recipes/*.yaml)"
    )
    parser.add_argument("--init", help="scratch | imagenet:WEIGHTS.pth | pedxnet:CHECKPOINT_DIR")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--unfreeze-every", type=int)
    parser.add_argument("--backbone")
    parser.add_argument("--head")
    parser.add_argument("--enhance")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split across workers (default 20)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--warmup-epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument(
        "--storage",
        help="directory or s3://bucket/prefix holding runs (shared storage on a cluster; default ./runs)",
    )
    parser.add_argument(
        "--cache-dir", help="preprocessed-image cache (default STORAGE/cache; ./cache for s3:// storage)"
    )
    parser.add_argument("--name", help="run name (default <task>-<timestamp>); the run is STORAGE/NAME")
    parser.add_argument(
        "--resume", action="store_true", help="continue run --name from its latest checkpoint"
    )
    parser.add_argument("--max-failures", type=int)
    return parser


CLI_FIELDS = (
    "task", "data", "images", "labels", "val_list", "test_list", "val_fraction", "test_fraction",
    "train_fraction", "train_size", "init", "mode", "unfreeze_every", "backbone", "head", "enhance",
    "image_size", "batch_size", "lr", "epochs", "warmup_epochs", "seed", "augment", "num_workers",
    "cpus_per_worker", "use_gpu", "storage", "cache_dir", "name", "max_failures",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    cli = {name: getattr(args, name) for name in CLI_FIELDS}
    yaml_layer = ({"recipe": args.config.stem} | read_yaml(args.config)) if args.config else {}
    base = None
    if args.resume:
        name = cli["name"] or yaml_layer.get("name")
        root = cli["storage"] or yaml_layer.get("storage") or FinetuneConfig.storage
        if not name:
            raise ConfigError("--resume needs --name: the run to continue is STORAGE/NAME")
        saved = storage.join(root, name, CONFIG_FILE)
        if not storage.is_file(saved):
            raise ConfigError(f"nothing to resume: {saved} does not exist")
        base = FinetuneConfig.from_dict(storage.read_json(saved), source=str(saved))
    return resolve_finetune_config(yaml_layer, cli, base=base)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        result = run_finetuning(config, resume=args.resume)
    except (
        ConfigError,
        DatasetError,
        InitError,
        FinetuneError,
        CheckpointError,
        storage.StorageError,
    ) as exc:
        parser.exit(2, f"error: {exc}\n")
    best = result.best_metrics
    score = f"val MAE {best['val_mae']:.2f} months" if "val_mae" in best else f"val AUC {best['val_auc']:.4f}"
    print(f"run: {result.run_dir}\nbest checkpoint (epoch {best['epoch']}, {score}): {result.best_dir}")
    for split, path in result.predictions.items():
        print(f"predictions ({split}): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
