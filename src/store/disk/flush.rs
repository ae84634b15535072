//! The writer's flushes, overlapped (docs/behaviour.md §11.1): a batch is written to the file at
//! once, and one of [`SYNCERS`] threads flushes it (`fdatasync`) while the writer goes on with
//! the next batch. A flush that returns makes durable every batch written before it began, so
//! batches are published (index updated, writes answered) in order, up to the newest one a
//! finished flush covered.
//!
//! Why: the writer takes in and writes the next batch while a flush runs. How many flushes may
//! run at once is [`SYNCERS`]: on a busy disk, two concurrent `fdatasync`s of one file take no
//! longer than one; on a fast one (0.1 ms) the benchmark is CPU-bound and fewer, larger flushes
//! cost less: with one, a first execution cost 49.8 µs of proxy CPU against 54.8 with two, and
//! ran at 0.46× the memory store against 0.41× (quiet runs, docs/performance.md).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::command::{Answer, Command, Reply};
use super::index::Entry;
use crate::store::StoreError;

/// Flushes that may run at once (see the module documentation).
pub const SYNCERS: usize = 1;

/// What the writer thread waits for.
pub enum Msg {
    Write(Command),
    /// Syncer `syncer` flushed the file up to batch `seq` (or failed to).
    Synced {
        syncer: usize,
        seq: u64,
        took: Duration,
        result: std::io::Result<()>,
    },
    /// The store is closing: flush, answer, and stop.
    Stop,
}

/// A key's newest state in a batch not yet published: its entry and encoded record, or deleted.
pub type Change = Option<(Entry, Bytes)>;

/// A batch written but not yet known durable.
pub struct Pending {
    pub seq: u64,
    /// Where it starts in the active segment (cut back to here if its flush fails).
    pub base: u64,
    pub changes: HashMap<[u8; 32], Change>,
    pub live_delta: i64,
    pub replies: Vec<(Reply, Result<Answer, StoreError>)>,
}

/// The flush threads and the batches waiting for them.
pub struct Flushes {
    jobs: Vec<Sender<(u64, Arc<File>)>>,
    threads: Vec<JoinHandle<()>>,
    idle: Vec<usize>,
    /// The newest batch written, the newest handed to a flush, the newest known durable.
    pub written: u64,
    dispatched: u64,
    pub durable: u64,
    pub pending: VecDeque<Pending>,
    /// The changes of the pending batches, newest per key (with its batch): what a new batch
    /// reads before the index.
    pub overlay: HashMap<[u8; 32], (u64, Change)>,
    /// The pending batches' change to the live frames' bytes.
    pub pending_live: i64,
    /// The flushes under way, in the order they began, with their result once returned.
    running: VecDeque<(u64, Option<std::io::Result<()>>)>,
}

impl Flushes {
    /// Starts the flush threads; they report to `done`.
    pub fn start(done: &Sender<Msg>) -> std::io::Result<Self> {
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for syncer in 0..SYNCERS {
            let (job, receiver) = mpsc::channel();
            let done = done.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("idemproxy-disk-flush".into())
                    .spawn(move || sync_loop(syncer, receiver, done))?,
            );
            jobs.push(job);
        }
        Ok(Self {
            jobs,
            threads,
            idle: (0..SYNCERS).collect(),
            written: 0,
            dispatched: 0,
            durable: 0,
            pending: VecDeque::new(),
            overlay: HashMap::new(),
            pending_live: 0,
            running: VecDeque::new(),
        })
    }

    /// Numbers a batch just written and keeps it until it is durable.
    pub fn push(&mut self, mut pending: Pending) {
        self.written += 1;
        pending.seq = self.written;
        for (digest, change) in &pending.changes {
            self.overlay.insert(*digest, (pending.seq, change.clone()));
        }
        self.pending_live += pending.live_delta;
        self.pending.push_back(pending);
    }

    /// Hands what is written and not yet being flushed to an idle flush thread, if any.
    pub fn dispatch(&mut self, files: &[Arc<File>]) {
        if self.dispatched >= self.written {
            return;
        }
        let Some(syncer) = self.idle.pop() else {
            return;
        };
        let Some(file) = files.get(syncer) else {
            self.idle.push(syncer);
            return;
        };
        if self.jobs[syncer].send((self.written, file.clone())).is_ok() {
            self.dispatched = self.written;
            self.running.push_back((self.written, None));
        } else {
            self.idle.push(syncer);
        }
    }

    /// Everything written is durable (flushed on the writer's own thread).
    pub fn all_durable(&mut self) {
        self.durable = self.written;
        self.dispatched = self.written;
    }

    /// Flush thread `syncer` finished its flush up to `seq`. Flushes count in the order they
    /// began: a batch is durable once every flush that began before the one covering it has
    /// returned too, so that an error any of them reports fails every batch not yet answered.
    pub fn finished(&mut self, syncer: usize, seq: u64, result: std::io::Result<()>) -> std::io::Result<()> {
        self.idle.push(syncer);
        if let Some(slot) = self.running.iter_mut().find(|(s, _)| *s == seq) {
            slot.1 = Some(result);
        }
        while let Some((seq, Some(_))) = self.running.front() {
            let seq = *seq;
            if let Some((_, Some(Err(err)))) = self.running.pop_front() {
                return Err(err);
            }
            self.durable = self.durable.max(seq);
        }
        Ok(())
    }

    /// The next batch that is durable now, if any (in order).
    pub fn next_durable(&mut self) -> Option<Pending> {
        if self.pending.front()?.seq > self.durable {
            return None;
        }
        let pending = self.pending.pop_front()?;
        for digest in pending.changes.keys() {
            if self.overlay.get(digest).is_some_and(|(seq, _)| *seq == pending.seq) {
                self.overlay.remove(digest);
            }
        }
        self.pending_live -= pending.live_delta;
        Some(pending)
    }

    /// Every pending batch, failed: where the oldest began (to cut the file back to).
    pub fn fail_all(&mut self) -> (Option<u64>, Vec<Pending>) {
        let failed: Vec<Pending> = self.pending.drain(..).collect();
        self.overlay.clear();
        self.pending_live = 0;
        self.durable = self.written;
        self.dispatched = self.written;
        (failed.first().map(|p| p.base), failed)
    }

    /// Stops the flush threads (after their current flush).
    pub fn stop(&mut self) {
        self.jobs.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn sync_loop(syncer: usize, jobs: Receiver<(u64, Arc<File>)>, done: Sender<Msg>) {
    for (seq, file) in jobs {
        let started = Instant::now();
        let result = file.sync_data();
        let took = started.elapsed();
        if done
            .send(Msg::Synced {
                syncer,
                seq,
                took,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_durable_once_every_earlier_flush_returned_and_an_error_fails_it() {
        let (done, _messages) = mpsc::channel();
        let mut flushes = Flushes::start(&done).expect("flush threads");
        flushes.idle.clear();
        flushes.running.extend([(1, None), (2, None)]);
        assert!(flushes.finished(1, 2, Ok(())).is_ok());
        assert_eq!(flushes.durable, 0, "the flush that began first has not returned");
        let failed = flushes.finished(0, 1, Err(std::io::Error::other("EIO")));
        assert!(failed.is_err(), "its error fails what the later flush covered too");
        flushes.running.extend([(3, None), (4, None)]);
        assert!(flushes.finished(0, 3, Ok(())).is_ok());
        assert_eq!(flushes.durable, 3);
        assert!(flushes.finished(1, 4, Ok(())).is_ok());
        assert_eq!(flushes.durable, 4);
        flushes.stop();
    }
}
