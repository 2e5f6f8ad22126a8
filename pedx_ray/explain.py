"""Explanation: Grad-CAM, the channel-wise mean activation map, overlays, and t-SNE of pretrained features.

``python -m pedx_ray.explain --checkpoint DIR --image FILE.dcm|png --out overlay.png [--method gradcam|mean]``
writes the heat map over the preprocessed radiograph (cv2 JET colour map, alpha blended).
``python -m pedx_ray.explain --checkpoint DIR --tsne SHARDS_DIR [--split val] [--samples 300] --out tsne.png``
embeds the checkpoint's pooled features of shard samples in 2-D, coloured by their 7-class label.

Both maps hook one named module (``target_layer``): by default the last Inception block ``Mixed_7c``
where the model has one, else the model's last ``nn.Conv2d`` (TinyCNN's 1×1 conv to 2048 channels).
- Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of d(score)/d(activation); map =
  ReLU(Σ weight·activation), upsampled bilinearly to the input and divided by its maximum (all zero
  when nothing contributes positively). The score is the logit of ``target_class`` (default the
  predicted class); a single-output model (fracture logit, bone-age regression) uses its one output.
- Mean map (the PedXnet paper's figure): mean over channels of the layer's activation, sigmoid,
  upsampled bilinearly; values in (0, 1) without per-image rescaling, so maps are comparable.
t-SNE is scikit-learn's (``sklearn.manifold.TSNE``), drawn with matplotlib (``pedx_ray.plots``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm import tqdm

from ingest.imaging.png import write_png
from ingest.imaging.preprocess import (
    IMAGE_SUFFIXES,
    PreprocessError,
    PreprocessParams,
    preprocess_array,
    preprocess_file,
)
from pedx_ray import plots

METHODS = ("gradcam", "mean")
INCEPTION_LAST_BLOCK = "Mixed_7c"


class ExplainError(ValueError):
    pass


def default_target_layer(model: nn.Module) -> str:
    """Name of the module the maps hook: ``...Mixed_7c`` if present, else the last Conv2d."""
    names = [name for name, _ in model.named_modules()]
    inception = [n for n in names if n.split(".")[-1] == INCEPTION_LAST_BLOCK]
    if inception:
        return inception[-1]
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ExplainError(f"{type(model).__name__} has no Conv2d layer; pass target_layer explicitly")
    return convs[-1]


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-3:]
        raise ExplainError(
            f"{type(model).__name__} has no module {name!r} (its last convs: {convs})"
        ) from exc


def _activation(
    model: nn.Module, layer: str, run: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``run()`` with a forward hook on ``layer``; returns (model output, the layer's activation)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ExplainError(
                f"layer {layer!r} must output (N, C, H, W) feature maps, got {type(output).__name__}"
            )
        captured.append(output)

    handle = _module(model, layer).register_forward_hook(hook)
    try:
        output = run()
    finally:
        handle.remove()
    if not captured:
        raise ExplainError(f"layer {layer!r} did not run in the model's forward pass")
    return output, captured[-1]


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ExplainError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: str | None = None,
    target_class: int | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for ``images`` (N, C, H, W).

    ``forward(model, images)`` replaces ``model(images)`` for models with extra inputs (e.g. a bone-age
    head that also takes sex); it must return (N,) or (N, K) scores."""
    _check_images(images)
    layer = target_layer or default_target_layer(model)
    was_training = model.training
    model.eval()
    images = images.detach().float()
    try:
        with torch.enable_grad():
            output, activation = _activation(
                model, layer, lambda: (forward or (lambda m, x: m(x)))(model, images)
            )
            scores = output.reshape(len(images), -1)
            if scores.shape[1] == 1:
                chosen = scores[:, 0]
            else:
                index = (
                    torch.full((len(images),), target_class, dtype=torch.long)
                    if target_class is not None
                    else scores.argmax(dim=1)
                )
                if not 0 <= int(index.max()) < scores.shape[1]:
                    raise ExplainError(
                        f"target_class {target_class} is outside the {scores.shape[1]} outputs"
                    )
                chosen = scores.gather(1, index[:, None])[:, 0]
            (gradient,) = torch.autograd.grad(chosen.sum(), activation)
    finally:
        model.train(was_training)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1)).detach()
    cam = _upsample(cam, tuple(images.shape[-2:]))
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.clamp(0, 1).cpu().numpy()


@torch.no_grad()
def mean_activation_map(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: str | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Channel-mean of the layer's activation, sigmoid, upsampled: (N, H, W) in (0, 1)."""
    _check_images(images)
    layer = target_layer or default_target_layer(model)
    was_training = model.training
    model.eval()
    try:
        _, activation = _activation(
            model, layer, lambda: (forward or (lambda m, x: m(x)))(model, images.float())
        )
    finally:
        model.train(was_training)
    return _upsample(torch.sigmoid(activation.mean(dim=1)), tuple(images.shape[-2:])).cpu().numpy()


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.4, colormap: int = cv2.COLORMAP_JET
) -> np.ndarray:
    """BGR uint8: the grayscale radiograph blended with the colour-mapped heat map (resized to fit)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ExplainError(f"overlay needs a uint8 grayscale image, got {image.dtype} {image.shape}")
    if not 0 <= alpha <= 1:
        raise ExplainError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    if heat.shape != image.shape:
        heat = cv2.resize(heat, image.shape[::-1], interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), colormap)
    return cv2.addWeighted(colour, alpha, cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), 1 - alpha, 0)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """A DICOM or PNG/JPEG file through the paper's preprocessing at ``size``×``size`` (uint8)."""
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"image file {path} does not exist")
    params = PreprocessParams(size=size)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ExplainError(f"{path} is not a readable PNG/JPEG image")
        return preprocess_array(raw, params)
    try:
        return preprocess_file(path, params)
    except PreprocessError as exc:
        raise ExplainError(f"{path}: {exc}") from exc


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) → float (1, 1, H, W) in [0, 1], the scaling the training loaders use."""
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None, None]


def tsne(features: np.ndarray, perplexity: float = 30.0, seed: int = 0, max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE embedding (n, 2) of ``features`` (n, d) by scikit-learn (Barnes-Hut, PCA start),
    deterministic for a given seed. The perplexity is lowered to (n − 1) / 3 where it exceeds that,
    so that each point's 3·perplexity nearest neighbours, which Barnes-Hut uses, are other points."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 5:
        raise ExplainError(f"t-SNE needs a (n, d) feature matrix with n ≥ 5, got shape {x.shape}")
    if perplexity <= 0:
        raise ExplainError(f"perplexity must be positive, got {perplexity}; about n/10 works for small n")
    model = TSNE(
        perplexity=min(perplexity, (len(x) - 1) / 3),
        max_iter=max_iter,
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    # One OpenMP thread: the gradient's threads busy-wait for each other, so on a loaded machine two
    # threads took 20-56 s for the 60 points that one thread embeds in 0.8 s (the same embedding).
    with threadpool_limits(limits=1, user_api="openmp"):
        return model.fit_transform(x)


def tsne_plot(embedding: np.ndarray, labels: list[str]) -> Figure:
    """Scatter of the embedding, one colour per label, with a legend beside it (labels sorted)."""
    names = sorted(set(labels))
    figure, axes = plots.new_figure("t-SNE of pooled features", "t-SNE 1", "t-SNE 2", size=(8.4, 6.4))
    labels = np.asarray(labels)
    for name, colour in zip(names, plots.colours(len(names)), strict=True):
        mine = embedding[labels == name]
        axes.scatter(mine[:, 0], mine[:, 1], s=16, color=colour, label=f"{name} ({len(mine)})")
    axes.tick_params(bottom=False, left=False, labelbottom=False, labelleft=False)  # t-SNE axes have no units
    figure.legend(loc="outside right upper", title="class (n)")
    return figure


@torch.no_grad()
def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Pooled ``forward_features`` of uint8 images (n, H, W) → (n, D)."""
    model.eval()
    batches = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch"):
        batch = torch.from_numpy(images[start : start + batch_size].astype(np.float32) / 255.0)[:, None]
        batches.append(model.forward_features(batch).cpu().numpy())
    return np.concatenate(batches)


def read_shard_samples(
    shards_dir: str | Path, split: str, limit: int, size: int
) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` images (resized to ``size``) and their ``label_7`` from a shard set's split."""
    from pedx_ray.data import read_manifest, shard_paths

    images, labels = [], []
    for shard in shard_paths(read_manifest(shards_dir), shards_dir, split):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                record = json.loads(tar.extractfile(members[name]).read())
                png = tar.extractfile(members[name[: -len(".json")] + ".png"]).read()
                image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
                images.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
                labels.append(str(record["label_7"]))
                if len(images) >= limit:
                    return np.stack(images), labels
    if len(images) < 5:
        raise ExplainError(f"{shards_dir} split {split!r} has {len(images)} samples; t-SNE needs at least 5")
    return np.stack(images), labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pedx_ray.explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (model.pt + config.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a DICOM, PNG or JPEG radiograph to explain")
    source.add_argument("--tsne", metavar="SHARDS_DIR", help="shard set whose samples t-SNE embeds")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--method", choices=METHODS, default="gradcam")
    parser.add_argument("--layer", help="module name to hook (default: Mixed_7c or the last conv)")
    parser.add_argument(
        "--target-class", type=int, help="class whose logit Grad-CAM explains (default: predicted)"
    )
    parser.add_argument("--alpha", type=float, default=0.4, help="heat-map opacity in the overlay")
    parser.add_argument("--split", default="val", help="shard split for --tsne")
    parser.add_argument("--samples", type=int, default=300, help="samples for --tsne")
    parser.add_argument("--perplexity", type=float, default=30.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pedx_ray.models import CheckpointError, load_checkpoint

    try:
        model, config = load_checkpoint(args.checkpoint)
        if args.image:
            image = load_image(args.image, config.image_size)
            tensor = to_tensor(image)
            if args.method == "gradcam":
                heat = gradcam(model, tensor, args.layer, args.target_class)[0]
            else:
                heat = mean_activation_map(model, tensor, args.layer)[0]
            write_png(overlay(image, heat, args.alpha), args.out)
        else:
            images, labels = read_shard_samples(args.tsne, args.split, args.samples, config.image_size)
            embedding = tsne(extract_features(model, images), perplexity=args.perplexity)
            plots.save_png(tsne_plot(embedding, labels), args.out)
    except (ExplainError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
