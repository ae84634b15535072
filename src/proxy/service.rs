//! The per-request service: route, classify (guarded or pass-through), forward, log.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{CONNECTION, HOST};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

use super::{guarded, headers, ConnectionInfo, State};
use crate::body::ProxyBody;
use crate::config::Route;
use crate::error::ProxyError;
use crate::idempotency::{key, ShortHash, StorageKey, IDEMPOTENCY_KEY};
use crate::telemetry::Outcome;

/// What the access log line says about one request, filled in as it is handled.
#[derive(Default)]
pub struct RequestLog {
    pub route: Option<Arc<Route>>,
    pub key_hash: Option<ShortHash>,
}

/// Handles one request; every error becomes its problem response here.
pub async fn handle(
    state: Arc<State>,
    connection: Arc<ConnectionInfo>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let _in_flight = state.metrics.in_flight();
    let method = request.method().clone();
    let mut log = RequestLog::default();
    let (mut response, outcome) = match route_request(&state, &connection, request, &mut log).await {
        Ok((response, outcome)) => (response, outcome),
        Err(err) => {
            let outcome = err.outcome();
            if matches!(
                outcome,
                Outcome::StoreUnavailable | Outcome::UpstreamError | Outcome::OutcomeUnknown
            ) {
                tracing::warn!(
                    error = %err,
                    route = log.route.as_ref().map_or("-", |r| &*r.name),
                    key = log.key_hash.map(tracing::field::display),
                    "request failed"
                );
            }
            (err.into_response(), outcome)
        }
    };
    if method == Method::CONNECT {
        // RFC 9110 §9.3.6: a client may send tunnel bytes right behind its CONNECT. It is refused,
        // so close the connection after the answer: those bytes are never read as requests.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    state
        .metrics
        .request(log.route.as_ref().map(|r| r.index), &method, outcome);
    tracing::info!(
        route = log.route.as_ref().map_or("-", |r| &*r.name),
        method = method.as_str(),
        status = response.status().as_u16(),
        outcome = outcome.as_str(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        key = log.key_hash.map(tracing::field::display),
        "request"
    );
    Ok(response)
}

async fn route_request(
    state: &Arc<State>,
    connection: &Arc<ConnectionInfo>,
    request: Request<Incoming>,
    log: &mut RequestLog,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    if request.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported by a reverse proxy"));
    }
    // Origin-form targets only (absolute-form is reduced to its path; `*` is refused).
    if !request.uri().path().starts_with('/') {
        return Err(ProxyError::BadRequest("the request target must be an absolute path"));
    }
    // RFC 9112 §3.2 / RFC 3986 §2: a request target is ASCII. hyper refuses invalid UTF-8 but lets
    // raw UTF-8 through; other bytes must be percent-encoded.
    if !request
        .uri()
        .path_and_query()
        .map_or("", PathAndQuery::as_str)
        .is_ascii()
    {
        return Err(ProxyError::BadRequest(
            "the request target must be ASCII (percent-encode other bytes)",
        ));
    }
    // RFC 9110 §4.2.4: userinfo in an http(s) URI "SHOULD" be treated as an error (it is used to
    // obscure the authority); it would otherwise end up in `X-Forwarded-Host`.
    if request.uri().authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ProxyError::BadRequest("the request target must not contain userinfo"));
    }
    let route = state
        .config
        .route_for(request.uri().path())
        .ok_or(ProxyError::NoRoute)?;
    log.route = Some(route.clone());
    let policy = &route.policy;
    if policy.guards(request.method()) {
        match key::from_fields(request.headers().get_all(IDEMPOTENCY_KEY))? {
            Some(key) => {
                let scope = request
                    .headers()
                    .get(&policy.scope_header)
                    .map_or(&b""[..], |v| v.as_bytes());
                let storage_key = StorageKey::new(&state.config.key_prefix, &route.name, scope, key.as_bytes());
                log.key_hash = Some(storage_key.short_hash());
                // Boxed: the guarded path's state machine is large, and the pass-through one should not
                // carry (and move) it.
                return Box::pin(guarded::handle(state, connection, route, request, storage_key)).await;
            }
            None if policy.require_key => return Err(ProxyError::MissingKey),
            None => {}
        }
    }
    let request = upstream_request(route, connection, request, ProxyBody::stream)?;
    let sent = Instant::now();
    let response = state
        .upstream
        .send(route, Some(&connection.affinity), request, route.timeout)
        .await;
    state.metrics.upstream_duration(route.index, sent.elapsed());
    Ok((client_response(response?, ProxyBody::stream), Outcome::Passthrough))
}

/// Turns a client request into the request sent upstream (RFC 9110 §7.6): target rewritten to
/// the route's upstream with path and query kept byte-for-byte, hop-by-hop fields removed,
/// `X-Forwarded-*` and `Via` added, `Host` set to the upstream's unless the route preserves it.
pub fn upstream_request<B>(
    route: &Route,
    connection: &ConnectionInfo,
    request: Request<B>,
    body: impl FnOnce(B) -> ProxyBody,
) -> Result<Request<ProxyBody>, ProxyError> {
    let (mut parts, incoming) = request.into_parts();
    // RFC 9112 §3.2.2: with an absolute-form target, its authority is the request's host and a
    // `Host` field is ignored (HTTP/2's `:authority` likewise wins over `Host`, RFC 9113 §8.3.1).
    let client_host = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(HOST).cloned());
    parts.uri = upstream_uri(route, std::mem::take(&mut parts.uri))?;
    headers::remove_hop_by_hop(&mut parts.headers);
    headers::set_forwarded(
        &mut parts.headers,
        &connection.client_ip,
        &connection.proto,
        client_host.clone(),
    );
    headers::append_via(&mut parts.headers, parts.version);
    let host = match client_host {
        Some(host) if route.preserve_host => host,
        _ => route.upstream.host_header.clone(),
    };
    parts.headers.insert(HOST, host);
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body(incoming)))
}

/// The origin-form target sent upstream (RFC 9112 §3.2.1): the client's path and query, byte
/// for byte, under the upstream's base path. Reuses the client's target when it already is one.
fn upstream_uri(route: &Route, uri: Uri) -> Result<Uri, ProxyError> {
    let base_path = &route.upstream.base_path;
    if base_path.is_empty() && uri.scheme().is_none() && uri.authority().is_none() {
        return Ok(uri);
    }
    let path_and_query = match (base_path.is_empty(), uri.path_and_query()) {
        (true, Some(pq)) => pq.clone(),
        (true, None) => PathAndQuery::from_static("/"),
        (false, pq) => {
            let pq = pq.map_or("/", PathAndQuery::as_str);
            let mut joined = String::with_capacity(base_path.len() + pq.len());
            joined.push_str(base_path);
            joined.push_str(pq);
            PathAndQuery::try_from(joined)
                .map_err(|_| ProxyError::BadRequest("the request target is not a valid path"))?
        }
    };
    Ok(Uri::from(path_and_query))
}

/// Turns an upstream response into the one sent to the client: hop-by-hop fields removed and
/// this proxy added to `Via`.
pub fn client_response<B>(response: Response<B>, body: impl FnOnce(B) -> ProxyBody) -> Response<ProxyBody> {
    let (mut parts, upstream_body) = response.into_parts();
    prepare_client_response(&mut parts);
    Response::from_parts(parts, body(upstream_body))
}

/// The header work of [`client_response`], for callers that keep the body. RFC 9110 §6.2:
/// "Intermediaries ... MUST send their own HTTP-version in forwarded messages": the upstream's
/// version is recorded in `Via`, and the client gets this proxy's (an HTTP/1.0 upstream must not
/// turn the client's keep-alive HTTP/1.1 exchange into an HTTP/1.0 one).
pub fn prepare_client_response(parts: &mut http::response::Parts) {
    headers::remove_hop_by_hop(&mut parts.headers);
    headers::append_via(&mut parts.headers, parts.version);
    parts.version = Version::HTTP_11;
}
