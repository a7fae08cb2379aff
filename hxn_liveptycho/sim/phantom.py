"""Simulated samples, scans and diffraction data for tests, demos and NN training.

The object is built from two *different* natural images so that amplitude and
phase are independent and have real structure at all scales (an error metric
on random noise says little about a reconstruction). Diffraction uses the
forward model of :mod:`hxn_liveptycho.sim.optics` with sub-pixel positions.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

from hxn_liveptycho.recon.backend import array_namespace, fft2, ifft2

__all__ = ["make_object", "scan_positions", "simulate_diffraction"]


def _image_resized(name: str, shape: tuple[int, int]) -> np.ndarray:
    """A scikit-image sample image as float in [0, 1], centre-cropped to the aspect and resized."""
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    img = getattr(data, name)()
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    img = img.astype(np.float64)
    h, w = img.shape
    target = shape[0] / shape[1]
    if h / w > target:  # too tall: crop rows
        keep = max(1, round(w * target))
        top = (h - keep) // 2
        img = img[top : top + keep]
    else:
        keep = max(1, round(h / target))
        left = (w - keep) // 2
        img = img[:, left : left + keep]
    img = resize(img, shape, anti_aliasing=True, mode="reflect")
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros(shape)


def make_object(
    shape: tuple[int, int],
    *,
    max_phase: float = 1.0,
    min_amplitude: float = 0.6,
    amplitude_image: str = "camera",
    phase_image: str = "astronaut",
) -> np.ndarray:
    """Complex transmission (complex64): amplitude in [min_amplitude, 1], phase in ±max_phase.

    Amplitude from ``skimage.data.camera`` and phase from the grey-scale
    ``skimage.data.astronaut`` (names selectable), each stretched to its range.
    """
    if not 0 <= min_amplitude <= 1:
        raise ValueError(f"min_amplitude must be in [0, 1], got {min_amplitude}")
    shape = (int(shape[0]), int(shape[1]))
    amp = min_amplitude + (1.0 - min_amplitude) * _image_resized(amplitude_image, shape)
    phase = max_phase * (2.0 * _image_resized(phase_image, shape) - 1.0)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def scan_positions(
    nx: int,
    ny: int,
    step_px: float,
    *,
    jitter_px: float = 0.5,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Fly-scan-like raster positions (N, 2) float64 (y, x), row-major with x fastest.

    Like an HXN fly scan read back by encoders: each row starts with a small
    random offset in x and has its own small y error (the slow stage settles
    imperfectly), and every point has Gaussian jitter of ``jitter_px`` on both
    axes. Shifted so the smallest coordinate on each axis is 0.
    """
    gen = np.random.default_rng(rng)
    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    y = iy * step_px + gen.normal(0.0, 0.5 * jitter_px, size=(ny, 1))
    x = ix * step_px + gen.normal(0.0, 0.5 * jitter_px, size=(ny, 1))
    y = y + gen.normal(0.0, jitter_px, size=(ny, nx))
    x = x + gen.normal(0.0, jitter_px, size=(ny, nx))
    pos = np.stack([y.ravel(), x.ravel()], axis=1).astype(np.float64)
    return pos - pos.min(axis=0)


def _exit_waves(
    obj: Any, probe_ft: Any, pos: np.ndarray, xp: types.ModuleType, subpixel: bool
) -> Any:
    """Exit waves at ``pos`` (k, 2): the integer object patch times the sub-pixel-shifted probe.

    psi(r) = P(r) O(r + p) has the same far-field modulus as
    P(r - f) O(r + floor(p)) with f = p - floor(p); the probe is shifted by a
    Fourier phase ramp (exact for the band-limited probe).
    """
    n = probe_ft.shape[-1]
    if subpixel:
        base = np.floor(pos)
        frac = pos - base
    else:
        base = np.rint(pos)
        frac = np.zeros_like(pos)
    base = base.astype(np.int64)
    rows = xp.asarray(base[:, 0])[:, None, None] + xp.arange(n)[None, :, None]
    cols = xp.asarray(base[:, 1])[:, None, None] + xp.arange(n)[None, None, :]
    patches = obj[rows, cols]
    if subpixel:
        k = xp.fft.fftfreq(n).astype(xp.float32)
        fy = xp.asarray(frac[:, 0], dtype=xp.float32)[:, None, None]
        fx = xp.asarray(frac[:, 1], dtype=xp.float32)[:, None, None]
        ramp = xp.exp(-2j * np.pi * (fy * k[None, :, None] + fx * k[None, None, :]))
        probes = ifft2(probe_ft[None] * ramp.astype(xp.complex64), xp=xp)
        return probes * patches
    return ifft2(probe_ft, xp=xp)[None] * patches


def simulate_diffraction(
    obj: Any,
    probe: Any,
    positions_px: Any,
    *,
    photons_per_frame: float,
    rng: np.random.Generator | int | None = None,
    subpixel: bool = True,
    chunk: int = 128,
) -> Any:
    """Poisson diffraction frames (N, n, n) float32, zero frequency at the CENTRE of each frame.

    ``positions_px`` (N, 2) are (y, x) top-left corners of the probe window in
    object pixels, sub-pixel positions honoured by a Fourier shift of the
    probe (``subpixel=False`` rounds them). The incident flux is scaled so
    that the mean expected total over all frames is ``photons_per_frame``
    (frames through denser parts of the object get fewer). Far field as in
    :func:`hxn_liveptycho.sim.optics.far_field`. Runs on NumPy or CuPy
    (inferred from ``obj`` / ``probe``); the Poisson draw uses ``rng`` on NumPy.
    """
    xp = array_namespace(obj, probe)
    obj = xp.asarray(obj, dtype=xp.complex64)
    probe = xp.asarray(probe, dtype=xp.complex64)
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    n = probe.shape[-1]
    if probe.shape != (n, n):
        raise ValueError(f"probe must be square (n, n), got {probe.shape}")
    lo = np.floor(pos) if subpixel else np.rint(pos)
    h, w = obj.shape
    bad = (lo[:, 0] < 0) | (lo[:, 1] < 0) | (lo[:, 0] + n > h) | (lo[:, 1] + n > w)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} positions put the {n}x{n} window outside the {h}x{w} object"
        )
    probe_ft = fft2(probe, xp=xp)
    frames = []
    for start in range(0, len(pos), chunk):
        psi = _exit_waves(obj, probe_ft, pos[start : start + chunk], xp, subpixel)
        f = fft2(psi, xp=xp)
        frames.append(xp.fft.fftshift((f.real**2 + f.imag**2).astype(xp.float32), axes=(-2, -1)))
    expected = xp.concatenate(frames) if frames else xp.zeros((0, n, n), xp.float32)
    if len(pos):
        expected *= xp.float32(photons_per_frame / float(expected.sum(axis=(-2, -1)).mean()))
    if xp is np:
        # Drawn in place, a chunk at a time: one draw over the whole stack would hold an
        # int64 copy of it (twice its float32 size), which a 4,096-frame 256² scan cannot
        # spare. Chunked draws take the generator's values in the same order.
        gen = np.random.default_rng(rng)
        for start in range(0, len(expected), chunk):
            expected[start : start + chunk] = gen.poisson(expected[start : start + chunk])
        return expected
    return xp.random.poisson(expected).astype(xp.float32)
