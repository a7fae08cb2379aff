"""The PandA position stream (one JSON object per ZMQ PUB message): publish it and receive it.

- ``{"msg_type": "start", "arm_time", "start_time", "hw_time_offset_ns"}``
- ``{"msg_type": "data", "frame_number": k, "datasets": {CHANNEL: {"dtype": "float64",
  "size": n, "starting_sample_number": s, "data": [...]}, ...}}`` — many samples per message
- ``{"msg_type": "stop", "emitted_frames": n}`` (n = number of data messages)

Which channels hold the encoders, and how many samples make one detector
frame, is configuration elsewhere; this module only moves samples.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import zmq

from hxn_liveptycho.errors import DecodeError
from hxn_liveptycho.streams._zmq import ZmqPublisher, int_field, iso_now, json_part
from hxn_liveptycho.streams.curve import CurveKeys, client_options
from hxn_liveptycho.streams.receiver import RECEIVER_COUNTERS, SocketReceiver, names

logger = logging.getLogger(__name__)

MSG_TYPES = ("start", "data", "stop")


class PandaPublisher(ZmqPublisher):
    """Publishes PandA position messages (used by the simulator and replay).

    With ``curve_secret_key`` (Z85 or base64) the socket is a CurveZMQ server,
    as the Eiger publisher's is; receivers then need :attr:`curve_public_key`
    as their ``curve_server_key``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        socket_type: Literal["pub", "push"] = "pub",
        context: zmq.Context | None = None,
        sndhwm: int = 0,
        send_timeout: float | None = None,
        curve_secret_key: str | bytes | None = None,
    ) -> None:
        super().__init__(
            endpoint,
            socket_type=socket_type,
            context=context,
            sndhwm=sndhwm,
            send_timeout=send_timeout,
            curve_secret_key=curve_secret_key,
        )
        self._next_sample: dict[str, int] = {}
        self._data_messages = 0

    def start(self) -> None:
        """Send the start message; sample numbering and the data-message count restart at 0."""
        self._next_sample = {}
        self._data_messages = 0
        now = iso_now()
        self._send(
            {"msg_type": "start", "arm_time": now, "start_time": now, "hw_time_offset_ns": None}
        )

    def send_samples(self, datasets: Mapping[str, np.ndarray], *, frame_number: int) -> None:
        """Send one data message; ``starting_sample_number`` continues per channel."""
        payload: dict[str, Any] = {}
        for channel, values in datasets.items():
            samples = np.asarray(values, dtype=np.float64).reshape(-1)
            start = self._next_sample.get(channel, 0)
            payload[channel] = {
                "dtype": "float64",
                "size": int(samples.size),
                "starting_sample_number": start,
                "data": samples.tolist(),
            }
            self._next_sample[channel] = start + int(samples.size)
        self._send({"msg_type": "data", "frame_number": frame_number, "datasets": payload})
        self._data_messages += 1

    def stop(self) -> None:
        """Send the stop message with the number of data messages since start."""
        self._send({"msg_type": "stop", "emitted_frames": self._data_messages})

    def _send(self, message: Mapping[str, Any]) -> None:
        self.send_parts([json.dumps(message).encode()])


class PandaReceiver(SocketReceiver):
    """Receives the PandA stream on a background thread and hands samples to callbacks.

    ``on_samples(datasets, starting_sample_number)`` gets channel -> float64
    samples. Callbacks run on the receiver thread, in wire order. A malformed
    message is counted ("malformed") with one log line; a raising callback is
    counted ("callback_errors"); the thread carries on.

    With ``curve`` (:class:`~hxn_liveptycho.streams.curve.CurveKeys`) the socket
    is a CurveZMQ client.
    """

    counter_names = names(
        RECEIVER_COUNTERS,
        (
            "starts",
            "data",
            "samples",
            "stops",
            "gaps",
            "overlaps",
            "data_before_start",
            "missing_messages",
        ),
    )

    def __init__(
        self,
        endpoint: str,
        *,
        on_start: Callable[[dict], None],
        on_samples: Callable[[dict[str, np.ndarray], int], None],
        on_stop: Callable[[dict], None],
        socket_type: Literal["sub", "pull"] = "sub",
        rcvhwm: int = 0,
        name: str = "panda",
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._on_start = on_start
        self._on_samples = on_samples
        self._on_stop = on_stop
        self._armed = False
        self._next_sample: int | None = None
        self._data_since_start = 0
        super().__init__(
            endpoint,
            socket_type=socket_type,
            rcvhwm=rcvhwm,
            name=name,
            context=context,
            curve=client_options(curve),
        )

    # -- message handling (receiver thread) -----------------------------------------

    def _handle(self, parts: list[zmq.Frame]) -> None:
        if len(parts) != 1:
            raise DecodeError(f"PandA message has {len(parts)} parts, expected 1")
        message = json_part(parts[0], "PandA message")
        kind = message.get("msg_type")
        if kind == "data":
            self._handle_data(message)
        elif kind == "start":
            self._armed = True
            self._next_sample = None
            self._data_since_start = 0
            self.counters.add("starts")
            self._call(self._on_start, message)
        elif kind == "stop":
            self._handle_stop(message)
        else:
            raise DecodeError(
                f"PandA message has unknown msg_type {kind!r}; expected one of {MSG_TYPES}"
            )

    def _handle_data(self, message: dict[str, Any]) -> None:
        frame_number = int_field(message, "frame_number", "PandA data")
        datasets, start, size = _decode_datasets(message.get("datasets"), frame_number)
        if not self._armed:
            self.counters.add("data_before_start")
        self._check_continuity(start, size, frame_number)
        self._data_since_start += 1
        self.counters.add("data")
        self.counters.add("samples", size)
        self._call(self._on_samples, datasets, start)

    def _check_continuity(self, start: int, size: int, frame_number: int) -> None:
        """Count samples skipped (gaps) or repeated (overlaps) between data messages."""
        expected = self._next_sample
        if expected is not None and start > expected:
            self.counters.add("gaps", start - expected)
            logger.warning(
                "%s: data message %d starts at sample %d, expected %d: %d sample(s) missing",
                self.name,
                frame_number,
                start,
                expected,
                start - expected,
            )
        elif expected is not None and start < expected:
            self.counters.add("overlaps")
            logger.warning(
                "%s: data message %d starts at sample %d, before the expected %d (repeats)",
                self.name,
                frame_number,
                start,
                expected,
            )
        self._next_sample = max(expected or 0, start + size)

    def _handle_stop(self, message: dict[str, Any]) -> None:
        emitted = message.get("emitted_frames")
        if isinstance(emitted, int) and emitted > self._data_since_start:
            self.counters.add("missing_messages", emitted - self._data_since_start)
            logger.warning(
                "%s: stop says %d data messages were emitted, %d arrived",
                self.name,
                emitted,
                self._data_since_start,
            )
        self._armed = False
        self.counters.add("stops")
        self._call(self._on_stop, message)


def _decode_datasets(raw: Any, frame_number: int) -> tuple[dict[str, np.ndarray], int, int]:
    """Validate a data message's datasets; all channels must share start and size."""
    what = f"PandA data message {frame_number}"
    if not isinstance(raw, dict) or not raw:
        raise DecodeError(
            f"{what}: 'datasets' must be a non-empty object, got {type(raw).__name__}"
        )
    arrays: dict[str, np.ndarray] = {}
    starts: set[int] = set()
    for channel, entry in raw.items():
        if not isinstance(entry, dict):
            raise DecodeError(
                f"{what}: channel {channel!r} is {type(entry).__name__}, expected an object"
            )
        arrays[channel] = _decode_channel(entry, f"{what} channel {channel!r}")
        starts.add(int_field(entry, "starting_sample_number", f"{what} channel {channel!r}"))
    sizes = {a.size for a in arrays.values()}
    if len(starts) != 1 or len(sizes) != 1:
        raise DecodeError(
            f"{what}: channels disagree on starting_sample_number {sorted(starts)} "
            f"or size {sorted(sizes)}"
        )
    return arrays, starts.pop(), sizes.pop()


def _decode_channel(entry: dict[str, Any], what: str) -> np.ndarray:
    """One channel's samples as float64, checked against its declared dtype and size."""
    declared = entry.get("dtype")
    try:
        kind = np.dtype(declared).kind if isinstance(declared, str) else ""
    except Exception:  # numpy raises TypeError, ValueError or SyntaxError for bad names
        kind = ""
    if kind not in ("f", "i", "u", "b"):
        raise DecodeError(f"{what}: unsupported dtype {declared!r}")
    values = entry.get("data")
    if not isinstance(values, list):
        raise DecodeError(f"{what}: 'data' must be a list, got {type(values).__name__}")
    size = int_field(entry, "size", what)
    if size != len(values):
        raise DecodeError(f"{what}: size={size} but {len(values)} samples")
    try:
        samples = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"{what}: samples are not numbers: {exc}") from exc
    if samples.ndim != 1:
        raise DecodeError(f"{what}: samples are nested, expected a flat list")
    if not np.isfinite(samples).all():
        raise DecodeError(f"{what}: samples include null, NaN or infinite values")
    return samples
