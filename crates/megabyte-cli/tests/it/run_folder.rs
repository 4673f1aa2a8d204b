//! One run per folder: a second process is refused by the folder's lock, a re-saved step
//! survives a crash at any point, a folder that is not a resumable run is never reused, and a
//! run does not resume on other data than it was trained on.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use megabyte::checkpoint;
use megabyte::train;

use crate::{megabyte, random_bytes, temp_dir};

/// A short `tiny` run's flags on the embedded corpus (add --out, --steps or --time).
const TINY: [&str; 8] = ["--preset", "tiny", "--eval-bytes", "2048", "--sample-bytes", "0", "--eval-every", "1000"];

fn train(run: &Path, more: &[&str]) -> (bool, String) {
    let mut args = vec!["train"];
    args.extend(TINY);
    args.extend(["--out", s(run)]);
    args.extend(more);
    megabyte(&args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` (hidden ones too) with its bytes, in path order.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.push((p.clone(), Vec::new()));
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn steps(run: &Path) -> Vec<u64> {
    checkpoint::list(run).unwrap().iter().map(|c| c.0).collect()
}

/// A `megabyte train` into `run` that goes on for minutes, once it has saved a checkpoint.
fn running_train(run: &Path) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .arg("train")
        .args(TINY)
        .args(["--time", "5", "--checkpoint-every", "2", "--out", s(run)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("saved") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the first run ended before saving");
    }
    (child, stderr)
}

#[test]
fn a_second_train_on_a_run_folder_in_use_is_refused_and_touches_nothing() {
    let run = temp_dir("locked").join("run");
    let (mut first, _stderr) = running_train(&run);
    let holder = format!("in use by another megabyte process (pid {})", first.id());
    // A second new run, and a resume, while the first is training.
    let (ok, err) = train(&run, &["--steps", "200", "--seed", "2"]);
    assert!(!ok && err.contains(&holder), "{err}");
    let (ok, err) = megabyte(&["train", "--resume", s(&run), "--steps", "200"]);
    assert!(!ok && err.contains(&holder), "{err}");
    // kill -9 leaves the lock file, whose lock the system has released: the run resumes.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(run.join(train::LOCK_FILE).is_file());
    let last = *steps(&run).last().unwrap();
    let (ok, err) = megabyte(&["train", "--resume", s(&run), "--steps", &(last + 1).to_string()]);
    assert!(ok, "{err}");
    assert_eq!(steps(&run).last(), Some(&(last + 1)));
}

#[test]
fn a_process_refused_by_the_lock_writes_and_deletes_nothing() {
    // The lock held here (this test's pid), over a finished run with a temporary folder of a
    // save in progress: the refused processes leave every file as it was.
    let run = temp_dir("locked-still").join("run");
    let (ok, err) = train(&run, &["--steps", "2"]);
    assert!(ok, "{err}");
    let mut lock = train::prepare_run_dir(&run, true).unwrap();
    lock.claim().unwrap();
    let saving = run.join(".step-00000004.tmp-4242");
    std::fs::create_dir(&saving).unwrap();
    std::fs::write(saving.join(checkpoint::CONFIG_FILE), b"{}").unwrap();
    let before = snapshot(&run);
    let holder = format!("(pid {})", std::process::id());
    for args in [&["train", "--resume", s(&run), "--steps", "4"][..], &["train", "--preset", "tiny", "--steps", "4", "--out", s(&run)]] {
        let (ok, err) = megabyte(args);
        assert!(!ok && err.contains(&holder), "{err}");
        assert!(snapshot(&run) == before, "`megabyte {}` changed the run folder", args.join(" "));
    }
    drop(lock);
    let (ok, err) = megabyte(&["train", "--resume", s(&run), "--steps", "3"]);
    assert!(ok, "{err}");
    assert!(!saving.exists(), "an unlocked start-up removes the stale temporary folder");
}

/// A finished 2-step run in `run`, its checkpoint step-00000002.
fn two_step_run(run: &Path) -> PathBuf {
    let (ok, err) = train(run, &["--steps", "2"]);
    assert!(ok, "{err}");
    assert_eq!(steps(run), vec![2]);
    checkpoint::dir_for(run, 2)
}

#[test]
fn re_saving_a_step_leaves_a_complete_checkpoint_at_every_point() {
    // Resuming with --steps equal to the run's step saves that step again: the new folder
    // takes the old one's place, with nothing left beside it.
    let run = temp_dir("resave").join("run");
    let step2 = two_step_run(&run);
    let (ok, err) = megabyte(&["train", "--resume", s(&run), "--steps", "2"]);
    assert!(ok, "{err}");
    let names: Vec<String> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.starts_with(".step-")), "a re-save left {names:?}");

    // The states a kill can leave while replacing step 2, as the save would leave them.
    let aside = run.join(".step-00000002.old-4242"); // the old one moved aside ...
    let partial = run.join(".step-00000002.tmp-4242"); // ... and the new one half-written
    let swapped = run.join(".step-00000002.tmp-4243"); // the old one after an atomic swap
    let copy = |to: &Path| {
        std::fs::create_dir(to).unwrap();
        for f in std::fs::read_dir(&step2).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    let states: [(&str, &dyn Fn()); 3] = [
        ("killed after moving the old copy aside", &|| std::fs::rename(&step2, &aside).unwrap()),
        ("killed while writing the new one, the old aside", &|| {
            std::fs::rename(&step2, &aside).unwrap();
            std::fs::create_dir(&partial).unwrap();
            std::fs::write(partial.join(checkpoint::CONFIG_FILE), b"{\"patch").unwrap();
        }),
        ("killed after the swap, before removing the old one", &|| copy(&swapped)),
    ];
    for (what, kill) in states {
        kill();
        // eval and generate find the step; a new run refuses the folder and deletes nothing.
        assert_eq!(steps(&run), vec![2], "{what}");
        let before = snapshot(&run);
        let (ok, err) = train(&run, &["--steps", "3"]);
        assert!(!ok && err.contains("already holds a run"), "{what}: {err}");
        assert!(snapshot(&run) == before, "{what}: a refused new run changed the folder");
        // --resume restores the step and goes on.
        let (ok, err) = megabyte(&["train", "--resume", s(&run), "--steps", "2"]);
        assert!(ok, "{what}: {err}");
        assert_eq!(steps(&run), vec![2], "{what}");
        assert!(step2.join(checkpoint::TRAIN_FILE).is_file(), "{what}");
        assert!(!aside.exists() && !partial.exists() && !swapped.exists(), "{what}: leftovers");
    }
}

#[test]
fn a_folder_that_is_not_a_resumable_run_is_not_reused() {
    let dir = temp_dir("foreign");
    // Someone else's folder: refused, nothing written or deleted (not even a lock file).
    let theirs = dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("metrics.csv"), b"a,b\n").unwrap();
    std::fs::write(theirs.join(".write-test"), b"mine").unwrap();
    let before = snapshot(&theirs);
    let (ok, err) = train(&theirs, &["--steps", "1"]);
    assert!(!ok && err.contains("is not empty") && err.contains("not a megabyte run"), "{err}");
    assert!(snapshot(&theirs) == before, "a refused run changed someone else's folder");

    // A run killed before its first checkpoint: its metrics are not mixed with a new run's.
    let killed = dir.join("killed");
    std::fs::create_dir(&killed).unwrap();
    std::fs::write(killed.join(train::LOCK_FILE), b"4242\n").unwrap();
    std::fs::write(killed.join(train::METRICS_FILE), b"{\"step\":0,\"valid_bpb\":8.0}\n").unwrap();
    let before = snapshot(&killed);
    let (ok, err) = train(&killed, &["--steps", "1"]);
    assert!(!ok && err.contains("cannot be resumed") && err.contains("remove this one"), "{err}");
    assert!(snapshot(&killed) == before);
    let (ok, err) = megabyte(&["train", "--resume", s(&killed), "--steps", "1"]);
    assert!(!ok && err.contains("checkpoint"), "{err}");

    // A run folder keeps the user's own files, `.write-test` among them, through a resume.
    let run = dir.join("run");
    two_step_run(&run);
    std::fs::write(run.join(".write-test"), b"mine").unwrap();
    let (ok, err) = megabyte(&["train", "--resume", s(&run), "--steps", "3"]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(run.join(".write-test")).unwrap(), b"mine");
}

#[test]
fn generate_refuses_an_existing_out_file_without_overwrite() {
    let dir = temp_dir("generate-out");
    let run = dir.join("run");
    two_step_run(&run);
    let clip = dir.join("clip.wav");
    std::fs::write(&clip, b"my recording").unwrap();
    let args = ["generate", "--checkpoint", s(&run), "--wav", "10ms", "--out", s(&clip)];
    let (ok, err) = megabyte(&args);
    assert!(!ok && err.contains("already exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&clip).unwrap(), b"my recording");
    let (ok, err) = megabyte(&[&args[..], &["--overwrite"]].concat());
    assert!(ok, "{err}");
    assert!(std::fs::read(&clip).unwrap().starts_with(b"RIFF"));
}

#[test]
fn a_run_does_not_resume_on_other_bytes_of_the_same_length() {
    let dir = temp_dir("data-identity");
    let (data, run) = (dir.join("data.bin"), dir.join("run"));
    let original = random_bytes(20_000, 1);
    std::fs::write(&data, &original).unwrap();
    let (ok, err) = train(&run, &["--steps", "1", "--data", s(&data), "--valid-bytes", "2000"]);
    assert!(ok, "{err}");
    let resume = |steps: &str| megabyte(&["train", "--resume", s(&run), "--steps", steps]);

    std::fs::write(&data, random_bytes(20_000, 2)).unwrap();
    let (ok, err) = resume("2");
    assert!(!ok && err.contains(s(&data)) && err.contains("holds other bytes") && err.contains("of the same length"), "{err}");
    std::fs::write(&data, &original[..19_000]).unwrap();
    let (ok, err) = resume("2");
    assert!(!ok && err.contains("changed size since the run started: 20000 bytes then, 19000 now"), "{err}");
    assert_eq!(steps(&run), vec![1], "a refused resume saved nothing");

    std::fs::write(&data, &original).unwrap();
    let (ok, err) = resume("2");
    assert!(ok, "{err}");

    // A checkpoint from before the data's files were recorded still resumes.
    let record_path = checkpoint::dir_for(&run, 2).join(checkpoint::TRAIN_FILE);
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    assert_eq!(record["data_files"][0]["bytes"], 20_000);
    record.as_object_mut().unwrap().remove("data_files");
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    std::fs::write(&data, random_bytes(20_000, 3)).unwrap();
    let (ok, err) = resume("3");
    assert!(ok, "{err}");
}

#[test]
fn a_re_saved_step_holds_the_new_weights() {
    use megabyte::checkpoint::CheckpointData;
    use megabyte::{DType, Device};
    let run = temp_dir("resave-weights");
    let (a, b) = (crate::tiny(1), crate::tiny(2));
    for (model, params) in [&a, &b] {
        checkpoint::save(&run, &CheckpointData { step: 7, config: model.config(), params, training: None }).unwrap();
    }
    let (loaded, _) = checkpoint::load_model(&checkpoint::resolve(&run).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let x = crate::bytes_tensor(&[random_bytes(256, 4)]);
    assert_eq!(crate::max_abs_diff(&b.0.logits(&x).unwrap(), &loaded.logits(&x).unwrap()), 0.0);
    let names: Vec<String> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["step-00000007".to_string()]);
}
