"""Resolution while the scan runs: Fourier ring correlation of two half-set reconstructions.

The positions are split into two interleaved halves, each reconstructed by its
own :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`; where the two
half-set objects still agree ring by ring in Fourier space is where the data
(not the noise, not the solver's guess) decide the image. The first spatial
frequency at which their correlation falls below the half-bit threshold (van
Heel & Schatz, J. Struct. Biol. 151 (2005) 250) is the resolution.

Before correlating, :func:`frc` takes out what ptychography cannot decide and
the two halves therefore decide differently: a sub-pixel translation, a linear
phase ramp and a global complex scale (the same registration as
:func:`~hxn_liveptycho.recon.metrics.object_error`), and it looks only at the
well-lit region, with a soft edge so the window does not add correlated
high frequencies of its own.

On simulated data the same :func:`frc` between the full reconstruction and the
phantom gives the true resolution (:func:`resolution_against_reference`), with
the same threshold, so an estimate and its truth differ only by what they
correlate.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from hxn_liveptycho.recon.backend import array_namespace, fft2, to_host
from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, register_object
from hxn_liveptycho.recon.params import IterativeParams

__all__ = [
    "FrcCurve",
    "HalfSets",
    "ResolutionEstimate",
    "frc",
    "half_bit_threshold",
    "resolution",
    "resolution_against_reference",
]

#: Width of the soft edge (cosine taper) laid inside the well-lit region, in pixels.
DEFAULT_TAPER_PX = 6


class FrcCurve(NamedTuple):
    """Fourier ring correlation per ring, from the first ring past zero frequency to Nyquist.

    ``n_pixels`` is the number of independent Fourier pixels of each ring: the
    ring's pixel count on the padded square grid scaled by the share of that
    square the apodised region fills (zero padding interpolates the spectrum;
    it adds pixels, not independent samples).
    """

    frequencies_per_m: np.ndarray
    values: np.ndarray
    n_pixels: np.ndarray


@dataclass(frozen=True)
class ResolutionEstimate:
    """Where the FRC first falls below the half-bit threshold.

    ``half_period_nm`` is the reported resolution: half the period of the
    finest spatial frequency still above the threshold, ``1 / (2 f)`` (the
    half-pitch convention, on the same scale as the pixel: the finest a
    pixel size ``d`` can show is ``d``). ``period_nm`` is the full period
    ``1 / f``, twice it. Both are None when the FRC stays above the threshold
    up to Nyquist: the resolution is then at or finer than the pixel
    (``nyquist_half_period_nm``) and cannot be measured on this grid. When
    the first ring is already below the threshold, the crossing is that
    ring: nothing finer than the region's size is resolved.
    """

    half_period_nm: float | None
    period_nm: float | None
    crossing_frequency_per_m: float | None
    nyquist_half_period_nm: float

    @property
    def resolved_to_nyquist(self) -> bool:
        """True when the correlation never crossed: resolution at or below one pixel."""
        return self.half_period_nm is None


def half_bit_threshold(n_pixels_per_ring: Any) -> np.ndarray:
    """Van Heel & Schatz (2005) half-bit threshold for rings of ``n_pixels_per_ring`` pixels.

    The correlation two half-sets reach by chance shrinks as ``1 / sqrt(n)``;
    the threshold asks for the signal to carry half a bit of information per
    pixel of the combined data on top of that.
    """
    root_n = np.sqrt(np.maximum(np.asarray(n_pixels_per_ring, dtype=np.float64), 1.0))
    return (0.2071 + 1.9102 / root_n) / (1.2071 + 0.9102 / root_n)


def _taper(mask: np.ndarray, taper_px: int) -> np.ndarray:
    """Weights in [0, 1]: 1 deep inside ``mask``, rising as sin^2 over ``taper_px`` from its edge.

    The distance is to the nearest pixel outside the mask, the image border
    counting as outside, so a full-image mask is tapered at the border too.
    """
    inside = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if taper_px <= 0:
        return mask.astype(np.float64)
    ramp = np.clip((inside - 0.5) / taper_px, 0.0, 1.0)
    return np.sin(0.5 * np.pi * ramp) ** 2


def _moved_onto(a: np.ndarray, b: np.ndarray, mask: np.ndarray, register: bool) -> np.ndarray:
    """``b`` moved onto ``a``: sub-pixel shift and phase ramp, then complex scale on ``mask``."""
    if register:
        b, _ = register_object(a, b, mask)
    bb = np.vdot(b[mask], b[mask]).real
    scale = np.vdot(b[mask], a[mask]) / bb if bb > 0 else 1.0
    return b * scale


def frc(
    a: Any,
    b: Any,
    pixel_size_m: float,
    mask: Any | None = None,
    *,
    register: bool = True,
    taper_px: int = DEFAULT_TAPER_PX,
    xp: types.ModuleType | None = None,
) -> FrcCurve:
    """Fourier ring correlation ``Re sum F_a conj(F_b) / sqrt(sum |F_a|^2 sum |F_b|^2)`` per ring.

    ``a``, ``b``: complex (or real) images of one shape, NumPy or CuPy.
    ``mask``: the region to compare (bool, the images' shape; None: all of
    it), e.g. :func:`~hxn_liveptycho.recon.metrics.illuminated_mask` of the
    positions: outside it the reconstruction is not constrained and would
    correlate (or not) for reasons that are not resolution. With
    ``register`` ``b`` is first aligned to ``a`` (translation, phase ramp,
    on the host: the registration is NumPy only) and scaled by the complex
    least-squares factor; then each image loses its weighted mean, is
    apodised by the tapered mask, cropped to the mask's bounding box and
    zero-padded to a square, so rings are circles. The ring sums run on
    ``xp`` (default: the inputs' module). The real part is taken because
    the global phase is already removed: noise then averages to zero instead
    of to a positive bias.
    """
    host_a = np.asarray(to_host(a), dtype=np.complex128)
    host_b = np.asarray(to_host(b), dtype=np.complex128)
    if host_a.shape != host_b.shape or host_a.ndim != 2:
        raise ValueError(f"images must be 2-D and of one shape, got {host_a.shape}, {host_b.shape}")
    if pixel_size_m <= 0:
        raise ValueError(f"pixel_size_m must be > 0, got {pixel_size_m}")
    m = np.ones(host_a.shape, bool) if mask is None else np.asarray(to_host(mask), bool)
    if m.shape != host_a.shape or not m.any():
        raise ValueError("mask must have the images' shape and select at least one pixel")
    xp = array_namespace(a, b) if xp is None else xp
    host_b = _moved_onto(host_a, host_b, m, register)
    weights = _taper(m, taper_px)
    rows, cols = np.nonzero(weights > 0)
    if rows.size == 0:
        raise ValueError(f"the mask is narrower than the {taper_px}-pixel taper")
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    wgt = weights[box]
    side = max(wgt.shape)
    total = wgt.sum()

    def apodised(image: np.ndarray) -> Any:
        crop = image[box]
        centred = (crop - (wgt * crop).sum() / total) * wgt
        square = np.zeros((side, side), np.complex128)
        square[: crop.shape[0], : crop.shape[1]] = centred
        return fft2(xp.asarray(square), xp=xp)

    spec_a, spec_b = apodised(host_a), apodised(host_b)
    k = xp.fft.fftfreq(side) * side
    ring = xp.rint(xp.sqrt(k[:, None] ** 2 + k[None, :] ** 2)).astype(xp.int64).ravel()
    n_rings = side // 2 + 1
    ring = xp.minimum(ring, n_rings)  # the corners past Nyquist share one overflow bin

    def ring_sum(values: Any) -> np.ndarray:
        return to_host(xp.bincount(ring, weights=values.ravel(), minlength=n_rings + 1))

    cross = ring_sum(xp.real(spec_a * xp.conj(spec_b)))
    power_a = ring_sum(xp.abs(spec_a) ** 2)
    power_b = ring_sum(xp.abs(spec_b) ** 2)
    counts = ring_sum(xp.ones(ring.shape, dtype=xp.float64))
    keep = slice(1, n_rings)  # past zero frequency, up to Nyquist
    denominator = np.sqrt(power_a[keep] * power_b[keep])
    values = np.divide(
        cross[keep], denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    fill = total**2 / (side * side * (wgt**2).sum())
    frequencies = np.arange(1, n_rings, dtype=np.float64) / (side * pixel_size_m)
    return FrcCurve(frequencies, values, counts[keep] * fill)


def resolution(curve: FrcCurve, pixel_size_m: float) -> ResolutionEstimate:
    """The first crossing of ``curve`` below the half-bit threshold, interpolated linearly.

    ``pixel_size_m`` sets the finest measurable half-period (Nyquist) that is
    reported with the estimate.
    """
    nyquist_nm = pixel_size_m * 1e9
    freqs, values = curve.frequencies_per_m, curve.values
    margin = values - half_bit_threshold(curve.n_pixels)
    below = np.flatnonzero(margin < 0)
    if below.size == 0:
        return ResolutionEstimate(None, None, None, nyquist_nm)
    i = int(below[0])
    if i == 0:
        f = float(freqs[0])
    else:
        t = margin[i - 1] / (margin[i - 1] - margin[i])
        f = float(freqs[i - 1] + t * (freqs[i] - freqs[i - 1]))
    return ResolutionEstimate(0.5e9 / f, 1e9 / f, f, nyquist_nm)


def resolution_against_reference(
    reference: Any, reconstruction: Any, pixel_size_m: float, mask: Any | None = None
) -> ResolutionEstimate:
    """The true resolution of ``reconstruction`` on simulated data: its FRC against the phantom.

    Same registration, region and half-bit threshold as the half-set
    estimate, so the two numbers differ only by what is correlated: one
    reconstruction against the truth, or two half-set reconstructions
    against each other.
    """
    return resolution(frc(reference, reconstruction, pixel_size_m, mask), pixel_size_m)


class _PointSet:
    """Points (y, x) on the host, grown one at a time, asked for the nearest distance."""

    def __init__(self) -> None:
        self._points = np.empty((64, 2), dtype=np.float64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, point: np.ndarray) -> None:
        if self._count == len(self._points):  # doubling: appends stay amortised O(1)
            self._points = np.concatenate([self._points, np.empty_like(self._points)])
        self._points[self._count] = point
        self._count += 1

    def nearest_squared(self, point: np.ndarray) -> float:
        """Squared distance to the nearest point held (inf when empty)."""
        if self._count == 0:
            return float("inf")
        return float(np.min(np.sum((self._points[: self._count] - point) ** 2, axis=1)))


class HalfSets:
    """Two solvers, each fed one of two interleaved halves of the positions, for a live FRC.

    Cost: each solver holds and sweeps half of the frames, so the two
    together cost about one more full reconstruction, in time per pass and
    in memory, on top of the main solver.

    Routing (:meth:`route`): each new position goes to the half whose
    nearest member is farther from it (ties to the smaller half). On a
    raster this is the checkerboard, whatever the row length, so each half
    is a lattice with the same spacing in every direction. Alternating frames
    is a checkerboard only when rows have an odd number of points: with an
    even number it gives each half every other column, twice the step
    across and the full step along, an uneven coverage that the two halves
    would each resolve differently. Nearest-neighbour routing needs no grid
    either, so it splits fly scans with jitter and spirals just as evenly.
    """

    def __init__(
        self,
        *,
        probe: Any,
        canvas_shape: tuple[int, int],
        params: IterativeParams | None = None,
        xp: types.ModuleType | None = None,
    ) -> None:
        self.solvers = (
            StreamingSolver(probe=probe, canvas_shape=canvas_shape, params=params, xp=xp),
            StreamingSolver(probe=probe, canvas_shape=canvas_shape, params=params, xp=xp),
        )
        self._canvas_shape = (int(canvas_shape[0]), int(canvas_shape[1]))
        # Positions as routed (host), per half: the nearest-neighbour rule reads them.
        self._members = (_PointSet(), _PointSet())

    def route(self, positions_px: Any) -> np.ndarray:
        """The half (0 or 1) of each of ``positions_px`` (k, 2), remembered for the next call."""
        pos = np.asarray(to_host(positions_px), dtype=np.float64).reshape(-1, 2)
        halves = np.empty(len(pos), dtype=np.int64)
        for j, p in enumerate(pos):
            first, second = (members.nearest_squared(p) for members in self._members)
            if first == second:  # both empty, or equidistant: the smaller half
                half = int(len(self._members[1]) < len(self._members[0]))
            else:
                half = int(second > first)
            self._members[half].append(p)
            halves[j] = half
        return halves

    def add(self, amplitudes: Any, positions_px: Any) -> tuple[int, int]:
        """Route each frame to its half and add it there; returns the halves' position counts.

        ``amplitudes`` and ``positions_px`` as for
        :meth:`~hxn_liveptycho.recon.iterative.StreamingSolver.add`.
        """
        pos = np.asarray(to_host(positions_px), dtype=np.float64).reshape(-1, 2)
        amps_xp = array_namespace(amplitudes)
        amps = amps_xp.asarray(amplitudes)
        if amps.ndim == 2:
            amps = amps[None]
        if amps.shape[0] != len(pos):
            raise ValueError(f"{amps.shape[0]} frames but {len(pos)} positions")
        halves = self.route(pos)
        for h, solver in enumerate(self.solvers):
            rows = np.flatnonzero(halves == h)
            if rows.size:
                solver.add(amps[amps_xp.asarray(rows)], pos[rows])
        return self.solvers[0].n_positions, self.solvers[1].n_positions

    def iterate(self, n: int = 1) -> tuple[float, float]:
        """``n`` passes of each half's solver; returns their running errors."""
        if any(s.n_positions == 0 for s in self.solvers):
            raise RuntimeError("both halves need frames before iterating")
        first, second = (s.iterate(n) for s in self.solvers)
        return first, second

    def region(self) -> np.ndarray:
        """Where both halves are well lit: the intersection of their illuminated masks."""
        a, b = (illuminated_mask(s.positions_px, s.probe, self._canvas_shape) for s in self.solvers)
        return a & b

    def estimate(self, pixel_size_m: float, mask: Any | None = None) -> ResolutionEstimate:
        """The half-set FRC resolution now, over ``mask`` (None: :meth:`region`)."""
        if any(s.n_positions == 0 for s in self.solvers):
            raise RuntimeError("both halves need frames before a resolution estimate")
        region = self.region() if mask is None else mask
        curve = frc(self.solvers[0].object, self.solvers[1].object, pixel_size_m, region)
        return resolution(curve, pixel_size_m)
