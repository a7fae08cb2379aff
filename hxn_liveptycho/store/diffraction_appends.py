"""One run's measured frames on their way to ``diffraction/``: queued, appended in chunks.

Measured frames are never superseded: they queue in arrival order and the
sink's writer thread appends whole chunks of them while the scan runs, so the
final write holds only the last partial chunk. Each array is appended at its
own length (:func:`~hxn_liveptycho.store.arrays.append_rows`), so an attempt
that failed half way (one array written, the next not) is completed, never
duplicated. Whatever Tiled has not taken stays queued: the sink tries again,
or hands it to a backup (:meth:`DiffractionAppends.unstored`).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from hxn_liveptycho.store import diffraction as stored_diffraction
from hxn_liveptycho.store.arrays import append_rows
from hxn_liveptycho.store.container import DIFFRACTION_KEYS, diffraction_group

#: Rows per append of the final write when no chunk size was chosen (no appends ran).
FINAL_CHUNK_FRAMES = 1024


class DiffractionAppends:
    """The queue of measured frames and what of it Tiled holds.

    ``lock`` is the sink's: frames are queued under it by the run's thread;
    everything else happens on the sink's writer thread, which takes the lock
    only to look at or shorten the queue.
    """

    def __init__(self, lock: threading.Condition, chunk_frames: int | None) -> None:
        self._lock = lock
        #: Frames not yet in every array of ``diffraction/`` (under the lock).
        self._pending = stored_diffraction.PendingFrames()
        #: Frames per append (None: chosen from the first frame's shape; 0: none until the
        #: final write).
        self.chunk_frames = chunk_frames
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        #: Rows each diffraction array holds in Tiled; the queue starts at their minimum.
        self._rows: dict[str, int] = dict.fromkeys(DIFFRACTION_KEYS, 0)
        #: Frames Tiled holds in every one of the three arrays.
        self.stored = 0
        #: Pixels above float16's range in the frames stored (see store.diffraction).
        self.clipped_pixels = 0

    def queue(self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray) -> bool:
        """Queue frames (the caller holds the lock); whether a whole chunk now waits."""
        self._pending.append(indices, amplitudes, positions_m)
        if self.chunk_frames is None and self._pending.frame_shape is not None:
            self.chunk_frames = stored_diffraction.chunk_frames_for(self._pending.frame_shape)
        return self.chunk_waits()

    def chunk_waits(self) -> bool:
        """Whether a whole chunk is queued (the caller holds the lock)."""
        return bool(self.chunk_frames) and self._pending.rows >= (self.chunk_frames or 0)

    def queued(self) -> int:
        """Frames queued, not yet in every array."""
        with self._lock:
            return self._pending.rows

    def next_append(self) -> int:
        """Rows the next append while the run goes on carries: the whole chunks waiting (the
        first append one chunk, which makes the arrays), at most a request's worth."""
        chunk = self.chunk_frames or 0
        with self._lock:
            whole = (self._pending.rows // chunk) * chunk
        rows = chunk if not self._arrays else whole
        return min(rows, chunk * stored_diffraction.MAX_CHUNKS_PER_REQUEST)

    def append_all(self, container: Any) -> int:
        """Append every queued frame (the final write); raises if Tiled refuses."""
        chunk = self.chunk_frames or FINAL_CHUNK_FRAMES
        written = 0
        while True:
            left = self.queued()
            if left <= 0:
                return written
            first = not self._arrays
            rows = min(left, chunk if first else chunk * stored_diffraction.MAX_CHUNKS_PER_REQUEST)
            written += self.append(container, rows)

    def append(self, container: Any, rows: int) -> int:
        """Write the first ``rows`` queued frames to each array that lacks them; rows now stored.

        Each array is appended at its own length, so an attempt that failed half
        way (one array written, the next not) is completed, never duplicated.
        """
        with self._lock:
            held = max(self._rows.values()) - self.stored
            rows = max(rows, held)
            queued = self._pending.peek(rows)
        rows = len(queued)
        group = self.group(container)
        for key in DIFFRACTION_KEYS:
            stored = self._rows[key]
            start = stored - self.stored
            if start >= rows:
                continue
            clipped = 0
            if key == "amplitude":
                data, clipped = queued.encoded(start)
            else:
                data = queued.indices(start) if key == "indices" else queued.positions(start)
            self._arrays[key], self._rows[key] = append_rows(
                group,
                key,
                data,
                first=stored,
                client=self._arrays.get(key),
                held=stored,
            )
            self.clipped_pixels += clipped  # counted once written, not once per attempt
        done = min(self._rows.values()) - self.stored
        with self._lock:
            self._pending.drop(done)
            self.stored += done
        return done

    def group(self, container: Any) -> Any:
        """``diffraction/`` of ``container``, made on first use."""
        if self._group is None:
            self._group = diffraction_group(container, self.chunk_frames or 0)
        return self._group

    def unstored(self) -> dict[str, np.ndarray]:
        """Every queued frame, in its stored form: what a backup must hold (empty if none)."""
        with self._lock:
            rows = self._pending.rows
            queued = self._pending.peek(rows)
        if not rows:
            return {}
        return {
            "amplitude": queued.encoded()[0],
            "indices": queued.indices(),
            "positions_m": queued.positions(),
        }
