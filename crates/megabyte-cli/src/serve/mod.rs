//! `megabyte serve`: an OpenAI-compatible HTTP server (tokio + axum) over one checkpoint.
//!
//! One decoding thread owns the model and a continuous batch (`engine.rs`); HTTP handlers
//! send it validated requests and receive each request's bytes on their own channel. At most
//! `--max-batch` requests decode at once and `--max-queue` more wait for a row; beyond that a
//! request gets 503 with `Retry-After`. A client that goes away drops its channel, and the
//! decoding thread frees its row before the next step.
//!
//! Routes: `POST /v1/completions` (OpenAI Completions, streamed or not), `GET /v1/models`,
//! `GET /health`, and the playground page at `GET /`. Extensions to OpenAI's fields:
//! `top_k`; `prompt_bytes` (the prompt as base64, for prompts that are not UTF-8); and in every
//! choice `bytes`, the base64 of exactly the bytes that choice or chunk carries (`text` is
//! valid UTF-8, with U+FFFD for bytes that are not).

mod api;
mod engine;
mod text;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, Stream, StreamExt};
use megabyte::generate::Sampler;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::args::DeviceArgs;
use api::{ApiError, Completion};
use engine::{Event, Job, Load, Msg};
use text::{StopFilter, Utf8Pieces};

/// The playground page, served at `/` (no build step: one static file).
const PLAYGROUND: &str = include_str!("playground.html");

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint folder, or a run folder (its newest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    /// Address to listen on: localhost unless told otherwise (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the API routes (also read from MEGABYTE_API_KEY).
    #[arg(long, env = "MEGABYTE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model's name in /v1/models and responses [default: the checkpoint's run folder name].
    #[arg(long)]
    model_name: Option<String>,
    /// Requests decoding at once (rows of the batch).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for a row; beyond them a request gets 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// The most bytes one request may ask for (`max_tokens`); more is refused with 400. It
    /// also bounds what a client that reads slowly makes the server hold for it.
    #[arg(long, default_value_t = 1 << 18)]
    max_bytes_per_request: usize,
    /// The largest request body in bytes; a larger one is refused with 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body: usize,
    /// Seconds that running requests get to finish after SIGTERM or Ctrl-C before they are
    /// cancelled.
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace: f64,
}

/// What every handler shares.
struct Server {
    name: String,
    created: u64,
    /// Model facts for /v1/models: context, patch size, the data's media.
    info: Value,
    api_key: Option<String>,
    max_bytes_per_request: usize,
    /// Admitted requests allowed at once: decoding rows plus waiting places.
    capacity: usize,
    jobs: Mutex<Option<mpsc::Sender<Msg>>>,
    load: Arc<Load>,
    next_id: AtomicU64,
}

pub fn run(args: Args) -> Result<()> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if !(args.shutdown_grace >= 0.0 && args.shutdown_grace.is_finite()) {
        bail!("--shutdown-grace must be a finite number of seconds ≥ 0, got {}", args.shutdown_grace);
    }
    if args.api_key.as_deref() == Some("") {
        bail!("--api-key is empty: give a key, or leave the flag out to serve without one");
    }
    let (device, precision) = args.device.open()?;
    let dir = megabyte::checkpoint::resolve(&args.checkpoint)?;
    let media = read_media(&dir)?;
    let model = megabyte::checkpoint::load_for_sampling(&dir, args.max_batch, precision, &device)?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}: choose another --port or --host"))?;
    let local = listener.local_addr()?;

    let (jobs, job_rx) = mpsc::channel();
    let load = Arc::new(Load::default());
    let server = Arc::new(Server {
        name: args.model_name.clone().unwrap_or_else(|| model_name(&args.checkpoint, &dir)),
        created: unix_now(),
        info: json!({"context": model.config().context, "patch_size": model.config().patch_size, "media": media}),
        api_key: args.api_key.clone(),
        max_bytes_per_request: args.max_bytes_per_request,
        capacity: args.max_batch.saturating_add(args.max_queue),
        jobs: Mutex::new(Some(jobs)),
        load: load.clone(),
        next_id: AtomicU64::new(0),
    });
    let max_batch = args.max_batch;
    let decoder = std::thread::Builder::new()
        .name("decoder".into())
        .spawn(move || engine::run(&model, &device, max_batch, job_rx, &load))
        .context("starting the decoding thread")?;

    println!("megabyte serve: {} on http://{local} (POST /v1/completions, playground at /)", server.name);
    std::io::stdout().flush()?;

    let grace = Duration::from_secs_f64(args.shutdown_grace);
    let app = router(server.clone(), args.max_body);
    let stopping = Arc::new(tokio::sync::Notify::new());
    runtime.block_on(async move {
        let shutdown = {
            let server = server.clone();
            let stopping = stopping.clone();
            async move {
                stop_signal().await;
                stopping.notify_one();
                eprintln!("megabyte serve: stopping; running requests have {}s to finish", grace.as_secs_f64());
                server.load.shutting_down.store(true, Ordering::SeqCst);
                if let Some(jobs) = server.jobs.lock().expect("jobs lock").take() {
                    let _ = jobs.send(Msg::Shutdown { cancel_at: Instant::now() + grace });
                }
            }
        };
        let serving = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown);
        // Cancelled streams end at once, but a client that has stopped reading could hold its
        // connection open: the process stops a few seconds after the grace all the same.
        let deadline = async {
            stopping.notified().await;
            tokio::time::sleep(grace + Duration::from_secs(5)).await;
            eprintln!("megabyte serve: closing connections that are still open");
        };
        tokio::select! {
            served = serving => served,
            () = deadline => Ok(()),
        }
    })?;
    // Every connection has closed: the decoding thread has finished or cancelled every request.
    decoder.join().map_err(|_| anyhow::anyhow!("the decoding thread panicked"))?;
    // Lingering keep-alive connections must not hold the process: the runtime is dropped
    // without waiting for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    eprintln!("megabyte serve: stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn router(server: Arc<Server>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(server.clone(), authorize));
    Router::new()
        .merge(api)
        .route("/", get(|| async { Html(PLAYGROUND) }))
        .route("/health", get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route: the API is POST /v1/completions, GET /v1/models, GET /health") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(server)
}

/// With `--api-key`, the API routes need `Authorization: Bearer KEY`.
async fn authorize(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    if let Some(key) = &server.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(k) if constant_time_eq(k.trim().as_bytes(), key.as_bytes()) => {}
            Some(_) => return ApiError::new(StatusCode::UNAUTHORIZED, "wrong API key").into_response(),
            None => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "missing API key: send the header `Authorization: Bearer KEY`")
                    .into_response()
            }
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(server): State<Arc<Server>>) -> Json<Value> {
    let load = &server.load;
    let admitted = load.admitted.load(Ordering::SeqCst);
    let running = load.running.load(Ordering::SeqCst);
    let status = if load.shutting_down.load(Ordering::SeqCst) { "shutting_down" } else { "ok" };
    Json(json!({"status": status, "model": server.name, "running": running, "waiting": admitted.saturating_sub(running)}))
}

async fn models(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": server.name,
        "object": "model",
        "created": server.created,
        "owned_by": "megabyte",
        "megabyte": server.info,
    }]}))
}

async fn completions(State(server): State<Arc<Server>>, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Response {
    match start(&server, body).await {
        Ok((request, events)) => {
            let id = format!("cmpl-{:x}{:04x}", unix_now(), server.next_id.fetch_add(1, Ordering::Relaxed));
            let reply = Reply { id, created: unix_now(), model: server.name.clone(), prompt_bytes: request.prompt.len() };
            if request.stream {
                Sse::new(stream_events(reply, request, events)).into_response()
            } else {
                whole(reply, request, events).await.into_response()
            }
        }
        Err(e) => e.into_response(),
    }
}

/// Checks the request, admits it and hands it to the decoding thread.
async fn start(
    server: &Server,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(Completion, UnboundedReceiver<Event>), ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this server accepts (--max-body)".to_string()
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(status, message)
    })?;
    let request = api::parse_completion(&body, server.max_bytes_per_request)?;
    let busy = |message: &str| ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message) };
    if server.load.shutting_down.load(Ordering::SeqCst) {
        return Err(busy("the server is shutting down"));
    }
    if !server.load.try_admit(server.capacity) {
        return Err(busy("the server is busy: every decoding row and waiting place is taken; retry later"));
    }
    // No seed: a fresh one, as OpenAI's sampling differs from call to call.
    let seed = request.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        nanos ^ server.next_id.load(Ordering::Relaxed).rotate_left(32)
    });
    let sampler = match Sampler::new(request.sampling, seed) {
        Ok(s) => s,
        Err(e) => {
            server.load.release();
            return Err(ApiError::invalid("temperature", e.to_string()));
        }
    };
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let job = Job { prompt: request.prompt.clone(), sampler, max_bytes: request.max_bytes, events };
    let sent = server.jobs.lock().expect("jobs lock").as_ref().map(|jobs| jobs.send(Msg::Job(job)).is_ok());
    if sent != Some(true) {
        server.load.release();
        return Err(busy("the server is shutting down"));
    }
    Ok((request, receiver))
}

/// What every response of one request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    prompt_bytes: usize,
}

impl Reply {
    fn object(&self, text: &str, bytes: &[u8], finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "text": text,
                "index": 0,
                "logprobs": null,
                "finish_reason": finish,
                "bytes": base64::engine::general_purpose::STANDARD.encode(bytes),
            }],
        })
    }

    fn usage(&self, generated: usize) -> Value {
        json!({"prompt_tokens": self.prompt_bytes, "completion_tokens": generated, "total_tokens": self.prompt_bytes + generated})
    }
}

/// How a request's output ended.
enum End {
    Stop,
    Length,
    Error(ApiError),
}

/// The whole completion in one response.
async fn whole(reply: Reply, request: Completion, mut events: UnboundedReceiver<Event>) -> Response {
    let mut stops = StopFilter::new(request.stops);
    let mut out = Vec::new();
    let mut generated = 0;
    let end = loop {
        match events.recv().await {
            Some(Event::Byte(b)) => {
                generated += 1;
                out.extend(stops.push(&[b]));
                if stops.stopped() {
                    break End::Stop;
                }
            }
            Some(Event::Length) => break End::Length,
            Some(Event::Cancelled) => break End::Error(cancelled()),
            Some(Event::Failed(message)) => break End::Error(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)),
            None => break End::Error(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the decoding thread stopped")),
        }
    };
    // Dropping the receiver now frees the row of a request that ended on a stop sequence.
    drop(events);
    let finish = match end {
        End::Stop => "stop",
        End::Length => {
            out.extend(stops.finish());
            "length"
        }
        End::Error(e) => return e.into_response(),
    };
    let mut body = reply.object(&String::from_utf8_lossy(&out), &out, Some(finish));
    body["usage"] = reply.usage(generated);
    Json(body).into_response()
}

fn cancelled() -> ApiError {
    ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled: the server is shutting down") }
}

/// Server-sent events in OpenAI's chunk format: one chunk per batch of released bytes, a last
/// chunk with `finish_reason`, optionally one with `usage`, then `[DONE]`. A request that
/// fails or is cancelled ends with an error event before `[DONE]`.
fn stream_events(
    reply: Reply,
    request: Completion,
    events: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct State {
        reply: Reply,
        events: Option<UnboundedReceiver<Event>>,
        stops: StopFilter,
        utf8: Utf8Pieces,
        generated: usize,
        usage: bool,
    }
    let state = State {
        reply,
        events: Some(events),
        stops: StopFilter::new(request.stops),
        utf8: Utf8Pieces::default(),
        generated: 0,
        usage: request.stream_usage,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    stream::unfold(state, move |mut s| async move {
        let events = s.events.as_mut()?;
        let mut out: Vec<SseEvent> = Vec::new();
        let first = events.recv().await;
        // Everything that has arrived goes in one chunk.
        let mut arrived = vec![first];
        while let Ok(e) = events.try_recv() {
            arrived.push(Some(e));
        }
        let mut released = Vec::new();
        let mut end = None;
        for event in arrived {
            match event {
                Some(Event::Byte(b)) => {
                    s.generated += 1;
                    released.extend(s.stops.push(&[b]));
                    if s.stops.stopped() {
                        end = Some(End::Stop);
                        break;
                    }
                }
                Some(Event::Length) => {
                    released.extend(s.stops.finish());
                    end = Some(End::Length);
                    break;
                }
                Some(Event::Cancelled) => {
                    end = Some(End::Error(cancelled()));
                    break;
                }
                Some(Event::Failed(m)) => {
                    end = Some(End::Error(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)));
                    break;
                }
                None => {
                    end = Some(End::Error(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the decoding thread stopped")));
                    break;
                }
            }
        }
        let (mut bytes, mut text) = s.utf8.push(&released);
        if end.is_some() {
            let (b, t) = s.utf8.finish();
            bytes.extend(b);
            text.push_str(&t);
        }
        if !bytes.is_empty() {
            out.push(data(s.reply.object(&text, &bytes, None)));
        }
        if let Some(end) = end {
            // The request is over: dropping the receiver frees its row.
            s.events = None;
            match end {
                End::Stop | End::Length => {
                    let finish = if matches!(end, End::Stop) { "stop" } else { "length" };
                    out.push(data(s.reply.object("", &[], Some(finish))));
                    if s.usage {
                        let mut last = s.reply.object("", &[], None);
                        last["choices"] = json!([]);
                        last["usage"] = s.reply.usage(s.generated);
                        out.push(data(last));
                    }
                }
                End::Error(e) => out.push(data(e.body())),
            }
            out.push(SseEvent::default().data("[DONE]"));
        }
        Some((stream::iter(out.into_iter().map(Ok)), s))
    })
    .flatten()
}

/// The name a checkpoint is served under: its run folder's name (or its own, if it is not in
/// one).
fn model_name(given: &Path, dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let run = if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) { dir.parent() } else { Some(dir.as_path()) };
    run.and_then(Path::file_name)
        .or_else(|| given.file_name())
        .map_or_else(|| "megabyte".to_string(), |n| n.to_string_lossy().into_owned())
}

/// The data's media recorded by `megabyte train` (`media.json` in the checkpoint folder or
/// its run folder), or null for plain bytes.
fn read_media(dir: &Path) -> Result<Value> {
    for candidate in [Some(dir), dir.parent()].into_iter().flatten() {
        if let Some(media) = crate::media::read(candidate)? {
            return Ok(serde_json::to_value(media)?);
        }
    }
    Ok(Value::Null)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
