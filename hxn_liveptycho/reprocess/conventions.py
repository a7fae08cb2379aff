"""The conventions a ptychography file may store its data in, and what can be told from the data.

Why apart: CXI files from different programs agree on where things are
(``entry_1/data_1/data``, ``sample_1/geometry_1/translation``) but not on
what the numbers mean: intensities or amplitudes, the zero frequency at the
frame's centre or at index 0 (FFT order), positions in metres or micrometres,
the sample's translation or the beam's position on it. A wrong guess is not an
error anyone sees: the fit merely stalls. So each convention is either read
from the file (a ``units`` attribute), told from the data (the bright zero
order of the mean pattern, whole photon counts), or set by the user in
:class:`FileConventions`; what cannot be told is refused with one line that
names the setting to pass.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hxn_liveptycho.errors import ConfigurationError

__all__ = [
    "CENTRE_RADIUS",
    "CORNER_RADIUS",
    "ConventionError",
    "FileConventions",
    "FileError",
    "detect_data_kind",
    "detect_dc",
]

DataKind = Literal["intensity", "amplitude"]
DcPosition = Literal["centre", "corner"]

#: The bright zero order counts as "at index 0" within this fraction of the frame's edge
#: of a corner (distances wrap round, as FFT order does).
CORNER_RADIUS = 0.15
#: ... and as "at the centre" within this fraction of the frame's edge of its centre (raw
#: detector frames have the beam a little off their centre).
CENTRE_RADIUS = 0.35
#: The mean pattern's brightest pixel must stand this far above its median to be a zero order.
MIN_CONTRAST = 5.0
#: A float value within this of a whole number counts as a photon count.
WHOLE_TOLERANCE = 1e-3


class ConventionError(ConfigurationError):
    """A file's conventions cannot be determined; the message names the setting to pass."""


class FileError(ConventionError):
    """A file lacks what a reconstruction needs (no frames, no energy, counts that differ)."""


class FileConventions(BaseModel):
    """How to read a ptychography file's numbers; ``auto`` reads or detects each one.

    The command line's options of the same names set these
    (``liveptycho reconstruct scan.cxi --dc corner --data amplitude``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Literal["auto", "intensity", "amplitude"] = Field(
        default="auto",
        description="What the frames hold. auto: intensities when they are whole photon "
        "counts (an integer type, or floats that are whole numbers); other floats are "
        "refused, since their kind cannot be told.",
    )
    dc: Literal["auto", "centre", "corner"] = Field(
        default="auto",
        description="Where the zero frequency (the bright undiffracted beam) sits: near the "
        "frame's centre, as a detector records it, or at index 0 (FFT order). auto: the "
        "frames' is_fft_shifted attribute when they have one, else where the mean pattern's "
        "brightest spot is.",
    )
    position_units: Literal["auto", "m", "mm", "um", "nm"] = Field(
        default="auto",
        description="Units of the translations. auto: the dataset's 'units' attribute, else "
        "metres (what CXI stores).",
    )
    translation: Literal["auto", "sample", "beam"] = Field(
        default="auto",
        description="What the translations are: the sample's translation (CXI's definition; "
        "the beam's position on the sample is its negative), or the beam's position on the "
        "sample (what some programs write). auto: the beam's in this project's own exports "
        "(they carry a 'liveptycho' group and say so), else the sample's. Either way the file "
        "reconstructs; the wrong one turns the image by 180° and negates its phase.",
    )
    basis_vectors: tuple[tuple[float, float, float], tuple[float, float, float]] | None = Field(
        default=None,
        description="The detector's pixel steps in the lab frame (metres): the step along a "
        "frame's rows (its slow axis) and along its columns, (x, y, z) each, with z along "
        "the beam and y up. None: the file's detector_1/basis_vectors, else CXI's default "
        "((0, -y_pixel, 0), (-x_pixel, 0, 0)).",
    )
    energy_kev: float | None = Field(
        default=None, gt=0.0, description="Photon energy; None: from the file."
    )
    distance_m: float | None = Field(
        default=None, gt=0.0, description="Sample to detector distance; None: from the file."
    )
    pixel_size_m: float | None = Field(
        default=None, gt=0.0, description="Detector pixel size; None: from the file."
    )


def detect_data_kind(sample: np.ndarray, *, units: str | None = None) -> DataKind:
    """``intensity`` when the frames are photon counts; refuse what cannot be told.

    ``units`` is the data set's ``units`` attribute ("counts", "photons" say
    intensity). Integer frames are counts; float frames are counts when every
    value is a whole number; other floats could be either.
    """
    if units is not None and units.strip().lower() in ("counts", "photons", "count", "photon"):
        return "intensity"
    if sample.dtype.kind in "ui":
        return "intensity"
    finite = sample[np.isfinite(sample)]
    if finite.size and np.all(np.abs(finite - np.rint(finite)) <= WHOLE_TOLERANCE):
        return "intensity"
    raise ConventionError(
        "the frames are floating point and not whole photon counts, so intensity and "
        "amplitude cannot be told apart: pass --data intensity or --data amplitude"
    )


def detect_dc(mean_pattern: np.ndarray) -> DcPosition:
    """Where the zero frequency sits, from the mean diffraction pattern's brightest spot.

    The undiffracted beam is by far the brightest part of a ptychography
    pattern: stored as a detector records it, it is near the frame's centre;
    stored in FFT order, it is at index 0 and its disc wraps round the four
    corners. Anything else (a flat pattern, the spot at an edge's middle, as
    when only one axis was shifted) is refused naming ``--dc``.
    """
    pattern = np.nan_to_num(np.asarray(mean_pattern, dtype=np.float64))
    height, width = pattern.shape
    # A 3 x 3 box (wrapping, like FFT order) so that one hot pixel is no zero order.
    smooth = np.zeros_like(pattern)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            smooth += np.roll(pattern, (dy, dx), axis=(0, 1))
    row, col = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    median = float(np.median(smooth))
    peak = float(smooth[row, col])
    edge = min(height, width)
    if peak <= 0 or peak < MIN_CONTRAST * max(median, 1e-30):
        raise ConventionError(
            f"the mean diffraction pattern has no bright zero order (peak {peak:.3g}, "
            f"median {median:.3g}), so its position cannot be told: pass --dc centre or "
            "--dc corner"
        )
    to_corner = float(np.hypot(min(row, height - row), min(col, width - col)))
    to_centre = float(np.hypot(row - height / 2, col - width / 2))
    if to_corner <= CORNER_RADIUS * edge:
        return "corner"
    if to_centre <= CENTRE_RADIUS * edge:
        return "centre"
    raise ConventionError(
        f"the mean diffraction pattern is brightest at pixel ({row}, {col}) of "
        f"{height}x{width}, neither near the centre nor at index 0: pass --dc centre or "
        "--dc corner"
    )
