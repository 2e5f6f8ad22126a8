"""The view gate: a task model answers only for the views it was trained on.

A bone-age model asked about a chest radiograph still returns an age. Before a task model runs, the finest
served view model classifies the upload; if the views the task accepts (a table of 68-class views, mapped
up the taxonomy to the view model's granularity) hold less than ``min_probability`` of its probability
mass, the request is refused with ``wrong_view``. Pure functions; ``deploy.app`` wires them to HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.dataset.taxonomy import Taxonomy

# Each task's accepted views, as 68-class names (the finest labels; coarser view models accept their
# parents): bone age is read on a hand PA (RSNA, Greulich-Pyle); the fracture models on wrist/forearm.
DEFAULT_GATE_VIEWS = {
    "bone_age": ("Hand_PA",),
    "fracture": ("Wrist_AP", "Wrist_Oblique", "Forearm_Oblique"),
}


@dataclass(frozen=True)
class GateVerdict:
    """What the gate saw: the top view, its probability, and the probability of the accepted views."""

    passed: bool
    view: str
    probability: float
    accepted_probability: float
    accepted: tuple[str, ...]
    model: str

    def to_dict(self) -> dict:
        return {
            "applied": True,
            "passed": self.passed,
            "model": self.model,
            "view": self.view,
            "probability": round(self.probability, 4),
            "accepted_views": list(self.accepted),
            "accepted_probability": round(self.accepted_probability, 4),
        }


def check_gate_views(gate_views: dict, taxonomy: Taxonomy) -> dict[str, tuple[str, ...]]:
    """The table, validated: known tasks, non-empty lists of 68-class view names."""
    known = set(taxonomy.classes(68))
    checked = {}
    for task, views in gate_views.items():
        if task not in DEFAULT_GATE_VIEWS:
            raise ValueError(
                f"gate_views: unknown task {task!r}; gated tasks are {sorted(DEFAULT_GATE_VIEWS)}"
            )
        views = (views,) if isinstance(views, str) else tuple(views)
        unknown = [v for v in views if v not in known]
        if not views or unknown:
            raise ValueError(
                f"gate_views[{task}] must list 68-class view names (e.g. {DEFAULT_GATE_VIEWS[task][0]}); "
                f"not in the taxonomy: {unknown or 'an empty list'}"
            )
        checked[task] = views
    return checked


def accepted_classes(views_68: tuple[str, ...], granularity: int, taxonomy: Taxonomy) -> tuple[str, ...]:
    """The labels a ``granularity``-class view model gives the accepted 68-class views."""
    return tuple(sorted({taxonomy.coarsen(view, granularity) for view in views_68}))


def gate_verdict(
    probabilities: dict[str, float], accepted: tuple[str, ...], min_probability: float, model: str
) -> GateVerdict:
    """Pass when the accepted views together hold at least ``min_probability``."""
    view, probability = max(probabilities.items(), key=lambda item: item[1])
    mass = float(sum(probabilities.get(label, 0.0) for label in accepted))
    return GateVerdict(mass >= min_probability, view, float(probability), mass, accepted, model)
