//! Checkpoints reload to identical logits, and a resumed run equals an uninterrupted one.

use std::sync::atomic::AtomicBool;

use megabyte::checkpoint::{self, CheckpointData};
use megabyte::train::{self, Trainer};
use megabyte::{DType, Device};

use crate::{bytes_tensor, random_bytes, temp_dir, tiny};

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let dir = temp_dir("roundtrip");
    let (model, params) = tiny(9);
    let data = CheckpointData { step: 7, config: model.config(), params: &params, training: None };
    let path = checkpoint::save(&dir, &data).unwrap();
    assert_eq!(path, dir.join("step-00000007"));
    let (loaded, _) = checkpoint::load_model(&checkpoint::resolve(&dir).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let x = bytes_tensor(&[random_bytes(256, 4)]);
    assert_eq!(crate::max_abs_diff(&model.logits(&x).unwrap(), &loaded.logits(&x).unwrap()), 0.0);
    // No temporary folder is left behind.
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["step-00000007".to_string()]);
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    // With dropout too: each step's masks come back with the step count.
    for dropout in [0.0, 0.1] {
        resume_equals_uninterrupted(dropout, None);
    }
    // With Muon: its momentum buffers come back from optimizer.safetensors.
    resume_equals_uninterrupted(0.0, Some(megabyte::optim::MuonConfig::DEFAULT));
}

fn resume_equals_uninterrupted(dropout: f64, muon: Option<megabyte::optim::MuonConfig>) {
    let (n, k) = (6, 2);
    let (mcfg, mut tc, spec) = crate::tiny_run(n, 2, 1000);
    tc.dropout = dropout;
    tc.muon = muon;
    let data = spec.open().unwrap();

    let mut straight = Trainer::new(&mcfg, tc.clone(), spec.clone(), &Device::Cpu).unwrap();
    for _ in 0..n {
        straight.train_step(&data.train).unwrap();
    }

    let dir = temp_dir("resume");
    let mut first = Trainer::new(&mcfg, tc, spec, &Device::Cpu).unwrap();
    for _ in 0..k {
        first.train_step(&data.train).unwrap();
    }
    first.save(&dir).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&dir, None, &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), k);
    for _ in k..n {
        resumed.train_step(&data.train).unwrap();
    }
    assert!(crate::dist::weights(&straight) == crate::dist::weights(&resumed), "dropout {dropout}, muon {muon:?}: resumed weights differ from the uninterrupted run");
}

#[test]
fn the_training_loop_validates_checkpoints_and_logs() {
    let (mcfg, mut tc, spec) = crate::tiny_run(4, 2, 1000);
    tc.eval_every = 2;
    tc.checkpoint_every = 2;
    tc.keep_checkpoints = 1;
    let dir = temp_dir("loop");
    train::prepare_run_dir(&dir, false).unwrap();
    let mut trainer = Trainer::new(&mcfg, tc, spec.clone(), &Device::Cpu).unwrap();
    let mut evals = 0;
    let summary = train::run(&mut trainer, &spec.open().unwrap(), &dir, &AtomicBool::new(false), &mut |e| {
        if let train::Event::Eval { .. } = e {
            evals += 1
        }
    })
    .unwrap();
    assert_eq!(summary.steps, 4);
    assert_eq!(evals, 3, "start, step 2, end");
    assert_eq!(checkpoint::list(&dir).unwrap().len(), 1, "only the newest checkpoint is kept");
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4 + 3);
    // A run folder that holds a run is not overwritten by a new run.
    assert!(train::prepare_run_dir(&dir, false).is_err());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = temp_dir("ctrlc");
    let run = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(["train", "--time", "5", "--eval-every", "20", "--eval-bytes", "4096", "--sample-bytes", "0", "--dropout", "0.1", "--out"])
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (the first validation after step 0), then interrupt.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("step     20: valid bpb") {
        line.clear();
    }
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let rest: String = stderr.lines().map(|l| l.unwrap() + "\n").collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status}: {rest}");
    assert!(rest.contains("interrupted at step"), "{rest}");
    let saved = checkpoint::list(&run).unwrap();
    assert_eq!(saved.len(), 1);
    let (step, path) = &saved[0];
    assert!(*step >= 20);
    // The interrupted run resumes, with its recorded settings (--dropout among them).
    let resumed = Trainer::resume(path, Some((Some(step + 1), None)), &Device::Cpu).unwrap();
    assert_eq!(resumed.record().train.dropout, 0.1);
}

#[test]
fn reported_loss_is_the_batch_mean_with_accumulation() {
    // An untrained model scores about ln 256 = 5.545 nats per byte, however the step is split.
    for accum in [1, 3] {
        let (mcfg, mut tc, spec) = crate::tiny_run(1, 2, 1000);
        tc.grad_accum = accum;
        let data = spec.open().unwrap();
        let mut trainer = Trainer::new(&mcfg, tc, spec, &Device::Cpu).unwrap();
        let stats = trainer.train_step(&data.train).unwrap();
        assert!((stats.loss - 256f64.ln()).abs() < 0.1, "grad_accum {accum}: loss {}", stats.loss);
    }
}

#[test]
fn resuming_with_the_command_that_started_the_run_continues_it() {
    // People rerun the line that started a run with --resume added: its settings are the
    // run's, so it resumes (only --steps changes). Here the line names a recipe, whose
    // settings are the run's too, and flags that replace some of them.
    let dir = temp_dir("resume-agrees");
    let (run, tiny) = (dir.join("run"), dir.join("tiny.json"));
    std::fs::write(&tiny, serde_json::to_vec(&megabyte::ModelConfig::preset("tiny").unwrap()).unwrap()).unwrap();
    let line = |steps: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte"));
        cmd.args(["train", "--preset", "enwik8-10min", "--config"]).arg(&tiny);
        cmd.args(["--batch-size", "2", "--eval-bytes", "2048", "--seed", "4", "--precision", "f32", "--steps", steps, "--out"]).arg(&run);
        cmd
    };
    let out = line("2").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = line("3").arg("--resume").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("after 3 steps"), "{stdout}");
    assert!(!stdout.contains("sample"), "a recipe samples nothing at the end: {stdout}");
    assert_eq!(checkpoint::list(&run).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 3]);
    // The recipe's settings, with the flags given in place of some.
    let t = Trainer::resume(&run, None, &Device::Cpu).unwrap().record().train.clone();
    assert_eq!((t.batch_size, t.seed, t.steps, t.eval_bytes), (2, 4, Some(3), 2048));
    assert_eq!((t.lr, t.warmup_steps, t.dropout, t.time_minutes), (2e-3, 200, 0.1, Some(8.5)));
    assert_eq!((t.eval_every, t.checkpoint_every), (1000, 100_000));
}
