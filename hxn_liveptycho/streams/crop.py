"""A fixed detector window cut in the receiver's decode threads or worker processes.

A 1M Eiger frame is 4.4 MB; the reconstruction reads a 128²-256² window
around the beam. Cutting it where the frame is decoded (in parallel, before
the frame crosses a thread or process boundary) is what lets the receivers
keep up with the detector. The window is the beamline's (a fixed beam centre
on the detector); each run's own ROI is then cut from it by the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DetectorCrop", "WindowCrop"]


class DetectorCrop(BaseModel):
    """A ``size``-square detector window around (``center_y``, ``center_x``), detector pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center_y: float = Field(description="Beam centre row on the detector [px].")
    center_x: float = Field(description="Beam centre column on the detector [px].")
    size: int = Field(gt=0, description="Edge of the square window [px].")

    @property
    def origin(self) -> tuple[int, int]:
        """Detector pixel of the window's top-left corner."""
        return round(self.center_y) - self.size // 2, round(self.center_x) - self.size // 2

    def transform(self) -> WindowCrop:
        y0, x0 = self.origin
        return WindowCrop(y0, x0, self.size)


@dataclass(frozen=True)
class WindowCrop:
    """The picklable transform a receiver applies to each decoded frame (also in a worker
    process); a frame the window does not fit raises, and the receiver counts it."""

    top: int
    left: int
    size: int

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[-2:]
        if self.top < 0 or self.left < 0 or self.top + self.size > h or self.left + self.size > w:
            raise ValueError(
                f"detector crop of {self.size} px at ({self.top}, {self.left}) does not fit "
                f"in a {h}x{w} frame"
            )
        window = pixels[..., self.top : self.top + self.size, self.left : self.left + self.size]
        return np.ascontiguousarray(window)
