// The CUDA decoding engine's kernels (src/generate/cuda.rs): one new position for each of B
// sequences per call, on buffers the engine allocated once. With megabyte.cu's norm and GELU
// kernels and cuBLAS for the matrix products, a byte costs a few dozen launches and no host
// round trip: the sampled byte stays on the device and feeds the next step.
//
// Rounding follows the stepwise path (src/model.rs local_step and global_step): every add that
// candle does as a separate T-typed op is rounded to T here too.
//
// The bytes of the current patch live in a time-major buffer cur [P, B] (u32): byte j of
// sequence b's patch is cur[j·B + b], so the patch is one contiguous range to read back.
// Steps are captured once into CUDA graphs (one per local position, one for the global step)
// and replayed: what changes from patch to patch, the global position and the position-table
// row of the patch's first byte, is read from a device state the global step advances. With
// cross-patch attention the local model's position (its cache length, also its position-table
// row) changes from byte to byte, so it too is read from a device state, which each local step
// advances.

#include "common.cuh"

// The local model's input at one position of the patch:
//   x[b] = ctx[b] + ((E[prev[b]] or pad) + pos)
// ctx: rows of the global model's context for this position (row stride ctx_stride); prev: the
// previous bytes [B], or null at the local sequence's first position, which gets the pad (f32,
// rounded to T first); pos: the position-table row, or with pos_dev the table, whose row
// *pos_dev is taken.
template <typename T>
__device__ void dec_local_in(const T* ctx, long ctx_stride, const T* table, const float* pad, const T* pos,
                             const int* pos_dev, const uint32_t* prev, T* x, int B, int D) {
    if (pos_dev) pos += (long)*pos_dev * D;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)B * D; i += (long)gridDim.x * blockDim.x) {
        const long b = i / D;
        const int c = i % D;
        const float e = prev ? to_f(table[(long)prev[b] * D + c]) : to_f(from_f<T>(pad[c]));
        const float ep = to_f(from_f<T>(e + to_f(pos[c])));
        x[i] = from_f<T>(to_f(ctx[b * ctx_stride + c]) + ep);
    }
}

// The global model's input for one completed patch of P bytes per sequence:
//   x[b, j·DG + c] = E[bytes[j·B + b]][c] + pos[(first + j)·DG + c]
// bytes: the patch (time-major); first = state[1], the window position of its first byte.
template <typename T>
__device__ void dec_patch_in(const T* table, const T* pos_table, const int* state, const uint32_t* bytes, T* x, int B,
                             int P, int DG) {
    const long width = (long)P * DG;
    const T* pos = pos_table + (long)state[1] * DG;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < B * width; i += (long)gridDim.x * blockDim.x) {
        const long b = i / width, r = i % width;
        const int j = r / DG, c = r % DG;
        x[i] = from_f<T>(to_f(table[(long)bytes[(long)j * B + b] * DG + c]) + to_f(pos[r]));
    }
}

// Causal attention of one new position per sequence. qkv [B, 3D] holds its query, key and value
// (column blocks, heads within each); the key and value are first written at position `len` of
// the caches kc, vc [B, cap, D], then the query attends over positions 0..len, or with a
// sliding window W > 0 over the last W of them (len − W + 1..len, itself included). len is
// *len_dev when given (a device state's position), else len_arg.
// One block per (sequence, head); each warp streams every (warps)-th key with an online softmax
// (a lane holds HD/32 columns), and warp 0 merges the warps' partial results.
constexpr int DEC_WARPS = 8;

template <typename T, int HD>
__device__ void dec_attn(const T* qkv, T* kc, T* vc, long cap, const int* len_dev, int len_arg, int window, T* y, int H,
                         float scale) {
    constexpr int E = (HD + 31) / 32;
    const int len = len_dev ? *len_dev : len_arg;
    const int first = window > 0 ? max(0, len + 1 - window) : 0;
    __shared__ float part_m[DEC_WARPS], part_l[DEC_WARPS];
    __shared__ float part_o[DEC_WARPS][E * 32];
    const int b = blockIdx.x / H, h = blockIdx.x % H;
    const long D = (long)H * HD;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* row = qkv + b * 3 * D;
    T* kb = kc + b * cap * D + h * HD;
    T* vb = vc + b * cap * D + h * HD;
    for (int c = threadIdx.x; c < HD; c += blockDim.x) {
        kb[len * D + c] = row[D + h * HD + c];
        vb[len * D + c] = row[2 * D + h * HD + c];
    }
    __syncthreads();  // the new key and value are visible to every warp of the block
    float q[E], o[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int c = lane + 32 * e;
        q[e] = c < HD ? to_f(row[h * HD + c]) : 0.f;
        o[e] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = first + warp; j <= len; j += DEC_WARPS) {
        const T* kr = kb + j * D;
        const T* vr = vb + j * D;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int c = lane + 32 * e;
            if (c < HD) s += q[e] * to_f(kr[c]);
        }
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s);
        const float corr = __expf(m - mn), p = __expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int c = lane + 32 * e;
            o[e] = o[e] * corr + (c < HD ? p * to_f(vr[c]) : 0.f);
        }
        m = mn;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; e++) part_o[warp][lane + 32 * e] = o[e];
    __syncthreads();
    if (warp != 0) return;
    float mx = -INFINITY;
    for (int w = 0; w < DEC_WARPS; w++) mx = fmaxf(mx, part_m[w]);  // finite: warp 0 saw key `first`
    float total = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.f;
    for (int w = 0; w < DEC_WARPS; w++) {
        const float f = __expf(part_m[w] - mx);  // 0 for a warp that saw no key
        total += part_l[w] * f;
#pragma unroll
        for (int e = 0; e < E; e++) acc[e] += part_o[w][lane + 32 * e] * f;
    }
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int c = lane + 32 * e;
        if (c < HD) y[b * D + h * HD + c] = from_f<T>(acc[e] / total);
    }
}

// The next byte of each sequence from its 256 logits (one block of 256 threads per sequence),
// chosen exactly as generate.rs's Sampler does on the host: mode 0 greedy (first maximum),
// 1 temperature, 2 top-k, 3 top-p. Weights exp((l − max)/temperature) in double, sorted
// descending (ties by byte value), truncated to k or to the nucleus, and the inverse CDF at
// u[b]·total, the host's uniform draw for this sequence. Writes out[b].
template <typename T>
__device__ void dec_sample(const T* logits, uint32_t* out, const double* u, int mode, double temperature, int top_k,
                           double top_p) {
    __shared__ float best[256];
    __shared__ int best_i[256];
    __shared__ double w[256], sorted_w[256];
    __shared__ int sorted_i[256];
    const int b = blockIdx.x, i = threadIdx.x;
    const float l = to_f(logits[(long)b * 256 + i]);
    best[i] = l;
    best_i[i] = i;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (i < s) {
            const float o = best[i + s];
            const int oi = best_i[i + s];
            if (o > best[i] || (o == best[i] && oi < best_i[i])) {
                best[i] = o;
                best_i[i] = oi;
            }
        }
        __syncthreads();
    }
    if (mode == 0) {
        if (i == 0) out[b] = best_i[0];
        return;
    }
    const double wi = exp(((double)l - (double)best[0]) / temperature);
    w[i] = wi;
    __syncthreads();
    int rank = 0;
    for (int j = 0; j < 256; j++) rank += (w[j] > wi) || (w[j] == wi && j < i);
    sorted_w[rank] = wi;
    sorted_i[rank] = i;
    __syncthreads();
    if (i != 0) return;
    int keep = mode == 2 ? min(top_k, 256) : 256;
    double total = 0.0;
    for (int r = 0; r < keep; r++) total += sorted_w[r];
    if (mode == 3 && top_p < 1.0) {
        double acc = 0.0;
        int n = 0;
        for (int r = 0; r < keep; r++) {
            acc += sorted_w[r] / total;
            n++;
            if (acc >= top_p) break;
        }
        keep = n;
        total = 0.0;
        for (int r = 0; r < keep; r++) total += sorted_w[r];
    }
    double x = u[b] * total;
    int pick = sorted_i[keep - 1];
    for (int r = 0; r < keep; r++) {
        if (x < sorted_w[r]) {
            pick = sorted_i[r];
            break;
        }
        x -= sorted_w[r];
    }
    out[b] = pick;
}

// y[r, n] = Σ_k x[r, k]·W[n, k] for rows r < R (R ≤ 8): a matrix-vector product for the few
// rows of a decoding step, bound by reading W once. One warp per output column n streams the
// weight row in 16-byte loads, U of them in flight per lane; the x rows come through L1.
// With with_gelu, y = GELU(round_T(Σ)), as a product followed by the GELU kernel rounds it.
// K·sizeof(T) must be a multiple of 16 and the rows 16-byte aligned (the host checks).
template <typename T, int R>
__device__ void dec_gemv(const T* x, const T* W, T* y, int rows, int N, int K, int with_gelu) {
    constexpr int V = 16 / sizeof(T), U = 4;
    const long n = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (n >= N) return;
    const T* w = W + n * K;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int k0 = lane * V; k0 < K; k0 += 32 * V * U) {
        uint4 wv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = k0 + u * 32 * V;
            wv[u] = k < K ? *reinterpret_cast<const uint4*>(w + k) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = k0 + u * 32 * V;
            if (k >= K) break;
            const T* we = reinterpret_cast<const T*>(&wv[u]);
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (r >= rows) break;
                const uint4 xv = *reinterpret_cast<const uint4*>(x + (long)r * K + k);
                const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int e = 0; e < V; e++) acc[r] += to_f(we[e]) * to_f(xe[e]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (r >= rows) break;
        float v = warp_sum(acc[r]);
        if (lane == 0) {
            if (with_gelu) {
                v = gelu(to_f(from_f<T>(v)));
            }
            y[(long)r * N + n] = from_f<T>(v);
        }
    }
}

// -------------------------------------------------------------------------------------------
// extern "C" entry points.

// After a global step: one more global position, and the next patch starts P bytes later.
// (With P = 0, after a cross-patch local step: one more local position.)
extern "C" __global__ void dec_advance(int* state, int P) {
    state[0] += 1;
    state[1] += P;
}

#define DECODE(TN, T)                                                                                                  \
    extern "C" __global__ void dec_local_in_##TN(const T* ctx, long ctx_stride, const T* table, const float* pad,     \
                                                 const T* pos, const int* pos_dev, const uint32_t* prev, T* x, int B,  \
                                                 int D) {                                                              \
        dec_local_in<T>(ctx, ctx_stride, table, pad, pos, pos_dev, prev, x, B, D);                                     \
    }                                                                                                                  \
    extern "C" __global__ void dec_patch_in_##TN(const T* table, const T* pos, const int* state,                     \
                                                 const uint32_t* bytes, T* x, int B, int P, int DG) {                  \
        dec_patch_in<T>(table, pos, state, bytes, x, B, P, DG);                                                        \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) dec_sample_##TN(const T* logits, uint32_t* out, const double* u, \
                                                                      int mode, double temperature, int top_k,         \
                                                                      double top_p) {                                  \
        dec_sample<T>(logits, out, u, mode, temperature, top_k, top_p);                                                \
    }

#define DECODE_ATTN(TN, T, HD)                                                                                         \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) dec_attn_##TN##_##HD(                                 \
        const T* qkv, T* kc, T* vc, long cap, const int* len_dev, int len, int window, T* y, int H, float scale) {    \
        dec_attn<T, HD>(qkv, kc, vc, cap, len_dev, len, window, y, H, scale);                                          \
    }

#define DECODE_GEMV(TN, T, R)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) dec_gemv_##TN##_##R(const T* x, const T* W, T* y, int rows,      \
                                                                          int N, int K, int with_gelu) {               \
        dec_gemv<T, R>(x, W, y, rows, N, K, with_gelu);                                                                \
    }

DECODE(f32, float)
DECODE(bf16, bf16)
DECODE_GEMV(f32, float, 2)
DECODE_GEMV(f32, float, 8)
DECODE_GEMV(bf16, bf16, 2)
DECODE_GEMV(bf16, bf16, 8)
DECODE_ATTN(f32, float, 16)
DECODE_ATTN(f32, float, 32)
DECODE_ATTN(f32, float, 64)
DECODE_ATTN(f32, float, 128)
DECODE_ATTN(bf16, bf16, 16)
DECODE_ATTN(bf16, bf16, 32)
DECODE_ATTN(bf16, bf16, 64)
DECODE_ATTN(bf16, bf16, 128)
