//! The shutdown signal of HTTP/1.1 connections, checked on every poll of a connection for the
//! price of one atomic load.
//!
//! hyper-util's `GracefulShutdown::watch` polls a `watch::Receiver::changed` future each time
//! the connection it wraps is polled (two to three times a request): about 320 instructions per
//! request (callgrind). Here a connection registers its task's waker once, and each poll only
//! loads a flag and compares the waker with the registered one. [`Stop::stop`] sets the flag and
//! wakes every registered connection, which then starts hyper's graceful shutdown (an idle
//! connection closes at once, a busy one after its response).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::{GracefulConnection, Watcher};

/// Whether shutdown started, and the wakers of the connections to tell.
#[derive(Default)]
pub struct Stop {
    stopping: AtomicBool,
    next_id: AtomicU64,
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Stop {
    /// Starts shutdown: every connection watched by [`Stop::watch`] closes gracefully.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, waker) in self.wakers().drain() {
            waker.wake();
        }
    }

    /// `connection`, closed gracefully when [`Stop::stop`] is called. `watcher` is held until it
    /// ends, so that hyper-util's `GracefulShutdown` drain waits for it.
    pub fn watch<C: GracefulConnection + Unpin>(self: &Arc<Self>, connection: C, watcher: Watcher) -> Watched<C> {
        Watched {
            connection,
            stop: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            registered: None,
            closing: false,
            _watcher: watcher,
        }
    }

    fn wakers(&self) -> MutexGuard<'_, HashMap<u64, Waker>> {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An HTTP/1.1 connection watched for shutdown ([`Stop::watch`]).
pub struct Watched<C> {
    connection: C,
    stop: Arc<Stop>,
    id: u64,
    /// The waker registered with `stop` (a spawned task's waker does not change).
    registered: Option<Waker>,
    closing: bool,
    _watcher: Watcher,
}

impl<C> Watched<C> {
    /// Whether shutdown started; registers `waker` to hear of it first, unless it is registered.
    fn stopping(&mut self, waker: &Waker) -> bool {
        if self.stop.stopping.load(Ordering::SeqCst) {
            return true;
        }
        if self.registered.as_ref().is_some_and(|w| w.will_wake(waker)) {
            return false;
        }
        self.stop.wakers().insert(self.id, waker.clone());
        self.registered = Some(waker.clone());
        // `stop` may have run between the load above and the insert: it set the flag first.
        self.stop.stopping.load(Ordering::SeqCst)
    }
}

impl<C: GracefulConnection + Unpin> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.closing && this.stopping(cx.waker()) {
            this.closing = true;
            Pin::new(&mut this.connection).graceful_shutdown();
        }
        Pin::new(&mut this.connection).poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.registered.is_some() {
            self.stop.wakers().remove(&self.id);
        }
    }
}
