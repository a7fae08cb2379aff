"""A starting probe estimated from the data alone: no scan grid, footprint or defocus sign.

The guess of :func:`~hxn_liveptycho.recon.probe.initial_probe` needs two
numbers the data do not hand over directly, the beam's footprint on the
sample and the side of the focus the sample sits on; on a scan without a
commanded grid (a spiral, an arbitrary path, positions from the encoders
only) both are guesses, and a wrong pair leaves ePIE far from the fit a
measured probe gives. Here the data choose them.

- **What the mean pattern says.** The mean diffraction intensity is the
  probe's far-field intensity (the zone plate's bright-field disc) blurred
  by what the object scatters: its square root is the probe's far-field
  modulus, its total the probe's power, and its support, the disc, gives the
  pupil's centre, outer radius ``R`` (the convergence semi-angle
  ``R p / z`` for detector pixel ``p`` at distance ``z``) and central stop
  (:func:`pupil_support`; the disc is split from the dark field by Otsu's
  threshold on the log intensity).
- **What it does not say.** The pupil's phase. A zone plate out of focus
  has a curvature ``-s π D |k - k0|² / (2 R n)`` over the disc, for a
  geometric footprint of ``D`` window pixels and sign ``s`` (+1: sample
  downstream of the focus); the same ``D`` and ``s`` as the guess.
- **The search.** Candidate pairs, both signs over footprints spread
  geometrically between the focal spot and most of the window
  (:func:`footprint_candidates`), each run for a few ePIE passes with the
  probe held fixed on a compact subset of frames; the data error of the
  state each reaches scores it (the wrong curvature cannot explain the
  overlap of neighbouring frames, whatever the object does). The best pair
  is refined once between its neighbours. To keep the search cheap the
  frames are cut to the smallest centred square that holds the disc (the
  curvature lives inside it), which coarsens the real-space pixel but not
  the footprint in window units.

Everything is over ``xp`` (NumPy or CuPy, inferred from the frames): the
search runs :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`, whose
CuPy path takes the fused kernels unless ``fused=False`` asks for the
reference expressions. :func:`estimate_probe` is the whole estimate, for a
live run's first frames or an offline file's.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from hxn_liveptycho.recon.backend import array_namespace, ifft2, to_host
from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.params import IterativeParams

__all__ = [
    "FarFieldGeometry",
    "ProbeEstimate",
    "PupilSupport",
    "Trial",
    "compact_subset",
    "curved_probe",
    "estimate_probe",
    "footprint_candidates",
    "pupil_support",
]

logger = logging.getLogger(__name__)

#: Frames the search runs on (a compact subset when more are given).
DEFAULT_FRAMES = 32
#: ePIE passes each candidate runs before it is scored.
DEFAULT_PASSES = 6
#: Footprint candidates per sign on the coarse grid.
DEFAULT_FOOTPRINTS = 5
#: One in this many of the search's inner frames is held out of the fit and scored.
HELD_OUT_EVERY = 4
#: Largest candidate footprint as a fraction of the window (a wider beam wraps around it).
MAX_FOOTPRINT_FRACTION = 0.7


@dataclass(frozen=True)
class FarFieldGeometry:
    """What turns detector and window pixels into angles and metres (optional: the estimate
    itself is in pixels)."""

    wavelength_m: float
    distance_m: float
    detector_pixel_m: float

    def object_pixel_m(self, n: int) -> float:
        """Real-space pixel of an ``n``-pixel crop, λ z / (n p)."""
        return self.wavelength_m * self.distance_m / (n * self.detector_pixel_m)


@dataclass(frozen=True)
class PupilSupport:
    """The bright-field disc of the mean pattern, in detector pixels of the crop.

    ``center`` (y, x) from the crop's origin (the zero frequency sits at ``n // 2``);
    ``radius_px`` the outer edge, ``stop_radius_px`` the central stop's (0 when the disc
    is full); ``contrast`` the ratio of the disc's median intensity to the dark field's.
    """

    center: tuple[float, float]
    radius_px: float
    stop_radius_px: float
    contrast: float

    def weights(self, n: int, xp: types.ModuleType = np) -> Any:
        """The disc (n, n) float64 on ``xp``: 1 inside the annulus, 0 outside, with a
        one-pixel linear edge."""
        r = _radii(n, n, self.center, xp)
        outer = xp.clip(self.radius_px + 0.5 - r, 0.0, 1.0)
        inner = xp.clip(r - self.stop_radius_px + 0.5, 0.0, 1.0) if self.stop_radius_px else 1.0
        return outer * inner

    def semi_angle_rad(self, geometry: FarFieldGeometry) -> float:
        """Convergence semi-angle of the optic: ``R p / z``."""
        return self.radius_px * geometry.detector_pixel_m / geometry.distance_m


@dataclass(frozen=True)
class Trial:
    """One candidate of the search: footprint (window pixels), sign and its data error."""

    footprint_px: float
    defocus_sign: int
    error: float


@dataclass(frozen=True)
class ProbeEstimate:
    """The estimated probe (xp complex64 (n, n), power of the mean frame) and how it was found."""

    probe: Any
    support: PupilSupport
    footprint_px: float
    defocus_sign: int
    trials: tuple[Trial, ...]
    frames_used: int
    search_size: int

    def defocus_m(self, geometry: FarFieldGeometry) -> float:
        """Signed distance from the focus to the sample (+: downstream), from the footprint
        and the convergence angle: ``s D dx / (2 θ)``."""
        n = int(self.probe.shape[-1])
        width_m = self.footprint_px * geometry.object_pixel_m(n)
        return self.defocus_sign * width_m / (2.0 * self.support.semi_angle_rad(geometry))

    def summary(self, geometry: FarFieldGeometry | None = None) -> str:
        """One line for a log: disc, footprint, sign (and angle and defocus with geometry)."""
        s = self.support
        text = (
            f"bright-field disc r={s.radius_px:.1f} px (stop {s.stop_radius_px:.1f} px), "
            f"footprint {self.footprint_px:.1f} px, defocus sign {self.defocus_sign:+d}"
        )
        if geometry is not None:
            text += (
                f", semi-angle {s.semi_angle_rad(geometry) * 1e3:.3g} mrad, "
                f"defocus {self.defocus_m(geometry) * 1e6:+.3g} µm"
            )
        return f"{text} ({len(self.trials)} trials on {self.frames_used} frames)"


def _radii(n_y: int, n_x: int, center: tuple[float, float], xp: types.ModuleType) -> Any:
    y = xp.arange(n_y, dtype=xp.float64)[:, None] - center[0]
    x = xp.arange(n_x, dtype=xp.float64)[None, :] - center[1]
    return xp.sqrt(y**2 + x**2)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that best splits ``values`` into two classes (Otsu 1979)."""
    hist, edges = np.histogram(values, bins=bins)
    mids = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids)
    between = np.zeros_like(mids)
    ok = (w0 > 0) & (w1 > 0)
    mu0 = m0[ok] / w0[ok]
    mu1 = (m0[-1] - m0[ok]) / w1[ok]
    between[ok] = w0[ok] * w1[ok] * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _crossing(fraction: np.ndarray, filled: int, beyond: int) -> float:
    """Radius where the ring fraction crosses 1/2 between ring ``filled`` and ``beyond``."""
    f_in = float(fraction[filled])
    f_out = float(fraction[beyond]) if 0 <= beyond < fraction.size else 0.0
    step = (f_in - 0.5) / max(f_in - f_out, 1e-12)
    return filled + 0.5 + step * (beyond - filled)


def pupil_support(mean_intensity: Any) -> PupilSupport:
    """The bright-field disc of a mean pattern (n, n), zero frequency at the centre.

    The disc is where the intensity passes half the disc's median level (found from
    Otsu's split of log intensity, then refined twice); its centre is the centroid of
    those pixels, its outer (inner) edge the largest (smallest) radius
    at which at least half of each ring of pixels belongs to it. A pattern with no
    contrast (a flat or empty mean) is refused: there is no disc to fit.
    """
    mean = np.asarray(to_host(mean_intensity), dtype=np.float64)
    n_y, n_x = mean.shape
    positive = mean[mean > 0]
    if positive.size < 4:
        raise ValueError("the mean diffraction pattern is empty: no bright-field disc to fit")
    floor = float(positive.min())
    # Otsu on log intensity finds the disc's neighbourhood; the dark field falls off
    # smoothly over decades around it, so the edge is then set at half the disc's level
    # (where a sharp edge blurred by the object's scattering sits).
    threshold = 10.0 ** _otsu(np.log10(np.maximum(mean, floor)).ravel())
    for _ in range(2):
        threshold = 0.5 * float(np.median(mean[mean > threshold]))
    disc = mean > threshold
    dark = ~disc
    if not disc.any() or not dark.any():
        raise ValueError("the mean diffraction pattern has no bright-field disc to fit")
    contrast = float(np.median(mean[disc]) / max(np.median(mean[dark]), floor))
    yy, xx = np.nonzero(disc)
    center = (float(yy.mean()), float(xx.mean()))
    r = _radii(n_y, n_x, center, np)
    ring = np.floor(r).astype(np.int64).ravel()
    counts = np.bincount(ring)
    inside = np.bincount(ring, weights=disc.ravel().astype(np.float64), minlength=counts.size)
    fraction = np.divide(inside, counts, out=np.zeros(counts.size), where=counts > 0)
    filled = np.nonzero(fraction >= 0.5)[0]
    if filled.size == 0:
        raise ValueError("the mean diffraction pattern has no bright-field disc to fit")
    # Ring k spans radii [k, k + 1): each edge is where the fraction, taken at the rings'
    # middles, crosses one half between the last (first) filled ring and its neighbour.
    radius = _crossing(fraction, int(filled[-1]), int(filled[-1]) + 1)
    stop = _crossing(fraction, int(filled[0]), int(filled[0]) - 1) if filled[0] > 0 else 0.0
    return PupilSupport(center=center, radius_px=radius, stop_radius_px=stop, contrast=contrast)


def curved_probe(
    modulus: Any, support: PupilSupport, footprint_px: float, defocus_sign: int
) -> Any:
    """The probe (n, n) complex64, centred in the window, whose far field is ``modulus``
    (zero frequency at the centre) times the defocus curvature of a ``footprint_px`` beam
    (window pixels) on side ``defocus_sign`` of the focus, centred on the disc."""
    xp = array_namespace(modulus)
    n_y, n_x = modulus.shape
    k2 = _radii(n_y, n_x, support.center, xp) ** 2
    phase = -defocus_sign * math.pi * footprint_px * k2 / (2.0 * support.radius_px * n_x)
    pupil = xp.asarray(modulus, dtype=xp.complex128) * xp.exp(1j * phase)
    field = ifft2(xp.fft.ifftshift(pupil), xp=xp)
    return xp.fft.fftshift(field).astype(xp.complex64)


def footprint_candidates(n: int, radius_px: float, count: int = DEFAULT_FOOTPRINTS) -> np.ndarray:
    """Footprints (window pixels) to try: geometric from about twice the focal spot
    (``n / R``; below it the sign hardly matters) to :data:`MAX_FOOTPRINT_FRACTION` of the
    window."""
    top = MAX_FOOTPRINT_FRACTION * n
    low = min(max(2.0 * n / max(radius_px, 1.0), 3.0), top / 2.0)
    return np.geomspace(low, top, max(count, 2))


def compact_subset(positions_px: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` positions nearest the median position (all when fewer): a
    patch where frames overlap, wherever the scan went."""
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    if len(pos) <= count:
        return np.arange(len(pos))
    centre = np.median(pos, axis=0)
    distance = np.hypot(*(pos - centre).T)
    return np.sort(np.argsort(distance, kind="stable")[:count])


def _search_size(n: int, support: PupilSupport) -> int:
    """The smallest even crop, a multiple of 8 and at most ``n``, that holds the disc with
    a margin (around the zero frequency, wherever the disc's centre is)."""
    off = max(abs(support.center[0] - n // 2), abs(support.center[1] - n // 2))
    half = support.radius_px + off + 2.0
    return int(min(n, 8 * math.ceil(2.0 * half / 8.0)))


def held_out(positions_px: np.ndarray, every: int = HELD_OUT_EVERY) -> np.ndarray:
    """Whether each position is held out of the fit and scored: every ``every``-th of the
    inner half of positions by distance from their median (interior frames, whose
    neighbours constrain the object they see)."""
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(np.hypot(*(pos - np.median(pos, axis=0)).T), kind="stable")
    inner = order[: max(len(pos) // 2, 1)]
    picks = inner[every // 2 :: every]
    out = np.zeros(len(pos), dtype=bool)
    out[picks if len(picks) else inner[:1]] = True
    return out


def _score(
    amplitudes: Any,
    positions_px: np.ndarray,
    scored: np.ndarray,
    probe: Any,
    *,
    passes: int,
    params: IterativeParams,
    fused: bool | None,
) -> float:
    """Data error of the ``scored`` frames, held out of ``passes`` ePIE passes of a fixed
    ``probe`` on the others: the prediction of frames the object was not fitted to. (The
    fit's own error rewards a probe that lights more object pixels per frame: more free
    pixels fit the same frames better.)"""
    xp = array_namespace(amplitudes)
    n = int(probe.shape[-1])
    pos = positions_px - positions_px.min(axis=0) + 1.0
    canvas = [math.ceil(float(e)) + n + 2 for e in pos.max(axis=0)]
    solver = StreamingSolver(
        probe=probe, canvas_shape=(canvas[0], canvas[1]), params=params, fused=fused
    )
    fit, test = xp.asarray(np.nonzero(~scored)[0]), xp.asarray(np.nonzero(scored)[0])
    solver.add(amplitudes[fit], pos[~scored])
    solver.iterate(passes)
    fit_power = float(xp.sum(_mean_intensity(amplitudes[fit], xp))) * len(fit)
    fit_error = solver.state_error() * fit_power
    # Adding frames changes neither object nor probe: the rise of the summed error is theirs.
    solver.add(amplitudes[test], pos[scored])
    all_power = float(xp.sum(_mean_intensity(amplitudes, xp))) * len(amplitudes)
    return (solver.state_error() * all_power - fit_error) / max(all_power - fit_power, 1e-30)


def _mean_intensity(amplitudes: Any, xp: types.ModuleType, chunk: int = 256) -> Any:
    """Mean of ``amplitudes²`` over the frames, in float64, a chunk of frames at a time."""
    total = xp.zeros(amplitudes.shape[1:], dtype=xp.float64)
    for start in range(0, len(amplitudes), chunk):
        part = amplitudes[start : start + chunk].astype(xp.float64)
        total += xp.sum(part * part, axis=0)
    return total / len(amplitudes)


def estimate_probe(
    amplitudes: Any,
    positions_px: Any,
    *,
    frames: int = DEFAULT_FRAMES,
    passes: int = DEFAULT_PASSES,
    footprints: int = DEFAULT_FOOTPRINTS,
    geometry: FarFieldGeometry | None = None,
    fused: bool | None = None,
) -> ProbeEstimate:
    """The starting probe of a scan from its frames and positions alone.

    ``amplitudes`` (N, n, n) = sqrt(I), zero frequency at the centre (NumPy or CuPy);
    ``positions_px`` (N, 2) (y, x) window corners in object pixels, any path (their
    origin does not matter). The modulus and power come from the mean of all frames,
    the curvature from the search on ``frames`` of them (:func:`compact_subset`),
    ``passes`` ePIE passes per candidate over ``footprints`` footprints and both signs,
    then two refining footprints. ``geometry`` only adds angles and metres to the log
    line. Refuses frames without a bright-field disc or without two positions.
    """
    xp = array_namespace(amplitudes)
    amps = xp.asarray(amplitudes, dtype=xp.float32)
    if amps.ndim != 3 or amps.shape[1] != amps.shape[2] or len(amps) == 0:
        raise ValueError(f"amplitudes must be (N, n, n) frames, got shape {tuple(amps.shape)}")
    pos = np.asarray(to_host(positions_px), dtype=np.float64).reshape(-1, 2)
    if len(pos) != len(amps):
        raise ValueError(f"{len(amps)} frames but {len(pos)} positions")
    n = int(amps.shape[-1])
    mean_intensity = _mean_intensity(amps, xp)
    support = pupil_support(mean_intensity)
    # The probe's far field is the disc: what the mean holds outside it (the dark field,
    # and the light scattered into the central stop) is the object's.
    modulus = xp.sqrt(mean_intensity) * support.weights(n, xp)

    chosen = compact_subset(pos, frames)
    m = _search_size(n, support)
    lo = n // 2 - m // 2
    crop = slice(lo, lo + m)
    sub_amps = amps[xp.asarray(chosen)][:, crop, crop]
    sub_pos = pos[chosen] * (m / n)
    scored = held_out(sub_pos)
    sub_support = PupilSupport(
        center=(support.center[0] - lo, support.center[1] - lo),
        radius_px=support.radius_px,
        stop_radius_px=support.stop_radius_px,
        contrast=support.contrast,
    )
    sub_modulus = modulus[crop, crop]
    params = IterativeParams(
        algorithm="epie",
        probe_update_start=passes // 3,
        batch_size=max(1, min(16, len(chosen) // 4)),
        momentum_gain=0.0,
    )

    trials: dict[tuple[float, int], float] = {}

    def trial(footprint: float, sign: int) -> float:
        key = (round(float(footprint), 6), sign)
        if key not in trials:
            # The same curvature per detector pixel at the crop: D scales as m / n.
            probe = curved_probe(sub_modulus, sub_support, footprint * m / n, sign)
            trials[key] = _score(
                sub_amps, sub_pos, scored, probe, passes=passes, params=params, fused=fused
            )
        return trials[key]

    grid = footprint_candidates(n, support.radius_px, footprints)
    if len(chosen) >= 4:
        for sign in (1, -1):
            for footprint in grid:
                trial(float(footprint), sign)
        (best_d, best_s), _ = min(trials.items(), key=lambda kv: kv[1])
        ratio = math.sqrt(float(grid[1] / grid[0]))
        for footprint in (best_d / ratio, best_d * ratio):
            trial(min(footprint, MAX_FOOTPRINT_FRACTION * n), best_s)
        (best_d, best_s), _ = min(trials.items(), key=lambda kv: kv[1])
    else:
        raise ValueError("the probe search needs at least four frames")

    probe = curved_probe(modulus, support, best_d, best_s)
    estimate = ProbeEstimate(
        probe=probe,
        support=support,
        footprint_px=float(best_d),
        defocus_sign=int(best_s),
        trials=tuple(Trial(d, s, e) for (d, s), e in sorted(trials.items())),
        frames_used=len(chosen),
        search_size=m,
    )
    logger.info("probe from the data: %s", estimate.summary(geometry))
    return estimate
