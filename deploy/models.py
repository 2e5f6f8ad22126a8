"""Served models: what a checkpoint holds (`inspect_checkpoint`) and a typed predictor (`Predictor`).

`inspect_checkpoint` is cheap and runs where the app is built: it checks the checkpoint directory
(contract 4 of docs/design.md), parses ``config.json``, derives the training preprocessing (`Recipe`) and
checks that ``model.pt`` holds exactly the tensors the config's model has (shapes included; the model
is built on the ``meta`` device and the weights are memory-mapped, so nothing is allocated). A missing
or broken checkpoint therefore stops the app before any replica starts, with a message naming the file.
A checkpoint may also be an ``s3://bucket/prefix`` URI (`ingest.storage`); its files are downloaded
to a temporary directory for each load.

`Predictor` loads the weights with the training code's loaders (`pedx_ray.models.load_checkpoint` for
a view model, `pedx_ray.finetune.load_finetuned` for bone age and fracture) and predicts batches of
preprocessed uint8 images. On CUDA it runs channels_last with bfloat16 autocast (both switchable, and
both also work on the CPU); Grad-CAM always runs in float32 on a CPU copy of the model, because
`pedx_ray.explain.gradcam` returns numpy maps and hooks the module it explains.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from deploy.inputs import Recipe
from deploy.settings import TASK_MODELS, VIEW_MODELS
from ingest import storage
from ingest.imaging.preprocess import PreprocessParams
from pedx_ray.augment import tta_views
from pedx_ray.calibration import read_temperature
from pedx_ray.config import ConfigError, PretrainConfig
from pedx_ray.data import to_model_input
from pedx_ray.models import CONFIG_FILE, METRICS_FILE, MODEL_FILE, CheckpointError
from pedx_ray.recalibrate import read_recalibration


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its deployment name, task, checkpoint and how its inputs are prepared."""

    name: str
    task: str
    checkpoint: str
    config: dict
    metrics: dict
    recipe: Recipe
    classes: tuple[str, ...] = ()  # view models: class names in output order
    fracture_threshold: float = 0.5

    @property
    def input_size(self) -> int:
        return self.recipe.input_size or self.recipe.params.size

    def summary(self) -> dict:
        """What /v1/models shows: checkpoint, config, metrics, preprocessing."""
        out = {
            "name": self.name,
            "task": self.task,
            "checkpoint": self.checkpoint,
            "input_size": self.input_size,
            "recipe": self.recipe.to_dict(),
            "config": self.config,
            "metrics": self.metrics,
        }
        if self.task == "view":
            out |= {"granularity": len(self.classes), "classes": list(self.classes)}
        if self.task == "fracture":
            out["threshold"] = self.fracture_threshold
        return out


def task_of(name: str) -> str:
    if name in VIEW_MODELS:
        return "view"
    if name in TASK_MODELS:
        return name
    raise ValueError(f"unknown model {name!r}; models are {(*VIEW_MODELS, *TASK_MODELS)}")


def _read_json(path: Path | str) -> dict:
    try:
        data = storage.read_json(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); re-export the checkpoint") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def inspect_checkpoint(
    name: str,
    directory: str | Path,
    *,
    view_preprocessing: dict | None = None,
    fracture_threshold: float = 0.5,
) -> ModelSpec:
    """Validate a checkpoint directory for deployment ``name`` and describe it (no weights are loaded)."""
    path = storage.join(directory)
    task = task_of(name)
    missing = [f for f in (MODEL_FILE, CONFIG_FILE) if not storage.is_file(storage.join(path, f))]
    if missing:
        raise CheckpointError(
            f"{name}: {path} is not a PedX-Ray checkpoint (missing {', '.join(missing)}); a checkpoint is "
            "the best/ directory a training run exports"
        )
    config_file, metrics_file = storage.join(path, CONFIG_FILE), storage.join(path, METRICS_FILE)
    config = _read_json(config_file)
    metrics = _read_json(metrics_file) if storage.is_file(metrics_file) else {}
    try:
        if task == "view":
            parsed = PretrainConfig.from_dict(config, source=str(config_file))
            classes = parsed.classes
            if parsed.granularity != VIEW_MODELS[name] or len(classes) != parsed.granularity:
                raise CheckpointError(
                    f"{name}: {path} is a {parsed.granularity}-class view model with {len(classes)} class "
                    f"names; serve it as view_{parsed.granularity}"
                )
            recipe = _view_recipe(parsed, view_preprocessing, path)
        else:
            from pedx_ray.finetune import FinetuneConfig

            if "task" not in config or "backbone" not in config:
                raise CheckpointError(
                    f"{name}: {config_file} is not a fine-tuning config (no task/backbone); a view "
                    "model goes in view_7 / view_30 / view_68"
                )
            parsed = FinetuneConfig.from_dict(config, source=str(config_file))
            if parsed.task != task:
                raise CheckpointError(f"{name}: {path} is a {parsed.task} model; serve it as {parsed.task}")
            classes = ()
            recipe = Recipe(
                PreprocessParams(size=parsed.image_size, clahe=parsed.enhance == "clahe"),
                enhance=parsed.enhance,
                input_size=parsed.image_size,
                source=f"{config_file} (image_size, enhance)",
            )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: {config_file} does not describe a model: {exc}") from exc
    spec = ModelSpec(name, task, str(path), config, metrics, recipe, tuple(classes), fracture_threshold)
    _check_weights(spec)
    return spec


def _view_recipe(config: PretrainConfig, override: dict | None, checkpoint: Path | str) -> Recipe:
    """Pretraining read shard PNGs made with the shard manifest's parameters, resized to image_size."""
    if override:
        params, source = PreprocessParams(**override), "settings: view_preprocessing"
    else:
        manifest = storage.join(config.shards, "manifest.json")
        if not config.shards or not storage.is_file(manifest):
            raise CheckpointError(
                f"{checkpoint}: the shard manifest {manifest} named by its config.json is not readable "
                f"from {Path.cwd()}, so the training preprocessing is unknown; run from the training "
                "directory, or set view_preprocessing to the manifest's `preprocessing` (e.g. {size: 512})"
            )
        try:
            params = PreprocessParams(**storage.read_json(manifest)["preprocessing"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{manifest} has no valid `preprocessing` entry ({exc})") from exc
        source = storage.resolve(manifest)
    return Recipe(params, enhance="none", input_size=config.image_size, source=source)


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The untrained network the checkpoint's config.json describes."""
    if spec.task == "view":
        from pedx_ray.models import build_model as build_view_model

        return build_view_model(PretrainConfig.from_dict(spec.config))
    from pedx_ray.finetune import FinetuneConfig
    from pedx_ray.tasks import build_task_model

    return build_task_model(FinetuneConfig.from_dict(spec.config))


def _check_weights(spec: ModelSpec) -> None:
    """model.pt must hold exactly the config's tensors, with their shapes (checked without allocating)."""
    weights = storage.join(spec.checkpoint, MODEL_FILE)
    with storage.local_copy(spec.checkpoint) as local:
        try:
            state = torch.load(local / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a damaged zip/pickle
            raise CheckpointError(
                f"{spec.name}: {weights} is not a readable PyTorch state_dict ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{spec.name}: {weights} holds a {type(state).__name__}, not a state_dict")
        found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: {found[k]} ≠ {v}" for k, v in expected.items() if k in found and found[k] != v]
    if problems:
        raise CheckpointError(
            f"{spec.name}: {weights} does not match the model its config.json describes "
            f"({len(problems)} problem(s): {'; '.join(problems[:4])})"
        )


class Predictor:
    """A loaded model that predicts batches of preprocessed uint8 images (N, S, S).

    Applies what the checkpoint carries besides its weights: a view or fracture model's fitted
    temperature (``calibration.json``), a bone-age model's site recalibration (``recalibration.json``).
    Bone age is predicted on ``tta`` augmented views of each image: the answer is their mean ± SD."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str = "cpu",
        bf16: bool = False,
        channels_last: bool = False,
        tta: int = 1,
    ) -> None:
        started = time.perf_counter()
        if spec.task == "view":
            from pedx_ray.models import load_checkpoint

            model, _ = load_checkpoint(spec.checkpoint)
        else:
            from pedx_ray.finetune import load_finetuned

            model, _ = load_finetuned(spec.checkpoint)
        self.spec, self.bf16, self.channels_last = spec, bf16, channels_last
        self.tta = tta if spec.task == "bone_age" else 1
        self.temperature = read_temperature(spec.checkpoint) if spec.task != "bone_age" else 1.0
        self.recalibration = read_recalibration(spec.checkpoint) if spec.task == "bone_age" else (1.0, 0.0)
        self._device = torch.device(device)
        # Grad-CAM hooks the module it explains: it gets its own float32 CPU copy and lock, so an
        # explanation never sees a concurrent batch's activations.
        self._explain_model = copy.deepcopy(model)
        self._explain_lock = threading.Lock()
        self._lock = threading.Lock()
        model = model.to(self._device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.load_seconds = time.perf_counter() - started

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, sex: torch.Tensor):
        return model(x) if self.spec.task == "view" else model(x, sex)

    @torch.inference_mode()
    def predict(self, images: np.ndarray, sex: np.ndarray | None = None) -> list[dict]:
        """One result per image; ``sex`` (1 male, 0 female) is used by bone age only."""
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, S, S), got {images.dtype} {images.shape}")
        count = len(images)
        sex = np.zeros(count, np.float32) if sex is None else np.asarray(sex, np.float32)
        if self.tta > 1:
            images, sex = tta_views(images, self.tta), np.repeat(sex, self.tta)
        images = np.require(images, requirements=["C", "W"])  # arrays from Ray's object store are read-only
        x = to_model_input(torch.from_numpy(images).unsqueeze(1), self._device, self.channels_last)
        s = torch.as_tensor(sex, dtype=torch.float32).to(self._device)
        with (
            self._lock,
            torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            output = self._forward(self.model, x, s)
            if self.spec.task == "view":
                scores = torch.softmax(output.float() / self.temperature, dim=1)
            elif self.spec.task == "fracture":
                scores = self.model.predict(output.float() / self.temperature).float()
            else:
                scores = self.model.predict(output).float()
        scores = scores.cpu().numpy()
        if self.spec.task == "bone_age":
            slope, intercept = self.recalibration
            scores = (slope * scores.astype(np.float64) + intercept).reshape(count, self.tta)
        return self._results(scores)

    def _results(self, scores: np.ndarray) -> list[dict]:
        if self.spec.task == "view":
            return [
                {"label": self.spec.classes[int(row.argmax())], "probabilities": row.tolist()}
                for row in scores
            ]
        if self.spec.task == "bone_age":
            return [
                {
                    "bone_age_months": float(views.mean()),
                    "bone_age_sd_months": float(views.std(ddof=1)) if len(views) > 1 else None,
                    "tta_views": len(views),
                }
                for views in scores
            ]
        threshold = self.spec.fracture_threshold
        return [
            {"probability": float(p), "fracture": bool(p >= threshold), "threshold": threshold}
            for p in scores
        ]

    def explain(self, image: np.ndarray, sex: float = 0.0) -> tuple[dict, np.ndarray]:
        """(the prediction, a BGR uint8 Grad-CAM overlay on the model input) for one uint8 (S, S) image."""
        from pedx_ray.explain import gradcam, overlay

        result = self.predict(image[None], np.array([sex], np.float32))[0]
        tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).float().div_(255.0)[None, None]
        sex_tensor = torch.tensor([sex], dtype=torch.float32)

        def score(model, x):
            output = self._forward(model, x, sex_tensor)
            return output[0] if isinstance(output, tuple) else output  # TJ-Net: (age logits, sex logits)

        target = self.spec.classes.index(result["label"]) if self.spec.task == "view" else None
        with self._explain_lock:
            heat = gradcam(self._explain_model, tensor, target_class=target, forward=score)[0]
        return result, overlay(image, heat)

    def time_single_forward(self) -> float:
        """Seconds one warm single-image forward pass takes (the first call also warms the model up)."""
        blank = np.zeros((1, self.spec.input_size, self.spec.input_size), np.uint8)
        self.predict(blank)
        if self._device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        self.predict(blank)  # ends with .cpu(), so CUDA work is included
        return time.perf_counter() - started

    def info(self) -> dict:
        return self.spec.summary() | {
            "device": str(self._device),
            "bf16": self.bf16,
            "channels_last": self.channels_last,
            "load_seconds": round(self.load_seconds, 3),
            "temperature": self.temperature,
            "recalibration": dict(zip(("slope", "intercept"), self.recalibration, strict=True)),
            "tta_views": self.tta,
        }


def encode_overlay(bgr: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError(f"PNG encoding failed for an overlay of shape {bgr.shape}")
    return buffer.tobytes()
