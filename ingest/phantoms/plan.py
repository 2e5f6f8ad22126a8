"""What to generate: patients, studies, views, dates, sites and encodings, all fixed by (task, count, seed).

The plan is drawn before any pixel is rendered, from its own random stream, so the files a study writes
depend only on the seed and the study's index; rendering then uses one stream per study.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from ingest.dataset.taxonomy import Taxonomy, load_taxonomy

from .maturity import bone_age_for
from .render import FRACTURE_VIEWS
from .spec import REGISTRY

TASKS = ("views", "bone_age", "fracture")
FIRST_DAY = dt.date(2014, 1, 1)
LAST_DAY = dt.date(2022, 12, 31)
MAX_AGE_DAYS = 18 * 365 + 300  # "0-18 years": up to the day before the 19th birthday

# Relative study frequency of a view in a children's hospital; views not listed weigh 1.
VIEW_WEIGHTS = {
    "Chest_Frontal": 40.0,
    "Chest_Lateral": 8.0,
    "Abdomen_Supine": 10.0,
    "Abdomen_KUB": 6.0,
    "Hand_PA": 14.0,
    "Wrist_AP": 10.0,
    "Wrist_Oblique": 4.0,
    "Ankle_AP": 9.0,
    "Ankle_Lateral": 4.0,
    "Ankle_Mortise": 4.0,
    "Knee_AP": 9.0,
    "Knee_Lateral": 4.0,
    "Forearm_Oblique": 5.0,
    "Elbow_Lateral": 5.0,
    "Foot_AP": 5.0,
    "Pelvis_AP": 5.0,
    "Skull_AP": 3.0,
    "Skull_Lateral": 3.0,
    "Whole_Spine_AP": 4.0,
    "L_Spine_AP": 2.0,
    "L_Spine_Lateral": 2.0,
    "C_Spine_Lateral": 2.0,
    "Shoulder_AP": 2.0,
    "Finger": 2.0,
}
# (transfer syntax, weight): uncompressed dominates, as on most PACS exports.
TRANSFER_SYNTAXES = (
    (ExplicitVRLittleEndian, 0.35),
    (ImplicitVRLittleEndian, 0.15),
    (JPEG2000Lossless, 0.15),
    (JPEGLSLossless, 0.2),
    (RLELossless, 0.15),
)
# --transfer-syntax NAME: every instance in one syntax (HTJ2K is never drawn by the mix: Orthanc's DCMTK
# 3.6.7 does not know its UIDs, so the demo PACS serves it only from an upload of ready files)
SYNTAX_NAMES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
    "htj2k": HTJ2KLossless,
}
QUIRKS = (
    "no_body_part",
    "wrong_view_position",
    "empty_view_position",
    "lowercase_description",
    "abbreviated_description",
    "body_part_mismatch",
)
QUIRK_RATE = 0.1
FRACTURE_RATE = {"views": 0.3, "fracture": 0.5}
CAST_RATE = 0.15  # fractured studies imaged again in a cast (the follow-up after reduction)
TALL_VIEWS = {"Whole_Spine_AP", "Whole_Lower_AP", "Whole_Lower_Lateral", "T_L_Spine", "Upper_Extremity_Other"}


@dataclass(frozen=True)
class Site:
    """One imaging site: its modality, vendor and how its staff write descriptions."""

    name: str
    modality: str  # CR or DX
    manufacturer: str
    photometric: str
    bits_stored: tuple[int, ...]
    rescale: tuple[float, float] | None
    style: str  # description template family, see headers.py


SITES = (
    Site("NORTH", "CR", "FUJIFILM Corporation", "MONOCHROME1", (10, 12), None, "xr"),
    Site("CENTRAL", "DX", "Carestream Health", "MONOCHROME2", (12, 14), (1.0, 0.0), "views"),
    Site("SOUTH", "DX", "Siemens Healthineers", "MONOCHROME2", (15, 16), (0.5, -1024.0), "rad"),
    Site("EAST", "CR", "Agfa", "MONOCHROME2", (12, 16), (1.0, -512.0), "plain"),
)


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    sex: str
    birth_date: dt.date
    maturity_z: float  # how advanced this child's skeleton is, in standard deviations; kept across visits


@dataclass(frozen=True)
class InstancePlan:
    label_68: str
    transfer_syntax: str
    quirk: str  # one of QUIRKS or ""
    long_side_px: int


@dataclass(frozen=True)
class StudyPlan:
    index: int
    patient: Patient
    study_date: dt.date
    site: Site
    laterality: str  # L or R: limbs are imaged one side at a time
    bone_age_months: float
    fracture: bool | None  # None for a study without fracture views
    cast: bool  # a follow-up of the fracture, imaged through a cast
    instances: tuple[InstancePlan, ...]

    @property
    def age_days(self) -> int:
        return (self.study_date - self.patient.birth_date).days

    @property
    def age_months(self) -> float:
        return self.age_days / 30.4375


FIRST_NAMES = (
    "ALEX",
    "SAM",
    "JORDAN",
    "TAYLOR",
    "MORGAN",
    "CASEY",
    "RILEY",
    "JAMIE",
    "AVERY",
    "QUINN",
    "ROWAN",
    "SKYLER",
    "DREW",
    "KAI",
    "ELLIS",
    "NOOR",
    "MINA",
    "JUN",
    "SORA",
    "LEE",
)
LAST_NAMES = ("PHANTOM", "TESTCASE", "SYNTHETIC", "MOCKUP", "DUMMY", "SAMPLE", "EXAMPLE", "PSEUDO")


def _group_views(taxonomy: Taxonomy) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for v in taxonomy.views:
        groups.setdefault(v.label_30, []).append(v.label_68)
    return groups


def _patient(rng: np.random.Generator, number: int, seed: int, study_date: dt.date, age_days: int) -> Patient:
    sex = "M" if rng.random() < 0.52 else "F"
    name = (
        f"{LAST_NAMES[int(rng.integers(len(LAST_NAMES)))]}^{FIRST_NAMES[int(rng.integers(len(FIRST_NAMES)))]}"
    )
    return Patient(
        f"PX{seed % 1000:03d}{number:06d}",
        name,
        sex,
        study_date - dt.timedelta(days=age_days),
        float(np.clip(rng.normal(), -2.5, 2.5)),
    )


def _encodings(
    rng: np.random.Generator, labels: list[str], quirk_rate: float, transfer_syntax: str | None
) -> tuple[InstancePlan, ...]:
    syntaxes, weights = zip(*TRANSFER_SYNTAXES, strict=True)
    out = []
    for label in labels:
        # drawn even when forced, so the rest of the plan is the same whatever the syntax
        ts = syntaxes[int(rng.choice(len(syntaxes), p=np.asarray(weights) / sum(weights)))]
        ts = transfer_syntax or ts
        quirk = QUIRKS[int(rng.integers(len(QUIRKS)))] if rng.random() < quirk_rate else ""
        lo, hi = (950, 1201) if label in TALL_VIEWS else (600, 1001)
        out.append(InstancePlan(label, str(ts), quirk, int(rng.integers(lo, hi))))
    return tuple(out)


def plan_studies(
    task: str, n: int, seed: int, taxonomy: Taxonomy | None = None, transfer_syntax: str | None = None
) -> list[StudyPlan]:
    """The studies of a run: ``views`` (all 68 views, realistic skew), ``bone_age`` or ``fracture``;
    ``transfer_syntax`` (a UID) replaces the realistic mix of syntaxes."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if n < 1:
        raise ValueError(f"the number of studies must be at least 1, got {n}")
    taxonomy = taxonomy or load_taxonomy()
    rng = np.random.default_rng([seed, 0x504C414E])  # "PLAN"
    groups = _group_views(taxonomy)
    labels = [v.label_68 for v in taxonomy.views]
    if task == "views":
        weights = np.array([VIEW_WEIGHTS.get(label, 1.0) for label in labels])
        # every view at least once (when there is room), the rest drawn with the realistic skew
        primary = list(labels[: min(n, len(labels))]) if n >= len(labels) else []
        primary += [labels[i] for i in rng.choice(len(labels), n - len(primary), p=weights / weights.sum())]
        rng.shuffle(primary)
    elif task == "bone_age":
        primary = ["Hand_PA"] * n
    else:
        primary = [FRACTURE_VIEWS[int(i)] for i in rng.integers(len(FRACTURE_VIEWS), size=n)]
    span = (LAST_DAY - FIRST_DAY).days
    patients: list[Patient] = []
    plans = []
    for index, first in enumerate(primary):
        study_date = FIRST_DAY + dt.timedelta(days=int(rng.integers(span + 1)))
        # a quarter of studies are follow-ups of an earlier patient who is still a child on this date
        candidates = [p for p in patients[-200:] if 0 <= (study_date - p.birth_date).days <= MAX_AGE_DAYS]
        if task == "views" and candidates and rng.random() < 0.25:
            patient = candidates[int(rng.integers(len(candidates)))]
        else:
            if task == "bone_age":
                age_days = int((index + rng.random()) / n * MAX_AGE_DAYS)  # even spread over 0-18 y
            else:
                age_days = int(rng.triangular(0, 2000, MAX_AGE_DAYS))
            patient = _patient(rng, len(patients), seed, study_date, age_days)
            patients.append(patient)
        group = [v for v in groups[taxonomy.view(first).label_30] if v != first]
        if task == "fracture":
            group = [v for v in group if v in FRACTURE_VIEWS]
        extra = int(rng.integers(0, min(2, len(group)) + 1)) if task != "bone_age" else 0
        chosen = [first] + [group[int(i)] for i in rng.permutation(len(group))[:extra]]
        age_months = (study_date - patient.birth_date).days / 30.4375
        # bone age scatters around the chronological age by the child's own maturity (Greulich-Pyle SD);
        # every view of the study is drawn at it, and a hand PA reports it
        bone_age = bone_age_for(age_months, patient.sex, patient.maturity_z)
        has_fracture_view = any(v in FRACTURE_VIEWS for v in chosen)
        fracture = bool(rng.random() < FRACTURE_RATE.get(task, 0.0)) if has_fracture_view else None
        castable = any(REGISTRY[v].castable for v in chosen)
        cast = bool(fracture) and castable and bool(rng.random() < CAST_RATE)
        site = SITES[int(rng.integers(len(SITES)))]
        laterality = "L" if rng.random() < 0.5 else "R"
        plans.append(
            StudyPlan(
                index,
                patient,
                study_date,
                site,
                laterality,
                bone_age,
                fracture,
                cast,
                _encodings(rng, chosen, QUIRK_RATE, transfer_syntax),
            )
        )
    return plans
