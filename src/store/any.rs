//! The store the configuration chose, as one type (no boxing, no dynamic dispatch).

use std::time::Duration;

use super::{Begin, BeginRequest, DiskStore, KeyState, MemoryStore, RedisStore, Store, StoreError};
use crate::idempotency::{LeaseToken, Record, StorageKey};

/// The store chosen by the configuration.
pub enum AnyStore {
    Disk(DiskStore),
    Memory(MemoryStore),
    Redis(RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Disk($store) => $call.await,
            AnyStore::Memory($store) => $call.await,
            AnyStore::Redis($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
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
            AnyStore::Disk(_) => "disk",
            AnyStore::Memory(_) => "memory",
            AnyStore::Redis(s) if s.is_cluster() => "redis-cluster",
            AnyStore::Redis(s) if s.is_sentinel() => "redis-sentinel",
            AnyStore::Redis(_) => "redis",
        }
    }
}
