"""The simulated scan the solver tests share: one recipe, so every test sees the same physics."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.sim import optics, phantom

N = 64
ROOT = Path(__file__).resolve().parents[1]


def use_cupy_stand_in(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[types.ModuleType, types.ModuleType, list]:
    """Put the CuPy stand-in (:mod:`hxn_liveptycho.devtools.cupy_stand_in`: kernels are
    recorded no-ops) in place for one test: ``(its module, the stand-in, the launches it
    records)``."""
    from hxn_liveptycho.devtools import cupy_stand_in

    launches: list = []
    modules = cupy_stand_in.stand_in_modules(launches)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return cupy_stand_in, modules["cupy"], launches


def mix_modes_like_the_kernel(waves: np.ndarray, u: np.ndarray) -> None:
    """``liveptycho_mix_modes``' arithmetic (``recon._pass_end_kernels.mix_modes``) in
    NumPy: (B, K, ...) mixed over K by ``u``, in place."""
    shape = waves.shape
    waves[...] = np.matmul(u, waves.reshape(shape[0], shape[1], -1)).reshape(shape)


def phase_object_scan(
    n: int, side: int, step: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small noiseless raster over a random phase object (``side`` x ``side`` positions
    ``step`` px apart, 2 px from the edge of a canvas ``n + step * side + 4`` square) in a
    Gaussian probe of ``n``: the object, the probe, each frame's far-field amplitude
    (float64, zero frequency at the centre) and the positions (y, x) in pixels. ``rng``
    draws the object; a caller may go on drawing noise from it."""
    canvas = n + step * side + 4
    obj = np.exp(1j * rng.uniform(-0.5, 0.5, (canvas, canvas))).astype(np.complex64)
    yy, xx = np.mgrid[:n, :n] - n / 2
    probe = np.exp(-(yy**2 + xx**2) / (2 * (n / 6) ** 2)).astype(np.complex64)
    positions = np.array([(y * step + 2, x * step + 2) for y in range(side) for x in range(side)])
    amplitudes = np.stack(
        [
            np.abs(np.fft.fftshift(np.fft.fft2(probe * obj[y : y + n, x : x + n])))
            for y, x in positions
        ]
    )
    return obj, probe, amplitudes, positions.astype(np.float64)


class SimulatedScan:
    """A 15 x 15 fly scan, ~75 % linear overlap, 1e5 photons/frame with Poisson noise.

    The probe guess has the nominal optics without aberrations and the wrong
    defocus (beam 0.45 n, not 0.28 n). ``offset`` moves the scan into the
    canvas, ``pad`` is the canvas margin past the last window, and
    ``whole_pixels`` rounds the positions before the data are simulated.
    """

    def __init__(self, *, offset: float = 4, pad: int = 6, whole_pixels: bool = False) -> None:
        self.lam = optics.wavelength_m(12.0)
        self.dx = optics.sample_pixel_size_m(self.lam, 0.5, N, 75e-6)
        self.probe = optics.make_probe(N, pixel_size_m=self.dx, wavelength_m=self.lam, rng=1)
        self.probe_guess = optics.make_probe(
            N, pixel_size_m=self.dx, wavelength_m=self.lam, footprint_px=29
        )
        self.subpixel_positions = phantom.scan_positions(15, 15, 5.0, jitter_px=0.5, rng=2) + offset
        self.positions = (
            np.rint(self.subpixel_positions) if whole_pixels else self.subpixel_positions
        )
        top = self.positions.max(axis=0)
        self.canvas = (int(top[0]) + N + pad, int(top[1]) + N + pad)
        self.obj = phantom.make_object(self.canvas)
        frames = phantom.simulate_diffraction(
            self.obj, self.probe, self.positions, photons_per_frame=1e5, rng=3
        )
        self.amplitudes = np.sqrt(frames)
        self.mask = illuminated_mask(self.positions, self.probe, self.canvas)

    def error(self, solver: StreamingSolver) -> float:
        return object_error(self.obj, solver.snapshot()["object"], self.mask)
