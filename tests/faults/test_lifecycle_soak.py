"""Memory is returned: many runs back to back leave memory, threads and files flat.

Each run sends 60 frames of 256 x 256 but positions for only half of them, so the
assembler holds ~7.5 MB of unpaired frames when the run ends. Before finished sessions
released their state, the engine's history (32 runs) kept all of it: ~ 230 MB over
30 such runs, on top of the solver handles and last snapshots.
"""

from __future__ import annotations

import copy
import gc
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_lifecycle_states import SCAN_MD, X_CHANNEL, Y_CHANNEL, make_engine

from hxn_liveptycho.pipeline.inputs import Samples, SeriesEnd, SeriesStart
from hxn_liveptycho.streams import EigerFrame

pytestmark = pytest.mark.timeout(300)

RUNS = 100
SIDE = 8  # an 8 x 8 grid: 64 points, 60 frames sent
FRAMES = 60
PAIRED = 30
BIG = 256
#: Allowed RSS growth over the measured runs; one leaked run's frames alone are ~7.5 MB.
RSS_BOUND_MB = 40.0


class LightSinks:
    """A sink factory whose sinks keep nothing: memory seen is the engine's own."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.rows = 0
        self._lock = threading.Lock()

    def __call__(self) -> LightSinks:
        return self

    def open(self, config: Any, metadata: Any) -> None:
        pass

    def live(self, snapshot: Any) -> None:
        pass

    def nn(self, snapshot: Any) -> None:
        pass

    def diffraction(self, indices: Any, amplitudes: Any, positions_m: Any) -> None:
        with self._lock:
            self.rows += len(indices)

    def final(self, snapshot: Any, metadata: Any) -> None:
        with self._lock:
            self.statuses.append(metadata["status"])

    def close(self, timeout: float | None = None) -> None:
        pass


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_run(engine: Any, index: int) -> None:
    from event_model import compose_run

    md = copy.deepcopy(SCAN_MD)
    md["scan"]["scan_input"] = [-1.0, 1.0, SIDE, -1.0, 1.0, SIDE, 0.01]
    md["scan_id"] = index
    bundle = compose_run(metadata=md)
    engine.submit("start", bundle.start_doc)
    flatfield = np.ones((BIG, BIG), np.float32)  # as a header_detail=all header carries
    engine.put(SeriesStart("eiger", {"series": index, "flatfield": flatfield}))
    engine.put(SeriesStart("panda", {}))
    base = np.random.default_rng(index).poisson(40, size=(BIG, BIG)).astype(np.uint32)
    for i in range(FRAMES):
        engine._on_frame(EigerFrame(series=index, frame=i, data=np.roll(base, i, axis=1)))
    grid = np.linspace(-1.0, 1.0, SIDE)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    samples = {X_CHANNEL: xx.ravel()[:PAIRED] * 1e4, Y_CHANNEL: yy.ravel()[:PAIRED] * 1e4}
    engine.put(Samples(samples, 0))
    engine.put(SeriesEnd("eiger"))
    engine.put(SeriesEnd("panda"))
    engine.submit("stop", bundle.compose_stop())
    assert engine.wait_idle(timeout=60)


def test_back_to_back_runs_return_their_memory(tmp_path: Path) -> None:
    sinks = LightSinks()
    engine = make_engine(
        tmp_path,
        sinks,  # type: ignore[arg-type]
        overrides={
            "roi": {"size": 32, "center_y": BIG / 2, "center_x": BIG / 2},
            "recon": {"iterations": 1},
            "encoder": {"upsample": 1},
        },
    )
    try:
        for index in range(3):  # warm: solver rings, imports, allocator pools
            one_run(engine, index)
        gc.collect()
        rss0, threads0, fds0 = rss_mb(), threading.active_count(), open_fds()
        for index in range(3, 3 + RUNS):
            one_run(engine, index)
        gc.collect()
        grown = rss_mb() - rss0
        assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB over {RUNS} runs"
        assert threading.active_count() <= threads0
        assert open_fds() <= fds0
        runs = engine.status()["runs"]
        assert len(runs) == 32  # the history: the newest 32 finished runs
        assert {r["status"] for r in runs} == {"complete"}
        assert all(r["counters"]["frames_without_position"] == FRAMES - PAIRED for r in runs)
        assert sinks.rows == (3 + RUNS) * PAIRED
        # finished sessions hold no frames, solver, sink; only the newest keeps a picture
        sessions = engine.sessions()
        assert all(s._assembler is None and s._solver.remote is None for s in sessions)
        assert all(s._sink is None and not s._pending_frames for s in sessions)
        assert all("flatfield" not in s._series_header for s in sessions)
        assert sum(s.latest_snapshot is not None for s in sessions) <= 2
    finally:
        engine.close(timeout=20)
