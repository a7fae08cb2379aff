"""How much memory an iterative reconstruction needs, and what the device has free.

The solver calls :func:`check_fits` at construction (for the expected scan
size) and before every buffer growth in ``add()``, so a scan that cannot fit
is refused with a :class:`~hxn_liveptycho.errors.ConfigurationError` naming
both byte counts, never run into an out-of-memory crash half-way.

The estimate is computed from the arrays the solver holds and the arrays its
steps allocate, counted from the step code, not fitted to measurements.
Terms of :func:`estimate_terms` (bytes; ``N`` positions, ``n`` the window,
``K`` probe modes, ``M`` object modes, ``B = min(batch_size, N)``, ``H x W``
the canvas):

* ``frames``: the measured amplitudes, float32, ``4 N n^2``.
* ``positions``: current, measured and per-iteration shift, float64 (y, x),
  ``48 N`` (small).
* ``dm_exit_waves``: DM only (also as a stage of a schedule): one far-field
  exit wave per position and pair of probe and object mode, complex64, ``8 N K M n^2``.
* ``object``: the canvas, complex64, ``8 M H W``.
* ``probe``: the modes, complex64, ``8 K n^2``.
* ``momentum``: with ``IterativeParams.momentum_gain`` > 0 and ePIE or LSQ-ML
  among the algorithms, the previous object and probe and their velocities,
  ``2 x 8 (M H W + K n^2)``.
* ``opr``: with ``IterativeParams.opr_modes`` (the variable probe,
  :mod:`~hxn_liveptycho.recon.opr`), the weights, float32, ``4 N (opr_modes - 1)``
  (they grow by doubling, so they may hold up to twice the rows: a few bytes per
  position), and the variable eigen-probes, complex64, ``8 (opr_modes - 1) n^2``.
* ``canvas_temporaries``: the canvas-sized arrays of an update (a batch's box
  is at most the canvas): ePIE and LSQ-ML sum a batch's object numerator
  (complex64) and illumination (float32) on its box, and with several object
  modes zero the next mode's numerator while the last one is still bound
  (ePIE also keeps the step ``alpha / illumination``); DM sums every object
  mode's numerator and the illumination over the pass; the amplitude clamp
  (``object_amplitude_max``) takes ``|O|``, a mask and two factors per object
  mode at a pass's end. The largest of these.
* ``batch_temporaries``: the batch-sized arrays live at the peak of a batch
  (ePIE, LSQ-ML) or of DM's pass, the largest sum over the phases of the
  step (:func:`batch_phases` names them and their arrays), and three probe-sized
  arrays of the probe update (:data:`_PROBE_ARRAYS`). The arrays come in
  three sizes: an exit wave per position and probe mode ``(B, K, n, n)``
  complex64, a window per position ``(B, n, n)`` complex64 (object windows,
  ramps, numerators), and a real window ``(B, n, n)`` float32 (frames,
  intensities). Every expression's result counts as a new array, as CuPy
  allocates them: NumPy elides some temporaries of chained arithmetic, so
  there the count is an upper bound. CuPy's fused kernels (one object mode)
  allocate a subset of the reference path's arrays counted here. With OPR every
  batch's probes are per position ``(B, K, n, n)``, shifted or not, its batches make
  them and update the weights (two more phases), and two eigen-probe-sized arrays
  (:data:`_OPR_PASS_ARRAYS`) join the probe-sized ones.
* ``fft_work_area``: cuFFT's work area for a batched transform of
  ``(B, M K, n, n)`` complex64, about the size of the data it transforms
  (CuPy only; NumPy's pocketfft works in per-line buffers).

Not counted: index arrays of a pass (a few integers per position) and
:meth:`StreamingSolver.add`'s temporaries, the size of the chunk it is given
(frames as float32) plus, while a buffer grows, its old rows.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, ParamSpec

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon.backend import is_cupy

__all__ = [
    "available_bytes",
    "batch_phases",
    "check_fits",
    "estimate_bytes",
    "estimate_terms",
    "format_bytes",
]

_P = ParamSpec("_P")

#: The float32 windows LSQ-ML's far-field factor (``_lsqml.far_field_factor``) holds at
#: once with the Poisson model: the model intensity, its floored copy and the safe
#: divisor, the measured intensity, xi and its products with the intensity, the Newton
#: step's divisor and three transients of its sums. The Gaussian model holds fewer
#: (intensity, safe divisor, two transients); the estimate is not told the model.
_FACTOR_REALS = 11
#: Batch-sized windows of a position shift (``_positions.shift_gradient``): the previous
#: axis's gradient, ``numpy.gradient``'s output and its two difference temporaries.
_GRADIENT_WINDOWS = 4
#: Probe-sized (K, n, n) complex64 arrays beside a batch's peak: the probe update's
#: numerator and weights, and the modes' spectra or the update's transient.
_PROBE_ARRAYS = 3
#: Eigen-probe-sized (K - 1, n, n) complex64 arrays of OPR beside a batch's peak: the
#: pass's sum of the eigen-probes' step, and the pass end's copy of the eigen-probes.
_OPR_PASS_ARRAYS = 2
#: NumPy's ufunc buffers of a broadcast complex64 product (OPR's per-position probes and
#: weighted eigen-probes): two operands of ``numpy.getbufsize()`` elements, its default.
_BROADCAST_BUFFERS = 2 * 8 * 8192
#: Bytes per canvas pixel and object mode of the amplitude clamp: ``|O|`` (float32), the
#: mask ``|O| > max`` (bool), the floored ``|O|`` and the factor (float32 each).
_CLAMP_BYTES = 13


@dataclass(frozen=True)
class _Sizes:
    """Bytes of the arrays a batch's step allocates, and what decides which it makes."""

    wave: int  # (B, K, n, n) complex64: an exit wave per position and probe mode
    window: int  # (B, n, n) complex64: an object window, a ramp, a numerator
    real: int  # (B, n, n) float32: a frame, an intensity
    probe_modes: int
    object_modes: int
    subpixel: bool
    refine: bool
    opr: bool = False  # OPR: each position's own probes, unshifted too

    @property
    def per_position(self) -> bool:
        """Whether the batch's probes are per position (B, K, n, n): shifted, or OPR's."""
        return self.subpixel or self.opr

    @property
    def waves(self) -> int:
        """(B, M K, n, n): a wave per position and pair of probe and object mode."""
        return self.object_modes * self.wave

    @property
    def windows(self) -> int:
        """(B, n, n) per object mode: every mode's windows."""
        return self.object_modes * self.window

    @property
    def shifted(self) -> int:
        """The probe modes shifted per position (B, K, n, n) and their ramps (B, n, n);
        none on whole-pixel data (the batch shares the modes) unless OPR gives each
        position its own modes (no ramps then)."""
        return (self.wave if self.per_position else 0) + (self.window if self.subpixel else 0)

    @property
    def illumination(self) -> int:
        """``sum_k |P_k|^2``: a real window per position when the probes are per position."""
        return self.real if self.per_position else 0

    @property
    def illumination_parts(self) -> int:
        """``|P|^2`` of per-position probes: real and imaginary squares and their sum."""
        return 3 * self.wave // 2 if self.per_position else 0

    @property
    def far_field_parts(self) -> int:
        """``sum_k |Psi_k|^2`` of waves (B, M K, n, n): squares of both parts and their sum."""
        return 3 * self.waves // 2

    @property
    def object_numerator(self) -> int:
        """``sum_k conj(P_k) dpsi_k``: the sum, the conjugate of a shifted mode and the
        product added in (after the first mode)."""
        extra = (self.window if self.per_position else 0) + (
            self.window if self.probe_modes > 1 else 0
        )
        return self.window + extra

    @property
    def probe_numerator(self) -> int:
        """``sum_j conj(O_j) dpsi_j`` per mode: ``conj(O)`` and, shifted back per position,
        the products, their spectra and the ramps' conjugates; else one product."""
        if self.subpixel:
            return 2 * self.window + 2 * self.wave
        return 2 * self.window

    @property
    def shift_estimate(self) -> int:
        """Position refinement: the object numerator kept, the illumination and the
        gradients' windows; none without refinement."""
        if not self.refine:
            return 0
        return self.window + self.illumination + _GRADIENT_WINDOWS * self.window

    @property
    def opr_probes(self) -> int:
        """OPR's per-position probes being made (``VariableProbe.batch_probes``): the
        weighted eigen-probes and their sum with the main mode, then the modes (B, K, n, n)
        beside the main ones and, shifted, the ramps (the transforms are in place)."""
        if not self.opr:
            return 0
        made = self.wave + self.window + (self.window if self.subpixel else 0)
        return max(2 * self.window, made) + _BROADCAST_BUFFERS

    @property
    def opr_update(self) -> int:
        """OPR's update of its weights (``VariableProbe.update``), beside the batch's held
        arrays: the per-position probe update (a window) with ``conj(O)`` or, shifted,
        the ramps' conjugates (the transforms are in place); then ``|O|^2``'s parts (three
        real windows); then the divisor and each eigen-probe's weighted product (a window,
        broadcast)."""
        if not self.opr:
            return 0
        first = 2 * self.window + _BROADCAST_BUFFERS
        return max(
            first, self.window + 3 * self.real, 2 * self.window + self.real + _BROADCAST_BUFFERS
        )


def _epie(z: _Sizes) -> dict[str, int]:
    """Phases of ``Epie.batch`` (one object mode) and ``Epie._object_modes_batch``."""
    if z.object_modes == 1:
        # Held through the batch: shifted probes, the object windows, the exit waves
        # (the far field and the correction dpsi are them, transformed in place).
        held = z.shifted + z.window + z.wave
        return {
            # The batch's frames (a copy: gathered by row) and |Psi|^2's parts.
            "far field": held + z.real + z.far_field_parts,
            "probe numerator": held + z.probe_numerator,
            "object numerator": held + z.object_numerator,
            "illumination": held + z.window + z.illumination_parts,
            "position shift": held + z.shift_estimate,
            "variable probes": z.opr_probes,
            "variable probe update": held + z.opr_update if z.opr else 0,
        }
    held = z.shifted + z.windows + z.waves  # every object mode's windows and waves
    return {
        "exit waves": z.shifted + z.windows + 2 * z.waves,  # each mode's, and joined
        "far field": held + z.real + z.far_field_parts,
        "probe numerator": held + z.probe_numerator,
        "illumination": held + z.illumination_parts,
        # The last mode's numerator bound while the next is summed.
        "object numerator": held + z.illumination + z.window + z.object_numerator,
        "position shift": held + z.shift_estimate,
    }


def _lsqml(z: _Sizes) -> dict[str, int]:
    """Phases of ``LsqMl.batch`` (one object mode) and ``LsqMl._object_modes_batch``."""
    if z.object_modes == 1:
        start = z.shifted + z.window  # shifted probes, object windows
        # After the far field: chi (B, K, n, n), the object numerator and illumination.
        held = start + z.wave + z.window + z.illumination
        # Then the direction dO's windows and its exit waves u = P dO.
        directed = held + z.window + z.wave
        return {
            "far field": start + z.wave + z.real + z.far_field_parts,
            "far-field factor": start + z.wave + z.real + _FACTOR_REALS * z.real,
            "object numerator": start + z.wave + z.object_numerator,
            "illumination": start + z.wave + z.window + z.illumination_parts,
            "position shift": start + z.wave + z.shift_estimate,
            # The numerator's and illumination's windows and their quotient.
            "object direction": held + 2 * z.window + z.real,
            "probe numerator": directed + z.probe_numerator,
            # v = dP O: the probe step shifted per position, then times the windows.
            "probe direction": directed + (2 * z.wave if z.subpixel else z.wave),
            # u, v and chi held; each of the five dot products makes conj(a) and conj(a) b.
            "step lengths": directed + z.wave + 2 * z.wave,
        }
    start = z.shifted + z.windows
    # After the far field: chi (B, M K, n, n), the illumination and its windows.
    held = start + z.waves + z.illumination + z.real
    seen = z.wave if z.subpixel else 0  # the probe step shifted per position
    return {
        "exit waves": start + 2 * z.waves,
        "far field": start + z.waves + z.real + z.far_field_parts,
        "far-field factor": start + z.waves + z.real + _FACTOR_REALS * z.real,
        "illumination": start + z.waves + z.illumination_parts,
        # Object mode by mode: the numerators and waves u of the earlier modes, then the
        # last mode's numerator, its direction and its waves.
        "object directions": held + z.windows + z.window + z.waves,
        "object numerator": held + (z.windows - z.window) + (z.waves - z.wave) + z.object_numerator,
        "position shift": held - z.illumination + z.shift_estimate,
        "probe numerator": held + z.windows + z.waves + z.probe_numerator,
        # v: each object mode's windows times the probe step, and their concatenation.
        "probe direction": held + z.windows + z.waves + seen + 2 * z.waves,
        # u (its list and concatenation), v, the dot products' two transients.
        "step lengths": held + z.windows + 3 * z.waves + seen + 2 * z.waves,
    }


def _dm(z: _Sizes) -> dict[str, int]:
    """Phases of ``DifferenceMap.run_pass`` on its reference path. One function runs the
    whole pass, so each batch starts with the last batch's arrays still bound (windows,
    far fields phi, reflections, three real windows: intensity, reflection intensity
    and Fourier factor) until their names are bound again."""
    probes = z.wave if z.subpixel else 0  # the ramps are let go after the far field
    # Bound from the previous batch: windows, phi, and the previous reflection (kept
    # by the name of its inverse transform) with three real windows.
    last = z.windows + 2 * z.waves + 3 * z.real
    ramp_or_intensity = z.window if z.subpixel else z.real
    phases = {
        "shifted probes": last + 2 * probes + (z.window if z.subpixel else 0),
        "far field": probes + last - z.real + ramp_or_intensity + z.waves + z.far_field_parts,
        "reflection": probes + last + 2 * z.waves,  # 2 phi and 2 phi - psi
        "reflection intensity": probes + last + z.waves + z.far_field_parts,
        # |R|, its deviation from the frame and two transients of the factor.
        "Fourier factor": probes + last + z.waves + 4 * z.real,
        "object numerator": probes + last + z.object_numerator,
        "illumination": probes + last + z.illumination_parts,
    }
    # The probe update, after the loop: its last phi and reflection still bound, the
    # ramps, the stored waves' inverse transform and the previous |O|^2. The last
    # batch's transform and window stay bound (by the names of a mode's block and
    # window) until the loop over the next batch's new windows starts.
    after = probes + last + (z.window if z.subpixel else 0) + z.waves + z.real
    phases["probe-update windows"] = after + z.waves + z.window + z.windows
    phases["probe numerator"] = after + z.windows + z.probe_numerator
    return phases


_PHASES: dict[str, Callable[[_Sizes], dict[str, int]]] = {
    "epie": _epie,
    "lsqml": _lsqml,
    "dm": _dm,
}


def _algorithms(algorithm: str | Iterable[str]) -> set[str]:
    names = {algorithm} if isinstance(algorithm, str) else set(algorithm)
    unknown = names - set(_PHASES)
    if unknown or not names:
        raise ValueError(f"unknown algorithm(s) {sorted(unknown)}; use 'epie', 'dm' or 'lsqml'")
    return names


def batch_phases(
    algorithm: str,
    window: int,
    probe_modes: int,
    batch: int,
    *,
    subpixel: bool = True,
    position_refinement: bool = False,
    object_modes: int = 1,
    opr: bool = False,
) -> dict[str, int]:
    """Bytes of the batch-sized arrays live in each phase of ``algorithm``'s step with
    ``batch`` positions (its largest is the ``batch_temporaries`` term): each phase's
    count names its arrays in this module's source. ``opr``: the variable probe
    (ePIE only), whose batches make each position's own probes and update its weights."""
    n, b = int(window), int(batch)
    refine = bool(position_refinement)
    sizes = _Sizes(
        wave=8 * b * int(probe_modes) * n * n,
        window=8 * b * n * n,
        real=4 * b * n * n,
        probe_modes=int(probe_modes),
        object_modes=int(object_modes),
        # Refinement shifts the probes by the fractions it finds.
        subpixel=bool(subpixel) or refine,
        refine=refine,
        opr=bool(opr),
    )
    return _PHASES[algorithm](sizes)


def _canvas_temporaries(names: set[str], object_modes: int, pixels: int) -> int:
    """Bytes of the canvas-sized temporaries (the module docstring names them)."""
    m = object_modes
    per_pixel = [_CLAMP_BYTES * m]
    if names & {"epie", "lsqml"}:
        numerators = 8 * (2 if m > 1 else 1)  # the next mode's zeroed while the last is bound
        step = 4 if m > 1 and "epie" in names else 0  # ePIE's alpha / illumination
        per_pixel.append(numerators + 4 + step)
    if "dm" in names:
        per_pixel.append(8 * m + 4)
    return max(per_pixel) * pixels


def estimate_terms(
    n_positions: int,
    window: int,
    probe_modes: int,
    algorithm: str | Iterable[str],
    canvas_shape: tuple[int, int],
    batch_size: int,
    *,
    backend: Literal["cupy", "numpy"] = "cupy",
    subpixel: bool = True,
    position_refinement: bool = False,
    momentum: bool = False,
    object_modes: int = 1,
    opr_modes: int = 0,
) -> dict[str, int]:
    """The terms of :func:`estimate_bytes` by name (see the module docstring)."""
    names = _algorithms(algorithm)
    n_pos, n, k, m = int(n_positions), int(window), int(probe_modes), int(object_modes)
    pix = n * n
    canvas = int(canvas_shape[0]) * int(canvas_shape[1])
    b = max(1, min(int(batch_size), max(n_pos, 1)))
    phases = [
        batch_phases(
            a,
            n,
            k,
            b,
            subpixel=subpixel,
            position_refinement=position_refinement,
            object_modes=m,
            opr=opr_modes > 0,
        )
        for a in sorted(names)
    ]
    eigen = max(int(opr_modes) - 1, 0)  # OPR's variable eigen-probes
    return {
        "frames": 4 * n_pos * pix,
        "positions": 48 * n_pos,
        "dm_exit_waves": 8 * n_pos * k * m * pix if "dm" in names else 0,
        "object": 8 * m * canvas,
        "probe": 8 * k * pix,
        "momentum": 2 * 8 * (m * canvas + k * pix) if momentum and names - {"dm"} else 0,
        "opr": 4 * n_pos * eigen + 8 * eigen * pix,
        "canvas_temporaries": _canvas_temporaries(names, m, canvas),
        "batch_temporaries": max(max(p.values()) for p in phases)
        + _PROBE_ARRAYS * 8 * k * pix
        + _OPR_PASS_ARRAYS * 8 * eigen * pix,
        "fft_work_area": 8 * b * k * m * pix if backend == "cupy" else 0,
    }


def _summed(terms: Callable[_P, dict[str, int]], name: str, doc: str) -> Callable[_P, int]:
    """A function ``name`` of ``terms``' arguments (same signature) that returns the sum
    of its terms."""

    @functools.wraps(terms)
    def total(*args: _P.args, **kwargs: _P.kwargs) -> int:
        return sum(terms(*args, **kwargs).values())

    total.__name__ = total.__qualname__ = name
    total.__doc__ = doc
    total.__signature__ = inspect.signature(terms).replace(return_annotation="int")  # type: ignore[attr-defined]
    return total


estimate_bytes = _summed(
    estimate_terms,
    "estimate_bytes",
    """Peak bytes of a reconstruction of ``n_positions`` frames of ``window``² pixels: the
    sum of :func:`estimate_terms` (same arguments).

    ``algorithm`` is one name or the set a schedule runs (DM's exit waves are
    counted when DM is among them; the temporaries of the most demanding one).
    ``backend`` 'cupy' adds cuFFT's work area; ``subpixel`` False is the cheaper
    whole-pixel model (``IterativeParams.subpixel_positions``);
    ``position_refinement`` adds the object gradients of the shift estimate (and
    implies sub-pixel shifts); ``momentum`` the history of
    :mod:`hxn_liveptycho.recon._momentum`; ``object_modes`` the object's incoherent
    modes (``IterativeParams.object_modes``); ``opr_modes`` the variable probe's
    eigen-probes, the main one included (``IterativeParams.opr_modes``, 0: off).
    """,
)


def available_bytes(xp: types.ModuleType) -> int:
    """Bytes free for new arrays: on CuPy the device's free memory plus what CuPy's pool
    holds unused; on NumPy the available RAM (psutil, else ``os.sysconf`` pages)."""
    if is_cupy(xp):
        free, _total = xp.cuda.Device().mem_info
        return int(free) + int(xp.get_default_memory_pool().free_bytes())
    try:
        import psutil
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


def format_bytes(n: int) -> str:
    """``123456789`` -> ``'123,456,789 bytes (117.7 MiB)'``."""
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def check_fits(needed: int, held: int, xp: types.ModuleType, limit: int | None, what: str) -> None:
    """Raise ConfigurationError unless ``needed`` bytes in all fit.

    ``held`` is what the solver already has allocated (it counts towards
    ``needed`` and is not free); the budget is ``limit`` if given, else
    ``held`` plus :func:`available_bytes`. ``what`` names the configuration.
    """
    if limit is not None:
        budget, source = int(limit), "the memory limit"
    else:
        budget = held + available_bytes(xp)
        device = "GPU memory" if is_cupy(xp) else "host RAM"
        source = f"{device} ({format_bytes(held)} held by the solver + free)"
    if needed > budget:
        raise ConfigurationError(
            f"{what} needs about {format_bytes(needed)} but only {format_bytes(budget)} is "
            f"available as {source}; use fewer positions per reconstruction, a smaller "
            f"batch_size or window, fewer probe modes, or an algorithm other than DM "
            f"(its exit waves grow with the scan)"
        )
