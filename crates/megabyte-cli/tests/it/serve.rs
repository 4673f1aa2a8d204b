//! `megabyte serve` through a real HTTP client against the real binary on a tiny checkpoint:
//! completions equal `megabyte generate` with the same seed, streamed or not, alone or
//! interleaved with other requests; stop sequences, exact bytes, every error status, a full
//! queue, a client that disconnects, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::{megabyte, temp_dir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `tiny` model trained for a few steps (text-like bytes, but far from only ASCII when
/// sampled hot), shared by the tests.
fn checkpoint() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let run = temp_dir("serve-run").join("tiny-run");
        let (ok, stderr) = megabyte(&["train", "--out", s(&run), "--steps", "3", "--batch-size", "2", "--sample-bytes", "0", "--eval-every", "1000"]);
        assert!(ok, "{stderr}");
        run
    })
}

/// A running `megabyte serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(checkpoint: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_megabyte"))
            .args(["serve", "--checkpoint", s(checkpoint), "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let at = line.find("http://").unwrap_or_else(|| panic!("no address in `{line}`"));
        let url = line[at..].split_whitespace().next().unwrap().to_string();
        Server { child, url }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    // The timeout only ends a test that would otherwise hang; no result depends on it.
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(300))).build().into()
}

/// POSTs `body`; returns the status, the Retry-After header and the body as JSON.
fn post(url: &str, body: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = agent().post(url).header("Content-Type", "application/json");
    if let Some(key) = key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    let mut response = request.send(body).unwrap();
    let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let text = response.body_mut().read_to_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: not JSON: {text}"));
    (response.status().as_u16(), retry, json)
}

fn get(url: &str) -> (u16, Value) {
    let mut response = agent().get(url).call().unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: not JSON: {text}")))
}

fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

/// A whole completion: (bytes, text, finish_reason), after checking the response's shape.
fn complete(server: &Server, request: Value) -> (Vec<u8>, String, String) {
    let (status, _, body) = post(&server.url("/v1/completions"), &request.to_string(), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let choice = &body["choices"][0];
    let bytes = b64(choice["bytes"].as_str().unwrap());
    let text = choice["text"].as_str().unwrap().to_string();
    assert_eq!(text, String::from_utf8_lossy(&bytes), "text is the bytes, decoded");
    let usage = &body["usage"];
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap());
    (bytes, text, choice["finish_reason"].as_str().unwrap().to_string())
}

/// A streamed completion, read to the end: (bytes, text, finish_reason).
fn stream(server: &Server, mut request: Value) -> (Vec<u8>, String, String) {
    request["stream"] = json!(true);
    let events = open_stream(server, &request).collect::<Vec<_>>();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream ends with [DONE]");
    let (mut bytes, mut text, mut finish) = (Vec::new(), String::new(), None);
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        assert_eq!(chunk["object"], "text_completion");
        let choice = &chunk["choices"][0];
        let piece = b64(choice["bytes"].as_str().unwrap());
        // Each chunk's text is its own bytes decoded: no chunk splits a UTF-8 sequence.
        assert_eq!(choice["text"].as_str().unwrap(), String::from_utf8_lossy(&piece));
        bytes.extend(piece);
        text.push_str(choice["text"].as_str().unwrap());
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (bytes, text, finish.expect("a chunk with finish_reason"))
}

/// The `data:` payloads of a streamed response, as they arrive.
fn open_stream(server: &Server, request: &Value) -> impl Iterator<Item = String> {
    let response = agent().post(&server.url("/v1/completions")).header("Content-Type", "application/json").send(request.to_string()).unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    BufReader::new(response.into_body().into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| line.strip_prefix("data:").map(|d| d.trim().to_string()))
}

/// `megabyte generate`'s bytes (its closing newline dropped).
fn generate(prompt: &[u8], n: usize, flags: &[&str]) -> Vec<u8> {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = temp_dir(&format!("serve-gen-{}", CALLS.fetch_add(1, Ordering::SeqCst)));
    let file = dir.join("prompt");
    std::fs::write(&file, prompt).unwrap();
    let n = n.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte"))
        .args(["generate", "--checkpoint", s(checkpoint()), "--prompt-file", s(&file), "-n", &n])
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut bytes = out.stdout;
    assert_eq!(bytes.pop(), Some(b'\n'));
    bytes
}

/// The sampling rules of the API and the `generate` flags that give the same bytes.
fn rules() -> Vec<(Value, Vec<&'static str>)> {
    vec![
        (json!({"temperature": 0}), vec!["--sampling", "greedy"]),
        (json!({"temperature": 0.8, "seed": 3}), vec!["--sampling", "temperature", "--temperature", "0.8", "--seed", "3"]),
        (json!({"top_k": 5, "seed": 4}), vec!["--sampling", "top-k", "--top-k", "5", "--seed", "4"]),
        (json!({"top_p": 0.9, "temperature": 1.5, "seed": 5}), vec!["--sampling", "top-p", "--top-p", "0.9", "--temperature", "1.5", "--seed", "5"]),
        // Hot enough that many bytes are not UTF-8.
        (json!({"temperature": 4, "seed": 6}), vec!["--sampling", "temperature", "--temperature", "4", "--seed", "6"]),
    ]
}

fn with(mut request: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().unwrap() {
        request[k] = v.clone();
    }
    request
}

#[test]
fn completions_equal_generate_with_the_same_seed_streamed_or_not() {
    let server = Server::start(checkpoint(), &[]);
    let prompt = "The history of ";
    let mut saw_non_utf8 = false;
    for (rule, flags) in rules() {
        let want = generate(prompt.as_bytes(), 40, &flags);
        let request = with(rule.clone(), json!({"model": "anything", "prompt": prompt, "max_tokens": 40}));
        let (bytes, _, finish) = complete(&server, request.clone());
        assert_eq!(bytes, want, "{rule}");
        assert_eq!(finish, "length");
        let (streamed, text, finish) = stream(&server, request);
        assert_eq!(streamed, want, "{rule}, streamed");
        assert_eq!(text, String::from_utf8_lossy(&want), "{rule}, streamed text");
        assert_eq!(finish, "length");
        saw_non_utf8 |= std::str::from_utf8(&want).is_err();
    }
    assert!(saw_non_utf8, "no sample had bytes that are not UTF-8: the `bytes` field went untested");

    // A prompt of any bytes, as base64; a one-element prompt array.
    let raw: Vec<u8> = vec![0xff, 0x00, b'a', 0xc3];
    let want = generate(&raw, 20, &["--sampling", "greedy"]);
    let request = json!({"prompt_bytes": base64::engine::general_purpose::STANDARD.encode(&raw), "max_tokens": 20, "temperature": 0});
    assert_eq!(complete(&server, request).0, want);
    let want = generate(b"abc", 10, &["--sampling", "greedy"]);
    assert_eq!(complete(&server, json!({"prompt": ["abc"], "max_tokens": 10, "temperature": 0})).0, want);
    // The default is OpenAI's: 16 bytes.
    assert_eq!(complete(&server, json!({"prompt": "abc", "temperature": 0})).0.len(), 16);
    // A prompt longer than the context (256 bytes) is served: the window slides.
    let (bytes, _, _) = complete(&server, json!({"prompt": "x".repeat(300), "max_tokens": 8, "temperature": 0}));
    assert_eq!(bytes.len(), 8);

    let (status, models) = get(&server.url("/v1/models"));
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-run");
    assert_eq!(models["data"][0]["megabyte"]["context"], 256);
    assert_eq!(models["data"][0]["megabyte"]["media"], Value::Null);
    let (status, health) = get(&server.url("/health"));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
}

#[test]
fn interleaved_streams_each_equal_the_request_alone() {
    let server = Server::start(checkpoint(), &["--max-batch", "4"]);
    let requests: Vec<Value> = rules()
        .into_iter()
        .enumerate()
        .map(|(i, (rule, _))| with(rule, json!({"prompt": "ab".repeat(i * 3 + 1), "max_tokens": 300 + 37 * i})))
        .collect();
    let alone: Vec<Vec<u8>> = requests.iter().map(|r| complete(&server, r.clone()).0).collect();
    // Five streams on four rows: they start at different bytes of a patch, one waits for a
    // row, and each outlives the context (the window slides while others decode).
    let together: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests.iter().map(|r| scope.spawn(|| stream(&server, r.clone()).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} alone and among others");
    }
}

#[test]
fn stop_sequences_end_the_output_before_them() {
    let server = Server::start(checkpoint(), &[]);
    let request = json!({"prompt": "The ", "max_tokens": 80, "temperature": 0});
    let (full, _, _) = complete(&server, request.clone());
    // A stop sequence from the middle of the greedy output, and one that never appears.
    let stop = (5..full.len() - 3)
        .map(|i| &full[i..i + 3])
        .find_map(|w| std::str::from_utf8(w).ok())
        .expect("three UTF-8 bytes in the output")
        .to_string();
    let first = full.windows(3).position(|w| w == stop.as_bytes()).unwrap();
    let request = with(request, json!({"stop": ["\u{1}never\u{2}", stop]}));
    for (bytes, _, finish) in [complete(&server, request.clone()), stream(&server, request)] {
        assert_eq!(bytes, &full[..first], "the output ends before the stop sequence `{stop}`");
        assert_eq!(finish, "stop");
    }
}

/// The error's status and body shape; returns its message.
fn error(status: u16, body: &Value, want: u16) -> String {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{body}");
    e["message"].as_str().unwrap().to_string()
}

#[test]
fn every_error_has_its_status_and_openai_shape() {
    let server = Server::start(checkpoint(), &["--api-key", "sesame", "--max-body", "1000", "--max-bytes-per-request", "100"]);
    let url = server.url("/v1/completions");
    let key = Some("sesame");
    let (st, _, body) = post(&url, "{\"prompt\": ", key);
    assert!(error(st, &body, 400).contains("not valid JSON"));
    let (st, _, body) = post(&url, r#"{"prompt": "a", "max_tokens": "many"}"#, key);
    assert!(error(st, &body, 400).contains("`max_tokens` must be a non-negative integer"));
    assert_eq!(body["error"]["param"], "max_tokens");
    let (st, _, body) = post(&url, r#"{"prompt": "a", "n": 2}"#, key);
    assert!(error(st, &body, 400).contains("`n` must be 1"));
    let (st, _, body) = post(&url, r#"{"prompt": "a", "temperature": -1}"#, key);
    assert!(error(st, &body, 400).contains("temperature"));
    // Too many bytes asked for: 400 (a value out of range), naming the limit.
    let (st, _, body) = post(&url, r#"{"prompt": "a", "max_tokens": 101}"#, key);
    assert!(error(st, &body, 400).contains("at most 100 bytes per request"));
    // A body over --max-body: 413.
    let big = json!({"prompt": "x".repeat(2000)}).to_string();
    let (st, _, body) = post(&url, &big, key);
    assert!(error(st, &body, 413).contains("--max-body"));
    // The key.
    let (st, _, body) = post(&url, r#"{"prompt": "a"}"#, None);
    assert!(error(st, &body, 401).contains("missing API key"));
    let (st, _, body) = post(&url, r#"{"prompt": "a"}"#, Some("open"));
    assert!(error(st, &body, 401).contains("wrong API key"));
    let (st, _, body) = post(&url, r#"{"prompt": "a", "max_tokens": 2}"#, key);
    assert_eq!(st, 200, "{body}");
    // Unknown routes.
    let (st, body) = get(&server.url("/v2/nothing"));
    error(st, &body, 404);
    // Health needs no key.
    assert_eq!(get(&server.url("/health")).0, 200);
}

#[test]
fn a_full_queue_gets_503_and_a_disconnected_client_frees_its_row() {
    // One row, one waiting place.
    let server = Server::start(checkpoint(), &["--max-batch", "1", "--max-queue", "1", "--max-bytes-per-request", "1000000000"]);
    // A request that would take far longer than any test: it holds the row until its client goes.
    let want = complete(&server, json!({"prompt": "queued", "max_tokens": 12, "temperature": 0})).0;
    let endless = json!({"prompt": "a", "max_tokens": 1_000_000_000, "temperature": 0, "stream": true});
    let mut first = open_stream(&server, &endless);
    assert!(first.next().is_some(), "the first request is decoding");
    std::thread::scope(|scope| {
        // The second waits for the row...
        let waiting = scope.spawn(|| complete(&server, json!({"prompt": "queued", "max_tokens": 12, "temperature": 0})).0);
        wait_for(&server, |h| h["waiting"] == 1);
        // ...and a third finds no place.
        let (status, retry, body) = post(&server.url("/v1/completions"), r#"{"prompt": "b"}"#, None);
        assert!(error(status, &body, 503).contains("busy"));
        assert_eq!(retry.as_deref(), Some("1"));
        // The first client goes: its row goes to the waiting request, which completes.
        drop(first);
        assert_eq!(waiting.join().unwrap(), want);
    });
}

/// Polls /health until `ready` holds for it (a guard against a hang, not a timing).
fn wait_for(server: &Server, ready: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, health) = get(&server.url("/health"));
        if ready(&health) {
            return;
        }
        assert!(Instant::now() < deadline, "/health never became ready: {health}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_cancels_running_requests_within_the_grace_and_exits_0() {
    let mut server = Server::start(checkpoint(), &["--shutdown-grace", "1", "--max-bytes-per-request", "1000000000"]);
    let endless = json!({"prompt": "a", "max_tokens": 1_000_000_000, "temperature": 0, "stream": true});
    let mut events = open_stream(&server, &endless);
    assert!(events.next().is_some(), "the request is decoding");
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    // The stream goes on until the grace ends, then ends with an error event and [DONE].
    let rest: Vec<String> = events.collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("shutting down"), "{last}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn sigterm_lets_a_running_request_finish_within_the_grace_and_exits_0() {
    let mut server = Server::start(checkpoint(), &["--shutdown-grace", "600"]);
    let request = json!({"prompt": "a", "max_tokens": 20000, "temperature": 0});
    let want = complete(&server, request.clone()).0;
    let mut events = open_stream(&server, &with(request, json!({"stream": true})));
    let first = events.next().unwrap();
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    // (20,000 bytes take far longer than a signal: the request is running when it comes.)
    // Every byte still comes, then the end of a normal stream.
    let mut bytes = Vec::new();
    let mut finish = None;
    for event in std::iter::once(first).chain(events.by_ref()).take_while(|e| e != "[DONE]") {
        let chunk: Value = serde_json::from_str(&event).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        bytes.extend(b64(chunk["choices"][0]["bytes"].as_str().unwrap()));
        finish = chunk["choices"][0]["finish_reason"].as_str().map(str::to_string).or(finish);
    }
    assert_eq!(bytes, want);
    assert_eq!(finish.as_deref(), Some("length"));
    drop(events);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn a_run_trained_with_a_media_record_shows_it_in_models() {
    let dir = temp_dir("serve-media");
    let run = dir.join("images");
    let (ok, stderr) = megabyte(&[
        "train", "--out", s(&run), "--steps", "1", "--batch-size", "2", "--sample-bytes", "0", "--image", "8x8x1", "--block", "4",
    ]);
    assert!(ok, "{stderr}");
    let server = Server::start(&run, &[]);
    let (_, models) = get(&server.url("/v1/models"));
    assert_eq!(
        models["data"][0]["megabyte"]["media"],
        json!({"kind": "image", "width": 8, "height": 8, "channels": 1, "order": "patch_scan", "block": 4})
    );
    drop(server);
    // A resumed run keeps its record: another one is refused.
    crate::fails_with(&["train", "--resume", s(&run), "--steps", "2", "--image", "4x4x1", "--block", "4"], "in the resumed run");
    // Bad records are refused before any work.
    crate::fails_with(&["train", "--out", s(&dir.join("bad")), "--steps", "1", "--audio", "8000:12:1"], "8- or 16-bit");
    crate::fails_with(&["train", "--out", s(&dir.join("bad")), "--steps", "1", "--image", "6x6x1", "--block", "4"], "multiple");
    assert!(!dir.join("bad").exists());
}

/// A model with hash n-gram embeddings is served with `megabyte generate`'s bytes, also for a
/// prompt past the context (the window slides and each row's steps hash its own window).
#[test]
fn a_hash_ngram_model_serves_the_bytes_generate_gives() {
    let run = temp_dir("serve-ngram-run").join("run");
    let (ok, stderr) = megabyte(&[
        "train", "--out", s(&run), "--hash-ngrams", "2,3", "--hash-buckets", "64", "--steps", "3", "--batch-size", "2",
        "--sample-bytes", "0", "--eval-every", "1000",
    ]);
    assert!(ok, "{stderr}");
    let server = Server::start(&run, &[]);
    for (prompt, n) in [("The history of ".to_string(), 40), ("x".repeat(300), 24)] {
        let out = Command::new(env!("CARGO_BIN_EXE_megabyte"))
            .args(["generate", "--checkpoint", s(&run), "--prompt", &prompt, "-n", &n.to_string(), "--sampling", "greedy"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut want = out.stdout;
        assert_eq!(want.pop(), Some(b'\n'));
        let (bytes, _, _) = complete(&server, json!({"prompt": prompt, "max_tokens": n, "temperature": 0}));
        assert_eq!(bytes, want, "prompt of {} bytes", prompt.len());
    }
}
