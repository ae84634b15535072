//! A guarded-method request on a route with a `json:` key source that no earlier source gave a
//! key (docs/behaviour.md §13): its body is read, up to `buffer_bytes`, to look for the key in
//! it; then the request is guarded, or forwarded from that buffer (the one exception to
//! "keyless requests stream", §1). A larger body is not looked into: what was read of it and
//! the rest stream on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::connection::ConnectionInfo;
use super::request_log::RequestLog;
use super::{forward, guarded};
use crate::body::{concat, ProxyBody};
use crate::config::Route;
use crate::error::ProxyError;
use crate::idempotency::source::{self, BodyView, Lookup};
use crate::state::State;
use crate::telemetry::Outcome;

/// Reads the body of `request` up to the route's `buffer_bytes`, looks for its key from
/// source number `from` on, and guards the request or passes it through.
pub async fn handle(
    state: &Arc<State>,
    connection: &Arc<ConnectionInfo>,
    route: &Arc<Route>,
    request: Request<Incoming>,
    from: usize,
    log: &mut RequestLog,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    let policy = &route.policy;
    let (parts, body) = request.into_parts();
    let body = read_up_to(body, policy.buffer_bytes, state.config.server.body_read_timeout).await?;
    let view = match &body {
        ProxyBody::Empty => BodyView::Read(&[]),
        ProxyBody::Full(bytes) => BodyView::Read(bytes.as_deref().unwrap_or_default()),
        ProxyBody::Stream { .. } | ProxyBody::Upload(_) => BodyView::TooLarge,
    };
    let key = match source::find(&policy.key_sources, from, &parts.headers, &parts.uri, view)? {
        Lookup::Found { key, source } => Some(guarded::storage_key(
            state,
            route,
            &parts.headers,
            source,
            key.as_bytes(),
        )),
        // With the body in view no source asks for it again.
        Lookup::Missing | Lookup::NeedsBody { .. } => None,
    };
    let request = Request::from_parts(parts, body);
    match key {
        Some(key) => {
            log.key_hash = Some(key.short_hash());
            guarded::handle(state, connection, route, request, key, log).await
        }
        None if policy.require_key => Err(ProxyError::MissingKey),
        None => {
            let request = forward::upstream_request(route, connection, request, |body| body)?;
            let response = forward::pass_through(state, connection, route, request).await?;
            Ok((response, Outcome::Passthrough))
        }
    }
}

/// Reads `body` whole if it is at most `limit` bytes (`ProxyBody::Full` or `Empty`); otherwise
/// what was read and the rest (`ProxyBody::Stream`), without reading more. A body whose
/// `Content-Length` is over the limit is not read at all. The client has `timeout` to send it.
async fn read_up_to(mut body: Incoming, limit: u64, timeout: Duration) -> Result<ProxyBody, ProxyError> {
    if body.size_hint().lower() > limit {
        return Ok(ProxyBody::stream(body));
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    let read = async {
        while let Some(frame) = body.frame().await {
            // Trailers are dropped, as for every buffered body.
            let Ok(data) = frame?.into_data() else { continue };
            total += data.len() as u64;
            chunks.push(data);
            if total > limit {
                return Ok(false);
            }
        }
        Ok::<bool, hyper::Error>(true)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(true)) => Ok(ProxyBody::full(concat(chunks))),
        Ok(Ok(false)) => Ok(ProxyBody::Stream {
            prefix: Some(concat(chunks)),
            rest: body,
        }),
        Ok(Err(err)) => Err(ProxyError::ClientBody(err.into())),
        Err(_) => Err(ProxyError::ClientBodyTimeout(timeout)),
    }
}
