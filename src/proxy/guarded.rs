//! A guarded request's life (spec §4-§7): read the body, fingerprint it, `begin` on the store,
//! then replay, refuse, or execute upstream exactly once and record the outcome.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::service::{client_response, prepare_client_response, upstream_request};
use super::{ConnectionInfo, State};
use crate::body::ProxyBody;
use crate::config::{OnConflict, Route, StoreFailure, UnknownOutcome};
use crate::error::ProxyError;
use crate::idempotency::{replay, unix_ms, Fingerprint, LeaseToken, Record, StorageKey, UnknownCause};
use crate::store::{Begin, BeginRequest, Store, StoreError};
use crate::telemetry::{Metrics, Outcome, Renewal, StoreOp};
use crate::upstream::{error_chain, Affinity, Upstream, UpstreamError};

/// First and longest pause between two looks at a key in flight (`on_conflict = "wait"`).
const WAIT_FIRST_POLL: Duration = Duration::from_millis(10);
const WAIT_MAX_POLL: Duration = Duration::from_millis(250);

/// Handles a guarded request (its method is guarded and it carries a valid key).
pub async fn handle(
    state: &Arc<State>,
    connection: &Arc<ConnectionInfo>,
    route: &Arc<Route>,
    request: Request<Incoming>,
    key: StorageKey,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    let policy = &route.policy;
    let (parts, body) = request.into_parts();
    let body = read_body(body, policy.max_body_bytes, state.config.server.body_read_timeout).await?;
    let content_type = parts.headers.get(CONTENT_TYPE).map(|v| v.as_bytes());
    let fingerprint = Fingerprint::of(&parts.method, &parts.uri, content_type, &body);
    let token = LeaseToken::random();
    let wait_until = Instant::now() + policy.wait_timeout;
    let mut poll = WAIT_FIRST_POLL;
    loop {
        let begin = BeginRequest {
            key: &key,
            fingerprint,
            token,
            key_ttl: policy.key_ttl,
            lock_ttl: policy.lock_ttl,
            unknown_outcome: policy.unknown_outcome,
            now_ms: unix_ms(),
        };
        let begun = match timed(&state.metrics, StoreOp::Begin, state.store.begin(&begin)).await {
            Ok(begun) => begun,
            // A full embedded store cannot take the key either: the operator chose availability.
            // A corrupt record is not a failure to reach the store: the key may have been
            // executed, so it is never forwarded unprotected.
            Err(err @ (StoreError::Unavailable(_) | StoreError::Full(_)))
                if policy.store_failure == StoreFailure::Open =>
            {
                tracing::warn!(reason = %err, key = %key.short_hash(), "store unavailable: forwarding without idempotency protection");
                let request = upstream_request(route, connection, Request::from_parts(parts, body), ProxyBody::full)?;
                let response = state
                    .upstream
                    .send(route, Some(&connection.affinity), request, route.timeout)
                    .await?;
                return Ok((client_response(response, ProxyBody::stream), Outcome::FailOpen));
            }
            Err(err) => return Err(ProxyError::StoreUnavailable(err)),
        };
        match begun {
            Begin::Owner => {
                let request = upstream_request(route, connection, Request::from_parts(parts, body), ProxyBody::full)?;
                let execution = Execution {
                    state: state.clone(),
                    connection: connection.clone(),
                    route: route.clone(),
                    key,
                    token,
                    fingerprint,
                };
                // Its own task: a client that goes away does not cancel the upstream call, and
                // its result is still recorded for the client's retry (spec §5).
                // Boxed before spawning: the execution's state machine is large, and the task
                // would otherwise be moved through several frames on its way into the runtime.
                return match state.executions.spawn(Box::pin(execution.run(request))).await {
                    Ok(result) => result,
                    Err(join) => Err(ProxyError::Upstream(UpstreamError::Failed(format!(
                        "execution task failed: {join}"
                    )))),
                };
            }
            Begin::Replay(stored) => {
                return replay::replay(stored)
                    .map(|response| (response, Outcome::Replayed))
                    .ok_or(ProxyError::NotReplayable);
            }
            Begin::InFlight { retry_after } => {
                let now = Instant::now();
                if policy.on_conflict == OnConflict::Wait && now < wait_until {
                    tokio::time::sleep(poll.min(wait_until - now)).await;
                    poll = (poll * 2).min(WAIT_MAX_POLL);
                    continue;
                }
                return Err(ProxyError::Conflict { retry_after });
            }
            Begin::Mismatch => return Err(ProxyError::Mismatch),
            Begin::Unknown(cause) => return Err(ProxyError::OutcomeUnknown(cause)),
        }
    }
}

/// Reads a guarded request's body whole: `413` past `limit` (early, on `Content-Length`), and
/// a client that sends it too slowly is cut off after `timeout`.
async fn read_body(body: Incoming, limit: u64, timeout: Duration) -> Result<Bytes, ProxyError> {
    if body.size_hint().lower() > limit {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Ok(Err(err)) => Err(ProxyError::ClientBody(error_chain(&*err))),
        Err(_) => Err(ProxyError::ClientBody(format!("not received within {timeout:?}"))),
    }
}

/// An upstream response body, read up to `max_response_bytes`.
enum ResponseBody {
    /// The whole body: stored and replayable.
    Buffered(Bytes),
    /// Over the limit: what was read, then the rest, streamed to the client and not stored.
    Oversized { prefix: Bytes, rest: Incoming },
}

/// The owner's side of a key: one upstream exchange, its lease kept alive meanwhile, and
/// its outcome recorded before the client is answered.
struct Execution {
    state: Arc<State>,
    /// The client connection, for its upstream connection affinity.
    connection: Arc<ConnectionInfo>,
    route: Arc<Route>,
    key: StorageKey,
    token: LeaseToken,
    fingerprint: Fingerprint,
}

impl Execution {
    async fn run(self, request: Request<ProxyBody>) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
        let policy = &self.route.policy;
        let exchange = exchange(
            &self.state.upstream,
            &self.route,
            &self.connection.affinity,
            request,
            policy.max_response_bytes,
        );
        let started = std::time::Instant::now();
        let result = self.renewing_lease(exchange).await;
        self.state
            .metrics
            .upstream_duration(self.route.index, started.elapsed());
        match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                prepare_client_response(&mut parts);
                match body {
                    ResponseBody::Buffered(bytes) => {
                        if parts.status.is_server_error() && !policy.record_server_errors {
                            self.release().await;
                        } else {
                            let stored = replay::store(parts.status, &parts.headers, Some(bytes.clone()), unix_ms());
                            self.record(Record::Completed {
                                fingerprint: self.fingerprint,
                                response: stored,
                            })
                            .await;
                        }
                        Ok((Response::from_parts(parts, ProxyBody::full(bytes)), Outcome::Executed))
                    }
                    ResponseBody::Oversized { prefix, rest } => {
                        let stored = replay::store(parts.status, &parts.headers, None, unix_ms());
                        self.record(Record::Completed {
                            fingerprint: self.fingerprint,
                            response: stored,
                        })
                        .await;
                        let body = ProxyBody::Stream {
                            prefix: (!prefix.is_empty()).then_some(prefix),
                            rest,
                        };
                        Ok((Response::from_parts(parts, body), Outcome::Executed))
                    }
                }
            }
            Err(err @ UpstreamError::Connect(_)) => {
                // Never reached the upstream: a retry may execute (spec §5).
                self.release().await;
                Err(err.into())
            }
            Err(err) => {
                let cause = match err {
                    UpstreamError::Timeout(_) => UnknownCause::Timeout,
                    _ => UnknownCause::UpstreamFailed,
                };
                tracing::warn!(error = %err, key = %self.key.short_hash(), "outcome unknown: the request was sent but no complete response came back");
                match policy.unknown_outcome {
                    UnknownOutcome::Reject => {
                        self.record(Record::Unknown {
                            fingerprint: self.fingerprint,
                            since_ms: unix_ms(),
                            cause,
                        })
                        .await;
                        Err(ProxyError::OutcomeUnknown(cause))
                    }
                    UnknownOutcome::Retry => {
                        self.release().await;
                        Err(err.into())
                    }
                }
            }
        }
    }

    /// Runs `work`, renewing the lease every third of `lock_ttl` so a slow upstream is never
    /// taken for a dead proxy (spec §4).
    async fn renewing_lease<F: Future>(&self, work: F) -> F::Output {
        let lock_ttl = self.route.policy.lock_ttl;
        let period = lock_ttl / 3;
        let mut work = pin!(work);
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                _ = ticker.tick() => {
                    let metrics = &self.state.metrics;
                    match timed(metrics, StoreOp::Renew, self.state.store.renew(&self.key, self.token, lock_ttl)).await {
                        Ok(true) => metrics.lease_renewal(Renewal::Renewed),
                        Ok(false) => {
                            metrics.lease_renewal(Renewal::Lost);
                            tracing::warn!(key = %self.key.short_hash(), "lease lost: another request now owns this key");
                        }
                        Err(err) => {
                            metrics.lease_renewal(Renewal::Failed);
                            tracing::warn!(error = %err, key = %self.key.short_hash(), "lease renewal failed");
                        }
                    }
                }
            }
        }
    }

    /// Records the outcome (compare-and-set on the token). A failure is logged: the lease then
    /// lapses and retries learn the outcome is unknown, which keeps the at-most-once promise.
    async fn record(&self, record: Record) {
        let completion = self.state.store.complete(&self.key, self.token, &record);
        match timed(&self.state.metrics, StoreOp::Complete, completion).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(key = %self.key.short_hash(), state = record.state_name(), "not recorded: this request no longer owns the key")
            }
            Err(err) => {
                tracing::error!(error = %err, key = %self.key.short_hash(), state = record.state_name(), "outcome not recorded: retries will get outcome-unknown once the lease lapses")
            }
        }
    }

    async fn release(&self) {
        match timed(
            &self.state.metrics,
            StoreOp::Release,
            self.state.store.release(&self.key, self.token),
        )
        .await
        {
            Ok(_) => {}
            Err(err) => {
                tracing::error!(error = %err, key = %self.key.short_hash(), "key not released: retries will get outcome-unknown once the lease lapses")
            }
        }
    }
}

/// Sends the request and reads the response body up to `max_body`, all within `timeout`.
async fn exchange(
    upstream: &Upstream,
    route: &Route,
    affinity: &Affinity,
    request: Request<ProxyBody>,
    max_body: u64,
) -> Result<Response<ResponseBody>, UpstreamError> {
    let timeout = route.timeout;
    let work = async {
        let response = upstream.send_untimed(route, Some(affinity), request).await?;
        let (parts, body) = response.into_parts();
        let body = read_response_body(body, max_body).await?;
        Ok(Response::from_parts(parts, body))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout(timeout)),
    }
}

async fn read_response_body(mut body: Incoming, max: u64) -> Result<ResponseBody, UpstreamError> {
    if body.size_hint().lower() > max {
        return Ok(ResponseBody::Oversized {
            prefix: Bytes::new(),
            rest: body,
        });
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::Failed(format!("response body: {}", error_chain(&e))))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        chunks.push(data);
        if total > max {
            return Ok(ResponseBody::Oversized {
                prefix: concat(chunks),
                rest: body,
            });
        }
    }
    Ok(ResponseBody::Buffered(concat(chunks)))
}

fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    }
}

/// Awaits a store call, recording its latency and failure in the metrics.
async fn timed<T>(
    metrics: &Metrics,
    op: StoreOp,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = call.await;
    metrics.store_call(op, started.elapsed(), result.is_ok());
    result
}
