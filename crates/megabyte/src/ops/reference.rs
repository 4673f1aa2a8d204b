//! The same operations composed from plain candle ops: slower, but differentiable by candle's
//! autograd. They are the test oracle of the fused ops (tests/it/ops.rs compares every forward
//! with its composition and every backward with [`vjp`] of it), and the ops' fallback where no
//! kernel exists.

use candle_core::{DType, Device, Shape, Tensor, Var, D};

use super::adamw::AdamWStep;
use super::CResult;

/// The vector-Jacobian product of `f` at `inputs` with output gradient `dy`: the gradients
/// of Σ f(inputs)·dy, by candle's autograd (zeros for an input `f` does not reach).
pub fn vjp(inputs: &[&Tensor], dy: &Tensor, f: impl Fn(&[Tensor]) -> CResult<Tensor>) -> CResult<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.detach())).collect::<CResult<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs)?;
    let grads = (y * dy.to_dtype(dy.dtype())?)?.sum_all()?.backward()?;
    xs.iter()
        .map(|x| grads.get(x).cloned().map_or_else(|| x.zeros_like(), Ok))
        .collect()
}

/// y = x Wᵀ for x [.., in] and W [out, in], as [`super::linear::forward`].
pub fn linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let mut out = dims.to_vec();
    out[dims.len() - 1] = w.dim(0)?;
    x.reshape((x.elem_count() / d_in, d_in))?.matmul(&w.t()?)?.reshape(out)
}

/// Softmax over the last dimension with a detached max.
pub fn softmax_last(x: &Tensor) -> CResult<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Causal attention as in [`super::attention::cached`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    causal_attention_from(q, k, v, heads, window, &[])
}

/// Causal attention as in [`super::attention::cached_from`]: sequence n sees no key before
/// slot `starts[n]` (empty `starts`: every key).
pub fn causal_attention_from(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, window: Option<usize>, starts: &[usize]) -> CResult<Tensor> {
    let (n, sq, d) = q.dims3()?;
    let sk = k.dim(1)?;
    let hd = d / heads;
    let split = |t: &Tensor, s: usize| t.reshape((n, s, heads, hd))?.transpose(1, 2)?.contiguous(); // [N, H, S, hd]
    let (q, k, v) = (split(q, sq)?, split(k, sk)?, split(v, sk)?);
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // [N, H, Sq, Sk]
    let offset = sk - sq;
    let mask: Vec<f32> = (0..sq)
        .flat_map(|i| {
            let lo = (offset + i + 1).saturating_sub(window.unwrap_or(usize::MAX));
            (0..sk).map(move |j| if (lo..=offset + i).contains(&j) { 0.0 } else { f32::NEG_INFINITY })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (sq, sk), &Device::Cpu)?.to_dtype(q.dtype())?.to_device(q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let scores = if starts.is_empty() {
        scores
    } else {
        let rows: Vec<f32> = starts.iter().flat_map(|&s| (0..sk).map(move |j| if j < s { f32::NEG_INFINITY } else { 0.0 })).collect();
        let rows = Tensor::from_vec(rows, (n, 1, 1, sk), &Device::Cpu)?.to_dtype(q.dtype())?.to_device(q.device())?;
        scores.broadcast_add(&rows)?
    };
    let y = softmax_last(&scores)?.matmul(&v)?; // [N, H, Sq, hd]
    y.transpose(1, 2)?.reshape((n, sq, d))
}

/// Self-attention on a fused qkv [N, S, 3D] as in [`super::attention::forward`].
pub fn self_attention(qkv: &Tensor, heads: usize, window: Option<usize>) -> CResult<Tensor> {
    let d = qkv.dim(2)? / 3;
    let (q, k, v) = (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?);
    causal_attention(&q, &k.contiguous()?, &v.contiguous()?, heads, window)
}

/// LayerNorm (with bias) or RMSNorm (without) over the last dimension.
pub fn norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> CResult<Tensor> {
    let x = match b {
        Some(_) => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
        None => x.clone(),
    };
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// ReLU²(x) = max(x, 0)², from candle's relu and sqr.
pub fn relu2(x: &Tensor) -> CResult<Tensor> {
    x.relu()?.sqr()
}

/// GELU(x) = ½x(1 + erf(x/√2)), from candle's erf, whose derivative autograd takes exactly
/// (candle's own `gelu_erf` differentiates with 1/√(2π) rounded to 6 digits).
pub fn gelu(x: &Tensor) -> CResult<Tensor> {
    (x * 0.5)? * ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?
}

/// [`super::pointwise::dropout`]'s mask as a tensor (f32): 1/(1 − p) where an element is kept,
/// else 0.
pub fn dropout_mask(shape: &Shape, p: f64, key: u64, row_offset: usize, device: &Device) -> CResult<Tensor> {
    let base = super::pointwise::first_index(shape, row_offset);
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> =
        (0..shape.elem_count() as u64).map(|i| if super::pointwise::dropout_keeps(key, base + i, p) { scale } else { 0.0 }).collect();
    Tensor::from_vec(mask, shape, &Device::Cpu)?.to_device(device)
}

/// Per-row cross-entropy of logits [N, V] against u32 targets [N].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let logp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Rows of `table` [V, D] at u32 `ids` [..] → [.., D].
pub fn embedding(table: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
}

/// The AdamW update of [`AdamWStep`], one tensor op at a time: [w' | m' | v'] (f32).
pub fn adamw_step(w: &Tensor, g: &Tensor, mv: &Tensor, hp: AdamWStep) -> CResult<Tensor> {
    // Detached: `w` is a Var, and a tracked result would chain every step's moments to the
    // previous step's through the graph (found as a GPU out-of-memory after 15 steps).
    let (w, g, mv) = (w.detach(), g.detach(), mv.detach());
    let n = w.elem_count();
    let g = (g.flatten_all()?.to_dtype(DType::F32)? * hp.grad_scale)?;
    let (m, v) = (mv.narrow(0, 0, n)?, mv.narrow(0, n, n)?);
    let m = ((m * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?;
    let v = ((v * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?;
    let update = ((&m / hp.bc1)? / ((&v / hp.bc2)?.sqrt()? + hp.eps)?)?;
    let w = ((w.flatten_all()?.to_dtype(DType::F32)? * (1.0 - hp.lr * hp.weight_decay))? - (update * hp.lr)?)?;
    Tensor::cat(&[w, m, v], 0)
}
