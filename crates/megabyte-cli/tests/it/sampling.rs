//! Sampling rules: greedy is the argmax, top-k 1 is greedy, a seed fixes the output.

use megabyte::generate::{generate, Sampler, Sampling};
use megabyte::Device;

use crate::tiny;

#[test]
fn sampling_rules_behave() {
    let logits: Vec<f32> = (0..256).map(|i| if i == 42 { 5.0 } else { (i % 7) as f32 * 0.1 }).collect();
    assert_eq!(Sampler::new(Sampling::Greedy, 0).unwrap().sample(&logits), 42);
    let mut k1 = Sampler::new(Sampling::TopK { k: 1, temperature: 1.0 }, 3).unwrap();
    assert!((0..50).all(|_| k1.sample(&logits) == 42));
    let mut tiny_p = Sampler::new(Sampling::TopP { p: 1e-6, temperature: 1.0 }, 3).unwrap();
    assert!((0..50).all(|_| tiny_p.sample(&logits) == 42));
    let mut hot = Sampler::new(Sampling::Temperature { temperature: 100.0 }, 3).unwrap();
    let distinct: std::collections::BTreeSet<u8> = (0..200).map(|_| hot.sample(&logits)).collect();
    assert!(distinct.len() > 50, "a high temperature should spread the samples");
    assert!(Sampler::new(Sampling::TopP { p: 0.0, temperature: 1.0 }, 0).is_err());
    assert!(Sampler::new(Sampling::Temperature { temperature: 0.0 }, 0).is_err());
}

#[test]
fn a_seed_fixes_the_sample_and_batches_decode_independently() {
    let (model, _) = tiny(2);
    let run = |seed| {
        let mut s = Sampler::new(Sampling::TopP { p: 0.9, temperature: 1.0 }, seed).unwrap();
        generate(&model, &[b"hello".to_vec(), b"world".to_vec()], 40, &mut s, &Device::Cpu, &mut |_| {}).unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    // Greedy decoding of a batch equals decoding each prompt alone.
    let greedy = |prompts: &[Vec<u8>]| {
        let mut s = Sampler::new(Sampling::Greedy, 0).unwrap();
        generate(&model, prompts, 30, &mut s, &Device::Cpu, &mut |_| {}).unwrap()
    };
    let both = greedy(&[b"abcdefghij".to_vec(), b"0123456789".to_vec()]);
    assert_eq!(both[1], greedy(&[b"0123456789".to_vec()])[0]);
    let empty = greedy(&[Vec::new(), Vec::new()]);
    assert_eq!(empty[0], empty[1]);
}
