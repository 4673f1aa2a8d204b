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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::fetch::tests::TestDir;

    fn names(dir: &Path, files: &[PathBuf]) -> Vec<String> {
        files.iter().map(|f| f.strip_prefix(dir).unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn the_walk_follows_links_inside_the_folder_and_skips_hidden_and_other_extensions() {
        let t = TestDir::new("walk-inside");
        let dir = t.0.join("src");
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::create_dir_all(dir.join(".git")).unwrap();
        fs::write(dir.join("a/b/x.rs"), "x").unwrap();
        fs::write(dir.join(".git/y.rs"), "y").unwrap();
        fs::write(dir.join("a/z.txt"), "z").unwrap();
        symlink(dir.join("a/b/x.rs"), dir.join("link.rs")).unwrap();
        symlink("/nonexistent", dir.join("broken.txt")).unwrap(); // not a kept file: ignored
        let files = list_files(&dir, &|p| has_extension(p, &["rs"])).unwrap();
        assert_eq!(names(&dir, &files), ["a/b/x.rs", "link.rs"]);
    }

    #[test]
    fn the_walk_refuses_loops_and_links_out_of_the_folder() {
        let rs = |p: &Path| has_extension(p, &["rs"]);
        let refused = |dir: &Path, needle: &str, link: &str| {
            let msg = list_files(dir, &rs).unwrap_err().to_string();
            assert!(msg.contains(needle) && msg.contains(link), "expected `{needle}` naming {link} in: {msg}");
        };
        let t = TestDir::new("walk-refused");
        let dir = t.0.join("src");
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::write(dir.join("a/x.rs"), "x").unwrap();
        fs::write(t.0.join("outside.rs"), "secret").unwrap();

        symlink("..", dir.join("a/up")).unwrap(); // a loop
        refused(&dir, "symbolic link loop", "a/up");
        fs::remove_file(dir.join("a/up")).unwrap();

        symlink(dir.join("a"), dir.join("again")).unwrap(); // one folder by two paths
        refused(&dir, "already reached", "again");
        fs::remove_file(dir.join("again")).unwrap();

        symlink(t.0.join("outside.rs"), dir.join("a/out.rs")).unwrap(); // a file outside
        refused(&dir, "outside the folder", "a/out.rs");
        fs::remove_file(dir.join("a/out.rs")).unwrap();

        symlink(&t.0, dir.join("parent")).unwrap(); // a folder outside
        refused(&dir, "outside the folder", "parent");
        fs::remove_file(dir.join("parent")).unwrap();

        symlink("missing.rs", dir.join("gone.rs")).unwrap(); // a kept name that leads nowhere
        refused(&dir, "cannot be followed", "gone.rs");
    }
}
