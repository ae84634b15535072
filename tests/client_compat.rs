//! Clients that cannot change (docs/behaviour.md §13-§14), end to end against a real upstream:
//! keys from another header, the JSON body or the query; fingerprints over canonical JSON that
//! ignore noise; a renamed replay header; upstream statuses that are not results. Behaviours
//! that do not depend on the store run against each store (`per_store!` below), and those that
//! concern the proxy's own errors and retry hints in each error form too
//! (`per_store_and_form!`, docs/behaviour.md §16).

mod common;

use common::{
    assert_error, assert_executed, per_store, per_store_and_form, start_harness, Backend, ErrorForm, TestClient,
    TestProxy, TestResponse, TestUpstream,
};
use http::{Method, StatusCode};

/// `POST` `body` to `url` with `headers` and `Content-Type: application/json`.
async fn post_json(client: &TestClient, url: &str, headers: &[(&str, &str)], body: &str) -> TestResponse {
    let headers: Vec<_> = [("content-type", "application/json")]
        .into_iter()
        .chain(headers.iter().copied())
        .collect();
    client.send(Method::POST, url, &headers, body.to_owned()).await
}

fn replayed(response: &TestResponse) -> bool {
    response.header("idempotent-replayed") == Some("true")
}

// ---- Every store --------------------------------------------------------------------------

async fn replay_keyed_by_x_request_id(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"header:X-Request-Id\"]")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let first = post_json(&client, &url, &[("x-request-id", "7b1e2f")], "{}").await;
    let again = post_json(&client, &url, &[("x-request-id", "7b1e2f")], "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(replayed(&again), "{again:?}");
    assert_eq!(again.body, first.body);
    // The Idempotency-Key is no source on this route: such requests pass through.
    let by_key = post_json(&client, &url, &[("idempotency-key", "7b1e2f")], "{}").await;
    assert!(!replayed(&by_key));
    let malformed = post_json(&client, &url, &[("x-request-id", "two words")], "{}").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert!(malformed.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("header:x-request-id")));
    assert_eq!(upstream.hits(), 2);
}

async fn keyed_by_a_body_field_with_no_header_at_all(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"header:Idempotency-Key\", \"json:/client_order_id\"]")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/payments");
    let body = r#"{"client_order_id": "ord-1", "amount": 1000}"#;
    let first = post_json(&client, &url, &[], body).await;
    let again = post_json(&client, &url, &[], body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(replayed(&again), "{again:?}");
    assert_eq!(again.hit(), first.hit());
    assert_eq!(
        upstream.requests()[0].body,
        body.as_bytes(),
        "forwarded from the buffer, intact"
    );
    // The same key with another body is another request; an integer id is a key too.
    let changed = post_json(&client, &url, &[], r#"{"client_order_id": "ord-1", "amount": 2000}"#).await;
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    let numbered = r#"{"client_order_id": 12345678901234567890, "amount": 5}"#;
    assert_eq!(
        post_json(&client, &url, &[], numbered).await.status,
        StatusCode::CREATED
    );
    assert!(replayed(&post_json(&client, &url, &[], numbered).await));
    // A header key and a body key of the same text are two keys.
    let by_header = post_json(&client, &url, &[("idempotency-key", "ord-1")], body).await;
    assert!(!replayed(&by_header));
    assert_eq!(upstream.hits(), 3);
}

async fn a_body_without_its_key_passes_through_or_is_refused(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"json:/client_order_id\"]\nbuffer_bytes = 1024")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/payments");
    // Not JSON, no such field, a body over buffer_bytes: no key, forwarded every time.
    let large = format!(r#"{{"client_order_id": "ord-9", "pad": "{}"}}"#, "x".repeat(2048));
    for body in ["not json", r#"{"amount": 1}"#, &large, &large] {
        let response = post_json(&client, &url, &[], body).await;
        assert_eq!(response.status, StatusCode::CREATED);
        assert!(!replayed(&response));
    }
    assert_eq!(upstream.requests()[2].body, large.as_bytes(), "streamed on, intact");
    // A key that breaks the header's rules is refused, and nothing is forwarded.
    for body in [
        r#"{"client_order_id": "a\tb"}"#,
        r#"{"client_order_id": 1.5}"#,
        r#"{"client_order_id": ""}"#,
    ] {
        let refused = post_json(&client, &url, &[], body).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(refused.problem_type().ends_with("#invalid-key"));
    }
    assert_eq!(upstream.hits(), 4);

    let strict = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"json:/client_order_id\"]\nrequire_key = true")
        .start()
        .await;
    let missing = post_json(&client, &strict.url("/payments"), &[], r#"{"amount": 1}"#).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.problem_type().ends_with("#missing-key"));
    assert_eq!(upstream.hits(), 4);
}

async fn a_large_body_still_takes_its_key_from_a_later_header(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"json:/id\", \"header:Idempotency-Key\"]\nbuffer_bytes = 512")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/uploads");
    let body = format!(r#"{{"id": "in-the-body", "data": "{}"}}"#, "y".repeat(4096));
    let first = post_json(&client, &url, &[("idempotency-key", "up-1")], &body).await;
    let again = post_json(&client, &url, &[("idempotency-key", "up-1")], &body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(replayed(&again));
    assert_eq!(upstream.requests()[0].body, body.as_bytes());
    assert_eq!(upstream.hits(), 1);
}

async fn keyed_by_a_query_parameter(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"query:request_id\"]")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders?request_id=q%2D1&x=1");
    let first = post_json(&client, &url, &[], "{}").await;
    let again = post_json(&client, &url, &[], "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(replayed(&again));
    assert_eq!(upstream.hits(), 1);
}

async fn reordered_json_with_a_changed_ignored_field_replays_and_a_real_change_is_422(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("fingerprint_body = \"json\"\nfingerprint_ignore = [\"/sent_at\", \"/meta/trace\"]")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let key = [("idempotency-key", "json-1")];
    let first = r#"{"amount": 9007199254740993, "currency": "EUR", "sent_at": "12:00:01", "meta": {"trace": "a"}}"#;
    let resent = "{\n  \"meta\": {\"trace\": \"b\"},\n  \"sent_at\": \"12:00:07\",\n  \"currency\": \"EUR\",\n  \"amount\": 9007199254740993\n}";
    let original = post_json(&client, &url, &key, first).await;
    let retry = post_json(&client, &url, &key, resent).await;
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(replayed(&retry), "{retry:?}");
    assert_eq!(retry.body, original.body);
    // The amount differs only as a double would not see it: a different request.
    let changed = r#"{"amount": 9007199254740992, "currency": "EUR", "sent_at": "12:00:01", "meta": {"trace": "a"}}"#;
    let mismatch = post_json(&client, &url, &key, changed).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(mismatch.problem_type().ends_with("#key-reused"));
    // A body that is not JSON is fingerprinted by its bytes.
    let text = [("idempotency-key", "text-1")];
    post_json(&client, &url, &text, "a=1&b=2").await;
    assert!(replayed(&post_json(&client, &url, &text, "a=1&b=2").await));
    assert_eq!(
        post_json(&client, &url, &text, "b=2&a=1").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(upstream.hits(), 2);
}

async fn renamed_replay_header_is_exposed_to_browsers(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("replay_header = \"X-Replayed\"")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let cors = [
        ("idempotency-key", "cors-1"),
        ("x-upstream-header", "access-control-allow-origin=https://shop.example"),
        ("x-upstream-header", "access-control-expose-headers=Location"),
    ];
    let first = post_json(&client, &url, &cors, "{}").await;
    let again = post_json(&client, &url, &cors, "{}").await;
    assert_eq!(first.header("x-replayed"), None);
    assert_eq!(again.header("x-replayed"), Some("true"));
    assert_eq!(again.header("idempotent-replayed"), None);
    let exposed: Vec<&str> = again
        .headers
        .get_all("access-control-expose-headers")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(exposed, ["Location", "x-replayed"]);
    // Without CORS nothing is exposed.
    post_json(&client, &url, &[("idempotency-key", "plain")], "{}").await;
    let plain = post_json(&client, &url, &[("idempotency-key", "plain")], "{}").await;
    assert_eq!(plain.header("x-replayed"), Some("true"));
    assert_eq!(plain.header("access-control-expose-headers"), None);
}

async fn a_504_listed_as_unknown_makes_the_retry_outcome_unknown(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("unknown_statuses = [502, 504]")
        .start()
        .await;
    let client = TestClient::new();
    let url = proxy.url("/orders");
    let gateway = [("idempotency-key", "gw-1"), ("x-upstream-status", "504")];
    let first = post_json(&client, &url, &gateway, "{}").await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        first.header("content-type"),
        Some("application/json"),
        "the upstream's answer, relayed"
    );
    let retry = post_json(&client, &url, &[("idempotency-key", "gw-1")], "{}").await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    assert!(retry.problem_type().ends_with("#outcome-unknown"));
    assert_eq!(upstream.hits(), 1);
    // Other 5xx are still recorded, and 503 (default release list) still releases.
    let other = [("idempotency-key", "gw-2"), ("x-upstream-status", "500")];
    post_json(&client, &url, &other, "{}").await;
    assert!(replayed(&post_json(&client, &url, &other, "{}").await));
    assert_eq!(upstream.hits(), 2);
}

/// Records written before key sources existed keep matching: the default source's storage key
/// is exactly `idem:{sha256(route, scope, key)}` (a fixed digest, where the store can be read).
async fn the_default_source_keeps_its_storage_key(store: Backend) {
    let upstream = TestUpstream::start().await;
    let proxy = store
        .proxy(&upstream)
        .idempotency("key_sources = [\"header:Idempotency-Key\", \"json:/id\"]")
        .start()
        .await;
    let client = TestClient::new();
    let headers = [("idempotency-key", "order-1"), ("authorization", "Bearer abc")];
    post_json(&client, &proxy.url("/orders"), &headers, "{}").await;
    assert!(replayed(
        &post_json(&client, &proxy.url("/orders"), &headers, "{}").await
    ));
    if let Some(keys) = store.stored_keys() {
        assert_eq!(
            keys,
            ["idem:{731691c1bdfd893d8c7a6162038699ab08516a592a9307d5563783a67cf74d29}"]
        );
    }
}

per_store! {
    stores {
        memory => Backend::memory(),
        disk => Backend::disk(),
        redis => Backend::redis(),
    }
    tests {
        replay_keyed_by_x_request_id,
        keyed_by_a_body_field_with_no_header_at_all,
        a_body_without_its_key_passes_through_or_is_refused,
        a_large_body_still_takes_its_key_from_a_later_header,
        keyed_by_a_query_parameter,
        reordered_json_with_a_changed_ignored_field_replays_and_a_real_change_is_422,
        renamed_replay_header_is_exposed_to_browsers,
        a_504_listed_as_unknown_makes_the_retry_outcome_unknown,
        the_default_source_keeps_its_storage_key,
    }
}

// ---- In the route's error form, with its retry hint (docs/behaviour.md §16) ----------------

/// What one of the proxy's own errors says to a human: the problem's `detail`, or Stripe's
/// `message`.
fn error_text(response: &TestResponse, form: ErrorForm) -> String {
    let json = response.json();
    let text = match form {
        ErrorForm::Problem => &json["detail"],
        ErrorForm::Stripe => &json["error"]["message"],
    };
    text.as_str().unwrap_or_default().to_owned()
}

/// Keys from other sources than the `Idempotency-Key` header fail in the route's error form: a
/// malformed body key or header key (naming its source), no key at all under `require_key`
/// (a body that is not JSON or lacks the field), a body key reused with another request.
async fn key_source_errors_are_in_the_routes_form(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| {
        store
            .proxy(up)
            .error_form(form)
            .idempotency("key_sources = [\"header:X-Request-Id\", \"json:/client_order_id\"]\nrequire_key = true")
    })
    .await;
    let url = proxy.url("/payments");
    let too_long = format!(r#"{{"client_order_id": "{}"}}"#, "x".repeat(256));
    for body in [
        too_long.as_str(),
        r#"{"client_order_id": 1.5}"#,
        r#"{"client_order_id": ""}"#,
    ] {
        let refused = post_json(&client, &url, &[], body).await;
        assert_error(&refused, form, StatusCode::BAD_REQUEST, "invalid-key");
        assert!(
            error_text(&refused, form).contains("json:/client_order_id"),
            "{refused:?}"
        );
        assert_eq!(refused.retry_hint(), None, "{refused:?}");
    }
    let header = post_json(&client, &url, &[("x-request-id", "two words")], "{}").await;
    assert_error(&header, form, StatusCode::BAD_REQUEST, "invalid-key");
    assert!(error_text(&header, form).contains("header:x-request-id"), "{header:?}");
    for body in [r#"{"amount": 1}"#, "amount=1"] {
        let keyless = post_json(&client, &url, &[], body).await;
        assert_error(&keyless, form, StatusCode::BAD_REQUEST, "missing-key");
    }
    let first = post_json(&client, &url, &[], r#"{"client_order_id": "ord-9", "amount": 1}"#).await;
    assert_executed(&first);
    let changed = post_json(&client, &url, &[], r#"{"client_order_id": "ord-9", "amount": 2}"#).await;
    assert_error(&changed, form, form.key_reused_status(), "key-reused");
    assert_eq!(upstream.hits(), 1, "none of the refused requests was forwarded");
}

/// A recorded 5xx keyed by a body field: its first answer and its replay carry the retry hint
/// (`false`), the replay is marked by the route's renamed replay header, and a replayed 2xx
/// carries no hint.
async fn a_replayed_5xx_has_the_renamed_replay_header_and_the_hint(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) = start_harness(|up| {
        store
            .proxy(up)
            .error_form(form)
            .idempotency("key_sources = [\"json:/client_order_id\"]\nreplay_header = \"X-Replayed\"")
    })
    .await;
    let url = proxy.url("/payments");
    let failing = [
        ("x-upstream-status", "500"),
        ("x-upstream-header", "stripe-should-retry=true"),
    ];
    let body = r#"{"client_order_id": "ord-5xx"}"#;
    let first = post_json(&client, &url, &failing, body).await;
    let again = post_json(&client, &url, &failing, body).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.header("x-replayed"), None);
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.header("x-replayed"), Some("true"), "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(again.body, first.body);
    let upstreams_hint = Some("true");
    assert_eq!(first.retry_hint(), form.hint(false).or(upstreams_hint));
    assert_eq!(again.retry_hint(), form.hint(false).or(upstreams_hint));
    let ok = r#"{"client_order_id": "ord-2xx"}"#;
    post_json(&client, &url, &[], ok).await;
    let replayed_ok = post_json(&client, &url, &[], ok).await;
    assert_eq!(replayed_ok.header("x-replayed"), Some("true"));
    assert_eq!(replayed_ok.retry_hint(), None);
    assert_eq!(upstream.hits(), 2);
}

/// The status policy (docs/behaviour.md §14) with the retry hint: a released `503` carries none
/// and its retry executes; a `504` listed as unknown is relayed with the hint `false`, and its
/// retries get `outcome-unknown` in the route's form, with the hint `false` too.
async fn released_and_unknown_statuses_with_the_hint(store: Backend, form: ErrorForm) {
    let (upstream, proxy, client) =
        start_harness(|up| store.proxy(up).error_form(form).idempotency("unknown_statuses = [504]")).await;
    let url = proxy.url("/orders");
    let refused = post_json(
        &client,
        &url,
        &[("idempotency-key", "k503"), ("x-upstream-status", "503")],
        "{}",
    )
    .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.retry_hint(), None, "{refused:?}");
    assert_executed(&post_json(&client, &url, &[("idempotency-key", "k503")], "{}").await);

    let gateway = post_json(
        &client,
        &url,
        &[("idempotency-key", "k504"), ("x-upstream-status", "504")],
        "{}",
    )
    .await;
    assert_eq!(gateway.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        gateway.json()["hit"].is_u64(),
        "the upstream's answer, relayed: {gateway:?}"
    );
    assert_eq!(gateway.retry_hint(), form.hint(false), "{gateway:?}");
    let retry = post_json(&client, &url, &[("idempotency-key", "k504")], "{}").await;
    assert_error(&retry, form, StatusCode::BAD_GATEWAY, "outcome-unknown");
    assert_eq!(retry.retry_hint(), form.hint(false), "{retry:?}");
    assert_eq!(upstream.hits(), 3);
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
        key_source_errors_are_in_the_routes_form,
        a_replayed_5xx_has_the_renamed_replay_header_and_the_hint,
        released_and_unknown_statuses_with_the_hint,
    }
}

// ---- The admin key endpoints find keys from every source ----------------------------------

#[tokio::test]
async fn admin_finds_and_clears_keys_from_every_source() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream)
        .idempotency("key_sources = [\"header:Idempotency-Key\", \"json:/client_order_id\"]")
        .admin()
        .start()
        .await;
    let admin = proxy.admin.expect("admin listener");
    let client = TestClient::new();
    let url = proxy.url("/payments");
    let body = r#"{"client_order_id": "ord 7"}"#;
    post_json(&client, &url, &[("authorization", "Bearer abc")], body).await;
    let by_source = format!("http://{admin}/keys/ord%207?scope=Bearer%20abc&source=json:/client_order_id");
    let found = client.send(Method::GET, &by_source, &[], "").await;
    assert_eq!(found.status, StatusCode::OK, "{found:?}");
    assert_eq!(found.json()["state"], "Completed");
    // The default is the route's first source, the header: no such key there.
    let by_default = format!("http://{admin}/keys/ord%207?scope=Bearer%20abc");
    assert_eq!(
        client.send(Method::GET, &by_default, &[], "").await.status,
        StatusCode::BAD_REQUEST
    );
    let bare = format!("http://{admin}/keys/ord-7?scope=Bearer%20abc");
    assert_eq!(
        client.send(Method::GET, &bare, &[], "").await.status,
        StatusCode::NOT_FOUND
    );
    let unknown_source = format!("http://{admin}/keys/ord%207?source=query:id");
    let refused = client.send(Method::GET, &unknown_source, &[], "").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("query:id")));
    // Cleared, the key executes again.
    assert_eq!(
        client.send(Method::DELETE, &by_source, &[], "").await.status,
        StatusCode::OK
    );
    let after = post_json(&client, &url, &[("authorization", "Bearer abc")], body).await;
    assert!(!replayed(&after));
    assert_eq!(upstream.hits(), 2);
}
