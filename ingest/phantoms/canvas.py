"""Procedural anatomy as projected path lengths: each primitive adds the length a ray travels through it.

A view draws soft tissue, gas, bone and metal in its own scene coordinates (centimetres of a template body,
y pointing down, the field of view centred on the origin). Every primitive is a 3-D solid seen along the beam,
so what lands on a pixel is a chord length with a closed form: a cylinder of radius r at distance d from its
axis gives 2*sqrt(r^2 - d^2); an ellipsoid gives 2c*sqrt(1 - rho^2); a tube of bone is the outer chord minus
the inner one (cortex) plus the inner one weighted by its trabecular density (marrow); a free outline is
treated as a rounded slab whose depth follows the distance to its edge. ``depth_scale`` turns template
centimetres into the child's physical centimetres, so a toddler's chest attenuates less than a teenager's.

The scene maps drawings to pixels through a jittered similarity transform (zoom, rotation, shift, and a
mirror for right-sided limbs), so one view never lands twice on the same pixels. ``acquire.expose`` turns
the path lengths into a radiograph. Every random draw comes from the scene's generator in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .maturity import Maturity

SHIFT = 4  # OpenCV fixed-point bits: sub-pixel precise rasterised outlines
FIX = 1 << SHIFT
SLAB_DEPTH = 0.75  # depth of a free outline (trunk, palm) relative to its inscribed width


def arc(center, axes, angle_deg: float, start_deg: float, end_deg: float, n: int = 24) -> np.ndarray:
    """Points on an elliptical arc (scene units), angles in degrees, y down."""
    t = np.radians(np.linspace(start_deg, end_deg, n))
    a = math.radians(angle_deg)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack(
        [center[0] + x * math.cos(a) - y * math.sin(a), center[1] + x * math.sin(a) + y * math.cos(a)], axis=1
    )


def smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a downsampled copy (same look, a fraction of the cost)."""
    factor = int(sigma // 2)
    if factor < 2:
        return cv2.GaussianBlur(image, (0, 0), max(sigma, 0.3))
    h, w = image.shape
    small = cv2.resize(image, (max(w // factor, 1), max(h // factor, 1)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def rounded(points, iterations: int = 2) -> np.ndarray:
    """Chaikin corner cutting of a closed outline: anatomy has no sharp polygon corners."""
    pts = np.asarray(points, float).reshape(-1, 2)
    for _ in range(iterations):
        nxt = np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], axis=1).reshape(-1, 2)
    return pts


def chord(radius, distance) -> np.ndarray:
    """Path length through a circle of ``radius`` along a line ``distance`` from its centre."""
    return 2.0 * np.sqrt(np.maximum(np.square(radius) - np.square(distance), 0.0))


@dataclass(frozen=True)
class Fracture:
    """A fracture of the tagged bone: where (0 = the end the drawing starts from), which kind, how obvious.

    ``kind`` is one of ``FRACTURE_KINDS``; ``severity`` in [0, 1] scales the lucent line's contrast, the
    cortical bulge, the angulation and the displacement, from a faint buckle to an obvious break.
    """

    tag: str
    position: float
    tilt_deg: float
    kind: str
    severity: float
    side: float  # +1 / -1: which cortex buckles, breaks first (greenstick) or carries the metaphyseal spike

    @property
    def angulation_deg(self) -> float:
        return {"buckle": 3.0, "greenstick": 18.0, "salter_harris_2": 12.0, "supracondylar": 25.0}[
            self.kind
        ] * self.severity

    @property
    def shift(self) -> float:
        """Displacement of the distal fragment as a fraction of the bone width."""
        return {"buckle": 0.0, "greenstick": 0.05, "salter_harris_2": 0.35, "supracondylar": 0.3}[
            self.kind
        ] * self.severity


FRACTURE_KINDS = ("buckle", "greenstick", "salter_harris_2", "supracondylar")


class Scene:
    """Projected path lengths of one radiograph (cm per pixel) plus the scene-to-pixel transform."""

    def __init__(
        self,
        rng: np.random.Generator,
        field: tuple[float, float],
        maturity: Maturity,
        *,
        mirror: bool = False,
        long_side_px: int | None = None,
        rotate_deg: float = 4.0,
        fracture: Fracture | None = None,
        depth_scale: float = 1.0,
        cast: bool = False,
    ) -> None:
        self.rng = rng
        self.maturity = maturity
        self.fracture = fracture
        self.fracture_drawn = False
        self.cast = cast
        self.depth_scale = depth_scale
        fw, fh = field
        long_px = int(long_side_px if long_side_px is not None else rng.integers(500, 861))
        if fw >= fh:
            w, h = long_px, max(300, round(long_px * fh / fw))
        else:
            h, w = long_px, max(300, round(long_px * fw / fh))
        self.height, self.width = h, w
        self.field = (fw, fh)
        zoom = rng.uniform(0.93, 1.04)
        self.scale = min(w / fw, h / fh) * zoom  # pixels per template centimetre
        self.rotation = math.radians(rng.uniform(-rotate_deg, rotate_deg))
        self.mirror = -1.0 if mirror else 1.0
        self.center = np.array([w / 2 + rng.uniform(-0.03, 0.03) * w, h / 2 + rng.uniform(-0.03, 0.03) * h])
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        self._matrix = self.scale * np.array([[c * self.mirror, -s], [s * self.mirror, c]])
        shape = (h, w)
        self.soft = np.zeros(shape, np.float32)  # water-equivalent depth, union of envelopes (max)
        self.extra = np.zeros(shape, np.float32)  # additive water depth: vessels, organs inside envelopes
        self.air = np.zeros(shape, np.float32)  # share of the local depth that is gas (painted)
        self.cortical = np.zeros(shape, np.float32)  # compact bone path length
        self.trabecular = np.zeros(shape, np.float32)  # cancellous bone path length, density-weighted
        self.metal = np.zeros(shape, np.float32)  # attenuation (mu * t), fully opaque for lead
        self.plaster = np.zeros(shape, np.float32)  # cast material path length
        self._fragment: tuple | None = None  # (tag, pivot px, axis, half width px) of a drawn fracture

    # -- coordinates -------------------------------------------------------------------------
    def px(self, points) -> np.ndarray:
        pts = np.asarray(points, float).reshape(-1, 2)
        return pts @ self._matrix.T + self.center

    def length(self, units: float) -> float:
        return units * self.scale

    @property
    def cm_per_px(self) -> float:
        """Physical centimetres per pixel (template units scaled to the child)."""
        return self.depth_scale / self.scale

    @property
    def bone(self) -> np.ndarray:
        """Bone path length (cm), compact plus cancellous."""
        return self.cortical + self.trabecular

    @staticmethod
    def _fixed(pts_px: np.ndarray, offset=(0.0, 0.0)) -> np.ndarray:
        return np.round((pts_px - np.asarray(offset)) * FIX).astype(np.int32).reshape(-1, 1, 2)

    def _bbox(self, pts_px: np.ndarray, pad: float) -> tuple[int, int, int, int] | None:
        x0 = max(int(math.floor(pts_px[:, 0].min() - pad)), 0)
        y0 = max(int(math.floor(pts_px[:, 1].min() - pad)), 0)
        x1 = min(int(math.ceil(pts_px[:, 0].max() + pad)) + 1, self.width)
        y1 = min(int(math.ceil(pts_px[:, 1].max() + pad)) + 1, self.height)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1

    def _grid(self, box) -> tuple[np.ndarray, np.ndarray]:
        x0, y0, x1, y1 = box
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        return xs + 0.5, ys + 0.5

    def _inside_depth(self, pts_px: np.ndarray, box, closed: bool = True):
        """Distance (px) from each ROI pixel to an outline's edge (inside) or to a polyline (tube), and the
        largest such distance over the whole outline (its inscribed radius).

        For an outline the transform runs on a box that reaches past the image (up to one image size), so
        an outline running off the detector measures depth from its real edge, not from the image border.
        """
        x0, y0, x1, y1 = box
        if not closed:
            mask = np.full((y1 - y0, x1 - x0), 255, np.uint8)
            cv2.polylines(mask, [self._fixed(pts_px, (x0, y0))], False, 0, 1, cv2.LINE_8, SHIFT)
            # a path that misses the box leaves no zero pixel: the transform then reports a huge distance
            d = np.minimum(cv2.distanceTransform(mask, cv2.DIST_L2, 5), 1e4)
            return d, float(d.max())
        m = max(self.height, self.width)
        lo = np.floor(pts_px.min(axis=0)).astype(int) - 2
        hi = np.ceil(pts_px.max(axis=0)).astype(int) + 3
        ex0, ey0 = max(min(lo[0], x0), -m), max(min(lo[1], y0), -m)
        ex1, ey1 = min(max(hi[0], x1), self.width + m), min(max(hi[1], y1), self.height + m)
        mask = np.zeros((ey1 - ey0, ex1 - ex0), np.uint8)
        cv2.fillPoly(mask, [self._fixed(pts_px, (ex0, ey0))], 255, cv2.LINE_8, SHIFT)
        mask[0, :] = mask[-1, :] = 0
        mask[:, 0] = mask[:, -1] = 0
        d = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
        return d[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0], float(d.max())

    # -- soft tissue and gas -------------------------------------------------------------------
    def _slab(self, pts_px: np.ndarray, thickness: float) -> None:
        box = self._bbox(pts_px, 1)
        if box is None:
            return
        x0, y0, x1, y1 = box
        d, radius = self._inside_depth(pts_px, box)
        if radius <= 0:
            return
        depth = chord(radius, np.maximum(radius - d, 0.0)) * (SLAB_DEPTH * thickness * self.cm_per_px)
        np.maximum(self.soft[y0:y1, x0:x1], depth, out=self.soft[y0:y1, x0:x1])

    def tissue_poly(self, points, thickness: float = 1.0) -> None:
        self._slab(self.px(rounded(points)), thickness)

    def tissue_ellipse(self, center, axes, angle_deg: float = 0.0, thickness: float = 1.0) -> None:
        self._ellipsoid(self.soft, center, axes, angle_deg, thickness, combine="max")

    def tissue_capsule(self, p0, p1, radius: float, thickness: float = 1.0) -> None:
        self._tube(self.soft, [p0, p1], radius, thickness, combine="max")

    def tissue_path(self, points, radius: float, thickness: float = 1.0) -> None:
        self._tube(self.soft, points, radius, thickness, combine="max")

    def vessel_path(self, points, radius: float) -> None:
        """A blood-filled tube (lung vessels, hila): water path added on top of the envelope."""
        self._tube(self.extra, points, radius, 1.0, combine="add")

    def plaster_tube(self, p0, p1, inner: float, outer: float) -> None:
        """A cast: a hollow cylinder of plaster around the limb axis."""
        self._tube(self.plaster, [p0, p1], outer, 1.0, combine="add", hollow=inner)

    def air_poly(self, points, amount: float) -> None:
        cv2.fillPoly(self.air, [self._fixed(self.px(rounded(points, 1)))], float(amount), cv2.LINE_8, SHIFT)

    def air_ellipse(self, center, axes, angle_deg: float = 0.0, amount: float = 0.5) -> None:
        self.air_poly(arc(center, axes, angle_deg, 0, 360, 32)[:-1], amount)

    def air_capsule(self, p0, p1, radius: float, amount: float) -> None:
        a, b = self._fixed(self.px([p0, p1]))
        thick = max(int(round(2 * self.length(radius))), 1)
        cv2.line(
            self.air, tuple(map(int, a[0])), tuple(map(int, b[0])), float(amount), thick, cv2.LINE_8, SHIFT
        )

    def metal_poly(self, points, amount: float = 3.0) -> None:
        cv2.fillPoly(self.metal, [self._fixed(self.px(points))], float(amount), cv2.LINE_8, SHIFT)

    def metal_line(self, p0, p1, width: float, amount: float = 3.0) -> None:
        self.metal_path([p0, p1], width, amount)

    def metal_path(self, points, width: float, amount: float = 3.0) -> None:
        """A wire or stripe ``width`` across whose thickest part attenuates by ``amount`` (mu * t)."""
        self._tube(self.metal, points, width / 2, amount / max(width * self.depth_scale, 1e-3), combine="max")

    def metal_disc(self, center, radius: float, amount: float = 3.0) -> None:
        self._ellipsoid(
            self.metal, center, (radius, radius), 0.0, amount / (2 * radius * self.depth_scale), combine="max"
        )

    # -- analytic solids ------------------------------------------------------------------------
    def _tube(self, layer, points, radius, weight, *, combine: str, hollow: float = 0.0) -> None:
        """A cylinder of ``radius`` (scene units) along a polyline; chord length times ``weight``."""
        pts_px = self.px(points)
        r_px = self.length(radius)
        box = self._bbox(pts_px, r_px + 2)
        if box is None or r_px <= 0.05:
            return
        x0, y0, x1, y1 = box
        d, _ = self._inside_depth(pts_px, box, closed=False)
        depth = chord(r_px, d)
        if hollow > 0:
            depth -= chord(self.length(hollow), d)
        depth *= weight * self.cm_per_px
        roi = layer[y0:y1, x0:x1]
        if combine == "max":
            np.maximum(roi, depth, out=roi)
        else:
            roi += depth

    def _ellipsoid(self, layer, center, axes, angle_deg, weight, *, combine: str) -> None:
        """An ellipsoid with in-plane semi-axes ``axes`` and a depth semi-axis equal to the smaller one."""
        c_px = self.px(center)[0]
        a, b = self.length(axes[0]), self.length(axes[1])
        box = self._bbox(np.array([c_px - max(a, b), c_px + max(a, b)]), 2)
        if box is None or min(a, b) <= 0.3:
            return
        xs, ys = self._grid(box)
        rho2 = self._rho2(xs, ys, c_px, a, b, angle_deg)
        depth = (2.0 * min(a, b) * weight * self.cm_per_px) * np.sqrt(np.maximum(1.0 - rho2, 0.0))
        x0, y0, x1, y1 = box
        roi = layer[y0:y1, x0:x1]
        if combine == "max":
            np.maximum(roi, depth, out=roi)
        else:
            roi += depth

    def _rho2(self, xs, ys, c_px, a, b, angle_deg) -> np.ndarray:
        """Squared elliptical radius of pixel centres about ``c_px`` (axes in px, angle in scene degrees)."""
        ang = math.radians(angle_deg)
        ux = self._matrix @ np.array([math.cos(ang), math.sin(ang)])
        ux /= np.hypot(*ux)
        dx, dy = xs - c_px[0], ys - c_px[1]
        along = dx * ux[0] + dy * ux[1]
        across = -dx * ux[1] + dy * ux[0]
        return np.square(along / a) + np.square(across / b)

    # -- bone ------------------------------------------------------------------------------
    def _add_bone(self, box, outer, inner, density, marrow) -> None:
        """Cortex = outer minus inner chord; the inner chord is cancellous bone at ``marrow`` density."""
        x0, y0, x1, y1 = box
        k = self.cm_per_px
        self.cortical[y0:y1, x0:x1] += (outer - inner) * (density * k)
        self.trabecular[y0:y1, x0:x1] += inner * (density * marrow * k)

    def bone_poly(
        self, points, density: float = 1.0, marrow: float = 0.5, cortex: float = 0.15, plate: float = 2.2
    ) -> None:
        """A bone with a free outline: a rounded slab with a compact shell ``cortex`` units thick, at most
        ``plate`` units deep along the beam."""
        pts_px = self.px(rounded(points))
        box = self._bbox(pts_px, 1)
        if box is None:
            return
        d, radius = self._inside_depth(pts_px, box)
        if radius <= 0.5:
            return
        ct = min(self.length(cortex), radius * 0.6)
        # a broad outline is a plate (ilium, scapula, vertebral body seen en face), not a ball: its depth
        # is capped, so inside it the beam crosses two cortical tables and the cancellous bone between
        cap = self.length(plate)
        outer = np.minimum(chord(radius, np.maximum(radius - d, 0.0)) * SLAB_DEPTH, cap)
        inner = np.minimum(chord(radius - ct, np.maximum(radius - d, 0.0)) * SLAB_DEPTH, cap - 2 * ct)
        inner = np.where(d > ct, np.maximum(inner, 0.0), 0.0)
        self._add_bone(box, outer, inner, density, marrow)

    def bone_ellipse(
        self,
        center,
        axes,
        angle_deg: float = 0.0,
        density: float = 1.0,
        marrow: float = 0.55,
        cortex: float = 0.12,
        *,
        follows: str | None = None,
    ) -> None:
        """An ellipsoidal bone (carpal, epiphysis, patella): a shell ``cortex`` thick around cancellous bone.

        ``follows`` names a bone whose fracture fragment this piece moves with (an epiphysis displaced in a
        Salter-Harris or supracondylar fracture)."""
        c_px = self.px(center)[0]
        if follows is not None:
            c_px, angle_deg = self._follow(c_px, angle_deg, follows)
        a, b = self.length(axes[0]), self.length(axes[1])
        if min(a, b) < 0.8:
            return
        box = self._bbox(np.array([c_px - max(a, b), c_px + max(a, b)]), 2)
        if box is None:
            return
        xs, ys = self._grid(box)
        ct = min(self.length(cortex), 0.5 * min(a, b))
        depth_c = min(a, b)
        outer = 2.0 * depth_c * np.sqrt(np.maximum(1.0 - self._rho2(xs, ys, c_px, a, b, angle_deg), 0.0))
        ai, bi = a - ct, b - ct
        inner = (
            2.0 * (depth_c - ct) * np.sqrt(np.maximum(1.0 - self._rho2(xs, ys, c_px, ai, bi, angle_deg), 0.0))
            if min(ai, bi) > 0.3
            else np.zeros_like(outer)
        )
        self._add_bone(box, outer, inner, density, marrow)

    def bone_path(self, points, width: float, density: float = 1.0, marrow: float = 0.55) -> None:
        """A tubular bone along a polyline (rib, clavicle, rim): round cross-section ``width`` across."""
        pts_px = self.px(points)
        r = self.length(width) / 2
        box = self._bbox(pts_px, r + 2)
        if box is None or r < 0.4:
            return
        d, _ = self._inside_depth(pts_px, box, closed=False)
        outer = chord(r, d)
        inner = chord(r * 0.6, d)
        self._add_bone(box, outer, inner, density, marrow)

    def bone_ring(
        self,
        center,
        axes,
        angle_deg: float,
        width: float,
        density: float = 1.0,
        start_deg: float = 0.0,
        end_deg: float = 360.0,
        *,
        shell: bool = False,
    ) -> None:
        """A rim seen edge-on (orbit, obturator ring) or, with ``shell``, an ellipsoidal vault: the skull's
        tables are brightest where the beam runs tangent to them and fade towards the middle."""
        if not shell:
            self.bone_path(arc(center, axes, angle_deg, start_deg, end_deg, 72), width, density, marrow=0.8)
            return
        c_px = self.px(center)[0]
        a, b = self.length(axes[0]), self.length(axes[1])
        box = self._bbox(np.array([c_px - max(a, b), c_px + max(a, b)]), 2)
        if box is None:
            return
        xs, ys = self._grid(box)
        t = self.length(width)
        depth_c = min(a, b)
        outer = 2.0 * depth_c * np.sqrt(np.maximum(1.0 - self._rho2(xs, ys, c_px, a, b, angle_deg), 0.0))
        inner = (
            2.0
            * (depth_c - t)
            * np.sqrt(np.maximum(1.0 - self._rho2(xs, ys, c_px, a - t, b - t, angle_deg), 0.0))
        )
        if end_deg - start_deg < 360.0:
            ang = np.degrees(np.arctan2(ys - c_px[1], (xs - c_px[0]) * self.mirror)) - math.degrees(
                self.rotation
            )
            ang = np.mod(ang - start_deg, 360.0)
            keep = ang <= (end_deg - start_deg)
            outer, inner = outer * keep, inner * keep
        shell_len = outer - inner
        # the diploe between the two tables is cancellous: split the shell into compact and spongy bone
        self._add_bone(box, shell_len, shell_len * 0.4, density, 0.5)

    def long_bone(
        self,
        p0,
        p1,
        widths,
        *,
        density: float = 1.0,
        marrow: float = 0.4,
        cortex: float | None = None,
        tag: str | None = None,
        n: int = 20,
    ) -> None:
        """A tubular bone from ``p0`` to ``p1`` with a width profile sampled along it (flared metaphyses).

        ``widths`` are full widths at evenly spaced stations from p0 to p1; the ends are rounded. The
        compact cortex is thickest along the shaft and thins over the flared metaphyses, where the cancellous
        bone is densest; the medullary canal of the shaft holds marrow fat, so it is lucent.
        """
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        a_px, b_px = self.px([p0, p1])
        axis = b_px - a_px
        length = float(np.hypot(*axis))
        if length <= 1e-6:
            return
        u = axis / length
        nrm = np.array([-u[1], u[0]])
        stations = np.linspace(0.0, 1.0, len(widths))
        half = np.asarray(widths, float) * self.scale / 2.0
        w_max = float(half.max())
        box = self._bbox(np.array([a_px, b_px]), w_max * 1.6 + 2)
        if box is None or w_max < 0.5:
            return
        xs, ys = self._grid(box)
        frac = None
        if self.fracture is not None and tag == self.fracture.tag:
            frac = self.fracture
            self.fracture_drawn = True
            pivot = a_px + axis * frac.position
            w_at = float(np.interp(frac.position, stations, half))
            self._fragment = (tag, pivot, u, w_at)
            xs, ys = self._displace(xs, ys, pivot, u, frac, w_at)
        dx, dy = xs - a_px[0], ys - a_px[1]
        along = dx * u[0] + dy * u[1]
        across = dx * nrm[0] + dy * nrm[1]
        t = along / length
        w = np.interp(np.clip(t, 0.0, 1.0), stations, half).astype(np.float32)
        if frac is not None and frac.kind == "buckle":
            # torus: the compressed cortex bulges outward on one side (both when severe) next to the line
            bump = np.exp(-np.square((t - frac.position) * length / (w * 0.45 + 1e-3)))
            sides = np.where(np.sign(across) == frac.side, 1.0, float(frac.severity > 0.6))
            w = w * (1.0 + (0.05 + 0.14 * frac.severity) * bump * sides)
        overshoot = np.maximum(-along, 0.0) + np.maximum(along - length, 0.0)
        r = np.sqrt(np.square(across) + np.square(overshoot / 0.35))
        shaft = float(half.min())
        ct_shaft = self.length(cortex) if cortex is not None else shaft * 0.45
        ct = np.minimum(ct_shaft * np.square(shaft / np.maximum(w, 1e-3)), w * 0.6)
        outer = chord(w, r)
        inner = chord(w - ct, r)
        # cancellous density: high in the flared ends, marrow fat in the shaft's canal
        spongy = np.clip((w / max(shaft, 1e-3) - 1.0) * 1.5, 0.0, 1.0)
        trab = 0.25 + 0.75 * spongy
        k = self.cm_per_px
        x0, y0, x1, y1 = box
        cort = (outer - inner) * (density * k)
        spong = inner * (density * marrow * k) * trab
        if frac is not None:
            cort, spong = self._fracture_line(cort, spong, along, across, w, length, frac)
        self.cortical[y0:y1, x0:x1] += cort
        self.trabecular[y0:y1, x0:x1] += spong

    def _displace(self, xs, ys, pivot, u, frac: Fracture, w_at: float):
        """Sample the fragment beyond the fracture where it came from: turned about the break, shifted."""
        toward = -1.0 if frac.position < 0.5 else 1.0  # the fragment is the short end's side
        dx, dy = xs - pivot[0], ys - pivot[1]
        beyond = (dx * u[0] + dy * u[1]) * toward > 0
        ang = math.radians(frac.angulation_deg * frac.side)
        c, s = math.cos(ang), math.sin(ang)
        nrm = np.array([-u[1], u[0]])
        sx, sy = nrm * (frac.shift * 2 * w_at * frac.side)
        rx = c * (dx - sx) + s * (dy - sy)
        ry = -s * (dx - sx) + c * (dy - sy)
        return (
            np.where(beyond, pivot[0] + rx, xs).astype(np.float32),
            np.where(beyond, pivot[1] + ry, ys).astype(np.float32),
        )

    def _follow(self, c_px, angle_deg: float, tag: str):
        """Where a point of the fractured bone's distal fragment ends up: turned about the break, shifted."""
        if self._fragment is None or self._fragment[0] != tag:
            return c_px, angle_deg
        _, pivot, u, w_at = self._fragment
        frac = self.fracture
        toward = -1.0 if frac.position < 0.5 else 1.0
        rel = c_px - pivot
        if float(rel @ u) * toward <= 0:
            return c_px, angle_deg
        ang = math.radians(frac.angulation_deg * frac.side)
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        shift = np.array([-u[1], u[0]]) * (frac.shift * 2 * w_at * frac.side)
        turned = math.degrees(ang) * self.mirror
        return pivot + rot @ rel + shift, angle_deg + turned

    def _fracture_line(self, cort, spong, along, across, w, length, frac: Fracture):
        """The lucent line, the sclerotic band of impaction, or the metaphyseal spike, by kind."""
        tilt = math.radians(frac.tilt_deg)
        offset = along - frac.position * length
        dist = offset * math.cos(tilt) - across * math.sin(tilt)  # distance to the fracture plane
        width = max(0.6, 0.03 * float(np.max(w)))
        line = np.exp(-np.square(dist / width))
        side = across * frac.side / np.maximum(w, 1e-3)  # -1 .. 1 across the bone, +1 on the broken side
        if frac.kind == "buckle":
            # no line through the bone: a faint dense band where the trabeculae are impacted
            band = np.exp(-np.square(dist / (2.5 * width)))
            spong = spong * (1.0 + 0.6 * frac.severity * band)
            cort = cort * (1.0 - 0.3 * frac.severity * line * (side > 0.5))
            return cort, spong
        if frac.kind == "greenstick":
            reach = np.clip((side + 1.0 - 2.0 * (0.35 + 0.4 * frac.severity)) * 8.0, 0.0, 1.0)
            gap = line * (1.0 - reach)  # broken from the tension side, the far cortex only bends
        else:
            gap = line  # a complete line (metaphyseal spike for Salter-Harris II, supracondylar)
        keep = 1.0 - (0.45 + 0.5 * frac.severity) * gap
        return cort * keep, spong * keep

    def bone_gap(self, points, width: float, amount: float) -> None:
        """A seam through bone already drawn (suture, fontanelle): removes ``amount`` of it along a path."""
        pts_px = self.px(points)
        r = max(self.length(width) / 2, 0.7)
        box = self._bbox(pts_px, 3 * r + 2)
        if box is None:
            return
        x0, y0, x1, y1 = box
        d, _ = self._inside_depth(pts_px, box, closed=False)
        keep = 1.0 - amount * np.exp(-np.square(d / r))
        self.cortical[y0:y1, x0:x1] *= keep
        self.trabecular[y0:y1, x0:x1] *= keep

    def soft_tissue_sign(self, centre, axes, angle_deg: float, amount: float) -> None:
        """A displaced fat pad or swelling: fat is less dense than muscle, so it shows as a lucent area."""
        self.air_ellipse(centre, axes, angle_deg, amount)
