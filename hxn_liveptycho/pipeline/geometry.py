"""Stage coordinates ↔ object-canvas pixels for one scan.

The canvas is sized once from the commanded extents plus a margin, so the
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
        grid = config.grid
        dx_um = config.pixel_size_m * 1e6
        y_lo, y_hi = sorted((grid.y_start_um, grid.y_end_um))
        x_lo, x_hi = sorted((grid.x_start_um, grid.x_end_um))
        y_margin = max(config.canvas_margin * (y_hi - y_lo), 2 * dx_um)
        x_margin = max(config.canvas_margin * (x_hi - x_lo), 2 * dx_um)
        origin = (y_lo - y_margin, x_lo - x_margin)
        n = config.roi.size
        shape = (
            math.ceil((y_hi - y_lo + 2 * y_margin) / dx_um) + n + 1,
            math.ceil((x_hi - x_lo + 2 * x_margin) / dx_um) + n + 1,
        )
        return cls(config.pixel_size_m, n, origin, shape)

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
