//! The model's one backward pass (`MegaByte::loss_and_grads`: fused kernels in reverse
//! order) against central finite differences of its forward pass, and against candle's
//! autograd through the independent reference model (`reference.rs`), in f64, for every
//! parameter kind: each distinct parameter name with its block index removed, under both
//! norms and both heads, windows, cross-patch attention, dropout and recomputation.

use std::collections::BTreeMap;

use megabyte::grad::Grads;
use megabyte::model::{mean_weights, TrainPass};
use megabyte::nn::Dropout;
use megabyte::{DType, Device, MegaByte, ModelConfig, NormKind, Tensor};

use crate::{random_bytes, reference, small_config};

/// The mean loss and its gradients by the explicit pass, without dropout.
fn mean_loss_and_grads(model: &MegaByte, x: &Tensor) -> (f64, Grads) {
    let (loss, grads) = model.loss_and_grads(x, &mean_weights(x).unwrap(), TrainPass::default()).unwrap();
    (loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), grads)
}

/// Autograd's gradients of `scale`·(the reference model's mean loss), and that loss.
fn reference_grads(cfg: &ModelConfig, params: &megabyte::nn::Params, x: &Tensor, dropout: Option<Dropout>, scale: f64) -> (f64, Grads) {
    let loss = reference::loss(cfg, params, x, dropout);
    let store = (loss.clone() * scale).unwrap().backward().unwrap();
    (loss.to_scalar::<f64>().unwrap(), Grads::from_store(&store, params.vars()).unwrap())
}

fn check_finite_differences(norm: NormKind, tied_head: bool) {
    check_finite_differences_of(&small_config(norm, tied_head), 14);
}

/// The explicit backward pass of `cfg` against central differences at three entries of one
/// parameter of every kind; at least `min_kinds` kinds.
fn check_finite_differences_of(cfg: &ModelConfig, min_kinds: usize) {
    let cfg = cfg.clone();
    let (model, params) = MegaByte::init(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
    let rows = vec![random_bytes(cfg.context, 1), random_bytes(cfg.context, 2)];
    let x = crate::bytes_tensor(&rows);
    let loss = |m: &MegaByte| m.loss(&x).unwrap().to_scalar::<f64>().unwrap();
    let (_, grads) = mean_loss_and_grads(&model, &x);

    // One representative per kind: `global.blocks.1.attn.qkv.weight` → `global.blocks.*.attn.qkv.weight`.
    let mut kinds: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in params.vars().keys() {
        let kind: Vec<&str> = name.split('.').map(|s| if s.parse::<usize>().is_ok() { "*" } else { s }).collect();
        kinds.entry(kind.join(".")).or_default().push(name.clone());
    }
    let used: Vec<usize> = rows.iter().flatten().map(|&b| b as usize).collect();
    for (kind, names) in &kinds {
        let name = names.last().unwrap();
        let var = &params.vars()[name];
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let w0 = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let cols = *var.dims().last().unwrap();
        // Probe 3 entries; for byte tables pick rows of bytes that occur in the input.
        for probe in 0..3usize {
            let idx = if name.ends_with("byte_embed.weight") {
                used[probe * 7] * cols + probe % cols
            } else {
                (probe * 7919 + 13) % w0.len()
            };
            let eps = 1e-5;
            let set = |delta: f64| {
                let mut w = w0.clone();
                w[idx] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap()).unwrap();
            };
            set(eps);
            let up = loss(&model);
            set(-eps);
            let down = loss(&model);
            set(0.0);
            let fd = (up - down) / (2.0 * eps);
            let err = (fd - g[idx]).abs() / (fd.abs() + g[idx].abs()).max(1e-6);
            assert!(err < 1e-4, "{kind} ({name}[{idx}]): explicit backward {} vs finite difference {fd}", g[idx]);
        }
    }
    assert!(kinds.len() >= min_kinds, "only {} parameter kinds checked", kinds.len());
}

/// The recipe's options (QK-norm: its q and k gains are two more kinds), per patch and
/// across patches.
#[test]
fn explicit_backward_matches_finite_differences_with_the_recipe_options() {
    check_finite_differences_of(&crate::recipe_config(), 16);
    check_finite_differences_of(&crate::cross_patch_recipe_config(), 16);
    // Hash n-gram embeddings: two more tables.
    check_finite_differences_of(&crate::ngram_config(), 18);
    check_finite_differences_of(&crate::cross_patch_ngram_config(), 18);
}

#[test]
fn explicit_backward_matches_finite_differences_layernorm_tied() {
    check_finite_differences(NormKind::LayerNorm, true);
}

#[test]
fn explicit_backward_matches_finite_differences_rmsnorm_untied() {
    check_finite_differences(NormKind::RmsNorm, false);
}

/// The explicit forward and backward pass against candle's autograd through the reference
/// model: the same losses (byte by byte) and every parameter's gradient, f64, both norms and
/// heads, a global window, cross-patch attention, a partial sequence (T' < T) and weights
/// other than the mean.
#[test]
fn explicit_backward_equals_the_reference_autograd() {
    let mut windowed = small_config(NormKind::LayerNorm, false);
    windowed.global.window = Some(2); // a sliding window of 2 patches
    let cases = [
        small_config(NormKind::LayerNorm, true),
        small_config(NormKind::RmsNorm, false),
        windowed,
        crate::cross_patch_config(),
        crate::recipe_config(),
        crate::cross_patch_recipe_config(),
        crate::ngram_config(),
        crate::cross_patch_ngram_config(),
    ];
    for cfg in cases {
        let (model, params) = MegaByte::init(&cfg, 9, DType::F64, &Device::Cpu).unwrap();
        for t in [cfg.context, cfg.context / 2] {
            let what = format!("{:?} tied={} window={:?} cross_patch={} qk_norm={} ngrams={:?} T'={t}", cfg.norm, cfg.tied_head, cfg.global.window, cfg.cross_patch, cfg.qk_norm, cfg.hash_ngrams);
            let rows: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(t, 40 + i)).collect();
            let x = crate::bytes_tensor(&rows);
            let diff = (model.byte_losses(&x).unwrap() - reference::byte_losses(&cfg, &params, &x, None)).unwrap();
            let byte_diff = diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(byte_diff < 1e-12, "{what}: per-byte losses differ by {byte_diff}");
            let weight = 0.75;
            let (want, auto) = reference_grads(&cfg, &params, &x, None, weight);
            let w = (mean_weights(&x).unwrap() * weight).unwrap();
            let (loss, grads) = model.loss_and_grads(&x, &w, TrainPass::default()).unwrap();
            let loss = loss.to_scalar::<f64>().unwrap();
            assert!((loss - weight * want).abs() < 1e-12, "{what}: loss {loss} vs {}", weight * want);
            crate::assert_grads_equal(&params, &auto, &grads, &what);
        }
    }
}

/// Recomputing each block's activations in the backward pass gives exactly the gradients of
/// keeping them, for both transformers, with a partial sequence and with cross-patch
/// attention.
#[test]
fn recomputed_activations_give_the_same_gradients() {
    for cfg in [small_config(NormKind::RmsNorm, false), crate::cross_patch_config(), crate::recipe_config()] {
        let (model, params) = MegaByte::init(&cfg, 11, DType::F64, &Device::Cpu).unwrap();
        for t in [cfg.context, cfg.context / 2] {
            let rows: Vec<Vec<u8>> = (0..2).map(|i| random_bytes(t, 70 + i)).collect();
            let x = crate::bytes_tensor(&rows);
            let w = mean_weights(&x).unwrap();
            let (loss, kept) = model.loss_and_grads(&x, &w, TrainPass::default()).unwrap();
            let (loss_re, recomputed) = model.loss_and_grads(&x, &w, TrainPass { recompute: true, ..Default::default() }).unwrap();
            assert_eq!(loss.to_scalar::<f64>().unwrap(), loss_re.to_scalar::<f64>().unwrap());
            for (name, var) in params.vars() {
                let (a, b) = (kept.get(var.as_tensor()).unwrap(), recomputed.get(var.as_tensor()).unwrap());
                assert_eq!(crate::max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()), 0.0, "T'={t}: gradient of {name}");
            }
        }
    }
}

/// `patch_embed_std`: the patch embedder's three tensors start at that scale, drawn from the
/// same stream (so exactly rescaled), and every other parameter as it would without it; a
/// config without the key reads as before and writes without it.
#[test]
fn a_patch_embed_std_rescales_the_patch_embedder_alone() {
    let plain = small_config(NormKind::LayerNorm, true);
    let mut cfg = plain.clone();
    cfg.patch_embed_std = Some(1.0);
    let (_, plain_params) = MegaByte::init(&plain, 13, DType::F64, &Device::Cpu).unwrap();
    let (_, params) = MegaByte::init(&cfg, 13, DType::F64, &Device::Cpu).unwrap();
    let ratio = 1.0 / plain.init_std;
    for (name, var) in params.vars() {
        let (a, b) = (var.as_tensor(), plain_params.vars()[name].as_tensor());
        let b = if name.starts_with("patch_embedder.") { (b * ratio).unwrap() } else { b.clone() };
        let diff = crate::max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap());
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f64>().unwrap();
    let table = rms(params.vars()["patch_embedder.pos_embed.weight"].as_tensor());
    assert!((0.7..1.0).contains(&table), "a truncated normal of std 1 has rms 0.88: {table}");
    let text = serde_json::to_string(&plain).unwrap();
    assert!(!text.contains("patch_embed_std"), "{text}");
    assert_eq!(serde_json::from_str::<megabyte::ModelConfig>(&text).unwrap().patch_embed_std, None);
    assert!(serde_json::to_string(&cfg).unwrap().contains("\"patch_embed_std\":1.0"));
}

/// `zero_w_gl`: w_GL starts at zero and every other parameter as it would without it. At the
/// start the global model then gets no gradient but w_GL does, so one optimizer step makes
/// the global term nonzero and the next gradient reaches the global blocks.
#[test]
fn a_zero_w_gl_grows_in_and_then_trains_the_global_model() {
    let plain = small_config(NormKind::LayerNorm, true);
    let mut cfg = plain.clone();
    cfg.zero_w_gl = true;
    let (_, plain_params) = MegaByte::init(&plain, 13, DType::F64, &Device::Cpu).unwrap();
    let (model, params) = MegaByte::init(&cfg, 13, DType::F64, &Device::Cpu).unwrap();
    let abs_max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    for (name, var) in params.vars() {
        let (a, b) = (var.as_tensor(), plain_params.vars()[name].as_tensor());
        if name == "global_to_local.weight" {
            assert_eq!(abs_max(a), 0.0, "w_GL starts at zero");
            assert!(abs_max(b) > 0.0);
        } else {
            assert_eq!(crate::max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()), 0.0, "{name} is drawn as without zero_w_gl");
        }
    }
    let x = crate::bytes_tensor(&(0..2).map(|i| random_bytes(cfg.context, 90 + i)).collect::<Vec<_>>());
    let global_grad = |grads: &megabyte::grad::Grads| {
        params.vars().iter().filter(|(n, _)| n.starts_with("global.")).map(|(_, v)| abs_max(grads.get(v.as_tensor()).unwrap())).fold(0.0, f64::max)
    };
    let w_gl = params.vars()["global_to_local.weight"].as_tensor().clone();
    let (_, grads) = mean_loss_and_grads(&model, &x);
    assert_eq!(global_grad(&grads), 0.0, "no gradient reaches the global model through a zero w_GL");
    assert!(abs_max(grads.get(&w_gl).unwrap()) > 0.0, "w_GL gets a gradient");
    let mut opt = megabyte::optim::AdamW::new(params.vars(), megabyte::train::TrainConfig::standard(2, 1e-2).adamw).unwrap();
    opt.step(&grads, 1e-2, 1.0).unwrap();
    assert!(abs_max(&w_gl) > 0.0, "one step makes w_GL nonzero");
    let (_, grads) = mean_loss_and_grads(&model, &x);
    assert!(global_grad(&grads) > 0.0, "then the global model trains");
}

/// `zero_init_proj`: every block's attention output and MLP down projections start at zero
/// and every other parameter as it would without it; each block is then the identity, so the
/// loss does not depend on the blocks' other weights. The zero matrices get gradients at once (the blocks'
/// other weights none), and after one optimizer step the gradient reaches every block.
#[test]
fn zero_init_proj_starts_the_blocks_as_the_identity_and_then_trains_them() {
    let plain = crate::recipe_config();
    let mut cfg = plain.clone();
    cfg.zero_init_proj = true;
    let (_, plain_params) = MegaByte::init(&plain, 13, DType::F64, &Device::Cpu).unwrap();
    let (model, params) = MegaByte::init(&cfg, 13, DType::F64, &Device::Cpu).unwrap();
    let abs_max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let is_proj = |name: &str| name.ends_with(".attn.proj.weight") || name.ends_with(".mlp.down.weight");
    let mut zeroed = 0;
    for (name, var) in params.vars() {
        let (a, b) = (var.as_tensor(), plain_params.vars()[name].as_tensor());
        if is_proj(name) {
            assert_eq!(abs_max(a), 0.0, "{name} starts at zero");
            assert!(abs_max(b) > 0.0);
            zeroed += 1;
        } else {
            assert_eq!(crate::max_abs_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()), 0.0, "{name} is drawn as without zero_init_proj");
        }
    }
    assert_eq!(zeroed, 2 * (cfg.global.layers + cfg.local.layers));
    let x = crate::bytes_tensor(&(0..2).map(|i| random_bytes(cfg.context, 95 + i)).collect::<Vec<_>>());
    // The blocks add nothing: the loss does not move with their other weights.
    let loss = |m: &MegaByte| m.loss(&x).unwrap().to_scalar::<f64>().unwrap();
    let before = loss(&model);
    let qkv = params.vars()["local.blocks.0.attn.qkv.weight"].clone();
    let w0 = qkv.as_tensor().copy().unwrap();
    qkv.set(&(&w0 * 2.0).unwrap()).unwrap();
    assert_eq!(loss(&model), before, "a block with zero projections is the identity");
    qkv.set(&w0).unwrap();
    let blocks_of = |grads: &Grads, proj: bool| {
        params.vars().iter().filter(|(n, _)| n.contains(".blocks.") && is_proj(n) == proj).map(|(_, v)| abs_max(grads.get(v.as_tensor()).unwrap())).fold(0.0, f64::max)
    };
    let (_, grads) = mean_loss_and_grads(&model, &x);
    assert_eq!(blocks_of(&grads, false), 0.0, "no gradient reaches a block's other weights through zero projections");
    assert!(blocks_of(&grads, true) > 0.0, "the zero projections get gradients");
    let mut opt = megabyte::optim::AdamW::new(params.vars(), megabyte::train::TrainConfig::standard(2, 1e-2).adamw).unwrap();
    opt.step(&grads, 1e-2, 1.0).unwrap();
    let (_, grads) = mean_loss_and_grads(&model, &x);
    for (name, var) in params.vars().iter().filter(|(n, _)| n.contains(".blocks.")) {
        assert!(abs_max(grads.get(var.as_tensor()).unwrap()) > 0.0, "after one step {name} trains");
    }
}

/// With dropout the explicit backward pass still equals autograd through the reference model
/// with the same masks, recomputation included, for the per-patch and the cross-patch local
/// model; dropout changes the loss; and a batch split in two at row r (the second part with
/// row offset r) is the whole batch: the same loss and gradients once summed.
#[test]
fn dropout_keeps_the_explicit_backward_exact_and_splits_by_rows() {
    for cfg in [small_config(NormKind::RmsNorm, false), crate::cross_patch_config(), crate::cross_patch_recipe_config(), crate::ngram_config()] {
        let what = format!("dropout, cross_patch={} qk_norm={}", cfg.cross_patch, cfg.qk_norm);
        let (model, params) = MegaByte::init(&cfg, 17, DType::F64, &Device::Cpu).unwrap();
        let rows: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(cfg.context, 110 + i)).collect();
        let x = crate::bytes_tensor(&rows);
        let w = mean_weights(&x).unwrap();
        let drop = Dropout { p: 0.25, key: 12345, row_offset: 0 };
        let plain = model.loss(&x).unwrap().to_scalar::<f64>().unwrap();
        let (want, auto) = reference_grads(&cfg, &params, &x, Some(drop), 1.0);
        assert!((want - plain).abs() > 1e-6, "{what}: dropout changes the loss");
        for recompute in [false, true] {
            let (loss, grads) = model.loss_and_grads(&x, &w, TrainPass { dropout: Some(drop), recompute }).unwrap();
            let loss = loss.to_scalar::<f64>().unwrap();
            assert!((loss - want).abs() < 1e-12, "{what}: loss {loss} vs the reference {want} (no dropout: {plain})");
            crate::assert_grads_equal(&params, &auto, &grads, &format!("{what} recompute={recompute}"));
        }
        // Rows [0, 1) and [1, 3), with row offsets 0 and 1, under the whole batch's weights.
        let part = |start: usize, len: usize| {
            let pass = TrainPass { dropout: Some(Dropout { row_offset: start, ..drop }), recompute: false };
            let (loss, grads) = model.loss_and_grads(&x.narrow(0, start, len).unwrap(), &w.narrow(0, start, len).unwrap(), pass).unwrap();
            (loss.to_scalar::<f64>().unwrap(), grads)
        };
        let ((head, mut grads), (tail, tail_grads)) = (part(0, 1), part(1, 2));
        grads.merge(tail_grads).unwrap();
        assert!((head + tail - want).abs() < 1e-12, "{what}: split loss {} vs {want}", head + tail);
        crate::assert_grads_equal(&params, &auto, &grads, &format!("{what}, split by rows"));
    }
}

/// A clipped step reports the gradient's norm over all parameters and over each part of the
/// model (the first component of the parameters' names, each embedding table and pad on its
/// own): each part's norm is its gradients' own, and the parts' squares sum to the total's
/// square.
#[test]
fn clipped_step_reports_the_norm_of_every_part() {
    let cfg = crate::cross_patch_config();
    let (model, params) = MegaByte::init(&cfg, 23, DType::F32, &Device::Cpu).unwrap();
    let x = crate::bytes_tensor(&(0..2).map(|i| random_bytes(cfg.context, 130 + i)).collect::<Vec<_>>());
    let (_, grads) = mean_loss_and_grads(&model, &x);
    let mut by_part: BTreeMap<String, f64> = BTreeMap::new();
    for (name, var) in params.vars() {
        let g = grads.get(var.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        let sumsq = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let first = name.split('.').next().unwrap();
        let part = if first.ends_with("_embedder") { name.trim_end_matches(".weight") } else { first };
        *by_part.entry(part.to_string()).or_default() += sumsq;
    }
    let mut opt = megabyte::optim::AdamW::new(params.vars(), megabyte::train::TrainConfig::standard(2, 1e-3).adamw).unwrap();
    let norm = opt.step_clipped(&grads, 1e-3, 1.0).unwrap();
    let names: Vec<&str> = norm.parts.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "global",
            "global_to_local",
            "local",
            "local_embedder.byte_embed",
            "local_embedder.local_pad",
            "local_embedder.pos_embed",
            "patch_embedder.byte_embed",
            "patch_embedder.global_pad",
            "patch_embedder.pos_embed",
        ]
    );
    assert_eq!(norm.parts.len(), by_part.len());
    for (part, sumsq) in &by_part {
        let got = norm.parts[part];
        assert!((got - sumsq.sqrt()).abs() <= 1e-5 * sumsq.sqrt().max(1e-3), "{part}: {got} against {}", sumsq.sqrt());
    }
    let total = by_part.values().sum::<f64>().sqrt();
    assert!((norm.total - total).abs() <= 1e-5 * total, "total {} against {total}", norm.total);
    assert!(norm.parts.values().all(|&n| n > 0.0), "every part has a gradient: {:?}", norm.parts);
}
