//! Idempotency-Key enforcement end to end (spec §1-§8), against a real upstream and a real
//! `redis-server` (and the memory store where the behaviour is the store's contract).

mod common;

use std::time::Duration;

use common::{RedisServer, TestClient, TestProxy, TestUpstream};
use http::{Method, StatusCode};

#[tokio::test]
async fn replay_is_identical_and_marked_with_the_redis_store() {
    let redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to_with_redis(&upstream, &redis, "").await;
    let client = TestClient::new();
    let first = client.post_keyed(&proxy.url("/orders"), "order-1", "{\"n\":1}").await;
    let again = client.post_keyed(&proxy.url("/orders"), "order-1", "{\"n\":1}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("x-hit"), first.header("x-hit"));
    assert_eq!(again.header("content-type"), first.header("content-type"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(upstream.hits(), 1);
    let _ = Duration::ZERO;
    let _ = Method::GET;
}
