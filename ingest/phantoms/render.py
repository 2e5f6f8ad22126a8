"""Render one registered view for one child (maturity, size, side, fracture, cast) to a [0, 1] image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import views  # noqa: F401  (registers the 68 views)
from .acquire import ANNOTATIONS, BEAMS, DETECTORS, devices, expose
from .canvas import Fracture, Scene
from .frame import Frame
from .maturity import maturity
from .spec import REGISTRY

FRACTURE_VIEWS = tuple(sorted(label for label, spec in REGISTRY.items() if spec.fracture_sites))


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # float32 in [0, 1], bone bright
    fracture: bool  # a fracture was actually drawn into a visible bone
    pixel_spacing_mm: float
    fracture_kind: str = ""
    cast: bool = False
    fracture_severity: float | None = None  # 0 (a faint buckle) .. 1 (an obvious break); None: no fracture


def body_size(age_months: float) -> float:
    """Trunk and head size relative to the adult template: ~0.45 at birth, 1 at 18 years."""
    years = age_months / 12.0
    return float(min(0.45 + 0.55 * (1.0 - np.exp(-years / 6.5)) / (1.0 - np.exp(-18.0 / 6.5)), 1.0))


def draw_fracture(spec, rng: np.random.Generator) -> Fracture:
    """Which bone, where, which kind and how obvious: from faint buckles to displaced fractures."""
    tag = sorted(spec.fracture_sites)[int(rng.integers(len(spec.fracture_sites)))]
    lo, hi, kinds = spec.fracture_sites[tag]
    kind = kinds[int(rng.integers(len(kinds)))]
    tilt = (
        float(rng.uniform(-20, 20))
        if kind != "salter_harris_2"
        else float(rng.choice([-1, 1]) * rng.uniform(45, 65))
    )
    return Fracture(
        tag,
        float(rng.uniform(lo, hi)),
        tilt,
        kind,
        float(rng.beta(1.3, 1.6)),  # many subtle, some obvious
        float(rng.choice([-1.0, 1.0])),
    )


def render_view(
    label_68: str,
    rng: np.random.Generator,
    *,
    age_months: float,
    sex: str,
    bone_age_months: float | None = None,
    laterality: str = "L",
    fracture: bool = False,
    cast: bool = False,
    modality: str = "DX",
    long_side_px: int = 800,
) -> Rendered:
    """Draw ``label_68`` for a child of this age and sex; ``bone_age_months`` defaults to the age.

    ``cast`` puts a plaster cast on a castable view (a follow-up of a fracture); ``modality`` picks the
    detector family and its processing (``CR`` or ``DX``).
    """
    if label_68 not in REGISTRY:
        raise KeyError(
            f"no phantom drawing for view {label_68!r}; known views: {', '.join(sorted(REGISTRY))}"
        )
    spec = REGISTRY[label_68]
    if fracture and not spec.fracture_sites:
        raise ValueError(f"view {label_68!r} cannot carry a fracture; use one of {', '.join(FRACTURE_VIEWS)}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    if modality not in DETECTORS:
        raise ValueError(f"modality must be one of {', '.join(DETECTORS)}, got {modality!r}")
    m = maturity(age_months if bone_age_months is None else bone_age_months, sex)
    # the fracture comes from its own stream, so the same child with and without it differs only there
    fracture_rng = np.random.default_rng(int(rng.integers(1 << 62)))
    cut = draw_fracture(spec, fracture_rng) if fracture else None
    scene = Scene(
        rng,
        spec.field_for(m),
        m,
        mirror=spec.paired and laterality == "R",
        long_side_px=long_side_px,
        rotate_deg=spec.rotate_deg,
        fracture=cut,
        depth_scale=1.0 if spec.sized else body_size(age_months),
        cast=cast and spec.castable,
    )
    # positioning: the part is never quite square to the beam; a few degrees of rotation about the
    # vertical axis foreshorten it across (cos 25 degrees ~ 0.9)
    turn = float(rng.uniform(0.9, 1.0))
    spec.draw(Frame(scene, squeeze=turn))
    if spec.devices and rng.random() < spec.devices:
        devices(scene, rng)
    image = expose(
        scene,
        BEAMS[spec.beam],
        DETECTORS[modality],
        marker=laterality,
        grid=spec.grid,
        words=ANNOTATIONS[spec.beam],
    )
    drawn = cut if cut is not None and scene.fracture_drawn else None
    return Rendered(
        image,
        scene.fracture_drawn,
        10.0 * scene.cm_per_px,
        drawn.kind if drawn else "",
        scene.cast,
        drawn.severity if drawn else None,
    )
