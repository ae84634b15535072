//! What a handler knows of the client connection a request came on ([`ConnectionInfo`]),
//! shared by the request path's modules: its own module, so that they need nothing from
//! `proxy/mod.rs`, which calls into them.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;

use http::HeaderValue;
use tokio::time::{Instant, Sleep};

use crate::state::State;
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
    timer: Mutex<Option<Pin<Box<Sleep>>>>,
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
            timer: Mutex::new(None),
        }
    }

    /// Runs `work` (pinned by the caller: a pointer is moved, not the future) until `deadline`:
    /// `None` if the deadline came first.
    ///
    /// One timer serves all of the connection's exchanges, and it is re-armed lazily: it stays
    /// armed at the deadline of an earlier exchange (which is sooner), and when it fires before
    /// the current exchange's deadline it is re-armed for it. A keep-alive connection's requests
    /// so insert and remove no timer each (tokio's `timeout` does both, and allocates the timer's
    /// state: about 500 instructions per request); the timer fires about once per route
    /// `timeout` on a busy connection. Concurrent exchanges (HTTP/2 streams, an execution whose
    /// client left) that find the timer lent out get one of their own.
    pub async fn within<F: Future>(&self, deadline: Instant, mut work: Pin<&mut F>) -> Option<F::Output> {
        let sleep = self.timer().take();
        let mut lent = Lent {
            slot: self,
            sleep: Some(sleep.unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)))),
        };
        poll_fn(move |cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            let Some(sleep) = lent.sleep.as_mut() else {
                return Poll::Ready(None);
            };
            if sleep.deadline() > deadline {
                sleep.as_mut().reset(deadline);
            }
            // Fired for an earlier deadline: re-armed once for this one, then it is this one's.
            for rearmed in [false, true] {
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if rearmed || Instant::now() >= deadline => return Poll::Ready(None),
                    Poll::Ready(()) => sleep.as_mut().reset(deadline),
                }
            }
            Poll::Ready(None)
        })
        .await
    }

    fn timer(&self) -> MutexGuard<'_, Option<Pin<Box<Sleep>>>> {
        self.timer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The connection's timer, lent to one exchange; given back when it ends or is dropped.
struct Lent<'a> {
    slot: &'a ConnectionInfo,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut slot = self.slot.timer();
        if slot.is_none() {
            *slot = self.sleep.take();
        }
    }
}
