"""Extremities: the hand and wrist (maturity-driven), forearm, elbow, shoulder, and the lower limb.

Coordinates are centimetres, y down. Upper-limb pieces are drawn for a left limb seen PA (thumb to +x);
right limbs are mirrored by the scene. ``squeeze`` < 1 foreshortens across the limb (oblique projections).
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import arc
from .frame import Frame
from .maturity import THUMB_SESAMOID_ONSET_YEARS, carpal_sizes
from .skeleton import growing_bone

# Ray geometry of the hand in units of hand length: (base x, base y, angle from vertical, metacarpal,
# proximal, middle, distal phalanx lengths). Thumb first; y of the radiocarpal joint is 0.
RAYS = (
    (0.15, -0.10, 32, 0.22, 0.16, 0.0, 0.12),
    (0.10, -0.22, 8, 0.36, 0.22, 0.13, 0.09),
    (0.035, -0.23, 1, 0.35, 0.24, 0.15, 0.095),
    (-0.035, -0.22, -6, 0.33, 0.22, 0.14, 0.09),
    (-0.10, -0.20, -14, 0.29, 0.18, 0.11, 0.085),
)
# Carpal centres (x, y in hand lengths, radius of the adult bone in hand lengths).
CARPALS = {
    "capitate": (0.035, -0.14, 0.042),
    "hamate": (-0.05, -0.135, 0.038),
    "triquetrum": (-0.075, -0.07, 0.03),
    "lunate": (0.0, -0.06, 0.032),
    "trapezium": (0.13, -0.10, 0.032),
    "trapezoid": (0.09, -0.14, 0.026),
    "scaphoid": (0.075, -0.055, 0.036),
    "pisiform": (-0.085, -0.045, 0.018),
}
FOREARM_PER_HAND = 1.35


def hand(s, L: float, *, spread: float = 1.0, flex: float = 0.0, fingers=range(5), soft: bool = True) -> None:
    """Hand and distal forearm; the radiocarpal joint at the origin, fingers up (-y). ``L`` = hand length."""
    m = s.maturity
    rays = [RAYS[i] for i in fingers]
    if soft:
        s.tissue_capsule((0.0, 0.1 * L), (0.0, 0.9 * L), 0.2 * L, 1.0)
        s.tissue_poly(
            [
                (-0.16 * L, 0.05 * L),
                (0.2 * L, 0.05 * L),
                (0.2 * L, -0.25 * L),
                (0.15 * L, -0.58 * L),
                (-0.15 * L, -0.55 * L),
                (-0.17 * L, -0.2 * L),
            ],
            1.0,
        )
    for i, (bx, by, ang, *lengths) in zip(fingers, rays, strict=True):
        a = math.radians(ang * spread + (0 if i == 0 else flex))
        u = np.array([math.sin(a), -math.cos(a)])
        p = np.array([bx * L, by * L])
        if soft:
            total = sum(lengths) * L
            s.tissue_capsule(p, p + u * total * (1.03 if i else 1.08), 0.05 * L if i else 0.06 * L, 1.0)
        names = (
            "metacarpal_thumb" if i == 0 else "metacarpal",
            "phalanx_proximal",
            "phalanx_middle",
            "phalanx_distal",
        )
        for k, (seg, name) in enumerate(zip(lengths, names, strict=True)):
            if seg <= 0:
                continue
            q = p + u * seg * L
            w = (0.066 if k == 0 else 0.056 - 0.007 * k) * L
            # metacarpals 2-5 carry their epiphysis distally; the thumb and phalanges proximally
            distal_epi = k == 0 and i != 0
            growing_bone(
                s,
                p,
                q,
                (w * 1.05, w * 0.62, w * 0.95 if k < 3 else w * 0.8),
                epi0=None if distal_epi else name,
                epi1=name if distal_epi else None,
                density=0.95,
            )
            p = q
    carpals(s, L)
    forearm(s, (0.0, 0.0), (0.0, FOREARM_PER_HAND * L), L * 0.24)
    e = m.ossification(THUMB_SESAMOID_ONSET_YEARS, 2.0)  # thumb sesamoid, a late marker of puberty
    if e > 0:
        s.bone_ellipse((0.225 * L, -0.33 * L), (0.012 * L * e, 0.014 * L * e), 0, 0.9, 0.7, 0.004 * L)


def carpals(s, L: float) -> None:
    sizes = carpal_sizes(s.maturity)
    for name, (x, y, r) in CARPALS.items():
        size = sizes[name]
        if size > 0.02:
            rr = r * L * size
            s.bone_ellipse((x * L, y * L), (rr * 1.1, rr * 0.9), 20.0, 0.85, 0.6, max(rr * 0.2, 0.03))


def forearm(s, wrist, elbow, width: float, *, crossed: float = 0.0) -> None:
    """Radius (thumb side, +x) and ulna between the wrist joint line and the elbow; ``crossed`` pronates."""
    wrist, elbow = np.asarray(wrist, float), np.asarray(elbow, float)
    u = (elbow - wrist) / np.hypot(*(elbow - wrist))
    n = np.array([-u[1], u[0]])
    s.tissue_capsule(wrist, elbow + u * 2.0, width * 0.95, 1.0)
    if s.cast:  # a short-arm cast from the palm to below the elbow
        s.plaster_tube(wrist - u * width * 1.4, elbow - u * width * 0.6, width * 1.05, width * 1.4)
    rw, uw = width * 0.55, width * 0.35
    r_dist, r_prox = wrist + n * (-width * 0.18), elbow + n * (-width * (0.2 - crossed * 0.45))
    u_dist, u_prox = wrist + n * width * 0.3 + u * width * 0.05, elbow + n * (width * (0.25 - crossed * 0.45))
    # ulna first so the radius overlaps it where they cross
    growing_bone(s, u_dist, u_prox, (uw * 0.9, uw * 0.55, uw * 1.4), epi0="ulna_distal", tag="ulna")
    growing_bone(
        s,
        r_dist,
        r_prox,
        (rw * 1.05, rw * 0.5, rw * 0.6),
        epi0="radius_distal",
        epi1="radius_proximal",
        tag="radius",
    )


def upper_limb(s, L: float, *, squeeze: float = 1.0, spread: float = 1.0) -> None:
    """Hand, forearm and a distal humerus, wrist at the origin."""
    f = Frame(s, squeeze=squeeze)
    hand(f, L, spread=spread)
    elbow_y = FOREARM_PER_HAND * L
    humerus(f, (0.0, elbow_y + 0.02 * L), (0.0, elbow_y + 1.6 * L), 0.3 * L)


def humerus(s, distal, proximal, width: float) -> None:
    s.tissue_capsule(distal, proximal, width * 1.3, 1.0)
    growing_bone(
        s,
        distal,
        proximal,
        (width * 1.5, width * 0.5, width * 0.95),
        epi0="humerus_distal",
        epi1="humerus_proximal",
        tag="humerus",
    )


def elbow_lateral(s, L: float) -> None:
    """Elbow flexed 90 degrees: humerus running up, forearm running right, olecranon behind."""
    w = 0.3 * L
    s.tissue_capsule((0.0, 0.0), (0.0, -1.6 * L), w * 1.4, 1.0)
    s.tissue_capsule((0.0, 0.0), (1.5 * L, 0.1 * L), w * 1.2, 1.0)
    # fat pads hug the distal humerus; a joint effusion (fracture) lifts them into lucent triangles
    s.soft_tissue_sign((-w * 0.6, -w * 0.9), (w * 0.25, w * 0.6), -20, 0.25)
    if s.fracture is not None and s.fracture.tag == "humerus":
        lift = 0.5 + s.fracture.severity
        s.soft_tissue_sign((w * 0.75, -w * 1.2), (w * 0.2 * lift, w * 0.55 * lift), 15, 0.35)  # posterior pad
        s.soft_tissue_sign((-w * 0.85, -w * 1.1), (w * 0.25 * lift, w * 0.7 * lift), -30, 0.35)  # sail sign
    growing_bone(
        s,
        (0.0, 0.0),
        (0.0, -1.6 * L),
        (w * 1.1, w * 0.5, w),
        epi0="humerus_distal",
        epi1="humerus_proximal",
        tag="humerus",
    )
    e = s.maturity.ossification(0.9, 6.0)  # the capitellum appears around the first birthday
    s.bone_ellipse(
        (w * 0.1, 0.02 * L), (w * 0.4 * e, w * 0.35 * e), 0, 0.9, 0.6, w * 0.06, follows="humerus"
    )  # capitellum
    growing_bone(s, (w * 0.2, w * 0.55), (1.5 * L, w * 0.45), (w * 0.75, w * 0.35, w * 0.4), tag="ulna")
    growing_bone(
        s,
        (w * 0.55, -w * 0.15),
        (1.5 * L, 0.0),
        (w * 0.45, w * 0.3, w * 0.55),
        epi0="radius_proximal",
        tag="radius",
    )
    s.bone_poly(
        arc((-w * 0.05, w * 0.45), (w * 0.5, w * 0.4), 0, 90, 260, 10), 0.8, 0.6, w * 0.1
    )  # olecranon


def shoulder(s, *, axial: bool = False) -> None:
    """Shoulder AP (humeral head against the glenoid, clavicle, acromion, ribs) or axial."""
    m = s.maturity
    if axial:
        s.tissue_ellipse((0.0, 0.0), (13.0, 7.0), 0, 1.0)
        s.air_ellipse((-9.0, 3.0), (4.0, 3.0), 0, 0.3)
        s.bone_ellipse((2.0, 0.0), (3.2, 2.8), 0, 0.9, 0.55, 0.3)
        s.long_bone((4.0, 0.0), (14.0, 0.6), (4.5, 2.2, 2.2), density=0.9)
        s.bone_path([(-1.5, -3.0), (-2.0, 0.0), (-1.4, 3.0)], 1.2, 0.9)  # glenoid
        s.bone_path([(-1.8, -0.8), (-9.0, -2.5), (-13.0, -3.5)], 1.0, 0.7)  # scapular body
        s.bone_path([(-1.0, -3.2), (1.0, -5.2), (4.0, -5.0)], 0.9, 0.8)  # acromion
        s.bone_path([(-1.5, 2.5), (1.5, 4.8)], 0.8, 0.8)  # coracoid
        return
    s.tissue_poly([(-14.0, -8.0), (8.0, -9.0), (12.0, -4.0), (12.0, 14.0), (-14.0, 14.0)], 1.0)
    s.air_poly([(-14.0, -3.0), (-2.5, -2.0), (-3.0, 14.0), (-14.0, 14.0)], 0.6)
    for k in range(6):
        y = -4.0 + k * 2.6
        s.bone_path(arc((-14.0, y - 3.0), (12.0, 4.0), 0, 0, 70, 12), 0.8, 0.45)
    s.bone_path([(-14.0, -5.5), (-5.0, -6.6), (0.5, -6.0)], 1.2, 0.85)  # clavicle
    s.bone_path([(0.5, -6.0), (3.5, -6.2)], 1.4, 0.85)  # acromion
    s.bone_poly([(-1.5, -4.5), (-1.0, 1.5), (-3.5, 9.0), (-9.0, 3.0)], 0.6, 0.5, 0.3, plate=0.8)  # scapula
    s.bone_path([(-1.6, -3.0), (-1.2, 0.5)], 0.9, 0.9)  # glenoid rim
    e = m.epiphysis("humerus_proximal")
    head = (1.3, -1.8)
    if e.present:
        s.bone_ellipse(head, (2.8 * e.width, 2.4 * e.width), 20, 0.9, 0.6, 0.25)
    gap = 0.15 + 0.8 * e.physis * (not e.fused)
    s.long_bone((2.5, 0.8 + gap), (4.5, 16.0), (5.0, 3.4, 2.4, 2.2, 2.2), density=0.9, tag="humerus")


def humerus_oblique(s) -> None:
    shoulder_f = Frame(s, (0.0, -14.0), 0.0, 1.0)
    shoulder_f.tissue_capsule((1.0, 2.0), (4.0, 32.0), 5.0, 1.0)
    shoulder_f.bone_ellipse((0.0, 0.0), (2.6, 2.3), 15, 0.9, 0.6, 0.25)
    shoulder_f.bone_path([(-3.0, -3.5), (-1.0, 2.0), (-4.0, 7.0)], 1.0, 0.6)
    humerus(shoulder_f, (3.5, 28.5), (0.8, 2.8), 2.4)
    shoulder_f.bone_ellipse((3.8, 30.0), (1.8, 1.3), 0, 0.8, 0.6, 0.2)
    shoulder_f.long_bone((3.0, 31.0), (3.0, 36.0), (1.6, 1.2, 1.2), density=0.85)
    shoulder_f.long_bone((5.2, 31.0), (5.6, 36.0), (1.4, 1.0, 1.0), density=0.85)


# -- lower limb ------------------------------------------------------------------------------
def foot(s, *, projection: str = "ap", toes=range(5), tibia: bool = True) -> None:
    """Foot: 'ap' / 'oblique' seen from above, toes up; 'lateral' heel left, toes right, sole down."""
    if projection == "lateral":
        s.tissue_poly(
            [(-4.5, -4.0), (-2.0, -6.0), (3.0, -3.0), (16.0, 0.2), (17.0, 2.2), (-3.0, 3.0), (-5.5, 1.5)], 1.0
        )
        s.bone_poly(
            [(-5.0, 0.0), (-4.0, -2.5), (0.5, -2.6), (2.0, -1.0), (0.0, 1.8), (-4.5, 1.8)], 0.85, 0.55, 0.3
        )  # calcaneus
        s.bone_poly(
            arc((1.0, -3.6), (2.4, 1.6), 0, 180, 360, 10).tolist() + [(3.0, -2.0), (0.0, -2.0)],
            0.9,
            0.55,
            0.3,
        )  # talus
        s.bone_ellipse((4.3, -2.3), (1.3, 1.1), 20, 0.8, 0.55, 0.2)  # navicular
        s.bone_ellipse((3.3, 0.3), (1.4, 1.1), 0, 0.8, 0.55, 0.2)  # cuboid
        if tibia:  # the foot view catches the distal tibia; views with the whole leg draw their own
            s.bone_poly([(-0.6, -12.0), (2.4, -12.0), (2.6, -5.6), (-0.8, -5.4)], 0.8, 0.45, 0.35)
        for k in range(5):
            s.long_bone((5.2, -2.6 + k * 0.35), (12.0, 0.1 + k * 0.3), (1.2, 0.7, 1.0), density=0.5)
            s.long_bone((12.3, 0.2 + k * 0.3), (15.4, 0.7 + k * 0.25), (0.9, 0.5, 0.7), density=0.4)
        return
    squeeze = 0.75 if projection == "oblique" else 1.0
    f = Frame(s, squeeze=squeeze)
    f.tissue_poly([(-4.0, 6.0), (4.0, 6.0), (5.5, -6.0), (4.5, -13.5), (-4.5, -12.0), (-4.5, -2.0)], 1.0)
    f.bone_poly(
        [(-2.2, 5.5), (1.8, 5.5), (2.4, 2.0), (-2.2, 2.0)], 0.7, 0.6, 0.3
    )  # calcaneus, seen through talus
    f.bone_ellipse((0.7, 1.0), (2.0, 1.6), 0, 0.85, 0.55, 0.25)  # talus head
    f.bone_ellipse((1.5, -1.4), (1.9, 1.0), 10, 0.85, 0.55, 0.2)  # navicular
    f.bone_ellipse((-2.2, -1.8), (1.4, 1.8), 0, 0.85, 0.55, 0.2)  # cuboid
    for x in (2.6, 1.2, -0.2):
        f.bone_ellipse((x, -3.6), (0.65, 0.9), 0, 0.8, 0.55, 0.15)  # cuneiforms
    bases = [(2.6, -4.6), (1.3, -4.7), (0.0, -4.6), (-1.3, -4.3), (-2.5, -3.9)]
    lengths = [
        (6.3, 3.2, 0.0, 2.2),
        (7.2, 3.0, 1.2, 1.0),
        (6.8, 2.6, 1.1, 0.9),
        (6.4, 2.3, 1.0, 0.9),
        (6.0, 2.0, 0.9, 0.8),
    ]
    for i in toes:
        ang = math.radians((1.5 - i) * 5.0 - 3.0)
        u = np.array([math.sin(ang), -math.cos(ang)])
        p = np.array(bases[i])
        f.tissue_capsule(p + u * 6.0, p + u * sum(lengths[i]) * 1.03, 1.0 if i == 0 else 0.75, 1.0)
        for k, seg in enumerate(lengths[i]):
            if seg <= 0:
                continue
            q = p + u * seg
            w = (1.5 if i == 0 else 0.95) * (1.0 if k == 0 else 0.75)
            growing_bone(
                f,
                p,
                q,
                (w, w * 0.6, w * 0.9),
                epi1="metatarsal" if (k == 0 and i) else None,
                epi0="metatarsal" if (k == 0 and not i) or k == 1 else None,
                density=0.9,
            )
            p = q


def leg(s, *, knee=(0.0, 0.0), ankle=(0.0, 34.0), fibula_side: float = -1.0, overlap: float = 0.0) -> None:
    """Tibia and fibula between the knee and ankle joint lines; ``overlap`` hides the fibula behind it."""
    knee, ankle = np.asarray(knee, float), np.asarray(ankle, float)
    s.tissue_capsule(knee, ankle, 4.5, 1.0)
    if s.cast:  # a below-knee cast around the leg and ankle
        u = (ankle - knee) / np.hypot(*(ankle - knee))
        s.plaster_tube(knee + u * 6.0, ankle + u * 6.0, 5.0, 6.2)
    off = fibula_side * (3.0 - 2.4 * overlap)
    growing_bone(
        s,
        knee + (off, 1.5),
        ankle + (off, 0.6),
        (2.0, 1.1, 1.9),
        epi0="fibula_proximal",
        epi1="fibula_distal",
        tag="fibula",
        density=0.85,
    )
    growing_bone(s, knee, ankle, (7.0, 2.7, 4.6), epi0="tibia_proximal", epi1="tibia_distal", tag="tibia")


def knee(s, *, projection: str = "ap") -> None:
    """Knee joint at the origin: distal femur above, tibia below."""
    if projection == "lateral":
        f = Frame(s, angle_deg=0.0)
        f.tissue_capsule((0.0, -20.0), (0.0, 0.0), 6.5, 1.0)
        f.tissue_capsule((0.0, 0.0), (-3.0, 20.0), 5.5, 1.0)
        growing_bone(f, (0.0, 0.0), (0.5, -22.0), (6.0, 2.8, 3.0), epi0="femur_distal")
        f.bone_ellipse((-4.6, -2.4), (1.2, 2.1), 10, 0.9, 0.6, 0.25)  # patella, anterior
        growing_bone(f, (0.6, 0.0), (-2.5, 22.0), (6.0, 2.6, 2.8), epi0="tibia_proximal", tag="tibia")
        growing_bone(f, (3.2, 1.5), (0.5, 22.0), (1.8, 1.0, 1.2), epi0="fibula_proximal", density=0.7)
        return
    stress = projection == "stress"
    f = Frame(s, squeeze=0.8 if projection == "oblique" else 1.0)
    f.tissue_capsule((0.0, -20.0), (0.0, 20.0), 6.5, 1.0)
    growing_bone(f, (0.0, -0.1), (0.6, -22.0), (8.0, 2.8, 3.2), epi0="femur_distal")
    f.bone_ellipse((0.3, -2.0), (2.2, 2.6), 0, 0.45, 0.8, 0.2)  # patella through the femur
    tilt = 6.0 if stress else 0.0
    g = Frame(f, (0.0, 0.4 if not stress else 0.9), tilt)
    leg(
        g,
        knee=(0.0, 0.0),
        ankle=(0.0, 24.0),
        fibula_side=-1.0,
        overlap=0.5 if projection == "oblique" else 0.0,
    )
    if stress:
        f.metal_poly([(5.5, -12.0), (7.5, -12.0), (7.5, 12.0), (5.5, 12.0)], 1.5)  # stress device plate
        f.metal_line((-8.0, 0.0), (-5.5, 0.0), 1.6, 2.0)


def knee_skyline(s) -> None:
    """Tangential patella: femoral trochlea as a V groove, patella riding on it."""
    s.tissue_ellipse((0.0, 1.0), (9.0, 6.5), 0, 1.0)
    s.bone_poly(
        [(-6.0, 6.0), (-5.5, 0.5), (-2.0, -0.6), (0.0, 0.8), (2.0, -0.8), (5.5, 0.2), (6.0, 6.0)],
        0.9,
        0.5,
        0.35,
    )
    s.bone_poly([(-3.0, -1.6), (0.0, -0.6), (3.2, -1.8), (2.0, -3.5), (-2.0, -3.4)], 0.95, 0.6, 0.3)


def ankle(s, *, projection: str = "ap") -> None:
    """Ankle joint line at the origin; 'ap', 'mortise' (leg internally rotated), 'stress', 'lateral'."""
    if projection == "lateral":
        s.tissue_capsule((0.0, -22.0), (0.0, 0.0), 3.6, 1.0)
        f = Frame(s, (-2.0, 3.0))
        foot(f, projection="lateral", tibia=False)
        leg(s, knee=(0.0, -30.0), ankle=(0.0, 0.0), fibula_side=1.0, overlap=0.8)
        return
    stress = projection == "stress"
    f = Frame(s, squeeze=0.85 if projection == "mortise" else 1.0)
    f.tissue_capsule((0.0, -22.0), (0.0, 4.0), 4.2, 1.0)
    f.tissue_ellipse((0.0, 4.5), (4.5, 3.5), 0, 1.0)
    tilt = 9.0 if stress else 0.0
    t = Frame(f, (0.0, 0.5), tilt)
    t.bone_poly(
        arc((0.0, 0.9), (2.2, 1.3), 0, 180, 360, 12).tolist() + [(2.0, 3.3), (-2.0, 3.3)], 0.95, 0.55, 0.3
    )  # talar dome
    t.bone_poly([(-2.4, 3.4), (2.2, 3.4), (2.8, 6.5), (-2.6, 6.5)], 0.7, 0.6, 0.3)  # calcaneus behind
    overlap = 0.0 if projection == "mortise" else 0.35
    leg(f, knee=(0.0, -34.0), ankle=(0.0, 0.0), fibula_side=-1.0, overlap=overlap)
    if stress:
        f.metal_poly([(4.0, -10.0), (5.5, -10.0), (5.5, 5.0), (4.0, 5.0)], 1.3)


def lower_limb(s, *, projection: str = "ap") -> None:
    """Hip to foot, hip joint at the origin; the lateral view flexes the knee slightly."""
    m = s.maturity
    g = m.growth
    femur_len, tibia_len = 44.0 * g, 36.0 * g
    lateral = projection == "lateral"
    knee_at = np.array([2.0 if not lateral else -1.0, femur_len])
    ankle_at = knee_at + (0.0 if not lateral else 2.0, tibia_len)
    s.tissue_capsule((0.0, -2.0), knee_at, 8.0 * g + 2.0, 1.0)
    s.tissue_capsule(knee_at, ankle_at, 5.0 * g + 1.5, 1.0)
    e = m.epiphysis("femur_head")
    if e.present:
        s.bone_ellipse((0.0, 0.0), (2.5 * g * e.width, 2.2 * g * e.width), 0, 0.9, 0.6, 0.25)
    if not lateral:
        s.bone_path(arc((-1.0, -0.5), (3.5 * g, 3.5 * g), 0, 180, 330, 10), 1.1 * g, 0.8)  # acetabulum
    growing_bone(
        s, (1.5 * g, 2.2 * g), knee_at - (0.0, 0.2), (3.5 * g, 2.6 * g, 7.0 * g), epi1="femur_distal"
    )
    s.bone_path([(0.0, 0.0), (2.0 * g, 2.6 * g)], 2.4 * g, 0.85)  # femoral neck
    leg(
        Frame(s, knee_at, 0.0, 0.75 if lateral else 1.0),
        knee=(0.0, 0.5),
        ankle=(0.0, tibia_len),
        overlap=0.8 if lateral else 0.0,
    )
    if lateral:
        foot(Frame(s, ankle_at + (-2.0, 3.0), scale=g), projection="lateral", tibia=False)
    else:
        foot(Frame(s, ankle_at + (0.0, 3.5), 180.0, 0.6, g), projection="ap")
