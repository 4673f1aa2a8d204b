//! The learning-rate schedule: linear warm-up, then cosine, linear or warm-up/stable/decay
//! (wsd) from lr to min_lr as the run's progress (steps after warm-up, or the share of --time
//! elapsed, whichever is further) goes to 1.

use megabyte::train::{learning_rate, Decay, TrainConfig};

use crate::{megabyte, temp_dir};

/// wsd holds lr until progress 1 − decay_fraction, then falls linearly to min_lr at 1 (and
/// stays there): continuous, non-increasing, and with decay_fraction 1 the linear decay.
#[test]
fn wsd_holds_the_peak_then_falls_linearly_over_the_last_fraction() {
    let mut cfg = TrainConfig::standard(2, 1e-3); // min_lr 1e-4, 100 warm-up steps
    cfg.decay = Decay::Wsd;
    cfg.decay_fraction = 0.25;
    assert_eq!(learning_rate(&cfg, 0, 0.0), 1e-3 / 100.0, "warm-up as for every decay");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
    for x in [0.0, 0.3, 0.75] {
        assert!(close(learning_rate(&cfg, 200, x), 1e-3), "stable at progress {x}");
    }
    assert!(close(learning_rate(&cfg, 200, 0.875), 0.55e-3), "halfway down at 7/8");
    assert!(close(learning_rate(&cfg, 200, 1.0), 1e-4) && close(learning_rate(&cfg, 200, 1.5), 1e-4), "min_lr at the end");
    let (n, mut prev) = (1000, f64::INFINITY);
    for i in 0..=n {
        let lr = learning_rate(&cfg, 200, i as f64 / n as f64);
        assert!(lr <= prev, "non-increasing");
        // one step of progress moves it by at most (lr − min_lr) / (decay_fraction · n)
        assert!(prev == f64::INFINITY || prev - lr <= 0.9e-3 / (0.25 * n as f64) + 1e-15, "continuous at {i}");
        prev = lr;
    }
    let mut linear = cfg.clone();
    linear.decay = Decay::Linear;
    cfg.decay_fraction = 1.0;
    for x in [0.0, 0.1, 0.5, 0.9, 1.0] {
        assert!(close(learning_rate(&cfg, 200, x), learning_rate(&linear, 200, x)), "decay_fraction 1 is the linear decay");
    }
}

/// A run with `--decay wsd`: its metrics show the warm-up, the stable phase at --lr and the
/// linear decay over the last --decay-fraction of the steps after warm-up; train.json records
/// the fraction, and a run of another decay records none (the default), as before.
#[test]
fn a_wsd_run_warms_up_holds_and_decays_over_its_last_fraction() {
    let dir = temp_dir("wsd");
    let run = dir.join("run");
    let common = ["train", "--batch-size", "2", "--steps", "10", "--warmup", "2", "--lr", "1e-3", "--min-lr", "1e-4", "--eval-every", "100", "--eval-bytes", "1024", "--sample-bytes", "0"];
    let args = [&common[..], &["--decay", "wsd", "--decay-fraction", "0.5", "--out", run.to_str().unwrap()]].concat();
    let (ok, stderr) = megabyte(&args);
    assert!(ok, "{stderr}");
    let lrs: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("lr").and_then(|lr| lr.as_f64()))
        .collect();
    // Step s (0-based) has progress (s − 2)/8: stable while below 1/2, then
    // lr·(1 − p)/(1/2) blended to min_lr.
    let want: Vec<f64> = (0..10)
        .map(|s: u64| {
            if s < 2 {
                return 1e-3 * (s + 1) as f64 / 2.0;
            }
            let p = (s - 2) as f64 / 8.0;
            1e-4 + 0.9e-3 * ((1.0 - p) / 0.5).min(1.0)
        })
        .collect();
    assert_eq!(lrs.len(), 10, "{lrs:?}");
    for (s, (got, want)) in lrs.iter().zip(&want).enumerate() {
        assert!((got - want).abs() < 1e-12, "step {s}: lr {got}, want {want} ({lrs:?})");
    }
    assert!(lrs[2..=6].iter().all(|&lr| lr == lrs[2]) && lrs[6] > lrs[7], "stable from warm-up to halfway: {lrs:?}");
    let record = |dir: &std::path::Path| -> serde_json::Value {
        let ckpt = megabyte::checkpoint::resolve(dir).unwrap();
        serde_json::from_slice(&std::fs::read(ckpt.join("train.json")).unwrap()).unwrap()
    };
    assert_eq!(record(&run)["train"]["decay_fraction"], 0.5);
    let cosine = dir.join("cosine");
    let (ok, stderr) = megabyte(&[&common[..], &["--out", cosine.to_str().unwrap()]].concat());
    assert!(ok, "{stderr}");
    assert!(record(&cosine)["train"].get("decay_fraction").is_none(), "the default is not written");
}
