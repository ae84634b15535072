//! Fault-injection soak test of the at-most-once promise (docs/behaviour.md §5).
//!
//! Client tasks send keyed POSTs and retry each 1-4 times (some retries concurrent), spread over
//! two proxies sharing one Redis (`appendonly yes`, `appendfsync always`), while a controller
//! kills and restarts Redis, kills and restarts the upstream, stalls the upstream past the
//! upstream timeout, and kills and restarts one proxy (a separate process, SIGKILL). Then, with
//! everything healthy, every key is retried once more.
//!
//! Runs about 30 s by default; `IDEMPROXY_SOAK_SECS=600` runs it for 10 minutes.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, ProxyProcess, RedisServer, TestClient, TestProxy, TestUpstream};
use http::{Method, StatusCode};

const LOCK_TTL: &str = "1s";
const UPSTREAM_TIMEOUT: &str = "500ms";

/// A tiny deterministic PRNG (xorshift64*), so a failing run can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What clients saw, per key.
#[derive(Default)]
struct Observations {
    /// Bodies of 2xx answers, per key (all must be identical).
    successes: HashMap<String, Vec<Bytes>>,
    statuses: HashMap<u16, usize>,
    replays: usize,
    no_answer: usize,
    requests: usize,
}

impl Observations {
    fn record(&mut self, key: &str, response: Option<&common::TestResponse>) {
        self.requests += 1;
        let Some(response) = response else {
            self.no_answer += 1;
            return;
        };
        *self.statuses.entry(response.status.as_u16()).or_default() += 1;
        if response.status.is_success() {
            if response.header("idempotent-replayed") == Some("true") {
                self.replays += 1;
            }
            self.successes
                .entry(key.to_owned())
                .or_default()
                .push(response.body.clone());
        }
    }
}

/// The proxy that gets killed: a child process on a fixed port.
struct Doomed {
    addr: SocketAddr,
    args: Vec<String>,
    process: Option<ProxyProcess>,
}

impl Doomed {
    fn start(args: Vec<String>) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let mut doomed = Self {
            addr,
            args,
            process: None,
        };
        doomed.spawn();
        doomed
    }

    fn spawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.process = Some(ProxyProcess::spawn_on(self.addr, &args));
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}

async fn send(url: &str, key: &str) -> Option<common::TestResponse> {
    let client = TestClient::new();
    let headers = [("idempotency-key", key)];
    let request = client.try_send(Method::POST, url, &headers, format!("{{\"key\":\"{key}\"}}"));
    match tokio::time::timeout(Duration::from_secs(5), request).await {
        Ok(Ok(response)) => Some(response),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_under_faults() {
    let seconds: u64 = std::env::var("IDEMPROXY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed = std::env::var("IDEMPROXY_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| idemproxy::idempotency::unix_ms() | 1);
    eprintln!("soak: {seconds}s, seed {seed}");

    let redis = Arc::new(Mutex::new(RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])));
    let redis_url = redis.lock().expect("lock").url();
    let upstream = Arc::new(Mutex::new(TestUpstream::start().await));
    let upstream_url = upstream.lock().expect("lock").url();
    let steady = TestProxy::start(&format!(
        "upstream.url = \"{upstream_url}\"\nupstream.timeout = \"{UPSTREAM_TIMEOUT}\"\n\
         store.redis = \"{redis_url}\"\nstore.command_timeout = \"300ms\"\nlog.filter = \"error\"\n\
         [idempotency]\nlock_ttl = \"{LOCK_TTL}\"\n"
    ))
    .await;
    let doomed = Arc::new(Mutex::new(Doomed::start(
        [
            "--upstream",
            &upstream_url,
            "--redis",
            &redis_url,
            "--upstream-timeout",
            UPSTREAM_TIMEOUT,
            "--lock-ttl",
            LOCK_TTL,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )));
    let urls = [
        steady.url("/orders"),
        format!("http://{}/orders", doomed.lock().expect("lock").addr),
    ];

    let observations = Arc::new(Mutex::new(Observations::default()));
    let keys = Arc::new(Mutex::new(Vec::<String>::new()));
    let running = Arc::new(AtomicBool::new(true));
    let key_counter = Arc::new(AtomicUsize::new(0));

    // Clients.
    let mut clients = Vec::new();
    for client in 0..6u64 {
        let (observations, keys, running, key_counter, urls) = (
            observations.clone(),
            keys.clone(),
            running.clone(),
            key_counter.clone(),
            urls.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            while running.load(Ordering::SeqCst) {
                let key = format!("soak-{seed}-{}", key_counter.fetch_add(1, Ordering::SeqCst));
                keys.lock().expect("lock").push(key.clone());
                let attempts = 1 + rng.below(4);
                for _ in 0..attempts {
                    let url = &urls[rng.below(2) as usize];
                    if rng.below(3) == 0 {
                        // A concurrent pair of retries, through both proxies.
                        let (a, b) = tokio::join!(send(&urls[0], &key), send(&urls[1], &key));
                        let mut seen = observations.lock().expect("lock");
                        seen.record(&key, a.as_ref());
                        seen.record(&key, b.as_ref());
                    } else {
                        let response = send(url, &key).await;
                        observations.lock().expect("lock").record(&key, response.as_ref());
                    }
                    tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
                }
            }
        }));
    }

    // Faults.
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let mut faults: HashMap<&'static str, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(700 + rng.below(800))).await;
        let fault = match rng.below(4) {
            0 => {
                redis.lock().expect("lock").kill();
                tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
                redis.lock().expect("lock").restart();
                "redis killed"
            }
            1 => {
                let current = upstream.lock().expect("lock").clone();
                current.stop();
                tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
                let restarted = current.restart().await;
                *upstream.lock().expect("lock") = restarted;
                "upstream killed"
            }
            2 => {
                let current = upstream.lock().expect("lock").clone();
                current.set_stall(Duration::from_millis(1000));
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
                current.set_stall(Duration::ZERO);
                "upstream stalled"
            }
            _ => {
                doomed.lock().expect("lock").kill();
                tokio::time::sleep(Duration::from_millis(200 + rng.below(500))).await;
                doomed.lock().expect("lock").spawn();
                "proxy killed"
            }
        };
        *faults.entry(fault).or_default() += 1;
    }
    running.store(false, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client task");
    }

    // Everything healthy again: leases of killed owners lapse, then every key is retried once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let upstream = upstream.lock().expect("lock").clone();
    let executions: HashMap<String, Vec<u64>> = {
        let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
        for (i, request) in upstream.requests().iter().enumerate() {
            if let Some(key) = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                by_key.entry(key.to_owned()).or_default().push(i as u64 + 1);
            }
        }
        by_key
    };
    let keys = keys.lock().expect("lock").clone();
    let mut final_unknown = 0;
    let mut final_replayed = 0;
    let mut final_executed = 0;
    for key in &keys {
        let executed_before = executions.get(key).map_or(0, Vec::len);
        let response = send(&urls[0], key)
            .await
            .unwrap_or_else(|| panic!("key {key}: no final answer"));
        assert!(
            response.status != StatusCode::CONFLICT && response.status != StatusCode::SERVICE_UNAVAILABLE,
            "key {key} stuck: {response:?}"
        );
        if response.status.is_success() {
            observations.lock().expect("lock").record(key, Some(&response));
            if executed_before == 1 {
                assert_eq!(response.header("idempotent-replayed"), Some("true"), "key {key}");
                final_replayed += 1;
            } else {
                final_executed += 1;
            }
        } else {
            assert!(
                response.problem_type().ends_with("#outcome-unknown"),
                "key {key}: {response:?}"
            );
            final_unknown += 1;
        }
    }

    // The promise.
    let executions_after: HashMap<String, usize> = {
        let mut counts = HashMap::new();
        for request in upstream.requests() {
            if let Some(key) = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                *counts.entry(key.to_owned()).or_default() += 1;
            }
        }
        counts
    };
    let twice: Vec<_> = executions_after.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys executed more than once: {twice:?}");
    let observations = observations.lock().expect("lock");
    for (key, bodies) in &observations.successes {
        assert!(
            bodies.windows(2).all(|w| w[0] == w[1]),
            "key {key}: answers differ: {bodies:?}"
        );
    }
    let conflicts = observations.statuses.get(&409).copied().unwrap_or(0);
    let unavailable = observations.statuses.get(&503).copied().unwrap_or(0);
    let unknown =
        observations.statuses.get(&502).copied().unwrap_or(0) + observations.statuses.get(&504).copied().unwrap_or(0);
    assert_eq!(observations.statuses.get(&422), None, "same request, never a mismatch");
    eprintln!(
        "soak: keys {}, requests {}, executions {}, replays {}, 409s {conflicts}, 503s {unavailable}, \
         502/504s {unknown}, no answer {}, final: replayed {final_replayed} executed {final_executed} \
         outcome-unknown {final_unknown}; faults {faults:?}; statuses {:?}",
        keys.len(),
        observations.requests,
        executions_after.values().sum::<usize>(),
        observations.replays,
        observations.no_answer,
        observations.statuses,
    );
    assert!(keys.len() > 20, "the soak ran enough keys");
    assert!(faults.values().sum::<usize>() >= 4, "the soak injected faults");
}
