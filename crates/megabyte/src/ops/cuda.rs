//! What every op's CUDA launchers share (feature `cuda`): loading the kernels of
//! `kernels/megabyte.cu` (built to a fat binary by build.rs), device addresses of tensors,
//! fresh buffers, strided views, launch configurations. The launchers themselves live in each
//! op's file (its `cuda` module); `decode.rs` holds the decoding engine's.
//!
//! Activations may be f32 or bf16 (`T` in the kernels); norm weights, losses, softmax
//! statistics and optimizer state are f32. Inputs are read in place through their layouts;
//! outputs are fresh contiguous buffers. Everything runs on the tensor's device stream, so
//! ordering with candle's own kernels is kept without synchronising.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, DevicePtr, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};

pub(crate) mod decode;

use super::CResult;

/// A module of our kernels: machine code for the build's GPU plus PTX (build.rs).
pub(super) struct Image {
    name: &'static str,
    bytes: &'static [u8],
}

/// kernels/megabyte.cu.
pub(super) const MAIN: Image = Image { name: "megabyte", bytes: include_bytes!(concat!(env!("OUT_DIR"), "/megabyte.fatbin")) };

/// Kernel `name` of `image` on `dev`'s context. Each module is loaded once per context and
/// kept (candle's own module cache takes PTX text only, which the driver would compile at
/// first use: about 20 s for kernels/megabyte.cu).
pub(super) fn function(dev: &CudaDevice, image: &Image, name: &str) -> CResult<CudaFunction> {
    type Loaded = Vec<(usize, &'static str, Arc<CudaModule>)>;
    static MODULES: OnceLock<Mutex<Loaded>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let key = Arc::as_ptr(&ctx) as usize;
    let mut loaded = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let module = match loaded.iter().find(|(k, n, _)| *k == key && *n == image.name) {
        Some((_, _, m)) => m.clone(),
        None => {
            let m = ctx.load_module(Ptx::from_binary(image.bytes.to_vec())).w()?;
            loaded.push((key, image.name, m.clone()));
            m
        }
    };
    module.load_function(name).w()
}

/// The kernel name suffix of an activation dtype.
pub(super) fn suffix(dtype: DType) -> CResult<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("no CUDA kernel for {other:?} (f32 and bf16 only)"),
    }
}

/// True when the fused CUDA kernels handle tensors of this dtype.
pub(super) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

pub(super) fn launch_cfg(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared }
}

/// Blocks for an elementwise kernel over n elements (grid-stride loops cover the rest).
pub(super) fn elementwise_blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 132 * 16) as u32
}

/// Device address of element `offset` of a storage. The guard cudarc returns is dropped at
/// once, so no stream events are recorded for the launch that uses it: sound because megabyte
/// runs everything on the device's one stream (`gpu::single_stream`); a second stream would
/// need the guards kept across the launch.
pub(super) fn address(s: &CudaStorage, offset: usize) -> CResult<u64> {
    let stream = s.device.cuda_stream();
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::F64(x) => (x.device_ptr(&stream).0, 8),
        CudaStorageSlice::I64(x) => (x.device_ptr(&stream).0, 8),
        _ => candle_core::bail!("megabyte CUDA kernels: unsupported storage dtype {:?}", s.dtype()),
    };
    Ok(base + (offset * size) as u64)
}

/// Address of a layout's first element.
pub(super) fn at(s: &CudaStorage, l: &Layout) -> CResult<u64> {
    address(s, l.start_offset())
}

/// Address of a contiguous layout's first element, or an error naming `what`.
pub(super) fn contiguous_at(s: &CudaStorage, l: &Layout, what: &str) -> CResult<u64> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    at(s, l)
}

/// The norm and GELU kernels move two elements at a time: rows of even width starting on a
/// two-element boundary.
pub(super) fn paired(addresses: &[u64], width: usize, dtype: DType, what: &str) -> CResult<()> {
    let pair = 2 * dtype.size_in_bytes() as u64;
    if width % 2 != 0 || addresses.iter().any(|a| a % pair != 0) {
        candle_core::bail!("{what}: the CUDA kernel needs an even width and element pairs aligned");
    }
    Ok(())
}

/// `what` must have the dtype and element count of the tensor it goes with.
pub(super) fn same(t: &Tensor, dtype: DType, n: usize, what: &str) -> CResult<()> {
    if t.dtype() != dtype || t.elem_count() != n {
        candle_core::bail!("{what}: expected {n} elements of {dtype:?}, got {:?} {:?}", t.dims(), t.dtype());
    }
    Ok(())
}

/// A fresh uninitialised buffer of n elements and its address.
pub(super) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> CResult<(CudaStorage, u64)> {
    // SAFETY: every caller's kernel writes all n elements before anything reads them.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(n.max(1))?),
            DType::BF16 => CudaStorageSlice::BF16(dev.alloc::<half::bf16>(n.max(1))?),
            other => candle_core::bail!("alloc: unsupported dtype {other:?}"),
        }
    };
    let s = CudaStorage { slice, device: dev.clone() };
    let p = address(&s, 0)?;
    Ok((s, p))
}

/// A tensor (outside any graph) over a storage a kernel wrote.
pub(super) fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// The CUDA device a tensor lives on.
pub(super) fn cuda_device(t: &Tensor) -> CResult<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// Device address of a contiguous CUDA tensor's first element, or an error naming `what`.
/// The read lock is released at once: sound on megabyte's one stream (see `address`).
pub(super) fn address_of(t: &Tensor, what: &str) -> CResult<u64> {
    with_cuda(t, |s, l| contiguous_at(s, l, what))
}

/// Runs `f` on a tensor's CUDA storage and layout under its read lock.
pub(super) fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> CResult<R>) -> CResult<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => f(c, l),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// Element strides (n, s) of a rank-3 view; the kernels take it by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct View {
    pub sn: i64,
    pub ss: i64,
}

// SAFETY: two i64s, laid out as the kernels' `struct View`.
unsafe impl DeviceRepr for View {}

/// The strides of a rank-3 layout whose last dimension is contiguous.
pub(super) fn view(l: &Layout, what: &str) -> CResult<View> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 3 || (stride[2] != 1 && dims[2] > 1) {
        candle_core::bail!("{what}: expected a rank-3 view with a contiguous last dim, got {dims:?} {stride:?}");
    }
    Ok(View { sn: stride[0] as i64, ss: stride[1] as i64 })
}

/// Launches kernel `$name` of kernels/megabyte.cu on device `$dev` with config `$cfg` and the
/// given arguments (variables: the launch borrows them), returning early on a launch error.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let func = $crate::ops::cuda::function($dev, &$crate::ops::cuda::MAIN, &$name)?;
        let stream = $dev.cuda_stream();
        let mut args = stream.launch_builder(&func);
        $( candle_core::cuda_backend::cudarc::driver::PushKernelArg::arg(&mut args, &$arg); )*
        // SAFETY: the argument lists match the kernel signatures in kernels/*.cuh, and the
        // callers check shapes and sizes.
        candle_core::cuda_backend::WrapErr::w(unsafe { args.launch($cfg) })?;
    }};
}
pub(super) use launch;
