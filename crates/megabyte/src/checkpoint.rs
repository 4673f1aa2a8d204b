//! Checkpoints: a folder `step-NNNNNNNN/` inside a run folder holding
//!
//! - `config.json`: the [`ModelConfig`];
//! - `model.safetensors`: every parameter by its contract name (ARCHITECTURE.md);
//! - `optimizer.safetensors` and `train.json`: AdamW moments (`m.*`, `v.*`), with Muon its
//!   momentum buffers (`muon.*`), step, RNG and data state (training checkpoints only; eval
//!   and generate need just the first two).
//!
//! A checkpoint is written into a hidden temporary folder, synced, then renamed into place, so
//! a crash or a full disk never leaves a half-written `step-*` folder behind. Replacing a
//! checkpoint of the same step never removes the complete one before its replacement is in
//! place (see [`save`]), and a complete copy that an interrupted save left under a hidden name
//! is found by [`list`] and moved back by [`remove_stale_temps`], never deleted.

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
/// The hidden folder a save writes into: `.step-NNNNNNNN.tmp-PID` (possibly incomplete).
const TMP_MARK: &str = ".tmp-";
/// Where a save without an atomic exchange moves the step's previous, complete checkpoint:
/// `.step-NNNNNNNN.old-PID`.
const OLD_MARK: &str = ".old-";

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
///
/// Saving a step that already has a checkpoint (a resumed run re-saving its step) swaps the new
/// folder for the old one in one atomic rename where the system can (Linux's
/// `RENAME_EXCHANGE`); elsewhere the old folder is moved aside to `.step-NNNNNNNN.old-PID`
/// first. Either way a crash at any instant leaves a complete checkpoint of the step, under
/// `step-NNNNNNNN` or that hidden name, which [`list`] counts and [`remove_stale_temps`]
/// restores.
pub fn save(run_dir: &Path, data: &CheckpointData) -> Result<PathBuf> {
    // Nothing non-finite is saved: a last guard (training stops before such a step is counted).
    refuse_non_finite(&dir_for(run_dir, data.step), data)?;
    let name = format!("{PREFIX}{:08}", data.step);
    let final_dir = dir_for(run_dir, data.step);
    let tmp = run_dir.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    let old = run_dir.join(format!(".{name}{OLD_MARK}{}", std::process::id()));
    let result = write_into(&tmp, data).and_then(|()| {
        if final_dir.exists() {
            replace(&tmp, &final_dir, &old, run_dir)
        } else {
            std::fs::rename(&tmp, &final_dir).io_context(|| format!("renaming into {}", final_dir.display()))?;
            sync_dir(run_dir);
            Ok(())
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| final_dir)
}

/// Puts the complete checkpoint `new` in the place of the complete checkpoint `dest`, so that
/// at every instant `dest` or `aside` holds a complete checkpoint of the step.
fn replace(new: &Path, dest: &Path, aside: &Path, run_dir: &Path) -> Result<()> {
    if exchange(new, dest) {
        // `new` now holds the previous checkpoint, under a name start-up cleanup removes.
        sync_dir(run_dir);
        return std::fs::remove_dir_all(new).io_context(|| format!("removing {}", new.display()));
    }
    // No atomic exchange here: move the old one aside first. A crash between the two renames
    // leaves it complete under `aside`, which `list` counts as the step's checkpoint.
    std::fs::rename(dest, aside).io_context(|| format!("moving aside {}", dest.display()))?;
    std::fs::rename(new, dest).io_context(|| format!("renaming into {}", dest.display()))?;
    sync_dir(run_dir);
    std::fs::remove_dir_all(aside).io_context(|| format!("removing {}", aside.display()))
}

/// Writes a model checkpoint (config.json and model.safetensors, no training state) as the
/// folder `dir`, whole or not at all (see [`publish`]): the form `megabyte import` writes, which
/// `eval`, `generate` and [`load_model`] read like any `step-*` folder. Non-finite weights are
/// refused. With `overwrite`, an existing model checkpoint folder is replaced.
pub fn save_model(dir: &Path, config: &ModelConfig, params: &Params, overwrite: bool) -> Result<()> {
    let data = CheckpointData { step: 0, config, params, training: None };
    refuse_non_finite(dir, &data)?;
    publish(dir, overwrite, &[CONFIG_FILE, MODEL_FILE], |tmp| write_into(tmp, &data))
}

/// Writes a folder as `dest` whole or not at all: `write` fills a hidden temporary sibling
/// (`.NAME.tmp-PID`), which is then renamed into place. `dest` must not exist or be empty; with
/// `overwrite` it may also be a folder holding only files named in `ours` (what the command
/// writes), and the new folder is swapped in as [`save`] swaps a re-saved step, so a crash
/// leaves the old folder or the new one. Any other content is refused, never deleted.
pub fn publish(dest: &Path, overwrite: bool, ours: &[&str], write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let out_err = |msg: String| Error::Input(format!("{}: {msg}", dest.display()));
    let existing = match std::fs::symlink_metadata(dest) {
        Ok(meta) if !meta.is_dir() => return Err(out_err("exists and is not a folder; choose another path".into())),
        Ok(_) => {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(dest).io_context(|| format!("listing {}", dest.display()))? {
                let entry = entry.io_context(|| format!("listing {}", dest.display()))?;
                let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
                names.push((entry.file_name().to_string_lossy().into_owned(), is_file));
            }
            if !names.is_empty() && !overwrite {
                return Err(out_err("already exists and is not empty: pass --overwrite to replace it, or choose another folder".into()));
            }
            if let Some((name, _)) = names.iter().find(|(name, is_file)| !(*is_file && ours.contains(&name.as_str()))) {
                return Err(out_err(format!(
                    "holds `{name}`, which this command does not write ({}), so it is not replaced; move it away or choose another folder",
                    ours.join(", ")
                )));
            }
            Some(names.is_empty())
        }
        Err(_) => None,
    };
    let name = dest.file_name().ok_or_else(|| out_err("names no folder".into()))?.to_string_lossy().into_owned();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).io_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    let aside = parent.join(format!(".{name}{OLD_MARK}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp); // this process's own leftover, if any
    let result = std::fs::create_dir(&tmp)
        .io_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| write(&tmp))
        .and_then(|()| match existing {
            Some(false) => replace(&tmp, dest, &aside, &parent),
            Some(true) => {
                // Empty: remove_dir removes only an empty folder, so nothing else can be lost.
                std::fs::remove_dir(dest).io_context(|| format!("replacing the empty folder {}", dest.display()))?;
                std::fs::rename(&tmp, dest).io_context(|| format!("renaming into {}", dest.display()))
            }
            None => std::fs::rename(&tmp, dest).io_context(|| format!("renaming into {}", dest.display())),
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    sync_dir(&parent);
    result
}

/// Swaps two paths atomically; false where the system or filesystem cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (CString::new(a.as_os_str().as_bytes()), CString::new(b.as_os_str().as_bytes())) else {
        return false;
    };
    // SAFETY: two valid NUL-terminated paths; the call only renames. The raw system call,
    // not glibc's wrapper, which older glibc versions lack.
    let rc = unsafe {
        libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE)
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

/// An error naming the first parameter or optimizer moment of `data` that holds a NaN or an
/// infinity (one device reduction when all are finite).
fn refuse_non_finite(dir: &Path, data: &CheckpointData) -> Result<()> {
    let mut named: Vec<(&str, &Tensor)> = data.params.vars().iter().map(|(k, v)| (k.as_str(), v.as_tensor())).collect();
    if let Some((moments, _)) = &data.training {
        let mut moments: Vec<(&str, &Tensor)> = moments.iter().map(|(k, t)| (k.as_str(), t)).collect();
        moments.sort_by_key(|(k, _)| *k);
        named.extend(moments);
    }
    match crate::optim::first_non_finite(&named)? {
        Some(name) => Err(ckpt_err(
            dir,
            format!("not saved: `{name}` holds NaN or infinite values (the model diverged); the run's earlier checkpoints are kept"),
        )),
        None => Ok(()),
    }
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

pub(crate) fn write_synced(path: &Path, bytes: Vec<u8>) -> Result<()> {
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

/// The checkpoint folders of a run, oldest first: every `step-*` folder, and the complete copy
/// an interrupted save left moved aside (`.step-*.old-*`) of a step that has no `step-*` folder.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let mut aside = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::Io { context: format!("listing {}", run_dir.display()), source: e }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        } else if let Some(step) = moved_aside(name) {
            if entry.path().is_dir() {
                aside.push((step, entry.path()));
            }
        }
    }
    for (step, path) in aside {
        if !out.iter().any(|(s, _)| *s == step) {
            out.push((step, path));
        }
    }
    out.sort();
    out.dedup_by_key(|(step, _)| *step);
    Ok(out)
}

/// The step of a complete checkpoint moved aside by an interrupted save (`.step-N.old-PID`).
fn moved_aside(name: &str) -> Option<u64> {
    let (step, pid) = name.strip_prefix(&format!(".{PREFIX}"))?.split_once(OLD_MARK)?;
    pid.parse::<u32>().ok()?;
    step.parse().ok()
}

/// Tidies what an interrupted save left in a run folder: a complete checkpoint moved aside
/// (`.step-N.old-PID`) goes back to `step-N` when that is missing (and is removed when
/// `step-N` is there, complete, in its place); temporary folders (`.step-N.tmp-PID`, never
/// renamed into place, or holding a replaced checkpoint) are removed. Call it only while
/// holding the run folder's lock (`train::prepare_run_dir`), never beside a running save.
pub fn remove_stale_temps(run_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir) else { return Ok(()) };
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in names {
        let path = run_dir.join(&name);
        if let Some(step) = moved_aside(&name) {
            let home = dir_for(run_dir, step);
            if !home.exists() {
                std::fs::rename(&path, &home)
                    .io_context(|| format!("restoring the checkpoint {} to {}", path.display(), home.display()))?;
                sync_dir(run_dir);
                continue;
            }
        } else if !(name.starts_with(&format!(".{PREFIX}")) && name.contains(TMP_MARK)) {
            continue;
        }
        std::fs::remove_dir_all(&path).io_context(|| format!("removing {}", path.display()))?;
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

/// Loads a checkpoint's model for sampling `rows` sequences at once in `precision`: the memory
/// it needs checked against the device first, then the parameters in the activations' dtype
/// (no weight casts at each decoding step). What `generate`, `serve` and Python sample with.
pub fn load_for_sampling(dir: &Path, rows: usize, precision: crate::config::Precision, device: &Device) -> Result<MegaByte> {
    load_config(dir)?.check_fits(crate::config::Workload::Inference { rows, precision }, device)?;
    let dtype = precision.dtype();
    Ok(load_model(dir, dtype, device)?.0.with_activations(dtype))
}

/// Loads a checkpoint's model (config + weights) in `dtype` on `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<(MegaByte, Params)> {
    let cfg = load_config(dir)?;
    let precision = if dtype == DType::BF16 { crate::config::Precision::Bf16 } else { crate::config::Precision::F32 };
    cfg.check_fits(crate::config::Workload::Inference { rows: 1, precision }, device)
        .map_err(|e| ckpt_err(&dir.join(CONFIG_FILE), e.to_string()))?;
    let mut params = Params::for_loading(dtype, device);
    let model = MegaByte::new(&cfg, &mut params)?;
    let path = dir.join(MODEL_FILE);
    let tensors = load_tensors(&path)?;
    params.assign(&tensors).map_err(|msg| ckpt_err(&path, format!("does not match {CONFIG_FILE}: {msg}")))?;
    let named: Vec<(&str, &Tensor)> = params.vars().iter().map(|(k, v)| (k.as_str(), v.as_tensor())).collect();
    if let Some(name) = crate::optim::first_non_finite(&named)? {
        return Err(ckpt_err(
            &path,
            format!("weight `{name}` holds NaN or infinite values (the run diverged before this checkpoint was saved); use an earlier checkpoint of the run"),
        ));
    }
    Ok((model, params))
}
