"""How the multi-process Eiger receiver's parent restores the order that matters.

Messages of different workers arrive interleaved; :class:`EventOrder` holds each
worker's parsed events and applies them through the series book in an order
consistent with the wire:

- Series headers and ends are barriers. When one arrives from a worker, the
  parent asks every other worker to hand over everything it has already received
  (a sync token, answered by a marker after the worker drained its socket) and
  applies what those workers sent before their markers first; events after the
  markers wait until the header or end was applied. Frames of a series are thus
  delivered before its end, and frames of an old series are not mistaken for
  stale because a newer header overtook them.
- Frames between two barriers may arrive slightly out of order. Gaps are counted
  with the book's reorder window: a missing frame counts once the newest frame is
  ``reorder_window`` ahead of it, or at the series' end.

A barrier not answered within ``barrier_timeout`` is counted
(``barrier_timeouts``) and passed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hxn_liveptycho.errors import DecodeError
from hxn_liveptycho.streams.eiger_messages import (
    EigerEvent,
    ImageEvent,
    SeriesEndEvent,
    SeriesStartEvent,
)
from hxn_liveptycho.streams.eiger_series import EigerSeriesBook
from hxn_liveptycho.streams.receiver import handle_guarded
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

#: A parent's request to one worker (``("sync", token)``), sent by the receiver.
SendRequest = Callable[["WorkerHandle", tuple[Any, ...]], None]


@dataclass(slots=True)
class WorkerHandle:
    """The parent's view of one worker: its process and the events it sent, not yet applied."""

    index: int
    process: Any
    pending: deque[tuple[Any, ...]] = field(default_factory=deque)
    ready: bool = False
    #: When the image at the head of ``pending`` began waiting for its series header.
    held_since: float | None = None
    said_bye: bool = False
    gone: bool = False


@dataclass(slots=True)
class Barrier:
    """A series header or end met from one worker, waiting for the others' markers."""

    token: int
    controls: list[EigerEvent]
    waiting: set[int]
    deadline: float
    #: When the last marker came in.
    complete_since: float | None = None


class EventOrder:
    """Holds the workers' parsed events and applies them in wire order (the module doc says how).

    ``workers`` is the receiver's list, filled as workers start; ``send`` asks
    one worker for a marker. ``header_wait``, ``end_wait``/``end_quiet`` and
    ``barrier_timeout`` (seconds) bound how long events may be held. Used from
    the receiver's one thread.
    """

    def __init__(
        self,
        name: str,
        counters: Counters,
        book: EigerSeriesBook,
        workers: list[WorkerHandle],
        send: SendRequest,
        *,
        barrier_timeout: float,
        header_wait: float,
        end_wait: float,
        end_quiet: float,
    ) -> None:
        self.name = name
        self.counters = counters
        self._book = book
        self._workers = workers
        self._send = send
        self._barrier_timeout = barrier_timeout
        self._header_wait = header_wait
        self._end_wait = end_wait
        self._end_quiet = end_quiet
        self.barrier: Barrier | None = None
        self._tokens = itertools.count(1)
        self._flushing = False

    def release(self, worker: WorkerHandle) -> None:
        """A worker that is gone answers no barrier: stop waiting for it."""
        if self.barrier is not None:
            self.barrier.waiting.discard(worker.index)

    def flush(self) -> None:
        """Apply everything still held: the workers stopped, no more markers can come."""
        for worker in self._workers:
            worker.gone = True
        if self.barrier is not None:
            self.barrier.waiting.clear()
        self._flushing = True
        self.pump()

    def check_barrier(self) -> None:
        """Go on without the workers that did not answer a barrier within ``barrier_timeout``."""
        barrier = self.barrier
        if barrier is not None and barrier.waiting and time.monotonic() > barrier.deadline:
            self.counters.add("barrier_timeouts")
            logger.warning(
                "%s: workers %s did not answer a series barrier within %.1f s; going on",
                self.name,
                sorted(barrier.waiting),
                self._barrier_timeout,
            )
            barrier.waiting.clear()

    def pump(self) -> None:
        """Apply pending events in an order consistent with the wire (see the module doc)."""
        progressed = True
        while progressed:
            progressed = False
            barrier = self.barrier
            if barrier is not None and not barrier.waiting and self._may_close(barrier):
                self.barrier = None
                for event in wire_order(barrier.controls):
                    self._apply(("event", event))
                progressed = True
                continue
            for worker in self._workers:
                while worker.pending:
                    item = worker.pending[0]
                    if barrier is None:
                        if self._awaits_header(worker, item):
                            break
                    elif worker.index not in barrier.waiting:
                        if not self._precedes(item, barrier):
                            break
                    elif self._follows(item, barrier):
                        barrier.waiting.discard(worker.index)  # it is past the header already
                        break
                    worker.pending.popleft()
                    progressed = True
                    if barrier is not None and barrier.complete_since is not None:
                        barrier.complete_since = time.monotonic()  # an image it waited for
                    if item[0] == "marker":
                        if barrier is not None and item[1] == barrier.token:
                            barrier.waiting.discard(worker.index)
                        continue
                    event = item[1] if item[0] == "event" else None  # type: ignore[assignment]
                    if not isinstance(event, SeriesStartEvent | SeriesEndEvent):
                        self._apply(item)
                        continue
                    self.counters.add("messages")
                    if barrier is None:
                        barrier = self._open_barrier(worker, event)
                    else:
                        barrier.controls.append(event)
                        barrier.waiting.discard(worker.index)
                    break

    def _ending(self, barrier: Barrier) -> list[tuple[int, str | None]]:
        """The series this barrier ends (an end without a header of the same series)."""
        headers = {
            (c.series, c.unique_id) for c in barrier.controls if isinstance(c, SeriesStartEvent)
        }
        return [
            (c.series, c.unique_id)
            for c in barrier.controls
            if isinstance(c, SeriesEndEvent) and (c.series, c.unique_id) not in headers
        ]

    def _precedes(self, item: tuple[Any, ...], barrier: Barrier) -> bool:
        """An image of a series this barrier ends: sent before that end, whatever the marker."""
        event = item[1] if item[0] == "event" else None
        return isinstance(event, ImageEvent) and (event.series, event.unique_id) in self._ending(
            barrier
        )

    def _may_close(self, barrier: Barrier) -> bool:
        """Every marker is in; an end still waits (up to ``end_wait``) for missing frames.

        A frame still in flight to a worker when it answered the sync would
        otherwise arrive after its series' end: an end waits until no image of
        its series came for ``end_quiet`` and none is missing (holes below the
        newest frame, or fewer frames than the header announced).
        """
        if self._flushing:
            return True
        now = time.monotonic()
        if barrier.complete_since is None:
            barrier.complete_since = now
        if now - barrier.complete_since >= self._end_wait:
            return True
        ending = self._ending(barrier)
        if not ending:
            return True
        if now - barrier.complete_since < self._end_quiet:
            return False
        return not any(self._book.missing(*key) for key in ending)

    def _awaits_header(self, worker: WorkerHandle, item: tuple[Any, ...]) -> bool:
        """Hold a worker's image of a series not yet announced: its header may be overtaking.

        Held for at most ``header_wait``; then it goes through as the threaded
        receiver takes a frame without a header (``unknown_series``).
        """
        event = item[1] if item[0] == "event" else None
        if (
            self._flushing
            or len(self._workers) == 1
            or not isinstance(event, ImageEvent)
            or self._book.knows(event.series, event.unique_id)
            or self._book.is_stale(event.series, event.unique_id)
        ):
            worker.held_since = None
            return False
        now = time.monotonic()
        if worker.held_since is None:
            worker.held_since = now
        if now - worker.held_since < self._header_wait:
            return True
        worker.held_since = None
        return False

    def _follows(self, item: tuple[Any, ...], barrier: Barrier) -> bool:
        """An image sent after the barrier's header or end, whatever the worker's marker says.

        That is an image of the series whose header the barrier holds, or of a
        series not yet known at all (a detector sends no image of a new series
        before the old one's end): everything after it in that worker's queue
        follows too.
        """
        event = item[1] if item[0] == "event" else None
        if not isinstance(event, ImageEvent):
            return False
        if any(
            isinstance(control, SeriesStartEvent)
            and control.series == event.series
            and control.unique_id == event.unique_id
            for control in barrier.controls
        ):
            return True
        return not (
            self._book.knows(event.series, event.unique_id)
            or self._book.is_stale(event.series, event.unique_id)
        )

    def _open_barrier(self, worker: WorkerHandle, event: EigerEvent) -> Barrier:
        # A worker not yet connected has forwarded nothing: nothing of it to wait for.
        others = {
            w.index
            for w in self._workers
            if w is not worker and w.ready and not (w.gone or w.said_bye)
        }
        barrier = Barrier(
            next(self._tokens), [event], others, time.monotonic() + self._barrier_timeout
        )
        self.barrier = barrier
        self.counters.add("barriers")
        for other in self._workers:
            if other.index in others:
                self._send(other, ("sync", barrier.token))
        return barrier

    def _apply(self, item: tuple[Any, ...]) -> None:
        """One parsed message through the book; malformed ones are counted and logged."""
        if item[0] != "event" or not isinstance(item[1], SeriesStartEvent | SeriesEndEvent):
            self.counters.add("messages")
        handle_guarded(self.name, self.counters, self._apply_item, item)

    def _apply_item(self, item: tuple[Any, ...]) -> None:
        if item[0] == "malformed":  # a worker could not parse it: dropped as if parsed here
            raise DecodeError(item[1]) if item[2] else RuntimeError(item[1])
        self._book.apply(item[1])


def wire_order(controls: list[EigerEvent]) -> list[EigerEvent]:
    """Headers and ends met at one barrier, in the order a detector sends them.

    An end of a series without a header here came first (it closed the previous
    series); a header precedes the end of its own series.
    """

    def key(event: EigerEvent) -> tuple[int, str | None]:
        return (event.series, event.unique_id)

    ends = [e for e in controls if isinstance(e, SeriesEndEvent)]
    headers = [e for e in controls if isinstance(e, SeriesStartEvent)]
    header_keys = {key(h) for h in headers}
    ordered: list[EigerEvent] = [e for e in ends if key(e) not in header_keys]
    placed: set[int] = set()
    for header in headers:
        ordered.append(header)
        for end in ends:
            if key(end) == key(header) and id(end) not in placed:
                placed.add(id(end))
                ordered.append(end)
    return ordered


__all__ = ["Barrier", "EventOrder", "WorkerHandle", "wire_order"]
