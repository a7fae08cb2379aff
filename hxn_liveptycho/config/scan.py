"""ScanConfig: everything one reconstruction needs, derived from a run's documents.

HXN's acquisition writes the scan geometry into the start document
(``scan.scan_input`` for PandA fly scans, ``plan_args`` for older plans), the
encoder calibration as ``x_scale_factor`` / ``z_scale_factor``, and the
monochromator and stage angles only into the baseline.
:func:`scan_config_from_documents` turns those into one validated, frozen model
following HXN's own conventions (step = range / points, the stage angle's
foreshortening of x, dwell wherever a plan put it); a user override may replace
any field. The models are in :mod:`~hxn_liveptycho.config.scan_model`, the
readers of each field in :mod:`~hxn_liveptycho.config.hxn_documents` and
:mod:`~hxn_liveptycho.config.hxn_grid`; this module puts them together.

Two kinds of refusal, each one line:

* :class:`NotPtychographyError`: the run is not something to reconstruct (no
  diffraction detector, no distance, a 3-D or 1-D scan, one point); it names
  why first and then every missing key, so a run chosen by its plan name alone
  is skipped with that line.
* :class:`ConfigurationError`: the run is ptychography but a value is
  unphysical (a zero step, ``dcm_th = 0``, a negative distance, 5.7 points);
  it names the document field and the value, so the operator can fix the plan
  or override the field rather than read a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from hxn_liveptycho.config.hxn_documents import (
    DETECTOR_KEYS,
    DETECTOR_PIXEL_M,
    Problems,
    energy_kev_from_dcm_theta,
    no_detector_reason,
    read_detector,
    read_distance,
    read_dwell,
    read_energy,
    read_number,
    read_scan_id,
    read_stage_angle,
)
from hxn_liveptycho.config.hxn_grid import read_grid
from hxn_liveptycho.config.scan_model import (
    EncoderConfig,
    ProbeGuess,
    RoiConfig,
    ScanConfig,
    ScanGrid,
    x_projection,
)
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.util.validation import deep_merge, validation_problems

# The models and the readers others use, found here as before the split.
__all__ = [
    "DETECTOR_KEYS",
    "EncoderConfig",
    "ProbeGuess",
    "RoiConfig",
    "ScanConfig",
    "ScanGrid",
    "energy_kev_from_dcm_theta",
    "scan_config_from_documents",
    "x_projection",
]

logger = logging.getLogger(__name__)


def scan_config_from_documents(
    start: Mapping[str, Any],
    *,
    descriptors: list[Mapping[str, Any]] | None = None,
    baseline: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ScanConfig:
    """Build the run's :class:`ScanConfig`, following HXN's conventions.

    ``baseline`` maps baseline data keys to their first reading (``dcm_th``,
    ``energy``, ``zpsth``, ``dsth``, ...). ``overrides`` is merged last and may set
    any field, nested ones as nested mappings (``{"roi": {"size": 256}}``); a
    field that is overridden is not read from the documents at all, so a bad
    document value can be worked around. Raises :class:`NotPtychographyError`
    (one line: why, then every missing key) or :class:`ConfigurationError`
    (one line: each unphysical field with its value).
    """
    descriptors = descriptors or []
    baseline = baseline or {}
    overrides = dict(overrides or {})
    problems = Problems()
    found = start.get("scan")
    scan: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    plan_name = str(start.get("plan_name") or "")
    derived: dict[str, Any] = {
        "uid": start.get("uid", ""),
        "scan_id": read_scan_id(start.get("scan_id")),
        "plan_name": plan_name,
        "start_time": start.get("time", 0.0),
        "motors": tuple(str(m) for m in start.get("motors") or ()),
    }

    detector = overrides.get("detector") or read_detector(start, descriptors)
    if detector is None:
        problems.not_ptychography(no_detector_reason(start))
    else:
        derived["detector"] = detector
        if detector in DETECTOR_PIXEL_M:
            derived["detector_pixel_m"] = DETECTOR_PIXEL_M[detector]

    if "grid" in overrides:
        scratch = Problems()
        grid = read_grid(start, scratch)
        if grid is not None and not scratch.invalid:
            derived["grid"] = grid  # the override is merged over what the documents say
    else:
        grid = read_grid(start, problems)
        if grid is not None:
            derived["grid"] = grid

    readers: dict[str, Callable[[], float | None]] = {
        "distance_m": lambda: read_distance(scan, plan_name, problems),
        "energy_kev": lambda: read_energy(scan, baseline, problems),
        "dwell_s": lambda: read_dwell(start, detector, descriptors),
    }
    for name, read in readers.items():
        if name not in overrides and (value := read()) is not None:
            derived[name] = value

    if "angle_deg" not in overrides:
        derived["angle_deg"] = read_stage_angle(derived["motors"], baseline, problems)

    encoder: dict[str, Any] = {}
    for axis, key in (("x", "x_scale_factor"), ("y", "z_scale_factor")):
        scale = start.get(key)
        if scale:
            factor = read_number(scale, key, problems)
            if factor is not None:
                encoder[f"{axis}_ratio"] = -factor / 10000.0
    if encoder:
        derived["encoder"] = encoder

    problems.raise_if_any()
    try:
        config = ScanConfig.model_validate(deep_merge(derived, overrides))
    except ValidationError as exc:
        text = "; ".join(
            msg if path == "(top level)" else f"{path}: {msg}"
            for path, msg in validation_problems(exc, ScanConfig)
        )
        raise ConfigurationError(f"invalid scan configuration: {text}") from None
    return _with_projection(config)


def _with_projection(config: ScanConfig) -> ScanConfig:
    """Fold the stage angle's projection into the x encoder ratio and x extents, once, here.

    Positions are made from ``encoder.x_ratio`` wherever they are used (the
    solver, the NN mosaic, ``positions_m``) and the canvas from the grid, so this
    is the one place that puts both in the sample's frame, scaled about the same
    origin; the factor is recorded as ``x_projection``.
    """
    factor = config.x_projection
    if factor == 1.0:
        return config
    logger.info(
        "scan %s: x positions scaled by %.4f (stage angle %g°)",
        config.scan_id,
        factor,
        config.angle_deg,
    )
    encoder = config.encoder.model_copy(update={"x_ratio": config.encoder.x_ratio * factor})
    g = config.grid
    grid = g.model_copy(
        update={"x_start_um": g.x_start_um * factor, "x_end_um": g.x_end_um * factor}
    )
    return config.model_copy(update={"encoder": encoder, "grid": grid})
