//! Fused operations, one module per op, each with an explicit forward and backward function
//! (the model's backward pass, `grad.rs`, calls them in reverse order): bias-free linear maps
//! ([`linear`]), causal self-attention on a fused qkv projection and attention after a KV cache
//! ([`attention`]), LayerNorm/RMSNorm with the residual add before it ([`norm`]), GELU and
//! dropout ([`pointwise`]), softmax cross-entropy ([`cross_entropy`]), embedding lookup
//! ([`embedding`]), and the fused AdamW update with the gradient norm for clipping ([`adamw`]);
//! [`muon`] holds the Muon optimizer's Newton–Schulz orthogonalisation (matrix products only).
//!
//! Each replaces a chain of 5–30 small candle ops (and two to three times as many in the
//! backward pass) by one forward and one backward kernel. On the CPU that op count, not the
//! arithmetic, bounds the speed of small models (`tiny`: 17K → 23K training bytes/s from
//! fusing alone; BENCHMARKS.md has the whole log); on CUDA, candle's autograd added every
//! gradient into a fresh zero tensor (one memset and one add per graph edge: 40% of an `enwik8`
//! step on the H200). The kernels run outside candle's autograd (`apply_op*_no_bwd`) and the
//! forward functions detach their inputs: the explicit passes build no graph.
//!
//! Kernels exist for the CPU in f32 and f64 (rayon loops in the calling pool) and for CUDA in
//! f32 and bf16 (`kernels/*.cuh`, one fat binary; launchers in each op's `cuda` module over the
//! plumbing of `ops/cuda.rs`). Norm weights, losses, softmax statistics and optimizer state
//! stay f32 on CUDA. Without a kernel for a device, dtype or shape (odd widths, other head
//! dimensions, windows the CUDA kernels do not take), an op runs a plain composition of candle
//! ops ([`reference`]'s; for GELU candle's `gelu_erf`), its backward by candle's autograd
//! ([`reference::vjp`]): correct, not fast.
//!
//! Tests: tests/it/ops.rs checks every op's forward and backward against [`reference`] by
//! autograd, in f64 and f32 on the CPU (AdamW against the textbook update too);
//! tests/it/cuda.rs checks the CUDA kernels against the CPU ones in f32 and bf16;
//! tests/it/gradients.rs checks the whole model's backward pass.

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod embedding;
pub mod linear;
pub mod muon;
pub mod norm;
pub mod pointwise;
pub mod reference;

type CResult<T> = candle_core::Result<T>;

/// The dtype reductions run in: fp32 for half-precision activations, else the same.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// True when `t` lives on a CUDA device in a dtype the fused CUDA kernels take (f32, bf16).
#[cfg(feature = "cuda")]
fn fused_cuda(t: &Tensor) -> bool {
    t.device().is_cuda() && cuda::supports(t.dtype())
}

#[cfg(not(feature = "cuda"))]
fn fused_cuda(_: &Tensor) -> bool {
    false
}

/// What the CPU kernels need of an element type (f32 and f64).
trait Elem: WithDType + Float + Send + Sync {}

impl Elem for f32 {}
impl Elem for f64 {}

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
