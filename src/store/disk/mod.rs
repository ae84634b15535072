//! The durable embedded store (docs/behaviour.md §11): records appended to segment files in
//! the data directory, so a proxy killed at any instant and restarted on the same directory still
//! knows every key it acknowledged.
//!
//! - Files: `00000001.seg`, `00000002.seg`, … (frames of self-checked records: [`format`](mod@format),
//!   [`segment`]) and `LOCK` (one process per directory: [`lock`]). An in-memory `index` says
//!   where each key's newest frame is; it is rebuilt by reading the segments at open
//!   (`recover`). Settled records are also kept for replays in a small `cache`.
//! - Writes go to one writer thread (`writer`), which appends every write waiting in one
//!   `write`, flushes it and answers them once it is durable (group commit; the answers reach
//!   the runtime together: `delivery`): `begin`
//!   returns only after the `InFlight` record is on disk, `complete` and `release` only after
//!   theirs is.
//! - Reads need no writer: `begin` first reads the key through the index (which points only at
//!   durable frames, read with `pread`); a replay, a conflict, a mismatch or an Unknown is
//!   answered from that read alone. Only a request that may take the key (none, or a lapsed
//!   lease) goes to the writer, which decides it again.
//! - Expiry: records are dead once their `key_ttl` has passed (reads check it); the writer
//!   forgets them and deletes each segment once nothing in it is needed, and copies the live
//!   part of a sparse segment forward so that it can be deleted too.
//! - Bound: a new key is refused (`StoreError::Full`) once twice the live frames' bytes would
//!   pass `store.max_disk_bytes`; records already there are never dropped for space.
//! - Damage: every frame checks itself, and names its key in its header and its trailer. A
//!   damaged record makes its key answer `StoreError::Corrupt` (logged at error); a torn tail of
//!   the newest segment (never acknowledged) is cut off at open; the store always opens.

mod cache;
mod command;
mod delivery;
pub mod format;
mod index;
mod leases;
pub mod lock;
mod recover;
pub mod segment;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use self::cache::ReplayCache;
use self::command::{Answer, Claim, Command, Msg, Op};
use self::delivery::Delivery;
use self::index::{Entry, Index};
use self::lock::DirLock;
use self::segment::{Files, ReadError};
use self::writer::{Active, Writer};
use super::{lease_left_at, Begin, BeginRequest, KeyState, Store, StoreError};
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Record, RecordError, StorageKey};
use crate::telemetry::DiskStoreMetrics;

/// The file the earlier, redb-based disk store kept its records in (this one cannot read it).
pub const LEGACY_FILE: &str = "records.redb";
/// Largest segment: the next one is started once the newest passes it.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// What a live frame of `frame_len` bytes counts against `store.max_disk_bytes`: twice its bytes,
/// since a segment is compacted only once less than half of it is live.
pub fn footprint(frame_len: usize) -> u64 {
    2 * frame_len as u64
}

/// What the writer and the readers share: the index, the files, counters and metrics.
pub struct Shared {
    index: Index,
    files: Files,
    dir: PathBuf,
    records: AtomicU64,
    live_bytes: AtomicU64,
    max_bytes: u64,
    metrics: DiskStoreMetrics,
}

/// Why a frame the index pointed to could not be read.
enum Unread {
    /// Compaction moved it since: look it up again.
    Moved,
    Failed(StoreError),
}

impl Shared {
    /// What the live frames count against the bound.
    fn footprint(&self) -> u64 {
        footprint(self.live_bytes.load(Ordering::Relaxed) as usize)
    }

    fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Applies a durable change to the counters, and refreshes the gauges.
    fn apply(&self, records: i64, live_bytes: i64, disk_bytes: u64) {
        let add = |counter: &AtomicU64, by: i64| {
            let now = counter.load(Ordering::Relaxed).saturating_add_signed(by);
            counter.store(now, Ordering::Relaxed);
            now
        };
        let records = add(&self.records, records);
        add(&self.live_bytes, live_bytes);
        self.metrics.records.set(records as i64);
        self.metrics.bytes.set(disk_bytes.min(i64::MAX as u64) as i64);
    }

    /// Counts one flush that took `took`.
    fn flushed(&self, took: Duration) {
        self.metrics.flushes.inc();
        self.metrics.flush_duration.observe(took.as_secs_f64());
    }

    /// The record `entry` points to; a damaged one is `Corrupt` (logged at error).
    fn read_entry(&self, digest: &[u8; 32], entry: &Entry) -> Result<Record, StoreError> {
        match self.read_frame(digest, entry) {
            Ok(record) => Ok(record),
            Err(Unread::Failed(err)) => Err(err),
            Err(Unread::Moved) => Err(StoreError::unreachable("the disk store's segment is gone")),
        }
    }

    fn read_frame(&self, digest: &[u8; 32], entry: &Entry) -> Result<Record, Unread> {
        if entry.damaged() {
            return Err(Unread::Failed(corrupt(
                digest,
                RecordError::Corrupt("damaged record on disk"),
            )));
        }
        let frame = match self.files.read(entry.segment(), entry.offset, entry.len) {
            Ok(frame) => frame,
            Err(ReadError::Gone) => return Err(Unread::Moved),
            Err(ReadError::Io(err)) => {
                let failed = StoreError::unreachable(format!("cannot read the disk store: {err}"));
                return Err(Unread::Failed(failed));
            }
        };
        let checked = format::header(&frame)
            .filter(|head| head.digest == *digest && head.kind == format::Kind::Record)
            .ok_or(RecordError::Corrupt("damaged frame header on disk"))
            .and_then(|head| format::payload(&head, &frame).map(|p| p.len()));
        let len = checked.map_err(|err| Unread::Failed(corrupt(digest, err)))?;
        let payload = Bytes::from(frame).slice(format::HEADER..format::HEADER + len);
        Record::decode(payload).map_err(|err| Unread::Failed(corrupt(digest, err)))
    }
}

/// Records on local disk. See the module documentation.
pub struct DiskStore {
    commands: Option<mpsc::Sender<Msg>>,
    writer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    cache: ReplayCache,
    dir: PathBuf,
    _lock: DirLock,
}

impl DiskStore {
    /// Opens (creating them if missing) the data directory `dir` and its store, locks the
    /// directory for this process, reads its segments back (cutting off a torn tail), and starts
    /// the writer. Fails naming the directory when it cannot be created, locked (another process
    /// has it) or read, and naming the file an earlier build's store left there.
    pub fn open(dir: &Path, max_disk_bytes: u64, metrics: DiskStoreMetrics) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::unreachable(format!("cannot create data directory {}: {e}", dir.display())))?;
        let lock = DirLock::acquire(dir).map_err(StoreError::unreachable)?;
        let legacy = dir.join(LEGACY_FILE);
        if legacy.exists() {
            return Err(StoreError::unreachable(format!(
                "{} was written by an earlier idemproxy build (its redb disk store), which this version cannot read; \
                 run that build until its keys have expired (key_ttl), or move the file away to start empty (forgetting its keys)",
                legacy.display()
            )));
        }
        let cannot_read = |e: std::io::Error| {
            StoreError::unreachable(format!("cannot read the disk store in {}: {e}", dir.display()))
        };
        let mut ids = segment::list(dir).map_err(cannot_read)?;
        let recovered = recover::recover(dir, &ids, unix_ms()).map_err(cannot_read)?;
        let mut segments = recovered.segments;
        if ids.is_empty() {
            segment::open(dir, 1, true).map_err(cannot_read)?;
            segment::sync_dir(dir).map_err(cannot_read)?;
            segments.insert(1, segment::Stats::default());
            ids.push(1);
        }
        let files = Files::default();
        for &id in &ids {
            files.insert(id, Arc::new(segment::open(dir, id, false).map_err(cannot_read)?));
        }
        let active_id = ids.last().copied().unwrap_or(1);
        let active_file = files
            .get(active_id)
            .ok_or_else(|| cannot_read(std::io::ErrorKind::NotFound.into()))?;
        metrics.max_bytes.set(max_disk_bytes.min(i64::MAX as u64) as i64);
        let shared = Arc::new(Shared {
            index: Index::from_shards(recovered.shards),
            files,
            dir: dir.to_owned(),
            records: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
            max_bytes: max_disk_bytes,
            metrics,
        });
        let disk_bytes = segments.values().map(|s| s.size).sum();
        shared.apply(recovered.records as i64, recovered.live_bytes as i64, disk_bytes);
        let (commands, receiver) = mpsc::channel();
        let prepared = segments.get(&active_id).map_or(0, |s| s.size);
        let writer = Writer {
            messages: receiver,
            shared: shared.clone(),
            segments,
            active: Active {
                id: active_id,
                file: active_file,
                prepared,
                unflushed: false,
            },
            segment_bytes: (max_disk_bytes / 16).clamp(64 * 1024, SEGMENT_BYTES),
            next_shard: 0,
            leases: Default::default(),
            delivery: Delivery::start(),
        };
        let writer = std::thread::Builder::new()
            .name("idemproxy-disk-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::unreachable(format!("cannot start the disk store's writer: {e}")))?;
        Ok(Self {
            commands: Some(commands),
            writer: Some(writer),
            shared,
            cache: ReplayCache::default(),
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records indexed, live or expired but not yet forgotten.
    pub fn len(&self) -> u64 {
        self.shared.records()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's record unless it has expired at `now_ms`: from the replay cache, or read (and
    /// kept there if it is settled).
    fn live(&self, key: &[u8; 32], now_ms: u64) -> Result<Option<(u64, Record)>, StoreError> {
        if let Some(hit) = self.cache.get(key, now_ms) {
            return Ok(Some(hit));
        }
        let generation = self.cache.generation();
        // Compaction may move the frame between reading the index and reading the file.
        for _ in 0..8 {
            let Some(entry) = self.shared.index.get(key).filter(|e| e.expires_at_ms > now_ms) else {
                return Ok(None);
            };
            match self.shared.read_frame(key, &entry) {
                Ok(record) => {
                    self.cache
                        .keep(key, entry.expires_at_ms, &record, entry.len as usize, generation);
                    return Ok(Some((entry.expires_at_ms, record)));
                }
                Err(Unread::Failed(err)) => return Err(err),
                Err(Unread::Moved) => continue,
            }
        }
        Err(StoreError::unreachable("the disk store's record kept moving"))
    }

    /// Sends a write to the writer and waits until it is durable.
    async fn write(&self, op: Op) -> Result<Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        let Some(commands) = &self.commands else {
            return Err(writer_gone());
        };
        if commands.send(Msg::Write(Command { op, reply })).is_err() {
            return Err(writer_gone());
        }
        answer.await.unwrap_or_else(|_| Err(writer_gone()))
    }

    async fn write_done(&self, op: Op) -> Result<bool, StoreError> {
        match self.write(op).await? {
            Answer::Done(done) => Ok(done),
            Answer::Begun(_) => Err(writer_gone()),
        }
    }
}

impl Drop for DiskStore {
    /// Stops the writer: it writes, flushes and answers every write it has, then ends.
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Msg::Stop);
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Store for DiskStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
        let key = *request.key.digest();
        let live = self.live(&key, request.now_ms)?;
        let existing = live.map(|(_, record)| Existing {
            lease_left: lease_left_at(&record, request.now_ms),
            record,
        });
        match decide(existing, &request.print, request.unknown_outcome) {
            Decision::Execute | Decision::TakeOver | Decision::MarkUnknown => {}
            answered => return Ok(Begin::applied(answered, request.token)),
        }
        let claim = Claim {
            key,
            print: request.print,
            token: request.token,
            unknown_outcome: request.unknown_outcome,
            now_ms: request.now_ms,
            expires_at_ms: request.now_ms.saturating_add(request.key_ttl.as_millis() as u64),
            in_flight: request.in_flight_record().encode(),
            lapsed: request.lapsed_record().encode(),
        };
        match self.write(Op::Begin(Box::new(claim))).await? {
            Answer::Begun(begun) => Ok(begun),
            Answer::Done(_) => Err(writer_gone()),
        }
    }

    async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        let op = Op::Complete {
            key: *key.digest(),
            token,
            record: record.encode(),
        };
        self.write_done(op).await
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.write_done(Op::Release {
            key: *key.digest(),
            token,
        })
        .await
    }

    async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        let lease_until_ms = unix_ms().saturating_add(lock_ttl.as_millis() as u64);
        self.write_done(Op::Renew {
            key: *key.digest(),
            token,
            lease_until_ms,
        })
        .await
    }

    async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
        let now = unix_ms();
        Ok(self.live(key.digest(), now)?.map(|(expires, record)| KeyState {
            existing: Existing {
                lease_left: lease_left_at(&record, now),
                record,
            },
            expires_in: Some(Duration::from_millis(expires.saturating_sub(now))),
        }))
    }

    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let digest = *key.digest();
        self.cache.forget(&digest);
        let cleared = self.write_done(Op::Clear { key: digest }).await;
        self.cache.forget(&digest);
        cleared
    }

    /// Ready while the writer runs and the data directory takes a new file (a full disk or a
    /// directory gone read-only or removed is not ready).
    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(writer_gone());
        }
        // A name of its own per probe: concurrent probes must not remove each other's file.
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let probe = self
            .dir
            .join(format!(".ready-probe-{}", PROBES.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&probe, b"ok")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                StoreError::unreachable(format!(
                    "the data directory {} is not writable: {e}",
                    self.dir.display()
                ))
            })
    }
}

/// A damaged record of `key`: logged at error, answered `Corrupt` (docs/behaviour.md §11).
fn corrupt(key: &[u8; 32], err: RecordError) -> StoreError {
    tracing::error!(key = %hex::encode(&key[..6]), error = %err, "disk store: damaged record; its key answers 503 until cleared or expired");
    StoreError::Corrupt(err)
}

fn writer_gone() -> StoreError {
    StoreError::unreachable("the disk store's writer has stopped")
}

#[cfg(test)]
mod tests;
