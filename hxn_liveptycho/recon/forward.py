"""The steps every algorithm shares: windows of the object, exit waves, far fields and
the modulus constraint, sub-pixel probe shifts, and the sums an update divides.

Functions of the solver's state (:class:`~hxn_liveptycho.recon.iterative.StreamingSolver`
holds the arrays; these read them and return new ones), each with its reference xp
expression and, where one exists, the fused kernel beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_liveptycho.recon import _fft_lines as fft_lines
from hxn_liveptycho.recon._batch import Batch, Sums
from hxn_liveptycho.recon._exit_waves import (
    exit_waves,
    ramp_table,
    shift_spectra,
    unshift_sum_spectra,
)
from hxn_liveptycho.recon._fourier_steps import (
    modulus_residual,
)
from hxn_liveptycho.recon._positions import (
    fraction_ramps,
    shifted_probes,
    unshift_sum,
)
from hxn_liveptycho.recon._raw_kernels import SLOT_FLOATS, max_slots
from hxn_liveptycho.recon._update_sums import (
    ObjectSums,
    object_sums,
    object_sums_and_probe_sum,
    object_sums_and_probe_terms,
)
from hxn_liveptycho.recon._windows import gather_windows, scatter_add_windows
from hxn_liveptycho.recon.backend import (
    fft2,
    ifft2,
    ifft2_unscaled,
)

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver


def gather(s: StreamingSolver, batch: Batch, canvas: Any | None = None) -> Any:
    """Windows (B, n, n) of the object, or of a ``canvas`` covering the batch's box."""
    if canvas is None:
        return gather_windows(s._object, batch.corners, s._n, s._xp)
    return gather_windows(canvas, batch.corners, s._n, s._xp, batch.origin)


def scatter(
    s: StreamingSolver, batch: Batch, values: Any, canvas: Any, *, whole: bool = False
) -> None:
    """Add windows ``values`` ((B, n, n), or one (n, n) for all) onto ``canvas`` in
    place: an array covering the batch's box, or (``whole``) the whole canvas."""
    origin = (0, 0) if whole else batch.origin
    scatter_add_windows(canvas, batch.corners, values, s._xp, origin)


def box_zeros(s: StreamingSolver, batch: Batch, dtype: Any) -> Any:
    return s._xp.zeros(batch.box_shape, dtype=dtype)


def batch_probes(s: StreamingSolver, batch: Batch, fused: bool) -> tuple[Any, Any | None]:
    """``(probes, shift)`` for the positions of ``batch``: the modes shifted by each
    position's sub-pixel fraction (B, K, n, n) and the shift that did it (the ramps
    (B, n, n); with ``fused``, the separable ramp table (B, 2, n) of the fused
    kernels); on whole-pixel data the shared modes (K, n, n) and None. With OPR
    (:mod:`~hxn_liveptycho.recon.opr`) each position's own probes, never fused."""
    if s._opr is not None:
        return s._opr.batch_probes(s, batch)
    if not s._subpixel:
        return s._probes, None
    xp = s._xp
    shift = batch.table if fused else batch_ramp(s, batch)
    spectra = fft(s, s._probes.copy()) if fused else fft2(s._probes, xp=xp)
    return shift_modes(s, spectra, shift, fused), shift


def shift_modes(s: StreamingSolver, modes_ft: Any, shift: Any, fused: bool) -> Any:
    """Modes given by their spectra (K, n, n), shifted per position: (B, K, n, n)."""
    if fused and s._lines:
        return fft_lines.shifted_modes(modes_ft, shift, 1.0 / s._n**2)
    if fused:
        spectra = shift_spectra(modes_ft, shift, 1.0 / s._n**2)
        return ifft_unscaled(s, spectra)
    return shifted_probes(modes_ft, shift, s._xp)


def fft(s: StreamingSolver, x: Any) -> Any:
    """Fused path: unnormalised forward FFT of ``x`` (consumed)."""
    return fft_lines.fft2(x) if s._lines else fft2(x, xp=s._xp, overwrite_x=True)


def ifft_unscaled(s: StreamingSolver, x: Any) -> Any:
    """Fused path: ``n² ifft2`` of ``x`` (consumed)."""
    if s._lines:
        return fft_lines.ifft2_unscaled(x)
    return ifft2_unscaled(x, xp=s._xp, overwrite_x=True)


def probe_update_terms(s: StreamingSolver, sums: Sums, table: Any | None) -> Any:
    """Fused path: ``sum_j shift_{-f_j}(terms_j)`` (C, n, n) of the batch's probe terms;
    on whole-pixel data :func:`fused_sums` already summed them."""
    if table is None:
        return sums.terms_sum
    return probe_from_terms(s, sums.terms, table)


def probe_from_terms(s: StreamingSolver, terms: Any, table: Any) -> Any:
    """Fused path: ``sum_j shift_{-f_j}(terms_j)`` (C, n, n) of per-position probe terms
    (B, C, n, n) (:func:`fused_sums`)."""
    return ifft_unscaled(s, unshifted_sum(s, terms, table))


def unshifted_sum(s: StreamingSolver, terms: Any, table: Any, out: Any | None = None) -> Any:
    """Fused path: ``sum_j fft2(terms_j) conj(ramp_j) / n²`` (C, n, n), added into
    ``out`` when given; ``terms`` (B, C, n, n) is consumed."""
    if s._lines:
        return fft_lines.unshift_sum(terms, table, s._n**-2, out=out)
    spectra = unshift_sum_spectra(fft(s, terms), table, s._n**-2)
    if out is None:
        return spectra
    out += spectra
    return out


def batch_fractions(s: StreamingSolver, batch: Batch) -> Any:
    """Sub-pixel parts (B, 2) of ``batch``'s positions: what the probe is shifted by."""
    pos = s._pos[batch.rows]
    return pos - s._xp.floor(pos)


def batch_ramp(s: StreamingSolver, batch: Batch) -> Any:
    """Phase ramps (B, n, n) shifting the probe by the fractions of ``batch``'s positions."""
    return fraction_ramps(batch_fractions(s, batch), s._n, s._xp)


def mode(probes: Any, k: int) -> Any:
    """Mode ``k`` of shared (K, n, n) or per-position (B, K, n, n) probes."""
    return probes[:, k] if probes.ndim == 4 else probes[k]


def exit_wave_spectra(s: StreamingSolver, batch: Batch, probes: Any) -> Any:
    """Far fields (B, K, n, n), unnormalised, of ``batch``'s exit waves (DM's start):
    fused, read from the canvas; otherwise from the gathered windows."""
    if s._lines:
        return fft_lines.exit_wave_spectra(s._object, batch.corners, probes)
    if s._fused:
        psi = exit_waves(s._object, batch.corners, probes)
    else:
        psi = all_exit_waves(s, object_windows(s, batch), probes)
    return fft2(psi, xp=s._xp, overwrite_x=True)


def object_windows(s: StreamingSolver, batch: Batch) -> list[Any]:
    """Windows (B, n, n) of every object mode at ``batch``'s positions."""
    return [gather_windows(o, batch.corners, s._n, s._xp) for o in s._objects]


def all_exit_waves(s: StreamingSolver, objs: list[Any], probes: Any) -> Any:
    """Exit waves (B, M K, n, n) of every object mode's windows ``objs`` with every probe
    mode, object mode by object mode (mode m's waves at ``[:, m K : (m + 1) K]``)."""
    if len(objs) == 1:
        return batch_exit_waves(s, objs[0], probes)
    return s._xp.concatenate([batch_exit_waves(s, o, probes) for o in objs], axis=1)


def object_mode_blocks(s: StreamingSolver, waves: Any) -> list[Any]:
    """Views (B, K, n, n) of waves (B, M K, n, n) laid out as :func:`all_exit_waves`
    lays them out: object mode m's waves with every probe mode."""
    k = waves.shape[1] // s._objects.shape[0]
    return [waves[:, m * k : (m + 1) * k] for m in range(s._objects.shape[0])]


def probe_sums_over_modes(
    s: StreamingSolver, objs: list[Any], parts: list[Any], shift: Any | None
) -> tuple[Any, Any]:
    """``(sum_m probe numerator of (O_m, parts_m), sum_m sum_j |O_mj|^2)``: the probe's
    gradient and weights over every object mode's windows ``objs`` and waves."""
    num = probe_numerator(s, objs[0], parts[0], shift)
    den = object_power(s, objs[0])
    for obj, part in zip(objs[1:], parts[1:], strict=True):
        num += probe_numerator(s, obj, part, shift)
        den += object_power(s, obj)
    return num, den


def batch_exit_waves(s: StreamingSolver, obj: Any, probes: Any) -> Any:
    """Exit waves (B, K, n, n) of object windows ``obj`` (B, n, n) and the probe modes
    ``probes`` ((K, n, n) shared or (B, K, n, n) per position)."""
    return obj[:, None] * (probes if probes.ndim == 4 else probes[None])


def far_field(s: StreamingSolver, psi: Any, amps: Any) -> tuple[Any, Any, Any]:
    """``(Psi, I, err)``: far fields (B, K, n, n) of ``psi`` (consumed), model intensity
    ``sum_k |Psi_k|^2`` (B, n, n) and the squared amplitude error against ``amps``."""
    xp = s._xp
    f = fft2(psi, xp=xp, overwrite_x=True)
    inten = xp.sum(f.real**2 + f.imag**2, axis=1, dtype=xp.float32)
    diff = xp.sqrt(inten) - amps
    if s._valid is not None:
        diff *= s._valid
    err = xp.vdot(diff.ravel(), diff.ravel())
    return f, inten, err


def state_error_sum(s: StreamingSolver) -> Any:
    """Squared amplitude error (0-d float32) of the object and probe modes the solver holds
    now, over every active position: the forward model of a pass (sub-pixel probe
    shifts, every object and probe mode, valid pixels), batch by batch, nothing updated.

    A pass's own error is summed batch by batch before each batch's update and before
    the pass's end (momentum, gauge, clamp), so it describes no state the solver ever
    held; this one describes the state it returns. The reference xp expressions on
    either array module: an occasional evaluation, not worth a kernel of its own."""
    xp = s._xp
    err = xp.zeros((), dtype=xp.float32)
    for batch in batches(s, np.arange(s._n_active)):
        probes, _ = batch_probes(s, batch, fused=False)
        psi = all_exit_waves(s, object_windows(s, batch), probes)
        err += far_field(s, psi, s._amps[batch.rows])[2]
    return err


def fourier_residual(s: StreamingSolver, psi: Any, amps: Any) -> tuple[Any, Any]:
    """Exit-wave correction ``P_F(psi) - psi`` (B, K, n, n) and the squared error of ``psi``.

    ``P_F`` scales every mode's far field by ``A / sqrt(sum_k |Psi_k|^2)``
    (the mixed-state modulus constraint; the sum floored at ``modulus_floor``). Computed as
    ``ifft2(Psi * (A/|Psi| - 1))``, so ``psi`` (consumed: its memory is
    reused) need not be kept.
    """
    xp = s._xp
    f, inten, err = far_field(s, psi, amps)
    xp.maximum(inten, max(s.params.modulus_floor, 1e-24), out=inten)
    xp.sqrt(inten, out=inten)
    xp.divide(amps, inten, out=inten)
    inten -= 1.0
    if s._valid is not None:
        inten *= s._valid
    f *= inten[:, None]
    return ifft2(f, xp=xp, overwrite_x=True), err


def probe_intensity(s: StreamingSolver, probes: Any | None = None) -> Any:
    """``sum_k |P_k|^2``: (n, n) float32 for shared modes, (B, n, n) for per-position ones."""
    p = s._probes if probes is None else probes
    return (p.real**2 + p.imag**2).sum(axis=-3).astype(s._xp.float32)


def object_numerator(s: StreamingSolver, dpsi: Any, probes: Any) -> Any:
    """``sum_k conj(P_k) dpsi_k`` (B, n, n) for exit-wave changes ``dpsi`` (B, K, n, n)."""
    xp = s._xp
    out = xp.conj(mode(probes, 0)) * dpsi[:, 0]
    for k in range(1, dpsi.shape[1]):
        out += xp.conj(mode(probes, k)) * dpsi[:, k]
    return out


def probe_numerator(s: StreamingSolver, obj: Any, dpsi: Any, shift: Any | None) -> Any:
    """``sum_j shift_{-f_j}(conj(O_j) dpsi_jk)`` (K, n, n): the probe gradient, each
    position's part shifted back by its fraction (none on whole-pixel data). ``shift``:
    ramps (B, n, n) or None."""
    xp = s._xp
    oc = xp.conj(obj)
    if shift is not None:
        return unshift_sum(oc[:, None] * dpsi, shift, xp)
    return xp.stack([xp.sum(oc * dpsi[:, k], axis=0) for k in range(dpsi.shape[1])])


def object_power(s: StreamingSolver, obj: Any) -> Any:
    """``sum_j |O_j|^2`` (n, n) float32 over the batch's windows."""
    return s._xp.sum(obj.real**2 + obj.imag**2, axis=0)


def fused_sums(
    s: StreamingSolver, batch: Batch, probes: Any, update_probe: bool, floor: float, err: Any
) -> tuple[Any, Sums]:
    """The common start of fused ePIE and LSQ-ML: the exit-wave update ``dpsi`` (the
    modulus residual, intensity floored at ``floor``; its squared error added into
    ``err``) and, in one pass over it, the object sums on the batch's box and, with
    ``update_probe``, the probe terms and ``sum |O|^2``. Returns ``(dpsi, sums)``."""
    xp, n = s._xp, s._n
    valid = s._valid_f32
    if s._lines and fft_lines.supports(n, probes.shape[-3]):
        dpsi = fft_lines.modulus_update(
            s._object,
            batch.corners,
            probes,
            s._amps,
            batch.rows,
            valid,
            floor,
            n**-2,
            err=err,
        )[1]
    else:
        f = fft2(exit_waves(s._object, batch.corners, probes), xp=xp, overwrite_x=True)
        modulus_residual(f, s._amps, batch.rows, valid, floor, n**-2, err=err)
        dpsi = ifft2_unscaled(f, xp=xp, overwrite_x=True)
    whole = batch.table is None
    num, den, oden, den_max, oden_max, summed = fused_accumulators(
        s, batch, update_probe, probes.shape[-3] if update_probe and whole else 0
    )
    args = (dpsi, probes, s._object, batch.corners, ObjectSums(num, den, batch.origin, den_max))
    terms = None
    if not update_probe:
        object_sums(*args, box=batch.box, overwrite=True)
    elif whole:
        # The object sums gathered by tile, then the probe-side sums in a pass of their
        # own, beat one pass of atomics with one mode; with three they tie and whole
        # iterations were as fast or faster.
        object_sums_and_probe_sum(
            *args, into=summed, power=oden, power_max=oden_max, box=batch.box, overwrite=True
        )
    else:
        # Per-position probe terms (sub-pixel): one read of dpsi with atomics beat two.
        terms = object_sums_and_probe_terms(*args, power=oden, power_max=oden_max, overwrite=True)
    return dpsi, Sums(num, den, oden, den_max, oden_max, terms, summed)


def fused_accumulators(
    s: StreamingSolver, batch: Batch, update_probe: bool, summed_modes: int
) -> tuple[Any, ...]:
    """``(num, den, oden, den_max, oden_max, summed)`` for :func:`fused_sums`: the
    object sums on the batch's box (not zeroed: the sums overwrite them), and
    as views of one zeroed buffer (kept for the next batch of the kind, zeroed by one
    memset per batch) the object power (n, n)
    (None without ``update_probe``), the maximum slots of both
    (:func:`~hxn_liveptycho.recon._raw_kernels.max_slots`; with no object power, the maximum
    of nothing lands in an unused slot set) and, for ``summed_modes`` > 0, the probe
    terms summed over the batch (K, n, n) (else None)."""
    xp, n = s._xp, s._n
    num = xp.empty(batch.box_shape, dtype=xp.complex64)
    den = xp.empty(batch.box_shape, dtype=xp.float32)
    key = (update_probe, summed_modes)
    if key not in s._batch_sums:
        slots = SLOT_FLOATS
        power = n * n if update_probe else 0
        terms = 2 * summed_modes * n * n
        buffer = xp.zeros(terms + slots + power + slots, dtype=xp.float32)
        summed = buffer[:terms].view(xp.complex64).reshape(-1, n, n) if terms else None
        den_max = max_slots(buffer[terms:])
        rest = buffer[terms + slots :]
        oden = rest[:power].reshape(n, n) if update_probe else None
        oden_max = max_slots(rest[power:])
        s._batch_sums[key] = (buffer, oden, den_max, oden_max, summed)
    else:  # the last batch's readers come first in the stream's order
        s._batch_sums[key][0].fill(0)
    _, oden, den_max, oden_max, summed = s._batch_sums[key]
    return num, den, oden, den_max, oden_max, summed


def batches(s: StreamingSolver, order: np.ndarray) -> list[Batch]:
    """The active-set rows ``order`` in batches of ``params.batch_size``.

    Window corners come from the host copy of the positions: one upload of
    rows and corners per pass, none per batch (a per-batch upload would
    wait for the GPU's queue to drain).
    """
    xp, n, size = s._xp, s._n, s.params.batch_size
    whole = np.floor if s._subpixel else np.rint
    corners = whole(s._pos_host[order]).astype(np.int32)
    rows = xp.asarray(order.astype(np.int64))
    dev_corners = xp.asarray(corners)
    table = None
    if s._fused and s._subpixel:  # the fractions' ramps, one launch for the pass
        fractions = (s._pos_host[order] - corners).astype(np.float32)
        table = ramp_table(xp.asarray(fractions), n)
    batches = []
    for start in range(0, len(order), size):
        c = corners[start : start + size]
        lo, hi = c.min(axis=0), c.max(axis=0) + n
        box = (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
        part = slice(start, start + size)
        batches.append(
            Batch(rows[part], dev_corners[part], box, None if table is None else table[part])
        )
    return batches


@dataclass(frozen=True, slots=True)
class BatchJob:
    """One batch as an algorithm's paths take it: the solver, the positions, the
    batch's probes (shifted per position with sub-pixel positions) and the shift that
    did it (the ramps, or with the fused kernels their table; None without a shift),
    whether this step updates the probe and estimates position shifts, and the 0-d
    squared-error sum it adds into in place."""

    s: StreamingSolver
    batch: Batch
    update_probe: bool
    refine: bool
    err: Any
    probes: Any = None
    ramp: Any | None = None


class BatchPaths:
    """An algorithm's batch, run one of three ways, side by side in its class: with several
    object modes (the reference expressions over every pair of modes), in fused CUDA
    kernels, or as the reference xp expressions (NumPy, and CuPy with ``fused=False``).
    :meth:`batch` picks one; an algorithm writes the three and says when it may fuse."""

    def batch(
        self, s: StreamingSolver, batch: Batch, update_probe: bool, refine: bool, err: Any
    ) -> None:
        """One step on the positions of ``batch``; adds their squared error into ``err``
        (0-d, in place)."""
        if s._objects.shape[0] > 1:
            self._object_modes_batch(BatchJob(s, batch, update_probe, refine, err))
            return
        fused = s._fused and self._fusable(s, refine)
        probes, ramp = batch_probes(s, batch, fused)
        job = BatchJob(s, batch, update_probe, refine, err, probes, ramp)
        if fused:
            self._fused_batch(job)
        else:
            self._reference_batch(job)

    def _fusable(self, s: StreamingSolver, refine: bool) -> bool:
        """Whether the fused kernels may take this batch on a solver that fuses: not while
        positions are refined, which needs the object numerator itself."""
        return not refine

    def _object_modes_batch(self, job: BatchJob) -> None:
        """The batch with several object modes (its probes are not shifted yet)."""
        raise NotImplementedError

    def _fused_batch(self, job: BatchJob) -> None:
        """The batch in fused kernels (``job.ramp`` is the ramp table)."""
        raise NotImplementedError

    def _reference_batch(self, job: BatchJob) -> None:
        """The batch as the reference xp expressions."""
        raise NotImplementedError
