"""ePIE: mini-batch parallel rPIE, the solver's default algorithm.

A random batch of positions is updated in parallel (one batched FFT pair), the
object and probe corrections normalised by the batch's *summed* illumination,
so overlapping positions in one batch never overshoot. Three ways to run one
batch, side by side: the reference xp expressions (NumPy, and CuPy with
``fused=False``), the same with several object modes, and the fused CUDA
kernels (:mod:`hxn_liveptycho.recon._update_sums`); :meth:`Epie.batch` picks one.
The solver holds the state; the steps read and update it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hxn_liveptycho.recon import forward, pass_end
from hxn_liveptycho.recon._batch import (
    regularised,
)
from hxn_liveptycho.recon._regularised import (
    regularised_step,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver


class Epie(forward.BatchPaths):
    """One ePIE batch on a :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`'s state:
    a parallel rPIE step on the batch's positions."""

    def _fusable(self, s: StreamingSolver, refine: bool) -> bool:
        """Not with OPR either: its per-position probes take the reference path."""
        return not refine and s._opr is None

    def _reference_batch(self, job: forward.BatchJob) -> None:
        """:meth:`batch` as the reference xp expressions."""
        s, batch, probes, ramp, err = job.s, job.batch, job.probes, job.ramp, job.err
        update_probe, refine = job.update_probe, job.refine
        xp, p = s._xp, s.params
        obj = forward.gather(s, batch)
        psi = forward.batch_exit_waves(s, obj, probes)
        dpsi, e = forward.fourier_residual(s, psi, s._amps[batch.rows])
        err += e
        # Object: sum_jk P_k* dpsi_jk / ((1-r) sum_jk |P_k|^2 + r max), over the batch's box.
        num = forward.box_zeros(s, batch, xp.complex64)
        den = forward.box_zeros(s, batch, xp.float32)
        if update_probe:
            # Probe sums first: they need the object before this batch changes it.
            onum = forward.probe_numerator(s, obj, dpsi, ramp)
            oden = forward.object_power(s, obj)
            if s._opr is not None:  # the variable probe, from the per-position updates
                s._opr.update(s, batch, obj, dpsi, ramp)
        obj_num = forward.object_numerator(s, dpsi, probes)
        del dpsi
        illum = forward.probe_intensity(s, probes)
        pass_end.estimate_shifts(s, batch, obj, obj_num, illum, refine)
        forward.scatter(s, batch, obj_num, num)
        forward.scatter(s, batch, illum, den)
        num /= regularised(den, p.object_reg, xp)
        num *= s.object_step
        s._object[batch.box_slices] += num
        if update_probe:
            onum /= regularised(oden, p.probe_reg, xp)
            onum *= s.probe_step
            s._probes += onum

    def _object_modes_batch(self, job: forward.BatchJob) -> None:
        """:meth:`batch` with several object modes: each pair of object mode m and
        probe mode k makes an exit wave ``P_k O_m``, all of them share the modulus
        constraint; object mode m moves by its own waves' corrections over ``sum_k |P_k|^2``,
        the probe by all of them over ``sum_m |O_m|^2``. Refinement follows the first
        mode."""
        s, batch, err = job.s, job.batch, job.err
        update_probe, refine = job.update_probe, job.refine
        xp, p = s._xp, s.params
        probes, ramp = forward.batch_probes(s, batch, False)
        objs = forward.object_windows(s, batch)
        dpsi, e = forward.fourier_residual(
            s, forward.all_exit_waves(s, objs, probes), s._amps[batch.rows]
        )
        err += e
        parts = forward.object_mode_blocks(s, dpsi)
        if update_probe:  # probe sums first: they need the objects before this batch
            onum, oden = forward.probe_sums_over_modes(s, objs, parts, ramp)
        illum = forward.probe_intensity(s, probes)
        den = forward.box_zeros(s, batch, xp.float32)
        forward.scatter(s, batch, illum, den)
        step = s.object_step / regularised(den, p.object_reg, xp)
        for m, (o, d) in enumerate(zip(objs, parts, strict=True)):
            obj_num = forward.object_numerator(s, d, probes)
            if m == 0:
                pass_end.estimate_shifts(s, batch, o, obj_num, illum, refine)
            num = forward.box_zeros(s, batch, xp.complex64)
            forward.scatter(s, batch, obj_num, num)
            num *= step
            s._objects[m][batch.box_slices] += num
        if update_probe:
            onum /= regularised(oden, p.probe_reg, xp)
            onum *= s.probe_step
            s._probes += onum

    def _fused_batch(self, job: forward.BatchJob) -> None:
        """:meth:`batch` in fused kernels: four passes over the batch plus the FFTs."""
        s, batch, probes, table, err = job.s, job.batch, job.probes, job.ramp, job.err
        update_probe = job.update_probe
        p = s.params
        floor = max(p.modulus_floor, 1e-24)
        dpsi, acc = forward.fused_sums(s, batch, probes, update_probe, floor, err)
        del dpsi  # only its sums are needed: free it before the updates
        obj = s._object[batch.box_slices]
        regularised_step(obj, acc.num, acc.den, p.object_reg, s.object_step, acc.den_max)
        if update_probe:
            onum = forward.probe_update_terms(s, acc, table)
            regularised_step(s._probes, onum, acc.oden, p.probe_reg, s.probe_step, acc.oden_max)
