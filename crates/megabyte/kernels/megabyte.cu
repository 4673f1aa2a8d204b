// MEGABYTE's fused CUDA kernels: LayerNorm/RMSNorm, GELU, softmax cross-entropy over the byte
// logits, AdamW, and causal attention (a small-sequence kernel for the local model's patches and
// a flash-style kernel for the global model that never holds the K×K score matrix).
//
// Every kernel reads and writes its activations as T (float or bf16) and computes in float.
// Norm weights, losses, statistics and optimizer state are always float.
// Built to PTX by build.rs (feature `cuda`); launched from src/ops/cuda.rs, which documents
// each entry point's shapes. The CPU kernels in src/ops.rs are the reference for each.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

// -------------------------------------------------------------------------------------------
// LayerNorm (b != null: centre, scale, shift) / RMSNorm (b == null) over rows of d. One warp
// per row. x, y: [rows, d] contiguous.

template <typename T>
__device__ __forceinline__ void row_stats(const T* xr, int d, bool center, float eps, float& mean, float& rstd) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    if (center) {
        for (int c = lane; c < d; c += 32) s += to_f(xr[c]);
        s = warp_sum(s) / d;
    }
    float v = 0.f;
    for (int c = lane; c < d; c += 32) {
        float t = to_f(xr[c]) - s;
        v += t * t;
    }
    v = warp_sum(v) / d;
    mean = s;
    rstd = rsqrtf(v + eps);
}

template <typename T>
__device__ void norm_fwd(const T* x, const float* w, const float* b, T* y, int rows, int d, float eps) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    T* yr = y + (size_t)row * d;
    float mean, rstd;
    row_stats(xr, d, b != nullptr, eps, mean, rstd);
    for (int c = lane; c < d; c += 32) {
        float v = (to_f(xr[c]) - mean) * rstd * w[c];
        if (b) v += b[c];
        yr[c] = from_f<T>(v);
    }
}

// dx [rows, d] and per-block partial sums of dw (and db when centred) into part [gridDim.x, 2d].
// Dynamic shared memory: 2d floats.
template <typename T>
__device__ void norm_bwd(const T* x, const float* w, const T* dy, T* dx, float* part, int rows, int d, float eps, int center) {
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
        for (int c = lane; c < d; c += 32) {
            float xh = (to_f(xr[c]) - mean) * rstd;
            float g = to_f(gr[c]) * w[c];
            mg += g;
            mgx += g * xh;
        }
        mg = center ? warp_sum(mg) / d : 0.f;
        mgx = warp_sum(mgx) / d;
        T* dxr = dx + (size_t)row * d;
        for (int c = lane; c < d; c += 32) {
            float xh = (to_f(xr[c]) - mean) * rstd;
            float g = to_f(gr[c]);
            dxr[c] = from_f<T>(rstd * (g * w[c] - mg - xh * mgx));
            atomicAdd(&acc[c], g * xh);
            if (center) atomicAdd(&acc[d + c], g);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) part[(size_t)blockIdx.x * 2 * d + i] = acc[i];
}

// out[i] = Σ_g part[g, i] for i < n (n = 2d, or d for RMS).
extern "C" __global__ void sum_partials(const float* part, float* out, int groups, int stride, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int g = 0; g < groups; g++) s += part[(size_t)g * stride + i];
    out[i] = s;
}

// -------------------------------------------------------------------------------------------
// GELU, exact (erf) form.

template <typename T>
__device__ void gelu_fwd(const T* x, T* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        y[i] = from_f<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
    }
}

template <typename T>
__device__ void gelu_bwd(const T* x, const T* dy, T* dx, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        float pdf = __expf(-0.5f * v * v) * 0.39894228040143268f;
        dx[i] = from_f<T>(to_f(dy[i]) * (cdf + v * pdf));
    }
}

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
// AdamW, in place on float weights and moments; g is multiplied by `scale` first (clipping).

extern "C" __global__ void adamw_f32(float* w, const float* g, float* m, float* v, size_t n, float lr, float b1, float b2,
                                     float eps, float decay, float inv_bc1, float inv_bc2, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * scale;
        float mi = b1 * m[i] + (1.f - b1) * gi;
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
        w[i] = w[i] * decay - lr * update;
        m[i] = mi;
        v[i] = vi;
    }
}

// -------------------------------------------------------------------------------------------
// Causal multi-head attention.
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
// group is query r (forward) or key r (backward's second half). K and V of the groups sit in
// shared memory.

template <typename T, int HD, int R>
__device__ void attn_small_fwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, T* y, float* lse, int N,
                               int Sq, int Sk, int H, float scale) {
    __shared__ float ks[R * HD];
    __shared__ float vs[R * HD];
    const int S = max(Sq, Sk);
    const int G = R / S;
    const int g = threadIdx.x / S, r = threadIdx.x % S;
    const long groups = (long)N * H;
    const long first = (long)blockIdx.x * G;
    for (int idx = threadIdx.x; idx < G * Sk * HD; idx += R) {
        int gi = idx / (Sk * HD), j = (idx / HD) % Sk, d = idx % HD;
        long id = first + gi;
        if (id >= groups) continue;
        long n = id / H, h = id % H;
        ks[(gi * Sk + j) * HD + d] = to_f(k[n * vk.sn + j * vk.ss + h * HD + d]);
        vs[(gi * Sk + j) * HD + d] = to_f(v[n * vv.sn + j * vv.ss + h * HD + d]);
    }
    __syncthreads();
    const long id = first + g;
    if (g >= G || r >= Sq || id >= groups) return;
    const long n = id / H, h = id % H;
    float qr[HD], acc[HD];
    load_row<T, HD>(qr, q + n * vq.sn + r * vq.ss + h * HD);
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int last = Sk - Sq + r;
    for (int j = 0; j <= last; j++) {
        const float* kj = ks + (g * Sk + j) * HD;
        const float* vj = vs + (g * Sk + j) * HD;
        float s = dot<HD>(qr, kj) * scale;
        float mn = fmaxf(m, s);
        float corr = __expf(m - mn), p = __expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int d = 0; d < HD; d++) acc[d] = fmaf(p, vj[d], acc[d] * corr);
        m = mn;
    }
    T* yr = y + ((n * Sq) + r) * (long)(H * HD) + h * HD;
    const float inv = 1.f / l;
#pragma unroll
    for (int d = 0; d < HD; d++) yr[d] = from_f<T>(acc[d] * inv);
    if (lse) lse[id * Sq + r] = m + logf(l);
}

// Self-attention backward (Sq = Sk = S ≤ 64). dy and y: [N, S, H·HD] contiguous; dq, dk, dv
// written through views like q, k, v. Shared: Q, K, V, dY of the block's groups, and per-row
// log Σ exp and D = dy·y.
template <typename T, int HD, int R>
__device__ void attn_small_bwd(const T* q, View vq, const T* k, View vk, const T* v, View vv, const T* y, const T* dy,
                               T* dq, View vdq, T* dk, View vdk, T* dv, View vdv, int N, int S, int H, float scale) {
    __shared__ float qs[R * HD];
    __shared__ float ks[R * HD];
    __shared__ float vs[R * HD];
    __shared__ float gs[R * HD];
    __shared__ float lse_s[R];
    __shared__ float D_s[R];
    const int G = R / S;
    const int g = threadIdx.x / S, r = threadIdx.x % S;
    const long groups = (long)N * H;
    const long first = (long)blockIdx.x * G;
    const long W = (long)H * HD;
    for (int idx = threadIdx.x; idx < G * S * HD; idx += R) {
        int gi = idx / (S * HD), j = (idx / HD) % S, d = idx % HD;
        long id = first + gi;
        if (id >= groups) continue;
        long n = id / H, h = id % H;
        int o = (gi * S + j) * HD + d;
        qs[o] = to_f(q[n * vq.sn + j * vq.ss + h * HD + d]);
        ks[o] = to_f(k[n * vk.sn + j * vk.ss + h * HD + d]);
        vs[o] = to_f(v[n * vv.sn + j * vv.ss + h * HD + d]);
        gs[o] = to_f(dy[(n * S + j) * W + h * HD + d]);
    }
    __syncthreads();
    const long id = first + g;
    const bool live = g < G && id >= 0 && id < groups;
    const long n = id / H, h = id % H;
    const float* qi = qs + (g * S + r) * HD;
    const float* gi = gs + (g * S + r) * HD;
    if (live) {
        // Pass 1, thread = query r: row statistics, D, and dq.
        float m = -INFINITY, l = 0.f;
        for (int j = 0; j <= r; j++) {
            float s = dot<HD>(qi, ks + (g * S + j) * HD) * scale;
            float mn = fmaxf(m, s);
            l = l * __expf(m - mn) + __expf(s - mn);
            m = mn;
        }
        const float L = m + logf(l);
        float D = 0.f;
        const T* yr = y + (n * S + r) * W + h * HD;
#pragma unroll
        for (int d = 0; d < HD; d++) D = fmaf(gi[d], to_f(yr[d]), D);
        lse_s[g * S + r] = L;
        D_s[g * S + r] = D;
        float acc[HD];
#pragma unroll
        for (int d = 0; d < HD; d++) acc[d] = 0.f;
        for (int j = 0; j <= r; j++) {
            const float* kj = ks + (g * S + j) * HD;
            float p = __expf(dot<HD>(qi, kj) * scale - L);
            float ds = p * (dot<HD>(gi, vs + (g * S + j) * HD) - D);
#pragma unroll
            for (int d = 0; d < HD; d++) acc[d] = fmaf(ds, kj[d], acc[d]);
        }
        T* o = dq + n * vdq.sn + r * vdq.ss + h * HD;
#pragma unroll
        for (int d = 0; d < HD; d++) o[d] = from_f<T>(acc[d] * scale);
    }
    __syncthreads();
    if (!live) return;
    // Pass 2, thread = key r: dk and dv over the queries that see it.
    const float* kj = ks + (g * S + r) * HD;
    const float* vj = vs + (g * S + r) * HD;
    float ak[HD], av[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) ak[d] = av[d] = 0.f;
    for (int i = r; i < S; i++) {
        const float* qq = qs + (g * S + i) * HD;
        const float* gg = gs + (g * S + i) * HD;
        float p = __expf(dot<HD>(qq, kj) * scale - lse_s[g * S + i]);
        float ds = p * (dot<HD>(gg, vj) - D_s[g * S + i]);
#pragma unroll
        for (int d = 0; d < HD; d++) {
            ak[d] = fmaf(ds, qq[d], ak[d]);
            av[d] = fmaf(p, gg[d], av[d]);
        }
    }
    T* ok = dk + n * vdk.sn + r * vdk.ss + h * HD;
    T* ov = dv + n * vdv.sn + r * vdv.ss + h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) {
        ok[d] = from_f<T>(ak[d] * scale);
        ov[d] = from_f<T>(av[d]);
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
// extern "C" entry points, one per element type (and head dimension for attention).

#define ELEMENTWISE(TN, T)                                                                                               \
    extern "C" __global__ void norm_fwd_##TN(const T* x, const float* w, const float* b, T* y, int rows, int d,      \
                                               float eps) {                                                           \
        norm_fwd<T>(x, w, b, y, rows, d, eps);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void norm_bwd_##TN(const T* x, const float* w, const T* dy, T* dx, float* part, int rows,  \
                                               int d, float eps, int center) {                                        \
        norm_bwd<T>(x, w, dy, dx, part, rows, d, eps, center);                                                        \
    }                                                                                                                 \
    extern "C" __global__ void embed_fwd_##TN(const T* table, const uint32_t* ids, T* out, int rows, int d) {       \
        embed_fwd<T>(table, ids, out, rows, d);                                                                       \
    }                                                                                                                 \
    extern "C" __global__ void embed_bwd_##TN(const T* dy, const uint32_t* ids, float* dtable, int rows, int v,     \
                                                int d, int rpb) {                                                     \
        embed_bwd<T>(dy, ids, dtable, rows, v, d, rpb);                                                               \
    }                                                                                                                 \
    extern "C" __global__ void gelu_fwd_##TN(const T* x, T* y, size_t n) { gelu_fwd<T>(x, y, n); }                   \
    extern "C" __global__ void gelu_bwd_##TN(const T* x, const T* dy, T* dx, size_t n) { gelu_bwd<T>(x, dy, dx, n); } \
    extern "C" __global__ void ce_fwd_##TN(const T* l, const uint32_t* t, float* losses, int rows, int v) {          \
        ce_fwd<T>(l, t, losses, rows, v);                                                                             \
    }                                                                                                                 \
    extern "C" __global__ void ce_bwd_##TN(const T* l, const uint32_t* t, const float* losses, const float* dloss,   \
                                             T* dl, int rows, int v) {                                                \
        ce_bwd<T>(l, t, losses, dloss, dl, rows, v);                                                                  \
    }

ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, bf16)

#define SMALL_R(HD) ((4096 / (HD)) < 128 ? (4096 / (HD)) : 128)
#define SMALL_RB(HD) ((2048 / (HD)) < 128 ? (2048 / (HD)) : 128)

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

#define ATTENTION_ALL(TN, T) ATTENTION(TN, T, 16) ATTENTION(TN, T, 32) ATTENTION(TN, T, 64)

ATTENTION_ALL(f32, float)
ATTENTION_ALL(bf16, bf16)
