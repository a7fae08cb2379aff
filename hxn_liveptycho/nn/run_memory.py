"""One NN run's shared-memory segment: the frame ring the parent fills and the worker
drains, and the one-slot mailbox the worker's mosaic comes back through.

Why a module of its own: both ends map the same layout, the parent's branch
(:mod:`~hxn_liveptycho.nn.process`) and the worker's body
(:mod:`~hxn_liveptycho.nn.worker_child`); with it here the imports point one way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from enum import IntEnum
from multiprocessing import shared_memory

import numpy as np

__all__ = ["RING_BYTES", "Header", "RunMemory", "ring_slots"]

#: Most shared memory one run's frame ring takes; a longer queue is cut to fit.
RING_BYTES = 512 * 2**20
_HEADER_BYTES = 64


class Header(IntEnum):
    """The int64 counters at the segment's start, by index."""

    WRITTEN = 0  # frames the parent has copied in
    CONSUMED = 1  # frames the worker has taken (inferred or discarded)
    MAILBOX_SEQ = 2  # mosaics posted to the mailbox
    MAILBOX_FRAMES = 3  # frames placed in the posted mosaic
    PATTERN_SET = 4  # the mean pattern is in place
    RULE_BIN = 5  # the input rule's binning, settled on the first frames
    PROBE_SEQ = 6  # run probes written to the probe slot (0: none yet, the worker guesses)


class RunMemory:
    """One run's segment: header, frame ring (slots, m, m) float32, positions (slots, 2),
    hand-over times (slots,), the mailbox (object complex64 and coverage float32), and the
    first frames' mean pattern at the run's crop (window, window) float32, from which the
    worker guesses the probe (too large for a pipe that must not block, and only the
    parent sees the frames before they are cut to the model's input), and the run's
    probe's modulus (window, window) float32 once the parent knows it (the same size)."""

    def __init__(
        self,
        slots: int,
        m: int,
        canvas_shape: tuple[int, int],
        window: int,
        *,
        name: str | None = None,
    ) -> None:
        self.slots, self.m, self.window = slots, m, window
        self.canvas_shape = (int(canvas_shape[0]), int(canvas_shape[1]))
        h, w = self.canvas_shape
        sizes = [
            _HEADER_BYTES,
            slots * m * m * 4,
            slots * 16,
            slots * 8,
            h * w * 8,
            h * w * 4,
            window * window * 4,
            window * window * 4,
        ]
        offsets = list(itertools.accumulate([0, *sizes]))
        self.owner = name is None
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=offsets[-1])
        else:
            # A spawned child shares its parent's resource tracker, so attaching registers
            # the name a second time in the same set; the parent's unlink removes it once.
            self.shm = shared_memory.SharedMemory(name=name)
        _populate(self.shm, allocate=self.owner)
        buf = self.shm.buf
        self.header = np.ndarray((8,), np.int64, buf, offsets[0])
        self.frames = np.ndarray((slots, m, m), np.float32, buf, offsets[1])
        self.positions = np.ndarray((slots, 2), np.float64, buf, offsets[2])
        self.stamps = np.ndarray((slots,), np.float64, buf, offsets[3])
        self.object = np.ndarray((h, w), np.complex64, buf, offsets[4])
        self.coverage = np.ndarray((h, w), np.float32, buf, offsets[5])
        self.pattern = np.ndarray((window, window), np.float32, buf, offsets[6])
        self.probe = np.ndarray((window, window), np.float32, buf, offsets[7])
        if self.owner:
            self.header[:] = 0

    @property
    def name(self) -> str:
        return self.shm.name

    def close(self) -> None:
        for attr in (
            "header",
            "frames",
            "positions",
            "stamps",
            "object",
            "coverage",
            "pattern",
            "probe",
        ):
            self.__dict__.pop(attr, None)
        with contextlib.suppress(Exception):
            self.shm.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


def _populate(shm: shared_memory.SharedMemory, *, allocate: bool) -> None:
    """Back the segment with memory and map it now, not one page fault at a time while
    frames are copied in: a first touch cost several times the copy itself on the
    virtual machines measured. Both calls are best effort (Linux; MADV_POPULATE_WRITE
    needs 5.14)."""
    fd = getattr(shm, "_fd", -1)
    if allocate and fd >= 0 and hasattr(os, "posix_fallocate"):
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, shm.size)
    mapping = getattr(shm, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(23)  # MADV_POPULATE_WRITE


def ring_slots(max_queued_frames: int, batch_size: int, m: int) -> int:
    """Slots of a run's ring: the queue it may hold, within :data:`RING_BYTES`."""
    fit = max(batch_size, RING_BYTES // (m * m * 4))
    return max(1, min(max_queued_frames, fit))
