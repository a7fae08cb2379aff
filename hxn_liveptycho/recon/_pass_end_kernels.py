"""Fused CuPy kernels for the end of a pass: momentum, the gauge and amplitude clamp, and
the probe modes' orthogonalisation (the unitary and the mixing of the stored waves).

Each is the xp path's step (:mod:`hxn_liveptycho.recon.pass_end`,
:mod:`hxn_liveptycho.recon._momentum`, :mod:`hxn_liveptycho.recon._modes`) in one or two
launches that leave the host free.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hxn_liveptycho.recon._raw_kernels import (
    launch,
    placeholder_for,
    raw_kernel,
    require_contiguous,
)

__all__ = ["mix_modes", "mode_unitary", "momentum_step", "pass_tail"]

#: Most modes :func:`mix_modes` holds (``MIX_MAX_MODES`` of the source; the configuration
#: allows 12).
_MIX_MAX_MODES = 12

#: Threads of :func:`pass_tail`'s one-block power total (a power of two, at most 1024).
_TOTAL_THREADS = 1024


def momentum_step(
    x: Any, stage: int, previous: Any, velocity: Any, friction: float, gain: float
) -> None:
    """``Momentum.step`` (``recon._momentum``) on ``x`` in one pass, with the ``(stage,
    previous, velocity)`` that ``Momentum.buffers_for`` gives."""
    require_contiguous(x, previous, velocity)
    f32 = np.float32
    launch("momentum", x.size, (x, previous, velocity, np.int32(stage), f32(friction), f32(gain)))


def pass_tail(
    objects: Any,
    probes: Any,
    *,
    momentum: tuple[int, Any, Any],
    friction: float,
    gain: float,
    power: Any | None,
    amax: float | None,
) -> None:
    """The end of a pass over ``objects`` and ``probes`` in place, in two launches (one
    without the gauge): the objects' momentum step (``momentum`` as
    :meth:`~hxn_liveptycho.recon._momentum.Momentum.buffers_for` gives it; stage 0: none),
    then with ``power`` (the probes' target ``sum |P|^2``, 0-d float32) the gauge, objects
    divided and probes multiplied by ``sqrt(power / sum |P|^2)``, then the objects'
    amplitude clamp at ``amax`` (None: none). The xp path's ``_fix_gauge`` and
    ``_clamp_object`` in order, with the probes' sum in a fixed order."""
    import cupy as cp

    stage, previous, velocity = momentum
    require_contiguous(objects, probes, previous, velocity)
    gauge = power is not None
    total = placeholder_for(np.float32)
    if gauge:
        power = cp.asarray(power, dtype=cp.float32)  # a pointer to it (no copy if it is one)
        total = cp.empty((), dtype=cp.float32)
        raw_kernel("power_total")((1,), (_TOTAL_THREADS,), (probes, np.int64(probes.size), total))
    size = objects.size + (probes.size if gauge else 0)
    f32 = np.float32
    args: tuple[Any, ...] = (objects, previous, velocity, np.int32(stage), f32(friction), f32(gain))
    args += (
        power if gauge else placeholder_for(np.float32),
        total,
        np.int32(gauge),
        f32(amax or 0.0),
    )
    launch("pass_tail", size, (*args, probes, np.int64(objects.size)))


def mix_modes(waves: Any, u: Any) -> None:
    """``waves[b] <- u @ waves[b]`` over the mode axis of (B, K, n, n), in place: the
    stored exit waves following the orthogonalised probe modes, in one read and one write
    (CuPy's batched GEMM for K = 3 took several times the copy time)."""
    import cupy as cp

    require_contiguous(waves)
    k = waves.shape[1]
    if not 1 <= k <= _MIX_MAX_MODES:
        raise ValueError(f"mix_modes takes 1 to {_MIX_MAX_MODES} modes, got {k}")
    if u.shape != (k, k):
        raise ValueError(f"a mixing of {k} modes is ({k}, {k}), got {u.shape}")
    nn = waves.shape[-2] * waves.shape[-1]
    mixing = cp.ascontiguousarray(u, dtype=cp.complex64)
    launch("mix_modes", waves.shape[0] * nn, (mixing, np.int32(k), np.int64(nn), waves))


#: Most modes for which :func:`mode_unitary`'s block takes 1,024 threads (beyond, 256: the
#: Gram's K (K + 1) / 2 complex sums a thread holds would pass the 64 registers of 1,024).
_GRAM_WIDE_MODES = 4


@functools.cache
def _gram_build(k: int) -> tuple[int, tuple[str, ...]]:
    """Threads of :func:`mode_unitary`'s block for ``k`` modes and the options that build
    its kernel (one build per mode count)."""
    threads = 1024 if k <= _GRAM_WIDE_MODES else 256
    return threads, (f"-DGRAM_MODES={k}", f"-DGRAM_THREADS={threads}")


def mode_unitary(modes: Any) -> Any:
    """The (K, K) complex64 unitary that orthogonalises and sorts ``modes`` (K, ...), as
    :func:`~hxn_liveptycho.recon._modes.orthogonalize_modes` makes it, in one launch that
    leaves the host free (no eigen-solver round trip); :func:`mix_modes` applies it."""
    import cupy as cp

    require_contiguous(modes)
    k = modes.shape[0]
    if not 1 <= k <= _MIX_MAX_MODES:
        raise ValueError(f"mode_unitary takes 1 to {_MIX_MAX_MODES} modes, got {k}")
    threads, options = _gram_build(k)
    u = cp.empty((k, k), dtype=cp.complex64)
    raw_kernel("mode_unitary", options)((1,), (threads,), (modes, np.int64(modes.size // k), u))
    return u
