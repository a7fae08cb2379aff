"""The Eiger publisher: a SIMPLON stream interface's series, v1 (JSON multipart) or v2 (CBOR).

The simulator and replay publish with it; :mod:`hxn_liveptycho.streams.eiger`
describes the wire format both flavours follow.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams import cbor, codecs
from hxn_liveptycho.streams._zmq import ZmqPublisher, iso_now
from hxn_liveptycho.streams.eiger_messages import DEFAULT_CHANNEL, FLAVOURS, HEADER_DETAILS


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class _PublishedSeries:
    shape: tuple[int, int]
    dtype: np.dtype
    frame_time_ns: int
    count_time_ns: int
    unique_id: str = ""
    channels: tuple[str, ...] = (DEFAULT_CHANNEL,)
    series_date: datetime.datetime | None = None


class EigerPublisher(ZmqPublisher):
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
        super().__init__(
            endpoint,
            socket_type=socket_type,
            context=context,
            sndhwm=sndhwm,
            send_timeout=send_timeout,
            curve_secret_key=curve_secret_key,
        )

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
            self.send_parts([_start_message_v2(series, published, config, header_detail, arrays)])
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
        self.send_parts(parts)

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
            self.send_parts([cbor.dumps(message)])
            return
        (data,) = channels.values()
        blob = codecs.encode(data, self.encoding)
        height, width = data.shape
        self.send_parts(
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
            self.send_parts(
                [cbor.dumps({"type": "end", "series_id": series, "series_unique_id": unique_id})]
            )
        else:
            self.send_parts([_dumps({"htype": "dseries_end-1.0", "series": series})])
        self._series.pop(series, None)
        self._unannounced_ids.pop(series, None)

    def _unique_id(self, series: int) -> str:
        known = self._series.get(series)
        if known is not None:
            return known.unique_id
        return self._unannounced_ids.setdefault(series, str(uuid.uuid4()))


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
        "data_collection_date": iso_now(),
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


def _array_parts(htype: str, array: np.ndarray | None, kind: type) -> list[bytes]:
    if array is None:
        raise ValueError(f"{htype}: an 'all' header needs this array")
    data = np.ascontiguousarray(array, dtype=np.dtype(kind).newbyteorder("<"))
    height, width = data.shape
    description = {"htype": htype, "shape": [width, height], "type": np.dtype(kind).name}
    return [_dumps(description), data.tobytes()]


__all__ = ["EigerPublisher"]
