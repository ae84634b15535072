//! The example configuration (`config/idemproxy.toml`) stays valid and complete, config errors
//! name the key at fault, and the binary's `--check-config` applies env and flags over the file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use http::Method;
use idemproxy::config::{
    defaults, ErrorFormat, FingerprintBody, KeySource, LogFormat, OnConflict, StatusSet, StoreFailure, StoreSettings,
    UnknownOutcome,
};
use idemproxy::Config;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/idemproxy.toml");

fn example_text() -> String {
    std::fs::read_to_string(EXAMPLE).expect("config/idemproxy.toml is readable")
}

fn example() -> Config {
    Config::from_toml(&example_text()).unwrap_or_else(|err| panic!("config/idemproxy.toml is invalid: {err}"))
}

/// The error a config text fails with, as the operator reads it.
fn config_error(text: &str) -> String {
    match Config::from_toml(text) {
        Ok(_) => panic!("expected this config to be refused:\n{text}"),
        Err(err) => err.to_string(),
    }
}

/// Whether a line is a setting left off in the example: `# key = value`.
fn commented_setting(line: &str) -> Option<&str> {
    let setting = line.strip_prefix("# ")?;
    let (key, _) = setting.split_once(" = ")?;
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    is_key.then_some(setting)
}

#[test]
fn example_routes_resolve_with_their_policies() {
    let config = example();
    let names: Vec<&str> = config.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["payments", "search", "default"], "longest prefix first");

    let payments = config.route_for("/payments/42/capture").expect("a route");
    assert_eq!(&*payments.name, "payments");
    assert!(payments.policy.require_key);
    assert!(payments.policy.guards(&Method::POST));
    assert_eq!(payments.upstream.authority.as_str(), "127.0.0.1:3000");

    let search = config.route_for("/search").expect("a route");
    assert_eq!(&*search.name, "search");
    assert!(!search.policy.enabled);
    assert!(!search.policy.guards(&Method::POST), "a disabled route guards nothing");

    let default = config.route_for("/orders").expect("the catch-all");
    assert_eq!(&*default.name, "default");
    assert_eq!(default.prefix, "/");
    assert!(!default.policy.require_key);
    assert!(default.policy.guards(&Method::POST));
    assert!(!default.policy.guards(&Method::PATCH));
}

#[test]
fn longest_prefix_wins_at_segment_boundaries() {
    let config = example();
    let route = |path: &str| config.route_for(path).map(|r| r.name.to_string());
    assert_eq!(route("/payments").as_deref(), Some("payments"));
    assert_eq!(route("/payments/").as_deref(), Some("payments"));
    assert_eq!(route("/paymentsx").as_deref(), Some("default"));
    assert_eq!(route("/search/users").as_deref(), Some("search"));
    assert_eq!(route("/").as_deref(), Some("default"));
}

#[test]
fn example_states_the_defaults() {
    let config = example();
    assert_eq!(config.listen.to_string(), defaults::LISTEN);
    assert_eq!(
        config.admin_listen.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9090")
    );
    assert_eq!(config.admin_token, None);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.log_filter, "info");
    assert!(config.tls.is_none(), "TLS is commented out");
    assert!(
        matches!(
            config.store,
            StoreSettings::Disk { ref data_dir, max_disk_bytes }
                if data_dir == std::path::Path::new(defaults::DATA_DIR) && max_disk_bytes == defaults::MAX_DISK_BYTES
        ),
        "the embedded store, on disk: {:?}",
        config.store
    );
    assert_eq!(config.key_prefix, defaults::KEY_PREFIX);
    assert_eq!(config.server.header_read_timeout, defaults::HEADER_READ_TIMEOUT);
    assert_eq!(config.server.body_read_timeout, defaults::BODY_READ_TIMEOUT);
    assert_eq!(config.server.shutdown_grace, defaults::SHUTDOWN_GRACE);
    assert_eq!(config.server.max_connections, defaults::MAX_CONNECTIONS);
    assert_eq!(config.server.max_header_bytes, defaults::MAX_HEADER_BYTES);
    assert_eq!(config.server.max_headers, defaults::MAX_HEADERS);
    assert_eq!(
        config.server.http2_max_concurrent_streams,
        defaults::HTTP2_MAX_CONCURRENT_STREAMS
    );
    assert_eq!(config.upstream.connect_timeout, defaults::CONNECT_TIMEOUT);
    assert_eq!(config.upstream.pool_idle_timeout, defaults::POOL_IDLE_TIMEOUT);
    assert_eq!(config.upstream.pool_max_idle_per_host, defaults::POOL_MAX_IDLE_PER_HOST);
    assert_eq!(config.upstream.ca_file, None);

    let built_in = Config::from_toml("upstream.url = \"http://127.0.0.1:3000\"").expect("valid");
    let expected = &built_in.routes[0].policy;
    for route in config.routes.iter() {
        let policy = &route.policy;
        assert_eq!(route.timeout, defaults::UPSTREAM_TIMEOUT, "{}", route.name);
        assert!(!route.preserve_host, "{}", route.name);
        assert_eq!(policy.methods, expected.methods, "{}", route.name);
        assert_eq!(policy.scope_header, expected.scope_header, "{}", route.name);
        assert_eq!(policy.key_ttl, defaults::KEY_TTL, "{}", route.name);
        assert_eq!(policy.lock_ttl, defaults::LOCK_TTL, "{}", route.name);
        assert_eq!(policy.on_conflict, OnConflict::Reject, "{}", route.name);
        assert_eq!(policy.wait_timeout, defaults::WAIT_TIMEOUT, "{}", route.name);
        assert_eq!(policy.store_failure, StoreFailure::Closed, "{}", route.name);
        assert_eq!(policy.max_body_bytes, defaults::MAX_BODY_BYTES, "{}", route.name);
        assert_eq!(
            policy.max_response_bytes,
            defaults::MAX_RESPONSE_BYTES,
            "{}",
            route.name
        );
        assert!(policy.record_server_errors, "{}", route.name);
        assert_eq!(policy.unknown_outcome, UnknownOutcome::Reject, "{}", route.name);
        assert_eq!(policy.key_sources, expected.key_sources, "{}", route.name);
        assert_eq!(policy.buffer_bytes, defaults::BUFFER_BYTES, "{}", route.name);
        assert_eq!(policy.fingerprint_body, FingerprintBody::Bytes, "{}", route.name);
        assert!(policy.fingerprint_ignore.is_empty(), "{}", route.name);
        assert_eq!(policy.replay_header, defaults::REPLAY_HEADER, "{}", route.name);
        assert_eq!(policy.release_statuses, expected.release_statuses, "{}", route.name);
        assert_eq!(policy.unknown_statuses, StatusSet::default(), "{}", route.name);
        assert_eq!(policy.error_format, ErrorFormat::Problem, "{}", route.name);
        assert_eq!(policy.retry_hint_header, None, "{}", route.name);
    }
    assert_eq!(expected.key_sources, [KeySource::default_header()]);
    assert_eq!(
        expected.release_statuses.codes().collect::<Vec<_>>(),
        defaults::RELEASE_STATUSES
    );
}

/// The keys of the example, by section, that `example_covers_every_setting` looks for.
const SETTINGS: &[(&str, &[&str])] = &[
    ("", &["listen", "admin_listen", "admin_token"]),
    ("[log]", &["format", "filter"]),
    (
        "[server]",
        &[
            "header_read_timeout",
            "body_read_timeout",
            "http2_keepalive_interval",
            "shutdown_grace",
            "max_connections",
            "max_header_bytes",
            "max_headers",
            "http2_max_concurrent_streams",
        ],
    ),
    ("[tls]", &["cert", "key"]),
    (
        "[store]",
        &[
            "redis",
            "ca_file",
            "sentinel_password",
            "key_prefix",
            "embedded",
            "data_dir",
            "max_disk_bytes",
            "memory_max_entries",
            "command_timeout",
            "min_replicas",
            "replica_timeout",
        ],
    ),
    (
        "[upstream]",
        &[
            "url",
            "connect_timeout",
            "timeout",
            "pool_idle_timeout",
            "pool_max_idle_per_host",
            "preserve_host",
            "ca_file",
        ],
    ),
    (
        "[idempotency]",
        &[
            "enabled",
            "methods",
            "require_key",
            "scope_header",
            "key_ttl",
            "lock_ttl",
            "on_conflict",
            "wait_timeout",
            "store_failure",
            "max_body_bytes",
            "max_response_bytes",
            "record_server_errors",
            "unknown_outcome",
            "release_statuses",
            "unknown_statuses",
            "key_sources",
            "buffer_bytes",
            "fingerprint_body",
            "fingerprint_ignore",
            "replay_header",
            "error_format",
            "retry_hint_header",
        ],
    ),
    (
        "[[route]]",
        &[
            "name",
            "prefix",
            "upstream",
            "preserve_host",
            "timeout",
            "idempotency.require_key",
            "idempotency.enabled",
        ],
    ),
];

/// Every key of `src/config/file.rs` appears in the example, set or commented out.
#[test]
fn example_covers_every_setting() {
    let text = example_text();
    let mut section = "";
    let mut found: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let setting = commented_setting(line).unwrap_or(line);
        if let Some((key, _)) = setting.split_once(" = ") {
            if !setting.starts_with('#') {
                found.push((section.to_owned(), key.to_owned()));
            }
        }
    }
    for (section, keys) in SETTINGS {
        for key in *keys {
            assert!(
                found.iter().any(|(s, k)| s == section && k == key),
                "config/idemproxy.toml does not mention `{key}` in {section:?}"
            );
        }
    }
}

/// Enabling every commented-out setting still gives a valid configuration, so the examples
/// left off are correct too (TLS files and Redis are not touched by parsing).
#[test]
fn commented_out_settings_are_valid_when_enabled() {
    let text = example_text();
    let enabled: String = text
        .lines()
        .map(|line| commented_setting(line).unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(
        enabled,
        text.lines().collect::<Vec<_>>().join("\n"),
        "some settings are commented out"
    );
    let config = Config::from_toml(&enabled).unwrap_or_else(|err| panic!("{err}\n{enabled}"));
    assert!(config.tls.is_some());
    assert!(
        matches!(config.store, StoreSettings::Redis { command_timeout, .. } if command_timeout == Duration::from_secs(2))
    );
    assert!(
        matches!(&config.store, StoreSettings::Redis { url, sentinel_password: Some(_), .. } if url.starts_with("rediss+sentinel://"))
    );
    assert_eq!(config.admin_token.as_deref(), Some("change-me"));
    let payments = config.route_for("/payments").expect("a route");
    assert_eq!(payments.upstream.authority.as_str(), "127.0.0.1:3001");
    let sources: Vec<&str> = payments.policy.key_sources.iter().map(KeySource::label).collect();
    assert_eq!(sources, ["header:idempotency-key", "json:/client_order_id"]);
    assert_eq!(payments.policy.fingerprint_body, FingerprintBody::Json);
    assert_eq!(payments.policy.fingerprint_ignore[0].as_str(), "/sent_at");
}

/// The settings of docs/behaviour.md §13-§14 are refused at start-up, by key, when they cannot
/// work: a bad pointer, an unknown source kind, a status outside 100-599, a status both
/// released and unknown.
#[test]
fn key_source_fingerprint_and_status_settings_are_checked() {
    let base = "upstream.url = \"http://127.0.0.1:3000\"\n[idempotency]\n";
    let refused = [
        (
            "key_sources = [\"json:client_order_id\"]",
            "`idempotency.key_sources`",
            "must start with `/`",
        ),
        (
            "key_sources = [\"json:/a~2\"]",
            "`idempotency.key_sources`",
            "`~` must be followed by `0` or `1`",
        ),
        (
            "key_sources = [\"cookie:sid\"]",
            "`idempotency.key_sources`",
            "unknown key source kind `cookie`",
        ),
        ("key_sources = []", "`idempotency.key_sources`", "at least one"),
        (
            "key_sources = [\"query:a\", \"query:a\"]",
            "`idempotency.key_sources`",
            "listed twice",
        ),
        (
            "fingerprint_body = \"json\"\nfingerprint_ignore = [\"sent_at\"]",
            "`idempotency.fingerprint_ignore`",
            "must start with `/`",
        ),
        (
            "fingerprint_ignore = [\"/sent_at\"]",
            "`idempotency.fingerprint_ignore`",
            "fingerprint_body",
        ),
        ("fingerprint_body = \"yaml\"", "`idempotency.fingerprint_body`", "json"),
        (
            "release_statuses = [429, 600]",
            "`idempotency.release_statuses`",
            "600 is not an HTTP status",
        ),
        (
            "unknown_statuses = [99]",
            "`idempotency.unknown_statuses`",
            "99 is not an HTTP status",
        ),
        (
            "release_statuses = [503]\nunknown_statuses = [503, 504]",
            "`idempotency.release_statuses`",
            "503 is also in",
        ),
        (
            "replay_header = \"bad header\"",
            "`idempotency.replay_header`",
            "not a header name",
        ),
        ("buffer_bytes = 0", "`idempotency.buffer_bytes`", "greater than zero"),
    ];
    for (setting, key, message) in refused {
        let err = config_error(&format!("{base}{setting}\n"));
        assert!(err.contains(key) && err.contains(message), "{setting}: {err}");
    }
    // In a route, the error names the route's key.
    let err = config_error(&format!(
        "{base}[[route]]\nprefix = \"/a\"\nidempotency.unknown_statuses = [429]\nidempotency.release_statuses = [429]\n"
    ));
    assert!(err.contains("`route[0].idempotency.release_statuses`"), "{err}");
    // A status listed as unknown leaves the default release list; an explicit overlap does not.
    let config = Config::from_toml(&format!("{base}unknown_statuses = [503, 504]\n")).expect("valid");
    let policy = &config.routes[0].policy;
    assert_eq!(policy.release_statuses.codes().collect::<Vec<_>>(), [429]);
    assert_eq!(policy.unknown_statuses.codes().collect::<Vec<_>>(), [503, 504]);
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let top = config_error("upstream.url = \"http://127.0.0.1:3000\"\nlisten_port = 8080\n");
    assert!(top.contains("listen_port"), "{top}");
    let section = config_error("upstream.url = \"http://127.0.0.1:3000\"\n[server]\nmax_conections = 5\n");
    assert!(section.contains("unknown field `max_conections`"), "{section}");
    let route = config_error(
        "upstream.url = \"http://127.0.0.1:3000\"\n[[route]]\nprefix = \"/a\"\nidempotency.requires_key = true\n",
    );
    assert!(route.contains("requires_key"), "{route}");
}

#[test]
fn bad_values_are_refused_by_key() {
    let policy = config_error("upstream.url = \"http://127.0.0.1:3000\"\n[idempotency]\nstore_failure = \"maybe\"\n");
    assert!(policy.contains("idempotency.store_failure"), "{policy}");
    let route = config_error(
        "upstream.url = \"http://127.0.0.1:3000\"\n[[route]]\nprefix = \"/a\"\nidempotency.lock_ttl = \"48h\"\n",
    );
    assert!(route.contains("route[0].idempotency.lock_ttl"), "{route}");
    let duration = config_error("upstream.url = \"http://127.0.0.1:3000\"\n[idempotency]\nkey_ttl = \"forever\"\n");
    assert!(
        duration.contains("key_ttl") && duration.contains("expected a duration"),
        "{duration}"
    );
    let url = config_error("upstream.url = \"ftp://127.0.0.1:3000\"\n");
    assert!(url.contains("upstream.url"), "{url}");
    let prefix = config_error("upstream.url = \"http://127.0.0.1:3000\"\n[store]\nkey_prefix = \"a{b}\"\n");
    assert!(prefix.contains("store.key_prefix"), "{prefix}");
}

/// The binary with no `IDEMPROXY_*` variable from the environment the tests run in.
fn idemproxy() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IDEMPROXY_") {
            command.env_remove(name);
        }
    }
    command
}

fn check_config(path: &Path, env: &[(&str, &str)], flags: &[&str]) -> Output {
    let mut command = idemproxy();
    command.arg("--check-config").arg(path).args(flags);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("the idemproxy binary runs")
}

fn temp_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("a temp file");
    file.write_all(text.as_bytes()).expect("written");
    file
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `--check-config` accepts `path` under `env` and `flags`.
fn assert_accepted(path: &Path, env: &[(&str, &str)], flags: &[&str]) {
    let output = check_config(path, env, flags);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// `--check-config` refuses `path` under `env` and `flags` with an error that names `expected`;
/// returns the error output.
fn assert_refused(path: &Path, env: &[(&str, &str)], flags: &[&str], expected: &str) -> String {
    let output = check_config(path, env, flags);
    let err = stderr(&output);
    assert!(!output.status.success(), "accepted: {err}");
    assert!(err.contains(expected), "{err}");
    err
}

#[test]
fn check_config_accepts_the_example() {
    let output = check_config(Path::new(EXAMPLE), &[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("OK (3 route(s))"), "{stdout}");
}

#[test]
fn check_config_refuses_a_broken_file_naming_the_key() {
    for (text, key) in [
        (
            "upstream.url = \"http://127.0.0.1:3000\"\n[idempotency]\non_conflict = \"sometimes\"\n",
            "idempotency.on_conflict",
        ),
        (
            "[upstream]\nurl = \"http://127.0.0.1:3000\"\ntimeout_ms = 5\n",
            "timeout_ms",
        ),
    ] {
        let file = temp_config(text);
        assert_refused(file.path(), &[], &[], key);
    }
}

#[test]
fn env_and_flags_override_the_file() {
    let file = temp_config("[idempotency]\nrequire_key = true\n");
    // No upstream anywhere, then one from the env, then one from a flag.
    assert_refused(file.path(), &[], &[], "upstream.url");
    assert_accepted(file.path(), &[("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")], &[]);
    assert_accepted(file.path(), &[], &["--upstream", "http://127.0.0.1:9"]);

    // The flag wins over the env, which wins over the file.
    let bad = temp_config("upstream.url = \"ftp://127.0.0.1:21\"\n");
    assert_refused(bad.path(), &[], &[], "upstream.url");
    assert_accepted(bad.path(), &[("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")], &[]);
    let ftp_env = [("IDEMPROXY_UPSTREAM", "ftp://127.0.0.1:21")];
    assert_accepted(bad.path(), &ftp_env, &["--upstream", "http://127.0.0.1:9"]);

    // An invalid value from the env is refused under the key it sets.
    let on_conflict = [("IDEMPROXY_ON_CONFLICT", "sometimes")];
    assert_refused(Path::new(EXAMPLE), &on_conflict, &[], "idempotency.on_conflict");
}

/// Environment variables and flags a `--check-config` run gets.
type Overrides<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn check_config_takes_the_new_policy_settings_from_env_and_flags() {
    let accepted: &[Overrides] = &[
        (
            &[],
            &[
                "--key-source",
                "header:X-Request-Id",
                "--key-source",
                "json:/client_order_id",
            ],
        ),
        (
            &[("IDEMPROXY_KEY_SOURCES", "query:rid,json:/order/id")],
            &["--buffer-bytes", "65536"],
        ),
        (
            &[],
            &[
                "--fingerprint-body",
                "json",
                "--fingerprint-ignore",
                "/sent_at",
                "--fingerprint-ignore",
                "/trace",
            ],
        ),
        (
            &[
                ("IDEMPROXY_FINGERPRINT_BODY", "json"),
                ("IDEMPROXY_FINGERPRINT_IGNORE", "/sent_at,/trace"),
            ],
            &[],
        ),
        (
            &[],
            &[
                "--replay-header",
                "X-Replayed",
                "--release-statuses",
                "429",
                "--unknown-statuses",
                "502,504",
            ],
        ),
        (&[("IDEMPROXY_RELEASE_STATUSES", "")], &["--unknown-statuses", "none"]),
        (&[], &["--release-statuses", "none", "--unknown-statuses", "429,503"]),
    ];
    for (env, flags) in accepted {
        let output = check_config(Path::new(EXAMPLE), env, flags);
        assert!(output.status.success(), "{env:?} {flags:?}: {}", stderr(&output));
    }
}

#[test]
fn check_config_refuses_bad_new_policy_settings_by_key() {
    let refused: &[(Overrides, &str)] = &[
        (
            (&[("IDEMPROXY_KEY_SOURCES", "header:X-Request-Id,cookie:sid")], &[]),
            "`idempotency.key_sources`",
        ),
        (
            (&[], &["--key-source", "json:client_order_id"]),
            "`idempotency.key_sources`",
        ),
        (
            (&[], &["--unknown-statuses", "503", "--release-statuses", "429,503"]),
            "`idempotency.release_statuses`",
        ),
        (
            (&[("IDEMPROXY_UNKNOWN_STATUSES", "700")], &[]),
            "`idempotency.unknown_statuses`",
        ),
        (
            (&[], &["--fingerprint-ignore", "/sent_at"]),
            "`idempotency.fingerprint_ignore`",
        ),
        (
            (&[("IDEMPROXY_FINGERPRINT_BODY", "xml")], &[]),
            "idempotency.fingerprint_body",
        ),
    ];
    for ((env, flags), key) in refused {
        let output = check_config(Path::new(EXAMPLE), env, flags);
        assert!(!output.status.success(), "{env:?} {flags:?}");
        assert!(stderr(&output).contains(key), "{key}: {}", stderr(&output));
    }
}

/// Every key of the file form (`FileConfig::keys`, outside `[[route]]`) appears in the example,
/// set or commented out, so a new setting cannot go undocumented there.
#[test]
fn example_covers_every_key_of_the_file_form() {
    let text = example_text();
    let mut section = String::new();
    let mut found: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let setting = commented_setting(line).unwrap_or(line);
        if let Some((key, _)) = setting.split_once(" = ") {
            if !setting.starts_with('#') {
                found.push(if section.is_empty() {
                    key.to_owned()
                } else {
                    format!("{section}.{key}")
                });
            }
        }
    }
    let keys = idemproxy::config::FileConfig::keys();
    assert!(keys.len() > 40, "{keys:?}");
    for key in keys {
        assert!(found.contains(&key), "config/idemproxy.toml does not mention `{key}`");
    }
}

#[test]
fn check_config_refuses_what_would_stop_the_proxy_from_starting() {
    let example = Path::new(EXAMPLE);
    assert_refused(example, &[], &["--log-filter", "idemproxy=loud"], "`log.filter`");

    // A Redis URL that cannot be used is refused without showing its password.
    let from_flag = assert_refused(
        example,
        &[],
        &["--redis", "redis://:s3cret@redis.internal:port"],
        "`store.redis`",
    );
    let from_env = assert_refused(
        example,
        &[("IDEMPROXY_REDIS", "redis+cluster://:s3cret@a:7000,b:x")],
        &[],
        "`store.redis`",
    );
    for err in [from_flag, from_env] {
        assert!(!err.contains("s3cret"), "{err}");
    }

    let err = assert_refused(
        example,
        &[(
            "IDEMPROXY_REDIS",
            "redis+sentinel://app:s3cret@127.0.0.1:1,127.0.0.1:x/idem",
        )],
        &[],
        "`store.redis`",
    );
    assert!(err.contains("sentinel 2"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    assert_refused(
        example,
        &[],
        &[
            "--redis",
            "redis://127.0.0.1:1",
            "--redis-min-replicas",
            "1",
            "--redis-replica-timeout",
            "3s",
        ],
        "`store.replica_timeout`",
    );

    // Well-formed URLs are accepted without connecting to them.
    assert_accepted(example, &[], &["--redis", "redis+cluster://127.0.0.1:1,127.0.0.1:2"]);
    assert_accepted(
        example,
        &[
            ("IDEMPROXY_SENTINEL_PASSWORD", "s3cret"),
            ("IDEMPROXY_REDIS_MIN_REPLICAS", "1"),
        ],
        &["--redis", "redis+sentinel://127.0.0.1:1,127.0.0.1:2/idem/1"],
    );
}

#[test]
fn a_shorter_key_ttl_alone_shortens_the_lease() {
    let file = temp_config("");
    assert_accepted(
        file.path(),
        &[],
        &["--upstream", "http://127.0.0.1:9", "--key-ttl", "2s"],
    );
    assert_accepted(Path::new(EXAMPLE), &[], &["--key-ttl", "2s"]);

    let lock_ttl_over_key_ttl = [
        "--upstream",
        "http://127.0.0.1:9",
        "--key-ttl",
        "2s",
        "--lock-ttl",
        "30s",
    ];
    assert_refused(
        file.path(),
        &[],
        &lock_ttl_over_key_ttl,
        "route `default`: lock_ttl 30s must not exceed key_ttl 2s",
    );
}

#[test]
fn listen_addresses_may_name_a_host() {
    let example = Path::new(EXAMPLE);
    assert_accepted(
        example,
        &[],
        &["--listen", "localhost:8080", "--admin-listen", "localhost:9090"],
    );
    let unknown_host = [("IDEMPROXY_LISTEN", "no-such-host.invalid:8080")];
    assert_refused(example, &unknown_host, &[], "`listen`");
}

#[test]
fn a_bad_enumerated_flag_is_a_clap_error() {
    let output = check_config(Path::new(EXAMPLE), &[], &["--on-conflict", "sometimes"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("--on-conflict") && err.contains("[possible values: reject, wait]"),
        "{err}"
    );

    assert_accepted(
        Path::new(EXAMPLE),
        &[],
        &["--on-conflict", "wait", "--log-format", "pretty"],
    );
}
