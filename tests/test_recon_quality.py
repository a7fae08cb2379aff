"""Live quality maps and the convergence flag (recon.quality), on NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from hxn_liveptycho.recon.quality import (
    QualitySettings,
    constrained_mask,
    convergence,
    coverage,
    error_map,
    position_count,
    position_fit,
)

N = 16


def _probe(n: int = N) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return (np.exp(-(yy**2 + xx**2) / (2 * 3.0**2)) * np.exp(0.3j * xx)).astype(np.complex64)


def _object(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.6, 1.0, shape)
    phase = rng.uniform(-1.0, 1.0, shape)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def _grid(rows: int, cols: int, step: int) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols] * step
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)


def _amplitudes(obj: np.ndarray, probe: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Noiseless centred amplitudes, one position at a time (independent of the module)."""
    frames = []
    for y, x in positions.astype(int):
        wave = probe * obj[y : y + N, x : x + N]
        frames.append(np.abs(np.fft.fftshift(np.fft.fft2(wave))))
    return np.asarray(frames, dtype=np.float32)


def test_coverage_is_positions_times_probe_footprint() -> None:
    """The dose map and the position count equal the probe placed at each position, by hand."""
    probe = _probe()
    modes = np.stack([probe, 0.5 * np.roll(probe, 2, axis=1)])
    positions = np.array([[0, 0], [0, 5], [7, 3], [10, 12]], dtype=np.float64)
    shape = (30, 32)
    intensity = (np.abs(modes) ** 2).sum(axis=0)
    expected = np.zeros(shape)
    expected_count = np.zeros(shape, dtype=int)
    footprint = intensity > 0.2 * intensity.max()
    for y, x in positions.astype(int):
        expected[y : y + N, x : x + N] += intensity
        expected_count[y : y + N, x : x + N] += footprint
    dose = coverage(positions, modes, shape)
    counts = position_count(positions, modes, shape, 0.2)
    assert dose.dtype == np.float32 and dose.shape == shape
    assert counts.dtype == np.int32 and counts.shape == shape
    np.testing.assert_allclose(dose, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, expected_count)
    assert counts.max() == 2  # the first two positions overlap

    settings = QualitySettings(min_positions=2, illumination_fraction=0.0)
    mask = constrained_mask(counts, dose, settings)
    np.testing.assert_array_equal(mask, expected_count >= 2)


def test_position_errors_zero_for_the_truth_and_flag_a_corrupted_frame() -> None:
    """The true state explains noiseless data (error ~0); a corrupted frame is the worst."""
    probe = _probe()
    positions = _grid(5, 5, 4)
    obj = _object((4 * 4 + N, 4 * 4 + N))
    amps = _amplitudes(obj, probe, positions)
    errors = position_fit(obj, probe, positions, amps, batch_size=7).errors
    assert errors.shape == (len(positions),) and errors.dtype == np.float32
    assert float(errors.max()) < 1e-9

    bad = 12
    corrupted = amps.copy()
    corrupted[bad] = np.random.default_rng(1).permutation(corrupted[bad].ravel()).reshape(N, N)
    errors = position_fit(obj, probe, positions, corrupted).errors
    assert int(np.argmax(errors)) == bad
    assert errors[bad] > 0.1
    assert np.delete(errors, bad).max() < 1e-9

    # As the solver stores them: FFT order, with non-finite and negative values cleaned.
    stored = np.fft.ifftshift(corrupted, axes=(-2, -1))
    dirty = stored.copy()
    dirty[0, 0, 0] = np.nan
    dirty[1, 0, 1] = -1.0
    cleaned = stored.copy()
    cleaned[0, 0, 0] = 0.0
    cleaned[1, 0, 1] = 0.0
    np.testing.assert_allclose(
        position_fit(obj, probe, positions, dirty, fft_order=True).errors,
        position_fit(obj, probe, positions, cleaned, fft_order=True).errors,
    )


def test_position_errors_with_modes_valid_mask_and_subpixel_shifts() -> None:
    """Probe modes add incoherently; masked pixels do not count; sub-pixel positions are
    modelled by the shifted probe (data made with an independent Fourier shift)."""
    probe = _probe()
    modes = np.stack([probe, 0.4 * np.roll(probe, 3, axis=0)])
    positions = _grid(3, 3, 5) + np.array([0.25, 0.6])
    obj = _object((2 * 5 + N + 1, 2 * 5 + N + 1), seed=2)
    k = np.fft.fftfreq(N)
    frames = []
    for y, x in positions:
        fy, fx = y - np.floor(y), x - np.floor(x)
        ramp = np.exp(-2j * np.pi * (fy * k[:, None] + fx * k[None, :]))
        window = obj[int(y) : int(y) + N, int(x) : int(x) + N]
        power = sum(
            np.abs(np.fft.fft2(np.fft.ifft2(np.fft.fft2(m) * ramp) * window)) ** 2 for m in modes
        )
        frames.append(np.fft.fftshift(np.sqrt(power)))
    amps = np.asarray(frames, dtype=np.float32)
    assert float(position_fit(obj, modes, positions, amps).errors.max()) < 1e-9
    # The dominant mode alone misses the second mode's power.
    assert float(position_fit(obj, modes[:1], positions, amps).errors.min()) > 1e-4

    valid = np.ones((N, N), dtype=bool)
    valid[N // 2, :] = False  # a dead row through the centre
    spoiled = amps.copy()
    spoiled[:, N // 2, :] = 50.0
    masked = position_fit(obj, modes, positions, spoiled, valid=valid).errors
    assert float(masked.max()) < 1e-9


def test_error_map_peaks_at_the_corrupted_frame() -> None:
    """The map of the per-position errors is largest around the bad position."""
    probe = _probe()
    positions = _grid(6, 6, 4)
    shape = (5 * 4 + N, 5 * 4 + N)
    obj = _object(shape, seed=3)
    amps = _amplitudes(obj, probe, positions)
    bad = 14
    amps[bad] *= 2.0
    errors = position_fit(obj, probe, positions, amps).errors
    emap = error_map(positions, errors, probe, shape)
    assert emap.shape == shape and emap.dtype == np.float32
    peak = np.unravel_index(int(np.argmax(emap)), shape)
    centre = positions[bad] + (N - 1) / 2
    assert np.hypot(*(np.asarray(peak) - centre)) < 4.0
    # A weighted average of the errors: within their range, 0 where nothing lights.
    assert float(emap.max()) <= float(errors.max()) * (1 + 1e-5)
    far_corner = error_map(positions[:1], errors[:1], probe, (60, 60))[59, 59]
    assert float(far_corner) == 0.0


def test_convergence_flag_on_synthetic_histories() -> None:
    """Flat → converged; falling → still improving; too short → not yet known."""
    flat = [0.1] * 5 + [0.05] * 20
    falling = list(0.1 * 0.9 ** np.arange(30))
    result = convergence(flat, window=10, tolerance=1e-3)
    assert result.converged and result.rate == pytest.approx(0.0)
    result = convergence(falling, window=10, tolerance=1e-3)
    assert not result.converged and result.rate == pytest.approx(0.1)
    short = convergence(falling[:5], window=10, tolerance=1e-3)
    assert not short.converged and np.isnan(short.rate)
    assert short.as_dict()["rate"] is None
    rising = convergence(list(np.linspace(0.01, 0.02, 12)), window=10, tolerance=1e-3)
    assert rising.converged and rising.rate < 0
    assert convergence(falling, window=10, tolerance=0.2).converged
    with pytest.raises(ValueError):
        convergence(falling, window=0, tolerance=1e-3)


@pytest.mark.parametrize("subpixel", [False, True])
def test_snapshot_quality_of_a_running_solver(subpixel: bool) -> None:
    """The solver process's snapshot maps (worker_child.quality_snapshot) read the frames the
    solver holds and agree with the public functions on its state; off means no maps."""
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
    from hxn_liveptycho.recon.worker_child import quality_snapshot

    probe = _probe()
    positions = _grid(4, 4, 4) + (np.array([0.3, 0.7]) if subpixel else 0.0)
    shape = (3 * 4 + N + 2, 3 * 4 + N + 2)
    obj = _object(shape, seed=4)
    amps = _amplitudes(obj, probe, np.floor(positions))
    params = IterativeParams(probe_modes=2, subpixel_positions=subpixel, batch_size=5)
    solver = StreamingSolver(probe=probe, canvas_shape=shape, params=params, xp=np)
    solver.add(amps, positions)
    solver.iterate(3)
    settings = QualitySettings(convergence_window=2)
    snap = quality_snapshot(solver, params, settings)

    expected = position_fit(
        solver.object_modes,
        solver.probe_modes,
        solver.positions_px,
        amps,
        subpixel=subpixel,
    ).errors
    np.testing.assert_allclose(snap["position_errors"], expected, rtol=1e-5)
    assert snap["position_errors"].shape == (len(positions),)
    np.testing.assert_allclose(
        snap["coverage"], coverage(solver.positions_px, solver.probe_modes, shape), rtol=1e-6
    )
    assert snap["error_map"].shape == shape and snap["constrained"].dtype == np.uint8
    assert snap["convergence"]["window"] == 2

    off = quality_snapshot(solver, params, QualitySettings(maps=False))
    assert set(off) == {"convergence"}
    no_errors = quality_snapshot(solver, params, QualitySettings(error_map=False))
    assert "error_map" not in no_errors and "coverage" in no_errors


@pytest.mark.parametrize("whole_pixels", [True, False])
def test_position_errors_add_up_to_the_solvers_state_error(whole_pixels: bool) -> None:
    """Weighted by each frame's power, the per-position errors are the solver's own error of
    the state it holds (one forward model: windows, sub-pixel shifts, probe modes)."""
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

    if not hasattr(StreamingSolver, "state_error"):
        pytest.skip("this solver has no state_error to compare with")
    probe = _probe()
    positions = _grid(4, 4, 4) + (0.0 if whole_pixels else np.array([0.4, 0.2]))
    shape = (3 * 4 + N + 2, 3 * 4 + N + 2)
    amps = _amplitudes(_object(shape, seed=5), probe, np.floor(positions))
    params = IterativeParams(probe_modes=2)
    solver = StreamingSolver(probe=probe, canvas_shape=shape, params=params, xp=np)
    solver.add(amps, positions)
    solver.iterate(3)
    errors = position_fit(solver.object_modes, solver.probe_modes, solver.positions_px, amps).errors
    power = (amps.astype(np.float64) ** 2).sum(axis=(1, 2))
    assert float((errors * power).sum() / power.sum()) == pytest.approx(
        solver.state_error(), rel=1e-4
    )


def test_live_layout_makes_the_maps_the_solver_will_send_ahead() -> None:
    """live/ is made ahead with the quality maps its recorded settings turn on, and only those."""
    from hxn_liveptycho.store.container import live_layout

    canvas = {"shape": [40, 50], "window": 16}
    on = live_layout({"canvas": canvas, "live_quality": QualitySettings().model_dump()})
    assert on["coverage"] == ((40, 50), np.dtype(np.float32))
    assert on["position_count"] == ((40, 50), np.dtype(np.int32))
    assert on["constrained"] == ((40, 50), np.dtype(np.uint8))
    assert on["error_map"] == ((40, 50), np.dtype(np.float32))
    no_errors = QualitySettings(error_map=False).model_dump()
    assert "error_map" not in live_layout({"canvas": canvas, "live_quality": no_errors})
    off = live_layout({"canvas": canvas, "live_quality": QualitySettings(maps=False).model_dump()})
    assert set(off) == {"object_amplitude", "object_phase", "probe"}
    assert set(live_layout({"canvas": canvas})) == set(off)


@pytest.mark.parametrize(
    "settings",
    [
        {"subpixel_positions": True},
        {"probe_modes": 3},
        {"object_modes": 2},
        {"opr_modes": 2, "probe_update_start": 0},
    ],
    ids=["epie-subpixel", "probe-modes", "object-modes", "opr"],
)
def test_final_snapshot_state_error_comes_from_the_error_map_pass(
    settings: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error map's pass gives the solver's own state error (misfits over its data power,
    valid pixels, sub-pixel shifts, every mode, OPR's own probes), so the final snapshot
    makes one forward pass over the positions, not two, and carries the same figure."""
    from hxn_liveptycho.recon import forward
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
    from hxn_liveptycho.recon.opr import position_probes
    from hxn_liveptycho.recon.worker_child import _Child, _ChildRun

    probe = _probe()
    positions = _grid(4, 4, 4) + np.array([0.35, 0.6])
    shape = (3 * 4 + N + 2, 3 * 4 + N + 2)
    amps = _amplitudes(_object(shape, seed=6), probe, np.floor(positions))
    amps[3, 0, :] = np.nan  # cleaned as the solver cleans it
    valid = np.ones((N, N), dtype=bool)
    valid[N // 2, : N // 4] = False
    params = IterativeParams(batch_size=5, **settings)  # type: ignore[arg-type]
    solver = StreamingSolver(
        probe=probe, canvas_shape=shape, params=params, xp=np, valid_mask=valid
    )
    solver.add(amps, positions)
    solver.iterate(4)
    expected = solver.state_error()
    assert np.isfinite(expected) and expected > 1e-4

    fit = position_fit(
        solver.object_modes,
        solver.probe_modes,
        solver.positions_px,
        solver._amps[: solver.n_positions],
        valid=solver._valid,
        fft_order=True,
        subpixel=params.subpixel_positions or params.position_refinement,
        batch_size=params.batch_size,
        position_probes=position_probes(solver),
    )
    assert fit.state_error(solver._amp_power) == pytest.approx(expected, rel=1e-5)
    assert fit.state_error() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(fit.errors, fit.misfit / fit.power, rtol=1e-6)

    before = solver.snapshot(state_error=True)["state_error"]
    passes: list[int] = []
    solver_pass = forward.state_error_sum

    def counted(s: StreamingSolver) -> object:
        passes.append(1)
        return solver_pass(s)

    monkeypatch.setattr(forward, "state_error_sum", counted)
    run = _ChildRun(solver=solver, ring=None, params=params)  # type: ignore[arg-type]
    final = _Child._snapshot(run, final=True)
    assert not passes  # the error map's pass gave it
    assert final["state_error"] == pytest.approx(before, rel=1e-5)
    assert "error_map" in final and final["position_errors"].shape == (len(positions),)
    assert "state_error" not in _Child._snapshot(run)  # live snapshots: no figure

    off = _ChildRun(solver=solver, ring=None, params=params)  # type: ignore[arg-type]
    off.quality = QualitySettings(error_map=False)
    assert _Child._snapshot(off, final=True)["state_error"] == before  # the solver's pass
    assert len(passes) == 1
