//! Interoperability with a real Stripe SDK (docs/behaviour.md §16, docs/clients.md): the
//! official `stripe` Python package, pointed at idemproxy in front of a Stripe-shaped upstream,
//! runs `tests/stripe/interop.py`, and this test checks what the SDK saw against what the
//! upstream executed.
//!
//! The package comes from the virtual environment `.ci/run` makes (`target/stripe-venv`), or
//! from the Python named by `IDEMPROXY_STRIPE_PYTHON`. Without the virtual environment the test
//! is skipped, saying so on the terminal (past the test harness's capture); a Python named by
//! `IDEMPROXY_STRIPE_PYTHON` that cannot import `stripe` fails the test instead.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ProxyProcess;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/stripe/interop.py");
const VENV_PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/stripe-venv/bin/python");
/// How long the upstream takes over a charge described `slow` (the SDK's timeout is 1 s).
const SLOW: Duration = Duration::from_millis(1500);

/// The Python to run the SDK with, or why there is none: `Ok(None)` means skip.
fn stripe_python() -> Result<Option<PathBuf>, String> {
    let (python, required) = match std::env::var_os("IDEMPROXY_STRIPE_PYTHON") {
        Some(named) => (PathBuf::from(named), true),
        None => (PathBuf::from(VENV_PYTHON), false),
    };
    let imports = std::process::Command::new(&python)
        .args(["-c", "import stripe"])
        .output()
        .is_ok_and(|out| out.status.success());
    match (imports, required) {
        (true, _) => Ok(Some(python)),
        (false, false) => Ok(None),
        (false, true) => Err(format!(
            "IDEMPROXY_STRIPE_PYTHON={} cannot import the `stripe` package",
            python.display()
        )),
    }
}

/// Says on the terminal that the test did not run: written to stderr directly, which the test
/// harness does not capture, so a skip is never silent.
fn announce_skip() {
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED stripe_sdk: no Python with the `stripe` package at {VENV_PYTHON} and \
         IDEMPROXY_STRIPE_PYTHON unset. Install it as .ci/run does: \
         python3 -m venv target/stripe-venv && target/stripe-venv/bin/pip install stripe==16.1.0\n"
    );
}

/// A Stripe-shaped upstream: `POST /v1/charges`, form-encoded as the SDK sends it, creates
/// charge `ch_<n>` and answers Stripe's charge object; a `description` of `slow` answers after
/// [`SLOW`], one of `fail` answers `500` with Stripe's error object. It counts the charges it
/// executed per description.
#[derive(Clone, Default)]
struct StripeUpstream {
    executed: Arc<Mutex<HashMap<String, usize>>>,
}

impl StripeUpstream {
    async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("an address");
        let upstream = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let upstream = upstream.clone();
                        async move { upstream.answer(request).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn executed(&self, description: &str) -> usize {
        self.executed
            .lock()
            .expect("lock")
            .get(description)
            .copied()
            .unwrap_or(0)
    }

    async fn answer(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let path = request.uri().path().to_owned();
        let body = request.into_body().collect().await?.to_bytes();
        let params: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        if path != "/v1/charges" {
            let error = json!({"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}});
            return Ok(stripe_json(StatusCode::NOT_FOUND, &error, 0));
        }
        let description = params.get("description").cloned().unwrap_or_default();
        let n = {
            let mut executed = self.executed.lock().expect("lock");
            *executed.entry(description.clone()).or_default() += 1;
            executed.values().sum::<usize>()
        };
        match description.as_str() {
            "fail" => {
                let error = json!({"error": {"type": "api_error", "message": "An unknown error occurred"}});
                return Ok(stripe_json(StatusCode::INTERNAL_SERVER_ERROR, &error, n));
            }
            "slow" => tokio::time::sleep(SLOW).await,
            _ => {}
        }
        let amount: u64 = params.get("amount").and_then(|a| a.parse().ok()).unwrap_or(0);
        let charge = json!({
            "id": format!("ch_{n}"),
            "object": "charge",
            "amount": amount,
            "currency": params.get("currency"),
            "description": description,
            "paid": true,
            "status": "succeeded",
            "livemode": false,
        });
        Ok(stripe_json(StatusCode::OK, &charge, n))
    }
}

fn stripe_json(status: StatusCode, body: &Value, n: usize) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", http::HeaderValue::from_static("application/json"));
    if let Ok(id) = http::HeaderValue::from_str(&format!("req_{n}")) {
        headers.insert("request-id", id);
    }
    response
}

/// Runs the SDK's scenarios against `api_base`; what it saw, per scenario.
async fn run_sdk(python: PathBuf, api_base: String) -> Value {
    let run = tokio::process::Command::new(python)
        .arg(SCRIPT)
        .arg(api_base)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the SDK scenarios finish within 60 s")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "interop.py failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("interop.py printed no JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stripe_python_sdk_through_idemproxy() {
    let python = match stripe_python() {
        Ok(Some(python)) => python,
        Ok(None) => return announce_skip(),
        Err(err) => panic!("{err}"),
    };
    let upstream = StripeUpstream::default();
    let upstream_addr = upstream.start().await;
    let proxy = ProxyProcess::spawn(&[
        "--upstream",
        &format!("http://{upstream_addr}"),
        "--error-format",
        "stripe",
        "--retry-hint-header",
        "Stripe-Should-Retry",
        "--on-conflict",
        "wait",
        "--wait-timeout",
        "5s",
    ]);
    let started = Instant::now();
    let seen = run_sdk(python, proxy.url("")).await;
    let took = started.elapsed();

    let create = &seen["create"];
    assert_eq!(create["attempts"], 1, "{seen}");
    assert_eq!(create["replayed"], Value::Null, "{seen}");
    let replay = &seen["replay"];
    assert_eq!(replay["id"], create["id"], "the same charge: {seen}");
    assert_eq!(replay["replayed"], "true", "{seen}");
    assert_eq!(upstream.executed("create"), 1);

    // The client timed out, retried 0.5 s later, and its retry waited for the one execution
    // (a loaded machine may take one more retry).
    let slow = &seen["slow"];
    assert!(slow["id"].as_str().is_some(), "the client got the charge: {seen}");
    let attempts = slow["attempts"].as_u64().unwrap_or(0);
    assert!((2..=4).contains(&attempts), "{seen}");
    assert_eq!(slow["replayed"], "true", "{seen}");
    assert_eq!(upstream.executed("slow"), 1);

    let reuse = &seen["reuse"];
    assert_eq!(reuse["exception"], "IdempotencyError", "{seen}");
    assert_eq!(reuse["http_status"], 400, "{seen}");
    assert_eq!(reuse["type"], "idempotency_error", "{seen}");
    assert_eq!(reuse["code"], "key-reused", "{seen}");
    assert!(
        reuse["doc_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("docs/errors.md#key-reused")),
        "{seen}"
    );
    assert_eq!(reuse["attempts"], 1, "{seen}");
    assert_eq!(upstream.executed("reuse"), 1);

    // A recorded 500: Stripe-Should-Retry: false stops the SDK at once.
    for scenario in ["fail", "fail_again"] {
        let fail = &seen[scenario];
        assert_eq!(fail["exception"], "APIError", "{scenario}: {seen}");
        assert_eq!(fail["http_status"], 500, "{scenario}: {seen}");
        assert_eq!(fail["should_retry"], "false", "{scenario}: {seen}");
        assert_eq!(fail["attempts"], 1, "{scenario}: {seen}");
    }
    assert_eq!(seen["fail_again"]["replayed"], "true", "{seen}");
    assert_eq!(upstream.executed("fail"), 1, "the upstream saw exactly one request");

    let _ = writeln!(
        std::io::stderr(),
        "stripe_sdk: stripe {} through idemproxy, scenarios in {took:?}",
        seen["sdk_version"]
    );
}
