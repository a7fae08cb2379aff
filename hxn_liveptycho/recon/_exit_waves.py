"""Fused CuPy kernels for a batch's exit waves and the sub-pixel shifts of its probes.

The GPU fast path of the solver makes each step in one pass with the same
arithmetic as the xp code in :mod:`hxn_liveptycho.recon.forward`, which stays
the reference (and the NumPy path); ``tests/test_gpu_parity.py`` compares the
two. At 256² frames an element-wise CuPy expression over a batch costs a kernel
launch plus a full read and write of 25-50 MB, and the xp expressions chain a
dozen of them per step.

Object windows are read straight from the canvas at each window's corner
(no (B, n, n) copy of them is made), and the FFT pair of the fast path is
unnormalised both ways (:func:`~hxn_liveptycho.recon.backend.ifft2_unscaled`):
the 1/n² of the inverse is folded into the kernel that feeds it, so no FFT
is followed by a separate scaling pass.

Layouts: exit waves and spectra (B, K, n, n) complex64, C-order; probes (K, n,
n) shared or (B, K, n, n) per position; shift tables (B, 2, n) complex64: each
position's phase ramp along y and along x (the ramp is separable, so a pixel's
factor is one product).
"""

from __future__ import annotations

import functools
from typing import Any

from hxn_liveptycho.recon._raw_kernels import placeholder_for

__all__ = [
    "batch_sum",
    "exit_waves",
    "ramp_table",
    "scaled_copy",
    "shift_spectra",
    "unshift_sum_spectra",
]

#: The Fourier frequency (cycles/px, NumPy's fftfreq order) of index ``j`` of an n-point axis.
_FREQ = "((j) < (n + 1) / 2 ? (float)(j) : (float)((j) - n)) / (float)n"


def _split_index(outer: str, count: str) -> str:
    """CUDA that splits element ``i`` of an (outer, ``count``, n, n) array into ``outer``,
    ``rest`` (its place within that outer entry), mode ``k`` and pixel ``r`` = (y, x)."""
    return f"""
    const long long nn = (long long)n * n;
    const long long {outer} = i / ({count} * nn);
    const long long rest = i - {outer} * {count} * nn;
    const long long k = rest / nn;
    const long long r = rest - k * nn;
    const long long y = r / n;
    const long long x = r - y * n;
"""


#: Batch index ``b``, mode ``k`` and in-window pixel ``r`` = (y, x) of element ``i`` of a
#: (B, K, n, n) array.
_WAVE_INDEX = _split_index("b", "k_modes")


@functools.cache
def _kernels() -> dict[str, Any]:
    import cupy as cp

    waves = cp.ElementwiseKernel(
        "raw T canvas, raw T probes, raw int32 corners, int32 n, int32 width, int32 k_modes, "
        "bool per_position",
        "T out",
        _WAVE_INDEX
        + """
        const T o = canvas[(corners[2 * b] + y) * (long long)width + corners[2 * b + 1] + x];
        out = o * probes[(per_position ? b * k_modes + k : k) * nn + r];
        """,
        "liveptycho_exit_waves",
    )
    table = cp.ElementwiseKernel(
        "raw float32 frac, int32 n",
        "T out",
        """
        const long long b = i / (2 * n);
        const int axis = (i / n) % 2;
        const int j = i % n;
        const float k = """
        + _FREQ
        + """;
        float s, c;
        sincosf(-6.283185307179586f * frac[2 * b + axis] * k, &s, &c);
        out = T(c, s);
        """,
        "liveptycho_ramp_table",
    )
    shift = cp.ElementwiseKernel(
        "raw T ft, raw T table, int32 n, int32 k_modes, float32 scale",
        "T out",
        _WAVE_INDEX
        + """
        out = ft[k * nn + r] * (table[2 * b * n + y] * table[(2 * b + 1) * n + x] * scale);
        """,
        "liveptycho_shift_spectra",
    )
    # Sum over the batch, in chunks of positions (one thread per chunk and pixel, so the
    # grid stays large for one mode), each chunk's part added atomically.
    unshift = cp.ElementwiseKernel(
        "raw T f, raw T table, int32 n, int32 channels, int32 batch, int32 chunk, "
        "bool has_table, float32 scale",
        "raw float32 out",
        _split_index("c", "channels")
        + """
        const int stop = min(batch, (int)(c + 1) * chunk);
        T acc = T(0, 0);
        for (int b = c * chunk; b < stop; ++b) {
            const T v = f[(b * channels + k) * nn + r];
            acc += has_table ? v * conj(table[2 * b * n + y] * table[(2 * b + 1) * n + x]) : v;
        }
        atomicAdd(&out[2 * rest], acc.real() * scale);
        atomicAdd(&out[2 * rest + 1], acc.imag() * scale);
        """,
        "liveptycho_unshift_sum_spectra",
    )
    scaled = cp.ElementwiseKernel(
        "T x, float32 scale", "T out", "out = x * scale", "liveptycho_scale"
    )
    return {
        "waves": waves,
        "table": table,
        "shift": shift,
        "unshift": unshift,
        "scaled": scaled,
    }


def exit_waves(canvas: Any, corners: Any, probes: Any) -> Any:
    """``O[window_b] * P_bk`` (B, K, n, n), the windows read from ``canvas`` at ``corners``
    (B, 2) int32; ``probes`` shared (K, n, n) or per position (B, K, n, n)."""
    import cupy as cp

    k, n = probes.shape[-3], probes.shape[-1]
    out = cp.empty((corners.shape[0], k, n, n), dtype=canvas.dtype)
    if out.size:
        _kernels()["waves"](canvas, probes, corners, n, canvas.shape[1], k, probes.ndim == 4, out)
    return out


def ramp_table(frac: Any, n: int) -> Any:
    """Phase ramps (B, 2, n) complex64, ``exp(-2 pi i f k)`` along y and x, for the
    sub-pixel fractions ``frac`` (B, 2) float32: the table of :func:`shift_spectra`."""
    import cupy as cp

    out = cp.empty((frac.shape[0], 2, n), dtype=cp.complex64)
    _kernels()["table"](frac, n, out)
    return out


def shift_spectra(ft: Any, table: Any, scale: float) -> Any:
    """``scale ft`` (K, n, n) times each position's ramp: (B, K, n, n) spectra whose
    inverse FFTs are the modes shifted by the positions' fractions (pass ``1/n²`` with
    an unscaled inverse FFT)."""
    import cupy as cp

    k, n = ft.shape[0], ft.shape[-1]
    out = cp.empty((table.shape[0], k, n, n), dtype=ft.dtype)
    _kernels()["shift"](ft, table, n, k, cp.float32(scale), out)
    return out


def _sum_over_batch(f: Any, table: Any | None, scale: float, chunk: int = 16) -> Any:
    import cupy as cp

    b, c, n = f.shape[0], f.shape[1], f.shape[-1]
    out = cp.zeros((c, n, n), dtype=f.dtype)
    chunks = max(1, -(-b // chunk))
    has_table = table is not None
    _kernels()["unshift"](
        f,
        table if has_table else placeholder_for(cp.complex64),
        n,
        c,
        b,
        chunk,
        has_table,
        cp.float32(scale),
        out.view(cp.float32),
        size=chunks * c * n * n,
    )
    return out


def unshift_sum_spectra(f: Any, table: Any, scale: float = 1.0) -> Any:
    """``scale sum_b f_b conj(ramp_b)`` (C, n, n) of spectra ``f`` (B, C, n, n): the adjoint
    of :func:`shift_spectra`, summed over the batch."""
    return _sum_over_batch(f, table, scale)


def batch_sum(f: Any) -> Any:
    """``sum_b f_b`` (C, n, n) of ``f`` (B, C, n, n) complex64."""
    return _sum_over_batch(f, None, 1.0)


def scaled_copy(x: Any, scale: float) -> Any:
    """``scale * x`` as a new array (one pass)."""
    import cupy as cp

    return _kernels()["scaled"](x, cp.float32(scale))
