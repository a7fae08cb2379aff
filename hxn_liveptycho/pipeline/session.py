"""RunSession: one run's lifecycle, from its start document to its final write.

A session owns one thread. That thread takes in documents, detector frames and
encoder samples from an unbounded inbox, configures itself as soon as the
documents say enough (the baseline carries the energy), pairs frames with
positions, and hands them to the solver, which iterates in the engine's solver
process (:mod:`hxn_liveptycho.recon.worker`): the session only feeds it, asks
for a snapshot every ``live_interval_s`` (the first as soon as the first frames
have been iterated) and passes snapshots to the result sink. Data keeps flowing
into the solver between its passes, so the first picture appears while the scan
is still running.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig, scan_config_from_documents
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.errors import LivePtychoError, NotPtychographyError
from hxn_liveptycho.nn.branch import NNBranch, start_nn_branch
from hxn_liveptycho.nn.process import NNProcessBranch, WorkerPool
from hxn_liveptycho.pipeline.assemble import Assembler, PairedFrame
from hxn_liveptycho.pipeline.geometry import CanvasGeometry
from hxn_liveptycho.pipeline.preprocess import beam_center, crop_window, to_amplitudes
from hxn_liveptycho.recon.placement import Placement
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.recon.worker import RemoteSolver, SolverWorker
from hxn_liveptycho.streams.crop import window_source
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)


#: Seconds before the solver's final state in which no live snapshot is asked for.
FINAL_QUIET_S = 1.5


class RunStatus(enum.StrEnum):
    """A run's state. ``waiting`` and ``running`` are open; every run ends in exactly one of
    the others, with a reason (:attr:`RunSession.reason`), so nothing stays ``running``
    once its session has ended and no run claims more than its data show:

    - ``complete``: the scan ended and its frames were reconstructed (recoverable
      oddities are listed in :attr:`RunSession.warnings`);
    - ``incomplete``: the scan ended (or was given up on: no ``stop``, a newer run) but
      data are missing or inconsistent: no frames, no positions, nothing paired, a
      detector that changed its frame shape;
    - ``failed``: the reconstruction or the result store broke (``error`` says how);
    - ``aborted``: the scan or the user stopped it early;
    - ``skipped``: selected by plan name, but the documents show it is not ptychography.
    """

    WAITING = "waiting"
    RUNNING = "running"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    ABORTED = "aborted"
    SKIPPED = "skipped"


FINAL_STATUSES = frozenset(
    {
        RunStatus.COMPLETE,
        RunStatus.INCOMPLETE,
        RunStatus.FAILED,
        RunStatus.ABORTED,
        RunStatus.SKIPPED,
    }
)

#: Added to a scan's expected duration (points x dwell) for the default bound on how long
#: a run without its ``stop`` may go without any input (``Settings.run_idle_timeout_s``):
#: long enough for a paused RunEngine or a slow baseline read, short enough that a lost
#: ``stop`` does not hold the run (and its memory) for the rest of the shift.
IDLE_MARGIN_S = 600.0
#: Least time the solver is given, after the scan's end, to send its final state (see
#: :meth:`RunSession._final_state_bound_s`).
FINAL_STATE_MARGIN_S = 120.0
#: Reason of a run ended because a newer run started before its ``stop`` arrived.
SUPERSEDED = "a new run started before its stop"


@runtime_checkable
class ResultSink(Protocol):
    """Where a session's results go (Tiled in production; anything with these methods)."""

    #: Called when a result the sink could not store (held for retry-upload) is stored later.
    on_stored_later: Callable[[], None] | None

    def open(self, config: ScanConfig | None, metadata: Mapping[str, Any]) -> None: ...

    def live(self, snapshot: Mapping[str, Any]) -> None: ...

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None: ...

    def nn(self, snapshot: Mapping[str, Any]) -> None: ...

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


SinkFactory = Callable[[], ResultSink]


class _RunLogger(logging.LoggerAdapter):
    """Prefixes every line with the run's scan id and uid, like ophyd-async's device logs."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra: Any = self.extra
        return f"[scan {extra['scan_id']} {extra['uid'][:8]}] {msg}", kwargs


class RunSession:
    """Reconstructs one run; every public method is safe to call from any thread."""

    def __init__(
        self,
        start: Mapping[str, Any],
        *,
        settings: Settings,
        overrides: Mapping[str, Any],
        sink_factory: SinkFactory,
        solver_worker: SolverWorker,
        nn_pool: WorkerPool | None = None,
    ) -> None:
        self.start_doc = dict(start)
        self.uid: str = start.get("uid", "")
        self.scan_id = start.get("scan_id")
        self.settings = settings
        self.overrides = dict(overrides)
        self.log = _RunLogger(logger, {"uid": self.uid, "scan_id": self.scan_id})
        self.counters = Counters(
            [
                "documents",
                "frames_received",
                "frames_used",
                "frames_quarantined",
                "masked_pixels",
                "snapshots",
            ]
        )
        self.status = RunStatus.WAITING
        self.error: str | None = None
        #: Why the run ended in its terminal state (set once, with the state).
        self.reason: str | None = None
        #: Recoverable oddities of a run that still ends ``complete`` (unpaired frames, ...).
        self.warnings: list[str] = []
        self.config: ScanConfig | None = None
        self.iteration = 0
        self.last_error: float | None = None
        #: The newest snapshot given to the sink; replaced, never mutated (for status pages).
        self.latest_snapshot: Mapping[str, Any] | None = None
        self._sink_factory = sink_factory
        self._sink: ResultSink | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._descriptors: dict[str, Mapping[str, Any]] = {}
        self._baseline: dict[str, Any] = {}
        self._stop_doc: Mapping[str, Any] | None = None
        self._stop_seen_at: float | None = None
        self._streams_open = {"eiger": False, "panda": False}
        self._streams_seen = {"eiger": False, "panda": False}
        self._series_header: dict[str, Any] = {}
        self._early_frames: list[tuple[int, np.ndarray]] = []
        self._early_samples: list[tuple[dict[str, np.ndarray], int]] = []
        self._cancel = threading.Event()
        #: time.monotonic() of the newest input (document, frame, samples, series message):
        #: a run without its ``stop`` ends once it has been idle for :meth:`idle_bound_s`.
        self._last_input = time.monotonic()
        #: Why the run ends without (or before) its ``stop``; set from any thread.
        self._forced_end: str | None = None
        self._forced_end_at: float | None = None
        #: (shape, dtype) every frame of the run must have, from its first frame.
        self._frame_kind: tuple[tuple[int, ...], np.dtype] | None = None
        #: Quarantined frames since the last frame of the run's own kind, and the first
        #: odd kind seen: a series whose every later frame is odd changed its shape.
        self._odd_streak = 0
        self._odd_kind: tuple[tuple[int, ...], np.dtype] | None = None
        self._first_frame_index: int | None = None
        self._kind_accepted = 0
        self._last_odd: tuple[int, np.ndarray] | None = None
        #: Whether a frame the receiver's detector crop did not fit was logged yet.
        self._misfit_logged = False
        #: Light copies kept once the heavy state is released (see :meth:`_release`).
        self._released: dict[str, Any] = {}
        #: Status and reason before a write that neither Tiled nor the disk took.
        self._before_write_failure: tuple[RunStatus, str] | None = None
        self._done = threading.Event()
        self._assembler: Assembler | None = None
        self._worker = solver_worker
        self._nn_pool = nn_pool
        self._solver: RemoteSolver | None = None
        self._finish_sent = False
        self._final_iteration: int | None = None
        self._told_final_due = False
        self._solver_failure: str | None = None
        self.placement: Placement | None = None
        #: time.monotonic() of the run's milestones (first frame, first snapshot, data
        #: complete, final state, final write), for status pages and the live-path benchmark.
        self.timeline: dict[str, float] = {}
        self._nn: NNBranch | NNProcessBranch | None = None
        self._geometry: CanvasGeometry | None = None
        self._window: tuple[slice, slice] | None = None
        self._pending_frames: list[PairedFrame] = []
        self._last_live = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"liveptycho-{self.scan_id}-{self.uid[:8]}", daemon=True
        )

    # ---- inputs (any thread) -------------------------------------------------------------
    def begin(self) -> None:
        self._thread.start()

    def put_document(self, name: str, doc: Mapping[str, Any]) -> None:
        self._inbox.put(("doc", (name, doc)))

    def put_series_start(self, source: str, header: Mapping[str, Any]) -> None:
        self._inbox.put(("series_start", (source, dict(header))))

    def put_frame(self, index: int, data: np.ndarray) -> None:
        self._inbox.put(("frame", (index, data)))

    def put_samples(self, samples: Mapping[str, np.ndarray], starting_sample: int) -> None:
        self._inbox.put(("samples", (dict(samples), starting_sample)))

    def put_series_end(self, source: str) -> None:
        self._inbox.put(("series_end", source))

    def end_without_stop(self, reason: str) -> None:
        """End the run as ``incomplete`` although its ``stop`` never came (a newer run
        started): it takes no further series, and what it received is written."""
        if self._forced_end is None and self._stop_doc is None:
            self._forced_end = reason
            self._inbox.put(("end", reason))

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop early: whatever was reconstructed so far is written with status 'aborted'."""
        self._inbox.put(("cancel", reason))
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def accepting_streams(self) -> bool:
        """Whether a newly armed detector series may still belong to this run."""
        return self._stop_doc is None and self._forced_end is None and not self._done.is_set()

    def idle_bound_s(self) -> float:
        """How long the run may go without input before, lacking its ``stop``, it ends:
        the setting, else the scan's expected duration plus :data:`IDLE_MARGIN_S`."""
        if self.settings.run_idle_timeout_s is not None:
            return self.settings.run_idle_timeout_s
        config = self.config
        expected = 0.0
        if config is not None and config.dwell_s:
            expected = config.num_points * config.dwell_s
        return expected + IDLE_MARGIN_S

    def summary(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "uid": self.uid,
            "scan_id": self.scan_id,
            "status": str(self.status),
            "iteration": self.iteration,
            "error_metric": self.last_error,
            "positions": self._n_positions(),
            "timeline": dict(self.timeline),
            "counters": self._all_counters(),
        }
        pairing = self._pairing_report()
        if pairing is not None:
            info["pairing"] = pairing
        if self.reason:
            info["reason"] = self.reason
        if self.warnings:
            info["warnings"] = list(self.warnings)
        if self.error:
            info["error"] = self.error
        if self.config is not None:
            info["expected_positions"] = self.config.num_points
        released = self._released
        container_path = getattr(self._sink, "container_path", released.get("container_path"))
        if container_path:
            info["container_path"] = container_path
        nn = self._nn
        if nn is not None:
            info["nn"] = nn.counters.snapshot()
        elif "nn" in released:
            info["nn"] = released["nn"]
        backup = getattr(self._sink, "backup_path", released.get("backup_path"))
        if backup is not None:  # Tiled refused the result: say where it is instead
            info["stored_in"] = "local backup"
            info["backup_path"] = str(backup)
        if getattr(self._sink, "write_failure", released.get("write_failure")):
            info["stored_in"] = "memory (until retry-upload writes it)"
        return info

    def _n_positions(self) -> int:
        if self._solver is not None:
            return self._solver.n_positions
        return int(self._released.get("positions", 0))

    def _all_counters(self) -> dict[str, int]:
        """The session's counters with the assembler's and what never paired."""
        counters = self.counters.snapshot()
        if self._assembler is not None:
            counters.update(
                {f"assembler_{k}": v for k, v in self._assembler.counters.snapshot().items()}
            )
            counters.update(self._assembler.unpaired_report())
        else:
            counters.update(self._released.get("assembler", {}))
        return counters

    def _pairing_report(self) -> dict[str, Any] | None:
        """The samples-per-frame factor used and what measured it (see Assembler)."""
        if self._assembler is not None:
            return self._assembler.pairing_report()
        return self._released.get("pairing")

    @property
    def solver_passes(self) -> list[tuple[float, int]]:
        """(time.monotonic() at its end, positions covered) of every solver pass so far."""
        if self._solver is None:
            return list(self._released.get("passes", []))
        return list(self._solver.pass_ends)

    def nn_snapshot(self) -> dict[str, Any] | None:
        """The NN branch's current mosaic (None without an NN branch), for status pages."""
        return None if self._nn is None else self._nn.snapshot()

    # ---- the session thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the session's last line of defence; the RE never sees it
            self.log.exception("reconstruction failed")
            error = f"{type(exc).__name__}: {exc}"
            if self.status not in FINAL_STATUSES:  # one terminal state, one final write
                self._finish(RunStatus.FAILED, error, error=error)
        finally:
            try:
                self._release()
            except Exception:  # never leave wait() hanging over a cleanup problem
                self.log.exception("releasing the run's memory failed")
            self._done.set()

    def _loop(self) -> None:
        while True:
            self._drain()
            if self.status in FINAL_STATUSES:
                return
            if self._cancel.is_set():
                self._stop_solver()
                reason = self.error or "cancelled"
                self._finish(RunStatus.ABORTED, reason, error=reason)
                return
            self._check_idle()
            if self._forced_end is not None and self.config is None:
                self._try_configure(final=True)
                if self.status in FINAL_STATUSES:
                    return
            self._feed_solver()
            self._pump_solver()
            if self._solver is not None and self._solver.failure and self._solver_failure is None:
                # The run goes on without a solver: its frames are still kept, and it ends
                # failed, with the reason, when the data are complete.
                self._solver_failure = f"solver: {self._solver.failure}"
                self.log.error("%s; the run's frames are still kept", self._solver_failure)
            if self._data_complete() and self._ready_to_finish():
                status, reason = self._verdict()
                self._finish(status, reason, error=self._solver_failure)
                return

    def _check_idle(self) -> None:
        """A run whose ``stop`` is lost would otherwise never end (nor free its memory)."""
        if self._stop_doc is not None or self._forced_end is not None:
            return
        bound = self.idle_bound_s()
        if time.monotonic() - self._last_input > bound:
            self._forced_end = f"no 'stop' document within {bound:g} s of the run's last input"
            self._forced_end_at = time.monotonic()
            self.log.warning("%s: ending it with what was received", self._forced_end)

    def _verdict(self) -> tuple[RunStatus, str]:
        """The terminal state the data support, and why; oddities go to :attr:`warnings`."""
        if self._solver_failure is not None:
            return RunStatus.FAILED, self._solver_failure
        missing = self._missing_data()
        if self._forced_end is not None:
            return RunStatus.INCOMPLETE, "; ".join(filter(None, [self._forced_end, missing]))
        stop = self._stop_doc or {}
        if stop.get("exit_status") != "success":
            why = f"the scan ended with exit status {stop.get('exit_status')!r}"
            if stop.get("reason"):
                why += f": {stop['reason']}"
            return RunStatus.ABORTED, why
        if missing is not None:
            return RunStatus.INCOMPLETE, missing
        return RunStatus.COMPLETE, "the scan ended and its frames were reconstructed"

    def _missing_data(self) -> str | None:
        """Why the received data cannot make a whole result (None when they can); a
        recoverable shortfall is appended to :attr:`warnings` instead."""
        received = self.counters.get("frames_received")
        used = self.counters.get("frames_used")
        quarantined = self.counters.get("frames_quarantined")
        counters = self._all_counters()
        if quarantined:
            shape_note = (
                f"{quarantined} of {received} frames quarantined: "
                f"{self._describe_kind(self._odd_kind)} instead of the run's "
                f"{self._describe_kind(self._frame_kind)}"
            )
            if self._odd_streak >= 2 or 2 * quarantined >= received:
                return f"the detector's frame shape changed: {shape_note}"
            self.warnings.append(shape_note)
        if self.config is None:
            return "the run was never configured"
        if received == 0:
            armed = "" if self._streams_seen["eiger"] else " (no detector series was armed)"
            return f"no detector frames were received{armed}"
        if counters.get("assembler_samples", 0) == 0:
            return f"no encoder positions were received for the {received} frames"
        if used == 0:
            return f"no frame was paired with a position ({self._unpaired_text(counters)})"
        unpaired = self._unpaired_text(counters)
        if unpaired:
            self.warnings.append(f"unpaired at the end: {unpaired}")
        if used < self.config.num_points:
            self.warnings.append(
                f"{used} of the scan's {self.config.num_points} points were reconstructed"
            )
        return None

    @staticmethod
    def _unpaired_text(counters: Mapping[str, int]) -> str:
        keys = ("frames_without_position", "positions_without_frame", "samples_unassigned")
        return ", ".join(f"{counters[k]} {k}" for k in keys if counters.get(k))

    @staticmethod
    def _describe_kind(kind: tuple[tuple[int, ...], np.dtype] | None) -> str:
        if kind is None:
            return "?"
        return f"{'x'.join(map(str, kind[0]))} {kind[1]}"

    def _drain(self) -> None:
        """Wait for the next input (the solver's messages wake it too), then take them all."""
        try:
            item = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind not in ("solver", "cancel", "end"):
            self._last_input = time.monotonic()
        if kind == "doc":
            name, doc = payload
            self.counters.add("documents")
            self._on_document(name, doc)
        elif kind == "frame":
            index, data = payload
            self.counters.add("frames_received")
            self.timeline.setdefault("first_frame", time.monotonic())
            if self._admit(index, data):
                self._keep(index, data)
        elif kind == "samples":
            samples, starting = payload
            if self._assembler is None:
                self._early_samples.append((samples, starting))
            else:
                self._assembler.add_samples(samples, starting)
        elif kind == "series_start":
            source, header = payload
            self._streams_open[source] = True
            self._streams_seen[source] = True
            if source == "eiger":
                self._series_header = header
                if self._assembler is not None:
                    self._assembler.frame_time_s = header.get("frame_time")
        elif kind == "series_end":
            self._streams_open[payload] = False
            if payload == "panda" and self._assembler is not None:
                self._assembler.positions_ended()
        elif kind == "cancel":
            self.error = str(payload)
        elif kind == "end":
            self._forced_end_at = time.monotonic()
            self.log.warning("%s: ending it with what was received", payload)
        # "solver": the solver process answered; _pump_solver reads what it sent

    def _keep(self, index: int, data: np.ndarray) -> None:
        data = np.asarray(data)  # a receiver's DetectorWindow: plain pixels from here on
        if self._assembler is None:
            self._early_frames.append((index, data))
        else:
            self._assembler.add_frame(index, data)

    def _admit(self, index: int, data: np.ndarray) -> bool:
        """Whether a frame has the run's shape and dtype (its first frame's); one that has
        not is quarantined, counted and dropped, so that a single odd frame cannot fail
        the batch it would be stacked with, and the frames around it are kept. With a
        detector crop the shapes compared are the detector frames' (the receiver says),
        so a larger frame is not cropped silently; one the crop did not fit is always
        quarantined."""
        source = window_source(data)
        if source is not None and source[1] is not None:
            return self._quarantine_misfit(index, data, source[1])
        kind = self._kind_of(data)
        if self._frame_kind is None and len(kind[0]) == 2:
            self._frame_kind = kind
            self._first_frame_index = index
        if kind == self._frame_kind:
            self._odd_streak = 0
            self._kind_accepted += 1
            return True
        if (
            self._kind_accepted == 1
            and self._last_odd is not None
            and self._kind_of(self._last_odd[1]) == kind
            and self._unadmit(self._first_frame_index)
        ):
            # The run's first frame was the odd one: the two after it agree with each other.
            # It is quarantined in their place, and they set the run's kind.
            self.log.warning(
                "frame %s (%s) was the odd one: quarantined; frames are %s",
                self._first_frame_index,
                self._describe_kind(self._frame_kind),
                self._describe_kind(kind),
            )
            self._odd_kind, self._frame_kind = self._frame_kind, kind
            self._odd_streak = 0
            self._kind_accepted = 2
            if self._last_odd is not None:
                self.counters.add("frames_quarantined", -1)
                self._keep(*self._last_odd)
            self._last_odd = None
            return True
        self.counters.add("frames_quarantined")
        self._odd_streak += 1
        # Held until the next frame, in case it shows that the first frame was the odd one.
        self._last_odd = (index, data) if self._kind_accepted == 1 else None
        if self._odd_kind is None:
            self._odd_kind = kind
            self.log.warning(
                "frame %d is %s, not %s like the run's first frame: quarantined (dropped and "
                "counted as frames_quarantined; later ones are not logged)",
                index,
                self._describe_kind(kind),
                self._describe_kind(self._frame_kind),
            )
        return False

    def _quarantine_misfit(self, index: int, data: np.ndarray, why: str) -> bool:
        """A frame the receiver's detector crop did not fit: it came without pixels, so it
        is quarantined whatever the run's kind (and never becomes it)."""
        self.counters.add("frames_quarantined")
        self._odd_streak += 1
        if self._odd_kind is None:
            self._odd_kind = self._kind_of(data)
        if not self._misfit_logged:
            self._misfit_logged = True
            self.log.warning(
                "frame %d: %s: quarantined (dropped and counted as frames_quarantined; later "
                "ones are not logged)",
                index,
                why,
            )
        return False

    @staticmethod
    def _kind_of(data: np.ndarray) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype; the detector frame's shape for a window a receiver cut."""
        source = window_source(data)
        shape = source[0] if source is not None else tuple(np.shape(data))
        return shape, np.asarray(data).dtype

    def _unadmit(self, index: int | None) -> bool:
        """Quarantine an admitted frame that is not yet fed (False if it is too late)."""
        if index is None:
            return False
        for i, (early_index, _) in enumerate(self._early_frames):
            if early_index == index:
                del self._early_frames[i]
                self.counters.add("frames_quarantined")
                return True
        if self._assembler is not None and self._assembler.discard_frame(index):
            self.counters.add("frames_quarantined")
            return True
        return False

    def _on_document(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "descriptor":
            self._descriptors[doc["uid"]] = doc
        elif name == "event_page":
            descriptor = self._descriptors.get(doc.get("descriptor", ""), {})
            if descriptor.get("name") == "baseline" and not self._baseline:
                self._baseline = {k: v[0] for k, v in doc.get("data", {}).items() if v}
        elif name == "stop":
            self._stop_doc = doc
            self._stop_seen_at = time.monotonic()
            self.log.info("run stopped (%s); finishing the reconstruction", doc.get("exit_status"))
        if self.status in FINAL_STATUSES:
            return
        if self.config is None and (name in ("event_page", "stop") or self._early_frames):
            self._try_configure(final=name == "stop")

    def _try_configure(self, *, final: bool) -> None:
        waiting_for_baseline = (
            not self._baseline and not final and "energy_kev" not in self.overrides
        )
        if waiting_for_baseline:
            return
        try:
            config = scan_config_from_documents(
                self.start_doc,
                descriptors=list(self._descriptors.values()),
                baseline=self._baseline,
                overrides=self.overrides,
            )
        except NotPtychographyError as exc:
            if not (final or self._baseline):
                return
            if self.start_doc.get(self.settings.metadata_flag) is not True:
                # Chosen by its plan name only: not a ptychography run, not a failure.
                self._finish(RunStatus.SKIPPED, f"not a ptychography run: {exc}")
                return
            raise LivePtychoError(f"cannot configure the reconstruction: {exc}") from exc
        self._configure(config)

    def _configure(self, config: ScanConfig) -> None:
        # The solver process resolved the backend and the GPUs (the RunEngine's process
        # never opens CUDA); it is usually ready long before the first scan.
        self.placement = self._worker.info().placement
        if self.placement.gpus:
            self.log.info(
                "GPUs: iterative solver on %d, NN branch on %d (%d visible)",
                self.placement.iterative,
                self.placement.nn,
                self.placement.gpus,
            )
        self.config = config
        self._geometry = CanvasGeometry.from_scan(config)
        self._assembler = Assembler(
            config.encoder, expected_frames=config.num_points, dwell_s=config.dwell_s, log=self.log
        )
        self._assembler.frame_time_s = self._series_header.get("frame_time")
        for samples, starting in self._early_samples:
            self._assembler.add_samples(samples, starting)
        for index, data in self._early_frames:
            self._assembler.add_frame(index, data)
        if self._streams_seen["panda"] and not self._streams_open["panda"]:
            self._assembler.positions_ended()
        self._early_frames.clear()
        self._early_samples.clear()
        self._sink = self._sink_factory()
        self._sink.on_stored_later = self.stored_later
        self._sink.open(config, self._metadata(RunStatus.RUNNING))
        if config.mode != "iterative":
            self._nn = start_nn_branch(
                config,
                self.settings,
                self._geometry,
                self._sink.nn,
                self.log,
                device_id=self.placement.nn or 0,
                pool=self._nn_pool,
            )
        self.status = RunStatus.RUNNING
        self.log.info(
            "configured: %d x %d points, %.3f keV, z = %.3f m, pixel %.2f nm, canvas %s",
            config.grid.x_num,
            config.grid.y_num,
            config.energy_kev,
            config.distance_m,
            config.pixel_size_m * 1e9,
            self._geometry.canvas_shape,
        )

    def _feed_solver(self) -> None:
        if self._assembler is None or self.config is None or self._geometry is None:
            return
        self._pending_frames.extend(self._assembler.pop_ready())
        if not self._pending_frames:
            return
        roi = self.config.roi
        if self._window is None:
            frame_shape = self._pending_frames[0].data.shape
            center = self._roi_center(roi.center_y, roi.center_x)
            self._window = crop_window(frame_shape, center, roi.size)
        amplitudes, n_bad = to_amplitudes([p.data for p in self._pending_frames], self._window)
        if n_bad:
            self.counters.add("masked_pixels", n_bad)
        positions_um = np.array([(p.y_um, p.x_um) for p in self._pending_frames])
        indices = np.array([p.index for p in self._pending_frames])
        positions_px = self._geometry.to_pixels(positions_um)
        if self._nn is not None:
            self._nn.submit(amplitudes, positions_px)
        if self.config.mode != "nn" and self._solver_failure is None:
            self._add_to_solver(amplitudes, positions_px)
        if self._sink is not None:
            self._sink.diffraction(indices, amplitudes, self._geometry.to_metres(positions_um))
        self.counters.add("frames_used", len(indices))
        self._pending_frames.clear()

    def _add_to_solver(self, amplitudes: np.ndarray, positions_px: np.ndarray) -> None:
        assert self.config is not None and self._geometry is not None
        if self._solver is None:
            self._solver = self._worker.open_run(
                self.uid,
                probe=initial_probe(
                    amplitudes,
                    footprint_px=self.config.probe_footprint_px,
                    defocus_sign=self.config.probe.defocus_sign,
                ),
                canvas_shape=self._geometry.canvas_shape,
                params=self.config.recon,
                expected_positions=self.config.num_points,
                notify=lambda: self._inbox.put(("solver", None)),
            )
            self.log.info(
                "solver (%s) started with %d frames", self._solver.backend, len(amplitudes)
            )
        self._solver.add(amplitudes, positions_px)

    def _roi_center(self, center_y: float | None, center_x: float | None) -> tuple[float, float]:
        header = self._series_header
        if center_y is None and "beam_center_y" in header:
            center_y = float(header["beam_center_y"])
        if center_x is None and "beam_center_x" in header:
            center_x = float(header["beam_center_x"])
        crop = self.settings.eiger_crop
        if crop is not None:  # frames arrive cut to the receiver's window: detector → window px
            if center_y is not None:
                center_y -= crop.origin[0]
            if center_x is not None:
                center_x -= crop.origin[1]
        if center_y is None or center_x is None:
            estimate = beam_center(np.stack([p.data for p in self._pending_frames[:64]]))
            center_y = estimate[0] if center_y is None else center_y
            center_x = estimate[1] if center_x is None else center_x
            self.log.info("beam centre from the data: (%.1f, %.1f)", center_y, center_x)
        return center_y, center_x

    def _pump_solver(self) -> None:
        """Pass on the snapshot the solver answered, and ask for the next one when it is due."""
        solver = self._solver
        if solver is None:
            return
        self.iteration = solver.iteration
        self.last_error = solver.last_error
        answered = solver.take_snapshot()
        if answered is not None and answered.get("object") is not None:
            self.timeline.setdefault("first_snapshot", time.monotonic())
            self.latest_snapshot = self._snapshot(answered)
            if self._sink is not None:
                self._sink.live(self.latest_snapshot)
            self.counters.add("snapshots")
        if solver.added == 0:
            return
        if self._final_imminent(solver):
            self._tell_final_due()
            return
        now = time.monotonic()
        if now - self._last_live >= self.settings.live_interval_s and solver.request_snapshot():
            self._last_live = now

    def _tell_final_due(self) -> None:
        """From the scan's end the sink appends no frames until the result is written: the
        post-scan passes then share the host with no Tiled ingest, and the result never
        waits behind a chunk (the frames stay queued and follow the result)."""
        if self._told_final_due:
            return
        self._told_final_due = True
        final_due = getattr(self._sink, "final_due", None)
        if final_due is not None:
            final_due()

    def _final_imminent(self, solver: RemoteSolver) -> bool:
        """The final state is due within :data:`FINAL_QUIET_S`: a live write started now would
        only delay it in the sink's queue."""
        if self._final_iteration is None:
            return False
        passes = solver.pass_ends[-20:]
        if len(passes) < 2 or passes[-1][0] <= passes[0][0]:
            return False
        rate = (len(passes) - 1) / (passes[-1][0] - passes[0][0])
        return (self._final_iteration - solver.iteration) / rate < FINAL_QUIET_S

    def _stop_solver(self) -> None:
        """Cancelled: the solver sends what it has after its current pass."""
        if self._solver is None or self._solver.done.is_set():
            return
        self._solver.cancel()
        if not self._solver.done.wait(self.settings.tiled_write_timeout_s):
            self.log.error("the solver did not answer the cancel; its last snapshot is kept")

    def _data_complete(self) -> bool:
        """No more frames will come: the run stopped and both streams ended (or timed out).

        An aborted or failed run waits only a second for stragglers; a successful
        one waits up to ``stream_timeout_s`` for the detectors' end-of-series.
        """
        if self._forced_end is not None:
            waited = time.monotonic() - (self._forced_end_at or time.monotonic())
            return not any(self._streams_open.values()) or waited > 1.0
        if self._stop_doc is None:
            return False
        if not any(self._streams_open.values()):
            return True
        waited = time.monotonic() - (self._stop_seen_at or 0.0)
        limit = 1.0 if self._stop_doc.get("exit_status") != "success" else None
        return waited > (limit or self.settings.stream_timeout_s)

    def _ready_to_finish(self) -> bool:
        """All frames are with the solver and it has sent its final state after the
        post-scan passes (``recon.iterations`` of them, counted from here)."""
        if self.config is None:
            return True
        if self._assembler is not None:
            self._pending_frames.extend(self._assembler.pop_ready())
            if self._pending_frames:
                return False
        solver = self._solver
        if solver is None or solver.added == 0 or self._solver_failure is not None:
            return True
        if not self._finish_sent:
            self._finish_sent = True
            self.timeline["data_complete"] = time.monotonic()
            self._final_iteration = solver.iteration + self.config.recon.iterations
            solver.finish(self.config.recon.iterations)
            self._tell_final_due()
        if solver.done.is_set():
            return True
        bound = self._final_state_bound_s(solver)
        waited = time.monotonic() - self.timeline["data_complete"]
        if waited > bound:
            # A solver process that is alive but stuck would otherwise hold the run open
            # (and wait() with it) for ever; its last snapshot is what gets written.
            self._solver_failure = (
                f"solver: no final state within {bound:.0f} s of the scan's end; "
                "its last snapshot is kept"
            )
            self.log.error("%s", self._solver_failure)
            return True
        return False

    def _final_state_bound_s(self, solver: RemoteSolver) -> float:
        """How long the post-scan passes may take: :data:`FINAL_STATE_MARGIN_S` plus ten
        times what they should take at the solver's measured pass rate."""
        assert self.config is not None
        passes = solver.pass_ends[-20:]
        expected = 0.0
        if len(passes) >= 2 and passes[-1][0] > passes[0][0]:
            rate = (len(passes) - 1) / (passes[-1][0] - passes[0][0])
            expected = self.config.recon.iterations / rate
        return FINAL_STATE_MARGIN_S + 10.0 * expected

    def _snapshot(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A solver state as the sink takes it: with the error history and positions in metres."""
        snap = {k: v for k, v in state.items() if k != "positions_px"}
        if self._solver is not None:
            snap["error_history"] = np.asarray(self._solver.error_history, dtype=np.float64)
        if self._geometry is not None and "positions_px" in state:
            snap["positions_m"] = self._geometry.pixels_to_metres(state["positions_px"])
        return snap

    def _final_snapshot(self) -> dict[str, Any]:
        """The solver's final state; its last live snapshot when the solver failed."""
        solver = self._solver
        if solver is None:
            return {}
        if solver.final is not None and solver.final.get("object") is not None:
            self.timeline["final_state"] = time.monotonic()
            self.iteration = solver.iteration
            self.last_error = solver.last_error
            return self._snapshot(solver.final)
        return dict(self.latest_snapshot or {})

    def _metadata(self, status: RunStatus) -> dict[str, Any]:
        config = self.config
        md: dict[str, Any] = {
            "raw_uid": self.uid,
            "scan_id": self.scan_id,
            "raw_start_time": self.start_doc.get("time"),
            "plan_name": self.start_doc.get("plan_name"),
            "status": str(status),
            "mode": config.mode if config is not None else "iterative",
            "placement": None if self.placement is None else self.placement.as_metadata(),
            "counters": self._all_counters(),
            "pairing": self._pairing_report(),
        }
        if self.reason:
            md["reason"] = self.reason
        if self.warnings:
            md["warnings"] = list(self.warnings)
        if config is not None:
            md.update(
                energy_kev=config.energy_kev,
                wavelength_m=config.wavelength_m,
                distance_m=config.distance_m,
                pixel_size_m=config.pixel_size_m,
                algorithm=config.recon.algorithm,
                config=config.model_dump(mode="json"),
            )
        if self._geometry is not None:
            md["canvas"] = {
                "origin_um": list(self._geometry.origin_um),
                "pixel_size_m": self._geometry.pixel_size_m,
                "window": self._geometry.window,
                "shape": list(self._geometry.canvas_shape),
            }
        if self._nn is not None:
            md["nn"] = self._nn.describe()
        if self.error:
            md["error"] = self.error
        md["iteration"] = self.iteration
        return md

    def _finish(self, status: RunStatus, reason: str, *, error: str | None = None) -> None:
        """Write whatever exists, with its terminal state and reason; a failure is recorded
        where users look. A skipped run writes nothing: it was never a reconstruction."""
        if error:
            self.error = error
        self.reason = reason
        self.status = status
        if self._assembler is not None:  # a wrong samples-per-frame factor is never silent
            self.warnings.extend(w for w in self._assembler.final_check() if w not in self.warnings)
        if status is RunStatus.SKIPPED and self._sink is None:
            self.log.info("not reconstructed: %s", reason)
            return
        try:
            if self._sink is None:
                self._sink = self._sink_factory()
                self._sink.on_stored_later = self.stored_later
                self._sink.open(self.config, self._metadata(status))
            if self._nn is not None:
                nn_final = self._nn.close(timeout=self.settings.tiled_write_timeout_s)
                if nn_final is not None:
                    self._sink.nn(nn_final)
            snapshot = self._final_snapshot()
            if snapshot:
                self.latest_snapshot = snapshot
            unpaired = self._assembler.unpaired_report() if self._assembler else {}
            if any(unpaired.values()):
                self.log.warning("unpaired at the end: %s", unpaired)
            self._sink.final(snapshot, self._metadata(status))
        except Exception as exc:
            self.log.exception("final write failed")
            self._fail_write(f"final write failed: {type(exc).__name__}: {exc}")
        finally:
            if self._solver is not None:
                self._solver.release()
            if self._sink is not None:
                try:
                    self._sink.close(timeout=self.settings.tiled_write_timeout_s)
                except Exception as exc:
                    self.log.exception("closing the result sink failed")
                    self._fail_write(f"closing the result sink failed: {type(exc).__name__}: {exc}")
                backup = getattr(self._sink, "backup_path", None)
                if backup is not None:
                    self.log.warning(
                        "the result is NOT in Tiled: kept in the local backup %s", backup
                    )
                failure = getattr(self._sink, "write_failure", None)
                if failure:
                    # Neither Tiled nor the disk took it: held in memory for retry-upload.
                    self._before_write_failure = (self.status, self.reason)
                    self._fail_write(f"result not stored: {failure}")
                self.timeline["final_written"] = time.monotonic()
                sink_steps = getattr(self._sink, "timeline", {})
                self.timeline.update({f"sink_{k}": v for k, v in sink_steps.items()})
        if self.warnings:
            self.log.warning("warnings: %s", "; ".join(self.warnings))
        self.log.info(
            "%s (%s) after %d iterations (data mismatch %s)",
            self.status,
            self.reason,
            self.iteration,
            self.last_error,
        )

    def stored_later(self) -> None:
        """The result a failed write left in memory reached Tiled (retry-upload, or Tiled
        came back): the run is what its data said again, and its reason says how."""
        before = self._before_write_failure
        if before is None:
            return
        status, reason = before
        self._before_write_failure = None
        self.status = status
        self.reason = f"{reason} (stored in Tiled later, by retry-upload)"
        self.error = None
        self.log.info("result stored in Tiled after all: %s", self.status)

    def _fail_write(self, what: str) -> None:
        """The result could not be stored: the run is failed, whatever the data said."""
        if self.status is not RunStatus.FAILED:
            self.reason = f"{what} (the data said {self.status}: {self.reason})"
        self.error = self.error or what
        self.status = RunStatus.FAILED

    def _release(self) -> None:
        """The final write is done: drop what holds frames and solver state (the solver's
        ring, the assembler's frames, frames not yet fed, the sink and its buffers) and
        keep light copies for :meth:`summary`. On CuPy the solver's arrays live in the
        solver process and go with ``release``; here it is host memory of the RunEngine's
        process, which a beamline never restarts between scans."""
        released = self._released
        solver = self._solver
        if solver is not None:
            released["positions"] = solver.n_positions
            released["passes"] = list(solver.pass_ends)
        assembler = self._assembler
        if assembler is not None:
            counters = {f"assembler_{k}": v for k, v in assembler.counters.snapshot().items()}
            released["assembler"] = {**counters, **assembler.unpaired_report()}
            released["pairing"] = assembler.pairing_report()
        sink = self._sink
        if sink is not None:
            released["container_path"] = getattr(sink, "container_path", None)
            released["backup_path"] = getattr(sink, "backup_path", None)
            released["write_failure"] = getattr(sink, "write_failure", None)
        if self._nn is not None:
            released["nn"] = self._nn.counters.snapshot()
        self._solver = None
        self._assembler = None
        self._sink = None
        self._pending_frames = []
        self._early_frames = []
        self._early_samples = []
        self._last_odd = None
        # A header_detail=all series header carries the flatfield and pixel mask.
        self._series_header = {
            k: v
            for k, v in self._series_header.items()
            if not isinstance(v, np.ndarray | bytes | bytearray | memoryview)
        }

    def drop_pictures(self) -> None:
        """Drop the last snapshot and NN mosaic kept for status pages (the engine keeps
        them for its newest finished run only; the result itself is in Tiled)."""
        if not self._done.is_set():
            return
        self.latest_snapshot = None
        self._nn = None
