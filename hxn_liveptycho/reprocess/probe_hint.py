"""A file's probe as the run's starting probe: the guess's footprint and defocus sign.

Why: the live path guesses the first probe from the mean diffraction pattern
and two numbers, the beam's footprint on the sample and the sign of its
defocus (:func:`hxn_liveptycho.recon.probe.initial_probe`); a wrong pair
leaves the fit far from the answer. A probe stored in the file settles both:
of a few footprints around the file probe's own size and both signs, the
guess that matches the file's probe best (the largest normalised
cross-correlation, so a shifted probe matches too) is the one the run starts
from.
"""

from __future__ import annotations

import itertools

import numpy as np

from hxn_liveptycho.recon.probe import initial_probe

__all__ = ["probe_footprint_px", "probe_guess_from_file"]

#: Share of the probe's power inside the footprint's circle.
_FOOTPRINT_POWER = 0.9
#: Footprints tried, as multiples of the file probe's own.
_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)


def probe_footprint_px(probe: np.ndarray) -> float:
    """Diameter (pixels) of the circle about the probe's centroid that holds 90 % of its power."""
    power = np.abs(probe.astype(np.complex128)) ** 2
    total = power.sum()
    rows, cols = np.indices(power.shape)
    cy, cx = (rows * power).sum() / total, (cols * power).sum() / total
    radius = np.hypot(rows - cy, cols - cx).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(power.ravel()[order])
    inside = radius[order][np.searchsorted(cumulative, _FOOTPRINT_POWER * total)]
    return float(max(2.0 * inside, 1.0))


def _match(guess: np.ndarray, probe: np.ndarray) -> float:
    """Largest normalised cross-correlation of two probes over all shifts (0..1)."""
    product = np.fft.fft2(guess) * np.conj(np.fft.fft2(probe))
    peak = float(np.max(np.abs(np.fft.ifft2(product))))
    return peak / float(np.linalg.norm(guess) * np.linalg.norm(probe) or 1.0)


def probe_guess_from_file(probe: np.ndarray, amplitudes: np.ndarray) -> tuple[float, int, float]:
    """(footprint_px, defocus_sign, match) of the guess from ``amplitudes`` nearest ``probe``.

    ``amplitudes`` are measured frames (k, n, n), the zero frequency at the
    centre; ``probe`` is (n, n) on the object's pixels.
    """
    base = probe_footprint_px(probe)
    best: tuple[float, int, float] = (base, 1, -1.0)
    for scale, sign in itertools.product(_SCALES, (1, -1)):
        footprint = base * scale
        guess = initial_probe(amplitudes, footprint_px=footprint, defocus_sign=sign)
        score = _match(guess, probe)
        if score > best[2]:
            best = (footprint, sign, score)
    return best
