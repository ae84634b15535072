//! The example configuration (`config/idemproxy.toml`) stays valid and complete, config errors
//! name the key at fault, and the binary's `--check-config` applies env and flags over the file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use http::Method;
use idemproxy::config::{defaults, LogFormat, OnConflict, StoreFailure, StoreSettings, UnknownOutcome};
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
    }
}

/// Every key of `src/config/file.rs` appears in the example, set or commented out.
#[test]
fn example_covers_every_setting() {
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
                "key_prefix",
                "embedded",
                "data_dir",
                "max_disk_bytes",
                "memory_max_entries",
                "command_timeout",
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
    assert_eq!(config.admin_token.as_deref(), Some("change-me"));
    let payments = config.route_for("/payments").expect("a route");
    assert_eq!(payments.upstream.authority.as_str(), "127.0.0.1:3001");
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

#[test]
fn check_config_accepts_the_example() {
    let output = check_config(Path::new(EXAMPLE), &[], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("OK (3 route(s))"), "{stdout}");
}

#[test]
fn check_config_refuses_a_broken_file_naming_the_key() {
    let file = temp_config("upstream.url = \"http://127.0.0.1:3000\"\n[idempotency]\non_conflict = \"sometimes\"\n");
    let output = check_config(file.path(), &[], &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("idempotency.on_conflict"),
        "{}",
        stderr(&output)
    );

    let file = temp_config("[upstream]\nurl = \"http://127.0.0.1:3000\"\ntimeout_ms = 5\n");
    let output = check_config(file.path(), &[], &[]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("timeout_ms"), "{}", stderr(&output));
}

#[test]
fn env_and_flags_override_the_file() {
    let file = temp_config("[idempotency]\nrequire_key = true\n");
    let output = check_config(file.path(), &[], &[]);
    assert!(!output.status.success(), "no upstream anywhere");
    assert!(stderr(&output).contains("upstream.url"), "{}", stderr(&output));

    let output = check_config(file.path(), &[("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")], &[]);
    assert!(output.status.success(), "{}", stderr(&output));

    let output = check_config(file.path(), &[], &["--upstream", "http://127.0.0.1:9"]);
    assert!(output.status.success(), "{}", stderr(&output));

    // The flag wins over the env, which wins over the file.
    let bad = temp_config("upstream.url = \"ftp://127.0.0.1:21\"\n");
    let output = check_config(bad.path(), &[], &[]);
    assert!(stderr(&output).contains("upstream.url"), "{}", stderr(&output));
    let output = check_config(bad.path(), &[("IDEMPROXY_UPSTREAM", "http://127.0.0.1:9")], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = check_config(
        bad.path(),
        &[("IDEMPROXY_UPSTREAM", "ftp://127.0.0.1:21")],
        &["--upstream", "http://127.0.0.1:9"],
    );
    assert!(output.status.success(), "{}", stderr(&output));

    // An invalid value from the env is refused under the key it sets.
    let output = check_config(Path::new(EXAMPLE), &[("IDEMPROXY_ON_CONFLICT", "sometimes")], &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("idempotency.on_conflict"),
        "{}",
        stderr(&output)
    );
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
    let output = check_config(Path::new(EXAMPLE), &[], &["--log-filter", "idemproxy=loud"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`log.filter`"), "{}", stderr(&output));

    let output = check_config(
        Path::new(EXAMPLE),
        &[],
        &["--redis", "redis://:s3cret@redis.internal:port"],
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`store.redis`"), "{}", stderr(&output));
    assert!(!stderr(&output).contains("s3cret"), "{}", stderr(&output));

    let output = check_config(
        Path::new(EXAMPLE),
        &[("IDEMPROXY_REDIS", "redis+cluster://:s3cret@a:7000,b:x")],
        &[],
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`store.redis`"), "{}", stderr(&output));
    assert!(!stderr(&output).contains("s3cret"), "{}", stderr(&output));

    // A well-formed URL is accepted without connecting to it.
    let output = check_config(
        Path::new(EXAMPLE),
        &[],
        &["--redis", "redis+cluster://127.0.0.1:1,127.0.0.1:2"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn a_shorter_key_ttl_alone_shortens_the_lease() {
    let file = temp_config("");
    let output = check_config(
        file.path(),
        &[],
        &["--upstream", "http://127.0.0.1:9", "--key-ttl", "2s"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let output = check_config(Path::new(EXAMPLE), &[], &["--key-ttl", "2s"]);
    assert!(output.status.success(), "{}", stderr(&output));

    let output = check_config(
        file.path(),
        &[],
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--key-ttl",
            "2s",
            "--lock-ttl",
            "30s",
        ],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("route `default`: lock_ttl 30s must not exceed key_ttl 2s"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn listen_addresses_may_name_a_host() {
    let output = check_config(
        Path::new(EXAMPLE),
        &[],
        &["--listen", "localhost:8080", "--admin-listen", "localhost:9090"],
    );
    assert!(output.status.success(), "{}", stderr(&output));

    let output = check_config(
        Path::new(EXAMPLE),
        &[("IDEMPROXY_LISTEN", "no-such-host.invalid:8080")],
        &[],
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`listen`"), "{}", stderr(&output));
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

    let output = check_config(
        Path::new(EXAMPLE),
        &[],
        &["--on-conflict", "wait", "--log-format", "pretty"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
}
