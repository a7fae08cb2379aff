"""The NN branch in its own process: frames in through shared memory, the mosaic out
through a one-slot mailbox.

Why a process: inference, blending and the mosaic's copies run Python between
the runtime's calls, and in the session's process that takes turns with the
receivers, the Tiled writer and the solver's launch loop on one interpreter
lock. A child process (spawned: a forked CUDA context is unusable) owns the
runtime and the mosaic instead.

- **Workers may outlive runs, never their owner.** Without a pool, a run's
  branch starts its worker and ends it at ``close``. With a
  :class:`WorkerPool` (owned by an engine, which calls
  :meth:`WorkerPool.shutdown` when it closes), a worker is started ahead of
  the first run (:meth:`WorkerPool.prestart`) or on it, keeps its runtime
  loaded between runs (a TensorRT engine, captured CUDA graphs) and serves
  one run at a time; runs at the same time get a worker each. A worker exits
  when its parent process dies, even by SIGKILL: a watchdog thread in it
  polls its parent's pid (the kernel's parent-death signal is used too, but
  only for a worker started from the main thread, because the kernel sends
  it when the starting *thread* ends, and a run's thread ends long before
  a pooled worker should).
- **Frames cross without pickling.** Each run has one shared-memory segment,
  created and unlinked by the parent: a ring of frames already cut to the
  model's input (:class:`~hxn_liveptycho.nn.resample.InputRule`, so a 256²
  crop crosses as 128²), their positions and hand-over times, two counters
  (written by the parent, consumed by the child) and the mailbox. ``submit``
  copies into free slots or drops the frames (counted) when the ring is full,
  and wakes the child with a semaphore: it never waits for the child.
- **The mosaic comes back through a one-slot mailbox** in the same segment:
  the child overwrites it (under a lock) at most every ``interval_s`` and
  says so; the parent's reader thread copies it out and publishes it. A
  snapshot the parent had no time for is simply replaced.
- **Failures stay in the branch.** A runtime that cannot load, or a batch
  that fails, marks the branch failed (its frames dropped and counted); a
  worker that dies ends its run's branch with the exit code, and ``close``
  still returns the last mosaic it published.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from hxn_liveptycho.nn.core import BranchBase, Publish, settle_rule
from hxn_liveptycho.nn.mosaic import beam_modulus
from hxn_liveptycho.nn.registry import ModelInfo
from hxn_liveptycho.nn.resample import Fit, InputRule
from hxn_liveptycho.nn.run_memory import Header, RunMemory, ring_slots
from hxn_liveptycho.nn.worker_child import WorkerKey, child_main
from hxn_liveptycho.util.children import start_spawned

logger = logging.getLogger(__name__)

# WorkerKey lives with the worker's body, which opens the runtime it names; callers
# import it from here, with the branch and the pool.
__all__ = ["NNProcessBranch", "WorkerKey", "WorkerPool", "probe_fits"]


class NNWorker:
    """One NN process and the parent's ends of its pipes, semaphore and mailbox lock."""

    def __init__(self, key: WorkerKey) -> None:
        self.key = key
        spawn = mp.get_context("spawn")
        child_inbox, self._to_child = spawn.Pipe(duplex=False)
        parent_inbox, to_parent = spawn.Pipe(duplex=False)
        self.wake_sem = spawn.Semaphore(0)
        self.lock = spawn.Lock()
        self._send_lock = threading.Lock()
        self._branch: NNProcessBranch | None = None
        self.backend_name: str | None = None
        self.dead = False
        self.process = spawn.Process(
            target=child_main,
            args=(
                child_inbox,
                to_parent,
                self.wake_sem,
                self.lock,
                os.getpid(),
                key,
                logging.getLogger("hxn_liveptycho").getEffectiveLevel(),
                threading.current_thread() is threading.main_thread(),
            ),
            name="liveptycho-nn",
            daemon=True,
        )
        start_spawned(self.process)
        child_inbox.close()
        to_parent.close()
        self._reader = threading.Thread(
            target=self._read, args=(parent_inbox,), name="liveptycho-nn-rx", daemon=True
        )
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self.dead and self.process.is_alive()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._to_child.send(message)
        self.wake_sem.release()

    def wake(self) -> None:
        self.wake_sem.release()

    def bind(self, branch: NNProcessBranch | None) -> None:
        self._branch = branch

    def _read(self, inbox: Connection) -> None:
        while True:
            try:
                message = inbox.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(message)
            except Exception:  # a bad message must not end the reader
                logger.exception("NN process message %r could not be handled", message[:1])
        self.dead = True
        self.process.join(5.0)
        branch = self._branch
        if branch is not None:
            branch._worker_died(self.process.exitcode)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            _, level, name, text = message
            target = self._branch.log if self._branch is not None else logging.getLogger(name)
            target.log(level, "[nn process] %s", text)
            return
        if kind == "loaded":
            self.backend_name = message[2]
        branch = self._branch
        if branch is not None and message[1] == branch.run_id:
            branch._on_message(message)

    def close(self, timeout: float = 5.0) -> None:
        """Ask the process to quit, and make sure it has."""
        with contextlib.suppress(Exception):
            self.send(("quit",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        with contextlib.suppress(Exception):
            self._to_child.close()


class WorkerPool:
    """Idle NN workers by key, so a run finds its runtime already loaded."""

    def __init__(self, max_idle_per_key: int = 1) -> None:
        self.max_idle_per_key = max_idle_per_key
        self._idle: dict[WorkerKey, list[NNWorker]] = {}
        self._busy: set[NNWorker] = set()
        self._lock = threading.Lock()

    def acquire(self, key: WorkerKey) -> NNWorker:
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                worker = idle.pop()
                if worker.alive:
                    self._busy.add(worker)
                    return worker
                worker.close(0.1)
        worker = NNWorker(key)
        with self._lock:
            self._busy.add(worker)
        return worker

    def release(self, worker: NNWorker) -> None:
        with self._lock:
            self._busy.discard(worker)
            idle = self._idle.setdefault(worker.key, [])
            if worker.alive and len(idle) < self.max_idle_per_key:
                worker.bind(None)
                idle.append(worker)
                return
        worker.close()

    def discard(self, worker: NNWorker) -> None:
        with self._lock:
            self._busy.discard(worker)
        worker.close(1.0)

    def prestart(
        self, key: WorkerKey, model: ModelInfo | None = None, *, batch_size: int = 64
    ) -> None:
        """Start a worker now, in the background, with ``model``'s runtime loaded and warm,
        so the next run's branch starts at once (an engine calls it when it starts)."""
        worker = NNWorker(key)
        if model is not None:
            worker.send(("load", str(model.path), model.sha256, model.io(), batch_size))
        with self._lock:
            self._idle.setdefault(key, []).append(worker)

    def shutdown(self) -> None:
        """End every worker, idle or busy (the owner is going away)."""
        with self._lock:
            workers = [w for ws in self._idle.values() for w in ws] + list(self._busy)
            self._idle.clear()
            self._busy.clear()
        for worker in workers:
            worker.close(2.0)


_run_ids = itertools.count(1)


def probe_fits(
    probe: np.ndarray, window: int, log: logging.Logger | logging.LoggerAdapter = logger
) -> bool:
    """Whether ``probe`` (n, n) or (k, n, n) is one of the run's ``window``; a line says why not."""
    if np.ndim(probe) in (2, 3) and np.shape(probe)[-2:] == (window, window):
        return True
    log.warning(
        "NN branch: a probe of shape %s does not fit the %d-pixel window; its weights stay",
        np.shape(probe),
        window,
    )
    return False


class NNProcessBranch(BranchBase):
    """Runs one model over one run's frames in an NN worker process (see the module)."""

    def __init__(
        self,
        model: ModelInfo,
        key: WorkerKey,
        *,
        canvas_shape: tuple[int, int],
        window: int,
        batch_size: int,
        max_queued_frames: int,
        publish: Publish,
        interval_s: float,
        rule: InputRule,
        fit: Fit | None = None,
        footprint_px: float | None = None,
        defocus_sign: int = 1,
        probe: np.ndarray | None = None,
        name: str = "liveptycho-nn",
        log: logging.Logger | logging.LoggerAdapter = logger,
        pool: WorkerPool | None = None,
    ) -> None:
        m = rule.model
        slots = ring_slots(max_queued_frames, batch_size, m)
        super().__init__(model, rule, batch_size=batch_size, max_queued_frames=slots, log=log)
        if slots < max_queued_frames:
            log.info("NN queue limited to %d frames by its shared-memory ring", slots)
        self.run_id = next(_run_ids)
        self.fit = fit
        self.name = name
        self.canvas_shape = (int(canvas_shape[0]), int(canvas_shape[1]))
        self.window = window
        self.footprint_px = footprint_px
        self.defocus_sign = defocus_sign
        self._publish = publish
        self._pool = pool
        self._lock = threading.Lock()
        self._written = 0
        self._closed = False
        self._done = threading.Event()
        self._backend_name = "starting"
        self._mem: RunMemory | None = RunMemory(slots, m, self.canvas_shape, window)
        if probe is not None and probe_fits(probe, window, log):  # not mapped by the worker yet
            self._mem.probe[:] = beam_modulus(probe)
            self._mem.header[Header.PROBE_SEQ] = 1
        self._last: dict[str, Any] | None = None
        self._worker = NNWorker(key) if pool is None else pool.acquire(key)
        self._worker.bind(self)
        self._worker.send(
            (
                "open",
                {
                    "run_id": self.run_id,
                    "shm": self._mem.name,
                    "slots": slots,
                    "m": m,
                    "canvas_shape": self.canvas_shape,
                    "window": window,
                    "model_path": str(model.path),
                    "sha256": model.sha256,
                    "io": model.io(),
                    "max_batch": batch_size,
                    "rule": rule,
                    "batch_size": batch_size,
                    "interval_s": interval_s,
                    "footprint_px": footprint_px,
                    "defocus_sign": defocus_sign,
                },
            )
        )

    @property
    def backend_name(self) -> str:
        return self._backend_name

    @property
    def pid(self) -> int | None:
        return self._worker.process.pid

    # ---- session side ------------------------------------------------------------------
    def use_probe(self, probe: np.ndarray) -> None:
        """The run's starting probe (n, n) or modes (k, n, n), once known: the worker blends
        the patches from its next batch with its footprint instead of the guess's."""
        if not probe_fits(probe, self.window, self.log):
            return
        modulus = beam_modulus(probe)
        with self._lock:
            mem = self._mem
            if mem is None or not self._worker.lock.acquire(timeout=10.0):
                return
            try:
                mem.probe[:] = modulus
                mem.header[Header.PROBE_SEQ] += 1
            finally:
                self._worker.lock.release()

    def submit(self, amplitudes: np.ndarray, positions_px: np.ndarray) -> None:
        """Queue frames (k, n, n) with their window corners (k, 2); never blocks."""
        k = len(amplitudes)
        self.counters.add("nn_frames_submitted", k)
        if k == 0:
            return
        with self._lock:
            mem = self._mem
            if mem is None or self.error is not None or self._closed:
                self._drop(k, 0)
                return
            queued = self._written - int(mem.header[Header.CONSUMED])
            if queued + k > mem.slots:
                self._drop(k, queued)
                return
            if not mem.header[Header.PATTERN_SET]:
                # The probe estimate itself is the worker's job; the mean pattern is cheap.
                mem.pattern[:] = np.mean(np.square(amplitudes), axis=0, dtype=np.float64)
                if self.fit is not None:
                    self.rule = settle_rule(self.rule, self.fit, mem.pattern, self.model, self.log)
                mem.header[Header.RULE_BIN] = self.rule.bin
                mem.header[Header.PATTERN_SET] = 1
            frames = self.rule.frames(amplitudes)
            positions = np.asarray(positions_px, dtype=np.float64).reshape(k, 2)
            now = time.monotonic()
            done = 0
            while done < k:
                start = (self._written + done) % mem.slots
                count = min(k - done, mem.slots - start)
                mem.frames[start : start + count] = frames[done : done + count]
                mem.positions[start : start + count] = positions[done : done + count]
                mem.stamps[start : start + count] = now
                done += count
            self._written += k
            mem.header[Header.WRITTEN] = self._written
        self._worker.wake()

    def close(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Finish the queued frames (up to ``timeout``) and return the final mosaic."""
        with self._lock:
            already = self._closed
            self._closed = True
        if not already and self._worker.alive:
            with contextlib.suppress(Exception):
                self._worker.send(("finish", self.run_id))
        if not self._done.wait(timeout):
            self.log.error("NN branch did not finish its queue within %s s", timeout)
            self._release(healthy=False)
            return None
        result = self.snapshot()
        self._release(healthy=not self._worker.dead)
        return result

    def _release(self, *, healthy: bool) -> None:
        with self._lock:
            mem, self._mem = self._mem, None
        if mem is None:
            return
        self._last = self._read_mailbox(mem)
        self._worker.bind(None)
        if self._pool is None:
            self._worker.close(2.0 if healthy else 0.5)
        elif healthy:
            self._pool.release(self._worker)
        else:
            self._pool.discard(self._worker)
        mem.close()

    def snapshot(self) -> dict[str, Any] | None:
        """The last mosaic the worker published (its final one after ``close``)."""
        mem = self._mem
        if mem is None:
            return self._last
        return self._read_mailbox(mem)

    def _read_mailbox(self, mem: RunMemory) -> dict[str, Any] | None:
        if not self._worker.lock.acquire(timeout=10.0):
            return self._last
        try:
            if int(mem.header[Header.MAILBOX_SEQ]) == 0:
                return self._last
            return {
                "object": mem.object.copy(),
                "coverage": mem.coverage.copy(),
                "frames": int(mem.header[Header.MAILBOX_FRAMES]),
            }
        finally:
            self._worker.lock.release()

    # ---- the worker's messages (its reader thread) -------------------------------------
    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "progress":
            _, _, count, outside, lag, infer_seconds, snapshot = message
            self.counters.add("nn_frames_inferred", count)
            self.counters.add("nn_frames_outside", outside)
            self.counters.add("nn_batches")
            self.max_lag_s = max(self.max_lag_s, lag)
            self.infer_seconds = infer_seconds
            if snapshot:
                mem = self._mem
                snap = None if mem is None else self._read_mailbox(mem)
                if snap is not None:
                    self._publish(snap)
                    self.counters.add("nn_snapshots")
        elif kind == "loaded":
            self._backend_name = message[2]
            self.log.info("NN branch: model %s on %s", self.model.name, self._backend_name)
        elif kind == "discarded":
            self.counters.add("nn_frames_dropped", message[2])
        elif kind == "error":
            if self.error is None:
                self.error = message[2]
                self.log.error(
                    "NN branch failed; the iterative branch is unaffected: %s", self.error
                )
        elif kind == "done":
            self._done.set()

    def _worker_died(self, exitcode: int | None) -> None:
        if not self._done.is_set():
            self.error = self.error or f"the NN process exited (code {exitcode})"
            self.log.error("NN branch: %s; its last mosaic is kept", self.error)
            with self._lock:
                mem = self._mem
                queued = 0 if mem is None else self._written - int(mem.header[Header.CONSUMED])
            self.counters.add("nn_frames_dropped", max(0, queued))
            self._done.set()
