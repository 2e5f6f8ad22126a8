"""Upstream classification metrics from a confusion matrix (rows = truth, columns = prediction).

Workers each count their own confusion matrix; the matrices are summed across workers and the
macro scores computed once from the sum, so the figures are the same for any number of workers.
Macro averages run over the classes present in the truth or the predictions, with 0 for an
undefined precision or recall (as scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    index = targets.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(cm: np.ndarray | torch.Tensor) -> dict:
    """Accuracy and macro precision / recall / F1 of a confusion matrix, plus the matrix as lists."""
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    true_pos = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    actual = cm.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(actual > 0, true_pos / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (predicted > 0) | (actual > 0)
    macro = (lambda v: float(v[present].mean())) if present.any() else (lambda v: 0.0)
    return {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "precision": macro(precision),
        "recall": macro(recall),
        "f1": macro(f1),
        "samples": total,
        "confusion_matrix": cm.tolist(),
    }
