//! QK-norm (`qk_norm` in a transformer's config): each head's queries and keys are normed
//! over the head dimension before attention.

use megabyte::{DType, Device, MegaByte, ModelConfig, NormKind, Tensor};

use crate::{bytes_tensor, random_bytes};

/// The logits after every `*.attn.qkv.weight` has its query and key rows scaled by `s`.
fn logits_with_qk_scaled(cfg: &ModelConfig, s: f64) -> Tensor {
    let (model, params) = MegaByte::init(cfg, 17, DType::F64, &Device::Cpu).unwrap();
    for (name, var) in params.vars() {
        if name.ends_with("attn.qkv.weight") {
            let d = var.dims()[1];
            let w = var.as_tensor();
            let qk = (w.narrow(0, 0, 2 * d).unwrap() * s).unwrap();
            var.set(&Tensor::cat(&[&qk, &w.narrow(0, 2 * d, d).unwrap()], 0).unwrap()).unwrap();
        }
    }
    let x = bytes_tensor(&[random_bytes(cfg.context, 21), random_bytes(cfg.context, 22)]);
    model.logits(&x).unwrap().to_dtype(DType::F32).unwrap()
}

/// With QK-norm the attention logits cannot grow with the query and key weights: scaled by
/// 4 or by 32 (far enough from 1 that the norm's eps hardly counts), they give the same
/// output, under both norms. Without QK-norm the same scalings change the output.
#[test]
fn qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys() {
    for norm in [NormKind::LayerNorm, NormKind::RmsNorm] {
        let cfg = crate::qk_norm_config(norm, true);
        let diff = crate::max_abs_diff(&logits_with_qk_scaled(&cfg, 4.0), &logits_with_qk_scaled(&cfg, 32.0));
        assert!(diff < 1e-4, "{norm:?}: QK-norm output moved by {diff}");
        let plain = crate::small_config(norm, true);
        let diff = crate::max_abs_diff(&logits_with_qk_scaled(&plain, 4.0), &logits_with_qk_scaled(&plain, 32.0));
        assert!(diff > 1e-2, "{norm:?}: without QK-norm the scale should matter, moved by {diff}");
    }
}

/// Each QK-norm adds its gains (and biases for LayerNorm) of the head dimension, named after
/// its attention layer, and the parameter count says so.
#[test]
fn qk_norm_adds_one_norm_for_queries_and_one_for_keys() {
    let cfg = crate::qk_norm_config(NormKind::LayerNorm, true);
    let (_, params) = MegaByte::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let vars = params.vars();
    let hd = cfg.global.head_dim();
    for name in ["global.blocks.1.attn.q_norm.weight", "global.blocks.1.attn.k_norm.bias", "local.blocks.0.attn.k_norm.weight"] {
        assert!(vars.contains_key(name), "missing {name}");
    }
    assert_eq!(vars["global.blocks.0.attn.q_norm.weight"].dims(), &[hd]);
    let total: usize = vars.values().map(|v| v.elem_count()).sum();
    let (_, plain) = MegaByte::init(&crate::small_config(NormKind::LayerNorm, true), 1, DType::F32, &Device::Cpu).unwrap();
    let plain_total: usize = plain.vars().values().map(|v| v.elem_count()).sum();
    let added = cfg.global.layers * 2 * 2 * cfg.global.head_dim() + cfg.local.layers * 2 * 2 * cfg.local.head_dim();
    assert_eq!(total, plain_total + added, "two LayerNorms (gain and bias) of the head dimension per layer");
    assert_eq!(total, cfg.param_counts().total, "ModelConfig::param_counts counts them");
}

/// A config without the key reads as `qk_norm: false` and writes without it, so configs and
/// checkpoints from before QK-norm load unchanged.
#[test]
fn configs_without_qk_norm_read_and_write_as_before() {
    let cfg = crate::small_config(NormKind::LayerNorm, true);
    let text = serde_json::to_string(&cfg).unwrap();
    assert!(!text.contains("qk_norm"), "{text}");
    let back: ModelConfig = serde_json::from_str(&text).unwrap();
    assert!(!back.global.qk_norm && !back.local.qk_norm);
    let on = serde_json::to_string(&crate::qk_norm_config(NormKind::LayerNorm, true)).unwrap();
    assert!(on.contains("\"qk_norm\":true"), "{on}");
}
