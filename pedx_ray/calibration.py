"""Calibrated probabilities: temperature scaling fitted on held-out predictions, with ECE and a
reliability diagram before and after.

``python -m pedx_ray.calibration CHECKPOINT --shards DIR [--split finetune]`` (a view model: the shard
set's fine-tuning split) or ``... --predictions RUN/predictions_val.csv`` (a fracture model: the
fine-tuning run's validation predictions) fits one temperature T (logits / T, Guo et al. 2017: it keeps
the ranking, so accuracy and AUC are unchanged) and writes ``calibration.json`` into the checkpoint (the
checkpoint contract's optional file). Serve reads it; a checkpoint without it answers at
T = 1, as before. ``--plot PNG`` writes the reliability diagram.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit, softmax

from ingest import storage

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15


class CalibrationError(ValueError):
    """The data cannot calibrate this checkpoint; the message says what is missing."""


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of (N, C) logits, or the sigmoid of (N,) binary logits, at ``temperature``."""
    scaled = np.asarray(logits, np.float64) / temperature
    return softmax(scaled, axis=1) if scaled.ndim == 2 else expit(scaled)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    if scaled.ndim == 2:
        return float(-np.mean(log_softmax(scaled, axis=1)[np.arange(len(labels)), labels]))
    p = np.clip(expit(scaled), 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (searched over 0.05–20)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels).astype(int)
    if len(labels) < 10 or len(np.unique(labels)) < 2:
        raise CalibrationError(
            f"temperature scaling needs at least 10 held-out predictions of 2+ classes, got {len(labels)} "
            f"of {len(np.unique(labels))}"
        )
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20)),
        method="bounded",
    )
    return float(np.exp(result.x))


def _confidence_and_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if probs.ndim == 2:
        return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    predicted = (probs >= 0.5).astype(int)
    return np.where(predicted == 1, probs, 1 - probs), (predicted == labels).astype(float)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    confidence, correct = _confidence_and_correct(np.asarray(probs), np.asarray(labels).astype(int))
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": index, "confidence": confidence, "correct": correct})
    return frame.groupby("bin").agg(
        confidence=("confidence", "mean"), accuracy=("correct", "mean"), n=("correct", "size")
    )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    table = reliability(probs, labels, bins)
    return float((table["n"] * (table["accuracy"] - table["confidence"]).abs()).sum() / table["n"].sum())


def calibration_report(logits: np.ndarray, labels: np.ndarray, source: str) -> dict:
    """Fit T and measure ECE before and after; what ``calibration.json`` holds."""
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(probabilities(logits), labels),
        "ece_after": expected_calibration_error(probabilities(logits, temperature), labels),
        "nll_before": _nll(np.asarray(logits, np.float64), np.asarray(labels).astype(int), 1.0),
        "nll_after": _nll(np.asarray(logits, np.float64), np.asarray(labels).astype(int), temperature),
        "samples": int(len(labels)),
        "fitted_on": source,
        "ece_bins": ECE_BINS,
    }


def read_temperature(checkpoint: str | Path) -> float:
    """The checkpoint's fitted temperature; 1.0 (uncalibrated) for checkpoints without calibration.json."""
    path = storage.join(checkpoint, CALIBRATION_FILE)
    if not storage.is_file(path):
        return 1.0
    temperature = float(storage.read_json(path)["temperature"])
    if not temperature > 0:
        raise CalibrationError(f"{path}: temperature must be positive, got {temperature}")
    return temperature


def reliability_diagram(logits: np.ndarray, labels: np.ndarray, report: dict, out: str | Path) -> Path | str:
    """Accuracy against confidence, before and after scaling, with the ECE of each (PNG, atomic)."""
    from pedx_ray.plots import colours, new_figure, save_png

    figure, axes = new_figure(
        f"Reliability, {report['samples']} held-out predictions", "confidence", "accuracy", size=(5.6, 5.6)
    )
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for colour, (temperature, name, ece) in zip(
        colours(2),
        (
            (1.0, "before (T = 1)", report["ece_before"]),
            (report["temperature"], f"after (T = {report['temperature']:.2f})", report["ece_after"]),
        ),
        strict=True,
    ):
        table = reliability(probabilities(logits, temperature), labels)
        axes.plot(
            table["confidence"], table["accuracy"], marker="o", color=colour, label=f"{name}: ECE {ece:.3f}"
        )
    axes.set(xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left")
    return save_png(figure, out)


# -- the held-out data of each kind of checkpoint --
def view_logits(checkpoint: str | Path, shards_dir: str | Path, split: str, batch_size: int = 64):
    """(logits, labels) of a view model on a shard split, decoded as pretraining decodes it."""
    from pedx_ray.data import SampleDecoder, read_manifest, shard_paths, to_model_input
    from pedx_ray.models import load_checkpoint

    model, config = load_checkpoint(checkpoint)
    model.eval()
    decode = SampleDecoder(config.classes, config.granularity, config.image_size)
    images, labels = [], []
    for shard in shard_paths(read_manifest(shards_dir), shards_dir, split):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard))) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[: -len(".json")]
            sample = decode(
                {"__key__": key, "__url__": shard, "json": files[name], "png": files[f"{key}.png"]}
            )
            images.append(sample["image"])
            labels.append(sample["label"])
    if not images:
        raise CalibrationError(f"{shards_dir} has no samples in split {split!r}")
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start : start + batch_size]))[:, None]
            outputs.append(model(to_model_input(batch, torch.device("cpu"), False)).float().numpy())
    return np.concatenate(outputs), np.asarray(labels)


def binary_logits(predictions_csv: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) from a fracture run's predictions CSV (``target``, ``prediction`` probability)."""
    frame = pd.read_csv(io.BytesIO(storage.read_bytes(predictions_csv)))
    missing = {"target", "prediction"} - set(frame.columns)
    if missing:
        raise CalibrationError(
            f"{predictions_csv} lacks column(s) {sorted(missing)}; use a fracture run's CSV"
        )
    if not frame["target"].isin([0, 1]).all():
        raise CalibrationError(
            f"{predictions_csv}: targets are not 0/1; only fracture models are calibrated this way"
        )
    probability = np.clip(frame["prediction"].to_numpy(np.float64), 1e-6, 1 - 1e-6)
    return logit(probability), frame["target"].to_numpy().astype(int)


def calibrate_checkpoint(checkpoint: str | Path, logits: np.ndarray, labels: np.ndarray, source: str) -> dict:
    """Fit, then write ``calibration.json`` into the checkpoint (atomically); returns the report."""
    report = calibration_report(logits, labels, source)
    storage.write_json_atomic(storage.join(checkpoint, CALIBRATION_FILE), report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pedx_ray.calibration", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (model.pt + config.json)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--shards", type=Path, help="a view model's shard set (its held-out split is used)")
    data.add_argument("--predictions", type=Path, help="a fracture run's predictions_val.csv")
    parser.add_argument("--split", default="finetune", help="shard split to fit on (default finetune)")
    parser.add_argument("--plot", type=Path, help="also write the reliability diagram (PNG)")
    args = parser.parse_args(argv)
    try:
        if args.shards:
            logits, labels = view_logits(args.checkpoint, args.shards, args.split)
            source = f"{args.shards} split {args.split}"
        else:
            logits, labels = binary_logits(args.predictions)
            source = str(args.predictions)
        report = calibrate_checkpoint(args.checkpoint, logits, labels, source)
    except (CalibrationError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        reliability_diagram(logits, labels, report, args.plot)
    print(
        f"T = {report['temperature']:.3f}: ECE {report['ece_before']:.4f} → {report['ece_after']:.4f} "
        f"on {report['samples']} predictions; wrote {args.checkpoint / CALIBRATION_FILE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
