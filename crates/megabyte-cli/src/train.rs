//! `megabyte train`: argument checking, the progress bar, the loss curve and a closing sample;
//! with `--devices` the multi-GPU launcher (`launch.rs`), and with WORLD_SIZE in the
//! environment one rank (worker) of a multi-GPU job.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use megabyte::data::ByteStream;
use megabyte::generate::{generate, Sampler, Sampling};
use megabyte::dist::DistEnv;
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
    /// with its recorded settings; only --steps and --time may be changed (besides where it
    /// runs: --device, --devices, --out, and --sample-bytes). Any other setting is refused,
    /// not ignored.
    #[arg(long, conflicts_with_all = [
        "preset", "config", "context", "window", "data", "valid", "valid_bytes", "documents",
        "batch_size", "grad_accum", "lr", "min_lr", "warmup", "decay", "weight_decay", "grad_clip",
        "dropout", "eval_every", "eval_bytes", "checkpoint_every", "keep", "seed", "precision", "recompute",
    ])]
    resume: Option<PathBuf>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of wall time (whichever of --steps and --time comes first).
    #[arg(long)]
    time: Option<f64>,
    /// Sequences per micro-batch: the global batch, split evenly over the GPUs of a multi-GPU
    /// run (so it must be a multiple of their number).
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
    /// Dropout probability of every block's attention and MLP outputs (the paper used 0.1)
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
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
    /// cpu, cuda or cuda:N [default: cpu; as a rank of a multi-GPU job: cuda:LOCAL_RANK].
    #[arg(long)]
    device: Option<String>,
    /// Train on several GPUs of this host, data-parallel: `0,1,2,3` or `all`. Starts one
    /// worker process per GPU; each trains on its slice of every batch and the gradients are
    /// summed over NCCL, so the result is the one-GPU run's with the same --batch-size.
    /// For several hosts, start one `megabyte train` per GPU yourself, with RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR and MASTER_PORT set as for torchrun (README: Several GPUs).
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// Multi-GPU: seconds a worker waits for the others (to join, or to finish a gradient
    /// exchange) before it stops the whole job with an error. Must exceed rank 0's longest
    /// validation plus checkpoint save.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    nccl_timeout: f64,
    /// Activations' format: f32, bf16 (mixed precision, CUDA only) or auto (bf16 on CUDA).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (activation checkpointing): the same gradients for about a third more compute, when a
    /// sequence's activations would not fit in memory.
    #[arg(long)]
    recompute: bool,
    /// Bytes to sample from the trained model at the end (0 = none).
    #[arg(long, default_value_t = 300)]
    sample_bytes: usize,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(list) = args.devices.as_deref() {
        return crate::launch::run(list, args.device.as_deref());
    }
    if !(args.nccl_timeout > 0.0 && args.nccl_timeout.is_finite()) {
        bail!("--nccl-timeout must be a positive number of seconds");
    }
    let dist = DistEnv::from_env()?;
    match &dist {
        None => train(args, None),
        Some(env) => {
            let (rank, world) = (env.rank, env.world_size);
            train(args, dist).with_context(|| format!("rank {rank} of {world}"))
        }
    }
}

/// The device of one rank of a multi-GPU job: cuda:LOCAL_RANK unless --device names a GPU.
fn worker_device(spec: Option<&str>, env: &DistEnv) -> Result<megabyte::Device> {
    let spec = match spec.map(str::trim) {
        None | Some("cuda") => format!("cuda:{}", env.local_rank),
        Some(s) if s.starts_with("cuda:") => s.to_string(),
        Some(other) => bail!(
            "WORLD_SIZE={} is set, so this is one rank of a multi-GPU job, which trains on CUDA: use --device cuda \
             (GPU LOCAL_RANK) or cuda:N, not {other}",
            env.world_size
        ),
    };
    Ok(megabyte::device(&spec)?)
}

/// Trains alone (`dist` None) or as one rank of a multi-GPU job.
fn train(args: Args, dist: Option<DistEnv>) -> Result<()> {
    let device = match &dist {
        None => megabyte::device(args.device.as_deref().unwrap_or("cpu"))?,
        Some(env) => worker_device(args.device.as_deref(), env)?,
    };
    let leader = dist.as_ref().is_none_or(|env| env.rank == 0);
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
    if let Some(env) = &dist {
        megabyte::dist::rank_rows(trainer.record().train.batch_size, env.world_size, env.rank)?;
    }
    if leader {
        train::prepare_run_dir(&out, resuming)?;
    }
    if let Some(env) = &dist {
        join_job(&mut trainer, env, &device, args.nccl_timeout)?;
    }
    let counts = cfg.param_counts();
    if leader {
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
        if let Some(env) = &dist {
            let batch = trainer.record().train.batch_size;
            eprintln!(
                "data-parallel over {} GPUs: {} of the {batch} sequences of every batch on each, gradients summed over NCCL",
                env.world_size,
                batch / env.world_size
            );
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let mut first = None;
        ctrlc::set_handler(move || {
            stop.store(true, Ordering::SeqCst);
            if leave_now(&mut first, Instant::now()) {
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }

    let bar = if leader { ProgressBar::new(1000) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta} {msg}")
            .expect("valid template"),
    );
    let limits = (trainer.record().train.steps, trainer.record().train.time_minutes);
    let mut on_event = |event: Event| match event {
        _ if !leader => {}
        Event::Step(s) => {
            let by_steps = limits.0.map_or(0.0, |n| s.step as f64 / n as f64);
            let by_time = limits.1.map_or(0.0, |m| s.elapsed_secs / (m * 60.0));
            bar.set_position((by_steps.max(by_time).min(1.0) * 1000.0) as u64);
            let mfu = s.mfu.map_or(String::new(), |m| format!(" {:.0}% MFU", 100.0 * m));
            bar.set_message(format!("step {} loss {:.3} bpb {:.3} {:.0} B/s{mfu}", s.step, s.loss, s.bpb, s.bytes_per_sec));
        }
        Event::Eval { step, report } => {
            say(&bar, format!("step {step:>6}: valid bpb {:.3} ({} bytes)", report.bpb, report.bytes))
        }
        Event::Checkpoint { path, .. } => say(&bar, format!("saved {}", path.display())),
    };
    let summary = train::run(&mut trainer, &data, &out, &stop, &mut on_event)?;
    trainer.leave()?;
    bar.finish_and_clear();
    if !leader {
        return Ok(());
    }

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
    if let Some(bytes) = megabyte::gpu::peak_memory(&device) {
        let whose = if dist.is_some() { " (rank 0's GPU)" } else { "" };
        println!("peak GPU memory: {:.1} GiB{whose}", bytes as f64 / (1u64 << 30) as f64);
    }
    if args.sample_bytes > 0 {
        let mut sampler = Sampler::new(Sampling::TopP { p: 0.9, temperature: 0.8 }, args.seed)?;
        let prompt = data.valid.window(0, cfg.patch_size * 4);
        let sample = generate(trainer.model(), &[prompt.clone()], args.sample_bytes, &mut sampler, &device, &mut |_| {})?;
        println!("sample (prompt in brackets):\n[{}]{}", String::from_utf8_lossy(&prompt), String::from_utf8_lossy(&sample[0]));
    }
    Ok(())
}

/// Joins the multi-GPU job `env` describes: the rendezvous with rank 0, NCCL, and rank 0's
/// weights broadcast to all.
#[cfg(feature = "cuda")]
fn join_job(trainer: &mut Trainer, env: &DistEnv, device: &megabyte::Device, timeout_secs: f64) -> Result<()> {
    use megabyte::dist::nccl::NcclGroup;
    let (rank, world) = (env.rank, env.world_size);
    // The watchdog's last words before it ends this process (see `megabyte::dist::nccl`).
    let report = Box::new(move |msg: &str| eprintln!("error: rank {rank} of {world}: {msg}"));
    let timeout = std::time::Duration::from_secs_f64(timeout_secs);
    let group = NcclGroup::connect(env, device, &trainer.fingerprint()?, timeout, report)?;
    trainer.join(Box::new(group), megabyte::dist::BUCKET_BYTES)?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn join_job(_: &mut Trainer, _: &DistEnv, _: &megabyte::Device, _: f64) -> Result<()> {
    bail!("multi-GPU training needs a build with `--features cuda` (this one is CPU-only)")
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
    cfg.recompute = args.recompute;
    cfg.dropout = args.dropout;
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

/// Whether a Ctrl-C at `now` means "leave now": a second one, a second or more after the first
/// (recorded in `first`). The first asks for a clean stop with a checkpoint. One signal can
/// arrive twice at once, sent to the process and to its process group, as `timeout -s INT`
/// does; that is still one.
fn leave_now(first: &mut Option<Instant>, now: Instant) -> bool {
    match *first {
        None => {
            *first = Some(now);
            false
        }
        Some(t) => now.saturating_duration_since(t) >= Duration::from_secs(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_later_second_ctrl_c_leaves_at_once() {
        let t = Instant::now();
        let mut first = None;
        assert!(!leave_now(&mut first, t), "the first asks for a clean stop");
        assert!(!leave_now(&mut first, t + Duration::from_millis(20)), "the same signal delivered twice");
        assert!(leave_now(&mut first, t + Duration::from_millis(1500)), "a second Ctrl-C");
    }
}
