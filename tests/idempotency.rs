//! Idempotency-Key enforcement end to end (docs/behaviour.md §1-§8), against a real upstream and a real
//! `redis-server`. Every behaviour that does not depend on the store is written once and runs
//! against each store (`memory::<behaviour>`, `disk::<behaviour>`, `redis::<behaviour>`: the
//! `per_store!` list below;
//! another store is one more line there and a `common::Backend` variant);
//! what only one store can show (two proxies sharing Redis, Redis down, its command budget; a
//! full embedded store) follows as single tests. The behaviours that end in one of the proxy's
//! own errors run once per error form as well (`problem::<store>::<behaviour>`,
//! `stripe::<store>::<behaviour>`: docs/behaviour.md §8 and §16, retry hints included).

mod common;

use std::time::Duration;

use common::{
    assert_error, assert_executed, assert_problem, assert_replay_of, count_status, per_store, per_store_and_form,
    start_harness, Backend, ErrorForm, ProxyProcess, RedisServer, TestClient, TestProxy, TestResponse, TestUpstream,
};
use futures::future::join_all;
use http::{Method, StatusCode};

/// Sends `n` copies of one keyed `POST {}` at once, the i-th to `url(i)`, each on its own
/// connection; the upstream takes `delay_ms` to answer each.
async fn duplicates_at_once(n: usize, url: impl Fn(usize) -> String, key: &str, delay_ms: &str) -> Vec<TestResponse> {
    let headers = [("idempotency-key", key), ("x-upstream-delay-ms", delay_ms)];
    join_all((0..n).map(|i| {
        let url = url(i);
        let headers = &headers;
        async move { TestClient::new().send(Method::POST, &url, headers, "{}").await }
    }))
    .await
}

/// `POST {}` to `url` with `Idempotency-Key: key` and the `extra` headers.
async fn post_keyed_with(client: &TestClient, url: &str, key: &str, extra: &[(&str, &str)]) -> TestResponse {
    let headers: Vec<_> = [("idempotency-key", key)]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    client.send(Method::POST, url, &headers, "{}").await
}

// ---- Every store --------------------------------------------------------------------------

async fn replay_is_identical_and_marked(store: Backend) {
    let (upstream, proxy, client) = start_harness(|up| store.proxy(up)).await;
    let url = proxy.url("/orders?src=app");
    let first = client
        .send(
            Method::POST,
            &url,
            &[
                ("idempotency-key", "\"order-1\""),
                ("content-type", "application/json"),
                ("x-upstream-header", "set-cookie=a=1"),
                ("x-upstream-header", "location=/orders/1"),
            ],
            "{\"n\":1}",
        )
        .await;
    let again = client
        .send(
            Method::POST,
            &url,
            &[("idempotency-key", "\"order-1\""), ("content-type", "application/json")],
            "{\"n\":1}",
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(again.status, first.status);
    assert_replay_of(&again, &first);
    for name in ["content-type", "x-hit", "set-cookie", "location", "via"] {
        assert_eq!(again.header(name), first.header(name), "header {name}");
    }
    assert_eq!(first.header("idempotent-replayed"), None);
    assert!(again.header("date").is_some(), "a replay carries a fresh Date");
    assert_eq!(upstream.hits(), 1);
}

/// `422` `key-reused`; Stripe's `400` `idempotency_error`.
async fn same_key_with_changed_body_or_path_is_422(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| store.proxy(up).error_form(form)).await;
    let first = client.post_keyed(&proxy.url("/orders"), "k-422", "{\"n\":1}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The same key again with another body, another path, another query.
    for (path, body) in [
        ("/orders", "{\"n\":2}"),
        ("/refunds", "{\"n\":1}"),
        ("/orders?x=1", "{\"n\":1}"),
    ] {
        let reused = client.post_keyed(&proxy.url(path), "k-422", body).await;
        assert_error(&reused, form, form.key_reused_status(), "key-reused");
        assert_eq!(reused.retry_hint(), None, "the SDK does not retry a 400 anyway");
    }
    assert_eq!(upstream.hits(), 1);
}

async fn forty_concurrent_duplicates_execute_once(store: Backend, form: ErrorForm) {
    let (upstream, proxy, _) = start_harness(|up| store.proxy(up).error_form(form)).await;
    let url = proxy.url("/orders");
    let responses = duplicates_at_once(40, |_| url.clone(), "storm", "500").await;
    assert_eq!(upstream.hits(), 1);
    assert_eq!(count_status(&responses, StatusCode::CREATED), 1, "{responses:?}");
    assert_eq!(count_status(&responses, StatusCode::CONFLICT), 39);
    for conflict in responses.iter().filter(|r| r.status == StatusCode::CONFLICT) {
        assert_eq!(conflict.header("retry-after"), Some("1"));
        assert_eq!(conflict.error_slug(form), "request-in-progress");
        assert_eq!(conflict.retry_hint(), form.hint(true));
    }
}

async fn with_wait_every_duplicate_gets_the_one_result(store: Backend) {
    let (upstream, proxy, _) = start_harness(|up| {
        store
            .proxy(up)
            .idempotency("on_conflict = \"wait\"\nwait_timeout = \"5s\"")
    })
    .await;
    let url = proxy.url("/orders");
    let responses = duplicates_at_once(40, |_| url.clone(), "wait-storm", "300").await;
    assert_eq!(upstream.hits(), 1);
    for response in &responses {
        assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
        assert_eq!(response.body, responses[0].body);
    }
    let replayed = responses
        .iter()
        .filter(|r| r.header("idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(replayed, 39);
}

async fn keys_are_scoped_by_authorization(store: Backend) {
    let (upstream, proxy, client) = start_harness(|up| store.proxy(up)).await;
    let url = proxy.url("/orders");
    let as_alice = [("authorization", "Bearer alice")];
    let alice = post_keyed_with(&client, &url, "k", &as_alice).await;
    let bob = post_keyed_with(&client, &url, "k", &[("authorization", "Bearer bob")]).await;
    assert_eq!(alice.status, StatusCode::CREATED);
    assert_executed(&bob);
    assert_ne!(alice.hit(), bob.hit());
    let alice_again = post_keyed_with(&client, &url, "k", &as_alice).await;
    assert_eq!(alice_again.hit(), alice.hit());
    assert_eq!(upstream.hits(), 2);
    // The store holds hashes only: neither the key nor the credential appears in it (where it
    // can be read from outside: Redis).
    if let Some(keys) = store.stored_keys() {
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.iter().all(|k| !k.contains("alice") && !k.contains("bob")));
    }
}

/// A recorded 5xx (a 500: 503 is released by default, docs/behaviour.md §14) is replayed as is;
/// with a retry hint header, it and its replays say that retrying cannot help (the upstream's
/// own hint is replaced), while a recorded 2xx gets none.
async fn server_errors_are_recorded_by_default(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| store.proxy(up).error_form(form)).await;
    let url = proxy.url("/orders");
    let failing = [
        ("x-upstream-status", "500"),
        ("x-upstream-header", "stripe-should-retry=true"),
    ];
    let first = post_keyed_with(&client, &url, "k5xx", &failing).await;
    let again = post_keyed_with(&client, &url, "k5xx", &failing).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_replay_of(&again, &first);
    let upstreams_hint = Some("true");
    assert_eq!(first.retry_hint(), form.hint(false).or(upstreams_hint));
    assert_eq!(again.retry_hint(), form.hint(false).or(upstreams_hint));
    assert_eq!(again.headers.get_all("stripe-should-retry").iter().count(), 1);
    client.post_keyed(&url, "k2xx", "{}").await;
    assert_eq!(client.post_keyed(&url, "k2xx", "{}").await.retry_hint(), None);
    assert_eq!(upstream.hits(), 2);
}

/// docs/behaviour.md §14: `429` and `503` say the request was not processed. They are relayed,
/// and the key is left free: the retry executes (503 was recorded before this default).
async fn too_many_requests_and_service_unavailable_release_the_key_by_default(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store.proxy(&upstream).start().await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    for (key, status) in [
        ("k429", StatusCode::TOO_MANY_REQUESTS),
        ("k503", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let code = status.as_u16().to_string();
        let refused = post_keyed_with(&client, &url, key, &[("x-upstream-status", &code)]).await;
        assert_eq!(refused.status, status);
        assert_eq!(
            refused.header("content-type"),
            Some("application/json"),
            "relayed as is"
        );
        let retried = client.post_keyed(&url, key, "{}").await;
        assert_eq!(retried.status, StatusCode::CREATED, "{key}");
        assert_eq!(retried.header("idempotent-replayed"), None);
        assert_ne!(retried.hit(), refused.hit());
        let replayed = client.post_keyed(&url, key, "{}").await;
        assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(upstream.hits(), 4);
}

async fn server_errors_release_the_key_when_not_recorded(store: Backend) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).idempotency("record_server_errors = false")).await;
    let url = proxy.url("/orders");
    let failed = post_keyed_with(&client, &url, "k5xx", &[("x-upstream-status", "500")]).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_executed(&client.post_keyed(&url, "k5xx", "{}").await);
    assert_eq!(upstream.hits(), 2);
}

async fn keys_expire_after_key_ttl(store: Backend) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).idempotency("key_ttl = \"1s\"\nlock_ttl = \"500ms\"")).await;
    let url = proxy.url("/orders");
    let first = client.post_keyed(&url, "short-lived", "{}").await;
    let replay = client.post_keyed(&url, "short-lived", "{}").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = client.post_keyed(&url, "short-lived", "{}").await;
    assert_executed(&after);
    assert_ne!(after.hit(), first.hit());
    assert_eq!(upstream.hits(), 2);
}

async fn lease_is_renewed_while_a_slow_upstream_runs(store: Backend) {
    let (upstream, proxy, _) = start_harness(|up| store.proxy(up).idempotency("lock_ttl = \"300ms\"")).await;
    let url = proxy.url("/orders");
    let slow = common::spawn_slow_keyed_post(&url, "slow", 1500);
    // Well past several lock_ttl periods, the lease must still be alive: 409, not a takeover
    // or outcome-unknown.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = TestClient::new().post_keyed(&url, "slow", "{}").await;
    assert_eq!(during.status, StatusCode::CONFLICT, "{during:?}");
    let first = slow.await.expect("task");
    assert_eq!(first.status, StatusCode::CREATED);
    let after = TestClient::new().post_keyed(&url, "slow", "{}").await;
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 1);
}

async fn upstream_slower_than_timeout_is_504_then_outcome_unknown(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).config("upstream.timeout = \"300ms\"").error_form(form)).await;
    let url = proxy.url("/orders");
    // The first attempt times out, and so does its retry while the first still runs.
    for _attempt in ["first", "retry"] {
        let timed_out = post_keyed_with(&client, &url, "too-slow", &[("x-upstream-delay-ms", "1000")]).await;
        assert_error(&timed_out, form, StatusCode::GATEWAY_TIMEOUT, "outcome-unknown");
        assert_eq!(timed_out.retry_hint(), form.hint(false));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = client.post_keyed(&url, "too-slow", "{}").await;
    assert_eq!(later.error_slug(form), "outcome-unknown");
    assert_eq!(upstream.hits(), 1);
}

async fn timeout_with_unknown_outcome_retry_runs_again(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| {
        store
            .proxy(up)
            .config("upstream.timeout = \"300ms\"")
            .idempotency("unknown_outcome = \"retry\"")
            .error_form(form)
    })
    .await;
    let url = proxy.url("/orders");
    let first = post_keyed_with(&client, &url, "again", &[("x-upstream-delay-ms", "1000")]).await;
    assert_error(&first, form, StatusCode::GATEWAY_TIMEOUT, "upstream-timeout");
    assert_eq!(
        first.retry_hint(),
        None,
        "the SDK's own rule (retry a 5xx) is right here"
    );
    assert_executed(&client.post_keyed(&url, "again", "{}").await);
    assert_eq!(upstream.hits(), 2);
}

async fn client_disconnect_does_not_cancel_and_the_retry_gets_the_replay(store: Backend) {
    let (upstream, proxy, _) = start_harness(|up| store.proxy(up)).await;
    let url = proxy.url("/orders");
    let gone = tokio::time::timeout(
        Duration::from_millis(150),
        post_keyed_with(&TestClient::new(), &url, "left", &[("x-upstream-delay-ms", "500")]),
    )
    .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let retry = TestClient::new().post_keyed(&url, "left", "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.hit(), 1);
    assert_eq!(upstream.hits(), 1);
}

async fn invalid_keys_are_400_and_not_forwarded(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| store.proxy(up).error_form(form)).await;
    let url = proxy.url("/orders");
    let long = "k".repeat(256);
    for key in ["", "\"unterminated", "two words", "\"a\";param=1", long.as_str()] {
        let response = post_keyed_with(&client, &url, key, &[]).await;
        assert_error(&response, form, StatusCode::BAD_REQUEST, "invalid-key");
    }
    let twice = post_keyed_with(&client, &url, "a", &[("idempotency-key", "a")]).await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    assert_eq!(upstream.hits(), 0);
}

async fn require_key_refuses_keyless_guarded_methods_only(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).idempotency("require_key = true").error_form(form)).await;
    let url = proxy.url("/orders");
    let keyless = client.send(Method::POST, &url, &[], "{}").await;
    assert_error(&keyless, form, StatusCode::BAD_REQUEST, "missing-key");
    assert_eq!(
        client.send(Method::GET, &url, &[], "").await.status,
        StatusCode::CREATED
    );
    assert_eq!(upstream.hits(), 1);
}

async fn patch_is_guarded_only_when_configured(store: Backend) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).idempotency("methods = [\"POST\", \"PATCH\"]")).await;
    let url = proxy.url("/orders/1");
    let keyed = [("idempotency-key", "p")];
    let first = client.send(Method::PATCH, &url, &keyed, "{}").await;
    let again = client.send(Method::PATCH, &url, &keyed, "{}").await;
    assert_replay_of(&again, &first);
    let put = client.send(Method::PUT, &url, &keyed, "{}").await;
    let put_again = client.send(Method::PUT, &url, &keyed, "{}").await;
    assert_ne!(put.body, put_again.body, "PUT passes through");
    assert_eq!(upstream.hits(), 3);
}

async fn oversized_request_body_is_413_before_forwarding(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).idempotency("max_body_bytes = 1024").error_form(form)).await;
    let url = proxy.url("/orders");
    let big = "x".repeat(2048);
    let response = client.post_keyed(&url, "big", &big).await;
    assert_error(&response, form, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    let keyless = client.send(Method::POST, &url, &[], big.clone()).await;
    assert_eq!(keyless.status, StatusCode::CREATED, "keyless requests are not limited");
    assert_eq!(upstream.hits(), 1);
}

async fn oversized_response_is_streamed_once_and_never_replayed(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| {
        store
            .proxy(up)
            .idempotency("max_response_bytes = 100000")
            .error_form(form)
    })
    .await;
    let url = proxy.url("/export");
    let export = || post_keyed_with(&client, &url, "huge", &[("x-upstream-body-bytes", "1000000")]);
    let first = export().await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 1_000_000);
    let retry = export().await;
    assert_error(&retry, form, StatusCode::BAD_GATEWAY, "response-not-replayable");
    assert_eq!(retry.retry_hint(), form.hint(false));
    assert_eq!(upstream.hits(), 1);
}

async fn unreachable_upstream_releases_the_key(store: Backend, form: ErrorForm) {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;
    upstream.stop();
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let proxy = TestProxy::to_url(format!("http://{addr}"))
        .store(&store)
        .error_form(form)
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let refused = client.post_keyed(&url, "retry-me", "{}").await;
    assert_error(&refused, form, StatusCode::BAD_GATEWAY, "upstream-unreachable");
    let upstream = TestUpstream::start_on(addr).await;
    assert_executed(&client.post_keyed(&url, "retry-me", "{}").await);
    assert_eq!(upstream.hits(), 1);
}

async fn upstream_reset_after_sending_is_outcome_unknown(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| store.proxy(up).error_form(form)).await;
    let url = proxy.url("/orders");
    let first = post_keyed_with(&client, &url, "reset", &[("x-upstream-reset", "1")]).await;
    assert_error(&first, form, StatusCode::BAD_GATEWAY, "outcome-unknown");
    assert_eq!(first.retry_hint(), form.hint(false));
    let retry = client.post_keyed(&url, "reset", "{}").await;
    assert_eq!(retry.error_slug(form), "outcome-unknown");
    assert_eq!(upstream.hits(), 1);
}

per_store! {
    stores {
        memory => Backend::memory(),
        disk => Backend::disk(),
        redis => Backend::redis(),
    }
    tests {
        replay_is_identical_and_marked,
        with_wait_every_duplicate_gets_the_one_result,
        keys_are_scoped_by_authorization,
        too_many_requests_and_service_unavailable_release_the_key_by_default,
        server_errors_release_the_key_when_not_recorded,
        keys_expire_after_key_ttl,
        lease_is_renewed_while_a_slow_upstream_runs,
        client_disconnect_does_not_cancel_and_the_retry_gets_the_replay,
        patch_is_guarded_only_when_configured,
    }
}

per_store_and_form! {
    forms {
        problem => ErrorForm::Problem,
        stripe => ErrorForm::Stripe,
    }
    stores {
        memory => Backend::memory(),
        disk => Backend::disk(),
        redis => Backend::redis(),
    }
    tests {
        same_key_with_changed_body_or_path_is_422,
        forty_concurrent_duplicates_execute_once,
        server_errors_are_recorded_by_default,
        upstream_slower_than_timeout_is_504_then_outcome_unknown,
        timeout_with_unknown_outcome_retry_runs_again,
        invalid_keys_are_400_and_not_forwarded,
        require_key_refuses_keyless_guarded_methods_only,
        oversized_request_body_is_413_before_forwarding,
        oversized_response_is_streamed_once_and_never_replayed,
        unreachable_upstream_releases_the_key,
        upstream_reset_after_sending_is_outcome_unknown,
    }
}

// ---- Redis only: a store shared between proxies, Redis outages, the Redis command budget ----

#[tokio::test]
async fn two_proxies_sharing_redis_execute_once() {
    let redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let a = TestProxy::to(&upstream).redis(&redis).start().await;
    let b = TestProxy::to(&upstream).redis(&redis).start().await;
    let either = |i: usize| {
        if i.is_multiple_of(2) {
            a.url("/orders")
        } else {
            b.url("/orders")
        }
    };
    let responses = duplicates_at_once(20, either, "shared", "300").await;
    assert_eq!(upstream.hits(), 1);
    assert_eq!(count_status(&responses, StatusCode::CREATED), 1);
    assert_eq!(count_status(&responses, StatusCode::CONFLICT), 19);
    let client = TestClient::new();
    let from_a = client.post_keyed(&a.url("/orders"), "shared", "{}").await;
    let from_b = client.post_keyed(&b.url("/orders"), "shared", "{}").await;
    assert_replay_of(&from_a, &from_b);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn redis_down_fails_closed_and_recovers_without_restart() {
    let mut redis = RedisServer::start();
    let (upstream, proxy, client) = start_harness(|up| TestProxy::to(up).redis(&redis)).await;
    let stripe = TestProxy::to(&upstream)
        .redis(&redis)
        .error_form(ErrorForm::Stripe)
        .start()
        .await;
    let url = proxy.url("/orders");
    assert_eq!(
        client.post_keyed(&url, "before", "{}").await.status,
        StatusCode::CREATED
    );
    redis.kill();
    for (proxy, form) in [(&proxy, ErrorForm::Problem), (&stripe, ErrorForm::Stripe)] {
        let down = client.post_keyed(&proxy.url("/orders"), "during", "{}").await;
        assert_error(&down, form, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
        assert_eq!(down.header("retry-after"), Some("1"));
        assert_eq!(down.retry_hint(), form.hint(true));
    }
    let passthrough = client.send(Method::GET, &url, &[], "").await;
    assert_eq!(passthrough.status, StatusCode::CREATED, "pass-through is unaffected");
    assert_eq!(upstream.hits(), 2, "nothing guarded was forwarded");
    redis.restart();
    let mut recovered = None;
    for _ in 0..50 {
        let response = client.post_keyed(&url, "after", "{}").await;
        if response.status == StatusCode::CREATED {
            recovered = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered.is_some(), "guarded requests work again once Redis is back");
}

#[tokio::test]
async fn redis_down_fails_open_when_configured() {
    let mut redis = RedisServer::start();
    let (upstream, proxy, client) =
        start_harness(|up| TestProxy::to(up).redis(&redis).idempotency("store_failure = \"open\"")).await;
    redis.kill();
    let url = proxy.url("/orders");
    let first = client.post_keyed(&url, "open", "{}").await;
    let second = client.post_keyed(&url, "open", "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(upstream.hits(), 2, "unprotected: both were forwarded");
}

#[tokio::test]
async fn redis_command_budget_is_two_per_execution_and_one_per_replay() {
    let redis = RedisServer::start();
    let (_upstream, proxy, client) = start_harness(|up| TestProxy::to(up).redis(&redis)).await;
    let url = proxy.url("/orders");
    // Warm up: loads the scripts once.
    client.post_keyed(&url, "warm-up", "{}").await;
    // `INFO commandstats` also counts the commands a script runs inside Redis: the maps below
    // are exactly the commands sent plus what the one script (finish: GET, SET, and the
    // SPUBLISH that wakes the key's waiters, docs/behaviour.md §15.2) runs, so any extra
    // command sent by the proxy would show up as a surplus.
    let stats = |redis: &RedisServer| -> Vec<(String, u64)> {
        let mut calls: Vec<_> = redis
            .command_calls()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("config") && !name.starts_with("info"))
            .collect();
        calls.sort();
        calls
    };
    let expect =
        |pairs: &[(&str, u64)]| -> Vec<(String, u64)> { pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect() };
    redis.reset_stats();
    for i in 0..10 {
        client.post_keyed(&url, &format!("budget-{i}"), "{}").await;
    }
    // Sent: begin = SET NX GET, complete = EVALSHA; in the script: GET, SET KEEPTTL, SPUBLISH.
    assert_eq!(
        stats(&redis),
        expect(&[("evalsha", 10), ("get", 10), ("set", 20), ("spublish", 10)]),
        "two round trips per first execution"
    );
    redis.reset_stats();
    for i in 0..10 {
        let replay = client.post_keyed(&url, &format!("budget-{i}"), "{}").await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    }
    // Sent: begin = SET NX GET, which answers the completed record and writes nothing.
    assert_eq!(stats(&redis), expect(&[("set", 10)]), "one round trip per replay");
}

/// Kills a proxy process (SIGKILL) while its request runs upstream; the other proxy's retry
/// must not execute again.
async fn proxy_killed_mid_request(unknown_outcome: &str) -> (TestResponse, usize) {
    let redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let redis_url = redis.url();
    let upstream_url = upstream.url();
    let mut doomed = ProxyProcess::spawn(&[
        "--upstream",
        &upstream_url,
        "--redis",
        &redis_url,
        "--lock-ttl",
        "500ms",
        "--unknown-outcome",
        unknown_outcome,
    ]);
    let survivor = TestProxy::to(&upstream)
        .redis(&redis)
        .idempotency(&format!(
            "lock_ttl = \"500ms\"\nunknown_outcome = \"{unknown_outcome}\""
        ))
        .start()
        .await;
    let url = doomed.url("/orders");
    let in_flight = tokio::spawn(async move {
        TestClient::new()
            .try_send(
                Method::POST,
                &url,
                &[("idempotency-key", "crash"), ("x-upstream-delay-ms", "3000")],
                "{}",
            )
            .await
    });
    // Wait until the request reached the upstream, then kill the proxy executing it.
    for _ in 0..100 {
        if upstream.hits() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.hits(), 1);
    doomed.kill();
    assert!(in_flight.await.expect("task").is_err(), "the client saw the proxy die");
    let client = TestClient::new();
    let during = client.post_keyed(&survivor.url("/orders"), "crash", "{}").await;
    assert_eq!(
        during.status,
        StatusCode::CONFLICT,
        "lease still alive right after the crash"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = client.post_keyed(&survivor.url("/orders"), "crash", "{}").await;
    (after, upstream.hits())
}

#[tokio::test]
async fn proxy_killed_mid_request_makes_the_outcome_unknown() {
    let (after, hits) = proxy_killed_mid_request("reject").await;
    assert_problem(&after, StatusCode::BAD_GATEWAY, "outcome-unknown");
    assert_eq!(hits, 1, "never executed twice");
}

#[tokio::test]
async fn proxy_killed_mid_request_reexecutes_with_unknown_outcome_retry() {
    let (after, hits) = proxy_killed_mid_request("retry").await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(hits, 2, "at-least-once by choice: the retry ran again");
}

// ---- Memory only ------------------------------------------------------------------------------

/// A full embedded store is a store failure like an unreachable Redis (docs/behaviour.md §7): closed (the
/// default), a new key gets `503`; with `store_failure = "open"` it is forwarded unprotected.
/// Keys already stored still replay in both.
#[tokio::test]
async fn full_memory_store_follows_store_failure() {
    let upstream = TestUpstream::start().await;
    let one_entry = || {
        TestProxy::to(&upstream)
            .config("store.embedded = \"memory\"")
            .config("store.memory_max_entries = 1")
    };
    let closed = one_entry().start().await;
    let open = one_entry().idempotency("store_failure = \"open\"").start().await;
    let client = TestClient::new();
    for proxy in [&closed, &open] {
        let first = client.post_keyed(&proxy.url("/orders"), "first", "{}").await;
        assert_eq!(first.status, StatusCode::CREATED, "the one record fits");
    }
    let refused = client.post_keyed(&closed.url("/orders"), "second", "{}").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.hits(), 2, "closed: the new key was not forwarded");
    for _ in 0..2 {
        let forwarded = client.post_keyed(&open.url("/orders"), "second", "{}").await;
        assert_eq!(forwarded.status, StatusCode::CREATED);
        assert_eq!(forwarded.header("idempotent-replayed"), None, "forwarded, not replayed");
    }
    assert_eq!(upstream.hits(), 4, "open: unprotected, both were forwarded");
    for proxy in [&closed, &open] {
        let replayed = client.post_keyed(&proxy.url("/orders"), "first", "{}").await;
        assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    }
    assert_eq!(upstream.hits(), 4, "stored keys replay");
}
