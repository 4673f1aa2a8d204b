//! Bytes to train on: any file or folder of files as one byte stream (large files
//! memory-mapped), split into training and validation ranges, and seeded random windows over a
//! split.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The small real text corpus shipped with the crate: the first 2,000,000 bytes of enwik8
/// (English Wikipedia, CC BY-SA 3.0 / GFDL), so the quick start needs no download.
pub const EMBEDDED_CORPUS: &[u8] = include_bytes!("../corpus/enwik8-head.txt");

/// Name under which the embedded corpus is reported.
pub const EMBEDDED_NAME: &str = "embedded:enwik8-head";

/// Files smaller than this are read into memory rather than mapped: a process may hold only
/// so many mappings (Linux's `vm.max_map_count`, 65,530 by default), and a folder of source
/// code or clips can hold more files than that.
pub const MAP_MIN_BYTES: u64 = 1 << 20;

/// Consecutive small files share one in-memory part of up to this many bytes.
const READ_CHUNK_BYTES: usize = 64 << 20;

enum Part {
    Mapped(Mmap),
    Read(Vec<u8>),
    Static(&'static [u8]),
}

impl Part {
    fn bytes(&self) -> &[u8] {
        match self {
            Part::Mapped(m) => m,
            Part::Read(v) => v,
            Part::Static(s) => s,
        }
    }
}

/// One or more files read as a single stream of bytes: files of [`MAP_MIN_BYTES`] or more
/// are memory-mapped (never loaded whole), smaller ones read into shared in-memory parts.
pub struct ByteStream {
    name: String,
    parts: Vec<Part>,
    /// Offset of each part in the stream.
    starts: Vec<u64>,
    len: u64,
    /// The files read and their lengths, in stream order (empty for in-memory bytes).
    files: Vec<(PathBuf, u64)>,
}

impl ByteStream {
    /// A file, or every file under a folder (recursively, in path order). Document indexes
    /// (`*.documents.json`, see [`crate::documents`]) in a folder are metadata, not data, and
    /// are skipped.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::Data {
            path: path.into(),
            msg: format!("cannot read it ({e}); pass an existing file or folder"),
        })?;
        let files = if meta.is_dir() {
            let mut files = Vec::new();
            collect_files(path, &mut files)?;
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut parts = Vec::new();
        let mut kept = Vec::new();
        for file in &files {
            let f = std::fs::File::open(file).io_context(|| format!("opening {}", file.display()))?;
            let len = f.metadata().io_context(|| format!("reading {}", file.display()))?.len();
            if len == 0 {
                continue; // an empty file adds nothing (and cannot be mapped)
            }
            if len < MAP_MIN_BYTES {
                let chunk = match parts.last_mut() {
                    Some(Part::Read(v)) if v.len() + len as usize <= READ_CHUNK_BYTES => v,
                    _ => {
                        parts.push(Part::Read(Vec::new()));
                        let Some(Part::Read(v)) = parts.last_mut() else { unreachable!() };
                        v
                    }
                };
                let before = chunk.len();
                chunk.reserve(len as usize);
                (&f).read_to_end(chunk).io_context(|| format!("reading {}", file.display()))?;
                if (chunk.len() - before) as u64 != len {
                    return Err(Error::Data {
                        path: file.clone(),
                        msg: format!("changed while being read ({len} bytes, then {})", chunk.len() - before),
                    });
                }
            } else {
                // SAFETY: the file is only read; a concurrent writer could change what we
                // read, which the user controls, as with any reader.
                let map = unsafe { Mmap::map(&f) }.io_context(|| format!("mapping {}", file.display()))?;
                parts.push(Part::Mapped(map));
            }
            kept.push((file.clone(), len));
        }
        let mut stream = Self::from_parts(path.display().to_string(), parts);
        stream.files = kept;
        if stream.len == 0 {
            return Err(Error::Data {
                path: path.into(),
                msg: if meta.is_dir() { "the folder holds no bytes".into() } else { "the file is empty".into() },
            });
        }
        Ok(stream)
    }

    /// The embedded corpus (see [`EMBEDDED_CORPUS`]).
    pub fn embedded() -> Self {
        Self::from_parts(EMBEDDED_NAME.into(), vec![Part::Static(EMBEDDED_CORPUS)])
    }

    /// In-memory bytes (tests, generated data).
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Self {
        Self::from_parts(name.into(), vec![Part::Static(bytes)])
    }

    fn from_parts(name: String, parts: Vec<Part>) -> Self {
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0u64;
        for p in &parts {
            starts.push(len);
            len += p.bytes().len() as u64;
        }
        ByteStream { name, parts, starts, len, files: Vec::new() }
    }

    /// The files read, with their lengths, in stream order (empty for in-memory bytes).
    pub fn files(&self) -> &[(PathBuf, u64)] {
        &self.files
    }

    /// Document start offsets of the stream: each file's sidecar index, or each file as one
    /// document; in-memory bytes are one document.
    pub fn documents(&self) -> Result<Vec<u64>> {
        if self.files.is_empty() {
            return Ok(vec![0]);
        }
        crate::documents::stream_documents(&self.files)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies bytes [offset, offset + out.len()) into `out`, across file boundaries.
    fn read(&self, offset: u64, out: &mut [u8]) {
        let mut pos = offset;
        let mut filled = 0;
        let mut i = self.starts.partition_point(|&s| s <= pos) - 1;
        while filled < out.len() {
            let part = self.parts[i].bytes();
            let within = (pos - self.starts[i]) as usize;
            let n = (part.len() - within).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&part[within..within + n]);
            filled += n;
            pos += n as u64;
            i += 1;
        }
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).io_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry.io_context(|| format!("listing {}", dir.display()))?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path.is_file() && !path.to_string_lossy().ends_with(crate::documents::SIDECAR_SUFFIX) {
            out.push(path);
        }
    }
    Ok(())
}

/// A contiguous byte range of a stream: the training or the validation bytes.
#[derive(Clone)]
pub struct Split {
    stream: Arc<ByteStream>,
    start: u64,
    len: u64,
    /// With document isolation: the split's document starts (relative to `start`, the first
    /// 0). Windows then never start before their document (see [`crate::documents`]).
    docs: Option<Arc<Vec<u64>>>,
}

impl Split {
    /// The whole stream.
    pub fn all(stream: Arc<ByteStream>) -> Self {
        let len = stream.len();
        Split { stream, start: 0, len, docs: None }
    }

    /// Bytes [start, end) of the stream.
    pub fn range(stream: Arc<ByteStream>, start: u64, end: u64) -> Result<Self> {
        if start >= end || end > stream.len() {
            return Err(Error::Data {
                path: stream.name().into(),
                msg: format!("byte range {start}..{end} is empty or outside the {} bytes", stream.len()),
            });
        }
        Ok(Split { stream, start, len: end - start, docs: None })
    }

    /// Holds out the last `valid_bytes` of a stream: (train, valid).
    pub fn holdout(stream: Arc<ByteStream>, valid_bytes: u64) -> Result<(Self, Self)> {
        let len = stream.len();
        if valid_bytes == 0 || valid_bytes >= len {
            return Err(Error::Data {
                path: stream.name().into(),
                msg: format!("cannot hold out {valid_bytes} validation bytes of {len}"),
            });
        }
        let cut = len - valid_bytes;
        Ok((Self::range(stream.clone(), 0, cut)?, Self::range(stream, cut, len)?))
    }

    /// Holds out about the last `valid_bytes` of a stream of documents (`starts`, the
    /// stream's), cutting at the first document start at or after len − valid_bytes (or the
    /// last start before it), so no document is split between training and validation.
    pub fn holdout_documents(stream: Arc<ByteStream>, valid_bytes: u64, starts: &[u64]) -> Result<(Self, Self)> {
        let len = stream.len();
        let want = len.saturating_sub(valid_bytes);
        let cut = starts
            .iter()
            .copied()
            .find(|&s| s >= want && s > 0)
            .or_else(|| starts.iter().copied().filter(|&s| s > 0).last())
            .ok_or_else(|| Error::Data {
                path: stream.name().into(),
                msg: "holds one document: with --documents, hold out whole documents (it needs two or more) or pass --valid".into(),
            })?;
        let (train, valid) = Self::holdout(stream, len - cut)?;
        Ok((train.with_documents(starts), valid.with_documents(starts)))
    }

    /// This split with document isolation, given the stream's document starts.
    pub fn with_documents(mut self, stream_starts: &[u64]) -> Self {
        let end = self.start + self.len;
        let mut docs = vec![0u64];
        docs.extend(stream_starts.iter().filter(|&&s| s > self.start && s < end).map(|&s| s - self.start));
        self.docs = Some(Arc::new(docs));
        self
    }

    /// The document starts (relative to the split) when isolation is on.
    pub fn documents(&self) -> Option<&[u64]> {
        self.docs.as_deref().map(|d| d.as_slice())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn name(&self) -> &str {
        self.stream.name()
    }

    /// Bytes [offset, offset + len) of this split, zero-padded past its end.
    pub fn window(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let avail = self.len.saturating_sub(offset).min(len as u64) as usize;
        if avail > 0 {
            self.stream.read(self.start + offset, &mut out[..avail]);
        }
        out
    }

    /// `real` bytes from `offset`, then zero padding up to `len` bytes.
    pub fn padded_window(&self, offset: u64, real: usize, len: usize) -> Vec<u8> {
        let mut out = self.window(offset, real.min(len));
        out.resize(len, 0);
        out
    }

    /// Errors unless the split holds at least one window of `context` bytes.
    pub fn require(&self, context: usize, what: &str) -> Result<()> {
        if self.len < context as u64 {
            return Err(Error::Data {
                path: self.name().into(),
                msg: format!(
                    "{what} has {} bytes, fewer than one window of {context} bytes; use more data or a shorter context",
                    self.len
                ),
            });
        }
        Ok(())
    }
}

/// Seeded uniform random windows over a split. Its state is the seed and the position in the
/// RNG's stream, so a checkpoint restores it exactly.
pub struct WindowSampler {
    rng: ChaCha8Rng,
    seed: u64,
}

/// What a checkpoint stores of a [`WindowSampler`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    /// ChaCha's word position (a u128) in two halves: JSON numbers stop at 64 bits.
    pub word_pos_hi: u64,
    pub word_pos_lo: u64,
}

impl WindowSampler {
    pub fn new(seed: u64) -> Self {
        WindowSampler { rng: ChaCha8Rng::seed_from_u64(seed), seed }
    }

    pub fn state(&self) -> SamplerState {
        let pos = self.rng.get_word_pos();
        SamplerState { seed: self.seed, word_pos_hi: (pos >> 64) as u64, word_pos_lo: pos as u64 }
    }

    pub fn restore(state: SamplerState) -> Self {
        let mut s = Self::new(state.seed);
        s.rng.set_word_pos(((state.word_pos_hi as u128) << 64) | state.word_pos_lo as u128);
        s
    }

    /// A batch of `batch` random windows of `context` bytes: u32 [B, T] on `device`.
    pub fn batch(&mut self, split: &Split, batch: usize, context: usize, device: &Device) -> Result<Tensor> {
        self.batch_rows(split, batch, context, 0..batch, device)
    }

    /// Rows `rows` of the batch [`WindowSampler::batch`] would draw: every window's start is
    /// drawn, so the stream advances exactly as for the whole batch, but only the rows asked
    /// for are read. Data-parallel ranks each take their slice of one global batch this way,
    /// so N ranks together train on the very windows one process would (see [`crate::dist`]).
    pub fn batch_rows(
        &mut self,
        split: &Split,
        batch: usize,
        context: usize,
        rows: Range<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        check_rows(&rows, batch)?;
        split.require(context, "the training data")?;
        let max_start = split.len() - context as u64;
        let mut ids = Vec::with_capacity(rows.len() * context);
        for row in 0..batch {
            let start = self.rng.random_range(0..=max_start);
            if rows.contains(&row) {
                ids.extend(split.window(start, context).into_iter().map(u32::from));
            }
        }
        Ok(Tensor::from_vec(ids, (rows.len(), context), device)?)
    }
}

/// A row range must lie inside the batch and hold at least one row.
fn check_rows(rows: &Range<usize>, batch: usize) -> Result<()> {
    if rows.is_empty() || rows.end > batch {
        return Err(Error::Input(format!("rows {rows:?} are not a slice of a batch of {batch}")));
    }
    Ok(())
}

impl WindowSampler {
    /// A batch of document tiles (see [`crate::documents`]) of a split with documents: a
    /// uniformly random byte picks its document's tile, so every byte is equally likely to be
    /// trained on. Returns bytes u32 [B, T], per-byte weights f32 [B, T] (1 on the document's
    /// bytes, 0 on the zero padding after its end) and the number of weighted bytes.
    pub fn document_batch(
        &mut self,
        split: &Split,
        batch: usize,
        context: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor, usize)> {
        self.document_batch_rows(split, batch, context, 0..batch, device)
    }

    /// Rows `rows` of the batch [`WindowSampler::document_batch`] would draw (as
    /// [`WindowSampler::batch_rows`] for windows). The count returned is still the whole
    /// batch's weighted bytes: every rank divides by the same total.
    pub fn document_batch_rows(
        &mut self,
        split: &Split,
        batch: usize,
        context: usize,
        rows: Range<usize>,
        device: &Device,
    ) -> Result<(Tensor, Tensor, usize)> {
        check_rows(&rows, batch)?;
        let docs = split.documents().ok_or_else(|| Error::Input("document batches need a split with documents".into()))?;
        split.require(1, "the training data")?;
        let mut ids = Vec::with_capacity(rows.len() * context);
        let mut weights = Vec::with_capacity(rows.len() * context);
        let mut real_total = 0;
        for row in 0..batch {
            let u = self.rng.random_range(0..split.len());
            let (d, e) = crate::documents::document_of(docs, split.len(), u);
            let start = d + (u - d) / context as u64 * context as u64; // the tile holding u
            let real = (e - start).min(context as u64) as usize;
            if rows.contains(&row) {
                ids.extend(split.padded_window(start, real, context).into_iter().map(u32::from));
                weights.extend((0..context).map(|i| if i < real { 1f32 } else { 0.0 }));
            }
            real_total += real;
        }
        Ok((
            Tensor::from_vec(ids, (rows.len(), context), device)?,
            Tensor::from_vec(weights, (rows.len(), context), device)?,
            real_total,
        ))
    }
}

/// Bytes as a u32 tensor [B, len] on `device`.
pub fn bytes_to_tensor(rows: &[Vec<u8>], device: &Device) -> Result<Tensor> {
    let len = rows.first().map_or(0, |r| r.len());
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.iter().map(|&b| u32::from(b))).collect();
    Ok(Tensor::from_vec(ids, (rows.len(), len), device)?)
}
