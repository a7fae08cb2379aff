"""Fused CuPy kernels for the hot steps of a batch (the GPU fast path of the solver).

At 256² frames an element-wise CuPy expression over a batch costs a kernel
launch plus a full read and write of 25-50 MB; the solver's xp expressions
chain a dozen of them per step, and a pass over a 4,096-position scan runs
~40 batches. These kernels do each step in one pass with the same
arithmetic as the xp code in :mod:`hxn_liveptycho.recon.iterative`, which
stays the reference (and the NumPy path): the GPU parity check
(``benchmarks/recon_gpu.py``) compares the two paths.

Layouts: far fields and exit-wave changes (B, K, n, n) complex64, C-order;
probes (K, n, n) shared or (B, K, n, n) per position; amplitudes stored
(rows, n, n) float32, addressed through the batch's active-set ``rows``.
"""

from __future__ import annotations

import functools
from typing import Any

from hxn_liveptycho.recon._windows import WINDOW_PIXEL_INDEX

__all__ = [
    "conj_product",
    "modulus_residual",
    "object_update_sums",
    "power_sum",
    "probe_gradient",
    "regularised_step",
    "shift_spectra",
    "unshift_sum_spectra",
]

#: The Fourier frequency (cycles/px, NumPy's fftfreq order) of index ``j`` of an n-point axis.
_FREQ = "((j) < (n + 1) / 2 ? (float)(j) : (float)((j) - n)) / (float)n"

_RAMP_INDEX = (
    """
    const long long y = r / n;
    const long long x = r - y * n;
    const float ky = """
    + _FREQ.replace("j", "y")
    + """;
    const float kx = """
    + _FREQ.replace("j", "x")
    + """;
"""
)

_PIXEL = """
    const long long b = i / nn;
    const long long r = i - b * nn;
"""


@functools.cache
def _kernels() -> dict[str, Any]:
    import cupy as cp

    modulus = cp.ElementwiseKernel(
        "raw float32 amps, raw int64 rows, raw float32 valid, int32 k_modes, "
        "int64 nn, bool has_valid, float32 floor",
        "float32 d2, raw T f",
        _PIXEL
        + """
        const float a = amps[rows[b] * nn + r];
        float inten = 0.f;
        for (int k = 0; k < k_modes; ++k) {
            const T c = f[(b * k_modes + k) * nn + r];
            inten += c.real() * c.real() + c.imag() * c.imag();
        }
        const float v = has_valid ? valid[r] : 1.f;
        const float dev = (sqrtf(inten) - a) * v;
        d2 = dev * dev;
        const float g = v * (a / sqrtf(fmaxf(inten, floor)) - 1.f);
        for (int k = 0; k < k_modes; ++k) {
            f[(b * k_modes + k) * nn + r] *= g;
        }
        """,
        "liveptycho_modulus_residual",
    )
    sums = cp.ElementwiseKernel(
        "raw T dpsi, raw T probes, raw int32 corners, int32 oy, int32 ox, int32 n, "
        "int32 width, int32 k_modes, bool per_position",
        "raw float32 num, raw float32 den",
        WINDOW_PIXEL_INDEX
        + """
        float re = 0.f, im = 0.f, illum = 0.f;
        for (int k = 0; k < k_modes; ++k) {
            const T p = probes[(per_position ? b * k_modes + k : k) * nn + r];
            const T d = dpsi[(b * k_modes + k) * nn + r];
            re += p.real() * d.real() + p.imag() * d.imag();
            im += p.real() * d.imag() - p.imag() * d.real();
            illum += p.real() * p.real() + p.imag() * p.imag();
        }
        atomicAdd(&num[2 * dst], re);
        atomicAdd(&num[2 * dst + 1], im);
        atomicAdd(&den[dst], illum);
        """,
        "liveptycho_object_update_sums",
    )
    step = cp.ElementwiseKernel(
        "T num, float32 den, raw float32 den_max, float32 reg, float32 weight",
        "T target",
        """
        const float d = fmaxf((1.f - reg) * (den + reg * den_max[0]), 1e-30f);
        target += num * (weight / d);
        """,
        "liveptycho_regularised_step",
    )
    # Sub-pixel probe shifts (the xp reference: recon._positions.shifted_probes / unshift_sum)
    # with the phase ramps made on the fly instead of held as (B, n, n) arrays.
    shift = cp.ElementwiseKernel(
        "raw T ft, raw float32 frac, int32 n, int32 k_modes",
        "T out",
        """
        const long long nn = (long long)n * n;
        const long long b = i / (k_modes * nn);
        const long long rest = i - b * k_modes * nn;
        const long long k = rest / nn;
        const long long r = rest - k * nn;
        """
        + _RAMP_INDEX
        + """
        float s, c;
        sincosf(-6.283185307179586f * (frac[2 * b] * ky + frac[2 * b + 1] * kx), &s, &c);
        out = ft[k * nn + r] * T(c, s);
        """,
        "liveptycho_shift_spectra",
    )
    unshift = cp.ElementwiseKernel(
        "raw T f, raw float32 frac, int32 n, int32 k_modes, int32 batch",
        "T out",
        """
        const long long nn = (long long)n * n;
        const long long k = i / nn;
        const long long r = i - k * nn;
        """
        + _RAMP_INDEX
        + """
        T acc = T(0, 0);
        for (int b = 0; b < batch; ++b) {
            float s, c;
            sincosf(6.283185307179586f * (frac[2 * b] * ky + frac[2 * b + 1] * kx), &s, &c);
            acc += f[(b * k_modes + k) * nn + r] * T(c, s);
        }
        out = acc;
        """,
        "liveptycho_unshift_sum_spectra",
    )
    conj_prod = cp.ElementwiseKernel(
        "T o, T d", "T out", "out = conj(o) * d", "liveptycho_conj_prod"
    )
    power = cp.ElementwiseKernel(
        "raw T obj, int32 batch, int64 nn",
        "float32 out",
        """
        float acc = 0.f;
        for (int b = 0; b < batch; ++b) {
            const T c = obj[b * nn + i];
            acc += c.real() * c.real() + c.imag() * c.imag();
        }
        out = acc;
        """,
        "liveptycho_power_sum",
    )
    gradient = cp.ElementwiseKernel(
        "raw T obj, raw T dpsi, int32 batch, int32 k_modes, int64 nn",
        "T out",
        """
        const long long k = i / nn;
        const long long r = i - k * nn;
        T acc = T(0, 0);
        for (int b = 0; b < batch; ++b) {
            acc += conj(obj[b * nn + r]) * dpsi[(b * k_modes + k) * nn + r];
        }
        out = acc;
        """,
        "liveptycho_probe_gradient",
    )
    return {
        "modulus": modulus,
        "sums": sums,
        "step": step,
        "shift": shift,
        "unshift": unshift,
        "conj_prod": conj_prod,
        "power": power,
        "gradient": gradient,
    }


def modulus_residual(f: Any, amps: Any, rows: Any, valid: Any | None, floor: float) -> Any:
    """In place: far fields ``f`` (B, K, n, n) become ``f * v (A / sqrt(max(I, floor)) - 1)``.

    ``I = sum_k |f_k|^2``, ``v`` the valid-pixel mask (float32, FFT order).
    Returns the per-pixel squared amplitude error ``(v (sqrt(I) - A))^2``
    (B, n, n): its sum is the batch's error.
    """
    import cupy as cp

    b, k, n = f.shape[0], f.shape[1], f.shape[-1]
    out = cp.empty((b, n, n), dtype=cp.float32)
    mask = valid if valid is not None else cp.ones(1, dtype=cp.float32)
    _kernels()["modulus"](amps, rows, mask, k, n * n, valid is not None, floor, out, f)
    return out


def object_update_sums(
    dpsi: Any, probes: Any, corners: Any, origin: tuple[int, int], num: Any, den: Any
) -> None:
    """Add ``sum_k conj(P_k) dpsi_k`` onto ``num`` (complex64) and ``sum_k |P_k|^2`` onto
    ``den`` (float32) at each window of the batch, canvases covering the batch's box."""
    import cupy as cp

    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    _kernels()["sums"](
        dpsi,
        probes,
        corners,
        origin[0],
        origin[1],
        n,
        num.shape[1],
        k,
        probes.ndim == 4,
        num.view(cp.float32),
        den,
        size=b * n * n,
    )


def regularised_step(target: Any, num: Any, den: Any, reg: float, weight: float) -> None:
    """``target += weight num / max((1 - reg) (den + reg max(den)), 1e-30)`` in place: the
    same regularised denominator as the xp path's ``_regularised`` (scale, then add the
    scaled maximum)."""
    import cupy as cp

    _kernels()["step"](num, den, cp.max(den), cp.float32(reg), cp.float32(weight), target)


def shift_spectra(ft: Any, frac: Any) -> Any:
    """``ft`` (K, n, n) times each position's shift ramp: (B, K, n, n) spectra whose inverse
    FFTs are the modes shifted by ``frac`` (B, 2) float32 (y, x) px."""
    import cupy as cp

    k, n = ft.shape[0], ft.shape[-1]
    out = cp.empty((frac.shape[0], k, n, n), dtype=ft.dtype)
    _kernels()["shift"](ft, frac, n, k, out)
    return out


def unshift_sum_spectra(f: Any, frac: Any) -> Any:
    """``sum_b f_b * conj(ramp_b)`` (K, n, n) of spectra ``f`` (B, K, n, n): the adjoint of
    :func:`shift_spectra`, summed over the batch."""
    import cupy as cp

    b, k, n = f.shape[0], f.shape[1], f.shape[-1]
    out = cp.empty((k, n, n), dtype=f.dtype)
    _kernels()["unshift"](f, frac, n, k, b, out)
    return out


def conj_product(obj: Any, waves: Any) -> Any:
    """``conj(O_b) w_bk`` (B, K, n, n) for windows ``obj`` (B, n, n) and ``waves`` (B, K, n, n)."""
    return _kernels()["conj_prod"](obj[:, None], waves)


def power_sum(obj: Any) -> Any:
    """``sum_b |O_b|^2`` (n, n) float32 of windows ``obj`` (B, n, n)."""
    import cupy as cp

    b, n = obj.shape[0], obj.shape[-1]
    out = cp.empty((n, n), dtype=cp.float32)
    _kernels()["power"](obj, b, n * n, out)
    return out


def probe_gradient(obj: Any, dpsi: Any) -> Any:
    """``sum_b conj(O_b) dpsi_bk`` (K, n, n): the probe numerator on whole-pixel positions."""
    import cupy as cp

    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    out = cp.empty((k, n, n), dtype=dpsi.dtype)
    _kernels()["gradient"](obj, dpsi, b, k, n * n, out)
    return out
