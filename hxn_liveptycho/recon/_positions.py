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
"""

from __future__ import annotations

import math
import types
from typing import Any

from hxn_liveptycho.recon.backend import fft2, ifft2

__all__ = ["constrain_drift", "fraction_ramps", "shift_gradient", "shifted_probes", "unshift_sum"]

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
    drift: Any, step: Any, lo: Any, hi: Any, max_step: float, max_shift: float, xp: types.ModuleType
) -> Any:
    """New drifts (N, 2): ``drift + step`` within the bounds, with zero mean over positions.

    Bounds per position and axis: ``|new - drift| <= max_step``, ``|new| <=
    max_shift`` and ``lo <= new <= hi`` (the canvas). The mean drift is held at
    zero (a global translation is not observable; letting it wander only
    moves the reconstruction). Alternating projections onto the zero-mean
    plane and the box; the box comes last, so the bounds hold exactly and
    the mean is zero up to the rounds' residual. ``drift`` itself lies in both
    sets (zero mean, within bounds), so they intersect.
    """
    low = xp.maximum(xp.maximum(drift - max_step, -max_shift), lo)
    high = xp.minimum(xp.minimum(drift + max_step, max_shift), hi)
    new = xp.clip(drift + step, low, high)
    for _ in range(_PROJECTION_ROUNDS):
        new = new - xp.mean(new, axis=0, keepdims=True)
        new = xp.clip(new, low, high)
    return new
