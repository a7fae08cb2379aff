"""diffraction/ is appended while a run goes on; no frame is lost to a slow or absent Tiled."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hxn_liveptycho.store import diffraction as stored
from hxn_liveptycho.store.diffraction import read_diffraction
from hxn_liveptycho.store.tiled import TiledSink

FRAMES = 50
CHUNK = 8


def _run_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Frames, positions, and the batches (of scan indices) they arrive in, out of order."""
    rng = np.random.default_rng(seed)
    amplitudes = (rng.random((FRAMES, 16, 16), dtype=np.float32) * 300).astype(np.float32)
    positions = rng.random((FRAMES, 2)) * 1e-5
    arrival = rng.permutation(FRAMES)
    cuts = np.sort(rng.choice(np.arange(1, FRAMES), size=12, replace=False))
    return amplitudes, positions, arrival, np.split(arrival, cuts)


def _sink(
    server: Any, tmp_path: Path, name: str, reachable: Callable[[], bool] = lambda: True
) -> tuple[TiledSink, Any]:
    from tiled.client import from_uri

    client = from_uri(server.uri)
    sink = TiledSink(
        lambda: client,
        catalog_path=f"processed/{name}",
        backup_dir=tmp_path / "backup",
        reachable=reachable,
        diffraction_chunk_frames=CHUNK,
    )
    sink.open(None, {"raw_uid": f"{name}-0123456789", "scan_id": 5})
    return sink, client


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _writer_waiting(sink: TiledSink) -> bool:
    """Whether the writer thread is parked on its condition with nothing it may do: it has
    seen every frame and flag handed to it so far (a notify takes it off the waiters until
    it has looked again, under the same lock) and found no work it is allowed to do."""
    with sink._cond:
        return bool(sink._cond._waiters)  # type: ignore[attr-defined]


def _feed(sink: TiledSink, batches: list[np.ndarray], amplitudes, positions) -> list[float]:
    durations = []
    for batch in batches:
        began = time.perf_counter()
        sink.diffraction(batch, amplitudes[batch], positions[batch])
        durations.append(time.perf_counter() - began)
    return durations


def _close_to_float16(stored_amplitudes: np.ndarray, measured: np.ndarray) -> None:
    np.testing.assert_allclose(stored_amplitudes, measured, rtol=2.0**-11, atol=0)


def test_frames_are_appended_while_running_and_the_final_write_holds_the_rest(
    tiled_server, tmp_path
):
    """Whole chunks are readable before final(); final() adds only the last partial chunk."""
    amplitudes, positions, arrival, batches = _run_data()
    sink, client = _sink(tiled_server, tmp_path, "appended")
    _feed(sink, batches, amplitudes, positions)
    whole = (FRAMES // CHUNK) * CHUNK
    assert _until(lambda: sink.diffraction_rows_stored == whole)
    node = client["processed"]["appended"][sink.key]
    assert node["diffraction"]["amplitude"].shape == (whole, 16, 16)  # before any final()
    assert node["diffraction"].metadata["complete"] is False

    sink.final({"object": np.ones((32, 32), np.complex64)}, {"status": "complete"})
    sink.close(30)
    assert sink.backup_path is None
    counters = sink.counters.snapshot()
    assert counters["diffraction_appended"] == whole
    assert counters["diffraction_in_final"] == FRAMES - whole
    assert counters["write_errors"] == 0

    node = client["processed"]["appended"][sink.key]
    group = node["diffraction"]
    assert group["amplitude"].dtype == np.float16
    assert group.metadata["order"] == "arrival"
    assert group.metadata["frames"] == FRAMES and group.metadata["complete"] is True
    assert node.metadata["diffraction"] == {
        "frames": FRAMES,
        "stored": FRAMES,
        "complete": True,
        "order": "arrival",
        "appended_while_running": whole,
    }
    as_stored = read_diffraction(node, order="stored")
    np.testing.assert_array_equal(as_stored.indices, arrival)
    in_scan_order = read_diffraction(node)
    np.testing.assert_array_equal(in_scan_order.indices, np.arange(FRAMES))
    _close_to_float16(in_scan_order.amplitude, amplitudes)
    np.testing.assert_array_equal(in_scan_order.positions_m, positions)


def test_diffraction_never_waits_for_a_slow_tiled(tiled_server, tmp_path):
    """The session thread hands frames over in microseconds while every write takes long.

    Four scans' worth of batches (200 frames, 25 whole chunks queued behind the blocked
    writer): twenty, as before, proved the same at 20 s more of appending at the end."""
    repeats = 4
    amplitudes, positions, _, batches = _run_data(1)
    release = threading.Event()

    def slow() -> bool:
        release.wait(5.0)
        return True

    sink, client = _sink(tiled_server, tmp_path, "slow", reachable=slow)
    durations = _feed(sink, batches * repeats, amplitudes, positions)
    assert max(durations) < 0.05, max(durations)
    release.set()
    sink.final({}, {"status": "complete"})
    sink.close(60)
    stored_indices = read_diffraction(client["processed"]["slow"][sink.key]).indices
    assert stored_indices.shape == (FRAMES * repeats,)


def test_frames_queued_through_an_outage_are_written_with_the_final_result(tiled_server, tmp_path):
    """Tiled down for the whole scan, back at the end: every frame lands, none twice."""
    amplitudes, positions, _, batches = _run_data(2)
    up = threading.Event()
    sink, client = _sink(tiled_server, tmp_path, "outage", reachable=up.is_set)
    _feed(sink, batches, amplitudes, positions)
    # The writer has tried Tiled for the due chunks, been refused, and gone back to wait.
    assert _until(lambda: sink.counters.get("write_errors") >= 2 and _writer_waiting(sink))
    assert sink.diffraction_rows_stored == 0
    up.set()
    sink.final({"object": np.ones((8, 8), np.complex64)}, {"status": "complete"})
    sink.close(30)
    assert sink.backup_path is None
    data = read_diffraction(client["processed"]["outage"][sink.key])
    np.testing.assert_array_equal(data.indices, np.arange(FRAMES))
    _close_to_float16(data.amplitude, amplitudes)


def test_tiled_down_at_the_end_keeps_the_unwritten_frames_in_the_backup(tiled_server, tmp_path):
    """Frames appended before the outage stay in Tiled; the rest go to the .npz; none lost."""
    amplitudes, positions, _, batches = _run_data(3)
    up = threading.Event()
    up.set()
    sink, client = _sink(tiled_server, tmp_path, "backup", reachable=up.is_set)
    _feed(sink, batches, amplitudes, positions)
    whole = (FRAMES // CHUNK) * CHUNK
    assert _until(lambda: sink.diffraction_rows_stored == whole)
    up.clear()
    sink.final({"object": np.ones((8, 8), np.complex64)}, {"status": "complete"})
    sink.close(30)
    assert sink.backup_path is not None
    saved = np.load(sink.backup_path)
    note = json.loads(sink.backup_path.with_suffix(".json").read_text())
    assert note["diffraction"]["in_tiled"] == whole
    assert note["diffraction"]["in_backup"] == FRAMES - whole
    in_tiled = read_diffraction(client["processed"]["backup"][sink.key]["diffraction"])
    indices = np.concatenate([in_tiled.indices, saved["diffraction_indices"]])
    assert sorted(indices.tolist()) == list(range(FRAMES))  # every frame, exactly once
    backed = saved["diffraction_indices"]
    _close_to_float16(saved["diffraction_amplitude"].astype(np.float32), amplitudes[backed])
    np.testing.assert_array_equal(saved["diffraction_positions_m"], positions[backed])


def test_an_append_that_failed_half_way_is_completed_not_repeated(
    tiled_server, tmp_path, monkeypatch
):
    """amplitude appended, indices refused once: the retry adds only what each array lacks."""
    from tiled.client.array import ArrayClient

    import hxn_liveptycho.store.tiled as tiled_module

    monkeypatch.setattr(tiled_module, "RETRY_S", 0.2)
    real_patch = ArrayClient.patch
    refused: list[str] = []

    def patch_refusing_once(self: Any, array: Any, *args: Any, **kwargs: Any) -> Any:
        if self.item["id"] == "indices" and not refused:
            refused.append(self.item["id"])
            raise RuntimeError("refused once, for the test")
        return real_patch(self, array, *args, **kwargs)

    monkeypatch.setattr(ArrayClient, "patch", patch_refusing_once)
    amplitudes, positions, arrival, batches = _run_data(4)
    sink, client = _sink(tiled_server, tmp_path, "halfway")
    _feed(sink, batches, amplitudes, positions)
    assert _until(lambda: sink.diffraction_rows_stored == (FRAMES // CHUNK) * CHUNK)
    sink.final({}, {"status": "complete"})
    sink.close(30)
    assert refused == ["indices"]
    assert sink.backup_path is None
    group = client["processed"]["halfway"][sink.key]["diffraction"]
    assert {group[k].shape[0] for k in ("amplitude", "indices", "positions_m")} == {FRAMES}
    data = read_diffraction(group, order="stored")
    np.testing.assert_array_equal(data.indices, arrival)
    _close_to_float16(data.amplitude, amplitudes[arrival])


def test_read_diffraction_reads_the_earlier_uint8_layout(tiled_server):
    """Containers written before appends: uint8 with one scale, sorted, no indices."""
    from tiled.client import from_uri

    client = from_uri(tiled_server.uri)
    group = client.create_container("legacy_diffraction")
    values = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    group.write_array(values, key="amplitude", metadata={"scale": 0.5})
    group.write_array(np.zeros((2, 2)), key="positions_m")
    data = read_diffraction(group)
    np.testing.assert_array_equal(data.indices, [0, 1])
    np.testing.assert_array_equal(data.amplitude, values.astype(np.float32) * 0.5)


def test_encode_rounds_to_half_precision_and_counts_what_it_clips():
    amplitudes = np.array([0.0, 1.0, np.sqrt(2.0), 1023.7, 7e4], dtype=np.float32)
    encoded, clipped = stored.encode(amplitudes)
    assert encoded.dtype == np.float16 and clipped == 1
    assert encoded[-1] == np.float16(stored.LARGEST)
    np.testing.assert_allclose(encoded[:-1], amplitudes[:-1], rtol=2.0**-11)


@pytest.mark.parametrize(("shape", "rows"), [((256, 256), 64), ((128, 128), 256), ((4, 4), 1024)])
def test_chunks_are_about_eight_mebibytes(shape, rows):
    assert stored.chunk_frames_for(shape) == rows


def test_once_the_final_result_is_due_frames_wait_for_it_and_follow_it(tiled_server, tmp_path):
    """final_due(): no chunk is appended before the result; the result is stored first, then
    every frame, and the metadata says when they are all in."""
    amplitudes, positions, _arrival, batches = _run_data(seed=3)
    sink, client = _sink(tiled_server, tmp_path, "due")
    sink.final_due()
    _feed(sink, batches, amplitudes, positions)
    # The writer has seen the whole chunks queued and gone back to wait without appending.
    assert _until(lambda: _writer_waiting(sink))
    assert sink.diffraction_rows_stored == 0
    seen: list[dict[str, Any]] = []
    node_path = ["processed", "due", sink.key]

    def watch() -> None:
        from tiled.client import from_uri

        reader = from_uri(tiled_server.uri)
        while not seen or not seen[-1].get("diffraction", {}).get("complete"):
            with contextlib.suppress(KeyError):
                md = reader[node_path[0]][node_path[1]][node_path[2]].metadata
                if "finished" in md:
                    seen.append(dict(md))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sink.final({"object": np.ones((32, 32), np.complex64)}, {"status": "complete"})
    sink.close(30)
    watcher.join(30)
    assert seen and seen[-1]["diffraction"]["complete"] is True
    assert seen[-1]["diffraction"]["stored"] == FRAMES
    node = client["processed"]["due"][sink.key]
    assert node["final"]["object"].read().shape == (32, 32)
    np.testing.assert_array_equal(np.sort(read_diffraction(node).indices), np.arange(FRAMES))
    assert sink.counters.snapshot()["diffraction_in_final"] == FRAMES
