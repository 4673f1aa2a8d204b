//! `megabyte train`: argument checking, the progress bar, the loss curve and a closing sample.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use megabyte::data::ByteStream;
use megabyte::generate::{generate, Sampler, Sampling};
use megabyte::train::{self, DataSpec, Decay, Event, StopReason, TrainConfig, Trainer};

use crate::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Training bytes: a file or a folder of files. Default: the embedded corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation bytes (a file or folder). Default: the last --valid-bytes of --data.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Document isolation: no predicted byte sees across its document's start. Documents are
    /// given by each file's OUT.documents.json (written by `megabyte data`), else each file is
    /// one; windows start at a document start (or T, 2T, … after it), and the padding after a
    /// document's end is not trained on or scored.
    #[arg(long)]
    documents: bool,
    /// Bytes held out from the end of --data for validation when --valid is not given
    /// [default: 5% of the data, at most 5 MB; 100 KB of the embedded corpus].
    #[arg(long)]
    valid_bytes: Option<u64>,
    /// Run folder: checkpoints, metrics.jsonl, loss.png [default with --resume: the resumed run's].
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder (or from this checkpoint) exactly where it stopped,
    /// with its recorded settings; only --steps and --time may be changed.
    #[arg(long, conflicts_with_all = ["data", "valid", "valid_bytes", "config", "context", "window", "documents"])]
    resume: Option<PathBuf>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of wall time (whichever of --steps and --time comes first).
    #[arg(long)]
    time: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Final learning rate [default: lr / 10].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Decay after warm-up: cosine or linear.
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "linear"])]
    decay: String,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Validate every N steps.
    #[arg(long, default_value_t = 250)]
    eval_every: u64,
    /// Validation bytes scored each time.
    #[arg(long, default_value_t = 100_000)]
    eval_bytes: u64,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Seed of the initial weights and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Activations' format: f32, bf16 (mixed precision, CUDA only) or auto (bf16 on CUDA).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Bytes to sample from the trained model at the end (0 = none).
    #[arg(long, default_value_t = 300)]
    sample_bytes: usize,
}

pub fn run(args: Args) -> Result<()> {
    let device = megabyte::device(&args.device)?;
    let resuming = args.resume.is_some();
    let out = match (&args.out, &args.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(resume)) => run_folder_of(resume),
        (None, None) => bail!("--out is required"),
    };
    let mut trainer = match &args.resume {
        Some(path) => {
            let limits = (args.steps.is_some() || args.time.is_some()).then_some((args.steps, args.time));
            Trainer::resume(path, limits, &device)?
        }
        None => {
            let model_cfg = args.model.resolve()?;
            let cfg = train_config(&args, &device)?;
            let data = data_spec(&args)?;
            Trainer::new(&model_cfg, cfg, data, &device)?
        }
    };
    let data = trainer.record().data.open()?;
    let cfg = trainer.model().config().clone();
    let need = if data.train.documents().is_some() { 1 } else { cfg.context };
    data.train.require(need, "the training data")?;
    data.valid.require(1, "the validation data")?;
    train::prepare_run_dir(&out, resuming)?;
    let counts = cfg.param_counts();
    eprintln!(
        "model: {:.2}M parameters (global {:.2}M, local {:.2}M), P = {}, T = {}; data: {} ({} train / {} valid bytes{})",
        counts.total as f64 / 1e6,
        counts.global as f64 / 1e6,
        counts.local as f64 / 1e6,
        cfg.patch_size,
        cfg.context,
        data.train.name(),
        data.train.len(),
        data.valid.len(),
        match (data.train.documents(), data.valid.documents()) {
            (Some(t), Some(v)) => format!("; {} / {} isolated documents", t.len(), v.len()),
            _ => String::new(),
        }
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130); // a second Ctrl-C: leave now
            }
        })
        .context("installing the Ctrl-C handler")?;
    }

    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta} {msg}")
            .expect("valid template"),
    );
    let limits = (trainer.record().train.steps, trainer.record().train.time_minutes);
    let mut on_event = |event: Event| match event {
        Event::Step(s) => {
            let by_steps = limits.0.map_or(0.0, |n| s.step as f64 / n as f64);
            let by_time = limits.1.map_or(0.0, |m| s.elapsed_secs / (m * 60.0));
            bar.set_position((by_steps.max(by_time).min(1.0) * 1000.0) as u64);
            bar.set_message(format!(
                "step {} loss {:.3} bpb {:.3} {:.0} B/s",
                s.step, s.loss, s.bpb, s.bytes_per_sec
            ));
        }
        Event::Eval { step, report } => {
            say(&bar, format!("step {step:>6}: valid bpb {:.3} ({} bytes)", report.bpb, report.bytes))
        }
        Event::Checkpoint { path, .. } => say(&bar, format!("saved {}", path.display())),
    };
    let summary = train::run(&mut trainer, &data, &out, &stop, &mut on_event)?;
    bar.finish_and_clear();

    let png = out.join("loss.png");
    crate::plot::loss_curve(&out.join("metrics.jsonl"), &png)
        .with_context(|| format!("drawing {}", png.display()))?;
    match summary.reason {
        StopReason::Interrupted => eprintln!("interrupted at step {}: checkpoint saved", summary.steps),
        StopReason::Steps | StopReason::Time => {}
    }
    let before = summary.first_valid_bpb.map_or("-".to_string(), |b| format!("{b:.3}"));
    println!(
        "valid bpb {before} -> {:.3} after {} steps ({:.1}M bytes seen)",
        summary.final_valid_bpb,
        summary.steps,
        summary.bytes_seen as f64 / 1e6
    );
    println!("checkpoint: {}", summary.checkpoint.display());
    println!("loss curve: {}", png.display());
    if args.sample_bytes > 0 {
        let mut sampler = Sampler::new(Sampling::TopP { p: 0.9, temperature: 0.8 }, args.seed)?;
        let prompt = data.valid.window(0, cfg.patch_size * 4);
        let sample = generate(trainer.model(), &[prompt.clone()], args.sample_bytes, &mut sampler, &device, &mut |_| {})?;
        println!("sample (prompt in brackets):\n[{}]{}", String::from_utf8_lossy(&prompt), String::from_utf8_lossy(&sample[0]));
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when there is no terminal to draw it on.
pub fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The run folder of a checkpoint folder (its parent) or of a run folder (itself).
fn run_folder_of(path: &std::path::Path) -> PathBuf {
    if path.join(megabyte::checkpoint::CONFIG_FILE).is_file() {
        path.parent().map_or_else(|| PathBuf::from("."), |p| p.to_path_buf())
    } else {
        path.to_path_buf()
    }
}

fn train_config(args: &Args, device: &megabyte::Device) -> Result<TrainConfig> {
    let mut cfg = TrainConfig::standard(args.batch_size, args.lr);
    cfg.grad_accum = args.grad_accum;
    cfg.min_lr = args.min_lr.unwrap_or(args.lr / 10.0);
    cfg.warmup_steps = args.warmup;
    cfg.decay = if args.decay == "linear" { Decay::Linear } else { Decay::Cosine };
    cfg.steps = args.steps;
    cfg.time_minutes = args.time;
    cfg.adamw.weight_decay = args.weight_decay;
    cfg.grad_clip = args.grad_clip;
    cfg.eval_every = args.eval_every;
    cfg.eval_bytes = args.eval_bytes;
    cfg.checkpoint_every = args.checkpoint_every;
    cfg.keep_checkpoints = args.keep;
    cfg.seed = args.seed;
    cfg.precision = megabyte::Precision::parse(&args.precision, device)?;
    cfg.validate()?;
    Ok(cfg)
}

fn data_spec(args: &Args) -> Result<DataSpec> {
    let holdout_bytes = match (&args.valid, args.valid_bytes, &args.data) {
        (Some(_), Some(_), _) => bail!("give either --valid or --valid-bytes, not both"),
        (Some(_), None, _) => 0,
        (None, Some(n), _) => n,
        (None, None, None) => 100_000,
        (None, None, Some(path)) => {
            let len = ByteStream::open(path)?.len();
            (len / 20).clamp(1, 5_000_000)
        }
    };
    Ok(DataSpec { train: args.data.clone(), valid: args.valid.clone(), holdout_bytes, documents: args.documents })
}
