// The fused AdamW update and the squared gradient norm, each over many tensors in one launch.

#pragma once

#include "common.cuh"

// -------------------------------------------------------------------------------------------
// AdamW over many tensors in one launch, in place on float weights and moments. The host cuts
// every parameter into chunks of at most ADAM_CHUNK elements; block b updates chunk b. g is
// multiplied by `scale` first (clipping), or, when `sumsq` is given, by min(1, clip / √sumsq[0])
// from the device (no host round trip). A non-finite norm leaves everything unchanged: the host
// reports the divergence.

struct AdamChunk {
    float* w;
    const float* g;
    float* m;
    float* v;
    long n;
    float decay;  // 1 − lr·weight decay of the chunk's tensor
};

extern "C" __global__ void adamw_chunks_f32(const AdamChunk* chunks, float lr, float b1, float b2, float eps, float inv_bc1,
                                            float inv_bc2, float scale, const float* sumsq, float clip) {
    if (sumsq) {
        const float norm = sqrtf(sumsq[0]);
        if (!isfinite(norm)) return;
        scale = (clip > 0.f && norm > clip) ? clip / norm : 1.f;
    }
    const AdamChunk c = chunks[blockIdx.x];
    for (long i = threadIdx.x; i < c.n; i += blockDim.x) {
        const float gi = c.g[i] * scale;
        const float mi = b1 * c.m[i] + (1.f - b1) * gi;
        const float vi = b2 * c.v[i] + (1.f - b2) * gi * gi;
        const float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
        c.w[i] = c.w[i] * c.decay - lr * update;
        c.m[i] = mi;
        c.v[i] = vi;
    }
}

// Σ x² over many tensors in one launch, added to out[0]: block b sums chunk b.
struct SumChunk {
    const float* x;
    long n;
};

extern "C" __global__ void sum_squares_chunks_f32(const SumChunk* chunks, float* out) {
    __shared__ float partial[32];
    const SumChunk c = chunks[blockIdx.x];
    float s = 0.f;
    for (long i = threadIdx.x; i < c.n; i += blockDim.x) s += c.x[i] * c.x[i];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
        s = warp_sum(s);
        if (threadIdx.x == 0) atomicAdd(out, s);
    }
}
