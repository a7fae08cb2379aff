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

The session's parts have modules of their own: what the run has been told and
whether its input is over (:mod:`.run_inputs`), the frame quarantine
(:mod:`.frame_gate`), its end of the solver process (:mod:`.solver_link`), the
run's states and the verdict from its data (:mod:`.run_status`), what it writes
and how it ends (:mod:`.session_results`) and how it looks from outside
(:mod:`.session_report`). This module holds the thread that drives them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.errors import LivePtychoError, NotPtychographyError
from hxn_liveptycho.nn.branch import NNBranch, start_nn_branch
from hxn_liveptycho.nn.process import NNProcessBranch, WorkerPool
from hxn_liveptycho.pipeline.assemble import Assembler, PairedFrame
from hxn_liveptycho.pipeline.frame_gate import FrameGate
from hxn_liveptycho.pipeline.geometry import CanvasGeometry
from hxn_liveptycho.pipeline.preprocess import beam_center, crop_window, to_amplitudes
from hxn_liveptycho.pipeline.result_sink import ResultSink, SinkFactory
from hxn_liveptycho.pipeline.resume import ResumedRun
from hxn_liveptycho.pipeline.run_inputs import RunInputs
from hxn_liveptycho.pipeline.run_status import (
    FINAL_STATUSES,
    SUPERSEDED,
    RunStatus,
    missing_data,
    verdict,
)
from hxn_liveptycho.pipeline.session_results import SessionResults
from hxn_liveptycho.pipeline.solver_link import SolverLink
from hxn_liveptycho.recon.placement import Placement
from hxn_liveptycho.recon.worker import SolverWorker
from hxn_liveptycho.store.checkpoint import (
    Checkpoint,
    CheckpointStore,
    CheckpointWriter,
    config_hash,
    light_header,
)
from hxn_liveptycho.store.diffraction import Diffraction
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

__all__ = [
    "FINAL_STATUSES",
    "SUPERSEDED",
    "ResultSink",
    "RunSession",
    "RunStatus",
    "SinkFactory",
]

#: Added to a scan's expected duration (points x dwell) for the default bound on how long
#: a run without its ``stop`` may go without any input (``Settings.run_idle_timeout_s``):
#: long enough for a paused RunEngine or a slow baseline read, short enough that a lost
#: ``stop`` does not hold the run (and its memory) for the rest of the shift.
IDLE_MARGIN_S = 600.0


class _RunLogger(logging.LoggerAdapter):
    """Prefixes every line with the run's scan id and uid, like ophyd-async's device logs."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra: Any = self.extra
        return f"[scan {extra['scan_id']} {extra['uid'][:8]}] {msg}", kwargs


class RunSession(SessionResults):
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
        probe_seed: Callable[[int], np.ndarray | None] | None = None,
        resume: Checkpoint | None = None,
        stored_frames: Callable[[], Diffraction | None] | None = None,
    ) -> None:
        """``resume``: the checkpoint of a run taken up again after a restart (its saved
        documents are taken again first; see :mod:`.resume`), and ``stored_frames`` what
        reads back the frames the dead process stored."""
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
        self._inputs = RunInputs(self.start_doc, self.overrides)
        self._series_header: dict[str, Any] = {}
        self._early_frames: list[tuple[int, np.ndarray]] = []
        self._early_samples: list[tuple[dict[str, np.ndarray], int]] = []
        self._cancel = threading.Event()
        self._gate = FrameGate(
            self.counters, keep=self._keep, withdraw=self._withdraw, log=self.log
        )
        #: Light copies kept once the heavy state is released (see :meth:`_release`).
        self._released: dict[str, Any] = {}
        #: Status and reason before a write that neither Tiled nor the disk took.
        self._before_write_failure: tuple[RunStatus, str] | None = None
        self._done = threading.Event()
        self._assembler: Assembler | None = None
        self._worker = solver_worker
        self._nn_pool = nn_pool
        self._solver = SolverLink(
            solver_worker,
            uid=self.uid,
            settings=settings,
            notify=lambda: self._inbox.put(("solver", None)),
            log=self.log,
            probe_seed=probe_seed,
        )
        self._told_final_due = False
        self.placement: Placement | None = None
        #: time.monotonic() of the run's milestones (first frame, first snapshot, data
        #: complete, final state, final write), for status pages and the live-path benchmark.
        self.timeline: dict[str, float] = {}
        self._nn: NNBranch | NNProcessBranch | None = None
        self._nn_has_probe = False  # the NN branch was given the solver's starting probe
        self._geometry: CanvasGeometry | None = None
        self._window: tuple[slice, slice] | None = None
        self._pending_frames: list[PairedFrame] = []
        #: Checkpoints of the solver's state, with the live snapshots (see store.checkpoint).
        self._checkpoints = CheckpointWriter(
            CheckpointStore.at(settings.checkpoint_dir, settings.data_dir), self.uid
        )
        self._last_checkpoint = -float("inf")
        self._resumed: ResumedRun | None = None
        #: Frames read back for a resumed run, fed to the solver before any new one.
        self._read_back: Diffraction | None = None
        if resume is not None:
            self._resumed = ResumedRun(
                resume, timeout_s=settings.resume_timeout_s, stored_frames=stored_frames
            )
            self.iteration = resume.iteration
            for name, doc in self._resumed.saved_documents():
                self._inbox.put(("doc", (name, doc)))
            self._inbox.put(("resumed", None))
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
        if self._inputs.end_without_stop(reason):
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
        return self._inputs.open and not self._done.is_set()

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
            self._end_checkpoints()
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
                self._solver.cancel()
                reason = self.error or "cancelled"
                self._finish(RunStatus.ABORTED, reason, error=reason)
                return
            self._check_idle()
            if self._inputs.forced_end is not None and self.config is None:
                self._try_configure(final=True)
                if self.status in FINAL_STATUSES:
                    return
            self._feed_solver()
            self._pump_solver()
            self._solver.check()
            self._share_probe()
            if self._inputs.complete(self.settings.stream_timeout_s) and self._ready_to_finish():
                status, reason = self._verdict()
                self._finish(status, reason, error=self._solver.failure)
                return

    def _share_probe(self) -> None:
        """Once the solver's run opens with its starting probe (the estimate, a file's, a
        series seed or a checkpoint's), the NN branch blends its next patches with it; until
        then it uses its own guess, so its first mosaic never waits for the estimate."""
        probe = self._solver.starting_probe
        if self._nn is None or probe is None or self._nn_has_probe:
            return
        self._nn_has_probe = True
        self._nn.use_probe(probe)
        self.counters.add("nn_probe_from_solver", 1)

    def _check_idle(self) -> None:
        """A run whose ``stop`` is lost would otherwise never end (nor free its memory)."""
        resumed = None if self._resumed is None else self._resumed.given_up()
        if resumed is not None and self._inputs.end_without_stop(resumed):
            self._inputs.end_seen()
            self.log.warning("resumed after a restart, but %s: ending it", resumed)
        given_up = self._inputs.give_up_if_idle(self.idle_bound_s())
        if given_up is not None:
            self.log.warning("%s: ending it with what was received", given_up)

    def _verdict(self) -> tuple[RunStatus, str]:
        """The terminal state the data support, and why; oddities go to :attr:`warnings`."""
        if self._solver.failure is not None:
            return RunStatus.FAILED, self._solver.failure
        config = self.config
        counters = self._all_counters()
        if self._resumed is not None:
            ended = self._resumed.verdict(counters.get("frames_used", 0), self._inputs.forced_end)
            if ended is not None:
                return ended
            counters = self._resumed.counted_with_before(counters)
            self.warnings.append(self._resumed.warning())
        missing, warnings = missing_data(
            counters,
            shape_change=self._gate.shape_change(self.counters.get("frames_received")),
            expected_points=None if config is None else config.num_points,
            detector_armed=self._inputs.streams_seen["eiger"],
        )
        self.warnings.extend(warnings)
        return verdict(
            forced_end=self._inputs.forced_end,
            stop_doc=self._inputs.stop_doc,
            missing=missing,
        )

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
            self._inputs.last_input = time.monotonic()
        if self._resumed is not None:
            self._resumed.took(kind)
        if kind == "doc":
            name, doc = payload
            self.counters.add("documents")
            self._on_document(name, doc)
        elif kind == "frame":
            index, data = payload
            self.counters.add("frames_received")
            self.timeline.setdefault("first_frame", time.monotonic())
            if self._gate.admit(index, data):
                self._keep(index, data)
        elif kind == "samples":
            samples, starting = payload
            if self._assembler is None:
                self._early_samples.append((samples, starting))
            else:
                self._assembler.add_samples(samples, starting)
        elif kind == "series_start":
            source, header = payload
            self._inputs.series_started(source)
            if source == "eiger":
                self._series_header = header
                if self._assembler is not None:
                    self._assembler.frame_time_s = header.get("frame_time")
        elif kind == "series_end":
            self._inputs.series_ended(payload)
            if payload == "panda" and self._assembler is not None:
                self._assembler.positions_ended()
        elif kind == "cancel":
            self.error = str(payload)
        elif kind == "end":
            self._inputs.end_seen()
            self.log.warning("%s: ending it with what was received", payload)
        elif kind == "resumed" and self._resumed is not None:
            self._resumed.replayed()
            self.log.info("resumed after a restart: %s", self._resumed.checkpoint.describe())
        # "solver": the solver process answered; _pump_solver reads what it sent

    def _keep(self, index: int, data: np.ndarray) -> None:
        data = np.asarray(data)  # a receiver's DetectorWindow: plain pixels from here on
        if self._assembler is None:
            self._early_frames.append((index, data))
        else:
            self._assembler.add_frame(index, data)

    def _withdraw(self, index: int) -> bool:
        """Take back an admitted frame that is not yet fed (False if it is too late)."""
        for i, (early_index, _) in enumerate(self._early_frames):
            if early_index == index:
                del self._early_frames[i]
                return True
        return self._assembler is not None and self._assembler.discard_frame(index)

    def _on_document(self, name: str, doc: Mapping[str, Any]) -> None:
        self._inputs.take_document(name, doc)
        if name == "stop":
            self.log.info("run stopped (%s); finishing the reconstruction", doc.get("exit_status"))
        if self.status in FINAL_STATUSES:
            return
        if self.config is None and (name in ("event_page", "stop") or self._early_frames):
            self._try_configure(final=name == "stop")

    def _try_configure(self, *, final: bool) -> None:
        try:
            config = self._inputs.scan_config(final=final)
        except NotPtychographyError as exc:
            if self.start_doc.get(self.settings.metadata_flag) is not True:
                # Chosen by its plan name only: not a ptychography run, not a failure.
                self._finish(RunStatus.SKIPPED, f"not a ptychography run: {exc}")
                return
            raise LivePtychoError(f"cannot configure the reconstruction: {exc}") from exc
        if config is not None:
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
        if self._resumed is not None:
            self._restore(config, self._geometry)
        self._assembler = Assembler(
            config.encoder, expected_frames=config.num_points, dwell_s=config.dwell_s, log=self.log
        )
        self._assembler.frame_time_s = self._series_header.get("frame_time")
        for samples, starting in self._early_samples:
            self._assembler.add_samples(samples, starting)
        for index, data in self._early_frames:
            self._assembler.add_frame(index, data)
        if self._inputs.streams_seen["panda"] and not self._inputs.streams_open["panda"]:
            self._assembler.positions_ended()
        self._early_frames.clear()
        self._early_samples.clear()
        self._sink = self._sink_factory()
        self._sink.on_stored_later = self.stored_later
        self._sink.open(config, self._metadata(RunStatus.RUNNING))
        if self.latest_snapshot is not None:  # resumed: the checkpoint's picture at once
            self._sink.live(self.latest_snapshot)
        if self._seeds_solver():
            self.counters.add("nn_seeds_sent", 0)  # in the run's counters from its start
            self.counters.add("nn_seeds_applied", 0)
        if config.mode != "iterative":
            self._nn = start_nn_branch(
                config,
                self.settings,
                self._geometry,
                self._publish_nn if self._seeds_solver() else self._sink.nn,
                self.log,
                device_id=self.placement.nn or 0,
                pool=self._nn_pool,
            )
        self.status = RunStatus.RUNNING
        self.log.info(
            "configured: %s, %.3f keV, z = %.3f m, pixel %.2f nm, canvas %s",
            config.grid.describe(),
            config.energy_kev,
            config.distance_m,
            config.pixel_size_m * 1e9,
            self._geometry.canvas_shape,
        )

    def _seeds_solver(self) -> bool:
        """Whether the NN mosaic seeds the iterative object: both branches run, and
        ``nn.seed_solver`` is on."""
        return self.config is not None and self.config.mode == "both" and self.config.nn.seed_solver

    def _publish_nn(self, snapshot: Mapping[str, Any]) -> None:
        """The NN branch's mosaic to the sink, then to the solver as a seed (on the branch's
        thread: :meth:`SolverLink.seed` only posts a message, and only for a newer mosaic)."""
        if self._sink is not None:
            self._sink.nn(snapshot)
        if self.config is None:
            return
        try:
            sent = self._solver.seed(snapshot, mature_passes=self.config.nn.seed_mature_passes)
        except Exception:  # a seed is a help, never the NN branch's failure
            self.log.exception("the NN mosaic could not be sent to the solver as a seed")
            return
        if sent:
            self.counters.add("nn_seeds_sent")

    def _count_seeds_applied(self) -> None:
        """Bring ``nn_seeds_applied`` up to what the solver's latest state said."""
        if self._seeds_solver():
            applied = self._solver.seeds_applied - self.counters.get("nn_seeds_applied")
            if applied > 0:
                self.counters.add("nn_seeds_applied", applied)

    def _feed_solver(self) -> None:
        if self._assembler is None or self.config is None or self._geometry is None:
            return
        if self._read_back is not None:
            self._feed_read_back(self.config, self._geometry)
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
        if self.config.mode != "nn" and self._solver.failure is None:
            self._solver.add(
                amplitudes,
                positions_px,
                config=self.config,
                canvas_shape=self._geometry.canvas_shape,
            )
        if self._sink is not None:
            self._sink.diffraction(indices, amplitudes, self._geometry.to_metres(positions_um))
        self.counters.add("frames_used", len(indices))
        self._pending_frames.clear()

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
        solver = self._solver.remote
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
            self._checkpoint(answered)
        self._count_seeds_applied()
        self._solver.request_live(final_due=self._tell_final_due)

    def _ready_to_finish(self) -> bool:
        """All frames are with the solver and it has sent its final state after the
        post-scan passes (``recon.iterations`` of them, counted from here)."""
        if self.config is None:
            return True
        if self._assembler is not None:
            self._pending_frames.extend(self._assembler.pop_ready())
            if self._pending_frames:
                return False
        if not self._solver.fed:
            return True
        if self._solver.finish_sent_at is None:
            self.timeline["data_complete"] = time.monotonic()
            self._solver.finish(self.config.recon.iterations)
            self._tell_final_due()
        done = self._solver.final_state_in(self.config.recon.iterations)
        if done:
            self._count_seeds_applied()
        return done

    # ---- checkpoints and resuming (see docs/resume.md) ----------------------------------
    def _settings_hash(self) -> str:
        assert self.config is not None
        return config_hash(self.config.model_dump(mode="json"))

    def _checkpoint(self, state: Mapping[str, Any]) -> None:
        """Hand the solver's state just answered to the checkpoint writer, at most every
        ``checkpoint_interval_s``: the snapshot's host arrays, no further GPU work."""
        interval = self.settings.checkpoint_interval_s
        if interval is None or self.config is None or state.get("object") is None:
            return
        now = time.monotonic()
        if now - self._last_checkpoint < interval:
            return
        self._last_checkpoint = now
        probe = state.get("probe_modes")
        if probe is None:
            probe = np.asarray(state["probe"])[None]
        documents = [("start", self.start_doc), *self._inputs.kept_documents]
        if self._inputs.stop_doc is not None:
            documents.append(("stop", self._inputs.stop_doc))
        # A resumed run counts the frames only its checkpoint's state holds too.
        counted = self.counters.snapshot()
        if self._resumed is not None:
            counted = self._resumed.counted_with_before(counted)
        remote = self._solver.remote
        window = self._window
        self._checkpoints.submit(
            Checkpoint(
                uid=self.uid,
                documents=[(name, dict(doc)) for name, doc in documents],
                overrides=self.overrides,
                settings_hash=self._settings_hash(),
                iteration=int(state.get("iteration", self.iteration)),
                object=np.asarray(state["object"]),
                probe=np.asarray(probe),
                positions_px=np.asarray(state.get("positions_px", np.zeros((0, 2)))),
                error_history=np.asarray([] if remote is None else remote.error_history),
                frames_received=counted.get("frames_received", 0),
                frames_used=counted.get("frames_used", 0),
                series_header=light_header(self._series_header),
                window=None
                if window is None
                else (window[0].start, window[0].stop, window[1].start, window[1].stop),
                streams_open=dict(self._inputs.streams_open),
                streams_seen=dict(self._inputs.streams_seen),
                container_path=getattr(self._sink, "container_path", None),
            )
        )

    def _restore(self, config: ScanConfig, geometry: CanvasGeometry) -> None:
        """A resumed run, configured again: the detector window, the series header and the
        open streams as the checkpoint had them, the solver to start from its state, and
        that state as the run's picture until the solver sends a newer one."""
        assert self._resumed is not None
        checkpoint = self._resumed.checkpoint
        for key, value in checkpoint.series_header.items():
            self._series_header.setdefault(key, value)
        if checkpoint.window is not None:
            y0, y1, x0, x1 = checkpoint.window
            self._window = (slice(y0, y1), slice(x0, x1))
        for source, was_open in checkpoint.streams_open.items():
            if was_open and not self._inputs.streams_seen.get(source):
                self._inputs.series_started(source)
        start = self._resumed.solver_start(
            geometry.canvas_shape, geometry.window, self._settings_hash()
        )
        if start is None:
            self.log.warning("the solver starts afresh: %s", self._resumed.refused)
        self._solver.start_state = start
        self.latest_snapshot = self._resumed.snapshot(geometry)
        self._read_back = self._resumed.read_stored_frames(geometry.window, self.log)

    def _feed_read_back(self, config: ScanConfig, geometry: CanvasGeometry) -> None:
        """The frames read back from the dead process's container go to the solver (and
        the new container) as they were stored: cropped amplitudes, positions in metres."""
        frames, self._read_back = self._read_back, None
        assert frames is not None
        amplitudes = np.ascontiguousarray(frames.amplitude, dtype=np.float32)
        positions_px = geometry.to_pixels(frames.positions_m * 1e6)
        if self._nn is not None:
            self._nn.submit(amplitudes, positions_px)
        if config.mode != "nn" and self._solver.failure is None:
            self._solver.add(
                amplitudes, positions_px, config=config, canvas_shape=geometry.canvas_shape
            )
        if self._sink is not None:
            self._sink.diffraction(frames.indices, amplitudes, frames.positions_m)
        self.counters.add("frames_used", len(frames.indices))
        self.counters.add("frames_read_back", len(frames.indices))

    def _end_checkpoints(self) -> None:
        """The run has ended: its checkpoint goes once its result is stored (in Tiled or
        the local backup); a result held only in memory keeps it, for the next start."""
        try:
            if self._before_write_failure is None:
                if self._checkpoints.discard():
                    self.log.info("checkpoint removed: the result is stored")
            else:
                self.log.warning("the result is not stored: its checkpoint is kept")
            self._checkpoints.close()
        except Exception:
            self.log.exception("ending the run's checkpoints failed")
