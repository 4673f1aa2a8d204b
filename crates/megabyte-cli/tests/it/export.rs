//! `megabyte export` and `megabyte import`: a checkpoint goes out as a Hugging Face-style folder
//! and comes back bit-identical; a folder that is not a megabyte export is refused with a
//! message naming what is wrong, and nothing is written or replaced without `--overwrite`.

use std::path::{Path, PathBuf};

use megabyte::checkpoint::{self, CheckpointData};
use megabyte::{DType, Device, ModelConfig, NormKind};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::{fails_with, megabyte, random_bytes, temp_dir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A cross-patch, windowed, RMSNorm, untied model: every optional part of the format.
fn full_config() -> ModelConfig {
    let mut cfg = crate::cross_patch_config();
    cfg.norm = NormKind::RmsNorm;
    cfg.tied_head = false;
    cfg.global.window = Some(3);
    cfg.patch_embed_std = Some(1.0);
    cfg.zero_w_gl = true;
    cfg
}

/// A checkpoint of `cfg` with random weights, saved as step 3 of a run folder.
fn saved(dir: &Path, cfg: &ModelConfig, seed: u64) -> PathBuf {
    let (model, params) = megabyte::MegaByte::init(cfg, seed, DType::F32, &Device::Cpu).unwrap();
    checkpoint::save(dir, &CheckpointData { step: 3, config: model.config(), params: &params, training: None }).unwrap()
}

/// `megabyte ARGS` succeeds; returns its stdout.
fn run_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte")).args(args).output().unwrap();
    assert!(out.status.success(), "`megabyte {}` failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn weights(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let (_, params) = checkpoint::load_model(dir, DType::F32, &Device::Cpu).unwrap();
    params.vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn export_then_import_gives_identical_weights_and_evaluation() {
    let dir = temp_dir("export-roundtrip");
    let data = dir.join("data.bin");
    std::fs::write(&data, random_bytes(200, 2)).unwrap();
    for (i, cfg) in [ModelConfig::preset("tiny").unwrap(), full_config()].into_iter().enumerate() {
        let ckpt = saved(&dir.join(format!("run{i}")), &cfg, 7 + i as u64);
        let hf = dir.join(format!("hf{i}"));
        run_ok(&["export", "--checkpoint", s(&dir.join(format!("run{i}"))), "--out", s(&hf)]);
        assert_eq!(names_in(&hf), ["config.json", "model.safetensors", "modeling_megabyte.py"]);
        assert_eq!(std::fs::read_to_string(hf.join("modeling_megabyte.py")).unwrap(), megabyte::export::MODELING_PY);
        // config.json: the folder's keys and every architecture field, optional ones written out.
        let config: Value = serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], "megabyte");
        assert_eq!(config["architectures"][0], "MegabyteForCausalLM");
        assert_eq!(config["megabyte_format"], 1);
        for key in ["patch_size", "context", "norm", "tied_head", "init_std", "cross_patch", "zero_w_gl", "patch_embed_std", "qk_norm", "mlp", "zero_init_proj"] {
            assert!(config.get(key).is_some(), "config.json lacks `{key}`: {config}");
        }
        for part in ["global", "local"] {
            for key in ["width", "layers", "heads", "window"] {
                assert!(config[part].get(key).is_some(), "config.json lacks `{part}.{key}`: {config}");
            }
        }
        // The safetensors names are the checkpoint's, in f32, with PyTorch's metadata.
        let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let want = weights(&ckpt);
        let mut names: Vec<&str> = file.names();
        names.sort();
        assert_eq!(names, want.keys().map(String::as_str).collect::<Vec<_>>());
        assert!(file.tensors().iter().all(|(_, v)| v.dtype() == Dtype::F32));

        let back = dir.join(format!("back{i}"));
        run_ok(&["import", s(&hf), "--out", s(&back)]);
        assert_eq!(names_in(&back), ["config.json", "model.safetensors"]);
        assert_eq!(checkpoint::load_config(&back).unwrap(), cfg);
        assert!(weights(&back) == want, "config {i}: imported weights differ from the exported checkpoint's");
        let eval = |c: &Path| {
            let out: Value = serde_json::from_str(&run_ok(&["eval", "--checkpoint", s(c), "--data", s(&data), "--json"])).unwrap();
            (out["bpb"].as_f64().unwrap(), out["by_patch_position"].clone(), out["by_window_position"].clone())
        };
        assert_eq!(eval(&ckpt), eval(&back), "config {i}: eval differs after the round trip");
        // No temporary folder is left beside the outputs.
        assert!(names_in(&dir).iter().all(|n| !n.starts_with('.')), "{:?}", names_in(&dir));
    }
}

#[test]
fn export_and_import_replace_only_with_overwrite_and_only_their_own_files() {
    let dir = temp_dir("export-overwrite");
    saved(&dir.join("run"), &crate::small_config(NormKind::LayerNorm, true), 1);
    let run = dir.join("run");
    let hf = dir.join("hf");
    run_ok(&["export", "--checkpoint", s(&run), "--out", s(&hf)]);
    fails_with(&["export", "--checkpoint", s(&run), "--out", s(&hf)], "already exists and is not empty: pass --overwrite");
    run_ok(&["export", "--checkpoint", s(&run), "--out", s(&hf), "--overwrite"]);
    // A file the export does not write is never replaced, even with --overwrite.
    std::fs::write(hf.join("notes.txt"), b"mine").unwrap();
    fails_with(&["export", "--checkpoint", s(&run), "--out", s(&hf), "--overwrite"], "holds `notes.txt`, which this command does not write");
    assert_eq!(std::fs::read(hf.join("notes.txt")).unwrap(), b"mine");
    std::fs::remove_file(hf.join("notes.txt")).unwrap();
    // An existing file as --out, and an empty folder (used).
    std::fs::write(dir.join("file"), b"x").unwrap();
    fails_with(&["export", "--checkpoint", s(&run), "--out", s(&dir.join("file"))], "exists and is not a folder");
    std::fs::create_dir(dir.join("empty")).unwrap();
    run_ok(&["export", "--checkpoint", s(&run), "--out", s(&dir.join("empty"))]);

    let ckpt = dir.join("ckpt");
    run_ok(&["import", s(&hf), "--out", s(&ckpt)]);
    let before = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    fails_with(&["import", s(&hf), "--out", s(&ckpt)], "already exists and is not empty: pass --overwrite");
    // A run folder (checkpoints inside) is not a model checkpoint folder: never replaced.
    fails_with(&["import", s(&hf), "--out", s(&run), "--overwrite"], "holds `step-00000003`");
    assert!(run.join("step-00000003/model.safetensors").is_file());
    run_ok(&["import", s(&hf), "--out", s(&ckpt), "--overwrite"]);
    assert_eq!(std::fs::read(ckpt.join("model.safetensors")).unwrap(), before);
    assert!(names_in(&dir).iter().all(|n| !n.starts_with('.')), "{:?}", names_in(&dir));
}

/// A copy of the export `good` as `name`, changed by `edit` (config.json as JSON, and the
/// tensors as (name, dtype, shape, bytes)).
fn variant(
    dir: &Path,
    good: &Path,
    name: &str,
    edit_config: impl Fn(&mut Value),
    edit_tensors: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut config: Value = serde_json::from_slice(&std::fs::read(good.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(out.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let bytes = std::fs::read(good.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        file.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit_tensors(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, shape, data)| (n.clone(), safetensors::tensor::TensorView::new(*d, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

fn f32s_to(dtype: Dtype, data: &[u8]) -> Vec<u8> {
    let xs = data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
    match dtype {
        // bf16: the high half of the f32 (truncation is enough for a test).
        Dtype::BF16 => xs.flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect(),
        Dtype::F64 => xs.flat_map(|x| (x as f64).to_le_bytes()).collect(),
        Dtype::I32 => xs.flat_map(|x| (x as i32).to_le_bytes()).collect(),
        other => panic!("no conversion to {other:?}"),
    }
}

#[test]
fn import_names_what_is_wrong_with_a_folder() {
    let dir = temp_dir("import-bad");
    saved(&dir.join("run"), &crate::small_config(NormKind::LayerNorm, true), 4);
    let good = dir.join("hf");
    run_ok(&["export", "--checkpoint", s(&dir.join("run")), "--out", s(&good)]);
    let out = dir.join("out");
    let refused = |folder: &Path, needle: &str| {
        fails_with(&["import", s(folder), "--out", s(&out)], needle);
        assert!(!out.exists(), "a refused import must not write --out ({needle})");
    };
    let same = |_: &mut Value| {};
    let keep = |_: &mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>| {};

    refused(&dir.join("nowhere"), "no such folder");
    std::fs::create_dir(dir.join("empty")).unwrap();
    refused(&dir.join("empty"), "no config.json: not a megabyte export");
    let no_weights = variant(&dir, &good, "no-weights", same, keep);
    std::fs::remove_file(no_weights.join("model.safetensors")).unwrap();
    refused(&no_weights, "no model.safetensors");
    refused(&dir.join("run"), "a megabyte run folder, not an export");
    refused(&dir.join("run/step-00000003"), "a megabyte checkpoint's config, not an export's");
    let garbage = variant(&dir, &good, "not-json", same, keep);
    std::fs::write(garbage.join("config.json"), b"{\"model_type\": \"megabyte\",").unwrap();
    refused(&garbage, "not valid JSON");
    let array = variant(&dir, &good, "array", |c| *c = serde_json::json!([1, 2]), keep);
    refused(&array, "not a JSON object");
    let gpt2 = variant(&dir, &good, "gpt2", |c| c["model_type"] = "gpt2".into(), keep);
    refused(&gpt2, "model_type is \"gpt2\", not \"megabyte\"");
    let untyped = variant(&dir, &good, "untyped", |c| drop(c.as_object_mut().unwrap().remove("model_type")), keep);
    refused(&untyped, "no model_type");
    let future = variant(&dir, &good, "future", |c| c["megabyte_format"] = 2.into(), keep);
    refused(&future, "megabyte_format is 2; this megabyte reads format 1");
    let unversioned = variant(&dir, &good, "unversioned", |c| drop(c.as_object_mut().unwrap().remove("megabyte_format")), keep);
    refused(&unversioned, "no megabyte_format");
    let no_context = variant(&dir, &good, "no-context", |c| drop(c.as_object_mut().unwrap().remove("context")), keep);
    refused(&no_context, "missing field `context`");
    let unknown = variant(&dir, &good, "unknown", |c| c["rope_theta"] = 10000.into(), keep);
    refused(&unknown, "unknown field `rope_theta`");
    let invalid = variant(&dir, &good, "invalid", |c| c["local"]["heads"] = 3.into(), keep);
    refused(&invalid, "must be divisible by local.heads");
    let vocab = variant(&dir, &good, "vocab", |c| c["vocab_size"] = 50257.into(), keep);
    refused(&vocab, "vocab_size is 50257");
    // The config and the tensors disagree.
    let untied = variant(&dir, &good, "untied", |c| c["tied_head"] = false.into(), keep);
    refused(&untied, "missing tensors that config.json's architecture needs: head.weight");
    let extra = variant(&dir, &good, "extra", same, |t| {
        let embed = t.iter().find(|x| x.0 == "local_embedder.byte_embed.weight").unwrap().clone();
        t.push(("head.weight".into(), embed.1, embed.2, embed.3));
    });
    refused(&extra, "unexpected tensors for config.json's architecture: head.weight (tied_head is true");
    let missing = variant(&dir, &good, "missing", same, |t| t.retain(|x| x.0 != "global.blocks.1.mlp.up.weight"));
    refused(&missing, "missing tensors that config.json's architecture needs: global.blocks.1.mlp.up.weight");
    let wider = variant(&dir, &good, "wider", |c| c["local"]["width"] = 16.into(), keep);
    refused(&wider, "tensor `global_to_local.weight` has shape [8, 4], but config.json's architecture gives it [16, 4]");
    let huge = variant(&dir, &good, "huge", |c| c["global"]["layers"] = 100_000.into(), keep);
    refused(&huge, "config and the weights do not belong together");
    let absurd = variant(&dir, &good, "absurd", |c| c["global"]["width"] = (1u64 << 20).into(), keep);
    refused(&absurd, "the model does not fit");
    let ints = variant(&dir, &good, "ints", same, |t| {
        let x = t.iter_mut().find(|x| x.0 == "global_to_local.weight").unwrap();
        x.3 = f32s_to(Dtype::I32, &x.3);
        x.1 = Dtype::I32;
    });
    refused(&ints, "tensor `global_to_local.weight` is I32; weights must be floating point");
    let nan = variant(&dir, &good, "nan", same, |t| {
        let x = t.iter_mut().find(|x| x.0 == "local.norm.weight").unwrap();
        x.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    refused(&nan, "tensor `local.norm.weight` holds NaN or infinite values");
    let corrupt = variant(&dir, &good, "corrupt", same, keep);
    let bytes = std::fs::read(corrupt.join("model.safetensors")).unwrap();
    std::fs::write(corrupt.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    refused(&corrupt, "not a safetensors file, or truncated");

    // bf16 and f64 weights are converted to f32, with a note saying so.
    let half = variant(&dir, &good, "half", same, |t| {
        for x in t.iter_mut().filter(|x| x.0.starts_with("global.")) {
            x.3 = f32s_to(Dtype::BF16, &x.3);
            x.1 = Dtype::BF16;
        }
        let x = t.iter_mut().find(|x| x.0 == "global_to_local.weight").unwrap();
        x.3 = f32s_to(Dtype::F64, &x.3);
        x.1 = Dtype::F64;
    });
    let (ok, stderr) = megabyte(&["import", s(&half), "--out", s(&out)]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("note: 18 tensors converted from BF16 to f32"), "{stderr}");
    assert!(stderr.contains("note: 1 tensors converted from F64 to f32: global_to_local.weight"), "{stderr}");
    let (want, got) = (weights(&dir.join("run/step-00000003")), weights(&out));
    assert_eq!(got["global_to_local.weight"], want["global_to_local.weight"]);
    let qkv = "global.blocks.0.attn.qkv.weight";
    assert!(got[qkv].iter().zip(&want[qkv]).all(|(a, b)| (a - b).abs() <= b.abs() / 128.0));
}

/// Reads a float32 .npy file written by `eval --logits`: (shape, values).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "the header is padded to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let dims = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = dims.split(',').filter(|d| !d.trim().is_empty()).map(|d| d.trim().parse().unwrap()).collect();
    let values: Vec<f32> = bytes[10 + len..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, values)
}

#[test]
fn eval_writes_the_logits_of_every_window() {
    let dir = temp_dir("eval-logits");
    let cfg = crate::small_config(NormKind::RmsNorm, false);
    let ckpt = saved(&dir, &cfg, 5);
    let data = random_bytes(3 * cfg.context + 5, 8); // three whole windows and a padded one
    std::fs::write(dir.join("data.bin"), &data).unwrap();
    let (npy, data_path) = (dir.join("logits.npy"), dir.join("data.bin"));
    let args = |extra: &[&'static str]| -> Vec<String> {
        let base = ["eval", "--checkpoint", s(&ckpt), "--data", s(&data_path), "--batch-size", "3", "--logits", s(&npy)];
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    run_ok(&strs(&args(&[])));
    let (shape, values) = read_npy(&npy);
    assert_eq!(shape, [4, cfg.context, 256]);
    let (model, _) = checkpoint::load_model(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let mut rows: Vec<Vec<u8>> = data.chunks(cfg.context).map(|c| c.to_vec()).collect();
    rows.last_mut().unwrap().resize(cfg.context, 0);
    let want = model.logits(&crate::bytes_tensor(&rows)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Equal up to the order of float sums (batches of 3 and 1 windows there, 4 here).
    assert_eq!(values.len(), want.len());
    let diff = values.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "the file's logits differ from the model's by {diff}");
    // An existing file needs --overwrite; --logits is for plain windows only.
    fails_with(&strs(&args(&[])), "already exists: pass --overwrite");
    run_ok(&strs(&args(&["--overwrite"])));
    fails_with(&strs(&args(&["--overwrite", "--sliding", "16"])), "--logits writes the logits of plain windows");
    assert!(names_in(&dir).iter().all(|n| !n.starts_with('.')), "{:?}", names_in(&dir));
}

/// An export folder with damaged or forged bytes (config.json and model.safetensors, the
/// safetensors header most of all): `import` returns an error or finite weights of the
/// config's shape, never a panic or an unbounded allocation.
#[test]
fn import_of_damaged_folders_errs_or_succeeds_without_panicking() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let dir = temp_dir("import-fuzz");
    saved(&dir.join("run"), &crate::small_config(NormKind::RmsNorm, false), 6);
    let good = dir.join("hf");
    run_ok(&["export", "--checkpoint", s(&dir.join("run")), "--out", s(&good)]);
    let config = std::fs::read(good.join("config.json")).unwrap();
    let weights = std::fs::read(good.join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64);
    let edits = prop::collection::vec((any::<bool>(), 0.0..1.0f64, any::<u8>()), 1..4);
    let case = dir.join("case");
    TestRunner::new(Config { cases, ..Config::default() })
        .run(&(edits, prop::option::of(0.0..1.0f64)), |(edits, cut)| {
            let (mut c, mut w) = (config.clone(), weights.clone());
            for (in_config, at, byte) in edits {
                // Config bytes anywhere; weight bytes mostly in the header, where the lengths are.
                let (buf, span) = if in_config { (&mut c, config.len()) } else { (&mut w, header) };
                let i = ((at * span as f64) as usize).min(buf.len() - 1);
                buf[i] = byte;
            }
            if let Some(cut) = cut {
                w.truncate((cut * w.len() as f64) as usize);
            }
            std::fs::create_dir_all(&case).unwrap();
            std::fs::write(case.join("config.json"), &c).unwrap();
            std::fs::write(case.join("model.safetensors"), &w).unwrap();
            if let Ok(imported) = megabyte::export::import(&case) {
                let mut model = megabyte::nn::Params::for_loading(DType::F32, &Device::Cpu);
                megabyte::MegaByte::new(&imported.config, &mut model).unwrap();
                prop_assert_eq!(model.count(), imported.params.count());
            }
            Ok(())
        })
        .unwrap();
}
