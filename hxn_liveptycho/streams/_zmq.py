"""ZMQ plumbing shared by the Eiger and PandA streams: a bound publisher and a receiver thread.

The receiver owns one SUB or PULL socket and one thread. The thread polls with a
short timeout so ``stop()`` never hangs, and it survives anything a message or a
callback does: a bad message is a count and one log line, a raising callback is
a count and a logged traceback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import zmq

from hxn_liveptycho.errors import ConfigurationError, DecodeError

# The CurveZMQ keys live in streams/curve.py; the receivers of both detectors find them here too.
from hxn_liveptycho.streams.curve import curve_key as curve_key
from hxn_liveptycho.streams.curve import curve_options as curve_options
from hxn_liveptycho.streams.curve import curve_server_options
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

_POLL_MS = 50


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
    """One bound PUB (as XPUB, to see subscribers) or PUSH socket, safe to share between threads."""

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

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ZmqReceiver:
    """A SUB or PULL socket read by a background thread; subclasses decode one message."""

    counter_names: tuple[str, ...] = ("messages", "malformed", "callback_errors")

    def __init__(
        self,
        endpoint: str,
        *,
        socket_type: Literal["sub", "pull"],
        rcvhwm: int,
        name: str,
        context: zmq.Context | None,
        curve: dict[int, bytes] | None = None,
    ) -> None:
        if socket_type not in ("sub", "pull"):
            raise ConfigurationError(f"socket_type must be 'sub' or 'pull', got {socket_type!r}")
        self.endpoint = endpoint
        self.socket_type = socket_type
        self.name = name
        self.counters = Counters(self.counter_names)
        self._stopping = threading.Event()
        self._drain = True
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        ctx = context if context is not None else zmq.Context.instance()
        sock = ctx.socket(zmq.SUB if socket_type == "sub" else zmq.PULL)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
            for option, value in (curve or {}).items():
                sock.setsockopt(option, value)
            if socket_type == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigurationError(f"{name}: cannot connect to {endpoint!r}: {exc}") from exc
        self._socket: zmq.Socket | None = sock

    # -- lifecycle ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the receiving thread (once)."""
        if self._socket is None or self._stopping.is_set():
            raise RuntimeError(f"{self.name} receiver is stopped and cannot restart")
        if self._thread is not None:
            raise RuntimeError(f"{self.name} receiver already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-receiver", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0, *, drain: bool = True) -> bool:
        """Stop the thread and close the socket; True if the thread ended within ``timeout``.

        With ``drain`` the thread first handles what already sits in the socket
        (for at most half of ``timeout``), so frames that arrived are not lost.
        """
        self._drain = drain
        self._drain_deadline = time.monotonic() + timeout / 2
        self._stopping.set()
        thread = self._thread
        if thread is None:
            self._close_socket()
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.error("%s receiver thread did not stop within %.1f s", self.name, timeout)
            return False
        return True

    def __enter__(self):
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- thread ---------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        try:
            while not self._stopping.is_set():
                if sock.poll(_POLL_MS, zmq.POLLIN):
                    self._receive_available(sock)
            if self._drain:
                self._receive_available(sock, deadline=self._drain_deadline)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                logger.exception("%s receiver socket failed; the thread ends", self.name)
        finally:
            self._close_socket()

    def _receive_available(self, sock: zmq.Socket, deadline: float | None = None) -> None:
        """Handle every message already queued, without blocking."""
        while deadline is None or time.monotonic() < deadline:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.counters.add("messages")
            self._handle_safely(parts)
            if deadline is None and self._stopping.is_set():
                return

    def _handle_safely(
        self, parts: list[zmq.Frame], handler: Callable[[list[zmq.Frame]], None] | None = None
    ) -> None:
        try:
            (handler or self.handle_message)(parts)
        except DecodeError as exc:
            self.counters.add("malformed")
            logger.warning("%s: malformed message dropped: %s", self.name, exc)
        except Exception:
            self.counters.add("malformed")
            logger.exception("%s: message could not be handled (dropped)", self.name)

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    # -- for subclasses -------------------------------------------------------------

    def handle_message(self, parts: list[zmq.Frame]) -> None:
        raise NotImplementedError

    def call(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run a user callback; an exception is counted and logged, never propagated."""
        try:
            callback(*args)
        except Exception:
            self.counters.add("callback_errors")
            logger.exception(
                "%s: callback %s raised", self.name, getattr(callback, "__name__", callback)
            )


def names(*groups: Iterable[str]) -> tuple[str, ...]:
    """Concatenate counter-name groups without duplicates, keeping order."""
    return tuple(dict.fromkeys(n for group in groups for n in group))
