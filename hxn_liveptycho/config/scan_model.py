"""The models of one run's reconstruction: ScanConfig and the parts it is made of.

Frozen and strict (``extra="forbid"``): a run's configuration is decided once,
from its documents (:func:`~hxn_liveptycho.config.scan.scan_config_from_documents`)
and the user's overrides, and every stage reads the same values. HXN's
conventions that the models themselves carry (the step as range / points, the
stage angle's foreshortening of x) are here; how the documents are read is in
:mod:`~hxn_liveptycho.config.hxn_documents` and
:mod:`~hxn_liveptycho.config.hxn_grid`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from hxn_liveptycho.config.nn_params import NNParams
from hxn_liveptycho.config.scan_paths import density_step
from hxn_liveptycho.recon.iterative import IterativeParams

#: Energies the model accepts (keV); a value outside is a unit or reading mistake.
ENERGY_RANGE_KEV = (0.5, 100.0)
#: Past this stage angle HXN projects x with |sin θ| instead of |cos θ|.
PROJECTION_SWITCH_DEG = 45.0


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


#: Plan families whose points form a raster (``x_num`` x ``y_num``).
RASTER_KINDS = ("fly2d_panda", "flyplan2d", "mesh")


class ScanGrid(_Frozen):
    """Where a scan's points lie, in micrometres, x on the sample: a raster or any path.

    A raster (``fly2d_panda``, ``flyplan2d``, ``mesh``) has its commanded
    extents and ``x_num`` x ``y_num`` points. Any other scan (``fermat``: a
    Fermat spiral, its points worked out from the plan's arguments;
    ``positions``: the positions come only from the encoders) has ``points``
    and the extents its positions span, and no rows or columns: nothing
    downstream assumes a grid (frames pair with positions by frame index, the
    canvas is sized from the extents).

    Once a run is configured the x extents carry :attr:`ScanConfig.x_projection`
    like the positions do, so the canvas sized from them holds the positions
    (HXN foreshortens its x range the same way). A raster's step follows HXN:
    ``|end - start| / num`` (a fly scan's frames each integrate one step of
    motion, so ``num`` steps span the commanded range), not ``/(num - 1)``.
    """

    kind: Literal["fly2d_panda", "flyplan2d", "fermat", "mesh", "positions"] = Field(
        description="Which plan family the geometry was read from: a raster (fly2d_panda, "
        "flyplan2d, mesh), a Fermat spiral (fermat), or positions from the encoders only "
        "(positions)."
    )
    x_start_um: float
    x_end_um: float
    x_num: int | None = Field(
        default=None, ge=1, description="Points along the fast (x) axis of a raster."
    )
    y_start_um: float
    y_end_um: float
    y_num: int | None = Field(
        default=None, ge=1, description="Points along the slow (y) axis of a raster."
    )
    points: int | None = Field(
        default=None,
        ge=1,
        description="Points of a scan that is no raster (a spiral, or positions from the "
        "encoders only); a raster has x_num x y_num.",
    )
    step_um: float | None = Field(
        default=None,
        gt=0.0,
        description="Scan step that sizes the probe footprint; None: a raster's larger "
        "range / points, else the step of a raster as dense (sqrt(extent area / points)).",
    )

    @model_validator(mode="after")
    def _steps_are_physical(self) -> ScanGrid:
        """A non-finite extent, several points on a zero range, or a scan with neither a
        raster's shape nor a point count is refused naming the field: every position would
        coincide, or the point count the run is judged by would be unknown."""
        for axis in ("x", "y"):
            start, end = getattr(self, f"{axis}_start_um"), getattr(self, f"{axis}_end_um")
            num = getattr(self, f"{axis}_num")
            if not (math.isfinite(start) and math.isfinite(end)):
                raise ValueError(f"{axis} range {start} → {end} µm is not finite")
            if num is not None and num > 1 and start == end:
                raise ValueError(
                    f"{axis}: {num} points on a zero range ({start} → {end} µm): zero step"
                )
        if self.points is None and (self.x_num is None or self.y_num is None):
            raise ValueError(
                f"a {self.kind} scan needs x_num and y_num (a raster) or points (any path)"
            )
        if (
            self.points is not None
            and self.points > 1
            and self.x_start_um == self.x_end_um
            and self.y_start_um == self.y_end_um
        ):
            raise ValueError(
                f"{self.points} points in a zero extent (x {self.x_start_um} µm, "
                f"y {self.y_start_um} µm): every position coincides"
            )
        return self

    @property
    def is_raster(self) -> bool:
        """Whether the points form rows and columns (``points`` unset, ``x_num`` x ``y_num``)."""
        return self.points is None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def num_points(self) -> int:
        if self.points is not None:
            return self.points
        assert self.x_num is not None and self.y_num is not None  # the validator's rule
        return self.x_num * self.y_num

    @computed_field  # type: ignore[prop-decorator]
    @property
    def x_step_um(self) -> float:
        """HXN's x step of a raster: range / points (0 for a single column, or no raster)."""
        if self.x_num is None or self.x_num < 2:
            return 0.0
        return abs(self.x_end_um - self.x_start_um) / self.x_num

    @computed_field  # type: ignore[prop-decorator]
    @property
    def y_step_um(self) -> float:
        """HXN's y step of a raster: range / points (0 for a single row, or no raster)."""
        if self.y_num is None or self.y_num < 2:
            return 0.0
        return abs(self.y_end_um - self.y_start_um) / self.y_num

    @property
    def scan_step_um(self) -> float:
        """The step that sizes the probe footprint: ``step_um`` when set, a raster's larger
        axis step, else the step of a raster as dense as the path (x foreshortened like the
        positions, since the extents are)."""
        if self.step_um is not None:
            return self.step_um
        if self.is_raster:
            return max(self.x_step_um, self.y_step_um)
        return density_step(
            self.y_end_um - self.y_start_um, self.x_end_um - self.x_start_um, self.num_points
        )

    def describe(self) -> str:
        """One line for the log: ``14 x 14 raster (fly2d_panda)``, ``197-point fermat scan``."""
        if self.is_raster:
            return f"{self.x_num} x {self.y_num} raster ({self.kind})"
        return f"{self.num_points}-point {self.kind} scan"


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
    """Where the solver's first probe comes from: estimated from the data, guessed from the
    footprint and defocus sign below, or read from a file."""

    initial: Literal["estimate", "guess", "file"] = Field(
        default="estimate",
        description="'estimate': from the data alone, no scan grid needed: the mean "
        "diffraction pattern's bright-field disc gives the probe's modulus, power and "
        "convergence angle, and a short search over defocus size and sign, scored by how "
        "well a few solver passes on the first `estimate_frames` frames predict frames "
        "held out of them, gives its curvature (the run's solver starts once those "
        "frames are in, or the scan pauses). 'guess': the disc with the defocus of "
        "`footprint_um` (or `footprint_steps` scan steps) and `defocus_sign`. 'file': the "
        "probe in `file`.",
    )
    file: str | None = Field(
        default=None,
        description="Probe file for initial 'file': .npy (an (n, n) array, or (k, n, n) "
        "modes), .npz (its 'probe' array, or its only one) or CXI/HDF5 "
        "(/entry_1/instrument_1/source_1/illumination, or /entry_1/probe); in real space "
        "on the reconstruction's pixel, n equal to roi.size.",
    )
    estimate_frames: int = Field(
        default=32,
        ge=4,
        description="Frames the estimate searches on: a live run's first ones (fewer when "
        "the scan has fewer).",
    )
    footprint_um: float | None = Field(
        default=None, gt=0.0, description="Beam footprint on the sample; None: footprint_steps."
    )
    footprint_steps: float = Field(
        default=3.0, gt=0.0, description="Footprint as a multiple of the scan step (if no µm)."
    )
    defocus_sign: Literal[1, -1] = Field(
        default=1, description="+1: sample downstream of the focus; -1: upstream."
    )

    @model_validator(mode="after")
    def _file_with_its_choice(self) -> ProbeGuess:
        """A file is named exactly when it is used: one without the other is a mistake."""
        if self.initial == "file" and not self.file:
            raise ValueError("initial 'file' needs `file`, the path of the probe")
        if self.file and self.initial != "file":
            raise ValueError(f"`file` is given but initial is {self.initial!r}; set initial 'file'")
        return self


class ScanConfig(_Frozen):
    """One run's reconstruction configuration; built by
    :func:`~hxn_liveptycho.config.scan.scan_config_from_documents`."""

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
        """The scan step on the sample (:attr:`ScanGrid.scan_step_um`): a raster's larger
        axis step (HXN's range / points), else the step of a raster as dense as the path;
        x already foreshortened like the positions."""
        return self.grid.scan_step_um

    @property
    def probe_footprint_px(self) -> float:
        dx_um = self.pixel_size_m * 1e6
        footprint_um = self.probe.footprint_um or self.probe.footprint_steps * self.step_um
        return footprint_um / dx_um
