// Embedding lookup and its backward.

#pragma once

#include "common.cuh"

// -------------------------------------------------------------------------------------------
// Embedding lookup: out [rows, d] = table [v, d] at ids [rows]; backward scatter-adds dy into
// a zeroed float dtable. Each backward block owns 32 columns and a chunk of rows and sums in
// shared memory first (candle's index_add loops over all ids in one thread per column).

template <typename T>
__device__ void embed_fwd(const T* table, const uint32_t* ids, T* out, int rows, int d) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)rows * d; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / d, c = i % d;
        out[i] = table[(size_t)ids[r] * d + c];
    }
}

constexpr int EMBED_COLS = 32;

// Grid (ceil(d / 32), chunks); dynamic shared memory v·32 floats.
template <typename T>
__device__ void embed_bwd(const T* dy, const uint32_t* ids, float* dtable, int rows, int v, int d, int rows_per_block) {
    extern __shared__ float acc[];
    for (int i = threadIdx.x; i < v * EMBED_COLS; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int c = blockIdx.x * EMBED_COLS + (threadIdx.x % EMBED_COLS);
    const int r0 = blockIdx.y * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    if (c < d) {
        for (int r = r0 + threadIdx.x / EMBED_COLS; r < r1; r += blockDim.x / EMBED_COLS)
            atomicAdd(&acc[ids[r] * EMBED_COLS + threadIdx.x % EMBED_COLS], to_f(dy[(size_t)r * d + c]));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < v * EMBED_COLS; i += blockDim.x) {
        int col = blockIdx.x * EMBED_COLS + i % EMBED_COLS;
        if (col < d && acc[i] != 0.f) atomicAdd(&dtable[(size_t)(i / EMBED_COLS) * d + col], acc[i]);
    }
}

// -------------------------------------------------------------------------------------------
// extern "C" entry points, one per element type.

#define EMBEDDING(TN, T)                                                                                                 \
    extern "C" __global__ void embed_fwd_##TN(const T* table, const uint32_t* ids, T* out, int rows, int d) {       \
        embed_fwd<T>(table, ids, out, rows, d);                                                                       \
    }                                                                                                                 \
    extern "C" __global__ void embed_bwd_##TN(const T* dy, const uint32_t* ids, float* dtable, int rows, int v,     \
                                                int d, int rpb) {                                                     \
        embed_bwd<T>(dy, ids, dtable, rows, v, d, rpb);                                                               \
    }

EMBEDDING(f32, float)
EMBEDDING(bf16, bf16)
