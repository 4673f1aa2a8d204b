//! Transformer building blocks: parameters, linear layers, norms, attention, MLP, blocks and
//! the KV cache, each with its one forward pass, its backward pass and (for attention and
//! blocks) its cached decoding step. Every op is a fused kernel of `ops` (candle-nn's fused
//! `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward); the backward pass runs
//! the ops' own backward kernels in reverse order over what the forward pass kept, without
//! candle's autograd. tests/it/gradients.rs checks it against finite differences and against
//! autograd through an independent reference model.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Activation, NormKind, TransformerConfig};
use crate::error::{Error, Result};
use crate::grad::Grads;
use crate::ops::{self, accumulation_dtype};

/// How a new parameter is filled.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Normal(0, std) truncated at ±2σ (the paper's initialisation).
    TruncNormal(f64),
    Ones,
    Zeros,
}

/// All trainable tensors of a model by checkpoint name (`global.blocks.3.attn.qkv.weight`).
/// The names are the checkpoint contract (ARCHITECTURE.md lists them).
pub struct Params {
    vars: BTreeMap<String, Var>,
    rng: Option<ChaCha8Rng>,
    device: Device,
    dtype: DType,
}

impl Params {
    /// A store whose new parameters are drawn from a seeded RNG.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Params { vars: BTreeMap::new(), rng: Some(ChaCha8Rng::seed_from_u64(seed)), device: device.clone(), dtype }
    }

    /// A store whose parameters are zeros, to be overwritten by `load` (no RNG cost).
    pub fn for_loading(dtype: DType, device: &Device) -> Self {
        Params { vars: BTreeMap::new(), rng: None, device: device.clone(), dtype }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Creates the parameter `name` (once) and returns its tensor.
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if self.vars.contains_key(name) {
            return Err(Error::Config(format!("parameter `{name}` created twice")));
        }
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match (init, self.rng.as_mut()) {
            (Init::Ones, _) => vec![1.0; n],
            (Init::Zeros, _) | (Init::TruncNormal(_), None) => vec![0.0; n],
            (Init::TruncNormal(std), Some(rng)) => (0..n).map(|_| trunc_normal(rng) * std as f32).collect(),
        };
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(Self::dtype_of(self.dtype, shape.len()))?;
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(t)
    }

    /// Vectors (norm weights and biases, pads) stay f32 in a half-precision store: the norm
    /// kernels read f32 weights, and casting them at every decoding step costs launches.
    fn dtype_of(dtype: DType, rank: usize) -> DType {
        if rank == 1 {
            accumulation_dtype(dtype)
        } else {
            dtype
        }
    }

    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Number of scalars over all parameters.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Overwrites every parameter from `tensors`; names and shapes must match exactly.
    pub fn assign(&self, tensors: &std::collections::HashMap<String, Tensor>) -> std::result::Result<(), String> {
        let missing: Vec<&str> =
            self.vars.keys().filter(|k| !tensors.contains_key(*k)).map(|s| s.as_str()).collect();
        if !missing.is_empty() {
            return Err(format!("missing tensors: {}", abbreviate(&missing)));
        }
        let extra: Vec<&str> =
            tensors.keys().filter(|k| !self.vars.contains_key(*k)).map(|s| s.as_str()).collect();
        if !extra.is_empty() {
            return Err(format!("unexpected tensors: {}", abbreviate(&extra)));
        }
        for (name, var) in &self.vars {
            let t = &tensors[name];
            if t.dims() != var.dims() {
                return Err(format!("tensor `{name}` has shape {:?}, the config expects {:?}", t.dims(), var.dims()));
            }
            let t = t.to_dtype(var.dtype()).and_then(|t| t.to_device(&self.device)).map_err(|e| e.to_string())?;
            var.set(&t).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn abbreviate(names: &[&str]) -> String {
    let shown: Vec<&str> = names.iter().take(4).copied().collect();
    let more = names.len().saturating_sub(4);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// A standard normal sample rejected outside ±2σ.
fn trunc_normal(rng: &mut ChaCha8Rng) -> f32 {
    loop {
        // Box–Muller; one of the pair is enough here.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        if z.abs() <= 2.0 {
            return z as f32;
        }
    }
}

/// A bias-free linear map `y = x Wᵀ`, W of shape [out, in].
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
}

impl Linear {
    pub fn new(p: &mut Params, name: &str, d_in: usize, d_out: usize, std: f64) -> Result<Self> {
        Ok(Linear { weight: p.get(&format!("{name}.weight"), &[d_out, d_in], Init::TruncNormal(std))? })
    }

    /// y for x [.., in] → [.., out], in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fwd(x)?.1)
    }

    /// (the weight in x's dtype, y): the backward pass reuses that cast.
    pub(crate) fn fwd(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(ops::linear::forward(x, &self.weight)?)
    }

    /// dx from the forward's input and weight cast, adding dW to `grads`.
    pub(crate) fn bwd(&self, x: &Tensor, w_act: &Tensor, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let (dx, dw) = ops::linear::backward(x, w_act, dy, self.weight.dtype())?;
        grads.add(&self.weight, dw)?;
        Ok(dx)
    }
}

/// LayerNorm or RMSNorm over the last dimension (the fused `ops::norm`).
#[derive(Clone, Debug)]
pub struct Norm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

pub(crate) const NORM_EPS: f64 = 1e-5;

impl Norm {
    pub fn new(p: &mut Params, name: &str, kind: NormKind, d: usize) -> Result<Self> {
        let weight = p.get(&format!("{name}.weight"), &[d], Init::Ones)?;
        let bias = match kind {
            NormKind::LayerNorm => Some(p.get(&format!("{name}.bias"), &[d], Init::Zeros)?),
            NormKind::RmsNorm => None,
        };
        Ok(Norm { weight, bias })
    }

    /// The residual stream x (= base + delta when a delta is given) and norm(x): the residual
    /// add and the norm after it in one pass.
    pub(crate) fn fwd(&self, base: &Tensor, delta: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        Ok(match delta {
            Some(a) => ops::norm::add_forward(base, a, &self.weight, self.bias.as_ref(), NORM_EPS)?,
            None => (base.clone(), ops::norm::forward(base, &self.weight, self.bias.as_ref(), NORM_EPS)?),
        })
    }

    /// dx (+ dres, the residual stream's gradient, when given).
    pub(crate) fn bwd(&self, x: &Tensor, dy: &Tensor, dres: Option<&Tensor>, grads: &mut Grads) -> Result<Tensor> {
        let (dx, dw, db) = ops::norm::backward(x, &self.weight, self.bias.as_ref(), dy, dres, NORM_EPS)?;
        grads.add(&self.weight, dw)?;
        if let (Some(b), Some(db)) = (&self.bias, db) {
            grads.add(b, db)?;
        }
        Ok(dx)
    }
}

/// Keys and values of every layer of one transformer for the positions seen so far, in
/// buffers of `capacity` positions allocated at the first step and written in place (one
/// kernel per layer and step on CUDA, no growing copies). The global cache grows one patch
/// per step; the local one is reset at each patch boundary.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    capacity: usize,
    /// Positions cached so far, the same in every layer (and counted for a transformer
    /// without layers too).
    len: usize,
    /// A ragged batch (rows of different lengths, right-aligned at `len`): each row's first
    /// slot; the slots before it are padding no query sees. Empty: every row starts at 0.
    starts: Vec<usize>,
}

/// One row of a [`KvCache`]: its ℓ positions' keys and values [1, ℓ, D] in every layer.
pub(crate) struct CachedRow {
    pub(crate) len: usize,
    layers: Vec<(Tensor, Tensor)>,
}

/// One layer's key and value buffers [N, capacity, D]; the cache's first `len` positions hold
/// data.
#[derive(Clone, Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

impl KvCache {
    pub fn new(layers: usize, capacity: usize) -> Self {
        KvCache { layers: (0..layers).map(|_| None).collect(), capacity, len: 0, starts: Vec::new() }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position (the buffers are kept for the next use).
    pub fn reset(&mut self) {
        self.len = 0;
        self.starts.clear();
    }

    /// The positions each of `rows` rows holds: `len`, less its padding in a ragged batch.
    pub(crate) fn row_lens(&self, rows: usize) -> Vec<usize> {
        (0..rows).map(|r| self.len - self.starts.get(r).copied().unwrap_or(0)).collect()
    }

    /// Row `r`'s keys and values in every layer, [1, ℓ, D] each for its ℓ positions (none
    /// when it holds none).
    pub(crate) fn row(&self, r: usize) -> Result<CachedRow> {
        let start = self.starts.get(r).copied().unwrap_or(0);
        let len = self.len - start;
        let mut layers = Vec::new();
        if len > 0 {
            for l in self.layers.iter().flatten() {
                let take = |t: &Tensor| t.narrow(0, r, 1)?.narrow(1, start, len); // [1, ℓ, D]
                layers.push((take(&l.k)?, take(&l.v)?));
            }
        }
        Ok(CachedRow { len, layers })
    }

    /// A ragged batch of `rows` (each from [`KvCache::row`] of a cache of this shape): every
    /// row right-aligned at the longest one's length, the shorter ones padded in front.
    pub(crate) fn from_rows(layers: usize, capacity: usize, rows: &[CachedRow]) -> Result<KvCache> {
        let len = rows.iter().map(|r| r.len).max().unwrap_or(0);
        let mut cache = KvCache::new(layers, capacity);
        cache.len = len;
        cache.starts = rows.iter().map(|r| len - r.len).collect();
        if len == 0 || layers == 0 {
            return Ok(cache);
        }
        let (k0, _) = &rows.iter().find(|r| r.len == len).expect("the longest row").layers[0];
        let (d, dtype, device) = (k0.dim(2)?, k0.dtype(), k0.device().clone());
        let place = |t: Option<&Tensor>, n: usize| -> Result<Tensor> {
            // [1, capacity, D]: padding, the row's n positions, room after them
            let mut parts = vec![Tensor::zeros((1, len - n, d), dtype, &device)?];
            parts.extend(t.cloned());
            parts.push(Tensor::zeros((1, capacity - len, d), dtype, &device)?);
            Ok(Tensor::cat(&parts, 1)?)
        };
        for (i, slot) in cache.layers.iter_mut().enumerate() {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for r in rows {
                let kv = r.layers.get(i);
                k.push(place(kv.map(|x| &x.0), r.len)?);
                v.push(place(kv.map(|x| &x.1), r.len)?);
            }
            *slot = Some(LayerCache { k: Tensor::cat(&k, 0)?, v: Tensor::cat(&v, 0)? }); // [N, capacity, D]
        }
        Ok(cache)
    }

    /// Layer `i`'s buffers for `n` sequences of width `d`: allocated at first use, and again
    /// for another shape while nothing is cached; another shape with positions cached is
    /// refused (continuing them would drop them silently).
    fn layer(&mut self, i: usize, n: usize, d: usize, dtype: DType, device: &Device) -> Result<LayerCache> {
        let (capacity, len) = (self.capacity, self.len);
        let slot = &mut self.layers[i];
        if let Some(l) = slot.as_ref().filter(|l| l.k.dims() != [n, capacity, d] || l.k.dtype() != dtype) {
            if len > 0 {
                return Err(Error::Input(format!(
                    "KV cache holds {:?} {:?}, the step needs [{n}, {capacity}, {d}] {dtype:?}: reset it first",
                    l.k.dims(),
                    l.k.dtype()
                )));
            }
            *slot = None;
        }
        if let Some(layer) = slot {
            return Ok(layer.clone());
        }
        let zeros = || Tensor::zeros((n, capacity, d), dtype, device);
        Ok(slot.insert(LayerCache { k: zeros()?, v: zeros()? }).clone())
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Every layer's key and value buffers [n, capacity, d] (see [`KvCache::layer`]): the
    /// CUDA decoding engine writes them in place, then records the length it reached with
    /// [`KvCache::set_len`].
    #[cfg(feature = "cuda")]
    pub(crate) fn buffers(&mut self, n: usize, d: usize, dtype: DType, device: &Device) -> Result<Vec<(Tensor, Tensor)>> {
        (0..self.layers.len()).map(|i| self.layer(i, n, d, dtype, device).map(|l| (l.k, l.v))).collect()
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

/// The options of every block of a model (the config's, shared by both transformers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockOptions {
    pub norm: NormKind,
    /// QK-norm ([`crate::ModelConfig::qk_norm`]).
    pub qk_norm: bool,
    /// The MLP's activation.
    pub mlp: Activation,
    /// The attention output and MLP down projections start at zero.
    pub zero_init_proj: bool,
}

impl BlockOptions {
    pub fn of(cfg: &crate::ModelConfig) -> Self {
        BlockOptions { norm: cfg.norm, qk_norm: cfg.qk_norm, mlp: cfg.mlp, zero_init_proj: cfg.zero_init_proj }
    }

    /// The initial std of the projections back into the residual stream (attention output,
    /// MLP down): 0 with `zero_init_proj`, else `std`.
    fn proj_std(&self, std: f64) -> f64 {
        if self.zero_init_proj {
            0.0
        } else {
            std
        }
    }
}

/// QK-norm: each head's query and key RMS-normalised over the head dimension, times a gain
/// of head_dim entries (one for q, one for k, shared by the heads). The fused norm op on the
/// q and k slices of the fused qkv, seen as [N, S·H, head_dim].
#[derive(Clone, Debug)]
pub struct QkNorm {
    pub(crate) q: Norm,
    pub(crate) k: Norm,
}

impl QkNorm {
    fn new(p: &mut Params, name: &str, head_dim: usize) -> Result<Self> {
        Ok(QkNorm {
            q: Norm::new(p, &format!("{name}.q_norm"), NormKind::RmsNorm, head_dim)?,
            k: Norm::new(p, &format!("{name}.k_norm"), NormKind::RmsNorm, head_dim)?,
        })
    }

    /// qkv [N, S, 3D] → the same with q and k normalised per head; v as it is.
    fn forward(&self, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        let (n, s, d) = (qkv.dim(0)?, qkv.dim(1)?, qkv.dim(2)? / 3);
        let q = self.q.fwd(&heads_of(qkv, 0, heads)?, None)?.1.reshape((n, s, d))?;
        let k = self.k.fwd(&heads_of(qkv, 1, heads)?, None)?.1.reshape((n, s, d))?;
        Ok(Tensor::cat(&[&q, &k, &qkv.narrow(2, 2 * d, d)?], 2)?) // [N, S, 3D]
    }

    /// d(qkv) from d(the normalised qkv) at the forward's input `qkv`, adding the gains'
    /// gradients to `grads`.
    fn backward(&self, qkv: &Tensor, dqkv: &Tensor, heads: usize, grads: &mut Grads) -> Result<Tensor> {
        let (n, s, d) = (qkv.dim(0)?, qkv.dim(1)?, qkv.dim(2)? / 3);
        let dq = self.q.bwd(&heads_of(qkv, 0, heads)?, &heads_of(dqkv, 0, heads)?, None, grads)?.reshape((n, s, d))?;
        let dk = self.k.bwd(&heads_of(qkv, 1, heads)?, &heads_of(dqkv, 1, heads)?, None, grads)?.reshape((n, s, d))?;
        Ok(Tensor::cat(&[&dq, &dk, &dqkv.narrow(2, 2 * d, d)?], 2)?) // [N, S, 3D]
    }
}

/// Part `i` (0 q, 1 k, 2 v) of a fused qkv [N, S, 3D], one row per head: [N, S·H, head_dim].
fn heads_of(qkv: &Tensor, i: usize, heads: usize) -> Result<Tensor> {
    let (n, s, d3) = qkv.dims3()?;
    let d = d3 / 3;
    Ok(qkv.narrow(2, i * d, d)?.contiguous()?.reshape((n, s * heads, d / heads))?)
}

/// Multi-head causal self-attention with fused qkv projection.
#[derive(Clone, Debug)]
pub struct Attention {
    pub(crate) qkv: Linear,
    /// QK-norm, when the config asks for it.
    pub(crate) qk_norm: Option<QkNorm>,
    pub(crate) proj: Linear,
    pub(crate) heads: usize,
    /// Sliding window (positions seen, itself included); None: full causal.
    pub(crate) window: Option<usize>,
}

impl Attention {
    fn new(p: &mut Params, name: &str, cfg: &TransformerConfig, opts: BlockOptions, std: f64) -> Result<Self> {
        let d = cfg.width;
        let qkv = Linear::new(p, &format!("{name}.qkv"), d, 3 * d, std)?;
        let qk_norm = if opts.qk_norm { Some(QkNorm::new(p, name, cfg.head_dim())?) } else { None };
        let proj = Linear::new(p, &format!("{name}.proj"), d, d, opts.proj_std(std))?;
        Ok(Attention { qkv, qk_norm, proj, heads: cfg.heads, window: cfg.window })
    }

    /// The fused qkv as attention reads it: with QK-norm, q and k normalised.
    fn normed(&self, qkv: &Tensor) -> Result<Tensor> {
        match &self.qk_norm {
            Some(qk) => qk.forward(qkv, self.heads),
            None => Ok(qkv.clone()),
        }
    }

    /// The S new positions of x [N, S, D] after the `len` in the layer's cache buffers, into
    /// which it writes their keys and values (normalised, with QK-norm); row n sees no key
    /// before slot `starts[n]`.
    fn forward_cached(&self, x: &Tensor, layer: &LayerCache, len: usize, starts: &[usize]) -> Result<Tensor> {
        let (_, s, d) = x.dims3()?;
        let qkv = self.normed(&self.qkv.forward(x)?)?; // [N, S, 3D]
        ops::attention::kv_append(&qkv, &layer.k, &layer.v, len)?;
        let (k, v) = (layer.k.narrow(1, 0, len + s)?, layer.v.narrow(1, 0, len + s)?); // [N, len + S, D]
        let y = ops::attention::cached_from(&qkv.narrow(2, 0, d)?, &k, &v, self.heads, self.window, starts)?; // [N, S, D]
        self.proj.forward(&y)
    }
}

/// The 4× feed-forward layer: exact (erf) GELU, or ReLU².
#[derive(Clone, Debug)]
pub struct Mlp {
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&ops::pointwise::activation(&self.up.forward(x)?, self.act)?)
    }
}

/// Dropout of one transformer's residual branches in one training pass: each block's
/// attention and MLP outputs, before they join the residual stream, are zeroed with
/// probability `p` and the rest scaled by 1/(1 − p) (`ops::pointwise::dropout`). Block i's two
/// masks are keyed by (key, i, branch), so the forward pass, its recomputation and the
/// backward pass draw the same ones; `row_offset` is the index of the first of the N
/// sequences in the whole batch, so shards and ranks draw the whole batch's masks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub key: u64,
    pub row_offset: usize,
}

impl Dropout {
    /// `x` of block `block`'s branch `branch` (0: attention, 1: MLP); also its own backward.
    fn apply(&self, x: &Tensor, block: usize, branch: u64) -> Result<Tensor> {
        Ok(ops::pointwise::dropout(x, self.p, ops::pointwise::mix64(self.key ^ ((block as u64) << 1 | branch)), self.row_offset)?)
    }
}

/// `x` through block `i`'s branch dropout, when there is one.
fn dropped(x: Tensor, drop: Option<(Dropout, usize)>, branch: u64) -> Result<Tensor> {
    match drop {
        Some((d, i)) => d.apply(&x, i, branch),
        None => Ok(x),
    }
}

/// Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).
#[derive(Clone, Debug)]
pub struct Block {
    pub(crate) attn_norm: Norm,
    pub(crate) attn: Attention,
    pub(crate) mlp_norm: Norm,
    pub(crate) mlp: Mlp,
}

/// What a block's backward pass reads of its forward pass.
pub(crate) struct BlockSaved {
    x: Tensor,
    h1: Tensor,
    qkv: Tensor,
    /// With QK-norm: qkv with q and k normalised (what attention read); else None.
    qkv_normed: Option<Tensor>,
    y: Tensor,
    lse: Option<Tensor>,
    x1: Tensor,
    h2: Tensor,
    u: Tensor,
    g: Tensor,
    /// The four weights in the activations' dtype: qkv, proj, up, down.
    w: [Tensor; 4],
    /// The branch dropout and this block's index.
    drop: Option<(Dropout, usize)>,
}

impl Block {
    fn new(p: &mut Params, name: &str, cfg: &TransformerConfig, opts: BlockOptions, std: f64) -> Result<Self> {
        let d = cfg.width;
        Ok(Block {
            attn_norm: Norm::new(p, &format!("{name}.attn_norm"), opts.norm, d)?,
            attn: Attention::new(p, &format!("{name}.attn"), cfg, opts, std)?,
            mlp_norm: Norm::new(p, &format!("{name}.mlp_norm"), opts.norm, d)?,
            mlp: Mlp {
                up: Linear::new(p, &format!("{name}.mlp.up"), d, 4 * d, std)?,
                down: Linear::new(p, &format!("{name}.mlp.down"), 4 * d, d, opts.proj_std(std))?,
                act: opts.mlp,
            },
        })
    }

    /// The block on x = base + delta (delta: the previous block's MLP output, added here in
    /// one pass with the norm). Returns the block's output as (x1, mlp output), which the next
    /// block or the final norm adds, and what the backward pass reads.
    fn forward(&self, base: &Tensor, delta: Option<&Tensor>, drop: Option<(Dropout, usize)>) -> Result<((Tensor, Tensor), BlockSaved)> {
        let (x, h1) = self.attn_norm.fwd(base, delta)?; // [N, S, D]
        let (w_qkv, qkv) = self.attn.qkv.fwd(&h1)?; // [N, S, 3D]
        let qkv_normed = self.attn.qk_norm.as_ref().map(|qk| qk.forward(&qkv, self.attn.heads)).transpose()?;
        let (y, lse) = ops::attention::forward(qkv_normed.as_ref().unwrap_or(&qkv), self.attn.heads, self.attn.window)?; // [N, S, D]
        let (w_proj, a) = self.attn.proj.fwd(&y)?;
        let (x1, h2) = self.mlp_norm.fwd(&x, Some(&dropped(a, drop, 0)?))?;
        let (w_up, u) = self.mlp.up.fwd(&h2)?; // [N, S, 4D]
        let g = ops::pointwise::activation(&u, self.mlp.act)?;
        let (w_down, m) = self.mlp.down.fwd(&g)?; // [N, S, D]
        let w = [w_qkv, w_proj, w_up, w_down];
        Ok(((x1.clone(), dropped(m, drop, 1)?), BlockSaved { x, h1, qkv, qkv_normed, y, lse, x1, h2, u, g, w, drop }))
    }

    fn backward(&self, s: BlockSaved, dout: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let [w_qkv, w_proj, w_up, w_down] = &s.w;
        // dropout is linear and its own backward: d(branch) = dropout(d(dropped branch))
        let dg = self.mlp.down.bwd(&s.g, w_down, &dropped(dout.clone(), s.drop, 1)?, grads)?;
        let du = ops::pointwise::activation_backward(&s.u, &dg, self.mlp.act)?;
        let dh2 = self.mlp.up.bwd(&s.h2, w_up, &du, grads)?;
        let dx1 = self.mlp_norm.bwd(&s.x1, &dh2, Some(dout), grads)?;
        let dy = self.attn.proj.bwd(&s.y, w_proj, &dropped(dx1.clone(), s.drop, 0)?, grads)?;
        let dqkv = ops::attention::backward(s.qkv_normed.as_ref().unwrap_or(&s.qkv), &s.y, s.lse.as_ref(), &dy, self.attn.heads, self.attn.window)?;
        let dqkv = match &self.attn.qk_norm {
            Some(qk) => qk.backward(&s.qkv, &dqkv, self.attn.heads, grads)?,
            None => dqkv,
        };
        let dh1 = self.attn.qkv.bwd(&s.h1, w_qkv, &dqkv, grads)?;
        self.attn_norm.bwd(&s.x, &dh1, Some(&dx1), grads)
    }

    /// One cached step on x = base + delta (as `forward`): returns (x1, mlp output).
    fn step(&self, base: &Tensor, delta: Option<&Tensor>, layer: &LayerCache, len: usize, starts: &[usize]) -> Result<(Tensor, Tensor)> {
        let (x, h1) = self.attn_norm.fwd(base, delta)?;
        let a = self.attn.forward_cached(&h1, layer, len, starts)?;
        let (x1, h2) = self.mlp_norm.fwd(&x, Some(&a))?;
        Ok((x1, self.mlp.forward(&h2)?))
    }
}

/// What a block's backward pass gets of its forward pass: everything it reads, or (with
/// recomputation) only the block's inputs, from which its forward runs again.
enum Kept {
    Saved(BlockSaved),
    Inputs(Tensor, Option<Tensor>, Option<(Dropout, usize)>),
}

/// What a transformer's backward pass reads of its forward pass.
pub(crate) struct TransformerSaved {
    blocks: Vec<Kept>,
    before_norm: Tensor,
}

/// A decoder-only causal transformer: blocks then a final norm.
#[derive(Clone, Debug)]
pub struct Transformer {
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Norm,
}

impl Transformer {
    pub fn new(p: &mut Params, name: &str, cfg: &TransformerConfig, opts: BlockOptions, std: f64) -> Result<Self> {
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(p, &format!("{name}.blocks.{i}"), cfg, opts, std))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer { blocks, norm: Norm::new(p, &format!("{name}.norm"), opts.norm, cfg.width)? })
    }

    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// x: [N, S, D] → [N, S, D], causal over S: the forward pass alone (evaluation and
    /// sampling), each block's activations freed as soon as the next block has its input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (mut base, mut delta) = (x.clone(), None);
        for block in &self.blocks {
            let ((b, d), _) = block.forward(&base, delta.as_ref(), None)?;
            (base, delta) = (b, Some(d));
        }
        Ok(self.norm.fwd(&base, delta.as_ref())?.1)
    }

    /// The training pass's forward, keeping what the backward pass reads. With `recompute`
    /// each block keeps only its inputs (2 of the ~16 activations of width D per position it
    /// would keep) and the backward pass runs the block's forward again: about a third more
    /// compute for a fraction of the memory (activation checkpointing).
    pub(crate) fn forward_saved(&self, x: &Tensor, recompute: bool, drop: Option<Dropout>) -> Result<(Tensor, TransformerSaved)> {
        let (mut base, mut delta) = (x.clone(), None);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let drop = drop.map(|d| (d, i));
            let ((b, d), saved) = block.forward(&base, delta.as_ref(), drop)?;
            blocks.push(if recompute { Kept::Inputs(base, delta, drop) } else { Kept::Saved(saved) });
            (base, delta) = (b, Some(d));
        }
        let (x, out) = self.norm.fwd(&base, delta.as_ref())?;
        Ok((out, TransformerSaved { blocks, before_norm: x }))
    }

    /// dx from d(output), adding every parameter's gradient to `grads`; frees each block's
    /// activations once used.
    pub(crate) fn backward(&self, mut saved: TransformerSaved, dout: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let mut dx = self.norm.bwd(&saved.before_norm, dout, None, grads)?;
        for block in self.blocks.iter().rev() {
            let s = match saved.blocks.pop().expect("one saved state per block") {
                Kept::Saved(s) => s,
                Kept::Inputs(base, delta, drop) => block.forward(&base, delta.as_ref(), drop)?.1,
            };
            dx = block.backward(s, &dx, grads)?;
        }
        Ok(dx)
    }

    /// Like `forward`, for S new positions after those in `cache`, which it extends.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (n, s, d) = x.dims3()?;
        if cache.len + s > cache.capacity {
            return Err(Error::Input(format!("KV cache: {} + {s} positions exceed its {}", cache.len, cache.capacity)));
        }
        let (mut base, mut delta) = (x.clone(), None);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.layer(i, n, d, x.dtype(), x.device())?;
            let (b, dd) = block.step(&base, delta.as_ref(), &layer, cache.len, &cache.starts)?;
            (base, delta) = (b, Some(dd));
        }
        let out = self.norm.fwd(&base, delta.as_ref())?.1;
        cache.len += s; // only once every layer has succeeded
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Kept;
    use crate::{DType, Device, MegaByte, ModelConfig, Tensor};

    /// With recomputation the forward pass keeps only each block's inputs; without, all it
    /// reads. (tests/it/gradients.rs checks that both give the same gradients.)
    #[test]
    fn recompute_keeps_only_block_inputs() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let (model, _) = MegaByte::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((2, 4, cfg.global.width), DType::F32, &Device::Cpu).unwrap();
        for recompute in [false, true] {
            let (_, saved) = model.global.forward_saved(&x, recompute, None).unwrap();
            assert_eq!(saved.blocks.len(), cfg.global.layers);
            for kept in &saved.blocks {
                assert_eq!(matches!(kept, Kept::Inputs(..)), recompute, "recompute = {recompute}");
            }
        }
    }
}
