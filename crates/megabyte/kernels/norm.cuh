// LayerNorm and RMSNorm: forward (with the residual add before the norm fused in) and backward.

#pragma once

#include "common.cuh"

// -------------------------------------------------------------------------------------------
// LayerNorm (b != null: centre, scale, shift) / RMSNorm (b == null) over rows of d (even).
// One warp per row, two elements per lane at a time. x, y: [rows, d] contiguous.

template <typename T>
__device__ __forceinline__ void row_stats(const T* xr, int d, bool center, float eps, float& mean, float& rstd) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    if (center) {
        for (int c = 2 * lane; c < d; c += 64) {
            float2 v = load2(xr + c);
            s += v.x + v.y;
        }
        s = warp_sum(s) / d;
    }
    float var = 0.f;
    for (int c = 2 * lane; c < d; c += 64) {
        float2 v = load2(xr + c);
        var += (v.x - s) * (v.x - s) + (v.y - s) * (v.y - s);
    }
    var = warp_sum(var) / d;
    mean = s;
    rstd = rsqrtf(var + eps);
}

// With `a` (the residual branch), first x1 = x + a, written to `xsum` and normalised instead
// of x: the residual add fused with the norm that follows it.
template <typename T>
__device__ void norm_fwd(const T* x, const T* a, T* xsum, const float* w, const float* b, T* y, int rows, int d, float eps) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    T* yr = y + (size_t)row * d;
    if (a) {
        const T* ar = a + (size_t)row * d;
        T* sr = xsum + (size_t)row * d;
        for (int c = 2 * lane; c < d; c += 64) {
            float2 u = load2(xr + c), v = load2(ar + c);
            store2(sr + c, u.x + v.x, u.y + v.y);
        }
        __syncwarp();
        xr = sr;
    }
    float mean, rstd;
    row_stats(xr, d, b != nullptr, eps, mean, rstd);
    for (int c = 2 * lane; c < d; c += 64) {
        float2 v = load2(xr + c);
        float a0 = (v.x - mean) * rstd * w[c], a1 = (v.y - mean) * rstd * w[c + 1];
        if (b) {
            a0 += b[c];
            a1 += b[c + 1];
        }
        store2(yr + c, a0, a1);
    }
}

// dx [rows, d] (plus dres when given: the residual stream's gradient, fused) and per-block
// partial sums of dw (and db when centred) into part [gridDim.x, 2d]. Dynamic shared memory:
// 2d floats.
template <typename T>
__device__ void norm_bwd(const T* x, const float* w, const T* dy, const T* dres, T* dx, float* part, int rows, int d,
                         float eps, int center) {
    extern __shared__ float acc[];
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int wpb = blockDim.x >> 5;
    for (int row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += gridDim.x * wpb) {
        const T* xr = x + (size_t)row * d;
        const T* gr = dy + (size_t)row * d;
        float mean, rstd;
        row_stats(xr, d, center, eps, mean, rstd);
        float mg = 0.f, mgx = 0.f;
        for (int c = 2 * lane; c < d; c += 64) {
            float2 xv = load2(xr + c), gv = load2(gr + c);
            float g0 = gv.x * w[c], g1 = gv.y * w[c + 1];
            mg += g0 + g1;
            mgx += g0 * (xv.x - mean) * rstd + g1 * (xv.y - mean) * rstd;
        }
        mg = center ? warp_sum(mg) / d : 0.f;
        mgx = warp_sum(mgx) / d;
        T* dxr = dx + (size_t)row * d;
        for (int c = 2 * lane; c < d; c += 64) {
            float2 xv = load2(xr + c), gv = load2(gr + c);
            float h0 = (xv.x - mean) * rstd, h1 = (xv.y - mean) * rstd;
            float d0 = rstd * (gv.x * w[c] - mg - h0 * mgx), d1 = rstd * (gv.y * w[c + 1] - mg - h1 * mgx);
            if (dres) {
                float2 r = load2(dres + (size_t)row * d + c);
                d0 += r.x;
                d1 += r.y;
            }
            store2(dxr + c, d0, d1);
            atomicAdd(&acc[c], gv.x * h0);
            atomicAdd(&acc[c + 1], gv.y * h1);
            if (center) {
                atomicAdd(&acc[d + c], gv.x);
                atomicAdd(&acc[d + c + 1], gv.y);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) part[(size_t)blockIdx.x * 2 * d + i] = acc[i];
}

// The same with the row width d = 64·NP fixed: each lane keeps its columns' dw and db sums
// in registers across all the rows its warp visits, and adds them to shared memory once.
template <typename T, int NP>
__device__ void norm_bwd_reg(const T* x, const float* w, const T* dy, const T* dres, T* dx, float* part, int rows,
                             float eps, int center) {
    constexpr int d = 64 * NP;
    __shared__ float acc[2 * d];
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int wpb = blockDim.x >> 5;
    float sw[NP][2], sb[NP][2], wr[NP][2];
#pragma unroll
    for (int k = 0; k < NP; k++) {
        sw[k][0] = sw[k][1] = sb[k][0] = sb[k][1] = 0.f;
        wr[k][0] = w[64 * k + 2 * lane];
        wr[k][1] = w[64 * k + 2 * lane + 1];
    }
    for (int row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += gridDim.x * wpb) {
        const T* xr = x + (size_t)row * d;
        const T* gr = dy + (size_t)row * d;
        float xv[NP][2], gv[NP][2];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < NP; k++) {
            float2 a = load2(xr + 64 * k + 2 * lane), b = load2(gr + 64 * k + 2 * lane);
            xv[k][0] = a.x; xv[k][1] = a.y; gv[k][0] = b.x; gv[k][1] = b.y;
            s += a.x + a.y;
        }
        const float mean = center ? warp_sum(s) / d : 0.f;
        float var = 0.f;
#pragma unroll
        for (int k = 0; k < NP; k++) var += (xv[k][0] - mean) * (xv[k][0] - mean) + (xv[k][1] - mean) * (xv[k][1] - mean);
        const float rstd = rsqrtf(warp_sum(var) / d + eps);
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int k = 0; k < NP; k++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                xv[k][e] = (xv[k][e] - mean) * rstd;  // x̂
                const float g = gv[k][e] * wr[k][e];
                mg += g;
                mgx += g * xv[k][e];
                sw[k][e] += gv[k][e] * xv[k][e];
                sb[k][e] += gv[k][e];
            }
        mg = center ? warp_sum(mg) / d : 0.f;
        mgx = warp_sum(mgx) / d;
        T* dxr = dx + (size_t)row * d;
#pragma unroll
        for (int k = 0; k < NP; k++) {
            const int c = 64 * k + 2 * lane;
            float d0 = rstd * (gv[k][0] * wr[k][0] - mg - xv[k][0] * mgx);
            float d1 = rstd * (gv[k][1] * wr[k][1] - mg - xv[k][1] * mgx);
            if (dres) {
                float2 r = load2(dres + (size_t)row * d + c);
                d0 += r.x;
                d1 += r.y;
            }
            store2(dxr + c, d0, d1);
        }
    }
#pragma unroll
    for (int k = 0; k < NP; k++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            atomicAdd(&acc[64 * k + 2 * lane + e], sw[k][e]);
            if (center) atomicAdd(&acc[d + 64 * k + 2 * lane + e], sb[k][e]);
        }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) part[(size_t)blockIdx.x * 2 * d + i] = acc[i];
}

#define NORM_BWD_REG(TN, T, NP)                                                                                        \
    extern "C" __global__ void norm_bwd_reg_##TN##_##NP(const T* x, const float* w, const T* dy, const T* dres, T* dx, \
                                                         float* part, int rows, float eps, int center) {               \
        norm_bwd_reg<T, NP>(x, w, dy, dres, dx, part, rows, eps, center);                                             \
    }
// Width 256 only (the enwik8 local model, 12 rows per warp): measured faster than the shared-
// memory atomics there, slower at 768 and 1024 where the registers cost occupancy.
NORM_BWD_REG(f32, float, 4)
NORM_BWD_REG(bf16, bf16, 4)

// -------------------------------------------------------------------------------------------
// extern "C" entry points, one per element type.

#define NORM(TN, T)                                                                                                      \
    extern "C" __global__ void norm_fwd_##TN(const T* x, const T* a, T* xsum, const float* w, const float* b, T* y,  \
                                               int rows, int d, float eps) {                                          \
        norm_fwd<T>(x, a, xsum, w, b, y, rows, d, eps);                                                               \
    }                                                                                                                 \
    extern "C" __global__ void norm_bwd_##TN(const T* x, const float* w, const T* dy, const T* dres, T* dx,          \
                                               float* part, int rows, int d, float eps, int center) {                 \
        norm_bwd<T>(x, w, dy, dres, dx, part, rows, d, eps, center);                                                  \
    }

NORM(f32, float)
NORM(bf16, bf16)
