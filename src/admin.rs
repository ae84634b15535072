//! The admin listener (docs/behaviour.md §10): `/healthz` (process up), `/readyz` (store reachable and
//! upstreams accepting connections; also checked every [`READY_REFRESH_INTERVAL`] for the
//! `idemproxy_ready` gauge), `/metrics` (OpenMetrics or classic Prometheus text, as the `Accept`
//! header asks), and the key endpoints
//! `GET /keys/{key}` (look a key's record up) and `DELETE /keys/{key}` (clear it: the way out
//! of `Unknown` once the operator has reconciled with the upstream).
//!
//! `{key}` is the key as the client sent it, URL-encoded: the `Idempotency-Key` value, or for a
//! route's other key sources (docs/behaviour.md §13) their value as sent (`?source=` names the
//! source, e.g. `json:/client_order_id`; default the route's first). `?scope=` is the scope
//! header's value (e.g. the client's `Authorization`), `?route=` the route's name when there are
//! several. They are hashed exactly as on the request path. With `admin_token` set,
//! the key endpoints need `Authorization: Bearer <token>`. Their errors are RFC 9457 problems,
//! built by [`problem_response`] like the proxy's own (always problem+json: the admin listener
//! has no route, so no route's `error_format`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, VARY};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::config::{KeySource, Route};
use crate::error::{
    insert_retry_after, problem_response, problem_type, Chain, ErrorStyle, Problem, ProblemType, STORE_RETRY_AFTER,
};
use crate::idempotency::{source, unix_ms, KeyError, Record, ShortHash, StorageKey};
use crate::state::State;
use crate::store::{KeyState, Store, StoreError};
use crate::telemetry::Exposition;

/// Longest wait for an upstream connection in `/readyz`.
const READY_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often readiness is checked for the `idemproxy_ready` gauge when nothing asks `/readyz`.
pub const READY_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Serves the admin endpoints on `listener` until `stop` changes, and keeps the readiness gauge
/// fresh meanwhile.
pub async fn serve(state: Arc<State>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    tokio::spawn(refresh_readiness(state.clone(), stop.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |request| handle(state.clone(), request));
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let path = request.uri().path();
    let response = match (request.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(&state).await,
        (&Method::GET, "/metrics") => metrics(&state, &request),
        (method, _) if path.starts_with("/keys/") => {
            let answered = if !authorized(&state, &request) {
                Err(AdminError::Unauthorized)
            } else if matches!(*method, Method::GET | Method::DELETE) {
                key_endpoint(&state, &request).await
            } else {
                Err(AdminError::MethodNotAllowed)
            };
            answered.unwrap_or_else(|err| problem_response(&err, ErrorStyle::PLAIN))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

/// The metrics in the format the `Accept` header asks for (docs/behaviour.md §10.5).
fn metrics(state: &State, request: &Request<Incoming>) -> Response<ProxyBody> {
    let format = Exposition::negotiate(request.headers().get(ACCEPT).map(HeaderValue::as_bytes));
    let mut response = text(StatusCode::OK, state.metrics.render(format));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(VARY, HeaderValue::from_static("accept"));
    response
}

/// Checks readiness every [`READY_REFRESH_INTERVAL`] until `stop` changes.
async fn refresh_readiness(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(READY_REFRESH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let _ = check_ready(&state).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// `/readyz`: the readiness check, as text. Ready when the store answers (Redis with
/// `store.min_replicas`: a master with that many replicas attached, docs/behaviour.md §4.4;
/// the disk store: its data directory writable, §11) and every upstream accepts a TCP
/// connection.
async fn readiness(state: &State) -> Response<ProxyBody> {
    match check_ready(state).await {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

/// Ready when the store answers and every upstream accepts a TCP connection; the result also
/// sets the `idemproxy_ready` gauge.
async fn check_ready(state: &State) -> Result<(), String> {
    let result = store_and_upstreams_answer(state).await;
    state.metrics.set_ready(result.is_ok());
    result
}

async fn store_and_upstreams_answer(state: &State) -> Result<(), String> {
    if let Err(err) = state.store.ping().await {
        return Err(format!("store: {}", Chain(&err)));
    }
    let mut checked: Vec<&str> = Vec::new();
    for route in state.config.routes.iter() {
        let target = &route.upstream;
        if checked.contains(&target.authority.as_str()) {
            continue;
        }
        checked.push(target.authority.as_str());
        let port = target
            .authority
            .port_u16()
            .unwrap_or(if target.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            });
        let connect = tokio::net::TcpStream::connect((target.authority.host(), port));
        match tokio::time::timeout(READY_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(format!("upstream {}: {err}", target.authority)),
            Err(_) => {
                return Err(format!(
                    "upstream {}: no connection within {READY_CONNECT_TIMEOUT:?}",
                    target.authority
                ))
            }
        }
    }
    Ok(())
}

fn authorized(state: &State, request: &Request<Incoming>) -> bool {
    let Some(token) = state.config.admin_token.as_deref() else {
        return true;
    };
    let Some(given) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The parsed `/keys/{key}?scope=&route=&source=&body=` request.
struct KeyQuery {
    route: Arc<Route>,
    /// The label of the key source the key is from.
    source: String,
    key: StorageKey,
    with_body: bool,
}

/// The query parameters of a key endpoint request.
#[derive(Default)]
struct KeyParameters {
    scope: String,
    route: Option<String>,
    source: Option<String>,
    with_body: bool,
}

fn parse_key_query(state: &State, request: &Request<Incoming>) -> Result<KeyQuery, AdminError> {
    let raw = request.uri().path().trim_start_matches("/keys/");
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let mut parameters = KeyParameters::default();
    for (name, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
        match &*name {
            "scope" => parameters.scope = value.into_owned(),
            "route" => parameters.route = Some(value.into_owned()),
            "source" => parameters.source = Some(value.into_owned()),
            "body" => parameters.with_body = value == "true" || value == "1",
            other => return Err(AdminError::UnknownParameter(other.to_owned())),
        }
    }
    let routes = &state.config.routes;
    let route = match parameters.route {
        Some(name) => routes
            .iter()
            .find(|r| *r.name == name)
            .ok_or(AdminError::NoSuchRoute(name))?,
        None if routes.len() == 1 => &routes[0],
        None => return Err(AdminError::RouteNeeded),
    };
    let sources = &route.policy.key_sources;
    let key_source = match parameters.source {
        Some(label) => sources
            .iter()
            .find(|s| s.label() == label || KeySource::parse(&label).is_ok_and(|parsed| parsed == **s))
            .ok_or_else(|| AdminError::NoSuchSource {
                source_label: label,
                route: route.name.to_string(),
            })?,
        // A policy always has a source; the first is the default.
        None => sources.first().ok_or_else(|| AdminError::NoSuchSource {
            source_label: String::new(),
            route: route.name.to_string(),
        })?,
    };
    let key = source::parse_as(key_source, &decoded)?;
    Ok(KeyQuery {
        key: source::storage_key(
            key_source,
            &state.config.key_prefix,
            &route.name,
            parameters.scope.as_bytes(),
            key.as_bytes(),
        ),
        route: route.clone(),
        source: key_source.label().to_owned(),
        with_body: parameters.with_body,
    })
}

async fn key_endpoint(state: &State, request: &Request<Incoming>) -> Result<Response<ProxyBody>, AdminError> {
    let query = parse_key_query(state, request)?;
    let key_hash = query.key.short_hash();
    if request.method() == Method::DELETE {
        return match state.store.clear(&query.key).await {
            Ok(true) => {
                tracing::warn!(key = %key_hash, route = &*query.route.name, "key cleared by an operator");
                Ok(json_response(
                    StatusCode::OK,
                    &json!({ "key_hash": key_hash.to_string(), "cleared": true }),
                ))
            }
            Ok(false) => Err(AdminError::NoSuchKey(key_hash)),
            Err(err) => Err(AdminError::store(err)),
        };
    }
    let state_of_key = match state.store.lookup(&query.key).await {
        Ok(Some(state_of_key)) => state_of_key,
        Ok(None) => return Err(AdminError::NoSuchKey(key_hash)),
        Err(err) => return Err(AdminError::store(err)),
    };
    Ok(json_response(
        StatusCode::OK,
        &describe_key(&query, key_hash, state_of_key),
    ))
}

/// The key lookup's answer: the key source, the record's state, ages and lease, and for a
/// completed key its status and (with `?body=true`) its body.
fn describe_key(query: &KeyQuery, key_hash: ShortHash, state_of_key: KeyState) -> serde_json::Value {
    let existing = state_of_key.existing;
    let since = match &existing.record {
        Record::InFlight { started_at_ms, .. } => *started_at_ms,
        Record::Completed { response, .. } => response.completed_at_ms,
        Record::Unknown { since_ms, .. } => *since_ms,
    };
    let mut answer = json!({
        "key_hash": key_hash.to_string(),
        "route": &*query.route.name,
        "source": &query.source,
        "state": existing.record.state_name(),
        "age_ms": unix_ms().saturating_sub(since),
        "lease_left_ms": existing.lease_left.map(|d| d.as_millis() as u64),
        "expires_in_ms": state_of_key.expires_in.map(|d| d.as_millis() as u64),
    });
    match &existing.record {
        Record::Completed { response, .. } => {
            answer["status"] = json!(response.status.as_u16());
            answer["replayable"] = json!(response.body.is_some());
            answer["body_bytes"] = json!(response.body.as_ref().map(Bytes::len));
            if let Some(body) = response.body.as_ref().filter(|_| query.with_body) {
                let (text, encoding) = match std::str::from_utf8(body) {
                    Ok(text) => (json!(text), "utf-8"),
                    Err(_) => (json!(hex::encode(body)), "hex"),
                };
                answer["body"] = text;
                answer["body_encoding"] = json!(encoding);
            }
        }
        Record::Unknown { cause, .. } => answer["cause"] = json!(format!("{cause:?}")),
        Record::InFlight { .. } => {}
    }
    answer
}

/// Why a key endpoint request failed (each a problem documented in `docs/errors.md`).
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("a bearer token is required")]
    Unauthorized,
    #[error("use GET or DELETE")]
    MethodNotAllowed,
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    #[error("unknown parameter `{0}`")]
    UnknownParameter(String),
    #[error("no route named `{0}`")]
    NoSuchRoute(String),
    #[error("several routes are configured: name one with ?route=")]
    RouteNeeded,
    #[error("route `{route}` has no key source `{source_label}`")]
    NoSuchSource { source_label: String, route: String },
    #[error("no such key")]
    NoSuchKey(ShortHash),
    #[error("the idempotency store is unavailable")]
    Store(#[source] StoreError),
}

impl AdminError {
    /// A store failure: logged with its cause, answered without it.
    fn store(err: StoreError) -> Self {
        tracing::warn!(error = %Chain(&err), "admin key endpoint: store unavailable");
        AdminError::Store(err)
    }
}

impl Problem for AdminError {
    fn problem_type(&self) -> ProblemType {
        match self {
            AdminError::Unauthorized => problem_type!(StatusCode::UNAUTHORIZED, "admin-unauthorized", "Unauthorized"),
            AdminError::MethodNotAllowed => {
                problem_type!(StatusCode::METHOD_NOT_ALLOWED, "admin-method", "Method not allowed")
            }
            AdminError::InvalidKey(_) => {
                problem_type!(StatusCode::BAD_REQUEST, "invalid-key", "Invalid Idempotency-Key")
            }
            AdminError::UnknownParameter(_) | AdminError::RouteNeeded | AdminError::NoSuchSource { .. } => {
                problem_type!(StatusCode::BAD_REQUEST, "bad-request", "Bad request")
            }
            AdminError::NoSuchRoute(_) => problem_type!(StatusCode::NOT_FOUND, "no-route", "No route"),
            AdminError::NoSuchKey(_) => problem_type!(StatusCode::NOT_FOUND, "admin-no-such-key", "No such key"),
            AdminError::Store(_) => problem_type!(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable"
            ),
        }
    }

    fn extension(&self) -> Option<(&'static str, serde_json::Value)> {
        match self {
            AdminError::NoSuchKey(hash) => Some(("key_hash", json!(hash.to_string()))),
            _ => None,
        }
    }

    fn add_headers(&self, headers: &mut http::HeaderMap) {
        match self {
            AdminError::Unauthorized => {
                headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AdminError::Store(_) => insert_retry_after(headers, STORE_RETRY_AFTER),
            _ => {}
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
