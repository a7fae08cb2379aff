"""Thread-safe named counters: how every stage says what it received, dropped or rejected.

Counters never reset during a run; status pages and the processed container's
metadata show a snapshot of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping


class Counters:
    """A small set of named integer counters shared between threads."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def merge(self, other: Mapping[str, int], prefix: str = "") -> None:
        with self._lock:
            for key, value in other.items():
                full = prefix + key
                self._values[full] = self._values.get(full, 0) + value

    def __repr__(self) -> str:
        return f"Counters({self.snapshot()!r})"
