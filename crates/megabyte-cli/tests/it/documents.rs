//! Document isolation: with documents, no scored or trained byte sees across its document's
//! start.

use std::collections::BTreeMap;
use std::sync::Arc;

use megabyte::model::TrainPass;
use megabyte::data::{ByteStream, Split, WindowSampler};
use megabyte::documents::{tiles, DocumentIndex};
use megabyte::eval::{document_windows, evaluate, windows, EvalSettings, Window};
use megabyte::{DType, Device, MegaByte, NormKind};

use crate::{bytes_tensor, max_abs_diff, random_bytes, small_config, temp_dir};

fn leak(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

/// The loss of every scored byte, by its position in the split.
fn scored_losses(model: &MegaByte, split: &Split, plan: &[Window]) -> BTreeMap<u64, f32> {
    let t = model.config().context;
    let rows: Vec<Vec<u8>> = plan.iter().map(|w| split.padded_window(w.start, w.len, t).unwrap()).collect();
    let losses = model.byte_losses(&bytes_tensor(&rows)).unwrap().to_vec2::<f32>().unwrap();
    let mut out = BTreeMap::new();
    for (w, row) in plan.iter().zip(losses) {
        for (i, (&s, l)) in w.score.iter().zip(row).enumerate() {
            if s {
                assert!(out.insert(w.start + i as u64, l).is_none(), "byte {} scored twice", w.start + i as u64);
            }
        }
    }
    out
}

#[test]
fn changing_a_document_never_changes_the_losses_of_the_next() {
    let cfg = small_config(NormKind::LayerNorm, true); // P = 4, T = 32
    let (model, _) = MegaByte::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let lens = [45usize, 70, 13, 32, 3];
    let starts: Vec<u64> = lens.iter().scan(0u64, |a, &l| { let s = *a; *a += l as u64; Some(s) }).collect();
    let total: usize = lens.iter().sum();
    let base = random_bytes(total, 1);
    for k in 0..lens.len() - 1 {
        let mut changed = base.clone();
        let (d, e) = (starts[k] as usize, starts[k] as usize + lens[k]);
        for b in &mut changed[d..e] {
            *b = b.wrapping_add(101);
        }
        let a = Split::all(Arc::new(ByteStream::from_static("a", leak(base.clone()))));
        let b = Split::all(Arc::new(ByteStream::from_static("b", leak(changed))));
        for (stride, offsets, strided) in [(32, vec![0], false), (8, vec![0], false), (32, vec![0, 2], true), (16, vec![0, 2], true)] {
            let plan = document_windows(&starts, total as u64, 32, 4, stride, &offsets, strided);
            let (la, lb) = (scored_losses(&model, &a, &plan), scored_losses(&model, &b, &plan));
            assert_eq!(la.len(), total, "every byte scored once");
            for pos in e as u64..total as u64 {
                assert_eq!(la[&pos], lb[&pos], "document {k} changed the loss of byte {pos} (stride {stride}, strided {strided})");
            }
            assert!((d..e).any(|p| la[&(p as u64)] != lb[&(p as u64)]), "the changed document's own losses change");
        }
        // Without documents, a window that runs across the boundary moves the next document's
        // losses: the check above can fail.
        if e % 32 != 0 {
            let plain = windows(total as u64, 32, 4, 32, &[0], false);
            let (la, lb) = (scored_losses(&model, &a, &plain), scored_losses(&model, &b, &plain));
            assert!((e as u64..total as u64).any(|p| la[&p] != lb[&p]), "plain windows cross documents");
        }
    }
}

#[test]
fn evaluation_with_documents_sums_the_documents_evaluated_alone() {
    let cfg = small_config(NormKind::LayerNorm, true);
    let (model, _) = MegaByte::init(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let docs = [random_bytes(50, 2), random_bytes(9, 3), random_bytes(64, 4)];
    let joined: Vec<u8> = docs.concat();
    let starts = [0u64, 50, 59];
    let settings = EvalSettings { strided: true, sliding: Some(16), batch_size: 3 };
    let split = Split::all(Arc::new(ByteStream::from_static("j", leak(joined)))).with_documents(&starts);
    let all = evaluate(&model, &split, settings, None, &Device::Cpu, &mut |_, _| {}).unwrap();
    assert_eq!(all.bytes, 123);
    let mut nats = 0.0;
    for d in &docs {
        let alone = Split::all(Arc::new(ByteStream::from_static("d", leak(d.clone()))));
        let r = evaluate(&model, &alone, settings, None, &Device::Cpu, &mut |_, _| {}).unwrap();
        nats += r.bpb * r.bytes as f64;
    }
    assert!((all.bpb * 123.0 - nats).abs() < 1e-4 * nats, "{} vs {}", all.bpb * 123.0, nats);
}

#[test]
fn document_batches_are_tiles_of_one_document_and_cover_them_all() {
    let lens = [70usize, 5, 32, 40];
    let bytes: Vec<u8> = random_bytes(lens.iter().sum(), 9).iter().map(|b| b | 1).collect(); // no zero bytes
    let starts = [0u64, 70, 75, 107];
    let split = Split::all(Arc::new(ByteStream::from_static("t", leak(bytes.clone())))).with_documents(&starts);
    let all_tiles = tiles(&starts, bytes.len() as u64, 32);
    assert_eq!(all_tiles.len(), 3 + 1 + 1 + 2);
    let mut sampler = WindowSampler::new(4);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (x, w, real) = sampler.document_batch(&split, 4, 32, &Device::Cpu).unwrap();
        let (x, w) = (x.to_vec2::<u32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_eq!(real, w.iter().flatten().filter(|&&v| v == 1.0).count());
        for (row, weights) in x.iter().zip(&w) {
            let n = weights.iter().filter(|&&v| v == 1.0).count();
            assert!(weights[..n].iter().all(|&v| v == 1.0) && weights[n..].iter().all(|&v| v == 0.0));
            assert!(row[n..].iter().all(|&b| b == 0), "padding is zero");
            let real_bytes: Vec<u8> = row[..n].iter().map(|&b| b as u8).collect();
            let tile = all_tiles
                .iter()
                .find(|&&(s, len)| len == n && bytes[s as usize..s as usize + len] == real_bytes[..])
                .expect("each row is one document tile");
            seen.insert(tile.0);
        }
    }
    assert_eq!(seen.len(), all_tiles.len(), "every tile is drawn");
}

#[test]
fn padding_weights_leave_the_loss_and_gradients_unchanged() {
    let cfg = small_config(NormKind::LayerNorm, true);
    let (model, params) = MegaByte::init(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    let x = random_bytes(64, 11);
    let mut w = vec![1f32 / 40.0; 64];
    w[20..32].iter_mut().for_each(|v| *v = 0.0); // row 0: 20 real bytes, then padding
    let weights = megabyte::Tensor::from_vec(w, (2, 32), &Device::Cpu).unwrap();
    let mut other = x.clone();
    other[20..32].iter_mut().for_each(|b| *b = b.wrapping_mul(7).wrapping_add(3));
    let (l1, g1) = model.loss_and_grads(&bytes_tensor(&[x[..32].to_vec(), x[32..].to_vec()]), &weights, TrainPass::default()).unwrap();
    let (l2, g2) =
        model.loss_and_grads(&bytes_tensor(&[other[..32].to_vec(), other[32..].to_vec()]), &weights, TrainPass::default()).unwrap();
    assert_eq!(l1.to_scalar::<f32>().unwrap(), l2.to_scalar::<f32>().unwrap());
    for (name, var) in params.vars() {
        let (a, b) = (g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
        assert!(max_abs_diff(a, b) < 1e-7, "{name}: padding bytes moved the gradient");
    }
    // With all weights 1/N the weighted pass is the mean loss, and its gradients are the
    // reference model's.
    let ones = megabyte::Tensor::full(1f32 / 64.0, (2, 32), &Device::Cpu).unwrap();
    let xt = bytes_tensor(&[x[..32].to_vec(), x[32..].to_vec()]);
    let (lw, gw) = model.loss_and_grads(&xt, &ones, TrainPass::default()).unwrap();
    let mean = crate::reference::loss(&cfg, &params, &xt, None);
    let gm = megabyte::grad::Grads::from_store(&mean.backward().unwrap(), params.vars()).unwrap();
    assert!((lw.to_scalar::<f32>().unwrap() - model.loss(&xt).unwrap().to_scalar::<f32>().unwrap()).abs() < 1e-6);
    assert!((lw.to_scalar::<f32>().unwrap() - mean.to_scalar::<f32>().unwrap()).abs() < 1e-6);
    for (name, var) in params.vars() {
        let (a, b) = (gw.get(var.as_tensor()).unwrap(), gm.get(var.as_tensor()).unwrap());
        assert!(max_abs_diff(a, b) < 1e-6, "{name}");
    }
}

#[test]
fn sidecars_define_documents_and_holdout_cuts_at_one() {
    let dir = temp_dir("docs");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.bin"), random_bytes(100, 1)).unwrap();
    DocumentIndex::records(100, 25, serde_json::json!({})).write_for(&data.join("a.bin")).unwrap();
    std::fs::write(data.join("b.txt"), random_bytes(30, 2)).unwrap();
    let stream = Arc::new(ByteStream::open(&data).unwrap());
    assert_eq!(stream.len(), 130, "the sidecar is not data");
    let starts = stream.documents().unwrap();
    assert_eq!(starts, vec![0, 25, 50, 75, 100]);
    let (train, valid) = Split::holdout_documents(stream.clone(), 40, &starts).unwrap();
    assert_eq!((train.len(), valid.len()), (100, 30), "the cut moves to the next document start");
    assert_eq!(valid.documents().unwrap(), &[0]);
    assert_eq!(train.documents().unwrap(), &[0, 25, 50, 75]);
    // A sidecar that does not match its file is refused.
    DocumentIndex::records(99, 33, serde_json::json!({})).write_for(&data.join("b.txt")).unwrap();
    let err = ByteStream::open(&data).unwrap().documents().unwrap_err().to_string();
    assert!(err.contains("describes 99 bytes"), "{err}");
}
