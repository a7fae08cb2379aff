"""Object modes (mixed-state object): a sample that moves during the exposure.

The data are the incoherent sum of two states of the same phantom, the second moved by
3 pixels (60 % and 40 % of the photons): what a vibrating sample records. The ground
truth of a mixed-state model is then the eigen-decomposition of the states' density
``0.6 |A><A| + 0.4 |B><B|``; its second mode holds 4 % of the power of the first.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from pydantic import ValidationError
from recon_helpers import SimulatedScan, use_cupy_stand_in

from hxn_liveptycho.recon import memory
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import object_error
from hxn_liveptycho.sim import phantom

ITERATIONS = 60


class VibratingScan:
    def __init__(self) -> None:
        scan = SimulatedScan()
        self.scan = scan
        moved = np.roll(scan.obj, 3, axis=1)
        first = phantom.simulate_diffraction(
            scan.obj, scan.probe, scan.positions, photons_per_frame=6e4, rng=11
        )
        second = phantom.simulate_diffraction(
            moved, scan.probe, scan.positions, photons_per_frame=4e4, rng=12
        )
        self.amplitudes = np.sqrt(first + second)
        states = np.stack([np.sqrt(0.6) * scan.obj, np.sqrt(0.4) * moved]).reshape(2, -1)
        power, vectors = np.linalg.eigh(states.conj() @ states.T)
        order = np.argsort(power)[::-1]
        self.power_ratio = power[order[1]] / power[order[0]]
        self.modes = (vectors[:, order].T @ states).reshape(2, *scan.obj.shape)

    def solve(
        self, object_modes: int, algorithm: str = "epie", iterations: int = ITERATIONS, **settings
    ) -> StreamingSolver:
        if algorithm == "dm-then-lsqml":  # HXN's usual schedule
            settings |= {"schedule": [("dm", 0.3), ("lsqml", 0.7)], "iterations": iterations}
        else:
            settings["algorithm"] = algorithm
        params = IterativeParams(object_modes=object_modes, **settings)
        solver = StreamingSolver(
            probe=self.scan.probe_guess, canvas_shape=self.scan.canvas, params=params
        )
        solver.add(self.amplitudes, self.scan.positions)
        solver.iterate(iterations)
        return solver

    def error(self, mode: int, estimate: np.ndarray) -> float:
        return object_error(self.modes[mode], estimate, self.scan.mask)


@pytest.fixture(scope="module")
def vibrating() -> VibratingScan:
    return VibratingScan()


@pytest.mark.parametrize(
    "algorithm",
    # The same claim for each; LSQ-ML's take 15 s each on two cores (at 30 iterations the
    # bounds are not met yet), so they run with ``-m slow``; LSQ-ML with object modes stays
    # in the default run through the sub-pixel and memory tests below.
    [
        "epie",
        pytest.param("lsqml", marks=pytest.mark.slow),
        pytest.param("dm-then-lsqml", marks=pytest.mark.slow),
    ],
)
def test_two_object_modes_recover_the_mixture_of_a_moving_sample(vibrating, algorithm):
    """Two object modes fit the data clearly better than one, and their first mode is
    the mixture's dominant mode twice as closely as one mode gets; the second is its
    second mode (a random field would be ~1 away)."""
    one, two = vibrating.solve(1, algorithm), vibrating.solve(2, algorithm)
    # Measured (ePIE / LSQ-ML / DM then LSQ-ML): data error 0.0107 / 0.0108 / 0.0107 with
    # one mode against 0.0087 / 0.0086 / 0.0087 with two; the mixture's first mode 0.065 /
    # 0.069 / 0.069 against 0.035 / 0.037 / 0.038; its second mode 0.41 / 0.34 / 0.57;
    # powers about 1 : 0.03 (truth 1 : 0.04).
    assert two.error < 0.85 * one.error, (two.error, one.error)
    first_one, first_two = vibrating.error(0, one.object), vibrating.error(0, two.object)
    assert first_two < 0.7 * first_one, (first_two, first_one)
    snap = two.snapshot()
    modes = snap["object_modes"]
    assert modes.shape == (2, *vibrating.scan.canvas)
    np.testing.assert_array_equal(snap["object"], modes[0])
    assert vibrating.error(1, modes[1]) < 0.65
    mask = vibrating.scan.mask
    power = [float(np.sum(np.abs(m[mask]) ** 2)) for m in modes]
    assert 0.3 * vibrating.power_ratio < power[1] / power[0] < 3 * vibrating.power_ratio
    assert "object_modes" not in one.snapshot()


@pytest.mark.parametrize(
    "settings",
    [{"algorithm": "epie"}, {"algorithm": "lsqml", "noise": "poisson"}],
)
def test_object_modes_with_probe_modes_and_sub_pixel_positions(vibrating, settings):
    """Two object and two probe modes on sub-pixel positions (and LSQ-ML's Poisson
    model): every pair is an exit wave; the run stays finite and fits better than one
    object mode with two probe modes."""
    scan = vibrating.scan
    errors = {}
    for m in (1, 2):
        params = IterativeParams(object_modes=m, probe_modes=2, **settings)
        s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
        s.add(vibrating.amplitudes, scan.subpixel_positions)
        s.iterate(20)
        assert all(np.isfinite(s.error_history))
        errors[m] = s.error
    assert errors[2] < errors[1], errors


def test_dm_alone_fits_better_but_recovers_the_modes_slowly(vibrating):
    """DM with two object modes lowers the data error (measured at 60 iterations 0.0124
    against 0.0139), but in 60 iterations (and 150) its first mode is no closer to the
    mixture's than one mode's (0.066 both): its relaxed projection leaves a weak second
    mode inside the noise ball. What the docs say: run DM as the first stage of a
    schedule. Checked at 30 iterations, with the same bounds (measured: data error
    ratio 0.92, first mode 0.069 against 0.070)."""
    one, two = vibrating.solve(1, "dm", 30), vibrating.solve(2, "dm", 30)
    assert all(np.isfinite(two.error_history))
    assert two.error < 0.95 * one.error, (two.error, one.error)
    assert vibrating.error(0, two.object) < vibrating.error(0, one.object) + 0.01
    assert two._dm_waves.shape[1] == 2  # one stored wave per probe-object pair


def test_dm_keeps_each_object_modes_waves_with_its_probe_modes(vibrating):
    """DM with two probe and two object modes: four stored waves a position, mixed block
    by block when the probe modes are orthogonalised; the run converges."""
    scan = vibrating.scan
    params = IterativeParams(algorithm="dm", object_modes=2, probe_modes=2)
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
    s.add(vibrating.amplitudes, scan.positions)
    s.iterate(20)
    h = s.error_history
    assert all(np.isfinite(h)) and h[-1] < 0.2 * h[0]
    assert s._dm_waves.shape[1] == 4


def test_object_modes_are_bounded():
    with pytest.raises(ValidationError):
        IterativeParams(object_modes=5)
    with pytest.raises(ValidationError):
        IterativeParams(object_modes=0)


@pytest.mark.parametrize("algorithm", ["epie", "lsqml", "dm"])
def test_memory_estimate_counts_the_object_modes(vibrating, algorithm):
    """The estimate of two object modes is within 20 % of the solver's traced peak, and
    grows by the second canvas (and its momentum history, or DM's stored waves) over one
    mode's."""
    scan = vibrating.scan
    params = IterativeParams(algorithm=algorithm, object_modes=2, probe_update_start=0)
    tracemalloc.start()
    try:
        s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
        s.add(vibrating.amplitudes, scan.positions)
        s.iterate(2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert abs(s.peak_bytes() - peak) <= 0.2 * peak, (s.peak_bytes(), peak)
    args = (len(scan.positions), 64, 1, algorithm, scan.canvas, params.batch_size)
    one = memory.estimate_terms(*args, backend="numpy", momentum=True)
    two = memory.estimate_terms(*args, backend="numpy", momentum=True, object_modes=2)
    canvas = 8 * scan.canvas[0] * scan.canvas[1]
    assert two["object"] - one["object"] == canvas
    if algorithm == "dm":  # no momentum; a stored wave per probe-object pair
        assert two["momentum"] == one["momentum"] == 0
        assert two["dm_exit_waves"] == 2 * one["dm_exit_waves"] > 0
    else:
        assert two["momentum"] - one["momentum"] == 2 * canvas


@pytest.mark.parametrize("algorithm", ["epie", "lsqml", "dm"])
def test_object_modes_run_on_cupys_branches(algorithm, monkeypatch):
    """On CuPy object modes take the reference path with CuPy's window kernels; run it on
    the CuPy stand-in of ``benchmarks/host_launches.py`` (kernels are no-ops, so only
    that every call exists on that branch is checked: no NumPy-only call, no shape
    error), 1 and 2 probe modes, whole-pixel and sub-pixel."""
    from hxn_liveptycho.recon import _exit_waves, _raw_kernels, _windows

    _, cp, launches = use_cupy_stand_in(monkeypatch)
    caches = (_windows._kernels, _exit_waves._kernels)
    caches += (_raw_kernels.raw_kernel, _raw_kernels._placeholder)
    for cache in caches:
        cache.cache_clear()
    scan = SimulatedScan()
    try:
        with np.errstate(all="ignore"):  # no-op kernels leave garbage in the arrays
            for probe_modes in (1, 2):
                for positions in (np.rint(scan.subpixel_positions), scan.subpixel_positions):
                    params = IterativeParams(
                        algorithm=algorithm,
                        object_modes=2,
                        probe_modes=probe_modes,
                        probe_update_start=0,
                        orthogonalize_every=1,
                    )
                    s = StreamingSolver(
                        probe=cp.asarray(scan.probe_guess),
                        canvas_shape=scan.canvas,
                        params=params,
                        xp=cp,
                    )
                    assert not s._fused
                    s.add(cp.asarray(scan.amplitudes), positions)
                    s.iterate(3)
                    assert s.object_modes.shape == (2, *scan.canvas)
    finally:
        for cache in caches:
            cache.cache_clear()
    assert {"liveptycho_gather_windows", "liveptycho_scatter_add_complex"} <= {
        name for name, *_ in launches
    }
