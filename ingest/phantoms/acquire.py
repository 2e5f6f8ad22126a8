"""From projected path lengths to a processed radiograph: the X-ray tube, the patient, the detector, the LUT.

``expose`` follows the physical chain of a projection radiograph:

1. Beer-Lambert line integral: ``p = mu_w * water + mu_c * cortical + mu_t * trabecular * texture + ...``,
   with linear attenuation coefficients at the effective energy of the view's beam (``BEAMS``);
2. primary fluence ``N0 * heel(y) * field(x, y) * exp(-p)``: the anode heel effect tilts the field along the
   anode-cathode axis, the collimator shutters leave unexposed borders with a penumbra;
3. scatter: a wide low-pass of the primary, scaled by a scatter-to-primary ratio that grows with the
   water thickness (a grid removes most of it);
4. occasional patient motion (a line-spread along a random direction);
5. detector: Poisson quantum noise at the view's dose, the detector's blur (a phosphor plate blurs more
   than a CsI flat panel, and correlates the noise with it), additive electronic noise, and the shadow of
   a stationary anti-scatter grid on some DX systems;
6. log transform, then vendor-like processing: exposure recognition from the histogram inside the
   collimated field, multi-frequency equalisation and unsharp masking, and a gradation (tone) curve that
   differs between CR and DX families;
7. burned-in annotations after processing (text, dates, positioning words); the lead L/R marker is
   physical, so it is in the beam before the log.

The returned image is float32 in [0, 1], bone bright (MONOCHROME2 sense); ``dicom.stored_pixels`` stores it
as MONOCHROME1 for the sites that do so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .canvas import Scene, smooth


@dataclass(frozen=True)
class Beam:
    """Linear attenuation coefficients (1/cm) at a view family's effective energy, and its dose and scatter.

    Coefficients are mass attenuation from NIST XCOM / ICRU-44 tissues times density, at the effective
    energy of a typical paediatric technique (extremity ~50-55 kVp -> ~35 keV; skull ~65-70 kVp -> ~42 keV;
    chest / abdomen / spine ~70-80 kVp with filtration -> ~50 keV). ``quanta`` is the count per 0.5 mm pixel
    that automatic exposure control aims for behind the patient (about 1-2 uGy at the detector, after its
    quantum efficiency); ``spr`` the scatter-to-primary ratio behind 20 cm of water without a grid.
    """

    kev: float
    mu_water: float
    mu_cortical: float
    mu_trabecular: float
    mu_plaster: float
    quanta: float
    spr: float


BEAMS = {
    # water 35 keV: 0.307 cm2/g; cortical bone (1.92 g/cm3) 0.94 cm2/g; cancellous (1.18 g/cm3) ~0.55 cm2/g
    "extremity": Beam(35.0, 0.31, 1.80, 0.65, 0.80, 6000.0, 0.35),
    # 42 keV: water 0.255; cortical 0.62 cm2/g
    "head": Beam(42.0, 0.26, 1.19, 0.45, 0.60, 8000.0, 0.9),
    # 50 keV: water 0.227; cortical 0.424 cm2/g; cancellous ~0.30 cm2/g
    "trunk": Beam(50.0, 0.227, 0.81, 0.35, 0.45, 8000.0, 1.4),
}
AIR_SHARE = 0.6  # how much of the local water path a unit of "air" (lung, bowel gas) replaces
GRID_SPR = 0.25  # share of scatter a focused grid lets through
DISPLAY_FLOOR = 0.04  # where the tone curve's S part meets its toe and shoulder
# what technologists type onto images, by technique family
ANNOTATIONS = {
    "extremity": ("WT BEARING", "FLEX", "POST REDUCTION", "IN CAST", "AP", "PA", "LAT", "OBL"),
    "head": ("AP", "PA", "LAT", "SUPINE", "PORTABLE"),
    "trunk": ("PORTABLE", "SUPINE", "ERECT", "AP", "PA", "LAT", "INSP"),
}


@dataclass(frozen=True)
class Detector:
    """One system family: plate blur, electronic noise, grid, and its processing."""

    name: str
    modality: str
    blur_px: float
    electronic: float  # additive noise, in quanta
    grid_lines: float  # probability that a stationary grid leaves its line pattern
    equalise: float  # strength of the large-scale dynamic-range compression
    enhance: float  # unsharp-mask gain
    s_curve: float  # steepness of the tone curve (film-like for CR)


DETECTORS = {
    "CR": Detector("CR", "CR", 0.9, 6.0, 0.0, 0.35, 0.8, 5.0),
    "DX": Detector("DX", "DX", 0.55, 3.0, 0.35, 0.55, 0.5, 3.2),
}


def trabecular_texture(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """A cancellous pattern: band-passed noise pushed towards plates and rods, mean 1."""
    h, w = shape
    noise = rng.standard_normal((h, w), dtype=np.float32)
    fine = max(scale_px, 0.7)
    band = cv2.GaussianBlur(noise, (0, 0), fine) - cv2.GaussianBlur(noise, (0, 0), fine * 2.5)
    band /= float(band.std()) + 1e-6
    return (1.0 + 0.18 * np.tanh(1.5 * band)).astype(np.float32)


def field_mask(scene: Scene, rng: np.random.Generator, probability: float) -> np.ndarray:
    """The collimated field (1 inside, 0 behind the shutters) with a penumbra a few pixels wide."""
    h, w = scene.height, scene.width
    margins = rng.uniform(0.02, 0.1, 4) * (rng.random(4) < probability)
    tilt = math.radians(rng.uniform(-2.0, 2.0))
    x0, x1 = margins[0] * w, w - margins[1] * w
    y0, y1 = margins[2] * h, h - margins[3] * h
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) - [cx, cy]
    rot = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    corners = corners @ rot.T + [cx, cy]
    field = np.zeros((h, w), np.float32)
    cv2.fillPoly(field, [np.round(corners * 16).astype(np.int32).reshape(-1, 1, 2)], 1.0, cv2.LINE_8, 4)
    return cv2.GaussianBlur(field, (0, 0), rng.uniform(1.0, 2.5))


def lead_marker(scene: Scene, rng: np.random.Generator, letter: str, field: np.ndarray) -> None:
    """A lead letter in a plastic holder near a corner of the field: in the beam, so fully attenuating."""
    h, w = scene.height, scene.width
    size = rng.uniform(0.045, 0.07) * min(h, w)
    font_scale = size / 22.0
    thick = max(int(round(font_scale * 2.2)), 2)
    (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_DUPLEX, font_scale, thick)
    ys, xs = np.nonzero(field[::4, ::4] > 0.5)
    x_lo, x_hi = (xs.min() * 4, xs.max() * 4) if len(xs) else (0, w)
    y_lo, y_hi = (ys.min() * 4, ys.max() * 4) if len(ys) else (0, h)
    right, bottom = rng.random() < 0.5, rng.random() < 0.3
    pad = int(0.03 * min(h, w)) + thick
    x = x_hi - pad - tw if right else x_lo + pad
    y = y_hi - pad if bottom else y_lo + pad + th
    mask = np.zeros((h, w), np.uint8)
    cv2.putText(mask, letter, (int(x), int(y)), cv2.FONT_HERSHEY_DUPLEX, font_scale, 255, thick, cv2.LINE_AA)
    if rng.random() < 0.5:  # the acrylic holder around the letter attenuates a little
        cv2.rectangle(
            mask,
            (int(x - thick * 2), int(y - th - thick * 2)),
            (int(x + tw + thick * 2), int(y + thick * 2)),
            40,
            -1,
        )
        cv2.putText(
            mask, letter, (int(x), int(y)), cv2.FONT_HERSHEY_DUPLEX, font_scale, 255, thick, cv2.LINE_AA
        )
    scene.metal += mask.astype(np.float32) * (6.0 / 255.0)


def devices(scene: Scene, rng: np.random.Generator) -> None:
    """Lines, tubes and ECG leads of an inpatient: radiopaque stripes along smooth curves, metal snaps."""
    fw, fh = scene.field
    for _ in range(int(rng.integers(1, 4))):
        start = np.array([rng.uniform(-0.3, 0.3) * fw, -0.55 * fh])
        bend = rng.uniform(-0.25, 0.25, 2) * [fw, fh]
        end = np.array([rng.uniform(-0.3, 0.3) * fw, rng.uniform(0.0, 0.4) * fh])
        t = np.linspace(0, 1, 24)[:, None]
        curve = (
            (1 - t) ** 2 * start + 2 * t * (1 - t) * (start + end) / 2 + bend * 2 * t * (1 - t) + t**2 * end
        )
        radius = rng.uniform(0.15, 0.35)
        scene.tissue_path(curve, radius, 0.6)  # the plastic tube itself, faintly
        scene.metal_path(curve, radius * 0.5, 1.0)  # its radiopaque stripe
    for _ in range(int(rng.integers(0, 4))):
        c = rng.uniform(-0.4, 0.4, 2) * [fw, fh]
        scene.metal_disc(c, 0.45, 1.0)  # electrode
        scene.metal_disc(c, 0.18, 3.0)  # its snap


def burn_in_text(image: np.ndarray, rng: np.random.Generator, words: tuple[str, ...]) -> None:
    """Annotations a technologist or the modality burned into the pixels (white, after processing)."""
    h, w = image.shape
    mask = np.zeros((h, w), np.uint8)
    scale = 0.35 + 0.004 * min(h, w) * rng.uniform(0.5, 0.9) / 3
    for _ in range(int(rng.integers(1, 3))):
        text = words[int(rng.integers(len(words)))]
        if rng.random() < 0.4:
            day, month, hour, minute = (
                int(rng.integers(lo, hi)) for lo, hi in ((1, 29), (1, 13), (7, 20), (0, 60))
            )
            text = f"{day:02d}/{month:02d} {hour:02d}:{minute:02d}"
        x = int(rng.uniform(0.03, 0.6) * w)
        y = int(rng.choice([rng.uniform(0.04, 0.12), rng.uniform(0.9, 0.97)]) * h)
        cv2.putText(
            mask, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(int(scale * 2), 1), cv2.LINE_AA
        )
    np.maximum(image, mask.astype(np.float32) / 255.0 * rng.uniform(0.85, 1.0), out=image)


def tone_curve(x: np.ndarray, steepness: float) -> np.ndarray:
    """A film-like S curve from ``DISPLAY_FLOOR`` (x = 0) to 1 - ``DISPLAY_FLOOR`` (x = 1), continued by an
    exponential toe and shoulder that approach black and white without reaching them, so burned-out
    background and shutters keep their noise instead of becoming one flat value."""
    lo = 1 / (1 + math.exp(steepness * 0.5))
    scale = (1 - 2 * DISPLAY_FLOOR) / (1 - 2 * lo)
    logistic = 1 / (1 + np.exp(-steepness * (np.clip(x, 0.0, 1.0) - 0.5)))
    y = DISPLAY_FLOOR + scale * (logistic - lo)
    rate = scale * steepness * lo * (1 - lo) / DISPLAY_FLOOR  # matches the curve's slope at 0 and 1
    toe = DISPLAY_FLOOR * np.exp(rate * np.clip(x, -50.0 / rate, 0.0))
    shoulder = 1 - DISPLAY_FLOOR * np.exp(-rate * np.clip(x - 1.0, 0.0, 50.0 / rate))
    return np.where(x < 0, toe, np.where(x > 1, shoulder, y))


def expose(
    scene: Scene,
    beam: Beam,
    detector: Detector,
    *,
    marker: str | None = None,
    collimate: float = 0.75,
    grid: bool = False,
    motion: float = 0.03,
    annotate: float = 0.3,
    words: tuple[str, ...] = ANNOTATIONS["extremity"],
) -> np.ndarray:
    """The processed radiograph of ``scene`` as float32 in [0, 1], bone bright."""
    rng, h, w = scene.rng, scene.height, scene.width
    px_cm = scene.cm_per_px
    field = field_mask(scene, rng, collimate)
    if marker:
        lead_marker(scene, rng, marker, field)
    # gas replaces part of the water path; towards its outline the gas-filled organ gets thinner, like
    # the chord through a rounded lung or bowel loop
    gas = (scene.air > 0.02).astype(np.uint8)
    edge_depth = cv2.distanceTransform(gas, cv2.DIST_L2, 5) * px_cm
    air = smooth(scene.air * np.sqrt(np.clip(edge_depth / 1.2, 0.0, 1.0)), max(0.3 / px_cm, 0.8))
    water = scene.soft * (1.0 - np.clip(AIR_SHARE * air, 0.0, 0.85)) + scene.extra
    texture = trabecular_texture(rng, (h, w), 0.03 / px_cm)
    line_integral = (
        beam.mu_water * water
        + beam.mu_cortical * scene.cortical
        + beam.mu_trabecular * scene.trabecular * texture
        + beam.mu_plaster * scene.plaster * (1.0 + 0.15 * (texture - 1.0))
        + scene.metal
    )
    # anode heel effect along a random anode-cathode axis (up to ~15 % across the field)
    heel_axis = rng.choice([0, 1])
    ramp = np.linspace(-1.0, 1.0, h if heel_axis == 0 else w, dtype=np.float32)
    heel = 1.0 + rng.uniform(-0.12, 0.12) * ramp
    heel = heel[:, None] if heel_axis == 0 else heel[None, :]
    primary = heel * field * np.exp(-line_integral)
    if rng.random() < motion:
        length = int(rng.integers(3, 10))
        kernel = np.zeros((length, length), np.float32)
        cv2.line(kernel, (0, 0), (length - 1, int(rng.integers(length))), 1.0, 1)
        primary = cv2.filter2D(primary, -1, kernel / kernel.sum())
    spr = (
        beam.spr
        * (GRID_SPR if grid else 1.0)
        * (1.0 - np.exp(-smooth(water, 8.0) / 20.0))
        / (1 - math.exp(-1))
    )
    scatter = smooth(primary * spr, 4.0 / px_cm)
    # automatic exposure control: the tube output is set so the detector behind the patient's central
    # region receives the target dose, whatever the thickness (an infant's chest and a teenager's abdomen
    # come out equally exposed, with more tube output behind more tissue)
    behind = (primary + scatter)[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    target = beam.quanta * rng.uniform(0.6, 1.4) * (px_cm / 0.05) ** 2
    quanta = target / max(float(np.median(behind)), 1e-6)
    mean = (primary + scatter) * quanta
    counts = mean + np.sqrt(np.maximum(mean, 0.0)) * rng.standard_normal((h, w), dtype=np.float32)
    counts = cv2.GaussianBlur(counts, (0, 0), detector.blur_px)
    counts += detector.electronic * rng.standard_normal((h, w), dtype=np.float32)
    if grid and rng.random() < detector.grid_lines:
        freq = rng.uniform(0.28, 0.45)
        coord = np.arange(w if rng.random() < 0.5 else h, dtype=np.float32)
        lines = 1.0 - rng.uniform(0.015, 0.04) * (0.5 + 0.5 * np.cos(2 * np.pi * freq * coord))
        counts *= lines[None, :] if len(coord) == w else lines[:, None]
    signal = -np.log(np.maximum(counts, 1.0) / quanta)  # attenuation: bone high, air low
    image = process(signal, field, detector, rng)
    if rng.random() < annotate:
        burn_in_text(image, rng, words)
    return image


def process(
    signal: np.ndarray, field: np.ndarray, detector: Detector, rng: np.random.Generator
) -> np.ndarray:
    """Vendor-like image processing: exposure recognition, equalisation, edge enhancement, tone curve."""
    h, w = signal.shape
    inside = field[:: max(h // 256, 1), :: max(w // 256, 1)] > 0.9
    sample = signal[:: max(h // 256, 1), :: max(w // 256, 1)][inside]
    if sample.size < 50:
        sample = signal.ravel()
    # exposure recognition: leave out direct (unattenuated) radiation around the body, then window
    # the anatomy's own histogram
    floor, top = np.percentile(sample, [0.5, 99.5])
    anatomy = sample[sample > floor + 0.12 * (top - floor)]
    if anatomy.size >= 50:
        sample = anatomy
    lo, hi = np.percentile(sample, [rng.uniform(0.5, 3.0), rng.uniform(98.5, 99.8)])
    x = (signal - lo) / max(hi - lo, 1e-6)
    # the values of interest land mid-scale: the anatomy's median goes to a mid grey
    median = float(np.clip((np.median(sample) - lo) / max(hi - lo, 1e-6), 0.05, 0.95))
    gamma = float(np.clip(np.log(rng.uniform(0.42, 0.55)) / np.log(median), 0.4, 2.5))
    x = np.where(x > 0, np.power(np.maximum(x, 0.0), gamma), x)  # below the window: left for the toe
    large = smooth(x, 0.08 * min(h, w))
    x = x - detector.equalise * rng.uniform(0.7, 1.2) * (large - float(np.median(large)))
    fine = smooth(x, max(0.01 * min(h, w), 1.5))
    x = x + detector.enhance * rng.uniform(0.7, 1.3) * (x - fine)
    # behind the shutters only scatter reaches the plate: the log signal there is far above the window,
    # so the shutters come out near white
    image = tone_curve(x, detector.s_curve * rng.uniform(0.85, 1.15)).astype(np.float32)
    return image
