"""PandA position stream over real ZMQ sockets: round trip, HXN's message layout, hardening."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from eiger_helpers import wait_until

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams import PandaPublisher, PandaReceiver

X, Y = "/INENC2.VAL.Value", "/INENC3.VAL.Value"


class Collector:
    """Records every callback in arrival order, thread-safely."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def on_start(self, message: dict) -> None:
        with self._lock:
            self.events.append(("start", message))

    def on_samples(self, datasets: dict[str, np.ndarray], start: int) -> None:
        with self._lock:
            self.events.append(("samples", (datasets, start)))

    def on_stop(self, message: dict) -> None:
        with self._lock:
            self.events.append(("stop", message))

    def of(self, kind: str) -> list[Any]:
        with self._lock:
            return [value for k, value in self.events if k == kind]


@pytest.fixture(autouse=True)
def no_leaked_receiver_threads() -> Iterator[None]:
    """Every test must stop what it started."""
    yield
    assert [t.name for t in threading.enumerate() if t.name.endswith("-receiver")] == []


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def raw_pub(collector: Collector) -> Iterator[tuple[zmq.Socket, PandaReceiver]]:
    """A bare ZMQ (X)PUB socket and a subscribed PandaReceiver, for hand-built messages."""
    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscriber, not just the first
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    receiver = PandaReceiver(
        f"tcp://127.0.0.1:{port}",
        on_start=collector.on_start,
        on_samples=collector.on_samples,
        on_stop=collector.on_stop,
    )
    try:
        receiver.start()
        assert sock.poll(5000) and sock.recv() == b"\x01"  # subscription arrived: no slow joiner
        yield sock, receiver
    finally:
        assert receiver.stop()
        sock.close(linger=0)


def data_message(frame_number: int, start: int, x: list[float], y: list[float]) -> bytes:
    """A data message laid out as HXN's PandA sends it."""

    def channel(values: list[float]) -> dict[str, Any]:
        return {
            "dtype": "float64",
            "size": len(values),
            "starting_sample_number": start,
            "data": values,
        }

    return json.dumps(
        {
            "msg_type": "data",
            "frame_number": frame_number,
            "datasets": {X: channel(x), Y: channel(y)},
        }
    ).encode()


@pytest.mark.parametrize(("out", "into"), [("pub", "sub"), ("push", "pull")])
def test_round_trip_of_a_scan(collector: Collector, out: str, into: str) -> None:
    """start, several data messages and stop arrive exactly, sample numbers continuing."""
    publisher = PandaPublisher("tcp://127.0.0.1:*", socket_type=out)
    receiver = PandaReceiver(
        publisher.endpoint,
        on_start=collector.on_start,
        on_samples=collector.on_samples,
        on_stop=collector.on_stop,
        socket_type=into,
    )
    rng = np.random.default_rng(0)
    chunks = [{X: rng.normal(size=41), Y: rng.normal(size=41)} for _ in range(4)]
    try:
        receiver.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)
        publisher.start()
        for number, chunk in enumerate(chunks):
            publisher.send_samples(chunk, frame_number=number)
        publisher.stop()
        assert wait_until(lambda: len(collector.of("stop")) == 1)
    finally:
        assert receiver.stop()
        publisher.close(linger=0)

    (start,) = collector.of("start")
    assert start["msg_type"] == "start" and start["hw_time_offset_ns"] is None
    assert start["arm_time"].endswith("Z") and "T" in start["arm_time"]
    received = collector.of("samples")
    assert [s for _, s in received] == [0, 41, 82, 123]
    for (datasets, _), chunk in zip(received, chunks, strict=True):
        assert set(datasets) == {X, Y}
        for name in (X, Y):
            assert datasets[name].dtype == np.float64
            assert np.array_equal(datasets[name], chunk[name])
    assert collector.of("stop") == [{"msg_type": "stop", "emitted_frames": 4}]
    counts = receiver.counters.snapshot()
    assert counts["messages"] == 6 and counts["starts"] == 1 and counts["stops"] == 1
    assert counts["data"] == 4 and counts["samples"] == 164
    assert counts["malformed"] == counts["gaps"] == counts["missing_messages"] == 0


def test_hand_built_hxn_messages_are_understood(
    raw_pub: tuple[zmq.Socket, PandaReceiver], collector: Collector
) -> None:
    """Messages written by hand after HXN's captured PandA output decode as expected."""
    sock, receiver = raw_pub
    sock.send(
        b'{"msg_type": "start", "arm_time": "2025-02-28T18:44:22.905865051Z", '
        b'"start_time": "2025-02-28T18:44:22.905908989Z", "hw_time_offset_ns": null}'
    )
    sock.send(data_message(0, 0, [-0.0083, -0.0079, -0.0081], [1.0, 2.0, 3.0]))
    sock.send(b'{"msg_type": "stop", "emitted_frames": 1}')

    assert wait_until(lambda: len(collector.of("stop")) == 1)
    assert collector.of("start")[0]["start_time"] == "2025-02-28T18:44:22.905908989Z"
    ((datasets, start),) = collector.of("samples")
    assert start == 0
    assert np.array_equal(datasets[X], [-0.0083, -0.0079, -0.0081])
    assert np.array_equal(datasets[Y], [1.0, 2.0, 3.0])
    assert receiver.counters.get("malformed") == 0


def test_malformed_messages_are_counted_and_survived(
    raw_pub: tuple[zmq.Socket, PandaReceiver], collector: Collector
) -> None:
    """Each malformed message counts once; good data before and after still arrives."""
    sock, receiver = raw_pub
    good = json.loads(data_message(0, 0, [1.0, 2.0], [3.0, 4.0]))
    x_entry = good["datasets"][X]
    bad: list[list[bytes]] = [
        [b"{not json"],
        [b"\x00\xff garbage"],
        [b'{"msg_type": "pause"}'],
        [b'["msg_type", "data"]'],
        [b'{"msg_type": "data", "frame_number": 1, "datasets": {}}'],
        [b'{"msg_type": "data", "datasets": {}}'],
        [json.dumps({**good, "datasets": {X: {**x_entry, "size": 5}}}).encode()],
        [json.dumps({**good, "datasets": {X: {**x_entry, "dtype": "string"}}}).encode()],
        [json.dumps({**good, "datasets": {X: {**x_entry, "data": ["a", "b"]}}}).encode()],
        [
            json.dumps(
                {**good, "datasets": {X: x_entry, Y: {**x_entry, "starting_sample_number": 7}}}
            ).encode()
        ],
        [data_message(1, 2, [1.0], [2.0]), b"second part"],
    ]
    sock.send(data_message(0, 0, [1.0, 2.0], [3.0, 4.0]))
    for message in bad:
        sock.send_multipart(message)
    sock.send(data_message(1, 2, [5.0, 6.0], [7.0, 8.0]))

    assert wait_until(lambda: receiver.counters.get("messages") == len(bad) + 2)
    assert wait_until(lambda: len(collector.of("samples")) == 2)
    assert receiver.running
    assert receiver.counters.get("malformed") == len(bad)
    assert [s for _, s in collector.of("samples")] == [0, 2]
    assert np.array_equal(collector.of("samples")[1][0][X], [5.0, 6.0])
    assert receiver.counters.get("gaps") == 0


def test_gap_and_lost_messages_are_counted(
    raw_pub: tuple[zmq.Socket, PandaReceiver],
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A jump in starting_sample_number counts the missing samples; stop reports lost messages."""
    sock, receiver = raw_pub
    with caplog.at_level("WARNING", logger="hxn_liveptycho"):
        sock.send(
            b'{"msg_type": "start", "arm_time": "t", "start_time": "t", "hw_time_offset_ns": null}'
        )
        sock.send(data_message(0, 0, [0.0] * 10, [0.0] * 10))
        sock.send(data_message(2, 15, [0.0] * 10, [0.0] * 10))  # samples 10..14 and message 1 lost
        sock.send(b'{"msg_type": "stop", "emitted_frames": 3}')
        assert wait_until(lambda: len(collector.of("stop")) == 1)
    counts = receiver.counters.snapshot()
    assert counts["gaps"] == 5
    assert counts["missing_messages"] == 1
    assert counts["data"] == 2 and counts["samples"] == 20
    messages = [r.getMessage() for r in caplog.records]
    assert any("5 sample(s) missing" in m for m in messages)
    assert any("3 data messages were emitted, 2 arrived" in m for m in messages)


def test_data_before_start_is_delivered_and_counted(
    raw_pub: tuple[zmq.Socket, PandaReceiver], collector: Collector
) -> None:
    """Joining mid-scan (start missed) still delivers samples, counted as data_before_start."""
    sock, receiver = raw_pub
    sock.send(data_message(5, 200, [1.0], [2.0]))
    assert wait_until(lambda: len(collector.of("samples")) == 1)
    assert collector.of("samples")[0][1] == 200
    assert receiver.counters.get("data_before_start") == 1


def test_raising_callback_is_counted_and_thread_survives(
    raw_pub: tuple[zmq.Socket, PandaReceiver], collector: Collector
) -> None:
    """A samples callback that raises is counted; the following data still arrives."""
    sock, _ = raw_pub
    calls: list[int] = []

    def boom(datasets: dict[str, np.ndarray], start: int) -> None:
        calls.append(start)
        if start == 0:
            raise ValueError("assembler rejected it")

    receiver = PandaReceiver(
        sock.getsockopt_string(zmq.LAST_ENDPOINT),
        on_start=collector.on_start,
        on_samples=boom,
        on_stop=collector.on_stop,
    )
    try:
        receiver.start()
        assert sock.poll(5000) and sock.recv() == b"\x01"
        sock.send(data_message(0, 0, [1.0], [1.0]))
        sock.send(data_message(1, 1, [1.0], [1.0]))
        assert wait_until(lambda: len(calls) >= 2)
        assert receiver.running
        assert receiver.counters.get("callback_errors") == 1
    finally:
        assert receiver.stop()


def test_bad_configuration_is_a_clear_error(collector: Collector) -> None:
    """Bad endpoints and socket types raise ConfigurationError; stop without start is clean."""
    callbacks = dict(
        on_start=collector.on_start, on_samples=collector.on_samples, on_stop=collector.on_stop
    )
    with pytest.raises(ConfigurationError, match="cannot connect"):
        PandaReceiver("bogus://x", **callbacks)
    with pytest.raises(ConfigurationError, match="socket_type"):
        PandaReceiver("tcp://127.0.0.1:1", socket_type="dealer", **callbacks)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="socket_type"):
        PandaPublisher("tcp://127.0.0.1:*", socket_type="router")  # type: ignore[arg-type]
    receiver = PandaReceiver("tcp://127.0.0.1:1", **callbacks)
    assert receiver.stop()
