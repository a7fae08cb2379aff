"""One Eiger stream message (v1 JSON multipart or v2 CBOR) parsed into a series event.

Parsing is pure: it reads the message and decodes (and transforms) the pixels,
but decides nothing about series. That split lets the same parsing run on the
receiver thread, on a decode pool or in worker processes, while one
:class:`~hxn_liveptycho.streams.eiger_series.EigerSeriesBook` applies the events.

A message that cannot be attributed to a series raises DecodeError. An image whose
series and frame number are readable but whose pixels (or v1 ``dconfig``) are bad
parses to an :class:`ImageEvent` carrying the error: the book first decides whether
the series is stale (then it is counted as stale, not malformed), exactly as
inline handling always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from hxn_liveptycho.errors import DecodeError
from hxn_liveptycho.streams import cbor, codecs
from hxn_liveptycho.streams._zmq import int_field, json_part

#: How much a v1 series header carries (``header_detail``).
HEADER_DETAILS = ("none", "basic", "all")
#: The wire formats: v1 JSON multipart, v2 CBOR.
FLAVOURS = ("v1", "v2")
#: The channel a single-channel detector (and the simulator by default) names its data.
DEFAULT_CHANNEL = "threshold_1"
#: Parts of a dheader-1.0 message per header_detail (an appendix may follow).
HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
#: The "all" header's detail arrays: htype -> key in the series-start dict.
_HEADER_ARRAYS = {
    "dflatfield-1.0": "flatfield",
    "dpixelmask-1.0": "pixel_mask",
    "dcountrate_table-1.0": "countrate_table",
}

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class EigerFrame:
    """One decoded image; ``frame`` is 0-based within the series, as the detector counts."""

    series: int
    frame: int
    data: np.ndarray


@dataclass(slots=True)
class SeriesStartEvent:
    """A series header (v1 ``dheader-1.0``, v2 ``start``).

    ``dropped`` names the header's detail parts (flatfield, pixel mask, count-rate table)
    that were broken or missing and left out of ``info``, each with why: the rest of the
    header still starts the series, and the book counts and logs them.
    """

    series: int
    unique_id: str | None
    info: dict[str, Any]
    dropped: tuple[str, ...] = ()


@dataclass(slots=True)
class ImageEvent:
    """One image: its pixels (transformed), or why they could not be decoded.

    ``counts_always`` are counted whatever happens to the image (a v1 image
    without an htype); ``counts_if_kept`` only when it is neither stale nor bad
    (a v1 image without ``dconfig``, v2 channels not delivered).
    """

    series: int
    frame: int
    unique_id: str | None
    data: np.ndarray | None
    error: str | None = None
    counts_always: tuple[tuple[str, int], ...] = ()
    counts_if_kept: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True)
class SeriesEndEvent:
    """A series end (v1 ``dseries_end-1.0``, v2 ``end``)."""

    series: int
    unique_id: str | None


EigerEvent = SeriesStartEvent | ImageEvent | SeriesEndEvent


def buffer(part: zmq.Frame | bytes) -> memoryview:
    return part.buffer if isinstance(part, zmq.Frame) else memoryview(part)


def is_v2(parts: list[zmq.Frame], flavour: str) -> bool:
    """Which parser a message goes to: ``flavour`` unless "auto", then a CBOR map is v2."""
    if flavour == "auto":
        return cbor.looks_like_v2(buffer(parts[0]))
    return flavour == "v2"


def parse(
    parts: list[zmq.Frame],
    *,
    flavour: str,
    channel: str | None,
    transform: Transform | None,
) -> EigerEvent:
    """Parse one message; DecodeError when it belongs to no series."""
    if is_v2(parts, flavour):
        return _parse_v2(parts, channel, transform)
    return _parse_v1(parts, transform)


def _transformed(pixels: np.ndarray, transform: Transform | None) -> np.ndarray:
    return pixels if transform is None else transform(pixels)


# -- v1 (JSON multipart) ------------------------------------------------------------------


def _parse_v1(parts: list[zmq.Frame], transform: Transform | None) -> EigerEvent:
    first = json_part(parts[0], "part 1")
    htype = first.get("htype")
    always: tuple[tuple[str, int], ...] = ()
    if htype is None and "frame" in first:
        # HXN's replay tool sends {"frame", "series"} without an htype.
        always = (("nonstandard", 1),)
        htype = "dimage-1.0"
    if htype == "dimage-1.0":
        return _parse_image_v1(parts, first, transform, always)
    if htype == "dheader-1.0":
        return _parse_header_v1(parts, first)
    if htype == "dseries_end-1.0":
        return SeriesEndEvent(int_field(first, "series", "dseries_end-1.0"), None)
    raise DecodeError(f"unknown htype {htype!r} in part 1 ({len(parts)} parts)")


def _parse_header_v1(parts: list[zmq.Frame], first: dict[str, Any]) -> SeriesStartEvent:
    series = int_field(first, "series", "dheader-1.0")
    detail = first.get("header_detail", "none")
    if detail not in HEADER_PARTS:
        raise DecodeError(f"dheader-1.0: unknown header_detail {detail!r}")
    needed = HEADER_PARTS[detail]
    # The configuration (part 2) is what a series needs; an 'all' header's detail parts
    # may each be broken or missing without losing it (they are dropped and named).
    required = min(needed, 2)
    if len(parts) < required:
        raise DecodeError(
            f"dheader-1.0 (series {series}, header_detail={detail!r}) has {len(parts)} parts, "
            f"needs {needed}"
        )
    info: dict[str, Any] = {}
    if needed >= 2:
        info.update(json_part(parts[1], "dheader-1.0 part 2 (config)"))
    dropped: list[str] = []
    appendix_at = needed
    if detail == "all":
        arrays, dropped, appendix_at = _header_arrays(parts)
        info.update(arrays)
    if len(parts) > appendix_at:
        info["header_appendix"] = bytes(buffer(parts[appendix_at])).decode("utf-8", "replace")
    info["header_detail"] = detail
    if dropped:
        info["header_parts_dropped"] = list(dropped)
    return SeriesStartEvent(series, None, info, tuple(dropped))


def _header_arrays(parts: list[zmq.Frame]) -> tuple[dict[str, np.ndarray], list[str], int]:
    """The detail arrays of an ``all`` header that decode, why the others were dropped, and
    the index where an appendix would start.

    A whole header (8 parts or more) has three (description, blob) pairs at fixed places:
    each pair is decoded on its own, so one broken part costs only itself. A shorter header
    lost parts: pairs are then found by their descriptions' htypes, and whatever is neither
    a known description nor its blob is dropped.
    """
    arrays: dict[str, np.ndarray] = {}
    dropped: list[str] = []

    def take(index: int, default_htype: str) -> None:
        description = _header_description(parts[index])
        htype = description.get("htype") if description is not None else None
        name = htype if isinstance(htype, str) and htype in _HEADER_ARRAYS else default_htype
        where = f"{name} (parts {index + 1}-{index + 2})"
        if index + 1 >= len(parts):
            dropped.append(f"{where}: no data part")
            return
        if _HEADER_ARRAYS.get(name) in arrays:
            dropped.append(f"{where}: a second {name}")
            return
        try:
            key, array = _decode_header_array(parts[index], parts[index + 1])
        except DecodeError as exc:
            dropped.append(f"{where}: {exc}")
            return
        arrays[key] = array

    expected = list(_HEADER_ARRAYS)
    if len(parts) >= HEADER_PARTS["all"]:
        for slot, htype in enumerate(expected):
            take(2 + 2 * slot, htype)
        return arrays, dropped, HEADER_PARTS["all"]
    index = 2
    while index < len(parts):
        detail = _detail_htype(parts[index])
        if detail is None:
            dropped.append(f"part {index + 1}: not a detail description")
            index += 1
        elif index + 1 < len(parts) and _detail_htype(parts[index + 1]) is not None:
            dropped.append(f"{detail} (part {index + 1}): no data part")
            index += 1
        else:
            take(index, detail)
            index += 2
    found = {htype for htype in expected if _HEADER_ARRAYS[htype] in arrays}
    named = " ".join(dropped)
    dropped.extend(f"{h}: missing" for h in expected if h not in found and h not in named)
    return arrays, dropped, len(parts)


def _header_description(part: zmq.Frame) -> dict[str, Any] | None:
    """A detail part's JSON description, or None when it is not one."""
    try:
        return json_part(part, "dheader-1.0 detail description")
    except DecodeError:
        return None


def _detail_htype(part: zmq.Frame) -> str | None:
    """The htype of a flatfield / pixel mask / count-rate description part, else None."""
    description = _header_description(part)
    htype = description.get("htype") if description is not None else None
    return htype if isinstance(htype, str) and htype in _HEADER_ARRAYS else None


def _parse_image_v1(
    parts: list[zmq.Frame],
    first: dict[str, Any],
    transform: Transform | None,
    always: tuple[tuple[str, int], ...],
) -> ImageEvent:
    series = int_field(first, "series", "dimage-1.0")
    frame = int_field(first, "frame", "dimage-1.0")
    what = f"image series {series} frame {frame}"
    if len(parts) < 3:
        raise DecodeError(f"{what}: {len(parts)} parts, needs dimage, dimage_d, blob[, dconfig]")
    event = ImageEvent(series, frame, None, None, counts_always=always)
    try:
        event.data = _transformed(decode_image(parts[1], parts[2], what), transform)
        if len(parts) >= 4:
            config = json_part(parts[3], f"{what} part 4 (dconfig)")
            if config.get("htype") != "dconfig-1.0":
                raise DecodeError(
                    f"{what}: part 4 htype is {config.get('htype')!r}, expected 'dconfig-1.0'"
                )
        else:
            event.counts_if_kept = (("nonstandard", 1),)
    except Exception as exc:
        event.data, event.error = None, _describe(exc)
    return event


# -- v2 (CBOR) ----------------------------------------------------------------------------


def _parse_v2(
    parts: list[zmq.Frame], channel: str | None, transform: Transform | None
) -> EigerEvent:
    if len(parts) != 1:
        raise DecodeError(
            f"v2 message has {len(parts)} parts; SIMPLON stream v2 sends one CBOR item"
        )
    message = cbor.loads(buffer(parts[0]))
    series, unique_id = message.series_id, message.series_unique_id
    if message.type == "start":
        info = cbor.start_info(message)
        dropped = tuple(info.get("header_parts_dropped", ()))
        return SeriesStartEvent(series, unique_id, info, dropped)
    if message.type != "image":
        return SeriesEndEvent(series, unique_id)
    frame = message.image_id
    assert frame is not None
    event = ImageEvent(series, frame, unique_id, None)
    channels = message.channels
    try:
        wanted = channel if channel is not None else channels[0]
        event.data = _transformed(cbor.decode_channel(message, wanted), transform)
    except Exception as exc:
        event.error = _describe(exc)
        return event
    if len(channels) > 1:
        event.counts_if_kept = (("other_channels", len(channels) - 1),)
    return event


def _describe(exc: Exception) -> str:
    """A DecodeError speaks for itself; anything else (a raising transform) says what it was."""
    return str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"


# -- pixels -------------------------------------------------------------------------------


def decode_image(description_part: zmq.Frame, blob_part: zmq.Frame, what: str) -> np.ndarray:
    """Decode the dimage_d-1.0 description and its blob into a (height, width) array."""
    description = json_part(description_part, f"{what} part 2 (dimage_d)")
    if description.get("htype") != "dimage_d-1.0":
        raise DecodeError(
            f"{what}: part 2 htype is {description.get('htype')!r}, expected 'dimage_d-1.0'"
        )
    width, height = _wire_shape(description.get("shape"), what)
    if width * height > cbor.MAX_ELEMENTS:
        raise DecodeError(
            f"{what}: shape [{width}, {height}] exceeds {cbor.MAX_ELEMENTS} pixels (corrupt header)"
        )
    encoding = description.get("encoding")
    if not isinstance(encoding, str):
        raise DecodeError(f"{what}: 'encoding' {encoding!r} is not an encoding name")
    pixel_type = description.get("type")
    if not isinstance(pixel_type, str):
        raise DecodeError(f"{what}: pixel 'type' {pixel_type!r} is not a type name")
    blob = buffer(blob_part)
    size = description.get("size")
    if size is not None and size != len(blob):
        raise DecodeError(f"{what}: blob has {len(blob)} bytes, dimage_d says size={size}")
    try:
        return codecs.decode(blob, encoding=encoding, shape=(height, width), dtype=pixel_type)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from exc


def _wire_shape(shape: Any, what: str) -> tuple[int, int]:
    """Dectris shapes are [width, height] (fastest axis first)."""
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise DecodeError(f"{what}: shape {shape!r} is not [width, height]")
    return shape[0], shape[1]


def _decode_header_array(
    description_part: zmq.Frame, blob_part: zmq.Frame
) -> tuple[str, np.ndarray]:
    """Decode a flatfield / pixel mask / count-rate table of an ``all`` header."""
    description = json_part(description_part, "dheader-1.0 detail description")
    htype = description.get("htype")
    key = _HEADER_ARRAYS.get(htype) if isinstance(htype, str) else None
    if key is None or not isinstance(htype, str):
        raise DecodeError(f"dheader-1.0: unexpected detail htype {htype!r}")
    width, height = _wire_shape(description.get("shape"), htype)
    pixel_type = description.get("type")
    if not isinstance(pixel_type, str):
        raise DecodeError(f"{htype}: pixel 'type' {pixel_type!r} is not a type name")
    try:
        return key, codecs.decode(
            buffer(blob_part), encoding="raw", shape=(height, width), dtype=pixel_type
        )
    except DecodeError as exc:
        raise DecodeError(f"dheader-1.0 {htype}: {exc}") from exc
