"""The live mosaic and the NN branch's queue: stitching, offsets, coverage, drops."""

from __future__ import annotations

import numpy as np
import pytest

from hxn_liveptycho.nn.mosaic import Mosaic, footprint_weight, upsample_linear
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


def test_patches_at_twice_the_canvas_pixel_join_onto_the_canvas():
    """A 256² run through a 128² model: patches sampled at every second canvas pixel (from
    the window's centre region), with unknown offsets, give the object back on the canvas
    grid, up to the interpolation of a smooth object."""
    window, patch, s = 64, 16, 2  # the patch covers the central 32 canvas pixels
    truth = _object((160, 160))
    rng = np.random.default_rng(2)
    grid = np.arange(0, 160 - window + 1, 8)
    inset = (window - patch * s) // 2
    weight = np.outer(np.hanning(patch + 2)[1:-1], np.hanning(patch + 2)[1:-1])
    mosaic = Mosaic(truth.shape, window, weight, scale=s)
    for y in grid:
        for x in grid:
            cut = truth[
                y + inset : y + inset + patch * s : s, x + inset : x + inset + patch * s : s
            ]
            factor = rng.uniform(0.5, 2.0) * np.exp(1j * rng.uniform(-np.pi, np.pi))
            mosaic.add_complex((cut * factor)[None], np.array([[y, x]]))
    image, coverage = mosaic.image(), mosaic.coverage
    assert image.shape == coverage.shape == truth.shape
    lit = coverage > 0.3
    lit[-4:] = lit[:, -4:] = False  # the interpolation holds the last sample at the edge
    c = np.vdot(image[lit], truth[lit]) / np.vdot(image[lit], image[lit])
    error = np.linalg.norm(truth[lit] - c * image[lit]) / np.linalg.norm(truth[lit])
    assert error < 0.02


def test_linear_upsampling_keeps_the_samples_and_interpolates_between():
    y, x = np.mgrid[0:8, 0:8].astype(np.float32)
    ramp = (0.5 + 0.1 * y + 0.02 * x)[None]
    fine = upsample_linear(ramp, 3)
    assert fine.shape == (1, 24, 24)
    np.testing.assert_allclose(fine[0, ::3, ::3], ramp[0], rtol=1e-6)
    v, u = np.mgrid[0:22, 0:22] / 3.0
    np.testing.assert_allclose(fine[0, :22, :22], 0.5 + 0.1 * v + 0.02 * u, rtol=1e-5)
    np.testing.assert_array_equal(fine[0, -1, :], fine[0, -3, :])  # held after the last


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
