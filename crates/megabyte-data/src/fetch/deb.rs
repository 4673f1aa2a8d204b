//! Data sets shipped as Debian packages: `fashion-mnist`, `speech-en` and `code`.
//!
//! Each set pins one `.deb` (package, version, size, sha256 and md5 from the Debian
//! `Packages` index, and its sha1 for snapshot.debian.org). The package is downloaded to a
//! hidden temporary file in `DIR`, its size and checksums are checked, and only then is it
//! unpacked, streaming, into a hidden temporary folder in `DIR`, which is renamed to
//! `DIR/NAME` once every check has passed. Every error path removes the temporary file and
//! folder, so `DIR/NAME` either is complete or does not exist.
//!
//! A `.deb` is an `ar` archive whose `data.tar.xz` (or `.gz`) holds the installed files.
//! Paths inside it are only ever joined to the temporary folder after a check that they
//! have no `..`, root or prefix component.
//!
//! Sets of many files (speech-en, code) are split into `train/` and `test/` *by file*
//! ([`is_test_file`]), so that held-out bits-per-byte is measured on files never trained on.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;
use md5::{Digest, Md5};
use sha2::Sha256;

use super::{
    download, ensure_dir, fetch_err, first_that_works, hex, http_agent, read_retry, remove_stale_temps, Dataset,
    FetchEvent, FetchReport, FetchedFile, Temps, SOURCE_FILE,
};
use crate::error::{Error, IoContext, Result};

/// One pinned Debian package and what to take out of it.
pub(super) struct DebSet {
    pub dataset: Dataset,
    pub package: &'static str,
    pub version: &'static str,
    /// Path under a Debian mirror's root, as in the `Filename:` field of `Packages`.
    pub pool_path: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    pub md5: &'static str,
    /// For `https://snapshot.debian.org/file/SHA1`, which keeps every file Debian ever shipped.
    pub sha1: &'static str,
    pub licence: &'static str,
    pub unpack: Unpack,
}

/// What is taken out of a package's data archive.
pub(super) enum Unpack {
    /// Gzipped files in one folder, written decompressed under their names without `.gz`;
    /// each raw file must have the given length and md5.
    GzFiles {
        dir: &'static str,
        files: &'static [RawFile],
    },
    /// The files under `dir` that `keep` accepts (paths relative to `dir`), written under
    /// `all/` when `all` is given (hard links, or copies where links fail) and under
    /// `train/` or `test/`. Exactly `expect` (files, bytes) must be taken: the package is
    /// pinned, so any other count means the filter or the unpacking changed.
    Files {
        dir: &'static str,
        keep: fn(&str) -> bool,
        all: Option<&'static str>,
        expect: (u64, u64),
    },
    /// The same, from a `.tar.xz` inside the package (the Linux source tarball); paths are
    /// taken relative to the tarball's top folder.
    TarXz {
        member: &'static str,
        keep: fn(&str) -> bool,
        expect: (u64, u64),
    },
}

/// A raw file of a [`Unpack::GzFiles`] set.
pub(super) struct RawFile {
    pub name: &'static str,
    pub bytes: u64,
    pub md5: &'static str,
}

pub(super) const FASHION_MNIST: DebSet = DebSet {
    dataset: Dataset::FashionMnist,
    package: "dataset-fashion-mnist",
    version: "0.0~git20200523.55506a9-1",
    pool_path: "pool/main/d/dataset-fashion-mnist/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    size: 30_900_652,
    sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    md5: "28c148d3a02fef8285239e22d1f420b1",
    sha1: "08712481535c182683c7803e3f9b81fd8773e695",
    licence: "MIT (Zalando SE)",
    unpack: Unpack::GzFiles {
        dir: "usr/share/datasets/fashion-mnist",
        // Debian recompressed the .gz files, so the checks are on the raw bytes, which are
        // those Zalando published.
        files: &[
            RawFile {
                name: "train-images-idx3-ubyte",
                bytes: 47_040_016,
                md5: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            },
            RawFile {
                name: "train-labels-idx1-ubyte",
                bytes: 60_008,
                md5: "9018921c3c673c538a1fc5bad174d6f9",
            },
            RawFile {
                name: "t10k-images-idx3-ubyte",
                bytes: 7_840_016,
                md5: "8181f5470baa50b63fa0f6fddb340f0a",
            },
            RawFile {
                name: "t10k-labels-idx1-ubyte",
                bytes: 10_008,
                md5: "15d484375f8d13e6eb1aabb0c3f46965",
            },
        ],
    },
};

pub(super) const SPEECH_EN: DebSet = DebSet {
    dataset: Dataset::SpeechEn,
    package: "asterisk-core-sounds-en-wav",
    version: "1.6.1-1",
    pool_path: "pool/main/a/asterisk-core-sounds/asterisk-core-sounds-en-wav_1.6.1-1_all.deb",
    size: 18_272_864,
    sha256: "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d",
    md5: "2b3de0111251e3ac45be97e1a04b5a8f",
    sha1: "09697db658b2f81a74c0a9e63e57e565e270a3f4",
    licence: "CC-BY-SA-3.0 (Digium, Inc.; voice: Allison Smith)",
    unpack: Unpack::Files {
        dir: "usr/share/asterisk/sounds/en_US_f_Allison",
        keep: is_wav,
        all: Some("wav"),
        expect: (568, 24_484_548),
    },
};

pub(super) const CODE: DebSet = DebSet {
    dataset: Dataset::Code,
    package: "linux-source-6.1",
    version: "6.1.176-1",
    pool_path: "pool/main/l/linux/linux-source-6.1_6.1.176-1_all.deb",
    size: 139_131_140,
    sha256: "9305d1a151b8e83dcb88aa11361e7b9513f0c252bdf7f5647e4542762d99c094",
    md5: "bc2984f44a77c52d1a4c87c3a67300e7",
    sha1: "88a9623d7b92776fbdae70dba1510eeca618a7fa",
    licence: "GPL-2.0 (the Linux kernel; some files dual-licensed, see their SPDX lines)",
    unpack: Unpack::TarXz {
        member: "usr/src/linux-source-6.1.tar.xz",
        keep: is_handwritten_c,
        // 55,444 .c/.h files (1.18 GB) in 6.1.176, 724 of them generated (402 MB; see
        // `is_generated_header`).
        expect: (54_720, 774_492_321),
    },
};

fn is_wav(rel: &str) -> bool {
    rel.ends_with(".wav")
}

/// C sources and headers, except generated register headers.
pub(super) fn is_handwritten_c(rel: &str) -> bool {
    (rel.ends_with(".c") || rel.ends_with(".h")) && !is_generated_header(rel)
}

/// Register headers generated from hardware descriptions: every file under an `asic_reg/`
/// folder (AMD GPUs, 373 files and 390 MB in 6.1, a third of all C bytes; Habana
/// accelerators, 348 files, 10 MB) and the AMD `*_enum.h` tables next to them (2.6 MB).
/// They are long runs of `#define REG_FIELD__SHIFT 0x…` that a byte model learns little
/// from and that would dominate the bits-per-byte of whichever split they land in.
pub(super) fn is_generated_header(rel: &str) -> bool {
    rel.split('/').any(|c| c == "asic_reg")
        || (rel.starts_with("drivers/gpu/drm/amd/include/") && rel.ends_with("_enum.h"))
}

/// Whether a file goes to the test split: when the md5 of its relative path (with `/`
/// separators), read as a little-endian u64 from its first 8 bytes, is 0 mod 10 (about one
/// file in ten). A hash of the path, not a random draw or the file's position, so the split
/// is the same on every machine and run, and a file keeps its split when others come or go.
pub fn is_test_file(rel: &str) -> bool {
    let d = Md5::digest(rel.as_bytes());
    let first = u64::from_le_bytes(d[..8].try_into().expect("md5 has 16 bytes"));
    first % 10 == 0
}

/// The URLs tried for a pinned package, in order.
pub(super) fn urls(set: &DebSet) -> Vec<String> {
    vec![
        format!("https://deb.debian.org/debian/{}", set.pool_path),
        // When Debian supersedes the version, it leaves the mirrors; snapshot keeps it.
        format!("https://snapshot.debian.org/file/{}", set.sha1),
    ]
}

fn file_name(set: &DebSet) -> &'static str {
    set.pool_path.rsplit('/').next().unwrap_or(set.pool_path)
}

fn hint(set: &DebSet) -> String {
    format!(
        "Nothing was written. If this machine is offline or behind a firewall, check the connection \
(a proxy can be set with HTTPS_PROXY / HTTP_PROXY), or get the package by hand (`apt-get download \
{pkg}={ver}` on Debian, or {url}) and unpack it with `megabyte data fetch {name} --from {file}`, which \
applies the same checks (size {size} bytes, sha256 {sha}).",
        pkg = set.package,
        ver = set.version,
        url = urls(set)[0],
        name = set.dataset.name(),
        file = file_name(set),
        size = set.size,
        sha = set.sha256,
    )
}

// ---------------------------------------------------------------------------------------
// Driving

/// Downloads the pinned package, checks it and unpacks it into `root/NAME`.
pub(super) fn fetch(set: &DebSet, root: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<FetchReport> {
    let name = set.dataset.name();
    let out = set.dataset.dir(root);
    if let Some(report) = already_present(set, &out) {
        return Ok(report);
    }
    check_replaceable(set, &out)?;
    let created = ensure_dir(root)?;
    remove_stale_temps(root);
    let result = {
        let agent = http_agent();
        let mut temps = Temps::default(); // the download, removed at the end of this block
        let deb = temps.path(root, file_name(set));
        let what = format!("{} {}", set.package, set.version);
        // Unpacking is not part of an attempt: a package that passed its checks unpacks the
        // same whichever URL it came from.
        first_that_works(name, &what, &urls(set), &hint(set), progress, |url, progress| {
            download(&agent, name, url, &deb, None, progress)?;
            verify_deb(set, &deb, progress).map(|()| url.clone())
        })
        .and_then(|url| install(set, &deb, root, &url, progress))
    };
    if result.is_err() && created {
        let _ = fs::remove_dir(root); // only succeeds when empty
    }
    result
}

/// Unpacks a copy of the pinned package the user already has, with the same checks.
pub(super) fn from_file(
    set: &DebSet,
    deb: &Path,
    root: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<FetchReport> {
    let out = set.dataset.dir(root);
    check_replaceable(set, &out)?;
    let created = ensure_dir(root)?;
    remove_stale_temps(root);
    let result =
        verify_deb(set, deb, progress).and_then(|()| install(set, deb, root, &deb.display().to_string(), progress));
    if result.is_err() && created {
        let _ = fs::remove_dir(root);
    }
    result
}

/// The file is the pinned package: its size, sha256 and md5 match.
fn verify_deb(set: &DebSet, deb: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<()> {
    let name = set.dataset.name();
    progress(FetchEvent::Verifying);
    let mut file = File::open(deb).io_context(|| format!("opening {}", deb.display()))?;
    let (mut sha, mut md5) = (Sha256::new(), Md5::new());
    let mut buf = vec![0u8; 1 << 18];
    let mut len = 0u64;
    loop {
        let n = read_retry(&mut file, &mut buf).io_context(|| format!("reading {}", deb.display()))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
        len += n as u64;
    }
    let (sha, md5) = (hex(&sha.finalize()), hex(&md5.finalize()));
    if len != set.size || sha != set.sha256 || md5 != set.md5 {
        return Err(fetch_err(
            name,
            format!(
                "{}: {len} bytes with sha256 {sha}, md5 {md5}; expected {} {} ({} bytes, sha256 {}, md5 {}): \
                 the file is corrupt or not that package",
                deb.display(),
                set.package,
                set.version,
                set.size,
                set.sha256,
                set.md5
            ),
        ));
    }
    Ok(())
}

/// A temporary folder in the destination, removed with everything in it on drop unless kept.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Staging {
    fn new(temps: &mut Temps, root: &Path, what: &str) -> Result<Staging> {
        let path = temps.path(root, what);
        // `Temps` only removes files; this folder is removed by `Staging`.
        temps.keep(&path);
        fs::create_dir(&path).io_context(|| format!("creating {}", path.display()))?;
        super::register(&path);
        Ok(Staging { path, keep: false })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
        super::unregister(&self.path);
    }
}

/// `out` may be (re)written: it does not exist, is empty, or is an earlier fetch of this set
/// (another version, or one whose files were changed since).
fn check_replaceable(set: &DebSet, out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let empty = fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
    let ours = fs::read_to_string(out.join(SOURCE_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["dataset"].as_str() == Some(set.dataset.name()));
    if empty || ours {
        return Ok(());
    }
    Err(Error::Input(format!(
        "{} exists and is not a fetch of {}; move it away or pass another --dir",
        out.display(),
        set.dataset.name()
    )))
}

/// Unpacks a verified package into a temporary folder in `root`, writes `SOURCE.json` there
/// and renames the folder to `root/NAME` (moving an earlier one aside and removing it).
fn install(
    set: &DebSet,
    deb: &Path,
    root: &Path,
    source: &str,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<FetchReport> {
    let name = set.dataset.name();
    let out = set.dataset.dir(root);
    let mut temps = Temps::default();
    let mut staging = Staging::new(&mut temps, root, name)?;
    let file = File::open(deb).io_context(|| format!("opening {}", deb.display()))?;
    let outputs = unpack(
        set,
        BufReader::with_capacity(1 << 20, file),
        &staging.path,
        &out,
        progress,
    )?;

    let fetched_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "dataset": name,
        "source": source,
        "package": set.package,
        "version": set.version,
        "licence": set.licence,
        "deb_bytes": set.size,
        "deb_sha256": set.sha256,
        "deb_md5": set.md5,
        "split_rule": match set.unpack {
            Unpack::GzFiles { .. } => serde_json::Value::Null,
            _ => "test when md5(relative path)[0..8] as little-endian u64 % 10 == 0".into(),
        },
        "outputs": outputs.iter().map(Output::to_json).collect::<Vec<_>>(),
        "fetched_unix_time": fetched_unix,
    });
    let record = staging.path.join(SOURCE_FILE);
    fs::write(&record, serde_json::to_string_pretty(&json)? + "\n")
        .io_context(|| format!("writing {}", record.display()))?;

    // Commit: move an earlier copy aside (removed when `old` drops), then rename.
    let _old = if out.exists() {
        let old = Staging::new(&mut temps, root, &format!("{name}.old"))?;
        // The earlier copy goes here: an exit on interruption must not remove it.
        super::unregister(&old.path);
        fs::remove_dir(&old.path).io_context(|| format!("removing {}", old.path.display()))?;
        fs::rename(&out, &old.path).io_context(|| format!("moving {} aside", out.display()))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = fs::rename(&staging.path, &out) {
        if let Some(old) = &_old {
            let _ = fs::rename(&old.path, &out); // put the earlier copy back
        }
        return Err(e).io_context(|| format!("renaming {} to {}", staging.path.display(), out.display()));
    }
    staging.keep = true;
    Ok(report(set, &out, &outputs, false, Some(source.to_string())))
}

/// A file or folder of a fetched set, relative to `DIR/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Output {
    rel: String,
    files: u64,
    bytes: u64,
    /// md5 of a single raw file (GzFiles).
    md5: Option<String>,
}

impl Output {
    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"path": self.rel, "files": self.files, "bytes": self.bytes});
        if let Some(m) = &self.md5 {
            v["md5"] = m.clone().into();
        }
        v
    }
}

fn report(set: &DebSet, out: &Path, outputs: &[Output], already_present: bool, source: Option<String>) -> FetchReport {
    FetchReport {
        dataset: set.dataset,
        dir: out.to_path_buf(),
        files: outputs
            .iter()
            .map(|o| FetchedFile {
                path: out.join(&o.rel),
                bytes: o.bytes,
                files: o.files,
            })
            .collect(),
        already_present,
        source,
        md5: set.md5.to_string(),
        sha256: Some(set.sha256.to_string()),
    }
}

/// `SOURCE.json` names this package's sha256, and every output it lists is there with the
/// recorded number of files and bytes.
fn already_present(set: &DebSet, out: &Path) -> Option<FetchReport> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join(SOURCE_FILE)).ok()?).ok()?;
    if v["dataset"].as_str()? != set.dataset.name() || v["deb_sha256"].as_str()? != set.sha256 {
        return None;
    }
    let mut outputs = Vec::new();
    for o in v["outputs"].as_array()? {
        let rel = o["path"].as_str()?;
        if safe_rel(Path::new(rel))? != rel {
            return None;
        }
        let want = Output {
            rel: rel.to_string(),
            files: o["files"].as_u64()?,
            bytes: o["bytes"].as_u64()?,
            md5: o["md5"].as_str().map(str::to_string),
        };
        let (files, bytes) = count(&out.join(rel))?;
        if (files, bytes) != (want.files, want.bytes) {
            return None;
        }
        outputs.push(want);
    }
    if outputs.is_empty() {
        return None;
    }
    let source = v["source"].as_str().map(str::to_string);
    Some(report(set, out, &outputs, true, source))
}

/// Files and bytes in a file or under a folder.
fn count(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((1, meta.len()));
    }
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ok()? {
            let entry = entry.ok()?;
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    Some((files, bytes))
}

// ---------------------------------------------------------------------------------------
// Unpacking

/// Unpacks what `set.unpack` asks for from a verified package into `staging`. `out` is the
/// final folder, only used to name files in progress events.
fn unpack(
    set: &DebSet,
    deb: impl Read,
    staging: &Path,
    out: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<Vec<Output>> {
    let name = set.dataset.name();
    match &set.unpack {
        Unpack::GzFiles { dir, files } => with_data_tar(deb, name, |tar| {
            let mut found: Vec<Option<Output>> = vec![None; files.len()];
            for_each_file(tar, name, "data.tar", &mut |rel, r| {
                let Some(base) = under(rel, dir).and_then(|b| b.strip_suffix(".gz")) else {
                    return Ok(());
                };
                let Some(i) = files.iter().position(|f| f.name == base) else {
                    return Ok(());
                };
                progress(FetchEvent::Writing { file: out.join(base) });
                found[i] = Some(gunzip_checked(name, &files[i], r, staging)?);
                Ok(())
            })?;
            let missing: Vec<&str> = files
                .iter()
                .zip(&found)
                .filter(|(_, o)| o.is_none())
                .map(|(f, _)| f.name)
                .collect();
            if !missing.is_empty() {
                return Err(fetch_err(
                    name,
                    format!("{}: no {}.gz under {dir}", set.package, missing.join(".gz, ")),
                ));
            }
            Ok(found.into_iter().flatten().collect())
        }),
        Unpack::Files { dir, keep, all, expect } => with_data_tar(deb, name, |tar| {
            let mut w = SplitWriter::new(name, staging, *all);
            for_each_file(tar, name, "data.tar", &mut |rel, r| match under(rel, dir) {
                Some(sub) if keep(sub) => w.add(sub, r, progress),
                _ => Ok(()),
            })?;
            w.finish(*expect)
        }),
        Unpack::TarXz { member, keep, expect } => with_data_tar(deb, name, |tar| {
            let mut w = SplitWriter::new(name, staging, None);
            let mut seen = false;
            for_each_file(tar, name, "data.tar", &mut |rel, r| {
                if rel != *member {
                    return Ok(());
                }
                seen = true;
                let mut inner = liblzma::read::XzDecoder::new_multi_decoder(r);
                for_each_file(&mut inner, name, member, &mut |rel, r| {
                    // Paths are relative to the tarball's top folder (`linux-source-6.1/`).
                    match rel.split_once('/') {
                        Some((_, sub)) if keep(sub) => w.add(sub, r, progress),
                        _ => Ok(()),
                    }
                })
            })?;
            if !seen {
                return Err(fetch_err(name, format!("{}: no {member} in the package", set.package)));
            }
            w.finish(*expect)
        }),
    }
}

/// `rel` relative to folder `dir`, when it lies under it.
fn under<'a>(rel: &'a str, dir: &str) -> Option<&'a str> {
    rel.strip_prefix(dir)?.strip_prefix('/')
}

/// Calls `f` with the decompressed tar stream of a `.deb`'s data archive.
fn with_data_tar<T>(deb: impl Read, name: &str, f: impl FnOnce(&mut dyn Read) -> Result<T>) -> Result<T> {
    let bad = |msg: String| fetch_err(name, format!("not a valid .deb: {msg}"));
    let mut archive = ar::Archive::new(deb);
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let id = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        match id.as_str() {
            "data.tar" => return f(&mut entry),
            "data.tar.xz" => return f(&mut liblzma::read::XzDecoder::new_multi_decoder(entry)),
            "data.tar.gz" => return f(&mut MultiGzDecoder::new(entry)),
            // Debian's own packages use xz; zstd (Ubuntu's choice) would need another C library.
            other if other.starts_with("data.tar") => {
                return Err(bad(format!("{other} is not supported (only .xz and .gz)")))
            }
            _ => {}
        }
    }
    Err(bad("no data.tar member".into()))
}

/// Calls `visit` with the relative path and contents of every regular file in a tar stream
/// (`what` names the stream in errors). Links and folders are skipped; a path that would
/// leave the destination (`..`, absolute) is an error.
fn for_each_file(
    tar: &mut dyn Read,
    name: &str,
    what: &str,
    visit: &mut dyn FnMut(&str, &mut dyn Read) -> Result<()>,
) -> Result<()> {
    let bad = |e: io::Error| fetch_err(name, format!("{what}: not a valid tar archive: {e}"));
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = entry.path().map_err(bad)?.into_owned();
        let rel = safe_rel(&raw).ok_or_else(|| {
            fetch_err(
                name,
                format!("{what}: refusing the unsafe path {} in the archive", raw.display()),
            )
        })?;
        visit(&rel, &mut entry)?;
    }
    Ok(())
}

/// A path inside an archive as `a/b/c`, or `None` when it is empty, not UTF-8, or has a
/// component that could leave the folder it is joined to (`..`, `/`, a drive prefix).
pub(super) fn safe_rel(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Decompresses one gzipped member to `staging/NAME`, checking the raw length and md5.
fn gunzip_checked(name: &str, want: &RawFile, r: &mut dyn Read, staging: &Path) -> Result<Output> {
    let path = staging.join(want.name);
    let ctx = || format!("writing {}", path.display());
    let mut w = BufWriter::with_capacity(1 << 18, File::create(&path).io_context(ctx)?);
    let mut gz = MultiGzDecoder::new(r);
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 18];
    let mut len = 0u64;
    loop {
        let n = read_retry(&mut gz, &mut buf)
            .map_err(|e| fetch_err(name, format!("{}.gz: not valid gzip after {len} bytes: {e}", want.name)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).io_context(ctx)?;
        len += n as u64;
    }
    w.into_inner().map_err(|e| e.into_error()).io_context(ctx)?;
    let md5 = hex(&hasher.finalize());
    if len != want.bytes || md5 != want.md5 {
        return Err(fetch_err(
            name,
            format!(
                "{}: {len} bytes with md5 {md5}; expected {} bytes with md5 {}: the package is not the one pinned",
                want.name, want.bytes, want.md5
            ),
        ));
    }
    Ok(Output {
        rel: want.name.to_string(),
        files: 1,
        bytes: len,
        md5: Some(md5),
    })
}

/// Writes files under `train/` or `test/` by [`is_test_file`] (and, with `all`, every file
/// under `all/` too, the split folders then holding hard links to it).
struct SplitWriter<'a> {
    name: &'a str,
    staging: &'a Path,
    all: Option<(&'static str, Output)>,
    train: Output,
    test: Output,
    /// The last folder created, to skip `create_dir_all` for files in the same folder.
    last_dir: PathBuf,
}

impl<'a> SplitWriter<'a> {
    fn new(name: &'a str, staging: &'a Path, all: Option<&'static str>) -> Self {
        let empty = |rel: &str| Output {
            rel: rel.to_string(),
            files: 0,
            bytes: 0,
            md5: None,
        };
        SplitWriter {
            name,
            staging,
            all: all.map(|a| (a, empty(a))),
            train: empty("train"),
            test: empty("test"),
            last_dir: PathBuf::new(),
        }
    }

    fn add(&mut self, rel: &str, r: &mut dyn Read, progress: &mut dyn FnMut(FetchEvent)) -> Result<()> {
        let split = if is_test_file(rel) {
            &mut self.test
        } else {
            &mut self.train
        };
        let in_split = self.staging.join(&split.rel).join(rel);
        let bytes = match &mut self.all {
            None => write_file(&in_split, r, &mut self.last_dir)?,
            Some((all, all_out)) => {
                let first = self.staging.join(*all).join(rel);
                let bytes = write_file(&first, r, &mut self.last_dir)?;
                make_parent(&in_split, &mut self.last_dir)?;
                if fs::hard_link(&first, &in_split).is_err() {
                    fs::copy(&first, &in_split).io_context(|| format!("copying to {}", in_split.display()))?;
                }
                all_out.files += 1;
                all_out.bytes += bytes;
                bytes
            }
        };
        split.files += 1;
        split.bytes += bytes;
        let done = self.train.files + self.test.files;
        if done % 1000 == 0 {
            progress(FetchEvent::Extracting {
                files: done,
                bytes: self.train.bytes + self.test.bytes,
            });
        }
        Ok(())
    }

    fn finish(self, expect: (u64, u64)) -> Result<Vec<Output>> {
        let n = self.train.files + self.test.files;
        let bytes = self.train.bytes + self.test.bytes;
        if (n, bytes) != expect || self.train.files == 0 || self.test.files == 0 {
            return Err(fetch_err(
                self.name,
                format!(
                    "the package held {n} matching files of {bytes} bytes ({} train, {} test); expected {} files of {} bytes",
                    self.train.files, self.test.files, expect.0, expect.1
                ),
            ));
        }
        Ok(self
            .all
            .map(|a| a.1)
            .into_iter()
            .chain([self.train, self.test])
            .collect())
    }
}

fn make_parent(path: &Path, last_dir: &mut PathBuf) -> Result<()> {
    if let Some(parent) = path.parent() {
        if parent != last_dir.as_path() {
            fs::create_dir_all(parent).io_context(|| format!("creating {}", parent.display()))?;
            *last_dir = parent.to_path_buf();
        }
    }
    Ok(())
}

fn write_file(path: &Path, r: &mut dyn Read, last_dir: &mut PathBuf) -> Result<u64> {
    make_parent(path, last_dir)?;
    let ctx = || format!("writing {}", path.display());
    let mut w = BufWriter::with_capacity(1 << 16, File::create(path).io_context(ctx)?);
    let n = io::copy(r, &mut w).io_context(ctx)?;
    w.into_inner().map_err(|e| e.into_error()).io_context(ctx)?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use crate::fetch::tests::{files_under, TestDir};

    fn xz(bytes: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// A tar of regular files, plus a symlink (which unpacking must skip).
    fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut tb = tar::Builder::new(Vec::new());
        for (path, bytes) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            tb.append_data(&mut h, path, &bytes[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        tb.append_link(&mut h, "./a-link.c", "kernel/fork.c").unwrap();
        tb.into_inner().unwrap()
    }

    /// A `.deb`: an ar archive of `debian-binary`, `control.tar.xz` and `data.tar.xz`.
    fn deb_of(data_tar: &[u8]) -> Vec<u8> {
        let mut b = ar::Builder::new(Vec::new());
        let control = xz(&tar_of(&[("./control".into(), b"Package: x\n".to_vec())]));
        for (id, bytes) in [
            ("debian-binary", b"2.0\n".to_vec()),
            ("control.tar.xz", control),
            ("data.tar.xz", xz(data_tar)),
        ] {
            b.append(&ar::Header::new(id.as_bytes().to_vec(), bytes.len() as u64), &bytes[..])
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A set pinned to exactly these `.deb` bytes.
    fn pinned(dataset: Dataset, deb: &[u8], unpack: Unpack) -> DebSet {
        DebSet {
            dataset,
            package: "synthetic",
            version: "1",
            pool_path: "pool/main/s/synthetic_1_all.deb",
            size: deb.len() as u64,
            sha256: leak(hex(&Sha256::digest(deb))),
            md5: leak(hex(&Md5::digest(deb))),
            sha1: "0000000000000000000000000000000000000000",
            licence: "test",
            unpack,
        }
    }

    /// Fake kernel sources: what `is_handwritten_c` keeps, and everything in the tarball.
    fn kernel_tree() -> (BTreeSet<String>, Vec<(String, Vec<u8>)>) {
        let mut kept = BTreeSet::new();
        let mut files = Vec::new();
        for i in 0..60 {
            let rel = format!("lib/f{i}.{}", if i % 3 == 0 { "h" } else { "c" });
            files.push((
                format!("linux-source-6.1/{rel}"),
                format!("int f{i}(void);\n").into_bytes(),
            ));
            kept.insert(rel);
        }
        for rel in ["kernel/fork.c", "include/linux/list.h"] {
            files.push((format!("linux-source-6.1/{rel}"), b"/* kept */\n".to_vec()));
            kept.insert(rel.to_string());
        }
        for rel in [
            "drivers/gpu/drm/amd/include/asic_reg/gc/gc_9_0_sh_mask.h",
            "drivers/misc/habanalabs/include/gaudi/asic_reg/gaudi_regs.h",
            "drivers/gpu/drm/amd/include/navi10_enum.h",
            "README",
            "scripts/checkpatch.pl",
            "lib/f1.c.orig",
        ] {
            files.push((format!("linux-source-6.1/{rel}"), b"#define DROPPED 1\n".to_vec()));
        }
        (kept, files)
    }

    /// The kept paths, their (files, bytes), and the package.
    fn code_deb() -> (BTreeSet<String>, (u64, u64), Vec<u8>) {
        let (kept, files) = kernel_tree();
        let bytes = files
            .iter()
            .filter(|(p, _)| kept.contains(p.strip_prefix("linux-source-6.1/").unwrap()))
            .map(|(_, b)| b.len() as u64)
            .sum();
        let expect = (kept.len() as u64, bytes);
        let data = tar_of(&[
            ("./usr/share/doc/linux-source-6.1/copyright".into(), b"GPL-2.0".to_vec()),
            ("./usr/src/linux-source-6.1.tar.xz".into(), xz(&tar_of(&files))),
        ]);
        (kept, expect, deb_of(&data))
    }

    fn code_set(deb: &[u8], expect: (u64, u64)) -> DebSet {
        pinned(
            Dataset::Code,
            deb,
            Unpack::TarXz {
                member: "usr/src/linux-source-6.1.tar.xz",
                keep: is_handwritten_c,
                expect,
            },
        )
    }

    fn under_split(root: &Path, split: &str) -> BTreeSet<String> {
        let dir = root.join(split);
        files_under(&dir).into_iter().map(|f| f.replace('\\', "/")).collect()
    }

    #[test]
    fn code_package_is_filtered_split_by_file_and_lands_whole() {
        let (kept, expect, deb) = code_deb();
        let src = TestDir::new("debsrc");
        let deb_path = src.0.join("linux.deb");
        fs::write(&deb_path, &deb).unwrap();
        let set = code_set(&deb, expect);

        let root = TestDir::new("code");
        let mut events = Vec::new();
        let r = from_file(&set, &deb_path, &root.0, &mut |e| events.push(e)).unwrap();
        assert!(events.contains(&FetchEvent::Verifying));
        // Only the data set's folder is left: no temporary file or folder.
        assert_eq!(fs::read_dir(&root.0).unwrap().count(), 1);
        let out = root.0.join("code");
        assert_eq!(r.dir, out);
        let (train, test) = (under_split(&out, "train"), under_split(&out, "test"));

        // The filter: every .c/.h except generated register headers, nothing else.
        let all: BTreeSet<String> = train.union(&test).cloned().collect();
        assert_eq!(all, kept);
        assert!(all.iter().all(|f| !f.contains("asic_reg") && !f.ends_with("_enum.h")));
        // The split: disjoint, by the path rule, both non-empty.
        assert!(train.is_disjoint(&test));
        assert!(test.iter().all(|f| is_test_file(f)) && train.iter().all(|f| !is_test_file(f)));
        assert!(!train.is_empty() && !test.is_empty());
        // (kernel/fork.c is a training file: see `split_rule_is_fixed_and_takes_about_a_tenth`.)
        assert_eq!(fs::read(out.join("train/kernel/fork.c")).unwrap(), b"/* kept */\n");
        let counts: Vec<(u64, u64)> = r.files.iter().map(|f| (f.files, f.bytes)).collect();
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[0].0 + counts[1].0, kept.len() as u64);

        // Deterministic: a second unpacking elsewhere gives the same split.
        let again = TestDir::new("code2");
        from_file(&set, &deb_path, &again.0, &mut |_| {}).unwrap();
        assert_eq!(under_split(&again.0.join("code"), "train"), train);
        assert_eq!(under_split(&again.0.join("code"), "test"), test);

        // Now present; a changed file count is not; a rewrite replaces the old folder.
        let present = already_present(&set, &out).expect("present");
        assert!(present.already_present);
        assert_eq!(present.files, r.files);
        let extra = out.join("train/extra.c");
        fs::write(&extra, b"x").unwrap();
        assert!(already_present(&set, &out).is_none());
        from_file(&set, &deb_path, &root.0, &mut |_| {}).unwrap();
        assert!(!extra.exists());
        assert!(already_present(&set, &out).is_some());
        assert_eq!(fs::read_dir(&root.0).unwrap().count(), 1);

        // A folder that is not ours is not replaced.
        let foreign = TestDir::new("foreign");
        fs::create_dir(foreign.0.join("code")).unwrap();
        fs::write(foreign.0.join("code/mine.txt"), b"keep me").unwrap();
        let err = from_file(&set, &deb_path, &foreign.0, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("not a fetch of code"), "{err}");
        assert_eq!(files_under(&foreign.0), vec!["code/mine.txt"]);

        // Other counts than pinned (a changed filter): an error, and nothing is left.
        let short = TestDir::new("short");
        let err = from_file(
            &code_set(&deb, (expect.0, expect.1 + 1)),
            &deb_path,
            &short.0,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("expected {} files of {} bytes", expect.0, expect.1 + 1)),
            "{err}"
        );
        assert_eq!(files_under(&short.0), Vec::<String>::new());
    }

    #[test]
    fn wrong_package_checksum_is_refused_and_leaves_nothing() {
        let (_, expect, deb) = code_deb();
        let src = TestDir::new("debsrc");
        let deb_path = src.0.join("linux.deb");
        // One byte changed inside the package: same size, other sha256.
        let mut bad = deb.clone();
        let last = bad.len() - 100;
        bad[last] ^= 1;
        fs::write(&deb_path, &bad).unwrap();
        let set = code_set(&deb, expect);
        let root = TestDir::new("badsha");
        let dir = root.0.join("data");
        let err = from_file(&set, &deb_path, &dir, &mut |_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sha256") && msg.contains(set.sha256) && msg.contains("corrupt"),
            "{msg}"
        );
        // Not even the destination folder was created.
        assert_eq!(files_under(&root.0), Vec::<String>::new());
        assert!(!dir.exists());
    }

    fn idx_set(deb: &[u8], md5s: [&'static str; 2], lens: [u64; 2]) -> DebSet {
        let files: &'static [RawFile] = Box::leak(Box::new([
            RawFile {
                name: "train-labels-idx1-ubyte",
                bytes: lens[0],
                md5: md5s[0],
            },
            RawFile {
                name: "t10k-labels-idx1-ubyte",
                bytes: lens[1],
                md5: md5s[1],
            },
        ]));
        pinned(
            Dataset::FashionMnist,
            deb,
            Unpack::GzFiles {
                dir: "usr/share/datasets/fashion-mnist",
                files,
            },
        )
    }

    #[test]
    fn gzipped_files_are_checked_raw_and_a_wrong_md5_leaves_nothing() {
        let train: Vec<u8> = (0..1000u32).map(|i| (i % 10) as u8).collect();
        let test: Vec<u8> = (0..100u32).map(|i| (i % 7) as u8).collect();
        let data = tar_of(&[
            (
                "./usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz".into(),
                gz(&train),
            ),
            (
                "./usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz".into(),
                gz(&test),
            ),
            (
                "./usr/share/doc/dataset-fashion-mnist/README.md.gz".into(),
                gz(b"readme"),
            ),
        ]);
        let deb = deb_of(&data);
        let src = TestDir::new("idxsrc");
        let deb_path = src.0.join("f.deb");
        fs::write(&deb_path, &deb).unwrap();
        let (m_train, m_test) = (leak(hex(&Md5::digest(&train))), leak(hex(&Md5::digest(&test))));

        let root = TestDir::new("idx");
        let r = from_file(
            &idx_set(&deb, [m_train, m_test], [1000, 100]),
            &deb_path,
            &root.0,
            &mut |_| {},
        )
        .unwrap();
        let out = root.0.join("fashion-mnist");
        assert_eq!(fs::read(out.join("train-labels-idx1-ubyte")).unwrap(), train);
        assert_eq!(fs::read(out.join("t10k-labels-idx1-ubyte")).unwrap(), test);
        assert_eq!(
            files_under(&out),
            vec!["SOURCE.json", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"]
        );
        assert_eq!(r.files.iter().map(|f| f.bytes).collect::<Vec<_>>(), vec![1000, 100]);

        // One wrong md5 (the second file, so the first was already written): an error that
        // names the file and both sums, and nothing left in DIR.
        let wrong = "0123456789abcdef0123456789abcdef";
        for (md5s, lens) in [([m_train, wrong], [1000, 100]), ([m_train, m_test], [1000, 99])] {
            let root = TestDir::new("idxbad");
            let err = from_file(&idx_set(&deb, md5s, lens), &deb_path, &root.0, &mut |_| {}).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("t10k-labels-idx1-ubyte") && msg.contains(m_test), "{msg}");
            assert_eq!(files_under(&root.0), Vec::<String>::new());
        }

        // A missing member is an error too.
        let no_test = deb_of(&tar_of(&[(
            "./usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz".into(),
            gz(&train),
        )]));
        fs::write(&deb_path, &no_test).unwrap();
        let root = TestDir::new("idxmissing");
        let err = from_file(
            &idx_set(&no_test, [m_train, m_test], [1000, 100]),
            &deb_path,
            &root.0,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("no t10k-labels-idx1-ubyte.gz"), "{err}");
        assert_eq!(files_under(&root.0), Vec::<String>::new());
    }

    #[test]
    fn wav_files_are_kept_whole_and_split_by_file() {
        let dir = "usr/share/asterisk/sounds/en_US_f_Allison";
        let mut files: Vec<(String, Vec<u8>)> = (0..50)
            .map(|i| (format!("./{dir}/digits/{i}.wav"), format!("RIFF{i}").into_bytes()))
            .collect();
        files.push((format!("./{dir}/README.txt"), b"not a wav".to_vec()));
        files.push(("./usr/share/doc/x/copyright".into(), b"CC-BY-SA-3.0".to_vec()));
        let deb = deb_of(&tar_of(&files));
        let set = pinned(
            Dataset::SpeechEn,
            &deb,
            Unpack::Files {
                dir,
                keep: is_wav,
                all: Some("wav"),
                expect: (50, (0..50).map(|i| format!("RIFF{i}").len() as u64).sum()),
            },
        );
        let src = TestDir::new("wavsrc");
        let deb_path = src.0.join("s.deb");
        fs::write(&deb_path, &deb).unwrap();
        let root = TestDir::new("wav");
        let r = from_file(&set, &deb_path, &root.0, &mut |_| {}).unwrap();
        let out = root.0.join("speech-en");
        let (all, train, test) = (
            under_split(&out, "wav"),
            under_split(&out, "train"),
            under_split(&out, "test"),
        );
        assert_eq!(all.len(), 50);
        assert!(train.is_disjoint(&test));
        assert_eq!(train.union(&test).cloned().collect::<BTreeSet<_>>(), all);
        assert!(test.iter().all(|f| is_test_file(f)));
        assert_eq!(fs::read(out.join("wav/digits/7.wav")).unwrap(), b"RIFF7");
        let names: Vec<String> = r
            .files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["wav", "train", "test"]);
        assert_eq!(r.files[0].files, 50);
        assert_eq!(r.files[1].files + r.files[2].files, 50);
    }

    #[test]
    fn split_rule_is_fixed_and_takes_about_a_tenth() {
        let n = 20_000;
        let test = (0..n).filter(|i| is_test_file(&format!("drivers/x/file{i}.c"))).count();
        let frac = test as f64 / n as f64;
        assert!((0.09..0.11).contains(&frac), "{frac}");
        // Pinned: a change to the rule would silently move files between train and test.
        // (Python: int.from_bytes(hashlib.md5(path.encode()).digest()[:8], "little") % 10 == 0.)
        let pinned: Vec<bool> = ["lib/f3.c", "lib/f4.c", "lib/f16.c", "kernel/fork.c", "lib/f25.c"]
            .iter()
            .map(|f| is_test_file(f))
            .collect();
        assert_eq!(pinned, [false, true, true, false, true]);
    }

    #[test]
    fn filter_drops_generated_headers_only() {
        for keep in [
            "kernel/fork.c",
            "include/linux/list.h",
            "drivers/gpu/drm/amd/amdgpu/amdgpu_device.c",
            "drivers/gpu/drm/amd/include/amd_shared.h",
        ] {
            assert!(is_handwritten_c(keep), "{keep}");
        }
        for drop in [
            "drivers/gpu/drm/amd/include/asic_reg/nbio/nbio_7_4_sh_mask.h",
            "drivers/misc/habanalabs/include/gaudi2/asic_reg/gaudi2_regs.h",
            "drivers/gpu/drm/amd/include/vega10_enum.h",
            "Makefile",
            "kernel/fork.c.rej",
            "scripts/kconfig/lexer.l",
        ] {
            assert!(!is_handwritten_c(drop), "{drop}");
        }
    }

    #[test]
    fn archive_paths_cannot_leave_the_folder() {
        assert_eq!(
            safe_rel(Path::new("./usr/share/a.wav")).as_deref(),
            Some("usr/share/a.wav")
        );
        assert_eq!(
            safe_rel(Path::new("linux/kernel/fork.c")).as_deref(),
            Some("linux/kernel/fork.c")
        );
        for bad in ["../etc/passwd", "usr/../../x", "/etc/passwd", "./", ""] {
            assert_eq!(safe_rel(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn pinned_packages_are_consistent() {
        for set in [&FASHION_MNIST, &SPEECH_EN, &CODE] {
            assert!(set
                .pool_path
                .ends_with(&format!("{}_{}_all.deb", set.package, set.version)));
            assert_eq!((set.sha256.len(), set.md5.len(), set.sha1.len()), (64, 32, 40));
            let urls = urls(set);
            assert!(urls[0].starts_with("https://deb.debian.org/") && urls[1].contains(set.sha1));
            let h = hint(set);
            assert!(
                h.contains(&format!("--from {}", file_name(set))) && h.contains(set.package),
                "{h}"
            );
        }
    }

    // Real downloads (needs the network). Run with
    // `MEGABYTE_FETCH_TEST_DIR=/tmp/x cargo test --release -p megabyte-data --lib deb::tests::real -- --ignored --nocapture`.
    use crate::fetch::tests::real_fetch;

    #[test]
    #[ignore]
    fn real_fetch_fashion_mnist() {
        let r = real_fetch(Dataset::FashionMnist);
        let sizes: Vec<u64> = r.files.iter().map(|f| f.bytes).collect();
        assert_eq!(sizes, vec![47_040_016, 60_008, 7_840_016, 10_008]);
    }

    #[test]
    #[ignore]
    fn real_fetch_speech_en() {
        let r = real_fetch(Dataset::SpeechEn);
        let counts: Vec<u64> = r.files.iter().map(|f| f.files).collect();
        assert_eq!(counts[0], 568);
        assert_eq!(counts[1] + counts[2], 568);
    }

    #[test]
    #[ignore]
    fn real_fetch_code() {
        let r = real_fetch(Dataset::Code);
        let counts: Vec<u64> = r.files.iter().map(|f| f.files).collect();
        assert!(counts[0] + counts[1] > 50_000, "{counts:?}");
    }
}
