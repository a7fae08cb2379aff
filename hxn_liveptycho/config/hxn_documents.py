"""HXN's documents read field by field: detector, energy, distance, dwell, stage angle.

Each reader takes the start document, the descriptors or the baseline as HXN's
acquisition writes them, and either returns the value or records in a
:class:`Problems` why it cannot: a missing key (the run is not ptychography)
or an unphysical value (it is, but the value is wrong), named by its document
field so one line tells the operator what to fix or override. The scan's grid
is read in :mod:`~hxn_liveptycho.config.hxn_grid`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from hxn_liveptycho.config.scan_model import ENERGY_RANGE_KEV
from hxn_liveptycho.errors import ConfigurationError, NotPtychographyError

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
#: Sample-detector distances accepted from a start document (m); beyond is a unit mistake.
MAX_DISTANCE_M = 100.0


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


class Problems:
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


def read_number(value: Any, where: str, problems: Problems) -> float | None:
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


def read_dwell(
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


def read_energy(
    scan: Mapping[str, Any], baseline: Mapping[str, Any], problems: Problems
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
    refused = Problems()
    for value, where in present:
        number = read_number(value, where, refused)
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


def read_distance(scan: Mapping[str, Any], plan_name: str, problems: Problems) -> float | None:
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
    distance = read_number(value, "scan.detector_distance", problems)
    if distance is None:
        return None
    if not 0.0 < distance <= MAX_DISTANCE_M:
        problems.invalid.append(
            f"scan.detector_distance = {value!r} m is not a sample-detector distance "
            f"(0 < z ≤ {MAX_DISTANCE_M:g} m)"
        )
        return None
    return distance


def read_detector(start: Mapping[str, Any], descriptors: list[Mapping[str, Any]]) -> str | None:
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


def no_detector_reason(start: Mapping[str, Any]) -> str:
    """Why a run has no diffraction detector, naming what it did record (an XRF-only
    fly2dpd lists only fluorescence detectors)."""
    scan = start.get("scan") or {}
    named = list(scan.get("detectors") or start.get("detectors") or [])
    recorded = f"detectors {named}" if named else "no detectors listed"
    return (
        "no diffraction detector (an Eiger, Merlin or Maxipix): "
        f"{recorded}, and no {' / '.join(DETECTOR_KEYS[:2])} in primary"
    )


def read_stage_angle(
    motors: Sequence[str], baseline: Mapping[str, Any], problems: Problems
) -> float:
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
    angle = read_number(value, f"baseline.{key}", problems)
    return 0.0 if angle is None else angle


def read_scan_id(value: Any) -> int | str | None:
    """HXN's scan_id as an int when it is one (``"404611"``, ``404611.0``), else its text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():
        return int(float(value))
    text = str(value).strip()
    return int(text) if text.isdigit() else text or None
