"""The fixed detector window cut in the receivers: the transform itself, and a live run whose
frames arrive cropped (decode threads, and worker processes) reconstructs like a full-frame one."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scans import SMALL, fly, make_live, processed
from tiled.client import from_uri

from hxn_liveptycho.sim import SimEiger, SimPanda, SimulatedSample
from hxn_liveptycho.streams.crop import DetectorCrop, DetectorWindow, WindowCrop, window_source


def test_crop_cuts_the_window_around_the_centre_and_pickles():
    crop = DetectorCrop(center_y=131, center_x=122, size=160)
    assert crop.origin == (51, 42)
    cut = crop.transform()
    frame = np.arange(256 * 256, dtype=np.uint32).reshape(256, 256)
    out = cut(frame)
    assert out.shape == (160, 160) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, frame[51:211, 42:202])
    assert pickle.loads(pickle.dumps(cut)) == cut  # worker processes get it by pickle


def test_the_cut_window_remembers_the_detector_frame_shape_also_pickled():
    """The session compares detector shapes (a larger frame must not pass as a window)."""
    out = WindowCrop(8, 8, 48)(np.ones((72, 72), np.uint32))
    assert isinstance(out, DetectorWindow) and out.shape == (48, 48)
    assert window_source(out) == ((72, 72), None)
    assert window_source(pickle.loads(pickle.dumps(out))) == ((72, 72), None)
    plain = np.asarray(out)
    assert type(plain) is np.ndarray and window_source(plain) is None
    assert window_source(np.ones((4, 4))) is None


def test_a_window_outside_the_frame_becomes_an_empty_misfit_not_an_error():
    """A frame the window does not fit is handed on (without pixels) so that the run counts
    it as quarantined; before, the receiver dropped it as 'malformed' and the run never knew."""
    out = WindowCrop(200, 0, 128)(np.zeros((256, 256), np.uint16))
    assert out.size == 0 and out.dtype == np.uint16
    shape, misfit = window_source(out)
    assert shape == (256, 256)
    assert misfit is not None and "does not fit in a 256x256 frame" in misfit


#: Frame 1 larger than the others, frame 2 smaller than the window.
ODD_SHAPES = {1: (72, 72), 2: (40, 40)}


def test_odd_frames_keep_their_detector_shape_through_worker_processes():
    """The worker processes hand the window's source (detector shape, misfit) to the parent."""
    from eiger_helpers import Collector, wait_until

    from hxn_liveptycho.streams import EigerPublisher
    from hxn_liveptycho.streams.eiger_processes import EigerProcessReceiver

    collector = Collector()
    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push", flavour="v1")
    receiver = EigerProcessReceiver(
        publisher.endpoint,
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        processes=2,
        transform=DetectorCrop(center_y=32, center_x=32, size=48).transform(),
    )
    receiver.start()
    try:
        for index in range(4):  # no series header: the publisher then sends any shape
            shape = ODD_SHAPES.get(index, (64, 64))
            publisher.send_frame(1, index, np.full(shape, index, np.uint32))
        assert wait_until(lambda: len(collector.of("frame")) == 4, timeout=20)
    finally:
        assert receiver.stop(timeout=10)
        publisher.close(linger=0)
    got = {f.frame: f.data for f in collector.of("frame")}
    assert {i: window_source(d)[0] for i, d in got.items()} == {
        0: (64, 64),
        1: (72, 72),
        2: (40, 40),
        3: (64, 64),
    }
    assert got[0].shape == got[1].shape == got[3].shape == (48, 48)
    assert got[2].size == 0 and "does not fit in a 40x40 frame" in window_source(got[2])[1]
    assert receiver.counters.get("malformed") == 0


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
