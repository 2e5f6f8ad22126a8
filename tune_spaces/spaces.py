"""The study's search spaces, one named `Space` each; copy one into your own module and edit it.

A space's ``params`` is a Ray Tune ``param_space``: each key is a field of the job's config
(`pedx_ray.config.PretrainConfig` for ``pretrain``, `pedx_ray.finetune.FinetuneConfig` otherwise)
set per trial, plus two symbolic keys for fine-tuning that the runner resolves:

- ``init``: ``scratch``, ``imagenet`` (the ``--imagenet`` weights file) or ``pedxnet-7`` /
  ``pedxnet-30`` / ``pedxnet-68`` (the PedXnet checkpoint of that granularity: ``--pedxnet G=DIR``,
  or the best trial of the ablation's pretraining stage);
- ``train_size``: ``"50%"`` keeps that share of the training split, ``"500"`` that many images
  (nested subsets: a smaller one is part of every larger one for the same seed).

``grid_axes`` are the cells of the design: the report groups by them, and the ASHA scheduler
compares trials only within a cell (a 5% run is never stopped for losing to a 100% run).
``num_samples`` repeats the grid, drawing the sampled keys (learning rate) afresh each time.

Use your own space with ``python -m tune_spaces.run MODE --space my_spaces.py:MY_SPACE``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import tune

from pedx_ray.config import GRANULARITIES, ConfigError, PretrainConfig
from pedx_ray.finetune import FinetuneConfig

MODES = ("pretrain", "transfer", "ablation")
INITS = ("scratch", "imagenet", *(f"pedxnet-{g}" for g in GRANULARITIES))
SYMBOLIC_KEYS = ("init", "train_size")
_SIZE = re.compile(r"^(?:(\d+(?:\.\d+)?)%|(\d+))$")


def parse_train_size(token: str) -> dict[str, float | int]:
    """``"50%"`` → ``{"train_fraction": 0.5, "train_size": 0}``; ``"500"`` → ``{"train_size": 500, ...}``."""
    match = _SIZE.match(str(token).strip())
    if match is None:
        raise ConfigError(f"train_size {token!r}: use a percentage such as '20%' or a count such as '500'")
    percent, count = match.groups()
    if percent is not None:
        fraction = float(percent) / 100
        if not 0 < fraction <= 1:
            raise ConfigError(f"train_size {token!r}: a percentage must be in (0%, 100%]")
        return {"train_fraction": fraction, "train_size": 0}
    if int(count) < 1:
        raise ConfigError(f"train_size {token!r}: a count must be at least 1")
    return {"train_fraction": 1.0, "train_size": int(count)}


def init_granularity(token: str) -> int | None:
    """The PedXnet granularity an ``init`` token needs (None for scratch / imagenet)."""
    if token not in INITS:
        raise ConfigError(f"init {token!r}: use one of {INITS}")
    return int(token.split("-")[1]) if token.startswith("pedxnet-") else None


@dataclass(frozen=True)
class Space:
    name: str
    mode: str  # the runner mode it is written for
    description: str
    params: dict[str, Any]
    grid_axes: tuple[str, ...] = ()
    num_samples: int = 1
    metric: str = ""  # what the scheduler ranks: the job's per-epoch validation score
    metric_mode: str = "max"

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> Space:
        return dataclasses.replace(self, **changes)

    def values(self, key: str) -> list:
        """The grid values of ``key``, or its one constant value."""
        value = self.params[key]
        if isinstance(value, dict) and "grid_search" in value:
            return list(value["grid_search"])
        return [value]


def _job_fields(mode: str) -> set[str]:
    config = PretrainConfig if mode == "pretrain" else FinetuneConfig
    return {f.name for f in dataclasses.fields(config)}


# Set by the runner from its own flags; a space that sets them would silently lose them.
RUNNER_FIELDS = ("shards", "data", "init", "storage", "name", "classes", "train_fraction", "cache_dir")


def validate(space: Space) -> None:
    """Check a space against its mode's config; the messages say how to fix it."""
    if space.mode not in MODES:
        raise ConfigError(f"space {space.name}: mode must be one of {MODES}, not {space.mode!r}")
    if space.num_samples < 1:
        raise ConfigError(f"space {space.name}: num_samples must be at least 1, not {space.num_samples}")
    if space.metric_mode not in ("min", "max"):
        raise ConfigError(f"space {space.name}: metric_mode must be 'min' or 'max'")
    fields = _job_fields(space.mode)
    allowed = fields | (set() if space.mode == "pretrain" else set(SYMBOLIC_KEYS))
    for key in space.params:
        if key in RUNNER_FIELDS and key not in SYMBOLIC_KEYS:
            raise ConfigError(f"space {space.name}: {key!r} comes from the runner's flags; drop it")
        if key not in allowed:
            raise ConfigError(
                f"space {space.name}: {key!r} is not a {space.mode} config field; known: {sorted(allowed)}"
            )
    missing_axes = [a for a in space.grid_axes if a not in space.params]
    if missing_axes:
        raise ConfigError(f"space {space.name}: grid axes {missing_axes} are not in params")
    if space.mode == "pretrain":
        for g in space.values("granularity") if "granularity" in space.params else []:
            if g not in GRANULARITIES:
                raise ConfigError(f"space {space.name}: granularity {g} is not one of {GRANULARITIES}")
    else:
        for token in space.values("init") if "init" in space.params else []:
            init_granularity(token)
        for token in space.values("train_size") if "train_size" in space.params else []:
            parse_train_size(token)


def sample(space: Space, num_samples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trial configs Tune would run: the grid × ``num_samples`` draws, in Tune's order."""
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(seed)
    configs = []
    for _ in range(num_samples or space.num_samples):
        configs += [config for _, config in generate_variants(space.params, random_state=rng)]
    return configs


def cell(config: dict[str, Any], axes: tuple[str, ...]) -> tuple:
    return tuple(config.get(axis) for axis in axes)


# ---------------------------------------------------------------- the paper's study

PRETRAIN = Space(
    name="PRETRAIN",
    mode="pretrain",
    description="Upstream PedXnet: learning rate (log-uniform 1e-5..1e-3) × batch size × augmentation "
    "probability, within each class granularity 7 / 30 / 68 (Table 1).",
    params={
        "granularity": tune.grid_search([7, 30, 68]),
        "lr": tune.loguniform(1e-5, 1e-3),
        "batch_size": tune.choice([30, 60, 120]),
        "augment_p": tune.uniform(0.25, 0.75),
    },
    grid_axes=("granularity",),
    num_samples=8,
    metric="finetune_f1",
)

TRANSFER = Space(
    name="TRANSFER",
    mode="transfer",
    description="Downstream learning-rate search (log-uniform 1e-5..1e-3) in every cell of "
    "initialisation × training size (Tables 2 / 3 and the data-size ablation).",
    params={
        "init": tune.grid_search(list(INITS)),
        "train_size": tune.grid_search(["100%", "50%", "20%", "10%", "5%", "500", "100"]),
        "lr": tune.loguniform(1e-5, 1e-3),
    },
    grid_axes=("init", "train_size"),
    num_samples=4,
    metric="val_score",
)

ABLATION = Space(
    name="ABLATION",
    mode="ablation",
    description="The data-size ablation: every initialisation × training size × 3 seeds at the "
    "paper's learning rate (1e-4); mean ± SD over seeds.",
    params={
        "init": tune.grid_search(list(INITS)),
        "train_size": tune.grid_search(["100%", "50%", "20%", "10%", "5%"]),
        "seed": tune.grid_search([0, 1, 2]),
        "lr": 1e-4,
    },
    grid_axes=("init", "train_size"),
    metric="val_score",
)

# ---------------------------------------------------------------- small versions for phantoms on a laptop

PHANTOM_PRETRAIN = Space(
    name="PHANTOM_PRETRAIN",
    mode="pretrain",
    description="Stage 1 of the phantom ablation: one small PedXnet per granularity (7 and 30) at a "
    "fixed learning rate.",
    params={"granularity": tune.grid_search([7, 30]), "lr": 1e-3},
    grid_axes=("granularity",),
    metric="finetune_f1",
)

CLUSTER_SMOKE = Space(
    name="CLUSTER_SMOKE",
    mode="pretrain",
    description="Two learning rates on a 7-class shard set: a sweep small enough to show its trials "
    "spread over a cluster's nodes (scripts/cluster_demo.sh).",
    params={"granularity": 7, "lr": tune.grid_search([1e-3, 3e-4])},
    grid_axes=("lr",),
    metric="finetune_f1",
)

PHANTOM_TRANSFER = Space(
    name="PHANTOM_TRANSFER",
    mode="transfer",
    description="A learning-rate search small enough for phantoms: scratch and PedXnet-7C, 3 draws each.",
    params={
        "init": tune.grid_search(["scratch", "pedxnet-7"]),
        "train_size": "100%",
        "lr": tune.loguniform(1e-4, 1e-2),
    },
    grid_axes=("init", "train_size"),
    num_samples=3,
    metric="val_score",
)

PHANTOM_ABLATION = Space(
    name="PHANTOM_ABLATION",
    mode="ablation",
    description="The documented small ablation: scratch / PedXnet-7C / PedXnet-30C × 100% / 50% / 20% "
    "of the training split × 3 seeds.",
    params={
        "init": tune.grid_search(["scratch", "pedxnet-7", "pedxnet-30"]),
        "train_size": tune.grid_search(["100%", "50%", "20%"]),
        "seed": tune.grid_search([0, 1, 2]),
        "lr": 1e-3,
    },
    grid_axes=("init", "train_size"),
    metric="val_score",
)

SPACES = {
    s.name: s
    for s in (
        PRETRAIN,
        TRANSFER,
        ABLATION,
        PHANTOM_PRETRAIN,
        CLUSTER_SMOKE,
        PHANTOM_TRANSFER,
        PHANTOM_ABLATION,
    )
}
DEFAULT_SPACE = {"pretrain": "PRETRAIN", "transfer": "TRANSFER", "ablation": "ABLATION"}


def load_space(spec: str) -> Space:
    """A built-in name (``PHANTOM_ABLATION``) or ``FILE.py:NAME`` / ``package.module:NAME``."""
    if spec in SPACES:
        return SPACES[spec]
    source, sep, name = spec.rpartition(":")
    if not sep:
        raise ConfigError(f"space {spec!r}: use one of {sorted(SPACES)} or FILE.py:NAME / module:NAME")
    import importlib
    import importlib.util
    from pathlib import Path

    try:
        if source.endswith(".py"):
            spec_obj = importlib.util.spec_from_file_location(Path(source).stem, source)
            if spec_obj is None or not Path(source).is_file():
                raise ConfigError(f"space {spec!r}: {source} does not exist")
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except ImportError as exc:
        raise ConfigError(f"space {spec!r}: cannot import {source}: {exc}") from exc
    space = getattr(module, name, None)
    if not isinstance(space, Space):
        raise ConfigError(f"space {spec!r}: {source} has no Space named {name}")
    return space
