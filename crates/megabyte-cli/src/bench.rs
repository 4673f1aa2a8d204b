//! `megabyte bench`: training bytes/s, achieved FLOP/s and MFU, peak GPU memory and GPU idle
//! time between steps, and generation bytes/s, on random weights over the embedded corpus
//! (or `--data`, for contexts longer than it).
//! The device is synchronised before every clock read.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use megabyte::generate::{generate, generate_stepwise, Sampler, Sampling};
use megabyte::train::{DataSpec, TrainConfig, Trainer};

use crate::args::{ComputeArgs, ModelArgs};

/// Sequences per training step unless a recipe preset gives its own.
const BATCH_SIZE: usize = 4;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per training step [default: 4, or a recipe preset's].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Untimed warm-up training steps (none when --steps is 0).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Timed training steps (0: measure generation only).
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Training bytes for the steps: a file or a folder. Default: the embedded corpus (1.9 MB),
    /// so a longer context (T) needs a larger file here.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Bytes generated per generation measurement (0 = skip generation).
    #[arg(long, default_value_t = 512)]
    gen_bytes: usize,
    /// Batch sizes for generation, comma-separated.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    gen_batch: Vec<usize>,
    /// Generate on the stepwise path (one host round trip per byte) even where the CUDA
    /// decoding engine runs: the engine's reference, for measuring what it gains.
    #[arg(long)]
    stepwise: bool,
    #[command(flatten)]
    compute: ComputeArgs,
    /// The device's dense bf16 rate in TFLOP/s, for MFU (default: 790 on CUDA, the H200's
    /// measured rate; none on the CPU).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Append the JSON object to this file as one line.
    #[arg(long)]
    jsonl: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = args.model.resolve()?;
    let device = megabyte::device(args.compute.device.name())?;
    // A recipe's step as it trains (its batch and dropout), else a plain one.
    let mut tc = args.model.recipe().unwrap_or_else(|| TrainConfig::standard(BATCH_SIZE, 1e-3));
    if let Some(b) = args.batch_size {
        tc.batch_size = b;
    }
    let batch_size = tc.batch_size;
    tc.steps = Some((args.warmup + args.steps).max(1));
    tc.time_minutes = None;
    tc.warmup_steps = 1;
    tc.precision = args.compute.device.precision.on(&device);
    tc.recompute = args.compute.recompute;
    let data = DataSpec { train: args.data.clone(), valid: None, holdout_bytes: 100_000, documents: false };
    let splits = data.open()?;
    splits.train.require(cfg.context, "the benchmark's data (the embedded corpus unless --data)")?;
    let mut trainer = Trainer::new(&cfg, tc, data, &device)?;
    // Measuring generation only (--steps 0) trains nothing, warm-up included.
    let warmup = if args.steps == 0 { 0 } else { args.warmup };
    for _ in 0..warmup {
        trainer.train_step(&splits.train)?;
    }
    device.synchronize()?;
    megabyte::gpu::reset_peak_memory(&device);
    let start = Instant::now();
    // GPU idle between steps: from the GPU finishing one step's work to it receiving the next
    // step's first (the host's data sampling, logging and bookkeeping, where not overlapped).
    let mut idle_ms = 0.0;
    let mut last_end: Option<megabyte::gpu::Mark> = None;
    for _ in 0..args.steps {
        let begin = megabyte::gpu::Mark::now(&device);
        if let (Some(end), Some(begin)) = (&last_end, &begin) {
            idle_ms += end.ms_until(begin).unwrap_or(0.0).max(0.0);
        }
        trainer.train_step(&splits.train)?;
        last_end = megabyte::gpu::Mark::now(&device);
    }
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let peak_memory = megabyte::gpu::peak_memory(&device);
    let peak_tflops = args.peak_tflops.or(megabyte::gpu::peak_tflops(&device));
    let trained = args.steps > 0;
    let train_bytes_per_sec = (args.steps as usize * batch_size * cfg.context) as f64 / secs.max(1e-9);
    let flops_per_byte = cfg.train_flops_per_byte();
    let train_tflops = train_bytes_per_sec * flops_per_byte / 1e12;
    let mfu = peak_tflops.filter(|_| trained).map(|p| train_tflops / p);
    let idle_per_step = (device.is_cuda() && trained).then(|| idle_ms / (args.steps.max(2) - 1) as f64);
    let mut generation = Vec::new();
    if args.gen_bytes > 0 {
        // Sampling runs on parameters in the activations' dtype, as `megabyte generate` loads them.
        let act = trainer.model().activation_dtype();
        let (gen_model, _gen_params) = trainer.model().converted(trainer.params(), act)?;
        for &b in &args.gen_batch {
            let mut sampler = Sampler::new(Sampling::Greedy, 0)?;
            let prompts = vec![Vec::new(); b];
            let run = if args.stepwise { generate_stepwise } else { generate };
            // One untimed short run warms caches and kernels.
            run(&gen_model, &prompts, cfg.patch_size * 2, &mut sampler, &device, &mut |_| {})?;
            device.synchronize()?;
            let start = Instant::now();
            run(&gen_model, &prompts, args.gen_bytes, &mut sampler, &device, &mut |_| {})?;
            device.synchronize()?;
            let secs = start.elapsed().as_secs_f64();
            generation.push(serde_json::json!({
                "batch": b,
                "bytes": args.gen_bytes,
                "bytes_per_sec": (b * args.gen_bytes) as f64 / secs,
                "secs": secs,
                "stepwise": args.stepwise,
            }));
        }
    }
    let counts = cfg.param_counts();
    // The instruction set the CPU kernels run in (ops::vector_level), on the CPU only.
    let cpu_vector = device.is_cpu().then(|| format!("{:?}", megabyte::ops::vector_level()).to_lowercase());
    let record = serde_json::json!({
        "preset": args.model.config.is_none().then(|| args.model.preset_name()),
        "device": args.compute.device.name(),
        "precision": format!("{:?}", trainer.record().train.precision).to_lowercase(),
        "recompute": trainer.record().train.recompute,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_vector": cpu_vector,
        "params": counts.total,
        "batch_size": batch_size,
        "context": cfg.context,
        "steps": args.steps,
        "train_bytes_per_sec": trained.then_some(train_bytes_per_sec),
        "train_step_ms": trained.then(|| secs * 1e3 / args.steps as f64),
        "train_tflops": trained.then_some(train_tflops),
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "peak_memory_gib": peak_memory.map(|b| b as f64 / (1u64 << 30) as f64),
        "gpu_idle_ms_per_step": idle_per_step,
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
    println!("{:<28} {}", "model", args.model.describe());
    println!("{:<28} {:.2}M", "parameters", counts.total as f64 / 1e6);
    println!("{:<28} {}", "device", args.compute.device.name());
    if let Some(level) = &cpu_vector {
        println!("{:<28} {level}", "CPU kernels' vector level");
    }
    if trained {
        println!("{:<28} {} × {} bytes", "training batch", batch_size, cfg.context);
        println!("{:<28} {:.0}", "training bytes/s", train_bytes_per_sec);
        println!("{:<28} {:.1}", "training step ms", secs * 1e3 / args.steps as f64);
        println!("{:<28} {:.3}", "training TFLOP/s", train_tflops);
    }
    if let (Some(mfu), Some(peak)) = (mfu, peak_tflops) {
        println!("{:<28} {:.1}% of {peak} TFLOP/s", "MFU", 100.0 * mfu);
    }
    if let Some(bytes) = peak_memory {
        println!("{:<28} {:.2} GiB", "peak GPU memory", bytes as f64 / (1u64 << 30) as f64);
    }
    if let Some(idle) = idle_per_step {
        println!("{:<28} {:.2}", "GPU idle ms between steps", idle);
    }
    for g in &generation {
        println!(
            "{:<28} {:.0} ({} bytes in {:.2} s)",
            format!("generation bytes/s (B={})", g["batch"]),
            g["bytes_per_sec"].as_f64().unwrap_or(0.0),
            g["bytes"],
            g["secs"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
