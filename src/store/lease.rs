//! Owning a key while its request executes, as a value (Pingora's cache-lock permit).
//!
//! [`Lease::begin`] mints the owner token, asks the store, and hands the request a
//! [`Lease`] when it now owns the key (docs/behaviour.md §4). The lease is the only way to act
//! on the key as its owner: [`renew`](Lease::renew) it while the upstream runs, then either
//! [`complete`](Lease::complete) it with the outcome's record or [`release`](Lease::release)
//! it; both consume the lease, so it cannot be used after it has settled the key.
//!
//! A lease dropped before it settled (its execution panicked, or its task was dropped) does
//! not leave the key `InFlight` until the lease lapses: it releases the key if the request was
//! never sent upstream, and otherwise settles it as `unknown_outcome` says (marks it
//! `Unknown(Interrupted)`, or releases it) (docs/behaviour.md §5).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Begin, BeginRequest, Store, StoreError};
use crate::config::UnknownOutcome;
use crate::idempotency::{unix_ms, Fingerprint, LeaseToken, Print, Record, StorageKey, UnknownCause};

/// What an arriving guarded request asks of the store.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub key: &'a StorageKey,
    pub print: Print,
    pub key_ttl: Duration,
    pub lock_ttl: Duration,
    pub unknown_outcome: UnknownOutcome,
}

/// Ownership of one key. See the module documentation.
#[must_use = "a lease must be completed or released"]
pub struct Lease<S: Store> {
    store: Arc<S>,
    key: StorageKey,
    token: LeaseToken,
    fingerprint: Fingerprint,
    lock_ttl: Duration,
    unknown_outcome: UnknownOutcome,
    /// Set once the request may have reached the upstream.
    sent: AtomicBool,
    /// Set once `complete` or `release` has run: nothing is left to do on drop.
    settled: bool,
}

impl<S: Store> Lease<S> {
    /// Asks `store` for `claim.key`: `Begin::Owner(lease)` when this request now owns it.
    pub async fn begin(store: &Arc<S>, claim: Claim<'_>) -> Result<Begin<Self>, StoreError> {
        let request = BeginRequest {
            key: claim.key,
            print: claim.print,
            token: LeaseToken::random(),
            key_ttl: claim.key_ttl,
            lock_ttl: claim.lock_ttl,
            unknown_outcome: claim.unknown_outcome,
            now_ms: unix_ms(),
        };
        // Until the store has answered, a dropped future (the client went away) may leave the key
        // taken with no lease to settle it: the guard releases it then (a no-op unless the store
        // wrote this token).
        let mut pending = PendingBegin {
            store,
            key: claim.key,
            token: request.token,
            answered: false,
        };
        let begun = store.begin(&request).await;
        pending.answered = true;
        Ok(begun?.map_owner(|token| Lease {
            store: store.clone(),
            key: claim.key.clone(),
            token,
            fingerprint: claim.print.fingerprint(),
            lock_ttl: claim.lock_ttl,
            unknown_outcome: claim.unknown_outcome,
            sent: AtomicBool::new(false),
            settled: false,
        }))
    }

    /// The key this lease owns.
    pub fn key(&self) -> &StorageKey {
        &self.key
    }

    /// The fingerprint of the request that owns the key, as its `InFlight` record carries it
    /// (head-only while a streamed body's digest is not known, docs/behaviour.md §15.2).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Notes that the request is about to be sent upstream: from now on, a lease dropped
    /// unsettled cannot know whether the upstream acted.
    pub fn mark_sent(&self) {
        self.sent.store(true, Ordering::Relaxed);
    }

    /// Extends the lease to `lock_ttl` from now. `Ok(false)`: another request owns the key now.
    pub async fn renew(&self) -> Result<bool, StoreError> {
        self.store.renew(&self.key, self.token, self.lock_ttl).await
    }

    /// Replaces the key's `InFlight` record with `record` (Completed or Unknown).
    /// `Ok(false)`: this lease no longer owned the key (it lapsed and was taken over).
    pub async fn complete(mut self, record: &Record) -> Result<bool, StoreError> {
        let result = self.store.complete(&self.key, self.token, record).await;
        self.settled = true;
        result
    }

    /// Deletes the key's record, so a retry executes. `Ok(false)`: no longer the owner.
    pub async fn release(mut self) -> Result<bool, StoreError> {
        let result = self.store.release(&self.key, self.token).await;
        self.settled = true;
        result
    }
}

impl<S: Store> Drop for Lease<S> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let sent = *self.sent.get_mut();
        let unknown = (sent && self.unknown_outcome == UnknownOutcome::Reject).then(|| Record::Unknown {
            fingerprint: self.fingerprint,
            since_ms: unix_ms(),
            cause: UnknownCause::Interrupted,
        });
        settle_abandoned(&self.store, &self.key, self.token, unknown, Abandoned::Interrupted);
    }
}

/// A `begin` in progress: its owner token may be written before the future is dropped.
struct PendingBegin<'a, S: Store> {
    store: &'a Arc<S>,
    key: &'a StorageKey,
    token: LeaseToken,
    answered: bool,
}

impl<S: Store> Drop for PendingBegin<'_, S> {
    fn drop(&mut self) {
        if !self.answered {
            settle_abandoned(self.store, self.key, self.token, None, Abandoned::ClientGone);
        }
    }
}

/// Settles a key whose owner went away without settling it, in a task of its own: records
/// `unknown` if given, otherwise releases the key; both compare-and-set on `token`, so nothing
/// happens unless `token` still owns the key.
/// Why a key was abandoned by its owner.
#[derive(Debug, Clone, Copy)]
enum Abandoned {
    /// The client went away while its `begin` was in progress: routine (logged at debug).
    ClientGone,
    /// The execution panicked or its task was dropped: a bug (logged at warn).
    Interrupted,
}

fn settle_abandoned<S: Store>(
    store: &Arc<S>,
    key: &StorageKey,
    token: LeaseToken,
    unknown: Option<Record>,
    why: Abandoned,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(key = %key.short_hash(), ?why, "key abandoned outside a runtime: it stays in flight until its lease lapses");
        return;
    };
    let store = store.clone();
    let key = key.clone();
    runtime.spawn(async move {
        let settled = match &unknown {
            Some(record) => store.complete(&key, token, record).await,
            None => store.release(&key, token).await,
        };
        let state = if unknown.is_some() { "Unknown" } else { "released" };
        match settled {
            Ok(true) => match why {
                Abandoned::ClientGone => tracing::debug!(key = %key.short_hash(), state, "key of a client gone mid-begin released"),
                Abandoned::Interrupted => tracing::warn!(key = %key.short_hash(), state, "interrupted execution's key settled"),
            },
            Ok(false) => {}
            Err(err) => {
                tracing::error!(key = %key.short_hash(), ?why, error = %crate::error::chain::Chain(&err), "abandoned key not settled: retries get outcome-unknown once the lease lapses")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::StoredResponse;
    use crate::store::{KeyState, MemoryStore};

    const FP: Fingerprint = Fingerprint::bytes([7; 32]);

    fn claim(key: &StorageKey, unknown_outcome: UnknownOutcome) -> Claim<'_> {
        Claim {
            key,
            print: Print::Whole(FP),
            key_ttl: Duration::from_secs(60),
            lock_ttl: Duration::from_secs(30),
            unknown_outcome,
        }
    }

    async fn owned(store: &Arc<MemoryStore>, key: &StorageKey, unknown: UnknownOutcome) -> Lease<MemoryStore> {
        match Lease::begin(store, claim(key, unknown)).await {
            Ok(Begin::Owner(lease)) => lease,
            other => panic!("expected to own the key, got {:?}", other.map(|b| b.map_owner(|_| ()))),
        }
    }

    /// Waits for the task a dropped lease spawned, and returns the key's state.
    async fn settled_state(store: &MemoryStore, key: &StorageKey) -> Option<KeyState> {
        for _ in 0..100 {
            let state = store.lookup(key).await.expect("lookup");
            if !matches!(&state, Some(s) if matches!(s.existing.record, Record::InFlight { .. })) {
                return state;
            }
            tokio::task::yield_now().await;
        }
        store.lookup(key).await.expect("lookup")
    }

    #[tokio::test]
    async fn only_one_request_owns_a_key_and_completing_settles_it() {
        let store = Arc::new(MemoryStore::new(10));
        let key = StorageKey::new("t:", "r", b"", b"k1");
        let lease = owned(&store, &key, UnknownOutcome::Reject).await;
        let second = Lease::begin(&store, claim(&key, UnknownOutcome::Reject)).await;
        assert!(matches!(second, Ok(Begin::InFlight { .. })));
        assert_eq!(lease.renew().await, Ok(true));
        let record = Record::Completed {
            fingerprint: FP,
            response: StoredResponse {
                status: http::StatusCode::CREATED,
                headers: vec![],
                body: Some(bytes::Bytes::from_static(b"done")),
                completed_at_ms: 0,
            },
        };
        assert_eq!(lease.complete(&record).await, Ok(true));
        let replay = Lease::begin(&store, claim(&key, UnknownOutcome::Reject)).await;
        assert!(matches!(replay, Ok(Begin::Replay(r)) if r.status == http::StatusCode::CREATED));
    }

    #[tokio::test]
    async fn a_released_key_executes_again() {
        let store = Arc::new(MemoryStore::new(10));
        let key = StorageKey::new("t:", "r", b"", b"k2");
        let lease = owned(&store, &key, UnknownOutcome::Reject).await;
        assert_eq!(lease.release().await, Ok(true));
        let _again = owned(&store, &key, UnknownOutcome::Reject).await;
    }

    /// A lease taken under `unknown_outcome`, marked sent or not, then dropped unsettled:
    /// the key's state once the drop has settled it.
    async fn dropped_unsettled(unknown_outcome: UnknownOutcome, sent: bool) -> Option<KeyState> {
        let store = Arc::new(MemoryStore::new(10));
        let key = StorageKey::new("t:", "r", b"", b"dropped");
        let lease = owned(&store, &key, unknown_outcome).await;
        if sent {
            lease.mark_sent();
        }
        drop(lease);
        settled_state(&store, &key).await
    }

    #[tokio::test]
    async fn a_lease_dropped_before_sending_releases_its_key() {
        assert_eq!(dropped_unsettled(UnknownOutcome::Reject, false).await, None);
    }

    #[tokio::test]
    async fn a_lease_dropped_after_sending_marks_its_key_unknown() {
        let state = dropped_unsettled(UnknownOutcome::Reject, true).await;
        let record = state.expect("the key is kept").existing.record;
        assert!(matches!(
            record,
            Record::Unknown {
                cause: UnknownCause::Interrupted,
                ..
            }
        ));
        // What a retry gets from such a record.
        let decided = crate::idempotency::decide(
            Some(crate::idempotency::Existing {
                record,
                lease_left: None,
            }),
            &Print::Whole(FP),
            UnknownOutcome::Reject,
        );
        assert_eq!(
            decided,
            crate::idempotency::Decision::Unknown(UnknownCause::Interrupted)
        );
    }

    #[tokio::test]
    async fn a_lease_dropped_after_sending_with_unknown_outcome_retry_releases_its_key() {
        assert_eq!(dropped_unsettled(UnknownOutcome::Retry, true).await, None);
    }

    /// A store that takes the key, then never answers `begin` (a reply lost on its way back).
    struct Unanswering(MemoryStore);

    impl Store for Unanswering {
        async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
            let _ = self.0.begin(request).await;
            std::future::pending().await
        }
        async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
            self.0.complete(key, token, record).await
        }
        async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
            self.0.release(key, token).await
        }
        async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
            self.0.renew(key, token, lock_ttl).await
        }
        async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
            self.0.lookup(key).await
        }
        async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
            self.0.clear(key).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.0.ping().await
        }
    }

    #[tokio::test]
    async fn a_begin_dropped_before_its_answer_leaves_no_key_behind() {
        let store = Arc::new(Unanswering(MemoryStore::new(10)));
        let key = StorageKey::new("t:", "r", b"", b"abandoned");
        let begin = Lease::begin(&store, claim(&key, UnknownOutcome::Reject));
        let gave_up = tokio::time::timeout(Duration::from_millis(10), begin).await;
        assert!(gave_up.is_err(), "the begin never answers; the client goes away");
        for _ in 0..100 {
            if store.lookup(&key).await.expect("lookup").is_none() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the key taken by the abandoned begin was not released");
    }

    #[tokio::test]
    async fn a_panicking_execution_does_not_leave_its_key_in_flight() {
        let store = Arc::new(MemoryStore::new(10));
        let key = StorageKey::new("t:", "r", b"", b"k6");
        let lease = owned(&store, &key, UnknownOutcome::Reject).await;
        let execution = tokio::spawn(async move {
            lease.mark_sent();
            panic!("a bug in the execution");
        });
        assert!(execution.await.expect_err("it panicked").is_panic());
        let state = settled_state(&store, &key).await.expect("the key is kept");
        assert_eq!(state.existing.record.state_name(), "Unknown");
    }
}
