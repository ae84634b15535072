//! Settled records kept in memory for replays (docs/behaviour.md §11): a retry storm replays one
//! key many times, and a replay from memory costs no `pread` nor decode.
//!
//! Only `Completed` and `Unknown` records are kept: they change only when cleared or expired.
//! Every entry carries its expiry (checked on each hit); a clear removes the key, and a
//! generation counter keeps a read that began before the clear from putting the cleared record
//! back. Small: [`ENTRIES`] records of at most [`MAX_RECORD_BYTES`] each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::idempotency::Record;

/// Most records kept.
pub const ENTRIES: usize = 1024;
/// Largest encoded record kept (bigger ones are read from disk each time).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
const SHARDS: usize = 16;

/// One shard: settled records by digest.
type Shard = HashMap<[u8; 32], Cached>;

struct Cached {
    expires_at_ms: u64,
    record: Record,
}

pub struct ReplayCache {
    shards: Box<[Mutex<Shard>]>,
    /// Moves on at every clear: a record read under an older generation is not kept.
    generation: AtomicU64,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            generation: AtomicU64::new(0),
        }
    }
}

impl ReplayCache {
    fn shard(&self, key: &[u8; 32]) -> std::sync::MutexGuard<'_, Shard> {
        // An entry is one insert or remove: a panic elsewhere cannot leave it half-written.
        self.shards[usize::from(key[0]) % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The generation to pass to [`keep`](Self::keep) for a record read from now on.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The key's settled record, unless it has expired at `now_ms`.
    pub fn get(&self, key: &[u8; 32], now_ms: u64) -> Option<(u64, Record)> {
        let shard = self.shard(key);
        let cached = shard.get(key).filter(|c| c.expires_at_ms > now_ms)?;
        Some((cached.expires_at_ms, cached.record.clone()))
    }

    /// Keeps `record` if it is settled and small, and no clear happened since `generation`.
    pub fn keep(&self, key: &[u8; 32], expires_at_ms: u64, record: &Record, encoded_len: usize, generation: u64) {
        if matches!(record, Record::InFlight { .. }) || encoded_len > MAX_RECORD_BYTES {
            return;
        }
        let mut shard = self.shard(key);
        if self.generation() != generation {
            return;
        }
        if shard.len() >= ENTRIES / SHARDS && !shard.contains_key(key) {
            if let Some(evicted) = shard.keys().next().copied() {
                shard.remove(&evicted);
            }
        }
        shard.insert(
            *key,
            Cached {
                expires_at_ms,
                record: record.detached(),
            },
        );
    }

    /// Forgets the key (before and after it is cleared) and moves the generation on.
    pub fn forget(&self, key: &[u8; 32]) {
        let mut shard = self.shard(key);
        self.generation.fetch_add(1, Ordering::AcqRel);
        shard.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::{Fingerprint, UnknownCause};

    fn unknown() -> Record {
        Record::Unknown {
            fingerprint: Fingerprint::bytes([1; 32]),
            since_ms: 1,
            cause: UnknownCause::Timeout,
        }
    }

    #[test]
    fn keeps_settled_records_until_they_expire_or_are_forgotten() {
        let cache = ReplayCache::default();
        let generation = cache.generation();
        cache.keep(&[1; 32], 100, &unknown(), 43, generation);
        assert_eq!(cache.get(&[1; 32], 99), Some((100, unknown())));
        assert_eq!(cache.get(&[1; 32], 100), None, "expired");
        cache.forget(&[1; 32]);
        assert_eq!(cache.get(&[1; 32], 0), None);
        // A read that began before the clear does not put the record back.
        cache.keep(&[1; 32], 100, &unknown(), 43, generation);
        assert_eq!(cache.get(&[1; 32], 0), None);
        let in_flight = Record::InFlight {
            fingerprint: Fingerprint::bytes([1; 32]),
            owner: crate::idempotency::LeaseToken([2; 16]),
            started_at_ms: 0,
            lease_until_ms: 0,
        };
        cache.keep(&[2; 32], 100, &in_flight, 66, cache.generation());
        assert_eq!(cache.get(&[2; 32], 0), None, "in-flight records are never kept");
        cache.keep(&[3; 32], 100, &unknown(), MAX_RECORD_BYTES + 1, cache.generation());
        assert_eq!(cache.get(&[3; 32], 0), None, "large records are read from disk");
    }

    #[test]
    fn stays_within_its_size() {
        let cache = ReplayCache::default();
        for i in 0..4 * ENTRIES {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            cache.keep(&key, u64::MAX, &unknown(), 43, cache.generation());
        }
        let kept: usize = cache
            .shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(kept <= ENTRIES, "{kept}");
    }
}
