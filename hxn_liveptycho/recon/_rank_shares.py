"""Which rank takes which position of a scan: compact regions, a grid of blocks."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["assign_ranks", "grid_shape"]


def grid_shape(size: int) -> tuple[int, int]:
    """``(rows, columns)`` of the most nearly square grid of ``size`` regions (rows >=
    columns): 2 -> (2, 1), 4 -> (2, 2), 6 -> (3, 2)."""
    if size < 1:
        raise ValueError(f"a scan needs at least one rank, got {size}")
    columns = max(c for c in range(1, math.isqrt(size) + 1) if size % c == 0)
    return size // columns, columns


def assign_ranks(
    positions: np.ndarray, size: int, *, extent: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """The rank (int, (N,)) of each position (N, 2): compact regions, a grid of
    :func:`grid_shape` blocks, the longer side of the scan cut into the more of them.

    With ``extent`` ``(low, high)`` (y, x), the scan's bounding box known before its frames
    (a live scan), the blocks are equal cuts of it, so a frame's rank follows from its own
    position whenever it arrives. Without, the cuts are the positions' quantiles (equal
    counts: the positions are all known)."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    rows, columns = grid_shape(size)
    labels = np.zeros(len(pos), dtype=np.int64)
    if len(pos) == 0:
        return labels
    span = np.ptp(pos, axis=0) if extent is None else np.asarray(extent[1]) - np.asarray(extent[0])
    long_axis = int(np.argmax(span))
    short_axis = 1 - long_axis
    if extent is None:
        band = _cuts_by_count(pos[:, long_axis], rows)
    else:
        band = _cuts_by_width(pos[:, long_axis], rows, extent[0][long_axis], extent[1][long_axis])
    for b in range(rows):
        inside = band == b
        if extent is None:
            cell = _cuts_by_count(pos[inside, short_axis], columns)
        else:
            lo, hi = extent[0][short_axis], extent[1][short_axis]
            cell = _cuts_by_width(pos[inside, short_axis], columns, lo, hi)
        labels[inside] = b * columns + cell
    return labels


def _cuts_by_count(values: np.ndarray, parts: int) -> np.ndarray:
    """Part (0 .. parts-1) of each value: equal counts in order of value."""
    order = np.argsort(values, kind="stable")
    part = np.empty(len(values), dtype=np.int64)
    part[order] = (np.arange(len(values)) * parts) // max(len(values), 1)
    return part


def _cuts_by_width(values: np.ndarray, parts: int, low: float, high: float) -> np.ndarray:
    """Part of each value: equal widths of ``[low, high]`` (values outside: the end parts)."""
    width = max(float(high) - float(low), 1e-12)
    return np.clip(((values - low) * parts / width).astype(np.int64), 0, parts - 1)
