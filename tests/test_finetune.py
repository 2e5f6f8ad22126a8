"""Fine-tuning: config, initialisation and transfer reports, training modes, bad input, real Ray Train runs.

The Ray runs share the session's local Ray (`ray_session`, 2 CPUs) and use tiny_cnn at 64 px on
small phantom sets: the architecture is not what they test.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ingest.phantoms import generate_task_set
from pedx_ray.config import ConfigError, PretrainConfig
from pedx_ray.finetune import (
    PREDICTION_COLUMNS,
    FinetuneConfig,
    build_parser,
    config_from_args,
    load_finetune_config,
    load_finetuned,
    predict,
    resolve_finetune_config,
    roc_auc,
    run_finetuning,
)
from pedx_ray.initialize import InitError, initialize, lr_gates, parameter_groups
from pedx_ray.models import build_model, save_checkpoint
from pedx_ray.tasks import build_task_model


def tiny(**changes) -> FinetuneConfig:
    fields = dict(backbone="tiny_cnn", image_size=64, batch_size=8, epochs=2, warmup_epochs=1)
    return FinetuneConfig(**(fields | changes))


@pytest.fixture(scope="module")
def pedxnet_checkpoint(tmp_path_factory) -> Path:
    """A pretraining-format (contract 4) 7-class tiny_cnn checkpoint with recognisable weights."""
    config = PretrainConfig(arch="tiny_cnn", image_size=64, classes=tuple("ABCDEFG"))
    torch.manual_seed(1)
    model = build_model(config)
    return save_checkpoint(tmp_path_factory.mktemp("pedxnet") / "best", model, config, {"epoch": 1})


def test_pedxnet_transfer_loads_every_backbone_tensor_and_skips_the_view_classifier(pedxnet_checkpoint):
    model = build_task_model(tiny())
    report = initialize(model, f"pedxnet:{pedxnet_checkpoint}", "tiny_cnn")
    source = torch.load(pedxnet_checkpoint / "model.pt", weights_only=True)
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert all("classifier" in reason for reason in report.skipped.values())
    assert len(report.loaded) == len(source) - 2
    assert report.missing == []
    backbone_state = model.backbone.state_dict()
    for name in report.loaded:  # a wrapping backbone may prefix the names: match on the suffix
        origin = next(k for k in source if name == k or name.endswith("." + k))
        torch.testing.assert_close(backbone_state[name], source[origin])
    assert "2 skipped" in report.summary() and "fc.weight" in report.summary()


def test_pedxnet_transfer_changes_the_features_scratch_does_not_load_anything(pedxnet_checkpoint):
    torch.manual_seed(0)
    scratch = build_task_model(tiny())
    assert initialize(scratch, "scratch", "tiny_cnn") is None
    pretrained = build_task_model(tiny())
    initialize(pretrained, f"pedxnet:{pedxnet_checkpoint}", "tiny_cnn")
    x = torch.rand(2, 1, 64, 64)
    upstream = build_model(PretrainConfig(arch="tiny_cnn", image_size=64))
    upstream.load_state_dict(torch.load(pedxnet_checkpoint / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(pretrained.eval().forward_features(x), upstream.eval().forward_features(x))
        assert not torch.allclose(scratch.eval().forward_features(x), upstream.forward_features(x))


def test_resnet18_pedxnet_gives_finetuning_its_whole_backbone(tmp_path):
    """The demo pretrains a ResNet-18 (configs/pretrain_smoke.yaml); fine-tuning's resnet18 backbone
    must take every tensor of it but the view classifier, so the features match the upstream model's."""
    config = PretrainConfig(arch="resnet18", image_size=64, classes=tuple("ABCDEFG"))
    torch.manual_seed(2)
    upstream = build_model(config)
    checkpoint = save_checkpoint(tmp_path / "best", upstream, config, {"epoch": 1})
    model = build_task_model(tiny(backbone="resnet18"))
    report = initialize(model, f"pedxnet:{checkpoint}", "resnet18")
    assert set(report.skipped) == {"fc.weight", "fc.bias"} and report.missing == []
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), upstream.eval().forward_features(x))


def test_pedxnet_checkpoint_of_another_architecture_is_refused(pedxnet_checkpoint, tmp_path):
    with pytest.raises(InitError, match="holds a tiny_cnn but the run's backbone is inception_v3"):
        initialize(
            build_task_model(tiny(backbone="inception_v3", image_size=96)),
            f"pedxnet:{pedxnet_checkpoint}",
            "inception_v3",
        )
    with pytest.raises(InitError, match="not a PedXnet checkpoint directory"):
        initialize(build_task_model(tiny()), f"pedxnet:{tmp_path}", "tiny_cnn")


def test_imagenet_weights_file_missing_or_of_another_architecture_is_a_clear_error(tmp_path):
    pytest.importorskip("pedx_ray.backbones")
    model = build_task_model(tiny(backbone="inception_v3", image_size=96))
    with pytest.raises(InitError, match="inception_v3_google.pth"):
        initialize(model, f"imagenet:{tmp_path / 'inception_v3_google.pth'}", "inception_v3")
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, wrong)
    with pytest.raises(InitError, match="does not match torchvision's inception_v3"):
        initialize(model, f"imagenet:{wrong}", "inception_v3")


def test_linear_probe_freezes_the_backbone_and_gradual_unfreezes_from_the_top():
    model = build_task_model(tiny())
    groups = parameter_groups(model, "linear_probe")
    assert [g["name"] for g in groups] == ["head"]
    assert not any(p.requires_grad for p in model.backbone.parameters())

    model = build_task_model(tiny())
    groups = parameter_groups(model, "gradual")
    assert groups[-1]["name"] == "head" and len(groups) >= 3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    gates = lr_gates(len(groups), "gradual", unfreeze_every=2)
    trains = [[gate(epoch) for gate in gates] for epoch in range(2 * len(groups))]
    assert trains[0] == [0.0] * (len(groups) - 1) + [1.0]  # the head alone
    assert trains[2] == [0.0] * (len(groups) - 2) + [1.0, 1.0]  # plus the top block after 2 epochs
    assert trains[-1] == [1.0] * len(groups)
    assert all(g(0) == 1.0 for g in lr_gates(len(groups), "full", 2))


def test_bone_age_head_takes_sex_and_starts_at_the_training_mean():
    model = build_task_model(tiny(target_mean=120.0, target_std=40.0)).eval()
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        boys, girls = model(x, torch.ones(4)), model(x, torch.zeros(4))
    assert boys.shape == (4,)
    assert not torch.allclose(boys, girls)
    assert (boys - 120).abs().max() < 3 * 40


def test_config_validates_and_resolves_yaml_below_flags(tmp_path):
    with pytest.raises(ConfigError, match="does not fit task 'fracture'"):
        FinetuneConfig(task="fracture", head="regression_sex")
    with pytest.raises(ConfigError, match="pedxnet:PATH"):
        FinetuneConfig(init="pedxnet")
    with pytest.raises(ConfigError, match="backbone must be one of"):
        FinetuneConfig(backbone="resnet101")
    with pytest.raises(ConfigError, match="below epochs"):
        FinetuneConfig(epochs=5)  # the default 5 warm-up epochs leave no decay
    with pytest.raises(ConfigError, match="phantom:DIR"):
        FinetuneConfig(data="somewhere")
    assert FinetuneConfig(task="fracture").head == "binary"
    # A later layer that switches the task (a sweep's --set task=fracture over a bone-age YAML) gets
    # that task's default head, unless it names one.
    assert resolve_finetune_config({"task": "bone_age"}, {"task": "fracture"}).head == "binary"
    assert resolve_finetune_config({"task": "fracture"}, {"epochs": 9}).head == "binary"
    with pytest.raises(ConfigError, match="does not fit task 'fracture'"):
        resolve_finetune_config({"task": "fracture", "head": "regression"})
    recipe = tmp_path / "wouters.yaml"
    recipe.write_text("backbone: tiny_cnn\nimage_size: 64\nlr: 0.001\nepochs: 3\nwarmup_epochs: 1\n")
    assert load_finetune_config(recipe).recipe == "wouters"
    args = build_parser().parse_args(["--config", str(recipe), "--epochs", "5", "--data", "phantom:x"])
    config = config_from_args(args)
    assert (config.epochs, config.lr, config.backbone, config.batch_size) == (5, 0.001, "tiny_cnn", 20)
    recipe.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_finetune_config(recipe)


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 50)
    score = np.round(rng.random(50), 1)  # ties
    pairs = [
        (1.0 if p > n else 0.5 if p == n else 0.0) for p in score[target == 1] for n in score[target == 0]
    ]
    assert roc_auc(target, score) == pytest.approx(np.mean(pairs))


# ---------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def bone_age_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bone_age")
    generate_task_set(root, "bone_age", n=40, seed=5)
    return root


@pytest.mark.slow
def test_bone_age_run_writes_a_checkpoint_and_predictions(
    ray_session, bone_age_set, pedxnet_checkpoint, tmp_path, monkeypatch
):
    # Paths relative to where the command runs, as typed on a command line: Ray Train workers run
    # elsewhere, so the run must fix them before they get there.
    monkeypatch.chdir(tmp_path)
    config = tiny(
        data=f"phantom:{os.path.relpath(bone_age_set)}",
        init=f"pedxnet:{os.path.relpath(pedxnet_checkpoint)}",
        storage=str(tmp_path),
        name="ba",
        num_workers=2,
        cpus_per_worker=0.5,
        train_fraction=0.8,
    )
    result = run_finetuning(config, progress=False)
    assert result.best_metrics["val_mae"] > 0
    model, saved = load_finetuned(result.best_dir)
    assert saved.init == f"pedxnet:{pedxnet_checkpoint.resolve()}"
    assert saved.target_mean > 0  # the target scale came from the train split
    val = pd.read_csv(result.predictions["val"])
    test = pd.read_csv(result.predictions["test"])
    assert tuple(val.columns) == PREDICTION_COLUMNS
    assert set(val["split"]) == {"val"} and set(test["split"]) == {"test"}
    assert set(val["id"]).isdisjoint(test["id"])
    mae = (val["prediction"] - val["target"]).abs().mean()
    assert mae == pytest.approx(result.best_metrics["val_mae"], rel=1e-4)  # CSV = the checkpoint's own scores
    sidecar = json.loads(Path(str(result.predictions["val"]) + ".json").read_text())
    assert sidecar["task"] == "bone_age" and sidecar["init"] == saved.init
    assert len(list((tmp_path / "ba").glob("checkpoint_epoch_*"))) == 2
    init_report = json.loads((tmp_path / "ba" / "init_report.json").read_text())
    assert set(init_report["skipped"]) == {"fc.weight", "fc.bias"} and init_report["loaded"]


@pytest.fixture(scope="module")
def fracture_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fracture")
    generate_task_set(root, "fracture", n=16, seed=6)
    return root


@pytest.mark.slow
def test_fracture_run_step_and_resume(ray_session, fracture_set, tmp_path):
    config = tiny(
        task="fracture",
        data=f"phantom:{fracture_set}",
        storage=str(tmp_path),
        name="fx",
        epochs=1,
        warmup_epochs=0,
        val_fraction=0.3,
        mode="gradual",
    )
    first = run_finetuning(config, progress=False)
    assert first.best_metrics["epoch"] == 1 and "val_auc" in first.best_metrics
    prediction = pd.read_csv(first.predictions["val"])["prediction"]
    assert prediction.between(0, 1).all()
    resumed = run_finetuning(config.replace(epochs=2), resume=True, progress=False)
    assert json.loads((tmp_path / "fx" / "checkpoint_epoch_0002" / "metrics.json").read_text())["epoch"] == 2
    assert resumed.run_dir == first.run_dir


def test_predict_uses_sex_and_returns_probabilities_for_fracture():
    model = build_task_model(tiny(task="fracture"))
    out = predict(model, np.zeros((3, 64, 64), np.uint8), np.zeros(3, np.float32), 2, torch.device("cpu"))
    assert out.shape == (3,) and ((out > 0) & (out < 1)).all()


@pytest.mark.parametrize(
    ("task", "head", "extra"),
    [
        ("bone_age", "regression_sex", {}),
        ("bone_age", "tjnet", {}),
        ("bone_age", "age_bins", {"age_bins": 5}),
        ("fracture", "binary", {}),
    ],
)
def test_every_head_trains_a_step_and_predicts_in_the_csv_units(task, head, extra):
    torch.manual_seed(0)
    model = build_task_model(tiny(task=task, head=head, **extra))
    x, sex = torch.rand(4, 1, 64, 64), torch.tensor([0.0, 1.0, 0.0, 1.0])
    target = (
        torch.tensor([10.0, 60.0, 120.0, 200.0]) if task == "bone_age" else torch.tensor([0.0, 1.0, 1.0, 0.0])
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model.loss(model(x, sex), target, sex)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    with torch.no_grad():
        prediction = model.eval().predict(model(x, sex))
    assert prediction.shape == (4,)
    low, high = (0, 231) if task == "bone_age" else (0, 1)
    assert ((prediction >= low) & (prediction <= high)).all() or head == "regression_sex"


def test_imagenet_file_loads_the_whole_backbone_with_a_one_channel_stem(tmp_path):
    pytest.importorskip("pedx_ray.backbones")
    from torchvision.models import resnet18

    torch.manual_seed(0)
    weights = resnet18(weights=None).state_dict()
    torch.save(weights, tmp_path / "resnet18.pth")
    model = build_task_model(tiny(backbone="resnet18"))
    report = initialize(model, f"imagenet:{tmp_path / 'resnet18.pth'}", "resnet18")
    assert report.missing == [] and not report.skipped
    stem = model.backbone.state_dict()["conv1.weight"]
    torch.testing.assert_close(stem, weights["conv1.weight"].sum(dim=1, keepdim=True))


# ---------------------------------------------------------------- object storage (S3 on loopback)


def test_pedxnet_checkpoint_on_object_storage_initialises_like_the_local_one(pedxnet_checkpoint, s3_bucket):
    from ingest import storage

    remote = f"{s3_bucket}/finetune-init/best"
    storage.copy_tree(pedxnet_checkpoint, remote)
    local_model, remote_model = build_task_model(tiny()), build_task_model(tiny())
    local_report = initialize(local_model, f"pedxnet:{pedxnet_checkpoint}", "tiny_cnn")
    remote_report = initialize(remote_model, f"pedxnet:{remote}", "tiny_cnn")
    assert remote_report.loaded == local_report.loaded
    for name, tensor in local_model.backbone.state_dict().items():
        torch.testing.assert_close(remote_model.backbone.state_dict()[name], tensor)
    with pytest.raises(InitError, match=r"pedxnet:s3://.*not a PedXnet checkpoint directory"):
        initialize(build_task_model(tiny()), f"pedxnet:{s3_bucket}/finetune-init", "tiny_cnn")


@pytest.mark.slow
def test_fracture_run_on_object_storage(ray_session, fracture_set, pedxnet_checkpoint, s3_bucket, tmp_path):
    from ingest import storage

    remote = f"{s3_bucket}/{tmp_path.name}"
    storage.copy_tree(pedxnet_checkpoint, f"{remote}/pedxnet/best")
    config = tiny(
        task="fracture",
        data=f"phantom:{fracture_set}",
        init=f"pedxnet:{remote}/pedxnet/best",
        storage=f"{remote}/runs",
        cache_dir=str(tmp_path / "cache"),
        name="fx",
        epochs=1,
        warmup_epochs=0,
        val_fraction=0.3,
    )
    result = run_finetuning(config, progress=False)
    assert result.best_dir == f"{remote}/runs/fx/best"
    model, saved = load_finetuned(result.best_dir)
    assert saved.init == f"pedxnet:{remote}/pedxnet/best"
    predictions = pd.read_csv(io.BytesIO(storage.read_bytes(result.predictions["val"])))
    assert tuple(predictions.columns) == PREDICTION_COLUMNS and predictions["prediction"].between(0, 1).all()
    assert storage.read_json(f"{result.predictions['val']}.json")["task"] == "fracture"
    assert storage.read_json(f"{remote}/runs/fx/init_report.json")["loaded"]
