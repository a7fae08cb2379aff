"""One reconstruction as a CXI 1.6 file that is also NeXus ``NXcxi_ptycho``.

Why apart: :mod:`~hxn_liveptycho.store.cxi_export` gathers a result (from a
processed container in Tiled, or from a run's final state in hand); this writes
it, and is the one place that knows the file's names, units and conventions
(docs/cxi-export.md lists them). Readers it was checked against: ptychodus's
``CXIProductFileIO`` and ``CXIDiffractionFileReader`` (object, probe, positions,
geometry; tested), PtyPy's ``DiamondNexus`` loader (``entry_1/data/{data,x,y}``,
``beam_1/energy``, ``detector_1/{distance,x_pixel_size}``).

Conventions, all SI: lengths in metres, energies in joules. Arrays are ``[y, x]``
(row = y). ``translation`` is the probe's position on the object (ptychodus's
and PtyPy's reading: the probe centre at object pixel
``(t - object_center) / pixel + (N - 1) / 2``), columns ``(x, y, z)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

#: CXI's version field: 1.6 written as 160, as the CXI readers expect.
CXI_VERSION = 160
#: Joules per electronvolt (exact, SI 2019).
ELECTRON_VOLT_J = 1.602176634e-19
#: What writes the file (``process_1/program``, the root's ``creator``).
PROGRAM = "hxn_liveptycho"


@dataclass(frozen=True)
class Frames:
    """The measured frames that pair row by row with a result's positions.

    ``blocks()`` yields ``(first_row, amplitudes)``: sqrt(counts), zero frequency at
    the centre, as the solver fitted them; the file holds the counts. Read in blocks,
    so a long run is never held whole.
    """

    count: int
    shape: tuple[int, int]
    blocks: Callable[[], Iterator[tuple[int, np.ndarray]]]
    #: The measured (y, x) stage position of each row, metres.
    measured_positions_m: np.ndarray | None = None


@dataclass(frozen=True)
class CxiResult:
    """Everything a CXI file of one reconstruction holds."""

    raw_uid: str
    #: (H, W) complex: the object (its first mode when there are several).
    object: np.ndarray
    #: (K, n, n) complex: every probe mode, the dominant first.
    probes: np.ndarray
    #: (N, 2) (y, x), metres: each probe position on the object, in solver row order.
    positions_m: np.ndarray
    energy_kev: float
    wavelength_m: float
    distance_m: float
    detector_pixel_m: float
    #: Object (and probe) pixel size: λ z / (n p).
    object_pixel_m: float
    #: (y, x), metres: where object pixel (0, 0) has its probe window's top-left corner.
    canvas_origin_m: tuple[float, float]
    scan_id: Any = None
    status: str | None = None
    #: Scan index of each position row, when known (else rows are in arrival order).
    indices: np.ndarray | None = None
    object_modes: np.ndarray | None = None
    error_history: np.ndarray | None = None
    angle_deg: float | None = None
    dwell_s: float | None = None
    start_time: float | None = None
    finished: str | None = None
    container_path: str | None = None
    #: The processed container's metadata (written as JSON).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Other final arrays kept under ``entry_1/liveptycho/`` (OPR weights and probes, ...).
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    frames: Frames | None = None

    @property
    def object_center_m(self) -> tuple[float, float]:
        """(y, x) of the object array's centre pixel ``(N - 1) / 2`` in the positions'
        frame: with it, a position maps to its probe window exactly as the solver placed
        it (top-left corner at ``(p - origin) / pixel``)."""
        window = self.probes.shape[-1]
        height, width = self.object.shape[-2:]
        oy, ox = self.canvas_origin_m
        dx = self.object_pixel_m
        return (oy + (height - window) / 2 * dx, ox + (width - window) / 2 * dx)


def write_cxi(result: CxiResult, path: str | Path) -> Path:
    """Write ``result`` to ``path`` whole or not at all (through a ``.partial`` file that
    replaces ``path`` once complete)."""
    import h5py

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            _write(f, result)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _group(parent: Any, name: str, nx_class: str) -> Any:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _value(parent: Any, name: str, value: Any, units: str | None = None) -> Any:
    dataset = parent.create_dataset(name, data=value)
    if units is not None:
        dataset.attrs["units"] = units
    return dataset


def _strings(*values: str) -> np.ndarray:
    """An HDF5 array of strings (NeXus's ``axes``): NumPy's own text arrays don't convert."""
    import h5py

    return np.array(values, dtype=h5py.string_dtype())


def _iso(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, UTC).isoformat()


def _write(f: Any, r: CxiResult) -> None:
    import h5py

    from hxn_liveptycho import __version__

    now = datetime.now(UTC).isoformat()
    f.attrs.update(NX_class="NXroot", creator=f"{PROGRAM} {__version__}", file_time=now)
    f.attrs["default"] = "entry_1"
    f.create_dataset("cxi_version", data=CXI_VERSION)
    entry = _group(f, "entry_1", "NXentry")
    _value(entry, "definition", "NXcxi_ptycho")
    _value(entry, "entry_identifier", r.raw_uid)  # the raw run this result is of
    _value(entry, "title", f"scan {r.scan_id}: live reconstruction of run {r.raw_uid}")
    start = _iso(r.start_time)
    if start:
        _value(entry, "start_time", start)
    if r.finished:
        _value(entry, "end_time", r.finished)

    energy_j = r.energy_kev * 1e3 * ELECTRON_VOLT_J
    n = r.probes.shape[-1]
    instrument = _group(entry, "instrument_1", "NXinstrument")
    _value(instrument, "name", "HXN (NSLS-II 3-ID)")
    source = _group(instrument, "source_1", "NXsource")
    _value(source, "name", "NSLS-II")
    _value(source, "type", "Synchrotron X-ray Source")
    _value(source, "probe", "x-ray")
    _value(source, "energy", energy_j, "J")  # CXI: the photon energy (NXcxi_ptycho: see docs)
    beam = _group(instrument, "beam_1", "NXbeam")
    _value(beam, "energy", energy_j, "J")
    _value(beam, "incident_beam_energy", energy_j, "J")
    _value(beam, "incident_wavelength", r.wavelength_m, "m")
    detector = _group(instrument, "detector_1", "NXdetector")
    _value(detector, "distance", r.distance_m, "m")
    _value(detector, "x_pixel_size", r.detector_pixel_m, "m")
    _value(detector, "y_pixel_size", r.detector_pixel_m, "m")
    # A frame's row step runs along +y of the translations, its column step along +x: a
    # reader that projects positions on the detector's axes (CXI's basis_vectors) then
    # places them as the solver did. (CXI's default, for unknown detectors, is -y, -x.)
    p = r.detector_pixel_m
    _value(detector, "basis_vectors", np.array([[0.0, p, 0.0], [p, 0.0, 0.0]]), "m")
    y, x = r.positions_m[:, 0], r.positions_m[:, 1]
    translation = np.stack([x, y, np.zeros_like(x)], axis=1)
    t = _value(detector, "translation", translation, "m")
    t.attrs.update(axes="translation", interpretation="image")
    if r.frames is not None:
        _write_frames(detector, r.frames)

    sample = _group(entry, "sample_1", "NXsample")
    _value(sample, "name", f"scan {r.scan_id}")
    geometry = _group(sample, "geometry_1", "NXcollection")
    geometry["translation"] = t  # a hard link: one dataset, the paths CXI readers look in
    motions = _group(sample, "transformations", "NXtransformations")
    for name, values, vector in (("x", x, (1.0, 0.0, 0.0)), ("y", y, (0.0, 1.0, 0.0))):
        axis = _value(motions, name, values, "m")
        axis.attrs.update(transformation_type="translation", vector=vector, depends_on=".")
    data_1 = _group(entry, "data_1", "NXcollection")
    data_1["translation"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/translation")
    if r.frames is not None:
        data_1["data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        data = _group(entry, "data", "NXdata")
        data.attrs.update(signal="data", axes=_strings("x", ".", "."), x_indices=0, y_indices=0)
        data["data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        data["x"] = h5py.SoftLink("/entry_1/sample_1/transformations/x")
        data["y"] = h5py.SoftLink("/entry_1/sample_1/transformations/y")
        entry.attrs["default"] = "data"

    dx = r.object_pixel_m
    _write_image(entry, "image_1", r.probes, "mode:y:x", "probe", (n * dx, n * dx))
    height, width = r.object.shape[-2:]
    _write_image(entry, "image_2", r.object, "y:x", "transmission", (width * dx, height * dx))
    source["illumination"] = h5py.SoftLink("/entry_1/image_1/data")

    process = _group(entry, "process_1", "NXprocess")
    _value(process, "program", PROGRAM)
    _value(process, "version", __version__)
    _value(process, "date", now)
    config = r.metadata.get("config")
    if config is not None:
        _value(process, "configuration", json.dumps(config, default=str))
    _write_ptychodus(entry, r)
    _write_own(entry, r)


def _write_frames(detector: Any, frames: Frames) -> None:
    """The frames as photon counts, ``rint(a²)`` of the stored amplitudes ``a`` (float16
    sqrt(counts): exact up to 512 counts a pixel, within ``a² / 1024`` above), one chunk a
    frame."""
    rows, (h, w) = frames.count, frames.shape
    data = detector.create_dataset(
        "data",
        shape=(rows, h, w),
        dtype=np.uint32,
        chunks=(1, h, w),
        compression="gzip",
        compression_opts=4,
        shuffle=True,
    )
    data.attrs.update(units="counts", axes="translation:y:x", is_fft_shifted=0)
    for first, amplitudes in frames.blocks():
        block = np.asarray(amplitudes, dtype=np.float64)
        counts = np.rint(block * block)
        data[first : first + len(block)] = np.clip(counts, 0, np.iinfo(np.uint32).max)
    detector.attrs.update(signal="data", axes=_strings("translation", ".", "."))


def _write_image(
    entry: Any, name: str, array: np.ndarray, axes: str, kind: str, size_m: tuple[float, float]
) -> None:
    import h5py

    image = _group(entry, name, "NXcollection")
    data = image.create_dataset("data", data=np.asarray(array, dtype=np.complex64))
    data.attrs["axes"] = axes
    _value(image, "data_type", kind)
    _value(image, "data_space", "real")
    _value(image, "image_size", np.array([size_m[0], size_m[1], 0.0]), "m")  # (x, y, z)
    image["source_1"] = h5py.SoftLink("/entry_1/instrument_1/source_1")
    image["detector_1"] = h5py.SoftLink("/entry_1/instrument_1/detector_1")


def _write_ptychodus(entry: Any, r: CxiResult) -> None:
    """The fields ptychodus reads beside CXI's own (its ``/entry_1/ptychodus`` group): exact
    pixel sizes, the object's centre, position indexes, angle, exposure and the error curve."""
    ext = _group(entry, "ptychodus", "NXcollection")
    dx = r.object_pixel_m
    cy, cx = r.object_center_m
    for name, value in (
        ("probe_pixel_width_m", dx),
        ("probe_pixel_height_m", dx),
        ("object_pixel_width_m", dx),
        ("object_pixel_height_m", dx),
        ("object_center_x_m", cx),
        ("object_center_y_m", cy),
    ):
        _value(ext, name, value, "m")
    # ptychodus pairs a position with the frame of the same index, and its CXI reader numbers
    # the frames by row: the row number (scan indices are in entry_1/liveptycho).
    _value(ext, "probe_position_indexes", np.arange(len(r.positions_m), dtype=np.int64))
    if r.angle_deg is not None:
        _value(ext, "tomography_angle_deg", float(r.angle_deg), "deg")
    if r.dwell_s is not None:
        _value(ext, "exposure_time_s", float(r.dwell_s), "s")
    if r.error_history is not None and len(r.error_history):
        history = np.asarray(r.error_history, dtype=np.float64)
        _value(ext, "loss_epochs", np.arange(1, len(history) + 1, dtype=np.int64))
        _value(ext, "loss_values", history)


def _write_own(entry: Any, r: CxiResult) -> None:
    """What no standard field holds: the run's identity and metadata, and the arrays CXI has
    no place for (object modes, OPR, measured positions)."""
    own = _group(entry, "liveptycho", "NXcollection")
    _value(own, "raw_uid", r.raw_uid)
    _value(own, "scan_id", str(r.scan_id))
    if r.status is not None:
        _value(own, "status", r.status)
    if r.container_path is not None:
        _value(own, "container_path", r.container_path)
    _value(own, "energy_kev", r.energy_kev, "keV")
    _value(own, "wavelength_m", r.wavelength_m, "m")
    _value(own, "canvas_origin_m", np.asarray(r.canvas_origin_m), "m")
    _value(own, "positions_m", np.asarray(r.positions_m, dtype=np.float64), "m")
    if r.indices is not None:
        _value(own, "scan_indices", np.asarray(r.indices, dtype=np.int64))
    _value(own, "metadata", json.dumps(r.metadata, default=str))
    if r.object_modes is not None:
        own.create_dataset("object_modes", data=np.asarray(r.object_modes, dtype=np.complex64))
    if r.error_history is not None:
        own.create_dataset("error_history", data=np.asarray(r.error_history))
    if r.frames is not None and r.frames.measured_positions_m is not None:
        _value(own, "measured_positions_m", r.frames.measured_positions_m, "m")
    for name, value in r.extras.items():
        own.create_dataset(name, data=np.asarray(value))
