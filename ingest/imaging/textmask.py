"""Burned-in text: a classical detector (OpenCV morphology, no learned model) and masking.

Text that a modality prints onto a radiograph is thin strokes at or near full white, packed in short
horizontal runs; anatomy is large smooth regions and long edges. The detector:

1. keeps *ink*: pixels a white top-hat finds brighter than their surroundings (a little brighter is
   enough for saturated pixels, so text on a bright collimated field counts), without connected pieces
   taller than a text line (bone outlines, field edges);
2. counts, in a window about a line high and a few glyphs wide, how often a row enters ink: glyphs make
   a stroke start every few pixels, a bone edge one now and then; where the rate is a text line's and
   enough of the window is bright ink, the ink belongs to text;
3. closes the text ink over the window and returns each region's box.

``mask_text`` sets each box, grown by a line height across and a third of one down (the glyphs at
a line's ends that the window misses), to black: a box, not the strokes, so the
words cannot be read back from the mask's shape. Dark text on a bright field is found the same way
on the inverted image (``polarity="dark"`` or ``"both"``). Images are searched scaled to a 512-pixel
long side, and the boxes scaled back. The thresholds were set on phantoms with
burned-in text (seed 7) and are measured on others in ``bench/text_mask.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

POLARITIES = ("bright", "dark", "both")
DETECT_SIDE = 512  # the long side images are searched at (the shards' default image size)
# Sizes are fractions of the long side.
STROKE = 1 / 80  # top-hat width: wider than a glyph's stroke, narrower than a bone
TOPHAT_MIN, GRAY_MIN = 50, 150  # ink: this much brighter than its surroundings, this bright
TOPHAT_MIN_SATURATED = 15  # ... or only this much brighter when (nearly) saturated
LINE_HEIGHT = (0.008, 0.05)  # a text line's height range
WINDOW = (0.04, 0.012)  # width and height of the window the stroke starts are counted in
START_RATE = 0.14  # stroke starts per pixel in the window, at a 512-pixel long side
BRIGHT_RATE = 0.15  # share of the window that is bright ink
INK_GRAY = 220  # bright ink: printed text is at or near full white
GROW = (1.0, 0.8)  # masked margin across and down, as a share of a box's height


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    low, high = float(image.min()), float(image.max())
    scaled = (image.astype(np.float32) - low) * (255.0 / max(high - low, 1e-6))
    return scaled.astype(np.uint8)


def _text_boxes(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)``, end-exclusive, of bright text in a uint8 image."""
    side = max(gray.shape)
    stroke = max(3, round(side * STROKE)) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (stroke, stroke))
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)
    ink = ((tophat >= TOPHAT_MIN) & (gray >= GRAY_MIN)) | ((tophat >= TOPHAT_MIN_SATURATED) & (gray >= 245))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    small = (stats[:, cv2.CC_STAT_HEIGHT] <= side * LINE_HEIGHT[1]) & (
        stats[:, cv2.CC_STAT_WIDTH] <= side * 0.3
    )
    small[0] = False  # the background label
    ink = small[labels]
    starts = np.zeros(gray.shape, np.float32)
    starts[:, 1:] = ink[:, 1:] & ~ink[:, :-1]
    bright = (ink & (gray >= INK_GRAY)).astype(np.float32)
    window = (max(3, round(side * WINDOW[0])), max(3, round(side * WINDOW[1])))
    dense = (cv2.blur(starts, window) >= START_RATE * 512 / side) & (cv2.blur(bright, window) >= BRIGHT_RATE)
    half = cv2.getStructuringElement(cv2.MORPH_RECT, (window[0] // 2, window[1] // 2))
    text = cv2.dilate(dense.astype(np.uint8), half) & ink.astype(np.uint8)
    text = cv2.morphologyEx(text, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, window))
    count, _, stats, _ = cv2.connectedComponentsWithStats(text, connectivity=8)
    boxes = []
    for x, y, w, h, _ in stats[1:count]:
        if h >= side * LINE_HEIGHT[0] and w >= 2 * side * LINE_HEIGHT[0]:
            boxes.append((int(x), int(y), int(x + w), int(y + h)))
    return boxes


def detect_text(image: np.ndarray, polarity: str = "bright") -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` of text in a 2-D grayscale image (any integer or float dtype, any
    size), in the image's coordinates. The search runs on the image scaled to ``DETECT_SIDE``, the
    size the thresholds were set at."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    gray = _to_uint8(image)
    rows, cols = gray.shape
    scale = DETECT_SIDE / max(rows, cols)
    if scale != 1:
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    boxes = []
    if polarity in ("bright", "both"):
        boxes += _text_boxes(gray)
    if polarity in ("dark", "both"):
        boxes += _text_boxes(255 - gray)
    return [
        (int(x0 / scale), int(y0 / scale), min(cols, math.ceil(x1 / scale)), min(rows, math.ceil(y1 / scale)))
        for x0, y0, x1, y1 in boxes
    ]


def mask_text(image: np.ndarray, polarity: str = "bright", fill: int | float = 0) -> tuple[np.ndarray, int]:
    """A copy of ``image`` with every detected text box (padded) set to ``fill``, and the number of
    boxes."""
    boxes = detect_text(image, polarity)
    out = image.copy()
    for x0, y0, x1, y1 in grow_boxes(boxes, image.shape):
        out[y0:y1, x0:x1] = fill
    return out, len(boxes)


def grow_boxes(boxes, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Boxes padded by a pixel or two and a share of their height (glyphs at a line's ends that
    the window missed), clipped to the image."""
    rows, cols = shape
    pad = max(1, round(max(shape) / 256))
    grown = []
    for x0, y0, x1, y1 in boxes:
        across, down = pad + round(GROW[0] * (y1 - y0)), pad + round(GROW[1] * (y1 - y0))
        grown.append((max(0, x0 - across), max(0, y0 - down), min(cols, x1 + across), min(rows, y1 + down)))
    return grown
