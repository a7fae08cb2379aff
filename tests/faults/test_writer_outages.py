"""Issue 23, "a result can be lost while the run says complete" and "after a Tiled outage the
container stays running for ever": the writer never dies, retries while the run is young,
backs up, keeps in memory what the disk refuses, and uploads it all when Tiled returns."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hxn_liveptycho.store.recovery import Recovery, load_backup
from hxn_liveptycho.store.tiled import TiledSink

FRAMES = 20


def _client(server: Any) -> Any:
    """A client with the key in a header (a key in the URL ends up in logs)."""
    from tiled.client import from_uri

    from hxn_liveptycho.store.server import split_api_key

    uri, key = split_api_key(server.uri)
    return from_uri(uri, api_key=key)


class Switch:
    """Tiled 'reachable' as a test sets it; counts the probes."""

    def __init__(self, up: bool) -> None:
        self.up = up
        self.probes = 0

    def __call__(self) -> bool:
        self.probes += 1
        return self.up


def _result(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    obj = (rng.normal(size=(24, 24)) + 1j * rng.normal(size=(24, 24))).astype(np.complex64)
    return {
        "object": obj,
        "probe": np.ones((8, 8), np.complex64),
        "error_history": np.linspace(1, 0.5, 5),
        "positions_m": rng.normal(size=(FRAMES, 2)),
    }


def _run(sink: TiledSink, seed: int = 0, status: str = "complete") -> dict[str, Any]:
    """Frames in, then the final result, as a session hands them over."""
    rng = np.random.default_rng(seed)
    amplitudes = rng.random((FRAMES, 16, 16)).astype(np.float32)
    sink.diffraction(np.arange(FRAMES), amplitudes, rng.normal(size=(FRAMES, 2)))
    result = _result(seed)
    sink.final(result, {"status": status, "reason": "scan finished", "raw_uid": "r"})
    sink.close(timeout=60)
    return result


def _sink(server: Any, tmp_path: Path, name: str, reachable: Any, **kw: Any) -> TiledSink:
    """A sink opened as a session opens it (status 'running')."""
    client = _client(server)
    sink = TiledSink(
        lambda: client,
        catalog_path=f"processed/{name}",
        backup_dir=tmp_path / "backup",
        reachable=reachable,
        diffraction_chunk_frames=8,
        **kw,
    )
    sink.open(None, {"raw_uid": f"{name}-0123456789", "scan_id": 3, "status": "running"})
    return sink


def test_the_final_write_is_tried_again_before_anything_goes_to_the_backup(tiled_server, tmp_path):
    """A short outage (an embedded server being restarted) costs only the wait."""
    switch = Switch(up=True)
    sink = _sink(tiled_server, tmp_path, "retried", switch, retry_s=10.0)
    while sink._container is None:  # the container exists; the outage starts at the end
        time.sleep(0.02)
    switch.up = False
    threading.Timer(1.2, lambda: setattr(switch, "up", True)).start()
    result = _run(sink)
    assert sink.backup_path is None and sink.write_failure is None
    assert sink.counters.get("write_retries") >= 1
    node = _client(tiled_server)["processed"]["retried"][sink.key]
    assert node.metadata["status"] == "complete"
    np.testing.assert_array_equal(node["final"]["object"].read(), result["object"])
    assert not list((tmp_path / "backup").glob("*"))


def test_a_uid_with_a_slash_gets_a_safe_key_and_its_backup_stays_in_the_folder(
    tiled_server, tmp_path
):
    client = _client(tiled_server)
    sink = TiledSink(
        lambda: client,
        catalog_path="processed/slash",
        backup_dir=tmp_path / "backup",
        reachable=lambda: False,
    )
    sink.open(None, {"raw_uid": "ab/../../x", "scan_id": "7/8"})
    assert "/" not in str(sink.key)
    _run(sink)
    assert sink.backup_path is not None
    assert sink.backup_path.parent == tmp_path / "backup"
    assert load_backup(sink.backup_path.with_suffix(".json")).final["object"].shape == (24, 24)


def test_a_backup_folder_that_refuses_keeps_the_result_in_memory_with_both_errors(
    tiled_server, tmp_path
):
    """Tiled down and a file where the backup folder should be: no exception kills the
    writer, the sink says why (both errors) and the recovery holds the arrays."""
    (tmp_path / "backup").write_text("not a folder")
    switch = Switch(up=False)
    client = _client(tiled_server)
    recovery = Recovery(tmp_path / "backup", lambda: client, switch)
    told: list[bool] = []
    sink = _sink(tiled_server, tmp_path, "nodisk", switch, recovery=recovery)
    sink.on_stored_later = lambda: told.append(True)
    result = _run(sink)
    assert sink.backup_path is None
    assert "Tiled is unreachable" in str(sink.write_failure)
    assert "backup to" in str(sink.write_failure) and "failed" in str(sink.write_failure)
    (waiting,) = recovery.pending()
    assert waiting["kept"] == "memory" and waiting["frames_missing"] == FRAMES

    assert recovery.retry()["uploaded"] == []  # Tiled still down: nothing lost either
    switch.up = True
    report = recovery.retry()
    assert report["uploaded"] == [sink.key] and report["pending"] == []
    assert told == [True]
    node = _client(tiled_server)["processed"]["nodisk"][sink.key]
    assert node.metadata["status"] == "complete"
    assert node.metadata["recovered"]["from"] == "memory"
    np.testing.assert_array_equal(node["final"]["object"].read(), result["object"])
    assert node["diffraction"]["indices"].shape == (FRAMES,)
    assert node.metadata["diffraction"]["complete"] is True


def test_when_tiled_returns_the_backup_is_uploaded_and_the_container_leaves_running(
    tiled_server, tmp_path
):
    switch = Switch(up=True)
    client = _client(tiled_server)
    recovery = Recovery(tmp_path / "backup", lambda: client, switch)
    sink = _sink(tiled_server, tmp_path, "outage", switch, recovery=recovery)
    while sink._container is None:
        time.sleep(0.02)
    node = _client(tiled_server)["processed"]["outage"][sink.key]
    switch.up = False  # Tiled goes away before the result
    result = _run(sink, status="aborted")
    assert sink.backup_path is not None
    node.refresh()
    assert node.metadata["status"] == "running"  # what the outage leaves behind

    switch.up = True
    recovery.start()  # the background pass, as LivePtycho and serve run it
    try:
        deadline = time.monotonic() + 30
        while recovery.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        recovery.close()
    assert recovery.pending() == []
    node = _client(tiled_server)["processed"]["outage"][sink.key]
    assert node.metadata["status"] == "aborted"
    assert node.metadata["reason"] == "scan finished"
    assert node.metadata["recovered"]["from"] == "local backup"
    np.testing.assert_array_equal(node["final"]["object"].read(), result["object"])
    assert node["diffraction"]["amplitude"].shape[0] == FRAMES
    uploaded = tmp_path / "backup" / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == [f"{sink.key}.json", f"{sink.key}.npz"]


def test_a_second_upload_after_a_half_done_one_appends_no_frame_twice(tiled_server, tmp_path):
    """The frames of a backup are appended past the rows Tiled already holds."""
    switch = Switch(up=False)
    sink = _sink(tiled_server, tmp_path, "twice", switch)
    _run(sink)
    note = sink.backup_path.with_suffix(".json")
    client = _client(tiled_server)
    backup = load_backup(note)
    from hxn_liveptycho.store.recovery import upload

    upload(backup, client)
    upload(load_backup(note), client)  # as if the first had failed after its appends
    node = client["processed"]["twice"][sink.key]
    assert node["diffraction"]["indices"].read().tolist() == list(range(FRAMES))


def test_an_error_no_step_expected_does_not_kill_the_writer(tiled_server, tmp_path, monkeypatch):
    """Whatever breaks inside the writer, the result goes to the backup and is logged."""
    switch = Switch(up=True)

    def broken(self: TiledSink, *args: Any) -> bool:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(TiledSink, "_retrying", broken)
    sink = _sink(tiled_server, tmp_path, "bug", switch)
    result = _run(sink)
    assert sink.backup_path is not None
    saved = load_backup(sink.backup_path.with_suffix(".json"))
    np.testing.assert_array_equal(saved.final["object"], result["object"])
    assert json.loads(sink.backup_path.with_suffix(".json").read_text())["status"] == "complete"


@pytest.mark.timeout(180)
def test_retry_upload_on_the_command_line_uploads_a_data_dir_s_backups(tmp_path, capsys):
    """For a process that has ended: ``liveptycho retry-upload --data-dir`` starts the
    folder's embedded Tiled, uploads the backups and says what it did, in lines."""
    from hxn_liveptycho.cli import main
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.store.server import TiledConnection

    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    sink = TiledSink(
        lambda: None,
        catalog_path=settings.catalog_path,
        backup_dir=data / "backup",
        reachable=lambda: False,
    )
    sink.open(None, {"raw_uid": "cli-0123456789", "scan_id": 11})
    result = _run(sink)
    assert sink.backup_path is not None

    assert main(["retry-upload", "--data-dir", str(data), "--list"]) == 0
    assert sink.key in capsys.readouterr().out
    assert main(["retry-upload", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"uploaded {sink.key}" in out and "0 still waiting" in out

    tiled = TiledConnection(settings)
    try:
        node = tiled.client()
        for part in [*settings.catalog_path.split("/"), sink.key]:
            if part:
                node = node[part]
        assert node.metadata["status"] == "complete"
        np.testing.assert_array_equal(node["final"]["object"].read(), result["object"])
    finally:
        tiled.close()


def test_a_run_whose_result_no_store_took_is_failed_then_complete_once_uploaded(
    RE, hxn_detectors, tmp_path, tiled_server, monkeypatch
):
    """Through the RunEngine: Tiled unreachable and a file where the backup folder should
    be. The scan succeeds; the run is ``failed`` with both errors, its result held in
    memory; ``retry_uploads()`` once Tiled is back stores it and the run is what its data
    said again."""
    from scans import SMALL, fly, make_live, processed

    from hxn_liveptycho.sim import SimulatedSample
    from hxn_liveptycho.store.server import TiledConnection

    eiger, panda = hxn_detectors
    down = {"now": True}
    reachable = TiledConnection.reachable

    def switchable(self: TiledConnection, timeout: float = 2.0) -> bool:
        return not down["now"] and reachable(self, timeout)

    monkeypatch.setattr(TiledConnection, "reachable", switchable)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "backup").write_text("a file where the backup folder should be")
    live = make_live(RE, eiger, panda, tmp_path, tiled_uri=tiled_server.uri)
    try:
        result = fly(RE, eiger, panda, SimulatedSample(SMALL))
        assert result.exit_status == "success"
        assert live.wait(timeout=120)
        (run,) = live.status()["runs"]
        assert run["status"] == "failed"
        assert "Tiled is unreachable" in run["reason"] and "backup to" in run["reason"]
        assert run["stored_in"].startswith("memory")
        (waiting,) = live.status()["tiled"]["uploads_pending"]
        assert waiting["kept"] == "memory"

        down["now"] = False
        report = live.retry_uploads()  # the background pass may have been first: either way
        assert report["pending"] == [] and not report["errors"]
        assert len(live.tiled.recovery.uploaded) == 1
        (run,) = live.status()["runs"]
        assert run["status"] == "complete", run
        assert "stored in Tiled later" in run["reason"]
        node = processed(live.tiled.client(), result.run_start_uids[0])
        assert node.metadata["status"] == "complete"
        assert node["final"]["object"].shape == tuple(node.metadata["canvas"]["shape"])
        assert node["diffraction"]["indices"].shape == (SMALL.x_num * SMALL.y_num,)
    finally:
        live.close()


def test_an_embedded_server_killed_before_the_scan_is_restarted_and_gets_the_result(
    RE, hxn_detectors, tmp_path
):
    """The embedded Tiled dies: the first probe sees it and restarts it in the background,
    and the run's final write, tried again meanwhile, lands in it: no backup, no long
    wait for a server that will not answer."""
    import os
    import signal

    from scans import SMALL, fly, make_live, processed

    from hxn_liveptycho.sim import SimulatedSample

    eiger, panda = hxn_detectors
    live = make_live(RE, eiger, panda, tmp_path, tiled_retry_s=60.0)
    try:
        live.tiled.client()  # running
        pid = live.tiled.describe()["server"]["pid"]
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        result = fly(RE, eiger, panda, SimulatedSample(SMALL))
        assert result.exit_status == "success"
        assert live.wait(timeout=180)
        waited = time.monotonic() - began
        (run,) = live.status()["runs"]
        assert run["status"] == "complete", run
        assert "backup_path" not in run
        server = live.tiled.describe()["server"]
        assert server["restarts"] >= 1 and server["pid"] != pid
        node = processed(live.tiled.client(), result.run_start_uids[0])
        assert node.metadata["status"] == "complete"
        assert node["diffraction"]["indices"].shape == (SMALL.x_num * SMALL.y_num,)
        assert waited < 120, f"the run waited {waited:.0f} s for its store"
    finally:
        live.close()
