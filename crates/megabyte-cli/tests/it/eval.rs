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
                    if s > 0.0 {
                        count[(w.start + i as u64) as usize] += 1;
                    }
                }
            }
            assert!(count.iter().all(|&c| c == 1), "len {len} stride {stride} strided {strided}: {count:?}");
        }
    }
}
