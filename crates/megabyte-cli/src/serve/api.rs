//! The OpenAI Completions request as this server reads it, and errors in OpenAI's shape.
//!
//! Sampling maps onto [`Sampling`] the way `megabyte generate`'s flags do, so a request gives
//! the bytes of `megabyte generate --seed S` with the matching flags:
//!
//! | request | `megabyte generate` |
//! | --- | --- |
//! | `temperature: 0` | `--sampling greedy` |
//! | `top_k: K` (and `temperature: T`, default 1) | `--sampling top-k --top-k K --temperature T` |
//! | `top_p: p` < 1 (and `temperature: T`) | `--sampling top-p --top-p p --temperature T` |
//! | otherwise (`temperature: T`, default 1) | `--sampling temperature --temperature T` |
//!
//! `top_k` and `top_p` < 1 together are refused (no rule of `generate` applies both).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use megabyte::generate::Sampling;
use serde_json::{json, Map, Value};

/// Bytes generated when a request gives no `max_tokens` (OpenAI's default, in bytes).
pub const DEFAULT_MAX_TOKENS: u64 = 16;
/// OpenAI accepts up to 4 stop sequences.
const MAX_STOPS: usize = 4;

/// An error response: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    /// Seconds a client should wait before trying again (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, retry_after: None }
    }

    /// 400 about one field of the request.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param), ..ApiError::new(StatusCode::BAD_REQUEST, message) }
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "server_overloaded",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error as one JSON object (also a stream's last event).
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.status.as_u16().to_string()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A completion request, checked.
pub struct Completion {
    pub prompt: Vec<u8>,
    pub max_bytes: usize,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub stops: Vec<Vec<u8>>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` before `[DONE]`.
    pub stream_usage: bool,
}

/// Reads a request body. Fields OpenAI defines that this server cannot honour are refused
/// when set to anything but their default, rather than ignored; other unknown fields are
/// ignored as OpenAI's clients may send them.
pub fn parse_completion(body: &[u8], max_bytes_per_request: usize) -> Result<Completion, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(req) = value else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object with a `prompt`"));
    };
    if let Some(model) = req.get("model").filter(|m| !m.is_string()) {
        return Err(ApiError::invalid("model", format!("`model` must be a string, got {model}")));
    }
    let prompt = match (field(&req, "prompt"), field(&req, "prompt_bytes")) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("prompt", "give `prompt` or `prompt_bytes`, not both")),
        (Some(Value::String(s)), None) => s.as_bytes().to_vec(),
        (Some(Value::Array(items)), None) => match items.as_slice() {
            [Value::String(s)] => s.as_bytes().to_vec(),
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "`prompt` as an array must hold exactly one string (one completion per request)",
                ))
            }
        },
        (Some(p), None) => return Err(ApiError::invalid("prompt", format!("`prompt` must be a string, got {p}"))),
        (None, Some(Value::String(b64))) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::invalid("prompt_bytes", format!("`prompt_bytes` is not valid base64: {e}")))?,
        (None, Some(p)) => {
            return Err(ApiError::invalid("prompt_bytes", format!("`prompt_bytes` must be a base64 string, got {p}")))
        }
        (None, None) => {
            return Err(ApiError::invalid("prompt", "no `prompt`: give the text to continue (or `prompt_bytes`, base64)"))
        }
    };
    let max_tokens = uint(&req, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens > max_bytes_per_request as u64 {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "`max_tokens` is {max_tokens} but this server generates at most {max_bytes_per_request} bytes per request (--max-bytes-per-request): ask for fewer"
            ),
        ));
    }
    if let Some(n) = uint(&req, "n")?.filter(|&n| n != 1) {
        return Err(ApiError::invalid("n", format!("`n` must be 1 (one completion per request), got {n}")));
    }
    if let Some(n) = uint(&req, "best_of")?.filter(|&n| n != 1) {
        return Err(ApiError::invalid("best_of", format!("`best_of` must be 1, got {n}")));
    }
    unsupported(&req, "echo", |v| v == &Value::Bool(false))?;
    unsupported(&req, "logprobs", |_| false)?;
    unsupported(&req, "suffix", |_| false)?;
    unsupported(&req, "presence_penalty", |v| v.as_f64() == Some(0.0))?;
    unsupported(&req, "frequency_penalty", |v| v.as_f64() == Some(0.0))?;
    unsupported(&req, "logit_bias", |v| v.as_object().is_some_and(Map::is_empty))?;

    let temperature = number(&req, "temperature")?.unwrap_or(1.0);
    if !(temperature >= 0.0) {
        return Err(ApiError::invalid("temperature", format!("`temperature` must be ≥ 0 (0 is greedy), got {temperature}")));
    }
    let top_p = number(&req, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = uint(&req, "top_k")?;
    if top_k == Some(0) {
        return Err(ApiError::invalid("top_k", "`top_k` must be at least 1"));
    }
    let sampling = match (temperature, top_k) {
        (t, _) if t == 0.0 => Sampling::Greedy,
        (_, Some(_)) if top_p < 1.0 => {
            return Err(ApiError::invalid("top_k", "give `top_k` or `top_p` < 1, not both: each is its own sampling rule"))
        }
        (t, Some(k)) => Sampling::TopK { k: k.min(256) as usize, temperature: t },
        (t, None) if top_p < 1.0 => Sampling::TopP { p: top_p, temperature: t },
        (t, None) => Sampling::Temperature { temperature: t },
    };
    sampling.validate().map_err(|e| ApiError::invalid("temperature", e.to_string()))?;
    let seed = uint(&req, "seed")?;

    let stops = match field(&req, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or an array of strings"))?,
        Some(v) => return Err(ApiError::invalid("stop", format!("`stop` must be a string or an array of strings, got {v}"))),
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOPS} stop sequences, got {}", stops.len())));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "a stop sequence must not be empty"));
    }
    let stream = match field(&req, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(ApiError::invalid("stream", format!("`stream` must be true or false, got {v}"))),
    };
    let stream_usage = match field(&req, "stream_options") {
        None => false,
        Some(Value::Object(o)) => o.get("include_usage").and_then(Value::as_bool).unwrap_or(false),
        Some(v) => return Err(ApiError::invalid("stream_options", format!("`stream_options` must be an object, got {v}"))),
    };
    Ok(Completion {
        prompt,
        max_bytes: max_tokens as usize,
        sampling,
        seed,
        stops: stops.into_iter().map(String::into_bytes).collect(),
        stream,
        stream_usage,
    })
}

/// A field that is present and not null.
fn field<'a>(req: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    req.get(name).filter(|v| !v.is_null())
}

fn uint(req: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, ApiError> {
    field(req, name)
        .map(|v| v.as_u64().ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a non-negative integer, got {v}"))))
        .transpose()
}

fn number(req: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, ApiError> {
    field(req, name).map(|v| v.as_f64().ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a number, got {v}")))).transpose()
}

/// Refuses `name` unless it is absent, null, or `default_ok`.
fn unsupported(req: &Map<String, Value>, name: &'static str, default_ok: impl Fn(&Value) -> bool) -> Result<(), ApiError> {
    match field(req, name) {
        Some(v) if !default_ok(v) => {
            Err(ApiError::invalid(name, format!("`{name}` is not supported by this server: leave it out (got {v})")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Completion, ApiError> {
        parse_completion(body.as_bytes(), 1000)
    }

    #[test]
    fn sampling_maps_like_generate_flags() {
        let rule = |body: &str| parse(body).unwrap().sampling;
        assert_eq!(rule(r#"{"prompt":"a","temperature":0,"top_k":3}"#), Sampling::Greedy);
        assert_eq!(rule(r#"{"prompt":"a"}"#), Sampling::Temperature { temperature: 1.0 });
        assert_eq!(rule(r#"{"prompt":"a","top_k":5,"temperature":0.5}"#), Sampling::TopK { k: 5, temperature: 0.5 });
        assert_eq!(rule(r#"{"prompt":"a","top_p":0.9}"#), Sampling::TopP { p: 0.9, temperature: 1.0 });
        assert_eq!(rule(r#"{"prompt":"a","top_p":1}"#), Sampling::Temperature { temperature: 1.0 });
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, param) in [
            (r#"{"prompt":1}"#, "prompt"),
            (r#"{"prompt":["a","b"]}"#, "prompt"),
            (r#"{"prompt_bytes":"***"}"#, "prompt_bytes"),
            (r#"{"prompt":"a","max_tokens":-1}"#, "max_tokens"),
            (r#"{"prompt":"a","max_tokens":1001}"#, "max_tokens"),
            (r#"{"prompt":"a","n":2}"#, "n"),
            (r#"{"prompt":"a","temperature":"hot"}"#, "temperature"),
            (r#"{"prompt":"a","top_p":0}"#, "top_p"),
            (r#"{"prompt":"a","top_k":3,"top_p":0.5}"#, "top_k"),
            (r#"{"prompt":"a","stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"prompt":"a","stop":""}"#, "stop"),
            (r#"{"prompt":"a","echo":true}"#, "echo"),
            (r#"{"prompt":"a","stream":"yes"}"#, "stream"),
        ] {
            let err = parse(body).err().unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!((err.status, err.param), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", err.message);
        }
        assert!(parse("{").err().unwrap().message.contains("not valid JSON"));
    }
}
