//! Data-parallel training on the CPU: W ranks (threads of a `ThreadGroup`) train what one
//! process trains. Their batch slices make up the one-process batch, their summed gradients
//! are its gradient, a run gives the same losses and a world-size-independent checkpoint; the
//! TCP rendezvous hands out the id, refuses a mismatched rank and times out clearly; and the
//! command refuses multi-GPU options it cannot honour. (NCCL itself: tests/it/cuda.rs.)

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use megabyte::data::{ByteStream, Split, WindowSampler};
use megabyte::dist::{self, Collective, DistEnv, ThreadGroup};
use megabyte::train::{self, Trainer};
use megabyte::Device;

use crate::{random_bytes, temp_dir};

fn leak(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

fn split_of(bytes: Vec<u8>) -> Split {
    Split::all(Arc::new(ByteStream::from_static("test", leak(bytes))))
}

#[test]
fn rank_slices_of_a_global_batch_make_up_the_one_process_batch_across_resume() {
    let split = split_of(random_bytes(5000, 3));
    let (b, t) = (6, 16);
    for world in [1, 2, 3, 6] {
        let mut alone = WindowSampler::new(11);
        let mut ranks: Vec<WindowSampler> = (0..world).map(|_| WindowSampler::new(11)).collect();
        for step in 0..4 {
            if step == 2 {
                // Resume every rank from the one-process sampler's saved state.
                ranks = (0..world).map(|_| WindowSampler::restore(alone.state())).collect();
            }
            let whole = alone.batch(&split, b, t, &Device::Cpu).unwrap().to_vec2::<u32>().unwrap();
            let mut joined = Vec::new();
            for (rank, s) in ranks.iter_mut().enumerate() {
                let rows = dist::rank_rows(b, world, rank).unwrap();
                joined.extend(s.batch_rows(&split, b, t, rows, &Device::Cpu).unwrap().to_vec2::<u32>().unwrap());
                assert_eq!(s.state(), alone.state(), "a rank's sampler fell out of step");
            }
            assert_eq!(joined, whole, "world {world}, step {step}");
        }
    }
    // With documents: rows and weights likewise, and every rank counts the whole batch's bytes.
    let docs = split_of(random_bytes(3000, 4)).with_documents(&[0, 10, 700, 720, 2000]);
    let mut alone = WindowSampler::new(5);
    let mut ranks = [WindowSampler::new(5), WindowSampler::new(5)];
    for _ in 0..3 {
        let (x, w, n) = alone.document_batch(&docs, 4, 64, &Device::Cpu).unwrap();
        let (mut xs, mut ws) = (Vec::new(), Vec::new());
        for (rank, s) in ranks.iter_mut().enumerate() {
            let (xr, wr, nr) = s.document_batch_rows(&docs, 4, 64, dist::rank_rows(4, 2, rank).unwrap(), &Device::Cpu).unwrap();
            assert_eq!(nr, n, "each rank divides by the whole batch's real bytes");
            xs.extend(xr.to_vec2::<u32>().unwrap());
            ws.extend(wr.to_vec2::<f32>().unwrap());
        }
        assert_eq!(xs, x.to_vec2::<u32>().unwrap());
        assert_eq!(ws, w.to_vec2::<f32>().unwrap());
    }
    // A global batch that does not split evenly is refused, with what to do.
    let err = dist::rank_rows(6, 4, 0).unwrap_err().to_string();
    assert!(err.contains("multiple of 4"), "{err}");
}


/// Runs `f(rank trainer)` on each of `world` ranks, each in its own thread with a trainer
/// built by `make` and joined to one `ThreadGroup` (buckets of `bucket_bytes`).
fn on_ranks<R: Send + 'static>(
    world: usize,
    bucket_bytes: usize,
    make: impl Fn(usize) -> Trainer + Send + Sync + 'static,
    f: impl Fn(usize, Trainer) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let (make, f) = (Arc::new(make), Arc::new(f));
    let handles: Vec<_> = ThreadGroup::new(world, Duration::from_secs(120))
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let (make, f) = (make.clone(), f.clone());
            std::thread::spawn(move || {
                let mut trainer = make(rank);
                trainer.join(Box::new(group), bucket_bytes).unwrap();
                f(rank, trainer)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank's thread panicked")).collect()
}

fn by_name(trainer: &Trainer, grads: &megabyte::grad::Grads) -> BTreeMap<String, Vec<f32>> {
    trainer
        .params()
        .vars()
        .iter()
        .map(|(name, v)| (name.clone(), grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

pub fn weights(trainer: &Trainer) -> BTreeMap<String, Vec<f32>> {
    trainer
        .params()
        .vars()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// ‖a − b‖ relative to how far b moved from `init` (‖b − init‖): how much two trainings of
/// the same steps disagree, robust to the odd AdamW entry whose tiny gradient changes sign
/// with summation order (m/√v is ±1 there at first, whatever its size).
pub fn drift(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, init: &BTreeMap<String, Vec<f32>>) -> f64 {
    let (mut apart, mut moved) = (0f64, 0f64);
    for (name, vb) in b {
        for ((x, y), z) in a[name].iter().zip(vb).zip(&init[name]) {
            apart += f64::from(x - y).powi(2);
            moved += f64::from(y - z).powi(2);
        }
    }
    (apart / moved.max(1e-30)).sqrt()
}

/// Largest |a − b| over all entries, relative to the largest |b|.
fn rel_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    let (mut diff, mut scale) = (0f32, 0f32);
    for (name, vb) in b {
        let va = &a[name];
        assert_eq!(va.len(), vb.len(), "{name}");
        for (x, y) in va.iter().zip(vb) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    diff / scale.max(1e-30)
}

#[test]
fn summed_rank_gradients_equal_the_global_batch_gradient() {
    let docs = split_of(random_bytes(60_000, 9)).with_documents(&[0, 500, 530, 9000, 9300, 40_000]);
    let plain = split_of(random_bytes(60_000, 8));
    // Dropout draws the whole batch's masks on every rank (keyed by each row's place in it).
    for (accum, split, dropout) in [(1, plain.clone(), 0.0), (2, plain.clone(), 0.0), (2, docs.clone(), 0.0), (2, plain, 0.2), (1, docs, 0.2)] {
        let (mcfg, mut tc, spec) = crate::tiny_run(1, 4, 3);
        tc.grad_accum = accum;
        tc.dropout = dropout;
        let mut alone = Trainer::new(&mcfg, tc.clone(), spec.clone(), &Device::Cpu).unwrap();
        let (g, loss) = alone.local_gradients(&split).unwrap();
        let (whole, whole_loss) = (by_name(&alone, &g), loss.to_scalar::<f64>().unwrap());
        if dropout > 0.0 {
            // The trainer does drop: the same step without dropout has another loss.
            let mut undropped = tc.clone();
            undropped.dropout = 0.0;
            let (_, plain_loss) = Trainer::new(&mcfg, undropped, spec.clone(), &Device::Cpu).unwrap().local_gradients(&split).unwrap();
            assert!((plain_loss.to_scalar::<f64>().unwrap() - whole_loss).abs() > 1e-4, "dropout {dropout} changed nothing");
        }
        let shares = on_ranks(
            2,
            dist::BUCKET_BYTES,
            move |_| Trainer::new(&mcfg, tc.clone(), spec.clone(), &Device::Cpu).unwrap(),
            move |_, mut t| {
                let (g, loss) = t.local_gradients(&split).unwrap();
                (by_name(&t, &g), loss.to_scalar::<f64>().unwrap())
            },
        );
        let mut sum = shares[0].0.clone();
        for (name, v) in &mut sum {
            for (x, y) in v.iter_mut().zip(&shares[1].0[name]) {
                *x += y;
            }
        }
        let err = rel_diff(&sum, &whole);
        assert!(err < 1e-5, "grad_accum {accum}, dropout {dropout}: summed rank gradients differ by {err} (relative)");
        let loss_err = (shares[0].1 + shares[1].1 - whole_loss).abs();
        assert!(loss_err < 1e-6, "grad_accum {accum}, dropout {dropout}: summed losses differ by {loss_err}");
        // Each rank's share is a real part, not the whole.
        assert!(rel_diff(&shares[0].0, &whole) > 1e-2);
    }
}

#[test]
fn joining_a_group_gives_every_rank_rank_0s_weights() {
    let (mcfg, tc, spec) = crate::tiny_run(1, 3, 3);
    // Rank 1 starts from other weights (seed 99); 4 KB buckets: the model spans many.
    let got = on_ranks(
        3,
        4096,
        move |rank| {
            let mut tc = tc.clone();
            tc.seed = if rank == 1 { 99 } else { 5 };
            Trainer::new(&mcfg, tc, spec.clone(), &Device::Cpu).unwrap()
        },
        |_, t| weights(&t),
    );
    let (mcfg, tc, spec) = crate::tiny_run(1, 3, 3);
    let rank0 = weights(&Trainer::new(&mcfg, tc, spec, &Device::Cpu).unwrap());
    for w in &got {
        assert!(*w == rank0, "a rank's weights are not rank 0's after joining");
    }
}

fn losses(run_dir: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn two_ranks_train_as_one_process_and_resume_on_any_number() {
    let (n, more) = (4, 6);
    let base = temp_dir("dist-run");
    let (single, pair) = (base.join("single"), base.join("pair"));
    let run_alone = |dir: &std::path::Path, trainer: &mut Trainer| {
        train::prepare_run_dir(dir, trainer.step() > 0).unwrap();
        let data = trainer.record().data.open().unwrap();
        train::run(trainer, &data, dir, &AtomicBool::new(false), &mut |_| {}).unwrap()
    };
    // One process, n steps.
    let (mcfg, tc, spec) = crate::tiny_run(n, 4, 3);
    let mut alone = Trainer::new(&mcfg, tc.clone(), spec.clone(), &Device::Cpu).unwrap();
    let summary = run_alone(&single, &mut alone);
    // Two ranks, n steps, into one run folder (rank 0 writes it, 16 KB buckets).
    train::prepare_run_dir(&pair, false).unwrap();
    let pair_dir = pair.clone();
    let out = on_ranks(
        2,
        16 << 10,
        move |_| Trainer::new(&mcfg, tc.clone(), spec.clone(), &Device::Cpu).unwrap(),
        move |_, mut t| {
            let data = t.record().data.open().unwrap();
            let s = train::run(&mut t, &data, &pair_dir, &AtomicBool::new(false), &mut |_| {}).unwrap();
            t.leave().unwrap();
            (s.steps, s.final_valid_bpb, s.checkpoint, weights(&t), t.record().sampler)
        },
    );
    for (steps, bpb, checkpoint, w, sampler) in &out {
        assert_eq!(*steps, n);
        assert_eq!(*checkpoint, pair.join(format!("step-{n:08}")), "every rank reports rank 0's checkpoint");
        assert_eq!(*bpb, out[0].1, "every rank reports rank 0's validation");
        assert!(*w == out[0].3, "the ranks' parameters differ");
        assert_eq!(*sampler, alone.record().sampler, "the data stream is not the one-process stream");
    }
    assert!((out[0].1 - summary.final_valid_bpb).abs() < 1e-3, "{} vs {}", out[0].1, summary.final_valid_bpb);
    let (mcfg, tc, spec) = crate::tiny_run(n, 4, 3);
    let init = weights(&Trainer::new(&mcfg, tc, spec, &Device::Cpu).unwrap());
    let apart = drift(&out[0].3, &weights(&alone), &init);
    assert!(apart < 1e-2, "two-rank weights differ from one process's by {apart} of the distance trained");
    // Rank 0 alone wrote the folder: the same records as one process, the same losses.
    let (a, b) = (losses(&single), losses(&pair));
    assert_eq!(a.len(), b.len());
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() < 1e-5, "step {sa}: loss {la} alone, {lb} on two ranks");
    }
    assert_eq!(
        std::fs::read_to_string(single.join("metrics.jsonl")).unwrap().lines().count(),
        std::fs::read_to_string(pair.join("metrics.jsonl")).unwrap().lines().count()
    );
    // The two-rank checkpoint resumes in one process, and the one-process checkpoint on two
    // ranks: both continue the same data stream with the same losses.
    let recorded = |dir: &std::path::Path| {
        let text = std::fs::read_to_string(dir.join(megabyte::checkpoint::TRAIN_FILE)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["world_size"].as_u64().unwrap()
    };
    assert_eq!(recorded(&pair.join(format!("step-{n:08}"))), 2);
    let mut from_pair = Trainer::resume(&pair, Some((Some(more), None)), &Device::Cpu).unwrap();
    run_alone(&pair, &mut from_pair);
    assert_eq!(recorded(&pair.join(format!("step-{more:08}"))), 1, "a one-process continuation records one rank");
    let single_dir = single.clone();
    let resumed = on_ranks(
        2,
        dist::BUCKET_BYTES,
        move |_| Trainer::resume(&single_dir, Some((Some(more), None)), &Device::Cpu).unwrap(),
        {
            let single = single.clone();
            move |_, mut t| {
                let data = t.record().data.open().unwrap();
                train::run(&mut t, &data, &single, &AtomicBool::new(false), &mut |_| {}).unwrap();
                t.leave().unwrap();
                (t.record().sampler, t.record().world_size)
            }
        },
    );
    assert_eq!(resumed[0].0, from_pair.record().sampler);
    assert_eq!(resumed[0].1, 2);
    let (a, b) = (losses(&single), losses(&pair));
    assert_eq!(a.len(), b.len());
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() < 1e-4, "step {sa}: loss {la} vs {lb} after resuming on another number of ranks");
    }
    assert_eq!(a.last().unwrap().0, more);
}

#[test]
fn a_rank_that_stops_fails_the_others_instead_of_hanging() {
    let mut groups = ThreadGroup::new(2, Duration::from_millis(300));
    let mut rank0 = groups.remove(0);
    drop(groups); // rank 1 never arrives
    let started = Instant::now();
    let err = rank0.all_reduce_sum(vec![megabyte::Tensor::ones(3, megabyte::DType::F32, &Device::Cpu).unwrap()]).unwrap_err();
    assert!(err.to_string().contains("waited"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// The TCP rendezvous.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv { rank, world_size: world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

/// Rank `rank` of `world` running `exchange_id` in a thread, after `delay_ms`.
fn rank_thread(
    rank: usize,
    world: usize,
    port: u16,
    fp: [u8; 32],
    timeout: Duration,
    delay_ms: u64,
) -> std::thread::JoinHandle<megabyte::Result<[u8; 128]>> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(delay_ms));
        dist::exchange_id(&env(rank, world, port), &fp, || Ok([rank as u8 + 42; 128]), timeout)
    })
}

#[test]
fn the_rendezvous_hands_rank_0s_id_to_every_rank() {
    let fp = dist::fingerprint(&("same", 1)).unwrap();
    // Rank 0 starts last: the others retry until it listens.
    let port = free_port();
    let others: Vec<_> = (1..4).map(|r| rank_thread(r, 4, port, fp, Duration::from_secs(20), 0)).collect();
    let zero = rank_thread(0, 4, port, fp, Duration::from_secs(20), 500);
    assert_eq!(zero.join().unwrap().unwrap(), [42; 128]);
    for h in others {
        assert_eq!(h.join().unwrap().unwrap(), [42; 128], "rank 0's id");
    }
    // One rank is a world of its own.
    assert_eq!(rank_thread(0, 1, free_port(), fp, Duration::from_secs(5), 0).join().unwrap().unwrap(), [42; 128]);
}

#[test]
fn the_rendezvous_refuses_a_rank_with_another_configuration() {
    let fp = dist::fingerprint(&("model", "train")).unwrap();
    let other = dist::fingerprint(&("model", "other train")).unwrap();
    let port = free_port();
    let t = Duration::from_secs(20);
    // Ranks 0 and 1 meet first; then rank 2 arrives with another configuration.
    let (zero, one) = (rank_thread(0, 3, port, fp, t, 0), rank_thread(1, 3, port, fp, t, 100));
    let two = rank_thread(2, 3, port, other, t, 800);
    let started = Instant::now();
    let msg = |h: std::thread::JoinHandle<megabyte::Result<[u8; 128]>>| h.join().unwrap().unwrap_err().to_string();
    let (zero, one, two) = (msg(zero), msg(one), msg(two));
    assert!(zero.contains("rank 2 runs another configuration") && zero.contains("same model"), "{zero}");
    assert!(two.contains("rank 2: rank 0 refused") && two.contains("another configuration"), "{two}");
    assert!(one.contains("rank 1: rank 0 refused") && one.contains("rank 2 runs another configuration"), "{one}");
    assert!(started.elapsed() < Duration::from_secs(5), "a refusal is immediate");
}

#[test]
fn a_missing_rank_0_or_rank_is_a_clear_error_within_the_deadline() {
    let fp = [3u8; 32];
    let started = Instant::now();
    let err = rank_thread(1, 2, free_port(), fp, Duration::from_secs(2), 0).join().unwrap().unwrap_err().to_string();
    let secs = started.elapsed().as_secs_f64();
    assert!(err.contains("no rank 0 answered at 127.0.0.1:") && err.contains("MASTER_ADDR"), "{err}");
    assert!((1.9..6.0).contains(&secs), "gave up after {secs} s");

    // World 3 without rank 2: rank 0 gives up after its 2 s and tells rank 1 why.
    let port = free_port();
    let started = Instant::now();
    let (zero, one) = (rank_thread(0, 3, port, fp, Duration::from_secs(2), 0), rank_thread(1, 3, port, fp, Duration::from_secs(20), 0));
    let zero = zero.join().unwrap().unwrap_err().to_string();
    let one = one.join().unwrap().unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(zero.contains("rank(s) [2] of 3 did not join"), "{zero}");
    assert!(one.contains("rank 0 refused") && one.contains("[2] of 3 did not join"), "{one}");
}

// ---------------------------------------------------------------------------------------------
// The command.

fn megabyte_train(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte"));
    cmd.arg("train").args(args);
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_command_refuses_multi_gpu_options_it_cannot_honour() {
    let dir = temp_dir("dist-cli");
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    let (ok, err) = megabyte_train(&["--devices", "0,1", "--device", "cpu", "--steps", "1", "--out", out], &[]);
    assert!(!ok && err.contains("drop --device cpu"), "{err}");
    let (ok, err) = megabyte_train(&["--devices", "0,1", "--device", "cuda:1", "--steps", "1", "--out", out], &[]);
    assert!(!ok && err.contains("--devices chooses the GPUs"), "{err}");
    let world = [("WORLD_SIZE", "2"), ("RANK", "1")];
    let (ok, err) = megabyte_train(&["--device", "cpu", "--steps", "1", "--out", out], &world);
    assert!(!ok && err.contains("rank 1 of 2") && err.contains("use --device cuda"), "{err}");
    let (ok, err) = megabyte_train(&["--steps", "1", "--out", out], &[("WORLD_SIZE", "2")]);
    assert!(!ok && err.contains("RANK is not"), "{err}");
    #[cfg(not(feature = "cuda"))]
    {
        let (ok, err) = megabyte_train(&["--devices", "0,1", "--steps", "1", "--out", out], &[]);
        assert!(!ok && err.contains("--features cuda"), "{err}");
        let (ok, err) = megabyte_train(&["--steps", "1", "--out", out], &world);
        assert!(!ok && err.contains("--features cuda"), "{err}");
    }
    assert!(!dir.join("run").exists(), "a refused run creates no folder");
}
