//! Causal multi-head attention: self-attention on a fused qkv projection (the training and
//! full forward passes, with its backward), attention of new queries after a KV cache
//! (decoding, forward only), and the append to that cache.
//!
//! The CPU kernels never hold more than one query's row of scores, and the backward pass
//! recomputes the probabilities from qkv. On CUDA: one warp per (sequence, head) for patches of
//! at most 8 positions, a small-sequence kernel with whole groups in shared memory, flash-style
//! tiles for long sequences, and in bf16 tensor-core kernels (mma.sync) that also take a
//! sliding window; the forward keeps each row's log Σ exp for the backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::fused_cuda;
use super::{contiguous, dot, exp_shifted_sum, max_of, reference, vectorised, view3, CResult, Elem, View3};

/// Causal self-attention of one fused projection: qkv [N, S, 3D] (q, k, v as column blocks,
/// `heads` heads as contiguous column blocks of each) → (y [N, S, D], lse). lse is the CUDA
/// kernels' per-row log Σ exp [N, H, S] (f32), which [`backward`] reads; None elsewhere (the
/// CPU backward recomputes it).
///
/// With `window` = Some(W), each query sees only the last W positions (itself included):
/// sliding-window attention. On CUDA the tensor-core kernels take the window (bf16, S above
/// the small kernels' sizes); elsewhere on CUDA it runs the plain composition, which holds
/// the [S, S] scores.
pub fn forward(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<(Tensor, Option<Tensor>)> {
    let qkv = qkv.detach();
    #[cfg(feature = "cuda")]
    if fused_self_attention(&qkv, heads, window)? {
        let (y, lse) = cuda::self_attention_fwd(&qkv, heads, window)?;
        return Ok((y, Some(lse)));
    }
    if !qkv.device().is_cpu() {
        return Ok((reference::self_attention(&qkv, heads, window)?, None));
    }
    let qkv = if qkv.stride()[2] == 1 { qkv } else { qkv.contiguous()? };
    Ok((qkv.apply_op1_no_bwd(&SelfAttention { heads, window })?, None))
}

/// d(qkv) [N, S, 3D] (contiguous, written in one piece: the three column views cost nothing)
/// of self-attention, from the forward's qkv, y and lse ([`forward`]) and dy [N, S, D].
pub fn backward(qkv: &Tensor, y: &Tensor, lse: Option<&Tensor>, dy: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(lse) = lse {
        return cuda::self_attention_bwd(qkv, y, dy, lse, heads, window);
    }
    let _ = (y, lse);
    if qkv.device().is_cpu() {
        let qkv = if qkv.stride()[2] == 1 { qkv.clone() } else { qkv.contiguous()? };
        return qkv.apply_op2_no_bwd(&dy.contiguous()?, &SelfAttentionBackward { heads, window });
    }
    Ok(reference::vjp(&[qkv], dy, |t| reference::self_attention(&t[0], heads, window))?.remove(0))
}

/// softmax(q kᵀ / √hd + causal mask) v for q [N, Sq, D] and k, v [N, Sk, D] (Sk ≥ Sq): query i
/// sits at position Sk − Sq + i, after the Sk − Sq positions of a KV cache, and sees keys up
/// to it (or, with `window`, the last W positions up to it). For cached decoding: no backward
/// pass.
pub fn cached(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    cached_from(q, k, v, heads, window, &[])
}

/// [`cached`] for a ragged batch whose rows are right-aligned in the cache: sequence n's keys
/// start at slot `starts[n]` (its left padding, never seen; empty `starts`: every row starts
/// at 0). Positions within a row are contiguous slots, so a window counts the same keys as
/// in the row alone. On the CPU the kernel skips the padding, so each row's result is that
/// of the row alone bit for bit; on CUDA a masked row runs the plain composition.
pub fn cached_from(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, window: Option<usize>, starts: &[usize]) -> CResult<Tensor> {
    let ragged = starts.iter().any(|&s| s > 0);
    if ragged && starts.len() != q.dim(0)? {
        candle_core::bail!("attention: {} row starts for {} rows", starts.len(), q.dim(0)?);
    }
    // The kernels read any rank-3 view whose last dimension is contiguous.
    let rows = |t: &Tensor| if t.stride()[2] == 1 { Ok(t.clone()) } else { t.contiguous() };
    #[cfg(feature = "cuda")]
    if !ragged && window.is_none() && fused_cuda(q) && cuda::head_dim_supported(q.dim(2)? / heads) {
        return rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &Attention { heads, window, starts: Vec::new() });
    }
    if !q.device().is_cpu() {
        return reference::causal_attention_from(q, &k.contiguous()?, &v.contiguous()?, heads, window, if ragged { starts } else { &[] });
    }
    let starts = if ragged { starts.to_vec() } else { Vec::new() };
    rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &Attention { heads, window, starts })
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

/// True when self-attention on `qkv` runs the fused CUDA kernels (with a window, only those
/// that take one).
#[cfg(feature = "cuda")]
fn fused_self_attention(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<bool> {
    let (_, s, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    let shape_ok = window.is_none() || cuda::window_supported(qkv.dtype(), s, hd);
    Ok(shape_ok && fused_cuda(qkv) && cuda::head_dim_supported(hd) && qkv.stride()[2] == 1)
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

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
/// (returned; hi − 1 is its own position, lo at least `first`, the row's first key), into
/// p[lo..hi].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attn_probs<T: Elem>(q: &[T], k: &[T], vq: View3, vk: View3, dims: AttnDims, n: usize, h: usize, i: usize, first: usize, p: &mut [T]) -> (usize, usize) {
    let hd = dims.hd();
    let scale = T::from(dims.scale()).expect("scale fits");
    let hi = dims.sk - dims.sq + i + 1;
    let lo = hi.saturating_sub(dims.window).max(first);
    let qi = &q[vq.offset + n * vq.sn + i * vq.ss + h * hd..][..hd];
    for (j, pj) in p.iter_mut().enumerate().take(hi).skip(lo) {
        let kj = &k[vk.offset + n * vk.sn + j * vk.ss + h * hd..][..hd];
        *pj = dot(qi, kj) * scale;
    }
    let max = max_of(&p[lo..hi]);
    let inv = exp_shifted_sum(&mut p[lo..hi], max).recip();
    for pj in &mut p[lo..hi] {
        *pj = *pj * inv;
    }
    (lo, hi)
}

/// `starts`: each sequence's first key (empty: 0 for all).
#[allow(clippy::too_many_arguments)]
fn attn_fwd<T: Elem>(q: &[T], k: &[T], v: &[T], vq: View3, vk: View3, vv: View3, dims: AttnDims, starts: &[usize]) -> Vec<T> {
    let (sq, d, hd) = (dims.sq, dims.d, dims.hd());
    let mut y = vec![T::zero(); dims.n * sq * d];
    let per = seqs_per_task(dims.n);
    y.par_chunks_mut(per * sq * d).enumerate().for_each(|(c, yc)| vectorised(#[inline(always)] || {
        let mut p = vec![T::zero(); dims.sk];
        for (r, yn) in yc.chunks_mut(sq * d).enumerate() {
            let n = c * per + r;
            let first = starts.get(n).copied().unwrap_or(0);
            for h in 0..dims.heads {
                for i in 0..sq {
                    let (lo, hi) = attn_probs(q, k, vq, vk, dims, n, h, i, first, &mut p);
                    let yi = &mut yn[i * d + h * hd..][..hd];
                    for (j, &pj) in p.iter().enumerate().take(hi).skip(lo) {
                        let vj = &v[vv.offset + n * vv.sn + j * vv.ss + h * hd..][..hd];
                        for (o, &x) in yi.iter_mut().zip(vj) {
                            *o = *o + pj * x;
                        }
                    }
                }
            }
        }
    }));
    y
}

/// Sequences per parallel task of the CPU attention kernels: a few tasks per thread, so that
/// the local model's many short sequences (P positions each) are not one task apiece.
fn seqs_per_task(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1)
}

/// d(qkv) [N, S, 3D] (contiguous) of self-attention from dy [N, S, D] contiguous.
/// Recomputes the probabilities: nothing but qkv is kept from the forward pass.
fn attn_bwd<T: Elem>(qkv: &[T], dy: &[T], vq: View3, vk: View3, vv: View3, dims: AttnDims) -> Vec<T> {
    let (n_all, s, d, hd) = (dims.n, dims.sq, dims.d, dims.hd());
    let scale = T::from(dims.scale()).expect("scale fits");
    let (q, k, v) = (qkv, qkv, qkv);
    let mut out = vec![T::zero(); n_all * s * 3 * d];
    let per = seqs_per_task(n_all);
    out.par_chunks_mut(per * s * 3 * d).enumerate().for_each(|(c, dc)| vectorised(#[inline(always)] || {
        let mut p = vec![T::zero(); s];
        let mut dp = vec![T::zero(); s];
        for (r, dn) in dc.chunks_mut(s * 3 * d).enumerate() {
            let n = c * per + r;
            for h in 0..dims.heads {
                for i in 0..s {
                    let (lo, hi) = attn_probs(q, k, vq, vk, dims, n, h, i, 0, &mut p);
                    let dyi = &dy[(n * s + i) * d + h * hd..][..hd];
                    // dP_ij = dy_i · v_j, and Σ_j P_ij dP_ij = dy_i · y_i.
                    let mut row = T::zero();
                    for j in lo..hi {
                        let vj = &v[vv.offset + n * vv.sn + j * vv.ss + h * hd..][..hd];
                        dp[j] = dot(dyi, vj);
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
        }
    }));
    out
}

/// Self-attention forward on a fused qkv (CPU).
struct SelfAttention {
    heads: usize,
    window: Option<usize>,
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "megabyte-causal-self-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dims, vq, vk, vv) = qkv_views(l, self.heads, self.window)?;
        let out = match st {
            CpuStorage::F32(x) => CpuStorage::F32(attn_fwd(x, x, x, vq, vk, vv, dims, &[])),
            CpuStorage::F64(x) => CpuStorage::F64(attn_fwd(x, x, x, vq, vk, vv, dims, &[])),
            _ => candle_core::bail!("attention: unsupported dtype {:?} on the CPU", st.dtype()),
        };
        Ok((out, Shape::from((dims.n, dims.sq, dims.d))))
    }
}

/// d(qkv) of self-attention from qkv and dy (CPU).
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

/// Attention of q after a KV cache of k, v (CPU and CUDA; `starts` on the CPU only).
struct Attention {
    heads: usize,
    window: Option<usize>,
    /// Each sequence's first key (empty: 0 for all).
    starts: Vec<usize>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "megabyte-causal-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dims, vq, vk, vv) = attn_dims(l1, l2, l3, self.heads, self.window)?;
        let shape = Shape::from((dims.n, dims.sq, dims.d));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => CpuStorage::F32(attn_fwd(q, k, v, vq, vk, vv, dims, &self.starts)),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => CpuStorage::F64(attn_fwd(q, k, v, vq, vk, vv, dims, &self.starts)),
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

// ---------------------------------------------------------------------------------------------
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

    use crate::ops::cuda::{alloc, at, contiguous_at, cuda_device, elementwise_blocks, launch, launch_cfg, suffix, tensor, view, with_cuda, View};
    use crate::ops::CResult;

    /// Head dimensions the attention kernels are built for.
    const HEAD_DIMS: [usize; 3] = [16, 32, 64];

    /// Threads (= rows) of one block of the small attention kernels: a group of S positions fits
    /// in one block when S ≤ this (kernels/attention.cuh, SMALL_R and SMALL_RB).
    fn small_rows(hd: usize, backward: bool) -> usize {
        let budget = if backward { 2048 } else { 4096 };
        (budget / hd).min(128)
    }

    /// One warp per (sequence, head) for sequences of at most 8 positions (WARP_S) with head dim
    /// 32 or 64: the local model's patches. At head dim 64 each lane reads element pairs.
    fn warp_kernel(s: usize, hd: usize, addresses: &[u64], views: &[View], dtype: DType) -> bool {
        let pairs_ok = hd == 32 || aligned(addresses, views, 2 * dtype.size_in_bytes(), dtype);
        s <= 8 && matches!(hd, 32 | 64) && pairs_ok
    }

    /// Every address and row stride is a multiple of `bytes` (the kernels' load width): the small
    /// and tensor-core attention kernels move rows 16 bytes at a time, the warp kernel pairs.
    fn aligned(addresses: &[u64], views: &[View], bytes: usize, dtype: DType) -> bool {
        let elems = (bytes / dtype.size_in_bytes()).max(1) as i64;
        addresses.iter().all(|a| a % bytes as u64 == 0) && views.iter().all(|v| v.sn % elems == 0 && v.ss % elems == 0)
    }

    /// The flash kernels put the (sequence, head) pairs on the grid's y axis,
    /// which CUDA caps at 65,535.
    fn grid_y(pairs: usize) -> CResult<u32> {
        if pairs > 65_535 {
            candle_core::bail!("attention: {pairs} (sequence, head) pairs exceed the 65,535 this kernel's grid takes; use a smaller batch");
        }
        Ok(pairs as u32)
    }

    /// The tensor-core kernels' grid: (sequence, head) pairs on x, blocks of TC_ROWS rows on y
    /// (the kernels order the row blocks longest first).
    fn tc_grid(pairs: usize, rows: usize) -> CResult<(u32, u32)> {
        let blocks = rows.div_ceil(TC_ROWS);
        if pairs > i32::MAX as usize || blocks > 65_535 {
            candle_core::bail!("attention: {pairs} (sequence, head) pairs of {rows} rows exceed this kernel's grid");
        }
        Ok((pairs as u32, blocks as u32))
    }

    /// Queries (and keys) per block of the flash kernels (BQ in the kernels).
    const BQ: usize = 64;

    /// Rows per block of the tensor-core kernels (TC_ROWS).
    const TC_ROWS: usize = 64;

    /// Shapes of one attention call: q [n, sq, d], k and v [n, sk, d], `heads` heads of hd.
    #[derive(Clone, Copy, Debug)]
    struct Dims {
        n: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        hd: usize,
        /// Sliding window (positions a query sees, itself included); 0: full causal.
        window: usize,
    }

    impl Dims {
        fn scale(&self) -> f32 {
            1.0 / (self.hd as f32).sqrt()
        }
    }

    /// True when the CUDA attention kernels take this head dimension.
    pub(super) fn head_dim_supported(hd: usize) -> bool {
        HEAD_DIMS.contains(&hd)
    }

    /// True when self-attention over S positions with a sliding window runs fused: the tensor-core
    /// kernels take a window, so bf16 and S past the small kernels' sizes (forward and backward).
    pub(super) fn window_supported(dtype: DType, s: usize, hd: usize) -> bool {
        dtype == DType::BF16 && head_dim_supported(hd) && s > small_rows(hd, false).max(small_rows(hd, true))
    }

    /// The `_win` kernel name suffix and the window argument of the tensor-core kernels.
    fn tc_window(dims: &Dims) -> (&'static str, i32) {
        if dims.window > 0 {
            ("_win", dims.window.min(i32::MAX as usize) as i32)
        } else {
            ("", 0)
        }
    }

    fn no_window(dims: &Dims, kernel: &str) -> CResult<()> {
        if dims.window > 0 {
            candle_core::bail!("attention: a sliding window runs on the tensor-core kernels only (bf16, 16-byte rows), not the {kernel} kernel");
        }
        Ok(())
    }

    /// Causal attention forward: y [n, sq, heads·hd] (T) and, when `with_lse` (a backward will
    /// follow), the f32 row log Σ exp [n, heads, sq]. q, k, v are (storage, element offset, view).
    fn attention_fwd(q: (&CudaStorage, u64, View), k: (u64, View), v: (u64, View), dims: Dims, with_lse: bool) -> CResult<(CudaStorage, Option<CudaStorage>)> {
        let dev = &q.0.device;
        let dtype = q.0.dtype();
        let (n, sq, sk, h, hd) = (dims.n, dims.sq, dims.sk, dims.heads, dims.hd);
        let (y, py) = alloc(dev, dtype, n * sq * h * hd)?;
        let (lse, plse) = match with_lse {
            true => alloc(dev, DType::F32, n * h * sq).map(|(s, p)| (Some(s), p))?,
            false => (None, 0), // the kernels skip a null lse
        };
        let (n32, sq32, sk32, h32, scale) = (n as i32, sq as i32, sk as i32, h as i32, dims.scale());
        let rows = small_rows(hd, false);
        let s = sq.max(sk);
        if dtype == DType::BF16 && s > rows && aligned(&[q.1, k.0, v.0], &[q.2, k.1, v.1], 16, dtype) {
            let (win, w32) = tc_window(&dims);
            launch!(dev, format!("attn_tc_fwd{win}_{hd}"), launch_cfg(tc_grid(n * h, sq)?, 128, 0), q.1, q.2, k.0, k.1, v.0, v.1, py, plse, n32, sq32, sk32, h32, scale, w32);
            return Ok((y, lse));
        }
        no_window(&dims, "small or flash")?;
        let (name, cfg) = if warp_kernel(s, hd, &[q.1, k.0, v.0], &[q.2, k.1, v.1], dtype) {
            (format!("attn_warp_fwd_{}_{hd}", suffix(dtype)?), launch_cfg(((n * h).div_ceil(4) as u32, 1), 128, 0))
        } else if s <= rows {
            if !aligned(&[q.1, k.0, v.0], &[q.2, k.1, v.1], 16, dtype) {
                candle_core::bail!("attention: rows must start on 16-byte boundaries");
            }
            let groups_per_block = rows / s;
            let shared = 2 * groups_per_block * (sk * hd + 4) * 4;
            (format!("attn_small_fwd_{}_{hd}", suffix(dtype)?), launch_cfg(((n * h).div_ceil(groups_per_block) as u32, 1), rows as u32, shared as u32))
        } else {
            (format!("attn_flash_fwd_{}_{hd}", suffix(dtype)?), launch_cfg((sq.div_ceil(BQ) as u32, grid_y(n * h)?), BQ as u32, 0))
        };
        launch!(dev, name, cfg, q.1, q.2, k.0, k.1, v.0, v.1, py, plse, n32, sq32, sk32, h32, scale);
        Ok((y, lse))
    }

    /// The views of q, k and v inside a fused qkv [N, S, 3D] layout.
    fn qkv_views(s: &CudaStorage, l: &Layout, heads: usize, window: Option<usize>) -> CResult<(Dims, [(u64, View); 3])> {
        let dims = l.dims();
        if dims.len() != 3 || dims[2] % 3 != 0 || (dims[2] / 3) % heads != 0 {
            candle_core::bail!("attention: qkv {dims:?} is not [N, S, 3·heads·hd]");
        }
        let d = dims[2] / 3;
        let vw = view(l, "qkv")?;
        let base = at(s, l)?;
        let esize = s.dtype().size_in_bytes() as u64;
        let col = |c: usize| (base + (c * d) as u64 * esize, vw);
        Ok((Dims { n: dims[0], sq: dims[1], sk: dims[1], heads, hd: d / heads, window: window.unwrap_or(0) }, [col(0), col(1), col(2)]))
    }

    /// Self-attention forward on a fused qkv [N, S, 3D] (read in place): (y [N, S, D], lse
    /// [N, H, S] f32).
    pub(super) fn self_attention_fwd(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<(Tensor, Tensor)> {
        with_cuda(qkv, |s, l| {
            let (dims, [q, k, v]) = qkv_views(s, l, heads, window)?;
            let (y, lse) = attention_fwd((s, q.0, q.1), k, v, dims, true)?;
            let y = tensor(y, (dims.n, dims.sq, dims.heads * dims.hd));
            Ok((y, tensor(lse.expect("asked for"), (dims.n, dims.heads, dims.sq))))
        })
    }

    /// Cached-decoding attention forward: q [N, Sq, D], k, v [N, Sk, D] (any views with a
    /// contiguous last dim).
    pub(super) fn attention_fwd3(q: (&CudaStorage, &Layout), k: (&CudaStorage, &Layout), v: (&CudaStorage, &Layout), heads: usize) -> CResult<(CudaStorage, Shape)> {
        let (qd, kd) = (q.1.dims(), k.1.dims());
        let dtypes_differ = k.0.dtype() != q.0.dtype() || v.0.dtype() != q.0.dtype();
        if dtypes_differ || qd.len() != 3 || kd.len() != 3 || v.1.dims() != kd || qd[0] != kd[0] || qd[2] != kd[2] || kd[1] < qd[1] || qd[2] % heads != 0 {
            candle_core::bail!("attention: incompatible shapes q {qd:?} k {kd:?} v {:?}", v.1.dims());
        }
        let dims = Dims { n: qd[0], sq: qd[1], sk: kd[1], heads, hd: qd[2] / heads, window: 0 };
        let (y, _lse) = attention_fwd(
            (q.0, at(q.0, q.1)?, view(q.1, "q")?),
            (at(k.0, k.1)?, view(k.1, "k")?),
            (at(v.0, v.1)?, view(v.1, "v")?),
            dims,
            false,
        )?;
        Ok((y, Shape::from((dims.n, dims.sq, dims.heads * dims.hd))))
    }

    /// d(qkv) [N, S, 3D] (contiguous) of self-attention, from qkv, the forward's y and lse, and dy.
    pub(super) fn self_attention_bwd(qkv: &Tensor, y: &Tensor, dy: &Tensor, lse: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
        let dy = dy.contiguous()?;
        let dev = cuda_device(qkv)?;
        let dtype = qkv.dtype();
        if dy.dtype() != dtype || y.dtype() != dtype {
            candle_core::bail!("attention backward: dtypes of qkv, y and dy differ");
        }
        let (n, s, d3) = qkv.dims3()?;
        let (out, pout) = alloc(&dev, dtype, n * s * d3)?;
        let d = d3 / 3;
        let esize = dtype.size_in_bytes() as u64;
        let ov = View { sn: (s * d3) as i64, ss: d3 as i64 };
        let (dq, dk, dv) = ((pout, ov), (pout + d as u64 * esize, ov), (pout + 2 * d as u64 * esize, ov));
        with_cuda(qkv, |qs, ql| {
            let (dims, [q, k, v]) = qkv_views(qs, ql, heads, window)?;
            with_cuda(y, |ys, yl| {
                with_cuda(&dy, |gs, gl| {
                    let (py, pg) = (contiguous_at(ys, yl, "y")?, contiguous_at(gs, gl, "dy")?);
                    let (n32, s32, h32, scale) = (dims.n as i32, dims.sq as i32, dims.heads as i32, dims.scale());
                    let hd = dims.hd;
                    let rows = small_rows(hd, true);
                    let tn = suffix(dtype)?;
                    let tc = dtype == DType::BF16 && s > rows && aligned(&[q.0, k.0, v.0, py, pg, dq.0, dk.0, dv.0], &[q.1, k.1, v.1, ov], 16, dtype);
                    if !tc {
                        no_window(&dims, "warp, small or flash")?;
                    }
                    if warp_kernel(s, hd, &[q.0, k.0, v.0, py, pg, dq.0, dk.0, dv.0], &[q.1, k.1, v.1, ov], dtype) {
                        let cfg = launch_cfg(((n * heads).div_ceil(4) as u32, 1), 128, 0);
                        launch!(&dev, format!("attn_warp_bwd_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, py, pg, dq.0, dq.1, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale);
                        return Ok(());
                    }
                    if s <= rows {
                        if !aligned(&[q.0, k.0, v.0, py, pg, dq.0, dk.0, dv.0], &[q.1, k.1, v.1, ov], 16, dtype) {
                            candle_core::bail!("attention backward: rows must start on 16-byte boundaries");
                        }
                        let groups_per_block = rows / s;
                        let shared = (4 * groups_per_block * (s * hd + 4) + 2 * rows) * 4;
                        let cfg = launch_cfg(((n * heads).div_ceil(groups_per_block) as u32, 1), rows as u32, shared as u32);
                        launch!(&dev, format!("attn_small_bwd_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, py, pg, dq.0, dq.1, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale);
                        return Ok(());
                    }
                    let lse = lse.contiguous()?;
                    let (dbuf, pdbuf) = alloc(&dev, DType::F32, n * heads * s)?;
                    with_cuda(&lse, |ls, ll| {
                        let plse = contiguous_at(ls, ll, "lse")?;
                        if tc {
                            let hd32 = hd as i32;
                            let warps = n * s * heads;
                            launch!(&dev, format!("attn_bwd_prep_{tn}"), launch_cfg((warps.div_ceil(8) as u32, 1), 256, 0), py, pg, pdbuf, n32, s32, h32, hd32);
                            let cfg = launch_cfg(tc_grid(n * heads, s)?, 128, 0);
                            let (win, w32) = tc_window(&dims);
                            launch!(&dev, format!("attn_tc_bwd_dq{win}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, pg, plse, pdbuf, dq.0, dq.1, n32, s32, h32, scale, w32);
                            launch!(&dev, format!("attn_tc_bwd_dkdv{win}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, pg, plse, pdbuf, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale, w32);
                            return Ok(());
                        }
                        let cfg = launch_cfg((s.div_ceil(BQ) as u32, grid_y(n * heads)?), BQ as u32, 0);
                        launch!(&dev, format!("attn_flash_bwd_dq_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, py, pg, plse, pdbuf, dq.0, dq.1, n32, s32, h32, scale);
                        launch!(&dev, format!("attn_flash_bwd_dkdv_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, pg, plse, pdbuf, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale);
                        Ok(())
                    })?;
                    drop(dbuf);
                    Ok(())
                })
            })
        })?;
        Ok(tensor(out, (n, s, d3)))
    }

    // ---------------------------------------------------------------------------------------------
    // KV cache.

    /// k[:, len..len+S] = qkv[:, :, D..2D] and v likewise from 2D..3D, into contiguous cache
    /// buffers [N, capacity, D], in place.
    pub(super) fn kv_append(qkv: &Tensor, k: &Tensor, v: &Tensor, len: usize) -> CResult<()> {
        let (n, s, d3) = qkv.dims3()?;
        let (nk, cap, d) = k.dims3()?;
        if d3 != 3 * d || nk != n || v.dims() != k.dims() || len + s > cap || !k.is_contiguous() || !v.is_contiguous() {
            candle_core::bail!("kv_append: qkv {:?} does not fit cache {:?} at {len}", qkv.dims(), k.dims());
        }
        with_cuda(qkv, |qs, ql| {
            with_cuda(k, |ks, kl| {
                with_cuda(v, |vs, vl| {
                    // The kernel writes the cache buffers in place: they belong to one KvCache,
                    // which holds no other reference into them while it appends.
                    let (pq, vq) = (at(qs, ql)?, view(ql, "qkv")?);
                    let (pk, pv) = (contiguous_at(ks, kl, "k cache")?, contiguous_at(vs, vl, "v cache")?);
                    let (n32, s32, d32, cap64, len32) = (n as i32, s as i32, d as i32, cap as i64, len as i32);
                    let total = n * s * d;
                    launch!(&qs.device, format!("kv_append_{}", suffix(qkv.dtype())?), launch_cfg((elementwise_blocks(total), 1), 256, 0), pq, vq, pk, pv, n32, s32, d32, cap64, len32);
                    Ok(())
                })
            })
        })
    }
}
