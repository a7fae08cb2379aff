"""SIMPLON stream v2 messages (CBOR): build them as a DECTRIS detector does, and take them apart.

What is on the wire (DECTRIS ``stream_v2`` documentation and its reference parser):

- One ZMQ message per CBOR data item, prefixed by the self-described CBOR tag
  55799 (bytes ``d9 d9 f7``); the item is a map of text keys whose first key is
  ``type``: ``"start"``, ``"image"`` or ``"end"``.
- ``start``: ``series_id``, ``series_unique_id``, ``arm_date`` (tag 0 date/time),
  ``channels`` (channel names, e.g. ``["threshold_1"]``), ``beam_center_x/y``,
  ``count_time``, ``frame_time`` (s), ``number_of_images``, ``image_size_x/y``,
  ``pixel_size_x/y`` (m), ``incident_energy`` (eV), ``incident_wavelength`` (Å),
  ``detector_translation`` ([x, y, z] m), ``threshold_energy`` ({channel: eV}),
  and with header detail ``all`` also ``flatfield`` / ``pixel_mask``
  ({channel: array}) and ``countrate_correction_lookup_table`` (typed array).
- ``image``: ``series_id``, ``series_unique_id``, ``series_date``, ``image_id``,
  ``real_time`` / ``start_time`` / ``stop_time`` as rationals ``[numerator,
  denominator]`` in seconds, and ``data`` = {channel: array}.
- ``end``: ``series_id``, ``series_unique_id``.

An array is RFC 8746 tag 40 (row-major multi-dimensional array) holding
``[[dims...], typed array]``; the typed array is an RFC 8746 tag (64 uint8,
69 uint16 little-endian, 70 uint32 little-endian, 85 float32 little-endian, ...)
whose content is a byte string, or DECTRIS tag 56500 standing in for that byte
string: ``[algorithm, modifier, compressed bytes]`` with ``"bslz4"`` (modifier =
bitshuffle element size) or ``"lz4"`` (modifier 0), both in the HDF5-filter
framing that :mod:`hxn_liveptycho.streams.codecs` writes and reads (in C).

Every decoding failure is a :class:`DecodeError` that says what was wrong.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import cbor2
import numpy as np

from hxn_liveptycho.errors import DecodeError
from hxn_liveptycho.streams import codecs

TAG_SELF_DESCRIBED = 55799
TAG_MULTI_DIM_ROW_MAJOR = 40
TAG_MULTI_DIM_COLUMN_MAJOR = 1040
TAG_DECTRIS_COMPRESSION = 56500
MESSAGE_TYPES = ("start", "image", "end")
#: The first bytes of a v2 message: tag 55799, or a bare map (major type 5).
SELF_DESCRIBED_PREFIX = b"\xd9\xd9\xf7"

#: RFC 8746 typed-array tags this module reads (little-endian and byte-sized ones).
TYPED_ARRAY_DTYPES: dict[int, np.dtype] = {
    64: np.dtype("u1"),
    68: np.dtype("u1"),  # uint8, clamped arithmetic: same bytes
    69: np.dtype("<u2"),
    70: np.dtype("<u4"),
    71: np.dtype("<u8"),
    72: np.dtype("i1"),
    77: np.dtype("<i2"),
    78: np.dtype("<i4"),
    79: np.dtype("<i8"),
    84: np.dtype("<f2"),
    85: np.dtype("<f4"),
    86: np.dtype("<f8"),
}
#: Big-endian typed arrays: valid RFC 8746, never sent by a DECTRIS detector, refused by name.
_BIG_ENDIAN_TAGS = frozenset({65, 66, 67, 73, 74, 75, 80, 81, 82, 83})
_TAG_OF_DTYPE = {dtype: tag for tag, dtype in TYPED_ARRAY_DTYPES.items() if tag != 68}
_BSLZ4_ENCODING = {size: name for name, size in codecs.BSLZ4_ELEMENT_SIZE.items()}
#: Largest array accepted (elements): an EIGER2 16M frame has 18 M pixels. A bigger claim is
#: a corrupt message, refused before any memory is allocated for it.
MAX_ELEMENTS = 1 << 28


# -- encoding ---------------------------------------------------------------------------


def typed_array_tag(dtype: np.dtype | str) -> int:
    """The RFC 8746 tag for little-endian ``dtype`` (uint8 64, uint16 69, uint32 70, ...)."""
    dt = np.dtype(dtype).newbyteorder("<")
    tag = _TAG_OF_DTYPE.get(dt)
    if tag is None:
        raise ValueError(f"no RFC 8746 typed-array tag for pixel type {np.dtype(dtype)}")
    return tag


def encode_array(array: np.ndarray, encoding: str = "raw") -> cbor2.CBORTag:
    """``array`` as tag 40 [dims, typed array], compressed (in C) per a v1 ``encoding`` name."""
    data = np.asarray(array)
    tag = typed_array_tag(data.dtype)
    if encoding == "lz4<":
        # v2's "lz4" is the HDF5 LZ4 framing; v1's lz4< blob is a bare block (codecs module doc).
        content: bytes | cbor2.CBORTag = cbor2.CBORTag(
            TAG_DECTRIS_COMPRESSION, ["lz4", 0, codecs.encode_lz4_hdf5(data)]
        )
    elif encoding == "raw":
        content = codecs.encode(data, encoding)
    else:
        elem = codecs.BSLZ4_ELEMENT_SIZE[encoding]
        content = cbor2.CBORTag(
            TAG_DECTRIS_COMPRESSION, ["bslz4", elem, codecs.encode(data, encoding)]
        )
    return cbor2.CBORTag(
        TAG_MULTI_DIM_ROW_MAJOR, [[int(n) for n in data.shape], cbor2.CBORTag(tag, content)]
    )


def encode_typed_array(array: np.ndarray) -> cbor2.CBORTag:
    """A 1-D typed array (e.g. the count-rate lookup table), uncompressed."""
    data = np.ascontiguousarray(np.ravel(array)).astype(
        np.asarray(array).dtype.newbyteorder("<"), copy=False
    )
    return cbor2.CBORTag(typed_array_tag(data.dtype), data.tobytes())


def dumps(message: Mapping[str, Any]) -> bytes:
    """Serialize one message as a detector does: tag 55799, then the map with ``type`` first."""
    if "type" not in message or message["type"] not in MESSAGE_TYPES:
        raise ValueError(f"a v2 message needs 'type' in {MESSAGE_TYPES}")
    ordered = {"type": message["type"], **{k: v for k, v in message.items() if k != "type"}}
    return cbor2.dumps(
        cbor2.CBORTag(TAG_SELF_DESCRIBED, _plain(ordered)), datetime_as_timestamp=False
    )


def _plain(value: Any) -> Any:
    """numpy scalars and arrays-as-lists into the Python types cbor2 knows."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# -- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded v2 message; array payloads are still encoded (decode what you need)."""

    type: str
    series_id: int
    series_unique_id: str | None
    fields: dict[str, Any]
    image_id: int | None = None

    @property
    def channels(self) -> list[str]:
        """The channel names of an image's ``data`` map, in wire order."""
        return list(self.fields.get("data", {}))


def looks_like_v2(first_part: bytes | memoryview) -> bool:
    """True if a message part starts like a v2 message (tag 55799 or a CBOR map), not JSON."""
    head = bytes(memoryview(first_part)[:3])
    return head == SELF_DESCRIBED_PREFIX or (len(head) > 0 and 0xA0 <= head[0] <= 0xBF)


def loads(buf: bytes | memoryview) -> Message:
    """Parse and check one v2 message; raise DecodeError naming what is wrong."""
    raw = bytes(buf)
    stream = io.BytesIO(raw)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, OverflowError, ...
        raise DecodeError(
            f"v2 message ({len(raw)} bytes) is not valid CBOR: {type(exc).__name__}: {exc}"
        ) from exc
    if stream.tell() != len(raw):
        raise DecodeError(
            f"v2 message has {len(raw) - stream.tell()} bytes after its CBOR item "
            f"({len(raw)} bytes in all)"
        )
    if isinstance(item, cbor2.CBORTag) and item.tag == TAG_SELF_DESCRIBED:
        item = item.value
    if not isinstance(item, Mapping):
        raise DecodeError(f"v2 message is a CBOR {type(item).__name__}, expected a map")
    kind = item.get("type")
    if kind not in MESSAGE_TYPES:
        raise DecodeError(f"v2 message has type {kind!r}, expected one of {MESSAGE_TYPES}")
    what = f"v2 {kind} message"
    series_id = _uint(item, "series_id", what)
    unique = item.get("series_unique_id")
    if unique is not None and not isinstance(unique, str):
        raise DecodeError(f"{what}: series_unique_id {unique!r} is not a text string")
    image_id = None
    if kind == "image":
        image_id = _uint(item, "image_id", what)
        what = f"v2 image series {series_id} image {image_id}"
        data = item.get("data")
        if not isinstance(data, Mapping) or not data:
            raise DecodeError(f"{what}: 'data' must be a non-empty map of channel -> array")
        if not all(isinstance(name, str) for name in data):
            raise DecodeError(f"{what}: 'data' has a channel name that is not a text string")
        for key in ("real_time", "start_time", "stop_time"):
            if key in item:
                _rational(item[key], f"{what} {key}")
    elif kind == "start":
        channels = item.get("channels")
        if channels is not None and (
            not _is_sequence(channels) or not all(isinstance(c, str) for c in channels)
        ):
            raise DecodeError(f"{what}: 'channels' {channels!r} is not a list of names")
    fields = {key: value for key, value in item.items() if key != "data"}
    if kind == "image":
        fields["data"] = dict(item["data"])
    return Message(
        type=kind,
        series_id=series_id,
        series_unique_id=unique,
        fields=fields,
        image_id=image_id,
    )


def decode_array(item: Any, what: str, *, ndim: int | None = None) -> np.ndarray:
    """Decode tag 40 [dims, typed array] into a writable native-endian array of those dims.

    With ``ndim`` an array of another rank is refused before anything is decompressed.
    """
    if isinstance(item, cbor2.CBORTag) and item.tag == TAG_MULTI_DIM_COLUMN_MAJOR:
        raise DecodeError(f"{what}: column-major arrays (tag 1040) are not supported")
    if not isinstance(item, cbor2.CBORTag) or item.tag != TAG_MULTI_DIM_ROW_MAJOR:
        raise DecodeError(f"{what}: expected tag 40 (multi-dimensional array), got {_kind(item)}")
    content = item.value
    if not _is_sequence(content) or len(content) != 2:
        raise DecodeError(f"{what}: tag 40 content must be [dimensions, typed array]")
    dims_item, typed = content
    if not _is_sequence(dims_item) or not dims_item or not all(_is_uint(n) for n in dims_item):
        raise DecodeError(f"{what}: dimensions {dims_item!r} are not a list of sizes >= 0")
    dims = tuple(int(n) for n in dims_item)
    if ndim is not None and len(dims) != ndim:
        raise DecodeError(f"{what}: expected {ndim} dimensions, got {list(dims)}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise DecodeError(f"{what}: dimensions {list(dims)} exceed {MAX_ELEMENTS} elements")
    dtype, blob, encoding = _typed_content(typed, what)
    try:
        array = codecs.decode(
            blob, encoding=encoding, shape=dims if len(dims) == 2 else (1, count), dtype=dtype
        )
    except DecodeError as exc:
        raise DecodeError(f"{what} (dims {list(dims)}, {dtype.name}): {exc}") from exc
    return array.reshape(dims)


def decode_typed_array(item: Any, what: str) -> np.ndarray:
    """Decode a bare (1-D) typed array, compressed or not."""
    dtype, blob, encoding = _typed_content(item, what)
    view = memoryview(blob).cast("B")
    nbytes = len(view) if encoding == "raw" else codecs.bslz4_header(view)[0]
    if nbytes % dtype.itemsize:
        raise DecodeError(f"{what}: {nbytes} bytes are not whole {dtype.name} elements")
    if nbytes // dtype.itemsize > MAX_ELEMENTS:
        raise DecodeError(f"{what}: {nbytes} bytes exceed {MAX_ELEMENTS} elements")
    try:
        flat = codecs.decode(
            view, encoding=encoding, shape=(1, nbytes // dtype.itemsize), dtype=dtype
        )
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from exc
    return flat.reshape(-1)


def decode_channel(message: Message, channel: str) -> np.ndarray:
    """Decode one channel of an image message to a 2-D (height, width) array."""
    what = f"v2 image series {message.series_id} image {message.image_id} channel {channel!r}"
    data = message.fields.get("data", {})
    if channel not in data:
        raise DecodeError(f"{what}: no such channel (the image has {list(data)})")
    return decode_array(data[channel], what, ndim=2)


def start_info(message: Message) -> dict[str, Any]:
    """The start message as a plain dict, its arrays decoded (flatfield, pixel mask, table).

    A detail array that does not decode is left out rather than losing the whole start
    (and with it the series): ``info["header_parts_dropped"]`` then names each, with why.
    """
    info = thaw(message.fields)
    dropped: list[str] = []
    for key in ("flatfield", "pixel_mask"):
        if key not in info:
            continue
        per_channel = info[key]
        if not isinstance(per_channel, dict):
            dropped.append(f"{key}: not a map of channel -> array")
            del info[key]
            continue
        decoded: dict[str, np.ndarray] = {}
        for name, value in per_channel.items():
            try:
                decoded[str(name)] = decode_array(value, f"v2 start message {key}[{name!r}]")
            except DecodeError as exc:
                dropped.append(f"{key}[{name!r}]: {exc}")
        if decoded:
            info[key] = decoded
        else:
            del info[key]
    table = "countrate_correction_lookup_table"
    if table in info:
        try:
            info[table] = decode_typed_array(info[table], f"v2 start message {table}")
        except DecodeError as exc:
            dropped.append(f"{table}: {exc}")
            del info[table]
    if dropped:
        info["header_parts_dropped"] = dropped
    translation = info.get("detector_translation")
    if (
        "detector_distance" not in info
        and isinstance(translation, list)
        and len(translation) == 3
        and isinstance(translation[2], int | float)
        and not isinstance(translation[2], bool)
    ):
        # v2 has no detector_distance; the translation's z is it for a detector normal to the beam.
        info["detector_distance"] = float(translation[2])
    return info


def thaw(value: Any) -> Any:
    """cbor2's frozendicts and tuples back into dicts and lists (tags are left as they are)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


# -- helpers ----------------------------------------------------------------------------


def _typed_content(typed: Any, what: str) -> tuple[np.dtype, bytes | bytearray | memoryview, str]:
    """(dtype, blob, codec encoding name) of a typed-array tag and its (compressed) bytes."""
    if not isinstance(typed, cbor2.CBORTag):
        raise DecodeError(f"{what}: expected a typed-array tag, got {_kind(typed)}")
    if typed.tag in _BIG_ENDIAN_TAGS:
        raise DecodeError(f"{what}: big-endian typed array (tag {typed.tag}) is not supported")
    dtype = TYPED_ARRAY_DTYPES.get(typed.tag)
    if dtype is None:
        raise DecodeError(f"{what}: tag {typed.tag} is not a supported typed-array tag")
    content = typed.value
    if isinstance(content, bytes | bytearray):
        return dtype, content, "raw"
    if isinstance(content, cbor2.CBORTag) and content.tag == TAG_DECTRIS_COMPRESSION:
        return (dtype, *_compressed(content.value, what))
    raise DecodeError(
        f"{what}: typed array (tag {typed.tag}) holds {_kind(content)}, expected a byte string "
        "or DECTRIS compression tag 56500"
    )


def _compressed(value: Any, what: str) -> tuple[bytes | bytearray, str]:
    """Check a tag-56500 payload [algorithm, modifier, bytes]; return (bytes, codec name)."""
    if not _is_sequence(value) or len(value) != 3:
        raise DecodeError(f"{what}: tag 56500 content must be [algorithm, modifier, bytes]")
    algorithm, modifier, blob = value
    if not isinstance(blob, bytes | bytearray):
        raise DecodeError(f"{what}: tag 56500 data is {_kind(blob)}, expected a byte string")
    if not _is_uint(modifier):
        raise DecodeError(f"{what}: tag 56500 modifier {modifier!r} is not an integer >= 0")
    if algorithm == "lz4":
        return blob, "lz4<"
    if algorithm == "bslz4":
        encoding = _BSLZ4_ENCODING.get(modifier)
        if encoding is None:
            raise DecodeError(
                f"{what}: bslz4 element size {modifier} is not supported "
                f"(expected one of {sorted(_BSLZ4_ENCODING)})"
            )
        return blob, encoding
    raise DecodeError(
        f"{what}: unknown compression algorithm {algorithm!r} (expected 'bslz4' or 'lz4')"
    )


def _uint(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not _is_uint(value):
        raise DecodeError(f"{what}: field {key!r} must be an unsigned integer, got {value!r}")
    return int(value)


def _rational(value: Any, what: str) -> tuple[int, int]:
    if not _is_sequence(value) or len(value) != 2 or not all(_is_uint(n) for n in value):
        raise DecodeError(f"{what}: {value!r} is not a rational [numerator, denominator]")
    if value[1] == 0:
        raise DecodeError(f"{what}: rational {list(value)} has a zero denominator")
    return int(value[0]), int(value[1])


def _is_uint(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _kind(value: Any) -> str:
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return type(value).__name__
