"""A run's measured data in the processed container's ``diffraction/``, appended while it runs.

Three arrays, one row per frame, in the order the frames reached the solver
(**arrival order**, which need not be the scan's order):

``amplitude``   (N, n, n) float16: sqrt(counts) of the ROI crop, exactly what the
                solver was given (masked pixels 0), rounded to half precision.
``indices``     (N,) int64: the scan index of each row (``np.argsort(indices)``
                gives scan order; :func:`read_diffraction` does it for you).
``positions_m`` (N, 2) float64: the measured (y, x) stage position of each row, metres.

Why float16, with no scale: the rows are appended in chunks while the scan
runs, so no scale computed from the whole run's peak can exist when the first
chunk is written, and one fixed for all runs would either clip bright data or
flatten dim data. Half precision keeps 11 significant bits at any brightness:
the rounding error is at most ``a * 2**-11`` for an amplitude ``a``, below the
Poisson noise of sqrt(counts) (about 0.5) up to ``a = 1024``, i.e. a million
counts in a pixel of one frame. Amplitudes above float16's largest finite
value (65504, i.e. ~4.3e9 counts) are clipped to it and counted
(``clipped_pixels`` in the group's metadata). It takes half the bytes of the
float32 the solver uses.

The group's metadata says this (``representation``, ``order``) and, once the
run has ended, how many frames it holds (``frames``, ``complete``).
Containers written before this layout hold ``amplitude`` as uint8 with a
``scale`` in its metadata, sorted by scan index, and no ``indices``;
:func:`read_diffraction` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

DTYPE = np.dtype(np.float16)
#: float16's largest finite value: amplitudes above it are stored as it.
LARGEST = float(np.finfo(np.float16).max)
#: Bytes of float16 rows aimed at per appended chunk: big enough that a run is a few
#: dozen requests, small enough that each is quick and live snapshots interleave.
CHUNK_BYTES = 8 * 1024 * 1024
#: At most this many chunks go in one request when the writer has fallen behind: one, so a
#: live snapshot or the final result waits for at most one chunk's request.
MAX_CHUNKS_PER_REQUEST = 1

REPRESENTATION = (
    "amplitude: float16 sqrt(counts) of the ROI crop as the solver saw it (masked pixels 0), "
    "half-precision rounding, values above 65504 clipped; indices: scan index of each row; "
    "positions_m: measured (y, x) stage position, metres"
)


def group_metadata(chunk_frames: int) -> dict[str, Any]:
    """What the ``diffraction/`` group says about itself when it is created."""
    return {
        "order": "arrival",
        "representation": REPRESENTATION,
        "units": "sqrt(counts)",
        "chunk_frames": chunk_frames,
        "complete": False,
    }


def chunk_frames_for(frame_shape: tuple[int, ...]) -> int:
    """Rows per appended chunk for frames of ``frame_shape``: about :data:`CHUNK_BYTES`."""
    frame_bytes = int(np.prod(frame_shape)) * DTYPE.itemsize
    return max(1, min(1024, CHUNK_BYTES // max(frame_bytes, 1)))


def encode(amplitudes: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """The stored form of ``amplitudes`` (one array, or batches to join) and how many
    of its pixels were clipped; joined and converted in one pass."""
    parts = [amplitudes] if isinstance(amplitudes, np.ndarray) else list(amplitudes)
    with np.errstate(over="ignore"):
        encoded = np.concatenate(parts, dtype=DTYPE, casting="same_kind")
    overflowed = np.isinf(encoded)
    clipped = int(np.count_nonzero(overflowed))
    if clipped:
        encoded[overflowed] = LARGEST
    return encoded, clipped


Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class QueuedRows:
    """The first rows of the queue as views of the batches handed over: taken under the
    caller's lock in no time, joined (copied) outside it."""

    parts: tuple[Batch, ...]

    def __len__(self) -> int:
        return sum(len(indices) for indices, _, _ in self.parts)

    def _from(self, start: int, column: int) -> list[np.ndarray]:
        arrays = []
        for part in self.parts:
            array = part[column]
            if start >= len(array):
                start -= len(array)
                continue
            arrays.append(array[start:])
            start = 0
        return arrays

    def indices(self, start: int = 0) -> np.ndarray:
        return np.concatenate(self._from(start, 0)).astype(np.int64, copy=False)

    def positions(self, start: int = 0) -> np.ndarray:
        return np.concatenate(self._from(start, 2)).astype(np.float64, copy=False)

    def encoded(self, start: int = 0) -> tuple[np.ndarray, int]:
        return encode(self._from(start, 1))


class PendingFrames:
    """Frames received and not yet in Tiled, in arrival order; the caller holds the lock.

    Batches are kept as they were handed over (no copy); :meth:`peek` gives
    views of the first rows for a write and :meth:`drop` forgets them once
    written, so a failed write loses nothing and is tried again with the same rows.
    """

    def __init__(self) -> None:
        self._batches: list[Batch] = []
        self.rows = 0

    @property
    def frame_shape(self) -> tuple[int, ...] | None:
        return tuple(self._batches[0][1].shape[1:]) if self._batches else None

    def append(self, indices: np.ndarray, amplitudes: np.ndarray, positions: np.ndarray) -> None:
        if len(indices) != len(amplitudes) or len(indices) != len(positions):
            raise ValueError(
                f"{len(indices)} indices, {len(amplitudes)} frames and {len(positions)} "
                "positions: one of each per frame"
            )
        if len(indices):
            self._batches.append((indices, amplitudes, positions))
            self.rows += len(indices)

    def peek(self, rows: int) -> QueuedRows:
        """Views of the first ``rows`` rows (fewer if fewer are queued)."""
        parts: list[Batch] = []
        left = rows
        for indices, amplitudes, positions in self._batches:
            if left <= 0:
                break
            take = min(left, len(indices))
            parts.append((indices[:take], amplitudes[:take], positions[:take]))
            left -= take
        return QueuedRows(tuple(parts))

    def drop(self, rows: int) -> None:
        """Forget the first ``rows`` rows (they are safely stored)."""
        self.rows -= rows
        while rows > 0:
            indices, amplitudes, positions = self._batches[0]
            if len(indices) <= rows:
                self._batches.pop(0)
                rows -= len(indices)
            else:
                self._batches[0] = (indices[rows:], amplitudes[rows:], positions[rows:])
                rows = 0


@dataclass(frozen=True)
class Diffraction:
    """A run's measured data read back: one row per frame."""

    indices: np.ndarray
    amplitude: np.ndarray
    positions_m: np.ndarray
    order: str


def read_diffraction(node: Any, *, order: Literal["scan", "stored"] = "scan") -> Diffraction:
    """The ``diffraction/`` of a processed container (or that group itself), as float32.

    ``order="scan"`` sorts the rows by scan index; ``"stored"`` keeps the
    order they were written in (arrival order).
    """
    group = node if "amplitude" in node else node["diffraction"]
    metadata: Mapping[str, Any] = group.metadata
    amplitude_node = group["amplitude"]
    amplitude = amplitude_node.read()
    positions = np.asarray(group["positions_m"].read(), dtype=np.float64)
    if amplitude.dtype == np.uint8:  # the layout before chunked appends: sorted, one scale
        scale = float(amplitude_node.metadata["scale"])
        return Diffraction(
            indices=np.arange(len(amplitude)),
            amplitude=amplitude.astype(np.float32) * np.float32(scale),
            positions_m=positions,
            order="scan",
        )
    indices = np.asarray(group["indices"].read(), dtype=np.int64)
    amplitude = amplitude.astype(np.float32)
    stored = str(metadata.get("order", "arrival"))
    if order == "scan":
        sort = np.argsort(indices, kind="stable")
        return Diffraction(indices[sort], amplitude[sort], positions[sort], "scan")
    return Diffraction(indices, amplitude, positions, stored)
