"""The difference map (Thibault et al. 2008/2009): exit waves stored per position and
mode (in Fourier space), object and probe from the summed illumination once per
pass, and a relaxed Fourier projection (``dm_fourier_relax``) that keeps it from
wandering on noisy data.

The stored waves live on the solver (they are counted in its memory and mixed
when the probe modes are orthogonalised); a pass runs as the reference xp
expressions or with fused CUDA kernels per batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.recon import _fft_lines as fft_lines
from hxn_liveptycho.recon import forward
from hxn_liveptycho.recon._batch import (
    Batch,
    grow,
)
from hxn_liveptycho.recon._exit_waves import (
    scaled_copy,
)
from hxn_liveptycho.recon._fourier_steps import (
    dm_fourier_step,
)
from hxn_liveptycho.recon._positions import (
    unshift_sum,
)
from hxn_liveptycho.recon._update_sums import (
    ObjectSums,
    add_probe_terms,
    object_sums,
    probe_terms_with_power,
)
from hxn_liveptycho.recon.backend import (
    ifft2,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver


class DifferenceMap:
    """A DM pass on a :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`'s state."""

    def prepare(self, s: StreamingSolver) -> None:
        """Make room for all active positions' exit waves and start new ones at P O_j."""
        xp, n = s._xp, s._n
        k = s._probes.shape[0] * s._objects.shape[0]  # a wave per probe-object pair
        if s._dm_waves is None:
            # Sized like the frame buffer (the memory check of add() counted it).
            s._dm_waves = xp.zeros((s._amps.shape[0], k, n, n), dtype=xp.complex64)
        s._dm_waves = grow(s._dm_waves, s._n_active, xp)
        new = np.arange(s._dm_ready, s._n_active)
        for start, batch in zip(
            range(s._dm_ready, s._n_active, s.params.batch_size),
            forward.batches(s, new),
            strict=True,
        ):
            probes = forward.batch_probes(s, batch, s._fused)[0]
            stop = start + int(batch.rows.shape[0])
            s._dm_waves[start:stop] = forward.exit_wave_spectra(s, batch, probes)
        s._dm_ready = s._n_active

    def _fourier_factor(self, s: StreamingSolver, inten: Any, amps: Any) -> Any:
        """Far-field scale (B, n, n) of the relaxed modulus projection of waves of ``inten``.

        Frames whose amplitude mismatch ``sum (|R| - A)^2`` is within
        ``dm_fourier_relax^2 sum A^2`` are left as they are; the others are moved
        onto that ball around the measurement (ptypy's noise-tolerant
        projection): ``|R| -> A + (|R| - A) sqrt(bound / mismatch)``.
        """
        xp, relax = s._xp, s.params.dm_fourier_relax
        mag = xp.sqrt(xp.maximum(inten, max(s.params.modulus_floor, 1e-24)))
        dev = mag - amps
        if s._valid is not None:
            dev *= s._valid
        if relax > 0:
            mis = xp.sum(dev * dev, axis=(-2, -1), keepdims=True)
            bound = relax**2 * xp.sum(amps * amps, axis=(-2, -1), keepdims=True)
            keep = xp.sqrt(xp.minimum(bound / xp.maximum(mis, 1e-30), 1.0))
            dev *= 1.0 - keep  # the part of the deviation that is removed
        return (mag - dev) / mag

    def run_pass(self, s: StreamingSolver, update_probe: bool) -> Any:
        """One difference-map iteration over all positions; returns the squared error.

        Per position: phi = P O_j (the overlap projection of the stored waves,
        held by the current O, P); psi <- psi + beta [P_F(2 phi - psi) - phi],
        done in Fourier space where psi is stored. The new exit waves then
        give the overlap update from the summed illumination: the object
        first, then the probe from the new object (one alternating step).
        The Fourier step is the relaxed projection of :meth:`_fourier_factor`.
        """
        xp, p = s._xp, s.params
        self.prepare(s)
        waves = s._dm_waves
        assert waves is not None, "prepare() makes the stored waves"
        # One numerator per object mode (the fused path has one mode: its first).
        onum = xp.zeros(s._objects.shape, dtype=xp.complex64)
        oden = xp.zeros(s._shape, dtype=xp.float32)
        # Fused: each position's error sums in a row of this, added up once for the pass.
        sums = xp.zeros((s._n_active, 3), dtype=xp.float32) if s._fused else None
        err = xp.zeros((), dtype=xp.float32) if sums is None else None
        batches = forward.batches(s, np.arange(s._n_active))
        starts = range(0, s._n_active, p.batch_size)
        for start, batch in zip(starts, batches, strict=True):
            stop = start + int(batch.rows.shape[0])
            probes, _ = forward.batch_probes(s, batch, s._fused)
            if sums is not None:
                self._fused_batch(
                    s, batch, probes, waves[start:stop], onum[0], oden, sums[start:stop]
                )
                continue
            objs = forward.object_windows(s, batch)
            amps = s._amps[start:stop]
            phi, _, e = forward.far_field(s, forward.all_exit_waves(s, objs, probes), amps)
            err = err + e
            old = waves[start:stop]
            refl = 2.0 * phi - old
            ri = xp.sum(refl.real**2 + refl.imag**2, axis=1, dtype=xp.float32)
            g = self._fourier_factor(s, ri, amps)
            refl *= g[:, None].astype(xp.float32)
            refl -= phi
            refl *= p.dm_beta
            refl += old
            waves[start:stop] = refl
            psi = ifft2(refl, xp=xp, overwrite_x=True)
            for num, part in zip(onum, forward.object_mode_blocks(s, psi), strict=True):
                forward.scatter(
                    s, batch, forward.object_numerator(s, part, probes), num, whole=True
                )
            forward.scatter(s, batch, forward.probe_intensity(s, probes), oden, whole=True)
        if sums is not None:
            err = xp.sum(sums[:, 2])
        s._ranks.sum(onum, oden)  # several ranks: the overlap sums of every position
        # O = (onum + d O_old) / (oden + d), in place (no canvas-sized temporaries).
        d = (p.object_reg * xp.max(oden) + 1e-30).astype(xp.float32)
        oden += d
        s._objects *= d
        s._objects += onum
        s._objects /= oden
        del onum, oden
        if update_probe and s._fused:
            pnum, pden = self._fused_probe_sums(s, batches)
        elif update_probe:
            # The probe from the same waves and the NEW object (one alternating step of the
            # overlap projection; updating both from the old pair oscillates).
            pnum = xp.zeros_like(s._probes)
            pden = xp.zeros((s._n, s._n), dtype=xp.float32)
            for start, batch in zip(starts, batches, strict=True):
                stop = start + int(batch.rows.shape[0])
                ramp = forward.batch_ramp(s, batch) if s._subpixel else None
                psi = forward.object_mode_blocks(s, ifft2(waves[start:stop], xp=xp))
                for obj, part in zip(forward.object_windows(s, batch), psi, strict=True):
                    pnum += forward.probe_numerator(s, obj, part, ramp)
                    ointen = obj.real**2 + obj.imag**2
                    if ramp is None:
                        pden += xp.sum(ointen, axis=0)
                    else:  # DM's probe is a projection, not a step: its weights shift too
                        pden += unshift_sum(ointen[:, None], ramp, xp)[0].real
        if update_probe:
            s._ranks.sum(pnum, pden)
            d = p.probe_reg * xp.max(pden) + 1e-30
            s._probes = ((pnum + d * s._probes) / (pden + d)).astype(xp.complex64)
        return err

    def _fused_batch(
        self,
        s: StreamingSolver,
        batch: Batch,
        probes: Any,
        waves: Any,
        onum: Any,
        oden: Any,
        sums: Any,
    ) -> None:
        """DM's Fourier step and overlap sums for ``batch`` in fused kernels; ``waves``: the
        batch's stored exit waves (updated in place); ``sums``: the batch's rows of the
        pass's error sums (``dm_fourier_step``)."""
        p = s.params
        phi = forward.exit_wave_spectra(s, batch, probes)
        dm_fourier_step(
            phi,
            waves,
            s._amps,
            batch.rows,
            s._valid_f32,
            p.dm_fourier_relax,
            p.dm_beta,
            s._n**-2,
            sums,
            floor=max(p.modulus_floor, 1e-24),
        )
        psi = forward.ifft_unscaled(s, phi)
        object_sums(psi, probes, s._object, batch.corners, ObjectSums(onum, oden), box=batch.box)

    def _fused_probe_sums(self, s: StreamingSolver, batches: list[Batch]) -> tuple[Any, Any]:
        """DM's probe numerator (K, n, n) and weights (n, n) from the stored waves and the
        current object, in fused kernels. With sub-pixel shifts the terms ``conj(O) psi_k``
        and ``|O|^2`` are shifted back together and summed in Fourier space over all
        batches, with one inverse FFT at the end."""
        xp, n, k = s._xp, s._n, s._probes.shape[0]
        waves = s._dm_waves
        assert waves is not None, "prepare() makes the stored waves"
        pnum = xp.zeros_like(s._probes)
        pden = xp.zeros((n, n), dtype=xp.float32)
        spectra = xp.zeros((k + 1, n, n), dtype=xp.complex64) if s._subpixel else None
        start = 0
        for batch in batches:
            stop = start + int(batch.rows.shape[0])
            if s._lines:  # the scaled copy is the first pass's read
                psi = fft_lines.scaled_ifft2_unscaled(waves[start:stop], n**-2)
            else:
                psi = forward.ifft_unscaled(s, scaled_copy(waves[start:stop], n**-2))
            start = stop
            if spectra is None:
                add_probe_terms(psi, s._object, batch.corners, into=pnum, power=pden)
                continue
            terms = probe_terms_with_power(psi, s._probes, s._object, batch.corners)
            forward.unshifted_sum(s, terms, batch.table, out=spectra)
        if spectra is not None:
            both = forward.ifft_unscaled(s, spectra)
            pnum, pden = both[:k], xp.ascontiguousarray(both[k].real)
        return pnum, pden
