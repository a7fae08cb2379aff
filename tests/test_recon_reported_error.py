"""The error the solver reports is the error of the state it returns (issue 25): ``state_error()``
recomputed here from the returned object, probe modes and positions, independently of the
solver's code; the running ``error`` of a pass is a different, named figure."""

from __future__ import annotations

import numpy as np
import pytest
from recon_helpers import SimulatedScan

from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

ITERATIONS = 6


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return SimulatedScan()


def solved(scan: SimulatedScan, iterations: int = ITERATIONS, **params: object) -> StreamingSolver:
    solver = StreamingSolver(
        probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams(**params)
    )
    solver.add(scan.amplitudes, scan.positions)
    solver.iterate(iterations)
    return solver


def error_from_returned_state(solver: StreamingSolver, amplitudes: np.ndarray) -> float:
    """``sum (|Psi| - A)^2 / sum A^2`` in float64 from what the solver hands out: exit waves
    ``P_k(r - f) O_m(r + b)`` (``b`` the whole pixels of each position, ``f`` its fraction,
    the probe shifted by a Fourier phase ramp), every object and probe mode summed
    incoherently in the far field (unnormalised FFT), against the centred amplitudes."""
    objects = np.asarray(solver.object_modes, dtype=np.complex128)
    spectra = np.fft.fft2(np.asarray(solver.probe_modes, dtype=np.complex128))
    n = spectra.shape[-1]
    freq = np.fft.fftfreq(n)
    misfit = power = 0.0
    for (y, x), amplitude in zip(solver.positions_px, amplitudes, strict=True):
        top, left = int(np.floor(y)), int(np.floor(x))
        ramp = np.exp(-2j * np.pi * ((y - top) * freq[:, None] + (x - left) * freq[None, :]))
        probes = np.fft.ifft2(spectra * ramp)
        windows = objects[:, top : top + n, left : left + n]
        waves = windows[:, None] * probes[None]
        model = np.sqrt(np.sum(np.abs(np.fft.fft2(waves)) ** 2, axis=(0, 1)))
        measured = np.fft.ifftshift(amplitude)
        misfit += float(np.sum((model - measured) ** 2))
        power += float(np.sum(measured**2))
    return misfit / power


CASES = [
    pytest.param({"algorithm": "epie"}, id="epie"),
    pytest.param({"algorithm": "epie", "probe_modes": 3}, id="epie-3-modes"),
    pytest.param({"algorithm": "lsqml"}, id="lsqml"),
    pytest.param({"algorithm": "lsqml", "probe_modes": 3}, id="lsqml-3-modes"),
    pytest.param({"algorithm": "dm"}, id="dm"),
    pytest.param({"algorithm": "dm", "probe_modes": 3}, id="dm-3-modes"),
    pytest.param({"algorithm": "lsqml", "object_modes": 2}, id="lsqml-2-object-modes"),
]


@pytest.mark.parametrize("params", CASES)
def test_state_error_is_the_error_of_the_returned_state(
    scan: SimulatedScan, params: dict[str, object]
) -> None:
    """After some passes, ``state_error()`` is the returned state's error to float32 precision."""
    solver = solved(scan, **params)
    expected = error_from_returned_state(solver, scan.amplitudes)
    assert solver.state_error() == pytest.approx(expected, rel=1e-5)


def test_state_error_on_whole_pixel_positions() -> None:
    """Whole-pixel data runs the unshifted model; the state's error still matches."""
    scan = SimulatedScan(whole_pixels=True)
    solver = solved(scan, algorithm="epie", probe_modes=3)
    expected = error_from_returned_state(solver, scan.amplitudes)
    assert solver.state_error() == pytest.approx(expected, rel=1e-5)


def test_epie_running_error_is_not_the_state_error(scan: SimulatedScan) -> None:
    """ePIE's running error (taken before each batch's update and before the pass's
    momentum) differs measurably from the error of the state it returns, and the state's
    error is the one the returned arrays give."""
    solver = solved(scan, algorithm="epie")
    state = solver.state_error()
    assert state == pytest.approx(error_from_returned_state(solver, scan.amplitudes), rel=1e-5)
    assert abs(solver.error - state) > 0.03 * state


def test_state_error_changes_nothing(scan: SimulatedScan) -> None:
    """Evaluating the state's error between passes leaves the run bit-identical (no update,
    no random draw): the same object, probe, positions and error history as without it."""
    plain = solved(scan, 2, algorithm="lsqml")
    probed = solved(scan, 2, algorithm="lsqml")
    probed.state_error()
    plain.iterate(3)
    probed.iterate(3)
    np.testing.assert_array_equal(plain.object, probed.object)
    np.testing.assert_array_equal(plain.probe_modes, probed.probe_modes)
    np.testing.assert_array_equal(plain.positions_px, probed.positions_px)
    assert plain.error_history == probed.error_history


def test_snapshot_carries_both_errors_on_request(scan: SimulatedScan) -> None:
    """``snapshot()`` keeps its running ``error``; ``snapshot(state_error=True)`` adds the
    state's error, the one recomputed from the snapshot's own arrays."""
    solver = solved(scan, 3, algorithm="epie")
    assert "state_error" not in solver.snapshot()
    snap = solver.snapshot(state_error=True)
    assert snap["error"] == solver.error_history[-1]
    assert snap["state_error"] == solver.state_error()
    assert snap["state_error"] == pytest.approx(
        error_from_returned_state(solver, scan.amplitudes), rel=1e-5
    )


def test_state_error_before_any_frame_is_nan(scan: SimulatedScan) -> None:
    """No frames, no error: NaN, as the running error before the first pass."""
    solver = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas)
    assert np.isnan(solver.state_error())
    assert np.isnan(solver.snapshot(state_error=True)["state_error"])
