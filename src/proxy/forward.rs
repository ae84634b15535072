//! Forwarding (RFC 9110 §7.6, docs/behaviour.md §9): the request as the upstream gets it, the
//! response as the client gets it, and [`exchange`], the one exchange with the upstream that
//! pass-through, fail-open and guarded executions all go through (its timeout, its metric).

use std::future::Future;
use std::pin::pin;

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::connection::ConnectionInfo;
use crate::body::ProxyBody;
use crate::config::Route;
use crate::error::ProxyError;
use crate::headers;
use crate::state::State;
use crate::upstream::UpstreamError;

/// Sends `request` upstream and reads its response with `read_body`, all within the route's
/// timeout; counts the time in `upstream_duration_seconds`. The response head comes back
/// rewritten for the client ([`prepare_client_response`]).
pub async fn exchange<B, F, R>(
    state: &State,
    connection: &ConnectionInfo,
    route: &Route,
    request: Request<ProxyBody>,
    read_body: F,
) -> Result<Response<B>, UpstreamError>
where
    F: FnOnce(Incoming) -> R,
    R: Future<Output = Result<B, UpstreamError>>,
{
    let started = Instant::now();
    let deadline = started + route.timeout;
    let work = pin!(async {
        let response = state.upstream.send(route, Some(&connection.affinity), request).await?;
        let (mut parts, body) = response.into_parts();
        prepare_client_response(&mut parts);
        Ok(Response::from_parts(parts, read_body(body).await?))
    });
    let result = match connection.within(deadline, work).await {
        Some(result) => result,
        None => Err(UpstreamError::Timeout(route.timeout)),
    };
    state.metrics.upstream_duration(route.index, started.elapsed());
    result
}

/// Forwards `request` and streams the response back: pass-through, and guarded requests
/// forwarded unprotected (`store_failure = "open"`). The timeout bounds the response head.
pub async fn pass_through(
    state: &State,
    connection: &ConnectionInfo,
    route: &Route,
    request: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    Ok(exchange(state, connection, route, request, streamed).await?)
}

/// The response body of a pass-through exchange: streamed to the client as it comes.
pub fn streamed(body: Incoming) -> std::future::Ready<Result<ProxyBody, UpstreamError>> {
    std::future::ready(Ok(ProxyBody::stream(body)))
}

/// Turns a client request into the request sent upstream (RFC 9110 §7.6): target rewritten to
/// the route's upstream with path and query kept byte-for-byte, hop-by-hop fields removed,
/// `X-Forwarded-*` and `Via` added, `Host` set to the upstream's unless the route preserves it.
pub fn upstream_request<B>(
    route: &Route,
    connection: &ConnectionInfo,
    mut request: Request<B>,
    body: impl FnOnce(B) -> ProxyBody,
) -> Result<Request<ProxyBody>, ProxyError> {
    rewrite_request(route, connection, &mut request)?;
    Ok(request.map(body))
}

/// [`upstream_request`]'s rewriting, in place: the request is not moved (pass-through builds
/// its upstream request this way, then only changes the body's type).
pub fn rewrite_request<B>(
    route: &Route,
    connection: &ConnectionInfo,
    request: &mut Request<B>,
) -> Result<(), ProxyError> {
    // RFC 9112 §3.2.2: with an absolute-form target, its authority is the request's host and a
    // `Host` field is ignored (HTTP/2's `:authority` likewise wins over `Host`, RFC 9113 §8.3.1).
    let target_host = request
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let uri = upstream_uri(route, std::mem::take(request.uri_mut()))?;
    *request.uri_mut() = uri;
    let version = request.version();
    let headers = request.headers_mut();
    let seen = headers::remove_hop_by_hop(headers);
    let client_host = set_host(route, headers, target_host);
    headers::set_forwarded(headers, seen, &connection.client_ip, &connection.proto, client_host);
    headers::append_via(headers, version);
    *request.version_mut() = Version::HTTP_11;
    Ok(())
}

/// Sets the `Host` the upstream gets: the upstream's own, or with `preserve_host` the client's
/// (the target's authority first). Returns the client's host, for `X-Forwarded-Host`: the
/// field's old value comes back from the one `insert` that replaces it.
fn set_host(route: &Route, headers: &mut HeaderMap, target_host: Option<HeaderValue>) -> Option<HeaderValue> {
    match target_host {
        Some(host) => {
            let upstream_host = if route.preserve_host {
                host.clone()
            } else {
                route.upstream.host_header.clone()
            };
            headers.insert(HOST, upstream_host);
            Some(host)
        }
        None if route.preserve_host => match headers.get(HOST) {
            Some(host) => Some(host.clone()),
            None => {
                headers.insert(HOST, route.upstream.host_header.clone());
                None
            }
        },
        None => headers.insert(HOST, route.upstream.host_header.clone()),
    }
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

/// Turns an upstream response head into the one sent to the client: hop-by-hop fields removed
/// and this proxy added to `Via` (RFC 9110 §7.6). RFC 9110 §6.2:
/// "Intermediaries ... MUST send their own HTTP-version in forwarded messages": the upstream's
/// version is recorded in `Via`, and the client gets this proxy's (an HTTP/1.0 upstream must not
/// turn the client's keep-alive HTTP/1.1 exchange into an HTTP/1.0 one).
pub fn prepare_client_response(parts: &mut http::response::Parts) {
    headers::remove_hop_by_hop(&mut parts.headers);
    headers::append_via(&mut parts.headers, parts.version);
    parts.version = Version::HTTP_11;
}
