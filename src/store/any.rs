//! The store the configuration chose, as one type (no boxing, no dynamic dispatch), with the
//! registry of the requests waiting for its keys (docs/behaviour.md §15): every completion,
//! release and clear that settles a key wakes this process's waiters at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::subscriber::Subscription;
use super::waiters::{Waiters, Watch, Woken};
use super::{Begin, BeginRequest, DiskStore, KeyState, MemoryStore, RedisStore, Store, StoreError};
use crate::error::Chain;
use crate::idempotency::{LeaseToken, Record, StorageKey};

/// The store chosen by the configuration, and its waiters.
pub struct AnyStore {
    kind: Kind,
    waiters: Arc<Waiters>,
}

/// Which store it is.
enum Kind {
    Disk(DiskStore),
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl From<DiskStore> for AnyStore {
    fn from(store: DiskStore) -> Self {
        Self {
            kind: Kind::Disk(store),
            waiters: Waiters::new(),
        }
    }
}

impl From<MemoryStore> for AnyStore {
    fn from(store: MemoryStore) -> Self {
        Self {
            kind: Kind::Memory(store),
            waiters: Waiters::new(),
        }
    }
}

impl From<RedisStore> for AnyStore {
    /// The Redis store wakes the same waiters from its subscription.
    fn from(store: RedisStore) -> Self {
        Self {
            waiters: store.waiters().clone(),
            kind: Kind::Redis(store),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match &$self.kind {
            Kind::Disk($store) => $call.await,
            Kind::Memory($store) => $call.await,
            Kind::Redis($store) => $call.await,
        }
    };
}

impl AnyStore {
    /// Wakes `key`'s waiters in this process if `settled` says its record changed.
    fn woken_if(&self, key: &StorageKey, settled: Result<bool, StoreError>) -> Result<bool, StoreError> {
        if settled == Ok(true) {
            self.waiters.settled(key.digest());
        }
        settled
    }

    /// Starts waiting for `key` to settle: registered in this process and, with Redis,
    /// subscribed to the key's channel, before the waiter looks at the key. A subscription that
    /// fails is logged: the waiter is then woken by this process's settlements only, or at its
    /// deadline.
    pub async fn watch(&self, key: &StorageKey) -> KeyWatch {
        let watch = self.waiters.watch(key.digest());
        let subscription = match &self.kind {
            Kind::Redis(redis) => match redis.subscribe(key).await {
                Ok(subscription) => Some(subscription),
                Err(err) => {
                    tracing::warn!(key = %key.short_hash(), error = %Chain(&err), "not subscribed to the key's channel: the waiter is woken by this proxy's completions or its wait_timeout");
                    None
                }
            },
            _ => None,
        };
        KeyWatch { watch, subscription }
    }
}

/// A request waiting for a key: see [`AnyStore::watch`].
pub struct KeyWatch {
    watch: Watch,
    subscription: Option<Subscription>,
}

impl KeyWatch {
    /// Waits until the key settles, the subscription is lost (then made again before this
    /// returns, so that the waiter's next look is covered), or `deadline`.
    pub async fn wake(&mut self, deadline: Instant) -> Woken {
        let woken = self.watch.wake(deadline).await;
        if let (Woken::Lost, Some(subscription)) = (woken, &self.subscription) {
            if let Err(err) = subscription.renew().await {
                tracing::warn!(error = %Chain(&err), "subscription not made again: the waiter is woken by this proxy's completions or its wait_timeout");
            }
        }
        woken
    }
}

impl Store for AnyStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
        dispatch!(self, s => s.begin(request))
    }
    async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        let completed = dispatch!(self, s => s.complete(key, token, record));
        self.woken_if(key, completed)
    }
    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let released = dispatch!(self, s => s.release(key, token));
        self.woken_if(key, released)
    }
    async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        dispatch!(self, s => s.renew(key, token, lock_ttl))
    }
    async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
        dispatch!(self, s => s.lookup(key))
    }
    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let cleared = dispatch!(self, s => s.clear(key));
        self.woken_if(key, cleared)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping())
    }
}

impl AnyStore {
    /// Which store this is, for logs.
    pub fn kind(&self) -> &'static str {
        match &self.kind {
            Kind::Disk(_) => "disk",
            Kind::Memory(_) => "memory",
            Kind::Redis(s) if s.is_cluster() => "redis-cluster",
            Kind::Redis(s) if s.is_sentinel() => "redis-sentinel",
            Kind::Redis(_) => "redis",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UnknownOutcome;
    use crate::idempotency::{Fingerprint, Print};
    use crate::store::lease::Claim;
    use crate::store::Lease;

    fn claim(key: &StorageKey) -> Claim<'_> {
        Claim {
            key,
            print: Print::Whole(Fingerprint::bytes([1; 32])),
            key_ttl: Duration::from_secs(60),
            lock_ttl: Duration::from_secs(30),
            unknown_outcome: UnknownOutcome::Retry,
        }
    }

    async fn owner(store: &Arc<AnyStore>, key: &StorageKey) -> Lease<AnyStore> {
        match Lease::begin(store, claim(key)).await {
            Ok(Begin::Owner(lease)) => lease,
            other => panic!("not the owner: {:?}", other.map(|b| b.map_owner(|_| ()))),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Releasing and dropping a lease (which settles itself) both wake the key's waiters.
    #[tokio::test]
    async fn every_settlement_of_a_key_wakes_its_waiters() {
        let store = Arc::new(AnyStore::from(MemoryStore::new(10)));
        let key = StorageKey::new("t:", "r", b"", b"woken");
        let lease = owner(&store, &key).await;
        let mut watch = store.watch(&key).await;
        assert_eq!(lease.release().await, Ok(true));
        assert_eq!(watch.wake(soon()).await, Woken::Settled);
        let lease = owner(&store, &key).await;
        drop(lease);
        assert_eq!(
            watch.wake(soon()).await,
            Woken::Settled,
            "a dropped lease settles its key"
        );
        let quiet = Instant::now() + Duration::from_millis(20);
        let other = StorageKey::new("t:", "r", b"", b"other");
        let lease = owner(&store, &other).await;
        assert_eq!(lease.release().await, Ok(true));
        assert_eq!(watch.wake(quiet).await, Woken::TimedOut, "another key's settlement");
    }
}
