//! Raw launches for the CUDA decoding engine (`generate/cuda.rs`): the kernels of
//! `kernels/decode.cu`, megabyte.cu's norm and GELU, and cuBLAS products, on device addresses of
//! buffers the engine owns. Nothing here allocates or synchronises; each call enqueues one
//! kernel on the device's stream, so a sequence of calls can be captured into a CUDA graph
//! ([`Kernels::capture`]) and replayed.

use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys as blas, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::{sys as driver, CudaFunction, CudaGraph, CudaSlice, CudaStream, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Tensor};
use std::sync::Arc;

use super::{function, launch_cfg, suffix, CResult, Image, MAIN};

/// kernels/decode.cu.
const DECODE: Image = Image { name: "megabyte_decode", bytes: include_bytes!(concat!(env!("OUT_DIR"), "/decode.fatbin")) };

/// Head dimensions `dec_attn` is built for.
const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Threads of one `dec_attn` block (DEC_WARPS warps).
const ATTN_THREADS: u32 = 256;

/// The device address of a contiguous tensor's first element (f32, bf16, u32 or f64).
pub(crate) fn address_of(t: &Tensor) -> CResult<u64> {
    super::address_of(t, "decoding buffer")
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

/// cuBLAS workspace of the engine's own handle: set explicitly, so that no product allocates
/// while a graph is being captured.
const BLAS_WORKSPACE: usize = 32 << 20;

/// Where `dec_attn` finds the new position (and `dec_local_in` its position-table row).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Position {
    Fixed(usize),
    /// An i32 in device memory (read when the kernel runs).
    OnDevice(u64),
}

/// The decoding kernels of one activation dtype on one device.
pub(crate) struct Kernels {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    advance: CudaFunction,
    dtype: DType,
    norm: CudaFunction,
    gelu: CudaFunction,
    local_in: CudaFunction,
    patch_in: CudaFunction,
    sample: CudaFunction,
    /// `dec_attn` by head dimension, in HEAD_DIMS order.
    attn: Vec<CudaFunction>,
    /// `dec_gemv` by its row bound, in GEMV_ROWS order.
    gemv: Vec<CudaFunction>,
}

/// Row bounds `dec_gemv` is built for: products of at most 8 rows skip cuBLAS, whose
/// tensor-core tiles read the weights at a fraction of the memory bandwidth at these sizes.
const GEMV_ROWS: [usize; 2] = [2, 8];

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
        let main = |name: &str| function(dev, &MAIN, name);
        let dec = |name: &str| function(dev, &DECODE, name);
        let stream = dev.cuda_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))?;
        let workspace = dev.alloc_zeros::<u8>(BLAS_WORKSPACE)?;
        {
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let (ptr, _guard) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both are fields of Kernels).
            let status = unsafe { blas::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE) };
            if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                candle_core::bail!("cuBLAS: setting the workspace failed: {status:?}");
            }
        }
        Ok(Kernels {
            stream,
            blas,
            _workspace: workspace,
            advance: dec("dec_advance")?,
            dtype,
            norm: main(&format!("norm_fwd_{tn}"))?,
            gelu: main(&format!("gelu_fwd_{tn}"))?,
            local_in: dec(&format!("dec_local_in_{tn}"))?,
            patch_in: dec(&format!("dec_patch_in_{tn}"))?,
            sample: dec(&format!("dec_sample_{tn}"))?,
            attn: HEAD_DIMS.iter().map(|hd| dec(&format!("dec_attn_{tn}_{hd}"))).collect::<CResult<_>>()?,
            gemv: GEMV_ROWS.iter().map(|r| dec(&format!("dec_gemv_{tn}_{r}"))).collect::<CResult<_>>()?,
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
        if !self.gemv(x, w, y, m, n, k, false)? {
            self.blas_linear(x, w, y, m, n, k)?;
        }
        Ok(())
    }

    /// y = GELU(x · Wᵀ) (the MLP's first half), in one kernel where `dec_gemv` applies.
    pub fn linear_gelu(&self, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize) -> CResult<()> {
        if !self.gemv(x, w, y, m, n, k, true)? {
            self.blas_linear(x, w, y, m, n, k)?;
            self.gelu(y, m * n)?;
        }
        Ok(())
    }

    /// `dec_gemv` when it takes the shape (few rows, 16-byte rows and addresses); false if not.
    #[allow(clippy::too_many_arguments)]
    fn gemv(&self, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize, gelu: bool) -> CResult<bool> {
        let Some(i) = GEMV_ROWS.iter().position(|&r| m <= r) else { return Ok(false) };
        if (k * self.dtype.size_in_bytes()) % 16 != 0 || x % 16 != 0 || w % 16 != 0 {
            return Ok(false);
        }
        let (m32, n32, k32, g32) = (m as i32, n as i32, k as i32, gelu as i32);
        go!(self, self.gemv[i], launch_cfg((n.div_ceil(8) as u32, 1), 256, 0), x, w, y, m32, n32, k32, g32);
        Ok(true)
    }

    fn blas_linear(&self, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize) -> CResult<()> {
        let ty = match self.dtype {
            DType::BF16 => blas::cudaDataType::CUDA_R_16BF,
            _ => blas::cudaDataType::CUDA_R_32F,
        };
        let (alpha, beta) = (1f32, 0f32);
        // Column-major: yᵀ [n × m] = (Wᵀ stored k × n)ᵀ · (xᵀ stored k × m).
        // SAFETY: the engine's buffers hold m·k, n·k and m·n elements of this dtype, and the
        // handle is bound to the device's stream, so the product is ordered with the kernels.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
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
    /// [rows, cap, heads·hd] and writes the attention output y [rows, heads·hd], attending to
    /// every cached position or, with `window` Some(W), to the last W (itself included). The
    /// position is `len`, or the i32 at device address `len_dev` when given (the caller checks
    /// it against `cap`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(&self, qkv: u64, kc: u64, vc: u64, cap: usize, len: Position, window: Option<usize>, y: u64, rows: usize, heads: usize, hd: usize) -> CResult<()> {
        let i = HEAD_DIMS.iter().position(|&h| h == hd).ok_or_else(|| candle_core::Error::Msg(format!("decoding attention: no kernel for head dim {hd}")))?;
        let (len_dev, len) = match len {
            Position::Fixed(len) if len >= cap => candle_core::bail!("decoding attention: position {len} is past the cache's {cap}"),
            Position::Fixed(len) => (0u64, len as i32),
            Position::OnDevice(address) => (address, 0),
        };
        let (cap64, h32, scale) = (cap as i64, heads as i32, 1.0 / (hd as f32).sqrt());
        let w32 = window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        go!(self, self.attn[i], launch_cfg(((rows * heads) as u32, 1), ATTN_THREADS, 0), qkv, kc, vc, cap64, len_dev, len, w32, y, h32, scale);
        Ok(())
    }

    /// The local model's input x [rows, d] at one position (see `dec_local_in`): `ctx` rows
    /// `ctx_stride` apart, `prev` the previous bytes [rows] (u32) or None for the pad, and the
    /// position-table row `pos`: Fixed(i) of the table at `pos_table`, or OnDevice(address) for
    /// the row the i32 there names when the kernel runs.
    #[allow(clippy::too_many_arguments)]
    pub fn local_input(&self, ctx: u64, ctx_stride: usize, table: u64, pad: u64, pos_table: u64, pos: Position, prev: Option<u64>, x: u64, rows: usize, d: usize) -> CResult<()> {
        let (stride, prev, r32, d32) = (ctx_stride as i64, prev.unwrap_or(0), rows as i32, d as i32);
        let (row, pos_dev) = match pos {
            Position::Fixed(i) => (pos_table + (i * d * self.dtype().size_in_bytes()) as u64, 0u64),
            Position::OnDevice(address) => (pos_table, address),
        };
        go!(self, self.local_in, launch_cfg((super::elementwise_blocks(rows * d), 1), 256, 0), ctx, stride, table, pad, row, pos_dev, prev, x, r32, d32);
        Ok(())
    }

    /// The global model's input x [rows, p·dg] for one patch of `bytes` [p, rows] (u32,
    /// time-major) whose first byte is at window position state[1] (i32 [2] at `state`).
    #[allow(clippy::too_many_arguments)]
    pub fn patch_input(&self, table: u64, pos: u64, state: u64, bytes: u64, x: u64, rows: usize, p: usize, dg: usize) -> CResult<()> {
        let (r32, p32, dg32) = (rows as i32, p as i32, dg as i32);
        go!(self, self.patch_in, launch_cfg((super::elementwise_blocks(rows * p * dg), 1), 256, 0), table, pos, state, bytes, x, r32, p32, dg32);
        Ok(())
    }

    /// state[0] += 1 (the global position, or with p = 0 the cross-patch local position),
    /// state[1] += p (the next patch's first byte).
    pub fn advance(&self, state: u64, p: usize) -> CResult<()> {
        let p32 = p as i32;
        go!(self, self.advance, launch_cfg((1, 1), 1, 0), state, p32);
        Ok(())
    }

    /// Records the launches `enqueue` makes into a CUDA graph instead of running them.
    pub fn capture(&self, enqueue: impl FnOnce() -> CResult<()>) -> CResult<CudaGraph> {
        self.stream.begin_capture(driver::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
        let recorded = enqueue();
        // End the capture even when a launch failed, so the stream is usable again.
        let graph = self.stream.end_capture(driver::CUgraphInstantiate_flags(0)).w();
        recorded?;
        graph?.ok_or_else(|| candle_core::Error::Msg("CUDA graph capture recorded nothing".into()))
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

    /// Waits for everything enqueued so far.
    pub fn synchronize(&self) -> CResult<()> {
        self.stream.synchronize().w()
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
