//! The embedded store: one process's records in memory, with the same semantics, TTLs and leases
//! as Redis. Bounded: expired records are evicted in expiry order, and a full store refuses new
//! keys (`StoreError::Full`, answered like an unavailable store) rather than forget a live one.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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

/// Records in this process's memory.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_entries,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half-written (every update is
        // one assignment), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Number of live and not yet evicted records.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn begin_now(&self, request: &BeginRequest<'_>, now: Instant) -> Result<Begin, StoreError> {
        let mut inner = self.lock();
        inner.evict_expired(now);
        let existing = inner.live(request.key, now).map(|e| Existing {
            record: e.record.clone(),
            lease_left: e.lease_left(now),
        });
        let decision = decide(existing, &request.fingerprint, request.unknown_outcome);
        match &decision {
            Decision::Execute => {
                if inner.entries.len() >= self.max_entries {
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
            Decision::InFlight { .. } | Decision::Mismatch | Decision::Replay(_) | Decision::Unknown(_) => {}
        }
        Ok(decision.into())
    }
}

impl Store for MemoryStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.begin_now(request, Instant::now())
    }

    async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        // Kept for up to `key_ttl`: its own exact-size copy, not slices of connection buffers.
        let record = record.detached();
        let now = Instant::now();
        let mut inner = self.lock();
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
        let mut inner = self.lock();
        if inner.live(key, now).is_some_and(|e| e.owned_by(token)) {
            inner.entries.remove(key);
            return Ok(true);
        }
        Ok(false)
    }

    async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
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
        let inner = self.lock();
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
        let mut inner = self.lock();
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

    fn request(key: &StorageKey, key_ttl: Duration) -> BeginRequest<'_> {
        BeginRequest {
            key,
            fingerprint: Fingerprint([1; 32]),
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
        assert_eq!(
            store.begin_now(&request(&keys[0], Duration::from_secs(1)), now),
            Ok(Begin::Owner)
        );
        assert_eq!(
            store.begin_now(&request(&keys[1], Duration::from_secs(60)), now),
            Ok(Begin::Owner)
        );
        assert_eq!(
            store.begin_now(&request(&keys[2], Duration::from_secs(60)), now),
            Err(StoreError::Full(2)).map(|_: ()| Begin::Owner)
        );
        let later = now + Duration::from_secs(2);
        assert_eq!(
            store.begin_now(&request(&keys[2], Duration::from_secs(60)), later),
            Ok(Begin::Owner)
        );
        assert_eq!(store.len(), 2);
    }
}
