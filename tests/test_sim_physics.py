"""Physics of the simulated beamline: optics constants, probe, phantom, scan and diffraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hxn_liveptycho.sim import optics, phantom

N = 128
LAM = optics.wavelength_m(12.0)
DX = optics.sample_pixel_size_m(LAM, 0.5, N, 75e-6)


def test_wavelength_and_dcm_energy():
    """lambda = hc/E and the Si(111) Bragg law round-trip at HXN energies."""
    assert optics.wavelength_m(12.3984) == pytest.approx(1e-10, rel=1e-6)
    theta = math.degrees(math.asin(12.39842 / (2 * 3.1355893 * 12.0)))
    assert optics.energy_from_dcm_theta(theta) == pytest.approx(12.0, rel=1e-9)
    assert optics.sample_pixel_size_m(1e-10, 0.5, 100, 75e-6) == pytest.approx(1e-10 * 0.5 / 7.5e-3)
    with pytest.raises(ValueError):
        optics.wavelength_m(0.0)


def _radial_profile(img: np.ndarray) -> np.ndarray:
    yy, xx = np.indices(img.shape)
    w = img / img.sum()
    cy, cx = (w * yy).sum(), (w * xx).sum()
    r = np.rint(np.hypot(yy - cy, xx - cx)).astype(int)
    return np.bincount(r.ravel(), img.ravel()) / np.bincount(r.ravel())


def test_probe_is_structured_normalised_and_sized():
    """The probe is a defocused annular-pupil beam: unit power, a ring structure, ~n/4..n/3 wide."""
    p = optics.make_probe(N, pixel_size_m=DX, wavelength_m=LAM)
    assert p.dtype == np.complex64 and p.shape == (N, N)
    assert float(np.sum(np.abs(p) ** 2)) == pytest.approx(1.0, rel=1e-4)
    prof = _radial_profile(np.abs(p) ** 2)[: N // 3]
    # Not a Gaussian blob: a bright ring (the defocused annulus, with the on-axis Arago spot
    # inside it) shows up as a strong secondary maximum of the radial profile away from the axis.
    interior_max = 1 + np.flatnonzero((prof[1:-1] > prof[:-2]) & (prof[1:-1] > prof[2:]))
    rings = interior_max[interior_max >= 5]
    assert rings.size >= 1
    assert prof[rings].max() > 0.2 * prof.max()
    # Footprint: diameter holding 90 % of the power.
    full = _radial_profile(np.abs(p) ** 2)
    cum = np.cumsum(full * 2 * np.pi * np.arange(full.size))
    r90 = int(np.searchsorted(cum / cum[-1], 0.9))
    assert N / 5 <= 2 * r90 <= N / 2
    # Phase structure too (defocus curvature), not a flat real blob.
    lit = np.abs(p) ** 2 > 0.2 * (np.abs(p) ** 2).max()
    assert np.std(np.angle(p[lit])) > 0.3


def test_probe_aberrations_are_seeded():
    """rng adds reproducible aberrations: same seed same probe, different seed different probe."""
    a = optics.make_probe(64, pixel_size_m=DX, wavelength_m=LAM, rng=1)
    b = optics.make_probe(64, pixel_size_m=DX, wavelength_m=LAM, rng=1)
    c = optics.make_probe(64, pixel_size_m=DX, wavelength_m=LAM, rng=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.vdot(a, c)) < 0.999


def test_object_ranges_and_structure():
    """Amplitude spans [min_amplitude, 1], phase spans ±max_phase, both are images, not noise."""
    obj = phantom.make_object((150, 200), max_phase=0.8, min_amplitude=0.5)
    assert obj.dtype == np.complex64 and obj.shape == (150, 200)
    amp, ph = np.abs(obj), np.angle(obj)
    assert amp.min() == pytest.approx(0.5, abs=1e-3) and amp.max() == pytest.approx(1.0, abs=1e-3)
    assert ph.min() == pytest.approx(-0.8, abs=1e-3) and ph.max() == pytest.approx(0.8, abs=1e-3)
    # Natural images: neighbouring pixels are strongly correlated (noise would give ~0) ...
    assert np.corrcoef(amp[:, :-1].ravel(), amp[:, 1:].ravel())[0, 1] > 0.8
    assert np.corrcoef(ph[:, :-1].ravel(), ph[:, 1:].ravel())[0, 1] > 0.8
    # ... and amplitude and phase come from different images.
    assert abs(np.corrcoef(amp.ravel(), ph.ravel())[0, 1]) < 0.5


def test_scan_positions_are_a_jittered_raster():
    """Row-major raster, x fastest, with realistic jitter around the nominal grid."""
    pos = phantom.scan_positions(12, 8, 10.0, jitter_px=0.5, rng=0)
    assert pos.shape == (96, 2) and pos.dtype == np.float64
    assert pos.min() == pytest.approx(0.0)
    grid = pos.reshape(8, 12, 2)
    assert np.all(np.diff(grid[..., 1], axis=1) > 5)  # x increases along each row
    assert np.all(np.diff(grid[..., 0].mean(axis=1)) > 5)  # rows step in y
    iy, ix = np.meshgrid(np.arange(8), np.arange(12), indexing="ij")
    nominal = np.stack([iy.ravel(), ix.ravel()], axis=1) * 10.0
    resid = pos - nominal
    resid -= resid.mean(axis=0)
    assert 0.3 < resid.std() < 1.0
    again = phantom.scan_positions(12, 8, 10.0, jitter_px=0.5, rng=0)
    np.testing.assert_array_equal(pos, again)


def test_diffraction_totals_and_centred_zero_frequency():
    """Frames are Poisson counts with the mean total = photons_per_frame, DC at the centre."""
    n = 64
    probe = optics.make_probe(n, pixel_size_m=DX, wavelength_m=LAM)
    obj = np.ones((100, 100), np.complex64)
    pos = phantom.scan_positions(4, 4, 8.0, rng=1) + 2
    frames = phantom.simulate_diffraction(obj, probe, pos, photons_per_frame=1e5, rng=2)
    assert frames.dtype == np.float32 and frames.shape == (16, n, n)
    assert np.all(frames >= 0) and np.all(frames == np.rint(frames))
    totals = frames.sum(axis=(1, 2))
    assert totals.mean() == pytest.approx(1e5, rel=0.01)
    # A flat object shows the annular pupil: bright field centred on (n/2, n/2).
    mean = frames.mean(axis=0)
    yy, xx = np.indices(mean.shape)
    assert (mean * yy).sum() / mean.sum() == pytest.approx(n / 2, abs=0.5)
    assert (mean * xx).sum() / mean.sum() == pytest.approx(n / 2, abs=0.5)
    r = np.hypot(yy - n / 2, xx - n / 2)
    r_out = 0.22 * n
    assert mean[r < 0.3 * r_out].mean() < 0.1 * mean[(r > 0.5 * r_out) & (r < 0.9 * r_out)].mean()
    assert mean[r > 1.3 * r_out].sum() < 0.01 * mean.sum()


def test_diffraction_matches_forward_model_and_subpixel():
    """Integer positions reproduce |far_field(P * O)|^2; a sub-pixel shift changes the frame."""
    n = 32
    probe = optics.make_probe(n, pixel_size_m=DX, wavelength_m=LAM)
    obj = phantom.make_object((60, 60))
    pos = np.array([[5.0, 7.0], [5.5, 7.0]])
    frames = phantom.simulate_diffraction(obj, probe, pos, photons_per_frame=1e13, rng=0)
    ref = optics.intensity(probe * obj[5 : 5 + n, 7 : 7 + n])
    ref *= frames[0].sum() / ref.sum()
    np.testing.assert_allclose(frames[0], ref, rtol=1e-3, atol=1e-3 * ref.max())
    assert np.abs(frames[1] - frames[0]).sum() > 1e-3 * frames[0].sum()
    with pytest.raises(ValueError, match="outside"):
        phantom.simulate_diffraction(obj, probe, [[50.0, 0.0]], photons_per_frame=1e3, rng=0)
