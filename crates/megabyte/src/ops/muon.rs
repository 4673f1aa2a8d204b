//! The Muon update's orthogonalisation (Jordan et al. 2024, modded-nanogpt): the quintic
//! Newton–Schulz iteration that maps a matrix G = U S Vᵀ to about U Vᵀ, every singular value
//! pushed into a band around 1 without an SVD. Matrix products only: candle's matmul, the
//! gemm crate on the CPU and cuBLAS on CUDA, batched over the matrices of a parameter.

use candle_core::{Tensor, D};

use super::CResult;

/// The quintic's coefficients (a, b, c) of φ(x) = a·x + b·x³ + c·x⁵, modded-nanogpt's: chosen
/// for the steepest slope at 0 (a = 3.4445) such that five steps take every singular value of
/// a Frobenius-normalised matrix into about [0.7, 1.2] (not to 1 exactly: Muon needs the
/// directions, not an exact orthogonal matrix).
pub const NS_COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// `steps` quintic Newton–Schulz iterations on each matrix of g [B, R, C], in g's dtype:
/// X₀ = G/(‖G‖_F + 1e-7), then X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ, over the shorter
/// side (a tall matrix is transposed there and back). In singular values: each s of G becomes
/// φ applied `steps` times to s/(‖G‖_F + 1e-7), the singular vectors unchanged.
pub fn newton_schulz(g: &Tensor, steps: usize) -> CResult<Tensor> {
    let (_, r, c) = g.dims3()?;
    let tall = r > c;
    let x = if tall { g.transpose(1, 2)?.contiguous()? } else { g.contiguous()? }; // [B, m, n], m ≤ n
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sum_keepdim(D::Minus2)?.sqrt()?; // [B, 1, 1]
    let mut x = x.broadcast_div(&(norm + 1e-7)?)?;
    let (a, b, c) = NS_COEFFICIENTS;
    for _ in 0..steps {
        let xt = x.transpose(1, 2)?.contiguous()?;
        let gram = x.matmul(&xt)?; // A = X·Xᵀ [B, m, m]
        let poly = ((&gram * b)? + (gram.matmul(&gram)? * c)?)?; // b·A + c·A²
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    if tall {
        x = x.transpose(1, 2)?.contiguous()?;
    }
    Ok(x)
}
