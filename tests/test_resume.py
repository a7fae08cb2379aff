"""Resume after a restart: `liveptycho serve` killed mid-scan (SIGKILL) and started again
takes its run up from the checkpoint, or ends it `incomplete` with the checkpoint's state."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from scans import fly
from serve_helpers import ServeProcess

from hxn_liveptycho.demo import final_object_error
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.store.checkpoint import Checkpoint, CheckpointStore

BEAMLINE = SimulatedBeamline(x_num=12, y_num=12, photons_per_frame=2e5)
HALF = BEAMLINE.x_num * BEAMLINE.y_num // 2
#: Every live snapshot is checkpointed, so the kill finds one of the frames before the hold.
FIRST_ENV = {"LIVEPTYCHO_CHECKPOINT_INTERVAL_S": "0"}
#: The resumed run's object, half from the checkpoint and half from the frames after the
#: restart, against the phantom (the metric of test_end_to_end).
MAX_RESUMED_OBJECT_ERROR = 0.25
#: With the frames stored before the restart read back, every point is in the final passes
#: (from a checkpoint taken early, with the disc guess for a probe).
MAX_READ_BACK_OBJECT_ERROR = 0.22


def _checkpoint(store: CheckpointStore) -> Checkpoint:
    rng = np.random.default_rng(1)
    start = {"uid": str(uuid.uuid4()), "time": time.time(), "scan_id": 7, "plan_name": "fly2dpd"}
    descriptor = {"uid": str(uuid.uuid4()), "run_start": start["uid"], "name": "primary"}
    return Checkpoint(
        uid=start["uid"],
        documents=[("start", start), ("descriptor", descriptor)],
        overrides={"recon": {"iterations": 5}},
        settings_hash="abc",
        iteration=12,
        object=(rng.normal(size=(40, 50)) + 1j).astype(np.complex64),
        probe=rng.normal(size=(2, 16, 16)).astype(np.complex64),
        positions_px=rng.uniform(0, 20, (9, 2)),
        error_history=np.linspace(1, 0.1, 12),
        frames_used=9,
        window=(10, 26, 12, 28),
        streams_open={"eiger": True, "panda": False},
        container_path="processed/liveptycho/scan7-x",
    )


def test_a_checkpoint_is_saved_loaded_listed_and_removed_by_run_uid(tmp_path):
    """The store's API by run uid round-trips every field, atomically (no temporary left)."""
    store = CheckpointStore.in_data_dir(tmp_path)
    saved = _checkpoint(store)
    path = store.save(saved)
    assert path.parent == tmp_path / "checkpoints"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary is gone
    assert store.uids() == [saved.uid]
    loaded = store.load(saved.uid)
    np.testing.assert_array_equal(loaded.object, saved.object)
    np.testing.assert_array_equal(loaded.probe, saved.probe)
    np.testing.assert_array_equal(loaded.positions_px, saved.positions_px)
    np.testing.assert_allclose(loaded.error_history, saved.error_history)
    assert loaded.documents == saved.documents and loaded.start["scan_id"] == 7
    assert (loaded.iteration, loaded.frames_used, loaded.window) == (12, 9, (10, 26, 12, 28))
    assert loaded.streams_open == {"eiger": True, "panda": False}
    assert loaded.container_path == saved.container_path and loaded.stop is None
    assert store.remove(saved.uid) and not store.remove(saved.uid)
    assert store.uids() == []
    with pytest.raises(FileNotFoundError):
        store.load(saved.uid)


def test_a_corrupt_checkpoint_is_reported_in_one_line_and_set_aside(tmp_path, caplog):
    """A truncated file is one error line, moved to corrupt/; the good one still loads."""
    store = CheckpointStore.in_data_dir(tmp_path)
    good = _checkpoint(store)
    path = store.save(good)
    broken = path.with_name("broken-run.npz")
    broken.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.ERROR, logger="hxn_liveptycho.store.checkpoint"):
        found = store.load_all()
    assert [c.uid for c in found] == [good.uid]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "broken-run.npz" in lines[0] and "skipped" in lines[0]
    assert not broken.exists() and (store.directory / "corrupt" / broken.name).exists()
    caplog.clear()
    assert [c.uid for c in store.load_all()] == [good.uid] and not caplog.records  # once only


# ---- the real thing: a serve process killed and started again --------------------------
@pytest.fixture
def first(tmp_path: Path, tiled_server: Any, hxn_detectors: Any) -> Iterator[ServeProcess]:
    eiger, panda = hxn_detectors
    process = ServeProcess(
        tmp_path, tiled_server.uri, eiger, panda, name="serve-first", env=FIRST_ENV
    )
    try:
        process.wait_ready(eiger, panda)
        yield process
    finally:
        process.close()


@pytest.fixture
def publisher(first: ServeProcess, RE: Any) -> Iterator[Publisher]:
    pub = Publisher(first.proxy_in)
    first.connect(pub)
    RE.subscribe(pub)
    yield pub
    pub._socket.setsockopt(zmq.LINGER, 0)
    pub.close()


class _KillAndRestart(threading.Thread):
    """Once the first serve holds a checkpoint of every frame before the detectors' hold,
    SIGKILLs it, starts a second serve on the same addresses and folder, and lets the
    detectors go on: at once (``release_at_once``) or only once the second serve has
    ended the run. Always releases them in the end, so the scan never hangs."""

    def __init__(
        self,
        first: ServeProcess,
        publisher: Publisher,
        detectors: tuple[Any, Any],
        tmp_path: Path,
        tiled_uri: str,
        *,
        release_at_once: bool,
        env: dict[str, str],
        min_iteration: int,
        before_restart: Any = None,
    ) -> None:
        super().__init__(name="liveptycho-test-kill-restart", daemon=True)
        self.first, self.publisher, self.detectors = first, publisher, detectors
        self.tmp_path, self.tiled_uri = tmp_path, tiled_uri
        self.release_at_once, self.env, self.before_restart = release_at_once, env, before_restart
        self.min_iteration = min_iteration
        self.store = CheckpointStore.in_data_dir(first.data_dir)
        self.second: ServeProcess | None = None
        self.checkpoint: Checkpoint | None = None
        self.finished_run: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._kill_when_checkpointed()
            self._start_second()
            if not self.release_at_once:
                assert self.second is not None and self.checkpoint is not None
                self.finished_run = self.second.wait_finished(self.checkpoint.uid, timeout=60)
        except BaseException as exc:
            self.error = exc
        finally:
            for device in self.detectors:
                device.release()

    def _kill_when_checkpointed(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = [r for r in self.first.status()["runs"] if r["status"] == "running"]
            if running and running[0]["counters"]["frames_used"] >= HALF:
                uid = running[0]["uid"]
                try:
                    seen = self.store.load(uid)
                except (FileNotFoundError, ValueError):
                    seen = None  # not yet written (or being replaced)
                if (
                    seen is not None
                    and seen.frames_used >= HALF
                    and seen.iteration >= self.min_iteration
                ):
                    self.first.process.kill()
                    self.first.process.wait(30)
                    self.checkpoint = self.store.load(uid)  # the last one written
                    return
            time.sleep(0.1)
        raise AssertionError(f"no checkpoint of the held scan:\n{self.first.log()}")

    def _start_second(self) -> None:
        if self.before_restart is not None:
            self.before_restart(self.store)
        eiger, panda = self.detectors
        self.second = ServeProcess(
            self.tmp_path,
            self.tiled_uri,
            eiger,
            panda,
            proxy_in=self.first.proxy_in,
            documents=self.first.documents,
            data_dir=self.first.data_dir,
            name="serve-second",
            env=self.env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.second.process.poll() is None, self.second.log()
            try:
                if self.second.http.get("/api/health").status_code == 200:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        if not self.release_at_once:
            return
        # The RunEngine's Publisher reconnects to the new proxy by itself; a stray stop of
        # no run (never a start: that would end the resumed run) shows when it has.
        while time.monotonic() < deadline:
            self.publisher("stop", {"uid": str(uuid.uuid4()), "run_start": "ping", "time": 0})
            time.sleep(0.2)
            if self.second.status()["documents"]["counters"]["documents"] > 0:
                return
        raise AssertionError(f"no document reached the second serve:\n{self.second.log()}")


def _containers(uri: str, raw_uid: str) -> list[Any]:
    from tiled.client import from_uri
    from tiled.queries import Eq

    found = from_uri(uri)["processed"]["liveptycho"].search(Eq("raw_uid", raw_uid))
    return list(found.values())


def _scan_through_a_restart(
    first: ServeProcess,
    publisher: Any,
    RE: Any,
    detectors: Any,
    tmp_path: Path,
    tiled: Any,
    **kw: Any,
) -> tuple[_KillAndRestart, Any]:
    sample = SimulatedSample(BEAMLINE)
    restart = _KillAndRestart(first, publisher, detectors, tmp_path, tiled.uri, **kw)
    restart.start()
    eiger, panda = detectors
    try:
        result = fly(RE, eiger, panda, sample, dwell=0.03, hold_before=HALF)
    finally:
        restart.join(90)
    assert result.exit_status == "success"  # the RunEngine never noticed
    if restart.error is not None:
        raise restart.error
    assert restart.second is not None and restart.checkpoint is not None
    assert restart.checkpoint.uid == result.run_start_uids[0]
    return restart, sample


@pytest.mark.slow  # two serve processes and a CPU reconstruction: about a minute on 2 cores
def test_serve_killed_mid_scan_resumes_the_run_from_its_checkpoint(
    first, publisher, RE, hxn_detectors, tmp_path, tiled_server
):
    """SIGKILL after a checkpoint, restart: the run goes on from the checkpoint's state with
    the frames still arriving and ends complete, its object close to the phantom; the
    container the dead process left is marked incomplete; no checkpoint is left."""
    restart, sample = _scan_through_a_restart(
        first,
        publisher,
        RE,
        hxn_detectors,
        tmp_path,
        tiled_server,
        release_at_once=True,
        env={"LIVEPTYCHO_RESUME_TIMEOUT_S": "30"},
        min_iteration=10,
    )
    second, checkpoint = restart.second, restart.checkpoint
    assert second is not None and checkpoint is not None
    try:
        run = second.wait_finished(checkpoint.uid, timeout=60)
        assert run["status"] == "complete", second.log()
        assert run["counters"]["frames_used"] == BEAMLINE.x_num * BEAMLINE.y_num - HALF
        assert any("resumed after a restart" in w for w in run["warnings"])
        assert second.status()["serve"]["documents_of_unknown_runs"] == 1  # the ping only
        nodes = {n.metadata["status"]: n for n in _containers(tiled_server.uri, checkpoint.uid)}
        deadline = time.monotonic() + 20  # the old container is marked in the background
        while "running" in nodes and time.monotonic() < deadline:
            time.sleep(0.3)
            nodes = {n.metadata["status"]: n for n in _containers(tiled_server.uri, checkpoint.uid)}
        assert set(nodes) == {"complete", "incomplete"}, second.log()
        resumed = nodes["complete"].metadata["resumed"]
        assert resumed["from_iteration"] == checkpoint.iteration and resumed["state_restored"]
        assert resumed["frames_before_restart"] == checkpoint.frames_used >= HALF
        assert resumed["previous_container"] == checkpoint.container_path
        assert nodes["complete"].metadata["iteration"] > checkpoint.iteration
        assert "resumed from its checkpoint" in nodes["incomplete"].metadata["reason"]
        assert nodes["incomplete"].uri.endswith(checkpoint.container_path)
        error, *_ = final_object_error(sample, nodes["complete"])
        assert error <= MAX_RESUMED_OBJECT_ERROR, f"object error {error:.3f}"
        assert CheckpointStore.in_data_dir(second.data_dir).uids() == []
    finally:
        second.close()


@pytest.mark.slow  # two serve processes: tens of seconds on 2 cores
def test_serve_restarted_after_its_run_stopped_taking_data_ends_it_incomplete(
    first, publisher, RE, hxn_detectors, tmp_path, tiled_server
):
    """No more data within resume_timeout_s of the restart: the run ends incomplete with
    the checkpoint's object and probe as its result, the checkpoint removed; a corrupt
    checkpoint beside it is reported in one line and set aside."""

    def corrupt(store: CheckpointStore) -> None:
        (store.directory / "not-a-run.npz").write_bytes(b"PK\x03\x04 half a file")

    restart, _ = _scan_through_a_restart(
        first,
        publisher,
        RE,
        hxn_detectors,
        tmp_path,
        tiled_server,
        release_at_once=False,
        env={"LIVEPTYCHO_RESUME_TIMEOUT_S": "2"},
        min_iteration=3,
        before_restart=corrupt,
    )
    second, checkpoint, run = restart.second, restart.checkpoint, restart.finished_run
    assert second is not None and checkpoint is not None and run is not None
    try:
        assert run["status"] == "incomplete", second.log()
        assert run["counters"].get("frames_read_back", 0) == 0  # no whole chunk was stored
        assert "serve restarted mid-run" in run["reason"] and "within 2 s" in run["reason"]
        node = next(
            n for n in _containers(tiled_server.uri, checkpoint.uid) if "resumed" in n.metadata
        )
        assert node.metadata["status"] == "incomplete"
        np.testing.assert_array_equal(node["final"]["object"].read(), checkpoint.object)
        np.testing.assert_array_equal(node["final"]["probe"].read(), checkpoint.probe[0])
        assert node["final"]["positions_m"].read().shape == checkpoint.positions_px.shape
        store = CheckpointStore.in_data_dir(second.data_dir)
        assert store.uids() == []
        assert (store.directory / "corrupt" / "not-a-run.npz").exists()
        skipped = [line for line in second.log().splitlines() if "checkpoint skipped" in line]
        assert len(skipped) == 1 and "not-a-run.npz" in skipped[0]
    finally:
        second.close()


def test_the_frames_a_dead_run_stored_are_read_back_from_its_container(tmp_path, tiled_server):
    """stored_frames reads the diffraction/ rows a run's sink appended before it stopped."""
    from tiled.client import from_uri

    from hxn_liveptycho.store.left_behind import stored_frames
    from hxn_liveptycho.store.tiled import TiledSink

    client = from_uri(tiled_server.uri)
    sink = TiledSink(
        lambda: client,
        catalog_path="processed/liveptycho",
        backup_dir=tmp_path / "backup",
        diffraction_chunk_frames=4,
    )
    raw_uid = str(uuid.uuid4())
    sink.open(None, {"raw_uid": raw_uid, "scan_id": 9, "status": "running"})
    rng = np.random.default_rng(3)
    amplitudes = rng.uniform(0, 30, (10, 16, 16)).astype(np.float32)
    positions = rng.uniform(0, 1e-6, (10, 2))
    try:
        for i in range(10):
            sink.diffraction(np.array([i]), amplitudes[i : i + 1], positions[i : i + 1])
        deadline = time.monotonic() + 20
        while sink.diffraction_rows_stored < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.container_path is not None
        read = stored_frames(client, sink.container_path)
        assert read is not None and len(read.indices) == 8  # two whole chunks; 2 in memory
        np.testing.assert_array_equal(read.indices, np.arange(8))
        np.testing.assert_allclose(read.amplitude, amplitudes[:8], rtol=1e-3, atol=0.02)
        np.testing.assert_allclose(read.positions_m, positions[:8])
        assert stored_frames(client, "processed/liveptycho/no-such-run") is None
        assert stored_frames(client, None) is None
    finally:
        sink.close(timeout=30)


@pytest.mark.slow  # two LivePtycho engines and a CPU reconstruction of the whole scan
def test_a_resumed_run_iterates_again_on_the_frames_stored_before_the_restart(
    RE, hxn_detectors, tmp_path, tiled_server
):
    """A run taken up again reads its stored frames back: with the frames after the restart
    every point of the scan is in its final passes, positions and diffraction/."""
    from tiled.client import from_uri

    from hxn_liveptycho.callback import LivePtycho
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.store.left_behind import stored_frames
    from hxn_liveptycho.store.tiled import TiledSink

    eiger, panda = hxn_detectors
    client = from_uri(tiled_server.uri)

    def sink() -> TiledSink:  # small chunks: the frames before the restart are in Tiled
        return TiledSink(
            lambda: client,
            catalog_path="processed/liveptycho",
            backup_dir=tmp_path / "backup",
            diffraction_chunk_frames=8,
        )

    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        data_dir=tmp_path / "data",
        live_interval_s=0.3,
        checkpoint_interval_s=0,
        # The disc guess opens the solver with the first frames (an estimate may wait for
        # more than the held scan's half): this test is about what comes after.
        overrides={"recon": {"iterations": 10}, "probe": {"initial": "guess"}},
    )
    store = CheckpointStore.in_data_dir(settings.data_dir)
    first = LivePtycho(settings, sink_factory=sink)
    token = RE.subscribe(first)
    second: list[LivePtycho] = []
    saved: dict[str, Any] = {}

    def take_over() -> None:
        """Once the first engine has a checkpoint of every frame before the hold: keep it,
        close that engine, put the checkpoint back and let a second engine resume it."""
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runs = [s for s in first.engine.sessions() if not s.finished]
                uids = store.uids()
                if runs and uids:
                    with contextlib.suppress(FileNotFoundError, ValueError):
                        seen = store.load(uids[0])
                        if seen.frames_used >= HALF and seen.iteration >= 3:
                            saved["bytes"] = store.path(seen.uid).read_bytes()
                            saved["checkpoint"] = seen
                            break
                time.sleep(0.1)
            else:
                raise AssertionError(f"no checkpoint of the held scan: {first.status()['runs']}")
            RE.unsubscribe(token)
            first.close()
            store.path(saved["checkpoint"].uid).write_bytes(saved["bytes"])
            live = LivePtycho(settings, sink_factory=sink)
            second.append(live)
            RE.subscribe(live)
            live.engine.resume_checkpoints(
                lambda cp: lambda: stored_frames(client, cp.container_path)
            )
            # The new receivers subscribe (0MQ's slow joiner; the held publishers answer no
            # question about their subscribers until they go on).
            time.sleep(1.0)
        except BaseException as exc:
            saved["error"] = exc
        finally:
            eiger.release()
            panda.release()

    assert eiger.publisher.wait_for_subscribers(1, timeout=10)
    assert panda.publisher.wait_for_subscribers(1, timeout=10)
    controller = threading.Thread(target=take_over, name="liveptycho-test-take-over")
    controller.start()
    sample = SimulatedSample(BEAMLINE)
    try:
        try:
            result = fly(RE, eiger, panda, sample, dwell=0.03, hold_before=HALF)
        finally:
            controller.join(90)
            if "error" in saved:
                raise saved["error"]
        assert second and second[0].wait(timeout=120)
        run = second[0].status()["runs"][-1]
        checkpoint = saved["checkpoint"]
        assert run["uid"] == result.run_start_uids[0] == checkpoint.uid
        assert run["status"] == "complete", run
        assert run["counters"]["frames_read_back"] == HALF
        assert run["counters"]["frames_used"] == BEAMLINE.x_num * BEAMLINE.y_num
        node = next(
            n for n in _containers(tiled_server.uri, checkpoint.uid) if "resumed" in n.metadata
        )
        assert node.metadata["resumed"]["frames_read_back"] == HALF
        positions = node["final"]["positions_m"].read()
        assert positions.shape == (BEAMLINE.x_num * BEAMLINE.y_num, 2)
        stored = node["diffraction"]["indices"].read()
        assert sorted(stored) == list(range(BEAMLINE.x_num * BEAMLINE.y_num))
        error, *_ = final_object_error(sample, node)
        assert error <= MAX_READ_BACK_OBJECT_ERROR, f"object error {error:.3f}"
        assert store.uids() == []
    finally:
        controller.join(30)
        first.close()
        for live in second:
            live.close()


class _KeepingSink:
    """A result sink that keeps what a run wrote (the ResultSink protocol, no Tiled)."""

    def __init__(self) -> None:
        self.on_stored_later = None
        self.container_path = f"processed/liveptycho/kept-{uuid.uuid4().hex[:6]}"
        self.opened: dict[str, Any] = {}
        self.live_snapshots: list[dict[str, Any]] = []
        self.finals: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def open(self, config: Any, metadata: Any) -> None:
        self.opened = dict(metadata)

    def live(self, snapshot: Any) -> None:
        self.live_snapshots.append(dict(snapshot))

    def diffraction(self, indices: Any, amplitudes: Any, positions_m: Any) -> None:
        pass

    def nn(self, snapshot: Any) -> None:
        pass

    def final(self, snapshot: Any, metadata: Any) -> None:
        self.finals.append((dict(snapshot), dict(metadata)))

    def close(self, timeout: float | None = None) -> None:
        pass


def _hxn_run_checkpoint(settings_hash: str | None) -> Checkpoint:
    """A checkpoint of an HXN fly scan's documents (event-model's compose_run), its state
    on the canvas those documents configure; ``settings_hash`` None: the run's own."""
    from event_model import compose_run
    from scans import THETA_12KEV_DEG, hxn_start_md

    from hxn_liveptycho.config.scan import scan_config_from_documents
    from hxn_liveptycho.pipeline.geometry import CanvasGeometry
    from hxn_liveptycho.store.checkpoint import config_hash

    number = {"dtype": "number", "shape": []}
    bundle = compose_run(metadata=hxn_start_md())
    keys = ("eiger2_image", "inenc2_val", "inenc3_val")
    primary = bundle.compose_descriptor(
        name="primary", data_keys={k: {"source": f"SIM:{k}", **number} for k in keys}
    ).descriptor_doc
    base = bundle.compose_descriptor(
        name="baseline", data_keys={"dcm_th": {"source": "SIM:dcm_th", **number}}
    )
    page = base.compose_event_page(
        data={"dcm_th": [THETA_12KEV_DEG]}, timestamps={"dcm_th": [0.0]}, seq_num=[1]
    )
    config = scan_config_from_documents(
        bundle.start_doc,
        descriptors=[primary, base.descriptor_doc],
        baseline={"dcm_th": THETA_12KEV_DEG},
        overrides={},
    )
    geometry = CanvasGeometry.from_scan(config)
    rng = np.random.default_rng(5)
    shape, n = geometry.canvas_shape, geometry.window
    return Checkpoint(
        uid=bundle.start_doc["uid"],
        documents=[
            ("start", dict(bundle.start_doc)),
            ("descriptor", dict(primary)),
            ("descriptor", dict(base.descriptor_doc)),
            ("event_page", dict(page)),
        ],
        overrides={},
        settings_hash=settings_hash or config_hash(config.model_dump(mode="json")),
        iteration=17,
        object=np.exp(1j * rng.uniform(-1, 1, shape)).astype(np.complex64),
        probe=(rng.normal(size=(1, n, n)) + 1j).astype(np.complex64),
        positions_px=rng.uniform(0, 30, (12, 2)),
        error_history=np.linspace(0.5, 0.05, 17),
        frames_used=12,
        frames_received=12,
        streams_open={"eiger": True, "panda": True},
        container_path="processed/liveptycho/left-behind",
    )


def test_an_engine_resumes_checkpoints_and_ends_them_incomplete_without_more_data(tmp_path):
    """In one process, no Tiled: the engine takes up every checkpoint under data_dir; no data
    come, so each run ends incomplete with its checkpoint's object and probe, its solver
    state restored only when the run is configured as it was; the files are removed."""
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.pipeline.engine import Engine

    settings = Settings(data_dir=tmp_path, resume_timeout_s=0.5, array_backend="numpy")
    store = CheckpointStore.in_data_dir(tmp_path)
    same, changed = _hxn_run_checkpoint(None), _hxn_run_checkpoint("another-configuration")
    store.save(same)
    store.save(changed)
    sinks: list[_KeepingSink] = []

    def sink() -> _KeepingSink:
        sinks.append(_KeepingSink())
        return sinks[-1]

    engine = Engine(settings, sink_factory=sink)
    try:
        resumed = engine.resume_checkpoints()
        assert {c.uid for c in resumed} == {same.uid, changed.uid}
        assert engine.wait_idle(60)
        assert engine.status()["engine"]["runs_resumed"] == 2
        for checkpoint, restored in ((same, True), (changed, False)):
            session = engine.session(checkpoint.uid)
            assert session is not None and session.status == "incomplete"
            assert session.reason is not None and "within 0.5 s" in session.reason
            (kept,) = [s for s in sinks if s.opened.get("raw_uid") == checkpoint.uid]
            assert kept.live_snapshots, "the checkpoint's picture is written at once"
            ((snapshot, metadata),) = kept.finals
            np.testing.assert_array_equal(snapshot["object"], checkpoint.object)
            np.testing.assert_array_equal(snapshot["probe"], checkpoint.probe[0])
            assert snapshot["positions_m"].shape == (12, 2)
            assert metadata["status"] == "incomplete" and metadata["iteration"] == 17
            assert metadata["resumed"]["from_iteration"] == 17
            assert metadata["resumed"]["state_restored"] is restored
            assert metadata["resumed"]["previous_container"] == "processed/liveptycho/left-behind"
        assert store.uids() == []
    finally:
        engine.close()
