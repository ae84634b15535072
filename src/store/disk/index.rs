//! Where each key's record is (docs/behaviour.md §11): digest → creation time, in memory.
//!
//! Records are keyed on disk by creation time, then digest, so that the records a batch creates
//! sit side by side at the end of the B-tree: a commit rewrites a few pages instead of one per
//! write (measured: a third of the flush time and of the CPU per first execution). Finding a
//! key's record then needs its creation time, which this index keeps: about 60 bytes per record,
//! rebuilt from the keys of the `records` table when the store opens.
//!
//! The writer is its only writer: it changes the index right after the commit that changed the
//! table, before it answers. A reader that comes between sees the index one commit behind; that
//! only sends a request that may take a key to the writer, which decides it again.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Independently locked maps: one growing (rehashing) holds up a 64th of the keys.
const SHARDS: usize = 64;

/// One shard: digest → creation time.
type Shard = HashMap<[u8; 32], u64>;

pub struct Index {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Index {
    fn shard(&self, digest: &[u8; 32]) -> MutexGuard<'_, Shard> {
        // Every change is one insert or remove: a poisoned shard is still consistent.
        self.shards[usize::from(digest[0]) % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The creation time (the first half of its table key) of the key's record.
    pub fn get(&self, digest: &[u8; 32]) -> Option<u64> {
        self.shard(digest).get(digest).copied()
    }

    /// Applies a committed change: `Some(created)` the key's record now has that creation time,
    /// `None` it has none.
    pub fn set(&self, digest: &[u8; 32], created: Option<u64>) {
        let mut shard = self.shard(digest);
        match created {
            Some(created) => shard.insert(*digest, created),
            None => shard.remove(digest),
        };
    }

    /// Keys indexed.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or_else(|p| p.into_inner().len(), |s| s.len()))
            .sum()
    }
}
