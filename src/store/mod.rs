//! Where records live: a small async trait and its implementations, the embedded stores
//! [`DiskStore`] (one sidecar, no Redis: the default, durable, docs/behaviour.md §11) and
//! [`MemoryStore`] (volatile), and the [`RedisStore`] (many instances: standalone, Redis Cluster,
//! or a Sentinel-monitored master followed across failovers), chosen at start-up as an
//! [`AnyStore`]. All hold to
//! [`decide`](crate::idempotency::decide); one contract test suite (`tests/store_contract.rs`)
//! runs against each. Owning a key is a value, the [`Lease`] (docs/behaviour.md §4).

mod any;
mod cluster_slots;
pub mod disk;
mod group_commit;
pub mod lease;
pub mod memory;
pub mod redis;
mod redis_connection;
mod replication;
mod sentinel;
mod subscriber;
pub mod waiters;

use std::future::Future;
use std::time::Duration;

use crate::config::UnknownOutcome;
use crate::error::chain::BoxError;
use crate::idempotency::{
    Decision, Existing, LeaseToken, Print, Record, RecordError, StorageKey, StoredResponse, UnknownCause,
};

pub use self::any::{AnyStore, KeyWatch};
pub use self::disk::DiskStore;
pub use self::lease::Lease;
pub use self::memory::MemoryStore;
pub use self::redis::{RedisOptions, RedisStore};

/// Time left on an InFlight record's lease at `now_ms` (wall clock, Unix ms); `None` once it has
/// lapsed, and for every other record.
pub(crate) fn lease_left_at(record: &Record, now_ms: u64) -> Option<Duration> {
    match record {
        Record::InFlight { lease_until_ms, .. } if *lease_until_ms > now_ms => {
            Some(Duration::from_millis(lease_until_ms - now_ms))
        }
        _ => None,
    }
}

/// A store failure. `Unavailable` (and `Full`) are what `store_failure = "open"` forwards
/// through; a `Corrupt` record never is: its key may have been executed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unavailable")]
    Unavailable(#[source] StoreFault),
    #[error("stored record is unreadable")]
    Corrupt(#[from] RecordError),
    #[error("the embedded store is full ({0} records)")]
    Full(usize),
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreFault {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection or the server failed (refused, reset, a Redis error reply).
    #[error(transparent)]
    Unreachable(BoxError),
    #[error("unexpected reply to {command}: {reply}")]
    UnexpectedReply { command: &'static str, reply: String },
    /// A write was not acknowledged by `store.min_replicas` replicas within
    /// `store.replica_timeout` (docs/behaviour.md §4.4).
    #[error("the write reached {acknowledged} replica(s) in time, {wanted} required")]
    Unreplicated { acknowledged: i64, wanted: u32 },
    /// Fewer replicas are attached to the master than `store.min_replicas` (readiness).
    #[error("{attached} replica(s) attached to the master, store.min_replicas is {wanted}")]
    TooFewReplicas { attached: usize, wanted: u32 },
}

impl StoreError {
    /// The store could not be reached, because of `cause`.
    pub fn unreachable(cause: impl Into<BoxError>) -> Self {
        StoreError::Unavailable(StoreFault::Unreachable(cause.into()))
    }

    /// No answer within `limit`.
    pub fn timeout(limit: Duration) -> Self {
        StoreError::Unavailable(StoreFault::Timeout(limit))
    }
}

/// Errors compare by kind and text (tests compare results; causes are not comparable).
impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StoreError::Unavailable(a), StoreError::Unavailable(b)) => a.to_string() == b.to_string(),
            (StoreError::Corrupt(a), StoreError::Corrupt(b)) => a == b,
            (StoreError::Full(a), StoreError::Full(b)) => a == b,
            _ => false,
        }
    }
}

/// An arriving guarded request, as the store sees it.
#[derive(Debug, Clone)]
pub struct BeginRequest<'a> {
    pub key: &'a StorageKey,
    /// What the request knows of its fingerprint (docs/behaviour.md §15.2).
    pub print: Print,
    /// The token this request will own the key with, if it gets it.
    pub token: LeaseToken,
    pub key_ttl: Duration,
    pub lock_ttl: Duration,
    pub unknown_outcome: UnknownOutcome,
    /// Wall clock (Unix ms) stamped into a new record.
    pub now_ms: u64,
}

impl BeginRequest<'_> {
    /// The record written when this request takes the key.
    pub fn in_flight_record(&self) -> Record {
        Record::InFlight {
            fingerprint: self.print.fingerprint(),
            owner: self.token,
            started_at_ms: self.now_ms,
            lease_until_ms: self.now_ms.saturating_add(self.lock_ttl.as_millis() as u64),
        }
    }

    /// The record written when this request finds its key's owner gone (`unknown_outcome = reject`).
    pub fn lapsed_record(&self) -> Record {
        Record::Unknown {
            fingerprint: self.print.fingerprint(),
            since_ms: self.now_ms,
            cause: UnknownCause::LeaseLapsed,
        }
    }
}

/// What `begin` gives an arriving guarded request: a typed lock result, as Pingora's cache
/// lock. A store answers `Begin<LeaseToken>` (the token the key is now owned with);
/// [`Lease::begin`] turns that into `Begin<Lease>`, the value that owns the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin<O> {
    /// This request owns the key: execute it upstream.
    Owner(O),
    /// Replay this stored response.
    Replay(StoredResponse),
    /// Another request with this key still runs.
    InFlight { retry_after: Duration },
    /// The key belongs to a different request.
    Mismatch,
    /// The key's outcome is unknown.
    Unknown(UnknownCause),
    /// The request must hash its body to be compared with this finished record
    /// ([`Decision::Verify`]).
    Verify(Record),
}

impl<O> Begin<O> {
    /// The same answer with its owner turned into `P` by `own`.
    pub fn map_owner<P>(self, own: impl FnOnce(O) -> P) -> Begin<P> {
        match self {
            Begin::Owner(owner) => Begin::Owner(own(owner)),
            Begin::Replay(response) => Begin::Replay(response),
            Begin::InFlight { retry_after } => Begin::InFlight { retry_after },
            Begin::Mismatch => Begin::Mismatch,
            Begin::Unknown(cause) => Begin::Unknown(cause),
            Begin::Verify(record) => Begin::Verify(record),
        }
    }
}

impl Begin<LeaseToken> {
    /// A store's answer once it has applied `decision` for the request holding `token`.
    pub fn applied(decision: Decision, token: LeaseToken) -> Self {
        match decision {
            Decision::Execute | Decision::TakeOver => Begin::Owner(token),
            Decision::MarkUnknown => Begin::Unknown(UnknownCause::LeaseLapsed),
            Decision::InFlight { retry_after } => Begin::InFlight { retry_after },
            Decision::Mismatch => Begin::Mismatch,
            Decision::Replay(response) => Begin::Replay(response),
            Decision::Unknown(cause) => Begin::Unknown(cause),
            Decision::Verify(record) => Begin::Verify(record),
        }
    }
}

/// The record store (docs/behaviour.md §4). Every operation is one atomic step (one round trip for Redis);
/// `complete`, `release` and `renew` are compare-and-set on the owner's token, so a proxy whose
/// lease lapsed can never overwrite or delete a newer owner's record.
pub trait Store: Send + Sync + 'static {
    /// Decides an arriving guarded request and applies the decision (docs/behaviour.md §4's table).
    fn begin(&self, request: &BeginRequest<'_>) -> impl Future<Output = Result<Begin<LeaseToken>, StoreError>> + Send;

    /// Replaces the owner's InFlight record with `record` (Completed or Unknown), keeping the
    /// key's expiry, and drops the lease. `Ok(false)`: `token` no longer owns the key.
    fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: &Record,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the owner's record and lease, so a retry executes. `Ok(false)`: not the owner.
    fn release(&self, key: &StorageKey, token: LeaseToken) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Extends the owner's lease to `lock_ttl` from now. `Ok(false)`: not the owner any more.
    fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The key's record and lease, read-only (admin lookups).
    fn lookup(&self, key: &StorageKey) -> impl Future<Output = Result<Option<KeyState>, StoreError>> + Send;

    /// Deletes the key's record and lease, whoever owns it (the admin's way out of Unknown).
    fn clear(&self, key: &StorageKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Whether the store answers (readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A key's full state, for lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub existing: Existing,
    /// Time until the record expires; `None` if it has no expiry.
    pub expires_in: Option<Duration>,
}
