"""A 128² model at a 256² crop: which detector pixels it sees, where its patches land, and
the mosaic's quality against the phantom (benchmarks/nn_resample_quality.py has the
figures for every case)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.branch import NNBranch, settle_rule
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.nn.resample import InputRule, choose_rule
from hxn_liveptycho.recon.metrics import illuminated_mask
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.sim.optics import far_field, make_probe

HXN_128_PIXEL = 22.06e-9  # the shipped card's object pixel


def test_crop_keeps_the_central_pixels_and_bin_adds_counts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5.0, (3, 256, 256)).astype(np.float32)
    amplitudes = np.sqrt(counts)
    cropped = InputRule(256, 128, bin=1).frames(amplitudes)
    np.testing.assert_array_equal(cropped, amplitudes[:, 64:192, 64:192])
    binned = InputRule(256, 128, bin=2).frames(amplitudes)
    expected = np.sqrt(counts.reshape(3, 128, 2, 128, 2).sum(axis=(2, 4)))
    np.testing.assert_allclose(binned, expected, rtol=1e-5)
    # The zero frequency (index n/2) stays at the model's centre (index 64) either way.
    assert InputRule(512, 128, bin=2).frames(amplitudes.repeat(2, 1).repeat(2, 2)).shape == (
        3,
        128,
        128,
    )


def test_cropping_the_far_field_is_the_coarse_pixel_view_of_the_same_window():
    """The central 128² of a 256² pattern is the 128² pattern of the exit wave sampled at every
    second pixel (band-limited): the network sees what a 128² run of this beamline records."""
    rng = np.random.default_rng(1)
    f = np.zeros((256, 256), np.complex64)
    f[64:192, 64:192] = rng.normal(size=(128, 128)) + 1j * rng.normal(size=(128, 128))
    wave = np.fft.ifft2(np.fft.ifftshift(f))  # band-limited to the central 128 frequencies
    coarse = wave[::2, ::2]
    seen = InputRule(256, 128).frames(np.abs(far_field(wave))[None])[0]
    # Decimating by 2 in each axis divides the DFT by 4 and aliases nothing (band-limited).
    expected = 4 * np.abs(far_field(coarse))
    np.testing.assert_allclose(seen, expected, rtol=1e-4, atol=1e-4 * float(expected.max()))


def test_auto_picks_the_rule_that_gives_the_model_its_object_pixel():
    # HXN 12 keV, 2.05 m, 75 µm: 22 nm at 128², 11 nm at 256². Cropping restores 22 nm.
    assert choose_rule(256, 128, pixel_size_m=11.03e-9, trained_pixel_m=HXN_128_PIXEL).bin == 1
    # The detector twice as far: 22 nm already at 256²; binning keeps it.
    assert choose_rule(256, 128, pixel_size_m=22.06e-9, trained_pixel_m=HXN_128_PIXEL).bin == 2
    # 512²: bin 2 then crop gives 2 x 5.5 nm.
    rule = choose_rule(512, 128, pixel_size_m=5.5e-9, trained_pixel_m=11.03e-9)
    assert (rule.bin, rule.scale) == (2, 2)
    assert choose_rule(256, 128).bin == 1  # no card geometry: the same detector is assumed
    # The beam's disc, when measured, decides: 28 px at 256² is the trained disc (crop) ...
    trained = (25.34, 30.98)
    assert choose_rule(256, 128, disc_radius_px=28.3, trained_disc_px=trained).bin == 1
    # ... and 56 px (a zone plate of twice the aperture) is brought back to 28 by binning.
    assert choose_rule(256, 128, disc_radius_px=55.8, trained_disc_px=trained).bin == 2
    assert choose_rule(256, 128, fit="bin").bin == 2
    with pytest.raises(ConfigurationError, match=r"expects 128x128 .* crop is 320x320"):
        choose_rule(320, 128)


def test_a_256_crop_of_the_same_beamline_stitches_like_the_native_crop():
    """The shipped 128² model on a 256² run (the 128² beamline's zone plate and beam; step 18
    px of the halved pixel; 10 x 10 points, seed 5): cropped to 128², its mosaic on the 256²
    canvas must pass the same bar as the native test (phase r >= 0.85 on the well-lit
    region). Measured 0.93 on seed 11 (native 128²: 0.94); binning instead gives -0.16."""
    beamline = SimulatedBeamline.for_window(
        256, x_num=10, y_num=10, step_px=18.0, jitter_px=1.2, seed=5, photons_per_frame=2e5
    )
    sample = SimulatedSample(beamline)
    sample.probe = make_probe(
        256,
        pixel_size_m=beamline.pixel_size_m,
        wavelength_m=beamline.wavelength_m,
        outer_radius_px=0.22 * 128,
    )
    model = ModelRegistry(None).get("ptychonn-hxn-128")
    rule = choose_rule(
        256,
        128,
        pixel_size_m=beamline.pixel_size_m,
        trained_pixel_m=model.card.geometry.object_pixel_m,
    )
    assert rule.bin == 1
    branch = NNBranch(
        model,
        OnnxRuntimeBackend(model.path, model.io()),
        canvas_shape=sample.object.shape,
        window=256,
        batch_size=50,
        max_queued_frames=1000,
        publish=lambda snapshot: None,
        interval_s=60.0,
        footprint_px=0.28 * 256,
        rule=rule,
    )
    branch.submit(np.sqrt(sample.intensities), sample.positions_px)
    final = branch.close(timeout=120)
    assert final is not None and final["frames"] == sample.num_points
    assert final["object"].shape == sample.object.shape
    mosaic, truth = final["object"], sample.object
    mask = illuminated_mask(sample.positions_px, sample.probe, truth.shape)
    offset = np.angle(np.vdot(mosaic[mask], truth[mask]))
    phase = np.angle(mosaic * np.exp(1j * offset))[mask]
    r = float(np.corrcoef(phase, np.angle(truth)[mask])[0, 1])
    assert r >= 0.85, f"phase correlation {r:.3f}"
    assert "central 128x128 kept" in branch.describe()["input_rule"]


def _first_frames(optics: str) -> np.ndarray:
    beamline = SimulatedBeamline.for_window(256, x_num=4, y_num=4, step_px=18.0, seed=3)
    sample = SimulatedSample(beamline)
    if optics == "same":
        sample.probe = make_probe(
            256,
            pixel_size_m=beamline.pixel_size_m,
            wavelength_m=beamline.wavelength_m,
            outer_radius_px=0.22 * 128,
        )
    return np.mean(sample.intensities, axis=0)


def test_a_run_settles_its_rule_on_the_beam_it_measures(caplog):
    """``fit="auto"`` at the first frames: the 128² beamline's zone plate at 256² is cropped;
    the simulator's default 256² beamline (its zone plate scales with the crop: twice the
    aperture) is binned, which measured better there (phase r 0.64 against 0.46); a disc far
    from the trained one is logged as a warning either way."""
    model = ModelRegistry(None).get("ptychonn-hxn-128")
    provisional = InputRule(256, 128, 1)
    assert settle_rule(provisional, "auto", _first_frames("same"), model).bin == 1
    wide = _first_frames("simulator default")
    assert settle_rule(provisional, "auto", wide, model).bin == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert settle_rule(provisional, "crop", wide, model).bin == 1  # asked for: kept
    assert "expect a poor NN mosaic" in caplog.text


def test_a_256_run_through_start_nn_branch_in_its_process(tmp_path):
    """What a session does at 256²: the run's ScanConfig and settings, the branch in its own
    process (ONNX Runtime CPU), the rule settled on the first frames, the mosaic on the
    run's 256² canvas."""
    from types import SimpleNamespace

    from hxn_liveptycho.config.scan import ScanConfig
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.nn.branch import start_nn_branch

    beamline = SimulatedBeamline.for_window(
        256, x_num=8, y_num=8, step_px=18.0, jitter_px=1.2, seed=6, photons_per_frame=2e5
    )
    sample = SimulatedSample(beamline)
    sample.probe = make_probe(
        256,
        pixel_size_m=beamline.pixel_size_m,
        wavelength_m=beamline.wavelength_m,
        outer_radius_px=0.22 * 128,
    )
    x0, x1, nx, y0, y1, ny = beamline.scan_input()
    config = ScanConfig(
        uid="nn-256",
        scan_id=256,
        grid={
            "kind": "fly2d_panda",
            "x_start_um": x0,
            "x_end_um": x1,
            "x_num": nx,
            "y_start_um": y0,
            "y_end_um": y1,
            "y_num": ny,
        },
        energy_kev=beamline.energy_kev,
        distance_m=beamline.distance_m,
        roi={"size": 256},
        probe={"footprint_um": 0.28 * 256 * beamline.pixel_size_m * 1e6},
        mode="nn",
        nn={"batch_size": 16},
    )
    settings = Settings(
        data_dir=tmp_path, model_dir=tmp_path, nn_backend="onnxruntime", live_interval_s=0.5
    )
    geometry = SimpleNamespace(canvas_shape=sample.object.shape, window=256)
    published: list = []
    branch = start_nn_branch(config, settings, geometry, published.append)
    amplitudes = np.sqrt(sample.intensities)
    for start in range(0, sample.num_points, 16):
        branch.submit(amplitudes[start : start + 16], sample.positions_px[start : start + 16])
    final = branch.close(timeout=120)
    info = branch.describe()
    assert final is not None, info
    assert info["nn_frames_inferred"] == sample.num_points and "error" not in info
    assert "central 128x128 kept" in info["input_rule"]
    assert final["object"].shape == final["coverage"].shape == sample.object.shape
    mosaic, truth = final["object"], sample.object
    mask = illuminated_mask(sample.positions_px, sample.probe, truth.shape)
    offset = np.angle(np.vdot(mosaic[mask], truth[mask]))
    phase = np.angle(mosaic * np.exp(1j * offset))[mask]
    r = float(np.corrcoef(phase, np.angle(truth)[mask])[0, 1])
    assert r >= 0.85, f"phase correlation {r:.3f}"
