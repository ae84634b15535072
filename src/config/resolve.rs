//! Resolution of the layered form ([`FileConfig`]) into the validated types, one resolver per
//! section. Each applies the defaults of its section, checks every value, and names the key at
//! fault in any error.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER, VIA};
use http::{HeaderName, Method};
use redis::IntoConnectionInfo;

use super::file::{LogSection, ServerSection, StoreSection, TlsSection, UpstreamSection};
use super::redis_url::SentinelUrl;
use super::{
    defaults, invalid, ConfigError, EmbeddedStore, FileConfig, FingerprintBody, JsonPointer, KeySource, Policy,
    PolicySection, Replication, Route, RouteSection, ServerSettings, StatusSet, StoreSettings, TlsSettings,
    UpstreamSettings, UpstreamTarget,
};
use crate::headers::is_replayed;

/// `listen` and `admin_listen`, and the rule that a non-loopback admin listener needs a token.
pub(super) fn listeners(file: &FileConfig) -> Result<(SocketAddr, Option<SocketAddr>), ConfigError> {
    let listen = socket_addr("listen", file.listen.as_deref().unwrap_or(defaults::LISTEN))?;
    let admin_listen = file
        .admin_listen
        .as_deref()
        .map(|a| socket_addr("admin_listen", a))
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
    Ok((listen, admin_listen))
}

/// `text` as a socket address: `ip:port` as it is, or `host:port` with `host` resolved now, to its
/// first IPv4 address if it has one (`localhost` binds 127.0.0.1 even where `::1` comes first),
/// else to its first address.
fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let resolved: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| {
            invalid(
                key,
                format!("`{text}` is neither an address like 127.0.0.1:8080 nor a host:port that resolves: {e}"),
            )
        })?
        .collect();
    resolved
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| invalid(key, format!("`{text}` resolves to no address")))
}

/// `log.filter`, checked the way the log subscriber will parse it.
pub(super) fn log_filter(log: &LogSection) -> Result<String, ConfigError> {
    let filter = log.filter.as_deref().unwrap_or(defaults::LOG_FILTER);
    tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| invalid("log.filter", format!("`{filter}` is not a RUST_LOG-style filter: {e}")))?;
    Ok(filter.to_owned())
}

pub(super) fn server(server: &ServerSection) -> Result<ServerSettings, ConfigError> {
    Ok(ServerSettings {
        header_read_timeout: positive(
            "server.header_read_timeout",
            server.header_read_timeout.unwrap_or(defaults::HEADER_READ_TIMEOUT),
        )?,
        body_read_timeout: positive(
            "server.body_read_timeout",
            server.body_read_timeout.unwrap_or(defaults::BODY_READ_TIMEOUT),
        )?,
        http2_keepalive_interval: positive(
            "server.http2_keepalive_interval",
            server
                .http2_keepalive_interval
                .unwrap_or(defaults::HTTP2_KEEPALIVE_INTERVAL),
        )?,
        http2_idle_timeout: positive(
            "server.http2_idle_timeout",
            server.http2_idle_timeout.unwrap_or(defaults::HTTP2_IDLE_TIMEOUT),
        )?,
        shutdown_grace: server.shutdown_grace.unwrap_or(defaults::SHUTDOWN_GRACE),
        max_connections: at_least(
            "server.max_connections",
            server.max_connections,
            defaults::MAX_CONNECTIONS,
            1,
        )?,
        worker_threads: match server.worker_threads {
            Some(0) => return Err(invalid("server.worker_threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        max_header_bytes: at_least(
            "server.max_header_bytes",
            server.max_header_bytes,
            defaults::MAX_HEADER_BYTES,
            8192,
        )?,
        max_headers: at_least("server.max_headers", server.max_headers, defaults::MAX_HEADERS, 8)?,
        http2_max_concurrent_streams: server
            .http2_max_concurrent_streams
            .unwrap_or(defaults::HTTP2_MAX_CONCURRENT_STREAMS)
            .max(1),
    })
}

pub(super) fn tls(tls: &TlsSection) -> Result<Option<TlsSettings>, ConfigError> {
    match (tls.cert.clone(), tls.key.clone()) {
        (Some(cert), Some(key)) => Ok(Some(TlsSettings {
            cert,
            key,
            reload_interval: positive(
                "tls.reload_interval",
                tls.reload_interval.unwrap_or(defaults::TLS_RELOAD_INTERVAL),
            )?,
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid("tls.key", "`tls.cert` is set but `tls.key` is not")),
        (None, Some(_)) => Err(invalid("tls.cert", "`tls.key` is set but `tls.cert` is not")),
    }
}

pub(super) fn upstream(upstream: &UpstreamSection) -> Result<UpstreamSettings, ConfigError> {
    Ok(UpstreamSettings {
        connect_timeout: positive(
            "upstream.connect_timeout",
            upstream.connect_timeout.unwrap_or(defaults::CONNECT_TIMEOUT),
        )?,
        pool_idle_timeout: upstream.pool_idle_timeout.unwrap_or(defaults::POOL_IDLE_TIMEOUT),
        pool_max_idle_per_host: upstream
            .pool_max_idle_per_host
            .unwrap_or(defaults::POOL_MAX_IDLE_PER_HOST),
        ca_file: upstream.ca_file.clone(),
    })
}

pub(super) fn store(store: &StoreSection) -> Result<StoreSettings, ConfigError> {
    let Some(url) = store.redis.clone() else {
        if store.ca_file.is_some() {
            return Err(invalid("store.ca_file", "is set but `store.redis` is not"));
        }
        if store.min_replicas.is_some_and(|n| n > 0) {
            return Err(invalid(
                "store.min_replicas",
                "replicas are Redis replicas: set `store.redis`, or leave this at 0",
            ));
        }
        check_sentinel_password(store, false)?;
        return embedded_store(store);
    };
    check_redis_url(&url)?;
    check_sentinel_password(store, SentinelUrl::is_sentinel(&url))?;
    if store.ca_file.is_some() && !url.starts_with("rediss") {
        return Err(invalid(
            "store.ca_file",
            "only used with TLS: `store.redis` must be a rediss://, rediss+cluster:// or rediss+sentinel:// URL",
        ));
    }
    let ignored = [
        ("store.embedded", store.embedded.is_some()),
        ("store.data_dir", store.data_dir.is_some()),
        ("store.max_disk_bytes", store.max_disk_bytes.is_some()),
        ("store.memory_max_entries", store.memory_max_entries.is_some()),
    ];
    let command_timeout = positive(
        "store.command_timeout",
        store.command_timeout.unwrap_or(defaults::REDIS_COMMAND_TIMEOUT),
    )?;
    Ok(StoreSettings::Redis {
        url,
        command_timeout,
        ca_file: store.ca_file.clone(),
        ignored: ignored.iter().filter(|(_, set)| *set).map(|(key, _)| *key).collect(),
        sentinel_password: store.sentinel_password.clone(),
        replication: replication(store, command_timeout)?,
    })
}

/// `store.sentinel_password` is only for the sentinels of a `redis+sentinel://` URL.
fn check_sentinel_password(store: &StoreSection, sentinel: bool) -> Result<(), ConfigError> {
    match &store.sentinel_password {
        Some(_) if !sentinel => Err(invalid(
            "store.sentinel_password",
            "only used with a redis+sentinel:// or rediss+sentinel:// `store.redis` URL",
        )),
        Some(password) if password.expose().is_empty() => Err(invalid("store.sentinel_password", "must not be empty")),
        _ => Ok(()),
    }
}

/// `store.min_replicas` and `store.replica_timeout`: an unset timeout follows a shorter
/// `store.command_timeout`; one that is set must not exceed it.
fn replication(store: &StoreSection, command_timeout: Duration) -> Result<Replication, ConfigError> {
    let replica_timeout = match store.replica_timeout {
        None => defaults::REDIS_REPLICA_TIMEOUT.min(command_timeout),
        Some(timeout) => positive("store.replica_timeout", timeout)?,
    };
    if replica_timeout > command_timeout {
        return Err(invalid(
            "store.replica_timeout",
            format!(
                "{} must not exceed store.command_timeout {}",
                humantime::format_duration(replica_timeout),
                humantime::format_duration(command_timeout),
            ),
        ));
    }
    Ok(Replication {
        min_replicas: store.min_replicas.unwrap_or(0),
        replica_timeout,
    })
}

/// The embedded store without Redis: disk by default (docs/behaviour.md §11), or memory.
fn embedded_store(store: &StoreSection) -> Result<StoreSettings, ConfigError> {
    match store.embedded.unwrap_or(defaults::EMBEDDED_STORE) {
        EmbeddedStore::Memory => Ok(StoreSettings::Memory {
            max_entries: at_least(
                "store.memory_max_entries",
                store.memory_max_entries,
                defaults::MEMORY_MAX_ENTRIES,
                1,
            )?,
        }),
        EmbeddedStore::Disk => {
            let data_dir = store
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR));
            if data_dir.as_os_str().is_empty() {
                return Err(invalid("store.data_dir", "must not be empty"));
            }
            let max_disk_bytes = store.max_disk_bytes.unwrap_or(defaults::MAX_DISK_BYTES);
            if max_disk_bytes < defaults::MIN_MAX_DISK_BYTES {
                return Err(invalid(
                    "store.max_disk_bytes",
                    format!(
                        "{max_disk_bytes} is below the smallest accepted, {}",
                        defaults::MIN_MAX_DISK_BYTES
                    ),
                ));
            }
            Ok(StoreSettings::Disk {
                data_dir,
                max_disk_bytes,
            })
        }
    }
}

/// `store.redis` parsed the way the store will (each node of a cluster or sentinel list on its
/// own), without connecting. The messages never quote the URL: it may hold a password.
fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    const SCHEMES: [&str; 8] = [
        "redis://",
        "rediss://",
        "redis+cluster://",
        "rediss+cluster://",
        "redis+sentinel://",
        "rediss+sentinel://",
        "redis+unix://",
        "unix://",
    ];
    if !SCHEMES.iter().any(|p| url.starts_with(p)) {
        return Err(invalid(
            "store.redis",
            "expected a redis://, rediss://, redis+cluster:// or redis+sentinel:// URL",
        ));
    }
    if let Some(sentinel) = SentinelUrl::parse(url) {
        return sentinel.map(drop).map_err(|why| {
            invalid(
                "store.redis",
                format!("not a usable redis+sentinel://[user:password@]host:port,.../<master-name>[/<db>] URL: {why}"),
            )
        });
    }
    let cluster = url
        .strip_prefix("redis+cluster://")
        .map(|nodes| ("redis", nodes))
        .or_else(|| url.strip_prefix("rediss+cluster://").map(|nodes| ("rediss", nodes)));
    let Some((scheme, nodes)) = cluster else {
        return url.into_connection_info().map(drop).map_err(|e| {
            invalid(
                "store.redis",
                format!(
                    "not a usable URL like redis://[[user]:password@]host[:port][/db]: {}",
                    redis_reason(&e)
                ),
            )
        });
    };
    for (i, node) in nodes.split(',').enumerate() {
        format!("{scheme}://{node}").into_connection_info().map_err(|e| {
            invalid(
                "store.redis",
                format!(
                    "node {} of the cluster list is not a usable [[user]:password@]host[:port]: {}",
                    i + 1,
                    redis_reason(&e)
                ),
            )
        })?;
    }
    Ok(())
}

/// Why the redis crate refused a URL, without the error kind it appends (` - InvalidClientConfig`).
fn redis_reason(err: &redis::RedisError) -> String {
    err.to_string().replacen(&format!(" - {:?}", err.kind()), "", 1)
}

pub(super) fn key_prefix(store: &StoreSection) -> Result<String, ConfigError> {
    let key_prefix = store.key_prefix.as_deref().unwrap_or(defaults::KEY_PREFIX);
    if key_prefix.contains(['{', '}']) {
        return Err(invalid(
            "store.key_prefix",
            "must not contain `{` or `}` (they form the Redis Cluster hash tag)",
        ));
    }
    Ok(key_prefix.to_owned())
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

/// What every route inherits from `[upstream]`.
struct RouteDefaults {
    upstream: Option<UpstreamTarget>,
    timeout: Duration,
    preserve_host: bool,
}

/// The `[[route]]`s, plus the catch-all `default` route to `upstream.url` unless one of them
/// serves `/`; longest prefix first, each with its index.
pub(super) fn routes(file: &FileConfig) -> Result<Arc<[Arc<Route>]>, ConfigError> {
    let inherited = RouteDefaults {
        upstream: file
            .upstream
            .url
            .as_deref()
            .map(|u| UpstreamTarget::parse("upstream.url", u))
            .transpose()?,
        timeout: positive(
            "upstream.timeout",
            file.upstream.timeout.unwrap_or(defaults::UPSTREAM_TIMEOUT),
        )?,
        preserve_host: file.upstream.preserve_host.unwrap_or(false),
    };
    let needs_default = !file.routes.iter().any(|r| r.prefix == "/");
    // The default route's policy first: a clash within `[idempotency]` is reported under its own
    // keys, not under the first route that inherits it.
    let default_policy = match (needs_default, &inherited.upstream) {
        (true, Some(_)) => Some(policy("idempotency", "default", &file.idempotency)?),
        _ => None,
    };
    let mut routes = file
        .routes
        .iter()
        .enumerate()
        .map(|(i, section)| route(i, section, &file.idempotency, &inherited))
        .collect::<Result<Vec<_>, _>>()?;
    if needs_default {
        match inherited.upstream.zip(default_policy) {
            Some((upstream, policy)) => routes.push(Route {
                index: 0,
                name: "default".into(),
                prefix: "/".to_owned(),
                upstream,
                preserve_host: inherited.preserve_host,
                timeout: inherited.timeout,
                policy,
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
    check_unique(&routes)?;
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    for (index, route) in routes.iter_mut().enumerate() {
        route.index = index;
    }
    Ok(routes.into_iter().map(Arc::new).collect())
}

/// `[[route]]` number `i`, its policy being `[idempotency]` overlaid with its own.
fn route(
    i: usize,
    section: &RouteSection,
    base: &PolicySection,
    inherited: &RouteDefaults,
) -> Result<Route, ConfigError> {
    let key = |field: &str| format!("route[{i}].{field}");
    if !section.prefix.starts_with('/') {
        return Err(invalid(
            key("prefix"),
            format!("`{}` must start with `/`", section.prefix),
        ));
    }
    let upstream = match &section.upstream {
        Some(u) => UpstreamTarget::parse(&key("upstream"), u)?,
        None => inherited
            .upstream
            .clone()
            .ok_or_else(|| invalid(key("upstream"), "no upstream for this route and no `upstream.url`"))?,
    };
    let name = section.name.as_deref().unwrap_or(&section.prefix);
    Ok(Route {
        index: 0,
        name: name.into(),
        prefix: section.prefix.clone(),
        upstream,
        preserve_host: section.preserve_host.unwrap_or(inherited.preserve_host),
        timeout: positive(&key("timeout"), section.timeout.unwrap_or(inherited.timeout))?,
        policy: policy(&key("idempotency"), name, &base.overlaid_with(&section.idempotency))?,
    })
}

fn check_unique(routes: &[Route]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for r in routes {
        if !names.insert(&*r.name) {
            return Err(invalid("route.name", format!("`{}` is used by two routes", r.name)));
        }
    }
    let mut prefixes = HashSet::new();
    for r in routes {
        if !prefixes.insert(r.prefix.as_str()) {
            return Err(invalid("route.prefix", format!("`{}` is used by two routes", r.prefix)));
        }
    }
    Ok(())
}

/// The policy of the route named `route`, from its merged section; `key` is the section's key
/// (`idempotency` or `route[i].idempotency`).
fn policy(key: &str, route: &str, section: &PolicySection) -> Result<Policy, ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let scope_header = section.scope_header.as_deref().unwrap_or(defaults::SCOPE_HEADER);
    let scope_header = HeaderName::from_bytes(scope_header.trim().as_bytes())
        .map_err(|_| invalid(field("scope_header"), format!("`{scope_header}` is not a header name")))?;
    let (key_ttl, lock_ttl) = ttls(key, route, section)?;
    let max_body_bytes = section.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        return Err(invalid(field("max_body_bytes"), "must be greater than zero"));
    }
    let key_sources = key_sources(&field("key_sources"), section.key_sources.as_deref())?;
    let fingerprint_body = section.fingerprint_body.unwrap_or(defaults::FINGERPRINT_BODY);
    let (release_statuses, unknown_statuses) = statuses(key, section)?;
    let replay_header = {
        let name = section.replay_header.as_deref().unwrap_or(defaults::REPLAY_HEADER);
        HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| invalid(field("replay_header"), format!("`{name}` is not a header name")))?
    };
    let retry_hint_header = retry_hint_header(
        &field("retry_hint_header"),
        section.retry_hint_header.as_deref(),
        &replay_header,
    )?;
    Ok(Policy {
        enabled: section.enabled.unwrap_or(true),
        methods: methods(&field("methods"), section.methods.as_deref())?,
        require_key: section.require_key.unwrap_or(false),
        scope_header,
        key_ttl,
        lock_ttl,
        on_conflict: section.on_conflict.unwrap_or(defaults::ON_CONFLICT),
        wait_timeout: section.wait_timeout.unwrap_or(defaults::WAIT_TIMEOUT),
        store_failure: section.store_failure.unwrap_or(defaults::STORE_FAILURE),
        max_body_bytes,
        max_response_bytes: section.max_response_bytes.unwrap_or(defaults::MAX_RESPONSE_BYTES),
        record_server_errors: section.record_server_errors.unwrap_or(true),
        unknown_outcome: section.unknown_outcome.unwrap_or(defaults::UNKNOWN_OUTCOME),
        key_sources,
        buffer_bytes: match section.buffer_bytes.unwrap_or(defaults::BUFFER_BYTES) {
            0 => return Err(invalid(field("buffer_bytes"), "must be greater than zero")),
            n => n,
        },
        fingerprint_ignore: fingerprint_ignore(key, fingerprint_body, section.fingerprint_ignore.as_deref())?,
        fingerprint_body,
        replay_header,
        release_statuses,
        unknown_statuses,
        error_format: section.error_format.unwrap_or(defaults::ERROR_FORMAT),
        retry_hint_header,
    })
}

/// `key_sources` (docs/behaviour.md §13): at least one, each once; the `Idempotency-Key`
/// header by default.
fn key_sources(key: &str, list: Option<&[String]>) -> Result<Vec<KeySource>, ConfigError> {
    let Some(list) = list else {
        return Ok(vec![KeySource::default_header()]);
    };
    if list.is_empty() {
        return Err(invalid(key, "must name at least one source"));
    }
    let mut sources: Vec<KeySource> = Vec::with_capacity(list.len());
    for spec in list {
        let source = KeySource::parse(spec).map_err(|message| invalid(key, message))?;
        if sources.contains(&source) {
            return Err(invalid(key, format!("`{source}` is listed twice")));
        }
        sources.push(source);
    }
    Ok(sources)
}

/// `fingerprint_ignore`: JSON pointers, only meaningful with `fingerprint_body = "json"`.
fn fingerprint_ignore(
    key: &str,
    body: FingerprintBody,
    list: Option<&[String]>,
) -> Result<Vec<JsonPointer>, ConfigError> {
    let field = format!("{key}.fingerprint_ignore");
    let list = list.unwrap_or_default();
    if !list.is_empty() && body != FingerprintBody::Json {
        return Err(invalid(
            field,
            "needs `fingerprint_body = \"json\"` (a byte fingerprint has no fields to leave out)",
        ));
    }
    list.iter()
        .map(|text| JsonPointer::parse(text.trim()).map_err(|message| invalid(&field, message)))
        .collect()
}

/// `release_statuses` and `unknown_statuses` (docs/behaviour.md §14): statuses 100-599, none in
/// both lists. The default release list (429, 503) yields to a status listed as unknown.
fn statuses(key: &str, section: &PolicySection) -> Result<(StatusSet, StatusSet), ConfigError> {
    let set = |name: &str, codes: &[u16]| {
        StatusSet::of(codes).map_err(|code| {
            invalid(
                format!("{key}.{name}"),
                format!("{code} is not an HTTP status (100-599)"),
            )
        })
    };
    let unknown = set(
        "unknown_statuses",
        section.unknown_statuses.as_ref().map_or(&[][..], |list| &list.0),
    )?;
    let release = match &section.release_statuses {
        Some(list) => set("release_statuses", &list.0)?,
        None => {
            return Ok((
                set("release_statuses", &defaults::RELEASE_STATUSES)?.without(&unknown),
                unknown,
            ))
        }
    };
    if let Some(code) = release.overlap(&unknown) {
        return Err(invalid(
            format!("{key}.release_statuses"),
            format!("{code} is also in `{key}.unknown_statuses`: a status is either released or unknown"),
        ));
    }
    Ok((release, unknown))
}

/// `retry_hint_header`: a header name the proxy does not set for its own purposes (framing,
/// `Content-Type`, `Retry-After`, `Link`, the route's replay marker `replay_header`) and that
/// is not hop-by-hop.
fn retry_hint_header(
    key: &str,
    name: Option<&str>,
    replay_header: &HeaderName,
) -> Result<Option<HeaderName>, ConfigError> {
    let Some(name) = name else {
        return Ok(None);
    };
    let header = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| invalid(key, format!("`{name}` is not a header name")))?;
    if !is_replayed(&header) || [CONTENT_TYPE, RETRY_AFTER, LINK, VIA].contains(&header) || header == replay_header {
        return Err(invalid(
            key,
            format!("`{name}` is a field the proxy sets itself or a hop-by-hop field: choose another name"),
        ));
    }
    Ok(Some(header))
}

/// The guarded methods: POST and PATCH only, POST by default.
fn methods(key: &str, list: Option<&[String]>) -> Result<Vec<Method>, ConfigError> {
    let Some(list) = list else {
        return Ok(vec![Method::POST]);
    };
    if list.is_empty() {
        return Err(invalid(key, "must name at least one method"));
    }
    list.iter()
        .map(|m| match m.trim().to_ascii_uppercase().as_str() {
            "POST" => Ok(Method::POST),
            "PATCH" => Ok(Method::PATCH),
            other => Err(invalid(
                key,
                format!("`{other}` cannot be guarded: POST and PATCH are the non-idempotent methods"),
            )),
        })
        .collect()
}

/// `key_ttl` and `lock_ttl`. An unset `lock_ttl` follows a `key_ttl` shorter than its default;
/// one that is set must lie between [`defaults::MIN_LOCK_TTL`] and `key_ttl`.
fn ttls(key: &str, route: &str, section: &PolicySection) -> Result<(Duration, Duration), ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let key_ttl = positive(&field("key_ttl"), section.key_ttl.unwrap_or(defaults::KEY_TTL))?;
    let Some(lock_ttl) = section.lock_ttl else {
        if key_ttl < defaults::MIN_LOCK_TTL {
            return Err(invalid(
                field("key_ttl"),
                format!(
                    "route `{route}`: key_ttl {} is shorter than the shortest lock_ttl, {}",
                    humantime::format_duration(key_ttl),
                    humantime::format_duration(defaults::MIN_LOCK_TTL),
                ),
            ));
        }
        return Ok((key_ttl, defaults::LOCK_TTL.min(key_ttl)));
    };
    let lock_ttl = positive(&field("lock_ttl"), lock_ttl)?;
    if lock_ttl < defaults::MIN_LOCK_TTL {
        return Err(invalid(field("lock_ttl"), "must be at least 100ms"));
    }
    if lock_ttl > key_ttl {
        return Err(invalid(
            field("lock_ttl"),
            format!(
                "route `{route}`: lock_ttl {} must not exceed key_ttl {}",
                humantime::format_duration(lock_ttl),
                humantime::format_duration(key_ttl),
            ),
        ));
    }
    Ok((key_ttl, lock_ttl))
}
