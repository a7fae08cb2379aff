"""The starting probe from the data alone (recon.probe_estimate) and its choice for a run
(pipeline.probe_start): a zone-plate probe defocused either way, scanned along a path
that is no grid, is found without its footprint or defocus sign."""

from __future__ import annotations

import functools
import logging
import math
import time

import h5py
import numpy as np
import pydantic
import pytest
from gpu_helpers import GPU_MARKS, cp, host, rel_diff

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.pipeline.probe_start import ProbeStart, read_probe_file, starting_probe
from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.params import IterativeParams
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.recon.probe_estimate import (
    FarFieldGeometry,
    compact_subset,
    estimate_probe,
    held_out,
    pupil_support,
)
from hxn_liveptycho.sim import optics, phantom

N = 64
#: The simulated zone plate: outer radius and central stop in detector pixels of the crop.
RADIUS_PX = 0.22 * N
STOP_PX = 0.4 * RADIUS_PX
#: Geometric footprint of the defocused beam, window pixels.
FOOTPRINT_PX = 18.0
#: ePIE iterations after which the starting probes are compared.
ITERATIONS = 30


class SpiralScan:
    """A Fermat spiral of 90 positions (no rows, no columns, no commanded step) across a
    phantom, 1e5 photons a frame with Poisson noise, lit by a zone-plate probe with
    aberrations whose focus is ``sign`` x the defocus of an 18-pixel footprint away."""

    def __init__(self, sign: int) -> None:
        lam = optics.wavelength_m(12.0)
        self.geometry = FarFieldGeometry(wavelength_m=lam, distance_m=0.5, detector_pixel_m=75e-6)
        dx = self.geometry.object_pixel_m(N)
        self.defocus_m = sign * FOOTPRINT_PX * N * dx**2 / (2 * lam * RADIUS_PX)
        self.probe = optics.make_probe(
            N, pixel_size_m=dx, wavelength_m=lam, defocus_m=self.defocus_m, rng=1
        )
        k = np.arange(90)
        radius, angle = 2.4 * np.sqrt(k), k * math.pi * (3 - math.sqrt(5))
        jitter = np.random.default_rng(2).normal(0.0, 0.3, (len(k), 2))
        path = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1) + jitter
        self.positions = path - path.min(axis=0) + 4
        top = self.positions.max(axis=0)
        self.canvas = (int(top[0]) + N + 6, int(top[1]) + N + 6)
        obj = phantom.make_object(self.canvas)
        frames = phantom.simulate_diffraction(
            obj, self.probe, self.positions, photons_per_frame=1e5, rng=3
        )
        self.amplitudes = np.sqrt(frames).astype(np.float32)

    def error_after(self, probe: np.ndarray, iterations: int = ITERATIONS) -> float:
        """Data error of ePIE started from ``probe`` after ``iterations``."""
        solver = StreamingSolver(probe=probe, canvas_shape=self.canvas, params=IterativeParams())
        solver.add(self.amplitudes, self.positions)
        solver.iterate(iterations)
        return solver.state_error()


@functools.cache
def spiral(sign: int) -> SpiralScan:
    return SpiralScan(sign)


def run_config(**probe: object) -> ScanConfig:
    """A run's configuration at the spiral's geometry (12 keV, 0.5 m, a 64-pixel crop)."""
    return ScanConfig.model_validate(
        {
            "uid": "probe-estimate",
            "grid": {
                "kind": "mesh",
                "x_start_um": 0.0,
                "x_end_um": 1.0,
                "x_num": 9,
                "y_start_um": 0.0,
                "y_end_um": 1.0,
                "y_num": 10,
            },
            "energy_kev": 12.0,
            "distance_m": 0.5,
            "roi": {"size": N},
            "probe": probe,
        }
    )


def test_mean_pattern_gives_the_zone_plates_disc():
    """The bright-field disc's outer radius comes back within 0.3 detector pixels and the
    central stop's within 0.5, centred on the zero frequency within 0.5: the convergence
    semi-angle R p / z follows."""
    scan = spiral(1)
    support = pupil_support(np.mean(scan.amplitudes.astype(np.float64) ** 2, axis=0))
    assert abs(support.radius_px - RADIUS_PX) < 0.3, support
    assert abs(support.stop_radius_px - STOP_PX) < 0.5, support
    assert np.hypot(support.center[0] - N // 2, support.center[1] - N // 2) < 0.5, support
    angle = support.semi_angle_rad(scan.geometry)
    assert angle == pytest.approx(RADIUS_PX * 75e-6 / 0.5, rel=0.03)


@pytest.mark.parametrize("sign", [1, -1])
def test_estimate_fits_like_the_true_probe_either_side_of_the_focus(sign):
    """Without footprint or sign, the estimate finds the side of the focus and the
    footprint within 25 %, and ePIE started from it reaches, after 30 iterations, a data
    error within 1.2x of the one it reaches from the true probe (measured: 1.01x),
    and under half the one from the guess with the right footprint but the wrong sign
    (measured: 6x worse)."""
    scan = spiral(sign)
    estimate = estimate_probe(scan.amplitudes, scan.positions, geometry=scan.geometry)
    assert estimate.defocus_sign == sign
    assert estimate.footprint_px == pytest.approx(FOOTPRINT_PX, rel=0.25)
    assert estimate.defocus_m(scan.geometry) == pytest.approx(scan.defocus_m, rel=0.25)
    assert estimate.probe.dtype == np.complex64 and estimate.probe.shape == (N, N)
    true_error = scan.error_after(scan.probe)
    estimated_error = scan.error_after(estimate.probe)
    wrong_sign = initial_probe(scan.amplitudes, footprint_px=FOOTPRINT_PX, defocus_sign=-sign)
    wrong_error = scan.error_after(wrong_sign)
    assert estimated_error < 1.2 * true_error, (estimated_error, true_error)
    assert estimated_error < 0.5 * wrong_error, (estimated_error, wrong_error)


def test_search_scores_frames_held_out_of_the_fit():
    """The search runs on a compact patch of the path, and scores interior frames the fit
    did not see: one in four of the patch's inner half, never none."""
    positions = spiral(1).positions
    chosen = compact_subset(positions, 40)
    assert len(chosen) == 40 and len(set(chosen.tolist())) == 40
    centre = np.median(positions, axis=0)
    spread = np.hypot(*(positions - centre).T)
    assert spread[chosen].max() <= np.sort(spread)[39] + 1e-9
    scored = held_out(positions[chosen])
    assert scored.sum() == 5
    assert spread[chosen][scored].max() <= np.median(spread[chosen])
    assert held_out(positions[:3]).sum() == 1


def test_a_flat_pattern_is_refused():
    """Frames with no bright-field disc are refused with a reason, not fitted."""
    with pytest.raises(ValueError, match=r"no bright-field disc|empty"):
        estimate_probe(np.zeros((8, N, N), np.float32), np.zeros((8, 2)))
    with pytest.raises(ValueError, match="frames but"):
        estimate_probe(spiral(1).amplitudes[:8], np.zeros((5, 2)))


def test_live_run_holds_its_first_frames_for_the_estimate():
    """A live run's frames wait until estimate_frames are in; the estimate then runs on a
    thread of its own while more frames join the wait, and all of them go to the solver
    with the estimated probe. A scan that ends sooner gets its probe from what came."""
    scan = spiral(-1)
    config = run_config(estimate_frames=40)
    start = ProbeStart()
    for lo in range(0, 40, 10):
        chunk = slice(lo, lo + 10)
        assert start.take(scan.amplitudes[chunk], scan.positions[chunk], config) is None
    assert start.held == 40  # the estimate is under way
    assert start.take(scan.amplitudes[40:45], scan.positions[40:45], config) is None
    deadline = time.monotonic() + 60
    while (taken := start.take(None, None, config)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert taken is not None
    probe, amplitudes, positions = taken
    assert start.held == 0
    np.testing.assert_array_equal(amplitudes, scan.amplitudes[:45])
    np.testing.assert_array_equal(positions, scan.positions[:45])
    assert scan.error_after(probe) < 1.2 * scan.error_after(scan.probe)

    short = ProbeStart()
    assert short.take(scan.amplitudes[:20], scan.positions[:20], config) is None
    probe, amplitudes, _ = short.take(None, None, config, final=True)
    assert probe.shape == (N, N) and len(amplitudes) == 20
    given = np.ones((N, N), np.complex64)
    taken = ProbeStart().take(scan.amplitudes[:3], scan.positions[:3], config, given)
    assert taken is not None and taken[0] is given


def test_a_paused_scan_starts_the_estimate_on_what_came(monkeypatch):
    """A scan held mid-way (no new frame for PAUSE_S) starts the estimate on the frames it
    has, at least PAUSE_MIN_FRAMES, rather than hold the solver until the scan goes on."""
    from hxn_liveptycho.pipeline import probe_start

    monkeypatch.setattr(probe_start, "PAUSE_S", 0.0)
    scan = spiral(1)
    config = run_config(estimate_frames=40)
    start = ProbeStart()
    assert start.take(scan.amplitudes[:4], scan.positions[:4], config) is None
    time.sleep(0.01)
    assert start.take(None, None, config) is None  # too few for an estimate yet
    assert start.take(scan.amplitudes[4:12], scan.positions[4:12], config) is None
    time.sleep(0.01)
    deadline = time.monotonic() + 60
    while (taken := start.take(None, None, config)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert taken is not None and len(taken[1]) == 12 and taken[0].shape == (N, N)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".cxi"])
def test_probe_file_is_read_from_the_formats_users_have(tmp_path, suffix):
    """A probe saved as .npy, .npz or CXI (at the illumination path ptychodus reads) comes
    back as the run's first probe, modes and all; a probe of another size is refused
    naming both sizes."""
    modes = (np.random.default_rng(0).normal(size=(2, N, N)) * (1 + 1j)).astype(np.complex64)
    path = tmp_path / f"probe{suffix}"
    if suffix == ".npy":
        np.save(path, modes)
    elif suffix == ".npz":
        np.savez(path, probe=modes, positions=np.zeros((3, 2)))
    else:
        with h5py.File(path, "w") as f:
            f["entry_1/instrument_1/source_1/illumination"] = modes
    scan = spiral(1)
    config = run_config(initial="file", file=str(path))
    np.testing.assert_array_equal(starting_probe(scan.amplitudes, scan.positions, config), modes)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        read_probe_file(path, 32)


def test_probe_file_setting_must_name_a_file(tmp_path, caplog):
    """``initial: file`` without a file (or a file with another choice) is refused when
    configured; a file that is gone when the run starts falls back to the estimate, logged."""
    with pytest.raises(pydantic.ValidationError, match="needs `file`"):
        run_config(initial="file")
    with pytest.raises(pydantic.ValidationError, match="set initial 'file'"):
        run_config(file="probe.npy")
    assert run_config().probe.initial == "estimate"
    scan = spiral(1)
    config = run_config(initial="file", file=str(tmp_path / "gone.npy"))
    with caplog.at_level(logging.ERROR, logger="hxn_liveptycho.pipeline.probe_start"):
        probe = starting_probe(scan.amplitudes, scan.positions, config)
    assert "does not exist" in caplog.text and "estimating" in caplog.text
    assert probe.shape == (N, N)


def test_guess_is_still_there_on_request():
    """``initial: guess`` is today's guess: footprint and sign from the settings."""
    scan = spiral(1)
    config = run_config(initial="guess", footprint_um=1.0, defocus_sign=-1)
    expected = initial_probe(
        scan.amplitudes, footprint_px=config.probe_footprint_px, defocus_sign=-1
    )
    np.testing.assert_array_equal(starting_probe(scan.amplitudes, scan.positions, config), expected)


@pytest.mark.gpu
@pytest.mark.skipif(cp is None, reason=GPU_MARKS[1].kwargs["reason"])
def test_estimate_on_cupy_matches_numpy():
    """On CuPy (fused kernels and the reference expressions alike) the search finds the
    same disc and sign as on NumPy and a footprint within one refining step (the scores
    differ by rounding), and the probe's far-field modulus agrees to float32 rounding."""
    scan = spiral(1)
    reference = estimate_probe(scan.amplitudes, scan.positions)
    for fused in (None, False):
        gpu = estimate_probe(cp.asarray(scan.amplitudes), scan.positions, fused=fused)
        assert gpu.support.radius_px == pytest.approx(reference.support.radius_px, abs=1e-6)
        assert gpu.support.center == pytest.approx(reference.support.center, abs=1e-6)
        assert gpu.defocus_sign == reference.defocus_sign
        assert gpu.footprint_px == pytest.approx(reference.footprint_px, rel=0.2)
        far = [np.abs(np.fft.fft2(host(p))) for p in (gpu.probe, reference.probe)]
        assert rel_diff(*far) < 1e-4
