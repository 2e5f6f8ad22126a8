"""Render one registered view for one child (maturity, size, side, optional fracture) to a [0, 1] image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import views  # noqa: F401  (registers the 68 views)
from .canvas import Fracture, Scene
from .maturity import maturity
from .spec import REGISTRY

FRACTURE_VIEWS = tuple(sorted(label for label, spec in REGISTRY.items() if spec.fracture_sites))


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # float32 in [0, 1], bone bright
    fracture: bool  # a fracture line was actually cut into a visible bone
    pixel_spacing_mm: float


def render_view(
    label_68: str,
    rng: np.random.Generator,
    *,
    age_months: float,
    sex: str,
    bone_age_months: float | None = None,
    laterality: str = "L",
    fracture: bool = False,
    long_side_px: int = 800,
) -> Rendered:
    """Draw ``label_68`` for a child of this age and sex; ``bone_age_months`` defaults to the age."""
    if label_68 not in REGISTRY:
        raise KeyError(
            f"no phantom drawing for view {label_68!r}; known views: {', '.join(sorted(REGISTRY))}"
        )
    spec = REGISTRY[label_68]
    if fracture and not spec.fracture_sites:
        raise ValueError(f"view {label_68!r} cannot carry a fracture; use one of {', '.join(FRACTURE_VIEWS)}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    m = maturity(age_months if bone_age_months is None else bone_age_months, sex)
    cut = None
    if fracture:
        tag = sorted(spec.fracture_sites)[int(rng.integers(len(spec.fracture_sites)))]
        lo, hi = spec.fracture_sites[tag]
        cut = Fracture(
            tag,
            float(rng.uniform(lo, hi)),
            float(rng.uniform(-35, 35)),
            float(rng.uniform(0.06, 0.14)),
            bool(rng.random() < 0.3),
        )
    scene = Scene(
        rng,
        spec.field_for(m),
        m,
        mirror=spec.paired and laterality == "R",
        long_side_px=long_side_px,
        rotate_deg=spec.rotate_deg,
        fracture=cut,
    )
    spec.draw(scene)
    image = scene.expose(
        mu_soft=spec.mu_soft,
        round_units=spec.round_units,
        air_blur_units=spec.air_blur_units,
        photons=spec.photons,
        marker=laterality,
    )
    return Rendered(image, scene.fracture_drawn, 10.0 / scene.scale)
