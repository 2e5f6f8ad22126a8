"""Where a fine-tuning run's weights come from, and which of them train.

Initialisations (``init`` in the config):
- ``scratch``: Xavier-uniform everywhere (the paper's baseline);
- ``imagenet:PATH``: a local torchvision weights file for the backbone, first conv summed over RGB
  (`pedx_ray.backbones.imagenet_state_dict`); nothing is downloaded;
- ``pedxnet:CHECKPOINT``: a 7/30/68-class pretraining checkpoint (contract 4); every tensor but the
  view classifier (``fc``) is copied into the backbone.
Transfers return a `TransferReport` naming the tensors loaded, skipped (with the reason) and left
at their initial values, so a silently half-loaded backbone cannot pass unnoticed.

Training modes (``mode``): ``full`` (all layers, the paper), ``linear_probe`` (backbone frozen,
BatchNorm statistics included) and ``gradual`` (the head first, then one backbone block more from
the top every ``unfreeze_every`` epochs; a block waiting its turn gets no weight updates, but its
BatchNorm statistics already follow the new data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ingest import storage
from pedx_ray.config import ConfigError, PretrainConfig
from pedx_ray.models import CONFIG_FILE, MODEL_FILE, xavier_init
from pedx_ray.tasks import TaskModel, backbone_blocks

INIT_KINDS = ("scratch", "imagenet", "pedxnet")
MODES = ("full", "linear_probe", "gradual")
# The pretraining models' view classifier: sized to 7/30/68 classes, meaningless downstream.
PEDXNET_CLASSIFIER = "fc."


class InitError(ValueError):
    """The initialisation cannot be applied; the message says what is wrong and how to fix it."""


def parse_init(spec: str) -> tuple[str, str]:
    """``"pedxnet:runs/x/best"`` → ``("pedxnet", "runs/x/best")``; raises ConfigError when malformed."""
    kind, _, path = spec.partition(":")
    if kind not in INIT_KINDS:
        raise ConfigError(f"init {spec!r}: use 'scratch', 'imagenet:WEIGHTS.pth' or 'pedxnet:CHECKPOINT_DIR'")
    if kind == "scratch" and path:
        raise ConfigError(f"init {spec!r}: 'scratch' takes no path; write just 'scratch'")
    if kind != "scratch" and not path:
        raise ConfigError(f"init {spec!r} needs a path: '{kind}:PATH'")
    return kind, path


@dataclass
class TransferReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # backbone tensor names filled from the source
    skipped: dict[str, str] = field(default_factory=dict)  # source tensor name → why it was not used
    missing: list[str] = field(default_factory=list)  # backbone tensors left at their initial values

    def summary(self) -> str:
        lines = [
            f"weights from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.skipped)} skipped, {len(self.missing)} left at their initial values"
        ]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        lines += [f"  not in source: {name}" for name in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "skipped": self.skipped,
            "missing": self.missing,
        }


def transfer_weights(
    backbone: nn.Module, state: dict[str, torch.Tensor], *, source: str, skip_prefixes: tuple[str, ...] = ()
) -> TransferReport:
    """Copy matching tensors of ``state`` into ``backbone``.

    A source name matches the backbone tensor of the same name or, when the backbone wraps the
    source architecture (``net.Mixed_5b...`` for ``Mixed_5b...``), the one tensor ending in it.
    """
    target = backbone.state_dict()
    by_suffix: dict[str, list[str]] = {}
    for name in target:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(name)
    report = TransferReport(source=source)
    updates = {}
    for name, tensor in state.items():
        if name.startswith(skip_prefixes):
            report.skipped[name] = "classifier of the pretraining task (not transferred)"
            continue
        candidates = [name] if name in target else by_suffix.get(name, [])
        if len(candidates) != 1:
            report.skipped[name] = (
                "no tensor of that name in the backbone" if not candidates else f"ambiguous: {candidates}"
            )
            continue
        destination = candidates[0]
        if target[destination].shape != tensor.shape:
            report.skipped[name] = (
                f"shape {tuple(tensor.shape)} does not fit {destination} {tuple(target[destination].shape)}"
            )
            continue
        updates[destination] = tensor
        report.loaded.append(destination)
    backbone.load_state_dict(updates, strict=False)
    report.missing = [name for name in target if name not in updates]
    return report


def _pedxnet_state(checkpoint: str, backbone_name: str) -> dict[str, torch.Tensor]:
    directory = storage.join(checkpoint)  # a directory or an object-store URI (ingest.storage)
    missing = [n for n in (MODEL_FILE, CONFIG_FILE) if not storage.is_file(storage.join(directory, n))]
    if missing:
        raise InitError(
            f"pedxnet:{checkpoint} is not a PedXnet checkpoint directory (missing {', '.join(missing)}); "
            "pass a pretraining run's best/ directory, e.g. pedxnet:runs/pedx-7c/best"
        )
    try:
        pretrain = PretrainConfig.from_dict(storage.read_json(storage.join(directory, CONFIG_FILE)))
    except (ValueError, ConfigError) as exc:
        raise InitError(f"{storage.join(directory, CONFIG_FILE)} is not a pretraining config: {exc}") from exc
    if pretrain.arch != backbone_name:
        raise InitError(
            f"pedxnet:{checkpoint} holds a {pretrain.arch} but the run's backbone is {backbone_name}; "
            f"use --backbone {pretrain.arch} or a checkpoint of that architecture"
        )
    with storage.local_copy(directory) as local:
        return torch.load(local / MODEL_FILE, map_location="cpu", weights_only=True)


def _imagenet_state(path: str, backbone_name: str) -> dict[str, torch.Tensor]:
    try:
        from pedx_ray.backbones import imagenet_state_dict
    except ImportError as exc:
        raise InitError(f"imagenet initialisation needs pedx_ray.backbones, which is missing: {exc}") from exc
    try:
        return imagenet_state_dict(backbone_name, path)
    except ValueError as exc:  # backbones.WeightsError: missing file, unreadable or another architecture
        raise InitError(str(exc)) from exc


def initialize(model: TaskModel, init: str, backbone_name: str) -> TransferReport | None:
    """Apply ``init`` to a freshly built task model in place; the transfer report, None for scratch.

    The task head always starts from Xavier: no pretraining task has a bone-age or fracture head.
    """
    kind, path = parse_init(init)
    if kind == "scratch":
        xavier_init(model)
        return None
    if kind == "pedxnet":
        state, skip = _pedxnet_state(path, backbone_name), (PEDXNET_CLASSIFIER,)
    else:
        state, skip = _imagenet_state(path, backbone_name), ()
    report = transfer_weights(model.backbone, state, source=init, skip_prefixes=skip)
    if not report.loaded:
        raise InitError(
            f"{init}: none of its {len(state)} tensors fits the {backbone_name} backbone; "
            "it holds another architecture"
        )
    return report


# ---------------------------------------------------------------- training modes


def parameter_groups(model: TaskModel, mode: str) -> list[dict]:
    """Optimizer groups: one per backbone block from input to output, then the head (last).

    Linear probing freezes the backbone outright (its tensors get no gradients). Gradual unfreezing
    keeps every tensor in the optimizer and gates each block by its learning rate (`lr_gates`),
    because DDP fixes the set of parameters that receive gradients when it wraps the model.
    """
    head = {"params": list(model.head.parameters()), "name": "head"}
    if mode == "linear_probe":
        model.backbone.requires_grad_(False)
        return [head]
    blocks = backbone_blocks(model.backbone)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    loose = [p for p in model.backbone.parameters() if id(p) not in in_blocks]
    groups = [{"params": list(block.parameters()), "name": f"block{i}"} for i, block in enumerate(blocks)]
    if loose:  # parameters held directly by the backbone belong with its input end
        groups[0]["params"] = loose + groups[0]["params"]
    return groups + [head]


def lr_gates(n_groups: int, mode: str, unfreeze_every: int) -> list:
    """Per group, epoch → 1.0 if the group trains in that epoch else 0.0 (the head always trains)."""
    if mode != "gradual":
        return [lambda epoch: 1.0] * n_groups

    def gate(depth_from_top: int):
        return lambda epoch: 1.0 if epoch >= depth_from_top * unfreeze_every else 0.0

    return [gate(n_groups - 1 - i) for i in range(n_groups)]


def set_train_mode(model: TaskModel, mode: str) -> None:
    """Train mode for what trains; a linearly probed backbone keeps its BatchNorm statistics."""
    model.train()
    if mode == "linear_probe":
        model.backbone.eval()
