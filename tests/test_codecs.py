"""Frame codecs: bit-for-bit round trips, the exact bslz4/lz4 framing, and clear errors."""

from __future__ import annotations

import re
import struct

import bitshuffle
import lz4.block
import numpy as np
import pytest

from hxn_liveptycho.errors import DecodeError, LivePtychoError
from hxn_liveptycho.streams import codecs
from hxn_liveptycho.streams.codecs import ENCODINGS, decode, encode

DTYPES = ("uint8", "uint16", "uint32")
# (37, 44) leaves a partial bitshuffle block; (256, 256) spans several 8 KiB blocks.
SHAPES = ((37, 44), (256, 256))


def poisson_frame(shape: tuple[int, int], dtype: str, seed: int = 0) -> np.ndarray:
    """Detector-like counts: mostly small, a bright peak, values up to the dtype's range."""
    rng = np.random.default_rng(seed)
    frame = rng.poisson(2.0, shape).astype(np.float64)
    frame[shape[0] // 2, shape[1] // 2] = np.iinfo(dtype).max
    return frame.astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_is_bit_for_bit(encoding: str, dtype: str, shape: tuple[int, int]) -> None:
    """Every encoding decodes back to the exact pixels, dtype and shape, C-contiguous."""
    frame = poisson_frame(shape, dtype)
    blob = encode(frame, encoding)
    assert isinstance(blob, bytes)
    out = decode(blob, encoding=encoding, shape=shape, dtype=dtype)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == shape
    assert np.array_equal(out, frame)
    assert out.flags.c_contiguous and out.dtype.isnative


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decode_accepts_memoryview(encoding: str) -> None:
    """A zero-copy memoryview (what a ZMQ frame gives) decodes like bytes."""
    frame = poisson_frame((64, 48), "uint32")
    blob = encode(frame, encoding)
    out = decode(memoryview(blob), encoding=encoding, shape=frame.shape, dtype="uint32")
    assert np.array_equal(out, frame)


def test_compressed_encodings_actually_compress() -> None:
    """Sparse counts compress well below raw size, so the simulator's bandwidth is realistic."""
    frame = poisson_frame((256, 256), "uint32")
    assert len(encode(frame, "bs32-lz4<")) < frame.nbytes / 4
    assert len(encode(frame, "lz4<")) < frame.nbytes


@pytest.mark.parametrize(
    ("encoding", "dtype"), [("bs32-lz4<", "uint32"), ("bs16-lz4<", "uint16"), ("bs8-lz4<", "uint8")]
)
def test_bslz4_framing_golden(encoding: str, dtype: str) -> None:
    """The blob is the 12-byte big-endian HDF5-filter header followed by bitshuffle's own blocks."""
    frame = poisson_frame((128, 100), dtype)
    blob = encode(frame, encoding)
    itemsize = np.dtype(dtype).itemsize
    assert struct.unpack(">QI", blob[:12]) == (frame.nbytes, 8192)
    expected_blocks = bitshuffle.compress_lz4(frame.reshape(-1), 8192 // itemsize).tobytes()
    assert blob[12:] == expected_blocks
    # Walk the chain of 4-byte big-endian block lengths: it must consume the blob exactly.
    offset, n_blocks = 12, 0
    while offset < len(blob):
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        offset += 4 + length
        n_blocks += 1
    assert offset == len(blob)
    assert n_blocks == -(-frame.nbytes // 8192)


def test_lz4_framing_golden() -> None:
    """v1 ``lz4<`` is one bare LZ4 block: no size header, no block-length prefix.

    Sources: the SIMPLON API manual on ``dimage_d-1.0``'s ``encoding`` ("lz4 data is written
    as defined at https://code.google.com/p/lz4/ without any additional data like block size
    etc.", quoted in LiberTEM/LiberTEM-rs ``libertem_dectris/src/cam_client.rs``, whose
    ``lz4<`` path decompresses a plain block); areaDetector/ADEiger
    ``eigerApp/src/streamApi.cpp``, which calls ``LZ4_decompress_fast`` on the blob for
    ``lz4<`` but skips a 12-byte header for ``bs*-lz4<``. Only the v2 compression tag's
    ``"lz4"`` uses the HDF5 LZ4 framing (dectris/documentation
    ``cbor/dectris-compression-tag.md``; see the next test).
    """
    frame = poisson_frame((64, 64), "uint16")
    blob = encode(frame, "lz4<")
    assert blob == lz4.block.compress(frame.tobytes(), store_size=False)
    assert lz4.block.decompress(blob, uncompressed_size=frame.nbytes) == frame.tobytes()
    assert struct.unpack(">Q", blob[:8])[0] != frame.nbytes  # no HDF5 header


def test_lz4_hdf5_framing_golden_and_decodes_as_lz4() -> None:
    """The v2 tag's ``"lz4"``: the HDF5 LZ4 framing, header (size, block size), then one
    length-prefixed block (dectris/documentation ``cbor/dectris-compression-tag.md``); read by
    DECTRIS' own ``decompress(..., "lz4")``. A v1 ``lz4<`` blob in this framing decodes too."""
    frame = poisson_frame((64, 64), "uint16")
    blob = codecs.encode_lz4_hdf5(frame)
    assert struct.unpack(">QI", blob[:12]) == (frame.nbytes, frame.nbytes)
    (length,) = struct.unpack(">I", blob[12:16])
    assert len(blob) == 16 + length
    assert lz4.block.decompress(blob[16:], uncompressed_size=frame.nbytes) == frame.tobytes()
    assert codecs._dectris_decompress(blob, "lz4", elem_size=1) == frame.tobytes()
    out = decode(blob, encoding="lz4<", shape=frame.shape, dtype="uint16")
    assert np.array_equal(out, frame)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bslz4_without_header_decodes(dtype: str) -> None:
    """Some simulators send bitshuffle's blocks without the 12-byte header; we restore it."""
    frame = poisson_frame((37, 44), dtype)
    encoding = {"uint8": "bs8-lz4<", "uint16": "bs16-lz4<", "uint32": "bs32-lz4<"}[dtype]
    headerless = encode(frame, encoding)[12:]
    assert np.array_equal(
        decode(headerless, encoding=encoding, shape=frame.shape, dtype=dtype), frame
    )


def test_bslz4_single_block_without_header_decodes() -> None:
    """A header-less blob compressed as one whole-frame block (HXN replay's fallback) decodes."""
    frame = poisson_frame((37, 41), "uint32")
    block = (frame.size // 8) * 8
    headerless = bitshuffle.compress_lz4(frame.reshape(-1), block).tobytes()
    out = decode(headerless, encoding="bs32-lz4<", shape=frame.shape, dtype="uint32")
    assert np.array_equal(out, frame)


def test_bare_lz4_block_decodes() -> None:
    """A plain LZ4 block (what a real detector sends for v1 lz4<) decodes, from the lz4
    library directly; also one of exactly the frame's size (no HDF5 'stored' block)."""
    frame = poisson_frame((50, 30), "uint32")
    bare = lz4.block.compress(frame.tobytes(), store_size=False)
    assert np.array_equal(decode(bare, encoding="lz4<", shape=frame.shape, dtype="uint32"), frame)
    noise = np.random.default_rng(3).integers(0, 256, 4096 - 22, dtype=np.uint8)
    same_size = np.concatenate([np.zeros(22, np.uint8), noise]).reshape(64, 64)
    block = lz4.block.compress(same_size.tobytes(), store_size=False)
    assert len(block) == same_size.nbytes  # framed, this length would mean "stored raw"
    out = decode(block, encoding="lz4<", shape=(64, 64), dtype="uint8")
    assert np.array_equal(out, same_size)


def test_raw_is_little_endian_c_order() -> None:
    """raw is the pixels little-endian in C order, even when the input is big-endian or strided."""
    frame = poisson_frame((20, 30), "uint16")
    big_endian_view = frame.astype(">u2")
    assert encode(big_endian_view, "raw") == frame.astype("<u2").tobytes()
    fortran = np.asfortranarray(frame)
    assert encode(fortran, "raw") == frame.tobytes()


def test_decode_of_empty_frame() -> None:
    """A zero-size frame decodes to an empty array rather than failing in the C library."""
    for encoding in ENCODINGS:
        blob = encode(np.zeros((0, 4), np.uint16), encoding)
        assert decode(blob, encoding=encoding, shape=(0, 4), dtype="uint16").shape == (0, 4)


GOOD = encode(poisson_frame((37, 44), "uint32"), "bs32-lz4<")
GOOD_LZ4 = encode(poisson_frame((37, 44), "uint32"), "lz4<")


@pytest.mark.parametrize(
    ("blob", "encoding", "shape", "dtype", "message"),
    [
        (GOOD[:-7], "bs32-lz4<", (37, 44), "uint32", "truncated"),
        (GOOD + b"\x00" * 5, "bs32-lz4<", (37, 44), "uint32", "truncated or padded"),
        (GOOD[:12], "bs32-lz4<", (37, 44), "uint32", "truncated"),
        (b"", "bs32-lz4<", (37, 44), "uint32", "corrupt or truncated"),
        (b"\xde\xad\xbe\xef" * 300, "bs32-lz4<", (37, 44), "uint32", "corrupt or truncated"),
        (GOOD[:16] + b"\xff" * (len(GOOD) - 16), "bs32-lz4<", (37, 44), "uint32", "corrupt"),
        (GOOD, "bs32-lz4<", (38, 44), "uint32", "no header"),
        (GOOD[:-9], "lz4<", (37, 44), "uint32", "corrupt"),
        (GOOD_LZ4[:-9], "lz4<", (37, 44), "uint32", "corrupt or truncated"),
        (b"garbage!" * 50, "lz4<", (37, 44), "uint32", "corrupt"),
        (b"\x00" * 100, "raw", (37, 44), "uint32", "decoded 100 bytes, expected 6512"),
        (GOOD, "bs64-zstd", (37, 44), "uint32", "unknown encoding"),
        (GOOD, "bs32-lz4<", (37, 44), "not-a-type", "unknown pixel type"),
        (GOOD, "bs32-lz4<", (37, 44), None, "pixel type is missing"),
        (GOOD, "bs32-lz4<", (37, 44, 2), "uint32", "not (height, width)"),
        (GOOD, "bs32-lz4<", ("a", 4), "uint32", "not a sequence of integers"),
        (GOOD, "bs32-lz4<", (3, 5), "uint8", "not a whole number of 4-byte elements"),
    ],
    ids=[
        "truncated",
        "padded",
        "header-only",
        "empty",
        "garbage",
        "corrupt-blocks",
        "wrong-shape",
        "bslz4-as-lz4",
        "truncated-lz4",
        "garbage-lz4",
        "raw-wrong-size",
        "unknown-encoding",
        "unknown-dtype",
        "missing-dtype",
        "3d-shape",
        "non-integer-shape",
        "elements-do-not-divide",
    ],
)
def test_bad_input_raises_decode_error(
    blob: bytes, encoding: str, shape: tuple, dtype: str, message: str
) -> None:
    """Every decode failure is a DecodeError (also ValueError) with a specific message."""
    with pytest.raises(DecodeError, match=re.escape(message)) as info:
        decode(blob, encoding=encoding, shape=shape, dtype=dtype)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LivePtychoError)


def test_encode_rejects_unknown_encoding_and_odd_sizes() -> None:
    """encode refuses an encoding it cannot produce and element sizes that do not divide."""
    with pytest.raises(ValueError, match="unknown encoding"):
        encode(np.zeros((4, 4), np.uint16), "jpeg")
    with pytest.raises(ValueError, match="divisible by 4"):
        encode(np.zeros((3, 5), np.uint8), "bs32-lz4<")


def test_bitshuffle_runs_in_c() -> None:
    """Compression goes through the C bitshuffle extension, not a pure-Python fallback."""
    assert bitshuffle.compress_lz4.__module__ == "bitshuffle.ext"
    assert type(codecs._dectris_decompress).__name__ == "builtin_function_or_method"
