//! The data crate's error type: structured variants, each message saying what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input file that cannot be used as it is.
    #[error("data {path}: {msg}")]
    Data { path: PathBuf, msg: String },

    #[error("{0}")]
    Input(String),

    /// A data set that could not be downloaded, or whose bytes failed their checks.
    #[error("fetch {name}: {msg}")]
    Fetch { name: String, msg: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Json(#[from] serde_json::Error),

    /// Writing the sidecar document index (the model library's format).
    #[error(transparent)]
    Index(#[from] megabyte::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: context(), source })
    }
}
