"""A recorded run as replay sees it, whatever it was read from (Tiled or a file archive).

The documents are kept small: the detector's frames never travel inside
them. As in ophyd-async, the frame key of the stream that holds the frames is
marked ``external`` in its descriptor and is absent from the events; the
frames themselves are read in chunks from a :class:`FrameSource`, so a large
scan starts publishing after its first chunk, not after its last.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hxn_liveptycho.config.scan import DETECTOR_KEYS
from hxn_liveptycho.errors import LivePtychoError

logger = logging.getLogger(__name__)

#: Primary-stream encoder keys (HXN's names) and the PandA datasets they are published as.
DEFAULT_POSITION_KEYS: dict[str, str] = {
    "inenc2_val": "/INENC2.VAL.Value",
    "inenc3_val": "/INENC3.VAL.Value",
}
#: The PandA dataset that carries sample times (s), from which receivers tell samples per frame.
TIME_CHANNEL = "/PCAP.TS_TRIG.Value"
#: Largest frame replay accepts, in pixels. An EIGER2 X 16M frame is 4148 x 4362 (18 Mpx);
#: a header claiming more is refused before a frame is read (one 16384² uint32 frame: 1 GiB).
MAX_FRAME_PIXELS = 2**25
#: Largest single read from storage (bytes); replay reads fewer frames at a time to stay under.
MAX_READ_BYTES = 2**30
#: Pixel types replay sends: the detector's unsigned integers, plus signed and float ones.
FRAME_KINDS = "uif"
#: Exceptions a malformed document raises where the code expects a well-formed one.
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)


def one_line(exc: BaseException | str) -> str:
    """An error's text on one line: the CLI prints each refusal as exactly one line."""
    return " ".join(str(exc).split())


class ReplayError(LivePtychoError, ValueError):
    """A run cannot be replayed (missing stream, inconsistent counts, unreadable file)."""


@contextmanager
def refusing_malformed(where: str) -> Iterator[None]:
    """Turn a recorded value of the wrong type into one ReplayError line, not a traceback."""
    try:
        yield
    except ReplayError:  # a ValueError too, but already one line
        raise
    except MALFORMED as exc:
        raise ReplayError(
            f"{where}: malformed documents ({type(exc).__name__}: {one_line(exc)[:200]})"
        ) from exc


def check_declared_frames(where: str, shape: tuple[int, ...], dtype: Any) -> None:
    """Refuse frames whose declared shape or type replay cannot afford, before reading any.

    Archives and Tiled nodes declare their shape; reading even one frame
    allocates what the declaration says, so it is checked first.
    """
    dtype = np.dtype(dtype)
    if len(shape) != 3:
        raise ReplayError(f"{where}: frames must be (n, height, width), got shape {shape}")
    _, height, width = shape
    if dtype.kind not in FRAME_KINDS or dtype.itemsize > 8:
        raise ReplayError(f"{where}: frames of type {dtype} are not detector images")
    if height < 1 or width < 1 or height * width > MAX_FRAME_PIXELS:
        raise ReplayError(
            f"{where}: frames of {height}x{width} pixels are outside 1..{MAX_FRAME_PIXELS} "
            "pixels a detector frame may have"
        )


class SlicedFrames:
    """Frames of an array-like (an HDF5 dataset, a Tiled array node), read a slice at a time.

    A read larger than MAX_READ_BYTES is refused before it is sent; ``label``
    names the frames in that refusal.
    """

    def __init__(self, data: Any, label: str) -> None:
        self._data = data
        self._label = label

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._data.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start..stop-1``; a read beyond MAX_READ_BYTES is refused unsent."""
        nbytes = max(0, stop - start) * math.prod(self.shape[1:]) * self.dtype.itemsize
        if nbytes > MAX_READ_BYTES:
            raise ReplayError(
                f"{self._label}: reading frames {start}..{stop - 1} would take {nbytes} bytes, "
                f"more than {MAX_READ_BYTES}"
            )
        return self._read_slice(start, stop)

    def _read_slice(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._data[start:stop])


@runtime_checkable
class FrameSource(Protocol):
    """Stored detector images, read lazily in chunks (an HDF5 dataset, a Tiled array node)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


@dataclass(frozen=True)
class DetectorInfo:
    """What the Eiger's series header needs, from the descriptor's configuration when recorded."""

    name: str
    frame_time_s: float
    beam_center_y: float | None = None
    beam_center_x: float | None = None
    pixel_size_m: float = 75e-6

    def header(self, nimages: int) -> dict[str, Any]:
        header: dict[str, Any] = {
            "count_time": self.frame_time_s,
            "frame_time": self.frame_time_s,
            "nimages": nimages,
            "ntrigger": 1,
            "x_pixel_size": self.pixel_size_m,
            "y_pixel_size": self.pixel_size_m,
            "description": "replayed EIGER series",
        }
        if self.beam_center_x is not None and self.beam_center_y is not None:
            header["beam_center_x"] = self.beam_center_x
            header["beam_center_y"] = self.beam_center_y
        return header


@dataclass
class RecordedRun:
    """One run: its documents (frames stripped), positions, and where its frames are.

    ``frame_numbers[k]`` is the detector's frame index of stored image ``k``;
    a frame the detector never delivered is simply absent, so replay
    reproduces the gap. ``positions`` are encoder counts, one row per
    position, columns in the order of ``position_keys``.
    """

    source: str
    documents: list[tuple[str, dict[str, Any]]]
    frames: FrameSource
    frame_numbers: np.ndarray
    positions: np.ndarray
    position_keys: tuple[str, ...]
    times: np.ndarray
    detector: DetectorInfo
    stream_name: str = "primary"
    resources: list[Any] = field(default_factory=list)

    def close(self) -> None:
        """Release open files (an HDF5 archive); safe to call twice."""
        while self.resources:
            self.resources.pop().close()

    def __enter__(self) -> RecordedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def start(self) -> dict[str, Any]:
        return self.documents[0][1]

    @property
    def uid(self) -> str:
        return str(self.start.get("uid", ""))

    @property
    def scan_id(self) -> Any:
        return self.start.get("scan_id")

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])

    def missing_frames(self) -> np.ndarray:
        """Frame indices that have a position but no stored image."""
        return np.setdiff1d(np.arange(self.num_positions), self.frame_numbers)

    def positions_outside_scan(
        self, first: int = 0, stop: int | None = None, *, tolerance: float = 0.5
    ) -> int:
        """Positions beyond the commanded range by more than ``tolerance`` of it (settling)."""
        scan_input = (self.start.get("scan") or {}).get("scan_input")
        ratios = (self.start.get("x_scale_factor"), self.start.get("z_scale_factor"))
        if not scan_input or len(scan_input) < 6 or len(self.position_keys) != 2:
            return 0
        x_lo, x_hi = sorted(float(v) for v in scan_input[0:2])
        y_lo, y_hi = sorted(float(v) for v in scan_input[3:5])
        # HXN's convention: position_um = counts * (-scale / 1e4) * (-1).
        counts = self.positions[first:stop]
        x_um = counts[:, 0] * float(ratios[0] or 1.0) / 1e4
        y_um = counts[:, 1] * float(ratios[1] or 1.0) / 1e4
        x_pad = tolerance * max(x_hi - x_lo, 1e-9)
        y_pad = tolerance * max(y_hi - y_lo, 1e-9)
        outside = (
            (x_um < x_lo - x_pad)
            | (x_um > x_hi + x_pad)
            | (y_um < y_lo - y_pad)
            | (y_um > y_hi + y_pad)
        )
        return int(outside.sum())

    def validate(self) -> None:
        """Raise :class:`ReplayError` naming what is wrong before anything is published."""
        names = [name for name, _ in self.documents]
        where = f"{self.source}"
        if not names or names[0] != "start":
            raise ReplayError(f"{where}: the first document is not a start document")
        if "stop" not in names:
            raise ReplayError(f"{where}: the run has no stop document (was it cut short?)")
        shape = tuple(self.frames.shape)
        check_declared_frames(where, shape, self.frames.dtype)
        if len(self.frame_numbers) != shape[0]:
            raise ReplayError(
                f"{where}: {shape[0]} stored frames but {len(self.frame_numbers)} frame numbers"
            )
        if self.positions.ndim != 2 or self.positions.shape[1] != len(self.position_keys):
            raise ReplayError(f"{where}: positions have shape {self.positions.shape}")
        n = self.num_positions
        if n == 0:
            raise ReplayError(f"{where}: the {self.stream_name!r} stream has no positions")
        if shape[0] > n:
            raise ReplayError(
                f"{where}: {shape[0]} frames but only {n} positions in {self.stream_name!r}"
            )
        numbers = np.asarray(self.frame_numbers)
        if numbers.size and (
            numbers.min() < 0 or numbers.max() >= n or np.any(np.diff(numbers) <= 0)
        ):
            raise ReplayError(
                f"{where}: frame numbers must increase and lie within 0..{n - 1} "
                f"(got {numbers.min()}..{numbers.max()}, {numbers.size} values)"
            )
        if not np.all(np.isfinite(self.positions)):
            raise ReplayError(f"{where}: some positions are not finite numbers")
        if len(self.times) != n:
            raise ReplayError(f"{where}: {len(self.times)} event times for {n} positions")
        if shape[0]:
            try:  # a truncated or corrupt file fails here, not halfway through the replay
                self.frames.read(0, 1)
                self.frames.read(shape[0] - 1, shape[0])
            except ReplayError:
                raise
            except Exception as exc:
                raise ReplayError(f"{where}: the frames cannot be read: {one_line(exc)}") from exc


def detector_key(data_keys: Mapping[str, Any]) -> str | None:
    """The diffraction detector's key among a descriptor's data keys (HXN's names first)."""
    for key in DETECTOR_KEYS:
        if key in data_keys:
            return key
    for key, info in data_keys.items():
        if info.get("dtype") == "array" and len(info.get("shape") or ()) == 2:
            return key
    return None


def detector_info(
    start: Mapping[str, Any], descriptor: Mapping[str, Any], key: str
) -> DetectorInfo:
    """The series-header values, from the descriptor's configuration (else the plan's dwell)."""
    name = key.removesuffix("_image")
    values: dict[str, Any] = {}
    for config in (descriptor.get("configuration") or {}).values():
        values.update(config.get("data") or {})
    dwell = (start.get("scan") or {}).get("dwell") or (start.get("plan_args") or {}).get("dwell")
    frame_time = values.get(f"{name}_frame_time", dwell)
    if frame_time is None:
        raise ReplayError(
            f"cannot tell the frame time: no {name}_frame_time in the {descriptor.get('name')!r} "
            "configuration and no dwell in the start document"
        )
    return DetectorInfo(
        name=name,
        frame_time_s=float(frame_time),
        beam_center_y=_maybe_float(values.get(f"{name}_beam_center_y")),
        beam_center_x=_maybe_float(values.get(f"{name}_beam_center_x")),
        pixel_size_m=float(values.get(f"{name}_x_pixel_size", 75e-6)),
    )


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def mark_external(descriptor: dict[str, Any], key: str) -> dict[str, Any]:
    """The descriptor with ``key`` flagged as streamed data (ophyd-async's ``external``)."""
    data_keys = dict(descriptor.get("data_keys") or {})
    data_keys[key] = {**data_keys[key], "external": "STREAM:"}
    return {**descriptor, "data_keys": data_keys}


def strip_from_events(name: str, doc: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """An event or event page without ``keys`` (their data travel on the detector stream)."""
    if name not in ("event", "event_page"):
        return doc
    data = {k: v for k, v in doc.get("data", {}).items() if k not in keys}
    stamps = {k: v for k, v in doc.get("timestamps", {}).items() if k not in keys}
    out = {**doc, "data": data, "timestamps": stamps}
    if "filled" in doc:
        out["filled"] = {k: v for k, v in doc["filled"].items() if k not in keys}
    return out


def split_documents(
    source: str, documents: list[tuple[str, dict[str, Any]]]
) -> tuple[list[tuple[str, dict[str, Any]]], str, str, dict[str, Any], np.ndarray, np.ndarray]:
    """Find the stream that holds the frames; take its positions and times out of the events.

    Returns the documents to re-emit (frame key marked external and stripped
    from events; stream_resource/stream_datum dropped, since frames travel on
    the detector stream), the stream name, the frame key, that stream's first
    descriptor, the positions (n, 2) and the event times (n,).
    """
    descriptors = [doc for name, doc in documents if name == "descriptor"]
    found = [(d, detector_key(d.get("data_keys") or {})) for d in descriptors]
    found = [(d, key) for d, key in found if key is not None]
    if not found:
        streams = sorted({str(d.get("name")) for d in descriptors})
        raise ReplayError(
            f"{source}: no stream holds detector frames (looked for {list(DETECTOR_KEYS)} or a "
            f"2-D array key in streams {streams})"
        )
    descriptor, key = found[0]
    assert key is not None  # found keeps only descriptors with a frames key
    stream = str(descriptor.get("name"))
    uids = {d["uid"] for d in descriptors if d.get("name") == stream}
    data_keys = descriptor.get("data_keys") or {}
    missing = [k for k in DEFAULT_POSITION_KEYS if k not in data_keys]
    if missing:
        raise ReplayError(
            f"{source}: stream {stream!r} lacks the encoder positions {missing} "
            f"(it has {sorted(data_keys)})"
        )
    rows: list[tuple[int, float, list[float]]] = []
    for name, doc in documents:
        if doc.get("descriptor") not in uids:
            continue
        if name == "event":
            values = [doc["data"][k] for k in DEFAULT_POSITION_KEYS]
            rows.append((int(doc["seq_num"]), float(doc["time"]), values))
        elif name == "event_page":
            for i, seq in enumerate(doc["seq_num"]):
                values = [doc["data"][k][i] for k in DEFAULT_POSITION_KEYS]
                rows.append((int(seq), float(doc["time"][i]), values))
    rows.sort(key=lambda row: row[0])
    positions = np.array([row[2] for row in rows], dtype=np.float64).reshape(-1, 2)
    times = np.array([row[1] for row in rows], dtype=np.float64)
    cleaned: list[tuple[str, dict[str, Any]]] = []
    for name, doc in documents:
        if name in ("stream_resource", "stream_datum", "resource", "datum", "datum_page"):
            continue
        if name == "descriptor" and doc.get("uid") in uids:
            doc = mark_external(doc, key)
        elif doc.get("descriptor") in uids:
            doc = strip_from_events(name, doc, [key])
        cleaned.append((name, doc))
    return cleaned, stream, key, descriptor, positions, times
