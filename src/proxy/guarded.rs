//! A guarded request's life up to its key's verdict (docs/behaviour.md §3-§7, §15): read the
//! body (or, when it is larger than `buffer_bytes`, its start), fingerprint it, `begin` on the
//! store, then replay, refuse, wait, verify a retry's body, or hand the owned key to an
//! [`execution`](super::execution).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use super::connection::ConnectionInfo;
use super::execution::{self, Streamed};
use super::forward;
use super::request_log::RequestLog;
use super::wait::Waiter;
use crate::body::{concat, ProxyBody};
use crate::config::{FingerprintBody, KeySource, OnConflict, Policy, Route, StoreFailure};
use crate::error::{Chain, ProxyError};
use crate::headers::set_retry_hint;
use crate::idempotency::content_digest;
use crate::idempotency::{
    decide, replay, source, Decision, Existing, Fingerprint, HeadHash, Print, Record, Scheme, StorageKey,
    StoredResponse,
};
use crate::state::State;
use crate::store::lease::Claim;
use crate::store::{Begin, Lease, StoreError};
use crate::telemetry::{Outcome, StoreOp};
use crate::upload::{Upload, UploadEnd};

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
    let body = take_body(body, policy, &parts.headers, state.config.server.body_read_timeout).await?;
    let print = match &body {
        GuardedBody::Whole(bytes) => Print::Whole(fingerprint(policy, &parts, bytes)),
        GuardedBody::Streamed { declared, .. } => Print::Streamed {
            head: head_hash(&parts),
            body: *declared,
        },
    };
    let claim = Claim {
        key: &key,
        print,
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
                let body = body.into_upstream(policy.max_body_bytes).0;
                let request = forward::upstream_request(route, connection, Request::from_parts(parts, body), |b| b)?;
                let response = forward::pass_through(state, connection, route, request).await?;
                return Ok((response, Outcome::FailOpen));
            }
            Err(err) => return Err(ProxyError::StoreUnavailable(err)),
        };
        match begun {
            Begin::Owner(lease) => {
                let (body, upload) = body.into_upstream(policy.max_body_bytes);
                let upload = match (upload, print) {
                    (Some(end), Print::Streamed { head, .. }) => Some(Streamed { head, end }),
                    _ => None,
                };
                let request = forward::upstream_request(route, connection, Request::from_parts(parts, body), |b| b)?;
                return execution::execute(state, connection, route, lease, request, log, upload).await;
            }
            Begin::Replay(stored) => return replayed(stored, policy),
            Begin::InFlight { retry_after } => {
                if policy.on_conflict == OnConflict::Wait && waiter.look_again(state, &key).await {
                    continue;
                }
                return Err(ProxyError::Conflict { retry_after });
            }
            Begin::Mismatch => return Err(ProxyError::Mismatch),
            Begin::Unknown(cause) => return Err(ProxyError::OutcomeUnknown(cause)),
            Begin::Verify(record) => {
                let timeout = state.config.server.body_read_timeout;
                return verify(policy, &parts, body, record, timeout).await;
            }
        }
    }
}

/// The replay of `stored` (docs/behaviour.md §6).
fn replayed(stored: StoredResponse, policy: &Policy) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    // A recorded 5xx is what every retry gets: no use retrying (docs/behaviour.md §16).
    let server_error = stored.status.is_server_error();
    let mut response = replay::replay(stored, &policy.replay_header).ok_or(ProxyError::NotReplayable)?;
    if server_error {
        set_retry_hint(response.headers_mut(), policy.retry_hint_header.as_ref(), false);
    }
    Ok((response, Outcome::Replayed))
}

/// A retry that could not be compared with its key's finished `record` before its body was
/// known (docs/behaviour.md §15.2): hashes its body in the record's scheme, never forwarding it
/// nor holding it whole, then decides between the record's answer and `422`.
async fn verify(
    policy: &Policy,
    parts: &http::request::Parts,
    body: GuardedBody,
    record: Record,
    timeout: Duration,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    let limit = policy.max_body_bytes;
    let print = match (record.fingerprint().scheme, body) {
        (Scheme::Bytes, GuardedBody::Whole(bytes)) => Print::Whole(fingerprint(policy, parts, &bytes)),
        (Scheme::Bytes, GuardedBody::Streamed { read, rest, .. }) => {
            Print::Whole(bytes_scheme(parts, read, rest, limit, timeout).await?)
        }
        (_, GuardedBody::Whole(bytes)) => Print::Streamed {
            head: head_hash(parts),
            body: Some(Sha256::digest(&bytes).into()),
        },
        (_, GuardedBody::Streamed { read, rest, .. }) => {
            let mut hasher = Sha256::new();
            drain(read, rest, limit, timeout, |chunk| hasher.update(chunk)).await?;
            Print::Streamed {
                head: head_hash(parts),
                body: Some(hasher.finalize().into()),
            }
        }
    };
    let existing = Existing {
        record,
        lease_left: None,
    };
    match decide(Some(existing), &print, policy.unknown_outcome) {
        Decision::Replay(stored) => replayed(stored, policy),
        Decision::Unknown(cause) => Err(ProxyError::OutcomeUnknown(cause)),
        // A print complete in the record's scheme is never undecided (`decide`'s proptests).
        _ => Err(ProxyError::Mismatch),
    }
}

/// The `bytes` fingerprint of a streamed body (to compare it with a record written for a body
/// read whole, docs/behaviour.md §15.2): hashed as it arrives when its length is known, read
/// whole (up to `limit`) otherwise, since that scheme hashes the length first.
async fn bytes_scheme(
    parts: &http::request::Parts,
    read: Vec<Bytes>,
    rest: Incoming,
    limit: u64,
    timeout: Duration,
) -> Result<Fingerprint, ProxyError> {
    let content_type = parts.headers.get(CONTENT_TYPE).map(|v| v.as_bytes());
    let read_len: u64 = read.iter().map(|b| b.len() as u64).sum();
    match rest.size_hint().exact() {
        Some(len) => {
            let mut hasher = Fingerprint::start_bytes(&parts.method, &parts.uri, content_type, read_len + len);
            drain(read, rest, limit, timeout, |chunk| hasher.update(chunk)).await?;
            Ok(Fingerprint::finish_bytes(hasher))
        }
        None => {
            let mut whole = Vec::new();
            drain(read, rest, limit, timeout, |chunk| whole.extend_from_slice(chunk)).await?;
            Ok(Fingerprint::of(&parts.method, &parts.uri, content_type, &whole))
        }
    }
}

/// Reads the rest of a body that is not forwarded, giving each chunk to `each`: `413` past
/// `limit`, cut off after `timeout`.
async fn drain(
    read: Vec<Bytes>,
    mut rest: Incoming,
    limit: u64,
    timeout: Duration,
    mut each: impl FnMut(&[u8]),
) -> Result<(), ProxyError> {
    let mut total: u64 = 0;
    let mut take = |chunk: &[u8]| {
        total += chunk.len() as u64;
        each(chunk);
        total <= limit
    };
    if !read.iter().all(|chunk| take(chunk)) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let read_rest = async {
        while let Some(frame) = rest.frame().await {
            if let Ok(data) = frame.map_err(|err| ProxyError::ClientBody(err.into()))?.into_data() {
                if !take(&data) {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read_rest)
        .await
        .map_err(|_| ProxyError::ClientBodyTimeout(timeout))?
}

/// A guarded request's body once looked at (docs/behaviour.md §15.1).
enum GuardedBody {
    /// Read whole: at most `buffer_bytes` (or `max_body_bytes` on a `json` route).
    Whole(Bytes),
    /// Larger: what was read of it, the rest, and the SHA-256 its `Content-Digest` declares.
    Streamed {
        read: Vec<Bytes>,
        rest: Incoming,
        declared: Option<[u8; 32]>,
    },
}

impl GuardedBody {
    /// The body to send upstream, and, when it streams, where its end will be told.
    fn into_upstream(self, limit: u64) -> (ProxyBody, Option<Arc<UploadEnd>>) {
        match self {
            GuardedBody::Whole(bytes) => (ProxyBody::full(bytes), None),
            GuardedBody::Streamed { read, rest, declared } => {
                let (upload, end) = Upload::new(read, rest, limit, declared);
                (ProxyBody::Upload(Box::new(upload)), Some(end))
            }
        }
    }
}

/// Reads a guarded body whole when it is at most `buffer_bytes` (a `json` route: up to
/// `max_body_bytes`, §13), or reads no more than that and leaves the rest to stream; a body
/// read whole is checked against its `Content-Digest` here (docs/behaviour.md §15).
async fn take_body(
    body: ProxyBody,
    policy: &Policy,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<GuardedBody, ProxyError> {
    let limit = policy.max_body_bytes;
    if policy.fingerprint_body == FingerprintBody::Json {
        return read_body(body, limit, timeout).await.map(GuardedBody::Whole);
    }
    let declared = content_digest::declared_sha256(headers).map_err(ProxyError::BadContentDigest)?;
    let (read, rest) = match body {
        ProxyBody::Stream { prefix: None, rest } => {
            read_up_to(rest, policy.buffer_bytes.min(limit), limit, timeout).await?
        }
        ProxyBody::Stream {
            prefix: Some(prefix),
            rest,
        } => {
            if (prefix.len() as u64).saturating_add(rest.size_hint().lower()) > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            (vec![prefix], Some(rest))
        }
        other => return whole(read_body(other, limit, timeout).await?, declared),
    };
    match rest {
        Some(rest) => Ok(GuardedBody::Streamed { read, rest, declared }),
        None => whole(concat(read), declared),
    }
}

/// A body read whole, once checked against the digest its `Content-Digest` declares.
fn whole(bytes: Bytes, declared: Option<[u8; 32]>) -> Result<GuardedBody, ProxyError> {
    if declared.is_some_and(|declared| declared != <[u8; 32]>::from(Sha256::digest(&bytes))) {
        return Err(ProxyError::DigestMismatch);
    }
    Ok(GuardedBody::Whole(bytes))
}

/// Reads `rest` while it is at most `buffer` bytes: the chunks read and, when it is larger,
/// the rest of the stream. `413` when `Content-Length` or the bytes read pass `limit`.
async fn read_up_to(
    mut rest: Incoming,
    buffer: u64,
    limit: u64,
    timeout: Duration,
) -> Result<(Vec<Bytes>, Option<Incoming>), ProxyError> {
    let announced = rest.size_hint().lower();
    if announced > limit {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    if announced > buffer {
        return Ok((Vec::new(), Some(rest)));
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    let read = async {
        while let Some(frame) = rest.frame().await {
            // Trailers are dropped, as for every buffered body.
            let Ok(data) = frame?.into_data() else { continue };
            total += data.len() as u64;
            chunks.push(data);
            if total > buffer {
                return Ok(false);
            }
        }
        Ok::<bool, hyper::Error>(true)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(true)) => Ok((chunks, None)),
        Ok(Ok(false)) if total > limit => Err(ProxyError::BodyTooLarge { limit }),
        Ok(Ok(false)) => Ok((chunks, Some(rest))),
        Ok(Err(err)) => Err(ProxyError::ClientBody(err.into())),
        Err(_) => Err(ProxyError::ClientBodyTimeout(timeout)),
    }
}

/// The hash of a request's head, a streamed request's fingerprint before its body's digest is
/// known (docs/behaviour.md §15.2).
fn head_hash(parts: &http::request::Parts) -> HeadHash {
    let content_type = parts.headers.get(CONTENT_TYPE).map(|v| v.as_bytes());
    HeadHash::of(&parts.method, &parts.uri, content_type)
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
        // Never given one: an upload is made here, from a body read so far.
        ProxyBody::Upload(_) => return Err(ProxyError::BadRequest("the request body was already taken")),
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
