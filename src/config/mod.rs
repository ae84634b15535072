//! Configuration: the file/env/flag layers (`file`) resolved into one validated [`Config`]
//! (`resolve`).
//!
//! Resolution happens once at start-up; the request path only reads the resolved values
//! (parsed `Uri`s, `HeaderName`s, `Method`s, enums), never strings.
//!
//! # Adding a setting
//!
//! 1. A field on its section struct in `file.rs` (`ServerSection`, `PolicySection`, …): an
//!    `Option<T>` whose name is the TOML key, whose doc comment is the `--help` text, with
//!    `#[arg(long, env = "IDEMPROXY_…")]` for a flag (or `#[arg(skip)]` for a file-only key) and,
//!    for a duration, `#[serde(default, with = "humantime_serde")]` plus
//!    `value_parser = humantime::parse_duration`. An enumerated value is an enum deriving
//!    `Deserialize` (lowercase) and `ValueEnum`, parsed with `keyed::<T>("section.key")`.
//!    Nothing else in `file.rs`: the file < env < flags layering and the `[route.idempotency]`
//!    overlay are generic (the `section!` macro).
//! 2. Its field on the resolved type in this file (`ServerSettings`, `Policy`, …), and its default
//!    in [`defaults`] if it has one.
//! 3. Its line in the section's resolver in `resolve.rs`, which applies the default, validates
//!    the value and names the key in any error.
//!
//! Then document it in `config/idemproxy.toml` (a test insists every key of the file form is
//! there) and the README.

mod file;
pub mod redis_url;
mod resolve;
mod sources;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use http::{HeaderName, Method, Uri};
use serde::Deserialize;

pub use file::{
    Cli, Command, FileConfig, KeyCommand, KeyTarget, LogSection, PolicySection, RouteSection, ServerSection,
    StatusList, StoreSection, TlsSection, UpstreamSection,
};
pub use sources::{JsonPointer, KeySource, PointerToken, SourceKind, StatusSet, DEFAULT_KEY_HEADER};

/// A configuration problem found at start-up. The message names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Output format of the logs (`log.format`, `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Where the records live without Redis (`store.embedded`, docs/behaviour.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedStore {
    /// On local disk, in `store.data_dir`: survives restarts.
    Disk,
    /// In process memory: lost on every restart (tests, throwaway use).
    Memory,
}

/// What a retry gets while the first request with its key still runs (`on_conflict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// `409 Conflict` with `Retry-After`.
    Reject,
    /// Wait up to `wait_timeout` for the first request's result, then replay it.
    Wait,
}

/// What guarded requests get while the store is unreachable (docs/behaviour.md §7; `store_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreFailure {
    /// `503` + `Retry-After`; nothing is forwarded.
    Closed,
    /// Forward without protection (counted and logged).
    Open,
}

/// What happens to a key whose execution may or may not have reached the upstream (docs/behaviour.md §5;
/// `unknown_outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnknownOutcome {
    /// Mark the key `Unknown`: every retry gets the outcome-unknown problem (at most once).
    Reject,
    /// Release the key: a retry executes again (at least once).
    Retry,
}

/// What of a guarded request's body its fingerprint covers (docs/behaviour.md §13;
/// `fingerprint_body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FingerprintBody {
    /// The body byte for byte.
    Bytes,
    /// A JSON body's canonical form (RFC 8785, numbers as written); other bodies byte for byte.
    Json,
}

/// How the errors the proxy makes itself are written on a route (docs/behaviour.md §8, §16;
/// `error_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ErrorFormat {
    /// RFC 9457 problem details (`application/problem+json`).
    Problem,
    /// Stripe's error object, `{"error": {"type", "code", "message", "doc_url"}}`.
    Stripe,
}

/// Displays an enumerated setting the way the file and the flags spell it (`reject`, `json`).
macro_rules! display_as_spelled {
    ($($enum:ty),*) => {
        $(
            impl fmt::Display for $enum {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    match self.to_possible_value() {
                        Some(value) => f.write_str(value.get_name()),
                        None => Ok(()),
                    }
                }
            }
        )*
    };
}

display_as_spelled!(
    EmbeddedStore,
    LogFormat,
    OnConflict,
    StoreFailure,
    UnknownOutcome,
    FingerprintBody,
    ErrorFormat
);

/// The resolved idempotency policy of one route.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `false`: plain pass-through route.
    pub enabled: bool,
    pub methods: Vec<Method>,
    pub require_key: bool,
    pub scope_header: HeaderName,
    pub key_ttl: Duration,
    pub lock_ttl: Duration,
    pub on_conflict: OnConflict,
    pub wait_timeout: Duration,
    pub store_failure: StoreFailure,
    pub max_body_bytes: u64,
    pub max_response_bytes: u64,
    pub record_server_errors: bool,
    pub unknown_outcome: UnknownOutcome,
    /// Where keys come from, first match wins (docs/behaviour.md §13); never empty.
    pub key_sources: Vec<KeySource>,
    /// Bodies up to this size are looked into by `json:` key sources.
    pub buffer_bytes: u64,
    pub fingerprint_body: FingerprintBody,
    /// Left out of a `json` fingerprint.
    pub fingerprint_ignore: Vec<JsonPointer>,
    /// Marks a replayed response.
    pub replay_header: HeaderName,
    /// Upstream statuses that release the key (docs/behaviour.md §14).
    pub release_statuses: StatusSet,
    /// Upstream statuses that mark the key `Unknown` (docs/behaviour.md §14).
    pub unknown_statuses: StatusSet,
    pub error_format: ErrorFormat,
    /// Tells clients whether a retry can help (docs/behaviour.md §16); `None`: not sent.
    pub retry_hint_header: Option<HeaderName>,
}

impl Policy {
    /// Whether requests with this method are guarded when they carry a key.
    pub fn guards(&self, method: &Method) -> bool {
        self.enabled && self.methods.iter().any(|m| m == method)
    }
}

/// Where requests of one route go, and under which policy.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in [`Config::routes`] (metrics slots).
    pub index: usize,
    /// Stable name: metrics label, log field, part of the storage key.
    pub name: Arc<str>,
    pub prefix: String,
    pub upstream: UpstreamTarget,
    pub preserve_host: bool,
    pub timeout: Duration,
    pub policy: Policy,
}

/// A parsed upstream origin (`scheme://authority`, plus an optional base path).
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Path the upstream is mounted at, without trailing `/` (usually empty).
    pub base_path: String,
    /// `Host` value sent upstream unless the route preserves the client's.
    pub host_header: http::HeaderValue,
}

impl UpstreamTarget {
    pub fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        let uri: Uri = text
            .parse()
            .map_err(|e| invalid(key, format!("`{text}` is not a URL: {e}")))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| invalid(key, format!("`{text}` needs a scheme (http:// or https://)")))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(invalid(key, format!("scheme of `{text}` must be http or https")));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid(key, format!("`{text}` has no host")))?;
        if uri.query().is_some() {
            return Err(invalid(key, format!("`{text}` must not have a query")));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let host_header = http::HeaderValue::from_str(authority.as_str())
            .map_err(|e| invalid(key, format!("bad host in `{text}`: {e}")))?;
        Ok(Self {
            scheme,
            authority,
            base_path,
            host_header,
        })
    }
}

/// Server-side limits and timeouts of the client-facing listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    /// An HTTP/2 connection with no stream open for this long is closed gracefully (GOAWAY).
    pub http2_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// Runtime threads (the binary's; tests bring their own runtime).
    pub worker_threads: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub http2_max_concurrent_streams: u32,
}

/// Upstream connection pool settings (shared by all routes).
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub ca_file: Option<PathBuf>,
}

/// Which store keeps the records. Its `Debug` form shows a Redis URL without its password.
#[derive(Clone)]
pub enum StoreSettings {
    /// The durable embedded store (docs/behaviour.md §11), the default without Redis.
    Disk {
        data_dir: PathBuf,
        max_disk_bytes: u64,
    },
    Memory {
        max_entries: usize,
    },
    Redis {
        url: String,
        command_timeout: Duration,
        /// `rediss://`: CA certificates (PEM file) trusted instead of the bundled roots.
        ca_file: Option<PathBuf>,
        /// Embedded-store keys that were set and are ignored because Redis is configured (the
        /// start-up log names them).
        ignored: Vec<&'static str>,
        /// `redis+sentinel://`: the password of the sentinels themselves.
        sentinel_password: Option<Secret>,
        /// What a write must reach before it counts (docs/behaviour.md §4.4).
        replication: Replication,
    },
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disk {
                data_dir,
                max_disk_bytes,
            } => f
                .debug_struct("Disk")
                .field("data_dir", data_dir)
                .field("max_disk_bytes", max_disk_bytes)
                .finish(),
            Self::Memory { max_entries } => f.debug_struct("Memory").field("max_entries", max_entries).finish(),
            Self::Redis {
                url,
                command_timeout,
                ca_file,
                ignored,
                sentinel_password,
                replication,
            } => f
                .debug_struct("Redis")
                .field("url", &redis_url::redacted_url(url))
                .field("command_timeout", command_timeout)
                .field("ca_file", ca_file)
                .field("ignored", ignored)
                .field("sentinel_password", sentinel_password)
                .field("replication", replication)
                .finish(),
        }
    }
}

/// How many replicas acknowledge a key's writes (Redis `WAIT`) before they count, and how long
/// the proxy waits for them (`store.min_replicas`, `store.replica_timeout`; docs/behaviour.md §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// `0`: no acknowledgement is waited for.
    pub min_replicas: u32,
    /// At most `store.command_timeout`.
    pub replica_timeout: Duration,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            replica_timeout: defaults::REDIS_REPLICA_TIMEOUT,
        }
    }
}

/// A password from the configuration: shown as `***` by `Debug`, so that printing a
/// configuration never prints it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

/// TLS termination on the proxy listener.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked; new handshakes get the new certificate once they change.
    pub reload_interval: Duration,
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub server: ServerSettings,
    pub tls: Option<TlsSettings>,
    pub upstream: UpstreamSettings,
    pub store: StoreSettings,
    pub key_prefix: String,
    /// Routes, longest prefix first.
    pub routes: Arc<[Arc<Route>]>,
}

/// Where a configuration's admin listener is, and the token its key endpoints want.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAccess {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

/// Defaults, one place (docs/behaviour.md §4-§5 and README "Configuration").
pub mod defaults {
    use std::time::Duration;
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const KEY_TTL: Duration = Duration::from_secs(24 * 3600);
    /// Lease of an executing request; an unset `lock_ttl` is this or `key_ttl`, the shorter.
    pub const LOCK_TTL: Duration = Duration::from_secs(30);
    /// The shortest `lock_ttl` accepted.
    pub const MIN_LOCK_TTL: Duration = Duration::from_millis(100);
    pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
    pub const MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;
    pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
    pub const POOL_MAX_IDLE_PER_HOST: usize = 256;
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
    pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(60);
    /// nginx closes idle keep-alive connections, HTTP/2 ones included, after 75 s.
    pub const HTTP2_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: usize = 10_000;
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    pub const MAX_HEADERS: usize = 100;
    pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 256;
    pub const MEMORY_MAX_ENTRIES: usize = 1_000_000;
    pub const EMBEDDED_STORE: super::EmbeddedStore = super::EmbeddedStore::Disk;
    /// Relative: under the working directory.
    pub const DATA_DIR: &str = "idemproxy-data";
    pub const MAX_DISK_BYTES: u64 = 1024 * 1024 * 1024;
    /// The smallest `store.max_disk_bytes` accepted.
    pub const MIN_MAX_DISK_BYTES: u64 = 1024 * 1024;
    pub const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    /// Longest wait for replica acknowledgements; an unset `store.replica_timeout` is this or
    /// `store.command_timeout`, the shorter.
    pub const REDIS_REPLICA_TIMEOUT: Duration = Duration::from_secs(1);
    pub const KEY_PREFIX: &str = "idem:";
    pub const SCOPE_HEADER: &str = "authorization";
    pub const LOG_FORMAT: super::LogFormat = super::LogFormat::Json;
    pub const LOG_FILTER: &str = "info";
    pub const ON_CONFLICT: super::OnConflict = super::OnConflict::Reject;
    pub const STORE_FAILURE: super::StoreFailure = super::StoreFailure::Closed;
    pub const UNKNOWN_OUTCOME: super::UnknownOutcome = super::UnknownOutcome::Reject;
    /// Bodies up to this size are read to look for a `json:` key (1 MiB).
    pub const BUFFER_BYTES: u64 = 1024 * 1024;
    pub const FINGERPRINT_BODY: super::FingerprintBody = super::FingerprintBody::Bytes;
    pub const REPLAY_HEADER: &str = "idempotent-replayed";
    /// Upstream statuses that say the request was not processed.
    pub const RELEASE_STATUSES: [u16; 2] = [429, 503];
    pub const ERROR_FORMAT: super::ErrorFormat = super::ErrorFormat::Problem;
}

impl Config {
    /// Loads the configuration the binary runs with: `cli.config` (if any) under env and flags.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let path = cli.check_config.as_ref().or(cli.config.as_ref());
        let mut file = match path {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        file.apply_cli(cli);
        Self::from_file(file)
    }

    /// The admin listener and token of the configuration `cli` names (its `--config` file under
    /// `IDEMPROXY_*` and flags), without resolving the rest: what `idemproxy key` reaches a
    /// running proxy with.
    pub fn admin_access(cli: &Cli) -> Result<AdminAccess, ConfigError> {
        let mut file = match cli.config.as_ref() {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        file.apply_cli(cli);
        let (_, listen) = resolve::listeners(&file)?;
        Ok(AdminAccess {
            listen,
            token: file.admin_token,
        })
    }

    /// Parses config text (no env, no flags): what tests and `--check-config` build on.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file = FileConfig::parse(text).map_err(|err| file::parse_error(Path::new("<inline>"), text, err))?;
        Self::from_file(file)
    }

    /// Resolves the layered file form into a validated configuration.
    pub fn from_file(file: FileConfig) -> Result<Self, ConfigError> {
        let (listen, admin_listen) = resolve::listeners(&file)?;
        Ok(Config {
            listen,
            admin_listen,
            admin_token: file.admin_token.clone(),
            log_format: file.log.format.unwrap_or(defaults::LOG_FORMAT),
            log_filter: resolve::log_filter(&file.log)?,
            server: resolve::server(&file.server)?,
            tls: resolve::tls(&file.tls)?,
            upstream: resolve::upstream(&file.upstream)?,
            store: resolve::store(&file.store)?,
            key_prefix: resolve::key_prefix(&file.store)?,
            routes: resolve::routes(&file)?,
        })
    }

    /// The route serving `path`: the longest matching prefix.
    pub fn route_for(&self, path: &str) -> Option<&Arc<Route>> {
        route_for(&self.routes, path)
    }
}

/// Longest-prefix match over routes sorted longest first. A prefix matches at a segment
/// boundary: `/pay` matches `/pay` and `/pay/x`, not `/payments`.
pub fn route_for<'a>(routes: &'a [Arc<Route>], path: &str) -> Option<&'a Arc<Route>> {
    routes.iter().find(|r| prefix_matches(&r.prefix, path))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    FileConfig::parse(&text).map_err(|err| file::parse_error(path, &text, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_redis_password() {
        let config = Config::from_toml(
            "upstream.url = \"http://127.0.0.1:3000\"\nstore.redis = \"redis://app:s3cret@127.0.0.1:6379/0\"",
        )
        .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("redis://app:***@127.0.0.1:6379/0"), "{debug}");
    }

    #[test]
    fn cli_only_form_is_one_catch_all_route() {
        let config = Config::from_toml("upstream.url = \"http://127.0.0.1:3000\"").expect("valid");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.routes[0].prefix, "/");
        assert_eq!(config.routes[0].policy.methods, vec![Method::POST]);
        assert_eq!(config.routes[0].policy.key_ttl, defaults::KEY_TTL);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("upstream.url = \"http://a:1\"\nlisten_port = 3").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err =
            Config::from_toml("upstream.url = \"http://a:1\"\n[idempotency]\non_conflict = \"maybe\"").unwrap_err();
        assert!(err.to_string().contains("idempotency.on_conflict"), "{err}");
    }

    #[test]
    fn missing_upstream_is_an_error() {
        let err = Config::from_toml("").unwrap_err();
        assert!(err.to_string().contains("upstream"), "{err}");
    }

    #[test]
    fn longest_prefix_wins_at_segment_boundaries() {
        let config = Config::from_toml(
            r#"
            upstream.url = "http://127.0.0.1:1"
            [[route]]
            prefix = "/pay"
            [[route]]
            prefix = "/pay/refunds"
            "#,
        )
        .expect("valid");
        assert_eq!(
            config.route_for("/pay/refunds/1").map(|r| &*r.name),
            Some("/pay/refunds")
        );
        assert_eq!(config.route_for("/pay/x").map(|r| &*r.name), Some("/pay"));
        assert_eq!(config.route_for("/pay").map(|r| &*r.name), Some("/pay"));
        assert_eq!(config.route_for("/payments").map(|r| &*r.name), Some("default"));
    }

    #[test]
    fn flags_override_file_and_routes_override_flags() {
        let mut file = FileConfig::parse(
            r#"
            upstream.url = "http://127.0.0.1:1"
            idempotency.require_key = false
            [[route]]
            prefix = "/search"
            idempotency.enabled = false
            "#,
        )
        .expect("parses");
        let cli = Cli {
            settings: FileConfig {
                idempotency: PolicySection {
                    require_key: Some(true),
                    key_ttl: Some(Duration::from_secs(60)),
                    ..PolicySection::default()
                },
                ..FileConfig::default()
            },
            ..Cli::default()
        };
        file.apply_cli(&cli);
        let config = Config::from_file(file).expect("valid");
        let default = config.route_for("/orders").expect("route");
        assert!(default.policy.require_key);
        assert_eq!(default.policy.key_ttl, Duration::from_secs(60));
        assert!(!config.route_for("/search").expect("route").policy.enabled);
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let err = Config::from_toml("upstream.url = \"http://a:1\"\nadmin_listen = \"0.0.0.0:9090\"").unwrap_err();
        assert!(err.to_string().contains("admin_listen"), "{err}");
        Config::from_toml("upstream.url = \"http://a:1\"\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token = \"s3cret\"")
            .expect("a token makes it valid");
    }
    fn error_of(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(_) => panic!("expected this config to be refused:\n{text}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn enums_are_spelled_alike_in_the_file_on_the_command_line_and_in_display() {
        fn check<T: ValueEnum + fmt::Display + PartialEq + fmt::Debug + serde::de::DeserializeOwned>() {
            #[derive(Deserialize)]
            struct Doc<T> {
                value: T,
            }
            for variant in T::value_variants() {
                let spelled = variant.to_string();
                let from_file: Doc<T> = toml::from_str(&format!("value = \"{spelled}\"")).expect("parses");
                assert_eq!(&from_file.value, variant);
                assert_eq!(&T::from_str(&spelled, false).expect("a flag value"), variant);
            }
        }
        check::<EmbeddedStore>();
        check::<LogFormat>();
        check::<OnConflict>();
        check::<StoreFailure>();
        check::<UnknownOutcome>();
        check::<FingerprintBody>();
        check::<ErrorFormat>();
        assert_eq!(OnConflict::Wait.to_string(), "wait");
        assert_eq!(LogFormat::Pretty.to_string(), "pretty");
    }

    #[test]
    fn a_bad_enum_in_a_route_names_the_route_key() {
        let err = error_of(
            "upstream.url = \"http://a:1\"\n[[route]]\nprefix = \"/a\"\nidempotency.unknown_outcome = \"later\"",
        );
        assert!(err.contains("`route[0].idempotency.unknown_outcome`"), "{err}");
        assert!(err.contains("`reject` or `retry`"), "{err}");
        let err = error_of("upstream.url = \"http://a:1\"\nlog.format = \"xml\"");
        assert!(err.contains("`log.format`"), "{err}");
    }

    #[test]
    fn a_log_filter_that_does_not_parse_is_refused() {
        for filter in ["idemproxy=loud", "info,[{"] {
            let err = error_of(&format!("upstream.url = \"http://a:1\"\nlog.filter = \"{filter}\""));
            assert!(err.contains("`log.filter`"), "{err}");
        }
        let config =
            Config::from_toml("upstream.url = \"http://a:1\"\nlog.filter = \"warn,idemproxy=debug\"").expect("valid");
        assert_eq!(config.log_filter, "warn,idemproxy=debug");
    }

    #[test]
    fn redis_urls_are_parsed_without_connecting_and_without_echoing_passwords() {
        let store = |url: &str| Config::from_toml(&format!("upstream.url = \"http://a:1\"\nstore.redis = \"{url}\""));
        for url in [
            "redis://:s3cret@127.0.0.1:notaport",
            "redis://:s3cret@0.0.0.0:6379",
            "redis://user:s3cret@127.0.0.1:6379/zero",
            "redis+cluster://:s3cret@a:1,b:port",
            "redis+cluster://a:1,",
            "rediss+cluster://",
            "redis+sentinel://:s3cret@a:1,b:2",
            "rediss+sentinel://:s3cret@a:1,b:port/mymaster",
            "redis+sentinel://u:s3cret@a:1/mymaster/zero",
        ] {
            let err = store(url).expect_err(url).to_string();
            assert!(err.contains("`store.redis`"), "{url}: {err}");
            assert!(!err.contains("s3cret"), "{url}: {err}");
        }
        let err = store("redis+cluster://a:1,b:port").expect_err("bad node").to_string();
        assert!(err.contains("node 2"), "{err}");
        for url in [
            "redis://:s3cret@127.0.0.1:1/0",
            "rediss://redis.internal:6380",
            "redis+cluster://a:1,b:2",
            "rediss+cluster://user:pw@a:1,b:2",
            "unix:///tmp/redis.sock",
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
            "rediss+sentinel://app:pw@s1,s2,s3/orders/2",
        ] {
            let config = store(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(matches!(config.store, StoreSettings::Redis { .. }));
        }
    }

    #[test]
    fn the_embedded_store_is_on_disk_unless_memory_is_chosen_and_ignored_with_redis() {
        let store =
            |extra: &str| Config::from_toml(&format!("upstream.url = \"http://a:1\"\n{extra}")).map(|c| c.store);
        assert!(matches!(
            store(""),
            Ok(StoreSettings::Disk { data_dir, max_disk_bytes })
                if data_dir == Path::new("idemproxy-data") && max_disk_bytes == defaults::MAX_DISK_BYTES
        ));
        assert!(matches!(
            store("store.embedded = \"memory\"\nstore.memory_max_entries = 5"),
            Ok(StoreSettings::Memory { max_entries: 5 })
        ));
        assert!(matches!(
            store("store.data_dir = \"/srv/idem\"\nstore.max_disk_bytes = 2097152"),
            Ok(StoreSettings::Disk { data_dir, max_disk_bytes: 2_097_152 }) if data_dir == Path::new("/srv/idem")
        ));
        let err = error_of("upstream.url = \"http://a:1\"\nstore.max_disk_bytes = 1000");
        assert!(err.contains("`store.max_disk_bytes`"), "{err}");
        let err = error_of("upstream.url = \"http://a:1\"\nstore.embedded = \"tape\"");
        assert!(err.contains("`store.embedded`"), "{err}");
        match store("store.redis = \"redis://127.0.0.1:1\"\nstore.embedded = \"disk\"\nstore.data_dir = \"d\"") {
            Ok(StoreSettings::Redis { ignored, .. }) => assert_eq!(ignored, ["store.embedded", "store.data_dir"]),
            other => panic!("expected Redis, got {other:?}"),
        }
    }

    #[test]
    fn replica_settings_are_checked_against_the_store() {
        let redis = |extra: &str| format!("upstream.url = \"http://a:1\"\nstore.redis = \"redis://h:1\"\n{extra}");
        let config = Config::from_toml(&redis("")).expect("valid");
        let StoreSettings::Redis { replication, .. } = config.store else {
            panic!("a Redis store");
        };
        assert_eq!(replication, Replication::default());
        assert_eq!(replication.replica_timeout, defaults::REDIS_REPLICA_TIMEOUT);

        // An unset timeout follows a shorter command timeout; one that is set may not exceed it.
        let config =
            Config::from_toml(&redis("store.command_timeout = \"300ms\"\nstore.min_replicas = 2")).expect("valid");
        let StoreSettings::Redis { replication, .. } = config.store else {
            panic!("a Redis store");
        };
        assert_eq!(replication.min_replicas, 2);
        assert_eq!(replication.replica_timeout, Duration::from_millis(300));
        let err = error_of(&redis("store.command_timeout = \"1s\"\nstore.replica_timeout = \"2s\""));
        assert!(
            err.contains("`store.replica_timeout`") && err.contains("must not exceed"),
            "{err}"
        );
        let err = error_of(&redis("store.replica_timeout = \"0s\""));
        assert!(err.contains("`store.replica_timeout`"), "{err}");

        // Replicas and sentinels need a Redis that has them.
        let err = error_of("upstream.url = \"http://a:1\"\nstore.min_replicas = 1");
        assert!(err.contains("`store.min_replicas`"), "{err}");
        Config::from_toml("upstream.url = \"http://a:1\"\nstore.min_replicas = 0").expect("0 is the default");
        let err = error_of(&redis("store.sentinel_password = \"s3cret\""));
        assert!(
            err.contains("`store.sentinel_password`") && !err.contains("s3cret"),
            "{err}"
        );
        let sentinel = "upstream.url = \"http://a:1\"\nstore.redis = \"redis+sentinel://h:1/m\"\n";
        let config = Config::from_toml(&format!("{sentinel}store.sentinel_password = \"s3cret\"")).expect("valid");
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "the password is not in Debug output"
        );
        let err = error_of(&format!("{sentinel}store.sentinel_password = \"\""));
        assert!(err.contains("must not be empty"), "{err}");
    }

    #[test]
    fn an_unset_lock_ttl_follows_a_shorter_key_ttl() {
        let config = Config::from_toml("upstream.url = \"http://a:1\"\nidempotency.key_ttl = \"2s\"").expect("valid");
        assert_eq!(config.routes[0].policy.key_ttl, Duration::from_secs(2));
        assert_eq!(config.routes[0].policy.lock_ttl, Duration::from_secs(2));

        let config = Config::from_toml(
            "upstream.url = \"http://a:1\"\n[[route]]\nprefix = \"/a\"\nidempotency.key_ttl = \"10s\"",
        )
        .expect("valid");
        let policy = &config.route_for("/a").expect("a route").policy;
        assert_eq!(policy.lock_ttl, Duration::from_secs(10));
        assert_eq!(
            config.route_for("/b").expect("default").policy.lock_ttl,
            defaults::LOCK_TTL
        );

        let err =
            error_of("upstream.url = \"http://a:1\"\nidempotency.key_ttl = \"2s\"\nidempotency.lock_ttl = \"30s\"");
        assert!(err.contains("`idempotency.lock_ttl`"), "{err}");
        assert!(
            err.contains("route `default`: lock_ttl 30s must not exceed key_ttl 2s"),
            "{err}"
        );

        let err = error_of("upstream.url = \"http://a:1\"\nidempotency.key_ttl = \"50ms\"");
        assert!(err.contains("`idempotency.key_ttl`") && err.contains("100ms"), "{err}");
    }

    #[test]
    fn error_format_and_retry_hint_are_per_route() {
        let config = Config::from_toml(
            "upstream.url = \"http://a:1\"\nidempotency.retry_hint_header = \"Stripe-Should-Retry\"\n\
             [[route]]\nprefix = \"/v1\"\nidempotency.error_format = \"stripe\"",
        )
        .expect("valid");
        let stripe = &config.route_for("/v1/charges").expect("a route").policy;
        assert_eq!(stripe.error_format, ErrorFormat::Stripe);
        assert_eq!(
            stripe.retry_hint_header.as_ref().map(HeaderName::as_str),
            Some("stripe-should-retry")
        );
        let default = &config.route_for("/orders").expect("default").policy;
        assert_eq!(default.error_format, defaults::ERROR_FORMAT);
        assert!(default.retry_hint_header.is_some(), "inherited from [idempotency]");
        let plain = Config::from_toml("upstream.url = \"http://a:1\"").expect("valid");
        assert_eq!(plain.routes[0].policy.retry_hint_header, None);

        for name in [
            "",
            "bad name",
            "Retry-After",
            "content-type",
            "Connection",
            "Idempotent-Replayed",
        ] {
            let err = error_of(&format!(
                "upstream.url = \"http://a:1\"\nidempotency.retry_hint_header = \"{name}\""
            ));
            assert!(err.contains("`idempotency.retry_hint_header`"), "{name}: {err}");
        }
    }

    #[test]
    fn the_retry_hint_header_is_not_the_routes_replay_header() {
        let err = error_of(
            "upstream.url = \"http://a:1\"\nidempotency.replay_header = \"X-Replayed\"\n\
             idempotency.retry_hint_header = \"x-replayed\"",
        );
        assert!(err.contains("`idempotency.retry_hint_header`"), "{err}");
        // Once the marker is renamed, the proxy no longer sets `Idempotent-Replayed`.
        let config = Config::from_toml(
            "upstream.url = \"http://a:1\"\nidempotency.replay_header = \"X-Replayed\"\n\
             idempotency.retry_hint_header = \"Idempotent-Replayed\"",
        )
        .expect("valid");
        let policy = &config.routes[0].policy;
        assert_eq!(policy.replay_header, "x-replayed");
        assert_eq!(
            policy.retry_hint_header.as_ref().map(HeaderName::as_str),
            Some("idempotent-replayed")
        );
    }

    #[test]
    fn listen_addresses_may_be_host_names() {
        let config = Config::from_toml(
            "upstream.url = \"http://a:1\"\nlisten = \"localhost:8080\"\nadmin_listen = \"localhost:9090\"",
        )
        .expect("localhost resolves");
        assert!(config.listen.ip().is_loopback(), "{}", config.listen);
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.admin_listen.map(|a| a.port()), Some(9090));
        assert_eq!(config.admin_token, None, "a loopback admin listener needs no token");

        let err = error_of("upstream.url = \"http://a:1\"\nlisten = \"no-such-host.invalid:8080\"");
        assert!(
            err.contains("`listen`") && err.contains("no-such-host.invalid:8080"),
            "{err}"
        );
        let err = error_of("upstream.url = \"http://a:1\"\nadmin_listen = \"localhost\"");
        assert!(err.contains("`admin_listen`"), "{err}");
    }
}
