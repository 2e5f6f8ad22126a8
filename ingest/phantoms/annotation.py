"""Burned-in text: the patient's name, IDs and study date drawn into the pixels, in one image corner.

Real radiographs carry such text when a modality or a film digitiser prints it onto the image; the
de-identification stage must find it. Phantoms drawn with ``burned_in_text=True`` carry it at a known
box (recorded in the ground truth as ``text_box``), so a text detector can be measured against them.
The corner and the words come from their own random stream, so the image under the text is the same
pixels as the phantom drawn without it.
"""

from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
TEXT_HEIGHT = 0.022  # of the image's long side, about what modalities print
MARGIN = 0.03


def burn_in_text(pixels: np.ndarray, lines: list[str], corner: str, value: int) -> tuple[int, int, int, int]:
    """Draw ``lines`` into ``pixels`` (in place) at ``corner`` with stored value ``value`` (white on
    the display); returns the text's box ``(x0, y0, x1, y1)``, end-exclusive."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")
    rows, cols = pixels.shape
    long_side = max(rows, cols)
    scale = TEXT_HEIGHT * long_side / cv2.getTextSize("Ag", FONT, 1.0, 1)[0][1]
    thickness = max(1, round(scale * 1.5))
    sizes = [cv2.getTextSize(line, FONT, scale, thickness) for line in lines]
    line_height = max(h + base for (_, h), base in sizes) + thickness
    width = max(w for (w, _), _ in sizes) + thickness
    height = line_height * len(lines)
    margin = round(MARGIN * long_side)
    x0 = margin if corner.endswith("left") else cols - margin - width
    y0 = margin if corner.startswith("top") else rows - margin - height
    x0, y0 = max(0, x0), max(0, y0)
    canvas = np.zeros((rows, cols), np.uint8)
    for i, ((_, h), _) in enumerate(sizes):
        baseline = y0 + i * line_height + h
        cv2.putText(canvas, lines[i], (x0, baseline), FONT, scale, 255, thickness, cv2.LINE_AA)
    drawn = canvas > 127
    pixels[drawn] = value
    ys, xs = np.nonzero(drawn)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def annotation_lines(
    rng: np.random.Generator, *, name: str, patient_id: str, accession: str, date: str
) -> list[str]:
    """What a modality prints: some of name, ID, accession and date, in a random order of lines."""
    lines = [
        name.replace("^", " "),
        f"ID {patient_id}",
        f"ACC {accession}",
        f"{date[:4]}-{date[4:6]}-{date[6:]}",
    ]
    keep = sorted(rng.choice(len(lines), size=int(rng.integers(2, len(lines) + 1)), replace=False))
    return [lines[i] for i in keep]
