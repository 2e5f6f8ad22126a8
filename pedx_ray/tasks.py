"""Downstream task models: any backbone with ``forward_features``/``num_features`` plus a task head.

Bone age (the paper's head): GAP features + sex (0 = female, 1 = male) → 1024 → 1024 → 1 with
dropout 0.5, trained with MSE on months. The head's raw output is scaled by the training split's
target mean and SD (stored in the run's config), so the loss is on months while the initial
prediction already sits at the mean age instead of 0 months. Fracture: features → 1 logit, BCE.
"""

from __future__ import annotations

import torch
from torch import nn

from pedx_ray.backbones import build_backbone
from pedx_ray.models import xavier_init

TASKS = ("bone_age", "fracture")
HEADS = {"bone_age": ("regression_sex", "tjnet", "age_bins"), "fracture": ("binary",)}
DEFAULT_HEAD = {"bone_age": "regression_sex", "fracture": "binary"}


class TaskModel(nn.Module):
    """``forward(images, sex)``; ``forward_features(images)`` and ``forward_head(features, sex)``
    are exposed separately for linear probing, Grad-CAM and feature extraction."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), sex)


class BoneAgeModel(TaskModel):
    """Predicts bone age in months from the image and sex."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        hidden: int = 1024,
        dropout: float = 0.5,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        head = nn.Sequential(
            nn.Linear(backbone.num_features + 1, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        super().__init__(backbone, head)
        self.target_mean, self.target_std = float(target_mean), float(target_std)
        xavier_init(self.head)

    def forward_head(self, features: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        raw = self.head(torch.cat([features, sex.to(features.dtype).view(-1, 1)], dim=1)).squeeze(1)
        return raw * self.target_std + self.target_mean

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(output, target)

    @staticmethod
    def predict(output: torch.Tensor) -> torch.Tensor:
        return output


class FractureModel(TaskModel):
    """One logit for "fracture visible"; sex is accepted for a uniform interface and not used."""

    def __init__(self, backbone: nn.Module, *, dropout: float = 0.5) -> None:
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, 1))
        super().__init__(backbone, head)
        xavier_init(self.head)

    def forward_head(self, features: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1)

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(output, target)

    @staticmethod
    def predict(output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)


class TJNetModel(TaskModel):
    """TJ-Net (Tang, Wu & Shen): CBAM in the backbone, 77 age classes of 3 months learned jointly with
    sex classification (batch-weighted loss); the prediction is the expected age in months."""

    def __init__(self, backbone: nn.Module, *, dropout: float = 0.5) -> None:
        from pedx_ray.backbones import TJNetHead, attach_cbam

        backbone = attach_cbam(backbone)
        super().__init__(backbone, TJNetHead(backbone.num_features, dropout=dropout))

    def forward_head(self, features: torch.Tensor, sex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(features)

    @staticmethod
    def loss(output, target: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        from pedx_ray.backbones import age_to_class, tjnet_loss

        age_logits, sex_logits = output
        return tjnet_loss(age_logits, sex_logits, age_to_class(target.detach()).to(target.device), sex)

    @staticmethod
    def predict(output) -> torch.Tensor:
        from pedx_ray.backbones import expected_age

        return expected_age(output[0])


class AgeBinsModel(TaskModel):
    """Hamrouni & Hassen: bone age as one of 3/5/10 equal age ranges (pandas.cut edges over 0-228
    months, cross-entropy); the prediction is the most likely range's centre in months."""

    def __init__(self, backbone: nn.Module, *, n_bins: int, dropout: float = 0.5) -> None:
        from pedx_ray.backbones import age_bin_edges

        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, n_bins))
        super().__init__(backbone, head)
        edges = torch.as_tensor(age_bin_edges(n_bins), dtype=torch.float32)
        # Inner edges for bucketize (right-closed bins like pandas.cut), and the bin centres.
        self.register_buffer("inner_edges", edges[1:-1].clone(), persistent=False)
        self.register_buffer("centres", (edges[:-1] + edges[1:]) / 2, persistent=False)
        xavier_init(self.head)

    def forward_head(self, features: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def loss(self, output: torch.Tensor, target: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, torch.bucketize(target, self.inner_edges))

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return self.centres[output.argmax(1)]


def build_task_model(config) -> TaskModel:
    """The network a `FinetuneConfig` describes, freshly initialised (weights come from `initialize`)."""
    backbone = build_backbone(config.backbone)
    if config.head == "regression_sex":
        return BoneAgeModel(
            backbone,
            hidden=config.hidden,
            dropout=config.dropout,
            target_mean=config.target_mean,
            target_std=config.target_std,
        )
    if config.head == "tjnet":
        return TJNetModel(backbone, dropout=config.dropout)
    if config.head == "age_bins":
        return AgeBinsModel(backbone, n_bins=config.age_bins, dropout=config.dropout)
    return FractureModel(backbone, dropout=config.dropout)


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's trainable stages from input to output, for gradual unfreezing.

    Wrappers with a single child (e.g. a torchvision model inside an adapter) are descended
    until a level with several parameterised stages appears.
    """
    blocks = [m for m in backbone.children() if any(True for _ in m.parameters())]
    while len(blocks) == 1:
        blocks = [m for m in blocks[0].children() if any(True for _ in m.parameters())]
    return blocks
