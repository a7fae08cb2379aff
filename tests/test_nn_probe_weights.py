"""The NN mosaic's blending weights follow the run's starting probe when one is known (a
file's, a series seed, the estimate handed over later), on a thread and in a process, and
the guess from the first frames when none is: the first mosaic never waits for a probe."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from waiting import wait_for

from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.branch import NNBranch, start_nn_branch
from hxn_liveptycho.nn.mosaic import Mosaic, probe_weight
from hxn_liveptycho.nn.process import NNProcessBranch, WorkerKey, WorkerPool
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

MODEL = "ptychonn-hxn-128"
N = 128
FOOTPRINT_PX = 0.28 * N


@pytest.fixture(scope="module")
def sample():
    return SimulatedSample(SimulatedBeamline(x_num=6, y_num=6, seed=7, photons_per_frame=2e5))


@pytest.fixture(scope="module")
def model():
    model = ModelRegistry(None).get(MODEL)
    amplitude, _ = OnnxRuntimeBackend(model.path, model.io(), threads=1).infer(
        np.zeros((1, N, N), np.float32)
    )
    assert amplitude.shape[-1] == PATCH
    return model


def gaussian_beam(sigma_px: float, modes: int = 0) -> np.ndarray:
    """A beam of a known footprint (n, n), or ``modes`` copies of it (k, n, n)."""
    y, x = np.mgrid[:N, :N] - N // 2
    beam = np.exp(-(x**2 + y**2) / (4.0 * sigma_px**2)).astype(np.complex64)
    return beam if modes == 0 else np.stack([beam / np.sqrt(modes)] * modes)


#: The network's patch edge: it predicts the centre of the probe window.
PATCH = 64


def window_of(coverage: np.ndarray, corner: np.ndarray) -> np.ndarray:
    """The weight one patch added, at the centre of the window whose corner is ``corner``."""
    y, x = np.rint(corner).astype(int) + (N - PATCH) // 2
    return coverage[y : y + PATCH, x : x + PATCH]


def weight(probe: np.ndarray) -> np.ndarray:
    return probe_weight(probe, PATCH)


def guess_weight(amplitudes: np.ndarray) -> np.ndarray:
    """Today's weights: the guess from the first frames' mean pattern."""
    mean = np.mean(np.square(amplitudes), axis=0, dtype=np.float64)
    return weight(initial_probe(np.sqrt(mean)[None], footprint_px=FOOTPRINT_PX))


def far_apart(sample) -> tuple[int, int]:
    """Two frames at opposite corners of the scan (the first and the last)."""
    return 0, sample.num_points - 1


def thread_branch(model, sample, published: list, **kw) -> NNBranch:
    return NNBranch(
        model,
        OnnxRuntimeBackend(model.path, model.io(), threads=1),
        canvas_shape=sample.object.shape,
        window=N,
        batch_size=8,
        max_queued_frames=1000,
        publish=published.append,
        interval_s=0.0,
        footprint_px=FOOTPRINT_PX,
        **kw,
    )


def test_a_mosaic_takes_a_new_weight_for_the_patches_after_it():
    """set_weight changes what the next patches add, not what the mosaic holds."""
    mosaic = Mosaic((40, 40), 8, np.ones((8, 8)))
    patch = np.ones((1, 8, 8), np.complex64)
    mosaic.add_complex(patch, np.array([[0, 0]]))
    narrow = np.zeros((8, 8))
    narrow[3:5, 3:5] = 2.0
    mosaic.set_weight(narrow)
    mosaic.add_complex(patch, np.array([[20, 20]]))
    np.testing.assert_array_equal(mosaic.coverage[:8, :8], 1.0)
    np.testing.assert_array_equal(mosaic.coverage[20:28, 20:28], narrow / 2.0)
    with pytest.raises(ValueError, match="weight must be"):
        mosaic.set_weight(np.ones((4, 4)))


def test_probe_weight_of_modes_is_the_footprint_of_their_summed_intensity():
    """Several modes blend like the one beam of their summed intensity."""
    np.testing.assert_allclose(
        weight(gaussian_beam(6.0, modes=3)), weight(gaussian_beam(6.0)), 1e-5
    )


def test_a_known_probe_sets_the_first_mosaics_weights_not_the_guess(model, sample):
    """A probe known at the start (a series seed, a file's): the first mosaic, published at
    the first batch as today, is blended with its footprint, not the guess's."""
    amplitudes = np.sqrt(sample.intensities)
    first, _ = far_apart(sample)
    beam = gaussian_beam(4.0)
    published: list = []
    branch = thread_branch(model, sample, published, probe=beam)
    branch.submit(amplitudes[first : first + 1], sample.positions_px[first : first + 1])
    wait_for(lambda: published, timeout=60, what="the first mosaic")
    final = branch.close(timeout=60)
    assert final is not None and published[0]["frames"] == 1
    used = window_of(published[0]["coverage"], sample.positions_px[first])
    np.testing.assert_allclose(used, weight(beam), atol=1e-6)
    guess = guess_weight(amplitudes[first : first + 1])
    assert np.abs(used - guess).max() > 0.3  # a different footprint from the guess's
    assert (used > 0.5).sum() < 0.5 * (guess > 0.5).sum()


def test_the_first_mosaic_uses_the_guess_then_the_weights_follow_the_run_probe(model, sample):
    """No probe yet (an estimate under way): the first mosaic comes at the first batch with
    the guess's weights, as today; the probe handed over later blends the later patches."""
    amplitudes = np.sqrt(sample.intensities)
    first, later = far_apart(sample)
    published: list = []
    branch = thread_branch(model, sample, published)
    branch.submit(amplitudes[first : first + 1], sample.positions_px[first : first + 1])
    wait_for(lambda: published, timeout=60, what="the first mosaic, with no probe given")
    assert published[0]["frames"] == 1  # the first batch's mosaic: nothing waited
    before = published[-1]["coverage"].copy()
    np.testing.assert_allclose(
        window_of(before, sample.positions_px[first]),
        guess_weight(amplitudes[first : first + 1]),
        atol=1e-6,
    )
    estimate = gaussian_beam(10.0)
    branch.use_probe(estimate)
    branch.submit(amplitudes[later : later + 1], sample.positions_px[later : later + 1])
    final = branch.close(timeout=60)
    assert final is not None and final["frames"] == 2
    added = window_of(final["coverage"] - before, sample.positions_px[later])
    np.testing.assert_allclose(added, weight(estimate), atol=1e-6)


def test_the_process_branch_takes_a_probe_at_its_start_and_one_later(model, sample):
    """In the worker process: the probe given at the start blends the first mosaic, and one
    handed over later (through the run's shared segment) the patches after it."""
    amplitudes = np.sqrt(sample.intensities)
    first, later = far_apart(sample)
    seed, estimate = gaussian_beam(8.0), gaussian_beam(14.0, modes=2)
    pool = WorkerPool()
    try:
        branch = NNProcessBranch(
            model,
            WorkerKey(backend="onnxruntime", cpu_threads=1),
            canvas_shape=sample.object.shape,
            window=N,
            batch_size=8,
            max_queued_frames=1000,
            publish=lambda snapshot: None,
            interval_s=0.0,
            rule=InputRule(N, N),
            footprint_px=FOOTPRINT_PX,
            probe=seed,
            pool=pool,
        )
        branch.submit(amplitudes[first : first + 1], sample.positions_px[first : first + 1])
        wait_for(
            lambda: branch.describe()["nn_snapshots"] >= 1,
            timeout=120,
            what=lambda: f"the first mosaic: {branch.describe()}",
        )
        snap = branch.snapshot()
        assert snap is not None and snap["frames"] == 1
        before = snap["coverage"].copy()
        np.testing.assert_allclose(
            window_of(before, sample.positions_px[first]), weight(seed), atol=1e-6
        )
        branch.use_probe(estimate)
        branch.submit(amplitudes[later : later + 1], sample.positions_px[later : later + 1])
        final = branch.close(timeout=120)
        assert final is not None and final["frames"] == 2, branch.describe()
        added = window_of(final["coverage"] - before, sample.positions_px[later])
        np.testing.assert_allclose(added, weight(estimate), atol=1e-6)
    finally:
        pool.shutdown()


def _config(probe: dict):
    from hxn_liveptycho.config.scan import ScanConfig

    beamline = SimulatedBeamline(x_num=6, y_num=6, seed=7)
    x0, x1, nx, y0, y1, ny = beamline.scan_input()
    grid = {
        "kind": "fly2d_panda",
        **dict(x_start_um=x0, x_end_um=x1, x_num=nx, y_start_um=y0, y_end_um=y1, y_num=ny),
    }
    return ScanConfig(
        uid="nn-probe",
        scan_id=1,
        grid=grid,
        energy_kev=beamline.energy_kev,
        distance_m=beamline.distance_m,
        roi={"size": N},
        probe={"footprint_um": FOOTPRINT_PX * beamline.pixel_size_m * 1e6, **probe},
        mode="nn",
        nn={"batch_size": 8},
    )


def test_start_nn_branch_blends_with_the_runs_probe_file(model, sample, tmp_path, caplog):
    """``probe.initial="file"``: the branch reads the file's probe for its weights; a file
    it cannot use leaves the guess, with a line saying why."""
    from hxn_liveptycho.config.settings import Settings

    amplitudes = np.sqrt(sample.intensities)
    beam = gaussian_beam(9.0)
    np.save(tmp_path / "probe.npy", beam)
    np.save(tmp_path / "wrong.npy", np.ones((64, 64), np.complex64))
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path, nn_backend="onnxruntime")
    geometry = SimpleNamespace(canvas_shape=sample.object.shape, window=N)
    weights = {}
    for name in ("probe.npy", "wrong.npy"):
        config = _config({"initial": "file", "file": str(tmp_path / name)})
        published: list = []
        with caplog.at_level(logging.WARNING):
            branch = start_nn_branch(config, settings, geometry, published.append, where="thread")
        branch.submit(amplitudes[:1], sample.positions_px[:1])
        final = branch.close(timeout=60)
        assert final is not None and final["frames"] == 1, branch.describe()
        weights[name] = window_of(final["coverage"], sample.positions_px[0])
    np.testing.assert_allclose(weights["probe.npy"], weight(beam), atol=1e-6)
    np.testing.assert_allclose(weights["wrong.npy"], guess_weight(amplitudes[:1]), atol=1e-6)
    assert "blending with the guessed probe's footprint" in caplog.text
