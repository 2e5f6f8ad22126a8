"""The paper's learning-rate schedule: linear warm-up, then polynomial decay, stepped once per epoch.

For the epoch with 0-based index ``e`` the learning rate is ``lr * factor(e)`` where
    factor(e) = (e + 1) / warmup                              for e < warmup
    factor(e) = (1 - (e - warmup) / (epochs - warmup)) ** power   otherwise
so warm-up climbs to the full rate at its last epoch, decay starts at the full rate and the last
epoch still trains at a small positive rate.
"""

from __future__ import annotations

import torch


def lr_factor(epoch: int, *, epochs: int, warmup_epochs: int, power: float) -> float:
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    decay_epochs = epochs - warmup_epochs
    return (1.0 - (epoch - warmup_epochs) / decay_epochs) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, epochs: int, warmup_epochs: int, power: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR at epoch 0's rate; call ``step()`` after each epoch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, epochs=epochs, warmup_epochs=warmup_epochs, power=power)
    )
