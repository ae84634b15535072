//! The proxy foundation (docs/behaviour.md §1 pass-through, §8 errors, §9 proxying): what reaches the
//! upstream and what reaches the client for requests that are not guarded, against a real
//! recording upstream. Raw sockets where a hyper client would manage the bytes itself.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    assert_error, assert_executed, free_port, read_one_response, read_until_closed, start_harness, ErrorForm, Recorded,
    RedisServer, TestClient, TestProxy, TestResponse, TestUpstream,
};
use http::{Method, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The one request the upstream received.
fn only_request(upstream: &TestUpstream) -> Recorded {
    let requests = upstream.requests();
    assert_eq!(
        requests.len(),
        1,
        "exactly one request reached the upstream: {requests:?}"
    );
    requests.into_iter().next().expect("one request")
}

fn header<'a>(recorded: &'a Recorded, name: &str) -> Option<&'a str> {
    recorded.headers.get(name).map(|v| v.to_str().expect("ascii header"))
}

fn all_values(headers: &http::HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii header").to_owned())
        .collect()
}

/// Writes `bytes` on a new connection and reads until the server closes it.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the proxy");
    stream.write_all(bytes).await.expect("write request");
    read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the proxy closes the connection")
}

/// `GET url` with `headers`, which the upstream answers (`201`).
async fn get_forwarded(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> TestResponse {
    let response = client.send(Method::GET, url, headers, "").await;
    assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
    response
}

/// RFC 9110 §7.6.1 on the request: `Connection`, every field it names, and the fixed
/// hop-by-hop fields never reach the upstream; end-to-end fields arrive untouched.
#[tokio::test]
async fn hop_by_hop_request_fields_are_not_forwarded() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).start().await;
    let request = "GET /hop?q=1 HTTP/1.1\r\n\
                   Host: api.example\r\n\
                   Connection: close, X-Secret\r\n\
                   X-Secret: s3cret\r\n\
                   Keep-Alive: timeout=5\r\n\
                   Proxy-Connection: keep-alive\r\n\
                   TE: trailers\r\n\
                   Trailer: x-checksum\r\n\
                   Proxy-Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l\r\n\
                   Upgrade: websocket\r\n\
                   X-End-To-End: kept as is\r\n\
                   Authorization: Bearer end-to-end\r\n\
                   \r\n";
    let response = raw_exchange(proxy.addr, request.as_bytes()).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let seen = only_request(&upstream);
    for name in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            !seen.headers.contains_key(name),
            "hop-by-hop `{name}` reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(header(&seen, "x-end-to-end"), Some("kept as is"));
    assert_eq!(header(&seen, "authorization"), Some("Bearer end-to-end"));
}

/// RFC 9110 §7.6.1 on the response: hop-by-hop fields the upstream sends (including those its
/// `Connection` names) never reach the client.
#[tokio::test]
async fn hop_by_hop_response_fields_are_not_forwarded() {
    let (_upstream, proxy, client) = start_harness(TestProxy::to).await;
    let upstream_answers_with = [
        ("x-upstream-header", "connection=x-resp-secret"),
        ("x-upstream-header", "x-resp-secret=1"),
        ("x-upstream-header", "keep-alive=timeout=9"),
        ("x-upstream-header", "proxy-connection=keep-alive"),
        ("x-upstream-header", "upgrade=h2c"),
        ("x-upstream-header", "x-resp-kept=1"),
    ];
    let response = get_forwarded(&client, &proxy.url("/resp"), &upstream_answers_with).await;
    for name in [
        "connection",
        "x-resp-secret",
        "keep-alive",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            !response.headers.contains_key(name),
            "hop-by-hop `{name}` reached the client: {:?}",
            response.headers
        );
    }
    assert_eq!(response.header("x-resp-kept"), Some("1"));
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert!(
        all_values(&response.headers, "via")
            .iter()
            .any(|v| v.contains("1.1 idemproxy")),
        "{:?}",
        response.headers
    );
}

/// `X-Forwarded-For` is appended to, `-Proto`/`-Host` describe the client's request (client
/// values are replaced, not trusted), `Via` names this proxy, `Host` is the upstream's, and
/// path and query go through byte for byte.
#[tokio::test]
async fn forwarding_fields_host_and_target_by_default() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    let target = "/a%2Fb/c;v=1/..%2F~x?x=1&y=%20&x=2&e=&plus=a+b";
    let from_the_client = [
        ("host", "shop.example"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "spoofed.example"),
        ("via", "1.0 fred"),
    ];
    get_forwarded(&client, &proxy.url(target), &from_the_client).await;

    let seen = only_request(&upstream);
    assert_eq!(seen.uri.path_and_query().map(|pq| pq.as_str()), Some(target));
    assert_eq!(
        all_values(&seen.headers, "x-forwarded-for"),
        vec!["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(all_values(&seen.headers, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(all_values(&seen.headers, "x-forwarded-host"), vec!["shop.example"]);
    let via = all_values(&seen.headers, "via").join(", ");
    assert_eq!(via, "1.0 fred, 1.1 idemproxy");
    assert_eq!(all_values(&seen.headers, "host"), vec![upstream.addr.to_string()]);
}

/// Without a client `X-Forwarded-For`, the upstream sees just the client's address.
#[tokio::test]
async fn x_forwarded_for_starts_with_the_client_address() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    get_forwarded(&client, &proxy.url("/"), &[]).await;
    let seen = only_request(&upstream);
    assert_eq!(all_values(&seen.headers, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(
        all_values(&seen.headers, "x-forwarded-host"),
        vec![proxy.addr.to_string()]
    );
}

/// `upstream.preserve_host = true` forwards the client's `Host`.
#[tokio::test]
async fn preserve_host_forwards_the_client_host() {
    let (upstream, proxy, client) = start_harness(|up| TestProxy::to(up).config("upstream.preserve_host = true")).await;
    get_forwarded(&client, &proxy.url("/p?q=%41"), &[("host", "shop.example")]).await;
    let seen = only_request(&upstream);
    assert_eq!(all_values(&seen.headers, "host"), vec!["shop.example"]);
    assert_eq!(all_values(&seen.headers, "x-forwarded-host"), vec!["shop.example"]);
    assert_eq!(seen.uri.path_and_query().map(|pq| pq.as_str()), Some("/p?q=%41"));
}

/// HTTP/2 with prior knowledge (h2c) from the client; the upstream is spoken to in HTTP/1.1.
#[tokio::test]
async fn h2c_prior_knowledge_is_proxied_to_http1_upstream() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).start().await;
    let client = TestClient::http2();
    let response = client
        .send(
            Method::POST,
            &proxy.url("/h2?x=1"),
            &[("content-type", "text/plain")],
            "over h2",
        )
        .await;
    assert_eq!(response.status, StatusCode::CREATED);
    assert_eq!(response.json()["body_bytes"], 7);
    assert_eq!(response.json()["path"], "/h2");

    let seen = only_request(&upstream);
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri.path_and_query().map(|pq| pq.as_str()), Some("/h2?x=1"));
    assert_eq!(seen.body.as_ref(), b"over h2");
    assert_eq!(all_values(&seen.headers, "host"), vec![upstream.addr.to_string()]);
    assert_eq!(
        all_values(&seen.headers, "x-forwarded-host"),
        vec![proxy.addr.to_string()]
    );
    assert!(
        all_values(&seen.headers, "via").iter().any(|v| v == "2 idemproxy"),
        "{:?}",
        seen.headers
    );
    // The same h2 connection carries a second request, whose chunked (streamed) upstream
    // response has connection-specific fields that HTTP/2 forbids (RFC 9113 §8.2.2).
    let streamed_with_connection_fields = [
        ("x-upstream-body-bytes", "200000"),
        ("x-upstream-header", "connection=x-resp-secret"),
        ("x-upstream-header", "x-resp-secret=1"),
        ("x-upstream-header", "keep-alive=timeout=9"),
    ];
    let again = get_forwarded(&client, &proxy.url("/h2/again"), &streamed_with_connection_fields).await;
    assert_eq!(again.body.len(), 200_000);
    for name in ["connection", "x-resp-secret", "keep-alive", "transfer-encoding"] {
        assert!(!again.headers.contains_key(name), "`{name}` reached the h2 client");
    }
    assert_eq!(upstream.hits(), 2);
}

/// Nothing listening upstream: `502` upstream-unreachable, in either error form (pass-through
/// requests on a route answer in its form too).
#[tokio::test]
async fn refused_upstream_is_502_problem() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    for form in [ErrorForm::Problem, ErrorForm::Stripe] {
        let proxy = TestProxy::to_url(dead.clone()).error_form(form).start().await;
        let response = TestClient::new().send(Method::GET, &proxy.url("/x"), &[], "").await;
        assert_error(&response, form, StatusCode::BAD_GATEWAY, "upstream-unreachable");
        let keyless_post = TestClient::new().send(Method::POST, &proxy.url("/x"), &[], "{}").await;
        assert_error(&keyless_post, form, StatusCode::BAD_GATEWAY, "upstream-unreachable");
    }
}

/// An upstream slower than `upstream.timeout`: `504` upstream-timeout, answered at the timeout
/// rather than when the upstream finally answers, in either error form.
#[tokio::test]
async fn slow_upstream_is_504_problem_at_the_timeout() {
    for form in [ErrorForm::Problem, ErrorForm::Stripe] {
        let (_upstream, proxy, client) = start_harness(|up| {
            TestProxy::to(up)
                .config("upstream.timeout = \"300ms\"")
                .error_form(form)
        })
        .await;
        let started = Instant::now();
        let response = client
            .send(Method::GET, &proxy.url("/slow"), &[("x-upstream-delay-ms", "2000")], "")
            .await;
        let elapsed = started.elapsed();
        assert_error(&response, form, StatusCode::GATEWAY_TIMEOUT, "upstream-timeout");
        assert!(elapsed >= Duration::from_millis(250), "answered after {elapsed:?}");
        assert!(elapsed < Duration::from_millis(1500), "answered after {elapsed:?}");
    }
}

/// Garbage on a socket gets a 400 or a closed connection, and the process keeps serving.
#[tokio::test]
async fn garbage_bytes_do_not_stop_the_server() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).start().await;
    for garbage in [
        &b"\x00\xff GARBAGE\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\ngarbage",
    ] {
        let answer = raw_exchange(proxy.addr, garbage).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "garbage {garbage:?} got {answer:?}"
        );
    }
    assert_eq!(upstream.hits(), 0);
    get_forwarded(&TestClient::new(), &proxy.url("/after"), &[]).await;
    assert_eq!(upstream.hits(), 1);
}

/// Graceful shutdown: the listener closes at once, the in-flight request still completes, and
/// the serve task ends with `Ok`.
#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let upstream = TestUpstream::start().await;
    let mut proxy = TestProxy::to(&upstream).start().await;
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move {
        TestClient::new()
            .send(Method::GET, &url, &[("x-upstream-delay-ms", "1000")], "")
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.hits() == 0 {
        assert!(Instant::now() < deadline, "the slow request never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let task = proxy.shutdown();
    // Stops accepting while the request is still running.
    let deadline = Instant::now() + Duration::from_millis(500);
    while TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the slow request ended before its upstream answered"
    );

    let response = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight request completes")
        .expect("client task");
    assert_eq!(response.status, StatusCode::CREATED);
    let served = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve ends after draining")
        .expect("serve task did not panic");
    assert!(served.is_ok(), "{served:?}");
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "a connection was accepted after shutdown"
    );
}

/// A proxy to `upstream` that gives a client 500ms to send a request head
/// (`server.header_read_timeout`), for the slowloris tests.
async fn proxy_with_short_header_read_timeout(upstream: &TestUpstream) -> TestProxy {
    TestProxy::to(upstream)
        .config("server.header_read_timeout = \"500ms\"")
        .start()
        .await
}

/// A new connection to `addr` on which `bytes` were written.
async fn connect_and_write(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

/// Waits (up to 5s, else panics saying `after`) until the proxy closes `stream`; returns what
/// it sent until then and how long that took.
async fn wait_until_closed(stream: &mut TcpStream, after: &str) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let received = read_until_closed(stream, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("after {after}: not disconnected within 5s"));
    (received, started.elapsed())
}

/// Slowloris: a client that starts a request head and stalls is disconnected after
/// `server.header_read_timeout`.
#[tokio::test]
async fn slow_header_client_is_disconnected() {
    let upstream = TestUpstream::start().await;
    let proxy = proxy_with_short_header_read_timeout(&upstream).await;
    let mut stream = connect_and_write(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    let (received, elapsed) = wait_until_closed(&mut stream, "a partial head").await;
    assert!(elapsed >= Duration::from_millis(400), "closed after only {elapsed:?}");
    let received = String::from_utf8_lossy(&received);
    assert!(
        received.is_empty() || received.starts_with("HTTP/1.1 408"),
        "{received:?}"
    );
    assert_eq!(upstream.hits(), 0);
}

/// Slowloris, before the protocol is known: a client that connects and never sends a byte, or
/// sends only the start of the HTTP/2 preface, is disconnected after
/// `server.header_read_timeout` too.
#[tokio::test]
async fn silent_client_is_disconnected() {
    let upstream = TestUpstream::start().await;
    let proxy = proxy_with_short_header_read_timeout(&upstream).await;
    for first_bytes in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut stream = connect_and_write(proxy.addr, first_bytes).await;
        let (received, elapsed) = wait_until_closed(&mut stream, &format!("{first_bytes:?}")).await;
        assert!(elapsed >= Duration::from_millis(400), "closed after only {elapsed:?}");
        assert!(received.is_empty(), "{received:?}");
    }
    get_forwarded(&TestClient::new(), &proxy.url("/"), &[]).await;
}

/// An idle HTTP/1.1 keep-alive connection is closed after `server.header_read_timeout`.
#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let upstream = TestUpstream::start().await;
    let proxy = proxy_with_short_header_read_timeout(&upstream).await;
    let mut stream = connect_and_write(proxy.addr, b"GET /ka HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let response = read_one_response(&mut stream, Duration::from_secs(10))
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .expect("one whole response");
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let (rest, elapsed) = wait_until_closed(&mut stream, "an idle keep-alive period").await;
    assert!(elapsed >= Duration::from_millis(400), "closed after only {elapsed:?}");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// An HTTP/2 connection with no request in progress for `server.http2_idle_timeout` is closed
/// gracefully (GOAWAY, RFC 9113 §6.8), as an idle HTTP/1.1 one is; a request that runs longer
/// than the timeout keeps it open and is answered in full.
#[tokio::test]
async fn idle_http2_connection_is_closed_but_not_while_a_request_runs() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let (upstream, proxy, _) =
        start_harness(|up| TestProxy::to(up).config("server.http2_idle_timeout = \"400ms\"")).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = closed_tx.send(connection.await);
    });
    let request = http::Request::get(proxy.url("/slow"))
        .header("x-upstream-delay-ms", "1200")
        .body(Empty::new())
        .expect("request");
    let response = sender
        .send_request(request)
        .await
        .expect("the slow request is answered");
    assert_eq!(response.status(), StatusCode::CREATED);
    response.into_body().collect().await.expect("the whole body");
    let answered = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the idle HTTP/2 connection is closed within 5s")
        .expect("the connection task reports");
    let idle = answered.elapsed();
    assert!(closed.is_ok(), "closed gracefully: {closed:?}");
    assert!(idle >= Duration::from_millis(300), "closed after only {idle:?} idle");
    assert_eq!(upstream.hits(), 1);
}

/// Every method is passed through with its body, and nothing is stored: repeating a request
/// executes it again.
#[tokio::test]
async fn every_method_passes_through_with_its_body() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    let cases = [
        (Method::GET, ""),
        (Method::HEAD, ""),
        (Method::PUT, "put body"),
        (Method::DELETE, "delete body"),
        (Method::OPTIONS, "options body"),
        (Method::PATCH, "patch body"),
        (Method::POST, "keyless post body"),
    ];
    for round in 0..2 {
        for (i, (method, body)) in cases.iter().enumerate() {
            let path = format!("/m/{}", method.as_str().to_ascii_lowercase());
            let response = client
                .send(
                    method.clone(),
                    &proxy.url(&path),
                    &[("content-type", "text/plain")],
                    *body,
                )
                .await;
            let hit = round * cases.len() + i + 1;
            assert_eq!(response.status, StatusCode::CREATED, "{method}");
            assert_eq!(
                response.header("x-hit"),
                Some(hit.to_string().as_str()),
                "{method} executed again"
            );
            assert_eq!(response.header("idempotent-replayed"), None, "{method}");
            if *method == Method::HEAD {
                assert!(response.body.is_empty(), "HEAD answered with a body");
            } else {
                let json = response.json();
                assert_eq!(json["method"], method.as_str());
                assert_eq!(json["body_bytes"], body.len());
            }
            let seen = upstream.requests().pop().expect("recorded");
            assert_eq!(seen.method, *method);
            assert_eq!(seen.uri.path(), path);
            assert_eq!(seen.body.as_ref(), body.as_bytes(), "{method} body");
        }
    }
    assert_eq!(upstream.hits(), 2 * cases.len());
}

/// A keyless POST is executed every time (never stored, never replayed).
#[tokio::test]
async fn keyless_post_is_executed_every_time() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    for n in 1..=3 {
        let response = client
            .send(Method::POST, &proxy.url("/orders"), &[], "{\"same\":true}")
            .await;
        assert_executed(&response);
        assert_eq!(response.json()["hit"], n);
        assert_eq!(upstream.hits(), n);
    }
}

/// An `Idempotency-Key` on a method that is not guarded is forwarded untouched (even one that
/// would be invalid on a guarded request) and does not make the request idempotent.
#[tokio::test]
async fn idempotency_key_on_get_is_forwarded_untouched() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    for (n, key) in ["\"quoted-key\"", "bare-key", "\"a\", \"b\""].iter().enumerate() {
        let response = get_forwarded(&client, &proxy.url("/items"), &[("idempotency-key", key)]).await;
        assert_eq!(response.header("idempotent-replayed"), None);
        let seen = upstream.requests().pop().expect("recorded");
        assert_eq!(all_values(&seen.headers, "idempotency-key"), vec![key.to_string()]);
        assert_eq!(upstream.hits(), n + 1);
    }
    let again = get_forwarded(&client, &proxy.url("/items"), &[("idempotency-key", "bare-key")]).await;
    assert_eq!(again.header("x-hit"), Some("4"));
}

/// Pass-through traffic never touches the store (docs/behaviour.md §1): with the Redis store, no command
/// other than the test's own bookkeeping reaches Redis.
#[tokio::test]
async fn pass_through_never_touches_the_store() {
    let redis = RedisServer::start();
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::to(&upstream).redis(&redis).start().await;
    redis.reset_stats();
    let client = TestClient::new();
    for method in [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
    ] {
        let response = client
            .send(method.clone(), &proxy.url("/p"), &[("idempotency-key", "k-1")], "body")
            .await;
        assert_eq!(response.status, StatusCode::CREATED, "{method}");
    }
    for _ in 0..2 {
        let response = client.send(Method::POST, &proxy.url("/p"), &[], "body").await;
        assert_eq!(response.status, StatusCode::CREATED);
    }
    assert_eq!(upstream.hits(), 8);
    let bookkeeping = ["info", "config|resetstat", "client|setinfo", "hello", "select"];
    let calls = redis.command_calls();
    let store_calls: Vec<_> = calls
        .iter()
        .filter(|(name, _)| !bookkeeping.contains(&name.as_str()))
        .collect();
    assert!(
        store_calls.is_empty(),
        "pass-through traffic used the store: {store_calls:?}"
    );
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_shared_between_clients() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    for _ in 0..20 {
        get_forwarded(&client, &proxy.url("/one"), &[]).await;
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one client connection, one upstream connection"
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Each new client connection (a fresh client each time) finds the idle upstream connection
    // the previous one gave back to the pool when it closed.
    for _ in 0..5 {
        get_forwarded(&TestClient::new(), &proxy.url("/fresh"), &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upstream.connections(), 1, "closed client connections give theirs back");
    assert_eq!(upstream.hits(), 25);
}

#[tokio::test]
async fn pooled_connection_closed_by_the_upstream_is_not_an_error() {
    let (upstream, proxy, client) = start_harness(TestProxy::to).await;
    get_forwarded(&client, &proxy.url("/before"), &[]).await;
    // The upstream restarts: every connection the proxy holds (in the pool and for this client
    // connection) is dead; the next requests go over new ones, and a keyed POST runs once.
    upstream.stop();
    let upstream = upstream.restart().await;
    for _ in 0..3 {
        get_forwarded(&client, &proxy.url("/after"), &[]).await;
    }
    let before = upstream.hits();
    let response = client.post_keyed(&proxy.url("/orders"), "restart-1", "{}").await;
    assert_eq!(response.status, StatusCode::CREATED);
    assert_eq!(upstream.hits(), before + 1);
    assert!(upstream.connections() >= 2, "a new upstream connection was opened");
}

/// RFC 9110 §6.2: a proxy sends its own HTTP version. An HTTP/1.0 upstream's answer reaches the
/// client as HTTP/1.1 on a connection that stays open, with `Via: 1.0 idemproxy`, for pass-through
/// and for an executed keyed POST alike.
#[tokio::test]
async fn http_1_0_upstream_answers_reach_the_client_as_http_1_1() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head and a body announced by Content-Length, then answer and close.
                loop {
                    let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if let Some(end) = common::find(&request, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let proxy = TestProxy::to_url(format!("http://{upstream_addr}")).start().await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    for request in [
        &b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        &b"POST /orders HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \"v10\"\r\nContent-Length: 2\r\n\r\n{}"[..],
    ] {
        stream.write_all(request).await.expect("write");
        let response = common::read_one_response(&mut stream, Duration::from_secs(10))
            .await
            .expect("a response on the same connection");
        let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        assert!(text.contains("via: 1.0 idemproxy"), "{text}");
        assert!(text.ends_with("ok"), "{text}");
    }
}
