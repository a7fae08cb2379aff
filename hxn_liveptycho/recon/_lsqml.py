"""Pieces of LSQ-ML (Odstrčil, Menzel & Guizar-Sicairos, Opt. Express 26, 3108 (2018)).

Maximum-likelihood ptychography solved as a sequence of least-squares
problems: (1) the far-field update of each exit wave that most increases the
likelihood of its frame under the chosen noise model; (2) object and probe
update directions from those exit-wave updates (preconditioned by the summed
illumination); (3) per-position step lengths for the object and the probe by
a small least-squares fit of the exit-wave update with the two directions.
All functions are batched over positions and written over ``xp``.
"""

from __future__ import annotations

import types
from typing import Any

__all__ = ["far_field_factor", "optimal_steps", "steps_from_sums"]

#: Newton iterations for the Poisson step length (the 1-D problem is smooth and convex).
_NEWTON_STEPS = 4
#: Largest Poisson far-field step (1 would put |Psi|^2 at I_meas^2 / I_model).
_MAX_POISSON_STEP = 0.99


def far_field_factor(
    inten: Any,
    amps: Any,
    valid: Any | None,
    noise: str,
    xp: types.ModuleType,
    poisson_floor: float = 0.0,
    modulus_floor: float = 0.0,
) -> Any:
    """Real factor ``g`` (B, n, n) so the far-field update of every mode is ``g * Psi_k``.

    ``inten`` is the model intensity ``sum_k |Psi_k|^2``, ``amps`` the measured
    amplitudes. Gaussian noise on amplitudes: the projection,
    ``g = A / sqrt(max(I, modulus_floor)) - 1``. Poisson noise: the likelihood gradient direction
    ``-xi Psi`` with ``xi = 1 - A^2 / I``, times the step ``a_j`` (one per frame)
    that maximises the frame's Poisson likelihood along it, found by a few
    Newton steps on ``sum [xi I (1 - a xi) - A^2 xi / (1 - a xi)] = 0``, with the
    model intensity taken as at least ``poisson_floor`` (counts): where the model is
    near zero and the frame is not, ``A^2 / I`` would otherwise dominate the frame's
    sums, and its rounding the step.
    Invalid detector pixels get ``g = 0`` (the model is kept there).
    """
    safe = xp.maximum(inten, 1e-12)
    if noise == "gaussian":
        g = amps / xp.sqrt(xp.maximum(safe, xp.float32(modulus_floor))) - 1.0
    else:
        if poisson_floor > 0:
            inten = safe = xp.maximum(inten, xp.float32(poisson_floor))
        meas = amps * amps
        xi = 1.0 - meas / safe
        if valid is not None:
            xi = xi * valid
        xi_i = xi * inten
        xi2_i = xi * xi_i
        a = xp.zeros((inten.shape[0], 1, 1), dtype=xp.float32)
        for _ in range(_NEWTON_STEPS):
            d = 1.0 - a * xi  # > 0 for a < 1, since xi <= 1
            grad = xp.sum(xi_i - a * xi2_i - meas * xi / d, axis=(-2, -1), keepdims=True)
            hess = xp.sum(xi2_i + meas * xi * xi / (d * d), axis=(-2, -1), keepdims=True)
            a = xp.clip(a + grad / xp.maximum(hess, 1e-30), 0.0, _MAX_POISSON_STEP)
        g = -a * xi
    if valid is not None:
        g = g * valid
    return g.astype(xp.float32)


def optimal_steps(
    u: Any, v: Any | None, chi: Any, reg: float, xp: types.ModuleType
) -> tuple[Any, Any | None]:
    """Per-position steps (alpha_O, alpha_P) minimising ``||chi - a_O u - a_P v||^2``.

    ``u`` = P dO (the exit-wave change of a unit object step), ``v`` = dP O
    (of a unit probe step), ``chi`` the wanted exit-wave update, all
    (B, K, n, n); sums run over modes and pixels (:func:`steps_from_sums`
    solves them). ``v`` None: object step only.
    """
    axes = (1, 2, 3)

    def dot(a: Any, b: Any) -> Any:
        return xp.sum((xp.conj(a) * b).real, axis=axes)

    if v is None:
        zero = xp.zeros(u.shape[0], dtype=xp.float32)
        sums = xp.stack([dot(u, u), zero, zero, dot(u, chi), zero], axis=1)
    else:
        sums = xp.stack([dot(u, u), dot(u, v), dot(v, v), dot(u, chi), dot(v, chi)], axis=1)
    return steps_from_sums(sums, reg, v is not None, xp)


def steps_from_sums(
    sums: Any, reg: float, with_probe: bool, xp: types.ModuleType
) -> tuple[Any, Any | None]:
    """The steps of :func:`optimal_steps` from the sums (B, 5) ``(a11, a12, a22, b1, b2)``
    = ``(|u|^2, Re u* v, |v|^2, Re u* chi, Re v* chi)`` per position.

    The 2 x 2 normal equations (real parts, as in the paper) get ``reg`` times
    the batch-mean diagonal added, which keeps badly determined steps small.
    Steps are clipped to [0, 2]. ``with_probe`` False: object step only.
    """
    a11, a12, a22, b1, b2 = (sums[:, i] for i in range(5))
    a11 = a11 + reg * xp.mean(a11) + 1e-30
    if not with_probe:
        return xp.clip(b1 / a11, 0.0, 2.0), None
    a22 = a22 + reg * xp.mean(a22) + 1e-30
    det = a11 * a22 - a12 * a12
    det = xp.where(xp.abs(det) > 1e-30, det, 1e-30)
    alpha_o = (a22 * b1 - a12 * b2) / det
    alpha_p = (a11 * b2 - a12 * b1) / det
    return xp.clip(alpha_o, 0.0, 2.0), xp.clip(alpha_p, 0.0, 2.0)
