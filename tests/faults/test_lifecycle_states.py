"""A run's life ends in exactly one terminal state, with a reason, whatever its data did.

These drive an :class:`~hxn_liveptycho.pipeline.engine.Engine` directly (documents through
``submit``, detector and PandA messages through the engine's own stream queue, as the
receivers put them) with a recording sink, so each fault is reproduced exactly and in
a second or two; the real RunEngine/Tiled paths are covered by the end-to-end tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from event_model import compose_run

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.engine import Engine
from hxn_liveptycho.pipeline.inputs import Samples, SeriesEnd, SeriesStart
from hxn_liveptycho.streams import EigerFrame

pytestmark = pytest.mark.timeout(120)

X_CHANNEL = "/INENC2.VAL.Value"
Y_CHANNEL = "/INENC3.VAL.Value"
FRAME = 64
#: 3 x 3 points over 2 µm; energy and distance from the start document.
SCAN_MD: dict[str, Any] = {
    "plan_name": "fly2dpd",
    "ptychography": True,
    "motors": ["zpssx", "zpssy"],
    "scan": {
        "type": "2D_FLY_PANDA",
        "scan_input": [-1.0, 1.0, 3, -1.0, 1.0, 3, 0.01],
        "detector_distance": 2.0,
        "detectors": ["eiger2"],
        "energy": 12.0,
        "dwell": 0.01,
    },
}
OVERRIDES: dict[str, Any] = {
    "roi": {"size": 32, "center_y": FRAME / 2, "center_x": FRAME / 2},
    "recon": {"iterations": 2},
    "encoder": {"upsample": 1},
}


class RecordingSink:
    """Keeps what a TiledSink would write: open/final metadata and every diffraction row."""

    def __init__(self) -> None:
        self.opened: dict[str, Any] | None = None
        self.final_metadata: dict[str, Any] | None = None
        self.final_snapshot: dict[str, Any] | None = None
        self.indices: list[int] = []
        self.closed = False
        self.lives = 0

    def open(self, config: Any, metadata: Mapping[str, Any]) -> None:
        self.opened = dict(metadata)

    def live(self, snapshot: Mapping[str, Any]) -> None:
        self.lives += 1

    def nn(self, snapshot: Mapping[str, Any]) -> None:
        pass

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None:
        assert len(indices) == len(amplitudes) == len(positions_m)
        self.indices.extend(int(i) for i in indices)

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        self.final_snapshot = dict(snapshot)
        self.final_metadata = dict(metadata)

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class Sinks:
    """The sink factory: one RecordingSink per run, in order."""

    def __init__(self) -> None:
        self.made: list[RecordingSink] = []
        self._lock = threading.Lock()

    def __call__(self) -> RecordingSink:
        sink = RecordingSink()
        with self._lock:
            self.made.append(sink)
        return sink


def make_engine(tmp_path: Path, sinks: Sinks, **fields: Any) -> Engine:
    fields.setdefault("stream_timeout_s", 1.0)
    fields.setdefault("overrides", OVERRIDES)
    settings = Settings(
        data_dir=tmp_path / "data", array_backend="numpy", live_interval_s=0.2, **fields
    )
    return Engine(settings, sink_factory=sinks)


@pytest.fixture
def sinks() -> Sinks:
    return Sinks()


@pytest.fixture
def engine(tmp_path: Path, sinks: Sinks) -> Iterator[Engine]:
    eng = make_engine(tmp_path, sinks)
    yield eng
    eng.close(timeout=20)


def frame(value: int = 50, shape: tuple[int, int] = (FRAME, FRAME), dtype: Any = np.uint32) -> Any:
    rng = np.random.default_rng(value)
    return rng.poisson(value, size=shape).astype(dtype)


class Run:
    """One scan's documents and streams, fed to an engine as the live path would."""

    def __init__(self, engine: Engine, md: Mapping[str, Any] | None = None) -> None:
        self.engine = engine
        self.bundle = compose_run(metadata=dict(md or SCAN_MD))
        self.uid = self.bundle.start_doc["uid"]
        self.stop_doc: Any = None
        engine.submit("start", self.bundle.start_doc)
        primary = self.bundle.compose_descriptor(
            name="primary",
            data_keys={"eiger2_image": {"source": "eiger", "dtype": "array", "shape": [64, 64]}},
        )
        engine.submit("descriptor", primary.descriptor_doc)

    def arm(self, eiger: bool = True, panda: bool = True) -> None:
        if eiger:
            self.engine.put(SeriesStart("eiger", {"series": 1}))
        if panda:
            self.engine.put(SeriesStart("panda", {}))

    def frames(self, indices: range, **kw: Any) -> None:
        for i in indices:
            self.engine._on_frame(EigerFrame(series=1, frame=i, data=frame(50 + i, **kw)))

    def positions(self, n: int = 9, first: int = 0) -> None:
        grid = np.linspace(-1.0, 1.0, 3)
        yy, xx = np.meshgrid(grid, grid, indexing="ij")
        x = xx.ravel()[first : first + n] * 1e4
        y = yy.ravel()[first : first + n] * 1e4
        self.engine.put(Samples({X_CHANNEL: x, Y_CHANNEL: y}, first))

    def end_streams(self) -> None:
        self.engine.put(SeriesEnd("eiger"))
        self.engine.put(SeriesEnd("panda"))

    def stop(self, exit_status: str = "success") -> None:
        """Send the stop document (the same one again when called twice)."""
        if self.stop_doc is None:
            self.stop_doc = self.bundle.compose_stop(exit_status=exit_status)
        self.engine.submit("stop", self.stop_doc)

    def whole(self) -> None:
        """A scan where everything arrives."""
        self.arm()
        self.frames(range(9))
        self.positions()
        self.end_streams()
        self.stop()

    def summary(self) -> dict[str, Any]:
        session = self.engine.session(self.uid)
        assert session is not None
        return session.summary()


def only_sink(sinks: Sinks) -> RecordingSink:
    assert len(sinks.made) == 1, sinks.made
    sink = sinks.made[0]
    assert sink.closed and sink.final_metadata is not None
    return sink


def test_whole_run_is_complete_with_a_reason(engine: Engine, sinks: Sinks) -> None:
    run = Run(engine)
    run.whole()
    assert engine.wait_idle(timeout=60)
    summary = run.summary()
    assert summary["status"] == "complete", summary
    assert summary["reason"]
    assert "warnings" not in summary
    sink = only_sink(sinks)
    assert sink.final_metadata["status"] == "complete"
    assert sink.final_metadata["reason"] == summary["reason"]
    assert sorted(sink.indices) == list(range(9))


def test_run_without_frames_is_incomplete(engine: Engine, sinks: Sinks) -> None:
    """Was: 'complete' with only a log warning and nothing kept."""
    run = Run(engine)
    run.arm(eiger=False)
    run.positions()
    run.end_streams()
    run.stop()
    assert engine.wait_idle(timeout=60)
    summary = run.summary()
    assert summary["status"] == "incomplete", summary
    assert "no detector frames were received" in summary["reason"]
    sink = only_sink(sinks)
    assert sink.final_metadata["status"] == "incomplete"
    assert sink.final_metadata["reason"] == summary["reason"]


def test_run_without_positions_is_incomplete(engine: Engine, sinks: Sinks) -> None:
    """Was: 'complete' with a warning about unpaired frames; the frames are counted."""
    run = Run(engine)
    run.arm(panda=False)
    run.frames(range(9))
    run.end_streams()
    run.stop()
    assert engine.wait_idle(timeout=60)
    summary = run.summary()
    assert summary["status"] == "incomplete", summary
    assert "no encoder positions" in summary["reason"]
    assert summary["counters"]["frames_received"] == 9
    assert summary["counters"]["frames_without_position"] == 9
    sink = only_sink(sinks)
    assert sink.final_metadata["status"] == "incomplete"
    assert sink.final_metadata["counters"]["frames_without_position"] == 9


def test_missing_positions_complete_with_warnings(engine: Engine, sinks: Sinks) -> None:
    """Two frames never pair: the run is still complete, and says so in its warnings."""
    run = Run(engine)
    run.arm()
    run.frames(range(9))
    run.positions(n=7)
    run.end_streams()
    run.stop()
    assert engine.wait_idle(timeout=60)
    summary = run.summary()
    assert summary["status"] == "complete", summary
    assert any("2 frames_without_position" in w for w in summary["warnings"]), summary
    sink = only_sink(sinks)
    assert sink.final_metadata["warnings"] == summary["warnings"]
    assert sorted(sink.indices) == list(range(7))


def test_aborted_scan_says_why(engine: Engine, sinks: Sinks) -> None:
    run = Run(engine)
    run.arm()
    run.frames(range(4))
    run.positions(n=4)
    run.end_streams()
    run.stop(exit_status="abort")
    assert engine.wait_idle(timeout=60)
    summary = run.summary()
    assert summary["status"] == "aborted"
    assert "'abort'" in summary["reason"]
    assert only_sink(sinks).final_metadata["status"] == "aborted"


def test_non_ptychography_run_by_plan_name_is_skipped(engine: Engine, sinks: Sinks) -> None:
    """An XRF-only fly2dpd (no Eiger, no distance): skipped with one line, no container."""
    md = {k: v for k, v in SCAN_MD.items() if k != "ptychography"}
    md["scan"] = {"type": "2D_FLY_PANDA", "scan_input": [-1.0, 1.0, 3, -1.0, 1.0, 3, 0.01]}
    run = Run(engine, md)
    run.stop()
    assert engine.wait_idle(timeout=60)
    summary = run.summary()
    assert summary["status"] == "skipped", summary
    assert "not a ptychography run" in summary["reason"]
    assert "error" not in summary
    assert sinks.made == []
