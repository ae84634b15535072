//! The layered form of the configuration: the TOML file, the `IDEMPROXY_*` environment and the
//! command line, all three described by the same section structs.
//!
//! A section (`[log]`, `[server]`, …) is one struct of `Option` fields that is at once the file
//! form (serde; the field name is the TOML key) and the flag form (clap; `#[arg(long, env =
//! "IDEMPROXY_…")]`, or `#[arg(skip)]` for a key the command line does not set). The field's doc
//! comment is its `--help` text. A value left out falls back to the next layer down. Precedence,
//! lowest first: built-in defaults < config file < `IDEMPROXY_*` env < flags (clap merges the
//! last two into [`Cli::settings`]). Route-level `[route.idempotency]` settings are the most
//! specific and win over all of them.
//!
//! Layering is generic: the `section!` macro gives every section a `Layer::overlay` in which each
//! field the upper layer sets wins, so neither the flags' overlay ([`FileConfig::apply_cli`]) nor
//! the route's ([`PolicySection::overlaid_with`]) names a field.

use std::ffi::OsStr;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::{ContextKind, ContextValue};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use super::{
    ConfigError, EmbeddedStore, ErrorFormat, FingerprintBody, LogFormat, OnConflict, Secret, StoreFailure,
    UnknownOutcome,
};

/// How one layer of settings lies over the layer below it.
pub(crate) trait Layer {
    /// Lays `over` on `self`: whatever `over` sets wins, the rest of `self` stays.
    fn overlay(&mut self, over: Self);
    /// Appends the dotted TOML keys of this layer under `prefix` (`""` at the top) to `out`.
    fn keys(prefix: &str, out: &mut Vec<String>);
}

/// A single setting: set in the upper layer, it replaces the lower layer's value.
impl<T> Layer for Option<T> {
    fn overlay(&mut self, over: Self) {
        if over.is_some() {
            *self = over;
        }
    }

    fn keys(prefix: &str, out: &mut Vec<String>) {
        out.push(prefix.to_owned());
    }
}

/// The `[[route]]` tables come from the file alone: a non-empty upper list replaces the lower one
/// whole. Their keys are not settings of a layer, so none are listed.
impl Layer for Vec<RouteSection> {
    fn overlay(&mut self, over: Self) {
        if !over.is_empty() {
            *self = over;
        }
    }

    fn keys(_prefix: &str, _out: &mut Vec<String>) {}
}

fn dotted(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Declares a section struct (attributes and fields as written) and its [`Layer`] impl, which
/// overlays and lists its fields one by one: each is a setting (`Option<T>`) or a nested section.
/// The TOML key is the field name, so section fields take no `#[serde(rename)]`.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl Layer for $name {
            fn overlay(&mut self, over: Self) {
                $( Layer::overlay(&mut self.$field, over.$field); )*
            }

            fn keys(prefix: &str, out: &mut Vec<String>) {
                $( <$ty as Layer>::keys(&dotted(prefix, stringify!($field)), out); )*
            }
        }
    };
}

section! {
    /// The whole configuration as one layer: the config file's form (unknown keys are start-up
    /// errors) and, flattened into [`Cli`], the form of the flags and `IDEMPROXY_*` variables.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    pub struct FileConfig {
        /// Proxy listen address, ip:port or host:port (resolved at start-up) [default: 127.0.0.1:8080].
        #[arg(long, env = "IDEMPROXY_LISTEN")]
        pub listen: Option<String>,
        /// Admin listen address (metrics, health, key admin), ip:port or host:port [default: off].
        #[arg(long, env = "IDEMPROXY_ADMIN_LISTEN")]
        pub admin_listen: Option<String>,
        /// Bearer token for the admin key endpoints (and required by a non-loopback admin bind).
        #[arg(long, env = "IDEMPROXY_ADMIN_TOKEN")]
        pub admin_token: Option<String>,
        #[serde(default)]
        #[command(flatten)]
        pub log: LogSection,
        #[serde(default)]
        #[command(flatten)]
        pub server: ServerSection,
        #[serde(default)]
        #[command(flatten)]
        pub tls: TlsSection,
        #[serde(default)]
        #[command(flatten)]
        pub store: StoreSection,
        #[serde(default)]
        #[command(flatten)]
        pub upstream: UpstreamSection,
        #[serde(default)]
        #[command(flatten)]
        pub idempotency: PolicySection,
        /// Routes, longest prefix first after loading. Empty: one catch-all route to `upstream.url`.
        #[serde(default, rename = "route")]
        #[arg(skip)]
        pub routes: Vec<RouteSection>,
    }
}

section! {
    /// `[log]`: the logs on stderr.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    #[command(next_help_heading = "Logging")]
    pub struct LogSection {
        /// Log format [default: json].
        #[arg(
            id = "log_format",
            long = "log-format",
            value_name = "LOG_FORMAT",
            env = "IDEMPROXY_LOG_FORMAT",
            value_parser = keyed::<LogFormat>("log.format"),
        )]
        pub format: Option<LogFormat>,
        /// Log filter, RUST_LOG syntax, e.g. info,idemproxy=debug [default: info].
        #[arg(id = "log_filter", long = "log-filter", value_name = "LOG_FILTER", env = "IDEMPROXY_LOG")]
        pub filter: Option<String>,
    }
}

section! {
    /// `[server]`: limits and timeouts of the client-facing listener.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    #[command(next_help_heading = "Listener")]
    pub struct ServerSection {
        /// Time a client has to send a request's headers (also bounds idle HTTP/1 keep-alive) [default: 10s].
        #[serde(default, with = "humantime_serde")]
        #[arg(long, env = "IDEMPROXY_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
        pub header_read_timeout: Option<Duration>,
        /// Interval of HTTP/2 keep-alive pings to clients.
        #[serde(default, with = "humantime_serde")]
        #[arg(skip)]
        pub http2_keepalive_interval: Option<Duration>,
        /// An HTTP/2 connection with no stream open for this long is closed gracefully (GOAWAY).
        #[serde(default, with = "humantime_serde")]
        #[arg(skip)]
        pub http2_idle_timeout: Option<Duration>,
        /// Grace period for in-flight requests on SIGTERM/SIGINT [default: 30s].
        #[serde(default, with = "humantime_serde")]
        #[arg(long, env = "IDEMPROXY_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
        pub shutdown_grace: Option<Duration>,
        /// Time a client has to send a guarded request's whole body.
        #[serde(default, with = "humantime_serde")]
        #[arg(skip)]
        pub body_read_timeout: Option<Duration>,
        /// Most client connections served at once [default: 10000].
        #[arg(long, env = "IDEMPROXY_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,
        /// Runtime worker threads; 1 = a single-threaded runtime [default: one per available core].
        #[arg(long, env = "IDEMPROXY_WORKER_THREADS")]
        pub worker_threads: Option<usize>,
        /// Largest request header block, bytes [default: 65536].
        #[arg(long, env = "IDEMPROXY_MAX_HEADER_BYTES")]
        pub max_header_bytes: Option<usize>,
        /// Most header fields in one HTTP/1 request.
        #[arg(skip)]
        pub max_headers: Option<usize>,
        /// Most concurrent streams on one HTTP/2 connection.
        #[arg(skip)]
        pub http2_max_concurrent_streams: Option<u32>,
    }
}

section! {
    /// `[tls]`: TLS termination on the listener. With `cert` and `key` the listener speaks TLS
    /// only (ALPN `h2` and `http/1.1`), and `X-Forwarded-Proto` is `https`.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    #[command(next_help_heading = "TLS")]
    pub struct TlsSection {
        /// TLS certificate chain (PEM, leaf first) for the listener.
        #[arg(id = "tls_cert", long = "tls-cert", value_name = "TLS_CERT", env = "IDEMPROXY_TLS_CERT")]
        pub cert: Option<PathBuf>,
        /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) for the listener.
        #[arg(id = "tls_key", long = "tls-key", value_name = "TLS_KEY", env = "IDEMPROXY_TLS_KEY")]
        pub key: Option<PathBuf>,
        /// How often `cert` and `key` are checked for changes (re-read when they change).
        #[serde(default, with = "humantime_serde")]
        #[arg(skip)]
        pub reload_interval: Option<Duration>,
    }
}

section! {
    /// `[store]`: where the records are kept.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    #[command(next_help_heading = "Store")]
    pub struct StoreSection {
        /// Redis URL (redis://, rediss://, redis+cluster://h1:p1,h2:p2, redis+sentinel://s1:p1,s2:p2/master) [default: the embedded store].
        #[arg(long, env = "IDEMPROXY_REDIS")]
        pub redis: Option<String>,
        /// Embedded store without Redis: disk (durable) or memory (lost on restart) [default: disk].
        #[arg(
            id = "embedded",
            long = "embedded-store",
            value_name = "EMBEDDED_STORE",
            env = "IDEMPROXY_EMBEDDED_STORE",
            value_parser = keyed::<EmbeddedStore>("store.embedded"),
        )]
        pub embedded: Option<EmbeddedStore>,
        /// Disk store: its directory, created if missing; one process per directory [default: idemproxy-data].
        #[arg(long, env = "IDEMPROXY_DATA_DIR")]
        pub data_dir: Option<PathBuf>,
        /// Disk store: new keys are refused once its records would take more, bytes [default: 1073741824].
        #[arg(long, env = "IDEMPROXY_MAX_DISK_BYTES")]
        pub max_disk_bytes: Option<u64>,
        /// Redis Sentinel: password of the sentinels (the Redis nodes' is in the URL).
        #[arg(long, env = "IDEMPROXY_SENTINEL_PASSWORD", hide_env_values = true)]
        pub sentinel_password: Option<Secret>,
        /// Redis: replicas that must acknowledge a key's record (WAIT) before it is forwarded [default: 0].
        #[arg(
            id = "redis_min_replicas",
            long = "redis-min-replicas",
            value_name = "N",
            env = "IDEMPROXY_REDIS_MIN_REPLICAS"
        )]
        pub min_replicas: Option<u32>,
        /// Redis: longest wait for those acknowledgements, at most command_timeout [default: 1s].
        #[serde(default, with = "humantime_serde")]
        #[arg(
            id = "redis_replica_timeout",
            long = "redis-replica-timeout",
            value_name = "DURATION",
            env = "IDEMPROXY_REDIS_REPLICA_TIMEOUT",
            value_parser = humantime::parse_duration,
        )]
        pub replica_timeout: Option<Duration>,
        /// CA certificates (PEM) trusted for rediss:// instead of the bundled roots.
        #[arg(id = "redis_ca", long = "redis-ca", value_name = "REDIS_CA", env = "IDEMPROXY_REDIS_CA")]
        pub ca_file: Option<PathBuf>,
        /// Prefix of every storage key.
        #[arg(skip)]
        pub key_prefix: Option<String>,
        /// Memory store: most records kept at once [default: 1000000].
        #[arg(long, env = "IDEMPROXY_MEMORY_MAX_ENTRIES")]
        pub memory_max_entries: Option<usize>,
        /// Redis: how long one command may take before the store counts as unavailable.
        #[serde(default, with = "humantime_serde")]
        #[arg(skip)]
        pub command_timeout: Option<Duration>,
    }
}

section! {
    /// `[upstream]`: the catch-all upstream, and the connection pool every route shares.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    #[command(next_help_heading = "Upstream")]
    pub struct UpstreamSection {
        /// Upstream URL of the catch-all route, e.g. http://127.0.0.1:3000.
        #[arg(id = "upstream", long = "upstream", value_name = "UPSTREAM", env = "IDEMPROXY_UPSTREAM")]
        pub url: Option<String>,
        /// Upstream connect timeout [default: 5s].
        #[serde(default, with = "humantime_serde")]
        #[arg(long, env = "IDEMPROXY_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
        pub connect_timeout: Option<Duration>,
        /// Upstream timeout: the whole exchange for guarded requests, the response head otherwise [default: 30s].
        #[serde(default, with = "humantime_serde")]
        #[arg(
            id = "upstream_timeout",
            long = "upstream-timeout",
            value_name = "UPSTREAM_TIMEOUT",
            env = "IDEMPROXY_UPSTREAM_TIMEOUT",
            value_parser = humantime::parse_duration,
        )]
        pub timeout: Option<Duration>,
        /// How long an idle pooled upstream connection is kept.
        #[serde(default, with = "humantime_serde")]
        #[arg(skip)]
        pub pool_idle_timeout: Option<Duration>,
        /// Most idle pooled connections kept per upstream host.
        #[arg(skip)]
        pub pool_max_idle_per_host: Option<usize>,
        /// Forward the client's Host header instead of the upstream's.
        #[arg(long, env = "IDEMPROXY_PRESERVE_HOST", num_args = 0..=1, default_missing_value = "true")]
        pub preserve_host: Option<bool>,
        /// Extra CA bundle (PEM) for https upstreams, on top of the system's.
        #[arg(id = "upstream_ca", long = "upstream-ca", value_name = "UPSTREAM_CA", env = "IDEMPROXY_UPSTREAM_CA")]
        pub ca_file: Option<PathBuf>,
    }
}

section! {
    /// Idempotency policy. In `[idempotency]` (and on the command line) it is the default of every
    /// route; in `[route.idempotency]` it overrides that default for one route.
    #[derive(Debug, Default, Clone, Deserialize, Args)]
    #[serde(deny_unknown_fields)]
    #[command(next_help_heading = "Idempotency policy (every route; a route's own settings win)")]
    pub struct PolicySection {
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
        #[serde(default, with = "humantime_serde")]
        #[arg(long, env = "IDEMPROXY_KEY_TTL", value_parser = humantime::parse_duration)]
        pub key_ttl: Option<Duration>,
        /// Lease of an executing request, renewed while it runs [default: 30s, or key_ttl if shorter].
        #[serde(default, with = "humantime_serde")]
        #[arg(long, env = "IDEMPROXY_LOCK_TTL", value_parser = humantime::parse_duration)]
        pub lock_ttl: Option<Duration>,
        /// A retry while the first runs: reject (409) or wait for its result [default: reject].
        #[arg(long, env = "IDEMPROXY_ON_CONFLICT", value_parser = keyed::<OnConflict>("idempotency.on_conflict"))]
        pub on_conflict: Option<OnConflict>,
        /// With --on-conflict wait: longest wait before answering 409 [default: 10s].
        #[serde(default, with = "humantime_serde")]
        #[arg(long, env = "IDEMPROXY_WAIT_TIMEOUT", value_parser = humantime::parse_duration)]
        pub wait_timeout: Option<Duration>,
        /// Store down or full: closed (503) or open (forward unprotected) [default: closed].
        #[arg(long, env = "IDEMPROXY_STORE_FAILURE", value_parser = keyed::<StoreFailure>("idempotency.store_failure"))]
        pub store_failure: Option<StoreFailure>,
        /// Largest guarded request body, bytes (bodies over buffer_bytes stream, so it does not bound memory) [default: 8388608].
        #[arg(long, env = "IDEMPROXY_MAX_BODY_BYTES")]
        pub max_body_bytes: Option<u64>,
        /// Largest response body stored for replay, bytes [default: 8388608].
        #[arg(long, env = "IDEMPROXY_MAX_RESPONSE_BYTES")]
        pub max_response_bytes: Option<u64>,
        /// Record 5xx answers (true) or release the key on every 5xx not in --unknown-statuses (false) [default: true].
        #[arg(long, env = "IDEMPROXY_RECORD_SERVER_ERRORS")]
        pub record_server_errors: Option<bool>,
        /// When the upstream may or may not have acted: reject (mark Unknown) or retry [default: reject].
        #[arg(
            long,
            env = "IDEMPROXY_UNKNOWN_OUTCOME",
            value_parser = keyed::<UnknownOutcome>("idempotency.unknown_outcome"),
        )]
        pub unknown_outcome: Option<UnknownOutcome>,
        /// Where a key is taken from, first match wins: header:NAME, json:/pointer, query:NAME; repeatable [default: header:Idempotency-Key].
        #[arg(long = "key-source", env = "IDEMPROXY_KEY_SOURCES", value_name = "SOURCE", value_delimiter = ',')]
        pub key_sources: Option<Vec<String>>,
        /// Guarded bodies up to this many bytes are read whole; larger ones stream upstream while hashed (and have no json: key) [default: 1048576].
        #[arg(long, env = "IDEMPROXY_BUFFER_BYTES")]
        pub buffer_bytes: Option<u64>,
        /// Fingerprint the body as bytes, or as canonical JSON (RFC 8785, numbers as written) [default: bytes].
        #[arg(
            long,
            env = "IDEMPROXY_FINGERPRINT_BODY",
            value_parser = keyed::<FingerprintBody>("idempotency.fingerprint_body"),
        )]
        pub fingerprint_body: Option<FingerprintBody>,
        /// JSON pointer left out of a json fingerprint, e.g. /sent_at; repeatable [default: none].
        #[arg(long = "fingerprint-ignore", env = "IDEMPROXY_FINGERPRINT_IGNORE", value_name = "POINTER", value_delimiter = ',')]
        pub fingerprint_ignore: Option<Vec<String>>,
        /// Header that marks a replayed response [default: Idempotent-Replayed].
        #[arg(long, env = "IDEMPROXY_REPLAY_HEADER")]
        pub replay_header: Option<String>,
        /// Upstream statuses that mean "not processed": relayed and the key released; "none" for none [default: 429,503].
        #[arg(long, env = "IDEMPROXY_RELEASE_STATUSES", value_parser = status_list)]
        pub release_statuses: Option<StatusList>,
        /// Upstream statuses that leave the outcome unknown: the key is marked Unknown [default: none].
        #[arg(long, env = "IDEMPROXY_UNKNOWN_STATUSES", value_parser = status_list)]
        pub unknown_statuses: Option<StatusList>,
        /// Body of the errors the proxy makes: problem (RFC 9457) or stripe ({"error": {...}}) [default: problem].
        #[arg(
            long,
            env = "IDEMPROXY_ERROR_FORMAT",
            value_parser = keyed::<ErrorFormat>("idempotency.error_format"),
        )]
        pub error_format: Option<ErrorFormat>,
        /// Header telling clients whether a retry can help (true/false), e.g. Stripe-Should-Retry [default: none].
        #[arg(long, env = "IDEMPROXY_RETRY_HINT_HEADER")]
        pub retry_hint_header: Option<String>,
        /// `false`: the route is plain pass-through, no request is ever guarded.
        #[arg(skip)]
        pub enabled: Option<bool>,
    }
}

/// A list of HTTP status codes: a TOML array of integers, or on the command line and in the
/// environment a comma-separated list (`429,503`), where `none` or an empty value is the empty
/// list. Their range is checked where the policy is resolved, naming the key.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct StatusList(pub Vec<u16>);

/// Parses a [`StatusList`] flag or variable.
fn status_list(text: &str) -> Result<StatusList, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("none") {
        return Ok(StatusList::default());
    }
    text.split(',')
        .map(|code| {
            code.trim()
                .parse()
                .map_err(|_| format!("`{}` is not a status code (a list like 429,503, or none)", code.trim()))
        })
        .collect::<Result<_, _>>()
        .map(StatusList)
}

/// One `[[route]]` table (file only).
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

/// Command line. Every setting flag can also be set as `IDEMPROXY_<NAME>` (e.g. `IDEMPROXY_UPSTREAM`).
/// Without a subcommand the proxy runs.
#[derive(Debug, Default, Clone, Parser)]
#[command(
    name = "idemproxy",
    version,
    about = "A reverse proxy that makes keyed POSTs run at most once (Idempotency-Key).",
    next_line_help = true
)]
pub struct Cli {
    /// TOML config file (see config/idemproxy.toml).
    #[arg(long, env = "IDEMPROXY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Validate this config file (with env and flags applied) and exit.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// The settings the flags and `IDEMPROXY_*` variables give (clap lets a flag win over its
    /// variable); they lie over the config file's.
    #[command(flatten)]
    pub settings: FileConfig,
    /// A tool to run instead of the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands: operators' tools that talk to a running proxy.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Look a key up on a running proxy's admin listener, or clear it.
    #[command(subcommand)]
    Key(KeyCommand),
}

/// `idemproxy key …`.
#[derive(Debug, Clone, Subcommand)]
pub enum KeyCommand {
    /// Show a key's record: its state, age, lease, expiry, and its hash as the logs show it.
    Show {
        #[command(flatten)]
        target: KeyTarget,
        /// Also print the stored response body of a completed key.
        #[arg(long)]
        body: bool,
    },
    /// Clear a key's record, whatever its state (after reconciling an outcome-unknown with the
    /// upstream): the next request with the key executes upstream.
    Clear {
        #[command(flatten)]
        target: KeyTarget,
    },
}

/// Which key, on which proxy: the values the client sent, and how to reach the admin listener.
#[derive(Debug, Clone, Args)]
pub struct KeyTarget {
    /// The Idempotency-Key value exactly as the client sent it (with its quotes, if it sent any).
    pub key: String,
    /// The route's scope header value as the client sent it (e.g. its whole Authorization value);
    /// leave it out if the client sent none.
    #[arg(long, env = "IDEMPROXY_KEY_SCOPE", hide_env_values = true)]
    pub scope: Option<String>,
    /// The route's name; needed when several routes are configured.
    #[arg(long)]
    pub route: Option<String>,
    /// The route's key source the key came from: header:NAME, json:/pointer or query:NAME, as
    /// the route's `key_sources` list it [default: the route's first source]. KEY is then the
    /// header value as sent, or the body field's or query parameter's value.
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<String>,
    /// The admin listener, e.g. http://127.0.0.1:9090 [default: `admin_listen` of --config or
    /// IDEMPROXY_ADMIN_LISTEN].
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// The admin bearer token [default: `admin_token` of --config].
    #[arg(long, env = "IDEMPROXY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the admin listener's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
}

impl FileConfig {
    /// Parses a config file's text. The error names the offending key and line.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Lays the command line (flags and `IDEMPROXY_*` env, already merged by clap) over the file.
    pub fn apply_cli(&mut self, cli: &Cli) {
        self.overlay(cli.settings.clone());
    }

    /// Every dotted key of the file form outside `[[route]]`, e.g. `idempotency.on_conflict`.
    pub fn keys() -> Vec<String> {
        let mut keys = Vec::new();
        <Self as Layer>::keys("", &mut keys);
        keys
    }
}

impl PolicySection {
    /// `self` with every field `over` sets replaced by `over`'s value.
    pub fn overlaid_with(&self, over: &PolicySection) -> PolicySection {
        let mut policy = self.clone();
        policy.overlay(over.clone());
        policy
    }
}

/// The value parser of an enumerated flag: clap's own (possible values, suggestions), with a tip
/// naming the config key the flag and its variable set, so that a bad `IDEMPROXY_ON_CONFLICT`
/// reads as a bad `idempotency.on_conflict`.
#[derive(Debug)]
pub(crate) struct KeyedEnum<T> {
    key: &'static str,
    values: PhantomData<fn() -> T>,
}

impl<T> Clone for KeyedEnum<T> {
    fn clone(&self) -> Self {
        keyed(self.key)
    }
}

/// [`KeyedEnum`] for the config key `key`.
pub(crate) fn keyed<T>(key: &'static str) -> KeyedEnum<T> {
    KeyedEnum {
        key,
        values: PhantomData,
    }
}

impl<T: ValueEnum + Clone + Send + Sync + 'static> TypedValueParser for KeyedEnum<T> {
    type Value = T;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &OsStr) -> Result<T, clap::Error> {
        clap::builder::EnumValueParser::<T>::new()
            .parse_ref(cmd, arg, value)
            .map_err(|mut err| {
                let long = arg.and_then(clap::Arg::get_long).map(|l| format!("--{l}"));
                let env = arg
                    .and_then(clap::Arg::get_env)
                    .map(|e| e.to_string_lossy().into_owned());
                let setters = [long, env].into_iter().flatten().collect::<Vec<_>>().join(" and ");
                let tip = format!("{setters} set `{}` of the config file", self.key);
                err.insert(ContextKind::Suggested, ContextValue::StyledStrs(vec![tip.into()]));
                err
            })
    }

    /// The values, without their descriptions: the flag's own help says what they do, and
    /// `--help` stays one compact entry per flag.
    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            T::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value)
                .map(|value| value.help(None::<&'static str>)),
        ))
    }
}

/// A file that does not deserialize, as a [`ConfigError`]. A value of the wrong type or outside
/// its set (`on_conflict = "maybe"`) is reported under its dotted key, like the resolver's
/// errors; anything else (syntax, unknown key) as TOML reports it.
pub(crate) fn parse_error(path: &Path, text: &str, err: toml::de::Error) -> ConfigError {
    let at_fault = err
        .span()
        .and_then(|span| Some((key_of_value_at(text, span.clone())?, span.start)));
    match at_fault {
        Some((key, start)) => {
            let line = text.get(..start).map_or(0, |before| before.matches('\n').count()) + 1;
            ConfigError::Invalid {
                key,
                message: format!("{} ({}, line {line})", err.message().trim_end(), path.display()),
            }
        }
        None => ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(err),
        },
    }
}

/// The dotted key (`route[0].idempotency.on_conflict`) of the value at `span` of `text`, found by
/// writing a marker string in place of that value and looking the marker up in the parsed
/// document. `None` when `text` is not TOML or `span` does not cover exactly one value.
fn key_of_value_at(text: &str, span: Range<usize>) -> Option<String> {
    const MARKER: &str = "idemproxy: the value at fault";
    toml::from_str::<toml::Table>(text).ok()?;
    let marked = format!("{}\"{MARKER}\"{}", text.get(..span.start)?, text.get(span.end..)?);
    let document = toml::from_str::<toml::Table>(&marked).ok()?;
    let mut found = Vec::new();
    find_string(&toml::Value::Table(document), MARKER, String::new(), &mut found);
    match <[String; 1]>::try_from(found) {
        Ok([key]) => Some(key),
        Err(_) => None,
    }
}

/// Appends to `found` the path (from `path`) of every string equal to `needle` within `value`.
fn find_string(value: &toml::Value, needle: &str, path: String, found: &mut Vec<String>) {
    match value {
        toml::Value::String(s) if s == needle => found.push(path),
        toml::Value::Table(table) => {
            for (key, value) in table {
                find_string(value, needle, dotted(&path, key), found);
            }
        }
        toml::Value::Array(items) => {
            for (i, value) in items.iter().enumerate() {
                find_string(value, needle, format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_land_in_their_sections() {
        let cli = Cli::try_parse_from([
            "idemproxy",
            "--upstream",
            "http://127.0.0.1:3000",
            "--upstream-timeout",
            "5s",
            "--upstream-ca",
            "/u.pem",
            "--redis-ca",
            "/r.pem",
            "--log-format",
            "pretty",
            "--log-filter",
            "debug",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--on-conflict",
            "wait",
            "--store-failure",
            "open",
            "--unknown-outcome",
            "retry",
            "--require-key",
            "--methods",
            "POST,PATCH",
            "--embedded-store",
            "memory",
            "--data-dir",
            "/var/lib/idemproxy",
            "--max-disk-bytes",
            "1048576",
            "--redis-min-replicas",
            "1",
            "--redis-replica-timeout",
            "250ms",
            "--sentinel-password",
            "s3cret",
        ])
        .expect("valid flags");
        let s = &cli.settings;
        assert_eq!(s.upstream.url.as_deref(), Some("http://127.0.0.1:3000"));
        assert_eq!(s.upstream.timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.upstream.ca_file.as_deref(), Some(Path::new("/u.pem")));
        assert_eq!(s.store.ca_file.as_deref(), Some(Path::new("/r.pem")));
        assert_eq!(s.store.min_replicas, Some(1));
        assert_eq!(s.store.replica_timeout, Some(Duration::from_millis(250)));
        assert_eq!(s.store.sentinel_password, Some(Secret::new("s3cret")));
        assert_eq!(s.log.format, Some(LogFormat::Pretty));
        assert_eq!(s.log.filter.as_deref(), Some("debug"));
        assert_eq!(s.tls.cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(s.tls.key.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!(s.idempotency.on_conflict, Some(OnConflict::Wait));
        assert_eq!(s.idempotency.store_failure, Some(StoreFailure::Open));
        assert_eq!(s.idempotency.unknown_outcome, Some(UnknownOutcome::Retry));
        assert_eq!(s.idempotency.require_key, Some(true));
        assert_eq!(
            s.idempotency.methods.as_deref(),
            Some(&["POST".to_owned(), "PATCH".to_owned()][..])
        );
        assert!(s.routes.is_empty());
        assert_eq!(s.store.embedded, Some(EmbeddedStore::Memory));
        assert_eq!(s.store.data_dir.as_deref(), Some(Path::new("/var/lib/idemproxy")));
        assert_eq!(s.store.max_disk_bytes, Some(1_048_576));
    }

    #[test]
    fn key_sources_and_status_lists_from_flags() {
        let cli = Cli::try_parse_from([
            "idemproxy",
            "--key-source",
            "header:X-Request-Id",
            "--key-source",
            "json:/a,query:b",
            "--release-statuses",
            "429, 503",
            "--unknown-statuses",
            "none",
            "--fingerprint-ignore",
            "/sent_at",
        ])
        .expect("valid flags");
        let s = &cli.settings.idempotency;
        assert_eq!(
            s.key_sources.as_deref(),
            Some(
                &[
                    "header:X-Request-Id".to_owned(),
                    "json:/a".to_owned(),
                    "query:b".to_owned()
                ][..]
            )
        );
        assert_eq!(s.release_statuses, Some(StatusList(vec![429, 503])));
        assert_eq!(s.unknown_statuses, Some(StatusList(vec![])));
        assert_eq!(s.fingerprint_ignore.as_deref(), Some(&["/sent_at".to_owned()][..]));
        assert_eq!(status_list(""), Ok(StatusList(vec![])));
        assert!(status_list("429,x").is_err_and(|e| e.contains("`x`")));
    }

    #[test]
    fn error_format_and_retry_hint_flags() {
        let cli = Cli::try_parse_from([
            "idemproxy",
            "--error-format",
            "stripe",
            "--retry-hint-header",
            "Stripe-Should-Retry",
        ])
        .expect("valid flags");
        assert_eq!(cli.settings.idempotency.error_format, Some(ErrorFormat::Stripe));
        assert_eq!(
            cli.settings.idempotency.retry_hint_header.as_deref(),
            Some("Stripe-Should-Retry")
        );
        let err = Cli::try_parse_from(["idemproxy", "--error-format", "json"]).unwrap_err();
        assert!(err.render().to_string().contains("`idempotency.error_format`"), "{err}");
    }

    #[test]
    fn a_bad_enumerated_flag_is_a_clap_error_naming_the_key() {
        let err = Cli::try_parse_from(["idemproxy", "--on-conflict", "sometimes"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let text = err.render().to_string();
        assert!(text.contains("--on-conflict"), "{text}");
        assert!(text.contains("reject, wait"), "{text}");
        assert!(text.contains("IDEMPROXY_ON_CONFLICT"), "{text}");
        assert!(text.contains("`idempotency.on_conflict`"), "{text}");
    }

    #[test]
    fn overlay_takes_what_the_upper_layer_sets() {
        let lower = PolicySection {
            key_ttl: Some(Duration::from_secs(60)),
            on_conflict: Some(OnConflict::Wait),
            enabled: Some(true),
            ..PolicySection::default()
        };
        let upper = PolicySection {
            on_conflict: Some(OnConflict::Reject),
            enabled: Some(false),
            ..PolicySection::default()
        };
        let merged = lower.overlaid_with(&upper);
        assert_eq!(merged.key_ttl, Some(Duration::from_secs(60)));
        assert_eq!(merged.on_conflict, Some(OnConflict::Reject));
        assert_eq!(merged.enabled, Some(false));
        assert_eq!(merged.lock_ttl, None);
    }

    #[test]
    fn keys_are_the_dotted_toml_keys() {
        let keys = FileConfig::keys();
        for key in [
            "listen",
            "log.format",
            "server.http2_idle_timeout",
            "idempotency.enabled",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k.starts_with("route")), "{keys:?}");
    }

    #[test]
    fn a_bad_value_is_reported_under_its_dotted_key() {
        let text =
            "[[route]]\nprefix = \"/a\"\n[[route]]\nprefix = \"/b\"\nidempotency = { on_conflict = \"maybe\" }\n";
        let err = FileConfig::parse(text).unwrap_err();
        let err = parse_error(Path::new("x.toml"), text, err).to_string();
        assert!(err.contains("`route[1].idempotency.on_conflict`"), "{err}");
        assert!(err.contains("x.toml, line 5"), "{err}");

        let text = "[server]\nmax_connections = \"many\"\n";
        let err = parse_error(Path::new("x.toml"), text, FileConfig::parse(text).unwrap_err()).to_string();
        assert!(err.contains("`server.max_connections`"), "{err}");

        // Syntax errors and unknown keys keep TOML's own report, with the line shown.
        let text = "[server]\nmax_connections = \n";
        let err = parse_error(Path::new("x.toml"), text, FileConfig::parse(text).unwrap_err()).to_string();
        assert!(err.starts_with("config file x.toml: TOML parse error"), "{err}");
    }
}
