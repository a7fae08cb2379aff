"""What an NN branch does wherever it runs: input checks, inference and blending, bookkeeping.

Why a module of its own: both kinds of branch build on it, the one on a thread
(:mod:`~hxn_liveptycho.nn.branch`) and the one in a child process
(:mod:`~hxn_liveptycho.nn.process`), and ``branch`` chooses between them; with
the shared parts here the imports point one way (branch -> process -> core).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hxn_liveptycho.nn.interface import InferenceBackend
from hxn_liveptycho.nn.mosaic import Mosaic, footprint_weight, probe_weight, to_complex
from hxn_liveptycho.nn.registry import ModelInfo
from hxn_liveptycho.nn.resample import Fit, InputRule, choose_rule
from hxn_liveptycho.recon.probe import pupil_radius_px
from hxn_liveptycho.util.counters import Counters

__all__ = [
    "COUNTER_NAMES",
    "BranchBase",
    "BranchCore",
    "Publish",
    "check_input_shape",
    "settle_rule",
    "trained_disc_px",
    "trained_pixel_m",
]

logger = logging.getLogger(__name__)

Publish = Callable[[Mapping[str, Any]], None]

COUNTER_NAMES = (
    "nn_frames_submitted",
    "nn_frames_inferred",
    "nn_frames_dropped",
    "nn_batches",
    "nn_snapshots",
    "nn_frames_outside",
)


def trained_pixel_m(model: ModelInfo) -> float | None:
    """The object pixel the model was trained for, when its card says."""
    if model.card is None or model.card.geometry is None:
        return None
    return model.card.geometry.object_pixel_m


def check_input_shape(
    model: ModelInfo,
    backend: InferenceBackend | tuple[int, int],
    crop: int,
    *,
    fit: Fit = "auto",
    pixel_size_m: float | None = None,
) -> InputRule:
    """How the run's ``crop`` reaches the model's input; a crop no rule fits is refused
    before any frame arrives."""
    h, w = backend if isinstance(backend, tuple) else backend.input_hw
    if h != w:
        from hxn_liveptycho.errors import ConfigurationError

        raise ConfigurationError(f"model {model.name!r} takes {h}x{w} patterns; only square")
    return choose_rule(
        crop,
        int(h),
        fit=fit,
        pixel_size_m=pixel_size_m,
        trained_pixel_m=trained_pixel_m(model),
        model_name=model.name,
    )


def trained_disc_px(model: ModelInfo) -> tuple[float, float] | None:
    """The bright-field disc radius range of the model's training probes, when its card says."""
    if model.card is None or model.card.geometry is None:
        return None
    return model.card.geometry.bright_field_radius_px


def settle_rule(
    rule: InputRule,
    fit: Fit | None,
    mean_pattern: np.ndarray,
    model: ModelInfo,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> InputRule:
    """The rule once the run's first frames are in: with ``fit="auto"`` and a card that
    gives the trained bright-field disc, the binning that brings the measured disc closest
    to it (:func:`~hxn_liveptycho.nn.resample.choose_rule`); and a warning when the disc the
    network will see is far outside what it was trained on, whatever the rule."""
    trained = trained_disc_px(model)
    if trained is None:
        return rule
    radius = pupil_radius_px(np.asarray(mean_pattern, np.float64))
    if fit == "auto" and not rule.identity:
        settled = choose_rule(
            rule.crop,
            rule.model,
            disc_radius_px=radius,
            trained_disc_px=trained,
            model_name=model.name,
        )
        if settled != rule:
            log.info(
                "NN branch input, from the beam's disc in the first frames: %s", settled.describe()
            )
        rule = settled
    seen = radius / rule.bin
    lo, hi = trained
    if not 0.85 * lo <= seen <= 1.15 * hi:
        log.warning(
            "the beam's bright-field disc is %.1f px in model %s's input (radius), which was "
            "trained on %.1f-%.1f px: expect a poor NN mosaic",
            seen,
            model.name,
            lo,
            hi,
        )
    return rule


class BranchCore:
    """Inference and blending for one run, wherever the branch's worker runs.

    The mosaic is made on the first batch, once the probe (from the run's own
    frames at the run's crop) and the network's patch size are known.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        rule: InputRule,
        *,
        canvas_shape: tuple[int, int],
        window: int,
    ) -> None:
        self.backend = backend
        self.rule = rule
        self.canvas_shape = canvas_shape
        self.window = window
        self.probe: np.ndarray | None = None
        self.mosaic: Mosaic | None = None
        self.infer_seconds = 0.0

    def use_probe(self, modulus: np.ndarray) -> None:
        """The run's probe (its modulus, (n, n)) once known: the first mosaic is made with
        it, or the mosaic's blending weights follow its footprint from the next patch."""
        if self.mosaic is None:
            self.probe = modulus
        else:
            mosaic = self.mosaic
            mosaic.set_weight(probe_weight(modulus, mosaic.patch, mosaic.scale))

    def process(self, frames: np.ndarray, positions_px: np.ndarray) -> int:
        """Infer ``frames`` (already at the model's input size), blend them; frames off
        the canvas."""
        began = time.monotonic()
        amplitude, phase = self.backend.infer(frames)
        self.infer_seconds += time.monotonic() - began
        if self.mosaic is None:
            if self.probe is None:
                raise RuntimeError("the branch has no probe estimate before its first batch")
            s = self.rule.scale
            # The probe's footprint on the patch, sampled at the network's pixel.
            weight = footprint_weight(self.probe, amplitude.shape[-1] * s)[::s, ::s]
            self.mosaic = Mosaic(self.canvas_shape, self.window, weight, scale=s)
        outside = self.mosaic.outside
        self.mosaic.add_complex(to_complex(amplitude, phase), positions_px)
        return self.mosaic.outside - outside

    def snapshot(self) -> dict[str, Any] | None:
        mosaic = self.mosaic
        if mosaic is None:
            return None
        return {"object": mosaic.image(), "coverage": mosaic.coverage, "frames": mosaic.placed}


class BranchBase:
    """What both kinds of branch share: counters, the drop rule, the run's metadata."""

    def __init__(
        self,
        model: ModelInfo,
        rule: InputRule,
        *,
        batch_size: int,
        max_queued_frames: int,
        log: logging.Logger | logging.LoggerAdapter,
    ) -> None:
        self.model = model
        self.rule = rule
        self.batch_size = batch_size
        self.max_queued_frames = max_queued_frames
        self.log = log
        self.counters = Counters(COUNTER_NAMES)
        self.error: str | None = None
        self.max_lag_s = 0.0
        self.infer_seconds = 0.0

    @property
    def backend_name(self) -> str:
        raise NotImplementedError

    def _drop(self, k: int, behind: int) -> None:
        dropped_before = self.counters.get("nn_frames_dropped")
        self.counters.add("nn_frames_dropped", k)
        if dropped_before == 0:
            self.log.warning(
                "NN branch is %s: dropping frames (counted as nn_frames_dropped)",
                "failed" if self.error else f"{behind} frames behind",
            )

    def describe(self) -> dict[str, Any]:
        """The model and how the branch did, for the run's metadata."""
        info: dict[str, Any] = {
            "model": self.model.name,
            "model_sha256": self.model.sha256,
            "model_source": self.model.source,
            "backend": self.backend_name,
            "batch_size": self.batch_size,
            "input_rule": self.rule.describe(),
            "max_lag_s": round(self.max_lag_s, 3),
            "infer_seconds": round(self.infer_seconds, 3),
            **self.counters.snapshot(),
        }
        if self.model.card is not None:
            info["model_version"] = self.model.card.version
        if self.error:
            info["error"] = self.error
        return info
