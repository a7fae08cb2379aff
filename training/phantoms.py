"""Varied complex objects for training: natural-image crops and procedural textures.

Each object takes its amplitude and its phase from two *independent* textures,
so the network cannot learn one from the other. ``camera`` and ``astronaut``
(the images of :func:`hxn_liveptycho.sim.phantom.make_object`, i.e. of every
simulated scan the tests and the demo run) are never used here, so the CI test
really scores a phantom the network has not seen; ``coins`` and ``moon`` are
kept for the held-out validation set.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Never used for training or validation: the test and demo phantom.
EXCLUDED_IMAGES = ("camera", "astronaut")
TRAIN_IMAGES = (
    "brick",
    "chelsea",
    "clock",
    "coffee",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "page",
    "retina",
    "rocket",
    "text",
    "cell",
    "shepp_logan_phantom",
    "colorwheel",
)
HELD_OUT_IMAGES = ("coins", "moon")


def load_images(names: tuple[str, ...]) -> list[np.ndarray]:
    """The scikit-image sample images among ``names`` that load offline, grey, in [0, 1]."""
    from skimage import data
    from skimage.color import rgb2gray

    images = []
    for name in names:
        if name in EXCLUDED_IMAGES:
            raise ValueError(f"{name} is the test phantom and must not be used for training")
        try:
            img = np.asarray(getattr(data, name)())
        except Exception as exc:  # an image that needs a download is skipped, not fatal
            logger.warning("skipping image %s: %s", name, exc)
            continue
        if img.ndim == 3:
            img = rgb2gray(img[..., :3])
        img = img.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        if hi > lo:
            images.append((img - lo) / (hi - lo))
    return images


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)


def image_texture(images: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a random image, zoomed 0.5-2.5x, flipped/rotated, ``size`` square."""
    img = images[rng.integers(len(images))]
    zoom = float(np.exp(rng.uniform(np.log(0.5), np.log(2.5))))
    crop = int(np.ceil(size / zoom)) + 2
    if crop > min(img.shape):
        zoom = (size + 2) / min(img.shape)
        crop = min(img.shape)
    top = rng.integers(0, img.shape[0] - crop + 1)
    left = rng.integers(0, img.shape[1] - crop + 1)
    patch = ndimage.zoom(img[top : top + crop, left : left + crop], size / crop, order=1)
    patch = patch[:size, :size]
    patch = np.rot90(patch, rng.integers(4))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return _stretch(np.ascontiguousarray(patch))


def random_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with a power-law spectrum (exponent 1.5-4): clouds to grains."""
    k = np.fft.fftfreq(size)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    k2[0, 0] = 1.0
    beta = rng.uniform(1.5, 4.0)
    spectrum = k2 ** (-beta / 4) * (rng.normal(size=k2.shape) + 1j * rng.normal(size=k2.shape))
    spectrum[0, 0] = 0
    return _stretch(np.fft.ifft2(spectrum).real.astype(np.float32))


def random_shapes(size: int, rng: np.random.Generator) -> np.ndarray:
    """Overlapping discs, ellipses and rectangles of random grey levels, softly blurred."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), rng.uniform(0, 1), np.float32)
    for _ in range(rng.integers(8, 40)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(2, size / 5, 2)
        theta = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        inside = (
            (u / rx) ** 2 + (v / ry) ** 2 <= 1
            if rng.random() < 0.6
            else ((np.abs(u) <= rx) & (np.abs(v) <= ry))
        )
        img[inside] = rng.uniform(0, 1)
    return _stretch(ndimage.gaussian_filter(img, rng.uniform(0.3, 1.5)))


def random_cells(size: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi cells of random grey levels with darker walls (grains, particles)."""
    n = rng.integers(10, 80)
    seeds = rng.uniform(0, size, (n, 2))
    levels = rng.uniform(0, 1, n)
    y, x = np.mgrid[0:size, 0:size]
    d = (y[..., None] - seeds[:, 0]) ** 2 + (x[..., None] - seeds[:, 1]) ** 2
    order = np.argsort(d, axis=-1)
    nearest, second = order[..., 0], order[..., 1]
    gap = np.sqrt(np.take_along_axis(d, second[..., None], -1)[..., 0]) - np.sqrt(
        np.take_along_axis(d, nearest[..., None], -1)[..., 0]
    )
    img = levels[nearest] * np.clip(gap / rng.uniform(1, 4), 0.3, 1)
    return _stretch(ndimage.gaussian_filter(img.astype(np.float32), 0.7))


def texture(images: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """One texture in [0, 1]: half natural-image crops, half procedural."""
    pick = rng.random()
    if pick < 0.5 and images:
        return image_texture(images, size, rng)
    if pick < 0.7:
        return random_field(size, rng)
    if pick < 0.9:
        return random_shapes(size, rng)
    return random_cells(size, rng)


def random_object(images: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Complex transmission: amplitude in [a_min, 1], phase in ±phi_max, from two textures."""
    min_amplitude = rng.uniform(0.3, 0.95)
    max_phase = rng.uniform(0.2, 1.6)
    amp = min_amplitude + (1 - min_amplitude) * texture(images, size, rng)
    phase = max_phase * (2 * texture(images, size, rng) - 1)
    if rng.random() < 0.15:  # a pure phase object now and then
        amp = np.ones_like(amp)
    return (amp * np.exp(1j * phase)).astype(np.complex64)
