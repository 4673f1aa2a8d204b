//! megabyte: MEGABYTE byte-level language models (Yu et al., 2023, arXiv 2305.07185).
//!
//! The library holds the model, data, training, evaluation and sampling; the `megabyte`
//! command (crate `megabyte-cli`) is a thin layer over it. Nothing here prints.
//!
//! Letters used in shape comments: B batch, T bytes per sequence, P patch size, K = T/P
//! patches, D_G per-byte global width (global model width P·D_G), D_L local width, V = 256.

pub mod config;
pub mod error;
pub mod model;
pub mod nn;

pub use config::{ModelConfig, NormKind, TransformerConfig, V};
pub use error::{Error, Result};
pub use model::MegaByte;
