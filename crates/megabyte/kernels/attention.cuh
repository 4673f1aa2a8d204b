// Causal multi-head attention (one-warp, small-sequence, flash-style and bf16 tensor-core
// kernels) and the KV cache append.

#pragma once

#include "common.cuh"

// -------------------------------------------------------------------------------------------
// Causal multi-head attention.

__device__ __forceinline__ uint32_t pack_bf16_(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
//
// q is [N, Sq, H·HD], k and v [N, Sk, H·HD], each given as a pointer with strides (sn, ss) in
// elements and a contiguous last dimension; head h is columns h·HD..(h+1)·HD. Query i sits at
// position Sk − Sq + i and sees keys 0..=Sk − Sq + i. y is [N, Sq, H·HD] contiguous. lse
// ([N, H, Sq], may be null) receives each row's log Σ exp of its scaled scores for the backward.

struct View {
    long sn, ss;
};

template <typename T, int HD>
__device__ __forceinline__ void load_row(float* dst, const T* src) {
#pragma unroll
    for (int d = 0; d < HD; d++) dst[d] = to_f(src[d]);
}

template <int HD>
__device__ __forceinline__ float dot(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll
    for (int d = 0; d < HD; d++) s = fmaf(a[d], b[d], s);
    return s;
}

// --- Small sequences (Sk ≤ 64: the local model's patches, decoding steps). ----------------
// A block of R threads holds G = R / S whole (n, h) groups, S = max(Sq, Sk); thread r of a
// group is query r (forward, backward's first half) or key r (backward's second half). The
// groups' rows sit in shared memory as float, each group's block offset by 4 floats so that
// the groups of one warp read different banks. Rows are loaded 8 elements (16 bytes of bf16)
// at a time: the host checks alignment.

template <typename T>
__device__ __forceinline__ void load8(const T* src, float* dst);
template <>
__device__ __forceinline__ void load8<float>(const float* src, float* dst) {
    float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
    dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w; dst[4] = b.x; dst[5] = b.y; dst[6] = b.z; dst[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<bf16>(const bf16* src, float* dst) {
    uint4 v = *reinterpret_cast<const uint4*>(src);
    const bf16* e = reinterpret_cast<const bf16*>(&v);
#pragma unroll
    for (int i = 0; i < 8; i++) dst[i] = __bfloat162float(e[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float* src);
template <>
__device__ __forceinline__ void store8<float>(float* dst, const float* src) {
    *reinterpret_cast<float4*>(dst) = make_float4(src[0], src[1], src[2], src[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(src[4], src[5], src[6], src[7]);
}
template <>
__device__ __forceinline__ void store8<bf16>(bf16* dst, const float* src) {
    uint4 v;
    v.x = pack_bf16_(src[0], src[1]); v.y = pack_bf16_(src[2], src[3]);
    v.z = pack_bf16_(src[4], src[5]); v.w = pack_bf16_(src[6], src[7]);
    *reinterpret_cast<uint4*>(dst) = v;
}

// Copies `rows` rows of HD elements per group for G groups into shared memory (group stride
// `gs` floats), from a view with strides (sn, ss).
template <typename T, int HD>
__device__ __forceinline__ void load_groups(float* dst, int gs, const T* src, long sn, long ss, long first, long groups, int H,
                                            int rows, int G, int nthreads) {
    for (int idx = threadIdx.x; idx < G * rows * (HD / 8); idx += nthreads) {
        const int c = (idx % (HD / 8)) * 8, row = idx / (HD / 8);
        const int gi = row / rows, j = row % rows;
        const long id = first + gi;
        if (id >= groups) continue;
        const long n = id / H, h = id % H;
        load8<T>(src + n * sn + j * ss + h * HD + c, dst + gi * gs + j * HD + c);
    }
}

template <int HD>
__device__ __forceinline__ float dot4(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll
    for (int d = 0; d < HD; d += 4) {
        float4 x = *reinterpret_cast<const float4*>(a + d), y = *reinterpret_cast<const float4*>(b + d);
        s = fmaf(x.x, y.x, s); s = fmaf(x.y, y.y, s); s = fmaf(x.z, y.z, s); s = fmaf(x.w, y.w, s);
    }
    return s;
}

template <typename T, int HD, int R>
__device__ void attn_small_fwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N,
                               int Sq, int Sk, int H, float scale) {
    extern __shared__ __align__(16) float smem[];
    const int S = max(Sq, Sk);
    const int G = R / S;
    const int gs = Sk * HD + 4;
    float* ks = smem;
    float* vs = smem + G * gs;
    const int g = threadIdx.x / S, r = threadIdx.x % S;
    const long groups = (long)N * H;
    const long first = (long)blockIdx.x * G;
    load_groups<T, HD>(ks, gs, k, vk.sn, vk.ss, first, groups, H, Sk, G, R);
    load_groups<T, HD>(vs, gs, v, vv.sn, vv.ss, first, groups, H, Sk, G, R);
    __syncthreads();
    const long id = first + g;
    if (g >= G || r >= Sq || id >= groups) return;
    const long n = id / H, h = id % H;
    float qr[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d += 8) load8<T>(q + n * vq.sn + r * vq.ss + h * HD + d, qr + d);
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int last = Sk - Sq + r;
    for (int j = 0; j <= last; j++) {
        const float* kj = ks + g * gs + j * HD;
        const float* vj = vs + g * gs + j * HD;
        float s = dot4<HD>(qr, kj) * scale;
        float mn = fmaxf(m, s);
        float corr = __expf(m - mn), p = __expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int d = 0; d < HD; d += 4) {
            float4 x = *reinterpret_cast<const float4*>(vj + d);
            acc[d] = fmaf(p, x.x, acc[d] * corr); acc[d + 1] = fmaf(p, x.y, acc[d + 1] * corr);
            acc[d + 2] = fmaf(p, x.z, acc[d + 2] * corr); acc[d + 3] = fmaf(p, x.w, acc[d + 3] * corr);
        }
        m = mn;
    }
    T* yr = y + ((n * Sq) + r) * (long)(H * HD) + h * HD;
    const float inv = 1.f / l;
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] *= inv;
#pragma unroll
    for (int d = 0; d < HD; d += 8) store8<T>(yr + d, acc + d);
    if (lse) lse[id * Sq + r] = m + logf(l);
}

// Self-attention backward (Sq = Sk = S ≤ 64). dy and y: [N, S, H·HD] contiguous; dq, dk, dv
// written through views like q, k, v. Shared: Q, K, V, dY of the block's groups, and per-row
// log Σ exp and D = dy·y. One accumulator row at a time keeps registers (and spills) down.
template <typename T, int HD, int R>
__device__ void attn_small_bwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy,
                               T* dq, View vdq, T* dk, View vdk, T* dv, View vdv, int N, int S, int H, float scale) {
    extern __shared__ __align__(16) float smem[];
    const int G = R / S;
    const int gs = S * HD + 4;
    float* qs = smem;
    float* ks = qs + G * gs;
    float* vs = ks + G * gs;
    float* gsm = vs + G * gs;
    float* lse_s = gsm + G * gs;
    float* D_s = lse_s + R;
    const int g = threadIdx.x / S, r = threadIdx.x % S;
    const long groups = (long)N * H;
    const long first = (long)blockIdx.x * G;
    const long W = (long)H * HD;
    load_groups<T, HD>(qs, gs, q, vq.sn, vq.ss, first, groups, H, S, G, R);
    load_groups<T, HD>(ks, gs, k, vk.sn, vk.ss, first, groups, H, S, G, R);
    load_groups<T, HD>(vs, gs, v, vv.sn, vv.ss, first, groups, H, S, G, R);
    load_groups<T, HD>(gsm, gs, dy, (long)S * W, W, first, groups, H, S, G, R);
    __syncthreads();
    const long id = first + g;
    const bool live = g < G && id < groups;
    const long n = id / H, h = id % H;
    const float* qi = qs + g * gs + r * HD;
    const float* gi = gsm + g * gs + r * HD;
    float acc[HD];
    if (live) {
        // Pass 1, thread = query r: row statistics, D, and dq.
        float m = -INFINITY, l = 0.f;
        for (int j = 0; j <= r; j++) {
            float s = dot4<HD>(qi, ks + g * gs + j * HD) * scale;
            float mn = fmaxf(m, s);
            l = l * __expf(m - mn) + __expf(s - mn);
            m = mn;
        }
        const float L = m + logf(l);
#pragma unroll
        for (int d = 0; d < HD; d += 8) load8<T>(y + (n * S + r) * W + h * HD + d, acc + d);
        float D = 0.f;
#pragma unroll
        for (int d = 0; d < HD; d++) D = fmaf(gi[d], acc[d], D);
        lse_s[threadIdx.x] = L;
        D_s[threadIdx.x] = D;
#pragma unroll
        for (int d = 0; d < HD; d++) acc[d] = 0.f;
        for (int j = 0; j <= r; j++) {
            const float* kj = ks + g * gs + j * HD;
            float p = __expf(dot4<HD>(qi, kj) * scale - L);
            float ds = p * (dot4<HD>(gi, vs + g * gs + j * HD) - D) * scale;
#pragma unroll
            for (int d = 0; d < HD; d++) acc[d] = fmaf(ds, kj[d], acc[d]);
        }
#pragma unroll
        for (int d = 0; d < HD; d += 8) store8<T>(dq + n * vdq.sn + r * vdq.ss + h * HD + d, acc + d);
    }
    __syncthreads();
    if (!live) return;
    // Pass 2, thread = key r: dv, then dk, over the queries that see it.
    const float* kj = ks + g * gs + r * HD;
    const float* vj = vs + g * gs + r * HD;
    const int row0 = g * S;
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    for (int i = r; i < S; i++) {
        const float p = __expf(dot4<HD>(qs + g * gs + i * HD, kj) * scale - lse_s[row0 + i]);
        const float* gg = gsm + g * gs + i * HD;
#pragma unroll
        for (int d = 0; d < HD; d++) acc[d] = fmaf(p, gg[d], acc[d]);
    }
#pragma unroll
    for (int d = 0; d < HD; d += 8) store8<T>(dv + n * vdv.sn + r * vdv.ss + h * HD + d, acc + d);
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    for (int i = r; i < S; i++) {
        const float* qq = qs + g * gs + i * HD;
        const float p = __expf(dot4<HD>(qq, kj) * scale - lse_s[row0 + i]);
        const float ds = p * (dot4<HD>(gsm + g * gs + i * HD, vj) - D_s[row0 + i]) * scale;
#pragma unroll
        for (int d = 0; d < HD; d++) acc[d] = fmaf(ds, qq[d], acc[d]);
    }
#pragma unroll
    for (int d = 0; d < HD; d += 8) store8<T>(dk + n * vdk.sn + r * vdk.ss + h * HD + d, acc + d);
}

// --- Patches of at most 8 positions with head dim 32 or 64: one warp per (n, h) group. -----
// The local model's shape (P ≤ 8). Each lane holds DPL = HD/32 dimensions of every row in
// registers; a dot product is a lane-local partial plus a warp sum. No shared memory, no
// block-wide synchronisation, full occupancy.

template <typename T, int DPL>
__device__ __forceinline__ void load_lane(float* dst, const T* row, int lane) {
    if constexpr (DPL == 2) {
        float2 v = load2(row + 2 * lane);
        dst[0] = v.x;
        dst[1] = v.y;
    } else {
        dst[0] = to_f(row[lane]);
    }
}

template <typename T, int DPL>
__device__ __forceinline__ void store_lane(T* row, const float* src, int lane) {
    if constexpr (DPL == 2) {
        store2(row + 2 * lane, src[0], src[1]);
    } else {
        row[lane] = from_f<T>(src[0]);
    }
}

template <int DPL>
__device__ __forceinline__ float dot_lane(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; d++) s = fmaf(a[d], b[d], s);
    return warp_sum(s);
}

constexpr int WARP_S = 8;

template <typename T, int HD>
__device__ void attn_warp_fwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N,
                              int Sq, int Sk, int H, float scale) {
    constexpr int DPL = HD / 32;
    const long id = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (id >= (long)N * H) return;
    const long n = id / H, h = id % H;
    float kr[WARP_S][DPL], vr[WARP_S][DPL];
#pragma unroll
    for (int j = 0; j < WARP_S; j++) {
        if (j < Sk) {
            load_lane<T, DPL>(kr[j], k + n * vk.sn + j * vk.ss + h * HD, lane);
            load_lane<T, DPL>(vr[j], v + n * vv.sn + j * vv.ss + h * HD, lane);
        }
    }
    const int off = Sk - Sq;
    for (int i = 0; i < Sq; i++) {
        float qi[DPL], acc[DPL];
        load_lane<T, DPL>(qi, q + n * vq.sn + i * vq.ss + h * HD, lane);
#pragma unroll
        for (int d = 0; d < DPL; d++) acc[d] = 0.f;
        float m = -INFINITY, l = 0.f;
#pragma unroll
        for (int j = 0; j < WARP_S; j++) {
            if (j <= off + i) {
                const float s = dot_lane<DPL>(qi, kr[j]) * scale;
                const float mn = fmaxf(m, s), corr = __expf(m - mn), p = __expf(s - mn);
                l = l * corr + p;
#pragma unroll
                for (int d = 0; d < DPL; d++) acc[d] = fmaf(p, vr[j][d], acc[d] * corr);
                m = mn;
            }
        }
        const float inv = 1.f / l;
#pragma unroll
        for (int d = 0; d < DPL; d++) acc[d] *= inv;
        store_lane<T, DPL>(y + (n * Sq + i) * (long)(H * HD) + h * HD, acc, lane);
        if (lse && lane == 0) lse[id * Sq + i] = m + logf(l);
    }
}

template <typename T, int HD>
__device__ void attn_warp_bwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy,
                              T* dq, View vdq, T* dk, View vdk, T* dv, View vdv, int N, int S, int H, float scale) {
    constexpr int DPL = HD / 32;
    const long id = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (id >= (long)N * H) return;
    const long n = id / H, h = id % H;
    const long W = (long)H * HD;
    float qr[WARP_S][DPL], kr[WARP_S][DPL], vr[WARP_S][DPL], gr[WARP_S][DPL];
    float ak[WARP_S][DPL], av[WARP_S][DPL];
    float L[WARP_S], D[WARP_S];
#pragma unroll
    for (int j = 0; j < WARP_S; j++) {
        if (j < S) {
            load_lane<T, DPL>(qr[j], q + n * vq.sn + j * vq.ss + h * HD, lane);
            load_lane<T, DPL>(kr[j], k + n * vk.sn + j * vk.ss + h * HD, lane);
            load_lane<T, DPL>(vr[j], v + n * vv.sn + j * vv.ss + h * HD, lane);
            load_lane<T, DPL>(gr[j], dy + (n * S + j) * W + h * HD, lane);
            float yr[DPL];
            load_lane<T, DPL>(yr, y + (n * S + j) * W + h * HD, lane);
            D[j] = dot_lane<DPL>(gr[j], yr);
        }
#pragma unroll
        for (int d = 0; d < DPL; d++) ak[j][d] = av[j][d] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < WARP_S; i++) {
        if (i >= S) break;
        // Row statistics of query i, then its probabilities and score gradients.
        float s[WARP_S], m = -INFINITY;
#pragma unroll
        for (int j = 0; j < WARP_S; j++) {
            s[j] = j <= i ? dot_lane<DPL>(qr[i], kr[j]) * scale : -INFINITY;
            m = fmaxf(m, s[j]);
        }
        float l = 0.f;
#pragma unroll
        for (int j = 0; j < WARP_S; j++) {
            s[j] = j <= i ? __expf(s[j] - m) : 0.f;
            l += s[j];
        }
        const float inv = 1.f / l;
        float aq[DPL];
#pragma unroll
        for (int d = 0; d < DPL; d++) aq[d] = 0.f;
#pragma unroll
        for (int j = 0; j < WARP_S; j++) {
            if (j <= i) {
                const float p = s[j] * inv;
                const float ds = p * (dot_lane<DPL>(gr[i], vr[j]) - D[i]) * scale;
#pragma unroll
                for (int d = 0; d < DPL; d++) {
                    aq[d] = fmaf(ds, kr[j][d], aq[d]);
                    ak[j][d] = fmaf(ds, qr[i][d], ak[j][d]);
                    av[j][d] = fmaf(p, gr[i][d], av[j][d]);
                }
            }
        }
        store_lane<T, DPL>(dq + n * vdq.sn + i * vdq.ss + h * HD, aq, lane);
    }
#pragma unroll
    for (int j = 0; j < WARP_S; j++) {
        if (j < S) {
            store_lane<T, DPL>(dk + n * vdk.sn + j * vdk.ss + h * HD, ak[j], lane);
            store_lane<T, DPL>(dv + n * vdv.sn + j * vdv.ss + h * HD, av[j], lane);
        }
    }
}

// --- Long sequences: flash-style tiles. ---------------------------------------------------
// Forward: a block of BQ threads = BQ consecutive queries of one (n, h); keys stream through
// shared memory BK at a time with an online softmax. Grid (ceil(Sq / BQ), N·H).

constexpr int BQ = 64;
constexpr int BK = 32;

template <typename T, int HD>
__device__ void attn_flash_fwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N,
                               int Sq, int Sk, int H, float scale) {
    __shared__ float ks[BK * HD];
    __shared__ float vs[BK * HD];
    const long id = blockIdx.y;
    const long n = id / H, h = id % H;
    const int i = blockIdx.x * BQ + threadIdx.x;
    const bool live = i < Sq;
    const int pos = Sk - Sq + i;
    const int block_last = min(Sk - Sq + (int)(blockIdx.x * BQ) + BQ - 1, Sk - 1);
    float qr[HD], acc[HD];
    if (live) load_row<T, HD>(qr, q + n * vq.sn + (long)i * vq.ss + h * HD);
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int t0 = 0; t0 <= block_last; t0 += BK) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < BK * HD; idx += BQ) {
            int j = t0 + idx / HD, d = idx % HD;
            bool in = j < Sk;
            ks[idx] = in ? to_f(k[n * vk.sn + (long)j * vk.ss + h * HD + d]) : 0.f;
            vs[idx] = in ? to_f(v[n * vv.sn + (long)j * vv.ss + h * HD + d]) : 0.f;
        }
        __syncthreads();
        if (!live || t0 > pos) continue;
        float s[BK];
        float mt = m;
#pragma unroll
        for (int j = 0; j < BK; j++) {
            s[j] = (t0 + j <= pos) ? dot<HD>(qr, ks + j * HD) * scale : -INFINITY;
            mt = fmaxf(mt, s[j]);
        }
        const float corr = __expf(m - mt);
        l *= corr;
#pragma unroll
        for (int d = 0; d < HD; d++) acc[d] *= corr;
#pragma unroll
        for (int j = 0; j < BK; j++) {
            float p = __expf(s[j] - mt);
            l += p;
            const float* vj = vs + j * HD;
#pragma unroll
            for (int d = 0; d < HD; d++) acc[d] = fmaf(p, vj[d], acc[d]);
        }
        m = mt;
    }
    if (!live) return;
    T* yr = y + (n * Sq + i) * (long)(H * HD) + h * HD;
    const float inv = 1.f / l;
#pragma unroll
    for (int d = 0; d < HD; d++) yr[d] = from_f<T>(acc[d] * inv);
    if (lse) lse[id * Sq + i] = m + logf(l);
}

// Backward, part 1: thread = query i. D_i = dy_i·y_i (kept in Dbuf [N, H, S]) and dq_i.
template <typename T, int HD>
__device__ void attn_flash_bwd_dq(const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy,
                                  const float* lse, float* Dbuf, T* dq, View vdq, int N, int S, int H, float scale) {
    __shared__ float ks[BK * HD];
    __shared__ float vs[BK * HD];
    const long id = blockIdx.y;
    const long n = id / H, h = id % H;
    const long W = (long)H * HD;
    const int i = blockIdx.x * BQ + threadIdx.x;
    const bool live = i < S;
    const int block_last = min((int)(blockIdx.x * BQ) + BQ - 1, S - 1);
    float qr[HD], gr[HD], acc[HD];
    float L = 0.f, D = 0.f;
    if (live) {
        load_row<T, HD>(qr, q + n * vq.sn + (long)i * vq.ss + h * HD);
        load_row<T, HD>(gr, dy + (n * S + i) * W + h * HD);
        const T* yr = y + (n * S + i) * W + h * HD;
#pragma unroll
        for (int d = 0; d < HD; d++) D = fmaf(gr[d], to_f(yr[d]), D);
        L = lse[id * S + i];
        Dbuf[id * S + i] = D;
    }
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    for (int t0 = 0; t0 <= block_last; t0 += BK) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < BK * HD; idx += BQ) {
            int j = t0 + idx / HD, d = idx % HD;
            bool in = j < S;
            ks[idx] = in ? to_f(k[n * vk.sn + (long)j * vk.ss + h * HD + d]) : 0.f;
            vs[idx] = in ? to_f(v[n * vv.sn + (long)j * vv.ss + h * HD + d]) : 0.f;
        }
        __syncthreads();
        if (!live || t0 > i) continue;
        for (int j = 0; j < BK && t0 + j <= i; j++) {
            const float* kj = ks + j * HD;
            float p = __expf(dot<HD>(qr, kj) * scale - L);
            float ds = p * (dot<HD>(gr, vs + j * HD) - D);
#pragma unroll
            for (int d = 0; d < HD; d++) acc[d] = fmaf(ds, kj[d], acc[d]);
        }
    }
    if (!live) return;
    T* o = dq + n * vdq.sn + (long)i * vdq.ss + h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) o[d] = from_f<T>(acc[d] * scale);
}

// Backward, part 2: thread = key j; queries stream through shared memory. k_j in registers,
// v_j in this thread's own (padded) shared row.
template <typename T, int HD>
__device__ void attn_flash_bwd_dkdv(const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* dy,
                                    const float* lse, const float* Dbuf, T* dk, View vdk, T* dv, View vdv, int N, int S,
                                    int H, float scale) {
    constexpr int VP = HD + 1;
    __shared__ float qs[BK * HD];
    __shared__ float gs[BK * HD];
    __shared__ float vown[BQ * VP];
    __shared__ float Ls[BK], Ds[BK];
    const long id = blockIdx.y;
    const long n = id / H, h = id % H;
    const long W = (long)H * HD;
    const int j = blockIdx.x * BQ + threadIdx.x;
    const bool live = j < S;
    float kr[HD], ak[HD], av[HD];
    float* vj = vown + threadIdx.x * VP;
    if (live) {
        load_row<T, HD>(kr, k + n * vk.sn + (long)j * vk.ss + h * HD);
        const T* src = v + n * vv.sn + (long)j * vv.ss + h * HD;
#pragma unroll
        for (int d = 0; d < HD; d++) vj[d] = to_f(src[d]);
    }
#pragma unroll
    for (int d = 0; d < HD; d++) ak[d] = av[d] = 0.f;
    const int first_q = blockIdx.x * BQ; // queries before the block's first key see none of it
    for (int t0 = first_q; t0 < S; t0 += BK) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < BK * HD; idx += BQ) {
            int i = t0 + idx / HD, d = idx % HD;
            bool in = i < S;
            qs[idx] = in ? to_f(q[n * vq.sn + (long)i * vq.ss + h * HD + d]) : 0.f;
            gs[idx] = in ? to_f(dy[(n * S + i) * W + h * HD + d]) : 0.f;
        }
        for (int idx = threadIdx.x; idx < BK; idx += BQ) {
            int i = t0 + idx;
            Ls[idx] = i < S ? lse[id * S + i] : 0.f;
            Ds[idx] = i < S ? Dbuf[id * S + i] : 0.f;
        }
        __syncthreads();
        if (!live || t0 + BK - 1 < j) continue;
        for (int ii = 0; ii < BK; ii++) {
            int i = t0 + ii;
            if (i < j || i >= S) continue;
            const float* qq = qs + ii * HD;
            const float* gg = gs + ii * HD;
            float p = __expf(dot<HD>(qq, kr) * scale - Ls[ii]);
            float ds = p * (dot<HD>(gg, vj) - Ds[ii]);
#pragma unroll
            for (int d = 0; d < HD; d++) {
                ak[d] = fmaf(ds, qq[d], ak[d]);
                av[d] = fmaf(p, gg[d], av[d]);
            }
        }
    }
    if (!live) return;
    T* ok = dk + n * vdk.sn + (long)j * vdk.ss + h * HD;
    T* ov = dv + n * vdv.sn + (long)j * vdv.ss + h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) {
        ok[d] = from_f<T>(ak[d] * scale);
        ov[d] = from_f<T>(av[d]);
    }
}

// --- Long sequences in bf16 on tensor cores (mma.sync m16n8k16, f32 accumulators). --------
// FlashAttention-2's scheme: a block of 4 warps owns 64 rows (queries for the forward and dq,
// keys for dk/dv); each warp owns 16 of them and streams the other side through shared memory
// 64 at a time. Scores stay in registers: an accumulator tile of one product is re-packed as
// the A operand of the next (the m16n8 C layout matches the m16k16 A layout). Row statistics
// per query (log Σ exp L, and D = dy·y) come from the forward and attn_bwd_prep.
//
// The streamed tiles are double-buffered: cp.async copies tile i+1 into one stage while the
// warps multiply out of the other. Tiles stay row-major as in global memory; ldmatrix (x4,
// .trans where the tile's rows are the product's k) builds the fragments. Softmax uses exp2
// with scale·log2(e) folded into one fma; the causal mask is only evaluated on tiles that
// cross the diagonal (or the sequence's end), and there each warp skips the 8-column blocks
// that are masked for all of its 16 rows.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4g + t;
//   A (16×16, row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16×8, k×n):        b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C (16×8):             c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// ldmatrix: lanes 8m..8m+7 give the row addresses of 8×8 matrix m; lane 4g+t receives row g,
// columns 2t..2t+1 (with .trans: rows 2t..2t+1, column g) of each matrix.

constexpr int TC_ROWS = 64;     // rows per block (4 warps × 16)
constexpr int TC_TILE = 64;     // streamed rows per tile
constexpr int TC_PAD = 8;       // bf16 padding per shared row (144-byte rows: the 8 rows of an
                                // ldmatrix hit distinct 16-byte bank groups)
constexpr int TC_THREADS = 128;
constexpr float TC_LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Not volatile: a pure register operation, so the compiler may schedule the (volatile)
// ldmatrix loads around it.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x on the special-function unit (2^-inf = 0); exp2f would add denormal handling.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// 16-byte global → shared copy that bypasses L1; when !ok it writes zeros and reads nothing
// (src must still be a valid address).
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major shared array (leading dim
// ld): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0..a3.
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* x, int ld, int r0, int k0) {
    const int lane = threadIdx.x & 31;
    ldsm_x4(a, x + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

// s = A·Bᵀ for the 8-column block j, where A (16 × HD) is in registers (a[HD/16]) and B is
// rows n of a row-major [64][HD + PAD] tile: element (k, n) of the product's B operand is
// tile[n][k], so the plain ldmatrix of rows j·8.. gives b0 (k 0-7) and b1 (k 8-15).
template <int HD>
__device__ __forceinline__ void mma_abt1(float* s, const uint32_t (*a)[4], const bf16* tile, int j) {
    constexpr int LD = HD + TC_PAD;
    const int lane = threadIdx.x & 31;
    s[0] = s[1] = s[2] = s[3] = 0.f;
    const bf16* row = tile + (j * 8 + (lane & 7)) * LD;
    if constexpr (HD == 16) {
        uint32_t b[2];
        ldsm_x2(b, row + ((lane >> 3) & 1) * 8);  // matrices: k 0-7, k 8-15
        mma16816(s, a[0], b);
    } else {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk += 2) {
            uint32_t b[4];
            ldsm_x4(b, row + kk * 16 + (lane >> 3) * 8);  // k 0-7, 8-15 of kk; of kk + 1
            mma16816(s, a[kk], b);
            mma16816(s, a[kk + 1], b + 2);
        }
    }
}

// s[j] = A·Bᵀ (as mma_abt1) for the blocks jlo <= j < jhi; the others are zero.
template <int HD>
__device__ __forceinline__ void mma_abt(float (*s)[4], const uint32_t (*a)[4], const bf16* tile, int jlo, int jhi) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (j >= jlo && j < jhi) mma_abt1<HD>(s[j], a, tile, j);
        else s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    }
}

// acc (16 × HD) += A·B over the 16-row k-steps klo <= kk < khi, A (16 × 64) in registers
// (a[4]) and B = a row-major [64][HD + PAD] tile (row = k, column = n), transposed by
// ldmatrix.trans: matrices (k 0-7, n j·8), (k 8-15, n j·8), (k 0-7, n j·8+8), (k 8-15, n j·8+8).
template <int HD>
__device__ __forceinline__ void mma_ab(float (*acc)[4], const uint32_t (*a)[4], const bf16* tile, int klo, int khi) {
    constexpr int LD = HD + TC_PAD;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        if (kk < klo || kk >= khi) continue;
        const bf16* row = tile + (kk * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
#pragma unroll
        for (int j = 0; j < HD / 8; j += 2) {
            uint32_t b[4];
            ldsm_x4_t(b, row + j * 8);
            mma16816(acc[j], a[kk], b);
            mma16816(acc[j + 1], a[kk], b + 2);
        }
    }
}

// Stores accumulator block j (16 × 8, C layout) as half of the A fragment of k-step j / 2.
__device__ __forceinline__ void c_to_a(uint32_t (*a)[4], const float* c, int j) {
    a[j >> 1][(j & 1) * 2] = pack_bf16(c[0], c[1]);
    a[j >> 1][(j & 1) * 2 + 1] = pack_bf16(c[2], c[3]);
}

// Starts copying rows r0..r0+63 (zeros past `rows`) of a [.., HD] bf16 view into a row-major
// shared tile [64][HD + PAD]. 16-byte copies: the host checks the view's alignment.
template <int HD>
__device__ __forceinline__ void load_tile_async(bf16* dst, const bf16* src, long ss, int r0, int rows) {
    constexpr int V = 8;  // bf16 per 16-byte copy
    static_assert(TC_TILE * HD / V % TC_THREADS == 0, "whole copies per thread");
#pragma unroll
    for (int i = 0; i < TC_TILE * HD / V / TC_THREADS; i++) {
        const int idx = threadIdx.x + i * TC_THREADS;
        const int r = idx / (HD / V), c = (idx % (HD / V)) * V;
        const bool ok = r0 + r < rows;
        cp_async16(dst + r * (HD + TC_PAD) + c, src + (ok ? (long)(r0 + r) * ss + c : 0), ok);
    }
}

// Grid (N·H, ceil(Sq / 64)); the y index runs backwards so that the row blocks with the most
// keys start first and the short ones fill in at the end.
// WIN: the sliding-window instantiation (window > 0); without it every window term folds away.
template <int HD, bool WIN>
__device__ void attn_tc_fwd(const bf16* q, View vq, const bf16* k, View vk, const bf16* v, View vv, bf16* y, float* lse,
                            int N, int Sq, int Sk, int H, float scale, int window_arg) {
    const int window = WIN ? window_arg : 0;
    constexpr int LD = HD + TC_PAD, TS = TC_TILE * LD;
    // Stage s: K tile at kv + 2s·TS, V tile at kv + (2s + 1)·TS. Stage 1's K slot first holds q.
    __shared__ __align__(128) bf16 kv[4 * TS];
    const long id = blockIdx.x;
    const long n = id / H, h = id % H;
    const int i0 = (gridDim.y - 1 - blockIdx.y) * TC_ROWS;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const bf16* kp = k + n * vk.sn + h * HD;
    const bf16* vp = v + n * vv.sn + h * HD;
    const int off = Sk - Sq;  // query i sits at position off + i
    const int last = min(Sk - 1, off + i0 + TC_ROWS - 1);
    const int tiles = last / TC_TILE + 1;
    // With a sliding window (window > 0) position p sees keys p − window < c ≤ p: the block's
    // first tile is the one holding its first row's oldest key.
    const int first = window > 0 ? max(0, off + i0 - window + 1) / TC_TILE : 0;
    load_tile_async<HD>(kv + 2 * TS, q + n * vq.sn + h * HD, vq.ss, i0, Sq);
    cp_async_commit();
    load_tile_async<HD>(kv, kp, vk.ss, first * TC_TILE, Sk);
    load_tile_async<HD>(kv + TS, vp, vv.ss, first * TC_TILE, Sk);
    cp_async_commit();
    cp_async_wait<1>();  // q has landed (tile 0 may still be in flight)
    __syncthreads();
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) load_a(qa[kk], kv + 2 * TS, LD, warp * 16, kk * 16);
    __syncthreads();  // stage 1 is free for tile 1
    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    // m: running row max of the raw scores q·k; l: this lane's part of Σ exp(scale·(s − m)).
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const float sl2 = scale * TC_LOG2E;
    const int row0 = i0 + warp * 16 + g;         // this lane's rows: row0 and row0 + 8
    const int wmax = off + i0 + warp * 16 + 15;  // the warp's last position
    for (int it = first; it < tiles; it++) {
        const int kt = it * TC_TILE;
        const int stage = (it - first) & 1;
        if (it + 1 < tiles) {
            bf16* nx = kv + (stage ^ 1) * 2 * TS;
            load_tile_async<HD>(nx, kp, vk.ss, kt + TC_TILE, Sk);
            load_tile_async<HD>(nx + TS, vp, vv.ss, kt + TC_TILE, Sk);
        }
        cp_async_commit();   // (an empty group on the last tile keeps the count uniform)
        cp_async_wait<1>();  // tile it has landed
        __syncthreads();
        const bf16* ks = kv + stage * 2 * TS;
        const bf16* vs = ks + TS;
        // Some key of the tile lies after the block's first position (or past Sk): mask.
        const bool diag = kt + TC_TILE - 1 > off + i0;
        // Some key of the tile is older than the window of the block's last position: mask.
        const bool edge = window > 0 && kt <= off + i0 + TC_ROWS - 1 - window;
        // 8-key blocks j >= jn are after all of this warp's positions (an upper bound).
        const int jn = diag ? min(8, max(0, (wmax - kt) / 8 + 1)) : 8;
        float s[8][4];
        mma_abt<HD>(s, qa, ks, 0, jn);
        float mx[2] = {m[0], m[1]};
        if (diag || edge) {
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int col = kt + j * 8 + 2 * t + (e & 1);
                    const int pos = off + row0 + 8 * (e >> 1);
                    if (col > pos || col >= Sk || (window > 0 && col <= pos - window)) s[j][e] = -INFINITY;
                }
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
        float corr[2], mb[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
            const float base = mx[r] == -INFINITY ? 0.f : mx[r];
            corr[r] = ex2((m[r] - base) * sl2);
            m[r] = mx[r];
            mb[r] = base * sl2;
        }
        uint32_t pa[4][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = ex2(fmaf(s[j][e], sl2, -mb[e >> 1]));
            c_to_a(pa, s[j], j);
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) sum += s[j][2 * r] + s[j][2 * r + 1];
            l[r] = l[r] * corr[r] + sum;
        }
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            o[j][0] *= corr[0]; o[j][1] *= corr[0];
            o[j][2] *= corr[1]; o[j][3] *= corr[1];
        }
        mma_ab<HD>(o, pa, vs, 0, (jn + 1) / 2);
        __syncthreads();  // everyone is done with this stage before it is refilled
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        const int i = row0 + 8 * r;
        if (i >= Sq) continue;
        const float inv = 1.f / l[r];
        bf16* yr = y + (n * Sq + i) * (long)(H * HD) + h * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; j++)
            *reinterpret_cast<uint32_t*>(yr + j * 8 + 2 * t) = pack_bf16(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
        if (lse && t == 0) lse[id * Sq + i] = m[r] * scale + logf(l[r]);
    }
}

// D = Σ_d dy·y per row, into Dbuf [N, H, S]; one warp per (row, head).
template <typename T>
__device__ void attn_bwd_prep(const T* y, const T* dy, float* Dbuf, int N, int S, int H, int HD) {
    const long w = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long)N * S * H) return;
    const long h = w % H, i = (w / H) % S, n = w / ((long)H * S);
    const long base = (n * S + i) * (long)H * HD + h * HD;
    float d = 0.f;
    for (int c = lane; c < HD; c += 32) d += to_f(y[base + c]) * to_f(dy[base + c]);
    d = warp_sum(d);
    if (lane == 0) Dbuf[(n * H + h) * S + i] = d;
}

// dq for 64 queries per block (self-attention, S = Sq = Sk); dy is [N, S, H·HD] contiguous.
// Grid (N·H, ceil(S / 64)), row blocks backwards (longest first) as in the forward.
template <int HD, bool WIN>
__device__ void attn_tc_bwd_dq(const bf16* q, View vq, const bf16* k, View vk, const bf16* v, View vv, const bf16* dy,
                               const float* lse, const float* Dbuf, bf16* dq, View vdq, int N, int S, int H, float scale,
                               int window_arg) {
    const int window = WIN ? window_arg : 0;
    constexpr int LD = HD + TC_PAD, TS = TC_TILE * LD;
    // Stage s: K tile at kv + 2s·TS, V tile at kv + (2s + 1)·TS. Stage 1 first holds q and dy.
    __shared__ __align__(128) bf16 kv[4 * TS];
    const long id = blockIdx.x;
    const long n = id / H, h = id % H;
    const long W = (long)H * HD;
    const int i0 = (gridDim.y - 1 - blockIdx.y) * TC_ROWS;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const bf16* kp = k + n * vk.sn + h * HD;
    const bf16* vp = v + n * vv.sn + h * HD;
    const int last = min(S - 1, i0 + TC_ROWS - 1);
    const int tiles = last / TC_TILE + 1;
    const int first = window > 0 ? max(0, i0 - window + 1) / TC_TILE : 0;  // as in the forward
    load_tile_async<HD>(kv + 2 * TS, q + n * vq.sn + h * HD, vq.ss, i0, S);
    load_tile_async<HD>(kv + 3 * TS, dy + n * S * W + h * HD, W, i0, S);
    cp_async_commit();
    load_tile_async<HD>(kv, kp, vk.ss, first * TC_TILE, S);
    load_tile_async<HD>(kv + TS, vp, vv.ss, first * TC_TILE, S);
    cp_async_commit();
    cp_async_wait<1>();  // q and dy have landed
    __syncthreads();
    uint32_t qa[HD / 16][4], ga[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        load_a(qa[kk], kv + 2 * TS, LD, warp * 16, kk * 16);
        load_a(ga[kk], kv + 3 * TS, LD, warp * 16, kk * 16);
    }
    __syncthreads();  // stage 1 is free for tile 1
    const int row0 = i0 + warp * 16 + g;  // this lane's rows: row0 and row0 + 8
    const int wmax = i0 + warp * 16 + 15;
    const float sl2 = scale * TC_LOG2E;
    float L2[2], D[2];  // L2 = log2(e)·L
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = min(row0 + 8 * r, S - 1);  // rows past S compute garbage that is not stored
        L2[r] = lse[id * S + i] * TC_LOG2E;
        D[r] = Dbuf[id * S + i];
    }
    float acc[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int it = first; it < tiles; it++) {
        const int kt = it * TC_TILE;
        const int stage = (it - first) & 1;
        if (it + 1 < tiles) {
            bf16* nx = kv + (stage ^ 1) * 2 * TS;
            load_tile_async<HD>(nx, kp, vk.ss, kt + TC_TILE, S);
            load_tile_async<HD>(nx + TS, vp, vv.ss, kt + TC_TILE, S);
        }
        cp_async_commit();
        cp_async_wait<1>();  // tile it has landed
        __syncthreads();
        const bf16* ks = kv + stage * 2 * TS;
        const bf16* vs = ks + TS;
        const bool diag = kt + TC_TILE - 1 > i0;  // some key after the block's first query
        const bool edge = window > 0 && kt <= i0 + TC_ROWS - 1 - window;  // some key too old
        const int jn = diag ? min(8, max(0, (wmax - kt) / 8 + 1)) : 8;
        float p[8][4], dp[8][4];
        mma_abt<HD>(p, qa, ks, 0, jn);
        mma_abt<HD>(dp, ga, vs, 0, jn);
        uint32_t da[4][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = kt + j * 8 + 2 * t + (e & 1), row = row0 + 8 * (e >> 1);
                float pe = ex2(fmaf(p[j][e], sl2, -L2[e >> 1]));
                if ((diag && col > row) || (edge && col <= row - window)) pe = 0.f;
                p[j][e] = pe * (dp[j][e] - D[e >> 1]);  // dS
            }
            c_to_a(da, p[j], j);
        }
        mma_ab<HD>(acc, da, ks, 0, (jn + 1) / 2);
        __syncthreads();  // everyone is done with this stage before it is refilled
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = row0 + 8 * r;
        if (i >= S) continue;
        bf16* o = dq + n * vdq.sn + (long)i * vdq.ss + h * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; j++)
            *reinterpret_cast<uint32_t*>(o + j * 8 + 2 * t) = pack_bf16(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale);
    }
}

// dk and dv for 64 keys per block; queries at or after each key stream through. Grid
// (N·H, ceil(S / 64)): the first key blocks, which see the most queries, start first.
template <int HD, bool WIN>
__device__ void attn_tc_bwd_dkdv(const bf16* q, View vq, const bf16* k, View vk, const bf16* v, View vv, const bf16* dy,
                                 const float* lse, const float* Dbuf, bf16* dk, View vdk, bf16* dv, View vdv, int N, int S,
                                 int H, float scale, int window_arg) {
    const int window = WIN ? window_arg : 0;
    constexpr int LD = HD + TC_PAD, TS = TC_TILE * LD;
    // Stage s: q tile at qg + 2s·TS, dy tile at qg + (2s + 1)·TS, with L and D in Ls[s], Ds[s].
    // Stage 1 first holds k and v.
    __shared__ __align__(128) bf16 qg[4 * TS];
    __shared__ __align__(16) float Ls[2][TC_TILE], Ds[2][TC_TILE];
    const long id = blockIdx.x;
    const long n = id / H, h = id % H;
    const long W = (long)H * HD;
    const int j0 = blockIdx.y * TC_ROWS;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const bf16* qp = q + n * vq.sn + h * HD;
    const bf16* gp = dy + n * S * W + h * HD;
    const float* lp = lse + id * S;
    const float* dp_ = Dbuf + id * S;
    // Queries past S load as zeros with L = D = 0: their p = 1 meets a zero dy row and their
    // dS = 1·(0 − 0) = 0, so they add nothing and need no mask.
    auto load_stage = [&](int st, int it) {
        load_tile_async<HD>(qg + 2 * st * TS, qp, vq.ss, it, S);
        load_tile_async<HD>(qg + (2 * st + 1) * TS, gp, W, it, S);
        const int r = threadIdx.x & (TC_TILE - 1);
        const bool ok = it + r < S;
        if (threadIdx.x < TC_TILE) cp_async4(&Ls[st][r], lp + (ok ? it + r : 0), ok);
        else cp_async4(&Ds[st][r], dp_ + (ok ? it + r : 0), ok);
    };
    static_assert(TC_THREADS == 2 * TC_TILE, "one L or D per thread");
    // Queries from j0 on see this block's keys; with a window, only up to j0 + 63 + window − 1.
    const int last = window > 0 ? min(S - 1, j0 + TC_ROWS - 2 + window) : S - 1;
    const int tiles = (last - j0) / TC_TILE + 1;
    load_tile_async<HD>(qg + 2 * TS, k + n * vk.sn + h * HD, vk.ss, j0, S);
    load_tile_async<HD>(qg + 3 * TS, v + n * vv.sn + h * HD, vv.ss, j0, S);
    cp_async_commit();
    load_stage(0, j0);
    cp_async_commit();
    cp_async_wait<1>();  // k and v have landed
    __syncthreads();
    uint32_t ka[HD / 16][4], va[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        load_a(ka[kk], qg + 2 * TS, LD, warp * 16, kk * 16);
        load_a(va[kk], qg + 3 * TS, LD, warp * 16, kk * 16);
    }
    __syncthreads();  // stage 1 is free for tile 1
    float ak[HD / 8][4], av[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        ak[j][0] = ak[j][1] = ak[j][2] = ak[j][3] = 0.f;
        av[j][0] = av[j][1] = av[j][2] = av[j][3] = 0.f;
    }
    const float sl2 = scale * TC_LOG2E;
    const int key0 = j0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8
    for (int c = 0; c < tiles; c++) {
        const int it = j0 + c * TC_TILE;
        if (c + 1 < tiles) load_stage((c + 1) & 1, it + TC_TILE);
        cp_async_commit();
        cp_async_wait<1>();  // tile c has landed
        __syncthreads();
        const int st = c & 1;
        const bf16* qs = qg + 2 * st * TS;
        const bf16* gs = qs + TS;
        // Only the first tile (it = j0) has queries before keys; there the 8-query blocks
        // j < 2·warp come before all of this warp's keys.
        const bool diag = c == 0;
        const int jlo = diag ? 2 * warp : 0;
        // Some query of the tile is past the window of one of this block's keys.
        const bool edge = window > 0 && it + TC_TILE - 1 >= j0 + window;
        // One 8-query block at a time, packed at once: 64 f32 scores would not fit beside the
        // 96 registers of fragments and accumulators.
        uint32_t pa[4][4], da[4][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float p[4] = {0.f, 0.f, 0.f, 0.f}, ds[4] = {0.f, 0.f, 0.f, 0.f};
            if (j >= jlo) {
                mma_abt1<HD>(p, ka, qs, j);
                mma_abt1<HD>(ds, va, gs, j);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int cq = j * 8 + 2 * t + (e & 1), key = key0 + 8 * (e >> 1);
                float pe = ex2(fmaf(p[e], sl2, -Ls[st][cq] * TC_LOG2E));
                if ((diag && it + cq < key) || (edge && it + cq >= key + window)) pe = 0.f;
                p[e] = pe;
                ds[e] = pe * (ds[e] - Ds[st][cq]);
            }
            c_to_a(pa, p, j);
            c_to_a(da, ds, j);
        }
        mma_ab<HD>(av, pa, gs, jlo / 2, 4);
        mma_ab<HD>(ak, da, qs, jlo / 2, 4);
        __syncthreads();  // everyone is done with this stage before it is refilled
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = key0 + 8 * r;
        if (key >= S) continue;
        bf16* ok = dk + n * vdk.sn + (long)key * vdk.ss + h * HD;
        bf16* ov = dv + n * vdv.sn + (long)key * vdv.ss + h * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            *reinterpret_cast<uint32_t*>(ok + j * 8 + 2 * t) = pack_bf16(ak[j][2 * r] * scale, ak[j][2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(ov + j * 8 + 2 * t) = pack_bf16(av[j][2 * r], av[j][2 * r + 1]);
        }
    }
}

// -------------------------------------------------------------------------------------------
// KV cache append: k[n, len + i, c] = qkv[n, i, D + c] and v[n, len + i, c] = qkv[n, i, 2D + c]
// for cache buffers [N, cap, D].

template <typename T>
__device__ void kv_append(const T* qkv, View vq, T* k, T* v, int N, int S, int D, long cap, int len) {
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < (size_t)N * S * D; idx += (size_t)gridDim.x * blockDim.x) {
        const long c = idx % D, i = (idx / D) % S, n = idx / ((size_t)D * S);
        const T* row = qkv + n * vq.sn + i * vq.ss;
        const long dst = (n * cap + len + i) * D + c;
        k[dst] = row[D + c];
        v[dst] = row[2 * D + c];
    }
}

// -------------------------------------------------------------------------------------------
// extern "C" entry points, one per element type (and head dimension).

#define KV_APPEND(TN, T)                                                                                                 \
    extern "C" __global__ void kv_append_##TN(const T* qkv, View vq, T* k, T* v, int N, int S, int D, long cap,       \
                                                int len) {                                                            \
        kv_append<T>(qkv, vq, k, v, N, S, D, cap, len);                                                               \
    }

KV_APPEND(f32, float)
KV_APPEND(bf16, bf16)

#define SMALL_R(HD) ((4096 / (HD)) < 128 ? (4096 / (HD)) : 128)
#define SMALL_RB(HD) ((2048 / (HD)) < 128 ? (2048 / (HD)) : 128)  /* 4 float arrays of R·HD: 32 KiB */

#define ATTENTION(TN, T, HD)                                                                                            \
    extern "C" __global__ void __launch_bounds__(SMALL_R(HD)) attn_small_fwd_##TN##_##HD(                             \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N, int Sq, int Sk, int H, \
        float scale) {                                                                                                 \
        attn_small_fwd<T, HD, SMALL_R(HD)>(q, vq, k, vk, v, vv, y, lse, N, Sq, Sk, H, scale);                          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(SMALL_RB(HD)) attn_small_bwd_##TN##_##HD(                            \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy, T* dq, View vdq,      \
        T* dk, View vdk, T* dv, View vdv, int N, int S, int H, float scale) {                                          \
        attn_small_bwd<T, HD, SMALL_RB(HD)>(q, vq, k, vk, v, vv, y, dy, dq, vdq, dk, vdk, dv, vdv, N, S, H, scale);    \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(BQ) attn_flash_fwd_##TN##_##HD(                                      \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N, int Sq, int Sk, int H, \
        float scale) {                                                                                                 \
        attn_flash_fwd<T, HD>(q, vq, k, vk, v, vv, y, lse, N, Sq, Sk, H, scale);                                       \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(BQ) attn_flash_bwd_dq_##TN##_##HD(                                   \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy, const float* lse,     \
        float* Dbuf, T* dq, View vdq, int N, int S, int H, float scale) {                                              \
        attn_flash_bwd_dq<T, HD>(q, vq, k, vk, v, vv, y, dy, lse, Dbuf, dq, vdq, N, S, H, scale);                      \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(BQ) attn_flash_bwd_dkdv_##TN##_##HD(                                 \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* dy, const float* lse,                 \
        const float* Dbuf, T* dk, View vdk, T* dv, View vdv, int N, int S, int H, float scale) {                       \
        attn_flash_bwd_dkdv<T, HD>(q, vq, k, vk, v, vv, dy, lse, Dbuf, dk, vdk, dv, vdv, N, S, H, scale);              \
    }

// Each tensor-core kernel twice: full causal, and `_win` with a sliding window (window > 0).
#define ATTENTION_TC_VARIANT(HD, SUFFIX, WIN)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attn_tc_fwd##SUFFIX##_##HD(                                       \
        const bf16* q, View vq, const bf16* k, View vk, const bf16* v, View vv, bf16* y, float* lse, int N, int Sq,  \
        int Sk, int H, float scale, int window) {                                                                      \
        attn_tc_fwd<HD, WIN>(q, vq, k, vk, v, vv, y, lse, N, Sq, Sk, H, scale, window);                                \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 3) attn_tc_bwd_dq##SUFFIX##_##HD(                                 \
        const bf16* q, View vq, const bf16* k, View vk, const bf16* v, View vv, const bf16* dy, const float* lse,     \
        const float* Dbuf, bf16* dq, View vdq, int N, int S, int H, float scale, int window) {                         \
        attn_tc_bwd_dq<HD, WIN>(q, vq, k, vk, v, vv, dy, lse, Dbuf, dq, vdq, N, S, H, scale, window);                  \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 3) attn_tc_bwd_dkdv##SUFFIX##_##HD(                               \
        const bf16* q, View vq, const bf16* k, View vk, const bf16* v, View vv, const bf16* dy, const float* lse,     \
        const float* Dbuf, bf16* dk, View vdk, bf16* dv, View vdv, int N, int S, int H, float scale, int window) {     \
        attn_tc_bwd_dkdv<HD, WIN>(q, vq, k, vk, v, vv, dy, lse, Dbuf, dk, vdk, dv, vdv, N, S, H, scale, window);       \
    }
#define ATTENTION_TC(HD) ATTENTION_TC_VARIANT(HD, , false) ATTENTION_TC_VARIANT(HD, _win, true)

ATTENTION_TC(16)
ATTENTION_TC(32)
ATTENTION_TC(64)

extern "C" __global__ void attn_bwd_prep_f32(const float* y, const float* dy, float* Dbuf, int N, int S, int H, int HD) {
    attn_bwd_prep<float>(y, dy, Dbuf, N, S, H, HD);
}
extern "C" __global__ void attn_bwd_prep_bf16(const bf16* y, const bf16* dy, float* Dbuf, int N, int S, int H, int HD) {
    attn_bwd_prep<bf16>(y, dy, Dbuf, N, S, H, HD);
}

#define ATTENTION_WARP(TN, T, HD)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) attn_warp_fwd_##TN##_##HD(                                       \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N, int Sq, int Sk, int H, \
        float scale) {                                                                                                 \
        attn_warp_fwd<T, HD>(q, vq, k, vk, v, vv, y, lse, N, Sq, Sk, H, scale);                                        \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attn_warp_bwd_##TN##_##HD(                                       \
        const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy, T* dq, View vdq,      \
        T* dk, View vdk, T* dv, View vdv, int N, int S, int H, float scale) {                                          \
        attn_warp_bwd<T, HD>(q, vq, k, vk, v, vv, y, dy, dq, vdq, dk, vdk, dv, vdv, N, S, H, scale);                   \
    }

ATTENTION_WARP(f32, float, 32)
ATTENTION_WARP(f32, float, 64)
ATTENTION_WARP(bf16, bf16, 32)
ATTENTION_WARP(bf16, bf16, 64)

#define ATTENTION_ALL(TN, T) ATTENTION(TN, T, 16) ATTENTION(TN, T, 32) ATTENTION(TN, T, 64)

ATTENTION_ALL(f32, float)
ATTENTION_ALL(bf16, bf16)
