"""Fused CuPy kernels whose step ends in a sum: the modulus step with its error, LSQ-ML's
step-length sums and DM's relaxed Fourier step.

Each is one pass over the batch's far fields or exit waves: the per-pixel work
of :mod:`hxn_liveptycho.recon.iterative`'s xp reference, with the sums made
in the same kernel (a block-wide reduction, one atomic add per block and
sum) instead of an intermediate array and a separate reduction. Grids are
(blocks per position, positions); the per-position sums land in a (B, S)
float32 array, the batch error in a 0-d one.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hxn_liveptycho.recon import _fused
from hxn_liveptycho.recon._fused import (
    SLOT_MAX_CUDA,
    regularising,
    step_sums_arrays,
    tile_step_sums,
)
from hxn_liveptycho.recon.kernels import source as kernel_source

__all__ = ["dm_fourier_step", "lsqml_step_sums", "lsqml_steps", "modulus_residual"]

_THREADS = 256
#: Blocks per position: enough to fill the GPU at batch 32+ with 256² frames.
_BLOCKS_PER_POSITION = 32

_SOURCE = kernel_source("fused_sums.cu", SLOT_MAX=SLOT_MAX_CUDA)


@functools.cache
def _module() -> Any:
    import cupy as cp

    return cp.RawModule(code=_SOURCE, options=("-std=c++17",))


@functools.cache
def _function(name: str, device: int) -> Any:
    """Kernel ``name`` loaded on ``device``, looked up once (the hot path calls these per
    batch)."""
    import cupy as cp

    with cp.cuda.Device(device):
        return _module().get_function(name)


def _kernel(name: str) -> Any:
    import cupy as cp

    return _function(name, cp.cuda.runtime.getDevice())


def _launch(name: str, positions: int, nn: int, args: tuple) -> None:
    """Run kernel ``name`` on a (blocks, positions) grid; ``args`` as the kernel takes them
    (``np.int32`` / ``np.float32`` scalars: CuPy would pass Python's as 64-bit)."""
    blocks = min(_BLOCKS_PER_POSITION, -(-nn // _THREADS))
    if positions:
        _kernel(name)((blocks, positions), (_THREADS,), args)


@functools.cache
def _ones(device: int) -> Any:
    """A one-element float32 1 on ``device``: the stand-in for an absent valid-pixel mask."""
    import cupy as cp

    with cp.cuda.Device(device):
        return cp.ones(1, dtype=cp.float32)


def _mask(valid: Any | None) -> tuple[Any, np.int32]:
    import cupy as cp

    return (
        (valid, np.int32(1))
        if valid is not None
        else (_ones(cp.cuda.runtime.getDevice()), np.int32(0))
    )


def modulus_residual(
    f: Any,
    amps: Any,
    rows: Any,
    valid: Any | None,
    floor: float,
    scale: float = 1.0,
    err: Any | None = None,
) -> Any:
    """In place: far fields ``f`` (B, K, n, n) become ``scale f v (A / sqrt(max(I, floor))
    - 1)``, ``I = sum_k |f_k|^2``, ``v`` the valid-pixel mask (float32, FFT order).
    Returns the batch's squared amplitude error ``sum (v (sqrt(I) - A))^2`` (0-d), added
    into ``err`` when given (a pass's running total), else in a new array."""
    import cupy as cp

    b, k, nn = f.shape[0], f.shape[1], f.shape[-1] * f.shape[-2]
    if err is None:
        err = cp.zeros((), dtype=cp.float32)
    mask, has = _mask(valid)
    i32, f32 = np.int32, np.float32
    args = (f, amps, rows, mask, has, i32(k), i32(nn), f32(floor), f32(scale), err)
    _launch("liveptycho_modulus", b, nn, args)
    return err


def lsqml_step_sums(
    chi: Any,
    probes: Any,
    dprobes: Any | None,
    canvas: Any,
    num: Any,
    den: Any,
    corners: Any,
    origin: tuple[int, int],
    reg: float = 0.0,
    den_max: Any | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Any:
    """The normal-equation sums (B, 5) ``(a11, a12, a22, b1, b2)`` of LSQ-ML's step fit.

    ``u = P dO`` with ``dO = num / den`` read on the batch's box (at ``origin``), ``v =
    O dP`` with ``O`` the canvas window and ``dprobes`` the probe step (shared (K, n, n),
    per position (B, K, n, n), or None: object step only, v = 0); sums over modes and
    pixels of ``|u|^2, Re u* v, |v|^2, Re u* chi, Re v* chi``. ``den`` is regularised as
    it is read, as :func:`~hxn_liveptycho.recon._fused.divide_regularised` does with ``reg``
    and ``den_max`` (reg 0: ``den`` already regularised).

    ``box``, the canvas pixels ``num`` and ``den`` cover (``origin`` its corner): up to
    ``_fused._TILE_STEP_MODES`` modes (one) the sums are gathered by canvas tile
    (:func:`~hxn_liveptycho.recon._fused.tile_step_sums`), which reads ``dO`` and ``O``
    once per canvas pixel instead of once per window pixel.
    """
    import cupy as cp

    b, k, n = chi.shape[0], chi.shape[1], chi.shape[-1]
    out = cp.zeros((b, 5), dtype=cp.float32)
    if box is not None and k <= _fused._TILE_STEP_MODES and tuple(origin) == tuple(box[:2]):
        reg_args = regularising(den, reg, den_max)
        tile_step_sums(chi, probes, dprobes, canvas, num, den, corners, box, reg_args, out)
        return out
    arrays, mode = step_sums_arrays(chi, probes, dprobes, canvas, num, den, corners)
    i32 = np.int32
    args = (
        *arrays,
        i32(origin[0]),
        i32(origin[1]),
        i32(n),
        i32(num.shape[1]),
        i32(canvas.shape[1]),
        i32(k),
        i32(probes.ndim == 4),
        i32(mode),
        *regularising(den, reg, den_max),
        out,
    )
    _launch("liveptycho_lsqml_sums", b, n * n, args)
    return out


def lsqml_steps(
    sums: Any, reg: float, alpha: float, beta: float, with_probe: bool
) -> tuple[Any, Any]:
    """:func:`~hxn_liveptycho.recon._lsqml.steps_from_sums` and the step multipliers in one
    launch: returns the object weights ``alpha * alpha_O`` (B,) and the probe factor
    ``beta * mean(alpha_P)`` (0-d; 0 without ``with_probe``), float32 on the device."""
    import cupy as cp

    b = sums.shape[0]
    weights = cp.empty(b, dtype=cp.float32)
    scale = cp.zeros((), dtype=cp.float32)
    f32 = np.float32
    args = (sums, np.int32(b), f32(reg), f32(alpha), f32(beta), np.int32(with_probe))
    _kernel("liveptycho_lsqml_steps")((1,), (_THREADS,), (*args, weights, scale))
    return weights, scale


def dm_fourier_step(
    phi: Any,
    waves: Any,
    amps: Any,
    rows: Any,
    valid: Any | None,
    relax: float,
    beta: float,
    scale: float,
    sums: Any | None = None,
) -> Any | None:
    """DM's relaxed Fourier step on a batch, in place; returns the error of ``phi`` (0-d).
    Given ``sums``, a zeroed (B, 3) float32 buffer (the batch's rows of one for the
    pass), the errors stay in its last column and nothing is returned: the pass sums them
    once instead of two small launches a batch.

    ``phi`` (B, K, n, n): far fields of ``P O_j`` (the overlap projection); ``waves``: the
    stored far-field exit waves of the same positions. ``waves`` becomes ``psi + beta
    (P_F(2 phi - psi) - phi)`` and ``phi`` that times ``scale`` (ready for an unscaled
    inverse FFT). ``P_F`` is the projection relaxed by ``relax`` (see
    ``recon.dm.DifferenceMap._fourier_factor``).
    """
    import cupy as cp

    b, k, nn = phi.shape[0], phi.shape[1], phi.shape[-1] * phi.shape[-2]
    given = sums is not None
    if sums is None:
        sums = cp.zeros((b, 3), dtype=cp.float32)
    elif sums.shape != (b, 3) or not sums.flags.c_contiguous:
        raise ValueError(f"DM's sums of {b} positions are a contiguous ({b}, 3), got {sums.shape}")
    mask, has = _mask(valid)
    i32 = np.int32
    _launch("liveptycho_dm_sums", b, nn, (phi, waves, amps, rows, mask, has, i32(k), i32(nn), sums))
    args = (
        phi,
        waves,
        amps,
        rows,
        mask,
        has,
        sums,
        i32(k),
        i32(nn),
        cp.float32(relax * relax),
        cp.float32(beta),
        cp.float32(scale),
    )
    _launch("liveptycho_dm_update", b, nn, args)
    return None if given else cp.sum(sums[:, 2])
