//! Bytes to train on: any file or folder of files as one byte stream (large files read in
//! place), split into training and validation ranges, and seeded random windows over a split.
//! Also the two ways every user-named input is opened: [`folder_files`], the folder walk that
//! stays inside its folder, and [`read_regular_file`], a file read whole with a size bound.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The small real text corpus shipped with the crate: the first 2,000,000 bytes of enwik8
/// (English Wikipedia, CC BY-SA 3.0 / GFDL), so the quick start needs no download.
pub const EMBEDDED_CORPUS: &[u8] = include_bytes!("../corpus/enwik8-head.txt");

/// Name under which the embedded corpus is reported.
pub const EMBEDDED_NAME: &str = "embedded:enwik8-head";

/// Files smaller than this are read into memory; larger ones stay open and are read in
/// place (each holding a file descriptor). A process may hold only so many open files
/// (`ulimit -n`, often 1,024), and a folder of source code or clips can hold more files than
/// that.
pub const MAP_MIN_BYTES: u64 = 1 << 20;

/// The most bytes a JSON file read whole may hold: a model config, a checkpoint's training
/// record. A file larger than this is not one of them (or was given by mistake).
pub const JSON_MAX_BYTES: u64 = 1 << 20;

/// The most bytes a document index (sidecar) may hold: a million documents' starts with
/// their paths fit well within it.
pub const SIDECAR_MAX_BYTES: u64 = 256 << 20;

/// Consecutive small files share one in-memory part of up to this many bytes.
const READ_CHUNK_BYTES: usize = 64 << 20;

/// A large file read in place with positioned reads (`pread`), not memory-mapped: a mapped
/// file that shrinks kills the process with SIGBUS at the next read past its new end, while a
/// short read here is an error naming the file (one system call per window, nothing next to
/// a training step).
struct InPlace {
    file: File,
    path: PathBuf,
    len: u64,
}

enum Part {
    InPlace(InPlace),
    Read(Vec<u8>),
    Static(&'static [u8]),
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::InPlace(f) => f.len,
            Part::Read(v) => v.len() as u64,
            Part::Static(s) => s.len() as u64,
        }
    }

    /// Copies the part's bytes [at, at + out.len()) into `out`.
    fn read(&self, at: u64, out: &mut [u8]) -> Result<()> {
        match self {
            Part::InPlace(f) => f.file.read_exact_at(out, at).map_err(|e| {
                let now = f.file.metadata().map_or_else(|_| "an unknown length".into(), |m| format!("{} bytes", m.len()));
                Error::Data {
                    path: f.path.clone(),
                    msg: format!(
                        "cannot read bytes {at}..{} ({e}): the file had {} bytes when opened and has {now} now; \
                         data files must not change during a run (restore it, or start again on the new data)",
                        at + out.len() as u64,
                        f.len,
                    ),
                }
            }),
            Part::Read(v) => {
                out.copy_from_slice(&v[at as usize..at as usize + out.len()]);
                Ok(())
            }
            Part::Static(s) => {
                out.copy_from_slice(&s[at as usize..at as usize + out.len()]);
                Ok(())
            }
        }
    }
}

/// One or more files read as a single stream of bytes: files of [`MAP_MIN_BYTES`] or more
/// stay open and are read in place (never loaded whole), smaller ones are read into shared
/// in-memory parts.
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
    /// A file, or every file under a folder (recursively, in path order; see
    /// [`folder_files`]). Document indexes (`*.documents.json`, see [`crate::documents`]) in a
    /// folder are metadata, not data, and are skipped. A FIFO, socket or device is refused: it
    /// has no length and may never end.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::Data {
            path: path.into(),
            msg: format!("cannot read it ({e}); pass an existing file or folder"),
        })?;
        let files = if meta.is_dir() {
            folder_files(path, false, &|f| !f.to_string_lossy().ends_with(crate::documents::SIDECAR_SUFFIX))?
        } else {
            require_regular(path, &meta, "data file or folder")?;
            vec![path.to_path_buf()]
        };
        let mut parts = Vec::new();
        let mut kept = Vec::new();
        for file in &files {
            let f = open_keeping(file).map_err(|e| match e.raw_os_error() {
                Some(libc::EMFILE) | Some(libc::ENFILE) => Error::Data {
                    path: file.clone(),
                    msg: format!(
                        "cannot open it ({e}): the folder holds more files of {MAP_MIN_BYTES} bytes or more than \
                         this process may keep open; raise the limit (`ulimit -n`) or join the files into fewer"
                    ),
                },
                _ => Error::Io { context: format!("opening {}", file.display()), source: e },
            })?;
            let meta = f.metadata().io_context(|| format!("reading {}", file.display()))?;
            require_regular(file, &meta, "data file")?;
            let len = meta.len();
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
                parts.push(Part::InPlace(InPlace { file: f, path: file.clone(), len }));
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

    /// In-memory bytes owned by the stream (the Python package's `bpb(bytes)`).
    pub fn from_vec(name: &str, bytes: Vec<u8>) -> Self {
        Self::from_parts(name.into(), vec![Part::Read(bytes)])
    }

    fn from_parts(name: String, parts: Vec<Part>) -> Self {
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0u64;
        for p in &parts {
            starts.push(len);
            len += p.len();
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

    /// Copies bytes [offset, offset + out.len()) into `out`, across file boundaries. Errors
    /// when a file read in place has shrunk since it was opened.
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let mut pos = offset;
        let mut filled = 0;
        let mut i = self.starts.partition_point(|&s| s <= pos) - 1;
        while filled < out.len() {
            let part = &self.parts[i];
            let within = pos - self.starts[i];
            let n = ((part.len() - within) as usize).min(out.len() - filled);
            part.read(within, &mut out[filled..filled + n])?;
            filled += n;
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }
}

/// Opens a data file. Files read in place stay open for the whole run: when the process runs
/// out of file descriptors, its soft limit is raised to the hard one (often 1,024 → 524,288)
/// and the open tried again.
fn open_keeping(path: &Path) -> std::io::Result<File> {
    match File::open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) && raise_open_files_limit() => File::open(path),
        opened => opened,
    }
}

/// Raises the soft limit on open files to the hard limit; whether it rose.
fn raise_open_files_limit() -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max {
            return false;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
    }
}

/// Errors unless `meta` (of `path`) is a regular file: a FIFO, socket or device has no length
/// and a read of it may block or never end.
fn require_regular(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if meta.is_file() {
        return Ok(());
    }
    let t = meta.file_type();
    let kind = if meta.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(Error::Data { path: path.into(), msg: format!("is {kind}; pass a regular file as the {what}") })
}

/// Reads a file named by the user whole: it must be a regular file (a FIFO or device, which
/// may block or never end, is refused before it is opened) of at most `max_bytes` bytes
/// (checked before reading and again while reading). `what` names it in the errors ("model
/// config", "prompt file").
pub fn read_regular_file(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Data { path: path.into(), msg: format!("cannot read the {what} ({e})") })?;
    require_regular(path, &meta, what)?;
    let too_large = |n: String| Error::Data {
        path: path.into(),
        msg: format!("holds {n} bytes, more than the {max_bytes} a {what} may have; is it the right file?"),
    };
    if meta.len() > max_bytes {
        return Err(too_large(meta.len().to_string()));
    }
    let file = File::open(path).io_context(|| format!("opening {}", path.display()))?;
    // Checked again on the open file: the path may have been replaced in between.
    require_regular(path, &file.metadata().io_context(|| format!("reading {}", path.display()))?, what)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).io_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(format!("more than {max_bytes}")));
    }
    Ok(bytes)
}

/// The regular files under `root` that `keep` accepts, recursively, sorted by path; with
/// `skip_hidden`, names starting with '.' are left out. The walk stays inside `root` and ends:
/// a symbolic link (to a kept file or to a folder) whose target lies outside `root` is
/// refused, naming the link, and so is a folder reached a second time, by a link to one of its
/// parents (a loop) or by a second path, told apart by (device, inode). FIFOs, sockets and
/// devices inside are skipped: they have no bytes to read and may block.
pub fn folder_files(root: &Path, skip_hidden: bool, keep: &dyn Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let canonical_root = root
        .canonicalize()
        .map_err(|e| Error::Data { path: root.into(), msg: format!("cannot read the folder ({e})") })?;
    let root_meta = std::fs::metadata(&canonical_root).io_context(|| format!("reading {}", root.display()))?;
    let mut seen = HashSet::from([(root_meta.dev(), root_meta.ino())]);
    let mut out = Vec::new();
    walk(root, &canonical_root, skip_hidden, keep, &mut seen, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(
    dir: &Path,
    root: &Path,
    skip_hidden: bool,
    keep: &dyn Fn(&Path) -> bool,
    seen: &mut HashSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let entries = std::fs::read_dir(dir).io_context(|| format!("listing {}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.io_context(|| format!("listing {}", dir.display()))?;
        if skip_hidden && entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        paths.push(entry.path());
    }
    paths.sort(); // the same error whatever order the folder lists its entries in
    for path in paths {
        let link = std::fs::symlink_metadata(&path).io_context(|| format!("reading {}", path.display()))?;
        let is_link = link.file_type().is_symlink();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(_) if is_link && !keep(&path) => continue, // a broken link the caller would not read
            Err(e) if is_link => {
                return Err(Error::Data {
                    path: path.clone(),
                    msg: format!("is a symbolic link that cannot be followed ({e}); remove it or fix its target"),
                })
            }
            Err(e) => return Err(Error::Io { context: format!("reading {}", path.display()), source: e }),
        };
        if !meta.is_dir() && !(meta.is_file() && keep(&path)) {
            continue;
        }
        if is_link {
            let target = path.canonicalize().io_context(|| format!("following {}", path.display()))?;
            if !target.starts_with(root) {
                return Err(Error::Data {
                    path: path.clone(),
                    msg: format!(
                        "is a symbolic link to {}, outside the folder {}; only files inside it are read: \
                         copy the target in or remove the link",
                        target.display(),
                        root.display()
                    ),
                });
            }
        }
        if meta.is_dir() {
            if !seen.insert((meta.dev(), meta.ino())) {
                return Err(Error::Data {
                    path: path.clone(),
                    msg: "leads to a folder the walk has already reached (a symbolic link loop, or a second \
                          link to one folder); remove the link"
                        .into(),
                });
            }
            walk(&path, root, skip_hidden, keep, seen, out)?;
        } else {
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

    /// Bytes [offset, offset + len) of this split, zero-padded past its end. Errors when a
    /// data file has shrunk since it was opened.
    pub fn window(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let avail = self.len.saturating_sub(offset).min(len as u64) as usize;
        if avail > 0 {
            self.stream.read(self.start + offset, &mut out[..avail])?;
        }
        Ok(out)
    }

    /// `real` bytes from `offset`, then zero padding up to `len` bytes.
    pub fn padded_window(&self, offset: u64, real: usize, len: usize) -> Result<Vec<u8>> {
        let mut out = self.window(offset, real.min(len))?;
        out.resize(len, 0);
        Ok(out)
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
                ids.extend(split.window(start, context)?.into_iter().map(u32::from));
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
                ids.extend(split.padded_window(start, real, context)?.into_iter().map(u32::from));
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
