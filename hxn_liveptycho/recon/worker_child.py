"""The solver process's own side: its loop over the pipe's messages and the open runs.

Spawned by :class:`~hxn_liveptycho.recon.worker.SolverWorker` (the parent side, with
the reasons for a process of its own): it resolves the array backend and the GPU
placement, compiles the kernels on a small synthetic scan, then iterates every open run
between messages, reading each run's frames from its
:class:`~hxn_liveptycho.recon.frame_ring.FrameRing` and sending progress, snapshots and
the final state back over the pipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from hxn_liveptycho.recon.frame_ring import FrameRingReader
from hxn_liveptycho.recon.live_resolution import LiveResolution
from hxn_liveptycho.recon.params import IterativeParams
from hxn_liveptycho.recon.placement import GpuPlacement, Placement
from hxn_liveptycho.recon.quality import QualitySettings
from hxn_liveptycho.recon.rank_hub import LiveRanks, RankedSolver, RankHub
from hxn_liveptycho.util.children import LogToParent

__all__ = ["WarmUp", "WorkerInfo", "child_main"]

logger = logging.getLogger(__name__)

#: Seconds between the child's progress messages (errors of the passes since the last one).
PROGRESS_INTERVAL_S = 0.05


@dataclass(frozen=True)
class WarmUp:
    """What to compile before the first run: the window edge and the solver parameters."""

    n: int
    params: IterativeParams
    positions: int = 64


@dataclass(frozen=True)
class WorkerInfo:
    """What the child found at start: its array module, its GPU, how long warming took."""

    backend: str
    placement: Placement
    device_name: str
    warm_s: float
    #: The process ids of the scan's ranks, rank 0 (this process) first; empty: one rank.
    rank_pids: tuple[int, ...] = ()


@dataclass
class _ChildRun:
    """One open run in the child: its solver, its ring, and what the parent asked of it."""

    solver: Any
    ring: FrameRingReader
    errors_sent: int = 0
    snapshot_wanted: bool = False
    finish_after: int | None = None
    cancelled: bool = False
    last_progress: float = 0.0
    pass_ends: list[tuple[float, int]] = field(default_factory=list)
    params: IterativeParams = field(default_factory=IterativeParams)
    quality: QualitySettings = field(default_factory=QualitySettings)
    #: The half-set resolution estimate, with ``quality.resolution`` on.
    resolution: LiveResolution | None = None
    #: The solver's iteration when each of its positions arrived (for a seed's
    #: :func:`~hxn_liveptycho.recon.object_seed.maturity`), in the solver's order.
    arrived_at: list[int] = field(default_factory=list)
    #: The newest NN mosaic not yet applied (``object``, ``coverage``, ``mature_passes``).
    pending_seed: dict[str, Any] | None = None
    #: Mosaics taken into the object so far (in every snapshot, ``seeds_applied``).
    seeds_applied: int = 0

    @property
    def finishing(self) -> bool:
        """Told to end: from here the object depends on the data alone (no more seeds)."""
        return self.cancelled or self.finish_after is not None


class _Child:
    """The child's state: its backend and device, its open runs, the pipe back."""

    def __init__(self, inbox: Connection, outbox: Connection) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.runs: dict[str, _ChildRun] = {}
        self.xp: Any = np
        self.device: int | None = None
        #: Several ranks: this process is rank 0 and drives the others (recon.rank_hub).
        self.hub: RankHub | None = None
        #: Why the ranks can no longer go on (a failure on rank 0 inside a step they share
        #: leaves them out of step): the process then leaves.
        self.broken: str | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        self.outbox.send(message)

    def start(
        self,
        backend: str,
        wanted: GpuPlacement,
        warm: WarmUp | None,
        ranks: tuple[LiveRanks, str] | None = None,
    ) -> None:
        from hxn_liveptycho.recon.backend import get_array_module
        from hxn_liveptycho.recon.placement import resolve_placement, visible_gpus
        from hxn_liveptycho.recon.rank_hub import start_ranks

        self.xp = get_array_module(backend)  # type: ignore[arg-type]
        placement = resolve_placement(wanted, visible_gpus(self.xp))
        self.device = placement.iterative
        if ranks is not None:  # rank 0 of several: the ranks' settings choose the devices
            settings, reason_dir = ranks
            self.hub = start_ranks(settings, reason_dir)
            self.xp = self.hub.xp
            self.device = settings.gpus[0] if settings.gpus else None
        name = "CPU (NumPy)"
        if self.device is not None:
            self.xp.cuda.Device(self.device).use()
            props = self.xp.cuda.runtime.getDeviceProperties(self.device)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        began = time.perf_counter()
        if warm is not None and self.device is not None:
            self._warm(warm)
        info = WorkerInfo(
            backend=self.xp.__name__,
            placement=placement,
            device_name=name if self.hub is None else f"{name}, rank 0 of {self.hub.size}",
            warm_s=time.perf_counter() - began,
            rank_pids=() if self.hub is None else self.hub.pids,
        )
        self.send(("ready", info))

    def _warm(self, warm: WarmUp) -> None:
        """One tiny scan per algorithm, past the first probe update: every kernel compiled."""
        from hxn_liveptycho.recon.iterative import StreamingSolver

        xp, n = self.xp, warm.n
        rng = np.random.default_rng(0)
        side = int(np.ceil(np.sqrt(warm.positions)))
        step = max(1, n // 4)
        canvas = (n + step * side + 2, n + step * side + 2)
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
        positions = grid.reshape(-1, 2)[: warm.positions] * step + rng.uniform(0, 1, (1, 2))
        amplitudes = rng.uniform(0.5, 1.5, (len(positions), n, n)).astype(np.float32)
        yy, xx = np.mgrid[:n, :n] - n / 2
        probe = np.exp(-(yy**2 + xx**2) / (2 * (n / 8) ** 2)).astype(np.complex64)
        for algorithm in sorted(warm.params.algorithms):
            params = warm.params.model_copy(
                update={"algorithm": algorithm, "schedule": None, "probe_update_start": 0}
            )
            for where in (positions, np.floor(positions)):  # sub-pixel and whole-pixel paths
                solver = StreamingSolver(
                    probe=probe, canvas_shape=canvas, params=params, xp=xp, expected_positions=None
                )
                solver.add(amplitudes, where)
                solver.iterate(2)
                solver.snapshot()
                # The quality maps' kernels and FFT plans too: the first live snapshot
                # would otherwise compile them.
                quality_snapshot(solver, params, QualitySettings())
                del solver
        with contextlib.suppress(Exception):
            xp.get_default_memory_pool().free_all_blocks()

    # ---- messages
    def handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "shutdown":
            return False
        run_id = message[1]
        try:
            if kind == "open":
                self._open(run_id, message[2])
            elif kind == "add":
                self._add(run_id, message[2], message[3], message[4])
            elif kind == "snapshot":
                if run_id in self.runs:
                    self.runs[run_id].snapshot_wanted = True
            elif kind == "seed":
                run = self.runs.get(run_id)
                if run is not None and not run.finishing:
                    run.pending_seed = message[2]  # the newest wins
            elif kind == "finish":
                if run_id in self.runs:
                    self.runs[run_id].finish_after = int(message[2])
                    self.runs[run_id].pending_seed = None
            elif kind == "cancel":
                if run_id in self.runs:
                    self.runs[run_id].cancelled = True
            elif kind == "close":
                self._drop(run_id)
        except Exception as exc:
            logger.exception("solver: %s failed for run %s", kind, run_id)
            self._fail(run_id, f"{type(exc).__name__}: {exc}")
        return True

    def _open(self, run_id: str, spec: dict[str, Any]) -> None:
        from hxn_liveptycho.recon.iterative import StreamingSolver

        ring = FrameRingReader(spec["ring"], spec["slots"], spec["n"])
        if self.hub is not None:
            self._open_ranked(run_id, spec, ring)
            return
        try:
            solver = StreamingSolver(
                probe=spec["probe"],
                canvas_shape=spec["canvas_shape"],
                params=spec["params"],
                xp=self.xp,
                expected_positions=spec["expected_positions"],
                object_init=1.0 if spec.get("object_init") is None else spec["object_init"],
            )
            _resume_counts(solver, spec)
        except BaseException:
            ring.close()
            raise
        quality = spec.get("quality") or QualitySettings()
        resolution = None
        if quality.resolution:
            # The parent may not send the object pixel: the estimate is then in pixels.
            resolution = LiveResolution(
                probe=spec["probe"],
                canvas_shape=spec["canvas_shape"],
                params=spec["params"],
                xp=self.xp,
                pixel_size_m=spec.get("pixel_size_m"),
            )
        self.runs[run_id] = _ChildRun(
            solver=solver,
            ring=ring,
            params=spec["params"],
            quality=quality,
            resolution=resolution,
            errors_sent=len(solver.error_history),  # a resumed run's parent has them
        )
        logger.info(
            "solver started on %s for run %s",
            "CPU" if self.device is None else f"GPU {self.device}",
            run_id[:8],
        )

    def _open_ranked(self, run_id: str, spec: dict[str, Any], ring: FrameRingReader) -> None:
        """Open the run on every rank (:class:`~hxn_liveptycho.recon.rank_hub.RankedSolver`).
        Its frames are spread over the ranks, so the maps that need every frame on this rank
        (the error map, the half-set resolution) are left out, and NN seeds are not taken."""
        try:
            solver = RankedSolver(self.hub, run_id, spec)  # type: ignore[arg-type]
        except BaseException:
            ring.close()
            raise
        quality = spec.get("quality") or QualitySettings()
        if quality.error_map or quality.resolution:
            logger.info(
                "run %s over %d ranks: no error map or resolution", run_id[:8], solver._hub.size
            )
            quality = quality.model_copy(update={"error_map": False, "resolution": False})
        self.runs[run_id] = _ChildRun(
            solver=solver,
            ring=ring,
            params=spec["params"],
            quality=quality,
            errors_sent=len(solver.error_history),
        )
        logger.info(
            "solver started over %d ranks (%s) for run %s",
            solver._hub.size,
            "CPU" if self.device is None else "GPUs",
            run_id[:8],
        )

    def _add(self, run_id: str, start: int, count: int, positions: np.ndarray) -> None:
        run = self.runs.get(run_id)
        if run is None:
            self.send(("consumed", run_id, count, 0))
            return
        try:
            frames = run.ring.view(start, count)
            before = run.solver.n_positions
            run.solver.add(frames, positions)
            run.arrived_at.extend([run.solver.iteration] * (run.solver.n_positions - before))
            if run.resolution is not None:
                run.resolution.add(frames, positions)  # before the ring's slots are freed
        finally:
            self.send(("consumed", run_id, count, run.solver.n_positions))

    def _fail(self, run_id: str, reason: str) -> None:
        run = self.runs.get(run_id)
        if run is not None and isinstance(run.solver, RankedSolver):
            # The other ranks may wait in a step this one left: none of them can go on.
            self.runs.pop(run_id, None)
            run.ring.close()
            self.broken = reason
        else:
            self._drop(run_id)
        self.send(("failed", run_id, reason))

    def _drop(self, run_id: str) -> None:
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        run.ring.close()
        if isinstance(run.solver, RankedSolver):
            run.solver.close()
        del run
        if self.xp is not np:
            with contextlib.suppress(Exception):
                self.xp.get_default_memory_pool().free_all_blocks()

    # ---- work
    def step(self) -> bool:
        """One pass of every run that has frames; False when there was nothing to do."""
        worked = False
        for run_id, run in list(self.runs.items()):
            solver = run.solver
            if run.cancelled or run.finish_after == 0:
                self._final(run_id, run)
                continue
            if solver.n_positions == 0:
                continue
            if run.pending_seed is not None:
                self._apply_seed(run_id, run)
            try:
                solver.iterate(1)
            except Exception as exc:
                logger.exception("solver: iteration failed for run %s", run_id)
                self._fail(run_id, f"{type(exc).__name__}: {exc}")
                continue
            if run.resolution is not None:
                run.resolution.iterate()
            worked = True
            run.pass_ends.append((time.monotonic(), solver.n_positions))
            if run.finish_after is not None:
                run.finish_after -= 1
            now = time.monotonic()
            if run.snapshot_wanted:
                self._progress(run_id, run, now)
                self.send(("snapshot", run_id, self._snapshot(run)))
                run.snapshot_wanted = False
            elif now - run.last_progress >= PROGRESS_INTERVAL_S:
                self._progress(run_id, run, now)
            if run.finish_after == 0:
                self._final(run_id, run)
        return worked

    @staticmethod
    def _apply_seed(run_id: str, run: _ChildRun) -> None:
        """Take the pending NN mosaic into the solver's object where the solver is young
        (:func:`~hxn_liveptycho.recon.object_seed.reseed_young_region`). A seed that cannot
        be applied is logged and dropped: the solver goes on from its own object."""
        from hxn_liveptycho.recon.object_seed import reseed_young_region

        seed, run.pending_seed = run.pending_seed, None
        if seed is None or run.finishing:
            return
        if isinstance(run.solver, RankedSolver):
            logger.debug("solver: run %s is over several ranks; the NN seed is not taken", run_id)
            return
        solver = run.solver
        xp = solver.xp
        try:
            mosaic, coverage = _on_canvas(seed, tuple(solver.object.shape))
            arrived = np.asarray(run.arrived_at[: solver.n_positions], dtype=np.int64)
            seeded = reseed_young_region(
                solver.object,
                xp.asarray(mosaic),
                xp.asarray(coverage),
                solver.positions_px,
                solver.probe,
                solver.iteration - arrived,
                mature_passes=int(seed["mature_passes"]),
            )
            solver.object[...] = seeded
        except Exception:
            logger.exception("solver: the NN seed for run %s was not applied", run_id)
            return
        run.seeds_applied += 1

    def _progress(self, run_id: str, run: _ChildRun, now: float) -> None:
        history = run.solver.error_history
        new = list(history[run.errors_sent :])
        run.errors_sent = len(history)
        run.last_progress = now
        ends, run.pass_ends = run.pass_ends, []
        self.send(("progress", run_id, run.solver.iteration, new, ends, run.solver.n_positions))

    @staticmethod
    def _snapshot(run: _ChildRun, *, final: bool = False) -> dict[str, Any]:
        """The solver's state for the session, with its quality maps (:func:`quality_snapshot`):
        computed here, at snapshot time only, so their forward pass never slows a pass, and
        the half-set ``resolution`` when the run keeps one. The final one also carries
        ``state_error``, the error of the state it holds: with the error map on (one rank),
        from the error map's forward pass, so that the final result waits for one pass
        over the positions, not two; else the solver's own pass."""
        solver = run.solver
        derive = final and _errors_on_this_rank(run)
        asked = final and not derive
        snap = solver.snapshot(state_error=asked) if solver.n_positions else {}
        snap["positions_px"] = np.asarray(solver.positions_px)
        snap["seeds_applied"] = run.seeds_applied
        if solver.n_positions:
            snap.update(quality_snapshot(solver, run.params, run.quality, state_error=derive))
            if derive and "state_error" not in snap:  # the maps failed: the solver's pass
                snap["state_error"] = solver.state_error()
        if run.resolution is not None:
            estimate = run.resolution.snapshot()
            if estimate is not None:
                snap["resolution"] = estimate
        return snap

    def _final(self, run_id: str, run: _ChildRun) -> None:
        self._progress(run_id, run, time.monotonic())
        self.send(("final", run_id, self._snapshot(run, final=True)))
        self._drop(run_id)


def _resume_counts(solver: Any, spec: dict[str, Any]) -> None:
    """A run resumed from a checkpoint goes on counting from the checkpoint's iteration
    (schedules, probe and position updates start where they were) with its error history
    (the convergence flag reads it)."""
    iteration = int(spec.get("iteration") or 0)
    if iteration:
        solver._iteration = iteration
    solver.error_history.extend(float(e) for e in spec.get("error_history") or ())


def _on_canvas(seed: dict[str, Any], canvas_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A seed's mosaic and coverage on the whole canvas: its box (top-left ``origin``,
    the canvas's corner without one) placed in zeros, where nothing is covered."""
    mosaic = np.asarray(seed["object"], dtype=np.complex64)
    coverage = np.asarray(seed["coverage"], dtype=np.float32)
    y, x = seed.get("origin", (0, 0))
    h, w = coverage.shape
    if mosaic.shape != (h, w) or y < 0 or x < 0:
        raise ValueError(f"a seed of {mosaic.shape} and {coverage.shape} at {(y, x)}")
    if (y, x) == (0, 0) and (h, w) == canvas_shape:
        return mosaic, coverage
    if y + h > canvas_shape[0] or x + w > canvas_shape[1]:
        raise ValueError(f"a seed box {(h, w)} at {(y, x)} leaves the canvas {canvas_shape}")
    full_mosaic = np.zeros(canvas_shape, np.complex64)
    full_coverage = np.zeros(canvas_shape, np.float32)
    full_mosaic[y : y + h, x : x + w] = mosaic
    full_coverage[y : y + h, x : x + w] = coverage
    return full_mosaic, full_coverage


def _errors_on_this_rank(run: _ChildRun) -> bool:
    """Whether the run's snapshots make the per-position error pass over every frame:
    the error map on and one rank (over several, this process holds rank 0's frames
    alone, and the solver's own pass sums every rank's)."""
    quality = run.quality
    return quality.maps and quality.error_map and not isinstance(run.solver, RankedSolver)


def quality_snapshot(
    solver: Any, params: IterativeParams, quality: QualitySettings, *, state_error: bool = False
) -> dict[str, Any]:
    """The live quality of ``solver``'s state as host arrays for the snapshot: ``coverage``
    (illumination), ``position_count``, ``constrained`` (uint8 mask), with
    ``quality.error_map`` also ``position_errors`` and ``error_map``, and ``convergence``
    (a dict, :meth:`~hxn_liveptycho.recon.quality.Convergence.as_dict`). Empty with
    ``quality.maps`` off. A failure is logged and leaves the maps out: a picture without
    them is better than no picture.

    ``state_error`` (``solver`` a one-rank ``StreamingSolver``): with the error map on,
    also ``state_error``, the solver's
    :meth:`~hxn_liveptycho.recon.iterative.StreamingSolver.state_error` derived from the
    error map's pass (every position's misfit over the solver's data power), so that it
    costs no second forward pass."""
    from hxn_liveptycho.recon import quality as q
    from hxn_liveptycho.recon.backend import to_host
    from hxn_liveptycho.recon.opr import position_probes

    history = list(solver.error_history)
    out: dict[str, Any] = {
        "convergence": q.convergence(
            history, quality.convergence_window, quality.convergence_tolerance
        ).as_dict()
    }
    if not quality.maps:
        return out
    try:
        probes, positions = solver.probe_modes, solver.positions_px
        shape = tuple(solver.object.shape)
        dose = q.coverage(positions, probes, shape)
        counts = q.position_count(positions, probes, shape, quality.footprint_fraction)
        out["coverage"] = to_host(dose)
        out["position_count"] = to_host(counts)
        out["constrained"] = to_host(q.constrained_mask(counts, dose, quality)).astype(np.uint8)
        if quality.error_map:
            # The frames as the solver holds them (FFT order, cleaned, masked): no public
            # view of them, and a copy of every frame for this would double their memory.
            fit = q.position_fit(
                solver.object_modes,
                probes,
                positions,
                solver._amps[: solver.n_positions],
                valid=solver._valid,
                fft_order=True,
                subpixel=params.subpixel_positions or params.position_refinement,
                batch_size=params.batch_size,
                position_probes=position_probes(solver),  # OPR: each position's own probe
            )
            out["position_errors"] = to_host(fit.errors)
            if state_error:
                # Over the power the solver divides by: its figure, from this pass.
                out["state_error"] = fit.state_error(solver._amp_power)
            emap = q.error_map(
                positions, fit.errors, probes, shape, min_weight=quality.footprint_fraction
            )
            out["error_map"] = to_host(emap)
    except Exception:
        logger.exception("solver: the quality maps failed; the snapshot goes without them")
    return out


def child_main(
    inbox: Connection,
    outbox: Connection,
    parent_pid: int,
    backend: str,
    placement: GpuPlacement,
    warm: WarmUp | None,
    log_level: int,
    ranks: tuple[LiveRanks, str] | None = None,
) -> None:
    from hxn_liveptycho.util.children import exit_with_parent

    exit_with_parent(parent_pid)
    child = _Child(inbox, outbox)
    root = logging.getLogger()
    root.handlers[:] = [LogToParent(child.send)]
    root.setLevel(log_level)
    try:
        child.start(backend, placement, warm, ranks)
    except Exception as exc:
        child.send(("start_failed", f"{type(exc).__name__}: {exc}"))
        if ranks is not None:  # MPI may be up: leave without its teardown (it could wait)
            os._exit(1)
        return
    try:
        _serve(child, inbox)
    finally:
        if child.hub is not None:
            child.hub.close()
        # Leave without Python's teardown: freeing a CUDA context and cuFFT plans at exit can
        # take longer than the owner waits, and the driver releases them with the process.
        with contextlib.suppress(Exception):
            outbox.close()
        os._exit(0)


def _serve(child: _Child, inbox: Connection) -> None:
    try:
        while True:
            busy = any(
                r.solver.n_positions or r.cancelled or r.finish_after is not None
                for r in child.runs.values()
            )
            if inbox.poll(0 if busy else 0.5):
                while True:
                    if not child.handle(inbox.recv()):
                        return
                    if not inbox.poll(0):
                        break
            child.step()
            if child.broken is not None:
                logger.error("solver: the ranks cannot go on (%s); leaving", child.broken)
                return
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone
