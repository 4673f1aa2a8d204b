//! The Rust model against the independent NumPy reference (tools/reference/).

use std::collections::BTreeMap;
use std::path::Path;

use megabyte::nn::Params;
use megabyte::{DType, Device, MegaByte, ModelConfig, NormKind, Tensor};

use crate::{fixture, max_abs_diff};

#[test]
fn logits_and_loss_match_the_numpy_reference() {
    let mut tensors = megabyte::checkpoint::load_tensors(&fixture("golden-tiny-v1.safetensors")).unwrap();
    let input = tensors.remove("input.bytes").unwrap();
    let want_logits = tensors.remove("output.logits").unwrap();
    let want_loss = tensors.remove("output.loss").unwrap().to_dtype(DType::F64).unwrap();
    let want_loss = want_loss.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];

    let cfg = ModelConfig::preset("tiny").unwrap();
    let mut params = Params::for_loading(DType::F32, &Device::Cpu);
    let model = MegaByte::new(&cfg, &mut params).unwrap();
    params.assign(&tensors).unwrap();

    let logits = model.logits(&input).unwrap();
    let diff = max_abs_diff(&logits, &want_logits);
    assert!(diff < 2e-5, "logits differ from the reference by {diff}");
    let loss = model.loss(&input).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((loss - want_loss).abs() < 1e-5, "loss {loss} vs reference {want_loss}");
}

/// The model config a fixture records in its safetensors metadata (`__metadata__.config`).
fn fixture_config(path: &Path) -> ModelConfig {
    let file = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let config = header["__metadata__"]["config"].as_str().expect("the fixture records its config");
    serde_json::from_str(config).unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// Every option at once (global and local windows, cross-patch local attention, RMSNorm, an
/// untied head, `patch_embed_std` and `zero_w_gl`), in f64: logits and loss equal NumPy's,
/// and the explicit backward pass (`loss_and_grads`, what training runs) equals NumPy's
/// fourth-order central differences of the loss at three entries of every weight tensor.
///
/// Tolerances. Both sides compute in f64, in different orders: the logits (|logits| ≤ 2.2)
/// agree to ~1e-15, tested at 1e-12. The central differences carry round-off of ~1e-12
/// (ulp of the loss over the step h = 1e-3) and truncation below 1e-9 relative (the
/// reference's `check` measures both by halving h), so a gradient must agree to
/// 1e-8·|g| + 1e-11 (|g| from 5e-5 to 6e-2). Measured: logits within 1.8e-15, gradients
/// within 1.5e-11 absolute and 3.5e-9 relative, 8% of the tolerance (tools/reference/README.md).
#[test]
fn cross_patch_logits_loss_and_gradients_match_the_numpy_reference() {
    let path = fixture("golden-cross-patch-v1.safetensors");
    let cfg = fixture_config(&path);
    assert!(cfg.cross_patch && cfg.local.window.is_some() && cfg.global.window.is_some(), "{cfg:?}");
    assert!(cfg.norm == NormKind::RmsNorm && !cfg.tied_head && cfg.zero_w_gl && cfg.patch_embed_std.is_some(), "{cfg:?}");
    check_logits_loss_and_gradients(&path, &cfg, "central_difference", |fd| 1e-8 * fd.abs() + 1e-11);
}

/// The model options of the modern training recipe (QK-norm and the ReLU² MLP) on the
/// cross-patch fixture's shape and options, in f64: logits and loss equal NumPy's, and the
/// explicit backward pass equals NumPy's complex-step derivatives of the loss (exact to
/// rounding, also where central differences straddle ReLU²'s kink, which half of them do:
/// tools/reference/README.md) at three entries of every weight tensor, the q and k gains
/// included.
///
/// Tolerances: logits and loss as above (1e-12); a complex step carries only the loss's own
/// rounding (relative ~1e-15 of d loss), and the explicit pass sums in another order, so a
/// gradient must agree to 1e-10·|g| + 1e-14. Measured: logits within 2.9e-15, gradients
/// within 1.9e-16 absolute and 1.2e-13 relative.
#[test]
fn recipe_logits_loss_and_gradients_match_the_numpy_reference() {
    let path = fixture("golden-recipe-v1.safetensors");
    let cfg = fixture_config(&path);
    assert!(cfg.qk_norm && cfg.mlp == megabyte::Activation::Relu2 && cfg.cross_patch, "{cfg:?}");
    check_logits_loss_and_gradients(&path, &cfg, "complex_step", |g| 1e-10 * g.abs() + 1e-14);
}

/// Hash n-gram embeddings (sizes 2 and 3, 5 rows each) with QK-norm and ReLU² on a per-patch
/// local model (whose n-grams reach into the previous patch), in f64: logits, loss and the
/// explicit backward pass against NumPy's complex steps, the two tables included, as for the
/// recipe fixture.
#[test]
fn hash_ngram_logits_loss_and_gradients_match_the_numpy_reference() {
    let path = fixture("golden-hash-ngrams-v1.safetensors");
    let cfg = fixture_config(&path);
    assert!(cfg.hash_ngrams.is_some() && !cfg.cross_patch, "{cfg:?}");
    check_logits_loss_and_gradients(&path, &cfg, "complex_step", |g| 1e-10 * g.abs() + 1e-14);
}

/// The f64 model on a fixture's weights against its logits and loss (within 1e-12) and its
/// derivatives `<key>.{index,grad}.<parameter>` (flat indices and d loss / d parameter there),
/// each within `tolerance(derivative)`.
fn check_logits_loss_and_gradients(path: &Path, cfg: &ModelConfig, key: &str, tolerance: impl Fn(f64) -> f64) {
    let mut tensors = megabyte::checkpoint::load_tensors(path).unwrap();
    let input = tensors.remove("input.bytes").unwrap();
    let want_logits = to_f64(&tensors.remove("output.logits").unwrap());
    let want_loss = to_f64(&tensors.remove("output.loss").unwrap())[0];
    let mut probes: BTreeMap<String, (Vec<u32>, Vec<f64>)> = BTreeMap::new();
    let names: Vec<String> = tensors.keys().filter(|k| k.starts_with(&format!("{key}.index."))).cloned().collect();
    for k in names {
        let name = k.trim_start_matches(&format!("{key}.index.")).to_string();
        let index = tensors.remove(&k).unwrap().to_vec1::<u32>().unwrap();
        let grad = to_f64(&tensors.remove(&format!("{key}.grad.{name}")).unwrap());
        probes.insert(name, (index, grad));
    }

    let mut params = Params::for_loading(DType::F64, &Device::Cpu);
    let model = MegaByte::new(cfg, &mut params).unwrap();
    params.assign(&tensors).unwrap();

    let logits = to_f64(&model.logits(&input).unwrap());
    let diff = logits.iter().zip(&want_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-12, "logits differ from the reference by {diff}");
    let weights = megabyte::model::mean_weights(&input).unwrap();
    let (loss, grads) = model.loss_and_grads(&input, &weights, megabyte::model::TrainPass::default()).unwrap();
    let loss = loss.to_scalar::<f64>().unwrap();
    assert!((loss - want_loss).abs() < 1e-12, "loss {loss} vs reference {want_loss}");

    let (mut worst_abs, mut worst_rel, mut worst_share) = (0.0f64, 0.0f64, 0.0f64);
    for (name, var) in params.vars() {
        let (index, want) = probes.get(name).unwrap_or_else(|| panic!("the fixture has no {key} derivatives for {name}"));
        let got = to_f64(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")));
        for (&i, &d) in index.iter().zip(want) {
            let g = got[i as usize];
            let (err, tolerance) = ((g - d).abs(), tolerance(d));
            assert!(err <= tolerance, "{name}[{i}]: explicit backward {g} vs {key} {d} (error {err:.1e})");
            worst_share = worst_share.max(err / tolerance);
            worst_abs = worst_abs.max(err);
            worst_rel = worst_rel.max(err / d.abs());
        }
    }
    assert_eq!(probes.len(), params.vars().len(), "{key} derivatives of tensors the model lacks");
    eprintln!(
        "logits within {diff:.1e}, loss within {:.1e}, gradients within {worst_abs:.1e} ({worst_rel:.1e} relative, {:.0}% of the tolerance)",
        (loss - want_loss).abs(),
        100.0 * worst_share
    );
}
