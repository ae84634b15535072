//! The disk store's one writer (docs/behaviour.md §11): a thread that takes every write waiting,
//! applies them in one redb write transaction, commits it with one `fdatasync`
//! (`Durability::Immediate`), and only then answers each of them: group commit.
//!
//! Being the only writer is what makes `begin` atomic: the writer reads the key's record inside
//! its transaction, applies [`decide`] to it and writes the verdict, and no other write can come
//! between (the memory store gets the same from its lock). A batch of lease renewals alone is
//! committed without a flush (`Durability::None`; it becomes durable with the next flush): a
//! renewal lost in a crash only makes the dead owner's lease lapse sooner.
//!
//! Between batches the writer sweeps expired records (at most [`SWEEP_BATCH`] per transaction,
//! oldest first, from the `expiry` table), so their pages are reused while the proxy serves.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use std::collections::HashMap;

use super::format::{decode_value, encode_value, expiry_key, record_key, split_expiry_key, value_expiry, RecordKey};
use super::{corrupt, footprint, lease_left_at, storage_failure, unpanicked, Shared, EXPIRY, RECORDS};
use crate::config::UnknownOutcome;
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Print, Record};
use crate::store::{Begin, StoreError};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 4096;
/// Most expired records removed in one transaction (a sweep holds the writer that long).
pub const SWEEP_BATCH: usize = 256;
/// How often the writer looks for expired records when the last sweep found few.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// An arriving request that the writer decides (no record, or its owner's lease lapsed).
pub struct Claim {
    pub key: [u8; 32],
    pub print: Print,
    pub token: LeaseToken,
    pub unknown_outcome: UnknownOutcome,
    pub now_ms: u64,
    pub expires_at_ms: u64,
    /// The encoded InFlight record this request would own the key with.
    pub in_flight: Bytes,
    /// The encoded Unknown(LeaseLapsed) record, for `unknown_outcome = reject`.
    pub lapsed: Bytes,
}

/// One write.
pub enum Op {
    Begin(Claim),
    Complete {
        key: [u8; 32],
        token: LeaseToken,
        record: Bytes,
    },
    Release {
        key: [u8; 32],
        token: LeaseToken,
    },
    Renew {
        key: [u8; 32],
        token: LeaseToken,
        lease_until_ms: u64,
    },
    Clear {
        key: [u8; 32],
    },
}

/// The writer's answer to one write, sent once it is durable.
pub enum Answer {
    Begun(Begin<LeaseToken>),
    Done(bool),
}

/// A write and where its answer goes.
pub struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Answer, StoreError>>,
}

/// A stored record as the writer reads it.
struct Stored {
    created_ms: u64,
    expires_at_ms: u64,
    record: Record,
    len: usize,
}

impl Stored {
    fn key(&self, digest: &[u8; 32]) -> RecordKey {
        record_key(self.created_ms, digest)
    }
}

/// Changes of a transaction to the record count and the estimated footprint, applied to
/// [`Shared`] once it committed.
#[derive(Default, Clone, Copy)]
pub struct Delta {
    pub records: i64,
    pub footprint: i64,
}

/// What a committed transaction changes outside the file: the counters, and the index (each
/// key's record's creation time, or `None`: gone).
#[derive(Default)]
pub struct Changes {
    pub delta: Delta,
    pub moved: HashMap<[u8; 32], Option<u64>>,
}

/// The open tables of one write transaction, and what it changed so far.
struct Batch<'t> {
    records: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, &'static [u8], ()>,
    changes: Changes,
    shared: &'t Shared,
    now_ms: u64,
}

pub struct Writer {
    pub db: Arc<Database>,
    pub commands: Receiver<Command>,
    pub shared: Arc<Shared>,
}

impl Writer {
    /// Serves writes until every sender is gone.
    pub fn run(self) {
        let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            match self.commands.recv_timeout(wait) {
                Ok(first) => self.commit_batch(first),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_sweep {
                let removed = match unpanicked(|| self.sweep()) {
                    Ok(Ok(removed)) => removed,
                    Ok(Err(err)) => {
                        tracing::error!(error = %crate::error::Chain(&err), "disk store: expiry sweep failed");
                        0
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "disk store: expiry sweep failed");
                        0
                    }
                };
                // A full sweep leaves more behind: sweep again after the next batch.
                let pause = if removed == SWEEP_BATCH {
                    Duration::ZERO
                } else {
                    SWEEP_INTERVAL
                };
                next_sweep = Instant::now() + pause;
            }
        }
    }

    /// Applies `first` and every write waiting behind it in one transaction, commits it, and
    /// answers them all (with the commit's error if it failed: then none of them happened).
    fn commit_batch(&self, first: Command) {
        let mut commands = vec![first];
        while commands.len() < MAX_BATCH {
            match self.commands.try_recv() {
                Ok(command) => commands.push(command),
                Err(_) => break,
            }
        }
        let flush = commands.iter().any(|c| !matches!(c.op, Op::Renew { .. }));
        let started = Instant::now();
        let (ops, replies): (Vec<Op>, Vec<_>) = commands.into_iter().map(|c| (c.op, c.reply)).unzip();
        let answers = match unpanicked(|| self.transact(flush, ops)) {
            Ok(Ok(answers)) => answers,
            Ok(Err(err)) => {
                tracing::error!(error = %crate::error::Chain(&err), "disk store: commit failed");
                let failure = storage_failure(&err);
                replies.iter().map(|_| Err(clone_error(&failure))).collect()
            }
            Err(err) => {
                tracing::error!(error = %err, "disk store: commit failed");
                replies.iter().map(|_| Err(StoreError::Corrupt(err.clone()))).collect()
            }
        };
        if flush {
            self.shared.flushed(started.elapsed());
        }
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }

    /// One write transaction over `ops`: their answers, or the error that aborted it.
    fn transact(&self, flush: bool, ops: Vec<Op>) -> Result<Vec<Result<Answer, StoreError>>, redb::Error> {
        let mut tx = self.db.begin_write()?;
        if !flush {
            tx.set_durability(Durability::None)?;
        }
        let (answers, changes) = {
            let mut batch = Batch::open(&tx, &self.shared)?;
            let answers = ops
                .into_iter()
                .map(|op| batch.apply(op))
                .collect::<Result<Vec<_>, _>>()?;
            (answers, batch.changes)
        };
        self.finish(tx, changes)?;
        Ok(answers)
    }

    /// Commits the transaction, and then (before anyone is answered) applies its changes to the
    /// index and the counters.
    fn finish(&self, tx: WriteTransaction, changes: Changes) -> Result<(), redb::Error> {
        tx.commit()?;
        for (digest, created) in &changes.moved {
            self.shared.index.set(digest, *created);
        }
        self.shared.apply(changes.delta);
        Ok(())
    }

    /// Removes up to [`SWEEP_BATCH`] records whose `key_ttl` has passed; returns how many
    /// expiry entries it handled.
    fn sweep(&self) -> Result<usize, redb::Error> {
        let mut tx = self.db.begin_write()?;
        // An expired record brought back by a crash is still expired: no flush needed.
        tx.set_durability(Durability::None)?;
        let (handled, changes) = {
            let mut batch = Batch::open(&tx, &self.shared)?;
            let end = expiry_key(batch.now_ms, &[0; 40]);
            let due: Vec<[u8; 48]> = batch
                .expiry
                .range::<&[u8]>(..&end[..])?
                .take(SWEEP_BATCH)
                .filter_map(|entry| entry.ok()?.0.value().try_into().ok())
                .collect();
            for entry in &due {
                batch.expire(entry)?;
            }
            (due.len(), batch.changes)
        };
        if handled > 0 {
            self.finish(tx, changes)?;
        }
        Ok(handled)
    }
}

/// The same failure again, for each write of a failed batch.
fn clone_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Corrupt(record) => StoreError::Corrupt(record.clone()),
        StoreError::Full(records) => StoreError::Full(*records),
        StoreError::Unavailable(_) => StoreError::unreachable(crate::error::Chain(err).to_string()),
    }
}

impl<'t> Batch<'t> {
    fn open(tx: &'t WriteTransaction, shared: &'t Shared) -> Result<Self, redb::Error> {
        Ok(Self {
            records: tx.open_table(RECORDS)?,
            expiry: tx.open_table(EXPIRY)?,
            changes: Changes::default(),
            shared,
            now_ms: unix_ms(),
        })
    }

    /// Applies one write. A damaged record is that write's `Corrupt` answer; a storage error
    /// aborts the whole transaction.
    fn apply(&mut self, op: Op) -> Result<Result<Answer, StoreError>, redb::Error> {
        let answer = match op {
            Op::Begin(claim) => self.begin(&claim).map(Answer::Begun),
            Op::Complete { key, token, record } => self.replace_owned(&key, token, Some(&record)).map(Answer::Done),
            Op::Release { key, token } => self.replace_owned(&key, token, None).map(Answer::Done),
            Op::Renew {
                key,
                token,
                lease_until_ms,
            } => self.renew(&key, token, lease_until_ms).map(Answer::Done),
            Op::Clear { key } => return self.clear(&key).map(|live| Ok(Answer::Done(live))),
        };
        match answer {
            Err(BatchError::Storage(err)) => Err(err),
            Err(BatchError::Store(err)) => Ok(Err(err)),
            Ok(answer) => Ok(Ok(answer)),
        }
    }

    /// The creation time of the key's record as this transaction sees it.
    fn locate(&self, digest: &[u8; 32]) -> Option<u64> {
        match self.changes.moved.get(digest) {
            Some(created) => *created,
            None => self.shared.index.get(digest),
        }
    }

    /// The key's record, expired or not; a damaged one is `Corrupt`.
    fn read(&self, digest: &[u8; 32]) -> Result<Option<Stored>, BatchError> {
        let Some(created_ms) = self.locate(digest) else {
            return Ok(None);
        };
        let key = record_key(created_ms, digest);
        let Some(value) = self.records.get(&key[..])? else {
            return Ok(None);
        };
        let value = value.value();
        let (expires_at_ms, record) = decode_value(&key, value).map_err(|err| corrupt(digest, err))?;
        Ok(Some(Stored {
            created_ms,
            expires_at_ms,
            record,
            len: value.len(),
        }))
    }

    /// The key's record if it has not expired.
    fn live(&self, digest: &[u8; 32]) -> Result<Option<Stored>, BatchError> {
        Ok(self.read(digest)?.filter(|s| s.expires_at_ms > self.now_ms))
    }

    /// docs/behaviour.md §4's table, applied: decided on the record as this transaction sees it.
    fn begin(&mut self, claim: &Claim) -> Result<Begin<LeaseToken>, BatchError> {
        let stored = self.read(&claim.key)?;
        let live = stored.as_ref().filter(|s| s.expires_at_ms > claim.now_ms);
        let existing = live.map(|s| Existing {
            lease_left: lease_left_at(&s.record, claim.now_ms),
            record: s.record.clone(),
        });
        let decision = decide(existing, &claim.print, claim.unknown_outcome);
        match (&decision, live) {
            (Decision::Execute, _) => {
                let (records, used) = self.shared.after(self.changes.delta);
                if used.saturating_add(footprint(claim.in_flight.len())) > self.shared.max_bytes {
                    return Err(BatchError::Store(StoreError::Full(records as usize)));
                }
                if let Some(old) = &stored {
                    self.remove(&claim.key, old)?;
                }
                self.create(&claim.key, claim.now_ms, claim.expires_at_ms, &claim.in_flight)?;
            }
            (Decision::TakeOver, Some(live)) => self.replace(&claim.key, live, &claim.in_flight)?,
            (Decision::MarkUnknown, Some(live)) => self.replace(&claim.key, live, &claim.lapsed)?,
            _ => {}
        }
        Ok(Begin::applied(decision, claim.token))
    }

    /// The owner's complete (`Some(record)`) or release (`None`). `false`: not the owner.
    fn replace_owned(
        &mut self,
        digest: &[u8; 32],
        token: LeaseToken,
        record: Option<&Bytes>,
    ) -> Result<bool, BatchError> {
        let Some(stored) = self.live(digest)?.filter(|s| owned_by(&s.record, token)) else {
            return Ok(false);
        };
        match record {
            Some(record) => self.replace(digest, &stored, record)?,
            None => self.remove(digest, &stored)?,
        }
        Ok(true)
    }

    fn renew(&mut self, digest: &[u8; 32], token: LeaseToken, until_ms: u64) -> Result<bool, BatchError> {
        let Some(mut stored) = self.live(digest)?.filter(|s| owned_by(&s.record, token)) else {
            return Ok(false);
        };
        if let Record::InFlight { lease_until_ms, .. } = &mut stored.record {
            *lease_until_ms = until_ms;
        }
        let record = stored.record.encode();
        self.replace(digest, &stored, &record)?;
        Ok(true)
    }

    /// Deletes the key whatever its record holds (damaged ones too: the operator's way out).
    /// Returns whether a live record was there.
    fn clear(&mut self, digest: &[u8; 32]) -> Result<bool, redb::Error> {
        let Some(created_ms) = self.locate(digest) else {
            return Ok(false);
        };
        let key = record_key(created_ms, digest);
        self.changes.moved.insert(*digest, None);
        let Some(old) = self.records.remove(&key[..])? else {
            return Ok(false);
        };
        let value = old.value();
        let expiry = value_expiry(&key, value);
        self.changes.delta.records -= 1;
        self.changes.delta.footprint -= footprint(value.len()) as i64;
        drop(old);
        match expiry {
            Ok(at) => {
                self.expiry.remove(&expiry_key(at, &key)[..])?;
                Ok(at > self.now_ms)
            }
            // Its expiry entry cannot be found; the sweep drops it when it comes due.
            Err(_) => Ok(true),
        }
    }

    /// Writes a new record for `digest`, created at `created_ms`.
    fn create(
        &mut self,
        digest: &[u8; 32],
        created_ms: u64,
        expires_at_ms: u64,
        record: &[u8],
    ) -> Result<(), BatchError> {
        let key = record_key(created_ms, digest);
        let value = encode_value(&key, expires_at_ms, record);
        self.records.insert(&key[..], &value[..])?;
        self.expiry.insert(&expiry_key(expires_at_ms, &key)[..], ())?;
        self.changes.delta.records += 1;
        self.changes.delta.footprint += footprint(value.len()) as i64;
        self.changes.moved.insert(*digest, Some(created_ms));
        Ok(())
    }

    /// Replaces the record `old` of `digest` with `record`, keeping its key and expiry.
    fn replace(&mut self, digest: &[u8; 32], old: &Stored, record: &[u8]) -> Result<(), BatchError> {
        let key = old.key(digest);
        let value = encode_value(&key, old.expires_at_ms, record);
        self.records.insert(&key[..], &value[..])?;
        self.changes.delta.footprint += footprint(value.len()) as i64 - footprint(old.len) as i64;
        Ok(())
    }

    /// Deletes the record `old` of `digest`.
    fn remove(&mut self, digest: &[u8; 32], old: &Stored) -> Result<(), BatchError> {
        let key = old.key(digest);
        self.records.remove(&key[..])?;
        self.expiry.remove(&expiry_key(old.expires_at_ms, &key)[..])?;
        self.changes.delta.records -= 1;
        self.changes.delta.footprint -= footprint(old.len) as i64;
        self.changes.moved.insert(*digest, None);
        Ok(())
    }

    /// Handles one due entry of the `expiry` table: removes it, and its record if the record
    /// still has that expiry (or is damaged: it would have expired by now).
    fn expire(&mut self, entry: &[u8; 48]) -> Result<(), redb::Error> {
        self.expiry.remove(&entry[..])?;
        let Some((due, key)) = split_expiry_key(entry) else {
            return Ok(());
        };
        let Some((created_ms, digest)) = super::format::split_record_key(&key) else {
            return Ok(());
        };
        let current = self
            .records
            .get(&key[..])?
            .map(|value| (value_expiry(&key, value.value()), value.value().len()));
        let Some((expiry, len)) = current else {
            return Ok(());
        };
        match expiry {
            Ok(at) if at != due => return Ok(()),
            Ok(_) => {}
            Err(_) => {
                tracing::error!(key = %hex::encode(&digest[..6]), "disk store: damaged record removed by the expiry sweep")
            }
        }
        self.records.remove(&key[..])?;
        self.changes.delta.records -= 1;
        self.changes.delta.footprint -= footprint(len) as i64;
        if self.locate(&digest) == Some(created_ms) {
            self.changes.moved.insert(digest, None);
        }
        Ok(())
    }
}

/// Whether `record` is InFlight and owned by `token`.
fn owned_by(record: &Record, token: LeaseToken) -> bool {
    matches!(record, Record::InFlight { owner, .. } if *owner == token)
}

/// An error of one write: its own (a damaged record, a full store), or the storage's, which
/// aborts the transaction.
enum BatchError {
    Store(StoreError),
    Storage(redb::Error),
}

impl From<redb::StorageError> for BatchError {
    fn from(err: redb::StorageError) -> Self {
        BatchError::Storage(err.into())
    }
}

impl From<StoreError> for BatchError {
    fn from(err: StoreError) -> Self {
        BatchError::Store(err)
    }
}
