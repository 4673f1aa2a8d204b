//! Raw launches for the CUDA decoding engine (`generate/cuda.rs`): the kernels of
//! `kernels/decode.cu`, megabyte.cu's norm and GELU, and cuBLAS products, on device addresses of
//! buffers the engine owns. Nothing here allocates or synchronises; each call enqueues one
//! kernel on the device's stream. The functions are looked up once, so a launch costs the
//! driver call and little else.

use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys as blas};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Tensor};
use std::sync::Arc;

use super::{launch_cfg, suffix, with_cuda, CResult, PTX};

const PTX_DECODE: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

/// Head dimensions `dec_attn` is built for.
const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Threads of one `dec_attn` block (DEC_WARPS warps).
const ATTN_THREADS: u32 = 256;

/// The device address of a contiguous tensor's first element (f32, bf16 or u32).
pub(crate) fn address_of(t: &Tensor) -> CResult<u64> {
    with_cuda(t, |s, l| super::contiguous_at(s, l, "decoding buffer"))
}

/// True when `dec_attn` takes this head dimension.
pub(crate) fn head_dim_supported(hd: usize) -> bool {
    HEAD_DIMS.contains(&hd)
}

/// How the sampling kernel chooses a byte (generate.rs's `Sampling`, flattened).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SampleRule {
    /// 0 greedy, 1 temperature, 2 top-k, 3 top-p.
    pub mode: i32,
    pub temperature: f64,
    pub top_k: i32,
    pub top_p: f64,
}

/// The decoding kernels of one activation dtype on one device.
pub(crate) struct Kernels {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    dtype: DType,
    norm: CudaFunction,
    gelu: CudaFunction,
    local_in: CudaFunction,
    patch_in: CudaFunction,
    sample: CudaFunction,
    /// `dec_attn` by head dimension, in HEAD_DIMS order.
    attn: Vec<CudaFunction>,
}

/// Enqueues `$func` with the given arguments (variables: the launch borrows them).
macro_rules! go {
    ($k:expr, $func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut args = $k.stream.launch_builder(&$func);
        $( args.arg(&$arg); )*
        // SAFETY: the argument lists match the kernel signatures, and the engine passes
        // addresses of live buffers of the sizes each kernel reads and writes.
        unsafe { args.launch($cfg) }.w()?;
    }};
}

impl Kernels {
    pub fn new(dev: &CudaDevice, dtype: DType) -> CResult<Self> {
        let tn = suffix(dtype)?;
        let main = |name: &str| Ok::<_, candle_core::Error>(dev.get_or_load_custom_func(name, "megabyte", PTX)?.into_cuda_function());
        let dec = |name: &str| Ok::<_, candle_core::Error>(dev.get_or_load_custom_func(name, "megabyte_decode", PTX_DECODE)?.into_cuda_function());
        Ok(Kernels {
            dev: dev.clone(),
            stream: dev.cuda_stream(),
            dtype,
            norm: main(&format!("norm_fwd_{tn}"))?,
            gelu: main(&format!("gelu_fwd_{tn}"))?,
            local_in: dec(&format!("dec_local_in_{tn}"))?,
            patch_in: dec(&format!("dec_patch_in_{tn}"))?,
            sample: dec(&format!("dec_sample_{tn}"))?,
            attn: HEAD_DIMS.iter().map(|hd| dec(&format!("dec_attn_{tn}_{hd}"))).collect::<CResult<_>>()?,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// y = norm(x + a) for rows of width d, with x ← x + a in place when `a` is given.
    /// Weight and bias are f32; d is even (the kernel moves element pairs).
    #[allow(clippy::too_many_arguments)]
    pub fn norm(&self, x: u64, a: Option<u64>, w: u64, b: Option<u64>, y: u64, rows: usize, d: usize, eps: f32) -> CResult<()> {
        let (a, b) = (a.unwrap_or(0), b.unwrap_or(0));
        let (rows32, d32) = (rows as i32, d as i32);
        go!(self, self.norm, launch_cfg((rows.div_ceil(8) as u32, 1), 256, 0), x, a, x, w, b, y, rows32, d32, eps);
        Ok(())
    }

    /// x ← GELU(x) over n elements (n even).
    pub fn gelu(&self, x: u64, n: usize) -> CResult<()> {
        let n64 = n as u64;
        go!(self, self.gelu, launch_cfg((super::elementwise_blocks(n / 2), 1), 256, 0), x, x, n64);
        Ok(())
    }

    /// y [m, n] = x [m, k] · Wᵀ for W [n, k], all row-major in the activations' dtype, f32
    /// accumulation (as candle's matmul).
    pub fn linear(&self, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize) -> CResult<()> {
        let ty = match self.dtype {
            DType::BF16 => blas::cudaDataType::CUDA_R_16BF,
            _ => blas::cudaDataType::CUDA_R_32F,
        };
        let (alpha, beta) = (1f32, 0f32);
        let handle = self.dev.cublas_handle();
        // Column-major: yᵀ [n × m] = (Wᵀ stored k × n)ᵀ · (xᵀ stored k × m).
        // SAFETY: the engine's buffers hold m·k, n·k and m·n elements of this dtype, and the
        // handle is bound to the device's stream, so the product is ordered with the kernels.
        unsafe {
            gemm_ex(
                *handle.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                ty,
                k as i32,
                x as *const _,
                ty,
                k as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                ty,
                n as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))?;
        }
        Ok(())
    }

    /// Appends the key and value of qkv [rows, 3·heads·hd] at position `len` of the caches
    /// [rows, cap, heads·hd] and writes the attention output y [rows, heads·hd].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(&self, qkv: u64, kc: u64, vc: u64, cap: usize, len: usize, y: u64, rows: usize, heads: usize, hd: usize) -> CResult<()> {
        let i = HEAD_DIMS.iter().position(|&h| h == hd).ok_or_else(|| candle_core::Error::Msg(format!("decoding attention: no kernel for head dim {hd}")))?;
        if len >= cap {
            candle_core::bail!("decoding attention: position {len} is past the cache's {cap}");
        }
        let (cap64, len32, h32, scale) = (cap as i64, len as i32, heads as i32, 1.0 / (hd as f32).sqrt());
        go!(self, self.attn[i], launch_cfg(((rows * heads) as u32, 1), ATTN_THREADS, 0), qkv, kc, vc, cap64, len32, y, h32, scale);
        Ok(())
    }

    /// The local model's input x [rows, d] at one position (see `dec_local_in`): `ctx` rows
    /// `ctx_stride` apart, `prev` the previous bytes [rows] (u32) or None for the pad.
    #[allow(clippy::too_many_arguments)]
    pub fn local_input(&self, ctx: u64, ctx_stride: usize, table: u64, pad: u64, pos: u64, prev: Option<u64>, x: u64, rows: usize, d: usize) -> CResult<()> {
        let (stride, prev, r32, d32) = (ctx_stride as i64, prev.unwrap_or(0), rows as i32, d as i32);
        go!(self, self.local_in, launch_cfg((super::elementwise_blocks(rows * d), 1), 256, 0), ctx, stride, table, pad, pos, prev, x, r32, d32);
        Ok(())
    }

    /// The global model's input x [rows, p·dg] for one patch of `bytes` [p, rows] (u32,
    /// time-major), `pos` pointing at the position table row of its first byte.
    #[allow(clippy::too_many_arguments)]
    pub fn patch_input(&self, table: u64, pos: u64, bytes: u64, x: u64, rows: usize, p: usize, dg: usize) -> CResult<()> {
        let (r32, p32, dg32) = (rows as i32, p as i32, dg as i32);
        go!(self, self.patch_in, launch_cfg((super::elementwise_blocks(rows * p * dg), 1), 256, 0), table, pos, bytes, x, r32, p32, dg32);
        Ok(())
    }

    /// out[b] (u32) = the byte chosen from logits [rows, 256] by `rule`, with the uniform
    /// draws u [rows] (f64; unread when greedy).
    pub fn sample(&self, logits: u64, out: u64, u: u64, rows: usize, rule: SampleRule) -> CResult<()> {
        let SampleRule { mode, temperature, top_k, top_p } = rule;
        go!(self, self.sample, launch_cfg((rows as u32, 1), 256, 0), logits, out, u, mode, temperature, top_k, top_p);
        Ok(())
    }

    /// Copies `n` u32 from device address `src` to the host, waiting for everything enqueued
    /// before (the only synchronisation of a decoding step).
    pub fn read_u32(&self, src: u64, n: usize) -> CResult<Vec<u32>> {
        use candle_core::cuda_backend::cudarc::driver::result;
        let mut host = vec![0u32; n];
        // SAFETY: `src` addresses n u32 of a live engine buffer; the copy is ordered after the
        // kernels that wrote it, and the stream is synchronised before `host` is read.
        unsafe {
            result::memcpy_dtoh_async(&mut host, src, self.stream.cu_stream()).w()?;
        }
        self.stream.synchronize().w()?;
        Ok(host)
    }

    /// Copies `bytes` bytes between device addresses, in stream order.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> CResult<()> {
        use candle_core::cuda_backend::cudarc::driver::result;
        // SAFETY: both addresses cover `bytes` bytes of live buffers that do not overlap.
        unsafe {
            result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()).w()?;
        }
        Ok(())
    }

    /// Copies host values to device address `dst` (ordered after the kernels enqueued before).
    pub fn write<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(&self, dst: u64, values: &[T]) -> CResult<()> {
        use candle_core::cuda_backend::cudarc::driver::result;
        // SAFETY: `dst` addresses at least values.len() elements of a live engine buffer. A
        // copy from pageable memory is staged before the call returns, so `values` may go.
        unsafe {
            result::memcpy_htod_async(dst, values, self.stream.cu_stream()).w()?;
        }
        Ok(())
    }
}
