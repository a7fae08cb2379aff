"""A simulated detector's series on the clock: the counters its owner reads, and the pacer.

Why a module of its own: the owner's handle (:mod:`~hxn_liveptycho.sim.publishers`)
reads the counters' layout, the detector's process
(:mod:`~hxn_liveptycho.sim.publisher_child`) writes them and paces its series
with :class:`Pacer`; both Eiger and PandA series keep the same schedule.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["COMMAND_POLL_S", "COUNTER_FIELDS", "STATES", "Pacer", "SharedCounters"]

#: What the shared counters hold, in order (doubles; times on the monotonic clock).
COUNTER_FIELDS = (
    "state",
    "series",
    "frames_planned",
    "frames_published",
    "frames_in_first_message",
    "messages_published",
    "bytes_published",
    "t0",
    "first_sent",
    "last_sent",
    "max_late_s",
    "frame_time_s",
    "preencoded_frames",
    "prepare_s",
    "held_s",
)
STATES = ("starting", "idle", "preparing", "prepared", "publishing", "held", "done")
#: How often a publishing child looks at its pipe (abort, or its owner gone), in seconds.
COMMAND_POLL_S = 0.01


class SharedCounters:
    """The shared counters by name (the child writes, the owner reads)."""

    def __init__(self, array: Any) -> None:
        self._array = array
        self._index = {name: k for k, name in enumerate(COUNTER_FIELDS)}

    def __setitem__(self, name: str, value: float) -> None:
        self._array[self._index[name]] = value

    def __getitem__(self, name: str) -> float:
        return float(self._array[self._index[name]])

    def reset(self, **values: float) -> None:
        for k in range(len(COUNTER_FIELDS)):
            self._array[k] = 0.0
        for name, value in values.items():
            self[name] = value

    def state(self, name: str) -> None:
        self["state"] = STATES.index(name)


class Pacer:
    """Holds each item until its due time on the monotonic clock, watching the pipe meanwhile.

    Due times are absolute (``t0 + i T``), so a late item is sent at once and the
    ones after it catch up: the series never drifts. Sleeps are capped so that
    an abort (or the owner's death) is seen within a few milliseconds. A hold
    (:meth:`hold`) pauses the series, as a gated trigger would, until the owner
    releases it; the schedule then resumes from where it stood.
    """

    def __init__(self, conn: Any, counters: SharedCounters, t0: float) -> None:
        self.conn = conn
        self.counters = counters
        self.t0 = t0
        self.aborted = False
        self.released = False
        self.held = 0.0
        self.max_late = 0.0
        self._next_poll = 0.0

    def due(self, frames: float, period: float) -> float:
        """When ``frames`` frame times have passed since the start, holds left out."""
        return self.t0 + self.held + frames * period

    def wait_until(self, due: float) -> bool:
        """False once the owner has asked for an abort; EOFError if the owner has gone."""
        while True:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + COMMAND_POLL_S
                self._read_commands()
            if self.aborted:
                return False
            if now >= due:
                late = now - due
                if late > self.max_late:
                    self.max_late = late
                    self.counters["max_late_s"] = late
                return True
            time.sleep(min(due - now, COMMAND_POLL_S))

    def hold(self) -> bool:
        """Wait for the owner's release (at once if it came already); False on an abort."""
        began = time.monotonic()
        self.counters.state("held")
        while not (self.released or self.aborted):
            if self.conn.poll(COMMAND_POLL_S):
                self._read_commands()
        self.held += time.monotonic() - began
        self.counters["held_s"] = self.held
        self.counters.state("publishing")
        return not self.aborted

    def _read_commands(self) -> None:
        while self.conn.poll():
            command = self.conn.recv()[0]
            if command == "abort":
                self.aborted = True
            elif command == "release":
                self.released = True

    def sent(self, frames: int, nbytes: int) -> float:
        """Count one message sent (covering frames up to ``frames``); returns the monotonic time."""
        now = time.monotonic()
        c = self.counters
        if c["messages_published"] == 0:
            c["first_sent"] = now
            c["frames_in_first_message"] = frames
        c["last_sent"] = now
        c["frames_published"] = frames
        c["messages_published"] = c["messages_published"] + 1
        c["bytes_published"] = c["bytes_published"] + nbytes
        return now

    def report(self, planned: int, published: int, **extra: Any) -> dict[str, Any]:
        c = self.counters
        span = c["last_sent"] - c["first_sent"]
        after_first = published - c["frames_in_first_message"]
        return {
            "frames_planned": planned,
            "frames_published": published,
            "messages_published": int(c["messages_published"]),
            "bytes_published": int(c["bytes_published"]),
            "target_hz": 1.0 / c["frame_time_s"],
            "rate_hz": after_first / span if after_first > 0 and span > 0 else None,
            "seconds": span,
            "t0": self.t0,
            "first_sent": c["first_sent"],
            "last_sent": c["last_sent"],
            "max_late_s": self.max_late,
            "held_s": self.held,
            "aborted": self.aborted,
            **extra,
        }
