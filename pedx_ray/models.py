"""PedXnet's upstream model and the checkpoint format (contract 4 of docs/design.md).

A checkpoint is a directory with ``model.pt`` (state_dict of the unwrapped model), ``config.json``
(the resolved `PretrainConfig`, class names in order) and ``metrics.json``. `load_checkpoint`
rebuilds the model from ``config.json`` alone, so fine-tuning, evaluation and serving never need
the training code's arguments.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.inception import BasicConv2d, Inception3
from torchvision.models.resnet import BasicBlock, ResNet

from ingest import storage
from ingest.files import replacing, write_json_atomic
from pedx_ray.config import PretrainConfig, load_config_json

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
FEATURE_DIM = 2048


class CheckpointError(RuntimeError):
    pass


# InceptionV3's feature blocks in forward order (torchvision's Inception3 attribute names).
INCEPTION_STEPS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


class _PooledClassifier(nn.Module):
    """timm's interface over a torchvision classifier: its ``steps`` in order, then a flattened global
    pool (``forward_features``), then dropout and ``fc`` (``forward_head``)."""

    steps: tuple[str, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) images -> (N, D) globally pooled features."""
        for name in (*self.steps, "avgpool"):
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PedXInception(_PooledClassifier, Inception3):
    """InceptionV3 with a 1-channel stem (radiographs are grayscale) and no auxiliary head."""

    steps = INCEPTION_STEPS

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__(
            num_classes=num_classes,
            aux_logits=False,
            transform_input=False,
            init_weights=False,
            dropout=dropout,
        )
        self.Conv2d_1a_3x3 = BasicConv2d(1, 32, kernel_size=3, stride=2)
        xavier_init(self)


class PedXResNet18(_PooledClassifier, ResNet):
    """ResNet-18 with a 1-channel stem and dropout before the classifier: a faster PedXnet than InceptionV3
    (about 2× the images/s on a CPU) for small data and short runs; its state_dict keys are torchvision's,
    so fine-tuning's ``resnet18`` backbone loads it."""

    steps = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.dropout = nn.Dropout(dropout)
        xavier_init(self)


class TinyCNN(nn.Module):
    """Four conv blocks to a 2048-d feature: the same interface at ~1% of the cost, for fast tests only."""

    def __init__(self, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        widths = (1, 16, 32, 64, 128)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers, nn.Conv2d(widths[-1], FEATURE_DIM, 1), nn.AdaptiveAvgPool2d(1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(FEATURE_DIM, num_classes)
        xavier_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def xavier_init(model: nn.Module) -> None:
    """The paper's initialisation: Xavier-uniform weights, zero biases; BatchNorm at identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(config: PretrainConfig) -> nn.Module:
    """The network the config describes, freshly initialised, head sized to the granularity."""
    architectures = {"inception_v3": PedXInception, "resnet18": PedXResNet18, "tiny_cnn": TinyCNN}
    return architectures[config.arch](num_classes=config.granularity, dropout=config.dropout)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers (their state_dict keys differ)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(directory: str | Path, model: nn.Module, config: PretrainConfig, metrics: dict) -> Path:
    """Write a contract-4 checkpoint directory (files written atomically); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    with replacing(out / MODEL_FILE) as tmp:
        torch.save(state, tmp)
    write_json_atomic(out / CONFIG_FILE, config.to_dict())
    write_json_atomic(out / METRICS_FILE, metrics)
    return out


def load_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, PretrainConfig]:
    """Rebuild the model from ``config.json`` and load ``model.pt``; returns (model in eval mode, config).

    ``directory`` may be an object-store URI (ingest.storage): its files are downloaded first."""
    path = storage.join(directory)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not storage.is_file(storage.join(path, name))]
    if missing:
        raise CheckpointError(f"{path} is not a PedX-Ray checkpoint: missing {', '.join(missing)}")
    with storage.local_copy(path) as local:
        config = load_config_json(local / CONFIG_FILE)
        model = build_model(config)
        state = torch.load(local / MODEL_FILE, map_location=map_location, weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{storage.join(path, MODEL_FILE)} does not match the model its config.json describes: {exc}"
        ) from exc
    return model.eval(), config
