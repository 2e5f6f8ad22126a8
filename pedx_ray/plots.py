"""Plot figures and their PNG files, shared by evaluation, explanation and the sweep report.

matplotlib's object API on the Agg canvas: no pyplot, so no global figure registry and no display;
a figure is freed when its last reference goes. Every plot is a fixed size in pixels
(``size`` inches × ``DPI``) with a constrained layout, so titles, labels and legends stay inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ingest import storage

DPI = 100
SIZE = (6.4, 5.6)  # inches: 640 × 560 px at DPI


def new_figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = SIZE) -> tuple[Figure, Axes]:
    """A figure with one titled, labelled, gridded axes, drawn by the Agg canvas."""
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def colours(n: int) -> list:
    """``n`` distinct colours: tab10 up to ten, tab20 up to twenty, then tab20 repeating."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def save_png(figure: Figure, path: str | os.PathLike) -> Path | str:
    """Render ``figure`` to ``path`` (a file or an object-store URI, ingest.storage) atomically: a
    temporary PNG, decoded to check its size, then renamed over or uploaded to ``path``."""
    path = storage.join(path)
    if not storage.is_uri(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    expected = tuple(round(v) for v in figure.get_size_inches() * DPI)
    with storage.replacing(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
        image = cv2.imread(str(tmp), cv2.IMREAD_UNCHANGED)
        if image is None or (image.shape[1], image.shape[0]) != expected:
            raise OSError(f"{tmp} did not read back as a {expected[0]}×{expected[1]} PNG")
    return path
