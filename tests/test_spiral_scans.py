"""Fermat spirals and encoder-only scans: configured from their documents, reconstructed live.

The spiral's point count and order are checked against bluesky's own plan, run by a
real RunEngine (its start document and the motor positions of its events) and its
plan pattern; the live path is checked end to end on a simulated spiral fly scan,
to the raster's error bound.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from scans import THETA_12KEV_DEG, hxn_start_md, make_live, processed
from scans import make_scan_run as make_run
from test_end_to_end import MAX_OBJECT_ERROR

from hxn_liveptycho.config.scan import scan_config_from_documents
from hxn_liveptycho.config.scan_paths import FermatSpiral, density_step
from hxn_liveptycho.demo import final_object_error
from hxn_liveptycho.errors import ConfigurationError, NotPtychographyError
from hxn_liveptycho.pipeline.geometry import CanvasGeometry
from hxn_liveptycho.sim import (
    SimHXNFlyer,
    SimulatedBeamline,
    SpiralSample,
    baseline_motors,
    fermat_fly,
)
from hxn_liveptycho.store.diffraction import read_diffraction

BASELINE = {"dcm_th": THETA_12KEV_DEG}
HXN_SCAN = {"detector_distance": 2.05, "detectors": ["eiger2"], "dwell": 0.01}

#: (x_start, y_start, x_range, y_range, dr, factor, dr_y, tilt): round and elliptical
#: spirals, off centre, tilted, with a factor, as the plans accept them.
SPIRALS = [
    (0.0, 0.0, 2.0, 2.0, 0.1, 2.0, None, 0.0),
    (0.5, -1.0, 3.0, 1.0, 0.2, 1.0, 0.3, 0.2),
    (0.0, 0.0, 4.0, 3.0, 0.25, 1.3, None, 0.0),
    (1.0, 2.0, 1.0, 1.0, 0.1, 1.0, None, -0.4),
]


def bluesky_points(
    x_start: float,
    y_start: float,
    xr: float,
    yr: float,
    dr: float,
    f: float,
    dr_y: Any,
    tilt: float,
) -> np.ndarray:
    """The points bluesky's own pattern gives for (x_start, y_start, x_range, y_range, dr,
    factor, dr_y, tilt), (n, 2) (y, x), in its order."""
    from bluesky import plan_patterns
    from ophyd.sim import motor1, motor2

    cycle = plan_patterns.spiral_fermat(
        motor1, motor2, x_start, y_start, xr, yr, dr, f, dr_y=dr_y, tilt=tilt
    )
    return np.array([[point[motor2], point[motor1]] for point in cycle])


@pytest.mark.parametrize("args", SPIRALS)
def test_spiral_points_are_bluesky_plan_patterns_own(args: tuple[Any, ...]) -> None:
    """Same count, same order, same values as bluesky.plan_patterns.spiral_fermat."""
    x_start, y_start, xr, yr, dr, f, dr_y, tilt = args
    ours = FermatSpiral(xr, yr, dr, f, x_start=x_start, y_start=y_start, dr_y=dr_y, tilt=tilt)
    reference = bluesky_points(*args)
    assert len(reference) > 5
    assert ours.num_points == len(reference)
    np.testing.assert_array_equal(ours.points(), reference)


def test_a_real_rel_spiral_fermat_run_configures_its_points(RE: Any) -> None:
    """bluesky's rel_spiral_fermat run by a RunEngine: its start document alone gives the
    number of events it made, and the extents of the positions its motors visited."""
    from bluesky.plans import rel_spiral_fermat
    from ophyd.sim import det, motor1, motor2

    documents: list[tuple[str, dict[str, Any]]] = []
    motor1.set(0.0).wait()
    motor2.set(0.0).wait()
    RE(
        rel_spiral_fermat([det], motor1, motor2, 3.0, 2.0, 0.15, 1.2, md={"scan": HXN_SCAN}),
        lambda name, doc: documents.append((name, doc)),
    )
    start = next(doc for name, doc in documents if name == "start")
    events = [doc for name, doc in documents if name == "event"]
    visited = np.array([[e["data"]["motor2"], e["data"]["motor1"]] for e in events])
    config = scan_config_from_documents(start, baseline=BASELINE)
    assert config.grid.kind == "fermat"
    assert config.num_points == len(events) == start["num_points"]
    grid = config.grid
    (y_lo, x_lo), (y_hi, x_hi) = visited.min(axis=0), visited.max(axis=0)
    assert (grid.x_start_um, grid.x_end_um) == pytest.approx((x_lo, x_hi))
    assert (grid.y_start_um, grid.y_end_um) == pytest.approx((y_lo, y_hi))
    # The order too: the points from the start document are the positions, event by event.
    args = start["plan_args"]
    spiral = FermatSpiral(args["x_range"], args["y_range"], args["dr"], args["factor"])
    np.testing.assert_allclose(spiral.points(), visited, atol=1e-12)


def test_hxn_fermat_arguments_give_count_extents_and_step() -> None:
    """HXN's fermat records x_range, y_range, dr and factor only: the relative spiral around
    0, its count as the plan's, and a step of sqrt(pi) dr / factor (one point per
    pi (dr / factor)^2) sizing the probe footprint."""
    md = hxn_start_md(
        plan_name="fermat",
        plan_args={"x_range": 2.0, "y_range": 1.5, "dr": 0.05, "factor": 1.5},
        scan=HXN_SCAN,
    )
    config = make_run(md, baseline=BASELINE).config()
    reference = bluesky_points(0.0, 0.0, 2.0, 1.5, 0.05, 1.5, None, 0.0)
    assert config.num_points == len(reference)
    grid = config.grid
    assert grid.x_num is None and grid.y_num is None and not grid.is_raster
    assert grid.y_start_um == pytest.approx(reference[:, 0].min())
    assert grid.y_end_um == pytest.approx(reference[:, 0].max())
    assert -1.0 <= grid.x_start_um < grid.x_end_um <= 1.0
    assert config.step_um == pytest.approx(math.sqrt(math.pi) * 0.05 / 1.5, rel=0.05)
    assert grid.describe() == f"{len(reference)}-point fermat scan"


def test_spiral_x_extents_carry_the_stage_angle_like_the_positions() -> None:
    """At a stage angle the spiral's x extents are foreshortened as its encoder x is."""
    md = hxn_start_md(
        plan_name="rel_spiral_fermat",
        plan_args={"x_range": 2.0, "y_range": 2.0, "dr": 0.1, "factor": 1.0},
        scan=HXN_SCAN,
    )
    flat = make_run(md, baseline={**BASELINE, "zpsth": 0.0}).config()
    tilted = make_run(md, baseline={**BASELINE, "zpsth": 60.0}).config()
    factor = math.sin(math.radians(60.0))
    assert tilted.grid.x_start_um == pytest.approx(flat.grid.x_start_um * factor)
    assert tilted.grid.x_end_um == pytest.approx(flat.grid.x_end_um * factor)
    assert tilted.encoder.x_ratio == pytest.approx(flat.encoder.x_ratio * factor)
    assert tilted.num_points == flat.num_points


def test_the_start_documents_num_points_wins_over_a_disagreeing_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A recorded num_points is what the plan really scanned (a replay that skipped points,
    another pattern version): it is expected, with a warning naming both counts."""
    args = {"x_range": 2.0, "y_range": 2.0, "dr": 0.1, "factor": 1.0}
    md = hxn_start_md(plan_name="rel_spiral_fermat", plan_args=args, scan=HXN_SCAN)
    computed = make_run(md, baseline=BASELINE).config().num_points
    md["num_points"] = computed - 7
    assert make_run(md, baseline=BASELINE).config().num_points == computed - 7
    assert any(
        f"{computed - 7}" in r.getMessage() and "num_points" in r.getMessage()
        for r in caplog.records
    )


def test_a_spiral_read_from_bluesky_pattern_args_alone() -> None:
    """A plan whose plan_args lack the spiral (a wrapper) is read from plan_pattern_args."""
    md = hxn_start_md(
        plan_name="my_custom_spiral",
        plan_args={},
        plan_pattern="spiral_fermat",
        plan_pattern_args={
            "x_start": 1.0,
            "y_start": -2.0,
            "x_range": 1.0,
            "y_range": 1.0,
            "dr": 0.1,
            "factor": 1.0,
            "dr_y": None,
            "tilt": 0.0,
        },
        scan=HXN_SCAN,
    )
    grid = make_run(md, baseline=BASELINE).config().grid
    assert grid.kind == "fermat"
    assert grid.num_points == len(bluesky_points(1.0, -2.0, 1.0, 1.0, 0.1, 1.0, None, 0.0))
    assert 0.5 <= grid.x_start_um < grid.x_end_um <= 1.5
    assert -2.5 <= grid.y_start_um < grid.y_end_um <= -1.5


def test_a_spiral_without_dr_or_factor_uses_its_ranges_and_recorded_count() -> None:
    """A record with x_range and y_range but no factor (nor dr) cannot place the points, but
    its num_points and ranges are enough: the canvas spans the ranges, the positions come
    from the encoders. Without num_points it is refused naming the factor."""
    md = hxn_start_md(
        plan_name="fermat",
        plan_args={"x_range": 2.0, "y_range": 1.0, "dr": 0.05},
        scan=HXN_SCAN,
        num_points=321,
    )
    grid = make_run(md, baseline=BASELINE).config().grid
    assert grid.kind == "fermat" and grid.num_points == 321
    assert (grid.x_start_um, grid.x_end_um, grid.y_start_um, grid.y_end_um) == (
        -1.0,
        1.0,
        -0.5,
        0.5,
    )
    del md["num_points"]
    with pytest.raises(NotPtychographyError, match=r"plan_args\.factor of the Fermat spiral"):
        make_run(md, baseline=BASELINE).config()


@pytest.mark.parametrize(
    ("plan_args", "needle"),
    [
        ({"x_range": 2.0, "y_range": 2.0, "dr": 0.0, "factor": 1.0}, "positive dr"),
        ({"x_range": 2.0, "y_range": "wide", "dr": 0.1, "factor": 1.0}, "plan_args.y_range"),
        ({"x_range": 2.0, "y_range": 2.0, "dr": 0.1, "factor": -1.0}, "positive factor"),
    ],
    ids=["zero-dr", "text-range", "negative-factor"],
)
def test_unphysical_spiral_arguments_name_the_field(plan_args: dict[str, Any], needle: str) -> None:
    md = hxn_start_md(plan_name="rel_spiral_fermat", plan_args=plan_args, scan=HXN_SCAN)
    with pytest.raises(ConfigurationError, match=needle):
        make_run(md, baseline=BASELINE).config()


def test_a_spiral_of_one_point_is_not_ptychography() -> None:
    md = hxn_start_md(
        plan_name="rel_spiral_fermat",
        plan_args={"x_range": 0.01, "y_range": 0.01, "dr": 1.0, "factor": 1.0},
        scan=HXN_SCAN,
    )
    with pytest.raises(NotPtychographyError, match="no overlap"):
        make_run(md, baseline=BASELINE).config()


# --- encoder-only scans ----------------------------------------------------------------------


def encoder_only_md(**changes: Any) -> dict[str, Any]:
    """A scan that commands no pattern: flagged, with its count and extents."""
    md = hxn_start_md(plan_name="fly_positions", plan_args={}, scan=HXN_SCAN, ptychography=True)
    md.update(num_points=150, extents=[[-1.0, 2.0], [-0.5, 0.5]])
    md.update(changes)
    return md


def test_encoder_only_scan_is_configured_from_count_and_extents() -> None:
    """No grid, no spiral: num_points and bluesky's extents ([x], [y]) are all it needs."""
    config = make_run(encoder_only_md(), baseline=BASELINE).config()
    grid = config.grid
    assert grid.kind == "positions" and not grid.is_raster
    assert (grid.x_start_um, grid.x_end_um, grid.y_start_um, grid.y_end_um) == (
        -1.0,
        2.0,
        -0.5,
        0.5,
    )
    assert config.num_points == 150
    assert config.step_um == pytest.approx(density_step(1.0, 3.0, 150))
    assert config.step_um == pytest.approx(math.sqrt(3.0 / 150))


def test_encoder_only_scan_without_extents_says_how_to_give_them() -> None:
    """Missing extents are named with the override that supplies them, which then works."""
    md = encoder_only_md()
    del md["extents"]
    run = make_run(md, baseline=BASELINE)
    with pytest.raises(NotPtychographyError, match=r"extents .*override grid x_start_um"):
        run.config()
    extents = {"x_start_um": 0.0, "x_end_um": 4.0, "y_start_um": 0.0, "y_end_um": 2.0}
    config = run.config(grid=extents)
    assert config.grid.kind == "positions"
    assert config.num_points == 150
    assert config.grid.x_end_um == 4.0


def test_encoder_only_scan_without_a_count_names_it() -> None:
    md = encoder_only_md()
    del md["num_points"]
    with pytest.raises(NotPtychographyError, match="num_points"):
        make_run(md, baseline=BASELINE).config()
    assert make_run(md, baseline=BASELINE).config(grid={"points": 99}).num_points == 99


def test_malformed_extents_are_refused_naming_them() -> None:
    with pytest.raises(ConfigurationError, match="extents"):
        make_run(encoder_only_md(extents=[[0.0, 1.0]]), baseline=BASELINE).config()


def test_a_grid_with_neither_a_raster_shape_nor_a_count_is_refused() -> None:
    """The model says what a scan needs: x_num and y_num, or points; and points that all
    coincide (a zero extent) are refused, as a raster's zero step is."""
    from pydantic import ValidationError

    from hxn_liveptycho.config.scan_model import ScanGrid

    extents = {"x_start_um": 0.0, "x_end_um": 1.0, "y_start_um": 0.0, "y_end_um": 1.0}
    with pytest.raises(ValidationError, match="needs x_num and y_num"):
        ScanGrid(kind="positions", **extents)
    with pytest.raises(ValidationError, match="every position coincides"):
        ScanGrid(kind="positions", points=5, **{**extents, "x_end_um": 0.0, "y_end_um": 0.0})
    raster = ScanGrid(kind="mesh", x_num=4, y_num=2, **extents)
    assert raster.is_raster and raster.num_points == 8
    assert raster.scan_step_um == pytest.approx(0.5)
    assert raster.describe() == "4 x 2 raster (mesh)"


# --- the canvas ------------------------------------------------------------------------------


def test_spiral_canvas_from_extents_is_the_canvas_of_its_positions() -> None:
    """The live canvas (from the configured extents) is the one its commanded positions
    would give, and every probe window of those positions fits inside it."""
    spiral = FermatSpiral(2.0, 1.2, 0.06, 1.0, x_start=0.0, y_start=0.0)
    md = hxn_start_md(
        plan_name="rel_spiral_fermat",
        plan_args={"x_range": 2.0, "y_range": 1.2, "dr": 0.06, "factor": 1.0},
        scan=HXN_SCAN,
    )
    config = make_run(md, baseline=BASELINE).config(angle_deg=0.0)
    live = CanvasGeometry.from_scan(config)
    offline = CanvasGeometry.from_positions(
        spiral.points(),
        pixel_size_m=config.pixel_size_m,
        window=config.roi.size,
        margin=config.canvas_margin,
    )
    assert live == offline
    corners = live.to_pixels(spiral.points())
    assert corners.min() >= 0
    assert (corners.max(axis=0) + config.roi.size <= np.asarray(live.canvas_shape)).all()


def test_canvas_from_positions_ignores_lost_positions_and_refuses_none() -> None:
    points = np.array([[0.0, 0.0], [np.nan, 5.0], [1.0, 2.0]])
    geometry = CanvasGeometry.from_positions(points, pixel_size_m=1e-8, window=16, margin=0.0)
    assert geometry.origin_um == pytest.approx((-0.02, -0.02))
    with pytest.raises(ValueError, match="no finite position"):
        CanvasGeometry.from_positions(
            np.full((2, 2), np.nan), pixel_size_m=1e-8, window=16, margin=0.0
        )


# --- the simulator and the live path ---------------------------------------------------------

#: A spiral as dense as the raster end-to-end test's 14 x 14 scan, over the same area.
SPIRAL_BEAMLINE = SimulatedBeamline(x_num=14, y_num=14)


def test_simulated_spiral_visits_the_plans_points_in_order() -> None:
    """The simulated stage follows the spiral (jitter aside), as dense as the raster."""
    sample = SpiralSample(SPIRAL_BEAMLINE)
    assert sample.spiral is not None
    commanded = sample.spiral.points()
    jitter_um = SPIRAL_BEAMLINE.jitter_px * SPIRAL_BEAMLINE.pixel_size_m * 1e6
    assert np.abs(sample.positions_um - commanded).max() < 6 * jitter_um
    assert abs(sample.num_points - 14 * 14) < 0.1 * 14 * 14
    # The PandA's samples of a frame average to that frame's position (HXN's convention).
    x, y = sample.encoder_samples(5, np.random.default_rng(0))
    x_ratio = -SPIRAL_BEAMLINE.x_scale_factor / 1e4
    y_ratio = -SPIRAL_BEAMLINE.z_scale_factor / 1e4
    assert float(np.mean(x)) * x_ratio * -1 == pytest.approx(sample.positions_um[5, 1], abs=0.005)
    assert float(np.mean(y)) * y_ratio * -1 == pytest.approx(sample.positions_um[5, 0], abs=0.005)


def test_the_spiral_plan_refuses_a_raster_sample() -> None:
    """fermat_fly needs a SpiralSample: a raster's sample is named, not flown as a spiral."""
    from hxn_liveptycho.sim import SimulatedSample

    flyer = SimHXNFlyer(None, None, SimulatedSample(SimulatedBeamline(x_num=4, y_num=4)))
    with pytest.raises(TypeError, match="SpiralSample, not a SimulatedSample"):
        next(fermat_fly(flyer))


def fly_spiral(RE: Any, eiger: Any, panda: Any, sample: SpiralSample, **plan_kw: Any) -> Any:
    flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.03)
    baseline = baseline_motors(sample.beamline.energy_kev)
    return RE(fermat_fly(flyer, baseline=baseline, **plan_kw))


@pytest.mark.parametrize(
    ("commanded", "beamline", "iterations"),
    # The encoder-only scan: the same spiral's density over a smaller field, for time.
    [(True, SPIRAL_BEAMLINE, 60), (False, replace(SPIRAL_BEAMLINE, x_num=10, y_num=10), 40)],
    ids=["fermat", "encoder-only"],
)
def test_simulated_spiral_fly_scan_is_reconstructed_live_to_the_raster_bound(
    RE: Any,
    hxn_detectors: Any,
    tmp_path: Any,
    commanded: bool,
    beamline: SimulatedBeamline,
    iterations: int,
) -> None:
    """A Fermat spiral (HXN's rel_spiral_fermat documents) and a spiral scan with no pattern
    in its documents (positions from the encoders only), flown with real documents, Eiger
    frames and PandA positions: complete, every frame paired in order, the encoder
    positions where the stage was, and the object within the raster test's bound."""
    eiger, panda = hxn_detectors
    sample = SpiralSample(beamline)
    # A spiral is chosen by its plan's name once listed (the encoder-only scan by its flag).
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        overrides={"recon": {"iterations": iterations}},
        plan_names=("fly2dpd", "rel_spiral_fermat", "fermat"),
    )
    try:
        result = fly_spiral(RE, eiger, panda, sample, commanded=commanded)
        assert result.exit_status == "success"
        assert live.wait(timeout=240)
        raw_uid = result.run_start_uids[0]
        node = processed(live.tiled.client(), raw_uid)
        md = node.metadata
        assert md["status"] == "complete", md.get("reason")
        assert md["config"]["grid"]["kind"] == ("fermat" if commanded else "positions")
        assert md["config"]["grid"]["num_points"] == sample.num_points
        assert md["counters"]["frames_used"] == sample.num_points
        diffraction = read_diffraction(node)
        np.testing.assert_array_equal(np.sort(diffraction.indices), np.arange(sample.num_points))
        order = np.argsort(diffraction.indices)
        np.testing.assert_allclose(
            diffraction.positions_m[order] * 1e6, sample.positions_um, atol=0.01
        )
        assert node["final"]["position_errors"].read().shape == (sample.num_points,)
        error, *_ = final_object_error(sample, node)
        assert error <= MAX_OBJECT_ERROR, f"object error {error:.3f}"
    finally:
        live.close()
