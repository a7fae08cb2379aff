"""The end of a pass and what happens between passes: momentum, the probe/object gauge,
the amplitude clamp, the probe modes' orthogonalisation and the positions' refinement.

Functions of the solver's state, each with its reference xp expression and the
fused kernel beside it (one launch for the pass's tail on CuPy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.recon import forward
from hxn_liveptycho.recon._batch import Batch
from hxn_liveptycho.recon._modes import orthogonalize_modes
from hxn_liveptycho.recon._pass_end_kernels import (
    mix_modes,
    mode_unitary,
    momentum_step,
    pass_tail,
)
from hxn_liveptycho.recon._positions import (
    apply_model_shifts,
    constrain_drift,
    shift_gradient,
)
from hxn_liveptycho.recon.backend import (
    to_host,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver


def end_pass(s: StreamingSolver, algorithm: str, update_probe: bool) -> None:
    """Momentum (ePIE, LSQ-ML), the probe's gauge and the object's clamp after a pass.
    Fused: three launches at most (the xp path takes some thirty small ones, which
    cost the host more than the GPU's work on a small scan)."""
    p = s.params
    moving = algorithm != "dm" and p.momentum_gain > 0
    if algorithm == "dm":  # a fixed-point map of its waves: no history carried over
        s._object_momentum.reset()
        s._probe_momentum.reset()
    gauge = update_probe and p.fix_probe_power
    if not s._fused:
        if moving:
            s._object_momentum.step(s._objects)
            if update_probe:
                s._probe_momentum.step(s._probes)
        if gauge:
            fix_gauge(s)
        clamp_object(s)
        return
    if moving and update_probe:
        momentum_step(
            s._probes,
            *s._probe_momentum.buffers_for(s._probes),
            p.momentum_friction,
            p.momentum_gain,
        )
    if not (moving or gauge or p.object_amplitude_max is not None):
        return
    objects = s._objects
    pass_tail(
        objects,
        s._probes,
        momentum=s._object_momentum.buffers_for(objects) if moving else (0, objects, objects),
        friction=p.momentum_friction,
        gain=p.momentum_gain,
        power=s._probe_power if gauge else None,
        amax=p.object_amplitude_max,
    )


def fix_gauge(s: StreamingSolver) -> None:
    """Hold the probe power at the data's value by trading scale with the object."""
    xp = s._xp
    scale = xp.sqrt(s._probe_power / xp.sum(forward.probe_intensity(s))).astype(xp.float32)
    s._probes *= scale
    s._objects /= scale


def clamp_object(s: StreamingSolver) -> None:
    amax = s.params.object_amplitude_max
    if amax is None:
        return
    xp = s._xp
    a = xp.abs(s._objects)
    s._objects *= xp.where(a > amax, amax / xp.maximum(a, 1e-30), 1.0).astype(xp.float32)


def orthogonalize(s: StreamingSolver) -> None:
    """Orthogonalise the probe modes; their momentum and stored DM exit waves follow the
    same mixing."""
    waves = s._dm_waves[: s._dm_ready] if s._dm_waves is not None else None
    if s._fused:  # each array mixed in place, one read and one write; no host sync
        u = mode_unitary(s._probes)
        for modes in (s._probes, *s._probe_momentum.buffers):
            mix_modes(modes[None], u)
        if waves is not None and len(waves):
            mix_modes(waves, u)
        return
    xp = s._xp
    s._probes, u = orthogonalize_modes(s._probes, xp)
    s._probe_momentum.mix(u)
    if waves is None or not len(waves):
        return
    # Batch by batch: one copy of all the waves would double DM's biggest buffer. Each
    # object mode's block of K waves follows the probe modes' mixing.
    m = s._objects.shape[0]
    for start in range(0, s._dm_ready, s.params.batch_size):
        rows = waves[start : start + s.params.batch_size]
        shape = rows.shape
        blocks = rows.reshape(shape[0], m, shape[1] // m, -1)
        rows[...] = xp.matmul(u[None, None], blocks).reshape(shape)


def estimate_shifts(
    s: StreamingSolver, batch: Batch, obj: Any, obj_num: Any, illum: Any, refine: bool
) -> None:
    """Record the least-squares position shifts of ``batch`` (applied after the pass)."""
    if not refine:
        return
    xp = s._xp
    s._shift[batch.rows] = shift_gradient(obj, obj_num, illum, xp).astype(xp.float64)


def apply_shifts(s: StreamingSolver) -> None:
    """Move every active position by its recorded shift, within the bounds, mean fixed."""
    if s.params.position_model != "free":  # global affine + drift model (title 11)
        apply_model_shifts(s)
        return
    xp, p, m = s._xp, s.params, s._n_active
    h, w = s._shape
    meas = s._meas[:m]
    drift = s._pos[:m] - meas
    limit = xp.asarray([h - s._n, w - s._n], dtype=xp.float64)
    new = constrain_drift(
        drift,
        p.position_step * s._shift[:m],
        -meas,
        limit[None] - meas,
        p.max_position_step_px,
        p.max_position_shift_px,
        xp,
    )
    s._pos[:m] = meas + new
    s._pos_host = np.array(to_host(s._pos[:m]), dtype=np.float64)
    s._shift[:m] = 0
