//! Bits-per-byte over every byte of a split, in deterministic windows.
//!
//! Three settings (paper §2.3), combinable:
//! - plain: non-overlapping windows of T bytes; every byte scored once.
//! - sliding (`stride` S < T): windows advance by S and, after the first, score only their
//!   last S bytes, so each byte is predicted with at least T−S bytes of context.
//! - strided: a second pass with windows offset by P/2; each pass keeps, of every patch, only
//!   its first P/2 positions: the paper's remedy for loss that rises toward the end of a patch
//!   when the local model sees only its patch. 2× cost.
//!
//! With document isolation (a split with documents, see [`crate::documents`]) each document
//! is evaluated on its own as if it were the whole split: windows start inside it, and the
//! bytes after its end are zero padding that is never scored.
//!
//! The report breaks the figure down by a byte's position in its patch and by its position in
//! its window (the context it was predicted from), to show where a model loses bits. Read the
//! patch breakdown from a sliding evaluation: in plain windows, the first bytes of every window
//! (predicted from almost no context) fall in the first positions of patch 0 and raise those
//! positions' figures, which can hide or mimic an effect of the position inside a patch.

use candle_core::{Device, Tensor};
use serde::Serialize;

use rayon::prelude::*;

use crate::data::Split;
use crate::error::{Error, Result};
use crate::model::MegaByte;

/// How to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EvalSettings {
    /// Score with windows offset by P/2 too, keeping the first half of every patch per pass.
    pub strided: bool,
    /// Advance windows by this many bytes and score only the last `stride` bytes of each.
    pub sliding: Option<usize>,
    /// Windows per forward pass.
    pub batch_size: usize,
}

/// The result: bits per byte over `bytes` scored bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub bpb: f64,
    pub bytes: u64,
    /// Forward passes over full windows: the cost.
    pub windows: u64,
    /// The scored bytes by their position in their patch (P entries, 0 first). Without
    /// `sliding`, the context-starved first bytes of each window weigh on the first entries.
    pub by_patch_position: Vec<Slice>,
    /// The scored bytes by their position in their window, in [`CONTEXT_BINS`] ranges of
    /// window positions (as equal as T allows; T ranges for T < 8): bytes late in a window had
    /// more context.
    pub by_window_position: Vec<Slice>,
}

/// Window positions are grouped into this many equal ranges in [`EvalReport`].
pub const CONTEXT_BINS: usize = 8;

/// Bits per byte over some of the scored bytes: those at window positions `from..to` (or, by
/// patch position, at position `from`); None where no byte was scored there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Slice {
    pub from: usize,
    pub to: usize,
    pub bytes: u64,
    pub bpb: Option<f64>,
}

/// Nats and bytes per group of window positions.
struct Tally {
    nats: Vec<f64>,
    bytes: Vec<u64>,
}

impl Tally {
    fn new(groups: usize) -> Self {
        Tally { nats: vec![0.0; groups], bytes: vec![0; groups] }
    }

    fn add(&mut self, other: &Tally) {
        for (a, b) in self.nats.iter_mut().zip(&other.nats) {
            *a += b;
        }
        for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
            *a += b;
        }
    }

    /// One slice per group; group g covers window positions `range(g)`.
    fn slices(&self, range: impl Fn(usize) -> (usize, usize)) -> Vec<Slice> {
        let bpb = |nats: f64, bytes: u64| (bytes > 0).then(|| nats / bytes as f64 / std::f64::consts::LN_2);
        (0..self.nats.len())
            .map(|g| {
                let (from, to) = range(g);
                Slice { from, to, bytes: self.bytes[g], bpb: bpb(self.nats[g], self.bytes[g]) }
            })
            .collect()
    }
}

/// One window: where it starts in the split and which of its positions are scored.
pub struct Window {
    pub start: u64,
    pub score: Vec<bool>,
    /// Bytes of data from `start` (the window's end, or its document's or the split's end);
    /// the rest of the window is zero padding.
    pub len: usize,
}

/// Scores every byte of `split` exactly once (settings as above), `limit` bytes at most.
pub fn evaluate(
    model: &MegaByte,
    split: &Split,
    settings: EvalSettings,
    limit: Option<u64>,
    device: &Device,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EvalReport> {
    let cfg = model.config();
    let (t, p) = (cfg.context, cfg.patch_size);
    let len = limit.map_or(split.len(), |l| l.min(split.len()));
    let stride = settings.sliding.unwrap_or(t);
    if stride == 0 || stride > t {
        return Err(Error::Input(format!("sliding stride must be in 1..={t}, got {stride}")));
    }
    let offsets: Vec<usize> = if settings.strided {
        if p % 2 != 0 || stride % p != 0 {
            return Err(Error::Input(format!(
                "strided evaluation needs an even patch size and a sliding stride that is a multiple of P = {p}"
            )));
        }
        vec![0, p / 2]
    } else {
        vec![0]
    };
    let batch = settings.batch_size.max(1);
    let windows = match split.documents() {
        None => windows(len, t, p, stride, &offsets, settings.strided),
        Some(docs) => document_windows(docs, len, t, p, stride, &offsets, settings.strided),
    };
    let total = windows.len() as u64;
    let bins = CONTEXT_BINS.min(t);
    // Scores one batch of windows: the scored bytes' nats by patch position and by window
    // position (one read-back of the losses; the totals are either tally's sums).
    let score = |chunk: &[Window]| -> Result<(Tally, Tally)> {
        let mut ids: Vec<u32> = Vec::with_capacity(chunk.len() * t);
        for w in chunk {
            ids.extend(split.padded_window(w.start, w.len, t)?.into_iter().map(u32::from));
        }
        let x = Tensor::from_vec(ids, (chunk.len(), t), device)?; // [B, T]
        let losses = model.byte_losses(&x)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?; // [B][T] nats
        let (mut by_patch, mut by_window) = (Tally::new(p), Tally::new(bins));
        for (w, row) in chunk.iter().zip(losses) {
            for (j, (&keep, &nats)) in w.score.iter().zip(&row).enumerate() {
                if keep {
                    for (tally, g) in [(&mut by_patch, j % p), (&mut by_window, j * bins / t)] {
                        tally.nats[g] += nats as f64;
                        tally.bytes[g] += 1;
                    }
                }
            }
        }
        Ok((by_patch, by_window))
    };
    // On the CPU, one batch per core at a time (small models are serial op by op); results are
    // summed in window order, so the figure does not depend on the thread count.
    let threads = if device.is_cpu() { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { 1 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Input(format!("cannot start {threads} evaluation threads: {e}")))?;
    let batches: Vec<&[Window]> = windows.chunks(batch).collect();
    let mut done = 0u64;
    let (mut by_patch, mut by_window) = (Tally::new(p), Tally::new(bins));
    for round in batches.chunks(threads) {
        let results: Vec<Result<(Tally, Tally)>> = pool.install(|| round.par_iter().map(|c| score(c)).collect());
        for r in results {
            let (bp, bw) = r?;
            by_patch.add(&bp);
            by_window.add(&bw);
        }
        done += round.iter().map(|c| c.len() as u64).sum::<u64>();
        progress(done, total);
    }
    let (nats, bytes) = (by_window.nats.iter().sum::<f64>(), by_window.bytes.iter().sum::<u64>());
    if bytes != len {
        return Err(Error::Input(format!("evaluation scored {bytes} of {len} bytes (an internal bug)")));
    }
    if !nats.is_finite() {
        // Finite weights whose activations overflow (a diverged run's last finite step).
        return Err(Error::Input(format!(
            "the model's loss is not finite ({nats} nats over {bytes} bytes): its weights overflow in the forward pass; use an earlier checkpoint"
        )));
    }
    Ok(EvalReport {
        bpb: nats / bytes as f64 / std::f64::consts::LN_2,
        bytes,
        windows: total,
        by_patch_position: by_patch.slices(|g| (g, g + 1)),
        // Position j is in range j·bins/T (rounded down): range g starts at ⌈g·T/bins⌉.
        by_window_position: by_window.slices(|g| ((g * t).div_ceil(bins), ((g + 1) * t).div_ceil(bins))),
    })
}

/// Every window of every pass (one pass per offset) over `len` bytes.
pub fn windows(len: u64, t: usize, p: usize, stride: usize, offsets: &[usize], strided: bool) -> Vec<Window> {
    offsets.iter().flat_map(|&o| plan(len, t, p, stride, o, strided)).collect()
}

/// Every window of every pass over each document (ascending `starts`, the first 0) of the
/// first `len` bytes: each document planned as a split of its own, shifted to its start.
pub fn document_windows(
    starts: &[u64],
    len: u64,
    t: usize,
    p: usize,
    stride: usize,
    offsets: &[usize],
    strided: bool,
) -> Vec<Window> {
    let mut out = Vec::new();
    for (i, &d) in starts.iter().enumerate().filter(|(_, &d)| d < len) {
        let end = starts.get(i + 1).copied().unwrap_or(len).min(len);
        out.extend(windows(end - d, t, p, stride, offsets, strided).into_iter().map(|mut w| {
            w.start += d;
            w
        }));
    }
    out
}

/// The windows of one pass starting at `offset`: each scores the bytes it is responsible for.
fn plan(len: u64, t: usize, p: usize, stride: usize, offset: usize, strided: bool) -> Vec<Window> {
    let mut out = Vec::new();
    let mut start = offset as u64;
    let mut first = true;
    while start < len {
        // The first window scores all of itself; later ones only their last `stride` bytes.
        let from = if first { 0 } else { t - stride };
        let score: Vec<bool> = (0..t)
            .map(|i| {
                let in_file = start + (i as u64) < len;
                let half = !strided || i % p < p / 2;
                i >= from && in_file && half
            })
            .collect();
        out.push(Window { start, score, len: len.saturating_sub(start).min(t as u64) as usize });
        if start + t as u64 >= len {
            break;
        }
        start += stride as u64;
        first = false;
    }
    out
}
