"""The half-set resolution estimate of one run in the solver process, kept beside its solver.

:class:`~hxn_liveptycho.recon.resolution.HalfSets` reconstructs two interleaved halves
of the positions; this wraps it for a live run: it is fed the same frames as the main
solver, makes one pass each time the main solver makes one, and gives the snapshot a
plain dict (:meth:`LiveResolution.snapshot`). Any failure of the half sets is logged and
costs only the estimate: the run and its snapshots go on without it.

The halves iterate in step with the main solver (one pass each per main pass) rather than
every Nth pass: an estimate from halves that lag the picture shown would understate the
resolution of that picture, and the halves' cost per pass is already what the setting
pays for.
"""

from __future__ import annotations

import logging
import types
from typing import Any

from hxn_liveptycho.recon.params import IterativeParams
from hxn_liveptycho.recon.resolution import HalfSets

__all__ = ["LiveResolution"]

logger = logging.getLogger(__name__)

#: The pixel size the estimate is computed at when the run's is unknown: one nanometre, so
#: the estimate's nanometres read as pixels.
_UNIT_PIXEL_M = 1e-9


class LiveResolution:
    """A run's :class:`HalfSets`, fed and iterated beside its solver, failures contained.

    ``pixel_size_m`` (the object pixel of the run's canvas) puts the estimate in
    nanometres; without it the snapshot carries pixels only.
    """

    def __init__(
        self,
        *,
        probe: Any,
        canvas_shape: tuple[int, int],
        params: IterativeParams,
        xp: types.ModuleType,
        pixel_size_m: float | None,
    ) -> None:
        self.pixel_size_m = pixel_size_m
        self.failure: str | None = None
        self.halves: HalfSets | None = None
        try:
            self.halves = HalfSets(probe=probe, canvas_shape=canvas_shape, params=params, xp=xp)
        except Exception:
            self._disable("start")

    def _disable(self, what: str) -> None:
        """Drop the half sets after a failure: halves missing frames or passes would give
        an estimate of something else than the run."""
        logger.exception(
            "solver: the half-set resolution %s failed; the run goes on without it", what
        )
        self.failure = what
        self.halves = None

    @property
    def ready(self) -> bool:
        """Both halves hold frames, so they can iterate and be compared."""
        return self.halves is not None and all(s.n_positions for s in self.halves.solvers)

    def add(self, amplitudes: Any, positions_px: Any) -> None:
        """Route the frames the main solver was just given to the halves."""
        if self.halves is None:
            return
        try:
            self.halves.add(amplitudes, positions_px)
        except Exception:
            self._disable("add")

    def iterate(self) -> None:
        """One pass of each half, once both hold frames."""
        if self.halves is None or not self.ready:
            return
        try:
            self.halves.iterate(1)
        except Exception:
            self._disable("iteration")

    def snapshot(self) -> dict[str, Any] | None:
        """The estimate now as plain values, for the snapshot and the container metadata.

        ``estimated`` is False while the halves cannot be compared yet (a half without
        frames or without a pass). Otherwise ``half_period_nm`` / ``period_nm`` (None
        when the correlation never fell below the threshold: ``resolved_to_nyquist``;
        also None when the pixel size is unknown), the same in pixels
        (``half_period_px``, ``period_px``), ``pixel_size_nm`` (None when unknown),
        ``iteration`` (the halves' passes) and ``positions`` (frames per half). None when
        the half sets failed or the estimate did: the snapshot goes without it.
        """
        if self.halves is None:
            return None
        first, second = self.halves.solvers
        counts = [int(first.n_positions), int(second.n_positions)]
        iteration = int(min(first.iteration, second.iteration))
        if not self.ready or iteration == 0:
            return {"estimated": False, "iteration": iteration, "positions": counts}
        pixel_m = self.pixel_size_m or _UNIT_PIXEL_M
        try:
            estimate = self.halves.estimate(pixel_m)
        except Exception:
            logger.exception("solver: the half-set resolution estimate failed; snapshot without it")
            return None
        pixel_nm = pixel_m * 1e9

        def pixels(nm: float | None) -> float | None:
            return None if nm is None else nm / pixel_nm

        def known(nm: float | None) -> float | None:
            return nm if self.pixel_size_m else None

        return {
            "estimated": True,
            "half_period_nm": known(estimate.half_period_nm),
            "period_nm": known(estimate.period_nm),
            "half_period_px": pixels(estimate.half_period_nm),
            "period_px": pixels(estimate.period_nm),
            "pixel_size_nm": pixel_nm if self.pixel_size_m else None,
            "resolved_to_nyquist": estimate.resolved_to_nyquist,
            "iteration": iteration,
            "positions": counts,
        }
