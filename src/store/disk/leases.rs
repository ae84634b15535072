//! The `InFlight` records the writer has made durable, kept in memory by key (docs/behaviour.md
//! §11.1), so that the owner's next write (its completion, release or renewal, which the writer
//! checks against the record's owner) is decided without reading the record back from disk: a
//! first execution then costs no `pread` beyond its arrival's.
//!
//! A record is used only while the index still points at the frame it was kept for (a newer
//! frame, an expiry or a compaction's copy replaces or drops it); it is forgotten when its key
//! gets any other record, and upkeep drops expired ones. Bounded: beyond [`MOST`] leases the
//! writer reads the others from disk as before.

use std::collections::HashMap;

use bytes::Bytes;

use super::index::Entry;
use crate::idempotency::record::STATE_IN_FLIGHT;

/// Most leases kept (each about 200 bytes with its record).
pub const MOST: usize = 65_536;

#[derive(Default)]
pub struct Leases {
    by_key: HashMap<[u8; 32], (Entry, Bytes)>,
}

impl Leases {
    /// The key's newest frame was made durable: keep it if it is an `InFlight` record, else
    /// forget what was kept for the key.
    pub fn published(&mut self, digest: &[u8; 32], change: Option<&(Entry, Bytes)>) {
        match change {
            Some((entry, record)) if !entry.damaged() && record.get(1) == Some(&STATE_IN_FLIGHT) => {
                if self.by_key.len() < MOST || self.by_key.contains_key(digest) {
                    self.by_key.insert(*digest, (*entry, record.clone()));
                }
            }
            _ => {
                self.by_key.remove(digest);
            }
        }
    }

    /// The encoded record of the key's frame at `entry`, if it is kept.
    pub fn get(&self, digest: &[u8; 32], entry: &Entry) -> Option<&Bytes> {
        self.by_key
            .get(digest)
            .filter(|(kept, _)| kept == entry)
            .map(|(_, record)| record)
    }

    /// Forgets the leases whose records have expired at `now_ms`.
    pub fn forget_expired(&mut self, now_ms: u64) {
        self.by_key.retain(|_, (entry, _)| entry.expires_at_ms > now_ms);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::{IN_FLIGHT_LEN, STATE_COMPLETED};

    fn record(state: u8) -> Bytes {
        let mut bytes = vec![2u8; IN_FLIGHT_LEN];
        bytes[1] = state;
        Bytes::from(bytes)
    }

    #[test]
    fn an_in_flight_record_is_kept_until_its_key_gets_another() {
        let mut leases = Leases::default();
        let (key, entry) = ([7u8; 32], Entry::new(1, 64, 100, 10_000, false));
        leases.published(&key, Some(&(entry, record(STATE_IN_FLIGHT))));
        assert_eq!(leases.get(&key, &entry), Some(&record(STATE_IN_FLIGHT)));
        let moved = Entry::new(2, 0, 100, 10_000, false);
        assert_eq!(
            leases.get(&key, &moved),
            None,
            "only while the index points at its frame"
        );
        leases.published(&key, Some(&(moved, record(STATE_COMPLETED))));
        assert_eq!(leases.get(&key, &entry), None);
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn deletions_damage_and_expiry_forget_a_lease() {
        let mut leases = Leases::default();
        let entry = Entry::new(1, 0, 100, 5_000, false);
        for key in [[1u8; 32], [2u8; 32], [3u8; 32]] {
            leases.published(&key, Some(&(entry, record(STATE_IN_FLIGHT))));
        }
        leases.published(&[1u8; 32], None);
        let damaged = Entry::new(1, 0, 100, 5_000, true);
        leases.published(&[2u8; 32], Some(&(damaged, record(STATE_IN_FLIGHT))));
        assert_eq!(leases.len(), 1);
        leases.forget_expired(5_000);
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn beyond_the_bound_new_leases_are_not_kept() {
        let mut leases = Leases::default();
        let entry = Entry::new(1, 0, 100, 5_000, false);
        for n in 0..=MOST as u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_be_bytes());
            leases.published(&key, Some(&(entry, record(STATE_IN_FLIGHT))));
        }
        assert_eq!(leases.len(), MOST);
    }
}
