"""The registry of drawable views: one ``ViewSpec`` per 68-class label, filled by the view modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .canvas import Scene
from .maturity import Maturity

Field = tuple[float, float] | Callable[[Maturity], tuple[float, float]]


@dataclass(frozen=True)
class ViewSpec:
    """How to draw one view.

    ``field`` is the collimated field (width, height) in scene centimetres, or a function of maturity for
    views that collimate to the child's size (the hand-and-arm family). ``fracture_sites`` maps a bone tag
    to the range of positions along the bone (0 = the end the drawing starts from) where a fracture line
    may be cut.
    """

    label_68: str
    draw: Callable[[Scene], None]
    field: Field
    paired: bool = True
    mu_soft: float = 0.6
    round_units: float = 1.5
    air_blur_units: float = 0.4
    photons: float = 2500.0
    rotate_deg: float = 4.0
    fracture_sites: dict[str, tuple[float, float]] = field(default_factory=dict)

    def field_for(self, m: Maturity) -> tuple[float, float]:
        return self.field(m) if callable(self.field) else self.field


REGISTRY: dict[str, ViewSpec] = {}


def view(
    label_68: str, field: Field, **options
) -> Callable[[Callable[[Scene], None]], Callable[[Scene], None]]:
    """Register the decorated drawing function as the renderer of ``label_68``."""

    def register(draw: Callable[[Scene], None]) -> Callable[[Scene], None]:
        if label_68 in REGISTRY:
            raise ValueError(f"view {label_68!r} is registered twice")
        REGISTRY[label_68] = ViewSpec(label_68, draw, field, **options)
        return draw

    return register
