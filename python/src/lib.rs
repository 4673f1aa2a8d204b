//! `megabyte._native`: the Python package's compiled half. The Python half (`megabyte/__init__.py`)
//! re-exports it; the stubs (`megabyte/__init__.pyi`) describe it.
//!
//! Every long call runs on a worker thread while the calling thread waits with the GIL
//! released, checking for signals every [`POLL`]: Ctrl-C sets the worker's cancel flag and
//! the call raises `KeyboardInterrupt` once the worker has stopped (generation and evaluation
//! at the next byte or batch, training after the current step with a checkpoint, as the
//! command's Ctrl-C does).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, ValueEnum};
use megabyte::data::{ByteStream, Split};
use megabyte::eval::{evaluate, EvalSettings};
use megabyte::generate::{Sampler, Sampling};
use megabyte::{DType, Device, MegaByte, ModelConfig, Precision, Tensor};
use megabyte_cli::args::{DeviceArgs, PrecisionArg};
use megabyte_cli::generate::Rule;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyString};

/// How often a waiting call checks for Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

/// Rows per forward pass of `logits` (as `megabyte eval`'s default batch): Ctrl-C is checked
/// between them.
const LOGITS_ROWS: usize = 8;

// ---- Errors: the library's typed errors and the command's messages as Python exceptions.

/// A missing file or folder: the path of a `Data` or `Checkpoint` error does not exist.
fn missing(path: &Path) -> bool {
    path.symlink_metadata().is_err()
}

/// Which Python exception an error becomes.
#[derive(Clone, Copy)]
enum Kind {
    /// Bad input or configuration: `ValueError`.
    Value,
    /// A missing file or folder: `FileNotFoundError`.
    NotFound,
    /// Anything else: `RuntimeError`.
    Runtime,
}

fn kind_of(e: &megabyte::Error) -> Kind {
    use megabyte::Error;
    match e {
        Error::Config(_) | Error::Input(_) => Kind::Value,
        Error::Data { path, .. } | Error::Checkpoint { path, .. } if missing(path) => Kind::NotFound,
        Error::Data { .. } | Error::Checkpoint { .. } => Kind::Value,
        Error::Io { source, .. } => io_kind(source),
        Error::Dist(_) | Error::Tensor(_) | Error::Json(_) => Kind::Runtime,
    }
}

fn io_kind(e: &std::io::Error) -> Kind {
    match e.kind() {
        std::io::ErrorKind::NotFound => Kind::NotFound,
        _ => Kind::Runtime,
    }
}

fn raise(kind: Kind, msg: String) -> PyErr {
    match kind {
        Kind::Value => PyValueError::new_err(msg),
        Kind::NotFound => PyFileNotFoundError::new_err(msg),
        Kind::Runtime => PyRuntimeError::new_err(msg),
    }
}

/// The exception for a library error, carrying the library's message.
fn lib_err(e: megabyte::Error) -> PyErr {
    raise(kind_of(&e), e.to_string())
}

/// The exception for an error of the command's code (`megabyte train`'s path), carrying the
/// command's message with its context: classified by the first library or I/O error in its
/// chain; without either it is one of the command's own checks of its settings.
fn cli_err(e: anyhow::Error) -> PyErr {
    let kind = e
        .chain()
        .find_map(|cause| match (cause.downcast_ref::<megabyte::Error>(), cause.downcast_ref::<std::io::Error>()) {
            (Some(lib), _) => Some(kind_of(lib)),
            (None, Some(io)) => Some(io_kind(io)),
            (None, None) => None,
        })
        .unwrap_or(Kind::Value);
    raise(kind, format!("{e:#}"))
}

/// The message of a panic that was not a cancellation: a bug, reported rather than crashing
/// the interpreter.
fn panic_err(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    PyRuntimeError::new_err(format!("internal error (a bug in megabyte, please report it): {what}"))
}

/// The unwinding payload that stops a worker whose caller is gone or was interrupted: the
/// library's generation and evaluation loops report progress through callbacks that cannot
/// return a stop, so the callback unwinds out of them, and the worker catches it.
struct Cancelled;

fn stop_if(cancel: &AtomicBool) {
    if cancel.load(Ordering::Relaxed) {
        resume_unwind(Box::new(Cancelled));
    }
}

/// Runs `work` on a worker thread while this thread waits with the GIL released, checking for
/// signals. On Ctrl-C (a signal handler raising) it sets `cancel`, waits for the worker to stop
/// and raises the handler's exception (`KeyboardInterrupt`).
fn interruptible<T: Send + 'static>(
    py: Python<'_>,
    cancel: Arc<AtomicBool>,
    work: impl FnOnce() -> PyResult<T> + Send + 'static,
) -> PyResult<T> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("megabyte".into())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(work)));
        })
        .map_err(|e| PyRuntimeError::new_err(format!("starting a worker thread: {e}")))?;
    let rx = Mutex::new(rx);
    let mut interrupted: Option<PyErr> = None;
    let outcome = loop {
        match py.detach(|| rx.lock().expect("one waiter").recv_timeout(POLL)) {
            Ok(outcome) => break outcome,
            Err(RecvTimeoutError::Timeout) => {
                if interrupted.is_none() {
                    if let Err(e) = py.check_signals() {
                        cancel.store(true, Ordering::SeqCst);
                        interrupted = Some(e);
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err("internal error: the worker thread ended without a result"))
            }
        }
    };
    if let Some(e) = interrupted {
        return Err(e);
    }
    match outcome {
        Ok(result) => result,
        Err(payload) if payload.is::<Cancelled>() => Err(PyKeyboardInterrupt::new_err("")),
        Err(payload) => Err(panic_err(payload)),
    }
}

// ---- Loading.

/// A checkpoint loaded for inference.
struct Loaded {
    /// For `logits` and `bpb`: f32 parameters, activations in the precision (as `megabyte eval`).
    scoring: MegaByte,
    /// For `generate` and `stream`: parameters in the activations' dtype (as `megabyte generate`).
    sampling: MegaByte,
    device: Device,
    precision: Precision,
    dir: PathBuf,
}

/// A trained megabyte model: sample bytes from it, score bytes with it.
///
/// Made by :func:`megabyte.load`. Its methods release the GIL while they compute and
/// answer Ctrl-C by raising ``KeyboardInterrupt``.
#[pyclass(module = "megabyte", frozen)]
struct Model {
    inner: Arc<Loaded>,
}

/// The precision named `precision` ("auto", "f32" or "bf16"), as the command's `--precision`.
fn parse_precision(precision: &str) -> PyResult<PrecisionArg> {
    PrecisionArg::from_str(precision, false).map_err(|_| {
        let names: Vec<String> =
            PrecisionArg::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|v| v.get_name().to_string()).collect();
        PyValueError::new_err(format!("precision must be one of {}, not {precision:?}", names.join(", ")))
    })
}

/// A path from a `str` or `os.PathLike`.
fn fspath(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<PathBuf> {
    let os = obj.py().import("os")?;
    let path = os.call_method1("fspath", (obj,)).map_err(|_| {
        PyTypeError::new_err(format!("{what} must be a str or os.PathLike, not {}", type_name(obj)))
    })?;
    path.extract::<PathBuf>().map_err(|_| PyTypeError::new_err(format!("{what} must be a text path")))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
}

/// A Python object from JSON text (a dict for an object).
fn from_json<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Load a checkpoint for inference.
///
/// Args:
///     path: a checkpoint folder, or a run folder (its newest checkpoint), as
///         ``megabyte generate --checkpoint``.
///     device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
///     precision: the activations' format: ``"auto"`` (bf16 on CUDA, f32 on the CPU),
///         ``"f32"`` or ``"bf16"``.
///
/// Raises:
///     FileNotFoundError: no such checkpoint or run folder.
///     ValueError: a bad device, precision or checkpoint, or a model too large for the device.
#[pyfunction]
#[pyo3(signature = (path, device = "cpu", precision = "auto"))]
fn load(py: Python<'_>, path: &Bound<'_, PyAny>, device: &str, precision: &str) -> PyResult<Model> {
    let path = fspath(path, "path")?;
    let precision = parse_precision(precision)?;
    let device_args = DeviceArgs { device: Some(device.to_string()), precision };
    let loaded = py.detach(move || -> PyResult<Loaded> {
        let (device, precision) = device_args.open().map_err(cli_err)?;
        let dir = megabyte::checkpoint::resolve(&path).map_err(lib_err)?;
        let sampling = megabyte::checkpoint::load_for_sampling(&dir, 1, precision, &device).map_err(lib_err)?;
        let dtype = precision.dtype();
        // Scoring keeps f32 parameters, as `megabyte eval` does.
        let scoring = match dtype {
            DType::F32 => sampling.clone(),
            _ => megabyte::checkpoint::load_model(&dir, DType::F32, &device).map_err(lib_err)?.0.with_activations(dtype),
        };
        Ok(Loaded {
            scoring,
            sampling,
            device,
            precision,
            dir,
        })
    })?;
    Ok(Model { inner: Arc::new(loaded) })
}

// ---- Generation.

/// What a generation worker sends: bytes as they come, then how it ended.
enum Msg {
    Bytes(Vec<u8>),
    End(PyResult<()>),
}

/// An iterator over the bytes of one generation, as ``bytes`` chunks in the order they are
/// generated; joined, they are what :meth:`Model.generate` returns for the same arguments.
///
/// Made by :meth:`Model.stream`. Waiting for the next chunk releases the GIL and answers
/// Ctrl-C; dropping the iterator stops the generation.
#[pyclass(module = "megabyte")]
struct Stream {
    rx: Mutex<Receiver<Msg>>,
    cancel: Arc<AtomicBool>,
    /// An end read while joining chunks, returned at the next call.
    pending: Option<PyResult<()>>,
    done: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

impl Stream {
    /// The next chunk (every byte that has arrived, at least one), or `None` at the end.
    fn next_chunk(&mut self, py: Python<'_>) -> PyResult<Option<Vec<u8>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            // Checked on every call, not only when the channel is quiet: a fast generation
            // never lets `recv_timeout` time out, and `generate` loops here without returning
            // to the interpreter.
            if let Err(e) = py.check_signals() {
                self.cancel.store(true, Ordering::SeqCst);
                self.done = true;
                return Err(e);
            }
            if let Some(end) = self.pending.take() {
                self.done = true;
                return end.map(|()| None);
            }
            let rx = &self.rx;
            match py.detach(|| rx.lock().expect("one reader").recv_timeout(POLL)) {
                Ok(Msg::Bytes(mut chunk)) => {
                    let rx = self.rx.lock().expect("one reader");
                    while let Ok(msg) = rx.try_recv() {
                        match msg {
                            Msg::Bytes(more) => chunk.extend_from_slice(&more),
                            Msg::End(end) => {
                                self.pending = Some(end);
                                break;
                            }
                        }
                    }
                    return Ok(Some(chunk));
                }
                Ok(Msg::End(end)) => self.pending = Some(end),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.done = true;
                    return Err(PyRuntimeError::new_err("internal error: the generation thread ended without a result"));
                }
            }
        }
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        Ok(self.next_chunk(py)?.map(|chunk| PyBytes::new(py, &chunk)))
    }

    /// Stop the generation now (as dropping the iterator does); the iteration ends.
    fn close(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.done = true;
    }
}

/// A prompt from `bytes`, `bytearray` or `str` (its UTF-8 bytes, as `--prompt`).
fn prompt_bytes(prompt: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = prompt.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(b) = prompt.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if let Ok(s) = prompt.cast::<PyString>() {
        return Ok(s.extract::<String>()?.into_bytes());
    }
    Err(PyTypeError::new_err(format!("prompt must be bytes, bytearray or str, not {}", type_name(prompt))))
}

/// The sampling rule named `sampling`, with its parameters, as `megabyte generate`'s flags.
fn parse_sampling(sampling: &str, temperature: f64, top_k: usize, top_p: f64) -> PyResult<Sampling> {
    let rule = Rule::from_str(sampling, false).map_err(|_| {
        let names: Vec<String> =
            Rule::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|v| v.get_name().to_string()).collect();
        PyValueError::new_err(format!("sampling must be one of {}, not {sampling:?}", names.join(", ")))
    })?;
    Ok(rule.sampling(temperature, top_k, top_p))
}

impl Model {
    /// Starts a generation on its own thread.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        prompt: &Bound<'_, PyAny>,
        n: usize,
        sampling: &str,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        seed: u64,
    ) -> PyResult<Stream> {
        let prompt = prompt_bytes(prompt)?;
        let mut sampler = Sampler::new(parse_sampling(sampling, temperature, top_k, top_p)?, seed).map_err(lib_err)?;
        let (tx, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let (inner, stop) = (self.inner.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("megabyte-generate".into())
            .spawn(move || {
                let run = catch_unwind(AssertUnwindSafe(|| {
                    megabyte::generate::generate(&inner.sampling, &[prompt], n, &mut sampler, &inner.device, &mut |bytes| {
                        stop_if(&stop);
                        if tx.send(Msg::Bytes(bytes.to_vec())).is_err() {
                            resume_unwind(Box::new(Cancelled)); // nobody reads any more
                        }
                    })
                }));
                let end = match run {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(lib_err(e)),
                    Err(payload) if payload.is::<Cancelled>() => Ok(()),
                    Err(payload) => Err(panic_err(payload)),
                };
                let _ = tx.send(Msg::End(end));
            })
            .map_err(|e| PyRuntimeError::new_err(format!("starting the generation thread: {e}")))?;
        Ok(Stream { rx: Mutex::new(rx), cancel, pending: None, done: false })
    }

    fn config(&self) -> &ModelConfig {
        self.inner.scoring.config()
    }
}

#[pymethods]
impl Model {
    /// Generate ``n`` bytes after ``prompt``: the bytes ``megabyte generate`` prints (without
    /// its closing newline) for the same checkpoint, flags and seed.
    ///
    /// Args:
    ///     prompt: bytes to continue (a ``str`` is taken as its UTF-8 bytes, as ``--prompt``),
    ///         shorter than the model's context; past the context, the window slides as in
    ///         ``megabyte generate``.
    ///     n: bytes to generate (``-n``).
    ///     sampling: ``"greedy"``, ``"temperature"``, ``"top-k"`` or ``"top-p"`` (nucleus).
    ///     temperature: temperature of every rule but greedy.
    ///     top_k: k of ``"top-k"``.
    ///     top_p: p of ``"top-p"``.
    ///     seed: seed of the sampler; a seed fixes the output.
    ///
    /// Returns:
    ///     The generated bytes (the prompt excluded).
    ///
    /// Raises:
    ///     ValueError: a bad rule or parameter, or a prompt as long as the context (the
    ///         library's message).
    ///     KeyboardInterrupt: Ctrl-C; the generation stops within a byte (on CUDA, a patch).
    #[pyo3(signature = (prompt = None, n = 512, sampling = "top-p", temperature = 1.0, top_k = 40, top_p = 0.9, seed = 0))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: Option<&Bound<'py, PyAny>>,
        n: usize,
        sampling: &str,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        seed: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let empty = PyBytes::new(py, b"").into_any();
        let mut stream = self.start(prompt.unwrap_or(&empty), n, sampling, temperature, top_k, top_p, seed)?;
        let mut out = Vec::with_capacity(n.min(1 << 20));
        while let Some(chunk) = stream.next_chunk(py)? {
            out.extend_from_slice(&chunk);
        }
        Ok(PyBytes::new(py, &out))
    }

    /// Generate as :meth:`generate` does, yielding ``bytes`` chunks as they are generated.
    ///
    /// Same arguments as :meth:`generate`; ``b"".join(model.stream(...))`` equals
    /// ``model.generate(...)``. Dropping or closing the iterator stops the generation.
    #[pyo3(signature = (prompt = None, n = 512, sampling = "top-p", temperature = 1.0, top_k = 40, top_p = 0.9, seed = 0))]
    #[allow(clippy::too_many_arguments)]
    fn stream<'py>(
        &self,
        py: Python<'py>,
        prompt: Option<&Bound<'py, PyAny>>,
        n: usize,
        sampling: &str,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        seed: u64,
    ) -> PyResult<Stream> {
        let empty = PyBytes::new(py, b"").into_any();
        self.start(prompt.unwrap_or(&empty), n, sampling, temperature, top_k, top_p, seed)
    }

    /// Logits of every byte given the bytes before it.
    ///
    /// Args:
    ///     x: a NumPy ``uint8`` array ``[B, T]`` (or ``[T]``), 1 ≤ T ≤ ``context``.
    ///
    /// Returns:
    ///     ``float32`` ``[B, T, 256]`` (``[T, 256]`` for 1-D ``x``): ``out[b, t]`` predicts
    ///     ``x[b, t]`` from ``x[b, :t]``; softmax gives the next byte's probabilities.
    ///
    /// Raises:
    ///     ValueError: ``x`` is not a ``uint8`` array of one of those shapes.
    fn logits<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let context = self.config().context;
        let array = x.cast::<PyArrayDyn<u8>>().map_err(|_| {
            let dtype = x.getattr("dtype").ok().map(|d| d.to_string());
            PyValueError::new_err(match dtype {
                Some(dtype) => format!("x must be a NumPy array of dtype uint8 (bytes), not {dtype}: use x.astype(numpy.uint8)"),
                None => format!("x must be a NumPy uint8 array [B, T] or [T], not {}", type_name(x)),
            })
        })?;
        let shape = array.shape().to_vec();
        let (b, t) = match shape[..] {
            [t] => (1, t),
            [b, t] => (b, t),
            _ => return Err(PyValueError::new_err(format!("x must be [B, T] or [T], not of shape {shape:?}"))),
        };
        if b == 0 || t == 0 || t > context {
            return Err(PyValueError::new_err(format!(
                "x has shape {shape:?}: it needs at least one row and 1 ≤ T ≤ {context} bytes (the model's context)"
            )));
        }
        let bytes: Vec<u32> = array.readonly().as_array().iter().map(|&v| v as u32).collect();
        let inner = self.inner.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let logits = interruptible(py, cancel, move || logits_rows(&inner, &bytes, b, t, &stop).map_err(lib_err))?;
        let out = PyArray1::from_vec(py, logits);
        let out = match shape.len() {
            1 => out.reshape([t, megabyte::V])?.into_any(),
            _ => out.reshape([b, t, megabyte::V])?.into_any(),
        };
        Ok(out)
    }

    /// Bits per byte over every byte of ``data``: the number ``megabyte eval --checkpoint …
    /// --data FILE --json`` reports with the same settings.
    ///
    /// Args:
    ///     data: the bytes (``bytes``/``bytearray``), or a file or folder (``str`` or
    ///         ``os.PathLike``) as ``--data``.
    ///     strided: ``--strided``: a second pass offset by P/2 (2× the cost).
    ///     sliding: ``--sliding STRIDE``: windows advancing by ``sliding`` bytes, scoring only
    ///         their last ``sliding`` bytes.
    ///     documents: ``--documents``: each document of a path (its ``.documents.json``) on its own.
    ///     batch_size: ``--batch-size``: windows per forward pass.
    ///
    /// Raises:
    ///     FileNotFoundError: no such file or folder.
    ///     ValueError: empty data, or bad settings.
    #[pyo3(signature = (data, *, strided = false, sliding = None, documents = false, batch_size = 8))]
    fn bpb(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        strided: bool,
        sliding: Option<usize>,
        documents: bool,
        batch_size: usize,
    ) -> PyResult<f64> {
        let stream = if let Ok(b) = data.cast::<PyBytes>() {
            Some(b.as_bytes().to_vec())
        } else if let Ok(b) = data.cast::<PyByteArray>() {
            Some(b.to_vec())
        } else {
            None
        };
        let stream = match stream {
            Some(bytes) => {
                if bytes.is_empty() {
                    return Err(PyValueError::new_err("data is empty: there is nothing to score"));
                }
                if documents {
                    return Err(PyValueError::new_err(
                        "documents=True needs a path whose documents are given by its .documents.json, not bytes",
                    ));
                }
                ByteStream::from_vec("bytes", bytes)
            }
            None => ByteStream::open(&fspath(data, "data")?).map_err(lib_err)?,
        };
        let inner = self.inner.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        interruptible(py, cancel, move || {
            let stream = Arc::new(stream);
            let split = match documents {
                true => Split::all(stream.clone()).with_documents(&stream.documents().map_err(lib_err)?),
                false => Split::all(stream),
            };
            let settings = EvalSettings { strided, sliding, batch_size };
            let report = evaluate(&inner.scoring, &split, settings, None, &inner.device, &mut |_, _| stop_if(&stop))
                .map_err(lib_err)?;
            Ok(report.bpb)
        })
    }

    /// The model's configuration: the checkpoint's ``config.json`` as a dict.
    #[getter(config)]
    fn config_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, self.config())
    }

    /// Bytes per sequence (T): the longest ``x`` of :meth:`logits`, and the window of generation.
    #[getter]
    fn context(&self) -> usize {
        self.config().context
    }

    /// Bytes per patch (P).
    #[getter]
    fn patch_size(&self) -> usize {
        self.config().patch_size
    }

    /// The checkpoint folder loaded.
    #[getter]
    fn checkpoint(&self) -> PathBuf {
        self.inner.dir.clone()
    }

    /// The device the model runs on, e.g. ``"cpu"``.
    #[getter]
    fn device(&self) -> String {
        match &self.inner.device {
            Device::Cpu => "cpu".into(),
            Device::Cuda(_) => "cuda".into(),
            Device::Metal(_) => "metal".into(),
        }
    }

    /// The activations' format: ``"f32"`` or ``"bf16"``.
    #[getter]
    fn precision(&self) -> &'static str {
        match self.inner.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<megabyte.Model {} (P = {}, T = {}) on {}>",
            self.inner.dir.display(),
            self.config().patch_size,
            self.config().context,
            self.device()
        )
    }
}

/// Logits of `b` rows of `t` bytes, [b·t·V] f32, [`LOGITS_ROWS`] rows per forward pass; each
/// row padded to whole patches (the padding after byte t changes no logit up to t: causality).
fn logits_rows(inner: &Loaded, bytes: &[u32], b: usize, t: usize, cancel: &AtomicBool) -> megabyte::Result<Vec<f32>> {
    let p = inner.scoring.config().patch_size;
    let padded = t.div_ceil(p) * p;
    let mut out = Vec::with_capacity(b * t * megabyte::V);
    for rows in bytes.chunks(LOGITS_ROWS * t) {
        stop_if(cancel);
        let n = rows.len() / t;
        let mut input = vec![0u32; n * padded];
        for (dst, src) in input.chunks_mut(padded).zip(rows.chunks(t)) {
            dst[..t].copy_from_slice(src);
        }
        let x = Tensor::from_vec(input, (n, padded), &inner.device)?;
        let logits = inner.scoring.logits(&x)?.narrow(1, 0, t)?.to_dtype(DType::F32)?;
        out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

// ---- Training.

/// `megabyte train`'s arguments, parsed as the command parses them.
#[derive(clap::Parser)]
#[command(name = "megabyte train", no_binary_name = true)]
struct TrainCommand {
    #[command(flatten)]
    args: megabyte_cli::train::Args,
}

/// The keyword arguments of `train`: each option of `megabyte train`, with `_` for `-`, and
/// whether it is a switch.
fn train_options() -> Vec<(String, bool)> {
    TrainCommand::command()
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            (long != "help").then(|| (long.replace('-', "_"), matches!(a.get_action(), clap::ArgAction::SetTrue)))
        })
        .collect()
}

/// The options of ``megabyte train`` that :func:`train` takes as keyword arguments, with
/// whether each is a switch (``True`` turns it on).
#[pyfunction]
#[pyo3(name = "_train_options")]
fn train_options_py() -> Vec<(String, bool)> {
    train_options()
}

/// The command line `megabyte train` would get for these keyword arguments.
fn train_argv(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<String>> {
    let options = train_options();
    let mut argv = Vec::new();
    let Some(kwargs) = kwargs else { return Ok(argv) };
    for (key, value) in kwargs.iter() {
        let key: String = key.extract()?;
        let Some((_, switch)) = options.iter().find(|(name, _)| *name == key) else {
            let names: Vec<&str> = options.iter().map(|(n, _)| n.as_str()).collect();
            return Err(PyTypeError::new_err(format!(
                "train() got an unexpected keyword argument '{key}'; its options are `megabyte train`'s: {}",
                names.join(", ")
            )));
        };
        if value.is_none() {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        if *switch {
            match value.extract::<bool>() {
                Ok(true) => argv.push(flag),
                Ok(false) => {}
                Err(_) => return Err(PyTypeError::new_err(format!("{key} is a switch: pass True or False, not {}", type_name(&value)))),
            }
            continue;
        }
        if value.cast::<PyBool>().is_ok() {
            return Err(PyTypeError::new_err(format!("{key} takes a value, not {value}")));
        }
        let text = match value.cast::<PyString>() {
            Ok(s) => s.extract::<String>()?,
            Err(_) if value.hasattr("__fspath__")? => fspath(&value, &key)?.to_string_lossy().into_owned(),
            Err(_) => value.str()?.extract::<String>()?,
        };
        argv.push(flag);
        argv.push(text);
    }
    Ok(argv)
}

/// Train a model (or resume a run), as ``megabyte train`` does: the same options, checks,
/// messages, run folder, checkpoints, ``metrics.jsonl`` and ``loss.png``.
///
/// Every option of ``megabyte train --help`` is a keyword argument, ``_`` for ``-``
/// (``batch_size=8`` for ``--batch-size 8``); switches take ``True``; ``None`` leaves an
/// option out. ``devices`` is not available here: multi-GPU runs start one process per GPU,
/// through the ``megabyte`` command.
///
/// Args:
///     out: the run folder (``--out``): new or empty, unless resuming.
///     on_step: called after every optimizer step with a dict of the step's figures (``step``,
///         ``loss``, ``bpb``, ``lr``, ``grad_norm``, ``bytes_per_sec``, ``elapsed_secs``, …, as
///         in ``metrics.jsonl``); returning ``False`` stops the run cleanly, saving a
///         checkpoint; an exception it raises does the same and is then raised here.
///
/// Returns:
///     A dict: ``run_dir``, ``checkpoint`` (the final one), ``steps``, ``bytes_seen``,
///     ``first_valid_bpb``, ``final_valid_bpb`` and ``reason`` (``"steps"``, ``"time"`` or
///     ``"interrupted"``).
///
/// Raises:
///     ValueError: a bad option or setting (the command's message).
///     FileNotFoundError: missing data, config or checkpoint.
///     KeyboardInterrupt: Ctrl-C; the run stops after the current step and saves a checkpoint
///         first, as the command's Ctrl-C does (resume it with ``resume=run_dir``).
#[pyfunction]
#[pyo3(signature = (out = None, *, on_step = None, **options))]
fn train<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    on_step: Option<Py<PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut argv = Vec::new();
    if let Some(out) = out.filter(|o| !o.is_none()) {
        argv.extend(["--out".to_string(), fspath(out, "out")?.to_string_lossy().into_owned()]);
    }
    if options.is_some_and(|o| o.get_item("devices").ok().flatten().is_some_and(|d| !d.is_none())) {
        return Err(PyValueError::new_err(
            "devices: multi-GPU training starts one process per GPU; run `megabyte train --devices LIST` instead",
        ));
    }
    argv.extend(train_argv(options)?);
    let matches = TrainCommand::command().try_get_matches_from(&argv).map_err(|e| clap_err(&e))?;
    let args = TrainCommand::from_arg_matches(&matches).map_err(|e| clap_err(&e))?.args;

    let stop = Arc::new(AtomicBool::new(false));
    let raised: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
    let (hook_stop, hook_raised) = (stop.clone(), raised.clone());
    let outcome = interruptible(py, stop, move || {
        let mut call = |stats: &megabyte::train::StepStats| -> bool {
            let Some(callback) = on_step.as_ref() else { return true };
            Python::attach(|py| {
                let result = from_json(py, stats).and_then(|d| callback.call1(py, (d,)));
                match result {
                    Ok(answer) => !answer.bind(py).is(&PyBool::new(py, false)),
                    Err(e) => {
                        *hook_raised.lock().expect("one writer") = Some(e);
                        false
                    }
                }
            })
        };
        let hooks = megabyte_cli::train::Hooks { stop: hook_stop, ctrl_c: false, on_step: Some(&mut call) };
        megabyte_cli::train::run_with(args, hooks).map_err(cli_err)
    })?;
    if let Some(e) = raised.lock().expect("one writer").take() {
        return Err(e);
    }
    let outcome = outcome.ok_or_else(|| PyRuntimeError::new_err("the run ended without a result"))?;
    let summary = &outcome.summary;
    let dict = PyDict::new(py);
    dict.set_item("run_dir", &outcome.run_dir)?;
    dict.set_item("checkpoint", &summary.checkpoint)?;
    dict.set_item("steps", summary.steps)?;
    dict.set_item("bytes_seen", summary.bytes_seen)?;
    dict.set_item("first_valid_bpb", summary.first_valid_bpb)?;
    dict.set_item("final_valid_bpb", summary.final_valid_bpb)?;
    dict.set_item("reason", from_json(py, &summary.reason)?)?;
    Ok(dict.into_any())
}

/// A `ValueError` with clap's message, as the command prints it (without its colours).
fn clap_err(e: &clap::Error) -> PyErr {
    let text = e.render().to_string();
    PyValueError::new_err(text.trim_end().strip_prefix("error: ").unwrap_or(text.trim_end()).to_string())
}

/// MEGABYTE byte-level language models: load a checkpoint to generate and score bytes, or
/// train one. The same library and rules as the ``megabyte`` command.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // As the command does first thing: candle's per-op thread pools off (unless set), the
    // allocator tuned; the same settings give the command's numbers.
    megabyte::tune_cpu_runtime();
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(train_options_py, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<Stream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
