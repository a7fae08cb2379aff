"""Auto-configuration follows HXN's conventions, and says in one line why it will not.

Before (each reproduced against the previous ``scan.py``): the stage angle
(``zpsth``/``dsth``) was read but never applied, where HXN's pipeline scales x by
|cos θ|; a zone-plate scan without ``zpsth`` borrowed ``dsth``; the step was
range/(num-1) where HXN's is range/num; ``dwell`` was lost when it was
``scan_input[6]`` or ``plan_args.exposure_time``; a 3-D grid was read as 2-D from
its first two axes; ``dcm_th = 0`` raised a bare ``ZeroDivisionError``; a
baseline ``energy`` was ignored when ``dcm_th`` was missing; ``x_num = 5.7`` was
truncated to 5; a non-numeric string ``scan_id`` failed the run; unphysical values
came back as multi-line pydantic dumps or bare ``ValueError``\\s; and a run that
is not ptychography was skipped with a list of missing keys rather than why.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from event_model import compose_run
from scans import THETA_12KEV_DEG, ScanRun, hxn_start_md, make_scan_run

from hxn_liveptycho.config import scan as scan_module
from hxn_liveptycho.config.scan import energy_kev_from_dcm_theta, scan_config_from_documents
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.errors import ConfigurationError, NotPtychographyError
from hxn_liveptycho.pipeline.engine import Engine
from hxn_liveptycho.pipeline.inputs import Samples, SeriesEnd, SeriesStart
from hxn_liveptycho.streams import EigerFrame

pytestmark = pytest.mark.timeout(120)

#: The calibration of hxn_start_md's x encoder, before any stage-angle projection.
X_CALIBRATION = -0.9542 / 1e4


def run_with(
    baseline: dict[str, Any] | None = None, *, scan: dict[str, Any] | None = None, **md: Any
) -> ScanRun:
    """An HXN fly scan at 12 keV whose start fields (and ``scan`` keys) are changed."""
    start = hxn_start_md(**md)
    if scan is not None:
        start["scan"] = {**start["scan"], **scan}
    reading = {"dcm_th": THETA_12KEV_DEG} if baseline is None else baseline
    return make_scan_run(start, baseline=reading)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    assert "errors.pydantic.dev" not in text
    return text


# --- stage angle ---------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 15.0, -30.0, 45.0])
def test_zone_plate_stage_scales_x_by_cos_of_zpsth(angle: float) -> None:
    """Before: x_ratio stayed the calibration whatever zpsth said (3.5 % too wide at 15°)."""
    config = run_with({"dcm_th": THETA_12KEV_DEG, "zpsth": angle, "dsth": 80.0}).config()
    factor = abs(math.cos(math.radians(angle)))
    assert config.angle_deg == angle
    assert config.angle_correction is True
    assert config.x_projection == pytest.approx(factor)
    assert config.encoder.x_ratio == pytest.approx(X_CALIBRATION * factor)
    assert config.encoder.y_ratio == pytest.approx(-1.25 / 1e4)  # y is the rotation axis


def test_past_45_degrees_hxn_projects_with_sine() -> None:
    """HXN's rule past 45°: |sin θ| (the stage's other lateral motor carries the scan)."""
    config = run_with({"dcm_th": THETA_12KEV_DEG, "zpsth": 60.0}).config()
    assert config.x_projection == pytest.approx(math.sin(math.radians(60.0)))
    assert scan_module.x_projection(45.0) == pytest.approx(math.sqrt(0.5))
    assert scan_module.x_projection(-70.0) == pytest.approx(math.sin(math.radians(70.0)))


def test_ds_stage_uses_dsth() -> None:
    config = run_with(
        {"dcm_th": THETA_12KEV_DEG, "zpsth": 5.0, "dsth": 20.0}, motors=["dssx", "dssy"]
    ).config()
    assert config.angle_deg == 20.0
    assert config.encoder.x_ratio == pytest.approx(X_CALIBRATION * math.cos(math.radians(20.0)))


def test_ssx_ssy_stage_takes_angle_zero_as_hxn_does() -> None:
    """Before: the coarse ssx/ssy stage read dsth; HXN takes 0 for it."""
    config = run_with({"dcm_th": THETA_12KEV_DEG, "dsth": 30.0}, motors=["ssx", "ssy"]).config()
    assert config.angle_deg == 0.0
    assert config.encoder.x_ratio == pytest.approx(X_CALIBRATION)


def test_zone_plate_scan_without_zpsth_does_not_borrow_dsth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: a zp scan whose baseline lacked zpsth took the other stage's dsth."""
    with caplog.at_level(logging.WARNING, logger="hxn_liveptycho.config.hxn_documents"):
        config = run_with({"dcm_th": THETA_12KEV_DEG, "dsth": 30.0}).config()
    assert config.angle_deg == 0.0
    assert config.x_projection == 1.0
    assert "zpsth" in caplog.text


def test_angle_correction_can_be_switched_off_or_the_angle_overridden() -> None:
    run = run_with({"dcm_th": THETA_12KEV_DEG, "zpsth": 30.0})
    off = run.config(angle_correction=False)
    assert off.angle_deg == 30.0
    assert off.x_projection == 1.0
    assert off.encoder.x_ratio == pytest.approx(X_CALIBRATION)
    fixed = run.config(angle_deg=10.0)
    assert fixed.encoder.x_ratio == pytest.approx(X_CALIBRATION * math.cos(math.radians(10.0)))
    # an encoder calibration given by the user also gets the projection, exactly once
    own = run.config(encoder={"x_ratio": -2e-4})
    assert own.encoder.x_ratio == pytest.approx(-2e-4 * math.cos(math.radians(30.0)))


def test_angle_correction_is_recorded_with_the_configuration() -> None:
    """The factor used goes into the config written to Tiled, so the result says what it did."""
    dumped = run_with({"dcm_th": THETA_12KEV_DEG, "zpsth": 30.0}).config().model_dump(mode="json")
    assert dumped["angle_deg"] == 30.0
    assert dumped["angle_correction"] is True
    assert dumped["x_projection"] == pytest.approx(math.cos(math.radians(30.0)))


def test_canvas_extents_are_foreshortened_with_the_positions() -> None:
    """An off-centre scan at 45°: positions scaled about the encoder zero must stay inside the
    grid the canvas is sized from, so the x extents carry the same factor."""
    run = run_with(
        {"dcm_th": THETA_12KEV_DEG, "zpsth": 45.0},
        scan={"scan_input": [10.0, 14.0, 41, -1.0, 1.0, 21, 0.01]},
    )
    config = run.config()
    enc = config.encoder
    for commanded, edge in ((10.0, config.grid.x_start_um), (14.0, config.grid.x_end_um)):
        counts = commanded * 1e4 / 0.9542  # what the x encoder reads there
        assert counts * enc.x_ratio * enc.x_direction == pytest.approx(edge)
    assert config.grid.x_step_um == pytest.approx(4.0 / 41 * math.sqrt(0.5))


def test_angle_beyond_90_degrees_is_refused_while_correcting() -> None:
    """HXN's |sin| rule collapses x near 180°: refused with the field, unless switched off."""
    run = run_with({"dcm_th": THETA_12KEV_DEG, "zpsth": 180.0})
    with pytest.raises(ConfigurationError) as info:
        run.config()
    text = one_line(info)
    assert "angle" in text and "180" in text
    assert run.config(angle_correction=False).encoder.x_ratio == pytest.approx(X_CALIBRATION)


# --- step ----------------------------------------------------------------------------------


def test_fly_scan_step_is_range_over_points() -> None:
    """Before: 4 µm over 41 points gave 0.1 µm (range/(num-1)); HXN's step is 4/41."""
    config = run_with({"dcm_th": THETA_12KEV_DEG}).config()
    assert config.grid.x_step_um == pytest.approx(4.0 / 41)
    assert config.grid.y_step_um == pytest.approx(2.0 / 21)
    assert config.step_um == pytest.approx(4.0 / 41)
    footprint_um = config.probe.footprint_steps * 4.0 / 41
    assert config.probe_footprint_px == pytest.approx(footprint_um / (config.pixel_size_m * 1e6))


def test_flyplan2d_and_mesh_steps_are_range_over_points() -> None:
    plan_args = {
        "scan_start1": -3.0,
        "scan_end1": 3.0,
        "num1": 60,
        "scan_start2": 2.0,
        "scan_end2": 0.0,
        "num2": 10,
    }
    fly = run_with(plan_name="FlyPlan2D", plan_args=plan_args, scan={"type": None}).config()
    assert (fly.grid.x_step_um, fly.grid.y_step_um) == pytest.approx((0.1, 0.2))
    mesh_args = {"args": ["dssx", -1.0, 1.0, 20, "dssy", 0.0, 1.0, 5]}
    mesh = run_with(
        plan_name="grid_scan", plan_args=mesh_args, scan={"type": None}, motors=["dssx", "dssy"]
    ).config()
    assert (mesh.grid.x_step_um, mesh.grid.y_step_um) == pytest.approx((0.1, 0.2))


# --- dwell ---------------------------------------------------------------------------------


def _without_scan_dwell() -> dict[str, Any]:
    md = hxn_start_md()
    md["scan"] = {k: v for k, v in md["scan"].items() if k != "dwell"}
    return md


def test_dwell_from_scan_input_7th_entry() -> None:
    """Before: with no scan.dwell, fly2dpd's scan_input[6] was lost (dwell_s None)."""
    md = _without_scan_dwell()
    md["scan"]["scan_input"] = [-2.0, 2.0, 41, -1.0, 1.0, 21, 0.025]
    assert make_scan_run(md, baseline={"dcm_th": 10.0}).config().dwell_s == 0.025


def test_dwell_from_flyplan2d_exposure_time() -> None:
    """Before: FlyPlan2D's plan_args.exposure_time was lost."""
    plan_args = {
        "scan_start1": -3.0,
        "scan_end1": 3.0,
        "num1": 61,
        "scan_start2": 0.0,
        "scan_end2": 2.0,
        "num2": 11,
        "exposure_time": 0.02,
    }
    md = hxn_start_md(
        plan_name="FlyPlan2D",
        plan_args=plan_args,
        scan={"detector_distance": 0.5, "detectors": ["merlin1"]},
    )
    config = make_scan_run(md, baseline={"dcm_th": 10.0}, primary_keys=("merlin1",)).config()
    assert config.dwell_s == 0.02


@pytest.mark.parametrize(
    ("where", "expected"),
    [("plan_args.dwell", 0.03), ("start.exposure_time", 0.04), ("configuration", 0.05)],
)
def test_dwell_from_other_places(where: str, expected: float) -> None:
    md = _without_scan_dwell()
    md["scan"]["scan_input"] = md["scan"]["scan_input"][:6]
    if where == "plan_args.dwell":
        md["plan_args"] = {"dwell": expected}
    elif where == "start.exposure_time":
        md["exposure_time"] = expected
    run = make_scan_run(md, baseline={"dcm_th": 10.0})
    if where == "configuration":  # the detector's own frame time, from its descriptor
        run.descriptors[0]["configuration"] = {
            "eiger2": {"data": {"eiger2_frame_time": expected}, "timestamps": {}, "data_keys": {}}
        }
    assert run.config().dwell_s == expected


def test_unusable_dwell_falls_through_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A dwell only bounds the wait for 'stop': a bad one is logged, the next source used."""
    md = hxn_start_md()
    md["scan"]["dwell"] = -1.0
    with caplog.at_level(logging.WARNING, logger="hxn_liveptycho.config.hxn_documents"):
        config = make_scan_run(md, baseline={"dcm_th": 10.0}).config()
    assert config.dwell_s == 0.01  # scan_input[6]
    assert "scan.dwell = -1.0" in caplog.text


# --- 3-D grids -----------------------------------------------------------------------------


def test_three_motor_grid_is_refused_naming_the_motors() -> None:
    """Before: read as a 2-D grid from its first two axes (zpssz's 5 planes silently merged)."""
    args = {"args": ["zpssx", -1.0, 1.0, 11, "zpssy", -1.0, 1.0, 11, "zpssz", -2.0, 2.0, 5]}
    run = run_with(plan_name="grid_scan", plan_args=args, scan={"type": None})
    with pytest.raises(NotPtychographyError) as info:
        run.config()
    text = one_line(info)
    assert "3-D" in text
    for motor in ("zpssx", "zpssy", "zpssz"):
        assert motor in text


def test_third_motor_held_at_one_point_maps_to_the_2d_grid() -> None:
    """A third axis with a single point is a 2-D raster: mapped explicitly to the moving two."""
    args = {
        "args": ["zpssz", 0.5, 0.5, 1, "zpssx", -1.0, 1.0, 11, True, "zpssy", 0.0, 2.0, 5, False]
    }
    grid = run_with(plan_name="grid_scan", plan_args=args, scan={"type": None}).config().grid
    assert (grid.x_start_um, grid.x_end_um, grid.x_num) == (-1.0, 1.0, 11)
    assert (grid.y_start_um, grid.y_end_um, grid.y_num) == (0.0, 2.0, 5)


def test_three_dimensional_scan_shape_or_type_is_refused() -> None:
    with pytest.raises(NotPtychographyError, match="3-D"):
        run_with(scan={"shape": [3, 21, 41]}).config()
    with pytest.raises(NotPtychographyError, match="3D_FLY_PANDA"):
        run_with(scan={"type": "3D_FLY_PANDA"}).config()


def test_one_dimensional_scan_is_not_ptychography() -> None:
    run = run_with(
        plan_name="rel_scan", plan_args={"args": ["zpssx", -1.0, 1.0, 11]}, scan={"type": None}
    )
    with pytest.raises(NotPtychographyError, match="1-D scan of zpssx"):
        run.config()


# --- energy --------------------------------------------------------------------------------


def test_energy_from_baseline_energy_when_dcm_th_is_missing() -> None:
    """Before: NotPtychographyError 'missing baseline.dcm_th' though energy was there."""
    config = run_with({"energy": 9.5, "zpsth": 0.0}).config()
    assert config.energy_kev == 9.5


def test_dcm_th_zero_is_a_one_line_error_not_a_zero_division() -> None:
    """Before: a bare ZeroDivisionError from Bragg's law."""
    with pytest.raises(ConfigurationError) as info:
        run_with({"dcm_th": 0.0}).config()
    text = one_line(info)
    assert "baseline.dcm_th = 0.0" in text
    with pytest.raises(ConfigurationError):
        energy_kev_from_dcm_theta(0.0)
    with pytest.raises(ConfigurationError):
        energy_kev_from_dcm_theta(-5.0)


def test_dcm_th_zero_with_an_energy_reading_uses_the_energy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="hxn_liveptycho.config.hxn_documents"):
        config = run_with({"dcm_th": 0.0, "energy": 12.0}).config()
    assert config.energy_kev == 12.0
    assert "dcm_th" in caplog.text


def test_energy_in_ev_is_refused_naming_the_unit() -> None:
    with pytest.raises(ConfigurationError) as info:
        run_with({"energy": 12000.0}).config()
    text = one_line(info)
    assert "baseline.energy = 12000.0" in text and "keV" in text


# --- point counts and scan_id --------------------------------------------------------------


def test_integral_float_counts_are_accepted() -> None:
    run = run_with(scan={"scan_input": [-2.0, 2.0, 64.0, -1.0, 1.0, 32.0, 0.01]})
    grid = run.config().grid
    assert (grid.x_num, grid.y_num) == (64, 32)
    assert isinstance(grid.x_num, int)


def test_fractional_count_is_refused_not_truncated() -> None:
    """Before: x_num = 5.7 became 5 points silently, misplacing every later row."""
    run = run_with(scan={"scan_input": [-2.0, 2.0, 5.7, -1.0, 1.0, 21, 0.01]})
    with pytest.raises(ConfigurationError) as info:
        run.config()
    text = one_line(info)
    assert "scan.scan_input[2] (x_num) = 5.7" in text
    assert "whole number" in text


@pytest.mark.parametrize(
    ("value", "expected"), [("404611", 404611), ("hxn-404611", "hxn-404611"), (404611.0, 404611)]
)
def test_string_scan_id_is_kept(value: Any, expected: Any) -> None:
    """Before: a scan_id that is not an int failed the run (event-model's schema wants an int,
    but runs read back from Tiled or replayed carry text)."""
    run = run_with()
    start = {**run.start, "scan_id": value}
    config = scan_config_from_documents(start, descriptors=run.descriptors, baseline=run.baseline)
    assert config.scan_id == expected
    assert type(config.scan_id) is type(expected)


# --- unphysical values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scan", "needle"),
    [
        ({"detector_distance": -1.0}, "scan.detector_distance = -1.0"),
        ({"detector_distance": 0.0}, "scan.detector_distance = 0.0"),
        ({"detector_distance": 2050.0}, "scan.detector_distance = 2050.0"),
        ({"detector_distance": "two"}, "scan.detector_distance = 'two'"),
        ({"scan_input": [2.0, 2.0, 10, -1.0, 1.0, 21]}, "zero x range"),
        ({"scan_input": [-2.0, 2.0, 0, -1.0, 1.0, 21]}, "scan.scan_input[2] (x_num) = 0"),
        ({"scan_input": [-2.0, 2.0, 10, -1.0, 1.0, -3]}, "scan.scan_input[5] (y_num) = -3"),
        ({"scan_input": [-2.0, float("nan"), 10, -1.0, 1.0, 21]}, "scan.scan_input[1] (x_end)"),
    ],
    ids=[
        "negative-distance",
        "zero-distance",
        "distance-in-mm",
        "text-distance",
        "zero-step",
        "no-points",
        "negative-points",
        "nan-extent",
    ],
)
def test_unphysical_document_values_name_the_field_and_value(
    scan: dict[str, Any], needle: str
) -> None:
    """Before: pydantic's multi-line dump, a bare ValueError, or (zero range) a zero step."""
    with pytest.raises(ConfigurationError) as info:
        run_with(scan=scan).config()
    assert needle in one_line(info)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"energy_kev": -1.0}, "energy_kev: -1.0"),
        ({"distance_m": 0.0}, "distance_m: 0.0"),
        ({"detector_pixel_m": 0.0}, "detector_pixel_m: 0.0"),
        ({"grid": {"step_um": -0.1}}, "grid.step_um: -0.1"),
        ({"grid": {"x_num": 0}}, "grid.x_num: 0"),
        ({"grid": {"x_start_um": 1.0, "x_end_um": 1.0}}, "zero step"),
        ({"dwell_s": -0.01}, "dwell_s: -0.01"),
    ],
    ids=["energy", "distance", "pixel", "spiral-step", "num", "zero-step", "dwell"],
)
def test_unphysical_overrides_name_the_field_and_value(
    overrides: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        run_with().config(**overrides)
    text = one_line(info)
    assert text.startswith("invalid scan configuration: ")
    assert needle in text


def test_an_override_stands_in_for_a_bad_document_value() -> None:
    """The operator's way out: override the field the documents got wrong."""
    run = run_with({"dcm_th": 0.0}, scan={"detector_distance": -1.0})
    config = run.config(energy_kev=12.0, distance_m=2.0)
    assert (config.energy_kev, config.distance_m) == (12.0, 2.0)


# --- not ptychography ----------------------------------------------------------------------


def test_xrf_only_fly_scan_says_it_has_no_diffraction_detector() -> None:
    """Before: 'missing a detector (...)' among other keys; now why comes first."""
    md = hxn_start_md(detectors=["xspress3", "panda1"])
    md["scan"] = {**md["scan"], "detectors": ["xspress3"]}
    run = make_scan_run(md, baseline={"dcm_th": 10.0}, primary_keys=("xspress3_ch1", "inenc2_val"))
    with pytest.raises(NotPtychographyError) as info:
        run.config()
    text = one_line(info)
    assert text.startswith("no diffraction detector")
    assert "xspress3" in text


def test_old_flyplan2d_without_distance_says_so() -> None:
    plan_args = {
        "scan_start1": -3.0,
        "scan_end1": 3.0,
        "num1": 61,
        "scan_start2": 0.0,
        "scan_end2": 2.0,
        "num2": 11,
    }
    md = hxn_start_md(plan_name="FlyPlan2D", plan_args=plan_args, scan={"detectors": ["merlin1"]})
    run = make_scan_run(md, baseline={"dcm_th": 10.0}, primary_keys=("merlin1",))
    with pytest.raises(NotPtychographyError) as info:
        run.config()
    text = one_line(info)
    assert "FlyPlan2D" in text and "scan.detector_distance" in text
    assert run.config(distance_m=0.5).distance_m == 0.5


def test_single_point_scan_is_not_ptychography() -> None:
    with pytest.raises(NotPtychographyError, match="single-point"):
        run_with(scan={"scan_input": [0.0, 0.0, 1, 0.0, 0.0, 1, 0.01]}).config()


# --- through the engine --------------------------------------------------------------------

X_CHANNEL = "/INENC2.VAL.Value"
Y_CHANNEL = "/INENC3.VAL.Value"
FRAME = 64


class PositionSink:
    """Keeps the positions a run writes under diffraction/ and its final metadata."""

    def __init__(self) -> None:
        self.positions_m: list[np.ndarray] = []
        self.final_metadata: dict[str, Any] | None = None

    def open(self, config: Any, metadata: Mapping[str, Any]) -> None:
        pass

    def live(self, snapshot: Mapping[str, Any]) -> None:
        pass

    def nn(self, snapshot: Mapping[str, Any]) -> None:
        pass

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None:
        self.positions_m.append(np.asarray(positions_m))

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        self.final_metadata = dict(metadata)

    def close(self, timeout: float | None = None) -> None:
        pass


class Sinks:
    def __init__(self) -> None:
        self.made: list[PositionSink] = []
        self._lock = threading.Lock()

    def __call__(self) -> PositionSink:
        sink = PositionSink()
        with self._lock:
            self.made.append(sink)
        return sink


@pytest.fixture
def sinks() -> Sinks:
    return Sinks()


@pytest.fixture
def engine(tmp_path: Path, sinks: Sinks) -> Iterator[Engine]:
    settings = Settings(
        data_dir=tmp_path / "data",
        array_backend="numpy",
        live_interval_s=0.2,
        stream_timeout_s=1.0,
        overrides={
            "roi": {"size": 32, "center_y": FRAME / 2, "center_x": FRAME / 2},
            "recon": {"iterations": 2},
            "encoder": {"upsample": 1},
        },
    )
    eng = Engine(settings, sink_factory=sinks)
    yield eng
    eng.close(timeout=20)


def feed_run(engine: Engine, md: dict[str, Any], baseline: dict[str, float]) -> str:
    """A 3 x 3 scan over ±1 µm: documents, baseline, frames and encoder samples."""
    bundle = compose_run(metadata=md)
    engine.submit("start", bundle.start_doc)
    primary = bundle.compose_descriptor(
        name="primary",
        data_keys={"eiger2_image": {"source": "eiger", "dtype": "array", "shape": [FRAME, FRAME]}},
    )
    engine.submit("descriptor", primary.descriptor_doc)
    base = bundle.compose_descriptor(
        name="baseline",
        data_keys={k: {"source": f"SIM:{k}", "dtype": "number", "shape": []} for k in baseline},
    )
    engine.submit("descriptor", base.descriptor_doc)
    page = base.compose_event_page(
        data={k: [v] for k, v in baseline.items()},
        timestamps={k: [0.0] for k in baseline},
        seq_num=[1],
    )
    engine.submit("event_page", page)
    engine.put(SeriesStart("eiger", {"series": 1}))
    engine.put(SeriesStart("panda", {}))
    rng = np.random.default_rng(3)
    for i in range(9):
        data = rng.poisson(50, size=(FRAME, FRAME)).astype(np.uint32)
        engine._on_frame(EigerFrame(series=1, frame=i, data=data))
    yy, xx = np.meshgrid(np.linspace(-1.0, 1.0, 3), np.linspace(-1.0, 1.0, 3), indexing="ij")
    samples = {X_CHANNEL: xx.ravel() * 1e4, Y_CHANNEL: yy.ravel() * 1e4}
    engine.put(Samples(samples, 0))
    engine.put(SeriesEnd("eiger"))
    engine.put(SeriesEnd("panda"))
    engine.submit("stop", bundle.compose_stop(exit_status="success"))
    return str(bundle.start_doc["uid"])


ENGINE_MD: dict[str, Any] = {
    "plan_name": "fly2dpd",
    "motors": ["zpssx", "zpssy"],
    "scan": {
        "type": "2D_FLY_PANDA",
        "scan_input": [-1.0, 1.0, 3, -1.0, 1.0, 3, 0.01],
        "detector_distance": 2.0,
        "detectors": ["eiger2"],
    },
}


def test_run_positions_carry_the_stage_angle(engine: Engine, sinks: Sinks) -> None:
    """Before: positions_m were stage coordinates; now x is |cos 30°| narrower, as at HXN."""
    uid = feed_run(engine, ENGINE_MD, {"dcm_th": THETA_12KEV_DEG, "zpsth": 30.0})
    assert engine.wait_idle(timeout=60)
    session = engine.session(uid)
    assert session is not None
    summary = session.summary()
    assert summary["status"].startswith("complete"), summary
    positions = np.concatenate(sinks.made[0].positions_m)
    x_um = positions[:, 1] * 1e6
    y_um = positions[:, 0] * 1e6
    assert np.ptp(x_um) == pytest.approx(2.0 * math.cos(math.radians(30.0)), rel=1e-6)
    assert np.ptp(y_um) == pytest.approx(2.0, rel=1e-6)
    config = sinks.made[0].final_metadata["config"]  # type: ignore[index]
    assert config["x_projection"] == pytest.approx(math.cos(math.radians(30.0)))


def test_xrf_only_run_is_skipped_with_the_reason(engine: Engine, sinks: Sinks) -> None:
    """Chosen by plan name only: 'skipped', and the one line says there is no Eiger."""
    md = {**ENGINE_MD, "scan": {**ENGINE_MD["scan"], "detectors": ["xspress3"]}}
    bundle = compose_run(metadata=md)
    engine.submit("start", bundle.start_doc)
    engine.submit("stop", bundle.compose_stop(exit_status="success"))
    assert engine.wait_idle(timeout=60)
    session = engine.session(bundle.start_doc["uid"])
    assert session is not None
    summary = session.summary()
    assert summary["status"] == "skipped", summary
    assert "no diffraction detector" in summary["reason"]
    assert "\n" not in summary["reason"]
    assert sinks.made == []


def test_unphysical_metadata_fails_the_run_with_the_field(engine: Engine, sinks: Sinks) -> None:
    """dcm_th = 0 and no other energy: 'failed', the reason names the field and its value
    (before: a ZeroDivisionError with no field named)."""
    md = {**ENGINE_MD, "ptychography": True}
    uid = feed_run(engine, md, {"dcm_th": 0.0, "zpsth": 0.0})
    assert engine.wait_idle(timeout=60)
    session = engine.session(uid)
    assert session is not None
    summary = session.summary()
    assert summary["status"] == "failed", summary
    assert "baseline.dcm_th = 0.0" in summary["error"]
    assert "ZeroDivisionError" not in summary["error"]
