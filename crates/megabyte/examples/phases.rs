//! Splits a CPU training step of a preset into forward, backward and optimizer time.
//! `cargo run --release --example phases -- tiny 4`
use std::time::Instant;

use megabyte::model::{mean_weights, TrainPass};
use megabyte::optim::{AdamW, AdamWConfig};
use megabyte::{DType, Device, MegaByte, ModelConfig, Tensor};

fn main() -> megabyte::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = ModelConfig::preset(args.get(1).map_or("tiny", |s| s))?;
    if std::env::var("RMS").is_ok() { cfg.norm = megabyte::NormKind::RmsNorm; }
    let b: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let (model, params) = MegaByte::init(&cfg, 0, DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(params.vars(), AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1 })?;
    let ids: Vec<u32> = (0..b * cfg.context).map(|i| (i * 7 % 256) as u32).collect();
    let x = Tensor::from_vec(ids, (b, cfg.context), &Device::Cpu)?;
    let (mut f, mut bw, mut o) = (0.0, 0.0, 0.0);
    let n = 30;
    for i in 0..n + 3 {
        let t0 = Instant::now();
        // Forward alone, then the training pass (forward and explicit backward): backward
        // time is the difference.
        let loss = model.loss(&x.clone())?.detach();
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let (_, grads) = model.loss_and_grads(&x, &mean_weights(&x)?, TrainPass::default())?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-3, 1.0)?;
        let t3 = Instant::now();
        if i >= 3 {
            f += (t1 - t0).as_secs_f64();
            bw += ((t2 - t1).as_secs_f64() - (t1 - t0).as_secs_f64()).max(0.0);
            o += (t3 - t2).as_secs_f64();
        }
    }
    let ms = |s: f64| s * 1e3 / n as f64;
    println!("forward {:.2} ms  backward {:.2} ms  optimizer {:.2} ms  bytes/s {:.0}", ms(f), ms(bw), ms(o), (b * cfg.context) as f64 * n as f64 / (f + bw + o));
    Ok(())
}
