"""The axial skeleton: head, thorax, abdomen, spine and pelvis, each in a few projections.

Coordinates are centimetres, y down, the patient's left on +x for frontal views (the scene mirrors as needed);
lateral views put the face / anterior body to -x.
"""

from __future__ import annotations

import numpy as np

from .canvas import arc
from .frame import Frame
from .skeleton import rotate, spine_points, vertebra_ap, vertebra_lateral


# -- head ----------------------------------------------------------------------------------------
def sutures(s, lines) -> None:
    """Cranial sutures as lucent seams through the vault: wide in infants, a fine line once interdigitated;
    the anterior fontanelle is a gap until about 18 months."""
    years = s.maturity.skeletal_years
    width = 0.12 + 0.5 * np.exp(-years / 1.2)
    for line in lines:
        pts = np.asarray(line, float)
        wiggle = s.rng.normal(0.0, 0.05 + 0.04 * min(years, 6.0) / 6.0, (6 * (len(pts) - 1), 2))
        dense = (
            np.concatenate(
                [np.linspace(a, b, 6, endpoint=False) for a, b in zip(pts[:-1], pts[1:], strict=True)]
            )
            + wiggle
        )
        s.bone_gap(np.vstack([dense, pts[-1:]]), width, 0.45)
    if years < 1.5:
        s.bone_gap([(0.0, -9.6), (0.0, -8.2)], 1.6 * (1.5 - years) / 1.5 + 0.2, 0.8)


def head_frontal(s, *, projection: str = "pa") -> None:
    """Skull PA/AP: 'pa', 'caldwell' (orbits), 'waters' (sinuses), 'towne', 'smv' (zygomatic arch)."""
    s.tissue_ellipse((0.0, 0.0), (8.4, 10.6), 0, 1.0)
    if projection == "smv":
        s.bone_ring((0.0, 0.0), (7.2, 9.2), 0, 0.5, 0.9, shell=True)
        for sign in (-1, 1):
            s.bone_path(
                [(sign * 5.0, -5.5), (sign * 7.4, -2.0), (sign * 5.0, 1.5)], 0.6, 1.0
            )  # zygomatic arch
            s.bone_path([(sign * 1.5, 0.8), (sign * 4.5, 3.0)], 0.9, 1.0)  # petrous ridge
        s.bone_path(arc((0.0, -1.5), (5.0, 6.5), 0, 200, 340, 14), 0.9, 1.0)  # mandible seen from below
        s.air_ellipse((0.0, 3.5), (1.5, 1.9), 0, 0.8)  # foramen magnum
        s.air_ellipse((0.0, -4.5), (2.0, 2.5), 0, 0.5)
        return
    if projection == "towne":
        s.bone_ring((0.0, -1.0), (7.4, 9.0), 0, 0.55, 0.9, shell=True)
        sutures(s, [[(0.0, -9.8), (-6.8, 0.5)], [(0.0, -9.8), (6.8, 0.5)]])  # lambdoid
        s.bone_path([(-6.5, 1.0), (-1.8, 4.0)], 0.9, 1.1)
        s.bone_path([(6.5, 1.0), (1.8, 4.0)], 0.9, 1.1)
        s.air_ellipse((0.0, 5.0), (1.6, 1.3), 0, 0.7)  # foramen magnum with the dorsum sellae in it
        s.bone_ellipse((0.0, 4.6), (0.5, 0.4), 0, 0.8, 0.6, 0.1)
        s.bone_path(arc((0.0, 5.5), (6.0, 3.5), 0, 15, 165, 14), 0.8, 0.8)  # mandibular condyles arc
        s.bone_path([(0.0, -10.0), (0.0, -3.0)], 0.25, 0.5)  # sagittal suture
        return
    s.bone_ring((0.0, -0.5), (7.5, 9.7), 0, 0.6, 0.9, shell=True)
    sutures(s, [[(0.0, -10.0), (0.0, -5.0)], [(0.0, -9.0), (-6.5, -2.0)], [(0.0, -9.0), (6.5, -2.0)]])
    orbit_y = 0.8 if projection != "waters" else -0.6
    petrous_y = {"pa": 1.2, "caldwell": 2.8, "waters": 5.6}[projection]
    for sign in (-1, 1):
        s.bone_ring((sign * 2.8, orbit_y), (1.6, 1.75), 0, 0.4, 0.8)
        s.bone_path([(sign * 1.3, petrous_y - 0.8), (sign * 6.8, petrous_y)], 0.7, 1.0)
        sinus = (sign * 2.6, orbit_y + (3.0 if projection == "waters" else 2.6))
        s.air_ellipse(sinus, (1.3, 1.5 if projection == "waters" else 1.2), 0, 0.9)
    s.air_ellipse((0.0, orbit_y - 3.0), (1.8, 0.9), 0, 0.6)  # frontal sinus
    s.air_poly(
        [(-1.0, orbit_y + 0.8), (1.0, orbit_y + 0.8), (1.4, orbit_y + 4.2), (-1.4, orbit_y + 4.2)], 0.7
    )
    s.bone_path([(0.0, orbit_y + 0.6), (0.0, orbit_y + 4.2)], 0.25, 0.7)  # septum
    jaw_top = orbit_y + 5.0
    s.bone_path(arc((0.0, jaw_top - 3.0), (5.6, 5.8), 0, 5, 175, 20), 1.0, 1.0)  # mandible
    for k in range(12):
        x = -4.0 + k * (8.0 / 11)
        for row in (0.0, 1.0):
            s.bone_ellipse((x, jaw_top - 0.2 + row), (0.33, 0.5), 0, 1.3, 0.9, 0.1)


def head_lateral(s, *, cells: float = 0.4) -> None:
    """Skull lateral: vault, sella, face to -x, mandible, cervical spine; ``cells``: mastoid air."""
    s.tissue_ellipse((0.0, -1.0), (10.3, 8.7), 0, 1.0)
    s.tissue_poly([(-9.5, 0.0), (-11.0, 2.5), (-9.3, 4.0), (-9.0, 8.5), (-3.0, 10.0), (3.0, 7.0)], 1.0)
    s.tissue_capsule((3.0, 5.0), (3.5, 14.0), 4.0, 1.0)
    s.bone_ring((0.0, -1.2), (9.5, 7.9), 0, 0.55, 0.9, shell=True)
    sutures(s, [[(-2.5, -9.0), (-3.5, -4.0), (-5.2, 0.5)], [(4.5, -7.8), (7.0, -3.5), (8.3, 0.5)]])
    s.bone_path([(-8.5, 1.0), (-3.0, 1.3), (0.0, 0.6)], 0.5, 0.9)  # anterior cranial base
    s.bone_path(arc((0.8, 0.5), (0.8, 0.6), 0, 0, 180, 8), 0.3, 1.0)  # sella turcica
    s.bone_path([(0.5, 1.2), (4.5, 3.0)], 1.2, 1.2)  # petrous / clivus
    s.bone_ring((-7.5, 1.2), (1.5, 1.6), 0, 0.35, 0.8)  # orbit rim
    s.air_ellipse((-6.0, 3.6), (1.8, 1.3), 0, 0.9)  # maxillary sinus
    s.air_ellipse((-7.8, -2.0), (0.9, 1.2), 0, 0.6)  # frontal sinus
    s.bone_path([(-9.2, 1.6), (-10.3, 3.4)], 0.35, 0.8)  # nasal bone
    s.bone_path([(2.5, 3.0), (2.0, 7.0), (-1.0, 8.8), (-7.0, 8.0)], 1.0, 1.0)  # mandible ramus and body
    s.air_poly([(-1.0, 4.8), (2.0, 5.5), (2.0, 9.0), (-0.5, 9.0)], 0.6)  # pharynx
    for k in range(9):
        s.bone_ellipse((-7.3 + k * 0.75, 6.0), (0.3, 0.6), 0, 1.3, 0.9, 0.1)
        s.bone_ellipse((-7.2 + k * 0.75, 7.3), (0.3, 0.6), 0, 1.3, 0.9, 0.1)
    for _ in range(int(6 + 18 * cells)):
        c = (4.5 + s.rng.uniform(-1.3, 1.3), 2.5 + s.rng.uniform(-1.2, 1.2))
        s.air_ellipse(c, (0.2 + 0.2 * cells, 0.2 + 0.2 * cells), 0, 0.9)
    s.bone_ellipse((3.8, 2.2), (0.5, 0.4), 0, 1.2, 0.2, 0.1)  # external auditory meatus ring
    for c in spine_points((3.4, 9.5), (4.2, 15.5), 4, -0.4):
        vertebra_lateral(s, c, 1.6, 1.1, posterior=0.7)


def cochlea(s) -> None:
    """Stenvers-like petrous close-up: a dense wedge, the cochlear spiral and canals as lucencies."""
    s.tissue_ellipse((0.0, 0.0), (12.0, 12.0), 0, 1.0)
    s.bone_poly([(-6.0, -1.5), (5.5, -3.5), (6.5, 1.5), (-5.0, 3.5)], 1.4, 0.8, 0.3)
    turns = np.linspace(0.0, 5.0 * np.pi, 60)
    radius = 1.1 * np.exp(-turns / 9.0)
    spiral = np.stack([0.3 + radius * np.cos(turns), radius * np.sin(turns) * 0.8], axis=1)
    s.bone_path(spiral, 0.2, 0.8)
    s.air_capsule((-2.5, -0.4), (-0.5, -0.2), 0.25, 0.5)  # internal auditory canal
    s.bone_ring((2.3, -1.3), (0.8, 0.7), 0, 0.18, 1.2)  # semicircular canal
    for _ in range(10):
        s.air_ellipse((3.5 + s.rng.uniform(-1.5, 1.5), 3.5 + s.rng.uniform(-1.0, 1.0)), (0.3, 0.3), 0, 0.7)


# -- thorax ----------------------------------------------------------------------------------------
# cardiomediastinal silhouette (patient's left at +x): SVC and right atrium on the right, aortic knob,
# pulmonary trunk and left ventricle on the left, resting on the diaphragm
HEART = np.concatenate(
    [
        [(-1.8, -14.0), (1.8, -14.0), (2.2, -10.5)],
        arc((3.0, -8.8), (1.2, 1.0), 0, 240, 420, 6),  # aortic knob
        [(3.4, -6.8), (4.4, -5.5)],  # pulmonary trunk
        arc((3.0, 2.0), (6.3, 5.8), 0, -75, 75, 12),  # left ventricle
        [(2.0, 7.8), (-3.0, 7.8)],
        arc((-1.5, 2.5), (3.0, 4.5), 0, 110, 250, 8),  # right atrium
        [(-2.4, -6.0), (-2.2, -10.0)],
    ]
)


def lung_outline(sign: float) -> np.ndarray:
    """One lung: apex, lateral chest wall to the costophrenic angle, then the diaphragm dome medially."""
    dome_top = 4.0 if sign < 0 else 4.8  # the right hemidiaphragm sits higher (the liver under it)
    lateral = [
        (sign * 3.0, -13.3),
        (sign * 6.5, -13.6),
        (sign * 10.5, -9.0),
        (sign * 12.3, -2.0),
        (sign * 12.6, 8.6),
    ]
    dome = [
        (sign * (12.6 - 10.4 * k), 8.6 - (8.6 - dome_top) * np.sin(np.pi * min(k * 1.25, 1.0) / 2))
        for k in np.linspace(0.0, 1.0, 10)[1:]
    ]
    return np.array(lateral + dome + [(sign * 2.0, 6.5), (sign * 1.9, -12.0)])


def pulmonary_vessels(s, hilum, sign: float, depth: int = 4) -> None:
    """Lung markings: arteries and veins branching from the hilum, tapering towards the periphery."""
    rng = s.rng

    def branch(p, angle, radius, level):
        length = rng.uniform(2.0, 3.6) * (0.8 ** (depth - level))
        a = np.radians(angle)
        end = p + length * np.array([np.cos(a), np.sin(a)])
        mid = (p + end) / 2 + rng.normal(0.0, 0.15, 2)
        s.vessel_path([p, mid, end], radius)
        if level > 1:
            for turn in (-1, 1):
                branch(end, angle + turn * rng.uniform(15, 35), radius * 0.72, level - 1)

    for angle in (-100, -65, -25, 15, 50, 85):
        base = angle if sign > 0 else 180 - angle
        branch(np.asarray(hilum, float), base + rng.uniform(-10, 10), 0.34, depth)


def chest_frontal(s, *, ribs_only: float = 0.0) -> None:
    """Chest PA/AP: lungs, heart, mediastinum, spine, ribs, clavicles, shoulders. Patient's left at +x."""
    s.tissue_poly(
        [(-14.0, -13.0), (-6.0, -15.5), (6.0, -15.5), (14.0, -13.0), (14.5, 14.0), (-14.5, 14.0)], 1.0
    )
    s.tissue_capsule((0.0, -19.0), (0.0, -13.0), 3.5, 1.0)
    for sign in (-1, 1):
        s.air_poly(lung_outline(sign), 1.5 + 0.5 * ribs_only)
    s.air_poly(HEART, 0.0)  # heart and great vessels replace lung
    for sign in (-1, 1):
        pulmonary_vessels(s, (sign * 3.2, -2.5), sign)
    s.air_capsule((0.0, -18.0), (0.3, -4.0), 0.6, 0.5)  # trachea
    s.air_ellipse((5.5, 9.0), (2.5, 1.4), 0, 0.7)  # gastric bubble under the left dome
    for k, c in enumerate(spine_points((0.0, -14.0), (0.0, 13.0), 12)):
        vertebra_ap(s, c, 2.6 + 0.1 * k, 1.7 + 0.04 * k, density=0.5)
    for k in range(10):
        y = -12.5 + k * 2.25
        for sign in (-1, 1):
            post = arc(
                (sign * 5.5, y + 3.0),
                (7.0 + 0.4 * k, 3.2),
                0,
                200 if sign < 0 else -20,
                290 if sign < 0 else -110,
                14,
            )
            s.bone_path(post, 0.75, 0.55 + 0.2 * ribs_only)
            ant = [(sign * (11.0 + 0.3 * k), y + 1.0), (sign * 6.0, y + 3.8), (sign * 3.0, y + 4.8)]
            s.bone_path(ant, 0.55, 0.25 + 0.1 * ribs_only)
    for sign in (-1, 1):
        s.bone_path([(sign * 1.6, -13.2), (sign * 6.0, -14.5), (sign * 12.5, -15.2)], 1.0, 0.85)  # clavicle
        s.bone_ellipse((sign * 14.8, -12.5), (2.0, 2.2), 0, 0.8, 0.6, 0.2)  # humeral head
        s.bone_poly(
            [(sign * 13.5, -14.0), (sign * 12.0, -4.0), (sign * 9.0, -11.0)], 0.4, 0.6, 0.2, plate=0.8
        )  # scapula


def chest_lateral(s) -> None:
    """Chest lateral: anterior at -x; sternum, retrosternal air, heart, spine posteriorly, arms raised."""
    s.tissue_poly([(-9.0, -14.0), (8.0, -14.0), (10.0, 14.0), (-10.0, 14.0)], 1.0)
    s.air_poly([(-7.5, -12.0), (5.0, -12.5), (8.0, 8.0), (-8.0, 10.5)], 1.5)
    # heart: anterior and low, against the sternum and on the diaphragm; the great vessels above it
    s.air_poly(
        [(-8.6, 2.5), (-6.5, -1.0), (-3.5, -2.2), (-1.2, -0.8), (0.2, 3.0), (0.0, 8.6), (-8.8, 9.6)], 0.0
    )
    s.air_capsule((-2.2, -1.5), (0.3, -9.5), 0.9, 0.0)  # ascending aorta and arch
    pulmonary_vessels(Frame(s, squeeze=0.6), (1.0, -1.5), -1.0, depth=4)
    s.air_capsule((-1.0, -15.0), (0.5, -3.0), 0.6, 0.5)
    s.bone_path([(-8.8, -12.5), (-9.5, -3.0), (-9.0, 6.0)], 1.0, 0.7)  # sternum
    for c in spine_points((5.2, -13.0), (6.0, 13.0), 11, 1.0):
        vertebra_lateral(s, c, 2.4, 1.7, posterior=0.6, density=0.7)
    for k in range(9):
        y = -11.0 + k * 2.5
        s.bone_path(arc((0.0, y + 4.0), (8.5, 4.0), 0, 200, 330, 12), 0.5, 0.3)
    s.bone_path([(2.0, -14.0), (4.0, -20.0)], 2.5, 0.7)  # raised humeri
    s.bone_path([(-2.0, -14.0), (-1.0, -20.0)], 2.5, 0.7)


def chest_decubitus(s) -> None:
    """Lateral decubitus: the frontal chest lying on its side, with the dependent fluid level flat."""
    chest_frontal(Frame(s, angle_deg=90.0))
    s.air_poly([(-14.0, 10.0), (14.0, 10.0), (14.0, 14.0), (-14.0, 14.0)], 0.0)


def clavicle(s) -> None:
    s.tissue_poly([(-12.0, -6.0), (12.0, -7.0), (12.0, 8.0), (-12.0, 8.0)], 1.0)
    s.air_poly([(-12.0, -1.0), (6.0, -1.0), (8.0, 8.0), (-12.0, 8.0)], 1.0)
    for k in range(4):
        s.bone_path(arc((-4.0, 1.0 + 2.5 * k), (11.0, 3.0), 0, 190, 330, 12), 0.8, 0.55)
    s.bone_path([(-9.0, -1.0), (-4.0, -2.3), (3.0, -2.0), (8.0, -3.2)], 1.5, 0.95)
    s.bone_ellipse((10.5, -1.5), (2.2, 2.4), 0, 0.85, 0.6, 0.25)
    s.bone_path([(8.0, -3.2), (10.5, -4.0)], 1.3, 0.8)  # acromion
    s.bone_poly([(9.0, -2.0), (8.0, 6.0), (4.0, 0.0)], 0.5, 0.6, 0.2)


# -- abdomen -------------------------------------------------------------------------------------
def bowel_gas(s, box, n: int, upright: bool = False) -> None:
    x0, y0, x1, y1 = box
    rng = s.rng
    for _ in range(n):
        c = (rng.uniform(x0, x1), rng.uniform(y0, y1))
        a = (rng.uniform(0.6, 1.8), rng.uniform(0.5, 1.2))
        if upright:
            # fluid level: gas above a flat horizontal line
            s.air_poly(arc(c, a, 0, 180, 360, 10), rng.uniform(0.4, 0.8))
        else:
            s.air_ellipse(c, a, rng.uniform(0, 180), rng.uniform(0.3, 0.7))
    # colon frame
    s.air_capsule((x0, y1), (x0, y0), 1.2, 0.35)
    s.air_capsule((x0, y0), (x1, y0), 1.2, 0.35)
    s.air_capsule((x1, y0), (x1, y1), 1.2, 0.35)


def abdomen_frontal(s, *, top: float = -14.0, upright: bool = False) -> None:
    """Abdomen AP from ``top`` (diaphragm end) to the pubis; lumbar spine, lower ribs, pelvis, bowel gas."""
    s.tissue_poly([(-13.5, top - 3.0), (13.5, top - 3.0), (14.5, 18.0), (-14.5, 18.0)], 1.0)
    if top < -12.0:
        for sign in (-1, 1):
            s.air_poly(
                [
                    (sign * 2.0, top - 3.0),
                    (sign * 12.0, top - 3.0),
                    (sign * 12.5, top + 1.0),
                    (sign * 6.0, top + 2.5),
                    (sign * 2.0, top + 1.5),
                ],
                1.2,
            )
        s.air_ellipse((5.0, top + 4.0), (3.0, 1.8), 0, 0.7)  # stomach bubble
    for k in range(3):
        y = top + 1.0 + 2.2 * k
        for sign in (-1, 1):
            s.bone_path(arc((sign * 3.0, y), (8.5, 4.0), 0, 20 if sign > 0 else 160, 90, 10), 0.6, 0.5)
    for c in spine_points((0.0, max(top, -12.0)), (0.0, 6.0), 6):
        vertebra_ap(s, c, 3.6, 2.3, density=0.7, transverse=0.45)
    bowel_gas(s, (-8.0, -6.0, 8.0, 9.0), 14, upright)
    pelvis_ap(Frame(s, (0.0, 12.0), scale=0.95), include_femurs=False)
    s.tissue_ellipse((-8.0, -3.0), (3.0, 5.0), 20, 1.25)  # liver / psoas bulk
    if upright:
        s.air_poly(arc((5.5, top + 1.0), (3.5, 1.5), 0, 180, 360, 10), 0.9)


def abdomen_lateral(s) -> None:
    s.tissue_poly([(-13.0, -16.0), (10.0, -16.0), (10.5, 18.0), (-14.0, 18.0)], 1.0)
    bowel_gas(s, (-9.0, -8.0, 3.0, 9.0), 14)
    for c in spine_points((6.0, -12.0), (6.5, 6.0), 6, 1.0):
        vertebra_lateral(s, c, 3.6, 2.4, posterior=0.6, density=0.75)
    s.bone_poly([(4.0, 7.5), (9.0, 7.0), (8.0, 15.0), (5.0, 14.0)], 0.75, 0.6, 0.35)  # sacrum
    s.bone_poly(
        [(-4.0, 6.0), (6.0, 7.0), (4.0, 13.0), (-5.0, 12.0)], 0.45, 0.6, 0.3
    )  # iliac wings overlapped


# -- spine -----------------------------------------------------------------------------------------
SPINE_LEVELS = {"C": (7, 1.7, 1.05), "T": (12, 2.4, 1.7), "L": (5, 3.8, 2.4)}


def spine_ap(s, levels: str, *, top: float = 0.0, bend: float = 0.0, ribs: bool = True) -> float:
    """A stack of vertebrae (AP) of the regions ('C', 'T', 'L', in order) from ``top``; returns the bottom."""
    y = top
    for region in levels:
        n, w, h = SPINE_LEVELS[region]
        pts = spine_points((0.0, y + h / 2), (0.0, y + (n - 0.5) * h * 1.3), n, bend)
        for k, c in enumerate(pts):
            vertebra_ap(s, c, w * (1 + 0.02 * k), h, transverse=0.25 if region == "C" else 0.45)
            if region == "T" and ribs:
                for sign in (-1, 1):
                    s.bone_path(
                        arc(
                            (c[0] + sign * 6.0, c[1] + 2.5),
                            (6.0, 3.0),
                            0,
                            200 if sign < 0 else -20,
                            280 if sign < 0 else -100,
                            10,
                        ),
                        0.7,
                        0.45,
                    )
        y += n * h * 1.3
    return y


def spine_lateral(s, levels: str, *, top: float = 0.0, curve: float = 1.0) -> float:
    y = top
    for region in levels:
        n, w, h = SPINE_LEVELS[region]
        sign = -1.0 if region in "CL" else 1.0  # lordosis bows forward (-x), kyphosis backward
        pts = spine_points(
            (0.0, y + h / 2), (0.0, y + (n - 0.5) * h * 1.3), n, sign * curve * h * 0.5 * n / 5
        )
        for c in pts:
            vertebra_lateral(s, c, w * (1.1 if region != "C" else 1.0), h, posterior=0.8)
        y += n * h * 1.3
    return y


def lumbar_oblique(s) -> None:
    """The 'Scotty dog' oblique: bodies shifted, pars and pedicle eyes drawn over them."""
    s.tissue_poly([(-12.0, -16.0), (12.0, -16.0), (12.0, 14.0), (-12.0, 14.0)], 1.0)
    bowel_gas(s, (-9.0, -8.0, 9.0, 8.0), 6)
    for c in spine_points((0.0, -11.0), (0.0, 9.0), 5, 0.6):
        vertebra_ap(Frame(s, squeeze=0.75), c, 3.6, 2.4, transverse=0.25, spinous=False)
        s.bone_ellipse((c[0] + 1.4, c[1] - 0.4), (0.45, 0.6), 0, 0.8, 0.3, 0.15)  # eye: pedicle
        s.bone_path(
            [(c[0] + 1.9, c[1] - 0.6), (c[0] + 3.0, c[1] - 0.9)], 0.6, 0.7
        )  # nose: transverse process
        s.bone_path([(c[0] + 1.2, c[1] + 0.3), (c[0] + 1.6, c[1] + 1.5)], 0.45, 0.7)  # neck: pars
    s.bone_poly([(-4.0, 10.5), (4.0, 10.5), (2.5, 16.0), (-2.5, 16.0)], 0.75, 0.6, 0.3)


# -- pelvis ------------------------------------------------------------------------------------------
def pelvis_ap(s, *, include_femurs: bool = True, frog: bool = False, squeeze: float = 1.0) -> None:
    """Pelvis AP centred between the hips: iliac wings, sacrum, pubis, acetabula, femoral heads."""
    m = s.maturity
    f = Frame(s, squeeze=squeeze)
    f.tissue_poly([(-16.0, -10.0), (16.0, -10.0), (17.0, 16.0), (-17.0, 16.0)], 1.0)
    f.bone_poly([(-3.5, -6.0), (3.5, -6.0), (2.0, 2.5), (0.0, 4.0), (-2.0, 2.5)], 0.8, 0.6, 0.3)  # sacrum
    for k in range(4):
        f.air_ellipse((-1.6, -4.5 + 1.8 * k), (0.35, 0.3), 0, 0.3)
        f.air_ellipse((1.6, -4.5 + 1.8 * k), (0.35, 0.3), 0, 0.3)
    for sign in (-1, 1):
        wing = [
            (sign * 3.2, -5.5),
            (sign * 8.0, -9.5),
            (sign * 13.5, -8.0),
            (sign * 12.5, -2.0),
            (sign * 9.5, 3.0),
            (sign * 4.0, 1.5),
        ]
        f.bone_poly(wing, 0.75, 0.5, 0.35, plate=1.0)  # the iliac wing is a thin plate seen en face
        f.bone_ring((sign * 4.5, 6.5), (2.4, 1.8), 0, 0.7, 0.8)  # obturator ring
        f.bone_path([(sign * 0.6, 5.2), (sign * 3.5, 4.8), (sign * 7.5, 4.0)], 1.2, 0.85)  # superior ramus
        hip = (sign * 9.5, 3.0)
        f.bone_path(
            arc(hip, (2.8, 2.8), 0, 180 if sign < 0 else -60, 240 if sign < 0 else 0, 10)
            if sign < 0
            else arc(hip, (2.8, 2.8), 0, -60, 0, 10),
            1.0,
            0.9,
        )
        f.bone_path(arc(hip, (2.9, 2.9), 0, 200, 340, 12), 1.0, 0.9)  # acetabular roof
        if include_femurs:
            e = m.epiphysis("femur_head")
            if e.present:
                f.bone_ellipse((hip[0], hip[1] + 0.3), (2.3 * e.width, 2.0 * e.width), 0, 0.9, 0.6, 0.25)
            angle = sign * (40.0 if frog else 8.0)
            shaft_end = np.asarray(hip) + rotate([(0.0, 14.0)], angle)[0] + (sign * 1.5, 0.0)
            neck = (hip[0] + sign * 1.8 + sign * (1.5 if frog else 0.0), hip[1] + 2.6)
            f.bone_path([(hip[0], hip[1] + 0.8 + 0.6 * e.physis), neck], 2.6, 0.85)
            f.long_bone(neck, shaft_end, (4.5, 3.0, 2.8, 2.8), density=0.95)
            f.bone_ellipse((neck[0] + sign * 1.6, neck[1] + 0.2), (1.3, 1.7), 0, 0.7, 0.6, 0.2)  # trochanter
    f.air_ellipse((3.0, -2.0), (2.0, 1.4), 0, 0.4)  # rectal / sigmoid gas


def pelvis_lateral(s, *, single_hip: bool = False) -> None:
    """Lateral pelvis (both halves superimposed) or the cross-table lateral of one hip."""
    s.tissue_poly([(-12.0, -12.0), (11.0, -12.0), (12.0, 14.0), (-12.0, 14.0)], 1.0)
    if single_hip:
        s.bone_ellipse((0.0, 0.0), (2.4, 2.4), 0, 0.9, 0.6, 0.25)
        s.bone_path([(0.0, 0.0), (4.0, 1.0)], 2.4, 0.85)
        s.long_bone((3.5, 1.0), (13.0, 3.0), (4.0, 3.0, 2.8), density=0.95)
        s.bone_path(arc((0.0, 0.0), (3.0, 3.0), 0, 100, 260, 10), 1.1, 0.9)
        s.bone_poly([(-2.0, -3.0), (-4.0, -11.0), (-9.0, -10.0), (-5.0, 0.0)], 0.5, 0.5, 0.3)
        s.bone_path([(-1.5, 2.5), (-6.0, 7.0)], 1.3, 0.7)
        return
    s.bone_poly([(3.0, -9.0), (7.5, -8.0), (8.0, 0.0), (6.0, 6.0), (4.5, 0.0)], 0.85, 0.6, 0.35)  # sacrum
    s.bone_poly([(-6.0, -11.0), (3.0, -9.0), (4.0, -2.0), (0.0, 2.0), (-7.0, -3.0)], 1.1, 0.55, 0.4)  # ilia
    for dx in (0.0, 0.8):
        s.bone_ellipse((-1.0 + dx, 3.0 + dx), (2.4, 2.4), 0, 0.7, 0.6, 0.25)
        s.long_bone((-0.5 + dx, 5.0), (-2.0 + dx, 15.0), (3.5, 2.8, 2.8), density=0.8)
    s.bone_ring((-4.5, 7.5), (2.0, 2.5), 0, 0.8, 0.9)
    for c in spine_points((4.0, -20.0), (4.8, -11.0), 3, 0.5):
        vertebra_lateral(s, c, 3.6, 2.4, posterior=0.6)


def sacrum_coccyx(s, *, si_joint: bool = False) -> None:
    """Close-up of the sacrum (and coccyx), or the angled view of the sacroiliac joints."""
    s.tissue_poly([(-12.0, -12.0), (12.0, -12.0), (12.0, 12.0), (-12.0, 12.0)], 1.0)
    s.bone_poly([(-5.0, -7.0), (5.0, -7.0), (3.0, 4.0), (0.0, 6.0), (-3.0, 4.0)], 0.9, 0.6, 0.35)
    for k in range(4):
        for sign in (-1, 1):
            s.air_ellipse((sign * 2.2, -5.0 + 2.3 * k), (0.5, 0.4), 0, 0.4)
        s.bone_path([(-2.5 + 0.3 * k, -5.8 + 2.3 * k), (2.5 - 0.3 * k, -5.8 + 2.3 * k)], 0.2, 0.4)
    for k in range(4):
        s.bone_ellipse((0.0, 7.2 + 1.2 * k), (0.8 - 0.15 * k, 0.5), 0, 0.7, 0.6, 0.12)
    for sign in (-1, 1):
        wing = [
            (sign * 4.6, -6.5),
            (sign * 10.0, -11.0),
            (sign * 14.0, -6.0),
            (sign * 8.0, 4.0),
            (sign * 3.5, 2.0),
        ]
        s.bone_poly(wing, 0.8, 0.5, 0.35, plate=1.0)
        if si_joint:
            s.air_capsule((sign * 4.4, -6.0), (sign * 3.6, 2.0), 0.25, 0.6)
    vertebra_ap(s, (0.0, -9.5), 4.0, 2.5, density=0.75)
    if si_joint:
        s.bone_path([(-3.0, -5.0), (3.0, -5.0)], 0.3, 0.3)
