"""A simulated Fermat spiral scan: the phantom seen at the points of HXN's ``fermat`` plan.

The stage visits the points bluesky's ``spiral_fermat`` pattern gives for the
spiral's arguments, in that order (consecutive points lie a golden angle apart,
so it stops at each one rather than flying a continuous line); the Eiger and the
PandA are triggered at each point as in the raster fly scan, and the PandA
records the encoders while the stage settles there. Only :attr:`positions_um`
and the encoder samples differ from :class:`~hxn_liveptycho.sim.sample.SimulatedSample`:
frames, probe and phantom are made the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hxn_liveptycho.config.scan_paths import FermatSpiral
from hxn_liveptycho.sim.optics import make_probe
from hxn_liveptycho.sim.phantom import make_object
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

#: Frames whose encoder samples the simulated PandA sends in one message (a spiral has no
#: rows to send them by).
FRAMES_PER_MESSAGE = 16


def spiral_for(beamline: SimulatedBeamline) -> FermatSpiral:
    """The spiral as dense as ``beamline``'s raster: ``dr`` such that one point falls on
    every ``step²`` (``π (dr / factor)² = step²``), over ``x_num`` x ``y_num`` steps, so about
    as many points as the raster has."""
    step = beamline.step_um
    return FermatSpiral(
        x_range=step * beamline.x_num,
        y_range=step * beamline.y_num,
        dr=step / math.sqrt(math.pi),
        factor=1.0,
    )


@dataclass
class SpiralSample(SimulatedSample):
    """The phantom scanned on a Fermat spiral; ``spiral`` None: :func:`spiral_for` the beamline."""

    spiral: FermatSpiral | None = field(default=None)

    def __post_init__(self) -> None:
        bl = self.beamline
        if self.spiral is None:
            self.spiral = spiral_for(bl)
        rng = np.random.default_rng(bl.seed)
        commanded = self.spiral.points()
        if len(commanded) < 2:
            raise ValueError(f"{self.spiral} has {len(commanded)} point: nothing to overlap")
        jitter = bl.jitter_px * bl.pixel_size_m * 1e6
        #: Actual positions of the probe centre, (N, 2) (y, x) in µm, in acquisition order.
        self.positions_um = commanded + rng.normal(0.0, jitter, commanded.shape)
        dx_um = bl.pixel_size_m * 1e6
        n = bl.window
        self.origin_um = self.positions_um.min(axis=0) - (n / 2 + 4) * dx_um
        extent = self.positions_um.max(axis=0) - self.origin_um
        rows, cols = (math.ceil(e / dx_um) + n // 2 + 8 for e in extent)
        self.object = make_object((rows, cols))
        self.probe = make_probe(n, pixel_size_m=bl.pixel_size_m, wavelength_m=bl.wavelength_m)
        self.positions_px = (self.positions_um - self.origin_um) / dx_um - n / 2
        self._noise_rng = rng

    def encoder_samples(
        self, index: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """The PandA's encoder counts during frame ``index``: the stage rests at the point."""
        bl = self.beamline
        k = bl.samples_per_frame
        y_um, x_um = self.positions_um[index]
        x = x_um + rng.normal(0.0, 0.002, k)
        y = y_um + rng.normal(0.0, 0.002, k)
        # HXN: position_um = counts * ratio * direction, ratio = -scale / 1e4, direction = -1.
        return x * 1e4 / bl.x_scale_factor, y * 1e4 / bl.z_scale_factor
