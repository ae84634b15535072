//! Where records live: a small async trait and its two implementations, the embedded
//! [`MemoryStore`] (one sidecar, no Redis) and the [`RedisStore`] (many instances, standalone or
//! Redis Cluster). Both hold to [`decide`](crate::idempotency::decide); one contract test suite
//! (`tests/store_contract.rs`) runs against each.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::config::UnknownOutcome;
use crate::idempotency::{
    Decision, Existing, Fingerprint, LeaseToken, Record, RecordError, StorageKey, StoredResponse, UnknownCause,
};

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// A store failure. `Unavailable` is what `store_failure = "open"` forwards through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unreachable: {0}")]
    Unavailable(String),
    #[error("stored record is unreadable: {0}")]
    Corrupt(#[from] RecordError),
    #[error("memory store is full ({0} records)")]
    Full(usize),
}

/// An arriving guarded request, as the store sees it.
#[derive(Debug, Clone)]
pub struct BeginRequest<'a> {
    pub key: &'a StorageKey,
    pub fingerprint: Fingerprint,
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
            fingerprint: self.fingerprint,
            owner: self.token,
            started_at_ms: self.now_ms,
            lease_until_ms: self.now_ms.saturating_add(self.lock_ttl.as_millis() as u64),
        }
    }

    /// The record written when this request finds its key's owner gone (`unknown_outcome = reject`).
    pub fn lapsed_record(&self) -> Record {
        Record::Unknown {
            fingerprint: self.fingerprint,
            since_ms: self.now_ms,
            cause: UnknownCause::LeaseLapsed,
        }
    }
}

/// What `begin` gives an arriving guarded request (a typed lock result, as Pingora's cache lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// This request owns the key with its token: execute it upstream.
    Owner,
    /// Replay this stored response.
    Replay(StoredResponse),
    /// Another request with this key still runs.
    InFlight { retry_after: Duration },
    /// The key belongs to a different request.
    Mismatch,
    /// The key's outcome is unknown.
    Unknown(UnknownCause),
}

impl From<Decision> for Begin {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Execute | Decision::TakeOver => Begin::Owner,
            Decision::MarkUnknown => Begin::Unknown(UnknownCause::LeaseLapsed),
            Decision::InFlight { retry_after } => Begin::InFlight { retry_after },
            Decision::Mismatch => Begin::Mismatch,
            Decision::Replay(response) => Begin::Replay(response),
            Decision::Unknown(cause) => Begin::Unknown(cause),
        }
    }
}

/// The record store (spec §4). Every operation is one atomic step (one round trip for Redis);
/// `complete`, `release` and `renew` are compare-and-set on the owner's token, so a proxy whose
/// lease lapsed can never overwrite or delete a newer owner's record.
pub trait Store: Send + Sync + 'static {
    /// Decides an arriving guarded request and applies the decision (spec §4's table).
    fn begin(&self, request: &BeginRequest<'_>) -> impl Future<Output = Result<Begin, StoreError>> + Send;

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

/// The store chosen by the configuration.
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Memory($store) => $call.await,
            AnyStore::Redis($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        dispatch!(self, s => s.begin(request))
    }
    async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        dispatch!(self, s => s.complete(key, token, record))
    }
    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        dispatch!(self, s => s.release(key, token))
    }
    async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        dispatch!(self, s => s.renew(key, token, lock_ttl))
    }
    async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
        dispatch!(self, s => s.lookup(key))
    }
    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        dispatch!(self, s => s.clear(key))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping())
    }
}

impl AnyStore {
    /// Which store this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Memory(_) => "memory",
            AnyStore::Redis(s) if s.is_cluster() => "redis-cluster",
            AnyStore::Redis(_) => "redis",
        }
    }
}
