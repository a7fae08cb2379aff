"""A run's states, and how its data decide the one it ends in.

Why: every run ends exactly once, with a reason, and claims no more than its
data show (docs/architecture.md). The decision reads only what the session
counted and saw, so it lives apart from the session's thread and its writes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class RunStatus(enum.StrEnum):
    """A run's state. ``waiting`` and ``running`` are open; every run ends in exactly one of
    the others, with a reason (:attr:`RunSession.reason`), so nothing stays ``running``
    once its session has ended and no run claims more than its data show:

    - ``complete``: the scan ended and its frames were reconstructed (recoverable
      oddities are listed in :attr:`RunSession.warnings`);
    - ``incomplete``: the scan ended (or was given up on: no ``stop``, a newer run) but
      data are missing or inconsistent: no frames, no positions, nothing paired, a
      detector that changed its frame shape;
    - ``failed``: the reconstruction or the result store broke (``error`` says how);
    - ``aborted``: the scan or the user stopped it early;
    - ``skipped``: selected by plan name, but the documents show it is not ptychography.
    """

    WAITING = "waiting"
    RUNNING = "running"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    ABORTED = "aborted"
    SKIPPED = "skipped"


FINAL_STATUSES = frozenset(
    {
        RunStatus.COMPLETE,
        RunStatus.INCOMPLETE,
        RunStatus.FAILED,
        RunStatus.ABORTED,
        RunStatus.SKIPPED,
    }
)

#: Reason of a run ended because a newer run started before its ``stop`` arrived.
SUPERSEDED = "a new run started before its stop"


def verdict(
    *,
    forced_end: str | None,
    stop_doc: Mapping[str, Any] | None,
    missing: str | None,
) -> tuple[RunStatus, str]:
    """The terminal state the data support, and why, for a run whose solver did not break
    (that run is ``failed``): a run given up on without its ``stop`` is ``incomplete``,
    then the scan's own exit status decides, then what is ``missing`` (see
    :func:`missing_data`)."""
    if forced_end is not None:
        return RunStatus.INCOMPLETE, "; ".join(filter(None, [forced_end, missing]))
    stop = stop_doc or {}
    if stop.get("exit_status") != "success":
        why = f"the scan ended with exit status {stop.get('exit_status')!r}"
        if stop.get("reason"):
            why += f": {stop['reason']}"
        return RunStatus.ABORTED, why
    if missing is not None:
        return RunStatus.INCOMPLETE, missing
    return RunStatus.COMPLETE, "the scan ended and its frames were reconstructed"


def missing_data(
    counters: Mapping[str, int],
    *,
    shape_change: tuple[bool, str] | None,
    expected_points: int | None,
    detector_armed: bool,
) -> tuple[str | None, list[str]]:
    """Why the received data cannot make a whole result (None when they can), and the
    recoverable shortfalls that become warnings instead.

    ``counters`` are the session's with the assembler's and what never paired;
    ``shape_change`` is the frame quarantine's verdict (see ``FrameGate``);
    ``expected_points`` is None while the run is not configured.
    """
    warnings: list[str] = []
    received = counters.get("frames_received", 0)
    used = counters.get("frames_used", 0)
    if shape_change is not None:
        changed, note = shape_change
        if changed:
            return f"the detector's frame shape changed: {note}", warnings
        warnings.append(note)
    if expected_points is None:
        return "the run was never configured", warnings
    if received == 0:
        armed = "" if detector_armed else " (no detector series was armed)"
        return f"no detector frames were received{armed}", warnings
    if counters.get("assembler_samples", 0) == 0:
        return f"no encoder positions were received for the {received} frames", warnings
    if used == 0:
        return f"no frame was paired with a position ({unpaired_text(counters)})", warnings
    unpaired = unpaired_text(counters)
    if unpaired:
        warnings.append(f"unpaired at the end: {unpaired}")
    if used < expected_points:
        warnings.append(f"{used} of the scan's {expected_points} points were reconstructed")
    return None, warnings


def unpaired_text(counters: Mapping[str, int]) -> str:
    """``3 frames_without_position, 1 samples_unassigned``: what never paired, for a reason."""
    keys = ("frames_without_position", "positions_without_frame", "samples_unassigned")
    return ", ".join(f"{counters[k]} {k}" for k in keys if counters.get(k))
