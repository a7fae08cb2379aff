"""The experiment's numbers in a CXI file, in SI units, and the detector's axes.

Why apart: every length and energy may carry a ``units`` attribute (NXcxi_ptycho)
or none (CXI: metres and joules), and the detector may be mounted any way
round. This module turns each into SI or refuses it naming the option to pass;
:mod:`~hxn_liveptycho.reprocess.cxi_file` puts them together.

Detector orientation is handled by the positions, not the frames: each beam
position is projected on the detector's row and column directions
(``basis_vectors``: the lab-frame step of one pixel along a frame's rows and
along its columns; z along the beam, y up), so the object is reconstructed in
the frames' own axes however the detector was mounted, and frames are never
flipped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hxn_liveptycho.reprocess.conventions import ConventionError, FileConventions, FileError

__all__ = [
    "TRANSLATION_PATHS",
    "beam_center",
    "detector_basis",
    "distance_m",
    "energy_kev",
    "first",
    "positions_um",
    "text",
    "units_of",
]

#: Joules per electronvolt; h c in J m (wavelength ↔ energy).
EV_J = 1.602176634e-19
HC_J_M = 1.98644586e-25
#: Translations spanning more than this (metres) are not metres: a unit was left out.
MAX_SPAN_M = 0.01

#: Where the translations are looked for, in order.
TRANSLATION_PATHS = (
    "data_1/translation",
    "sample_1/geometry_1/translation",
    "sample_1/geometry/translation",
    "instrument_1/detector_1/translation",
)

_LENGTH = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9}
_LENGTH.update({"angstrom": 1e-10, "å": 1e-10, "a": 1e-10, "metre": 1.0, "meter": 1.0})
_ENERGY_J = {"j": 1.0, "ev": EV_J, "kev": 1e3 * EV_J}


def text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return text(value[()])
    return str(value)


def units_of(node: Any) -> str | None:
    raw = node.attrs.get("units") if hasattr(node, "attrs") else None
    return None if raw is None else text(raw).strip()


def _scale(units: str | None, table: dict[str, float], what: str, option: str) -> float | None:
    if units is None:
        return None
    key = units.lower().replace("micrometre", "um").replace("micrometer", "um")
    if key not in table:
        raise ConventionError(f"{what} has units {units!r}, which are not understood: {option}")
    return table[key]


def _scalar(node: Any) -> float:
    value = np.asarray(node[()], dtype=np.float64).ravel()
    if value.size == 0 or not np.isfinite(value[0]):
        raise FileError(f"{node.name} holds no finite number")
    return float(value[0])


def first(group: Any, paths: tuple[str, ...]) -> Any:
    for path in paths:
        if path in group:
            return group[path]
    return None


def detector_basis(
    detector: Any, conv: FileConventions, notes: list[str]
) -> tuple[np.ndarray, float]:
    """The (2, 3) pixel steps along rows and columns, and the pixel size they give."""
    if conv.basis_vectors is not None:
        basis = np.asarray(conv.basis_vectors, dtype=np.float64)
    elif detector is not None and "basis_vectors" in detector:
        node = detector["basis_vectors"]
        basis = np.asarray(node[()], dtype=np.float64)
        if basis.ndim == 3:
            if not np.allclose(basis, basis[:1]):
                raise ConventionError(
                    f"{node.name} changes from frame to frame; a moving detector is not "
                    "reconstructed: pass --basis-vectors"
                )
            basis = basis[0]
        if basis.shape == (3, 2):
            basis = basis.T
        basis = basis * (_scale(units_of(node), _LENGTH, node.name, "pass --basis-vectors") or 1.0)
        notes.append("detector axes: from basis_vectors")
    else:
        x_pixel = _pixel(detector, "x_pixel_size", conv) or _pixel(detector, "y_pixel_size", conv)
        y_pixel = _pixel(detector, "y_pixel_size", conv) or x_pixel
        if x_pixel is None or y_pixel is None:
            if conv.pixel_size_m is None:
                raise FileError(
                    "the file gives no detector pixel size (detector_1/x_pixel_size or "
                    "basis_vectors): pass --pixel-size"
                )
            x_pixel = y_pixel = conv.pixel_size_m
        basis = np.array([[0.0, -y_pixel, 0.0], [-x_pixel, 0.0, 0.0]])
        notes.append("detector axes: CXI's default (no basis_vectors)")
    if basis.shape != (2, 3) or not np.all(np.isfinite(basis)):
        raise ConventionError(f"basis vectors of shape {basis.shape}: pass --basis-vectors")
    steps = np.linalg.norm(basis, axis=1)
    if conv.pixel_size_m is not None:
        return basis, conv.pixel_size_m
    if steps.min() <= 0 or abs(steps[0] - steps[1]) > 0.01 * steps.max():
        raise ConventionError(
            f"detector pixels of {steps[0]:.3g} x {steps[1]:.3g} m are not square: pass "
            "--pixel-size"
        )
    return basis, float(steps.mean())


def _pixel(detector: Any, key: str, conv: FileConventions) -> float | None:
    if conv.pixel_size_m is not None:
        return conv.pixel_size_m
    if detector is None or key not in detector:
        return None
    node = detector[key]
    return _scalar(node) * (_scale(units_of(node), _LENGTH, node.name, "pass --pixel-size") or 1.0)


def positions_um(
    entry: Any,
    n: int,
    basis: np.ndarray,
    units: str,
    translation: str,
    notes: list[str],
) -> np.ndarray:
    """Beam positions on the sample (µm) along the frames' rows and columns, (n, 2)."""
    node = first(entry, TRANSLATION_PATHS)
    if node is None:
        raise FileError(
            "the file has no translations (data_1/translation or sample_1/geometry_1/translation)"
        )
    values = np.asarray(node[()], dtype=np.float64)
    if values.ndim == 3:
        values = values.reshape(-1, values.shape[-1])
    if values.ndim == 2 and values.shape[0] in (2, 3) and values.shape[1] not in (2, 3):
        values = values.T
    if values.ndim != 2 or values.shape[1] not in (2, 3):
        raise FileError(f"{node.name} has shape {values.shape}, not (n, 3)")
    if values.shape[0] != n:
        raise FileError(f"{node.name} has {values.shape[0]} translations for {n} frames")
    if not np.all(np.isfinite(values)):
        raise FileError(f"{node.name} holds translations that are not finite numbers")
    xy = values[:, :2]
    if units != "auto":
        scale = _LENGTH[units]
    else:
        scale = _scale(units_of(node), _LENGTH, node.name, "pass --position-units") or 1.0
    xy = xy * scale
    span = float(np.max(np.ptp(xy, axis=0)))
    if span > MAX_SPAN_M:
        raise ConventionError(
            f"the translations span {span:.3g} m, too far for a ptychography scan: they are "
            "not in metres (CXI's unit) and say no other: pass --position-units um (or nm, mm)"
        )
    if span == 0.0:
        raise FileError(f"all {n} translations in {node.name} are the same point")
    beam = -xy if translation == "sample" else xy
    transverse = basis[:, :2]
    lengths = np.linalg.norm(transverse, axis=1)
    if np.any(lengths < 0.5 * np.linalg.norm(basis, axis=1)):
        raise ConventionError(
            "the detector's axes lie along the beam, not across it: pass --basis-vectors"
        )
    unit = transverse / lengths[:, None]
    if abs(float(unit[0] @ unit[1])) > 0.1:
        raise ConventionError(
            "the detector's row and column axes are not perpendicular across the beam: pass "
            "--basis-vectors"
        )
    notes.append(f"translations: the {translation}'s, {scale:g} m per unit")
    return np.stack([beam @ unit[0], beam @ unit[1]], axis=1) * 1e6


def energy_kev(entry: Any, conv: FileConventions) -> float:
    if conv.energy_kev is not None:
        return conv.energy_kev
    source = entry.get("instrument_1/source_1")
    beam = entry.get("instrument_1/beam_1")
    if source is not None and "wavelength" in source:
        node = source["wavelength"]
        metres = _scalar(node) * (
            _scale(units_of(node), _LENGTH, node.name, "pass --energy-kev") or 1.0
        )
        if metres <= 0:
            raise ConventionError(
                f"{node.name} gives a wavelength of {metres:.4g} m: pass --energy-kev"
            )
        kev = HC_J_M / metres / EV_J / 1e3
        where = node.name
    else:
        node = None
        for group, key in ((source, "energy"), (beam, "incident_beam_energy")):
            if group is not None and key in group:
                node = group[key]
                break
        if node is None:
            raise FileError(
                "the file gives no wavelength or photon energy (instrument_1/source_1/"
                "wavelength or energy): pass --energy-kev"
            )
        joules = _scalar(node) * (
            _scale(units_of(node), _ENERGY_J, node.name, "pass --energy-kev") or 1.0
        )
        kev = joules / EV_J / 1e3
        where = node.name
    if not 0.5 < kev < 100.0:
        raise ConventionError(
            f"{where} gives {kev:.4g} keV, outside 0.5..100 keV (CXI stores joules and metres; "
            "a units attribute says otherwise): pass --energy-kev"
        )
    return kev


def distance_m(detector: Any, conv: FileConventions, basis: np.ndarray) -> float:
    if conv.distance_m is not None:
        return conv.distance_m
    if detector is not None and "distance" in detector:
        node = detector["distance"]
        value = _scalar(node) * (
            _scale(units_of(node), _LENGTH, node.name, "pass --distance") or 1.0
        )
    elif detector is not None and "corner_position" in detector:
        corner = np.asarray(detector["corner_position"][()], dtype=np.float64).reshape(-1, 3)[0]
        normal = np.cross(basis[0], basis[1])
        value = abs(float(corner @ normal / np.linalg.norm(normal)))
    else:
        raise FileError(
            "the file gives no detector distance (instrument_1/detector_1/distance): pass "
            "--distance"
        )
    if not 0.0 < value < 1000.0 or not math.isfinite(value):
        raise ConventionError(f"a detector distance of {value:.4g} m: pass --distance")
    return value


def beam_center(detector: Any, basis: np.ndarray) -> tuple[float, float] | None:
    """The pixel the undiffracted beam hits, from ``corner_position`` (None without it)."""
    if detector is None or "corner_position" not in detector:
        return None
    corner = np.asarray(detector["corner_position"][()], dtype=np.float64).reshape(-1, 3)[0]
    (row, col), *_ = np.linalg.lstsq(basis[:, :2].T, -corner[:2], rcond=None)
    return float(row), float(col)
