"""The 68 registered views: which anatomy, in which projection, under which collimated field.

Views of one region share a drawing with parameters (projection, zoom centre, foreshortening); the field
sizes are centimetres, either fixed (the radiographer collimates to the part) or a function of the child's
size for the hand-and-arm family, where bone length itself carries the age signal.
"""

from __future__ import annotations

from . import axial, limbs
from .canvas import arc
from .frame import Frame
from .spec import view

EXTREMITY = {"beam": "extremity"}
TRUNK = {"beam": "trunk", "grid": True, "devices": 0.08}
HEAD = {"beam": "head", "grid": True}
# distal radius and ulna: the common paediatric wrist fractures (torus, greenstick, Salter-Harris II)
DISTAL_FOREARM = ("buckle", "buckle", "greenstick", "salter_harris_2")


def at(s, cx: float, cy: float, **kw) -> Frame:
    """A frame that puts scene point (cx, cy) of the drawing at the field centre."""
    return Frame(s, (-cx, -cy), **kw)


def hand_len(s) -> float:
    return s.maturity.hand_length_cm


def by_hand(width: float, height: float, margin: tuple[float, float] = (0.0, 0.0)):
    """A field collimated to the hand; ``margin`` (cm) is the slack radiographers leave, which makes a small
    child's hand fill less of the image than a teenager's."""
    return lambda m: (width * m.hand_length_cm + margin[0], height * m.hand_length_cm + margin[1])


HAND_MARGIN = (2.5, 4.0)


def by_growth(width: float, height: float, pad: float = 4.0):
    return lambda m: (width * m.growth + pad, height * m.growth + pad)


# -- head ----------------------------------------------------------------------------------------
view("Skull_AP", (22.0, 26.0), paired=False, **HEAD)(lambda s: axial.head_frontal(s, projection="pa"))
view("Skull_Towne", (22.0, 26.0), paired=False, **HEAD)(lambda s: axial.head_frontal(s, projection="towne"))
view("Skull_Lateral", (26.0, 22.0), paired=False, **HEAD)(lambda s: axial.head_lateral(s))
view("Skull_Tangential", (12.0, 10.0), paired=False, **HEAD)(lambda s: axial.head_lateral(at(s, -2.0, -9.2)))
view("Orbit", (17.0, 12.0), paired=False, **HEAD)(
    lambda s: axial.head_frontal(at(s, 0.0, 1.5), projection="caldwell")
)
view("Nose_PNS", (18.0, 18.0), paired=False, **HEAD)(
    lambda s: axial.head_frontal(at(s, 0.0, 2.0), projection="waters")
)
view("Nose_Lateral", (9.0, 9.0), paired=False, **HEAD)(lambda s: axial.head_lateral(at(s, -8.3, 2.0)))
view("Mandible", (20.0, 14.0), paired=False, **HEAD)(lambda s: axial.head_frontal(at(s, 0.0, 5.5)))
view("Mastoid", (10.0, 10.0), **HEAD)(lambda s: axial.head_lateral(at(s, 4.2, 2.4), cells=1.0))
view("Cochlea", (10.0, 10.0), **HEAD)(axial.cochlea)
view("Zygomatic", (24.0, 24.0), paired=False, **HEAD)(lambda s: axial.head_frontal(s, projection="smv"))


# -- chest and abdomen -----------------------------------------------------------------------------
view("Chest_Frontal", (32.0, 34.0), paired=False, **(TRUNK | {"devices": 0.2}))(axial.chest_frontal)
view("Chest_Lateral", (26.0, 32.0), paired=False, **TRUNK)(axial.chest_lateral)
view("Chest_Decubitus", (34.0, 30.0), paired=False, **TRUNK)(axial.chest_decubitus)
view("Chest_Rib", (18.0, 26.0), **TRUNK)(
    lambda s: axial.chest_frontal(at(s, 7.0, -2.0, squeeze=0.85), ribs_only=1.0)
)
view("Chest_Clavicle", (24.0, 14.0), **TRUNK)(axial.clavicle)
view("Abdomen_KUB", (30.0, 34.0), paired=False, **TRUNK)(
    lambda s: axial.abdomen_frontal(at(s, 0.0, 3.0), top=-9.0)
)
view("Abdomen_Supine", (32.0, 38.0), paired=False, **TRUNK)(lambda s: axial.abdomen_frontal(at(s, 0.0, 1.0)))
view("Abdomen_Upright", (32.0, 38.0), paired=False, **TRUNK)(
    lambda s: axial.abdomen_frontal(at(s, 0.0, 0.0), top=-15.0, upright=True)
)
view("Abdomen_Lateral", (28.0, 36.0), paired=False, **TRUNK)(
    lambda s: axial.abdomen_lateral(at(s, -1.0, 1.0))
)


# -- spine -----------------------------------------------------------------------------------------
def neck(s) -> None:
    s.tissue_poly([(-7.0, -10.0), (7.0, -10.0), (6.0, 10.0), (-6.0, 10.0)], 1.0)
    s.air_capsule((0.0, -8.0), (0.0, 10.0), 0.8, 0.5)


@view("C_Spine_AP", (13.0, 18.0), paired=False, **TRUNK)
def c_spine_ap(s) -> None:
    neck(s)
    axial.spine_ap(s, "CT", top=-7.0, ribs=True)
    s.bone_path(arc((0.0, -12.5), (5.5, 4.5), 0, 10, 170, 16), 1.0, 1.0)  # mandible over the upper levels
    for sign in (-1, 1):
        s.bone_path([(sign * 1.5, 7.5), (sign * 8.0, 6.0)], 1.0, 0.8)


@view("C_Spine_Atlas", (12.0, 10.0), paired=False, **HEAD)
def c_spine_atlas(s) -> None:
    s.tissue_ellipse((0.0, 0.0), (8.0, 7.0), 0, 1.0)
    s.air_poly([(-3.5, -2.6), (3.5, -2.6), (3.0, 2.6), (-3.0, 2.6)], 0.7)  # open mouth
    for k in range(8):
        x = -3.2 + k * (6.4 / 7)
        s.bone_ellipse((x, -3.3), (0.35, 0.65), 0, 1.3, 0.9, 0.1)
        s.bone_ellipse((x, 3.3), (0.35, 0.65), 0, 1.3, 0.9, 0.1)
    for sign in (-1, 1):
        s.bone_poly(
            [(sign * 0.9, -1.5), (sign * 3.0, -1.8), (sign * 3.2, 0.0), (sign * 1.0, 0.2)], 0.9, 0.6, 0.2
        )
    m = s.maturity
    s.bone_poly([(-0.6, -1.9), (0.6, -1.9), (0.8, 1.0), (-0.8, 1.0)], 0.85, 0.6, 0.15)  # dens
    s.bone_poly(
        [(-2.2, 1.0 + 0.3 * (m.skeletal_years < 4)), (2.2, 1.0), (2.0, 2.8), (-2.0, 2.8)], 0.85, 0.6, 0.2
    )
    s.bone_path([(-4.5, -2.5), (-3.8, -4.5)], 0.9, 0.9)
    s.bone_path([(4.5, -2.5), (3.8, -4.5)], 0.9, 0.9)


@view("C_Spine_Lateral", (14.0, 18.0), paired=False, **TRUNK)
def c_spine_lateral(s) -> None:
    s.tissue_poly([(-7.0, -10.0), (6.0, -10.0), (6.5, 10.0), (-5.5, 10.0)], 1.0)
    s.air_capsule((-3.0, -6.0), (-2.2, 9.0), 0.8, 0.6)  # airway in front
    axial.spine_lateral(Frame(s, (1.0, 0.0)), "C", top=-7.5, curve=1.2)
    s.bone_path([(-1.0, -9.0), (-6.5, -6.0)], 1.2, 1.0)  # mandible angle
    s.bone_poly([(-2.0, -10.5), (4.5, -10.5), (5.0, -8.2), (-1.5, -8.5)], 0.9, 0.6, 0.3)  # occiput / C1 arch


@view("T_Spine_AP", (16.0, 36.0), paired=False, **TRUNK)
def t_spine_ap(s) -> None:
    s.tissue_poly([(-12.0, -20.0), (12.0, -20.0), (12.0, 20.0), (-12.0, 20.0)], 1.0)
    for sign in (-1, 1):
        s.air_poly([(sign * 2.5, -16.0), (sign * 12.0, -12.0), (sign * 12.0, 14.0), (sign * 2.5, 12.0)], 1.0)
    axial.spine_ap(s, "T", top=-15.5)


@view("T_L_Spine", (22.0, 50.0), paired=False, **TRUNK)
def t_l_spine(s) -> None:
    s.tissue_poly([(-13.0, -27.0), (13.0, -27.0), (14.0, 27.0), (-14.0, 27.0)], 1.0)
    for sign in (-1, 1):
        s.air_poly([(sign * 2.5, -24.0), (sign * 12.0, -20.0), (sign * 12.0, 0.0), (sign * 2.5, -2.0)], 0.9)
    axial.spine_ap(s, "TL", top=-24.0, bend=s.rng.uniform(-1.5, 1.5))
    axial.bowel_gas(s, (-9.0, 4.0, 9.0, 18.0), 6)


@view("L_Spine_AP", (20.0, 26.0), paired=False, **TRUNK)
def l_spine_ap(s) -> None:
    s.tissue_poly([(-13.0, -15.0), (13.0, -15.0), (14.0, 15.0), (-14.0, 15.0)], 1.0)
    axial.bowel_gas(s, (-9.0, -9.0, 9.0, 6.0), 8)
    axial.spine_ap(s, "L", top=-12.0, ribs=False)
    axial.pelvis_ap(Frame(s, (0.0, 16.0)), include_femurs=False)


@view("L_Spine_Lateral", (18.0, 26.0), paired=False, **TRUNK)
def l_spine_lateral(s) -> None:
    s.tissue_poly([(-11.0, -15.0), (10.0, -15.0), (10.0, 15.0), (-11.0, 15.0)], 1.0)
    axial.bowel_gas(s, (-9.0, -9.0, -3.0, 6.0), 5)
    axial.spine_lateral(Frame(s, (1.0, 0.0)), "L", top=-13.0, curve=1.0)
    s.bone_poly([(0.0, 3.5), (4.0, 3.0), (5.0, 13.0), (2.0, 12.0)], 0.85, 0.6, 0.35)  # sacrum


view("L_Spine_Oblique", (20.0, 26.0), **TRUNK)(axial.lumbar_oblique)


@view("Whole_Spine_AP", (34.0, 88.0), paired=False, **TRUNK)
def whole_spine_ap(s) -> None:
    s.tissue_poly([(-16.0, -46.0), (16.0, -46.0), (17.0, 46.0), (-17.0, 46.0)], 1.0)
    s.tissue_ellipse((0.0, -46.0), (8.0, 8.0), 0, 1.0)
    bend = s.rng.uniform(-3.5, 3.5)  # scoliosis is why the view is ordered
    for sign in (-1, 1):
        s.air_poly([(sign * 2.5, -30.0), (sign * 13.0, -25.0), (sign * 13.0, -3.0), (sign * 2.5, -5.0)], 1.2)
    bottom = axial.spine_ap(s, "CTL", top=-40.0, bend=bend)
    axial.pelvis_ap(Frame(s, (0.0, bottom + 9.0)), include_femurs=True)
    axial.bowel_gas(s, (-9.0, 5.0, 9.0, 20.0), 6)


# -- pelvis ---------------------------------------------------------------------------------------
view("Pelvis_AP", (36.0, 28.0), paired=False, **TRUNK)(lambda s: axial.pelvis_ap(at(s, 0.0, 2.0)))
view("Pelvis_Frogleg", (36.0, 28.0), paired=False, **TRUNK)(
    lambda s: axial.pelvis_ap(at(s, 0.0, 2.0), frog=True)
)
view("Pelvis_Oblique", (30.0, 28.0), **TRUNK)(lambda s: axial.pelvis_ap(at(s, -3.0, 2.0), squeeze=0.7))
view("Pelvis_Lateral", (26.0, 28.0), paired=False, **TRUNK)(lambda s: axial.pelvis_lateral(at(s, 0.0, 1.0)))
view("Pelvis_Translateral", (24.0, 20.0), **TRUNK)(
    lambda s: axial.pelvis_lateral(at(s, 2.0, 0.0), single_hip=True)
)
view("Pelvis_SI_Joint", (20.0, 18.0), paired=False, **TRUNK)(
    lambda s: axial.sacrum_coccyx(at(s, 0.0, -3.0, scale=1.1), si_joint=True)
)
view("Pelvis_Coccyx_Sacrum", (18.0, 24.0), paired=False, **TRUNK)(
    lambda s: axial.sacrum_coccyx(at(s, 0.0, 1.0))
)


# -- upper extremity -------------------------------------------------------------------------------
WRIST_FRACTURES = {
    "radius": (0.05, 0.16, DISTAL_FOREARM),
    "ulna": (0.04, 0.12, ("buckle", "greenstick", "salter_harris_2")),
}
FOREARM_CAST = {"castable": True}


def hand_view(squeeze: float, spread: float, cy: float):
    def draw(s) -> None:
        L = hand_len(s)
        limbs.hand(at(s, 0.0, -cy * L, squeeze=squeeze), L, spread=spread)

    return draw


view("Hand_PA", by_hand(0.82, 1.42, HAND_MARGIN), **EXTREMITY)(hand_view(1.0, 1.0, 0.42))
view("Hand_Oblique", by_hand(0.7, 1.42, HAND_MARGIN), **EXTREMITY)(hand_view(0.62, 0.8, 0.42))
view("Hand_Lateral", by_hand(0.6, 1.42, HAND_MARGIN), **EXTREMITY)(hand_view(0.28, 0.5, 0.42))
view("Wrist_AP", by_hand(0.62, 0.72), fracture_sites=WRIST_FRACTURES, **FOREARM_CAST, **EXTREMITY)(
    hand_view(1.0, 1.0, -0.02)
)
view("Wrist_Oblique", by_hand(0.55, 0.72), fracture_sites=WRIST_FRACTURES, **FOREARM_CAST, **EXTREMITY)(
    hand_view(0.65, 0.9, -0.02)
)


@view("Finger", by_hand(0.3, 0.62), **EXTREMITY)
def finger(s) -> None:
    L = hand_len(s)
    limbs.hand(at(s, 0.035 * L, -0.72 * L), L, fingers=(2,))


@view(
    "Forearm_Oblique",
    by_hand(0.62, 1.85),
    fracture_sites={
        "radius": (0.05, 0.6, ("buckle", "greenstick", "greenstick")),
        "ulna": (0.05, 0.6, ("buckle", "greenstick", "greenstick")),
    },
    **FOREARM_CAST,
    **EXTREMITY,
)
def forearm_oblique(s) -> None:
    L = hand_len(s)
    limbs.upper_limb(at(s, 0.0, 0.62 * L), L, squeeze=0.8, spread=0.8)


@view("Upper_Extremity_Other", by_hand(1.0, 4.2), **EXTREMITY)
def upper_extremity_other(s) -> None:
    L = hand_len(s)
    limbs.upper_limb(at(s, 0.0, 0.95 * L), L)


view(
    "Elbow_Lateral",
    by_hand(1.3, 1.3),
    fracture_sites={"humerus": (0.1, 0.2, ("supracondylar",))},
    **EXTREMITY,
)(lambda s: limbs.elbow_lateral(at(s, 0.2 * hand_len(s), -0.2 * hand_len(s)), hand_len(s)))
view("Humerus_Oblique", (16.0, 42.0), **EXTREMITY)(limbs.humerus_oblique)
view("Shoulder_AP", (24.0, 22.0), **TRUNK)(lambda s: limbs.shoulder(at(s, -1.0, 1.0)))
view("Shoulder_Axial", (26.0, 16.0), **TRUNK)(lambda s: limbs.shoulder(s, axial=True))


# -- lower extremity -------------------------------------------------------------------------------
ANKLE_FRACTURES = {
    "tibia": (0.88, 0.96, ("buckle", "salter_harris_2")),
    "fibula": (0.84, 0.94, ("buckle", "greenstick")),
}

view("Ankle_AP", (14.0, 18.0), fracture_sites=ANKLE_FRACTURES, castable=True, **EXTREMITY)(
    lambda s: limbs.ankle(at(s, 0.0, -2.5), projection="ap")
)
view("Ankle_Mortise", (14.0, 18.0), fracture_sites=ANKLE_FRACTURES, castable=True, **EXTREMITY)(
    lambda s: limbs.ankle(at(s, 0.0, -2.5), projection="mortise")
)
view("Ankle_Lateral", (20.0, 18.0), fracture_sites=ANKLE_FRACTURES, castable=True, **EXTREMITY)(
    lambda s: limbs.ankle(at(s, 2.0, -1.5), projection="lateral")
)
view("Ankle_Stress", (16.0, 18.0), **EXTREMITY)(lambda s: limbs.ankle(at(s, 0.5, -2.5), projection="stress"))
view("Knee_AP", (16.0, 22.0), **EXTREMITY)(lambda s: limbs.knee(s, projection="ap"))
view("Knee_Oblique", (15.0, 22.0), **EXTREMITY)(lambda s: limbs.knee(s, projection="oblique"))
view("Knee_Stress", (20.0, 22.0), **EXTREMITY)(lambda s: limbs.knee(at(s, 1.0, 0.0), projection="stress"))
view("Knee_Lateral", (20.0, 22.0), **EXTREMITY)(lambda s: limbs.knee(at(s, -1.0, 0.0), projection="lateral"))
view("Knee_Skyline", (22.0, 16.0), **EXTREMITY)(limbs.knee_skyline)
view("Leg_AP", (14.0, 42.0), **EXTREMITY)(lambda s: limbs.leg(s, knee=(0.0, -18.0), ankle=(0.0, 17.0)))
view("Leg_Oblique", (13.0, 42.0), **EXTREMITY)(
    lambda s: limbs.leg(Frame(s, squeeze=0.8), knee=(0.0, -18.0), ankle=(0.0, 17.0), overlap=0.6)
)
view("Foot_AP", (14.0, 24.0), **EXTREMITY)(lambda s: limbs.foot(at(s, 0.0, -4.0), projection="ap"))
view("Foot_Oblique", (13.0, 24.0), **EXTREMITY)(lambda s: limbs.foot(at(s, 0.0, -4.0), projection="oblique"))
view("Foot_Lateral", (26.0, 14.0), **EXTREMITY)(lambda s: limbs.foot(at(s, 5.5, -1.0), projection="lateral"))
view("Toe", (7.0, 10.0), **EXTREMITY)(lambda s: limbs.foot(at(s, 2.9, -11.0), toes=(0, 1)))
view("Femur_AP", by_growth(16.0, 50.0), **EXTREMITY)(
    lambda s: limbs.lower_limb(at(s, 1.0, 23.0 * s.maturity.growth))
)


@view("Foot_Calcaneus", (12.0, 14.0), **EXTREMITY)
def foot_calcaneus(s) -> None:
    """Axial (plantodorsal) calcaneus: the bone end-on as a tall oval with the sustentaculum medially."""
    s.tissue_ellipse((0.0, 0.0), (4.5, 6.0), 0, 1.0)
    s.bone_poly(arc((0.0, 0.5), (2.4, 4.5), 0, 0, 360, 24), 0.9, 0.55, 0.35)
    s.bone_path([(2.0, -2.0), (3.8, -2.6)], 1.0, 0.85)  # sustentaculum tali
    s.bone_ellipse((0.5, -4.0), (2.0, 1.2), 0, 0.7, 0.6, 0.2)  # talus above


@view("Foot_Hindfoot", (30.0, 24.0), paired=False, **EXTREMITY)
def foot_hindfoot(s) -> None:
    """Both hindfeet from behind, for alignment: distal legs with the calcanei below."""
    for sign in (-1, 1):
        f = Frame(s, (sign * 7.5, -2.0), squeeze=sign)
        limbs.ankle(f, projection="ap")
        f.bone_poly(arc((0.6, 6.0), (2.3, 2.6), 0, 0, 360, 20), 0.9, 0.55, 0.3)


@view("Whole_Lower_AP", by_growth(34.0, 94.0, 8.0), paired=False, **EXTREMITY)
def whole_lower_ap(s) -> None:
    g = s.maturity.growth
    cy = 42.0 * g
    axial.pelvis_ap(Frame(s, (0.0, -cy - 3.0 * g), scale=g), include_femurs=False)
    for sign in (-1, 1):
        limbs.lower_limb(Frame(s, (sign * 9.5 * g, -cy), squeeze=sign), projection="ap")


@view("Whole_Lower_Lateral", by_growth(26.0, 94.0, 8.0), **EXTREMITY)
def whole_lower_lateral(s) -> None:
    limbs.lower_limb(at(s, 2.0, 42.0 * s.maturity.growth), projection="lateral")
