"""What the Eiger stream tests share: a callback recorder and a polling wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from hxn_liveptycho.streams import EigerFrame


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
