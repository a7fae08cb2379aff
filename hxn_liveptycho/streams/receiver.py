"""What every stream receiver shares: the socket thread, the guards and the start/stop face.

A receiver survives anything a message or a callback does: a message that
cannot be handled is dropped, counted ("malformed") and logged once; a callback
that raises is counted ("callback_errors") and logged with its traceback. The
threaded Eiger and PandA receivers read one SUB or PULL socket on one thread
(:class:`SocketReceiver`); the multi-process Eiger receiver runs its own loop
behind the same guards and the same face (:class:`StreamReceiver`).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, Literal, Self

import zmq

from hxn_liveptycho.errors import ConfigurationError, DecodeError
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

_POLL_MS = 50

#: The counters every receiver keeps.
RECEIVER_COUNTERS = ("messages", "malformed", "callback_errors")


def names(*groups: Iterable[str]) -> tuple[str, ...]:
    """Concatenate counter-name groups without duplicates, keeping order."""
    return tuple(dict.fromkeys(n for group in groups for n in group))


def handle_guarded(name: str, counters: Counters, handler: Callable[..., None], *args: Any) -> None:
    """Handle one message; one that cannot be handled is dropped, counted and logged."""
    try:
        handler(*args)
    except DecodeError as exc:
        counters.add("malformed")
        logger.warning("%s: malformed message dropped: %s", name, exc)
    except Exception:
        counters.add("malformed")
        logger.exception("%s: message could not be handled (dropped)", name)


def run_callback(name: str, counters: Counters, callback: Callable[..., Any], *args: Any) -> None:
    """Run a user callback; an exception is counted and logged, never propagated."""
    try:
        callback(*args)
    except Exception:
        counters.add("callback_errors")
        logger.exception("%s: callback %s raised", name, getattr(callback, "__name__", callback))


class StreamReceiver(ABC):
    """The face every receiver shows: counters, start once, stop (draining), a context manager.

    User callbacks go through :meth:`_call`, so one that raises is counted,
    never propagated into the receiving thread.
    """

    counter_names: tuple[str, ...] = RECEIVER_COUNTERS

    def __init__(self, endpoint: str, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.counters = Counters(self.counter_names)

    @property
    @abstractmethod
    def running(self) -> bool: ...

    @property
    @abstractmethod
    def started(self) -> bool:
        """True once :meth:`start` ran, whether or not the receiver still runs."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self, timeout: float = 5.0, *, drain: bool = True) -> bool: ...

    def __enter__(self) -> Self:
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        run_callback(self.name, self.counters, callback, *args)


class SocketReceiver(StreamReceiver):
    """A receiver of one SUB or PULL socket, read by one background thread.

    The thread polls with a short timeout so ``stop()`` never hangs. Subclasses
    implement :meth:`_handle`: one message, on that thread, in wire order, run
    guarded (:func:`handle_guarded`): a
    :class:`~hxn_liveptycho.errors.DecodeError` drops the message as malformed.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        socket_type: Literal["sub", "pull"],
        rcvhwm: int,
        name: str,
        context: zmq.Context | None,
        curve: dict[int, bytes],
    ) -> None:
        if socket_type not in ("sub", "pull"):
            raise ConfigurationError(f"socket_type must be 'sub' or 'pull', got {socket_type!r}")
        super().__init__(endpoint, name)
        self.socket_type = socket_type
        self._stopping = threading.Event()
        self._drain = True
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        ctx = context if context is not None else zmq.Context.instance()
        sock = ctx.socket(zmq.SUB if socket_type == "sub" else zmq.PULL)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
            for option, value in curve.items():
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

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start receiving on a background thread (once)."""
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

    # -- thread ---------------------------------------------------------------------

    @abstractmethod
    def _handle(self, parts: list[zmq.Frame]) -> None: ...

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
            handle_guarded(self.name, self.counters, self._handle, parts)
            if deadline is None and self._stopping.is_set():
                return

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


__all__ = [
    "RECEIVER_COUNTERS",
    "SocketReceiver",
    "StreamReceiver",
    "handle_guarded",
    "names",
    "run_callback",
]
