"""The realism check: its statistics measure what they claim, and phantoms pass it end to end."""

from __future__ import annotations

import cv2
import numpy as np

from ingest.phantoms import check


def power_law_field(beta: float, n: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n)))
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) * f ** (-beta / 2)
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.min()) / (field.max() - field.min())


def test_spectrum_beta_recovers_a_known_power_law():
    for beta in (2.0, 3.0):
        assert abs(check.spectrum_beta(power_law_field(beta)) - beta) < 0.4
    white = np.random.default_rng(1).random((256, 256))
    assert check.spectrum_beta(white) < 0.5  # white noise is far from anatomical background


def test_histogram_stats_flag_flat_fills_and_accept_smooth_anatomy():
    rng = np.random.default_rng(2)
    schematic = np.full((256, 256), 40, np.uint8)
    cv2.rectangle(schematic, (50, 50), (200, 200), 180, -1)
    schematic = np.clip(schematic + rng.normal(0, 2, schematic.shape), 0, 255).astype(np.uint8)
    peak, occupancy, _ = check.histogram_stats(schematic)
    ref_peak, ref_occ = check.REFERENCES["peak_bin_share"], check.REFERENCES["grey_occupancy"]
    assert peak > ref_peak.high and occupancy < ref_occ.low
    field = power_law_field(3.0)
    lo, hi = np.percentile(field, [0.5, 99.5])  # windowed as the preprocessing does
    smooth = (np.clip((field - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    peak, occupancy, _ = check.histogram_stats(smooth)
    assert peak <= ref_peak.high and occupancy >= ref_occ.low


def test_noise_correlation_tells_detector_blur_from_white_noise():
    rng = np.random.default_rng(3)
    white = 0.5 + 0.01 * rng.standard_normal((200, 200)).astype(np.float32)
    blurred = 0.5 + cv2.GaussianBlur(0.02 * rng.standard_normal((200, 200)).astype(np.float32), (0, 0), 0.8)
    level, white_corr = check.noise_stats(white)
    assert 0.005 < level < 0.015 and white_corr < check.REFERENCES["noise_correlation"].low
    assert check.noise_stats(blurred)[1] > check.REFERENCES["noise_correlation"].low


def test_edge_rise_measures_blur_in_millimetres():
    step = np.zeros((120, 120), np.float32)
    step[:, 60:] = 1.0
    sharp, soft = check.edge_rise_mm(step, 0.2), check.edge_rise_mm(cv2.GaussianBlur(step, (0, 0), 3.0), 0.2)
    assert sharp < 0.5 and soft > 3 * sharp


def test_phantoms_pass_the_check(capsys):
    assert check.main(["--studies", "8", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    assert "spectrum_beta" in out and "OUT OF RANGE" not in out
