"""The scan's 2-D raster from whichever place HXN's plan family writes it.

``scan.scan_input`` for PandA fly scans (``2D_FLY_PANDA``), ``plan_args`` for
``FlyPlan2D``, and ``plan_args.args`` (motor, start, stop, num, repeated) for
mesh plans; 1-D, 3-D and spiral scans are refused as not reconstructed live.
Each extent is checked by the document field it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from hxn_liveptycho.config.hxn_documents import Problems, read_number

logger = logging.getLogger(__name__)


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
    """The commanded 2-D raster from whichever place the plan family writes it."""
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
    if plan_name in ("rel_spiral_fermat", "fermat"):
        problems.not_ptychography(f"spiral scans ({plan_name}) are not reconstructed live yet")
        return None
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
    problems.missing.append("scan.scan_input (2D_FLY_PANDA) or plan_args (FlyPlan2D / mesh)")
    return None
