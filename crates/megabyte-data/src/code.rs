//! Source code as bytes: a folder of source files joined into one stream, each file preceded
//! by the document separator, with a sidecar index of where each document starts.
//!
//! The separator is one NUL byte (0x00): it never occurs in source text (a file that holds
//! one is refused as binary), so the model learns it as "a new file starts here", and a
//! prompt of "\0" asks for the start of a file. Each document is `0x00` followed by the file's
//! bytes, and the index points at the separator.

use std::path::{Path, PathBuf};

use megabyte::documents::DocumentIndex;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::files::{has_extension, list_files, OutputFile};

/// The byte written before every file.
pub const SEPARATOR: u8 = 0x00;

/// Extensions joined when none are given.
pub const DEFAULT_EXTENSIONS: &[&str] = &[
    "rs", "py", "c", "h", "cc", "cpp", "hpp", "go", "java", "js", "ts", "rb", "sh", "toml", "md",
];

/// What a join wrote.
#[derive(Clone, Debug, Serialize)]
pub struct CodeReport {
    pub output: PathBuf,
    pub index: PathBuf,
    pub files: usize,
    pub bytes: u64,
}

/// Joins every file under `folder` whose extension is one of `extensions` (without dots,
/// case-insensitive; hidden files and folders skipped; a symbolic link to a file or folder
/// outside `folder` refused, so an untrusted tree cannot pull in `/etc/passwd`), in sorted
/// path order, into `output`:
/// for each file the separator then its bytes. Writes the sidecar index of document starts
/// with the relative paths. Nothing is left at `output` on an error.
pub fn join_code(folder: &Path, output: &Path, extensions: &[String]) -> Result<CodeReport> {
    if !folder.is_dir() {
        return Err(Error::Data { path: folder.into(), msg: "is not a folder; pass a folder of source files".into() });
    }
    let exts: Vec<&str> = extensions.iter().map(|e| e.trim_start_matches('.')).collect();
    if exts.is_empty() || exts.iter().any(|e| e.is_empty()) {
        return Err(Error::Input("give one or more file extensions, e.g. rs,py".into()));
    }
    let output_abs = std::path::absolute(output).ok();
    let files: Vec<PathBuf> = list_files(folder, &|p| has_extension(p, &exts))?
        .into_iter()
        .filter(|p| std::path::absolute(p).ok() != output_abs)
        .collect();
    if files.is_empty() {
        return Err(Error::Data {
            path: folder.into(),
            msg: format!("holds no files with the extensions {}", exts.join(", ")),
        });
    }
    let mut out = OutputFile::create(output)?;
    let mut starts = Vec::with_capacity(files.len());
    let mut paths = Vec::with_capacity(files.len());
    for file in &files {
        let bytes = std::fs::read(file).io_context(|| format!("reading {}", file.display()))?;
        if let Some(at) = bytes.iter().position(|&b| b == SEPARATOR) {
            return Err(Error::Data {
                path: file.clone(),
                msg: format!("holds a NUL byte at offset {at}, the document separator: a binary file? leave its extension out"),
            });
        }
        starts.push(out.written());
        out.write(&[SEPARATOR])?;
        out.write(&bytes)?;
        paths.push(file.strip_prefix(folder).unwrap_or(file).to_path_buf());
    }
    let bytes = out.written();
    let about = serde_json::json!({
        "kind": "code",
        "separator": "one 0x00 byte before each file; starts point at it",
        "folder": folder,
        "paths": paths,
    });
    let index = DocumentIndex::starts(bytes, starts, about);
    let output = out.finish(&index)?;
    Ok(CodeReport { index: DocumentIndex::sidecar(&output), output, files: files.len(), bytes })
}
