"""Step decay (``params.step_decay``): shorter ePIE / LSQ-ML steps once the fit stalls."""

from __future__ import annotations

import numpy as np
import pytest

from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.recon.step_decay import StepDecay
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample


def test_a_fit_that_keeps_improving_keeps_full_steps():
    decay = StepDecay(factor=0.5, tolerance=0.0, floor=0.1)
    for i, e in enumerate([1.0, 0.5, 0.45, 0.449, 0.4489]):
        decay.observe(i, "lsqml", e, power=7.0)
    assert decay.scale == 1.0


def test_a_stalled_fit_shortens_its_steps_down_to_the_floor():
    decay = StepDecay(factor=0.5, tolerance=0.0, floor=0.2)
    for i, e in enumerate([1.0, 0.5, 0.6, 0.55, 0.7]):
        decay.observe(i, "epie", e, power=7.0)
    # 0.6, 0.55 and 0.7 are all above the best (0.5): three shortenings, held at the floor.
    assert decay.scale == 0.2


def test_new_frames_or_another_algorithm_restore_full_steps():
    decay = StepDecay(factor=0.5, tolerance=0.0, floor=0.1)
    for i, e in enumerate([1.0, 0.5, 0.6]):
        decay.observe(i, "lsqml", e, power=7.0)
    assert decay.scale == 0.5
    decay.observe(3, "lsqml", 0.9, power=9.0)  # frames added: the data's power changed
    assert decay.scale == 1.0
    decay.observe(4, "lsqml", 0.95, power=9.0)
    assert decay.scale == 0.5
    decay.observe(5, "epie", 0.99, power=9.0)  # another algorithm: its errors start afresh
    assert decay.scale == 1.0


def test_patience_lets_a_passing_stall_go_by_at_full_steps():
    decay = StepDecay(factor=0.5, tolerance=0.0, floor=0.1, patience=2)
    for i, e in enumerate([1.0, 0.5, 0.6, 0.4, 0.45]):  # one miss, a new best, one miss
        decay.observe(i, "lsqml", e, power=7.0)
    assert decay.scale == 1.0
    for i, e in enumerate([0.41, 0.42, 0.43], start=5):  # misses 2, 3 and 4 in a row
        decay.observe(i, "lsqml", e, power=7.0)
    assert decay.scale == 0.125


def test_no_shortening_before_the_start_iteration():
    decay = StepDecay(factor=0.5, tolerance=0.0, floor=0.1, start=5)
    for i, e in enumerate([1.0, 0.5, 0.6, 0.7]):
        decay.observe(i, "lsqml", e, power=7.0)
    assert decay.scale == 1.0


@pytest.fixture(scope="module")
def noisy_scan() -> SimulatedSample:
    """A small jittered raster with Poisson noise, where mini-batches of a third of the
    positions leave the full-step fit wandering around its optimum."""
    beamline = SimulatedBeamline.for_window(64, step_px=5.0, jitter_px=0.75, x_num=10, y_num=10)
    return SimulatedSample(beamline)


@pytest.mark.parametrize("algorithm", ["lsqml", "epie"])
def test_step_decay_fits_noisy_data_deeper(noisy_scan, algorithm):
    """With the decay (its defaults), the returned state's data error and the object error
    after 80 passes are lower than with full steps throughout."""
    amplitudes = np.sqrt(noisy_scan.intensities).astype(np.float32)
    probe = initial_probe(amplitudes, footprint_px=3 * noisy_scan.beamline.step_px)
    canvas = (noisy_scan.object.shape[0] + 8, noisy_scan.object.shape[1] + 8)
    mask = illuminated_mask(noisy_scan.positions_px, noisy_scan.probe, noisy_scan.object.shape)
    h, w = noisy_scan.object.shape
    results = {}
    for decay in (1.0, 0.7):
        params = IterativeParams(algorithm=algorithm, batch_size=32, step_decay=decay)
        solver = StreamingSolver(probe=probe, canvas_shape=canvas, params=params)
        solver.add(amplitudes, noisy_scan.positions_px + 4)
        solver.iterate(80)
        obj = np.asarray(solver.object)[4 : 4 + h, 4 : 4 + w]
        results[decay] = (
            solver.state_error(),
            object_error(noisy_scan.object, obj, mask),
            solver.step_scale,
        )
    full, decayed = results[1.0], results[0.7]
    assert full[2] == 1.0 and decayed[2] < 1.0, results
    assert decayed[0] < 0.93 * full[0], results
    assert decayed[1] < 0.85 * full[1], results
