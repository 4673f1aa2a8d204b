// Softmax cross-entropy over the byte logits, forward and backward.

#pragma once

#include "common.cuh"

// -------------------------------------------------------------------------------------------
// Softmax cross-entropy: logits [rows, v], u32 targets [rows] → float losses [rows] (nats).
// One warp per row.

template <typename T>
__device__ void ce_fwd(const T* logits, const uint32_t* targets, float* losses, int rows, int v) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* l = logits + (size_t)row * v;
    float m = -INFINITY;
    for (int c = lane; c < v; c += 32) m = fmaxf(m, to_f(l[c]));
    m = warp_max(m);
    float s = 0.f;
    for (int c = lane; c < v; c += 32) s += __expf(to_f(l[c]) - m);
    s = warp_sum(s);
    if (lane == 0) losses[row] = logf(s) + m - to_f(l[targets[row]]);
}

// dlogits = (softmax − onehot)·dloss, log Σ exp recovered as loss + target logit.
template <typename T>
__device__ void ce_bwd(const T* logits, const uint32_t* targets, const float* losses, const float* dloss, T* dlogits, int rows, int v) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* l = logits + (size_t)row * v;
    T* o = dlogits + (size_t)row * v;
    const uint32_t t = targets[row];
    const float lse = losses[row] + to_f(l[t]);
    const float g = dloss[row];
    for (int c = lane; c < v; c += 32) {
        float p = __expf(to_f(l[c]) - lse);
        o[c] = from_f<T>((p - (c == (int)t ? 1.f : 0.f)) * g);
    }
}

// -------------------------------------------------------------------------------------------
// extern "C" entry points, one per element type.

#define CROSS_ENTROPY(TN, T)                                                                                             \
    extern "C" __global__ void ce_fwd_##TN(const T* l, const uint32_t* t, float* losses, int rows, int v) {          \
        ce_fwd<T>(l, t, losses, rows, v);                                                                             \
    }                                                                                                                 \
    extern "C" __global__ void ce_bwd_##TN(const T* l, const uint32_t* t, const float* losses, const float* dloss,   \
                                             T* dl, int rows, int v) {                                                \
        ce_bwd<T>(l, t, losses, dloss, dl, rows, v);                                                                  \
    }

CROSS_ENTROPY(f32, float)
CROSS_ENTROPY(bf16, bf16)
