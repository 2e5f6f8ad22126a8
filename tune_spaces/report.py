"""The sweep report: the paper's tables and the ablation's plots from a results directory.

``python -m tune_spaces.report RESULTS_DIR [--out DIR] [--size 100%]``

RESULTS_DIR is a ``tune_spaces.run`` results directory (or one experiment in it). Written to
``--out`` (default ``RESULTS_DIR/report``): ``report.md`` with every table, one CSV per table
(``table1_upstream.csv``, ``table2_fracture.csv``, ``table3_bone_age.csv``, ``ablation.csv``) and
PNG plots (``size_<task>.png``: the test metric against the number of training images per
initialisation, mean ± SD over seeds; ``lr_<experiment>.png``: best validation score against the
learning rate per cell, when the learning rate was searched; ``curves_<experiment>.png``: the
validation score per epoch, mean over the trials of each initialisation or granularity).

How the numbers are made:
- Table 1 (upstream): per granularity, the trial with the best fine-tuning-split macro F1; its
  checkpoint's validation-split macro F1, accuracy, precision and recall.
- Tables 2 / 3 and the ablation: runs are grouped by initialisation × training size; where the
  learning rate was searched, the learning rate with the best mean validation score is taken.
  Test metrics are mean ± SD (sample SD) over that group's seeds.
- Table 3's p-value: a paired t-test (`pedx_ray.stats.paired_t_test`) of each test image's
  absolute error, averaged over the seeds, against scratch's at the same training size.
  Table 2's: DeLong's test of the seed-averaged probabilities against scratch's.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ingest import storage
from pedx_ray import plots, stats
from tune_spaces.run import SWEEP_FILE, TRIAL_FILE
from tune_spaces.spaces import INITS, parse_train_size

FRACTURE_METRICS = ("auc", "f1", "accuracy", "sensitivity", "specificity", "ppv", "npv")
BONE_AGE_METRICS = ("mae", "mse", "r2")
PRIMARY = {"bone_age": ("mae", "test MAE (months)"), "fracture": ("auc", "test AUC")}
BASELINE = "scratch"


class ReportError(ValueError):
    pass


# ---------------------------------------------------------------- reading


def find_experiments(root: str | os.PathLike) -> list[Path | str]:
    """Experiment directories (holding ``sweep.json``) at or directly under ``root`` (a path or a URI)."""
    root = storage.join(root)
    if storage.is_file(storage.join(root, SWEEP_FILE)):
        return [root]
    found = storage.subdirectories_holding(root, SWEEP_FILE)
    if not found:
        raise ReportError(f"{root} holds no sweep results (no {SWEEP_FILE}); run `python -m tune_spaces.run`")
    return found


def _read_progress(trial_dir: Path | str) -> list[dict]:
    path = storage.join(trial_dir, "result.json")
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def read_experiment(path: Path | str) -> tuple[dict, list[dict]]:
    """The sweep's metadata and one record per trial directory: its parameters, per-epoch progress
    (Tune's ``result.json``) and, when it finished, its ``trial.json``."""
    meta = storage.read_json(storage.join(path, SWEEP_FILE))
    trials = []
    for trial_dir in storage.subdirectories_holding(path, "params.json"):
        summary_file = storage.join(trial_dir, TRIAL_FILE)
        summary = storage.read_json(summary_file) if storage.is_file(summary_file) else None
        trials.append(
            {
                "dir": trial_dir,
                "params": storage.read_json(storage.join(trial_dir, "params.json")),
                "progress": [r for r in _read_progress(trial_dir) if "epoch" in r],
                "summary": summary,
            }
        )
    return meta, trials


def _size_key(token: str) -> tuple:
    parsed = parse_train_size(token)
    return (parsed["train_size"] or math.inf, parsed["train_fraction"])


def finetune_frame(experiments: list[tuple[Path | str, dict, list[dict]]]) -> pd.DataFrame:
    """One row per finished fine-tuning trial."""
    rows = []
    for path, meta, trials in experiments:
        if meta["mode"] == "pretrain":
            continue
        for trial in trials:
            summary = trial["summary"]
            if summary is None:
                continue
            params = summary["params"]
            config = summary["config"]
            init = params.get("init") or config["init"]
            rows.append(
                {
                    "experiment": storage.name_of(path),
                    "trial": storage.name_of(trial["dir"]),
                    "dir": str(trial["dir"]),
                    "task": summary["task"],
                    "init": init,
                    "train_size": params.get("train_size", "100%"),
                    "n_train": summary["n_train"],
                    "seed": summary["seed"],
                    "lr": summary["lr"],
                    "val_score": summary["best"]["best_val_score"],
                    "predictions": str(storage.join(trial["dir"], summary["predictions"]["test"]))
                    if "test" in summary.get("predictions", {})
                    else "",
                    **{f"test_{k}": v for k, v in summary["test"].items()},
                }
            )
    return pd.DataFrame(rows)


def select_learning_rate(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task × init × size, keep the runs of the learning rate with the best mean val score."""
    if frame.empty:
        return frame
    keep = []
    for _, group in frame.groupby(["task", "init", "train_size"], sort=False):
        best_lr = group.groupby("lr")["val_score"].mean().idxmax()
        keep.append(group[group["lr"] == best_lr])
    return pd.concat(keep, ignore_index=True)


# ---------------------------------------------------------------- numbers


def mean_sd(values) -> tuple[float, float, int]:
    """Mean, sample SD (ddof=1; NaN for one value) and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def _seed_averaged(paths: list[str], column: str) -> pd.Series:
    """Per test image, the mean over runs of ``column`` (``abs_error`` or ``prediction``)."""
    frames = []
    for path in paths:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(path)), dtype={"id": str})
        frame["abs_error"] = (frame["prediction"] - frame["target"]).abs()
        frames.append(frame.set_index("id")[[column, "target"]])
    ids = set(frames[0].index)
    if any(set(f.index) != ids for f in frames[1:]):
        raise ReportError(f"the runs {paths} predicted different test images; use one split_seed")
    merged = pd.concat([f[column] for f in frames], axis=1).mean(axis=1)
    return merged.sort_index().rename(column).to_frame().join(frames[0]["target"])


def _test_against_baseline(task: str, paths: list[str], baseline: list[str]) -> float:
    if not paths or not baseline:
        return float("nan")
    if task == "bone_age":
        a = _seed_averaged(baseline, "abs_error")
        b = _seed_averaged(paths, "abs_error")
        if not a.index.equals(b.index):
            raise ReportError("scratch and the compared runs predicted different test images")
        return stats.paired_t_test(a["abs_error"], b["abs_error"]).p_value
    a, b = _seed_averaged(baseline, "prediction"), _seed_averaged(paths, "prediction")
    try:
        return stats.delong_test(a["target"].astype(int), a["prediction"], b["prediction"]).p_value
    except stats.StatsError:
        return float("nan")


def _inits_in_order(values) -> list[str]:
    present = list(dict.fromkeys(values))
    return [i for i in INITS if i in present] + [i for i in present if i not in INITS]


def downstream_table(frame: pd.DataFrame, task: str, size: str | None = None) -> pd.DataFrame:
    """Table 2 (fracture) or 3 (bone age): per init at one training size (default: the largest),
    mean ± SD over seeds of the test metrics and the p-value against scratch."""
    rows = frame[frame["task"] == task]
    if rows.empty:
        return pd.DataFrame()
    size = size or max(rows["train_size"].unique(), key=_size_key)
    rows = rows[rows["train_size"] == size]
    metrics = BONE_AGE_METRICS if task == "bone_age" else FRACTURE_METRICS
    baseline = rows[rows["init"] == BASELINE]["predictions"].tolist()
    out = []
    for init in _inits_in_order(rows["init"]):
        group = rows[rows["init"] == init]
        record = {
            "init": init,
            "train_size": size,
            "n_train": int(group["n_train"].iloc[0]),
            "runs": len(group),
        }
        for metric in metrics:
            record[f"{metric}_mean"], record[f"{metric}_sd"], _ = mean_sd(group[f"test_{metric}"])
        record["lr"] = float(group["lr"].iloc[0])
        record["p_vs_scratch"] = (
            float("nan")
            if init == BASELINE
            else _test_against_baseline(task, group["predictions"].tolist(), baseline)
        )
        out.append(record)
    return pd.DataFrame(out)


def ablation_table(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The data-size ablation, long format: per init × size, the primary test metric's mean ± SD."""
    rows = frame[frame["task"] == task]
    metric = PRIMARY[task][0]
    out = []
    for (init, size), group in rows.groupby(["init", "train_size"], sort=False):
        mean, sd, n = mean_sd(group[f"test_{metric}"])
        out.append(
            {
                "task": task,
                "init": init,
                "train_size": size,
                "n_train": int(group["n_train"].iloc[0]),
                "metric": metric,
                "mean": mean,
                "sd": sd,
                "seeds": n,
                "lr": float(group["lr"].iloc[0]),
            }
        )
    table = pd.DataFrame(out)
    if table.empty:
        return table
    order = {init: i for i, init in enumerate(_inits_in_order(table["init"]))}
    return table.sort_values(
        ["init", "n_train"], key=lambda c: c.map(order) if c.name == "init" else -c
    ).reset_index(drop=True)


def upstream_table(experiments: list[tuple[Path | str, dict, list[dict]]]) -> pd.DataFrame:
    """Table 1: per granularity, the best trial's validation macro metrics."""
    best: dict[int, dict] = {}
    counts: dict[int, int] = {}
    for path, meta, trials in experiments:
        if meta["mode"] != "pretrain":
            continue
        for trial in trials:
            summary = trial["summary"]
            if summary is None:
                continue
            g = int(summary["granularity"])
            counts[g] = counts.get(g, 0) + 1
            if g not in best or summary["best"]["finetune_f1"] > best[g]["best"]["finetune_f1"]:
                names = {"experiment": storage.name_of(path), "trial": storage.name_of(trial["dir"])}
                best[g] = summary | names
    out = []
    for g in sorted(best):
        m = best[g]["best"]
        out.append(
            {
                "granularity": g,
                "f1": m["val_f1"],
                "accuracy": m["val_accuracy"],
                "precision": m["val_precision"],
                "recall": m["val_recall"],
                "finetune_f1": m["finetune_f1"],
                "epoch": m["epoch"],
                "lr": best[g]["lr"],
                "trials": counts[g],
                "trial": best[g]["trial"],
            }
        )
    return pd.DataFrame(out)


# ---------------------------------------------------------------- Markdown


def _pm(mean: float, sd: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if np.isfinite(sd) else f"{mean:.{digits}f}"


def _p(value: float) -> str:
    if not np.isfinite(value):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def upstream_markdown(table: pd.DataFrame) -> str:
    return _markdown(
        ["Granularity", "F1", "ACC", "Precision", "Recall", "lr", "trials"],
        [
            [f"{r.granularity}C", f"{r.f1:.3f}", f"{r.accuracy:.3f}", f"{r.precision:.3f}", f"{r.recall:.3f}",
             f"{r.lr:.2g}", str(r.trials)]
            for r in table.itertuples()
        ],
    )  # fmt: skip


def downstream_markdown(table: pd.DataFrame, task: str) -> str:
    if task == "bone_age":
        header = ["Init", "MAE (months)", "MSE", "R²", "Paired t-test p vs scratch", "runs"]
        rows = [
            [r["init"], _pm(r["mae_mean"], r["mae_sd"], 2), _pm(r["mse_mean"], r["mse_sd"], 1),
             _pm(r["r2_mean"], r["r2_sd"], 3), _p(r["p_vs_scratch"]), str(r["runs"])]
            for _, r in table.iterrows()
        ]  # fmt: skip
    else:
        header = ["Init", "AUC", "F1", "ACC", "SEN", "SPE", "PPV", "NPV", "DeLong p vs scratch", "runs"]
        rows = [
            [r["init"], *(_pm(r[f"{m}_mean"], r[f"{m}_sd"], 3) for m in FRACTURE_METRICS),
             _p(r["p_vs_scratch"]), str(r["runs"])]
            for _, r in table.iterrows()
        ]  # fmt: skip
    return _markdown(header, rows)


def ablation_markdown(table: pd.DataFrame) -> str:
    """Rows: initialisations; columns: training sizes (largest first); cells: mean ± SD (seeds)."""
    sizes = sorted(table["train_size"].unique(), key=_size_key, reverse=True)
    n_train = {s: int(table[table["train_size"] == s]["n_train"].iloc[0]) for s in sizes}
    digits = 2 if table["metric"].iloc[0] == "mae" else 3
    rows = []
    for init in _inits_in_order(table["init"]):
        cells = []
        for size in sizes:
            hit = table[(table["init"] == init) & (table["train_size"] == size)]
            cells.append("" if hit.empty else _pm(hit["mean"].iloc[0], hit["sd"].iloc[0], digits))
        rows.append([init, *cells])
    return _markdown(["Init", *(f"{s} (n={n_train[s]})" for s in sizes)], rows)


# ---------------------------------------------------------------- plots


def size_plot(table: pd.DataFrame, task: str) -> Figure:
    """The primary test metric against the number of training images (log scale), one line per init,
    error bars ± SD over seeds."""
    metric_label = PRIMARY[task][1]
    figure, axes = plots.new_figure(f"{metric_label} vs training size", "training images", metric_label)
    inits = _inits_in_order(table["init"])
    for i, (init, colour) in enumerate(zip(inits, plots.colours(len(inits)), strict=True)):
        rows = table[table["init"] == init].sort_values("n_train")
        shift = 1.02 ** (i - (len(inits) - 1) / 2)  # keep overlapping error bars apart
        axes.errorbar(
            rows["n_train"] * shift,
            rows["mean"],
            yerr=rows["sd"].fillna(0),
            color=colour,
            marker="o",
            capsize=3,
            label=init,
        )
    sizes = sorted(table["n_train"].unique())
    axes.set_xscale("log")
    axes.set_xticks(sizes, labels=[str(n) for n in sizes])
    axes.minorticks_off()
    axes.legend()
    return figure


def _group_key(meta: dict, params: dict) -> str:
    axes = [a for a in meta["grid_axes"] if a != "seed"]
    return ", ".join(f"{params.get(a)}" for a in axes) or "all"


def _score(meta: dict, row: dict) -> float:
    value = row.get(meta["metric"])
    if value is None:
        return float("nan")
    return -value if meta["metric"] == "val_score" and "val_mae" in row else value


def _score_label(meta: dict, progress: list[dict]) -> str:
    if meta["metric"] == "val_score":
        return "val MAE (months)" if progress and "val_mae" in progress[0] else "val AUC"
    return meta["metric"].replace("_", " ")


def lr_plot(meta: dict, trials: list[dict], title: str) -> Figure | None:
    """Best validation score against the learning rate (log scale), one colour per cell."""
    points = []
    for trial in trials:
        scores = [_score(meta, r) for r in trial["progress"]]
        scores = [s for s in scores if np.isfinite(s)]
        lr = trial["params"].get("lr")
        if scores and lr:
            best = min(scores) if "val_mae" in trial["progress"][0] else max(scores)
            points.append((_group_key(meta, trial["params"]), lr, best))
    if len({p[1] for p in points}) < 2:
        return None  # the learning rate was not searched
    label = _score_label(meta, trials[0]["progress"])
    figure, axes = plots.new_figure(f"{title}: best {label} vs learning rate", "learning rate", label)
    groups = list(dict.fromkeys(p[0] for p in points))
    for group, colour in zip(groups, plots.colours(len(groups)), strict=True):
        mine = sorted((lr, score) for g, lr, score in points if g == group)
        axes.plot(
            [lr for lr, _ in mine],
            [score for _, score in mine],
            color=colour,
            marker="o",
            linewidth=1,
            label=group,
        )
    axes.set_xscale("log")
    axes.legend()
    return figure


def curves_plot(meta: dict, trials: list[dict], title: str) -> Figure | None:
    """Validation score per epoch, mean over the trials of each first grid value (init or granularity)."""
    first = meta["grid_axes"][0] if meta["grid_axes"] else None
    series: dict[str, dict[int, list[float]]] = {}
    for trial in trials:
        key = str(trial["params"].get(first, "all")) if first else "all"
        for row in trial["progress"]:
            value = _score(meta, row)
            if np.isfinite(value):
                series.setdefault(key, {}).setdefault(int(row["epoch"]), []).append(value)
    if not series:
        return None
    label = _score_label(meta, next(t["progress"] for t in trials if t["progress"]))
    figure, axes = plots.new_figure(f"{title}: {label} per epoch (mean of trials)", "epoch", label)
    for (key, by_epoch), colour in zip(series.items(), plots.colours(len(series)), strict=True):
        epochs = sorted(by_epoch)
        axes.plot(
            epochs,
            [np.mean(by_epoch[e]) for e in epochs],
            color=colour,
            marker=".",
            label=f"{first}={key}" if first else key,
        )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return figure


# ---------------------------------------------------------------- the report


def write_report(
    results: str | os.PathLike | list, out_dir: str | os.PathLike, size: str | None = None
) -> dict:
    """Read the experiments under ``results`` (a directory or a list of experiment directories),
    write the tables and plots to ``out_dir``; returns the written paths and the tables. Each location
    may be a directory or an object-store URI (ingest.storage)."""
    paths = (
        [storage.join(p) for p in results]
        if isinstance(results, list)
        else find_experiments(results)
    )  # fmt: skip
    experiments = [(p, *read_experiment(p)) for p in paths]
    out = storage.join(out_dir)
    storage.makedirs(out)
    written: dict = {"csv": [], "png": [], "tables": {}}
    names = [storage.name_of(p) for p in paths]
    sections = ["# Sweep report", "", "Experiments: " + ", ".join(f"`{name}`" for name in names), ""]

    upstream = upstream_table(experiments)
    if not upstream.empty:
        csv = storage.write_bytes(storage.join(out, "table1_upstream.csv"), upstream.to_csv(index=False))
        written["csv"].append(csv)
        written["tables"]["upstream"] = upstream
        sections += ["## Table 1: upstream view classification (validation split, macro)", "",
                     upstream_markdown(upstream)]  # fmt: skip

    frame = select_learning_rate(finetune_frame(experiments))
    for task, number, title in (("fracture", 2, "fracture"), ("bone_age", 3, "bone age")):
        if frame.empty or not (frame["task"] == task).any():
            continue
        table = downstream_table(frame, task, size)
        name = f"table{number}_{task}.csv"
        written["csv"].append(storage.write_bytes(storage.join(out, name), table.to_csv(index=False)))
        written["tables"][task] = table
        runs_note = "mean ± SD over seeds"
        sections += [
            f"## Table {number}: {title}, test split, training size {table['train_size'].iloc[0]} "
            f"({runs_note})",
            "",
            downstream_markdown(table, task),
        ]
    if not frame.empty:
        ablations = [ablation_table(frame, task) for task in frame["task"].unique()]
        long = pd.concat(ablations, ignore_index=True)
        csv = storage.write_bytes(storage.join(out, "ablation.csv"), long.to_csv(index=False))
        written["csv"].append(csv)
        written["tables"]["ablation"] = long
        for table in ablations:
            task = table["task"].iloc[0]
            sections += [
                f"## Data-size ablation: {PRIMARY[task][1]}, mean ± SD over seeds", "",
                ablation_markdown(table),
                f"![{PRIMARY[task][1]} vs training size](size_{task}.png)", "",
            ]  # fmt: skip
            written["png"].append(
                plots.save_png(size_plot(table, task), storage.join(out, f"size_{task}.png"))
            )
    for path, meta, trials in experiments:
        for kind, plot in (("lr", lr_plot), ("curves", curves_plot)):
            figure = plot(meta, trials, storage.name_of(path))
            if figure is not None:
                png = plots.save_png(figure, storage.join(out, f"{kind}_{storage.name_of(path)}.png"))
                written["png"].append(png)
                sections += [f"![{kind} {storage.name_of(path)}]({storage.name_of(png)})", ""]
    written["markdown"] = storage.write_bytes(storage.join(out, "report.md"), "\n".join(sections))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tune_spaces.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results", help="a tune_spaces.run results directory (or one experiment in it)")
    parser.add_argument("--out", help="output directory (default RESULTS/report)")
    parser.add_argument(
        "--size", help="training size of Tables 2/3, e.g. 100%% or 500 (default: the largest)"
    )
    args = parser.parse_args(argv)
    try:
        written = write_report(args.results, args.out or storage.join(args.results, "report"), args.size)
    except (ReportError, stats.StatsError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(storage.read_text(written["markdown"]), end="")
    print(f"wrote {written['markdown']}, {len(written['csv'])} CSV, {len(written['png'])} PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
