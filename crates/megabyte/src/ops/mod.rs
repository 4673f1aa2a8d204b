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

use std::mem::MaybeUninit;

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
trait Elem: WithDType + Float + Send + Sync {
    /// eˣ inside the kernels: for f32 [`exp_f32`], which the compiler vectorises (libm's
    /// `expf` is one call per element: 10% of a `tiny` training step); for f64 libm's.
    fn exp_fast(self) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// eˣ in f32 without branches or calls, so that loops over it vectorise: x = n·ln 2 + r with n
/// the nearest integer to x·log₂e (by the 1.5·2²³ rounding trick, whose bits also give n),
/// |r| ≤ ln 2 / 2, eʳ by Cephes' degree-7 polynomial (`expf.c`), times 2ⁿ built in the
/// exponent bits (as 2·2ⁿ⁻¹, so that n = 128 fits). Within 2 ulp of eˣ down to 2⁻¹²⁵; 0 below
/// (so e^−∞ = 0), ∞ above ln f32::MAX, NaN for NaN (`exp_f32_is_within_2_ulp`).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -86.643_4; // ln 2⁻¹²⁵: keeps 2ⁿ⁻¹ a normal float
    const HI: f32 = 88.722_84; // ln f32::MAX
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // ln 2 in two parts, the first exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r
        + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    let half_two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 126) << 23) as u32);
    let y = (er * 2.0) * half_two_n;
    let y = if x < LO { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Independent partial sums of the reductions: the compiler keeps them in vector registers
/// (a sequential fold cannot be vectorised, as it fixes the order of the additions).
const LANES: usize = 8;

/// Σ aᵢ·bᵢ over equal-length slices, in [`LANES`] partial sums.
#[inline(always)]
fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b[..a.len()].as_chunks::<LANES>();
    let mut acc = [T::zero(); LANES];
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let tail = ra.iter().zip(rb).fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(tail, |s, &x| s + x)
}

/// Σ f(i) over i < n, in [`LANES`] partial sums (f indexing slices of length n, so that the
/// loop vectorises).
#[inline(always)]
fn sum_by_lanes<T: Elem>(n: usize, f: impl Fn(usize) -> T) -> T {
    let full = n / LANES * LANES;
    let mut acc = [T::zero(); LANES];
    for i in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = *a + f(i + l);
        }
    }
    let tail = (full..n).fold(T::zero(), |s, i| s + f(i));
    acc.iter().fold(tail, |s, &x| s + x)
}

/// The largest element (−∞ for an empty slice), in [`LANES`] partial maxima.
#[inline(always)]
fn max_of<T: Elem>(a: &[T]) -> T {
    let (ca, ra) = a.as_chunks::<LANES>();
    let mut acc = [T::neg_infinity(); LANES];
    for x in ca {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    ra.iter().chain(&acc).fold(T::neg_infinity(), |m, &x| if x > m { x } else { m })
}

/// Writes e^(aᵢ − shift) into each aᵢ and returns their sum, in [`LANES`] partial sums.
#[inline(always)]
fn exp_shifted_sum<T: Elem>(a: &mut [T], shift: T) -> T {
    let (ca, ra) = a.as_chunks_mut::<LANES>();
    let mut acc = [T::zero(); LANES];
    for x in ca {
        for l in 0..LANES {
            x[l] = (x[l] - shift).exp_fast();
            acc[l] = acc[l] + x[l];
        }
    }
    let mut tail = T::zero();
    for x in ra {
        *x = (*x - shift).exp_fast();
        tail = tail + *x;
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// Runs `f`, the loops of one parallel task of a CPU kernel, compiled for the widest vector
/// unit this CPU has: AVX-512 (x86-64-v4) or AVX2 with FMA (v3), chosen once at run time, else
/// the baseline build's SSE2. The build targets baseline x86-64 so that one binary runs
/// anywhere; the kernels' loops (GELU, norms, softmax, cross-entropy, AdamW, dropout's hash)
/// vectorise 4 f32 wide there and 16 wide with AVX-512. `f` and what it calls are inlined into
/// the wider clone (a function may inline callees whose features are a subset of its own).
/// The results are the same bits at every level: Rust neither fuses a multiply and an add nor
/// reorders floating-point operations on its own, so wider registers only do more of the same
/// operations at once (`ops.rs::kernels_give_the_same_bits_at_every_vector_width`).
#[inline(always)]
fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,f16c,lzcnt,popcnt")]
        fn v4<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma,bmi1,bmi2,f16c,lzcnt,popcnt")]
        fn v3<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match vector_level() {
            // SAFETY: vector_level found every feature each clone is compiled for.
            VectorLevel::V4 => return unsafe { v4(f) },
            VectorLevel::V3 => return unsafe { v3(f) },
            VectorLevel::Baseline => {}
        }
    }
    f()
}

/// The instruction sets [`vectorised`] compiles its clones for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorLevel {
    /// The build's own target (SSE2 on x86-64).
    Baseline,
    /// AVX2, FMA, BMI1/2, F16C, LZCNT, POPCNT (x86-64-v3).
    V3,
    /// V3 and AVX-512 F, BW, DQ, VL (x86-64-v4).
    V4,
}

static VECTOR_LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The widest [`VectorLevel`] this CPU runs, detected once; `MEGABYTE_CPU_VECTOR=baseline`,
/// `v3` or `v4` caps it (to compare the clones, or to rule them out).
pub fn vector_level() -> VectorLevel {
    use std::sync::atomic::Ordering::Relaxed;
    const LEVELS: [VectorLevel; 3] = [VectorLevel::Baseline, VectorLevel::V3, VectorLevel::V4];
    let cached = VECTOR_LEVEL.load(Relaxed);
    if let Some(&level) = LEVELS.get(cached as usize) {
        return level;
    }
    let detected = detect_vector_level();
    let cap = match std::env::var("MEGABYTE_CPU_VECTOR").as_deref() {
        Ok("baseline") => VectorLevel::Baseline,
        Ok("v3") => VectorLevel::V3,
        _ => VectorLevel::V4,
    };
    let level = LEVELS[(detected as usize).min(cap as usize)];
    VECTOR_LEVEL.store(level as u8, Relaxed);
    level
}

fn detect_vector_level() -> VectorLevel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let v3 = has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("f16c") && has!("lzcnt") && has!("popcnt");
        let v4 = v3 && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
        if v4 {
            return VectorLevel::V4;
        }
        if v3 {
            return VectorLevel::V3;
        }
    }
    VectorLevel::Baseline
}

/// Elements per parallel task of the elementwise kernels: large enough that rayon's
/// splitting costs nothing next to the work, small enough to share out.
const CHUNK: usize = 16 * 1024;

/// A vector of `n` elements that `fill` writes, every one of them, into the uninitialised
/// buffer it gets: a kernel's output, not zeroed first only to be overwritten (the zeroing
/// was 6% of a `tiny` training step).
fn filled<T: Copy>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the callers' `fill` writes each of the n elements (each kernel's comment says
    // how), so the first n are initialised.
    unsafe { v.set_len(n) };
    v
}

/// out[i] = f(a[i], b[i]) in parallel chunks.
fn map2<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    // Every element: the chunks of `out` pair with those of a and b, which have its length.
    assert_eq!(a.len(), b.len());
    filled(a.len(), |out| {
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
            vectorised(#[inline(always)] || {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    o.write(f(a, b));
                }
            })
        });
    })
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

/// A contiguous CPU storage's elements as T (an error for another dtype).
fn typed_slice<'a, T: Elem>((s, l): (&'a CpuStorage, &Layout), what: &str) -> CResult<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l, what)
}

/// Runs `f` on a CPU tensor's storage, borrowed under its read lock (no copy).
fn with_cpu_storage<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> CResult<R>) -> CResult<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c, l),
        _ => candle_core::bail!("this fused op runs on the CPU only so far"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite floats of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_2_ulp() {
        let mut worst = 0;
        // Every 97th float from −104 to 89 (about 11 million arguments), then the edges.
        let (lo, hi) = ((-104.0f32).to_bits(), 89.0f32.to_bits());
        let args = (0..lo).step_by(97).map(f32::from_bits).chain((0..hi).step_by(97).map(f32::from_bits));
        for x in args.chain([0.0, -0.0, 88.72, 88.7228, 88.72283, -86.64, -86.65, -87.34, 1e-30, -1e-30]) {
            let want = (x as f64).exp();
            let got = exp_f32(x);
            if want < 2f64.powi(-125) {
                assert!((0.0..=2f32.powi(-124)).contains(&got), "exp({x}) = {got}, want {want}");
            } else if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else {
                let u = ulps(got, want as f32);
                assert!(u <= 2, "exp({x}) = {got}, want {want} ({u} ulp)");
                worst = worst.max(u);
            }
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(worst >= 1, "the sweep compared nothing");
    }

    #[test]
    fn lane_reductions_equal_plain_ones() {
        let a: Vec<f64> = (0..37).map(|i| ((i * 7919) % 101) as f64 / 13.0 - 3.0).collect();
        let b: Vec<f64> = (0..37).map(|i| ((i * 104_729) % 89) as f64 / 7.0 - 6.0).collect();
        for len in [0, 1, 7, 8, 9, 16, 37] {
            let (a, b) = (&a[..len], &b[..len]);
            let plain: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!((dot(a, b) - plain).abs() <= 1e-12 * (1.0 + plain.abs()), "dot over {len}");
            assert_eq!(max_of(a), a.iter().copied().fold(f64::NEG_INFINITY, f64::max), "max over {len}");
            let mut e = a.to_vec();
            let sum = exp_shifted_sum(&mut e, 1.5);
            let want: Vec<f64> = a.iter().map(|x| (x - 1.5).exp()).collect();
            assert_eq!(e, want, "exp over {len}");
            assert!((sum - want.iter().sum::<f64>()).abs() <= 1e-12 * (1.0 + sum.abs()), "exp sum over {len}");
        }
    }
}
