//! Files the converters write and read: an output written under a temporary name and renamed
//! into place with its sidecar index, and the files of an input folder.

use std::path::{Path, PathBuf};

use megabyte::documents::DocumentIndex;

use crate::error::{Error, IoContext, Result};

/// `dir/name` → `dir/.name.tmp-PID`: where a converter writes before renaming into place.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A converter's output file: written to a temporary name, renamed into place by `finish`
/// together with its sidecar index, and removed if dropped unfinished (an error part way
/// leaves nothing behind). An existing output is refused, never overwritten.
pub(crate) struct OutputFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<std::io::BufWriter<std::fs::File>>,
    written: u64,
}

impl OutputFile {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        for p in [path.to_path_buf(), DocumentIndex::sidecar(path)] {
            if p.exists() {
                return Err(Error::Input(format!(
                    "{} already exists; remove it or choose another output",
                    p.display()
                )));
            }
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).io_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = temp_path(path);
        let file = std::fs::File::create(&tmp).io_context(|| format!("creating {}", tmp.display()))?;
        Ok(OutputFile { path: path.into(), tmp, writer: Some(std::io::BufWriter::new(file)), written: 0 })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let w = self.writer.as_mut().expect("writer present until finish");
        w.write_all(bytes).io_context(|| format!("writing {}", self.tmp.display()))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Flushes, writes the sidecar and renames the bytes into place.
    pub(crate) fn finish(mut self, index: &DocumentIndex) -> Result<PathBuf> {
        use std::io::Write;
        if self.written == 0 {
            return Err(Error::Input("nothing to write: the input holds no documents".into()));
        }
        let mut w = self.writer.take().expect("writer present until finish");
        w.flush().io_context(|| format!("writing {}", self.tmp.display()))?;
        w.get_ref().sync_all().io_context(|| format!("syncing {}", self.tmp.display()))?;
        drop(w);
        let sidecar = index.write_for(&self.path)?;
        if let Err(e) = std::fs::rename(&self.tmp, &self.path) {
            let _ = std::fs::remove_file(&sidecar);
            return Err(Error::Io { context: format!("renaming {} into place", self.tmp.display()), source: e });
        }
        Ok(self.path.clone())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The files of a folder, recursively and sorted by path, keeping those `keep` accepts;
/// hidden entries (names starting with '.') are skipped. The walk is the library's
/// ([`megabyte::data::folder_files`]): it stays inside `dir` (a symbolic link to a kept file
/// or a folder outside is refused, naming the link) and ends (a folder reached twice, by a loop or
/// a second link, is refused).
pub(crate) fn list_files(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    Ok(megabyte::data::folder_files(dir, true, keep)?)
}

/// Whether a path's extension (case-insensitive) is one of `exts` (given without dots).
pub(crate) fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}
