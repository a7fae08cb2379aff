"""The solver's buffers: the memory they take and how they grow as frames arrive.

The solver refuses a state that would not fit (:mod:`hxn_liveptycho.recon.memory`
estimates it from the arrays each algorithm holds and allocates); these functions
of its state count what it holds, check a growth before it happens, and make room.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import memory
from hxn_liveptycho.recon._batch import WHOLE_PIXEL_TOL, grow
from hxn_liveptycho.recon._modes import orthogonalize_modes
from hxn_liveptycho.recon.backend import (
    is_cupy,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver

#: The solver's own logger: a clipped position is the solver's news.
log = logging.getLogger("hxn_liveptycho.recon.iterative")


def object_modes_from(s: StreamingSolver, first: Any) -> Any:
    """``(m, H, W)`` object modes: ``first`` and ``object_modes - 1`` weak random fields
    (10 % of its mean amplitude, seeded): a copy of it would get the same updates and
    never split off."""
    xp, m = s._xp, s.params.object_modes
    objects = xp.empty((m, *first.shape), dtype=xp.complex64)
    objects[0] = first
    if m > 1:
        rng = np.random.default_rng((s.params.seed, 1))
        noise = rng.normal(size=(m - 1, *first.shape, 2)).astype(np.float32)
        scale = 0.1 * float(xp.mean(xp.abs(first))) / np.sqrt(2.0)
        objects[1:] = xp.asarray((noise[..., 0] + 1j * noise[..., 1]) * scale)
    return objects


def held_arrays(s: StreamingSolver) -> list[Any]:
    arrays = [s._objects, s._probes, s._amps, s._pos, s._meas]
    arrays += [s._shift, s._amp_power]
    if s._xp is np:  # on CuPy the host copy of the positions is no device memory
        arrays.append(s._pos_host)
    arrays += [a for a in (s._valid, s._dm_waves, s._probe_power) if a is not None]
    if s._opr is not None:
        arrays += s._opr.held_arrays()
    return arrays + s._object_momentum.buffers + s._probe_momentum.buffers


def estimate_terms(s: StreamingSolver, rows: int, subpixel: bool | None = None) -> dict[str, int]:
    """Memory terms for ``rows`` positions; ``subpixel`` None: as configured (the
    refusal checks count the shifts even before the data shows whether it needs them)."""
    return memory.estimate_terms(
        rows,
        s._n,
        s.params.probe_modes,
        s.params.algorithms,
        s._shape,
        s.params.batch_size,
        backend="cupy" if is_cupy(s._xp) else "numpy",
        subpixel=s.params.subpixel_positions if subpixel is None else subpixel,
        position_refinement=s.params.position_refinement,
        momentum=s.params.momentum_gain > 0,
        object_modes=s.params.object_modes,
        opr_modes=s.params.opr_modes,
    )


def check_memory(s: StreamingSolver, rows: int, held: int, what: str) -> None:
    """Refuse (ConfigurationError) a state of ``rows`` positions that would not fit."""
    needed = sum(estimate_terms(s, rows).values())
    p = s.params
    what = (
        f"{what} ({rows} positions of {s._n}x{s._n}, {p.probe_modes} probe mode(s), "
        f"{p.object_modes} object mode(s), "
        f"{'/'.join(sorted(p.algorithms))}, batch {p.batch_size}, canvas "
        f"{s._shape[0]}x{s._shape[1]})"
    )
    memory.check_fits(needed, held, s._xp, s._memory_limit, what)


def reserve(s: StreamingSolver, needed: int) -> None:
    """Grow the per-position buffers to hold ``needed`` rows, checking memory first.

    Capacity doubles (or jumps to ``expected_positions``) so streaming appends stay
    cheap; when the doubled capacity would not fit but ``needed`` does, it grows to
    ``needed`` only; when neither fits, ConfigurationError and nothing is changed.
    """
    cap = s._amps.shape[0]
    if cap >= needed:
        return
    want = max(needed, 2 * cap, 16, s._expected or 0)
    try:
        check_memory(s, want, s.held_bytes(), "growing to")
    except ConfigurationError:
        if want == needed:
            raise
        want = needed
        check_memory(s, want, s.held_bytes(), "growing to")
    xp = s._xp
    s._amps = grow(s._amps, want, xp, exact=True)
    s._pos = grow(s._pos, want, xp, exact=True)
    s._meas = grow(s._meas, want, xp, exact=True)
    s._shift = grow(s._shift, want, xp, exact=True)
    if s._dm_waves is not None:
        s._dm_waves = grow(s._dm_waves, want, xp, exact=True)


def clip_positions(s: StreamingSolver, pos: np.ndarray) -> np.ndarray:
    """``pos`` (k, 2) with every window inside the canvas (clipped in, counted and logged),
    and whole pixels up to float noise made whole; notes whether the probe must now be
    shifted per position (a sub-pixel part the data have, when the settings allow it)."""
    (h, w), n, k = s._shape, s._n, pos.shape[0]
    hi = np.array([h - n, w - n], dtype=np.float64)
    clipped = np.clip(pos, 0.0, hi)
    n_clip = int(np.any(np.abs(np.rint(clipped) - np.rint(pos)) > 0, axis=1).sum())
    if n_clip:
        s.clipped_positions += n_clip
        log.warning(
            "%d of %d positions put the window outside the %dx%d canvas; clipped in "
            "(%d clipped so far)",
            n_clip,
            k,
            h,
            w,
            s.clipped_positions,
        )
    # Whole pixels up to float noise are whole pixels (no probe shift needed for them).
    whole = np.rint(clipped)
    clipped = np.where(np.abs(clipped - whole) < WHOLE_PIXEL_TOL, whole, clipped)
    if not s._subpixel and s.params.subpixel_positions and np.any(clipped != whole):
        s._subpixel = True
    return clipped


def append_frames(s: StreamingSolver, amps: Any, clipped: np.ndarray) -> None:
    """Store ``amps`` (k, n, n; zero frequency at the centre) and their ``clipped``
    positions after the active ones, growing the buffers first (refused, keeping what was
    there, when that would not fit). The first frames also fix the probe's power: the
    mean measured total, ``sum_k |fft2 P_k|^2 = n^2 sum_k |P_k|^2``."""
    xp, n, k = s._xp, s._n, clipped.shape[0]
    start, stop = s._n_active, s._n_active + k
    reserve(s, stop)
    # Into the buffer directly (one temporary of the chunk's size); the input stays untouched.
    stored = s._amps[start:stop]
    stored[...] = xp.fft.ifftshift(amps, axes=(-2, -1))
    xp.copyto(stored, 0, where=~xp.isfinite(stored))
    xp.maximum(stored, 0, out=stored)
    if s._valid is not None:
        stored *= s._valid
    dev = xp.asarray(clipped)
    s._pos[start:stop] = dev
    s._pos_host = np.concatenate([s._pos_host[:start], clipped])
    s._meas[start:stop] = dev
    s._shift[start:stop] = 0
    power = xp.sum(stored**2)
    s._amp_power = s._amp_power + power
    s._n_active = stop
    if s._probe_power is None:
        target = power / (k * n * n)
        current = xp.sum(s._probes.real**2 + s._probes.imag**2)
        s._probes *= xp.sqrt(target / current).astype(xp.complex64)
        s._probe_power = target.astype(xp.float32)
        if s._probes.shape[0] > 1:
            s._probes, _ = orthogonalize_modes(s._probes, xp)
