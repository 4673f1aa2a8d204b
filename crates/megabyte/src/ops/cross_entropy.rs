//! Softmax cross-entropy over the byte logits: per-row losses in nats, and their gradient
//! (softmax − onehot)·dloss in one pass that takes log Σ exp from the forward's losses.
//! Losses are f32 for bf16 logits (f32 or f64 otherwise).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{accumulation_dtype, contiguous, filled, fused_cuda, max_of, reference, vectorised, with_cpu_storage, CResult, Elem, LANES};

/// Per-row cross-entropy in nats: logits [N, V], targets [N] u32 → [N] (logits' dtype, f32
/// for bf16 logits).
pub fn forward(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let logits = logits.detach();
    if fused_cuda(&logits) {
        return logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropy);
    }
    let logits = logits.to_dtype(accumulation_dtype(logits.dtype()))?;
    if !logits.device().is_cpu() {
        return reference::cross_entropy(&logits, targets);
    }
    logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropy)
}

/// d logits [N, V] of [`forward`] from the forward's losses and d losses [N] (the weight of
/// each row's loss).
pub fn backward(logits: &Tensor, targets: &Tensor, losses: &Tensor, dloss: &Tensor) -> CResult<Tensor> {
    if fused_cuda(logits) || (logits.device().is_cpu() && matches!(logits.dtype(), candle_core::DType::F32 | candle_core::DType::F64)) {
        let losses = losses.to_dtype(if logits.device().is_cuda() { candle_core::DType::F32 } else { logits.dtype() })?;
        let dloss = dloss.to_dtype(losses.dtype())?.contiguous()?;
        return logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &losses.contiguous()?, &CrossEntropyBackward { dloss });
    }
    let acc = accumulation_dtype(logits.dtype());
    if logits.device().is_cpu() && acc != logits.dtype() {
        // The forward ran the kernel on the logits cast to f32; so does the backward.
        return backward(&logits.to_dtype(acc)?, targets, losses, dloss)?.to_dtype(logits.dtype());
    }
    Ok(reference::vjp(&[logits], dloss, |t| reference::cross_entropy(&t[0].to_dtype(acc)?, targets))?.remove(0))
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

/// Per-row losses of logits [N, V] against u32 targets (CPU and CUDA).
struct CrossEntropy;

/// log Σ exp of a row, stably.
#[inline(always)]
fn log_sum_exp<T: Elem>(row: &[T]) -> T {
    let max = max_of(row);
    let (chunks, rest) = row.as_chunks::<LANES>();
    let mut acc = [T::zero(); LANES];
    for x in chunks {
        for l in 0..LANES {
            acc[l] = acc[l] + (x[l] - max).exp_fast();
        }
    }
    let tail = rest.iter().fold(T::zero(), |a, &b| a + (b - max).exp_fast());
    max + acc.iter().fold(tail, |a, &b| a + b).ln()
}

/// Rows per parallel task of the cross-entropy kernels.
const CE_ROWS: usize = 64;

fn ce_fwd<T: Elem>(logits: &[T], targets: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); targets.len()];
    out.par_chunks_mut(CE_ROWS).zip(logits.par_chunks(CE_ROWS * v)).zip(targets.par_chunks(CE_ROWS)).for_each(
        |((o, rows), t)| {
            vectorised(#[inline(always)] || {
                for ((o, row), &t) in o.iter_mut().zip(rows.chunks(v)).zip(t) {
                    *o = log_sum_exp(row) - row[t as usize];
                }
            })
        },
    );
    out
}

/// d logits = (softmax − onehot)·dloss, with log Σ exp = loss + logit of the target taken
/// from the forward pass's losses (one exp per logit instead of two).
fn ce_bwd<T: Elem>(logits: &[T], targets: &[u32], losses: &[T], dloss: &[T], v: usize) -> Vec<T> {
    // Every element: each row of the output is written whole from its row of logits.
    filled(logits.len(), |out| {
        out.par_chunks_mut(CE_ROWS * v).zip(logits.par_chunks(CE_ROWS * v)).enumerate().for_each(|(c, (o, rows))| {
            vectorised(#[inline(always)] || {
                for (i, (o, row)) in o.chunks_mut(v).zip(rows.chunks(v)).enumerate() {
                    let r = c * CE_ROWS + i;
                    let t = targets[r] as usize;
                    let lse = losses[r] + row[t];
                    for (oi, &l) in o.iter_mut().zip(row) {
                        oi.write((l - lse).exp_fast() * dloss[r]);
                    }
                    o[t].write((row[t] - lse).exp_fast() * dloss[r] - dloss[r]);
                }
            })
        });
    })
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
}

/// d logits from logits, targets and the forward's losses, with `dloss` (CPU and CUDA).
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


// ---------------------------------------------------------------------------------------------
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

    use crate::ops::cuda::{alloc, contiguous_at, launch, launch_cfg, suffix, with_cuda};
    use crate::ops::CResult;

    pub(super) fn ce_fwd(logits: (&CudaStorage, &Layout), targets: (&CudaStorage, &Layout)) -> CResult<(CudaStorage, Shape)> {
        let dev = &logits.0.device;
        let (rows, v) = logits.1.shape().dims2()?;
        if targets.1.shape().elem_count() != rows || targets.0.dtype() != DType::U32 {
            candle_core::bail!("cross-entropy: need {rows} u32 targets");
        }
        let (pl, pt) = (contiguous_at(logits.0, logits.1, "logits")?, contiguous_at(targets.0, targets.1, "targets")?);
        let (out, po) = alloc(dev, DType::F32, rows)?;
        let (r32, v32) = (rows as i32, v as i32);
        launch!(dev, format!("ce_fwd_{}", suffix(logits.0.dtype())?), launch_cfg((rows.div_ceil(8) as u32, 1), 256, 0), pl, pt, po, r32, v32);
        Ok((out, Shape::from(rows)))
    }

    /// d logits (T) from logits, targets, the forward's f32 losses and f32 d losses.
    pub(super) fn ce_bwd(logits: (&CudaStorage, &Layout), targets: (&CudaStorage, &Layout), losses: (&CudaStorage, &Layout), dloss: &Tensor) -> CResult<(CudaStorage, Shape)> {
        let dev = &logits.0.device;
        let (rows, v) = logits.1.shape().dims2()?;
        if targets.0.dtype() != DType::U32 || targets.1.shape().elem_count() != rows || losses.0.dtype() != DType::F32 || losses.1.shape().elem_count() != rows {
            candle_core::bail!("cross-entropy backward: need {rows} u32 targets and {rows} f32 losses");
        }
        let pl = contiguous_at(logits.0, logits.1, "logits")?;
        let pt = contiguous_at(targets.0, targets.1, "targets")?;
        let pls = contiguous_at(losses.0, losses.1, "losses")?;
        let dloss = dloss.to_dtype(DType::F32)?.contiguous()?;
        let (out, po) = alloc(dev, logits.0.dtype(), rows * v)?;
        let (r32, v32) = (rows as i32, v as i32);
        with_cuda(&dloss, |ds, dl| {
            let pd = contiguous_at(ds, dl, "dloss")?;
            launch!(dev, format!("ce_bwd_{}", suffix(logits.0.dtype())?), launch_cfg((rows.div_ceil(8) as u32, 1), 256, 0), pl, pt, pls, pd, po, r32, v32);
            Ok(())
        })?;
        Ok((out, logits.1.shape().clone()))
    }
}
