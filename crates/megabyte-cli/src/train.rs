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
use megabyte::train::{self, DataSpec, Event, RunSummary, StepStats, StopReason, TrainConfig, Trainer};
use megabyte::Precision;

use crate::args::{ComputeArgs, DecayArg, ModelArgs, PrecisionArg};

/// Bytes sampled at the end of a run that names no recipe.
const SAMPLE_BYTES: usize = 300;

#[derive(clap::Args)]
#[command(after_help = defaults_help())]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Run folder: checkpoints, metrics.jsonl, loss.png [default with --resume: the resumed run's].
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder (or from this checkpoint) exactly where it stopped,
    /// with its recorded settings. The command that started it may be given again with
    /// --resume added: every setting given must be the run's (one that is not is refused, not
    /// ignored). Only --steps and --time may change, besides where it runs (--device,
    /// --devices, --nccl-timeout, --out) and --sample-bytes.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
    #[command(flatten)]
    compute: ComputeArgs,
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
    /// Bytes to sample from the trained model at the end (0 = none).
    #[arg(long)]
    sample_bytes: Option<usize>,
    #[command(flatten)]
    media: crate::media::MediaArgs,
}

/// Where the bytes come from.
#[derive(clap::Args)]
struct DataArgs {
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
    #[arg(long, conflicts_with = "valid")]
    valid_bytes: Option<u64>,
}

/// The optimisation. Each setting left out is the recipe preset's, else the default
/// (listed at the end of `--help`); on --resume, the run's.
#[derive(clap::Args)]
struct OptimArgs {
    /// Sequences per micro-batch: the global batch, split evenly over the GPUs of a multi-GPU
    /// run (so it must be a multiple of their number).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate [default: lr / 10].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// Decay after warm-up: cosine or linear to --min-lr over the run, or wsd (constant, then
    /// linear to --min-lr over the last --decay-fraction of the run).
    #[arg(long, value_enum)]
    decay: Option<DecayArg>,
    /// With --decay wsd: the last share of the run (steps after warm-up, or of --time) over
    /// which the learning rate falls to --min-lr.
    #[arg(long, value_name = "F")]
    decay_fraction: Option<f64>,
    /// AdamW weight decay (matrices only).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Train the blocks' matrices (attention qkv and output, MLP up and down) with Muon at
    /// this peak learning rate (following the schedule's shape), and every other parameter
    /// (embeddings, norms, w_GL, the head) with AdamW at --lr [default: AdamW for all].
    #[arg(long, value_name = "LR")]
    muon_lr: Option<f64>,
    /// Muon's Nesterov momentum; turns Muon on like --muon-lr (at lr 0.02 unless given)
    /// [default: 0.95].
    #[arg(long, value_name = "BETA")]
    muon_momentum: Option<f64>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Dropout probability of every block's attention and MLP outputs (the paper used 0.1).
    #[arg(long)]
    dropout: Option<f64>,
    /// Seed of the initial weights and data order.
    #[arg(long)]
    seed: Option<u64>,
}

/// When the run stops, validates and saves.
#[derive(clap::Args)]
struct ScheduleArgs {
    /// Stop after this many optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of wall time (whichever of --steps and --time comes first).
    #[arg(long)]
    time: Option<f64>,
    /// Validate every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Validation bytes scored each time.
    #[arg(long)]
    eval_bytes: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    #[arg(long)]
    keep: Option<usize>,
}

/// `slot` replaced by `value` when there is one.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

impl OptimArgs {
    /// `cfg` with every setting given replacing its own; --lr without --min-lr sets both.
    fn apply(&self, cfg: &mut TrainConfig) {
        set(&mut cfg.batch_size, self.batch_size);
        set(&mut cfg.grad_accum, self.grad_accum);
        set(&mut cfg.min_lr, self.lr.map(|lr| lr / 10.0));
        set(&mut cfg.lr, self.lr);
        set(&mut cfg.min_lr, self.min_lr);
        set(&mut cfg.warmup_steps, self.warmup);
        set(&mut cfg.decay, self.decay.map(|d| d.0));
        set(&mut cfg.decay_fraction, self.decay_fraction);
        set(&mut cfg.adamw.weight_decay, self.weight_decay);
        if self.muon_lr.is_some() || self.muon_momentum.is_some() {
            let base = cfg.muon.unwrap_or(megabyte::optim::MuonConfig::DEFAULT);
            cfg.muon = Some(megabyte::optim::MuonConfig {
                lr: self.muon_lr.unwrap_or(base.lr),
                momentum: self.muon_momentum.unwrap_or(base.momentum),
                ..base
            });
        }
        set(&mut cfg.grad_clip, self.grad_clip);
        set(&mut cfg.dropout, self.dropout);
        set(&mut cfg.seed, self.seed);
    }
}

impl ScheduleArgs {
    /// `cfg` with every setting given replacing its own.
    fn apply(&self, cfg: &mut TrainConfig) {
        set(&mut cfg.steps, self.steps.map(Some));
        set(&mut cfg.time_minutes, self.time.map(Some));
        set(&mut cfg.eval_every, self.eval_every);
        set(&mut cfg.eval_bytes, self.eval_bytes);
        set(&mut cfg.checkpoint_every, self.checkpoint_every);
        set(&mut cfg.keep_checkpoints, self.keep);
    }
}

impl Args {
    /// `cfg` and `data` with every setting given replacing theirs.
    fn apply(&self, cfg: &mut TrainConfig, data: &mut DataSpec, device: &megabyte::Device) {
        self.optim.apply(cfg);
        self.schedule.apply(cfg);
        if self.compute.device.precision != PrecisionArg::Auto {
            cfg.precision = self.compute.device.precision.on(device);
        }
        cfg.recompute |= self.compute.recompute;
        set(&mut data.train, self.data.data.clone().map(Some));
        set(&mut data.valid, self.data.valid.clone().map(Some));
        set(&mut data.holdout_bytes, self.data.valid_bytes);
        data.documents |= self.data.documents;
    }

    /// A new run's settings: the recipe's or the defaults, then every flag given. The
    /// trainer validates them.
    fn train_config(&self, device: &megabyte::Device) -> Result<(TrainConfig, DataSpec)> {
        let mut cfg = self.model.recipe().unwrap_or_else(TrainConfig::defaults);
        cfg.precision = Precision::default_for(device);
        let mut data = DataSpec { train: None, valid: None, holdout_bytes: 0, documents: false };
        self.apply(&mut cfg, &mut data, device);
        if data.valid.is_none() && self.data.valid_bytes.is_none() {
            data.holdout_bytes = match &data.train {
                None => 100_000,
                Some(path) => (ByteStream::open(path)?.len() / 20).clamp(1, 5_000_000),
            };
        }
        Ok((cfg, data))
    }

    /// The stopping rules given to a resumed run, by flags or a recipe: they replace the
    /// recorded ones (both, even where one is given).
    fn stopping_rules(&self) -> Option<(Option<u64>, Option<f64>)> {
        let mut rules = self.model.recipe().map_or((None, None), |r| (r.steps, r.time_minutes));
        set(&mut rules.0, self.schedule.steps.map(Some));
        set(&mut rules.1, self.schedule.time.map(Some));
        (rules != (None, None)).then_some(rules)
    }

    fn sample_bytes(&self) -> usize {
        self.sample_bytes.unwrap_or(default_sample_bytes(self.model.recipe().as_ref()))
    }

    /// Refuses a resumed run's settings given anew that are not the run's: the first such
    /// flag, with its value and the run's. Runs after loading, before anything is written.
    fn check_agrees(&self, trainer: &Trainer, device: &megabyte::Device) -> Result<()> {
        let differs = |what: String, given: String, recorded: String| {
            anyhow::anyhow!(
                "{what} is {given} here and {recorded} in the resumed run, which keeps the settings it started with: \
                 only --steps, --time, --device, --devices, --nccl-timeout, --out and --sample-bytes may change"
            )
        };
        // The model: --config's or --preset's, or the run's, with --context and --window.
        let model = trainer.model().config();
        // Every field written out (optional ones at their defaults, as an export's config.json),
        // so that an option the run lacks reads as its default, not as missing.
        let json = |c: &megabyte::ModelConfig| megabyte::export::hf_config(c).expect("a model config is JSON");
        if let Some((field, g, r)) = first_difference(&json(&self.model.resolve_over(Some(model))?), &json(model)) {
            let what = match field.as_str() {
                "context" if self.model.context.is_some() => "--context".to_string(),
                "global.window" if self.model.window.is_some() => "--window".to_string(),
                "qk_norm" if self.model.qk_norm => "--qk-norm".to_string(),
                "mlp" if self.model.mlp.is_some() => "--mlp".to_string(),
                "zero_init_proj" if self.model.zero_init_proj => "--zero-init-proj".to_string(),
                "hash_ngrams.buckets" if self.model.hash_buckets.is_some() => "--hash-buckets".to_string(),
                "hash_ngrams" | "hash_ngrams.sizes" if self.model.hash_ngrams.is_some() => "--hash-ngrams".to_string(),
                _ => format!("{}'s {field}", self.model.describe_flag()),
            };
            return Err(differs(what, g, r));
        }
        // Every other setting given, over the run's; then a recipe's, over its own.
        let record = trainer.record();
        let recorded = run_settings(&record.train, &record.data);
        let (mut cfg, mut data) = (record.train.clone(), record.data.clone());
        self.apply(&mut cfg, &mut data, device);
        if let Some((flag, g, r)) = first_change(run_settings(&cfg, &data), recorded.clone()) {
            return Err(differs(flag.into(), g, r));
        }
        if let Some(mut recipe) = self.model.recipe() {
            (recipe.precision, recipe.recompute) = (record.train.precision, record.train.recompute);
            let mut data = record.data.clone();
            self.apply(&mut recipe, &mut data, device);
            if let Some((flag, g, r)) = first_change(run_settings(&recipe, &data), recorded) {
                return Err(differs(format!("--preset {}'s {flag}", self.model.preset_name()), g, r));
            }
        }
        Ok(())
    }
}

/// The training settings that flags set, as (flag, value), in `--help`'s order; the stopping
/// rules (--steps, --time) are not among them, nor where it runs.
fn settings(cfg: &TrainConfig) -> [(&'static str, String); 15] {
    [
        ("--batch-size", cfg.batch_size.to_string()),
        ("--grad-accum", cfg.grad_accum.to_string()),
        ("--lr", cfg.lr.to_string()),
        ("--min-lr", cfg.min_lr.to_string()),
        ("--warmup", cfg.warmup_steps.to_string()),
        ("--decay", cfg.decay.name().to_string()),
        ("--decay-fraction", cfg.decay_fraction.to_string()),
        ("--weight-decay", cfg.adamw.weight_decay.to_string()),
        ("--grad-clip", cfg.grad_clip.to_string()),
        ("--dropout", cfg.dropout.to_string()),
        ("--seed", cfg.seed.to_string()),
        ("--eval-every", cfg.eval_every.to_string()),
        ("--eval-bytes", cfg.eval_bytes.to_string()),
        ("--checkpoint-every", cfg.checkpoint_every.to_string()),
        ("--keep", cfg.keep_checkpoints.to_string()),
    ]
}

/// Every setting of a run that a flag sets but the model's: what a resumed run keeps.
fn run_settings(cfg: &TrainConfig, data: &DataSpec) -> Vec<(&'static str, String)> {
    let path = |p: &Option<PathBuf>, none: &str| p.as_ref().map_or(none.to_string(), |p| p.display().to_string());
    let mut all = settings(cfg).to_vec();
    let muon = |f: fn(&megabyte::optim::MuonConfig) -> f64| cfg.muon.as_ref().map_or("none".to_string(), |m| f(m).to_string());
    all.extend([
        ("--muon-lr", muon(|m| m.lr)),
        ("--muon-momentum", muon(|m| m.momentum)),
        ("--precision", precision_name(cfg.precision)),
        ("--recompute", cfg.recompute.to_string()),
        ("--data", path(&data.train, "the embedded corpus")),
        ("--valid", path(&data.valid, "none")),
        ("--valid-bytes", data.holdout_bytes.to_string()),
        ("--documents", data.documents.to_string()),
    ]);
    all
}

/// The first setting in which `given` differs from `recorded`: (flag, given's, recorded's).
fn first_change(given: Vec<(&'static str, String)>, recorded: Vec<(&'static str, String)>) -> Option<(&'static str, String, String)> {
    given.into_iter().zip(recorded).find(|(g, r)| g.1 != r.1).map(|((flag, g), (_, r))| (flag, g, r))
}

/// The first field (a dotted path) in which two JSON values differ, with both values
/// (`none` where one has no such field).
fn first_difference(given: &serde_json::Value, recorded: &serde_json::Value) -> Option<(String, String, String)> {
    use serde_json::Value;
    let show = |v: &Value| v.as_str().map_or_else(|| if v.is_null() { "none".into() } else { v.to_string() }, String::from);
    match (given, recorded) {
        (Value::Object(g), Value::Object(r)) => g.keys().chain(r.keys()).find_map(|k| {
            let (gk, rk) = (g.get(k).unwrap_or(&Value::Null), r.get(k).unwrap_or(&Value::Null));
            first_difference(gk, rk).map(|(path, a, b)| (if path.is_empty() { k.clone() } else { format!("{k}.{path}") }, a, b))
        }),
        _ if given != recorded => Some((String::new(), show(given), show(recorded))),
        _ => None,
    }
}

/// Bytes sampled at the end of a run: none for a recipe's (its runs are timed, and the
/// sample would count in their time).
fn default_sample_bytes(recipe: Option<&TrainConfig>) -> usize {
    if recipe.is_some() {
        0
    } else {
        SAMPLE_BYTES
    }
}

fn precision_name(p: megabyte::Precision) -> String {
    format!("{p:?}").to_lowercase()
}

/// A recipe's settings as the flags of one `megabyte train` command.
pub fn recipe_flags(cfg: &TrainConfig) -> String {
    let mut flags: Vec<String> = settings(cfg).iter().map(|(flag, v)| format!("{flag} {v}")).collect();
    flags.extend(cfg.muon.map(|m| format!("--muon-lr {} --muon-momentum {}", m.lr, m.momentum)));
    flags.extend(cfg.steps.map(|n| format!("--steps {n}")));
    flags.extend(cfg.time_minutes.map(|m| format!("--time {m}")));
    flags.push(format!("--sample-bytes {}", default_sample_bytes(Some(cfg))));
    flags.join(" ")
}

/// The end of `--help`: the defaults, from the library.
fn defaults_help() -> String {
    let flags: Vec<String> = settings(&TrainConfig::defaults()).iter().map(|(flag, v)| format!("{flag} {v}")).collect();
    format!(
        "Defaults of the settings left out, unless the preset is a recipe ({}; `megabyte info --preset NAME` lists \
         its settings) or the run is resumed:\n  --preset {} {} --sample-bytes {SAMPLE_BYTES}",
        megabyte::train::RECIPES.join(", "),
        megabyte::config::DEFAULT_PRESET,
        flags.join(" ")
    )
}

/// How a caller follows and stops a run: the command's Ctrl-C handler, or another program's
/// (the Python package's) flag and per-step callback.
pub struct Hooks<'a> {
    /// Set, it stops the run cleanly before the next step, with a checkpoint: what Ctrl-C does.
    pub stop: Arc<AtomicBool>,
    /// Install the command's Ctrl-C handler, which sets `stop` (a second Ctrl-C leaves at once).
    pub ctrl_c: bool,
    /// Called after every step (by rank 0); `false` stops the run as `stop` does.
    pub on_step: Option<&'a mut dyn FnMut(&StepStats) -> bool>,
}

/// A finished run, as rank 0 knows it.
pub struct Outcome {
    pub run_dir: PathBuf,
    pub summary: RunSummary,
}

pub fn run(args: Args) -> Result<()> {
    let hooks = Hooks { stop: Arc::new(AtomicBool::new(false)), ctrl_c: true, on_step: None };
    run_with(args, hooks).map(drop)
}

/// `megabyte train` with `hooks`: the run's outcome on rank 0 (`None` on the other ranks and
/// for `--devices`, whose workers train).
pub fn run_with(args: Args, hooks: Hooks) -> Result<Option<Outcome>> {
    if let Some(list) = args.devices.as_deref() {
        return crate::launch::run(list, args.compute.device.device.as_deref()).map(|()| None);
    }
    if !(args.nccl_timeout > 0.0 && args.nccl_timeout.is_finite()) {
        bail!("--nccl-timeout must be a positive number of seconds");
    }
    let dist = DistEnv::from_env()?;
    match &dist {
        None => train(args, None, hooks),
        Some(env) => {
            let (rank, world) = (env.rank, env.world_size);
            train(args, dist, hooks).with_context(|| format!("rank {rank} of {world}"))
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
fn train(args: Args, dist: Option<DistEnv>, hooks: Hooks) -> Result<Option<Outcome>> {
    let device = match &dist {
        None => megabyte::device(args.compute.device.name())?,
        Some(env) => worker_device(args.compute.device.device.as_deref(), env)?,
    };
    let leader = dist.as_ref().is_none_or(|env| env.rank == 0);
    let resuming = args.resume.is_some();
    let media = args.media.resolve()?;
    let out = match (&args.out, &args.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(resume)) => run_folder_of(resume),
        (None, None) => bail!("--out is required"),
    };
    // Rank 0 alone writes the run folder, and holds its lock until this returns (the other
    // ranks never touch it). A resumed run is locked before its checkpoint is read, so no other
    // process saves or prunes under it, and an interrupted save is restored first.
    let mut lock = None;
    let mut trainer = match &args.resume {
        Some(path) => {
            if leader {
                lock = Some(train::prepare_run_dir(&out, true)?);
            }
            let trainer = Trainer::resume(path, args.stopping_rules(), &device)?;
            args.check_agrees(&trainer, &device)?;
            trainer
        }
        None => {
            let model_cfg = args.model.resolve()?;
            let (cfg, data) = args.train_config(&device)?;
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
    if leader && lock.is_none() {
        lock = Some(train::prepare_run_dir(&out, resuming)?);
    }
    if leader {
        crate::media::record(&out, media.as_ref(), resuming)?;
    }
    // The run goes on: its pid names it to any process refused from here on.
    if let Some(lock) = lock.as_mut() {
        lock.claim()?;
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

    let Hooks { stop, ctrl_c, mut on_step } = hooks;
    if ctrl_c {
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
    let stop_after_step = stop.clone();
    let mut on_event = |event: Event| match event {
        _ if !leader => {}
        Event::Step(s) => {
            if let Some(hook) = on_step.as_mut() {
                if !hook(s) {
                    stop_after_step.store(true, Ordering::SeqCst);
                }
            }
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
        return Ok(None);
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
    let sample_bytes = args.sample_bytes();
    if sample_bytes > 0 {
        let mut sampler = Sampler::new(Sampling::TopP { p: 0.9, temperature: 0.8 }, trainer.record().train.seed)?;
        let prompt = data.valid.window(0, cfg.patch_size * 4)?;
        let sample = generate(trainer.model(), &[prompt.clone()], sample_bytes, &mut sampler, &device, &mut |_| {})?;
        println!("sample (prompt in brackets):\n[{}]{}", String::from_utf8_lossy(&prompt), String::from_utf8_lossy(&sample[0]));
    }
    drop(lock); // the run folder is free for another process from here
    Ok(Some(Outcome { run_dir: out, summary }))
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
