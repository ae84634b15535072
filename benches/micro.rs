//! Micro benchmarks of the per-request idempotency work: key parsing, key sources,
//! fingerprinting (bytes and canonical JSON), record encoding/decoding and the decision; and
//! the metrics every pass-through request records.
//! Run: `cargo bench --bench micro`.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use idemproxy::config::{JsonPointer, KeySource, UnknownOutcome};
use idemproxy::idempotency::source::{self, json_key, BodyView};
use idemproxy::idempotency::{decide, key, Existing, Fingerprint, LeaseToken, Record, StorageKey, StoredResponse};
use idemproxy::telemetry::{Metrics, Outcome};

fn key_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_parse");
    for len in [16usize, 36, 255] {
        let bare = "k".repeat(len);
        let quoted = format!("\"{}\"", "k".repeat(len));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("bare", len), &bare, |b, v| {
            b.iter(|| key::parse(black_box(v.as_bytes())).map(|k| k.as_bytes().len()))
        });
        group.bench_with_input(BenchmarkId::new("sf_string", len), &quoted, |b, v| {
            b.iter(|| key::parse(black_box(v.as_bytes())).map(|k| k.as_bytes().len()))
        });
    }
    group.finish();
}

fn fingerprinting(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    let uri: Uri = "/v1/orders?expand=items".parse().expect("uri");
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let body = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| Fingerprint::of(&Method::POST, &uri, Some(b"application/json"), black_box(body)))
        });
    }
    group.finish();
    c.bench_function("storage_key", |b| {
        b.iter(|| {
            StorageKey::new(
                "idem:",
                "default",
                black_box(b"Bearer abcdef0123456789"),
                black_box(b"8e03978e-40d5-43e8-bc93-6894a57f9324"),
            )
        })
    });
}

/// A JSON order of about `size` bytes, members in no particular order: a client order id and a
/// timestamp up front, then line items.
fn json_body(size: usize) -> Vec<u8> {
    let mut body = String::from(
        r#"{"sent_at":"2026-11-21T10:00:00.123Z","client_order_id":"ord-8e03978e","currency":"EUR","items":["#,
    );
    let mut i = 0u32;
    while body.len() + 120 < size {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"sku":"sku-{i:06}","qty":{},"price":{},"note":"gift wrap é {i}","tags":["a","b"]}}"#,
            i % 7 + 1,
            1999 + i
        ));
        i += 1;
    }
    body.push_str(r#"],"amount":9007199254740993}"#);
    body.into_bytes()
}

fn json_fingerprinting(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint_json");
    let uri: Uri = "/v1/orders?expand=items".parse().expect("uri");
    let ignore = [JsonPointer::parse("/sent_at").expect("pointer")];
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let body = json_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| Fingerprint::of_json(&Method::POST, &uri, Some(b"application/json"), black_box(body), &ignore))
        });
    }
    group.finish();
}

fn key_sources(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_source");
    let body = json_body(1024);
    let first = JsonPointer::parse("/client_order_id").expect("pointer");
    let last = JsonPointer::parse("/amount").expect("pointer");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("json_1024_near_start", |b| {
        b.iter(|| json_key(black_box(&body), &first).map(|k| k.map(|k| k.as_bytes().len())))
    });
    group.bench_function("json_1024_at_end", |b| {
        b.iter(|| json_key(black_box(&body), &last).map(|k| k.map(|k| k.as_bytes().len())))
    });
    // The default source, as every keyed request without key_sources settings looks it up.
    let sources = [KeySource::default_header()];
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "idempotency-key",
        HeaderValue::from_static("8e03978e-40d5-43e8-bc93-6894a57f9324"),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let uri: Uri = "/v1/orders".parse().expect("uri");
    group.throughput(Throughput::Elements(1));
    group.bench_function("default_header", |b| {
        b.iter(|| {
            matches!(
                source::find(&sources, 0, black_box(&headers), &uri, BodyView::NotRead),
                Ok(source::Lookup::Found { .. })
            )
        })
    });
    group.finish();
}

fn completed(body_len: usize) -> Record {
    Record::Completed {
        fingerprint: Fingerprint::bytes([7; 32]),
        response: StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("location"),
                    HeaderValue::from_static("/v1/orders/123"),
                ),
                (
                    HeaderName::from_static("x-request-id"),
                    HeaderValue::from_static("0f8fad5b-d9cb-469f-a165-70867728950e"),
                ),
            ],
            body: Some(Bytes::from(vec![b'x'; body_len])),
            completed_at_ms: 1_700_000_000_000,
        },
    }
}

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for size in [64usize, 1024, 64 * 1024] {
        let record = completed(size);
        let encoded = record.encode();
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &record, |b, r| {
            b.iter(|| black_box(r).encode())
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, e| {
            b.iter(|| Record::decode(black_box(e.clone())))
        });
    }
    group.finish();
}

fn decision(c: &mut Criterion) {
    let fingerprint = Fingerprint::bytes([7; 32]);
    let replay = Existing {
        record: completed(1024),
        lease_left: None,
    };
    let in_flight = Existing {
        record: Record::InFlight {
            fingerprint,
            owner: LeaseToken([1; 16]),
            started_at_ms: 0,
            lease_until_ms: 0,
        },
        lease_left: Some(std::time::Duration::from_secs(10)),
    };
    let print = idemproxy::idempotency::Print::Whole(fingerprint);
    let mut group = c.benchmark_group("decide");
    group.bench_function("none", |b| {
        b.iter(|| decide(None, black_box(&print), UnknownOutcome::Reject))
    });
    group.bench_function("completed", |b| {
        b.iter(|| {
            decide(
                Some(black_box(&replay).clone()),
                black_box(&print),
                UnknownOutcome::Reject,
            )
        })
    });
    group.bench_function("in_flight", |b| {
        b.iter(|| {
            decide(
                Some(black_box(&in_flight).clone()),
                black_box(&print),
                UnknownOutcome::Reject,
            )
        })
    });
    group.finish();
}

/// What a pass-through request costs the metrics (issue 18): the in-flight gauge up and down,
/// the upstream duration observed, the request counted. Shared atomics and the histogram's
/// lock, uncontended: the ceiling of what per-thread counters folded at scrape time could save.
fn request_metrics(c: &mut Criterion) {
    let metrics = Metrics::new(["default"]);
    let mut micros = 0u64;
    c.bench_function("request_metrics", |b| {
        b.iter(|| {
            let in_flight = metrics.in_flight();
            micros = (micros + 37) % 700;
            metrics.upstream_duration(0, std::time::Duration::from_micros(micros));
            metrics.request(Some(0), &Method::GET, Outcome::Passthrough);
            drop(black_box(in_flight));
        })
    });
}

criterion_group!(
    benches,
    key_parsing,
    key_sources,
    fingerprinting,
    json_fingerprinting,
    records,
    decision,
    request_metrics
);
criterion_main!(benches);
