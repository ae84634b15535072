//! `idemproxy key show|clear` (docs/behaviour.md §10.4), black-box: the real binary runs the
//! proxy from a config file, and the key tool, another run of the same binary, finds the proxy's
//! admin listener in that file and reaches a key with only what the client sent.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{free_port, ProxyProcess, TestClient, TestUpstream};
use http::{Method, StatusCode};
use idemproxy::idempotency::StorageKey;

const TOKEN: &str = "s3cret-admin";

/// A proxy run from a config file with an admin listener (token protected), and that file.
struct Running {
    proxy: ProxyProcess,
    admin: String,
    config: tempfile::NamedTempFile,
}

async fn start_proxy(upstream: &TestUpstream) -> Running {
    start_proxy_with(upstream, "").await
}

/// [`start_proxy`] with `extra` appended to its config file.
async fn start_proxy_with(upstream: &TestUpstream, extra: &str) -> Running {
    let admin = format!("127.0.0.1:{}", free_port());
    let config = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(
        config.path(),
        format!(
            "upstream.url = \"{}\"\nupstream.timeout = \"300ms\"\nadmin_listen = \"{admin}\"\nadmin_token = \"{TOKEN}\"\n{extra}",
            upstream.url()
        ),
    )
    .expect("write the config");
    let proxy = ProxyProcess::spawn(&["--config", &config.path().display().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&admin).is_err() {
        assert!(Instant::now() < deadline, "the admin listener did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Running { proxy, admin, config }
}

/// Runs `idemproxy key …` with `args`, none of the `IDEMPROXY_*` variables of the environment.
async fn key_tool(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .arg("key")
        .args(args)
        .env_remove("IDEMPROXY_CONFIG")
        .env_remove("IDEMPROXY_ADMIN_LISTEN")
        .env_remove("IDEMPROXY_ADMIN_TOKEN")
        .env_remove("IDEMPROXY_KEY_SCOPE")
        .output()
        .await
        .expect("the key tool runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test]
async fn an_outcome_unknown_key_is_found_and_cleared_with_what_the_client_sent() {
    let upstream = TestUpstream::start().await;
    let running = start_proxy(&upstream).await;
    let client = TestClient::new();
    let url = running.proxy.url("/payments");
    let (key, scope) = ("\"pay/42 #1\"", "Bearer client 7+x==");
    let headers = [("idempotency-key", key), ("authorization", scope)];
    let timed_out = client
        .send(
            Method::POST,
            &url,
            &[headers[0], headers[1], ("x-upstream-delay-ms", "600")],
            "{}",
        )
        .await;
    assert!(timed_out.problem_type().ends_with("#outcome-unknown"), "{timed_out:?}");
    let hash = StorageKey::new("", "default", scope.as_bytes(), b"pay/42 #1")
        .short_hash()
        .to_string();
    let config = path_arg(running.config.path());

    let shown = key_tool(&["show", key, "--scope", scope, "--config", &config]).await;
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    let summary = stdout(&shown);
    assert!(
        summary.contains(&format!("key hash    {hash}  (the `key` field of its log lines)")),
        "{summary}"
    );
    assert!(summary.contains("state       Unknown (cause Timeout)"), "{summary}");
    assert!(!summary.contains("client 7"), "the scope is not printed: {summary}");

    let json = key_tool(&[
        "show", key, "--scope", scope, "--route", "default", "--config", &config, "--json",
    ])
    .await;
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let record: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON on stdout");
    assert_eq!(record["state"], "Unknown");
    assert_eq!(record["key_hash"], hash.as_str());

    let other_scope = key_tool(&["show", key, "--config", &config]).await;
    assert_eq!(other_scope.status.code(), Some(1), "no such key without the scope");
    assert!(
        stdout(&other_scope).starts_with("no record for key"),
        "{}",
        stdout(&other_scope)
    );

    let cleared = key_tool(&["clear", key, "--scope", scope, "--config", &config]).await;
    assert_eq!(cleared.status.code(), Some(0), "{}", stderr(&cleared));
    let said = stdout(&cleared);
    assert!(
        said.starts_with(&format!(
            "cleared key {key} on route default (key hash {hash}; it was Unknown, cause Timeout)"
        )),
        "{said}"
    );
    let again = key_tool(&["clear", key, "--scope", scope, "--config", &config]).await;
    assert_eq!(again.status.code(), Some(1), "{}", stdout(&again));

    let retry = client.send(Method::POST, &url, &headers, "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED, "the key executes again once cleared");
    assert_eq!(upstream.hits(), 2);
    assert_shown_completed(&running, key, scope, &String::from_utf8_lossy(&retry.body)).await;
}

/// `key show --body`, with the admin listener and token on the command line, shows the key
/// completed with `body`.
async fn assert_shown_completed(running: &Running, key: &str, scope: &str, body: &str) {
    let admin = format!("http://{}", running.admin);
    let args = [
        "show", key, "--scope", scope, "--body", "--admin", &admin, "--token", TOKEN,
    ];
    let completed = key_tool(&args).await;
    assert_eq!(completed.status.code(), Some(0), "{}", stderr(&completed));
    let summary = stdout(&completed);
    assert!(summary.contains("state       Completed"), "{summary}");
    assert!(summary.contains(body), "{summary}");
}

#[tokio::test]
async fn the_key_tool_says_what_is_wrong_and_exits_2() {
    let upstream = TestUpstream::start().await;
    let running = start_proxy(&upstream).await;
    let admin = format!("http://{}", running.admin);
    let cases: [(&[&str], &str); 6] = [
        (&["show", "k"], "no admin listener to ask"),
        (&["show", "k", "--admin", &admin], "401 Unauthorized"),
        (
            &["show", "k", "--admin", &admin, "--token", "wrong"],
            "give the admin token",
        ),
        (&["show", "a b", "--admin", &admin], "is not a valid Idempotency-Key"),
        (&["show", "k", "--admin", "https://127.0.0.1:9"], "plain http://"),
        (&["show"], "<KEY>"),
    ];
    for (args, expected) in cases {
        let output = key_tool(args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
    let nobody = format!("127.0.0.1:{}", free_port());
    let refused = key_tool(&["show", "k", "--admin", &nobody, "--token", TOKEN]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("cannot reach the admin listener"),
        "{}",
        stderr(&refused)
    );

    // The proxy's own listener instead of the admin one: nothing is deleted through it.
    let proxy_listener = running.proxy.addr.to_string();
    let wrong = key_tool(&["clear", "k", "--admin", &proxy_listener, "--token", TOKEN]).await;
    assert_eq!(wrong.status.code(), Some(2));
    assert!(
        stderr(&wrong).contains("not an idemproxy admin listener"),
        "{}",
        stderr(&wrong)
    );
    assert!(
        upstream.requests().iter().all(|r| r.method != Method::DELETE),
        "no DELETE reached the upstream"
    );
}

/// A key from a JSON body field (docs/behaviour.md §13.4): `--source` names it, and the key is
/// the field's value as the client sent it; without `--source` the route's first source (the
/// header) is meant.
#[tokio::test]
async fn a_key_from_a_body_field_is_found_and_cleared_with_its_source() {
    let upstream = TestUpstream::start().await;
    let sources = "[idempotency]\nkey_sources = [\"header:Idempotency-Key\", \"json:/client_order_id\"]\n";
    let running = start_proxy_with(&upstream, sources).await;
    let client = TestClient::new();
    let url = running.proxy.url("/payments");
    let scope = "Bearer abc";
    let headers = [("content-type", "application/json"), ("authorization", scope)];
    let body = r#"{"client_order_id": "ord 7", "amount": 100}"#;
    let first = client.send(Method::POST, &url, &headers, body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let config = path_arg(running.config.path());
    let source = "json:/client_order_id";

    let shown = key_tool(&[
        "show", "ord 7", "--scope", scope, "--source", source, "--config", &config,
    ])
    .await;
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    let summary = stdout(&shown);
    assert!(summary.contains("source      json:/client_order_id"), "{summary}");
    assert!(summary.contains("state       Completed"), "{summary}");

    // As an Idempotency-Key, `ord 7` is malformed: the tool says so and names --source.
    let unsourced = key_tool(&["show", "ord 7", "--scope", scope, "--config", &config]).await;
    assert_eq!(unsourced.status.code(), Some(2));
    assert!(stderr(&unsourced).contains("--source"), "{}", stderr(&unsourced));
    // The same text as a header key is another key.
    let as_header = key_tool(&["show", "ord-7", "--scope", scope, "--config", &config]).await;
    assert_eq!(as_header.status.code(), Some(1), "{}", stdout(&as_header));
    // A source the route does not have, or no source at all.
    let elsewhere = key_tool(&["show", "ord 7", "--source", "query:id", "--config", &config]).await;
    assert_eq!(elsewhere.status.code(), Some(2));
    assert!(stderr(&elsewhere).contains("query:id"), "{}", stderr(&elsewhere));
    let nonsense = key_tool(&["show", "ord 7", "--source", "cookie:sid", "--config", &config]).await;
    assert_eq!(nonsense.status.code(), Some(2));
    assert!(
        stderr(&nonsense).contains("--source `cookie:sid`"),
        "{}",
        stderr(&nonsense)
    );

    let cleared = key_tool(&[
        "clear", "ord 7", "--scope", scope, "--source", source, "--config", &config,
    ])
    .await;
    assert_eq!(cleared.status.code(), Some(0), "{}", stderr(&cleared));
    assert!(
        stdout(&cleared).starts_with("cleared key ord 7 on route default"),
        "{}",
        stdout(&cleared)
    );
    let gone = key_tool(&[
        "show", "ord 7", "--scope", scope, "--source", source, "--config", &config,
    ])
    .await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stdout(&gone).starts_with("no record for key ord 7 from json:/client_order_id"),
        "{}",
        stdout(&gone)
    );
    let again = client.send(Method::POST, &url, &headers, body).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(
        again.header("idempotent-replayed"),
        None,
        "the key executes again once cleared"
    );
    assert_eq!(upstream.hits(), 2);
}
