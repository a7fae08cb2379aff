"""Half-set Fourier ring correlation: the curve, the half-bit crossing, the split, and the
estimate against the true resolution on simulated scans."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask
from hxn_liveptycho.recon.resolution import (
    FrcCurve,
    HalfSets,
    frc,
    half_bit_threshold,
    resolution,
    resolution_against_reference,
)
from hxn_liveptycho.sim import optics, phantom

N = 64
PIXEL_M = 10e-9


def test_half_bit_threshold_is_one_for_a_single_pixel_and_falls_to_its_limit() -> None:
    t = half_bit_threshold(np.array([1, 10, 100, 1e4, 1e12]))
    assert t[0] == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(t) < 0)
    assert t[-1] == pytest.approx(0.2071 / 1.2071, abs=1e-4)


def test_frc_of_an_image_with_itself_is_one_and_never_crosses() -> None:
    rng = np.random.default_rng(0)
    image = phantom.make_object((96, 80)) * np.exp(1j * rng.normal(0, 0.1, (96, 80)))
    curve = frc(image, image, PIXEL_M)
    np.testing.assert_allclose(curve.values, 1.0, atol=1e-6)
    assert curve.frequencies_per_m[-1] == pytest.approx(0.5 / PIXEL_M, rel=0.02)
    estimate = resolution(curve, PIXEL_M)
    assert estimate.resolved_to_nyquist
    assert estimate.half_period_nm is None and estimate.period_nm is None
    assert estimate.nyquist_half_period_nm == pytest.approx(10.0)


def test_frc_of_independent_noise_stays_near_zero_and_crosses_at_the_first_ring() -> None:
    rng = np.random.default_rng(1)
    shape = (128, 128)
    a, b = (rng.normal(size=shape) + 1j * rng.normal(size=shape) for _ in range(2))
    curve = frc(a, b, PIXEL_M)
    # Chance correlation of n independent pixels has a spread of 1 / sqrt(n).
    assert np.all(np.abs(curve.values) < 5 / np.sqrt(curve.n_pixels))
    # Unregistered, chance averages to zero; registration picks the best-matching shift,
    # ramp and phase, so it may only lift the curve within the chance band above.
    unregistered = frc(a, b, PIXEL_M, register=False)
    assert abs(float(np.mean(unregistered.values))) < 0.02
    estimate = resolution(curve, PIXEL_M)
    assert estimate.crossing_frequency_per_m == pytest.approx(curve.frequencies_per_m[0])
    assert estimate.half_period_nm is not None
    assert estimate.period_nm == pytest.approx(2 * estimate.half_period_nm)


def test_the_crossing_is_interpolated_between_rings() -> None:
    freqs = np.arange(1, 51, dtype=np.float64) * 1e6
    n_pixels = np.full(50, 1e14)  # the threshold is its large-ring limit
    limit = 0.2071 / 1.2071
    values = 1.0 - freqs / 40e6  # crosses the limit at f = 40e6 (1 - limit)
    estimate = resolution(FrcCurve(freqs, values, n_pixels), PIXEL_M)
    expected = 40e6 * (1 - limit)
    assert estimate.crossing_frequency_per_m == pytest.approx(expected, rel=1e-6)
    assert estimate.half_period_nm == pytest.approx(0.5e9 / expected, rel=1e-6)


def test_registration_removes_shift_ramp_and_complex_scale() -> None:
    """A copy moved by a sub-pixel shift, a phase ramp and a complex scale correlates fully
    once registered, and visibly less without registration."""
    obj = phantom.make_object((128, 128))
    moved = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(obj), (0.4, -0.7)))
    yy, xx = np.indices(obj.shape)
    moved = 0.7 * moved * np.exp(1j * (0.03 * yy - 0.02 * xx + 0.9))
    mask = np.zeros(obj.shape, bool)
    mask[20:108, 16:112] = True  # away from the wrapped edge of the Fourier shift
    registered = frc(obj, moved, PIXEL_M, mask)
    raw = frc(obj, moved, PIXEL_M, mask, register=False)
    assert resolution(registered, PIXEL_M).resolved_to_nyquist
    assert np.min(registered.values) > 0.95
    assert np.mean(raw.values) < np.mean(registered.values) - 0.3


@pytest.mark.parametrize("nx", [5, 6])
def test_routing_is_the_checkerboard_of_a_raster_of_any_row_length(nx: int) -> None:
    positions = phantom.scan_positions(nx, 5, 5.0, jitter_px=0.3, rng=4) + 2
    halves = HalfSets(probe=np.ones((8, 8), np.complex64), canvas_shape=(48, 48))
    # Fed row by row, as frames arrive.
    routed = np.concatenate([halves.route(positions[i : i + nx]) for i in range(0, 5 * nx, nx)])
    iy, ix = np.divmod(np.arange(5 * nx), nx)
    parity = (iy + ix) % 2
    assert np.array_equal(routed, parity) or np.array_equal(routed, 1 - parity)


def test_routing_splits_a_spiral_evenly() -> None:
    k = np.arange(400)
    radius, angle = 2.0 * np.sqrt(k), k * np.pi * (3 - np.sqrt(5))
    positions = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1) + 50
    halves = HalfSets(probe=np.ones((8, 8), np.complex64), canvas_shape=(128, 128))
    routed = halves.route(positions)
    assert abs(int(routed.sum()) - 200) <= 20
    # Each half's nearest neighbours within its own half are farther than in the full set.
    for h in (0, 1):
        own = positions[routed == h]
        d = np.sqrt(((own[:, None] - own[None]) ** 2).sum(-1)) + np.eye(len(own)) * 1e9
        assert np.median(d.min(axis=1)) > 2.0


class NoisyScan:
    """A 15 x 15 jittered raster of 64² frames, step 5 px, at ``photons`` per frame."""

    def __init__(self, photons: float) -> None:
        lam = optics.wavelength_m(12.0)
        self.pixel_m = optics.sample_pixel_size_m(lam, 0.5, N, 75e-6)
        self.probe = optics.make_probe(N, pixel_size_m=self.pixel_m, wavelength_m=lam, rng=1)
        self.positions = phantom.scan_positions(15, 15, 5.0, jitter_px=0.5, rng=2) + 4
        top = self.positions.max(axis=0)
        self.canvas = (int(top[0]) + N + 6, int(top[1]) + N + 6)
        self.obj = phantom.make_object(self.canvas)
        frames = phantom.simulate_diffraction(
            self.obj, self.probe, self.positions, photons_per_frame=photons, rng=3
        )
        self.amplitudes = np.sqrt(frames)
        self.mask = illuminated_mask(self.positions, self.probe, self.canvas)


def _estimate_and_truth(photons: float) -> tuple[float, float]:
    """Half-set estimate and true resolution (half-periods, nm) after frames arrive in three
    parts with passes between them, then 20 passes in all."""
    scan = NoisyScan(photons)
    full = StreamingSolver(probe=scan.probe, canvas_shape=scan.canvas)
    halves = HalfSets(probe=scan.probe, canvas_shape=scan.canvas)
    for part in np.array_split(np.arange(len(scan.positions)), 3):
        full.add(scan.amplitudes[part], scan.positions[part])
        halves.add(scan.amplitudes[part], scan.positions[part])
        full.iterate(2)
        halves.iterate(2)
    full.iterate(14)
    halves.iterate(14)
    estimate = halves.estimate(scan.pixel_m)
    truth = resolution_against_reference(scan.obj, full.object, scan.pixel_m, scan.mask)
    assert estimate.half_period_nm is not None and truth.half_period_nm is not None
    assert estimate.half_period_nm > estimate.nyquist_half_period_nm
    return estimate.half_period_nm, truth.half_period_nm


def test_the_half_set_estimate_tracks_the_true_resolution_at_two_noise_levels() -> None:
    """Within 0.5-2x of the phantom's FRC at both levels, and coarser for fewer photons."""
    noisy_estimate, noisy_truth = _estimate_and_truth(3e2)
    clean_estimate, clean_truth = _estimate_and_truth(3e3)
    assert 0.5 <= noisy_estimate / noisy_truth <= 2.0
    assert 0.5 <= clean_estimate / clean_truth <= 2.0
    assert noisy_estimate > clean_estimate
    assert noisy_truth > clean_truth
