//! What a handler knows of the client connection a request came on ([`ConnectionInfo`]),
//! shared by the request path's modules: its own module, so that they need nothing from
//! `proxy/mod.rs`, which calls into them.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use http::HeaderValue;
use tokio::time::Instant;

use crate::state::State;
use crate::timer::{self, Armed, LazyTimer};
use crate::upstream::Affinity;

/// What a handler knows of the connection a request came on, computed once per connection.
pub struct ConnectionInfo {
    /// The proxy's shared state (held here, so a request clones one `Arc`, not two).
    pub state: Arc<State>,
    /// The peer's IP, ready for `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: HeaderValue,
    /// The upstream connection this client connection used last, kept for its next request.
    pub affinity: Affinity,
    /// The timer of this connection's upstream exchanges ([`ConnectionInfo::within`]).
    timer: LazyTimer,
}

impl ConnectionInfo {
    pub fn new(peer: SocketAddr, tls: bool, state: Arc<State>) -> Self {
        let ip = peer.ip().to_canonical().to_string();
        let affinity = state.upstream.affinity();
        Self {
            state,
            client_ip: HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            affinity,
            timer: LazyTimer::default(),
        }
    }

    /// Runs `work` (pinned by the caller: a pointer is moved, not the future) until `deadline`:
    /// `None` if the deadline came first. On the connection's one [`LazyTimer`]; concurrent
    /// exchanges (HTTP/2 streams, an execution whose client left) that find it lent out get a
    /// timer of their own.
    pub async fn within<F: Future>(&self, deadline: Instant, mut work: Pin<&mut F>) -> Option<F::Output> {
        let sleep = self.timer.lock().take();
        let mut lent = Lent {
            slot: &self.timer,
            sleep: Some(sleep.unwrap_or_else(|| timer::armed(deadline))),
        };
        poll_fn(move |cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            match lent.sleep.as_mut() {
                Some(sleep) => timer::poll_deadline(sleep, deadline, cx).map(|()| None),
                None => Poll::Ready(None),
            }
        })
        .await
    }
}

/// The connection's timer, lent to one exchange; given back when it ends or is dropped.
struct Lent<'a> {
    slot: &'a LazyTimer,
    sleep: Option<Armed>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut slot = self.slot.lock();
        if slot.is_none() {
            *slot = self.sleep.take();
        }
    }
}
