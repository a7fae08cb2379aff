
#include <cupy/complex.cuh>
typedef complex<float> T;
#define ELEMENTS(size) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (size); \
         i += (long long)blockDim.x * gridDim.x)
#define TARGET(i) target[((i) / width) * stride + (i) % width]
#define WINDOW_HELD_MODES 4
#define MIX_MAX_MODES 12
/*@SLOT_MAX@*/
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
/*@PROBE_CHUNK@*/extern "C" __global__ void liveptycho_probe_sums(
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
/*@TILE_SHAPE@*/#define TILE_ROWS_PER_PASS (TILE_THREADS / 32)
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
