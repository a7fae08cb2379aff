"""Streaming iterative ptychography: one solver, written once over ``xp`` (NumPy or CuPy).

Frames arrive while the scan runs; :meth:`StreamingSolver.add` appends them to
the active set and :meth:`StreamingSolver.iterate` sweeps over everything
received so far. The solver holds the state (object and probe modes, frames,
positions, the buffers' capacity); the algorithms are strategies it hands that
state each pass: :mod:`~hxn_liveptycho.recon.epie` (the default),
:mod:`~hxn_liveptycho.recon.lsqml` and :mod:`~hxn_liveptycho.recon.dm`, which
may follow each other in one run (:attr:`IterativeParams.schedule`). What they
share is in :mod:`~hxn_liveptycho.recon.forward` (windows, exit waves, far
field, sums) and :mod:`~hxn_liveptycho.recon.pass_end` (momentum, gauge, mode
orthogonalisation, position refinement); :mod:`~hxn_liveptycho.recon.buffers`
sizes the state, and the solver refuses one that would not fit.

Forward model and FFT convention: exit waves ``psi_k = P_k * O[window]``; far
field ``Psi_k = fft2(psi_k)`` *unnormalised* (NumPy ``norm="backward"``), compared
as ``sqrt(sum_k |Psi_k|^2)`` with the measured amplitudes ``A = sqrt(I)``. Frames
are stored in FFT order once on arrival, so iterations never shift. Positions
keep their sub-pixel part: the window is cut at the whole pixel below and the
probe shifted by the fraction with a Fourier phase ramp.
"""

from __future__ import annotations

import logging
import types
from typing import Any, cast

import numpy as np

from hxn_liveptycho.recon import _fft_lines as fft_lines
from hxn_liveptycho.recon import buffers, forward, pass_end
from hxn_liveptycho.recon._modes import initial_modes
from hxn_liveptycho.recon._momentum import Momentum
from hxn_liveptycho.recon._positions import position_model_entries
from hxn_liveptycho.recon.backend import (
    array_namespace,
    is_cupy,
    to_host,
)
from hxn_liveptycho.recon.dm import DifferenceMap
from hxn_liveptycho.recon.epie import Epie
from hxn_liveptycho.recon.lsqml import LsqMl
from hxn_liveptycho.recon.opr import VariableProbe, opr_entries
from hxn_liveptycho.recon.params import Algorithm, IterativeParams
from hxn_liveptycho.recon.ranks import RankGroup, Ranks
from hxn_liveptycho.recon.step_decay import StepDecay

__all__ = ["Algorithm", "IterativeParams", "StreamingSolver"]

log = logging.getLogger(__name__)


class StreamingSolver:
    """Ptychographic solver fed incrementally with frames and positions.

    ``probe`` (n, n) complex is the initial guess (or (k, n, n) modes, the
    first the dominant one); with ``params.probe_modes`` > k the missing modes
    are generated from the first. The probe is rescaled at the first
    :meth:`add` so that ``sum_k sum |fft2(P_k)|^2`` (unnormalised FFT) equals the
    mean measured total intensity ``mean_j sum A_j^2``: the power of the guess
    then matches the data and the object starts at the right scale.
    ``canvas_shape`` is the object array (pre-size it with a margin: positions
    whose window would not fit are clipped in and counted in
    ``clipped_positions``). ``valid_mask`` (n, n) bool, zero frequency at the
    CENTRE, marks detector pixels to trust (False: gaps, hot pixels); masked
    pixels keep the model's amplitude and are left out of the error.

    Memory: a configuration that would not fit is refused with a
    :class:`~hxn_liveptycho.errors.ConfigurationError` naming the needed and
    the available bytes (:mod:`hxn_liveptycho.recon.memory`): at construction
    for ``expected_positions`` (buffers are then sized for them at the first
    :meth:`add`), and in :meth:`add` before any buffer grows. The budget is
    the free device memory (CuPy) or RAM (NumPy), or ``memory_limit_bytes``
    when given.
    """

    def __init__(
        self,
        *,
        probe: Any,
        canvas_shape: tuple[int, int],
        params: IterativeParams | None = None,
        xp: types.ModuleType | None = None,
        object_init: complex | Any = 1.0,
        valid_mask: Any | None = None,
        expected_positions: int | None = None,
        memory_limit_bytes: int | None = None,
        fused: bool | None = None,
        ranks: Ranks | RankGroup | None = None,
    ) -> None:
        """``fused``: on CuPy, run the hot steps as the fused kernels (None: wherever they
        exist, one object mode); False runs the xp reference expressions on the GPU, for
        parity tests and benchmarks. NumPy has only the reference. ``ranks``: the
        communicator when several ranks reconstruct one scan, each solver holding its
        share of the frames (:mod:`~hxn_liveptycho.recon.ranks`), or a
        :class:`~hxn_liveptycho.recon.ranks.RankGroup` that also says how often they merge;
        None: one rank."""
        self.params = params if params is not None else IterativeParams()
        if isinstance(ranks, RankGroup):
            self._ranks = ranks
        else:
            self._ranks = RankGroup() if ranks is None else RankGroup(ranks)
        xp = array_namespace(probe) if xp is None else xp
        self._xp = xp
        if expected_positions is not None and expected_positions < 0:
            raise ValueError(f"expected_positions must be >= 0, got {expected_positions}")
        self._expected = expected_positions
        self._memory_limit = memory_limit_bytes
        probe = xp.array(probe, dtype=xp.complex64, copy=True)
        if probe.ndim == 2:
            probe = probe[None]
        if probe.ndim != 3 or probe.shape[1] != probe.shape[2] or probe.shape[0] < 1:
            raise ValueError(
                f"probe must be a square (n, n) array or (k, n, n) modes, got shape {probe.shape}"
            )
        self._n = n = int(probe.shape[-1])
        h, w = (int(canvas_shape[0]), int(canvas_shape[1]))
        if h < n or w < n:
            raise ValueError(f"canvas {h}x{w} is smaller than the {n}x{n} probe window")
        self._shape = (h, w)
        k = self.params.probe_modes
        # Before the big allocations: refuse a scan that cannot fit.
        buffers.check_memory(self, expected_positions or 0, held=0, what="the expected scan")
        if probe.shape[0] < k:
            extra = initial_modes(probe[0], k - probe.shape[0] + 1, xp)[1:]
            probe = xp.concatenate([probe, extra])
        self._probes = xp.ascontiguousarray(probe[:k])
        # OPR: the first mode's variable part, per position (recon.opr); None when off.
        self._opr = VariableProbe(self.params.opr_modes) if self.params.opr_modes else None
        if np.isscalar(object_init):
            first = xp.full((h, w), complex(cast(complex, object_init)), dtype=xp.complex64)
        else:
            first = xp.array(object_init, dtype=xp.complex64, copy=True)
            if first.shape != (h, w):
                raise ValueError(f"object_init shape {first.shape} != canvas_shape {(h, w)}")
        self._objects = buffers.object_modes_from(self, first)
        # Mode 0 as a view: every in-place update of ``_object`` is the first mode's.
        self._object = self._objects[0]
        if valid_mask is not None:
            vm = xp.asarray(valid_mask).astype(bool)
            if vm.shape != (n, n):
                raise ValueError(f"valid_mask shape {vm.shape} != ({n}, {n})")
            self._valid = xp.fft.ifftshift(vm)
        else:
            self._valid = None
        self._valid_f32 = None if self._valid is None else self._valid.astype(xp.float32)
        # CuPy: the hot steps of ePIE, LSQ-ML (Gaussian) and DM run as fused kernels
        # (recon._update_sums and its siblings); the xp expressions below are their reference
        # and the NumPy path.
        can_fuse = is_cupy(xp) and self.params.object_modes == 1
        if fused and not can_fuse:
            raise ValueError("fused kernels need CuPy arrays and one object mode")
        self._fused = can_fuse if fused is None else bool(fused)
        # The algorithms' steps: stateless, each pass hands them this solver's state.
        self._epie = Epie()
        self._lsqml = LsqMl()
        self._dm = DifferenceMap()
        # Fused path, n = 64 or 256: the solver's own FFT (recon._fft_lines), with the
        # modulus step folded between its passes; cuFFT otherwise.
        self._lines = self._fused and fft_lines.supports(n)
        # Fused path: the zeroed small sums of a batch and their views, made once per
        # kind of batch and zeroed again for each (slicing a CuPy array costs the host
        # microseconds that a small scan's batches do not have).
        self._batch_sums: dict[tuple[bool, int], tuple[Any, ...]] = {}
        self._amps = xp.zeros((0, n, n), dtype=xp.float32)
        # Positions (y, x) of the window's top-left corner, float64 on xp: the current
        # (refined) ones and the measured ones (after clipping into the canvas). The
        # window is cut at floor(position); the fraction (0 <= f < 1) shifts the probe.
        self._pos = xp.zeros((0, 2), dtype=xp.float64)
        self._meas = xp.zeros((0, 2), dtype=xp.float64)
        self._shift = xp.zeros((0, 2), dtype=xp.float64)  # refinement: this pass's estimates
        self._pos_host = np.zeros((0, 2), dtype=np.float64)  # host copy of the active _pos
        # Shift the probe per position only when some position has a fraction (or may get
        # one by refinement): whole-pixel data runs the plain, cheaper model.
        self._subpixel = self.params.position_refinement
        self._n_active = 0
        self._amp_power = xp.zeros((), dtype=xp.float32)  # sum of A^2 over active frames
        self._probe_power: Any | None = None  # target sum |P|^2, fixed at the first add
        # DM: far-field exit waves (rows, k, n, n), allocated only when DM runs; rows
        # [0, _dm_ready) hold exit waves consistent with the current iterate.
        self._dm_waves: Any | None = None
        self._dm_ready = 0
        self._rng = np.random.default_rng(self.params.seed)
        p = self.params
        self._object_momentum = Momentum(p.momentum_friction, p.momentum_gain, xp)
        self._probe_momentum = Momentum(p.momentum_friction, p.momentum_gain, xp)
        self._iteration = 0
        # The probe update's onset moves the error on its own: no stall is judged before.
        self._step_decay = StepDecay(
            p.step_decay,
            p.step_decay_tolerance,
            p.step_decay_floor,
            p.probe_update_start + 2,
            patience=p.step_decay_patience,
        )
        self.clipped_positions = 0
        #: Each pass's running error (see :meth:`iterate`): during the pass, before its updates.
        self.error_history: list[float] = []

    # ------------------------------------------------------------------ state
    @property
    def xp(self) -> types.ModuleType:
        """The array module the solver computes with."""
        return self._xp

    @property
    def object(self) -> Any:
        """The object canvas (xp complex64, ``canvas_shape``), live (not a copy)."""
        return self._object

    @property
    def object_modes(self) -> Any:
        """All object modes (xp complex64, (m, H, W)), the first :attr:`object`, live."""
        return self._objects

    @property
    def probe(self) -> Any:
        """The dominant probe mode (xp complex64, (n, n)), live (not a copy)."""
        return self._probes[0]

    @property
    def probe_modes(self) -> Any:
        """All probe modes (xp complex64, (k, n, n)), by decreasing power, live."""
        return self._probes

    @property
    def iteration(self) -> int:
        """Iterations completed."""
        return self._iteration

    @property
    def n_positions(self) -> int:
        """Positions in the active set."""
        return self._n_active

    @property
    def positions_px(self) -> np.ndarray:
        """Active positions (N, 2) (y, x) float64 on host: sub-pixel, clipped into the canvas,
        and refined when ``params.position_refinement`` is on (a host copy)."""
        return np.array(to_host(self._pos[: self._n_active]), dtype=np.float64, copy=True)

    @property
    def measured_positions_px(self) -> np.ndarray:
        """The positions as added (N, 2) (y, x), after clipping into the canvas (host copy)."""
        return np.array(to_host(self._meas[: self._n_active]), dtype=np.float64, copy=True)

    @property
    def error(self) -> float:
        """The last pass's running error (:attr:`error_history`'s last entry; NaN before the
        first iteration): the error during the pass, before the pass's updates. The error
        of the state the solver holds is :meth:`state_error`."""
        return self.error_history[-1] if self.error_history else float("nan")

    def state_error(self) -> float:
        """The normalised amplitude error of the object and probe modes the solver holds now:
        ``sum (|Psi| - A)^2 / sum A^2`` over every active frame (valid pixels), ``|Psi|^2 =
        sum_k |Psi_k|^2`` of the exit waves ``P_k O[window]`` at :attr:`positions_px`
        (probe shifted by each position's sub-pixel part). NaN before any frame.

        What :attr:`error` is not: a pass sums its error batch by batch, each before its
        own update and all before the pass's momentum step, gauge and clamp, so the
        running error describes no state the solver returns. This costs one forward pass
        over all positions (no update, one host sync) and changes nothing: call it when
        the figure is reported, not every pass."""
        if self._n_active == 0 and self._ranks.size == 1:
            return float("nan")
        xp = self._xp
        total, power = self._ranks.error_sums(self, forward.state_error_sum(self))
        return float(to_host(total / xp.maximum(power, 1e-30)))

    def snapshot(self, *, state_error: bool = False) -> dict[str, np.ndarray | int | float]:
        """Host copies of object and dominant probe mode, with iteration count and the last
        pass's running error ``error`` (:attr:`error`); with ``state_error``, also
        ``state_error``, the error of the state copied (:meth:`state_error`: one more
        forward pass, so ask for it where the figure is reported, e.g. the final snapshot).

        With more than one probe mode, ``probe_modes`` (k, n, n) holds them all; with more
        than one object mode, ``object_modes`` (m, H, W); with ``params.opr_modes``,
        ``opr_weights`` (N, M) and ``opr_probes`` (M, n, n) (:mod:`~hxn_liveptycho.recon.opr`).
        """
        snap: dict[str, np.ndarray | int | float] = {
            "object": to_host(self._object).copy(),
            "probe": to_host(self._probes[0]).copy(),
            "iteration": self._iteration,
            "error": self.error,
        }
        if state_error:
            snap["state_error"] = self.state_error()
        if self._probes.shape[0] > 1:
            snap["probe_modes"] = to_host(self._probes).copy()
        if self._objects.shape[0] > 1:
            snap["object_modes"] = to_host(self._objects).copy()
        # The global position model's fit (recon.position_model), when one is used: in pixels;
        # the pipeline adds the metres from the run's pixel size.
        snap.update(position_model_entries(self))
        snap.update(opr_entries(self))  # OPR's weights (N, M) and eigen-probes (M, n, n)
        return snap

    # ------------------------------------------------------------------ memory
    def held_bytes(self) -> int:
        """Bytes of the arrays the solver holds between calls (buffers at their capacity)."""
        return int(sum(a.nbytes for a in buffers.held_arrays(self)))

    def peak_bytes(self) -> int:
        """Expected peak bytes while iterating: :meth:`held_bytes` plus the batch and canvas
        temporaries and (CuPy) cuFFT's work area of :func:`memory.estimate_terms`."""
        terms = buffers.estimate_terms(self, self._amps.shape[0], subpixel=self._subpixel)
        transient = ("canvas_temporaries", "batch_temporaries", "fft_work_area")
        held = self.held_bytes()
        if self._dm_waves is None:  # DM waves not yet allocated: they come with DM's first pass
            held += terms["dm_exit_waves"]
        return held + sum(terms[t] for t in transient)

    # ------------------------------------------------------------------ input
    def add(self, amplitudes: Any, positions_px: Any) -> int:
        """Append frames: ``amplitudes`` (k, n, n) = sqrt(I), zero frequency at the CENTRE;
        ``positions_px`` (k, 2) (y, x) top-left of the probe window in canvas pixels.

        Uploads once and stores in FFT order; inputs are never modified.
        Positions keep their sub-pixel part (the probe is shifted by it);
        windows that would leave the canvas are clipped in and counted.
        Raises ConfigurationError, keeping everything added before, when the
        grown buffers would not fit in memory. Returns the number of active
        positions.
        """
        xp, n = self._xp, self._n
        pos = np.array(to_host(positions_px), dtype=np.float64).reshape(-1, 2)
        amps = xp.asarray(amplitudes, dtype=xp.float32)
        if amps.ndim == 2:
            amps = amps[None]
        if amps.shape[1:] != (n, n) or amps.shape[0] != pos.shape[0]:
            raise ValueError(
                f"amplitudes {tuple(amps.shape)} and positions {pos.shape} do not match "
                f"k frames of ({n}, {n}) and k (y, x) pairs"
            )
        k = pos.shape[0]
        if k == 0:
            return self._n_active
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions contain NaN or inf")
        buffers.append_frames(self, amps, buffers.clip_positions(self, pos))
        return self._n_active

    @property
    def object_step(self) -> float:
        """The object step of the next pass: ``params.alpha`` times :attr:`step_scale`."""
        return self.params.alpha * self._step_decay.scale

    @property
    def probe_step(self) -> float:
        """The probe step of the next pass: ``params.beta`` times :attr:`step_scale`."""
        return self.params.beta * self._step_decay.scale

    @property
    def step_scale(self) -> float:
        """The multiplier ``params.step_decay`` has left on the ePIE and LSQ-ML steps (1: full
        length; :mod:`~hxn_liveptycho.recon.step_decay`)."""
        return self._step_decay.scale

    def _decide_steps(self, algorithm: str, err: Any) -> None:
        """Shrink or restore the steps from this pass's running error (one host read)."""
        total, power = self._ranks.error_sums(self, self._xp.reshape(err, (1,)))
        self._step_decay.observe(
            self._iteration, algorithm, float(to_host(total)[0]), float(to_host(power))
        )

    # ------------------------------------------------------------------ driver
    def iterate(self, n: int = 1) -> float:
        """Run ``n`` passes over all active positions; return the last pass's running error.

        The algorithm of each pass follows ``params.algorithm`` or
        ``params.schedule``. The running error of a pass (appended to
        :attr:`error_history`) is ``sum (|Psi| - A)^2 / sum A^2`` over all
        active frames (valid pixels), ``|Psi|^2 = sum_k |Psi_k|^2``, each
        batch's part measured on the model entering that batch's Fourier
        update: the error during the pass, before the pass's updates (what
        iterative codes log, for free). The error of the state after the
        pass is :meth:`state_error`. With ``position_refinement``, from iteration
        ``position_refinement_start`` every pass also estimates a shift per
        position and applies them all at its end (within the bounds, the
        mean position fixed). Errors stay on the device until the end of the
        call: one host sync per call, none per batch.
        """
        if self._n_active == 0 and self._ranks.size == 1:
            raise RuntimeError("iterate() called before any frame was added")
        if n < 0:
            raise ValueError(f"iterate() takes n >= 0 passes, got {n}")
        if n == 0:
            return self.error
        xp, p = self._xp, self.params
        self._ranks.begin(self)  # several ranks: the probe's power from all their frames
        errors = []
        for _ in range(n):
            algorithm = p.algorithm_at(self._iteration)
            update_probe = self._iteration >= p.probe_update_start
            refine = p.position_refinement and self._iteration >= p.position_refinement_start
            if algorithm == "dm":
                err = self._dm.run_pass(self, update_probe)
            else:
                self._dm_ready = 0  # stored DM waves go stale once another algorithm runs
                step = self._epie.batch if algorithm == "epie" else self._lsqml.batch
                err = xp.zeros((), dtype=xp.float32)
                self._ranks.pass_start(self)  # several ranks: they merge their changes
                order = self._rng.permutation(self._n_active)
                batches = self._ranks.batches(self, forward.batches(self, order))
                for i, batch in enumerate(batches):
                    if batch is not None:  # None: another rank's batch (several ranks)
                        step(self, batch, update_probe, refine, err)
                    self._ranks.after_batch(self, batch, i, update_probe)
                self._ranks.merge(self, update_probe, len(batches))
                if refine:
                    self._ranks.apply_shifts(self)
            if self._opr is not None and update_probe:
                self._opr.end_pass(self)
            pass_end.end_pass(self, algorithm, update_probe)
            if (
                update_probe
                and self._probes.shape[0] > 1
                and (self._iteration + 1) % p.orthogonalize_every == 0
            ):
                pass_end.orthogonalize(self)
            errors.append(err)
            if self._step_decay.enabled and algorithm != "dm":
                self._decide_steps(algorithm, err)
            self._iteration += 1
        # One division for the call, not two launches a pass (the frames cannot change
        # within the call).
        totals, power = self._ranks.error_sums(self, xp.stack(errors))
        values = [float(e) for e in to_host(totals / xp.maximum(power, 1e-30))]
        self.error_history.extend(values)
        return values[-1]
