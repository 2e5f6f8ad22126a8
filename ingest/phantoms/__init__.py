"""Phantom PACS: procedurally drawn pediatric radiographs as DICOM, for all 68 views, with known ground truth.

``generate`` writes the mixed view set a demo PACS serves; ``generate_task_set`` writes the bone-age (hand PA)
or fracture (wrist / forearm / elbow / ankle) fine-tuning sets; ``render_view`` draws one image without DICOM.
"""

from .build import COLUMNS, GROUND_TRUTH, SITE_CODES, generate, generate_task_set
from .maturity import maturity
from .render import FRACTURE_VIEWS, Rendered, render_view
from .spec import REGISTRY

__all__ = [
    "COLUMNS",
    "FRACTURE_VIEWS",
    "GROUND_TRUTH",
    "REGISTRY",
    "SITE_CODES",
    "Rendered",
    "generate",
    "generate_task_set",
    "maturity",
    "render_view",
]
