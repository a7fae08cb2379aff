"""A ring of frame slots in shared memory: frames cross to the solver process without pickling.

The session writes each batch of amplitudes into the next free slots and sends
only (start, count, positions) over the pipe; the solver process reads the
slots, copies them into its own arrays (on the GPU), and says how many it has
consumed, which frees them. Slots are consumed in the order they were written,
so one count is all the bookkeeping the writer needs. The writer owns the
segment (creates and unlinks it); the reader only attaches, so a reader that
dies leaves nothing behind.
"""

from __future__ import annotations

import threading
from multiprocessing import shared_memory

import numpy as np

__all__ = ["FrameRing", "FrameRingReader"]


class FrameRing:
    """The writer's side: ``slots`` frames of ``n`` x ``n`` float32."""

    def __init__(self, slots: int, n: int) -> None:
        if slots < 1 or n < 1:
            raise ValueError(f"a frame ring needs slots >= 1 and n >= 1, got {slots}, {n}")
        self.slots = slots
        self.n = n
        self._shm = shared_memory.SharedMemory(create=True, size=slots * n * n * 4)
        self._frames = np.ndarray((slots, n, n), dtype=np.float32, buffer=self._shm.buf)
        self._head = 0
        self._free = slots
        self._cond = threading.Condition()
        self._closed = False

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def free(self) -> int:
        with self._cond:
            return self._free

    def write(self, frames: np.ndarray, *, timeout: float | None = None) -> tuple[int, int]:
        """Copy the first frames of ``frames`` (k, n, n) that fit in the free slots after the
        head; return (start, count) written, count >= 1 for non-empty ``frames``.

        Waits for the reader to free a slot when the ring is full (back-pressure
        on the writer, never a dropped frame); TimeoutError after ``timeout``
        seconds without room. Call again with the rest: each span must reach the
        reader before the ring can free room for the next.
        """
        if len(frames) == 0:
            return self._head, 0
        with self._cond:
            if not self._cond.wait_for(lambda: self._free > 0 or self._closed, timeout):
                raise TimeoutError(f"no free slot in the frame ring for {timeout} s")
            if self._closed:
                raise RuntimeError("the frame ring is closed")
            count = min(len(frames), self._free, self.slots - self._head)
            start = self._head
            self._head = (self._head + count) % self.slots
            self._free -= count
        self._frames[start : start + count] = frames[:count]
        return start, count

    def release(self, count: int) -> None:
        """The reader consumed ``count`` more slots (in order): they are free again."""
        with self._cond:
            self._free = min(self.slots, self._free + count)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        del self._frames
        self._shm.close()
        self._shm.unlink()


class FrameRingReader:
    """The solver process's side: views of the slots the writer filled."""

    def __init__(self, name: str, slots: int, n: int) -> None:
        # A spawned child shares its parent's resource tracker, so attaching here adds
        # nothing the writer's unlink does not remove.
        self._shm = shared_memory.SharedMemory(name=name)
        self._frames = np.ndarray((slots, n, n), dtype=np.float32, buffer=self._shm.buf)

    def view(self, start: int, count: int) -> np.ndarray:
        return self._frames[start : start + count]

    def close(self) -> None:
        del self._frames
        self._shm.close()
