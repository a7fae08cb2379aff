"""The fixed detector window cut in the receivers: the transform itself, and a live run whose
frames arrive cropped (decode threads, and worker processes) reconstructs like a full-frame one."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scans import SMALL, fly, make_live, processed
from tiled.client import from_uri

from hxn_liveptycho.sim import SimEiger, SimPanda, SimulatedSample
from hxn_liveptycho.streams.crop import DetectorCrop, WindowCrop


def test_crop_cuts_the_window_around_the_centre_and_pickles():
    crop = DetectorCrop(center_y=131, center_x=122, size=160)
    assert crop.origin == (51, 42)
    cut = crop.transform()
    frame = np.arange(256 * 256, dtype=np.uint32).reshape(256, 256)
    out = cut(frame)
    assert out.shape == (160, 160) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, frame[51:211, 42:202])
    assert pickle.loads(pickle.dumps(cut)) == cut  # worker processes get it by pickle


def test_a_window_outside_the_frame_is_refused_by_the_transform():
    with pytest.raises(ValueError, match="does not fit in a 256x256 frame"):
        WindowCrop(200, 0, 128)(np.zeros((256, 256), np.uint16))


@pytest.mark.parametrize("processes", [0, 2])
def test_live_run_with_frames_cropped_in_the_receiver(RE, tmp_path, tiled_server, processes):
    """Threads (0) or worker processes (2) cut the window; the session cuts its ROI from it
    with the header's beam centre moved into the window, and the run completes."""
    eiger = SimEiger(socket_type="push" if processes else "pub")
    panda = SimPanda()
    sample = SimulatedSample(SMALL)
    bl = sample.beamline
    crop = {"center_y": bl.beam_center[0] + 3, "center_x": bl.beam_center[1] - 2, "size": 160}
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        tiled_uri=tiled_server.uri,
        eiger_crop=crop,
        eiger_socket="pull" if processes else "sub",
        eiger_decode_processes=processes,
    )
    try:
        result = fly(RE, eiger, panda, sample)
        assert result.exit_status == "success"
        assert live.wait(timeout=90)
        node = processed(from_uri(tiled_server.uri), result.run_start_uids[0])
        assert node.metadata["status"] == "complete", node.metadata.get("error")
        assert node.metadata["counters"]["frames_used"] == sample.num_points
        # The ROI is still centred on the beam: the centroid of the mean pattern sits at
        # the middle of the run's 128² window (64.0, 64.5 for the simulated data itself).
        mean = node["diffraction"]["amplitude"].read().astype(np.float64).mean(axis=0)
        yy, xx = np.indices(mean.shape)
        centroid = (mean * yy).sum() / mean.sum(), (mean * xx).sum() / mean.sum()
        assert abs(centroid[0] - 64.0) < 1.0 and abs(centroid[1] - 64.5) < 1.0, centroid
    finally:
        live.close()
        eiger.close()
        panda.close()
