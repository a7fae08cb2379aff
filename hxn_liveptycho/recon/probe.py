"""A first probe guess from the data and the scan geometry, for runs that bring no probe file.

The mean diffraction pattern gives the probe's far-field modulus (the
zone plate's bright-field disc) exactly; what it cannot give is the defocus
curvature, which sets the beam's footprint on the sample. A quadratic pupil
phase chosen so the geometric footprint is ``footprint_px`` restores it: the
solver then starts from a beam of the right size and structure. A guess
with flat phase (the focal spot) stalls far from the answer on defocused
data, which is how HXN measures.

This guess needs the footprint and the sign; :mod:`~hxn_liveptycho.recon.probe_estimate`
finds both from the data (``probe.initial = "estimate"``, a run's default).
"""

from __future__ import annotations

import numpy as np

#: Fraction of the mean pattern's power inside the radius taken as the pupil edge.
_PUPIL_POWER = 0.95


def pupil_radius_px(mean_intensity: np.ndarray) -> float:
    """Radius (detector pixels, from the centre) holding 95 % of the mean pattern's power."""
    n_y, n_x = mean_intensity.shape
    y = np.arange(n_y) - n_y // 2
    x = np.arange(n_x) - n_x // 2
    r = np.hypot(y[:, None], x[None, :]).ravel()
    order = np.argsort(r)
    cumulative = np.cumsum(mean_intensity.ravel()[order])
    if cumulative[-1] <= 0:
        return n_x / 4
    return float(max(r[order][np.searchsorted(cumulative, _PUPIL_POWER * cumulative[-1])], 1.0))


def initial_probe(
    amplitudes: np.ndarray, *, footprint_px: float | None = None, defocus_sign: int = 1
) -> np.ndarray:
    """Probe guess (n, n) complex64 from measured amplitudes (zero frequency at the centre).

    With ``footprint_px`` the pupil gets the defocus phase ``-s π D m² / (2 R n)``
    (``m`` the frequency index, ``R`` the pupil radius, ``D`` the footprint, ``s``
    the sign: +1 when the sample sits downstream of the focus); without it the
    phase is flat. The solver rescales the power to the measured counts.
    """
    mean_intensity = np.mean(np.square(amplitudes, dtype=np.float64), axis=0)
    modulus = np.sqrt(mean_intensity)
    n = modulus.shape[-1]
    phase = np.zeros_like(modulus)
    if footprint_px is not None:
        radius = pupil_radius_px(mean_intensity)
        y = np.arange(modulus.shape[0]) - modulus.shape[0] // 2
        x = np.arange(n) - n // 2
        k2 = y[:, None] ** 2 + x[None, :] ** 2
        phase = -defocus_sign * np.pi * footprint_px * k2 / (2.0 * radius * n)
    field = np.fft.ifft2(np.fft.ifftshift(modulus * np.exp(1j * phase)))
    return np.fft.fftshift(field).astype(np.complex64)
