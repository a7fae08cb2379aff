"""Waiting on a condition, not on the clock: the tests' one polling helper with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``probe`` until it returns something true, and return that; fail the test with
    ``what`` (a text, or a function giving one, e.g. the last state seen) if it has not
    within ``timeout`` seconds. ``interval`` is only how often it looks: the wait ends as
    soon as the condition holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"not within {timeout} s: {described}")
        time.sleep(interval)
