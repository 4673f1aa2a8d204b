//! The byte-transformer baseline (MEGABYTE with P = 1 and no local layers) is a working model
//! on every path: causal, cached decoding equal to the full forward, trainable, and the same
//! compute formula as the paper's transformer.

use megabyte::generate::Decoder;
use megabyte::{DType, Device, MegaByte, ModelConfig, NormKind, TransformerConfig};

use crate::{bytes_tensor, random_bytes};

fn byte_config() -> ModelConfig {
    ModelConfig {
        patch_size: 1,
        context: 32,
        global: TransformerConfig { width: 32, layers: 2, heads: 2, window: None },
        local: TransformerConfig { width: 32, layers: 0, heads: 1, window: None },
        norm: NormKind::LayerNorm,
        tied_head: true,
        init_std: 0.1,
        cross_patch: false,
        zero_w_gl: false,
        patch_embed_std: None,
        qk_norm: false,
        mlp: megabyte::Activation::Gelu,
        zero_init_proj: false,
        hash_ngrams: None,
    }
}

#[test]
fn byte_transformer_presets_are_one_level() {
    for name in ["byte-enwik8", "byte-350m"] {
        let cfg = ModelConfig::preset(name).unwrap();
        assert!(cfg.is_byte_transformer(), "{name}");
        // 6 FLOPs per matrix parameter per byte plus attention: nothing is amortised over a patch.
        let m = (cfg.global.matmul_params() + cfg.global.width * cfg.local.width + 256 * cfg.local.width) as f64;
        let attn = 12.0 * (cfg.global.layers * cfg.global.width * cfg.context) as f64;
        assert_eq!(cfg.train_flops_per_byte(), 6.0 * m + attn, "{name}");
    }
    // `byte-350m` and `paper-pg19` are the paper's compute-matched pair (Table 9).
    let (b, m) = (ModelConfig::preset("byte-350m").unwrap(), ModelConfig::preset("paper-pg19").unwrap());
    assert!((b.train_flops_per_byte() / m.train_flops_per_byte() - 1.0).abs() < 0.01);
    // Only the local model may have no layers.
    let mut bad = byte_config();
    bad.global.layers = 0;
    assert!(bad.validate().is_err());
}

#[test]
fn byte_transformer_is_causal_and_decodes_like_the_full_forward() {
    for window in [None, Some(5)] {
        let mut cfg = byte_config();
        cfg.global.window = window;
        check_decoding(&cfg);
    }
}

/// The byte transformer takes the training recipe's model options as MEGABYTE does (the
/// baseline of a recipe comparison gets the same recipe): QK-norm, ReLU², RMSNorm and hash
/// n-gram embeddings, causal and decoded like the full forward.
#[test]
fn byte_transformer_with_the_recipe_options_is_causal_and_decodes_like_the_full_forward() {
    let mut cfg = byte_config();
    (cfg.qk_norm, cfg.mlp, cfg.norm) = (true, megabyte::Activation::Relu2, NormKind::RmsNorm);
    cfg.hash_ngrams = Some(megabyte::HashNgrams { sizes: vec![2, 3], buckets: 7 });
    check_decoding(&cfg);
}

fn check_decoding(cfg: &ModelConfig) {
    let cfg = cfg.clone();
    let (model, _params) = MegaByte::init(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    let t = cfg.context;
    let rows = vec![random_bytes(t, 31), random_bytes(t, 32)];
    let full = model.logits(&bytes_tensor(&rows)).unwrap(); // [B, T, V]
    // Causal: changing byte 20 leaves the logits of bytes ≤ 20 alone.
    let mut changed = rows.clone();
    changed[0][20] ^= 0x55;
    let other = model.logits(&bytes_tensor(&changed)).unwrap();
    let head = |x: &megabyte::Tensor| x.narrow(1, 0, 21).unwrap();
    assert!(crate::max_abs_diff(&head(&full), &head(&other)) < 1e-6);
    assert!(crate::max_abs_diff(&full, &other) > 1e-4, "byte 20 must matter after it");
    if let Some(w) = cfg.global.window {
        // ... and, with a window, not beyond the stack's reach: byte 20 is the input at
        // position 21, and L layers of windows of w see back L·(w − 1) positions.
        let reach = 22 + cfg.global.layers * (w - 1);
        let far = |x: &megabyte::Tensor| x.narrow(1, reach, t - reach).unwrap();
        assert!(crate::max_abs_diff(&far(&full), &far(&other)) < 1e-6, "byte 20 is out of reach of positions ≥ {reach}");
        let near = |x: &megabyte::Tensor| x.narrow(1, reach - 1, 1).unwrap();
        assert!(crate::max_abs_diff(&near(&full), &near(&other)) > 1e-6, "byte 20 is within reach of position {}", reach - 1);
    }
    // Cached, from a prompt of 5 bytes, past the window's end.
    let prompts: Vec<Vec<u8>> = rows.iter().map(|r| r[..5].to_vec()).collect();
    let mut decoder = Decoder::new(&model, &prompts, &Device::Cpu).unwrap();
    for pos in 5..t {
        let step = decoder.logits().unwrap();
        let want = full.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
        let diff = crate::max_abs_diff(&step, &want);
        assert!(diff < 1e-4, "position {pos} differs by {diff}");
        decoder.push(&rows.iter().map(|r| r[pos]).collect::<Vec<u8>>()).unwrap();
    }
    for i in 0..t {
        decoder.logits().unwrap();
        decoder.push(&[i as u8, 0]).unwrap();
    }
    assert_eq!(decoder.history()[0].len(), 2 * t);
}

#[test]
fn byte_transformer_overfits_one_batch() {
    let cfg = byte_config();
    let (model, params) = MegaByte::init(&cfg, 8, DType::F32, &Device::Cpu).unwrap();
    let x = bytes_tensor(&[random_bytes(cfg.context, 41), random_bytes(cfg.context, 42)]);
    let (first, last) = crate::overfit::overfit(&model, &params, &x);
    assert!(last < 0.05, "loss only fell from {first} to {last}");
}
