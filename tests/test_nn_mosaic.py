"""The live mosaic and the NN branch's queue: stitching, offsets, coverage, drops."""

from __future__ import annotations

import numpy as np
import pytest

from hxn_liveptycho.nn.mosaic import Mosaic, footprint_weight
from hxn_liveptycho.sim.optics import make_probe


def _object(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    amp = 0.6 + 0.4 * ndimage.gaussian_filter(rng.random(shape), 3) / 1.0
    phase = ndimage.gaussian_filter(rng.normal(size=shape), 4) * 8
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def test_patches_with_unknown_phase_offsets_join_into_the_object():
    """Exact patches, each with a random constant phase and scale, give the object back."""
    window, patch = 32, 16
    truth = _object((96, 96))
    rng = np.random.default_rng(1)
    grid = np.arange(0, 96 - window + 1, 6)
    corners = np.array([(y, x) for y in grid for x in grid], dtype=float)
    inset = (window - patch) // 2
    weight = np.outer(np.hanning(patch + 2)[1:-1], np.hanning(patch + 2)[1:-1])
    mosaic = Mosaic(truth.shape, window, weight)
    for y, x in corners.astype(int):
        cut = truth[y + inset : y + inset + patch, x + inset : x + inset + patch]
        factor = rng.uniform(0.5, 2.0) * np.exp(1j * rng.uniform(-np.pi, np.pi))
        mosaic.add(np.abs(cut * factor)[None], np.angle(cut * factor)[None], np.array([[y, x]]))
    image = mosaic.image()
    lit = mosaic.coverage > 0.2
    c = np.vdot(image[lit], truth[lit]) / np.vdot(image[lit], image[lit])
    error = np.linalg.norm(truth[lit] - c * image[lit]) / np.linalg.norm(truth[lit])
    assert mosaic.placed == len(corners)
    assert error < 1e-3


def test_patches_off_the_canvas_are_counted_not_placed():
    mosaic = Mosaic((40, 40), 32, np.ones((16, 16)))
    ones = np.ones((2, 16, 16), np.float32)
    mosaic.add(ones, np.zeros_like(ones), np.array([[0.0, 0.0], [30.0, 30.0]]))
    assert (mosaic.placed, mosaic.outside) == (1, 1)
    assert mosaic.coverage[8:24, 8:24].min() == pytest.approx(1.0)
    assert mosaic.coverage[:8].max() == 0


def test_footprint_weight_is_the_smoothed_beam_on_the_patch():
    probe = make_probe(128, pixel_size_m=20e-9, wavelength_m=1e-10)
    w = footprint_weight(probe, 64)
    assert w.shape == (64, 64) and w.max() == pytest.approx(1.0)
    # Bright where the beam is, dark at the patch corners.
    assert w[32 - 10 : 32 + 10, 32 - 10 : 32 + 10].mean() > 20 * w[:8, :8].mean()


def test_mosaic_rejects_a_patch_larger_than_the_window():
    with pytest.raises(ValueError, match="larger than the window"):
        Mosaic((64, 64), 16, np.ones((32, 32)))
