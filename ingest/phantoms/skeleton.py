"""Anatomical building blocks shared by the views: growing long bones, vertebrae, rounded outlines."""

from __future__ import annotations

import math

import numpy as np

from .canvas import Scene, arc

JOINT_SPACE = 0.07  # articular cartilage, as a fraction of the bone-end width


def rotate(points, angle_deg: float, about=(0.0, 0.0)) -> np.ndarray:
    a = math.radians(angle_deg)
    pts = np.asarray(points, float) - about
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T + about


def rounded_rect(center, width: float, height: float, radius: float, angle_deg: float = 0.0) -> np.ndarray:
    cx, cy = center
    r = min(radius, width / 2, height / 2)
    hw, hh = width / 2 - r, height / 2 - r
    pts = np.concatenate(
        [
            arc((cx + hw, cy - hh), (r, r), 0, -90, 0, 6),
            arc((cx + hw, cy + hh), (r, r), 0, 0, 90, 6),
            arc((cx - hw, cy + hh), (r, r), 0, 90, 180, 6),
            arc((cx - hw, cy - hh), (r, r), 0, 180, 270, 6),
        ]
    )
    return rotate(pts, angle_deg, about=(cx, cy)) if angle_deg else pts


def growing_bone(
    s: Scene,
    j0,
    j1,
    widths: tuple[float, float, float],
    *,
    epi0: str | None = None,
    epi1: str | None = None,
    tag: str | None = None,
    density: float = 1.0,
) -> tuple:
    """A long bone between two articular surfaces ``j0`` (proximal) and ``j1``, with maturity-driven ends.

    ``widths`` = (end at j0, shaft, end at j1). An end named by an epiphysis (``epi0``/``epi1``, keys of
    ``maturity.EPIPHYSIS_YEARS``) shows, as the child matures: a wide unossified gap, then a small
    ossification centre that widens to cap the metaphysis while the physis narrows, then fusion with a
    fading scar. Ends without an epiphysis ossify from the shaft and just close in on the joint.
    Returns the diaphysis end points.
    """
    m = s.maturity
    j0, j1 = np.asarray(j0, float), np.asarray(j1, float)
    length = float(np.hypot(*(j1 - j0)))
    u = (j1 - j0) / length
    nrm = np.array([-u[1], u[0]])
    angle = math.degrees(math.atan2(u[1], u[0]))
    cart = m.cartilage
    ends, caps, plates = [], [], []
    for joint, inward, width, name in ((j0, u, widths[0], epi0), (j1, -u, widths[2], epi1)):
        gap = width * JOINT_SPACE
        if name is None:
            ends.append(joint + inward * (gap + width * 0.3 * cart))
            continue
        e = m.epiphysis(name)
        thick = width * 0.36 * e.width
        if e.fused:
            ends.append(joint + inward * gap)
        else:
            ends.append(joint + inward * (gap + thick + width * (0.06 + 0.3 * cart) * e.physis))
        if e.present:
            # the centre starts round and flattens into a cap as wide as the metaphysis; just before
            # fusion it overhangs it slightly ("capping")
            cap_width = width * e.width * (1.0 + 0.08 * (1.0 - e.physis) * (not e.fused))
            caps.append((joint + inward * (gap + thick / 2), (thick / 2, cap_width / 2), thick * 0.18))
        if not e.fused:
            # zone of provisional calcification: a thin dense band capping the metaphysis at the physis
            plates.append((ends[-1] + inward * width * 0.02, width * 0.4, 0.35 * (0.3 + 0.7 * e.physis)))
        if e.scar > 0:
            at = joint + inward * (gap + thick)
            plates.append((at, width * 0.45, 0.3 * e.scar))
    shaft = widths[1]
    # metaphyses flare like a trumpet: the width rises slowly off the shaft, then fast near the physis
    flare = (0.04, 0.15, 0.4)
    profile = (
        [widths[0]]
        + [shaft + (widths[0] - shaft) * f for f in flare[::-1]]
        + [shaft] * 5
        + [shaft + (widths[2] - shaft) * f for f in flare]
        + [widths[2]]
    )
    s.long_bone(ends[0], ends[1], profile, density=density, tag=tag)
    for centre, axes, cortex in caps:
        s.bone_ellipse(centre, axes, angle, density * 0.95, 0.6, cortex, follows=tag)
    for at, half, strength in plates:
        s.bone_path([at - nrm * half, at + nrm * half], shaft * 0.08, density * strength, marrow=1.0)
    return ends[0], ends[1]


def vertebra_ap(
    s: Scene,
    centre,
    width: float,
    height: float,
    *,
    angle_deg: float = 0.0,
    density: float = 0.85,
    transverse: float = 0.4,
    spinous: bool = True,
) -> None:
    """A vertebra seen front-on: body, the two pedicle 'eyes', transverse and spinous processes."""
    cx, cy = centre
    s.bone_poly(
        rounded_rect(centre, width, height, height * 0.18, angle_deg), density * 0.8, 0.6, height * 0.08
    )
    ped = rotate(
        [(cx - width * 0.33, cy - height * 0.12), (cx + width * 0.33, cy - height * 0.12)],
        angle_deg,
        (cx, cy),
    )
    for p in ped:
        s.bone_ellipse(p, (width * 0.09, height * 0.2), angle_deg + 90, density * 0.6, 0.3, height * 0.06)
    if transverse > 0:
        for sign in (-1, 1):
            a = rotate(
                [
                    (cx + sign * width * 0.45, cy - height * 0.1),
                    (cx + sign * width * (0.5 + transverse), cy - height * 0.18),
                ],
                angle_deg,
                (cx, cy),
            )
            s.bone_path(a, height * 0.22, density * 0.55)
    if spinous:
        tip = rotate([(cx, cy + height * 0.05), (cx, cy + height * 0.45)], angle_deg, (cx, cy))
        s.bone_path(tip, width * 0.12, density * 0.5)


def vertebra_lateral(
    s: Scene,
    centre,
    width: float,
    height: float,
    *,
    angle_deg: float = 0.0,
    posterior: float = 1.0,
    density: float = 0.85,
) -> None:
    """A vertebra in profile, anterior to the left (-x): body box plus pedicle, lamina and spinous process."""
    cx, cy = centre
    s.bone_poly(
        rounded_rect(centre, width, height, height * 0.15, angle_deg), density * 0.85, 0.55, height * 0.09
    )
    if posterior <= 0:
        return
    back = [
        (cx + width * 0.45, cy - height * 0.35),
        (cx + width * (0.5 + 0.55 * posterior), cy - height * 0.45),
        (cx + width * (0.7 + 0.9 * posterior), cy - height * 0.1),
        (cx + width * (0.6 + 0.6 * posterior), cy + height * 0.25),
        (cx + width * 0.45, cy + height * 0.05),
    ]
    s.bone_poly(rotate(back, angle_deg, (cx, cy)), density * 0.6, 0.5, height * 0.07)


def spine_points(top, bottom, n: int, bend: float = 0.0, axis: int = 0) -> np.ndarray:
    """``n`` evenly spaced points from ``top`` to ``bottom`` along a gentle bow (``bend`` = sagitta)."""
    t = np.linspace(0.0, 1.0, n)
    top, bottom = np.asarray(top, float), np.asarray(bottom, float)
    pts = top + np.outer(t, bottom - top)
    pts[:, axis] += bend * np.sin(np.pi * t)
    return pts
