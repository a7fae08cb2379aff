"""Detector frame → solver input: crop around the beam, mask bad pixels, take the root.

The Eiger marks dead or hot pixels with the dtype's largest value; those become
zero amplitude and are counted, never fed to the solver as photons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hxn_liveptycho.errors import ConfigurationError


def beam_center(frames: np.ndarray) -> tuple[float, float]:
    """Centre of mass of the summed frames (bad-pixel markers excluded), as (row, column)."""
    stack = np.asarray(frames)
    if stack.ndim == 2:
        stack = stack[None]
    marker = np.iinfo(stack.dtype).max if stack.dtype.kind in "ui" else np.inf
    total = np.where(stack == marker, 0, stack).sum(axis=0, dtype=np.float64)
    weight = total.sum()
    if weight <= 0:
        return (stack.shape[1] / 2, stack.shape[2] / 2)
    rows = np.arange(total.shape[0])
    cols = np.arange(total.shape[1])
    return (
        float((total.sum(axis=1) * rows).sum() / weight),
        float((total.sum(axis=0) * cols).sum() / weight),
    )


def crop_window(
    shape: tuple[int, int], center: tuple[float, float], size: int
) -> tuple[slice, slice]:
    """The ``size``-square window centred on ``center``; it must lie inside the frame."""
    top = round(center[0]) - size // 2
    left = round(center[1]) - size // 2
    if top < 0 or left < 0 or top + size > shape[0] or left + size > shape[1]:
        raise ConfigurationError(
            f"ROI of {size} px around {center} does not fit in a {shape[0]}x{shape[1]} frame"
        )
    return slice(top, top + size), slice(left, left + size)


def to_amplitude(frame: np.ndarray, window: tuple[slice, slice]) -> tuple[np.ndarray, int]:
    """Cropped sqrt-amplitude (float32) and the number of masked pixels in it."""
    return _amplitude(frame[window])


def to_amplitudes(
    frames: Sequence[np.ndarray], window: tuple[slice, slice]
) -> tuple[np.ndarray, int]:
    """:func:`to_amplitude` of a batch in a few whole-batch operations: at kHz frame rates
    the per-frame calls, not the arithmetic, were the session thread's cost.

    Every frame must have the batch's shape and dtype (the session quarantines odd ones
    before they get here); a larger frame would otherwise be cropped silently and a
    smaller one fail the stack with NumPy's message.
    """
    if frames:
        shape, dtype = frames[0].shape, frames[0].dtype
        odd = [
            (i, f.shape, f.dtype)
            for i, f in enumerate(frames)
            if f.shape != shape or f.dtype != dtype
        ]
        if odd:
            raise ConfigurationError(
                f"frames of a batch differ: {shape} {dtype} first, then {odd[:3]}"
            )
    return _amplitude(np.stack([frame[window] for frame in frames]))


def _amplitude(crop: np.ndarray) -> tuple[np.ndarray, int]:
    """sqrt of the counts in ``crop``; saturated integer pixels (the dtype's maximum, as the
    Eiger marks bad pixels) and negative values become 0."""
    if crop.dtype.kind in "ui":
        bad = crop == np.iinfo(crop.dtype).max
        n_bad = int(bad.sum())
        counts = crop.astype(np.float32)
        if n_bad:
            counts[bad] = 0.0
    else:
        counts = np.clip(crop.astype(np.float32), 0.0, None)
        n_bad = 0
    return np.sqrt(counts, out=counts), n_bad
