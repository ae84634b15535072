//! The embedded store: one process's records in memory, with the same semantics, TTLs and leases
//! as Redis. Bounded: expired records are evicted in expiry order, and a full store refuses new
//! keys (`StoreError::Full`, answered like an unavailable store) rather than forget a live one.
//!
//! The records are split over [`SHARDS`] independently locked maps by the first byte of the
//! key's digest: a map that grows (rehashes) holds up only the keys of its shard, for a
//! fraction of the time one map of every record would (at millions of records, hundreds of
//! milliseconds otherwise).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Begin, BeginRequest, KeyState, Store, StoreError};
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Record, StorageKey};

struct Entry {
    record: Record,
    expires_at: Instant,
    lease: Option<(LeaseToken, Instant)>,
}

impl Entry {
    fn lease_left(&self, now: Instant) -> Option<Duration> {
        self.lease
            .and_then(|(_, until)| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    fn owned_by(&self, token: LeaseToken) -> bool {
        matches!(self.record, Record::InFlight { owner, .. } if owner == token)
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<StorageKey, Entry>,
    /// Expiry order; an item is stale when its entry was replaced or removed since.
    expiries: BinaryHeap<Reverse<(Instant, StorageKey)>>,
}

impl Inner {
    /// Drops records whose `key_ttl` has passed.
    fn evict_expired(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.expiries.pop() else {
                break;
            };
            if self.entries.get(&key).is_some_and(|e| e.expires_at == at) {
                self.entries.remove(&key);
            }
        }
        // Stale heap items (cleared keys) are dropped as they surface; bound the heap too.
        if self.expiries.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.expiries
                .retain(|Reverse((at, key))| entries.get(key).is_some_and(|e| e.expires_at == *at));
        }
    }

    fn live(&self, key: &StorageKey, now: Instant) -> Option<&Entry> {
        self.entries.get(key).filter(|e| e.expires_at > now)
    }

    fn live_mut(&mut self, key: &StorageKey, now: Instant) -> Option<&mut Entry> {
        self.entries.get_mut(key).filter(|e| e.expires_at > now)
    }
}

/// How many independently locked maps hold the records: one per value of the digest's first
/// byte. Keys spread evenly, so every shard's map and expiry heap double at about the same
/// record count; the more shards, the shorter each of those stalls (with 64, single requests
/// waited up to 28-62 ms around 1-2 million records; with 256, 8-20 ms).
pub const SHARDS: usize = 256;

/// Records in this process's memory.
pub struct MemoryStore {
    shards: Box<[Mutex<Inner>]>,
    /// Records in all shards (live and not yet evicted), kept with every insert and removal.
    count: AtomicUsize,
    max_entries: usize,
}

/// A shard's lock held, with the store's record count brought up to date when it is released.
struct ShardGuard<'a> {
    inner: MutexGuard<'a, Inner>,
    count: &'a AtomicUsize,
    len_before: usize,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl ShardGuard<'_> {
    /// Records in the whole store, this shard's changes under the lock included.
    fn store_len(&self) -> usize {
        (self.count.load(Ordering::Relaxed) + self.inner.entries.len()).saturating_sub(self.len_before)
    }
}

impl Drop for ShardGuard<'_> {
    fn drop(&mut self) {
        let len = self.inner.entries.len();
        if len > self.len_before {
            self.count.fetch_add(len - self.len_before, Ordering::Relaxed);
        } else if len < self.len_before {
            self.count.fetch_sub(self.len_before - len, Ordering::Relaxed);
        }
    }
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Inner::default())).collect(),
            count: AtomicUsize::new(0),
            max_entries,
        }
    }

    fn lock_shard(&self, shard: usize) -> ShardGuard<'_> {
        // A panic while holding the lock cannot leave an entry half-written (every update is
        // one assignment), so a poisoned lock is still consistent.
        let inner = self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ShardGuard {
            len_before: inner.entries.len(),
            inner,
            count: &self.count,
        }
    }

    fn lock(&self, key: &StorageKey) -> ShardGuard<'_> {
        self.lock_shard(usize::from(key.digest()[0]) % SHARDS)
    }

    /// Number of live and not yet evicted records.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn begin_now(&self, request: &BeginRequest<'_>, now: Instant) -> Result<Begin<LeaseToken>, StoreError> {
        if self.len() >= self.max_entries {
            // Full, unless other shards hold expired records: evict them all (one shard locked
            // at a time) before refusing a new key.
            for shard in 0..SHARDS {
                self.lock_shard(shard).evict_expired(now);
            }
        }
        let mut inner = self.lock(request.key);
        inner.evict_expired(now);
        let existing = inner.live(request.key, now).map(|e| Existing {
            record: e.record.clone(),
            lease_left: e.lease_left(now),
        });
        let decision = decide(existing, &request.print, request.unknown_outcome);
        match &decision {
            Decision::Execute => {
                if inner.store_len() >= self.max_entries {
                    return Err(StoreError::Full(self.max_entries));
                }
                let expires_at = now + request.key_ttl;
                inner.entries.insert(
                    request.key.clone(),
                    Entry {
                        record: request.in_flight_record(),
                        expires_at,
                        lease: Some((request.token, now + request.lock_ttl)),
                    },
                );
                inner.expiries.push(Reverse((expires_at, request.key.clone())));
            }
            Decision::TakeOver => {
                if let Some(entry) = inner.live_mut(request.key, now) {
                    entry.record = request.in_flight_record();
                    entry.lease = Some((request.token, now + request.lock_ttl));
                }
            }
            Decision::MarkUnknown => {
                if let Some(entry) = inner.live_mut(request.key, now) {
                    entry.record = request.lapsed_record();
                    entry.lease = None;
                }
            }
            Decision::InFlight { .. }
            | Decision::Mismatch
            | Decision::Replay(_)
            | Decision::Unknown(_)
            | Decision::Verify(_) => {}
        }
        Ok(Begin::applied(decision, request.token))
    }
}

impl Store for MemoryStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
        self.begin_now(request, Instant::now())
    }

    async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        // Kept for up to `key_ttl`: its own exact-size copy, not slices of connection buffers.
        let record = record.detached();
        let now = Instant::now();
        let mut inner = self.lock(key);
        match inner.live_mut(key, now) {
            Some(entry) if entry.owned_by(token) => {
                entry.record = record;
                entry.lease = None;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock(key);
        if inner.live(key, now).is_some_and(|e| e.owned_by(token)) {
            inner.entries.remove(key);
            return Ok(true);
        }
        Ok(false)
    }

    async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock(key);
        match inner.live_mut(key, now) {
            Some(entry) if entry.owned_by(token) => {
                entry.lease = Some((token, now + lock_ttl));
                if let Record::InFlight { lease_until_ms, .. } = &mut entry.record {
                    *lease_until_ms = unix_ms().saturating_add(lock_ttl.as_millis() as u64);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
        let now = Instant::now();
        let inner = self.lock(key);
        Ok(inner.live(key, now).map(|e| KeyState {
            existing: Existing {
                record: e.record.clone(),
                lease_left: e.lease_left(now),
            },
            expires_in: Some(e.expires_at.saturating_duration_since(now)),
        }))
    }

    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock(key);
        let live = inner.live(key, now).is_some();
        inner.entries.remove(key);
        Ok(live)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UnknownOutcome;
    use crate::idempotency::Fingerprint;

    /// Whether `begun` made `request` the key's owner, with its own token.
    fn owns(begun: Result<Begin<LeaseToken>, StoreError>, request: &BeginRequest<'_>) -> bool {
        begun == Ok(Begin::Owner(request.token))
    }

    fn request(key: &StorageKey, key_ttl: Duration) -> BeginRequest<'_> {
        BeginRequest {
            key,
            print: crate::idempotency::Print::Whole(Fingerprint::bytes([1; 32])),
            token: LeaseToken::random(),
            key_ttl,
            lock_ttl: Duration::from_secs(1),
            unknown_outcome: UnknownOutcome::Reject,
            now_ms: 0,
        }
    }

    #[test]
    fn expired_records_are_evicted_and_a_full_store_refuses_new_keys() {
        let store = MemoryStore::new(2);
        let now = Instant::now();
        let keys: Vec<_> = (0..3).map(|i| StorageKey::new("t:", "r", b"", &[i])).collect();
        let begun = request(&keys[0], Duration::from_secs(1));
        assert!(owns(store.begin_now(&begun, now), &begun));
        let begun = request(&keys[1], Duration::from_secs(60));
        assert!(owns(store.begin_now(&begun, now), &begun));
        assert_eq!(
            store.begin_now(&request(&keys[2], Duration::from_secs(60)), now),
            Err(StoreError::Full(2))
        );
        let later = now + Duration::from_secs(2);
        let begun = request(&keys[2], Duration::from_secs(60));
        assert!(owns(store.begin_now(&begun, later), &begun));
        assert_eq!(store.len(), 2);
    }

    #[tokio::test]
    async fn the_record_count_follows_every_shard() {
        let store = MemoryStore::new(10_000);
        let now = Instant::now();
        let keys: Vec<_> = (0..500u32)
            .map(|i| StorageKey::new("t:", "r", b"", &i.to_be_bytes()))
            .collect();
        let shards: std::collections::HashSet<_> = keys.iter().map(|k| k.digest()[0] as usize % SHARDS).collect();
        assert!(shards.len() > SHARDS / 2, "keys spread over the shards");
        let mut owners = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let ttl = Duration::from_secs(if i % 2 == 0 { 1 } else { 60 });
            let begun = request(key, ttl);
            assert!(owns(store.begin_now(&begun, now), &begun));
            owners.push(begun.token);
        }
        assert_eq!(store.len(), 500);
        assert_eq!(store.release(&keys[1], owners[1]).await, Ok(true));
        assert_eq!(store.clear(&keys[3]).await, Ok(true));
        assert_eq!(store.len(), 498);
        // The 250 one-second records expire; each shard drops its own when next used, and a
        // store at its limit sweeps them all first.
        let later = now + Duration::from_secs(2);
        let small = MemoryStore::new(3);
        for key in &keys[..3] {
            assert_eq!(
                store
                    .begin_now(&request(key, Duration::from_secs(1)), later)
                    .map(|_| ()),
                Ok(())
            );
            let begun = request(key, Duration::from_secs(1));
            assert!(owns(small.begin_now(&begun, now), &begun));
        }
        assert_eq!(
            small.begin_now(&request(&keys[3], Duration::from_secs(1)), now),
            Err(StoreError::Full(3))
        );
        let begun = request(&keys[3], Duration::from_secs(1));
        assert!(owns(small.begin_now(&begun, later), &begun));
        assert_eq!(small.len(), 1);
    }
}
