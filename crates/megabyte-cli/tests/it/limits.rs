//! Limits through the `megabyte` command: absurd model configs, huge sizes from flags and file
//! headers, and non-finite numbers are refused with a clear message before any work, and
//! nothing non-finite is ever saved or used.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use megabyte::checkpoint::{self, CheckpointData};
use megabyte::{DType, Device, ModelConfig, Precision, Tensor, Workload};

use crate::{fails_with, megabyte, temp_dir, tiny};


fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Names in `dir` that a converter or a save writes before renaming (`.NAME.tmp-PID`).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// A one-step tiny run's checkpoint.
fn trained_checkpoint(dir: &Path) -> PathBuf {
    let (model, params) = tiny(1);
    checkpoint::save(dir, &CheckpointData { step: 1, config: model.config(), params: &params, training: None }).unwrap()
}

#[test]
fn absurd_model_configs_are_refused_before_allocating() {
    let dir = temp_dir("absurd-configs");
    let write = |name: &str, edit: &dyn Fn(&mut ModelConfig)| {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        edit(&mut cfg);
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        path
    };
    // A million layers: a valid shape whose counts are exact, refused for memory.
    let deep = write("deep.json", &|c| c.global.layers = 1_000_000);
    let (ok, err) = megabyte(&["info", "--config", s(&deep), "--json"]);
    assert!(ok, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(["info", "--config", s(&deep), "--json"]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (dg, t, p) = (16u128, 256u128, 8u128);
    let global = 256 * dg + t * dg + p * dg + 1_000_000 * (12 * 128 * 128 + 2 * 2 * 128) + 2 * 128;
    assert_eq!(info["params"]["global"].as_u64().unwrap() as u128, global, "exact, not wrapped around");
    let run = dir.join("run");
    fails_with(&["train", "--config", s(&deep), "--steps", "1", "--out", s(&run)], "does not fit: it needs at least");
    fails_with(&["train", "--config", s(&deep), "--steps", "1", "--out", s(&run)], "GiB are available");
    // Widths whose counts overflow 64 bits: refused by every command that reads the config.
    let wide = write("wide.json", &|c| {
        c.global.width = 1_000_000_000;
        c.global.heads = 1;
    });
    let huge = write("huge.json", &|c| {
        c.global.width = 1 << 62;
        c.global.heads = 1;
    });
    for cfg in [&wide, &huge] {
        fails_with(&["info", "--config", s(cfg)], "far too large");
        fails_with(&["train", "--config", s(cfg), "--steps", "1", "--out", s(&run)], "far too large");
    }
    assert!(!run.exists(), "a refused run must not create its output folder");
    // A checkpoint whose config is absurd is refused by eval and generate too.
    let ckpt = trained_checkpoint(&dir.join("ckpt"));
    std::fs::copy(&huge, ckpt.join("config.json")).unwrap();
    fails_with(&["generate", "--checkpoint", s(&ckpt), "-n", "4"], "far too large");
}

#[test]
fn the_memory_estimate_refuses_nothing_that_runs() {
    let gib = (1u64 << 30) as f64;
    // Below every peak measured on one H200 in bf16 (BENCHMARKS.md, RESULTS.md): paper-arxiv
    // at batch 16 (about 104 GiB), configs/long-context.json at T = 8,192 × 128 and
    // T = 1,048,576 × 1 (98.8 and 99.1 GiB).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let long: ModelConfig = serde_json::from_slice(&std::fs::read(root.join("long-context.json")).unwrap()).unwrap();
    let at = |cfg: &ModelConfig, context: usize| ModelConfig { context, ..cfg.clone() };
    for (cfg, rows, peak) in [
        (ModelConfig::preset("paper-arxiv").unwrap(), 16, 104.0),
        (at(&long, 8192), 128, 98.8),
        (at(&long, 1 << 20), 1, 99.1),
    ] {
        let need = cfg.memory_estimate(Workload::Training { rows, recompute: false, precision: Precision::Bf16 });
        assert!(need < peak * gib, "T = {}: {} GiB", cfg.context, need / gib);
    }
    // Every preset and recorded config of at most 8,192-byte sequences trains at batch 8 in
    // f32 within an H100's 80 GB, and the tiny preset within 1 GiB of the CPU.
    let mut configs: Vec<ModelConfig> = megabyte::config::PRESETS.iter().map(|p| ModelConfig::preset(p).unwrap()).collect();
    for dir in [root.clone(), root.join("enwik8")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                configs.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
            }
        }
    }
    for cfg in &configs {
        cfg.validate().unwrap();
        let work = Workload::Training { rows: 8, recompute: false, precision: Precision::F32 };
        if cfg.context <= 8192 {
            assert!(cfg.memory_estimate(work) < 75.0 * gib, "{cfg:?}: {} GiB", cfg.memory_estimate(work) / gib);
        }
    }
    let work = Workload::Training { rows: 8, recompute: false, precision: Precision::F32 };
    assert!(ModelConfig::preset("tiny").unwrap().memory_estimate(work) < gib);
    // A device with room passes, and the CPU check runs against this machine.
    ModelConfig::preset("tiny").unwrap().check_fits(work, &Device::Cpu).unwrap();
}

/// An IDX image file's header: u8 elements, dimensions N×H×W(×C).
fn idx_header(dims: &[u32]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out
}

#[test]
fn huge_sizes_from_flags_and_headers_are_refused_and_leave_nothing() {
    let dir = temp_dir("huge-sizes");
    let ckpt = trained_checkpoint(&dir.join("ckpt"));
    let png = dir.join("g.png");
    let wav = dir.join("a.wav");
    let gen = ["generate", "--checkpoint", s(&ckpt)];
    fails_with(&[&gen[..], &["--image", "100000x100000x4", "--out", s(&png)]].concat(), "at most 268435456 bytes");
    fails_with(&[&gen[..], &["--image", "28x28x1", "--count", "1000000000", "--out", s(&png)]].concat(), "too large for one PNG");
    fails_with(&[&gen[..], &["--image", "2x2x1", "--count", "100000000", "--out", s(&png)]].concat(), "does not fit");
    fails_with(&[&gen[..], &["--wav", "1e12", "--out", s(&wav)]].concat(), "would not fit one WAV file");
    assert!(!png.exists() && !wav.exists());
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));

    // -n of u64::MAX streams: bytes come out at once, nothing of n is allocated up front.
    let mut child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args([&gen[..], &["-n", "18446744073709551615"]].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    let read = child.stdout.take().unwrap().read_exact(&mut first);
    // The pipe is closed now: the command stops at its next write.
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(read.is_ok(), "no output streamed: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("capacity overflow"), "{stderr}");
    assert!(!status.success() && stderr.contains("writing to stdout"), "{stderr}");

    // IDX headers announcing 65536×65536 images, or sizes that overflow, are refused.
    let out = dir.join("images.bin");
    let big = dir.join("big.idx");
    let mut bytes = idx_header(&[1, 65536, 65536]);
    bytes.extend(vec![0u8; 4096]);
    std::fs::write(&big, &bytes).unwrap();
    fails_with(&["data", "images", s(&big), s(&out)], "at most 268435456 bytes");
    let wraps = dir.join("wraps.idx");
    std::fs::write(&wraps, idx_header(&[1, 1 << 31, 1 << 31, 4])).unwrap();
    fails_with(&["data", "images", s(&wraps), s(&out)], "overflows");
    assert!(!out.exists());
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));
}

#[test]
fn non_finite_and_out_of_range_training_flags_are_refused() {
    let dir = temp_dir("non-finite-flags");
    let out = dir.join("run");
    for (flag, value, needle) in [
        ("--min-lr", "NaN", "min_lr"),
        ("--lr", "NaN", "lr"),
        ("--lr", "inf", "finite"),
        ("--weight-decay", "NaN", "weight decay"),
        ("--weight-decay", "-5", "weight decay"),
        ("--grad-clip", "NaN", "grad_clip"),
        ("--grad-clip", "-1", "grad_clip"),
        ("--dropout", "NaN", "dropout"),
        ("--decay-fraction", "NaN", "decay_fraction"),
        ("--decay-fraction", "0", "decay_fraction"),
        ("--decay-fraction", "1.5", "decay_fraction"),
        ("--muon-lr", "NaN", "Muon learning rate"),
        ("--muon-lr", "0", "Muon learning rate"),
        ("--muon-momentum", "1", "Muon momentum"),
        ("--hash-ngrams", "1", "hash_ngrams.sizes"),
        ("--hash-ngrams", "3,3", "hash_ngrams.sizes"),
        ("--hash-buckets", "10", "--hash-buckets needs --hash-ngrams"),
        ("--time", "NaN", "minutes"),
        ("--time", "inf", "minutes"),
    ] {
        let arg = format!("{flag}={value}");
        fails_with(&["train", "--steps", "1", "--out", s(&out), &arg], needle);
    }
    assert!(!out.exists(), "a refused run must not create its output folder");
    // The library refuses them too.
    let mut cfg = megabyte::train::TrainConfig::standard(2, 1e-3);
    cfg.adamw.weight_decay = f64::NAN;
    let (_, params) = tiny(1);
    assert!(megabyte::optim::AdamW::new(params.vars(), cfg.adamw).is_err());
}

#[test]
fn a_diverging_run_stops_naming_what_went_non_finite_and_never_saves_that_step() {
    let dir = temp_dir("diverging");
    let train = |out: &Path, lr: &str| {
        megabyte(&[
            "train", "--steps", "4", "--checkpoint-every", "1", "--warmup", "0", "--eval-bytes", "1024", "--lr", lr,
            "--out", s(out),
        ])
    };
    // lr 1e30: step 1's weights are huge but finite (saved); step 2's loss is NaN.
    let run = dir.join("loss");
    let (ok, err) = train(&run, "1e30");
    assert!(!ok, "a diverging run must fail");
    assert!(err.contains("step 2: the loss went non-finite"), "{err}");
    assert!(err.contains("not saved"), "{err}");
    let saved: Vec<u64> = checkpoint::list(&run).unwrap().into_iter().map(|(step, _)| step).collect();
    assert_eq!(saved, vec![1], "only the finite step is saved");
    checkpoint::load_model(&checkpoint::dir_for(&run, 1), DType::F32, &Device::Cpu).unwrap();
    // lr 1e300 is infinite in the f32 update: the weights are the first to go non-finite. A
    // checkpoint of step 1 is refused, naming the tensor...
    let run = dir.join("weights");
    let (ok, err) = train(&run, "1e300");
    assert!(!ok);
    assert!(err.contains("NaN or infinite") && err.contains("not saved"), "{err}");
    assert!(checkpoint::list(&run).unwrap().is_empty(), "nothing of a non-finite step is saved");
    assert!(temporaries(&run).is_empty());
    // ...and without a checkpoint there, step 2 says the weights of step 1 went first.
    let run = dir.join("weights-later");
    let (ok, err) = megabyte(&[
        "train", "--steps", "4", "--checkpoint-every", "100", "--warmup", "0", "--eval-bytes", "1024", "--lr", "1e300",
        "--out", s(&run),
    ]);
    assert!(!ok);
    assert!(err.contains("step 2: the weights went non-finite first, in the update of step 1"), "{err}");
    assert!(checkpoint::list(&run).unwrap().is_empty(), "nothing non-finite is saved");
    assert!(temporaries(&run).is_empty());
}

#[test]
fn non_finite_weights_are_never_saved_nor_loaded() {
    let dir = temp_dir("non-finite-ckpt");
    let (model, params) = tiny(1);
    // save refuses a NaN weight, and a NaN optimizer moment, writing nothing.
    let var = params.vars().values().next().unwrap().clone();
    let good = var.as_tensor().copy().unwrap();
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let data = CheckpointData { step: 3, config: model.config(), params: &params, training: None };
    let err = checkpoint::save(&dir, &data).unwrap_err().to_string();
    assert!(err.contains("NaN or infinite") && err.contains("not saved"), "{err}");
    var.set(&good).unwrap();
    let mut moments = std::collections::HashMap::new();
    moments.insert("m.x".to_string(), Tensor::new(&[1f32, f32::INFINITY], &Device::Cpu).unwrap());
    let data = CheckpointData { step: 3, config: model.config(), params: &params, training: Some((moments, serde_json::json!({}))) };
    let err = checkpoint::save(&dir, &data).unwrap_err().to_string();
    assert!(err.contains("`m.x`"), "{err}");
    assert!(checkpoint::list(&dir).unwrap().is_empty());
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing written");

    // A checkpoint file holding a NaN (written elsewhere, or damaged) is refused by eval and
    // generate with a non-zero exit.
    let ckpt = trained_checkpoint(&dir.join("nan"));
    let path = ckpt.join(checkpoint::MODEL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "local.blocks.0.mlp.up.weight";
    let start = header[name]["data_offsets"][0].as_u64().unwrap_or_else(|| panic!("no {name} in {header}")) as usize;
    bytes[8 + header_len + start..8 + header_len + start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let data = dir.join("data.txt");
    std::fs::write(&data, crate::random_bytes(600, 1)).unwrap();
    fails_with(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)], "NaN or infinite");
    fails_with(&["generate", "--checkpoint", s(&ckpt), "-n", "4"], name);

    // Finite weights that overflow in the forward pass: eval refuses a non-finite score
    // instead of printing `bpb NaN` and exiting 0.
    let ckpt = trained_checkpoint(&dir.join("huge"));
    let path = ckpt.join(checkpoint::MODEL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    for name in ["local.blocks.0.mlp.up.weight", "local.blocks.0.mlp.down.weight"] {
        let [start, end] = [0, 1].map(|i| header[name]["data_offsets"][i].as_u64().unwrap() as usize + 8 + header_len);
        for at in (start..end).step_by(4) {
            bytes[at..at + 4].copy_from_slice(&1e30f32.to_le_bytes());
        }
    }
    std::fs::write(&path, bytes).unwrap();
    fails_with(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)], "not finite");
}
