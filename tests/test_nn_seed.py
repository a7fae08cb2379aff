"""The NN mosaic as the iterative solver's start: the rule itself, and that it lowers the
early error on a simulated scan (benchmarks/nn_seed.py has the figures)."""

from __future__ import annotations

import numpy as np
import pytest

from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.core import BranchCore
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.recon.object_seed import (
    illumination,
    maturity,
    reliability,
    reseed_young_region,
    seed_object,
)
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

SHAPE = (48, 40)


def _smooth_object(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]] / 10.0
    amplitude = 0.7 + 0.2 * np.sin(yy + rng.uniform(0, 3)) * np.cos(xx)
    phase = 0.8 * np.sin(0.7 * xx + rng.uniform(0, 3)) + 0.3 * yy / 4
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def _coverage() -> np.ndarray:
    """A lit block in the middle: full inside, a ramp on its rim, nothing outside."""
    coverage = np.zeros(SHAPE, np.float32)
    coverage[10:38, 8:32] = 0.5
    coverage[12:36, 10:30] = 4.0
    return coverage


def test_the_seed_is_flat_outside_the_mosaic_and_the_scaled_mosaic_inside():
    truth = _smooth_object()
    factor = np.complex64(2.5 * np.exp(1.1j))  # the network's arbitrary scale and offset
    coverage = _coverage()
    seeded = seed_object(truth * factor, coverage, SHAPE, flat=0.9)
    assert seeded.shape == SHAPE and seeded.dtype == np.complex64
    assert np.all(seeded[coverage == 0] == np.complex64(0.9))
    full = coverage >= 1.0
    # Inside: the mosaic up to one complex factor, which undoes the network's ...
    ratio = seeded[full] / truth[full]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    # ... with the flat guess's mean power and mean phase over the weighted footprint.
    weight = reliability(coverage, 1.0)
    power = float(np.sum(weight * np.abs(seeded) ** 2) / weight.sum())
    assert power == pytest.approx(0.81, rel=0.05)  # the rim mixes in the flat value
    assert abs(np.angle(np.sum(weight * seeded))) < 0.05
    # On the rim (coverage 0.5): halfway between flat and the scaled mosaic.
    rim = (coverage > 0) & (coverage < 1)
    expected = 0.9 + 0.5 * (ratio[0] * truth[rim] - 0.9)
    np.testing.assert_allclose(seeded[rim], expected, rtol=1e-4, atol=1e-5)


def test_a_later_seed_fills_only_where_the_solver_has_not_looked_at_its_scale():
    truth = _smooth_object(1)
    current = np.full(SHAPE, 0.3 + 0.1j, np.complex64)
    current[:, :20] = truth[:, :20] * np.complex64(0.5j)  # the solver's own scale and offset
    solver_light = np.zeros(SHAPE, np.float32)
    solver_light[:, :20] = 2.0
    mosaic = truth * np.complex64(3.0 * np.exp(-0.4j))
    seeded = seed_object(mosaic, _coverage(), SHAPE, current=current, solver_light=solver_light)
    # What the solver already lit is left alone, and the input is not modified.
    np.testing.assert_array_equal(seeded[:, :20], current[:, :20])
    assert current[0, 30] == np.complex64(0.3 + 0.1j)
    # The new region holds the mosaic brought to the solver's scale (0.5j x truth).
    full = (_coverage() >= 1.0) & (solver_light == 0)
    np.testing.assert_allclose(seeded[full], truth[full] * 0.5j, rtol=1e-4, atol=1e-5)
    # Outside the mosaic, the solver's object stays.
    np.testing.assert_array_equal(seeded[_coverage() == 0], current[_coverage() == 0])


def test_an_empty_mosaic_seeds_nothing_and_shapes_are_checked():
    coverage = np.zeros(SHAPE, np.float32)
    seeded = seed_object(np.zeros(SHAPE, np.complex64), coverage, SHAPE)
    assert seeded.dtype == np.complex64 and np.all(seeded == 1)
    with pytest.raises(ValueError, match="must be the canvas"):
        seed_object(np.zeros((4, 4), np.complex64), coverage, SHAPE)
    with pytest.raises(ValueError, match="> 0"):
        reliability(coverage, 0.0)


def test_illumination_counts_probe_centres():
    probe = np.zeros((8, 8), np.complex64)
    probe[3:5, 3:5] = 2.0
    light = illumination(np.array([[0.2, 0.0], [0.0, 10.0], [50.0, 50.0]]), probe, (16, 24))
    assert light.shape == (16, 24) and light.max() == pytest.approx(1.0)
    assert light[3:5, 3:5].min() == pytest.approx(1.0)  # the first window, rounded
    assert light[3:5, 13:15].min() == pytest.approx(1.0)  # the second
    assert light[11:13, 19:21].min() == pytest.approx(1.0)  # the third, clipped in
    assert light.sum() == pytest.approx(12.0)


def test_young_positions_light_the_canvas_in_proportion_to_their_passes():
    probe = np.ones((4, 4), np.complex64)
    shares = maturity([0, 1, 2, 9], mature_passes=2)
    np.testing.assert_allclose(shares, [0.0, 0.5, 1.0, 1.0])
    corners = np.array([[0.0, 0.0], [0.0, 8.0], [8.0, 0.0], [8.0, 8.0]])
    light = illumination(corners, probe, (12, 12), weights=shares)
    assert light[0:4, 0:4].max() == 0 and light[0:4, 8:12].min() == pytest.approx(0.5)
    assert light[8:12, 8:12].min() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one value per position"):
        illumination(corners, probe, (12, 12), weights=shares[:2])
    with pytest.raises(ValueError, match=">= 1"):
        maturity([1], mature_passes=0)


CHUNK = 20  # frames per arrival in the streamed test: two rows of the 10 x 10 scan


@pytest.fixture(scope="module")
def scan() -> dict:
    """An unseen 128² scan (10 x 10 points, 5e5 photons, seed 5), the solver's probe guess,
    and the shipped model's mosaic (ONNX Runtime CPU) after each chunk of ``CHUNK`` frames
    (the last: all frames)."""
    sample = SimulatedSample(SimulatedBeamline(x_num=10, y_num=10, seed=5, photons_per_frame=5e5))
    amplitudes = np.sqrt(sample.intensities)
    model = ModelRegistry(None).get("ptychonn-hxn-128")
    backend = OnnxRuntimeBackend(model.path, model.io())
    core = BranchCore(backend, InputRule(128, 128), canvas_shape=sample.object.shape, window=128)
    core.probe = initial_probe(amplitudes, footprint_px=0.28 * 128)
    mosaics = []
    for start in range(0, sample.num_points, CHUNK):
        core.process(amplitudes[start : start + CHUNK], sample.positions_px[start : start + CHUNK])
        snapshot = core.snapshot()
        assert snapshot is not None
        mosaics.append((snapshot["object"], snapshot["coverage"]))
    backend.close()
    return {
        "sample": sample,
        "amplitudes": amplitudes,
        "probe": core.probe,
        "mosaics": mosaics,
        "mask": illuminated_mask(sample.positions_px, sample.probe, sample.object.shape),
    }


def test_the_nn_seed_lowers_the_iterative_error_early_on_a_simulated_scan(scan):
    """All frames at once: after 3 passes the solver started from the seeded mosaic is at
    most 0.6 x the error of the flat start (benchmarks/nn_seed.py: about a third)."""
    sample, amplitudes = scan["sample"], scan["amplitudes"]
    shape = sample.object.shape
    mosaic, coverage = scan["mosaics"][-1]
    errors = {}
    for name, start in (("flat", 1.0), ("seeded", seed_object(mosaic, coverage, shape))):
        solver = StreamingSolver(probe=scan["probe"], canvas_shape=shape, object_init=start)
        solver.add(amplitudes, sample.positions_px)
        solver.iterate(3)
        errors[name] = object_error(sample.object, np.asarray(solver.object), scan["mask"])
    assert errors["seeded"] <= 0.6 * errors["flat"], errors


def test_a_mosaic_arriving_after_the_solvers_first_pass_still_helps_a_streamed_scan(scan):
    """The live case: positions arrive in chunks, two passes after each; each chunk's mosaic
    lands after the solver's first pass over it and fills where the solver is young
    (reseed_young_region). When the last chunk has had its passes, the error is at most
    0.6 x the unseeded run's (benchmarks/nn_seed.py: 0.12 against 0.28)."""
    sample, amplitudes = scan["sample"], scan["amplitudes"]
    shape, positions = sample.object.shape, sample.positions_px
    errors = {}
    for seeded in (False, True):
        solver = StreamingSolver(probe=scan["probe"], canvas_shape=shape)
        passes_seen = np.zeros(0)
        for index, start in enumerate(range(0, sample.num_points, CHUNK)):
            solver.add(amplitudes[start : start + CHUNK], positions[start : start + CHUNK])
            passes_seen = np.concatenate([passes_seen, np.zeros(CHUNK)])
            solver.iterate(1)
            passes_seen += 1
            if seeded:
                mosaic, coverage = scan["mosaics"][index]
                solver.object[...] = reseed_young_region(
                    solver.object,
                    mosaic,
                    coverage,
                    positions[: len(passes_seen)],
                    solver.probe,
                    passes_seen,
                )
            solver.iterate(1)
            passes_seen += 1
        name = "seeded" if seeded else "flat"
        errors[name] = object_error(sample.object, np.asarray(solver.object), scan["mask"])
    assert errors["seeded"] <= 0.6 * errors["flat"], errors
