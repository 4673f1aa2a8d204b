//! `megabyte plot` draws numeric fields of JSON-lines records, and says so when it cannot.

use std::process::Command;

use crate::temp_dir;

fn megabyte(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn plot_draws_records_and_refuses_missing_fields() {
    let dir = temp_dir("plot");
    let jsonl = dir.join("sweep.jsonl");
    let lines = [
        r#"{"preset": "a", "context": 8192, "train_bytes_per_sec": 3.1e6, "peak_memory_gib": 8.5}"#,
        r#"{"preset": "a", "context": 65536, "train_bytes_per_sec": 2.9e6, "peak_memory_gib": 9.1}"#,
        r#"{"preset": "b", "context": 8192, "train_bytes_per_sec": 1.0e6}"#,
        r#"{"preset": "b", "context": 65536, "error": "did not run"}"#,
    ];
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let png = dir.join("sweep.png");
    let (j, p) = (jsonl.to_str().unwrap(), png.to_str().unwrap());
    let (ok, err) = megabyte(&["plot", j, "--x", "context", "--y", "train_bytes_per_sec", "--y", "peak_memory_gib", "--by", "preset", "--log-x", "--out", p]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let (ok, err) = megabyte(&["plot", j, "--x", "context", "--y", "no_such_field", "--out", p]);
    assert!(!ok && err.contains("no_such_field"), "{err}");
    std::fs::write(&jsonl, "not json\n").unwrap();
    let (ok, err) = megabyte(&["plot", j, "--x", "context", "--y", "train_bytes_per_sec", "--out", p]);
    assert!(!ok && err.contains("line 1 is not JSON"), "{err}");
}
