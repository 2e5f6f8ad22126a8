"""The pretraining run's configuration: one frozen dataclass, resolved as defaults < YAML < CLI.

Every number of the paper's recipe (docs/design.md) is a field here, so a run is fully described by
the ``config.json`` saved with it and any checkpoint can be rebuilt from that file alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pedx_ray.faults import FAULT_ENV

GRANULARITIES = (7, 30, 68)
ARCHITECTURES = ("inception_v3", "resnet18", "tiny_cnn")
# InceptionV3's stem and reductions shrink 75 px to 1×1; anything smaller fails inside the network.
MIN_INCEPTION_SIZE = 75


class ConfigError(ValueError):
    """A configuration value is invalid; the message says how to fix it."""


def training_checks(config) -> list[tuple[bool, str]]:
    """The checks every Ray Train job config shares (pretraining and fine-tuning): optimizer, schedule,
    batch split and workers, as (ok, how to fix) pairs."""
    return [
        (config.image_size >= 16, f"image_size must be at least 16, not {config.image_size}"),
        (config.epochs >= 1, f"epochs must be at least 1, not {config.epochs}"),
        (config.num_workers >= 1, f"num_workers must be at least 1, not {config.num_workers}"),
        (
            config.batch_size >= config.num_workers and config.batch_size % config.num_workers == 0,
            f"batch_size {config.batch_size} is global and must divide evenly across "
            f"{config.num_workers} workers; use a multiple of {config.num_workers}",
        ),
        (config.lr > 0, f"lr must be positive, not {config.lr}"),
        (
            len(config.betas) == 2 and all(0 <= b < 1 for b in config.betas),
            f"betas must be two values in [0, 1), not {config.betas}",
        ),
        (config.weight_decay >= 0, f"weight_decay must be >= 0, not {config.weight_decay}"),
        (
            0 <= config.warmup_epochs < config.epochs,
            f"warmup_epochs ({config.warmup_epochs}) must be >= 0 and below epochs ({config.epochs}): "
            "the polynomial decay needs at least one epoch after warm-up; lower --warmup-epochs",
        ),
        (config.poly_power > 0, f"poly_power must be positive, not {config.poly_power}"),
        (0 <= config.augment_p <= 1, f"augment_p is a probability in [0, 1], not {config.augment_p}"),
        (0 <= config.dropout < 1, f"dropout must be in [0, 1), not {config.dropout}"),
        (config.cpus_per_worker > 0, f"cpus_per_worker must be positive, not {config.cpus_per_worker}"),
        (config.gpus_per_worker > 0, f"gpus_per_worker must be positive, not {config.gpus_per_worker}"),
        (
            config.max_failures >= -1,
            f"max_failures must be -1 (retry forever) or more, not {config.max_failures}",
        ),
        (config.num_to_keep >= 1, f"num_to_keep must be at least 1, not {config.num_to_keep}"),
    ]


@dataclass(frozen=True)
class PretrainConfig:
    # Data
    shards: str = ""
    granularity: int = 7
    image_size: int = 512
    classes: tuple[str, ...] = ()  # filled from the shard manifest; checkpoints keep them in order
    verify_checksums: bool = True
    # Model
    arch: str = "inception_v3"  # the paper's; resnet18 for short CPU runs; tiny_cnn for fast tests only
    dropout: float = 0.5
    # Optimisation (the paper's recipe)
    epochs: int = 100
    batch_size: int = 60  # global: split evenly across workers
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    poly_power: float = 0.9
    seed: int = 0
    # Augmentation
    augment: bool = True
    augment_p: float = 0.5
    shuffle_buffer: int = 256
    # Speed (CUDA only; ignored on CPU)
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    prefetch_batches: int = 2
    # Ray
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction lets the runs of a sweep share a GPU
    storage: str = "runs"
    name: str = ""
    max_failures: int = 2
    num_to_keep: int = 2
    tensorboard: bool = True

    def __post_init__(self) -> None:
        # YAML and JSON give lists; the frozen config keeps tuples so it is hashable and comparable.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        checks = [
            (
                self.granularity in GRANULARITIES,
                f"granularity must be one of {GRANULARITIES}, not {self.granularity}",
            ),
            (self.arch in ARCHITECTURES, f"arch must be one of {ARCHITECTURES}, not {self.arch!r}"),
            (
                self.arch != "inception_v3" or self.image_size >= MIN_INCEPTION_SIZE,
                f"image_size {self.image_size} is too small for InceptionV3; "
                f"use at least {MIN_INCEPTION_SIZE}",
            ),
            *training_checks(self),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, not {self.shuffle_buffer}"),
            (
                not self.classes or len(self.classes) == self.granularity,
                f"{len(self.classes)} class names given for granularity {self.granularity}; "
                "they come from the shard manifest, leave `classes` out of the YAML",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    def replace(self, **changes: Any) -> PretrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"classes": list(self.classes), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PretrainConfig:
        data = dict(data)
        # Configs saved before fault injection became a test hook carry the field, as 0 (never) in
        # every real run: those still load; a request for a fault is refused with where it went.
        if data.pop("fail_after_epoch", 0):
            raise ConfigError(
                f"{source}: fail_after_epoch is no longer a config field; remove it. Fault injection is "
                f"a test-only hook: set the environment variable {FAULT_ENV}=EPOCH:MARKER_FILE "
                "(see pedx_ray/faults.py)"
            )
        return from_known_fields(cls, data, source)


def from_known_fields(cls, data: dict[str, Any], source: str):
    """``cls(**data)`` for a config dataclass, refusing fields it does not have (a typo in a YAML file)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields, not {type(data).__name__}")
    return data


def resolve_config(*layers: dict[str, Any], base: PretrainConfig | None = None) -> PretrainConfig:
    """Apply ``layers`` in order over ``base`` (defaults when None); later layers win, None means unset."""
    merged = (base or PretrainConfig()).to_dict()
    for layer in layers:
        merged |= {k: v for k, v in layer.items() if v is not None}
    return PretrainConfig.from_dict(merged)


def load_config_json(path: str | Path) -> PretrainConfig:
    return PretrainConfig.from_dict(json.loads(Path(path).read_text()), source=str(path))
