"""The NN worker process's body: it loads the runtime, drains a run's frame ring, infers
and blends, and posts the mosaic to the run's mailbox.

Why a module of its own: this is all that runs in the child (spawned, so it
imports only what it needs), while :mod:`~hxn_liveptycho.nn.process` holds the
parent's handles on it; the segment both map is
:mod:`~hxn_liveptycho.nn.run_memory`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from hxn_liveptycho.nn.core import BranchCore
from hxn_liveptycho.nn.interface import GraphIO
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.nn.run_memory import Header, RunMemory
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.util.children import LogToParent, exit_with_parent

__all__ = ["WorkerKey", "child_main"]


@dataclass(frozen=True)
class WorkerKey:
    """What a worker's runtime depends on; runs with the same key can share a worker."""

    backend: str = "auto"
    device_id: int = 0
    cache_dir: str | None = None
    cpu_threads: int = 0


@dataclass
class _ChildRun:
    run_id: int
    mem: RunMemory
    core: BranchCore | None
    batch_size: int
    interval_s: float
    footprint_px: float | None
    defocus_sign: int
    consumed: int = 0
    #: The last of the parent's run probes taken (Header.PROBE_SEQ); 0: none, the guess.
    probe_seq: int = 0
    finishing: bool = False
    failed: bool = False
    last_publish: float = 0.0


class _Child:
    def __init__(self, inbox: Connection, outbox: Connection, wake: Any, lock: Any, key: WorkerKey):
        self.inbox, self.outbox, self.wake, self.lock, self.key = inbox, outbox, wake, lock, key
        self.backend: Any = None
        self.backend_id: tuple[Any, ...] | None = None
        self.run: _ChildRun | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        self.outbox.send(message)

    def load(self, model_path: str, sha256: str, io: GraphIO, max_batch: int) -> Any:
        """The runtime for this model, kept from the last run when it is the same."""
        wanted = (model_path, sha256, max_batch)
        if self.backend is not None and self.backend_id == wanted:
            return self.backend
        from pathlib import Path

        from hxn_liveptycho.nn.backends import open_backend

        if self.backend is not None:
            self.backend.close()
            self.backend = None
        key = self.key
        backend = open_backend(
            Path(model_path),
            io,
            kind=key.backend,  # type: ignore[arg-type]
            device_id=key.device_id,
            cache_dir=None if key.cache_dir is None else Path(key.cache_dir),
            max_batch=max_batch,
            cpu_threads=key.cpu_threads,
        )
        warm = getattr(backend, "warm", None)
        if warm is not None:
            warm()
        self.backend, self.backend_id = backend, wanted
        return backend

    def handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "quit":
            return False
        if kind == "load":
            _, model_path, sha256, io, max_batch = message
            try:
                backend = self.load(model_path, sha256, io, max_batch)
                self.send(("loaded", None, backend.name))
            except Exception as exc:
                logging.getLogger(__name__).warning("could not preload the model: %s", exc)
        elif kind == "open":
            self.open(message[1])
        elif kind == "finish" and self.run is not None and self.run.run_id == message[1]:
            self.run.finishing = True
        return True

    def open(self, spec: dict[str, Any]) -> None:
        mem = RunMemory(
            spec["slots"], spec["m"], spec["canvas_shape"], spec["window"], name=spec["shm"]
        )
        run = _ChildRun(
            run_id=spec["run_id"],
            mem=mem,
            core=None,
            batch_size=spec["batch_size"],
            interval_s=spec["interval_s"],
            footprint_px=spec["footprint_px"],
            defocus_sign=spec["defocus_sign"],
        )
        self.run = run
        try:
            backend = self.load(spec["model_path"], spec["sha256"], spec["io"], spec["max_batch"])
            rule: InputRule = spec["rule"]
            if tuple(backend.input_hw) != (rule.model, rule.model):
                raise ValueError(
                    f"the runtime takes {backend.input_hw} but the rule gives {rule.model}"
                )
            run.core = BranchCore(
                backend, rule, canvas_shape=mem.canvas_shape, window=spec["window"]
            )
            self.send(("loaded", run.run_id, backend.name))
        except Exception as exc:
            self.fail(run, exc, "could not load the model")

    def fail(self, run: _ChildRun, exc: BaseException, what: str) -> None:
        run.failed = True
        logging.getLogger(__name__).error("%s: %s", what, exc, exc_info=exc)
        self.send(("error", run.run_id, f"{type(exc).__name__}: {exc}"))

    def publish(self, run: _ChildRun) -> bool:
        if run.core is None or run.core.mosaic is None:
            return False
        image, coverage = run.core.mosaic.image(), run.core.mosaic.coverage
        if not self.lock.acquire(timeout=10.0):
            return False
        try:
            run.mem.object[:] = image
            run.mem.coverage[:] = coverage
            run.mem.header[Header.MAILBOX_FRAMES] = run.core.mosaic.placed
            run.mem.header[Header.MAILBOX_SEQ] += 1
        finally:
            self.lock.release()
        return True

    def take_probe(self, run: _ChildRun) -> None:
        """The run's probe, when the parent wrote a new one: the mosaic's blending weights
        follow its footprint from the next patch (or from the first, made with it)."""
        mem, core = run.mem, run.core
        if core is None or int(mem.header[Header.PROBE_SEQ]) == run.probe_seq:
            return
        if not self.lock.acquire(timeout=10.0):
            return  # taken at the next batch
        try:
            run.probe_seq = int(mem.header[Header.PROBE_SEQ])
            modulus = mem.probe.copy()
        finally:
            self.lock.release()
        core.use_probe(modulus)

    def step(self) -> bool:
        """One batch of the current run, or its end; False when there was nothing to do."""
        run = self.run
        if run is None:
            return False
        mem = run.mem
        available = int(mem.header[Header.WRITTEN]) - run.consumed
        if available > 0 and (run.failed or run.core is None):
            run.consumed += available  # nothing will infer them: free the slots
            mem.header[Header.CONSUMED] = run.consumed
            self.send(("discarded", run.run_id, available))
            return True
        if available > 0 and run.core is not None:
            start = run.consumed % mem.slots
            count = min(available, run.batch_size, mem.slots - start)
            frames = mem.frames[start : start + count]
            positions = mem.positions[start : start + count].copy()
            handed = float(mem.stamps[start : start + count].min())
            try:
                if run.core.probe is None:  # the parent writes these before the first frames
                    if not mem.header[Header.PATTERN_SET]:
                        raise RuntimeError("no mean pattern arrived before the first frames")
                    rule = run.core.rule  # the parent settled it on the same frames
                    settled_bin = int(mem.header[Header.RULE_BIN])
                    run.core.rule = InputRule(rule.crop, rule.model, settled_bin)
                    self.take_probe(run)
                    if run.core.probe is None:  # no run probe yet: the guess, as the solver's
                        run.core.probe = initial_probe(
                            np.sqrt(mem.pattern)[None],  # one frame whose intensity is the mean
                            footprint_px=run.footprint_px,
                            defocus_sign=run.defocus_sign,
                        )
                else:
                    self.take_probe(run)
                outside = run.core.process(frames, positions)
            except Exception as exc:
                self.fail(run, exc, "NN inference failed")
                return True
            finally:
                run.consumed += count
                mem.header[Header.CONSUMED] = run.consumed
            now = time.monotonic()
            snapshot = False
            if now - run.last_publish >= run.interval_s:
                run.last_publish = now
                snapshot = self.publish(run)
            self.send(
                (
                    "progress",
                    run.run_id,
                    count,
                    outside,
                    now - handed,
                    run.core.infer_seconds,
                    snapshot,
                )
            )
            return True
        if run.finishing:
            final = self.publish(run)
            self.send(("done", run.run_id, final))
            mem.close()
            self.run = None
            return True
        return False


def child_main(
    inbox: Connection,
    outbox: Connection,
    wake: Any,
    lock: Any,
    parent_pid: int,
    key: WorkerKey,
    log_level: int,
    death_signal: bool,
) -> None:
    """Entry point of an NN worker: serve the parent's messages and drain the open run's
    ring until told to quit or the parent is gone."""
    exit_with_parent(parent_pid, death_signal=death_signal)
    child = _Child(inbox, outbox, wake, lock, key)
    root = logging.getLogger()
    root.handlers[:] = [LogToParent(child.send)]
    root.setLevel(log_level)
    try:
        while True:
            while inbox.poll(0):
                if not child.handle(inbox.recv()):
                    return
            if child.step():
                continue
            wake.acquire(timeout=0.25)
            if os.getppid() != parent_pid:
                return
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the parent is gone
