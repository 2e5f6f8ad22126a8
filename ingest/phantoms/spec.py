"""The registry of drawable views: one ``ViewSpec`` per 68-class label, filled by the view modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .canvas import Scene
from .maturity import Maturity

Field = tuple[float, float] | Callable[[Maturity], tuple[float, float]]
# fracture site: bone tag -> (first, last position along the bone, kinds that occur there)
FractureSites = dict[str, tuple[float, float, tuple[str, ...]]]


@dataclass(frozen=True)
class ViewSpec:
    """How to draw and expose one view.

    ``field`` is the collimated field (width, height) in template centimetres, or a function of maturity for
    views that collimate to the child's size (the hand-and-arm family: their drawings are already in the
    child's centimetres). Fixed fields are drawn on an adult-proportioned template that is scaled to the
    child's body size. ``beam`` names the technique family in ``acquire.BEAMS``; ``grid`` says whether the
    table / wall stand uses an anti-scatter grid; ``devices`` is how often an inpatient's lines, tubes and
    ECG leads are in the picture. ``fracture_sites`` maps a bone tag to where along it (0 = the end the
    drawing starts from) a fracture may be and which kinds.
    """

    label_68: str
    draw: Callable[[Scene], None]
    field: Field
    paired: bool = True
    beam: str = "extremity"
    grid: bool = False
    devices: float = 0.0
    rotate_deg: float = 4.0
    fracture_sites: FractureSites = field(default_factory=dict)
    castable: bool = False

    @property
    def sized(self) -> bool:
        return callable(self.field)

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
