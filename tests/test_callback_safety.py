"""The RunEngine comes first: whatever fails inside LivePtycho, scans finish and nothing raises."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from event_model import compose_run

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings

pytestmark = pytest.mark.timeout(90)

#: Start metadata that configures a run fully (geometry, distance, detector, energy) on `stop`.
HXN_SCAN_MD: dict[str, Any] = {
    "ptychography": True,
    "motors": ["zpssx", "zpssy"],
    "scan": {
        "type": "2D_FLY_PANDA",
        "scan_input": [-1.0, 1.0, 3, -1.0, 1.0, 3, 0.01],
        "detector_distance": 2.0,
        "detectors": ["eiger2"],
        "energy": 12.0,
    },
}


@pytest.fixture
def det() -> Any:
    from ophyd.sim import det

    return det


class EvilSinkFactory:
    """A sink factory that raises on every call, like a Tiled that is down or misconfigured."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.calls += 1
        raise RuntimeError("evil sink: no result store")


class EvilSink:
    """A sink whose every method raises (open, live, final, close)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _boom(self, name: str) -> None:
        self.calls.append(name)
        raise RuntimeError(f"evil sink: {name} failed")

    def open(self, config: Any, metadata: Any) -> None:
        self._boom("open")

    def live(self, snapshot: Any) -> None:
        self._boom("live")

    def diffraction(self, indices: Any, amplitudes: Any, positions_m: Any) -> None:
        self._boom("diffraction")

    def final(self, snapshot: Any, metadata: Any) -> None:
        self._boom("final")

    def close(self, timeout: float | None = None) -> None:
        self._boom("close")


def settings_for(tmp_path: Path, tiled_uri: str = "http://127.0.0.1:9/") -> Settings:
    """No detector streams; a Tiled URI that the test's sink factory may never use."""
    return Settings(tiled_uri=tiled_uri, data_dir=tmp_path, stream_timeout_s=1.0, tiled_retry_s=1.0)


class Recorder:
    """Collects (name, doc) pairs the RunEngine emits, to compare with what LivePtycho saw."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, doc))


def test_evil_sink_factory_does_not_abort_the_scan(
    RE: Any, det: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink factory that raises: the scan succeeds, the run is 'failed' in status, and logged."""
    from bluesky.plans import count

    evil = EvilSinkFactory()
    live = LivePtycho(settings_for(tmp_path), sink_factory=evil)
    try:
        RE.subscribe(live)
        with caplog.at_level(logging.INFO, logger="hxn_liveptycho"):
            result = RE(count([det], num=5, md=HXN_SCAN_MD))
            assert result.exit_status == "success"
            assert live.wait(timeout=30)
        (run,) = live.status()["runs"]
        assert run["uid"] == result.run_start_uids[0]
        assert run["status"] == "failed"
        assert "evil sink" in run["error"]
        assert evil.calls >= 1
        assert live.counters.get("callback_errors") == 0
        assert live.status()["engine"]["runs_started"] == 1
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert failures, "the sink failure was not logged"
        assert any("evil sink" in str(r.exc_info[1]) for r in failures if r.exc_info)
    finally:
        live.close()


def _join_session_threads(timeout: float = 10.0) -> None:
    """Wait for per-run session threads to exit (wait() returns when their work is done)."""
    for thread in threading.enumerate():
        if thread.name.startswith("liveptycho-") and thread.name != "liveptycho-engine":
            thread.join(timeout)


@pytest.fixture
def thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """Uncaught exceptions of background threads during the test, recorded instead of printed."""
    caught: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", caught.append)
    return caught


def _scan_with_raising_sink(RE: Any, det: Any, tmp_path: Path) -> tuple[Any, dict[str, Any], list]:
    from bluesky.plans import count

    sinks: list[EvilSink] = []

    def factory() -> EvilSink:
        sinks.append(EvilSink())
        return sinks[-1]

    live = LivePtycho(settings_for(tmp_path), sink_factory=factory)
    try:
        RE.subscribe(live)
        result = RE(count([det], num=3, md=HXN_SCAN_MD))
        assert live.wait(timeout=30)
        _join_session_threads()
        return result, live.status(), sinks
    finally:
        live.close()


def test_sink_whose_every_method_raises_does_not_abort_the_scan(
    RE: Any,
    det: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    thread_exceptions: list[threading.ExceptHookArgs],
) -> None:
    """open/live/final/close all raise: the scan succeeds and the run is 'failed' in status."""
    with caplog.at_level(logging.INFO, logger="hxn_liveptycho"):
        result, status, sinks = _scan_with_raising_sink(RE, det, tmp_path)
    assert result.exit_status == "success"
    (run,) = status["runs"]
    assert run["status"] == "failed"
    assert "evil sink: open failed" in run["error"]
    assert sinks and sinks[0].calls[0] == "open"
    assert any(r.levelno >= logging.ERROR for r in caplog.records)


def test_sink_close_that_raises_does_not_escape_the_session_thread(
    RE: Any,
    det: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    thread_exceptions: list[threading.ExceptHookArgs],
) -> None:
    """Every failure of a sink is logged by the session, none escapes its thread."""
    with caplog.at_level(logging.CRITICAL, logger="hxn_liveptycho"):
        _scan_with_raising_sink(RE, det, tmp_path)
    assert [f"{e.thread.name}: {e.exc_value!r}" for e in thread_exceptions if e.thread] == []


def test_submit_that_raises_is_caught_counted_and_logged(
    RE: Any, det: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """engine.submit raising on every document: the scan succeeds, each failure is counted."""
    from bluesky.plans import count

    live = LivePtycho(settings_for(tmp_path), sink_factory=EvilSinkFactory())

    def broken_submit(name: str, doc: Any) -> None:
        raise RuntimeError(f"engine unavailable for {name}")

    live.engine.submit = broken_submit  # type: ignore[method-assign]
    recorder = Recorder()
    try:
        RE.subscribe(recorder)
        RE.subscribe(live)
        with caplog.at_level(logging.ERROR, logger="hxn_liveptycho.callback"):
            result = RE(count([det], num=4, md={"ptychography": True}))
        assert result.exit_status == "success"
        n_docs = len(recorder.docs)
        names = [name for name, _ in recorder.docs]
        assert names == ["start", "descriptor", *["event"] * 4, "stop"]
        assert live.counters.get("callback_errors") == n_docs
        assert live.status()["callback"]["callback_errors"] == n_docs
        assert live.status()["engine"]["documents"] == 0
        messages = [r.getMessage() for r in caplog.records]
        assert "LivePtycho could not take the 'start' document" in messages
        assert "LivePtycho could not take the 'stop' document" in messages
        assert all(r.exc_info is not None for r in caplog.records)
    finally:
        live.close()


def test_scan_after_a_failed_one_still_runs(
    RE: Any, det: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The RunEngine keeps working after LivePtycho failed inside a previous scan."""
    from bluesky.plans import count

    evil = EvilSinkFactory()
    live = LivePtycho(settings_for(tmp_path), sink_factory=evil)
    try:
        RE.subscribe(live)
        with caplog.at_level(logging.CRITICAL, logger="hxn_liveptycho"):
            first = RE(count([det], num=2, md=HXN_SCAN_MD))
            second = RE(count([det], num=2, md=HXN_SCAN_MD))
            assert live.wait(timeout=30)
        assert (first.exit_status, second.exit_status) == ("success", "success")
        assert [r["status"] for r in live.status()["runs"]] == ["failed", "failed"]
        assert evil.calls >= 2
    finally:
        live.close()


def test_run_that_is_not_ptychography_is_skipped_with_one_log_line(
    RE: Any, det: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain `count` is skipped: one INFO line names the plan and the flag; no sink is made."""
    from bluesky.plans import count

    evil = EvilSinkFactory()
    live = LivePtycho(settings_for(tmp_path), sink_factory=evil)
    try:
        RE.subscribe(live)
        with caplog.at_level(logging.INFO, logger="hxn_liveptycho"):
            result = RE(count([det], num=3))
            assert result.exit_status == "success"
            assert live.wait(timeout=30)
        skipped = [r for r in caplog.records if "not reconstructed" in r.getMessage()]
        assert len(skipped) == 1
        line = skipped[0].getMessage()
        assert "'count'" in line
        assert "'ptychography'" in line
        assert result.run_start_uids[0][:8] in line
        assert live.status()["engine"]["runs_skipped"] == 1
        assert live.status()["runs"] == []
        (skip,) = live.status()["skipped"]  # the reason, where status pages look
        assert skip["uid"] == result.run_start_uids[0] and skip["status"] == "skipped"
        assert "'count'" in skip["reason"] and skip["plan_name"] == "count"
        assert evil.calls == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        live.close()


def test_unconfigurable_run_is_recorded_as_failed_in_tiled(
    RE: Any, det: Any, tmp_path: Path, tiled_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Forced in but lacking geometry: the scan succeeds and Tiled holds a 'failed' container."""
    from bluesky.plans import count
    from tiled.client import from_uri
    from tiled.queries import Eq

    live = LivePtycho(settings_for(tmp_path, tiled_server.uri))
    try:
        RE.subscribe(live)
        with caplog.at_level(logging.CRITICAL, logger="hxn_liveptycho"):
            result = RE(count([det], num=2, md={"ptychography": True}))
            assert result.exit_status == "success"
            assert live.wait(timeout=60)
        raw_uid = result.run_start_uids[0]
        (run,) = live.status()["runs"]
        assert run["status"] == "failed"
        assert "scan.detector_distance" in run["error"]
        catalog = from_uri(tiled_server.uri)["processed"]["liveptycho"]
        found = catalog.search(Eq("raw_uid", raw_uid))
        assert len(found) == 1
        metadata = found.values().first().metadata
        assert metadata["status"] == "failed"
        assert "scan.detector_distance" in metadata["error"]
        assert "dcm_th" in metadata["error"]
    finally:
        live.close()


def test_malformed_documents_never_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unknown descriptors, unknown runs, a start without uid, junk: no exception escapes."""
    evil = EvilSinkFactory()
    live = LivePtycho(settings_for(tmp_path), sink_factory=evil)
    try:
        orphan = compose_run(metadata={"plan_name": "fly2dpd"})
        primary = orphan.compose_descriptor(
            name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}}
        )
        page = primary.compose_event_page(data={"x": [1.0]}, timestamps={"x": [0.0]}, seq_num=[1])
        event = primary.compose_event(data={"x": 2.0}, timestamps={"x": 0.0})
        no_uid = dict(compose_run(metadata={"plan_name": "count"}).start_doc)
        del no_uid["uid"]
        malformed: list[tuple[str, Any]] = [
            ("event_page", page),  # its descriptor was never seen
            ("event", event),
            ("descriptor", primary.descriptor_doc),  # its start was never seen
            ("stop", orphan.compose_stop()),  # a stop for an unknown run
            ("start", no_uid),
            ("start", {}),
            ("event_page", {}),
            ("stop", {"run_start": None}),
            ("descriptor", {"uid": 3}),
            ("no_such_document", {"uid": "x"}),
            ("stop", None),
            ("event_page", "not a document"),
        ]
        with caplog.at_level(logging.CRITICAL, logger="hxn_liveptycho"):
            for name, doc in malformed:
                assert live(name, doc) is None
            live.engine.wait_idle(timeout=0.5)  # False: the uid-less start left a session open
        # the engine's dispatcher survived all of it and still routes a real run
        good = compose_run(metadata={"plan_name": "count"})
        live("start", good.start_doc)
        live("stop", good.compose_stop())
        deadline = threading.Event()
        for _ in range(50):
            if live.status()["engine"]["runs_skipped"] >= 1:
                break
            deadline.wait(0.1)
        assert live.status()["engine"]["runs_skipped"] >= 1
        assert live.status()["callback"]["documents"] >= 2
    finally:
        live.close(timeout=10)


def test_final_write_that_tiled_accepted_is_not_reported_as_refused(
    RE: Any, det: Any, tmp_path: Path, tiled_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed run's metadata-only container, written fine, leaves no backup and no ERROR."""
    from bluesky.plans import count

    live = LivePtycho(settings_for(tmp_path, tiled_server.uri))
    try:
        RE.subscribe(live)
        with caplog.at_level(logging.ERROR, logger="hxn_liveptycho.store"):
            RE(count([det], num=1, md={"ptychography": True}))
            assert live.wait(timeout=60)
    finally:
        live.close()
    assert list((tmp_path / "backup").glob("*.npz")) == []
    store_errors = [r for r in caplog.records if r.name.startswith("hxn_liveptycho.store")]
    assert [r.getMessage() for r in store_errors] == []
