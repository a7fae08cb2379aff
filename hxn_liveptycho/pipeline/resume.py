"""A run taken up again from its checkpoint after a restart (see docs/resume.md).

Why apart: a resumed run is an ordinary session with three differences, kept here
so that the session's thread reads the same for every run: its solver starts from
the checkpoint's object, probe and iteration instead of a guess; it gives up, and
writes the checkpoint's state as an ``incomplete`` result, when no more of its data
come within ``resume_timeout_s``; it reads back the frames the dead process had
already stored in its container's ``diffraction/`` and iterates on them again with
the new ones; and its verdict and metadata say that it was resumed, from which
iteration, and what was lost (the frames the dead process still held in memory:
only their reconstruction, the checkpoint's object, is kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

from hxn_liveptycho.pipeline.geometry import CanvasGeometry
from hxn_liveptycho.pipeline.run_status import RunStatus
from hxn_liveptycho.store.checkpoint import Checkpoint
from hxn_liveptycho.store.diffraction import Diffraction

__all__ = ["ResumedRun"]

#: Inputs that show the run is still taking data after the restart.
NEW_INPUT = frozenset({"doc", "frame", "samples", "series_start", "series_end"})


class ResumedRun:
    """The checkpoint a session resumes from, and what it has seen since the restart."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        timeout_s: float,
        stored_frames: Callable[[], Diffraction | None] | None = None,
    ) -> None:
        """``stored_frames`` reads back the frames the dead process stored (its container's
        ``diffraction/``); None when there is no store to read them from."""
        self.checkpoint = checkpoint
        self.timeout_s = timeout_s
        self._stored_frames = stored_frames
        #: Frames read back from the dead process's container.
        self.recovered = 0
        #: time.monotonic() once the saved documents were taken again (None before).
        self._replayed_at: float | None = None
        #: Inputs (documents, frames, samples, series messages) since the restart.
        self.new_inputs = 0
        #: Whether the solver started from the checkpoint's state (False: see ``refused``).
        self.restored = False
        #: Why the checkpoint's state could not go onto the solver (None while it could).
        self.refused: str | None = None

    def saved_documents(self) -> list[tuple[str, dict[str, Any]]]:
        """The documents after the ``start``, as the run first received them."""
        return list(self.checkpoint.documents[1:])

    def replayed(self) -> None:
        """The saved documents are taken again: inputs from here are new."""
        self._replayed_at = time.monotonic()

    def took(self, kind: str) -> None:
        if self._replayed_at is not None and kind in NEW_INPUT:
            self.new_inputs += 1

    def given_up(self) -> str | None:
        """Why the run ends without more data (None while it may still come)."""
        if self._replayed_at is None or self.new_inputs:
            return None
        if time.monotonic() - self._replayed_at <= self.timeout_s:
            return None
        return f"no more data of the run came within {self.timeout_s:g} s of the restart"

    def solver_start(
        self, canvas_shape: tuple[int, int], window: int, settings_hash: str
    ) -> dict[str, Any] | None:
        """What the solver starts from: the checkpoint's probe modes, object, iteration and
        error history, when the run is configured as it was (same configuration hash,
        canvas and window); None otherwise (``refused`` says why, the run then starts
        from a guess and the checkpoint's state is only its last picture)."""
        cp = self.checkpoint
        if cp.settings_hash != settings_hash:
            self.refused = "the run's configuration differs from the checkpoint's"
        elif tuple(cp.object.shape) != tuple(canvas_shape) or cp.probe.shape[-1] != window:
            self.refused = (
                f"the checkpoint's object {cp.object.shape} and probe {cp.probe.shape} do not "
                f"fit the canvas {tuple(canvas_shape)} and window {window}"
            )
        if self.refused is not None:
            return None
        self.restored = True
        return {
            "probe": cp.probe,
            "object_init": cp.object,
            "iteration": cp.iteration,
            "error_history": [float(e) for e in cp.error_history],
        }

    def read_stored_frames(self, window: int, log: Any) -> Diffraction | None:
        """The frames the dead process stored, when they fit the run's window (once; None
        when there are none, or they cannot be read: the run goes on without them)."""
        read, self._stored_frames = self._stored_frames, None
        if read is None:
            return None
        try:
            frames = read()
        except Exception as exc:
            log.warning("the frames stored before the restart could not be read: %s", exc)
            return None
        if frames is None:
            return None
        if frames.amplitude.shape[1:] != (window, window):
            log.warning(
                "the frames stored before the restart are %s, not the run's %d-pixel window: "
                "left out",
                frames.amplitude.shape[1:],
                window,
            )
            return None
        self.recovered = len(frames.indices)
        log.info("%d frames stored before the restart are read back", self.recovered)
        return frames

    def snapshot(self, geometry: CanvasGeometry | None) -> dict[str, Any]:
        """The checkpoint's state as a snapshot for the result sink: what the run writes if
        it ends before its solver has anything newer."""
        cp = self.checkpoint
        snap: dict[str, Any] = {
            "object": cp.object,
            "probe": cp.probe[0],
            "iteration": cp.iteration,
            "error_history": np.asarray(cp.error_history, dtype=np.float64),
        }
        if cp.probe.shape[0] > 1:
            snap["probe_modes"] = cp.probe
        if len(cp.error_history):
            snap["error"] = float(cp.error_history[-1])
        if geometry is not None:
            snap["positions_m"] = geometry.pixels_to_metres(cp.positions_px)
        return snap

    def verdict(self, new_frames: int, forced_end: str | None) -> tuple[RunStatus, str] | None:
        """A resumed run that used no frame after the restart (none arrived, none could be
        read back) is ``incomplete``, whatever its ``stop`` says: its result is the
        checkpoint's state. None: the ordinary verdict decides (with
        :meth:`counted_with_before` and :meth:`warning`)."""
        if new_frames > 0:
            return None
        cp = self.checkpoint
        why = forced_end or "no frame of the run came after the restart"
        return (
            RunStatus.INCOMPLETE,
            f"serve restarted mid-run and {why}: the checkpoint's object and probe "
            f"(iteration {cp.iteration}, {cp.frames_used} frames) are the result",
        )

    def counted_with_before(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The run's counters with the frames only the checkpoint's state holds (those not
        read back) added, for the verdict's count of the scan's points."""
        out = dict(counters)
        for key in ("frames_received", "frames_used"):
            out[key] = out.get(key, 0) + max(0, getattr(self.checkpoint, key) - self.recovered)
        return out

    def warning(self) -> str:
        cp = self.checkpoint
        only_state = max(0, cp.frames_used - self.recovered)
        note = (
            f"resumed after a restart from the checkpoint at iteration {cp.iteration}: "
            f"{self.recovered} frames stored before it were read back, {only_state} are in "
            "the object through the checkpoint's state only (frames the stopped process "
            "received after it are lost)"
        )
        if self.refused is not None:
            note += f"; the solver started afresh: {self.refused}"
        return note

    def metadata(self) -> dict[str, Any]:
        """The container's ``resumed`` entry."""
        cp = self.checkpoint
        return {
            "from_iteration": cp.iteration,
            "frames_before_restart": cp.frames_used,
            "frames_read_back": self.recovered,
            "checkpoint_saved_at": datetime.fromtimestamp(cp.saved_at, UTC).isoformat(),
            "checkpoint_writer": cp.writer,
            "previous_container": cp.container_path,
            "state_restored": self.restored,
        }
