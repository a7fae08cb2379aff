"""How much memory an iterative reconstruction needs, and what the device has free.

The solver calls :func:`check_fits` at construction (for the expected scan
size) and before every buffer growth in ``add()``, so a scan that cannot fit
is refused with a :class:`~hxn_liveptycho.errors.ConfigurationError` naming
both byte counts, never run into an out-of-memory crash half-way.

Terms of :func:`estimate_terms` (bytes; ``N`` positions, ``n`` the window,
``K`` probe modes, ``M`` object modes (``e`` their extra arrays),
``B = min(batch_size, N)``, ``H x W`` the canvas):

* ``frames``: the measured amplitudes, float32, ``4 N n^2``.
* ``positions``: current, measured and per-iteration shift, float64 (y, x),
  ``48 N`` (small).
* ``dm_exit_waves``: DM only (also as a stage of a schedule): one far-field
  exit wave per position and pair of probe and object mode, complex64, ``8 N K M n^2``.
* ``object``: the canvas, complex64, ``8 M H W`` with ``M`` object modes (usually 1).
* ``probe``: the modes, complex64, ``8 K n^2``.
* ``momentum``: with ``IterativeParams.momentum_gain`` > 0 and ePIE or LSQ-ML
  among the algorithms, the previous object and probe and their velocities,
  ``2 x 8 (M H W + K n^2)``.
* ``canvas_temporaries``: the per-batch (ePIE, LSQ-ML) or per-pass (DM)
  numerator (complex64) and illumination (float32) canvases of the object
  update and the expressions that combine them.
* ``batch_temporaries``: the batch's object windows, exit waves, far fields,
  shifted probes, corrections and updates at the peak of a batch:
  ``(a K + c + e K (M - 1)) 8 B n^2`` with per-algorithm ``a`` (arrays per mode) and ``c``
  (per-position arrays), larger with sub-pixel shifts and position
  refinement (fitted to ``tracemalloc`` peaks of the NumPy solver, K = 1-3,
  B = 16-64, and checked against CuPy's pool; the accuracy is in
  docs/benchmarks.md).
* ``fft_work_area``: cuFFT's work area for a batched transform of
  ``(B, K, n, n)`` complex64, about the size of the data it transforms
  (CuPy only; NumPy's pocketfft works in per-line buffers).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable
from typing import Literal

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon.backend import is_cupy

__all__ = ["available_bytes", "check_fits", "estimate_bytes", "estimate_terms", "format_bytes"]

#: Batch temporaries at the peak of a batch: (a, c) in ``(a K + c) x 8 B n^2`` bytes, with
#: and without sub-pixel shifts (least-squares fits to tracemalloc peaks on NumPy).
_BATCH_ARRAYS = {
    True: {"epie": (4.0, 4.5), "lsqml": (5.0, 7.0), "dm": (4.5, 5.0)},
    False: {"epie": (1.7, 2.5), "lsqml": (4.0, 3.5), "dm": (3.75, 3.25)},
}
#: Extra per-position arrays (units of 8 B n^2) for each object mode past the first, per
#: probe mode: its exit waves, far fields and corrections (LSQ-ML: and its directions
#: and their exit waves; DM: its stored waves' transforms); with and without sub-pixel
#: shifts (tracemalloc peaks on NumPy, K = 1-2, M = 2-3, B = 64). Sub-pixel LSQ-ML and DM
#: raised above the fit so the estimate covers CuPy's pool on the H200 too (M = 2,
#: K = 1 and 3, 1,024 frames of 256², batch 128).
_OBJECT_MODE_ARRAYS = {
    True: {"epie": 1.8, "lsqml": 7.8, "dm": 7.5},
    False: {"epie": 2.6, "lsqml": 7.8, "dm": 5.0},
}
#: Extra per-position arrays (units of 8 B n^2) of position refinement: the object's gradients.
_REFINEMENT_ARRAYS = 1.5
#: Canvas temporaries (update numerator complex64 + illumination float32), bytes per pixel.
_CANVAS_BYTES = 12


def _algorithms(algorithm: str | Iterable[str]) -> set[str]:
    names = {algorithm} if isinstance(algorithm, str) else set(algorithm)
    unknown = names - set(_BATCH_ARRAYS[True])
    if unknown or not names:
        raise ValueError(f"unknown algorithm(s) {sorted(unknown)}; use 'epie', 'dm' or 'lsqml'")
    return names


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
) -> dict[str, int]:
    """The terms of :func:`estimate_bytes` by name (see the module docstring)."""
    names = _algorithms(algorithm)
    n_pos, n, k, m = int(n_positions), int(window), int(probe_modes), int(object_modes)
    pix = n * n
    canvas = int(canvas_shape[0]) * int(canvas_shape[1])
    b = max(1, min(int(batch_size), max(n_pos, 1)))
    batch = [_BATCH_ARRAYS[bool(subpixel)][a] for a in names]
    extra = _REFINEMENT_ARRAYS if position_refinement else 0.0
    batch_wave = 8 * b * k * pix
    return {
        "frames": 4 * n_pos * pix,
        "positions": 48 * n_pos,
        "dm_exit_waves": 8 * n_pos * k * m * pix if "dm" in names else 0,
        "object": 8 * m * canvas,
        "probe": 8 * k * pix,
        "momentum": 2 * 8 * (m * canvas + k * pix) if momentum and names - {"dm"} else 0,
        # DM sums every object mode's numerator over the pass: one canvas more per mode.
        "canvas_temporaries": (_CANVAS_BYTES + (8 * (m - 1) if "dm" in names else 0)) * canvas,
        "batch_temporaries": int(
            (
                max(a * k + c for a, c in batch)
                + extra
                + max(_OBJECT_MODE_ARRAYS[bool(subpixel)][a] for a in names) * k * (m - 1)
            )
            * 8
            * b
            * pix
        ),
        "fft_work_area": batch_wave if backend == "cupy" else 0,
    }


def estimate_bytes(
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
) -> int:
    """Peak bytes of a reconstruction of ``n_positions`` frames of ``window``² pixels.

    ``algorithm`` is one name or the set a schedule runs (DM's exit waves are
    counted when DM is among them; the batch temporaries of the most
    demanding one). ``backend`` 'cupy' adds cuFFT's work area; ``subpixel``
    False is the cheaper whole-pixel model (``IterativeParams.subpixel_positions``);
    ``position_refinement`` adds the object gradients of the shift estimate;
    ``momentum`` the history of :mod:`hxn_liveptycho.recon._momentum`;
    ``object_modes`` the object's incoherent modes (``IterativeParams.object_modes``).
    Not counted: :meth:`StreamingSolver.add` needs one temporary the size of
    the chunk it is given (frames as float32).
    """
    return sum(
        estimate_terms(
            n_positions,
            window,
            probe_modes,
            algorithm,
            canvas_shape,
            batch_size,
            backend=backend,
            subpixel=subpixel,
            position_refinement=position_refinement,
            momentum=momentum,
            object_modes=object_modes,
        ).values()
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
