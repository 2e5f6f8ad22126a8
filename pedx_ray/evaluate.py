"""Downstream evaluation: predictions CSVs → metrics JSON, the paper's Tables 2/3 in Markdown, PNG plots.

``python -m pedx_ray.evaluate PRED.csv [--compare BASELINE.csv ...] --out DIR``

Each CSV has the columns ``id,target,prediction,sex,age_months,split`` (what pedx_ray.finetune writes); its
sidecar ``<csv>.json`` names the task and the checkpoint/init/recipe that produced it. PRED.csv is the
model under study; every ``--compare`` file is a baseline tested against it on the same cases
(matched by ``id``): DeLong's test of the AUCs for fracture, a paired t-test of the absolute errors
for bone age. The p-value sits in the baseline's row; the studied model's row shows "—".

Writes to DIR: ``metrics.json``, ``table.md`` and the plots — fracture: ``roc.png``; bone age:
``predicted_vs_true.png`` and ``bland_altman_<n>.png`` per model. Plots are matplotlib figures
(``pedx_ray.plots``), each file written atomically.

``--by TABLE.csv:COLUMN`` adds a subgroup table: the cases split by COLUMN of a table keyed by case id
(``id`` or ``sop_instance_uid``, e.g. a phantom set's ``ground_truth.csv`` with ``fracture_kind`` or
``fracture_severity``; numeric columns are cut into equal-count bands). A case whose value is blank
belongs to every group, so the fracture-free cases are the negatives of each fracture kind's AUC.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ingest.files import write_atomic
from pedx_ray import plots, stats

TASKS = ("bone_age", "fracture")
REQUIRED_COLUMNS = ("id", "target", "prediction", "sex", "age_months", "split")
DEFAULT_AGE_BINS_YEARS = (0, 2, 6, 10, 14, 18)


class EvaluationError(ValueError):
    pass


@dataclass(frozen=True)
class Predictions:
    """One model's predictions, sorted by id, with a label for the tables."""

    path: Path
    task: str
    label: str
    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationConfig:
    threshold: float | str = 0.5
    ci_method: str = "delong"
    n_bootstrap: int = 2000
    seed: int = 0
    age_bins_years: tuple[float, ...] = DEFAULT_AGE_BINS_YEARS
    split: str | None = None
    by: tuple[str, ...] = ()  # TABLE.csv:COLUMN subgroup splits
    bands: int = 3  # equal-count bands of a numeric --by column

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str) and self.threshold != "youden":
            raise EvaluationError(f"threshold must be a probability or 'youden', got {self.threshold!r}")
        if not isinstance(self.threshold, str) and not 0 <= self.threshold <= 1:
            raise EvaluationError(
                f"threshold must be a probability in [0, 1] or 'youden', got {self.threshold}"
            )
        if self.ci_method not in stats.CI_METHODS:
            raise EvaluationError(f"ci_method must be one of {stats.CI_METHODS}, got {self.ci_method!r}")
        edges = self.age_bins_years
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise EvaluationError(
                f"age bins must be at least two increasing edges in years (e.g. 0,2,6,10,14,18), got {edges}"
            )
        for spec in self.by:
            table, _, column = spec.rpartition(":")
            if not table or not column:
                raise EvaluationError(
                    f"--by takes TABLE.csv:COLUMN (e.g. ground_truth.csv:fracture_kind), got {spec!r}"
                )
        if self.bands < 1:
            raise EvaluationError(f"bands must be at least 1, got {self.bands}")


def _sidecar(path: Path) -> dict:
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise EvaluationError(
            f"{sidecar} is not valid JSON ({exc}); fix or delete it and pass --task"
        ) from exc
    if not isinstance(meta, dict):
        raise EvaluationError(f"{sidecar} must hold a JSON object with a 'task' key")
    return meta


def _short_init(init: str) -> str:
    """``pedxnet:/abs/runs/pedx-7c/best`` → ``pedxnet:…/pedx-7c/best``: full paths crowd tables, legends."""
    kind, sep, where = init.partition(":")
    parts = Path(where).parts
    return f"{kind}:…/{'/'.join(parts[-2:])}" if sep and len(parts) > 3 else init


def _label(path: Path, meta: dict) -> str:
    parts = [str(meta["recipe"])] if meta.get("recipe") else []
    parts += [_short_init(str(meta["init"]))] if meta.get("init") else []
    return " / ".join(parts) if parts else path.stem


def read_predictions(
    path: str | os.PathLike, task: str | None = None, split: str | None = None
) -> Predictions:
    """Read and validate one predictions CSV; ``task`` overrides (and must agree with) the sidecar."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"predictions file {path} does not exist")
    meta = _sidecar(path)
    sidecar_task = meta.get("task")
    if task and sidecar_task and task != sidecar_task:
        raise EvaluationError(f"--task {task} contradicts {path.name}.json, which says task={sidecar_task!r}")
    task = task or sidecar_task
    if task not in TASKS:
        raise EvaluationError(
            f"cannot tell the task of {path}: its sidecar {path.name}.json gives {sidecar_task!r}; "
            f"pass --task {'|'.join(TASKS)}"
        )
    frame = pd.read_csv(path, dtype={"id": str, "sex": str, "split": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise EvaluationError(
            f"{path} lacks column(s) {', '.join(missing)}; a predictions CSV has the columns "
            f"{','.join(REQUIRED_COLUMNS)} (found {','.join(map(str, frame.columns))})"
        )
    if split is not None:
        frame = frame[frame["split"] == split]
    if frame.empty:
        raise EvaluationError(f"{path} has no rows" + (f" in split {split!r}" if split else ""))
    duplicated = frame["id"][frame["id"].duplicated()].unique()
    if len(duplicated):
        raise EvaluationError(f"{path} repeats id(s) {', '.join(duplicated[:5])}: each case must appear once")
    for column in ("target", "prediction"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or not np.isfinite(values).all():
            bad = frame["id"][values.isna() | ~np.isfinite(values.fillna(0))].tolist()[:5]
            raise EvaluationError(f"{path}: column {column} must be numeric and finite; bad rows (id): {bad}")
        frame[column] = values.astype(float)
    if task == "fracture":
        if not frame["target"].isin((0, 1)).all():
            raise EvaluationError(f"{path}: fracture targets must be 0 or 1")
        if not frame["prediction"].between(0, 1).all():
            raise EvaluationError(
                f"{path}: fracture predictions must be probabilities in [0, 1] (apply the sigmoid to logits)"
            )
    frame = frame.sort_values("id").reset_index(drop=True)
    return Predictions(path=path, task=task, label=_label(path, meta), frame=frame, meta=meta)


def check_same_cases(models: list[Predictions]) -> None:
    """All models must predict the same task on the same set of ids (paired tests need paired cases)."""
    reference = models[0]
    for other in models[1:]:
        if other.task != reference.task:
            raise EvaluationError(
                f"{other.path} is a {other.task} file but {reference.path} is {reference.task}"
            )
        ids_a, ids_b = set(reference.frame["id"]), set(other.frame["id"])
        if ids_a != ids_b:
            only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
            raise EvaluationError(
                f"{reference.path.name} and {other.path.name} cover different cases: "
                f"{len(only_a)} id(s) only in the first (e.g. {only_a[:3]}), "
                f"{len(only_b)} only in the second (e.g. {only_b[:3]}); "
                "predict both models on the same split (or pass --split)"
            )
        if not np.allclose(reference.frame["target"], other.frame["target"]):
            raise EvaluationError(
                f"{reference.path.name} and {other.path.name} disagree on targets of the same ids"
            )


def _unique_labels(models: list[Predictions]) -> list[str]:
    labels = [m.label for m in models]
    return [f"{m.label} ({m.path.stem})" if labels.count(m.label) > 1 else m.label for m in models]


def evaluate_fracture(models: list[Predictions], config: EvaluationConfig) -> list[dict]:
    y = models[0].frame["target"].to_numpy().astype(int)
    reference_scores = models[0].frame["prediction"].to_numpy()
    rows = []
    for i, (model, label) in enumerate(zip(models, _unique_labels(models), strict=True)):
        scores = model.frame["prediction"].to_numpy()
        value, low, high = stats.auc_ci(
            y, scores, method=config.ci_method, n_bootstrap=config.n_bootstrap, seed=config.seed
        )
        row = {"label": label, "file": str(model.path), "meta": model.meta, "n": len(y)}
        row |= {"auc": value, "auc_ci_low": low, "auc_ci_high": high, "ci_method": config.ci_method}
        row |= stats.binary_metrics(y, scores, config.threshold)
        if i > 0:
            test = stats.delong_test(y, reference_scores, scores)
            row["vs_reference"] = {"test": "delong", **vars(test)}
        rows.append(row)
    return rows


def evaluate_bone_age(models: list[Predictions], config: EvaluationConfig) -> list[dict]:
    target = models[0].frame["target"].to_numpy()
    reference_error = np.abs(models[0].frame["prediction"].to_numpy() - target)
    rows = []
    for i, (model, label) in enumerate(zip(models, _unique_labels(models), strict=True)):
        prediction = model.frame["prediction"].to_numpy()
        row = {"label": label, "file": str(model.path), "meta": model.meta}
        row |= stats.regression_metrics(target, prediction)
        row["by_age_group"] = stats.error_by_age_group(target, prediction, config.age_bins_years)
        row["bland_altman"] = stats.bland_altman(target, prediction)
        if i > 0:
            test = stats.paired_t_test(reference_error, np.abs(prediction - target))
            row["vs_reference"] = {"test": "paired_t_abs_error", **vars(test)}
        rows.append(row)
    return rows


ID_COLUMNS = ("id", "sop_instance_uid")


def read_groups(spec: str, ids: pd.Series, bands: int = 3) -> pd.Series:
    """Each case's group (index: case id) from ``TABLE.csv:COLUMN``; "" for a blank value (every group)."""
    path, _, column = spec.rpartition(":")
    if not Path(path).is_file():
        raise EvaluationError(f"--by table {path} does not exist")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((c for c in ID_COLUMNS if c in table.columns), None)
    if key is None or column not in table.columns:
        raise EvaluationError(
            f"{path} needs a case id column ({' or '.join(ID_COLUMNS)}) and the column {column!r}; "
            f"it has {', '.join(table.columns)}"
        )
    values = table.drop_duplicates(key).set_index(key)[column].str.strip()
    missing = ids[~ids.isin(values.index)]
    if len(missing):
        raise EvaluationError(
            f"{path} lacks {len(missing)} of the {len(ids)} cases (e.g. {', '.join(missing[:3])}); "
            "pass the table the predictions were made from"
        )
    values = values.reindex(ids)
    given = values[values != ""]
    numeric = pd.to_numeric(given, errors="coerce")
    if len(given) and numeric.notna().all():
        cut = pd.qcut(numeric, min(bands, numeric.nunique()), duplicates="drop")
        values.loc[given.index] = [f"{c.left:.2f}–{c.right:.2f}" for c in cut]
    return values


def subgroup_rows(models: list[Predictions], groups: pd.Series, config: EvaluationConfig) -> list[dict]:
    """Per group: its cases (plus the blank-valued ones) scored as the task's main metric, per model."""
    ids = models[0].frame["id"]
    group_of = groups.reindex(ids).to_numpy()
    target = models[0].frame["target"].to_numpy()
    rows = []
    for name in sorted(set(group_of) - {""}):
        mask = (group_of == name) | (group_of == "")
        row: dict = {"group": name, "n": int(mask.sum()), "models": []}
        y = target[mask].astype(int)
        if models[0].task == "fracture":
            row["positives"] = int(y.sum())
        for model, label in zip(models, _unique_labels(models), strict=True):
            prediction = model.frame["prediction"].to_numpy()[mask]
            if models[0].task == "fracture":
                auc = (np.nan,) * 3
                if 0 < y.sum() < len(y):
                    auc = stats.auc_ci(y, prediction, method=config.ci_method,
                                       n_bootstrap=config.n_bootstrap, seed=config.seed)  # fmt: skip
                row["models"].append(
                    {"label": label, "auc": auc[0], "auc_ci_low": auc[1], "auc_ci_high": auc[2]}
                )
            else:
                error = np.abs(prediction - target[mask])
                row["models"].append(
                    {"label": label, "mae": float(error.mean()), "mae_sd": float(error.std())}
                )
        rows.append(row)
    return rows


def subgroup_table(spec: str, rows: list[dict]) -> str:
    column = spec.rpartition(":")[2]
    labels = [m["label"] for m in rows[0]["models"]] if rows else []
    fracture = bool(rows) and "auc" in rows[0]["models"][0]
    metric = "AUC (95% CI)" if fracture else "MAE ± SD"
    lines = [
        f"By `{column}` ({metric}; cases with a blank value count in every group):",
        "",
        f"| {column} | n{' (positives)' if fracture else ''} | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 2) + "|",
    ]
    for r in rows:
        n = f"{r['n']} ({r['positives']})" if fracture else str(r["n"])
        if fracture:
            cells = [
                "n/a"
                if np.isnan(m["auc"])
                else f"{m['auc']:.3f} ({m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})"
                for m in r["models"]
            ]
        else:
            cells = [f"{m['mae']:.2f} ± {m['mae_sd']:.2f}" for m in r["models"]]
        lines.append("| " + " | ".join([r["group"], n, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _p(row: dict) -> str:
    if "vs_reference" not in row:
        return "—"
    p = row["vs_reference"]["p_value"]
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def fracture_table(rows: list[dict]) -> str:
    """Table 2's layout: model/init, AUC (95% CI), F1, ACC, SEN, SPE, PPV, NPV, DeLong p vs studied model."""
    lines = [
        "| Model / init | AUC (95% CI) | F1 | ACC | SEN | SPE | PPV | NPV | DeLong p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        auc_text = f"{r['auc']:.3f} ({r['auc_ci_low']:.3f}–{r['auc_ci_high']:.3f})"
        cells = [r["label"], auc_text] + [
            _f(r[k]) for k in ("f1", "accuracy", "sensitivity", "specificity", "ppv", "npv")
        ]
        lines.append("| " + " | ".join(cells + [_p(r)]) + " |")
    return "\n".join(lines) + "\n"


def bone_age_table(rows: list[dict]) -> str:
    """Table 3's layout (months): model/init, MAE ± SD, MSE, R², paired t-test p vs the studied model."""
    lines = ["| Model / init | MAE ± SD | MSE | R² | Paired t-test p |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["label"], f"{r['mae']:.2f} ± {r['mae_sd']:.2f}", f"{r['mse']:.2f}", _f(r["r2"]), _p(r)]
        lines.append("| " + " | ".join(cells) + " |")
    groups = [g["group"] for g in rows[0]["by_age_group"]]
    lines += ["", "MAE ± SD (months) by true age:", ""]
    lines.append(
        "| Model / init | "
        + " | ".join(f"{g} (n={x['n']})" for g, x in zip(groups, rows[0]["by_age_group"], strict=True))
        + " |"
    )
    lines.append("|---" * (len(groups) + 1) + "|")
    for r in rows:
        cells = [f"{_f(g['mae'], 2)} ± {_f(g['mae_sd'], 2)}" for g in r["by_age_group"]]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    return "\n".join(lines) + "\n"


# ---- plots ----


def roc_plot(models: list[Predictions], rows: list[dict]) -> Figure:
    figure, axes = plots.new_figure("ROC", "1 − specificity", "sensitivity")
    axes.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--", label="chance")
    for model, row, colour in zip(models, rows, plots.colours(len(models)), strict=True):
        curve = stats.roc_curve(model.frame["target"].astype(int), model.frame["prediction"])
        label = f"{row['label']}: AUC {row['auc']:.3f}"
        axes.plot(curve.fpr, curve.tpr, color=colour, linewidth=2, label=label)
    axes.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    axes.legend(loc="lower right")
    return figure


def predicted_vs_true_plot(models: list[Predictions], rows: list[dict]) -> Figure:
    target = models[0].frame["target"]
    figure, axes = plots.new_figure("Predicted vs true bone age", "true (months)", "predicted (months)")
    axes.axline((0, 0), slope=1, color="0.6", linewidth=1, linestyle="--", label="identity")
    for model, row, colour in zip(models, rows, plots.colours(len(models)), strict=True):
        axes.scatter(
            target,
            model.frame["prediction"],
            s=12,
            color=colour,
            label=f"{row['label']}: MAE {row['mae']:.1f}",
        )
    axes.set_aspect("equal", adjustable="datalim")
    axes.legend(loc="upper left")
    return figure


def bland_altman_plot(model: Predictions, row: dict) -> Figure:
    target, prediction = model.frame["target"].to_numpy(), model.frame["prediction"].to_numpy()
    agreement = row["bland_altman"]
    figure, axes = plots.new_figure(
        f"Bland–Altman: {row['label']}", "mean of true and predicted (months)", "predicted − true (months)"
    )
    axes.scatter((target + prediction) / 2, prediction - target, s=12)
    axes.axhline(
        agreement["mean_difference"],
        color="black",
        linestyle="--",
        label=f"mean difference {agreement['mean_difference']:.2f}",
    )
    loa = f"95% limits of agreement {agreement['loa_low']:.2f} to {agreement['loa_high']:.2f}"
    for key in ("loa_low", "loa_high"):
        axes.axhline(agreement[key], color="tab:red", linestyle=":", label=loa if key == "loa_low" else None)
    axes.legend(loc="best")
    return figure


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def evaluate(
    paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    task: str | None = None,
    config: EvaluationConfig = EvaluationConfig(),
) -> dict:
    """Evaluate ``paths[0]`` against the baselines ``paths[1:]``; writes metrics.json, table.md and PNGs."""
    models = [read_predictions(p, task, config.split) for p in paths]
    check_same_cases(models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = models[0].task
    if task == "fracture":
        rows = evaluate_fracture(models, config)
        table = "Fracture classification (Table 2 layout)\n\n" + fracture_table(rows)
        plots.save_png(roc_plot(models, rows), out / "roc.png")
    else:
        rows = evaluate_bone_age(models, config)
        table = "Bone age assessment, months (Table 3 layout)\n\n" + bone_age_table(rows)
        plots.save_png(predicted_vs_true_plot(models, rows), out / "predicted_vs_true.png")
        for i, (model, row) in enumerate(zip(models, rows, strict=True)):
            plots.save_png(bland_altman_plot(model, row), out / f"bland_altman_{i}.png")
    subgroups = {}
    for spec in config.by:
        subgroups[spec] = subgroup_rows(
            models, read_groups(spec, models[0].frame["id"], config.bands), config
        )
        table += "\n" + subgroup_table(spec, subgroups[spec])
    result = {"task": task, "split": config.split, "reference": rows[0]["label"], "models": rows}
    if subgroups:
        result["subgroups"] = subgroups
    write_atomic(out / "metrics.json", json.dumps(_jsonable(result), indent=2, allow_nan=False))
    write_atomic(out / "table.md", table)
    return result


def _threshold(text: str) -> float | str:
    return text if text == "youden" else float(text)


def _age_bins(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"age bins are comma-separated years like 0,2,6,10,14,18: {exc}"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pedx_ray.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="the studied model's predictions CSV")
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="BASELINE.csv", help="baselines to test against it"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--task", choices=TASKS, help="overrides the sidecar JSON's task")
    parser.add_argument("--split", help="evaluate only rows of this split (e.g. test)")
    parser.add_argument("--threshold", type=_threshold, default=0.5, help="probability cut-off or 'youden'")
    parser.add_argument(
        "--ci", choices=stats.CI_METHODS, default="delong", help="AUC confidence interval method"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap replicates (with --ci bootstrap)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--age-bins", type=_age_bins, default=DEFAULT_AGE_BINS_YEARS, help="group edges in years"
    )
    parser.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="TABLE.csv:COLUMN",
        help="subgroup table by a column of a table keyed by case id (repeatable), "
        "e.g. PHANTOMS/ground_truth.csv:fracture_severity",
    )
    parser.add_argument("--bands", type=int, default=3, help="equal-count bands of a numeric --by column")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = EvaluationConfig(
            threshold=args.threshold,
            ci_method=args.ci,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            age_bins_years=args.age_bins,
            split=args.split,
            by=tuple(args.by),
            bands=args.bands,
        )
        result = evaluate([args.predictions, *args.compare], args.out, args.task, config)
    except (EvaluationError, stats.StatsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'metrics.json'} ({len(result['models'])} model(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
