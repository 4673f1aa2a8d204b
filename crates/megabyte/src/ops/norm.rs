//! LayerNorm (with a bias: centre, scale, shift) and RMSNorm (without: scale only) over the
//! last dimension, eps inside the square root; the residual add before a norm fused with it.
//! Statistics are kept in f32 (or f64) whatever the activations' dtype; on CUDA the weights are
//! f32, and the kernels move element pairs (even widths; odd widths run the plain composition).

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{filled, fused_cuda, reference, sum_by_lanes, typed_slice, vectorised, with_cpu_storage, CResult, Elem, CHUNK};

/// The norm of x [.., D] with weight w [D] and bias b [D] (LayerNorm) or none (RMSNorm).
pub fn forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<Tensor> {
    let (x, w, b) = (x.detach(), w.detach(), b.map(|b| b.detach()));
    if fused_cuda(&x) && x.dim(D::Minus1)? % 2 == 0 {
        // Weights stay f32 whatever the activations' dtype; statistics are f32 in the kernel.
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let x = x.contiguous()?;
        return match b {
            Some(b) => x.apply_op3_no_bwd(&f32(&w)?, &f32(&b)?, &Norm { eps }),
            None => x.apply_op2_no_bwd(&f32(&w)?, &RmsNorm { eps }),
        };
    }
    if !x.device().is_cpu() {
        return plain(&x, &w, b.as_ref(), eps);
    }
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3_no_bwd(&w, &b, &Norm { eps }),
        None => x.apply_op2_no_bwd(&w, &RmsNorm { eps }),
    }
}

/// (x + a, norm(x + a)): the residual add and the norm after it, in one pass.
pub fn add_forward(x: &Tensor, a: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused_cuda(x) && x.dim(D::Minus1)? % 2 == 0 {
        let f32 = |t: &Tensor| t.detach().to_dtype(candle_core::DType::F32);
        return cuda::add_norm_fwd(&x.detach(), &a.detach(), &f32(w)?, b.map(f32).transpose()?.as_ref(), eps);
    }
    if x.device().is_cpu() && x.dims() == a.dims() && x.dim(D::Minus1)? == w.elem_count() {
        // One pass: each row's sum is still in cache when its norm reads it.
        let (x, a) = (x.detach().contiguous()?, a.detach().contiguous()?);
        let n = x.elem_count();
        let op = AddNorm { eps, b: b.map(|b| b.detach()) };
        let all = x.apply_op3_no_bwd(&a, &w.detach(), &op)?;
        return Ok((all.narrow(0, 0, n)?.reshape(x.shape())?, all.narrow(0, n, n)?.reshape(x.shape())?));
    }
    let sum = (x.detach() + a.detach())?;
    let y = forward(&sum, w, b, eps)?;
    Ok((sum, y))
}

/// (dx + dres, dw, db) of [`forward`] at x: `dres` is the residual stream's gradient, added to
/// dx in the kernel; db only with a bias.
pub fn backward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor, dres: Option<&Tensor>, eps: f64) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if fused_cuda(x) && x.dim(D::Minus1)? % 2 == 0 {
        let w32 = w.to_dtype(candle_core::DType::F32)?;
        let (dx, dw, db) = cuda::norm_bwd(&x.contiguous()?, &w32, &dy.contiguous()?, dres, b.is_some(), eps)?;
        return Ok((dx, dw.to_dtype(w.dtype())?, db.map(|d| d.to_dtype(w.dtype())).transpose()?));
    }
    if x.device().is_cpu() {
        return cpu_grads(x, w, dy, dres, b.is_some(), eps);
    }
    let (dx, dw, db) = {
        // On CUDA only here for odd widths (the kernels move two elements at a time) and
        // dtypes without kernels.
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let g = reference::vjp(&inputs, dy, |t| plain(&t[0], &t[1], t.get(2), eps))?;
        (g[0].clone(), g[1].clone(), g.get(2).cloned())
    };
    let dx = match dres {
        Some(r) => (dx + r)?,
        None => dx,
    };
    Ok((dx, dw, db))
}

/// The plain composition, with the weights cast to x's dtype: the norm without a kernel.
fn plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<Tensor> {
    let cast = |t: &Tensor| t.to_dtype(x.dtype());
    reference::norm(x, &cast(w)?, b.map(cast).transpose()?.as_ref(), eps)
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

/// LayerNorm of x with weight and bias (CPU and CUDA).
struct Norm {
    eps: f64,
}

/// RMSNorm of x with weight (CPU and CUDA).
struct RmsNorm {
    eps: f64,
}

/// Mean (0 for RMS) and 1/σ of one row.
#[inline(always)]
fn row_stats<T: Elem>(x: &[T], center: bool, eps: f64) -> (T, T) {
    let d = T::from(x.len()).expect("len fits");
    let mean = if center { sum_by_lanes(x.len(), |i| x[i]) / d } else { T::zero() };
    let var = sum_by_lanes(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / d;
    (mean, (var + T::from(eps).expect("eps fits")).sqrt().recip())
}

/// y = norm(x) of one row into `y` (every element written).
#[inline(always)]
fn norm_row<T: Elem>(x: &[T], y: &mut [MaybeUninit<T>], w: &[T], b: Option<&[T]>, eps: f64) {
    let d = w.len();
    let (x, y) = (&x[..d], &mut y[..d]);
    let (mean, rstd) = row_stats(x, b.is_some(), eps);
    match b {
        Some(b) => (0..d).for_each(|i| {
            y[i].write((x[i] - mean) * rstd * w[i] + b[i]);
        }),
        None => (0..d).for_each(|i| {
            y[i].write((x[i] - mean) * rstd * w[i]);
        }),
    }
}

fn norm_fwd<T: Elem>(x: &[T], w: &[T], b: Option<&[T]>, eps: f64) -> Vec<T> {
    let d = w.len();
    let rows = (CHUNK / d).max(1) * d;
    // Every element: the rows of y pair with those of x, which has its length.
    filled(x.len(), |y| {
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
            vectorised(#[inline(always)] || {
                for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                    norm_row(xr, yr, w, b, eps);
                }
            })
        })
    })
}

/// [x + a | norm(x + a)] for x, a [rows, d]: the residual sum and its norm, row by row.
fn add_norm_fwd<T: Elem>(x: &[T], a: &[T], w: &[T], b: Option<&[T]>, eps: f64) -> Vec<T> {
    let (n, d) = (x.len(), w.len());
    assert_eq!(a.len(), n);
    let rows = (CHUNK / d).max(1) * d;
    // Every element: the rows of both halves pair with those of x and a, which have n each.
    filled(2 * n, |out| {
        let (sum, y) = out.split_at_mut(n);
        sum.par_chunks_mut(rows).zip(y.par_chunks_mut(rows)).zip(x.par_chunks(rows).zip(a.par_chunks(rows))).for_each(
            |((sc, yc), (xc, ac))| {
                vectorised(#[inline(always)] || {
                    for (((sr, yr), xr), ar) in sc.chunks_mut(d).zip(yc.chunks_mut(d)).zip(xc.chunks(d)).zip(ac.chunks(d)) {
                        let (sr, xr, ar) = (&mut sr[..d], &xr[..d], &ar[..d]);
                        for i in 0..d {
                            sr[i].write(xr[i] + ar[i]);
                        }
                        // SAFETY: the loop above wrote all d elements of the row.
                        let sr = unsafe { &*(sr as *const [MaybeUninit<T>] as *const [T]) };
                        norm_row(sr, yr, w, b, eps);
                    }
                })
            },
        )
    })
}

/// [dx (+ dres) | dw | db] (db only with a bias).
fn norm_bwd<T: Elem>(x: &[T], w: &[T], dy: &[T], dres: Option<&[T]>, center: bool, eps: f64) -> Vec<T> {
    let d = w.len();
    let n = x.len();
    let rows = n / d;
    let chunk = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let mut out = Vec::with_capacity(n + 2 * d);
    // Every element of dx: its chunks of rows cover all n.
    let partials: Vec<(Vec<T>, Vec<T>)> = out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk * d)
        .enumerate()
        .map(|(c, dxc)| vectorised(#[inline(always)] || {
            let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
            // The row's x̂ and g = dy·w, each computed once.
            let (mut xh, mut g) = (vec![T::zero(); d], vec![T::zero(); d]);
            let inv_d = T::from(d).expect("d fits").recip();
            for (r, dxr) in dxc.chunks_mut(d).enumerate() {
                let row = c * chunk + r;
                let (xr, dyr, dxr) = (&x[row * d..][..d], &dy[row * d..][..d], &mut dxr[..d]);
                let (mean, rstd) = row_stats(xr, center, eps);
                for i in 0..d {
                    xh[i] = (xr[i] - mean) * rstd;
                    g[i] = dyr[i] * w[i];
                }
                // dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) (mean(g) dropped for RMS).
                let mg = if center { sum_by_lanes(d, |i| g[i]) * inv_d } else { T::zero() };
                let mgx = sum_by_lanes(d, |i| g[i] * xh[i]) * inv_d;
                for i in 0..d {
                    dw[i] = dw[i] + dyr[i] * xh[i];
                    db[i] = db[i] + dyr[i];
                }
                let dx_at = |i: usize| rstd * (g[i] - mg - xh[i] * mgx);
                match dres {
                    Some(res) => {
                        let res = &res[row * d..][..d];
                        for i in 0..d {
                            dxr[i].write(dx_at(i) + res[i]);
                        }
                    }
                    None => {
                        for i in 0..d {
                            dxr[i].write(dx_at(i));
                        }
                    }
                }
            }
            (dw, db)
        }))
        .collect();
    // SAFETY: the chunks above wrote all n elements of dx.
    unsafe { out.set_len(n) };
    let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
    for (pw, pb) in partials {
        for i in 0..d {
            dw[i] = dw[i] + pw[i];
            db[i] = db[i] + pb[i];
        }
    }
    out.extend(dw);
    if center {
        out.extend(db);
    }
    out
}

fn norm_cpu_fwd(x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), b: Option<(&CpuStorage, &Layout)>, eps: f64) -> CResult<(CpuStorage, Shape)> {
    fn typed<T: Elem>(x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), b: Option<(&CpuStorage, &Layout)>, eps: f64) -> CResult<Vec<T>> {
        let b = b.map(|b| typed_slice(b, "norm bias")).transpose()?;
        Ok(norm_fwd(typed_slice(x, "norm x")?, typed_slice(w, "norm weight")?, b, eps))
    }
    let out = match x.0 {
        CpuStorage::F32(_) => CpuStorage::F32(typed(x, w, b, eps)?),
        CpuStorage::F64(_) => CpuStorage::F64(typed(x, w, b, eps)?),
        _ => candle_core::bail!("norm: unsupported dtype {:?} on the CPU", x.0.dtype()),
    };
    Ok((out, x.1.shape().clone()))
}

/// Runs the CPU backward kernel and splits its output into (dx + dres, dw, db).
fn cpu_grads(x: &Tensor, w: &Tensor, grad: &Tensor, dres: Option<&Tensor>, center: bool, eps: f64) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
    let x = x.contiguous()?;
    let dres = dres.map(|r| if r.dims() == x.dims() { r.contiguous() } else { candle_core::bail!("norm backward: residual gradient {:?} for x {:?}", r.dims(), x.dims()) }).transpose()?;
    let all = x.apply_op2_no_bwd(w, &NormBackward { center, eps, dy: grad.contiguous()?, dres })?;
    let (n, d) = (x.elem_count(), w.elem_count());
    let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = all.narrow(0, n, d)?;
    let db = if center { Some(all.narrow(0, n + d, d)?) } else { None };
    Ok((dx, dw, db))
}

/// [x + a | norm(x + a)] flat, from x and a [.., D] and w [D] (the bias, for LayerNorm, held
/// here: an op takes three tensors at most). CPU only.
struct AddNorm {
    eps: f64,
    b: Option<Tensor>,
}

impl CustomOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "megabyte-add-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        fn typed<T: Elem>(eps: f64, x: (&CpuStorage, &Layout), a: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), b: Option<(&CpuStorage, &Layout)>) -> CResult<Vec<T>> {
            let b = b.map(|b| typed_slice(b, "bias")).transpose()?;
            Ok(add_norm_fwd(typed_slice(x, "x")?, typed_slice(a, "a")?, typed_slice(w, "w")?, b, eps))
        }
        let run = |b: Option<(&CpuStorage, &Layout)>| -> CResult<CpuStorage> {
            Ok(match s1 {
                CpuStorage::F32(_) => CpuStorage::F32(typed(self.eps, (s1, l1), (s2, l2), (s3, l3), b)?),
                CpuStorage::F64(_) => CpuStorage::F64(typed(self.eps, (s1, l1), (s2, l2), (s3, l3), b)?),
                _ => candle_core::bail!("add_norm: unsupported dtype {:?} on the CPU", s1.dtype()),
            })
        };
        let out = match &self.b {
            Some(b) => with_cpu_storage(b, |sb, lb| run(Some((sb, lb))))?,
            None => run(None)?,
        };
        Ok((out, Shape::from(2 * n)))
    }
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
}

/// [dx + dres | dw | db] of a norm from x, w, dy and the residual stream's gradient (CPU).
struct NormBackward {
    center: bool,
    eps: f64,
    dy: Tensor,
    dres: Option<Tensor>,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "megabyte-norm-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count();
        let n = l1.shape().elem_count();
        fn typed<T: Elem>(op: &NormBackward, x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), dy: (&CpuStorage, &Layout), res: Option<(&CpuStorage, &Layout)>) -> CResult<Vec<T>> {
            let res = res.map(|r| typed_slice(r, "dres")).transpose()?;
            Ok(norm_bwd(typed_slice(x, "x")?, typed_slice(w, "w")?, typed_slice(dy, "dy")?, res, op.center, op.eps))
        }
        let run = |dy: (&CpuStorage, &Layout), res: Option<(&CpuStorage, &Layout)>| -> CResult<CpuStorage> {
            Ok(match s1 {
                CpuStorage::F32(_) => CpuStorage::F32(typed(self, (s1, l1), (s2, l2), dy, res)?),
                CpuStorage::F64(_) => CpuStorage::F64(typed(self, (s1, l1), (s2, l2), dy, res)?),
                _ => candle_core::bail!("norm backward: unsupported dtype {:?} on the CPU", s1.dtype()),
            })
        };
        let out = with_cpu_storage(&self.dy, |sdy, ldy| match &self.dres {
            Some(r) => with_cpu_storage(r, |sr, lr| run((sdy, ldy), Some((sr, lr)))),
            None => run((sdy, ldy), None),
        })?;
        Ok((out, Shape::from(n + d * if self.center { 2 } else { 1 })))
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

    use crate::ops::cuda::{alloc, contiguous_at, cuda_device, launch, launch_cfg, paired, same, suffix, tensor, with_cuda};
    use crate::ops::CResult;

    /// y = norm(x) for x [rows, d] (contiguous, T), weight and bias f32 [d].
    pub(super) fn norm_fwd(x: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout), b: Option<(&CudaStorage, &Layout)>, eps: f64) -> CResult<(CudaStorage, Shape)> {
        let dev = &x.0.device;
        let d = w.1.shape().elem_count();
        let n = x.1.shape().elem_count();
        if w.0.dtype() != DType::F32 || b.is_some_and(|b| b.0.dtype() != DType::F32) {
            candle_core::bail!("norm: weights must be f32 on CUDA");
        }
        if x.1.dims().last() != Some(&d) {
            candle_core::bail!("norm: input {:?} does not end in the weight's {d}", x.1.dims());
        }
        let rows = (n / d.max(1)) as i32;
        let (px, pw) = (contiguous_at(x.0, x.1, "norm x")?, contiguous_at(w.0, w.1, "norm weight")?);
        paired(&[px], d, x.0.dtype(), "norm")?;
        let pb = match b {
            Some(b) => contiguous_at(b.0, b.1, "norm bias")?,
            None => 0u64,
        };
        let (out, py) = alloc(dev, x.0.dtype(), n)?;
        let (d32, eps32, none) = (d as i32, eps as f32, 0u64);
        launch!(dev, format!("norm_fwd_{}", suffix(x.0.dtype())?), launch_cfg(((rows as u32).div_ceil(8), 1), 256, 0), px, none, none, pw, pb, py, rows, d32, eps32);
        Ok((out, x.1.shape().clone()))
    }

    /// (x + a, norm(x + a)) in one pass: x, a [rows, d] (T), weight and bias f32 [d].
    pub(super) fn add_norm_fwd(x: &Tensor, a: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<(Tensor, Tensor)> {
        let (x, a) = (x.contiguous()?, a.contiguous()?);
        let d = w.elem_count();
        let n = x.elem_count();
        if a.elem_count() != n || a.dtype() != x.dtype() || w.dtype() != DType::F32 || b.is_some_and(|b| b.dtype() != DType::F32) {
            candle_core::bail!("add_norm: shapes or dtypes disagree");
        }
        let dev = cuda_device(&x)?;
        if x.dims().last() != Some(&d) {
            candle_core::bail!("add_norm: input {:?} does not end in the weight's {d}", x.dims());
        }
        let (xsum, psum) = alloc(&dev, x.dtype(), n)?;
        let (y, py) = alloc(&dev, x.dtype(), n)?;
        let b = b.map(|b| b.contiguous()).transpose()?;
        with_cuda(&x, |xs, xl| {
            with_cuda(&a, |as_, al| {
                with_cuda(w, |ws, wl| {
                    let (px, pa, pw) = (contiguous_at(xs, xl, "x")?, contiguous_at(as_, al, "a")?, contiguous_at(ws, wl, "w")?);
                    paired(&[px, pa], d, x.dtype(), "add_norm")?;
                    let run = |pb: u64| -> CResult<()> {
                        let (rows, d32, eps32) = ((n / d) as i32, d as i32, eps as f32);
                        launch!(&dev, format!("norm_fwd_{}", suffix(x.dtype())?), launch_cfg(((rows as u32).div_ceil(8), 1), 256, 0), px, pa, psum, pw, pb, py, rows, d32, eps32);
                        Ok(())
                    };
                    match &b {
                        Some(b) => with_cuda(b, |bs, bl| run(contiguous_at(bs, bl, "b")?)),
                        None => run(0),
                    }
                })
            })
        })?;
        Ok((tensor(xsum, x.shape().clone()), tensor(y, x.shape().clone())))
    }

    /// (dx, dw, db) of a norm; db only when `center` (LayerNorm).
    /// With `dres`, dx also includes it (the residual stream's gradient, added in the kernel).
    pub(super) fn norm_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, dres: Option<&Tensor>, center: bool, eps: f64) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count();
        let rows = n / d;
        // Blocks of 8 rows, at most 8 per multiprocessor; each writes one partial row of sums.
        let groups = rows.div_ceil(8).clamp(1, 132 * 8);
        let dres = dres.map(|t| t.contiguous()).transpose()?;
        if x.dims().last() != Some(&d) || w.dtype() != DType::F32 {
            candle_core::bail!("norm backward: input {:?} and f32 weight [{d}] expected", x.dims());
        }
        same(dy, x.dtype(), n, "norm backward dy")?;
        if let Some(r) = &dres {
            same(r, x.dtype(), n, "norm backward residual gradient")?;
        }
        let dev = cuda_device(x)?;
        let (dx, pdx) = alloc(&dev, x.dtype(), n)?;
        let (part, ppart) = alloc(&dev, DType::F32, groups * 2 * d)?;
        with_cuda(x, |xs, xl| {
            with_cuda(w, |ws, wl| {
                with_cuda(dy, |gs, gl| {
                    let (px, pw, pg) = (contiguous_at(xs, xl, "x")?, contiguous_at(ws, wl, "w")?, contiguous_at(gs, gl, "dy")?);
                    paired(&[px, pg], d, x.dtype(), "norm backward")?;
                    let (rows32, d32, eps32, c32) = (rows as i32, d as i32, eps as f32, center as i32);
                    let run = |pres: u64| -> CResult<()> {
                        paired(&[pres], d, x.dtype(), "norm backward residual gradient")?;
                        // Width 256 keeps its column sums in registers (BENCHMARKS.md: +4% on
                        // `enwik8`; wider rows lose more occupancy than they gain).
                        let tn = suffix(x.dtype())?;
                        let reg = d == 256;
                        let np = 4;
                        if reg {
                            launch!(&dev, format!("norm_bwd_reg_{tn}_{np}"), launch_cfg((groups as u32, 1), 256, 0), px, pw, pg, pres, pdx, ppart, rows32, eps32, c32);
                        } else {
                            launch!(&dev, format!("norm_bwd_{tn}"), launch_cfg((groups as u32, 1), 256, (2 * d * 4) as u32), px, pw, pg, pres, pdx, ppart, rows32, d32, eps32, c32);
                        }
                        Ok(())
                    };
                    match &dres {
                        Some(r) => with_cuda(r, |rs, rl| run(contiguous_at(rs, rl, "dres")?)),
                        None => run(0),
                    }
                })
            })
        })?;
        // Column sums of the partials as a matrix product (one partial row per block).
        let part = tensor(part, (groups, 2 * d));
        let sums = Tensor::ones((1, groups), DType::F32, x.device())?.matmul(&part)?.squeeze(0)?;
        let db = if center { Some(sums.narrow(0, d, d)?) } else { None };
        Ok((tensor(dx, x.shape().clone()), sums.narrow(0, 0, d)?, db))
    }

    //
}
