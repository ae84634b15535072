//! The shared idle connections: one list per upstream origin (scheme + authority, RFC 9110
//! §4.3.1), kept for reuse as RFC 9112 §9.3 persistent connections. At most
//! `upstream.pool_max_idle_per_host` per origin (the oldest go first), none idle for longer than
//! `upstream.pool_idle_timeout`, and a connection the upstream closed is never handed out.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::Uri;

use super::connection::Sender;

/// Shortest pause between two sweeps of the idle reaper.
const REAPER_MIN_PERIOD: Duration = Duration::from_millis(100);

/// The idle lists of every origin, indexed by pool number (resolved per route at start-up, so
/// no hashing per request), and their limits.
pub(super) struct Pools {
    pools: Box<[Pool]>,
    idle_timeout: Duration,
    max_idle: usize,
}

/// The idle connections to one upstream origin, most recently used last.
struct Pool {
    /// `scheme://authority` the connector dials.
    origin: Uri,
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: Sender,
    /// When it went idle.
    since: Instant,
}

impl Pools {
    /// Empty pools for `origins` (pool `i` is `origins[i]`).
    pub(super) fn new(origins: Vec<Uri>, idle_timeout: Duration, max_idle: usize) -> Self {
        let pools = origins
            .into_iter()
            .map(|origin| Pool {
                origin,
                idle: Mutex::new(VecDeque::new()),
            })
            .collect();
        Self {
            pools,
            idle_timeout,
            max_idle,
        }
    }

    /// The origin pool `pool` connects to.
    pub(super) fn origin(&self, pool: usize) -> &Uri {
        &self.pools[pool].origin
    }

    /// An idle, still open connection to `pool`, the most recently used first; the stale ones
    /// met on the way (closed, or idle past the timeout) are dropped.
    pub(super) fn take(&self, pool: usize) -> Option<Sender> {
        let mut idle = self.idle(pool);
        while let Some(entry) = idle.pop_back() {
            if entry.sender.is_ready() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Keeps `sender` once its exchange in progress is over (its response body read): now if it
    /// is idle already, else from a task that waits for it. Outside a Tokio runtime (a client
    /// connection's slot dropped during shutdown) a busy connection is not kept: dropping its
    /// sender lets it finish the exchange, then it closes.
    pub(super) fn put_when_ready(self: &Arc<Self>, pool: usize, mut sender: Sender) {
        if sender.is_ready() {
            self.put(pool, sender);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pools = Arc::downgrade(self);
        runtime.spawn(async move {
            if sender.ready().await.is_ok() {
                if let Some(pools) = pools.upgrade() {
                    pools.put(pool, sender);
                }
            }
        });
    }

    /// Keeps an idle connection (closed ones are dropped, and the oldest over `max_idle`).
    fn put(&self, pool: usize, sender: Sender) {
        if !sender.is_ready() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle(pool);
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes, in every pool, the oldest connections while they are idle past `idle_timeout`
    /// or closed by the upstream (the rest are dropped when [`take`](Self::take) meets them).
    pub(super) fn close_expired(&self) {
        for pool in 0..self.pools.len() {
            let mut idle = self.idle(pool);
            while idle
                .front()
                .is_some_and(|entry| entry.since.elapsed() >= self.idle_timeout || entry.sender.is_closed())
            {
                idle.pop_front();
            }
        }
    }

    /// Runs [`close_expired`](Self::close_expired) every half `idle_timeout` (at least every
    /// [`REAPER_MIN_PERIOD`]) until the pools are dropped. Holds them weakly: it keeps nothing
    /// alive.
    pub(super) fn reaper(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let period = (self.idle_timeout / 2).max(REAPER_MIN_PERIOD);
        let pools = Arc::downgrade(self);
        async move {
            while let Some(live) = pools.upgrade() {
                live.close_expired();
                drop(live);
                tokio::time::sleep(period).await;
            }
        }
    }

    /// Pool `pool`'s idle list, locked (a panic elsewhere while it was held leaves it usable).
    fn idle(&self, pool: usize) -> MutexGuard<'_, VecDeque<Idle>> {
        self.pools[pool].idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many idle connections pool `pool` holds.
    #[cfg(test)]
    pub(super) fn idle_count(&self, pool: usize) -> usize {
        self.idle(pool).len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{assert_is, close, eventually, hold, open, port_of, serve};
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    fn pools(idle_timeout: Duration, max_idle: usize) -> Arc<Pools> {
        let origin = Uri::from_static("http://upstream.test/");
        Arc::new(Pools::new(vec![origin], idle_timeout, max_idle))
    }

    #[tokio::test]
    async fn take_hands_out_the_most_recently_used_first() {
        let server = serve().await;
        let pools = pools(LONG, 8);
        let (older, newer) = (open(server.addr).await, open(server.addr).await);
        pools.put_when_ready(0, older.sender);
        pools.put_when_ready(0, newer.sender);

        assert_is(pools.take(0), newer.port, "an idle connection").await;
        assert_is(pools.take(0), older.port, "another idle connection").await;
        assert!(pools.take(0).is_none());
    }

    #[tokio::test]
    async fn past_max_idle_the_oldest_is_dropped() {
        let server = serve().await;
        let pools = pools(LONG, 2);
        let oldest = open(server.addr).await;
        let middle = open(server.addr).await;
        let newest = open(server.addr).await;
        for sender in [oldest.sender, middle.sender, newest.sender] {
            pools.put_when_ready(0, sender);
        }

        let mut kept = Vec::new();
        while let Some(mut sender) = pools.take(0) {
            kept.push(port_of(&mut sender).await);
        }
        assert_eq!(kept, [newest.port, middle.port]);
    }

    #[tokio::test]
    async fn max_idle_zero_keeps_nothing() {
        let server = serve().await;
        let pools = pools(LONG, 0);
        pools.put_when_ready(0, open(server.addr).await.sender);
        assert_eq!(pools.idle_count(0), 0);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_not_handed_out() {
        let server = serve().await;
        // A zero timeout: every idle connection has expired as soon as it is kept.
        let pools = pools(Duration::ZERO, 8);
        pools.put_when_ready(0, open(server.addr).await.sender);
        assert_eq!(pools.idle_count(0), 1);

        assert!(pools.take(0).is_none());
        assert_eq!(pools.idle_count(0), 0, "the expired connection is dropped, not kept");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_never_handed_out() {
        let server = serve().await;
        let pools = pools(LONG, 8);
        let (live, closed) = (open(server.addr).await, open(server.addr).await);
        pools.put_when_ready(0, live.sender);
        pools.put_when_ready(0, closed.sender);
        close(closed.task).await;

        assert_is(pools.take(0), live.port, "the live connection").await;
        assert!(pools.take(0).is_none());
    }

    #[tokio::test]
    async fn a_closed_connection_is_not_kept() {
        let server = serve().await;
        let pools = pools(LONG, 8);
        let closed = open(server.addr).await;
        close(closed.task).await;
        pools.put_when_ready(0, closed.sender);
        assert_eq!(pools.idle_count(0), 0);
    }

    #[tokio::test]
    async fn close_expired_drops_the_expired_connections() {
        let server = serve().await;
        let expiring = pools(Duration::ZERO, 8);
        let lasting = pools(LONG, 8);
        expiring.put_when_ready(0, open(server.addr).await.sender);
        lasting.put_when_ready(0, open(server.addr).await.sender);

        expiring.close_expired();
        lasting.close_expired();
        assert_eq!(expiring.idle_count(0), 0);
        assert_eq!(lasting.idle_count(0), 1);
    }

    #[tokio::test]
    async fn close_expired_drops_the_closed_connections() {
        let server = serve().await;
        let pools = pools(LONG, 8);
        let (closed, live) = (open(server.addr).await, open(server.addr).await);
        pools.put_when_ready(0, closed.sender);
        pools.put_when_ready(0, live.sender);
        close(closed.task).await;

        pools.close_expired();
        assert_eq!(pools.idle_count(0), 1);
        assert_is(pools.take(0), live.port, "the live connection").await;
    }

    #[tokio::test]
    async fn a_busy_connection_given_back_joins_the_pool_when_its_exchange_ends() {
        let server = serve().await;
        let pools = pools(LONG, 8);
        let mut busy = open(server.addr).await;
        let exchange = hold(&mut busy.sender);
        pools.put_when_ready(0, busy.sender);
        assert_eq!(pools.idle_count(0), 0, "not idle while its exchange is in progress");

        server.release();
        exchange.await;
        let mut taken = eventually(|| pools.take(0)).await;
        assert_eq!(port_of(&mut taken).await, busy.port);
    }

    #[tokio::test]
    async fn the_reaper_closes_expired_connections_and_ends_with_the_pools() {
        let server = serve().await;
        let pools = pools(Duration::ZERO, 8);
        let reaper = tokio::spawn(pools.reaper());
        pools.put_when_ready(0, open(server.addr).await.sender);

        eventually(|| (pools.idle_count(0) == 0).then_some(())).await;
        drop(pools);
        tokio::time::timeout(Duration::from_secs(5), reaper)
            .await
            .expect("the reaper ends once the pools are dropped")
            .expect("the reaper does not panic");
    }
}
