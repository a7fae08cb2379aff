"""Fused CuPy kernels for the Fourier-space steps of a batch, each with its error sum:
the modulus residual of ePIE and LSQ-ML, and DM's relaxed Fourier step.

Each is one pass over the batch's far fields (two for DM) with the per-pixel work of the
xp reference (:mod:`hxn_liveptycho.recon.forward`, :mod:`hxn_liveptycho.recon.dm`) and
the error summed in the same kernel (a block-wide reduction, one atomic add per block)
instead of an intermediate array and a separate reduction. Far fields are (B, K, n, n)
complex64; amplitudes (rows, n, n) float32, addressed through the batch's active-set
``rows``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hxn_liveptycho.recon._raw_kernels import launch_per_position

__all__ = ["dm_fourier_step", "modulus_residual"]


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
    launch_per_position("liveptycho_modulus", b, nn, args)
    return err


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
    *,
    floor: float = 1e-24,
) -> Any | None:
    """DM's relaxed Fourier step on a batch, in place; returns the error of ``phi`` (0-d).
    Given ``sums``, a zeroed (B, 3) float32 buffer (the batch's rows of one for the
    pass), the errors stay in its last column and nothing is returned: the pass sums them
    once instead of two small launches a batch.

    ``phi`` (B, K, n, n): far fields of ``P O_j`` (the overlap projection); ``waves``: the
    stored far-field exit waves of the same positions. ``waves`` becomes ``psi + beta
    (P_F(2 phi - psi) - phi)`` and ``phi`` that times ``scale`` (ready for an unscaled
    inverse FFT). ``P_F`` is the projection relaxed by ``relax`` (see
    ``recon.dm.DifferenceMap._fourier_factor``), the model intensity floored at ``floor``.
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
    launch_per_position(
        "liveptycho_dm_sums",
        b,
        nn,
        (phi, waves, amps, rows, mask, has, i32(k), i32(nn), cp.float32(floor), sums),
    )
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
        cp.float32(floor),
    )
    launch_per_position("liveptycho_dm_update", b, nn, args)
    return None if given else cp.sum(sums[:, 2])
