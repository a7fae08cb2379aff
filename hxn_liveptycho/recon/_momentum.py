"""Momentum between passes: the heavy-ball acceleration of mPIE (Maiden, Johnson & Li 2017).

After a pass has moved an array from ``x_prev`` to ``x``, the velocity
``v <- friction v + (x - x_prev)`` remembers the direction the passes keep
taking, and ``x <- x + gain v`` takes a further step along it. Early on,
when every pass moves the object the same way, this gets a usable image in
fewer passes; near convergence the passes' changes are small and alternate,
so ``v`` stays small. It runs between passes on whole arrays (in place, two
buffers the size of the array), outside the hot per-batch kernels. Written
over ``xp``; the solver's fused CuPy path makes the same step inside its
end-of-pass kernels, with this object's buffers (:meth:`Momentum.buffers_for`).
"""

from __future__ import annotations

import types
from typing import Any

__all__ = ["Momentum"]


class Momentum:
    """Velocity of one array across passes. ``friction`` in [0, 1): how much of the velocity
    a pass keeps; ``gain``: the step along it."""

    def __init__(self, friction: float, gain: float, xp: types.ModuleType) -> None:
        self.friction = friction
        self.gain = gain
        self._xp = xp
        self._previous: Any | None = None  # the array as the last step left it
        self._velocity: Any | None = None

    @property
    def buffers(self) -> list[Any]:
        """The arrays this holds (for the solver's memory accounting)."""
        return [a for a in (self._previous, self._velocity) if a is not None]

    def reset(self) -> None:
        """Forget the history: the next :meth:`step` only records where the array is."""
        self._previous = self._velocity = None

    def step(self, x: Any) -> None:
        """Add ``gain v`` to ``x`` in place, after updating ``v`` with the change since the
        last call; the first call after a reset (or a shape change) only records ``x``."""
        prev = self._previous
        if prev is None or prev.shape != x.shape:
            self._previous = x.copy()
            self._velocity = None
            return
        xp = self._xp
        xp.subtract(x, prev, out=prev)  # prev now holds this pass's change
        if self._velocity is None:
            self._velocity = prev.copy()
        else:
            self._velocity *= self.friction
            self._velocity += prev
        xp.multiply(self._velocity, self.gain, out=prev)
        x += prev
        prev[...] = x

    def buffers_for(self, x: Any) -> tuple[int, Any, Any]:
        """``(stage, previous, velocity)`` for a kernel that makes :meth:`step` on ``x``
        itself (``recon._pass_end_kernels``): stage 1, it only records ``x`` into
        ``previous``; 2, the velocity is this pass's change; 3, a full step. Allocates the
        buffers the kernel fills, so this object's state is :meth:`step`'s after the kernel
        has run."""
        xp = self._xp
        if self._previous is None or self._previous.shape != x.shape:
            self._previous, self._velocity = xp.empty_like(x), None
            return 1, self._previous, self._previous  # the velocity is not touched
        if self._velocity is None:
            self._velocity = xp.empty_like(x)
            return 2, self._previous, self._velocity
        return 3, self._previous, self._velocity

    def mix(self, u: Any) -> None:
        """Apply the K x K mixing ``u`` that the solver applied to the modes (its first
        axis) to the history too, so velocities stay attached to the same modes."""
        xp = self._xp
        for name in ("_previous", "_velocity"):
            a = getattr(self, name)
            if a is not None:
                mixed = xp.matmul(u, a.reshape(a.shape[0], -1)).reshape(a.shape)
                setattr(self, name, mixed.astype(a.dtype, copy=False))
