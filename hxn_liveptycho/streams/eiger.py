"""The Eiger's SIMPLON stream interface, JSON multipart ("v1") and CBOR ("v2"): publish and receive.

A v1 series on the wire, as Dectris documents it:

- ``dheader-1.0`` {series, header_detail}; for ``basic``/``all`` a second part with
  the detector configuration (beam_center_x, count_time, nimages, ...); for
  ``all`` also flatfield, pixel mask and count-rate table (JSON + blob each).
- per image, one 4-part message: ``dimage-1.0`` {series, frame, hash},
  ``dimage_d-1.0`` {shape: [width, height], type, encoding, size}, the blob,
  ``dconfig-1.0`` {start_time, stop_time, real_time} in ns.
- ``dseries_end-1.0`` {series}.

A v2 series is three kinds of single-part CBOR messages, ``start``, ``image`` (all
channels/thresholds of one exposure) and ``end``; :mod:`hxn_liveptycho.streams.cbor`
describes them. The receiver tells the flavours apart per message (a CBOR map vs
a JSON object) unless told which to expect, and hands both to the same callbacks.

Series bookkeeping (both flavours): the newest series header defines the current
series. A detector re-armed mid-run (a new series id, or in v2 a new
``series_unique_id``) starts a new series; frames or an end of a series that a
newer header superseded are counted as ``stale_series`` and discarded, so a late
straggler can never end or pollute the new series.

A detector PUSHes (the client PULLs); at HXN a proxy republishes on PUB and
clients SUBscribe. Both ends here do either, chosen by ``socket_type``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq

from hxn_liveptycho.errors import ConfigurationError, DecodeError
from hxn_liveptycho.streams import cbor, codecs
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
#: How many superseded series ids / unique ids a receiver remembers as stale.
_MAX_STALE_SERIES = 64
FLAVOURS = ("v1", "v2")
#: The channel a single-channel detector (and this simulator by default) names its data.
DEFAULT_CHANNEL = "threshold_1"


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
    unique_id: str = ""
    channels: tuple[str, ...] = (DEFAULT_CHANNEL,)
    series_date: datetime.datetime | None = None


class EigerPublisher:
    """Publishes Eiger series exactly as a SIMPLON stream interface does (used by the simulator).

    ``flavour`` picks the wire format: ``"v1"`` (JSON multipart) or ``"v2"`` (CBOR).
    With ``curve_secret_key`` (Z85 or base64) the socket is a CurveZMQ server, as
    HXN's proxy is; clients then need :attr:`curve_public_key` as their server key.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        encoding: str = "bs32-lz4<",
        socket_type: Literal["pub", "push"] = "pub",
        flavour: Literal["v1", "v2"] = "v1",
        context: zmq.Context | None = None,
        sndhwm: int = 0,
        send_timeout: float | None = None,
        curve_secret_key: str | bytes | None = None,
    ) -> None:
        if encoding not in codecs.ENCODINGS:
            raise ConfigurationError(
                f"unknown Eiger encoding {encoding!r}; expected one of {codecs.ENCODINGS}"
            )
        if flavour not in FLAVOURS:
            raise ConfigurationError(
                f"Eiger stream flavour {flavour!r} is not supported (expected one of {FLAVOURS})"
            )
        self.encoding = encoding
        self.flavour = flavour
        self._series: dict[int, _PublishedSeries] = {}
        self._unannounced_ids: dict[int, str] = {}
        self._zmq = ZmqPublisher(
            endpoint,
            socket_type=socket_type,
            context=context,
            sndhwm=sndhwm,
            send_timeout=send_timeout,
            curve_secret_key=curve_secret_key,
        )
        self.endpoint = self._zmq.endpoint

    @property
    def curve_public_key(self) -> str | None:
        """The Z85 public key a CurveZMQ client needs as its server key (None without Curve)."""
        return self._zmq.curve_public_key

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
        channels: Sequence[str] | None = None,
        series_unique_id: str | None = None,
    ) -> None:
        """Send the series header (v1 ``dheader-1.0``, v2 ``start``).

        ``header`` overrides the default configuration; v1 names (``nimages``,
        ``photon_energy``, ``x_pixel_size``, ``detector_distance``, ...) are
        translated to their v2 names under v2. ``channels`` (v2; default
        ``["threshold_1"]``) lists the thresholds each image carries;
        ``series_unique_id`` (v2) defaults to a fresh UUID.
        """
        if header_detail not in HEADER_DETAILS:
            raise ValueError(
                f"header_detail must be one of {HEADER_DETAILS}, got {header_detail!r}"
            )
        names = tuple(channels) if channels is not None else (DEFAULT_CHANNEL,)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"channels must be non-empty names, got {channels!r}")
        if self.flavour == "v1" and len(names) > 1:
            raise ValueError("SIMPLON v1 carries one channel per image; use flavour='v2'")
        height, width = (int(n) for n in shape)
        pixel_dtype = np.dtype(dtype)
        if self.flavour == "v2":
            config = _default_config_v2(width, height, pixel_dtype, names)
            config.update(_v2_names(header or {}, names))
        else:
            config = _default_config(width, height, pixel_dtype)
            config.update(header or {})
        published = _PublishedSeries(
            shape=(height, width),
            dtype=pixel_dtype,
            frame_time_ns=round(float(config["frame_time"]) * 1e9),
            count_time_ns=round(float(config["count_time"]) * 1e9),
            unique_id=(series_unique_id or self._unannounced_ids.get(series) or str(uuid.uuid4())),
            channels=names,
            series_date=datetime.datetime.now(datetime.UTC),
        )
        self._series[series] = published
        self._unannounced_ids.pop(series, None)
        arrays = {
            "flatfield": flatfield if flatfield is not None else np.ones((height, width)),
            "pixel_mask": pixel_mask if pixel_mask is not None else np.zeros((height, width)),
            "countrate_table": countrate_table,
        }
        if self.flavour == "v2":
            self._zmq.send_parts(
                [_start_message_v2(series, published, config, header_detail, arrays)]
            )
            return
        parts = [_dumps({"htype": "dheader-1.0", "series": series, "header_detail": header_detail})]
        if header_detail in ("basic", "all"):
            parts.append(_dumps(config))
        if header_detail == "all":
            details = {
                "dflatfield-1.0": (arrays["flatfield"], np.float32),
                "dpixelmask-1.0": (arrays["pixel_mask"], np.uint32),
                "dcountrate_table-1.0": (
                    countrate_table if countrate_table is not None else _default_countrate_table(),
                    np.float32,
                ),
            }
            for htype, (array, kind) in details.items():
                parts.extend(_array_parts(htype, array, kind))
        self._zmq.send_parts(parts)

    def send_frame(
        self, series: int, frame: int, data: np.ndarray | Mapping[str, np.ndarray]
    ) -> None:
        """Encode (in C) and send one image: v1 the 4-part dimage message, v2 one CBOR ``image``.

        Under v2 ``data`` may map channel names to arrays (several thresholds in
        one image); a bare array goes out as the series' first channel.
        """
        known = self._series.get(series)
        if isinstance(data, Mapping):
            if self.flavour == "v1":
                raise ValueError("SIMPLON v1 carries one channel per image; use flavour='v2'")
            channels = {str(name): np.asarray(array) for name, array in data.items()}
            if not channels:
                raise ValueError("an image needs at least one channel")
        else:
            name = known.channels[0] if known else DEFAULT_CHANNEL
            channels = {name: np.asarray(data)}
        for name, array in channels.items():
            if array.ndim != 2:
                raise ValueError(f"an Eiger frame is 2-D, got shape {array.shape} ({name})")
            if known is not None and array.shape != known.shape:
                raise ValueError(
                    f"frame shape {array.shape} differs from series {series} shape {known.shape}"
                )
        frame_time = known.frame_time_ns if known else 0
        count_time = known.count_time_ns if known else 0
        start = frame * frame_time
        if self.flavour == "v2":
            message = {
                "type": "image",
                "series_id": series,
                "series_unique_id": self._unique_id(series),
                "series_date": known.series_date if known else None,
                "image_id": frame,
                "real_time": [count_time, 1_000_000_000],
                "start_time": [start, 1_000_000_000],
                "stop_time": [start + count_time, 1_000_000_000],
                "data": {
                    name: cbor.encode_array(array, self.encoding)
                    for name, array in channels.items()
                },
            }
            if message["series_date"] is None:
                del message["series_date"]
            self._zmq.send_parts([cbor.dumps(message)])
            return
        (data,) = channels.values()
        blob = codecs.encode(data, self.encoding)
        height, width = data.shape
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
        """Send the series end (v1 ``dseries_end-1.0``, v2 ``end``)."""
        if self.flavour == "v2":
            unique_id = self._unique_id(series)
            self._zmq.send_parts(
                [cbor.dumps({"type": "end", "series_id": series, "series_unique_id": unique_id})]
            )
        else:
            self._zmq.send_parts([_dumps({"htype": "dseries_end-1.0", "series": series})])
        self._series.pop(series, None)
        self._unannounced_ids.pop(series, None)

    def close(self, linger: float = 2.0) -> None:
        """Close the socket; queued messages get ``linger`` seconds to leave."""
        self._zmq.close(linger)

    def _unique_id(self, series: int) -> str:
        known = self._series.get(series)
        if known is not None:
            return known.unique_id
        return self._unannounced_ids.setdefault(series, str(uuid.uuid4()))

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


def _default_config_v2(
    width: int, height: int, dtype: np.dtype, channels: Sequence[str]
) -> dict[str, Any]:
    """The same EIGER2 configuration under the v2 start-message names (s, m, eV, Å, pixels)."""
    energy_ev = 12000.0
    config: dict[str, Any] = {
        "arm_date": datetime.datetime.now(datetime.UTC),
        "beam_center_x": width / 2,
        "beam_center_y": height / 2,
        "channels": list(channels),
        "count_time": 0.01,
        "countrate_correction_enabled": True,
        "detector_description": "Dectris EIGER2 Si (simulated)",
        "detector_serial_number": "E-00-0000 (simulated)",
        "detector_translation": [0.0, 0.0, 0.5],
        "flatfield_enabled": True,
        "frame_time": 0.01,
        "image_size_x": width,
        "image_size_y": height,
        "incident_energy": energy_ev,
        "incident_wavelength": 12398.42 / energy_ev,
        "number_of_images": 1,
        "pixel_mask_enabled": True,
        "pixel_size_x": 75e-6,
        "pixel_size_y": 75e-6,
        "sensor_material": "Si",
        "sensor_thickness": 0.00045,
        "threshold_energy": {name: energy_ev / 2 for name in channels},
        "virtual_pixel_interpolation_enabled": True,
    }
    if dtype.kind == "u":
        config["saturation_value"] = int(np.iinfo(dtype).max) - 1
    return config


#: v1 configuration names -> v2 start-message names (same units).
_V1_TO_V2 = {
    "nimages": "number_of_images",
    "photon_energy": "incident_energy",
    "wavelength": "incident_wavelength",
    "x_pixel_size": "pixel_size_x",
    "y_pixel_size": "pixel_size_y",
    "x_pixels_in_detector": "image_size_x",
    "y_pixels_in_detector": "image_size_y",
    "description": "detector_description",
    "detector_number": "detector_serial_number",
    "countrate_correction_applied": "countrate_correction_enabled",
    "flatfield_correction_applied": "flatfield_enabled",
    "pixel_mask_applied": "pixel_mask_enabled",
    "virtual_pixel_correction_applied": "virtual_pixel_interpolation_enabled",
}


def _v2_names(header: Mapping[str, Any], channels: Sequence[str]) -> dict[str, Any]:
    """Header overrides under v2 names; v1 names are translated, others pass through."""
    out: dict[str, Any] = {}
    for key, value in header.items():
        if key == "detector_distance":
            out["detector_translation"] = [0.0, 0.0, float(value)]
        elif key == "threshold_energy" and not isinstance(value, Mapping):
            out["threshold_energy"] = {name: float(value) for name in channels}
        else:
            out[_V1_TO_V2.get(key, key)] = value
    if "incident_energy" in out and "incident_wavelength" not in out:
        out["incident_wavelength"] = 12398.42 / float(out["incident_energy"])
    return out


def _start_message_v2(
    series: int,
    published: _PublishedSeries,
    config: Mapping[str, Any],
    header_detail: str,
    arrays: Mapping[str, np.ndarray | None],
) -> bytes:
    message: dict[str, Any] = {
        "type": "start",
        "series_id": series,
        "series_unique_id": published.unique_id,
        **config,
    }
    message["channels"] = list(published.channels)
    if header_detail == "all":
        flat = np.asarray(arrays["flatfield"], dtype=np.float32)
        mask = np.asarray(arrays["pixel_mask"], dtype=np.uint32)
        table = arrays["countrate_table"]
        if table is None:
            table = np.arange(1000, dtype=np.uint32)
        message["flatfield"] = {name: cbor.encode_array(flat) for name in published.channels}
        message["pixel_mask"] = {name: cbor.encode_array(mask) for name in published.channels}
        message["countrate_correction_lookup_table"] = cbor.encode_typed_array(np.asarray(table))
    return cbor.dumps(message)


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
    unique_id: str | None = None
    seen: set[int] = field(default_factory=set)
    next_frame: int = 0
    gaps: int = 0
    duplicates: int = 0


class EigerReceiver:
    """Receives an Eiger stream on a background thread and hands decoded frames to callbacks.

    ``flavour`` is ``"auto"`` (each message is looked at: a CBOR map is v2, a
    JSON multipart is v1), ``"v1"`` or ``"v2"``. Under v2, ``channel`` names the
    threshold delivered (None: the first channel of each image); other channels
    are counted (``other_channels``), and an image without the configured channel
    is malformed. CurveZMQ needs all of ``curve_server_key``, ``curve_public_key``
    and ``curve_secret_key`` (Z85 or base64), or none.

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
            "stale_series",
            "other_channels",
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
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
        flavour: Literal["auto", "v1", "v2"] = "auto",
        channel: str | None = DEFAULT_CHANNEL,
        decode_threads: int = 0,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if decode_threads < 0:
            raise ConfigurationError(f"decode_threads must be >= 0, got {decode_threads}")
        if flavour not in ("auto", *FLAVOURS):
            raise ConfigurationError(
                f"Eiger stream flavour {flavour!r} is not supported "
                f"(expected 'auto' or one of {FLAVOURS})"
            )
        if channel is not None and (not isinstance(channel, str) or not channel):
            raise ConfigurationError(f"channel must be a channel name or None, got {channel!r}")
        self.flavour = flavour
        self.channel = channel
        self._on_series_start = on_series_start
        self._on_frame = on_frame
        self._on_series_end = on_series_end
        self._series: dict[int, _SeriesTrack] = {}
        #: (series id, unique id) of the newest header: what "current" means.
        self._current: tuple[int, str | None] | None = None
        self._stale_ids: dict[int, None] = {}
        self._stale_unique_ids: dict[str, None] = {}
        self._stale_warned: dict[int, None] = {}
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
        #: Applied to each decoded frame (e.g. an ROI crop), on the decode pool when there is one.
        self.transform = transform
        self._pipeline = _DecodePipeline(self, decode_threads) if decode_threads else None

    @property
    def running(self) -> bool:
        return self._zmq.running

    def start(self) -> None:
        """Start receiving on a background thread (and the decode pool, if any)."""
        if self._pipeline is not None:
            self._pipeline.start()
        self._zmq.start()

    def stop(self, timeout: float = 5.0, *, drain: bool = True) -> bool:
        """Stop the thread and close the socket; True if it ended within ``timeout``.

        With a decode pool, frames already received are decoded and delivered first.
        """
        stopped = self._zmq.stop(timeout, drain=drain)
        if self._pipeline is not None:
            stopped = self._pipeline.stop(timeout) and stopped
        return stopped

    def __enter__(self) -> EigerReceiver:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- message handling (receiver thread) -----------------------------------------

    def _predecode(self, parts: list[zmq.Frame]) -> Any:
        """Pool worker: the image pixels of one message (or the error), None if not an image.

        Pure: it reads the message only. Parsing errors other than in the pixels
        are left for the ordered handling, which reports them as usual.
        """
        try:
            if cbor.looks_like_v2(_buffer(parts[0])) and self.flavour != "v1":
                message = cbor.loads(_buffer(parts[0]))
                if message.type != "image":
                    return None
                wanted = self.channel if self.channel is not None else message.channels[0]
                return self._transformed(cbor.decode_channel(message, wanted))
            first = json_part(parts[0], "part 1")
            if first.get("htype", "dimage-1.0") != "dimage-1.0" or len(parts) < 3:
                return None
            what = f"image series {first.get('series')} frame {first.get('frame')}"
            return self._transformed(_decode_image(parts[1], parts[2], what))
        except Exception as exc:
            return exc

    def _transformed(self, pixels: np.ndarray) -> np.ndarray:
        return pixels if self.transform is None else self.transform(pixels)

    def _pixels(self, parts: list[zmq.Frame], decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The pre-decoded pixels of this message when a pool made them, else decode now."""
        prepared = self._pipeline.prepared if self._pipeline is not None else None
        if prepared is None or prepared[0] != id(parts) or prepared[1] is None:
            return self._transformed(decode())
        if isinstance(prepared[1], Exception):
            raise prepared[1]
        return prepared[1]

    def _handle(self, parts: list[zmq.Frame]) -> None:
        flavour = self.flavour
        if flavour == "auto":
            flavour = "v2" if cbor.looks_like_v2(_buffer(parts[0])) else "v1"
        if flavour == "v2":
            self._handle_v2(parts)
        else:
            self._handle_v1(parts)

    def _handle_v1(self, parts: list[zmq.Frame]) -> None:
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
        self._begin_series(series, None)
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
        if self._discard_stale(series, None, f"frame {frame}"):
            return
        data = self._pixels(parts, lambda: _decode_image(parts[1], parts[2], what))
        if len(parts) >= 4:
            config = json_part(parts[3], f"{what} part 4 (dconfig)")
            if config.get("htype") != "dconfig-1.0":
                raise DecodeError(
                    f"{what}: part 4 htype is {config.get('htype')!r}, expected 'dconfig-1.0'"
                )
        else:
            self.counters.add("nonstandard")
        self._deliver(series, frame, None, data)

    def _handle_end(self, parts: list[zmq.Frame], first: dict[str, Any]) -> None:
        series = int_field(first, "series", "dseries_end-1.0")
        if self._discard_stale(series, None, "series end"):
            return
        self._end_series(series)

    # -- v2 (CBOR) --------------------------------------------------------------------

    def _handle_v2(self, parts: list[zmq.Frame]) -> None:
        if len(parts) != 1:
            raise DecodeError(
                f"v2 message has {len(parts)} parts; SIMPLON stream v2 sends one CBOR item"
            )
        message = cbor.loads(_buffer(parts[0]))
        series, unique_id = message.series_id, message.series_unique_id
        if message.type == "start":
            info = cbor.start_info(message)
            self._begin_series(series, unique_id)
            self.counters.add("headers")
            self._zmq.call(self._on_series_start, series, info)
        elif message.type == "image":
            frame = message.image_id
            assert frame is not None
            if self._discard_stale(series, unique_id, f"image {frame}"):
                return
            channels = message.channels
            wanted = self.channel if self.channel is not None else channels[0]
            data = self._pixels(parts, lambda: cbor.decode_channel(message, wanted))
            if len(channels) > 1:
                self.counters.add("other_channels", len(channels) - 1)
            self._deliver(series, frame, unique_id, data)
        else:
            if self._discard_stale(series, unique_id, "series end"):
                return
            self._end_series(series)

    # -- series, gap and duplicate bookkeeping ----------------------------------------

    def _deliver(self, series: int, frame: int, unique_id: str | None, data: np.ndarray) -> None:
        if not self._accept_frame(series, frame, unique_id):
            return
        self.counters.add("frames")
        self._zmq.call(self._on_frame, EigerFrame(series=series, frame=frame, data=data))

    def _begin_series(self, series: int, unique_id: str | None) -> None:
        """A header: it becomes the current series; every other series is superseded (stale)."""
        key = (series, unique_id)
        superseded: dict[tuple[int, str | None], _SeriesTrack | None] = {
            (number, track.unique_id): track
            for number, track in self._series.items()
            if (number, track.unique_id) != key
        }
        if self._current is not None and self._current != key:
            superseded.setdefault(self._current, None)
        for (number, old_unique), track in superseded.items():
            if number != series:
                _remember(self._stale_ids, number)
                self._series.pop(number, None)
            if old_unique is not None and old_unique != unique_id:
                _remember(self._stale_unique_ids, old_unique)
            if track is not None and track.seen:
                logger.warning(
                    "%s: series %d (%d frames) superseded by a header for series %d before its "
                    "end (detector re-armed?); its late frames will be discarded",
                    self.name,
                    number,
                    len(track.seen),
                    series,
                )
        self._stale_ids.pop(series, None)
        self._stale_warned.pop(series, None)
        if unique_id is not None:
            self._stale_unique_ids.pop(unique_id, None)
        self._current = key
        existing = self._series.get(series)
        if existing is not None and existing.unique_id == unique_id:
            if not existing.announced:
                # Frames overtook their header: keep counting from what already arrived.
                existing.announced = True
                return
            logger.warning(
                "%s: header for series %d seen again; restarting its frame count", self.name, series
            )
        self._track(series, announced=True, unique_id=unique_id)

    def _is_stale(self, series: int, unique_id: str | None) -> bool:
        """True for a message of a series that a newer header superseded."""
        if unique_id is not None and unique_id in self._stale_unique_ids:
            return True
        if self._current is None:
            return False
        current, current_unique = self._current
        if series == current:
            return (
                unique_id is not None and current_unique is not None and unique_id != current_unique
            )
        if series in self._stale_ids:
            return True
        return series < current and series not in self._series

    def _discard_stale(self, series: int, unique_id: str | None, what: str) -> bool:
        """Count and drop a message of a superseded series; False if it is not stale."""
        if not self._is_stale(series, unique_id):
            return False
        self.counters.add("stale_series")
        if series not in self._stale_warned:
            _remember(self._stale_warned, series)
            logger.warning(
                "%s: %s of series %d arrived after a newer series header (current: %s); "
                "discarded (further ones are only counted)",
                self.name,
                what,
                series,
                self._current[0] if self._current else None,
            )
        return True

    def _end_series(self, series: int) -> None:
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

    def _track(self, series: int, *, announced: bool, unique_id: str | None = None) -> _SeriesTrack:
        track = _SeriesTrack(announced=announced, unique_id=unique_id)
        self._series.pop(series, None)
        self._series[series] = track
        while len(self._series) > _MAX_TRACKED_SERIES:
            del self._series[next(iter(self._series))]
        return track

    def _accept_frame(self, series: int, frame: int, unique_id: str | None = None) -> bool:
        """Count unknown series, gaps, late and duplicate frames; False drops a duplicate."""
        track = self._series.get(series)
        if track is None:
            track = self._track(series, announced=False, unique_id=unique_id)
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


def _remember(bounded: dict[Any, None], key: Any) -> None:
    """Add ``key`` to an insertion-ordered set that keeps the newest _MAX_STALE_SERIES."""
    bounded.pop(key, None)
    bounded[key] = None
    while len(bounded) > _MAX_STALE_SERIES:
        del bounded[next(iter(bounded))]


def _buffer(part: zmq.Frame | bytes) -> memoryview:
    return part.buffer if isinstance(part, zmq.Frame) else memoryview(part)


class _EigerSocket(ZmqReceiver):
    """The socket thread behind an EigerReceiver."""

    counter_names = EigerReceiver.counter_names

    def __init__(self, owner: EigerReceiver, endpoint: str, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(endpoint, **kwargs)

    def handle_message(self, parts: list[zmq.Frame]) -> None:
        pipeline = self._owner._pipeline
        if pipeline is None:
            self._owner._handle(parts)
        else:
            pipeline.submit(parts)


class _DecodePipeline:
    """Decodes frames on a thread pool and delivers them in arrival order.

    The socket thread only receives; pixel decoding (C codecs that release the
    GIL) runs on ``threads`` workers; one delivery thread then runs the usual
    handling -- series bookkeeping, counters, callbacks -- message by message in
    the order they arrived, using the pre-decoded pixels. The queue between
    them is bounded, so a slow consumer backs up into ZMQ's buffers instead of
    dropping anything.
    """

    _STOP = object()

    def __init__(self, owner: EigerReceiver, threads: int) -> None:
        self._owner = owner
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{owner.name}-decode")
        self._ordered: queue.Queue[Any] = queue.Queue(maxsize=4 * threads)
        self._thread = threading.Thread(
            target=self._deliver, name=f"{owner.name}-deliver", daemon=True
        )
        #: The pixels pre-decoded for the message being handled (delivery thread only).
        self.prepared: tuple[int, Any] | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, parts: list[zmq.Frame]) -> None:
        self._ordered.put((parts, self._pool.submit(self._owner._predecode, parts)))

    def stop(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._ordered.put(self._STOP)
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=False)
        return not self._thread.is_alive()

    def _deliver(self) -> None:
        socket = self._owner._zmq
        while True:
            item = self._ordered.get()
            if item is self._STOP:
                return
            parts, future = item
            self.prepared = (id(parts), future.result())
            try:
                socket._handle_safely(parts, self._owner._handle)
            finally:
                self.prepared = None


def _decode_image(description_part: zmq.Frame, blob_part: zmq.Frame, what: str) -> np.ndarray:
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
