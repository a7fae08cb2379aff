"""The streaming ePIE solver on simulated HXN data (NumPy path), and the array backend."""

from __future__ import annotations

import importlib.util

import numpy as np
import pydantic
import pytest
from recon_helpers import N, SimulatedScan

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import backend
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

ITERATIONS = 60


class Scan(SimulatedScan):
    """A 15 x 15 fly scan at sub-pixel positions, 1e5 photons/frame with Poisson noise."""


@pytest.fixture(scope="module")
def scan() -> Scan:
    return Scan()


@pytest.fixture(scope="module")
def batch_solver(scan: Scan) -> StreamingSolver:
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams())
    s.add(scan.amplitudes, scan.positions)
    s.iterate(ITERATIONS)
    return s


def _probe_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_epie_recovers_object_and_probe(scan, batch_solver):
    """From a wrongly defocused probe guess, ePIE gets object error <= 0.15 and finds the probe."""
    assert batch_solver.iteration == ITERATIONS
    assert len(batch_solver.error_history) == ITERATIONS
    assert batch_solver.error_history[-1] < 0.5 * batch_solver.error_history[0]
    assert scan.error(batch_solver) <= 0.15
    probe = batch_solver.snapshot()["probe"]
    assert _probe_correlation(probe, scan.probe) > 0.95
    assert _probe_correlation(scan.probe_guess, scan.probe) < 0.7  # the guess was not the answer


def test_streaming_matches_batch(scan, batch_solver):
    """Frames added in 4 chunks between iterations end within 0.03 of the batch object error."""
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams())
    chunks = np.array_split(np.arange(len(scan.positions)), 4)
    for idx in chunks:
        assert s.add(scan.amplitudes[idx], scan.positions[idx]) == idx[-1] + 1
        s.iterate(5)
    s.iterate(ITERATIONS)
    assert s.n_positions == len(scan.positions)
    streamed, batch = scan.error(s), scan.error(batch_solver)
    assert streamed <= 0.15
    assert abs(streamed - batch) < 0.03


def test_dtypes_snapshot_and_probe_power(scan, batch_solver):
    """complex64 object/probe on xp, host copies in snapshots, probe power set from the data."""
    assert batch_solver.object.dtype == np.complex64 and batch_solver.probe.dtype == np.complex64
    assert batch_solver.object.shape == scan.canvas
    snap = batch_solver.snapshot()
    assert isinstance(snap["object"], np.ndarray) and snap["object"].dtype == np.complex64
    assert snap["probe"].shape == (N, N) and snap["iteration"] == ITERATIONS
    assert snap["error"] == batch_solver.error_history[-1]
    snap["object"][:] = 0  # a copy: the solver is unaffected
    assert np.abs(batch_solver.object).max() > 0
    # float64 input is stored as float32; probe power follows the unnormalised-FFT convention.
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams())
    s.add(scan.amplitudes[:10].astype(np.float64), scan.positions[:10])
    target = np.mean(np.sum(scan.amplitudes[:10].astype(np.float64) ** 2, axis=(1, 2)))
    assert N * N * np.sum(np.abs(s.probe) ** 2) == pytest.approx(target, rel=1e-4)
    assert s.probe.dtype == np.complex64
    assert np.isfinite(s.iterate(1))


def test_inputs_are_not_mutated(scan):
    """Read-only inputs are accepted and left untouched."""
    amps = scan.amplitudes[:20].copy()
    pos = scan.positions[:20].copy()
    probe = scan.probe_guess.copy()
    init = np.full(scan.canvas, 0.9 + 0.1j, np.complex64)
    for a in (amps, pos, probe, init):
        a.flags.writeable = False
    before = [a.copy() for a in (amps, pos, probe, init)]
    s = StreamingSolver(
        probe=probe,
        canvas_shape=scan.canvas,
        params=IterativeParams(probe_update_start=0),
        object_init=init,
    )
    s.add(amps, pos)
    s.iterate(3)
    for a, b in zip((amps, pos, probe, init), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_out_of_canvas_positions_are_clipped_and_counted(scan):
    """Positions whose window leaves the canvas are clipped in, counted, and do not crash."""
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams())
    pos = scan.positions[:6].copy()
    pos[0] = [-20.0, 3.0]
    pos[1] = [3.0, scan.canvas[1] + 50.0]
    pos[2] = [scan.canvas[0] - N + 0.3, 5.0]  # fits after rounding: not clipped
    assert s.add(scan.amplitudes[:6], pos) == 6
    assert s.clipped_positions == 2
    used = s.positions_px
    assert used.min() >= 0
    assert np.all(used[:, 0] <= scan.canvas[0] - N) and np.all(used[:, 1] <= scan.canvas[1] - N)
    assert np.isfinite(s.iterate(2))


def test_detector_mask_is_honoured(scan):
    """A detector gap (masked rows) does not stop convergence."""
    valid = np.ones((N, N), bool)
    valid[N // 2 + 5 : N // 2 + 8, :] = False
    amps = scan.amplitudes * valid
    s = StreamingSolver(
        probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams(), valid_mask=valid
    )
    s.add(amps, scan.positions)
    s.iterate(ITERATIONS)
    assert scan.error(s) <= 0.15


def test_bad_calls_raise_clear_errors(scan):
    """Misuse gives a clear error instead of a wrong answer."""
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas)
    with pytest.raises(RuntimeError, match="before any frame"):
        s.iterate(1)
    with pytest.raises(ValueError, match="do not match"):
        s.add(scan.amplitudes[:3], scan.positions[:2])
    with pytest.raises(pydantic.ValidationError, match="epie"):
        IterativeParams(algorithm="pie")
    with pytest.raises(ValueError):
        StreamingSolver(probe=scan.probe_guess, canvas_shape=(N - 1, 200))
    with pytest.raises(ValueError):
        IterativeParams(batch_size=0)
    s.add(scan.amplitudes[:4], scan.positions[:4])
    assert np.isnan(s.iterate(0)) and s.iteration == 0  # no pass yet: no error to report
    with pytest.raises(ValueError, match="n >= 0"):
        s.iterate(-1)
    assert s.iterate(1) == s.iterate(0) == s.error  # zero passes: the latest error, unchanged
    assert s.iteration == 1


def test_backend_numpy_path():
    """numpy is chosen without a GPU; to_host passes NumPy through; 'cupy' explains its absence."""
    x = np.arange(4.0)
    assert backend.get_array_module("numpy") is np
    assert backend.array_namespace(x, 1.0) is np
    assert backend.to_host(x) is x
    if importlib.util.find_spec("cupy") is None:
        assert backend.get_array_module("auto") is np
        with pytest.raises(ConfigurationError, match="CuPy"):
            backend.get_array_module("cupy")
    with pytest.raises(ConfigurationError):
        backend.get_array_module("torch")  # type: ignore[arg-type]


def test_unscaled_inverse_fft_leaves_the_factor_to_the_caller():
    """ifft2_unscaled is ifft2 times n^2: the fused path folds 1/n^2 into its kernels."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 8, 8)) + 1j * rng.standard_normal((2, 3, 8, 8))).astype(
        np.complex64
    )
    f = backend.fft2(x, xp=np)
    np.testing.assert_allclose(backend.ifft2_unscaled(f, xp=np), 64 * x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        backend.ifft2_unscaled(f, xp=np) / 64, backend.ifft2(f, xp=np), rtol=1e-5, atol=1e-6
    )
