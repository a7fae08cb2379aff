"""A plan shaped like HXN's PandA fly scans (``fly2dpd``), with HXN's start-document metadata."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from hxn_liveptycho.sim.devices import SimHXNFlyer


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
