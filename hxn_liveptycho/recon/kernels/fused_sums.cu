
#include <cupy/complex.cuh>
typedef complex<float> cf;
/*@SLOT_MAX@*/

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
// phi, sum (v (|phi| - A))^2, into out (B, 3); |.| over modes, |2 phi - psi|^2 floored at
// floor (the modulus floor: below it the wave's phase is rounding).
extern "C" __global__ void liveptycho_dm_sums(
    const cf* phi, const cf* old, const float* amps, const long long* rows, const float* valid,
    int has_valid, int k_modes, int nn, float floor, float* out) {
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
        const float dev = (sqrtf(fmaxf(ri, floor)) - a) * v;
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
    float scale, float floor) {
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
        const float mag = sqrtf(fmaxf(ri, floor));
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
