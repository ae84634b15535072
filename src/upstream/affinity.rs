//! The per-client-connection slot: the upstream connection a client connection used last, kept
//! for that connection's next request, so a keep-alive client's requests go over one upstream
//! connection without a trip through the shared pool (as nginx's keepalive upstreams and
//! Pingora's connection reuse do).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::connection::Sender;
use super::pool::Pools;

/// The upstream connection one client connection used last, with the pool it belongs to.
/// Given back to the pool when the client connection ends (when this is dropped).
pub struct Affinity {
    pools: Arc<Pools>,
    held: Mutex<Option<(usize, Sender)>>,
}

impl Affinity {
    /// An empty slot whose connections go back to `pools`.
    pub(super) fn new(pools: Arc<Pools>) -> Self {
        Self {
            pools,
            held: Mutex::new(None),
        }
    }

    /// The held connection if it goes to `pool` and is idle now. One the upstream closed is let
    /// go; a busy one (a concurrent HTTP/2 stream's exchange) stays held.
    pub(super) fn take(&self, pool: usize) -> Option<Sender> {
        let mut held = self.held();
        match &*held {
            Some((held_pool, sender)) if *held_pool == pool && sender.is_ready() => held.take().map(|(_, s)| s),
            Some((_, sender)) if sender.is_closed() => {
                *held = None;
                None
            }
            _ => None,
        }
    }

    /// Holds `sender`, the connection this client connection used last. The one held before
    /// goes back to the pool, unless it is a live one to the same origin (a concurrent HTTP/2
    /// stream's connection, still busy): then `sender` goes back instead.
    pub(super) fn keep(&self, pool: usize, sender: Sender) {
        let mut held = self.held();
        let give_back = match held.take() {
            Some((held_pool, held_sender)) if held_pool == pool && !held_sender.is_closed() => {
                *held = Some((held_pool, held_sender));
                Some((pool, sender))
            }
            previous => {
                *held = Some((pool, sender));
                previous
            }
        };
        drop(held);
        if let Some((pool, sender)) = give_back {
            self.pools.put_when_ready(pool, sender);
        }
    }

    /// The slot, locked (a panic elsewhere while it was held leaves it usable).
    fn held(&self) -> MutexGuard<'_, Option<(usize, Sender)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some((pool, sender)) = held {
            self.pools.put_when_ready(pool, sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Uri;

    use super::super::test_support::{assert_is, close, eventually, hold, open, port_of, serve};
    use super::*;

    /// Pools for two origins, `0` and `1` (the connections all go to one test server: the pool
    /// number is what the slot compares).
    fn pools() -> Arc<Pools> {
        let origins = vec![Uri::from_static("http://a.test/"), Uri::from_static("http://b.test/")];
        Arc::new(Pools::new(origins, Duration::from_secs(3600), 8))
    }

    #[tokio::test]
    async fn the_held_idle_connection_is_reused_for_its_origin_only() {
        let server = serve().await;
        let affinity = Affinity::new(pools());
        let conn = open(server.addr).await;
        affinity.keep(0, conn.sender);

        assert!(affinity.take(1).is_none(), "another origin's request does not get it");
        assert_is(affinity.take(0), conn.port, "the held connection").await;
        assert!(affinity.take(0).is_none(), "taken: the slot is empty");
    }

    #[tokio::test]
    async fn keep_for_another_origin_gives_the_previous_back_to_the_pool() {
        let server = serve().await;
        let pools = pools();
        let affinity = Affinity::new(pools.clone());
        let (first, second) = (open(server.addr).await, open(server.addr).await);
        affinity.keep(0, first.sender);
        affinity.keep(1, second.sender);

        assert_is(pools.take(0), first.port, "the previous connection, back in its pool").await;
        assert_is(affinity.take(1), second.port, "the new connection, held").await;
    }

    #[tokio::test]
    async fn keep_for_the_same_origin_gives_the_new_one_back_while_the_held_one_is_live() {
        let server = serve().await;
        let pools = pools();
        let affinity = Affinity::new(pools.clone());
        let (held, concurrent) = (open(server.addr).await, open(server.addr).await);
        affinity.keep(0, held.sender);
        affinity.keep(0, concurrent.sender);

        assert_is(pools.take(0), concurrent.port, "the concurrent connection, in the pool").await;
        assert_is(affinity.take(0), held.port, "the first connection, still held").await;
    }

    #[tokio::test]
    async fn keep_replaces_a_held_connection_the_upstream_closed() {
        let server = serve().await;
        let affinity = Affinity::new(pools());
        let (closed, fresh) = (open(server.addr).await, open(server.addr).await);
        affinity.keep(0, closed.sender);
        close(closed.task).await;
        affinity.keep(0, fresh.sender);

        assert_is(affinity.take(0), fresh.port, "the new connection, held").await;
    }

    #[tokio::test]
    async fn a_busy_held_connection_is_not_handed_out() {
        let server = serve().await;
        let affinity = Affinity::new(pools());
        let mut busy = open(server.addr).await;
        let exchange = hold(&mut busy.sender);
        affinity.keep(0, busy.sender);

        assert!(affinity.take(0).is_none(), "busy: not handed out");
        server.release();
        exchange.await;
        let mut idle = eventually(|| affinity.take(0)).await;
        assert_eq!(port_of(&mut idle).await, busy.port, "still held, and idle again");
    }

    #[tokio::test]
    async fn a_held_connection_the_upstream_closed_is_not_handed_out() {
        let server = serve().await;
        let affinity = Affinity::new(pools());
        let closed = open(server.addr).await;
        affinity.keep(0, closed.sender);
        close(closed.task).await;

        assert!(affinity.take(0).is_none());
    }

    #[tokio::test]
    async fn dropping_the_slot_gives_its_connection_back_to_the_pool() {
        let server = serve().await;
        let pools = pools();
        let affinity = Affinity::new(pools.clone());
        let conn = open(server.addr).await;
        affinity.keep(1, conn.sender);
        assert!(pools.take(1).is_none(), "held, not pooled");

        drop(affinity);
        assert_is(pools.take(1), conn.port, "given back").await;
    }
}
