"""Bone-age refusals: how declining the least certain answers trades against the MAE of those kept.

    .venv/bin/python bench/bone_age_rejection.py RUN/best --data phantom:DIR \
        --ids RUN/predictions_test.csv --json docs/benchmarks/results/bone_age_rejection.json \
        --plot docs/benchmarks/bone_age_rejection.png

Each image named in ``--ids`` (a fine-tuning run's test predictions: the images it never trained on)
is read from the phantom set's DICOM file and predicted as ``/v1/bone-age`` predicts it: the Serve
preprocessing (``deploy.inputs.prepare``), ``--tta`` test-time views, the answer their mean ± SD
(``deploy.models.Predictor``). Images are then declined in order of SD, as ``min_confidence`` would,
and the MAE of the answers kept is reported at each rejection rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from results import write_results

from deploy.inputs import Limits, Upload, decode, prepare
from deploy.models import Predictor, inspect_checkpoint
from pedx_ray import plots
from pedx_ray.datasets import parse_data

REJECTION_RATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def predict(checkpoint: str, paths: list[Path], sexes: np.ndarray, tta: int, batch: int = 32) -> np.ndarray:
    """(N, 3): bone age mean and SD in months over ``tta`` views as Serve answers them, and the
    single-view answer, for each DICOM file."""
    spec = inspect_checkpoint("bone_age", checkpoint)
    limits = Limits()
    inputs = np.stack([prepare(decode(Upload(p.read_bytes(), "dicom"), limits), spec.recipe) for p in paths])
    columns = []
    for views in (tta, 1):
        predictor, answers = Predictor(spec, tta=views), []
        for start in range(0, len(inputs), batch):
            answers += predictor.predict(inputs[start : start + batch], sexes[start : start + batch])
        columns.append([[a["bone_age_months"], a["bone_age_sd_months"]] for a in answers])
    return np.array([[*with_tta, single[0]] for with_tta, single in zip(*columns, strict=True)])


def rejection_curve(target: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> list[dict]:
    """MAE of the answers kept when the given share with the largest SD is declined."""
    order = np.argsort(sd, kind="stable")  # most certain first
    error = np.abs(mean - target)[order]
    rows = []
    for rate in REJECTION_RATES:
        kept = max(1, round(len(order) * (1 - rate)))
        rows.append(
            {
                "rejected": rate,
                "kept": kept,
                "mae_kept": round(float(error[:kept].mean()), 2),
                "sd_threshold": round(float(sd[order][kept - 1]), 2),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a fine-tuned bone-age checkpoint directory (RUN/best)")
    parser.add_argument("--data", required=True, help="the phantom set it was tuned on, phantom:DIR")
    parser.add_argument("--ids", required=True, type=Path, help="CSV whose `id` column names the images")
    parser.add_argument("--tta", type=int, default=4, help="test-time views per image (default 4, as Serve)")
    parser.add_argument("--json", type=Path, help="write the figures here (bench/results.py's format)")
    parser.add_argument("--plot", type=Path, help="write the curve as a PNG")
    args = parser.parse_args(argv)
    kind, root = parse_data(args.data)
    if kind != "phantom":
        parser.error(f"--data {args.data!r}: this benchmark reads a phantom set (phantom:DIR)")
    if args.tta < 2:
        parser.error("--tta must be at least 2: one view has no spread to decline by")
    truth = pd.read_csv(Path(root) / "ground_truth.csv").set_index("sop_instance_uid")
    ids = pd.read_csv(args.ids)["id"].astype(str)
    missing = sorted(set(ids) - set(truth.index))
    if missing:
        print(
            f"error: {len(missing)} id(s) of {args.ids} are not in {root} (first: {missing[0]})",
            file=sys.stderr,
        )
        return 2
    rows = truth.loc[ids]
    sexes = (rows["sex"] == "M").to_numpy(np.float32)
    answers = predict(args.checkpoint, [Path(root) / p for p in rows["path"]], sexes, args.tta)
    target = rows["bone_age_months"].to_numpy(float)
    curve = rejection_curve(target, answers[:, 0], answers[:, 1])
    correlation = float(np.corrcoef(answers[:, 1], np.abs(answers[:, 0] - target))[0, 1])
    single_view_mae = float(np.abs(answers[:, 2] - target).mean())
    print(
        f"{len(ids)} images, {args.tta} test-time views; SD vs absolute error: r = {correlation:.2f}; "
        f"MAE of the single-view answers {single_view_mae:.2f} months"
    )
    print("| declined | kept | MAE kept (months) | SD above which declined |")
    print("|---|---|---|---|")
    for row in curve:
        print(
            f"| {row['rejected']:.0%} | {row['kept']} | {row['mae_kept']:.2f} | {row['sd_threshold']:.2f} |"
        )
    if args.plot:
        figure, axes = plots.new_figure(
            "Bone age: declining the least certain", "declined", "MAE kept (months)"
        )
        axes.plot([r["rejected"] * 100 for r in curve], [r["mae_kept"] for r in curve], marker="o")
        axes.xaxis.set_major_formatter("{x:.0f}%")
        print(f"plot: {plots.save_png(figure, args.plot)}")
    if args.json:
        results = {
            "checkpoint": str(args.checkpoint),
            "images": len(ids),
            "tta": args.tta,
            "sd_error_correlation": round(correlation, 3),
            "mae_single_view": round(single_view_mae, 2),
            "curve": curve,
        }
        write_results(args.json, "bone_age_rejection", argv, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
