"""SessionResults: what a run delivers, and how it ends.

Why apart: the session's thread decides *when* a run ends (its data, a cancel, a
lost ``stop``); this decides *what is written* then: the solver's state as the
sink takes it, the final write with the run's terminal state and reason, a write
that neither Tiled nor the disk took (the run is failed until retry-upload
stores it), and the release of everything that holds frames once it is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.assemble import PairedFrame
from hxn_liveptycho.pipeline.frame_gate import FrameGate
from hxn_liveptycho.pipeline.result_sink import SinkFactory
from hxn_liveptycho.pipeline.run_status import RunStatus
from hxn_liveptycho.pipeline.session_report import SessionReport
from hxn_liveptycho.store.container import quality_metadata
from hxn_liveptycho.store.cxi_export import export_final


class SessionResults(SessionReport):
    """The results of a run. A base of ``RunSession``, which sets the state named here."""

    settings: Settings
    log: logging.LoggerAdapter[Any]
    latest_snapshot: Mapping[str, Any] | None
    _sink_factory: SinkFactory
    #: Status and reason before a write that neither Tiled nor the disk took.
    _before_write_failure: tuple[RunStatus, str] | None
    _gate: FrameGate
    _pending_frames: list[PairedFrame]
    _early_frames: list[tuple[int, np.ndarray]]
    _early_samples: list[tuple[dict[str, np.ndarray], int]]
    _series_header: dict[str, Any]
    _done: threading.Event
    _told_final_due: bool

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

    def _snapshot(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A solver state as the sink takes it: with the error history and positions in metres."""
        snap = {k: v for k, v in state.items() if k != "positions_px"}
        if self._solver.remote is not None:
            snap["error_history"] = np.asarray(self._solver.remote.error_history, dtype=np.float64)
        if self._geometry is not None and "positions_px" in state:
            snap["positions_m"] = self._geometry.pixels_to_metres(state["positions_px"])
        return snap

    def _final_snapshot(self) -> dict[str, Any]:
        """The solver's final state; its last live snapshot when the solver failed."""
        solver = self._solver.remote
        if solver is None:  # a resumed run that took no frame: its checkpoint's state
            return dict(self.latest_snapshot or {})
        if solver.final is not None and solver.final.get("object") is not None:
            self.timeline["final_state"] = time.monotonic()
            self.iteration = solver.iteration
            self.last_error = solver.last_error
            return self._snapshot(solver.final)
        return dict(self.latest_snapshot or {})

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
            # The final state's convergence flag with the run's metadata, as each live
            # write put the latest one there.
            final_metadata = {**self._metadata(status), **quality_metadata(snapshot)}
            self._sink.final(snapshot, final_metadata)
            self._export_cxi(snapshot, final_metadata)
        except Exception as exc:
            self.log.exception("final write failed")
            self._fail_write(f"final write failed: {type(exc).__name__}: {exc}")
        finally:
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

    def _export_cxi(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        """With ``cxi_export_dir`` set, the result also goes to a CXI file there (while the
        sink writes it to Tiled); a file that cannot be written is a warning and the counter
        ``cxi_export_failed``, and changes nothing else of the run."""
        directory = self.settings.cxi_export_dir
        if directory is None or snapshot.get("object") is None:
            return
        try:
            path = export_final(snapshot, metadata, directory, key=getattr(self._sink, "key", None))
        except Exception as exc:
            self.counters.add("cxi_export_failed")
            self.log.warning("the result's CXI file was not written in %s: %s", directory, exc)
            return
        self.counters.add("cxi_exported")
        self.log.info("result also written to %s", path)

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
        self._solver.drop()
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
        self._assembler = None
        self._sink = None
        self._pending_frames = []
        self._early_frames = []
        self._early_samples = []
        self._gate.release()
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
