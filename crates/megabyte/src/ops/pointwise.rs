//! Elementwise ops: the MLP's activation, GELU (exact, erf form) or ReLU² (relu(x)²), with its
//! backward; dropout, whose mask is a hash of (key, element index), never stored, and which is
//! its own backward; and the sum of two gradients.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, fused_cuda, map2, reference, vectorised, CResult, Elem, CHUNK};
use crate::config::Activation;

// ---------------------------------------------------------------------------------------------
// Sums.

/// a + b for tensors of one shape and dtype (gradient sums). On the CPU a kernel in the calling
/// rayon pool: candle's own parallel add hands tensors of 64K elements or more to threads of
/// its own, which then spin beside the training pool's (on two cores, a stolen core).
pub fn add(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if a.device().is_cpu() && a.dims() == b.dims() && a.dtype() == b.dtype() {
        return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add);
    }
    a + b
}

/// a + b of contiguous tensors (CPU).
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "megabyte-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(map2(contiguous(a, l1, "a")?, contiguous(b, l2, "b")?, |a, b| a + b)),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(map2(contiguous(a, l1, "a")?, contiguous(b, l2, "b")?, |a, b| a + b)),
            _ => candle_core::bail!("add: unsupported dtypes {:?}, {:?} on the CPU", s1.dtype(), s2.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// The MLP's activation.

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)), elementwise.
pub fn gelu(x: &Tensor) -> CResult<Tensor> {
    activation(x, Activation::Gelu)
}

/// dx of [`gelu`] at x from dy.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> CResult<Tensor> {
    activation_backward(x, dy, Activation::Gelu)
}

/// ReLU²(x) = max(x, 0)², elementwise.
pub fn relu2(x: &Tensor) -> CResult<Tensor> {
    activation(x, Activation::Relu2)
}

/// dx of [`relu2`] at x from dy: dy·2·max(x, 0).
pub fn relu2_backward(x: &Tensor, dy: &Tensor) -> CResult<Tensor> {
    activation_backward(x, dy, Activation::Relu2)
}

/// `act` of x, elementwise: the fused kernel on the CPU and (even element counts) on CUDA.
pub fn activation(x: &Tensor, act: Activation) -> CResult<Tensor> {
    let x = x.detach();
    if fused_cuda(&x) && x.elem_count() % 2 == 0 {
        return x.contiguous()?.apply_op1_no_bwd(&Act(act));
    }
    if !x.device().is_cpu() {
        return match act {
            Activation::Gelu => x.gelu_erf(),
            Activation::Relu2 => x.relu()?.sqr(),
        };
    }
    x.contiguous()?.apply_op1_no_bwd(&Act(act))
}

/// dx of [`activation`] at x from dy.
pub fn activation_backward(x: &Tensor, dy: &Tensor, act: Activation) -> CResult<Tensor> {
    if (fused_cuda(x) && x.elem_count() % 2 == 0) || x.device().is_cpu() {
        return x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &ActBackward(act));
    }
    match act {
        Activation::Gelu => Ok(reference::vjp(&[x], dy, |t| t[0].gelu_erf())?.remove(0)),
        Activation::Relu2 => dy * (x.relu()? * 2.0)?,
    }
}

/// The standard normal's CDF Φ(x) and density φ(x), as GELU and its derivative need them.
trait Gaussian: Elem {
    fn normal_cdf_pdf(self) -> (Self, Self);
}

/// 1/√(2π)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl Gaussian for f32 {
    /// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32 resolution near 1),
    /// whose exp(−z²) with z = x/√2 is also the density's exp(−x²/2): one exp for both.
    /// libm's erff plus a separate exp were 25% of a `tiny` training step; the exp is the
    /// vectorisable [`exp_f32`](super::exp_f32), so the whole loop is.
    #[inline(always)]
    fn normal_cdf_pdf(self) -> (f32, f32) {
        let z = self.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
        let e = super::exp_f32(-z * z);
        let erf = (1.0 - poly * e).copysign(self);
        (0.5 * (1.0 + erf), e * FRAC_1_SQRT_2PI as f32)
    }
}

impl Gaussian for f64 {
    #[inline(always)]
    fn normal_cdf_pdf(self) -> (f64, f64) {
        (0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2)), (-0.5 * self * self).exp() * FRAC_1_SQRT_2PI)
    }
}

fn gelu_fwd<T: Gaussian>(x: &[T]) -> Vec<T> {
    map2(x, x, #[inline(always)] |x, _| x * x.normal_cdf_pdf().0)
}

/// dGELU/dx = Φ(x) + x·φ(x).
fn gelu_bwd<T: Gaussian>(x: &[T], dy: &[T]) -> Vec<T> {
    map2(x, dy, #[inline(always)] |x, g| {
        let (cdf, pdf) = x.normal_cdf_pdf();
        g * (cdf + x * pdf)
    })
}

fn relu2_fwd<T: Elem>(x: &[T]) -> Vec<T> {
    map2(x, x, #[inline(always)] |x, _| if x > T::zero() { x * x } else { T::zero() })
}

/// dReLU²/dx = 2·max(x, 0).
fn relu2_bwd<T: Elem>(x: &[T], dy: &[T]) -> Vec<T> {
    map2(x, dy, #[inline(always)] |x, g| if x > T::zero() { g * (x + x) } else { T::zero() })
}

fn act_fwd<T: Gaussian>(x: &[T], act: Activation) -> Vec<T> {
    match act {
        Activation::Gelu => gelu_fwd(x),
        Activation::Relu2 => relu2_fwd(x),
    }
}

fn act_bwd<T: Gaussian>(x: &[T], dy: &[T], act: Activation) -> Vec<T> {
    match act {
        Activation::Gelu => gelu_bwd(x, dy),
        Activation::Relu2 => relu2_bwd(x, dy),
    }
}

/// The activation of a contiguous x (CPU and CUDA).
struct Act(Activation);

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Gelu => "megabyte-gelu",
            Activation::Relu2 => "megabyte-relu2",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(act_fwd(contiguous(x, l, self.name())?, self.0)),
            CpuStorage::F64(x) => CpuStorage::F64(act_fwd(contiguous(x, l, self.name())?, self.0)),
            _ => candle_core::bail!("{}: unsupported dtype {:?} on the CPU", self.name(), s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::act_fwd((s, l), self.0.name())
    }
}

/// dx of the activation from contiguous x and dy (CPU and CUDA).
struct ActBackward(Activation);

impl CustomOp2 for ActBackward {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Gelu => "megabyte-gelu-backward",
            Activation::Relu2 => "megabyte-relu2-backward",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(act_bwd(contiguous(x, l1, "x")?, contiguous(g, l2, "dy")?, self.0)),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(act_bwd(contiguous(x, l1, "x")?, contiguous(g, l2, "dy")?, self.0)),
            _ => candle_core::bail!("{}: unsupported dtype {:?} on the CPU", self.name(), s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::act_bwd((s1, l1), (s2, l2), self.0.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout (training only).

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
pub(super) fn first_index(shape: &Shape, row_offset: usize) -> u64 {
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
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    x.broadcast_mul(&reference::dropout_mask(x.shape(), p, key, row_offset, x.device())?.to_dtype(x.dtype())?)
}

/// Dropout of a contiguous x (CPU and CUDA).
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
            vectorised(#[inline(always)] || {
                for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                    if keeps(self.key, start + i as u64, threshold) {
                        *o = x * scale;
                    }
                }
            })
        });
        out
    }
}

impl CustomOp1 for Dropout {
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
}

// ---------------------------------------------------------------------------------------------
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Layout, Shape};

    use crate::ops::cuda::{alloc, contiguous_at, elementwise_blocks, launch, launch_cfg, paired, suffix};
    use crate::ops::CResult;

    /// The activation `name` (`gelu`, `relu2`: kernels `{name}_fwd_{dtype}`) of x.
    pub(super) fn act_fwd(x: (&CudaStorage, &Layout), name: &str) -> CResult<(CudaStorage, Shape)> {
        let dev = &x.0.device;
        let n = x.1.shape().elem_count();
        let px = contiguous_at(x.0, x.1, "activation x")?;
        paired(&[px], n, x.0.dtype(), name)?;
        let (out, py) = alloc(dev, x.0.dtype(), n)?;
        let n64 = n as u64;
        launch!(dev, format!("{name}_fwd_{}", suffix(x.0.dtype())?), launch_cfg((elementwise_blocks(n / 2), 1), 256, 0), px, py, n64);
        Ok((out, x.1.shape().clone()))
    }

    /// dx of the activation `name` at x from dy (kernels `{name}_bwd_{dtype}`).
    pub(super) fn act_bwd(x: (&CudaStorage, &Layout), dy: (&CudaStorage, &Layout), name: &str) -> CResult<(CudaStorage, Shape)> {
        let dev = &x.0.device;
        let n = x.1.shape().elem_count();
        let (px, pg) = (contiguous_at(x.0, x.1, "activation x")?, contiguous_at(dy.0, dy.1, "activation dy")?);
        if dy.0.dtype() != x.0.dtype() || dy.1.shape().elem_count() != n {
            candle_core::bail!("{name} backward: dy must match x");
        }
        paired(&[px, pg], n, x.0.dtype(), name)?;
        let (out, pdx) = alloc(dev, x.0.dtype(), n)?;
        let n64 = n as u64;
        launch!(dev, format!("{name}_bwd_{}", suffix(x.0.dtype())?), launch_cfg((elementwise_blocks(n / 2), 1), 256, 0), px, pg, pdx, n64);
        Ok((out, x.1.shape().clone()))
    }

    /// x (T, contiguous) with element i kept by `dropout_keeps(key, base + i)` and scaled.
    pub(super) fn dropout(x: (&CudaStorage, &Layout), base: u64, key: u64, threshold: u32, scale: f32) -> CResult<(CudaStorage, Shape)> {
        let dev = &x.0.device;
        let n = x.1.shape().elem_count();
        let px = contiguous_at(x.0, x.1, "dropout x")?;
        let (out, py) = alloc(dev, x.0.dtype(), n)?;
        let n64 = n as u64;
        launch!(dev, format!("dropout_{}", suffix(x.0.dtype())?), launch_cfg((elementwise_blocks(n), 1), 256, 0), px, py, n64, base, key, threshold, scale);
        Ok((out, x.1.shape().clone()))
    }
}
