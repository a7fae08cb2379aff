"""Fused CuPy kernels whose step ends in a sum: the modulus step with its error, LSQ-ML's
step-length sums and DM's relaxed Fourier step.

Each is one pass over the batch's far fields or exit waves: the per-pixel work
of :mod:`hxn_liveptycho.recon.iterative`'s xp reference, with the sums made
in the same kernel (a block-wide reduction, one atomic add per block and
sum) instead of an intermediate array and a separate reduction. Grids are
(blocks per position, positions); the per-position sums land in a (B, S)
float32 array, the batch error in a 0-d one.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hxn_liveptycho.recon import _fused
from hxn_liveptycho.recon._fused import (
    SLOT_MAX_CUDA,
    regularising,
    step_sums_arrays,
    tile_step_sums,
)

__all__ = ["dm_fourier_step", "lsqml_step_sums", "lsqml_steps", "modulus_residual"]

_THREADS = 256
#: Blocks per position: enough to fill the GPU at batch 32+ with 256² frames.
_BLOCKS_PER_POSITION = 32

_SOURCE = (
    r"""
#include <cupy/complex.cuh>
typedef complex<float> cf;
"""
    + SLOT_MAX_CUDA
    + r"""

// Adds v[0..S) of every thread of the block into out[0..S) (one atomic per sum and block).
template <int S>
__device__ void block_add(float* v, float* out) {
    __shared__ float part[S][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int s = 0; s < S; ++s) {
        float x = v[s];
        for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffff, x, off);
        if (lane == 0) part[s][warp] = x;
    }
    __syncthreads();
    if (warp == 0) {
        for (int s = 0; s < S; ++s) {
            float x = lane < blockDim.x / 32 ? part[s][lane] : 0.f;
            for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffff, x, off);
            if (lane == 0) atomicAdd(&out[s], x);
        }
    }
}

// f (B, K, n, n) <- f * scale * v (A / sqrt(max(I, floor)) - 1); err += sum (v (sqrt(I) - A))^2.
extern "C" __global__ void liveptycho_modulus(
    cf* f, const float* amps, const long long* rows, const float* valid, int has_valid,
    int k_modes, int nn, float floor, float scale, float* err) {
    const long long b = blockIdx.y;
    const float* a_row = amps + rows[b] * (long long)nn;
    float acc[1] = {0.f};
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < nn; r += blockDim.x * gridDim.x) {
        const float a = a_row[r];
        float inten = 0.f;
        for (int k = 0; k < k_modes; ++k) {
            const cf c = f[(b * k_modes + k) * nn + r];
            inten += c.real() * c.real() + c.imag() * c.imag();
        }
        const float v = has_valid ? valid[r] : 1.f;
        const float dev = (sqrtf(inten) - a) * v;
        acc[0] += dev * dev;
        const float g = scale * v * (a / sqrtf(fmaxf(inten, floor)) - 1.f);
        for (int k = 0; k < k_modes; ++k) f[(b * k_modes + k) * nn + r] *= g;
    }
    block_add<1>(acc, err);
}

// Per position: a11 = |u|^2, a12 = Re u* v, a22 = |v|^2, b1 = Re u* chi, b2 = Re v* chi with
// u = P dO (dO = num / regularised(den) on the batch's box), v = O dP (O from the canvas),
// summed over modes and pixels, into out (B, 5). dprobes_mode: 0 none, 1 shared (K, n, n),
// 2 (B, K, n, n).
// Restrict pointers and two pixels per round: the reads of both are issued together.
extern "C" __global__ void liveptycho_lsqml_sums(
    const cf* __restrict__ chi, const cf* __restrict__ probes, const cf* __restrict__ dprobes,
    const cf* __restrict__ canvas, const cf* __restrict__ num, const float* __restrict__ den,
    const int* __restrict__ corners, int oy, int ox, int n, int box_width, int width,
    int k_modes, int probes_per_position, int dprobes_mode, const float* den_max,
    int has_slots, float reg, float* out) {
    const long long b = blockIdx.y;
    const int nn = n * n;
    const float m = den_maximum(den_max, has_slots);
    float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < nn; r += blockDim.x * gridDim.x) {
        const int y = r / n, x = r - (r / n) * n;
        const long long gy = corners[2 * b] + y, gx = corners[2 * b + 1] + x;
        const long long dst = (gy - oy) * box_width + gx - ox;
        const cf d_obj = num[dst] / regularised(den[dst], reg, m);
        const cf o = dprobes_mode ? canvas[gy * width + gx] : cf(0.f, 0.f);
        for (int k = 0; k < k_modes; ++k) {
            const long long w = (b * k_modes + k) * nn + r;
            const cf p = probes[probes_per_position ? w : (long long)k * nn + r];
            const cf c = chi[w];
            const cf u = p * d_obj;
            acc[0] += u.real() * u.real() + u.imag() * u.imag();
            acc[3] += u.real() * c.real() + u.imag() * c.imag();
            if (dprobes_mode) {
                const cf v = o * dprobes[dprobes_mode == 2 ? w : (long long)k * nn + r];
                acc[1] += u.real() * v.real() + u.imag() * v.imag();
                acc[2] += v.real() * v.real() + v.imag() * v.imag();
                acc[4] += v.real() * c.real() + v.imag() * c.imag();
            }
        }
    }
    block_add<5>(acc, out + 5 * b);
}

// LSQ-ML's 2 x 2 solves of one batch in one block (lsqml_steps): the normal equations of
// sums (B, 5) with reg times the batch-mean diagonal added, steps clipped to [0, 2];
// weights[b] = alpha alpha_O,b and probe_scale[0] = beta mean_b alpha_P,b.
extern "C" __global__ void liveptycho_lsqml_steps(
    const float* sums, int batch, float reg, float alpha, float beta, int with_probe,
    float* weights, float* probe_scale) {
    __shared__ float mean[2];
    __shared__ float total[1];
    if (threadIdx.x < 2) mean[threadIdx.x] = 0.f;
    if (threadIdx.x == 0) total[0] = 0.f;
    __syncthreads();
    float diag[2] = {0.f, 0.f};
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        diag[0] += sums[5 * b];
        diag[1] += sums[5 * b + 2];
    }
    block_add<2>(diag, mean);
    __syncthreads();
    const float a11_reg = reg * mean[0] / batch + 1e-30f;
    const float a22_reg = reg * mean[1] / batch + 1e-30f;
    float step_p[1] = {0.f};
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const float* s = sums + 5 * b;
        const float a11 = s[0] + a11_reg;
        float ao, ap = 0.f;
        if (with_probe) {
            const float a22 = s[2] + a22_reg;
            float det = a11 * a22 - s[1] * s[1];
            det = fabsf(det) > 1e-30f ? det : 1e-30f;
            ao = (a22 * s[3] - s[1] * s[4]) / det;
            ap = fminf(fmaxf((a11 * s[4] - s[1] * s[3]) / det, 0.f), 2.f);
        } else {
            ao = s[3] / a11;
        }
        weights[b] = alpha * fminf(fmaxf(ao, 0.f), 2.f);
        step_p[0] += ap;
    }
    block_add<1>(step_p, total);
    __syncthreads();
    if (threadIdx.x == 0) probe_scale[0] = beta * total[0] / batch;
}

// DM, pass 1 per position: mis = sum (v (|2 phi - psi| - A))^2, sum A^2, and the error of
// phi, sum (v (|phi| - A))^2, into out (B, 3); |.| over modes.
extern "C" __global__ void liveptycho_dm_sums(
    const cf* phi, const cf* old, const float* amps, const long long* rows, const float* valid,
    int has_valid, int k_modes, int nn, float* out) {
    const long long b = blockIdx.y;
    const float* a_row = amps + rows[b] * (long long)nn;
    float acc[3] = {0.f, 0.f, 0.f};
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < nn; r += blockDim.x * gridDim.x) {
        const float a = a_row[r];
        float ri = 0.f, ip = 0.f;
        for (int k = 0; k < k_modes; ++k) {
            const long long w = (b * k_modes + k) * nn + r;
            const cf p = phi[w];
            const cf refl = 2.f * p - old[w];
            ri += refl.real() * refl.real() + refl.imag() * refl.imag();
            ip += p.real() * p.real() + p.imag() * p.imag();
        }
        const float v = has_valid ? valid[r] : 1.f;
        const float dev = (sqrtf(fmaxf(ri, 1e-24f)) - a) * v;
        const float e = (sqrtf(ip) - a) * v;
        acc[0] += dev * dev;
        acc[1] += a * a;
        acc[2] += e * e;
    }
    block_add<3>(acc, out + 3 * b);
}

// DM, pass 2: psi <- psi + beta (g (2 phi - psi) - phi) with the relaxed modulus factor g;
// the new psi is stored in old and, times scale, in phi (the input of the inverse FFT).
extern "C" __global__ void liveptycho_dm_update(
    cf* phi, cf* old, const float* amps, const long long* rows, const float* valid,
    int has_valid, const float* sums, int k_modes, int nn, float relax2, float beta,
    float scale) {
    const long long b = blockIdx.y;
    const float* a_row = amps + rows[b] * (long long)nn;
    const float mis = sums[3 * b], amp2 = sums[3 * b + 1];
    const float keep = relax2 > 0.f ? sqrtf(fminf(relax2 * amp2 / fmaxf(mis, 1e-30f), 1.f)) : 0.f;
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < nn; r += blockDim.x * gridDim.x) {
        const float a = a_row[r];
        float ri = 0.f;
        for (int k = 0; k < k_modes; ++k) {
            const long long w = (b * k_modes + k) * nn + r;
            const cf refl = 2.f * phi[w] - old[w];
            ri += refl.real() * refl.real() + refl.imag() * refl.imag();
        }
        const float v = has_valid ? valid[r] : 1.f;
        const float mag = sqrtf(fmaxf(ri, 1e-24f));
        const float dev = (mag - a) * v * (1.f - keep);
        const float g = (mag - dev) / mag;
        for (int k = 0; k < k_modes; ++k) {
            const long long w = (b * k_modes + k) * nn + r;
            const cf p = phi[w], o = old[w];
            const cf psi = o + beta * (g * (2.f * p - o) - p);
            old[w] = psi;
            phi[w] = psi * scale;
        }
    }
}
"""
)


@functools.cache
def _module() -> Any:
    import cupy as cp

    return cp.RawModule(code=_SOURCE, options=("-std=c++17",))


@functools.cache
def _function(name: str, device: int) -> Any:
    """Kernel ``name`` loaded on ``device``, looked up once (the hot path calls these per
    batch)."""
    import cupy as cp

    with cp.cuda.Device(device):
        return _module().get_function(name)


def _kernel(name: str) -> Any:
    import cupy as cp

    return _function(name, cp.cuda.runtime.getDevice())


def _launch(name: str, positions: int, nn: int, args: tuple) -> None:
    """Run kernel ``name`` on a (blocks, positions) grid; ``args`` as the kernel takes them
    (``np.int32`` / ``np.float32`` scalars: CuPy would pass Python's as 64-bit)."""
    blocks = min(_BLOCKS_PER_POSITION, -(-nn // _THREADS))
    if positions:
        _kernel(name)((blocks, positions), (_THREADS,), args)


@functools.cache
def _ones(device: int) -> Any:
    """A one-element float32 1 on ``device``: the stand-in for an absent valid-pixel mask."""
    import cupy as cp

    with cp.cuda.Device(device):
        return cp.ones(1, dtype=cp.float32)


def _mask(valid: Any | None) -> tuple[Any, np.int32]:
    import cupy as cp

    return (
        (valid, np.int32(1))
        if valid is not None
        else (_ones(cp.cuda.runtime.getDevice()), np.int32(0))
    )


def modulus_residual(
    f: Any,
    amps: Any,
    rows: Any,
    valid: Any | None,
    floor: float,
    scale: float = 1.0,
    err: Any | None = None,
) -> Any:
    """In place: far fields ``f`` (B, K, n, n) become ``scale f v (A / sqrt(max(I, floor))
    - 1)``, ``I = sum_k |f_k|^2``, ``v`` the valid-pixel mask (float32, FFT order).
    Returns the batch's squared amplitude error ``sum (v (sqrt(I) - A))^2`` (0-d), added
    into ``err`` when given (a pass's running total), else in a new array."""
    import cupy as cp

    b, k, nn = f.shape[0], f.shape[1], f.shape[-1] * f.shape[-2]
    if err is None:
        err = cp.zeros((), dtype=cp.float32)
    mask, has = _mask(valid)
    i32, f32 = np.int32, np.float32
    args = (f, amps, rows, mask, has, i32(k), i32(nn), f32(floor), f32(scale), err)
    _launch("liveptycho_modulus", b, nn, args)
    return err


def lsqml_step_sums(
    chi: Any,
    probes: Any,
    dprobes: Any | None,
    canvas: Any,
    num: Any,
    den: Any,
    corners: Any,
    origin: tuple[int, int],
    reg: float = 0.0,
    den_max: Any | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Any:
    """The normal-equation sums (B, 5) ``(a11, a12, a22, b1, b2)`` of LSQ-ML's step fit.

    ``u = P dO`` with ``dO = num / den`` read on the batch's box (at ``origin``), ``v =
    O dP`` with ``O`` the canvas window and ``dprobes`` the probe step (shared (K, n, n),
    per position (B, K, n, n), or None: object step only, v = 0); sums over modes and
    pixels of ``|u|^2, Re u* v, |v|^2, Re u* chi, Re v* chi``. ``den`` is regularised as
    it is read, as :func:`~hxn_liveptycho.recon._fused.divide_regularised` does with ``reg``
    and ``den_max`` (reg 0: ``den`` already regularised).

    ``box``, the canvas pixels ``num`` and ``den`` cover (``origin`` its corner): up to
    ``_fused._TILE_STEP_MODES`` modes (one) the sums are gathered by canvas tile
    (:func:`~hxn_liveptycho.recon._fused.tile_step_sums`), which reads ``dO`` and ``O``
    once per canvas pixel instead of once per window pixel.
    """
    import cupy as cp

    b, k, n = chi.shape[0], chi.shape[1], chi.shape[-1]
    out = cp.zeros((b, 5), dtype=cp.float32)
    if box is not None and k <= _fused._TILE_STEP_MODES and tuple(origin) == tuple(box[:2]):
        reg_args = regularising(den, reg, den_max)
        tile_step_sums(chi, probes, dprobes, canvas, num, den, corners, box, reg_args, out)
        return out
    arrays, mode = step_sums_arrays(chi, probes, dprobes, canvas, num, den, corners)
    i32 = np.int32
    args = (
        *arrays,
        i32(origin[0]),
        i32(origin[1]),
        i32(n),
        i32(num.shape[1]),
        i32(canvas.shape[1]),
        i32(k),
        i32(probes.ndim == 4),
        i32(mode),
        *regularising(den, reg, den_max),
        out,
    )
    _launch("liveptycho_lsqml_sums", b, n * n, args)
    return out


def lsqml_steps(
    sums: Any, reg: float, alpha: float, beta: float, with_probe: bool
) -> tuple[Any, Any]:
    """:func:`~hxn_liveptycho.recon._lsqml.steps_from_sums` and the step multipliers in one
    launch: returns the object weights ``alpha * alpha_O`` (B,) and the probe factor
    ``beta * mean(alpha_P)`` (0-d; 0 without ``with_probe``), float32 on the device."""
    import cupy as cp

    b = sums.shape[0]
    weights = cp.empty(b, dtype=cp.float32)
    scale = cp.zeros((), dtype=cp.float32)
    f32 = np.float32
    args = (sums, np.int32(b), f32(reg), f32(alpha), f32(beta), np.int32(with_probe))
    _kernel("liveptycho_lsqml_steps")((1,), (_THREADS,), (*args, weights, scale))
    return weights, scale


def dm_fourier_step(
    phi: Any,
    waves: Any,
    amps: Any,
    rows: Any,
    valid: Any | None,
    relax: float,
    beta: float,
    scale: float,
    sums: Any | None = None,
) -> Any | None:
    """DM's relaxed Fourier step on a batch, in place; returns the error of ``phi`` (0-d).
    Given ``sums``, a zeroed (B, 3) float32 buffer (the batch's rows of one for the
    pass), the errors stay in its last column and nothing is returned: the pass sums them
    once instead of two small launches a batch.

    ``phi`` (B, K, n, n): far fields of ``P O_j`` (the overlap projection); ``waves``: the
    stored far-field exit waves of the same positions. ``waves`` becomes ``psi + beta
    (P_F(2 phi - psi) - phi)`` and ``phi`` that times ``scale`` (ready for an unscaled
    inverse FFT). ``P_F`` is the projection relaxed by ``relax`` (see
    ``recon.dm.DifferenceMap._fourier_factor``).
    """
    import cupy as cp

    b, k, nn = phi.shape[0], phi.shape[1], phi.shape[-1] * phi.shape[-2]
    given = sums is not None
    if sums is None:
        sums = cp.zeros((b, 3), dtype=cp.float32)
    elif sums.shape != (b, 3) or not sums.flags.c_contiguous:
        raise ValueError(f"DM's sums of {b} positions are a contiguous ({b}, 3), got {sums.shape}")
    mask, has = _mask(valid)
    i32 = np.int32
    _launch("liveptycho_dm_sums", b, nn, (phi, waves, amps, rows, mask, has, i32(k), i32(nn), sums))
    args = (
        phi,
        waves,
        amps,
        rows,
        mask,
        has,
        sums,
        i32(k),
        i32(nn),
        cp.float32(relax * relax),
        cp.float32(beta),
        cp.float32(scale),
    )
    _launch("liveptycho_dm_update", b, nn, args)
    return None if given else cp.sum(sums[:, 2])
