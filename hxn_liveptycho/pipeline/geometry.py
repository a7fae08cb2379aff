"""Stage coordinates ↔ object-canvas pixels for one scan.

The canvas is sized once, before the first frame, from where the scan's points
lie: a raster's commanded extents, the extents a spiral's points span, or those a
scan declares for the positions its encoders will report (``ScanConfig.grid``),
plus a margin; or, where the positions are all known (an offline file), from
the positions themselves. Nothing here knows rows or columns: each position is
mapped on its own, so any path (raster, snake, spiral, encoder-only) fits. The
solver never reallocates mid-scan; settling rows that overshoot further are
clipped by the solver and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig


@dataclass(frozen=True)
class CanvasGeometry:
    """Maps positions (µm, stage frame) to the top-left pixel of the probe window."""

    pixel_size_m: float
    window: int
    origin_um: tuple[float, float]
    canvas_shape: tuple[int, int]

    @classmethod
    def from_scan(cls, config: ScanConfig) -> CanvasGeometry:
        """The canvas of a run: its grid's extents plus ``canvas_margin`` of the range."""
        grid = config.grid
        return cls.from_extents(
            (grid.y_start_um, grid.y_end_um),
            (grid.x_start_um, grid.x_end_um),
            pixel_size_m=config.pixel_size_m,
            window=config.roi.size,
            margin=config.canvas_margin,
        )

    @classmethod
    def from_positions(
        cls, positions_um: np.ndarray, *, pixel_size_m: float, window: int, margin: float
    ) -> CanvasGeometry:
        """The canvas that holds ``positions_um`` ((k, 2) (y, x) µm) and ``margin`` of their
        range on each side: for a scan whose positions are all known before it is solved."""
        pos = np.asarray(positions_um, dtype=np.float64).reshape(-1, 2)
        finite = pos[np.isfinite(pos).all(axis=1)]
        if finite.size == 0:
            raise ValueError("no finite position to size the canvas from")
        (y_lo, x_lo), (y_hi, x_hi) = finite.min(axis=0), finite.max(axis=0)
        return cls.from_extents(
            (float(y_lo), float(y_hi)),
            (float(x_lo), float(x_hi)),
            pixel_size_m=pixel_size_m,
            window=window,
            margin=margin,
        )

    @classmethod
    def from_extents(
        cls,
        y_um: tuple[float, float],
        x_um: tuple[float, float],
        *,
        pixel_size_m: float,
        window: int,
        margin: float,
    ) -> CanvasGeometry:
        """The canvas over ``y_um`` x ``x_um`` (either order), ``margin`` of each range (at
        least two pixels) added per side, and room for the ``window`` at every edge."""
        dx_um = pixel_size_m * 1e6
        y_lo, y_hi = sorted(y_um)
        x_lo, x_hi = sorted(x_um)
        y_margin = max(margin * (y_hi - y_lo), 2 * dx_um)
        x_margin = max(margin * (x_hi - x_lo), 2 * dx_um)
        origin = (y_lo - y_margin, x_lo - x_margin)
        shape = (
            math.ceil((y_hi - y_lo + 2 * y_margin) / dx_um) + window + 1,
            math.ceil((x_hi - x_lo + 2 * x_margin) / dx_um) + window + 1,
        )
        return cls(pixel_size_m, window, origin, shape)

    def to_pixels(self, positions_um: np.ndarray) -> np.ndarray:
        """(k, 2) (y, x) µm → (k, 2) float top-left pixel of each probe window."""
        dx_um = self.pixel_size_m * 1e6
        return (np.asarray(positions_um, dtype=np.float64) - np.asarray(self.origin_um)) / dx_um

    def pixels_to_metres(self, pixels: np.ndarray) -> np.ndarray:
        dx_um = self.pixel_size_m * 1e6
        return (np.asarray(pixels, dtype=np.float64) * dx_um + np.asarray(self.origin_um)) * 1e-6

    @staticmethod
    def to_metres(positions_um: np.ndarray) -> np.ndarray:
        return np.asarray(positions_um, dtype=np.float64) * 1e-6
