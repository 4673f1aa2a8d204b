//! Records the git commit the binary is built from (`megabyte --version`), so that a measurement
//! names the code that ran even on a machine whose checkout history says otherwise.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Built outside a checkout (a source tarball): no commit to name.
    let Some(commit) = git(&["rev-parse", "--short=7", "HEAD"]) else {
        println!("cargo:rustc-env=MEGABYTE_COMMIT=unknown");
        return;
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    println!("cargo:rustc-env=MEGABYTE_COMMIT={commit}{}", if dirty { "-dirty" } else { "" });
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for path in ["HEAD", "index", "refs"] {
            println!("cargo:rerun-if-changed={dir}/{path}");
        }
    }
    // Any edit to the sources can make the tree dirty.
    println!("cargo:rerun-if-changed=..");
}
