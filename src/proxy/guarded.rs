//! A guarded request's life up to its key's verdict (docs/behaviour.md §3-§7): read the body,
//! fingerprint it, `begin` on the store, then replay, refuse, wait, or hand the owned key to
//! an [`execution`](super::execution).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::connection::ConnectionInfo;
use super::request_log::RequestLog;
use super::wait::Waiter;
use super::{execution, forward};
use crate::body::ProxyBody;
use crate::config::{FingerprintBody, KeySource, OnConflict, Policy, Route, StoreFailure};
use crate::error::{Chain, ProxyError};
use crate::headers::set_retry_hint;
use crate::idempotency::{replay, source, Fingerprint, StorageKey};
use crate::state::State;
use crate::store::lease::Claim;
use crate::store::{Begin, Lease, StoreError};
use crate::telemetry::{Outcome, StoreOp};

/// The storage key of `key`, found in `source`, for a request to `route` with `headers`: scoped
/// by the route, the value of its scope header and, unless it is the default one, the source
/// (docs/behaviour.md §3, §13).
pub fn storage_key(state: &State, route: &Route, headers: &HeaderMap, source: &KeySource, key: &[u8]) -> StorageKey {
    let scope = headers
        .get(&route.policy.scope_header)
        .map_or(&b""[..], |v| v.as_bytes());
    source::storage_key(source, &state.config.key_prefix, &route.name, scope, key)
}

/// Handles a guarded request (its method is guarded and it carries a valid key). Its body is
/// still to be read, or partly or wholly read already when its key came from it. `log` is its
/// request line, which an execution takes over if the client leaves.
pub async fn handle(
    state: &Arc<State>,
    connection: &Arc<ConnectionInfo>,
    route: &Arc<Route>,
    request: Request<ProxyBody>,
    key: StorageKey,
    log: &RequestLog,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    let policy = &route.policy;
    let (parts, body) = request.into_parts();
    let body = read_body(body, policy.max_body_bytes, state.config.server.body_read_timeout).await?;
    let claim = Claim {
        key: &key,
        fingerprint: fingerprint(policy, &parts, &body),
        key_ttl: policy.key_ttl,
        lock_ttl: policy.lock_ttl,
        unknown_outcome: policy.unknown_outcome,
    };
    let mut waiter = Waiter::new(policy.wait_timeout);
    loop {
        let begun = match state
            .metrics
            .timed(StoreOp::Begin, Lease::begin(&state.store, claim))
            .await
        {
            Ok(begun) => begun,
            Err(err) if policy.store_failure == StoreFailure::Open && forwards_on_failure(&err) => {
                tracing::warn!(reason = %Chain(&err), key = %key.short_hash(), "store unavailable: forwarding without idempotency protection");
                let request =
                    forward::upstream_request(route, connection, Request::from_parts(parts, body), ProxyBody::full)?;
                let response = forward::pass_through(state, connection, route, request).await?;
                return Ok((response, Outcome::FailOpen));
            }
            Err(err) => return Err(ProxyError::StoreUnavailable(err)),
        };
        match begun {
            Begin::Owner(lease) => {
                let request =
                    forward::upstream_request(route, connection, Request::from_parts(parts, body), ProxyBody::full)?;
                return execution::execute(state, connection, route, lease, request, log).await;
            }
            Begin::Replay(stored) => {
                // A recorded 5xx is what every retry gets: no use retrying (docs/behaviour.md §16).
                let server_error = stored.status.is_server_error();
                let mut response = replay::replay(stored, &policy.replay_header).ok_or(ProxyError::NotReplayable)?;
                if server_error {
                    set_retry_hint(response.headers_mut(), policy.retry_hint_header.as_ref(), false);
                }
                return Ok((response, Outcome::Replayed));
            }
            Begin::InFlight { retry_after } => {
                if policy.on_conflict == OnConflict::Wait && waiter.look_again(state, &key).await {
                    continue;
                }
                return Err(ProxyError::Conflict { retry_after });
            }
            Begin::Mismatch => return Err(ProxyError::Mismatch),
            Begin::Unknown(cause) => return Err(ProxyError::OutcomeUnknown(cause)),
        }
    }
}

/// Whether `store_failure = "open"` forwards through `err` (docs/behaviour.md §7): an
/// unreachable store, or a full embedded one (the operator chose availability). A corrupt
/// record is not a failure to reach the store: its key may have been executed, so it is never
/// forwarded unprotected.
fn forwards_on_failure(err: &StoreError) -> bool {
    matches!(err, StoreError::Unavailable(_) | StoreError::Full(_))
}

/// The request's fingerprint (docs/behaviour.md §3), over its body's bytes or, with
/// `fingerprint_body = "json"`, over its canonical JSON form (§13).
fn fingerprint(policy: &Policy, parts: &http::request::Parts, body: &[u8]) -> Fingerprint {
    let content_type = parts.headers.get(CONTENT_TYPE).map(|v| v.as_bytes());
    match policy.fingerprint_body {
        FingerprintBody::Bytes => Fingerprint::of(&parts.method, &parts.uri, content_type, body),
        FingerprintBody::Json => Fingerprint::of_json(
            &parts.method,
            &parts.uri,
            content_type,
            body,
            &policy.fingerprint_ignore,
        ),
    }
}

/// Reads a guarded request's body whole (the rest of it, when a part was read to find its key):
/// `413` past `limit` (early, on `Content-Length`), and a client that sends it too slowly is
/// cut off after `timeout`.
async fn read_body(body: ProxyBody, limit: u64, timeout: Duration) -> Result<Bytes, ProxyError> {
    let (prefix, rest) = match body {
        ProxyBody::Empty => return Ok(Bytes::new()),
        ProxyBody::Full(bytes) => {
            let bytes = bytes.unwrap_or_default();
            if bytes.len() as u64 > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            return Ok(bytes);
        }
        ProxyBody::Stream { prefix, rest } => (prefix.unwrap_or_default(), rest),
    };
    let room = limit.checked_sub(prefix.len() as u64);
    let room = match room {
        Some(room) if rest.size_hint().lower() <= room => room,
        _ => return Err(ProxyError::BodyTooLarge { limit }),
    };
    let limited = Limited::new(rest, usize::try_from(room).unwrap_or(usize::MAX));
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) if prefix.is_empty() => Ok(collected.to_bytes()),
        Ok(Ok(collected)) => Ok([prefix, collected.to_bytes()].concat().into()),
        Ok(Err(err)) if err.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Ok(Err(err)) => Err(ProxyError::ClientBody(err)),
        Err(_) => Err(ProxyError::ClientBodyTimeout(timeout)),
    }
}
