"""Temperature scaling (pedx_ray.calibration): the fit, ECE, the reliability diagram, and the CLI on a view
model's shard split and on a fracture run's predictions; Serve reading the result is in test_serve.py."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, softmax
from test_pretrain import CLASSES_7, write_tiny_shards

from pedx_ray.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    main,
    probabilities,
    read_temperature,
    reliability,
)
from pedx_ray.config import PretrainConfig
from pedx_ray.models import build_model, save_checkpoint

TRUE_TEMPERATURE = 3.0


def overconfident(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels): labels drawn from softmax(z), the model reporting 3·z (too sure of itself)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    labels = np.array([rng.choice(classes, p=p) for p in softmax(z, axis=1)])
    return TRUE_TEMPERATURE * z, labels


def test_temperature_scaling_undoes_overconfidence_and_lowers_ece():
    logits, labels = overconfident(4000, 5)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.15)
    before = expected_calibration_error(probabilities(logits), labels)
    after = expected_calibration_error(probabilities(logits, temperature), labels)
    assert before > 0.1 and after < before / 3, (before, after)
    # scaling keeps the ranking: the same top class, so the same accuracy
    np.testing.assert_array_equal(
        probabilities(logits).argmax(1), probabilities(logits, temperature).argmax(1)
    )
    report = calibration_report(logits, labels, "synthetic")
    assert report["nll_after"] < report["nll_before"] and report["samples"] == 4000


def test_binary_logits_are_calibrated_too():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 3000)
    labels = (rng.random(3000) < expit(z)).astype(int)
    logits = 0.4 * z  # underconfident: the fit sharpens (T < 1)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(0.4, rel=0.15)
    assert expected_calibration_error(probabilities(logits, temperature), labels) < (
        expected_calibration_error(probabilities(logits), labels)
    )


def test_ece_and_reliability_bins_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    table = reliability(probs, labels, bins=10)
    assert table["n"].tolist() == [1, 1, 2] and table["accuracy"].tolist() == [1.0, 1.0, 0.5]
    # |1 - 0.6| + |1 - 0.7| + 2·|0.5 - 0.9|, over 4
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.4 + 0.3 + 0.8) / 4)


def test_too_few_or_one_class_predictions_are_refused():
    with pytest.raises(CalibrationError, match="at least 10 held-out predictions"):
        fit_temperature(np.zeros((5, 3)), np.arange(5) % 3)
    with pytest.raises(CalibrationError, match="of 1"):
        fit_temperature(np.zeros((20, 3)), np.zeros(20, int))


def test_cli_calibrates_a_fracture_run_and_plots_the_reliability_diagram(tmp_path, capsys):
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, 400)
    target = (rng.random(400) < expit(z)).astype(int)
    csv = tmp_path / "predictions_val.csv"
    pd.DataFrame({"id": range(400), "target": target, "prediction": expit(3 * z)}).to_csv(csv, index=False)
    checkpoint = tmp_path / "best"
    checkpoint.mkdir()
    assert read_temperature(checkpoint) == 1.0  # no calibration.json: uncalibrated, as before
    plot = tmp_path / "plots" / "reliability.png"
    assert main([str(checkpoint), "--predictions", str(csv), "--plot", str(plot)]) == 0
    report = json.loads((checkpoint / CALIBRATION_FILE).read_text())
    assert report["temperature"] == pytest.approx(3.0, rel=0.25) == read_temperature(checkpoint)
    assert report["ece_after"] < report["ece_before"] and report["fitted_on"] == str(csv)
    assert "ECE" in capsys.readouterr().out
    image = cv2.imread(str(plot))
    assert image is not None and image.shape == (560, 560, 3) and image.std() > 10

    pd.DataFrame({"target": [50.0] * 20, "prediction": [0.5] * 20}).to_csv(csv, index=False)
    assert main([str(checkpoint), "--predictions", str(csv)]) == 2
    assert "targets are not 0/1" in capsys.readouterr().err


def test_cli_calibrates_a_view_model_on_its_shard_sets_finetune_split(tmp_path, capsys):
    shards = write_tiny_shards(tmp_path / "shards", {"train": 1, "finetune": 3}, size=64)
    config = PretrainConfig(
        arch="tiny_cnn", granularity=7, image_size=32, classes=tuple(CLASSES_7), shards=str(shards)
    )
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        model.fc.weight.mul_(50)  # an untrained model made very sure of its guesses
    checkpoint = save_checkpoint(tmp_path / "best", model, config, {})
    assert main([str(checkpoint), "--shards", str(shards)]) == 0
    report = json.loads((checkpoint / CALIBRATION_FILE).read_text())
    assert report["samples"] == 3 * 7 and report["fitted_on"] == f"{shards} split finetune"
    assert report["temperature"] > 1 and report["ece_after"] < report["ece_before"]
    assert main([str(checkpoint), "--shards", str(shards), "--split", "val"]) == 2
    assert "no samples in split 'val'" in capsys.readouterr().err
