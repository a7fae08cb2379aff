"""Reprocessing an archived run from the queue: ``liveptycho_reprocess`` replays it into a
LivePtycho of its own and a new processed container, linked by raw_uid, lands in Tiled."""

from __future__ import annotations

from pathlib import Path

from scans import processed
from tiled.client import from_uri

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.control.queueserver import LivePtychoControl
from hxn_liveptycho.replay.files import load_archive

ARCHIVE = Path(__file__).resolve().parents[1] / "archives" / "clean-12x12"


def test_reprocess_an_archive_from_the_queue_functions(tiled_server, tmp_path):
    settings = Settings(tiled_uri=tiled_server.uri, data_dir=tmp_path / "data")
    live = LivePtycho(settings)
    control = LivePtychoControl(live)
    try:
        started = control.functions()["liveptycho_reprocess"](str(ARCHIVE), recon={"iterations": 5})
        assert started == {"reprocessing": str(ARCHIVE), "state": "running"}
        assert control.wait_reprocessing(timeout=240)
        (job,) = control.status()["reprocessing"]
        assert job["state"] == "done", job
        raw_uid = load_archive(ARCHIVE).uid
        assert job["raw_uid"] == raw_uid
        node = processed(from_uri(tiled_server.uri), raw_uid)
        assert node.metadata["status"] == "complete"
        assert node.metadata["config"]["recon"]["iterations"] == 5
        assert node["final"]["object"].read().ndim == 2
    finally:
        live.close()


def test_reprocess_of_a_missing_run_is_reported_in_status(tiled_server, tmp_path):
    live = LivePtycho(Settings(tiled_uri=tiled_server.uri, data_dir=tmp_path / "data"))
    control = LivePtychoControl(live)
    try:
        control.reprocess(str(tmp_path / "no-such-archive"))
        assert control.wait_reprocessing(timeout=60)
        (job,) = control.status()["reprocessing"]
        assert job["state"] == "failed"
        assert "no-such-archive" in job["error"]
    finally:
        live.close()
