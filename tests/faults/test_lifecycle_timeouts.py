"""Runs that lose their ``stop``, and frames of the wrong shape: the run still ends, with
the reason, keeping everything it received (in ``diffraction/`` or counted as quarantined)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_lifecycle_states import FRAME, Run, Sinks, make_engine, only_sink

from hxn_liveptycho.pipeline.engine import Engine
from hxn_liveptycho.pipeline.session import SUPERSEDED

pytestmark = pytest.mark.timeout(120)


@contextmanager
def engine_with(tmp_path: Path, **fields: Any) -> Iterator[tuple[Engine, Sinks]]:
    sinks = Sinks()
    engine = make_engine(tmp_path, sinks, **fields)
    try:
        yield engine, sinks
    finally:
        engine.close(timeout=20)


def test_run_whose_stop_never_comes_ends_incomplete(tmp_path: Path) -> None:
    """Was: the session iterated for ever and wait() never returned."""
    with engine_with(tmp_path, run_idle_timeout_s=1.0) as (engine, sinks):
        run = Run(engine)
        run.arm()
        run.frames(range(9))
        run.positions()
        run.end_streams()  # ... and the stop document is lost
        began = time.monotonic()
        assert engine.wait_idle(timeout=30)
        assert time.monotonic() - began < 20
        summary = run.summary()
        assert summary["status"] == "incomplete", summary
        assert "no 'stop' document within 1 s" in summary["reason"]
        sink = only_sink(sinks)
        assert sink.final_metadata["status"] == "incomplete"
        assert sink.final_metadata["reason"] == summary["reason"]
        assert sorted(sink.indices) == list(range(9))
        assert sink.final_snapshot and sink.final_snapshot.get("object") is not None


def test_idle_bound_defaults_to_scan_duration_plus_margin(tmp_path: Path) -> None:
    with engine_with(tmp_path) as (engine, _):
        run = Run(engine)
        run.whole()
        assert engine.wait_idle(timeout=60)
        session = engine.session(run.uid)
        assert session is not None
        # 9 points x 10 ms dwell, plus the margin
        assert session.idle_bound_s() == pytest.approx(9 * 0.01 + 600.0)


def test_new_start_ends_the_open_run(tmp_path: Path) -> None:
    """Two starts without a stop between them: the first run ends incomplete, keeps its
    frames, and the engine's history no longer holds it open."""
    with engine_with(tmp_path) as (engine, sinks):
        first = Run(engine)
        first.arm()
        first.frames(range(5))
        first.positions(n=5)
        # no series end, no stop: the next scan starts
        second = Run(engine)
        second.whole()
        assert engine.wait_idle(timeout=60)
        one, two = first.summary(), second.summary()
        assert one["status"] == "incomplete", one
        assert one["reason"].startswith(SUPERSEDED)
        assert two["status"] == "complete", two
        assert engine.status()["engine"]["runs_superseded"] == 1
        by_uid = {s.final_metadata["raw_uid"]: s for s in sinks.made if s.final_metadata}
        assert sorted(by_uid[first.uid].indices) == list(range(5))
        assert by_uid[first.uid].final_metadata["status"] == "incomplete"
        assert sorted(by_uid[second.uid].indices) == list(range(9))


def test_duplicate_start_is_ignored(tmp_path: Path) -> None:
    with engine_with(tmp_path) as (engine, _):
        run = Run(engine)
        engine.submit("start", run.bundle.start_doc)
        run.whole()
        assert engine.wait_idle(timeout=60)
        assert [s.summary()["status"] for s in engine.sessions()] == ["complete"]
        assert engine.status()["engine"]["duplicate_starts"] == 1


def test_one_frame_of_another_shape_is_quarantined(tmp_path: Path) -> None:
    """Was: np.stack in preprocess.to_amplitudes failed the whole run, losing every frame."""
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.arm()
        run.frames(range(4))
        run.frames(range(4, 5), shape=(FRAME + 8, FRAME))
        run.frames(range(5, 7), dtype=np.float32)
        run.frames(range(7, 9))
        run.positions()
        run.end_streams()
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "complete", summary
        counters = summary["counters"]
        assert counters["frames_received"] == 9
        assert counters["frames_quarantined"] == 3
        assert any("3 of 9 frames quarantined" in w for w in summary["warnings"]), summary
        sink = only_sink(sinks)
        assert sorted(sink.indices) == [0, 1, 2, 3, 7, 8]
        assert len(sink.indices) + counters["frames_quarantined"] == counters["frames_received"]
        assert sink.final_metadata["counters"]["frames_quarantined"] == 3


def test_series_that_changed_shape_ends_incomplete(tmp_path: Path) -> None:
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.arm()
        run.frames(range(3))
        run.frames(range(3, 9), shape=(FRAME * 2, FRAME * 2))
        run.positions()
        run.end_streams()
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "incomplete", summary
        assert "frame shape changed" in summary["reason"]
        assert "128x128" in summary["reason"] and "64x64" in summary["reason"]
        sink = only_sink(sinks)
        assert sorted(sink.indices) == [0, 1, 2]
        assert summary["counters"]["frames_quarantined"] == 6


def test_odd_first_frame_is_the_one_quarantined(tmp_path: Path) -> None:
    """The first frame sets the run's shape, unless the two after it agree on another."""
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.arm()
        run.frames(range(1), shape=(FRAME * 2, FRAME * 2))
        run.frames(range(1, 9))
        run.positions()
        run.end_streams()
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "complete", summary
        assert summary["counters"]["frames_quarantined"] == 1
        assert any("128x128" in w for w in summary["warnings"]), summary
        assert sorted(only_sink(sinks).indices) == list(range(1, 9))


def test_solver_that_never_sends_its_final_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A solver that is alive but never answers 'finish' no longer holds the run open."""
    from hxn_liveptycho.pipeline import solver_link
    from hxn_liveptycho.recon.worker import RemoteSolver

    monkeypatch.setattr(solver_link, "FINAL_STATE_MARGIN_S", 1.0)
    monkeypatch.setattr(RemoteSolver, "finish", lambda self, iterations: None)
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.whole()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "failed", summary
        assert "no final state within" in summary["reason"]
        sink = only_sink(sinks)
        assert sink.final_metadata["status"] == "failed"
        assert sorted(sink.indices) == list(range(9))


def test_to_amplitudes_refuses_a_mixed_batch() -> None:
    """Defence behind the quarantine: a larger frame is not cropped silently."""
    from hxn_liveptycho.errors import ConfigurationError
    from hxn_liveptycho.pipeline.preprocess import to_amplitudes

    window = (slice(0, 16), slice(0, 16))
    good = np.ones((32, 32), np.uint32)
    amplitudes, _ = to_amplitudes([good, good], window)
    assert amplitudes.shape == (2, 16, 16)
    with pytest.raises(ConfigurationError, match="differ"):
        to_amplitudes([good, np.ones((40, 32), np.uint32)], window)


def test_stop_after_the_idle_bound_is_counted_not_reopened(tmp_path: Path) -> None:
    with engine_with(tmp_path, run_idle_timeout_s=0.5) as (engine, sinks):
        run = Run(engine)
        run.arm()
        run.frames(range(9))
        run.positions()
        run.end_streams()
        assert engine.wait_idle(timeout=30)
        run.stop()
        assert engine.wait_idle(timeout=30)
        assert run.summary()["status"] == "incomplete"
        assert engine.status()["engine"]["late_stops"] == 1
        assert len(sinks.made) == 1
