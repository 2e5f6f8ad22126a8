"""pedx_ray.explain: Grad-CAM and mean maps with known answers, overlays, t-SNE, the CLI."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from factories import make_instance
from matplotlib.colors import to_rgb
from torch import nn

from pedx_ray import explain, plots
from pedx_ray.config import PretrainConfig
from pedx_ray.models import TinyCNN, save_checkpoint


class TwoDetectors(nn.Module):
    """Channel 0 fires on bright pixels, channel 1 on dark (negative) ones; logit k reads channel k only."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU())
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.detect[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.eye(2))

    def forward(self, x):
        return self.fc(self.detect(x).mean(dim=(2, 3)))


def two_patch_image() -> torch.Tensor:
    image = torch.zeros(1, 1, 32, 32)
    image[..., 2:10, 2:10] = 1.0  # bright patch, top-left
    image[..., 22:30, 22:30] = -1.0  # dark patch, bottom-right
    return image


def test_gradcam_highlights_the_region_the_explained_logit_uses():
    model, image = TwoDetectors(), two_patch_image()
    bright = explain.gradcam(model, image, "detect", target_class=0)[0]
    dark = explain.gradcam(model, image, "detect", target_class=1)[0]
    assert bright.shape == (32, 32) and bright.max() == pytest.approx(1.0)
    assert bright[2:10, 2:10].min() == pytest.approx(1.0) and bright[22:30, 22:30].max() == 0
    assert dark[22:30, 22:30].min() == pytest.approx(1.0) and dark[2:10, 2:10].max() == 0


def test_mean_map_is_sigmoid_of_channel_mean():
    maps = explain.mean_activation_map(TwoDetectors(), two_patch_image(), "detect")[0]
    # channel mean is |x| / 2: 0.5 in both patches, 0 elsewhere
    assert maps[5, 5] == pytest.approx(1 / (1 + np.exp(-0.5)))
    assert maps[26, 26] == pytest.approx(1 / (1 + np.exp(-0.5)))
    assert maps[16, 0] == pytest.approx(0.5)


def test_maps_on_tiny_cnn_shapes_ranges_and_default_layer():
    model = TinyCNN(num_classes=7)
    assert explain.default_target_layer(model) == "features.12"
    images = torch.rand(2, 1, 64, 64)
    cam = explain.gradcam(model, images)
    mean = explain.mean_activation_map(model, images)
    assert cam.shape == mean.shape == (2, 64, 64)
    assert cam.min() >= 0 and cam.max() <= 1
    assert mean.min() > 0 and mean.max() < 1
    with pytest.raises(explain.ExplainError, match="no module 'Mixed_7c'"):
        explain.gradcam(model, images, "Mixed_7c")


def test_inception_default_layer_is_mixed_7c():
    from pedx_ray.models import PedXInception

    assert explain.default_target_layer(PedXInception(num_classes=7)) == "Mixed_7c"


def test_overlay_blends_heat_into_the_radiograph():
    image = np.full((40, 40), 100, np.uint8)
    heat = np.zeros((10, 10))
    heat[:5, :5] = 1.0  # resized up to the image
    blended = explain.overlay(image, heat, alpha=0.5)
    assert blended.shape == (40, 40, 3) and blended.dtype == np.uint8
    hot, cold = blended[5, 5], blended[35, 35]
    assert hot[2] > hot[0] and cold[0] > cold[2]  # JET: 1 → red, 0 → blue (BGR)


def test_tsne_keeps_separated_clusters_apart_and_repeats_per_seed(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 50))
    labels = np.repeat([0, 1, 2], 20)
    features = centres[labels] + rng.normal(0, 1, (60, 50))
    embedding = explain.tsne(features, perplexity=10, seed=3)
    assert embedding.shape == (60, 2) and np.isfinite(embedding).all()
    distance = np.linalg.norm(embedding[:, None] - embedding[None], axis=2)
    np.fill_diagonal(distance, np.inf)
    assert (labels[distance.argmin(axis=1)] == labels).mean() == 1.0
    assert np.array_equal(explain.tsne(features, perplexity=10, seed=3), embedding)

    out = plots.save_png(explain.tsne_plot(embedding, [f"class{i}" for i in labels]), tmp_path / "tsne.png")
    picture = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert picture.shape == (640, 840, 3)
    for colour in ("tab:blue", "tab:orange", "tab:green"):  # one colour per class
        bgr = np.array([round(255 * c) for c in reversed(to_rgb(colour))])
        assert (np.abs(picture.astype(int) - bgr).max(axis=2) <= 8).sum() > 100


def test_tsne_lowers_a_perplexity_too_large_for_few_points():
    features = np.random.default_rng(0).normal(size=(8, 4))
    assert explain.tsne(features, perplexity=30).shape == (8, 2)
    with pytest.raises(explain.ExplainError, match="n ≥ 5"):
        explain.tsne(features[:4])


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = PretrainConfig(arch="tiny_cnn", image_size=64, classes=tuple(f"c{i}" for i in range(7)))
    return save_checkpoint(tmp_path / "ckpt", TinyCNN(num_classes=7), config, {})


@pytest.mark.parametrize("method", explain.METHODS)
def test_cli_writes_overlay_for_png_and_dicom(tiny_checkpoint, tmp_path, method):
    png = tmp_path / "hand.png"
    cv2.imwrite(str(png), (np.random.default_rng(0).random((80, 50)) * 255).astype(np.uint8))
    dicom = make_instance(tmp_path / "hand.dcm", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1")
    for source in (png, dicom):
        out = tmp_path / f"{source.suffix[1:]}-{method}.png"
        args = ["--checkpoint", str(tiny_checkpoint), "--image", str(source), "--out", str(out)]
        assert explain.main([*args, "--method", method]) == 0
        assert cv2.imread(str(out)).shape == (64, 64, 3)


def test_cli_plots_tsne_of_a_shard_split(tiny_checkpoint, tmp_path, capsys):
    from test_pretrain import write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", per_class={"val": 2}, size=64)  # 14 samples
    out = tmp_path / "tsne.png"
    args = ["--checkpoint", str(tiny_checkpoint), "--tsne", str(shards), "--out", str(out)]
    assert explain.main(args) == 0  # the default perplexity 30 is lowered for 14 points
    assert f"wrote {out}" in capsys.readouterr().out
    assert cv2.imread(str(out)).shape == (640, 840, 3)


def test_cli_reports_missing_image(tiny_checkpoint, tmp_path, capsys):
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--image",
        str(tmp_path / "nope.png"),
        "--out",
        str(tmp_path / "o.png"),
    ]
    assert explain.main(args) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
