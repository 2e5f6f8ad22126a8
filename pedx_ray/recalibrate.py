"""Site recalibration of a bone-age model: a linear correction fitted on a small local labelled set.

``python -m pedx_ray.recalibrate CHECKPOINT --data KIND:PATH [--images DIR] [--labels CSV] --out NEW``
scores every image of the local set (the same ``--data`` sources as fine-tuning: ``rsna:CSV``,
``phantom:DIR``, ``dicom:CATALOG``) as Serve predicts it (the mean over ``--tta`` test-time views, Serve's
``bone_age_tta``), fits ``bone_age' = slope × bone_age + intercept`` by least squares,
and reports the k-fold cross-validated MAE of the raw and the corrected predictions on the same folds.
NEW is a copy of the checkpoint plus ``recalibration.json`` (the fit, its data and the CV figures); Serve
applies it on load. A site's scanners, positioning and population shift a model's ages by a few months
(Deeplasia: 6.6 → 5.7 months MAE after recalibrating on ~100 local images).

Set size: two parameters need few images, but the CV MAE needs enough to be trusted; below
``MIN_IMAGES`` (10) the command refuses, below ``ADVISED_IMAGES`` (50) it warns. 50–100 images
spread over the age range are a sensible minimum.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ingest import storage
from ingest.files import write_json_atomic
from pedx_ray.augment import DEFAULT_TTA_VIEWS, MAX_TTA_VIEWS

RECALIBRATION_FILE = "recalibration.json"
MIN_IMAGES = 10
ADVISED_IMAGES = 50


class RecalibrationError(ValueError):
    """The local set or checkpoint cannot be used; the message says how to fix it."""


def fit_linear(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, intercept) of target on predicted."""
    slope, intercept = np.polyfit(np.asarray(predicted, np.float64), np.asarray(target, np.float64), 1)
    return float(slope), float(intercept)


def cross_validated_mae(predicted: np.ndarray, target: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """MAE of the raw and of the corrected predictions on held-out folds (the fit never sees its fold)."""
    predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    folds = max(2, min(folds, len(target)))
    assignment = np.random.default_rng(seed).permutation(len(target)) % folds
    raw, corrected = np.empty_like(target), np.empty_like(target)
    for fold in range(folds):
        held = assignment == fold
        slope, intercept = fit_linear(predicted[~held], target[~held])
        raw[held] = predicted[held]
        corrected[held] = slope * predicted[held] + intercept
    return {
        "folds": folds,
        "cv_mae_before": float(np.mean(np.abs(raw - target))),
        "cv_mae_after": float(np.mean(np.abs(corrected - target))),
    }


def recalibration_report(predicted: np.ndarray, target: np.ndarray, folds: int = 5, source: str = "") -> dict:
    if len(target) < MIN_IMAGES:
        raise RecalibrationError(
            f"recalibration needs at least {MIN_IMAGES} labelled local images (got {len(target)}); "
            f"{ADVISED_IMAGES}-100 spread over the age range are advised"
        )
    slope, intercept = fit_linear(predicted, target)
    return {"slope": slope, "intercept": intercept, "images": int(len(target)), "data": source} | (
        cross_validated_mae(predicted, target, folds)
    )


def read_recalibration(checkpoint: str | Path) -> tuple[float, float]:
    """(slope, intercept) of the checkpoint's recalibration; (1, 0) where it has none."""
    path = storage.join(checkpoint, RECALIBRATION_FILE)
    if not storage.is_file(path):
        return 1.0, 0.0
    fit = storage.read_json(path)
    return float(fit["slope"]), float(fit["intercept"])


def local_table(data: str, images: str, labels: str):
    """Every labelled bone-age image of the local set (no split, no subsampling: all of it is fitted)."""
    from pedx_ray.datasets import dicom_table, parse_data, phantom_table, rsna_table

    kind, path = parse_data(data)
    if kind == "phantom":
        return phantom_table(path, "bone_age")
    if kind == "rsna":
        return rsna_table(path, images)
    if kind == "dicom":
        return dicom_table(path, labels, "bone_age")
    raise RecalibrationError(f"{data}: {kind} data holds no bone ages; use phantom:, rsna: or dicom:")


def score_local_set(
    checkpoint: Path, data: str, images: str, labels: str, cache_dir: str, tta: int = DEFAULT_TTA_VIEWS
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted months, true months) of every image of the local set, preprocessed as fine-tuning did
    and averaged over ``tta`` test-time views as Serve predicts (its ``bone_age_tta``)."""
    from pedx_ray.augment import tta_views
    from pedx_ray.datasets import cache_images, read_images
    from pedx_ray.finetune import load_finetuned, predict

    model, config = load_finetuned(checkpoint)
    if config.task != "bone_age":
        raise RecalibrationError(f"{checkpoint} is a {config.task} model; recalibration is for bone age")
    table = local_table(data, images, labels)
    table = cache_images(
        table, image_size=config.image_size, enhance=config.enhance, cache_dir=cache_dir, progress=False
    )
    views = tta_views(read_images(table["image"].tolist()), tta)
    sex = np.repeat(table["sex"].to_numpy(np.float32), tta)
    predicted = predict(model, views, sex, 32, torch.device("cpu")).astype(np.float64).reshape(-1, tta)
    # a recalibrated checkpoint is corrected again from its corrected output (write_recalibrated composes)
    slope, intercept = read_recalibration(checkpoint)
    return slope * predicted.mean(axis=1) + intercept, table["target"].to_numpy(np.float64)


def write_recalibrated(checkpoint: Path, out: Path, report: dict) -> Path:
    """NEW = the checkpoint's files plus recalibration.json; an existing NEW is refused, not overwritten."""
    if out.exists():
        raise RecalibrationError(f"{out} exists; give a new --out directory")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(checkpoint, partial)
    # the new fit composes with any earlier one: it was fitted on the earlier one's corrected output
    slope, intercept = read_recalibration(checkpoint)
    composed = report | {
        "slope": report["slope"] * slope,
        "intercept": report["slope"] * intercept + report["intercept"],
    }
    write_json_atomic(partial / RECALIBRATION_FILE, composed)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pedx_ray.recalibrate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", type=Path, help="a fine-tuned bone-age checkpoint directory")
    parser.add_argument("--data", required=True, help="the local set, KIND:PATH as for fine-tuning")
    parser.add_argument("--images", default="", help="image directory for rsna: sets")
    parser.add_argument("--labels", default="", help="labels CSV for dicom: sets")
    parser.add_argument("--out", type=Path, required=True, help="directory of the recalibrated checkpoint")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument(
        "--tta",
        type=int,
        default=DEFAULT_TTA_VIEWS,
        help=f"test-time views per image, as Serve's bone_age_tta (default {DEFAULT_TTA_VIEWS})",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.tta <= MAX_TTA_VIEWS:
        parser.error(f"--tta must be 1 (off) to {MAX_TTA_VIEWS}")
    if args.out.exists():  # before the slow part
        parser.error(f"{args.out} exists; give a new --out directory")
    try:
        with tempfile.TemporaryDirectory(prefix="pedx-recalibrate-") as cache:
            predicted, target = score_local_set(
                args.checkpoint, args.data, args.images, args.labels, cache, args.tta
            )
        report = recalibration_report(predicted, target, args.folds, source=args.data) | {
            "tta_views": args.tta
        }
        write_recalibrated(args.checkpoint, args.out, report)
    except (RecalibrationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report["images"] < ADVISED_IMAGES:
        print(f"warning: {report['images']} images; {ADVISED_IMAGES}-100 make the CV figures trustworthy")
    print(
        f"bone_age' = {report['slope']:.3f} × bone_age + {report['intercept']:.1f} months; "
        f"{report['folds']}-fold CV MAE {report['cv_mae_before']:.1f} → {report['cv_mae_after']:.1f} months "
        f"on {report['images']} images; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
