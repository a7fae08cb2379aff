"""The iterative solver's settings: pure pydantic, imported by everything that configures
it (scan configuration, overrides, the engine, the docs) without the solver itself."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Algorithm", "IterativeParams"]

Algorithm = Literal["epie", "dm", "lsqml"]


class IterativeParams(BaseModel):
    """Settings of the iterative solver; defaults converge on HXN-like data without tuning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Algorithm = Field(
        "epie",
        description="'epie': mini-batch parallel rPIE/ePIE (fast, robust; the default). "
        "'dm': difference map (Thibault 2008/2009) with relaxation `dm_beta`; it stores one "
        "far-field exit wave per position and probe mode (complex64, positions x modes x n^2 "
        "x 8 bytes), so its memory grows with the scan. All algorithms honour "
        "sub-pixel positions (the probe is shifted by the fraction with a Fourier phase "
        "ramp). DM, having no damping, is the most sensitive to noise: its Fourier step is "
        "the relaxed projection of `dm_fourier_relax`, without which it wanders on noisy "
        "data; it does not support `position_refinement`. Good as the first stage of a "
        "`schedule`. 'lsqml': LSQ-ML "
        "(Odstrčil 2018), mini-batch, noise model `noise`, per-position least-squares step "
        "lengths for object and probe; it costs more per iteration than ePIE (figures in "
        "docs/benchmarks.md).",
    )
    schedule: tuple[tuple[Algorithm, float], ...] | None = Field(
        None,
        description="Algorithms in sequence, as (algorithm, fraction) pairs whose fractions "
        "sum to 1, e.g. [['dm', 0.3], ['lsqml', 0.7]]: DM for the first 30 % of `iterations`, "
        "then LSQ-ML (HXN's alg_flag / alg2_flag / alg_percentage). Fractions are of "
        "`iterations`, counted on the solver's own iteration counter (which includes the "
        "iterations run while the scan is still streaming in); once they are used up the "
        "last stage continues. When set it replaces `algorithm` (giving both is refused).",
    )
    iterations: int = Field(
        100, ge=0, description="Iterations the session runs after the last frame arrived."
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Positions updated together (ePIE, LSQ-ML; DM's batches only bound the "
        "memory of a pass); bigger is faster, smaller converges in fewer iterations.",
    )
    alpha: float = Field(
        1.0,
        gt=0.0,
        le=2.0,
        description="Object step: ePIE, the fraction of the regularised projection; LSQ-ML, a "
        "multiplier of the fitted optimal step (DM: unused).",
    )
    beta: float = Field(
        1.0,
        gt=0.0,
        le=2.0,
        description="Probe step: ePIE, the fraction of the regularised projection; LSQ-ML, a "
        "multiplier of the fitted optimal step (DM: unused).",
    )
    object_reg: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Weight of the maximum illumination in the object update's denominator, "
        "(1 - r) sum|P|^2 + r max: damps poorly lit pixels (0 = plain least squares, "
        "1 = ePIE). ePIE and LSQ-ML; DM uses it as the weight of the previous object in "
        "its overlap update, O = (sum P* psi + r max O_old) / (sum|P|^2 + r max).",
    )
    probe_reg: float = Field(
        0.1, ge=0.0, le=1.0, description="Same as object_reg, for the probe update."
    )
    probe_update_start: int = Field(
        3, ge=0, description="Iteration from which the probe is refined (the object settles first)."
    )
    fix_probe_power: bool = Field(
        True,
        description="After each probe update, rescale probe and object in opposite ways so the "
        "total probe power (all modes) stays at the value measured from the data (a gauge "
        "fix: exit waves are unchanged, the probe cannot blow up or vanish).",
    )
    object_amplitude_max: float | None = Field(
        None, gt=0.0, description="Clamp object amplitude to this value (None: no clamp)."
    )
    probe_modes: int = Field(
        1,
        ge=1,
        le=12,
        description="Mutually incoherent probe modes (mixed-state ptychography): the model "
        "intensity is sum_k |F(P_k O)|^2. Extra modes start as the given probe times "
        "low-order Hermite-like patterns at 5 % of its power (unless the probe passed in "
        "already has them) and are kept orthogonal and sorted by power. Costs one FFT pair "
        "per mode and position. On the GPU with 256² or 64² frames, up to 4 modes take the "
        "modulus step inside the solver's own FFT (faster than the cuFFT path for that "
        "step); more modes, or other frame sizes, use cuFFT.",
    )
    object_modes: int = Field(
        1,
        ge=1,
        le=4,
        description="Mutually incoherent object modes (mixed-state object, Thibault & Menzel "
        "2013): the model intensity is sum_m sum_k |F(P_k O_m)|^2, for a sample that "
        "changes or vibrates during an exposure. Extra modes start as weak random fields "
        "(10 % of the first mode's mean amplitude, seeded by `seed`); the snapshot's "
        "`object` is the first mode and `object_modes` holds them all. Costs one FFT pair "
        "per object and probe mode and position (DM stores that many exit waves per "
        "position). ePIE and LSQ-ML recover the modes of a mixture; DM alone fits the data "
        "better but recovers them slowly (its relaxed projection tolerates a weak mode), "
        "so run it as the first stage of a schedule. Runs the solver's reference path, on "
        "the GPU too (not as fused kernels).",
    )
    orthogonalize_every: int = Field(
        2,
        ge=1,
        description="With probe_modes > 1, orthogonalise the modes (eigen-decomposition of "
        "their Gram matrix, sorted by power) every this many iterations.",
    )
    opr_modes: int = Field(
        0,
        ge=0,
        le=8,
        description="Variable probe for fly scans (orthogonal probe relaxation, Odstrčil "
        "2016/2018, pty-chi's OPR): the number of eigen-probes, the dominant probe mode "
        "included, whose per-position weights let the probe change along the scan, "
        "P_j = P + sum_k w_jk U_k (0 = off, otherwise at least 2). The weights follow each "
        "batch's per-position probe updates by least squares, the eigen-probes by a "
        "power-iteration step per pass, kept orthogonal; the snapshot reports `opr_weights` "
        "(positions x modes) and `opr_probes` (modes x n x n). Starts with the probe "
        "update (`probe_update_start`). ePIE only, one object mode; other incoherent probe "
        "modes stay shared. Runs the solver's reference path, on the GPU too (not as "
        "fused kernels).",
    )
    noise: Literal["gaussian", "poisson"] = Field(
        "gaussian",
        description="LSQ-ML noise model: 'gaussian' (on amplitudes; robust, the usual choice) "
        "or 'poisson' (maximum likelihood for photon counting; better at low counts). "
        "Other algorithms ignore it. On the GPU only 'gaussian' runs as fused kernels; "
        "'poisson' takes the slower reference path.",
    )
    poisson_floor: float = Field(
        1.0,
        ge=0.0,
        description="Floor of the model intensity (counts per pixel) in LSQ-ML's Poisson step. "
        "Where the model is near zero but the frame is not, A^2/I would dominate the step "
        "and make it hostage to float32 rounding (0: no floor, which lets a rounding-sized "
        "change of the data move the object visibly). Set it in the data's units if "
        "frames are not photon counts.",
    )
    momentum_gain: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="ePIE and LSQ-ML: momentum between passes (mPIE's acceleration, Maiden "
        "2017): after each pass the object (and, once it is refined, the probe) takes a "
        "further step of this gain along a velocity that sums the passes' changes, "
        "v <- momentum_friction v + (x - x_before). 0 turns it off. Costs two copies of the "
        "object and probe and a few whole-array passes per iteration (no per-batch work). "
        "The history carries across frames added while streaming and restarts after DM "
        "passes. Larger gains get there sooner but can end worse on low-count data "
        "(the measurement that chose 0.1 is in docs/benchmarks.md).",
    )
    momentum_friction: float = Field(
        0.9,
        ge=0.0,
        lt=1.0,
        description="How much of the momentum's velocity a pass keeps (with `momentum_gain` > 0).",
    )
    step_decay: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="ePIE and LSQ-ML: when a pass's running error is not below the best of "
        "the passes since the frames last changed (by `step_decay_tolerance`, relative), both "
        "steps (`alpha`, `beta`) are multiplied by this, down to `step_decay_floor`; they "
        "return to full length whenever frames are added or the algorithm changes. "
        "Mini-batch steps at full length keep the state moving with the batch-to-batch "
        "noise near the optimum, so the fit levels off early; shorter steps once progress "
        "stalls let it settle deeper without slowing the first passes. 1 turns it off. "
        "Costs one host read of the running error per pass (the live path's one-pass "
        "calls read it anyway).",
    )
    step_decay_tolerance: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Least relative drop below the best running error so far that counts "
        "as progress (0: any new best does; otherwise the steps shrink by `step_decay`).",
    )
    step_decay_floor: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Smallest multiplier `step_decay` takes the steps to.",
    )
    step_decay_patience: int = Field(
        1,
        ge=1,
        description="Passes in a row without a new best running error before `step_decay` "
        "shortens the steps, and each further one (1: at the first such pass). More lets a "
        "passing stall in the early passes go by at full steps.",
    )
    modulus_floor: float = Field(
        0.01,
        ge=0.0,
        description="ePIE, Gaussian LSQ-ML and DM: floor of the model intensity (counts per "
        "pixel) in the modulus step A / sqrt(I). Where the model is near zero but photons were "
        "counted, the far field's phase there is float32 rounding, and the full step would "
        "carry it into the object (a floor of a hundredth of a count keeps it out at the "
        "same object error; docs/benchmarks.md). Set it in the data's units if frames are "
        "not photon counts; 0 is the plain projection.",
    )
    dm_beta: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="DM relaxation: psi <- psi + dm_beta [P_F(2 P_O psi - psi) - P_O psi]; 1 is "
        "the classic difference map, smaller values damp it.",
    )
    dm_fourier_relax: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="DM noise tolerance: the Fourier projection leaves a frame alone when its "
        "relative amplitude mismatch sqrt(sum (|Psi| - A)^2 / sum A^2) is below this and "
        "otherwise moves it only onto that distance (0 = the exact projection, with which DM "
        "wanders on noisy data: it has no fixed point when no object fits every frame). Set "
        "it near the data's noise level, sqrt of the final error (e.g. 0.05-0.1).",
    )
    subpixel_positions: bool = Field(
        True,
        description="Honour the sub-pixel part of the positions: the object window is cut at "
        "the whole pixel below and the probe shifted by the fraction with a Fourier phase "
        "ramp (the simulator's forward model), the probe update shifted back. Costs two "
        "more FFTs per position and mode where some position has a fraction; whole-pixel "
        "data skips it. False rounds positions to whole pixels (cheaper, less accurate on "
        "jittered positions). `position_refinement` needs True.",
    )
    position_refinement: bool = Field(
        False,
        description="Refine the probe positions (gradient-based, Odstrčil 2018 / pty-chi's "
        "'gradient' correction): each position moves by the least-squares shift that the "
        "object's gradient and the exit-wave update ask for, times `position_step`, bounded "
        "by `max_position_step_px` per iteration and `max_position_shift_px` from the "
        "measured position; the mean position is held fixed. ePIE and LSQ-ML only: DM is "
        "refused (its stored exit waves assume fixed positions), also inside a `schedule`. "
        "Positions added while streaming are refined too; `positions_px` reports the "
        "refined ones. Iterations that refine take the solver's reference path on the GPU "
        "(not the fused kernels), which is slower per iteration.",
    )
    position_refinement_start: int = Field(
        10,
        ge=0,
        description="Iteration from which positions are refined (object and probe settle first).",
    )
    position_step: float = Field(
        0.5,
        gt=0.0,
        le=2.0,
        description="Gain on the least-squares position shift (1 = the full shift each iteration).",
    )
    max_position_step_px: float = Field(
        0.5,
        gt=0.0,
        description="Largest change of a position coordinate in one iteration (pixels).",
    )
    max_position_shift_px: float = Field(
        5.0,
        gt=0.0,
        description="Largest distance of a refined position coordinate from the measured one "
        "(pixels, per axis).",
    )
    position_model: Literal["free", "affine", "affine+drift"] = Field(
        "free",
        description="How refined positions are tied together. 'free': each position moves on "
        "its own (within `max_position_shift_px` of the measured one). 'affine': each pass, the "
        "positions' shifts are split into a global affine map of the measured positions (scale "
        "and shear per axis, rotation, offset: encoder scale and stage angle errors), fitted "
        "robustly to all positions at once and applied to every one times `position_model_gain`, "
        "and a per-position rest, "
        "applied times `position_residual_gain` and held within `max_position_shift_px` of the "
        "model; positions that arrive later start on the model. 'affine+drift' adds a slow "
        "drift, a polynomial in acquisition time (frame order) of degree "
        "`position_drift_degree`. Needs `position_refinement`; the fitted scales, rotation, "
        "shear, offset and drift are reported with the results.",
    )
    position_drift_degree: int = Field(
        1,
        ge=1,
        le=3,
        description="Degree of the drift polynomial in acquisition time with `position_model` "
        "'affine+drift' (1 = constant velocity).",
    )
    position_model_gain: float = Field(
        4.0,
        gt=0.0,
        le=8.0,
        description="With `position_model` other than 'free': gain on the part of each pass's "
        "position shifts that the global model explains, applied to every position (the "
        "per-position estimates see only part of a global distortion each pass, because the "
        "object is updated from the same wrong positions; too large a gain overshoots).",
    )
    position_residual_gain: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="With `position_model` other than 'free': gain on the part of each pass's "
        "position shifts that the global model does not explain (0 = positions stay on the "
        "model, 1 = that part moves as freely as without a model).",
    )
    seed: int = Field(0, description="Seed of the batch order, for reproducible runs.")

    @model_validator(mode="after")
    def _check_schedule(self) -> IterativeParams:
        if self.position_refinement and "dm" in self.algorithms:
            raise ValueError(
                "position_refinement works with 'epie' and 'lsqml', not 'dm' (also not in a "
                "schedule): DM's stored exit waves assume fixed positions"
            )
        if self.position_refinement and not self.subpixel_positions:
            raise ValueError("position_refinement needs subpixel_positions=True")
        if self.position_model != "free" and not self.position_refinement:
            raise ValueError(f"position_model {self.position_model!r} needs position_refinement")
        if self.opr_modes == 1:
            raise ValueError("opr_modes is 0 (off) or at least 2 (the main probe and more)")
        if self.opr_modes and self.algorithms != {"epie"}:
            raise ValueError(
                "opr_modes (the variable probe) works with 'epie' only, not "
                f"{sorted(self.algorithms - {'epie'})} (also not in a schedule)"
            )
        if self.opr_modes and self.object_modes > 1:
            raise ValueError("opr_modes (the variable probe) needs object_modes=1")
        if self.schedule is None:
            return self
        if not self.schedule:
            raise ValueError("schedule must have at least one (algorithm, fraction) stage")
        if any(not 0.0 < f <= 1.0 for _, f in self.schedule):
            raise ValueError("schedule fractions must be in (0, 1]")
        total = sum(f for _, f in self.schedule)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"schedule fractions must sum to 1, got {total:g}")
        if "algorithm" in self.model_fields_set:
            raise ValueError("give either `algorithm` or `schedule`, not both")
        return self

    def algorithm_at(self, iteration: int) -> Algorithm:
        """The algorithm that runs iteration ``iteration`` (0-based) under the schedule."""
        if self.schedule is None:
            return self.algorithm
        done = 0.0
        for name, fraction in self.schedule:
            done += fraction
            if iteration < round(done * self.iterations):
                return name
        return self.schedule[-1][0]

    @property
    def algorithms(self) -> set[str]:
        """Every algorithm this configuration may run."""
        return {self.algorithm} if self.schedule is None else {a for a, _ in self.schedule}
