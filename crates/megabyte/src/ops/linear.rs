//! Bias-free linear maps y = x Wᵀ for x [.., in] and W [out, in]. On the CPU one gemm per
//! product (forward: y; backward: dx and dW from one call); elsewhere cuBLAS through candle's
//! matmul in the activations' dtype, and on CUDA with bf16 activations an f32 dW straight from
//! one cuBLAS GEMM.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use std::mem::MaybeUninit;

use super::{contiguous, filled, vectorised, CResult, Elem};

/// (W_act, y): the weight W cast once to x's dtype (the backward pass reuses the cast), and
/// y = x W_actᵀ [.., out].
pub fn forward(x: &Tensor, w: &Tensor) -> CResult<(Tensor, Tensor)> {
    let x = x.detach();
    let w_act = w.detach().to_dtype(x.dtype())?;
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let mut out = dims.to_vec();
    out[dims.len() - 1] = w_act.dim(0)?;
    let y = if x.device().is_cpu() {
        x.contiguous()?.apply_op2_no_bwd(&w_act.contiguous()?, &Linear)?.reshape(out)?
    } else {
        // cuBLAS, in the activations' dtype (bf16 weights cast from the f32 masters).
        let m = x.elem_count() / d_in;
        x.reshape((m, d_in))?.matmul(&w_act.t()?)?.reshape(out)?
    };
    Ok((w_act, y))
}

/// (dx, dW) of y = x W_actᵀ, with W_act the forward's weight in x's dtype ([`forward`]); dW in
/// `dw_dtype` (the master weight's).
pub fn backward(x: &Tensor, w_act: &Tensor, dy: &Tensor, dw_dtype: DType) -> CResult<(Tensor, Tensor)> {
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
    if x.device().is_cuda() && x.dtype() == DType::BF16 && dw_dtype == DType::F32 {
        return Ok((dx, cuda::weight_grad_f32(&x2, &dy2)?));
    }
    let dw = dy2.t()?.matmul(&x2)?.to_dtype(dw_dtype)?;
    Ok((dx, dw))
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

/// C = A·B for row-major views given by their (row, column) strides, written (not added)
/// into the m·n elements at `dst`, row-major [m, n], which need not be initialised.
#[allow(clippy::too_many_arguments)]
fn matmul_into<T: Elem>(dst: &mut [MaybeUninit<T>], m: usize, n: usize, k: usize, a: &[T], a_rs: usize, a_cs: usize, b: &[T], b_rs: usize, b_cs: usize) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    assert!(dst.len() >= m * n);
    assert!(m == 0 || n == 0 || k == 0 || (a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs));
    // SAFETY: the strides describe views inside `a` and `b` (asserted above) and `dst` holds
    // m·n elements; with read_dst false gemm writes every one of them without reading any.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr().cast::<T>(), 1, n as isize, false,
            a.as_ptr(), a_cs as isize, a_rs as isize,
            b.as_ptr(), b_cs as isize, b_rs as isize,
            T::zero(), T::one(), false, false, false, parallelism,
        )
    }
}

/// x [M, in] · W [out, in]ᵀ → [M, out].
///
/// gemm is slowest at this product's layout (both operands contiguous along the sum), where it
/// gathers W into its panels on every call: 40 GFLOP/s on one core for `tiny`'s global MLP
/// output (M = 64, in = 512, out = 128) against 100 for the backward's products. Where M
/// repays it, W is transposed first ([in, out] row-major, the backward's layout). The sums run
/// in the same order either way: the results are the same bits (gemm's single-row path, which
/// differs, is never taken here).
fn linear_fwd<T: Elem>(x: &[T], w: &[T], d_in: usize, d_out: usize) -> Vec<T> {
    let m = x.len() / d_in;
    if m >= 256 || (m >= 32 && d_in >= 4 * d_out) {
        let wt = transposed(w, d_out, d_in);
        return filled(m * d_out, |y| matmul_into(y, m, d_out, d_in, x, d_in, 1, &wt, d_out, 1));
    }
    filled(m * d_out, |y| matmul_into(y, m, d_out, d_in, x, d_in, 1, w, 1, d_in))
}

/// a [rows, cols] row-major → aᵀ [cols, rows] row-major, in 8 × 8 tiles.
fn transposed<T: Elem>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    const B: usize = 8;
    assert_eq!(a.len(), rows * cols);
    let (r8, c8) = (rows / B * B, cols / B * B);
    // Every element: the tiles cover [0, r8) × [0, c8), the two loops after them the rest.
    filled(rows * cols, |t| {
        vectorised(#[inline(always)] || {
            for i0 in (0..r8).step_by(B) {
                for j0 in (0..c8).step_by(B) {
                    let mut tile = [[T::zero(); B]; B];
                    for (di, src) in a[i0 * cols + j0..].chunks(cols).take(B).enumerate() {
                        for dj in 0..B {
                            tile[dj][di] = src[dj];
                        }
                    }
                    for (dj, row) in tile.iter().enumerate() {
                        for (o, &v) in t[(j0 + dj) * rows + i0..][..B].iter_mut().zip(row) {
                            o.write(v);
                        }
                    }
                }
            }
            for i in r8..rows {
                for j in 0..cols {
                    t[j * rows + i].write(a[i * cols + j]);
                }
            }
            for i in 0..r8 {
                for j in c8..cols {
                    t[j * rows + i].write(a[i * cols + j]);
                }
            }
        })
    })
}

/// [dx (M·in) | dW (out·in)] from dy [M, out].
fn linear_bwd<T: Elem>(x: &[T], w: &[T], dy: &[T], d_in: usize, d_out: usize) -> Vec<T> {
    let m = x.len() / d_in;
    filled(m * d_in + d_out * d_in, |out| {
        let (dx, dw) = out.split_at_mut(m * d_in);
        matmul_into(dx, m, d_in, d_out, dy, d_out, 1, w, d_in, 1); // dy · W
        matmul_into(dw, d_out, d_in, m, dy, 1, d_out, x, d_in, 1); // dyᵀ · x
    })
}

/// y [M, out] from contiguous x [.., in] and W [out, in].
struct Linear;

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
}

/// [dx | dW] flat from x, W and dy (all contiguous).
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
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::{DType, Tensor};

    use crate::ops::cuda::{alloc, contiguous_at, cuda_device, tensor, with_cuda};
    use crate::ops::CResult;

    /// dW [out, in] (f32) = dyᵀ · x for bf16 x [m, in] and dy [m, out], by one cuBLAS GEMM with
    /// f32 output (no bf16 rounding of dW and no cast kernel).
    pub(super) fn weight_grad_f32(x: &Tensor, dy: &Tensor) -> CResult<Tensor> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        let (m, d_in) = x.dims2()?;
        let (m2, d_out) = dy.dims2()?;
        if m != m2 || x.dtype() != DType::BF16 || dy.dtype() != DType::BF16 {
            candle_core::bail!("weight_grad_f32: bf16 x [m, in] and dy [m, out] expected");
        }
        let (x, dy) = (x.contiguous()?, dy.contiguous()?);
        let dev = cuda_device(&x)?;
        let (out, pout) = alloc(&dev, DType::F32, d_out * d_in)?;
        with_cuda(&x, |xs, xl| {
            with_cuda(&dy, |gs, gl| {
                let (px, pg) = (contiguous_at(xs, xl, "x")?, contiguous_at(gs, gl, "dy")?);
                let blas = dev.cublas_handle();
                let (alpha, beta) = (1f32, 0f32);
                // Column-major: C [in × out] = x_cm [in × m] · dy_cm [out × m]ᵀ.
                // SAFETY: the pointers cover [m, in], [m, out] and [out, in] elements on this
                // device, and cuBLAS runs on candle's stream (its handle is bound to it).
                unsafe {
                    gemm_ex(
                        *blas.handle(),
                        sys::cublasOperation_t::CUBLAS_OP_N,
                        sys::cublasOperation_t::CUBLAS_OP_T,
                        d_in as i32,
                        d_out as i32,
                        m as i32,
                        &alpha as *const f32 as *const _,
                        px as *const _,
                        sys::cudaDataType::CUDA_R_16BF,
                        d_in as i32,
                        pg as *const _,
                        sys::cudaDataType::CUDA_R_16BF,
                        d_out as i32,
                        &beta as *const f32 as *const _,
                        pout as *mut _,
                        sys::cudaDataType::CUDA_R_32F,
                        d_in as i32,
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                    .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))?;
                }
                Ok(())
            })
        })?;
        Ok(tensor(out, (d_out, d_in)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposed-weight forward gives the bits of the direct product, at the model's
    /// shapes and odd ones (tiles and their remainders).
    #[test]
    fn transposing_the_weight_first_changes_no_bit() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (m, d_in, d_out) in [(512, 32, 128), (512, 128, 32), (64, 512, 128), (300, 37, 45), (40, 203, 50), (256, 16, 32)] {
            let x: Vec<f32> = (0..m * d_in).map(|_| next()).collect();
            let w: Vec<f32> = (0..d_out * d_in).map(|_| next()).collect();
            let direct = filled(m * d_out, |y| matmul_into(y, m, d_out, d_in, &x, d_in, 1, &w, 1, d_in));
            let wt = transposed(&w, d_out, d_in);
            assert!((0..d_out * d_in).all(|e| wt[(e % d_in) * d_out + e / d_in] == w[e]), "{d_out} × {d_in}: not the transpose");
            let got = linear_fwd(&x, &w, d_in, d_out);
            let same = got.iter().zip(&direct).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "m {m}, in {d_in}, out {d_out}: the transposed forward changed bits");
        }
    }
}
