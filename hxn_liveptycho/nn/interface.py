"""What every inference backend shares: the graph's I/O names, the protocol, the batch shape.

Why a module of its own: the runtimes (:mod:`~hxn_liveptycho.nn.tensorrt`,
:mod:`~hxn_liveptycho.nn.torch_backend`) need these, and
:mod:`~hxn_liveptycho.nn.backends` opens the runtimes; with the shared parts
here the imports point one way (backends -> runtimes -> interface).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["GraphIO", "InferenceBackend", "as_batch"]


@dataclass(frozen=True)
class GraphIO:
    """Names of the graph's diffraction input and its amplitude and phase outputs."""

    input: str
    amplitude: str
    phase: str


class InferenceBackend(Protocol):
    """A loaded model ready to run; ``infer`` may be called from one thread at a time."""

    name: str
    input_hw: tuple[int, int]

    def infer(self, amplitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


def as_batch(amplitudes: np.ndarray) -> np.ndarray:
    """Amplitudes as the contiguous float32 (B, 1, n, n) batch every graph takes."""
    x = np.asarray(amplitudes, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected amplitudes (B, n, n) or (B, 1, n, n), got {x.shape}")
    return np.ascontiguousarray(x)
