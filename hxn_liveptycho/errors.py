"""One exception root, so callers can catch everything this package raises on purpose.

Each subclass also inherits the built-in type a caller would expect
(``ValueError``, ``RuntimeError``), following event-model's habit.
"""

from __future__ import annotations


class LivePtychoError(Exception):
    """Root of every error raised on purpose by hxn_liveptycho."""


class NotPtychographyError(LivePtychoError, ValueError):
    """A run lacks what a ptychographic reconstruction needs; the message names the missing keys."""


class ConfigurationError(LivePtychoError, ValueError):
    """A configuration (settings, overrides, scan parameters) is invalid."""


class DecodeError(LivePtychoError, ValueError):
    """A message from a detector or position stream could not be decoded."""


class StoreError(LivePtychoError, RuntimeError):
    """Writing to the result store (Tiled) failed after retries."""
