//! Every fused op's explicit forward and backward against its plain candle composition
//! (`megabyte::ops::reference`) on random inputs, in f64 and f32 on the CPU: forward values,
//! and the backward's gradient of every input against the composition's vector-Jacobian
//! product by candle's autograd (`reference::vjp`) at a random output gradient, by relative
//! error.

use megabyte::ops::{adamw, attention, cross_entropy, embedding, linear, muon, norm, pointwise, reference};
use megabyte::{DType, Device, Tensor, Var};

const DTYPES: [DType; 2] = [DType::F64, DType::F32];

const EPS: f64 = 1e-5;

/// Values in about ±2, deterministic, as `dtype` on the CPU.
fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = crate::random_bytes(n, seed).iter().map(|&b| (b as f32 - 127.5) / 64.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    max(&(a - &b).unwrap()) / max(&b).max(1e-6)
}

/// Largest relative errors (forward, backward): f64 kernels and compositions differ by rounding
/// alone; f32 also by summation order and (GELU) the erf approximation.
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-9),
        _ => (1e-5, 1e-4),
    }
}

/// Checks an op's explicit passes on `inputs` against `plain`, its reference composition:
/// `forward` gives (y, what the backward reads of the forward), `backward` (inputs, y, that, dy)
/// the gradient of every input, compared with `reference::vjp` of `plain` at dy.
fn check<S>(
    what: &str,
    inputs: &[Tensor],
    forward: impl Fn(&[Tensor]) -> (Tensor, S),
    backward: impl Fn(&[Tensor], &Tensor, &S, &Tensor) -> Vec<Tensor>,
    plain: impl Fn(&[Tensor]) -> Tensor,
) {
    let dtype = inputs[0].dtype();
    let (tf, tb) = tolerance(dtype);
    let (y, kept) = forward(inputs);
    let want = plain(inputs);
    assert_eq!((y.dims(), y.dtype()), (want.dims(), want.dtype()), "{what} {dtype:?}: output");
    let err = rel_err(&y, &want);
    assert!(err < tf, "{what} {dtype:?}: forward relative error {err}");
    let dy = rand(y.dims(), 99, y.dtype());
    let grads = backward(inputs, &y, &kept, &dy);
    let want = reference::vjp(&inputs.iter().collect::<Vec<_>>(), &dy, |t| Ok(plain(t))).unwrap();
    assert_eq!(grads.len(), inputs.len(), "{what}: one gradient per input");
    for (i, (g, w)) in grads.iter().zip(&want).enumerate() {
        assert_eq!((g.dims(), g.dtype()), (w.dims(), w.dtype()), "{what} {dtype:?}: gradient of input {i}");
        let err = rel_err(g, w);
        assert!(err < tb, "{what} {dtype:?}: gradient of input {i} relative error {err}");
    }
}

#[test]
fn fused_linear_matches_composition() {
    // Rank 3 and rank 2 inputs, odd widths.
    for dtype in DTYPES {
        for (x, w) in [(vec![3, 5, 24], vec![40, 24]), (vec![7, 13], vec![5, 13])] {
            check(
                &format!("linear {x:?}·{w:?}ᵀ"),
                &[rand(&x, 31, dtype), rand(&w, 32, dtype)],
                |xs| {
                    let (w_act, y) = linear::forward(&xs[0], &xs[1]).unwrap();
                    (y, w_act)
                },
                |xs, _, w_act, dy| {
                    let (dx, dw) = linear::backward(&xs[0], w_act, dy, xs[1].dtype()).unwrap();
                    vec![dx, dw]
                },
                |xs| reference::linear(&xs[0], &xs[1]).unwrap(),
            );
        }
    }
    // dW comes in the master weight's dtype.
    let (x, w) = (rand(&[4, 6], 33, DType::F32), rand(&[3, 6], 34, DType::F32));
    let (w_act, y) = linear::forward(&x, &w).unwrap();
    assert_eq!(linear::backward(&x, &w_act, &y, DType::F64).unwrap().1.dtype(), DType::F64);
}

#[test]
fn fused_self_attention_matches_composition() {
    // Full causal, and sliding windows shorter than, equal to and longer than the sequence.
    for dtype in DTYPES {
        for (n, s, d, h, window) in [(3, 8, 32, 2, None), (2, 12, 24, 3, None), (4, 1, 16, 4, None), (2, 12, 24, 3, Some(1)), (2, 12, 24, 3, Some(5)), (3, 8, 32, 2, Some(8)), (1, 6, 16, 2, Some(40))] {
            check(
                &format!("self-attention n{n} s{s} d{d} h{h} window {window:?}"),
                &[rand(&[n, s, 3 * d], 1, dtype)],
                |xs| attention::forward(&xs[0], h, window).unwrap(),
                |xs, y, lse, dy| vec![attention::backward(&xs[0], y, lse.as_ref(), dy, h, window).unwrap()],
                |xs| reference::self_attention(&xs[0], h, window).unwrap(),
            );
        }
    }
}

#[test]
fn a_sliding_window_hides_older_positions() {
    // With window W, output i changes when key i − W + 1 changes and not when key i − W does.
    let (n, s, d, h, w) = (1, 10, 8, 1, 4);
    let qkv = rand(&[n, s, 3 * d], 7, DType::F32);
    let attend = |qkv: &Tensor| attention::forward(qkv, h, Some(w)).unwrap().0;
    let y = attend(&qkv);
    let bump = |pos: usize| {
        let mut v = qkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for c in d..3 * d {
            v[pos * 3 * d + c] += 1.0; // its key and value
        }
        attend(&Tensor::from_vec(v, (n, s, 3 * d), qkv.device()).unwrap())
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
    for dtype in DTYPES {
        let q = rand(&[n, sq, d], 2, dtype);
        let kv = rand(&[n, sk, 2 * d], 3, dtype);
        let (k, v) = (kv.narrow(2, 0, d).unwrap(), kv.narrow(2, d, d).unwrap());
        for window in [None, Some(4)] {
            let fused = attention::cached(&q, &k, &v, h, window).unwrap();
            let plain = reference::causal_attention(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), h, window).unwrap();
            assert!(rel_err(&fused, &plain) < tolerance(dtype).0, "{dtype:?} window {window:?}");
        }
    }
}

/// An output and x itself as one vector: the cotangent of the second half is the residual
/// stream's gradient `dres` that the norm's backward adds to dx.
fn joined(y: &Tensor, x: &Tensor) -> Tensor {
    Tensor::cat(&[y.flatten_all().unwrap(), x.flatten_all().unwrap()], 0).unwrap()
}

#[test]
fn fused_norms_match_composition() {
    // LayerNorm (bias) and RMSNorm (none), an even and an odd width, with and without dres.
    for dtype in DTYPES {
        for (shape, seed) in [([6, 5, 48], 3), ([4, 3, 13], 13)] {
            let d = shape[2];
            let (x, w, b) = (rand(&shape, seed, dtype), rand(&[d], seed + 1, dtype), rand(&[d], seed + 2, dtype));
            for bias in [true, false] {
                let inputs = if bias { vec![x.clone(), w.clone(), b.clone()] } else { vec![x.clone(), w.clone()] };
                let what = format!("{} {shape:?}", if bias { "layer norm" } else { "rms norm" });
                let grads = |(dx, dw, db): (Tensor, Tensor, Option<Tensor>)| {
                    assert_eq!(db.is_some(), bias, "{what}: db with a bias only");
                    [dx, dw].into_iter().chain(db).collect::<Vec<_>>()
                };
                check(
                    &what,
                    &inputs,
                    |xs| (norm::forward(&xs[0], &xs[1], xs.get(2), EPS).unwrap(), ()),
                    |xs, _, _, dy| grads(norm::backward(&xs[0], &xs[1], xs.get(2), dy, None, EPS).unwrap()),
                    |xs| reference::norm(&xs[0], &xs[1], xs.get(2), EPS).unwrap(),
                );
                check(
                    &format!("{what} with dres"),
                    &inputs,
                    |xs| (joined(&norm::forward(&xs[0], &xs[1], xs.get(2), EPS).unwrap(), &xs[0]), ()),
                    |xs, _, _, dy| {
                        let n = xs[0].elem_count();
                        let part = |at: usize| dy.narrow(0, at, n).unwrap().reshape(xs[0].shape()).unwrap();
                        grads(norm::backward(&xs[0], &xs[1], xs.get(2), &part(0), Some(&part(n)), EPS).unwrap())
                    },
                    |xs| joined(&reference::norm(&xs[0], &xs[1], xs.get(2), EPS).unwrap(), &xs[0]),
                );
                // The residual add fused with the norm after it.
                let a = rand(&shape, seed + 3, dtype);
                let (sum, y) = norm::add_forward(&x, &a, &w, bias.then_some(&b), EPS).unwrap();
                let want = (&x + &a).unwrap();
                assert_eq!(crate::max_abs_diff(&sum.to_dtype(DType::F32).unwrap(), &want.to_dtype(DType::F32).unwrap()), 0.0, "{what}: x + a");
                let err = rel_err(&y, &reference::norm(&want, &w, bias.then_some(&b), EPS).unwrap());
                assert!(err < tolerance(dtype).0, "{what} {dtype:?}: add_forward relative error {err}");
                // The fused passes are the unfused ones bit for bit: the add before the norm,
                // and the residual gradient added to dx inside the backward kernel.
                let same = |a: &Tensor, b: &Tensor| a.flatten_all().unwrap().to_vec1::<f64>().unwrap() == b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let unfused = norm::forward(&want, &w, bias.then_some(&b), EPS).unwrap();
                assert!(same(&f64s(&y), &f64s(&unfused)), "{what} {dtype:?}: add_forward's norm is not norm::forward of the sum");
                let (dy, dres) = (rand(&shape, seed + 4, dtype), rand(&shape, seed + 5, dtype));
                let (fused, ..) = norm::backward(&x, &w, bias.then_some(&b), &dy, Some(&dres), EPS).unwrap();
                let (dx, ..) = norm::backward(&x, &w, bias.then_some(&b), &dy, None, EPS).unwrap();
                assert!(same(&f64s(&fused), &f64s(&(dx + &dres).unwrap())), "{what} {dtype:?}: dx with dres is not dx + dres");
            }
        }
    }
}

#[test]
fn fused_cross_entropy_matches_composition() {
    // A random d losses: the weight of each row's loss.
    let targets: Vec<u32> = crate::random_bytes(37, 7).into_iter().map(u32::from).collect();
    let targets = Tensor::from_vec(targets, 37, &Device::Cpu).unwrap();
    for dtype in DTYPES {
        check(
            "cross-entropy",
            &[rand(&[37, 256], 6, dtype)],
            |xs| (cross_entropy::forward(&xs[0], &targets).unwrap(), ()),
            |xs, losses, _, dloss| vec![cross_entropy::backward(&xs[0], &targets, losses, dloss).unwrap()],
            |xs| reference::cross_entropy(&xs[0], &targets).unwrap(),
        );
    }
}

#[test]
fn fused_gelu_matches_composition() {
    // An odd and an even element count; the reference agrees with candle's gelu_erf.
    for dtype in DTYPES {
        let x = rand(&[7, 33], 9, dtype);
        assert!(rel_err(&reference::gelu(&x).unwrap(), &x.gelu_erf().unwrap()) < tolerance(dtype).0);
        for shape in [[7, 33], [4, 16]] {
            check(
                &format!("gelu {shape:?}"),
                &[rand(&shape, 8, dtype)],
                |xs| (pointwise::gelu(&xs[0]).unwrap(), ()),
                |xs, _, _, dy| vec![pointwise::gelu_backward(&xs[0], dy).unwrap()],
                |xs| reference::gelu(&xs[0]).unwrap(),
            );
        }
    }
}

#[test]
fn fused_relu2_matches_composition() {
    // An odd and an even element count, about half of them negative; the reference is
    // max(x, 0)² spelt out.
    for dtype in DTYPES {
        let x = rand(&[7, 33], 9, dtype);
        let spelt = x.maximum(0.0).unwrap().powf(2.0).unwrap();
        assert!(rel_err(&reference::relu2(&x).unwrap(), &spelt) < tolerance(dtype).0);
        for shape in [[7, 33], [4, 16]] {
            check(
                &format!("relu2 {shape:?}"),
                &[rand(&shape, 8, dtype)],
                |xs| (pointwise::relu2(&xs[0]).unwrap(), ()),
                |xs, _, _, dy| vec![pointwise::relu2_backward(&xs[0], dy).unwrap()],
                |xs| reference::relu2(&xs[0]).unwrap(),
            );
        }
    }
}

/// Dropout equals x times its mask (`reference::dropout_mask`: the kept elements, scaled in
/// x's dtype), forward and backward (its own);
/// keeps about 1 − p of the elements; rows taken with their offset draw the whole tensor's
/// mask; another key draws another mask; p = 0 is the identity and p outside [0, 1) an error.
#[test]
fn fused_dropout_matches_its_mask() {
    let (p, key) = (0.3, 77);
    for dtype in DTYPES {
        let x = rand(&[6, 5, 8], 21, dtype);
        let kept = |t: &Tensor| reference::dropout_mask(t.shape(), p, key, 0, &Device::Cpu).unwrap().ne(0f32).unwrap().to_dtype(t.dtype()).unwrap();
        check(
            "dropout",
            &[x.clone()],
            |xs| (pointwise::dropout(&xs[0], p, key, 0).unwrap(), ()),
            |_, _, _, dy| vec![pointwise::dropout(dy, p, key, 0).unwrap()],
            |xs| ((&xs[0] * kept(&xs[0])).unwrap() * (1.0 / (1.0 - p))).unwrap(),
        );
        let whole = pointwise::dropout(&x, p, key, 0).unwrap();
        let rows = pointwise::dropout(&x.narrow(0, 2, 3).unwrap(), p, key, 2).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(crate::max_abs_diff(&f32(&rows), &f32(&whole.narrow(0, 2, 3).unwrap())), 0.0, "rows with their offset");
        assert!(crate::max_abs_diff(&f32(&pointwise::dropout(&x, p, key + 1, 0).unwrap()), &f32(&whole)) > 0.0, "another key");
        assert_eq!(crate::max_abs_diff(&f32(&pointwise::dropout(&x, 0.0, key, 0).unwrap()), &f32(&x)), 0.0);
        assert!(pointwise::dropout(&x, 1.0, key, 0).is_err());
    }
    let n = 200_000u64;
    let kept = (0..n).filter(|&i| pointwise::dropout_keeps(key, i, p)).count() as f64 / n as f64;
    assert!((kept - (1.0 - p)).abs() < 0.005, "kept {kept}");
}

#[test]
fn fused_embedding_matches_composition() {
    // 5000 ids over 256 rows: many repeats, as bytes have.
    let ids: Vec<u32> = crate::random_bytes(5000, 31).iter().map(|&b| b as u32).collect();
    let ids = Tensor::from_vec(ids, (50, 100), &Device::Cpu).unwrap();
    for dtype in DTYPES {
        check(
            "embedding",
            &[rand(&[256, 40], 30, dtype)],
            |xs| (embedding::forward(&xs[0], &ids).unwrap(), ()),
            |xs, _, _, dy| vec![embedding::backward(&xs[0], &ids, dy).unwrap()],
            |xs| reference::embedding(&xs[0], &ids).unwrap(),
        );
    }
}

#[test]
fn fused_adamw_step_matches_the_textbook_update() {
    use megabyte::optim::{AdamW, AdamWConfig};
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1 };
    let var = |shape: &[usize], seed| Var::from_tensor(&rand(shape, seed, DType::F32)).unwrap();
    let (w, b) = (var(&[5, 7], 11), var(&[7], 12));
    let params: std::collections::BTreeMap<String, Var> =
        [("w".to_string(), w.clone()), ("b".to_string(), b.clone())].into_iter().collect();
    let mut opt = AdamW::new(&params, cfg).unwrap();
    let (w0, b0) = (w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let x = rand(&[7], 13, DType::F32);
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

/// The fused update of two parameters (f64 and f32 weights) equals the reference step of
/// each, with a fixed gradient scale and with clipping by the global norm (which Σ g² of
/// `sum_squares` gives).
#[test]
fn reference_adamw_step_matches_the_fused_one() {
    let (w0, g) = ([rand(&[6, 5], 21, DType::F64), rand(&[7], 25, DType::F32)], [rand(&[6, 5], 22, DType::F64), rand(&[7], 26, DType::F32)]);
    let mv0 = [30, 7].map(|n| Tensor::cat(&[rand(&[n], 23, DType::F32).abs().unwrap(), rand(&[n], 24, DType::F32).abs().unwrap()], 0).unwrap());
    let sumsq = adamw::sum_squares(&[&g[0], &g[1]]).unwrap();
    let exact: f64 = g.iter().map(|g| g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()).sum();
    let norm = (sumsq.to_scalar::<f32>().unwrap() as f64).sqrt();
    assert!((norm * norm - exact).abs() < 1e-5 * exact, "Σ g²: {} vs {exact}", norm * norm);
    let hp = adamw::AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.0, bc1: 0.19, bc2: 0.0396, grad_scale: 0.7 };
    let max_norm = 0.5 * norm;
    for (clip, scale) in [(None, hp.grad_scale), (Some((&sumsq, max_norm)), max_norm / norm)] {
        let ws = w0.clone().map(|w| Var::from_tensor(&w).unwrap());
        let mut mvs = mv0.clone();
        let decays = [0.1, 0.0];
        let mut items: Vec<_> = ws.iter().zip(&g).zip(mvs.iter_mut()).zip(decays).map(|(((w, g), mv), d)| (w, g, mv, d)).collect();
        adamw::update_many(&mut items, hp, clip).unwrap();
        for i in 0..2 {
            let hp = adamw::AdamWStep { weight_decay: decays[i], grad_scale: scale, ..hp };
            let want = reference::adamw_step(&w0[i], &g[i], &mv0[i], hp).unwrap(); // [w' | m' | v']
            let n = w0[i].elem_count();
            let got = Tensor::cat(&[ws[i].as_tensor().flatten_all().unwrap().to_dtype(DType::F32).unwrap(), mvs[i].clone()], 0).unwrap();
            assert_eq!(got.dims(), [3 * n]);
            assert!(rel_err(&got, &want) < 1e-6, "parameter {i}, clip {}", clip.is_some());
        }
    }
}

#[test]
fn optimizer_state_holds_no_graph() {
    // The plain (non-CPU) AdamW path must not chain each step's moments to the last step's:
    // a tracked result kept every step alive and ran the GPU out of memory.
    let w = Var::from_tensor(&rand(&[4, 4], 41, DType::F32)).unwrap();
    let mv = Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap();
    let hp = adamw::AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.1, bc1: 0.1, bc2: 0.02, grad_scale: 1.0 };
    let out = reference::adamw_step(w.as_tensor(), &rand(&[4, 4], 42, DType::F32), &mv, hp).unwrap();
    let grads = (out.sum_all().unwrap() + w.as_tensor().sum_all().unwrap()).unwrap().backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().all(|&x| x == 1.0), "the update must not be differentiable through w: {g:?}");
}

/// `count` orthonormal vectors of length `n` (count ≤ n), as the rows of a row-major
/// [count, n] f64 matrix: Gram–Schmidt on deterministic pseudo-random vectors.
fn orthonormal_rows(count: usize, n: usize, seed: u64) -> Vec<f64> {
    let raw: Vec<f64> = crate::random_bytes(count * n, seed).iter().map(|&b| b as f64 - 127.5).collect();
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for i in 0..count {
        let mut v = raw[i * n..(i + 1) * n].to_vec();
        for _ in 0..2 {
            for r in &rows {
                let dot: f64 = v.iter().zip(r).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(r).for_each(|(a, b)| *a -= dot * b);
            }
        }
        let len = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        rows.push(v.iter().map(|a| a / len).collect());
    }
    rows.concat()
}

/// Muon's Newton–Schulz iteration acts on singular values alone: for G = U·diag(s)·Vᵀ it
/// returns U·diag(φ⁵(s/(‖s‖ + 1e-7)))·Vᵀ, φ(x) = a·x + b·x³ + c·x⁵, for wide and tall
/// matrices (the tall one transposed inside), batched, in f64 and f32; and five steps bring
/// every singular value of a spread spectrum into [0.6, 1.25].
#[test]
fn newton_schulz_maps_singular_values_through_the_quintic() {
    let (a, b, c) = muon::NS_COEFFICIENTS;
    let phi = |x: f64| (0..5).fold(x, |x, _| a * x + b * x.powi(3) + c * x.powi(5));
    for dtype in DTYPES {
        for (r, cols) in [(6usize, 10usize), (12, 5)] {
            let k = r.min(cols);
            let (mut g, mut want) = (Vec::new(), Vec::new());
            for batch in 0..2u64 {
                // s spread over two orders of magnitude
                let s: Vec<f64> = (0..k).map(|i| 0.05 * (1.0 + i as f64).powf(2.0) * (1.0 + batch as f64)).collect();
                let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-7;
                let u = orthonormal_rows(k, r, 10 + batch); // columns of U, as rows
                let v = orthonormal_rows(k, cols, 20 + batch);
                let compose = |d: &dyn Fn(f64) -> f64| -> Vec<f64> {
                    let mut m = vec![0.0; r * cols];
                    for i in 0..k {
                        let di = d(s[i]);
                        for row in 0..r {
                            for col in 0..cols {
                                m[row * cols + col] += u[i * r + row] * di * v[i * cols + col];
                            }
                        }
                    }
                    m
                };
                g.extend(compose(&|x| x));
                want.extend(compose(&|x| phi(x / norm)));
                for x in &s {
                    let y = phi(x / norm);
                    assert!((0.6..=1.25).contains(&y), "singular value {x} of a spread spectrum went to {y}");
                }
            }
            let g = Tensor::from_vec(g, (2, r, cols), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let want = Tensor::from_vec(want, (2, r, cols), &Device::Cpu).unwrap();
            let got = muon::newton_schulz(&g, 5).unwrap();
            assert_eq!((got.dims(), got.dtype()), (g.dims(), dtype));
            let err = rel_err(&got, &want);
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
            assert!(err < tolerance, "{dtype:?} [{r}, {cols}]: relative error {err}");
        }
    }
}

/// Two Muon steps on two matrices (a qkv of three blocks and a wide one) against the update
/// written out: momentum M ← βM + (1 − β)·s·G, Nesterov N = (1 − β)·s·G + βM, each block
/// orthogonalised, W ← W(1 − lr·wd) − lr·√max(1, R/C)·NS(N).
#[test]
fn muon_steps_match_the_update_written_out() {
    use megabyte::optim::{Muon, MuonConfig};
    let cfg = MuonConfig { lr: 0.05, momentum: 0.9, ns_steps: 5, weight_decay: 0.1 };
    let shapes = [("global.blocks.0.attn.qkv.weight", (12usize, 4usize)), ("global.blocks.0.mlp.down.weight", (4, 16))];
    let vars: Vec<(String, Var)> = shapes.iter().enumerate().map(|(i, (n, s))| (n.to_string(), Var::from_tensor(&rand(&[s.0, s.1], 60 + i as u64, DType::F32)).unwrap())).collect();
    let mut want: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let mut momenta: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().zeros_like().unwrap()).collect();
    let mut opt = Muon::new(vars.clone(), cfg).unwrap();
    for step in 0..2u64 {
        let grads: Vec<Tensor> = shapes.iter().enumerate().map(|(i, (_, s))| rand(&[s.0, s.1], 70 + 2 * i as u64 + step, DType::F32)).collect();
        let scale = 0.5;
        opt.step(&grads.iter().collect::<Vec<_>>(), cfg.lr, scale).unwrap();
        for (i, (name, _)) in vars.iter().enumerate() {
            let (r, c) = shapes[i].1;
            let g = (&grads[i] * scale).unwrap();
            momenta[i] = ((&momenta[i] * 0.9).unwrap() + (&g * 0.1).unwrap()).unwrap();
            let n = ((&g * 0.1).unwrap() + (&momenta[i] * 0.9).unwrap()).unwrap();
            let blocks = if name.ends_with("qkv.weight") { 3 } else { 1 };
            let o = muon::newton_schulz(&n.reshape((blocks, r / blocks, c)).unwrap(), 5).unwrap().reshape((r, c)).unwrap();
            let rs = ((r / blocks) as f64 / c as f64).max(1.0).sqrt();
            want[i] = ((&want[i] * (1.0 - 0.05 * 0.1)).unwrap() - (o * (0.05 * rs)).unwrap()).unwrap();
            let err = rel_err(vars[i].1.as_tensor(), &want[i]);
            assert!(err < 1e-6, "{name}, step {step}: relative error {err}");
        }
    }
}

/// The CPU kernels compiled for each vector width (`ops::vectorised`: baseline SSE2, AVX2,
/// AVX-512, capped by `MEGABYTE_CPU_VECTOR`) train to the same bits: weights and optimizer state
/// after a few steps of `tiny` with dropout, LayerNorm and GELU, and with QK-norm (RMS) and
/// ReLU². Widths this CPU lacks run as its widest.
#[test]
fn kernels_give_the_same_bits_at_every_vector_width() {
    let dir = crate::temp_dir("vector-widths");
    for (name, extra) in [("gelu", &[][..]), ("relu2", &["--qk-norm", "--mlp", "relu2"][..])] {
        let mut files: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
        for level in ["baseline", "v3", "v4"] {
            let out = dir.join(format!("{name}-{level}"));
            let mut args = vec!["train", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--dropout", "0.1"];
            args.extend(["--eval-every", "2", "--sample-bytes", "0", "--out", out.to_str().unwrap()]);
            args.extend(extra);
            let run = std::process::Command::new(env!("CARGO_BIN_EXE_megabyte"))
                .args(&args)
                .env("MEGABYTE_CPU_VECTOR", level)
                .output()
                .unwrap();
            assert!(run.status.success(), "{level}: {}", String::from_utf8_lossy(&run.stderr));
            let step = out.join("step-00000003");
            files.push((level.into(), std::fs::read(step.join("model.safetensors")).unwrap(), std::fs::read(step.join("optimizer.safetensors")).unwrap()));
        }
        for (level, model, optimizer) in &files[1..] {
            assert!(model == &files[0].1, "{name}: the weights trained with {level} differ from the baseline build's");
            assert!(optimizer == &files[0].2, "{name}: the optimizer state with {level} differs from the baseline build's");
        }
    }
}

/// The gradient sum (`pointwise::add`, a kernel of its own on the CPU) is candle's a + b, bit
/// for bit, at sizes on both sides of candle's parallel threshold (64K elements).
#[test]
fn fused_add_is_the_plain_sum() {
    for dtype in DTYPES {
        for (shape, seed) in [(vec![3, 7], 31), (vec![300, 257], 32)] {
            let (a, b) = (rand(&shape, seed, dtype), rand(&shape, seed + 1, dtype));
            let got = pointwise::add(&a, &b).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let want = (&a + &b).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(got == want, "{dtype:?} {shape:?}: the sums differ");
        }
    }
}
