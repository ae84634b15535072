//! The durable embedded store, black-box (docs/behaviour.md §11): the real binary on a data
//! directory, killed with SIGKILL and started again on the same directory. Every acknowledged
//! key must replay, a request in flight at the kill must end outcome-unknown once its lease
//! lapses, and nothing may run upstream twice. Bounded: a few seconds each.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, ProxyProcess, TestClient, TestProxy, TestResponse, TestUpstream};
use http::{Method, StatusCode};

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

const LOCK_TTL: &str = "300ms";

/// The proxy on `dir`, with a short lease so that an owner killed mid-request lapses quickly.
fn proxy_on(dir: &Path, upstream: &TestUpstream) -> ProxyProcess {
    let dir = dir.display().to_string();
    ProxyProcess::spawn(&[
        "--upstream",
        &upstream.url(),
        "--data-dir",
        &dir,
        "--lock-ttl",
        LOCK_TTL,
    ])
}

/// How many times the upstream executed each key.
fn executions_per_key(upstream: &TestUpstream) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in upstream.requests() {
        if let Some(key) = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
            *counts.entry(key.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

fn is_replay(response: &TestResponse) -> bool {
    response.status == StatusCode::CREATED && response.header("idempotent-replayed") == Some("true")
}

fn is_outcome_unknown(response: &TestResponse) -> bool {
    response.status == StatusCode::BAD_GATEWAY && response.problem_type().ends_with("#outcome-unknown")
}

#[tokio::test]
async fn acknowledged_keys_replay_after_a_sigkill_and_restart() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let client = TestClient::new();
    let mut proxy = proxy_on(dir.path(), &upstream);
    let mut first = Vec::new();
    for i in 0..20 {
        let response = client.post_keyed(&proxy.url("/orders"), &format!("k{i}"), "{}").await;
        assert_eq!(response.status, StatusCode::CREATED);
        first.push(response.body);
    }
    proxy.kill();
    let proxy = proxy_on(dir.path(), &upstream);
    for (i, body) in first.iter().enumerate() {
        let retry = client.post_keyed(&proxy.url("/orders"), &format!("k{i}"), "{}").await;
        assert!(is_replay(&retry), "k{i}: {retry:?}");
        assert_eq!(&retry.body, body, "k{i}: the first response, byte for byte");
    }
    assert_eq!(upstream.hits(), 20, "no retry ran again");
}

#[tokio::test]
async fn a_request_in_flight_at_the_kill_ends_outcome_unknown_and_never_runs_again() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut proxy = proxy_on(dir.path(), &upstream);
    let url = proxy.url("/orders");
    let in_flight = tokio::spawn(async move {
        let headers = [("idempotency-key", "mid-flight"), ("x-upstream-delay-ms", "3000")];
        TestClient::new().try_send(Method::POST, &url, &headers, "{}").await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.hits() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.hits(), 1, "the request reached the upstream");
    proxy.kill();
    assert!(in_flight.await.expect("task").is_err(), "the client saw the proxy die");
    let proxy = proxy_on(dir.path(), &upstream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = TestClient::new();
    for _ in 0..2 {
        let retry = client.post_keyed(&proxy.url("/orders"), "mid-flight", "{}").await;
        assert!(is_outcome_unknown(&retry), "{retry:?}");
    }
    assert_eq!(upstream.hits(), 1, "never executed twice");
}

/// One client's view of a key: the response it got, if any.
type Seen = HashMap<String, Option<TestResponse>>;

/// Sends keyed POSTs with new keys (and retries of earlier ones) from `clients` connections
/// until the proxy dies or `limit` passes; records what each key's client saw.
async fn keyed_load(url: String, round: usize, clients: usize, limit: Duration) -> Seen {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = TestClient::new();
                let mut seen = Seen::new();
                let started = Instant::now();
                let mut i = 0;
                while started.elapsed() < limit {
                    let key = format!("r{round}-c{c}-{i}");
                    let headers = [("idempotency-key", key.as_str()), ("x-upstream-delay-ms", "5")];
                    let response = client.try_send(Method::POST, &url, &headers, "{}").await.ok();
                    let died = response.is_none();
                    seen.insert(key, response);
                    if died {
                        break;
                    }
                    i += 1;
                }
                seen
            })
        })
        .collect();
    let mut seen = Seen::new();
    for task in tasks {
        seen.extend(task.await.expect("client task"));
    }
    seen
}

/// A small deterministic generator (xorshift), seeded per run and printed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_of_a_keyed_load_never_executes_twice_nor_loses_a_result() {
    let mut seed = idemproxy::idempotency::unix_ms() | 1;
    eprintln!("seed {seed}");
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut seen = Seen::new();
    for round in 0..5 {
        let mut proxy = proxy_on(dir.path(), &upstream);
        let load = tokio::spawn(keyed_load(proxy.url("/orders"), round, 16, Duration::from_secs(3)));
        tokio::time::sleep(Duration::from_millis(100 + next(&mut seed) % 400)).await;
        proxy.kill();
        seen.extend(load.await.expect("load"));
    }
    let proxy = proxy_on(dir.path(), &upstream);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = TestClient::new();
    let (mut replays, mut unknown) = (0, 0);
    for (key, first) in &seen {
        let retry = client.post_keyed(&proxy.url("/orders"), key, "{}").await;
        match first {
            Some(first) if first.status == StatusCode::CREATED => {
                assert!(is_replay(&retry), "{key}: acknowledged, so it must replay: {retry:?}");
                assert_eq!(retry.body, first.body, "{key}: the acknowledged result");
                replays += 1;
            }
            _ if is_replay(&retry) => replays += 1,
            _ if is_outcome_unknown(&retry) => unknown += 1,
            // Never sent upstream before the kill (its InFlight record never became durable):
            // the retry executes, for the first time.
            _ => assert_eq!(retry.status, StatusCode::CREATED, "{key}: {retry:?}"),
        }
    }
    let twice: Vec<_> = executions_per_key(&upstream)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "executed more than once: {twice:?}");
    eprintln!("{} keys: {replays} replayed, {unknown} outcome-unknown", seen.len());
    assert!(replays > 0 && seen.len() > 20, "the load ran: {} keys", seen.len());
}

#[tokio::test]
async fn a_second_process_on_the_same_directory_is_refused_naming_it() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let first = proxy_on(dir.path(), &upstream);
    // The first process listens before its store is open: once it has answered a keyed
    // request, it holds the directory's lock.
    let answered = TestClient::new().post_keyed(&first.url("/orders"), "first", "{}").await;
    assert_eq!(answered.status, StatusCode::CREATED);
    let mut second = Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .args([
            "--upstream",
            &upstream.url(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&dir.path().display().to_string()), "{stderr}");
    assert!(stderr.contains("in use by another idemproxy process"), "{stderr}");
}

#[tokio::test]
async fn without_a_data_dir_the_store_is_created_in_the_working_directory() {
    let upstream = TestUpstream::start().await;
    let cwd = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .args(["--upstream", &upstream.url(), "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(cwd.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let file = cwd.path().join("idemproxy-data").join("00000001.seg");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let created = file.exists();
    let _ = child.kill();
    let _ = child.wait();
    assert!(created, "idemproxy-data/00000001.seg in the working directory");
}

#[tokio::test]
async fn the_memory_store_keeps_the_old_behaviour_and_forgets_on_restart() {
    let upstream = TestUpstream::start().await;
    let args = ["--upstream", &upstream.url(), "--embedded-store", "memory"];
    let mut proxy = ProxyProcess::spawn(&args);
    assert!(proxy.data_dir().is_none(), "the memory store needs no directory");
    let client = TestClient::new();
    let first = client.post_keyed(&proxy.url("/orders"), "volatile", "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = client.post_keyed(&proxy.url("/orders"), "volatile", "{}").await;
    assert!(is_replay(&replay));
    proxy.kill();
    let proxy = ProxyProcess::spawn(&args);
    let again = client.post_keyed(&proxy.url("/orders"), "volatile", "{}").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotent-replayed"), None, "forgotten: executed again");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn readyz_fails_naming_the_directory_when_it_is_not_writable() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).admin().start().await;
    let admin = proxy.admin.expect("admin listener");
    let dir = proxy.data_dir().expect("a data dir of its own").to_owned();
    let client = TestClient::new();
    let url = format!("http://{admin}/readyz");
    let ready = client.send(Method::GET, &url, &[], "").await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    // Root may write anywhere, so take the directory away rather than its write permission.
    std::fs::remove_dir_all(&dir).expect("remove the data dir");
    let not_ready = client.send(Method::GET, &url, &[], "").await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&not_ready.body);
    assert!(body.contains(&dir.display().to_string()), "{body}");
    let metrics = client
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    for name in [
        "idemproxy_disk_store_records",
        "idemproxy_disk_store_bytes",
        "idemproxy_disk_store_max_bytes",
        "idemproxy_disk_store_flushes_total",
        "idemproxy_disk_store_flush_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

/// docs/behaviour.md §11.4, black-box: a byte flipped in the record of the last key written
/// while the proxy was down makes that key answer 503 (never executed again), the other keys
/// still replay, and the proxy starts.
#[tokio::test]
async fn a_flipped_byte_on_disk_makes_only_its_key_answer_503() {
    use idemproxy::store::disk::{format, segment};
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let client = TestClient::new();
    let mut proxy = proxy_on(dir.path(), &upstream);
    for key in ["k0", "k1", "k2"] {
        let response = client.post_keyed(&proxy.url("/orders"), key, "{}").await;
        assert_eq!(response.status, StatusCode::CREATED);
    }
    proxy.kill();
    let path = segment::path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("the segment");
    let (mut at, mut last) = (0, 0);
    while let Some(head) = format::header(&bytes[at..]) {
        last = at;
        at += head.frame_len();
    }
    // k2's Completed record: the payload's last byte of the last frame.
    bytes[at - format::TRAILER - 1] ^= 0x01;
    assert!(last < at);
    std::fs::write(&path, bytes).expect("write");
    let proxy = proxy_on(dir.path(), &upstream);
    let damaged = client.post_keyed(&proxy.url("/orders"), "k2", "{}").await;
    assert_eq!(damaged.status, StatusCode::SERVICE_UNAVAILABLE, "{damaged:?}");
    for key in ["k0", "k1"] {
        let retry = client.post_keyed(&proxy.url("/orders"), key, "{}").await;
        assert!(is_replay(&retry), "{key}: {retry:?}");
    }
    assert_eq!(upstream.hits(), 3, "nothing ran twice");
}

/// Damage (flipped bits, torn pages, a cut tail, garbage appended) to a store's segment,
/// generated from a fixed seed: the store always opens, a key its damage did not touch answers
/// its record, a damaged one `Corrupt` (or, when nothing names it or the tail was cut inside it,
/// an older record or none), and it never panics (the fuzz target `disk_recovery` checks the same
/// on any damage: `check_disk_recovery`).
/// `DISK_DAMAGE_CASES=N` (default 100) runs N cases: a fuzzing run without cargo-fuzz.
#[test]
fn damaged_files_always_open_and_never_change_a_record() {
    let cases: usize = std::env::var("DISK_DAMAGE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..cases {
        let changes = 1 + next(&mut state) as usize % 4;
        let damage: Vec<u8> = (0..5 * changes).map(|_| next(&mut state) as u8).collect();
        assert!(checks::check_disk_recovery(&damage), "{damage:?}");
    }
    assert!(checks::check_disk_recovery(&[]), "an undamaged file opens");
}
