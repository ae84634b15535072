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

use super::format::{decode_value, digest_of_expiry_key, encode_value, expiry_key, value_expiry};
use super::{corrupt, footprint, lease_left_at, storage_failure, unpanicked, Shared, EXPIRY, META, RECORDS};
use crate::config::UnknownOutcome;
use crate::idempotency::{decide, unix_ms, Decision, Existing, Fingerprint, LeaseToken, Record};
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
    pub fingerprint: Fingerprint,
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
    expires_at_ms: u64,
    record: Record,
    len: usize,
}

/// Changes of a transaction to the record count and the estimated footprint, applied to
/// [`Shared`] once it committed.
#[derive(Default, Clone, Copy)]
pub struct Delta {
    pub records: i64,
    pub footprint: i64,
}

/// The open tables of one write transaction, and what it changed so far.
struct Batch<'t> {
    records: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, &'static [u8], ()>,
    delta: Delta,
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
        let transacted = unpanicked(|| self.transact(flush, ops));
        let transacted = match transacted {
            Ok(transacted) => transacted,
            Err(err) => {
                tracing::error!(error = %err, "disk store: commit failed");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Corrupt(err.clone())));
                }
                return;
            }
        };
        match transacted {
            Ok(answers) => {
                if flush {
                    self.shared.flushed(started.elapsed());
                }
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            Err(err) => {
                tracing::error!(error = %crate::error::Chain(&err), "disk store: commit failed");
                for reply in replies {
                    let _ = reply.send(Err(storage_failure(&err)));
                }
            }
        }
    }

    /// One write transaction over `ops`: their answers, or the error that aborted it.
    fn transact(&self, flush: bool, ops: Vec<Op>) -> Result<Vec<Result<Answer, StoreError>>, redb::Error> {
        let mut tx = self.db.begin_write()?;
        if !flush {
            tx.set_durability(Durability::None)?;
        }
        let (answers, delta) = {
            let mut batch = Batch::open(&tx)?;
            let answers = ops
                .into_iter()
                .map(|op| batch.apply(op, &self.shared))
                .collect::<Result<Vec<_>, _>>()?;
            (answers, batch.delta)
        };
        self.finish(tx, delta)?;
        Ok(answers)
    }

    /// Stores the counters with the transaction's changes and commits it.
    fn finish(&self, tx: WriteTransaction, delta: Delta) -> Result<(), redb::Error> {
        let (records, footprint) = self.shared.after(delta);
        {
            let mut meta = tx.open_table(META)?;
            meta.insert("records", records)?;
            meta.insert("footprint", footprint)?;
        }
        tx.commit()?;
        self.shared.apply(delta);
        Ok(())
    }

    /// Removes up to [`SWEEP_BATCH`] records whose `key_ttl` has passed; returns how many
    /// expiry entries it handled.
    fn sweep(&self) -> Result<usize, redb::Error> {
        let mut tx = self.db.begin_write()?;
        // An expired record brought back by a crash is still expired: no flush needed.
        tx.set_durability(Durability::None)?;
        let (handled, delta) = {
            let mut batch = Batch::open(&tx)?;
            let end = expiry_key(batch.now_ms, &[0; 32]);
            let due: Vec<[u8; 40]> = batch
                .expiry
                .range::<&[u8]>(..&end[..])?
                .take(SWEEP_BATCH)
                .filter_map(|entry| entry.ok()?.0.value().try_into().ok())
                .collect();
            for entry in &due {
                batch.expire(entry)?;
            }
            (due.len(), batch.delta)
        };
        if handled > 0 {
            self.finish(tx, delta)?;
        }
        Ok(handled)
    }
}

impl<'t> Batch<'t> {
    fn open(tx: &'t WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            records: tx.open_table(RECORDS)?,
            expiry: tx.open_table(EXPIRY)?,
            delta: Delta::default(),
            now_ms: unix_ms(),
        })
    }

    /// Applies one write. A damaged record is that write's `Corrupt` answer; a storage error
    /// aborts the whole transaction.
    fn apply(&mut self, op: Op, shared: &Shared) -> Result<Result<Answer, StoreError>, redb::Error> {
        let answer = match op {
            Op::Begin(claim) => self.begin(&claim, shared).map(Answer::Begun),
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

    /// The key's record, expired or not; a damaged one is `Corrupt`.
    fn read(&self, key: &[u8; 32]) -> Result<Option<Stored>, BatchError> {
        let Some(value) = self.records.get(&key[..])? else {
            return Ok(None);
        };
        let value = value.value();
        let (expires_at_ms, record) = decode_value(key, value).map_err(|err| corrupt(key, err))?;
        Ok(Some(Stored {
            expires_at_ms,
            record,
            len: value.len(),
        }))
    }

    /// The key's record if it has not expired.
    fn live(&self, key: &[u8; 32]) -> Result<Option<Stored>, BatchError> {
        Ok(self.read(key)?.filter(|s| s.expires_at_ms > self.now_ms))
    }

    /// docs/behaviour.md §4's table, applied: decided on the record as this transaction sees it.
    fn begin(&mut self, claim: &Claim, shared: &Shared) -> Result<Begin<LeaseToken>, BatchError> {
        let stored = self.read(&claim.key)?;
        let live = stored.as_ref().filter(|s| s.expires_at_ms > claim.now_ms);
        let expires_at_ms = live.map(|s| s.expires_at_ms);
        let existing = live.map(|s| Existing {
            lease_left: lease_left_at(&s.record, claim.now_ms),
            record: s.record.clone(),
        });
        let decision = decide(existing, &claim.fingerprint, claim.unknown_outcome);
        match (&decision, expires_at_ms) {
            (Decision::Execute, _) => {
                let (records, used) = shared.after(self.delta);
                if used.saturating_add(footprint(claim.in_flight.len())) > shared.max_bytes {
                    return Err(BatchError::Store(StoreError::Full(records as usize)));
                }
                if let Some(old) = &stored {
                    self.remove(&claim.key, old.expires_at_ms, old.len)?;
                }
                self.put(&claim.key, claim.expires_at_ms, &claim.in_flight, None)?;
            }
            (Decision::TakeOver, Some(expires)) => self.put(&claim.key, expires, &claim.in_flight, stored.as_ref())?,
            (Decision::MarkUnknown, Some(expires)) => self.put(&claim.key, expires, &claim.lapsed, stored.as_ref())?,
            _ => {}
        }
        Ok(Begin::applied(decision, claim.token))
    }

    /// The owner's complete (`Some(record)`) or release (`None`). `false`: not the owner.
    fn replace_owned(&mut self, key: &[u8; 32], token: LeaseToken, record: Option<&Bytes>) -> Result<bool, BatchError> {
        let Some(stored) = self.live(key)?.filter(|s| owned_by(&s.record, token)) else {
            return Ok(false);
        };
        match record {
            Some(record) => self.put(key, stored.expires_at_ms, record, Some(&stored))?,
            None => self.remove(key, stored.expires_at_ms, stored.len)?,
        }
        Ok(true)
    }

    fn renew(&mut self, key: &[u8; 32], token: LeaseToken, until_ms: u64) -> Result<bool, BatchError> {
        let Some(mut stored) = self.live(key)?.filter(|s| owned_by(&s.record, token)) else {
            return Ok(false);
        };
        if let Record::InFlight { lease_until_ms, .. } = &mut stored.record {
            *lease_until_ms = until_ms;
        }
        let record = stored.record.encode();
        self.put(key, stored.expires_at_ms, &record, Some(&stored))?;
        Ok(true)
    }

    /// Deletes the key whatever its record holds (damaged ones too: the operator's way out).
    /// Returns whether a live record was there.
    fn clear(&mut self, key: &[u8; 32]) -> Result<bool, redb::Error> {
        let Some(old) = self.records.remove(&key[..])? else {
            return Ok(false);
        };
        let value = old.value();
        let expiry = value_expiry(key, value);
        self.delta.records -= 1;
        self.delta.footprint -= footprint(value.len()) as i64;
        let live = match expiry {
            Ok(at) => {
                drop(old);
                self.expiry.remove(&expiry_key(at, key)[..])?;
                at > self.now_ms
            }
            // Its expiry entry cannot be found; the sweep drops it when it comes due.
            Err(_) => true,
        };
        Ok(live)
    }

    /// Writes `record` under `key` (replacing `old`, if given, whose expiry it keeps).
    fn put(
        &mut self,
        key: &[u8; 32],
        expires_at_ms: u64,
        record: &[u8],
        old: Option<&Stored>,
    ) -> Result<(), BatchError> {
        let value = encode_value(key, expires_at_ms, record);
        self.records.insert(&key[..], &value[..])?;
        self.delta.footprint += footprint(value.len()) as i64;
        match old {
            Some(old) => self.delta.footprint -= footprint(old.len) as i64,
            None => {
                self.delta.records += 1;
                self.expiry.insert(&expiry_key(expires_at_ms, key)[..], ())?;
            }
        }
        Ok(())
    }

    /// Deletes a record whose expiry is `expires_at_ms` and stored length `len`.
    fn remove(&mut self, key: &[u8; 32], expires_at_ms: u64, len: usize) -> Result<(), BatchError> {
        self.records.remove(&key[..])?;
        self.expiry.remove(&expiry_key(expires_at_ms, key)[..])?;
        self.delta.records -= 1;
        self.delta.footprint -= footprint(len) as i64;
        Ok(())
    }

    /// Handles one due entry of the `expiry` table: removes it, and its record if the record
    /// still has that expiry (or is damaged: it would have expired by now).
    fn expire(&mut self, entry: &[u8; 40]) -> Result<(), redb::Error> {
        self.expiry.remove(&entry[..])?;
        let Some(key) = digest_of_expiry_key(entry) else {
            return Ok(());
        };
        let current = self
            .records
            .get(&key[..])?
            .map(|value| (value_expiry(&key, value.value()), value.value().len()));
        let mut due = [0u8; 8];
        due.copy_from_slice(&entry[..8]);
        let due = u64::from_be_bytes(due);
        match current {
            Some((Ok(at), len)) if at == due => {
                self.records.remove(&key[..])?;
                self.delta.records -= 1;
                self.delta.footprint -= footprint(len) as i64;
            }
            Some((Err(_), len)) => {
                tracing::error!(key = %hex::encode(&key[..6]), "disk store: damaged record removed by the expiry sweep");
                self.records.remove(&key[..])?;
                self.delta.records -= 1;
                self.delta.footprint -= footprint(len) as i64;
            }
            _ => {}
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
