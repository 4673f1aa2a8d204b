//! The training loop: AdamW (or Muon for the blocks' matrices), warm-up then decay, clipping,
//! accumulation, periodic validation, atomic checkpoints and exact resume. Progress is reported
//! through events; nothing prints.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointData};
use crate::config::{ModelConfig, Precision, Workload};
use crate::data::{ByteStream, SamplerState, Split, WindowSampler};
use crate::dist::{self, Collective};
use crate::error::{Error, IoContext, Result};
use crate::eval::{self, EvalSettings};
use crate::grad::Grads;
use crate::model::{MegaByte, TrainPass};
use crate::nn::{Dropout, Params};
use crate::optim::{AdamWConfig, MuonConfig, Optimizer};

/// How the learning rate falls after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
    /// Warm-up, stable, decay: `lr` until the last `decay_fraction` of the run, then linear
    /// to `min_lr` (modded-nanogpt's schedule; Hu et al. 2024, "MiniCPM"): the run spends
    /// most of its steps at the peak rate and anneals only at the end.
    Wsd,
}

impl Decay {
    /// Every decay, in the order they are listed to users.
    pub const ALL: &'static [Decay] = &[Decay::Cosine, Decay::Linear, Decay::Wsd];

    /// The name users type (`--decay NAME`), as in `train.json`.
    pub fn name(self) -> &'static str {
        match self {
            Decay::Cosine => "cosine",
            Decay::Linear => "linear",
            Decay::Wsd => "wsd",
        }
    }
}

/// The share of the run over which [`Decay::Wsd`] decays when none is given.
pub const DEFAULT_DECAY_FRACTION: f64 = 0.2;

fn default_decay_fraction() -> f64 {
    DEFAULT_DECAY_FRACTION
}

fn is_default_decay_fraction(f: &f64) -> bool {
    *f == DEFAULT_DECAY_FRACTION
}

/// Everything about a training run except the model's shape. Saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Sequences per micro-batch: the global batch, over all data-parallel ranks together.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the decay.
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    /// With [`Decay::Wsd`]: the last share of the run (of its progress, as the other decays
    /// count it: steps after warm-up, or wall time) over which the rate falls to `min_lr`.
    /// Absent from `train.json` at its default (0.2), and unused by the other decays.
    #[serde(default = "default_decay_fraction", skip_serializing_if = "is_default_decay_fraction")]
    pub decay_fraction: f64,
    /// Stop after this many optimizer steps…
    pub steps: Option<u64>,
    /// …or after this many minutes of wall time, whichever comes first.
    pub time_minutes: Option<f64>,
    pub adamw: AdamWConfig,
    /// Muon for the blocks' matrices (AdamW, with `adamw`, for every other parameter); None:
    /// AdamW for all. Absent from `train.json` when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muon: Option<MuonConfig>,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    /// Validate every N steps (and at the start and the end).
    pub eval_every: u64,
    /// Validation bytes scored each time (the first ones of the validation split).
    pub eval_bytes: u64,
    /// Save a checkpoint every N steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept in the run folder.
    pub keep_checkpoints: usize,
    /// Seeds the initial weights and the data windows.
    pub seed: u64,
    /// The activations' format (bf16 mixed precision on CUDA).
    #[serde(default)]
    pub precision: Precision,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (activation checkpointing): same gradients, about a third more compute, for sequences
    /// whose activations would not fit.
    #[serde(default)]
    pub recompute: bool,
    /// Dropout probability of every block's attention and MLP outputs (the paper: 0.1; 0: off).
    /// Each step's masks are a function of the seed, the step, the micro-batch and the row,
    /// so a resumed run, any shard split and any number of ranks draw the same ones.
    #[serde(default)]
    pub dropout: f64,
}

/// Model presets (see [`ModelConfig::preset`]) that are also training recipes: the model of a
/// measured run together with the settings it was trained with ([`TrainConfig::recipe`]).
pub const RECIPES: &[&str] = &["enwik8-10min", "byte-enwik8-10min"];

impl TrainConfig {
    /// Sequences per micro-batch when none is given.
    pub const DEFAULT_BATCH_SIZE: usize = 8;
    /// Peak learning rate when none is given.
    pub const DEFAULT_LR: f64 = 2e-3;

    /// The settings of a run that names none: [`TrainConfig::standard`] at
    /// [`Self::DEFAULT_BATCH_SIZE`] and [`Self::DEFAULT_LR`]. It has no stopping rule.
    pub fn defaults() -> Self {
        Self::standard(Self::DEFAULT_BATCH_SIZE, Self::DEFAULT_LR)
    }

    /// The training settings of a recipe preset ([`RECIPES`]), `None` for a preset that is a
    /// model only. Precision is not part of a recipe: it is the device's (bf16 on CUDA).
    ///
    /// `enwik8-10min` and `byte-enwik8-10min` are RESULTS.md's "enwik8 in 10 minutes": the
    /// cross-patch MEGABYTE with its patch embedder at unit scale
    /// (`xp8-g768x4-l512x11-w1024-t1024-z-pe1`, test bpb 1.2047, 1.2065 and 1.2046 over seeds
    /// 0, 1 and 2) and the byte transformer of the same cost per byte (`byte-512x12`), both
    /// trained on enwik8's train split for 8.5 minutes of one H200 with 64 sequences of 1,024
    /// bytes per step, lr 2e-3 after 200 warm-up steps, cosine to lr/10, and dropout 0.1;
    /// validated every 1,000 steps and checkpointed only at the end.
    pub fn recipe(preset: &str) -> Option<Self> {
        match preset {
            "enwik8-10min" | "byte-enwik8-10min" => {
                let mut cfg = Self::standard(64, 2e-3);
                cfg.warmup_steps = 200;
                cfg.dropout = 0.1;
                cfg.time_minutes = Some(8.5);
                cfg.eval_every = 1000;
                cfg.checkpoint_every = 100_000;
                Some(cfg)
            }
            _ => None,
        }
    }

    /// The paper's optimiser settings (Adam β = (0.9, 0.98), clip 1.0, decay 0.1) with
    /// defaults suited to a short run.
    pub fn standard(batch_size: usize, lr: f64) -> Self {
        TrainConfig {
            batch_size,
            grad_accum: 1,
            lr,
            min_lr: lr / 10.0,
            warmup_steps: 100,
            decay: Decay::Cosine,
            decay_fraction: DEFAULT_DECAY_FRACTION,
            steps: None,
            time_minutes: None,
            adamw: AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1 },
            muon: None,
            grad_clip: 1.0,
            eval_every: 250,
            eval_bytes: 100_000,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            seed: 0,
            precision: Precision::F32,
            recompute: false,
            dropout: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch size and gradient accumulation must be at least 1".into());
        }
        // Written so that NaN fails every comparison: every number finite and in range.
        if !(self.lr > 0.0 && self.lr.is_finite()) || !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!("need 0 ≤ min_lr ≤ lr and lr > 0, both finite; got lr {} min_lr {}", self.lr, self.min_lr));
        }
        if !(self.decay_fraction > 0.0 && self.decay_fraction <= 1.0) {
            return bad(format!("decay_fraction must be in (0, 1] (the share of the run the wsd decay takes), got {}", self.decay_fraction));
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad(format!("grad_clip must be finite and at least 0 (0 = no clipping), got {}", self.grad_clip));
        }
        self.adamw.validate()?;
        if let Some(muon) = &self.muon {
            muon.validate()?;
        }
        if self.steps.is_none() && self.time_minutes.is_none() {
            return bad("give a stopping rule: a number of steps, a time limit, or both".into());
        }
        if self.steps == Some(0) || self.time_minutes.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
            return bad("steps and minutes must be positive (and minutes finite)".into());
        }
        if self.eval_every == 0 || self.checkpoint_every == 0 || self.keep_checkpoints == 0 {
            return bad("eval_every, checkpoint_every and keep_checkpoints must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        Ok(())
    }
}

/// The learning rate at `step` (0-based) and run progress in [0, 1]: linear warm-up over
/// `warmup_steps`, then cosine or linear decay from `lr` to `min_lr` as progress goes to 1,
/// or (wsd) `lr` until progress reaches 1 − `decay_fraction` and linear to `min_lr` after.
pub fn learning_rate(cfg: &TrainConfig, step: u64, progress: f64) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let x = progress.clamp(0.0, 1.0);
    let shape = match cfg.decay {
        Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * x).cos()),
        Decay::Linear => 1.0 - x,
        Decay::Wsd => ((1.0 - x) / cfg.decay_fraction).min(1.0),
    };
    cfg.min_lr + (cfg.lr - cfg.min_lr) * shape
}

/// Where the bytes come from, recorded so that `--resume` reopens the same data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSpec {
    /// A file or folder; `None` for the embedded corpus.
    pub train: Option<PathBuf>,
    /// A separate validation file or folder; `None` to hold out the end of `train`.
    pub valid: Option<PathBuf>,
    /// Bytes held out from the end of `train` when `valid` is `None` (with `documents`,
    /// moved to the next document start).
    pub holdout_bytes: u64,
    /// Document isolation (see [`crate::documents`]): windows never start before their
    /// document, and padding after a document's end is not scored.
    #[serde(default)]
    pub documents: bool,
}

/// Opened training and validation splits.
pub struct TrainData {
    pub train: Split,
    pub valid: Split,
}

impl DataSpec {
    pub fn open(&self) -> Result<TrainData> {
        let stream = Arc::new(match &self.train {
            Some(path) => ByteStream::open(path)?,
            None => ByteStream::embedded(),
        });
        let with_docs = |split: Split, stream: &ByteStream| -> Result<Split> {
            Ok(if self.documents { split.with_documents(&stream.documents()?) } else { split })
        };
        match &self.valid {
            Some(path) => {
                let valid_stream = Arc::new(ByteStream::open(path)?);
                let valid = with_docs(Split::all(valid_stream.clone()), &valid_stream)?;
                let train = with_docs(Split::all(stream.clone()), &stream)?;
                Ok(TrainData { train, valid })
            }
            None if self.documents => {
                let starts = stream.documents()?;
                let (train, valid) = Split::holdout_documents(stream, self.holdout_bytes, &starts)?;
                Ok(TrainData { train, valid })
            }
            None => {
                let (train, valid) = Split::holdout(stream, self.holdout_bytes)?;
                Ok(TrainData { train, valid })
            }
        }
    }
}

/// One file of a run's data as it was when the run started: its length and the XXH3-64 hash of
/// its bytes, checked on resume so that a run never goes on silently on other bytes.
///
/// Hashing reads every byte once at the start of a run and of each resume, on one core: 0.4 to
/// 0.5 s per GB read from the page cache (where training wants the data anyway; measured on a
/// busy 2-core machine, 2.2 to 2.6 GB/s), or the disk's read time when cold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    pub path: PathBuf,
    pub bytes: u64,
    /// XXH3-64 of the file's bytes, in hex.
    pub xxh3: String,
}

impl DataSpec {
    /// The files of the training and validation data, each with its length and hash; none for
    /// the embedded corpus, which is part of the program.
    pub fn files(&self) -> Result<Vec<DataFile>> {
        let mut out = Vec::new();
        for path in self.train.iter().chain(&self.valid) {
            for (file, bytes) in ByteStream::open(path)?.files() {
                out.push(DataFile { path: file.clone(), bytes: *bytes, xxh3: xxh3_of(file)? });
            }
        }
        Ok(out)
    }

    /// Checks that the data's files are still those of `recorded` ([`DataSpec::files`] when
    /// the run started), naming the first that changed and how. An empty record (a run from
    /// before files were recorded, or on the embedded corpus) checks nothing.
    pub fn check_files(&self, recorded: &[DataFile]) -> Result<()> {
        if recorded.is_empty() {
            return Ok(());
        }
        let now = self.files()?;
        let redo = "resume with the data the run was trained on, or start a new run in another folder";
        for was in recorded {
            let changed = |msg: String| Error::Data { path: was.path.clone(), msg: format!("{msg}; {redo}") };
            match now.iter().find(|f| f.path == was.path) {
                None => return Err(changed(format!("is gone since the run started (it held {} bytes)", was.bytes))),
                Some(f) if f.bytes != was.bytes => {
                    return Err(changed(format!("has changed size since the run started: {} bytes then, {} now", was.bytes, f.bytes)))
                }
                Some(f) if f.xxh3 != was.xxh3 => {
                    return Err(changed(format!(
                        "holds other bytes than when the run started, of the same length ({} bytes; XXH3 {} then, {} now)",
                        f.bytes, was.xxh3, f.xxh3
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(new) = now.iter().find(|f| !recorded.iter().any(|r| r.path == f.path)) {
            return Err(Error::Data { path: new.path.clone(), msg: format!("is new to the data since the run started; {redo}") });
        }
        Ok(())
    }
}

/// XXH3-64 of a file's bytes, in hex.
fn xxh3_of(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).io_context(|| format!("opening {}", path.display()))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).io_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:016x}", hasher.digest()))
}

/// The run's progress, saved in `train.json` with the configs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub format: u32,
    pub step: u64,
    pub bytes_seen: u64,
    pub elapsed_secs: f64,
    pub sampler: SamplerState,
    pub train: TrainConfig,
    pub data: DataSpec,
    /// Data-parallel ranks of the run that wrote it, for information only: nothing depends
    /// on it, and a run resumes on any number of ranks.
    #[serde(default = "one")]
    pub world_size: usize,
    /// The data's files when the run started ([`DataSpec::files`]), checked on resume; empty
    /// in checkpoints written before they were recorded.
    #[serde(default)]
    pub data_files: Vec<DataFile>,
}

fn one() -> usize {
    1
}

const RECORD_FORMAT: u32 = 1;

/// One optimizer step's figures.
#[derive(Clone, Debug, Serialize)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub bpb: f64,
    pub lr: f64,
    /// The gradient's norm before clipping.
    pub grad_norm: f64,
    /// The norm of each part of the model (see [`crate::optim::GradNorm`]).
    pub grad_norms: BTreeMap<String, f64>,
    pub bytes_per_sec: f64,
    /// Model FLOP/s of this step, all ranks together, in TFLOP/s: the model's training FLOPs
    /// per byte ([`ModelConfig::train_flops_per_byte`]) times the step's bytes over its time.
    pub tflops: f64,
    /// Model FLOPs utilisation: `tflops` over the devices' dense bf16 rate
    /// ([`crate::gpu::peak_tflops`]); `None` on the CPU, which has no such figure.
    pub mfu: Option<f64>,
    pub elapsed_secs: f64,
}

/// A model being trained with its optimizer, data sampler and progress.
///
/// [`Trainer::train_step`] is one optimizer step, top to bottom: draw this rank's rows of
/// every micro-batch with their loss weights, run the forward and backward passes, sum the
/// gradients over the ranks, clip and update. A single process is a group of one
/// ([`dist::Alone`]), so it runs the same lines as a data-parallel rank.
pub struct Trainer {
    model: MegaByte,
    params: Params,
    opt: Optimizer,
    sampler: WindowSampler,
    record: TrainRecord,
    device: Device,
    /// The ranks training together ([`Trainer::join`]); [`dist::Alone`] until then.
    group: Box<dyn Collective>,
    /// Elements per gradient bucket of the all-reduce.
    bucket_elems: usize,
    /// Threads a CPU micro-batch is split over (one per core).
    cpu_workers: usize,
    cpu_pool: Arc<rayon::ThreadPool>,
}

impl Trainer {
    /// A new run: weights drawn from `train.seed`.
    pub fn new(model_cfg: &ModelConfig, train: TrainConfig, data: DataSpec, device: &Device) -> Result<Self> {
        train.validate()?;
        train.precision.check(device)?;
        let data_files = data.files()?;
        // Refused before anything is allocated: this rank's share of every micro-batch.
        let world = dist::DistEnv::from_env().ok().flatten().map_or(1, |env| env.world_size.max(1));
        let work = Workload::Training { rows: train.batch_size.div_ceil(world), recompute: train.recompute, precision: train.precision };
        model_cfg.check_fits(work, device)?;
        let (model, params) = MegaByte::init(model_cfg, train.seed, DType::F32, device)?;
        let opt = Optimizer::new(params.vars(), train.adamw, train.muon, train.lr)?;
        // A distinct stream for data: the weights used the seed itself.
        let sampler = WindowSampler::new(train.seed.wrapping_add(0x9E37_79B9_7F4A_7C15));
        let record = TrainRecord {
            format: RECORD_FORMAT,
            step: 0,
            bytes_seen: 0,
            elapsed_secs: 0.0,
            sampler: sampler.state(),
            train,
            data,
            world_size: 1,
            data_files,
        };
        Trainer::assemble(model, params, opt, sampler, record, device)
    }

    /// Continues from a training checkpoint (or a run folder's newest one) exactly.
    /// `limits` replaces the recorded stopping rules when given.
    pub fn resume(path: &Path, limits: Option<(Option<u64>, Option<f64>)>, device: &Device) -> Result<Self> {
        let dir = checkpoint::resolve(path)?;
        let (model, params) = checkpoint::load_model(&dir, DType::F32, device)?;
        let record_path = dir.join(checkpoint::TRAIN_FILE);
        if !record_path.exists() {
            return Err(Error::Checkpoint {
                path: record_path,
                msg: "cannot read (it is missing); only a training checkpoint can be resumed".into(),
            });
        }
        let text = checkpoint::read_json(&record_path, "training record")?;
        let mut record: TrainRecord = serde_json::from_slice(&text)
            .map_err(|e| Error::Checkpoint { path: record_path.clone(), msg: format!("corrupt: {e}") })?;
        if record.format != RECORD_FORMAT {
            return Err(Error::Checkpoint {
                path: record_path,
                msg: format!("format {} is not the supported {RECORD_FORMAT}", record.format),
            });
        }
        if let Some((steps, minutes)) = limits {
            record.train.steps = steps;
            record.train.time_minutes = minutes;
        }
        // This run's ranks, not the writer's: alone until `join`.
        record.world_size = 1;
        record.train.validate()?;
        record.train.precision.check(device)?;
        record.data.check_files(&record.data_files)?;
        let mut opt = Optimizer::new(params.vars(), record.train.adamw, record.train.muon, record.train.lr)?;
        let opt_path = dir.join(checkpoint::OPTIMIZER_FILE);
        let moments = checkpoint::load_tensors(&opt_path)?;
        opt.load_state(&moments, record.step)
            .map_err(|msg| Error::Checkpoint { path: opt_path, msg })?;
        let sampler = WindowSampler::restore(record.sampler);
        Trainer::assemble(model, params, opt, sampler, record, device)
    }

    fn assemble(model: MegaByte, params: Params, opt: Optimizer, sampler: WindowSampler, record: TrainRecord, device: &Device) -> Result<Self> {
        let model = model.with_activations(record.train.precision.dtype());
        let (cpu_workers, cpu_pool) = cpu_pool()?;
        let bucket_elems = dist::BUCKET_BYTES / 4;
        Ok(Trainer { model, params, opt, sampler, record, device: device.clone(), group: Box::new(dist::Alone), bucket_elems, cpu_workers, cpu_pool })
    }

    /// Makes this trainer one rank of a data-parallel group (see [`crate::dist`]): it trains
    /// on its slice of every global batch, and its gradients are summed with the other ranks'
    /// in flat buckets of about `bucket_bytes` ([`dist::BUCKET_BYTES`]) before each optimizer
    /// step. Rank 0's parameters are broadcast first, so every rank starts from the same
    /// weights. Every rank calls it, after [`Trainer::new`] or [`Trainer::resume`].
    pub fn join(&mut self, mut group: Box<dyn Collective>, bucket_bytes: usize) -> Result<()> {
        dist::rank_rows(self.record.train.batch_size, group.world_size(), group.rank())?;
        let bucket_elems = (bucket_bytes / 4).max(1);
        let vars: Vec<&candle_core::Var> = self.params.vars().values().collect();
        let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let shapes: Vec<&candle_core::Shape> = tensors.iter().map(|t| t.shape()).collect();
        let (buckets, packing) = dist::pack(&tensors, bucket_elems)?;
        let buckets = group.broadcast(buckets, 0)?;
        for (var, value) in vars.iter().zip(packing.unpack(&buckets, &shapes)?) {
            var.set(&value)?;
        }
        self.record.world_size = group.world_size();
        (self.group, self.bucket_elems) = (group, bucket_elems);
        Ok(())
    }

    /// Leaves the data-parallel group cleanly (see [`Collective::finish`]); call it on every
    /// rank after [`run`] returns. Alone, nothing to do.
    pub fn leave(&mut self) -> Result<()> {
        std::mem::replace(&mut self.group, Box::new(dist::Alone)).finish()
    }

    /// This process's rank in its data-parallel group (0 when training alone).
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Ranks training together (1 when training alone).
    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// The run's fingerprint (model config and training record): data-parallel ranks must
    /// agree on it before they start (see [`dist::exchange_id`]).
    pub fn fingerprint(&self) -> Result<dist::Fingerprint> {
        dist::fingerprint(&(self.model.config(), &self.record))
    }

    pub fn model(&self) -> &MegaByte {
        &self.model
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn record(&self) -> &TrainRecord {
        &self.record
    }

    pub fn step(&self) -> u64 {
        self.record.step
    }

    /// How far the decay has gone, in [0, 1]: by steps after warm-up, or by wall time.
    fn progress(&self) -> f64 {
        let t = &self.record.train;
        let after_warmup = |n: u64| n.saturating_sub(t.warmup_steps) as f64;
        let by_steps = t.steps.map_or(0.0, |s| after_warmup(self.record.step) / after_warmup(s).max(1.0));
        let by_time = t.time_minutes.map_or(0.0, |m| self.record.elapsed_secs / (m * 60.0));
        by_steps.max(by_time)
    }

    /// One optimizer step over `grad_accum` micro-batches of random windows (with other
    /// ranks: this rank's slice of each, the gradients summed over the ranks).
    pub fn train_step(&mut self, train: &Split) -> Result<StepStats> {
        if self.device.is_cpu() {
            // The whole step in the training pool: the optimizer's and the gradient sums'
            // parallel loops too. Beside a second pool (rayon's global one), whichever pool
            // is idle spins on the same cores: 6-10% of a `tiny` step on two cores.
            let pool = self.cpu_pool.clone();
            return pool.install(|| self.train_step_in_pool(train));
        }
        self.train_step_in_pool(train)
    }

    /// [`Trainer::train_step`] in the pool it runs in.
    fn train_step_in_pool(&mut self, train: &Split) -> Result<StepStats> {
        let started = Instant::now();
        let t = self.record.train.clone();
        let lr = learning_rate(&t, self.record.step, self.progress());
        // Forward and backward over this rank's rows of every micro-batch.
        let (grads, loss) = self.local_gradients(train)?;
        // Summed over the ranks: the step's gradient and mean loss on every rank.
        let (grads, loss) = self.sum_over_ranks(grads, loss)?;
        // Clip and update. Every rank clips by rank 0's norm (see
        // `AdamW::step_clipped_agreed`). Everything is queued before the first read back: the
        // GPU never waits on the host within a step.
        let group = &mut self.group;
        let norm = self.opt.step_clipped_agreed(&grads, lr, t.grad_clip, |sumsq| {
            let shared = group.broadcast(vec![sumsq.reshape(1)?], 0)?;
            let sumsq = shared.into_iter().next().ok_or_else(|| Error::Dist("the gradient norm went missing".into()))?;
            Ok(sumsq.reshape(())?)
        })?;
        let loss = loss.to_scalar::<f64>()?;
        // Nothing non-finite goes on: the step is not counted, so no checkpoint holds it, and
        // the error names the first quantity that went non-finite, in the order they are made.
        let step = self.record.step + 1;
        let diverged = |what: String| {
            Error::Input(format!(
                "training stopped at step {step}: {what}; this step was not saved (the checkpoints before it are kept): \
                 resume from the newest with a lower --lr or a --grad-clip, or check the data"
            ))
        };
        if !loss.is_finite() {
            // Weights made non-finite by the previous update (with a finite loss and gradient
            // norm then) show here first; checking them at every step would cost a reduction
            // and a read back per step, and a checkpoint of such weights is refused anyway.
            if let Some(name) = self.opt.first_non_finite_param()? {
                return Err(Error::Input(format!(
                    "training stopped at step {step}: the weights went non-finite first, in the update of step {} (`{name}`, part {}); \
                     nothing after the last checkpoint was saved: resume from the newest with a lower --lr or a --grad-clip",
                    step - 1,
                    crate::optim::part_of(&name)
                )));
            }
            return Err(diverged(format!("the loss went non-finite ({loss}) first")));
        }
        if !norm.total.is_finite() {
            let parts: Vec<&str> = norm.parts.iter().filter(|(_, v)| !v.is_finite()).map(|(k, _)| k.as_str()).collect();
            let parts = match parts.is_empty() {
                true => "each part finite, their squares summing past f32's range".to_string(),
                false => format!("non-finite in {}", parts.join(", ")),
            };
            return Err(diverged(format!("the gradient norm went non-finite ({}) first, with a finite loss ({loss}): {parts}", norm.total)));
        }
        let secs = started.elapsed().as_secs_f64();
        let bytes = (t.batch_size * t.grad_accum * self.model.config().context) as u64; // the global batch
        self.record.step += 1;
        self.record.bytes_seen += bytes;
        self.record.elapsed_secs += secs;
        self.record.sampler = self.sampler.state();
        let tflops = self.model.config().train_flops_per_byte() * bytes as f64 / secs / 1e12;
        let peak = crate::gpu::peak_tflops(&self.device).map(|p| p * self.world_size() as f64);
        Ok(StepStats {
            step: self.record.step,
            loss,
            bpb: loss / std::f64::consts::LN_2,
            lr,
            grad_norm: norm.total,
            grad_norms: norm.parts,
            bytes_per_sec: bytes as f64 / secs,
            tflops,
            mfu: peak.map(|p| tflops / p),
            elapsed_secs: self.record.elapsed_secs,
        })
    }

    /// This rank's share of the next optimizer step: the gradients and the loss (an f64
    /// scalar) of its rows of every micro-batch, weighted so that the ranks' shares sum to
    /// the step's gradient and mean loss (alone: the step's). Advances the sampler by one step.
    pub fn local_gradients(&mut self, train: &Split) -> Result<(Grads, Tensor)> {
        let rows = dist::rank_rows(self.record.train.batch_size, self.world_size(), self.rank())?;
        let mut grads = Grads::new();
        let mut losses = Vec::new();
        for (micro, (x, w)) in self.draw_step(train, rows.clone())?.into_iter().enumerate() {
            let dropout = self.dropout_at(micro, rows.start);
            for (loss, g) in self.micro_batch(&x, &w, dropout)? {
                losses.push(loss);
                grads.merge(g)?;
            }
        }
        Ok((grads, Tensor::stack(&losses, 0)?.sum_all()?))
    }

    /// This rank's `rows` of the step's micro-batches x [R, T], each with per-byte loss
    /// weights w [R, T] under which Σ w·loss over every micro-batch and rank is the step's mean
    /// loss: 1/(B·accum·T) everywhere for plain windows; with documents, 1/N on the N real
    /// bytes of the whole step (all micro-batches, all ranks) and 0 on padding.
    fn draw_step(&mut self, train: &Split, rows: Range<usize>) -> Result<Vec<(Tensor, Tensor)>> {
        let t = &self.record.train;
        let context = self.model.config().context;
        if train.documents().is_some() {
            let batches = (0..t.grad_accum)
                .map(|_| self.sampler.document_batch_rows(train, t.batch_size, context, rows.clone(), &self.device))
                .collect::<Result<Vec<_>>>()?;
            let real: usize = batches.iter().map(|b| b.2).sum();
            return batches.into_iter().map(|(x, w, _)| Ok((x, (w / real as f64)?))).collect();
        }
        let weight = (1.0 / (t.batch_size * t.grad_accum * context) as f64) as f32;
        (0..t.grad_accum)
            .map(|_| {
                let x = self.sampler.batch_rows(train, t.batch_size, context, rows.clone(), &self.device)?; // [R, T]
                let w = Tensor::full(weight, x.dims(), &self.device)?; // [R, T]
                Ok((x, w))
            })
            .collect()
    }

    /// This step's dropout for micro-batch `micro`, whose rows start at `first_row` of the
    /// global batch (this rank's share): keyed by the seed, the step and the micro-batch.
    fn dropout_at(&self, micro: usize, first_row: usize) -> Option<Dropout> {
        let t = &self.record.train;
        let key = crate::ops::pointwise::mix64(t.seed ^ crate::ops::pointwise::mix64(self.record.step ^ crate::ops::pointwise::mix64(micro as u64)));
        (t.dropout > 0.0).then_some(Dropout { p: t.dropout, key, row_offset: first_row })
    }

    /// Σ w·loss (f64) and the gradients of one micro-batch x [R, T] with weights w [R, T].
    ///
    /// On the CPU the rows are split into one shard per core, each run forward and backward on
    /// its own thread: the small ops of a small model are serial, so this data parallelism is
    /// what fills the cores (measured in BENCHMARKS.md). Each shard draws the dropout masks of
    /// its own rows of the global batch.
    fn micro_batch(&self, x: &Tensor, w: &Tensor, dropout: Option<Dropout>) -> Result<Vec<(Tensor, Grads)>> {
        let b = x.dim(0)?;
        let recompute = self.record.train.recompute;
        let run = |start: usize, len: usize| -> Result<(Tensor, Grads)> {
            let dropout = dropout.map(|d| Dropout { row_offset: d.row_offset + start, ..d });
            let pass = TrainPass { dropout, recompute };
            let (loss, grads) = self.model.loss_and_grads(&x.narrow(0, start, len)?, &w.narrow(0, start, len)?, pass)?;
            Ok((loss.to_dtype(DType::F64)?, grads))
        };
        let shards = if self.device.is_cpu() { self.cpu_workers.min(b) } else { 1 };
        if shards == 1 {
            return Ok(vec![run(0, b)?]);
        }
        let sizes: Vec<usize> = (0..shards).map(|i| b / shards + usize::from(i < b % shards)).collect();
        let starts: Vec<usize> = sizes.iter().scan(0, |acc, &n| { let s = *acc; *acc += n; Some(s) }).collect();
        // One pool thread per shard; the fused ops' own parallel loops share the same pool.
        self.cpu_pool.install(|| starts.par_iter().zip(&sizes).map(|(&s, &n)| run(s, n)).collect())
    }

    /// The sums over all ranks of the gradients (in parameter order, in buckets) and of the
    /// loss, in one all-reduce. Alone: unchanged.
    fn sum_over_ranks(&mut self, grads: Grads, loss: Tensor) -> Result<(Grads, Tensor)> {
        let vars: Vec<(&String, &candle_core::Var)> = self.params.vars().iter().collect();
        let tensors = vars
            .iter()
            .map(|(name, p)| grads.get(p.as_tensor()).cloned().ok_or_else(|| Error::Input(format!("no gradient reached parameter `{name}`"))))
            .collect::<Result<Vec<Tensor>>>()?;
        drop(grads); // `tensors` hold the gradients now
        let (summed, loss) = dist::all_reduce_sum_packed(self.group.as_mut(), tensors, loss.reshape(1)?, self.bucket_elems)?;
        let mut out = Grads::new();
        for ((_, p), g) in vars.iter().zip(summed) {
            out.add(p.as_tensor(), g)?;
        }
        Ok((out, loss.reshape(())?))
    }

    /// At the start of every step, the ranks agree on whether to stop (any rank's Ctrl-C) and
    /// take rank 0's elapsed time, which drives the time limit and a timed schedule. This is
    /// also where the other ranks wait while rank 0 validates or saves.
    fn agree(&mut self, stop: bool, elapsed_secs: f64) -> Result<bool> {
        let own = if self.rank() == 0 { elapsed_secs } else { 0.0 };
        let votes = Tensor::new(&[f64::from(u8::from(stop)), own], &self.device)?;
        let summed = self.group.all_reduce_sum(vec![votes])?;
        let v = summed.first().ok_or_else(|| Error::Dist("the step agreement went missing".into()))?.to_vec1::<f64>()?;
        self.record.elapsed_secs = v[1];
        Ok(v[0] > 0.0)
    }

    /// Rank 0's `values` (the leader's), on every rank.
    fn leaders(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        let out = self.group.broadcast(vec![Tensor::new(values, &self.device)?], 0)?;
        Ok(out.first().ok_or_else(|| Error::Dist("a broadcast went missing".into()))?.to_vec1::<f64>()?)
    }

    /// Validation bpb over the first `eval_bytes` bytes of `valid`.
    pub fn validate(&self, valid: &Split) -> Result<eval::EvalReport> {
        let settings = EvalSettings { strided: false, sliding: None, batch_size: self.record.train.batch_size };
        eval::evaluate(&self.model, valid, settings, Some(self.record.train.eval_bytes), &self.device, &mut |_, _| {})
    }

    /// Writes a resumable checkpoint into `run_dir` and prunes old ones.
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf> {
        let data = CheckpointData {
            step: self.record.step,
            config: self.model.config(),
            params: &self.params,
            training: Some((self.opt.state_tensors()?, serde_json::to_value(&self.record)?)),
        };
        let path = checkpoint::save(run_dir, &data)?;
        checkpoint::prune(run_dir, self.record.train.keep_checkpoints)?;
        Ok(path)
    }

    /// What a run does with `err`, which stopped it after a completed step: on a data error
    /// (a data file changed under the run), rank 0 saves that step, unless it is step 0 or
    /// saved already, so that nothing trained is lost (the record holds the sampler as of the
    /// step, not as of the failed draw). Returns the error, saying where the step went.
    pub fn save_on_data_error(&self, run_dir: &Path, err: Error) -> Error {
        let Error::Data { path, msg } = err else { return err };
        let step = self.record.step;
        if self.rank() != 0 || step == 0 {
            return Error::Data { path, msg };
        }
        let saved = checkpoint::dir_for(run_dir, step);
        let note = if saved.exists() {
            format!("step {step}, the last completed, is saved in {}", saved.display())
        } else {
            match self.save(run_dir) {
                Ok(saved) => format!("step {step}, the last completed, was saved to {}", saved.display()),
                Err(e) => format!("saving step {step}, the last completed, failed too: {e}"),
            }
        };
        Error::Data { path, msg: format!("{msg}; {note}") }
    }

    fn finished(&self) -> Option<StopReason> {
        let t = &self.record.train;
        if t.steps.is_some_and(|s| self.record.step >= s) {
            return Some(StopReason::Steps);
        }
        if t.time_minutes.is_some_and(|m| self.record.elapsed_secs >= m * 60.0) {
            return Some(StopReason::Time);
        }
        None
    }
}

/// One CPU training worker per core, in a pool of their own.
fn cpu_pool() -> Result<(usize, Arc<rayon::ThreadPool>)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(|e| Error::Input(format!("cannot start {workers} training threads: {e}")))?;
    Ok((workers, Arc::new(pool)))
}

/// Why a run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Steps,
    Time,
    Interrupted,
}

/// What the loop reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    Step(&'a StepStats),
    Eval { step: u64, report: &'a eval::EvalReport },
    Checkpoint { step: u64, path: &'a Path },
}

/// How a run ended.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub reason: StopReason,
    pub steps: u64,
    pub bytes_seen: u64,
    pub first_valid_bpb: Option<f64>,
    pub final_valid_bpb: f64,
    pub checkpoint: PathBuf,
}

/// The run folder's lock file: the one process writing a run holds an advisory lock on it,
/// and its pid is written in it.
pub const LOCK_FILE: &str = ".lock";
/// The run folder's log: one JSON line per step and per validation.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Exclusive use of a run folder, for as long as this value lives: an advisory lock on its
/// [`LOCK_FILE`], which the system releases when the process ends, however it ends (an error,
/// Ctrl-C, `kill -9`). The file stays behind; a later run takes its free lock.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    fn acquire(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .io_context(|| format!("the output folder {} is not writable: opening {}", run_dir.display(), path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // The pid of the holder's `claim`; a dead one is an earlier holder's, written
                // before the current holder, still starting, claimed the lock.
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .filter(|&pid| process_exists(pid));
                return Err(Error::Input(format!(
                    "{} is in use by another megabyte process ({}): two runs in one folder would overwrite each \
                     other's checkpoints; wait for it to finish or stop it, or choose another output folder",
                    run_dir.display(),
                    holder.map_or("starting up, pid not yet written".to_string(), |pid| format!("pid {pid}"))
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Io { context: format!("locking {}", path.display()), source: e })
            }
        }
        Ok(RunLock { file, path })
    }

    /// Writes this process's pid into the lock file, for the message of a process refused:
    /// call it once the run is sure to go on, so that a run refused for another reason (a
    /// resume with settings not its own) leaves the folder as it was.
    pub fn claim(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .io_context(|| format!("writing {}", self.path.display()))
    }
}

/// Whether process `pid` exists.
#[cfg(unix)]
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_exists(_: u32) -> bool {
    true
}

/// Whether a run folder entry is one a run writes.
fn is_run_file(name: &str) -> bool {
    name == LOCK_FILE || name == METRICS_FILE || name == "loss.png" || name.starts_with("step-") || name.starts_with(".step-")
}

/// Prepares a run folder and locks it ([`RunLock`]; keep it for the whole run, and
/// [`RunLock::claim`] it once the run goes on): creates it, restores what an interrupted save
/// left (under the lock), and proves it writable.
///
/// A new run needs a new or empty folder: one that holds checkpoints is refused unless
/// resuming, one whose run stopped before its first checkpoint is refused (it cannot be
/// resumed), and one that holds files of someone else's is refused without writing anything
/// into it. A folder another process holds is refused with its pid.
pub fn prepare_run_dir(run_dir: &Path, resuming: bool) -> Result<RunLock> {
    std::fs::create_dir_all(run_dir).io_context(|| format!("creating the output folder {}", run_dir.display()))?;
    let names: Vec<String> = std::fs::read_dir(run_dir)
        .io_context(|| format!("listing the output folder {}", run_dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .io_context(|| format!("listing the output folder {}", run_dir.display()))?;
    // A folder with a lock file is a run's: wait for nobody, and look at it only under the lock.
    let held = if names.iter().any(|n| n == LOCK_FILE) { Some(RunLock::acquire(run_dir)?) } else { None };
    let dir = run_dir.display();
    if !resuming {
        if !checkpoint::list(run_dir)?.is_empty() {
            return Err(Error::Input(format!("{dir} already holds a run; resume it with --resume or choose another output folder")));
        }
        if names.iter().any(|n| n == METRICS_FILE) {
            return Err(Error::Input(format!(
                "{dir} holds a run that stopped before its first checkpoint, so it cannot be resumed; choose another \
                 output folder, or remove this one to start again"
            )));
        }
        if let Some(other) = names.iter().find(|n| *n != LOCK_FILE) {
            return Err(Error::Input(format!(
                "{dir} is not empty (it holds {other}) and is not a megabyte run: a new run needs a new or empty folder; \
                 choose another output folder"
            )));
        }
    } else if held.is_none() && !names.is_empty() && !names.iter().any(|n| is_run_file(n)) {
        return Err(Error::Input(format!(
            "{dir} is not empty (it holds {}) and is not a megabyte run, so the resumed run cannot write there; \
             choose another output folder",
            names[0]
        )));
    }
    let lock = match held {
        Some(lock) => lock,
        None => RunLock::acquire(run_dir)?,
    };
    checkpoint::remove_stale_temps(run_dir)?;
    // Prove that checkpoints can be written, with a new file (create_new), so that no file of
    // the user's is ever overwritten or removed.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let probe = run_dir.join(format!(".write-test-{}-{nanos}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .io_context(|| format!("the output folder {dir} is not writable"))?;
    Ok(lock)
}

/// Trains until a stopping rule fires or `stop` is set (Ctrl-C), validating every
/// `eval_every` steps, checkpointing every `checkpoint_every` steps and at the end, and
/// appending one JSON line per step and per validation to `run_dir/metrics.jsonl`.
///
/// In a data-parallel job every rank calls it: rank 0 alone validates and writes into
/// `run_dir` (the others never touch it), and the ranks agree on stopping at the start of
/// every step, so all of them return after the same step with the same summary.
pub fn run(
    trainer: &mut Trainer,
    data: &TrainData,
    run_dir: &Path,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunSummary> {
    let context = trainer.model.config().context;
    // Document tiles may be shorter than T (padded); plain windows need T bytes.
    let need = if data.train.documents().is_some() { 1 } else { context };
    data.train.require(need, "the training data")?;
    data.valid.require(1, "the validation data")?;
    let leader = trainer.rank() == 0;
    let metrics_path = run_dir.join(METRICS_FILE);
    let mut metrics = match leader {
        true => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .io_context(|| format!("opening {}", metrics_path.display()))?,
        ),
        false => None,
    };
    let mut log = |value: serde_json::Value| -> Result<()> {
        match metrics.as_mut() {
            Some(file) => writeln!(file, "{value}").io_context(|| format!("writing {}", metrics_path.display())),
            None => Ok(()),
        }
    };
    let wall = Instant::now();
    let wall_before = trainer.record.elapsed_secs;

    let mut first_valid_bpb = None;
    if trainer.step() == 0 && leader {
        let report = trainer.validate(&data.valid)?;
        log(serde_json::json!({"step": 0, "valid_bpb": report.bpb, "valid_bytes": report.bytes}))?;
        on_event(Event::Eval { step: 0, report: &report });
        first_valid_bpb = Some(report.bpb);
    }
    let reason = loop {
        let interrupted = trainer.agree(stop.load(Ordering::SeqCst), wall_before + wall.elapsed().as_secs_f64())?;
        if let Some(reason) = trainer.finished() {
            break reason;
        }
        if interrupted {
            break StopReason::Interrupted;
        }
        let stats = trainer.train_step(&data.train).map_err(|e| trainer.save_on_data_error(run_dir, e))?;
        // Wall time, not compute time, drives the time limit: evaluation and saving count.
        trainer.record.elapsed_secs = wall_before + wall.elapsed().as_secs_f64();
        log(serde_json::to_value(&stats)?)?;
        on_event(Event::Step(&stats));
        let step = trainer.step();
        if !leader {
            continue;
        }
        if step % trainer.record.train.eval_every == 0 && trainer.finished().is_none() {
            let report = trainer.validate(&data.valid).map_err(|e| trainer.save_on_data_error(run_dir, e))?;
            log(serde_json::json!({"step": step, "valid_bpb": report.bpb, "valid_bytes": report.bytes}))?;
            on_event(Event::Eval { step, report: &report });
        }
        if step % trainer.record.train.checkpoint_every == 0 && trainer.finished().is_none() {
            let path = trainer.save(run_dir)?;
            on_event(Event::Checkpoint { step, path: &path });
        }
    };
    let step = trainer.step();
    let mut final_valid_bpb = f64::NAN;
    let mut checkpoint = checkpoint::dir_for(run_dir, step);
    if leader {
        let report = trainer.validate(&data.valid).map_err(|e| trainer.save_on_data_error(run_dir, e))?;
        log(serde_json::json!({"step": step, "valid_bpb": report.bpb, "valid_bytes": report.bytes}))?;
        on_event(Event::Eval { step, report: &report });
        final_valid_bpb = report.bpb;
        checkpoint = trainer.save(run_dir)?;
        on_event(Event::Checkpoint { step, path: &checkpoint });
    }
    // The other ranks wait here until rank 0 has saved, and learn its figures.
    let shared = trainer.leaders(&[first_valid_bpb.unwrap_or(f64::NAN), final_valid_bpb])?;
    Ok(RunSummary {
        reason,
        steps: step,
        bytes_seen: trainer.record.bytes_seen,
        first_valid_bpb: Some(shared[0]).filter(|b| !b.is_nan()),
        final_valid_bpb: shared[1],
        checkpoint,
    })
}
