//! Weights that travel: a checkpoint as a Hugging Face-style folder, and such a folder back.
//!
//! [`export`] writes `HF_DIR/`:
//!
//! - `config.json`: `model_type: "megabyte"`, `architectures: ["MegabyteForCausalLM"]`,
//!   `megabyte_format: 1`, `vocab_size: 256`, `torch_dtype: "float32"`, and every field of the
//!   [`ModelConfig`] as the checkpoint's own `config.json` has it (the optional ones written
//!   out: `window: null`, `cross_patch: false`, ...);
//! - `model.safetensors`: every parameter in f32 under its checkpoint name (the table in
//!   docs/export.md and in ARCHITECTURE.md's checkpoint contract), metadata `format: pt`;
//! - `modeling_megabyte.py`: MEGABYTE in plain PyTorch ([`MODELING_PY`], this crate's
//!   `export/modeling_megabyte.py`), which reads and writes this folder and computes the logits
//!   the Rust model computes.
//!
//! [`import`] reads such a folder (written by `export`, or by the PyTorch file's
//! `save_pretrained` after fine-tuning) and checks everything the model relies on, naming what
//! is wrong: the files, the JSON, `model_type`, the format, the architecture fields, the tensor
//! names, shapes and dtypes (f32; f16, bf16 and f64 are converted, and the conversion is
//! reported), and finite values.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, CONFIG_FILE, MODEL_FILE};
use crate::config::{ModelConfig, V};
use crate::error::{Error, IoContext, Result};
use crate::model::MegaByte;
use crate::nn::Params;

/// `config.json`'s `model_type`.
pub const MODEL_TYPE: &str = "megabyte";
/// The PyTorch class in [`MODELING_FILE`], named in `config.json`'s `architectures`.
pub const ARCHITECTURE: &str = "MegabyteForCausalLM";
/// The layout this version writes and reads (`config.json`'s `megabyte_format`).
pub const FORMAT: u64 = 1;
pub const FORMAT_KEY: &str = "megabyte_format";
pub const MODELING_FILE: &str = "modeling_megabyte.py";
/// The self-contained PyTorch model written into every export.
pub const MODELING_PY: &str = include_str!("../export/modeling_megabyte.py");
/// Keys of `config.json` that describe the folder rather than the architecture.
const META_KEYS: &[&str] = &["model_type", "architectures", FORMAT_KEY, "vocab_size", "torch_dtype"];

fn folder_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Input(format!("{}: {}", path.display(), msg.into()))
}

/// The export's `config.json`: the folder's keys and every architecture field, optional ones
/// included.
pub fn hf_config(cfg: &ModelConfig) -> Result<Value> {
    let mut fields = match serde_json::to_value(cfg)? {
        Value::Object(m) => m,
        _ => return Err(Error::Config("a model config serialises to a JSON object".into())),
    };
    for part in ["global", "local"] {
        if let Some(Value::Object(t)) = fields.get_mut(part) {
            t.entry("window").or_insert(Value::Null);
        }
    }
    fields.entry("cross_patch").or_insert(json!(false));
    fields.entry("zero_w_gl").or_insert(json!(false));
    fields.entry("patch_embed_std").or_insert(Value::Null);
    fields.entry("qk_norm").or_insert(json!(false));
    fields.entry("mlp").or_insert(json!("gelu"));
    fields.entry("zero_init_proj").or_insert(json!(false));
    fields.entry("hash_ngrams").or_insert(Value::Null);
    let mut out = Map::new();
    out.insert("model_type".into(), json!(MODEL_TYPE));
    out.insert("architectures".into(), json!([ARCHITECTURE]));
    out.insert(FORMAT_KEY.into(), json!(FORMAT));
    out.insert("vocab_size".into(), json!(V));
    out.insert("torch_dtype".into(), json!("float32"));
    out.extend(fields);
    Ok(Value::Object(out))
}

/// Writes the checkpoint `checkpoint` (a checkpoint or run folder) as the folder `out` (see the
/// module doc), whole or not at all; an existing non-empty `out` only with `overwrite`, and only
/// when it holds nothing but the files an export writes.
pub fn export(checkpoint: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let dir = checkpoint::resolve(checkpoint)?;
    let (model, params) = checkpoint::load_model(&dir, DType::F32, &Device::Cpu)?;
    let config = serde_json::to_vec_pretty(&hf_config(model.config())?)?;
    checkpoint::publish(out, overwrite, &[CONFIG_FILE, MODEL_FILE, MODELING_FILE], |tmp| {
        checkpoint::write_synced(&tmp.join(CONFIG_FILE), config)?;
        write_safetensors(&tmp.join(MODEL_FILE), &params)?;
        checkpoint::write_synced(&tmp.join(MODELING_FILE), MODELING_PY.as_bytes().to_vec())
    })
}

/// Every parameter as little-endian f32 under its name, with the metadata PyTorch's loaders
/// expect (`format: pt`).
fn write_safetensors(path: &Path, params: &Params) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, var) in params.vars() {
        let t = var.as_tensor().to_dtype(DType::F32)?;
        let bytes: Vec<u8> = t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| folder_err(path, format!("cannot describe tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| folder_err(path, format!("cannot write ({e}); is the disk full or read-only?")))?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).io_context(|| format!("syncing {}", path.display()))
}

/// A folder read by [`import`].
pub struct Imported {
    pub config: ModelConfig,
    /// The weights, f32 on the CPU, every one finite.
    pub params: Params,
    /// What was converted on the way in (tensors stored in another float format), one line each.
    pub notes: Vec<String>,
}

/// Reads and checks an exported (or PyTorch-saved) folder; see the module doc.
pub fn import(dir: &Path) -> Result<Imported> {
    let what = "a megabyte export holds config.json and model.safetensors (`megabyte export` writes them, and so does `save_pretrained` of its modeling_megabyte.py)";
    if !dir.is_dir() {
        return Err(folder_err(dir, format!("no such folder; {what}")));
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        if checkpoint::list(dir).is_ok_and(|l| !l.is_empty()) {
            return Err(folder_err(dir, "a megabyte run folder, not an export: use it as it is (--checkpoint), or export it first"));
        }
        return Err(folder_err(dir, format!("no {CONFIG_FILE}: not a megabyte export; {what}")));
    }
    let config = read_config(&config_path)?;
    let model_path = dir.join(MODEL_FILE);
    if !model_path.is_file() {
        return Err(folder_err(dir, format!("no {MODEL_FILE}: the weights are missing; {what}")));
    }
    let bytes = std::fs::read(&model_path).io_context(|| format!("reading {}", model_path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| folder_err(&model_path, format!("not a safetensors file, or truncated: {e}")))?;

    // Sizes are checked before the config's tensors are allocated: an absurd config is refused
    // by the memory estimate, and one far larger than the file by the count of its weights.
    config
        .check_fits(crate::config::Workload::Inference { rows: 1, precision: crate::config::Precision::F32 }, &Device::Cpu)
        .map_err(|e| folder_err(&config_path, e.to_string()))?;
    let held: usize = file.tensors().iter().map(|(_, v)| v.shape().iter().product::<usize>()).sum();
    let needed = config.param_counts().total;
    if needed > held.saturating_mul(2).saturating_add(1 << 20) {
        return Err(folder_err(
            &model_path,
            format!("holds {held} weights, but {CONFIG_FILE}'s architecture has {needed}: the config and the weights do not belong together"),
        ));
    }
    let mut params = Params::for_loading(DType::F32, &Device::Cpu);
    MegaByte::new(&config, &mut params).map_err(|e| folder_err(&config_path, e.to_string()))?;
    let expected: Vec<(&String, &[usize])> = params.vars().iter().map(|(k, v)| (k, v.dims())).collect();
    let names = file.names();
    let missing: Vec<&str> = expected.iter().filter(|(k, _)| !names.contains(&k.as_str())).map(|(k, _)| k.as_str()).collect();
    if !missing.is_empty() {
        return Err(folder_err(&model_path, format!("missing tensors that {CONFIG_FILE}'s architecture needs: {}", list(&missing))));
    }
    let mut extra: Vec<&str> = names.iter().copied().filter(|n| !params.vars().contains_key(*n)).collect();
    extra.sort();
    if !extra.is_empty() {
        let hint = if config.tied_head && extra.contains(&"head.weight") {
            " (tied_head is true: the head is local_embedder.byte_embed.weight; set tied_head to false for a separate head)"
        } else {
            ""
        };
        return Err(folder_err(&model_path, format!("unexpected tensors for {CONFIG_FILE}'s architecture: {}{hint}", list(&extra))));
    }

    let mut tensors = HashMap::new();
    let mut converted: Vec<(String, Dtype)> = Vec::new();
    for (name, shape) in expected {
        let view = file.tensor(name).map_err(|e| folder_err(&model_path, format!("tensor `{name}`: {e}")))?;
        if view.shape() != shape {
            return Err(folder_err(
                &model_path,
                format!("tensor `{name}` has shape {:?}, but {CONFIG_FILE}'s architecture gives it {shape:?}", view.shape()),
            ));
        }
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                return Err(folder_err(
                    &model_path,
                    format!("tensor `{name}` is {other:?}; weights must be floating point (f32, or f16, bf16 or f64, which are converted to f32)"),
                ))
            }
        };
        if dtype != DType::F32 {
            converted.push((name.clone(), view.dtype()));
        }
        let t = Tensor::from_raw_buffer(view.data(), dtype, shape, &Device::Cpu)?.to_dtype(DType::F32)?;
        tensors.insert(name.clone(), t);
    }
    params.assign(&tensors).map_err(|msg| folder_err(&model_path, msg))?;
    let named: Vec<(&str, &Tensor)> = params.vars().iter().map(|(k, v)| (k.as_str(), v.as_tensor())).collect();
    if let Some(name) = crate::optim::first_non_finite(&named)? {
        return Err(folder_err(&model_path, format!("tensor `{name}` holds NaN or infinite values (after conversion to f32); nothing was written")));
    }
    let mut notes = Vec::new();
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F64] {
        let of: Vec<&str> = converted.iter().filter(|(_, d)| *d == dtype).map(|(n, _)| n.as_str()).collect();
        if !of.is_empty() {
            notes.push(format!("{} tensors converted from {dtype:?} to f32: {}", of.len(), list(&of)));
        }
    }
    Ok(Imported { config, params, notes })
}

/// Reads an export's `config.json`: the folder keys checked and removed, the rest a
/// [`ModelConfig`] (every field required, none unknown).
fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = crate::data::read_regular_file(path, crate::data::JSON_MAX_BYTES, "export config")?;
    let value: Value =
        serde_json::from_slice(&text).map_err(|e| folder_err(path, format!("not valid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(folder_err(path, "not a JSON object: an export's config is one object of fields"));
    };
    match fields.get("model_type") {
        Some(Value::String(t)) if t == MODEL_TYPE => {}
        Some(other) => {
            return Err(folder_err(path, format!("model_type is {other}, not \"{MODEL_TYPE}\": this folder holds another kind of model")))
        }
        None if serde_json::from_value::<ModelConfig>(Value::Object(fields.clone())).is_ok() => {
            return Err(folder_err(path, "a megabyte checkpoint's config, not an export's: use the checkpoint as it is (--checkpoint), or export it first"))
        }
        None => return Err(folder_err(path, format!("no model_type: not a megabyte export (its config.json says \"model_type\": \"{MODEL_TYPE}\")"))),
    }
    match fields.get(FORMAT_KEY) {
        Some(v) if v.as_u64() == Some(FORMAT) => {}
        Some(v) => {
            return Err(folder_err(path, format!("{FORMAT_KEY} is {v}; this megabyte reads format {FORMAT} (export the model again, or use a megabyte that reads it)")))
        }
        None => return Err(folder_err(path, format!("no {FORMAT_KEY}: add \"{FORMAT_KEY}\": {FORMAT} if the folder follows docs/export.md"))),
    }
    if let Some(v) = fields.get("vocab_size").filter(|v| v.as_u64() != Some(V as u64)) {
        return Err(folder_err(path, format!("vocab_size is {v}; a megabyte model predicts the {V} byte values")));
    }
    for key in META_KEYS {
        fields.remove(*key);
    }
    let cfg: ModelConfig = serde_json::from_value(Value::Object(fields))
        .map_err(|e| folder_err(path, format!("architecture fields: {e}")))?;
    cfg.validate().map_err(|e| folder_err(path, e.to_string()))?;
    Ok(cfg)
}

/// The first names of a list, and how many more.
fn list(names: &[&str]) -> String {
    let shown = names.iter().take(6).copied().collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(6) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}
