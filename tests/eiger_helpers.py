"""What the Eiger stream tests share: a callback recorder, a polling wait, linked pairs."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from hxn_liveptycho.streams import EigerFrame, EigerPublisher, EigerReceiver

Pair = tuple[EigerPublisher, EigerReceiver]


class Collector:
    """Records every callback in arrival order, thread-safely."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def on_series_start(self, series: int, info: dict) -> None:
        with self._lock:
            self.events.append(("start", (series, info)))

    def on_frame(self, frame: EigerFrame) -> None:
        with self._lock:
            self.events.append(("frame", frame))

    def on_series_end(self, series: int) -> None:
        with self._lock:
            self.events.append(("end", series))

    def of(self, kind: str) -> list[Any]:
        with self._lock:
            return [value for k, value in self.events if k == kind]

    def kinds(self) -> list[str]:
        with self._lock:
            return [k for k, _ in self.events]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@contextlib.contextmanager
def linked_pairs(collector: Collector) -> Iterator[Callable[..., Pair]]:
    """``link(wire, encoding, out, into, **receiver_kwargs)`` makes a started publisher and
    receiver, connected and reporting to ``collector``; all are closed on exit."""
    made: list[Pair] = []

    def link(wire: str, encoding: str, out: str, into: str, **receiver_kwargs: Any) -> Pair:
        publisher = EigerPublisher(
            "tcp://127.0.0.1:*", encoding=encoding, socket_type=out, flavour=wire
        )
        receiver = EigerReceiver(
            publisher.endpoint,
            on_series_start=collector.on_series_start,
            on_frame=collector.on_frame,
            on_series_end=collector.on_series_end,
            socket_type=into,
            **receiver_kwargs,
        )
        made.append((publisher, receiver))
        receiver.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)
        return publisher, receiver

    yield link
    for publisher, receiver in made:
        assert receiver.stop(timeout=5.0)
        publisher.close(linger=0)
