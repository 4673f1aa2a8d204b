//! Bad input through the `megabyte` command: a clear message, a non-zero exit, and nothing
//! overwritten.

use std::path::{Path, PathBuf};
use std::process::Command;

use megabyte::checkpoint::{self, CheckpointData};

use crate::{fails_with, megabyte, temp_dir, tiny};


fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A saved tiny checkpoint in its own folder.
fn saved_checkpoint(dir: &Path) -> PathBuf {
    let (model, params) = tiny(1);
    checkpoint::save(dir, &CheckpointData { step: 1, config: model.config(), params: &params, training: None }).unwrap()
}

#[test]
fn bad_data_files_are_refused() {
    let dir = temp_dir("bad-data");
    let out = dir.join("run");
    fails_with(&["train", "--data", s(&dir.join("missing.txt")), "--out", s(&out), "--steps", "1"], "cannot read it");
    std::fs::write(dir.join("empty.txt"), b"").unwrap();
    fails_with(&["train", "--data", s(&dir.join("empty.txt")), "--out", s(&out), "--steps", "1"], "empty");
    std::fs::write(dir.join("short.txt"), vec![b'a'; 100]).unwrap();
    fails_with(&["train", "--data", s(&dir.join("short.txt")), "--out", s(&out), "--steps", "1"], "fewer than one window");
    fails_with(&["eval", "--checkpoint", s(&dir), "--data", s(&dir.join("missing.txt"))], "checkpoint");
    let bench = ["bench", "--steps", "1", "--warmup", "0", "--gen-bytes", "0"];
    std::fs::write(dir.join("200k.txt"), vec![b'a'; 200_000]).unwrap();
    fails_with(&[&bench[..], &["--context", "262144", "--data", s(&dir.join("200k.txt"))]].concat(), "fewer than one window");
    fails_with(&[&bench[..], &["--context", "4194304"]].concat(), "the embedded corpus unless --data");
    assert!(!out.exists(), "a refused run must not create its output folder");
}

#[test]
fn bad_checkpoints_are_refused() {
    let dir = temp_dir("bad-ckpt");
    let data = dir.join("data.txt");
    std::fs::write(&data, crate::random_bytes(600, 1)).unwrap();
    let good = saved_checkpoint(&dir.join("good"));
    let (ok, err) = megabyte(&["eval", "--checkpoint", s(&good), "--data", s(&data), "--json"]);
    assert!(ok, "a good checkpoint evaluates: {err}");

    let weights = std::fs::read(good.join("model.safetensors")).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&Path)| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        edit(&d);
        d
    };
    let corrupt = variant("corrupt", &|d| std::fs::write(d.join("model.safetensors"), b"not a safetensors file").unwrap());
    fails_with(&["eval", "--checkpoint", s(&corrupt), "--data", s(&data)], "corrupt or truncated");
    let truncated = variant("truncated", &|d| std::fs::write(d.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap());
    fails_with(&["eval", "--checkpoint", s(&truncated), "--data", s(&data)], "corrupt or truncated");
    let mismatched = variant("mismatched", &|d| {
        let mut cfg = megabyte::ModelConfig::preset("tiny").unwrap();
        cfg.local.width = 64;
        std::fs::write(d.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    });
    fails_with(&["eval", "--checkpoint", s(&mismatched), "--data", s(&data)], "does not match");
    let bad_config = variant("badconfig", &|d| std::fs::write(d.join("config.json"), b"{\"patch_size\": 8}").unwrap());
    fails_with(&["generate", "--checkpoint", s(&bad_config), "-n", "4"], "not a valid model config");
    let no_weights = variant("noweights", &|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    fails_with(&["generate", "--checkpoint", s(&no_weights), "-n", "4"], "missing");
    fails_with(&["train", "--resume", s(&good)], "only a training checkpoint can be resumed");
    // The good checkpoint is untouched by all of this.
    assert_eq!(std::fs::read(good.join("model.safetensors")).unwrap(), weights);
}

#[test]
fn a_resumed_run_refuses_settings_that_are_not_its_own() {
    // A resumed run keeps its recorded settings: one given anew that differs is refused, not
    // ignored, with the flag, its value and the run's; the run folder is left as it was.
    let dir = temp_dir("resume-differs");
    let run = dir.join("run");
    let first = ["train", "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--eval-bytes", "2048", "--sample-bytes", "0"];
    let (ok, err) = megabyte(&[&first[..], &["--out", s(&run)]].concat());
    assert!(ok, "{err}");
    let before = run_files(&run);
    std::fs::write(dir.join("other.txt"), crate::random_bytes(4096, 2)).unwrap();
    let tiny_json = dir.join("tiny.json");
    std::fs::write(&tiny_json, serde_json::to_vec(&megabyte::ModelConfig::preset("tiny").unwrap()).unwrap()).unwrap();
    for (setting, says) in [
        (&["--lr", "2e-3"][..], "--lr is 0.002 here and 0.001 in the resumed run"),
        (&["--batch-size", "4"], "--batch-size is 4 here and 2 in the resumed run"),
        (&["--seed", "3"], "--seed is 3 here and 0 in the resumed run"),
        (&["--eval-every", "5"], "--eval-every is 5 here and 250 in the resumed run"),
        (&["--dropout", "0.1"], "--dropout is 0.1 here and 0 in the resumed run"),
        (&["--decay", "linear"], "--decay is linear here and cosine in the resumed run"),
        (&["--decay-fraction", "0.5"], "--decay-fraction is 0.5 here and 0.2 in the resumed run"),
        (&["--muon-lr", "0.02"], "--muon-lr is 0.02 here and none in the resumed run"),
        (&["--preset", "enwik8"], "--preset enwik8's context is 4096 here and 256 in the resumed run"),
        (&["--preset", "byte-enwik8-10min", "--context", "256"], "--preset byte-enwik8-10min's global.heads is 8 here and 2 in the resumed run"),
        (&["--context", "512"], "--context is 512 here and 256 in the resumed run"),
        (&["--window", "4"], "--window is 4 here and none in the resumed run"),
        (&["--qk-norm"], "--qk-norm is true here and false in the resumed run"),
        (&["--mlp", "relu2"], "--mlp is relu2 here and gelu in the resumed run"),
        (&["--zero-init-proj"], "--zero-init-proj is true here and false in the resumed run"),
        (&["--hash-ngrams", "3,4"], "--hash-ngrams is {\"buckets\":8192,\"sizes\":[3,4]} here and none in the resumed run"),
        (&["--data", s(&dir.join("other.txt"))], "other.txt here and the embedded corpus in the resumed run"),
        (&["--valid-bytes", "100"], "--valid-bytes is 100 here and 100000 in the resumed run"),
        (&["--documents"], "--documents is true here and false in the resumed run"),
        (&["--recompute"], "--recompute is true here and false in the resumed run"),
        // The same model, but a recipe's settings come with it.
        (&["--config", s(&tiny_json), "--preset", "enwik8-10min"], "--preset enwik8-10min's --batch-size is 64 here and 2 in the resumed run"),
    ] {
        let args = [&["train", "--resume", s(&run), "--steps", "3"][..], setting].concat();
        fails_with(&args, says);
        fails_with(&args, "only --steps, --time");
        assert_eq!(run_files(&run), before, "{setting:?}: a refused resume changed the run folder");
    }
}

/// Every file under a run folder with its contents.
fn run_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(run_files(&path));
        } else {
            files.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    files.sort();
    files
}

#[test]
fn invalid_configs_are_refused() {
    let dir = temp_dir("bad-config");
    fails_with(&["info", "--preset", "huge"], "invalid value 'huge' for '--preset");
    fails_with(&["info", "--preset", "huge"], "[possible values: tiny, enwik8, enwik8-10min,");
    let mut cfg = megabyte::ModelConfig::preset("tiny").unwrap();
    cfg.global.width = 100;
    std::fs::write(dir.join("odd.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    fails_with(&["info", "--config", s(&dir.join("odd.json"))], "divisible");
    cfg.global.width = 128;
    cfg.context = 250;
    std::fs::write(dir.join("t.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    fails_with(&["info", "--config", s(&dir.join("t.json"))], "multiple of patch_size");
    cfg.context = 256;
    cfg.patch_embed_std = Some(0.0);
    std::fs::write(dir.join("pe.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    fails_with(&["info", "--config", s(&dir.join("pe.json"))], "patch_embed_std must be positive");
    // A misspelt key is refused, not ignored (the run would train without the option).
    let mut text = serde_json::to_value(megabyte::ModelConfig::preset("tiny").unwrap()).unwrap();
    text["patch_embed_sd"] = serde_json::json!(1.0);
    std::fs::write(dir.join("typo.json"), text.to_string()).unwrap();
    fails_with(&["info", "--config", s(&dir.join("typo.json"))], "unknown field `patch_embed_sd`");
    text.as_object_mut().unwrap().remove("patch_embed_sd");
    text["global"]["qk_norm"] = serde_json::json!(true);
    std::fs::write(dir.join("typo2.json"), text.to_string()).unwrap();
    fails_with(&["info", "--config", s(&dir.join("typo2.json"))], "unknown field `qk_norm`");
    fails_with(&["train", "--out", s(&dir.join("run")), "--steps", "0"], "positive");
    fails_with(&["train", "--out", s(&dir.join("run")), "--steps", "2", "--lr=-1"], "lr");
    fails_with(&["train", "--out", s(&dir.join("run"))], "stopping rule");
    fails_with(&["train", "--out", s(&dir.join("run")), "--steps", "1", "--device", "tpu"], "bad device");
    fails_with(&["train", "--out", s(&dir.join("run")), "--steps", "1", "--precision", "bf16"], "CUDA only");
    fails_with(&["train", "--out", s(&dir.join("run")), "--steps", "1", "--precision", "fp8"], "[possible values: auto, f32, bf16]");
    assert!(!dir.join("run").exists(), "a refused run created its folder");
}

#[test]
fn unwritable_output_and_existing_runs_are_refused() {
    let dir = temp_dir("bad-out");
    std::fs::write(dir.join("file"), b"x").unwrap();
    fails_with(&["train", "--out", s(&dir.join("file").join("run")), "--steps", "1"], "output folder");
    // A folder holding a run is never overwritten by a new run.
    let run = dir.join("run");
    let ckpt = saved_checkpoint(&run);
    let before = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    fails_with(&["train", "--out", s(&run), "--steps", "1"], "already holds a run");
    assert_eq!(std::fs::read(ckpt.join("model.safetensors")).unwrap(), before);
}

/// A prompt longer than the context is taken whole, decoded as if fed byte by byte: its
/// window (T = 256, P = 8) slid to its last half at byte 256, so the 300-byte prompt continues
/// exactly like its last 172 bytes alone.
#[test]
fn a_prompt_longer_than_the_context_continues_its_last_window() {
    let dir = temp_dir("long-prompt");
    let ckpt = saved_checkpoint(&dir);
    let long: String = (0..300).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
    let generate = |prompt: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_megabyte"))
            .args(["generate", "--checkpoint", s(&ckpt), "--prompt", prompt, "-n", "24", "--seed", "3"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let whole = generate(&long);
    assert!(!whole.is_empty());
    assert_eq!(whole, generate(&long[128..]));
    assert_ne!(whole, generate(&long[127..]), "the window must start at byte 128, not before");
}

#[test]
fn data_fetch_lists_its_sets_and_refuses_a_wrong_package() {
    let help = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(["data", "fetch", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for d in megabyte_data::fetch::Dataset::ALL {
        assert!(help.contains(&format!("  {}  ", d.name())), "`data fetch --help` does not list {d}:\n{help}");
    }
    let names = megabyte_data::fetch::Dataset::ALL.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ");
    fails_with(&["data", "fetch", "mnist"], &format!("[possible values: {names}]"));

    // A file that is not the pinned package: refused before anything is unpacked or created.
    let dir = temp_dir("fetch-from");
    let fake = dir.join("asterisk-core-sounds-en-wav_1.6.1-1_all.deb");
    std::fs::write(&fake, b"!<arch>\nnot really a package").unwrap();
    let data = dir.join("data");
    fails_with(&["data", "fetch", "speech-en", "--dir", s(&data), "--from", s(&fake)], "sha256");
    assert!(!data.exists());
}

#[test]
fn a_full_disk_fails_the_checkpoint_cleanly_and_keeps_the_last_one() {
    // Step 2's config.json goes to /dev/full, whose writes fail with ENOSPC as on a full disk
    // (the weights cannot be redirected so: safetensors writes a fresh file and renames it).
    // The save reports it, leaves no step-2 folder and no temporary folder, and step 1's
    // checkpoint is untouched.
    let full = Path::new("/dev/full");
    assert!(full.exists(), "this test needs /dev/full");
    let run = temp_dir("full-disk");
    let (model, params) = tiny(1);
    let data = |step| CheckpointData { step, config: model.config(), params: &params, training: None };
    let first = checkpoint::save(&run, &data(1)).unwrap();
    let before = std::fs::read(first.join(checkpoint::MODEL_FILE)).unwrap();
    let tmp = run.join(format!(".step-00000002.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::os::unix::fs::symlink(full, tmp.join(checkpoint::CONFIG_FILE)).unwrap();

    let err = checkpoint::save(&run, &data(2)).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("No space left"), "unclear error: {err}");
    assert!(!checkpoint::dir_for(&run, 2).exists(), "a failed save left a step folder");
    assert!(!tmp.exists(), "a failed save left its temporary folder");
    assert_eq!(checkpoint::list(&run).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), vec![1]);
    assert_eq!(std::fs::read(first.join(checkpoint::MODEL_FILE)).unwrap(), before);
}
