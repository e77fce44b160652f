//! The library's error type: each variant says what failed and where (a path, a tensor name, a
//! config key), so the CLI can print one clear line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config {key} = {value}: {allowed}")]
    Config {
        key: String,
        value: String,
        allowed: String,
    },
    #[error("{path}: tensor {name}: {msg}")]
    Weights {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("{path}: checkpoint: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error(
        "{path}: in use by another run (pid {pid}); one run writes to an output folder at a time"
    )]
    Locked { path: PathBuf, pid: String },
    #[error("report: chart {chart}: {msg}")]
    Plot { chart: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn config(key: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// Ok when `ok`, else a config error naming the key, the value and what is allowed.
pub(crate) fn check(
    ok: bool,
    key: &str,
    value: impl std::fmt::Display,
    allowed: &str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::config(key, value, allowed))
    }
}

pub(crate) fn positive(key: &str, v: f64) -> Result<()> {
    check(v.is_finite() && v > 0.0, key, v, "a positive number")
}

pub(crate) fn unit(key: &str, v: f64) -> Result<()> {
    check((0.0..=1.0).contains(&v), key, v, "a number in [0, 1]")
}

pub(crate) fn at_least(key: &str, v: usize, min: usize) -> Result<()> {
    check(v >= min, key, v, &format!("an integer >= {min}"))
}
