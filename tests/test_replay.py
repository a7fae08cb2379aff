"""Replay: recorded runs (Tiled or file archives) back through the live path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from scans import SMALL, fly, make_live, processed

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.demo import final_object_error
from hxn_liveptycho.replay import ReplayError, StreamPublishers, load_archive, replay_run
from hxn_liveptycho.replay.tiled_source import load_tiled_run
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.store.diffraction import read_diffraction

ARCHIVES = Path(__file__).resolve().parents[1] / "archives"
CLEAN = ARCHIVES / "clean-12x12"
FAULTY = ARCHIVES / "faulty-12x12"
#: Replayed and live reconstructions of the same recorded scan: their object errors against
#: the phantom (metrics.object_error, as in test_end_to_end) may differ by at most this much.
#: The data (diffraction and positions) must be identical; only the interleaving of arrivals
#: and iterations differs between a live scan and a replay at full speed.
OBJECT_ERROR_TOLERANCE = 0.05
#: Iterations after the scan for the live and replayed runs compared: how many ran during the
#: scan depends on how arrivals and iterations interleave, so both runs must go on to near
#: convergence for their errors to be comparable (after 10 they stood at 0.25-0.31 and once
#: differed by 0.057).
CONVERGED = {"recon": {"iterations": 40}}
TINY = SimulatedBeamline(x_num=4, y_num=4)


def _replay_target(tmp_path: Path, tiled_uri: str, **fields: Any) -> tuple[Any, LivePtycho]:
    """Bound replay sockets and a fresh LivePtycho listening to them, results in ``replayed``."""
    publishers = StreamPublishers()
    fields.setdefault("overrides", {"recon": {"iterations": 10}})
    live = LivePtycho(
        Settings(
            eiger_endpoint=publishers.eiger_endpoint,
            panda_endpoint=publishers.panda_endpoint,
            tiled_uri=tiled_uri,
            data_dir=tmp_path / "replayed",
            catalog_path="processed/replayed",
            live_interval_s=0.5,
            **fields,
        )
    )
    return publishers, live


def test_recorded_scan_replays_into_the_same_reconstruction(
    RE, hxn_detectors, tmp_path, tiled_server
):
    """TiledWriter records a live scan; its replay gives the same data and object, same raw_uid."""
    from bluesky_tiled_plugins import TiledWriter
    from tiled.client import from_uri

    eiger, panda = hxn_detectors
    sample = SimulatedSample(SMALL)
    client = from_uri(tiled_server.uri)
    live = make_live(RE, eiger, panda, tmp_path, tiled_uri=tiled_server.uri, overrides=CONVERGED)
    RE.subscribe(TiledWriter(client))
    try:
        uid = fly(RE, eiger, panda, sample, record_frames=True).run_start_uids[0]
        assert live.wait(timeout=120)
    finally:
        live.close()
    original = processed(client, uid)
    assert original.metadata["status"] == "complete"

    publishers, replayed_live = _replay_target(tmp_path, tiled_server.uri, overrides=CONVERGED)
    try:
        # The fixture's plain SimpleTiledServer exports no json-seq, as many servers don't:
        # the documents are rebuilt from the run's nodes.
        report = replay_run(
            uid, callback=replayed_live, publishers=publishers, client=client, pace="fast"
        )
        assert replayed_live.wait(timeout=120)
    finally:
        replayed_live.close()
        publishers.close()
    assert report.uid == uid
    assert report.frames == report.positions == sample.num_points
    assert report.missing_frames == []
    replayed = processed(client, uid, "processed/replayed")
    assert replayed.metadata["raw_uid"] == uid
    assert replayed.metadata["status"] == "complete"
    # Stored in arrival order, which a replay need not repeat: compared in scan order.
    replayed_data, original_data = read_diffraction(replayed), read_diffraction(original)
    np.testing.assert_array_equal(replayed_data.indices, original_data.indices)
    np.testing.assert_array_equal(replayed_data.amplitude, original_data.amplitude)
    np.testing.assert_allclose(
        replayed_data.positions_m, original_data.positions_m, rtol=0, atol=1e-12
    )
    live_error, *_ = final_object_error(sample, original)
    replay_error, *_ = final_object_error(sample, replayed)
    assert abs(replay_error - live_error) <= OBJECT_ERROR_TOLERANCE, (live_error, replay_error)


def test_embedded_server_exports_documents_and_scan_id_picks_the_newest(
    RE, hxn_detectors, tmp_path
):
    """The project's embedded Tiled serves json-seq; both ways of reading a run agree."""
    from bluesky_tiled_plugins import TiledWriter
    from tiled.client import from_uri

    from hxn_liveptycho.sim import SimHXNFlyer, baseline_motors, fly2dpd
    from hxn_liveptycho.store.server import EmbeddedTiledServer

    eiger, panda = hxn_detectors
    sample = SimulatedSample(TINY)
    with EmbeddedTiledServer(tmp_path / "tiled") as server:
        client = from_uri(server.uri)
        RE.subscribe(TiledWriter(client))
        uids = []
        for _ in range(2):  # two runs with scan_id 7: a lookup by scan_id takes the newest
            flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.001, record_frames=True)
            plan = fly2dpd(flyer, baseline=baseline_motors(12.0), md={"scan_id": 7})
            uids.append(RE(plan).run_start_uids[0])
        names = [name for name, _ in client[uids[-1]].documents()]
        assert names[0] == "start" and names[-1] == "stop" and "descriptor" in names
        exported = load_tiled_run(client, 7, documents="export")
        rebuilt = load_tiled_run(client, uids[-1], documents="streams")
        assert exported.uid == rebuilt.uid == uids[-1]
        np.testing.assert_array_equal(exported.positions, rebuilt.positions)
        np.testing.assert_array_equal(exported.frames.read(3, 5), rebuilt.frames.read(3, 5))
        assert exported.frames.read(3, 5).shape == (2, *TINY.detector_shape)
        assert exported.detector == rebuilt.detector
        assert exported.detector.beam_center_y == TINY.beam_center[0]
        for run in (exported, rebuilt):
            run.validate()
            descriptor = next(d for n, d in run.documents if n == "descriptor" and "uid" in d)
            assert all("eiger2_image" not in d.get("data", {}) for _, d in run.documents)
            assert descriptor is not None
        with pytest.raises(ReplayError, match="no run with scan_id 8"):
            load_tiled_run(client, 8)


def test_faulty_archive_replays_with_its_faults_counted(tmp_path, tiled_server):
    """Missing frames and settling rows are reported, and the reconstruction still completes."""
    settings = Settings(
        tiled_uri=tiled_server.uri,
        data_dir=tmp_path / "data",
        catalog_path="processed/replay-faulty",
        overrides={"recon": {"iterations": 3}},
        live_interval_s=1.0,
    )
    report = replay_run(FAULTY, settings=settings, pace="fast", encoding="raw", flavour="v2")
    assert report.missing_frames == [5, 37, 38, 90]
    assert report.positions_outside_scan > 0
    assert report.frames == 140 and report.positions == 144
    assert report.result is not None and report.result["status"] == "complete"
    assert report.result["counters"]["frames_used"] == 140
    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), report.uid, "processed/replay-faulty")
    assert node.metadata["status"] == "complete"
    assert node.metadata["counters"]["positions_without_frame"] == 4
    assert node["final"]["object"].read().ndim == 2


def test_dry_run_validates_and_tells_what_would_go(capsys):
    """A dry run reads nothing but the archive and reports what a replay would send."""
    from hxn_liveptycho.cli import main

    report = replay_run(FAULTY, dry_run=True, skip_frames=24, max_frames=100)
    assert report.dry_run and report.seconds == 0.0
    assert report.positions == 100 and report.skipped_positions == 24
    assert report.capped_positions == 20
    assert report.frames == 97  # 37, 38 and 90 were never delivered
    assert report.missing_frames == [37, 38, 90]
    assert report.positions_outside_scan == 0  # the settling rows are skipped
    assert report.documents == {"start": 1, "descriptor": 2, "event": 146, "stop": 1}
    assert main(["replay", str(CLEAN), "--dry-run", "--encoding", "raw"]) == 0
    out = capsys.readouterr().out
    assert "would send: 144 frames [128, 128] uint32 as Eiger v1 raw" in out


def test_skipping_whole_settling_rows_moves_the_commanded_grid():
    """Dropped rows leave the start document's grid aligned with the positions that remain."""
    from hxn_liveptycho.replay.publish import select
    from hxn_liveptycho.replay.runner import _adjusted

    with load_archive(FAULTY) as run:
        scan_input = run.start["scan"]["scan_input"]
        selection = select(run, skip_frames=24, max_frames=None)
        start = _adjusted(run, selection)[0][1]
    step = (scan_input[4] - scan_input[3]) / (scan_input[5] - 1)
    assert start["scan"]["scan_input"][3] == pytest.approx(scan_input[3] + 2 * step)
    assert start["scan"]["scan_input"][4] == pytest.approx(scan_input[4])
    assert start["scan"]["scan_input"][5] == 10
    assert start["num_points"] == 120
    assert start["replay"] == {"skipped_positions": 24, "capped_positions": 0}


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "archive"
    shutil.copytree(CLEAN, target)
    return target


def _rewrite_documents(folder: Path, keep: Any) -> None:
    path = folder / "documents.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines if keep(e)))


def _drop_primary(folder: Path) -> None:
    _rewrite_documents(folder, lambda e: e["doc"].get("name") != "primary")


def _drop_encoders(folder: Path) -> None:
    path = folder / "documents.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for entry in lines:
        entry["doc"].get("data_keys", {}).pop("inenc3_val", None)
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))


def _extra_frames(folder: Path) -> None:
    with h5py.File(folder / "frames.h5", "a") as file:
        frames = file["/entry/data/data"][()]
        del file["/entry/data/data"], file["/entry/data/frame_number"]
        file["/entry/data/data"] = np.concatenate([frames, frames[:3]])


def _frame_numbers_disagree(folder: Path) -> None:
    with h5py.File(folder / "frames.h5", "a") as file:
        del file["/entry/data/frame_number"]
        file["/entry/data/frame_number"] = np.arange(100)


def _truncated(folder: Path) -> None:
    path = folder / "frames.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _no_stop(folder: Path) -> None:
    _rewrite_documents(folder, lambda e: e["name"] != "stop")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_primary, "no stream holds detector frames"),
        (_drop_encoders, r"lacks the encoder positions \['inenc3_val'\]"),
        (_extra_frames, "147 frames but only 144 positions"),
        (_frame_numbers_disagree, "144 stored frames but 100 frame numbers"),
        (_truncated, "frames file|frames cannot be read"),
        (_no_stop, "no stop document"),
    ],
)
def test_bad_archives_fail_before_anything_is_published(tmp_path, damage, message):
    """Each broken archive gets a clear error and not one document or frame goes out."""
    folder = _copy(tmp_path)
    damage(folder)
    sent: list[tuple[str, dict]] = []
    with StreamPublishers() as publishers, pytest.raises(ReplayError, match=message):
        replay_run(
            folder,
            callback=lambda name, doc: sent.append((name, doc)),
            publishers=publishers,
            pace="fast",
        )
    assert sent == []


def test_a_wrong_source_or_option_is_refused_up_front():
    """A path that is no archive, or an unknown option, fails before anything starts."""
    from pydantic import ValidationError

    with pytest.raises(ReplayError, match="not a replay archive"):
        replay_run(ARCHIVES / "no-such-archive", dry_run=True)
    with pytest.raises(ValidationError, match="pase"):
        replay_run(CLEAN, dry_run=True, pase="fast")
    with pytest.raises(ReplayError, match="unknown encoding"):
        replay_run(CLEAN, dry_run=True, encoding="zstd")


def test_documents_go_to_a_serve_proxy_through_bluesky_publisher():
    """With a 0MQ Publisher as target, the documents arrive in order beside the two streams."""
    import pickle
    import time

    import zmq
    from bluesky.callbacks.zmq import Publisher

    context = zmq.Context.instance()
    proxy_in = context.socket(zmq.SUB)  # stands in for the proxy's input that serve reads
    proxy_in.setsockopt(zmq.SUBSCRIBE, b"")
    port = proxy_in.bind_to_random_port("tcp://127.0.0.1")
    publisher = Publisher(f"127.0.0.1:{port}", prefix=b"hxn")
    streams = StreamPublishers(flavour="v2", encoding="bs32-lz4<")
    receivers = []
    try:
        for endpoint in (streams.eiger_endpoint, streams.panda_endpoint):
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.connect(endpoint)
            receivers.append(sub)
        # The Publisher's PUB joins asynchronously and drops until then: probe until one lands.
        deadline = time.monotonic() + 10
        while not proxy_in.poll(100) and time.monotonic() < deadline:
            publisher("probe", {})
        while proxy_in.poll(200):
            proxy_in.recv()
        report = replay_run(CLEAN, callback=publisher, publishers=streams, pace="rate", rate_hz=500)
        names = []
        while proxy_in.poll(1000):
            prefix, name, payload = proxy_in.recv().split(b" ", 2)
            assert prefix == b"hxn"
            names.append((name.decode(), pickle.loads(payload)))
        eiger_messages = 0
        while receivers[0].poll(300):
            receivers[0].recv_multipart()
            eiger_messages += 1
    finally:
        publisher.close()
        streams.close()
        for sock in (proxy_in, *receivers):
            sock.close(linger=0)
    assert names[0][0] == "start" and names[-1][0] == "stop"
    assert names[0][1]["uid"] == report.uid
    assert len(names) == sum(report.documents.values())
    assert eiger_messages == report.frames + 2  # start, 144 images, end
    assert report.frames_per_second is not None and report.frames_per_second <= 520


def test_frames_are_read_a_chunk_at_a_time_while_publishing():
    """No read is larger than chunk_frames, so a large scan starts sending after one chunk."""
    import zmq

    reads: list[tuple[int, int]] = []
    run = load_archive(CLEAN)
    original = run.frames

    class Counting:
        shape = original.shape
        dtype = original.dtype

        def read(self, start: int, stop: int) -> np.ndarray:
            reads.append((start, stop))
            return original.read(start, stop)

    run.frames = Counting()
    context = zmq.Context.instance()
    with StreamPublishers(encoding="raw") as streams:
        subs = []
        for endpoint in (streams.eiger_endpoint, streams.panda_endpoint):
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoint)
            subs.append(sub)
        try:
            report = replay_run(
                run,
                callback=lambda name, doc: None,
                publishers=streams,
                chunk_frames=16,
                pace="fast",
            )
        finally:
            for sub in subs:
                sub.close(linger=0)
    assert report.frames == 144
    publishing_reads = reads[2:]  # the first two are validation's first and last frame
    assert reads[:2] == [(0, 1), (143, 144)]
    assert max(stop - start for start, stop in publishing_reads) == 16
    assert publishing_reads[0] == (0, 16) and publishing_reads[-1] == (128, 144)
