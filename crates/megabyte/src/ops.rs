//! Fused operations as candle CustomOps, each with its own backward pass: bias-free linear
//! maps, causal self-attention on a fused qkv projection, LayerNorm/RMSNorm, GELU and softmax
//! cross-entropy; plus forward-only attention after a KV cache and the fused AdamW update.
//!
//! Each replaces a chain of 5–30 small candle ops (and two to three times as many in the
//! backward pass) by one forward and one backward kernel. On the CPU that op count, not the
//! arithmetic, bounds the speed of small models (`tiny`: 17K → 23K training bytes/s from
//! fusing alone; BENCHMARKS.md has the whole log). Kernels exist for the CPU (f32, f64) so far; on other devices
//! each op falls back to its plain composition in [`reference`] (correct, not fast). Each op is
//! checked against the plain candle composition in [`reference`] (GELU against candle's
//! `gelu_erf`, AdamW against the textbook update) and by finite differences through the whole
//! model (tests/it/ops.rs, tests/it/gradients.rs).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

/// True when `t` lives on a CUDA device in a dtype the fused CUDA kernels take (f32, bf16).
#[cfg(feature = "cuda")]
fn fused_cuda(t: &Tensor) -> bool {
    t.device().is_cuda() && cuda::supports(t.dtype())
}

#[cfg(not(feature = "cuda"))]
fn fused_cuda(_: &Tensor) -> bool {
    false
}

/// Head dimension `hd` has a CUDA attention kernel.
#[cfg(feature = "cuda")]
fn cuda_head_dim(hd: usize) -> bool {
    cuda::attention_supported(hd)
}

#[cfg(not(feature = "cuda"))]
fn cuda_head_dim(_: usize) -> bool {
    false
}

/// What the kernels need of an element type (f32 and f64 on the CPU).
trait Elem: WithDType + Float + Send + Sync {
    /// The standard normal's CDF Φ(x) and density φ(x), as GELU and its derivative need them.
    fn normal_cdf_pdf(self) -> (Self, Self);
}

/// 1/√(2π)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl Elem for f32 {
    /// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32 resolution near 1),
    /// whose exp(−z²) with z = x/√2 is also the density's exp(−x²/2): one exp for both.
    /// libm's erff plus a separate exp were 25% of a `tiny` training step.
    fn normal_cdf_pdf(self) -> (f32, f32) {
        let z = self.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
        let e = (-z * z).exp();
        let erf = (1.0 - poly * e).copysign(self);
        (0.5 * (1.0 + erf), e * FRAC_1_SQRT_2PI as f32)
    }
}

impl Elem for f64 {
    fn normal_cdf_pdf(self) -> (f64, f64) {
        (0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2)), (-0.5 * self * self).exp() * FRAC_1_SQRT_2PI)
    }
}

/// Elements per parallel task of the elementwise kernels: large enough that rayon's
/// splitting costs nothing next to the work, small enough to share out.
const CHUNK: usize = 16 * 1024;

/// out[i] = f(a[i], b[i]) in parallel chunks.
fn map2<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    });
    out
}

/// Rank-3 view [N, S, D] whose last dimension is contiguous: element (n, s, d) lives at
/// `offset + n·sn + s·ss + d`.
#[derive(Clone, Copy)]
struct View3 {
    offset: usize,
    sn: usize,
    ss: usize,
}

fn view3(layout: &Layout, what: &str) -> CResult<(View3, [usize; 3])> {
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.len() != 3 || (stride[2] != 1 && dims[2] > 1) {
        candle_core::bail!("{what}: expected a rank-3 tensor with a contiguous last dim, got {dims:?} {stride:?}");
    }
    Ok((View3 { offset: layout.start_offset(), sn: stride[0], ss: stride[1] }, [dims[0], dims[1], dims[2]]))
}

fn contiguous<'a, T>(s: &'a [T], layout: &Layout, what: &str) -> CResult<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on a CPU tensor's storage, borrowed under its read lock (no copy).
fn with_cpu_storage<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> CResult<R>) -> CResult<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c, l),
        _ => candle_core::bail!("this fused op runs on the CPU only so far"),
    }
}

// ---------------------------------------------------------------------------------------------
// Causal multi-head attention.

/// Causal self-attention of one fused projection: qkv [N, S, 3D] (q, k, v as column blocks,
/// `heads` heads as contiguous column blocks of each) → [N, S, D]. Differentiable: its backward
/// writes d(qkv) in one piece, so the three column views cost nothing in the backward pass.
/// Never holds more than one query's row of scores.
///
/// With `window` = Some(W), each query sees only the last W positions (itself included):
/// sliding-window attention. On CUDA the tensor-core kernels take the window (bf16, S above
/// the small kernels' sizes); elsewhere on CUDA it runs the plain composition, which holds
/// the [S, S] scores.
pub fn causal_self_attention(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    if fused_self_attention(qkv, heads, window)? {
        return qkv.apply_op1(SelfAttention { heads, window, lse: Default::default() });
    }
    if !qkv.device().is_cpu() {
        let d = qkv.dim(2)? / 3;
        let (q, k, v) = (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
        return reference::causal_attention(&q, &k.contiguous()?, &v.contiguous()?, heads, window);
    }
    let qkv = if qkv.stride()[2] == 1 { qkv.clone() } else { qkv.contiguous()? };
    qkv.apply_op1(SelfAttention { heads, window, lse: Default::default() })
}

/// softmax(q kᵀ / √hd + causal mask) v for q [N, Sq, D] and k, v [N, Sk, D] (Sk ≥ Sq): query i
/// sits at position Sk − Sq + i, after the Sk − Sq positions of a KV cache, and sees keys up
/// to it (or, with `window`, the last W positions up to it). For cached decoding: no backward
/// pass.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    // The kernels read any rank-3 view whose last dimension is contiguous.
    let rows = |t: &Tensor| if t.stride()[2] == 1 { Ok(t.clone()) } else { t.contiguous() };
    if window.is_none() && fused_cuda(q) && cuda_head_dim(q.dim(2)? / heads) {
        return rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &Attention { heads, window });
    }
    if !q.device().is_cpu() {
        return reference::causal_attention(q, &k.contiguous()?, &v.contiguous()?, heads, window);
    }
    rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &Attention { heads, window })
}

struct Attention {
    heads: usize,
    window: Option<usize>,
}

/// True when self-attention on `qkv` runs the fused CUDA kernels (with a window, only those
/// that take one).
fn fused_self_attention(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<bool> {
    #[cfg(feature = "cuda")]
    {
        let (_, s, d3) = qkv.dims3()?;
        let hd = d3 / 3 / heads;
        let shape_ok = window.is_none() || cuda::window_supported(qkv.dtype(), s, hd);
        Ok(shape_ok && fused_cuda(qkv) && cuda_head_dim(hd) && qkv.stride()[2] == 1)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, heads, window);
        Ok(false)
    }
}

struct SelfAttention {
    heads: usize,
    window: Option<usize>,
    /// The CUDA forward's per-row log Σ exp [N, H, S] (f32), kept for its backward.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
}

/// The q, k and v views of a qkv [N, S, 3D] layout, and the shapes.
fn qkv_views(l: &Layout, heads: usize, window: Option<usize>) -> CResult<(AttnDims, View3, View3, View3)> {
    let (v, [n, s, d3]) = view3(l, "attention qkv")?;
    if d3 % 3 != 0 || (d3 / 3) % heads != 0 {
        candle_core::bail!("attention: qkv width {d3} is not 3 × a multiple of {heads} heads");
    }
    let d = d3 / 3;
    let at = |col: usize| View3 { offset: v.offset + col, ..v };
    Ok((AttnDims { n, sq: s, sk: s, d, heads, window: window.unwrap_or(usize::MAX) }, at(0), at(d), at(2 * d)))
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    n: usize,
    sq: usize,
    sk: usize,
    d: usize,
    heads: usize,
    /// Keys a query sees, itself included (usize::MAX: all before it).
    window: usize,
}

impl AttnDims {
    fn hd(&self) -> usize {
        self.d / self.heads
    }
    fn scale(&self) -> f64 {
        1.0 / (self.hd() as f64).sqrt()
    }
}

fn attn_dims(lq: &Layout, lk: &Layout, lv: &Layout, heads: usize, window: Option<usize>) -> CResult<(AttnDims, View3, View3, View3)> {
    let (vq, [n, sq, d]) = view3(lq, "attention q")?;
    let (vk, [nk, sk, dk]) = view3(lk, "attention k")?;
    let (vv, dv) = view3(lv, "attention v")?;
    if nk != n || dk != d || dv != [nk, sk, dk] || sk < sq || d % heads != 0 {
        candle_core::bail!("attention: incompatible shapes q {:?} k {:?} v {:?}", lq.dims(), lk.dims(), lv.dims());
    }
    Ok((AttnDims { n, sq, sk, d, heads, window: window.unwrap_or(usize::MAX) }, vq, vk, vv))
}

/// Probabilities of query `i` of head `h` in sequence `n` over the keys it sees, lo..hi
/// (returned; hi − 1 is its own position), into p[lo..hi].
#[allow(clippy::too_many_arguments)]
fn attn_probs<T: Elem>(q: &[T], k: &[T], vq: View3, vk: View3, dims: AttnDims, n: usize, h: usize, i: usize, p: &mut [T]) -> (usize, usize) {
    let hd = dims.hd();
    let scale = T::from(dims.scale()).expect("scale fits");
    let hi = dims.sk - dims.sq + i + 1;
    let lo = hi.saturating_sub(dims.window);
    let qi = &q[vq.offset + n * vq.sn + i * vq.ss + h * hd..][..hd];
    let mut max = T::neg_infinity();
    for (j, pj) in p.iter_mut().enumerate().take(hi).skip(lo) {
        let kj = &k[vk.offset + n * vk.sn + j * vk.ss + h * hd..][..hd];
        let s = qi.iter().zip(kj).fold(T::zero(), |acc, (&a, &b)| acc + a * b) * scale;
        *pj = s;
        max = Float::max(max, s);
    }
    let mut sum = T::zero();
    for pj in &mut p[lo..hi] {
        *pj = (*pj - max).exp();
        sum = sum + *pj;
    }
    let inv = sum.recip();
    for pj in &mut p[lo..hi] {
        *pj = *pj * inv;
    }
    (lo, hi)
}

fn attn_fwd<T: Elem>(q: &[T], k: &[T], v: &[T], vq: View3, vk: View3, vv: View3, dims: AttnDims) -> Vec<T> {
    let (sq, d, hd) = (dims.sq, dims.d, dims.hd());
    let mut y = vec![T::zero(); dims.n * sq * d];
    y.par_chunks_mut(sq * d).enumerate().for_each(|(n, yn)| {
        let mut p = vec![T::zero(); dims.sk];
        for h in 0..dims.heads {
            for i in 0..sq {
                let (lo, hi) = attn_probs(q, k, vq, vk, dims, n, h, i, &mut p);
                let yi = &mut yn[i * d + h * hd..][..hd];
                for (j, &pj) in p.iter().enumerate().take(hi).skip(lo) {
                    let vj = &v[vv.offset + n * vv.sn + j * vv.ss + h * hd..][..hd];
                    for (o, &x) in yi.iter_mut().zip(vj) {
                        *o = *o + pj * x;
                    }
                }
            }
        }
    });
    y
}

/// d(qkv) [N, S, 3D] (contiguous) of self-attention from dy [N, S, D] contiguous.
/// Recomputes the probabilities: nothing but qkv is kept from the forward pass.
fn attn_bwd<T: Elem>(qkv: &[T], dy: &[T], vq: View3, vk: View3, vv: View3, dims: AttnDims) -> Vec<T> {
    let (n_all, s, d, hd) = (dims.n, dims.sq, dims.d, dims.hd());
    let scale = T::from(dims.scale()).expect("scale fits");
    let (q, k, v) = (qkv, qkv, qkv);
    let mut out = vec![T::zero(); n_all * s * 3 * d];
    out.par_chunks_mut(s * 3 * d).enumerate().for_each(|(n, dn)| {
        let mut p = vec![T::zero(); s];
        let mut dp = vec![T::zero(); s];
        for h in 0..dims.heads {
            for i in 0..s {
                let (lo, hi) = attn_probs(q, k, vq, vk, dims, n, h, i, &mut p);
                let dyi = &dy[(n * s + i) * d + h * hd..][..hd];
                // dP_ij = dy_i · v_j, and Σ_j P_ij dP_ij = dy_i · y_i.
                let mut row = T::zero();
                for j in lo..hi {
                    let vj = &v[vv.offset + n * vv.sn + j * vv.ss + h * hd..][..hd];
                    dp[j] = dyi.iter().zip(vj).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                    row = row + p[j] * dp[j];
                }
                let qi = &q[vq.offset + n * vq.sn + i * vq.ss + h * hd..][..hd];
                for j in lo..hi {
                    let ds = p[j] * (dp[j] - row) * scale; // dScore_ij
                    let kj = &k[vk.offset + n * vk.sn + j * vk.ss + h * hd..][..hd];
                    // Row r of dn holds [dq_r | dk_r | dv_r].
                    for (o, &x) in dn[i * 3 * d + h * hd..][..hd].iter_mut().zip(kj) {
                        *o = *o + ds * x;
                    }
                    for (o, &x) in dn[j * 3 * d + d + h * hd..][..hd].iter_mut().zip(qi) {
                        *o = *o + ds * x;
                    }
                    for (o, &x) in dn[j * 3 * d + 2 * d + h * hd..][..hd].iter_mut().zip(dyi) {
                        *o = *o + p[j] * x;
                    }
                }
            }
        }
    });
    out
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "megabyte-causal-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dims, vq, vk, vv) = attn_dims(l1, l2, l3, self.heads, self.window)?;
        let shape = Shape::from((dims.n, dims.sq, dims.d));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => CpuStorage::F32(attn_fwd(q, k, v, vq, vk, vv, dims)),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => CpuStorage::F64(attn_fwd(q, k, v, vq, vk, vv, dims)),
            _ => candle_core::bail!("attention: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::attention_fwd3((s1, l1), (s2, l2), (s3, l3), self.heads)
    }
}

impl candle_core::CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "megabyte-causal-self-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dims, vq, vk, vv) = qkv_views(l, self.heads, self.window)?;
        let out = match st {
            CpuStorage::F32(x) => CpuStorage::F32(attn_fwd(x, x, x, vq, vk, vv, dims)),
            CpuStorage::F64(x) => CpuStorage::F64(attn_fwd(x, x, x, vq, vk, vv, dims)),
            _ => candle_core::bail!("attention: unsupported dtype {:?} on the CPU", st.dtype()),
        };
        Ok((out, Shape::from((dims.n, dims.sq, dims.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        let (y, shape, lse) = cuda::self_attention_fwd(s, l, self.heads, self.window)?;
        *self.lse.lock().expect("lse lock") = Some(lse);
        Ok((y, shape))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if qkv.device().is_cuda() {
            let lse = self.lse.lock().expect("lse lock").clone();
            let lse = lse.ok_or_else(|| candle_core::Error::Msg("attention backward: no forward statistics".into()))?;
            return Ok(Some(cuda::self_attention_bwd(qkv, res, grad, &lse, self.heads, self.window)?));
        }
        let _ = res;
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &SelfAttentionBackward { heads: self.heads, window: self.window })?))
    }
}

struct SelfAttentionBackward {
    heads: usize,
    window: Option<usize>,
}

impl CustomOp2 for SelfAttentionBackward {
    fn name(&self) -> &'static str {
        "megabyte-causal-self-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dims, vq, vk, vv) = qkv_views(l1, self.heads, self.window)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => CpuStorage::F32(attn_bwd(x, contiguous(dy, l2, "dy")?, vq, vk, vv, dims)),
            (CpuStorage::F64(x), CpuStorage::F64(dy)) => CpuStorage::F64(attn_bwd(x, contiguous(dy, l2, "dy")?, vq, vk, vv, dims)),
            _ => candle_core::bail!("attention backward: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((out, Shape::from((dims.n, dims.sq, 3 * dims.d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear map without bias.

/// y = x Wᵀ for x [.., in] and W [out, in] → [.., out], as one graph node. The plain form
/// (reshape, transpose, matmul, reshape) is four nodes, and candle's backward pass allocates
/// and adds a zero tensor per node; this op's backward writes dx and dW directly.
pub fn linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let mut out = dims.to_vec();
    out[dims.len() - 1] = w.dim(0)?;
    if !x.device().is_cpu() {
        // cuBLAS, in the activations' dtype (bf16 weights cast from the f32 masters).
        let m = x.elem_count() / d_in;
        return x.reshape((m, d_in))?.matmul(&w.to_dtype(x.dtype())?.t()?)?.reshape(out);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)?.reshape(out)
}

struct Linear;

/// C = A·B for row-major views given by their (row, column) strides; dst is [m, n] contiguous.
#[allow(clippy::too_many_arguments)]
fn matmul_into<T: Elem>(dst: &mut [T], m: usize, n: usize, k: usize, a: &[T], a_rs: usize, a_cs: usize, b: &[T], b_rs: usize, b_cs: usize) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    assert!(dst.len() >= m * n);
    // SAFETY: the strides describe views inside `a` and `b` (checked by the callers' shapes)
    // and `dst` holds m·n elements.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, n as isize, false,
            a.as_ptr(), a_cs as isize, a_rs as isize,
            b.as_ptr(), b_cs as isize, b_rs as isize,
            T::zero(), T::one(), false, false, false, parallelism,
        )
    }
}

/// x [M, in] · W [out, in]ᵀ → [M, out].
fn linear_fwd<T: Elem>(x: &[T], w: &[T], d_in: usize, d_out: usize) -> Vec<T> {
    let m = x.len() / d_in;
    let mut y = vec![T::zero(); m * d_out];
    matmul_into(&mut y, m, d_out, d_in, x, d_in, 1, w, 1, d_in);
    y
}

/// [dx (M·in) | dW (out·in)] from dy [M, out].
fn linear_bwd<T: Elem>(x: &[T], w: &[T], dy: &[T], d_in: usize, d_out: usize) -> Vec<T> {
    let m = x.len() / d_in;
    let mut out = vec![T::zero(); m * d_in + d_out * d_in];
    let (dx, dw) = out.split_at_mut(m * d_in);
    matmul_into(dx, m, d_in, d_out, dy, d_out, 1, w, d_in, 1); // dy · W
    matmul_into(dw, d_out, d_in, m, dy, 1, d_out, x, d_in, 1); // dyᵀ · x
    out
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "megabyte-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (d_out, d_in) = l2.shape().dims2()?;
        let x_dims = l1.dims();
        if x_dims[x_dims.len() - 1] != d_in {
            candle_core::bail!("linear: input {x_dims:?} does not end in {d_in}");
        }
        let m = l1.shape().elem_count() / d_in;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(linear_fwd(contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, d_in, d_out)),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(linear_fwd(contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, d_in, d_out)),
            _ => candle_core::bail!("linear: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((out, Shape::from((m, d_out))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBackward)?;
        let n = x.elem_count();
        Ok((Some(all.narrow(0, 0, n)?.reshape(x.shape())?), Some(all.narrow(0, n, w.elem_count())?.reshape(w.shape())?)))
    }
}

struct LinearBackward;

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "megabyte-linear-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (d_out, d_in) = l2.shape().dims2()?;
        let len = l1.shape().elem_count() + d_out * d_in;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => CpuStorage::F32(linear_bwd(
                contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, contiguous(dy, l3, "dy")?, d_in, d_out,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => CpuStorage::F64(linear_bwd(
                contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, contiguous(dy, l3, "dy")?, d_in, d_out,
            )),
            _ => candle_core::bail!("linear backward: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((out, Shape::from(len)))
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup.

/// Rows of `table` [V, D] at u32 `ids` (any shape [..]) → [.., D]. On CUDA a fused op whose
/// backward sums into the table's gradient in shared memory (candle's index_add runs one
/// thread per column over all ids, ~100 ms per step for the `enwik8` shape); elsewhere
/// candle's index_select.
pub fn embedding(table: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    let ids = ids.flatten_all()?;
    if fused_cuda(table) && table.dtype() == candle_core::DType::F32 {
        return table.contiguous()?.apply_op2(&ids.contiguous()?, Embedding)?.reshape(shape);
    }
    table.index_select(&ids, 0)?.reshape(shape)
}

struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "megabyte-embedding"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("embedding: the CPU uses index_select")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::embed_fwd((s1, l1), (s2, l2))
    }

    fn bwd(&self, table: &Tensor, ids: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if table.device().is_cuda() {
            return Ok((Some(cuda::embed_bwd(grad, ids, table.dim(0)?)?), None));
        }
        let _ = (table, ids, grad);
        candle_core::bail!("embedding backward: CUDA only")
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (exact, erf form).

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)), elementwise.
pub fn gelu(x: &Tensor) -> CResult<Tensor> {
    if fused_cuda(x) && x.elem_count() % 2 == 0 {
        return x.contiguous()?.apply_op1(Gelu);
    }
    if !x.device().is_cpu() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

fn gelu_fwd<T: Elem>(x: &[T]) -> Vec<T> {
    map2(x, x, |x, _| x * x.normal_cdf_pdf().0)
}

/// dGELU/dx = Φ(x) + x·φ(x).
fn gelu_bwd<T: Elem>(x: &[T], dy: &[T]) -> Vec<T> {
    map2(x, dy, |x, g| {
        let (cdf, pdf) = x.normal_cdf_pdf();
        g * (cdf + x * pdf)
    })
}

impl candle_core::CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "megabyte-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(gelu_fwd(contiguous(x, l, "gelu")?)),
            CpuStorage::F64(x) => CpuStorage::F64(gelu_fwd(contiguous(x, l, "gelu")?)),
            _ => candle_core::bail!("gelu: unsupported dtype {:?} on the CPU", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::gelu_fwd((s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "megabyte-gelu-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(gelu_bwd(contiguous(x, l1, "x")?, contiguous(g, l2, "dy")?)),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(gelu_bwd(contiguous(x, l1, "x")?, contiguous(g, l2, "dy")?)),
            _ => candle_core::bail!("gelu backward: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::gelu_bwd((s1, l1), (s2, l2))
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout (training only): the mask is a hash of (key, element index), never stored.

/// SplitMix64's finaliser: a bijective mix of 64 bits.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Elements whose 24-bit hash is below this are dropped: p·2²⁴, rounded.
fn drop_threshold(p: f64) -> u32 {
    (p * (1u64 << 24) as f64).round() as u32
}

/// Whether dropout under `key` with probability `p` keeps element `index`: the top 24 bits of
/// mix64(key ^ mix64(index)) against p·2²⁴. The CUDA kernel computes the same bits.
pub fn dropout_keeps(key: u64, index: u64, p: f64) -> bool {
    keeps(key, index, drop_threshold(p))
}

fn keeps(key: u64, index: u64, threshold: u32) -> bool {
    ((mix64(key ^ mix64(index)) >> 40) as u32) >= threshold
}

/// The whole batch's index of the first element of a tensor of `shape` whose first row is
/// row `row_offset` of the batch.
fn first_index(shape: &Shape, row_offset: usize) -> u64 {
    let n = shape.dims().first().copied().unwrap_or(1).max(1);
    (row_offset * (shape.elem_count() / n)) as u64
}

/// Inverted dropout of x [N, ...]: each element zeroed with probability p, the rest scaled by
/// 1/(1 − p). Element i of row r is element (row_offset + r)·(its row length) + i of the whole
/// batch, and its mask is [`dropout_keeps`] of that index, so a batch split into shards or
/// ranks (each with the offset of its first row) draws the mask of the whole batch. It is its
/// own backward pass: dx = dropout(dy) with the same key.
pub fn dropout(x: &Tensor, p: f64, key: u64, row_offset: usize) -> CResult<Tensor> {
    if p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}");
    }
    let op = Dropout { p, key, row_offset };
    if x.device().is_cpu() || fused_cuda(x) {
        return x.contiguous()?.apply_op1(op);
    }
    x.broadcast_mul(&reference::dropout_mask(x.shape(), p, key, row_offset, x.device())?.to_dtype(x.dtype())?)
}

#[derive(Clone, Copy)]
struct Dropout {
    p: f64,
    key: u64,
    row_offset: usize,
}

impl Dropout {
    fn apply<T: Elem>(&self, x: &[T], base: u64) -> Vec<T> {
        let scale = T::from(1.0 / (1.0 - self.p)).expect("a finite scale");
        let threshold = drop_threshold(self.p);
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (o, x))| {
            let start = base + (c * CHUNK) as u64;
            for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                if keeps(self.key, start + i as u64, threshold) {
                    *o = x * scale;
                }
            }
        });
        out
    }
}

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "megabyte-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let base = first_index(l.shape(), self.row_offset);
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.apply(contiguous(x, l, "dropout")?, base)),
            CpuStorage::F64(x) => CpuStorage::F64(self.apply(contiguous(x, l, "dropout")?, base)),
            _ => candle_core::bail!("dropout: unsupported dtype {:?} on the CPU", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::dropout((s, l), first_index(l.shape(), self.row_offset), self.key, drop_threshold(self.p), (1.0 / (1.0 - self.p)) as f32)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(*self)?))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm over the last dimension.

/// LayerNorm (`bias` given: centre, scale, shift) or RMSNorm (`bias` None) of x [.., D].
pub fn norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> CResult<Tensor> {
    if fused_cuda(x) && x.dim(candle_core::D::Minus1)? % 2 == 0 {
        // Weights stay f32 whatever the activations' dtype; statistics are f32 in the kernel.
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let x = x.contiguous()?;
        return match bias {
            Some(b) => x.apply_op3(&f32(weight)?, &f32(b)?, Norm { eps }),
            None => x.apply_op2(&f32(weight)?, RmsNorm { eps }),
        };
    }
    if !x.device().is_cpu() {
        let cast = |t: &Tensor| t.to_dtype(x.dtype());
        return reference::norm(x, &cast(weight)?, bias.map(cast).transpose()?.as_ref(), eps);
    }
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(weight, b, Norm { eps }),
        None => x.apply_op2(weight, RmsNorm { eps }),
    }
}

struct Norm {
    eps: f64,
}

struct RmsNorm {
    eps: f64,
}

/// Mean (0 for RMS) and 1/σ of one row.
fn row_stats<T: Elem>(x: &[T], center: bool, eps: f64) -> (T, T) {
    let d = T::from(x.len()).expect("len fits");
    let mean = if center { x.iter().fold(T::zero(), |a, &b| a + b) / d } else { T::zero() };
    let var = x.iter().fold(T::zero(), |a, &b| a + (b - mean) * (b - mean)) / d;
    (mean, (var + T::from(eps).expect("eps fits")).sqrt().recip())
}

fn norm_fwd<T: Elem>(x: &[T], w: &[T], b: Option<&[T]>, eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::zero(); x.len()];
    let rows = (CHUNK / d).max(1) * d;
    y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
            let (mean, rstd) = row_stats(xr, b.is_some(), eps);
            for i in 0..d {
                let shift = b.map_or(T::zero(), |b| b[i]);
                yr[i] = (xr[i] - mean) * rstd * w[i] + shift;
            }
        }
    });
    y
}

/// [dx | dw | db] (db only with a bias).
fn norm_bwd<T: Elem>(x: &[T], w: &[T], dy: &[T], center: bool, eps: f64) -> Vec<T> {
    let d = w.len();
    let rows = x.len() / d;
    let mut dx = vec![T::zero(); x.len()];
    let chunk = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(chunk * d)
        .enumerate()
        .map(|(c, dxc)| {
            let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
            let inv_d = T::from(d).expect("d fits").recip();
            for (r, dxr) in dxc.chunks_mut(d).enumerate() {
                let row = c * chunk + r;
                let (xr, dyr) = (&x[row * d..][..d], &dy[row * d..][..d]);
                let (mean, rstd) = row_stats(xr, center, eps);
                // dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·w (mean(g) dropped for RMS).
                let (mut mg, mut mgx) = (T::zero(), T::zero());
                for i in 0..d {
                    let xh = (xr[i] - mean) * rstd;
                    let g = dyr[i] * w[i];
                    mg = mg + g;
                    mgx = mgx + g * xh;
                    dw[i] = dw[i] + dyr[i] * xh;
                    db[i] = db[i] + dyr[i];
                }
                let mg = if center { mg * inv_d } else { T::zero() };
                let mgx = mgx * inv_d;
                for i in 0..d {
                    let xh = (xr[i] - mean) * rstd;
                    dxr[i] = rstd * (dyr[i] * w[i] - mg - xh * mgx);
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
    for (pw, pb) in partials {
        for i in 0..d {
            dw[i] = dw[i] + pw[i];
            db[i] = db[i] + pb[i];
        }
    }
    dx.extend(dw);
    if center {
        dx.extend(db);
    }
    dx
}

fn norm_cpu_fwd(x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), b: Option<(&CpuStorage, &Layout)>, eps: f64) -> CResult<(CpuStorage, Shape)> {
    let shape = x.1.shape().clone();
    let out = match (x.0, w.0, b.map(|b| b.0)) {
        (CpuStorage::F32(xs), CpuStorage::F32(ws), bias) => {
            let bias = match bias {
                Some(CpuStorage::F32(bs)) => Some(contiguous(bs, b.expect("some").1, "norm bias")?),
                Some(_) => candle_core::bail!("norm: dtype mismatch"),
                None => None,
            };
            CpuStorage::F32(norm_fwd(contiguous(xs, x.1, "norm x")?, contiguous(ws, w.1, "norm weight")?, bias, eps))
        }
        (CpuStorage::F64(xs), CpuStorage::F64(ws), bias) => {
            let bias = match bias {
                Some(CpuStorage::F64(bs)) => Some(contiguous(bs, b.expect("some").1, "norm bias")?),
                Some(_) => candle_core::bail!("norm: dtype mismatch"),
                None => None,
            };
            CpuStorage::F64(norm_fwd(contiguous(xs, x.1, "norm x")?, contiguous(ws, w.1, "norm weight")?, bias, eps))
        }
        _ => candle_core::bail!("norm: unsupported dtype {:?} on the CPU", x.0.dtype()),
    };
    Ok((out, shape))
}

/// Runs the norm backward kernel and splits its output into (dx, dw, db).
fn norm_grads(x: &Tensor, w: &Tensor, grad: &Tensor, center: bool, eps: f64) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::norm_bwd(&x.contiguous()?, w, &grad.contiguous()?, None, center, eps);
    }
    let x = x.contiguous()?;
    let all = x.apply_op2_no_bwd(w, &NormBackward { center, eps, dy: grad.contiguous()? })?;
    let (n, d) = (x.elem_count(), w.elem_count());
    let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = all.narrow(0, n, d)?;
    let db = if center { Some(all.narrow(0, n + d, d)?) } else { None };
    Ok((dx, dw, db))
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "megabyte-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        norm_cpu_fwd((s1, l1), (s2, l2), Some((s3, l3)), self.eps)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::norm_fwd((s1, l1), (s2, l2), Some((s3, l3)), self.eps)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = norm_grads(x, w, grad, true, self.eps)?;
        Ok((Some(dx), Some(dw), db))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "megabyte-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        norm_cpu_fwd((s1, l1), (s2, l2), None, self.eps)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::norm_fwd((s1, l1), (s2, l2), None, self.eps)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = norm_grads(x, w, grad, false, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct NormBackward {
    center: bool,
    eps: f64,
    dy: Tensor,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "megabyte-norm-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        with_cpu_storage(&self.dy, |sdy, ldy| {
            let d = l2.shape().elem_count();
            let n = l1.shape().elem_count();
            let out = match (s1, s2, sdy) {
                (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => CpuStorage::F32(norm_bwd(
                    contiguous(x, l1, "x")?,
                    contiguous(w, l2, "w")?,
                    contiguous(dy, ldy, "dy")?,
                    self.center,
                    self.eps,
                )),
                (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => CpuStorage::F64(norm_bwd(
                    contiguous(x, l1, "x")?,
                    contiguous(w, l2, "w")?,
                    contiguous(dy, ldy, "dy")?,
                    self.center,
                    self.eps,
                )),
                _ => candle_core::bail!("norm backward: unsupported dtype {:?} on the CPU", s1.dtype()),
            };
            Ok((out, Shape::from(n + d * if self.center { 2 } else { 1 })))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy over the 256 byte logits.

/// Per-row cross-entropy in nats: logits [N, V], targets [N] u32 → [N] (logits' dtype, f32
/// for bf16 logits).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    if fused_cuda(logits) {
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    let logits = &logits.to_dtype(crate::nn::accumulation_dtype(logits.dtype()))?;
    if !logits.device().is_cpu() {
        return reference::cross_entropy(logits, targets);
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)
}

struct CrossEntropy;

/// log Σ exp of a row, stably.
fn log_sum_exp<T: Elem>(row: &[T]) -> T {
    let max = row.iter().fold(T::neg_infinity(), |a, &b| Float::max(a, b));
    max + row.iter().fold(T::zero(), |a, &b| a + (b - max).exp()).ln()
}

/// Rows per parallel task of the cross-entropy kernels.
const CE_ROWS: usize = 64;

fn ce_fwd<T: Elem>(logits: &[T], targets: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); targets.len()];
    out.par_chunks_mut(CE_ROWS).zip(logits.par_chunks(CE_ROWS * v)).zip(targets.par_chunks(CE_ROWS)).for_each(
        |((o, rows), t)| {
            for ((o, row), &t) in o.iter_mut().zip(rows.chunks(v)).zip(t) {
                *o = log_sum_exp(row) - row[t as usize];
            }
        },
    );
    out
}

/// d logits = (softmax − onehot)·dloss, with log Σ exp = loss + logit of the target taken
/// from the forward pass's losses (one exp per logit instead of two).
fn ce_bwd<T: Elem>(logits: &[T], targets: &[u32], losses: &[T], dloss: &[T], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); logits.len()];
    out.par_chunks_mut(CE_ROWS * v).zip(logits.par_chunks(CE_ROWS * v)).enumerate().for_each(|(c, (o, rows))| {
        for (i, (o, row)) in o.chunks_mut(v).zip(rows.chunks(v)).enumerate() {
            let r = c * CE_ROWS + i;
            let t = targets[r] as usize;
            let lse = losses[r] + row[t];
            for (oi, &l) in o.iter_mut().zip(row) {
                *oi = (l - lse).exp() * dloss[r];
            }
            o[t] = o[t] - dloss[r];
        }
    });
    out
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "megabyte-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let CpuStorage::U32(t) = s2 else { candle_core::bail!("cross-entropy: targets must be u32") };
        let t = contiguous(t, l2, "targets")?;
        if t.len() != n || t.iter().any(|&x| x as usize >= v) {
            candle_core::bail!("cross-entropy: need {n} targets below {v}");
        }
        let out = match s1 {
            CpuStorage::F32(l) => CpuStorage::F32(ce_fwd(contiguous(l, l1, "logits")?, t, v)),
            CpuStorage::F64(l) => CpuStorage::F64(ce_fwd(contiguous(l, l1, "logits")?, t, v)),
            _ => candle_core::bail!("cross-entropy: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::ce_fwd((s1, l1), (s2, l2))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, losses: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(targets, losses, &CrossEntropyBackward { dloss: grad.contiguous()? })?;
        Ok((Some(g), None))
    }
}

struct CrossEntropyBackward {
    dloss: Tensor,
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "megabyte-cross-entropy-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let CpuStorage::U32(t) = s2 else { candle_core::bail!("cross-entropy: targets must be u32") };
        let t = contiguous(t, l2, "targets")?;
        with_cpu_storage(&self.dloss, |sd, ld| {
            let out = match (s1, s3, sd) {
                (CpuStorage::F32(l), CpuStorage::F32(loss), CpuStorage::F32(d)) => CpuStorage::F32(ce_bwd(
                    contiguous(l, l1, "logits")?, t, contiguous(loss, l3, "losses")?, contiguous(d, ld, "dloss")?, v,
                )),
                (CpuStorage::F64(l), CpuStorage::F64(loss), CpuStorage::F64(d)) => CpuStorage::F64(ce_bwd(
                    contiguous(l, l1, "logits")?, t, contiguous(loss, l3, "losses")?, contiguous(d, ld, "dloss")?, v,
                )),
                _ => candle_core::bail!("cross-entropy backward: unsupported dtype {:?} on the CPU", s1.dtype()),
            };
            Ok((out, l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::ce_bwd((s1, l1), (s2, l2), (s3, l3), &self.dloss)
    }
}

/// The same operations composed from plain candle ops: slower, but differentiable by candle
/// itself. The fused ops are tested against these.
pub mod reference {
    use candle_core::{DType, Device, Shape, Tensor, D};

    /// [`super::dropout`]'s mask as a tensor (f32): 1/(1 − p) where an element is kept, else 0.
    pub fn dropout_mask(shape: &Shape, p: f64, key: u64, row_offset: usize, device: &Device) -> candle_core::Result<Tensor> {
        let base = super::first_index(shape, row_offset);
        let scale = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> =
            (0..shape.elem_count() as u64).map(|i| if super::dropout_keeps(key, base + i, p) { scale } else { 0.0 }).collect();
        Tensor::from_vec(mask, shape, &Device::Cpu)?.to_device(device)
    }

    /// Softmax over the last dimension with a detached max.
    pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// Causal attention as in [`super::causal_attention`].
    pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, window: Option<usize>) -> candle_core::Result<Tensor> {
        let (n, sq, d) = q.dims3()?;
        let sk = k.dim(1)?;
        let hd = d / heads;
        let split = |t: &Tensor, s: usize| t.reshape((n, s, heads, hd))?.transpose(1, 2)?.contiguous(); // [N, H, S, hd]
        let (q, k, v) = (split(q, sq)?, split(k, sk)?, split(v, sk)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // [N, H, Sq, Sk]
        let offset = sk - sq;
        let mask: Vec<f32> = (0..sq)
            .flat_map(|i| {
                let lo = (offset + i + 1).saturating_sub(window.unwrap_or(usize::MAX));
                (0..sk).map(move |j| if (lo..=offset + i).contains(&j) { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (sq, sk), &Device::Cpu)?.to_dtype(q.dtype())?.to_device(q.device())?;
        let y = softmax_last(&scores.broadcast_add(&mask)?)?.matmul(&v)?; // [N, H, Sq, hd]
        y.transpose(1, 2)?.reshape((n, sq, d))
    }

    /// LayerNorm (with bias) or RMSNorm (without) over the last dimension.
    pub fn norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> candle_core::Result<Tensor> {
        let x = match b {
            Some(_) => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            None => x.clone(),
        };
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The AdamW update of [`super::adamw_step`], one tensor op at a time.
    pub fn adamw_step(w: &Tensor, g: &Tensor, mv: &Tensor, hp: super::AdamWStep) -> candle_core::Result<Tensor> {
        // Detached: `w` is a Var, and a tracked result would chain every step's moments to the
        // previous step's through the graph (found as a GPU out-of-memory after 15 steps).
        let (w, g, mv) = (w.detach(), g.detach(), mv.detach());
        let n = w.elem_count();
        let g = (g.flatten_all()?.to_dtype(DType::F32)? * hp.grad_scale)?;
        let (m, v) = (mv.narrow(0, 0, n)?, mv.narrow(0, n, n)?);
        let m = ((m * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?;
        let v = ((v * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?;
        let update = ((&m / hp.bc1)? / ((&v / hp.bc2)?.sqrt()? + hp.eps)?)?;
        let w = ((w.flatten_all()?.to_dtype(DType::F32)? * (1.0 - hp.lr * hp.weight_decay))? - (update * hp.lr)?)?;
        Tensor::cat(&[w, m, v], 0)
    }

    /// Per-row cross-entropy of logits [N, V] against u32 targets [N].
    pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let logp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW step.

/// One AdamW update of a parameter, fused: from weights w, gradient g and moments
/// `mv` = [m | v] (f32, 2·numel) returns [w' | m' | v'] (f32, 3·numel).
/// `grad_scale` multiplies g first (gradient clipping); decay applies when `decay` is set.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 − β1ᵗ and 1 − β2ᵗ (bias corrections).
    pub bc1: f64,
    pub bc2: f64,
    pub grad_scale: f64,
}

/// Applies one AdamW update to the parameter `p` and its moments `mv` (see [`adamw_step`]).
/// On CUDA the kernel updates both in place; elsewhere they are replaced.
pub fn adamw_update(p: &candle_core::Var, g: &Tensor, mv: &mut Tensor, hp: AdamWStep) -> CResult<()> {
    adamw_update_clipped(p, g, mv, hp, None)
}

/// [`adamw_update`] with gradient clipping by the global norm given on the device:
/// `clip` = (Σ g² [1] f32, max norm). On CUDA the kernel reads the sum itself (no host
/// round trip); elsewhere it is read here.
pub fn adamw_update_clipped(p: &candle_core::Var, g: &Tensor, mv: &mut Tensor, hp: AdamWStep, clip: Option<(&Tensor, f64)>) -> CResult<()> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && p.dtype() == candle_core::DType::F32 {
        return cuda::adamw_many(&[(p.as_tensor(), &g.to_dtype(candle_core::DType::F32)?, mv, hp.weight_decay)], &hp, clip);
    }
    let mut hp = hp;
    if let Some((sumsq, max_norm)) = clip {
        let norm = (sumsq.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0]).sqrt();
        if !norm.is_finite() {
            return Ok(());
        }
        hp.grad_scale = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
    }
    let out = adamw_step(p.as_tensor(), g, mv, hp)?; // [w' | m' | v']
    let n = p.elem_count();
    p.set(&out.narrow(0, 0, n)?.reshape(p.shape())?.to_dtype(p.dtype())?)?;
    *mv = out.narrow(0, n, 2 * n)?.detach(); // never part of a graph
    Ok(())
}

/// [`adamw_update_clipped`] for many parameters: (parameter, gradient, moments, weight decay)
/// each, `hp.weight_decay` unused. On CUDA one launch updates them all; elsewhere one update
/// each, in order.
pub fn adamw_update_many(items: &mut [(&candle_core::Var, &Tensor, &mut Tensor, f64)], hp: AdamWStep, clip: Option<(&Tensor, f64)>) -> CResult<()> {
    #[cfg(feature = "cuda")]
    if items.iter().all(|(p, ..)| p.device().is_cuda() && p.dtype() == candle_core::DType::F32) {
        let grads = items.iter().map(|(_, g, ..)| g.to_dtype(candle_core::DType::F32)).collect::<CResult<Vec<_>>>()?;
        let all: Vec<(&Tensor, &Tensor, &Tensor, f64)> = items.iter().zip(&grads).map(|((p, _, mv, wd), g)| (p.as_tensor(), g, &**mv, *wd)).collect();
        return cuda::adamw_many(&all, &hp, clip);
    }
    for (p, g, mv, weight_decay) in items.iter_mut() {
        adamw_update_clipped(p, g, mv, AdamWStep { weight_decay: *weight_decay, ..hp }, clip)?;
    }
    Ok(())
}

pub fn adamw_step(w: &Tensor, g: &Tensor, mv: &Tensor, hp: AdamWStep) -> CResult<Tensor> {
    if !w.device().is_cpu() {
        return reference::adamw_step(w, g, mv, hp);
    }
    w.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, &mv.contiguous()?, &hp)
}

fn adamw_cpu<W: Elem>(w: &[W], g: &[W], mv: &[f32], hp: &AdamWStep) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; 3 * n];
    let (wo, rest) = out.split_at_mut(n);
    let (mo, vo) = rest.split_at_mut(n);
    let (m, v) = mv.split_at(n);
    let f = |x: f64| x as f32;
    let (b1, b2, eps, lr, scale) = (f(hp.beta1), f(hp.beta2), f(hp.eps), f(hp.lr), f(hp.grad_scale));
    let (inv_bc1, inv_bc2, decay) = (f(1.0 / hp.bc1), f(1.0 / hp.bc2), f(1.0 - hp.lr * hp.weight_decay));
    wo.par_chunks_mut(CHUNK)
        .zip(mo.par_chunks_mut(CHUNK))
        .zip(vo.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((wo, mo), vo))| {
            for i in 0..wo.len() {
                let j = c * CHUNK + i;
                let gi = WithDType::to_f64(g[j]) as f32 * scale;
                let mi = b1 * m[j] + (1.0 - b1) * gi;
                let vi = b2 * v[j] + (1.0 - b2) * gi * gi;
                let update = (mi * inv_bc1) / ((vi * inv_bc2).sqrt() + eps);
                wo[i] = WithDType::to_f64(w[j]) as f32 * decay - lr * update;
                mo[i] = mi;
                vo[i] = vi;
            }
        });
    out
}

impl CustomOp3 for AdamWStep {
    fn name(&self) -> &'static str {
        "megabyte-adamw"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let CpuStorage::F32(mv) = s3 else { candle_core::bail!("adamw: moments must be f32") };
        let mv = contiguous(mv, l3, "moments")?;
        if l2.shape().elem_count() != n || mv.len() != 2 * n {
            candle_core::bail!("adamw: shapes of weight, gradient and moments disagree");
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(w), CpuStorage::F32(g)) => adamw_cpu(contiguous(w, l1, "w")?, contiguous(g, l2, "g")?, mv, self),
            (CpuStorage::F64(w), CpuStorage::F64(g)) => adamw_cpu(contiguous(w, l1, "w")?, contiguous(g, l2, "g")?, mv, self),
            _ => candle_core::bail!("adamw: unsupported dtype {:?} on the CPU", s1.dtype()),
        };
        Ok((CpuStorage::F32(out), Shape::from(3 * n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Explicit forward and backward passes (for the model's own backward pass, `grad.rs`): the same
// kernels without candle's autograd, which adds every gradient into a fresh zero tensor (one
// memset and one add per graph edge: 40% of a `enwik8` step on the H200 before this).
// Inputs are detached; nothing here builds a graph. Without a kernel for a device or dtype,
// each falls back to candle's autograd on the plain composition ([`vjp`]).

/// The vector-Jacobian product of `f` at `inputs` with output gradient `dy`: the gradients
/// of Σ f(inputs)·dy, by candle's autograd (the fallback of the explicit backward passes).
pub fn vjp(inputs: &[&Tensor], dy: &Tensor, f: impl Fn(&[Tensor]) -> CResult<Tensor>) -> CResult<Vec<Tensor>> {
    let vars: Vec<candle_core::Var> = inputs.iter().map(|t| candle_core::Var::from_tensor(&t.detach())).collect::<CResult<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs)?;
    let grads = (y * dy.to_dtype(dy.dtype())?)?.sum_all()?.backward()?;
    xs.iter()
        .map(|x| grads.get(x).cloned().map_or_else(|| x.zeros_like(), Ok))
        .collect()
}

/// The weight W in x's dtype, cast once for both passes of y = x Wᵀ: (W_act, y), no graph.
pub fn linear_forward(x: &Tensor, w: &Tensor) -> CResult<(Tensor, Tensor)> {
    let w_act = w.detach().to_dtype(x.dtype())?;
    let y = linear(&x.detach(), &w_act)?;
    Ok((w_act, y))
}

/// (dx, dW) of y = x W_actᵀ, with W_act the forward's weight in x's dtype
/// ([`linear_forward`]); dW in `dw_dtype` (the master weight's).
pub fn linear_backward(x: &Tensor, w_act: &Tensor, dy: &Tensor, dw_dtype: candle_core::DType) -> CResult<(Tensor, Tensor)> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let m = x.elem_count() / d_in;
    let d_out = w_act.dim(0)?;
    if x.device().is_cpu() {
        let all = x.contiguous()?.apply_op3_no_bwd(&w_act.contiguous()?, &dy.contiguous()?, &LinearBackward)?;
        let n = x.elem_count();
        let dw = all.narrow(0, n, w_act.elem_count())?.reshape(w_act.shape())?.to_dtype(dw_dtype)?;
        return Ok((all.narrow(0, 0, n)?.reshape(x.shape())?, dw));
    }
    let (x2, dy2) = (x.reshape((m, d_in))?, dy.reshape((m, d_out))?);
    let dx = dy2.matmul(w_act)?.reshape(x.shape())?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == candle_core::DType::BF16 && dw_dtype == candle_core::DType::F32 {
        return Ok((dx, cuda::weight_grad_f32(&x2, &dy2)?));
    }
    let dw = dy2.t()?.matmul(&x2)?.to_dtype(dw_dtype)?;
    Ok((dx, dw))
}

/// Norm forward without a graph (see [`norm`]).
pub fn norm_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<Tensor> {
    norm(&x.detach(), &w.detach(), b.map(|b| b.detach()).as_ref(), eps)
}

/// (x + a, norm(x + a)) without a graph: the residual add and the norm after it, in one
/// pass on CUDA.
pub fn add_norm_forward(x: &Tensor, a: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused_cuda(x) && x.dim(candle_core::D::Minus1)? % 2 == 0 {
        let f32 = |t: &Tensor| t.detach().to_dtype(candle_core::DType::F32);
        return cuda::add_norm_fwd(&x.detach(), &a.detach(), &f32(w)?, b.map(f32).transpose()?.as_ref(), eps);
    }
    let sum = (x.detach() + a.detach())?;
    let y = norm_forward(&sum, w, b, eps)?;
    Ok((sum, y))
}

/// (dx + dres, dw, db) of [`norm`]: `dres` is the residual stream's gradient, added to dx
/// (in the kernel on CUDA); db only with a bias.
pub fn norm_backward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor, dres: Option<&Tensor>, eps: f64) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if fused_cuda(x) && x.dim(candle_core::D::Minus1)? % 2 == 0 {
        let w32 = w.to_dtype(candle_core::DType::F32)?;
        let (dx, dw, db) = cuda::norm_bwd(&x.contiguous()?, &w32, &dy.contiguous()?, dres, b.is_some(), eps)?;
        return Ok((dx, dw.to_dtype(w.dtype())?, db.map(|d| d.to_dtype(w.dtype())).transpose()?));
    }
    let (dx, dw, db) = norm_backward_plain(x, w, b, dy, eps)?;
    let dx = match dres {
        Some(r) => (dx + r)?,
        None => dx,
    };
    Ok((dx, dw, db))
}

fn norm_backward_plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor, eps: f64) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
    let center = b.is_some();
    // On CUDA only here for odd widths, which the kernels (two elements at a time) refuse.
    let native = x.device().is_cpu() && x.dtype() == w.dtype();
    if native {
        let w32 = if x.device().is_cuda() { w.to_dtype(candle_core::DType::F32)? } else { w.clone() };
        let (dx, dw, db) = norm_grads(x, &w32, dy, center, eps)?;
        return Ok((dx, dw.to_dtype(w.dtype())?, db.map(|d| d.to_dtype(w.dtype())).transpose()?));
    }
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let g = vjp(&inputs, dy, |t| norm(&t[0], &t[1], t.get(2), eps))?;
    Ok((g[0].clone(), g[1].clone(), g.get(2).cloned()))
}

/// GELU forward without a graph.
pub fn gelu_forward(x: &Tensor) -> CResult<Tensor> {
    gelu(&x.detach())
}

/// dx of GELU.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> CResult<Tensor> {
    if (fused_cuda(x) && x.elem_count() % 2 == 0) || (x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)) {
        return x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &GeluBackward);
    }
    Ok(vjp(&[x], dy, |t| gelu(&t[0]))?.remove(0))
}

/// Self-attention forward without a graph: y and, on CUDA, the row statistics its backward
/// reads (the CPU backward recomputes them).
pub fn self_attention_forward(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<(Tensor, Option<Tensor>)> {
    let qkv = qkv.detach();
    if fused_self_attention(&qkv, heads, window)? {
        let op = SelfAttention { heads, window, lse: Default::default() };
        let y = qkv.apply_op1_no_bwd(&op)?;
        let lse = op.lse.lock().expect("lse lock").take();
        return Ok((y, lse));
    }
    Ok((causal_self_attention(&qkv, heads, window)?, None))
}

/// d(qkv) of self-attention from the forward's y (and row statistics) and dy.
pub fn self_attention_backward(qkv: &Tensor, y: &Tensor, lse: Option<&Tensor>, dy: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(lse) = lse {
        return cuda::self_attention_bwd(qkv, y, dy, lse, heads, window);
    }
    let _ = (y, lse);
    if qkv.device().is_cpu() && matches!(qkv.dtype(), candle_core::DType::F32 | candle_core::DType::F64) {
        let qkv = if qkv.stride()[2] == 1 { qkv.clone() } else { qkv.contiguous()? };
        return qkv.apply_op2_no_bwd(&dy.contiguous()?, &SelfAttentionBackward { heads, window });
    }
    Ok(vjp(&[qkv], dy, |t| causal_self_attention(&t[0], heads, window))?.remove(0))
}

/// Cross-entropy forward without a graph (see [`cross_entropy`]).
pub fn cross_entropy_forward(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    cross_entropy(&logits.detach(), targets)
}

/// d logits of [`cross_entropy`] from the forward's losses and d losses.
pub fn cross_entropy_backward(logits: &Tensor, targets: &Tensor, losses: &Tensor, dloss: &Tensor) -> CResult<Tensor> {
    if fused_cuda(logits) || (logits.device().is_cpu() && matches!(logits.dtype(), candle_core::DType::F32 | candle_core::DType::F64)) {
        let losses = losses.to_dtype(if logits.device().is_cuda() { candle_core::DType::F32 } else { logits.dtype() })?;
        let dloss = dloss.to_dtype(losses.dtype())?.contiguous()?;
        return logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &losses.contiguous()?, &CrossEntropyBackward { dloss });
    }
    Ok(vjp(&[logits], dloss, |t| cross_entropy(&t[0], targets))?.remove(0))
}

/// The gradient of an embedding table [V, D] from dy [.., D] at `ids` [..].
pub fn embedding_backward(table: &Tensor, ids: &Tensor, dy: &Tensor) -> CResult<Tensor> {
    let (v, d) = table.dims2()?;
    let dy = dy.reshape((dy.elem_count() / d, d))?;
    let ids = ids.flatten_all()?;
    #[cfg(feature = "cuda")]
    if fused_cuda(table) && table.dtype() == candle_core::DType::F32 {
        return cuda::embed_bwd(&dy, &ids, v);
    }
    Tensor::zeros((v, d), table.dtype(), table.device())?.index_add(&ids, &dy.to_dtype(table.dtype())?, 0)
}

/// Writes the k and v column blocks of qkv [N, S, 3D] into the cache buffers k, v
/// [N, capacity, D] at positions len..len + S, in place (one kernel on CUDA).
pub fn kv_append(qkv: &Tensor, k: &Tensor, v: &Tensor, len: usize) -> CResult<()> {
    let d = k.dim(2)?;
    #[cfg(feature = "cuda")]
    if fused_cuda(qkv) && qkv.dtype() == k.dtype() && qkv.stride()[2] == 1 {
        return cuda::kv_append(qkv, k, v, len);
    }
    k.slice_set(&qkv.narrow(2, d, d)?.contiguous()?, 1, len)?;
    v.slice_set(&qkv.narrow(2, 2 * d, d)?.contiguous()?, 1, len)
}

/// Σ of the squares of every element of `tensors` (gradients), as a scalar f32 tensor on their
/// device: one kernel per tensor and no host synchronisation on CUDA.
pub fn sum_squares(tensors: &[&Tensor]) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if tensors.first().is_some_and(|t| t.device().is_cuda()) && tensors.iter().all(|t| t.dtype() == candle_core::DType::F32) {
        return cuda::sum_squares(tensors)?.squeeze(0);
    }
    let parts = tensors.iter().map(|t| t.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()).collect::<CResult<Vec<_>>>()?;
    Tensor::stack(&parts, 0)?.sum_all()
}
