"""A live scan over two ranks (``Settings.ranks``): the solver process is rank 0 and starts
the other itself (MPI spawn, OpenMPI singleton; NumPy on the CPU), feeds it its share of
each chunk as frames arrive, and gathers the object for each snapshot.

* Through the whole live path (RunEngine, simulated Eiger and PandA over ZMQ, session,
  engine, embedded Tiled): two ranks reach the end-to-end error bound that one rank
  reaches on the same scan, and the final data error within 25 % of one rank's (the bound
  tests/test_mpi_ranks.py states for streamed ePIE over ranks).
* The solver process on its own (fast): the scan of tests/mpi_ranks_run.py fed in chunks
  to two ranks reaches the one-rank data error within 25 %, the object's within 1.5x.
* A rank that fails ends its runs with a one-line reason, at once, and ranks that do not
  start in time end the start with the reason: never a hang.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from recon_helpers import phase_object_scan
from scans import fly, processed

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.demo import final_object_error
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.recon.rank_hub import LiveRanks
from hxn_liveptycho.recon.worker import SolverWorker
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

#: The end-to-end quality bar (tests/test_end_to_end.py).
MAX_OBJECT_ERROR = 0.15


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reconstruct_live(
    RE: Any, eiger: Any, panda: Any, sample: SimulatedSample, tmp_path: Any, ranks: int
) -> tuple[dict[str, Any], float, tuple[int, ...]]:
    """One live scan of ``sample`` on ``ranks`` ranks: the container's metadata, the final
    object's error against the phantom, and the ranks' process ids."""
    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        data_dir=tmp_path / f"data{ranks}",
        live_interval_s=0.5,
        array_backend="numpy",
        overrides={"recon": {"iterations": 60}},
        ranks={"count": ranks},
    )
    live = LivePtycho(settings)
    token = RE.subscribe(live)
    try:
        assert eiger.publisher.wait_for_subscribers(1, timeout=10)
        assert panda.publisher.wait_for_subscribers(1, timeout=10)
        pids = live.engine.solver_worker.info().rank_pids
        result = fly(RE, eiger, panda, sample, dwell=0.03)
        assert result.exit_status == "success"
        assert live.wait(timeout=240)
        assert live.tiled is not None
        node = processed(live.tiled.client(), result.run_start_uids[0])
        error, *_ = final_object_error(sample, node)
        return dict(node.metadata), error, pids
    finally:
        RE.unsubscribe(token)
        live.close()


@pytest.mark.slow
def test_a_live_scan_over_two_ranks_reaches_the_one_rank_error(RE, hxn_detectors, tmp_path):
    eiger, panda = hxn_detectors
    sample = SimulatedSample(SimulatedBeamline(x_num=12, y_num=12))
    one, one_error, one_pids = _reconstruct_live(RE, eiger, panda, sample, tmp_path, 1)
    two, two_error, two_pids = _reconstruct_live(RE, eiger, panda, sample, tmp_path, 2)
    assert one_pids == () and len(two_pids) == 2  # one rank: the solver process alone
    assert not any(_running(pid) for pid in two_pids)  # closed: no rank is left behind
    for md in (one, two):
        assert md["status"] == "complete"
        assert md["iteration"] >= 60
    assert one_error <= MAX_OBJECT_ERROR, f"one rank: object error {one_error:.3f}"
    assert two_error <= MAX_OBJECT_ERROR, f"two ranks: object error {two_error:.3f}"
    assert two["state_error"] <= 1.25 * one["state_error"]


def _small_run(worker: SolverWorker) -> Any:
    """A run opened on ``worker`` with a small noiseless scan's frames."""
    _, probe, amplitudes, positions = phase_object_scan(32, 6, 6, np.random.default_rng(1))
    top = positions.max(axis=0)
    remote = worker.open_run(
        "run-1",
        probe=probe,
        canvas_shape=(int(top[0]) + 40, int(top[1]) + 40),
        params=IterativeParams(algorithm="epie"),
        expected_positions=len(positions),
    )
    remote.add(amplitudes.astype(np.float32), positions)
    return remote


def _chunked(size: int) -> tuple[float, float]:
    """The 10 x 10 scan of tests/mpi_ranks_run.py fed to a solver process of ``size`` ranks
    in 5 chunks, then 30 passes: the final data error and the object's error."""
    import mpi_ranks_run as run

    from hxn_liveptycho.recon.metrics import object_error

    scan = run.Scan("epie")
    worker = SolverWorker(backend="numpy", ranks=LiveRanks(count=size))
    try:
        remote = worker.open_run(
            "run-1",
            probe=scan.probe_guess,
            canvas_shape=scan.canvas,
            params=IterativeParams(seed=0, algorithm="epie"),
            expected_positions=len(scan.positions),
        )
        for chunk in np.array_split(np.arange(len(scan.positions)), run.CHUNKS):
            remote.add(scan.amplitudes[chunk], scan.positions[chunk])
            time.sleep(0.1)
        remote.finish(run.PASSES)
        assert remote.done.wait(60) and remote.failure is None
        final = remote.final
        assert final is not None and final["positions_px"].shape == (len(scan.positions), 2)
        return final["state_error"], object_error(scan.obj, final["object"], scan.mask)
    finally:
        worker.close()


def test_frames_fed_in_chunks_to_two_ranks_reach_the_one_rank_error() -> None:
    """The solver process alone against the same process as rank 0 of two: each chunk split
    by position as it arrives, both ranks iterating between chunks (the bounds of
    tests/test_mpi_ranks.py for streamed ePIE)."""
    one_error, one_object = _chunked(1)
    two_error, two_object = _chunked(2)
    assert two_error <= 1.25 * one_error
    assert two_object <= 1.5 * one_object


def test_a_rank_that_dies_ends_the_run_with_the_reason() -> None:
    worker = SolverWorker(backend="numpy", ranks=LiveRanks(count=2))
    try:
        pids = worker.info(timeout=60).rank_pids
        assert len(pids) == 2 and pids[0] == worker.pid
        remote = _small_run(worker)
        deadline = time.monotonic() + 30
        while remote.iteration < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert remote.iteration >= 3  # the two ranks iterate together
        os.kill(pids[1], signal.SIGKILL)
        assert remote.done.wait(15), "a dead rank left its run hanging"
        assert remote.failure == f"a rank of the solver failed: rank 1 (pid {pids[1]}) exited"
        deadline = time.monotonic() + 10
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(p) for p in pids)  # rank 0 ended with it
    finally:
        worker.close()


def test_ranks_that_do_not_start_in_time_end_the_start_with_the_reason() -> None:
    began = time.monotonic()
    worker = SolverWorker(backend="numpy", ranks=LiveRanks(count=2, start_timeout_s=0.01))
    try:
        with pytest.raises(ConfigurationError) as raised:
            worker.info(timeout=60)
        assert time.monotonic() - began < 30
        message = str(raised.value)
        assert "\n" not in message
        assert message == (
            "the solver process could not start: "
            "a rank of the solver failed: the ranks did not start within 0.01 s"
        )
    finally:
        worker.close()


def test_ranks_on_gpus_that_are_not_there_end_the_start_with_the_reason() -> None:
    """No CuPy (or no GPU) here: the ranks cannot take the GPUs named for them."""
    worker = SolverWorker(backend="numpy", ranks=LiveRanks(gpus=[0, 0], comm="mpi"))
    try:
        with pytest.raises(ConfigurationError) as raised:
            worker.info(timeout=60)
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith("the solver process could not start: ")
        assert "cupy" in message.lower() or "cuda" in message.lower()
    finally:
        worker.close()


def test_one_rank_is_the_solver_process_alone() -> None:
    """The default: no MPI, no other process, the single-rank solver as before."""
    assert LiveRanks().size == 1 and Settings().ranks.size == 1
    assert LiveRanks(gpus=[0, 1]).size == 2
    with pytest.raises(ValueError, match="name one per rank"):
        LiveRanks(count=3, gpus=[0, 1])
    worker = SolverWorker(backend="numpy", ranks=LiveRanks())
    try:
        assert worker.info(timeout=60).rank_pids == ()
        remote = _small_run(worker)
        remote.finish(3)
        assert remote.done.wait(30) and remote.failure is None
        assert remote.final is not None and remote.final["positions_px"].shape == (36, 2)
    finally:
        worker.close()
