"""The worker process of :class:`~hxn_liveptycho.streams.eiger_processes.EigerProcessReceiver`.

A worker has its own PULL socket connected to the detector's PUSH endpoint
(PUSH deals messages out round-robin over its PULL peers, as a real Eiger does
to several consumers). It parses and decodes each message and applies the
transform (an ROI crop) -- the per-message Python work that caps one process --
and passes the parsed event, pixels as a separate zero-copy part, to the parent
over a DEALER -> ROUTER socket. :func:`pack` and :func:`unpack` are that link's
two ends; a parent's request is a packed tuple (``sync``, ``stop``).

A sync token is answered by a marker once the worker has drained its socket, so
the parent knows which events came before it; a worker whose parent died exits.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from hxn_liveptycho.errors import DecodeError
from hxn_liveptycho.streams.crop import as_window, window_source
from hxn_liveptycho.streams.eiger_messages import ImageEvent, Transform, parse

#: How often a worker (and the parent) looks up from a quiet socket, in ms.
POLL_MS = 50
#: How long a worker drains its socket before answering a sync (a busy stream never empties).
_SYNC_DRAIN_S = 0.1
#: How long a draining worker's socket must stay empty to count as drained.
_QUIET_MS = 5
#: Messages a worker takes from its socket before looking at the parent's requests again.
_BATCH = 32


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker needs, pickled into the spawned process."""

    index: int
    endpoint: str
    parent_endpoint: str
    rcvhwm: int
    worker_queue: int
    curve: dict[int, bytes]
    flavour: str
    channel: str | None
    transform: Transform | None
    name: str


def pack(obj: Any) -> bytes:
    """One message part on the link between a worker and its parent."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(parts: list[zmq.Frame]) -> tuple[Any, ...]:
    """A worker's message as the parent reads it: an image's pixels are put back in its event.

    The pixels arrive as their own part and stay a read-only view of it; a cut
    frame gets back its detector shape and misfit (:func:`~.crop.as_window`).
    """
    message = pickle.loads(parts[0].buffer)
    if message[0] != "image":
        return message
    _, event, dtype, shape, source = message
    event.data = np.frombuffer(parts[1].buffer, dtype=dtype).reshape(shape)
    if source is not None:
        event.data = as_window(event.data, *source)
    return ("event", event)


def identity(index: int) -> bytes:
    """The routing identity of worker ``index`` on the parent's ROUTER socket."""
    return f"w{index}".encode()


class _ParentGoneError(Exception):
    pass


def worker_main(config: WorkerConfig) -> None:
    """A worker process: receive, parse, decode, transform; hand events to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = mp.parent_process()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    up = ctx.socket(zmq.DEALER)
    try:
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, config.rcvhwm)
        for option, value in config.curve.items():
            pull.setsockopt(option, value)
        pull.connect(config.endpoint)
        up.setsockopt(zmq.LINGER, 2000)
        up.setsockopt(zmq.SNDHWM, config.worker_queue)
        up.setsockopt(zmq.IDENTITY, identity(config.index))
        up.connect(config.parent_endpoint)
        _Worker(config, pull, up, parent).run()
    except _ParentGoneError:
        logging.getLogger(__name__).warning("%s: parent process gone; worker exits", config.name)
    finally:
        pull.close(linger=0)
        up.close()
        ctx.term()


class _Worker:
    def __init__(self, config: WorkerConfig, pull: zmq.Socket, up: zmq.Socket, parent: Any) -> None:
        self.config = config
        self.pull = pull
        self.up = up
        self.parent = parent

    def run(self) -> None:
        self._send([pack(("hello",))])
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.up, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(POLL_MS))
            if self.up in ready:
                while self.up.poll(0, zmq.POLLIN):
                    request = pickle.loads(self.up.recv())
                    if request[0] == "sync":
                        self._drain(time.monotonic() + _SYNC_DRAIN_S)
                        self._send([pack(("marker", request[1]))])
                    elif request[0] == "stop":
                        if request[1]:
                            self._drain(time.monotonic() + request[2])
                        self._send([pack(("bye",))])
                        return
            if self.pull in ready:
                self._receive(_BATCH)
            if self.parent is not None and not self.parent.is_alive():
                raise _ParentGoneError

    def _drain(self, deadline: float) -> None:
        """Handle what is queued, until the socket stayed empty for a moment or ``deadline``."""
        while time.monotonic() < deadline:
            if self._receive(_BATCH) == 0 and not self.pull.poll(_QUIET_MS, zmq.POLLIN):
                return

    def _receive(self, limit: int) -> int:
        """Handle up to ``limit`` messages already queued; how many there were."""
        for count in range(limit):
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return count
            self._handle(parts)
        return limit

    def _handle(self, parts: list[zmq.Frame]) -> None:
        config = self.config
        try:
            event = parse(
                parts, flavour=config.flavour, channel=config.channel, transform=config.transform
            )
        except Exception as exc:
            decode_error = isinstance(exc, DecodeError)
            text = str(exc) if decode_error else f"{type(exc).__name__}: {exc}"
            self._send([pack(("malformed", text, decode_error))])
            return
        if isinstance(event, ImageEvent) and event.data is not None:
            source = window_source(event.data)  # a cut frame's detector shape and misfit
            data = np.ascontiguousarray(event.data)
            event.data = None
            self._send(
                [pack(("image", event, data.dtype.str, data.shape, source)), data], copy=False
            )
        else:
            self._send([pack(("event", event))])

    def _send(self, parts: list[Any], copy: bool = True) -> None:
        """Send to the parent, waiting while its queue is full (backpressure), unless it died."""
        while not self.up.poll(POLL_MS * 2, zmq.POLLOUT):
            if self.parent is not None and not self.parent.is_alive():
                raise _ParentGoneError
        self.up.send_multipart(parts, copy=copy)


__all__ = ["POLL_MS", "WorkerConfig", "identity", "pack", "unpack", "worker_main"]
