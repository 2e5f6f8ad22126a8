"""The upstream model (1-channel InceptionV3) and the checkpoint contract (contract 4 of docs/design.md)."""

from __future__ import annotations

import json

import pytest
import torch

from pedx_ray.config import ConfigError, PretrainConfig
from pedx_ray.models import (
    FEATURE_DIM,
    CheckpointError,
    PedXInception,
    build_model,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)

CLASSES_7 = ("Head", "Chest", "Abdomen", "Pelvis", "Spine", "Upper_Extremity", "Lower_Extremity")


@pytest.mark.parametrize("granularity", [7, 30, 68])
def test_inception_takes_one_channel_and_sizes_the_head_to_the_granularity(granularity):
    torch.manual_seed(0)
    model = build_model(PretrainConfig(granularity=granularity, image_size=96)).eval()
    assert isinstance(model, PedXInception)
    assert model.Conv2d_1a_3x3.conv.in_channels == 1
    assert model.AuxLogits is None
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, FEATURE_DIM)
    assert logits.shape == (2, granularity)
    torch.testing.assert_close(model.forward_head(features), logits)


def test_resnet18_takes_one_channel_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    classes = tuple(f"c{i}" for i in range(30))
    config = PretrainConfig(arch="resnet18", granularity=30, image_size=64, classes=classes)
    model = build_model(config).eval()
    assert model.conv1.in_channels == 1
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model(x).shape == (2, 30)
        save_checkpoint(tmp_path, model, config, {})
        reloaded, reloaded_config = load_checkpoint(tmp_path)
        torch.testing.assert_close(reloaded.eval()(x), model(x))
    assert reloaded_config.arch == "resnet18"


def test_weights_are_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    model = build_model(PretrainConfig(image_size=96))
    fc = model.fc.weight
    bound = (6 / (fc.shape[0] + fc.shape[1])) ** 0.5
    assert fc.abs().max() <= bound
    assert fc.abs().max() > 0.9 * bound  # fills the Xavier range, unlike a truncated normal
    assert torch.count_nonzero(model.fc.bias) == 0
    stem = model.Conv2d_1a_3x3.conv.weight  # (32, 1, 3, 3): fan_in 9, fan_out 288
    assert stem.abs().max() <= (6 / (9 + 288)) ** 0.5


def test_inception_rejects_images_too_small_for_it():
    with pytest.raises(ConfigError, match="at least 75"):
        PretrainConfig(image_size=64)
    assert PretrainConfig(arch="tiny_cnn", image_size=64).image_size == 64


def test_checkpoint_round_trip_rebuilds_the_model_from_config_json_alone(tmp_path):
    torch.manual_seed(0)
    config = PretrainConfig(image_size=96, classes=CLASSES_7, epochs=3, warmup_epochs=1)
    model = build_model(config)
    ddp_like = torch.nn.Module()  # state_dict must be the unwrapped model's, whatever wraps it
    ddp_like._orig_mod = model
    save_checkpoint(tmp_path / "ckpt", ddp_like, config, {"epoch": 3, "val_f1": 0.5})

    loaded, loaded_config = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["classes"] == list(CLASSES_7)
    assert json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["val_f1"] == 0.5
    x = torch.rand(3, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert not any(
        key.startswith(("module.", "_orig_mod.")) for key in torch.load(tmp_path / "ckpt" / "model.pt")
    )
    assert unwrap(ddp_like) is model


def test_load_checkpoint_names_what_is_missing_or_mismatched(tmp_path):
    with pytest.raises(CheckpointError, match="missing model.pt, config.json"):
        load_checkpoint(tmp_path)
    config = PretrainConfig(image_size=96)
    save_checkpoint(tmp_path, build_model(config), config, {})
    (tmp_path / "config.json").write_text(json.dumps(config.replace(granularity=30).to_dict()))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path)


def test_tiny_backbone_has_the_same_interface():
    model = build_model(PretrainConfig(arch="tiny_cnn", image_size=32, granularity=30)).eval()
    x = torch.rand(2, 1, 32, 32)
    assert model.forward_features(x).shape == (2, FEATURE_DIM)
    assert model(x).shape == (2, 30)
