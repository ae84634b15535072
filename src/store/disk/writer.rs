//! The disk store's one writer (docs/behaviour.md §11.1): a thread that takes every write
//! waiting, appends their frames to the newest segment in one `write`, flushes them
//! (`fdatasync`) itself, and only once that flush returns updates the index and answers each of
//! them: group commit. Before a batch is written the writer yields its core once, so that the
//! requests ready to run there can send their writes and join it. The writes that arrive while
//! a flush runs wait for it, and are the next batch: one flush at a time, as a database's log
//! writer does. On a fast disk the proxy is CPU-bound, and a flush of its own on this thread
//! costs no hand-over to another thread and back (measured in docs/performance.md).
//!
//! Being the only writer is what makes `begin` atomic: the writer reads the key's record (as
//! the batches before, all durable, left it), applies [`decide`] to it and appends the
//! verdict, and no other write can come between (the memory store gets the same from its lock).
//! A batch of lease renewals alone, with nothing before it waiting, is answered without a flush
//! (it becomes durable with the next one): a renewal lost in a crash only makes the dead owner's
//! lease lapse sooner.
//!
//! Between batches it does the upkeep of [`maintain`](Writer::maintain): expired index entries
//! are forgotten, segments nothing needs are deleted, and a sparse one is compacted.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::command::{Answer, Claim, Command, Msg, Op};
use super::delivery::{Answers, Delivery};
use super::format::{self, Kind, OVERHEAD};
use super::index::{Entry, SHARDS};
use super::leases::Leases;
use super::recover::Found;
use super::segment::{self, Stats};
use super::{corrupt, footprint, lease_left_at, Shared};
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Record, RecordError};
use crate::store::{Begin, StoreError};

/// Most writes committed in one batch.
const MAX_BATCH: usize = 4096;
/// How often the writer does its upkeep when writes keep it busy.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Index shards swept for expired entries per upkeep (all of them every 2 s).
const SHARDS_PER_UPKEEP: usize = SHARDS / 8;

/// The segment being appended to.
pub struct Active {
    pub id: u32,
    pub file: Arc<File>,
    /// The file's length: zeros past what is used, written ahead so that a batch's flush
    /// overwrites blocks the file already has (no change of its size or extents to journal:
    /// measured, an `fdatasync` a third as long).
    pub prepared: u64,
    /// Frames written since the last flush (a batch of renewals alone is not flushed).
    pub unflushed: bool,
}

/// Zeros written ahead of the appends at a time (at most a segment's size).
const PREPARE_BYTES: u64 = 4 * 1024 * 1024;
/// What zeros are written from, a slice at a time.
static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

/// A key's newest state in a batch: its entry and encoded record, or deleted.
type Change = Option<(Entry, Bytes)>;

pub struct Writer {
    pub messages: Receiver<Msg>,
    pub shared: Arc<Shared>,
    pub segments: BTreeMap<u32, Stats>,
    pub active: Active,
    /// A segment grows to about this before the next one is started.
    pub segment_bytes: u64,
    pub next_shard: usize,
    /// The durable `InFlight` records, so that their owners' writes need no read.
    pub leases: Leases,
    pub delivery: Delivery,
}

/// A key's record as this batch sees it.
struct Current {
    entry: Entry,
    record: Record,
}

/// One batch's frames and changes, before they are durable.
struct Batch {
    /// The frames, to be written at `base` of the active segment.
    bytes: Vec<u8>,
    base: u64,
    segment: u32,
    /// Each changed key's newest entry and encoded record (`None`: deleted).
    changed: HashMap<[u8; 32], Change>,
    /// The expiries of the deletions written.
    deleted_expiry: u64,
    max_expiry: u64,
    /// The change to the live frames' bytes.
    live_delta: i64,
    now_ms: u64,
}

impl Writer {
    /// Serves writes until the store stops.
    pub fn run(mut self) {
        let mut next_upkeep = Instant::now() + UPKEEP_INTERVAL;
        let mut commands = Vec::new();
        loop {
            let wait = next_upkeep.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = self.take(message, &mut commands);
            if !stop && !commands.is_empty() && commands.len() < MAX_BATCH {
                // Lets the requests that are ready on this core send their writes first, to be
                // flushed with these: a flush costs far more than a yield (docs/performance.md).
                std::thread::yield_now();
                stop = self.take(self.messages.try_recv().ok(), &mut commands);
            }
            if !commands.is_empty() {
                self.write_batch(std::mem::take(&mut commands));
            }
            if stop {
                break;
            }
            if Instant::now() >= next_upkeep {
                self.maintain();
                next_upkeep = Instant::now() + UPKEEP_INTERVAL;
            }
        }
        if self.active.unflushed {
            // The renewals written since the last flush.
            let _ = self.flush();
        }
    }

    /// Adds `first` and every write waiting after it to `commands` (at most [`MAX_BATCH`]);
    /// whether the store is stopping.
    fn take(&self, first: Option<Msg>, commands: &mut Vec<Command>) -> bool {
        let mut stop = false;
        let mut message = first;
        while let Some(next) = message.take() {
            match next {
                Msg::Write(command) => commands.push(command),
                Msg::Stop => stop = true,
            }
            if commands.len() < MAX_BATCH {
                message = self.messages.try_recv().ok();
            }
        }
        stop
    }

    /// Applies the writes, writes their frames, flushes them, and answers them (`publish`). A
    /// batch of renewals alone is not flushed: it becomes durable with the next flush, and a
    /// renewal lost in a crash only makes the dead owner's lease lapse sooner.
    fn write_batch(&mut self, commands: Vec<Command>) {
        let flush = commands.iter().any(|c| !matches!(c.op, Op::Renew { .. }));
        if self.segments.get(&self.active.id).map_or(0, |s| s.size) >= self.segment_bytes {
            if let Err(err) = self.rotate_if_full() {
                tracing::error!(error = %err, "disk store: cannot start a new segment");
            }
        }
        let mut batch = self.batch();
        let (ops, replies): (Vec<Op>, Vec<_>) = commands.into_iter().map(|c| (c.op, c.reply)).unzip();
        let view = View {
            shared: &self.shared,
            leases: &self.leases,
        };
        let answers: Vec<_> = ops.into_iter().map(|op| batch.apply(&view, op)).collect();
        let durable = self
            .write(&batch)
            .and_then(|()| if flush { self.flush() } else { Ok(()) });
        let answers: Answers = match durable {
            Ok(()) => replies.into_iter().zip(answers).collect(),
            Err(err) => {
                self.fail(&batch, &err);
                let failed = |answer: Result<Answer, StoreError>| {
                    answer.and_then(|_| Err(StoreError::unreachable(format!("the disk store's write failed: {err}"))))
                };
                let answers = replies.into_iter().zip(answers.into_iter().map(failed)).collect();
                self.delivery.deliver(answers);
                return;
            }
        };
        self.publish(batch.changed, batch.live_delta);
        self.delivery.deliver(answers);
    }

    fn batch(&self) -> Batch {
        Batch {
            bytes: Vec::new(),
            base: self.segments.get(&self.active.id).map_or(0, |s| s.size),
            segment: self.active.id,
            changed: HashMap::new(),
            deleted_expiry: 0,
            max_expiry: 0,
            live_delta: 0,
            now_ms: unix_ms(),
        }
    }

    /// Writes the batch's frames to the active segment (not flushed).
    fn write(&mut self, batch: &Batch) -> std::io::Result<()> {
        if batch.bytes.is_empty() {
            return Ok(());
        }
        let end = batch.base + batch.bytes.len() as u64;
        if end > self.active.prepared {
            self.prepare(end)?;
        }
        self.active.file.write_all_at(&batch.bytes, batch.base)?;
        self.active.unflushed = true;
        let active = self.segments.entry(batch.segment).or_default();
        active.wrote(batch.bytes.len(), batch.max_expiry, false);
        active.max_deleted_expiry = active.max_deleted_expiry.max(batch.deleted_expiry);
        Ok(())
    }

    /// Flushes the active segment (`fdatasync`): what was written to it is durable.
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.active.unflushed {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.active.file.sync_data();
        self.shared.flushed(started.elapsed());
        if result.is_ok() {
            self.active.unflushed = false;
        }
        result
    }

    /// The batch's write or flush failed: the file is cut back to where the batch began (the
    /// kernel may have dropped its pages; nothing in it was acknowledged).
    fn fail(&mut self, batch: &Batch, err: &std::io::Error) {
        tracing::error!(error = %err, "disk store: write or flush failed");
        let _ = self.active.file.set_len(batch.base);
        self.active.prepared = batch.base;
        if let Some(stats) = self.segments.get_mut(&batch.segment) {
            stats.size = stats.size.min(batch.base);
        }
    }

    /// Applies a durable batch's changes to the index, the stats, the leases and the counters.
    fn publish(&mut self, changes: HashMap<[u8; 32], Change>, live_delta: i64) {
        let mut records = 0i64;
        for (digest, change) in changes {
            self.leases.published(&digest, change.as_ref());
            let new = change.map(|(entry, _)| entry);
            if let Some(new) = new {
                self.segments.entry(new.segment()).or_default().add(new.len);
                records += 1;
            }
            if let Some(old) = self.shared.index.set(&digest, new) {
                if let Some(stats) = self.segments.get_mut(&old.segment()) {
                    stats.remove(old.len);
                }
                records -= 1;
            }
        }
        self.shared.apply(records, live_delta, self.disk_bytes());
    }

    /// Writes a batch of the writer's own (compaction), flushes it, and publishes it.
    fn commit_now(&mut self, batch: Batch) -> std::io::Result<()> {
        if let Err(err) = self.write(&batch).and_then(|()| self.flush()) {
            self.fail(&batch, &err);
            return Err(err);
        }
        self.publish(batch.changed, batch.live_delta);
        Ok(())
    }

    /// Writes zeros from the active segment's prepared end to past `end` (flushed with the
    /// batch that needs them).
    fn prepare(&mut self, end: u64) -> std::io::Result<()> {
        let target = end + PREPARE_BYTES.min(self.segment_bytes);
        let mut at = self
            .active
            .prepared
            .max(self.segments.get(&self.active.id).map_or(0, |s| s.size));
        while at < target {
            let len = (target - at).min(ZEROS.len() as u64) as usize;
            self.active.file.write_all_at(&ZEROS[..len], at)?;
            at += len as u64;
        }
        self.active.prepared = target;
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    /// Starts a new segment once the active one has reached its size: the old one is flushed
    /// (a later flush covers only the new file), the new one's directory entry too.
    fn rotate_if_full(&mut self) -> std::io::Result<()> {
        let size = self.segments.get(&self.active.id).map_or(0, |s| s.size);
        if size < self.segment_bytes {
            return Ok(());
        }
        // Sealed without its zeros (a scan would take them for damage), and flushed: only the
        // newest segment can have a torn tail.
        self.active.file.set_len(size)?;
        self.active.file.sync_data()?;
        let id = self.active.id + 1;
        let file = Arc::new(segment::open(&self.shared.dir, id, true)?);
        segment::sync_dir(&self.shared.dir)?;
        self.shared.files.insert(id, file.clone());
        self.segments.insert(id, Stats::default());
        self.active = Active {
            id,
            file,
            prepared: 0,
            unflushed: false,
        };
        Ok(())
    }

    /// Upkeep between batches: forgets expired index entries (a few shards at a time), deletes
    /// the segments nothing in needs, and compacts the sparsest one if it is less than half live.
    fn maintain(&mut self) {
        let now = unix_ms();
        self.leases.forget_expired(now);
        let (mut records, mut live) = (0i64, 0i64);
        for _ in 0..SHARDS_PER_UPKEEP {
            let segments = &mut self.segments;
            self.shared.index.retain_shard(
                self.next_shard,
                |entry| entry.expires_at_ms <= now,
                |entry| {
                    if let Some(stats) = segments.get_mut(&entry.segment()) {
                        stats.remove(entry.len);
                    }
                    records -= 1;
                    live -= i64::from(entry.len);
                },
            );
            self.next_shard = (self.next_shard + 1) % SHARDS;
        }
        let droppable: Vec<u32> = self
            .segments
            .iter()
            .filter(|(id, stats)| **id != self.active.id && stats.droppable(now))
            .map(|(id, _)| *id)
            .collect();
        for id in droppable {
            self.drop_segment(id);
        }
        self.shared.apply(records, live, self.disk_bytes());
        let sparse = self
            .segments
            .iter()
            .filter(|(id, stats)| **id != self.active.id && stats.sparse() && !stats.pinned)
            .min_by_key(|(_, stats)| stats.live_bytes)
            .map(|(id, _)| *id);
        if let Some(id) = sparse {
            if let Err(err) = self.compact(id) {
                tracing::error!(error = %err, segment = id, "disk store: compaction failed");
            }
        }
    }

    /// Deletes segment `id`: nothing in it is needed.
    fn drop_segment(&mut self, id: u32) {
        self.shared.files.remove(id);
        match std::fs::remove_file(segment::path(&self.shared.dir, id)) {
            Ok(()) => {
                self.segments.remove(&id);
            }
            Err(err) => tracing::error!(error = %err, segment = id, "disk store: cannot delete a segment"),
        }
    }

    /// Copies what segment `id` still holds (the records and damaged-record markers the index
    /// points to there, the deletions that may still hide an older record) to the active
    /// segment, flushed, then deletes it.
    fn compact(&mut self, id: u32) -> std::io::Result<()> {
        let bytes = std::fs::read(segment::path(&self.shared.dir, id))?;
        self.rotate_if_full()?;
        let mut batch = self.batch();
        let now = batch.now_ms;
        let scan = super::recover::scan(&bytes, false);
        let index = &self.shared.index;
        let needed = |digest: &[u8; 32], offset: usize| {
            index
                .get(digest)
                .filter(|e| e.segment() == id && e.expires_at_ms > now && (e.offset == offset as u64 || e.damaged()))
        };
        let mut copied = std::collections::HashSet::new();
        let mut copies = Vec::new();
        for found in &scan.found {
            let (digest, offset, frame) = match found {
                Found::Frame { offset, head } if head.kind == Kind::Deleted => {
                    if head.expires_at_ms > now && index.get(&head.digest).is_none() && copied.insert(head.digest) {
                        copies.push((head.digest, None, head.expires_at_ms));
                    }
                    continue;
                }
                Found::Frame { offset, head } => (head.digest, *offset, &bytes[*offset..*offset + head.frame_len()]),
                Found::Damaged { offset, digest, .. } => (*digest, *offset, &[][..]),
                Found::Unnamed { .. } => continue,
            };
            if let Some(entry) = needed(&digest, offset).filter(|_| copied.insert(digest)) {
                copies.push((digest, Some((entry, frame)), entry.expires_at_ms));
            }
        }
        for (digest, copy, expires_at_ms) in copies {
            batch.copy(&digest, copy, expires_at_ms);
        }
        self.commit_now(batch)?;
        match self.segments.get_mut(&id) {
            // Every entry that pointed into it was copied forward.
            Some(stats) if stats.live == 0 => self.drop_segment(id),
            Some(stats) => {
                tracing::error!(
                    segment = id,
                    entries = stats.live,
                    "disk store: a compacted segment is still needed; kept"
                );
                stats.pinned = true;
            }
            None => {}
        }
        Ok(())
    }
}

/// What a batch reads beneath its own changes: the index (every batch before it is durable
/// and published), with the durable `InFlight` records kept in `leases`, read from disk
/// otherwise.
struct View<'a> {
    shared: &'a Shared,
    leases: &'a Leases,
}

impl Batch {
    /// Applies one write: its answer, or its own error (a damaged record, a full store).
    fn apply(&mut self, view: &View, op: Op) -> Result<Answer, StoreError> {
        match op {
            Op::Begin(claim) => self.begin(view, &claim).map(Answer::Begun),
            Op::Complete { key, token, record } => {
                let Some(current) = self.owned(view, &key, token)? else {
                    return Ok(Answer::Done(false));
                };
                self.put(&key, record, current.entry.expires_at_ms, Some(&current.entry));
                Ok(Answer::Done(true))
            }
            Op::Release { key, token } => {
                let Some(current) = self.owned(view, &key, token)? else {
                    return Ok(Answer::Done(false));
                };
                self.delete(&key, &current.entry);
                Ok(Answer::Done(true))
            }
            Op::Renew {
                key,
                token,
                lease_until_ms,
            } => {
                let Some(mut current) = self.owned(view, &key, token)? else {
                    return Ok(Answer::Done(false));
                };
                if let Record::InFlight {
                    lease_until_ms: until, ..
                } = &mut current.record
                {
                    *until = lease_until_ms;
                }
                let (expires_at_ms, old) = (current.entry.expires_at_ms, current.entry);
                self.put(&key, current.record.encode(), expires_at_ms, Some(&old));
                Ok(Answer::Done(true))
            }
            Op::Clear { key } => Ok(Answer::Done(self.clear(view, &key))),
        }
    }

    /// The key's entry as this batch sees it.
    fn entry(&self, view: &View, digest: &[u8; 32]) -> Option<Entry> {
        match self.changed.get(digest) {
            Some(change) => change.as_ref().map(|(entry, _)| *entry),
            None => view.shared.index.get(digest),
        }
    }

    /// The key's record unless it has expired; a damaged one is `Corrupt`.
    fn live(&self, view: &View, digest: &[u8; 32]) -> Result<Option<Current>, StoreError> {
        if let Some(change) = self.changed.get(digest) {
            let Some((entry, bytes)) = change.as_ref().filter(|(e, _)| e.expires_at_ms > self.now_ms) else {
                return Ok(None);
            };
            if entry.damaged() {
                return Err(corrupt(digest, RecordError::Corrupt("damaged record on disk")));
            }
            let record = Record::decode(bytes.clone()).map_err(|err| corrupt(digest, err))?;
            return Ok(Some(Current { entry: *entry, record }));
        }
        let Some(entry) = view.shared.index.get(digest).filter(|e| e.expires_at_ms > self.now_ms) else {
            return Ok(None);
        };
        let record = match view.leases.get(digest, &entry) {
            Some(kept) => Record::decode(kept.clone()).map_err(|err| corrupt(digest, err))?,
            None => view.shared.read_entry(digest, &entry)?,
        };
        Ok(Some(Current { entry, record }))
    }

    /// The key's record if it is InFlight and owned by `token`.
    fn owned(&self, view: &View, digest: &[u8; 32], token: LeaseToken) -> Result<Option<Current>, StoreError> {
        Ok(self
            .live(view, digest)?
            .filter(|c| matches!(&c.record, Record::InFlight { owner, .. } if *owner == token)))
    }

    /// docs/behaviour.md §4's table, applied: decided on the record as this batch sees it.
    fn begin(&mut self, view: &View, claim: &Claim) -> Result<Begin<LeaseToken>, StoreError> {
        let live = self.live(view, &claim.key)?;
        let existing = live.as_ref().map(|c| Existing {
            lease_left: lease_left_at(&c.record, claim.now_ms),
            record: c.record.clone(),
        });
        let decision = decide(existing, &claim.print, claim.unknown_outcome);
        match (&decision, &live) {
            (Decision::Execute, _) => {
                let shared = view.shared;
                let frame = OVERHEAD + claim.in_flight.len();
                let used = shared.footprint().saturating_add_signed(2 * self.live_delta);
                if used.saturating_add(footprint(frame)) > shared.max_bytes {
                    return Err(StoreError::Full(shared.records() as usize));
                }
                let old = self.entry(view, &claim.key);
                self.put(&claim.key, claim.in_flight.clone(), claim.expires_at_ms, old.as_ref());
            }
            (Decision::TakeOver, Some(c)) => self.put(
                &claim.key,
                claim.in_flight.clone(),
                c.entry.expires_at_ms,
                Some(&c.entry),
            ),
            (Decision::MarkUnknown, Some(c)) => {
                self.put(&claim.key, claim.lapsed.clone(), c.entry.expires_at_ms, Some(&c.entry))
            }
            _ => {}
        }
        Ok(Begin::applied(decision, claim.token))
    }

    /// Deletes the key whatever its record holds (damaged ones too: the operator's way out).
    /// Returns whether a live record was there.
    fn clear(&mut self, view: &View, digest: &[u8; 32]) -> bool {
        let Some(entry) = self.entry(view, digest) else {
            return false;
        };
        self.delete(digest, &entry);
        entry.expires_at_ms > self.now_ms
    }

    /// Appends a frame; returns where it starts in the segment.
    fn frame(&mut self, kind: Kind, digest: &[u8; 32], expires_at_ms: u64, payload: &[u8]) -> (u64, u32) {
        let offset = self.base + self.bytes.len() as u64;
        format::encode(&mut self.bytes, kind, digest, expires_at_ms, payload);
        self.max_expiry = self.max_expiry.max(expires_at_ms);
        (offset, (OVERHEAD + payload.len()) as u32)
    }

    /// Writes the encoded `record` as the key's, in place of `old`.
    fn put(&mut self, digest: &[u8; 32], record: Bytes, expires_at_ms: u64, old: Option<&Entry>) {
        let (offset, len) = self.frame(Kind::Record, digest, expires_at_ms, &record);
        let entry = Entry::new(self.segment, offset, len, expires_at_ms, false);
        self.live_delta += i64::from(len) - old.map_or(0, |e| i64::from(e.len));
        self.changed.insert(*digest, Some((entry, record)));
    }

    /// Deletes the key, whose entry is `old`: the deletion hides its older frames until they
    /// would have expired.
    fn delete(&mut self, digest: &[u8; 32], old: &Entry) {
        self.frame(Kind::Deleted, digest, old.expires_at_ms, &[]);
        self.deleted_expiry = self.deleted_expiry.max(old.expires_at_ms);
        self.live_delta -= i64::from(old.len);
        self.changed.insert(*digest, None);
    }

    /// Compaction's copy of what the index points to (`Some`: a record's whole frame, or a
    /// marker for a damaged record) or of a deletion (`None`).
    fn copy(&mut self, digest: &[u8; 32], copy: Option<(Entry, &[u8])>, expires_at_ms: u64) {
        let Some((old, frame)) = copy else {
            self.frame(Kind::Deleted, digest, expires_at_ms, &[]);
            self.deleted_expiry = self.deleted_expiry.max(expires_at_ms);
            return;
        };
        let (offset, len) = if old.damaged() {
            self.frame(Kind::Damaged, digest, expires_at_ms, &[])
        } else {
            let offset = self.base + self.bytes.len() as u64;
            self.bytes.extend_from_slice(frame);
            self.max_expiry = self.max_expiry.max(expires_at_ms);
            (offset, frame.len() as u32)
        };
        self.live_delta += i64::from(len) - i64::from(old.len);
        let entry = Entry::new(self.segment, offset, len, expires_at_ms, old.damaged());
        let payload = frame.get(format::HEADER..frame.len().saturating_sub(format::TRAILER));
        self.changed.insert(
            *digest,
            Some((entry, Bytes::copy_from_slice(payload.unwrap_or_default()))),
        );
    }
}
