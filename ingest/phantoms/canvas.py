"""Procedural radiograph drawing: attenuation layers in scene units, then a simulated exposure.

A view draws tissue, air, bone and metal shapes in its own scene coordinates (roughly centimetres, y
pointing down, the field of view centred on the origin). The scene maps them to pixels through a jittered
similarity transform (zoom, rotation, shift, and a mirror for right-sided limbs), so one view never
lands twice on the same pixels. ``Scene.expose`` turns the layers into a radiograph the way a detector
does: Beer-Lambert transmission, Poisson-like quantum noise, log transform, CR-style edge enhancement,
then collimation shutters (unexposed, hence bright) and a burned-in lead L/R marker.

All drawing is vectorised through OpenCV on float32 arrays; every random draw comes from the scene's
``numpy.random.Generator`` in a fixed order, so a seed fixes every pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .maturity import Maturity

SHIFT = 4  # OpenCV fixed-point bits: sub-pixel precise shapes
FIX = 1 << SHIFT


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
        return cv2.GaussianBlur(image, (0, 0), sigma)
    h, w = image.shape
    small = cv2.resize(image, (max(w // factor, 1), max(h // factor, 1)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Fracture:
    """Where a fracture line goes: the tagged bone, the position along it (0 = proximal end) and the tilt."""

    tag: str
    position: float
    tilt_deg: float
    width: float  # scene units
    buckle: bool


class Scene:
    """Attenuation layers of one radiograph plus the scene-to-pixel transform."""

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
    ) -> None:
        self.rng = rng
        self.maturity = maturity
        self.fracture = fracture
        self.fracture_drawn = False
        fw, fh = field
        long_px = int(long_side_px if long_side_px is not None else rng.integers(500, 861))
        if fw >= fh:
            w, h = long_px, max(300, round(long_px * fh / fw))
        else:
            h, w = long_px, max(300, round(long_px * fw / fh))
        self.height, self.width = h, w
        self.field = (fw, fh)
        zoom = rng.uniform(0.93, 1.04)
        self.scale = min(w / fw, h / fh) * zoom
        self.rotation = math.radians(rng.uniform(-rotate_deg, rotate_deg))
        self.mirror = -1.0 if mirror else 1.0
        self.center = np.array([w / 2 + rng.uniform(-0.03, 0.03) * w, h / 2 + rng.uniform(-0.03, 0.03) * h])
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        self._matrix = self.scale * np.array([[c * self.mirror, -s], [s * self.mirror, c]])
        self.soft = np.zeros((h, w), np.float32)
        self.air = np.zeros((h, w), np.float32)
        self.bone = np.zeros((h, w), np.float32)
        self.metal = np.zeros((h, w), np.float32)

    # -- coordinates -------------------------------------------------------------------------
    def px(self, points) -> np.ndarray:
        pts = np.asarray(points, float).reshape(-1, 2)
        return pts @ self._matrix.T + self.center

    def length(self, units: float) -> float:
        return units * self.scale

    def angle(self, angle_deg: float) -> float:
        return (angle_deg if self.mirror > 0 else 180.0 - angle_deg) + math.degrees(self.rotation)

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

    # -- soft tissue, air, metal (painted: later shapes overwrite earlier ones) ----------------
    def tissue_poly(self, points, thickness: float = 1.0) -> None:
        cv2.fillPoly(self.soft, [self._fixed(self.px(points))], float(thickness), cv2.LINE_8, SHIFT)

    def tissue_ellipse(self, center, axes, angle_deg: float = 0.0, thickness: float = 1.0) -> None:
        self._ellipse(self.soft, center, axes, angle_deg, float(thickness), -1)

    def tissue_capsule(self, p0, p1, radius: float, thickness: float = 1.0) -> None:
        self._capsule(self.soft, p0, p1, radius, float(thickness))

    def tissue_path(self, points, radius: float, thickness: float = 1.0) -> None:
        pts = np.asarray(points, float)
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            self._capsule(self.soft, a, b, radius, float(thickness))

    def air_poly(self, points, amount: float) -> None:
        cv2.fillPoly(self.air, [self._fixed(self.px(points))], float(amount), cv2.LINE_8, SHIFT)

    def air_ellipse(self, center, axes, angle_deg: float = 0.0, amount: float = 0.5) -> None:
        self._ellipse(self.air, center, axes, angle_deg, float(amount), -1)

    def air_capsule(self, p0, p1, radius: float, amount: float) -> None:
        self._capsule(self.air, p0, p1, radius, float(amount))

    def metal_poly(self, points, amount: float = 3.0) -> None:
        cv2.fillPoly(self.metal, [self._fixed(self.px(points))], float(amount), cv2.LINE_8, SHIFT)

    def metal_line(self, p0, p1, width: float, amount: float = 3.0) -> None:
        self._capsule(self.metal, p0, p1, width / 2, float(amount))

    def _ellipse(self, layer, center, axes, angle_deg, value, thickness) -> None:
        c = self._fixed(self.px(center))[0, 0]
        ax = (max(int(round(self.length(axes[0]) * FIX)), 1), max(int(round(self.length(axes[1]) * FIX)), 1))
        cv2.ellipse(
            layer,
            (int(c[0]), int(c[1])),
            ax,
            self.angle(angle_deg),
            0,
            360,
            value,
            thickness,
            cv2.LINE_8,
            SHIFT,
        )

    def _capsule(self, layer, p0, p1, radius, value) -> None:
        a, b = self._fixed(self.px([p0, p1]))
        thick = max(int(round(2 * self.length(radius))), 1)
        cv2.line(
            layer, tuple(int(v) for v in a[0]), tuple(int(v) for v in b[0]), value, thick, cv2.LINE_8, SHIFT
        )

    # -- bone (additive: overlapping bones sum, as attenuation does) ----------------------------
    def _add_bone(self, pts_px: np.ndarray, pad: float, paint, fracture_axis=None) -> None:
        box = self._bbox(pts_px, pad)
        if box is None:
            return
        x0, y0, x1, y1 = box
        roi = np.zeros((y1 - y0, x1 - x0), np.float32)
        paint(roi, (x0, y0))
        if fracture_axis is not None:
            self._cut_fracture(roi, (x0, y0), *fracture_axis)
        self.bone[y0:y1, x0:x1] += roi

    def bone_poly(
        self, points, density: float = 1.0, marrow: float = 0.5, cortex: float = 0.15, fracture_axis=None
    ) -> None:
        """A closed bone outline: dense cortex rim of ``cortex`` scene units around lighter marrow."""
        pts_px = self.px(points)
        ct = max(int(round(self.length(cortex))), 1)

        def paint(roi, off):
            fixed = self._fixed(pts_px, off)
            cv2.fillPoly(roi, [fixed], density * marrow, cv2.LINE_8, SHIFT)
            cv2.polylines(roi, [fixed], True, density, ct, cv2.LINE_8, SHIFT)

        self._add_bone(pts_px, ct + 2, paint, fracture_axis)

    def bone_ellipse(
        self,
        center,
        axes,
        angle_deg: float = 0.0,
        density: float = 1.0,
        marrow: float = 0.55,
        cortex: float = 0.12,
    ) -> None:
        if min(axes) * self.scale < 0.8:
            return
        c_px = self.px(center)[0]
        r = self.length(max(axes))
        ct = max(int(round(self.length(min(cortex, min(axes) * 0.5)))), 1)
        ax = (max(int(round(self.length(axes[0]) * FIX)), 1), max(int(round(self.length(axes[1]) * FIX)), 1))
        ang = self.angle(angle_deg)

        def paint(roi, off):
            c = self._fixed(c_px, off)[0, 0]
            cv2.ellipse(roi, (int(c[0]), int(c[1])), ax, ang, 0, 360, density * marrow, -1, cv2.LINE_8, SHIFT)
            cv2.ellipse(roi, (int(c[0]), int(c[1])), ax, ang, 0, 360, density, ct, cv2.LINE_8, SHIFT)

        self._add_bone(np.array([c_px - r, c_px + r]), ct + 2, paint)

    def bone_path(self, points, width: float, density: float = 1.0, marrow: float = 0.55) -> None:
        """A tubular bone along a polyline (rib, clavicle, arch): dense edges, lighter core."""
        pts_px = self.px(points)
        outer = max(int(round(self.length(width))), 1)
        inner = max(int(round(self.length(width) * 0.5)), 0)

        def paint(roi, off):
            fixed = self._fixed(pts_px, off)
            cv2.polylines(roi, [fixed], False, density, outer, cv2.LINE_8, SHIFT)
            if inner:
                cv2.polylines(roi, [fixed], False, density * marrow, inner, cv2.LINE_8, SHIFT)

        self._add_bone(pts_px, outer + 2, paint)

    def bone_ring(
        self,
        center,
        axes,
        angle_deg: float,
        width: float,
        density: float = 1.0,
        start_deg: float = 0.0,
        end_deg: float = 360.0,
    ) -> None:
        """An elliptical shell seen edge-on (skull vault, orbit rim): a dense band."""
        pts = arc(center, axes, angle_deg, start_deg, end_deg, 72)
        self.bone_path(pts, width, density, marrow=0.8)

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

        ``widths`` are full widths at evenly spaced stations from p0 to p1; the ends are rounded.
        """
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        axis = p1 - p0
        length = float(np.hypot(*axis))
        if length <= 1e-6:
            return
        u = axis / length
        nrm = np.array([-u[1], u[0]])
        t = np.linspace(0.0, 1.0, n)
        w = np.interp(t, np.linspace(0.0, 1.0, len(widths)), widths) / 2.0
        # round the two ends with shallow caps so the articular surfaces are convex
        cap0 = [
            p0 + nrm * w[0] * math.cos(a) - u * w[0] * 0.35 * math.sin(a) for a in np.linspace(0, math.pi, 7)
        ]
        cap1 = [
            p1 - nrm * w[-1] * math.cos(a) + u * w[-1] * 0.35 * math.sin(a)
            for a in np.linspace(0, math.pi, 7)
        ]
        left = p0 + np.outer(t, axis) - np.outer(w, nrm)
        right = p0 + np.outer(t, axis) + np.outer(w, nrm)
        outline = np.concatenate([cap0[::-1][1:-1], left, cap1[::-1][1:-1], right[::-1]])
        ct = cortex if cortex is not None else max(float(w.min()) * 0.38, 0.05)
        frac = None
        if self.fracture is not None and tag == self.fracture.tag:
            pos = self.fracture.position
            centre = p0 + axis * pos
            half = float(np.interp(pos, t, w)) * 1.5
            tilt = math.radians(self.fracture.tilt_deg)
            direction = nrm * math.cos(tilt) + u * math.sin(tilt)
            frac = (centre, direction, half, u)
            self.fracture_drawn = True
        self.bone_poly(outline, density, marrow, ct, fracture_axis=frac)

    def _cut_fracture(self, roi, off, centre, direction, half, along) -> None:
        """A thin lucent line across the bone, breaking the cortex; a buckle adds a cortical bump."""
        f = self.fracture
        a = self.px(centre - direction * half)[0] - off
        b = self.px(centre + direction * half)[0] - off
        width_px = max(self.length(f.width), 1.2)
        mask = np.zeros_like(roi)
        cv2.line(
            mask,
            tuple(np.round(a * FIX).astype(int)),
            tuple(np.round(b * FIX).astype(int)),
            1.0,
            max(int(round(width_px)), 1),
            cv2.LINE_8,
            SHIFT,
        )
        mask = cv2.GaussianBlur(mask, (0, 0), 0.6)
        peak = float(roi.max())
        if f.buckle:
            # torus fracture: the cortex bulges just beyond the line on both sides
            for sign in (-1.0, 1.0):
                bump = self.px(centre + direction * sign * half * 0.66 + along * half * 0.25)[0] - off
                r = max(int(round(width_px * 1.6)), 2)
                cv2.circle(
                    roi, tuple(np.round(bump * FIX).astype(int)), r * FIX, peak * 0.9, -1, cv2.LINE_8, SHIFT
                )
        roi *= 1.0 - 0.85 * np.clip(mask, 0.0, 1.0)

    # -- exposure ----------------------------------------------------------------------------
    def expose(
        self,
        *,
        mu_soft: float = 1.0,
        round_units: float = 2.0,
        air_blur_units: float = 0.4,
        photons: float = 2500.0,
        marker: str | None = None,
        collimate: float = 0.75,
        enhance: float = 0.6,
    ) -> np.ndarray:
        """The radiograph as float32 in [0, 1], bone bright."""
        rng, h, w = self.rng, self.height, self.width
        inside = (self.soft > 0).astype(np.uint8)
        dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
        round_px = max(self.length(round_units), 1.0)
        soft = self.soft * np.sqrt(np.clip(dist / round_px, 0.0, 1.0))
        soft = cv2.GaussianBlur(soft, (0, 0), 1.2)
        air = smooth(self.air, max(self.length(air_blur_units), 0.8))
        soft = np.maximum(soft - air, 0.0)
        texture = cv2.resize(
            rng.standard_normal((max(h // 6, 2), max(w // 6, 2)), dtype=np.float32),
            (w, h),
            interpolation=cv2.INTER_CUBIC,
        )
        bone = cv2.GaussianBlur(self.bone, (0, 0), 0.7) * (1.0 + 0.1 * texture)
        total = mu_soft * soft + bone + self.metal
        transmitted = np.exp(-total)
        quanta = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.6) * 2.2
        detected = transmitted + np.sqrt(transmitted / photons) * quanta
        image = -np.log(np.clip(detected, 1e-4, None))
        sample = image[:: max(h // 200, 1), :: max(w // 200, 1)]
        lo, hi = np.percentile(sample, [0.5, 99.7])
        image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.2)
        image = image ** rng.uniform(0.75, 1.0)
        blurred = smooth(image, max(0.02 * min(h, w), 2.0))
        image = image + enhance * (image - blurred)
        image = np.clip(image / 1.1, 0.0, 1.0)
        image = self._collimate(image, collimate)
        if marker:
            self._burn_marker(image, marker)
        return image.astype(np.float32)

    def _collimate(self, image: np.ndarray, probability: float) -> np.ndarray:
        """Shutters: unexposed borders are bright, with scatter making the edge soft."""
        rng, h, w = self.rng, self.height, self.width
        margins = rng.uniform(0.02, 0.09, 4) * (rng.random(4) < probability)
        tilt = math.radians(rng.uniform(-1.5, 1.5))
        level = rng.uniform(0.8, 0.97)
        x0, x1 = margins[0] * w, w - margins[1] * w
        y0, y1 = margins[2] * h, h - margins[3] * h
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) - [cx, cy]
        rot = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
        corners = corners @ rot.T + [cx, cy]
        field = np.zeros((h, w), np.float32)
        cv2.fillPoly(field, [self._fixed(corners)], 1.0, cv2.LINE_8, SHIFT)
        field = cv2.GaussianBlur(field, (0, 0), 1.5)
        self.exposed = field > 0.5
        shade = level - 0.04 * np.abs(np.linspace(-1, 1, w, dtype=np.float32))[None, :]
        return image * field + shade * (1.0 - field)

    def _burn_marker(self, image: np.ndarray, letter: str) -> None:
        """A lead letter near a corner of the exposed field: fully attenuating, so white."""
        rng, h, w = self.rng, self.height, self.width
        size = rng.uniform(0.045, 0.07) * min(h, w)
        scale = size / 22.0
        thick = max(int(round(scale * 2.2)), 2)
        (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_DUPLEX, scale, thick)
        ys, xs = np.nonzero(self.exposed[::4, ::4])
        x_lo, x_hi = (xs.min() * 4, xs.max() * 4) if len(xs) else (0, w)
        y_lo, y_hi = (ys.min() * 4, ys.max() * 4) if len(ys) else (0, h)
        right, bottom = rng.random() < 0.5, rng.random() < 0.3
        pad = int(0.03 * min(h, w)) + thick
        x = x_hi - pad - tw if right else x_lo + pad
        y = y_hi - pad if bottom else y_lo + pad + th
        # OpenCV draws text only into 8-bit images: draw a mask, then burn it in
        mask = np.zeros((h, w), np.uint8)
        cv2.putText(mask, letter, (int(x), int(y)), cv2.FONT_HERSHEY_DUPLEX, scale, 255, thick, cv2.LINE_AA)
        np.maximum(image, mask.astype(np.float32) / 255.0, out=image)
        if rng.random() < 0.5:
            cv2.rectangle(
                image,
                (int(x - thick * 2), int(y - th - thick * 2)),
                (int(x + tw + thick * 2), int(y + thick * 2)),
                0.95,
                max(thick // 2, 1),
            )
