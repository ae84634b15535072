//! The request path: route a request, pass it through or guard it, and answer every error in
//! one place ([`handle`]).
//!
//! - [`connection`]: what a handler knows of the client connection a request came on.
//! - [`forward`]: rewriting a request for the upstream and its response for the client, and the
//!   one exchange with the upstream that pass-through, fail-open and guarded executions share.
//! - [`guarded`]: a guarded request's life up to `begin` (docs/behaviour.md §4): body,
//!   fingerprint, replay, conflict, wait.
//! - [`body_key`]: a request whose key may be in its body (a `json:` key source, §13): the body
//!   read up to `buffer_bytes`, then guarded or passed through.
//! - [`execution`]: the owner's side of a key: the exchange under a renewed lease, and its
//!   outcome recorded before the client is answered (docs/behaviour.md §5).
//! - [`request_log`]: each request's log line and metric, written once, by the execution
//!   itself when its client went away (docs/behaviour.md §10.3).

pub mod body_key;
pub mod connection;
pub mod execution;
pub mod forward;
pub mod guarded;
pub mod request_log;
pub mod wait;

pub use self::connection::ConnectionInfo;
pub use self::request_log::RequestLog;

use std::convert::Infallible;
use std::sync::Arc;

use http::header::CONNECTION;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::config::Route;
use crate::error::{Chain, ErrorStyle, ProxyError};
use crate::idempotency::source::{self, BodyView, Lookup};
use crate::idempotency::StorageKey;
use crate::state::State;
use crate::telemetry::Outcome;

/// Handles one request; every error becomes its error response here ([`rescue`]).
///
/// A pass-through request (docs/behaviour.md §1) is rewritten in place and goes from here
/// straight to [`forward::exchange`], with no async layer between: every layer moves the request
/// and the response once more.
pub async fn handle(
    connection: Arc<ConnectionInfo>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let state = &connection.state;
    let _in_flight = state.metrics.in_flight();
    let mut log = RequestLog::new(request.method().clone());
    let answered = match route_request(state, &request, &mut log) {
        Ok(Routed::PassThrough(route)) => match forward::rewrite_request(route, &connection, &mut request) {
            Ok(()) => {
                let request = request.map(ProxyBody::stream);
                match forward::exchange(state, &connection, route, request, forward::streamed).await {
                    Ok(response) => Ok((response, Outcome::Passthrough)),
                    Err(err) => Err(err.into()),
                }
            }
            Err(err) => Err(err),
        },
        // Boxed: the guarded paths' state machines are large, and the pass-through one should
        // not carry (and move) them.
        Ok(Routed::Guarded(route, key)) => {
            let request = request.map(ProxyBody::stream);
            Box::pin(guarded::handle(state, &connection, route, request, key, &log)).await
        }
        Ok(Routed::KeyInBody(route, from)) => {
            Box::pin(body_key::handle(state, &connection, route, request, from, &mut log)).await
        }
        Err(err) => Err(err),
    };
    let (mut response, outcome) = match answered {
        Ok(answered) => answered,
        Err(err) => rescue(err, &log),
    };
    if log.method() == Method::CONNECT {
        // RFC 9110 §9.3.6: a client may send tunnel bytes right behind its CONNECT. It is refused,
        // so close the connection after the answer: those bytes are never read as requests.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    log.write(&state.metrics, response.status(), outcome, false);
    Ok(response)
}

/// Where [`route_request`] sends a request, on its route.
enum Routed<'a> {
    /// Forwarded as it is (rewritten for the upstream).
    PassThrough(&'a Arc<Route>),
    /// Guarded under this storage key.
    Guarded(&'a Arc<Route>, StorageKey),
    /// Its key may be in its body: key sources from this index on look there.
    KeyInBody(&'a Arc<Route>, usize),
}

/// The one place an error becomes a response: logged with its cause when the operator should
/// hear of it, counted as its outcome, and written in its route's style (problem+json before
/// a route is known; docs/behaviour.md §16).
fn rescue(err: ProxyError, log: &RequestLog) -> (Response<ProxyBody>, Outcome) {
    if err.is_operational() {
        tracing::warn!(
            error = %Chain(&err),
            source = err.source_of_error().as_str(),
            route = log.route_name(),
            key = log.key_hash.map(tracing::field::display),
            "request failed"
        );
    }
    let outcome = err.outcome();
    let style = log
        .route
        .as_ref()
        .map_or(ErrorStyle::PLAIN, |r| ErrorStyle::of(&r.policy));
    (err.into_response(style), outcome)
}

/// Checks the request target (docs/behaviour.md §9), finds the route, and decides whether the
/// request passes through or is guarded (§1).
fn route_request<'a>(
    state: &'a State,
    request: &Request<Incoming>,
    log: &mut RequestLog,
) -> Result<Routed<'a>, ProxyError> {
    check_target(request)?;
    let route = state
        .config
        .route_for(request.uri().path())
        .ok_or(ProxyError::NoRoute)?;
    log.route = Some(route.clone());
    let policy = &route.policy;
    if policy.guards(request.method()) {
        let lookup = source::find(
            &policy.key_sources,
            0,
            request.headers(),
            request.uri(),
            BodyView::NotRead,
        )?;
        match lookup {
            Lookup::Found { key, source } => {
                let storage_key = guarded::storage_key(state, route, request.headers(), source, key.as_bytes());
                log.key_hash = Some(storage_key.short_hash());
                return Ok(Routed::Guarded(route, storage_key));
            }
            Lookup::NeedsBody { from } => return Ok(Routed::KeyInBody(route, from)),
            Lookup::Missing if policy.require_key => return Err(ProxyError::MissingKey),
            Lookup::Missing => {}
        }
    }
    Ok(Routed::PassThrough(route))
}

/// Refuses targets a reverse proxy must not forward.
fn check_target<B>(request: &Request<B>) -> Result<(), ProxyError> {
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
    Ok(())
}
