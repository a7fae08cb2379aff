"""Orthogonal probe relaxation (OPR): a probe that varies from position to position.

In a fly scan the illumination drifts while the stage moves (beam position, focus,
flux, vibrations of the optics), so no single probe explains every frame. OPR
(Odstrčil et al., Opt. Express 24, 8360 (2016); the "variable probe" of PtychoShelves
and of pty-chi's ``OPRModeWeights``, Odstrčil et al., Opt. Express 26, 3108 (2018))
writes the probe at position j as a few eigen-probes with per-position weights,

    P_j = U_0 + sum_{k >= 1} w_jk U_k,

``U_0`` the solver's dominant (first) probe mode, ``U_k`` the variable eigen-probes,
``w_jk`` real. The main weight is fixed at 1 (pty-chi's default, intensity variation
off); the other incoherent probe modes stay shared by every position.

The variant here is alternating least squares, one power-iteration step per pass,
and it keeps no per-position probes (so it streams):

* each ePIE batch forms the per-position probe update the algorithm computes
  before it sums them, ``r_j = shift_{-f_j}(conj(O_j) dpsi_j0) / ((1 - r) |O_j|^2 +
  r max |O_j|^2)`` (``r`` = ``probe_reg``), the change of ``P_j`` frame j asks for;
* for each eigen-probe in turn the batch's weights take the least-squares projection
  ``c_jk = Re <U_k, r_j> / <U_k, U_k>`` (``w_jk += beta c_jk``) and the residual loses
  what they explain (``r_j -= c_jk U_k``, deflation); the pass sums ``sum_j w_jk r_j``
  and ``sum_j w_jk^2`` over its batches;
* the pass's end (with the probe update) takes the eigen-probes' least-squares step
  ``U_k += beta sum_j w_jk r_j / (sum_j w_jk^2 + reg N)`` (one power iteration on the
  per-position updates, towards their leading singular vectors; ``reg`` keeps the step
  small while the weights are), moves the weights' mean into ``U_0`` (so ``U_0`` is the
  scan's mean probe and the variable part has zero mean), Gram-Schmidt-orthogonalises
  the eigen-probes against ``U_0`` and each other under ``Re <u, v>`` (the inner product
  real weights see) and scales them to ``U_0``'s norm, re-projects the weights so the
  model is kept, and sorts the eigen-probes by their weights' power.

Summing the eigen-probes' step over a whole pass, rather than stepping per batch,
keeps a batch's few weights from amplifying its noise.

``U_0`` itself moves by the ordinary ePIE probe update (the sum over positions).
OPR runs the solver's reference path, on the GPU too (not the fused kernels).

Over several ranks (:mod:`~hxn_liveptycho.recon.ranks`) each rank keeps its own positions'
weights; the eigen-probes are made alike on every rank when the ranks first meet, and a
pass's end sums the eigen-probes' step, its weights' power and the weights' mean over the
ranks (one reduction, the eigen-probes' size), then sums the weights' power again to sort
them alike (a few numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.recon import forward
from hxn_liveptycho.recon._batch import Batch
from hxn_liveptycho.recon._modes import initial_modes
from hxn_liveptycho.recon.backend import fft2, ifft2, to_host

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver

__all__ = ["VariableProbe", "opr_entries", "position_probes"]

#: Tikhonov weight (per position of the pass) of the eigen-probes' least-squares step,
#: in units of the squared weights (eigen-probes carry the main probe's norm).
EIGEN_PROBE_REG = 1e-3


class VariableProbe:
    """The variable part of a solver's probe: ``modes - 1`` eigen-probes (K, n, n) and
    their per-position weights (N, modes - 1). Both are made when first needed, after
    the first frames have set the probe's power."""

    def __init__(self, modes: int) -> None:
        if modes < 2:
            raise ValueError(
                f"OPR needs 2 or more eigen-probes (the main one and more), got {modes}"
            )
        self.modes = modes
        self._eigen: Any | None = None  # (modes - 1, n, n) complex64
        self._weights: Any | None = None  # (rows, modes - 1) float32, rows >= active
        # The pass's least-squares step of the eigen-probes: sum_j w_jk r_j and
        # sum_j w_jk^2 over the positions seen, applied at the pass's end.
        self._pass_sums: tuple[Any, Any] | None = None
        self._seen = 0

    # ------------------------------------------------------------------ state
    def eigen_probes(self, s: StreamingSolver) -> Any:
        """The variable eigen-probes (modes - 1, n, n), started as low-order patterns
        of the main probe, orthogonal to it (:func:`~hxn_liveptycho.recon._modes.initial_modes`)."""
        if self._eigen is None:
            xp = s._xp
            start = initial_modes(s._probes[0], self.modes, xp)[1:]
            self._eigen = xp.ascontiguousarray(start.astype(xp.complex64))
            _normalise(self._eigen, s._probes[0], xp)
        return self._eigen

    def weights(self, s: StreamingSolver) -> Any:
        """The weights (rows, modes - 1) of the variable eigen-probes, at least one row per
        active position; positions added since the last call start at zero (the main probe)."""
        xp = s._xp
        if self._weights is None:
            self._weights = xp.zeros((0, self.modes - 1), dtype=xp.float32)
        have = self._weights.shape[0]
        if have < s._n_active:
            more = xp.zeros((max(s._n_active, 2 * have) - have, self.modes - 1), xp.float32)
            self._weights = xp.concatenate([self._weights, more])
        return self._weights

    def held_arrays(self) -> list[Any]:
        """The arrays held between passes (the eigen-probes and weights, once made), for
        the solver's count of the memory it holds."""
        return [a for a in (self._eigen, self._weights) if a is not None]

    # ------------------------------------------------------------------ batch
    def batch_probes(self, s: StreamingSolver, batch: Batch) -> tuple[Any, Any | None]:
        """``(probes, ramps)`` as :func:`~hxn_liveptycho.recon.forward.batch_probes`
        gives them on the reference path, with the first mode each position's own
        ``U_0 + sum_k w_jk U_k``: always per position (B, K, n, n)."""
        xp = s._xp
        main = self.main_probes(s, batch.rows)
        b, (k, n, _) = main.shape[0], s._probes.shape
        probes = xp.empty((b, k, n, n), dtype=xp.complex64)
        probes[:] = s._probes[None]
        probes[:, 0] = main
        if not s._subpixel:
            return probes, None
        ramp = forward.batch_ramp(s, batch)
        f = fft2(probes, xp=xp, overwrite_x=True)
        f *= ramp[:, None]
        return ifft2(f, xp=xp, overwrite_x=True), ramp

    def main_probes(self, s: StreamingSolver, rows: Any) -> Any:
        """Each position's own first probe mode ``U_0 + sum_k w_jk U_k`` (B, n, n) complex64
        for the positions ``rows`` (an index array or a slice of the active ones)."""
        w = self.weights(s)[rows]
        return s._probes[0] + s._xp.tensordot(w, self.eigen_probes(s), axes=(1, 0))

    def update(self, s: StreamingSolver, batch: Batch, obj: Any, dpsi: Any, ramp: Any) -> None:
        """Move the batch's weights and the eigen-probes by the batch's per-position probe
        updates (the module's docstring); ``obj`` (B, n, n) are the object windows
        before the batch's update, ``dpsi`` (B, K, n, n) the exit-wave update, ``ramp``
        the positions' shift ramps or None."""
        xp, p = s._xp, s.params
        resid = xp.conj(obj) * dpsi[:, 0]
        if ramp is not None:
            f = fft2(resid, xp=xp, overwrite_x=True)
            f *= xp.conj(ramp)
            resid = ifft2(f, xp=xp, overwrite_x=True)
        den = (obj.real**2 + obj.imag**2).astype(xp.float32)
        peak = xp.max(den.reshape(den.shape[0], -1), axis=1)[:, None, None]
        den *= 1.0 - p.probe_reg
        den += p.probe_reg * peak
        xp.maximum(den, 1e-30, out=den)
        resid /= den
        weights, eigen = self.weights(s), self.eigen_probes(s)
        rows = batch.rows
        w = weights[rows]
        if self._pass_sums is None:
            self._pass_sums = (xp.zeros_like(eigen), xp.zeros(eigen.shape[0], xp.float32))
        step, power = self._pass_sums
        for k in range(eigen.shape[0]):
            u = eigen[k]
            c = _project(resid, u, xp)
            w[:, k] += s.probe_step * c
            resid -= c[:, None, None].astype(xp.complex64) * u
            wk = w[:, k]
            step[k] += xp.tensordot(wk.astype(xp.complex64), resid, axes=(0, 0))
            power[k] += xp.sum(wk * wk)
        self._seen += w.shape[0]
        weights[rows] = w

    # ------------------------------------------------------------------ pass end
    def end_pass(self, s: StreamingSolver) -> None:
        """Move the weights' mean into the main probe, re-orthonormalise the eigen-probes
        keeping the model, and sort them by their weights' power."""
        xp = s._xp
        active = self.weights(s)[: s._n_active]
        eigen = self.eigen_probes(s)
        if s._ranks.size > 1:
            mean = self._sum_over_ranks(s, active, eigen)
        else:
            mean = xp.mean(active, axis=0)
        if self._pass_sums is not None and self._seen:
            step, power = self._pass_sums
            step *= (s.probe_step / (power + EIGEN_PROBE_REG * self._seen))[:, None, None]
            eigen += step
        self._pass_sums = None
        self._seen = 0
        s._probes[0] += xp.tensordot(mean.astype(xp.complex64), eigen, axes=(0, 0))
        active -= mean[None]
        old = eigen.copy()
        _orthonormalise(eigen, s._probes[0], xp)
        # Keep the variable part: w'_jl = sum_k w_jk Re<U'_l, U_k> / <U'_l, U'_l>.
        gram = _gram(eigen, old, xp)
        active[:] = active @ gram.T
        power = xp.sum(active * active, axis=0)
        s._ranks.sum(power)  # several ranks: every rank sorts alike
        power = to_host(power)
        order = np.argsort(-np.asarray(power), kind="stable")
        if np.any(order != np.arange(order.size)):
            idx = xp.asarray(order)
            self._eigen = xp.ascontiguousarray(eigen[idx])
            active[:] = active[:, idx]

    def _sum_over_ranks(self, s: StreamingSolver, active: Any, eigen: Any) -> Any:
        """Several ranks (one reduction): the pass's eigen-probe sums and the count of
        positions they saw become all ranks' (so every rank takes the same step from the
        same eigen-probes, made alike when the ranks first met), and the weights' mean is
        over every rank's positions. Returns that mean (modes - 1,)."""
        xp = s._xp
        if self._pass_sums is None:
            self._pass_sums = (xp.zeros_like(eigen), xp.zeros(eigen.shape[0], xp.float32))
        step, power = self._pass_sums
        counts = xp.asarray([self._seen, active.shape[0]], dtype=xp.float32)
        totals = xp.sum(active, axis=0).astype(xp.float32)
        s._ranks.sum(step, power, totals, counts)
        seen, positions = (int(c) for c in to_host(counts))
        self._seen = seen
        return totals / np.float32(max(positions, 1))


def _orthonormalise(eigen: Any, main: Any, xp: Any) -> None:
    """Gram-Schmidt the eigen-probes (K, n, n) against the main probe and each other under
    ``Re <u, v>``, the inner product real weights see, in place, then scale them to the
    main probe's norm. Among the eigen-probes it is a real change of basis (re-projected
    weights keep the model exactly); against the main probe it removes the part that
    would scale the main probe per position (the intensity variation, which could trade
    with an amplitude gradient of the object) and keeps a change of its phase."""
    for k in range(eigen.shape[0]):
        u = eigen[k]
        for v in (main, *eigen[:k]):
            u -= v * (xp.vdot(v.ravel(), u.ravel()).real / xp.maximum(_norm2(v, xp), 1e-30))
    _normalise(eigen, main, xp)


def _normalise(eigen: Any, main: Any, xp: Any) -> None:
    """Scale the eigen-probes to the main probe's norm, in place (weights are then
    fractions of the main probe)."""
    target = _norm2(main, xp)
    for k in range(eigen.shape[0]):
        scale = xp.sqrt(target / xp.maximum(_norm2(eigen[k], xp), 1e-30))
        eigen[k] *= scale.astype(xp.float32)


def _norm2(u: Any, xp: Any) -> Any:
    return xp.sum(u.real**2 + u.imag**2)


def _project(resid: Any, u: Any, xp: Any) -> Any:
    """``Re <u, resid_j> / <u, u>`` (B,) float32: each position's least-squares weight of ``u``."""
    dot = xp.tensordot(resid, xp.conj(u), axes=((1, 2), (0, 1)))
    return (dot.real / xp.maximum(_norm2(u, xp), 1e-30)).astype(xp.float32)


def _gram(new: Any, old: Any, xp: Any) -> Any:
    """``G_lk = Re <new_l, old_k> / <new_l, new_l>`` (L, K) float32."""
    g = xp.tensordot(xp.conj(new), old, axes=((1, 2), (1, 2))).real
    norms = (new.real**2 + new.imag**2).sum(axis=(1, 2))
    return (g / xp.maximum(norms, 1e-30)[:, None]).astype(xp.float32)


def opr_entries(s: StreamingSolver) -> dict[str, np.ndarray]:
    """The snapshot's OPR entries (host copies), empty with OPR off: ``opr_weights`` (N, M)
    (the main eigen-probe's column is 1) and ``opr_probes`` (M, n, n), the first the
    solver's dominant probe mode."""
    opr = s._opr
    if opr is None:
        return {}
    xp = s._xp
    w = opr.weights(s)[: s._n_active]
    ones = xp.ones((w.shape[0], 1), dtype=xp.float32)
    return {
        "opr_weights": np.asarray(to_host(xp.concatenate([ones, w], axis=1))).copy(),
        "opr_probes": np.asarray(
            to_host(xp.concatenate([s._probes[:1], opr.eigen_probes(s)]))
        ).copy(),
    }


def position_probes(s: StreamingSolver) -> Callable[[slice], Any] | None:
    """With OPR on, a function of a slice of the active positions that gives their own first
    probe modes (B, n, n), unshifted (what
    :func:`~hxn_liveptycho.recon.quality.position_fit` takes to judge each position by
    the probe the solver uses there); None with OPR off. A function rather than the
    (N, n, n) array so that a caller going batch by batch holds one batch's probes."""
    opr = s._opr
    if opr is None:
        return None

    def probes(rows: slice) -> Any:
        return opr.main_probes(s, rows)

    return probes
