//! The TOML file form of the configuration, and the command-line/environment overlay.
//!
//! Every field is optional here: a value left out falls back to the next layer down.
//! Precedence, lowest first: built-in defaults < config file < `IDEMPROXY_*` env < flags.
//! Route-level `[route.idempotency]` settings are the most specific and win over all of them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// The whole config file. Unknown keys are start-up errors (`deny_unknown_fields`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Proxy listener, e.g. `"127.0.0.1:8080"`.
    pub listen: Option<String>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`, `/keys`); off when absent.
    pub admin_listen: Option<String>,
    /// Bearer token required by the admin key endpoints (and by any non-loopback admin bind).
    pub admin_token: Option<String>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub upstream: UpstreamSection,
    #[serde(default)]
    pub idempotency: PolicySection,
    /// Routes, longest prefix first after loading. Empty: one catch-all route to `upstream.url`.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteSection>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `"json"` or `"pretty"`.
    pub format: Option<String>,
    /// `RUST_LOG`-style filter, e.g. `"info,idemproxy=debug"`.
    pub filter: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub http2_keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub http2_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub body_read_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    /// Runtime threads; 1 runs everything on one thread (no cross-thread wake-ups). Default:
    /// one per core the process may run on.
    pub worker_threads: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain (PEM, leaf first) of the listener. With `key`, the listener speaks TLS
    /// only (ALPN `h2` and `http/1.1`), and `X-Forwarded-Proto` is `https`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: Option<PathBuf>,
    /// How often `cert` and `key` are checked for changes (re-read when they change).
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `redis://`, `rediss://` (TLS), `redis+cluster://h1:p1,h2:p2` or `rediss+cluster://…`.
    /// Absent: the embedded memory store.
    pub redis: Option<String>,
    /// `rediss://` only: CA certificates (PEM) the Redis server's certificate is checked against,
    /// *instead of* the bundled Mozilla roots (for a Redis with a private CA). Single server and
    /// cluster alike.
    pub ca_file: Option<PathBuf>,
    /// Prefix of every storage key.
    pub key_prefix: Option<String>,
    /// Memory store: most records kept at once.
    pub memory_max_entries: Option<usize>,
    /// Redis: how long one command may take before the store counts as unavailable.
    #[serde(default, with = "humantime_serde")]
    pub command_timeout: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// The catch-all upstream, `http://host:port` or `https://host:port`.
    pub url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pool_idle_timeout: Option<Duration>,
    pub pool_max_idle_per_host: Option<usize>,
    /// Forward the client's `Host` instead of the upstream's authority.
    pub preserve_host: Option<bool>,
    /// Extra CA certificates (PEM) trusted for `https://` upstreams, on top of the system's.
    pub ca_file: Option<PathBuf>,
}

/// Idempotency policy. In `[idempotency]` it is the default for every route; in
/// `[route.idempotency]` it overrides that default for one route.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub methods: Option<Vec<String>>,
    pub require_key: Option<bool>,
    pub scope_header: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub key_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub lock_ttl: Option<Duration>,
    pub on_conflict: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub wait_timeout: Option<Duration>,
    pub store_failure: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub max_response_bytes: Option<u64>,
    pub record_server_errors: Option<bool>,
    pub unknown_outcome: Option<String>,
    /// `false`: the route is plain pass-through, no request is ever guarded.
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Name used in metrics, logs, the storage key and the admin `?route=`; defaults to the prefix.
    pub name: Option<String>,
    /// Path prefix; the longest matching prefix wins.
    pub prefix: String,
    /// Upstream of this route; defaults to `upstream.url`.
    pub upstream: Option<String>,
    pub preserve_host: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub idempotency: PolicySection,
}

/// Command line. Every flag can also be set as `IDEMPROXY_<FLAG>` (e.g. `IDEMPROXY_UPSTREAM`).
#[derive(Debug, Default, Clone, Parser)]
#[command(
    name = "idemproxy",
    version,
    about = "A reverse proxy that makes keyed POSTs run at most once (Idempotency-Key)."
)]
pub struct Cli {
    /// TOML config file (see config/idemproxy.toml).
    #[arg(long, env = "IDEMPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate this config file (with env and flags applied) and exit.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// Proxy listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "IDEMPROXY_LISTEN")]
    pub listen: Option<String>,
    /// Upstream URL of the catch-all route, e.g. http://127.0.0.1:3000.
    #[arg(long, env = "IDEMPROXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// Admin listen address (metrics, health, key admin) [default: off].
    #[arg(long, env = "IDEMPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Bearer token for the admin key endpoints.
    #[arg(long, env = "IDEMPROXY_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Log format: json or pretty [default: json].
    #[arg(long, env = "IDEMPROXY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, RUST_LOG syntax [default: info].
    #[arg(long, env = "IDEMPROXY_LOG")]
    pub log_filter: Option<String>,
    /// Redis URL (redis://, rediss://, redis+cluster://h1:p1,h2:p2) [default: embedded memory store].
    #[arg(long, env = "IDEMPROXY_REDIS")]
    pub redis: Option<String>,
    /// CA certificates (PEM) trusted for rediss:// instead of the bundled roots.
    #[arg(long, env = "IDEMPROXY_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
    /// Methods guarded when they carry a key [default: POST].
    #[arg(long, env = "IDEMPROXY_METHODS", value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Reject guarded-method requests that carry no Idempotency-Key (400).
    #[arg(long, env = "IDEMPROXY_REQUIRE_KEY", num_args = 0..=1, default_missing_value = "true")]
    pub require_key: Option<bool>,
    /// Header whose value scopes keys to a client [default: authorization].
    #[arg(long, env = "IDEMPROXY_SCOPE_HEADER")]
    pub scope_header: Option<String>,
    /// How long a key's record is kept [default: 24h].
    #[arg(long, env = "IDEMPROXY_KEY_TTL", value_parser = humantime::parse_duration)]
    pub key_ttl: Option<Duration>,
    /// Lease of an executing request, renewed while it runs [default: 30s].
    #[arg(long, env = "IDEMPROXY_LOCK_TTL", value_parser = humantime::parse_duration)]
    pub lock_ttl: Option<Duration>,
    /// A retry while the first runs: reject (409) or wait for its result [default: reject].
    #[arg(long, env = "IDEMPROXY_ON_CONFLICT")]
    pub on_conflict: Option<String>,
    /// With --on-conflict wait: longest wait before answering 409 [default: 10s].
    #[arg(long, env = "IDEMPROXY_WAIT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub wait_timeout: Option<Duration>,
    /// Store down or full: closed (503) or open (forward unprotected) [default: closed].
    #[arg(long, env = "IDEMPROXY_STORE_FAILURE")]
    pub store_failure: Option<String>,
    /// Largest guarded request body, bytes [default: 8388608].
    #[arg(long, env = "IDEMPROXY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Largest response body stored for replay, bytes [default: 8388608].
    #[arg(long, env = "IDEMPROXY_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: Option<u64>,
    /// Record 5xx answers (true) or release the key on them (false) [default: true].
    #[arg(long, env = "IDEMPROXY_RECORD_SERVER_ERRORS")]
    pub record_server_errors: Option<bool>,
    /// When the upstream may or may not have acted: reject (mark Unknown) or retry [default: reject].
    #[arg(long, env = "IDEMPROXY_UNKNOWN_OUTCOME")]
    pub unknown_outcome: Option<String>,
    /// Upstream timeout: the whole exchange for guarded requests, the response head otherwise [default: 30s].
    #[arg(long, env = "IDEMPROXY_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// Upstream connect timeout [default: 5s].
    #[arg(long, env = "IDEMPROXY_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Forward the client's Host header instead of the upstream's.
    #[arg(long, env = "IDEMPROXY_PRESERVE_HOST", num_args = 0..=1, default_missing_value = "true")]
    pub preserve_host: Option<bool>,
    /// Extra CA bundle (PEM) for https upstreams.
    #[arg(long, env = "IDEMPROXY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the listener.
    #[arg(long, env = "IDEMPROXY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the listener.
    #[arg(long, env = "IDEMPROXY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Most client connections served at once [default: 10000].
    #[arg(long, env = "IDEMPROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Runtime worker threads; 1 = a single-threaded runtime [default: one per available core].
    #[arg(long, env = "IDEMPROXY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Largest request header block, bytes [default: 65536].
    #[arg(long, env = "IDEMPROXY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time a client has to send a request's headers (also bounds idle HTTP/1 keep-alive) [default: 10s].
    #[arg(long, env = "IDEMPROXY_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// Grace period for in-flight requests on SIGTERM/SIGINT [default: 30s].
    #[arg(long, env = "IDEMPROXY_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Memory store: most records kept at once [default: 1000000].
    #[arg(long, env = "IDEMPROXY_MEMORY_MAX_ENTRIES")]
    pub memory_max_entries: Option<usize>,
}

impl FileConfig {
    /// Parses a config file's text. The error names the offending key and line.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Lays the command line (flags and `IDEMPROXY_*` env, already merged by clap) over the file.
    pub fn apply_cli(&mut self, cli: &Cli) {
        fn set<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                slot.clone_from(value);
            }
        }
        set(&mut self.listen, &cli.listen);
        set(&mut self.admin_listen, &cli.admin_listen);
        set(&mut self.admin_token, &cli.admin_token);
        set(&mut self.log.format, &cli.log_format);
        set(&mut self.log.filter, &cli.log_filter);
        set(&mut self.store.redis, &cli.redis);
        set(&mut self.store.ca_file, &cli.redis_ca);
        set(&mut self.store.memory_max_entries, &cli.memory_max_entries);
        set(&mut self.upstream.url, &cli.upstream);
        set(&mut self.upstream.timeout, &cli.upstream_timeout);
        set(&mut self.upstream.connect_timeout, &cli.connect_timeout);
        set(&mut self.upstream.preserve_host, &cli.preserve_host);
        set(&mut self.upstream.ca_file, &cli.upstream_ca);
        set(&mut self.tls.cert, &cli.tls_cert);
        set(&mut self.tls.key, &cli.tls_key);
        set(&mut self.server.max_connections, &cli.max_connections);
        set(&mut self.server.worker_threads, &cli.worker_threads);
        set(&mut self.server.max_header_bytes, &cli.max_header_bytes);
        set(&mut self.server.header_read_timeout, &cli.header_read_timeout);
        set(&mut self.server.shutdown_grace, &cli.shutdown_grace);
        let policy = &mut self.idempotency;
        set(&mut policy.methods, &cli.methods);
        set(&mut policy.require_key, &cli.require_key);
        set(&mut policy.scope_header, &cli.scope_header);
        set(&mut policy.key_ttl, &cli.key_ttl);
        set(&mut policy.lock_ttl, &cli.lock_ttl);
        set(&mut policy.on_conflict, &cli.on_conflict);
        set(&mut policy.wait_timeout, &cli.wait_timeout);
        set(&mut policy.store_failure, &cli.store_failure);
        set(&mut policy.max_body_bytes, &cli.max_body_bytes);
        set(&mut policy.max_response_bytes, &cli.max_response_bytes);
        set(&mut policy.record_server_errors, &cli.record_server_errors);
        set(&mut policy.unknown_outcome, &cli.unknown_outcome);
    }
}

impl PolicySection {
    /// `self` with every field `over` sets replaced by `over`'s value.
    pub fn overlaid_with(&self, over: &PolicySection) -> PolicySection {
        PolicySection {
            methods: over.methods.clone().or_else(|| self.methods.clone()),
            require_key: over.require_key.or(self.require_key),
            scope_header: over.scope_header.clone().or_else(|| self.scope_header.clone()),
            key_ttl: over.key_ttl.or(self.key_ttl),
            lock_ttl: over.lock_ttl.or(self.lock_ttl),
            on_conflict: over.on_conflict.clone().or_else(|| self.on_conflict.clone()),
            wait_timeout: over.wait_timeout.or(self.wait_timeout),
            store_failure: over.store_failure.clone().or_else(|| self.store_failure.clone()),
            max_body_bytes: over.max_body_bytes.or(self.max_body_bytes),
            max_response_bytes: over.max_response_bytes.or(self.max_response_bytes),
            record_server_errors: over.record_server_errors.or(self.record_server_errors),
            unknown_outcome: over.unknown_outcome.clone().or_else(|| self.unknown_outcome.clone()),
            enabled: over.enabled.or(self.enabled),
        }
    }
}
