//! Launchers for the CUDA kernels of `kernels/megabyte.cu` (built to a fat binary by build.rs).
//!
//! Activations may be f32 or bf16 (`T` in the kernels); norm weights, losses, softmax
//! statistics and optimizer state are f32. Inputs are read in place through their layouts;
//! outputs are fresh contiguous buffers. Everything runs on the tensor's device stream, so
//! ordering with candle's own kernels is kept without synchronising.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};

pub(crate) mod decode;

type CResult<T> = candle_core::Result<T>;

/// A module of our kernels: machine code for the build's GPU plus PTX (build.rs).
pub(super) struct Image {
    name: &'static str,
    bytes: &'static [u8],
}

/// kernels/megabyte.cu.
const MAIN: Image = Image { name: "megabyte", bytes: include_bytes!(concat!(env!("OUT_DIR"), "/megabyte.fatbin")) };

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

/// Head dimensions the attention kernels are built for.
pub(super) const HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Threads (= rows) of one block of the small attention kernels: a group of S positions fits
/// in one block when S ≤ this (kernels/megabyte.cu, SMALL_R and SMALL_RB).
fn small_rows(hd: usize, backward: bool) -> usize {
    let budget = if backward { 2048 } else { 4096 };
    (budget / hd).min(128)
}

/// One warp per (sequence, head) for sequences of at most 8 positions (WARP_S) with head dim
/// 32 or 64: the local model's patches. At head dim 64 each lane reads element pairs.
fn warp_kernel(s: usize, hd: usize, addresses: &[u64], views: &[View], dtype: DType) -> bool {
    let pairs_ok = hd == 32 || aligned(addresses, views, 2 * dtype.size_in_bytes(), dtype);
    s <= 8 && matches!(hd, 32 | 64) && pairs_ok
}

/// Every address and row stride is a multiple of `bytes` (the kernels' load width): the small
/// and tensor-core attention kernels move rows 16 bytes at a time, the warp kernel pairs.
fn aligned(addresses: &[u64], views: &[View], bytes: usize, dtype: DType) -> bool {
    let elems = (bytes / dtype.size_in_bytes()).max(1) as i64;
    addresses.iter().all(|a| a % bytes as u64 == 0) && views.iter().all(|v| v.sn % elems == 0 && v.ss % elems == 0)
}

/// The flash kernels put the (sequence, head) pairs on the grid's y axis,
/// which CUDA caps at 65,535.
fn grid_y(pairs: usize) -> CResult<u32> {
    if pairs > 65_535 {
        candle_core::bail!("attention: {pairs} (sequence, head) pairs exceed the 65,535 this kernel's grid takes; use a smaller batch");
    }
    Ok(pairs as u32)
}

/// The tensor-core kernels' grid: (sequence, head) pairs on x, blocks of TC_ROWS rows on y
/// (the kernels order the row blocks longest first).
fn tc_grid(pairs: usize, rows: usize) -> CResult<(u32, u32)> {
    let blocks = rows.div_ceil(TC_ROWS);
    if pairs > i32::MAX as usize || blocks > 65_535 {
        candle_core::bail!("attention: {pairs} (sequence, head) pairs of {rows} rows exceed this kernel's grid");
    }
    Ok((pairs as u32, blocks as u32))
}

/// Queries (and keys) per block of the flash kernels (BQ in the kernels).
const BQ: usize = 64;

/// Rows per block of the tensor-core kernels (TC_ROWS).
const TC_ROWS: usize = 64;

fn suffix(dtype: DType) -> CResult<&'static str> {
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

fn launch_cfg(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared }
}

/// Blocks for an elementwise kernel over n elements (grid-stride loops cover the rest).
fn elementwise_blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 132 * 16) as u32
}

/// Device address of element `offset` of a storage. The guard cudarc returns is dropped at
/// once, so no stream events are recorded for the launch that uses it: sound because megabyte
/// runs everything on the device's one stream (`gpu::single_stream`); a second stream would
/// need the guards kept across the launch.
fn address(s: &CudaStorage, offset: usize) -> CResult<u64> {
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
fn at(s: &CudaStorage, l: &Layout) -> CResult<u64> {
    address(s, l.start_offset())
}

/// Address of a contiguous layout's first element, or an error naming `what`.
fn contiguous_at(s: &CudaStorage, l: &Layout, what: &str) -> CResult<u64> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    at(s, l)
}

/// The norm and GELU kernels move two elements at a time: rows of even width starting on a
/// two-element boundary.
fn paired(addresses: &[u64], width: usize, dtype: DType, what: &str) -> CResult<()> {
    let pair = 2 * dtype.size_in_bytes() as u64;
    if width % 2 != 0 || addresses.iter().any(|a| a % pair != 0) {
        candle_core::bail!("{what}: the CUDA kernel needs an even width and element pairs aligned");
    }
    Ok(())
}

/// `what` must have the dtype and element count of the tensor it goes with.
fn same(t: &Tensor, dtype: DType, n: usize, what: &str) -> CResult<()> {
    if t.dtype() != dtype || t.elem_count() != n {
        candle_core::bail!("{what}: expected {n} elements of {dtype:?}, got {:?} {:?}", t.dims(), t.dtype());
    }
    Ok(())
}

/// A fresh uninitialised buffer of n elements and its address.
fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> CResult<(CudaStorage, u64)> {
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

fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// The CUDA device a tensor lives on.
fn cuda_device(t: &Tensor) -> CResult<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// Device address of a contiguous CUDA tensor's first element, or an error naming `what`.
/// The read lock is released at once: sound on megabyte's one stream (see `address`).
fn address_of(t: &Tensor, what: &str) -> CResult<u64> {
    with_cuda(t, |s, l| contiguous_at(s, l, what))
}

/// Runs `f` on a tensor's CUDA storage and layout under its read lock.
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> CResult<R>) -> CResult<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => f(c, l),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// Launches kernel `$name` of kernels/megabyte.cu with config `$cfg` and the given arguments
/// (variables: the launch borrows them), returning early on a launch error.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let func = function($dev, &MAIN, &$name)?;
        let stream = $dev.cuda_stream();
        let mut args = stream.launch_builder(&func);
        $( args.arg(&$arg); )*
        // SAFETY: the argument lists match the kernel signatures in kernels/megabyte.cu, and
        // the callers check shapes and sizes.
        unsafe { args.launch($cfg) }.w()?;
    }};
}

// ---------------------------------------------------------------------------------------------
// Norms.

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

// ---------------------------------------------------------------------------------------------
// Embedding.

/// table [v, d] (T) at u32 ids [rows] → [rows, d].
pub(super) fn embed_fwd(table: (&CudaStorage, &Layout), ids: (&CudaStorage, &Layout)) -> CResult<(CudaStorage, Shape)> {
    let dev = &table.0.device;
    let (_, d) = table.1.shape().dims2()?;
    let rows = ids.1.shape().elem_count();
    let (pt, pi) = (contiguous_at(table.0, table.1, "embedding table")?, contiguous_at(ids.0, ids.1, "embedding ids")?);
    let (out, po) = alloc(dev, table.0.dtype(), rows * d)?;
    let (r32, d32) = (rows as i32, d as i32);
    launch!(dev, format!("embed_fwd_{}", suffix(table.0.dtype())?), launch_cfg((elementwise_blocks(rows * d), 1), 256, 0), pt, pi, po, r32, d32);
    Ok((out, Shape::from((rows, d))))
}

/// The f32 gradient [v, d] of an embedding table from dy [rows, d] (T) and the ids.
pub(super) fn embed_bwd(dy: &Tensor, ids: &Tensor, v: usize) -> CResult<Tensor> {
    let dy = dy.contiguous()?;
    let (rows, d) = dy.dims2()?;
    let dev = cuda_device(&dy)?;
    let dtable = Tensor::zeros((v, d), DType::F32, dy.device())?;
    const COLS: usize = 32;
    let rows_per_block = 2048;
    let grid = (d.div_ceil(COLS) as u32, rows.div_ceil(rows_per_block).max(1) as u32);
    with_cuda(&dy, |gs, gl| {
        with_cuda(ids, |is, il| {
            with_cuda(&dtable, |ts, tl| {
                let (pg, pi, pt) = (contiguous_at(gs, gl, "dy")?, contiguous_at(is, il, "ids")?, contiguous_at(ts, tl, "dtable")?);
                let (r32, v32, d32, rpb) = (rows as i32, v as i32, d as i32, rows_per_block as i32);
                launch!(&dev, format!("embed_bwd_{}", suffix(dy.dtype())?), launch_cfg(grid, 256, (v * COLS * 4) as u32), pg, pi, pt, r32, v32, d32, rpb);
                Ok(())
            })
        })
    })?;
    Ok(dtable)
}

// ---------------------------------------------------------------------------------------------
// Dropout.

/// x (T, contiguous) with element i kept by ops::dropout_keeps(key, base + i) and scaled.
pub(super) fn dropout(x: (&CudaStorage, &Layout), base: u64, key: u64, threshold: u32, scale: f32) -> CResult<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let n = x.1.shape().elem_count();
    let px = contiguous_at(x.0, x.1, "dropout x")?;
    let (out, py) = alloc(dev, x.0.dtype(), n)?;
    let n64 = n as u64;
    launch!(dev, format!("dropout_{}", suffix(x.0.dtype())?), launch_cfg((elementwise_blocks(n), 1), 256, 0), px, py, n64, base, key, threshold, scale);
    Ok((out, x.1.shape().clone()))
}

// ---------------------------------------------------------------------------------------------
// GELU.

pub(super) fn gelu_fwd(x: (&CudaStorage, &Layout)) -> CResult<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let n = x.1.shape().elem_count();
    let px = contiguous_at(x.0, x.1, "gelu x")?;
    paired(&[px], n, x.0.dtype(), "gelu")?;
    let (out, py) = alloc(dev, x.0.dtype(), n)?;
    let n64 = n as u64;
    launch!(dev, format!("gelu_fwd_{}", suffix(x.0.dtype())?), launch_cfg((elementwise_blocks(n / 2), 1), 256, 0), px, py, n64);
    Ok((out, x.1.shape().clone()))
}

pub(super) fn gelu_bwd(x: (&CudaStorage, &Layout), dy: (&CudaStorage, &Layout)) -> CResult<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let n = x.1.shape().elem_count();
    let (px, pg) = (contiguous_at(x.0, x.1, "gelu x")?, contiguous_at(dy.0, dy.1, "gelu dy")?);
    if dy.0.dtype() != x.0.dtype() || dy.1.shape().elem_count() != n {
        candle_core::bail!("gelu backward: dy must match x");
    }
    paired(&[px, pg], n, x.0.dtype(), "gelu backward")?;
    let (out, pdx) = alloc(dev, x.0.dtype(), n)?;
    let n64 = n as u64;
    launch!(dev, format!("gelu_bwd_{}", suffix(x.0.dtype())?), launch_cfg((elementwise_blocks(n / 2), 1), 256, 0), px, pg, pdx, n64);
    Ok((out, x.1.shape().clone()))
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// f32 losses [rows] of logits [rows, v] (T) against u32 targets.
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

// ---------------------------------------------------------------------------------------------
// AdamW.

/// Elements per chunk of the multi-tensor kernels: one block each.
const CHUNK: usize = 1 << 15;

/// (offset, length) of the CHUNK-element pieces of n elements, in order.
fn chunks(n: usize) -> impl Iterator<Item = (u64, u64)> {
    (0..n).step_by(CHUNK).map(move |start| (start as u64, CHUNK.min(n - start) as u64))
}

/// A table of chunk records (each `words` u64 long) uploaded for one launch; the returned
/// tensor must live until the kernel ran (stream-ordered frees make dropping it afterwards
/// safe).
fn chunk_table(records: Vec<u64>, dev: &candle_core::Device) -> CResult<(Tensor, u64)> {
    let n = records.len();
    let table = Tensor::from_vec(records.into_iter().map(|w| w as i64).collect::<Vec<_>>(), n, dev)?;
    let address = address_of(&table, "chunk table")?;
    Ok((table, address))
}

/// One AdamW update in place for many parameters, in one launch: (w, g, mv = [m | v], weight
/// decay) per parameter, all f32. With `clip` = (Σ g² over all parameters [1], max norm) the
/// kernel computes the clipping factor itself (hp.grad_scale is then ignored; hp.weight_decay
/// is unused, each parameter brings its own).
pub(super) fn adamw_many(items: &[(&Tensor, &Tensor, &Tensor, f64)], hp: &super::AdamWStep, clip: Option<(&Tensor, f64)>) -> CResult<()> {
    let Some(first) = items.first() else { return Ok(()) };
    let dev = cuda_device(first.0)?;
    let f = |x: f64| x as f32;
    let mut records = Vec::new();
    let mut grads = Vec::with_capacity(items.len()); // contiguous copies, alive until the launch
    for &(w, g, mv, weight_decay) in items {
        let n = w.elem_count();
        if w.dtype() != DType::F32 || g.dtype() != DType::F32 || mv.dtype() != DType::F32 || g.elem_count() != n || mv.elem_count() != 2 * n {
            candle_core::bail!("adamw: weights, gradient and moments must be f32 of matching sizes");
        }
        let g = g.contiguous()?;
        // The kernel writes w and the moments in place: plain buffers that only the optimizer
        // updates, between steps, on this stream.
        let pw = address_of(w, "adamw weight")?;
        let pg = address_of(&g, "adamw gradient")?;
        let pm = address_of(mv, "adamw moments")?;
        let pv = pm + 4 * n as u64;
        let decay = f(1.0 - hp.lr * weight_decay).to_bits() as u64;
        for (start, len) in chunks(n) {
            let off = 4 * start; // bytes
            records.extend([pw + off, pg + off, pm + off, pv + off, len, decay]);
        }
        grads.push(g);
    }
    let blocks = (records.len() / 6) as u32;
    if blocks == 0 {
        return Ok(()); // only empty parameters
    }
    let (table, ptable) = chunk_table(records, first.0.device())?;
    let (lr, b1, b2, eps, scale) = (f(hp.lr), f(hp.beta1), f(hp.beta2), f(hp.eps), f(hp.grad_scale));
    let (inv_bc1, inv_bc2) = (f(1.0 / hp.bc1), f(1.0 / hp.bc2));
    let (psum, max_norm) = match clip {
        Some((sumsq, max_norm)) => (address_of(sumsq, "sumsq")?, max_norm as f32),
        None => (0u64, 0f32),
    };
    launch!(&dev, "adamw_chunks_f32", launch_cfg((blocks, 1), 256, 0), ptable, lr, b1, b2, eps, inv_bc1, inv_bc2, scale, psum, max_norm);
    drop((table, grads));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// Element strides (n, s) of a rank-3 view; the kernels take it by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct View {
    sn: i64,
    ss: i64,
}

// SAFETY: two i64s, laid out as the kernels' `struct View`.
unsafe impl DeviceRepr for View {}

fn view(l: &Layout, what: &str) -> CResult<View> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.len() != 3 || (stride[2] != 1 && dims[2] > 1) {
        candle_core::bail!("{what}: expected a rank-3 view with a contiguous last dim, got {dims:?} {stride:?}");
    }
    Ok(View { sn: stride[0] as i64, ss: stride[1] as i64 })
}

/// Shapes of one attention call: q [n, sq, d], k and v [n, sk, d], `heads` heads of hd.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub n: usize,
    pub sq: usize,
    pub sk: usize,
    pub heads: usize,
    pub hd: usize,
    /// Sliding window (positions a query sees, itself included); 0: full causal.
    pub window: usize,
}

impl Dims {
    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// True when the CUDA attention kernels take this head dimension.
pub(super) fn attention_supported(hd: usize) -> bool {
    HEAD_DIMS.contains(&hd)
}

/// True when self-attention over S positions with a sliding window runs fused: the tensor-core
/// kernels take a window, so bf16 and S past the small kernels' sizes (forward and backward).
pub(super) fn window_supported(dtype: DType, s: usize, hd: usize) -> bool {
    dtype == DType::BF16 && attention_supported(hd) && s > small_rows(hd, false).max(small_rows(hd, true))
}

/// The `_win` kernel name suffix and the window argument of the tensor-core kernels.
fn tc_window(dims: &Dims) -> (&'static str, i32) {
    if dims.window > 0 {
        ("_win", dims.window.min(i32::MAX as usize) as i32)
    } else {
        ("", 0)
    }
}

fn no_window(dims: &Dims, kernel: &str) -> CResult<()> {
    if dims.window > 0 {
        candle_core::bail!("attention: a sliding window runs on the tensor-core kernels only (bf16, 16-byte rows), not the {kernel} kernel");
    }
    Ok(())
}

/// Causal attention forward: y [n, sq, heads·hd] (T) and, when `with_lse` (a backward will
/// follow), the f32 row log Σ exp [n, heads, sq]. q, k, v are (storage, element offset, view).
fn attention_fwd(q: (&CudaStorage, u64, View), k: (u64, View), v: (u64, View), dims: Dims, with_lse: bool) -> CResult<(CudaStorage, Option<CudaStorage>)> {
    let dev = &q.0.device;
    let dtype = q.0.dtype();
    let (n, sq, sk, h, hd) = (dims.n, dims.sq, dims.sk, dims.heads, dims.hd);
    let (y, py) = alloc(dev, dtype, n * sq * h * hd)?;
    let (lse, plse) = match with_lse {
        true => alloc(dev, DType::F32, n * h * sq).map(|(s, p)| (Some(s), p))?,
        false => (None, 0), // the kernels skip a null lse
    };
    let (n32, sq32, sk32, h32, scale) = (n as i32, sq as i32, sk as i32, h as i32, dims.scale());
    let rows = small_rows(hd, false);
    let s = sq.max(sk);
    if dtype == DType::BF16 && s > rows && aligned(&[q.1, k.0, v.0], &[q.2, k.1, v.1], 16, dtype) {
        let (win, w32) = tc_window(&dims);
        launch!(dev, format!("attn_tc_fwd{win}_{hd}"), launch_cfg(tc_grid(n * h, sq)?, 128, 0), q.1, q.2, k.0, k.1, v.0, v.1, py, plse, n32, sq32, sk32, h32, scale, w32);
        return Ok((y, lse));
    }
    no_window(&dims, "small or flash")?;
    let (name, cfg) = if warp_kernel(s, hd, &[q.1, k.0, v.0], &[q.2, k.1, v.1], dtype) {
        (format!("attn_warp_fwd_{}_{hd}", suffix(dtype)?), launch_cfg(((n * h).div_ceil(4) as u32, 1), 128, 0))
    } else if s <= rows {
        if !aligned(&[q.1, k.0, v.0], &[q.2, k.1, v.1], 16, dtype) {
            candle_core::bail!("attention: rows must start on 16-byte boundaries");
        }
        let groups_per_block = rows / s;
        let shared = 2 * groups_per_block * (sk * hd + 4) * 4;
        (format!("attn_small_fwd_{}_{hd}", suffix(dtype)?), launch_cfg(((n * h).div_ceil(groups_per_block) as u32, 1), rows as u32, shared as u32))
    } else {
        (format!("attn_flash_fwd_{}_{hd}", suffix(dtype)?), launch_cfg((sq.div_ceil(BQ) as u32, grid_y(n * h)?), BQ as u32, 0))
    };
    launch!(dev, name, cfg, q.1, q.2, k.0, k.1, v.0, v.1, py, plse, n32, sq32, sk32, h32, scale);
    Ok((y, lse))
}

/// The views of q, k and v inside a fused qkv [N, S, 3D] layout.
fn qkv_views(s: &CudaStorage, l: &Layout, heads: usize, window: Option<usize>) -> CResult<(Dims, [(u64, View); 3])> {
    let dims = l.dims();
    if dims.len() != 3 || dims[2] % 3 != 0 || (dims[2] / 3) % heads != 0 {
        candle_core::bail!("attention: qkv {dims:?} is not [N, S, 3·heads·hd]");
    }
    let d = dims[2] / 3;
    let vw = view(l, "qkv")?;
    let base = at(s, l)?;
    let esize = s.dtype().size_in_bytes() as u64;
    let col = |c: usize| (base + (c * d) as u64 * esize, vw);
    Ok((Dims { n: dims[0], sq: dims[1], sk: dims[1], heads, hd: d / heads, window: window.unwrap_or(0) }, [col(0), col(1), col(2)]))
}

/// Self-attention forward on a fused qkv: (y, lse).
pub(super) fn self_attention_fwd(s: &CudaStorage, l: &Layout, heads: usize, window: Option<usize>) -> CResult<(CudaStorage, Shape, Tensor)> {
    let (dims, [q, k, v]) = qkv_views(s, l, heads, window)?;
    let (y, lse) = attention_fwd((s, q.0, q.1), k, v, dims, true)?;
    let lse = tensor(lse.expect("asked for"), (dims.n, dims.heads, dims.sq));
    Ok((y, Shape::from((dims.n, dims.sq, dims.heads * dims.hd)), lse))
}

/// Cached-decoding attention forward: q [N, Sq, D], k, v [N, Sk, D] (any views with a
/// contiguous last dim).
pub(super) fn attention_fwd3(q: (&CudaStorage, &Layout), k: (&CudaStorage, &Layout), v: (&CudaStorage, &Layout), heads: usize) -> CResult<(CudaStorage, Shape)> {
    let (qd, kd) = (q.1.dims(), k.1.dims());
    let dtypes_differ = k.0.dtype() != q.0.dtype() || v.0.dtype() != q.0.dtype();
    if dtypes_differ || qd.len() != 3 || kd.len() != 3 || v.1.dims() != kd || qd[0] != kd[0] || qd[2] != kd[2] || kd[1] < qd[1] || qd[2] % heads != 0 {
        candle_core::bail!("attention: incompatible shapes q {qd:?} k {kd:?} v {:?}", v.1.dims());
    }
    let dims = Dims { n: qd[0], sq: qd[1], sk: kd[1], heads, hd: qd[2] / heads, window: 0 };
    let (y, _lse) = attention_fwd(
        (q.0, at(q.0, q.1)?, view(q.1, "q")?),
        (at(k.0, k.1)?, view(k.1, "k")?),
        (at(v.0, v.1)?, view(v.1, "v")?),
        dims,
        false,
    )?;
    Ok((y, Shape::from((dims.n, dims.sq, dims.heads * dims.hd))))
}

/// d(qkv) [N, S, 3D] (contiguous) of self-attention, from qkv, the forward's y and lse, and dy.
pub(super) fn self_attention_bwd(qkv: &Tensor, y: &Tensor, dy: &Tensor, lse: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    let dy = dy.contiguous()?;
    let dev = cuda_device(qkv)?;
    let dtype = qkv.dtype();
    if dy.dtype() != dtype || y.dtype() != dtype {
        candle_core::bail!("attention backward: dtypes of qkv, y and dy differ");
    }
    let (n, s, d3) = qkv.dims3()?;
    let (out, pout) = alloc(&dev, dtype, n * s * d3)?;
    let d = d3 / 3;
    let esize = dtype.size_in_bytes() as u64;
    let ov = View { sn: (s * d3) as i64, ss: d3 as i64 };
    let (dq, dk, dv) = ((pout, ov), (pout + d as u64 * esize, ov), (pout + 2 * d as u64 * esize, ov));
    with_cuda(qkv, |qs, ql| {
        let (dims, [q, k, v]) = qkv_views(qs, ql, heads, window)?;
        with_cuda(y, |ys, yl| {
            with_cuda(&dy, |gs, gl| {
                let (py, pg) = (contiguous_at(ys, yl, "y")?, contiguous_at(gs, gl, "dy")?);
                let (n32, s32, h32, scale) = (dims.n as i32, dims.sq as i32, dims.heads as i32, dims.scale());
                let hd = dims.hd;
                let rows = small_rows(hd, true);
                let tn = suffix(dtype)?;
                let tc = dtype == DType::BF16 && s > rows && aligned(&[q.0, k.0, v.0, py, pg, dq.0, dk.0, dv.0], &[q.1, k.1, v.1, ov], 16, dtype);
                if !tc {
                    no_window(&dims, "warp, small or flash")?;
                }
                if warp_kernel(s, hd, &[q.0, k.0, v.0, py, pg, dq.0, dk.0, dv.0], &[q.1, k.1, v.1, ov], dtype) {
                    let cfg = launch_cfg(((n * heads).div_ceil(4) as u32, 1), 128, 0);
                    launch!(&dev, format!("attn_warp_bwd_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, py, pg, dq.0, dq.1, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale);
                    return Ok(());
                }
                if s <= rows {
                    if !aligned(&[q.0, k.0, v.0, py, pg, dq.0, dk.0, dv.0], &[q.1, k.1, v.1, ov], 16, dtype) {
                        candle_core::bail!("attention backward: rows must start on 16-byte boundaries");
                    }
                    let groups_per_block = rows / s;
                    let shared = (4 * groups_per_block * (s * hd + 4) + 2 * rows) * 4;
                    let cfg = launch_cfg(((n * heads).div_ceil(groups_per_block) as u32, 1), rows as u32, shared as u32);
                    launch!(&dev, format!("attn_small_bwd_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, py, pg, dq.0, dq.1, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale);
                    return Ok(());
                }
                let lse = lse.contiguous()?;
                let (dbuf, pdbuf) = alloc(&dev, DType::F32, n * heads * s)?;
                with_cuda(&lse, |ls, ll| {
                    let plse = contiguous_at(ls, ll, "lse")?;
                    if tc {
                        let hd32 = hd as i32;
                        let warps = n * s * heads;
                        launch!(&dev, format!("attn_bwd_prep_{tn}"), launch_cfg((warps.div_ceil(8) as u32, 1), 256, 0), py, pg, pdbuf, n32, s32, h32, hd32);
                        let cfg = launch_cfg(tc_grid(n * heads, s)?, 128, 0);
                        let (win, w32) = tc_window(&dims);
                        launch!(&dev, format!("attn_tc_bwd_dq{win}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, pg, plse, pdbuf, dq.0, dq.1, n32, s32, h32, scale, w32);
                        launch!(&dev, format!("attn_tc_bwd_dkdv{win}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, pg, plse, pdbuf, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale, w32);
                        return Ok(());
                    }
                    let cfg = launch_cfg((s.div_ceil(BQ) as u32, grid_y(n * heads)?), BQ as u32, 0);
                    launch!(&dev, format!("attn_flash_bwd_dq_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, py, pg, plse, pdbuf, dq.0, dq.1, n32, s32, h32, scale);
                    launch!(&dev, format!("attn_flash_bwd_dkdv_{tn}_{hd}"), cfg, q.0, q.1, k.0, k.1, v.0, v.1, pg, plse, pdbuf, dk.0, dk.1, dv.0, dv.1, n32, s32, h32, scale);
                    Ok(())
                })?;
                drop(dbuf);
                Ok(())
            })
        })
    })?;
    Ok(tensor(out, (n, s, d3)))
}

// ---------------------------------------------------------------------------------------------
// KV cache.

/// k[:, len..len+S] = qkv[:, :, D..2D] and v likewise from 2D..3D, into contiguous cache
/// buffers [N, capacity, D], in place.
pub(super) fn kv_append(qkv: &Tensor, k: &Tensor, v: &Tensor, len: usize) -> CResult<()> {
    let (n, s, d3) = qkv.dims3()?;
    let (nk, cap, d) = k.dims3()?;
    if d3 != 3 * d || nk != n || v.dims() != k.dims() || len + s > cap || !k.is_contiguous() || !v.is_contiguous() {
        candle_core::bail!("kv_append: qkv {:?} does not fit cache {:?} at {len}", qkv.dims(), k.dims());
    }
    with_cuda(qkv, |qs, ql| {
        with_cuda(k, |ks, kl| {
            with_cuda(v, |vs, vl| {
                // The kernel writes the cache buffers in place: they belong to one KvCache,
                // which holds no other reference into them while it appends.
                let (pq, vq) = (at(qs, ql)?, view(ql, "qkv")?);
                let (pk, pv) = (contiguous_at(ks, kl, "k cache")?, contiguous_at(vs, vl, "v cache")?);
                let (n32, s32, d32, cap64, len32) = (n as i32, s as i32, d as i32, cap as i64, len as i32);
                let total = n * s * d;
                launch!(&qs.device, format!("kv_append_{}", suffix(qkv.dtype())?), launch_cfg((elementwise_blocks(total), 1), 256, 0), pq, vq, pk, pv, n32, s32, d32, cap64, len32);
                Ok(())
            })
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Gradient norm.

/// Σ of the squares of all elements of f32 tensors, as a [1] f32 tensor, in one launch (no
/// host sync).
pub(super) fn sum_squares(tensors: &[&Tensor]) -> CResult<Tensor> {
    let first = tensors.first().ok_or_else(|| candle_core::Error::Msg("sum_squares of nothing".into()))?;
    let dev = cuda_device(first)?;
    let out = Tensor::zeros(1, DType::F32, first.device())?;
    let mut records = Vec::new();
    let mut keep = Vec::with_capacity(tensors.len());
    for t in tensors {
        let t = t.contiguous()?;
        if t.dtype() != DType::F32 {
            candle_core::bail!("sum_squares: f32 only");
        }
        let (p, n) = (address_of(&t, "x")?, t.elem_count());
        for (start, len) in chunks(n) {
            records.extend([p + 4 * start, len]);
        }
        keep.push(t);
    }
    let blocks = (records.len() / 2) as u32;
    let (table, ptable) = chunk_table(records, first.device())?;
    let po = address_of(&out, "sum")?;
    if blocks > 0 {
        launch!(&dev, "sum_squares_chunks_f32", launch_cfg((blocks, 1), 256, 0), ptable, po);
    }
    drop((table, keep));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Weight gradients.

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
