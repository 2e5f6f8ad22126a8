"""Site recalibration of bone age (pedx_ray.recalibrate): the linear fit, its cross-validated MAE, the
minimum set size, and the CLI on phantom hands writing a checkpoint that Serve loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.models import Predictor, inspect_checkpoint
from ingest.phantoms.build import generate_task_set
from pedx_ray.finetune import FinetuneConfig
from pedx_ray.models import save_checkpoint
from pedx_ray.recalibrate import (
    MIN_IMAGES,
    RECALIBRATION_FILE,
    RecalibrationError,
    cross_validated_mae,
    fit_linear,
    main,
    read_recalibration,
    recalibration_report,
    write_recalibrated,
)
from pedx_ray.tasks import build_task_model


@pytest.fixture(scope="module")
def bone_age_checkpoint(tmp_path_factory) -> Path:
    config = FinetuneConfig(
        task="bone_age",
        backbone="tiny_cnn",
        image_size=32,
        enhance="clahe",
        target_mean=100.0,
        target_std=50.0,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bone_age")
    return save_checkpoint(root / "best", build_task_model(config), config, {"val_score": 30.0})


@pytest.fixture(scope="module")
def local_hands(tmp_path_factory) -> Path:
    """Twelve labelled phantom hand radiographs (DICOM), ages spread over 0-18 years."""
    out = tmp_path_factory.mktemp("hands")
    generate_task_set(out, "bone_age", 12, seed=3, workers=1)
    return out


def site_bias(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) months: a model reading this site's images 8 months young and compressed."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(12, 204, n)
    return 0.9 * true - 8 + rng.normal(0, 3, n), true


def test_the_linear_fit_and_its_cross_validated_mae():
    predicted, true = site_bias(80)
    slope, intercept = fit_linear(predicted, true)
    assert slope == pytest.approx(1 / 0.9, rel=0.05) and intercept == pytest.approx(8 / 0.9, abs=3)
    cv = cross_validated_mae(predicted, true, folds=5)
    assert cv["folds"] == 5 and cv["cv_mae_before"] > 10 and cv["cv_mae_after"] < 4
    # already calibrated predictions: the correction gains nothing out of fold
    cv = cross_validated_mae(true + np.random.default_rng(1).normal(0, 3, 80), true)
    assert cv["cv_mae_after"] >= 0.9 * cv["cv_mae_before"]


def test_fewer_than_the_minimum_images_are_refused_with_the_advice():
    predicted, true = site_bias(MIN_IMAGES - 1)
    with pytest.raises(RecalibrationError, match=r"at least 10 labelled local images \(got 9\); 50-100"):
        recalibration_report(predicted, true)
    assert recalibration_report(*site_bias(MIN_IMAGES))["images"] == MIN_IMAGES


def test_a_second_recalibration_composes_with_the_first(tmp_path, bone_age_checkpoint):
    first = tmp_path / "first"
    shutil.copytree(bone_age_checkpoint, first)
    (first / RECALIBRATION_FILE).write_text(json.dumps({"slope": 2.0, "intercept": 1.0}))
    second = write_recalibrated(first, tmp_path / "second", {"slope": 3.0, "intercept": 4.0, "images": 20})
    # 3 · (2x + 1) + 4
    assert read_recalibration(second) == (6.0, 7.0)
    with pytest.raises(RecalibrationError, match="exists; give a new --out"):
        write_recalibrated(first, second, {"slope": 1.0, "intercept": 0.0})


def test_cli_recalibrates_on_local_hands_and_serve_loads_the_result(
    tmp_path, bone_age_checkpoint, local_hands, capsys
):
    out = tmp_path / "recalibrated"
    assert read_recalibration(bone_age_checkpoint) == (1.0, 0.0)  # a checkpoint without the file
    code = main(
        [str(bone_age_checkpoint), "--data", f"phantom:{local_hands}", "--out", str(out), "--folds", "4"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "warning: 12 images; 50-100" in printed and "4-fold CV MAE" in printed
    fit = json.loads((out / RECALIBRATION_FILE).read_text())
    assert fit["images"] == 12 and fit["folds"] == 4 and fit["tta_views"] == 4
    assert fit["data"] == f"phantom:{local_hands}"
    assert np.isfinite([fit["slope"], fit["intercept"], fit["cv_mae_before"], fit["cv_mae_after"]]).all()
    # the original is untouched; the copy holds its files plus the fit
    assert not (bone_age_checkpoint / RECALIBRATION_FILE).exists()
    assert {p.name for p in out.iterdir()} == {p.name for p in bone_age_checkpoint.iterdir()} | {
        RECALIBRATION_FILE
    }
    predictor = Predictor(inspect_checkpoint("bone_age", out), tta=4)
    assert predictor.recalibration == (fit["slope"], fit["intercept"])
    # NEW exists now: refused before any image is read
    with pytest.raises(SystemExit):
        main([str(bone_age_checkpoint), "--data", f"phantom:{local_hands}", "--out", str(out)])
    assert "exists; give a new --out" in capsys.readouterr().err


def test_cli_refuses_a_set_below_the_minimum_and_a_fracture_model(tmp_path, bone_age_checkpoint, capsys):
    few = tmp_path / "few"
    generate_task_set(few, "bone_age", MIN_IMAGES - 2, seed=4, workers=1)
    code = main([str(bone_age_checkpoint), "--data", f"phantom:{few}", "--out", str(tmp_path / "x")])
    assert code == 2 and "needs at least 10 labelled local images (got 8)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    fracture = FinetuneConfig(task="fracture", backbone="tiny_cnn", image_size=32)
    checkpoint = save_checkpoint(tmp_path / "fracture", build_task_model(fracture), fracture, {})
    code = main([str(checkpoint), "--data", f"phantom:{few}", "--out", str(tmp_path / "y")])
    assert code == 2 and "recalibration is for bone age" in capsys.readouterr().err
