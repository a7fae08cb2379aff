"""Eiger SIMPLON v1 stream over real ZMQ sockets: round trips, documented wire layout, hardening."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bitshuffle
import lz4.block
import numpy as np
import pytest
import zmq
from eiger_helpers import Collector, linked_pairs, wait_until

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams import EigerFrame, EigerPublisher, EigerReceiver, encode
from hxn_liveptycho.streams.curve import CurveKeys

TRANSPORTS = [("pub", "sub"), ("push", "pull")]

pytestmark = pytest.mark.usefixtures("no_leaked_receiver_threads")


def poisson_frame(shape: tuple[int, int], dtype: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, shape).astype(dtype)


@pytest.fixture
def make_pair(
    collector: Collector,
) -> Iterator[Callable[..., tuple[EigerPublisher, EigerReceiver]]]:
    """Build a connected SIMPLON v1 publisher/receiver pair; both are closed after the test."""
    with linked_pairs(collector) as link:

        def make(
            out: str = "pub", into: str = "sub", encoding: str = "bs32-lz4<", **receiver_kwargs: Any
        ) -> tuple[EigerPublisher, EigerReceiver]:
            return link("v1", encoding, out, into, **receiver_kwargs)

        yield make


@pytest.mark.parametrize(("out", "into"), TRANSPORTS)
@pytest.mark.parametrize(
    ("encoding", "dtype"),
    [("bs32-lz4<", "uint32"), ("bs16-lz4<", "uint16"), ("lz4<", "uint32"), ("raw", "uint16")],
)
def test_series_arrives_bit_for_bit_in_order(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    out: str,
    into: str,
    encoding: str,
    dtype: str,
) -> None:
    """A header, 6 frames and an end arrive exactly, in order, with matching counters."""
    publisher, receiver = make_pair(out, into, encoding)
    frames = [poisson_frame((96, 128), dtype, seed) for seed in range(6)]
    publisher.start_series(
        7,
        shape=(96, 128),
        dtype=dtype,
        header={"nimages": 6, "photon_energy": 9000.0, "detector_distance": 0.55},
    )
    for index, frame in enumerate(frames):
        publisher.send_frame(7, index, frame)
    publisher.end_series(7)

    assert wait_until(lambda: collector.of("end") == [7])
    assert collector.kinds() == ["start"] + ["frame"] * 6 + ["end"]
    series, info = collector.of("start")[0]
    assert series == 7
    assert info["nimages"] == 6
    assert info["photon_energy"] == 9000.0
    assert info["detector_distance"] == 0.55
    assert info["x_pixels_in_detector"] == 128 and info["y_pixels_in_detector"] == 96
    received = collector.of("frame")
    assert [f.frame for f in received] == list(range(6))
    assert all(f.series == 7 for f in received)
    for sent, got in zip(frames, received, strict=True):
        assert got.data.dtype == np.dtype(dtype)
        assert np.array_equal(got.data, sent)
    counts = receiver.counters.snapshot()
    assert counts["messages"] == 8
    assert counts["headers"] == 1 and counts["frames"] == 6 and counts["series_end"] == 1
    assert (
        counts["malformed"]
        == counts["gaps"]
        == counts["duplicates"]
        == counts["unknown_series"]
        == 0
    )


def test_publisher_wire_layout_matches_dectris_v1(raw_push: tuple[zmq.Socket, str]) -> None:
    """What EigerPublisher sends is the documented multipart layout, part by part."""
    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push")
    pull = zmq.Context.instance().socket(zmq.PULL)
    try:
        pull.connect(publisher.endpoint)
        frame = poisson_frame((20, 30), "uint32", 1)
        publisher.start_series(
            2, shape=(20, 30), dtype="uint32", header={"frame_time": 0.002, "count_time": 0.0015}
        )
        publisher.send_frame(2, 5, frame)
        publisher.end_series(2)
        assert pull.poll(5000)
        header = pull.recv_multipart()
        image = pull.recv_multipart()
        end = pull.recv_multipart()
    finally:
        pull.close(linger=0)
        publisher.close(linger=0)

    assert len(header) == 2
    assert json.loads(header[0]) == {"htype": "dheader-1.0", "series": 2, "header_detail": "basic"}
    config = json.loads(header[1])
    assert config["frame_time"] == 0.002 and config["count_time"] == 0.0015
    assert config["x_pixel_size"] == 75e-6

    assert len(image) == 4
    part1, part2, blob, part4 = image
    assert json.loads(part1) == {
        "htype": "dimage-1.0",
        "series": 2,
        "frame": 5,
        "hash": hashlib.md5(blob).hexdigest(),
    }
    assert json.loads(part2) == {
        "htype": "dimage_d-1.0",
        "shape": [30, 20],
        "type": "uint32",
        "encoding": "bs32-lz4<",
        "size": len(blob),
    }
    assert struct.unpack(">QI", blob[:12]) == (frame.nbytes, 8192)
    assert json.loads(part4) == {
        "htype": "dconfig-1.0",
        "start_time": 10_000_000,
        "stop_time": 11_500_000,
        "real_time": 1_500_000,
    }
    assert [json.loads(p) for p in end] == [{"htype": "dseries_end-1.0", "series": 2}]


def test_v1_lz4_blob_is_a_bare_block_as_dectris_v1_clients_read_it() -> None:
    """For v1 ``lz4<`` the blob is one plain LZ4 block (SIMPLON manual; ADEiger's
    ``streamApi.cpp`` and LiberTEM-rs decompress it so), not the HDF5 framing."""
    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push", encoding="lz4<")
    pull = zmq.Context.instance().socket(zmq.PULL)
    try:
        pull.connect(publisher.endpoint)
        frame = poisson_frame((20, 30), "uint16", 4)
        publisher.start_series(3, shape=(20, 30), dtype="uint16")
        publisher.send_frame(3, 0, frame)
        assert pull.poll(5000)
        pull.recv_multipart()
        _, description, blob, _ = pull.recv_multipart()
    finally:
        pull.close(linger=0)
        publisher.close(linger=0)
    assert json.loads(description)["encoding"] == "lz4<"
    assert lz4.block.decompress(blob, uncompressed_size=frame.nbytes) == frame.tobytes()


def _hand_built_bslz4(frame: np.ndarray) -> bytes:
    """bslz4 as the Dectris docs describe it, built from bitshuffle directly (not our codec)."""
    header = struct.pack(">QI", frame.nbytes, 8192)
    return (
        header + bitshuffle.compress_lz4(frame.reshape(-1), 8192 // frame.dtype.itemsize).tobytes()
    )


def test_receiver_decodes_hand_built_dectris_messages(
    raw_push: tuple[zmq.Socket, str], pull_receiver: EigerReceiver, collector: Collector
) -> None:
    """Messages hand-built from the SIMPLON v1 docs (header 'all', images, end) are understood."""
    sock, _ = raw_push
    height, width = 24, 40
    mask = np.zeros((height, width), "<u4")
    mask[3, 7] = 1
    flat = np.full((height, width), 1.5, "<f4")
    table = np.arange(20, dtype="<f4").reshape(2, 10)
    sock.send_multipart(
        [
            b'{"htype":"dheader-1.0","series":11,"header_detail":"all"}',
            json.dumps(
                {
                    "beam_center_x": 20.5,
                    "beam_center_y": 12.0,
                    "count_time": 0.005,
                    "frame_time": 0.005,
                    "nimages": 2,
                    "x_pixel_size": 7.5e-05,
                    "detector_distance": 0.5,
                    "photon_energy": 12000.0,
                }
            ).encode(),
            json.dumps(
                {"htype": "dflatfield-1.0", "shape": [width, height], "type": "float32"}
            ).encode(),
            flat.tobytes(),
            json.dumps(
                {"htype": "dpixelmask-1.0", "shape": [width, height], "type": "uint32"}
            ).encode(),
            mask.tobytes(),
            json.dumps(
                {"htype": "dcountrate_table-1.0", "shape": [10, 2], "type": "float32"}
            ).encode(),
            table.tobytes(),
        ]
    )
    frames = [poisson_frame((height, width), "uint32", seed) for seed in (5, 6)]
    for index, frame in enumerate(frames):
        blob = _hand_built_bslz4(frame)
        sock.send_multipart(
            [
                json.dumps(
                    {
                        "htype": "dimage-1.0",
                        "series": 11,
                        "frame": index,
                        "hash": hashlib.md5(blob).hexdigest(),
                    }
                ).encode(),
                json.dumps(
                    {
                        "htype": "dimage_d-1.0",
                        "shape": [width, height],
                        "type": "uint32",
                        "encoding": "bs32-lz4<",
                        "size": len(blob),
                    }
                ).encode(),
                blob,
                json.dumps(
                    {
                        "htype": "dconfig-1.0",
                        "start_time": index * 5_000_000,
                        "stop_time": index * 5_000_000 + 5_000_000,
                        "real_time": 5_000_000,
                    }
                ).encode(),
            ]
        )
    sock.send(b'{"htype":"dseries_end-1.0","series":11}')

    assert wait_until(lambda: collector.of("end") == [11])
    series, info = collector.of("start")[0]
    assert series == 11
    assert info["header_detail"] == "all"
    assert info["beam_center_x"] == 20.5 and info["nimages"] == 2
    assert np.array_equal(info["pixel_mask"], mask)
    assert np.array_equal(info["flatfield"], flat)
    assert np.array_equal(info["countrate_table"], table)
    got = collector.of("frame")
    assert [(f.series, f.frame) for f in got] == [(11, 0), (11, 1)]
    assert all(np.array_equal(g.data, f) for g, f in zip(got, frames, strict=True))
    assert pull_receiver.counters.get("malformed") == 0


def test_hxn_replay_style_images_are_accepted(
    raw_push: tuple[zmq.Socket, str], pull_receiver: EigerReceiver, collector: Collector
) -> None:
    """HXN's replay tool sends 3 parts, no htype and no header: frames still arrive, counted."""
    sock, _ = raw_push
    frame = poisson_frame((16, 16), "uint32", 3)
    description = json.dumps(
        {"htype": "dimage_d-1.0", "encoding": "bs32-lz4<", "shape": [16, 16], "type": "uint32"}
    )
    for index in range(3):
        sock.send_multipart(
            [
                json.dumps({"frame": index, "series": 1}).encode(),
                description.encode(),
                _hand_built_bslz4(frame)[12:],
            ]
        )

    assert wait_until(lambda: len(collector.of("frame")) == 3)
    assert [f.frame for f in collector.of("frame")] == [0, 1, 2]
    assert np.array_equal(collector.of("frame")[2].data, frame)
    counts = pull_receiver.counters.snapshot()
    assert counts["unknown_series"] == 3
    assert counts["nonstandard"] == 6  # no htype and no dconfig, on each of 3 messages
    assert counts["malformed"] == 0


def _image_parts(
    series: int, frame: int, data: np.ndarray, encoding: str = "bs32-lz4<"
) -> list[bytes]:
    blob = encode(data, encoding)
    height, width = data.shape
    return [
        json.dumps({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": ""}).encode(),
        json.dumps(
            {
                "htype": "dimage_d-1.0",
                "shape": [width, height],
                "type": data.dtype.name,
                "encoding": encoding,
                "size": len(blob),
            }
        ).encode(),
        blob,
        b'{"htype":"dconfig-1.0","start_time":0,"stop_time":1,"real_time":1}',
    ]


def _malformed_messages(good: np.ndarray) -> dict[str, list[bytes]]:
    parts = _image_parts(4, 1, good)
    description = json.loads(parts[1])
    return {
        "truncated-multipart": parts[:2],
        "bad-json": [b'{"htype": "dimage-1.0", "series": 4,', *parts[1:]],
        "garbage-bytes": [b"\x89PNG\r\n\x1a\n\x00\x00garbage"],
        "unknown-htype": [b'{"htype":"dimage-9.9","series":4,"frame":1}', *parts[1:]],
        "unknown-encoding": [
            parts[0],
            json.dumps({**description, "encoding": "bs64-zstd"}).encode(),
            *parts[2:],
        ],
        "wrong-shape-size": [
            parts[0],
            json.dumps({**description, "shape": [17, 16]}).encode(),
            *parts[2:],
        ],
        "size-mismatch": [parts[0], json.dumps({**description, "size": 3}).encode(), *parts[2:]],
        "corrupt-blob": [*parts[:2], parts[2][:12] + b"\xff" * (len(parts[2]) - 12), parts[3]],
        "negative-frame": [b'{"htype":"dimage-1.0","series":4,"frame":-1}', *parts[1:]],
        "part2-not-dimage_d": [parts[0], b'{"htype":"dconfig-1.0"}', *parts[2:]],
        "bad-dconfig": [*parts[:3], b"not json"],
        "short-header": [b'{"htype":"dheader-1.0","series":4,"header_detail":"basic"}'],
        "unknown-header-detail": [
            b'{"htype":"dheader-1.0","series":4,"header_detail":"most"}',
            b"{}",
        ],
        "json-array": [b"[1, 2, 3]"],
        "huge-shape": [
            parts[0],
            json.dumps({**description, "shape": [1 << 16, 1 << 16]}).encode(),
            *parts[2:],
        ],
    }


@pytest.mark.parametrize(("out", "into"), TRANSPORTS)
def test_malformed_messages_are_counted_and_survived(
    collector: Collector, out: str, into: str
) -> None:
    """Each malformed message is one 'malformed' count; frames before and after still arrive."""
    sock = zmq.Context.instance().socket(zmq.XPUB if out == "pub" else zmq.PUSH)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    receiver = EigerReceiver(
        f"tcp://127.0.0.1:{port}",
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        socket_type=into,
    )
    try:
        receiver.start()
        if out == "pub":
            assert sock.poll(5000) and sock.recv() == b"\x01"  # the receiver's subscription
        good = [poisson_frame((16, 16), "uint32", seed) for seed in range(2)]
        bad = _malformed_messages(good[0])
        sock.send_multipart(_image_parts(4, 0, good[0]))
        for message in bad.values():
            sock.send_multipart(message)
        sock.send_multipart(_image_parts(4, 1, good[1]))

        assert wait_until(lambda: receiver.counters.get("messages") == len(bad) + 2)
        assert wait_until(lambda: len(collector.of("frame")) == 2)
        assert receiver.running
        assert receiver.counters.get("malformed") == len(bad)
        got = collector.of("frame")
        assert [f.frame for f in got] == [0, 1]
        assert all(np.array_equal(g.data, f) for g, f in zip(got, good, strict=True))
        assert receiver.counters.get("gaps") == 0
    finally:
        assert receiver.stop()
        sock.close(linger=0)


def test_malformed_message_logs_one_specific_line(
    raw_push: tuple[zmq.Socket, str], pull_receiver: EigerReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad message produces exactly one warning that says what was wrong."""
    sock, _ = raw_push
    parts = _image_parts(4, 0, poisson_frame((8, 8), "uint32", 0))
    description = json.loads(parts[1])
    with caplog.at_level("WARNING", logger="hxn_liveptycho"):
        sock.send_multipart(
            [parts[0], json.dumps({**description, "encoding": "jpeg"}).encode(), *parts[2:]]
        )
        assert wait_until(lambda: pull_receiver.counters.get("malformed") == 1)
        assert wait_until(lambda: len(caplog.records) >= 1)
    assert pull_receiver.counters.get("malformed") == 1
    assert len(caplog.records) == 1
    assert "unknown encoding 'jpeg'" in caplog.records[0].getMessage()
    assert "series 4 frame 0" in caplog.records[0].getMessage()


def test_gaps_duplicates_and_late_frames_are_counted(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]], collector: Collector
) -> None:
    """Skipped frame numbers count as gaps, repeats drop as duplicates, stragglers count as late."""
    publisher, receiver = make_pair("push", "pull")
    frame = poisson_frame((8, 8), "uint32", 0)
    publisher.start_series(1, shape=(8, 8), dtype="uint32")
    for number in (0, 1, 1, 4, 2, 5):
        publisher.send_frame(1, number, frame + number)
    publisher.end_series(1)

    assert wait_until(lambda: collector.of("end") == [1])
    assert [f.frame for f in collector.of("frame")] == [0, 1, 4, 2, 5]
    assert np.array_equal(collector.of("frame")[2].data, frame + 4)
    counts = receiver.counters.snapshot()
    assert counts["duplicates"] == 1
    assert counts["gaps"] == 2  # frames 2 and 3 were missing when 4 arrived
    assert counts["late"] == 1  # frame 2 arrived after 4
    assert counts["frames"] == 5 and counts["messages"] == 8


def test_frames_of_unannounced_series_are_delivered_and_counted(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]], collector: Collector
) -> None:
    """A frame whose series header never came is still delivered, and counted as unknown_series."""
    publisher, receiver = make_pair("push", "pull")
    publisher.send_frame(9, 0, poisson_frame((8, 8), "uint32", 0))
    publisher.send_frame(9, 1, poisson_frame((8, 8), "uint32", 1))
    assert wait_until(lambda: len(collector.of("frame")) == 2)
    assert receiver.counters.get("unknown_series") == 2
    assert collector.of("start") == []


def test_raising_callback_is_counted_and_thread_survives(collector: Collector) -> None:
    """A callback that raises is logged and counted; later frames are still delivered."""
    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push")
    seen: list[int] = []

    def flaky(frame: EigerFrame) -> None:
        seen.append(frame.frame)
        if frame.frame == 1:
            raise RuntimeError("downstream queue exploded")

    receiver = EigerReceiver(
        publisher.endpoint,
        on_series_start=collector.on_series_start,
        on_frame=flaky,
        on_series_end=collector.on_series_end,
        socket_type="pull",
    )
    try:
        receiver.start()
        for number in range(3):
            publisher.send_frame(1, number, poisson_frame((8, 8), "uint32", number))
        assert wait_until(lambda: seen == [0, 1, 2])
        assert receiver.running
        assert receiver.counters.get("callback_errors") == 1
        assert receiver.counters.get("frames") == 3
    finally:
        assert receiver.stop()
        publisher.close(linger=0)


def test_stop_is_prompt_and_idempotent_without_traffic(collector: Collector) -> None:
    """stop() ends the thread within a fraction of a second even if nothing was ever sent."""
    receiver = EigerReceiver(
        "tcp://127.0.0.1:1",  # nothing listens there: connect is lazy, so this must still work
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
    )
    receiver.start()
    assert receiver.running
    started = time.monotonic()
    assert receiver.stop(timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert not receiver.running
    assert receiver.stop()
    with pytest.raises(RuntimeError, match="cannot restart"):
        receiver.start()


def test_stop_before_start_closes_the_socket(collector: Collector) -> None:
    """A receiver that was never started can be stopped cleanly."""
    receiver = EigerReceiver(
        "tcp://127.0.0.1:1",
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        socket_type="pull",
    )
    assert receiver.stop()
    assert not receiver.running


def test_stop_drains_frames_already_received(collector: Collector) -> None:
    """Frames already queued in the socket when stop() is called are handed over, not lost.

    Over ``inproc`` a sent message is in the receiving socket's queue when ``send``
    returns (no I/O thread carries it), so all 20 are queued before stop() is asked."""
    context = zmq.Context()
    publisher = EigerPublisher("inproc://drain-on-stop", socket_type="push", context=context)
    gate = threading.Event()

    def slow(frame: EigerFrame) -> None:
        gate.wait(2.0)
        collector.on_frame(frame)

    receiver = EigerReceiver(
        publisher.endpoint,
        on_series_start=collector.on_series_start,
        on_frame=slow,
        on_series_end=collector.on_series_end,
        socket_type="pull",
        context=context,
    )
    try:
        receiver.start()
        for number in range(20):
            publisher.send_frame(1, number, poisson_frame((8, 8), "uint32", number))
        assert wait_until(lambda: receiver.counters.get("messages") >= 1)
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(receiver.stop(timeout=5.0)))
        stopper.start()
        assert wait_until(lambda: not receiver.running or receiver._stopping.is_set())
        gate.set()  # the stop request is in before the first callback returns
        stopper.join(5.0)
        assert stopped == [True]
        assert [f.frame for f in collector.of("frame")] == list(range(20))
    finally:
        receiver.stop()
        publisher.close(linger=0)
        context.term()


def test_bad_configuration_is_a_clear_error(collector: Collector) -> None:
    """Bad endpoints, socket types, encodings and partial CurveZMQ keys raise ConfigurationError."""
    callbacks = dict(
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
    )
    with pytest.raises(ConfigurationError, match="cannot connect"):
        EigerReceiver("not-an-endpoint", **callbacks)
    with pytest.raises(ConfigurationError, match="socket_type"):
        EigerReceiver("tcp://127.0.0.1:1", socket_type="req", **callbacks)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="missing: curve_public_key, curve_secret_key"):
        EigerReceiver(
            "tcp://127.0.0.1:1", curve=CurveKeys.from_keys(curve_server_key="x" * 40), **callbacks
        )
    with pytest.raises(ConfigurationError, match="unknown Eiger encoding"):
        EigerPublisher("tcp://127.0.0.1:*", encoding="gzip")
    with pytest.raises(ConfigurationError, match="cannot bind"):
        EigerPublisher("tcp://256.0.0.1:*")
    with pytest.raises(ConfigurationError, match="flavour"):
        EigerPublisher("tcp://127.0.0.1:*", flavour="v3")  # type: ignore[arg-type]


def test_publisher_endpoint_is_the_bound_port() -> None:
    """A wildcard port resolves to the real one, so receivers can connect to ``.endpoint``."""
    publisher = EigerPublisher("tcp://127.0.0.1:*")
    try:
        host, port = publisher.endpoint.rsplit(":", 1)
        assert host == "tcp://127.0.0.1"
        assert 0 < int(port) < 65536
    finally:
        publisher.close(linger=0)
    with pytest.raises(RuntimeError, match="closed"):
        publisher.send_frame(1, 0, np.zeros((4, 4), np.uint32))
