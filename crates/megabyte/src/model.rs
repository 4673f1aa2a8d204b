//! MEGABYTE (Yu et al., 2023, arXiv 2305.07185, section 2), in the paper's order:
//! patch embedder → global model → global-to-local → local model → head.
//!
//! Letters: B batch, T bytes per sequence, P patch size, K = T/P patches, D_G per-byte global
//! width (the global model is P·D_G wide), D_L local width, V = 256 byte values.
//!
//! Invariant protected by the two shifts below: the logits for byte t depend only on bytes < t.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, V};
use crate::error::{Error, Result};
use crate::grad::{sum_rows, Grads};
use crate::nn::{BlockOptions, Dropout, Init, KvCache, Linear, Params, Transformer};
use crate::ops::{self, accumulation_dtype};

/// §2.2.1: byte embeddings plus learned byte positions, concatenated into patches.
#[derive(Clone, Debug)]
pub struct PatchEmbedder {
    pub(crate) byte_embed: Tensor, // E_global_embed [V, D_G]
    pub(crate) pos_embed: Tensor,  // E_pos [T, D_G]
    pub(crate) global_pad: Tensor, // E_global_pad [P·D_G]
    /// Hash n-gram table [G·buckets, D_G] (`hash_ngrams`).
    pub(crate) hash_embed: Option<Tensor>,
    patch_size: usize,
}

impl PatchEmbedder {
    /// bytes [B, n·P] at positions start..start+n·P → patch embeddings [B, n, P·D_G] in `act`;
    /// `ngrams`: the bytes' hash n-gram rows [B, n·P, G] (with `hash_ngrams`).
    fn forward(&self, bytes: &Tensor, ngrams: Option<&Tensor>, start: usize, act: DType) -> Result<Tensor> {
        let (b, len) = bytes.dims2()?;
        let dg = self.byte_embed.dim(1)?;
        let h = with_ngrams(embed(&self.byte_embed, bytes)?, self.hash_embed.as_ref(), ngrams)?; // [B, len, D_G]
        let h = h.broadcast_add(&self.pos_embed.narrow(0, start, len)?.detach())?.to_dtype(act)?;
        Ok(h.reshape((b, len / self.patch_size, self.patch_size * dg))?) // [B, n, P·D_G]
    }

    /// One patch per row, bytes [B, P], row r's at positions starts[r]..starts[r] + P →
    /// patch embeddings [B, 1, P·D_G] in `act` (the same values as [`PatchEmbedder::forward`]
    /// of each row alone); `ngrams`: the bytes' hash n-gram rows [B, P, G].
    fn forward_rows(&self, bytes: &Tensor, ngrams: Option<&Tensor>, starts: &[usize], act: DType) -> Result<Tensor> {
        let (b, p) = bytes.dims2()?;
        let positions: Vec<u32> = starts.iter().flat_map(|&s| (s..s + p).map(|t| t as u32)).collect();
        let positions = Tensor::from_vec(positions, (b, p), bytes.device())?;
        let h = with_ngrams(embed(&self.byte_embed, bytes)?, self.hash_embed.as_ref(), ngrams)?; // [B, P, D_G]
        let h = (h + embed(&self.pos_embed.detach(), &positions)?)?.to_dtype(act)?;
        Ok(h.reshape((b, 1, p * self.byte_embed.dim(1)?))?) // [B, 1, P·D_G]
    }
}

/// The global model's input for patch k is patch k−1's embedding; patch 0 gets the trainable
/// pad and the last patch's bytes never enter. Protects: the global state of patch k sees only
/// bytes < k·P. h: [B, K, P·D_G] → [B, K, P·D_G].
pub fn shift_one_patch(h: &Tensor, global_pad: &Tensor) -> Result<Tensor> {
    let (b, k, w) = h.dims3()?;
    let pad = global_pad.detach().to_dtype(h.dtype())?.reshape((1, 1, w))?.broadcast_as((b, 1, w))?; // [B, 1, P·D_G]
    Ok(Tensor::cat(&[&pad, &h.narrow(1, 0, k - 1)?], 1)?)
}

/// The local input at position p of a patch is the embedding of byte p−1 of the same patch;
/// position 0 gets the trainable local pad. Protects: position p sees only bytes < p of its
/// patch. e: [N, P, D_L] → [N, P, D_L].
pub fn shift_one_byte(e: &Tensor, local_pad: &Tensor) -> Result<Tensor> {
    let (n, p, dl) = e.dims3()?;
    let pad = local_pad.detach().to_dtype(e.dtype())?.reshape((1, 1, dl))?.broadcast_as((n, 1, dl))?; // [N, 1, D_L]
    Ok(Tensor::cat(&[&pad, &e.narrow(1, 0, p - 1)?], 1)?)
}

/// §2.2.3: the local model's own byte embedding, position table and pad.
#[derive(Clone, Debug)]
pub struct LocalEmbedder {
    pub(crate) byte_embed: Tensor, // E_local_embed [V, D_L], also the tied head
    pub(crate) pos_embed: Tensor,  // [P, D_L], or [T, D_L] with cross-patch attention
    pub(crate) local_pad: Tensor,  // E_local_pad [D_L]
    /// Hash n-gram table [G·buckets, D_L] (`hash_ngrams`).
    pub(crate) hash_embed: Option<Tensor>,
}

impl LocalEmbedder {
    /// bytes [N, S] (one patch, or with cross-patch attention a whole window) → local inputs
    /// [N, S, D_L] in `act`: the previous byte's embedding (with its hash n-grams' rows
    /// `ngrams` [N, S, G], from the whole row) or the pad at position 0, plus the position in
    /// the local sequence.
    fn forward(&self, bytes: &Tensor, ngrams: Option<&Tensor>, act: DType) -> Result<Tensor> {
        let s = bytes.dim(1)?;
        let e = with_ngrams(embed(&self.byte_embed, bytes)?, self.hash_embed.as_ref(), ngrams)?; // [N, S, D_L]
        let e = shift_one_byte(&e, &self.local_pad)?;
        Ok(e.broadcast_add(&self.pos_embed.narrow(0, 0, s)?.detach())?.to_dtype(act)?)
    }
}

/// The whole model. `forward`-style methods take `&self`; generation state lives in the
/// caches the caller holds.
#[derive(Clone, Debug)]
pub struct MegaByte {
    cfg: ModelConfig,
    pub(crate) patch_embedder: PatchEmbedder,
    pub(crate) global: Transformer,
    pub(crate) global_to_local: Linear, // w_GL [D_L, D_G]
    pub(crate) local_embedder: LocalEmbedder,
    pub(crate) local: Transformer,
    head: Option<Linear>, // untied head [V, D_L]; None = tied to E_local_embed
    /// The activations' dtype: the parameters' (f32) or bf16 (mixed precision: matmuls in
    /// bf16 from the f32 master weights, norm and softmax statistics in f32).
    act: DType,
}

/// How one training pass runs. Not state of the model: every shard and micro-batch of a step
/// passes its own.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainPass {
    /// Branch dropout, keyed by the step and micro-batch, with the index of this pass's first
    /// row in the global batch (`row_offset`, in rows [B, T']). The global model and the local
    /// one (whose N sequences are B·K patches, or B windows with cross-patch attention) each
    /// derive a key of their own and the offset in their own rows.
    pub dropout: Option<Dropout>,
    /// Keep only each block's inputs and recompute the rest in the backward pass (activation
    /// checkpointing): the same gradients, about a third more compute, a fraction of the
    /// activation memory, for sequences whose activations do not fit.
    pub recompute: bool,
}

impl TrainPass {
    /// The dropout of the global model, or (`local` with N sequences for B rows) the local one.
    fn dropout(&self, local: bool, n: usize, b: usize) -> Option<Dropout> {
        self.dropout.map(|d| Dropout { p: d.p, key: ops::pointwise::mix64(d.key ^ (1 + local as u64)), row_offset: d.row_offset * (n / b) })
    }
}

impl MegaByte {
    /// Creates every parameter in `params` (random or to be loaded) and the model over them.
    pub fn new(cfg: &ModelConfig, params: &mut Params) -> Result<Self> {
        cfg.validate()?;
        let (p, t, dg, dl, std) = (cfg.patch_size, cfg.context, cfg.d_global(), cfg.local.width, cfg.init_std);
        let n = Init::TruncNormal(std);
        let pe = Init::TruncNormal(cfg.patch_embed_std.unwrap_or(std));
        let mut patch_embedder = PatchEmbedder {
            byte_embed: params.get("patch_embedder.byte_embed.weight", &[V, dg], pe)?,
            pos_embed: params.get("patch_embedder.pos_embed.weight", &[t, dg], pe)?,
            global_pad: params.get("patch_embedder.global_pad", &[p * dg], pe)?,
            hash_embed: None,
            patch_size: p,
        };
        let blocks = BlockOptions::of(cfg);
        let global = Transformer::new(params, "global", &cfg.global, blocks, std)?;
        // w_GL reads the global model's normed output (unit scale per element): std/√D_G gives
        // its projection the scale of the local byte embedding it is added to. Zero (drawn
        // all the same, so every other parameter keeps its value) with `zero_w_gl`.
        let w_gl_std = if cfg.zero_w_gl { 0.0 } else { std / (dg as f64).sqrt() };
        let global_to_local = Linear::new(params, "global_to_local", dg, dl, w_gl_std)?;
        let mut local_embedder = LocalEmbedder {
            byte_embed: params.get("local_embedder.byte_embed.weight", &[V, dl], n)?,
            pos_embed: params.get("local_embedder.pos_embed.weight", &[cfg.local_positions(), dl], n)?,
            local_pad: params.get("local_embedder.local_pad", &[dl], n)?,
            hash_embed: None,
        };
        let local = Transformer::new(params, "local", &cfg.local, blocks, std)?;
        let head = if cfg.tied_head { None } else { Some(Linear::new(params, "head", dl, V, std)?) };
        // Drawn last, so that every other parameter keeps the value it has without them.
        if let Some(h) = &cfg.hash_ngrams {
            patch_embedder.hash_embed = Some(params.get("patch_embedder.hash_embed.weight", &[h.rows(), dg], pe)?);
            local_embedder.hash_embed = Some(params.get("local_embedder.hash_embed.weight", &[h.rows(), dl], n)?);
        }
        let act = params.dtype();
        Ok(MegaByte { cfg: cfg.clone(), patch_embedder, global, global_to_local, local_embedder, local, head, act })
    }

    /// A freshly initialised model and its parameters.
    pub fn init(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<(Self, Params)> {
        let mut params = Params::random(seed, dtype, device);
        let model = MegaByte::new(cfg, &mut params)?;
        Ok((model, params))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The same model computing its activations in `dtype` (bf16 for mixed precision); the
    /// parameters keep theirs.
    pub fn with_activations(mut self, dtype: DType) -> Self {
        self.act = dtype;
        self
    }

    pub fn activation_dtype(&self) -> DType {
        self.act
    }

    /// A copy whose parameters (and activations) are `dtype`: bf16 for sampling on CUDA, where
    /// casting f32 weights at every decoding step would cost more than the step.
    pub fn converted(&self, params: &Params, dtype: DType) -> Result<(MegaByte, Params)> {
        let mut copy = Params::for_loading(dtype, params.device());
        let model = MegaByte::new(&self.cfg, &mut copy)?;
        let tensors: std::collections::HashMap<String, Tensor> =
            params.vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        copy.assign(&tensors).map_err(Error::Config)?;
        Ok((model.with_activations(dtype), copy))
    }

    /// Logits for every byte: bytes [B, T'] (T' ≤ T, a multiple of P) → [B, T', V] (in the
    /// activations' dtype).
    /// `logits[:, t]` is the prediction of byte t from bytes < t.
    pub fn logits(&self, bytes: &Tensor) -> Result<Tensor> {
        let (b, t) = self.check_input(bytes)?;
        let ngrams = self.ngram_rows(bytes)?; // [B, T', G]
        let h = self.patch_embedder.forward(bytes, ngrams.as_ref(), 0, self.act)?; // [B, K, P·D_G]
        let h = shift_one_patch(&h, &self.patch_embedder.global_pad)?; // [B, K, P·D_G]
        let h = self.global.forward(&h)?; // [B, K, P·D_G]
        let context = self.global_to_local(&h)?; // [B·K, P, D_L]
        let local_bytes = self.local_sequences(bytes)?; // [N, S]: patches, or whole windows
        let local_ngrams = self.local_ngram_rows(ngrams.as_ref(), &local_bytes)?; // [N, S, G]
        let local_in = self.local_embedder.forward(&local_bytes, local_ngrams.as_ref(), self.act)?; // [N, S, D_L]
        let h = self.local.forward(&(context.reshape(local_in.shape())? + local_in)?)?; // [N, S, D_L]
        let logits = self.head(&h)?; // [N, S, V]
        Ok(logits.reshape((b, t, V))?)
    }

    /// Cross-entropy in nats of every byte given the bytes before it: [B, T'] → [B, T'].
    pub fn byte_losses(&self, bytes: &Tensor) -> Result<Tensor> {
        let (b, t) = bytes.dims2()?;
        let logits = self.logits(bytes)?.reshape((b * t, V))?; // [B·T', V]
        // Statistics in f32 (or f64) whatever the logits' dtype.
        let losses = ops::cross_entropy::forward(&logits, &bytes.flatten_all()?)?;
        Ok(losses.to_dtype(accumulation_dtype(losses.dtype()))?.reshape((b, t))?)
    }

    /// Mean cross-entropy (nats per byte) over all bytes of the batch: the training loss.
    pub fn loss(&self, bytes: &Tensor) -> Result<Tensor> {
        Ok(self.byte_losses(bytes)?.mean_all()?)
    }

    /// Σ_t w_t·loss_t over the batch (a scalar tensor, f32 or the parameters' dtype) for
    /// per-byte weights w [B, T'], and its gradient for every parameter, by the explicit
    /// backward pass. The weights say what the step's loss is: uniform 1/(B·T') for the mean
    /// over plain windows; with document isolation 0 on the padding after a document's end and
    /// 1/N on the N real bytes of a step.
    pub fn loss_and_grads(&self, bytes: &Tensor, weights: &Tensor, pass: TrainPass) -> Result<(Tensor, Grads)> {
        let (b, t) = self.check_input(bytes)?;
        if weights.dims() != [b, t] {
            return Err(Error::Input(format!("byte weights must be [B, T'] = [{b}, {t}], got {:?}", weights.dims())));
        }
        let dtype = accumulation_dtype(self.act);
        let w = weights.flatten_all()?.to_dtype(dtype)?; // [B·T']
        let (losses, grads) = self.byte_losses_and_grads(bytes, w.clone(), pass)?;
        let w = w.to_dtype(losses.dtype())?;
        Ok(((losses * w)?.sum_all()?, grads))
    }

    /// Every byte's loss [B·T'] and the gradients of Σ_t dloss_t·loss_t (dloss [B·T'] in the
    /// losses' dtype), by the explicit backward pass.
    fn byte_losses_and_grads(&self, bytes: &Tensor, dloss: Tensor, pass: TrainPass) -> Result<(Tensor, Grads)> {
        let (b, t) = self.check_input(bytes)?;
        let (p, k, dg, dl) = (self.cfg.patch_size, t / self.cfg.patch_size, self.cfg.d_global(), self.cfg.local.width);
        let pe = &self.patch_embedder;
        let le = &self.local_embedder;
        let head = self.head_linear();
        // Forward, keeping what the backward pass reads.
        let ngrams = self.ngram_rows(bytes)?; // [B, T', G]
        let h0 = pe.forward(bytes, ngrams.as_ref(), 0, self.act)?; // [B, K, P·D_G]
        let hin = shift_one_patch(&h0, &pe.global_pad)?;
        let (hg, global_saved) = self.global.forward_saved(&hin, pass.recompute, pass.dropout(false, b, b))?;
        let hg = hg.reshape((b * k, p, dg))?; // [B·K, P, D_G]
        let (w_gl, context) = self.global_to_local.fwd(&hg)?; // [B·K, P, D_L]
        let local_bytes = self.local_sequences(bytes)?; // [N, S]
        let local_ngrams = self.local_ngram_rows(ngrams.as_ref(), &local_bytes)?; // [N, S, G]
        let local_in = le.forward(&local_bytes, local_ngrams.as_ref(), self.act)?; // [N, S, D_L]
        let local_drop = pass.dropout(true, local_bytes.dim(0)?, b);
        let (hl, local_saved) = self.local.forward_saved(&(context.reshape(local_in.shape())? + local_in)?, pass.recompute, local_drop)?;
        let (n, s) = local_bytes.dims2()?;
        let (w_head, logits) = head.fwd(&hl)?;
        let logits = logits.reshape((b * t, V))?; // [B·T, V]
        let targets = bytes.flatten_all()?;
        let losses = ops::cross_entropy::forward(&logits, &targets)?; // [B·T]
        let losses = losses.to_dtype(accumulation_dtype(losses.dtype()))?;

        // Backward.
        let mut grads = Grads::new();
        let dloss = dloss.to_dtype(losses.dtype())?;
        let dlogits = ops::cross_entropy::backward(&logits, &targets, &losses, &dloss)?;
        drop(logits);
        let dhl = head.bwd(&hl, &w_head, &dlogits.reshape((n, s, V))?, &mut grads)?;
        let dx = self.local.backward(local_saved, &dhl, &mut grads)?; // [N, S, D_L]
        // x = context + (shift_one_byte(E_local[bytes]) + local positions), shifted along S
        let pdt = le.byte_embed.dtype();
        let dlocal = dx.to_dtype(pdt)?;
        let dpos = sum_rows(&dlocal.reshape((n, s * dl))?)?.reshape((s, dl))?; // [S, D_L]
        grads.add(&le.pos_embed, pad_rows(dpos, le.pos_embed.dim(0)?)?)?;
        grads.add(&le.local_pad, sum_rows(&dlocal.narrow(1, 0, 1)?.reshape((n, dl))?)?)?;
        let dembed = shift_back(&dlocal)?; // byte j's embedding fed position j + 1
        grads.add(&le.byte_embed, ops::embedding::backward(&le.byte_embed, &local_bytes, &dembed)?)?;
        if let (Some(table), Some(ids)) = (&le.hash_embed, &local_ngrams) {
            grads.add(table, ngram_backward(table, ids, &dembed)?)?;
        }
        let dhg = self.global_to_local.bwd(&hg, &w_gl, &dx.reshape((b * k, p, dl))?, &mut grads)?;
        let dhin = self.global.backward(global_saved, &dhg.reshape((b, k, p * dg))?, &mut grads)?;
        // hin = shift_one_patch(E_global[bytes] + positions)
        let dhin = dhin.to_dtype(pdt)?;
        grads.add(&pe.global_pad, sum_rows(&dhin.narrow(1, 0, 1)?.reshape((b, p * dg))?)?)?;
        let dh0 = shift_back(&dhin)?.reshape((b, t, dg))?; // [B, T, D_G]
        let dpos = pad_rows(sum_rows(&dh0.reshape((b, t * dg))?)?.reshape((t, dg))?, self.cfg.context)?;
        grads.add(&pe.pos_embed, dpos)?;
        grads.add(&pe.byte_embed, ops::embedding::backward(&pe.byte_embed, bytes, &dh0)?)?;
        if let (Some(table), Some(ids)) = (&pe.hash_embed, &ngrams) {
            grads.add(table, ngram_backward(table, ids, &dh0)?)?;
        }
        Ok((losses, grads))
    }

    /// The hash n-gram rows [B, T', G] of bytes [B, T'] (`hash_ngrams`; None without), each
    /// row hashed as it alone shows its bytes. Computed on the host.
    fn ngram_rows(&self, bytes: &Tensor) -> Result<Option<Tensor>> {
        if self.cfg.hash_ngrams.is_none() {
            return Ok(None);
        }
        let t = bytes.dim(1)?;
        let rows: Vec<Vec<u8>> = bytes.to_vec2::<u32>()?.into_iter().map(|r| r.into_iter().map(|x| x as u8).collect()).collect();
        let window: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
        self.ngram_ids(&window, 0, t, bytes.device())
    }

    /// [`MegaByte::ngram_rows`] laid out as the local sequences `local_bytes` [N, S]: [N, S, G].
    fn local_ngram_rows(&self, ngrams: Option<&Tensor>, local_bytes: &Tensor) -> Result<Option<Tensor>> {
        let (n, s) = local_bytes.dims2()?;
        ngrams.map(|ids| Ok(ids.reshape((n, s, ids.dim(2)?))?)).transpose()
    }

    /// The hash n-gram rows [B, len, G] of the bytes at positions `from..from + len` of each
    /// row of `window` (a context window's bytes from its start, at least `from + len` of
    /// them), as the full forward pass over that window computes them; None for a model
    /// without hash n-gram embeddings. What the cached steps take as `ngrams`.
    pub fn ngram_ids(&self, window: &[&[u8]], from: usize, len: usize, device: &Device) -> Result<Option<Tensor>> {
        self.ngram_ids_rows(window, &vec![from; window.len()], len, device)
    }

    /// The cached steps' `ngrams` must be given exactly for a model with hash n-gram
    /// embeddings ([`MegaByte::ngram_ids`]): without them its steps would decode another model.
    fn check_ngrams(&self, ngrams: Option<&Tensor>, what: &str) -> Result<()> {
        match (self.cfg.hash_ngrams.is_some(), ngrams.is_some()) {
            (true, false) => Err(Error::Input(format!(
                "{what}: this model has hash n-gram embeddings (hash_ngrams): give the bytes' rows (MegaByte::ngram_ids)"
            ))),
            (false, true) => Err(Error::Input(format!("{what}: hash n-gram rows given to a model without hash_ngrams"))),
            _ => Ok(()),
        }
    }

    /// [`MegaByte::ngram_ids`] of one position range per row (rows at their own lengths, as
    /// in continuous batching): row r's bytes at `from[r]..from[r] + len` of `window[r]`.
    pub(crate) fn ngram_ids_rows(&self, window: &[&[u8]], from: &[usize], len: usize, device: &Device) -> Result<Option<Tensor>> {
        let Some(h) = &self.cfg.hash_ngrams else { return Ok(None) };
        if window.len() != from.len() || window.iter().zip(from).any(|(w, &f)| w.len() < f + len) {
            return Err(Error::Input(format!("ngram_ids: {len} positions past a row of the window")));
        }
        let g = h.sizes.len();
        let ids: Vec<u32> = window
            .iter()
            .zip(from)
            .flat_map(|(w, &f)| (f..f + len).flat_map(move |t| (0..g).map(move |i| h.row(i, w, t) as u32)))
            .collect();
        Ok(Some(Tensor::from_vec(ids, (window.len(), len, g), device)?))
    }

    /// The local model's sequences: bytes [B, T'] as patches [B·K, P], or (cross-patch
    /// attention) as they are, one sequence per window.
    fn local_sequences(&self, bytes: &Tensor) -> Result<Tensor> {
        if self.cfg.cross_patch {
            return Ok(bytes.clone());
        }
        let (b, t) = bytes.dims2()?;
        let p = self.cfg.patch_size;
        Ok(bytes.reshape((b * t / p, p))?)
    }

    /// §2.2.2: every D_G slice of a global output projected by the shared w_GL.
    /// [B, K, P·D_G] → [B·K, P, D_L].
    fn global_to_local(&self, h: &Tensor) -> Result<Tensor> {
        let (b, k, _) = h.dims3()?;
        let h = h.reshape((b * k, self.cfg.patch_size, self.cfg.d_global()))?; // [B·K, P, D_G]
        self.global_to_local.forward(&h)
    }

    /// h [.., D_L] → logits [.., V], through the tied or untied head.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.head_linear().forward(h)
    }

    /// The output projection: the untied head, or E_local_embed (tied).
    pub(crate) fn head_linear(&self) -> Linear {
        match &self.head {
            Some(head) => head.clone(),
            None => Linear { weight: self.local_embedder.byte_embed.clone() },
        }
    }

    fn check_input(&self, bytes: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = bytes.dims2()?;
        let p = self.cfg.patch_size;
        if t == 0 || t % p != 0 || t > self.cfg.context || bytes.dtype() != DType::U32 || b == 0 {
            return Err(Error::Input(format!(
                "model input must be u32 bytes [B, T'] with 0 < T' ≤ {} and T' a multiple of P = {p}; got {:?} {:?}",
                self.cfg.context,
                bytes.dims(),
                bytes.dtype()
            )));
        }
        Ok((b, t))
    }

    // ---- Cached decoding (paper section 3): the global model steps once per patch, the local
    // ---- model once per byte. The caller owns both caches.

    /// An empty global cache.
    pub fn global_cache(&self) -> KvCache {
        KvCache::new(self.global.layers(), self.cfg.patches())
    }

    /// An empty local cache: reset it at every patch boundary, or (cross-patch attention)
    /// only when the window is prefilled again.
    pub fn local_cache(&self) -> KvCache {
        KvCache::new(self.local.layers(), self.cfg.local_positions())
    }

    /// Feeds completed patches to the global model and returns the local contexts of the
    /// patch that follows them, [B, P, D_L].
    ///
    /// With an empty cache, `patches` are the first patches of the sequence (`None` for none
    /// yet) and the pad is fed first. Otherwise they continue where the cache stopped.
    /// patches: [B, m·P] u32; `batch` is B (needed when only the pad is fed). `ngrams`: the
    /// patches' hash n-gram rows [B, m·P, G] (models with `hash_ngrams` only; see
    /// [`MegaByte::ngram_ids`]).
    pub fn global_step(&self, batch: usize, patches: Option<&Tensor>, ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.global_forward(batch, patches, ngrams, cache)?; // [B, s, P·D_G]
        let s = h.dim(1)?;
        self.global_to_local(&h.narrow(1, s - 1, 1)?) // [B, P, D_L]
    }

    /// Like [`MegaByte::global_step`], but the local contexts of every patch fed (the pad
    /// included): [B, s·P, D_L] for s new global positions. For cross-patch prefill.
    pub fn global_contexts(&self, batch: usize, patches: Option<&Tensor>, ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.global_forward(batch, patches, ngrams, cache)?; // [B, s, P·D_G]
        let (b, s, _) = h.dims3()?;
        Ok(self.global_to_local(&h)?.reshape((b, s * self.cfg.patch_size, self.cfg.local.width))?)
    }

    /// The global model's outputs [B, s, P·D_G] for the s positions `patches` (and the pad,
    /// with an empty cache) add to `cache`.
    fn global_forward(&self, batch: usize, patches: Option<&Tensor>, ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        match patches {
            Some(_) => self.check_ngrams(ngrams, "global_step")?,
            None if ngrams.is_some() => return Err(Error::Input("global_step: hash n-gram rows given without patches".into())),
            None => {}
        }
        let p = self.cfg.patch_size;
        let start_pos = cache.len(); // global positions already cached
        let input = match patches {
            Some(bytes) => {
                let (_, len) = bytes.dims2()?;
                // byte position of the first given byte: patch (start_pos − 1), or 0 with the pad
                let first_byte = start_pos.saturating_sub(1) * p;
                if len == 0 || len % p != 0 || first_byte + len + p > self.cfg.context + p {
                    return Err(Error::Input(format!(
                        "global_step: {len} bytes after {first_byte} do not fit the context of {} bytes",
                        self.cfg.context
                    )));
                }
                let h = self.patch_embedder.forward(bytes, ngrams, first_byte, self.act)?; // [B, m, P·D_G]
                if start_pos == 0 {
                    let (b, _, w) = h.dims3()?;
                    let pad = self.patch_embedder.global_pad.to_dtype(self.act)?.reshape((1, 1, w))?.broadcast_as((b, 1, w))?;
                    Tensor::cat(&[&pad, &h], 1)? // [B, m+1, P·D_G]
                } else {
                    h
                }
            }
            None if start_pos == 0 => {
                let w = self.cfg.global.width;
                self.patch_embedder.global_pad.to_dtype(self.act)?.reshape((1, 1, w))?.broadcast_as((batch, 1, w))? // [B, 1, P·D_G]
            }
            None => return Err(Error::Input("global_step: no new patch given".into())),
        };
        if cache.len() + input.dim(1)? > self.cfg.patches() {
            return Err(Error::Input(format!(
                "global_step: past the context of {} bytes; start a new window",
                self.cfg.context
            )));
        }
        self.global.forward_cached(&input, cache) // [B, s, P·D_G]
    }

    /// One local position: `context` [B, D_L] is the global context of this position,
    /// `prev` [B] the previous byte (`None` at the local sequence's first position, which
    /// gets the pad). The position in the local sequence (the patch, or with cross-patch
    /// attention the window) is the local cache's length. `prev_ngrams`: the previous byte's
    /// hash n-gram rows [B, G] (with `hash_ngrams` and a previous byte). Returns logits [B, V].
    pub fn local_step(&self, context: &Tensor, prev: Option<&Tensor>, prev_ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        if prev.is_some() {
            self.check_ngrams(prev_ngrams, "local_step")?;
        } else if prev_ngrams.is_some() {
            return Err(Error::Input("local_step: hash n-gram rows given without a previous byte".into()));
        }
        let pos = cache.len();
        if pos >= self.cfg.local_positions() {
            return Err(Error::Input("local_step: the local sequence is complete; reset the local cache".into()));
        }
        let b = context.dim(0)?;
        let dl = self.cfg.local.width;
        let e = match prev {
            Some(prev) => with_ngrams(embed(&self.local_embedder.byte_embed, prev)?, self.local_embedder.hash_embed.as_ref(), prev_ngrams)?.to_dtype(self.act)?, // [B, D_L]
            None => self.local_embedder.local_pad.to_dtype(self.act)?.reshape((1, dl))?.broadcast_as((b, dl))?,
        };
        let e = e.broadcast_add(&self.local_embedder.pos_embed.narrow(0, pos, 1)?.to_dtype(self.act)?)?;
        let x = (context + e)?; // [B, D_L]
        let h = self.local.forward_cached(&x.reshape((b, 1, dl))?, cache)?; // [B, 1, D_L]
        Ok(self.head(&h.squeeze(1)?)?) // [B, V]
    }

    /// [`MegaByte::global_step`] for a ragged batch (`cache` from `KvCache::from_rows`, every
    /// row past its pad): one completed patch per row, patches [B, P], each continuing its own
    /// row at its own byte position. Returns the next patch's local contexts [B, P, D_L].
    /// `ngrams`: the patches' hash n-gram rows [B, P, G] (with `hash_ngrams`).
    pub(crate) fn global_step_rows(&self, patches: &Tensor, ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        self.check_ngrams(ngrams, "global_step_rows")?;
        let (b, p) = patches.dims2()?;
        // Row r holds the pad and the patches before this one, which starts at byte (ℓ_r − 1)·P.
        let lens = cache.row_lens(b);
        if p != self.cfg.patch_size || lens.iter().any(|&l| l == 0 || l >= self.cfg.patches()) {
            return Err(Error::Input(format!("global_step_rows: one patch per row after the pad, within the context; rows hold {lens:?}")));
        }
        let starts: Vec<usize> = lens.iter().map(|&l| (l - 1) * p).collect();
        let input = self.patch_embedder.forward_rows(patches, ngrams, &starts, self.act)?; // [B, 1, P·D_G]
        let h = self.global.forward_cached(&input, cache)?; // [B, 1, P·D_G]
        self.global_to_local(&h)
    }

    /// [`MegaByte::local_step`] for a ragged batch: row r's previous byte is `prev[r]`
    /// (`None` at its local sequence's first position: the pad), its position the number of
    /// positions its row of `cache` holds. context: [B, D_L] → logits [B, V].
    /// `prev_ngrams`: the previous bytes' hash n-gram rows [B, G] (with `hash_ngrams`; any
    /// valid rows where `prev` is `None`).
    pub(crate) fn local_step_rows(&self, context: &Tensor, prev: &[Option<u8>], prev_ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<Tensor> {
        self.check_ngrams(prev_ngrams, "local_step_rows")?;
        let (b, dl) = context.dims2()?;
        let positions = cache.row_lens(b);
        if prev.len() != b || positions.iter().any(|&pos| pos >= self.cfg.local_positions()) {
            return Err(Error::Input("local_step_rows: one previous byte per row, within the local sequence".into()));
        }
        let device = context.device();
        let ids: Vec<u32> = prev.iter().map(|p| p.map_or(0, u32::from)).collect();
        let e = embed(&self.local_embedder.byte_embed, &Tensor::from_vec(ids, b, device)?)?;
        let e = with_ngrams(e, self.local_embedder.hash_embed.as_ref(), prev_ngrams)?.to_dtype(self.act)?; // [B, D_L]
        let e = if prev.iter().any(|p| p.is_none()) {
            let pad = self.local_embedder.local_pad.to_dtype(self.act)?.reshape((1, dl))?.broadcast_as((b, dl))?;
            let first: Vec<u8> = prev.iter().map(|p| u8::from(p.is_none())).collect();
            Tensor::from_vec(first, (b, 1), device)?.broadcast_as((b, dl))?.where_cond(&pad, &e)?
        } else {
            e
        };
        let positions = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), b, device)?;
        let e = (e + embed(&self.local_embedder.pos_embed.detach(), &positions)?.to_dtype(self.act)?)?;
        let x = (context + e)?; // [B, D_L]
        let h = self.local.forward_cached(&x.reshape((b, 1, dl))?, cache)?; // [B, 1, D_L]
        self.head(&h.squeeze(1)?) // [B, V]
    }

    /// Cross-patch prefill: runs the first n bytes of a window through the local model into
    /// an empty `cache`. contexts: [B, ≥ n, D_L] (from [`MegaByte::global_contexts`]), bytes
    /// [B, n], `ngrams` their hash n-gram rows [B, n, G] (with `hash_ngrams`).
    pub fn local_prefill(&self, contexts: &Tensor, bytes: &Tensor, ngrams: Option<&Tensor>, cache: &mut KvCache) -> Result<()> {
        self.check_ngrams(ngrams, "local_prefill")?;
        let (_, n) = bytes.dims2()?;
        if !self.cfg.cross_patch || cache.len() != 0 || n > self.cfg.context {
            return Err(Error::Input("local_prefill: cross-patch models only, from an empty cache, within the context".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let x = (contexts.narrow(1, 0, n)? + self.local_embedder.forward(bytes, ngrams, self.act)?)?; // [B, n, D_L]
        self.local.forward_cached(&x, cache)?;
        Ok(())
    }
}

/// The loss weights [B, T'] under which [`MegaByte::loss_and_grads`] takes the mean loss over
/// every byte of `bytes` [B, T']: 1/(B·T') each, in f64 (exact for an f64 model; the pass
/// rounds them to its own precision).
pub fn mean_weights(bytes: &Tensor) -> Result<Tensor> {
    let (b, t) = bytes.dims2()?;
    Ok(Tensor::full(1.0 / (b * t) as f64, (b, t), bytes.device())?)
}

/// The gradient of a position table of `rows` rows from that of its first rows (a sequence
/// shorter than the table): zeros for the rest. g: [S, D] → [rows, D].
fn pad_rows(g: Tensor, rows: usize) -> Result<Tensor> {
    let (s, d) = g.dims2()?;
    if s >= rows {
        return Ok(g);
    }
    Ok(Tensor::cat(&[&g, &Tensor::zeros((rows - s, d), g.dtype(), g.device())?], 0)?)
}

/// The gradient of a shift by one along dim 1 (`shift_one_patch`, `shift_one_byte`):
/// d[:, j] = dy[:, j + 1], and 0 for the last position. dy: [N, S, D].
fn shift_back(dy: &Tensor) -> Result<Tensor> {
    let (n, s, d) = dy.dims3()?;
    let zero = Tensor::zeros((n, 1, d), dy.dtype(), dy.device())?;
    if s == 1 {
        return Ok(zero);
    }
    Ok(Tensor::cat(&[&dy.narrow(1, 1, s - 1)?, &zero], 1)?)
}

/// Embedding lookup: table [V, D] and ids [..] → [.., D].
fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(ops::embedding::forward(table, ids)?)
}

/// An embedding [.., D] plus the sum of its hash n-gram rows `ids` [.., G] of `table` (when
/// both are given).
fn with_ngrams(e: Tensor, table: Option<&Tensor>, ids: Option<&Tensor>) -> Result<Tensor> {
    match (table, ids) {
        (Some(table), Some(ids)) => {
            let rank = ids.rank();
            Ok((e + embed(table, ids)?.sum(rank - 1)?)?) // rows [.., G, D] summed over G
        }
        _ => Ok(e),
    }
}

/// The gradient of a hash n-gram table from d(embedding) [.., D] at its rows `ids` [.., G]:
/// every one of the G rows gets the embedding's gradient.
fn ngram_backward(table: &Tensor, ids: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(dy.dim(candle_core::D::Minus1)?);
    let dy = dy.unsqueeze(ids.rank() - 1)?.broadcast_as(shape)?.contiguous()?; // [.., G, D]
    Ok(ops::embedding::backward(table, ids, &dy)?)
}
