//! Cached generation (global step per patch, local step per byte) gives the full forward
//! pass's logits on the same bytes.

use megabyte::generate::Decoder;
use megabyte::{Device, MegaByte};

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

#[test]
fn decoding_past_the_context_slides_the_window() {
    let (model, _) = tiny(6);
    let t = model.config().context;
    let mut decoder = Decoder::new(&model, &[b"abc".to_vec()], &Device::Cpu).unwrap();
    for i in 0..(2 * t + 5) {
        let logits = decoder.logits().unwrap();
        assert_eq!(logits.dims(), &[1, 256]);
        decoder.push(&[(i % 251) as u8]).unwrap();
    }
    assert_eq!(decoder.history()[0].len(), 3 + 2 * t + 5);
}

#[test]
fn a_cache_refuses_steps_of_another_batch() {
    // Positions cached for 2 sequences cannot be continued by a step over 3: that would drop
    // them silently.
    let (model, _) = tiny(5);
    let mut cache = model.global_cache();
    model.global_step(2, None, &mut cache).unwrap();
    let p = model.config().patch_size;
    let three = crate::bytes_tensor(&vec![vec![7u8; p]; 3]);
    let err = model.global_step(3, Some(&three), &mut cache).unwrap_err().to_string();
    assert!(err.contains("reset it first"), "{err}");
    assert_eq!(cache.len(), 1, "the refused step changed the cache");
}
