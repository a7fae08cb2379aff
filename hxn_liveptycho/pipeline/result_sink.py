"""ResultSink: where a session's results go (Tiled in production; anything with its methods).

Why apart: the session writes through this protocol only, so a test can record
what a run wrote, and the store (``store.tiled.TiledSink``) implements it
without importing the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig


@runtime_checkable
class ResultSink(Protocol):
    """Where a session's results go (Tiled in production; anything with these methods)."""

    #: Called when a result the sink could not store (held for retry-upload) is stored later.
    on_stored_later: Callable[[], None] | None

    def open(self, config: ScanConfig | None, metadata: Mapping[str, Any]) -> None: ...

    def live(self, snapshot: Mapping[str, Any]) -> None: ...

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None: ...

    def nn(self, snapshot: Mapping[str, Any]) -> None: ...

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


SinkFactory = Callable[[], ResultSink]
