"""The NN mosaic seeds the live iterative solver: in its process, and through a mode-both run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from recon_helpers import phase_object_scan
from scans import SMALL, fly, make_live

from hxn_liveptycho.recon.frame_ring import FrameRing
from hxn_liveptycho.recon.params import IterativeParams
from hxn_liveptycho.recon.worker import RemoteSolver
from hxn_liveptycho.recon.worker_child import _Child
from hxn_liveptycho.sim import SimulatedSample

N, SIDE, STEP = 32, 6, 6
CANVAS = (N + STEP * SIDE + 4, N + STEP * SIDE + 4)


class _Outbox:
    """The pipe back to the parent, kept in a list (nothing reads it in these tests)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)


def _scan() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small noiseless scan of a random phase object: truth, probe, amplitudes, positions."""
    obj, probe, amplitudes, positions = phase_object_scan(N, SIDE, STEP, np.random.default_rng(1))
    return obj, probe, amplitudes.astype(np.float32), positions


def _open_child(
    probe: np.ndarray, amplitudes: np.ndarray, positions: np.ndarray
) -> tuple[_Child, FrameRing]:
    """A solver process's loop, in this process, with one run holding the scan's frames."""
    child = _Child(None, _Outbox())  # type: ignore[arg-type]
    ring = FrameRing(len(amplitudes), N)
    spec = {
        "ring": ring.name,
        "slots": len(amplitudes),
        "n": N,
        "probe": probe,
        "canvas_shape": CANVAS,
        "params": IterativeParams(batch_size=8),
        "expected_positions": len(amplitudes),
    }
    child.handle(("open", "run", spec))
    start, count = ring.write(amplitudes)
    assert count == len(amplitudes)
    child.handle(("add", "run", start, count, positions))
    return child, ring


def _error_on(obj: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Relative error on ``mask`` after the best global complex factor."""
    a, b = obj[mask], truth[mask]
    scale = np.vdot(a, b) / np.vdot(a, a)
    return float(np.linalg.norm(scale * a - b) / np.linalg.norm(b))


def test_a_seed_moves_the_young_object_toward_the_mosaic_before_the_next_pass() -> None:
    truth, probe, amplitudes, positions = _scan()
    child, ring = _open_child(probe, amplitudes, positions)
    region = np.zeros(CANVAS, bool)
    region[20:50, 20:50] = True
    seed = {
        "object": np.where(region, truth, 0).astype(np.complex64),
        "coverage": region.astype(np.float32) * 2.0,
        "mature_passes": 4,
    }
    try:
        run = child.runs["run"]
        # Before the first pass the solver knows nothing: the region becomes the mosaic.
        before = _error_on(np.array(run.solver.object), truth, region)
        child.handle(("seed", "run", seed))
        child._apply_seed("run", run)  # what step() does before its pass
        assert run.solver.iteration == 0 and run.seeds_applied == 1
        assert _error_on(np.array(run.solver.object), truth, region) < 0.01 * before
        child.step()
        # After a pass the positions are young, not new: the object moves part way.
        run.solver.object[...] = 1.0  # as if the solver had got nowhere
        before = _error_on(np.array(run.solver.object), truth, region)
        child.handle(("seed", "run", {**seed, "mature_passes": 99}))
        child.handle(("seed", "run", seed))  # the newest wins
        assert run.pending_seed is not None and run.pending_seed["mature_passes"] == 4
        child._apply_seed("run", run)
        after = _error_on(np.array(run.solver.object), truth, region)
        assert after < 0.9 * before, (before, after)
        assert run.solver.iteration == 1 and run.seeds_applied == 2
        child.step()
        assert run.seeds_applied == 2  # nothing pending: nothing applied again
        child.handle(("snapshot", "run"))
        child.step()
        snap = next(m for m in child.outbox.sent if m[0] == "snapshot")[2]  # type: ignore[attr-defined]
        assert snap["seeds_applied"] == 2
    finally:
        child._drop("run")
        ring.close()


def test_a_finishing_run_ignores_seeds_and_stays_bit_identical_to_an_unseeded_one() -> None:
    truth, probe, amplitudes, positions = _scan()
    seeded, ring_a = _open_child(probe, amplitudes, positions)
    plain, ring_b = _open_child(probe, amplitudes, positions)
    seed = {"object": truth, "coverage": np.full(CANVAS, 2.0, np.float32), "mature_passes": 4}
    try:
        for child in (seeded, plain):
            child.step()
            child.handle(("finish", "run", 3))
        seeded.handle(("seed", "run", seed))  # after the scan's end: ignored
        assert seeded.runs["run"].pending_seed is None
        for child in (seeded, plain):
            while "run" in child.runs:
                child.step()
        finals = [
            next(m for m in c.outbox.sent if m[0] == "final")[2]  # type: ignore[attr-defined]
            for c in (seeded, plain)
        ]
        assert finals[0]["seeds_applied"] == 0
        np.testing.assert_array_equal(finals[0]["object"], finals[1]["object"])
        np.testing.assert_array_equal(finals[0]["probe"], finals[1]["probe"])
    finally:
        for child in (seeded, plain):
            child._drop("run")
        ring_a.close()
        ring_b.close()


def test_a_seed_that_came_before_the_finish_is_dropped_with_it() -> None:
    truth, probe, amplitudes, positions = _scan()
    child, ring = _open_child(probe, amplitudes, positions)
    try:
        child.step()
        seed = {"object": truth, "coverage": np.full(CANVAS, 2.0, np.float32), "mature_passes": 4}
        child.handle(("seed", "run", seed))
        child.handle(("finish", "run", 1))
        run = child.runs["run"]
        assert run.pending_seed is None
        child.step()
        assert run.seeds_applied == 0
    finally:
        child._drop("run")
        ring.close()


def test_only_the_covered_box_travels_and_lands_where_the_whole_canvas_would() -> None:
    truth, probe, amplitudes, positions = _scan()

    class _Worker:
        _process = None

        def __init__(self) -> None:
            self.sent: list[tuple[Any, ...]] = []

        def _send(self, message: tuple[Any, ...]) -> None:
            self.sent.append(message)

    worker = _Worker()
    remote = RemoteSolver(worker, "run", None, lambda: None, backend="numpy")  # type: ignore[arg-type]
    coverage = np.zeros(CANVAS, np.float32)
    assert not remote.seed(truth, coverage, mature_passes=4) and not worker.sent
    coverage[12:40, 30:61] = np.linspace(0.2, 2.0, 31, dtype=np.float32)
    assert remote.seed(np.where(coverage > 0, truth, 0), coverage, mature_passes=4)
    boxed = worker.sent[-1][2]
    assert boxed["object"].shape == (28, 31) and boxed["origin"] == (12, 30)
    whole = {"object": truth, "coverage": coverage, "mature_passes": 4}
    children = [_open_child(probe, amplitudes, positions) for _ in range(2)]
    try:
        for (child, _), seed in zip(children, (boxed, whole), strict=True):
            child.step()
            child.handle(("seed", "run", seed))
            child._apply_seed("run", child.runs["run"])
        objects = [np.array(child.runs["run"].solver.object) for child, _ in children]
        np.testing.assert_array_equal(objects[0], objects[1])
        assert all(child.runs["run"].seeds_applied == 1 for child, _ in children)
    finally:
        for child, ring in children:
            child._drop("run")
            ring.close()


@pytest.mark.parametrize("seed_solver", [True, False])
def test_a_mode_both_run_seeds_its_solver_only_with_the_setting_on(
    RE, hxn_detectors, tmp_path, seed_solver: bool
) -> None:
    eiger, panda = hxn_detectors
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        overrides={
            "mode": "both",
            "recon": {"iterations": 10},
            "nn": {"batch_size": 8, "seed_solver": seed_solver},
            # The solver opens with the first frames (a probe estimate would hold it
            # until 64 are in: this whole scan, leaving no time to seed it).
            "probe": {"initial": "guess"},
        },
    )
    try:
        result = fly(RE, eiger, panda, SimulatedSample(SMALL), dwell=0.04)
        assert live.wait(timeout=120)
        session = live.engine.session(result.run_start_uids[0])
        assert session is not None
        assert session.status == "complete", session.error
        counters = session.counters.snapshot()
    finally:
        live.close()
    # The NN branch blends with the probe the solver opened with, once.
    assert counters["nn_probe_from_solver"] == 1
    if seed_solver:
        assert counters["nn_seeds_sent"] > 0
        assert 0 < counters["nn_seeds_applied"] <= counters["nn_seeds_sent"]
    else:
        assert "nn_seeds_sent" not in counters and "nn_seeds_applied" not in counters
