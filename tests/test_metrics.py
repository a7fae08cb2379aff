"""The object error metric is blind to ptychography's ambiguities and only to them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.sim import phantom

SHAPE = (160, 160)


@pytest.fixture(scope="module")
def gt() -> np.ndarray:
    return phantom.make_object(SHAPE)


@pytest.fixture(scope="module")
def interior() -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[30:-30, 30:-30] = True
    return m


def test_identical_is_zero(gt, interior):
    """An exact copy scores ~0."""
    assert object_error(gt, gt.copy(), interior) < 1e-6
    assert object_error(gt, gt.copy()) < 1e-6


def test_shifted_ramped_scaled_copy_is_near_zero(gt, interior):
    """Sub-pixel shift + linear phase ramp + global complex scale are all forgiven."""
    shifted = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(gt), (2.3, -1.7)))
    yy, xx = np.indices(SHAPE)
    ramp = np.exp(1j * (0.21 * yy - 0.13 * xx + 0.4))
    est = (0.37 * np.exp(1j * 1.1)) * shifted * ramp
    assert object_error(gt, est.astype(np.complex64), interior) < 0.02
    # And none of the three alone is mistaken for a good match without the correction:
    assert np.linalg.norm((gt - est)[interior]) / np.linalg.norm(gt[interior]) > 0.5


def test_different_object_is_large(gt, interior):
    """A different sample scores far from 0."""
    other = phantom.make_object(SHAPE, amplitude_image="moon", phase_image="coins")
    assert object_error(gt, other, interior) > 0.3


def test_noise_degrades_gracefully(gt, interior):
    """Additive noise of relative size s gives an error of about s."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=SHAPE) + 1j * rng.normal(size=SHAPE)
    s = 0.05
    noisy = gt + s * np.sqrt(np.mean(np.abs(gt[interior]) ** 2) / 2) * noise
    assert object_error(gt, noisy, interior) == pytest.approx(s, rel=0.2)


def test_shape_mismatch_raises(gt):
    """Objects of different shapes are a caller error, not a silent crop."""
    with pytest.raises(ValueError):
        object_error(gt, gt[:-1])


def test_illuminated_mask_covers_scan_interior():
    """The mask is the well-lit scanned area: scan centre in, far canvas corners and rim out."""
    probe = np.zeros((32, 32), np.complex64)
    probe[8:24, 8:24] = 1
    pos = np.stack(np.meshgrid(np.arange(0, 60, 6.0), np.arange(0, 60, 6.0), indexing="ij"), -1)
    pos = pos.reshape(-1, 2) + 10
    mask = illuminated_mask(pos, probe, (120, 120))
    assert mask.dtype == bool and mask.shape == (120, 120)
    assert mask[60, 60]
    assert not mask[0, 0] and not mask[119, 119] and not mask[20, 60]
    assert 0.15 < mask.mean() < 0.5
