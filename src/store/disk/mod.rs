//! The durable embedded store (docs/behaviour.md §11): records in one [redb] file in the data
//! directory, so a proxy killed at any instant and restarted on the same directory still knows
//! every key it acknowledged.
//!
//! - Files: `records.redb` (tables `records` and `expiry`; layout in [`format`](mod@format)) and
//!   `LOCK` (one process per directory: [`lock`]). Records are keyed by creation time, found
//!   through an in-memory `index` rebuilt at open; settled ones are also kept for replays in a
//!   small `cache`.
//! - Writes go to one writer thread (`writer`), which commits every write waiting in one
//!   transaction with one flush and answers them once it is durable (group commit): `begin`
//!   returns only after the `InFlight` record is on disk, `complete` and `release` only after
//!   theirs is.
//! - Reads need no writer: `begin` first reads the key in a read transaction (which sees only
//!   committed, so durable, records); a replay, a conflict, a mismatch or an Unknown is answered
//!   from that read alone. Only a request that may take the key (none, or a lapsed lease) goes
//!   to the writer, which decides it again inside its transaction.
//! - Expiry: records are dead once their `key_ttl` has passed (reads check it), and the writer
//!   sweeps them out between batches, so their pages are reused while the proxy serves.
//! - Bound: a new key is refused (`StoreError::Full`) once the records' estimated footprint
//!   would pass `store.max_disk_bytes`; records already there are never dropped for space.
//! - Damage: every value carries a CRC-32 of its key and bytes; one that fails it, or does not
//!   decode, makes its key answer `StoreError::Corrupt` (logged at error). redb's own commits are
//!   checksummed: a commit torn by a crash was never acknowledged and is rolled back on open.
//!   A file redb cannot open at all fails start-up with an error naming it.
//!
//! [redb]: https://docs.rs/redb

mod cache;
pub mod format;
mod index;
pub mod lock;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use self::cache::ReplayCache;
use self::format::{decode_value, record_key, split_record_key};
use self::index::Index;
use self::lock::DirLock;
use self::writer::{Answer, Claim, Command, Op, Writer};
use super::{lease_left_at, Begin, BeginRequest, KeyState, Store, StoreError};
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Record, RecordError, StorageKey};
use crate::telemetry::DiskStoreMetrics;

pub use self::writer::SWEEP_BATCH;

/// The redb file in the data directory.
pub const DATA_FILE: &str = "records.redb";
/// redb's page cache: it bounds the memory the store uses beyond its fixed cost.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");

/// The disk a record of `value_len` bytes is counted for against `store.max_disk_bytes`: its
/// key and value, its expiry entry, and the B-tree's slack (pages are about half full after
/// random inserts, and a copy-on-write commit needs free pages).
pub fn footprint(value_len: usize) -> u64 {
    2 * (value_len as u64 + 32 + 40) + 64
}

/// What the writer and the store share: counters, the bound, metrics.
pub struct Shared {
    index: Index,
    records: AtomicU64,
    footprint: AtomicU64,
    max_bytes: u64,
    file: PathBuf,
    metrics: DiskStoreMetrics,
}

impl Shared {
    /// The record count and footprint once `delta` is applied.
    fn after(&self, delta: writer::Delta) -> (u64, u64) {
        let add = |now: u64, by: i64| now.saturating_add_signed(by);
        (
            add(self.records.load(Ordering::Relaxed), delta.records),
            add(self.footprint.load(Ordering::Relaxed), delta.footprint),
        )
    }

    /// Applies a committed transaction's changes, and refreshes the gauges.
    fn apply(&self, delta: writer::Delta) {
        let (records, footprint) = self.after(delta);
        self.records.store(records, Ordering::Relaxed);
        self.footprint.store(footprint, Ordering::Relaxed);
        self.metrics.records.set(records as i64);
        if let Ok(meta) = std::fs::metadata(&self.file) {
            self.metrics.bytes.set(meta.len() as i64);
        }
    }

    /// Counts one flush that took `took`.
    fn flushed(&self, took: Duration) {
        self.metrics.flushes.inc();
        self.metrics.flush_duration.observe(took.as_secs_f64());
    }
}

/// Records on local disk. See the module documentation.
pub struct DiskStore {
    db: Arc<Database>,
    commands: Option<mpsc::Sender<Command>>,
    writer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    cache: ReplayCache,
    dir: PathBuf,
    _lock: DirLock,
}

impl DiskStore {
    /// Opens (creating them if missing) the data directory `dir` and its store, locks the
    /// directory for this process, and starts the writer. Fails naming the directory when it
    /// cannot be created or locked (another process has it), and naming the file when redb
    /// cannot open it.
    pub fn open(dir: &Path, max_disk_bytes: u64, metrics: DiskStoreMetrics) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::unreachable(format!("cannot create data directory {}: {e}", dir.display())))?;
        let lock = DirLock::acquire(dir).map_err(StoreError::unreachable)?;
        let file = dir.join(DATA_FILE);
        let cannot_open = |e: &dyn std::fmt::Display| {
            StoreError::unreachable(format!(
                "cannot open the disk store {}: {e} (a file damaged beyond repair can be moved away to start empty, forgetting its keys)",
                file.display()
            ))
        };
        let db = unpanicked(|| redb::Builder::new().set_cache_size(CACHE_BYTES).create(&file))
            .map_err(|e| cannot_open(&e))?
            .map_err(|e| cannot_open(&e))?;
        unpanicked(|| prepare(&db))
            .map_err(|e| cannot_open(&e))?
            .map_err(|e| cannot_open(&e))?;
        let (index, footprint) = unpanicked(|| build_index(&db))
            .map_err(|e| cannot_open(&e))?
            .map_err(|e| cannot_open(&e))?;
        let records = index.len() as u64;
        metrics.max_bytes.set(max_disk_bytes.min(i64::MAX as u64) as i64);
        let shared = Arc::new(Shared {
            index,
            records: AtomicU64::new(records),
            footprint: AtomicU64::new(footprint),
            max_bytes: max_disk_bytes,
            file,
            metrics,
        });
        shared.apply(writer::Delta::default());
        let db = Arc::new(db);
        let (commands, receiver) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            commands: receiver,
            shared: shared.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("idemproxy-disk-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::unreachable(format!("cannot start the disk store's writer: {e}")))?;
        Ok(Self {
            db,
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

    /// Records on disk, live or expired but not yet swept.
    pub fn len(&self) -> u64 {
        self.shared.records.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key's record as committed, expired or not, and its stored length.
    fn read(&self, key: &[u8; 32]) -> Result<Option<(u64, Record, usize)>, StoreError> {
        unpanicked(|| self.read_unguarded(key)).unwrap_or_else(|err| Err(corrupt(key, err)))
    }

    fn read_unguarded(&self, digest: &[u8; 32]) -> Result<Option<(u64, Record, usize)>, StoreError> {
        let Some(created) = self.shared.index.get(digest) else {
            return Ok(None);
        };
        let key = record_key(created, digest);
        let tx = self.db.begin_read().map_err(|e| storage_failure(&e.into()))?;
        let table = tx.open_table(RECORDS).map_err(|e| storage_failure(&e.into()))?;
        let Some(value) = table.get(&key[..]).map_err(|e| storage_failure(&e.into()))? else {
            return Ok(None);
        };
        let value = value.value();
        let (expires, record) = decode_value(&key, value).map_err(|e| corrupt(digest, e))?;
        Ok(Some((expires, record, value.len())))
    }

    /// The key's record unless it has expired at `now_ms`: from the replay cache, or read (and
    /// kept there if it is settled).
    fn live(&self, key: &[u8; 32], now_ms: u64) -> Result<Option<(u64, Record)>, StoreError> {
        if let Some(hit) = self.cache.get(key, now_ms) {
            return Ok(Some(hit));
        }
        let generation = self.cache.generation();
        let Some((expires, record, len)) = self.read(key)?.filter(|(expires, ..)| *expires > now_ms) else {
            return Ok(None);
        };
        self.cache.keep(key, expires, &record, len, generation);
        Ok(Some((expires, record)))
    }

    /// Sends a write to the writer and waits until it is durable.
    async fn write(&self, op: Op) -> Result<Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        let Some(commands) = &self.commands else {
            return Err(writer_gone());
        };
        if commands.send(Command { op, reply }).is_err() {
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
    /// Stops the writer (it finishes the batch it has) and closes the file cleanly.
    fn drop(&mut self) {
        self.commands.take();
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
        match self.write(Op::Begin(claim)).await? {
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

/// Creates the tables of a new file.
fn prepare(db: &Database) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    tx.open_table(RECORDS)?;
    tx.open_table(EXPIRY)?;
    tx.commit()?;
    Ok(())
}

/// The index of every record in the file, from the keys of the `records` table, and the
/// records' footprint (so no counter is written with every commit).
fn build_index(db: &Database) -> Result<(Index, u64), redb::Error> {
    let index = Index::default();
    let mut used = 0u64;
    let tx = db.begin_read()?;
    let table = tx.open_table(RECORDS)?;
    for entry in table.iter()? {
        let (key, value) = entry?;
        match split_record_key(key.value()) {
            Some((created, digest)) => index.set(&digest, Some(created)),
            None => tracing::error!("disk store: a record key of {} bytes is skipped", key.value().len()),
        }
        used = used.saturating_add(footprint(value.value().len()));
    }
    Ok((index, used))
}

/// Runs a redb call, turning a panic into an error: redb panics on some damaged pages (an
/// invalid page type, say), and the store must not (docs/behaviour.md §11): the key, or every
/// key once redb's state is poisoned, answers `Corrupt` instead.
pub(crate) fn unpanicked<T>(call: impl FnOnce() -> T) -> Result<T, RecordError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
        .map_err(|_| RecordError::Corrupt("the disk store's file is damaged (redb panicked reading it)"))
}

/// A damaged record of `key`: logged at error, answered `Corrupt` (docs/behaviour.md §11).
fn corrupt(key: &[u8; 32], err: RecordError) -> StoreError {
    tracing::error!(key = %hex::encode(&key[..6]), error = %err, "disk store: damaged record; its key answers 503 until cleared or expired");
    StoreError::Corrupt(err)
}

/// A redb failure as the store's answer: damage it detected is `Corrupt`, the rest (I/O, a
/// full disk) is the store being unavailable.
fn storage_failure(err: &redb::Error) -> StoreError {
    match err {
        redb::Error::Corrupted(_) => {
            tracing::error!(error = %err, "disk store: damaged page");
            StoreError::Corrupt(RecordError::Corrupt("disk store page damaged"))
        }
        other => StoreError::unreachable(other.to_string()),
    }
}

fn writer_gone() -> StoreError {
    StoreError::unreachable("the disk store's writer has stopped")
}

#[cfg(test)]
mod tests;
