//! Opening the store: every segment is read in order and the index rebuilt from its frames
//! (docs/behaviour.md §11.4).
//!
//! - A frame whose header, payload and trailer all hold is applied: a record sets its key's
//!   entry, a deletion removes it, a damaged-record marker makes the key `Corrupt`.
//! - A frame that fails a check but whose header or trailer still holds names its key: the key
//!   is `Corrupt` (logged at error) unless a later frame sets it again.
//! - Bytes no check can make sense of are skipped up to the next frame whose header holds, and
//!   logged at error (with the keys any trailer in them names).
//! - At the end of the newest segment, a frame cut short, or bytes that hold no trailer up to the
//!   end, are a torn tail: the write that left them was never acknowledged (its flush had not
//!   returned). The file is cut back to the last whole frame, logged at warn.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::format::{self, Header, Kind, OVERHEAD};
use super::index::{shard_of, Entry, SHARDS};
use super::segment::{self, Stats};

/// One thing found in a segment, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A whole, intact frame.
    Frame { offset: usize, head: Header },
    /// A damaged frame whose key is known (from its header or its trailer).
    Damaged {
        offset: usize,
        len: usize,
        digest: [u8; 32],
        expires_at_ms: u64,
    },
    /// Damaged bytes naming no key.
    Unnamed { offset: usize, len: usize },
}

/// A segment's contents, and where its valid part ends.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub found: Vec<Found>,
    /// The length to keep: shorter than the file only when the newest segment has a torn tail.
    pub keep: usize,
}

/// Reads the frames of a segment's bytes; `newest`: it is the one appended to (its tail may be
/// torn). Never panics, whatever the bytes.
pub fn scan(bytes: &[u8], newest: bool) -> Scan {
    let mut scan = Scan {
        found: Vec::new(),
        keep: bytes.len(),
    };
    let mut at = 0;
    while at < bytes.len() {
        if let Some(head) = format::header(&bytes[at..]) {
            let end = at.saturating_add(head.frame_len());
            if end <= bytes.len() {
                match format::payload(&head, &bytes[at..end]) {
                    Ok(_) => scan.found.push(Found::Frame { offset: at, head }),
                    Err(_) => scan
                        .found
                        .push(damaged(at, head.frame_len(), head.digest, head.expires_at_ms)),
                }
                at = end;
                continue;
            }
            if newest {
                scan.keep = at;
                return scan;
            }
            scan.found
                .push(damaged(at, bytes.len() - at, head.digest, head.expires_at_ms));
            return scan;
        }
        let next = format::next_header(bytes, at + 1).unwrap_or(bytes.len());
        let trailers = format::trailers(&bytes[at..next]);
        for (end, t) in &trailers {
            let len = (OVERHEAD + t.len as usize).min(*end);
            scan.found.push(damaged(at + end - len, len, t.digest, t.expires_at_ms));
        }
        let named_end = trailers.last().map_or(at, |(end, _)| at + end);
        if next == bytes.len() && newest {
            scan.keep = named_end;
            return scan;
        }
        if trailers.is_empty() {
            scan.found.push(Found::Unnamed {
                offset: at,
                len: next - at,
            });
        }
        at = next;
    }
    scan
}

fn damaged(offset: usize, len: usize, digest: [u8; 32], expires_at_ms: u64) -> Found {
    Found::Damaged {
        offset,
        len,
        digest,
        expires_at_ms,
    }
}

/// What opening found: the index's shards, each segment's stats, and the live frames' bytes.
#[derive(Default)]
pub struct Recovered {
    pub shards: Vec<HashMap<[u8; 32], Entry>>,
    pub segments: BTreeMap<u32, Stats>,
    pub live_bytes: u64,
    pub records: u64,
    /// Damaged records found (segment, offset, key), logged once every segment is read: only
    /// then is it known whether a newer frame of the key superseded the damaged one.
    damaged: Vec<(u32, usize, [u8; 32])>,
}

impl Recovered {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            ..Self::default()
        }
    }

    /// The key's entry is now `entry` (or none), in place of the one before.
    fn set(&mut self, digest: &[u8; 32], entry: Option<Entry>) {
        let shard = &mut self.shards[shard_of(digest)];
        let old = match entry {
            Some(entry) => shard.insert(*digest, entry),
            None => shard.remove(digest),
        };
        if let Some(old) = old {
            if let Some(stats) = self.segments.get_mut(&old.segment()) {
                stats.remove(old.len);
            }
            self.live_bytes = self.live_bytes.saturating_sub(u64::from(old.len));
            self.records -= 1;
        }
        if let Some(new) = entry {
            if let Some(stats) = self.segments.get_mut(&new.segment()) {
                stats.add(new.len);
            }
            self.live_bytes += u64::from(new.len);
            self.records += 1;
        }
    }

    /// Applies one segment's scan, in order.
    fn apply(&mut self, id: u32, scan: &Scan, now_ms: u64) {
        for found in &scan.found {
            match *found {
                Found::Frame { offset, head } => {
                    let len = head.frame_len();
                    self.stats(id).wrote(0, head.expires_at_ms, head.kind == Kind::Deleted);
                    let entry = (head.kind != Kind::Deleted && head.expires_at_ms > now_ms).then(|| {
                        Entry::new(
                            id,
                            offset as u64,
                            len as u32,
                            head.expires_at_ms,
                            head.kind == Kind::Damaged,
                        )
                    });
                    if head.kind == Kind::Damaged && entry.is_some() {
                        self.damaged.push((id, offset, head.digest));
                    }
                    self.set(&head.digest, entry);
                }
                Found::Damaged {
                    offset,
                    len,
                    digest,
                    expires_at_ms,
                } => {
                    self.stats(id).wrote(0, expires_at_ms, false);
                    self.damaged.push((id, offset, digest));
                    let entry = (expires_at_ms > now_ms)
                        .then(|| Entry::new(id, offset as u64, len as u32, expires_at_ms, true));
                    self.set(&digest, entry);
                }
                Found::Unnamed { offset, len } => tracing::error!(
                    segment = %segment_name(id),
                    offset,
                    bytes = len,
                    "disk store: damaged bytes that name no key were skipped (a record in them is lost)"
                ),
            }
        }
        self.stats(id).size = scan.keep as u64;
    }

    fn stats(&mut self, id: u32) -> &mut Stats {
        self.segments.entry(id).or_default()
    }
}

fn segment_name(id: u32) -> String {
    format!("{id:08}{}", segment::SUFFIX)
}

impl Recovered {
    /// Logs the damaged records found: at error those whose key now answers `503`, at warn those
    /// a newer frame of their key superseded (or that expired), which change nothing.
    fn log_damaged(&self) {
        for (id, offset, digest) in &self.damaged {
            let key = hex::encode(&digest[..6]);
            let segment = segment_name(*id);
            let current = self.shards[shard_of(digest)].get(digest);
            if current.is_some_and(|entry| entry.damaged()) {
                tracing::error!(%key, %segment, offset, "disk store: damaged record; its key answers 503 until cleared or expired");
            } else {
                tracing::warn!(%key, %segment, offset, "disk store: damaged record skipped: a newer record of its key supersedes it, or it expired");
            }
        }
    }
}

/// Reads every segment of `dir` (numbers `ids`, in order), cutting a torn tail off the newest.
pub fn recover(dir: &Path, ids: &[u32], now_ms: u64) -> std::io::Result<Recovered> {
    let mut recovered = Recovered::new();
    for (i, &id) in ids.iter().enumerate() {
        let path = segment::path(dir, id);
        let bytes = std::fs::read(&path)?;
        let newest = i + 1 == ids.len();
        recovered.stats(id);
        let scan = scan(&bytes, newest);
        recovered.apply(id, &scan, now_ms);
        if scan.keep < bytes.len() {
            // Zeros alone are the space the writer prepares ahead of its appends.
            if bytes[scan.keep..].iter().any(|b| *b != 0) {
                tracing::warn!(
                    file = %path.display(),
                    bytes = bytes.len() - scan.keep,
                    "disk store: discarded a torn tail (a write that was never acknowledged)"
                );
            }
            segment::open(dir, id, false)?.set_len(scan.keep as u64)?;
        }
    }
    recovered.log_damaged();
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(out: &mut Vec<u8>, n: u8, payload: &[u8]) -> usize {
        let at = out.len();
        format::encode(out, Kind::Record, &[n; 32], 10, payload);
        at
    }

    fn keys(scan: &Scan) -> Vec<(char, u8)> {
        scan.found
            .iter()
            .map(|f| match f {
                Found::Frame { head, .. } => ('v', head.digest[0]),
                Found::Damaged { digest, .. } => ('d', digest[0]),
                Found::Unnamed { .. } => ('u', 0),
            })
            .collect()
    }

    #[test]
    fn a_flipped_byte_anywhere_names_its_key_and_spares_the_others() {
        let mut bytes = Vec::new();
        frame(&mut bytes, 1, b"one");
        let second = frame(&mut bytes, 2, b"two two");
        let third = frame(&mut bytes, 3, b"three");
        for at in second..third {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            for newest in [false, true] {
                let scan = scan(&damaged, newest);
                assert_eq!(keys(&scan), [('v', 1), ('d', 2), ('v', 3)], "byte {at}");
                assert_eq!(scan.keep, bytes.len());
            }
        }
        for at in third..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            let scan = scan(&damaged, true);
            assert_eq!(keys(&scan), [('v', 1), ('v', 2), ('d', 3)], "last frame, byte {at}");
            assert_eq!(scan.keep, bytes.len(), "a damaged last frame is kept (it is whole)");
        }
    }

    #[test]
    fn a_torn_tail_of_the_newest_segment_is_cut_and_elsewhere_named() {
        let mut bytes = Vec::new();
        frame(&mut bytes, 1, b"one");
        let second = frame(&mut bytes, 2, b"two");
        for len in second + 1..bytes.len() {
            let torn = &bytes[..len];
            let scan = scan(torn, true);
            assert_eq!(keys(&scan), [('v', 1)], "cut at {len}");
            assert_eq!(scan.keep, second);
        }
        let mut zeros = bytes[..second].to_vec();
        zeros.extend([0u8; 300]);
        assert_eq!(scan(&zeros, true).keep, second, "a zero-filled tail");
        let scan = scan(&bytes[..bytes.len() - 1], false);
        assert_eq!(keys(&scan), [('v', 1), ('d', 2)], "an older segment is never cut");
    }

    #[test]
    fn bytes_naming_no_key_are_skipped_and_reported() {
        let mut bytes = vec![0xAB; 40];
        frame(&mut bytes, 1, b"one");
        let scan = scan(&bytes, true);
        assert_eq!(keys(&scan), [('u', 0), ('v', 1)]);
    }
}
