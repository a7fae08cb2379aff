"""The training set, simulated with the project's own forward model (hxn_liveptycho.sim).

For each random object and random probe (zone-plate probe of varied size,
central stop, defocus and aberrations: :func:`hxn_liveptycho.sim.optics.make_probe`),
frames at random positions come from
:func:`hxn_liveptycho.sim.phantom.simulate_diffraction` with Poisson noise at a
random flux. Inputs are the measured amplitudes sqrt(counts); targets are the
central ``out_size`` crop of the object under the probe window, normalised as the
single frame can know it: the global phase is set so the probe-weighted mean of
the patch is real and positive, and the amplitude is divided by its
probe-weighted RMS (a frame's total counts fix only the product of flux and
transmission). The loss weight is the probe intensity on the crop.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from typing import Any

import numpy as np

from hxn_liveptycho.sim.optics import make_probe, sample_pixel_size_m, wavelength_m
from hxn_liveptycho.sim.phantom import simulate_diffraction
from training.phantoms import load_images, random_object

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """The physical geometry the model is trained for (HXN's, as the simulator uses it)."""

    energy_kev: float = 12.0
    distance_m: float = 2.05
    detector_pixel_m: float = 75e-6
    window: int = 128
    out_size: int = 64

    @property
    def wavelength_m(self) -> float:
        return wavelength_m(self.energy_kev)

    @property
    def pixel_size_m(self) -> float:
        return sample_pixel_size_m(
            self.wavelength_m, self.distance_m, self.window, self.detector_pixel_m
        )


def _objects_worker(args: tuple[tuple[str, ...], int, int, int]) -> list[np.ndarray]:
    names, size, count, seed = args
    images = load_images(names)
    rng = np.random.default_rng(seed)
    return [random_object(images, size, rng) for _ in range(count)]


def make_objects(
    names: tuple[str, ...], count: int, size: int, seed: int, workers: int
) -> list[np.ndarray]:
    """``count`` random objects built in ``workers`` processes (before any CUDA context)."""
    per = -(-count // workers)
    jobs = [(names, size, min(per, count - i * per), seed * 1000 + i) for i in range(workers)]
    jobs = [j for j in jobs if j[2] > 0]
    if workers == 1:
        return _objects_worker(jobs[0])
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        return [o for part in pool.map(_objects_worker, jobs) for o in part]


def random_probe(geom: Geometry, rng: np.random.Generator, xp: Any) -> Any:
    """A zone-plate probe with randomly varied optics around the nominal HXN one."""
    n = geom.window
    return make_probe(
        n,
        pixel_size_m=geom.pixel_size_m,
        wavelength_m=geom.wavelength_m,
        outer_radius_px=n * 0.22 * rng.uniform(0.9, 1.1),
        central_stop=rng.uniform(0.3, 0.5),
        footprint_px=n * rng.uniform(0.22, 0.34),
        aberration_rms_rad=rng.uniform(0.0, 0.6),
        rng=int(rng.integers(2**31)),
        xp=xp,
    )


def normalised_targets(patches: Any, probe: Any, out_size: int, xp: Any) -> tuple[Any, Any, Any]:
    """(amplitude, phase, weight) of the central crop, in the single frame's normalisation."""
    n = patches.shape[-1]
    lo = (n - out_size) // 2
    sl = (slice(None), slice(lo, lo + out_size), slice(lo, lo + out_size))
    w_full = xp.abs(probe) ** 2
    weighted = xp.sum(w_full[None] * patches, axis=(-2, -1))
    rms = xp.sqrt(xp.sum(w_full[None] * xp.abs(patches) ** 2, axis=(-2, -1)) / xp.sum(w_full))
    crop = patches[sl] * xp.conj(weighted / xp.abs(weighted))[:, None, None]
    amplitude = (xp.abs(crop) / rms[:, None, None]).astype(xp.float32)
    phase = xp.angle(crop).astype(xp.float32)
    weight = w_full[lo : lo + out_size, lo : lo + out_size]
    return amplitude, phase, (weight / weight.max()).astype(xp.float32)


def simulate_set(
    objects: list[np.ndarray],
    geom: Geometry,
    *,
    frames_per_object: int,
    seed: int,
    xp: Any,
) -> dict[str, Any]:
    """Frames and targets (on ``xp``'s device): diffraction, amplitude, phase, weight."""
    rng = np.random.default_rng(seed)
    n, m = geom.window, geom.out_size
    out: dict[str, list[Any]] = {"diffraction": [], "amplitude": [], "phase": [], "weight": []}
    for obj in objects:
        obj_x = xp.asarray(obj)
        probe = random_probe(geom, rng, xp)
        h, w = obj.shape
        pos = np.stack(
            [
                rng.integers(0, h - n + 1, frames_per_object),
                rng.integers(0, w - n + 1, frames_per_object),
            ],
            axis=1,
        ).astype(np.float64)
        photons = float(np.exp(rng.uniform(np.log(3e4), np.log(5e6))))
        counts = simulate_diffraction(
            obj_x, probe, pos, photons_per_frame=photons, rng=rng, subpixel=False
        )
        rows = xp.asarray(pos[:, 0].astype(np.int64))[:, None, None] + xp.arange(n)[None, :, None]
        cols = xp.asarray(pos[:, 1].astype(np.int64))[:, None, None] + xp.arange(n)[None, None, :]
        amplitude, phase, weight = normalised_targets(obj_x[rows, cols], probe, m, xp)
        out["diffraction"].append(xp.sqrt(counts).astype(xp.float16))
        out["amplitude"].append(amplitude)
        out["phase"].append(phase)
        out["weight"].append(xp.broadcast_to(weight, amplitude.shape).astype(xp.float16))
    return {k: xp.concatenate(v) for k, v in out.items()}
