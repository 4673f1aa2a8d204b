//! megabyte: MEGABYTE byte-level language models (Yu et al., 2023, arXiv 2305.07185).
//!
//! The library holds the model, the byte streams it trains on (with their document
//! boundaries), training, evaluation and sampling. Getting and converting data (downloads,
//! archives, images, audio, source code) is the crate `megabyte-data`, so none of that code is
//! linked here; the `megabyte` command (crate `megabyte-cli`) is a thin layer over both.
//! Nothing here prints.
//!
//! Letters used in shape comments: B batch, T bytes per sequence, P patch size, K = T/P
//! patches, D_G per-byte global width (global model width P·D_G), D_L local width, V = 256.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dist;
pub mod documents;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod grad;
pub mod gpu;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod train;

pub use config::{Activation, HashNgrams, ModelConfig, NormKind, Precision, TransformerConfig, Workload, V};
pub use error::{Error, Result};
pub use candle_core::{DType, Device, Tensor, Var};
pub use gpu::device;
pub use model::MegaByte;

/// Process-wide CPU settings for training and generation on the CPU; call it first thing in
/// `main`, before any thread starts (the `megabyte` command does). Measured on 2 cores with the
/// `tiny` preset (BENCHMARKS.md): with the shards, 13K bytes/s with these pools on, 30K off.
pub fn tune_cpu_runtime() {
    // Training splits each batch over one thread per core (`megabyte::train`); candle's own
    // per-op thread pools would only compete with those threads.
    // A user's explicit setting wins.
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
    // glibc hands blocks above 128 KiB back to the OS when freed; re-faulting them on the
    // next step serialises the training threads on the kernel. Keep them instead.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
