"""The simulated Eiger and PandA publish from their own processes: wire, pacing, lifetime."""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.sim import (
    SimEiger,
    SimHXNFlyer,
    SimPanda,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
    fly2dpd,
)
from hxn_liveptycho.sim.devices import X_CHANNEL, Y_CHANNEL
from hxn_liveptycho.streams import EigerFrame, EigerReceiver, PandaReceiver

TINY = SimulatedBeamline(x_num=4, y_num=3)


class Streams:
    """The project's own receivers on both simulated streams; events say when a series ended."""

    def __init__(self, eiger: SimEiger, panda: SimPanda, *, watch_for: int = 0) -> None:
        self.watch_for = watch_for
        self.reached = threading.Event()  # frame ``watch_for`` has arrived
        self.headers: list[dict[str, Any]] = []
        self.frames: dict[int, np.ndarray] = {}
        self.samples: list[dict[str, np.ndarray]] = []
        self.stops: list[dict[str, Any]] = []
        self.first_frame = threading.Event()
        self.series_ended = threading.Event()
        self.panda_stopped = threading.Event()
        self.eiger = EigerReceiver(
            eiger.endpoint,
            on_series_start=lambda series, info: self.headers.append(info),
            on_frame=self._frame,
            on_series_end=lambda series: self.series_ended.set(),
        )
        self.panda = PandaReceiver(
            panda.endpoint,
            on_start=lambda message: None,
            on_samples=lambda datasets, start: self.samples.append(datasets),
            on_stop=self._stop,
        )
        self.eiger.start()
        self.panda.start()
        assert eiger.wait_for_subscribers(1, timeout=10.0)
        assert panda.wait_for_subscribers(1, timeout=10.0)

    def _frame(self, frame: EigerFrame) -> None:
        self.frames[frame.frame] = np.array(frame.data)
        self.first_frame.set()
        if frame.frame == self.watch_for:
            self.reached.set()

    def _stop(self, message: dict[str, Any]) -> None:
        self.stops.append(message)
        self.panda_stopped.set()

    def close(self) -> None:
        self.eiger.stop()
        self.panda.stop()


@pytest.fixture
def devices() -> Iterator[tuple[SimEiger, SimPanda]]:
    eiger, panda = SimEiger(), SimPanda()
    yield eiger, panda
    eiger.close()
    panda.close()


@pytest.mark.parametrize(
    ("flavour", "encoding"), [("v1", "bs32-lz4<"), ("v2", "lz4<"), ("v1", "raw")]
)
def test_a_series_arrives_as_the_phantom_frames_and_encoder_samples(flavour, encoding):
    """What the receivers decode is the phantom's frame i and the encoder samples of point i,
    one PandA message per row; the flyer's events carry the same encoder means."""
    sample = SimulatedSample(TINY)
    eiger, panda = SimEiger(encoding=encoding, flavour=flavour), SimPanda()
    streams = Streams(eiger, panda)
    try:
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.002)
        flyer.kickoff().wait(120)
        flyer.complete().wait(60)
        assert streams.series_ended.wait(30) and streams.panda_stopped.wait(30)
    finally:
        streams.close()
        eiger.close()
        panda.close()
    n = sample.num_points
    assert sorted(streams.frames) == list(range(n))
    for index, frame in streams.frames.items():
        np.testing.assert_array_equal(frame, sample.detector_frame(index))
    (header,) = streams.headers
    assert header["beam_center_x"] == TINY.beam_center[1]
    assert header.get("nimages", header.get("number_of_images")) == n  # v1 name, v2 name
    assert len(streams.samples) == TINY.y_num and streams.stops[0]["emitted_frames"] == TINY.y_num
    x = np.concatenate([d[X_CHANNEL] for d in streams.samples]).reshape(n, -1)
    y = np.concatenate([d[Y_CHANNEL] for d in streams.samples]).reshape(n, -1)
    events = list(flyer.collect())
    np.testing.assert_allclose([e["data"]["inenc2_val"] for e in events], x.mean(axis=1))
    np.testing.assert_allclose([e["data"]["inenc3_val"] for e in events], y.mean(axis=1))
    eiger_report, panda_report = flyer.report["eiger"], flyer.report["panda"]
    assert eiger_report["frames_published"] == panda_report["frames_published"] == n
    assert panda_report["messages_published"] == TINY.y_num
    # Paced, never early: frame i is due at t0 + (i + 1) T; the first and last left no sooner.
    assert eiger_report["first_sent"] >= eiger_report["t0"] + flyer.dwell
    assert eiger_report["last_sent"] >= eiger_report["t0"] + n * flyer.dwell
    assert flyer.counters["eiger"]["state"] == "done"


def test_late_frames_catch_up_instead_of_shifting_the_schedule(devices):
    """A series whose start lies in the past sends every overdue frame at once: the schedule
    is t0 + i T on the monotonic clock, not 'T after the last send'."""
    eiger, _ = devices
    sample = SimulatedSample(TINY)
    eiger.publisher.prepare(
        1, sample, frames=5, frame_time=1.0, header=eiger.series_header(sample, frame_time=1.0)
    )
    eiger.publisher.start(time.monotonic() - 10.0)
    report = eiger.publisher.wait_done(60)
    assert report["frames_published"] == 5 and not report["aborted"]
    assert report["max_late_s"] >= 5.0  # the last frame was due 5 s before the start
    assert report["seconds"] < 1.0  # sent back to back, not one frame time apart


def test_an_abort_ends_the_series_early_and_still_sends_its_end(devices):
    eiger, panda = devices
    sample = SimulatedSample(TINY)
    streams = Streams(eiger, panda)
    try:
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=5.0)  # a minute of frames
        flyer.kickoff().wait(120)
        assert streams.first_frame.wait(30) or streams.series_ended.is_set()
        flyer.stop()
        flyer.complete().wait(30)
        assert streams.series_ended.wait(30) and streams.panda_stopped.wait(30)
    finally:
        streams.close()
    assert flyer.report["eiger"]["aborted"]
    assert flyer.report["eiger"]["frames_published"] < sample.num_points
    assert len(list(flyer.collect())) == flyer.report["eiger"]["frames_published"]


def test_a_held_series_waits_for_its_release_and_then_completes(devices):
    """``hold_before`` gates both detectors before a frame, as a paused trigger would: nothing
    from that frame on leaves until the flyer is released."""
    eiger, panda = devices
    sample = SimulatedSample(TINY)
    held = 6
    streams = Streams(eiger, panda, watch_for=held - 1)
    try:
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.002, hold_before=held)
        flyer.kickoff().wait(120)
        assert streams.reached.wait(30)
        seen_while_held = set(streams.frames)
        flyer.release()
        flyer.complete().wait(60)
        assert streams.series_ended.wait(30)
    finally:
        streams.close()
    assert max(seen_while_held) == held - 1
    assert sorted(streams.frames) == list(range(sample.num_points))
    assert flyer.report["eiger"]["held_s"] > 0 and not flyer.report["eiger"]["aborted"]


def test_a_release_sent_before_the_series_starts_is_kept(devices):
    eiger, panda = devices
    flyer = SimHXNFlyer(eiger, panda, SimulatedSample(TINY), dwell=0.002, hold_before=3)
    flyer.prepare().wait(120)
    flyer.release()
    flyer.kickoff().wait(60)
    flyer.complete().wait(60)
    assert flyer.report["eiger"]["frames_published"] == TINY.x_num * TINY.y_num


def test_the_flyer_runs_fly2dpd_after_an_early_prepare(RE, devices):
    """Armed before the plan (bluesky's Preparable), the flyer keeps kickoff/complete/collect."""
    eiger, panda = devices
    sample = SimulatedSample(TINY)
    flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.002)
    flyer.prepare().wait(120)
    documents: list[tuple[str, dict[str, Any]]] = []
    result = RE(
        fly2dpd(flyer, baseline=baseline_motors(12.0)), lambda n, d: documents.append((n, d))
    )
    assert result.exit_status == "success"
    xs: list[float] = []
    for name, doc in documents:
        if name == "event" and "inenc2_val" in doc["data"]:
            xs.append(doc["data"]["inenc2_val"])
        elif name == "event_page":
            xs.extend(doc["data"].get("inenc2_val", []))
    assert len(xs) == sample.num_points
    assert flyer.report["eiger"]["frames_published"] == sample.num_points


def test_close_stops_the_process_and_a_second_close_is_harmless():
    eiger = SimEiger()
    assert eiger.publisher.alive
    eiger.close()
    assert not eiger.publisher.alive
    eiger.close()


def test_a_bad_option_is_a_configuration_error_from_the_child():
    with pytest.raises(ConfigurationError, match="unknown Eiger encoding 'zstd'"):
        SimEiger(encoding="zstd")


def test_the_process_exits_when_its_owner_is_killed():
    """No child outlives its owner, even one killed with SIGKILL (no finally block runs)."""
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from hxn_liveptycho.sim import SimEiger; e = SimEiger(); "
            "print(e.publisher.pid, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())
        watch = os.pidfd_open(child)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    try:
        readable, _, _ = select.select([watch], [], [], 30.0)  # a pidfd reads when it exits
        assert readable, f"simulated Eiger process {child} outlived its owner"
    finally:
        os.close(watch)


def test_frames_are_drawn_lazily_and_a_pickled_sample_draws_the_same():
    """The Eiger's process gets the sample by pickle before any frame exists, and draws the
    same numbers the owner would (record_frames relies on it)."""
    sample = SimulatedSample(TINY)
    assert "intensities" not in vars(sample)
    copy = pickle.loads(pickle.dumps(sample))
    np.testing.assert_array_equal(copy.intensities, sample.intensities)


def test_a_window_must_fit_the_detector():
    with pytest.raises(ValueError, match="256-pixel window"):
        SimulatedBeamline(window=256)
    big = SimulatedBeamline.for_window(256)
    assert big.detector_shape[0] >= 256 + 2 and big.window == 256
    assert SimulatedBeamline.for_window(128) == SimulatedBeamline()
