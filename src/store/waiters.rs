//! Requests waiting for a key in flight (`on_conflict = "wait"`, docs/behaviour.md §15), woken
//! when its owner settles it instead of polling the store.
//!
//! [`Waiters`] is one small registry per store: key digest → a [`watch`] channel carrying how
//! many times the key settled. A waiting request [`watch`](Waiters::watch)es its key before it
//! looks at it, so a settlement between that look and its wait is never missed; the entry goes
//! when the key's last waiter leaves. The owner's side, [`settled`](Waiters::settled), runs on
//! every completion and release: with nobody waiting it is one atomic load (no lock, no
//! allocation). A store shared by several processes (Redis) also wakes its waiters from its
//! subscription to the keys' channels, and counts a lost subscription on [`Waiters::lost`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;

/// A key's waiters, and how many times the key settled since the first of them came.
struct Entry {
    settled: watch::Sender<u64>,
    waiters: usize,
}

/// See the module documentation.
pub struct Waiters {
    /// Keys waited for (entries in `keys`): the owner's side reads only this when it is zero.
    waited: AtomicUsize,
    keys: Mutex<HashMap<[u8; 32], Entry>>,
    /// Bumped when the store's subscription to the keys' channels was lost: a message may have
    /// been missed, so every waiter looks at its key again (Redis only).
    lost: watch::Sender<u64>,
}

impl Default for Waiters {
    fn default() -> Self {
        Self {
            waited: AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
            lost: watch::Sender::new(0),
        }
    }
}

impl Waiters {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a waiter for the key of `digest`, armed: a settlement from now on wakes it.
    pub fn watch(self: &Arc<Self>, digest: &[u8; 32]) -> Watch {
        let settled = {
            let mut keys = self.lock();
            let entry = keys.entry(*digest).or_insert_with(|| {
                self.waited.fetch_add(1, Ordering::SeqCst);
                Entry {
                    settled: watch::Sender::new(0),
                    waiters: 0,
                }
            });
            entry.waiters += 1;
            entry.settled.subscribe()
        };
        Watch {
            waiters: self.clone(),
            digest: *digest,
            settled,
            lost: self.lost.subscribe(),
        }
    }

    /// The key of `digest` settled (completed, released, marked unknown or cleared): wakes its
    /// waiters. One atomic load when nobody waits for any key.
    pub fn settled(&self, digest: &[u8; 32]) {
        if self.waited.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(entry) = self.lock().get(digest) {
            entry.settled.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The subscription that carries other processes' settlements was lost: every waiter looks
    /// at its key again.
    pub fn lost(&self) {
        self.lost.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// How many keys are waited for now.
    pub fn keys_waited(&self) -> usize {
        self.waited.load(Ordering::SeqCst)
    }

    fn leave(&self, digest: &[u8; 32]) {
        let mut keys = self.lock();
        if let Some(entry) = keys.get_mut(digest) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                keys.remove(digest);
                self.waited.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// A poisoned lock still holds a usable map (every change is one complete statement).
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a waiter woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Its key settled.
    Settled,
    /// The subscription that would have told it was lost (and is being made again).
    Lost,
    /// Its deadline passed.
    TimedOut,
}

/// One waiter's registration; leaving (dropping it) removes the key's entry if it was the last.
pub struct Watch {
    waiters: Arc<Waiters>,
    digest: [u8; 32],
    settled: watch::Receiver<u64>,
    lost: watch::Receiver<u64>,
}

impl Watch {
    /// Waits until the key settles, the subscription is lost, or `deadline`, whichever is
    /// first; then re-arms, so that a settlement during the waiter's next look wakes it again.
    pub async fn wake(&mut self, deadline: Instant) -> Woken {
        let woken = tokio::select! {
            biased;
            changed = self.settled.changed() => match changed {
                Ok(()) => Woken::Settled,
                // The sender lives in the registry as long as this registration: not reached.
                Err(_) => Woken::TimedOut,
            },
            Ok(()) = self.lost.changed() => Woken::Lost,
            () = tokio::time::sleep_until(deadline) => Woken::TimedOut,
        };
        self.settled.borrow_and_update();
        self.lost.borrow_and_update();
        woken
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.waiters.leave(&self.digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const KEY: [u8; 32] = [7; 32];

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_settlement_after_watching_wakes_every_waiter_of_the_key() {
        let waiters = Waiters::new();
        let mut first = waiters.watch(&KEY);
        let mut second = waiters.watch(&KEY);
        let mut other = waiters.watch(&[8; 32]);
        // Settled before the waiters await: still seen.
        waiters.settled(&KEY);
        assert_eq!(first.wake(soon()).await, Woken::Settled);
        assert_eq!(second.wake(soon()).await, Woken::Settled);
        let quiet = Instant::now() + Duration::from_millis(20);
        assert_eq!(other.wake(quiet).await, Woken::TimedOut);
    }

    #[tokio::test]
    async fn a_waiter_is_re_armed_after_waking() {
        let waiters = Waiters::new();
        let mut watch = waiters.watch(&KEY);
        waiters.settled(&KEY);
        assert_eq!(watch.wake(soon()).await, Woken::Settled);
        let quiet = Instant::now() + Duration::from_millis(20);
        assert_eq!(watch.wake(quiet).await, Woken::TimedOut, "one settlement wakes once");
        waiters.settled(&KEY);
        assert_eq!(watch.wake(soon()).await, Woken::Settled);
    }

    #[tokio::test]
    async fn a_lost_subscription_wakes_every_waiter() {
        let waiters = Waiters::new();
        let mut a = waiters.watch(&KEY);
        let mut b = waiters.watch(&[9; 32]);
        waiters.lost();
        assert_eq!(a.wake(soon()).await, Woken::Lost);
        assert_eq!(b.wake(soon()).await, Woken::Lost);
    }

    #[test]
    fn entries_go_with_their_last_waiter() {
        let waiters = Waiters::new();
        assert_eq!(waiters.keys_waited(), 0);
        let a = waiters.watch(&KEY);
        let b = waiters.watch(&KEY);
        assert_eq!(waiters.keys_waited(), 1);
        drop(a);
        assert_eq!(waiters.keys_waited(), 1);
        drop(b);
        assert_eq!(waiters.keys_waited(), 0);
        assert!(waiters.lock().is_empty());
        // Nobody waits: nothing to do.
        waiters.settled(&KEY);
    }
}
