//! Cross-patch local attention (`cross_patch`): the local model runs over the whole window
//! with a sliding window of `local.window` bytes. Causal, reaches exactly as far as its
//! window allows across patch boundaries, decodes like the full forward (across window
//! slides), and its explicit backward pass equals autograd.

use megabyte::generate::Decoder;
use megabyte::{DType, Device, MegaByte, Tensor};

use crate::{bytes_tensor, cross_patch_config, random_bytes};


#[test]
fn cross_patch_needs_a_local_window() {
    let mut cfg = cross_patch_config();
    cfg.local.window = None;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("cross_patch needs"), "{err}");
}

#[test]
fn cross_patch_is_causal_and_reaches_back_across_patches() {
    let cfg = cross_patch_config();
    let (model, params) = MegaByte::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let t = cfg.context;
    let base = random_bytes(t, 5);
    let logits = |m: &MegaByte, x: &[u8]| m.logits(&bytes_tensor(&[x.to_vec()])).unwrap().squeeze(0).unwrap();
    let full = logits(&model, &base);
    for pos in 0..t {
        let mut changed = base.clone();
        changed[pos] ^= 0x5a;
        let other = logits(&model, &changed);
        let upto = |x: &Tensor| x.narrow(0, 0, pos + 1).unwrap();
        assert_eq!(crate::max_abs_diff(&upto(&full), &upto(&other)), 0.0, "byte {pos} changed logits at positions ≤ {pos}");
    }
    // Without the global model's contribution (w_GL = 0) only the local model carries
    // bytes forward: byte j is the input at position j + 1, and 2 layers of windows of 3
    // see back 2·(3 − 1) positions, so byte j reaches positions j + 1 ..= j + 5, also
    // across patch boundaries (byte 3 is the last of patch 0).
    let w_gl = &params.vars()["global_to_local.weight"];
    w_gl.set(&w_gl.zeros_like().unwrap()).unwrap();
    let local_only = logits(&model, &base);
    for j in [2usize, 3, 9, 14] {
        let mut changed = base.clone();
        changed[j] ^= 0x5a;
        let other = logits(&model, &changed);
        let at = |x: &Tensor, i: usize| x.narrow(0, i, 1).unwrap();
        for i in j + 1..=j + 5 {
            assert!(crate::max_abs_diff(&at(&local_only, i), &at(&other, i)) > 0.0, "byte {j} must reach position {i}");
        }
        let far = j + 6;
        let rest = |x: &Tensor| x.narrow(0, far, t - far).unwrap();
        assert_eq!(crate::max_abs_diff(&rest(&local_only), &rest(&other)), 0.0, "byte {j} reached past position {}", j + 5);
    }
}

#[test]
fn cross_patch_decodes_like_the_full_forward_across_slides() {
    let cfg = cross_patch_config();
    let (model, _) = MegaByte::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let t = cfg.context;
    // Two and a half windows of bytes: the decoder slides to the last half of its window at
    // patch boundaries; each step's logits must equal the full forward over the bytes of
    // the window it holds then.
    let rows = vec![random_bytes(5 * t / 2, 21), random_bytes(5 * t / 2, 22)];
    for prompt in [0usize, 5, 16] {
        let prompts: Vec<Vec<u8>> = rows.iter().map(|r| r[..prompt].to_vec()).collect();
        let mut decoder = Decoder::new(&model, &prompts, &Device::Cpu).unwrap();
        let mut window_start = 0;
        for pos in prompt..rows[0].len() {
            let n = pos - window_start;
            if n % cfg.patch_size == 0 && n + cfg.patch_size > t && n > 0 {
                window_start += n - t / 2; // the decoder keeps the last half (patch-aligned)
            }
            let step = decoder.logits().unwrap();
            let window: Vec<Vec<u8>> = rows.iter().map(|r| r[window_start..pos + 1].to_vec()).collect();
            let padded: Vec<Vec<u8>> = window
                .iter()
                .map(|w| {
                    let mut w = w.clone();
                    w.resize(w.len().div_ceil(cfg.patch_size) * cfg.patch_size, 0);
                    w
                })
                .collect();
            let full = model.logits(&bytes_tensor(&padded)).unwrap();
            let want = full.narrow(1, pos - window_start, 1).unwrap().squeeze(1).unwrap();
            let diff = crate::max_abs_diff(&step, &want);
            assert!(diff < 1e-4, "prompt {prompt}: byte {pos} (window from {window_start}) differs by {diff}");
            decoder.push(&rows.iter().map(|r| r[pos]).collect::<Vec<u8>>()).unwrap();
        }
    }
}

#[test]
fn cross_patch_explicit_backward_equals_the_reference_autograd() {
    let cfg = cross_patch_config();
    let (model, params) = MegaByte::init(&cfg, 9, DType::F64, &Device::Cpu).unwrap();
    for t in [cfg.context, cfg.context / 2] {
        let rows: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(t, 60 + i)).collect();
        let x = bytes_tensor(&rows);
        let auto = (crate::reference::loss(&cfg, &params, &x, None) * 0.5).unwrap().backward().unwrap();
        let w = (megabyte::model::mean_weights(&x).unwrap() * 0.5).unwrap();
        let (_, grads) = model.loss_and_grads(&x, &w, megabyte::model::TrainPass::default()).unwrap();
        crate::assert_grads_equal(&params, &megabyte::grad::Grads::from_store(&auto, params.vars()).unwrap(), &grads, &format!("cross-patch T'={t}"));
    }
}

#[test]
fn cross_patch_flops_count_the_local_window() {
    let cfg = cross_patch_config();
    let mut within = cfg.clone();
    within.cross_patch = false;
    within.local.window = None;
    // Local attention: 12·L·D_L per byte and key; 3 keys across patches against P = 4 within.
    let per_key = 12.0 * (cfg.local.layers * cfg.local.width) as f64;
    let diff = within.train_flops_per_byte() - cfg.train_flops_per_byte();
    assert!((diff - per_key).abs() < 1e-6, "{diff} vs {per_key}");
}
