"""Eiger series bookkeeping: which series is current, stale series, gaps, duplicates, re-arm.

The newest series header defines the current series. A detector re-armed
mid-run (a new series id, or in v2 a new ``series_unique_id``) starts a new
series; frames or an end of a series that a newer header superseded are counted
as ``stale_series`` and discarded, so a late straggler can never end or pollute
the new series.

Gaps: frame numbers below the newest one that never arrived. One ordered
receiver (``reorder_window=0``) counts a hole as soon as a higher frame arrives
and a frame that fills it later as ``late``. Receivers whose images come through
several workers see frames slightly out of order; with ``reorder_window=W`` a
hole is counted only once the newest frame is W ahead of it, or when the series
ends or is superseded, and a frame filling a hole before then counts as nothing.
A frame missing from the wire is one ``gaps`` either way.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hxn_liveptycho.errors import DecodeError
from hxn_liveptycho.streams.eiger_messages import (
    EigerEvent,
    EigerFrame,
    ImageEvent,
    SeriesEndEvent,
    SeriesStartEvent,
)
from hxn_liveptycho.streams.receiver import run_callback
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

#: How many series a book tracks at once (series whose end never came are evicted).
MAX_TRACKED_SERIES = 16
#: How many superseded series ids / unique ids a book remembers as stale.
MAX_STALE_SERIES = 64


@dataclass(slots=True)
class _SeriesTrack:
    """Which frames of one series arrived, to count gaps and duplicates."""

    announced: bool
    unique_id: str | None = None
    seen: set[int] = field(default_factory=set)
    next_frame: int = 0
    #: Holes below this frame number are counted (as gaps); above it they may still fill.
    settled: int = 0
    #: Frames seen at or above ``settled``, as a min-heap.
    unsettled: list[int] = field(default_factory=list)
    gaps: int = 0
    duplicates: int = 0
    #: Frames the header announced (0: unknown).
    expected: int = 0


class EigerSeriesBook:
    """Applies parsed Eiger events: series bookkeeping, counters and the user callbacks.

    A user callback that raises is counted and logged (``callback_errors``), as
    every receiver's are. Used from one thread at a time.
    """

    def __init__(
        self,
        name: str,
        counters: Counters,
        *,
        on_series_start: Callable[[int, dict], None],
        on_frame: Callable[[EigerFrame], None],
        on_series_end: Callable[[int], None],
        reorder_window: int = 0,
    ) -> None:
        if reorder_window < 0:
            raise ValueError(f"reorder_window must be >= 0, got {reorder_window}")
        self.name = name
        self.counters = counters
        self.reorder_window = reorder_window
        self._on_series_start = on_series_start
        self._on_frame = on_frame
        self._on_series_end = on_series_end
        self._series: dict[int, _SeriesTrack] = {}
        #: (series id, unique id) of the newest header: what "current" means.
        self._current: tuple[int, str | None] | None = None
        self._stale_ids: dict[int, None] = {}
        self._stale_unique_ids: dict[str, None] = {}
        self._stale_warned: dict[int, None] = {}

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        run_callback(self.name, self.counters, callback, *args)

    def apply(self, event: EigerEvent) -> None:
        """Bookkeeping and callbacks for one event; DecodeError for an image with bad pixels."""
        if isinstance(event, ImageEvent):
            self._apply_image(event)
        elif isinstance(event, SeriesStartEvent):
            if event.dropped:
                self._report_dropped_parts(event)
            self.begin_series(event.series, event.unique_id)
            self._series[event.series].expected = _announced_frames(event.info)
            self.counters.add("headers")
            self._call(self._on_series_start, event.series, event.info)
        elif isinstance(event, SeriesEndEvent):
            if self.discard_stale(event.series, event.unique_id, "series end"):
                return
            self._end_series(event.series)
        else:
            raise TypeError(f"not an Eiger event: {event!r}")

    def _apply_image(self, event: ImageEvent) -> None:
        for name, n in event.counts_always:
            self.counters.add(name, n)
        if self.discard_stale(event.series, event.unique_id, f"frame {event.frame}"):
            return
        if event.error is not None:
            raise DecodeError(event.error)
        assert event.data is not None  # an image parsed without an error has its pixels
        for name, n in event.counts_if_kept:
            self.counters.add(name, n)
        if not self._accept_frame(event.series, event.frame, event.unique_id):
            return
        self.counters.add("frames")
        self._call(self._on_frame, EigerFrame(event.series, event.frame, event.data))

    def _report_dropped_parts(self, event: SeriesStartEvent) -> None:
        """A header kept without its broken or missing detail parts: counted, one line."""
        self.counters.add("header_parts_dropped", len(event.dropped))
        logger.warning(
            "%s: series %d header: %d detail part(s) dropped, the rest of the header is used "
            "and frames flow: %s",
            self.name,
            event.series,
            len(event.dropped),
            "; ".join(event.dropped),
        )

    # -- series -----------------------------------------------------------------------

    def begin_series(self, series: int, unique_id: str | None) -> None:
        """A header: it becomes the current series; every other series is superseded (stale)."""
        key = (series, unique_id)
        superseded: dict[tuple[int, str | None], _SeriesTrack | None] = {
            (number, track.unique_id): track
            for number, track in self._series.items()
            if (number, track.unique_id) != key
        }
        if self._current is not None and self._current != key:
            superseded.setdefault(self._current, None)
        for (number, old_unique), track in superseded.items():
            if number != series:
                _remember(self._stale_ids, number)
                dropped = self._series.pop(number, None)
                if dropped is not None:
                    self._settle(number, dropped, dropped.next_frame)
            if old_unique is not None and old_unique != unique_id:
                _remember(self._stale_unique_ids, old_unique)
            if track is not None and track.seen:
                logger.warning(
                    "%s: series %d (%d frames) superseded by a header for series %d before its "
                    "end (detector re-armed?); its late frames will be discarded",
                    self.name,
                    number,
                    len(track.seen),
                    series,
                )
        self._stale_ids.pop(series, None)
        self._stale_warned.pop(series, None)
        if unique_id is not None:
            self._stale_unique_ids.pop(unique_id, None)
        self._current = key
        existing = self._series.get(series)
        if existing is not None and existing.unique_id == unique_id:
            if not existing.announced:
                # Frames overtook their header: keep counting from what already arrived.
                existing.announced = True
                return
            logger.warning(
                "%s: header for series %d seen again; restarting its frame count", self.name, series
            )
        if existing is not None:
            self._settle(series, existing, existing.next_frame)
        self._track(series, announced=True, unique_id=unique_id)

    def missing(self, series: int, unique_id: str | None) -> int:
        """Frames of a tracked series not (yet) here: holes, and short of what its header said."""
        track = self._series.get(series)
        if track is None or track.unique_id != unique_id:
            return 0
        return max(track.next_frame, track.expected) - len(track.seen)

    def knows(self, series: int, unique_id: str | None) -> bool:
        """True when frames of this series are being tracked (announced or not)."""
        track = self._series.get(series)
        return track is not None and track.unique_id == unique_id

    def is_stale(self, series: int, unique_id: str | None) -> bool:
        """True for a message of a series that a newer header superseded."""
        if unique_id is not None and unique_id in self._stale_unique_ids:
            return True
        if self._current is None:
            return False
        current, current_unique = self._current
        if series == current:
            return (
                unique_id is not None and current_unique is not None and unique_id != current_unique
            )
        if series in self._stale_ids:
            return True
        return series < current and series not in self._series

    def discard_stale(self, series: int, unique_id: str | None, what: str) -> bool:
        """Count and drop a message of a superseded series; False if it is not stale."""
        if not self.is_stale(series, unique_id):
            return False
        self.counters.add("stale_series")
        if series not in self._stale_warned:
            _remember(self._stale_warned, series)
            logger.warning(
                "%s: %s of series %d arrived after a newer series header (current: %s); "
                "discarded (further ones are only counted)",
                self.name,
                what,
                series,
                self._current[0] if self._current else None,
            )
        return True

    def _end_series(self, series: int) -> None:
        track = self._series.pop(series, None)
        if track is None:
            logger.info("%s: series %d ended (no frames or header seen)", self.name, series)
        else:
            self._settle(series, track, track.next_frame)
            logger.info(
                "%s: series %d ended: %d frames, %d skipped, %d duplicates",
                self.name,
                series,
                len(track.seen),
                track.gaps,
                track.duplicates,
            )
        self.counters.add("series_end")
        self._call(self._on_series_end, series)

    def _track(self, series: int, *, announced: bool, unique_id: str | None = None) -> _SeriesTrack:
        track = _SeriesTrack(announced=announced, unique_id=unique_id)
        self._series.pop(series, None)
        self._series[series] = track
        while len(self._series) > MAX_TRACKED_SERIES:
            oldest = next(iter(self._series))
            evicted = self._series.pop(oldest)
            self._settle(oldest, evicted, evicted.next_frame)
        return track

    # -- frames -----------------------------------------------------------------------

    def _accept_frame(self, series: int, frame: int, unique_id: str | None = None) -> bool:
        """Count unknown series, gaps, late and duplicate frames; False drops a duplicate."""
        track = self._series.get(series)
        if track is None:
            track = self._track(series, announced=False, unique_id=unique_id)
            logger.warning(
                "%s: frame %d of series %d arrived without a series header",
                self.name,
                frame,
                series,
            )
        if not track.announced:
            self.counters.add("unknown_series")
        if frame in track.seen:
            track.duplicates += 1
            self.counters.add("duplicates")
            logger.warning("%s: duplicate frame %d of series %d dropped", self.name, frame, series)
            return False
        if frame < track.settled:
            self.counters.add("late")
            logger.warning(
                "%s: frame %d of series %d arrived late (out of order)", self.name, frame, series
            )
        else:
            heapq.heappush(track.unsettled, frame)
        track.seen.add(frame)
        track.next_frame = max(track.next_frame, frame + 1)
        self._settle(series, track, track.next_frame - self.reorder_window)
        return True

    def _settle(self, series: int, track: _SeriesTrack, upto: int) -> None:
        """Count the holes below ``upto`` (frames that can no longer arrive in time) as gaps."""
        if upto <= track.settled:
            return
        arrived = 0
        while track.unsettled and track.unsettled[0] < upto:
            heapq.heappop(track.unsettled)
            arrived += 1
        missing = (upto - track.settled) - arrived
        if missing:
            track.gaps += missing
            self.counters.add("gaps", missing)
            logger.warning(
                "%s: series %d skipped %d frame(s) in %d..%d",
                self.name,
                series,
                missing,
                track.settled,
                upto - 1,
            )
        track.settled = upto


def _announced_frames(info: dict[str, Any]) -> int:
    """Images x triggers from a v1 or v2 header; 0 when it does not say."""
    images = info.get("nimages", info.get("number_of_images"))
    triggers = info.get("ntrigger", info.get("number_of_triggers", 1))
    counts = (images, triggers)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        return 0
    return images * triggers


def _remember(bounded: dict[Any, None], key: Any) -> None:
    """Add ``key`` to an insertion-ordered set that keeps the newest MAX_STALE_SERIES."""
    bounded.pop(key, None)
    bounded[key] = None
    while len(bounded) > MAX_STALE_SERIES:
        del bounded[next(iter(bounded))]
