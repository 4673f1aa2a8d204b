//! Evaluation scores every byte exactly once in each setting.

use std::sync::Arc;

use megabyte::data::{ByteStream, Split};
use megabyte::eval::{evaluate, EvalSettings};
use megabyte::Device;

use crate::{random_bytes, tiny};

#[test]
fn every_setting_scores_every_byte_once() {
    let (model, _) = tiny(4);
    let bytes: &'static [u8] = Box::leak(random_bytes(1000, 8).into_boxed_slice());
    let split = Split::all(Arc::new(ByteStream::from_static("random", bytes)));
    let mut results = Vec::new();
    for (strided, sliding) in [(false, None), (false, Some(64)), (true, None), (true, Some(128))] {
        let settings = EvalSettings { strided, sliding, batch_size: 3 };
        let r = evaluate(&model, &split, settings, None, &Device::Cpu, &mut |_, _| {}).unwrap();
        assert_eq!(r.bytes, 1000, "strided {strided} sliding {sliding:?}");
        // An untrained model is close to uniform: about 8 bits per byte.
        assert!((r.bpb - 8.0).abs() < 0.2, "bpb {}", r.bpb);
        results.push(r);
    }
    // Plain: 4 windows of 256 cover 1000 bytes; sliding by 64: 1 + ceil((1000-256)/64) = 13.
    assert_eq!(results[0].windows, 4);
    assert_eq!(results[1].windows, 13);
    assert_eq!(results[2].windows, 8);
}

#[test]
fn the_breakdowns_partition_the_scored_bytes() {
    // By patch position and by window position: every scored byte in exactly one slice, the
    // slices' byte-weighted mean the overall figure. Strided passes keep only the first half
    // of every patch; sliding windows after the first score only their last `stride` bytes.
    let (model, _) = tiny(4);
    let (t, p) = (model.config().context, model.config().patch_size);
    let bytes: &'static [u8] = Box::leak(random_bytes(1000, 8).into_boxed_slice());
    let split = Split::all(Arc::new(ByteStream::from_static("random", bytes)));
    for (strided, sliding) in [(false, None), (false, Some(64)), (true, None), (true, Some(128))] {
        let settings = EvalSettings { strided, sliding, batch_size: 3 };
        let r = evaluate(&model, &split, settings, None, &Device::Cpu, &mut |_, _| {}).unwrap();
        let what = format!("strided {strided} sliding {sliding:?}");
        assert_eq!(r.by_patch_position.len(), p);
        assert_eq!(r.by_window_position.len(), 8);
        for slices in [&r.by_patch_position, &r.by_window_position] {
            assert_eq!(slices.iter().map(|s| s.bytes).sum::<u64>(), r.bytes, "{what}");
            let mean = slices.iter().map(|s| s.bpb.unwrap_or(0.0) * s.bytes as f64).sum::<f64>() / r.bytes as f64;
            assert!(slices.iter().all(|s| s.bpb.is_some() == (s.bytes > 0)), "{what}: a figure without bytes");
            assert!((mean - r.bpb).abs() < 1e-4, "{what}: slices' mean {mean} against {}", r.bpb);
        }
        let by_patch: Vec<u64> = r.by_patch_position.iter().map(|s| s.bytes).collect();
        assert_eq!(by_patch.iter().skip(p / 2).any(|&n| n > 0), !strided, "{what}: {by_patch:?}");
        if sliding == Some(64) {
            // The first window scores all 256 positions (32 per range), later ones 192..256.
            let by_window: Vec<u64> = r.by_window_position.iter().map(|s| s.bytes).collect();
            assert!(by_window[..6].iter().all(|&n| n == 32), "{what}: {by_window:?}");
            assert_eq!(r.by_window_position[6].from, 6 * t / 8);
        }
    }
    // T = 36 (not a multiple of 8): the ranges still tile 0..T, and each holds the bytes of
    // its own positions (plain windows, all full: 10 windows score every position).
    let mut cfg = crate::small_config(megabyte::NormKind::LayerNorm, true);
    cfg.context = 36;
    let (model, _) = megabyte::MegaByte::init(&cfg, 1, megabyte::DType::F32, &Device::Cpu).unwrap();
    let split = Split::all(Arc::new(ByteStream::from_static("random", &bytes[..360])));
    let settings = EvalSettings { strided: false, sliding: None, batch_size: 4 };
    let r = evaluate(&model, &split, settings, None, &Device::Cpu, &mut |_, _| {}).unwrap();
    let ranges: Vec<(usize, usize, u64)> = r.by_window_position.iter().map(|s| (s.from, s.to, s.bytes)).collect();
    assert_eq!(ranges.first().map(|r| r.0), Some(0));
    assert_eq!(ranges.last().map(|r| r.1), Some(36));
    assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{ranges:?}");
    assert!(ranges.iter().all(|&(from, to, n)| n == 10 * (to - from) as u64), "{ranges:?}");
}

#[test]
fn plain_evaluation_equals_the_mean_training_loss_on_whole_windows() {
    let (model, _) = tiny(4);
    let bytes: &'static [u8] = Box::leak(random_bytes(512, 9).into_boxed_slice());
    let split = Split::all(Arc::new(ByteStream::from_static("random", bytes)));
    let settings = EvalSettings { strided: false, sliding: None, batch_size: 2 };
    let r = evaluate(&model, &split, settings, None, &Device::Cpu, &mut |_, _| {}).unwrap();
    let x = crate::bytes_tensor(&[bytes[..256].to_vec(), bytes[256..].to_vec()]);
    let loss = model.loss(&x).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((r.bpb - loss / std::f64::consts::LN_2).abs() < 1e-5);
}

#[test]
fn window_plans_cover_each_byte_exactly_once() {
    use megabyte::eval::windows;
    let (t, p) = (64, 8);
    for len in [1u64, 5, 63, 64, 65, 200, 1000] {
        for (stride, offsets, strided) in
            [(64, vec![0], false), (16, vec![0], false), (7, vec![0], false), (64, vec![0, 4], true), (24, vec![0, 4], true)]
        {
            let mut count = vec![0u32; len as usize];
            for w in windows(len, t, p, stride, &offsets, strided) {
                for (i, &s) in w.score.iter().enumerate() {
                    if s {
                        count[(w.start + i as u64) as usize] += 1;
                    }
                }
            }
            assert!(count.iter().all(|&c| c == 1), "len {len} stride {stride} strided {strided}: {count:?}");
        }
    }
}
