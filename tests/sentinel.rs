//! Redis high availability (docs/behaviour.md §4.4): a primary, a replica and three sentinels,
//! real processes on ephemeral ports. The proxy follows a failover by itself, and with
//! `store.min_replicas = 1` a failover loses no key that ran; when the replicas cannot
//! acknowledge, nothing is forwarded while pass-through traffic and replays go on.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    replica_acknowledges_writes_to, ProxyProcess, RedisServer, SentinelSet, TestClient, TestProxy, TestResponse,
    TestUpstream,
};
use http::{Method, StatusCode};

/// Keyed POSTs the upstream received (executions), per key.
fn executions(upstream: &TestUpstream) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in upstream.requests() {
        if let Some(key) = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
            *counts.entry(key.to_owned()).or_default() += 1;
        }
    }
    counts
}

/// Sends `key`'s POST until it gets something else than the store failure (503) of a failover
/// in progress, for at most `within`; every 503 must carry `Retry-After`.
async fn post_through_failover(client: &TestClient, url: &str, key: &str, within: Duration) -> TestResponse {
    let deadline = Instant::now() + within;
    loop {
        let response = client.post_keyed(url, key, "{}").await;
        if response.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return response;
        }
        assert!(response.header("retry-after").is_some(), "{response:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keys executed with `min_replicas = 1`; the primary SIGKILLed; the sentinels promote the
/// replica; every retry is replayed, pass-through traffic never stops, new keys execute on the
/// new primary once the old one is back as its replica; no proxy restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_replays_every_acknowledged_key() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let sentinels = SentinelSet::start(&primary, 3, 1);
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream)
        .config(&format!(
            "store.redis = \"{}\"\nstore.command_timeout = \"500ms\"\nstore.min_replicas = 1",
            sentinels.url()
        ))
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");

    let keys: Vec<String> = (0..20).map(|i| format!("failover-{i}")).collect();
    let mut first = HashMap::new();
    for key in &keys {
        let response = post_through_failover(&client, &url, key, Duration::from_secs(5)).await;
        assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
        first.insert(key.clone(), response.body.clone());
    }
    assert_eq!(executions(&upstream).len(), keys.len());

    primary.kill();
    let started = Instant::now();
    // Pass-through traffic does not wait for the failover.
    let get = client.send(Method::GET, &url, &[], "").await;
    assert!(
        get.status.is_success() && get.header("idempotent-replayed").is_none(),
        "{get:?}"
    );
    sentinels.wait_for_master(replica.port, Duration::from_secs(15));
    eprintln!("failover: sentinels promoted the replica after {:?}", started.elapsed());

    for key in &keys {
        let retry = post_through_failover(&client, &url, key, Duration::from_secs(10)).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{key}: {retry:?}");
        assert_eq!(retry.header("idempotent-replayed"), Some("true"), "{key}");
        assert_eq!(retry.body, first[key], "{key}");
    }
    assert!(executions(&upstream).values().all(|n| *n == 1), "no key executed twice");
    eprintln!("failover: every key replayed {:?} after the kill", started.elapsed());

    // The old primary comes back as the new one's replica: new keys execute, acknowledged.
    primary.restart_as_replica_of(replica.port);
    let fresh = post_through_failover(&client, &url, "after-failover", Duration::from_secs(10)).await;
    assert_eq!(fresh.status, StatusCode::CREATED, "{fresh:?}");
    assert_eq!(executions(&upstream).len(), keys.len() + 1);
    let stored: Vec<String> = primary.query(redis::cmd("KEYS").arg("*"));
    assert_eq!(stored.len(), keys.len() + 1, "the new replica holds every key");
}

/// `min_replicas = 1` with no replica attached: keyed POSTs are not forwarded (503 with
/// `Retry-After`, their keys released), pass-through GETs are; a replay stays fast while every
/// acknowledged write waits out its `WAIT`; `/readyz` says why it is not ready; with
/// `store_failure = "open"` keyed POSTs are forwarded unprotected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replica_to_acknowledge_nothing_is_forwarded() {
    let redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let client = TestClient::new();
    // A key completed by a proxy that waits for no replica.
    let plain = TestProxy::to(&upstream).redis(&redis).start().await;
    let completed = client.post_keyed(&plain.url("/orders"), "completed-before", "{}").await;
    assert_eq!(completed.status, StatusCode::CREATED);

    let store = format!(
        "store.redis = \"{}\"\nstore.command_timeout = \"2s\"\nstore.min_replicas = 1\nstore.replica_timeout = \"1s\"",
        redis.url()
    );
    let proxy = TestProxy::to(&upstream).config(&store).admin().start().await;
    let url = proxy.url("/orders");
    let started = Instant::now();
    let refused: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.post_keyed(&url, &format!("unacknowledged-{i}"), "{}").await })
        })
        .collect();
    // Meanwhile every connection for acknowledged writes is blocked on its WAIT: a replay and a
    // GET do not wait for them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let replay_started = Instant::now();
    let replay = client.post_keyed(&url, "completed-before", "{}").await;
    let replay_took = replay_started.elapsed();
    assert_eq!(replay.header("idempotent-replayed"), Some("true"), "{replay:?}");
    assert!(
        replay_took < Duration::from_millis(500),
        "the replay took {replay_took:?}"
    );
    let get = client.send(Method::GET, &url, &[], "").await;
    assert!(get.status.is_success(), "{get:?}");
    for response in refused {
        let response = response.await.expect("client task");
        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE, "{response:?}");
        assert!(response.header("retry-after").is_some(), "{response:?}");
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "each waited for its WAIT");
    let forwarded = executions(&upstream);
    assert_eq!(forwarded.len(), 1, "only the key completed before ran: {forwarded:?}");
    let stored: Vec<String> = redis.query(redis::cmd("KEYS").arg("*"));
    assert_eq!(stored.len(), 1, "the refused keys were released: {stored:?}");

    let admin = proxy.admin.expect("an admin listener");
    let ready = client
        .send(Method::GET, &format!("http://{admin}/readyz"), &[], "")
        .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
    assert!(
        String::from_utf8_lossy(&ready.body).contains("0 replica(s) attached"),
        "{ready:?}"
    );
    let metrics = client
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains(r#"idemproxy_redis_replica_acks_total{result="timed_out"} 6"#),
        "{metrics}"
    );

    let open = TestProxy::to(&upstream)
        .config(&store)
        .idempotency("store_failure = \"open\"")
        .start()
        .await;
    let forwarded = client.post_keyed(&open.url("/orders"), "unprotected", "{}").await;
    assert_eq!(forwarded.status, StatusCode::CREATED, "{forwarded:?}");
    assert_eq!(executions(&upstream).get("unprotected"), Some(&1));
}

/// What the soak's clients saw.
#[derive(Default)]
struct Seen {
    keys: Vec<String>,
    statuses: HashMap<u16, usize>,
    /// 2xx bodies per key: a replay must repeat the first.
    bodies: HashMap<String, Vec<bytes::Bytes>>,
}

impl Seen {
    fn record(&mut self, key: &str, response: &TestResponse) {
        *self.statuses.entry(response.status.as_u16()).or_default() += 1;
        if response.status.is_success() {
            self.bodies
                .entry(key.to_owned())
                .or_default()
                .push(response.body.clone());
        }
    }
}

/// Four clients, each sending new keys and retrying each 0-2 times over the two proxies (some
/// executions slow, so that failovers cut some off), until `running` is cleared.
fn spawn_clients(
    urls: [String; 2],
    seen: Arc<Mutex<Seen>>,
    running: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next_key = Arc::new(AtomicUsize::new(0));
    (0..4u64)
        .map(|client| {
            let (seen, running, next_key, urls) = (seen.clone(), running.clone(), next_key.clone(), urls.clone());
            tokio::spawn(async move {
                let http = TestClient::new();
                let mut turn = client;
                while running.load(Ordering::SeqCst) {
                    let key = format!("soak-{}", next_key.fetch_add(1, Ordering::SeqCst));
                    seen.lock().expect("lock").keys.push(key.clone());
                    let delay = if turn % 4 == 0 { "40" } else { "0" };
                    for attempt in 0..1 + turn % 3 {
                        let url = &urls[((turn + attempt) % 2) as usize];
                        let headers = [("idempotency-key", key.as_str()), ("x-upstream-delay-ms", delay)];
                        if let Ok(response) = http.try_send(Method::POST, url, &headers, "{}").await {
                            seen.lock().expect("lock").record(&key, &response);
                        }
                        tokio::time::sleep(Duration::from_millis(10 + turn % 50)).await;
                    }
                    turn = turn.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 1;
                }
            })
        })
        .collect()
}

/// Kills the primary, waits until the sentinels promote the other node, brings the killed one
/// back as its replica; again every few seconds until `deadline`, at least three times.
/// Returns the number of failovers.
fn fail_over_repeatedly(nodes: &mut [RedisServer; 2], sentinels: &SentinelSet, deadline: Instant) -> usize {
    let (mut primary, mut failovers) = (0, 0);
    while failovers < 3 || Instant::now() + Duration::from_secs(5) < deadline {
        std::thread::sleep(Duration::from_secs(2));
        let promoted = 1 - primary;
        nodes[primary].kill();
        let started = Instant::now();
        sentinels.wait_for_master(nodes[promoted].port, Duration::from_secs(20));
        eprintln!("soak: failover {} done in {:?}", failovers + 1, started.elapsed());
        let promoted_port = nodes[promoted].port;
        nodes[primary].rejoin_as_replica_of(promoted_port);
        primary = replicated_primary(nodes, sentinels);
        failovers += 1;
    }
    failovers
}

/// The node the sentinels name as primary, once the other one acknowledges its writes (30 s at
/// most). Usually the one just promoted; but Sentinel may fail over again while the old primary
/// comes back (with a quorum of 1 it did, promoting the node just restarted).
fn replicated_primary(nodes: &[RedisServer; 2], sentinels: &SentinelSet) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let named = sentinels
            .master_port()
            .and_then(|port| nodes.iter().position(|n| n.port == port));
        if let Some(primary) = named {
            if replica_acknowledges_writes_to(nodes[primary].port) {
                return primary;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no primary with an acknowledging replica within 30 s of a failover");
}

/// Retries every key once through `url`: a key that ran before is replayed or outcome-unknown,
/// never run again. Returns (replayed, outcome-unknown).
async fn retry_every_key(
    url: &str,
    keys: &[String],
    ran: &HashMap<String, usize>,
    seen: &Mutex<Seen>,
) -> (usize, usize) {
    let (mut replayed, mut unknown) = (0, 0);
    let http = TestClient::new();
    for key in keys {
        let response = post_through_failover(&http, url, key, Duration::from_secs(10)).await;
        assert_ne!(
            response.status,
            StatusCode::CONFLICT,
            "{key} stuck in flight: {response:?}"
        );
        if ran.get(key) == Some(&1) && response.status.is_success() {
            assert_eq!(response.header("idempotent-replayed"), Some("true"), "{key} ran again");
            replayed += 1;
        } else if !response.status.is_success() {
            assert!(
                response.problem_type().ends_with("#outcome-unknown"),
                "{key}: {response:?}"
            );
            unknown += 1;
        }
        seen.lock().expect("lock").record(key, &response);
    }
    (replayed, unknown)
}

/// A soak like `tests/soak.rs`: clients retrying keyed POSTs over two proxies (one in this
/// process, one the binary with `--redis-min-replicas 1`) sharing a Sentinel group, while the
/// primary is SIGKILLed and brought back as the new primary's replica, again and again. Then
/// every key is retried once more: no key executed twice, every retry of a key that ran is its
/// replay or outcome-unknown. About 20 s and at least three failovers; `IDEMPROXY_SOAK_SECS`
/// sets the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_under_load_execute_no_key_twice() {
    let seconds: u64 = std::env::var("IDEMPROXY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let first = RedisServer::start();
    let second = RedisServer::start_replica_of(&first);
    let sentinels = SentinelSet::start(&first, 3, 1);
    let mut nodes = [first, second];
    let upstream = TestUpstream::start().await;
    let steady = TestProxy::to(&upstream)
        .config(&format!(
            "store.redis = \"{}\"\nstore.command_timeout = \"500ms\"\nstore.min_replicas = 1",
            sentinels.url()
        ))
        .idempotency("lock_ttl = \"1s\"")
        .start()
        .await;
    let (upstream_url, sentinel_url) = (upstream.url(), sentinels.url());
    let binary = ProxyProcess::spawn(&[
        "--upstream",
        &upstream_url,
        "--redis",
        &sentinel_url,
        "--redis-min-replicas",
        "1",
        "--lock-ttl",
        "1s",
    ]);
    let urls = [steady.url("/orders"), binary.url("/orders")];
    let seen = Arc::new(Mutex::new(Seen::default()));
    let running = Arc::new(AtomicBool::new(true));
    let clients = spawn_clients(urls.clone(), seen.clone(), running.clone());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let failovers = tokio::task::block_in_place(|| fail_over_repeatedly(&mut nodes, &sentinels, deadline));
    running.store(false, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client task");
    }

    // Leases of executions cut off by a failover lapse; then every key is retried once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys = seen.lock().expect("lock").keys.clone();
    let (replayed, unknown) = retry_every_key(&urls[0], &keys, &executions(&upstream), &seen).await;
    let after = executions(&upstream);
    let twice: Vec<_> = after.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys executed more than once: {twice:?}");
    let seen = seen.lock().expect("lock");
    for (key, bodies) in &seen.bodies {
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{key}: answers differ");
    }
    eprintln!(
        "soak: {failovers} failovers, {} keys, {} executions, final retries: {replayed} replayed, \
         {unknown} outcome-unknown; statuses {:?}",
        keys.len(),
        after.values().sum::<usize>(),
        seen.statuses,
    );
    assert!(failovers >= 3, "the soak failed over several times");
    assert!(
        replayed >= keys.len() / 5,
        "keys ran between the failovers and were replayed"
    );
}
