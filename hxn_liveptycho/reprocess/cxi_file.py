"""A CXI (or NeXus NXcxi_ptycho) ptychography file, read into what a run needs.

Where things are (CXI 1.6; NXcxi_ptycho keeps the same names and adds
``units`` attributes, which are honoured wherever present):

- frames: ``entry_1/data_1/data``, else ``entry_1/instrument_1/detector_1/data``
  (n, rows, columns), or (n_slow, n_fast, rows, columns);
- translations: ``entry_1/data_1/translation``, ``entry_1/sample_1/geometry_1/translation``
  (or ``geometry``), ``entry_1/instrument_1/detector_1/translation``: (n, 3), metres,
  the sample's translation (x, y, z) in the lab frame: z along the beam, y up;
- photon energy ``instrument_1/source_1/energy`` (joules), or its ``wavelength``
  (metres), or NXcxi_ptycho's ``beam_1/incident_beam_energy`` (with units);
- ``detector_1/distance``, ``x_pixel_size``, ``y_pixel_size``, ``basis_vectors``
  (2, 3) or (n, 2, 3): the lab-frame step of one pixel along a frame's rows and
  columns (default ``((0, -y_pixel, 0), (-x_pixel, 0, 0))``), ``corner_position``;
- ``detector_1/mask``: 0 is a good pixel, and so is 0x1000 (CXI's "signal" bit);
  any other bit marks a bad one;
- a probe, when given: ``instrument_1/source_1/illumination`` (where ptychodus
  keeps it) or ``entry_1/probe/data``.

The numbers and the detector's axes are read by
:mod:`~hxn_liveptycho.reprocess.cxi_geometry`; this module reads the frames,
the mask, the probe and the run's identity, and settles the conventions of
:mod:`~hxn_liveptycho.reprocess.conventions`.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hxn_liveptycho.reprocess.conventions import (
    DataKind,
    DcPosition,
    FileConventions,
    FileError,
    detect_data_kind,
    detect_dc,
)
from hxn_liveptycho.reprocess.cxi_geometry import (
    TRANSLATION_PATHS,
    beam_center,
    detector_basis,
    distance_m,
    energy_kev,
    first,
    positions_um,
    text,
    units_of,
)

logger = logging.getLogger(__name__)

__all__ = ["CxiScan", "read_cxi", "stable_uid"]

#: Frames read to decide the data's kind and where its zero frequency is.
DETECT_FRAMES = 64
#: Frames, spread over the scan, that the uid of a file without one is made from.
HASHED_FRAMES = 16

_MASK_SIGNAL = 0x1000


def stable_uid(frames: Any, translations: np.ndarray, entry: str) -> str:
    """A uid that is the same for the same measurement, wherever its file lies.

    A UUID (version 5) of the SHA-256 of what identifies the measurement: the
    entry's name, the frames' shape and type, :data:`HASHED_FRAMES` frames
    spread over the scan, and the translations as stored. Reading them is
    quick whatever the file's size, and a copy of the file (even recompressed
    or rechunked) gives the same uid, so reprocessing one measurement twice
    links both results to one ``raw_uid``.
    """
    digest = hashlib.sha256()
    digest.update(f"{entry}|{tuple(frames.shape)}|{np.dtype(frames.dtype).str}".encode())
    n = int(np.prod(frames.shape[:-2]))
    for k in np.unique(np.linspace(0, n - 1, min(n, HASHED_FRAMES)).astype(int)):
        digest.update(np.ascontiguousarray(_read_rows(frames, int(k), int(k) + 1)).tobytes())
    digest.update(np.ascontiguousarray(translations, dtype=np.float64).tobytes())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cxi:sha256:{digest.hexdigest()}"))


@dataclass
class CxiScan:
    """One entry of a file, with its conventions settled; frames are read in chunks."""

    path: Path
    entry: str
    raw_uid: str
    scan_id: int | None
    frames: Any
    data_kind: DataKind
    dc: DcPosition
    positions_um: np.ndarray
    energy_kev: float
    distance_m: float
    pixel_size_m: float
    mask: np.ndarray | None = None
    probe: np.ndarray | None = None
    #: Where the probe is in the file (its HDF5 path).
    probe_path: str | None = None
    beam_center: tuple[float, float] | None = None
    #: What was read from the file and what was detected, one line each (report, metadata).
    notes: list[str] = field(default_factory=list)
    _file: Any = None

    @property
    def num_frames(self) -> int:
        return int(self.positions_um.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.frames.shape[-2]), int(self.frames.shape[-1]))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start .. stop - 1`` as intensities with the zero frequency at the centre.

        Photon counts stay unsigned integers and their masked pixels take the
        type's largest value (the live path's bad-pixel mark, counted as
        ``masked_pixels``); other frames are float32 with masked pixels at 0.
        """
        return self.prepare(_read_rows(self.frames, start, stop))

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        counts = raw.dtype.kind in "ui" and self.data_kind == "intensity"
        if self.data_kind == "amplitude":
            data = np.square(raw, dtype=np.float32)
        elif counts:
            data = np.clip(raw, 0, None).astype(np.uint32)
        else:
            data = np.asarray(raw, dtype=np.float32)
        if self.dc == "corner":
            data = np.fft.fftshift(data, axes=(-2, -1))
        if self.mask is not None:
            data[..., self.mask] = np.iinfo(np.uint32).max if counts else 0
        return data

    def conventions(self) -> dict[str, Any]:
        """The conventions used, for the report and the processed container."""
        return {
            "file": str(self.path),
            "entry": self.entry,
            "data": self.data_kind,
            "dc": self.dc,
            "frames": self.num_frames,
            "frame_shape": list(self.frame_shape),
            "masked_pixels": 0 if self.mask is None else int(self.mask.sum()),
            "probe_in_file": self.probe is not None,
            "notes": list(self.notes),
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CxiScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_rows(frames: Any, start: int, stop: int) -> np.ndarray:
    if frames.ndim == 3:
        return np.asarray(frames[start:stop])
    fast = frames.shape[1]  # (n_slow, n_fast, rows, columns): row-major order
    return np.stack([np.asarray(frames[k // fast, k % fast]) for k in range(start, stop)])


def read_cxi(
    path: str | Path,
    conventions: FileConventions | None = None,
    *,
    entry: str | None = None,
) -> CxiScan:
    """Open ``path`` and settle every convention; raise one line for what is missing or unclear.

    The file stays open for the frames: close the result (or use it as a
    context manager). Raises :class:`FileNotFoundError` for a missing file,
    :class:`FileError` / :class:`ConventionError` (both ``ConfigurationError``)
    for a file that cannot be reconstructed as it stands.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    conv = conventions or FileConventions()
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise FileError(f"{path} is not an HDF5 file: {' '.join(str(exc).split())}") from None
    try:
        scan = _read(handle, path, conv, entry)
    except BaseException:
        handle.close()
        raise
    scan._file = handle
    return scan


def _pick_entry(handle: Any, entry: str | None) -> str:
    if entry is not None:
        if entry not in handle:
            raise FileError(f"the file has no entry {entry!r} (it has {sorted(handle)})")
        return entry
    entries = sorted(k for k in handle if k.startswith("entry"))
    if not entries:
        raise FileError(f"the file has no entry_1 group (top level: {sorted(handle)})")
    return "entry_1" if "entry_1" in entries else entries[0]


def _read(handle: Any, path: Path, conv: FileConventions, entry_name: str | None) -> CxiScan:
    name = _pick_entry(handle, entry_name)
    entry = handle[name]
    notes: list[str] = []
    frames = first(entry, ("data_1/data", "instrument_1/detector_1/data"))
    if frames is None or frames.ndim not in (3, 4):
        raise FileError(f"{name} has no frames at data_1/data or instrument_1/detector_1/data")
    n = int(np.prod(frames.shape[:-2]))
    if n == 0:
        raise FileError(f"{frames.name} holds no frames")
    detector = entry.get("instrument_1/detector_1")
    first_frames = _read_rows(frames, 0, min(n, DETECT_FRAMES))
    data_kind: DataKind
    if conv.data == "auto":
        data_kind = detect_data_kind(first_frames, units=units_of(frames))
        notes.append(f"data: {data_kind} (detected)")
    else:
        data_kind = conv.data
    mask = _read_mask(detector, (frames.shape[-2], frames.shape[-1]), notes)
    shifted = frames.attrs.get("is_fft_shifted")
    if conv.dc == "auto" and shifted is not None and int(np.asarray(shifted)) in (0, 1):
        dc: DcPosition = "corner" if int(np.asarray(shifted)) else "centre"
        notes.append(f"zero frequency: {dc} (the frames' is_fft_shifted attribute)")
    elif conv.dc == "auto":
        spread = np.linspace(0, n - 1, min(n, DETECT_FRAMES)).astype(int)
        sample = np.stack([_read_rows(frames, int(k), int(k) + 1)[0] for k in spread])
        intensity = np.square(sample, dtype=np.float64) if data_kind == "amplitude" else sample
        mean = np.asarray(np.mean(intensity, axis=0, dtype=np.float64))
        if mask is not None:
            mean[mask] = 0.0
        dc = detect_dc(mean)
        notes.append(f"zero frequency: {'index 0 (FFT order)' if dc == 'corner' else 'centre'}")
    else:
        dc = conv.dc
    if dc == "corner" and mask is not None:
        mask = np.fft.fftshift(mask)
    basis, pixel = detector_basis(detector, conv, notes)
    translation = conv.translation
    if translation == "auto":
        # This project's exports write the beam's position (docs/cxi-export.md); CXI's
        # translation is the sample's.
        translation = "beam" if isinstance(entry.get("liveptycho"), h5py.Group) else "sample"
    positions = positions_um(entry, n, basis, conv.position_units, translation, notes)
    raw_uid, scan_id = _identity(handle, entry, name, frames)
    probe, probe_path = _read_probe(entry)
    return CxiScan(
        path=path,
        entry=name,
        raw_uid=raw_uid,
        scan_id=scan_id,
        frames=frames,
        data_kind=data_kind,
        dc=dc,
        positions_um=positions,
        energy_kev=energy_kev(entry, conv),
        distance_m=distance_m(detector, conv, basis),
        pixel_size_m=pixel,
        mask=mask,
        probe=probe,
        probe_path=probe_path,
        beam_center=None if dc == "corner" else beam_center(detector, basis),
        notes=notes,
    )


def _read_mask(detector: Any, shape: tuple[int, int], notes: list[str]) -> np.ndarray | None:
    node = None if detector is None else detector.get("mask")
    if node is None:
        return None
    mask = np.asarray(node[()])
    if mask.ndim == 3:
        mask = mask[0]
    if mask.shape != shape:
        raise FileError(f"{node.name} is {mask.shape}, the frames are {shape}")
    flags = mask.astype(np.uint64)
    bad = (flags != 0) & (flags != _MASK_SIGNAL)
    notes.append(f"mask: {int(bad.sum())} bad pixels")
    return bad if bad.any() else None


def _read_probe(entry: Any) -> tuple[np.ndarray, str] | tuple[None, None]:
    """The file's probe (its strongest mode) and where it is; (None, None) without one."""
    node = first(entry, ("instrument_1/source_1/illumination", "probe/data"))
    if node is None or node.dtype.kind not in "fc" or node.ndim not in (2, 3):
        return None, None
    probe = np.asarray(node[()], dtype=np.complex64)
    if probe.ndim == 3:  # modes: the strongest one
        probe = probe[int(np.argmax(np.sum(np.abs(probe) ** 2, axis=(1, 2))))]
    return probe, str(node.name)


def _identity(handle: Any, entry: Any, name: str, frames: Any) -> tuple[str, int | None]:
    """The run's raw_uid (the file's own, else a hash of the file) and its scan id (an
    integer, as in a start document; None when the file has none)."""
    raw_uid: str | None = None
    own = entry.get("liveptycho")  # this project's exports keep the run's identity here
    holders = (entry, own, handle) if isinstance(own, h5py.Group) else (entry, handle)
    for holder in holders:
        if "raw_uid" in holder and not isinstance(holder["raw_uid"], h5py.Group):
            raw_uid = text(holder["raw_uid"][()])
            break
        if "raw_uid" in holder.attrs:
            raw_uid = text(holder.attrs["raw_uid"])
            break
    if not raw_uid:
        node = first(entry, TRANSLATION_PATHS)
        raw_uid = stable_uid(frames, np.asarray(node[()]), name)
    scan_id: int | None = None
    for holder in holders:
        if "scan_id" in holder and not isinstance(holder["scan_id"], h5py.Group):
            try:
                scan_id = int(text(np.asarray(holder["scan_id"][()]).ravel()[0]))
            except (TypeError, ValueError, IndexError):
                scan_id = None
            break
    return raw_uid, scan_id
