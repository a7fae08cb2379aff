"""The NN branch in its own process: the same mosaic as on a thread, frames through shared
memory, drops instead of waiting, a worker that dies or cannot load, and no worker
outliving its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from waiting import wait_for

from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.branch import NNBranch
from hxn_liveptycho.nn.process import NNProcessBranch, WorkerKey, WorkerPool
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

MODEL = "ptychonn-hxn-128"
CPU = WorkerKey(backend="onnxruntime", cpu_threads=1)


@pytest.fixture(scope="module")
def sample():
    return SimulatedSample(SimulatedBeamline(x_num=8, y_num=8, seed=5, photons_per_frame=2e5))


@pytest.fixture(scope="module")
def model():
    return ModelRegistry(None).get(MODEL)


@pytest.fixture
def pool():
    pool = WorkerPool()
    yield pool
    pool.shutdown()


def _branch(model, sample, pool, *, key=CPU, max_queued=1000, publish=None, interval=0.0):
    return NNProcessBranch(
        model,
        key,
        canvas_shape=sample.object.shape,
        window=128,
        batch_size=16,
        max_queued_frames=max_queued,
        publish=publish or (lambda snapshot: None),
        interval_s=interval,
        rule=InputRule(128, 128),
        footprint_px=0.28 * 128,
        pool=pool,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split()[2] != "Z"


def test_the_process_mosaic_is_the_thread_mosaic_and_the_worker_is_reused(model, sample, pool):
    amplitudes = np.sqrt(sample.intensities)
    published: list = []
    branch = _branch(model, sample, pool, publish=published.append)
    branch.submit(amplitudes[:40], sample.positions_px[:40])  # the probe comes from these
    for start in range(40, sample.num_points, 8):
        branch.submit(amplitudes[start : start + 8], sample.positions_px[start : start + 8])
    final = branch.close(timeout=120)
    info = branch.describe()
    assert final is not None and final["frames"] == sample.num_points
    assert info["backend"] == "onnxruntime" and "error" not in info
    assert info["nn_frames_inferred"] == sample.num_points and info["nn_frames_dropped"] == 0
    assert info["nn_batches"] >= sample.num_points // 16
    assert published and published[-1]["frames"] <= sample.num_points
    assert info["nn_snapshots"] == len(published)

    thread = NNBranch(
        model,
        OnnxRuntimeBackend(model.path, model.io(), threads=1),
        canvas_shape=sample.object.shape,
        window=128,
        batch_size=16,
        max_queued_frames=1000,
        publish=lambda snapshot: None,
        interval_s=60.0,
        footprint_px=0.28 * 128,
    )
    thread.submit(amplitudes[:40], sample.positions_px[:40])  # the same probe estimate
    wait_for(  # taken alone, before the rest arrives
        lambda: thread.describe()["nn_frames_inferred"] >= 40,
        timeout=60,
        what=lambda: f"the first 40 frames inferred: {thread.describe()}",
    )
    thread.submit(amplitudes[40:], sample.positions_px[40:])
    reference = thread.close(timeout=120)
    assert reference is not None
    np.testing.assert_allclose(final["object"], reference["object"], atol=1e-4)
    np.testing.assert_allclose(final["coverage"], reference["coverage"], rtol=1e-6)

    pid = branch.pid
    again = _branch(model, sample, pool)
    assert again.pid == pid  # the runtime stayed loaded in the same worker
    again.submit(amplitudes[:5], sample.positions_px[:5])
    assert again.close(timeout=60)["frames"] == 5
    pool.shutdown()
    assert not _alive(pid)


def test_without_a_pool_the_branch_ends_its_worker(model, sample):
    branch = _branch(model, sample, None)
    branch.submit(np.sqrt(sample.intensities[:4]), sample.positions_px[:4])
    assert branch.close(timeout=60)["frames"] == 4
    assert not _alive(branch.pid)


def test_a_full_ring_drops_and_counts_without_waiting(model, sample, pool):
    branch = _branch(model, sample, pool, max_queued=8)
    x = np.ones((16, 128, 128), np.float32)
    began = time.perf_counter()
    branch.submit(x, np.zeros((16, 2)))  # more than the ring holds: dropped whole
    branch.submit(x[:4], np.full((4, 2), 10.0))
    assert time.perf_counter() - began < 1.0
    final = branch.close(timeout=60)
    counts = branch.describe()
    assert counts["nn_frames_dropped"] == 16
    assert counts["nn_frames_inferred"] == 4
    assert final is not None and final["frames"] == 4
    assert branch.snapshot() is not None  # still readable after close


def test_a_runtime_that_cannot_start_fails_the_branch_not_the_caller(model, sample, pool):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    branch = _branch(model, sample, pool, key=WorkerKey(backend="onnxruntime-cuda"))
    branch.submit(np.ones((4, 128, 128), np.float32), np.zeros((4, 2)))
    deadline = time.monotonic() + 60
    while branch.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    branch.submit(np.ones((3, 128, 128), np.float32), np.zeros((3, 2)))
    assert branch.close(timeout=30) is None  # no mosaic was ever made
    info = branch.describe()
    assert "CUDA" in info["error"]
    assert info["nn_frames_dropped"] == 7 and info["nn_frames_inferred"] == 0


def test_a_worker_that_dies_ends_its_branch_with_the_reason(model, sample, pool):
    amplitudes = np.sqrt(sample.intensities)
    branch = _branch(model, sample, pool)
    branch.submit(amplitudes[:16], sample.positions_px[:16])
    deadline = time.monotonic() + 60
    while branch.snapshot() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(branch.pid, signal.SIGKILL)
    while branch.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "exited" in branch.error and "-9" in branch.error
    branch.submit(amplitudes[16:20], sample.positions_px[16:20])  # counted, not raised
    began = time.monotonic()
    final = branch.close(timeout=60)
    assert time.monotonic() - began < 5  # no wait for a dead worker
    assert final is not None and final["frames"] == 16  # its last published mosaic
    info = branch.describe()
    assert info["nn_frames_submitted"] == 20
    assert info["nn_frames_inferred"] + info["nn_frames_dropped"] == 20


def test_no_worker_outlives_its_owner(tmp_path):
    """The owner is SIGKILLed (no atexit, no finally): its NN worker exits by itself."""
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, threading, time
            import numpy as np
            from hxn_liveptycho.nn.process import NNProcessBranch, WorkerKey
            from hxn_liveptycho.nn.registry import ModelRegistry
            from hxn_liveptycho.nn.resample import InputRule

            def start():  # from a short-lived thread, as a run's thread would
                b = NNProcessBranch(
                    ModelRegistry(None).get("ptychonn-hxn-128"),
                    WorkerKey(backend="onnxruntime", cpu_threads=1),
                    canvas_shape=(300, 300), window=128, batch_size=4,
                    max_queued_frames=64, publish=lambda s: None, interval_s=0.0,
                    rule=InputRule(128, 128),
                )
                b.submit(np.ones((4, 128, 128), np.float32), np.zeros((4, 2)))
                holder.append(b)
                starter.append(threading.get_native_id())

            if __name__ == "__main__":
                holder, starter = [], []
                t = threading.Thread(target=start)
                t.start()
                t.join()
                while holder[0].snapshot() is None:
                    time.sleep(0.05)
                print(holder[0].pid, starter[0], flush=True)
                time.sleep(600)
            """
        )
    )
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        line = owner.stdout.readline()
        assert line.strip(), "the owner printed no worker pid"
        worker, starter = (int(word) for word in line.split())
        # A child signalled at its starting thread's end is signalled as that thread's task
        # goes: wait for that moment, not for a time.
        wait_for(
            lambda: not os.path.exists(f"/proc/{owner.pid}/task/{starter}"),
            timeout=10,
            what="the end of the owner's starting thread",
        )
        assert _alive(worker), "the worker died with the thread that started it"
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the NN worker outlived its owner"
    finally:
        owner.kill()
