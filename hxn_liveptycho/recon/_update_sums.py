"""Fused CuPy kernels for the sums of an update: the object's numerator and illumination
over the batch's windows, the probe terms and the object power, and LSQ-ML's ratio of
them added into the object.

An update reads its exit-wave changes ``dpsi`` (B, K, n, n) once for all the sums it
needs. Each launcher here makes one set of sums and returns one kind of thing; the
kernels behind them take flags, which each launcher fixes. Two ways to gather the object
sums: by canvas tile (``liveptycho_tile_sums``: a thread owns a canvas pixel, no
atomics, a fixed order), used up to :data:`TILE_MODES` modes where a ``box`` is given,
or per window pixel with one atomic add per pixel and sum (``liveptycho_window_sums``),
which can add the probe-side sums in the same read. The tiles are the faster of the two
on the solver's scans.

``O_b`` is the window of ``canvas`` at ``corners`` (B, 2) int32: the object before this
update; ``probes`` are shared (K, n, n) or per position (B, K, n, n). The object sums
(:class:`ObjectSums`) cover the canvas from their ``origin``; ``overwrite``: they cover
exactly ``box`` (``origin`` its corner) and become the sums, whatever they held (empty
arrays will do): the tiles write them without reading them, the atomics zero them first.
``den_max`` / ``power_max``: zeroed slots (:func:`~hxn_liveptycho.recon._raw_kernels.max_slots`)
that receive the maximum of ``den`` / ``power`` after the sums: the sums only grow, so
the largest partial sum is the largest total, with no reduction of its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from hxn_liveptycho.recon._raw_kernels import (
    PROBE_CHUNK,
    TILE_SHAPE,
    TileShape,
    launch,
    placeholder_for,
    raw_kernel,
    require_contiguous,
    row_layout,
)
from hxn_liveptycho.recon._regularised import regularising

__all__ = [
    "TILE_MODES",
    "ObjectSums",
    "add_probe_terms",
    "add_window_ratio",
    "object_sums",
    "object_sums_and_probe_sum",
    "object_sums_and_probe_terms",
    "probe_terms_with_power",
    "tile_grid",
]

Box = tuple[int, int, int, int]

#: Positions one thread of ``liveptycho_window_sums`` takes in turn: the sums over the
#: batch (object power, summed probe terms) are made in registers over them, so a pixel
#: gets one atomic add per chunk instead of one per position (128 positions of a batch
#: all add into the same (n, n) pixels).
_WINDOW_CHUNK = 8
#: Most modes for which the solver gathers the object sums and LSQ-ML's ratio into the
#: object by tile: up to three modes the tiles beat the atomics, and whole iterations of
#: the dense scans got faster with them, the sparse ones no slower
#: (figures: docs/benchmarks-history.md).
TILE_MODES = 3


class ObjectSums(NamedTuple):
    """Where an update's object sums go: ``num`` (complex64) and ``den`` (float32; None:
    no illumination) covering the canvas from ``origin``, and ``den_max``, slots that
    track ``max(den)`` (None: not tracked)."""

    num: Any
    den: Any | None = None
    origin: tuple[int, int] = (0, 0)
    den_max: Any | None = None


def object_sums(
    dpsi: Any,
    probes: Any,
    canvas: Any,
    corners: Any,
    sums: ObjectSums,
    *,
    box: Box | None = None,
    weights: Any | None = None,
    overwrite: bool = False,
) -> None:
    """``num += w_b sum_k conj(P_k) dpsi_bk`` and ``den += sum_k |P_k|^2`` at each window
    (``w_b``: ``weights`` (B,) float32, or 1), by canvas tile given ``box`` ``(y0, x0,
    y1, x1)`` (the canvas pixels the windows cover) and up to :data:`TILE_MODES` modes,
    else with atomics."""
    _require_contiguous_sums(dpsi, probes, canvas, corners, *sums[:2], sums.den_max)
    den_slots = sums.den_max if sums.den is not None else None
    if _by_tile(dpsi, box):
        assert box is not None
        _tile_launch(
            dpsi,
            probes,
            corners,
            box,
            weights,
            num=sums.num,
            den=sums.den,
            origin=sums.origin,
            overwrite=overwrite,
            den_slots=den_slots,
        )
        return
    _zero_if(overwrite, sums)
    _window_launch(dpsi, probes, canvas, corners, sums, weights=weights)


def object_sums_and_probe_sum(
    dpsi: Any,
    probes: Any,
    canvas: Any,
    corners: Any,
    sums: ObjectSums,
    *,
    into: Any,
    power: Any,
    power_max: Any,
    box: Box,
    overwrite: bool = False,
) -> None:
    """The sums of a whole-pixel update: :func:`object_sums` (``den_max`` tracked) and
    :func:`add_probe_terms` (``into`` (K, n, n), ``power`` (n, n), ``power_max``
    tracked). Up to :data:`TILE_MODES` modes, the object sums by tile and the probe-side
    sums in a kernel of their own; beyond, one pass of atomics makes both."""
    require_contiguous(into, power, power_max)
    if _by_tile(dpsi, box):
        object_sums(dpsi, probes, canvas, corners, sums, box=box, overwrite=overwrite)
        add_probe_terms(dpsi, canvas, corners, into=into, power=power, power_max=power_max)
        return
    _require_contiguous_sums(dpsi, probes, canvas, corners, *sums[:2], sums.den_max)
    _zero_if(overwrite, sums)
    _window_launch(
        dpsi, probes, canvas, corners, sums, power=power, power_max=power_max, terms_sum=into
    )


def object_sums_and_probe_terms(
    dpsi: Any,
    probes: Any,
    canvas: Any,
    corners: Any,
    sums: ObjectSums,
    *,
    power: Any,
    power_max: Any,
    overwrite: bool = False,
) -> Any:
    """The sums of a sub-pixel update in one pass of atomics: :func:`object_sums`
    (``den_max`` tracked) and ``power += sum_b |O_b|^2`` (``power_max`` tracked); returns
    each position's probe terms ``conj(O_b) dpsi_bk`` (B, K, n, n), which are shifted
    back before they are summed. (One read of ``dpsi`` with atomics beat the tiles and a
    second read.)"""
    import cupy as cp

    _require_contiguous_sums(dpsi, probes, canvas, corners, *sums[:2], sums.den_max)
    require_contiguous(power, power_max)
    terms = cp.empty(dpsi.shape, dtype=dpsi.dtype)
    _zero_if(overwrite, sums)
    _window_launch(
        dpsi, probes, canvas, corners, sums, terms=terms, power=power, power_max=power_max
    )
    return terms


def add_probe_terms(
    dpsi: Any, canvas: Any, corners: Any, *, into: Any, power: Any, power_max: Any | None = None
) -> None:
    """The whole-pixel probe-side sums alone: ``into`` (K, n, n) complex64 gains ``sum_b
    conj(O_b) dpsi_bk`` and ``power`` (n, n) float32 ``sum_b |O_b|^2`` (``power_max``:
    track its maximum); a chunk of positions' reads issued at once, one atomic add per
    chunk and sum. DM's probe pass, and a batch whose object sums were made by tile."""
    require_contiguous(dpsi, canvas, corners, into, power)
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    chunks = -(-b // PROBE_CHUNK)
    track = power_max is not None
    i32 = np.int32
    args = (dpsi, canvas, corners, i32(n), i32(canvas.shape[1]), i32(k), i32(b), i32(track))
    slots = power_max if track else placeholder_for(np.float32)
    launch("probe_sums", chunks * n * n, (*args, into, power, slots))


def probe_terms_with_power(dpsi: Any, probes: Any, canvas: Any, corners: Any) -> Any:
    """Each position's probe terms ``conj(O_b) dpsi_bk`` with ``|O_b|^2`` as channel K:
    (B, K + 1, n, n), shifted back and summed together on sub-pixel data (DM's probe
    pass)."""
    import cupy as cp

    require_contiguous(dpsi, probes, canvas, corners)
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    terms = cp.empty((b, k + 1, n, n), dtype=dpsi.dtype)
    _window_launch(dpsi, probes, canvas, corners, terms=terms)
    return terms


def _by_tile(dpsi: Any, box: Box | None) -> bool:
    """Whether the object sums of ``dpsi`` over ``box`` are gathered by tile."""
    return box is not None and dpsi.shape[1] <= TILE_MODES


def _require_contiguous_sums(*arrays: Any | None) -> None:
    require_contiguous(*(a for a in arrays if a is not None))


def _zero_if(overwrite: bool, sums: ObjectSums) -> None:
    """The atomics add: sums that must be overwritten start from zero."""
    if overwrite:
        for accumulator in (a for a in sums[:2] if a is not None):
            accumulator.fill(0)


def _window_launch(
    dpsi: Any,
    probes: Any,
    canvas: Any,
    corners: Any,
    sums: ObjectSums | None = None,
    *,
    weights: Any | None = None,
    terms: Any | None = None,
    power: Any | None = None,
    power_max: Any | None = None,
    terms_sum: Any | None = None,
) -> None:
    """One launch of ``liveptycho_window_sums``, one thread per window pixel and chunk of
    positions, each sum asked for added with atomics: the object ``sums`` (``num``
    weighted by ``weights``), per-position ``terms`` (K or K + 1 channels), ``power``, the
    probe terms summed into ``terms_sum``. The kernel tracks both maxima or neither:
    ``power_max`` is tracked with the sums' ``den_max``."""
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    channels = terms.shape[1] if terms is not None else (k if terms_sum is not None else 0)
    absent = placeholder_for(np.float32)
    num, den, origin, den_max = sums if sums is not None else ObjectSums(None)
    track = den is not None and den_max is not None
    if (power_max is not None) != (track and power is not None):
        raise ValueError("power_max is tracked with the object sums' den_max, or neither")
    i32 = np.int32
    args = (
        dpsi,
        probes,
        canvas,
        corners,
        i32(origin[0]),
        i32(origin[1]),
        i32(n),
        i32(num.shape[1] if num is not None else 0),
        i32(canvas.shape[1]),
        i32(k),
        i32(probes.ndim == 4),
        weights if weights is not None else absent,
        i32(weights is not None),
        i32(num is not None),
        i32(den is not None),
        i32(channels),
        i32(power is not None),
        i32(track),
        i32(terms_sum is not None),
        num if num is not None else absent,
        den if den is not None else absent,
        terms if terms is not None else absent,
        power if power is not None else absent,
        den_max if track else absent,
        power_max if power_max is not None else absent,
        terms_sum if terms_sum is not None else absent,
        i32(b),
        i32(_WINDOW_CHUNK),
    )
    launch("window_sums", -(-b // _WINDOW_CHUNK) * n * n, args)


def tile_grid(box: Box, shape: TileShape) -> tuple[int, int, int, int]:
    """``(height, width, tiles_x, tiles)`` of ``box`` ``(y0, x0, y1, x1)``: the tile
    kernels' grid, one block per ``shape.rows`` x 32 tile, ``tiles_x`` across (no tiles for
    an empty box)."""
    height, width = box[2] - box[0], box[3] - box[1]
    tiles_x = -(-width // 32)
    if height <= 0 or width <= 0:
        return height, width, tiles_x, 0
    return height, width, tiles_x, -(-height // shape.rows) * tiles_x


def _tile_launch(
    dpsi: Any,
    probes: Any,
    corners: Any,
    box: Box,
    weights: Any | None,
    *,
    num: Any | None = None,
    den: Any,
    origin: tuple[int, int],
    overwrite: bool = False,
    den_slots: Any | None = None,
    canvas: Any | None = None,
    reg_args: tuple = (),
    shape: TileShape = TILE_SHAPE,
) -> None:
    """Launch ``liveptycho_tile_sums`` over the tiles of ``box``: ``num`` and ``den`` (rows
    from ``origin``; ``den`` None: no illumination; ``den_slots``: track its maximum)
    gain the sums (``overwrite``: become them, on exactly the box), or (``canvas``) the
    canvas gains their ratio, ``den`` regularised as ``reg_args`` (from
    :func:`~hxn_liveptycho.recon._regularised.regularising`; none: taken as it is) say."""
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    require_contiguous(dpsi, probes, corners, *(a for a in (weights, den_slots) if a is not None))
    height, width, tiles_x, tiles = tile_grid(box, shape)
    if b == 0 or tiles == 0:
        return
    ratio = canvas is not None
    accumulator = num if num is not None else den
    assert accumulator is not None, "tile sums need num or den"
    if overwrite and (tuple(origin) != tuple(box[:2]) or accumulator.shape != (height, width)):
        raise ValueError(f"overwritten sums {accumulator.shape} at {origin} are not the box {box}")
    absent = placeholder_for(np.float32)
    i32 = np.int32
    args = (
        dpsi,
        probes,
        corners,
        i32(b),
        i32(n),
        i32(k),
        i32(probes.ndim == 4),
        weights if weights is not None else absent,
        i32(weights is not None),
        *(i32(v) for v in (box[0], box[1], height, width, tiles_x, origin[0], origin[1])),
        i32(accumulator.shape[-1]),
        num if num is not None else absent,
        den if den is not None else absent,
        i32(den is not None and not ratio),
        i32(den_slots is not None),
        den_slots if den_slots is not None else absent,
        i32(2 if ratio else int(overwrite)),
        canvas if ratio else placeholder_for(np.complex64),
        i32(canvas.shape[1] if canvas is not None else 0),
        *(reg_args or regularising(den, 0.0, None)),
    )
    raw_kernel("tile_sums", shape.options())((tiles,), (shape.threads,), args)


def add_window_ratio(
    canvas: Any,
    dpsi: Any,
    probes: Any,
    corners: Any,
    den: Any,
    *,
    box: Box,
    weights: Any | None = None,
    reg: float = 0.0,
    den_max: Any | None = None,
) -> None:
    """``canvas += (sum_b w_b sum_k conj(P_k) dpsi_bk over the windows) / den`` in place,
    ``den`` covering ``box`` ``(y0, x0, y1, x1)`` and regularised on the way as
    :func:`~hxn_liveptycho.recon._regularised.divide_regularised` does with ``reg`` and
    ``den_max`` (reg 0: ``den`` already regularised). Up to :data:`TILE_MODES` modes: the
    object numerator, the regularising and a ``num / den`` add in one pass, with no
    ``num`` array (the sums gathered by canvas tile); with more, the atomic sums into a
    ``num`` array, then one pass that adds the ratio."""
    import cupy as cp

    require_contiguous(canvas, den)
    if den.shape != (box[2] - box[0], box[3] - box[1]):
        raise ValueError(f"den {den.shape} does not cover the box {box}")
    reg_args = regularising(den, reg, den_max)
    if not _by_tile(dpsi, box):
        num = cp.zeros(den.shape, dtype=cp.complex64)
        object_sums(dpsi, probes, canvas, corners, ObjectSums(num, None, box[:2]), weights=weights)
        target = canvas[box[0] : box[2], box[1] : box[3]]
        width, stride = row_layout(target, num.size)
        launch("add_ratio", num.size, (num, den, *reg_args, target, width, stride))
        return
    _tile_launch(
        dpsi,
        probes,
        corners,
        box,
        weights,
        den=den,
        origin=box[:2],
        canvas=canvas,
        reg_args=reg_args,
    )
