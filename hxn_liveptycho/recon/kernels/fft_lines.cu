
#include <cupy/complex.cuh>
typedef complex<float> cf;

// The 8- and 16-point DFTs in registers, as straight-line code (see _codelets): every index
// is a literal, so nothing spills to local memory.
DFT_CODELETS

template <bool WARP>
__device__ __forceinline__ void line_sync() {
    if (WARP) __syncwarp(); else __syncthreads();
}

// One N = P^2 point DFT of a line whose P threads hold v[m] = x[t + P m] (t: the thread's
// place in the line); afterwards v[m] = X[t + P m]. Scratch element (a, b) of the line is
// S[(a * LS + b) * CS]; tw[m] = exp(-2 pi i m / N). WARP: the line lies in one warp.
template <int P, int LOG, bool INV, bool WARP>
__device__ __forceinline__ void fft_line(cf* v, cf* S, int t, int LS, int CS, const cf* tw) {
    dft<P, INV>(v);
#pragma unroll
    for (int j = 1; j < P; ++j) {
        const cf w = tw[t * j];
        v[j] *= INV ? conj(w) : w;
    }
    line_sync<WARP>();  // the scratch is free: the line's last reads of it are done
#pragma unroll
    for (int j = 0; j < P; ++j) S[(j * LS + t) * CS] = v[j];
    line_sync<WARP>();
#pragma unroll
    for (int m = 0; m < P; ++m) v[m] = S[(t * LS + m) * CS];
    dft<P, INV>(v);
}

// Rows: block (P, 256 / P) = one row per threadIdx.y; scratch P x (P + 1) per row.
#define ROW_SETUP(P)                                                               \
    constexpr int N = P * P, LINES = 256 / P;                                      \
    __shared__ float2 raw[LINES * P * (P + 1)];                                    \
    cf* S = reinterpret_cast<cf*>(raw) + threadIdx.y * P * (P + 1);                \
    const int t = threadIdx.x;                                                     \
    cf v[P];

// out (B, K, N, N) <- the row transforms of the exit waves canvas[window_b] * P_bk.
template <int P, int LOG>
__global__ void liveptycho_exit_rows(
    const cf* canvas, const cf* probes, const int* corners, int width, int k_modes,
    int per_position, const cf* tw, cf* out) {
    ROW_SETUP(P)
    const int y = blockIdx.x * LINES + threadIdx.y;
    const long long bk = blockIdx.y, b = bk / k_modes, k = bk - b * k_modes;
    const cf* o = canvas + (long long)(corners[2 * b] + y) * width + corners[2 * b + 1];
    const cf* p = probes + ((per_position ? bk : k) * N + y) * (long long)N;
#pragma unroll
    for (int m = 0; m < P; ++m) v[m] = o[t + P * m] * p[t + P * m];
    fft_line<P, LOG, false, true>(v, S, t, P + 1, 1, tw);
    cf* d = out + (bk * N + y) * (long long)N;
#pragma unroll
    for (int m = 0; m < P; ++m) d[t + P * m] = v[m];
}

// x (lines, N) in place: each row transformed.
template <int P, int LOG, bool INV>
__global__ void liveptycho_rows(cf* x, const cf* tw) {
    ROW_SETUP(P)
    cf* row = x + ((long long)blockIdx.x * LINES + threadIdx.y) * N;
#pragma unroll
    for (int m = 0; m < P; ++m) v[m] = row[t + P * m];
    fft_line<P, LOG, INV, true>(v, S, t, P + 1, 1, tw);
#pragma unroll
    for (int m = 0; m < P; ++m) row[t + P * m] = v[m];
}

// dst (lines, N) <- the row transforms of scale * src (lines, N): a scaled copy that
// costs no pass of its own.
template <int P, int LOG, bool INV>
__global__ void liveptycho_rows_scaled(const cf* src, cf* dst, float scale, const cf* tw) {
    ROW_SETUP(P)
    const long long line = ((long long)blockIdx.x * LINES + threadIdx.y) * N;
#pragma unroll
    for (int m = 0; m < P; ++m) v[m] = src[line + t + P * m] * scale;
    fft_line<P, LOG, INV, true>(v, S, t, P + 1, 1, tw);
#pragma unroll
    for (int m = 0; m < P; ++m) dst[line + t + P * m] = v[m];
}

// Columns: block (256 / P columns, P); scratch P x P per column, columns innermost.
#define COLUMN_SETUP(P)                                                            \
    constexpr int N = P * P, COLS = 256 / P;                                       \
    __shared__ float2 raw[P * P * COLS];                                           \
    cf* S = reinterpret_cast<cf*>(raw) + threadIdx.x;                              \
    const int t = threadIdx.y;                                                     \
    const int col = blockIdx.x * COLS + threadIdx.x;

// x (planes, N, N) in place: each column transformed.
template <int P, int LOG, bool INV>
__global__ void liveptycho_columns(cf* x, const cf* tw) {
    COLUMN_SETUP(P)
    cf v[P];
    cf* c = x + (long long)blockIdx.y * N * N + col;
#pragma unroll
    for (int m = 0; m < P; ++m) v[m] = c[(t + P * m) * N];
    fft_line<P, LOG, INV, false>(v, S, t, P, COLS, tw);
#pragma unroll
    for (int m = 0; m < P; ++m) c[(t + P * m) * N] = v[m];
}

// out (B, K, N, N) <- the inverse column transforms of scale * spectra_k * ramp_b, the
// ramp separable: table (B, 2, N) holds each position's factors along y and along x.
// A rows pass (inverse) then gives the modes shifted by each position's fraction.
template <int P, int LOG>
__global__ void liveptycho_shifted_columns(
    const cf* spectra, const cf* table, int k_modes, float scale, const cf* tw, cf* out) {
    COLUMN_SETUP(P)
    const long long bk = blockIdx.y, b = bk / k_modes, k = bk - b * k_modes;
    const cf* ry = table + 2 * b * N;
    const cf rx = table[(2 * b + 1) * N + col] * scale;
    const cf* c = spectra + k * N * N + col;
    cf v[P];
#pragma unroll
    for (int m = 0; m < P; ++m) v[m] = c[(t + P * m) * N] * (ry[t + P * m] * rx);
    fft_line<P, LOG, true, false>(v, S, t, P, COLS, tw);
    cf* d = out + bk * N * N + col;
#pragma unroll
    for (int m = 0; m < P; ++m) d[(t + P * m) * N] = v[m];
}

// out (C, N, N) += scale sum_b conj(ramp_b) F_b, F_b the column transforms of f (B, C, N, N)
// (rows already transformed): the adjoint of the shift, summed over the batch. Each block
// sums `chunk` positions in registers, then adds once per pixel (atomics on out's floats).
template <int P, int LOG>
__global__ void liveptycho_unshift_columns(
    const cf* f, const cf* table, int batch, int channels, int chunk, float scale,
    const cf* tw, float* out) {
    COLUMN_SETUP(P)
    const int c = blockIdx.y;
    const int first = blockIdx.z * chunk, stop = min(batch, first + chunk);
    cf acc[P], v[P];
#pragma unroll
    for (int m = 0; m < P; ++m) acc[m] = cf(0.f, 0.f);
    for (int b = first; b < stop; ++b) {
        const cf* src = f + ((long long)b * channels + c) * N * N + col;
#pragma unroll
        for (int m = 0; m < P; ++m) v[m] = src[(t + P * m) * N];
        fft_line<P, LOG, false, false>(v, S, t, P, COLS, tw);
        const cf* ry = table + 2LL * b * N;
        const cf rx = conj(table[(2LL * b + 1) * N + col]);
#pragma unroll
        for (int m = 0; m < P; ++m) acc[m] += v[m] * (conj(ry[t + P * m]) * rx);
    }
    float* d = out + 2 * ((long long)c * N * N + col);
#pragma unroll
    for (int m = 0; m < P; ++m) {
        atomicAdd(d + 2 * (t + P * m) * N, acc[m].real() * scale);
        atomicAdd(d + 2 * (t + P * m) * N + 1, acc[m].imag() * scale);
    }
}

// f (B, K, N, N), rows already transformed, in place: column transform, then (as
// modulus_residual) f <- scale f v (A / sqrt(max(I, floor)) - 1), I = sum_k |f_k|^2, with
// err += sum (v (sqrt(I) - A))^2, then the inverse column transform.
template <int P, int LOG, int K>
__global__ void liveptycho_modulus_columns(
    cf* f, const float* amps, const long long* rows, const float* valid, int has_valid,
    float floor, float scale, const cf* tw, float* err) {
    COLUMN_SETUP(P)
    const long long b = blockIdx.y;
    cf v[K][P];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const cf* c = f + (b * K + k) * N * N + col;
#pragma unroll
        for (int m = 0; m < P; ++m) v[k][m] = c[(t + P * m) * N];
        fft_line<P, LOG, false, false>(v[k], S, t, P, COLS, tw);
    }
    const float* a_img = amps + rows[b] * (long long)(N * N);
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < P; ++m) {
        const int r = (t + P * m) * N + col;
        float inten = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) inten += norm(v[k][m]);
        const float a = a_img[r];
        const float mask = has_valid ? valid[r] : 1.f;
        const float dev = (sqrtf(inten) - a) * mask;
        acc += dev * dev;
        const float g = scale * mask * (a / sqrtf(fmaxf(inten, floor)) - 1.f);
#pragma unroll
        for (int k = 0; k < K; ++k) v[k][m] *= g;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
        fft_line<P, LOG, true, false>(v[k], S, t, P, COLS, tw);
        cf* c = f + (b * K + k) * N * N + col;
#pragma unroll
        for (int m = 0; m < P; ++m) c[(t + P * m) * N] = v[k][m];
    }
    // The block's error: warp sums, then one atomic per block.
    __shared__ float part[256 / 32];
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
    if (tid % 32 == 0) part[tid / 32] = acc;
    __syncthreads();
    if (tid == 0) {
        float total = 0.f;
        for (int w = 0; w < 256 / 32; ++w) total += part[w];
        atomicAdd(err, total);
    }
}
