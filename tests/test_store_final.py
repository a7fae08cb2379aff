"""The final result's write: ``final/`` made while the last passes run, then filled."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hxn_liveptycho.store.tiled import TiledSink


def _sink(server: Any, tmp_path: Path, name: str) -> tuple[TiledSink, Any]:
    from tiled.client import from_uri

    client = from_uri(server.uri)
    sink = TiledSink(lambda: client, catalog_path=f"processed/{name}", backup_dir=tmp_path)
    sink.open(None, {"raw_uid": f"{name}-0123456789", "scan_id": 7})
    return sink, client


def _snapshot(shape: tuple[int, int], iteration: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    obj = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    probe = (rng.normal(size=(16, 16)) + 1j * rng.normal(size=(16, 16))).astype(np.complex64)
    return {
        "object": obj,
        "probe": probe,
        "iteration": iteration,
        "error_history": np.linspace(1.0, 0.5, iteration),
        "positions_m": rng.normal(size=(9, 2)),
    }


def _until(condition: Any, timeout: float = 30.0) -> bool:
    """Poll ``condition``; a read that fails meanwhile (a node being replaced answers 404
    for a moment) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except Exception:  # any failed read is "not yet"
            pass
        time.sleep(0.05)
    return False


def test_final_arrays_are_made_when_the_result_is_due_and_hold_the_result(tiled_server, tmp_path):
    sink, client = _sink(tiled_server, tmp_path, "ahead")
    sink.live(_snapshot((40, 48), 3, seed=1))
    assert _until(lambda: "live_written" in sink.timeline)
    sink.final_due()
    assert _until(lambda: "final_prepared" in sink.timeline)
    node = client["processed"]["ahead"][sink.key]
    made = node["final"]
    # Made ahead, empty, with the live snapshot's layout: the result only fills them.
    assert made["object"].shape == (40, 48)
    assert made["object_phase"].shape == (40, 48)
    assert made["probe"].shape == (16, 16)
    assert "finished" not in node.metadata

    result = _snapshot((40, 48), 10, seed=2)
    sink.final(result, {"status": "complete"})
    sink.close(timeout=30)
    assert sink.backup_path is None
    final = client["processed"]["ahead"][sink.key]["final"]
    np.testing.assert_array_equal(final["object"].read(), result["object"])
    np.testing.assert_array_equal(final["object_phase"].read(), np.angle(result["object"]))
    np.testing.assert_array_equal(final["probe"].read(), result["probe"])
    np.testing.assert_array_equal(final["error_history"].read(), result["error_history"])
    assert client["processed"]["ahead"][sink.key].metadata["status"] == "complete"
    order = [sink.timeline[k] for k in ("final_prepared", "final_handed", "final_arrays_written")]
    assert order == sorted(order)


def test_a_result_of_another_shape_than_the_live_ones_is_still_written(tiled_server, tmp_path):
    sink, client = _sink(tiled_server, tmp_path, "reshaped")
    sink.live(_snapshot((40, 48), 3, seed=1))
    assert _until(lambda: "live_written" in sink.timeline)
    sink.final_due()
    assert _until(lambda: "final_prepared" in sink.timeline)
    result = _snapshot((44, 44), 10, seed=3)
    sink.final(result, {"status": "complete"})
    sink.close(timeout=30)
    assert sink.backup_path is None
    final = client["processed"]["reshaped"][sink.key]["final"]
    np.testing.assert_array_equal(final["object"].read(), result["object"])
    np.testing.assert_array_equal(final["object_amplitude"].read(), np.abs(result["object"]))


def test_a_large_array_made_ahead_is_filled_block_by_block(tiled_server, tmp_path, monkeypatch):
    """Arrays above Tiled's upload size are made with several blocks, as write_array makes
    them; each block is uploaded (here with the limit lowered to force blocks)."""
    from tiled.client.container import Container

    monkeypatch.setattr(Container, "_SUGGESTED_MAX_UPLOAD_SIZE", 4096)
    sink, client = _sink(tiled_server, tmp_path, "blocks")
    sink.live(_snapshot((40, 48), 3, seed=1))
    assert _until(lambda: "live_written" in sink.timeline)
    sink.final_due()
    assert _until(lambda: "final_prepared" in sink.timeline)
    made = client["processed"]["blocks"][sink.key]["final"]["object"]
    assert any(len(dim) > 1 for dim in made.structure().chunks)
    result = _snapshot((40, 48), 10, seed=4)
    sink.final(result, {"status": "complete"})
    sink.close(timeout=30)
    final = client["processed"]["blocks"][sink.key]["final"]
    np.testing.assert_array_equal(final["object"].read(), result["object"])


def test_live_arrays_are_made_from_the_canvas_before_the_first_snapshot(tiled_server, tmp_path):
    from tiled.client import from_uri

    client = from_uri(tiled_server.uri)
    sink = TiledSink(lambda: client, catalog_path="processed/canvas", backup_dir=tmp_path)
    canvas = {"shape": [40, 48], "window": 16, "origin_um": [0.0, 0.0], "pixel_size_m": 1e-8}
    sink.open(None, {"raw_uid": "canvas-0123456789", "scan_id": 8, "canvas": canvas})
    assert _until(lambda: "live_made" in sink.timeline)
    live = client["processed"]["canvas"][sink.key]["live"]
    assert live["object_phase"].shape == (40, 48)
    assert live["probe"].shape == (16, 16)
    assert "live_updated" not in client["processed"]["canvas"][sink.key].metadata

    snapshot = _snapshot((40, 48), 3, seed=5)
    sink.live(snapshot)
    assert _until(lambda: "live_written" in sink.timeline)
    live = client["processed"]["canvas"][sink.key]["live"]
    np.testing.assert_array_equal(live["object_amplitude"].read(), np.abs(snapshot["object"]))
    np.testing.assert_array_equal(live["probe"].read(), snapshot["probe"])
    np.testing.assert_array_equal(live["error_history"].read(), snapshot["error_history"])
    sink.final(_snapshot((40, 48), 5, seed=6), {"status": "complete"})
    sink.close(timeout=30)
    assert sink.backup_path is None


def test_arrays_made_ahead_follow_a_newer_live_layout(tiled_server, tmp_path):
    """final/ made from one live layout is made again when a later snapshot has another
    (positions grow until the scan's end)."""
    sink, client = _sink(tiled_server, tmp_path, "relayout")
    sink.live(_snapshot((40, 48), 3, seed=1))
    assert _until(lambda: "live_written" in sink.timeline)
    sink.final_due()
    assert _until(lambda: "final_prepared" in sink.timeline)
    grown = _snapshot((40, 48), 4, seed=2)
    grown["positions_m"] = np.zeros((25, 2))
    sink.live(grown)
    node = client["processed"]["relayout"][sink.key]
    assert _until(lambda: node["final"]["positions_m"].shape == (25, 2))
    result = _snapshot((40, 48), 10, seed=3)
    result["positions_m"] = np.ones((25, 2))
    sink.final(result, {"status": "complete"})
    sink.close(timeout=30)
    assert sink.backup_path is None
    np.testing.assert_array_equal(node["final"]["positions_m"].read(), result["positions_m"])


def test_the_metadata_of_a_snapshot_carries_its_quality_figures() -> None:
    """convergence, the state's own error and the fitted stage model go to the container's
    metadata as plain JSON values; a snapshot without them adds nothing."""
    from hxn_liveptycho.store.container import quality_metadata

    assert quality_metadata({"object": np.ones((2, 2), np.complex64)}) == {}
    md = quality_metadata(
        {
            "convergence": {"rate": 0.01, "converged": False, "window": 10, "tolerance": 0.001},
            "state_error": np.float32(0.0125),
            "position_model_scale_y": 1.02,
            "position_model_rotation_deg": np.float64(0.5),
        }
    )
    assert md["convergence"]["converged"] is False
    assert md["state_error"] == pytest.approx(0.0125) and type(md["state_error"]) is float
    assert md["position_model"] == {"scale_y": 1.02, "rotation_deg": 0.5}
