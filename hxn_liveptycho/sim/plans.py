"""Plans shaped like HXN's scans, with HXN's start-document metadata.

``fly2dpd``: the PandA raster fly scan. ``fermat_fly``: a Fermat spiral with the
Eiger and the PandA triggered at each point, its start document that of HXN's
``fermat`` (bluesky's ``rel_spiral_fermat``), or, with ``commanded=False``, one
that names no pattern at all: only the point count and the extents, so the
positions come from the encoders alone.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from hxn_liveptycho.sim.devices import SimHXNFlyer
from hxn_liveptycho.sim.spiral import SpiralSample


def fly2dpd(
    flyer: SimHXNFlyer,
    *,
    baseline: Sequence[Any] = (),
    md: dict[str, Any] | None = None,
) -> Generator[Any, Any, str]:
    """Fly the simulated sample through the beam; the start document carries what HXN's does.

    ``scan.type == "2D_FLY_PANDA"``, ``scan.scan_input`` (µm, commanded),
    ``scan.detector_distance`` (m), encoder ``x_scale_factor``/``z_scale_factor``;
    the energy reaches the reconstruction only through the baseline's ``dcm_th``.
    """
    bl = flyer.sample.beamline
    scan_input = [*bl.scan_input(), flyer.dwell]
    start_md: dict[str, Any] = {
        "plan_name": "fly2dpd",
        "plan_args": {"scan_input": scan_input, "dwell": flyer.dwell},
        "motors": ["zpssx", "zpssy"],
        "detectors": [flyer.eiger.name, flyer.panda.name],
        "num_points": flyer.sample.num_points,
        "scan": {
            "type": "2D_FLY_PANDA",
            "scan_input": scan_input,
            "detector_distance": bl.distance_m,
            "detectors": [flyer.eiger.name],
            "dwell": flyer.dwell,
            "shape": [bl.y_num, bl.x_num],
        },
        "x_scale_factor": bl.x_scale_factor,
        "z_scale_factor": bl.z_scale_factor,
        **(md or {}),
    }

    return (yield from _fly(flyer, start_md, baseline))


def fermat_fly(
    flyer: SimHXNFlyer,
    *,
    baseline: Sequence[Any] = (),
    md: dict[str, Any] | None = None,
    commanded: bool = True,
) -> Generator[Any, Any, str]:
    """Scan the simulated sample's Fermat spiral (``flyer.sample`` a SpiralSample).

    ``commanded``: the start document is what HXN's ``fermat`` writes through
    bluesky's ``rel_spiral_fermat`` (``plan_args`` ``x_range``, ``y_range``, ``dr``,
    ``factor``, ``dr_y``, ``tilt``; ``plan_pattern`` ``spiral_fermat``; bluesky's
    ``num_points`` and its loose ``extents`` of ± the ranges). ``commanded=False``:
    a scan that names no pattern (``ptychography: True``, ``num_points`` and the
    ``extents`` its points span), reconstructed from the encoder positions alone.
    Both carry HXN's ``scan.detector_distance``, scale factors and dwell.
    """
    sample = flyer.sample
    if not isinstance(sample, SpiralSample) or sample.spiral is None:
        raise TypeError(f"fermat_fly scans a SpiralSample, not a {type(sample).__name__}")
    spiral = sample.spiral
    bl = sample.beamline
    start_md: dict[str, Any] = {
        "motors": ["zpssx", "zpssy"],
        "detectors": [flyer.eiger.name, flyer.panda.name],
        "num_points": flyer.sample.num_points,
        "scan": {
            "detector_distance": bl.distance_m,
            "detectors": [flyer.eiger.name],
            "dwell": flyer.dwell,
        },
        "x_scale_factor": bl.x_scale_factor,
        "z_scale_factor": bl.z_scale_factor,
    }
    if commanded:
        arguments = {
            "x_start": spiral.x_start,
            "y_start": spiral.y_start,
            "x_range": spiral.x_range,
            "y_range": spiral.y_range,
            "dr": spiral.dr,
            "factor": spiral.factor,
            "dr_y": spiral.dr_y,
            "tilt": spiral.tilt,
        }
        start_md.update(
            plan_name="rel_spiral_fermat",
            plan_args={
                "detectors": [flyer.eiger.name, flyer.panda.name],
                "x_motor": "zpssx",
                "y_motor": "zpssy",
                **arguments,
                "per_step": "None",
            },
            plan_pattern="spiral_fermat",
            plan_pattern_module="bluesky.plan_patterns",
            plan_pattern_args={"x_motor": "zpssx", "y_motor": "zpssy", **arguments},
            extents=[
                [spiral.x_start - spiral.x_range, spiral.x_start + spiral.x_range],
                [spiral.y_start - spiral.y_range, spiral.y_start + spiral.y_range],
            ],
        )
    else:
        (y_lo, x_lo), (y_hi, x_hi) = spiral.points().min(axis=0), spiral.points().max(axis=0)
        start_md.update(
            plan_name="fly_positions",
            plan_args={"dwell": flyer.dwell},
            ptychography=True,
            extents=[[float(x_lo), float(x_hi)], [float(y_lo), float(y_hi)]],
        )
    start_md.update(md or {})
    return (yield from _fly(flyer, start_md, baseline))


def _fly(
    flyer: SimHXNFlyer, start_md: dict[str, Any], baseline: Sequence[Any]
) -> Generator[Any, Any, str]:
    """One run: kick the flyer off, wait for it, collect its encoder events."""

    @bpp.run_decorator(md=start_md)
    def inner() -> Generator[Any, Any, None]:
        yield from bps.kickoff(flyer, wait=True)
        yield from bps.complete(flyer, wait=True)
        yield from bps.collect(flyer)

    plan = bpp.finalize_wrapper(inner(), _stop_flyer(flyer))
    if baseline:
        plan = bpp.baseline_wrapper(plan, list(baseline))
    return (yield from plan)


def _stop_flyer(flyer: SimHXNFlyer) -> Generator[Any, Any, None]:
    flyer.stop()
    yield from bps.null()
