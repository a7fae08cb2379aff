"""A model trained for one detector crop, run at a larger one: which pixels it sees.

A run's crop ``n`` fixes the reconstruction's pixel, ``dx = lambda z / (n p)``,
and its probe window, ``n dx = lambda z / p`` (the same physical size for any
crop). A model takes ``m`` x ``m`` patterns; for ``n = k m`` there are two
ways, and every mix of them, to give it ``m`` pixels:

- **crop** the central ``m`` x ``m``: the detector pixel stays ``p``, so the
  network sees exactly what an ``m`` crop of the same beamline would have
  recorded (same speckle size, same bright-field disc in pixels, same probe
  window), and answers at the object pixel ``k dx`` over the whole window:
  the training geometry, at the coarser pixel the model was built for;
- **bin** ``k`` x ``k`` detector pixels: the q-range stays, so the answer is at
  the run's own pixel ``dx``, but the pattern is sampled at ``k p``: the
  window shrinks to ``1/k`` of the probe's (the beam fills ``k`` times more of
  it than in training and its far field is ``k`` times smaller in pixels);
- in general, bin by ``b`` then crop, with ``b s = k``: object pixel ``s dx``.

What the network needs is what it was trained on. For a beamline whose
optics do not change with the crop, cropping is exactly that (the shipped
model's 22 nm at HXN's 12 keV, 2.05 m, 75 µm, where a 256² run is 11 nm),
and binning puts the beam twice as wide into half the window: on simulated
256² scans of the same beamline the mosaic's phase correlated with the
phantom at r = 0.93 cropped (0.94 at the native 128²) and not at all binned
(docs/nn.md). So ``auto`` decides from what the network will see:

1. with the card's trained bright-field disc (``geometry.bright_field_radius_px``)
   and the run's first frames, the ``b`` that brings the measured disc
   radius (``R / b`` input pixels) closest to the trained one: the disc is
   the largest feature of the pattern and the one a scan's metadata can get
   wrong (a different zone plate, a misread distance);
2. else with the card's object pixel, the ``b`` whose ``s dx`` is closest to it;
3. else crop (the model is assumed to be trained at the run's detector).

The patches come back ``s`` times coarser than the run's canvas, centred on
the probe window as at the native crop; the mosaic blends them on a grid of
their own pixel and interpolates it onto the canvas
(:class:`~hxn_liveptycho.nn.mosaic.Mosaic` with ``scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hxn_liveptycho.errors import ConfigurationError

Fit = Literal["auto", "crop", "bin"]

__all__ = ["Fit", "InputRule", "choose_rule"]


@dataclass(frozen=True)
class InputRule:
    """How ``crop`` x ``crop`` frames become ``model`` x ``model`` network inputs and back."""

    crop: int
    model: int
    bin: int = 1

    def __post_init__(self) -> None:
        if self.crop % self.model or (self.crop // self.model) % self.bin:
            raise ValueError(f"no rule takes {self.crop} to {self.model} binning by {self.bin}")

    @property
    def factor(self) -> int:
        """k = crop / model."""
        return self.crop // self.model

    @property
    def scale(self) -> int:
        """s: the network's object pixel in canvas pixels."""
        return self.factor // self.bin

    @property
    def identity(self) -> bool:
        return self.crop == self.model

    def describe(self) -> str:
        if self.identity:
            return f"{self.crop}x{self.crop} as is"
        how = [f"binned {self.bin}x{self.bin}"] if self.bin > 1 else []
        if self.scale > 1:
            how.append(f"central {self.model}x{self.model} kept")
        return (
            f"{self.crop}x{self.crop} frames {', '.join(how)}; "
            f"patches at {self.scale}x the canvas pixel"
        )

    def frames(self, amplitudes: np.ndarray) -> np.ndarray:
        """(B, crop, crop) amplitudes -> (B, model, model) float32 amplitudes.

        Binning adds counts, so amplitudes are squared, summed and rooted.
        """
        x = np.asarray(amplitudes, dtype=np.float32)
        if self.identity:
            return x
        b = self.bin
        if b > 1:
            side = self.crop // b
            x = np.sqrt(np.square(x).reshape(len(x), side, b, side, b).sum(axis=(2, 4)))
        side = x.shape[-1]
        lo = side // 2 - self.model // 2  # the zero frequency stays at index model // 2
        return np.ascontiguousarray(x[:, lo : lo + self.model, lo : lo + self.model])

    def patch_size(self, out: int) -> int:
        """Canvas pixels covered by an ``out``-pixel network patch."""
        return out * self.scale


def choose_rule(
    crop: int,
    model: int,
    *,
    fit: Fit = "auto",
    pixel_size_m: float | None = None,
    trained_pixel_m: float | None = None,
    disc_radius_px: float | None = None,
    trained_disc_px: tuple[float, float] | None = None,
    model_name: str = "the model",
) -> InputRule:
    """The rule for a run's ``crop`` and a model's input ``model``; refuses what none fits.

    ``auto`` brings the measured bright-field disc (``disc_radius_px``, in the
    run's detector pixels) closest to the trained one when both are given,
    else the object pixel closest to the trained one, else crops.
    """
    if crop == model:
        return InputRule(crop, model)
    if crop < model or crop % model:
        raise ConfigurationError(
            f"model {model_name!r} expects {model}x{model} diffraction patches but the "
            f"configured crop is {crop}x{crop} (roi.size); a larger crop must be an integer "
            f"multiple of {model} to be binned or cropped to it: choose a model trained for "
            f"{crop}x{crop} or set roi.size to {model} or a multiple of it"
        )
    k = crop // model
    if fit == "crop":
        return InputRule(crop, model, 1)
    if fit == "bin":
        return InputRule(crop, model, k)
    bins = [b for b in range(1, k + 1) if k % b == 0]
    if disc_radius_px is not None and trained_disc_px is not None and disc_radius_px > 0:
        target = math.sqrt(trained_disc_px[0] * trained_disc_px[1])
        radius = disc_radius_px
        return InputRule(crop, model, min(bins, key=lambda b: abs(math.log(radius / b / target))))
    if pixel_size_m is None or trained_pixel_m is None:
        return InputRule(crop, model, 1)
    dx, trained = pixel_size_m, trained_pixel_m
    return InputRule(crop, model, min(bins, key=lambda b: abs(math.log(dx * (k // b) / trained))))
