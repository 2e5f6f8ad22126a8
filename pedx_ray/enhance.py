"""Image enhancement chains of the seed papers, as data: ``ENHANCERS[name](uint8 image) -> uint8 image``.

Each function takes a 2-D uint8 radiograph (the output of `ingest.imaging.preprocess`, bone bright) and
returns a new uint8 image of the same shape. All are deterministic (no random state), so an enhancement
can be applied once when the data is prepared or on the fly in a loader with identical results.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

CLAHE_CLIP = 2.0
CLAHE_TILES = 8
SIRATI_GAMMA = 2.5
# Sharpening strength: out = blurred - k * Laplacian(blurred); 1.0 is the classic unit-gain sharpen.
LAPLACIAN_WEIGHT = 1.0
# Bilateral filter: a 9-px neighbourhood smooths noise while intensity differences above ~75 grey
# levels (bone edges) are kept; OpenCV's documented "strong but edge-preserving" setting.
BILATERAL_DIAMETER = 9
BILATERAL_SIGMA = 75.0
# Linear stretch maps these percentiles to 0 and 255, so a few saturated pixels (labels, collimator
# edges) do not pin the range the way a plain min-max stretch would.
STRETCH_PERCENTILES = (1.0, 99.0)


def _check(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2:
        described = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img)
        raise ValueError(
            f"enhancers take a 2-D uint8 grayscale image, got {described}; "
            "preprocess the radiograph first (ingest.imaging.preprocess gives uint8 (size, size))"
        )
    return img


def none(img: np.ndarray) -> np.ndarray:
    return _check(img).copy()


def clahe(img: np.ndarray, clip: float = CLAHE_CLIP, tiles: int = CLAHE_TILES) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (the PedXnet downstream default)."""
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(_check(img))


def gamma_correct(img: np.ndarray, gamma: float) -> np.ndarray:
    """Power law ``255 * (x / 255) ** gamma``: gamma > 1 darkens mid-tones (soft tissue), not bone."""
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return cv2.LUT(_check(img), lut)


def sharpen(img: np.ndarray, weight: float = LAPLACIAN_WEIGHT) -> np.ndarray:
    """Gaussian blur (suppresses noise the Laplacian would amplify), then subtract the Laplacian."""
    blurred = cv2.GaussianBlur(_check(img), (3, 3), 0).astype(np.float32)
    edges = cv2.Laplacian(blurred, cv2.CV_32F, ksize=3)
    return np.clip(np.rint(blurred - weight * edges), 0, 255).astype(np.uint8)


def sirati(img: np.ndarray) -> np.ndarray:
    """Sirati-Amsheh et al.: histogram equalisation -> Gaussian + Laplacian sharpening -> gamma 2.5."""
    return gamma_correct(sharpen(cv2.equalizeHist(_check(img))), SIRATI_GAMMA)


def linear_stretch(img: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Map the low/high percentiles to 0/255 linearly (clipping outside); a flat image is returned as is."""
    low, high = np.percentile(_check(img), percentiles)
    if high <= low:
        return img.copy()
    stretched = (img.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def hamrouni(img: np.ndarray) -> np.ndarray:
    """Hamrouni & Hassen: bilateral filter (edge-preserving denoising) + contrast enhancement.

    The contrast step here is a 1-99 percentile linear stretch: global, so relative bone densities
    across the hand are kept (CLAHE, which the "clahe" enhancer offers, equalises them locally).
    """
    smoothed = cv2.bilateralFilter(_check(img), BILATERAL_DIAMETER, BILATERAL_SIGMA, BILATERAL_SIGMA)
    return linear_stretch(smoothed)


ENHANCERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": none,
    "clahe": clahe,
    "sirati": sirati,
    "hamrouni": hamrouni,
}
