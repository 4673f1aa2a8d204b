//! Each fused op against its plain candle composition (`megabyte::ops::reference`) on random
//! inputs: forward values and the gradients of every input, by relative error.

use megabyte::ops::{self, reference};
use megabyte::{DType, Device, Tensor, Var};

fn rand(shape: &[usize], seed: u64) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = crate::random_bytes(n, seed).iter().map(|&b| (b as f32 - 127.5) / 64.0).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    crate::max_abs_diff(a, b) / scale
}

/// Compares `fused` and `plain` on `inputs`: outputs, then gradients of Σ out·w for a fixed
/// random w.
fn compare(inputs: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, plain: impl Fn(&[Tensor]) -> Tensor, what: &str) {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yp) = (fused(&xs), plain(&xs));
    let err = rel_err(&yf, &yp);
    assert!(err < 1e-5, "{what}: forward relative error {err}");
    let w = rand(yf.dims(), 99).as_tensor().clone();
    let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (yp * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, x) in xs.iter().enumerate() {
        let (a, b) = (gf.get(x).unwrap(), gp.get(x).unwrap());
        let err = rel_err(a, b);
        assert!(err < 1e-4, "{what}: gradient of input {i} relative error {err}");
    }
}

#[test]
fn fused_self_attention_matches_composition() {
    // Full causal, and sliding windows shorter than, equal to and longer than the sequence.
    for (n, s, d, h, window) in [(3, 8, 32, 2, None), (2, 12, 24, 3, None), (4, 1, 16, 4, None), (2, 12, 24, 3, Some(1)), (2, 12, 24, 3, Some(5)), (3, 8, 32, 2, Some(8)), (1, 6, 16, 2, Some(40))] {
        let split = |qkv: &Tensor| {
            let (q, k, v) = (qkv.narrow(2, 0, d).unwrap(), qkv.narrow(2, d, d).unwrap(), qkv.narrow(2, 2 * d, d).unwrap());
            reference::causal_attention(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), h, window).unwrap()
        };
        compare(
            &[rand(&[n, s, 3 * d], 1)],
            |xs| ops::causal_self_attention(&xs[0], h, window).unwrap(),
            |xs| split(&xs[0]),
            &format!("self-attention n{n} s{s} d{d} h{h} window {window:?}"),
        );
    }
}

#[test]
fn a_sliding_window_hides_older_positions() {
    // With window W, output i changes when key i − W + 1 changes and not when key i − W does.
    let (n, s, d, h, w) = (1, 10, 8, 1, 4);
    let qkv = rand(&[n, s, 3 * d], 7).as_tensor().clone();
    let y = ops::causal_self_attention(&qkv, h, Some(w)).unwrap();
    let bump = |pos: usize| {
        let mut v = qkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for c in d..3 * d {
            v[pos * 3 * d + c] += 1.0; // its key and value
        }
        ops::causal_self_attention(&Tensor::from_vec(v, (n, s, 3 * d), qkv.device()).unwrap(), h, Some(w)).unwrap()
    };
    let row = |t: &Tensor, i: usize| t.narrow(1, i, 1).unwrap();
    let i = 9;
    assert!(crate::max_abs_diff(&row(&bump(i - w), i), &row(&y, i)) == 0.0, "position {} is outside the window", i - w);
    assert!(crate::max_abs_diff(&row(&bump(i - w + 1), i), &row(&y, i)) > 1e-6, "position {} is inside the window", i - w + 1);
}

#[test]
fn cached_attention_matches_composition() {
    // Queries after a cache (Sk > Sq), k and v as strided column views; with and without a window.
    let (n, sq, sk, d, h) = (2, 3, 11, 24, 3);
    let q = rand(&[n, sq, d], 2).as_tensor().clone();
    let kv = rand(&[n, sk, 2 * d], 3).as_tensor().clone();
    let (k, v) = (kv.narrow(2, 0, d).unwrap(), kv.narrow(2, d, d).unwrap());
    for window in [None, Some(4)] {
        let fused = ops::causal_attention(&q, &k, &v, h, window).unwrap();
        let plain = reference::causal_attention(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), h, window).unwrap();
        assert!(rel_err(&fused, &plain) < 1e-5, "window {window:?}");
    }
}

#[test]
fn fused_norms_match_composition() {
    let (x, w, b) = (rand(&[6, 5, 48], 3), rand(&[48], 4), rand(&[48], 5));
    compare(
        &[x.clone(), w.clone(), b],
        |xs| ops::norm(&xs[0], &xs[1], Some(&xs[2]), 1e-5).unwrap(),
        |xs| reference::norm(&xs[0], &xs[1], Some(&xs[2]), 1e-5).unwrap(),
        "layer norm",
    );
    compare(
        &[x, w],
        |xs| ops::norm(&xs[0], &xs[1], None, 1e-5).unwrap(),
        |xs| reference::norm(&xs[0], &xs[1], None, 1e-5).unwrap(),
        "rms norm",
    );
}

#[test]
fn fused_cross_entropy_matches_composition() {
    let logits = rand(&[37, 256], 6);
    let targets: Vec<u32> = crate::random_bytes(37, 7).into_iter().map(u32::from).collect();
    let targets = Tensor::from_vec(targets, 37, &Device::Cpu).unwrap();
    compare(
        &[logits],
        |xs| ops::cross_entropy(&xs[0], &targets).unwrap(),
        |xs| reference::cross_entropy(&xs[0], &targets).unwrap(),
        "cross-entropy",
    );
    assert_eq!(ops::cross_entropy(&rand(&[2, 256], 1).as_tensor().to_dtype(DType::F64).unwrap(), &targets.narrow(0, 0, 2).unwrap()).unwrap().dtype(), DType::F64);
}

#[test]
fn fused_gelu_matches_composition() {
    compare(&[rand(&[7, 33], 8)], |xs| ops::gelu(&xs[0]).unwrap(), |xs| xs[0].gelu_erf().unwrap(), "gelu");
}

/// Dropout equals x times its mask (`reference::dropout_mask`), forward and gradient; keeps
/// about 1 − p of the elements; rows taken with their offset draw the whole tensor's mask;
/// another key draws another mask; p = 0 is the identity and p outside [0, 1) an error.
#[test]
fn fused_dropout_matches_its_mask() {
    let (p, key) = (0.3, 77);
    let x = rand(&[6, 5, 8], 21);
    let mask = |t: &Tensor| reference::dropout_mask(t.shape(), p, key, 0, &Device::Cpu).unwrap();
    compare(&[x.clone()], |t| ops::dropout(&t[0], p, key, 0).unwrap(), |t| (&t[0] * mask(&t[0])).unwrap(), "dropout");
    let whole = ops::dropout(x.as_tensor(), p, key, 0).unwrap();
    let rows = ops::dropout(&x.as_tensor().narrow(0, 2, 3).unwrap(), p, key, 2).unwrap();
    assert_eq!(crate::max_abs_diff(&rows, &whole.narrow(0, 2, 3).unwrap()), 0.0, "rows with their offset");
    assert!(crate::max_abs_diff(&ops::dropout(x.as_tensor(), p, key + 1, 0).unwrap(), &whole) > 0.0, "another key");
    assert_eq!(crate::max_abs_diff(&ops::dropout(x.as_tensor(), 0.0, key, 0).unwrap(), x.as_tensor()), 0.0);
    assert!(ops::dropout(x.as_tensor(), 1.0, key, 0).is_err());
    let n = 200_000u64;
    let kept = (0..n).filter(|&i| ops::dropout_keeps(key, i, p)).count() as f64 / n as f64;
    assert!((kept - (1.0 - p)).abs() < 0.005, "kept {kept}");
}

#[test]
fn fused_adamw_step_matches_the_textbook_update() {
    use megabyte::optim::{AdamW, AdamWConfig};
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1 };
    let (w, b) = (rand(&[5, 7], 11), rand(&[7], 12));
    let params: std::collections::BTreeMap<String, Var> =
        [("w".to_string(), w.clone()), ("b".to_string(), b.clone())].into_iter().collect();
    let mut opt = AdamW::new(&params, cfg).unwrap();
    let (w0, b0) = (w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let x = rand(&[7], 13).as_tensor().clone();
    let loss = |w: &Tensor, b: &Tensor| w.broadcast_mul(&(b + &x).unwrap()).unwrap().sqr().unwrap().sum_all().unwrap();
    let (lr, scale) = (0.01, 0.5);
    // Two steps, then the same two steps by hand in f64.
    let mut m = [vec![0f64; 35], vec![0f64; 7]];
    let mut v = m.clone();
    let mut p = [w0.iter().map(|&x| x as f64).collect::<Vec<_>>(), b0.iter().map(|&x| x as f64).collect::<Vec<_>>()];
    for t in 1..=2 {
        let grads = loss(w.as_tensor(), b.as_tensor()).backward().unwrap();
        let gs = [grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap()];
        opt.step(&megabyte::grad::Grads::from_store(&grads, &params).unwrap(), lr, scale).unwrap();
        for k in 0..2 {
            let wd = if k == 0 { 0.1 } else { 0.0 }; // decay on matrices only
            for i in 0..p[k].len() {
                let g = gs[k][i] as f64 * scale;
                m[k][i] = 0.9 * m[k][i] + 0.1 * g;
                v[k][i] = 0.98 * v[k][i] + 0.02 * g * g;
                let update = (m[k][i] / (1.0 - 0.9f64.powi(t))) / ((v[k][i] / (1.0 - 0.98f64.powi(t))).sqrt() + 1e-8);
                p[k][i] = p[k][i] * (1.0 - lr * wd) - lr * update;
            }
        }
    }
    let got = [w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.as_tensor().to_vec1::<f32>().unwrap()];
    for k in 0..2 {
        for (a, e) in got[k].iter().zip(&p[k]) {
            assert!((*a as f64 - e).abs() < 1e-5, "param {k}: fused {a} vs textbook {e}");
        }
    }
}

#[test]
fn reference_adamw_step_matches_the_fused_one() {
    let (w, g) = (rand(&[6, 5], 21), rand(&[6, 5], 22));
    let mv = Tensor::cat(&[rand(&[30], 23).as_tensor().abs().unwrap(), rand(&[30], 24).as_tensor().abs().unwrap()], 0).unwrap();
    let hp = ops::AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1, bc1: 0.19, bc2: 0.0396, grad_scale: 0.7 };
    let fused = ops::adamw_step(w.as_tensor(), g.as_tensor(), &mv, hp).unwrap();
    let plain = reference::adamw_step(w.as_tensor(), g.as_tensor(), &mv, hp).unwrap();
    assert!(rel_err(&fused, &plain) < 1e-6);
}

#[test]
fn fused_linear_matches_composition() {
    compare(
        &[rand(&[3, 5, 24], 31), rand(&[40, 24], 32)],
        |xs| ops::linear(&xs[0], &xs[1]).unwrap(),
        |xs| xs[0].reshape((15, 24)).unwrap().matmul(&xs[1].t().unwrap()).unwrap().reshape((3, 5, 40)).unwrap(),
        "linear",
    );
}

#[test]
fn optimizer_state_holds_no_graph() {
    // The plain (non-CPU) AdamW path must not chain each step's moments to the last step's:
    // a tracked result kept every step alive and ran the GPU out of memory.
    let w = rand(&[4, 4], 41);
    let mv = Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap();
    let hp = ops::AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1, bc1: 0.1, bc2: 0.02, grad_scale: 1.0 };
    let out = reference::adamw_step(w.as_tensor(), rand(&[4, 4], 42).as_tensor(), &mv, hp).unwrap();
    let grads = (out.sum_all().unwrap() + w.as_tensor().sum_all().unwrap()).unwrap().backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().all(|&x| x == 1.0), "the update must not be differentiable through w: {g:?}");
}
