"""An Eiger receiver spread over worker processes, for more frames/s than one GIL allows.

Each worker process (:mod:`~hxn_liveptycho.streams.eiger_worker`) has its own
PULL socket connected to the detector's PUSH endpoint, parses, decodes and
transforms each message, and passes the parsed event to the parent over a
DEALER -> ROUTER socket on ``ipc://``.

The parent owns the series bookkeeping (the same
:class:`~hxn_liveptycho.streams.eiger_series.EigerSeriesBook` as the threaded
receiver) and runs the callbacks on one thread. Messages of different workers
arrive interleaved; the parent restores the order that matters
(:mod:`~hxn_liveptycho.streams.eiger_ordering`): series headers and ends are
barriers every worker answers, and gaps are counted with a reorder window.

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

import logging
import multiprocessing as mp
import pickle
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

import zmq

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams.curve import CurveKeys, client_options
from hxn_liveptycho.streams.eiger import EIGER_COUNTERS, check_receiver_options
from hxn_liveptycho.streams.eiger_messages import DEFAULT_CHANNEL, EigerFrame, Transform
from hxn_liveptycho.streams.eiger_ordering import EventOrder, WorkerHandle
from hxn_liveptycho.streams.eiger_series import EigerSeriesBook
from hxn_liveptycho.streams.eiger_worker import (
    POLL_MS,
    WorkerConfig,
    identity,
    pack,
    unpack,
    worker_main,
)
from hxn_liveptycho.streams.receiver import StreamReceiver, names
from hxn_liveptycho.util.children import start_spawned

logger = logging.getLogger(__name__)


class EigerProcessReceiver(StreamReceiver):
    """Receives an Eiger PUSH stream with ``processes`` worker processes; same callbacks.

    Options as :class:`~hxn_liveptycho.streams.eiger.EigerReceiver`, plus:
    ``transform`` runs in the workers, so it must be picklable (a module-level
    function or an object such as a crop spec, not a lambda); ``worker_queue``
    bounds the parsed events in flight per worker; ``reorder_window`` (default
    ``1024 * processes``) is how far frames may overtake each other before a
    missing one counts as a gap. ``header_wait``, ``end_wait``/``end_quiet`` and
    ``barrier_timeout`` (seconds) bound how long ordering may hold events
    (:mod:`~hxn_liveptycho.streams.eiger_ordering` says when). Frames are
    delivered as read-only arrays over the received message (copy to modify).
    Callbacks run on one parent thread.
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
        self._next_liveness_check = 0.0
        self.start_timeout = start_timeout
        self._curve = client_options(curve)
        self._rcvhwm = rcvhwm
        self._worker_queue = worker_queue
        self._workers: list[WorkerHandle] = []
        self._by_identity: dict[bytes, WorkerHandle] = {}
        book = EigerSeriesBook(
            name,
            self.counters,
            on_series_start=on_series_start,
            on_frame=on_frame,
            on_series_end=on_series_end,
            reorder_window=1024 * processes if reorder_window is None else reorder_window,
        )
        self._order = EventOrder(
            name,
            self.counters,
            book,
            self._workers,
            self._send,
            barrier_timeout=barrier_timeout,
            header_wait=header_wait,
            end_wait=end_wait,
            end_quiet=end_quiet,
        )
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
            config = WorkerConfig(
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
            handle = WorkerHandle(index, process)
            self._workers.append(handle)
            self._by_identity[identity(index)] = handle
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
                        self._request_stop()
                        stop_sent = True
                    if all(w.said_bye or w.gone for w in self._workers):
                        break
                    if time.monotonic() > self._stop_deadline + 0.5:
                        logger.warning("%s: workers did not all say goodbye", self.name)
                        break
                if sock.poll(POLL_MS, zmq.POLLIN):
                    self._receive_available(sock)
                self._check_workers()
                self._order.check_barrier()
                self._order.pump()
            self._order.flush()  # whatever is left: no more markers can come
        except Exception:
            logger.exception("%s: receiver thread failed", self.name)
        finally:
            self._close()

    def _request_stop(self) -> None:
        drain_s = max(0.0, self._stop_deadline - time.monotonic())
        for worker in self._workers:
            if worker.process.is_alive():
                self._send(worker, ("stop", self._drain, drain_s))

    def _send(self, worker: WorkerHandle, request: tuple[Any, ...]) -> None:
        """One request to one worker, from the receiver thread (which owns the socket)."""
        sock = self._socket
        assert sock is not None
        try:
            sock.send_multipart([identity(worker.index), pack(request)], zmq.NOBLOCK)
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
            message = unpack(parts[1:])
            kind = message[0]
            if kind == "hello":
                worker.ready = True
            elif kind == "bye":  # after its last marker: it needs no unblocking
                worker.said_bye = True
            else:
                worker.pending.append(message)

    def _check_workers(self) -> None:
        now = time.monotonic()
        if now < self._next_liveness_check:
            return
        self._next_liveness_check = now + POLL_MS / 1000
        for worker in self._workers:
            if not (worker.gone or worker.said_bye) and not worker.process.is_alive():
                self._lost(worker, f"it exited with code {worker.process.exitcode}")

    def _lost(self, worker: WorkerHandle, why: str) -> None:
        if worker.gone:
            return
        worker.gone = True
        self.counters.add("worker_exits")
        logger.error("%s: worker %d is gone (%s)", self.name, worker.index, why)
        self._order.release(worker)


__all__ = ["EigerProcessReceiver"]
