//! Where each key's newest frame is (docs/behaviour.md §11.1): digest → segment, offset,
//! length and expiry, in memory (56 bytes per key with the digest, before the map's slack).
//! Rebuilt by scanning the segments when the store opens.
//!
//! The writer is its only writer: it changes the index right after the flush that made the
//! change durable, before it answers. A reader that comes between sees the index one flush
//! behind; that only sends a request that may take a key to the writer, which decides it again.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Independently locked maps: one growing (rehashing) holds up a 64th of the keys.
pub const SHARDS: usize = 64;
/// The bit of [`Entry::segment`] that marks a damaged record.
const DAMAGED: u32 = 1 << 31;

/// Where a key's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub expires_at_ms: u64,
    /// The segment's number; the top bit set: the record there is damaged.
    segment: u32,
    /// The frame's length.
    pub len: u32,
}

impl Entry {
    pub fn new(segment: u32, offset: u64, len: u32, expires_at_ms: u64, damaged: bool) -> Self {
        Self {
            offset,
            expires_at_ms,
            segment: (segment & !DAMAGED) | if damaged { DAMAGED } else { 0 },
            len,
        }
    }

    pub fn segment(&self) -> u32 {
        self.segment & !DAMAGED
    }

    /// Whether the key's record was found damaged (the key answers `Corrupt`).
    pub fn damaged(&self) -> bool {
        self.segment & DAMAGED != 0
    }
}

/// One shard: digest → entry.
type Shard = HashMap<[u8; 32], Entry>;

pub struct Index {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Index {
    fn default() -> Self {
        Self::from_shards((0..SHARDS).map(|_| HashMap::new()).collect())
    }
}

/// Which shard holds `digest`.
pub fn shard_of(digest: &[u8; 32]) -> usize {
    usize::from(digest[0]) % SHARDS
}

impl Index {
    /// An index of maps built elsewhere (at open), shard `i` holding the digests of [`shard_of`] `i`.
    pub fn from_shards(shards: Vec<Shard>) -> Self {
        Self {
            shards: shards.into_iter().map(Mutex::new).collect(),
        }
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        // Every change is one insert or remove: a poisoned shard is still consistent.
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, digest: &[u8; 32]) -> Option<Entry> {
        self.shard(shard_of(digest)).get(digest).copied()
    }

    /// Applies a durable change: the key's newest frame is `entry`, or it has none. Returns
    /// the entry it replaced.
    pub fn set(&self, digest: &[u8; 32], entry: Option<Entry>) -> Option<Entry> {
        let mut shard = self.shard(shard_of(digest));
        match entry {
            Some(entry) => shard.insert(*digest, entry),
            None => shard.remove(digest),
        }
    }

    /// Removes the entries of shard `i` that `drop` picks, handing each to it once more.
    pub fn retain_shard(&self, i: usize, mut drop: impl FnMut(&Entry) -> bool, mut dropped: impl FnMut(&Entry)) {
        self.shard(i % SHARDS).retain(|_, entry| {
            let remove = drop(entry);
            if remove {
                dropped(entry);
            }
            !remove
        });
    }
}
