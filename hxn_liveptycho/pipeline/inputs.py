"""What reaches the engine's dispatcher, one small type per kind of input.

Receivers and the RunEngine callback run on their own threads; each hands the
engine one of these, and the dispatcher routes them in arrival order. Typed
messages instead of tagged tuples: what each kind carries is written here,
once, and a type checker sees every producer and the one consumer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from hxn_liveptycho.store.checkpoint import Checkpoint
from hxn_liveptycho.store.diffraction import Diffraction
from hxn_liveptycho.streams import EigerFrame
from hxn_liveptycho.util.counters import Counters

#: Which stream a series message came from.
Stream = Literal["eiger", "panda"]

__all__ = [
    "Document",
    "Flush",
    "Frame",
    "Input",
    "Receiver",
    "Resume",
    "Samples",
    "SeriesEnd",
    "SeriesStart",
    "Stop",
    "Stream",
]


@dataclass(frozen=True, slots=True)
class Document:
    """A bluesky document (from the callback or serve's document source)."""

    name: str
    doc: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SeriesStart:
    """A detector series armed (Eiger header) or a PandA capture started."""

    source: Stream
    header: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded (and cropped) Eiger frame; holds one of the engine's in-flight slots."""

    frame: EigerFrame


@dataclass(frozen=True, slots=True)
class Samples:
    """PandA encoder samples; ``first`` is the index of the first one in the capture."""

    samples: Mapping[str, np.ndarray]
    first: int


@dataclass(frozen=True, slots=True)
class SeriesEnd:
    """A detector series or PandA capture ended."""

    source: Stream


@dataclass(frozen=True, slots=True)
class Flush:
    """Set ``done`` once everything queued before it has been routed."""

    done: threading.Event


@dataclass(frozen=True, slots=True)
class Resume:
    """A run to take up again from its checkpoint (after a restart, or from another worker),
    and what reads back the frames the dead process stored (None: nothing to read)."""

    checkpoint: Checkpoint
    stored_frames: Callable[[], Diffraction | None] | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The dispatcher's last message."""


Input = Document | SeriesStart | Frame | Samples | SeriesEnd | Flush | Resume | Stop


class Receiver(Protocol):
    """A stream receiver the engine owns (Eiger, in threads or processes; PandA)."""

    counters: Counters

    def start(self) -> None: ...

    def stop(self) -> object: ...
