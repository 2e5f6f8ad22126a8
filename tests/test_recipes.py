"""Backbones, ImageNet weight files, TJ-Net / age-range pieces, enhancement chains and the recipe YAMLs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from pedx_ray.backbones import (
    BACKBONES,
    CBAM,
    RECIPE_FIELDS,
    RecipeError,
    TJNetHead,
    WeightsError,
    age_bin_edges,
    age_bin_to_months,
    age_bins,
    age_to_class,
    attach_cbam,
    build_backbone,
    class_to_months,
    expected_age,
    imagenet_state_dict,
    tjnet_loss,
    validate_recipe,
)
from pedx_ray.enhance import ENHANCERS, gamma_correct, sharpen
from pedx_ray.models import PedXInception

RECIPES = sorted((Path(__file__).parents[1] / "configs" / "recipes").glob("*.yaml"))
# A CPU training step of these takes several seconds even at thumbnail size.
SLOW_BACKBONES = {"inception_v3", "densenet121", "resnet50"}
NUM_FEATURES = {
    "inception_v3": 2048,
    "vgg16": 512,
    "resnet18": 512,
    "resnet50": 2048,
    "densenet121": 1024,
    "efficientnet_b0": 1280,
    "tiny_cnn": 2048,
}


def _size(backbone: str) -> int:
    return 80 if backbone == "inception_v3" else 64  # InceptionV3 needs >= 75 px


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_gives_pooled_features_of_documented_width(name):
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.randn(2, 1, _size(name), _size(name)))
    assert backbone.num_features == NUM_FEATURES[name]
    assert features.shape == (2, NUM_FEATURES[name])
    assert torch.isfinite(features).all()


def test_inception_backbone_takes_a_pedxnet_checkpoint_and_matches_its_features():
    torch.manual_seed(0)
    pretrained = PedXInception(num_classes=7).eval()
    backbone = build_backbone("inception_v3").eval()
    backbone.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 1, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), pretrained.forward_features(x))


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet34")


def test_cbam_preserves_shape_and_reweights():
    x = torch.randn(2, 32, 9, 11)
    y = CBAM(32)(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)


def test_attach_cbam_adds_one_module_per_stage_and_keeps_the_interface():
    backbone = attach_cbam(build_backbone("resnet18"))
    widths = [module.channel_mlp[0].in_channels for module in backbone.attention.values()]
    assert widths == [64, 128, 256, 512]
    assert backbone.forward_features(torch.randn(2, 1, 64, 64)).shape == (2, 512)
    with pytest.raises(ValueError, match="already"):
        attach_cbam(backbone)


# --- one training step per recipe ------------------------------------------------------------------


class _RecipeModel(nn.Module):
    """The recipe's backbone + its head kind, minimal: enough to check the pieces train together."""

    def __init__(self, recipe: dict) -> None:
        super().__init__()
        self.recipe = recipe
        self.backbone = build_backbone(recipe["backbone"])
        width = self.backbone.num_features
        head = recipe["head"]
        if head == "tjnet":
            attach_cbam(self.backbone)
            self.head = TJNetHead(width, dropout=0.0)
        elif head == "age_bins":
            self.head = nn.Linear(width, recipe["age_bins"])
        else:
            self.head = nn.Linear(width + (head == "regression_sex"), 1)

    def loss(self, images, sex, months, fracture):
        features = self.backbone.forward_features(images)
        head = self.recipe["head"]
        if head == "tjnet":
            age_logits, sex_logits = self.head(features)
            return tjnet_loss(age_logits, sex_logits, age_to_class(months), sex)
        if head == "age_bins":
            target = torch.as_tensor(age_bins(months.numpy(), self.recipe["age_bins"]))
            return nn.functional.cross_entropy(self.head(features), target)
        if head == "binary":
            return nn.functional.binary_cross_entropy_with_logits(self.head(features).squeeze(1), fracture)
        prediction = self.head(torch.cat([features, sex.view(-1, 1)], dim=1)).squeeze(1)
        return nn.functional.mse_loss(prediction, months / 100)


def _batch(size: int, n: int = 4):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, size, size, generator=generator)
    sex = torch.tensor([0.0, 1.0, 1.0, 0.0])[:n]
    months = torch.tensor([5.0, 60.0, 130.0, 220.0])[:n]
    fracture = torch.tensor([0.0, 1.0, 0.0, 1.0])[:n]
    return images, sex, months, fracture


def _marked(path: Path):
    slow = yaml.safe_load(path.read_text())["backbone"] in SLOW_BACKBONES
    return pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("path", [_marked(path) for path in RECIPES])
def test_each_recipe_backbone_and_head_train_one_step(path):
    torch.manual_seed(0)
    recipe = yaml.safe_load(path.read_text())
    model = _RecipeModel(recipe).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    before = [p.detach().clone() for p in model.head.parameters()]
    loss = model.loss(*_batch(75 if recipe["backbone"] == "inception_v3" else 32, n=2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.head.parameters(), strict=True))


def test_tjnet_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _RecipeModel({"backbone": "tiny_cnn", "head": "tjnet"}).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = _batch(32)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model.loss(*batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# --- TJ-Net loss and label codings ----------------------------------------------------------------


def test_tjnet_loss_is_plain_cross_entropy_when_batch_labels_are_balanced():
    torch.manual_seed(0)
    age_logits, sex_logits = torch.randn(4, 77), torch.randn(4)
    age_class, sex = torch.tensor([3, 10, 40, 70]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    expected = nn.functional.cross_entropy(age_logits, age_class) + 0.5 * (
        nn.functional.binary_cross_entropy_with_logits(sex_logits, sex)
    )
    torch.testing.assert_close(tjnet_loss(age_logits, sex_logits, age_class, sex, sex_weight=0.5), expected)


def test_tjnet_loss_gives_each_class_in_the_batch_equal_weight():
    torch.manual_seed(0)
    age_logits, sex_logits = torch.randn(4, 77), torch.randn(4)
    age_class, sex = torch.tensor([5, 5, 5, 60]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    ce = nn.functional.cross_entropy(age_logits, age_class, reduction="none")
    bce = nn.functional.binary_cross_entropy_with_logits(sex_logits, sex, reduction="none")
    expected = (ce[:3].mean() + ce[3]) / 2 + (bce[:3].mean() + bce[3]) / 2
    torch.testing.assert_close(tjnet_loss(age_logits, sex_logits, age_class, sex), expected)


def test_age_classes_round_trip_within_half_a_class():
    months = torch.tensor([0.0, 2.9, 3.0, 100.0, 228.0])
    classes = age_to_class(months)
    assert classes.tolist() == [0, 0, 1, 33, 76]
    assert (class_to_months(classes) - months.double()).abs().max() <= 1.5
    assert age_to_class([500.0]).item() == 76  # past the range: the last class
    with pytest.raises(ValueError, match="non-negative"):
        age_to_class([-1.0])


def test_expected_age_decodes_class_probabilities():
    confident = torch.full((1, 77), -1e4)
    confident[0, 20] = 0.0
    torch.testing.assert_close(expected_age(confident), torch.tensor([61.5], dtype=torch.float64))
    halves = torch.full((1, 77), -1e4)
    halves[0, [10, 12]] = 0.0
    torch.testing.assert_close(expected_age(halves), torch.tensor([34.5], dtype=torch.float64))


def test_age_bins_cut_0_to_228_months_into_equal_ranges():
    assert age_bin_edges(3).tolist() == [0.0, 76.0, 152.0, 228.0]
    assert age_bins([0.0, 76.0, 76.5, 151.0, 228.0], 3).tolist() == [0, 0, 1, 1, 2]
    assert age_bins(np.linspace(0, 228, 50), 10).max() == 9
    assert age_bin_to_months([0, 2], 3).tolist() == [38.0, 190.0]
    assert age_bin_to_months([4], 5).tolist() == [205.2]
    with pytest.raises(ValueError, match="outside 0-228"):
        age_bins([230.0], 5)
    with pytest.raises(ValueError, match="3, 5, 10"):
        age_bins([10.0], 4)


# --- ImageNet weight files ---------------------------------------------------------------------------


@pytest.fixture
def resnet18_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_imagenet_weights_load_and_the_summed_stem_sees_gray_as_rgb(resnet18_weights):
    state = imagenet_state_dict("resnet18", resnet18_weights)
    backbone = build_backbone("resnet18").eval()
    backbone.load_state_dict(state)  # strict: every tensor named and shaped as the backbone's
    rgb = torchvision.models.resnet18(weights=None).eval()
    rgb.load_state_dict(torch.load(resnet18_weights, weights_only=True))
    rgb.fc = nn.Identity()
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(gray), rgb(gray.expand(-1, 3, -1, -1)))


def test_imagenet_weights_for_inception_drop_the_auxiliary_head(tmp_path):
    path = tmp_path / "inception.pth"
    full = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(full.state_dict(), path)
    state = imagenet_state_dict("inception_v3", path)
    assert not any(key.startswith(("AuxLogits.", "fc.")) for key in state)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 1, 3, 3)
    build_backbone("inception_v3").load_state_dict(state)


def test_densenet_weights_with_torchvisions_old_key_names_load(tmp_path):
    path = tmp_path / "densenet121.pth"
    state = torchvision.models.densenet121(weights=None).state_dict()
    # torchvision's published densenet121-a639ec97.pth names "norm1" as "norm.1", "conv2" as "conv.2", ...
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, path)
    build_backbone("densenet121").load_state_dict(imagenet_state_dict("densenet121", path))


def test_missing_weights_file_says_where_weights_come_from(tmp_path):
    with pytest.raises(WeightsError, match="not found.*downloads nothing.*resnet50-"):
        imagenet_state_dict("resnet50", tmp_path / "absent.pth")


def test_unreadable_weights_file_is_reported(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read"):
        imagenet_state_dict("resnet18", path)


def test_weights_of_another_architecture_are_reported_with_examples(resnet18_weights):
    with pytest.raises(WeightsError, match=r"not match torchvision's resnet50: .*(missing|shape).*layer"):
        imagenet_state_dict("resnet50", resnet18_weights)
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        imagenet_state_dict("tiny_cnn", resnet18_weights)


# --- enhancement chains ------------------------------------------------------------------------------


def _radiograph(seed: int = 0) -> np.ndarray:
    """A low-contrast hand-like image: dim background, a brighter blurred 'bone' bar, mild noise."""
    rng = np.random.default_rng(seed)
    img = np.full((96, 96), 90.0)
    img[20:76, 40:56] = 130.0
    img = cv2.GaussianBlur(img, (0, 0), 2.0) + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(ENHANCERS))
def test_enhancers_are_deterministic_shape_preserving_uint8(name):
    img = _radiograph()
    out = ENHANCERS[name](img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out, ENHANCERS[name](img.copy()))
    with pytest.raises(ValueError, match="2-D uint8"):
        ENHANCERS[name](img.astype(np.float32))


@pytest.mark.parametrize("name", ["clahe", "sirati", "hamrouni"])
def test_contrast_enhancers_spread_a_narrow_histogram(name):
    img = _radiograph()
    out = ENHANCERS[name](img)
    assert np.ptp(out) > 2 * np.ptp(img)
    assert out.std() > 2 * img.std()


def test_gamma_2_5_is_monotone_and_darkens_mid_tones():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = gamma_correct(ramp, 2.5).ravel()
    assert np.all(np.diff(out.astype(int)) >= 0)
    assert out[0] == 0 and out[255] == 255 and out[128] == 46  # 255 * (128/255)^2.5


def test_sharpening_increases_laplacian_variance():
    img = np.zeros((64, 64), np.uint8)
    img[:, 32:] = 200
    soft = cv2.GaussianBlur(img, (0, 0), 3.0)
    assert cv2.Laplacian(sharpen(soft), cv2.CV_64F).var() > cv2.Laplacian(soft, cv2.CV_64F).var()


def test_hamrouni_smooths_flat_regions_but_keeps_the_edge():
    rng = np.random.default_rng(0)
    img = np.where(np.arange(64) < 32, 60, 180)[None, :].repeat(64, 0) + rng.normal(0, 6, (64, 64))
    img = np.clip(img, 0, 255).astype(np.uint8)
    out = ENHANCERS["hamrouni"](img)
    step_before = img[:, 40:].mean() - img[:, :24].mean()
    step_after = out[:, 40:].mean() - out[:, :24].mean()
    assert out[:, :24].std() / step_after < 0.5 * img[:, :24].std() / step_before


# --- recipe files ----------------------------------------------------------------------------------


def test_recipes_exist_for_every_seed_paper():
    stems = {p.stem for p in RECIPES}
    assert {"pedxnet_inception", "wouters_vgg16", "wouters_resnet18", "wouters_resnet50"} <= stems
    assert {"tjnet_cbam_resnet50", "sirati_densenet121", "hamrouni_efficientnet_b0_5bins"} <= stems
    assert "hamrouni_resnet50_10bins" in stems


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_has_only_documented_fields_with_valid_values(path):
    text = path.read_text()
    assert text.startswith("# "), "each recipe starts with a comment citing its paper"
    recipe = yaml.safe_load(text)
    assert set(recipe) <= set(RECIPE_FIELDS)
    assert {"backbone", "head", "enhance", "task"} <= set(recipe)
    validate_recipe(recipe)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimiser": "sgd"}, "unknown key 'optimiser'"),
        ({"lr": "1e-4"}, "lr: '1e-4'"),
        ({"head": "age_bins"}, "needs age_bins"),
        ({"age_bins": 4, "head": "age_bins"}, "needs age_bins"),
        ({"backbone": "tiny_cnn", "init": "imagenet:x.pth"}, "no ImageNet weights"),
        ({"init": "pedxnet:run/best"}, "PedXnet checkpoints are"),
        ({"head": "binary"}, "is for task 'fracture'"),
        ({"enhance": "sharpen"}, "enhance: 'sharpen'"),
        ({"backbone": "inception_v3", "image_size": 64}, "too small for inception_v3"),
    ],
)
def test_validate_recipe_rejects_bad_values(change, message):
    recipe = {"task": "bone_age", "backbone": "resnet50", "head": "regression_sex", "lr": 1e-4} | change
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_as_a_finetune_config(path):
    finetune = pytest.importorskip("pedx_ray.finetune")
    accepted = {field.name for field in dataclasses.fields(finetune.FinetuneConfig)}
    recipe = yaml.safe_load(path.read_text())
    if not set(recipe) <= accepted:
        pytest.skip(f"FinetuneConfig does not accept {sorted(set(recipe) - accepted)} yet")
    config = finetune.load_finetune_config(path)
    assert {key: getattr(config, key) for key in recipe} == recipe
