//! KV-cached sampling (paper section 3, "parallelism in decoding"): the global model steps
//! once per completed patch, the local model once per byte, and the local cache is reset at
//! every patch boundary (kept, with cross-patch attention). [`Batch`] (`generate/batch.rs`)
//! decodes sequences that join and leave at any step in one batched step.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::bytes_to_tensor;
use crate::error::{Error, Result};
use crate::model::MegaByte;
use crate::nn::KvCache;

mod batch;
#[cfg(feature = "cuda")]
mod cuda;

pub use batch::{Batch, SeqId};

/// How the next byte is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// The most likely byte.
    Greedy,
    /// Sample from softmax(logits / temperature).
    Temperature { temperature: f64 },
    /// Sample among the `k` most likely bytes.
    TopK { k: usize, temperature: f64 },
    /// Sample among the smallest set of bytes whose probability reaches `p` (nucleus).
    TopP { p: f64, temperature: f64 },
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        let t = match *self {
            Sampling::Greedy => return Ok(()),
            Sampling::Temperature { temperature } => temperature,
            Sampling::TopK { k, temperature } => {
                if k == 0 {
                    return Err(Error::Config("top-k needs k ≥ 1".into()));
                }
                temperature
            }
            Sampling::TopP { p, temperature } => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(Error::Config(format!("top-p needs 0 < p ≤ 1, got {p}")));
                }
                temperature
            }
        };
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::Config(format!("temperature must be positive, got {t}")));
        }
        Ok(())
    }

    /// The byte this rule picks from one row of 256 logits for the uniform draw `u` in [0, 1)
    /// (greedy ignores it): the bytes sorted by probability, the rule's set kept, and `u`
    /// times its total mass walked down the sorted weights. The CUDA decoder samples the same way.
    pub fn pick(&self, logits: &[f32], u: f64) -> u8 {
        let (temperature, keep_k, keep_p) = match *self {
            Sampling::Greedy => return argmax(logits),
            Sampling::Temperature { temperature } => (temperature, logits.len(), 1.0),
            Sampling::TopK { k, temperature } => (temperature, k.min(logits.len()), 1.0),
            Sampling::TopP { p, temperature } => (temperature, logits.len(), p),
        };
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(usize, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i, ((l as f64 - max) / temperature).exp())).collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        probs.truncate(keep_k);
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if keep_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for (_, w) in &probs {
                acc += w / total;
                n += 1;
                if acc >= keep_p {
                    break;
                }
            }
            probs.truncate(n);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = u * total;
        for &(i, w) in &probs {
            if u < w {
                return i as u8;
            }
            u -= w;
        }
        probs.last().map_or(0, |p| p.0 as u8)
    }
}

/// A sampling rule with its seeded RNG.
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling, seed: u64) -> Result<Self> {
        sampling.validate()?;
        Ok(Sampler { sampling, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// Picks a byte from one row of 256 logits (one uniform draw unless the rule is greedy).
    pub fn sample(&mut self, logits: &[f32]) -> u8 {
        let u = if self.sampling == Sampling::Greedy { 0.0 } else { self.uniform() };
        self.sampling.pick(logits, u)
    }

    /// The rule this sampler applies.
    pub fn rule(&self) -> Sampling {
        self.sampling
    }

    /// The next uniform draw in [0, 1): one per sampled (non-greedy) byte, in the order the
    /// bytes are chosen. The CUDA decoder draws them here and samples on the device, so both
    /// paths give the same bytes for one seed (up to near-ties: two bytes whose probabilities
    /// agree to six digits can swap places in the sorted order when the paths' sums round
    /// differently).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

fn argmax(logits: &[f32]) -> u8 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u8
}

/// The decoding state of a batch of sequences: both caches, the current patch's local
/// contexts, and the bytes so far. Drive it with [`Decoder::logits`] and [`Decoder::push`].
pub struct Decoder<'m> {
    model: &'m MegaByte,
    device: Device,
    /// Every byte of each sequence so far (prompt and generated).
    history: Vec<Vec<u8>>,
    /// Where the current context window starts in `history` (patch-aligned).
    window_start: usize,
    global: KvCache,
    local: KvCache,
    /// Local contexts of the current patch, [B, P, D_L].
    context: Tensor,
    /// `logits` was called and its byte not pushed yet.
    awaiting_push: bool,
}

impl<'m> Decoder<'m> {
    /// Prefills both caches from equal-length prompts, possibly empty, possibly longer than
    /// the context. The window then starts where feeding the prompt byte by byte would have
    /// left it (each completed patch that leaves no room for the next slides it to its last
    /// half), so the bytes after a long prompt are those of generating through it.
    pub fn new(model: &'m MegaByte, prompts: &[Vec<u8>], device: &Device) -> Result<Self> {
        let len = prompts.first().map(|p| p.len()).ok_or_else(|| Error::Input("no prompt given".into()))?;
        if prompts.iter().any(|p| p.len() != len) {
            return Err(Error::Input("prompts of one batch must have the same length".into()));
        }
        Decoder::prefilled(model, prompts.to_vec(), window_start_after(model.config(), len), device)
    }

    /// A decoder over `history` with its window from `window_start` (patch-aligned, fewer
    /// than T bytes), both caches prefilled.
    fn prefilled(model: &'m MegaByte, history: Vec<Vec<u8>>, window_start: usize, device: &Device) -> Result<Self> {
        let mut d = Decoder {
            model,
            device: device.clone(),
            history,
            window_start,
            global: model.global_cache(),
            local: model.local_cache(),
            context: Tensor::zeros(1, DType::F32, device)?, // set by prefill
            awaiting_push: false,
        };
        d.prefill()?;
        Ok(d)
    }

    pub fn history(&self) -> &[Vec<u8>] {
        &self.history
    }

    /// Runs the window's complete patches through the global model and the current partial
    /// patch's bytes (with cross-patch attention, all the window's bytes) through the local
    /// model.
    fn prefill(&mut self) -> Result<()> {
        let p = self.model.config().patch_size;
        let window: Vec<Vec<u8>> = self.history.iter().map(|h| h[self.window_start..].to_vec()).collect();
        let n = window[0].len();
        let complete = n / p * p;
        self.global.reset();
        self.local.reset();
        let (patches, patch_ngrams) = if complete > 0 {
            let rows: Vec<Vec<u8>> = window.iter().map(|w| w[..complete].to_vec()).collect();
            (Some(bytes_to_tensor(&rows, &self.device)?), self.ngrams(0, complete)?)
        } else {
            (None, None)
        };
        if self.model.config().cross_patch {
            let contexts = self.model.global_contexts(window.len(), patches.as_ref(), patch_ngrams.as_ref(), &mut self.global)?; // [B, complete + P, D_L]
            let bytes = bytes_to_tensor(&window, &self.device)?;
            self.model.local_prefill(&contexts, &bytes, self.ngrams(0, n)?.as_ref(), &mut self.local)?;
            self.context = contexts.narrow(1, complete, p)?;
            return Ok(());
        }
        self.context = self.model.global_step(window.len(), patches.as_ref(), patch_ngrams.as_ref(), &mut self.global)?;
        // Local positions 0..r−1 of the partial patch; position r is computed by `logits`.
        for i in 0..(n - complete) {
            let prev = self.prev_byte(&window, complete + i, i)?;
            let prev_ngrams = if i == 0 { None } else { self.prev_ngrams(complete + i - 1)? };
            self.model.local_step(&self.context_at(i)?, prev.as_ref(), prev_ngrams.as_ref(), &mut self.local)?;
        }
        Ok(())
    }

    /// The input byte of local position `pos` (byte `at − 1`), or `None` at position 0.
    fn prev_byte(&self, window: &[Vec<u8>], at: usize, pos: usize) -> Result<Option<Tensor>> {
        if pos == 0 {
            return Ok(None);
        }
        let prev: Vec<u32> = window.iter().map(|w| u32::from(w[at - 1])).collect();
        Ok(Some(Tensor::from_vec(prev, window.len(), &self.device)?))
    }

    /// The hash n-gram rows [B, len, G] of window positions `from..from + len` (None without
    /// `hash_ngrams`).
    fn ngrams(&self, from: usize, len: usize) -> Result<Option<Tensor>> {
        if self.model.config().hash_ngrams.is_none() {
            return Ok(None); // nothing to gather for each byte
        }
        let window: Vec<&[u8]> = self.history.iter().map(|h| &h[self.window_start..]).collect();
        self.model.ngram_ids(&window, from, len, &self.device)
    }

    /// The hash n-gram rows [B, G] of window position `at`, a local step's previous byte.
    fn prev_ngrams(&self, at: usize) -> Result<Option<Tensor>> {
        Ok(self.ngrams(at, 1)?.map(|t| t.squeeze(1)).transpose()?)
    }

    /// Bytes in the context window.
    fn window_len(&self) -> usize {
        self.history[0].len() - self.window_start
    }

    fn context_at(&self, pos: usize) -> Result<Tensor> {
        Ok(self.context.narrow(1, pos, 1)?.squeeze(1)?) // [B, D_L]
    }

    /// Logits [B, V] for the next byte of every sequence. Runs one local step, so each call
    /// must be followed by a [`Decoder::push`] of the chosen bytes.
    pub fn logits(&mut self) -> Result<Tensor> {
        if self.awaiting_push {
            return Err(Error::Input("Decoder::logits called twice: push the chosen bytes first".into()));
        }
        let n = self.window_len();
        let pos = n % self.model.config().patch_size;
        // The local sequence's first position gets the pad: a patch's first byte, or with
        // cross-patch attention the window's.
        let first = if self.model.config().cross_patch { n == 0 } else { pos == 0 };
        let (prev, prev_ngrams) = if first {
            (None, None)
        } else {
            let last: Vec<u32> = self.history.iter().map(|h| h.last().map_or(0, |&b| u32::from(b))).collect();
            (Some(Tensor::from_vec(last, self.history.len(), &self.device)?), self.prev_ngrams(n - 1)?)
        };
        let logits = self.model.local_step(&self.context_at(pos)?, prev.as_ref(), prev_ngrams.as_ref(), &mut self.local)?;
        self.awaiting_push = true;
        Ok(logits)
    }

    /// Appends one byte per sequence (after a call to `logits`). At a patch boundary the
    /// completed patch goes through one global step and the local cache is reset (kept, with
    /// cross-patch attention); when the
    /// context window is full, it slides to its last half and is prefilled again.
    pub fn push(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.history.len() {
            return Err(Error::Input("push needs one byte per sequence".into()));
        }
        if !self.awaiting_push {
            return Err(Error::Input("Decoder::push without logits: call logits first".into()));
        }
        self.awaiting_push = false;
        for (h, &b) in self.history.iter_mut().zip(bytes) {
            h.push(b);
        }
        let p = self.model.config().patch_size;
        if self.window_len() % p != 0 || self.slide_if_full()? {
            return Ok(());
        }
        let rows: Vec<Vec<u8>> = self.history.iter().map(|h| h[h.len() - p..].to_vec()).collect();
        let patch = bytes_to_tensor(&rows, &self.device)?; // [B, P]
        let ngrams = self.ngrams(self.window_len() - p, p)?;
        self.context = self.model.global_step(rows.len(), Some(&patch), ngrams.as_ref(), &mut self.global)?;
        if !self.model.config().cross_patch {
            self.local.reset();
        }
        Ok(())
    }
}

/// The bytes a window of `n` bytes (at a patch boundary, a multiple of P) drops when the next
/// patch would not fit the context: all but its last half, patch-aligned; 0 while it fits.
/// The one slide rule of `Decoder`, `Batch` and long prompts.
pub(crate) fn slide(cfg: &ModelConfig, n: usize) -> usize {
    let (p, t) = (cfg.patch_size, cfg.context);
    if n + p <= t {
        return 0;
    }
    (n - t / 2 / p * p).min(n)
}

/// Where the context window starts after `len` bytes fed one at a time from an empty window:
/// [`slide`] at every completed patch. The window then holds fewer than T bytes.
pub(crate) fn window_start_after(cfg: &ModelConfig, len: usize) -> usize {
    let mut start = 0;
    for end in (cfg.patch_size..=len).step_by(cfg.patch_size) {
        start += slide(cfg, end - start);
    }
    start
}

impl Decoder<'_> {
    /// At a patch boundary: when the next global position would not fit the context, keeps
    /// the last half of the window (patch-aligned), prefills both caches again and returns true.
    fn slide_if_full(&mut self) -> Result<bool> {
        let n = self.history[0].len() - self.window_start; // bytes in the window, a multiple of P
        let drop = slide(self.model.config(), n);
        if drop == 0 {
            return Ok(false);
        }
        self.window_start += drop;
        self.prefill()?;
        Ok(true)
    }
}

/// Generates `n` bytes after each prompt, calling `on_bytes` with each new byte of every
/// sequence as soon as it is chosen (on CUDA, once per patch). Returns the generated bytes
/// (prompts excluded).
///
/// On CUDA (f32 or bf16 activations) this runs the decoding engine of `generate/cuda.rs`,
/// which samples on the device and reads bytes back once per patch; elsewhere, and for shapes
/// the engine lacks kernels for, [`generate_stepwise`]. Both give the same bytes for one seed
/// (up to rounding differences between their kernels).
pub fn generate(
    model: &MegaByte,
    prompts: &[Vec<u8>],
    n: usize,
    sampler: &mut Sampler,
    device: &Device,
    on_bytes: &mut dyn FnMut(&[u8]),
) -> Result<Vec<Vec<u8>>> {
    #[cfg(feature = "cuda")]
    if cuda::supported(model, device) {
        return cuda::generate(model, prompts, n, sampler, device, on_bytes);
    }
    generate_stepwise(model, prompts, n, sampler, device, on_bytes)
}

/// [`generate`] through [`Decoder`], one step and one read-back of the logits per byte: the
/// reference the CUDA engine is tested against.
pub fn generate_stepwise(
    model: &MegaByte,
    prompts: &[Vec<u8>],
    n: usize,
    sampler: &mut Sampler,
    device: &Device,
    on_bytes: &mut dyn FnMut(&[u8]),
) -> Result<Vec<Vec<u8>>> {
    let mut decoder = Decoder::new(model, prompts, device)?;
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..n {
        let logits = decoder.logits()?.to_dtype(DType::F32)?.to_vec2::<f32>()?; // [B][V]
        let next: Vec<u8> = logits.iter().map(|row| sampler.sample(row)).collect();
        for (o, &b) in out.iter_mut().zip(&next) {
            o.push(b);
        }
        on_bytes(&next);
        decoder.push(&next)?;
    }
    Ok(out)
}
