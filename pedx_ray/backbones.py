"""Backbones, ImageNet weight loading and the seed papers' heads/label codings for fine-tuning.

`build_backbone(name)` gives a network with ``forward_features(x) -> (N, num_features)`` (globally
average-pooled) for a 1-channel radiograph. Its parameter names are the torchvision (or PedXInception)
names minus the classifier, so a torchvision weights file (`imagenet_state_dict`) and a PedXnet
checkpoint (everything but ``fc.*``) load into it by name. Nothing is ever downloaded.

The recipes in ``configs/recipes/*.yaml`` select a backbone, head, enhancement and labels; their keys
are `RECIPE_FIELDS` and `validate_recipe` checks them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from pedx_ray.config import MIN_INCEPTION_SIZE
from pedx_ray.enhance import ENHANCERS
from pedx_ray.models import INCEPTION_STEPS, PedXInception, TinyCNN


class WeightsError(ValueError):
    """A weights file is missing, unreadable or for another architecture; the message says how to fix it."""


class RecipeError(ValueError):
    """A recipe value is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class _Arch:
    build: Callable[[], nn.Module]  # the full network, freshly initialised
    steps: Callable[[nn.Module], tuple[str, ...]]  # submodules run in order up to the last feature map
    attention_points: Callable[[nn.Module], tuple[str, ...]]  # steps followed by CBAM (attach_cbam)
    first_conv: str
    num_features: int
    imagenet: str | None  # torchvision's name for the architecture, None if it has no ImageNet weights


def _children(*names: str) -> Callable[[nn.Module], tuple[str, ...]]:
    return lambda net: names


def _indexed(container: str, keep: Callable[[nn.Module], bool] = lambda m: True):
    """Every child of a Sequential ``container`` that ``keep`` accepts, as dotted names."""

    def names(net: nn.Module) -> tuple[str, ...]:
        return tuple(f"{container}.{n}" for n, m in net.get_submodule(container).named_children() if keep(m))

    return names


def _densenet121() -> nn.Module:
    net = tvm.densenet121(weights=None)
    net.final_relu = nn.ReLU()  # torchvision's forward applies it functionally after norm5
    return net


_RESNET_STEPS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")

# Where attach_cbam puts attention: after each main stage, where the feature-map resolution changes
# next (the CBAM paper puts one in every residual block; one per stage keeps the cost of a step on CPU
# small and still re-weights every scale):
#   resnet: after layer1..layer4;  inception_v3: after the last block of each grid size (Mixed_5d 35x35,
#   Mixed_6e 17x17, Mixed_7c 8x8 at 299 px);  densenet121: after denseblock1..4 (before each transition);
#   vgg16: after each of the five max-pools;  efficientnet_b0: after each MBConv stage and the head conv;
#   tiny_cnn: after each conv block.
ARCHITECTURES: dict[str, _Arch] = {
    "inception_v3": _Arch(
        build=lambda: PedXInception(num_classes=1),
        steps=_children(*INCEPTION_STEPS),
        attention_points=_children("Mixed_5d", "Mixed_6e", "Mixed_7c"),
        first_conv="Conv2d_1a_3x3.conv",
        num_features=2048,
        imagenet="inception_v3",
    ),
    "vgg16": _Arch(
        build=lambda: tvm.vgg16(weights=None),
        steps=_indexed("features"),
        attention_points=_indexed("features", lambda m: isinstance(m, nn.MaxPool2d)),
        first_conv="features.0",
        num_features=512,
        imagenet="vgg16",
    ),
    "resnet18": _Arch(
        build=lambda: tvm.resnet18(weights=None),
        steps=_children(*_RESNET_STEPS),
        attention_points=_children(*_RESNET_STAGES),
        first_conv="conv1",
        num_features=512,
        imagenet="resnet18",
    ),
    "resnet50": _Arch(
        build=lambda: tvm.resnet50(weights=None),
        steps=_children(*_RESNET_STEPS),
        attention_points=_children(*_RESNET_STAGES),
        first_conv="conv1",
        num_features=2048,
        imagenet="resnet50",
    ),
    "densenet121": _Arch(
        build=_densenet121,
        steps=lambda net: _indexed("features")(net) + ("final_relu",),
        attention_points=_children(*(f"features.denseblock{i}" for i in range(1, 5))),
        first_conv="features.conv0",
        num_features=1024,
        imagenet="densenet121",
    ),
    "efficientnet_b0": _Arch(
        build=lambda: tvm.efficientnet_b0(weights=None),
        steps=_indexed("features"),
        attention_points=lambda net: _indexed("features")(net)[1:],
        first_conv="features.0.0",
        num_features=1280,
        imagenet="efficientnet_b0",
    ),
    "tiny_cnn": _Arch(
        build=lambda: TinyCNN(num_classes=1),
        # its last child is the global pool, which Backbone does itself
        steps=lambda net: _indexed("features")(net)[:-1],
        attention_points=_indexed("features", lambda m: isinstance(m, nn.ReLU)),
        first_conv="features.0",
        num_features=2048,
        imagenet=None,
    ),
}
BACKBONES = tuple(ARCHITECTURES)


class Backbone(nn.Module):
    """A classification network cut before its classifier: image -> globally pooled features.

    The network's top-level modules become this module's children under their own names (so state_dict
    keys equal torchvision's / PedXInception's); CBAM modules, once attached, live under ``attention``.
    """

    def __init__(self, arch: str, net: nn.Module) -> None:
        super().__init__()
        spec = ARCHITECTURES[arch]
        self.arch = arch
        self.steps = spec.steps(net)
        for top in dict.fromkeys(step.split(".")[0] for step in self.steps):
            self.add_module(top, net.get_submodule(top))
        self.num_features = spec.num_features
        self.attention = nn.ModuleDict()  # step name with "." -> "_" : CBAM

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_features)."""
        for step in self.steps:
            x = self.get_submodule(step)(x)
            key = step.replace(".", "_")
            if key in self.attention:
                x = self.attention[key](x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def build_backbone(name: str, *, in_chans: int = 1) -> Backbone:
    """A freshly initialised backbone taking ``in_chans``-channel images (radiographs: 1).

    inception_v3 and tiny_cnn come from `pedx_ray.models` (Xavier init, like pretraining); the others
    are torchvision's with ``weights=None`` (torchvision's own init) and the first conv rebuilt for
    ``in_chans`` channels.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, not {in_chans}")
    spec = ARCHITECTURES[name]
    net = spec.build()
    stem = net.get_submodule(spec.first_conv)
    if stem.in_channels != in_chans:
        _replace_module(
            net,
            spec.first_conv,
            nn.Conv2d(
                in_chans,
                stem.out_channels,
                stem.kernel_size,
                stride=stem.stride,
                padding=stem.padding,
                bias=stem.bias is not None,
            ),
        )
    return Backbone(name, net)


# --- ImageNet weights ------------------------------------------------------------------------------

# Old torchvision DenseNet files say "norm.1" where the module has "norm1" (torchvision remaps them alike).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _weights_source(arch: str) -> str:
    weights = tvm.get_model_weights(arch).DEFAULT  # metadata only: nothing is fetched
    return f"{weights.url} (torchvision's {arch}(weights={str(weights).split('.')[-1]!r}) cache file)"


def imagenet_state_dict(name: str, path: str | Path, *, in_chans: int = 1) -> dict[str, torch.Tensor]:
    """Load a local torchvision ImageNet state_dict for backbone ``name``, keyed like `build_backbone`.

    The classifier (and inception's auxiliary head) is dropped; the first conv is adapted to
    ``in_chans``; ``build_backbone(name).load_state_dict(result)`` then succeeds strictly (after
    attach_cbam use ``strict=False``: only ``attention.*`` is then missing). Raises WeightsError
    when the file is missing, unreadable or for a different architecture.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    arch = ARCHITECTURES[name].imagenet
    if arch is None:
        with_weights = [b for b, s in ARCHITECTURES.items() if s.imagenet]
        raise WeightsError(f"{name} has no ImageNet weights; use one of {', '.join(with_weights)}")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights file {path} not found. PedX-Ray downloads nothing: copy torchvision's "
            f"{arch} weights file, {_weights_source(arch)}, from a machine with internet access "
            f"(it lands in ~/.cache/torch/hub/checkpoints/) and pass its path."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or non-torch file
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({type(exc).__name__}: {exc}); "
            f"expected a torchvision {arch} state_dict saved with torch.save"
        ) from exc
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict (a mapping of tensor names to "
            f"tensors); save one with torch.save(torchvision.models.{arch}().state_dict(), PATH)"
        )
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation cost
        target = build_backbone(name, in_chans=in_chans).state_dict()
    own_modules = {key.split(".")[0] for key in target}
    state: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        key = _DENSENET_OLD_KEY.sub(r"\1\2", key)
        if key.split(".")[0] in own_modules:  # drops fc / classifier / AuxLogits
            state[key] = value
    stem_key = f"{ARCHITECTURES[name].first_conv}.weight"
    stem = state.get(stem_key)
    if stem is not None and stem.ndim == 4 and stem.shape[1] == 3 and in_chans == 1:
        # An RGB net sees a grayscale image as three equal channels x, and sum_c W_c * x = (sum_c W_c) * x:
        # summing the stem's weights over RGB gives the pretrained response to that gray image exactly.
        # (ImageNet's per-channel normalisation differs slightly per channel; fine-tuning absorbs it.)
        state[stem_key] = stem.sum(dim=1, keepdim=True)
    # BatchNorm's batch counter is absent from older torchvision files and unused by training (momentum set).
    for key in target:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {what} (e.g. {'; '.join(items[:3])})"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise WeightsError(
            f"{path} does not match torchvision's {arch}: {', '.join(problems)}. Pass the {arch} weights "
            f"file ({_weights_source(arch)}) or pick the backbone these weights belong to."
        )
    return {k: state[k].to(target[k].dtype) for k in target}


# --- TJ-Net (Tang, Wu & Shen): CBAM attention, 77 bone-age classes + joint sex head ---------------

TJNET_AGE_CLASSES = 77
TJNET_CLASS_WIDTH_MONTHS = 3  # 77 x 3 months = 0-231 months, covering the 0-228 month (19 y) range


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel then spatial attention; keeps shape."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the spatial map keeps its size, not {kernel_size}")
        hidden = max(channels // reduction, 1)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.channel_mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.channel_mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(avg + peak)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def attach_cbam(backbone: Backbone, reduction: int = 16, kernel_size: int = 7) -> Backbone:
    """Insert a CBAM after each of the backbone's main stages (see ARCHITECTURES' comment); in place.

    Stage widths are measured with one small no-grad forward pass (BatchNorm statistics untouched).
    """
    if len(backbone.attention):
        raise ValueError(f"{backbone.arch} already has CBAM modules attached")
    points = ARCHITECTURES[backbone.arch].attention_points(backbone)
    param = next(backbone.parameters())
    stem = backbone.get_submodule(ARCHITECTURES[backbone.arch].first_conv)
    x = torch.zeros(1, stem.in_channels, 96, 96, device=param.device, dtype=param.dtype)
    channels = {}
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        for step in backbone.steps:
            x = backbone.get_submodule(step)(x)
            if step in points:
                channels[step] = x.shape[1]
    backbone.train(was_training)
    for step in points:
        module = CBAM(channels[step], reduction, kernel_size).to(device=param.device, dtype=param.dtype)
        backbone.attention[step.replace(".", "_")] = module
    return backbone


class TJNetHead(nn.Module):
    """Features -> (age-class logits (N, n_age_classes), sex logit (N,)); the two tasks share the features."""

    def __init__(
        self, num_features: int, n_age_classes: int = TJNET_AGE_CLASSES, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.age = nn.Linear(num_features, n_age_classes)
        self.sex = nn.Linear(num_features, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.dropout(features)
        return self.age(features), self.sex(features).squeeze(1)


def _batch_balanced_mean(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in the batch of each class's mean loss."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse].to(losses.dtype)
    return (weights * losses).sum() / weights.sum()


def tjnet_loss(
    age_logits: torch.Tensor,
    sex_logits: torch.Tensor,
    age_class: torch.Tensor,
    sex: torch.Tensor,
    *,
    sex_weight: float = 1.0,
) -> torch.Tensor:
    """TJ-Net's joint loss: batch-weighted age-class cross-entropy + sex_weight x batch-weighted sex BCE.

    "Batch-weighted" as implemented here: every sample is weighted by 1 / (count of its label in the
    batch), so each age class (and each sex) present contributes equally. The reasoning is the one the
    paper gives for weighting: bone-age labels are strongly imbalanced (few infants and late teens), and
    batch counts track the imbalance the optimiser actually sees without a pass over the data set. The
    paper's full text was not available here; sex_weight=1 (equal tasks) is our default, not its value.
    ``age_class`` is an int tensor from `age_to_class`; ``sex`` is 1 for male, 0 for female.
    """
    age_losses = F.cross_entropy(age_logits, age_class.long(), reduction="none")
    sex_losses = F.binary_cross_entropy_with_logits(sex_logits, sex.to(sex_logits.dtype), reduction="none")
    return _batch_balanced_mean(age_losses, age_class) + sex_weight * _batch_balanced_mean(sex_losses, sex)


def age_to_class(
    months: torch.Tensor | np.ndarray | Sequence[float],
    width: int = TJNET_CLASS_WIDTH_MONTHS,
    n: int = TJNET_AGE_CLASSES,
) -> torch.Tensor:
    """Bone age in months -> class index floor(months / width), ages past the last class in the last one."""
    months = torch.as_tensor(months, dtype=torch.float64)
    if torch.isnan(months).any() or (months < 0).any():
        raise ValueError("bone ages must be non-negative months; found a negative or missing value")
    return torch.clamp(torch.floor(months / width), max=n - 1).long()


def class_to_months(classes: torch.Tensor, width: int = TJNET_CLASS_WIDTH_MONTHS) -> torch.Tensor:
    """Class index -> the centre of its interval in months."""
    return (classes.double() + 0.5) * width


def expected_age(age_logits: torch.Tensor, width: int = TJNET_CLASS_WIDTH_MONTHS) -> torch.Tensor:
    """Age in months as the expectation of the class centres under softmax(age_logits): (N, K) -> (N,)."""
    centres = class_to_months(torch.arange(age_logits.shape[1], device=age_logits.device), width)
    return torch.softmax(age_logits.double(), dim=1) @ centres


# --- Age-range classification (Hamrouni & Hassen) -------------------------------------------------

AGE_RANGE_MONTHS = (0.0, 228.0)  # 0-19 years: the RSNA bone-age range
AGE_BIN_COUNTS = (3, 5, 10)


def age_bin_edges(n_bins: int) -> np.ndarray:
    """Equal-width edges over 0-228 months: 3 bins -> 0, 76, 152, 228; 5 -> every 45.6; 10 -> every 22.8."""
    if n_bins not in AGE_BIN_COUNTS:
        raise ValueError(f"n_bins must be one of {AGE_BIN_COUNTS} (Hamrouni & Hassen), not {n_bins}")
    return np.linspace(*AGE_RANGE_MONTHS, n_bins + 1)


def age_bins(months: Sequence[float] | np.ndarray, n_bins: int) -> np.ndarray:
    """Bone age in months -> bin index via pandas.cut: [0, e1], (e1, e2], ..., (e_{n-1}, 228]."""
    edges = age_bin_edges(n_bins)
    values = np.asarray(months, dtype=float)
    outside = ~((values >= edges[0]) & (values <= edges[-1]))
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} ages outside {edges[0]:g}-{edges[-1]:g} months "
            f"(e.g. {values[outside][0]}); fix or drop them before binning"
        )
    return pd.cut(values, bins=edges, labels=False, include_lowest=True).astype(np.int64)


def age_bin_to_months(bins: Sequence[int] | np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index -> the bin centre in months (the point estimate an age-range classifier gives)."""
    edges = age_bin_edges(n_bins)
    return ((edges[:-1] + edges[1:]) / 2)[np.asarray(bins, dtype=np.int64)]


# --- Recipes ---------------------------------------------------------------------------------------

# The architectures pretraining writes checkpoints for (pedx_ray.config.ARCHITECTURES).
PEDXNET_BACKBONES = ("inception_v3", "resnet18", "tiny_cnn")
TASKS = ("bone_age", "fracture")
HEADS = ("regression_sex", "binary", "tjnet", "age_bins")
TASK_OF_HEAD = {
    "regression_sex": "bone_age",
    "tjnet": "bone_age",
    "age_bins": "bone_age",
    "binary": "fracture",
}
# The keys a configs/recipes/*.yaml may hold (FinetuneConfig accepts all of them), with their values.
RECIPE_FIELDS: dict[str, str] = {
    "task": f"one of {', '.join(TASKS)}",
    "backbone": f"one of {', '.join(BACKBONES)}",
    "head": "regression_sex (MSE, months, sex input) | "
    "binary (fracture, BCE) | tjnet (attach_cbam on the backbone, TJNetHead, tjnet_loss) | "
    "age_bins (age-range classes, needs age_bins)",
    "enhance": f"one of {', '.join(ENHANCERS)} (pedx_ray.enhance), applied after preprocessing",
    "age_bins": f"number of age ranges for head age_bins: one of {AGE_BIN_COUNTS}",
    "image_size": f"input side in pixels, >= 32 (inception_v3: >= {MIN_INCEPTION_SIZE})",
    "batch_size": "global batch size, >= 1",
    "lr": "Adam learning rate, > 0 (write 1.0e-4: YAML reads 1e-4 as a string)",
    "epochs": "number of epochs, >= 1",
    "init": "scratch | imagenet:PATH (a local torchvision weights file) | pedxnet:CHECKPOINT_DIR",
}


def validate_recipe(recipe: Mapping) -> None:
    """Raise RecipeError naming every bad key or value of a recipe mapping."""
    errors = [
        f"unknown key {key!r} (allowed: {', '.join(RECIPE_FIELDS)})"
        for key in recipe
        if key not in RECIPE_FIELDS
    ]

    def at_least(key: str, minimum: int) -> None:
        value = recipe.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            errors.append(f"{key}: {value!r} is not an integer >= {minimum} ({RECIPE_FIELDS[key]})")

    task = recipe.get("task")
    if task is not None and task not in TASKS:
        errors.append(f"task: {task!r} is not {RECIPE_FIELDS['task']}")
    backbone = recipe.get("backbone")
    if backbone is not None and backbone not in ARCHITECTURES:
        errors.append(f"backbone: {backbone!r} is not {RECIPE_FIELDS['backbone']}")
    head = recipe.get("head")
    if head is not None and head not in HEADS:
        errors.append(f"head: {head!r} is not one of {', '.join(HEADS)}")
    if head in TASK_OF_HEAD and task is not None and TASK_OF_HEAD[head] != task:
        errors.append(f"head {head!r} is for task {TASK_OF_HEAD[head]!r}, not {task!r}")
    enhance = recipe.get("enhance")
    if enhance is not None and enhance not in ENHANCERS:
        errors.append(f"enhance: {enhance!r} is not {RECIPE_FIELDS['enhance']}")
    bins = recipe.get("age_bins")
    if head == "age_bins" and bins not in AGE_BIN_COUNTS:
        errors.append(f"head age_bins needs age_bins: one of {AGE_BIN_COUNTS}, got {bins!r}")
    if head != "age_bins" and bins is not None:
        errors.append(f"age_bins: {bins!r} is only used with head: age_bins (this recipe has head {head!r})")
    at_least("image_size", 32)
    at_least("batch_size", 1)
    at_least("epochs", 1)
    lr = recipe.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
        errors.append(f"lr: {lr!r} is not {RECIPE_FIELDS['lr']}")
    size = recipe.get("image_size")
    if backbone == "inception_v3" and isinstance(size, int) and size < MIN_INCEPTION_SIZE:
        errors.append(f"image_size: {size} is too small for inception_v3 (>= {MIN_INCEPTION_SIZE})")
    init = recipe.get("init")
    if init is not None:
        kind, _, target = str(init).partition(":")
        if init != "scratch" and (kind not in ("imagenet", "pedxnet") or not target):
            errors.append(f"init: {init!r} is not {RECIPE_FIELDS['init']}")
        elif kind == "imagenet" and backbone in ARCHITECTURES and ARCHITECTURES[backbone].imagenet is None:
            errors.append(f"init: {backbone} has no ImageNet weights")
        elif kind == "pedxnet" and backbone not in (None, *PEDXNET_BACKBONES):
            errors.append(f"init: PedXnet checkpoints are {' or '.join(PEDXNET_BACKBONES)}, not {backbone}")
    if errors:
        raise RecipeError("invalid recipe: " + "; ".join(errors))
