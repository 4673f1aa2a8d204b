//! Files and folders named by the user: a folder walk that stays inside its folder and ends,
//! files read whole that must be regular and bounded, a data file that shrinks during a run,
//! and a fetch interrupted part way. Each case gives a clear error and leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use megabyte::checkpoint::{self, CheckpointData};
use megabyte::train::{self, DataSpec, Trainer};
use megabyte::Device;

use crate::{random_bytes, temp_dir, tiny};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the command with no stdin, killing it after `secs` (a hang fails the test rather than
/// hanging it); returns (success, stderr).
fn megabyte_within(secs: u64, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("`megabyte {}` still ran after {secs} s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, stderr) = megabyte_within(60, args);
    assert!(!ok, "`megabyte {}` should fail", args.join(" "));
    for needle in needles {
        assert!(stderr.contains(needle), "`megabyte {}`: expected `{needle}` in:\n{stderr}", args.join(" "));
    }
}

/// A saved tiny checkpoint in its own folder.
fn saved_checkpoint(dir: &Path) -> PathBuf {
    let (model, params) = tiny(1);
    checkpoint::save(dir, &CheckpointData { step: 1, config: model.config(), params: &params, training: None }).unwrap()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_symlink_loop_or_a_link_out_of_a_data_folder_is_refused() {
    let dir = temp_dir("files-loop");
    let ckpt = saved_checkpoint(&dir.join("ckpt"));
    let out = dir.join("run");
    // A folder whose subfolder links back to it: the walk went round until memory ran out.
    let data = dir.join("loop");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("a.txt"), random_bytes(20_000, 1)).unwrap();
    std::os::unix::fs::symlink("..", data.join("sub/up")).unwrap();
    let needles = ["sub/up", "symbolic link loop"];
    fails_with(&["train", "--data", s(&data), "--out", s(&out), "--steps", "1"], &needles);
    fails_with(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)], &needles);
    // A link to a file outside the folder is refused, naming the link.
    std::fs::remove_file(data.join("sub/up")).unwrap();
    std::fs::write(dir.join("outside.txt"), random_bytes(20_000, 2)).unwrap();
    std::os::unix::fs::symlink(dir.join("outside.txt"), data.join("sub/out.txt")).unwrap();
    fails_with(&["train", "--data", s(&data), "--out", s(&out), "--steps", "1"], &["sub/out.txt", "outside the folder"]);
    // So is a link to a folder outside.
    std::fs::remove_file(data.join("sub/out.txt")).unwrap();
    std::os::unix::fs::symlink(dir.join("ckpt"), data.join("sub/elsewhere")).unwrap();
    fails_with(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)], &["sub/elsewhere", "outside the folder"]);
    assert!(!out.exists(), "a refused run must not create its output folder");
}

#[test]
fn fifos_devices_and_oversized_files_are_refused() {
    let dir = temp_dir("files-special");
    let ckpt = saved_checkpoint(&dir.join("ckpt"));
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let out = dir.join("run");
    // Each of these blocked for ever on the FIFO, or read /dev/zero until memory ran out.
    fails_with(&["train", "--data", s(&fifo), "--out", s(&out), "--steps", "1"], &["FIFO"]);
    fails_with(&["eval", "--checkpoint", s(&ckpt), "--data", s(&fifo)], &["FIFO"]);
    fails_with(&["info", "--config", s(&fifo)], &["FIFO", "model config"]);
    let generate = ["generate", "--checkpoint", s(&ckpt), "-n", "4", "--prompt-file"];
    fails_with(&[&generate[..], &[s(&fifo)]].concat(), &["FIFO", "prompt file"]);
    fails_with(&[&generate[..], &["/dev/zero"]].concat(), &["device", "prompt file"]);
    // A regular file too large for what it claims to be is refused before it is read.
    let huge = dir.join("huge.txt");
    std::fs::File::create(&huge).unwrap().set_len(17 << 20).unwrap(); // sparse
    fails_with(&[&generate[..], &[s(&huge)]].concat(), &["more than", "prompt file"]);
    fails_with(&["info", "--config", s(&huge)], &["more than", "model config"]);
    assert!(!out.exists(), "a refused run must not create its output folder");
}

#[test]
fn a_data_file_truncated_during_training_is_an_error_and_the_last_step_is_saved() {
    let dir = temp_dir("files-truncated");
    let data = dir.join("data.bin");
    // Above the size read into memory: this file is read in place, where the old memory map
    // died with SIGBUS once the file shrank.
    let len = megabyte::data::MAP_MIN_BYTES as usize * 2;
    std::fs::write(&data, random_bytes(len, 3)).unwrap();
    let (mcfg, tc, _) = crate::tiny_run(10, 2, 1000);
    let spec = DataSpec { train: Some(data.clone()), valid: None, holdout_bytes: 10_000, documents: false };
    let run_dir = dir.join("run");
    train::prepare_run_dir(&run_dir, false).unwrap();
    let mut trainer = Trainer::new(&mcfg, tc, spec.clone(), &Device::Cpu).unwrap();
    let err = train::run(&mut trainer, &spec.open().unwrap(), &run_dir, &AtomicBool::new(false), &mut |e| {
        if let train::Event::Step(stats) = e {
            if stats.step == 2 {
                std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(0).unwrap();
            }
        }
    })
    .expect_err("training on a truncated file must fail");
    let msg = err.to_string();
    assert!(matches!(err, megabyte::Error::Data { .. }), "a data error, got: {msg}");
    for needle in [s(&data), &format!("had {len} bytes when opened and has 0 bytes now"), "must not change during a run"] {
        assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
    }
    // Step 2, the last completed, was saved and resumes.
    let saved = checkpoint::dir_for(&run_dir, 2);
    assert!(msg.contains(&format!("step 2, the last completed, was saved to {}", saved.display())), "{msg}");
    // (with the data as it was: a resume checks the data's identity)
    std::fs::write(&data, random_bytes(len, 3)).unwrap();
    let resumed = Trainer::resume(&saved, None, &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), 2);
    assert!(crate::dist::weights(&resumed) == crate::dist::weights(&trainer), "the saved weights are step 2's");
}

#[test]
fn data_code_refuses_links_out_of_the_folder() {
    let dir = temp_dir("files-code");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(dir.join("secret.rs"), "// not part of the folder\n").unwrap();
    // A file link out of the folder: its target ended up in the training bytes.
    std::os::unix::fs::symlink(dir.join("secret.rs"), src.join("lib/passwd.rs")).unwrap();
    let out = dir.join("code.bin");
    fails_with(&["data", "code", s(&src), s(&out)], &["lib/passwd.rs", "outside the folder"]);
    assert!(!out.exists(), "nothing is written");
    // A folder link out of it likewise.
    std::fs::remove_file(src.join("lib/passwd.rs")).unwrap();
    std::fs::create_dir_all(dir.join("other")).unwrap();
    std::os::unix::fs::symlink(dir.join("other"), src.join("lib/other")).unwrap();
    fails_with(&["data", "code", s(&src), s(&out)], &["lib/other", "outside the folder"]);
    // Links inside the folder are followed.
    std::fs::remove_file(src.join("lib/other")).unwrap();
    std::os::unix::fs::symlink(src.join("main.rs"), src.join("lib/again.rs")).unwrap();
    let (ok, stderr) = megabyte_within(60, &["data", "code", s(&src), s(&out)]);
    assert!(ok, "links inside the folder are read: {stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"\0fn main() {}\n\0fn main() {}\n");
}

/// The fetch's temporary files and folders under `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".megabyte-fetch.") {
            found.push(name);
        }
        if entry.path().is_dir() {
            found.extend(temporaries(&entry.path()));
        }
    }
    found
}

/// Starts `data fetch enwik8 --from FIFO`, feeds the FIFO until the split's temporary files
/// hold bytes, sends SIGINT and, with `keep_feeding`, goes on feeding (the fetch sees the
/// interruption at its next read) or else stalls (the fetch is stuck in a read). Returns the
/// exit status and stderr, and checks nothing temporary is left.
fn interrupt_fetch(tag: &str, keep_feeding: bool) -> (std::process::ExitStatus, String) {
    let dir = temp_dir(tag);
    let fifo = dir.join("enwik8");
    mkfifo(&fifo);
    let dest = dir.join("data");
    let child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(["data", "fetch", "enwik8", "--dir", s(&dest), "--from", s(&fifo)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The fetch opens the source twice (4 bytes to tell its packing, then the stream): a
    // write that finds the reader gone opens the FIFO again.
    let open = || std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut w = open();
    let chunk = vec![b'x'; 1 << 16];
    let start = Instant::now();
    let part_bytes = |dest: &Path| -> u64 {
        temporaries(&dest.join("enwik8")).iter().map(|n| std::fs::metadata(dest.join("enwik8").join(n)).map_or(0, |m| m.len())).sum()
    };
    let mut opens = 1;
    while part_bytes(&dest) < 1 << 20 {
        assert!(start.elapsed() < Duration::from_secs(60), "the fetch wrote no temporary bytes");
        if w.write_all(&chunk).is_err() {
            opens += 1;
            assert!(opens <= 3, "the fetch keeps closing its source");
            w = open();
        }
    }
    assert!(Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap().success());
    let feeder = std::thread::spawn(move || {
        if keep_feeding {
            while w.write_all(&chunk).is_ok() {} // until the fetch closes its end
        } else {
            std::thread::sleep(Duration::from_secs(30)); // a stalled source
        }
    });
    let mut child = child;
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "the fetch did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    if keep_feeding {
        feeder.join().unwrap();
    }
    let left = temporaries(&dest);
    assert!(left.is_empty(), "an interrupted fetch left {left:?}");
    assert!(!dest.join("enwik8/train.bin").exists(), "an interrupted fetch wrote no split");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_interrupted_fetch_removes_its_temporary_files() {
    let (status, stderr) = interrupt_fetch("files-fetch-int", true);
    assert!(!status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    // Stuck in a read of a stalled source, it still removes them before it exits.
    let (status, stderr) = interrupt_fetch("files-fetch-stall", false);
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted; its temporary files were removed"), "{stderr}");
}
