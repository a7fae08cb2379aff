"""Fused CuPy kernels for the hot steps of a batch (the GPU fast path of the solver).

At 256² frames an element-wise CuPy expression over a batch costs a kernel
launch plus a full read and write of 25-50 MB; the solver's xp expressions
chain a dozen of them per step, and a pass over a 4,096-position scan runs
~40 batches. These kernels do each step in one pass with the same
arithmetic as the xp code in :mod:`hxn_liveptycho.recon.iterative`, which
stays the reference (and the NumPy path): the GPU parity check
(``benchmarks/recon_gpu.py``) compares the two paths. Steps that end in a
per-position or per-batch sum are in :mod:`hxn_liveptycho.recon._fused_sums`.

Object windows are read straight from the canvas at each window's corner
(no (B, n, n) copy of them is made), and the FFT pair of the fast path is
unnormalised both ways (:func:`~hxn_liveptycho.recon.backend.ifft2_unscaled`):
the 1/n² of the inverse is folded into the kernel that feeds it, so no FFT
is followed by a separate scaling pass.

Layouts: far fields and exit-wave changes (B, K, n, n) complex64, C-order;
probes (K, n, n) shared or (B, K, n, n) per position; amplitudes stored
(rows, n, n) float32, addressed through the batch's active-set ``rows``;
shift tables (B, 2, n) complex64: each position's phase ramp along y and
along x (the ramp is separable, so a pixel's factor is one product).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "SLOT_FLOATS",
    "SLOT_MAX_CUDA",
    "add_scaled",
    "add_window_ratio",
    "batch_sum",
    "divide_regularised",
    "exit_waves",
    "max_slots",
    "mix_modes",
    "mode_unitary",
    "momentum_step",
    "pass_tail",
    "ramp_table",
    "regularised_step",
    "regularising",
    "scaled_copy",
    "shift_spectra",
    "step_sums_arrays",
    "tile_step_sums",
    "unshift_sum_spectra",
    "window_sums",
]

#: The Fourier frequency (cycles/px, NumPy's fftfreq order) of index ``j`` of an n-point axis.
_FREQ = "((j) < (n + 1) / 2 ? (float)(j) : (float)((j) - n)) / (float)n"

#: Slots of a running maximum (:func:`max_slots`): one per 128-byte line, so the warps'
#: atomics spread over L2 instead of queueing on one address.
MAX_SLOTS = 32
_SLOT_STRIDE = 32
#: Floats of a buffer that holds one set of slots.
SLOT_FLOATS = MAX_SLOTS * _SLOT_STRIDE

#: ``slot_max(slots, v)``: this warp's maximum of ``v`` >= 0 into one of the slots (its
#: float bits compare as unsigned ints); the readers take the maximum over the slots
#: with a whole warp (``den_maximum``, which also takes a plain ``max(den)``), and
#: ``regularised`` makes the regularised illumination from it, ``max((1 - reg) (den + reg
#: max(den)), 1e-30)`` (the xp path's ``_regularised``), where the kernels read ``den``:
#: no pass of its own.
SLOT_MAX_CUDA = f"""
__device__ __forceinline__ void slot_max(unsigned int* slots, float v) {{
    const unsigned int bits = __float_as_uint(v);
#if __CUDA_ARCH__ >= 800
    const unsigned int mask = __activemask();
    const unsigned int top = __reduce_max_sync(mask, bits);
    if ((threadIdx.x & 31) == __ffs(mask) - 1)
        atomicMax(&slots[(blockIdx.x % {MAX_SLOTS}) * {_SLOT_STRIDE}], top);
#else
    atomicMax(&slots[(blockIdx.x % {MAX_SLOTS}) * {_SLOT_STRIDE}], bits);
#endif
}}
// The maximum over the slots, read by a whole warp at once (lane j reads slot j; every
// lane gets the maximum).
__device__ __forceinline__ float warp_slots_max(const float* slots) {{
    float m = slots[(threadIdx.x % {MAX_SLOTS}) * {_SLOT_STRIDE}];
    for (int off = {MAX_SLOTS} / 2; off > 0; off /= 2)
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    return m;
}}
// max(den) from den_max, the slots (has_slots) or the maximum itself; every lane of the
// calling warp must call it.
__device__ __forceinline__ float den_maximum(const float* den_max, int has_slots) {{
    return has_slots ? warp_slots_max(den_max) : den_max[0];
}}
__device__ __forceinline__ float regularised(float den, float reg, float m) {{
    return fmaxf((1.f - reg) * (den + reg * m), 1e-30f);
}}
"""


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


#: Positions one thread of :func:`window_sums` takes in turn: the sums over the batch
#: (object power, summed probe terms) are made in registers over them, so a pixel gets
#: one atomic add per chunk instead of one per position (128 positions of a batch all
#: add into the same (n, n) pixels).
_WINDOW_CHUNK = 8
#: Positions one thread of ``liveptycho_probe_sums`` takes (``PROBE_CHUNK`` in its source).
_PROBE_CHUNK = 8


class TileShape(NamedTuple):
    """The blocks of the tile kernel (:func:`_tile_launch`): a tile of ``rows`` x 32 canvas
    pixels (one column per lane), ``threads`` a block (whole warps, ``threads / 32`` tile
    rows per pass, so ``rows / (threads / 32)`` pixels a thread; a tile's positions are
    listed this many at a time), ``group`` windows whose loads a thread issues together,
    and ``min_blocks`` a block's SM must hold at once (a register cap; 1: none)."""

    rows: int = 32
    threads: int = 256
    group: int = 2
    min_blocks: int = 1

    def options(self) -> tuple[str, ...]:
        """The compiler's ``-D`` options that build the kernel for this shape (made once
        per shape: every tile launch looks its kernel up by them)."""
        return _shape_options(self)


@functools.cache
def _shape_options(shape: TileShape) -> tuple[str, ...]:
    return tuple(f"-DTILE_{name.upper()}={value}" for name, value in shape._asdict().items())


#: The tile kernels' shape on the solver's path: 32 x 32 tiles of 256 threads, two windows
#: loaded together, registers capped at 64 for four blocks an SM (the object-sum kernel
#: takes 80 uncapped, the step-fit one 118). The cap speeds LSQ-ML's step-fit sums and its
#: ratio into the object and leaves the object sums as they were; no other shape of
#: ``benchmarks/tile_sums.py`` did better on all three (figures: docs/benchmarks-history.md).
_TILE_SHAPE = TileShape(min_blocks=4)
#: Most modes for which the solver gathers the object sums and LSQ-ML's ratio into the
#: object by tile (see :func:`window_sums`): up to three modes the tiles beat the atomics,
#: and whole iterations of the dense scans got faster with them, the sparse ones no slower
#: (``benchmarks/recon_gpu.py --tile-modes 3``; figures: docs/benchmarks-history.md).
_TILE_MODES = 3
#: Most modes for which LSQ-ML's step-fit sums are gathered by tile
#: (:func:`tile_step_sums`). At three modes they lost to the per-position kernel at the
#: 1,024 scan's density and tied at the 4,096 one.
_TILE_STEP_MODES = 1

#: The kernels called on every batch, as raw CUDA: a RawKernel call costs the host far less
#: than an ElementwiseKernel's argument checks, and the ePIE and
#: LSQ-ML passes are bound by that host time (``benchmarks/recon_host.py``). One thread
#: per element (blocks of :data:`_BLOCK`, as CuPy's element-wise launches); flags are
#: ``int``; ``target`` arrays are rows of ``width`` elements ``stride`` apart (a box of the
#: canvas, or any C-contiguous array); ``den`` repeats every ``den_size`` elements (the
#: probe's ``(n, n)`` power under its ``(K, n, n)`` modes).
_RAW_SOURCE = (
    r"""
#include <cupy/complex.cuh>
typedef complex<float> T;
#define ELEMENTS(size) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (size); \
         i += (long long)blockDim.x * gridDim.x)
#define TARGET(i) target[((i) / width) * stride + (i) % width]
#define WINDOW_HELD_MODES 4
#define MIX_MAX_MODES 12
"""
    + SLOT_MAX_CUDA
    + r"""
// The sums of one window pixel r over positions [b0, b1) of the batch: the object sums
// per position (atomics: the windows land at different places), the power and the summed
// probe terms over the positions in registers first, then one atomic add each. HELD > 0:
// that many modes' summed terms in registers (unrolled, static indices); 0: any number of
// modes, each term added atomically as it is made.
template <int HELD>
__device__ __forceinline__ void window_pixel(
    const T* dpsi, const T* probes, const T* canvas, const int* corners, int oy, int ox,
    int n, int box_width, int width, int k_modes, int per_position, const float* weights,
    int has_weights, int do_num, int do_den, int channels, int do_power, int track_max,
    int sum_terms, float* num, float* den, T* terms, float* power, unsigned int* den_slots,
    unsigned int* power_slots, float* terms_sum, long long r, int b0, int b1) {
    const long long nn = (long long)n * n;
    const long long y = r / n;
    const long long x = r - y * n;
    float held_re[HELD > 0 ? HELD : 1], held_im[HELD > 0 ? HELD : 1];
#pragma unroll
    for (int k = 0; k < (HELD > 0 ? HELD : 1); ++k) held_re[k] = held_im[k] = 0.f;
    float power_sum = 0.f;
    for (int b = b0; b < b1; ++b) {
        const long long gy = corners[2 * b] + y;
        const long long gx = corners[2 * b + 1] + x;
        const T o = (channels > 0 || do_power) ? canvas[gy * width + gx] : T(0, 0);
        const float o2 = o.real() * o.real() + o.imag() * o.imag();
        power_sum += o2;
        float re = 0.f, im = 0.f, illum = 0.f;
#pragma unroll
        for (int k = 0; k < (HELD > 0 ? HELD : k_modes); ++k) {
            if (HELD > 0 && k >= k_modes) break;
            const T d = dpsi[(b * (long long)k_modes + k) * nn + r];
            if (do_num) {
                const T p = probes[(per_position ? b * (long long)k_modes + k : k) * nn + r];
                re += p.real() * d.real() + p.imag() * d.imag();
                im += p.real() * d.imag() - p.imag() * d.real();
                illum += p.real() * p.real() + p.imag() * p.imag();
            }
            if (sum_terms) {
                const T t = conj(o) * d;
                if constexpr (HELD > 0) {
                    held_re[k] += t.real();
                    held_im[k] += t.imag();
                } else {
                    atomicAdd(&terms_sum[2 * (k * nn + r)], t.real());
                    atomicAdd(&terms_sum[2 * (k * nn + r) + 1], t.imag());
                }
            } else if (channels > 0) {
                terms[(b * (long long)channels + k) * nn + r] = conj(o) * d;
            }
        }
        if (channels > k_modes) {
            terms[(b * (long long)channels + k_modes) * nn + r] = T(o2, 0.f);
        }
        if (do_num) {
            const float w = has_weights ? weights[b] : 1.f;
            const long long dst = (gy - oy) * box_width + gx - ox;
            atomicAdd(&num[2 * dst], w * re);
            atomicAdd(&num[2 * dst + 1], w * im);
            if (do_den) {
                const float total = atomicAdd(&den[dst], illum) + illum;
                if (track_max) slot_max(den_slots, total);
            }
        }
    }
    if constexpr (HELD > 0) {
        if (sum_terms) {
#pragma unroll
            for (int k = 0; k < HELD; ++k) {
                if (k >= k_modes) break;
                atomicAdd(&terms_sum[2 * (k * nn + r)], held_re[k]);
                atomicAdd(&terms_sum[2 * (k * nn + r) + 1], held_im[k]);
            }
        }
    }
    if (do_power && b1 > b0) {
        const float total = atomicAdd(&power[r], power_sum) + power_sum;
        if (track_max) slot_max(power_slots, total);
    }
}

// One thread per window pixel and chunk of `chunk` positions: reads the exit-wave changes
// and the probes once for the object sums, the probe terms and the object power together.
extern "C" __global__ void liveptycho_window_sums(
    const T* dpsi, const T* probes, const T* canvas, const int* corners, int oy, int ox,
    int n, int box_width, int width, int k_modes, int per_position, const float* weights,
    int has_weights, int do_num, int do_den, int channels, int do_power, int track_max,
    int sum_terms, float* num, float* den, T* terms, float* power, unsigned int* den_slots,
    unsigned int* power_slots, float* terms_sum, int batch, int chunk, long long size) {
    const long long nn = (long long)n * n;
    ELEMENTS(size) {
        const long long c = i / nn;
        const long long r = i - c * nn;
        const int b0 = (int)c * chunk;
        const int b1 = min(batch, b0 + chunk);
        if (k_modes <= WINDOW_HELD_MODES) {
            window_pixel<WINDOW_HELD_MODES>(
                dpsi, probes, canvas, corners, oy, ox, n, box_width, width, k_modes,
                per_position, weights, has_weights, do_num, do_den, channels, do_power,
                track_max, sum_terms, num, den, terms, power, den_slots, power_slots,
                terms_sum, r, b0, b1);
        } else {
            window_pixel<0>(
                dpsi, probes, canvas, corners, oy, ox, n, box_width, width, k_modes,
                per_position, weights, has_weights, do_num, do_den, channels, do_power,
                track_max, sum_terms, num, den, terms, power, den_slots, power_slots,
                terms_sum, r, b0, b1);
        }
    }
}

// The probe-side sums of a whole-pixel update alone (the object sums made by tile):
// terms_sum_k += sum_b conj(O_b) dpsi_bk and power += sum_b |O_b|^2 at window pixel r, over
// PROBE_CHUNK positions a thread. Their corners, then all their object and exit-wave reads,
// are issued before any is used (window_sums reads them one position after another); one
// atomic add per chunk and sum.
"""
    + f"#define PROBE_CHUNK {_PROBE_CHUNK}\n"
    + r"""extern "C" __global__ void liveptycho_probe_sums(
    const T* __restrict__ dpsi, const T* __restrict__ canvas, const int* __restrict__ corners,
    int n, int width, int k_modes, int batch, int track_max, float* terms_sum, float* power,
    unsigned int* power_slots, long long size) {
    const long long nn = (long long)n * n;
    ELEMENTS(size) {
        const long long c = i / nn;
        const int r = (int)(i - c * nn);
        const int y = r / n, x = r - (r / n) * n;
        const int b0 = (int)c * PROBE_CHUNK;
        long long at[PROBE_CHUNK];
#pragma unroll
        for (int j = 0; j < PROBE_CHUNK; ++j) {
            const int b = min(b0 + j, batch - 1);
            at[j] = (long long)(corners[2 * b] + y) * width + corners[2 * b + 1] + x;
        }
        T o[PROBE_CHUNK];
        float power_sum = 0.f;
#pragma unroll
        for (int j = 0; j < PROBE_CHUNK; ++j) o[j] = b0 + j < batch ? canvas[at[j]] : T(0.f, 0.f);
#pragma unroll
        for (int j = 0; j < PROBE_CHUNK; ++j)
            power_sum += o[j].real() * o[j].real() + o[j].imag() * o[j].imag();
        for (int k = 0; k < k_modes; ++k) {
            T d[PROBE_CHUNK];
#pragma unroll
            for (int j = 0; j < PROBE_CHUNK; ++j)
                d[j] = b0 + j < batch ? dpsi[((long long)(b0 + j) * k_modes + k) * nn + r]
                                      : T(0.f, 0.f);
            T acc = T(0.f, 0.f);
#pragma unroll
            for (int j = 0; j < PROBE_CHUNK; ++j) acc += conj(o[j]) * d[j];
            atomicAdd(&terms_sum[2 * (k * nn + r)], acc.real());
            atomicAdd(&terms_sum[2 * (k * nn + r) + 1], acc.imag());
        }
        const float total = atomicAdd(&power[r], power_sum) + power_sum;
        if (track_max) slot_max(power_slots, total);
    }
}

// The object sums gathered by canvas tile, no atomics: one block per TILE_ROWS x 32 tile
// of the batch's box (box_h x box_w canvas pixels from (box_y, box_x), tiles_x tiles
// across) lists the positions whose windows meet its tile (in batch order, TILE_THREADS at
// a time, in shared memory) and sums, per canvas pixel, w_b sum_k conj(P_k) dpsi_bk and
// sum_k |P_k|^2 over them in registers. Each pixel is owned by one thread: the results are
// stored once, in the same order on every run. mode 0: num += sum, den += illumination
// (at origin (oy, ox), rows of acc_width); mode 1: num = sum, den = illumination on the
// whole box (0 where no window falls; the accumulators cover exactly the box, so they are
// written, never read); mode 2: target (the canvas, rows of target_width) += sum /
// regularised(den) (reg and den's maximum as regularised takes them; reg 0 for a den
// already regularised).
"""
    + "".join(
        f"#ifndef TILE_{name.upper()}\n#define TILE_{name.upper()} {value}\n#endif\n"
        for name, value in _TILE_SHAPE._asdict().items()
    )
    + r"""#define TILE_ROWS_PER_PASS (TILE_THREADS / 32)
#define TILE_PIXELS (TILE_ROWS / TILE_ROWS_PER_PASS)
// The batch's positions whose windows (n x n from their corners) meet the tile at (ty0,
// tx0): fill() lists those of positions [b0, b0 + TILE_THREADS) in batch order and returns
// their count; every thread of the block calls it, and the list holds until the block's
// next __syncthreads() after its use.
struct TileList {
    int b[TILE_THREADS];
    int y[TILE_THREADS];
    int x[TILE_THREADS];
    int warp_hits[TILE_THREADS / 32];

    __device__ int fill(const int* corners, int batch, int b0, int n, int ty0, int tx0) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int pos = b0 + threadIdx.x;
        int cy = 0, cx = 0;
        bool hit = false;
        if (pos < batch) {
            cy = corners[2 * pos];
            cx = corners[2 * pos + 1];
            hit = cy < ty0 + TILE_ROWS && cy + n > ty0 && cx < tx0 + 32 && cx + n > tx0;
        }
        const unsigned int mask = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_hits[warp] = __popc(mask);
        __syncthreads();
        int before = 0, hits = 0;
        for (int w = 0; w < TILE_THREADS / 32; ++w) {
            before += w < warp ? warp_hits[w] : 0;
            hits += warp_hits[w];
        }
        if (hit) {
            const int j = before + __popc(mask & ((1u << lane) - 1u));
            b[j] = pos;
            y[j] = cy;
            x[j] = cx;
        }
        __syncthreads();
        return hits;
    }
};

// The listed windows [0, hits) into this thread's pixels (column gx, rows row0 + p
// TILE_ROWS_PER_PASS), TILE_GROUP windows at a time: every load of a group is issued
// before any is used (predicated off outside a window, so those pixels add exact zeros).
template <int KM>
__device__ __forceinline__ void tile_hits(
    const T* __restrict__ dpsi, const T* __restrict__ probes,
    const float* __restrict__ weights, int has_weights, int per_position, int k_modes, int n,
    const TileList& list, int hits, int gx, int row0, float* re, float* im, float* illum,
    int& touched) {
    const int nn = n * n;
    const int km = KM > 0 ? KM : k_modes;
    for (int j0 = 0; j0 < hits; j0 += TILE_GROUP) {
        const T* d_at[TILE_GROUP];
        const T* p_at[TILE_GROUP];
        float w[TILE_GROUP];
        int at[TILE_GROUP][TILE_PIXELS];  // the pixel's place in the window; -1 outside it
#pragma unroll
        for (int u = 0; u < TILE_GROUP; ++u) {
            const bool listed = j0 + u < hits;
            const int j = listed ? j0 + u : j0;
            const int hb = list.b[j];
            const long long first = (long long)hb * km * nn;
            d_at[u] = dpsi + first;
            p_at[u] = per_position ? probes + first : probes;
            w[u] = has_weights ? weights[hb] : 1.f;
            const int x = gx - list.x[j];
            const bool in_x = listed && (unsigned)x < (unsigned)n;
#pragma unroll
            for (int p = 0; p < TILE_PIXELS; ++p) {
                const int y = row0 + p * TILE_ROWS_PER_PASS - list.y[j];
                const bool in = in_x && (unsigned)y < (unsigned)n;
                at[u][p] = in ? y * n + x : -1;
                touched |= (int)in << p;
            }
        }
        for (int k = 0; k < km; ++k) {
            T d[TILE_GROUP][TILE_PIXELS], q[TILE_GROUP][TILE_PIXELS];
#pragma unroll
            for (int u = 0; u < TILE_GROUP; ++u) {
#pragma unroll
                for (int p = 0; p < TILE_PIXELS; ++p) {
                    const int r = at[u][p];
                    d[u][p] = r >= 0 ? d_at[u][k * nn + r] : T(0.f, 0.f);
                    q[u][p] = r >= 0 ? p_at[u][k * nn + r] : T(0.f, 0.f);
                }
            }
#pragma unroll
            for (int u = 0; u < TILE_GROUP; ++u) {
#pragma unroll
                for (int p = 0; p < TILE_PIXELS; ++p) {
                    const T a = d[u][p], c = q[u][p];
                    re[p] += w[u] * (c.real() * a.real() + c.imag() * a.imag());
                    im[p] += w[u] * (c.real() * a.imag() - c.imag() * a.real());
                    illum[p] += c.real() * c.real() + c.imag() * c.imag();
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(TILE_THREADS, TILE_MIN_BLOCKS)
liveptycho_tile_sums(
    const T* __restrict__ dpsi, const T* __restrict__ probes, const int* __restrict__ corners,
    int batch, int n, int k_modes, int per_position, const float* __restrict__ weights,
    int has_weights, int box_y, int box_x, int box_h, int box_w, int tiles_x, int oy, int ox,
    int acc_width, float* num, float* den, int do_den, int track_max, unsigned int* den_slots,
    int mode, T* target, int target_width, const float* den_max, int has_slots, float reg) {
    __shared__ TileList list;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int ty0 = box_y + (blockIdx.x / tiles_x) * TILE_ROWS;
    const int tx0 = box_x + (blockIdx.x % tiles_x) * 32;
    const int gx = tx0 + lane;
    const float m = den_maximum(den_max, has_slots);
    float re[TILE_PIXELS], im[TILE_PIXELS], illum[TILE_PIXELS];
    int touched = 0;  // bit p: pixel p of this thread met a window
#pragma unroll
    for (int p = 0; p < TILE_PIXELS; ++p) re[p] = im[p] = illum[p] = 0.f;
    for (int b0 = 0; b0 < batch; b0 += TILE_THREADS) {
        const int hits = list.fill(corners, batch, b0, n, ty0, tx0);
        const int row0 = ty0 + warp;
        if (k_modes == 1) {
            tile_hits<1>(dpsi, probes, weights, has_weights, per_position, 1, n, list, hits, gx,
                         row0, re, im, illum, touched);
        } else {
            tile_hits<0>(dpsi, probes, weights, has_weights, per_position, k_modes, n, list,
                         hits, gx, row0, re, im, illum, touched);
        }
        __syncthreads();  // the next round rewrites the list
    }
    if (gx >= box_x + box_w) return;
    float den_top = 0.f;
#pragma unroll
    for (int p = 0; p < TILE_PIXELS; ++p) {
        const int gy = ty0 + warp + p * TILE_ROWS_PER_PASS;
        const bool met = (touched >> p) & 1;
        if (gy >= box_y + box_h || (mode != 1 && !met)) continue;
        const long long dst = (long long)(gy - oy) * acc_width + gx - ox;
        if (mode == 2) {
            target[(long long)gy * target_width + gx] +=
                T(re[p], im[p]) / regularised(den[dst], reg, m);
            continue;
        }
        const float total = mode == 1 ? illum[p] : (do_den ? den[dst] : 0.f) + illum[p];
        num[2 * dst] = mode == 1 ? re[p] : num[2 * dst] + re[p];
        num[2 * dst + 1] = mode == 1 ? im[p] : num[2 * dst + 1] + im[p];
        if (do_den) {
            den[dst] = total;
            den_top = fmaxf(den_top, total);
        }
    }
    if (track_max) slot_max(den_slots, den_top);
}

// LSQ-ML's step-fit sums (see _fused_sums' liveptycho_lsqml_sums) gathered by canvas tile:
// dO = num / regularised(den) and O are read once per canvas pixel, not once per window
// pixel. Per listed window: u = P_k dO, v = O dP_k (dprobes_mode 0: none, 1: shared, 2: per
// position) and chi_k at the window's pixels in this tile, summed into |u|^2, Re u* v,
// |v|^2, Re u* chi, Re v* chi over modes and pixels; reduced over the block (shared
// atomics), then added into out (B, 5) once per window and tile. num and den cover
// exactly the box (at its corner).
extern "C" __global__ void __launch_bounds__(TILE_THREADS, TILE_MIN_BLOCKS)
liveptycho_tile_step_sums(
    const T* __restrict__ chi, const T* __restrict__ probes, const T* __restrict__ dprobes,
    const T* __restrict__ canvas, const T* __restrict__ num, const float* __restrict__ den,
    const int* __restrict__ corners, int batch, int n, int k_modes, int probes_per_position,
    int dprobes_mode, int box_y, int box_x, int box_h, int box_w, int tiles_x, int width,
    const float* den_max, int has_slots, float reg, float* out) {
    __shared__ TileList list;
    __shared__ float part[TILE_THREADS][5];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int ty0 = box_y + (blockIdx.x / tiles_x) * TILE_ROWS;
    const int tx0 = box_x + (blockIdx.x % tiles_x) * 32;
    const int gx = tx0 + lane;
    const float m = den_maximum(den_max, has_slots);
    const int nn = n * n;
    T d_obj[TILE_PIXELS], obj[TILE_PIXELS];
#pragma unroll
    for (int p = 0; p < TILE_PIXELS; ++p) {
        const int gy = ty0 + warp + p * TILE_ROWS_PER_PASS;
        const bool in = gx < box_x + box_w && gy < box_y + box_h;
        const long long dst = (long long)(gy - box_y) * box_w + gx - box_x;
        d_obj[p] = in ? num[dst] / regularised(den[dst], reg, m) : T(0.f, 0.f);
        obj[p] = in && dprobes_mode ? canvas[(long long)gy * width + gx] : T(0.f, 0.f);
    }
    for (int b0 = 0; b0 < batch; b0 += TILE_THREADS) {
#pragma unroll
        for (int s = 0; s < 5; ++s) part[threadIdx.x][s] = 0.f;
        const int hits = list.fill(corners, batch, b0, n, ty0, tx0);
        const int row0 = ty0 + warp;
#pragma unroll 1
        for (int j = 0; j < hits; ++j) {
            const int hb = list.b[j];
            const long long first = (long long)hb * k_modes * nn;
            const int x = gx - list.x[j];
            const bool in_x = (unsigned)x < (unsigned)n;
            int at[TILE_PIXELS];
#pragma unroll
            for (int p = 0; p < TILE_PIXELS; ++p) {
                const int y = row0 + p * TILE_ROWS_PER_PASS - list.y[j];
                at[p] = in_x && (unsigned)y < (unsigned)n ? y * n + x : -1;
            }
            float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
            for (int k = 0; k < k_modes; ++k) {
                const T* c_at = chi + first + (long long)k * nn;
                const T* p_at = probes + (probes_per_position ? first : 0) + (long long)k * nn;
                const T* q_at = dprobes + (dprobes_mode == 2 ? first : 0) + (long long)k * nn;
                T c[TILE_PIXELS], q[TILE_PIXELS], dq[TILE_PIXELS];
#pragma unroll
                for (int p = 0; p < TILE_PIXELS; ++p) {
                    const int r = at[p];
                    c[p] = r >= 0 ? c_at[r] : T(0.f, 0.f);
                    q[p] = r >= 0 ? p_at[r] : T(0.f, 0.f);
                    dq[p] = r >= 0 && dprobes_mode ? q_at[r] : T(0.f, 0.f);
                }
#pragma unroll
                for (int p = 0; p < TILE_PIXELS; ++p) {
                    const T u = q[p] * d_obj[p];
                    const T v = obj[p] * dq[p];
                    acc[0] += u.real() * u.real() + u.imag() * u.imag();
                    acc[1] += u.real() * v.real() + u.imag() * v.imag();
                    acc[2] += v.real() * v.real() + v.imag() * v.imag();
                    acc[3] += u.real() * c[p].real() + u.imag() * c[p].imag();
                    acc[4] += v.real() * c[p].real() + v.imag() * c[p].imag();
                }
            }
#pragma unroll
            for (int s = 0; s < 5; ++s) {
                float sum = acc[s];
                for (int off = 16; off > 0; off /= 2)
                    sum += __shfl_down_sync(0xffffffffu, sum, off);
                if (lane == 0) atomicAdd(&part[j][s], sum);
            }
        }
        __syncthreads();
        if (threadIdx.x < hits) {
#pragma unroll
            for (int s = 0; s < 5; ++s)
                atomicAdd(&out[5 * list.b[threadIdx.x] + s], part[threadIdx.x][s]);
        }
        __syncthreads();  // the next round rewrites the list and the parts
    }
}

// target += weight num / max((1 - reg) (den + reg max(den)), 1e-30)
extern "C" __global__ void liveptycho_regularised_step(
    const T* num, const float* den, long long den_size, const float* den_max, int slots,
    float reg, float weight, T* target, long long width, long long stride, long long size) {
    const float m = den_maximum(den_max, slots);
    ELEMENTS(size) {
        const float d = regularised(den[i % den_size], reg, m);
        TARGET(i) += num[i] * (weight / d);
    }
}

// x /= max((1 - reg) (den + reg max(den)), 1e-30), den repeated over x's leading axes
// and left as it is
extern "C" __global__ void liveptycho_divide_regularised(
    const float* den, long long den_size, const float* den_max, int slots, float reg, T* x,
    long long size) {
    const float m = den_maximum(den_max, slots);
    ELEMENTS(size) {
        const float d = regularised(den[i % den_size], reg, m);
        const T v = x[i];
        x[i] = T(v.real() / d, v.imag() / d);
    }
}

// target += num / regularised(den) (reg and den's maximum; reg 0: den as is)
extern "C" __global__ void liveptycho_add_ratio(
    const T* num, const float* den, const float* den_max, int slots, float reg, T* target,
    long long width, long long stride, long long size) {
    const float m = den_maximum(den_max, slots);
    ELEMENTS(size) {
        TARGET(i) += num[i] / regularised(den[i], reg, m);
    }
}

// waves (B, K, nn) <- u (K, K) applied over the mode axis, in place: each (b, r) reads its
// K values once and writes K mixed ones (a batched GEMM with M = K tiles 32 rows for 3).
extern "C" __global__ void liveptycho_mix_modes(
    const T* u, int k_modes, long long nn, T* waves, long long size) {
    ELEMENTS(size) {
        T* w = waves + (i / nn) * k_modes * nn + i % nn;
        T held[MIX_MAX_MODES];
#pragma unroll
        for (int j = 0; j < MIX_MAX_MODES; ++j) {
            if (j >= k_modes) break;
            held[j] = w[j * nn];
        }
#pragma unroll
        for (int m = 0; m < MIX_MAX_MODES; ++m) {
            if (m >= k_modes) break;
            T mixed(0.f, 0.f);
#pragma unroll
            for (int j = 0; j < MIX_MAX_MODES; ++j) {
                if (j >= k_modes) break;
                mixed += u[m * k_modes + j] * held[j];
            }
            w[m * nn] = mixed;
        }
    }
}

// The probe modes' orthogonalising unitary, recon._modes.orthogonalize_modes in one
// launch of one block and no host sync (cuSOLVER's eigh made the host wait on every
// call, every second iteration): the Gram matrix
// G_ab = sum_r m_a[r] conj(m_b[r]) summed in a fixed order, diagonalised by cyclic
// complex Jacobi rotations in double precision, the eigenvectors sorted by decreasing
// eigenvalue, and each row's phase fixed so its largest coefficient (the first of equals)
// is real and positive. u (K, K) row-major; new modes = u @ modes (liveptycho_mix_modes).
#ifndef GRAM_MODES
#define GRAM_MODES 2
#endif
#ifndef GRAM_THREADS
#define GRAM_THREADS 1024
#endif
#define GRAM_PAIRS (GRAM_MODES * (GRAM_MODES + 1) / 2)
typedef complex<double> GramT;

extern "C" __global__ void __launch_bounds__(GRAM_THREADS) liveptycho_mode_unitary(
    const T* modes, long long nn, T* u) {
    __shared__ double2 part[GRAM_PAIRS][GRAM_THREADS / 32];
    T sum[GRAM_PAIRS];
#pragma unroll
    for (int e = 0; e < GRAM_PAIRS; ++e) sum[e] = T(0.f, 0.f);
    for (long long r = threadIdx.x; r < nn; r += GRAM_THREADS) {
        T v[GRAM_MODES];
#pragma unroll
        for (int m = 0; m < GRAM_MODES; ++m) v[m] = modes[m * nn + r];
        int e = 0;
#pragma unroll
        for (int p = 0; p < GRAM_MODES; ++p) {
#pragma unroll
            for (int q = p; q < GRAM_MODES; ++q) sum[e++] += v[p] * conj(v[q]);
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int e = 0; e < GRAM_PAIRS; ++e) {
        double re = sum[e].real(), im = sum[e].imag();
        for (int off = 16; off > 0; off >>= 1) {
            re += __shfl_down_sync(0xffffffffu, re, off);
            im += __shfl_down_sync(0xffffffffu, im, off);
        }
        if (lane == 0) part[e][warp] = make_double2(re, im);
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    // One thread from here: K is at most 12, a sweep K^3 multiply-adds. (Its matrices are
    // local: a __shared__ complex would need a constructor run.)
    GramT a[GRAM_MODES][GRAM_MODES], w[GRAM_MODES][GRAM_MODES];
    double total = 0.0;
    int e = 0;
    for (int p = 0; p < GRAM_MODES; ++p) {
        for (int q = p; q < GRAM_MODES; ++q, ++e) {
            double re = 0.0, im = 0.0;
            for (int j = 0; j < GRAM_THREADS / 32; ++j) {
                re += part[e][j].x;
                im += part[e][j].y;
            }
            if (p == q) im = 0.0;  // a Gram matrix's diagonal is real
            a[p][q] = GramT(re, im);
            a[q][p] = GramT(re, -im);
            total += (p == q ? 1.0 : 2.0) * (re * re + im * im);
        }
        for (int q = 0; q < GRAM_MODES; ++q) w[p][q] = GramT(p == q ? 1.0 : 0.0, 0.0);
    }
    for (int sweep = 0; sweep < 64; ++sweep) {
        double off = 0.0;
        for (int p = 0; p < GRAM_MODES; ++p)
            for (int q = p + 1; q < GRAM_MODES; ++q) off += norm(a[p][q]);
        if (off <= 1e-30 * total) break;
        for (int p = 0; p < GRAM_MODES; ++p) {
            for (int q = p + 1; q < GRAM_MODES; ++q) {
                const double r = abs(a[p][q]);
                if (r == 0.0) continue;
                // G = V R: V turns a_pq real (its phase e off column q), R the real
                // rotation that zeroes it; A <- G^H A G, W <- W G.
                const GramT e_pq = a[p][q] / r;
                const double theta = (a[q][q].real() - a[p][p].real()) / (2.0 * r);
                const double t =
                    (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                const double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int i = 0; i < GRAM_MODES; ++i) {
                    GramT x = a[i][p], y = a[i][q] * conj(e_pq);
                    a[i][p] = c * x - s * y;
                    a[i][q] = s * x + c * y;
                    x = w[i][p];
                    y = w[i][q] * conj(e_pq);
                    w[i][p] = c * x - s * y;
                    w[i][q] = s * x + c * y;
                }
                for (int j = 0; j < GRAM_MODES; ++j) {
                    const GramT x = a[p][j], y = a[q][j] * e_pq;
                    a[p][j] = c * x - s * y;
                    a[q][j] = s * x + c * y;
                }
                a[p][q] = a[q][p] = GramT(0.0, 0.0);
            }
        }
    }
    bool taken[GRAM_MODES];
    for (int j = 0; j < GRAM_MODES; ++j) taken[j] = false;
    for (int m = 0; m < GRAM_MODES; ++m) {
        int col = -1;
        for (int j = 0; j < GRAM_MODES; ++j)
            if (!taken[j] && (col < 0 || a[j][j].real() > a[col][col].real())) col = j;
        taken[col] = true;
        int lead = 0;
        for (int j = 1; j < GRAM_MODES; ++j)
            if (abs(w[j][col]) > abs(w[lead][col])) lead = j;
        // Row m is conj(column col); its lead times conj(lead) / |lead| is real, positive.
        const GramT ph = w[lead][col] / fmax(abs(w[lead][col]), 1e-30);
        for (int j = 0; j < GRAM_MODES; ++j) {
            const GramT v = conj(w[j][col]) * ph;
            u[m * GRAM_MODES + j] = T((float)v.real(), (float)v.imag());
        }
    }
}

// The end of a pass, as the solver's xp path does it in some thirty small operations:
// momentum (recon._momentum.Momentum.step; stage 0 none, 1 record x, 2 the first velocity
// is the change, 3 a full step), then the gauge (x / s for the object, x s for the probes,
// s = sqrt(power / total)), then the object's amplitude clamp (amax 0: none).
__device__ __forceinline__ T momentum_step(
    T x, T* previous, T* velocity, long long i, int stage, float friction, float gain) {
    if (stage >= 2) {
        const T change = x - previous[i];
        const T v = stage == 2 ? change : velocity[i] * friction + change;
        velocity[i] = v;
        x += v * gain;
    }
    if (stage >= 1) previous[i] = x;
    return x;
}

extern "C" __global__ void liveptycho_momentum(
    T* x, T* previous, T* velocity, int stage, float friction, float gain, long long size) {
    ELEMENTS(size) {
        x[i] = momentum_step(x[i], previous, velocity, i, stage, friction, gain);
    }
}

// total[0] = sum |x|^2, by one block (blockDim a power of two, at most 1024) in a fixed
// order: the same total on every run, read by liveptycho_pass_tail's gauge.
extern "C" __global__ void liveptycho_power_total(const T* x, long long size, float* total) {
    __shared__ float part[1024];
    float sum = 0.f;
    for (long long i = threadIdx.x; i < size; i += blockDim.x) {
        const T v = x[i];
        sum += v.real() * v.real() + v.imag() * v.imag();
    }
    part[threadIdx.x] = sum;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) total[0] = part[0];
}

// Elements [0, object_size) are the object's (momentum, gauge, clamp); the rest, with the
// gauge, the probes' (times s).
extern "C" __global__ void liveptycho_pass_tail(
    T* objects, T* previous, T* velocity, int stage, float friction, float gain,
    const float* power, const float* total, int gauge, float amax, T* probes,
    long long object_size, long long size) {
    const float s = gauge ? sqrtf(power[0] / total[0]) : 1.f;
    ELEMENTS(size) {
        if (i < object_size) {
            T o = momentum_step(objects[i], previous, velocity, i, stage, friction, gain);
            if (gauge) o = T(o.real() / s, o.imag() / s);
            if (amax > 0.f) {
                const float a = abs(o);
                if (a > amax) {
                    const float f = amax / fmaxf(a, 1e-30f);
                    o = T(o.real() * f, o.imag() * f);
                }
            }
            objects[i] = o;
        } else {
            const T p = probes[i - object_size];
            probes[i - object_size] = T(p.real() * s, p.imag() * s);
        }
    }
}

// target += x scale[0]
extern "C" __global__ void liveptycho_add_scaled(
    const T* x, const float* scale, T* target, long long width, long long stride,
    long long size) {
    const float s = scale[0];
    ELEMENTS(size) {
        TARGET(i) += x[i] * s;
    }
}
"""
)

#: Threads per block of the raw element-wise kernels.
_BLOCK = 128
#: Most modes :func:`mix_modes` holds (``MIX_MAX_MODES`` of the source; the configuration
#: allows 12).
_MIX_MAX_MODES = 12


@functools.cache
def _raw(name: str, options: tuple[str, ...] = ()) -> Any:
    """Raw kernel ``liveptycho_<name>`` of :data:`_RAW_SOURCE` built with the extra compiler
    ``options`` (CuPy compiles and loads it once per device)."""
    import cupy as cp

    return cp.RawKernel(_RAW_SOURCE, f"liveptycho_{name}", options=("-std=c++17", *options))


def _launch(name: str, size: int, args: tuple) -> None:
    """Run raw kernel ``name`` with one thread per element of ``size``."""
    if size:
        blocks = min(-(-size // _BLOCK), 2**31 - 1)
        _raw(name)((blocks,), (_BLOCK,), (*args, np.int64(size)))


def _contiguous(*arrays: Any) -> None:
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"a raw kernel needs C-contiguous arrays, got strides {a.strides}")


def _rows(target: Any, size: int) -> tuple[Any, Any]:
    """``(width, stride)`` of ``target`` as rows (see :data:`_RAW_SOURCE`): any C-contiguous
    array of ``size`` elements, or a 2-D view whose rows are contiguous."""
    width = target.shape[-1]
    if target.size != size:
        raise ValueError(f"target has {target.size} elements, the update {size}")
    if target.flags.c_contiguous:
        return np.int64(width), np.int64(width)
    if target.ndim == 2 and target.strides[1] == target.itemsize:
        return np.int64(width), np.int64(target.strides[0] // target.itemsize)
    raise ValueError(f"target of strides {target.strides} is not a set of contiguous rows")


@functools.cache
def _placeholder(device: int, dtype: str) -> Any:
    """A small zeroed array on ``device`` that stands in for an absent array argument
    (never read: the kernel's flag says it is absent)."""
    import cupy as cp

    with cp.cuda.Device(device):
        return cp.zeros(SLOT_FLOATS, dtype=dtype)


def _dummy(dtype: Any) -> Any:
    import cupy as cp

    # ``.str`` ('<f4'), not ``.name``: NumPy computes the name in Python, and a batch
    # takes a placeholder four or five times.
    return _placeholder(cp.cuda.runtime.getDevice(), np.dtype(dtype).str)


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
        table if has_table else _dummy(cp.complex64),
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


def window_sums(
    dpsi: Any,
    probes: Any,
    canvas: Any,
    corners: Any,
    *,
    origin: tuple[int, int] = (0, 0),
    num: Any | None = None,
    den: Any | None = None,
    weights: Any | None = None,
    terms_channels: int = 0,
    power: Any | None = None,
    den_max: Any | None = None,
    power_max: Any | None = None,
    terms_sum: Any | None = None,
    box: tuple[int, int, int, int] | None = None,
    overwrite: bool = False,
) -> Any | None:
    """The sums of an update, from exit-wave changes ``dpsi`` (B, K, n, n), in one pass
    (two with ``box``).

    * ``num`` (complex64) / ``den`` (float32) canvases covering the box at ``origin``:
      ``num += w_b sum_k conj(P_k) dpsi_k`` and ``den += sum_k |P_k|^2`` at each window
      (``w_b``: ``weights`` (B,) float32, or 1); ``den`` None skips the illumination;
    * ``terms_channels`` K: returns the probe terms ``conj(O_b) dpsi_bk`` (B, K, n, n);
      K + 1: plus ``|O_b|^2`` as channel K (B, K + 1, n, n);
    * ``terms_sum`` (K, n, n) complex64, with ``terms_channels`` K: the probe terms are
      added into it over the batch (atomics) instead of returned per position: the
      whole-pixel probe update, which needs only their sum;
    * ``power`` (n, n) float32: ``power += sum_b |O_b|^2``;
    * ``den_max`` / ``power_max``: zeroed slots (:func:`max_slots`) that receive the
      maximum of ``den`` / ``power`` after the sums (both or neither). The sums only
      grow, so the largest partial sum is the largest total: no separate reduction.

    ``box`` ``(y0, x0, y1, x1)``, the canvas pixels the windows cover: with up to
    :data:`_TILE_MODES` modes the object sums are gathered by canvas tile (:func:`_tile_launch`,
    no atomics, a fixed order), and a second pass makes the probe-side sums, if any were
    asked for (the summed ones, with ``power``, in a kernel of their own that issues a
    chunk of positions' reads at once, as with no ``num`` at all). Otherwise every
    position adds its window with atomics (one per pixel and sum); the tiles are the
    faster of the two on the solver's scans (``benchmarks/tile_sums.py``).

    ``overwrite``: ``num`` and ``den`` cover exactly ``box`` (``origin`` its corner) and
    become the sums, whatever they held (empty arrays will do): the tiles write them
    without reading them, the atomics zero them first.

    ``O_b`` is the window of ``canvas`` at ``corners`` (the object before this update).
    """
    import cupy as cp

    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    summed = terms_sum is not None
    if summed and terms_channels != k:
        raise ValueError(f"terms_sum takes the {k} probe terms, not {terms_channels} channels")
    track = den_max is not None
    if track != (power_max is not None):
        raise ValueError("den_max and power_max go together")
    per_term = terms_channels and not summed
    terms = cp.empty((b, terms_channels, n, n), dtype=dpsi.dtype) if per_term else None
    given = [a for a in (num, den, power, den_max, power_max, terms_sum) if a is not None]
    _contiguous(dpsi, probes, canvas, corners, *given)
    absent = _dummy(cp.float32)
    i32 = np.int32
    if box is not None and num is not None and k <= _TILE_MODES:
        _tile_launch(
            dpsi,
            probes,
            corners,
            box,
            weights,
            num=num,
            den=den,
            origin=origin,
            overwrite=overwrite,
            den_slots=den_max if den is not None else None,
        )
        num = den = weights = None
        if not (terms_channels or power is not None):
            return None
    elif overwrite:
        for accumulator in (a for a in (num, den) if a is not None):
            accumulator.fill(0)
    if num is None and summed and power is not None:
        _probe_sums(dpsi, canvas, corners, terms_sum, power, power_max)
        return None
    chunks = -(-b // _WINDOW_CHUNK)
    _launch(
        "window_sums",
        chunks * n * n,
        (
            dpsi,
            probes,
            canvas,
            corners,
            i32(origin[0]),
            i32(origin[1]),
            i32(n),
            i32(num.shape[1] if num is not None else 0),
            i32(canvas.shape[1]),
            i32(k),
            i32(probes.ndim == 4),
            weights if weights is not None else absent,
            i32(weights is not None),
            i32(num is not None),
            i32(den is not None),
            i32(terms_channels),
            i32(power is not None),
            i32(track),
            i32(summed),
            num if num is not None else absent,
            den if den is not None else absent,
            terms if per_term else absent,
            power if power is not None else absent,
            den_max if track else absent,
            power_max if track else absent,
            terms_sum if summed else absent,
            i32(b),
            i32(_WINDOW_CHUNK),
        ),
    )
    return terms


def _probe_sums(
    dpsi: Any, canvas: Any, corners: Any, terms_sum: Any, power: Any, power_max: Any | None
) -> None:
    """The whole-pixel probe-side sums of :func:`window_sums` (``terms_sum``, ``power``,
    ``power_max``) alone: for a batch whose object sums were gathered by tile, and DM's
    probe pass."""
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    chunks = -(-b // _PROBE_CHUNK)
    track = power_max is not None
    i32 = np.int32
    args = (dpsi, canvas, corners, i32(n), i32(canvas.shape[1]), i32(k), i32(b), i32(track))
    slots = power_max if track else _dummy(np.float32)
    _launch("probe_sums", chunks * n * n, (*args, terms_sum, power, slots))


def _tile_grid(box: tuple[int, int, int, int], shape: TileShape) -> tuple[int, int, int, int]:
    """``(height, width, tiles_x, tiles)`` of ``box`` ``(y0, x0, y1, x1)``: the tile
    kernels' grid, one block per ``shape.rows`` x 32 tile, ``tiles_x`` across (no tiles for
    an empty box)."""
    height, width = box[2] - box[0], box[3] - box[1]
    tiles_x = -(-width // 32)
    if height <= 0 or width <= 0:
        return height, width, tiles_x, 0
    return height, width, tiles_x, -(-height // shape.rows) * tiles_x


def _tile_launch(
    dpsi: Any,
    probes: Any,
    corners: Any,
    box: tuple[int, int, int, int],
    weights: Any | None,
    *,
    num: Any | None = None,
    den: Any,
    origin: tuple[int, int],
    overwrite: bool = False,
    den_slots: Any | None = None,
    canvas: Any | None = None,
    reg_args: tuple = (),
    shape: TileShape = _TILE_SHAPE,
) -> None:
    """Launch ``liveptycho_tile_sums`` over the tiles of ``box``: ``num`` and ``den`` (rows
    from ``origin``; ``den`` None: no illumination; ``den_slots``: track its maximum)
    gain the sums (``overwrite``: become them, on exactly the box), or (``canvas``) the
    canvas gains their ratio, ``den`` regularised as ``reg_args`` (from
    :func:`regularising`; none: taken as it is) say."""
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    _contiguous(dpsi, probes, corners, *(a for a in (weights, den_slots) if a is not None))
    height, width, tiles_x, tiles = _tile_grid(box, shape)
    if b == 0 or tiles == 0:
        return
    ratio = canvas is not None
    accumulator = num if num is not None else den
    assert accumulator is not None, "tile sums need num or den"
    if overwrite and (tuple(origin) != tuple(box[:2]) or accumulator.shape != (height, width)):
        raise ValueError(f"overwritten sums {accumulator.shape} at {origin} are not the box {box}")
    absent = _dummy(np.float32)
    i32 = np.int32
    args = (
        dpsi,
        probes,
        corners,
        i32(b),
        i32(n),
        i32(k),
        i32(probes.ndim == 4),
        weights if weights is not None else absent,
        i32(weights is not None),
        *(i32(v) for v in (box[0], box[1], height, width, tiles_x, origin[0], origin[1])),
        i32(accumulator.shape[-1]),
        num if num is not None else absent,
        den if den is not None else absent,
        i32(den is not None and not ratio),
        i32(den_slots is not None),
        den_slots if den_slots is not None else absent,
        i32(2 if ratio else int(overwrite)),
        canvas if ratio else _dummy(np.complex64),
        i32(canvas.shape[1] if canvas is not None else 0),
        *(reg_args or regularising(den, 0.0, None)),
    )
    _raw("tile_sums", shape.options())((tiles,), (shape.threads,), args)


def regularising(den: Any, reg: float, den_max: Any | None) -> tuple[Any, Any, Any]:
    """The kernels' ``(den_max, has_slots, reg)`` arguments for regularising ``den`` as it
    is read, as :func:`divide_regularised` does (reg 0: ``den`` taken as it is)."""
    if not reg:
        return _dummy(np.float32), np.int32(0), np.float32(0)
    return (*max_of(den, den_max), np.float32(reg))


def add_window_ratio(
    canvas: Any,
    dpsi: Any,
    probes: Any,
    corners: Any,
    den: Any,
    *,
    box: tuple[int, int, int, int],
    weights: Any | None = None,
    reg: float = 0.0,
    den_max: Any | None = None,
) -> None:
    """``canvas += (sum_b w_b sum_k conj(P_k) dpsi_bk over the windows) / den`` in place,
    ``den`` covering ``box`` ``(y0, x0, y1, x1)`` and regularised on the way as
    :func:`divide_regularised` does with ``reg`` and ``den_max`` (reg 0: ``den`` already
    regularised). Up to :data:`_TILE_MODES` modes: :func:`window_sums`,
    :func:`regularising` and a ``num / den`` add in one pass, with no ``num`` array (the
    sums gathered by canvas tile); with more, the atomic sums into a ``num`` array, then
    one pass that adds the ratio."""
    import cupy as cp

    _contiguous(canvas, den)
    if den.shape != (box[2] - box[0], box[3] - box[1]):
        raise ValueError(f"den {den.shape} does not cover the box {box}")
    reg_args = regularising(den, reg, den_max)
    if dpsi.shape[1] > _TILE_MODES:
        num = cp.zeros(den.shape, dtype=cp.complex64)
        window_sums(dpsi, probes, canvas, corners, origin=box[:2], num=num, weights=weights)
        target = canvas[box[0] : box[2], box[1] : box[3]]
        width, stride = _rows(target, num.size)
        _launch("add_ratio", num.size, (num, den, *reg_args, target, width, stride))
        return
    _tile_launch(
        dpsi,
        probes,
        corners,
        box,
        weights,
        den=den,
        origin=box[:2],
        canvas=canvas,
        reg_args=reg_args,
    )


def step_sums_arrays(
    chi: Any, probes: Any, dprobes: Any | None, canvas: Any, num: Any, den: Any, corners: Any
) -> tuple[tuple, int]:
    """The arrays both step-fit kernels take first (an absent probe step stands in as the
    probes, never read), and the probe step's mode: 0 none, 1 shared, 2 per position."""
    mode = 0 if dprobes is None else (2 if dprobes.ndim == 4 else 1)
    step = dprobes if dprobes is not None else probes
    return (chi, probes, step, canvas, num, den, corners), mode


def tile_step_sums(
    chi: Any,
    probes: Any,
    dprobes: Any | None,
    canvas: Any,
    num: Any,
    den: Any,
    corners: Any,
    box: tuple[int, int, int, int],
    reg_args: tuple,
    out: Any,
    shape: TileShape = _TILE_SHAPE,
) -> None:
    """LSQ-ML's step-fit sums (B, 5) added into ``out``, gathered by canvas tile: as
    :func:`~hxn_liveptycho.recon._fused_sums.lsqml_step_sums`, whose arguments these are
    (``num`` and ``den`` covering exactly ``box``, ``reg_args`` from :func:`regularising`),
    with ``dO`` and ``O`` read once per canvas pixel instead of once per window pixel."""
    b, k, n = chi.shape[0], chi.shape[1], chi.shape[-1]
    height, width, tiles_x, tiles = _tile_grid(box, shape)
    if num.shape != (height, width) or den.shape != num.shape:
        raise ValueError(f"step sums {num.shape} / {den.shape} do not cover the box {box}")
    if b == 0 or tiles == 0:
        return
    _contiguous(chi, probes, canvas, num, den, corners, out)
    arrays, mode = step_sums_arrays(chi, probes, dprobes, canvas, num, den, corners)
    i32 = np.int32
    args = (
        *arrays,
        *(i32(v) for v in (b, n, k, probes.ndim == 4, mode, box[0], box[1], height, width)),
        i32(tiles_x),
        i32(canvas.shape[1]),
        *reg_args,
        out,
    )
    _raw("tile_step_sums", shape.options())((tiles,), (shape.threads,), args)


def max_slots(buffer: Any) -> Any:
    """The slots of a running maximum, as a view of a zeroed float32 ``buffer`` of at
    least :data:`SLOT_FLOATS` elements (allocate them with the sums they track: one
    memset for both)."""
    return buffer[:SLOT_FLOATS]


def max_of(den: Any, slots: Any | None) -> tuple[Any, Any]:
    """``(den_max, has_slots)`` as the kernels take ``max(den)``: the tracked slots, else
    a reduction's 0-d result."""
    import cupy as cp

    return (slots, np.int32(1)) if slots is not None else (cp.max(den), np.int32(0))


def regularised_step(
    target: Any, num: Any, den: Any, reg: float, weight: float, slots: Any | None = None
) -> None:
    """``target += weight num / max((1 - reg) (den + reg max(den)), 1e-30)`` in place: the
    same regularised denominator as the xp path's ``_regularised`` (scale, then add the
    scaled maximum). ``den`` is the shape of ``num`` or of its last axes (repeated over
    the leading ones); ``target`` may be a box of a larger canvas. ``slots``:
    ``max(den)`` as :func:`window_sums` tracked it (else a reduction finds it)."""
    _contiguous(num, den)
    width, stride = _rows(target, num.size)
    if num.size % den.size:
        raise ValueError(f"den {den.shape} does not repeat over num {num.shape}")
    m, from_slots = max_of(den, slots)
    args = (np.float32(reg), np.float32(weight), target, width, stride)
    _launch("regularised_step", num.size, (num, den, np.int64(den.size), m, from_slots, *args))


def divide_regularised(x: Any, den: Any, reg: float, slots: Any | None = None) -> Any:
    """``x /= max((1 - reg) (den + reg max(den)), 1e-30)`` (the xp path's ``_regularised``;
    ``den`` itself unchanged), in place, in one launch; ``den`` is the shape of ``x`` or of
    its last axes. Returns ``x``. ``slots`` as :func:`regularised_step`."""
    _contiguous(x, den)
    if x.size % den.size:
        raise ValueError(f"den {den.shape} does not repeat over {x.shape}")
    m, from_slots = max_of(den, slots)
    args = (den, np.int64(den.size), m, from_slots, np.float32(reg), x)
    _launch("divide_regularised", x.size, args)
    return x


def add_scaled(target: Any, x: Any, scale: Any) -> None:
    """``target += x * scale`` in place, ``scale`` a 0-d float32 device array."""
    _contiguous(x)
    width, stride = _rows(target, x.size)
    _launch("add_scaled", x.size, (x, scale, target, width, stride))


#: Threads of :func:`pass_tail`'s one-block power total (a power of two, at most 1024).
_TOTAL_THREADS = 1024


def momentum_step(
    x: Any, stage: int, previous: Any, velocity: Any, friction: float, gain: float
) -> None:
    """``Momentum.step`` (``recon._momentum``) on ``x`` in one pass, with the ``(stage,
    previous, velocity)`` that ``Momentum.buffers_for`` gives."""
    _contiguous(x, previous, velocity)
    f32 = np.float32
    _launch("momentum", x.size, (x, previous, velocity, np.int32(stage), f32(friction), f32(gain)))


def pass_tail(
    objects: Any,
    probes: Any,
    *,
    momentum: tuple[int, Any, Any],
    friction: float,
    gain: float,
    power: Any | None,
    amax: float | None,
) -> None:
    """The end of a pass over ``objects`` and ``probes`` in place, in two launches (one
    without the gauge): the objects' momentum step (``momentum`` as
    :meth:`~hxn_liveptycho.recon._momentum.Momentum.buffers_for` gives it; stage 0: none),
    then with ``power`` (the probes' target ``sum |P|^2``, 0-d float32) the gauge, objects
    divided and probes multiplied by ``sqrt(power / sum |P|^2)``, then the objects'
    amplitude clamp at ``amax`` (None: none). The xp path's ``_fix_gauge`` and
    ``_clamp_object`` in order, with the probes' sum in a fixed order."""
    import cupy as cp

    stage, previous, velocity = momentum
    _contiguous(objects, probes, previous, velocity)
    gauge = power is not None
    total = _dummy(np.float32)
    if gauge:
        power = cp.asarray(power, dtype=cp.float32)  # a pointer to it (no copy if it is one)
        total = cp.empty((), dtype=cp.float32)
        _raw("power_total")((1,), (_TOTAL_THREADS,), (probes, np.int64(probes.size), total))
    size = objects.size + (probes.size if gauge else 0)
    f32 = np.float32
    args: tuple[Any, ...] = (objects, previous, velocity, np.int32(stage), f32(friction), f32(gain))
    args += (power if gauge else _dummy(np.float32), total, np.int32(gauge), f32(amax or 0.0))
    _launch("pass_tail", size, (*args, probes, np.int64(objects.size)))


def mix_modes(waves: Any, u: Any) -> None:
    """``waves[b] <- u @ waves[b]`` over the mode axis of (B, K, n, n), in place: the
    stored exit waves following the orthogonalised probe modes, in one read and one write
    (CuPy's batched GEMM for K = 3 took several times the copy time)."""
    import cupy as cp

    _contiguous(waves)
    k = waves.shape[1]
    if not 1 <= k <= _MIX_MAX_MODES:
        raise ValueError(f"mix_modes takes 1 to {_MIX_MAX_MODES} modes, got {k}")
    if u.shape != (k, k):
        raise ValueError(f"a mixing of {k} modes is ({k}, {k}), got {u.shape}")
    nn = waves.shape[-2] * waves.shape[-1]
    mixing = cp.ascontiguousarray(u, dtype=cp.complex64)
    _launch("mix_modes", waves.shape[0] * nn, (mixing, np.int32(k), np.int64(nn), waves))


#: Most modes for which :func:`mode_unitary`'s block takes 1,024 threads (beyond, 256: the
#: Gram's K (K + 1) / 2 complex sums a thread holds would pass the 64 registers of 1,024).
_GRAM_WIDE_MODES = 4


@functools.cache
def _gram_build(k: int) -> tuple[int, tuple[str, ...]]:
    """Threads of :func:`mode_unitary`'s block for ``k`` modes and the options that build
    its kernel (one build per mode count)."""
    threads = 1024 if k <= _GRAM_WIDE_MODES else 256
    return threads, (f"-DGRAM_MODES={k}", f"-DGRAM_THREADS={threads}")


def mode_unitary(modes: Any) -> Any:
    """The (K, K) complex64 unitary that orthogonalises and sorts ``modes`` (K, ...), as
    :func:`~hxn_liveptycho.recon._modes.orthogonalize_modes` makes it, in one launch that
    leaves the host free (no eigen-solver round trip); :func:`mix_modes` applies it."""
    import cupy as cp

    _contiguous(modes)
    k = modes.shape[0]
    if not 1 <= k <= _MIX_MAX_MODES:
        raise ValueError(f"mode_unitary takes 1 to {_MIX_MAX_MODES} modes, got {k}")
    threads, options = _gram_build(k)
    u = cp.empty((k, k), dtype=cp.complex64)
    _raw("mode_unitary", options)((1,), (threads,), (modes, np.int64(modes.size // k), u))
    return u


def scaled_copy(x: Any, scale: float) -> Any:
    """``scale * x`` as a new array (one pass)."""
    import cupy as cp

    return _kernels()["scaled"](x, cp.float32(scale))
