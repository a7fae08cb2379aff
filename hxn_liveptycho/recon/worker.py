"""The solver's own process: the GPU's launch loop never shares a GIL with anything else.

In one Python process the receivers, the decoders, Tiled's client, the NN
branch and the solver's kernel launches take turns on one interpreter lock,
and a GPU fed by Python then idles between launches. So the solver lives in a
child process (spawned, one per engine and GPU) that does nothing else:

- it is started with the engine, resolves the array backend and the GPU
  placement there (the RunEngine's process never creates a CUDA context), and
  compiles the solver's kernels on a small synthetic scan before the first run
  (CuPy's on-disk cache makes a later start a load, not a compile);
- frames arrive through a :class:`~hxn_liveptycho.recon.frame_ring.FrameRing`
  in shared memory, only small messages go over the pipe;
- it iterates every open run between messages, answers a snapshot request after
  the next completed pass (a one-slot mailbox: the parent asks again only once
  it has the answer), and after ``finish`` runs the post-scan passes and sends
  the final state.

This module is the parent side, :class:`SolverWorker` (the process) and
:class:`RemoteSolver` (one run's handle); the child's loop is
:mod:`~hxn_liveptycho.recon.worker_child`. A reader thread in the parent turns the child's messages
into state and wakes the run's session. The child exits when its parent dies
(:func:`~hxn_liveptycho.util.children.exit_with_parent`, and a closed pipe), and a
child that dies fails its open runs with the reason instead of hanging them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from hxn_liveptycho.errors import ConfigurationError, LivePtychoError
from hxn_liveptycho.recon.frame_ring import FrameRing
from hxn_liveptycho.recon.params import IterativeParams
from hxn_liveptycho.recon.placement import GpuPlacement
from hxn_liveptycho.recon.quality import QualitySettings
from hxn_liveptycho.recon.rank_hub import LiveRanks, failed_ranks
from hxn_liveptycho.recon.worker_child import WarmUp, WorkerInfo, child_main
from hxn_liveptycho.util.children import start_spawned
from hxn_liveptycho.util.counters import Counters

__all__ = ["LiveRanks", "RemoteSolver", "SolverWorker", "WarmUp", "WorkerInfo"]

logger = logging.getLogger(__name__)

#: Bytes of frames a run's ring holds before the session waits for the solver to take them.
RING_BYTES = 256 * 2**20
#: Seconds between the checks that every rank of a scan is alive (several ranks).
RANK_CHECK_S = 0.25


class SolverWorker:
    """The solver process of one engine; hands out a :class:`RemoteSolver` per run.

    Started at once (in the background: the constructor only spawns); the first
    run waits for the child's ``ready`` (backend resolved, kernels warm) in
    :meth:`info`. A child that died is replaced by the next :meth:`open_run`.

    With ``ranks`` of more than one rank the child is rank 0 of them and starts the others
    itself (:mod:`~hxn_liveptycho.recon.rank_hub`). MPI would leave the ranks waiting for
    a dead one for ever, so a thread here watches them: a rank that wrote why it failed,
    that exited, or ranks that did not start within ``ranks.start_timeout_s`` end the child,
    and its runs fail with that reason.
    """

    def __init__(
        self,
        *,
        backend: str = "auto",
        placement: GpuPlacement | None = None,
        warm: WarmUp | None = None,
        start_timeout_s: float = 300.0,
        ranks: LiveRanks | None = None,
    ) -> None:
        self._backend = backend
        self._ranks = ranks if ranks is not None and ranks.size > 1 else None
        self._placement = placement or GpuPlacement()
        self._warm = warm
        self._start_timeout_s = start_timeout_s
        self.counters = Counters(["starts", "deaths", "ring_waits"])
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._runs: dict[str, RemoteSolver] = {}
        self._closed = False
        self._process: Any = None
        self._start()

    def _start(self) -> None:
        spawn = mp.get_context("spawn")
        child_inbox, to_child = spawn.Pipe(duplex=False)  # (reader, writer)
        parent_inbox, to_parent = spawn.Pipe(duplex=False)
        self._to_child: Connection = to_child
        self._ready = threading.Event()
        self._info: WorkerInfo | None = None
        self._start_error: str | None = None
        #: Why the ranks' watch ended the child (several ranks); None otherwise.
        self._rank_failure: str | None = None
        ranks = None
        if self._ranks is not None:
            ranks = (self._ranks, tempfile.mkdtemp(prefix="liveptycho-ranks-"))
        self._process = spawn.Process(
            target=child_main,
            args=(
                child_inbox,
                to_parent,
                os.getpid(),
                self._backend,
                self._placement,
                self._warm,
                logging.getLogger("hxn_liveptycho").getEffectiveLevel(),
                *(() if ranks is None else (ranks,)),
            ),
            name="liveptycho-solver",
            daemon=True,
        )
        start_spawned(self._process)
        child_inbox.close()
        to_parent.close()
        self.counters.add("starts")
        self._reader = threading.Thread(
            target=self._read,
            args=(parent_inbox, self._process, self._ready),
            name="liveptycho-solver-rx",
            daemon=True,
        )
        self._reader.start()
        if ranks is not None:
            threading.Thread(
                target=self._watch_ranks,
                args=(self._process, self._ready, ranks[1]),
                name="liveptycho-solver-ranks",
                daemon=True,
            ).start()

    def _watch_ranks(self, process: Any, ready: threading.Event, reason_dir: str) -> None:
        """End the child when one of its ranks failed, exited, or they did not start in time
        (several ranks; on a thread of its own); once the child is gone, end any rank left
        and remove ``reason_dir``."""
        assert self._ranks is not None
        deadline = time.monotonic() + self._ranks.start_timeout_s
        while process.is_alive():
            reason = failed_ranks(reason_dir)
            info = self._info if ready.is_set() else None
            if reason is None and info is None and time.monotonic() > deadline:
                reason = f"the ranks did not start within {self._ranks.start_timeout_s:g} s"
            if reason is None and info is not None:
                for rank, pid in enumerate(info.rank_pids[1:], start=1):
                    if not _running(pid):
                        reason = failed_ranks(reason_dir) or f"rank {rank} (pid {pid}) exited"
                        break
            if reason is not None and not self._closed:  # closing: the ranks leave first
                self._rank_failure = f"a rank of the solver failed: {reason}"
                logger.error("%s; ending the solver process", self._rank_failure)
                process.kill()
                break
            time.sleep(RANK_CHECK_S)
        process.join()
        info = self._info
        for pid in () if info is None else info.rank_pids[1:]:
            if _running(pid):  # MPI's daemon ends them with rank 0; this is the safety net
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(reason_dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def info(self, timeout: float | None = None) -> WorkerInfo:
        """The child's backend and placement, once it is ready; raises if it could not start."""
        wait = self._start_timeout_s if timeout is None else timeout
        if not self._ready.wait(wait):
            raise LivePtychoError(f"the solver process was not ready within {wait:.0f} s")
        if self._info is None:
            raise ConfigurationError(f"the solver process could not start: {self._start_error}")
        return self._info

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._to_child.send(message)

    def open_run(
        self,
        run_id: str,
        *,
        probe: np.ndarray,
        canvas_shape: tuple[int, int],
        params: IterativeParams,
        expected_positions: int | None,
        notify: Callable[[], None] = lambda: None,
        quality: QualitySettings | None = None,
        pixel_size_m: float | None = None,
        object_init: np.ndarray | None = None,
        iteration: int = 0,
        error_history: Sequence[float] = (),
    ) -> RemoteSolver:
        """Open ``run_id`` on the solver process; its snapshots carry the quality maps and
        convergence flag of ``quality`` (the defaults when None), and figures in metres
        (the resolution estimate) where the canvas's ``pixel_size_m`` is given.

        A run resumed from a checkpoint (docs/resume.md) starts from its ``object_init``
        (the canvas), ``probe`` modes, ``iteration`` and ``error_history`` instead of
        a flat object at iteration 0."""
        with self._lock:
            if self._closed:
                raise LivePtychoError("the solver process is closed")
            if not self.alive:
                logger.warning("the solver process had exited; starting a new one")
                self._start()
        info = self.info()
        n = int(probe.shape[-1])
        slots = max(16, min(RING_BYTES // (n * n * 4), max(expected_positions or 0, 16)))
        ring = FrameRing(slots, n)
        remote = RemoteSolver(self, run_id, ring, notify, backend=info.backend)
        remote.iteration = int(iteration)
        remote.error_history = [float(e) for e in error_history]
        with self._lock:
            self._runs[run_id] = remote
        spec = {
            "ring": ring.name,
            "slots": slots,
            "n": n,
            "probe": np.asarray(probe),
            "canvas_shape": tuple(canvas_shape),
            "params": params,
            "expected_positions": expected_positions,
            "quality": quality or QualitySettings(),
            "pixel_size_m": pixel_size_m,
            "object_init": None if object_init is None else np.asarray(object_init),
            "iteration": int(iteration),
            "error_history": [float(e) for e in error_history],
        }
        try:
            self._send(("open", run_id, spec))
        except (OSError, ValueError) as exc:
            remote._fail(f"the solver process is gone ({exc})")
        return remote

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    # ---- the reader thread
    def _read(self, conn: Connection, process: Any, ready: threading.Event) -> None:
        try:
            while True:
                message = conn.recv()
                self._dispatch(message)
        except (EOFError, OSError):
            pass
        process.join(5)
        code = process.exitcode
        exited = self._rank_failure or f"the solver process exited (code {code})"
        if not ready.is_set():
            self._start_error = self._rank_failure or self._start_error
            self._start_error = self._start_error or f"it exited with code {code}"
            ready.set()
        with self._lock:
            orphans = [r for r in self._runs.values() if r.process is process]
        if orphans or (not self._closed and code not in (0, None)):
            self.counters.add("deaths")
            logger.error("the solver process exited (code %s)", code)
        for remote in orphans:
            remote._fail(exited)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            _, level, name, text = message
            logging.getLogger(name).log(level, "%s", text)
            return
        if kind == "ready":
            self._info = message[1]
            info = self._info
            logger.info(
                "solver process %s ready on %s (%s)%s",
                self._process.pid,
                info.device_name,
                info.backend,
                f", kernels compiled in {info.warm_s:.1f} s" if info.warm_s > 0.05 else "",
            )
            self._ready.set()
            return
        if kind == "start_failed":
            self._start_error = message[1]
            logger.error("the solver process could not start: %s", message[1])
            self._ready.set()
            return
        with self._lock:
            remote = self._runs.get(message[1])
        if remote is not None:
            remote._receive(kind, message[2:])

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child (it abandons open runs: their sessions have been cancelled first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self._send(("shutdown",))
        if self._process is not None:
            # The reader thread reaps the child once its pipe ends; joining it here too
            # would race that waitpid (the loser sees no child, and the process would look
            # alive for ever). So wait for the reader, and kill only a child still running.
            self._reader.join(timeout)
            if self._reader.is_alive():
                logger.error("the solver process did not exit; killing it")
                self._process.kill()
                self._reader.join()  # SIGKILL cannot be refused: its pipe ends, it is reaped
        with contextlib.suppress(Exception):
            self._to_child.close()


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class RemoteSolver:
    """One run's solver in the worker process, seen from the run's session.

    ``add`` copies frames into the shared ring (waiting, counted, when the solver
    has not yet taken earlier ones); progress, snapshots and the final state
    arrive on the worker's reader thread, which calls ``notify`` so the
    session wakes up. Every method is safe from any thread.
    """

    def __init__(
        self,
        worker: SolverWorker,
        run_id: str,
        ring: FrameRing,
        notify: Callable[[], None],
        *,
        backend: str,
    ) -> None:
        self._worker = worker
        self.process = worker._process
        self.run_id = run_id
        self.backend = backend
        self._ring = ring
        self._notify = notify
        self._lock = threading.Lock()
        self.iteration = 0
        self.n_positions = 0
        self.added = 0
        self.error_history: list[float] = []
        #: (time.monotonic() at the end of each pass, positions it covered): the clock is the
        #: host's, shared by both processes; for the live path's rate during and after the scan.
        self.pass_ends: list[tuple[float, int]] = []
        #: NN mosaics the solver took as its object (see :meth:`seed`), as its last
        #: snapshot or final state said.
        self.seeds_applied = 0
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_requested = False
        self.final: dict[str, Any] | None = None
        self.failure: str | None = None
        self.done = threading.Event()

    @property
    def last_error(self) -> float | None:
        with self._lock:
            return self.error_history[-1] if self.error_history else None

    def add(self, amplitudes: np.ndarray, positions_px: np.ndarray) -> None:
        if self.done.is_set():
            return
        amplitudes = np.ascontiguousarray(amplitudes, dtype=np.float32)
        positions = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
        if self._ring.free < len(amplitudes):
            self._worker.counters.add("ring_waits")
        offset = 0
        try:
            while offset < len(amplitudes):
                start, count = self._ring.write(amplitudes[offset:])
                chunk = positions[offset : offset + count]
                self._worker._send(("add", self.run_id, start, count, chunk))
                offset += count
        except (OSError, ValueError, RuntimeError) as exc:
            self._fail(f"could not hand frames to the solver process ({exc})")
            return
        self.added += len(amplitudes)

    def request_snapshot(self) -> bool:
        """Ask for the state after the next pass; False while an earlier request is open."""
        with self._lock:
            if self._snapshot_requested or self.done.is_set():
                return False
            self._snapshot_requested = True
        self._post(("snapshot", self.run_id))
        return True

    def take_snapshot(self) -> dict[str, Any] | None:
        """The answered snapshot, once (None when none arrived since the last call)."""
        with self._lock:
            snap, self._snapshot = self._snapshot, None
            return snap

    def seed(self, mosaic: np.ndarray, coverage: np.ndarray, *, mature_passes: int) -> bool:
        """Offer the NN branch's mosaic (complex, the canvas) and its ``coverage`` as the
        object where the solver is still young (:func:`~hxn_liveptycho.recon.object_seed.
        reseed_young_region`, applied before its next pass; a newer seed replaces one not yet
        applied); False when nothing is covered. Only posts the message: safe from the NN
        branch's thread. Only the covered box travels (``origin``, its top-left): outside it
        the coverage is zero and the mosaic counts for nothing, and early in a scan the box
        is a small part of the canvas."""
        if self.done.is_set():
            return False
        coverage = np.asarray(coverage, dtype=np.float32)
        rows = np.flatnonzero((coverage > 0).any(axis=1))
        cols = np.flatnonzero((coverage > 0).any(axis=0))
        if rows.size == 0:
            return False
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        seed = {
            "object": np.array(mosaic[box], dtype=np.complex64),
            "coverage": np.array(coverage[box]),
            "origin": (int(rows[0]), int(cols[0])),
            "mature_passes": int(mature_passes),
        }
        self._post(("seed", self.run_id, seed))
        return True

    def finish(self, iterations: int) -> None:
        """No more frames: run ``iterations`` more passes, then send the final state."""
        self._post(("finish", self.run_id, max(0, int(iterations))))

    def cancel(self) -> None:
        """Send the final state after the pass under way."""
        self._post(("cancel", self.run_id))

    def release(self) -> None:
        """The session is done with this run: free its ring and the child's arrays."""
        if not self.done.is_set():
            self._post(("close", self.run_id))
        self._worker._forget(self.run_id)
        self._ring.close()

    def _post(self, message: tuple[Any, ...]) -> None:
        try:
            self._worker._send(message)
        except (OSError, ValueError) as exc:
            self._fail(f"the solver process is gone ({exc})")

    # ---- from the reader thread
    def _receive(self, kind: str, payload: tuple[Any, ...]) -> None:
        if kind == "consumed":
            count, n_positions = payload
            self._ring.release(count)
            with self._lock:
                self.n_positions = max(self.n_positions, int(n_positions))
            return
        if kind == "progress":
            iteration, errors, pass_ends, n_positions = payload
            with self._lock:
                self.iteration = int(iteration)
                self.error_history.extend(errors)
                self.pass_ends.extend(pass_ends)
                self.n_positions = int(n_positions)
        elif kind == "snapshot":
            with self._lock:
                self._snapshot = payload[0]
                self._snapshot_requested = False
                self._count_seeds(payload[0])
        elif kind == "final":
            with self._lock:
                self.final = payload[0]
                self._count_seeds(payload[0])
            self.done.set()
        elif kind == "failed":
            self._fail(payload[0])
            return
        self._notify()

    def _count_seeds(self, snap: dict[str, Any]) -> None:
        """Take the seed count out of a state: a counter, not an array for the sink."""
        self.seeds_applied = max(self.seeds_applied, int(snap.pop("seeds_applied", 0)))

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.failure = reason
        self.done.set()
        self._ring.release(self._ring.slots)  # a writer waiting for room must not wait for ever
        self._notify()
