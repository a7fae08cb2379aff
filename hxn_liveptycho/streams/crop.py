"""A fixed detector window cut in the receiver's decode threads or worker processes.

A 1M Eiger frame is 4.4 MB; the reconstruction reads a 128²-256² window
around the beam. Cutting it where the frame is decoded (in parallel, before
the frame crosses a thread or process boundary) is what lets the receivers
keep up with the detector. The window is the beamline's (a fixed beam centre
on the detector); each run's own ROI is then cut from it by the session.

A cut frame no longer shows the shape it had on the detector, yet the session must
quarantine a frame of another shape (issue 23: a larger frame was cropped silently and
reconstructed). So the window travels as a :class:`DetectorWindow`, an ndarray that
remembers the detector frame's shape, and a frame the window does not fit becomes an
empty window that says why (it was dropped by the receiver, uncounted by the run);
the session compares detector shapes and quarantines both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DetectorCrop", "DetectorWindow", "WindowCrop", "as_window", "window_source"]


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


class DetectorWindow(np.ndarray):
    """Pixels cut from a detector frame, with the frame's shape (``detector_shape``) and,
    for a frame the window did not fit, why (``misfit``; the pixels are then empty).

    Survives slicing, views and pickling (worker processes); :func:`numpy.asarray` turns
    it back into a plain array for whatever keeps the pixels.
    """

    detector_shape: tuple[int, ...]
    misfit: str | None

    def __array_finalize__(self, obj: Any) -> None:
        self.detector_shape = getattr(obj, "detector_shape", tuple(np.shape(obj)))
        self.misfit = getattr(obj, "misfit", None)

    def __reduce__(self) -> tuple[Any, ...]:
        reduced: Any = super().__reduce__()
        rebuild, args, state = reduced
        return rebuild, args, (state, self.detector_shape, self.misfit)

    def __setstate__(self, state: Any) -> None:
        array_state, self.detector_shape, self.misfit = state
        super().__setstate__(array_state)


def as_window(
    pixels: np.ndarray, detector_shape: tuple[int, ...], misfit: str | None = None
) -> DetectorWindow:
    """``pixels`` (no copy) as a window cut from a ``detector_shape`` frame."""
    window = np.asarray(pixels).view(DetectorWindow)
    window.detector_shape = tuple(int(n) for n in detector_shape)
    window.misfit = misfit
    return window


def window_source(data: Any) -> tuple[tuple[int, ...], str | None] | None:
    """(detector shape, misfit) of a cut frame; None for a frame no window was cut from."""
    if isinstance(data, DetectorWindow):
        return data.detector_shape, data.misfit
    return None


@dataclass(frozen=True)
class WindowCrop:
    """The picklable transform a receiver applies to each decoded frame (also in a worker
    process). It returns a :class:`DetectorWindow`; for a frame the window does not fit,
    an empty one whose ``misfit`` says why, so that the run counts it as quarantined."""

    top: int
    left: int
    size: int

    def __call__(self, pixels: np.ndarray) -> DetectorWindow:
        shape = tuple(np.shape(pixels))
        h, w = shape[-2:] if len(shape) >= 2 else (0, 0)
        if self.top < 0 or self.left < 0 or self.top + self.size > h or self.left + self.size > w:
            misfit = (
                f"the detector crop of {self.size} px at ({self.top}, {self.left}) does not fit "
                f"in a {'x'.join(map(str, shape))} frame"
            )
            return as_window(np.empty((0, 0), np.asarray(pixels).dtype), shape, misfit)
        window = pixels[..., self.top : self.top + self.size, self.left : self.left + self.size]
        return as_window(np.ascontiguousarray(window), shape)
