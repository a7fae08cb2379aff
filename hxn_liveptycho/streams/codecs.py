"""Frame codecs exactly as an Eiger puts them on the wire (SIMPLON stream ``encoding`` field).

- ``bsNN-lz4<``: bitshuffle (element size NN bits) + LZ4 in bitshuffle's HDF5-filter
  framing: a 12-byte big-endian header (uncompressed size uint64, block size in
  bytes uint32), then blocks each led by a 4-byte big-endian compressed size.
- ``lz4<`` (stream v1): one bare LZ4 block, no header. The SIMPLON API manual says of
  the ``encoding`` field "lz4 data is written as defined at https://code.google.com/p/lz4/
  without any additional data like block size etc."; DECTRIS-style v1 clients read it
  so (areaDetector ADEiger ``streamApi.cpp`` runs ``LZ4_decompress_fast`` on the blob,
  LiberTEM-rs ``libertem_dectris`` decompresses a plain block). What :func:`encode` sends.
- ``lz4`` in a stream v2 compression tag (56500): the HDF5 LZ4-filter framing (a 12-byte
  big-endian header, then length-prefixed blocks), per DECTRIS' ``cbor/dectris-compression-
  tag.md``; what Dectris' ``decompress(..., "lz4")`` reads. :func:`encode_lz4_hdf5` makes it.
  :func:`decode` of ``lz4<`` accepts both framings (told apart by the header's size field),
  so either flavour, and a v1 sender that used the HDF5 framing, decodes.
- ``raw``: the pixels, little-endian, C order.

Compression and decompression run in C (``bitshuffle``, ``lz4``,
``dectris-compression``): a pure-Python bitshuffle capped HXN's replay at about
15 frames/s. Every decode failure is a :class:`DecodeError` with a message that
says what was wrong; the codec libraries' own exceptions never escape.
"""

from __future__ import annotations

import math
import struct

import bitshuffle
import lz4.block
import numpy as np
from dectris.compression import decompress as _dectris_decompress

from hxn_liveptycho.errors import DecodeError

ENCODINGS = ("bs32-lz4<", "bs16-lz4<", "bs8-lz4<", "lz4<", "raw")

#: Bitshuffle element size (bytes) named by each bslz4 encoding.
BSLZ4_ELEMENT_SIZE = {"bs32-lz4<": 4, "bs16-lz4<": 2, "bs8-lz4<": 1}
#: Block size (bytes) of bitshuffle's HDF5 filter default; what Eiger frames use.
BSLZ4_BLOCK_BYTES = 8192
#: Default block size (bytes) of the HDF5 LZ4 filter (one block for any real frame).
LZ4_BLOCK_BYTES = 1 << 30
#: Bitshuffle transposes in groups of 8 elements; a trailing remainder is stored raw.
_BLOCKED_MULT = 8
_HEADER = struct.Struct(">QI")
_BLOCK_LEN = struct.Struct(">I")


def encode(array: np.ndarray, encoding: str) -> bytes:
    """Encode one frame as the detector would send it under ``encoding``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    data = _little_endian_c(array)
    if encoding == "raw":
        return data.tobytes()
    if encoding == "lz4<":
        return lz4.block.compress(data.tobytes(), store_size=False)
    return _encode_bslz4(data, BSLZ4_ELEMENT_SIZE[encoding])


def encode_lz4_hdf5(array: np.ndarray) -> bytes:
    """LZ4 in the HDF5 LZ4-filter framing: what a v2 compression tag ``["lz4", 0, ...]`` holds."""
    return _encode_lz4_hdf5(_little_endian_c(array).reshape(-1).view(np.uint8))


#: The bslz4/lz4 framing stores block sizes in 4 bytes: no frame may exceed that.
_MAX_FRAME_BYTES = 2**32 - 1


def decode(
    blob: bytes | bytearray | memoryview,
    *,
    encoding: str,
    shape: tuple[int, ...],
    dtype: np.dtype | str,
) -> np.ndarray:
    """Decode one frame to a native-endian array of ``shape`` (numpy order).

    Compressed frames come back as a read-only view of the decompressor's
    output (no second copy: at Eiger rates that copy, made under the GIL,
    would cap a decode pool); ``raw`` frames are copied out of the message.
    Copy the result before modifying it.
    """
    wire_dtype, shape = _check_target(encoding, shape, dtype)
    expected = math.prod(shape) * wire_dtype.itemsize
    if expected > _MAX_FRAME_BYTES:
        raise DecodeError(
            f"{encoding}: a {wire_dtype.name} {shape} frame is {expected} bytes, "
            f"over the {_MAX_FRAME_BYTES} bytes the framing can describe"
        )
    if expected == 0:
        return np.zeros(shape, dtype=wire_dtype.newbyteorder("="))
    view = memoryview(blob).cast("B")
    if encoding == "raw":
        raw: bytes | memoryview = view
    elif encoding == "lz4<":
        raw = _decode_lz4(view, expected, encoding)
    else:
        elem = BSLZ4_ELEMENT_SIZE[encoding]
        if expected % elem:
            raise DecodeError(
                f"{encoding}: {expected} bytes of {wire_dtype.name} {shape} "
                f"are not a whole number of {elem}-byte elements"
            )
        raw = _decompress(
            _with_bslz4_header(view, expected, elem, encoding), "bslz4", elem, encoding
        )
    if len(raw) != expected:
        raise DecodeError(
            f"{encoding}: decoded {len(raw)} bytes, expected {expected} "
            f"for {wire_dtype.name} {shape}"
        )
    pixels = np.frombuffer(raw, dtype=wire_dtype).reshape(shape)
    if encoding == "raw" or not wire_dtype.isnative:
        return pixels.astype(wire_dtype.newbyteorder("="), copy=True)
    return pixels


def bslz4_header(blob: bytes | memoryview) -> tuple[int, int]:
    """Return ``(uncompressed_bytes, block_bytes)`` from a framed bslz4/lz4 blob."""
    view = memoryview(blob).cast("B")
    if len(view) < _HEADER.size:
        raise DecodeError(f"blob of {len(view)} bytes is shorter than the 12-byte header")
    return _HEADER.unpack_from(view)


# -- encoding helpers -------------------------------------------------------------------


def _little_endian_c(array: np.ndarray) -> np.ndarray:
    """The array as little-endian, C-contiguous numbers (what ``<`` in the encoding means)."""
    data = np.asarray(array)
    if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and np.little_endian is False):
        data = data.astype(data.dtype.newbyteorder("<"))
    return np.ascontiguousarray(data)


def _encode_bslz4(data: np.ndarray, elem: int) -> bytes:
    """Bitshuffle+LZ4 in C, then prefix the HDF5-filter header bitshuffle omits."""
    nbytes = data.nbytes
    if nbytes % elem:
        raise ValueError(
            f"bslz4 with {elem}-byte elements needs a byte count divisible by {elem}, "
            f"got {nbytes} ({data.dtype} {data.shape})"
        )
    header = _HEADER.pack(nbytes, BSLZ4_BLOCK_BYTES)
    if nbytes == 0:
        return header
    elements = data.reshape(-1).view(np.dtype(f"<u{elem}"))
    blocks = bitshuffle.compress_lz4(elements, BSLZ4_BLOCK_BYTES // elem)
    return header + blocks.tobytes()


def _encode_lz4_hdf5(data: np.ndarray) -> bytes:
    """LZ4 blocks in the HDF5 LZ4-filter framing; an incompressible block is stored raw."""
    nbytes = data.nbytes
    block_bytes = max(1, min(nbytes, LZ4_BLOCK_BYTES))
    parts = [_HEADER.pack(nbytes, block_bytes)]
    raw = data.tobytes()
    for start in range(0, nbytes, block_bytes):
        chunk = raw[start : start + block_bytes]
        packed = lz4.block.compress(chunk, store_size=False)
        if len(packed) >= len(chunk):
            packed = chunk
        parts.append(_BLOCK_LEN.pack(len(packed)))
        parts.append(packed)
    return b"".join(parts)


# -- decoding helpers -------------------------------------------------------------------


def _check_target(
    encoding: str, shape: tuple[int, ...], dtype: np.dtype | str
) -> tuple[np.dtype, tuple[int, ...]]:
    """Validate what the message header claims before touching the blob."""
    if encoding not in ENCODINGS:
        raise DecodeError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    if dtype is None:
        raise DecodeError("pixel type is missing")
    try:
        wire_dtype = np.dtype(dtype)
    except Exception as exc:  # numpy raises TypeError, ValueError or SyntaxError here
        raise DecodeError(f"unknown pixel type {dtype!r}") from exc
    if wire_dtype.kind not in "uif":
        raise DecodeError(f"pixel type {wire_dtype} is not numeric")
    wire_dtype = wire_dtype.newbyteorder("<")
    try:
        dims = tuple(int(n) for n in shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"frame shape {shape!r} is not a sequence of integers") from exc
    if len(dims) != 2 or any(n < 0 for n in dims):
        raise DecodeError(f"frame shape {shape!r} is not (height, width) with sizes >= 0")
    return wire_dtype, dims


def _with_bslz4_header(
    view: memoryview, expected: int, elem: int, encoding: str
) -> bytes | memoryview:
    """Return the blob with its 12-byte header, restoring it when a sender left it out."""
    if len(view) >= _HEADER.size:
        size, block = _HEADER.unpack_from(view)
        if size == expected:
            if block == 0 or block % (_BLOCKED_MULT * elem):
                raise DecodeError(
                    f"{encoding}: header block size {block} bytes is not a multiple of "
                    f"{_BLOCKED_MULT * elem}"
                )
            if not _chain_fits(view[_HEADER.size :], expected, block, elem):
                raise DecodeError(
                    f"{encoding}: blob of {len(view)} bytes does not hold the blocks its header "
                    f"announces ({expected} bytes in {block}-byte blocks): truncated or padded"
                )
            return view
    block = _infer_bslz4_block_bytes(view, expected, elem)
    if block is None:
        raise DecodeError(
            f"{encoding}: blob of {len(view)} bytes has no header for {expected} bytes and "
            "its block chain does not match any known block size (corrupt or truncated)"
        )
    return _HEADER.pack(expected, block) + bytes(view)


def _infer_bslz4_block_bytes(view: memoryview, expected: int, elem: int) -> int | None:
    """Find the block size of a header-less bslz4 blob by walking its block-length chain."""
    whole = expected - expected % (_BLOCKED_MULT * elem)
    for block in dict.fromkeys((BSLZ4_BLOCK_BYTES, whole)):
        if (
            block > 0
            and block % (_BLOCKED_MULT * elem) == 0
            and _chain_fits(view, expected, block, elem)
        ):
            return block
    return None


def _chain_fits(view: memoryview, expected: int, block: int, elem: int) -> bool:
    """True if blocks of ``block`` bytes consume the blob exactly, leftover included."""
    leftover = expected % (_BLOCKED_MULT * elem)
    n_blocks = expected // block + (1 if (expected % block) - leftover > 0 else 0)
    offset = 0
    for _ in range(n_blocks):
        if offset + _BLOCK_LEN.size > len(view):
            return False
        (length,) = _BLOCK_LEN.unpack_from(view, offset)
        offset += _BLOCK_LEN.size + length
    return offset + leftover == len(view)


def _decode_lz4(view: memoryview, expected: int, encoding: str) -> bytes:
    """Decode an ``lz4<`` blob in either framing: HDF5 (v2 tag, some v1 senders) or bare (v1).

    A framed blob starts with the uncompressed size as 8 big-endian bytes; a bare LZ4 block
    cannot (its first sequence needs literals, so its first 4 bytes are never all zero).
    """
    if len(view) >= _HEADER.size and _HEADER.unpack_from(view)[0] == expected:
        return _decompress(view, "lz4", 1, encoding)
    try:
        return lz4.block.decompress(view, uncompressed_size=expected)
    except Exception as exc:  # lz4.block.LZ4BlockError, or a size it refuses
        raise DecodeError(
            f"{encoding}: corrupt or truncated LZ4 block ({len(view)} bytes, neither a bare "
            f"block of {expected} bytes nor the HDF5 LZ4 framing): {type(exc).__name__}: {exc}"
        ) from exc


def _decompress(blob: bytes | memoryview, algorithm: str, elem: int, encoding: str) -> bytes:
    """Call the C decompressor; turn every failure into a DecodeError."""
    try:
        return _dectris_decompress(blob, algorithm, elem_size=elem)
    except Exception as exc:  # the C extension raises RuntimeError, MemoryError, SystemError
        raise DecodeError(
            f"{encoding}: corrupt or truncated compressed data ({len(blob)} bytes): "
            f"{type(exc).__name__}: {exc or 'no detail'}"
        ) from exc
