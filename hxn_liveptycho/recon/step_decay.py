"""Shorter ePIE and LSQ-ML steps once a pass stops paying: how a mini-batch fit settles.

Why: a mini-batch step fits the batch in hand. At full length the object and, above all,
the probe move with every batch by the batch-to-batch noise of the data, so near the
optimum the state a pass returns is the last batches' fit rather than the best over all
frames, and the error levels off above what the same model reaches (the more batches a
pass has, the more). Stochastic optimisation's cure is a shrinking step. Shrinking it
from the start would slow the first passes, where most of the error goes, so it shrinks
only when progress stalls: a pass whose running error is not below the best of the
passes since the last reset (by at least a set fraction) multiplies both steps by a factor,
down to a floor; with a patience of k, only the k-th such pass in a row and those after
it, so that a passing stall of the early passes goes by at full steps. The best, not the
previous pass: a slow fit still sets a new best every pass, while a fit at its noise floor
moves up and down around a level.
New frames bring regions that need full steps, so the steps return to full whenever the
frames change; an algorithm switch (a DM stage before LSQ-ML) starts afresh too, since
the errors of two algorithms are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepDecay"]


@dataclass
class StepDecay:
    """The current multiplier of the object and probe steps, and what it was decided from.

    ``factor`` 1 turns it off. ``observe`` takes each pass's running error and the data's
    power (``sum A^2`` over the active frames, which changes exactly when frames are
    added), both already summed over ranks so that every rank decides alike.
    """

    factor: float
    tolerance: float
    floor: float
    #: The passes before this iteration never shrink the step (the probe update's onset).
    start: int = 0
    #: Passes in a row without a new best before the steps shrink (and at each one after).
    patience: int = 1
    scale: float = 1.0
    _misses: int = 0
    _best: float | None = None
    _power: float | None = None
    _algorithm: str | None = None

    @property
    def enabled(self) -> bool:
        return self.factor < 1.0

    def reset(self) -> None:
        """Full steps again, and no error to compare the next pass with."""
        self.scale = 1.0
        self._best = None
        self._misses = 0

    def observe(self, iteration: int, algorithm: str, error: float, power: float) -> None:
        """Decide the steps of the pass after ``iteration`` (0-based) from its running error."""
        if power != self._power or algorithm != self._algorithm or algorithm == "dm":
            self._power, self._algorithm = power, algorithm
            self.reset()
        elif self._best is not None and error > self._best * (1.0 - self.tolerance):
            self._misses += 1
            if iteration >= self.start and self._misses >= self.patience:
                self.scale = max(self.floor, self.scale * self.factor)
        else:
            self._misses = 0
        if self._best is None or error < self._best:
            self._best = error
