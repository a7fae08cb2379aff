"""ScanConfig: everything one reconstruction needs, derived from a run's documents.

HXN's acquisition writes the scan geometry into the start document
(``scan.scan_input`` for PandA fly scans, ``plan_args`` for older plans), the
encoder calibration as ``x_scale_factor`` / ``z_scale_factor``, and the
monochromator and stage angles only into the baseline.
:func:`scan_config_from_documents` turns those into one validated, frozen model
following HXN's own conventions (step = range / points, the stage angle's
foreshortening of x, dwell wherever a plan put it); a user override may replace
any field.

Two kinds of refusal, each one line:

* :class:`NotPtychographyError`: the run is not something to reconstruct (no
  diffraction detector, no distance, a 3-D or spiral grid, one point); it names
  why first and then every missing key, so a run chosen by its plan name alone
  is skipped with that line.
* :class:`ConfigurationError`: the run is ptychography but a value is
  unphysical (a zero step, ``dcm_th = 0``, a negative distance, 5.7 points);
  it names the document field and the value, so the operator can fix the plan
  or override the field rather than read a traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    model_validator,
)

from hxn_liveptycho.config.nn_params import NNParams
from hxn_liveptycho.errors import ConfigurationError, NotPtychographyError
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.util.validation import deep_merge, validation_problems

logger = logging.getLogger(__name__)

#: Detector pixel pitch by detector name (Dectris Eigers 75 µm, Merlin/Maxipix 55 µm).
DETECTOR_PIXEL_M: dict[str, float] = {
    "eiger1": 75e-6,
    "eiger2": 75e-6,
    "merlin": 55e-6,
    "merlin1": 55e-6,
    "maxipix": 55e-6,
}
#: Primary-stream keys that name the diffraction detector, newest first.
DETECTOR_KEYS = ("eiger2_image", "eiger1_image", "eiger2", "eiger1", "merlin1")
#: Detector name prefixes that record diffraction (anything else, e.g. xspress3, is XRF).
DIFFRACTION_DETECTORS = ("eiger", "merlin", "maxipix")
#: Si(111) lattice spacing used by HXN's DCM, in Å.
SI111_D_ANGSTROM = 3.1355893
HC_KEV_ANGSTROM = 12.39842
#: Energies the model accepts (keV); a value outside is a unit or reading mistake.
ENERGY_RANGE_KEV = (0.5, 100.0)
#: Sample-detector distances accepted from a start document (m); beyond is a unit mistake.
MAX_DISTANCE_M = 100.0
#: Past this stage angle HXN projects x with |sin θ| instead of |cos θ|.
PROJECTION_SWITCH_DEG = 45.0


def energy_kev_from_dcm_theta(theta_deg: float) -> float:
    """Bragg's law for the Si(111) monochromator (HXN's ``dcm_th`` in degrees).

    An angle outside (0°, 90°) has no Bragg energy: ``dcm_th = 0`` (an unread
    motor) would otherwise divide by zero, a negative one give a negative energy.
    """
    theta = float(theta_deg)
    if not (math.isfinite(theta) and 0.0 < theta < 90.0):
        raise ConfigurationError(
            f"dcm_th = {theta_deg!r}°: not a Si(111) Bragg angle (needs 0° < θ < 90°)"
        )
    return HC_KEV_ANGSTROM / (2.0 * SI111_D_ANGSTROM * math.sin(math.radians(theta)))


def x_projection(angle_deg: float) -> float:
    """HXN's foreshortening of the x axis at stage angle θ: |cos θ| up to 45°, |sin θ| past.

    HXN's pipeline scales the fast (x) positions by this factor so a rotated
    sample is reconstructed in its own frame rather than stretched by 1/|cos θ|;
    past 45° HXN scans the stage's other lateral motor, whose projection is the
    sine.
    """
    theta = math.radians(angle_deg)
    if abs(angle_deg) <= PROJECTION_SWITCH_DEG:
        return abs(math.cos(theta))
    return abs(math.sin(theta))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScanGrid(_Frozen):
    """Scan extents in micrometres as the plan commanded them, x on the sample.

    Once a run is configured the x extents carry :attr:`ScanConfig.x_projection`
    like the positions do, so the canvas sized from them holds the positions
    (HXN foreshortens its x range the same way). The step follows HXN:
    ``|end - start| / num`` (a fly scan's frames each integrate one step of
    motion, so ``num`` steps span the commanded range), not ``/(num - 1)``.
    """

    kind: Literal["fly2d_panda", "flyplan2d", "fermat", "mesh"] = Field(
        description="Which plan family the geometry was read from."
    )
    x_start_um: float
    x_end_um: float
    x_num: int = Field(ge=1, description="Points along the fast (x) axis.")
    y_start_um: float
    y_end_um: float
    y_num: int = Field(ge=1, description="Points along the slow (y) axis.")
    step_um: float | None = Field(
        default=None, gt=0.0, description="Spiral radial step (Fermat scans)."
    )

    @model_validator(mode="after")
    def _steps_are_physical(self) -> ScanGrid:
        """A non-finite extent, or several points on a zero range, is refused naming the axis:
        every position would coincide and the canvas and probe guess would divide by zero."""
        for axis in ("x", "y"):
            start, end = getattr(self, f"{axis}_start_um"), getattr(self, f"{axis}_end_um")
            num = getattr(self, f"{axis}_num")
            if not (math.isfinite(start) and math.isfinite(end)):
                raise ValueError(f"{axis} range {start} → {end} µm is not finite")
            if num > 1 and start == end:
                raise ValueError(
                    f"{axis}: {num} points on a zero range ({start} → {end} µm): zero step"
                )
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def num_points(self) -> int:
        return self.x_num * self.y_num

    @computed_field  # type: ignore[prop-decorator]
    @property
    def x_step_um(self) -> float:
        """HXN's x step: range / points (0 for a single column)."""
        return abs(self.x_end_um - self.x_start_um) / self.x_num if self.x_num > 1 else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def y_step_um(self) -> float:
        """HXN's y step: range / points (0 for a single row)."""
        return abs(self.y_end_um - self.y_start_um) / self.y_num if self.y_num > 1 else 0.0


class EncoderConfig(_Frozen):
    """How PandA encoder samples become positions in micrometres.

    HXN's legacy convention: ``ratio = -scale_factor / 10000`` (counts → µm) and a
    direction of -1 on both axes, so ``position_um = counts * ratio * direction``.
    ``x_ratio`` also carries the stage angle's projection
    (:attr:`ScanConfig.x_projection`) once a run is configured, so positions
    are in the sample's frame wherever they are used.
    """

    x_channel: str = Field(
        default="/INENC2.VAL.Value", description="PandA dataset of the x encoder."
    )
    y_channel: str = Field(
        default="/INENC3.VAL.Value", description="PandA dataset of the y encoder."
    )
    time_channel: str | None = Field(
        default="/PCAP.TS_TRIG.Value",
        description="PandA dataset of sample times (s); with the detector's frame time it "
        "gives the samples per frame before the scan ends.",
    )
    x_ratio: float = Field(
        default=-1e-4,
        description="Encoder counts → µm along x; a run's configuration multiplies the "
        "calibration (or an override of it) by x_projection.",
    )
    y_ratio: float = Field(default=-1e-4, description="Encoder counts → µm along y.")
    x_direction: float = -1.0
    y_direction: float = -1.0
    upsample: int | None = Field(
        default=None,
        ge=1,
        description="Encoder samples per detector frame; None detects it from the streams.",
    )


class RoiConfig(_Frozen):
    """The detector crop fed to the solver: a square of ``size`` pixels around a centre."""

    size: int = Field(default=128, ge=16, description="Crop edge in detector pixels.")
    center_y: float | None = Field(
        default=None, description="Beam centre row; None: from the data."
    )
    center_x: float | None = Field(default=None, description="Beam centre column; None: from data.")


class ProbeGuess(_Frozen):
    """How the first probe is guessed from the data when no probe file is given."""

    footprint_um: float | None = Field(
        default=None, gt=0.0, description="Beam footprint on the sample; None: footprint_steps."
    )
    footprint_steps: float = Field(
        default=3.0, gt=0.0, description="Footprint as a multiple of the scan step (if no µm)."
    )
    defocus_sign: Literal[1, -1] = Field(
        default=1, description="+1: sample downstream of the focus; -1: upstream."
    )


class ScanConfig(_Frozen):
    """One run's reconstruction configuration; built by :func:`scan_config_from_documents`."""

    uid: str
    scan_id: int | str | None = Field(
        default=None,
        description="The run's scan_id (not unique at HXN); a numeric string becomes an int.",
    )
    plan_name: str = ""
    start_time: float = 0.0
    motors: tuple[str, ...] = ()
    grid: ScanGrid
    dwell_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Exposure per point: scan.dwell, scan.scan_input[6], plan_args dwell / "
        "exposure_time, start exposure_time, or the detector's configured frame time.",
    )
    energy_kev: float = Field(
        gt=ENERGY_RANGE_KEV[0],
        lt=ENERGY_RANGE_KEV[1],
        description="From baseline dcm_th (Si(111) Bragg law), else baseline energy, "
        "else scan.energy.",
    )
    distance_m: float = Field(gt=0.0, description="Sample to detector distance.")
    detector: str = "eiger2"
    detector_pixel_m: float = Field(default=75e-6, gt=0.0)
    angle_deg: float = Field(
        default=0.0,
        ge=-360.0,
        le=360.0,
        description="Stage rotation angle: baseline zpsth when the y motor is zpssy, 0 for "
        "ssx/ssy stages, else baseline dsth (HXN's rule).",
    )
    angle_correction: bool = Field(
        default=True,
        description="Scale x positions by x_projection of angle_deg (absolute cosine up to "
        "45°, absolute sine past), as HXN's pipeline does; false keeps stage coordinates.",
    )
    encoder: EncoderConfig = EncoderConfig()
    roi: RoiConfig = RoiConfig()
    probe: ProbeGuess = ProbeGuess()
    canvas_margin: float = Field(
        default=0.2, ge=0.0, description="Extra canvas per side, as a fraction of the scan range."
    )
    recon: IterativeParams = IterativeParams()
    mode: Literal["iterative", "nn", "both"] = Field(
        default="iterative",
        description="Which branches run: the iterative solver, the single-shot network "
        "(live mosaic under nn/), or both side by side.",
    )
    nn: NNParams = NNParams()

    @model_validator(mode="after")
    def _projection_is_defined(self) -> ScanConfig:
        """Past ±90° HXN's |sin| rule folds the scan towards a line (0 at 180°): refuse it
        rather than reconstruct a collapsed x axis."""
        if self.angle_correction and abs(self.angle_deg) > 90.0:
            raise ValueError(
                f"angle_deg = {self.angle_deg}° is outside ±90°, where HXN's angle correction "
                "is defined; override angle_deg or set angle_correction=false"
            )
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def wavelength_m(self) -> float:
        return 1.23984e-9 / self.energy_kev

    @computed_field  # type: ignore[prop-decorator]
    @property
    def pixel_size_m(self) -> float:
        """Object pixel size of the far-field geometry: λ z / (N p)."""
        return self.wavelength_m * self.distance_m / (self.roi.size * self.detector_pixel_m)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def x_projection(self) -> float:
        """The factor x positions carry for the stage angle (1 when angle_correction is off)."""
        return x_projection(self.angle_deg) if self.angle_correction else 1.0

    @property
    def num_points(self) -> int:
        return self.grid.num_points

    @property
    def step_um(self) -> float:
        """The scan step on the sample: the spiral's, else the larger axis step (HXN's
        range / points; x already foreshortened like the positions)."""
        g = self.grid
        return g.step_um or max(g.x_step_um, g.y_step_um)

    @property
    def probe_footprint_px(self) -> float:
        dx_um = self.pixel_size_m * 1e6
        footprint_um = self.probe.footprint_um or self.probe.footprint_steps * self.step_um
        return footprint_um / dx_um


class _Problems:
    """What the documents lack (the run is not ptychography) and what they get wrong
    (the run is, but a value is unphysical), collected so one line names them all."""

    def __init__(self) -> None:
        self.why: list[str] = []
        self.missing: list[str] = []
        self.invalid: list[str] = []

    def not_ptychography(self, reason: str) -> None:
        self.why.append(reason)

    def raise_if_any(self) -> None:
        if self.why or self.missing:
            parts = [*self.why]
            if self.missing:
                parts.append("missing " + "; ".join(self.missing))
            raise NotPtychographyError("; ".join(parts))
        if self.invalid:
            raise ConfigurationError("invalid scan metadata: " + "; ".join(self.invalid))


def _number(value: Any, where: str, problems: _Problems) -> float | None:
    """A finite float from a document value, else a problem naming ``where`` and the value."""
    if isinstance(value, bool) or value is None:
        problems.invalid.append(f"{where} = {value!r} is not a number")
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        problems.invalid.append(f"{where} = {value!r} is not a number")
        return None
    if not math.isfinite(number):
        problems.invalid.append(f"{where} = {value!r} is not finite")
        return None
    return number


def _count(value: Any, where: str, problems: _Problems) -> int | None:
    """A number of points: an int, or a float that is whole (HXN writes 64.0); 5.7 is refused
    rather than truncated, since a truncated count misplaces every row after the first."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        count = int(value)
    else:
        number = _number(value, where, problems)
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
    values: Sequence[Any], names: Sequence[str], kind: str, problems: _Problems
) -> dict[str, Any] | None:
    """(x_start, x_end, x_num, y_start, y_end, y_num) as grid fields, each checked by name."""
    x0, x1, nx, y0, y1, ny = values
    grid: dict[str, Any] = {
        "kind": kind,
        "x_start_um": _number(x0, names[0], problems),
        "x_end_um": _number(x1, names[1], problems),
        "x_num": _count(nx, names[2], problems),
        "y_start_um": _number(y0, names[3], problems),
        "y_end_um": _number(y1, names[4], problems),
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


def _grid_from_start(start: Mapping[str, Any], problems: _Problems) -> dict[str, Any] | None:
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


def _configured_frame_time(
    detector: str | None, descriptors: list[Mapping[str, Any]]
) -> tuple[Any, str] | None:
    """The detector's own frame time from a descriptor's configuration, if it recorded one."""
    if not detector:
        return None
    keys = [f"{detector}_{k}" for k in ("frame_time", "cam_acquire_period", "cam_acquire_time")]
    for descriptor in descriptors:
        for device, conf in (descriptor.get("configuration") or {}).items():
            data = conf.get("data") if isinstance(conf, Mapping) else None
            for key in keys:
                if isinstance(data, Mapping) and data.get(key) is not None:
                    return data[key], f"configuration {device}.{key}"
    return None


def _dwell(
    start: Mapping[str, Any], detector: str | None, descriptors: list[Mapping[str, Any]]
) -> float | None:
    """The exposure per point from every place HXN's plans put it, first usable one wins.

    Dwell only bounds how long a run may wait for its ``stop``; an unusable
    value is logged and the next source tried rather than failing the run.
    """
    scan: Mapping[str, Any] = start.get("scan") or {}
    scan = scan if isinstance(scan, Mapping) else {}
    plan_args: Mapping[str, Any] = start.get("plan_args") or {}
    plan_args = plan_args if isinstance(plan_args, Mapping) else {}
    candidates: list[tuple[Any, str]] = [(scan.get("dwell"), "scan.dwell")]
    scan_input = scan.get("scan_input")
    inputs: list[Any] = list(scan_input) if isinstance(scan_input, list | tuple) else []
    if scan.get("type") == "2D_FLY_PANDA" and len(inputs) > 6:
        candidates.append((inputs[6], "scan.scan_input[6]"))
    for key in ("dwell", "exposure_time"):
        candidates.append((plan_args.get(key), f"plan_args.{key}"))
    for key in ("exposure_time", "dwell"):
        candidates.append((start.get(key), key))
    configured = _configured_frame_time(detector, descriptors)
    if configured is not None:
        candidates.append(configured)
    for value, where in candidates:
        if value is None:
            continue
        try:
            dwell = float(value)
        except (TypeError, ValueError):
            dwell = math.nan
        if math.isfinite(dwell) and dwell > 0 and not isinstance(value, bool):
            return dwell
        logger.warning("ignoring %s = %r: not a positive exposure time", where, value)
    return None


def _energy(
    scan: Mapping[str, Any], baseline: Mapping[str, Any], problems: _Problems
) -> float | None:
    """dcm_th (Si(111) Bragg law), else a baseline ``energy`` reading (keV), else scan.energy.

    ``dcm_th = 0`` is an unread motor, not an infinite energy: the next source is
    used, and with none the run fails naming the value.
    """
    sources = (
        (baseline.get("dcm_th"), "baseline.dcm_th"),
        (baseline.get("energy"), "baseline.energy"),
        (scan.get("energy"), "scan.energy"),
    )
    present = [(value, where) for value, where in sources if value is not None]
    if not present:
        problems.missing.append("baseline.dcm_th or baseline.energy (energy)")
        return None
    refused = _Problems()
    for value, where in present:
        number = _number(value, where, refused)
        if number is None:
            continue
        if where == "baseline.dcm_th":
            try:
                energy = energy_kev_from_dcm_theta(number)
            except ConfigurationError:
                refused.invalid.append(
                    f"{where} = {value!r}° is not a Si(111) Bragg angle (0° < θ < 90°)"
                )
                continue
        elif ENERGY_RANGE_KEV[0] < number < ENERGY_RANGE_KEV[1]:
            energy = number
        else:
            low, high = ENERGY_RANGE_KEV
            refused.invalid.append(f"{where} = {value!r} is not an energy in keV ({low} to {high})")
            continue
        if refused.invalid:
            logger.warning("%s; energy from %s = %.4f keV", refused.invalid[0], where, energy)
        return energy
    problems.invalid.extend(refused.invalid)
    return None


def _distance(scan: Mapping[str, Any], plan_name: str, problems: _Problems) -> float | None:
    value = scan.get("detector_distance")
    if value is None:
        if plan_name == "FlyPlan2D":
            problems.not_ptychography(
                "FlyPlan2D run without scan.detector_distance (older plans never recorded it; "
                "override distance_m to reconstruct it)"
            )
        else:
            problems.missing.append("scan.detector_distance")
        return None
    distance = _number(value, "scan.detector_distance", problems)
    if distance is None:
        return None
    if not 0.0 < distance <= MAX_DISTANCE_M:
        problems.invalid.append(
            f"scan.detector_distance = {value!r} m is not a sample-detector distance "
            f"(0 < z ≤ {MAX_DISTANCE_M:g} m)"
        )
        return None
    return distance


def _detector_from(start: Mapping[str, Any], descriptors: list[Mapping[str, Any]]) -> str | None:
    for descriptor in descriptors:
        keys = descriptor.get("data_keys", {})
        for key in DETECTOR_KEYS:
            if key in keys:
                return key.removesuffix("_image")
    scan = start.get("scan") or {}
    for name in scan.get("detectors") or start.get("detectors") or []:
        if str(name).startswith(DIFFRACTION_DETECTORS):
            return str(name)
    return None


def _no_detector_reason(start: Mapping[str, Any]) -> str:
    """Why a run has no diffraction detector, naming what it did record (an XRF-only
    fly2dpd lists only fluorescence detectors)."""
    scan = start.get("scan") or {}
    named = list(scan.get("detectors") or start.get("detectors") or [])
    recorded = f"detectors {named}" if named else "no detectors listed"
    return (
        "no diffraction detector (an Eiger, Merlin or Maxipix): "
        f"{recorded}, and no {' / '.join(DETECTOR_KEYS[:2])} in primary"
    )


def _stage_angle(motors: Sequence[str], baseline: Mapping[str, Any], problems: _Problems) -> float:
    """HXN's rule: zpsth when the y motor is zpssy, 0 for the ssx/ssy stage, else dsth.

    A missing reading is logged and taken as 0 (no correction), as HXN does,
    rather than borrowing the other stage's angle.
    """
    y_motor = motors[1] if len(motors) > 1 else ""
    if y_motor == "ssy":
        return 0.0
    key = "zpsth" if y_motor == "zpssy" else "dsth"
    value = baseline.get(key)
    if value is None:
        if baseline:
            logger.warning(
                "stage angle: no baseline %s for motors %s; taking 0° (no angle correction)",
                key,
                list(motors),
            )
        return 0.0
    angle = _number(value, f"baseline.{key}", problems)
    return 0.0 if angle is None else angle


def _scan_id(value: Any) -> int | str | None:
    """HXN's scan_id as an int when it is one (``"404611"``, ``404611.0``), else its text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():
        return int(float(value))
    text = str(value).strip()
    return int(text) if text.isdigit() else text or None


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
    problems = _Problems()
    found = start.get("scan")
    scan: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    plan_name = str(start.get("plan_name") or "")
    derived: dict[str, Any] = {
        "uid": start.get("uid", ""),
        "scan_id": _scan_id(start.get("scan_id")),
        "plan_name": plan_name,
        "start_time": start.get("time", 0.0),
        "motors": tuple(str(m) for m in start.get("motors") or ()),
    }

    detector = overrides.get("detector") or _detector_from(start, descriptors)
    if detector is None:
        problems.not_ptychography(_no_detector_reason(start))
    else:
        derived["detector"] = detector
        if detector in DETECTOR_PIXEL_M:
            derived["detector_pixel_m"] = DETECTOR_PIXEL_M[detector]

    if "grid" in overrides:
        scratch = _Problems()
        grid = _grid_from_start(start, scratch)
        if grid is not None and not scratch.invalid:
            derived["grid"] = grid  # the override is merged over what the documents say
    else:
        grid = _grid_from_start(start, problems)
        if grid is not None:
            derived["grid"] = grid

    if "distance_m" not in overrides:
        distance = _distance(scan, plan_name, problems)
        if distance is not None:
            derived["distance_m"] = distance

    if "energy_kev" not in overrides:
        energy = _energy(scan, baseline, problems)
        if energy is not None:
            derived["energy_kev"] = energy

    if "dwell_s" not in overrides:
        dwell = _dwell(start, detector, descriptors)
        if dwell is not None:
            derived["dwell_s"] = dwell

    if "angle_deg" not in overrides:
        derived["angle_deg"] = _stage_angle(derived["motors"], baseline, problems)

    encoder: dict[str, Any] = {}
    for axis, key in (("x", "x_scale_factor"), ("y", "z_scale_factor")):
        scale = start.get(key)
        if scale:
            factor = _number(scale, key, problems)
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
