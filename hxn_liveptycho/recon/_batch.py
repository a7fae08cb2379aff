"""What the solver and its algorithms share about one batch of positions, and two small
array helpers they all use."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

__all__ = ["LSQ_STEP_REG", "WHOLE_PIXEL_TOL", "Batch", "Sums", "grow", "regularised"]

#: Tikhonov weight of the LSQ-ML step-length fit (times the batch-mean diagonal).
LSQ_STEP_REG = 0.1
#: Positions closer than this to a whole pixel are taken as whole (float noise).
WHOLE_PIXEL_TOL = 1e-4


@dataclass(frozen=True)
class Batch:
    """Positions updated together: their active-set rows, window corners and bounding box."""

    rows: Any  # (B,) int64 on xp
    corners: Any  # (B, 2) int32 on xp: each window's top-left canvas pixel
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) on the host: the windows' bounding box
    table: Any | None = None  # fused path, sub-pixel data: the shift ramp table (B, 2, n)
    # (made for the whole pass in forward.batches; the fused steps read it here)

    @property
    def origin(self) -> tuple[int, int]:
        return self.box[0], self.box[1]

    @property
    def box_shape(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    @property
    def box_slices(self) -> tuple[slice, slice]:
        return slice(self.box[0], self.box[2]), slice(self.box[1], self.box[3])


@dataclass
class Sums:
    """The fused path's sums of one batch (:func:`~hxn_liveptycho.recon.forward.fused_sums`)."""

    num: Any  # (box) complex64: sum of w conj(P) dpsi over the windows
    den: Any  # (box) float32: sum of |P|^2 over the windows
    oden: Any | None  # (n, n) float32: sum of |O|^2 over the batch (probe update only)
    den_max: Any  # max(den), as the sums tracked it (recon._raw_kernels.max_slots)
    oden_max: Any  # max(oden), likewise
    terms: Any | None  # (B, C, n, n) probe terms (sub-pixel probe update only)
    terms_sum: Any | None  # (K, n, n) their sum over the batch (whole-pixel probe update)


def grow(buf: Any, needed: int, xp: types.ModuleType, *, exact: bool = False) -> Any:
    """Return ``buf`` with room for ``needed`` rows (capacity doubles unless ``exact``,
    old rows kept)."""
    if buf.shape[0] >= needed:
        return buf
    cap = needed if exact else max(needed, 2 * buf.shape[0], 16)
    new = xp.zeros((cap, *buf.shape[1:]), dtype=buf.dtype)
    new[: buf.shape[0]] = buf
    return new


def regularised(den: Any, r: float, xp: types.ModuleType) -> Any:
    """``(1 - r) den + r max(den)``, floored above zero, in place."""
    den *= 1.0 - r
    den += r * xp.max(den)
    xp.maximum(den, 1e-30, out=den)
    return den
