//! Logs (JSON or pretty, `RUST_LOG`-style filter) and the per-request outcome vocabulary
//! shared by logs and metrics.

pub mod exposition;
pub mod metrics;

use tracing_subscriber::{fmt, EnvFilter};

pub use exposition::Exposition;
pub use metrics::{DiskStoreMetrics, Metrics, Renewal, ReplicaAcks, StoreOp, WaitMetrics};

use crate::config::LogFormat;

/// How a request ended, as logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Not guarded: forwarded as is.
    Passthrough,
    /// Guarded, executed upstream (first time for its key).
    Executed,
    /// Guarded, answered from the stored first response.
    Replayed,
    /// Guarded, its key still in flight (409).
    Conflict,
    /// Guarded, its key used with a different request (422).
    Mismatch,
    /// Malformed, duplicate or missing key (400).
    InvalidKey,
    /// Store unreachable, failing closed (503).
    StoreUnavailable,
    /// Store unreachable, forwarded without protection.
    FailOpen,
    /// Outcome unknown (timeout after sending, lease lapsed).
    OutcomeUnknown,
    /// Guarded request body over the limit (413).
    TooLarge,
    /// The upstream could not be reached or failed (502/504).
    UpstreamError,
    /// A request the proxy refused as malformed (400/404).
    BadRequest,
    /// Guarded, its key's first response was too large to store: not replayable (502).
    NotReplayable,
    /// The proxy failed inside (an execution panicked): a bug (500).
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 14] = [
        Outcome::Passthrough,
        Outcome::Executed,
        Outcome::Replayed,
        Outcome::Conflict,
        Outcome::Mismatch,
        Outcome::InvalidKey,
        Outcome::StoreUnavailable,
        Outcome::FailOpen,
        Outcome::OutcomeUnknown,
        Outcome::TooLarge,
        Outcome::UpstreamError,
        Outcome::BadRequest,
        Outcome::NotReplayable,
        Outcome::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passthrough => "passthrough",
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::InvalidKey => "invalid_key",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::FailOpen => "fail_open",
            Outcome::OutcomeUnknown => "outcome_unknown",
            Outcome::TooLarge => "too_large",
            Outcome::UpstreamError => "upstream_error",
            Outcome::BadRequest => "bad_request",
            Outcome::NotReplayable => "not_replayable",
            Outcome::Internal => "internal_error",
        }
    }
}

/// Installs the global log subscriber. `filter` uses `RUST_LOG` syntax; `RUST_LOG` itself,
/// when set, wins. Fails only when the filter does not parse.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(&env).map_err(|e| format!("RUST_LOG `{env}`: {e}"))?,
        _ => EnvFilter::try_new(filter).map_err(|e| format!("log filter `{filter}`: {e}"))?,
    };
    // Colours only on a terminal: a redirected log stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}
