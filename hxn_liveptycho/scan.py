"""ScanConfig: everything one reconstruction needs, derived from a run's documents.

HXN's acquisition writes the scan geometry into the start document
(``scan.scan_input`` for PandA fly scans, ``plan_args`` for older plans), the
encoder calibration as ``x_scale_factor`` / ``z_scale_factor``, and the
monochromator angle only into the baseline. :func:`scan_config_from_documents`
turns those into one validated, frozen model; a user override may replace any
field. A run that lacks something gets :class:`NotPtychographyError` naming every
missing key at once, so the log says in one line why the run was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from hxn_liveptycho.errors import ConfigurationError, NotPtychographyError
from hxn_liveptycho.nn.config import NNParams
from hxn_liveptycho.overrides import deep_merge
from hxn_liveptycho.recon.iterative import IterativeParams

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
#: Si(111) lattice spacing used by HXN's DCM, in Å.
SI111_D_ANGSTROM = 3.1355893
HC_KEV_ANGSTROM = 12.39842


def energy_kev_from_dcm_theta(theta_deg: float) -> float:
    """Bragg's law for the Si(111) monochromator (HXN's ``dcm_th`` in degrees)."""
    return HC_KEV_ANGSTROM / (2.0 * SI111_D_ANGSTROM * math.sin(math.radians(theta_deg)))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScanGrid(_Frozen):
    """Commanded scan extents in micrometres, as the plan asked for them."""

    kind: Literal["fly2d_panda", "flyplan2d", "fermat", "mesh"] = Field(
        description="Which plan family the geometry was read from."
    )
    x_start_um: float
    x_end_um: float
    x_num: int = Field(ge=1, description="Points along the fast (x) axis; 0 for spirals.")
    y_start_um: float
    y_end_um: float
    y_num: int = Field(ge=1)
    step_um: float | None = Field(default=None, description="Spiral radial step (Fermat scans).")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def num_points(self) -> int:
        return self.x_num * self.y_num


class EncoderConfig(_Frozen):
    """How PandA encoder samples become positions in micrometres.

    HXN's legacy convention: ``ratio = -scale_factor / 10000`` (counts → µm) and a
    direction of -1 on both axes, so ``position_um = counts * ratio * direction``.
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
    x_ratio: float = Field(default=-1e-4, description="Encoder counts → µm along x.")
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
    scan_id: int | None = None
    plan_name: str = ""
    start_time: float = 0.0
    motors: tuple[str, ...] = ()
    grid: ScanGrid
    dwell_s: float | None = Field(default=None, description="Exposure per point.")
    energy_kev: float = Field(gt=0.5, lt=100.0)
    distance_m: float = Field(gt=0.0, description="Sample to detector distance.")
    detector: str = "eiger2"
    detector_pixel_m: float = Field(default=75e-6, gt=0.0)
    angle_deg: float = 0.0
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

    @computed_field  # type: ignore[prop-decorator]
    @property
    def wavelength_m(self) -> float:
        return 1.23984e-9 / self.energy_kev

    @computed_field  # type: ignore[prop-decorator]
    @property
    def pixel_size_m(self) -> float:
        """Object pixel size of the far-field geometry: λ z / (N p)."""
        return self.wavelength_m * self.distance_m / (self.roi.size * self.detector_pixel_m)

    @property
    def num_points(self) -> int:
        return self.grid.num_points

    @property
    def step_um(self) -> float:
        """Mean commanded step of the raster (the larger of the two axes)."""
        g = self.grid
        steps = [
            abs(g.x_end_um - g.x_start_um) / max(g.x_num - 1, 1),
            abs(g.y_end_um - g.y_start_um) / max(g.y_num - 1, 1),
        ]
        return g.step_um or max(steps)

    @property
    def probe_footprint_px(self) -> float:
        dx_um = self.pixel_size_m * 1e6
        footprint_um = self.probe.footprint_um or self.probe.footprint_steps * self.step_um
        return footprint_um / dx_um


def _grid_from_start(start: Mapping[str, Any], missing: list[str]) -> dict[str, Any] | None:
    scan = start.get("scan") or {}
    plan_name = start.get("plan_name", "")
    plan_args = start.get("plan_args") or {}
    scan_input = scan.get("scan_input") if isinstance(scan, Mapping) else None
    if isinstance(scan, Mapping) and scan.get("type") == "2D_FLY_PANDA":
        if not isinstance(scan_input, list | tuple) or len(scan_input) < 6:
            missing.append("scan.scan_input[6]")
            return None
        x0, x1, nx, y0, y1, ny = scan_input[:6]
        return {
            "kind": "fly2d_panda",
            "x_start_um": x0,
            "x_end_um": x1,
            "x_num": int(nx),
            "y_start_um": y0,
            "y_end_um": y1,
            "y_num": int(ny),
        }
    if plan_name == "FlyPlan2D":
        keys = ("scan_start1", "scan_end1", "num1", "scan_start2", "scan_end2", "num2")
        absent = [f"plan_args.{k}" for k in keys if k not in plan_args]
        if absent:
            missing.extend(absent)
            return None
        return {
            "kind": "flyplan2d",
            "x_start_um": plan_args["scan_start1"],
            "x_end_um": plan_args["scan_end1"],
            "x_num": int(plan_args["num1"]),
            "y_start_um": plan_args["scan_start2"],
            "y_end_um": plan_args["scan_end2"],
            "y_num": int(plan_args["num2"]),
        }
    if plan_name in ("rel_spiral_fermat", "fermat"):
        missing.append("spiral scans (rel_spiral_fermat) are not reconstructed live yet")
        return None
    args = plan_args.get("args")
    if isinstance(args, list | tuple) and len(args) >= 8:
        return {
            "kind": "mesh",
            "x_start_um": args[1],
            "x_end_um": args[2],
            "x_num": int(args[3]),
            "y_start_um": args[5],
            "y_end_um": args[6],
            "y_num": int(args[7]),
        }
    missing.append("scan.scan_input (2D_FLY_PANDA) or plan_args (FlyPlan2D / mesh)")
    return None


def _detector_from(start: Mapping[str, Any], descriptors: list[Mapping[str, Any]]) -> str | None:
    for descriptor in descriptors:
        keys = descriptor.get("data_keys", {})
        for key in DETECTOR_KEYS:
            if key in keys:
                return key.removesuffix("_image")
    scan = start.get("scan") or {}
    for name in scan.get("detectors") or start.get("detectors") or []:
        if str(name).startswith(("eiger", "merlin", "maxipix")):
            return str(name)
    return None


def scan_config_from_documents(
    start: Mapping[str, Any],
    *,
    descriptors: list[Mapping[str, Any]] | None = None,
    baseline: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ScanConfig:
    """Build the run's :class:`ScanConfig`; raise :class:`NotPtychographyError` naming gaps.

    ``baseline`` maps baseline data keys to their first reading (``dcm_th``,
    ``zpsth``, ``dsth``, ...). ``overrides`` is merged last and may set any
    field, nested ones as nested mappings (``{"roi": {"size": 256}}``).
    """
    descriptors = descriptors or []
    baseline = baseline or {}
    overrides = dict(overrides or {})
    missing: list[str] = []
    scan = start.get("scan") or {}
    derived: dict[str, Any] = {
        "uid": start.get("uid", ""),
        "scan_id": start.get("scan_id"),
        "plan_name": start.get("plan_name", ""),
        "start_time": start.get("time", 0.0),
        "motors": tuple(start.get("motors") or ()),
    }
    if "grid" not in overrides:
        grid = _grid_from_start(start, missing)
        if grid is not None:
            derived["grid"] = grid

    if "energy_kev" not in overrides:
        if "dcm_th" in baseline:
            derived["energy_kev"] = energy_kev_from_dcm_theta(float(baseline["dcm_th"]))
        elif "energy" in scan:
            derived["energy_kev"] = float(scan["energy"])
        else:
            missing.append("baseline.dcm_th (energy)")

    if "distance_m" not in overrides:
        if scan.get("detector_distance") is not None:
            derived["distance_m"] = float(scan["detector_distance"])
        else:
            missing.append("scan.detector_distance")

    detector = overrides.get("detector") or _detector_from(start, descriptors)
    if detector is None:
        missing.append("a detector (primary key eiger2_image / eiger1_image or scan.detectors)")
    else:
        derived["detector"] = detector
        if detector in DETECTOR_PIXEL_M:
            derived["detector_pixel_m"] = DETECTOR_PIXEL_M[detector]

    if scan.get("dwell") is not None:
        derived["dwell_s"] = float(scan["dwell"])
    elif start.get("exposure_time") is not None:
        derived["dwell_s"] = float(start["exposure_time"])

    motors = derived["motors"]
    if len(motors) > 1 and motors[1] == "zpssy" and "zpsth" in baseline:
        derived["angle_deg"] = float(baseline["zpsth"])
    elif "dsth" in baseline:
        derived["angle_deg"] = float(baseline["dsth"])

    encoder: dict[str, Any] = {}
    for axis, key in (("x", "x_scale_factor"), ("y", "z_scale_factor")):
        scale = start.get(key)
        if scale:
            encoder[f"{axis}_ratio"] = -float(scale) / 10000.0
    if encoder:
        derived["encoder"] = encoder

    if missing:
        raise NotPtychographyError("missing " + "; ".join(missing))
    try:
        return ScanConfig.model_validate(deep_merge(derived, overrides))
    except ValidationError as exc:
        raise ConfigurationError(f"invalid scan configuration: {exc}") from exc
