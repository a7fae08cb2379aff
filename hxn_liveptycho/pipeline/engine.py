"""Engine: routes documents and detector streams to per-run sessions, off the RunEngine's thread.

Documents (from the callback or, later, a network subscriber) and stream
events (from the Eiger and PandA receivers) share one ordered queue, so a
detector series armed after a run's ``start`` is always seen after that
``start``: the series is bound to the newest run still taking data. The
dispatcher thread does bookkeeping only; each run's heavy work happens in
its own :class:`~hxn_liveptycho.pipeline.session.RunSession` thread, and every run's
solver iterates in the engine's solver process
(:class:`~hxn_liveptycho.recon.worker.SolverWorker`), started with the engine
so that its kernels are compiled before the first scan.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hxn_liveptycho.config.nn_params import NNParams
from hxn_liveptycho.config.overrides import deep_merge
from hxn_liveptycho.config.scan import RoiConfig
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.nn.branch import worker_key
from hxn_liveptycho.nn.process import WorkerPool
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.pipeline.inputs import (
    Document,
    Flush,
    Frame,
    Input,
    Receiver,
    Resume,
    Samples,
    SeriesEnd,
    SeriesStart,
    Stop,
    Stream,
)
from hxn_liveptycho.pipeline.series import SeriesBook, SeriesStore
from hxn_liveptycho.pipeline.session import SUPERSEDED, RunSession, SinkFactory
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.recon.worker import SolverWorker, WarmUp
from hxn_liveptycho.store.checkpoint import Checkpoint, CheckpointStore
from hxn_liveptycho.store.diffraction import Diffraction
from hxn_liveptycho.streams import CurveKeys, EigerFrame, EigerReceiver, PandaReceiver
from hxn_liveptycho.streams.eiger_processes import EigerProcessReceiver
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

#: How many finished sessions stay visible in status().
_HISTORY = 32
#: How many runs not reconstructed at their start stay visible in status()["skipped"].
MAX_SKIPPED_KEPT = 32


def warm_up_for(settings: Settings) -> WarmUp | None:
    """What the solver process compiles at start: the window and solver of the overrides.

    Settings that do not form valid parameters are left to the run that uses them
    (it reports them); the process then warms up with the defaults.
    """
    overrides = settings.overrides
    try:
        params = IterativeParams(**dict(overrides.get("recon") or {}))
        n = RoiConfig(**dict(overrides.get("roi") or {})).size
    except Exception:
        params, n = IterativeParams(), RoiConfig().size
    return WarmUp(n=n, params=params)


def run_selection(start: Mapping[str, Any], settings: Settings) -> str | None:
    """Why a run is *not* reconstructed, or None when it is (the metadata flag wins)."""
    flag = start.get(settings.metadata_flag)
    if flag is not None:
        return None if flag else f"start[{settings.metadata_flag!r}] is false"
    plan_name = start.get("plan_name")
    if plan_name in settings.plan_names:
        return None
    return (
        f"plan {plan_name!r} is not in plan_names {list(settings.plan_names)} "
        f"and start[{settings.metadata_flag!r}] is not set"
    )


class Engine:
    """Owns the receivers, the dispatcher thread and the sessions of every run."""

    def __init__(
        self,
        settings: Settings,
        *,
        sink_factory: SinkFactory,
        overrides: Callable[[], Mapping[str, Any]] = dict,
        series_store: SeriesStore | None = None,
    ) -> None:
        self.settings = settings
        self._sink_factory = sink_factory
        #: Runs that share a series key (ptycho-tomography): their stack and probes.
        self.series = SeriesBook(settings, series_store)
        self._overrides = overrides
        self.counters = Counters(
            [
                "documents",
                "runs_started",
                "runs_skipped",
                "runs_superseded",
                "runs_resumed",
                "duplicate_starts",
                "late_stops",
                "frames_routed",
                "orphan_frames",
                "orphan_samples",
                "backpressure_waits",
            ]
        )
        self._queue: queue.SimpleQueue[Input] = queue.SimpleQueue()
        self._in_flight = threading.BoundedSemaphore(settings.max_frames_in_flight)
        self._sessions: OrderedDict[str, RunSession] = OrderedDict()
        self._lock = threading.Lock()
        self._series_owner: dict[Stream, RunSession | None] = {"eiger": None, "panda": None}
        self._descriptor_runs: dict[str, str] = {}
        #: Runs not reconstructed at their start (not chosen, or no uid), newest last: a
        #: scientist asking "why was my scan not reconstructed" finds the reason here.
        self._skipped: deque[dict[str, Any]] = deque(maxlen=MAX_SKIPPED_KEPT)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="liveptycho-engine", daemon=True
        )
        self._receivers: list[Receiver] = []
        self._closed = False
        #: Asked about each run the settings choose, after its start document: why this
        #: engine leaves it to another (None: it is reconstructed here). Serve workers
        #: sharing one document stream set it to their claim in Redis (control/workers.py).
        self.admit: Callable[[Mapping[str, Any]], str | None] | None = None
        self.solver_worker = SolverWorker(
            backend=settings.array_backend,
            placement=settings.gpu_placement,
            warm=warm_up_for(settings),
            ranks=settings.ranks,
        )
        #: NN workers kept warm between runs (one is started with the engine when the
        #: overrides ask for the NN branch, so the first run's network is loaded already).
        self.nn_pool = WorkerPool()
        if str((settings.overrides or {}).get("mode", "iterative")) != "iterative":
            threading.Thread(
                target=self._prestart_nn, name="liveptycho-nn-prestart", daemon=True
            ).start()
        self._dispatcher.start()
        try:
            self._start_receivers()
        except Exception:
            self.close()
            raise

    def _prestart_nn(self) -> None:
        try:
            placement = self.solver_worker.info().placement
            nn = dict(self.settings.overrides.get("nn") or {})
            model = ModelRegistry(self.settings.model_dir).get(NNParams(**nn).model)
            self.nn_pool.prestart(worker_key(self.settings, placement.nn or 0), model)
        except Exception as exc:  # the run starts its own worker and reports what fails
            logger.warning("could not start the NN worker ahead of the first run: %s", exc)

    # ---- inputs ----------------------------------------------------------------------
    def submit(self, name: str, doc: Mapping[str, Any]) -> None:
        """Hand over one document; never blocks (the queue is unbounded, documents are small)."""
        self._queue.put(Document(name, doc))

    def _start_receivers(self) -> None:
        s = self.settings
        # Read (and checked) only when a stream is configured, as the receivers did.
        curve = CurveKeys.from_settings(s) if s.eiger_endpoint or s.panda_endpoint else None
        if s.eiger_endpoint:
            common: dict[str, Any] = dict(
                on_series_start=lambda series, header: self._queue.put(
                    SeriesStart("eiger", header or {})
                ),
                on_frame=self._on_frame,
                on_series_end=lambda series: self._queue.put(SeriesEnd("eiger")),
                socket_type=s.eiger_socket,
                flavour=s.eiger_flavour,
                channel=s.eiger_channel,
                transform=None if s.eiger_crop is None else s.eiger_crop.transform(),
                curve=curve,
            )
            eiger: EigerReceiver | EigerProcessReceiver
            if s.eiger_decode_processes:
                eiger = EigerProcessReceiver(
                    s.eiger_endpoint, processes=s.eiger_decode_processes, **common
                )
            else:
                eiger = EigerReceiver(
                    s.eiger_endpoint, decode_threads=s.eiger_decode_threads, **common
                )
            self._receivers.append(eiger)
        if s.panda_endpoint:
            panda = PandaReceiver(
                s.panda_endpoint,
                on_start=lambda msg: self._queue.put(SeriesStart("panda", msg or {})),
                on_samples=lambda samples, first: self._queue.put(Samples(samples, first)),
                on_stop=lambda msg: self._queue.put(SeriesEnd("panda")),
                curve=curve,
            )
            self._receivers.append(panda)
        for receiver in self._receivers:
            receiver.start()

    def put(self, item: Input) -> None:
        """Hand over one input as a receiver does (tests, embedders); never blocks, except
        that a frame waits, like the receivers' frames, while too many are in flight."""
        if isinstance(item, Frame):
            self._on_frame(item.frame)
        else:
            self._queue.put(item)

    def _on_frame(self, frame: EigerFrame) -> None:
        """Receiver thread: wait (counted) rather than drop when sessions fall behind."""
        if not self._in_flight.acquire(blocking=False):
            self.counters.add("backpressure_waits")
            while not self._in_flight.acquire(timeout=1.0):
                if self._closed:
                    return
        self._queue.put(Frame(frame))

    # ---- the dispatcher thread -------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, Stop):
                return
            if isinstance(item, Flush):
                item.done.set()
                continue
            try:
                if isinstance(item, Document):
                    self._route_document(item.name, item.doc)
                elif isinstance(item, Resume):
                    self._resume_run(item.checkpoint, item.stored_frames)
                else:
                    self._route_stream(item)
            except Exception:
                logger.exception("could not route %s", type(item).__name__)
            finally:
                if isinstance(item, Frame):
                    self._in_flight.release()

    def _route_document(self, name: str, doc: Mapping[str, Any]) -> None:
        self.counters.add("documents")
        if name == "start":
            self._start_run(doc)
            return
        run_uid = doc.get("run_start")
        if run_uid is None and name in ("event", "event_page"):
            run_uid = self._descriptor_runs.get(doc.get("descriptor", ""))
        session = self._sessions.get(run_uid) if run_uid else None
        if session is None:
            return
        if session.finished:
            if name == "stop":  # e.g. after the run was ended for want of it
                self.counters.add("late_stops")
                logger.info(
                    "stop of scan %s arrived after its run ended %s (%s); ignored",
                    session.scan_id,
                    session.status,
                    session.reason,
                )
            return
        if name == "descriptor" and run_uid is not None:
            self._descriptor_runs[doc["uid"]] = run_uid
        session.put_document(name, doc)

    def _start_run(self, start: Mapping[str, Any]) -> None:
        if not start.get("uid"):
            self.counters.add("runs_skipped")
            self._remember_skipped(start, "start document without a uid")
            logger.warning("start document without a uid: run not reconstructed")
            return
        if start["uid"] in self._sessions:
            # A replayed or re-published start: a second session would hide the first one,
            # whose thread would then run on unseen.
            self.counters.add("duplicate_starts")
            logger.warning("second start document for run %s ignored", str(start["uid"])[:8])
            return
        self._end_open_runs()
        reason = run_selection(start, self.settings)
        if reason is None and self.admit is not None:
            reason = self.admit(start)
        if reason is not None:
            self.counters.add("runs_skipped")
            self._remember_skipped(start, reason)
            logger.info(
                "scan %s (%s) not reconstructed: %s",
                start.get("scan_id"),
                str(start.get("uid", ""))[:8],
                reason,
            )
            return
        in_series = self.series.join(start, self._sink_factory)
        session = RunSession(
            start,
            settings=self.settings,
            overrides=deep_merge(self.settings.overrides, self._overrides()),
            sink_factory=self._sink_factory if in_series is None else in_series.sink_factory,
            solver_worker=self.solver_worker,
            nn_pool=self.nn_pool,
            probe_seed=None
            if in_series is None or not self.settings.series_seed_probe
            else in_series.probe_seed,
        )
        with self._lock:
            self._sessions[session.uid] = session
            self._prune()
        self.counters.add("runs_started")
        logger.info("scan %s (%s): live reconstruction started", session.scan_id, session.uid[:8])
        session.begin()

    # ---- runs taken up again from their checkpoints (docs/resume.md) -------------------
    def resume(
        self,
        checkpoint: Checkpoint,
        *,
        stored_frames: Callable[[], Diffraction | None] | None = None,
    ) -> None:
        """Take run ``checkpoint.uid`` up again from its checkpoint: after a restart, or
        from another worker that died. Its session is made in order with every other input
        (frames and documents that arrive after this call are its own); ``stored_frames``
        reads back the frames the dead process stored, which the solver takes first."""
        self._queue.put(Resume(checkpoint, stored_frames))

    def resume_checkpoints(
        self,
        stored_frames: Callable[[Checkpoint], Callable[[], Diffraction | None] | None]
        | None = None,
    ) -> list[Checkpoint]:
        """Resume every run with a checkpoint in ``checkpoint_dir`` (else under ``data_dir``;
        runs a dead process never ended); the checkpoints, oldest first. Unreadable ones are
        reported and set aside. ``stored_frames(checkpoint)``: what reads back that run's
        stored frames."""
        store = CheckpointStore.at(self.settings.checkpoint_dir, self.settings.data_dir)
        checkpoints = store.load_all()
        for checkpoint in checkpoints:
            reader = None if stored_frames is None else stored_frames(checkpoint)
            self.resume(checkpoint, stored_frames=reader)
        return checkpoints

    def _resume_run(
        self,
        checkpoint: Checkpoint,
        stored_frames: Callable[[], Diffraction | None] | None = None,
    ) -> None:
        uid = checkpoint.uid
        if uid in self._sessions:
            logger.warning("run %s is already here; its checkpoint is not resumed", uid[:8])
            return
        in_series = self.series.join(checkpoint.start, self._sink_factory)  # its stack too
        session = RunSession(
            checkpoint.start,
            settings=self.settings,
            overrides=checkpoint.overrides,
            sink_factory=self._sink_factory if in_series is None else in_series.sink_factory,
            solver_worker=self.solver_worker,
            nn_pool=self.nn_pool,
            resume=checkpoint,
            stored_frames=stored_frames,
        )
        for name, doc in checkpoint.documents:
            if name == "descriptor" and doc.get("uid"):
                self._descriptor_runs[doc["uid"]] = uid
        with self._lock:
            self._sessions[uid] = session
            self._prune()
        self.counters.add("runs_resumed")
        logger.info("scan %s (%s): resumed from its checkpoint", session.scan_id, uid[:8])
        session.begin()

    def _remember_skipped(self, start: Mapping[str, Any], reason: str) -> None:
        self._skipped.append(
            {
                "uid": start.get("uid"),
                "scan_id": start.get("scan_id"),
                "plan_name": start.get("plan_name"),
                "status": "skipped",
                "reason": reason,
                "time": start.get("time"),
            }
        )

    def _end_open_runs(self) -> None:
        """A RunEngine runs one run at a time: a new ``start`` means the open runs' ``stop``
        was lost. Each ends ``incomplete`` with what it received, rather than holding its
        memory and the engine's history for ever."""
        for session in self.sessions():
            if session.accepting_streams:
                self.counters.add("runs_superseded")
                session.end_without_stop(SUPERSEDED)

    def _prune(self) -> None:
        """Keep every open run and the newest finished ones (up to ``_HISTORY`` in all);
        only the newest finished run keeps its pictures. Caller holds ``_lock``."""
        finished = [uid for uid, s in self._sessions.items() if s.finished]
        excess = len(self._sessions) - _HISTORY
        for uid in finished[: max(0, excess)]:
            del self._sessions[uid]
        for uid in finished[:-1]:
            session = self._sessions.get(uid)
            if session is not None:
                session.drop_pictures()
        known = set(self._sessions)
        for descriptor, run_uid in list(self._descriptor_runs.items()):
            if run_uid not in known:
                del self._descriptor_runs[descriptor]

    def _newest_open_session(self) -> RunSession | None:
        for session in reversed(self._sessions.values()):
            if session.accepting_streams:
                return session
        return None

    def _route_stream(self, item: SeriesStart | Frame | Samples | SeriesEnd) -> None:
        if isinstance(item, SeriesStart):
            owner = self._newest_open_session()
            self._series_owner[item.source] = owner
            if owner is None:
                logger.warning(
                    "%s series armed while no ptychography run is open; ignored", item.source
                )
                return
            owner.put_series_start(item.source, item.header)
            return
        source: Stream = "eiger" if isinstance(item, Frame) else "panda"
        if isinstance(item, SeriesEnd):
            source = item.source
        owner = self._series_owner.get(source)
        if owner is None:
            owner = self._newest_open_session()
            self._series_owner[source] = owner
        if isinstance(item, Frame):
            if owner is None:
                self.counters.add("orphan_frames")
                return
            self.counters.add("frames_routed")
            owner.put_frame(item.frame.frame, item.frame.data)
        elif isinstance(item, Samples):
            if owner is None:
                self.counters.add("orphan_samples")
                return
            owner.put_samples({k: np.asarray(v) for k, v in item.samples.items()}, item.first)
        else:
            if owner is not None:
                owner.put_series_end(source)
            self._series_owner[source] = None

    # ---- queries and shutdown --------------------------------------------------------
    def sessions(self) -> list[RunSession]:
        with self._lock:
            return list(self._sessions.values())

    def session(self, uid: str) -> RunSession | None:
        with self._lock:
            return self._sessions.get(uid)

    def status(self) -> dict[str, Any]:
        receivers = {
            getattr(r, "name", type(r).__name__): r.counters.snapshot() for r in self._receivers
        }
        return {
            "engine": self.counters.snapshot(),
            "solver_process": {
                "pid": self.solver_worker.pid,
                "alive": self.solver_worker.alive,
                **self.solver_worker.counters.snapshot(),
            },
            "receivers": receivers,
            "runs": [s.summary() for s in self.sessions()],
            "skipped": list(self._skipped),
            "series": self.series.status(),
        }

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued item is routed and every session has finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = threading.Event()
        self._queue.put(Flush(flushed))
        if not flushed.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            return False
        for session in self.sessions():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not session.join(remaining):
                return False
        return self.series.flush(
            None if deadline is None else max(0.0, deadline - time.monotonic())
        )

    def close(self, timeout: float = 30.0) -> None:
        """Stop the receivers, let running sessions write what they have, stop the dispatcher."""
        if self._closed:
            return
        self._closed = True
        for receiver in self._receivers:
            try:
                receiver.stop()
            except Exception:
                logger.exception("could not stop receiver %r", receiver)
        for session in self.sessions():
            if not session.finished:
                session.cancel("engine closed")
        deadline = time.monotonic() + timeout
        for session in self.sessions():
            session.join(max(0.0, deadline - time.monotonic()))
        self._queue.put(Stop())
        self._dispatcher.join(max(0.1, deadline - time.monotonic()))
        self.series.close(max(1.0, deadline - time.monotonic()))
        self.solver_worker.close(max(1.0, deadline - time.monotonic()))
        self.nn_pool.shutdown()
