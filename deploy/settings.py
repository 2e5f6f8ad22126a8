"""What the service serves and how: one frozen dataclass, resolved as defaults < YAML < builder arguments.

The YAML is ``$PEDX_SERVE_CONFIG`` or ``deploy/config.yaml``; either a plain mapping of these fields or
a Serve config file, whose ``deploy.app:app`` application's ``args`` are used (so `serve deploy` and
`serve run deploy.app:app` read the same settings). Builder arguments come from
``serve run deploy.app:app key=value ...`` (strings, converted by field type) or from Python.

Checkpoint fields take a directory (docs/design.md, contract 4) or a glob like ``demo/runs/smoke-7c-*/best``,
which picks the most recently modified match; relative paths are resolved against the working directory
of the process that builds the app (on a cluster, use absolute paths on shared storage, or an
``s3://bucket/runs/NAME/best`` URI on S3-compatible object storage: docs/guide/storage.md).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.gate import DEFAULT_GATE_VIEWS
from ingest import storage
from pedx_ray.augment import DEFAULT_TTA_VIEWS, MAX_TTA_VIEWS
from pedx_ray.config import ConfigError, read_yaml

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
CONFIG_ENV = "PEDX_SERVE_CONFIG"
IMPORT_PATH = "deploy.app:app"
# Model deployments by name: the view models per granularity, then the downstream tasks.
VIEW_MODELS = {"view_7": 7, "view_30": 30, "view_68": 68}
TASK_MODELS = ("bone_age", "fracture")
MODEL_FIELDS = (*VIEW_MODELS, *TASK_MODELS)
DEVICES = ("auto", "cpu", "cuda")


class SettingsError(ValueError):
    """The serving configuration is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class ServeSettings:
    # Checkpoints ("" = not served): view models from pretraining, downstream models from fine-tuning
    view_7: str = ""
    view_30: str = ""
    view_68: str = ""
    bone_age: str = ""
    fracture: str = ""
    # The view models' shard preprocessing (PreprocessParams fields) when their shard manifest is not
    # readable where the app is built; by default it is read from the manifest named in config.json.
    view_preprocessing: dict = field(default_factory=dict)
    fracture_threshold: float = 0.5
    # The view gate (deploy.gate): a bone_age / fracture upload is first classified by the finest served
    # view model and refused (422 wrong_view) unless the task's views hold gate_min_probability of it.
    gate: bool = True  # no effect when no view model is served (the answer says so)
    gate_min_probability: float = 0.5
    gate_views: dict = field(
        default_factory=lambda: {task: list(v) for task, v in DEFAULT_GATE_VIEWS.items()}
    )
    # Bone-age uncertainty: test-time augmentation views per image (identity, flip, small shifts; 1 = off)
    # and the largest standard deviation answered (0 = always answer; above it: 422 low_confidence).
    bone_age_tta: int = DEFAULT_TTA_VIEWS
    bone_age_max_sd_months: float = 0.0
    # Inference
    max_batch_size: int = 16  # 1 turns dynamic batching off
    # auto: twice a warm single-image forward, 5–250 ms (deploy.app.auto_batch_wait)
    batch_wait_timeout_s: float | str = "auto"
    device: str = "auto"  # auto: CUDA when the replica sees a GPU
    num_gpus: float | str = "auto"  # per model replica; auto: share the GPUs the builder sees, else 0
    num_cpus: float = 1.0  # per model replica
    bf16: bool = True  # CUDA only: bfloat16 autocast
    channels_last: bool = True  # CUDA only
    # Input limits
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000  # a 10,000 x 10,000 image is refused before it is decoded
    # OpenJPEG threads for one upload's JPEG 2000/HTJ2K decode in the gateway (latency of one image);
    # 0 = the machine's cores
    decoder_threads: int = 0
    # Access
    api_key_env: str = "PEDX_API_KEY"  # the variable holding the key; unset or empty = no key
    cors_origins: tuple[str, ...] = ()  # none = CORS off
    upload_dir: str = ""  # "" = uploads are never written to disk

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "view_preprocessing", dict(self.view_preprocessing or {}))
        # a task left out of gate_views keeps its default views
        object.__setattr__(self, "gate_views", dict(DEFAULT_GATE_VIEWS) | dict(self.gate_views or {}))
        checks = [
            (
                any(getattr(self, name) for name in MODEL_FIELDS),
                f"no model to serve: set at least one of {', '.join(MODEL_FIELDS)} to a checkpoint "
                f"directory (e.g. `serve run {IMPORT_PATH} view_7=runs/NAME/best`)",
            ),
            (
                0 < self.fracture_threshold < 1,
                f"fracture_threshold must be in (0, 1), not {self.fracture_threshold}",
            ),
            (
                0 < self.gate_min_probability <= 1,
                f"gate_min_probability must be in (0, 1], not {self.gate_min_probability}",
            ),
            (
                1 <= self.bone_age_tta <= MAX_TTA_VIEWS,
                f"bone_age_tta must be 1 (off) to {MAX_TTA_VIEWS} views, not {self.bone_age_tta}",
            ),
            (
                self.bone_age_max_sd_months >= 0,
                f"bone_age_max_sd_months must be >= 0 (0 = always answer), not {self.bone_age_max_sd_months}",
            ),
            (self.max_batch_size >= 1, f"max_batch_size must be at least 1, not {self.max_batch_size}"),
            (
                self.batch_wait_timeout_s == "auto"
                or (not isinstance(self.batch_wait_timeout_s, str) and self.batch_wait_timeout_s >= 0),
                f"batch_wait_timeout_s must be 'auto' or >= 0, not {self.batch_wait_timeout_s!r}",
            ),
            (self.device in DEVICES, f"device must be one of {DEVICES}, not {self.device!r}"),
            (
                self.num_gpus == "auto" or (isinstance(self.num_gpus, int | float) and self.num_gpus >= 0),
                f"num_gpus must be 'auto' or a number >= 0, not {self.num_gpus!r}",
            ),
            (self.num_cpus > 0, f"num_cpus must be positive, not {self.num_cpus}"),
            (
                self.decoder_threads >= 0,
                f"decoder_threads must be >= 0 (0 = the machine's cores), not {self.decoder_threads}",
            ),
            (
                self.max_upload_bytes >= 1024,
                f"max_upload_bytes must be at least 1024, not {self.max_upload_bytes}",
            ),
            (self.max_pixels >= 64 * 64, f"max_pixels must be at least 4096, not {self.max_pixels}"),
            (bool(self.api_key_env), "api_key_env must name an environment variable"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    def models(self) -> dict[str, str]:
        """Deployment name → checkpoint, for the models that are set."""
        return {name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name)}

    def replace(self, **changes: Any) -> ServeSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"cors_origins": list(self.cors_origins)}


def _convert(name: str, value: Any, default: Any) -> Any:
    """A builder argument (a string from the serve CLI, or already typed) as the field's type."""
    if not isinstance(value, str):
        return value
    if name in ("num_gpus", "batch_wait_timeout_s"):
        return value if value == "auto" else float(value)
    if isinstance(default, str):
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, not {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(default, dict):
        return yaml.safe_load(value)
    return value


def read_settings_yaml(path: str | Path) -> dict[str, Any]:
    """Settings fields from a YAML file: a plain mapping, or a Serve config file's application args."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise SettingsError(f"serving config: {exc}") from exc
    if "applications" in data:
        apps = [a for a in data["applications"] or [] if a.get("import_path") == IMPORT_PATH]
        if not apps:
            raise SettingsError(f"{path} is a Serve config without an application importing {IMPORT_PATH}")
        data = apps[0].get("args") or {}
    return data


def resolve_settings(args: dict[str, Any] | None = None) -> ServeSettings:
    """Defaults < YAML (``args['config']``, else $PEDX_SERVE_CONFIG, else deploy/config.yaml) < args."""
    args = dict(args or {})
    config = args.pop("config", None) or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    layer = read_settings_yaml(config) if Path(config).exists() or config != DEFAULT_CONFIG else {}
    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    values: dict[str, Any] = {}
    for source, label in ((layer, str(config)), (args, "arguments")):
        unknown = sorted(set(source) - set(fields))
        if unknown:
            raise SettingsError(f"{label}: unknown setting(s) {unknown}; known: {sorted(fields)}")
        for name, value in source.items():
            default = fields[name].default
            if default is dataclasses.MISSING:
                default = fields[name].default_factory()
            try:
                values[name] = _convert(name, value, default)
            except ValueError as exc:
                raise SettingsError(f"{label}: {name}={value!r} is not valid ({exc})") from exc
    try:
        return ServeSettings(**values)
    except TypeError as exc:
        raise SettingsError(f"invalid setting types: {exc}") from exc


def resolve_checkpoint(value: str, name: str) -> Path | str:
    """A checkpoint directory (absolute), a glob resolved to its most recently modified match, or an
    object-store URI (``s3://bucket/runs/NAME/best``, no glob) that holds files."""
    if storage.is_uri(value):
        if glob.has_magic(value):
            raise SettingsError(f"{name}: {value!r}: give the checkpoint's exact URI (globs need a path)")
        try:
            found = storage.is_dir(value)
        except storage.StorageError as exc:
            raise SettingsError(f"{name}: {exc}") from exc
        if not found:
            raise SettingsError(f"{name}: checkpoint {value!r} holds no files")
        return storage.resolve(value)
    if glob.has_magic(value):
        matches = [Path(p) for p in glob.glob(value) if Path(p).is_dir()]
        if not matches:
            raise SettingsError(
                f"{name}: no checkpoint directory matches {value!r} (from {Path.cwd()}); train one first "
                "(scripts/demo.sh writes demo/runs/smoke-7c-*/best) or give its path"
            )
        return max(matches, key=lambda p: p.stat().st_mtime).resolve()
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SettingsError(
            f"{name}: checkpoint directory {value!r} does not exist (resolved from {Path.cwd()})"
        )
    return path.resolve()
