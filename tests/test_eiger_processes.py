"""The multi-process Eiger receiver over real ZMQ and real spawned workers.

Each scenario is played against the threaded EigerReceiver too: the process
receiver must deliver the same frames and count the same things.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from eiger_helpers import Collector, wait_until

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams import EigerPublisher, EigerReceiver
from hxn_liveptycho.streams.eiger_processes import EigerProcessReceiver

pytestmark = pytest.mark.usefixtures("no_leaked_receiver_threads")

SHAPE = (48, 40)


def _frames(n: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.poisson(4.0, SHAPE).astype(dtype) for _ in range(n)]


def _process_receiver(endpoint: str, collector: Collector, **kwargs: Any) -> EigerProcessReceiver:
    return EigerProcessReceiver(
        endpoint,
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        processes=2,
        **kwargs,
    )


def _threaded_receiver(endpoint: str, collector: Collector, **kwargs: Any) -> EigerReceiver:
    return EigerReceiver(
        endpoint,
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        socket_type="pull",
        **kwargs,
    )


def _play(
    make: Callable[..., Any],
    script: Callable[[EigerPublisher, Any], None],
    flavour: str = "v1",
    encoding: str = "bs32-lz4<",
) -> tuple[Collector, dict[str, int]]:
    """Run ``script(publisher, receiver)`` against a fresh receiver; its callbacks and counters."""
    collector = Collector()
    publisher = EigerPublisher(
        "tcp://127.0.0.1:*", socket_type="push", flavour=flavour, encoding=encoding
    )
    receiver = make(publisher.endpoint, collector)
    receiver.start()
    try:
        script(publisher, receiver)
    finally:
        assert receiver.stop(timeout=10)
        publisher.close(linger=0)
    return collector, receiver.counters.snapshot()


def _pids_reaped(pids: list[int]) -> bool:
    return all(not os.path.exists(f"/proc/{pid}") for pid in pids)


@pytest.mark.parametrize(
    ("flavour", "encoding", "dtype"),
    [
        ("v1", "bs32-lz4<", "uint32"),
        ("v1", "raw", "uint16"),
        ("v2", "bs16-lz4<", "uint16"),
        ("v2", "raw", "uint32"),
    ],
)
def test_round_trip_is_bit_for_bit(flavour: str, encoding: str, dtype: str) -> None:
    """Every frame arrives exactly once, bit for bit, between its series' start and end."""
    data = _frames(30, dtype)

    def script(publisher: EigerPublisher, receiver: Any) -> None:
        publisher.start_series(3, shape=SHAPE, dtype=dtype, header={"nimages": len(data)})
        for index, frame in enumerate(data):
            publisher.send_frame(3, index, frame)
        publisher.end_series(3)
        assert wait_until(lambda: receiver.counters.get("series_end") == 1, timeout=20)

    collector, counts = _play(_process_receiver, script, flavour, encoding)
    assert collector.kinds()[0] == "start" and collector.kinds()[-1] == "end"
    frames = collector.of("frame")
    assert sorted(f.frame for f in frames) == list(range(len(data)))
    for frame in frames:
        assert frame.series == 3 and frame.data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame.data, data[frame.frame])
    info = collector.of("start")[0][1]
    assert info["nimages" if flavour == "v1" else "number_of_images"] == len(data)
    assert counts["frames"] == len(data) and counts["messages"] == len(data) + 2
    for name in ("malformed", "gaps", "late", "duplicates", "stale_series", "unknown_series"):
        assert counts[name] == 0, name
    assert counts["worker_exits"] == counts["barrier_timeouts"] == 0


def _rearm_script(publisher: EigerPublisher, receiver: Any) -> None:
    """Series 1 skips frame 2, is superseded by series 2; a straggler and its end come late.

    Each phase waits until the receiver handled the previous one: messages racing
    a header through different workers are ordered by when the workers got them.
    """
    data = _frames(6, "uint32", seed=1)
    counts = receiver.counters
    publisher.start_series(1, shape=SHAPE, dtype="uint32")
    for index in (0, 1, 3, 4):  # frame 2 never sent: one gap
        publisher.send_frame(1, index, data[index])
    assert wait_until(lambda: counts.get("frames") == 4, timeout=20)
    publisher.start_series(2, shape=SHAPE, dtype="uint32")  # re-armed before series 1 ended
    assert wait_until(lambda: counts.get("headers") == 2, timeout=20)
    publisher.send_frame(1, 5, data[5])  # straggler of the superseded series
    publisher.end_series(1)
    for index in range(3):
        publisher.send_frame(2, index, data[index])
    publisher.send_frame(2, 1, data[1])  # a duplicate
    publisher.end_series(2)
    assert wait_until(lambda: counts.get("series_end") == 1, timeout=20)


def test_stale_series_gap_and_duplicate_counted_as_the_threaded_receiver_does() -> None:
    """Same frames delivered and the same stale/gap/duplicate counts, threaded or in processes."""
    threaded, threaded_counts = _play(_threaded_receiver, _rearm_script)
    spread, spread_counts = _play(_process_receiver, _rearm_script)
    keys = [
        "headers",
        "frames",
        "series_end",
        "gaps",
        "late",
        "duplicates",
        "stale_series",
        "unknown_series",
        "malformed",
    ]
    assert {k: spread_counts[k] for k in keys} == {k: threaded_counts[k] for k in keys}
    assert threaded_counts["gaps"] == 1 and threaded_counts["stale_series"] == 2
    assert threaded_counts["duplicates"] == 1
    delivered = sorted((f.series, f.frame) for f in spread.of("frame"))
    assert delivered == sorted((f.series, f.frame) for f in threaded.of("frame"))
    assert spread.of("end") == threaded.of("end") == [2]


def test_corrupt_frame_is_counted_and_later_frames_kept() -> None:
    """A corrupt image and an unparsable message are 'malformed'; the series goes on."""
    data = _frames(12, "uint16", seed=2)

    def script(publisher: EigerPublisher, receiver: Any) -> None:
        publisher.start_series(5, shape=SHAPE, dtype="uint16")
        for index, frame in enumerate(data):
            if index == 4:
                head = b'{"htype":"dimage-1.0","series":5,"frame":4}'
                bad = b'{"htype":"dimage_d-1.0","shape":[40,48],"type":"uint16","encoding":"raw"}'
                publisher.send_parts([head, bad, b"short", b'{"htype":"dconfig-1.0"}'])
                publisher.send_parts([b"\xff not json"])
                continue
            publisher.send_frame(5, index, frame)
        publisher.end_series(5)
        assert wait_until(lambda: receiver.counters.get("series_end") == 1, timeout=20)

    threaded, threaded_counts = _play(_threaded_receiver, script, encoding="raw")
    spread, counts = _play(_process_receiver, script, encoding="raw")
    assert counts["malformed"] == threaded_counts["malformed"] == 2
    assert counts["gaps"] == threaded_counts["gaps"] == 1  # frame 4 never delivered
    kept = {f.frame: f.data for f in spread.of("frame")}
    assert sorted(kept) == sorted(f.frame for f in threaded.of("frame"))
    assert sorted(kept) == [i for i in range(len(data)) if i != 4]
    for index, pixels in kept.items():
        np.testing.assert_array_equal(pixels, data[index])


class _Crop:
    """A picklable ROI transform (what a run session would ship to the workers)."""

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return pixels[8:24, 4:20].astype(np.float32)


def test_transform_runs_in_the_workers() -> None:
    """The crop is applied before the frame reaches the parent; a lambda is refused."""
    data = _frames(8, "uint32", seed=3)

    def script(publisher: EigerPublisher, receiver: Any) -> None:
        publisher.start_series(1, shape=SHAPE, dtype="uint32")
        for index, frame in enumerate(data):
            publisher.send_frame(1, index, frame)
        publisher.end_series(1)
        assert wait_until(lambda: receiver.counters.get("series_end") == 1, timeout=20)

    collector, _ = _play(lambda e, c: _process_receiver(e, c, transform=_Crop()), script)
    for frame in collector.of("frame"):
        np.testing.assert_array_equal(frame.data, _Crop()(data[frame.frame]))
    with pytest.raises(ConfigurationError, match="picklable"):
        _process_receiver("tcp://127.0.0.1:9", Collector(), transform=lambda a: a)


def test_stop_joins_workers_when_the_publisher_vanished() -> None:
    """With the detector gone, stop() still ends the thread and reaps every worker process."""
    collector = Collector()
    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push")
    receiver = _process_receiver(publisher.endpoint, collector)
    receiver.start()
    pids = receiver.worker_pids
    assert len(pids) == 2 and not _pids_reaped(pids)
    publisher.start_series(1, shape=SHAPE, dtype="uint32")
    publisher.send_frame(1, 0, _frames(1, "uint32")[0])
    assert wait_until(lambda: receiver.counters.get("frames") == 1, timeout=20)
    publisher.close(linger=0)
    began = time.monotonic()
    assert receiver.stop(timeout=10)
    assert time.monotonic() - began < 5
    assert not receiver.running
    assert _pids_reaped(pids)
    assert receiver.counters.get("worker_exits") == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("eiger")]


def test_a_dead_worker_is_counted_and_stop_still_works() -> None:
    """A worker killed mid-run is counted ('worker_exits'); the others keep delivering."""
    collector = Collector()
    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push")
    receiver = _process_receiver(publisher.endpoint, collector)
    receiver.start()
    try:
        victim = receiver._workers[0].process
        victim.kill()
        victim.join(5)
        assert wait_until(lambda: receiver.counters.get("worker_exits") == 1, timeout=10)
        publisher.start_series(1, shape=SHAPE, dtype="uint32")
        for index, frame in enumerate(_frames(4, "uint32")):
            publisher.send_frame(1, index, frame)
        publisher.end_series(1)
        assert wait_until(lambda: receiver.counters.get("series_end") == 1, timeout=20)
        assert receiver.counters.get("frames") == 4
    finally:
        assert receiver.stop(timeout=10)
        publisher.close(linger=0)
    assert _pids_reaped(receiver.worker_pids)


def test_sub_socket_and_bad_options_are_refused() -> None:
    """SUB would give every worker every message: refused with the reason, as are bad sizes."""
    collector = Collector()
    with pytest.raises(ConfigurationError, match="PUB proxy"):
        _process_receiver("tcp://127.0.0.1:9", collector, socket_type="sub")
    with pytest.raises(ConfigurationError, match="processes"):
        EigerProcessReceiver(
            "tcp://127.0.0.1:9",
            on_series_start=collector.on_series_start,
            on_frame=collector.on_frame,
            on_series_end=collector.on_series_end,
            processes=0,
        )
    with pytest.raises(ConfigurationError, match="flavour"):
        _process_receiver("tcp://127.0.0.1:9", collector, flavour="v3")


def test_engine_builds_the_process_receiver_from_settings(tmp_path: Any) -> None:
    """eiger_decode_processes > 0 gives the engine a multi-process receiver; frames reach it."""
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.pipeline.engine import Engine

    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push")
    settings = Settings(
        eiger_endpoint=publisher.endpoint,
        eiger_socket="pull",
        eiger_decode_processes=2,
        data_dir=tmp_path,
    )
    engine = Engine(settings, sink_factory=lambda *args, **kwargs: None)
    try:
        publisher.start_series(1, shape=SHAPE, dtype="uint32")
        for index, frame in enumerate(_frames(3, "uint32")):
            publisher.send_frame(1, index, frame)
        publisher.end_series(1)
        # No ptychography run is open: the engine counts the frames as orphans.
        assert wait_until(lambda: engine.counters.get("orphan_frames") == 3, timeout=20)
        # The end-of-series message comes after the last frame: wait for it too.
        assert wait_until(
            lambda: engine.status()["receivers"]["eiger"]["barriers"] == 2, timeout=20
        )
        eiger = engine.status()["receivers"]["eiger"]
        assert eiger["frames"] == 3 and eiger["barriers"] == 2
    finally:
        engine.close()
        publisher.close(linger=0)
    with pytest.raises(ConfigurationError, match="socket_type='pull'"):
        Engine(
            Settings(eiger_endpoint="tcp://127.0.0.1:9", eiger_decode_processes=2),
            sink_factory=lambda *args, **kwargs: None,
        )
