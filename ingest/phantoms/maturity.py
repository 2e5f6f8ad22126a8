"""Skeletal maturity as a smooth, sex-dependent function of bone age.

Everything is expressed on one "male-equivalent skeletal age" scale: a girl's bone age is multiplied by
``MATURITY_RATE["F"]`` because girls pass each ossification and fusion event earlier than boys (pisiform
~9.5 y vs ~11 y, distal radius fusion ~15 y vs ~17.5 y). Event ages below are for boys, from the usual
Greulich-Pyle / Tanner-Whitehouse tables, rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MATURITY_RATE = {"M": 1.0, "F": 1.15}
MAX_AGE_MONTHS = 18 * 12 + 11

# Carpal ossification centres in their order of appearance: (name, onset in male years).
CARPAL_ONSET_YEARS = (
    ("capitate", 0.2),
    ("hamate", 0.4),
    ("triquetrum", 2.8),
    ("lunate", 3.8),
    ("trapezium", 5.0),
    ("trapezoid", 5.8),
    ("scaphoid", 6.2),
    ("pisiform", 11.0),
)
# Years an ossification centre takes to reach ~90 % of its adult size after it appears.
CARPAL_GROWTH_YEARS = 5.0

# Epiphyses: (onset, fusion) in male years.
EPIPHYSIS_YEARS = {
    "radius_distal": (1.1, 17.5),
    "ulna_distal": (6.5, 17.0),
    "metacarpal": (1.8, 16.2),
    "metacarpal_thumb": (2.6, 16.0),
    "phalanx_proximal": (1.6, 16.0),
    "phalanx_middle": (2.3, 15.8),
    "phalanx_distal": (2.0, 15.2),
    "femur_head": (0.5, 16.5),
    "femur_distal": (-0.1, 17.5),
    "tibia_proximal": (0.0, 17.0),
    "tibia_distal": (0.5, 16.5),
    "fibula_distal": (1.2, 16.5),
    "fibula_proximal": (3.5, 17.5),
    "humerus_proximal": (0.3, 18.0),
    "humerus_distal": (1.0, 14.5),
    "radius_proximal": (5.0, 15.0),
    "metatarsal": (2.5, 16.0),
    "calcaneal_apophysis": (7.0, 15.0),
}
THUMB_SESAMOID_ONSET_YEARS = 13.0  # appears shortly before the pubertal growth spurt
PHYSIS_CLOSING_YEARS = 4.0  # the growth plate narrows over the last years before fusion
ADULT_HAND_LENGTH_CM = 18.7


# Between-child spread of skeletal age around chronological age: standard deviations (months) of the
# Greulich-Pyle reference by chronological age (years), from Greulich & Pyle, "Radiographic Atlas of
# Skeletal Development of the Hand and Wrist", 2nd ed. (1959), rounded. Small in infancy, ~9-12 months from
# school age on, as RSNA-style cohorts show.
BONE_AGE_SD_MONTHS = {
    "M": (
        (0.25, 0.7),
        (1.0, 2.0),
        (2.0, 3.9),
        (3.0, 4.5),
        (4.0, 5.4),
        (5.0, 8.4),
        (6.0, 8.8),
        (8.0, 8.9),
        (10.0, 9.0),
        (12.0, 10.1),
        (14.0, 10.4),
        (16.0, 11.3),
        (17.0, 12.9),
    ),
    "F": (
        (0.25, 0.7),
        (1.0, 1.8),
        (2.0, 4.6),
        (3.0, 6.0),
        (4.0, 9.0),
        (5.0, 10.7),
        (6.0, 11.7),
        (8.0, 10.7),
        (10.0, 11.2),
        (12.0, 11.2),
        (14.0, 11.3),
        (16.0, 10.7),
        (17.0, 10.7),
    ),
}


def bone_age_sd_months(age_months: float, sex: str) -> float:
    """Standard deviation of bone age for a child of this chronological age and sex (Greulich-Pyle)."""
    years, sds = zip(*BONE_AGE_SD_MONTHS[sex], strict=True)
    return float(np.interp(age_months / 12.0, years, sds))


def bone_age_for(age_months: float, sex: str, z: float) -> float:
    """The bone age of a child whose maturity sits ``z`` standard deviations from the mean for its age."""
    return float(np.clip(age_months + z * bone_age_sd_months(age_months, sex), 0.0, MAX_AGE_MONTHS))


def smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass(frozen=True)
class Epiphysis:
    """State of one secondary ossification centre, in fractions of the adjacent metaphysis width."""

    width: float  # 0 before it appears, 1 once it caps the metaphysis
    physis: float  # growth-plate gap, 1 = widest, 0 = closed
    fused: bool
    scar: float  # density of the physeal scar line after fusion, fading over ~2 years

    @property
    def present(self) -> bool:
        return self.width > 0.0


@dataclass(frozen=True)
class Maturity:
    """Skeletal maturity on the male-equivalent scale (years); all geometry derives from it."""

    skeletal_years: float

    def ossification(self, onset: float, growth_years: float = CARPAL_GROWTH_YEARS) -> float:
        """Size of a round ossification centre, 0 before ``onset`` rising smoothly to 1."""
        t = self.skeletal_years - onset
        if t <= 0:
            return 0.0
        return (1.0 - math.exp(-2.3 * t / growth_years)) ** 0.6

    def epiphysis(self, name: str) -> Epiphysis:
        onset, fusion = EPIPHYSIS_YEARS[name]
        s = self.skeletal_years
        if s <= onset:
            return Epiphysis(0.0, 1.0, False, 0.0)
        capping = max(fusion - 2.0 - onset, 0.5)
        width = min((s - onset) / capping, 1.0) ** 0.6
        physis = 1.0 - smoothstep((s - (fusion - PHYSIS_CLOSING_YEARS)) / PHYSIS_CLOSING_YEARS)
        fused = s >= fusion
        scar = max(0.0, 1.0 - (s - fusion) / 2.0) if fused else 0.0
        return Epiphysis(width, physis, fused, scar)

    @property
    def cartilage(self) -> float:
        """Unossified share of a bone end: large in infants (wide apparent joint gaps), small in adults."""
        return 0.1 + 0.9 * math.exp(-self.skeletal_years / 3.0)

    @property
    def hand_length_cm(self) -> float:
        """Radiocarpal joint to middle fingertip; grows fast in infancy, levels off after puberty."""
        return 6.5 + 12.5 * (1.0 - math.exp(-self.skeletal_years / 6.0))

    @property
    def growth(self) -> float:
        """Body-size factor: 1 for an adult, ~0.35 at birth."""
        return self.hand_length_cm / ADULT_HAND_LENGTH_CM


def maturity(bone_age_months: float, sex: str) -> Maturity:
    """The maturity of a child of this bone age and sex ("M" or "F")."""
    if sex not in MATURITY_RATE:
        raise ValueError(f"sex must be 'M' or 'F', got {sex!r}")
    if not 0 <= bone_age_months <= MAX_AGE_MONTHS:
        raise ValueError(f"bone age must be within 0..{MAX_AGE_MONTHS} months, got {bone_age_months}")
    return Maturity(bone_age_months / 12.0 * MATURITY_RATE[sex])


def carpal_sizes(m: Maturity) -> dict[str, float]:
    """Relative size (0..1) of each carpal ossification centre."""
    return {name: m.ossification(onset) for name, onset in CARPAL_ONSET_YEARS}
