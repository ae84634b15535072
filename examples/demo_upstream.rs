//! A tiny demo upstream to try idemproxy with (README, "Try it"): an "orders" API without any
//! idempotency of its own. Every `POST /orders` it receives creates a new order, so a retry that
//! reached it would create a second one; each order it creates is printed on stdout, which shows
//! which requests the proxy let through.
//!
//! - `POST /orders` with a JSON body (or none): `201 Created`, `Location: /orders/ord_N` and
//!   `{"id":"ord_N","status":"created","request":<the body as sent>}`, a new `ord_N` for every
//!   request it executes; a body that is not JSON gets `400`.
//! - `GET /orders`: every order so far; `GET /orders/{id}`: one order, or `404`.
//! - `GET /`: what this server is and what it serves.
//! - anything else: `404`.
//!
//! Run: `cargo run --release --example demo_upstream` (listens on `127.0.0.1:3000`), or
//! `cargo run --release --example demo_upstream -- --listen 127.0.0.1:3001` (the address may
//! also be given as the only argument). Orders live in memory and are gone when it stops.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// Largest request body read; a larger one gets `413`.
const MAX_BODY: usize = 1024 * 1024;

/// The orders created so far, by number, each as the JSON text it is answered with.
#[derive(Default)]
struct Orders {
    created: Mutex<BTreeMap<u64, String>>,
}

impl Orders {
    /// Creates the next order for `request` (the POSTed JSON text, already checked) and returns
    /// its id and its JSON text, fields in a fixed order and the request as it was sent.
    fn create(&self, request: &str) -> (String, String) {
        let mut created = self.created.lock().unwrap_or_else(PoisonError::into_inner);
        let number = created.keys().next_back().map_or(1, |last| last + 1);
        let id = format!("ord_{number}");
        let order = format!(r#"{{"id":"{id}","status":"created","request":{request}}}"#);
        created.insert(number, order.clone());
        (id, order)
    }

    fn get(&self, id: &str) -> Option<String> {
        let number: u64 = id.strip_prefix("ord_")?.parse().ok()?;
        let created = self.created.lock().unwrap_or_else(PoisonError::into_inner);
        created.get(&number).cloned()
    }

    /// Every order, as one JSON array text.
    fn all(&self) -> String {
        let created = self.created.lock().unwrap_or_else(PoisonError::into_inner);
        let orders: Vec<&str> = created.values().map(String::as_str).collect();
        format!("[{}]", orders.join(","))
    }

    fn count(&self) -> usize {
        self.created.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    json_text(status, serde_json::to_string(value).unwrap_or_default())
}

/// A JSON answer from its text, newline-terminated (so it reads well in a terminal).
fn json_text(status: StatusCode, mut text: String) -> Response<Full<Bytes>> {
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn not_found() -> Response<Full<Bytes>> {
    json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" }))
}

async fn answer(orders: Arc<Orders>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let key = request
        .headers()
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // Read the whole body (also for GETs: an unread body stops hyper from reusing the connection).
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return Ok(json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({ "error": format!("the body is larger than {MAX_BODY} bytes") }),
            ))
        }
        Err(err) => {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("the body could not be read: {err}") }),
            ))
        }
    };
    let response = match (&method, path.as_str()) {
        (&Method::POST, "/orders") => {
            // The request is echoed in the order as it was sent; it must be JSON (or nothing).
            let request = if body.is_empty() {
                "null".to_owned()
            } else {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(_) => String::from_utf8_lossy(&body).trim().to_owned(),
                    Err(err) => {
                        return Ok(json_response(
                            StatusCode::BAD_REQUEST,
                            &json!({ "error": format!("the body is not JSON: {err}") }),
                        ))
                    }
                }
            };
            let (id, order) = orders.create(&request);
            println!(
                "demo_upstream: executed POST /orders -> {id} (Idempotency-Key: {}) {request}",
                key.as_deref().unwrap_or("none"),
            );
            let mut response = json_text(StatusCode::CREATED, order);
            if let Ok(location) = HeaderValue::from_str(&format!("/orders/{id}")) {
                response.headers_mut().insert(LOCATION, location);
            }
            response
        }
        (&Method::GET, "/orders") => json_text(StatusCode::OK, format!(r#"{{"orders":{}}}"#, orders.all())),
        (&Method::GET, path) if path.starts_with("/orders/") => {
            match path.strip_prefix("/orders/").and_then(|id| orders.get(id)) {
                Some(order) => json_text(StatusCode::OK, order),
                None => not_found(),
            }
        }
        (&Method::GET, "/") => json_response(
            StatusCode::OK,
            &json!({
                "service": "demo_upstream: an orders API without idempotency, to try idemproxy with",
                "endpoints": ["POST /orders", "GET /orders", "GET /orders/{id}"],
                "orders": orders.count(),
            }),
        ),
        _ => not_found(),
    };
    Ok(response)
}

/// The listen address: `--listen ADDR`, `--listen=ADDR` or a lone `ADDR`; `127.0.0.1:3000` by default.
fn listen_address() -> Result<SocketAddr, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = match args.as_slice() {
        [] => DEFAULT_LISTEN.to_owned(),
        [flag, addr] if flag == "--listen" => addr.clone(),
        [one] if one.starts_with("--listen=") => one.trim_start_matches("--listen=").to_owned(),
        [one] if !one.starts_with('-') => one.clone(),
        _ => return Err("usage: demo_upstream [--listen ADDR | ADDR]   (default 127.0.0.1:3000)".to_owned()),
    };
    text.parse()
        .map_err(|err| format!("`{text}` is not an address like 127.0.0.1:3000: {err}"))
}

fn main() {
    let addr = match listen_address() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("demo_upstream: {err}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("demo_upstream: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("demo_upstream: cannot listen on {addr}: {err}");
                std::process::exit(1);
            }
        };
        println!("demo_upstream: listening on http://{addr} (POST /orders, GET /orders/{{id}})");
        let orders = Arc::new(Orders::default());
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    eprintln!("demo_upstream: accept: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let orders = orders.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(orders.clone(), request));
                if let Err(err) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("demo_upstream: connection: {err}");
                }
            });
        }
    });
}
