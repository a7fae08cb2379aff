"""FrameGate: a run's frames must all have one shape and dtype; the odd ones are quarantined.

Why: frames are stacked in batches, so a single frame of another shape would
fail the batch it lands in and lose the frames around it. The run's kind is
its first frame's, unless the next two frames agree with each other and not
with it (then the first was the odd one). A detector crop that did not fit a
frame leaves it without pixels: always quarantined. What was quarantined
decides, at the run's end, whether the detector changed its frame shape (the
run is ``incomplete``) or an odd frame was merely dropped (a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from hxn_liveptycho.streams.crop import window_source
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

#: A frame's (shape, dtype); the detector frame's shape for a window a receiver cut.
FrameKind = tuple[tuple[int, ...], np.dtype]


def kind_of(data: np.ndarray) -> FrameKind:
    """Shape and dtype; the detector frame's shape for a window a receiver cut."""
    source = window_source(data)
    shape = source[0] if source is not None else tuple(np.shape(data))
    return shape, np.asarray(data).dtype


def describe_kind(kind: FrameKind | None) -> str:
    """``128x128 uint16``, as log lines and the run's reason say it."""
    if kind is None:
        return "?"
    return f"{'x'.join(map(str, kind[0]))} {kind[1]}"


class FrameGate:
    """Admits the frames of a run's kind and quarantines (counts and drops) the others.

    ``keep`` takes a frame held back until the next one showed that the run's first
    frame was the odd one; ``withdraw`` takes back an admitted frame not yet fed to
    the solver (False when it is too late). Both run on the session's thread.
    """

    def __init__(
        self,
        counters: Counters,
        *,
        keep: Callable[[int, np.ndarray], None],
        withdraw: Callable[[int], bool],
        log: logging.Logger | logging.LoggerAdapter[Any] = logger,
    ) -> None:
        self.counters = counters
        self.log = log
        self._keep = keep
        self._withdraw = withdraw
        #: (shape, dtype) every frame of the run must have, from its first frame.
        self.frame_kind: FrameKind | None = None
        #: Quarantined frames since the last frame of the run's own kind, and the first
        #: odd kind seen: a series whose every later frame is odd changed its shape.
        self.odd_streak = 0
        self.odd_kind: FrameKind | None = None
        self._first_frame_index: int | None = None
        self._kind_accepted = 0
        self._last_odd: tuple[int, np.ndarray] | None = None
        #: Whether a frame the receiver's detector crop did not fit was logged yet.
        self._misfit_logged = False

    def admit(self, index: int, data: np.ndarray) -> bool:
        """Whether a frame has the run's shape and dtype (its first frame's); one that has
        not is quarantined, counted and dropped, so that a single odd frame cannot fail
        the batch it would be stacked with, and the frames around it are kept. With a
        detector crop the shapes compared are the detector frames' (the receiver says),
        so a larger frame is not cropped silently; one the crop did not fit is always
        quarantined."""
        source = window_source(data)
        if source is not None and source[1] is not None:
            return self._quarantine_misfit(index, data, source[1])
        kind = kind_of(data)
        if self.frame_kind is None and len(kind[0]) == 2:
            self.frame_kind = kind
            self._first_frame_index = index
        if kind == self.frame_kind:
            self.odd_streak = 0
            self._kind_accepted += 1
            return True
        if (
            self._kind_accepted == 1
            and self._last_odd is not None
            and kind_of(self._last_odd[1]) == kind
            and self._unadmit(self._first_frame_index)
        ):
            # The run's first frame was the odd one: the two after it agree with each other.
            # It is quarantined in their place, and they set the run's kind.
            self.log.warning(
                "frame %s (%s) was the odd one: quarantined; frames are %s",
                self._first_frame_index,
                describe_kind(self.frame_kind),
                describe_kind(kind),
            )
            self.odd_kind, self.frame_kind = self.frame_kind, kind
            self.odd_streak = 0
            self._kind_accepted = 2
            if self._last_odd is not None:
                self.counters.add("frames_quarantined", -1)
                self._keep(*self._last_odd)
            self._last_odd = None
            return True
        self.counters.add("frames_quarantined")
        self.odd_streak += 1
        # Held until the next frame, in case it shows that the first frame was the odd one.
        self._last_odd = (index, data) if self._kind_accepted == 1 else None
        if self.odd_kind is None:
            self.odd_kind = kind
            self.log.warning(
                "frame %d is %s, not %s like the run's first frame: quarantined (dropped and "
                "counted as frames_quarantined; later ones are not logged)",
                index,
                describe_kind(kind),
                describe_kind(self.frame_kind),
            )
        return False

    def _quarantine_misfit(self, index: int, data: np.ndarray, why: str) -> bool:
        """A frame the receiver's detector crop did not fit: it came without pixels, so it
        is quarantined whatever the run's kind (and never becomes it)."""
        self.counters.add("frames_quarantined")
        self.odd_streak += 1
        if self.odd_kind is None:
            self.odd_kind = kind_of(data)
        if not self._misfit_logged:
            self._misfit_logged = True
            self.log.warning(
                "frame %d: %s: quarantined (dropped and counted as frames_quarantined; later "
                "ones are not logged)",
                index,
                why,
            )
        return False

    def _unadmit(self, index: int | None) -> bool:
        """Quarantine an admitted frame that is not yet fed (False if it is too late)."""
        if index is None or not self._withdraw(index):
            return False
        self.counters.add("frames_quarantined")
        return True

    def shape_change(self, received: int) -> tuple[bool, str] | None:
        """What the quarantine says at the run's end (None when nothing was quarantined):
        whether the detector changed its frame shape (the later frames were all odd, or
        half of them were), and a note of what was quarantined instead of what."""
        quarantined = self.counters.get("frames_quarantined")
        if not quarantined:
            return None
        note = (
            f"{quarantined} of {received} frames quarantined: "
            f"{describe_kind(self.odd_kind)} instead of the run's "
            f"{describe_kind(self.frame_kind)}"
        )
        return self.odd_streak >= 2 or 2 * quarantined >= received, note

    def release(self) -> None:
        """Drop the odd frame held back (the run's frames are released)."""
        self._last_odd = None
