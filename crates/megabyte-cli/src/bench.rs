//! `megabyte bench`: training bytes/s and achieved FLOP/s, and generation bytes/s, on random
//! weights over the embedded corpus. The device is synchronised before every clock read.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use megabyte::generate::{generate, Sampler, Sampling};
use megabyte::train::{DataSpec, TrainConfig, Trainer};

use crate::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per training step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Timed training steps.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Bytes generated per generation measurement (0 = skip generation).
    #[arg(long, default_value_t = 512)]
    gen_bytes: usize,
    /// Batch sizes for generation, comma-separated.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    gen_batch: Vec<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Activations' format: f32, bf16 (mixed precision, CUDA only) or auto (bf16 on CUDA).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Append the JSON object to this file as one line.
    #[arg(long)]
    jsonl: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = args.model.resolve()?;
    let device = megabyte::device(&args.device)?;
    let mut tc = TrainConfig::standard(args.batch_size, 1e-3);
    tc.steps = Some(args.warmup + args.steps);
    tc.warmup_steps = 1;
    tc.precision = megabyte::Precision::parse(&args.precision, &device)?;
    let data = DataSpec { train: None, valid: None, holdout_bytes: 100_000 };
    let splits = data.open()?;
    let mut trainer = Trainer::new(&cfg, tc, data, &device)?;
    for _ in 0..args.warmup {
        trainer.train_step(&splits.train)?;
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..args.steps {
        trainer.train_step(&splits.train)?;
    }
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let train_bytes_per_sec = (args.steps as usize * args.batch_size * cfg.context) as f64 / secs;
    let flops_per_byte = cfg.train_flops_per_byte();
    let mut generation = Vec::new();
    if args.gen_bytes > 0 {
        for &b in &args.gen_batch {
            let mut sampler = Sampler::new(Sampling::Greedy, 0)?;
            let prompts = vec![Vec::new(); b];
            // One untimed short run warms caches and kernels.
            generate(trainer.model(), &prompts, cfg.patch_size * 2, &mut sampler, &device, &mut |_| {})?;
            device.synchronize()?;
            let start = Instant::now();
            generate(trainer.model(), &prompts, args.gen_bytes, &mut sampler, &device, &mut |_| {})?;
            device.synchronize()?;
            let secs = start.elapsed().as_secs_f64();
            generation.push(serde_json::json!({
                "batch": b,
                "bytes": args.gen_bytes,
                "bytes_per_sec": (b * args.gen_bytes) as f64 / secs,
                "secs": secs,
            }));
        }
    }
    let counts = cfg.param_counts();
    let record = serde_json::json!({
        "preset": args.model.config.is_none().then_some(&args.model.preset),
        "device": args.device,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "params": counts.total,
        "batch_size": args.batch_size,
        "context": cfg.context,
        "steps": args.steps,
        "train_bytes_per_sec": train_bytes_per_sec,
        "train_step_ms": secs * 1e3 / args.steps as f64,
        "train_tflops": train_bytes_per_sec * flops_per_byte / 1e12,
        "flops_per_byte": flops_per_byte,
        "generation": generation,
    });
    if let Some(path) = &args.jsonl {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{record}")?;
    }
    if args.json {
        println!("{record}");
        return Ok(());
    }
    println!("{:<28} {}", "model", args.model.config.as_ref().map_or(args.model.preset.clone(), |p| p.display().to_string()));
    println!("{:<28} {:.2}M", "parameters", counts.total as f64 / 1e6);
    println!("{:<28} {}", "device", args.device);
    println!("{:<28} {} × {} bytes", "training batch", args.batch_size, cfg.context);
    println!("{:<28} {:.0}", "training bytes/s", train_bytes_per_sec);
    println!("{:<28} {:.1}", "training step ms", secs * 1e3 / args.steps as f64);
    println!("{:<28} {:.3}", "training TFLOP/s", train_bytes_per_sec * flops_per_byte / 1e12);
    for g in &generation {
        println!("{:<28} {:.0}", format!("generation bytes/s (B={})", g["batch"]), g["bytes_per_sec"].as_f64().unwrap_or(0.0));
    }
    Ok(())
}
