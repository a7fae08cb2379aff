"""LSQ-ML (Odstrčil et al. 2018): mini-batch, Gaussian or Poisson noise model, and
per-position least-squares step lengths for object and probe.

As for ePIE, one batch runs as the reference xp expressions, with several object
modes, or as fused CUDA kernels (Gaussian noise; :mod:`hxn_liveptycho.recon._update_sums`
and :mod:`~hxn_liveptycho.recon._lsqml_step_fit`); the step-length algebra is in
:mod:`hxn_liveptycho.recon._lsqml`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hxn_liveptycho.recon import forward, pass_end
from hxn_liveptycho.recon._batch import (
    LSQ_STEP_REG,
    regularised,
)
from hxn_liveptycho.recon._lsqml import far_field_factor, optimal_steps
from hxn_liveptycho.recon._lsqml_step_fit import (
    lsqml_step_sums,
    lsqml_steps,
)
from hxn_liveptycho.recon._regularised import (
    add_scaled,
    divide_regularised,
)
from hxn_liveptycho.recon._update_sums import add_window_ratio
from hxn_liveptycho.recon.backend import (
    fft2,
    ifft2,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver


class LsqMl(forward.BatchPaths):
    """One LSQ-ML batch (Odstrčil 2018) on a
    :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`'s state.

    chi = the exit-wave update the noise model asks for; directions
    dO = sum P* chi / illumination, dP = sum O* chi / sum |O|^2; steps
    (alpha_O,j, alpha_P,j) from the least-squares fit of chi_j by
    alpha_O,j P dO_j + alpha_P,j dP O_j. The object gets each position's
    contribution weighted by its alpha_O,j, the probe the batch-mean alpha_P.
    """

    def _fusable(self, s: StreamingSolver, refine: bool) -> bool:
        """Fused: the Gaussian far-field step is the modulus residual; refinement needs the
        object numerator itself."""
        return s.params.noise == "gaussian" and not refine

    def _reference_batch(self, job: forward.BatchJob) -> None:
        """:meth:`batch` as the reference xp expressions."""
        s, batch, probes, ramp, err = job.s, job.batch, job.probes, job.ramp, job.err
        update_probe, refine = job.update_probe, job.refine
        xp, p = s._xp, s.params
        obj = forward.gather(s, batch)
        chi = self._chi(s, forward.batch_exit_waves(s, obj, probes), s._amps[batch.rows], err)
        # Object direction over the batch footprint, and its windows.
        pnum = forward.object_numerator(s, chi, probes)
        illum = forward.probe_intensity(s, probes)
        pass_end.estimate_shifts(s, batch, obj, pnum, illum, refine)
        num = forward.box_zeros(s, batch, xp.complex64)
        den = forward.box_zeros(s, batch, xp.float32)
        forward.scatter(s, batch, pnum, num)
        forward.scatter(s, batch, illum, den)
        regularised(den, p.object_reg, xp)
        d_obj = forward.gather(s, batch, num) / forward.gather(s, batch, den)
        u = forward.batch_exit_waves(s, d_obj, probes)
        if update_probe:
            oden = regularised(forward.object_power(s, obj), p.probe_reg, xp)
            d_probe = forward.probe_numerator(s, obj, chi, ramp) / oden
            if ramp is None:
                v = obj[:, None] * d_probe[None]
            else:  # the probe step as each position sees it: shifted by its fraction
                v = obj[:, None] * forward.shift_modes(s, fft2(d_probe, xp=xp), ramp, False)
        else:
            v = None
        alpha_o, alpha_p = optimal_steps(u, v, chi, LSQ_STEP_REG, xp)
        del u, v, chi
        num[...] = 0
        pnum *= (s.object_step * alpha_o).astype(xp.float32)[:, None, None]
        forward.scatter(s, batch, pnum, num)
        num /= den
        s._object[batch.box_slices] += num
        if update_probe:
            d_probe *= (s.probe_step * xp.mean(alpha_p)).astype(xp.float32)
            s._probes += d_probe

    def _chi(self, s: StreamingSolver, psi: Any, amps: Any, err: Any) -> Any:
        """The exit-wave update ``chi`` (B, C, n, n) the noise model asks of the waves
        ``psi`` (consumed); their squared error is added into ``err`` (0-d, in place)."""
        xp, p = s._xp, s.params
        f, inten, e = forward.far_field(s, psi, amps)
        err += e
        g = far_field_factor(inten, amps, s._valid, p.noise, xp, p.poisson_floor, p.modulus_floor)
        f *= g[:, None]
        del inten
        return ifft2(f, xp=xp, overwrite_x=True)

    def _object_modes_batch(self, job: forward.BatchJob) -> None:
        """:meth:`batch` with several object modes: each pair of object mode m and
        probe mode k makes an exit wave ``P_k O_m``; object mode m's direction is its own
        waves' ``sum_k P_k* chi_mk`` over the illumination, the probe's all of them over
        ``sum_m |O_m|^2``; one pair of steps per position fits ``chi`` over every pair.
        Refinement follows the first mode."""
        s, batch, err = job.s, job.batch, job.err
        update_probe, refine = job.update_probe, job.refine
        xp, p = s._xp, s.params
        probes, ramp = forward.batch_probes(s, batch, False)
        objs = forward.object_windows(s, batch)
        chi = self._chi(s, forward.all_exit_waves(s, objs, probes), s._amps[batch.rows], err)
        parts = forward.object_mode_blocks(s, chi)
        illum = forward.probe_intensity(s, probes)
        den = forward.box_zeros(s, batch, xp.float32)
        forward.scatter(s, batch, illum, den)
        regularised(den, p.object_reg, xp)
        windows_den = forward.gather(s, batch, den)
        pnums, u = [], []
        for m, part in enumerate(parts):
            pnum = forward.object_numerator(s, part, probes)
            if m == 0:
                pass_end.estimate_shifts(s, batch, objs[0], pnum, illum, refine)
            num = forward.box_zeros(s, batch, xp.complex64)
            forward.scatter(s, batch, pnum, num)
            u.append(
                forward.batch_exit_waves(s, forward.gather(s, batch, num) / windows_den, probes)
            )
            pnums.append(pnum)
        v = d_probe = None
        if update_probe:
            d_probe, oden = forward.probe_sums_over_modes(s, objs, parts, ramp)
            d_probe /= regularised(oden, p.probe_reg, xp)
            # The probe step as each position sees it: shifted by its fraction.
            seen = (
                d_probe[None]
                if ramp is None
                else forward.shift_modes(s, fft2(d_probe, xp=xp), ramp, False)
            )
            v = xp.concatenate([o[:, None] * seen for o in objs], axis=1)
        alpha_o, alpha_p = optimal_steps(xp.concatenate(u, axis=1), v, chi, LSQ_STEP_REG, xp)
        del u, v, chi, parts
        weights = (s.object_step * alpha_o).astype(xp.float32)[:, None, None]
        for m, pnum in enumerate(pnums):
            num = forward.box_zeros(s, batch, xp.complex64)
            pnum *= weights
            forward.scatter(s, batch, pnum, num)
            num /= den
            s._objects[m][batch.box_slices] += num
        if update_probe:
            d_probe *= (s.probe_step * xp.mean(alpha_p)).astype(xp.float32)
            s._probes += d_probe

    def _fused_batch(self, job: forward.BatchJob) -> None:
        """:meth:`batch` (Gaussian noise) in fused kernels: the directions' sums, the
        step-length sums and the weighted object sums are one pass each over the batch."""
        s, batch, probes, table, err = job.s, job.batch, job.probes, job.ramp, job.err
        update_probe = job.update_probe
        p = s.params
        floor = max(p.modulus_floor, 1e-12)
        chi, acc = forward.fused_sums(s, batch, probes, update_probe, floor, err)
        # den is regularised where it is read (the step sums and the object update).
        num, den, den_max, reg = acc.num, acc.den, acc.den_max, p.object_reg
        d_probe = seen = None
        if update_probe:
            d_probe = forward.probe_update_terms(s, acc, table)
            divide_regularised(d_probe, acc.oden, p.probe_reg, acc.oden_max)
            del acc  # the per-position probe terms: free them before the step sums
            # The probe step as each position sees it: shifted by its fraction.
            seen = (
                d_probe
                if table is None
                else forward.shift_modes(s, forward.fft(s, d_probe.copy()), table, True)
            )
        sums = lsqml_step_sums(
            chi,
            probes,
            seen,
            s._object,
            num,
            den,
            batch.corners,
            batch.origin,
            reg,
            den_max,
            box=batch.box,
        )
        del seen
        weights, probe_scale = lsqml_steps(
            sums, LSQ_STEP_REG, s.object_step, s.probe_step, update_probe
        )
        add_window_ratio(
            s._object,
            chi,
            probes,
            batch.corners,
            den,
            box=batch.box,
            weights=weights,
            reg=reg,
            den_max=den_max,
        )
        del chi
        if d_probe is not None:
            add_scaled(s._probes, d_probe, probe_scale)
