//! The owner's side of a key (docs/behaviour.md §5): one upstream exchange, its lease kept alive
//! meanwhile, and its outcome ([`settle`]) recorded before the client is answered.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::connection::ConnectionInfo;
use super::forward;
use super::request_log::{self, RequestLog, TaskEnd};
use crate::body::{concat, ProxyBody};
use crate::config::Route;
use crate::error::{Chain, ErrorStyle, ProxyError};
use crate::headers::set_retry_hint;
use crate::idempotency::{
    replay, settle, unix_ms, Exchange, Fingerprint, HeadHash, Record, Settlement, StoredResponse, UnknownCause,
};
use crate::state::State;
use crate::store::{AnyStore, Lease};
use crate::telemetry::{Outcome, Renewal, StoreOp};
use crate::upload::{Cut, UploadEnd, UploadState};
use crate::upstream::UpstreamError;

/// Executes `request` upstream as the owner of `lease`'s key, in its own task: a client that
/// goes away does not cancel the upstream call, and its result is still recorded for the
/// client's retry, and logged on `log`'s line by the task (docs/behaviour.md §10.3). An
/// execution that panics is answered `500`; its dropped lease settles the key ([`Lease`]'s
/// drop).
pub async fn execute(
    state: &Arc<State>,
    connection: &Arc<ConnectionInfo>,
    route: &Arc<Route>,
    lease: Lease<AnyStore>,
    request: Request<ProxyBody>,
    log: &RequestLog,
    upload: Option<Streamed>,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    let execution = Execution {
        state: state.clone(),
        connection: connection.clone(),
        route: route.clone(),
        upload,
    };
    let (client_end, task_end) = request_log::execution_line(state.clone(), log);
    // Boxed before spawning: the execution's state machine is large, and the task would
    // otherwise be moved through several frames on its way into the runtime.
    let joined = state
        .executions
        .spawn(Box::pin(execution.run_logged(lease, request, task_end)))
        .await;
    client_end.answered();
    match joined {
        Ok(result) => result,
        Err(join) => Err(ProxyError::ExecutionFailed(join)),
    }
}

/// An upstream response body, read up to `max_response_bytes`.
enum ResponseBody {
    /// The whole body: stored and replayable.
    Buffered(Bytes),
    /// Over the limit: what was read, then the rest, streamed to the client and not stored.
    Oversized { prefix: Bytes, rest: Incoming },
}

impl ResponseBody {
    /// The body a replay can send, if it was read whole.
    fn replayable(&self) -> Option<Bytes> {
        match self {
            ResponseBody::Buffered(bytes) => Some(bytes.clone()),
            ResponseBody::Oversized { .. } => None,
        }
    }

    fn into_client_body(self) -> ProxyBody {
        match self {
            ResponseBody::Buffered(bytes) => ProxyBody::full(bytes),
            ResponseBody::Oversized { prefix, rest } => ProxyBody::Stream {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

/// A request whose body streams upstream as it executes (docs/behaviour.md §15).
pub struct Streamed {
    /// The hash of its head: with its body's digest, the fingerprint it is recorded with.
    pub head: HeadHash,
    /// Where its upload tells how it ended.
    pub end: Arc<UploadEnd>,
}

/// What one execution needs besides its lease.
struct Execution {
    state: Arc<State>,
    /// The client connection, for its upstream connection affinity.
    connection: Arc<ConnectionInfo>,
    route: Arc<Route>,
    upload: Option<Streamed>,
}

impl Execution {
    /// [`run`](Self::run), then tells `line` how it ended, as the client is (or would have
    /// been) answered.
    async fn run_logged(
        self,
        lease: Lease<AnyStore>,
        request: Request<ProxyBody>,
        line: TaskEnd,
    ) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
        let route = self.route.clone();
        let result = self.run(lease, request).await;
        match &result {
            Ok((response, outcome)) => line.ended(response.status(), *outcome),
            Err(err) => line.ended(ErrorStyle::of(&route.policy).status(err), err.outcome()),
        }
        result
    }

    async fn run(
        self,
        lease: Lease<AnyStore>,
        request: Request<ProxyBody>,
    ) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
        let policy = &self.route.policy;
        let max_body = policy.max_response_bytes;
        let exchange = forward::exchange(&self.state, &self.connection, &self.route, request, |body| {
            read_response_body(body, max_body)
        });
        lease.mark_sent();
        let result = self.renewing(&lease, exchange).await;
        // A failed exchange whose upload had not ended is cut now, so the upstream never gets
        // its end after the key is released (docs/behaviour.md §15.4).
        let upload = self.upload.as_ref().map(|streamed| match result {
            Ok(_) => streamed.end.state(),
            Err(_) => streamed.end.complete_or_cut(),
        });
        let request_whole = !matches!(upload, Some(UploadState::Cut(_) | UploadState::Streaming));
        let settlement = settle(exchanged(&result, request_whole), policy);
        let fingerprint = match (&self.upload, upload) {
            (Some(streamed), Some(UploadState::Complete(digest))) => streamed.head.with_body(&digest),
            _ => lease.fingerprint(),
        };
        match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                if policy.unknown_statuses.contains(parts.status) {
                    tracing::warn!(status = parts.status.as_u16(), key = %lease.key().short_hash(), "outcome unknown: the upstream answered with a status listed in unknown_statuses");
                }
                let stored = || {
                    Some(replay::store(
                        parts.status,
                        &parts.headers,
                        body.replayable(),
                        unix_ms(),
                    ))
                };
                self.settle_key(lease, settlement, fingerprint, stored).await;
                // The answer is relayed either way; a key left unknown counts as such.
                let outcome = match settlement {
                    Settlement::MarkUnknown(_) => Outcome::OutcomeUnknown,
                    Settlement::Record | Settlement::Release => Outcome::Executed,
                };
                // No use retrying (docs/behaviour.md §16): every retry gets a recorded 5xx
                // replayed, or `outcome-unknown` for a status listed in `unknown_statuses`
                // (§14). A released status carries no hint.
                let final_answer = match settlement {
                    Settlement::Record => parts.status.is_server_error(),
                    Settlement::MarkUnknown(_) => true,
                    Settlement::Release => false,
                };
                if final_answer {
                    set_retry_hint(&mut parts.headers, policy.retry_hint_header.as_ref(), false);
                }
                Ok((Response::from_parts(parts, body.into_client_body()), outcome))
            }
            Err(err) => {
                if !matches!(err, UpstreamError::Connect(_)) && request_whole {
                    tracing::warn!(error = %Chain(&err), key = %lease.key().short_hash(), "outcome unknown: the request was sent but no complete response came back");
                }
                self.settle_key(lease, settlement, fingerprint, || None).await;
                match (settlement, upload) {
                    (Settlement::MarkUnknown(cause), _) => Err(ProxyError::OutcomeUnknown(cause)),
                    (_, Some(UploadState::Cut(Cut::TooLarge { limit }))) => Err(ProxyError::BodyTooLarge { limit }),
                    (_, Some(UploadState::Cut(Cut::DigestMismatch))) => Err(ProxyError::DigestMismatch),
                    _ => Err(err.into()),
                }
            }
        }
    }

    /// Runs `work`, renewing the lease every third of `lock_ttl` so a slow upstream is never
    /// taken for a dead proxy (docs/behaviour.md §4).
    async fn renewing<F: Future>(&self, lease: &Lease<AnyStore>, work: F) -> F::Output {
        let period = self.route.policy.lock_ttl / 3;
        let mut work = pin!(work);
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                _ = ticker.tick() => self.renew(lease).await,
            }
        }
    }

    async fn renew(&self, lease: &Lease<AnyStore>) {
        let metrics = &self.state.metrics;
        match metrics.timed(StoreOp::Renew, lease.renew()).await {
            Ok(true) => metrics.lease_renewal(Renewal::Renewed),
            Ok(false) => {
                metrics.lease_renewal(Renewal::Lost);
                tracing::warn!(key = %lease.key().short_hash(), "lease lost: another request now owns this key");
            }
            Err(err) => {
                metrics.lease_renewal(Renewal::Failed);
                tracing::warn!(error = %Chain(&err), key = %lease.key().short_hash(), "lease renewal failed");
            }
        }
    }

    /// Applies `settlement` through `lease`, recording `fingerprint`; `answer` is the response
    /// to record, if the exchange produced one.
    async fn settle_key(
        &self,
        lease: Lease<AnyStore>,
        settlement: Settlement,
        fingerprint: Fingerprint,
        answer: impl FnOnce() -> Option<StoredResponse>,
    ) {
        match (settlement, answer()) {
            (Settlement::Record, Some(response)) => {
                self.record(lease, Record::Completed { fingerprint, response }).await
            }
            (Settlement::MarkUnknown(cause), _) => {
                let since_ms = unix_ms();
                self.record(
                    lease,
                    Record::Unknown {
                        fingerprint,
                        since_ms,
                        cause,
                    },
                )
                .await
            }
            // Only a complete answer is recorded: without one, nothing is left to replay.
            (Settlement::Record, None) | (Settlement::Release, _) => self.release(lease).await,
        }
    }

    /// Records the outcome (compare-and-set on the token). A failure is logged: the lease then
    /// lapses and retries learn the outcome is unknown, which keeps the at-most-once promise.
    async fn record(&self, lease: Lease<AnyStore>, record: Record) {
        let key = lease.key().short_hash();
        match self
            .state
            .metrics
            .timed(StoreOp::Complete, lease.complete(&record))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%key, state = record.state_name(), "not recorded: this request no longer owns the key")
            }
            Err(err) => {
                tracing::error!(error = %Chain(&err), %key, state = record.state_name(), "outcome not recorded: retries will get outcome-unknown once the lease lapses")
            }
        }
    }

    async fn release(&self, lease: Lease<AnyStore>) {
        let key = lease.key().short_hash();
        if let Err(err) = self.state.metrics.timed(StoreOp::Release, lease.release()).await {
            tracing::error!(error = %Chain(&err), %key, "key not released: retries will get outcome-unknown once the lease lapses");
        }
    }
}

/// How the exchange ended, as [`settle`] sees it; `request_whole`: the whole request (a
/// streamed body to its end) was handed to the upstream connection.
fn exchanged<B>(result: &Result<Response<B>, UpstreamError>, request_whole: bool) -> Exchange {
    match result {
        Ok(response) => Exchange::Answered(response.status()),
        Err(UpstreamError::Connect(_)) => Exchange::NotSent,
        // The client's body broke while it streamed: the upstream never got the request's end.
        Err(UpstreamError::ClientBody(_)) => Exchange::RequestCut,
        Err(_) if !request_whole => Exchange::RequestCut,
        Err(UpstreamError::Timeout(_)) => Exchange::NoCompleteAnswer(UnknownCause::Timeout),
        Err(UpstreamError::Failed(_)) => Exchange::NoCompleteAnswer(UnknownCause::UpstreamFailed),
    }
}

/// Reads a response body up to `max` bytes; a larger one is kept as what was read plus the
/// rest of the stream.
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
        let Ok(data) = frame.map_err(UpstreamError::Failed)?.into_data() else {
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
