//! Cached generation (global step per patch, local step per byte) gives the full forward
//! pass's logits on the same bytes.

use megabyte::generate::Decoder;
use megabyte::{DType, Device, MegaByte, ModelConfig};

use crate::{bytes_tensor, random_bytes, tiny};

/// Decodes `rows` with the cache from a prompt of `prompt_len` bytes, forcing the known next
/// byte each step, and compares every step's logits with the full forward pass.
fn check(model: &MegaByte, prompt_len: usize) {
    let t = model.config().context;
    let rows = vec![random_bytes(t, 11), random_bytes(t, 12)];
    let full = model.logits(&bytes_tensor(&rows)).unwrap(); // [B, T, V]
    let prompts: Vec<Vec<u8>> = rows.iter().map(|r| r[..prompt_len].to_vec()).collect();
    let mut decoder = Decoder::new(model, &prompts, &Device::Cpu).unwrap();
    for pos in prompt_len..t {
        let step = decoder.logits().unwrap(); // [B, V]
        let want = full.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
        let diff = crate::max_abs_diff(&step, &want);
        assert!(diff < 1e-4, "prompt {prompt_len}: position {pos} differs by {diff}");
        let next: Vec<u8> = rows.iter().map(|r| r[pos]).collect();
        decoder.push(&next).unwrap();
    }
}

#[test]
fn cached_logits_equal_full_forward_from_a_patch_boundary() {
    let (model, _) = tiny(5);
    check(&model, 0);
    check(&model, 16);
}

#[test]
fn cached_logits_equal_full_forward_from_mid_patch() {
    let (model, _) = tiny(5);
    check(&model, 3);
    check(&model, 29);
}

/// Decodes past the context twice over from a 3-byte prompt, forcing known bytes. Whenever a
/// completed patch fills the context, the decoder slides to the window's last half
/// (patch-aligned) and prefills again, with positions restarting at 0: every step's logits,
/// before and after each slide, must equal a fresh full forward over the bytes the window
/// holds then (padded to a patch; causality makes the padding irrelevant). f64, so a byte
/// or position off by one cannot hide in the tolerance (the CPU kernels are the same code
/// for f32 and f64).
fn check_slides(model: &MegaByte) {
    let (t, p) = (model.config().context, model.config().patch_size);
    let keep = t / 2 / p * p; // the bytes a slide keeps
    let rows = vec![random_bytes(3 + 2 * t + 5, 31), random_bytes(3 + 2 * t + 5, 32)];
    let prompts: Vec<Vec<u8>> = rows.iter().map(|r| r[..3].to_vec()).collect();
    let mut decoder = Decoder::new(model, &prompts, &Device::Cpu).unwrap();
    let (mut start, mut slides, mut worst) = (0, 0, 0.0f64); // the window holds bytes start..pos
    for pos in 3..rows[0].len() {
        let step = decoder.logits().unwrap(); // [B, V]
        assert_eq!(step.dims(), &[2, 256]);
        let window: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| {
                let mut w = r[start..=pos].to_vec();
                w.resize(w.len().div_ceil(p) * p, 0);
                w
            })
            .collect();
        let full = model.logits(&bytes_tensor(&window)).unwrap(); // [B, ≤ T, V], positions from 0
        let want = full.narrow(1, pos - start, 1).unwrap().squeeze(1).unwrap();
        let diff = (&step - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "byte {pos} (window from {start}, after {slides} slides) differs by {diff:.1e}");
        worst = worst.max(diff);
        decoder.push(&rows.iter().map(|r| r[pos]).collect::<Vec<u8>>()).unwrap();
        let n = pos + 1 - start;
        if n % p == 0 && n + p > t {
            start = pos + 1 - keep;
            slides += 1;
        }
    }
    assert!(slides >= 3, "only {slides} slides");
    assert_eq!(decoder.history()[0], rows[0]);
    eprintln!("T = {t}, P = {p}: {} steps, {slides} slides, logits within {worst:.1e} of the full forward", rows[0].len() - 3);
}

#[test]
fn decoding_past_the_context_slides_the_window() {
    let (model, _) = MegaByte::init(&ModelConfig::preset("tiny").unwrap(), 6, DType::F64, &Device::Cpu).unwrap();
    check_slides(&model);
    let (model, _) = MegaByte::init(&crate::cross_patch_config(), 6, DType::F64, &Device::Cpu).unwrap();
    check_slides(&model);
}

/// The recipe's model options (QK-norm: the cache holds the normalised keys; ReLU²) decode
/// like the full forward, from and off patch boundaries and across slides, per patch and
/// across patches.
#[test]
fn cached_decoding_with_the_recipe_options_equals_the_full_forward() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    (cfg.qk_norm, cfg.mlp) = (true, megabyte::Activation::Relu2);
    check_options(&cfg, &crate::cross_patch_recipe_config());
}

/// [`check`] from and off a patch boundary (f32) and [`check_slides`] (f64) of a model with
/// `per_patch`, then `check_slides` of one with `cross_patch`.
fn check_options(per_patch: &ModelConfig, cross_patch: &ModelConfig) {
    let (model, _) = MegaByte::init(per_patch, 5, DType::F32, &Device::Cpu).unwrap();
    check(&model, 0);
    check(&model, 29);
    let (model, _) = MegaByte::init(per_patch, 6, DType::F64, &Device::Cpu).unwrap();
    check_slides(&model);
    let (model, _) = MegaByte::init(cross_patch, 6, DType::F64, &Device::Cpu).unwrap();
    check_slides(&model);
}

/// Hash n-gram embeddings decode like the full forward: each step gets the rows of the bytes
/// before it as the window shows them (a window's first bytes hash with 256 before them), from
/// and off patch boundaries and across slides, per patch and across patches (f64: a row off by
/// one byte cannot hide in the tolerance).
#[test]
fn cached_decoding_with_hash_ngrams_equals_the_full_forward() {
    check_options(&crate::ngram_config(), &crate::cross_patch_ngram_config());
}

/// The cached steps of a hash n-gram model refuse to run without the bytes' rows (they would
/// decode another model), and a model without them refuses rows.
#[test]
fn cached_steps_need_hash_ngram_rows_exactly_when_the_model_has_them() {
    let (model, _) = MegaByte::init(&crate::ngram_config(), 5, DType::F32, &Device::Cpu).unwrap();
    let patch = bytes_tensor(&[b"abcdefgh".to_vec()]);
    let mut cache = model.global_cache();
    let err = model.global_step(1, Some(&patch), None, &mut cache).unwrap_err().to_string();
    assert!(err.contains("hash n-gram") && err.contains("ngram_ids"), "{err}");
    assert_eq!(cache.len(), 0, "the refused step changed the cache");
    let ids = model.ngram_ids(&[b"abcdefgh".as_slice()], 0, 8, &Device::Cpu).unwrap().expect("rows");
    assert_eq!(ids.dims(), &[1, 8, 2]);
    model.global_step(1, Some(&patch), Some(&ids), &mut cache).unwrap();
    let mut local = model.local_cache();
    let context = megabyte::Tensor::zeros((1, model.config().local.width), DType::F32, &Device::Cpu).unwrap();
    model.local_step(&context, None, None, &mut local).unwrap(); // the pad: no previous byte
    let prev = megabyte::Tensor::new(&[7u32], &Device::Cpu).unwrap();
    assert!(model.local_step(&context, Some(&prev), None, &mut local).is_err());
    let (plain, _) = tiny(5);
    let err = plain.global_step(1, Some(&patch), Some(&ids), &mut plain.global_cache()).unwrap_err().to_string();
    assert!(err.contains("without hash_ngrams"), "{err}");
}

/// A run with hash n-gram embeddings trains, evaluates and ends with its sample, and
/// `generate` decodes its checkpoint with the seed's bytes every time (`serve.rs` serves one).
#[test]
fn a_hash_ngram_run_trains_and_generates() {
    let dir = crate::temp_dir("hash-ngram-run");
    let run = dir.join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(["train", "--hash-ngrams", "2,3", "--hash-buckets", "64", "--steps", "2", "--batch-size", "2", "--eval-bytes", "1024"])
        .args(["--sample-bytes", "16", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("no closing sample"));
    let generate = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte"))
            .args(["generate", "--checkpoint", run.to_str().unwrap(), "--prompt", "abc", "-n", "24", "--seed", "3"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let first = generate();
    assert!(first.len() >= 24, "{} bytes", first.len());
    assert_eq!(first, generate(), "the same seed gave other bytes");
}

#[test]
fn a_cache_refuses_steps_of_another_batch() {
    // Positions cached for 2 sequences cannot be continued by a step over 3: that would drop
    // them silently.
    let (model, _) = tiny(5);
    let mut cache = model.global_cache();
    model.global_step(2, None, None, &mut cache).unwrap();
    let p = model.config().patch_size;
    let three = crate::bytes_tensor(&vec![vec![7u8; p]; 3]);
    let err = model.global_step(3, Some(&three), None, &mut cache).unwrap_err().to_string();
    assert!(err.contains("reset it first"), "{err}");
    assert_eq!(cache.len(), 1, "the refused step changed the cache");
}
