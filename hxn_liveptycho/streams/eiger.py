"""The Eiger's SIMPLON stream interface (JSON multipart, "v1"): publish it and receive it.

A series on the wire, as Dectris documents it:

- ``dheader-1.0`` {series, header_detail}; for ``basic``/``all`` a second part with
  the detector configuration (beam_center_x, count_time, nimages, ...); for
  ``all`` also flatfield, pixel mask and count-rate table (JSON + blob each).
- per image, one 4-part message: ``dimage-1.0`` {series, frame, hash},
  ``dimage_d-1.0`` {shape: [width, height], type, encoding, size}, the blob,
  ``dconfig-1.0`` {start_time, stop_time, real_time} in ns.
- ``dseries_end-1.0`` {series}.

A detector PUSHes (the client PULLs); at HXN a proxy republishes on PUB and
clients SUBscribe. Both ends here do either, chosen by ``socket_type``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq

from hxn_liveptycho.errors import ConfigurationError, DecodeError
from hxn_liveptycho.streams import codecs
from hxn_liveptycho.streams._zmq import (
    ZmqPublisher,
    ZmqReceiver,
    curve_options,
    int_field,
    json_part,
    names,
)

logger = logging.getLogger(__name__)

HEADER_DETAILS = ("none", "basic", "all")
#: Parts of a dheader-1.0 message per header_detail (an appendix may follow).
_HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
#: The "all" header's detail arrays: htype -> key in the series-start dict.
_HEADER_ARRAYS = {
    "dflatfield-1.0": "flatfield",
    "dpixelmask-1.0": "pixel_mask",
    "dcountrate_table-1.0": "countrate_table",
}
#: How many series a receiver tracks at once (series whose end never came are evicted).
_MAX_TRACKED_SERIES = 16


@dataclass(frozen=True, slots=True)
class EigerFrame:
    """One decoded image; ``frame`` is 0-based within the series, as the detector counts."""

    series: int
    frame: int
    data: np.ndarray


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _iso_now() -> str:
    ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


# -- publisher ----------------------------------------------------------------------------


@dataclass(slots=True)
class _PublishedSeries:
    shape: tuple[int, int]
    dtype: np.dtype
    frame_time_ns: int
    count_time_ns: int


class EigerPublisher:
    """Publishes Eiger series exactly as a SIMPLON stream interface does (used by the simulator)."""

    def __init__(
        self,
        endpoint: str,
        *,
        encoding: str = "bs32-lz4<",
        socket_type: Literal["pub", "push"] = "pub",
        flavour: Literal["v1"] = "v1",
        context: zmq.Context | None = None,
        sndhwm: int = 0,
        send_timeout: float | None = None,
    ) -> None:
        if encoding not in codecs.ENCODINGS:
            raise ConfigurationError(
                f"unknown Eiger encoding {encoding!r}; expected one of {codecs.ENCODINGS}"
            )
        if flavour != "v1":
            raise ConfigurationError(
                f"Eiger stream flavour {flavour!r} is not supported (only 'v1')"
            )
        self.encoding = encoding
        self.flavour = flavour
        self._series: dict[int, _PublishedSeries] = {}
        self._zmq = ZmqPublisher(
            endpoint,
            socket_type=socket_type,
            context=context,
            sndhwm=sndhwm,
            send_timeout=send_timeout,
        )
        self.endpoint = self._zmq.endpoint

    def wait_for_subscribers(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` SUB sockets have subscribed (PUB only; ZMQ's slow joiner)."""
        return self._zmq.wait_for_subscribers(count, timeout)

    def start_series(
        self,
        series: int,
        *,
        shape: tuple[int, int],
        dtype: str,
        header: Mapping[str, Any] | None = None,
        header_detail: str = "basic",
        flatfield: np.ndarray | None = None,
        pixel_mask: np.ndarray | None = None,
        countrate_table: np.ndarray | None = None,
    ) -> None:
        """Send ``dheader-1.0``; ``header`` (Dectris config names and units) overrides defaults."""
        if header_detail not in HEADER_DETAILS:
            raise ValueError(
                f"header_detail must be one of {HEADER_DETAILS}, got {header_detail!r}"
            )
        height, width = (int(n) for n in shape)
        pixel_dtype = np.dtype(dtype)
        config = _default_config(width, height, pixel_dtype)
        config.update(header or {})
        self._series[series] = _PublishedSeries(
            shape=(height, width),
            dtype=pixel_dtype,
            frame_time_ns=round(float(config["frame_time"]) * 1e9),
            count_time_ns=round(float(config["count_time"]) * 1e9),
        )
        parts = [_dumps({"htype": "dheader-1.0", "series": series, "header_detail": header_detail})]
        if header_detail in ("basic", "all"):
            parts.append(_dumps(config))
        if header_detail == "all":
            arrays = {
                "dflatfield-1.0": (flatfield, np.ones((height, width), np.float32), np.float32),
                "dpixelmask-1.0": (pixel_mask, np.zeros((height, width), np.uint32), np.uint32),
                "dcountrate_table-1.0": (countrate_table, _default_countrate_table(), np.float32),
            }
            for htype, (given, default, kind) in arrays.items():
                parts.extend(_array_parts(htype, given if given is not None else default, kind))
        self._zmq.send_parts(parts)

    def send_frame(self, series: int, frame: int, data: np.ndarray) -> None:
        """Encode (in C) and send one image as the 4-part dimage message."""
        data = np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"an Eiger frame is 2-D, got shape {data.shape}")
        known = self._series.get(series)
        if known is not None and data.shape != known.shape:
            raise ValueError(
                f"frame shape {data.shape} differs from series {series} shape {known.shape}"
            )
        blob = codecs.encode(data, self.encoding)
        height, width = data.shape
        frame_time = known.frame_time_ns if known else 0
        count_time = known.count_time_ns if known else 0
        start = frame * frame_time
        self._zmq.send_parts(
            [
                _dumps(
                    {
                        "htype": "dimage-1.0",
                        "series": series,
                        "frame": frame,
                        "hash": hashlib.md5(blob).hexdigest(),
                    }
                ),
                _dumps(
                    {
                        "htype": "dimage_d-1.0",
                        "shape": [width, height],
                        "type": data.dtype.name,
                        "encoding": self.encoding,
                        "size": len(blob),
                    }
                ),
                blob,
                _dumps(
                    {
                        "htype": "dconfig-1.0",
                        "start_time": start,
                        "stop_time": start + count_time,
                        "real_time": count_time,
                    }
                ),
            ]
        )

    def end_series(self, series: int) -> None:
        """Send ``dseries_end-1.0``."""
        self._series.pop(series, None)
        self._zmq.send_parts([_dumps({"htype": "dseries_end-1.0", "series": series})])

    def close(self, linger: float = 2.0) -> None:
        """Close the socket; queued messages get ``linger`` seconds to leave."""
        self._zmq.close(linger)

    def __enter__(self) -> EigerPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _default_config(width: int, height: int, dtype: np.dtype) -> dict[str, Any]:
    """A plausible EIGER2 configuration (Dectris names and units: s, m, eV, Å, pixels)."""
    energy_ev = 12000.0
    return {
        "auto_summation": True,
        "beam_center_x": width / 2,
        "beam_center_y": height / 2,
        "bit_depth_image": dtype.itemsize * 8,
        "bit_depth_readout": 16,
        "count_time": 0.01,
        "countrate_correction_applied": True,
        "data_collection_date": _iso_now(),
        "description": "Dectris EIGER2 Si (simulated)",
        "detector_distance": 0.5,
        "detector_number": "E-00-0000 (simulated)",
        "flatfield_correction_applied": True,
        "frame_time": 0.01,
        "nimages": 1,
        "ntrigger": 1,
        "photon_energy": energy_ev,
        "pixel_mask_applied": True,
        "sensor_material": "Si",
        "sensor_thickness": 0.00045,
        "software_version": "hxn_liveptycho simulator",
        "trigger_mode": "exts",
        "wavelength": 12398.42 / energy_ev,
        "x_pixel_size": 75e-6,
        "x_pixels_in_detector": width,
        "y_pixel_size": 75e-6,
        "y_pixels_in_detector": height,
    }


def _default_countrate_table() -> np.ndarray:
    """An identity count-rate correction table (2 rows: measured, corrected)."""
    counts = np.arange(1000, dtype=np.float32)
    return np.vstack([counts, counts])


def _array_parts(htype: str, array: np.ndarray, kind: type) -> list[bytes]:
    data = np.ascontiguousarray(array, dtype=np.dtype(kind).newbyteorder("<"))
    height, width = data.shape
    description = {"htype": htype, "shape": [width, height], "type": np.dtype(kind).name}
    return [_dumps(description), data.tobytes()]


# -- receiver -----------------------------------------------------------------------------


@dataclass(slots=True)
class _SeriesTrack:
    """Which frames of one series arrived, to count gaps and duplicates."""

    announced: bool
    seen: set[int] = field(default_factory=set)
    next_frame: int = 0
    gaps: int = 0
    duplicates: int = 0


class EigerReceiver:
    """Receives an Eiger stream on a background thread and hands decoded frames to callbacks.

    Callbacks run on the receiver thread, in wire order: keep them short (put
    the frame on a queue). A malformed message is counted in ``counters``
    ("malformed") with one log line and the thread carries on; a callback that
    raises is counted ("callback_errors") and logged.
    """

    counter_names = names(
        ZmqReceiver.counter_names,
        (
            "headers",
            "frames",
            "series_end",
            "unknown_series",
            "duplicates",
            "gaps",
            "late",
            "nonstandard",
        ),
    )

    def __init__(
        self,
        endpoint: str,
        *,
        on_series_start: Callable[[int, dict], None],
        on_frame: Callable[[EigerFrame], None],
        on_series_end: Callable[[int], None],
        socket_type: Literal["sub", "pull"] = "sub",
        rcvhwm: int = 0,
        name: str = "eiger",
        context: zmq.Context | None = None,
        curve_server_key: str | None = None,
        curve_public_key: str | None = None,
        curve_secret_key: str | None = None,
    ) -> None:
        self._on_series_start = on_series_start
        self._on_frame = on_frame
        self._on_series_end = on_series_end
        self._series: dict[int, _SeriesTrack] = {}
        self._zmq = _EigerSocket(
            self,
            endpoint,
            socket_type=socket_type,
            rcvhwm=rcvhwm,
            name=name,
            context=context,
            curve=curve_options(curve_server_key, curve_public_key, curve_secret_key),
        )
        self.counters = self._zmq.counters
        self.endpoint = endpoint
        self.name = name

    @property
    def running(self) -> bool:
        return self._zmq.running

    def start(self) -> None:
        """Start receiving on a background thread."""
        self._zmq.start()

    def stop(self, timeout: float = 5.0, *, drain: bool = True) -> bool:
        """Stop the thread and close the socket; True if it ended within ``timeout``."""
        return self._zmq.stop(timeout, drain=drain)

    def __enter__(self) -> EigerReceiver:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- message handling (receiver thread) -----------------------------------------

    def _handle(self, parts: list[zmq.Frame]) -> None:
        first = json_part(parts[0], "part 1")
        htype = first.get("htype")
        if htype is None and "frame" in first:
            # HXN's replay tool sends {"frame", "series"} without an htype.
            self.counters.add("nonstandard")
            htype = "dimage-1.0"
        if htype == "dimage-1.0":
            self._handle_image(parts, first)
        elif htype == "dheader-1.0":
            self._handle_header(parts, first)
        elif htype == "dseries_end-1.0":
            self._handle_end(parts, first)
        else:
            raise DecodeError(f"unknown htype {htype!r} in part 1 ({len(parts)} parts)")

    def _handle_header(self, parts: list[zmq.Frame], first: dict[str, Any]) -> None:
        series = int_field(first, "series", "dheader-1.0")
        detail = first.get("header_detail", "none")
        if detail not in _HEADER_PARTS:
            raise DecodeError(f"dheader-1.0: unknown header_detail {detail!r}")
        needed = _HEADER_PARTS[detail]
        if len(parts) < needed:
            raise DecodeError(
                f"dheader-1.0 (series {series}, header_detail={detail!r}) has {len(parts)} parts, "
                f"needs {needed}"
            )
        info: dict[str, Any] = {}
        if needed >= 2:
            info.update(json_part(parts[1], "dheader-1.0 part 2 (config)"))
        for index in range(2, needed, 2):
            key, array = _decode_header_array(parts[index], parts[index + 1])
            info[key] = array
        if len(parts) > needed:
            info["header_appendix"] = parts[needed].bytes.decode("utf-8", "replace")
        info["header_detail"] = detail
        if series in self._series:
            logger.warning(
                "%s: header for series %d seen again; restarting its frame count", self.name, series
            )
        self._track(series, announced=True)
        self.counters.add("headers")
        self._zmq.call(self._on_series_start, series, info)

    def _handle_image(self, parts: list[zmq.Frame], first: dict[str, Any]) -> None:
        series = int_field(first, "series", "dimage-1.0")
        frame = int_field(first, "frame", "dimage-1.0")
        what = f"image series {series} frame {frame}"
        if len(parts) < 3:
            raise DecodeError(
                f"{what}: {len(parts)} parts, needs dimage, dimage_d, blob[, dconfig]"
            )
        data = _decode_image(parts[1], parts[2], what)
        if len(parts) >= 4:
            config = json_part(parts[3], f"{what} part 4 (dconfig)")
            if config.get("htype") != "dconfig-1.0":
                raise DecodeError(
                    f"{what}: part 4 htype is {config.get('htype')!r}, expected 'dconfig-1.0'"
                )
        else:
            self.counters.add("nonstandard")
        if not self._accept_frame(series, frame):
            return
        self.counters.add("frames")
        self._zmq.call(self._on_frame, EigerFrame(series=series, frame=frame, data=data))

    def _handle_end(self, parts: list[zmq.Frame], first: dict[str, Any]) -> None:
        series = int_field(first, "series", "dseries_end-1.0")
        track = self._series.pop(series, None)
        if track is None:
            logger.info("%s: series %d ended (no frames or header seen)", self.name, series)
        else:
            logger.info(
                "%s: series %d ended: %d frames, %d skipped, %d duplicates",
                self.name,
                series,
                len(track.seen),
                track.gaps,
                track.duplicates,
            )
        self.counters.add("series_end")
        self._zmq.call(self._on_series_end, series)

    # -- gap and duplicate bookkeeping ------------------------------------------------

    def _track(self, series: int, *, announced: bool) -> _SeriesTrack:
        track = _SeriesTrack(announced=announced)
        self._series.pop(series, None)
        self._series[series] = track
        while len(self._series) > _MAX_TRACKED_SERIES:
            del self._series[next(iter(self._series))]
        return track

    def _accept_frame(self, series: int, frame: int) -> bool:
        """Count unknown series, gaps, late and duplicate frames; False drops a duplicate."""
        track = self._series.get(series)
        if track is None:
            track = self._track(series, announced=False)
            logger.warning(
                "%s: frame %d of series %d arrived without a series header",
                self.name,
                frame,
                series,
            )
        if not track.announced:
            self.counters.add("unknown_series")
        if frame in track.seen:
            track.duplicates += 1
            self.counters.add("duplicates")
            logger.warning("%s: duplicate frame %d of series %d dropped", self.name, frame, series)
            return False
        if frame > track.next_frame:
            missing = frame - track.next_frame
            track.gaps += missing
            self.counters.add("gaps", missing)
            logger.warning(
                "%s: series %d skipped %d frame(s): %d..%d",
                self.name,
                series,
                missing,
                track.next_frame,
                frame - 1,
            )
        elif frame < track.next_frame:
            self.counters.add("late")
            logger.warning(
                "%s: frame %d of series %d arrived late (out of order)", self.name, frame, series
            )
        track.seen.add(frame)
        track.next_frame = max(track.next_frame, frame + 1)
        return True


class _EigerSocket(ZmqReceiver):
    """The socket thread behind an EigerReceiver."""

    counter_names = EigerReceiver.counter_names

    def __init__(self, owner: EigerReceiver, endpoint: str, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(endpoint, **kwargs)

    def handle_message(self, parts: list[zmq.Frame]) -> None:
        self._owner._handle(parts)


def _decode_image(description_part: zmq.Frame, blob_part: zmq.Frame, what: str) -> np.ndarray:
    """Decode the dimage_d-1.0 description and its blob into a (height, width) array."""
    description = json_part(description_part, f"{what} part 2 (dimage_d)")
    if description.get("htype") != "dimage_d-1.0":
        raise DecodeError(
            f"{what}: part 2 htype is {description.get('htype')!r}, expected 'dimage_d-1.0'"
        )
    width, height = _wire_shape(description.get("shape"), what)
    encoding = description.get("encoding")
    pixel_type = description.get("type")
    if not isinstance(pixel_type, str):
        raise DecodeError(f"{what}: pixel 'type' {pixel_type!r} is not a type name")
    blob = blob_part.buffer
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
    key = _HEADER_ARRAYS.get(htype)
    if key is None:
        raise DecodeError(f"dheader-1.0: unexpected detail htype {htype!r}")
    width, height = _wire_shape(description.get("shape"), htype)
    try:
        return key, codecs.decode(
            blob_part.buffer, encoding="raw", shape=(height, width), dtype=description.get("type")
        )
    except DecodeError as exc:
        raise DecodeError(f"dheader-1.0 {htype}: {exc}") from exc
