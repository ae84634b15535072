//! Hostile HTTP input and limits (issue 6; documented in `docs/hostile-input.md`): each case is
//! written byte for byte on a raw socket to a proxy whose upstream records what it receives.
//! Every case asserts the exact answer (or the documented safe behaviour, such as a closed
//! connection), that nothing ambiguous reached the upstream, and that the proxy still serves a
//! good request afterwards.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    find, proc_status_kib, read_one_response, read_until_closed, start_harness, ProxyProcess, Recorded, TestProxy,
    TestUpstream,
};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Writes `bytes` on a new connection and reads until the proxy closes it. A write the proxy
/// refuses half-way (it answered and closed early) is not an error: the answer is what counts.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the proxy");
    let _ = stream.write_all(bytes).await;
    read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the proxy closes the connection")
}

/// Like [`exchange`], then half-closes the write side (the client is done sending).
async fn exchange_then_eof(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the proxy");
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the proxy closes the connection")
}

/// The status code of the first response in `answer` (`None` when there is none).
fn status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// How many responses `answer` holds (status lines at the start or after a CRLF).
fn response_count(answer: &[u8]) -> usize {
    let text = String::from_utf8_lossy(answer);
    usize::from(text.starts_with("HTTP/1.")) + text.matches("\r\nHTTP/1.").count()
}

/// The JSON body of a single Content-Length-framed answer.
fn body_json(answer: &[u8]) -> serde_json::Value {
    let end = find(answer, b"\r\n\r\n").expect("a complete head");
    serde_json::from_slice(&answer[end + 4..])
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(answer)))
}

fn head_has(answer: &[u8], header_line: &str) -> bool {
    let end = find(answer, b"\r\n\r\n").unwrap_or(answer.len());
    String::from_utf8_lossy(&answer[..end])
        .to_ascii_lowercase()
        .lines()
        .any(|l| l.trim() == header_line)
}

/// `answer` is exactly one response, of status `expected`.
fn assert_one_answer(answer: &[u8], expected: u16, case: &str) {
    assert_eq!(
        status(answer),
        Some(expected),
        "{case}: got {:?}",
        String::from_utf8_lossy(answer)
    );
    assert_eq!(
        response_count(answer),
        1,
        "{case}: {:?}",
        String::from_utf8_lossy(answer)
    );
}

/// A problem+json answer of `expected` status whose `type` ends with `#slug`.
fn assert_problem(answer: &[u8], expected: u16, slug: &str, case: &str) {
    let text = String::from_utf8_lossy(answer);
    assert_eq!(status(answer), Some(expected), "{case}: got {text:?}");
    assert!(
        head_has(answer, "content-type: application/problem+json"),
        "{case}: {text:?}"
    );
    let json = body_json(answer);
    assert_eq!(json["status"], expected, "{case}: {json}");
    let problem_type = json["type"].as_str().unwrap_or_default();
    assert!(
        problem_type.ends_with(&format!("#{slug}")),
        "{case}: type {problem_type}"
    );
}

/// A Stripe-form error (docs/behaviour.md §16) of `expected` status whose `code` is `slug`.
fn assert_stripe_error(answer: &[u8], expected: u16, slug: &str, case: &str) {
    let text = String::from_utf8_lossy(answer);
    assert_eq!(status(answer), Some(expected), "{case}: got {text:?}");
    assert!(head_has(answer, "content-type: application/json"), "{case}: {text:?}");
    let json = body_json(answer);
    assert_eq!(json["error"]["code"], slug, "{case}: {json}");
}

/// Writes each `(case, request)` on a new connection: each is refused by hyper's HTTP/1 parser
/// with exactly one `expected` answer (an empty body), the proxy closes the connection, and
/// none reaches the upstream.
async fn assert_parser_rejects<R: AsRef<[u8]>>(
    proxy: SocketAddr,
    upstream: &TestUpstream,
    expected: u16,
    cases: impl IntoIterator<Item = (&str, R)>,
) {
    let before = upstream.hits();
    for (case, request) in cases {
        let answer = exchange(proxy, request.as_ref()).await;
        assert_one_answer(&answer, expected, case);
    }
    assert_eq!(upstream.hits(), before, "{:?}", upstream.requests());
}

/// Writes `request` on a new connection: the proxy answers with the problem+json `expected`
/// whose `type` ends with `#slug`. Returns the answer.
async fn assert_refused_with_problem(
    proxy: SocketAddr,
    request: &[u8],
    expected: u16,
    slug: &str,
    case: &str,
) -> Vec<u8> {
    let answer = exchange(proxy, request).await;
    assert_problem(&answer, expected, slug, case);
    answer
}

/// Writes `request` (one that ends the connection) on a new connection: the upstream answers
/// it, once, `201`. Returns the last request the upstream received.
async fn forwarded(proxy: SocketAddr, upstream: &TestUpstream, request: &[u8], case: &str) -> Recorded {
    let answer = exchange(proxy, request).await;
    assert_one_answer(&answer, 201, case);
    upstream.requests().pop().expect("the request reached the upstream")
}

/// No request whose path is `path` reached the upstream.
fn assert_never_reached(upstream: &TestUpstream, path: &str) {
    let requests = upstream.requests();
    assert!(
        requests.iter().all(|r| r.uri.path() != path),
        "`{path}` reached the upstream: {requests:?}"
    );
}

/// A good request on a fresh connection is still served end to end (the proxy did not crash or
/// wedge), and it is the only new request the upstream sees.
async fn assert_still_serves(proxy: SocketAddr, upstream: &TestUpstream) {
    let before = upstream.hits();
    let request = b"GET /still-serving HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n";
    let last = forwarded(proxy, upstream, request, "still serving").await;
    assert_eq!(upstream.hits(), before + 1);
    assert_eq!(last.uri.path(), "/still-serving");
}

/// The bytes one upstream connection carried towards the upstream.
type TapLog = Arc<Mutex<Vec<u8>>>;

/// Upstream-bound bytes as they went over the wire: a TCP relay in front of the upstream that
/// records, per connection, every byte the proxy sent. Catches what the upstream's own parser
/// would normalise away (a `Content-Length` next to a `Transfer-Encoding`).
struct Tap {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<TapLog>>>,
}

impl Tap {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = listener.local_addr().expect("tap addr");
        let connections: Arc<Mutex<Vec<TapLog>>> = Arc::default();
        let all = connections.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let seen: TapLog = Arc::default();
                all.lock().expect("lock").push(seen.clone());
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                });
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    loop {
                        match in_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.lock().expect("lock").extend_from_slice(&buf[..n]);
                                if out_write.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = out_write.shutdown().await;
                });
            }
        });
        Self { addr, connections }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request head the proxy sent upstream, walked by the framing it declared: each
    /// head is followed by a `Content-Length` body, a chunked body, or nothing. Panics if a
    /// head declares both, or if the framing does not line up with the bytes.
    fn heads(&self) -> Vec<String> {
        let mut heads = Vec::new();
        for connection in self.connections.lock().expect("lock").iter() {
            let bytes = connection.lock().expect("lock").clone();
            let mut at = 0;
            while at < bytes.len() {
                let end = at + find(&bytes[at..], b"\r\n\r\n").expect("a complete head upstream");
                let head = String::from_utf8(bytes[at..end].to_vec()).expect("an ASCII head");
                at = end + 4;
                let lower = head.to_ascii_lowercase();
                let field = |name: &str| {
                    lower
                        .lines()
                        .filter_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_string())
                        .collect::<Vec<_>>()
                };
                let lengths = field("content-length:");
                let codings = field("transfer-encoding:");
                assert!(
                    lengths.is_empty() || codings.is_empty(),
                    "the upstream got both Content-Length and Transfer-Encoding: {head:?}"
                );
                assert!(
                    lengths.len() <= 1 && codings.len() <= 1,
                    "repeated framing fields: {head:?}"
                );
                if let Some(length) = lengths.first() {
                    at += length.parse::<usize>().expect("a numeric Content-Length");
                } else if let Some(coding) = codings.first() {
                    assert_eq!(coding, "chunked", "{head:?}");
                    loop {
                        let line_end = at + find(&bytes[at..], b"\r\n").expect("a chunk-size line");
                        let size_text = std::str::from_utf8(&bytes[at..line_end]).expect("ascii size");
                        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                            .expect("a hex chunk size");
                        at = line_end + 2;
                        if size == 0 {
                            at += find(&bytes[at..], b"\r\n\r\n")
                                .map(|p| p + 4)
                                .or_else(|| bytes[at..].starts_with(b"\r\n").then_some(2))
                                .expect("the chunked body ends");
                            break;
                        }
                        at += size + 2;
                    }
                }
                heads.push(head);
            }
        }
        heads
    }
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: api.example\r\n\r\n";

/// RFC 9112 §6.1/§6.3: `Content-Length` together with `Transfer-Encoding: chunked`. hyper
/// processes the message by `Transfer-Encoding` alone, drops `Content-Length`, and closes the
/// connection after answering; the proxy re-frames the body for the upstream. Whichever way
/// the payload is built (a `GET /smuggled` hidden in the body under the CL reading, or left
/// behind after the chunked body), `/smuggled` never reaches the upstream, and the upstream
/// never sees both framing fields.
#[tokio::test]
async fn content_length_with_chunked_is_never_smuggled() {
    let upstream = TestUpstream::start().await;
    let tap = Tap::start(upstream.addr).await;
    let proxy = TestProxy::to_url(tap.url()).start().await;

    // CL.TE: a front end reading Content-Length would end the body after the size line and
    // take `GET /smuggled` as the next request; read as chunked it is body data.
    let size_line = format!("{:x}\r\n", SMUGGLED.len());
    let cl_te = format!(
        "POST /cl-te HTTP/1.1\r\nHost: api.example\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}{SMUGGLED}\r\n0\r\n\r\n",
        size_line.len()
    );
    // TE.CL (Transfer-Encoding first): read as chunked the body is empty and `GET /smuggled`
    // follows on the connection; read by Content-Length it is body data.
    let te_cl_body = format!("0\r\n\r\n{SMUGGLED}");
    let te_cl = format!(
        "POST /te-cl HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{te_cl_body}",
        te_cl_body.len()
    );
    // The same with an Idempotency-Key (a guarded request, whose body is read whole).
    let keyed = format!(
        "POST /keyed HTTP/1.1\r\nHost: api.example\r\nIdempotency-Key: smuggle-1\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}{SMUGGLED}\r\n0\r\n\r\n",
        size_line.len()
    );

    for (payload, path, body) in [
        (&cl_te, "/cl-te", SMUGGLED),
        (&te_cl, "/te-cl", ""),
        (&keyed, "/keyed", SMUGGLED),
    ] {
        // Answered once, by the upstream, and the connection closed (RFC 9112 §6.1: "the
        // server MUST close the connection after responding to such a request").
        let seen = forwarded(proxy.addr, &upstream, payload.as_bytes(), path).await;
        assert_eq!(seen.uri.path(), path);
        assert_eq!(
            seen.body.as_ref(),
            body.as_bytes(),
            "{path}: the body is the chunked reading"
        );
    }
    assert_eq!(upstream.hits(), 3);
    assert_never_reached(&upstream, "/smuggled");
    // On the wire: one head per request, each with one framing field.
    let heads = tap.heads();
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(heads.iter().all(|h| !h.contains("/smuggled")), "{heads:?}");

    // Obfuscated or non-final chunked, and Transfer-Encoding in HTTP/1.0: refused by the parser.
    let obfuscated = [
        (
            "TE not ending in chunked",
            "POST /te-gzip HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "TE chunked then identity",
            "POST /te-ci HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "space before the colon",
            "POST /te-space HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello",
        ),
        (
            "TE in HTTP/1.0",
            "POST /te-10 HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
    ];
    assert_parser_rejects(proxy.addr, &upstream, 400, obfuscated).await;
    assert_still_serves(proxy.addr, &upstream).await;
}

/// RFC 9112 §6.3 (5): differing `Content-Length` values are an unrecoverable framing error:
/// `400` and the connection is closed; nothing is forwarded.
#[tokio::test]
async fn two_different_content_lengths_are_400() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    // A POST of `hello` framed by `fields`, then `after` on the same connection.
    let post = |fields: &str, after: &str| format!("POST /two-cl HTTP/1.1\r\nHost: a\r\n{fields}\r\n\r\nhello{after}");
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let conflicting_lengths = [
        ("two fields", post("Content-Length: 5\r\nContent-Length: 10", smuggled)),
        ("one list", post("Content-Length: 5, 10", smuggled)),
        (
            "keyed",
            post(
                "Idempotency-Key: k-cl\r\nContent-Length: 10\r\nContent-Length: 5",
                smuggled,
            ),
        ),
        ("negative", post("Content-Length: -5", "")),
        ("signed", post("Content-Length: +5", "")),
        ("overflowing", post("Content-Length: 99999999999999999999999", "")),
    ];
    assert_parser_rejects(proxy.addr, &upstream, 400, conflicting_lengths).await;
    assert_still_serves(proxy.addr, &upstream).await;
}

/// Invalid chunk sizes on a keyed POST: the body is read whole before anything else happens,
/// so a broken body is `400` (or a closed connection when the client is gone) and nothing is
/// forwarded or stored: the same key with a good body then executes normally.
#[tokio::test]
async fn invalid_chunk_sizes_on_keyed_posts_are_not_forwarded() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    let head = |key: &str| {
        format!("POST /chunks HTTP/1.1\r\nHost: a\r\nIdempotency-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n")
    };
    for (key, body) in [
        ("chunk-zz", "5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("chunk-negative", "-1\r\nhello\r\n0\r\n\r\n"),
        ("chunk-overflow", "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("chunk-no-crlf", "5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n"),
    ] {
        let request = format!("{}{body}", head(key));
        // hyper closes the connection after a body it could not frame (`exchange` waited for it).
        let answer = assert_refused_with_problem(proxy.addr, request.as_bytes(), 400, "bad-request", key).await;
        assert_eq!(response_count(&answer), 1, "{key}");
    }
    // A size larger than the data, then the client half-closes: the body can never complete.
    let answer = exchange_then_eof(
        proxy.addr,
        format!("{}100\r\nonly a little", head("chunk-short")).as_bytes(),
    )
    .await;
    assert!(
        answer.is_empty() || status(&answer) == Some(400),
        "short chunk: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(upstream.hits(), 0, "{:?}", upstream.requests());

    // Nothing was stored for those keys: a good request with one of them executes.
    let good = format!(
        "{}5\r\nhello\r\n0\r\n\r\n",
        head("chunk-short").replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
    );
    let executed = forwarded(proxy.addr, &upstream, good.as_bytes(), "a good body").await;
    assert_eq!(executed.body.as_ref(), b"hello");
    assert_still_serves(proxy.addr, &upstream).await;
}

/// Invalid chunk sizes on a keyless POST, which streams: the upstream may have seen the head
/// and the first chunk, but never a complete body: the proxy cuts the upstream request off
/// (no terminating chunk) and answers the client `400` (its body was malformed, not the
/// upstream's fault).
#[tokio::test]
async fn invalid_chunk_sizes_on_streamed_posts_never_complete_upstream() {
    let upstream = TestUpstream::start().await;
    let tap = Tap::start(upstream.addr).await;
    let proxy = TestProxy::to_url(tap.url()).start().await;
    for (case, body) in [
        ("zz", "5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("negative", "5\r\nhello\r\n-1\r\nabc\r\n0\r\n\r\n"),
        ("overflow", "5\r\nhello\r\nfffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    ] {
        let request = format!("POST /stream-{case} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        // The upstream exchange fails on the client's body: the client's error.
        assert_refused_with_problem(proxy.addr, request.as_bytes(), 400, "bad-request", case).await;
    }
    // A size larger than the data, then the client half-closes.
    let answer = exchange_then_eof(
        proxy.addr,
        b"POST /stream-short HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nonly a little",
    )
    .await;
    assert_problem(&answer, 400, "bad-request", "short chunk");
    assert_eq!(
        upstream.hits(),
        0,
        "a complete body reached the upstream: {:?}",
        upstream.requests()
    );
    // On the wire: no upstream request was ever terminated with a last chunk.
    for connection in tap.connections.lock().expect("lock").iter() {
        let bytes = connection.lock().expect("lock").clone();
        assert!(
            find(&bytes, b"\r\n0\r\n\r\n").is_none(),
            "a terminated chunked body went upstream: {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    assert_still_serves(proxy.addr, &upstream).await;
}

/// RFC 9112 §5.2: obs-fold (a field line starting with whitespace) in a request is refused
/// with `400`, wherever it appears.
#[tokio::test]
async fn obs_fold_is_400() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    let folded = [
        (
            "space",
            "GET /fold HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
        ),
        ("tab", "GET /fold HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n\ttwo\r\n\r\n"),
        ("first line", "GET /fold HTTP/1.1\r\n Host: a\r\n\r\n"),
        (
            "folded key",
            "POST /fold HTTP/1.1\r\nHost: a\r\nIdempotency-Key: one\r\n two\r\nContent-Length: 0\r\n\r\n",
        ),
    ];
    assert_parser_rejects(proxy.addr, &upstream, 400, folded).await;
    assert_still_serves(proxy.addr, &upstream).await;
}

/// `server.max_header_bytes` (here 16 KiB): a bigger header block (or request target) is `431`
/// (RFC 6585 §5) and the connection is closed; one under it is served. `server.max_headers` (here
/// 20): more fields are `431` too.
#[tokio::test]
async fn header_block_over_the_limits_is_431() {
    let (upstream, proxy, _) =
        start_harness(|up| TestProxy::to(up).config("server.max_header_bytes = 16384\nserver.max_headers = 20")).await;
    let big = "v".repeat(20 * 1024);
    let over_the_limits = [
        (
            "one 20 KiB field",
            format!("GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "many fields, 20 KiB in all",
            format!(
                "GET /big HTTP/1.1\r\nHost: a\r\n{}\r\n",
                (0..10)
                    .map(|i| format!("X-Part-{i}: {}\r\n", &big[..2048]))
                    .collect::<String>()
            ),
        ),
        (
            "keyed POST with a 20 KiB field",
            format!("POST /big HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k\r\nX-Big: {big}\r\nContent-Length: 0\r\n\r\n"),
        ),
        (
            "a 20 KiB request target",
            format!("GET /{big} HTTP/1.1\r\nHost: a\r\n\r\n"),
        ),
        (
            "30 fields",
            format!(
                "GET /many HTTP/1.1\r\nHost: a\r\n{}\r\n",
                (0..30).map(|i| format!("X-F{i}: {i}\r\n")).collect::<String>()
            ),
        ),
    ];
    assert_parser_rejects(proxy.addr, &upstream, 431, over_the_limits).await;

    // Under both limits: 12 KiB in 19 fields is served and forwarded whole.
    let fine = format!(
        "GET /fine HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{}\r\n",
        (0..6)
            .map(|i| format!("X-Part-{i}: {}\r\n", &big[..2048]))
            .collect::<String>()
    );
    let seen = forwarded(proxy.addr, &upstream, fine.as_bytes(), "under the limits").await;
    assert_eq!(seen.headers["x-part-5"].len(), 2048);
    assert_still_serves(proxy.addr, &upstream).await;
}

/// NUL and bare CR inside a field value are `400`. A bare LF ends the field line (RFC 9112
/// §2.2 allows a recipient to accept it as a line terminator): what follows must be a valid
/// field line or the request is `400`; when it is one, the upstream gets two well-formed
/// fields in CRLF lines, never a value containing CR or LF.
#[tokio::test]
async fn nul_cr_lf_in_field_values() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    let control_characters = [
        ("NUL", &b"GET /ctl HTTP/1.1\r\nHost: a\r\nX-Value: a\0b\r\n\r\n"[..]),
        ("bare CR", b"GET /ctl HTTP/1.1\r\nHost: a\r\nX-Value: a\rb\r\n\r\n"),
        (
            "bare CR at the end",
            b"GET /ctl HTTP/1.1\r\nHost: a\r\nX-Value: ab\r\r\n\r\n",
        ),
        (
            "LF then junk",
            b"GET /ctl HTTP/1.1\r\nHost: a\r\nX-Value: a\nb c\r\n\r\n",
        ),
        (
            "NUL in a key",
            b"POST /ctl HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k\0x\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "CR in a key",
            b"POST /ctl HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k\rx\r\nContent-Length: 0\r\n\r\n",
        ),
        ("NUL in a name", b"GET /ctl HTTP/1.1\r\nHost: a\r\nX-Na\0me: a\r\n\r\n"),
    ];
    assert_parser_rejects(proxy.addr, &upstream, 400, control_characters).await;

    let lf = b"GET /lf HTTP/1.1\r\nHost: a\r\nX-Value: a\nX-Injected: b\r\nConnection: close\r\n\r\n";
    let seen = forwarded(proxy.addr, &upstream, lf, "bare LF").await;
    assert_eq!(seen.headers["x-value"], "a");
    assert_eq!(seen.headers["x-injected"], "b");
    assert!(
        seen.headers
            .values()
            .all(|v| !v.as_bytes().iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)),
        "{:?}",
        seen.headers
    );
    assert_still_serves(proxy.addr, &upstream).await;
}

/// Absolute-form (RFC 9112 §3.2.2) is accepted as a reverse proxy's origin server would: only
/// the path and query are forwarded, to the configured upstream, with `Host` set to the
/// upstream's: the proxy is never an open forward proxy. The target's authority (not the `Host`
/// field, which the RFC says to ignore) is what `X-Forwarded-Host` reports.
/// Userinfo in the target and asterisk-form (`OPTIONS *`) are `400`.
#[tokio::test]
async fn absolute_form_goes_to_the_configured_upstream_and_asterisk_form_is_400() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    for (target, host) in [
        ("http://example.com/path?q=1", "example.com"),
        ("https://example.com:8443/path?q=1", "other.example"),
        ("http://169.254.169.254/path?q=1", "169.254.169.254"),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let seen = forwarded(proxy.addr, &upstream, request.as_bytes(), target).await;
        assert_eq!(
            seen.uri.path_and_query().map(|pq| pq.as_str()),
            Some("/path?q=1"),
            "{target}"
        );
        assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str(), "{target}");
        let authority = target.split('/').nth(2).expect("an authority");
        assert_eq!(seen.headers["x-forwarded-host"], authority, "{target}");
    }
    assert_eq!(upstream.hits(), 3);

    // Userinfo in the target (RFC 9110 §4.2.4: treat it as an error) and asterisk-form are `400`.
    for (case, request) in [
        (
            "userinfo",
            "GET http://user:pw@example.com/path HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        ),
        (
            "OPTIONS *",
            "OPTIONS * HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n",
        ),
    ] {
        assert_refused_with_problem(proxy.addr, request.as_bytes(), 400, "bad-request", case).await;
        assert_eq!(upstream.hits(), 3);
    }
    assert_still_serves(proxy.addr, &upstream).await;
}

/// `CONNECT` is `400` (a reverse proxy tunnels nowhere) and the connection is closed after the
/// answer, so bytes the client sent for the tunnel are never read as requests.
#[tokio::test]
async fn connect_is_400_and_not_tunnelled() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    let connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nGET /tunnelled HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let answer = assert_refused_with_problem(proxy.addr, connect, 400, "bad-request", "CONNECT").await;
    assert!(
        head_has(&answer, "connection: close"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(response_count(&answer), 1, "{:?}", String::from_utf8_lossy(&answer));
    // Over HTTP/1.0 too.
    let connect_1_0 = b"CONNECT 127.0.0.1:22 HTTP/1.0\r\n\r\nSSH-2.0-x\r\n";
    assert_refused_with_problem(proxy.addr, connect_1_0, 400, "bad-request", "CONNECT 1.0").await;
    assert_eq!(upstream.hits(), 0);
    assert_never_reached(&upstream, "/tunnelled");
    assert_still_serves(proxy.addr, &upstream).await;
}

/// A request target that is not valid UTF-8 (raw bytes 0xff 0xfe, a broken sequence) is `400`
/// from hyper's parser; valid UTF-8 outside ASCII is `400` from the proxy; the percent-encoded
/// forms are forwarded byte for byte.
#[tokio::test]
async fn non_utf8_request_target_is_400() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    let not_utf8 = [
        ("0xff 0xfe", &b"GET /a\xff\xfe HTTP/1.1\r\nHost: a\r\n\r\n"[..]),
        (
            "0xff 0xfe in the query",
            b"GET /a?q=\xff\xfe HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "keyed POST",
            b"POST /\xc3\x28 HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k\r\nContent-Length: 0\r\n\r\n",
        ),
        ("NUL", b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n"),
    ];
    assert_parser_rejects(proxy.addr, &upstream, 400, not_utf8).await;
    // Valid UTF-8 that is not ASCII gets past hyper's parser; the proxy refuses it (RFC 9112
    // §3.2: the request target is ASCII) before routing.
    for target in ["/caf\u{e9}", "/a?q=\u{e9}t\u{e9}", "/\u{202e}txt.exe"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert_refused_with_problem(proxy.addr, request.as_bytes(), 400, "bad-request", target).await;
    }
    assert_eq!(upstream.hits(), 0);

    let percent_encoded = b"GET /a%FF%FE?q=%c3%28 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let seen = forwarded(proxy.addr, &upstream, percent_encoded, "percent-encoded").await;
    assert_eq!(
        seen.uri.path_and_query().map(|pq| pq.as_str()),
        Some("/a%FF%FE?q=%c3%28")
    );
    assert_still_serves(proxy.addr, &upstream).await;
}

/// An `Idempotency-Key` of 10 KiB on a POST is the invalid-key problem (`400`) and is not
/// forwarded.
#[tokio::test]
async fn ten_kib_idempotency_key_is_400_invalid_key() {
    let (upstream, proxy, _) = start_harness(TestProxy::to).await;
    let key = "k".repeat(10 * 1024);
    for key in [key.clone(), format!("\"{key}\"")] {
        let request = format!(
            "POST /pay HTTP/1.1\r\nHost: a\r\nIdempotency-Key: {key}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        assert_refused_with_problem(proxy.addr, request.as_bytes(), 400, "invalid-key", "10 KiB key").await;
    }
    assert_eq!(upstream.hits(), 0);
    assert_still_serves(proxy.addr, &upstream).await;
}

/// `server.max_connections = 4`: the proxy serves at most 4 connections at once. It stops
/// accepting at the limit, so a 5th connection waits in the kernel's listen backlog (its
/// connect succeeds, its request is not read) until one of the 4 closes, and is then served.
#[tokio::test]
async fn excess_connections_wait_until_one_closes() {
    let (upstream, proxy, _) = start_harness(|up| {
        TestProxy::to(up).config("server.max_connections = 4\nserver.header_read_timeout = \"20s\"")
    })
    .await;
    let mut held = Vec::new();
    for i in 0..4 {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        let request = format!("GET /held-{i} HTTP/1.1\r\nHost: a\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let answer = read_one_response(&mut stream, Duration::from_secs(5))
            .await
            .expect("one of the first 4 connections is served");
        assert_eq!(status(&answer), Some(201));
        held.push(stream); // idle keep-alive: still counts against the limit
    }
    assert_eq!(upstream.hits(), 4);

    let mut fifth = TcpStream::connect(proxy.addr)
        .await
        .expect("the kernel completes the handshake");
    fifth
        .write_all(b"GET /fifth HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write to the backlog");
    let waited = read_one_response(&mut fifth, Duration::from_millis(800)).await;
    assert!(waited.is_none(), "served over the limit: {waited:?}");
    assert_never_reached(&upstream, "/fifth");

    drop(held.remove(0));
    let closed = Instant::now();
    let answer = read_until_closed(&mut fifth, Duration::from_secs(5))
        .await
        .expect("served once a slot is free");
    assert_eq!(status(&answer), Some(201), "{:?}", String::from_utf8_lossy(&answer));
    eprintln!("5th connection served {:?} after one of the 4 closed", closed.elapsed());
    assert_eq!(upstream.requests().pop().expect("forwarded").uri.path(), "/fifth");
    assert_eq!(upstream.hits(), 5);

    // The 3 still held keep working.
    for (i, stream) in held.iter_mut().enumerate() {
        let request = format!("GET /again-{i} HTTP/1.1\r\nHost: a\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let answer = read_one_response(stream, Duration::from_secs(5)).await.expect("served");
        assert_eq!(status(&answer), Some(201));
    }
}

const SLOW_CLIENTS: usize = 200;
const DOWNLOAD_BYTES: u64 = 8 * 1024 * 1024;
const SLOW_READ_BYTES: usize = 4 * 1024;
const SLOW_FOR: Duration = Duration::from_secs(4);
/// What a slow connection may cost at most: an eighth of its body. Measured (debug build): about
/// 0.6-0.7 MiB per connection, most of it the upstream client's HTTP/1 read buffer (hyper's
/// default ceiling, ~400 KiB); see `docs/hostile-input.md`.
const PER_CONNECTION_LIMIT_KIB: u64 = 384;
/// The process before any connection, with room to spare.
const BASELINE_LIMIT_KIB: u64 = 40 * 1024;

/// Backpressure: 200 clients each start an 8 MiB download (1.6 GiB in all) and read only
/// 4 KiB every 100 ms. The proxy (the real binary, so `VmHWM` is its own) reads from the
/// upstream only as fast as each client drains, so it holds buffers, not bodies: its peak
/// resident set stays under 40 MiB + 384 KiB per connection (115 MiB, against 1.6 GiB of bodies
/// offered), and it serves normally afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_readers_do_not_grow_memory_without_bound() {
    let upstream = TestUpstream::start().await;
    let proxy = ProxyProcess::spawn(&["--upstream", &upstream.url()]);
    let pid = proxy.pid();
    let before = proc_status_kib(pid, "VmHWM");

    let mut clients = Vec::new();
    for i in 0..SLOW_CLIENTS {
        let addr = proxy.addr;
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let request = format!(
                "GET /download-{i} HTTP/1.1\r\nHost: a\r\nx-upstream-body-bytes: {DOWNLOAD_BYTES}\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut first = Vec::new();
            let mut received = 0usize;
            let mut buf = vec![0u8; SLOW_READ_BYTES];
            let until = Instant::now() + SLOW_FOR;
            while Instant::now() < until {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if first.len() < 64 {
                            first.extend_from_slice(&buf[..n.min(64)]);
                        }
                        received += n;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (status(&first), received, stream)
        }));
    }
    let mut peak_during = 0;
    let mut streams = Vec::new();
    let mut received = 0;
    let sampler = async {
        loop {
            peak_during = peak_during.max(proc_status_kib(pid, "VmRSS"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let join_all = async {
        for client in clients {
            let (code, bytes, stream) = client.await.expect("client task");
            assert_eq!(code, Some(201), "a slow client got its answer head");
            received += bytes;
            streams.push(stream);
        }
    };
    tokio::select! {
        () = join_all => {}
        () = sampler => unreachable!(),
    }
    assert_eq!(upstream.hits(), SLOW_CLIENTS, "every download reached the upstream");
    let peak = proc_status_kib(pid, "VmHWM");
    let rss = proc_status_kib(pid, "VmRSS");
    eprintln!(
        "{SLOW_CLIENTS} slow readers of {} MiB each ({} MiB offered), {:.1} MiB read in all: proxy VmHWM {peak} KiB \
         ({:.1} MiB; {before} KiB at start), VmRSS now {rss} KiB, highest sampled VmRSS {peak_during} KiB",
        DOWNLOAD_BYTES >> 20,
        (DOWNLOAD_BYTES >> 20) * SLOW_CLIENTS as u64,
        received as f64 / (1024.0 * 1024.0),
        peak as f64 / 1024.0,
    );
    let limit = BASELINE_LIMIT_KIB + PER_CONNECTION_LIMIT_KIB * SLOW_CLIENTS as u64;
    assert!(
        peak < limit,
        "proxy peak RSS {peak} KiB is not under {limit} KiB: slow readers are buffered in memory"
    );
    drop(streams);

    // Still serving: a fresh request while the abandoned downloads are torn down.
    let client = common::TestClient::new();
    let response = client.send(Method::GET, &proxy.url("/after"), &[], "").await;
    assert_eq!(response.status, http::StatusCode::CREATED);
}

/// With `error_format = "stripe"` on a route, what is refused before a route is known (a
/// `CONNECT`, an asterisk-form or non-ASCII target, a path no route serves) is still
/// problem+json; what is refused on the route (an oversized key, a broken keyed body) is in
/// Stripe's form.
#[tokio::test]
async fn the_stripe_form_starts_once_the_route_is_known() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&format!(
        "log.filter = \"warn\"\n[[route]]\nprefix = \"/v1\"\nupstream = \"{}\"\nidempotency.error_format = \"stripe\"",
        upstream.url()
    ))
    .await;
    for (case, request) in [
        (
            "CONNECT",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        ),
        (
            "OPTIONS *",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ),
        (
            "non-ASCII",
            "GET /v1/caf\u{e9} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ),
    ] {
        assert_refused_with_problem(proxy.addr, request.as_bytes(), 400, "bad-request", case).await;
    }
    let no_route = b"GET /v2/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert_refused_with_problem(proxy.addr, no_route, 404, "no-route", "no route").await;

    let key = "k".repeat(10 * 1024);
    let request = format!(
        "POST /v1/charges HTTP/1.1\r\nHost: a\r\nIdempotency-Key: {key}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let answer = exchange(proxy.addr, request.as_bytes()).await;
    assert_stripe_error(&answer, 400, "invalid-key", "10 KiB key");
    let broken = "POST /v1/charges HTTP/1.1\r\nHost: a\r\nIdempotency-Key: chunk-zz\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n";
    let answer = exchange(proxy.addr, broken.as_bytes()).await;
    assert_stripe_error(&answer, 400, "bad-request", "broken chunk");
    assert_eq!(upstream.hits(), 0, "{:?}", upstream.requests());
}
