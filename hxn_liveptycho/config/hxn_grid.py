"""Where a scan's points lie, from whichever place HXN's plan family writes it.

``scan.scan_input`` for PandA fly scans (``2D_FLY_PANDA``), ``plan_args`` for
``FlyPlan2D``, and ``plan_args.args`` (motor, start, stop, num, repeated) for
mesh plans give a raster; a Fermat spiral (``rel_spiral_fermat``,
``spiral_fermat``, HXN's ``fermat``, or any plan whose ``plan_pattern`` is
``spiral_fermat``) gives its arguments, from which its points are worked out
(:mod:`~hxn_liveptycho.config.scan_paths`); a scan that commands no pattern at
all is reconstructed from its encoder positions when the start document says
how many there are (``num_points``) and where they lie (bluesky's ``extents``).
1-D and 3-D scans are refused as not reconstructed live. Each value is checked
by the document field it came from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from hxn_liveptycho.config.hxn_documents import Problems, read_number
from hxn_liveptycho.config.scan_paths import FermatSpiral

logger = logging.getLogger(__name__)

#: Plan names of Fermat spiral scans (bluesky's absolute and relative plans, HXN's wrapper).
SPIRAL_PLAN_NAMES = ("rel_spiral_fermat", "spiral_fermat", "fermat")
#: Start-document keys a Fermat spiral's points cannot be placed without (x_start, y_start,
#: dr_y and tilt default to 0, 0, dr and 0 as in the plans).
_SPIRAL_REQUIRED = ("x_range", "y_range", "dr", "factor")


def _count(value: Any, where: str, problems: Problems) -> int | None:
    """A number of points: an int, or a float that is whole (HXN writes 64.0); 5.7 is refused
    rather than truncated, since a truncated count misplaces every row after the first."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        count = int(value)
    else:
        number = read_number(value, where, problems)
        if number is None:
            return None
        if not number.is_integer():
            problems.invalid.append(f"{where} = {value!r} is not a whole number of points")
            return None
        count = int(number)
    if count < 1:
        problems.invalid.append(f"{where} = {value!r}: a scan needs at least 1 point")
        return None
    return count


def _axes(
    values: Sequence[Any], names: Sequence[str], kind: str, problems: Problems
) -> dict[str, Any] | None:
    """(x_start, x_end, x_num, y_start, y_end, y_num) as grid fields, each checked by name."""
    x0, x1, nx, y0, y1, ny = values
    grid: dict[str, Any] = {
        "kind": kind,
        "x_start_um": read_number(x0, names[0], problems),
        "x_end_um": read_number(x1, names[1], problems),
        "x_num": _count(nx, names[2], problems),
        "y_start_um": read_number(y0, names[3], problems),
        "y_end_um": read_number(y1, names[4], problems),
        "y_num": _count(ny, names[5], problems),
    }
    if any(v is None for v in grid.values()):
        return None
    for axis, label in (("x", names[2]), ("y", names[5])):
        start, end, num = grid[f"{axis}_start_um"], grid[f"{axis}_end_um"], grid[f"{axis}_num"]
        if num > 1 and start == end:
            problems.invalid.append(
                f"{label} = {num} points on a zero {axis} range ({start} → {end} µm): zero step"
            )
            return None
    if grid["x_num"] * grid["y_num"] < 2:
        problems.not_ptychography("a single-point scan has no overlap to reconstruct")
        return None
    return grid


def _motor_name(token: Any) -> str:
    """A motor as plan_args records it: its name, or the repr of the ophyd object."""
    text = str(token)
    if "name='" in text:
        return text.split("name='", 1)[1].split("'", 1)[0]
    return text


def _mesh_axes(args: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """plan_args['args'] split per motor: [motor, start, stop, num(, snake)] repeated."""
    axes: list[tuple[str, list[Any]]] = []
    for token in args:
        if isinstance(token, bool):
            continue  # bluesky's snake flags between axes
        if isinstance(token, Real):
            if axes:
                axes[-1][1].append(token)
            continue
        axes.append((_motor_name(token), []))
    return axes


def read_grid(start: Mapping[str, Any], problems: Problems) -> dict[str, Any] | None:
    """Where the scan's points lie (a ScanGrid's fields), from whichever place the plan
    family writes it; None with the reason in ``problems`` when the documents do not say."""
    scan = start.get("scan") or {}
    scan = scan if isinstance(scan, Mapping) else {}
    plan_name = start.get("plan_name", "")
    plan_args = start.get("plan_args") or {}
    plan_args = plan_args if isinstance(plan_args, Mapping) else {}
    scan_type = scan.get("type")
    shape = scan.get("shape")
    dims: list[Any] = list(shape) if isinstance(shape, list | tuple) else []
    if len(dims) > 2 and any(isinstance(n, int | float) and n > 1 for n in dims[:-2]):
        problems.not_ptychography(f"a 3-D scan (scan.shape {dims}) is not reconstructed live")
        return None
    if scan_type == "2D_FLY_PANDA":
        scan_input = scan.get("scan_input")
        if not isinstance(scan_input, list | tuple) or len(scan_input) < 6:
            problems.missing.append("scan.scan_input[6]")
            return None
        names = [
            f"scan.scan_input[{i}] ({label})"
            for i, label in enumerate(("x_start", "x_end", "x_num", "y_start", "y_end", "y_num"))
        ]
        return _axes(scan_input[:6], names, "fly2d_panda", problems)
    if isinstance(scan_type, str) and scan_type.upper().startswith(("1D", "3D")):
        problems.not_ptychography(
            f"a {scan_type[:2]} scan (scan.type {scan_type!r}) is not a 2-D raster"
        )
        return None
    if plan_name == "FlyPlan2D":
        keys = ("scan_start1", "scan_end1", "num1", "scan_start2", "scan_end2", "num2")
        absent = [f"plan_args.{k}" for k in keys if k not in plan_args]
        if absent:
            problems.missing.extend(absent)
            return None
        return _axes(
            [plan_args[k] for k in keys], [f"plan_args.{k}" for k in keys], "flyplan2d", problems
        )
    if plan_name in SPIRAL_PLAN_NAMES or start.get("plan_pattern") == "spiral_fermat":
        return _spiral(start, plan_args, problems)
    args = plan_args.get("args")
    if isinstance(args, list | tuple):
        axes = _mesh_axes(args)
        scanned = [(name, values) for name, values in axes if len(values) >= 3]
        if len(scanned) > 2:
            moving = [name for name, values in scanned if values[2] != 1]
            if len(moving) > 2:
                problems.not_ptychography(
                    f"a 3-D grid over {', '.join(moving)} is not reconstructed live "
                    "(only 2-D rasters are)"
                )
                return None
            scanned = [(n, v) for n, v in scanned if n in moving] or scanned[:2]
            logger.info(
                "plan_args.args: %s held at one point; reconstructing the 2-D grid %s",
                ", ".join(n for n, _ in axes if n not in dict(scanned)),
                " x ".join(n for n, _ in scanned),
            )
        if len(scanned) == 2:
            (xname, xv), (yname, yv) = scanned
            names = [
                f"plan_args.args {m} {p}" for m in (xname, yname) for p in ("start", "stop", "num")
            ]
            return _axes([*xv[:3], *yv[:3]], names, "mesh", problems)
        if len(scanned) == 1:
            problems.not_ptychography(f"a 1-D scan of {scanned[0][0]} is not ptychography")
            return None
    if "num_points" in start or "extents" in start:
        return _encoder_positions(start, problems)
    problems.missing.append(
        "scan.scan_input (2D_FLY_PANDA), plan_args (FlyPlan2D / mesh / Fermat spiral), or "
        "num_points and extents (positions from the encoders only)"
    )
    return None


def _documented_count(start: Mapping[str, Any], computed: int, plan: str) -> int:
    """The point count: the one the plan worked out, unless the start document's own
    ``num_points`` (bluesky writes the length of what it scanned) says otherwise, which
    wins with a warning: frames are judged complete against what the plan really did."""
    recorded = start.get("num_points")
    if isinstance(recorded, bool) or not isinstance(recorded, int | float):
        return computed
    if float(recorded).is_integer() and int(recorded) >= 1 and int(recorded) != computed:
        logger.warning(
            "%s: num_points = %s in the start document, %d worked out from its arguments; "
            "expecting %s",
            plan,
            recorded,
            computed,
            recorded,
        )
        return int(recorded)
    return computed


def _spiral(
    start: Mapping[str, Any], plan_args: Mapping[str, Any], problems: Problems
) -> dict[str, Any] | None:
    """A Fermat spiral: its points from the plan's arguments (``plan_args``, else bluesky's
    ``plan_pattern_args``), the extents they span and their count; without ``dr`` or
    ``factor`` but with a recorded ``num_points``, its ranges and that count."""
    pattern = start.get("plan_pattern_args")
    args: dict[str, Any] = dict(pattern) if isinstance(pattern, Mapping) else {}
    args.update(plan_args)
    absent = [f"plan_args.{k}" for k in _SPIRAL_REQUIRED if args.get(k) is None]
    plan = start.get("plan_name") or start.get("plan_pattern")
    if absent and _ranges_and_count_suffice(start, absent):
        return _spiral_from_ranges(start, args, problems, f"{', '.join(absent)} absent")
    if absent:
        problems.missing.append(f"{', '.join(absent)} of the Fermat spiral ({plan})")
        return None
    found = Problems()

    def number(key: str, default: float = 0.0) -> float:
        """plan_args[key] as a float (its default when absent or None; NaN, with the
        problem recorded, when it is no number)."""
        given = args.get(key)
        if given is None:
            return default
        value = read_number(given, f"plan_args.{key}", found)
        return math.nan if value is None else value

    x_range, y_range, dr, factor = (number(k) for k in _SPIRAL_REQUIRED)
    x_start, y_start, tilt = number("x_start"), number("y_start"), number("tilt")
    dr_y = None if args.get("dr_y") is None else number("dr_y")
    if found.invalid:
        problems.invalid.extend(found.invalid)
        return None
    try:
        spiral = FermatSpiral(
            x_range, y_range, dr, factor, x_start=x_start, y_start=y_start, dr_y=dr_y, tilt=tilt
        )
    except ValueError as exc:
        problems.invalid.append(f"plan_args: {exc}")
        return None
    points = spiral.points()
    if len(points) < 2:
        problems.not_ptychography(
            f"a Fermat spiral of {len(points)} point (x_range {spiral.x_range}, y_range "
            f"{spiral.y_range}, dr {spiral.dr}, factor {spiral.factor}) has no overlap"
        )
        return None
    (y_lo, x_lo), (y_hi, x_hi) = points.min(axis=0), points.max(axis=0)
    return {
        "kind": "fermat",
        "x_start_um": float(x_lo),
        "x_end_um": float(x_hi),
        "y_start_um": float(y_lo),
        "y_end_um": float(y_hi),
        "points": _documented_count(start, len(points), "Fermat spiral"),
    }


def _ranges_and_count_suffice(start: Mapping[str, Any], absent: list[str]) -> bool:
    """Whether a spiral that cannot be placed point by point (no ``dr`` or ``factor``, as
    some of HXN's records) can still be reconstructed: its ranges bound the points and the
    start document recorded how many there are."""
    ranges = ("plan_args.x_range", "plan_args.y_range")
    return not any(r in absent for r in ranges) and start.get("num_points") is not None


def _spiral_from_ranges(
    start: Mapping[str, Any], args: Mapping[str, Any], problems: Problems, why: str
) -> dict[str, Any] | None:
    """A spiral's rectangle (its centre ± half its ranges) and the recorded ``num_points``:
    enough for the canvas and the run's completeness; the positions come from the encoders."""
    found = Problems()
    values = [
        read_number(args.get(key) or 0.0, f"plan_args.{key}", found)
        for key in ("x_start", "y_start", "x_range", "y_range")
    ]
    count = _count(start["num_points"], "num_points", found)
    if found.invalid or count is None:
        problems.invalid.extend(found.invalid)
        return None
    centre_x, centre_y, x_range, y_range = (v or 0.0 for v in values)
    if x_range <= 0 or y_range <= 0:
        problems.invalid.append(
            f"plan_args x_range = {x_range}, y_range = {y_range}: a spiral needs positive ranges"
        )
        return None
    logger.info(
        "Fermat spiral (%s): %s; canvas from its ranges, %d points from num_points",
        start.get("plan_name"),
        why,
        count,
    )
    return {
        "kind": "fermat",
        "x_start_um": centre_x - x_range / 2.0,
        "x_end_um": centre_x + x_range / 2.0,
        "y_start_um": centre_y - y_range / 2.0,
        "y_end_um": centre_y + y_range / 2.0,
        "points": count,
    }


def _encoder_positions(start: Mapping[str, Any], problems: Problems) -> dict[str, Any] | None:
    """A scan that commands no pattern: its point count (``num_points``) and the extents its
    positions span (bluesky's ``extents``: ``[[x_lo, x_hi], [y_lo, y_hi]]``, in the order
    of ``motors``, x first as at HXN). The positions themselves come from the encoders.

    What is missing is named, and what was found is still returned, so that an override
    of the rest (``grid`` extents or ``points``) completes it.
    """
    grid: dict[str, Any] = {"kind": "positions"}
    if "num_points" in start:
        count = _count(start["num_points"], "num_points", problems)
        if count is None:
            return None
        if count < 2:
            problems.not_ptychography("a single-point scan has no overlap to reconstruct")
            return None
        grid["points"] = count
    else:
        problems.missing.append("num_points (the scan's point count; or override grid.points)")
    extents = start.get("extents")
    if extents is None:
        problems.missing.append(
            "extents (where the positions lie; or override grid x_start_um, x_end_um, "
            "y_start_um, y_end_um)"
        )
        return grid
    pairs = list(extents) if isinstance(extents, list | tuple) else []
    if len(pairs) != 2 or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        problems.invalid.append(
            f"extents = {extents!r} is not [[x_lo, x_hi], [y_lo, y_hi]] of a 2-D scan"
        )
        return None
    found = Problems()
    bounds = [
        read_number(value, f"extents[{axis}][{end}]", found)
        for axis, pair in enumerate(pairs)
        for end, value in enumerate(pair)
    ]
    if found.invalid:
        problems.invalid.extend(found.invalid)
        return None
    x0, x1, y0, y1 = (float(b) for b in bounds if b is not None)
    grid.update(
        x_start_um=min(x0, x1), x_end_um=max(x0, x1), y_start_um=min(y0, y1), y_end_um=max(y0, y1)
    )
    return grid
