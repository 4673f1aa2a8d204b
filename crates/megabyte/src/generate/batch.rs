//! Continuous batching: sequences that come and go at any step, each with its own prompt,
//! sampling rule and seed, decoded together. Each sequence gets exactly the bytes it would
//! get alone ([`super::generate_stepwise`] with its prompt and sampler).

use candle_core::{DType, Device};

use super::{Decoder, Sampler};
use crate::error::Result;
use crate::model::MegaByte;

/// A sequence of a [`Batch`], numbered in insertion order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One sequence: its lone decoder and its sampler.
struct Seq<'m> {
    id: SeqId,
    decoder: Decoder<'m>,
    sampler: Sampler,
}

/// Sequences decoded together, one byte each per [`Batch::step`].
pub struct Batch<'m> {
    model: &'m MegaByte,
    device: Device,
    seqs: Vec<Seq<'m>>,
    next_id: u64,
}

impl<'m> Batch<'m> {
    pub fn new(model: &'m MegaByte, device: &Device) -> Self {
        Batch { model, device: device.clone(), seqs: Vec::new(), next_id: 0 }
    }

    /// Queues a sequence (prompt of any length, possibly empty; `sampler` owns its rule and
    /// seed) and prefills it.
    pub fn insert(&mut self, prompt: &[u8], sampler: Sampler) -> Result<SeqId> {
        let decoder = Decoder::new(self.model, &[prompt.to_vec()], &self.device)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.push(Seq { id, decoder, sampler });
        Ok(id)
    }

    /// Drops a sequence at once (finished, or its client left); false if unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let before = self.seqs.len();
        self.seqs.retain(|s| s.id != id);
        self.seqs.len() < before
    }

    /// One step: the next byte of every sequence that is decoding, as (id, byte) in insertion
    /// order.
    pub fn step(&mut self) -> Result<Vec<(SeqId, u8)>> {
        let mut out = Vec::with_capacity(self.seqs.len());
        for s in &mut self.seqs {
            let logits = s.decoder.logits()?.to_dtype(DType::F32)?.to_vec2::<f32>()?; // [1][V]
            let b = s.sampler.sample(&logits[0]);
            s.decoder.push(&[b])?;
            out.push((s.id, b));
        }
        Ok(out)
    }

    /// Sequences held (decoding or about to).
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}
