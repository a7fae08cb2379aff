"""Issue 23, 'Why' (smaller): ``header_detail=all`` with one undecodable flatfield/mask part
dropped the whole series header, so every frame then counted as ``unknown_series``.

Now the header's good parts are used, each broken or missing detail part is counted
(``header_parts_dropped``) and named in one warning line, and the frames flow as
frames of an announced series. SIMPLON v1 (JSON multipart, parts hand-built from the
DECTRIS docs) and v2 (CBOR ``start``), through the receiver's thread and its decode pool.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import cbor2
import numpy as np
import pytest
import zmq
from cbor2 import CBORTag
from eiger_helpers import Collector, wait_until

from hxn_liveptycho.streams import EigerReceiver, encode
from hxn_liveptycho.streams.eiger_messages import SeriesStartEvent, parse

pytestmark = [pytest.mark.usefixtures("no_leaked_receiver_threads"), pytest.mark.timeout(60)]

HEIGHT, WIDTH = 24, 40
CONFIG = {"beam_center_x": 20.5, "beam_center_y": 12.0, "nimages": 2, "frame_time": 0.005}
MASK = np.zeros((HEIGHT, WIDTH), "<u4")
MASK[3, 7] = 1
FLAT = np.full((HEIGHT, WIDTH), 1.5, "<f4")
TABLE = np.arange(20, dtype="<f4").reshape(2, 10)


def _detail(htype: str, array: np.ndarray) -> list[bytes]:
    height, width = array.shape
    description = {"htype": htype, "shape": [width, height], "type": array.dtype.name}
    return [json.dumps(description).encode(), array.tobytes()]


def _header_v1(flat: list[bytes], mask: list[bytes], table: list[bytes]) -> list[bytes]:
    first = b'{"htype":"dheader-1.0","series":11,"header_detail":"all"}'
    return [first, json.dumps(CONFIG).encode(), *flat, *mask, *table]


FLAT_PARTS = _detail("dflatfield-1.0", FLAT)
MASK_PARTS = _detail("dpixelmask-1.0", MASK)
TABLE_PARTS = _detail("dcountrate_table-1.0", TABLE)

#: name -> (the header's parts, the key left out of the series info, words its line names)
BROKEN_V1: dict[str, tuple[list[bytes], str, tuple[str, ...]]] = {
    "flatfield-short-blob": (
        _header_v1([FLAT_PARTS[0], FLAT_PARTS[1][:-4]], MASK_PARTS, TABLE_PARTS),
        "flatfield",
        ("dflatfield-1.0", "parts 3-4", "expected 3840"),
    ),
    "mask-description-not-json": (
        _header_v1(FLAT_PARTS, [b"{not json", MASK_PARTS[1]], TABLE_PARTS),
        "pixel_mask",
        ("dpixelmask-1.0", "parts 5-6"),
    ),
    "mask-unknown-type": (
        _header_v1(
            FLAT_PARTS,
            [json.loads(MASK_PARTS[0]) | {"type": "complex-ish"}, MASK_PARTS[1]],
            TABLE_PARTS,
        ),
        "pixel_mask",
        ("dpixelmask-1.0", "unknown pixel type"),
    ),
    "flatfield-missing": (
        _header_v1([], MASK_PARTS, TABLE_PARTS),
        "flatfield",
        ("dflatfield-1.0: missing",),
    ),
    "flatfield-without-its-blob": (
        _header_v1(FLAT_PARTS[:1], MASK_PARTS, TABLE_PARTS),
        "flatfield",
        ("dflatfield-1.0 (part 3): no data part",),
    ),
    "table-without-its-blob": (
        _header_v1(FLAT_PARTS, MASK_PARTS, TABLE_PARTS[:1]),
        "countrate_table",
        ("dcountrate_table-1.0", "no data part"),
    ),
}


def _as_bytes(parts: list[Any]) -> list[bytes]:
    return [json.dumps(p).encode() if isinstance(p, dict) else p for p in parts]


def _image_v1(frame: int, data: np.ndarray) -> list[bytes]:
    blob = encode(data, "bs32-lz4<")
    height, width = data.shape
    description = {
        "htype": "dimage_d-1.0",
        "shape": [width, height],
        "type": data.dtype.name,
        "encoding": "bs32-lz4<",
        "size": len(blob),
    }
    return [
        json.dumps({"htype": "dimage-1.0", "series": 11, "frame": frame, "hash": ""}).encode(),
        json.dumps(description).encode(),
        blob,
        b'{"htype":"dconfig-1.0","start_time":0,"stop_time":1,"real_time":1}',
    ]


def _frames() -> list[np.ndarray]:
    return [np.random.default_rng(s).poisson(3.0, (HEIGHT, WIDTH)).astype("<u4") for s in (1, 2)]


@pytest.fixture(params=[0, 2], ids=["receiver-thread", "decode-pool"])
def receiver(
    request: pytest.FixtureRequest, collector: Collector, raw_push: tuple[zmq.Socket, str]
) -> Iterator[EigerReceiver]:
    made = EigerReceiver(
        raw_push[1],
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        socket_type="pull",
        decode_threads=request.param,
    )
    made.start()
    yield made
    assert made.stop(timeout=5.0)


@pytest.mark.parametrize("case", list(BROKEN_V1))
def test_v1_all_header_with_a_broken_part_keeps_the_rest_and_the_frames(
    case: str,
    raw_push: tuple[zmq.Socket, str],
    receiver: EigerReceiver,
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts, lost, words = BROKEN_V1[case]
    sock, _ = raw_push
    frames = _frames()
    with caplog.at_level("WARNING", logger="hxn_liveptycho"):
        sock.send_multipart(_as_bytes(parts))
        for index, frame in enumerate(frames):
            sock.send_multipart(_image_v1(index, frame))
        sock.send(b'{"htype":"dseries_end-1.0","series":11}')
        assert wait_until(lambda: collector.of("end") == [11])

    assert collector.kinds() == ["start", "frame", "frame", "end"]
    series, info = collector.of("start")[0]
    assert series == 11 and info["beam_center_x"] == 20.5 and info["nimages"] == 2
    assert lost not in info
    kept = {"flatfield": FLAT, "pixel_mask": MASK, "countrate_table": TABLE}
    for key, array in kept.items():
        if key != lost:
            assert np.array_equal(info[key], array), key
    assert len(info["header_parts_dropped"]) >= 1
    got = collector.of("frame")
    assert all(np.array_equal(g.data, f) for g, f in zip(got, frames, strict=True))
    counts = receiver.counters.snapshot()
    assert counts["header_parts_dropped"] == len(info["header_parts_dropped"])
    assert counts["headers"] == 1 and counts["frames"] == 2
    assert counts["malformed"] == counts["unknown_series"] == 0
    lines = [r.getMessage() for r in caplog.records if "detail part" in r.getMessage()]
    assert len(lines) == 1, lines  # once per header
    assert "series 11 header" in lines[0] and "the rest of the header is used" in lines[0]
    assert all(word in lines[0] for word in words), lines[0]


def test_v1_whole_all_header_drops_nothing() -> None:
    """The good case parses as before: no part dropped, no key added."""
    parts = _header_v1(FLAT_PARTS, MASK_PARTS, TABLE_PARTS)
    event = parse(parts, flavour="v1", channel=None, transform=None)  # type: ignore[arg-type]
    assert isinstance(event, SeriesStartEvent)
    assert event.dropped == ()
    assert "header_parts_dropped" not in event.info
    assert np.array_equal(event.info["flatfield"], FLAT)


def test_v1_all_header_without_its_configuration_is_still_malformed() -> None:
    """The configuration part is what a series needs: without it the header is refused."""
    from hxn_liveptycho.errors import DecodeError

    with pytest.raises(DecodeError, match="needs 8"):
        parse(
            [b'{"htype":"dheader-1.0","series":11,"header_detail":"all"}'],  # type: ignore[list-item]
            flavour="v1",
            channel=None,
            transform=None,
        )


def _start_v2(flatfield: Any) -> bytes:
    mask = CBORTag(40, [[HEIGHT, WIDTH], CBORTag(70, MASK.tobytes())])
    start = {
        "type": "start",
        "series_id": 12,
        "series_unique_id": "parts",
        "channels": ["threshold_1"],
        "frame_time": 0.005,
        "number_of_images": 2,
        "image_size_x": WIDTH,
        "image_size_y": HEIGHT,
        "flatfield": {"threshold_1": flatfield},
        "pixel_mask": {"threshold_1": mask},
        "countrate_correction_lookup_table": CBORTag(70, np.arange(5, dtype="<u4").tobytes()),
    }
    return cbor2.dumps(CBORTag(55799, start))


def _image_v2(frame: int, data: np.ndarray) -> bytes:
    array = CBORTag(40, [list(data.shape), CBORTag(70, data.tobytes())])
    message = {
        "type": "image",
        "series_id": 12,
        "series_unique_id": "parts",
        "image_id": frame,
        "data": {"threshold_1": array},
    }
    return cbor2.dumps(CBORTag(55799, message))


@pytest.mark.parametrize(
    ("flatfield", "words"),
    [
        (
            CBORTag(40, [[HEIGHT, WIDTH], CBORTag(85, CBORTag(56500, ["bslz4", 4, b"\xff" * 40]))]),
            "corrupt",
        ),
        (CBORTag(40, [[HEIGHT, WIDTH], CBORTag(85, FLAT.tobytes()[:-8])]), "expected 3840"),
    ],
    ids=["corrupt-compressed", "short"],
)
def test_v2_start_with_a_broken_flatfield_keeps_the_rest_and_the_frames(
    flatfield: Any,
    words: str,
    raw_push: tuple[zmq.Socket, str],
    receiver: EigerReceiver,
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, _ = raw_push
    frames = _frames()
    with caplog.at_level("WARNING", logger="hxn_liveptycho"):
        sock.send(_start_v2(flatfield))
        for index, frame in enumerate(frames):
            sock.send(_image_v2(index, frame))
        sock.send(
            cbor2.dumps(
                CBORTag(55799, {"type": "end", "series_id": 12, "series_unique_id": "parts"})
            )
        )
        assert wait_until(lambda: collector.of("end") == [12])

    assert collector.kinds() == ["start", "frame", "frame", "end"]
    _, info = collector.of("start")[0]
    assert "flatfield" not in info
    assert np.array_equal(info["pixel_mask"]["threshold_1"], MASK)
    assert info["countrate_correction_lookup_table"].tolist() == [0, 1, 2, 3, 4]
    assert info["number_of_images"] == 2
    (dropped,) = info["header_parts_dropped"]
    assert dropped.startswith("flatfield['threshold_1']") and words in dropped
    counts = receiver.counters.snapshot()
    assert counts["header_parts_dropped"] == 1
    assert counts["headers"] == 1 and counts["frames"] == 2
    assert counts["malformed"] == counts["unknown_series"] == 0
    lines = [r.getMessage() for r in caplog.records if "detail part" in r.getMessage()]
    assert len(lines) == 1 and "series 12 header: 1 detail part(s) dropped" in lines[0]
