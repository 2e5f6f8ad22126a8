"""A placed view of a scene's drawing API: anatomy drawn in local coordinates, moved, turned and squeezed.

Views reuse one anatomical drawing under several projections (an oblique squeezes the x axis, a decubitus
chest is the frontal chest turned 90 degrees, a zoomed view shifts the origin). ``Frame`` applies
p' = origin + R(angle) @ diag(squeeze, 1) @ p to every point before handing it to the scene, and frames nest.
An ellipsoid stays an ellipsoid under the map (its axes follow from the map's singular values); widths of
tubes scale by the map's mean stretch. ``render_view`` also draws every view through a frame that turns the
part slightly about the vertical axis (positioning variation).
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import arc


class Frame:
    def __init__(
        self, scene, origin=(0.0, 0.0), angle_deg: float = 0.0, squeeze: float = 1.0, scale: float = 1.0
    ) -> None:
        self.scene = scene
        self.maturity = scene.maturity
        self.rng = scene.rng
        self.cast = scene.cast
        self.fracture = scene.fracture
        self.origin = np.asarray(origin, float)
        a = math.radians(angle_deg)
        self._m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.diag(
            [squeeze * scale, scale]
        )
        self._k = math.sqrt(abs(squeeze)) * scale  # how a width changes, on average over directions

    def p(self, points) -> np.ndarray:
        pts = np.asarray(points, float)
        return pts @ self._m.T + self.origin

    def _ellipse_pts(self, center, axes, angle_deg, n=32):
        return self.p(arc(center, axes, angle_deg, 0, 360, n)[:-1])

    # soft tissue, air, metal
    def tissue_poly(self, points, thickness: float = 1.0) -> None:
        self.scene.tissue_poly(self.p(points), thickness)

    def tissue_ellipse(self, center, axes, angle_deg: float = 0.0, thickness: float = 1.0) -> None:
        self.scene.tissue_poly(self._ellipse_pts(center, axes, angle_deg), thickness)

    def tissue_capsule(self, p0, p1, radius: float, thickness: float = 1.0) -> None:
        self.scene.tissue_capsule(*self.p([p0, p1]), radius * self._k, thickness)

    def tissue_path(self, points, radius: float, thickness: float = 1.0) -> None:
        self.scene.tissue_path(self.p(points), radius * self._k, thickness)

    def vessel_path(self, points, radius: float) -> None:
        self.scene.vessel_path(self.p(points), radius * self._k)

    def plaster_tube(self, p0, p1, inner: float, outer: float) -> None:
        self.scene.plaster_tube(*self.p([p0, p1]), inner * self._k, outer * self._k)

    def soft_tissue_sign(self, center, axes, angle_deg: float, amount: float) -> None:
        self.scene.air_poly(self._ellipse_pts(center, axes, angle_deg), amount)

    def air_poly(self, points, amount: float) -> None:
        self.scene.air_poly(self.p(points), amount)

    def air_ellipse(self, center, axes, angle_deg: float = 0.0, amount: float = 0.5) -> None:
        self.scene.air_poly(self._ellipse_pts(center, axes, angle_deg), amount)

    def air_capsule(self, p0, p1, radius: float, amount: float) -> None:
        self.scene.air_capsule(*self.p([p0, p1]), radius * self._k, amount)

    def metal_poly(self, points, amount: float = 3.0) -> None:
        self.scene.metal_poly(self.p(points), amount)

    def metal_path(self, points, width: float, amount: float = 3.0) -> None:
        self.scene.metal_path(self.p(points), width * self._k, amount)

    def metal_line(self, p0, p1, width: float, amount: float = 3.0) -> None:
        self.scene.metal_line(*self.p([p0, p1]), width * self._k, amount)

    # bone
    def bone_poly(self, points, density=1.0, marrow=0.5, cortex=0.15, plate=2.2) -> None:
        self.scene.bone_poly(self.p(points), density, marrow, cortex * self._k, plate * self._k)

    def bone_ellipse(
        self, center, axes, angle_deg=0.0, density=1.0, marrow=0.55, cortex=0.12, *, follows=None
    ) -> None:
        """An ellipse stays an ellipse under this frame's map: its axes and angle are carried through."""
        if min(axes) * self._k <= 0.02:
            return
        a = np.radians(angle_deg)
        ex = self._m @ np.array([np.cos(a), np.sin(a)]) * axes[0]
        ey = self._m @ np.array([-np.sin(a), np.cos(a)]) * axes[1]
        # a squeezed ellipse is still an ellipse; its principal axes come from the map's singular values
        u, sv, _ = np.linalg.svd(np.stack([ex, ey], axis=1))
        angle = float(np.degrees(np.arctan2(u[1, 0], u[0, 0])))
        cortex = min(cortex, min(axes) * 0.5) * self._k
        self.scene.bone_ellipse(
            self.p(center),
            (sv[0], sv[1]),
            angle,
            density,
            marrow,
            cortex,
            follows=follows,
        )

    def bone_gap(self, points, width: float, amount: float) -> None:
        self.scene.bone_gap(self.p(points), width * self._k, amount)

    def bone_path(self, points, width, density=1.0, marrow=0.55) -> None:
        self.scene.bone_path(self.p(points), width * self._k, density, marrow)

    def bone_ring(
        self, center, axes, angle_deg, width, density=1.0, start_deg=0.0, end_deg=360.0, *, shell=False
    ) -> None:
        if shell and abs(self._m[0, 1]) < 1e-9 and abs(self._m[1, 0]) < 1e-9 and angle_deg == 0.0:
            # an axis-aligned map keeps an axis-aligned ellipsoidal shell one, with scaled axes
            sx, sy = abs(self._m[0, 0]), abs(self._m[1, 1])
            self.scene.bone_ring(
                self.p(center),
                (axes[0] * sx, axes[1] * sy),
                0.0,
                width * self._k,
                density,
                start_deg,
                end_deg,
                shell=True,
            )
            return
        self.bone_path(arc(center, axes, angle_deg, start_deg, end_deg, 72), width, density, marrow=0.8)

    def long_bone(self, p0, p1, widths, *, density=1.0, marrow=0.4, cortex=None, tag=None, n=20) -> None:
        p0, p1 = self.p([p0, p1])
        self.scene.long_bone(
            p0,
            p1,
            [w * self._k for w in widths],
            density=density,
            marrow=marrow,
            cortex=None if cortex is None else cortex * self._k,
            tag=tag,
            n=n,
        )
