"""The solver's buffers: the memory they take and how they grow as frames arrive.

The solver refuses a state that would not fit (:mod:`hxn_liveptycho.recon.memory`
estimates it from the arrays each algorithm holds and allocates); these functions
of its state count what it holds, check a growth before it happens, and make room.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import memory
from hxn_liveptycho.recon._batch import grow
from hxn_liveptycho.recon.backend import (
    is_cupy,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver


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
