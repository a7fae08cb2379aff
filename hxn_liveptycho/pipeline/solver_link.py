"""SolverLink: a session's end of its run in the engine's solver process.

Why: the solver iterates in its own process (:mod:`hxn_liveptycho.recon.worker`);
the session only feeds it, and decides when to ask for a live snapshot, when
to tell it the scan ended and how long to wait for its final state. Those
decisions are timing policy over the solver's pass rate, apart from what the
session does with the snapshots (the result sink's business).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.probe_start import ProbeStart
from hxn_liveptycho.recon.quality import QualitySettings
from hxn_liveptycho.recon.worker import RemoteSolver, SolverWorker

logger = logging.getLogger(__name__)

#: Seconds before the solver's final state in which no live snapshot is asked for.
FINAL_QUIET_S = 1.5
#: Least time the solver is given, after the scan's end, to send its final state (see
#: :meth:`SolverLink.final_state_bound_s`).
FINAL_STATE_MARGIN_S = 120.0


def pass_rate(pass_ends: Sequence[tuple[float, int]]) -> float | None:
    """Passes a second over the solver's last twenty; None before two passes have ended."""
    passes = pass_ends[-20:]
    if len(passes) < 2 or passes[-1][0] <= passes[0][0]:
        return None
    return (len(passes) - 1) / (passes[-1][0] - passes[0][0])


class SolverLink:
    """Opens the run on the solver process with its first frames, feeds it, paces its live
    snapshots and waits (boundedly) for its final state. Used from the session's thread."""

    def __init__(
        self,
        worker: SolverWorker,
        *,
        uid: str,
        settings: Settings,
        notify: Callable[[], None],
        log: logging.Logger | logging.LoggerAdapter[Any] = logger,
        probe_seed: Callable[[int], np.ndarray | None] | None = None,
    ) -> None:
        self._worker = worker
        #: A starting probe for an n-pixel window from elsewhere (the series' previous
        #: projection), tried before the guess from the data; None: the guess.
        self._probe_seed = probe_seed
        self._uid = uid
        self._settings = settings
        self._notify = notify
        self.log = log
        #: The run on the solver process; None before the first frames and once dropped.
        self.remote: RemoteSolver | None = None
        #: Why the solver can no longer be used (None while it can): the run goes on
        #: without it and ends failed, with this reason.
        self.failure: str | None = None
        #: time.monotonic() when the solver was told the scan ended (None before).
        self.finish_sent_at: float | None = None
        self._final_iteration: int | None = None
        self._last_live = 0.0
        #: What :attr:`n_positions` and :attr:`pass_ends` say once the remote is dropped.
        self._dropped_positions = 0
        self._dropped_passes: list[tuple[float, int]] = []
        self._dropped_seeds = 0
        #: Mosaic frames behind the last seed sent (a mosaic no newer is not sent again).
        self._seeded_frames = 0
        #: Frames held until the starting probe can be chosen (an estimate waits for its
        #: frames), and what the run opens with once it can: (config, canvas, n) or None.
        self._start = ProbeStart(log=log)
        self._waiting: tuple[ScanConfig, tuple[int, int], int] | None = None
        #: A resumed run's state to start the solver from instead of a guess (``probe``,
        #: ``object_init``, ``iteration``, ``error_history``: see pipeline.resume).
        self.start_state: Mapping[str, Any] | None = None
        #: The probe the solver's run opened with (None until it opens): the NN branch
        #: blends its patches with it.
        self.starting_probe: np.ndarray | None = None

    @property
    def quality(self) -> QualitySettings:
        """The quality maps the solver sends with each snapshot (the container records it:
        what ``constrained`` was decided on, and which maps ``live/`` is made ahead with)."""
        return self._settings.live_quality

    @property
    def fed(self) -> bool:
        """Whether the solver holds frames and is usable, so its final state is worth a wait."""
        opened = self.remote is not None and self.remote.added > 0
        return (opened or self._start.held > 0) and self.failure is None

    @property
    def n_positions(self) -> int:
        return self._dropped_positions if self.remote is None else self.remote.n_positions

    @property
    def pass_ends(self) -> list[tuple[float, int]]:
        """(time.monotonic() at its end, positions covered) of every solver pass so far."""
        source = self._dropped_passes if self.remote is None else self.remote.pass_ends
        return list(source)

    def add(
        self,
        amplitudes: np.ndarray,
        positions_px: np.ndarray,
        *,
        config: ScanConfig,
        canvas_shape: tuple[int, int],
        final: bool = False,
    ) -> None:
        """Hand frames to the solver; the first ones open the run with its starting probe
        (:mod:`~hxn_liveptycho.pipeline.probe_start`: an estimate holds the frames until it
        has enough, or ``final`` says no more come)."""
        if self.remote is None:
            resumed = dict(self.start_state or {})
            probe = resumed.pop("probe", None)
            if probe is None and self._probe_seed is not None:
                probe = self._probe_seed(amplitudes.shape[-1])
            started = self._start.take(amplitudes, positions_px, config, probe, final=final)
            if started is None:
                self._waiting = (config, canvas_shape, int(amplitudes.shape[-1]))
                return
            probe, amplitudes, positions_px = started
            self._waiting = None
            self.starting_probe = np.asarray(probe)
            self.remote = self._worker.open_run(
                self._uid,
                probe=probe,
                canvas_shape=canvas_shape,
                params=config.recon,
                expected_positions=config.num_points,
                notify=self._notify,
                quality=self.quality,
                pixel_size_m=config.pixel_size_m,
                **resumed,
            )
            backend = self.remote.backend
            self.log.info("solver (%s) started with %d frames", backend, len(amplitudes))
        self.remote.add(amplitudes, positions_px)

    def seed(self, mosaic: Mapping[str, Any], *, mature_passes: int) -> bool:
        """Offer the NN branch's mosaic snapshot (``object``, ``coverage``, ``frames``, on the
        solver's canvas) as the object where the solver is still young; True when sent.

        Called on the NN branch's thread, so it only posts a message. Nothing is sent
        before the solver's run is open, once the scan's end was sent (the final passes
        depend on the data alone), or when the mosaic holds no frame more than the last
        one sent."""
        remote = self.remote
        if remote is None or self.failure is not None or self.finish_sent_at is not None:
            return False
        frames = int(mosaic.get("frames") or 0)
        if frames <= self._seeded_frames or mosaic.get("object") is None:
            return False
        if not remote.seed(mosaic["object"], mosaic["coverage"], mature_passes=mature_passes):
            return False
        self._seeded_frames = frames
        return True

    @property
    def seeds_applied(self) -> int:
        """Seeds the solver took into its object, as its latest state said."""
        return self._dropped_seeds if self.remote is None else self.remote.seeds_applied

    def _open_waiting(self, *, final: bool) -> None:
        """Open the run on the frames held for its probe once the probe is known (with
        ``final``, now: no more frames come)."""
        if self.remote is None and self._waiting is not None and self.failure is None:
            config, canvas, n = self._waiting
            none = np.empty((0, n, n), np.float32), np.empty((0, 2))
            self.add(*none, config=config, canvas_shape=canvas, final=final)

    def check(self) -> None:
        """Open the run once its probe estimate ended between frames; note a solver process
        that failed: the run goes on without it."""
        self._open_waiting(final=False)
        if self.remote is not None and self.remote.failure and self.failure is None:
            # The run goes on without a solver: its frames are still kept, and it ends
            # failed, with the reason, when the data are complete.
            self.failure = f"solver: {self.remote.failure}"
            self.log.error("%s; the run's frames are still kept", self.failure)

    def request_live(self, final_due: Callable[[], None]) -> None:
        """Ask for the next live snapshot when ``live_interval_s`` has passed, unless the
        final state is due within :data:`FINAL_QUIET_S` (a live write started now would
        only delay it in the sink's queue): then ``final_due`` is called instead."""
        remote = self.remote
        if remote is None or remote.added == 0:
            return
        if self._final_imminent(remote):
            final_due()
            return
        now = time.monotonic()
        if now - self._last_live >= self._settings.live_interval_s and remote.request_snapshot():
            self._last_live = now

    def _final_imminent(self, remote: RemoteSolver) -> bool:
        if self._final_iteration is None:
            return False
        rate = pass_rate(remote.pass_ends)
        if rate is None:
            return False
        return (self._final_iteration - remote.iteration) / rate < FINAL_QUIET_S

    def finish(self, iterations: int) -> None:
        """The scan's frames are all in: ``iterations`` post-scan passes, then the final state."""
        self._open_waiting(final=True)  # the scan ended before the probe's frames were in
        assert self.remote is not None
        self.finish_sent_at = time.monotonic()
        self._final_iteration = self.remote.iteration + iterations
        self.remote.finish(iterations)

    def final_state_in(self, iterations: int) -> bool:
        """Whether the final state came, or will not come in time: a solver process that is
        alive but stuck would otherwise hold the run open (and wait() with it) for ever;
        its last snapshot is then what gets written."""
        assert self.remote is not None and self.finish_sent_at is not None
        if self.remote.done.is_set():
            return True
        bound = self.final_state_bound_s(iterations)
        if time.monotonic() - self.finish_sent_at > bound:
            self.failure = (
                f"solver: no final state within {bound:.0f} s of the scan's end; "
                "its last snapshot is kept"
            )
            self.log.error("%s", self.failure)
            return True
        return False

    def final_state_bound_s(self, iterations: int) -> float:
        """How long the post-scan passes may take: :data:`FINAL_STATE_MARGIN_S` plus ten
        times what they should take at the solver's measured pass rate."""
        rate = pass_rate(self.pass_ends)
        expected = 0.0 if rate is None else iterations / rate
        return FINAL_STATE_MARGIN_S + 10.0 * expected

    def cancel(self) -> None:
        """Cancelled: the solver sends what it has after its current pass."""
        if self.remote is None or self.remote.done.is_set():
            return
        self.remote.cancel()
        if not self.remote.done.wait(self._settings.tiled_write_timeout_s):
            self.log.error("the solver did not answer the cancel; its last snapshot is kept")

    def release(self) -> None:
        """The final write is done: the solver process frees the run's state and ring."""
        if self.remote is not None:
            self.remote.release()

    def drop(self) -> None:
        """Forget the run's handle (its ring, its history), keeping its counts."""
        if self.remote is not None:
            self._dropped_positions = self.remote.n_positions
            self._dropped_passes = list(self.remote.pass_ends)
            self._dropped_seeds = self.remote.seeds_applied
        self.remote = None
