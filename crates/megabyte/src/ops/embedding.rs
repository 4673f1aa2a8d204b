//! Embedding lookup: rows of a table [V, D] at u32 ids, and the table's gradient. On CUDA
//! (f32 tables) fused kernels whose backward sums into the gradient in shared memory first
//! (candle's index_add runs one thread per column over all ids, ~100 ms per step for the
//! `enwik8` shape); elsewhere candle's index_select and index_add.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{fused_cuda, CResult};

/// Rows of `table` [V, D] at u32 `ids` (any shape [..]) → [.., D].
pub fn forward(table: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    let table = table.detach();
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    let ids = ids.flatten_all()?;
    if fused_cuda(&table) && table.dtype() == DType::F32 {
        return table.contiguous()?.apply_op2_no_bwd(&ids.contiguous()?, &Embedding)?.reshape(shape);
    }
    table.index_select(&ids, 0)?.reshape(shape)
}

/// The gradient of an embedding table [V, D] from dy [.., D] at `ids` [..].
pub fn backward(table: &Tensor, ids: &Tensor, dy: &Tensor) -> CResult<Tensor> {
    let (v, d) = table.dims2()?;
    let dy = dy.reshape((dy.elem_count() / d, d))?;
    let ids = ids.flatten_all()?;
    #[cfg(feature = "cuda")]
    if fused_cuda(table) && table.dtype() == DType::F32 {
        return cuda::embed_bwd(&dy, &ids, v);
    }
    Tensor::zeros((v, d), table.dtype(), table.device())?.index_add(&ids, &dy.to_dtype(table.dtype())?, 0)
}

/// Rows of a table at ids (CUDA only).
struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "megabyte-embedding"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        candle_core::bail!("embedding: the CPU uses index_select")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::embed_fwd((s1, l1), (s2, l2))
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA.

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

    use crate::ops::cuda::{alloc, contiguous_at, cuda_device, elementwise_blocks, launch, launch_cfg, suffix, with_cuda};
    use crate::ops::CResult;

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
}
