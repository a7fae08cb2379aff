"""Reconstruction quality against a known object, blind to ptychography's ambiguities.

A ptychographic reconstruction is only defined up to a global complex scale,
a linear phase ramp (with a matching probe tilt) and, with imperfect
positions or probe drift, a small translation. :func:`object_error` removes
exactly those before measuring, so it scores the object and nothing else.
Host (NumPy) only: metrics run on snapshots.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["illuminated_mask", "object_error", "register_object"]


def _fit_phase_ramp(ratio: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Gradient (gy, gx) [rad/px] of the phase plane best explaining ``angle(ratio)`` on ``mask``.

    Coarse step: the peak of the zero-padded spectrum of the masked ratio
    (robust to phase wraps); fine step: least squares, weighted by |ratio|,
    on the remaining, now small, phase.
    """
    h, w = ratio.shape
    pad = 4
    spec = np.abs(np.fft.fft2(np.where(mask, ratio, 0), s=(pad * h, pad * w)))
    ky, kx = np.unravel_index(np.argmax(spec), spec.shape)
    gy = 2 * np.pi * np.fft.fftfreq(pad * h)[ky]
    gx = 2 * np.pi * np.fft.fftfreq(pad * w)[kx]
    yy, xx = np.indices(ratio.shape)
    fy, fx = _fine_ramp(ratio * np.exp(-1j * (gy * yy + gx * xx)), mask)
    return float(gy + fy), float(gx + fx)


def _fine_ramp(ratio: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """Small residual phase-plane gradient by weighted least squares (no wraps expected)."""
    yy, xx = np.nonzero(m)
    r = ratio[m]
    r = r * np.exp(-1j * np.angle(np.sum(r)))
    wgt = np.abs(r)
    a = np.stack([yy, xx, np.ones(yy.size)], axis=1) * wgt[:, None]
    coef, *_ = np.linalg.lstsq(a, np.angle(r) * wgt, rcond=None)
    return float(coef[0]), float(coef[1])


def _scaled_error(g: np.ndarray, r: np.ndarray) -> float:
    """min_c ||g - c r|| / ||g|| (c complex, least squares)."""
    rr = np.vdot(r, r).real
    c = np.vdot(r, g) / rr if rr > 0 else 0.0
    return float(np.linalg.norm(g - c * r) / np.linalg.norm(g))


def register_object(
    reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``estimate`` shifted (sub-pixel) and de-ramped onto ``reference``; returns (aligned, shift).

    Start: :func:`skimage.registration.phase_cross_correlation` on
    mean-removed amplitudes inside ``mask`` (amplitudes do not see phase
    ramps). Then the shift is refined (Nelder-Mead, to ~0.005 px) to minimise
    the scaled, de-ramped error itself, so the metric really is the minimum
    over translation, ramp and scale (the masked correlation alone is
    biased towards zero shift by the common window edge).
    """
    from scipy.optimize import minimize
    from skimage.registration import phase_cross_correlation

    ref = np.asarray(reference, dtype=np.complex128)
    est = np.asarray(estimate, dtype=np.complex128)
    m = np.ones(ref.shape, bool) if mask is None else np.asarray(mask, bool)
    a_ref = np.where(m, np.abs(ref) - np.abs(ref)[m].mean(), 0.0)
    a_est = np.where(m, np.abs(est) - np.abs(est)[m].mean(), 0.0)
    if np.allclose(a_ref, 0) or np.allclose(a_est, 0):
        shift = np.zeros(2)
    else:
        shift, _, _ = phase_cross_correlation(a_ref, a_est, upsample_factor=20, normalization=None)
        shift = np.asarray(shift, dtype=np.float64)
    # The coarse ramp (wrap-robust, costly) once, on the whole-pixel alignment (np.roll is
    # exact), removed in est's own frame *before* any Fourier shift: a ramp is not periodic
    # and shifting it would ring.
    yy, xx = np.indices(ref.shape, dtype=np.float64)
    whole = np.rint(shift).astype(int)
    gy, gx = _fit_phase_ramp(ref * np.conj(np.roll(est, tuple(whole), axis=(0, 1))), m)
    est_ft = np.fft.fft2(est * np.exp(1j * (gy * (yy + whole[0]) + gx * (xx + whole[1]))))
    g = ref[m]

    def align(s: np.ndarray) -> np.ndarray:
        shifted = np.fft.ifft2(ndimage.fourier_shift(est_ft, s))
        fy, fx = _fine_ramp(ref * np.conj(shifted), m)
        return shifted * np.exp(1j * (fy * yy + fx * xx))

    def cost(s: np.ndarray) -> float:
        return _scaled_error(g, align(s)[m])

    simplex = shift[None, :] + np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.3]])
    res = minimize(
        cost,
        shift,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 5e-3, "fatol": 1e-7, "maxiter": 200},
    )
    best = res.x if res.fun <= cost(shift) else shift
    return align(best), np.asarray(best, dtype=np.float64)


def object_error(
    reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Normalised object error ``min ||gt - c * T(rec)|| / ||gt||`` over ``mask``.

    The minimum is over ``T`` = sub-pixel translation and linear phase ramp
    (fitted to ``angle(gt * conj(rec))``) and over the global complex scale
    ``c`` (least squares, ``sum(conj(T rec) gt) / sum |T rec|^2``); see
    :func:`register_object`. Norms are L2 over the pixels of ``mask`` (all
    pixels if None). 0 is perfect; ~1 means unrelated or orthogonal objects.
    """
    gt = np.asarray(reference)
    rec = np.asarray(estimate)
    if gt.shape != rec.shape:
        raise ValueError(f"reference {gt.shape} and estimate {rec.shape} differ in shape")
    m = np.ones(gt.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.shape != gt.shape or not m.any():
        raise ValueError("mask must have the objects' shape and select at least one pixel")
    aligned, _ = register_object(gt, rec, m)
    return _scaled_error(gt[m].astype(np.complex128), aligned[m])


def illuminated_mask(
    positions_px: np.ndarray,
    probe: np.ndarray,
    canvas_shape: tuple[int, int],
    threshold: float = 0.3,
    erode_px: int = 2,
) -> np.ndarray:
    """Well-illuminated region: summed |probe|^2 over all positions >= ``threshold`` x its max.

    Positions (N, 2) (y, x) are window top-left corners in canvas pixels,
    rounded as the solver does; the result is eroded by ``erode_px`` so the
    poorly constrained rim is left out.
    """
    from hxn_liveptycho.recon.backend import to_host

    p = np.abs(to_host(probe)) ** 2
    n = p.shape[0]
    h, w = int(canvas_shape[0]), int(canvas_shape[1])
    pos = np.rint(np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)).astype(int)
    pos[:, 0] = np.clip(pos[:, 0], 0, h - n)
    pos[:, 1] = np.clip(pos[:, 1], 0, w - n)
    cover = np.zeros((h, w))
    for y, x in pos:
        cover[y : y + n, x : x + n] += p
    if cover.max() <= 0:
        return np.zeros((h, w), bool)
    mask = cover >= threshold * cover.max()
    if erode_px > 0:
        mask = ndimage.binary_erosion(mask, iterations=erode_px)
    return mask
