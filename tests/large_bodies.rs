//! Guarded bodies larger than `buffer_bytes` stream upstream while they are hashed
//! (docs/behaviour.md §15): executed once, replayed or refused by their digest, in bounded
//! memory; `Content-Digest` verified before the upstream gets a body's end; a body that breaks
//! leaves its key free. The upstream here hashes what it receives (it never holds a body), and
//! the bodies are generated as they are sent.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{per_store, Backend, ProxyProcess, TestProxy};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CHUNK: usize = 64 * 1024;

/// A request body as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    bytes: u64,
    /// Its SHA-256, when it arrived complete (its end included).
    complete: Option<[u8; 32]>,
}

/// An upstream that reads each request body as it arrives, counting and hashing it, and
/// answers `201 {"hit":n}` once it has it whole.
#[derive(Clone)]
struct HashingUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests whose head arrived.
    started: Arc<AtomicUsize>,
}

impl HashingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let started: Arc<AtomicUsize> = Arc::default();
        let (record, arrived) = (seen.clone(), started.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (record, arrived) = (record.clone(), arrived.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        let record = record.clone();
                        async move { Ok::<_, Infallible>(receive(request, record).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, started }
    }

    /// Waits until `n` requests have started arriving.
    async fn wait_started(&self, n: usize) {
        for _ in 0..500 {
            if self.started.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} requests did not reach the upstream");
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// The bodies it received whole.
    fn complete(&self) -> Vec<[u8; 32]> {
        self.seen().iter().filter_map(|s| s.complete).collect()
    }
}

async fn receive(request: Request<Incoming>, record: Arc<Mutex<Vec<Seen>>>) -> Response<Full<Bytes>> {
    let mut body = request.into_body();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Err(_)) => break false,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes += data.len() as u64;
                    hasher.update(&data);
                }
            }
        }
    };
    let hit = {
        let mut seen = record.lock().expect("lock");
        seen.push(Seen {
            bytes,
            complete: complete.then(|| hasher.finalize().into()),
        });
        seen.len()
    };
    Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{{\"hit\":{hit}}}"))))
        .expect("response")
}

/// A body of `len` bytes generated from `seed` as it is sent, 64 KiB at a time; with
/// `Content-Length` (an exact size) or chunked.
struct Generated {
    block: Bytes,
    index: u64,
    left: u64,
    exact: bool,
}

impl Generated {
    fn new(seed: u8, len: u64, exact: bool) -> Self {
        let block: Vec<u8> = (0..CHUNK)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        Self {
            block: Bytes::from(block),
            index: 0,
            left: len,
            exact,
        }
    }

    /// The next chunk: the seed's block, stamped with its index (no two chunks alike).
    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(CHUNK as u64) as usize;
        let mut chunk = self.block[..n].to_vec();
        for (byte, stamp) in chunk.iter_mut().zip(self.index.to_be_bytes()) {
            *byte = stamp;
        }
        self.index += 1;
        self.left -= n as u64;
        Some(Bytes::from(chunk))
    }

    /// The SHA-256 of the body this generator makes.
    fn digest(seed: u8, len: u64) -> [u8; 32] {
        let mut generated = Self::new(seed, len, true);
        let mut hasher = Sha256::new();
        while let Some(chunk) = generated.next_chunk() {
            hasher.update(&chunk);
        }
        hasher.finalize().into()
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().next_chunk().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.left)
        } else {
            SizeHint::default()
        }
    }
}

/// `Content-Digest: sha-256=:…:` for `digest`.
fn content_digest(digest: &[u8; 32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in digest.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            encoded.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        for _ in chunk.len()..3 {
            encoded.push('=');
        }
    }
    format!("sha-256=:{encoded}:")
}

/// An upload's answer: status, `Idempotent-Replayed`, problem type slug (if any), body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: String,
}

impl Answer {
    fn slug(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| {
                v["type"]
                    .as_str()
                    .map(|t| t.rsplit('#').next().unwrap_or_default().to_owned())
            })
            .unwrap_or_default()
    }
}

/// `POST url` with `key` and the generated body of `seed`, plus `headers`.
async fn upload(url: &str, key: &str, seed: u8, len: u64, exact: bool, headers: &[(&str, String)]) -> Answer {
    try_upload(url, key, seed, len, exact, headers)
        .await
        .expect("an answer")
}

/// [`upload`], or the client's error when the proxy closed the connection before the client had
/// sent the whole body (as it does after answering an upload it refused mid-body).
async fn try_upload(
    url: &str,
    key: &str,
    seed: u8,
    len: u64,
    exact: bool,
    headers: &[(&str, String)],
) -> Result<Answer, hyper_util::client::legacy::Error> {
    let client: Client<_, Generated> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("idempotency-key", key)
        .header("content-type", "application/octet-stream");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(Generated::new(seed, len, exact)).expect("request");
    let response = client.request(request).await?;
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.into_body().collect().await.expect("answer body").to_bytes();
    Ok(Answer {
        status,
        replayed,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Three keyed 256 MiB uploads through the proxy binary (disk store): the first executes, the
/// same body again is replayed, another body is refused; the upstream gets the exact bytes
/// once, and the proxy's peak resident set stays far below one body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_256_mib_keyed_uploads_run_once_in_bounded_memory() {
    const LEN: u64 = 256 * 1024 * 1024;
    const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
    let upstream = HashingUpstream::start().await;
    let mut proxy = ProxyProcess::spawn(&["--upstream", &upstream.url(), "--max-body-bytes", "1073741824"]);
    let url = proxy.url("/uploads");

    let first = upload(&url, "upload-1", 1, LEN, true, &[]).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.replayed);
    let again = upload(&url, "upload-1", 1, LEN, true, &[]).await;
    assert_eq!((again.status, again.replayed), (StatusCode::CREATED, true), "{again:?}");
    assert_eq!(again.body, first.body);
    let other = upload(&url, "upload-1", 2, LEN, true, &[]).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    assert_eq!(other.slug(), "key-reused");

    assert_eq!(
        upstream.seen(),
        vec![Seen {
            bytes: LEN,
            complete: Some(Generated::digest(1, LEN)),
        }],
        "the upstream got the first body whole, once, and nothing of the others"
    );
    proxy.assert_running();
    let peak = proxy.status_kib("VmHWM");
    eprintln!("3 x 256 MiB keyed uploads: proxy VmHWM {peak} KiB");
    assert!(peak < PEAK_RSS_LIMIT_KIB, "proxy peak RSS {peak} KiB");
}

/// The proxy on `store` with a small `buffer_bytes`, so that a few MiB stream.
async fn streaming_proxy(store: &Backend, upstream: &HashingUpstream, extra: &str) -> TestProxy {
    TestProxy::to_url(upstream.url())
        .store(store)
        .idempotency("buffer_bytes = 65536")
        .idempotency(extra)
        .start()
        .await
}

const MIB4: u64 = 4 * 1024 * 1024;

/// Streamed bodies, with `Content-Length` and chunked, are decided by their digest as bodies
/// read whole are by their bytes: replayed when the same, `422` when not.
async fn streamed_bodies_replay_or_conflict_by_digest(store: Backend) {
    let upstream = HashingUpstream::start().await;
    let proxy = streaming_proxy(&store, &upstream, "").await;
    let url = proxy.url("/uploads");
    for (key, exact) in [("with-length", true), ("chunked", false)] {
        let first = upload(&url, key, 1, MIB4, exact, &[]).await;
        assert_eq!(first.status, StatusCode::CREATED, "{key}: {first:?}");
        // A retry chunked or with a length alike: the body's digest is what counts.
        let again = upload(&url, key, 1, MIB4, !exact, &[]).await;
        assert_eq!(
            (again.status, again.replayed),
            (StatusCode::CREATED, true),
            "{key}: {again:?}"
        );
        let other = upload(&url, key, 3, MIB4, exact, &[]).await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{key}: {other:?}");
    }
    let digest = Generated::digest(1, MIB4);
    assert_eq!(
        upstream.complete(),
        vec![digest, digest],
        "each key's body reached the upstream once"
    );
}

/// A body that does not match its `Content-Digest` never reaches the upstream whole (with a
/// length or chunked), gets `400` `digest-mismatch`, and leaves the key free; a matching digest
/// decides a retry at once (`422` while the first still runs is tested by the decision's
/// properties).
async fn a_body_not_matching_its_digest_never_arrives_whole(store: Backend) {
    let upstream = HashingUpstream::start().await;
    let proxy = streaming_proxy(&store, &upstream, "").await;
    let url = proxy.url("/uploads");
    let right = content_digest(&Generated::digest(1, MIB4));
    let wrong = content_digest(&Generated::digest(2, MIB4));
    for (key, exact) in [("digest-length", true), ("digest-chunked", false)] {
        let refused = upload(&url, key, 1, MIB4, exact, &[("content-digest", wrong.clone())]).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{key}: {refused:?}");
        assert_eq!(refused.slug(), "digest-mismatch", "{key}");
        assert!(upstream.complete().is_empty(), "{key}: {:?}", upstream.seen());
        // The key is free: the right body with the right digest executes.
        let executed = upload(&url, key, 1, MIB4, exact, &[("content-digest", right.clone())]).await;
        assert_eq!(
            (executed.status, executed.replayed),
            (StatusCode::CREATED, false),
            "{key}: {executed:?}"
        );
        let again = upload(&url, key, 1, MIB4, exact, &[("content-digest", right.clone())]).await;
        assert!(again.replayed, "{key}: {again:?}");
        let other = upload(&url, key, 2, MIB4, exact, &[("content-digest", wrong.clone())]).await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{key}: {other:?}");
        upstream.seen.lock().expect("lock").clear();
    }
}

/// A malformed `Content-Digest` is `400` `bad-content-digest`, naming the problem; nothing is
/// forwarded. A body read whole is checked too.
async fn a_malformed_content_digest_is_refused(store: Backend) {
    let upstream = HashingUpstream::start().await;
    let proxy = streaming_proxy(&store, &upstream, "").await;
    let url = proxy.url("/uploads");
    for (len, value, problem) in [
        (MIB4, "sha-256=:AAAA:", "not 32 bytes long"),
        (1024, "sha-256=abc", "not a byte sequence"),
        (1024, "SHA-256=:AAAA:", "must start with a lowercase letter"),
    ] {
        let refused = upload(
            &url,
            "bad-digest",
            1,
            len,
            true,
            &[("content-digest", value.to_owned())],
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{value}: {refused:?}");
        assert_eq!(refused.slug(), "bad-content-digest", "{value}");
        assert!(refused.body.contains(problem), "{value}: {}", refused.body);
    }
    let small = upload(
        &url,
        "small",
        1,
        1024,
        true,
        &[("content-digest", content_digest(&[0; 32]))],
    )
    .await;
    assert_eq!(small.slug(), "digest-mismatch", "{small:?}");
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
}

/// A client that goes away mid-body: the upstream never got the whole request, so the key is
/// released and a retry executes; past `max_body_bytes` mid-stream: `413`, key released.
async fn a_body_cut_mid_stream_releases_the_key(store: Backend) {
    let upstream = HashingUpstream::start().await;
    let proxy = streaming_proxy(&store, &upstream, "max_body_bytes = 8388608").await;
    let url = proxy.url("/uploads");

    let (stream, _) = start_upload(proxy.addr, "cut", 1, MIB4, MIB4 / 2, &[]).await;
    upstream.wait_started(1).await;
    drop(stream);
    // The key is settled once the proxy saw the cut (at once, but asynchronously).
    let mut retry = upload(&url, "cut", 1, MIB4, true, &[]).await;
    for _ in 0..50 {
        if retry.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = upload(&url, "cut", 1, MIB4, true, &[]).await;
    }
    assert_eq!(
        (retry.status, retry.replayed),
        (StatusCode::CREATED, false),
        "{retry:?}"
    );
    assert_eq!(upstream.complete(), vec![Generated::digest(1, MIB4)]);

    // The proxy answers 413 as the body passes the limit and closes the connection: a client
    // still writing may see the close before it reads the answer.
    match try_upload(&url, "too-large", 1, 3 * MIB4, false, &[]).await {
        Ok(too_large) => assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE, "{too_large:?}"),
        Err(err) => assert!(
            format!("{err:?}").contains("BodyWrite"),
            "the proxy stopped the upload while it was sent: {err:?}"
        ),
    }
    let retry = upload(&url, "too-large", 1, MIB4, false, &[]).await;
    assert_eq!(
        (retry.status, retry.replayed),
        (StatusCode::CREATED, false),
        "{retry:?}"
    );
    assert_eq!(upstream.complete().len(), 2, "{:?}", upstream.seen());
}

/// An upload on a raw connection: its head (with `headers`) and the first `sent` bytes of the
/// generated body of `seed`, `len` bytes long; the rest is sent by [`finish_upload`].
async fn start_upload(
    addr: SocketAddr,
    key: &str,
    seed: u8,
    len: u64,
    sent: u64,
    headers: &[(&str, String)],
) -> (tokio::net::TcpStream, Generated) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "POST /uploads HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\nconnection: close\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("head");
    let mut generated = Generated::new(seed, len, true);
    let mut written = 0;
    while written < sent {
        let chunk = generated.next_chunk().expect("a chunk");
        written += chunk.len() as u64;
        stream.write_all(&chunk).await.expect("body");
    }
    (stream, generated)
}

/// Sends the rest of an upload begun by [`start_upload`]; its answer's status line.
async fn finish_upload((mut stream, mut generated): (tokio::net::TcpStream, Generated)) -> String {
    while let Some(chunk) = generated.next_chunk() {
        stream.write_all(&chunk).await.expect("body");
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("answer");
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// While a streamed request runs, a retry with the same key and head gets `409` even with
/// another body (its digest is not known yet); with `Content-Digest` on both, another body is
/// `422` at once. Once the first has finished, another body is `422` and the same is replayed.
async fn retries_while_a_streamed_request_runs(store: Backend) {
    let upstream = HashingUpstream::start().await;
    let proxy = streaming_proxy(&store, &upstream, "").await;
    let url = proxy.url("/uploads");
    let first = start_upload(proxy.addr, "running", 1, MIB4, MIB4 / 4, &[]).await;
    upstream.wait_started(1).await;
    let other = upload(&url, "running", 2, MIB4, true, &[]).await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{other:?}");

    let digest = |seed| content_digest(&Generated::digest(seed, MIB4));
    let declared = start_upload(
        proxy.addr,
        "declared",
        1,
        MIB4,
        MIB4 / 4,
        &[("content-digest", digest(1))],
    )
    .await;
    upstream.wait_started(2).await;
    let other = upload(&url, "declared", 2, MIB4, true, &[("content-digest", digest(2))]).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    let same = upload(&url, "declared", 1, MIB4, true, &[("content-digest", digest(1))]).await;
    assert_eq!(same.status, StatusCode::CONFLICT, "{same:?}");

    assert!(finish_upload(first).await.contains(" 201 "));
    assert!(finish_upload(declared).await.contains(" 201 "));
    let other = upload(&url, "running", 2, MIB4, true, &[]).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    let same = upload(&url, "running", 1, MIB4, false, &[]).await;
    assert!(same.replayed, "{same:?}");
    assert_eq!(upstream.complete().len(), 2, "{:?}", upstream.seen());
}

per_store! {
    stores { memory => Backend::memory(), disk => Backend::disk(), redis => Backend::redis() }
    tests {
        streamed_bodies_replay_or_conflict_by_digest,
        a_body_not_matching_its_digest_never_arrives_whole,
        a_malformed_content_digest_is_refused,
        a_body_cut_mid_stream_releases_the_key,
        retries_while_a_streamed_request_runs,
    }
}
