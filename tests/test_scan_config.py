"""ScanConfig from real run documents (event_model.compose_run), as HXN writes them."""

from __future__ import annotations

import math
from typing import Any

import pytest
from event_model import compose_run
from scans import THETA_12KEV_DEG, hxn_start_md
from scans import ScanRun as Run
from scans import make_scan_run as make_run

from hxn_liveptycho.config.scan import energy_kev_from_dcm_theta
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.errors import ConfigurationError, NotPtychographyError
from hxn_liveptycho.pipeline.engine import run_selection


@pytest.fixture
def hxn_run() -> Run:
    """A complete HXN PandA fly scan at 12 keV."""
    baseline = {"dcm_th": THETA_12KEV_DEG, "zpsth": 15.0, "dsth": -3.0}
    return make_run(hxn_start_md(), baseline=baseline)


def test_energy_from_dcm_theta_matches_bragg_law() -> None:
    """The Si(111) formula gives 12 keV at its textbook angle (about 9.48°)."""
    assert abs(THETA_12KEV_DEG - 9.4822) < 1e-3
    assert energy_kev_from_dcm_theta(THETA_12KEV_DEG) == pytest.approx(12.0, rel=1e-12)
    assert energy_kev_from_dcm_theta(20.0) == pytest.approx(
        12.39842 / (2 * 3.1355893 * math.sin(math.radians(20.0)))
    )


def test_fly_panda_start_gives_grid_and_geometry(hxn_run: Run) -> None:
    """scan.scan_input, scan.detector_distance and the run's identity come from the start."""
    config = hxn_run.config()
    grid = config.grid
    assert grid.kind == "fly2d_panda"
    # x is on the sample: |cos 15°| of the commanded ±2 µm (zpsth = 15°), like the positions
    cos15 = math.cos(math.radians(15.0))
    assert (grid.x_start_um, grid.x_end_um) == pytest.approx((-2.0 * cos15, 2.0 * cos15))
    assert grid.x_num == 41
    assert (grid.y_start_um, grid.y_end_um, grid.y_num) == (-1.0, 1.0, 21)
    commanded = hxn_run.config(angle_correction=False).grid
    assert (commanded.x_start_um, commanded.x_end_um) == (-2.0, 2.0)
    assert config.num_points == 41 * 21
    # HXN's step is range / points
    assert (grid.x_step_um, grid.y_step_um) == pytest.approx((4.0 / 41 * cos15, 2.0 / 21))
    assert config.step_um == pytest.approx(2.0 / 21)
    assert config.distance_m == 2.05
    assert config.dwell_s == 0.01
    assert config.uid == hxn_run.start["uid"]
    assert config.scan_id == 404611
    assert config.plan_name == "fly2dpd"
    assert config.motors == ("zpssx", "zpssy")


def test_energy_wavelength_and_pixel_size(hxn_run: Run) -> None:
    """Energy from baseline dcm_th; λ = hc/E; object pixel = λ z / (N p)."""
    config = hxn_run.config()
    assert config.energy_kev == pytest.approx(12.0, rel=1e-9)
    wavelength = 1.23984e-9 / 12.0
    assert config.wavelength_m == pytest.approx(wavelength, rel=1e-6)
    # HXN_FACTS: λ[nm] = 1.2398 / E[keV]
    assert config.wavelength_m == pytest.approx(1.2398e-9 / 12.0, rel=1e-4)
    assert config.detector == "eiger2"
    assert config.detector_pixel_m == 75e-6
    assert config.roi.size == 128
    expected = wavelength * 2.05 / (128 * 75e-6)
    assert config.pixel_size_m == pytest.approx(expected, rel=1e-6)
    assert config.pixel_size_m == pytest.approx(22.06e-9, rel=1e-3)


def test_merlin_detector_has_55_um_pixels() -> None:
    """An older scan whose primary stream names merlin1 gets Merlin's 55 µm pitch."""
    md = hxn_start_md()
    md["scan"] = {**md["scan"], "detectors": ["merlin1"]}
    run = make_run(md, baseline={"dcm_th": THETA_12KEV_DEG}, primary_keys=("merlin1", "inenc2_val"))
    config = run.config()
    assert config.detector == "merlin1"
    assert config.detector_pixel_m == 55e-6
    assert config.pixel_size_m == pytest.approx(1.23984e-9 / 12.0 * 2.05 / (128 * 55e-6), rel=1e-6)


def test_detector_from_scan_detectors_without_image_key() -> None:
    """With no image key in the primary stream, scan.detectors names the detector."""
    run = make_run(hxn_start_md(), baseline={"dcm_th": 10.0}, primary_keys=("inenc2_val",))
    assert run.config().detector == "eiger2"
    assert run.config().detector_pixel_m == 75e-6


def test_encoder_scale_factors_become_ratios(hxn_run: Run) -> None:
    """x_scale_factor / z_scale_factor → ratio = -scale/1e4 (x, vertical y), direction -1;
    x also carries the stage angle's projection (zpsth = 15° here), y does not."""
    encoder = hxn_run.config().encoder
    assert encoder.x_ratio == pytest.approx(-0.9542 / 1e4 * math.cos(math.radians(15.0)))
    assert hxn_run.config(angle_correction=False).encoder.x_ratio == pytest.approx(-0.9542 / 1e4)
    assert encoder.y_ratio == pytest.approx(-1.25 / 1e4)
    assert (encoder.x_direction, encoder.y_direction) == (-1.0, -1.0)


def test_missing_scale_factors_keep_the_default_ratio() -> None:
    """Without scale factors the legacy default ratio (-1e-4) stays."""
    md = hxn_start_md()
    del md["x_scale_factor"], md["z_scale_factor"]
    encoder = make_run(md, baseline={"dcm_th": 10.0}).config().encoder
    assert (encoder.x_ratio, encoder.y_ratio) == (-1e-4, -1e-4)


def test_flyplan2d_plan_args() -> None:
    """Older FlyPlan2D runs: scan_start1/scan_end1/num1 (x), scan_start2/scan_end2/num2 (y)."""
    md = hxn_start_md(
        plan_name="FlyPlan2D",
        plan_args={
            "scan_start1": -3.0,
            "scan_end1": 3.0,
            "num1": 61,
            "scan_start2": 0.0,
            "scan_end2": 2.0,
            "num2": 11,
            "exposure_time": 0.02,
        },
        scan={"detector_distance": 0.5, "detectors": ["merlin1"]},
    )
    config = make_run(md, baseline={"dcm_th": 10.0}, primary_keys=("merlin1",)).config()
    assert config.grid.kind == "flyplan2d"
    assert (config.grid.x_start_um, config.grid.x_end_um, config.grid.x_num) == (-3.0, 3.0, 61)
    assert (config.grid.y_start_um, config.grid.y_end_um, config.grid.y_num) == (0.0, 2.0, 11)
    assert config.distance_m == 0.5


def test_flyplan2d_missing_args_are_named() -> None:
    """A FlyPlan2D start lacking plan_args names each absent key."""
    md = hxn_start_md(
        plan_name="FlyPlan2D",
        plan_args={"scan_start1": 0.0, "num1": 3},
        scan={"detector_distance": 0.5, "detectors": ["eiger2"]},
    )
    with pytest.raises(NotPtychographyError) as info:
        make_run(md, baseline={"dcm_th": 10.0}).config()
    message = str(info.value)
    absent = ("scan_end1", "scan_start2", "scan_end2", "num2")
    for key in (f"plan_args.{k}" for k in absent):
        assert key in message
    assert "plan_args.scan_start1" not in message


def test_generic_mesh_plan_args() -> None:
    """A mesh scan: plan_args['args'] = [x motor, start, stop, num, y motor, start, stop, num]."""
    md = hxn_start_md(
        plan_name="grid_scan",
        plan_args={"args": ["dssx", -1.5, 1.5, 31, "dssy", -0.5, 0.5, 11]},
        motors=["dssx", "dssy"],
        scan={"detector_distance": 1.2, "detectors": ["eiger1"]},
    )
    config = make_run(md, baseline={"dcm_th": 10.0}, primary_keys=("eiger1_image",)).config()
    assert config.grid.kind == "mesh"
    assert (config.grid.x_start_um, config.grid.x_end_um, config.grid.x_num) == (-1.5, 1.5, 31)
    assert (config.grid.y_start_um, config.grid.y_end_um, config.grid.y_num) == (-0.5, 0.5, 11)
    assert config.detector == "eiger1"
    assert config.detector_pixel_m == 75e-6


def test_fermat_spiral_without_its_factor_names_what_is_missing() -> None:
    """A spiral is no longer refused as such; one whose arguments cannot place its points
    (here no factor) names the missing argument rather than being misread as a raster."""
    md = hxn_start_md(
        plan_name="rel_spiral_fermat",
        plan_args={"x_range": 2.0, "y_range": 2.0, "dr": 0.1},
        scan={"detector_distance": 1.2, "detectors": ["eiger2"]},
    )
    with pytest.raises(NotPtychographyError, match=r"plan_args\.factor of the Fermat spiral"):
        make_run(md, baseline={"dcm_th": 10.0}).config()


def test_stage_angle_zpsth_for_zone_plate_motors(hxn_run: Run) -> None:
    """Zone-plate stage motors (zpssx, zpssy) read the angle from baseline zpsth."""
    assert hxn_run.config().angle_deg == 15.0


def test_stage_angle_dsth_for_other_motors() -> None:
    """Other stages (dssx, dssy) read the angle from baseline dsth, even when zpsth is present."""
    md = hxn_start_md(motors=["dssx", "dssy"])
    run = make_run(md, baseline={"dcm_th": 10.0, "zpsth": 15.0, "dsth": -3.0})
    assert run.config().angle_deg == -3.0


def test_nested_override_replaces_one_field(hxn_run: Run) -> None:
    """{"roi": {"size": 256}} changes the ROI size, keeps its other fields, and the pixel size."""
    base = hxn_run.config()
    config = hxn_run.config(roi={"size": 256}, recon={"iterations": 7})
    assert config.roi.size == 256
    assert config.roi.center_x == base.roi.center_x
    assert config.recon.iterations == 7
    assert config.pixel_size_m == pytest.approx(base.pixel_size_m / 2)


def test_energy_override_replaces_the_baseline(hxn_run: Run) -> None:
    """A user's energy_kev wins over the baseline's dcm_th."""
    config = hxn_run.config(energy_kev=9.0)
    assert config.energy_kev == 9.0
    assert config.wavelength_m == pytest.approx(1.23984e-9 / 9.0)


def test_energy_override_stands_in_for_a_missing_baseline() -> None:
    """Without a baseline, an energy override is enough to configure."""
    run = make_run(hxn_start_md())
    assert run.config(energy_kev=9.0).energy_kev == 9.0


def test_start_without_geometry_distance_energy_names_every_missing_key() -> None:
    """One NotPtychographyError names the geometry, the distance and the energy together."""
    md = {"plan_name": "fly2dpd", "scan": {"type": "2D_FLY_PANDA", "detectors": ["eiger2"]}}
    run = make_run(md)
    with pytest.raises(NotPtychographyError) as info:
        run.config()
    message = str(info.value)
    assert "scan.scan_input" in message
    assert "scan.detector_distance" in message
    assert "dcm_th" in message
    assert isinstance(info.value, ValueError)


def test_plain_count_names_geometry_distance_energy_and_detector() -> None:
    """A start with nothing HXN-specific names all four gaps, detector included."""
    run = make_run({"plan_name": "count", "detectors": ["det"]}, primary_keys=("det",))
    with pytest.raises(NotPtychographyError) as info:
        run.config()
    message = str(info.value)
    for needle in ("plan_args", "scan.detector_distance", "dcm_th", "detector"):
        assert needle in message


@pytest.mark.parametrize(
    "overrides",
    [{"roi": {"size": 8}}, {"energy_kev": -1.0}, {"no_such_field": 1}, {"roi": {"sise": 256}}],
    ids=["roi-too-small", "negative-energy", "unknown-field", "unknown-nested-field"],
)
def test_invalid_override_raises_configuration_error(
    hxn_run: Run, overrides: dict[str, Any]
) -> None:
    """An override that does not validate raises ConfigurationError (not a pydantic error)."""
    with pytest.raises(ConfigurationError, match="invalid scan configuration"):
        hxn_run.config(**overrides)


def test_config_is_frozen(hxn_run: Run) -> None:
    """A ScanConfig cannot be changed after it is built (sessions share it across threads)."""
    config = hxn_run.config()
    with pytest.raises(ValueError, match="frozen"):
        config.energy_kev = 5.0  # type: ignore[misc]


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.mark.parametrize("plan_name", ["fly2dpd", "FlyPlan2D", "fly2d", "hxn_fly2d_panda"])
def test_run_selection_takes_listed_plans(settings: Settings, plan_name: str) -> None:
    """Plans in plan_names are reconstructed without any metadata flag."""
    start = compose_run(metadata={"plan_name": plan_name}).start_doc
    assert run_selection(start, settings) is None


def test_run_selection_skips_other_plans_with_a_reason(settings: Settings) -> None:
    """A plan not in the list is skipped; the reason names the plan and the flag."""
    start = compose_run(metadata={"plan_name": "count"}).start_doc
    reason = run_selection(start, settings)
    assert reason is not None
    assert "'count'" in reason
    assert "'ptychography'" in reason


def test_metadata_flag_true_forces_a_run_in(settings: Settings) -> None:
    """start['ptychography'] = True takes a plan that is not listed."""
    start = compose_run(metadata={"plan_name": "count", "ptychography": True}).start_doc
    assert run_selection(start, settings) is None


def test_metadata_flag_false_keeps_a_listed_plan_out(settings: Settings) -> None:
    """start['ptychography'] = False wins over the plan list."""
    start = compose_run(metadata={"plan_name": "fly2dpd", "ptychography": False}).start_doc
    reason = run_selection(start, settings)
    assert reason is not None
    assert "false" in reason


def test_run_selection_follows_custom_settings(tmp_path: Any) -> None:
    """plan_names and metadata_flag come from Settings."""
    settings = Settings(data_dir=tmp_path, plan_names=("count",), metadata_flag="live_recon")
    assert run_selection(compose_run(metadata={"plan_name": "count"}).start_doc, settings) is None
    fly = compose_run(metadata={"plan_name": "fly2dpd"}).start_doc
    assert run_selection(fly, settings) is not None
    forced = compose_run(metadata={"plan_name": "fly2dpd", "live_recon": True}).start_doc
    assert run_selection(forced, settings) is None
