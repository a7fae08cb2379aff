"""Issue 23, 'Why' bullets not yet reproduced by the rest of the fault suite.

- "Runs with no frames, or no positions, end complete": the engine tests cover a run
  without frames (also through Tiled) and one without positions. Here: a run with
  neither, a run whose frames and positions never pair, a run whose every frame is
  quarantined, and a run without positions through the detectors' wire and a real Tiled.
- "One Eiger frame of another shape fails the whole reconstruction ... A larger frame is
  cropped silently": the engine tests drive ``_on_frame``. Here: odd frames of every
  kind and place, and frames sent over the Eiger stream into a real Tiled (terminal state,
  reason, counters, and every received frame in ``diffraction/`` or counted quarantined),
  also with the beamline's detector crop (``eiger_crop``).
- "Finished runs keep their solver arrays and all their diffraction data": the soak
  checks a complete run's session fields. Here: whatever way a run ends, no frame array
  survives it, its solver ring (shared memory) is unlinked and the solver forgets it;
  through a real Tiled too.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from event_model import compose_run
from scans import processed
from test_lifecycle_states import (
    FRAME,
    OVERRIDES,
    SCAN_MD,
    X_CHANNEL,
    Y_CHANNEL,
    Run,
    Sinks,
    make_engine,
    only_sink,
)
from waiting import wait_for

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.engine import Engine
from hxn_liveptycho.pipeline.inputs import Samples, SeriesStart
from hxn_liveptycho.store.diffraction import read_diffraction
from hxn_liveptycho.store.server import split_api_key
from hxn_liveptycho.streams import EigerFrame, EigerPublisher, PandaPublisher
from hxn_liveptycho.streams.crop import DetectorCrop

pytestmark = pytest.mark.timeout(180)

GRID = np.linspace(-1.0, 1.0, 3)


@contextmanager
def engine_with(tmp_path: Path, **fields: Any) -> Iterator[tuple[Engine, Sinks]]:
    sinks = Sinks()
    engine = make_engine(tmp_path, sinks, **fields)
    try:
        yield engine, sinks
    finally:
        engine.close(timeout=20)


def grid_positions(n: int = 9) -> dict[str, np.ndarray]:
    """The 3 x 3 scan's encoder readings (the channels SCAN_MD's motors map to)."""
    yy, xx = np.meshgrid(GRID, GRID, indexing="ij")
    return {X_CHANNEL: xx.ravel()[:n] * 1e4, Y_CHANNEL: yy.ravel()[:n] * 1e4}


def pixels(index: int, shape: tuple[int, ...] = (FRAME, FRAME), dtype: Any = np.uint32) -> Any:
    return np.random.default_rng(index).poisson(50, size=shape).astype(dtype)


# -- runs with no frames, or no positions ---------------------------------------------------


def test_run_with_neither_frames_nor_positions_is_incomplete(tmp_path: Path) -> None:
    """A scan whose detectors never armed: start, descriptor, stop. Was: 'complete'."""
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "incomplete", summary
        assert summary["reason"].startswith("no detector frames were received"), summary
        assert summary["counters"]["frames_received"] == 0
        sink = only_sink(sinks)
        assert sink.final_metadata["status"] == "incomplete"
        assert sink.final_metadata["reason"] == summary["reason"]
        assert sink.indices == []


def test_run_whose_frames_and_positions_never_pair_is_incomplete(tmp_path: Path) -> None:
    """Frames 0-8 and positions, but numbered from sample 100 (another series' numbering):
    both streams arrived, no frame has a position. Was: 'complete' with a warning."""
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.arm()
        run.frames(range(9))
        engine.put(Samples(grid_positions(), 100))
        run.end_streams()
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "incomplete", summary
        assert "no frame was paired with a position" in summary["reason"], summary
        counters = summary["counters"]
        assert counters["frames_received"] == 9
        assert counters["frames_used"] == 0
        assert counters["frames_without_position"] == 9  # every frame accounted for
        sink = only_sink(sinks)
        assert sink.final_metadata["status"] == "incomplete"
        assert sink.indices == []


def test_run_whose_every_frame_is_quarantined_is_not_complete(tmp_path: Path) -> None:
    """Frames arrive, but none can be used (3-D: every one quarantined)."""
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.arm()
        for i in range(9):
            engine._on_frame(EigerFrame(series=1, frame=i, data=pixels(i, (2, FRAME, FRAME))))
        run.positions()
        run.end_streams()
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "incomplete", summary
        assert "frame shape changed" in summary["reason"], summary
        assert summary["counters"]["frames_received"] == 9
        assert summary["counters"]["frames_quarantined"] == 9
        assert only_sink(sinks).indices == []


# -- odd frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((FRAME + 8, FRAME), np.uint32),  # larger: a crop would have fitted it silently
        ((FRAME, FRAME + 1), np.uint32),
        ((FRAME - 8, FRAME - 8), np.uint32),  # smaller, still larger than the ROI
        ((16, 16), np.uint32),  # smaller than the ROI window
        ((2, FRAME, FRAME), np.uint32),  # two frames in one
        ((FRAME,), np.uint32),
        ((FRAME, FRAME), np.uint16),  # another bit depth
    ],
    ids=["taller", "wider", "smaller", "smaller-than-roi", "3d", "1d", "uint16"],
)
@pytest.mark.parametrize("where", [1, 4, 8], ids=["second", "middle", "last"])
def test_one_odd_frame_anywhere_is_quarantined_and_the_rest_kept(
    tmp_path: Path, shape: tuple[int, ...], dtype: Any, where: int
) -> None:
    with engine_with(tmp_path) as (engine, sinks):
        run = Run(engine)
        run.arm()
        for i in range(9):
            odd = i == where
            data = pixels(i, shape, dtype) if odd else pixels(i)
            engine._on_frame(EigerFrame(series=1, frame=i, data=data))
        run.positions()
        run.end_streams()
        run.stop()
        assert engine.wait_idle(timeout=60)
        summary = run.summary()
        assert summary["status"] == "complete", summary
        counters = summary["counters"]
        assert counters["frames_received"] == 9
        assert counters["frames_quarantined"] == 1
        assert any("1 of 9 frames quarantined" in w for w in summary["warnings"]), summary
        sink = only_sink(sinks)
        assert sorted(sink.indices) == [i for i in range(9) if i != where]
        assert sink.final_metadata["counters"]["frames_quarantined"] == 1


class Wire:
    """LivePtycho listening to a real Eiger (stream v2) and PandA publisher, writing to Tiled:
    frames cross the wire and the receivers as a detector's do."""

    def __init__(self, tmp_path: Path, tiled_uri: str, **fields: Any) -> None:
        self.eiger = EigerPublisher("tcp://127.0.0.1:*", socket_type="pub", flavour="v2")
        self.panda = PandaPublisher("tcp://127.0.0.1:*")
        fields.setdefault("overrides", OVERRIDES)
        settings = Settings(
            eiger_endpoint=self.eiger.endpoint,
            panda_endpoint=self.panda.endpoint,
            tiled_uri=tiled_uri,
            data_dir=tmp_path / "data",
            array_backend="numpy",
            live_interval_s=0.2,
            stream_timeout_s=2.0,
            **fields,
        )
        self.live = LivePtycho(settings)
        try:
            assert self.eiger.wait_for_subscribers(1, timeout=10)
            assert self.panda.wait_for_subscribers(1, timeout=10)
        except BaseException:
            self.close()
            raise
        self.bundle = compose_run(metadata=copy.deepcopy(SCAN_MD))
        self.uid = self.bundle.start_doc["uid"]

    def send_frame(self, index: int, data: np.ndarray) -> None:
        """One image; one of another shape goes out as a detector would send it (the test
        publisher itself refuses it: its series says 64 x 64)."""
        series = self.eiger._series[1]
        if data.shape != series.shape:
            self.eiger._series[1] = dataclasses.replace(series, shape=data.shape)
        try:
            self.eiger.send_frame(1, index, data)
        finally:
            self.eiger._series[1] = series

    def scan(self, frames: Callable[[int], np.ndarray], *, positions: bool = True) -> None:
        self.live("start", self.bundle.start_doc)
        descriptor = self.bundle.compose_descriptor(
            name="primary", data_keys={"x": {"source": "sim", "dtype": "number", "shape": []}}
        )
        self.live("descriptor", descriptor.descriptor_doc)
        self.eiger.start_series(1, shape=(FRAME, FRAME), dtype="uint32")
        self.panda.start()
        for i in range(9):
            self.send_frame(i, frames(i))
        if positions:
            self.panda.send_samples(grid_positions(), frame_number=0)
        self.panda.stop()
        self.eiger.end_series(1)
        # The stop document comes after the detectors' last messages, as at the beamline.
        wait_for(self.streams_ended, timeout=30, what=lambda: str(self.receivers()))
        self.live("stop", self.bundle.compose_stop(exit_status="success"))
        assert self.live.wait(timeout=90)

    def receivers(self) -> dict[str, dict[str, int]]:
        return dict(self.live.status()["receivers"])

    def streams_ended(self) -> bool:
        """Both receivers took their stream's end: the Eiger series' and the PandA's stop."""
        counters = self.receivers().values()
        return any(c.get("series_end", 0) for c in counters) and any(
            c.get("stops", 0) for c in counters
        )

    def run(self) -> dict[str, Any]:
        (run,) = self.live.status()["runs"]
        return dict(run)

    def close(self) -> None:
        self.live.close()
        self.eiger.close(linger=0)
        self.panda.close(linger=0)


@pytest.fixture
def wire_factory(tmp_path: Path, tiled_server: Any) -> Iterator[Callable[..., Wire]]:
    made: list[Wire] = []

    def make(**fields: Any) -> Wire:
        made.append(Wire(tmp_path, tiled_server.uri, **fields))
        return made[-1]

    yield make
    for wire in made:
        wire.close()


def stored(tiled_server: Any, raw_uid: str) -> tuple[dict[str, Any], list[int]]:
    """The run's metadata in Tiled and the frame indices its ``diffraction/`` holds."""
    from tiled.client import from_uri

    uri, key = split_api_key(tiled_server.uri)  # the key in a header: URLs are logged
    node = processed(from_uri(uri, api_key=key), raw_uid)
    metadata = dict(node.metadata)
    if "diffraction" not in node:
        return metadata, []
    return metadata, sorted(int(i) for i in read_diffraction(node).indices)


def test_odd_frames_over_the_wire_are_quarantined_and_every_frame_is_accounted_for_in_tiled(
    wire_factory: Callable[..., Wire], tiled_server: Any
) -> None:
    """One taller and one smaller frame sent by the detector: the run is complete with a
    warning, Tiled's ``diffraction/`` holds the 7 others, the 2 are counted as quarantined.
    Was: the whole reconstruction failed, every frame lost."""
    wire = wire_factory()
    odd = {3: (FRAME + 8, FRAME), 6: (FRAME - 8, FRAME)}
    wire.scan(lambda i: pixels(i, odd.get(i, (FRAME, FRAME))))
    run = wire.run()
    assert run["status"] == "complete", run
    counters = run["counters"]
    assert counters["frames_received"] == 9
    assert counters["frames_quarantined"] == 2
    metadata, indices = stored(tiled_server, wire.uid)
    assert metadata["status"] == "complete"
    assert metadata["reason"] == run["reason"]
    assert any("2 of 9 frames quarantined" in w for w in metadata["warnings"]), metadata
    assert metadata["counters"]["frames_quarantined"] == 2
    assert indices == [0, 1, 2, 4, 5, 7, 8]
    assert len(indices) + metadata["counters"]["frames_quarantined"] == 9


def test_run_without_positions_over_the_wire_is_incomplete_in_tiled(
    wire_factory: Callable[..., Wire], tiled_server: Any
) -> None:
    """The PandA starts and stops but sends no data. Was: 'complete', nothing kept."""
    wire = wire_factory()
    wire.scan(pixels, positions=False)
    run = wire.run()
    assert run["status"] == "incomplete", run
    assert "no encoder positions were received for the 9 frames" in run["reason"]
    metadata, indices = stored(tiled_server, wire.uid)
    assert metadata["status"] == "incomplete"
    assert metadata["reason"] == run["reason"]
    assert metadata["counters"]["frames_received"] == 9
    assert metadata["counters"]["frames_without_position"] == 9
    assert indices == []


#: The beamline's detector window: 48 px around the frame's centre; the run's ROI inside it.
CROP = DetectorCrop(center_y=FRAME / 2, center_x=FRAME / 2, size=48)
CROP_OVERRIDES = {**OVERRIDES, "roi": {"size": 32, "center_y": 24.0, "center_x": 24.0}}


def test_a_larger_frame_is_not_cropped_silently_by_the_detector_crop(
    wire_factory: Callable[..., Wire], tiled_server: Any
) -> None:
    wire = wire_factory(eiger_crop=CROP, overrides=CROP_OVERRIDES)
    wire.scan(lambda i: pixels(i, (FRAME + 8, FRAME + 8) if i == 4 else (FRAME, FRAME)))
    run = wire.run()
    assert run["status"] == "complete", run
    assert run["counters"]["frames_received"] == 9
    assert run["counters"]["frames_quarantined"] == 1, run
    # the detector shapes are compared, not the 48x48 windows the receiver cut
    note = "1 of 9 frames quarantined: 72x72 uint32 instead of the run's 64x64 uint32"
    assert note in run["warnings"], run
    _, indices = stored(tiled_server, wire.uid)
    assert indices == [0, 1, 2, 3, 5, 6, 7, 8]


def test_a_smaller_frame_the_detector_crop_cannot_cut_is_counted_quarantined(
    wire_factory: Callable[..., Wire], tiled_server: Any
) -> None:
    wire = wire_factory(eiger_crop=CROP, overrides=CROP_OVERRIDES)
    wire.scan(lambda i: pixels(i, (40, 40) if i == 4 else (FRAME, FRAME)))
    run = wire.run()
    assert run["status"] == "complete", run
    metadata, indices = stored(tiled_server, wire.uid)
    assert indices == [0, 1, 2, 3, 5, 6, 7, 8]
    counters = metadata["counters"]
    assert counters["frames_received"] == 9, counters
    assert counters["frames_quarantined"] == 1, counters
    assert any("1 of 9 frames quarantined: 40x40 uint32" in w for w in metadata["warnings"])


# -- finished runs return their memory ---------------------------------------------------------


class Tracked:
    """Frames handed to the engine, watched by weak references; the solver rings opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from hxn_liveptycho.recon.frame_ring import FrameRing

        self.frames: list[weakref.ref[np.ndarray]] = []
        self.rings: list[str] = []
        original = FrameRing.__init__

        def init(ring: Any, *args: Any, **kwargs: Any) -> None:
            original(ring, *args, **kwargs)
            self.rings.append(ring.name)

        monkeypatch.setattr(FrameRing, "__init__", init)

    def feed(self, engine: Engine, indices: range, series: int = 1) -> None:
        for i in indices:
            data = pixels(i)
            self.frames.append(weakref.ref(data))
            engine._on_frame(EigerFrame(series=series, frame=i, data=data))
            del data

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.frames)

    def rings_left(self) -> list[str]:
        return [name for name in self.rings if Path("/dev/shm", name.lstrip("/")).exists()]


def assert_released(engine: Engine, tracked: Tracked) -> None:
    deadline = time.monotonic() + 10
    while tracked.alive() and time.monotonic() < deadline:
        time.sleep(0.1)  # the dispatcher and writer threads drop their last references
    assert tracked.alive() == 0, f"{tracked.alive()} of {len(tracked.frames)} frames kept"
    assert tracked.rings, "no solver ring was opened: the run never reached the solver"
    assert tracked.rings_left() == [], "a finished run's solver ring is still allocated"
    assert engine.solver_worker._runs == {}, "the solver still tracks a finished run"
    for session in engine.sessions():
        assert session.finished
        assert session._solver.remote is None and session._assembler is None
        assert session._sink is None and not session._pending_frames


def _complete(engine: Engine, tracked: Tracked) -> None:
    run = Run(engine)
    run.arm()
    tracked.feed(engine, range(9))
    run.positions()
    run.end_streams()
    run.stop()


def _aborted(engine: Engine, tracked: Tracked) -> None:
    run = Run(engine)
    run.arm()
    tracked.feed(engine, range(6))
    run.positions(n=6)
    run.end_streams()
    run.stop(exit_status="abort")


def _stop_lost(engine: Engine, tracked: Tracked) -> None:
    run = Run(engine)
    run.arm()
    tracked.feed(engine, range(9))
    run.positions()
    run.end_streams()  # ... and no stop: the idle bound ends it


def _superseded(engine: Engine, tracked: Tracked) -> None:
    first = Run(engine)
    first.arm()
    tracked.feed(engine, range(5))
    first.positions(n=5)
    second = Run(engine)  # no stop for the first run: the next scan starts
    engine.put(SeriesStart("eiger", {"series": 2}))
    engine.put(SeriesStart("panda", {}))
    tracked.feed(engine, range(9), series=2)
    second.positions()
    second.end_streams()
    second.stop()


def _positions_missing(engine: Engine, tracked: Tracked) -> None:
    run = Run(engine)
    run.arm()
    tracked.feed(engine, range(9))
    run.positions(n=3)  # six frames never pair: they are held until the run ends
    run.end_streams()
    run.stop()


ENDINGS: dict[str, tuple[Callable[[Engine, Tracked], None], set[str]]] = {
    "complete": (_complete, {"complete"}),
    "aborted": (_aborted, {"aborted"}),
    "stop-lost": (_stop_lost, {"incomplete"}),
    "superseded": (_superseded, {"incomplete", "complete"}),
    "positions-missing": (_positions_missing, {"complete"}),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_finished_run_keeps_no_frame_nor_solver_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """Whatever way a run ends, its frames, its unpaired frames and its solver ring go.
    Was: up to 32 finished runs kept their solver arrays and diffraction data."""
    scenario, statuses = ENDINGS[ending]
    tracked = Tracked(monkeypatch)
    with engine_with(tmp_path, run_idle_timeout_s=1.0) as (engine, _sinks):
        scenario(engine, tracked)
        assert engine.wait_idle(timeout=60)
        assert {s.summary()["status"] for s in engine.sessions()} == statuses
        assert_released(engine, tracked)


def test_a_run_written_to_tiled_keeps_no_frame_nor_solver_memory(
    tmp_path: Path, tiled_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real Tiled writer: the run's frames are in ``diffraction/``, not in
    the process any more."""
    tracked = Tracked(monkeypatch)
    settings = Settings(
        tiled_uri=tiled_server.uri,
        data_dir=tmp_path / "data",
        array_backend="numpy",
        live_interval_s=0.2,
        stream_timeout_s=1.0,
        overrides=OVERRIDES,
    )
    live = LivePtycho(settings)
    try:
        run = Run(live.engine)
        run.arm()
        tracked.feed(live.engine, range(9))
        run.positions()
        run.end_streams()
        run.stop()
        assert live.wait(timeout=60)
        assert run.summary()["status"] == "complete"
        metadata, indices = stored(tiled_server, run.uid)
        assert metadata["status"] == "complete"
        assert indices == list(range(9))
        assert_released(live.engine, tracked)
    finally:
        live.close()
