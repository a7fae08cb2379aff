"""Mixed-state probe modes: the first guess of the extra modes and their orthogonalisation.

A partially coherent beam is a sum of mutually incoherent modes ``P_k``;
the detector sees ``sum_k |fft2(P_k O)|^2``. That sum is unchanged by any
unitary mixing of the modes, so the modes are only defined up to one: the
solver keeps them orthogonal and sorted by power (mode 0 the dominant one)
by diagonalising their K x K Gram matrix. Written over ``xp``; the K x K
eigen-decomposition stays on the device. The solver's fused CuPy path makes the same
unitary in one launch (:func:`hxn_liveptycho.recon._pass_end_kernels.mode_unitary`): cuSOLVER's eigh
held the host for half a millisecond a call.
"""

from __future__ import annotations

import types
from typing import Any

__all__ = ["initial_modes", "orthogonalize_modes"]

#: Power of each extra mode in the first guess, as a fraction of mode 0's.
EXTRA_MODE_POWER = 0.05


def initial_modes(first: Any, k: int, xp: types.ModuleType) -> Any:
    """(k, n, n) complex64 modes: ``first`` and k-1 small orthogonal perturbations of it.

    Mode m > 0 is ``first`` times a low-order Hermite-like pattern (x, y, xy,
    x^2 - 1, y^2 - 1, ... in units of the beam's rms width about its
    centroid), Gram-Schmidt-orthogonalised against the earlier modes and
    scaled to :data:`EXTRA_MODE_POWER` of the first mode's power.
    """
    first = xp.asarray(first, dtype=xp.complex64)
    n = first.shape[-1]
    w = (first.real**2 + first.imag**2).astype(xp.float32)
    total = xp.sum(w)
    idx = xp.arange(n, dtype=xp.float32)
    cy = xp.sum(w.sum(axis=1) * idx) / total
    cx = xp.sum(w.sum(axis=0) * idx) / total
    sy = xp.sqrt(xp.sum(w.sum(axis=1) * (idx - cy) ** 2) / total) + 1e-3
    sx = xp.sqrt(xp.sum(w.sum(axis=0) * (idx - cx) ** 2) / total) + 1e-3
    y = ((idx - cy) / sy)[:, None]
    x = ((idx - cx) / sx)[None, :]
    patterns = [x, y, x * y, x**2 - 1, y**2 - 1, x * (y**2 - 1), y * (x**2 - 1)]
    modes = [first]
    for m in range(1, k):
        # Beyond the listed patterns: higher powers of x and y, alternating.
        pat = patterns[m - 1] if m - 1 < len(patterns) else (x if m % 2 else y) ** (m // 2 + 1)
        mode = first * pat
        for prev in modes:
            mode = mode - prev * (
                xp.vdot(prev.ravel(), mode.ravel()) / xp.vdot(prev.ravel(), prev.ravel()).real
            )
        norm = xp.sum(mode.real**2 + mode.imag**2)
        mode = mode * xp.sqrt(EXTRA_MODE_POWER * total / xp.maximum(norm, 1e-30))
        modes.append(mode.astype(xp.complex64))
    return xp.stack(modes).astype(xp.complex64)


def orthogonalize_modes(modes: Any, xp: types.ModuleType) -> tuple[Any, Any]:
    """Orthogonal modes sorted by decreasing power, and the unitary ``u`` (k, k) that made them.

    ``new = u @ modes.reshape(k, -1)``: the eigenvectors of the Gram matrix
    ``G = M M^H``, so ``new`` has Gram matrix diag(eigenvalues) and the
    incoherent sum ``sum_k |F(P_k O)|^2`` is unchanged. Each row's phase is
    fixed so its largest coefficient is real and positive (the modes keep
    their phase from one call to the next). Anything else mixed in the same
    mode basis (stored exit waves) must be mixed with ``u`` too.
    """
    k = modes.shape[0]
    flat = modes.reshape(k, -1)
    gram = flat @ xp.conj(flat).T
    _, vecs = xp.linalg.eigh(gram)  # ascending eigenvalues, columns
    u = xp.conj(vecs[:, ::-1]).T
    lead = xp.argmax(xp.abs(u), axis=1)
    ph = u[xp.arange(k), lead]
    u = u * (xp.conj(ph) / xp.maximum(xp.abs(ph), 1e-30))[:, None]
    u = u.astype(xp.complex64)
    return (u @ flat).reshape(modes.shape).astype(xp.complex64), u
