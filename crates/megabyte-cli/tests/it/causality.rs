//! Perturbing byte t leaves the logits of positions ≤ t unchanged and changes later ones.

use megabyte::{MegaByte, NormKind};

use crate::{bytes_tensor, random_bytes, small_config, tiny};

fn check(model: &MegaByte, positions: &[usize]) {
    let t = model.config().context;
    let base = random_bytes(t, 3);
    let logits = model.logits(&bytes_tensor(&[base.clone()])).unwrap().squeeze(0).unwrap(); // [T, V]
    for &pos in positions {
        let mut changed = base.clone();
        changed[pos] = changed[pos].wrapping_add(97);
        let other = model.logits(&bytes_tensor(&[changed])).unwrap().squeeze(0).unwrap();
        let prefix = crate::max_abs_diff(&logits.narrow(0, 0, pos + 1).unwrap(), &other.narrow(0, 0, pos + 1).unwrap());
        assert_eq!(prefix, 0.0, "perturbing byte {pos} changed logits at positions ≤ {pos}");
        if pos + 1 < t {
            let next = crate::max_abs_diff(&logits.narrow(0, pos + 1, 1).unwrap(), &other.narrow(0, pos + 1, 1).unwrap());
            assert!(next > 0.0, "byte {pos} does not reach the prediction of byte {}", pos + 1);
        }
    }
}

#[test]
fn logits_depend_only_on_earlier_bytes() {
    let (model, _) = tiny(1);
    // Within a patch (local shift), the last byte of a patch (global shift), the first byte
    // of the next patch, and the end of the sequence.
    check(&model, &[0, 3, 6, 7, 8, 9, 15, 16, 100, 247, 248, 254, 255]);
}

#[test]
fn every_position_of_a_small_model_is_causal() {
    let cfg = small_config(NormKind::RmsNorm, false);
    let (model, _) = MegaByte::init(&cfg, 2, megabyte::DType::F32, &megabyte::Device::Cpu).unwrap();
    check(&model, &(0..cfg.context).collect::<Vec<_>>());
}

/// Hash n-gram embeddings hash only bytes up to their own: per patch and across patches,
/// every position stays causal.
#[test]
fn every_position_is_causal_with_hash_ngrams() {
    for cfg in [crate::ngram_config(), crate::cross_patch_ngram_config()] {
        let (model, _) = MegaByte::init(&cfg, 2, megabyte::DType::F32, &megabyte::Device::Cpu).unwrap();
        check(&model, &(0..cfg.context).collect::<Vec<_>>());
    }
}
