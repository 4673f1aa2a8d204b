//! Document boundaries in a byte stream: where each file, image or clip starts.
//!
//! The converters (`megabyte-data`'s `image`, `audio` and `code`) write a sidecar index next to
//! their output, `OUT.documents.json`, as a [`DocumentIndex`]: either a fixed record size
//! (every image is W·H·C bytes) or the list of document start offsets, plus a description of
//! the bytes. A file without a sidecar is one
//! document, so a folder of plain files is one document per file.
//!
//! With isolation on (`--documents`), a window never starts before its document's first
//! byte: windows are the document's *tiles* (starting at d, d + T, d + 2T, … for a document
//! starting at d), bytes past the document's end are zero padding, and their losses are not
//! counted. Causality does the rest: a byte's loss depends only on the bytes before it in its
//! window, which all belong to its own document.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Suffix of the sidecar index: `data.bin` → `data.bin.documents.json`.
pub const SIDECAR_SUFFIX: &str = ".documents.json";

const INDEX_FORMAT: u32 = 1;

/// The sidecar index of one byte file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocumentIndex {
    pub format: u32,
    /// Length of the byte file it describes (checked when read).
    pub bytes: u64,
    /// Every document has this many bytes (images, fixed-length records)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_bytes: Option<u64>,
    /// …or documents start at these offsets (ascending, the first 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts: Option<Vec<u64>>,
    /// What the bytes are (kind, image shape and order, audio format, source paths): for
    /// people and for `generate`'s checks, not needed to read the documents.
    #[serde(default)]
    pub about: serde_json::Value,
}

impl DocumentIndex {
    /// Documents of a fixed size.
    pub fn records(bytes: u64, record_bytes: u64, about: serde_json::Value) -> Self {
        DocumentIndex { format: INDEX_FORMAT, bytes, record_bytes: Some(record_bytes), starts: None, about }
    }

    /// Documents starting at `starts`.
    pub fn starts(bytes: u64, starts: Vec<u64>, about: serde_json::Value) -> Self {
        DocumentIndex { format: INDEX_FORMAT, bytes, record_bytes: None, starts: Some(starts), about }
    }

    /// The sidecar path of a byte file.
    pub fn sidecar(data: &Path) -> PathBuf {
        let mut name = data.as_os_str().to_owned();
        name.push(SIDECAR_SUFFIX);
        PathBuf::from(name)
    }

    /// The document start offsets, checked against the index's own rules.
    pub fn document_starts(&self) -> std::result::Result<Vec<u64>, String> {
        match (&self.record_bytes, &self.starts) {
            (Some(r), None) => {
                if *r == 0 || self.bytes % r != 0 {
                    return Err(format!("{} bytes are not a whole number of {r}-byte records", self.bytes));
                }
                Ok((0..self.bytes / r).map(|i| i * r).collect())
            }
            (None, Some(s)) => {
                if self.bytes > 0 && s.first() != Some(&0) {
                    return Err("the first document must start at 0".into());
                }
                if s.windows(2).any(|w| w[0] >= w[1]) || s.last().is_some_and(|&l| l >= self.bytes.max(1)) {
                    return Err(format!("starts must be strictly increasing and below {}", self.bytes));
                }
                Ok(s.clone())
            }
            _ => Err("give exactly one of record_bytes and starts".into()),
        }
    }

    /// Reads and checks `data`'s sidecar against the file's length; `None` when there is none.
    pub fn read_for(data: &Path, data_len: u64) -> Result<Option<Vec<u64>>> {
        let path = Self::sidecar(data);
        if !path.exists() {
            return Ok(None);
        }
        let bad = |msg: String| Error::Data { path: path.clone(), msg };
        let text = crate::data::read_regular_file(&path, crate::data::SIDECAR_MAX_BYTES, "document index")?;
        let index: DocumentIndex =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not a document index ({e})")))?;
        if index.format != INDEX_FORMAT {
            return Err(bad(format!("format {} is not the supported {INDEX_FORMAT}", index.format)));
        }
        if index.bytes != data_len {
            return Err(bad(format!(
                "describes {} bytes but {} has {data_len}; rewrite both with `megabyte data`",
                index.bytes,
                data.display()
            )));
        }
        index.document_starts().map(Some).map_err(bad)
    }

    /// Writes the sidecar of `data` (atomically: a temporary file renamed into place).
    pub fn write_for(&self, data: &Path) -> Result<PathBuf> {
        let path = Self::sidecar(data);
        let tmp = temp_path(&path);
        let text = serde_json::to_vec_pretty(self)?;
        std::fs::write(&tmp, text).io_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).io_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(path)
    }
}

/// `dir/name` → `dir/.name.tmp-PID`: where the sidecar is written before renaming into place.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// The document start offsets of a training stream opened with [`crate::data::ByteStream::open`]
/// (same files, same order): each file's sidecar index, or the file as one document.
pub fn stream_documents(files: &[(PathBuf, u64)]) -> Result<Vec<u64>> {
    let mut starts = Vec::new();
    let mut offset = 0u64;
    for (file, len) in files {
        match DocumentIndex::read_for(file, *len)? {
            Some(s) => starts.extend(s.into_iter().map(|d| offset + d)),
            None => starts.push(offset),
        }
        offset += len;
    }
    Ok(starts)
}

/// The tiles of documents (ascending `starts` within `len` bytes): windows of up to `t`
/// bytes at d, d + t, … inside each document. Returns (start, real bytes) pairs.
pub fn tiles(starts: &[u64], len: u64, t: usize) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    for (i, &d) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(len).min(len);
        let mut s = d;
        while s < end {
            out.push((s, (end - s).min(t as u64) as usize));
            s += t as u64;
        }
    }
    out
}

/// The document [start, end) holding byte `pos` of `len` (`starts` ascending, the first 0).
pub fn document_of(starts: &[u64], len: u64, pos: u64) -> (u64, u64) {
    let i = starts.partition_point(|&s| s <= pos).saturating_sub(1);
    (starts[i], starts.get(i + 1).copied().unwrap_or(len))
}
