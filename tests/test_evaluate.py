"""pedx_ray.evaluate: predictions CSVs → metrics JSON, Tables 2/3 in Markdown, PNG plots; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from pedx_ray import evaluate, stats


def write_predictions(path: Path, target, prediction, task: str | None, **meta) -> Path:
    n = len(target)
    pd.DataFrame(
        {
            "id": [f"case{i:03d}" for i in range(n)],
            "target": target,
            "prediction": prediction,
            "sex": ["M", "F"] * (n // 2) + ["M"] * (n % 2),
            "age_months": np.linspace(10, 200, n),
            "split": ["test"] * n,
        }
    ).sample(frac=1.0, random_state=1).to_csv(path, index=False)  # shuffled: matching is by id
    if task:
        path.with_name(path.name + ".json").write_text(json.dumps({"task": task, **meta}))
    return path


@pytest.fixture
def fracture_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    good = 1 / (1 + np.exp(-rng.normal(2.5 * y - 1.25, 1.0)))
    poor = 1 / (1 + np.exp(-rng.normal(0.5 * y - 0.25, 1.0)))
    model = write_predictions(
        tmp_path / "pedxnet.csv", y, good, "fracture", init="pedxnet:7C", recipe="inception"
    )
    baseline = write_predictions(
        tmp_path / "scratch.csv", y, poor, "fracture", init="scratch", recipe="inception"
    )
    return y, good, poor, model, baseline


@pytest.fixture
def bone_age_files(tmp_path):
    rng = np.random.default_rng(1)
    target = rng.uniform(6, 216, 80)
    close = target + rng.normal(0, 8, 80)
    far = target + rng.normal(5, 20, 80)
    model = write_predictions(tmp_path / "pedxnet.csv", target, close, "bone_age", init="pedxnet:7C")
    baseline = write_predictions(tmp_path / "scratch.csv", target, far, "bone_age", init="scratch")
    return target, close, far, model, baseline


def read_plot(path: Path) -> np.ndarray:
    """The plot as BGR, checked to be a readable PNG of the plots' fixed size."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable PNG"
    assert image.shape == (560, 640, 3)
    return image


def pixels_of(image: np.ndarray, colour: str) -> int:
    """How many pixels are (within anti-aliasing) the matplotlib colour ``colour``."""
    bgr = np.array([round(255 * c) for c in reversed(to_rgb(colour))])
    return int((np.abs(image.astype(int) - bgr).max(axis=2) <= 8).sum())


def test_fracture_metrics_table_and_roc_plot(fracture_files, tmp_path, capsys):
    y, good, poor, model, baseline = fracture_files
    out = tmp_path / "eval"
    assert evaluate.main([str(model), "--compare", str(baseline), "--out", str(out)]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "fracture" and metrics["reference"] == "inception / pedxnet:7C"
    studied, base = metrics["models"]
    assert studied["auc"] == pytest.approx(stats.auc(y, good))
    assert (studied["auc_ci_low"], studied["auc_ci_high"]) == pytest.approx(stats.auc_ci(y, good)[1:])
    assert studied["sensitivity"] == pytest.approx(stats.binary_metrics(y, good)["sensitivity"])
    assert "vs_reference" not in studied
    assert base["vs_reference"]["p_value"] == pytest.approx(stats.delong_test(y, good, poor).p_value)

    table = (out / "table.md").read_text()
    assert "| Model / init | AUC (95% CI) | F1 | ACC | SEN | SPE | PPV | NPV | DeLong p |" in table
    assert f"| inception / pedxnet:7C | {studied['auc']:.3f} (" in table
    assert table.splitlines()[-1].startswith("| inception / scratch |")
    assert table in capsys.readouterr().out
    roc = read_plot(out / "roc.png")
    assert pixels_of(roc, "tab:blue") > 200 and pixels_of(roc, "tab:orange") > 200  # both curves drawn
    assert not list(out.glob(".*partial*"))  # no temporary file left behind


def test_bone_age_metrics_table_and_plots(bone_age_files, tmp_path):
    target, close, far, model, baseline = bone_age_files
    out = tmp_path / "eval"
    result = evaluate.evaluate(
        [model, baseline], out, config=evaluate.EvaluationConfig(age_bins_years=(0, 9, 18))
    )
    studied, base = result["models"]
    assert studied["mae"] == pytest.approx(np.abs(close - target).mean())
    assert studied["r2"] == pytest.approx(stats.regression_metrics(target, close)["r2"])
    expected = stats.paired_t_test(np.abs(close - target), np.abs(far - target))
    assert base["vs_reference"]["p_value"] == pytest.approx(expected.p_value)
    assert [g["group"] for g in studied["by_age_group"]] == ["0–9 y", "9–18 y"]
    assert sum(g["n"] for g in studied["by_age_group"]) == 80

    table = (out / "table.md").read_text()
    assert "| Model / init | MAE ± SD | MSE | R² | Paired t-test p |" in table
    assert f"| pedxnet:7C | {studied['mae']:.2f} ± {studied['mae_sd']:.2f} |" in table
    p = expected.p_value
    baseline_row = next(line for line in table.splitlines() if line.startswith("| scratch |"))
    assert baseline_row.endswith(f"| {'<0.001' if p < 0.001 else f'{p:.3f}'} |")
    scatter = read_plot(out / "predicted_vs_true.png")
    assert pixels_of(scatter, "tab:blue") > 200 and pixels_of(scatter, "tab:orange") > 200
    for name in ("bland_altman_0.png", "bland_altman_1.png"):
        agreement = read_plot(out / name)
        assert pixels_of(agreement, "tab:blue") > 200 and pixels_of(agreement, "tab:red") > 100  # points, LoA


def test_task_from_flag_when_no_sidecar(tmp_path):
    path = write_predictions(
        tmp_path / "p.csv", [0, 1, 0, 1, 1, 0], [0.1, 0.8, 0.3, 0.6, 0.9, 0.2], task=None
    )
    with pytest.raises(evaluate.EvaluationError, match="--task"):
        evaluate.read_predictions(path)
    assert evaluate.read_predictions(path, task="fracture").task == "fracture"
    path.with_name("p.csv.json").write_text(json.dumps({"task": "bone_age"}))
    with pytest.raises(evaluate.EvaluationError, match="contradicts"):
        evaluate.read_predictions(path, task="fracture")


def test_wrong_columns_are_named(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["a", "b"], "label": [0, 1], "prediction": [0.2, 0.7]}).to_csv(path, index=False)
    assert evaluate.main([str(path), "--task", "fracture", "--out", str(tmp_path / "o")]) == 2
    message = capsys.readouterr().err
    assert "lacks column(s) target, sex, age_months, split" in message


def test_mismatched_cases_are_rejected(bone_age_files, tmp_path):
    target, close, _, model, _ = bone_age_files
    other = write_predictions(tmp_path / "short.csv", target[:-1], close[:-1], "bone_age")
    with pytest.raises(evaluate.EvaluationError, match="different cases: 1 id"):
        evaluate.evaluate([model, other], tmp_path / "o")


def test_fracture_predictions_must_be_probabilities(tmp_path):
    path = write_predictions(tmp_path / "logits.csv", [0, 1, 0, 1], [-2.0, 3.0, -1.0, 0.5], "fracture")
    with pytest.raises(evaluate.EvaluationError, match="probabilities"):
        evaluate.read_predictions(path)


def write_truth(path: Path, ids, column: str, values) -> Path:
    pd.DataFrame({"sop_instance_uid": ids, column: values, "other": 1}).to_csv(path, index=False)
    return path


def test_by_splits_fracture_auc_by_kind_with_negatives_in_every_group(tmp_path, capsys):
    # 40 negatives, 20 obvious fractures the model sees, 20 faint ones it scores like negatives
    y = np.array([0] * 40 + [1] * 40)
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.uniform(0, 0.5, 40), rng.uniform(0.6, 1.0, 20), rng.uniform(0, 0.5, 20)])
    predictions = write_predictions(tmp_path / "p.csv", y, scores, "fracture")
    ids = [f"case{i:03d}" for i in range(80)]
    kinds = [""] * 40 + ["buckle"] * 20 + ["greenstick"] * 20
    truth = write_truth(tmp_path / "ground_truth.csv", ids, "fracture_kind", kinds)

    assert (
        evaluate.main([str(predictions), "--out", str(tmp_path / "o"), "--by", f"{truth}:fracture_kind"]) == 0
    )
    groups = json.loads((tmp_path / "o" / "metrics.json").read_text())["subgroups"][f"{truth}:fracture_kind"]
    by_name = {g["group"]: g for g in groups}
    assert set(by_name) == {"buckle", "greenstick"}
    assert by_name["buckle"]["n"] == 60 and by_name["buckle"]["positives"] == 20
    assert by_name["buckle"]["models"][0]["auc"] == pytest.approx(1.0)
    assert 0.3 < by_name["greenstick"]["models"][0]["auc"] < 0.7
    assert "By `fracture_kind`" in capsys.readouterr().out


def test_by_cuts_a_numeric_column_into_equal_count_bands(bone_age_files, tmp_path):
    target, close, far, model, baseline = bone_age_files
    ids = [f"case{i:03d}" for i in range(len(target))]
    truth = write_truth(tmp_path / "t.csv", ids, "severity", np.linspace(0, 1, len(target)))
    config = evaluate.EvaluationConfig(by=(f"{truth}:severity",), bands=4)
    result = evaluate.evaluate([model, baseline], tmp_path / "o", config=config)
    groups = result["subgroups"][f"{truth}:severity"]
    assert [g["n"] for g in groups] == [20, 20, 20, 20]
    first = np.abs(close[:20] - target[:20])
    assert groups[0]["models"][0]["mae"] == pytest.approx(first.mean())
    assert [m["label"] for m in groups[0]["models"]] == ["pedxnet:7C", "scratch"]


def test_by_names_cases_the_table_lacks(fracture_files, tmp_path):
    model = fracture_files[3]
    truth = write_truth(tmp_path / "t.csv", ["case000", "case001"], "fracture_kind", ["", "buckle"])
    with pytest.raises(evaluate.EvaluationError, match="lacks 118 of the 120 cases"):
        evaluate.evaluate(
            [model], tmp_path / "o", config=evaluate.EvaluationConfig(by=(f"{truth}:fracture_kind",))
        )
    with pytest.raises(evaluate.EvaluationError, match="TABLE.csv:COLUMN"):
        evaluate.EvaluationConfig(by=("no-column",))


def test_labels_shorten_a_checkpoint_path_to_its_last_folders(tmp_path):
    y, scores = [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]
    path = write_predictions(
        tmp_path / "p.csv", y, scores, "fracture", init="pedxnet:/data/runs/pedx-7c/best"
    )
    assert evaluate.read_predictions(path).label == "pedxnet:…/pedx-7c/best"
