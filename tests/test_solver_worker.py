"""The solver process: frames through shared memory, snapshots on request, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from recon_helpers import phase_object_scan

from hxn_liveptycho.recon import worker as worker_module
from hxn_liveptycho.recon.frame_ring import FrameRing, FrameRingReader
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.recon.worker import SolverWorker


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap the dead)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:\tZ") for line in status)
    except FileNotFoundError:
        return False


def _scan(n: int = 32, side: int = 6, step: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small noiseless scan of a random phase object: probe, amplitudes, positions."""
    _, probe, amplitudes, positions = phase_object_scan(n, side, step, np.random.default_rng(1))
    return probe, amplitudes.astype(np.float32), positions


def test_frame_ring_wraps_and_waits_for_the_reader() -> None:
    ring = FrameRing(4, 2)
    reader = FrameRingReader(ring.name, 4, 2)
    try:
        frames = np.arange(3 * 4, dtype=np.float32).reshape(3, 2, 2)
        assert ring.write(frames) == (0, 3)
        np.testing.assert_array_equal(reader.view(0, 3), frames)
        assert ring.write(frames[:2]) == (3, 1)  # only what fits before the end
        with pytest.raises(TimeoutError):
            ring.write(frames[1:2], timeout=0.05)  # full until the reader frees slots
        ring.release(3)
        assert ring.write(frames + 100) == (0, 3)  # wrapped to the start
        np.testing.assert_array_equal(reader.view(0, 3), frames + 100)
        np.testing.assert_array_equal(reader.view(3, 1), frames[:1])
    finally:
        reader.close()
        ring.close()


def test_a_run_in_the_solver_process_answers_snapshots_and_ends_with_its_final_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe, amplitudes, positions = _scan()
    # A ring smaller than one batch: the session side must wait for the child to free slots.
    monkeypatch.setattr(worker_module, "RING_BYTES", 16 * 32 * 32 * 4)
    woken: list[float] = []
    worker = SolverWorker(backend="numpy")
    try:
        info = worker.info(timeout=60)
        assert info.backend == "numpy" and info.placement.gpus == 0
        remote = worker.open_run(
            "run-a",
            probe=probe,
            canvas_shape=(80, 80),
            params=IterativeParams(batch_size=8),
            expected_positions=len(amplitudes),
            notify=lambda: woken.append(time.monotonic()),
        )
        remote.add(amplitudes[:20], positions[:20])
        remote.add(amplitudes[20:], positions[20:])
        assert remote.request_snapshot()
        assert not remote.request_snapshot()  # one request open at a time
        deadline = time.monotonic() + 60
        snapshot = None
        while snapshot is None and time.monotonic() < deadline:
            snapshot = remote.take_snapshot()
            time.sleep(0.01)
        assert snapshot is not None and snapshot["iteration"] >= 1
        assert snapshot["object"].shape == (80, 80)
        assert snapshot["positions_px"].shape == (len(amplitudes), 2)
        remote.finish(5)
        assert remote.done.wait(60)
        final = remote.final
        assert remote.failure is None and final is not None
        assert final["iteration"] == remote.iteration == len(remote.error_history)
        assert len(remote.pass_ends) == remote.iteration
        assert remote.n_positions == len(amplitudes)
        assert remote.error_history[-1] < remote.error_history[0]
        assert woken  # the session is woken by what the child sends
        remote.release()
    finally:
        worker.close()
    assert not worker.alive


def test_a_dead_solver_process_fails_its_runs_and_is_replaced() -> None:
    probe, amplitudes, positions = _scan()
    worker = SolverWorker(backend="numpy")
    try:
        worker.info(timeout=60)
        remote = worker.open_run(
            "run-b",
            probe=probe,
            canvas_shape=(80, 80),
            params=IterativeParams(),
            expected_positions=None,
        )
        remote.add(amplitudes, positions)
        first_pid = worker.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        assert remote.done.wait(30)
        assert remote.failure is not None and "exited" in remote.failure
        remote.release()
        again = worker.open_run(
            "run-c",
            probe=probe,
            canvas_shape=(80, 80),
            params=IterativeParams(),
            expected_positions=None,
        )
        assert worker.pid != first_pid and worker.alive
        again.add(amplitudes, positions)
        again.finish(2)
        assert again.done.wait(60) and again.failure is None
        again.release()
        assert worker.counters.get("deaths") == 1
    finally:
        worker.close()


def test_the_solver_process_does_not_outlive_a_killed_owner(tmp_path) -> None:
    """SIGKILL leaves no chance to clean up: the kernel ends the child (PDEATHSIG)."""
    script = textwrap.dedent(
        """
        import sys
        from hxn_liveptycho.recon.worker import SolverWorker

        if __name__ == "__main__":
            worker = SolverWorker(backend="numpy")
            worker.info(timeout=60)
            print(worker.pid, flush=True)
            sys.stdin.read()
        """
    )
    path = tmp_path / "owner.py"
    path.write_text(script)
    owner = subprocess.Popen(
        [sys.executable, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())
        os.kill(child, 0)  # alive while its owner is
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.05)
        assert not _running(child), f"solver process {child} outlived its killed owner"
    finally:
        if owner.poll() is None:
            owner.kill()


def test_the_solver_process_starts_from_a_script_read_from_stdin() -> None:
    """``python - <<EOF`` has a main module the spawned child cannot re-open."""
    script = textwrap.dedent(
        """
        from hxn_liveptycho.recon.worker import SolverWorker

        worker = SolverWorker(backend="numpy")
        print(worker.info(timeout=60).backend)
        worker.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "numpy"
