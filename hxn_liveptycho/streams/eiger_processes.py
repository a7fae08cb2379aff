"""An Eiger receiver spread over worker processes, for more frames/s than one GIL allows.

Each worker process has its own PULL socket connected to the detector's PUSH
endpoint; a PUSH socket deals messages out round-robin over its connected PULL
peers, as a real Eiger does to several consumers. A worker parses and decodes
each message and applies the transform (an ROI crop) -- the per-message Python
work that caps one process -- and passes the parsed event, pixels as a separate
zero-copy part, to the parent over a DEALER -> ROUTER socket on ``ipc://``.

The parent owns the series bookkeeping (the same
:class:`~hxn_liveptycho.streams.eiger_series.EigerSeriesBook` as the threaded
receiver) and runs the callbacks on one thread. Messages of different workers
arrive interleaved, so the parent restores the order that matters:

- Series headers and ends are barriers. When one arrives from a worker, the
  parent asks every other worker to hand over everything it has already received
  (a sync token, answered by a marker after the worker drained its socket) and
  applies what those workers sent before their markers first; events after the
  markers wait until the header or end was applied. Frames of a series are thus
  delivered before its end, and frames of an old series are not mistaken for
  stale because a newer header overtook them.
- Frames between two barriers may arrive slightly out of order. Gaps are counted
  with a reorder window: a missing frame counts once the newest frame is
  ``reorder_window`` ahead of it, or at the series' end.

Bounded everywhere: each worker's socket holds at most ``rcvhwm`` messages and
its link to the parent ``worker_queue``, so a slow consumer blocks the workers,
which stop reading, which makes the detector's PUSH wait -- nothing is dropped.
A worker that dies is counted (``worker_exits``) and logged; a barrier not
answered within ``barrier_timeout`` is counted (``barrier_timeouts``) and passed.

SUB sockets cannot share a stream: every subscriber gets every message. This
receiver therefore takes ``socket_type="pull"`` only; behind a PUB proxy use
:class:`~hxn_liveptycho.streams.eiger.EigerReceiver` (one process).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import pickle
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zmq

from hxn_liveptycho.errors import ConfigurationError, DecodeError
from hxn_liveptycho.streams.crop import as_window, window_source
from hxn_liveptycho.streams.curve import CurveKeys, client_options
from hxn_liveptycho.streams.eiger import EIGER_COUNTERS, check_receiver_options
from hxn_liveptycho.streams.eiger_messages import (
    DEFAULT_CHANNEL,
    EigerEvent,
    EigerFrame,
    ImageEvent,
    SeriesEndEvent,
    SeriesStartEvent,
    Transform,
    parse,
)
from hxn_liveptycho.streams.eiger_series import EigerSeriesBook
from hxn_liveptycho.streams.receiver import StreamReceiver, handle_guarded, names
from hxn_liveptycho.util.children import start_spawned

logger = logging.getLogger(__name__)

_POLL_MS = 50
#: How long a worker drains its socket before answering a sync (a busy stream never empties).
_SYNC_DRAIN_S = 0.1
#: How long a draining worker's socket must stay empty to count as drained.
_QUIET_MS = 5
#: Messages a worker takes from its socket before looking at the parent's requests again.
_BATCH = 32


@dataclass(frozen=True, slots=True)
class _WorkerConfig:
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


# -- worker process ---------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class _ParentGoneError(Exception):
    pass


def worker_main(config: _WorkerConfig) -> None:
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
        up.setsockopt(zmq.IDENTITY, _identity(config.index))
        up.connect(config.parent_endpoint)
        _Worker(config, pull, up, parent).run()
    except _ParentGoneError:
        logging.getLogger(__name__).warning("%s: parent process gone; worker exits", config.name)
    finally:
        pull.close(linger=0)
        up.close()
        ctx.term()


class _Worker:
    def __init__(
        self, config: _WorkerConfig, pull: zmq.Socket, up: zmq.Socket, parent: Any
    ) -> None:
        self.config = config
        self.pull = pull
        self.up = up
        self.parent = parent

    def run(self) -> None:
        self._send([_dumps(("hello",))])
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.up, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(_POLL_MS))
            if self.up in ready:
                while self.up.poll(0, zmq.POLLIN):
                    request = pickle.loads(self.up.recv())
                    if request[0] == "sync":
                        self._drain(time.monotonic() + _SYNC_DRAIN_S)
                        self._send([_dumps(("marker", request[1]))])
                    elif request[0] == "stop":
                        if request[1]:
                            self._drain(time.monotonic() + request[2])
                        self._send([_dumps(("bye",))])
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
            self._send([_dumps(("malformed", text, decode_error))])
            return
        if isinstance(event, ImageEvent) and event.data is not None:
            source = window_source(event.data)  # a cut frame's detector shape and misfit
            data = np.ascontiguousarray(event.data)
            event.data = None
            self._send(
                [_dumps(("image", event, data.dtype.str, data.shape, source)), data], copy=False
            )
        else:
            self._send([_dumps(("event", event))])

    def _send(self, parts: list[Any], copy: bool = True) -> None:
        """Send to the parent, waiting while its queue is full (backpressure), unless it died."""
        while not self.up.poll(_POLL_MS * 2, zmq.POLLOUT):
            if self.parent is not None and not self.parent.is_alive():
                raise _ParentGoneError
        self.up.send_multipart(parts, copy=copy)


def _identity(index: int) -> bytes:
    return f"w{index}".encode()


# -- parent ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _WorkerHandle:
    index: int
    process: Any
    pending: deque[tuple[Any, ...]] = field(default_factory=deque)
    ready: bool = False
    #: When the image at the head of ``pending`` began waiting for its series header.
    held_since: float | None = None
    said_bye: bool = False
    gone: bool = False


@dataclass(slots=True)
class _Barrier:
    token: int
    controls: list[EigerEvent]
    waiting: set[int]
    deadline: float
    #: When the last marker came in.
    complete_since: float | None = None


class EigerProcessReceiver(StreamReceiver):
    """Receives an Eiger PUSH stream with ``processes`` worker processes; same callbacks.

    Options as :class:`~hxn_liveptycho.streams.eiger.EigerReceiver`, plus:
    ``transform`` runs in the workers, so it must be picklable (a module-level
    function or an object such as a crop spec, not a lambda); ``worker_queue``
    bounds the parsed events in flight per worker; ``reorder_window`` (default
    ``1024 * processes``) is how far frames may overtake each other before a
    missing one counts as a gap. ``header_wait``, ``end_wait``/``end_quiet`` and
    ``barrier_timeout`` (seconds) bound how long ordering may hold events (the
    module doc says when). Frames are delivered as read-only arrays over the
    received message (copy to modify). Callbacks run on one parent thread.
    """

    counter_names = names(EIGER_COUNTERS, ("barriers", "barrier_timeouts", "worker_exits"))

    def __init__(
        self,
        endpoint: str,
        *,
        on_series_start: Callable[[int, dict], None],
        on_frame: Callable[[EigerFrame], None],
        on_series_end: Callable[[int], None],
        processes: int,
        socket_type: Literal["sub", "pull"] = "pull",
        rcvhwm: int = 0,
        name: str = "eiger",
        curve: CurveKeys | None = None,
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
        flavour: Literal["auto", "v1", "v2"] = "auto",
        channel: str | None = DEFAULT_CHANNEL,
        transform: Transform | None = None,
        worker_queue: int = 8,
        reorder_window: int | None = None,
        barrier_timeout: float = 5.0,
        header_wait: float = 0.2,
        end_wait: float = 0.5,
        end_quiet: float = 0.05,
        start_timeout: float = 60.0,
    ) -> None:
        if processes < 1:
            raise ConfigurationError(f"processes must be >= 1, got {processes}")
        if socket_type != "pull":
            raise ConfigurationError(
                f"{name}: a multi-process receiver needs socket_type='pull' (a detector's PUSH "
                f"deals messages out among PULL peers); {socket_type!r} would give every worker "
                "every message -- use EigerReceiver (processes=0) behind a PUB proxy"
            )
        if worker_queue < 1:
            raise ConfigurationError(f"worker_queue must be >= 1, got {worker_queue}")
        check_receiver_options(flavour, channel)
        if transform is not None:
            try:
                pickle.dumps(transform)
            except Exception as exc:
                raise ConfigurationError(
                    f"{name}: the transform runs in worker processes and must be picklable "
                    f"(a module-level function or object, not a lambda): {exc}"
                ) from exc
        super().__init__(endpoint, name)
        self.processes = processes
        self.flavour = flavour
        self.channel = channel
        self.transform = transform
        self.barrier_timeout = barrier_timeout
        self.header_wait = header_wait
        self.end_wait = end_wait
        self.end_quiet = end_quiet
        self._flushing = False
        self._next_liveness_check = 0.0
        self.start_timeout = start_timeout
        self._book = EigerSeriesBook(
            name,
            self.counters,
            on_series_start=on_series_start,
            on_frame=on_frame,
            on_series_end=on_series_end,
            reorder_window=1024 * processes if reorder_window is None else reorder_window,
        )
        self._curve = client_options(curve, curve_server_key, curve_public_key, curve_secret_key)
        self._rcvhwm = rcvhwm
        self._worker_queue = worker_queue
        self._workers: list[_WorkerHandle] = []
        self._by_identity: dict[bytes, _WorkerHandle] = {}
        self._barrier: _Barrier | None = None
        self._tokens = itertools.count(1)
        self._stopping = threading.Event()
        self._drain = True
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._started = False
        self._ctx = zmq.Context()
        self._ipc_dir: str | None = None
        self._socket: zmq.Socket | None = self._ctx.socket(zmq.ROUTER)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._socket.setsockopt(zmq.RCVHWM, worker_queue * processes)
            if zmq.has("ipc"):
                self._ipc_dir = tempfile.mkdtemp(prefix="liveptycho-eiger-")
                # Removed by stop(); also when a receiver never stopped is collected.
                weakref.finalize(self, shutil.rmtree, self._ipc_dir, True)
                self._socket.bind(f"ipc://{self._ipc_dir}/events")
            else:
                self._socket.bind("tcp://127.0.0.1:*")
            self._parent_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._close()
            raise ConfigurationError(f"{name}: cannot bind the workers' socket: {exc}") from exc

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers started (for monitoring)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def start(self) -> None:
        """Spawn the workers and wait (up to ``start_timeout``) until each is connected."""
        if self._started:
            raise RuntimeError(f"{self.name} receiver already started or stopped")
        self._started = True
        spawn = mp.get_context("spawn")
        for index in range(self.processes):
            config = _WorkerConfig(
                index=index,
                endpoint=self.endpoint,
                parent_endpoint=self._parent_endpoint,
                rcvhwm=self._rcvhwm,
                worker_queue=self._worker_queue,
                curve=self._curve,
                flavour=self.flavour,
                channel=self.channel,
                transform=self.transform,
                name=f"{self.name}-{index}",
            )
            process = spawn.Process(
                target=worker_main, args=(config,), name=f"{self.name}-worker-{index}", daemon=True
            )
            start_spawned(process)
            handle = _WorkerHandle(index, process)
            self._workers.append(handle)
            self._by_identity[_identity(index)] = handle
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-receiver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not all(w.ready or w.gone for w in self._workers):
            if time.monotonic() > deadline or not self.running:
                logger.error(
                    "%s: workers not connected within %.0f s", self.name, self.start_timeout
                )
                return
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0, *, drain: bool = True) -> bool:
        """Stop the workers and the thread; True if all ended within ``timeout``.

        With ``drain`` the workers first hand over what already sits in their
        sockets (for at most half of ``timeout``); what the parent holds is applied.
        """
        began = time.monotonic()
        self._drain = drain
        self._stop_deadline = began + timeout / 2
        self._stopping.set()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("%s receiver thread did not stop within %.1f s", self.name, timeout)
                stopped = False
        else:
            self._close()
        for worker in self._workers:
            worker.process.join(max(0.1, timeout - (time.monotonic() - began)))
            if worker.process.is_alive():
                logger.error("%s: worker %d did not exit; terminating it", self.name, worker.index)
                worker.process.kill()
                worker.process.join(5)
                stopped = False
        return stopped

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._ctx.term()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    # -- the parent's thread ------------------------------------------------------------

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        stop_sent = False
        try:
            while True:
                if self._stopping.is_set():
                    if not stop_sent:
                        self._request_stop(sock)
                        stop_sent = True
                    if all(w.said_bye or w.gone for w in self._workers):
                        break
                    if time.monotonic() > self._stop_deadline + 0.5:
                        logger.warning("%s: workers did not all say goodbye", self.name)
                        break
                if sock.poll(_POLL_MS, zmq.POLLIN):
                    self._receive_available(sock)
                self._check_workers()
                self._check_barrier()
                self._pump(sock)
            for worker in self._workers:  # whatever is left: no more markers can come
                worker.gone = True
            if self._barrier is not None:
                self._barrier.waiting.clear()
            self._flushing = True
            self._pump(sock)
        except Exception:
            logger.exception("%s: receiver thread failed", self.name)
        finally:
            self._close()

    def _request_stop(self, sock: zmq.Socket) -> None:
        drain_s = max(0.0, self._stop_deadline - time.monotonic())
        for worker in self._workers:
            if worker.process.is_alive():
                self._send(sock, worker, ("stop", self._drain, drain_s))

    def _send(self, sock: zmq.Socket, worker: _WorkerHandle, request: tuple[Any, ...]) -> None:
        try:
            sock.send_multipart([_identity(worker.index), _dumps(request)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that worker's link is gone
            self._lost(worker, f"cannot reach it: {exc}")

    def _receive_available(self, sock: zmq.Socket) -> None:
        for _ in range(256):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            worker = self._by_identity.get(parts[0].bytes)
            if worker is None:
                continue
            message = pickle.loads(parts[1].buffer)
            kind = message[0]
            if kind == "hello":
                worker.ready = True
            elif kind == "bye":  # after its last marker: it needs no unblocking
                worker.said_bye = True
            elif kind == "image":
                _, event, dtype, shape, source = message
                event.data = np.frombuffer(parts[2].buffer, dtype=dtype).reshape(shape)
                if source is not None:
                    event.data = as_window(event.data, *source)
                worker.pending.append(("event", event))
            else:
                worker.pending.append(message)

    def _check_workers(self) -> None:
        now = time.monotonic()
        if now < self._next_liveness_check:
            return
        self._next_liveness_check = now + _POLL_MS / 1000
        for worker in self._workers:
            if not (worker.gone or worker.said_bye) and not worker.process.is_alive():
                self._lost(worker, f"it exited with code {worker.process.exitcode}")

    def _lost(self, worker: _WorkerHandle, why: str) -> None:
        if worker.gone:
            return
        worker.gone = True
        self.counters.add("worker_exits")
        logger.error("%s: worker %d is gone (%s)", self.name, worker.index, why)
        self._unblock(worker)

    def _unblock(self, worker: _WorkerHandle) -> None:
        if self._barrier is not None:
            self._barrier.waiting.discard(worker.index)

    def _check_barrier(self) -> None:
        barrier = self._barrier
        if barrier is not None and barrier.waiting and time.monotonic() > barrier.deadline:
            self.counters.add("barrier_timeouts")
            logger.warning(
                "%s: workers %s did not answer a series barrier within %.1f s; going on",
                self.name,
                sorted(barrier.waiting),
                self.barrier_timeout,
            )
            barrier.waiting.clear()

    def _pump(self, sock: zmq.Socket) -> None:
        """Apply pending events in an order consistent with the wire (see the module doc)."""
        progressed = True
        while progressed:
            progressed = False
            barrier = self._barrier
            if barrier is not None and not barrier.waiting and self._may_close(barrier):
                self._barrier = None
                for event in _wire_order(barrier.controls):
                    self._apply(("event", event))
                progressed = True
                continue
            for worker in self._workers:
                while worker.pending:
                    item = worker.pending[0]
                    if barrier is None:
                        if self._awaits_header(worker, item):
                            break
                    elif worker.index not in barrier.waiting:
                        if not self._precedes(item, barrier):
                            break
                    elif self._follows(item, barrier):
                        barrier.waiting.discard(worker.index)  # it is past the header already
                        break
                    worker.pending.popleft()
                    progressed = True
                    if barrier is not None and barrier.complete_since is not None:
                        barrier.complete_since = time.monotonic()  # an image it waited for
                    if item[0] == "marker":
                        if barrier is not None and item[1] == barrier.token:
                            barrier.waiting.discard(worker.index)
                        continue
                    event = item[1] if item[0] == "event" else None  # type: ignore[assignment]
                    if not isinstance(event, SeriesStartEvent | SeriesEndEvent):
                        self._apply(item)
                        continue
                    self.counters.add("messages")
                    if barrier is None:
                        barrier = self._open_barrier(sock, worker, event)
                    else:
                        barrier.controls.append(event)
                        barrier.waiting.discard(worker.index)
                    break

    def _ending(self, barrier: _Barrier) -> list[tuple[int, str | None]]:
        """The series this barrier ends (an end without a header of the same series)."""
        headers = {
            (c.series, c.unique_id) for c in barrier.controls if isinstance(c, SeriesStartEvent)
        }
        return [
            (c.series, c.unique_id)
            for c in barrier.controls
            if isinstance(c, SeriesEndEvent) and (c.series, c.unique_id) not in headers
        ]

    def _precedes(self, item: tuple[Any, ...], barrier: _Barrier) -> bool:
        """An image of a series this barrier ends: sent before that end, whatever the marker."""
        event = item[1] if item[0] == "event" else None
        return isinstance(event, ImageEvent) and (event.series, event.unique_id) in self._ending(
            barrier
        )

    def _may_close(self, barrier: _Barrier) -> bool:
        """Every marker is in; an end still waits (up to ``end_wait``) for missing frames.

        A frame still in flight to a worker when it answered the sync would
        otherwise arrive after its series' end: an end waits until no image of
        its series came for ``end_quiet`` and none is missing (holes below the
        newest frame, or fewer frames than the header announced).
        """
        if self._flushing:
            return True
        now = time.monotonic()
        if barrier.complete_since is None:
            barrier.complete_since = now
        if now - barrier.complete_since >= self.end_wait:
            return True
        ending = self._ending(barrier)
        if not ending:
            return True
        if now - barrier.complete_since < self.end_quiet:
            return False
        return not any(self._book.missing(*key) for key in ending)

    def _awaits_header(self, worker: _WorkerHandle, item: tuple[Any, ...]) -> bool:
        """Hold a worker's image of a series not yet announced: its header may be overtaking.

        Held for at most ``header_wait``; then it goes through as the threaded
        receiver takes a frame without a header (``unknown_series``).
        """
        event = item[1] if item[0] == "event" else None
        if (
            self._flushing
            or self.processes == 1
            or not isinstance(event, ImageEvent)
            or self._book.knows(event.series, event.unique_id)
            or self._book.is_stale(event.series, event.unique_id)
        ):
            worker.held_since = None
            return False
        now = time.monotonic()
        if worker.held_since is None:
            worker.held_since = now
        if now - worker.held_since < self.header_wait:
            return True
        worker.held_since = None
        return False

    def _follows(self, item: tuple[Any, ...], barrier: _Barrier) -> bool:
        """An image sent after the barrier's header or end, whatever the worker's marker says.

        That is an image of the series whose header the barrier holds, or of a
        series not yet known at all (a detector sends no image of a new series
        before the old one's end): everything after it in that worker's queue
        follows too.
        """
        event = item[1] if item[0] == "event" else None
        if not isinstance(event, ImageEvent):
            return False
        if any(
            isinstance(control, SeriesStartEvent)
            and control.series == event.series
            and control.unique_id == event.unique_id
            for control in barrier.controls
        ):
            return True
        return not (
            self._book.knows(event.series, event.unique_id)
            or self._book.is_stale(event.series, event.unique_id)
        )

    def _open_barrier(self, sock: zmq.Socket, worker: _WorkerHandle, event: EigerEvent) -> _Barrier:
        # A worker not yet connected has forwarded nothing: nothing of it to wait for.
        others = {
            w.index
            for w in self._workers
            if w is not worker and w.ready and not (w.gone or w.said_bye)
        }
        barrier = _Barrier(
            next(self._tokens), [event], others, time.monotonic() + self.barrier_timeout
        )
        self._barrier = barrier
        self.counters.add("barriers")
        for other in self._workers:
            if other.index in others:
                self._send(sock, other, ("sync", barrier.token))
        return barrier

    def _apply(self, item: tuple[Any, ...]) -> None:
        """One parsed message through the book; malformed ones are counted and logged."""
        if item[0] != "event" or not isinstance(item[1], SeriesStartEvent | SeriesEndEvent):
            self.counters.add("messages")
        handle_guarded(self.name, self.counters, self._apply_item, item)

    def _apply_item(self, item: tuple[Any, ...]) -> None:
        if item[0] == "malformed":  # a worker could not parse it: dropped as if parsed here
            raise DecodeError(item[1]) if item[2] else RuntimeError(item[1])
        self._book.apply(item[1])


def _wire_order(controls: list[EigerEvent]) -> list[EigerEvent]:
    """Headers and ends met at one barrier, in the order a detector sends them.

    An end of a series without a header here came first (it closed the previous
    series); a header precedes the end of its own series.
    """

    def key(event: EigerEvent) -> tuple[int, str | None]:
        return (event.series, event.unique_id)

    ends = [e for e in controls if isinstance(e, SeriesEndEvent)]
    headers = [e for e in controls if isinstance(e, SeriesStartEvent)]
    header_keys = {key(h) for h in headers}
    ordered: list[EigerEvent] = [e for e in ends if key(e) not in header_keys]
    placed: set[int] = set()
    for header in headers:
        ordered.append(header)
        for end in ends:
            if key(end) == key(header) and id(end) not in placed:
                placed.add(id(end))
                ordered.append(end)
    return ordered


__all__ = ["EigerProcessReceiver", "worker_main"]
