"""The NN branch of one run: its own thread, a bounded queue, and the live mosaic.

The session hands every batch of preprocessed frames to :meth:`NNBranch.submit`,
which only appends to a queue (or drops the frames, counted, when the queue
is full), so the iterative solver never waits for the network and the network
never waits for the solver. The branch's thread runs inference in batches,
blends the predictions into the mosaic, and publishes it at most every
``interval_s``; it counts what it inferred, dropped, and how far it lags.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.counters import Counters
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.backends import InferenceBackend, open_backend
from hxn_liveptycho.nn.mosaic import Mosaic, footprint_weight
from hxn_liveptycho.nn.registry import ModelInfo, ModelRegistry
from hxn_liveptycho.recon.probe import initial_probe

if TYPE_CHECKING:
    from hxn_liveptycho.geometry import CanvasGeometry
    from hxn_liveptycho.scan import ScanConfig
    from hxn_liveptycho.settings import Settings

logger = logging.getLogger(__name__)

Publish = Callable[[Mapping[str, Any]], None]


def check_input_shape(model: ModelInfo, backend: InferenceBackend, crop: int) -> None:
    """A model that does not take the configured crop is refused before any frame arrives."""
    if tuple(backend.input_hw) != (crop, crop):
        h, w = backend.input_hw
        raise ConfigurationError(
            f"model {model.name!r} expects {h}x{w} diffraction patches but the configured "
            f"crop is {crop}x{crop} (roi.size); choose a model trained for {crop}x{crop} or "
            f"set roi.size to {h}"
        )


class NNBranch:
    """Runs one model over one run's frames and keeps the blended mosaic."""

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
        name: str = "liveptycho-nn",
        log: logging.Logger | logging.LoggerAdapter = logger,
    ) -> None:
        self.model = model
        self.backend = backend
        self.canvas_shape = canvas_shape
        self.window = window
        self.batch_size = batch_size
        self.max_queued_frames = max_queued_frames
        self.interval_s = interval_s
        self.footprint_px = footprint_px
        self.defocus_sign = defocus_sign
        self.log = log
        self.counters = Counters(
            [
                "nn_frames_submitted",
                "nn_frames_inferred",
                "nn_frames_dropped",
                "nn_batches",
                "nn_snapshots",
                "nn_frames_outside",
            ]
        )
        self.error: str | None = None
        self.max_lag_s = 0.0
        self.infer_seconds = 0.0
        self._publish = publish
        self._mosaic: Mosaic | None = None
        self._cond = threading.Condition()
        self._queue: deque[tuple[np.ndarray, np.ndarray, float]] = deque()
        self._queued = 0
        self._closing = False
        self._last_publish = 0.0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # ---- session side ------------------------------------------------------------------
    def submit(self, amplitudes: np.ndarray, positions_px: np.ndarray) -> None:
        """Queue frames (k, n, n) with their window corners (k, 2); never blocks."""
        k = len(amplitudes)
        self.counters.add("nn_frames_submitted", k)
        with self._cond:
            if self.error is not None or self._queued + k > self.max_queued_frames:
                dropped_before = self.counters.get("nn_frames_dropped")
                self.counters.add("nn_frames_dropped", k)
                if dropped_before == 0:
                    self.log.warning(
                        "NN branch is %s: dropping frames (counted as nn_frames_dropped)",
                        "failed" if self.error else f"{self._queued} frames behind",
                    )
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

    def describe(self) -> dict[str, Any]:
        """The model and how the branch did, for the run's metadata."""
        info: dict[str, Any] = {
            "model": self.model.name,
            "model_sha256": self.model.sha256,
            "model_source": self.model.source,
            "backend": self.backend.name,
            "batch_size": self.batch_size,
            "max_lag_s": round(self.max_lag_s, 3),
            "infer_seconds": round(self.infer_seconds, 3),
            **self.counters.snapshot(),
        }
        if self.model.card is not None:
            info["model_version"] = self.model.card.version
        if self.error:
            info["error"] = self.error
        return info

    def snapshot(self) -> dict[str, Any] | None:
        mosaic = self._mosaic
        if mosaic is None:
            return None
        return {
            "object": mosaic.image(),
            "coverage": mosaic.coverage,
            "frames": mosaic.placed,
        }

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
        began = time.monotonic()
        amplitude, phase = self.backend.infer(amplitudes)
        self.infer_seconds += time.monotonic() - began
        if self._mosaic is None:
            probe = initial_probe(
                amplitudes, footprint_px=self.footprint_px, defocus_sign=self.defocus_sign
            )
            weight = footprint_weight(probe, amplitude.shape[-1])
            self._mosaic = Mosaic(self.canvas_shape, self.window, weight)
        outside = self._mosaic.outside
        self._mosaic.add(amplitude, phase, positions)
        self.counters.add("nn_frames_outside", self._mosaic.outside - outside)
        self.counters.add("nn_frames_inferred", len(amplitudes))
        self.counters.add("nn_batches")
        self.max_lag_s = max(self.max_lag_s, time.monotonic() - min(t[2] for t in taken))
        now = time.monotonic()
        if now - self._last_publish >= self.interval_s:
            self._last_publish = now
            self._publish(self.snapshot() or {})
            self.counters.add("nn_snapshots")


def start_nn_branch(
    config: ScanConfig,
    settings: Settings,
    geometry: CanvasGeometry,
    publish: Publish,
    log: logging.Logger | logging.LoggerAdapter = logger,
    *,
    device_id: int = 0,
) -> NNBranch:
    """Load the run's model on the configured runtime and GPU ``device_id`` (ignored by a CPU
    runtime); refuse a mismatched one."""
    model = ModelRegistry(settings.model_dir).get(config.nn.model)
    backend = open_backend(
        model.path,
        model.io(),
        kind=settings.nn_backend,
        device_id=device_id,
        cache_dir=settings.data_dir / "tensorrt-engines",
        max_batch=config.nn.batch_size,
        cpu_threads=max(1, (os.cpu_count() or 2) // 2),  # on a CPU, leave half to the rest
    )
    try:
        check_input_shape(model, backend, config.roi.size)
    except ConfigurationError:
        backend.close()
        raise
    if model.card is not None and model.card.geometry is not None:
        trained = model.card.geometry.object_pixel_m
        if abs(config.pixel_size_m / trained - 1) > 0.05:
            log.warning(
                "model %s was trained for %.2f nm object pixels; this scan has %.2f nm",
                model.name,
                trained * 1e9,
                config.pixel_size_m * 1e9,
            )
    log.info("NN branch: model %s (%s) on %s", model.name, model.source, backend.name)
    return NNBranch(
        model,
        backend,
        canvas_shape=geometry.canvas_shape,
        window=geometry.window,
        batch_size=config.nn.batch_size,
        max_queued_frames=config.nn.max_queued_frames,
        publish=publish,
        interval_s=settings.live_interval_s,
        footprint_px=config.probe_footprint_px,
        defocus_sign=config.probe.defocus_sign,
        name=f"liveptycho-nn-{config.scan_id}",
        log=log,
    )
