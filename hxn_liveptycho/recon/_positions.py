"""Sub-pixel probe positions and their gradient-based refinement, written over ``xp``.

Sub-pixel shifts: the exit wave at the position ``p = b + f`` (``b`` whole
pixels, ``0 <= f < 1``) is ``psi(r) = P(r) O(r + p)``; framed at the whole
pixel ``b`` it is ``P(r - f) O(r + b)``, which has the same far-field modulus.
So the object window is cut at ``b`` and the probe is shifted by ``f`` with a
Fourier phase ramp (exact for the band-limited probe; the same trick as
:func:`hxn_liveptycho.sim.phantom.simulate_diffraction`). The probe update is
the adjoint: each position's probe gradient is shifted back by ``-f`` before
the sum over positions. The probe shift is circular within the window,
exactly as in the simulator, so solver and simulator share one forward model.

Refinement (Odstrčil et al., Opt. Express 26, 3108 (2018), Sec. 4.3; the
"gradient" position correction of pty-chi; Dwivedi et al. 2018): with the
exit-wave update ``dpsi`` the algorithm asks for, the least-squares shift of
position ``j`` along axis ``a`` is

    dr_a = Re sum_k sum_r conj(P_k d_a O) dpsi_k / sum_k sum_r |P_k d_a O|^2,

``d_a O`` the object's gradient over the window. ``sum_k conj(P_k) dpsi_k``
is the object-update numerator the solver computes anyway, and
``sum_k |P_k|^2`` the illumination, so the shift costs two gradients and four
reductions per position.

Global model (``params.position_model`` other than "free"): each pass's shifts
are split into what a global affine map and slow drift of the measured
positions explain (:mod:`~hxn_liveptycho.recon.position_model`, fitted to all
positions at once) and a per-position rest, applied with
``position_residual_gain`` and held within ``max_position_shift_px`` of the
model; see :func:`apply_model_shifts`.
"""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.recon.backend import fft2, ifft2, to_host
from hxn_liveptycho.recon.position_model import PositionModel, fit_position_model

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver

__all__ = [
    "apply_model_shifts",
    "constrain_drift",
    "fitted_position_model",
    "fraction_ramps",
    "position_model_entries",
    "shift_gradient",
    "shifted_probes",
    "unshift_sum",
]

#: Rounds of the alternating projection onto {zero mean drift} and the bound box.
_PROJECTION_ROUNDS = 6


def fraction_ramps(frac: Any, n: int, xp: types.ModuleType) -> Any:
    """Phase ramps (B, n, n) complex64 that shift an (n, n) image by ``frac`` (B, 2) (y, x) px.

    ``ifft2(fft2(P) * ramp)`` is ``P(r - frac)`` (circularly); separable, so it
    is built as the outer product of one ramp per axis.
    """
    k = xp.fft.fftfreq(n).astype(xp.float32)
    f = frac.astype(xp.float32)
    ey = xp.exp((-2j * math.pi) * (f[:, 0:1] * k[None, :])).astype(xp.complex64)
    ex = xp.exp((-2j * math.pi) * (f[:, 1:2] * k[None, :])).astype(xp.complex64)
    return ey[:, :, None] * ex[:, None, :]


def shifted_probes(probe_ft: Any, ramp: Any, xp: types.ModuleType) -> Any:
    """Probe modes (B, K, n, n) shifted per position: ``ifft2(fft2(P_k) * ramp_j)``."""
    return ifft2(probe_ft[None] * ramp[:, None], xp=xp, overwrite_x=True)


def unshift_sum(x: Any, ramp: Any, xp: types.ModuleType) -> Any:
    """``sum_j shift_{-f_j}(x_j)`` (K, n, n) of per-position images ``x`` (B, K, n, n).

    The adjoint of :func:`shifted_probes`: one forward FFT per image, the sum
    in Fourier space, one inverse FFT per mode.
    """
    f = fft2(x, xp=xp)
    f *= xp.conj(ramp)[:, None]
    return ifft2(xp.sum(f, axis=0), xp=xp, overwrite_x=True)


def shift_gradient(obj: Any, obj_num: Any, illum: Any, xp: types.ModuleType) -> Any:
    """Least-squares position shifts (B, 2) (y, x) float32 px for a batch.

    ``obj`` (B, n, n) object windows, ``obj_num`` (B, n, n) ``sum_k conj(P_k)
    dpsi_k``, ``illum`` (B, n, n) or (n, n) ``sum_k |P_k|^2``. Pixels at the
    window border use one-sided differences (they sit where the probe is weak).
    """
    out = []
    for axis in (1, 2):
        g = xp.gradient(obj, axis=axis)
        num = xp.sum((xp.conj(g) * obj_num).real, axis=(1, 2))
        den = xp.sum((g.real**2 + g.imag**2) * illum, axis=(1, 2))
        out.append(num / xp.maximum(den, 1e-30))
    return xp.stack(out, axis=1).astype(xp.float32)


def constrain_drift(
    drift: Any,
    step: Any,
    lo: Any,
    hi: Any,
    max_step: float | Any,
    max_shift: float,
    xp: types.ModuleType,
) -> Any:
    """New drifts (N, 2): ``drift + step`` within the bounds, with zero mean over positions.

    Bounds per position and axis: ``|new - drift| <= max_step``, ``|new| <=
    max_shift`` and ``lo <= new <= hi`` (the canvas). The mean drift is held at
    zero (a global translation is not observable; letting it wander only
    moves the reconstruction). Alternating projections onto the zero-mean
    plane and the box; the box comes last, so the bounds hold exactly and
    the mean is zero up to the rounds' residual. ``drift`` itself lies in both
    sets (zero mean, within bounds), so they intersect. ``max_step`` may be an
    (N, 1) array: a bound per position.
    """
    low = xp.maximum(xp.maximum(drift - max_step, -max_shift), lo)
    high = xp.minimum(xp.minimum(drift + max_step, max_shift), hi)
    new = xp.clip(drift + step, low, high)
    for _ in range(_PROJECTION_ROUNDS):
        new = new - xp.mean(new, axis=0, keepdims=True)
        new = xp.clip(new, low, high)
    return new


def _drift_degree(s: StreamingSolver) -> int:
    """Degree of the drift polynomial the solver's settings fit (0: the affine map alone)."""
    p = s.params
    return p.position_drift_degree if p.position_model == "affine+drift" else 0


def _fit_or_none(
    measured: np.ndarray, positions: np.ndarray, degree: int, weights: np.ndarray | None = None
) -> PositionModel | None:
    """The robust fit, or None with too few positions for its parameters: then the
    positions move freely (a model fitted to a handful would only echo their noise)."""
    used = len(measured) if weights is None else int(np.count_nonzero(weights))
    if used < 3 * (3 + degree):
        return None
    return fit_position_model(measured, positions, drift_degree=degree, weights=weights)


def apply_model_shifts(s: StreamingSolver) -> None:
    """Move the positions by this pass's shifts through the global model (``position_model``).

    Per position the shift is ``position_step x`` the estimate, at most
    ``max_position_step_px`` per axis. The model's fit to these shifts (all
    positions pooled, robustly) moves every position, times
    ``position_model_gain`` (the per-position estimates see only part of a global
    distortion each pass: the object, updated from the same wrong positions,
    absorbs the rest, so the global part needs a larger gain than the positions'
    own noise would allow each alone); the rest of each shift is
    applied times ``position_residual_gain``, so a position the gradients cannot
    place still follows the global distortion while its own evidence is used,
    more slowly. The result is refitted and each position held within
    ``max_position_shift_px`` of that fit. Positions never refined (they sit
    exactly on their measured value: added since the last pass) first jump onto
    the current model. Last, as without a model, the positions stay inside the
    canvas, move at most ``max_position_step_px`` (except that jump) and keep
    their mean at the measured mean (a global translation is not observable).
    The step bound wins over the model: a model that moves faster than it is
    followed over several passes.
    """
    xp, p, m = s._xp, s.params, s._n_active
    degree = _drift_degree(s)
    meas = np.asarray(to_host(s._meas[:m]), dtype=np.float64)
    old = np.asarray(to_host(s._pos[:m]), dtype=np.float64)
    step = np.clip(
        p.position_step * np.asarray(to_host(s._shift[:m]), dtype=np.float64),
        -p.max_position_step_px,
        p.max_position_step_px,
    )
    start = old.copy()
    fresh = ~np.any(old != meas, axis=1)
    current = None
    if fresh.any() and not fresh.all():
        current = _fit_or_none(meas, old, degree, weights=(~fresh).astype(np.float64))
    if current is None:  # nothing refined yet, or too little to fit: all move alike
        fresh[:] = False
    else:
        start[fresh] = current.predict(meas[fresh], np.flatnonzero(fresh))
        step[fresh] = 0.0  # estimated at the old place: stale once the position jumped
    pooled = _fit_or_none(meas, meas + step, degree, weights=(~fresh).astype(np.float64))
    if pooled is None:
        target = start + step
    else:
        explained = pooled.displacement(meas, np.arange(m))
        explained[fresh] = 0.0
        residual = step - explained
        target = start + p.position_model_gain * explained + p.position_residual_gain * residual
    total = _fit_or_none(meas, target, degree)
    # Too few positions for a model: held near the measured ones, as without a model.
    model = meas if total is None else total.predict(meas, np.arange(m))
    bound = p.max_position_shift_px
    target = model + np.clip(target - model, -bound, bound)
    h, w = s._shape
    limit = np.array([h - s._n, w - s._n], dtype=np.float64)
    max_step = np.where(fresh, np.inf, p.max_position_step_px)[:, None]
    max_shift = bound if total is None else np.inf  # the model's rest is bounded above
    new = constrain_drift(
        old - meas, target - old, -meas, limit[None] - meas, max_step, max_shift, np
    )
    s._pos[:m] = xp.asarray(meas + new)
    s._pos_host = meas + new
    s._shift[:m] = 0


def fitted_position_model(s: StreamingSolver) -> PositionModel | None:
    """The global model of the solver's current positions against the measured ones.

    Fitted with the settings' drift degree (none for "free" and "affine"); None
    without ``position_refinement`` or with too few positions for the model.
    """
    if not s.params.position_refinement:
        return None
    m = s._n_active
    meas = np.asarray(to_host(s._meas[:m]), dtype=np.float64)
    pos = np.asarray(to_host(s._pos[:m]), dtype=np.float64)
    return _fit_or_none(meas, pos, _drift_degree(s))


def position_model_entries(
    s: StreamingSolver, pixel_size_m: float | None = None
) -> dict[str, float]:
    """:func:`fitted_position_model`'s named quantities for a snapshot, each key prefixed
    ``position_model_`` (empty when there is no fit)."""
    fit = fitted_position_model(s)
    if fit is None:
        return {}
    return {f"position_model_{k}": v for k, v in fit.summary(pixel_size_m).items()}
