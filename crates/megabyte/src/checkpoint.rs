//! Checkpoints: a folder `step-NNNNNNNN/` inside a run folder holding
//!
//! - `config.json`: the [`ModelConfig`];
//! - `model.safetensors`: every parameter by its contract name (ARCHITECTURE.md);
//! - `optimizer.safetensors` and `train.json`: AdamW moments, step, RNG and data state (training
//!   checkpoints only; eval and generate need just the first two).
//!
//! A checkpoint is written into a hidden temporary folder, synced, then renamed into place, so
//! a crash or a full disk never leaves a half-written `step-*` folder behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, IoContext, Result};
use crate::model::MegaByte;
use crate::nn::Params;

pub const CONFIG_FILE: &str = "config.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAIN_FILE: &str = "train.json";
const PREFIX: &str = "step-";

fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.into(), msg: msg.into() }
}

/// What one checkpoint holds, ready to write.
pub struct CheckpointData<'a> {
    pub step: u64,
    pub config: &'a ModelConfig,
    pub params: &'a Params,
    /// Optimizer moments and the training record (JSON), for resumable checkpoints.
    pub training: Option<(HashMap<String, Tensor>, serde_json::Value)>,
}

/// The folder of step `step`'s checkpoint in a run folder: `run_dir/step-NNNNNNNN`.
pub fn dir_for(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("{PREFIX}{step:08}"))
}

/// Writes `data` as `run_dir/step-NNNNNNNN` atomically and returns that path.
pub fn save(run_dir: &Path, data: &CheckpointData) -> Result<PathBuf> {
    let name = format!("{PREFIX}{:08}", data.step);
    let final_dir = dir_for(run_dir, data.step);
    let tmp = run_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = run_dir.join(format!(".{name}.old-{}", std::process::id()));
    let result = write_into(&tmp, data).and_then(|()| {
        // Replacing a checkpoint of the same step: move the old one aside first, so that a
        // crash at any point leaves one complete `step-*` folder or the hidden copy.
        let replacing = final_dir.exists();
        if replacing {
            std::fs::rename(&final_dir, &old).io_context(|| format!("moving aside {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp, &final_dir).io_context(|| format!("renaming into {}", final_dir.display()))?;
        sync_dir(run_dir);
        if replacing {
            std::fs::remove_dir_all(&old).io_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| final_dir)
}

fn write_into(dir: &Path, data: &CheckpointData) -> Result<()> {
    std::fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
    write_synced(&dir.join(CONFIG_FILE), serde_json::to_vec_pretty(data.config)?)?;
    let weights: HashMap<String, Tensor> =
        data.params.vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    save_tensors(&dir.join(MODEL_FILE), &weights)?;
    if let Some((moments, record)) = &data.training {
        save_tensors(&dir.join(OPTIMIZER_FILE), moments)?;
        write_synced(&dir.join(TRAIN_FILE), serde_json::to_vec_pretty(record)?)?;
    }
    Ok(())
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| ckpt_err(path, format!("cannot write ({e}); is the disk full or read-only?")))?;
    sync_file(path)
}

fn write_synced(path: &Path, bytes: Vec<u8>) -> Result<()> {
    std::fs::write(path, bytes).io_context(|| format!("writing {}", path.display()))?;
    sync_file(path)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .io_context(|| format!("syncing {}", path.display()))
}

fn sync_dir(dir: &Path) {
    // Best effort: not every filesystem lets a directory be synced.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The checkpoint folders of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::Io { context: format!("listing {}", run_dir.display()), source: e }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes hidden temporary folders that an interrupted save left in a run folder.
pub fn remove_stale_temps(run_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{PREFIX}")) && (name.contains(".tmp-") || name.contains(".old-")) {
            std::fs::remove_dir_all(entry.path()).io_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Deletes all but the newest `keep` checkpoints of a run.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list(run_dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in &all[..excess] {
        std::fs::remove_dir_all(path).io_context(|| format!("removing old checkpoint {}", path.display()))?;
    }
    Ok(())
}

/// A checkpoint folder, or a run folder (its newest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(ckpt_err(path, "no such checkpoint or run folder"));
    }
    match list(path)?.pop() {
        Some((_, newest)) => Ok(newest),
        None => Err(ckpt_err(path, format!("holds neither {CONFIG_FILE} nor any {PREFIX}* checkpoint"))),
    }
}

/// Reads a checkpoint's model config.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = read_json(&path, "model config")?;
    let cfg: ModelConfig =
        serde_json::from_slice(&text).map_err(|e| ckpt_err(&path, format!("not a valid model config: {e}")))?;
    cfg.validate().map_err(|e| ckpt_err(&path, e.to_string()))?;
    Ok(cfg)
}

/// Reads a checkpoint's JSON file (`what`: its model config or training record) whole: a
/// regular file of at most [`crate::data::JSON_MAX_BYTES`].
pub(crate) fn read_json(path: &Path, what: &str) -> Result<Vec<u8>> {
    crate::data::read_regular_file(path, crate::data::JSON_MAX_BYTES, what).map_err(|e| match e {
        Error::Data { msg, .. } => ckpt_err(path, msg),
        e => e,
    })
}

/// Reads a safetensors file whole, with a clear error when corrupt or truncated.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(ckpt_err(path, "missing"));
    }
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| ckpt_err(path, format!("corrupt or truncated safetensors file: {e}")))
}

/// Loads a checkpoint's model (config + weights) in `dtype` on `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<(MegaByte, Params)> {
    let cfg = load_config(dir)?;
    let mut params = Params::for_loading(dtype, device);
    let model = MegaByte::new(&cfg, &mut params)?;
    let path = dir.join(MODEL_FILE);
    let tensors = load_tensors(&path)?;
    params.assign(&tensors).map_err(|msg| ckpt_err(&path, format!("does not match {CONFIG_FILE}: {msg}")))?;
    Ok((model, params))
}
