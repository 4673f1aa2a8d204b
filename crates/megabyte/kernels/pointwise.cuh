// Elementwise kernels: the MLP's activation (GELU or ReLU²) forward and backward, dropout.

#pragma once

#include "common.cuh"

// -------------------------------------------------------------------------------------------
// The MLP's activation, GELU (exact, erf form) or ReLU² (relu(x)²), each a functor with its
// value and derivative; n even. When every pointer is 16-byte aligned, each thread moves 16
// bytes at a time (8 bf16 or 4 floats), then pairs finish the tail.

__device__ __forceinline__ float gelu_grad(float v) {
    float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    float pdf = __expf(-0.5f * v * v) * 0.39894228040143268f;
    return cdf + v * pdf;
}

struct Gelu {
    __device__ __forceinline__ static float f(float v) { return gelu(v); }
    __device__ __forceinline__ static float df(float v) { return gelu_grad(v); }
};

struct Relu2 {
    __device__ __forceinline__ static float f(float v) { return v > 0.f ? v * v : 0.f; }
    __device__ __forceinline__ static float df(float v) { return v > 0.f ? 2.f * v : 0.f; }
};

__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c = nullptr) {
    return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(c)) & 15) == 0;
}

template <typename A, typename T>
__device__ void act_fwd(const T* x, T* y, size_t n) {
    constexpr int V = 16 / sizeof(T);
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (aligned16(x, y)) {
        done = n / V * V;
        for (size_t i = tid; i < n / V; i += stride) {
            uint4 raw = reinterpret_cast<const uint4*>(x)[i];
            T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int k = 0; k < V; k++) e[k] = from_f<T>(A::f(to_f(e[k])));
            reinterpret_cast<uint4*>(y)[i] = raw;
        }
    }
    for (size_t i = done + 2 * tid; i < n; i += 2 * stride) {
        float2 v = load2(x + i);
        store2(y + i, A::f(v.x), A::f(v.y));
    }
}

template <typename A, typename T>
__device__ void act_bwd(const T* x, const T* dy, T* dx, size_t n) {
    constexpr int V = 16 / sizeof(T);
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (aligned16(x, dy, dx)) {
        done = n / V * V;
        for (size_t i = tid; i < n / V; i += stride) {
            const uint4 rx = reinterpret_cast<const uint4*>(x)[i];
            uint4 rg = reinterpret_cast<const uint4*>(dy)[i];
            const T* ex = reinterpret_cast<const T*>(&rx);
            T* eg = reinterpret_cast<T*>(&rg);
#pragma unroll
            for (int k = 0; k < V; k++) eg[k] = from_f<T>(to_f(eg[k]) * A::df(to_f(ex[k])));
            reinterpret_cast<uint4*>(dx)[i] = rg;
        }
    }
    for (size_t i = done + 2 * tid; i < n; i += 2 * stride) {
        float2 v = load2(x + i), g = load2(dy + i);
        store2(dx + i, g.x * A::df(v.x), g.y * A::df(v.y));
    }
}

// -------------------------------------------------------------------------------------------
// Dropout: element i of the batch is kept when the top 24 bits of mix64(key ^ mix64(base + i))
// reach the threshold p·2^24 (ops/pointwise.rs computes the same bits on the CPU), then scaled.

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, unsigned long long base, unsigned long long key,
                        unsigned int threshold, float scale) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = tid; i < n; i += stride) {
        bool keep = (unsigned int)(mix64(key ^ mix64(base + i)) >> 40) >= threshold;
        y[i] = from_f<T>(keep ? to_f(x[i]) * scale : 0.f);
    }
}

// -------------------------------------------------------------------------------------------
// extern "C" entry points, one per element type.

#define POINTWISE(TN, T)                                                                                                 \
    extern "C" __global__ void gelu_fwd_##TN(const T* x, T* y, size_t n) { act_fwd<Gelu, T>(x, y, n); }             \
    extern "C" __global__ void relu2_fwd_##TN(const T* x, T* y, size_t n) { act_fwd<Relu2, T>(x, y, n); }           \
    extern "C" __global__ void dropout_##TN(const T* x, T* y, size_t n, unsigned long long base,                     \
                                              unsigned long long key, unsigned int threshold, float scale) {          \
        dropout<T>(x, y, n, base, key, threshold, scale);                                                             \
    }                                                                                                                 \
    extern "C" __global__ void gelu_bwd_##TN(const T* x, const T* dy, T* dx, size_t n) { act_bwd<Gelu, T>(x, dy, dx, n); } \
    extern "C" __global__ void relu2_bwd_##TN(const T* x, const T* dy, T* dx, size_t n) { act_bwd<Relu2, T>(x, dy, dx, n); }

POINTWISE(f32, float)
POINTWISE(bf16, bf16)
