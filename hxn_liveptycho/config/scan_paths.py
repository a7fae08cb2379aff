"""Scan paths that are no raster: the Fermat spiral's points, and the step of any point set.

A Fermat spiral plan (bluesky's ``spiral_fermat`` / ``rel_spiral_fermat``, HXN's
``fermat``) records only its arguments; the positions it visits follow from them.
Point ``i`` (``i = 1, 2, ...``) lies at radius ``sqrt(i) * dr / factor`` and angle
``i * 137.508°`` (the golden angle); the y offset is stretched by ``dr_y / dr``
when ``dr_y`` is given; a point is kept, in that order, when it lies inside the
``x_range`` x ``y_range / (dr_y / dr)`` rectangle (its x measured along the
``tilt`` direction), and rings are generated out to 1.5 times the rectangle's
half-diagonal. The count and the order therefore come from the arguments alone,
exactly as the plan computes them.

Any point set, spiral or not, has a density: the step of a raster with as many
points on the same area (:func:`density_step`) is what sizes the probe's
footprint when the scan is no raster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The golden angle the Fermat spiral turns by from one point to the next, in degrees,
#: as the plans write it.
GOLDEN_ANGLE_DEG = 137.508


@dataclass(frozen=True)
class FermatSpiral:
    """The arguments of a Fermat spiral plan, in the plan's units (µm at HXN).

    ``x_start``/``y_start`` is the centre (0 for the relative plans: their points are
    offsets from where the motors stood); ``dr_y`` None means ``dr``; ``tilt`` in radians.
    """

    x_range: float
    y_range: float
    dr: float
    factor: float
    x_start: float = 0.0
    y_start: float = 0.0
    dr_y: float | None = None
    tilt: float = 0.0

    def __post_init__(self) -> None:
        for name in ("x_range", "y_range", "dr", "factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r}: a Fermat spiral needs a positive {name}")
        if self.dr_y is not None and not (math.isfinite(self.dr_y) and self.dr_y > 0):
            raise ValueError(f"dr_y = {self.dr_y!r}: a Fermat spiral needs a positive dr_y")
        for name in ("x_start", "y_start", "tilt"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} = {getattr(self, name)!r} is not finite")

    def points(self) -> np.ndarray:
        """The spiral's points in acquisition order, (n, 2) float64 (y, x)."""
        aspect = 1.0 if self.dr_y is None else self.dr_y / self.dr
        half_x = self.x_range / 2.0
        half_y = self.y_range / (2.0 * aspect)
        # The arithmetic keeps the plans' order of operations, so that a point on the
        # rectangle's edge is kept or dropped as the plan does.
        rings = int((1.5 * math.sqrt(half_x**2 + half_y**2) / (self.dr / self.factor)) ** 2)
        i = np.arange(1, max(rings, 1), dtype=np.float64)
        radius = np.sqrt(i) * self.dr / self.factor
        angle = (GOLDEN_ANGLE_DEG * math.pi / 180.0) * i
        x = radius * np.cos(angle)
        y = radius * np.sin(angle) * aspect
        # The x bound is measured along the tilted axis (a tilt of 0 leaves x as it is).
        slope = math.tan(self.tilt + math.pi / 2.0)
        keep = (np.abs(x - (y / aspect) / slope) <= half_x) & (np.abs(y) <= half_y)
        return np.stack([self.y_start + y[keep], self.x_start + x[keep]], axis=1)

    @property
    def num_points(self) -> int:
        return len(self.points())


def density_step(y_extent: float, x_extent: float, points: int) -> float:
    """The step of a raster with ``points`` points on a ``y_extent`` x ``x_extent`` area.

    ``sqrt(area / points)``; a line (one extent zero) gives ``length / points``, and
    a single point (or none) 0. For a Fermat spiral filling its rectangle this is
    ``sqrt(π) · dr / factor``: one point per ``π (dr / factor)²`` of area.
    """
    y_extent, x_extent = abs(y_extent), abs(x_extent)
    if points < 2:
        return 0.0
    if y_extent > 0 and x_extent > 0:
        return math.sqrt(y_extent * x_extent / points)
    return max(y_extent, x_extent) / points
