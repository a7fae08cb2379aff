"""Eiger SIMPLON stream v2 (CBOR) over real ZMQ sockets, and series bookkeeping of both flavours."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import pytest
import zmq
from cbor2 import CBORTag
from eiger_helpers import Collector, linked_pairs, wait_until

from hxn_liveptycho.errors import ConfigurationError, DecodeError
from hxn_liveptycho.streams import EigerPublisher, EigerReceiver, cbor
from hxn_liveptycho.streams.codecs import ENCODINGS

DTYPES = ("uint8", "uint16", "uint32")
TYPED_TAG = {"uint8": 64, "uint16": 69, "uint32": 70}
pytestmark = pytest.mark.usefixtures("no_leaked_receiver_threads")
SHAPE = (48, 64)  # a whole number of 4-byte elements for every dtype and every bslz4 flavour


def counts_frame(shape: tuple[int, int], dtype: str, seed: int) -> np.ndarray:
    """Detector-like counts with one pixel at the top of the dtype's range."""
    frame = np.random.default_rng(seed).poisson(3.0, shape).astype(dtype)
    frame[shape[0] // 2, shape[1] // 3] = np.iinfo(dtype).max
    return frame


@pytest.fixture
def make_pair(
    collector: Collector,
) -> Iterator[Callable[..., tuple[EigerPublisher, EigerReceiver]]]:
    """A connected publisher/receiver pair (PUSH/PULL unless told); closed after the test."""
    with linked_pairs(collector) as link:

        def make(
            wire: str = "v2",
            encoding: str = "bs32-lz4<",
            out: str = "push",
            into: str = "pull",
            **receiver_kwargs: Any,
        ) -> tuple[EigerPublisher, EigerReceiver]:
            return link(wire, encoding, out, into, **receiver_kwargs)

        yield make


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_v2_round_trip_is_bit_for_bit(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    encoding: str,
    dtype: str,
) -> None:
    """Every encoding x dtype crosses a real socket as v2 and decodes to the exact pixels."""
    publisher, receiver = make_pair("v2", encoding)
    frames = [counts_frame(SHAPE, dtype, seed) for seed in range(4)]
    publisher.start_series(
        3,
        shape=SHAPE,
        dtype=dtype,
        header={"nimages": 4, "photon_energy": 9000.0, "detector_distance": 0.55},
    )
    for index, frame in enumerate(frames):
        publisher.send_frame(3, index, frame)
    publisher.end_series(3)

    assert wait_until(lambda: collector.of("end") == [3])
    assert collector.kinds() == ["start"] + ["frame"] * 4 + ["end"]
    series, info = collector.of("start")[0]
    assert series == 3
    assert info["type"] == "start"
    assert info["number_of_images"] == 4
    assert info["incident_energy"] == 9000.0
    assert info["detector_translation"] == [0.0, 0.0, 0.55]
    assert info["detector_distance"] == 0.55
    assert info["channels"] == ["threshold_1"]
    assert (info["image_size_x"], info["image_size_y"]) == (SHAPE[1], SHAPE[0])
    got = collector.of("frame")
    assert [(f.series, f.frame) for f in got] == [(3, i) for i in range(4)]
    for sent, received in zip(frames, got, strict=True):
        assert received.data.dtype == np.dtype(dtype)
        assert received.data.shape == SHAPE
        assert np.array_equal(received.data, sent)
    counts = receiver.counters.snapshot()
    assert counts["messages"] == 6
    assert (counts["headers"], counts["frames"], counts["series_end"]) == (1, 4, 1)
    assert counts["malformed"] == counts["gaps"] == counts["stale_series"] == 0


def test_v2_over_pub_sub_with_explicit_flavour(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]], collector: Collector
) -> None:
    """v2 also works PUB->SUB (HXN's proxy) with flavour='v2' set on the receiver."""
    publisher, receiver = make_pair("v2", "lz4<", "pub", "sub", flavour="v2")
    frame = counts_frame(SHAPE, "uint32", 1)
    publisher.start_series(1, shape=SHAPE, dtype="uint32")
    publisher.send_frame(1, 0, frame)
    publisher.end_series(1)
    assert wait_until(lambda: collector.of("end") == [1])
    assert np.array_equal(collector.of("frame")[0].data, frame)
    assert receiver.counters.get("malformed") == 0


def test_one_auto_receiver_takes_v1_and_v2_interleaved(
    raw_push: tuple[zmq.Socket, str], pull_receiver: EigerReceiver, collector: Collector
) -> None:
    """Auto-detection is per message: a v1 series and then a v2 series on one socket both decode."""
    sock, _ = raw_push
    v1 = counts_frame((8, 8), "uint16", 0)
    v2 = counts_frame((8, 8), "uint16", 1)
    blob = v1.tobytes()
    sock.send(b'{"htype":"dheader-1.0","series":1,"header_detail":"none"}')
    sock.send_multipart(
        [
            b'{"htype":"dimage-1.0","series":1,"frame":0,"hash":""}',
            b'{"htype":"dimage_d-1.0","shape":[8,8],"type":"uint16","encoding":"raw"}',
            blob,
            b'{"htype":"dconfig-1.0","start_time":0,"stop_time":1,"real_time":1}',
        ]
    )
    sock.send(b'{"htype":"dseries_end-1.0","series":1}')
    sock.send(cbor2.dumps({"type": "start", "series_id": 2, "series_unique_id": "b"}))
    sock.send(_image_message(2, 0, {"threshold_1": _raw_array(v2)}, unique_id="b"))
    sock.send(cbor2.dumps({"type": "end", "series_id": 2, "series_unique_id": "b"}))

    assert wait_until(lambda: collector.of("end") == [1, 2])
    got = collector.of("frame")
    assert [(f.series, f.frame) for f in got] == [(1, 0), (2, 0)]
    assert np.array_equal(got[0].data, v1) and np.array_equal(got[1].data, v2)
    assert pull_receiver.counters.get("malformed") == 0


@pytest.mark.parametrize(("flavour", "expect_malformed"), [("v1", 3), ("v2", 0)])
def test_explicit_flavour_refuses_the_other_one(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    flavour: str,
    expect_malformed: int,
) -> None:
    """A receiver pinned to v1 counts v2 messages as malformed (and keeps running)."""
    publisher, receiver = make_pair("v2", "raw", flavour=flavour)
    publisher.start_series(1, shape=(4, 4), dtype="uint16")
    publisher.send_frame(1, 0, np.ones((4, 4), np.uint16))
    publisher.end_series(1)
    assert wait_until(lambda: receiver.counters.get("messages") == 3)
    assert wait_until(lambda: receiver.counters.get("malformed") == expect_malformed)
    assert receiver.running


# -- the exact wire layout ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "algorithm", "modifier"),
    [
        ("bs32-lz4<", "bslz4", 4),
        ("bs16-lz4<", "bslz4", 2),
        ("bs8-lz4<", "bslz4", 1),
        ("lz4<", "lz4", 0),
    ],
)
def test_publisher_v2_wire_layout_matches_dectris(
    encoding: str, algorithm: str, modifier: int
) -> None:
    """Publisher bytes follow the documented v2 layout: tag 55799, type first, tags 40/70/56500."""
    publisher = EigerPublisher(
        "tcp://127.0.0.1:*", socket_type="push", flavour="v2", encoding=encoding
    )
    pull = zmq.Context.instance().socket(zmq.PULL)
    try:
        pull.connect(publisher.endpoint)
        frame = counts_frame((20, 32), "uint32", 2)
        publisher.start_series(
            2,
            shape=(20, 32),
            dtype="uint32",
            header={"frame_time": 0.002, "count_time": 0.0015},
            series_unique_id="run-2",
        )
        publisher.send_frame(2, 5, frame)
        publisher.end_series(2)
        assert pull.poll(5000)
        start, image, end = (pull.recv_multipart() for _ in range(3))
    finally:
        pull.close(linger=0)
        publisher.close(linger=0)

    for message in (start, image, end):
        assert len(message) == 1  # v2 is never multipart
        assert message[0][:3] == b"\xd9\xd9\xf7"  # self-described CBOR
    start_map = cbor2.loads(start[0])
    assert next(iter(start_map)) == "type" and start_map["type"] == "start"
    assert start_map["series_id"] == 2 and start_map["series_unique_id"] == "run-2"
    assert start_map["frame_time"] == 0.002 and start_map["count_time"] == 0.0015
    assert start_map["pixel_size_x"] == 75e-6 and list(start_map["channels"]) == ["threshold_1"]
    assert start_map["arm_date"].tzinfo is not None  # tag 0 date/time, decoded by cbor2

    image_map = cbor2.loads(image[0])
    assert next(iter(image_map)) == "type" and image_map["type"] == "image"
    assert image_map["series_id"] == 2 and image_map["image_id"] == 5
    assert image_map["series_unique_id"] == "run-2"
    assert list(image_map["real_time"]) == [1_500_000, 1_000_000_000]
    assert list(image_map["start_time"]) == [10_000_000, 1_000_000_000]
    assert list(image_map["stop_time"]) == [11_500_000, 1_000_000_000]
    array = image_map["data"]["threshold_1"]
    assert isinstance(array, CBORTag) and array.tag == 40
    dims, typed = array.value
    assert list(dims) == [20, 32]  # row-major: height, width
    assert typed.tag == 70  # uint32 little-endian
    assert typed.value.tag == 56500
    got_algorithm, got_modifier, blob = typed.value.value
    assert (got_algorithm, got_modifier) == (algorithm, modifier)
    assert struct.unpack(">Q", blob[:8]) == (frame.nbytes,)  # HDF5-filter framing
    assert cbor2.loads(end[0]) == {"type": "end", "series_id": 2, "series_unique_id": "run-2"}


def test_publisher_v2_raw_is_a_plain_typed_array() -> None:
    """With encoding 'raw' the typed array holds the little-endian pixel bytes directly."""
    message = cbor.dumps(
        {
            "type": "image",
            "series_id": 1,
            "image_id": 0,
            "data": {"t": cbor.encode_array(np.arange(6, dtype=np.uint16).reshape(2, 3))},
        }
    )
    array = cbor2.loads(message)["data"]["t"]
    assert array.tag == 40 and list(array.value[0]) == [2, 3]
    assert array.value[1].tag == 69
    assert array.value[1].value == np.arange(6, dtype="<u2").tobytes()


def test_header_detail_all_carries_flatfield_mask_and_table(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]], collector: Collector
) -> None:
    """A v2 'all' start message carries per-channel flatfield and pixel mask, decoded to arrays."""
    publisher, _ = make_pair("v2", "raw")
    mask = np.zeros((6, 10), np.uint32)
    mask[2, 3] = 1
    flat = np.full((6, 10), 1.25, np.float32)
    publisher.start_series(
        4,
        shape=(6, 10),
        dtype="uint16",
        header_detail="all",
        pixel_mask=mask,
        flatfield=flat,
        channels=["threshold_1", "threshold_2"],
    )
    assert wait_until(lambda: len(collector.of("start")) == 1)
    _, info = collector.of("start")[0]
    assert set(info["pixel_mask"]) == {"threshold_1", "threshold_2"}
    assert np.array_equal(info["pixel_mask"]["threshold_2"], mask)
    assert info["flatfield"]["threshold_1"].dtype == np.float32
    assert np.array_equal(info["flatfield"]["threshold_1"], flat)
    assert np.array_equal(info["countrate_correction_lookup_table"], np.arange(1000))
    assert set(info["threshold_energy"]) == {"threshold_1", "threshold_2"}


# -- golden messages built by hand -------------------------------------------------------


def _raw_array(frame: np.ndarray) -> CBORTag:
    return CBORTag(40, [list(frame.shape), CBORTag(TYPED_TAG[frame.dtype.name], frame.tobytes())])


def _bslz4_array(frame: np.ndarray, elem: int) -> CBORTag:
    """bslz4 per the DECTRIS compression-tag document, straight from bitshuffle (not our codec)."""
    header = struct.pack(">QI", frame.nbytes, 8192)
    words = frame.reshape(-1).view(f"<u{elem}")
    blob = header + bitshuffle.compress_lz4(words, 8192 // elem).tobytes()
    return CBORTag(
        40,
        [
            list(frame.shape),
            CBORTag(TYPED_TAG[frame.dtype.name], CBORTag(56500, ["bslz4", elem, blob])),
        ],
    )


def _lz4_array(frame: np.ndarray) -> CBORTag:
    """lz4 in the HDF5 LZ4-filter framing, one block, from the lz4 library directly."""
    block = lz4.block.compress(frame.tobytes(), store_size=False)
    blob = struct.pack(">QI", frame.nbytes, frame.nbytes) + struct.pack(">I", len(block)) + block
    return CBORTag(
        40,
        [list(frame.shape), CBORTag(TYPED_TAG[frame.dtype.name], CBORTag(56500, ["lz4", 0, blob]))],
    )


def _image_message(
    series: int,
    image: int,
    data: dict[str, Any],
    *,
    unique_id: str = "golden",
    self_described: bool = True,
) -> bytes:
    message = {
        "type": "image",
        "series_id": series,
        "series_unique_id": unique_id,
        "image_id": image,
        "real_time": [5_000, 1_000_000],
        "start_time": [image * 5_000, 1_000_000],
        "stop_time": [image * 5_000 + 5_000, 1_000_000],
        "data": data,
    }
    return cbor2.dumps(CBORTag(55799, message) if self_described else message)


def test_literal_golden_bytes_decode() -> None:
    """A v2 image written out byte by byte (RFC 8949 / 8746) decodes to the intended pixels."""
    golden = bytes.fromhex(
        "d9d9f7"  # tag 55799: self-described CBOR
        "a5"  # a map of 5 pairs
        "64"
        + b"type".hex()
        + "65"
        + b"image".hex()  # "type": "image"
        + "69"
        + b"series_id".hex()
        + "03"  # "series_id": 3
        + "70"
        + b"series_unique_id".hex()
        + "61"
        + b"u".hex()  # "series_unique_id": "u"
        + "68"
        + b"image_id".hex()
        + "00"  # "image_id": 0
        + "64"
        + b"data".hex()
        + "a1"  # "data": {
        + "6b"
        + b"threshold_1".hex()  # "threshold_1":
        + "d828"
        + "82"
        + "820203"  # tag 40 [[2, 3],
        + "d845"
        + "4c"
        + "010002000300040005"
        + "00ffff"  # tag 69 (uint16 LE) 12 bytes]}
    )
    message = cbor.loads(golden)
    assert (message.type, message.series_id, message.series_unique_id) == ("image", 3, "u")
    assert message.image_id == 0 and message.channels == ["threshold_1"]
    pixels = cbor.decode_channel(message, "threshold_1")
    assert pixels.dtype == np.uint16
    assert pixels.tolist() == [[1, 2, 3], [4, 5, 65535]]


def test_hand_built_dectris_series_is_understood(
    raw_push: tuple[zmq.Socket, str], pull_receiver: EigerReceiver, collector: Collector
) -> None:
    """Start/image/end hand-built with cbor2.CBORTag (three codecs, three dtypes) decode exactly."""
    sock, _ = raw_push
    height, width = 24, 40
    mask = np.zeros((height, width), "<u4")
    mask[1, 2] = 4
    start = {
        "type": "start",
        "series_id": 11,
        "series_unique_id": "golden",
        "arm_date": CBORTag(0, "2025-02-28T18:44:22.905865+00:00"),
        "beam_center_x": 20.5,
        "beam_center_y": 12.0,
        "channels": ["threshold_1"],
        "count_time": 0.005,
        "frame_time": 0.005,
        "number_of_images": 4,
        "image_size_x": width,
        "image_size_y": height,
        "incident_energy": 12000.0,
        "pixel_size_x": 7.5e-05,
        "pixel_size_y": 7.5e-05,
        "detector_translation": [0.0, 0.0, 0.5],
        "threshold_energy": {"threshold_1": 6000.0},
        "pixel_mask": {"threshold_1": CBORTag(40, [[height, width], CBORTag(70, mask.tobytes())])},
        "countrate_correction_lookup_table": CBORTag(70, np.arange(5, dtype="<u4").tobytes()),
        "user_data": {"anything": [1, 2]},
    }
    sock.send(cbor2.dumps(CBORTag(55799, start)))
    frames = [
        counts_frame((height, width), "uint32", 1),
        counts_frame((height, width), "uint16", 2),
        counts_frame((height, width), "uint8", 3),
        counts_frame((height, width), "uint16", 4),
    ]
    arrays = [
        _bslz4_array(frames[0], 4),
        _bslz4_array(frames[1], 2),
        _raw_array(frames[2]),
        _lz4_array(frames[3]),
    ]
    for index, array in enumerate(arrays):
        # one message without the 55799 prefix: a bare map is CBOR too
        sock.send(_image_message(11, index, {"threshold_1": array}, self_described=index != 2))
    sock.send(
        cbor2.dumps(CBORTag(55799, {"type": "end", "series_id": 11, "series_unique_id": "golden"}))
    )

    assert wait_until(lambda: collector.of("end") == [11])
    series, info = collector.of("start")[0]
    assert series == 11
    assert info["beam_center_x"] == 20.5 and info["number_of_images"] == 4
    assert info["detector_distance"] == 0.5
    assert info["arm_date"].year == 2025
    assert info["user_data"] == {"anything": [1, 2]}
    assert np.array_equal(info["pixel_mask"]["threshold_1"], mask)
    assert info["countrate_correction_lookup_table"].tolist() == [0, 1, 2, 3, 4]
    got = collector.of("frame")
    assert [(f.series, f.frame) for f in got] == [(11, i) for i in range(4)]
    for sent, received in zip(frames, got, strict=True):
        assert received.data.dtype == sent.dtype
        assert np.array_equal(received.data, sent)
    assert pull_receiver.counters.get("malformed") == 0


# -- several channels ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "expected"), [("threshold_2", 1), (None, 0), ("threshold_1", 0)]
)
def test_multi_channel_images_deliver_the_configured_channel(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    channel: str | None,
    expected: int,
) -> None:
    """The configured channel (None: the first) is delivered; the other one is only counted."""
    publisher, receiver = make_pair("v2", "bs16-lz4<", channel=channel)
    names = ["threshold_1", "threshold_2"]
    publisher.start_series(1, shape=SHAPE, dtype="uint16", channels=names)
    sent = []
    for index in range(3):
        pair = [counts_frame(SHAPE, "uint16", 10 * index + k) for k in range(2)]
        sent.append(pair[expected])
        publisher.send_frame(1, index, dict(zip(names, pair, strict=True)))
    publisher.end_series(1)

    assert wait_until(lambda: collector.of("end") == [1])
    assert collector.of("start")[0][1]["channels"] == names
    got = collector.of("frame")
    assert [f.frame for f in got] == [0, 1, 2]
    assert all(np.array_equal(g.data, s) for g, s in zip(got, sent, strict=True))
    assert receiver.counters.get("other_channels") == 3
    assert receiver.counters.get("malformed") == 0


def test_missing_configured_channel_is_malformed_not_fatal(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An image without the configured channel is one 'malformed' count naming the channels."""
    publisher, receiver = make_pair("v2", "raw", channel="threshold_3")
    publisher.start_series(1, shape=(4, 4), dtype="uint8", channels=["threshold_1", "threshold_2"])
    for index in range(2):
        frame = np.full((4, 4), index, np.uint8)
        publisher.send_frame(1, index, {"threshold_1": frame, "threshold_2": frame})
    publisher.end_series(1)
    with caplog.at_level("WARNING", logger="hxn_liveptycho"):
        assert wait_until(lambda: collector.of("end") == [1])
    assert collector.of("frame") == []
    assert receiver.counters.get("malformed") == 2
    assert receiver.running
    assert any(
        "'threshold_3': no such channel" in r.getMessage() and "threshold_2" in r.getMessage()
        for r in caplog.records
    )


# -- malformed CBOR --------------------------------------------------------------------------


def _malformed_v2(good: np.ndarray) -> dict[str, list[bytes]]:
    """Broken v2 messages, each for image 1 of series 4 unless the breakage forbids it."""
    typed = CBORTag(70, good.tobytes())
    shape = list(good.shape)
    packed = bitshuffle.compress_lz4(good.reshape(-1), 2048).tobytes()
    bslz4 = struct.pack(">QI", good.nbytes, 8192) + packed

    def image(array: Any, **extra: Any) -> bytes:
        return _image_message(4, 1, {"threshold_1": array}, **extra)

    whole = image(CBORTag(40, [shape, typed]))
    return {
        "truncated": [whole[: len(whole) // 2]],
        "truncated-by-one": [whole[:-1]],
        "trailing-bytes": [whole + b"\x00"],
        "empty": [b""],
        "not-a-map": [cbor2.dumps(CBORTag(55799, [1, 2, 3]))],
        "unknown-type": [cbor2.dumps({"type": "picture", "series_id": 4})],
        "missing-series-id": [cbor2.dumps({"type": "image", "image_id": 1, "data": {}})],
        "negative-image-id": [
            cbor2.dumps({"type": "image", "series_id": 4, "image_id": -1, "data": {}})
        ],
        "bool-series-id": [cbor2.dumps({"type": "end", "series_id": True})],
        "empty-data": [cbor2.dumps({"type": "image", "series_id": 4, "image_id": 1, "data": {}})],
        "wrong-array-tag": [image(CBORTag(41, [shape, typed]))],
        "column-major": [image(CBORTag(1040, [shape, typed]))],
        "wrong-typed-tag": [image(CBORTag(40, [shape, CBORTag(99, good.tobytes())]))],
        "big-endian-tag": [image(CBORTag(40, [shape, CBORTag(66, good.tobytes())]))],
        "array-not-tagged": [image([shape, good.tobytes()])],
        "shape-vs-bytes": [image(CBORTag(40, [[16, 17], typed]))],
        "three-dims": [image(CBORTag(40, [[2, 16, 8], typed]))],
        "huge-dims": [image(CBORTag(40, [[1 << 20, 1 << 20], typed]))],
        "unknown-compression": [
            image(CBORTag(40, [shape, CBORTag(70, CBORTag(56500, ["zstd", 0, bslz4]))]))
        ],
        "bslz4-elem-size-3": [
            image(CBORTag(40, [shape, CBORTag(70, CBORTag(56500, ["bslz4", 3, bslz4]))]))
        ],
        "compression-two-items": [
            image(CBORTag(40, [shape, CBORTag(70, CBORTag(56500, ["bslz4", 4]))]))
        ],
        "corrupt-compressed": [
            image(
                CBORTag(
                    40,
                    [shape, CBORTag(70, CBORTag(56500, ["bslz4", 4, bslz4[:12] + b"\xff" * 40]))],
                )
            )
        ],
        "bad-rational": [
            cbor2.dumps(
                {
                    "type": "image",
                    "series_id": 4,
                    "image_id": 1,
                    "real_time": [1, 0],
                    "data": {"threshold_1": CBORTag(40, [shape, typed])},
                }
            )
        ],
        "two-parts": [whole, whole],
        "deep-nesting": [b"\xa1\x64type" + b"\x81" * 1000],
    }


def test_malformed_v2_messages_are_counted_and_survived(
    raw_push: tuple[zmq.Socket, str], pull_receiver: EigerReceiver, collector: Collector
) -> None:
    """Each broken v2 message is one 'malformed' count; good frames before and after arrive."""
    sock, _ = raw_push
    good = [counts_frame((16, 16), "uint32", seed) for seed in range(2)]
    bad = _malformed_v2(good[0])
    sock.send(_image_message(4, 0, {"threshold_1": _raw_array(good[0])}))
    for message in bad.values():
        sock.send_multipart(message)
    sock.send(_image_message(4, 1, {"threshold_1": _bslz4_array(good[1], 4)}))

    assert wait_until(lambda: pull_receiver.counters.get("messages") == len(bad) + 2)
    assert wait_until(lambda: len(collector.of("frame")) == 2)
    assert pull_receiver.running
    assert pull_receiver.counters.get("malformed") == len(bad)
    got = collector.of("frame")
    assert [f.frame for f in got] == [0, 1]
    assert all(np.array_equal(g.data, f) for g, f in zip(got, good, strict=True))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("unknown-compression", "unknown compression algorithm 'zstd'"),
        ("shape-vs-bytes", "expected 1088"),
        ("wrong-array-tag", "expected tag 40"),
        ("truncated", "not valid CBOR"),
        ("bslz4-elem-size-3", "element size 3"),
        ("huge-dims", "exceed"),
    ],
)
def test_malformed_v2_errors_say_what_is_wrong(name: str, fragment: str) -> None:
    """The decoder's DecodeError names the problem (what the one log line will say)."""
    (message,) = _malformed_v2(counts_frame((16, 16), "uint32", 0))[name]
    with pytest.raises(DecodeError, match=fragment):
        parsed = cbor.loads(message)
        cbor.decode_channel(parsed, "threshold_1")


# -- series bookkeeping, both flavours ------------------------------------------------------


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_rearm_mid_run_starts_a_new_series_and_discards_stragglers(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    flavour: str,
) -> None:
    """A header before the old series ended wins; the old series' late frames and end are stale."""
    publisher, receiver = make_pair(flavour, "bs16-lz4<")
    frame = counts_frame((8, 8), "uint16", 0)
    publisher.start_series(1, shape=(8, 8), dtype="uint16")
    for index in range(3):
        publisher.send_frame(1, index, frame + index)
    publisher.start_series(2, shape=(8, 8), dtype="uint16")  # re-armed: series 1 never ended
    publisher.send_frame(2, 0, frame + 10)
    publisher.send_frame(1, 3, frame)  # a straggler of the old series
    publisher.send_frame(2, 1, frame + 11)
    publisher.end_series(1)  # the old series' end, after the new header
    publisher.end_series(2)

    assert wait_until(lambda: collector.of("end") == [2])
    assert [s for s, _ in collector.of("start")] == [1, 2]
    assert [(f.series, f.frame) for f in collector.of("frame")] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
    ]
    assert np.array_equal(collector.of("frame")[4].data, frame + 11)
    assert wait_until(lambda: receiver.counters.get("messages") == 10)
    counts = receiver.counters.snapshot()
    assert counts["stale_series"] == 2
    assert counts["duplicates"] == counts["gaps"] == counts["late"] == counts["malformed"] == 0
    assert counts["series_end"] == 1


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_unannounced_older_series_after_a_header_is_stale(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    flavour: str,
) -> None:
    """After a header for series 7, frames of series 3 are dropped; newer series 9 still arrives."""
    publisher, receiver = make_pair(flavour, "raw")
    frame = np.ones((4, 4), np.uint16)
    publisher.start_series(7, shape=(4, 4), dtype="uint16")
    publisher.send_frame(3, 0, frame)
    publisher.send_frame(7, 0, frame)
    publisher.send_frame(9, 0, frame)
    assert wait_until(lambda: len(collector.of("frame")) == 2)
    assert wait_until(lambda: receiver.counters.get("messages") == 4)
    assert [(f.series, f.frame) for f in collector.of("frame")] == [(7, 0), (9, 0)]
    counts = receiver.counters.snapshot()
    assert counts["stale_series"] == 1 and counts["unknown_series"] == 1


def test_v2_same_series_id_new_unique_id_is_a_new_series(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]], collector: Collector
) -> None:
    """A re-arm that reuses the series number is told apart by series_unique_id."""
    publisher, receiver = make_pair("v2", "raw")
    frame = np.ones((4, 4), np.uint32)
    publisher.start_series(5, shape=(4, 4), dtype="uint32", series_unique_id="A")
    publisher.send_frame(5, 0, frame)
    publisher.send_frame(5, 1, frame)
    publisher.start_series(5, shape=(4, 4), dtype="uint32", series_unique_id="B")
    publisher.send_frame(5, 0, frame * 2)  # frame 0 again, of the new arm: not a duplicate
    publisher.end_series(5)

    assert wait_until(lambda: collector.of("end") == [5])
    stale_image = _image_message(5, 2, {"threshold_1": _raw_array(frame)}, unique_id="A")
    stale_end = cbor2.dumps({"type": "end", "series_id": 5, "series_unique_id": "A"})
    # Replay the old arm's straggler through the publisher's own socket (a PUSH peer).
    publisher.send_parts([stale_image])
    publisher.send_parts([stale_end])
    assert wait_until(lambda: receiver.counters.get("stale_series") == 2)
    assert [s for s, _ in collector.of("start")] == [5, 5]
    assert [f.frame for f in collector.of("frame")] == [0, 1, 0]
    assert np.array_equal(collector.of("frame")[2].data, frame * 2)
    assert collector.of("end") == [5]
    counts = receiver.counters.snapshot()
    assert counts["duplicates"] == 0 and counts["malformed"] == 0


def test_receiver_refuses_unknown_flavour_or_channel(collector: Collector) -> None:
    """flavour must be auto/v1/v2 and channel a name (or None); anything else is a clear error."""
    callbacks = dict(
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
    )
    with pytest.raises(ConfigurationError, match="flavour 'cbor'"):
        EigerReceiver("tcp://127.0.0.1:1", flavour="cbor", **callbacks)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="channel must be"):
        EigerReceiver("tcp://127.0.0.1:1", channel="", **callbacks)
    publisher = EigerPublisher("tcp://127.0.0.1:*", flavour="v1")
    try:
        with pytest.raises(ValueError, match="one channel per image"):
            publisher.start_series(1, shape=(4, 4), dtype="uint16", channels=["a", "b"])
        with pytest.raises(ValueError, match="one channel per image"):
            publisher.send_frame(1, 0, {"a": np.zeros((4, 4), np.uint16)})
    finally:
        publisher.close(linger=0)


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_frames_that_overtake_their_header_keep_their_count(
    make_pair: Callable[..., tuple[EigerPublisher, EigerReceiver]],
    collector: Collector,
    flavour: str,
) -> None:
    """A header arriving after its first frames adopts them: a repeat is still a duplicate."""
    publisher, receiver = make_pair(flavour, "raw")
    frame = np.ones((4, 4), np.uint16)
    publisher.send_frame(2, 0, frame)
    publisher.send_frame(2, 1, frame)
    assert wait_until(lambda: len(collector.of("frame")) == 2)
    publisher.start_series(2, shape=(4, 4), dtype="uint16")
    publisher.send_frame(2, 1, frame)
    publisher.send_frame(2, 2, frame)
    publisher.end_series(2)
    assert wait_until(lambda: collector.of("end") == [2])
    assert [f.frame for f in collector.of("frame")] == [0, 1, 2]
    counts = receiver.counters.snapshot()
    assert counts["duplicates"] == 1 and counts["unknown_series"] == 2
    assert counts["stale_series"] == counts["gaps"] == counts["malformed"] == 0
