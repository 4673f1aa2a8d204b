//! megabyte: MEGABYTE byte-level language models (Yu et al., 2023, arXiv 2305.07185).
//!
//! The library holds the model, data, training, evaluation and sampling; the `megabyte`
//! command (crate `megabyte-cli`) is a thin layer over it. Nothing here prints.
//!
//! Letters used in shape comments: B batch, T bytes per sequence, P patch size, K = T/P
//! patches, D_G per-byte global width (global model width P·D_G), D_L local width, V = 256.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod train;

pub use config::{ModelConfig, NormKind, TransformerConfig, V};
pub use error::{Error, Result};
pub use candle_core::{DType, Device, Tensor, Var};
pub use model::MegaByte;

/// A device from `cpu`, `cuda` or `cuda:N`.
pub fn device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Config(format!("bad device `{spec}`: use cpu, cuda or cuda:N")))?,
        None => return Err(Error::Config(format!("bad device `{spec}`: use cpu, cuda or cuda:N"))),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Config(format!(
            "device `{spec}` needs a build with `--features cuda` (this one is CPU-only)"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}
