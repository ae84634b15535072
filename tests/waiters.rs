//! Waiting retries (`on_conflict = "wait"`, docs/behaviour.md §15): woken when the first request
//! settles its key, not by polling the store; in the same proxy through the proxy's own
//! registry (every store), across proxies through Redis sharded pub/sub. Each test is a real
//! proxy, a real upstream and, for Redis, a real `redis-server` whose command statistics count
//! what each waiter cost.

mod common;

use std::time::{Duration, Instant};

use common::{per_store, Backend, RedisServer, SentinelSet, TestClient, TestProxy, TestResponse, TestUpstream};
use futures::future::join_all;
use http::{Method, StatusCode};

const WAIT: &str = "on_conflict = \"wait\"\nwait_timeout = \"10s\"";

/// `POST {}` with `key` to `url`, the upstream taking `delay_ms` and answering `status`; with
/// the instant the answer came.
async fn post(url: &str, key: &str, delay_ms: u64, status: u16) -> (TestResponse, Instant) {
    let delay = delay_ms.to_string();
    let status = status.to_string();
    let headers = [
        ("idempotency-key", key),
        ("x-upstream-delay-ms", delay.as_str()),
        ("x-upstream-status", status.as_str()),
    ];
    let response = TestClient::new().send(Method::POST, url, &headers, "{}").await;
    (response, Instant::now())
}

/// A counter of `proxy`'s metrics, `0` when absent.
async fn metric(proxy: &TestProxy, series: &str) -> u64 {
    let admin = proxy.admin.expect("an admin listener");
    let text = TestClient::new()
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    let text = String::from_utf8_lossy(&text.body).into_owned();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

const WOKEN: &str = "idemproxy_wait_wakeups_total{reason=\"settled\"}";
const TIMED_OUT: &str = "idemproxy_wait_wakeups_total{reason=\"timed_out\"}";
const LOST: &str = "idemproxy_wait_wakeups_total{reason=\"lost\"}";

/// Sends the first request (the upstream takes 600 ms), then `n` waiting retries to `waiter_url`
/// once it is in flight; returns the first's answer and instant, and the waiters'.
async fn first_and_waiters(
    first_url: &str,
    waiter_url: &str,
    key: &str,
    n: usize,
) -> ((TestResponse, Instant), Vec<(TestResponse, Instant)>) {
    let first = post(first_url, key, 600, 201);
    let waiters = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        join_all((0..n).map(|_| post(waiter_url, key, 0, 201))).await
    };
    tokio::join!(first, waiters)
}

/// Every waiter got the first's answer, replayed; prints how long after the first each was
/// answered (the figure the load benchmark measures; asserted there, not here).
fn assert_replays_of(first: &(TestResponse, Instant), waiters: &[(TestResponse, Instant)]) {
    assert_eq!(first.0.status, StatusCode::CREATED, "{:?}", first.0);
    for (waiter, at) in waiters {
        assert_eq!(waiter.status, StatusCode::CREATED, "{waiter:?}");
        assert_eq!(waiter.header("idempotent-replayed"), Some("true"));
        assert_eq!(waiter.body, first.0.body);
        let after = at.saturating_duration_since(first.1);
        eprintln!("waiter answered {after:?} after the first");
    }
}

// ---- Every store --------------------------------------------------------------------------

/// A waiter is woken by the first request's completion (the wakeup is counted as such; no
/// wait ends at its deadline) and answered with its replay.
async fn a_waiter_is_woken_by_the_completion_and_replays_it(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store.proxy(&upstream).idempotency(WAIT).admin().start().await;
    let url = proxy.url("/orders");
    let started = Instant::now();
    let (first, waiters) = first_and_waiters(&url, &url, "woken", 3).await;
    assert_replays_of(&first, &waiters);
    assert_eq!(upstream.hits(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered before wait_timeout"
    );
    assert_eq!(
        metric(&proxy, WOKEN).await,
        3,
        "each waiter woken once, by the completion"
    );
    assert_eq!(metric(&proxy, TIMED_OUT).await, 0);
}

/// The first request's upstream answers 503 (released by the status policy, docs/behaviour.md
/// §6): its waiter is woken by the release, owns the key and executes it.
async fn a_waiter_whose_owner_releases_becomes_the_owner(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store.proxy(&upstream).idempotency(WAIT).admin().start().await;
    let url = proxy.url("/orders");
    let first = post(&url, "released", 600, 503);
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        post(&url, "released", 0, 201).await
    };
    let ((first, _), (waiter, _)) = tokio::join!(first, waiter);
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(waiter.status, StatusCode::CREATED, "{waiter:?}");
    assert_eq!(waiter.header("idempotent-replayed"), None, "executed, not replayed");
    assert_eq!(upstream.hits(), 2);
    assert_eq!(metric(&proxy, WOKEN).await, 1);
}

/// However it is woken, a wait ends at `wait_timeout`: 409 while the first still runs.
async fn a_wait_still_ends_at_wait_timeout(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("on_conflict = \"wait\"\nwait_timeout = \"300ms\"")
        .admin()
        .start()
        .await;
    let url = proxy.url("/orders");
    let first = post(&url, "slow", 1500, 201);
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = Instant::now();
        let (waiter, at) = post(&url, "slow", 0, 201).await;
        (waiter, at - sent)
    };
    let ((first, _), (waiter, waited)) = tokio::join!(first, waiter);
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(waiter.status, StatusCode::CONFLICT, "{waiter:?}");
    assert!(
        waited < Duration::from_millis(1300),
        "gave up at wait_timeout, not at completion: {waited:?}"
    );
    assert_eq!(metric(&proxy, TIMED_OUT).await, 1);
}

per_store! {
    stores { memory => Backend::memory(), disk => Backend::disk(), redis => Backend::redis() }
    tests {
        a_waiter_is_woken_by_the_completion_and_replays_it,
        a_waiter_whose_owner_releases_becomes_the_owner,
        a_wait_still_ends_at_wait_timeout,
    }
}

// ---- Redis: across proxies ------------------------------------------------------------------

/// Two proxies to `upstream` that wait for keys in flight, sharing the store `store` (a
/// configuration fragment), both with an admin listener.
async fn two_waiting_proxies(upstream: &TestUpstream, store: &str) -> (TestProxy, TestProxy) {
    let proxy = || TestProxy::to(upstream).config(store).idempotency(WAIT).admin().start();
    (proxy().await, proxy().await)
}

/// The configuration of a store on `server` (as `ProxyBuilder::redis` writes it).
fn redis_store(server: &RedisServer) -> String {
    format!("store.redis = \"{}\"\nstore.command_timeout = \"500ms\"", server.url())
}

/// Calls of `command` (lower case, as `INFO commandstats` names it) since the last reset.
fn calls(server: &RedisServer, command: &str) -> u64 {
    server.command_calls().get(command).copied().unwrap_or(0)
}

/// Waiters on proxy B are woken by the completion of the first request on proxy A, through the
/// key's channel: each costs its arrival's `SET … NX GET` and at most two more store commands
/// (the look after subscribing, the replay once woken), besides one shared subscription.
#[tokio::test]
async fn waiters_on_another_proxy_are_woken_through_the_keys_channel() {
    let server = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let (a, b) = two_waiting_proxies(&upstream, &redis_store(&server)).await;
    server.reset_stats();
    let waiters = 5;
    let (first, answers) = first_and_waiters(&a.url("/orders"), &b.url("/orders"), "across", waiters).await;
    assert_replays_of(&first, &answers);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(
        metric(&b, WOKEN).await,
        waiters as u64,
        "woken by the message, not a timeout"
    );
    // `INFO commandstats` counts the commands scripts run too: the owner's completion is one
    // script running a GET, a SET and the SPUBLISH; every other SET is a `begin`.
    let calls_seen = server.command_calls();
    let begins = calls(&server, "set") - calls(&server, "get");
    let per_waiter = (begins - 1) as f64 / waiters as f64;
    eprintln!("store commands per waiter, its arrival's included: {per_waiter}; {calls_seen:?}");
    assert!(
        begins <= 1 + 3 * waiters as u64,
        "{begins} begins for 1 owner and {waiters} waiters: {calls_seen:?}"
    );
    assert_eq!(
        calls(&server, "spublish"),
        1,
        "published from the completion script: {calls_seen:?}"
    );
    assert_eq!(
        calls(&server, "ssubscribe"),
        1,
        "one subscription for the key's waiters: {calls_seen:?}"
    );
    // The channel is let go with its last waiter.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let channels: Vec<String> = server.query(::redis::cmd("PUBSUB").arg("SHARDCHANNELS"));
        if channels.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still subscribed: {channels:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The subscription connection killed while a waiter waits: the waiter is woken as "lost",
/// subscribes again, looks again, and is still answered by the completion.
#[tokio::test]
async fn a_killed_subscription_connection_does_not_hang_waiters() {
    let server = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let (a, b) = two_waiting_proxies(&upstream, &redis_store(&server)).await;
    let first_url = a.url("/orders");
    let first = post(&first_url, "killed", 1200, 201);
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        post(&b.url("/orders"), "killed", 0, 201).await
    };
    let kill = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let killed: i64 = server.query(::redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
        assert_eq!(killed, 1, "one subscription connection for the proxy");
    };
    let (first, waiter, ()) = tokio::join!(first, waiter, kill);
    assert_replays_of(&first, &[waiter]);
    assert_eq!(metric(&b, LOST).await, 1);
    assert_eq!(
        metric(&b, WOKEN).await,
        1,
        "woken by the completion after subscribing again"
    );
    assert_eq!(metric(&b, "idemproxy_redis_subscription_losses_total").await, 1);
}

/// With Sentinel, the subscription goes to the master the sentinels name.
#[tokio::test]
async fn waiters_behind_sentinel_are_woken_across_proxies() {
    let primary = RedisServer::start();
    let sentinels = SentinelSet::start(&primary, 2, 0);
    let upstream = TestUpstream::start().await;
    let store = format!("store.redis = \"{}\"", sentinels.url());
    let (a, b) = two_waiting_proxies(&upstream, &store).await;
    let (first, answers) = first_and_waiters(&a.url("/orders"), &b.url("/orders"), "sentinel", 2).await;
    assert_replays_of(&first, &answers);
    assert_eq!(metric(&b, WOKEN).await, 2);
    assert_eq!(metric(&b, TIMED_OUT).await, 0);
}

/// The first request on proxy A is released (its upstream answers 503, docs/behaviour.md §14):
/// the waiter on proxy B is woken by the release script's message, owns the key and executes.
#[tokio::test]
async fn a_release_on_another_proxy_wakes_its_waiter_which_executes() {
    let server = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let (a, b) = two_waiting_proxies(&upstream, &redis_store(&server)).await;
    let first_url = a.url("/orders");
    let first = post(&first_url, "released-across", 600, 503);
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        post(&b.url("/orders"), "released-across", 0, 201).await
    };
    let ((first, _), (waiter, _)) = tokio::join!(first, waiter);
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(waiter.status, StatusCode::CREATED, "{waiter:?}");
    assert_eq!(waiter.header("idempotent-replayed"), None, "executed, not replayed");
    assert_eq!(upstream.hits(), 2);
    assert_eq!(metric(&b, WOKEN).await, 1);
}

/// An admin clear on proxy A of a key in flight wakes the waiter on proxy B (the clear publishes
/// on the key's channel in the same round trip): the key is free, the waiter owns it and
/// executes, answered before the first request's upstream has.
#[tokio::test]
async fn an_admin_clear_on_another_proxy_wakes_its_waiter() {
    let server = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let (a, b) = two_waiting_proxies(&upstream, &redis_store(&server)).await;
    let first_url = a.url("/orders");
    let first = post(&first_url, "cleared", 1500, 201);
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        post(&b.url("/orders"), "cleared", 0, 201).await
    };
    let clear = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let admin = a.admin.expect("an admin listener");
        let cleared = TestClient::new()
            .send(Method::DELETE, &format!("http://{admin}/keys/cleared"), &[], "")
            .await;
        assert!(cleared.status.is_success(), "{cleared:?}");
    };
    let ((_, first_at), (waiter, waiter_at), ()) = tokio::join!(first, waiter, clear);
    assert_eq!(waiter.status, StatusCode::CREATED, "{waiter:?}");
    assert_eq!(waiter.header("idempotent-replayed"), None, "executed, not replayed");
    assert!(waiter_at < first_at, "woken by the clear, not by the first's end");
    assert_eq!(upstream.hits(), 2);
    assert_eq!(metric(&b, WOKEN).await, 1);
}

/// After a failover the subscription follows the master the sentinels name: waiters on proxy B
/// are woken by completions on proxy A on the promoted replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_waiters_are_woken_through_the_new_master() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let sentinels = SentinelSet::start(&primary, 3, 1);
    let upstream = TestUpstream::start().await;
    let store = format!(
        "store.redis = \"{}\"\nstore.command_timeout = \"500ms\"",
        sentinels.url()
    );
    let (a, b) = two_waiting_proxies(&upstream, &store).await;
    let (first, answers) = first_and_waiters(&a.url("/orders"), &b.url("/orders"), "before", 1).await;
    assert_replays_of(&first, &answers);

    primary.kill();
    sentinels.wait_for_master(replica.port, Duration::from_secs(15));
    // Each proxy finds the new master (a store failure first, then a new key executes there).
    for (proxy, key) in [(&a, "follow-a"), (&b, "follow-b")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (response, _) = post(&proxy.url("/orders"), key, 0, 201).await;
            if response.status == StatusCode::CREATED {
                break;
            }
            assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE, "{response:?}");
            assert!(Instant::now() < deadline, "no new master found");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (first, answers) = first_and_waiters(&a.url("/orders"), &b.url("/orders"), "after", 2).await;
    assert_replays_of(&first, &answers);
    assert_eq!(
        metric(&b, WOKEN).await,
        3,
        "woken by the messages, before and after the failover"
    );
    assert_eq!(metric(&b, TIMED_OUT).await, 0);
}
