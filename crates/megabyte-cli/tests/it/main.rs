//! The invariants of megabyte, in one test binary (modules by topic).
//!
//! Everything runs on the CPU in seconds to a minute, except `cuda` (built with `--features
//! cuda`), which needs an NVIDIA GPU.

mod audio;
mod bad_inputs;
mod baseline;
mod batch;
mod cached;
mod causality;
mod checkpoint;
mod code;
mod cross_patch;
#[cfg(feature = "cuda")]
mod cuda;
mod dist;
mod data;
mod documents;
mod eval;
mod export;
mod files;
mod golden;
mod gradients;
mod images;
mod limits;
mod ops;
mod overfit;
mod presets;
mod properties;
mod plot;
mod reference;
mod run_folder;
mod sampling;
mod schedule;
mod serve;

use std::path::PathBuf;

use megabyte::nn::Params;
use megabyte::{DType, Device, MegaByte, ModelConfig, NormKind, Tensor, TransformerConfig};

/// The `tiny` preset with random weights.
pub fn tiny(seed: u64) -> (MegaByte, Params) {
    MegaByte::init(&ModelConfig::preset("tiny").unwrap(), seed, DType::F32, &Device::Cpu).unwrap()
}

/// A small shape for exhaustive checks: P = 4, T = 32.
pub fn small_config(norm: NormKind, tied_head: bool) -> ModelConfig {
    ModelConfig {
        patch_size: 4,
        context: 32,
        global: TransformerConfig { width: 16, layers: 2, heads: 2, window: None },
        local: TransformerConfig { width: 8, layers: 2, heads: 2, window: None },
        norm,
        tied_head,
        init_std: 0.2,
        cross_patch: false,
        zero_w_gl: false,
        patch_embed_std: None,
        qk_norm: false,
        mlp: megabyte::Activation::Gelu,
        zero_init_proj: false,
        hash_ngrams: None,
    }
}

/// `small_config` with cross-patch local attention: the local model (2 layers) sees its
/// last 3 positions across patch boundaries.
pub fn cross_patch_config() -> ModelConfig {
    let mut cfg = small_config(NormKind::LayerNorm, true);
    cfg.cross_patch = true;
    cfg.local.window = Some(3);
    cfg
}

/// `small_config` with the model options of the modern training recipe on: QK-norm and the
/// ReLU² MLP (with RMSNorm and an untied head).
pub fn recipe_config() -> ModelConfig {
    let mut cfg = small_config(NormKind::RmsNorm, false);
    (cfg.qk_norm, cfg.mlp) = (true, megabyte::Activation::Relu2);
    cfg
}

/// `cross_patch_config` with the recipe's model options on (as `recipe_config`).
pub fn cross_patch_recipe_config() -> ModelConfig {
    let mut cfg = cross_patch_config();
    (cfg.qk_norm, cfg.mlp) = (true, megabyte::Activation::Relu2);
    cfg
}

/// `recipe_config` with hash n-gram embeddings of 2 and 3 bytes in 7 rows each (few rows:
/// n-grams share them), which cached decoding refuses.
pub fn ngram_config() -> ModelConfig {
    let mut cfg = recipe_config();
    cfg.hash_ngrams = Some(megabyte::HashNgrams { sizes: vec![2, 3], buckets: 7 });
    cfg
}

/// `cross_patch_recipe_config` with hash n-gram embeddings (as `ngram_config`).
pub fn cross_patch_ngram_config() -> ModelConfig {
    let mut cfg = cross_patch_recipe_config();
    cfg.hash_ngrams = Some(megabyte::HashNgrams { sizes: vec![2, 3], buckets: 7 });
    cfg
}

/// A short `tiny` training run on the embedded corpus: `steps` steps of `batch` windows,
/// validating every `eval_every` steps.
pub fn tiny_run(steps: u64, batch: usize, eval_every: u64) -> (ModelConfig, megabyte::train::TrainConfig, megabyte::train::DataSpec) {
    let mut tc = megabyte::train::TrainConfig::standard(batch, 3e-3);
    tc.steps = Some(steps);
    tc.warmup_steps = 2;
    tc.eval_every = eval_every;
    tc.eval_bytes = 2048;
    tc.checkpoint_every = 1000;
    tc.seed = 5;
    let data = megabyte::train::DataSpec { train: None, valid: None, holdout_bytes: 10_000, documents: false };
    (ModelConfig::preset("tiny").unwrap(), tc, data)
}

/// Every parameter's explicit gradient (`grads`) equals autograd's (`auto`, from
/// `Grads::from_store`) to 1e-6 of the largest entry; `what` names the case on failure.
pub fn assert_grads_equal(params: &Params, auto: &megabyte::grad::Grads, grads: &megabyte::grad::Grads, what: &str) {
    for (name, var) in params.vars() {
        let want = auto.get(var.as_tensor()).unwrap_or_else(|| panic!("no autograd gradient for {name}"));
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no explicit gradient for {name}"));
        let diff = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want.to_dtype(DType::F32).unwrap());
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6 * scale.max(1e-3), "{what}: gradient of {name} differs by {diff} (scale {scale})");
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Runs the `megabyte` binary; returns (success, stderr).
pub fn megabyte(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `megabyte ARGS` fails with `needle` in its message, without a panic.
pub fn fails_with(args: &[&str], needle: &str) {
    let (ok, stderr) = megabyte(args);
    assert!(!ok, "`megabyte {}` should fail", args.join(" "));
    assert!(stderr.contains(needle), "`megabyte {}`: expected `{needle}` in:\n{stderr}", args.join(" "));
    assert!(!stderr.contains("panicked"), "`megabyte {}` panicked:\n{stderr}", args.join(" "));
}

pub fn bytes_tensor(rows: &[Vec<u8>]) -> Tensor {
    megabyte::data::bytes_to_tensor(rows, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// A fresh empty folder under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("megabyte-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../megabyte/tests/fixtures").join(name)
}
