"""End to end with the NN branch: a real RunEngine, simulated HXN detectors, a real Tiled."""

from __future__ import annotations

import numpy as np
from scans import SMALL, RunningPoller, fly, make_live, processed

from hxn_liveptycho.demo import aligned_pair
from hxn_liveptycho.sim import SimulatedSample


def test_both_branches_run_and_the_mosaic_is_live_in_tiled(
    RE, hxn_detectors, tmp_path, tiled_server
):
    eiger, panda = hxn_detectors
    sample = SimulatedSample(SMALL)
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        tiled_uri=tiled_server.uri,
        overrides={"mode": "both", "recon": {"iterations": 10}, "nn": {"batch_size": 16}},
    )
    poller = RunningPoller(tiled_server.uri, "nn", "object_phase", interval=0.2)
    poller.start()
    try:
        result = fly(RE, eiger, panda, sample, dwell=0.04)
        assert live.wait(timeout=120)
    finally:
        poller.stop_event.set()
        poller.join(5)
        live.close()
    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), result.run_start_uids[0])
    md = node.metadata
    assert md["status"] == "complete", md.get("error")
    assert md["mode"] == "both"
    assert md["config"]["nn"]["model"] == "ptychonn-hxn-128"
    nn = md["nn"]
    assert nn["model"] == "ptychonn-hxn-128" and len(nn["model_sha256"]) == 64
    assert nn["backend"] in ("tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime")
    assert nn["nn_frames_inferred"] == sample.num_points
    assert nn["nn_frames_dropped"] == 0
    assert {"live", "final", "nn"} <= set(node)  # the iterative branch ran too
    assert poller.seen_while_running, "no NN mosaic appeared in Tiled while the run was running"
    mosaic = node["nn"]["object"].read()
    assert mosaic.dtype == np.complex64
    assert mosaic.shape == tuple(md["canvas"]["shape"])
    coverage = node["nn"]["coverage"].read()
    assert (coverage > 0).sum() > 0.2 * coverage.size
    # Through the whole live pipeline (stream, crop, encoder positions) the phase still
    # follows the phantom's: Pearson r on the well-lit region after the global offset.
    truth, estimate, mask = aligned_pair(sample, mosaic, md["canvas"]["origin_um"])
    offset = np.angle(np.vdot(estimate[mask], truth[mask]))
    r = np.corrcoef(np.angle(estimate * np.exp(1j * offset))[mask], np.angle(truth)[mask])[0, 1]
    assert r >= 0.8, f"phase correlation {r:.3f}"


def test_a_model_for_another_crop_fails_the_run_naming_both_shapes(
    RE, hxn_detectors, tmp_path, tiled_server
):
    eiger, panda = hxn_detectors
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        tiled_uri=tiled_server.uri,
        overrides={"mode": "nn", "roi": {"size": 64}},
    )
    try:
        result = fly(RE, eiger, panda, SimulatedSample(SMALL))
        assert result.exit_status == "success"  # the scan itself is never harmed
        assert live.wait(timeout=60)
    finally:
        live.close()
    from tiled.client import from_uri

    md = processed(from_uri(tiled_server.uri), result.run_start_uids[0]).metadata
    assert md["status"] == "failed"
    assert "128x128" in md["error"] and "64x64" in md["error"]
