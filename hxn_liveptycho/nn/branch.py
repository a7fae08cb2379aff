"""The NN branch of one run: a bounded queue, inference, and the live mosaic.

The session hands every batch of preprocessed frames to ``submit``, which only
queues them (or drops them, counted, when the queue is full), so the iterative
solver never waits for the network and the network never waits for the
solver. Inference runs in batches, the predictions are blended into the
mosaic, and the mosaic is published at most every ``interval_s``.

Where inference runs is the branch's choice, not the session's: by default in
a child process on the branch's own device (:mod:`hxn_liveptycho.nn.process`:
frames through shared memory, the mosaic back through a one-slot mailbox),
because in the session's process it takes turns with the receivers, the
Tiled writer and the solver's launch loop on one interpreter lock;
:class:`NNBranch` is the same work on a thread of the caller's process, for
tests and for callers that must not spawn.

Frames of a larger crop than the model's input are cropped or binned to it
(:mod:`hxn_liveptycho.nn.resample`), and the patches brought back to the
canvas pixel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hxn_liveptycho.nn.backends import open_backend
from hxn_liveptycho.nn.core import (
    BranchBase,
    BranchCore,
    Publish,
    check_input_shape,
    settle_rule,
    trained_pixel_m,
)
from hxn_liveptycho.nn.interface import InferenceBackend
from hxn_liveptycho.nn.mosaic import beam_modulus
from hxn_liveptycho.nn.process import NNProcessBranch, WorkerKey, WorkerPool, probe_fits
from hxn_liveptycho.nn.registry import ModelInfo, ModelRegistry
from hxn_liveptycho.nn.resample import Fit, InputRule
from hxn_liveptycho.pipeline.probe_start import read_probe_file
from hxn_liveptycho.recon.probe import initial_probe

if TYPE_CHECKING:
    from hxn_liveptycho.config.scan import ScanConfig
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.pipeline.geometry import CanvasGeometry

# check_input_shape and settle_rule live in nn.core and are re-exported for callers of branch.
__all__ = ["NNBranch", "check_input_shape", "settle_rule", "start_nn_branch", "worker_key"]

logger = logging.getLogger(__name__)


class NNBranch(BranchBase):
    """Runs one model over one run's frames on a thread of this process."""

    def __init__(
        self,
        model: ModelInfo,
        backend: InferenceBackend,
        *,
        canvas_shape: tuple[int, int],
        window: int,
        batch_size: int,
        max_queued_frames: int,
        publish: Publish,
        interval_s: float,
        footprint_px: float | None = None,
        defocus_sign: int = 1,
        probe: np.ndarray | None = None,
        rule: InputRule | None = None,
        fit: Fit | None = None,
        name: str = "liveptycho-nn",
        log: logging.Logger | logging.LoggerAdapter = logger,
    ) -> None:
        rule = rule or check_input_shape(model, backend, window)
        self.fit = fit
        super().__init__(
            model, rule, batch_size=batch_size, max_queued_frames=max_queued_frames, log=log
        )
        self.backend = backend
        self.canvas_shape = canvas_shape
        self.window = window
        self.interval_s = interval_s
        self.footprint_px = footprint_px
        self.defocus_sign = defocus_sign
        self._core = BranchCore(backend, rule, canvas_shape=canvas_shape, window=window)
        self._publish = publish
        self._cond = threading.Condition()
        self._queue: deque[tuple[np.ndarray, np.ndarray, float]] = deque()
        self._queued = 0
        self._closing = False
        self._last_publish = 0.0
        #: The run's probe's modulus, known and not yet taken by the branch's thread.
        self._new_probe: np.ndarray | None = None
        if probe is not None and probe_fits(probe, window, log):
            self._new_probe = beam_modulus(probe)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # ---- session side ------------------------------------------------------------------
    def use_probe(self, probe: np.ndarray) -> None:
        """The run's starting probe (n, n) or modes (k, n, n), once known: the patches from
        the next batch on are blended with its footprint instead of the guess's."""
        if probe_fits(probe, self.window, self.log):
            modulus = beam_modulus(probe)
            with self._cond:
                self._new_probe = modulus

    def submit(self, amplitudes: np.ndarray, positions_px: np.ndarray) -> None:
        """Queue frames (k, n, n) with their window corners (k, 2); never blocks."""
        k = len(amplitudes)
        self.counters.add("nn_frames_submitted", k)
        with self._cond:
            if self.error is not None or self._queued + k > self.max_queued_frames:
                self._drop(k, self._queued)
                return
            self._queue.append((amplitudes, np.asarray(positions_px), time.monotonic()))
            self._queued += k
            self._cond.notify()

    def close(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Finish the queued frames (up to ``timeout``) and return the final mosaic."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log.error("NN branch did not finish its queue within %s s", timeout)
            return None
        self.backend.close()
        return self.snapshot()

    def snapshot(self) -> dict[str, Any] | None:
        return self._core.snapshot()

    # ---- the branch's thread -----------------------------------------------------------
    def _take(self) -> list[tuple[np.ndarray, np.ndarray, float]] | None:
        """Up to one batch of queued frames; None when closing and nothing is left."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            taken, count = [], 0
            while self._queue and count < self.batch_size:
                item = self._queue.popleft()
                taken.append(item)
                count += len(item[0])
            self._queued -= count
            return taken

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            if self.error is not None:
                continue
            try:
                self._infer(taken)
            except Exception as exc:  # the branch fails alone; the solver carries on
                self.error = f"{type(exc).__name__}: {exc}"
                self.log.exception("NN branch failed; the iterative branch is unaffected")

    def _infer(self, taken: list[tuple[np.ndarray, np.ndarray, float]]) -> None:
        amplitudes = np.concatenate([t[0] for t in taken])
        positions = np.concatenate([t[1] for t in taken])
        if self._core.probe is None:  # the first batch
            self._first_batch(amplitudes)
        else:
            self._take_probe()
        outside = self._core.process(self.rule.frames(amplitudes), positions)
        self.infer_seconds = self._core.infer_seconds
        self.counters.add("nn_frames_outside", outside)
        self.counters.add("nn_frames_inferred", len(amplitudes))
        self.counters.add("nn_batches")
        self.max_lag_s = max(self.max_lag_s, time.monotonic() - min(t[2] for t in taken))
        now = time.monotonic()
        if now - self._last_publish >= self.interval_s:
            self._last_publish = now
            self._publish(self.snapshot() or {})
            self.counters.add("nn_snapshots")

    def _first_batch(self, amplitudes: np.ndarray) -> None:
        """The rule settled on the first frames, and the probe the mosaic is made with: the
        run's when it is known, else the guess from these frames (as the solver's guess)."""
        mean_pattern = np.mean(np.square(amplitudes), axis=0, dtype=np.float64)
        if self.fit is not None:
            self.rule = self._core.rule = settle_rule(
                self.rule, self.fit, np.asarray(mean_pattern), self.model, self.log
            )
        self._take_probe()
        if self._core.probe is None:
            self._core.probe = initial_probe(
                np.sqrt(mean_pattern)[None],  # one frame whose intensity is the mean
                footprint_px=self.footprint_px,
                defocus_sign=self.defocus_sign,
            )

    def _take_probe(self) -> None:
        """A run probe given since the last batch: the first mosaic is made with it, or the
        mosaic's weights follow it from now on."""
        with self._cond:
            modulus, self._new_probe = self._new_probe, None
        if modulus is not None:
            self._core.use_probe(modulus)


def _file_probe(
    config: ScanConfig, log: logging.Logger | logging.LoggerAdapter
) -> np.ndarray | None:
    """The probe of ``probe.initial="file"``, for the weights; None (the guess) otherwise or
    when the file cannot be used (the solver's own reading says why)."""
    if config.probe.initial != "file" or not config.probe.file:
        return None
    try:
        return read_probe_file(config.probe.file, config.roi.size)
    except (OSError, ValueError) as exc:
        log.warning("NN branch: blending with the guessed probe's footprint (%s)", exc)
        return None


def worker_key(settings: Settings, device_id: int) -> WorkerKey:
    """The runtime a run's NN worker needs: an engine prestarts a worker with this key."""
    return WorkerKey(
        backend=settings.nn_backend,
        device_id=device_id,
        cache_dir=str(settings.data_dir / "tensorrt-engines"),
        cpu_threads=max(1, (os.cpu_count() or 2) // 2),  # on a CPU, leave half to the rest
    )


def start_nn_branch(
    config: ScanConfig,
    settings: Settings,
    geometry: CanvasGeometry,
    publish: Publish,
    log: logging.Logger | logging.LoggerAdapter = logger,
    *,
    device_id: int = 0,
    where: Literal["process", "thread"] = "process",
    pool: WorkerPool | None = None,
    probe: np.ndarray | None = None,
) -> NNBranch | NNProcessBranch:
    """The run's branch: its model on the configured runtime and GPU ``device_id`` (ignored
    by a CPU runtime), in a child process unless ``where="thread"``: a worker of ``pool``
    (an engine's, kept warm between runs) or, without one, a worker of its own that ends
    with the run.

    The mosaic's blending weights are the footprint of the run's starting probe when it is
    known before the first frames: ``probe`` (a series' seed, a resumed run's), or the file
    of ``probe.initial="file"``; otherwise of the guess from the first frames, and a probe
    known later (an estimate) is handed over with ``use_probe``. The branch never waits
    for it.

    The crop is checked against the model here, so a run whose crop no rule
    fits fails at its start; in a process, the model loads in the child while
    the first frames queue, and a runtime that cannot start fails the branch
    (recorded in its metadata), not the run.
    """
    model = ModelRegistry(settings.model_dir).get(config.nn.model)
    input_hw = model.input_hw()
    rule = check_input_shape(
        model, input_hw, config.roi.size, fit=config.nn.fit, pixel_size_m=config.pixel_size_m
    )
    trained = trained_pixel_m(model)
    seen_pixel = config.pixel_size_m * rule.scale
    if trained is not None and abs(seen_pixel / trained - 1) > 0.05:
        log.warning(
            "model %s was trained for %.2f nm object pixels; this scan gives it %.2f nm",
            model.name,
            trained * 1e9,
            seen_pixel * 1e9,
        )
    if not rule.identity:
        log.info("NN branch input: %s", rule.describe())
    if probe is None:
        probe = _file_probe(config, log)
    common: dict[str, Any] = {
        "canvas_shape": geometry.canvas_shape,
        "window": geometry.window,
        "batch_size": config.nn.batch_size,
        "max_queued_frames": config.nn.max_queued_frames,
        "publish": publish,
        "interval_s": settings.live_interval_s,
        "footprint_px": config.probe_footprint_px,
        "defocus_sign": config.probe.defocus_sign,
        "probe": probe,
        "rule": rule,
        "fit": config.nn.fit,
        "name": f"liveptycho-nn-{config.scan_id}",
        "log": log,
    }
    if where == "process":
        key = worker_key(settings, device_id)
        log.info("NN branch: model %s (%s) in its own process", model.name, model.source)
        return NNProcessBranch(model, key, pool=pool, **common)
    backend = open_backend(
        model.path,
        model.io(),
        kind=settings.nn_backend,
        device_id=device_id,
        cache_dir=settings.data_dir / "tensorrt-engines",
        max_batch=config.nn.batch_size,
        cpu_threads=worker_key(settings, device_id).cpu_threads,
    )
    log.info("NN branch: model %s (%s) on %s", model.name, model.source, backend.name)
    return NNBranch(model, backend, **common)
