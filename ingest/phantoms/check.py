"""Realism check: do phantom radiographs have the image statistics of real ones?

``python -m ingest.phantoms.check [--studies N] [--seed S] [--pacs DIR]`` makes (or reads) a phantom PACS,
runs every instance through the project's preprocessing (``ingest.imaging.preprocess``, as training sees
it), measures each image, and compares the median over the sample with reference ranges (``REFERENCES``).
It prints one line per statistic, marks those outside their range, and exits 1 when any is.

Statistics:

- ``spectrum_beta``: exponent of the power-law fit P(f) ~ 1/f^beta of the radially averaged power spectrum
  of the preprocessed image (central crop, mid frequencies): anatomical background has beta near 3, a
  flat schematic drawing with noise is far whiter or, with hard flat fills, steeper;
- ``peak_bin_share``: the largest share of pixels in one mid grey level (16-239) of the preprocessed
  histogram; flat fills make tall single-level spikes, real anatomy a smooth histogram;
- ``grey_occupancy``: the share of mid grey levels that hold at least 0.1 % of the pixels: windowed real
  radiographs use nearly the whole grey scale, schematic drawings a few bands of it;
- ``clipped_share``: pixels at 0 or 255 after preprocessing (burned-out or collimated areas);
- ``noise_level``: standard deviation of the high-pass residual in the flattest third of the native image,
  as a share of its display range;
- ``noise_correlation``: lag-1 correlation of that residual: detector blur correlates the quantum noise of
  neighbouring pixels, so it is positive on real systems and near or below zero for white noise;
- ``edge_rise_mm``: 10-90 % rise distance across the strongest edges (cortical bone, shutters) at native
  resolution, in millimetres from PixelSpacing.

The references are data below, each with its source. Where the literature gives a number (power-law
anatomical noise, the presampled MTF of CR / DX systems) it is cited; the remaining bounds are marked as
engineering bounds: no real images were available to measure them on, so they are set where the earlier
schematic phantoms (flat geometric fills with noise) fall outside; they guard against regressing to
schematic images and do not certify realism.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom import dcmread

from ingest.imaging.preprocess import PreprocessParams, pixels_to_unit, preprocess_dataset

from .build import GROUND_TRUTH, generate


@dataclass(frozen=True)
class Reference:
    low: float
    high: float
    source: str


REFERENCES = {
    "spectrum_beta": Reference(
        2.0,
        4.0,
        "power-law anatomical background, beta ~3 (2.5-3.5) in mammograms: Burgess, Jacobson & Judy, "
        "Med Phys 28:419 (2001); same power-law form in chest radiographs: Samei, Flynn & Eyler, "
        "Radiology 213:727 (1999). Widened to 2-4 for mixed body parts",
    ),
    "peak_bin_share": Reference(
        0.0, 0.05, "engineering bound: no mid grey level above 5 % of pixels (schematic phantoms: ~6 %)"
    ),
    "grey_occupancy": Reference(
        0.8, 1.0, "engineering bound: 80 % of mid grey levels in use (schematic phantoms: ~70 %)"
    ),
    "clipped_share": Reference(0.0, 0.2, "engineering bound: at most a fifth burned out or collimated"),
    "noise_level": Reference(
        0.002, 0.04, "engineering bound: visible but not dominant quantum noise (0.2-4 % of display range)"
    ),
    "noise_correlation": Reference(
        0.05,
        0.9,
        "presampled MTF of CR / DX well below 1 at Nyquist (about 0.1-0.5): Samei, Flynn & Reimann, "
        "Med Phys 25:102 (1998), so neighbouring pixels' noise is positively correlated",
    ),
    "edge_rise_mm": Reference(
        0.1,
        1.5,
        "presampled MTF50 of clinical CR / DX ~1.5-3.5 cycles/mm (Samei, Flynn & Reimann 1998) gives a "
        "10-90 % rise of ~0.14-0.32 mm; upper bound (engineering) allows curved cortices and coarse pixels",
    ),
}


def spectrum_beta(image: np.ndarray) -> float:
    """Power-law exponent of the radially averaged power spectrum of a square crop (mid frequencies)."""
    n = min(image.shape)
    crop = image[(image.shape[0] - n) // 2 :, (image.shape[1] - n) // 2 :][:n, :n].astype(np.float64)
    crop = (crop - crop.mean()) * np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fftshift(np.fft.fft2(crop))) ** 2
    yy, xx = np.indices(power.shape) - n // 2
    radius = np.hypot(xx, yy).astype(int)
    radial = np.bincount(radius.ravel(), power.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)
    freqs = np.arange(len(radial)) / n
    band = (freqs >= 0.02) & (freqs <= 0.2) & (radial > 0)
    if band.sum() < 3:  # a blank crop has no spectrum to fit
        return float("nan")
    slope = np.polyfit(np.log(freqs[band]), np.log(radial[band]), 1)[0]
    return float(-slope)


def histogram_stats(image_u8: np.ndarray) -> tuple[float, float, float]:
    """(largest share of one mid grey level, share of mid levels in use, share at 0 or 255) of an 8-bit
    image; mid levels are 16-239, away from the burned-out background and the shutters."""
    counts = np.bincount(image_u8.ravel(), minlength=256).astype(float)
    total = counts.sum()
    mid = counts[16:240] / total
    return float(mid.max()), float((mid >= 0.001).mean()), float((counts[0] + counts[255]) / total)


def noise_stats(unit: np.ndarray) -> tuple[float, float]:
    """(residual noise level, lag-1 residual correlation) in the flattest third of an image in [0, 1]."""
    image = unit.astype(np.float32)
    residual = image - cv2.GaussianBlur(image, (0, 0), 2.0)
    gradient = cv2.GaussianBlur(np.hypot(*np.gradient(cv2.GaussianBlur(image, (0, 0), 3.0))), (0, 0), 3.0)
    inner = (image > 0.02) & (image < 0.98)
    flat = inner & (gradient <= np.percentile(gradient[inner], 33)) if inner.any() else inner
    both = flat[:, :-1] & flat[:, 1:]
    if both.sum() < 100:
        return 0.0, 0.0
    a, b = residual[:, :-1][both], residual[:, 1:][both]
    return float(a.std()), float(np.corrcoef(a, b)[0, 1])


def edge_rise_mm(unit: np.ndarray, spacing_mm: float, samples: int = 300) -> float:
    """Median 10-90 % rise distance (mm) of profiles across the strongest edges."""
    image = unit.astype(np.float32)
    gy, gx = np.gradient(cv2.GaussianBlur(image, (0, 0), 0.7))
    magnitude = np.hypot(gx, gy)
    margin = 8
    magnitude[:margin], magnitude[-margin:], magnitude[:, :margin], magnitude[:, -margin:] = 0, 0, 0, 0
    order = np.argsort(magnitude.ravel())[::-1][: samples * 20 : 20]  # strong edges, spread out
    ys, xs = np.unravel_index(order, image.shape)
    steps = np.linspace(-6.0, 6.0, 49)
    rises = []
    for y, x in zip(ys, xs, strict=True):
        g = np.array([gx[y, x], gy[y, x]])
        norm = float(np.hypot(*g))
        if norm == 0:
            continue
        u = g / norm
        px, py = (x + steps * u[0]).astype(np.float32), (y + steps * u[1]).astype(np.float32)
        profile = cv2.remap(image, px[None, :], py[None, :], cv2.INTER_LINEAR)[0]
        lo, hi = profile[:8].mean(), profile[-8:].mean()
        if hi - lo < 0.05:
            continue
        scaled = (profile - lo) / (hi - lo)
        above10 = np.argmax(scaled >= 0.1)
        above90 = np.argmax(scaled >= 0.9)
        if above90 > above10:
            rises.append((steps[above90] - steps[above10]) * spacing_mm)
    return float(np.median(rises)) if rises else float("nan")


PREPROCESS = PreprocessParams()  # the project's defaults: 512 px, 0.5-99.5 percentile window


def image_metrics(path: Path, params: PreprocessParams = PREPROCESS) -> dict[str, float]:
    """Every statistic of one DICOM file: preprocessed as training sees it, and at native resolution."""
    ds = dcmread(path)
    processed = preprocess_dataset(ds, params)
    # the padding resize_pad adds to make the image square is not part of the radiograph
    scale = params.size / max(ds.Rows, ds.Columns)
    h, w = min(params.size, round(ds.Rows * scale)), min(params.size, round(ds.Columns * scale))
    top, left = (params.size - h) // 2, (params.size - w) // 2
    content = processed[top : top + h, left : left + w]
    peak, occupancy, clipped = histogram_stats(content)
    native = pixels_to_unit(ds)
    level, correlation = noise_stats(native)
    spacing = float(ds.PixelSpacing[0]) if "PixelSpacing" in ds else 0.2
    return {
        "spectrum_beta": spectrum_beta(content / 255.0),
        "peak_bin_share": peak,
        "grey_occupancy": occupancy,
        "clipped_share": clipped,
        "noise_level": level,
        "noise_correlation": correlation,
        "edge_rise_mm": edge_rise_mm(native, spacing),
    }


def measure(pacs: Path, limit: int | None = None) -> pd.DataFrame:
    """Statistics of the instances a phantom PACS lists in its ground truth (the first ``limit``)."""
    table = pd.read_csv(pacs / GROUND_TRUTH)
    if limit is not None:
        table = table.head(limit)
    rows = [{"label_68": r.label_68, **image_metrics(pacs / r.path)} for r in table.itertuples()]
    return pd.DataFrame(rows)


def compare(metrics: pd.DataFrame) -> pd.DataFrame:
    """Median of each statistic against its reference range, with the share of images outside it."""
    out = []
    for name, ref in REFERENCES.items():
        values = metrics[name].dropna()
        median = float(values.median()) if len(values) else float("nan")
        outside = float(((values < ref.low) | (values > ref.high)).mean()) if len(values) else 1.0
        ok = ref.low <= median <= ref.high
        out.append(
            {
                "statistic": name,
                "median": median,
                "low": ref.low,
                "high": ref.high,
                "images_outside": outside,
                "ok": ok,
                "source": ref.source,
            }
        )
    return pd.DataFrame(out)


def report(result: pd.DataFrame) -> str:
    lines = [f"{'statistic':<19}{'median':>9}  {'range':<14}{'outside':>8}  verdict"]
    for r in result.itertuples():
        verdict = "ok" if r.ok else "OUT OF RANGE"
        bounds = f"{r.low:g}-{r.high:g}"
        lines.append(f"{r.statistic:<19}{r.median:>9.4f}  {bounds:<14}{r.images_outside:>7.0%}  {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.phantoms.check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--pacs", type=Path, help="an existing phantom PACS directory (default: make one)")
    parser.add_argument("--studies", type=int, default=24, help="studies to make when --pacs is absent")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms made")
    parser.add_argument("--limit", type=int, help="measure at most this many instances")
    parser.add_argument("--sources", action="store_true", help="also print each reference's source")
    args = parser.parse_args(argv)
    if args.studies < 1:
        parser.error(f"--studies must be at least 1, got {args.studies}")
    with tempfile.TemporaryDirectory(prefix="phantom-check-") as scratch:
        pacs = args.pacs
        if pacs is None:
            pacs = Path(scratch)
            generate(pacs, studies=args.studies, seed=args.seed, workers=1)
        elif not (pacs / GROUND_TRUTH).is_file():
            parser.error(f"{pacs} has no {GROUND_TRUTH}; make one with python -m ingest.phantoms --out DIR")
        metrics = measure(pacs, args.limit)
    result = compare(metrics)
    print(f"{len(metrics)} images, {metrics['label_68'].nunique()} views")
    print(report(result))
    if args.sources:
        for r in result.itertuples():
            print(f"  {r.statistic}: {r.source}")
    outside = result[~result["ok"]]
    if len(outside):
        print(f"outside the reference range: {', '.join(outside['statistic'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
