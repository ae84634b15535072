//! The metrics as their real consumer reads them (docs/behaviour.md §10.5): a real Prometheus
//! server scrapes a running proxy's admin listener with `deploy/prometheus/idemproxy.rules.yml`
//! loaded, and `promtool check metrics` reads the classic text format. Both need Debian's
//! `prometheus` package (`.ci/run` installs it); without it these tests say so and pass.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, TestClient, TestProxy, TestUpstream};
use http::{Method, StatusCode};
use serde_json::Value;

/// Longest wait for Prometheus to start, scrape, or evaluate what a test waits for.
const PATIENCE: Duration = Duration::from_secs(20);

/// Whether `tool` is on the PATH; if not, says on the terminal (not captured by the test
/// harness) that `test` is skipped.
fn installed(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: `{tool}` is not installed (apt-get install prometheus; .ci/run installs it)"
        );
    }
    found
}

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/idemproxy.rules.yml")
}

/// A Prometheus server on an ephemeral loopback port, with its own config and storage in a
/// temporary directory, scraping `target` every second; killed on drop.
struct Prometheus {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: idemproxy\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules_file().display(),
            ),
        )
        .expect("write the Prometheus config");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Self { port, child, _dir: dir }
    }

    /// The instant vector `query` evaluates to now: each series' labels and value.
    async fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let url = format!("http://127.0.0.1:{}/api/v1/query?query={encoded}", self.port);
        let Ok(answer) = TestClient::new().try_send(Method::GET, &url, &[], "").await else {
            return Vec::new();
        };
        if answer.status != StatusCode::OK {
            return Vec::new();
        }
        let json = answer.json();
        let results = json["data"]["result"].as_array().cloned().unwrap_or_default();
        results
            .into_iter()
            .map(|r| {
                let value = r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `query` until `done` accepts its result; panics with `what` after [`PATIENCE`].
    async fn wait_for(&self, what: &str, query: &str, done: impl Fn(&[(Value, f64)]) -> bool) -> Vec<(Value, f64)> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let result = self.query(query).await;
            if done(&result) {
                return result;
            }
            assert!(Instant::now() < deadline, "{what}: `{query}` is still {result:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The recorded rate of each outcome, by outcome.
fn by_outcome(result: &[(Value, f64)]) -> std::collections::HashMap<String, f64> {
    result
        .iter()
        .map(|(labels, value)| (labels["outcome"].as_str().unwrap_or_default().to_owned(), *value))
        .collect()
}

/// Drives one execution (and its replay), one conflict (its first request executes) and one
/// outcome-unknown through `proxy`.
async fn drive_traffic(proxy: &TestProxy) {
    let client = TestClient::new();
    let url = proxy.url("/orders");
    assert_eq!(client.post_keyed(&url, "e", "{}").await.status, StatusCode::CREATED);
    let replay = client.post_keyed(&url, "e", "{}").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let slow = common::spawn_slow_keyed_post(&url, "c", 500);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(client.post_keyed(&url, "c", "{}").await.status, StatusCode::CONFLICT);
    assert_eq!(slow.await.expect("task").status, StatusCode::CREATED);
    let unknown = client
        .send(
            Method::POST,
            &url,
            &[("idempotency-key", "u"), ("x-upstream-delay-ms", "1500")],
            "{}",
        )
        .await;
    assert!(unknown.problem_type().ends_with("#outcome-unknown"), "{unknown:?}");
}

/// The recorded request rates of the outcomes `drive_traffic` caused.
async fn assert_request_rates(prometheus: &Prometheus) {
    let outcomes = ["executed", "replayed", "conflict", "outcome_unknown"];
    let rates = prometheus
        .wait_for("the recorded request rates", "idemproxy:requests:rate5m", |r| {
            let rates = by_outcome(r);
            outcomes.iter().all(|o| rates.get(*o).is_some_and(|v| *v > 0.0))
        })
        .await;
    let rates = by_outcome(&rates);
    // The same extrapolated window for every outcome: the rates stand as the counts do, 2:1:1:1.
    let replayed = rates["replayed"];
    for (outcome, count) in [("executed", 2.0), ("conflict", 1.0), ("outcome_unknown", 1.0)] {
        let ratio = rates[outcome] / replayed;
        assert!(
            (ratio - count).abs() < 1e-9,
            "{outcome}: {ratio} × replayed in {rates:?}"
        );
    }
    assert_eq!(rates.get("mismatch").copied(), Some(0.0), "{rates:?}");
    assert!(replayed < 1.0, "one replay in a window of seconds: {rates:?}");
}

/// The recorded upstream and store latency quantiles.
async fn assert_latency_quantiles(prometheus: &Prometheus) {
    let upstream_p99 = prometheus
        .wait_for(
            "the upstream latency quantile",
            "idemproxy:upstream_duration_seconds:quantile5m{route=\"default\",quantile=\"0.99\"}",
            |r| r.first().is_some_and(|(_, v)| v.is_finite()),
        )
        .await;
    let p99 = upstream_p99[0].1;
    assert!((0.25..=2.5).contains(&p99), "executions of 0.5 s and 1 s: p99 {p99}");
    prometheus
        .wait_for(
            "the store latency quantile",
            "idemproxy:store_duration_seconds:quantile5m{op=\"begin\",quantile=\"0.5\"}",
            |r| r.first().is_some_and(|(_, v)| v.is_finite() && *v > 0.0 && *v <= 0.1),
        )
        .await;
}

/// The outcome-unknown alert pending or firing, and no other.
async fn assert_outcome_unknown_alert(prometheus: &Prometheus) {
    let alert = prometheus
        .wait_for(
            "the outcome-unknown alert",
            "ALERTS{alertname=\"IdemproxyOutcomeUnknown\"}",
            |r| !r.is_empty(),
        )
        .await;
    let labels = &alert[0].0;
    assert!(
        matches!(labels["alertstate"].as_str(), Some("pending" | "firing")),
        "{labels}"
    );
    assert_eq!(labels["route"], "default");
    assert_eq!(labels["severity"], "warning");
    let quiet = prometheus.query("ALERTS{alertname=\"IdemproxyFailOpen\"}").await;
    assert!(quiet.is_empty(), "no fail-open forwarding happened: {quiet:?}");
}

#[tokio::test]
async fn prometheus_scrapes_the_proxy_and_the_rules_see_its_traffic() {
    if !installed(
        "prometheus",
        "prometheus_scrapes_the_proxy_and_the_rules_see_its_traffic",
    ) {
        return;
    }
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream)
        .config("upstream.timeout = \"1s\"")
        .admin()
        .start()
        .await;
    let prometheus = Prometheus::start(proxy.admin.expect("admin listener"));
    // A scrape before the traffic: the counters' zeros, for rate() to start from.
    prometheus
        .wait_for(
            "the first scrape",
            "idemproxy_requests_total{outcome=\"outcome_unknown\"}",
            |r| r.len() == 1,
        )
        .await;
    drive_traffic(&proxy).await;

    assert_request_rates(&prometheus).await;
    assert_latency_quantiles(&prometheus).await;
    assert_outcome_unknown_alert(&prometheus).await;
}

#[tokio::test]
async fn promtool_finds_nothing_wrong_with_the_classic_exposition() {
    if !installed("promtool", "promtool_finds_nothing_wrong_with_the_classic_exposition") {
        return;
    }
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).admin().start().await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    client.post_keyed(&url, "k", "{}").await;
    client.post_keyed(&url, "k", "{}").await;
    client.send(Method::GET, &url, &[], "").await;
    let admin = proxy.admin.expect("admin listener");
    let metrics = client
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(&metrics.body)
        .expect("feed promtool");
    let output = promtool.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}
