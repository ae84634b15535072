//! Pass-through bodies stream (docs/behaviour.md §1): 64 MiB through the proxy binary, in either direction,
//! while the proxy process's peak resident set stays far below the body size. The proxy runs as
//! its own process so that `VmHWM` measures the proxy alone.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::{ProxyProcess, TestUpstream};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BODY_BYTES: u64 = 64 * 1024 * 1024;
const PEAK_RSS_LIMIT_KIB: u64 = 48 * 1024;

/// The proxy is still running and its peak resident set (`VmHWM`; `before` KiB before `transfer`)
/// stayed under [`PEAK_RSS_LIMIT_KIB`].
fn assert_peak_rss_bounded(proxy: &mut ProxyProcess, what: &str, transfer: &str, before: u64) {
    proxy.assert_running();
    let peak = proxy.status_kib("VmHWM");
    eprintln!(
        "{what}: proxy VmHWM {peak} KiB ({:.1} MiB; {before} KiB before {transfer})",
        peak as f64 / 1024.0
    );
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "proxy peak RSS {peak} KiB is not under {PEAK_RSS_LIMIT_KIB} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_download_streams_through_in_bounded_memory() {
    let upstream = TestUpstream::start().await;
    let mut proxy = ProxyProcess::spawn(&["--upstream", &upstream.url(), "--log-format", "json"]);
    let before = proxy.status_kib("VmHWM");

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(Method::GET)
        .uri(proxy.url("/download"))
        .header("x-upstream-body-bytes", BODY_BYTES.to_string())
        .body(Empty::new())
        .expect("request");
    let download = async {
        let response = client.request(request).await.expect("response head");
        assert_eq!(response.status(), StatusCode::CREATED);
        let mut body = response.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                received += data.len() as u64;
            }
        }
        received
    };
    let received = tokio::time::timeout(Duration::from_secs(120), download)
        .await
        .expect("the download completes within 120s");
    assert_eq!(received, BODY_BYTES);

    assert_peak_rss_bounded(&mut proxy, "64 MiB download", "the download", before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_keyless_upload_streams_through_in_bounded_memory() {
    let upstream = TestUpstream::start().await;
    let mut proxy = ProxyProcess::spawn(&["--upstream", &upstream.url(), "--log-format", "json"]);
    let before = proxy.status_kib("VmHWM");

    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'u'; CHUNK as usize]);
    let frames = (0..BODY_BYTES / CHUNK).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone())));
    let body = StreamBody::new(futures::stream::iter(frames));
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(Method::POST)
        .uri(proxy.url("/upload"))
        .body(body)
        .expect("request");
    let upload = async {
        let response = client.request(request).await.expect("response head");
        let status = response.status();
        let body = response.into_body().collect().await.expect("response body").to_bytes();
        (status, body)
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), upload)
        .await
        .expect("the upload completes within 120s");
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(answer["body_bytes"], BODY_BYTES);
    assert_eq!(upstream.requests()[0].body.len() as u64, BODY_BYTES);

    assert_peak_rss_bounded(&mut proxy, "64 MiB keyless upload", "the upload", before);
}
