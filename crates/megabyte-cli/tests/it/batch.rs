//! Continuous batching (`generate::Batch`): sequences joining and leaving at any step, each
//! with its own prompt, rule and seed, get exactly the bytes they would get alone; and a
//! prompt longer than the context decodes as if it had been fed byte by byte.

use megabyte::generate::{generate_stepwise, Batch, Decoder, Sampler, Sampling, SeqId};
use megabyte::ops::{attention, reference};
use megabyte::{DType, Device, MegaByte, ModelConfig, NormKind, Tensor};

use crate::{cross_patch_config, random_bytes, small_config};

/// One sequence of a schedule: joins before step `join`, leaves before step `leave` (or runs
/// to the end).
struct Req {
    prompt: Vec<u8>,
    rule: Sampling,
    seed: u64,
    join: usize,
    leave: Option<usize>,
}

/// The bytes `req` gets alone: `generate_stepwise` with its prompt and sampler.
fn alone(model: &MegaByte, req: &Req, n: usize) -> Vec<u8> {
    let mut sampler = Sampler::new(req.rule, req.seed).unwrap();
    generate_stepwise(model, std::slice::from_ref(&req.prompt), n, &mut sampler, &Device::Cpu, &mut |_| {}).unwrap().remove(0)
}

/// Runs the schedule for `steps` steps and checks every sequence's bytes against its lone
/// decoding, that `step` answers in insertion order, that a sequence waits fewer than P steps
/// for its first byte, and that `len` counts the sequences held.
fn check_schedule(model: &MegaByte, reqs: &[Req], steps: usize) {
    let p = model.config().patch_size;
    let mut batch = Batch::new(model, &Device::Cpu);
    let mut ids: Vec<Option<SeqId>> = vec![None; reqs.len()];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); reqs.len()];
    let mut held = 0;
    for step in 0..steps {
        for (i, r) in reqs.iter().enumerate() {
            if r.leave == Some(step) {
                assert!(batch.remove(ids[i].unwrap()), "request {i} is not held");
                assert!(!batch.remove(ids[i].unwrap()), "request {i} removed twice");
                held -= 1;
            }
            if r.join == step {
                ids[i] = Some(batch.insert(&r.prompt, Sampler::new(r.rule, r.seed).unwrap()).unwrap());
                held += 1;
            }
        }
        assert_eq!(batch.len(), held);
        assert_eq!(batch.is_empty(), held == 0);
        let out = batch.step().unwrap();
        assert!(out.windows(2).all(|w| w[0].0 .0 < w[1].0 .0), "step {step}: not in insertion order: {out:?}");
        for (id, b) in out {
            let i = ids.iter().position(|x| *x == Some(id)).expect("a known id");
            assert!(r_live(&reqs[i], step), "step {step}: request {i} produced a byte after leaving");
            got[i].push(b);
        }
    }
    for (i, r) in reqs.iter().enumerate() {
        let lived = r.leave.unwrap_or(steps) - r.join;
        assert!(got[i].len() + p > lived, "request {i}: {} bytes in {lived} steps (P = {p})", got[i].len());
        assert_eq!(got[i], alone(model, r, got[i].len()), "request {i} (prompt {} bytes, {:?}) differs from its lone decoding", r.prompt.len(), r.rule);
    }
}

fn r_live(r: &Req, step: usize) -> bool {
    step >= r.join && r.leave.is_none_or(|l| step < l)
}

/// Sequences of every kind: empty, mid-patch and patch-aligned prompts, prompts longer than
/// the context, greedy and sampled rules with different seeds, joining and leaving at
/// different steps, running long enough to slide their windows several times (T = 32).
fn mixed_requests(t: usize) -> Vec<Req> {
    let temp = |temperature| Sampling::Temperature { temperature };
    let req = |len: usize, rule, seed, join, leave| Req { prompt: random_bytes(len, 100 + seed), rule, seed, join, leave };
    vec![
        req(0, temp(1.0), 1, 0, None),
        req(5, Sampling::TopK { k: 5, temperature: 0.9 }, 2, 0, Some(70)),
        req(3, Sampling::Greedy, 3, 2, None),
        req(t + 9, temp(1.3), 4, 3, None),
        req(8, Sampling::TopP { p: 0.9, temperature: 1.0 }, 5, 7, Some(40)),
        req(3 * t + 2, temp(1.0), 6, 11, None),
        req(0, temp(1.0), 7, 30, Some(95)),
        req(t - 1, temp(0.8), 8, 41, None),
        req(t, temp(1.0), 9, 41, None),
        req(1, temp(1.0), 10, 90, None),
    ]
}

fn f64_model(cfg: &ModelConfig, seed: u64) -> MegaByte {
    MegaByte::init(cfg, seed, DType::F64, &Device::Cpu).unwrap().0
}

#[test]
fn batched_sequences_decode_as_they_would_alone() {
    let cfg = small_config(NormKind::LayerNorm, true);
    check_schedule(&f64_model(&cfg, 21), &mixed_requests(cfg.context), 150);
}

#[test]
fn batched_sequences_decode_as_alone_with_sliding_windows() {
    let mut cfg = small_config(NormKind::RmsNorm, false);
    cfg.global.window = Some(3);
    cfg.local.window = Some(2);
    check_schedule(&f64_model(&cfg, 22), &mixed_requests(cfg.context), 150);
}

#[test]
fn batched_sequences_decode_as_alone_with_cross_patch_attention() {
    let cfg = cross_patch_config();
    check_schedule(&f64_model(&cfg, 23), &mixed_requests(cfg.context), 150);
}

/// The recipe's model options (QK-norm: ragged caches of normalised keys; ReLU²), per patch
/// and across patches.
#[test]
fn batched_sequences_decode_as_alone_with_the_recipe_options() {
    check_per_patch_and_cross_patch(&crate::recipe_config(), &crate::cross_patch_recipe_config(), 25);
}

/// [`check_schedule`] of the mixed requests for an f64 model of each config (seeds `seed`
/// and `seed + 1`).
fn check_per_patch_and_cross_patch(per_patch: &ModelConfig, cross_patch: &ModelConfig, seed: u64) {
    check_schedule(&f64_model(per_patch, seed), &mixed_requests(per_patch.context), 150);
    check_schedule(&f64_model(cross_patch, seed + 1), &mixed_requests(cross_patch.context), 150);
}

/// Hash n-gram embeddings: each row's steps get the rows of its own window's bytes, per patch
/// and across patches.
#[test]
fn batched_sequences_decode_as_alone_with_hash_ngrams() {
    check_per_patch_and_cross_patch(&crate::ngram_config(), &crate::cross_patch_ngram_config(), 27);
}

#[test]
fn batched_sequences_decode_as_alone_in_f32() {
    let (model, _) = MegaByte::init(&ModelConfig::preset("tiny").unwrap(), 24, DType::F32, &Device::Cpu).unwrap();
    let t = model.config().context;
    let greedy = |len: usize, seed, join, leave| Req { prompt: random_bytes(len, seed), rule: Sampling::Greedy, seed, join, leave };
    let reqs = vec![
        greedy(0, 1, 0, None),
        greedy(13, 2, 0, Some(60)),
        Req { rule: Sampling::TopK { k: 3, temperature: 1.0 }, ..greedy(t + 20, 3, 5, None) },
        greedy(200, 4, 20, None),
    ];
    check_schedule(&model, &reqs, 150);
}

#[test]
fn removing_a_sequence_frees_its_row_and_leaves_the_others_unchanged() {
    let cfg = small_config(NormKind::LayerNorm, true);
    let model = f64_model(&cfg, 25);
    let sampler = |seed| Sampler::new(Sampling::Temperature { temperature: 1.0 }, seed).unwrap();
    let mut batch = Batch::new(&model, &Device::Cpu);
    assert!(batch.is_empty());
    let a = batch.insert(b"abcdef", sampler(1)).unwrap();
    let b = batch.insert(b"ghijkl", sampler(2)).unwrap();
    assert_eq!(batch.len(), 2);
    let mut from_a = Vec::new();
    for _ in 0..10 {
        from_a.extend(batch.step().unwrap().into_iter().filter(|x| x.0 == a).map(|x| x.1));
    }
    assert!(batch.remove(b));
    assert!(!batch.remove(b), "removed twice");
    assert!(!batch.remove(SeqId(999)), "an unknown id");
    assert_eq!(batch.len(), 1);
    for _ in 0..50 {
        let out = batch.step().unwrap();
        assert!(out.iter().all(|x| x.0 == a), "a removed sequence produced bytes: {out:?}");
        from_a.extend(out.into_iter().map(|x| x.1));
    }
    let req = Req { prompt: b"abcdef".to_vec(), rule: Sampling::Temperature { temperature: 1.0 }, seed: 1, join: 0, leave: None };
    assert_eq!(from_a, alone(&model, &req, from_a.len()));
    assert!(batch.remove(a));
    assert!(batch.is_empty());
    assert!(batch.step().unwrap().is_empty());
    // A server steps the batch on a thread of its own.
    fn sendable<T: Send>(_: &T) {}
    sendable(&batch);
}

/// A prompt longer than the context starts its window where feeding it one byte at a time
/// would have left it: the next bytes' logits equal those of a decoder fed byte by byte (f64,
/// with the window's slides on the way), for prompts ending mid-patch and on a boundary.
fn check_long_prompt(cfg: &ModelConfig) {
    let model = f64_model(cfg, 26);
    let t = cfg.context;
    for len in [t, t + 1, t + 7, 2 * t + 4, 3 * t - 1] {
        let bytes = random_bytes(len + 20, len as u64);
        let mut long = Decoder::new(&model, &[bytes[..len].to_vec()], &Device::Cpu).unwrap();
        let mut fed = Decoder::new(&model, &[Vec::new()], &Device::Cpu).unwrap();
        for &b in &bytes[..len] {
            fed.logits().unwrap();
            fed.push(&[b]).unwrap();
        }
        for &b in &bytes[len..] {
            let (x, y) = (long.logits().unwrap(), fed.logits().unwrap());
            let diff = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "prompt of {len} bytes (T = {t}): logits differ by {diff:.1e}");
            long.push(&[b]).unwrap();
            fed.push(&[b]).unwrap();
        }
        assert_eq!(long.history(), fed.history());
    }
}

#[test]
fn a_prompt_longer_than_the_context_decodes_as_if_fed_byte_by_byte() {
    check_long_prompt(&small_config(NormKind::LayerNorm, true));
    check_long_prompt(&cross_patch_config());
}

/// Attention after a ragged cache (rows right-aligned, row n's keys from slot starts[n]): each
/// row's output is that of the row alone, its padding cut off, bit for bit on the CPU, however
/// large the padding's values; with and without a sliding window; and the plain composition
/// agrees.
#[test]
fn ragged_cached_attention_sees_each_row_as_alone() {
    let (sq, sk, d, heads) = (2, 9, 12, 3);
    let starts = [0usize, 4, 7];
    let n = starts.len();
    for dtype in [DType::F64, DType::F32] {
        let rand = |shape: &[usize], seed| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap() * (seed as f64);
        let q = rand(&[n, sq, d], 1).unwrap();
        let (mut k, mut v) = (rand(&[n, sk, d], 1).unwrap(), rand(&[n, sk, d], 1).unwrap());
        for (r, &s) in starts.iter().enumerate() {
            if s > 0 {
                // Padding of huge values: seen at all, it would swamp the row.
                let junk = rand(&[1, s, d], 1000).unwrap();
                k = k.slice_assign(&[r..r + 1, 0..s, 0..d], &junk).unwrap();
                v = v.slice_assign(&[r..r + 1, 0..s, 0..d], &junk).unwrap();
            }
        }
        for window in [None, Some(3)] {
            let y = attention::cached_from(&q, &k, &v, heads, window, &starts).unwrap();
            let plain = reference::causal_attention_from(&q, &k, &v, heads, window, &starts).unwrap();
            let diff = (&y - &plain).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-5, "{dtype:?} window {window:?}: the composition differs by {diff}");
            for (r, &s) in starts.iter().enumerate() {
                let row = |t: &Tensor, from: usize| t.narrow(0, r, 1).unwrap().narrow(1, from, sk - from).unwrap();
                let alone = attention::cached(&q.narrow(0, r, 1).unwrap(), &row(&k, s), &row(&v, s), heads, window).unwrap();
                let got = y.narrow(0, r, 1).unwrap();
                let same = (got - alone).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                assert_eq!(same, 0.0, "{dtype:?} window {window:?}: row {r} (from slot {s}) differs from the row alone");
            }
        }
    }
}
