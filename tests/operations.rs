//! Operating the proxy (docs/behaviour.md §10): routes with their own policies, the admin listener
//! (health, readiness, metrics, key lookup and clearing) and the JSON request log.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, RedisServer, TestClient, TestProxy, TestUpstream};
use http::{Method, StatusCode};

#[tokio::test]
async fn longest_prefix_route_applies_its_own_policy() {
    let payments = TestUpstream::start().await;
    let search = TestUpstream::start().await;
    let fallback = TestUpstream::start().await;
    let proxy = TestProxy::start(&format!(
        r#"
        upstream.url = "{fallback}"
        log.filter = "warn"
        [[route]]
        name = "payments"
        prefix = "/payments"
        upstream = "{payments}"
        idempotency.require_key = true
        [[route]]
        name = "refunds"
        prefix = "/payments/refunds"
        upstream = "{payments}"
        idempotency.methods = ["POST", "PATCH"]
        [[route]]
        name = "search"
        prefix = "/search"
        upstream = "{search}"
        idempotency.enabled = false
        "#,
        fallback = fallback.url(),
        payments = payments.url(),
        search = search.url(),
    ))
    .await;
    let client = TestClient::new();
    let keyless = client
        .send(Method::POST, &proxy.url("/payments/charge"), &[], "{}")
        .await;
    assert_eq!(keyless.status, StatusCode::BAD_REQUEST, "require_key on /payments");
    assert_eq!(payments.hits(), 0);
    let refund_patch = proxy.url("/payments/refunds/7");
    let a = client
        .send(Method::PATCH, &refund_patch, &[("idempotency-key", "r")], "{}")
        .await;
    let b = client
        .send(Method::PATCH, &refund_patch, &[("idempotency-key", "r")], "{}")
        .await;
    assert_eq!(
        b.header("idempotent-replayed"),
        Some("true"),
        "PATCH guarded on the longer prefix"
    );
    assert_eq!(a.body, b.body);
    let keyless_refund = client
        .send(Method::POST, &proxy.url("/payments/refunds"), &[], "{}")
        .await;
    assert_eq!(
        keyless_refund.status,
        StatusCode::CREATED,
        "the longer prefix does not require a key"
    );
    let s1 = client.post_keyed(&proxy.url("/search"), "s", "{}").await;
    let s2 = client.post_keyed(&proxy.url("/search"), "s", "{}").await;
    assert_ne!(s1.body, s2.body, "plain pass-through on /search");
    assert_eq!(search.hits(), 2);
    let other = client.post_keyed(&proxy.url("/paymentsx"), "o", "{}").await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert_eq!(fallback.hits(), 1, "/paymentsx is not under /payments");
    assert_eq!(payments.hits(), 2);
}

async fn admin_get(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> common::TestResponse {
    let admin = proxy.admin.expect("admin listener");
    TestClient::new()
        .send(Method::GET, &format!("http://{admin}{path}"), headers, "")
        .await
}

#[tokio::test]
async fn readyz_follows_redis_and_healthz_the_process() {
    let mut redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).redis(&redis).admin().start().await;
    assert_eq!(admin_get(&proxy, "/readyz", &[]).await.status, StatusCode::OK);
    redis.kill();
    assert_eq!(
        admin_get(&proxy, "/readyz", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(admin_get(&proxy, "/healthz", &[]).await.status, StatusCode::OK);
    let metrics = admin_get(&proxy, "/metrics", &[]).await;
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("\nidemproxy_ready 0\n"),
        "the readiness gauge follows the check"
    );
    redis.restart();
    let mut ready = false;
    for _ in 0..50 {
        if admin_get(&proxy, "/readyz", &[]).await.status == StatusCode::OK {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready again once Redis is back");
    let metrics = admin_get(&proxy, "/metrics", &[]).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("\nidemproxy_ready 1\n"));
    upstream.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let no_upstream = admin_get(&proxy, "/readyz", &[]).await;
    assert_eq!(no_upstream.status, StatusCode::SERVICE_UNAVAILABLE, "{no_upstream:?}");
}

#[tokio::test]
async fn metrics_count_replays_conflicts_and_mismatches() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).admin().start().await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let slow = common::spawn_slow_keyed_post(&url, "m", 300);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.post_keyed(&url, "m", "{}").await.status, StatusCode::CONFLICT);
    slow.await.expect("task");
    assert_eq!(
        client.post_keyed(&url, "m", "{}").await.header("idempotent-replayed"),
        Some("true")
    );
    assert_eq!(
        client.post_keyed(&url, "m", "{\"other\":1}").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    client.send(Method::GET, &url, &[], "").await;
    let metrics = admin_get(&proxy, "/metrics", &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&metrics.body);
    for (outcome, method, count) in [
        ("executed", "POST", 1),
        ("conflict", "POST", 1),
        ("replayed", "POST", 1),
        ("mismatch", "POST", 1),
        ("passthrough", "GET", 1),
    ] {
        let line =
            format!("idemproxy_requests_total{{route=\"default\",method=\"{method}\",outcome=\"{outcome}\"}} {count}");
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
    assert!(
        text.contains("idemproxy_upstream_duration_seconds_count{route=\"default\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("idemproxy_store_duration_seconds_count{op=\"begin\"} 4"),
        "{text}"
    );
    assert!(text.contains("idemproxy_in_flight_requests 0"), "{text}");
}

#[tokio::test]
async fn metrics_are_openmetrics_or_classic_text_as_the_accept_header_asks() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).admin().start().await;
    TestClient::new().post_keyed(&proxy.url("/orders"), "k", "{}").await;
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;\
        q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let openmetrics = admin_get(&proxy, "/metrics", &[("accept", prometheus_accept)]).await;
    assert_eq!(
        openmetrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(openmetrics.header("vary"), Some("accept"));
    let body = String::from_utf8_lossy(&openmetrics.body);
    assert!(body.contains("\n# TYPE idemproxy_requests counter\n"), "{body}");
    assert!(body.ends_with("\n# EOF\n"), "{body}");

    for accept in [None, Some("text/plain"), Some("*/*")] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let classic = admin_get(&proxy, "/metrics", &headers).await;
        assert_eq!(
            classic.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "Accept: {accept:?}"
        );
        let body = String::from_utf8_lossy(&classic.body);
        for family in ["requests_total", "store_errors_total", "lease_renewals_total"] {
            let family = format!("idemproxy_{family}");
            assert!(
                body.contains(&format!("\n# TYPE {family} counter\n")),
                "{family}: {body}"
            );
            assert!(body.contains(&format!("# HELP {family} ")), "{family}: {body}");
        }
        assert!(body.contains("\n# TYPE idemproxy_ready gauge\n"), "{body}");
        assert!(!body.contains("# EOF") && !body.contains("# UNIT"), "{body}");
        assert!(
            body.contains(r#"idemproxy_requests_total{route="default",method="POST",outcome="executed"} 1"#),
            "{body}"
        );
    }
}

#[tokio::test]
async fn unknown_key_is_seen_by_lookup_and_runs_again_after_clear() {
    let redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream)
        .redis(&redis)
        .config("upstream.timeout = \"200ms\"\nadmin_token = \"s3cret\"")
        .admin()
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let auth = ("authorization", "Bearer client-7");
    let timed_out = client
        .send(
            Method::POST,
            &url,
            &[("idempotency-key", "\"pay/42\""), auth, ("x-upstream-delay-ms", "500")],
            "{}",
        )
        .await;
    assert_eq!(timed_out.status, StatusCode::GATEWAY_TIMEOUT);
    let key_path = "/keys/%22pay%2F42%22?scope=Bearer%20client-7";
    let bearer = ("authorization", "Bearer s3cret");
    assert_eq!(admin_get(&proxy, key_path, &[]).await.status, StatusCode::UNAUTHORIZED);
    let looked_up = admin_get(&proxy, key_path, &[bearer]).await;
    assert_eq!(looked_up.status, StatusCode::OK, "{looked_up:?}");
    let record = looked_up.json();
    assert_eq!(record["state"], "Unknown");
    assert_eq!(record["route"], "default");
    assert_eq!(record["cause"], "Timeout");
    assert!(record["expires_in_ms"].as_u64().expect("expiry") > 0);
    let wrong_scope = admin_get(&proxy, "/keys/%22pay%2F42%22?scope=Bearer%20other", &[bearer]).await;
    assert_eq!(wrong_scope.status, StatusCode::NOT_FOUND);
    let retry = client
        .send(Method::POST, &url, &[("idempotency-key", "\"pay/42\""), auth], "{}")
        .await;
    assert!(retry.problem_type().ends_with("#outcome-unknown"));
    let admin = proxy.admin.expect("admin");
    let cleared = TestClient::new()
        .send(Method::DELETE, &format!("http://{admin}{key_path}"), &[bearer], "")
        .await;
    assert_eq!(cleared.status, StatusCode::OK);
    assert_eq!(cleared.json()["cleared"], true);
    let after = client
        .send(Method::POST, &url, &[("idempotency-key", "\"pay/42\""), auth], "{}")
        .await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(upstream.hits(), 2);
    let completed = admin_get(&proxy, &format!("{key_path}&body=true"), &[bearer])
        .await
        .json();
    assert_eq!(completed["state"], "Completed");
    assert_eq!(completed["status"], 201);
    assert_eq!(completed["body"], String::from_utf8_lossy(&after.body).as_ref());
    let gone = TestClient::new()
        .send(
            Method::DELETE,
            &format!("http://{admin}/keys/nothing-here"),
            &[bearer],
            "",
        )
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

/// The binary with JSON logs at info level, its stderr lines read on a thread; killed on drop.
/// Without `--redis` it gets a temporary data dir of its own.
struct LoggingProxy {
    child: std::process::Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
    _data_dir: tempfile::TempDir,
}

impl LoggingProxy {
    /// Spawns it with `args` plus `--listen` on a free port; waits until it accepts.
    fn spawn(args: &[&str]) -> Self {
        let port = free_port();
        let data_dir = tempfile::tempdir().expect("a temp data dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
        if !args.contains(&"--redis") {
            command.arg("--data-dir").arg(data_dir.path());
        }
        let mut child = command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .args(["--log-format", "json", "--log-filter", "info"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let proxy = Self {
            child,
            port,
            lines,
            _data_dir: data_dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The next `request` line (each a JSON object), and every line read up to it.
    fn next_request_line(&self) -> (serde_json::Value, Vec<String>) {
        let mut all = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            all.push(line.clone());
            let parsed: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if parsed["message"] == "request" {
                return (parsed, all);
            }
        }
        panic!("no request log line in {all:?}");
    }
}

impl Drop for LoggingProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn json_log_line_per_request_without_secrets() {
    let upstream = TestUpstream::start().await;
    let proxy = LoggingProxy::spawn(&["--upstream", &upstream.url()]);
    let secret_key = "very-secret-key-123";
    let response = TestClient::new()
        .send(
            Method::POST,
            &proxy.url("/orders"),
            &[
                ("idempotency-key", secret_key),
                ("authorization", "Bearer top-secret-token"),
                ("cookie", "session=cookie-secret"),
            ],
            "{\"card\":\"4242\"}",
        )
        .await;
    assert_eq!(response.status, StatusCode::CREATED);
    let (line, all) = proxy.next_request_line();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["route"], "default");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["status"], 201);
    assert_eq!(line["outcome"], "executed");
    assert!(line["duration_ms"].as_f64().is_some());
    assert_eq!(line["key"].as_str().map(str::len), Some(12), "a short hash of the key");
    assert!(line.get("client_gone").is_none(), "{line}");
    for text in &all {
        for secret in [secret_key, "top-secret-token", "cookie-secret", "4242"] {
            assert!(!text.contains(secret), "log leaks {secret}: {text}");
        }
    }
}

/// A client that leaves while its request executes upstream (docs/behaviour.md §10.3): the
/// execution still writes the request line, with its outcome and `client_gone = true`, and
/// counts it; the line's `key` is the `key_hash` the admin key lookup gives for what the
/// client sent (key, scope header value, route). Multi-threaded: the upstream answers while
/// this test's thread waits for the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_whose_client_left_still_logs_its_line() {
    let upstream = TestUpstream::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let proxy = LoggingProxy::spawn(&["--upstream", &upstream.url(), "--admin-listen", &admin]);
    let gone = tokio::time::timeout(
        Duration::from_millis(200),
        TestClient::new().send(
            Method::POST,
            &proxy.url("/orders"),
            &[
                ("idempotency-key", "left-early"),
                ("authorization", "Bearer client-9"),
                ("x-upstream-delay-ms", "600"),
            ],
            "{}",
        ),
    )
    .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    let (line, _) = proxy.next_request_line();
    assert_eq!(line["client_gone"], true, "{line}");
    assert_eq!(line["outcome"], "executed", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert!(line["duration_ms"].as_f64().is_some_and(|ms| ms >= 500.0), "{line}");
    assert_eq!(upstream.hits(), 1);

    let admin_client = TestClient::new();
    let lookup = admin_client
        .send(
            Method::GET,
            &format!("http://{admin}/keys/left-early?scope=Bearer%20client-9&route=default"),
            &[],
            "",
        )
        .await;
    assert_eq!(lookup.json()["key_hash"], line["key"], "{lookup:?}");
    let metrics = admin_client
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    let counted = "idemproxy_requests_total{route=\"default\",method=\"POST\",outcome=\"executed\"} 1";
    assert!(String::from_utf8_lossy(&metrics.body).contains(counted), "{metrics:?}");
}

/// Requests whose key may be in their body (a `json:` key source, docs/behaviour.md §13) get
/// their request line too: one forwarded from the body buffer without a key (`passthrough`, no
/// `key`), one guarded by its body key (`executed`, the `key` the admin lookup gives with
/// `?source=`), one whose body key is malformed (`invalid_key`), and one whose client left
/// while it executed (`client_gone`). Multi-threaded: the upstream answers while this test's
/// thread waits for a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keyed_from_their_body_log_their_line() {
    let upstream = TestUpstream::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let proxy = LoggingProxy::spawn(&[
        "--upstream",
        &upstream.url(),
        "--admin-listen",
        &admin,
        "--key-source",
        "header:Idempotency-Key,json:/client_order_id",
    ]);
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let json = ("content-type", "application/json");

    let keyless = client.send(Method::POST, &url, &[json], r#"{"amount": 1}"#).await;
    assert_eq!(keyless.status, StatusCode::CREATED);
    let (line, _) = proxy.next_request_line();
    assert_eq!(line["outcome"], "passthrough", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert!(line.get("key").is_none(), "{line}");

    let keyed = client
        .send(Method::POST, &url, &[json], r#"{"client_order_id": "ord 1"}"#)
        .await;
    assert_eq!(keyed.status, StatusCode::CREATED);
    let (line, _) = proxy.next_request_line();
    assert_eq!(line["outcome"], "executed", "{line}");
    let lookup = client
        .send(
            Method::GET,
            &format!("http://{admin}/keys/ord%201?source=json:/client_order_id"),
            &[],
            "",
        )
        .await;
    assert_eq!(lookup.json()["key_hash"], line["key"], "{lookup:?}");
    assert_eq!(lookup.json()["source"], "json:/client_order_id", "{lookup:?}");

    let malformed = client
        .send(Method::POST, &url, &[json], r#"{"client_order_id": 1.5}"#)
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let (line, _) = proxy.next_request_line();
    assert_eq!(line["outcome"], "invalid_key", "{line}");
    assert_eq!(line["status"], 400, "{line}");

    let gone = tokio::time::timeout(
        Duration::from_millis(200),
        client.send(
            Method::POST,
            &url,
            &[json, ("x-upstream-delay-ms", "600")],
            r#"{"client_order_id": "left-early"}"#,
        ),
    )
    .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    let (line, _) = proxy.next_request_line();
    assert_eq!(line["client_gone"], true, "{line}");
    assert_eq!(line["outcome"], "executed", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert_eq!(line["key"].as_str().map(str::len), Some(12), "{line}");
    assert_eq!(upstream.hits(), 3);
}
