"""Header text the way sites write it: study/series descriptions, protocol names, procedure codes, quirks.

Each site has a description style; the study description names the region and the number of views, the
series description and protocol name the single view. About one instance in ten gets a deliberate quirk
(``plan.QUIRKS``) of the kind a label mapper must survive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ingest.dataset.taxonomy import ViewClass

# The region word a site uses for each 30-class group in study descriptions.
REGION_WORD = {
    "Skull": "SKULL",
    "Mandible": "MANDIBLE",
    "Nose": "NASAL BONES",
    "Orbit": "ORBITS",
    "Zygomatic": "FACIAL BONES",
    "Mastoid": "MASTOIDS",
    "Cochlea": "TEMPORAL BONES",
    "Chest": "CHEST",
    "Abdomen": "ABDOMEN",
    "C_Spine": "C-SPINE",
    "T_Spine": "T-SPINE",
    "T_L_Spine": "T-L SPINE",
    "L_Spine": "L-SPINE",
    "Whole_Spine": "SCOLIOSIS SPINE",
    "Shoulder": "SHOULDER",
    "Humerus": "HUMERUS",
    "Elbow": "ELBOW",
    "Forearm": "FOREARM",
    "Wrist": "WRIST",
    "Hand": "HAND",
    "Finger": "FINGER",
    "Upper_Extremity": "UPPER EXTREMITY",
    "Hip": "PELVIS/HIP",
    "Femur": "FEMUR",
    "Knee": "KNEE",
    "Lower_Leg": "TIB/FIB",
    "Ankle": "ANKLE",
    "Foot": "FOOT",
    "Toe": "TOE",
    "Lower_Extremity": "LOWER EXTREMITY",
}
ABBREVIATIONS = {
    "HAND": "HND",
    "WRIST": "WRST",
    "ANKLE": "ANK",
    "CHEST": "CXR",
    "ABDOMEN": "ABD",
    "KNEE": "KN",
    "FOREARM": "FARM",
    "SHOULDER": "SHLD",
    "PELVIS": "PELV",
    "LATERAL": "LAT",
    "OBLIQUE": "OBL",
    "SPINE": "SP",
    "SKULL": "SKL",
    "FOOT": "FT",
    "ELBOW": "ELB",
    "VIEWS": "VW",
}
# A body part a careless technologist (or a default protocol) writes instead of the right one.
NEIGHBOUR_PART = {
    "HAND": "WRIST",
    "WRIST": "HAND",
    "FOREARM": "WRIST",
    "ANKLE": "FOOT",
    "FOOT": "ANKLE",
    "KNEE": "LEG",
    "CHEST": "ABDOMEN",
    "ABDOMEN": "CHEST",
    "SKULL": "HEAD",
    "PELVIS": "HIP",
}
WRONG_VIEW_POSITION = {"PA": "AP", "AP": "PA", "LL": "AP", "RLO": "PA", "LLO": "AP", "LLD": "PA"}
SIDED_LABEL_7 = {"Upper_Extremity", "Lower_Extremity"}


@dataclass(frozen=True)
class Header:
    body_part: str | None  # None: tag absent
    view_position: str
    study_description: str
    series_description: str
    protocol_name: str
    procedure_code: str
    procedure_meaning: str
    protocol_code: str


def protocol_code(label_68: str) -> str:
    """The site's per-view performed-protocol code (stable: a hash of the view name)."""
    return "PX" + hashlib.sha256(label_68.encode()).hexdigest()[:5].upper()


def study_description(
    style: str, view: ViewClass, n_views: int, laterality: str, view_names: list[str]
) -> str:
    region = REGION_WORD[view.label_30]
    sided = view.label_7 in SIDED_LABEL_7
    side = {"L": "LT", "R": "RT"}[laterality] if sided else ""
    side_full = {"L": "LEFT", "R": "RIGHT"}[laterality] if sided else ""
    if style == "xr":
        words = ["XR", region, f"{n_views}+ VW" if n_views >= 3 else f"{n_views} VW", side]
    elif style == "views":
        words = [region, f"{n_views} VIEW{'S' if n_views > 1 else ''}", "/".join(view_names), side_full]
    elif style == "rad":
        words = ["RAD", region, f"MIN {n_views} VIEWS" if n_views > 1 else "1 VIEW", side_full]
    else:
        words = [region.title(), side_full.title()]
    return " ".join(w for w in words if w)[:64]


def header_for(
    view: ViewClass, style: str, n_views: int, laterality: str, view_names: list[str], quirk: str
) -> Header:
    sided = view.label_7 in SIDED_LABEL_7
    side = f" {'LT' if laterality == 'L' else 'RT'}" if sided else ""
    study = study_description(style, view, n_views, laterality, view_names)
    series = view.description.upper() + side if style != "plain" else view.description + side
    protocol = f"{view.body_part} {view.view_position}{side}".strip()
    code = "RAD" + hashlib.sha256(f"{view.label_30}|{n_views}".encode()).hexdigest()[:4].upper()
    body_part: str | None = view.body_part
    view_position = view.view_position
    if quirk == "no_body_part":
        body_part = None
    elif quirk == "wrong_view_position":
        view_position = WRONG_VIEW_POSITION.get(view_position, "")
    elif quirk == "empty_view_position":
        view_position = ""
    elif quirk == "lowercase_description":
        study, series = study.lower(), series.lower()
    elif quirk == "abbreviated_description":
        study = " ".join(ABBREVIATIONS.get(w, w) for w in study.upper().split())
        series = " ".join(ABBREVIATIONS.get(w, w) for w in series.upper().split())
    elif quirk == "body_part_mismatch":
        body_part = NEIGHBOUR_PART.get(view.body_part, "EXTREMITY" if sided else "CHEST")
    elif quirk:
        raise ValueError(f"unknown header quirk {quirk!r}")
    return Header(
        body_part, view_position, study, series[:64], protocol[:64], code, study, protocol_code(view.label_68)
    )
