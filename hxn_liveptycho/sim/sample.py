"""The simulated experiment: a phantom in a focused beam, seen by an Eiger at HXN's geometry.

Everything physical is in stage units (µm) so the simulated detectors and the
live reconstruction meet only through what HXN's real ones put on the wire:
diffraction frames, and encoder counts with HXN's scale-factor convention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hxn_liveptycho.sim.optics import make_probe, sample_pixel_size_m, wavelength_m
from hxn_liveptycho.sim.phantom import make_object, simulate_diffraction

SI111_D_ANGSTROM = 3.1355893


def dcm_theta_deg(energy_kev: float) -> float:
    """Monochromator angle that selects ``energy_kev`` (inverse of the baseline decoding)."""
    return math.degrees(math.asin(12.39842 / (2.0 * SI111_D_ANGSTROM * energy_kev)))


@dataclass(frozen=True)
class SimulatedBeamline:
    """Beam, detector and scan parameters of a small HXN-like ptychography scan."""

    energy_kev: float = 12.0
    distance_m: float = 2.05
    detector_pixel_m: float = 75e-6
    detector_shape: tuple[int, int] = (256, 256)
    beam_center: tuple[int, int] = (131, 122)
    window: int = 128
    x_num: int = 20
    y_num: int = 20
    step_px: float = 9.0
    jitter_px: float = 0.6
    photons_per_frame: float = 5e5
    samples_per_frame: int = 10
    x_scale_factor: float = 1.0
    z_scale_factor: float = 1.0
    bad_pixels: tuple[tuple[int, int], ...] = ((40, 200), (131, 30), (220, 122))
    seed: int = 7

    def __post_init__(self) -> None:
        n, (rows, cols), (cy, cx) = self.window, self.detector_shape, self.beam_center
        top, left = cy - n // 2, cx - n // 2
        if top < 0 or left < 0 or top + n > rows or left + n > cols:
            raise ValueError(
                f"a {n}-pixel window around the beam centre {self.beam_center} does not fit "
                f"the {rows}x{cols} detector; give a larger detector_shape or move beam_center"
            )

    @classmethod
    def for_window(cls, window: int, **fields: Any) -> SimulatedBeamline:
        """A beamline whose detector holds a ``window``-pixel crop: the default 256² detector
        while the window fits it, else a square one 64 pixels larger, the beam a little off
        its centre as on a real detector (so a crop that assumed the centre would show)."""
        rows, cols = cls.detector_shape
        cy, cx = cls.beam_center
        if window // 2 <= min(cy, cx) and window - window // 2 <= min(rows - cy, cols - cx):
            return cls(window=window, **fields)
        side = window + 64
        return cls(
            window=window,
            detector_shape=(side, side),
            beam_center=(side // 2 + 3, side // 2 - 6),
            **fields,
        )

    @property
    def wavelength_m(self) -> float:
        return wavelength_m(self.energy_kev)

    @property
    def pixel_size_m(self) -> float:
        return sample_pixel_size_m(
            self.wavelength_m, self.distance_m, self.window, self.detector_pixel_m
        )

    @property
    def step_um(self) -> float:
        return self.step_px * self.pixel_size_m * 1e6

    def scan_input(self) -> list[float]:
        """HXN's ``scan_input``: [x_start, x_end, x_num, y_start, y_end, y_num] in µm, centred."""
        half_x = self.step_um * (self.x_num - 1) / 2
        half_y = self.step_um * (self.y_num - 1) / 2
        return [-half_x, half_x, self.x_num, -half_y, half_y, self.y_num]


@dataclass
class SimulatedSample:
    """Object, probe, actual (jittered) positions and the frames they make, computed once."""

    beamline: SimulatedBeamline = field(default_factory=SimulatedBeamline)

    def __post_init__(self) -> None:
        bl = self.beamline
        rng = np.random.default_rng(bl.seed)
        x0, _, nx, y0, _, ny = bl.scan_input()
        iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        step = bl.step_um
        jitter = bl.jitter_px * bl.pixel_size_m * 1e6
        y = (
            y0
            + iy * step
            + rng.normal(0.0, jitter, (int(ny), int(nx)))
            + rng.normal(0.0, jitter / 2, (int(ny), 1))
        )
        x = x0 + ix * step + rng.normal(0.0, jitter, (int(ny), int(nx)))
        #: Actual positions of the probe centre, (N, 2) (y, x) in µm.
        self.positions_um = np.stack([y.ravel(), x.ravel()], axis=1)
        dx_um = bl.pixel_size_m * 1e6
        n = bl.window
        self.origin_um = self.positions_um.min(axis=0) - (n / 2 + 4) * dx_um
        extent = self.positions_um.max(axis=0) - self.origin_um
        rows, cols = (math.ceil(e / dx_um) + n // 2 + 8 for e in extent)
        self.object = make_object((rows, cols))
        self.probe = make_probe(n, pixel_size_m=bl.pixel_size_m, wavelength_m=bl.wavelength_m)
        #: Top-left corners of each probe window in object pixels (what a solver must find).
        self.positions_px = (self.positions_um - self.origin_um) / dx_um - n / 2
        # The frames are drawn from this generator when first asked for, so that the
        # RunEngine's copy of a sample (positions, encoders) never pays for them: the
        # simulated Eiger's process makes its own, the same numbers from the same state.
        self._noise_rng = rng

    @functools.cached_property
    def intensities(self) -> np.ndarray:
        """Poisson diffraction frames (N, window, window) float32, zero frequency at the centre."""
        bl = self.beamline
        return simulate_diffraction(
            self.object,
            self.probe,
            self.positions_px,
            photons_per_frame=bl.photons_per_frame,
            rng=self._noise_rng,
        )

    @property
    def num_points(self) -> int:
        return len(self.positions_um)

    def detector_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as the Eiger reads it out: uint32 counts, pattern at the beam centre."""
        bl = self.beamline
        frame = np.zeros(bl.detector_shape, dtype=np.uint32)
        n = bl.window
        top, left = bl.beam_center[0] - n // 2, bl.beam_center[1] - n // 2
        frame[top : top + n, left : left + n] = self.intensities[index]
        for row, col in bl.bad_pixels:
            frame[row, col] = np.iinfo(np.uint32).max
        return frame

    def encoder_samples(
        self, index: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """The PandA's encoder counts during frame ``index``: x moves through the exposure."""
        bl = self.beamline
        k = bl.samples_per_frame
        y_um, x_um = self.positions_um[index]
        sweep = (np.arange(k) - (k - 1) / 2) / k * bl.step_um
        x = x_um + sweep + rng.normal(0.0, 0.002, k)
        y = y_um + rng.normal(0.0, 0.002, k)
        # HXN: position_um = counts * ratio * direction, ratio = -scale / 1e4, direction = -1.
        return x * 1e4 / bl.x_scale_factor, y * 1e4 / bl.z_scale_factor
