"""ZMQ plumbing shared by the Eiger and PandA streams: a bound publisher and wire-field helpers.

The receiving side (the socket thread and what every receiver shares) is
:mod:`hxn_liveptycho.streams.receiver`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, Self

import zmq

from hxn_liveptycho.errors import ConfigurationError, DecodeError
from hxn_liveptycho.streams.curve import curve_server_options


def json_part(part: zmq.Frame | bytes, what: str) -> dict[str, Any]:
    """Parse one message part as a JSON object, or say which part was not."""
    raw = part.bytes if isinstance(part, zmq.Frame) else bytes(part)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, too deep, huge integers
        raise DecodeError(f"{what} is not valid JSON ({len(raw)} bytes): {exc}") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"{what} is JSON {type(value).__name__}, expected an object")
    return value


def iso_now() -> str:
    """UTC time with nanoseconds, as the Eiger and the PandA write their timestamps."""
    seconds, fraction = divmod(time.time_ns(), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def int_field(obj: dict[str, Any], key: str, what: str) -> int:
    """A required non-negative integer field (JSON bools are not integers here)."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DecodeError(f"{what}: field {key!r} must be a non-negative integer, got {value!r}")
    return value


class ZmqPublisher:
    """One bound PUB (as XPUB, to see subscribers) or PUSH socket, safe to share between threads.

    The Eiger and PandA publishers are ones that turn their messages into parts.
    With ``curve_secret_key`` (Z85 or base64) the socket is a CurveZMQ server, as
    HXN's proxy is; clients then need :attr:`curve_public_key` as their server key.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        socket_type: Literal["pub", "push"],
        context: zmq.Context | None,
        sndhwm: int,
        send_timeout: float | None,
        curve_secret_key: str | bytes | None = None,
    ) -> None:
        if socket_type not in ("pub", "push"):
            raise ConfigurationError(f"socket_type must be 'pub' or 'push', got {socket_type!r}")
        self.socket_type = socket_type
        self._lock = threading.Lock()
        self._subscribers = 0
        curve = curve_server_options(curve_secret_key)
        #: The Z85 public key clients need (as curve_server_key), or None without CurveZMQ.
        self.curve_public_key: str | None = (
            zmq.curve_public(curve[zmq.CURVE_SECRETKEY]).decode("ascii") if curve else None
        )
        ctx = context if context is not None else zmq.Context.instance()
        sock = ctx.socket(zmq.XPUB if socket_type == "pub" else zmq.PUSH)
        try:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
            for option, value in curve.items():
                sock.setsockopt(option, value)
            if socket_type == "pub":
                sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            if send_timeout is not None:
                sock.setsockopt(zmq.SNDTIMEO, int(send_timeout * 1000))
            sock.bind(endpoint)
            self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigurationError(
                f"cannot bind {socket_type} socket on {endpoint!r}: {exc}"
            ) from exc
        self._socket: zmq.Socket | None = sock

    @property
    def closed(self) -> bool:
        return self._socket is None

    def wait_for_subscribers(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until ``count`` subscribers have subscribed (PUB); avoids ZMQ's slow joiner.

        PUSH never drops for lack of a peer (it holds messages until a puller
        connects), so for PUSH this returns True at once.
        """
        if self.socket_type == "push":
            return True
        deadline = time.monotonic() + timeout
        with self._lock:
            sock = self._require_open()
            while self._subscribers < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    return self._subscribers >= count
                event = sock.recv()
                if event[:1] == b"\x01":
                    self._subscribers += 1
                elif event[:1] == b"\x00":
                    self._subscribers -= 1
            return True

    def send_parts(self, parts: Sequence[bytes]) -> None:
        """Send one multipart message; a send timeout becomes TimeoutError."""
        with self._lock:
            sock = self._require_open()
            try:
                # copy=False: pyzmq still copies parts under its copy threshold.
                sock.send_multipart(parts, copy=False)
            except zmq.Again as exc:
                raise TimeoutError(
                    f"send on {self.endpoint} timed out (no peer or HWM reached)"
                ) from exc

    def close(self, linger: float = 2.0) -> None:
        """Close the socket, giving queued messages ``linger`` seconds to leave."""
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=int(linger * 1000))
                self._socket = None

    def _require_open(self) -> zmq.Socket:
        if self._socket is None:
            raise RuntimeError(f"publisher on {self.endpoint} is closed")
        return self._socket

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
