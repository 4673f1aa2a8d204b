//! `megabyte plot` draws numeric fields of JSON-lines records, and says so when it cannot.

use std::process::Command;

use crate::{megabyte, temp_dir};

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

/// Runs `megabyte plot` and waits at most 30 s for it (a bound on a hang, not a speed
/// check); returns (success, stderr).
fn plot_within_bound(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .arg("plot")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`megabyte plot {}` did not exit within 30 s", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}

#[test]
fn plot_of_extreme_values_draws_or_refuses_without_hanging() {
    let dir = temp_dir("plot-extreme");
    let png = dir.join("out.png");
    let p = png.to_str().unwrap();
    // (records, log y, what must happen: None draws, Some(needle) refuses saying needle).
    let cases: [(&[&str], bool, Option<&str>); 6] = [
        (&[r#"{"x": 1, "y": 1e308}"#, r#"{"x": 2, "y": -1e308}"#], false, Some("a span larger than the largest number")),
        (&[r#"{"x": 1, "y": 1e-300}"#, r#"{"x": 2, "y": 1e300}"#], true, Some("more than about 300 powers of ten, which a log axis cannot show; leave out the records far from the rest or drop --log-y")),
        (&[r#"{"x": 1, "y": 1}"#, r#"{"x": 2, "y": 1e308}"#], true, Some("more than about 300 powers of ten")),
        (&[r#"{"x": 1, "y": 1e-300}"#, r#"{"x": 2, "y": 1e300}"#], false, None),
        (&[r#"{"x": 0, "y": 0}"#, r#"{"x": 1, "y": 1.79e308}"#], false, None),
        (&[r#"{"x": 1, "y": 4.9e-324}"#, r#"{"x": 2, "y": 1e-200}"#, r#"{"x": 3, "y": 0}"#], true, None),
    ];
    for (i, (lines, log_y, refusal)) in cases.iter().enumerate() {
        let jsonl = dir.join(format!("case-{i}.jsonl"));
        std::fs::write(&jsonl, lines.join("\n")).unwrap();
        let _ = std::fs::remove_file(&png);
        let mut args = vec![jsonl.to_str().unwrap(), "--x", "x", "--y", "y", "--out", p];
        if *log_y {
            args.push("--log-y");
        }
        let (ok, err) = plot_within_bound(&args);
        match refusal {
            None => {
                assert!(ok, "case {i} should draw: {err}");
                assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n", "case {i}: a PNG file");
                let zero_on_log_axis = lines.iter().any(|l| l.contains(r#""y": 0}"#)) && *log_y;
                assert_eq!(err.contains("1 record(s) left out"), zero_on_log_axis, "case {i}: {err}");
            }
            Some(needle) => {
                assert!(!ok && err.contains("cannot draw `y`") && err.contains(needle), "case {i}: {err}");
                assert!(!png.exists(), "case {i}: a refused plot writes no file");
            }
        }
    }
}
