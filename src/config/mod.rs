//! Configuration: the file/env/flag layers (`file`) resolved into one validated [`Config`].
//!
//! Resolution happens once at start-up; the request path only reads the resolved values
//! (parsed `Uri`s, `HeaderName`s, `Method`s), never strings.

mod file;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, Uri};

pub use file::{Cli, FileConfig, PolicySection, RouteSection};

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

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// What a retry gets while the first request with its key still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// `409 Conflict` with `Retry-After`.
    Reject,
    /// Wait up to `wait_timeout` for the first request's result, then replay it.
    Wait,
}

/// What guarded requests get while the store is unreachable (spec §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// `503` + `Retry-After`; nothing is forwarded.
    Closed,
    /// Forward without protection (counted and logged).
    Open,
}

/// What happens to a key whose execution may or may not have reached the upstream (spec §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownOutcome {
    /// Mark the key `Unknown`: every retry gets the outcome-unknown problem (at most once).
    Reject,
    /// Release the key: a retry executes again (at least once).
    Retry,
}

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

/// Which store keeps the records.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    Memory {
        max_entries: usize,
    },
    Redis {
        url: String,
        command_timeout: Duration,
        /// `rediss://`: CA certificates (PEM file) trusted instead of the bundled roots.
        ca_file: Option<PathBuf>,
    },
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

/// Defaults, one place (spec §4-§5 and README "Configuration").
pub mod defaults {
    use std::time::Duration;
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const KEY_TTL: Duration = Duration::from_secs(24 * 3600);
    pub const LOCK_TTL: Duration = Duration::from_secs(30);
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
    pub const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    pub const KEY_PREFIX: &str = "idem:";
    pub const SCOPE_HEADER: &str = "authorization";
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

    /// Parses config text (no env, no flags): what tests and `--check-config` build on.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file = FileConfig::parse(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            source: Box::new(source),
        })?;
        Self::from_file(file)
    }

    /// Resolves the layered file form into a validated configuration.
    pub fn from_file(file: FileConfig) -> Result<Self, ConfigError> {
        let listen = parse_addr("listen", file.listen.as_deref().unwrap_or(defaults::LISTEN))?;
        let admin_listen = file
            .admin_listen
            .as_deref()
            .map(|a| parse_addr("admin_listen", a))
            .transpose()?;
        if let Some(addr) = admin_listen {
            if !addr.ip().is_loopback() && file.admin_token.is_none() {
                return Err(invalid(
                    "admin_listen",
                    format!("{addr} is not a loopback address; set `admin_token` to expose the admin listener"),
                ));
            }
        }
        if matches!(file.admin_token.as_deref(), Some("")) {
            return Err(invalid("admin_token", "must not be empty"));
        }
        let log_format = match file.log.format.as_deref().unwrap_or("json") {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => return Err(invalid("log.format", format!("`{other}`: expected json or pretty"))),
        };
        let server = ServerSettings {
            header_read_timeout: positive(
                "server.header_read_timeout",
                file.server.header_read_timeout.unwrap_or(defaults::HEADER_READ_TIMEOUT),
            )?,
            body_read_timeout: positive(
                "server.body_read_timeout",
                file.server.body_read_timeout.unwrap_or(defaults::BODY_READ_TIMEOUT),
            )?,
            http2_keepalive_interval: positive(
                "server.http2_keepalive_interval",
                file.server
                    .http2_keepalive_interval
                    .unwrap_or(defaults::HTTP2_KEEPALIVE_INTERVAL),
            )?,
            http2_idle_timeout: positive(
                "server.http2_idle_timeout",
                file.server.http2_idle_timeout.unwrap_or(defaults::HTTP2_IDLE_TIMEOUT),
            )?,
            shutdown_grace: file.server.shutdown_grace.unwrap_or(defaults::SHUTDOWN_GRACE),
            max_connections: at_least(
                "server.max_connections",
                file.server.max_connections,
                defaults::MAX_CONNECTIONS,
                1,
            )?,
            worker_threads: match file.server.worker_threads {
                Some(0) => return Err(invalid("server.worker_threads", "must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            max_header_bytes: at_least(
                "server.max_header_bytes",
                file.server.max_header_bytes,
                defaults::MAX_HEADER_BYTES,
                8192,
            )?,
            max_headers: at_least("server.max_headers", file.server.max_headers, defaults::MAX_HEADERS, 8)?,
            http2_max_concurrent_streams: file
                .server
                .http2_max_concurrent_streams
                .unwrap_or(defaults::HTTP2_MAX_CONCURRENT_STREAMS)
                .max(1),
        };
        let tls = match (file.tls.cert.clone(), file.tls.key.clone()) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert,
                key,
                reload_interval: positive(
                    "tls.reload_interval",
                    file.tls.reload_interval.unwrap_or(defaults::TLS_RELOAD_INTERVAL),
                )?,
            }),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls.key", "`tls.cert` is set but `tls.key` is not")),
            (None, Some(_)) => return Err(invalid("tls.cert", "`tls.key` is set but `tls.cert` is not")),
        };
        let upstream = UpstreamSettings {
            connect_timeout: positive(
                "upstream.connect_timeout",
                file.upstream.connect_timeout.unwrap_or(defaults::CONNECT_TIMEOUT),
            )?,
            pool_idle_timeout: file.upstream.pool_idle_timeout.unwrap_or(defaults::POOL_IDLE_TIMEOUT),
            pool_max_idle_per_host: file
                .upstream
                .pool_max_idle_per_host
                .unwrap_or(defaults::POOL_MAX_IDLE_PER_HOST),
            ca_file: file.upstream.ca_file.clone(),
        };
        let store = match file.store.redis.clone() {
            Some(url) => {
                let known = [
                    "redis://",
                    "rediss://",
                    "redis+cluster://",
                    "rediss+cluster://",
                    "redis+unix://",
                    "unix://",
                ];
                if !known.iter().any(|p| url.starts_with(p)) {
                    return Err(invalid(
                        "store.redis",
                        "expected redis://, rediss:// or redis+cluster:// URL",
                    ));
                }
                if file.store.ca_file.is_some() && !url.starts_with("rediss") {
                    return Err(invalid(
                        "store.ca_file",
                        "only used with TLS: `store.redis` must be a rediss:// or rediss+cluster:// URL",
                    ));
                }
                StoreSettings::Redis {
                    url,
                    command_timeout: positive(
                        "store.command_timeout",
                        file.store.command_timeout.unwrap_or(defaults::REDIS_COMMAND_TIMEOUT),
                    )?,
                    ca_file: file.store.ca_file.clone(),
                }
            }
            None if file.store.ca_file.is_some() => {
                return Err(invalid("store.ca_file", "is set but `store.redis` is not"))
            }
            None => StoreSettings::Memory {
                max_entries: at_least(
                    "store.memory_max_entries",
                    file.store.memory_max_entries,
                    defaults::MEMORY_MAX_ENTRIES,
                    1,
                )?,
            },
        };
        let key_prefix = file
            .store
            .key_prefix
            .clone()
            .unwrap_or_else(|| defaults::KEY_PREFIX.to_owned());
        if key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "store.key_prefix",
                "must not contain `{` or `}` (they form the Redis Cluster hash tag)",
            ));
        }
        let routes = resolve_routes(&file)?;
        Ok(Config {
            listen,
            admin_listen,
            admin_token: file.admin_token,
            log_format,
            log_filter: file.log.filter.unwrap_or_else(|| "info".to_owned()),
            server,
            tls,
            upstream,
            store,
            key_prefix,
            routes,
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
    FileConfig::parse(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|e| invalid(key, format!("`{text}` is not an address like 127.0.0.1:8080: {e}")))
}

fn positive(key: &str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(value)
}

fn at_least(key: &str, value: Option<usize>, default: usize, min: usize) -> Result<usize, ConfigError> {
    let value = value.unwrap_or(default);
    if value < min {
        return Err(invalid(key, format!("{value} is below the minimum {min}")));
    }
    Ok(value)
}

fn resolve_routes(file: &FileConfig) -> Result<Arc<[Arc<Route>]>, ConfigError> {
    let default_timeout = positive(
        "upstream.timeout",
        file.upstream.timeout.unwrap_or(defaults::UPSTREAM_TIMEOUT),
    )?;
    let default_preserve = file.upstream.preserve_host.unwrap_or(false);
    let default_upstream = file
        .upstream
        .url
        .as_deref()
        .map(|u| UpstreamTarget::parse("upstream.url", u))
        .transpose()?;
    let mut routes = Vec::with_capacity(file.routes.len() + 1);
    for (i, section) in file.routes.iter().enumerate() {
        let key = |field: &str| format!("route[{i}].{field}");
        if !section.prefix.starts_with('/') {
            return Err(invalid(
                key("prefix"),
                format!("`{}` must start with `/`", section.prefix),
            ));
        }
        let upstream = match &section.upstream {
            Some(u) => UpstreamTarget::parse(&key("upstream"), u)?,
            None => default_upstream
                .clone()
                .ok_or_else(|| invalid(key("upstream"), "no upstream for this route and no `upstream.url`"))?,
        };
        let policy = resolve_policy(
            &key("idempotency"),
            &file.idempotency.overlaid_with(&section.idempotency),
        )?;
        routes.push(Route {
            index: 0,
            name: section.name.as_deref().unwrap_or(&section.prefix).into(),
            prefix: section.prefix.clone(),
            upstream,
            preserve_host: section.preserve_host.unwrap_or(default_preserve),
            timeout: positive(&key("timeout"), section.timeout.unwrap_or(default_timeout))?,
            policy,
        });
    }
    let has_catch_all = routes.iter().any(|r| r.prefix == "/");
    if !has_catch_all {
        match default_upstream {
            Some(upstream) => routes.push(Route {
                index: 0,
                name: "default".into(),
                prefix: "/".to_owned(),
                upstream,
                preserve_host: default_preserve,
                timeout: default_timeout,
                policy: resolve_policy("idempotency", &file.idempotency)?,
            }),
            None if routes.is_empty() => {
                return Err(invalid(
                    "upstream.url",
                    "no upstream: pass --upstream URL (or IDEMPROXY_UPSTREAM), or set `upstream.url` or a [[route]]",
                ))
            }
            None => {}
        }
    }
    let mut names = std::collections::HashSet::new();
    for r in &routes {
        if !names.insert(&*r.name) {
            return Err(invalid("route.name", format!("`{}` is used by two routes", r.name)));
        }
    }
    let mut prefixes = std::collections::HashSet::new();
    for r in &routes {
        if !prefixes.insert(r.prefix.as_str()) {
            return Err(invalid("route.prefix", format!("`{}` is used by two routes", r.prefix)));
        }
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    for (index, route) in routes.iter_mut().enumerate() {
        route.index = index;
    }
    Ok(routes.into_iter().map(Arc::new).collect())
}

fn resolve_policy(key: &str, section: &PolicySection) -> Result<Policy, ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let methods = match &section.methods {
        None => vec![Method::POST],
        Some(list) => {
            if list.is_empty() {
                return Err(invalid(field("methods"), "must name at least one method"));
            }
            list.iter()
                .map(|m| {
                    let m = m.trim().to_ascii_uppercase();
                    match m.as_str() {
                        "POST" => Ok(Method::POST),
                        "PATCH" => Ok(Method::PATCH),
                        other => Err(invalid(
                            field("methods"),
                            format!("`{other}` cannot be guarded: POST and PATCH are the non-idempotent methods"),
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let scope_header = section.scope_header.as_deref().unwrap_or(defaults::SCOPE_HEADER);
    let scope_header = HeaderName::from_bytes(scope_header.trim().as_bytes())
        .map_err(|_| invalid(field("scope_header"), format!("`{scope_header}` is not a header name")))?;
    let key_ttl = positive(&field("key_ttl"), section.key_ttl.unwrap_or(defaults::KEY_TTL))?;
    let lock_ttl = positive(&field("lock_ttl"), section.lock_ttl.unwrap_or(defaults::LOCK_TTL))?;
    if lock_ttl < Duration::from_millis(100) {
        return Err(invalid(field("lock_ttl"), "must be at least 100ms"));
    }
    if lock_ttl > key_ttl {
        return Err(invalid(field("lock_ttl"), "must not exceed key_ttl"));
    }
    let on_conflict = match section.on_conflict.as_deref().unwrap_or("reject") {
        "reject" => OnConflict::Reject,
        "wait" => OnConflict::Wait,
        other => {
            return Err(invalid(
                field("on_conflict"),
                format!("`{other}`: expected reject or wait"),
            ))
        }
    };
    let store_failure = match section.store_failure.as_deref().unwrap_or("closed") {
        "closed" => StoreFailure::Closed,
        "open" => StoreFailure::Open,
        other => {
            return Err(invalid(
                field("store_failure"),
                format!("`{other}`: expected closed or open"),
            ))
        }
    };
    let unknown_outcome = match section.unknown_outcome.as_deref().unwrap_or("reject") {
        "reject" => UnknownOutcome::Reject,
        "retry" => UnknownOutcome::Retry,
        other => {
            return Err(invalid(
                field("unknown_outcome"),
                format!("`{other}`: expected reject or retry"),
            ))
        }
    };
    let max_body_bytes = section.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        return Err(invalid(field("max_body_bytes"), "must be greater than zero"));
    }
    Ok(Policy {
        enabled: section.enabled.unwrap_or(true),
        methods,
        require_key: section.require_key.unwrap_or(false),
        scope_header,
        key_ttl,
        lock_ttl,
        on_conflict,
        wait_timeout: section.wait_timeout.unwrap_or(defaults::WAIT_TIMEOUT),
        store_failure,
        max_body_bytes,
        max_response_bytes: section.max_response_bytes.unwrap_or(defaults::MAX_RESPONSE_BYTES),
        record_server_errors: section.record_server_errors.unwrap_or(true),
        unknown_outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            require_key: Some(true),
            key_ttl: Some(Duration::from_secs(60)),
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
}
