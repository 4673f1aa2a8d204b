//! Continuous batching: sequences that come and go at any step, each with its own prompt,
//! sampling rule and seed, decoded in one batched step. Each sequence gets exactly the bytes
//! it would get alone ([`super::generate_stepwise`] with its prompt and sampler).
//!
//! **Phase alignment.** Every decoding row advances one byte per step, so all rows sit at
//! the same position in their patch (the batch's *phase*). A new sequence is prefilled alone
//! at once but joins only at a step where the batch's phase is its own (at most P − 1 steps
//! of waiting; an empty batch takes it at once). Then every row completes a patch at the same
//! step: one batched global step per patch, and the local cache resets for all rows together.
//!
//! **Ragged caches.** Rows hold different numbers of global positions (and, with cross-patch
//! attention, of local ones): each cache keeps its rows right-aligned, row r's first `start_r`
//! slots padding that its queries never see (`ops::attention::cached_from`), and each row's
//! position embeddings count from its own first slot (`MegaByte::global_step_rows`,
//! `local_step_rows`). A joining row's caches are spliced in, a leaving one's dropped, and a
//! row whose window is full at a patch boundary is prefilled again alone (as
//! `Decoder::slide_if_full` does) and spliced back; each splice rebuilds the caches with the
//! least padding.

use candle_core::{DType, Device, Tensor};

use super::{slide, Decoder, Sampler};
use crate::data::bytes_to_tensor;
use crate::error::{Error, Result};
use crate::model::MegaByte;
use crate::nn::KvCache;

/// A sequence of a [`Batch`], numbered in insertion order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// A decoding sequence: one row of both caches and of the contexts.
struct Row {
    id: SeqId,
    /// The bytes of its context window (those before it are forgotten).
    window: Vec<u8>,
    sampler: Sampler,
    /// False once removed; its row is dropped at the next step.
    live: bool,
}

/// A sequence prefilled alone, waiting for the batch to reach its phase.
struct Waiting<'m> {
    id: SeqId,
    decoder: Decoder<'m>,
    sampler: Sampler,
}

/// Where a row of rebuilt caches comes from: a row of the batch, or a decoder of one sequence.
enum Source<'a, 'm> {
    Row(usize),
    Alone(&'a Decoder<'m>),
}

/// Sequences decoded together, one byte each per [`Batch::step`].
pub struct Batch<'m> {
    model: &'m MegaByte,
    device: Device,
    /// In the order of the caches' rows.
    rows: Vec<Row>,
    global: KvCache,
    local: KvCache,
    /// The current patch's local contexts of every row, [rows, P, D_L]; None without rows.
    context: Option<Tensor>,
    /// Every row's position in its patch (its window's length mod P).
    phase: usize,
    waiting: Vec<Waiting<'m>>,
    next_id: u64,
}

impl<'m> Batch<'m> {
    pub fn new(model: &'m MegaByte, device: &Device) -> Self {
        Batch {
            model,
            device: device.clone(),
            rows: Vec::new(),
            global: model.global_cache(),
            local: model.local_cache(),
            context: None,
            phase: 0,
            waiting: Vec::new(),
            next_id: 0,
        }
    }

    /// Queues a sequence (prompt of any length, possibly empty; `sampler` owns its rule and
    /// seed) and prefills it alone; it joins the batch at the first step at its phase.
    pub fn insert(&mut self, prompt: &[u8], sampler: Sampler) -> Result<SeqId> {
        let decoder = Decoder::new(self.model, &[prompt.to_vec()], &self.device)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.waiting.push(Waiting { id, decoder, sampler });
        Ok(id)
    }

    /// Drops a sequence at once (finished, or its client left): it produces no more bytes and
    /// is no longer counted; its cache row is freed at the next step. False if unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
            return true;
        }
        match self.rows.iter_mut().find(|r| r.id == id && r.live) {
            Some(row) => {
                row.live = false;
                true
            }
            None => false,
        }
    }

    /// One step: the next byte of every sequence that is decoding, as (id, byte) in insertion
    /// order. A sequence may produce nothing for up to P − 1 steps after insert (it waits for
    /// the batch's phase).
    pub fn step(&mut self) -> Result<Vec<(SeqId, u8)>> {
        self.admit()?;
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.logits()?;
        self.sample_and_push(&logits)
    }

    /// Sequences held (decoding or about to).
    pub fn len(&self) -> usize {
        self.rows.iter().filter(|r| r.live).count() + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the removed rows and splices in the waiting sequences at the batch's phase (an
    /// empty batch takes the phase of the first one waiting).
    fn admit(&mut self) -> Result<()> {
        let p = self.model.config().patch_size;
        let live: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i].live).collect();
        if live.is_empty() {
            if let Some(w) = self.waiting.first() {
                self.phase = w.decoder.window_len() % p;
            }
        }
        let phase = self.phase;
        let (joining, waiting): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|w| w.decoder.window_len() % p == phase);
        self.waiting = waiting;
        if joining.is_empty() && live.len() == self.rows.len() {
            return Ok(());
        }
        let mut sources: Vec<Source> = live.iter().map(|&i| Source::Row(i)).collect();
        sources.extend(joining.iter().map(|w| Source::Alone(&w.decoder)));
        self.rebuild(&sources)?;
        self.rows.retain(|r| r.live);
        for w in joining {
            let window = w.decoder.history[0][w.decoder.window_start..].to_vec();
            self.rows.push(Row { id: w.id, window, sampler: w.sampler, live: true });
        }
        Ok(())
    }

    /// Both caches and the contexts rebuilt from `sources`, in that order, with the least
    /// left padding. The caller reorders `rows` to match.
    fn rebuild(&mut self, sources: &[Source]) -> Result<()> {
        let (mut global, mut local, mut context) = (Vec::new(), Vec::new(), Vec::new());
        for s in sources {
            match s {
                Source::Row(i) => {
                    global.push(self.global.row(*i)?);
                    local.push(self.local.row(*i)?);
                    let c = self.context.as_ref().ok_or_else(|| Error::Input("Batch: a row without contexts".into()))?;
                    context.push(c.narrow(0, *i, 1)?); // [1, P, D_L]
                }
                Source::Alone(d) => {
                    global.push(d.global.row(0)?);
                    local.push(d.local.row(0)?);
                    context.push(d.context.clone());
                }
            }
        }
        let cfg = self.model.config();
        self.global = KvCache::from_rows(self.model.global.layers(), cfg.patches(), &global)?;
        self.local = KvCache::from_rows(self.model.local.layers(), cfg.local_positions(), &local)?;
        self.context = if context.is_empty() { None } else { Some(Tensor::cat(&context, 0)?) }; // [rows, P, D_L]
        Ok(())
    }

    /// Logits [rows, V] for the next byte of every row: one batched local step.
    fn logits(&mut self) -> Result<Tensor> {
        let cross = self.model.config().cross_patch;
        let context = self.context.as_ref().ok_or_else(|| Error::Input("Batch: no rows to step".into()))?;
        let context = context.narrow(1, self.phase, 1)?.squeeze(1)?; // [rows, D_L]
        // The local sequence's first position gets the pad: a patch's first byte, or with
        // cross-patch attention the window's.
        let prev: Vec<Option<u8>> = self
            .rows
            .iter()
            .map(|r| {
                let first = if cross { r.window.is_empty() } else { self.phase == 0 };
                if first {
                    None
                } else {
                    r.window.last().copied()
                }
            })
            .collect();
        let prev_ngrams = self.prev_ngrams()?;
        self.model.local_step_rows(&context, &prev, prev_ngrams.as_ref(), &mut self.local)
    }

    /// Hash n-gram rows [rows, len, G] of each row's last `len` bytes (None without
    /// `hash_ngrams`).
    fn ngram_rows(&self, len: usize) -> Result<Option<Tensor>> {
        if self.model.config().hash_ngrams.is_none() {
            return Ok(None);
        }
        let windows: Vec<&[u8]> = self.rows.iter().map(|r| &r.window[..]).collect();
        let from: Vec<usize> = windows.iter().map(|w| w.len() - len).collect();
        self.model.ngram_ids_rows(&windows, &from, len, &self.device)
    }

    /// Hash n-gram rows [rows, G] of each row's previous byte (None without `hash_ngrams`). A
    /// row with none (its pad position) hashes an empty window as if one byte were there: a
    /// value the pad replaces.
    fn prev_ngrams(&self) -> Result<Option<Tensor>> {
        if self.model.config().hash_ngrams.is_none() {
            return Ok(None);
        }
        let windows: Vec<&[u8]> = self.rows.iter().map(|r| if r.window.is_empty() { &[0u8][..] } else { &r.window[..] }).collect();
        let last: Vec<usize> = windows.iter().map(|w| w.len() - 1).collect();
        Ok(self.model.ngram_ids_rows(&windows, &last, 1, &self.device)?.map(|t| t.squeeze(1)).transpose()?)
    }

    /// Samples every row's byte from its logits (one read-back), appends them, and at a patch
    /// boundary runs the global step. Returns the live rows' bytes in insertion order.
    fn sample_and_push(&mut self, logits: &Tensor) -> Result<Vec<(SeqId, u8)>> {
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?; // [rows][V]
        let mut out = Vec::with_capacity(self.rows.len());
        for (row, l) in self.rows.iter_mut().zip(&logits) {
            let b = row.sampler.sample(l);
            row.window.push(b);
            if row.live {
                out.push((row.id, b));
            }
        }
        out.sort_by_key(|x| x.0);
        let p = self.model.config().patch_size;
        self.phase = (self.phase + 1) % p;
        if self.phase == 0 {
            self.complete_patch()?;
        }
        Ok(out)
    }

    /// A patch is complete in every row: rows whose window is full slide to its last half
    /// and are prefilled again alone; the others take one batched global step (and, without
    /// cross-patch attention, a fresh local cache).
    fn complete_patch(&mut self) -> Result<()> {
        let cfg = self.model.config();
        let p = cfg.patch_size;
        if !cfg.cross_patch {
            self.local.reset();
        }
        let full = |r: &Row| slide(cfg, r.window.len()) > 0;
        let sliding: Vec<Row> = if self.rows.iter().any(full) {
            let staying: Vec<Source> = (0..self.rows.len()).filter(|&i| !full(&self.rows[i])).map(Source::Row).collect();
            self.rebuild(&staying)?;
            let (sliding, staying): (Vec<Row>, Vec<Row>) = self.rows.drain(..).partition(full);
            self.rows = staying;
            sliding
        } else {
            Vec::new()
        };
        if !self.rows.is_empty() {
            let last: Vec<Vec<u8>> = self.rows.iter().map(|r| r.window[r.window.len() - p..].to_vec()).collect();
            let patches = bytes_to_tensor(&last, &self.device)?; // [rows, P]
            let ngrams = self.ngram_rows(p)?;
            self.context = Some(self.model.global_step_rows(&patches, ngrams.as_ref(), &mut self.global)?);
        }
        if sliding.is_empty() {
            return Ok(());
        }
        let mut alone = Vec::with_capacity(sliding.len());
        for mut row in sliding {
            row.window.drain(..slide(cfg, row.window.len()));
            alone.push(Decoder::prefilled(self.model, vec![row.window.clone()], 0, &self.device)?);
            self.rows.push(row);
        }
        let staying = self.rows.len() - alone.len();
        let mut sources: Vec<Source> = (0..staying).map(Source::Row).collect();
        sources.extend(alone.iter().map(Source::Alone));
        self.rebuild(&sources)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{ModelConfig, NormKind, TransformerConfig};
    use crate::generate::Sampling;

    fn config(cross_patch: bool, window: Option<usize>) -> ModelConfig {
        ModelConfig {
            patch_size: 4,
            context: 32,
            global: TransformerConfig { width: 16, layers: 2, heads: 2, window },
            local: TransformerConfig { width: 8, layers: 2, heads: 2, window: if cross_patch { Some(3) } else { window } },
            norm: NormKind::LayerNorm,
            tied_head: true,
            init_std: 0.2,
            cross_patch,
            zero_w_gl: false,
            patch_embed_std: None,
            qk_norm: false,
            mlp: crate::Activation::Gelu,
            zero_init_proj: false,
            hash_ngrams: None,
        }
    }

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        (0..n as u64).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 3) as u8).collect()
    }

    /// Every step, each row's logits equal those of the same sequence decoded alone by a
    /// `Decoder` (f64, within 1e-12), as sequences join (prompts empty, mid-patch, longer
    /// than the context), leave, and slide their windows.
    fn check(cfg: &ModelConfig) {
        let (model, _) = MegaByte::init(cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let t = cfg.context;
        let joins: [(usize, usize); 6] = [(0, 0), (0, 5), (1, 3), (2, 2 * t + 5), (9, 1), (30, t)];
        let mut batch = Batch::new(&model, &Device::Cpu);
        let mut alone: HashMap<SeqId, Decoder> = HashMap::new();
        let (mut worst, mut compared) = (0.0f64, 0);
        for step in 0..120 {
            for (i, &(at, len)) in joins.iter().enumerate() {
                if at == step {
                    let prompt = bytes(len, i as u64);
                    let sampler = Sampler::new(Sampling::Temperature { temperature: 1.0 }, i as u64).unwrap();
                    let id = batch.insert(&prompt, sampler).unwrap();
                    alone.insert(id, Decoder::new(&model, &[prompt], &Device::Cpu).unwrap());
                }
            }
            if step == 50 {
                assert!(batch.remove(SeqId(1)));
                alone.remove(&SeqId(1));
            }
            batch.admit().unwrap();
            let logits = batch.logits().unwrap(); // [rows, V]
            for (i, row) in batch.rows.iter().enumerate() {
                let want = alone.get_mut(&row.id).unwrap().logits().unwrap(); // [1, V]
                let diff = (logits.narrow(0, i, 1).unwrap() - want).unwrap().abs().unwrap().max_keepdim(1).unwrap();
                let diff = diff.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
                assert!(diff < 1e-12, "step {step}: row of {:?} differs by {diff:.1e}", row.id);
                worst = worst.max(diff);
                compared += 1;
            }
            for (id, b) in batch.sample_and_push(&logits).unwrap() {
                alone.get_mut(&id).unwrap().push(&[b]).unwrap();
            }
        }
        assert_eq!(batch.len(), 5);
        assert!(compared > 400, "only {compared} rows compared");
        eprintln!("{compared} rows within {worst:.1e} of their lone decoders");
    }

    #[test]
    fn batched_logits_equal_each_sequence_decoded_alone() {
        check(&config(false, None));
        check(&config(false, Some(3)));
        check(&config(true, None));
    }
}
