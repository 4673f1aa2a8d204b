//! The fused AdamW update of many parameters (one launch on CUDA, the clipping factor read from
//! the device) and the squared gradient norm that clipping needs. Weights are updated in place
//! on CUDA; moments [m | v] and the update's arithmetic are f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var, WithDType};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{contiguous, filled, reference, vectorised, CResult, Elem, CHUNK};

/// One AdamW update of a parameter, fused: from weights w, gradient g and moments
/// `mv` = [m | v] (f32, 2·numel) returns [w' | m' | v'] (f32, 3·numel).
/// `grad_scale` multiplies g first (gradient clipping); w decays by the factor 1 − lr·weight_decay.
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

/// One AdamW update of many parameters: (parameter, gradient, moments [m | v], weight decay)
/// each, `hp.weight_decay` unused. With `clip` = (Σ g² over all parameters [1] f32, max norm)
/// the gradients are scaled by min(1, max norm / √Σ g²) (`hp.grad_scale` then unused), and a
/// non-finite norm leaves everything unchanged. On CUDA (f32 parameters) one launch updates
/// them all in place, reading the sum on the device (no host round trip); elsewhere one update
/// each, in order, replacing parameters and moments.
pub fn update_many(items: &mut [(&Var, &Tensor, &mut Tensor, f64)], hp: AdamWStep, clip: Option<(&Tensor, f64)>) -> CResult<()> {
    #[cfg(feature = "cuda")]
    if items.iter().all(|(p, ..)| p.device().is_cuda() && p.dtype() == DType::F32) {
        let grads = items.iter().map(|(_, g, ..)| g.to_dtype(DType::F32)).collect::<CResult<Vec<_>>>()?;
        let all: Vec<(&Tensor, &Tensor, &Tensor, f64)> = items.iter().zip(&grads).map(|((p, _, mv, wd), g)| (p.as_tensor(), g, &**mv, *wd)).collect();
        return cuda::adamw_many(&all, &hp, clip);
    }
    for (p, g, mv, weight_decay) in items.iter_mut() {
        update_clipped(p, g, mv, AdamWStep { weight_decay: *weight_decay, ..hp }, clip)?;
    }
    Ok(())
}

/// One parameter's update of [`update_many`] (in place on CUDA, replacing `p` and `mv`
/// elsewhere); the norm for clipping is read here.
fn update_clipped(p: &Var, g: &Tensor, mv: &mut Tensor, hp: AdamWStep, clip: Option<(&Tensor, f64)>) -> CResult<()> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && p.dtype() == DType::F32 {
        return cuda::adamw_many(&[(p.as_tensor(), &g.to_dtype(DType::F32)?, mv, hp.weight_decay)], &hp, clip);
    }
    let mut hp = hp;
    if let Some((sumsq, max_norm)) = clip {
        let norm = (sumsq.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0]).sqrt();
        if !norm.is_finite() {
            return Ok(());
        }
        hp.grad_scale = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
    }
    let out = step(p.as_tensor(), g, mv, hp)?; // [w' | m' | v']
    let n = p.elem_count();
    p.set(&out.narrow(0, 0, n)?.reshape(p.shape())?.to_dtype(p.dtype())?)?;
    *mv = out.narrow(0, n, 2 * n)?.detach(); // never part of a graph
    Ok(())
}

/// [w' | m' | v'] (f32) of one update: the CPU kernel, elsewhere the plain composition.
fn step(w: &Tensor, g: &Tensor, mv: &Tensor, hp: AdamWStep) -> CResult<Tensor> {
    if !w.device().is_cpu() {
        return reference::adamw_step(w, g, mv, hp);
    }
    w.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, &mv.contiguous()?, &hp)
}

/// Σ of the squares of every element of `tensors` (gradients), as a scalar f32 tensor on their
/// device: one kernel per tensor and no host synchronisation on CUDA.
pub fn sum_squares(tensors: &[&Tensor]) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if tensors.first().is_some_and(|t| t.device().is_cuda()) && tensors.iter().all(|t| t.dtype() == DType::F32) {
        return cuda::sum_squares(tensors)?.squeeze(0);
    }
    let parts = tensors.iter().map(|t| t.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<CResult<Vec<_>>>()?;
    Tensor::stack(&parts, 0)?.sum_all()
}

// ---------------------------------------------------------------------------------------------
// CPU kernel.

fn adamw_cpu<W: Elem>(w: &[W], g: &[W], mv: &[f32], hp: &AdamWStep) -> Vec<f32> {
    let n = w.len();
    assert!(g.len() == n && mv.len() == 2 * n);
    // Every element: the three outputs' chunks are walked whole, index by index.
    filled(3 * n, |out| adamw_into(out, w, g, mv, hp))
}

fn adamw_into<W: Elem>(out: &mut [MaybeUninit<f32>], w: &[W], g: &[W], mv: &[f32], hp: &AdamWStep) {
    let n = w.len();
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
            // Slices of one length, so that the loop has no bounds checks and vectorises.
            let k = wo.len();
            let (mo, vo) = (&mut mo[..k], &mut vo[..k]);
            let at = c * CHUNK;
            let (w, g, m, v) = (&w[at..][..k], &g[at..][..k], &m[at..][..k], &v[at..][..k]);
            vectorised(#[inline(always)] || {
                for i in 0..k {
                    let gi = WithDType::to_f64(g[i]) as f32 * scale;
                    let mi = b1 * m[i] + (1.0 - b1) * gi;
                    let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let update = (mi * inv_bc1) / ((vi * inv_bc2).sqrt() + eps);
                    wo[i].write(WithDType::to_f64(w[i]) as f32 * decay - lr * update);
                    mo[i].write(mi);
                    vo[i].write(vi);
                }
            })
        });
}

/// [w' | m' | v'] from w, g and [m | v] (CPU).
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
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::{DType, Tensor};

    use super::AdamWStep;
    use crate::ops::cuda::{address_of, cuda_device, launch, launch_cfg};
    use crate::ops::CResult;

    /// Elements per chunk of the multi-tensor kernels: one block each.
    const CHUNK: usize = 1 << 15;

    /// (offset, length) of the CHUNK-element pieces of n elements, in order.
    fn chunks(n: usize) -> impl Iterator<Item = (u64, u64)> {
        (0..n).step_by(CHUNK).map(move |start| (start as u64, CHUNK.min(n - start) as u64))
    }

    /// A table of chunk records (each `words` u64 long) uploaded for one launch; the returned
    /// tensor must live until the kernel ran (stream-ordered frees make dropping it afterwards
    /// safe).
    fn chunk_table(records: Vec<u64>, dev: &candle_core::Device) -> CResult<(Tensor, u64)> {
        let n = records.len();
        let table = Tensor::from_vec(records.into_iter().map(|w| w as i64).collect::<Vec<_>>(), n, dev)?;
        let address = address_of(&table, "chunk table")?;
        Ok((table, address))
    }

    /// One AdamW update in place for many parameters, in one launch: (w, g, mv = [m | v], weight
    /// decay) per parameter, all f32. With `clip` = (Σ g² over all parameters [1], max norm) the
    /// kernel computes the clipping factor itself (hp.grad_scale is then ignored; hp.weight_decay
    /// is unused, each parameter brings its own).
    pub(super) fn adamw_many(items: &[(&Tensor, &Tensor, &Tensor, f64)], hp: &AdamWStep, clip: Option<(&Tensor, f64)>) -> CResult<()> {
        let Some(first) = items.first() else { return Ok(()) };
        let dev = cuda_device(first.0)?;
        let f = |x: f64| x as f32;
        let mut records = Vec::new();
        let mut grads = Vec::with_capacity(items.len()); // contiguous copies, alive until the launch
        for &(w, g, mv, weight_decay) in items {
            let n = w.elem_count();
            if w.dtype() != DType::F32 || g.dtype() != DType::F32 || mv.dtype() != DType::F32 || g.elem_count() != n || mv.elem_count() != 2 * n {
                candle_core::bail!("adamw: weights, gradient and moments must be f32 of matching sizes");
            }
            let g = g.contiguous()?;
            // The kernel writes w and the moments in place: plain buffers that only the optimizer
            // updates, between steps, on this stream.
            let pw = address_of(w, "adamw weight")?;
            let pg = address_of(&g, "adamw gradient")?;
            let pm = address_of(mv, "adamw moments")?;
            let pv = pm + 4 * n as u64;
            let decay = f(1.0 - hp.lr * weight_decay).to_bits() as u64;
            for (start, len) in chunks(n) {
                let off = 4 * start; // bytes
                records.extend([pw + off, pg + off, pm + off, pv + off, len, decay]);
            }
            grads.push(g);
        }
        let blocks = (records.len() / 6) as u32;
        if blocks == 0 {
            return Ok(()); // only empty parameters
        }
        let (table, ptable) = chunk_table(records, first.0.device())?;
        let (lr, b1, b2, eps, scale) = (f(hp.lr), f(hp.beta1), f(hp.beta2), f(hp.eps), f(hp.grad_scale));
        let (inv_bc1, inv_bc2) = (f(1.0 / hp.bc1), f(1.0 / hp.bc2));
        let (psum, max_norm) = match clip {
            Some((sumsq, max_norm)) => (address_of(sumsq, "sumsq")?, max_norm as f32),
            None => (0u64, 0f32),
        };
        launch!(&dev, "adamw_chunks_f32", launch_cfg((blocks, 1), 256, 0), ptable, lr, b1, b2, eps, inv_bc1, inv_bc2, scale, psum, max_norm);
        drop((table, grads));
        Ok(())
    }

    /// Σ of the squares of all elements of f32 tensors, as a [1] f32 tensor, in one launch (no
    /// host sync).
    pub(super) fn sum_squares(tensors: &[&Tensor]) -> CResult<Tensor> {
        let first = tensors.first().ok_or_else(|| candle_core::Error::Msg("sum_squares of nothing".into()))?;
        let dev = cuda_device(first)?;
        let out = Tensor::zeros(1, DType::F32, first.device())?;
        let mut records = Vec::new();
        let mut keep = Vec::with_capacity(tensors.len());
        for t in tensors {
            let t = t.contiguous()?;
            if t.dtype() != DType::F32 {
                candle_core::bail!("sum_squares: f32 only");
            }
            let (p, n) = (address_of(&t, "x")?, t.elem_count());
            for (start, len) in chunks(n) {
                records.extend([p + 4 * start, len]);
            }
            keep.push(t);
        }
        let blocks = (records.len() / 2) as u32;
        let (table, ptable) = chunk_table(records, first.device())?;
        let po = address_of(&out, "sum")?;
        if blocks > 0 {
            launch!(&dev, "sum_squares_chunks_f32", launch_cfg((blocks, 1), 256, 0), ptable, po);
        }
        drop((table, keep));
        Ok(out)
    }
}
