//! Idle HTTP/2 connections. An HTTP/1 keep-alive connection waiting for its next request is
//! bounded by `server.header_read_timeout`; an HTTP/2 connection has no such wait (hyper keeps it
//! while PINGs are answered), so a client could hold a `max_connections` slot forever by opening
//! a connection and sending nothing. [`StreamActivity`] counts the requests in progress on one
//! connection, until their response bodies end, and [`StreamActivity::idle_expired`] resolves
//! once none has been in progress for the idle timeout; the connection is then closed
//! gracefully (RFC 9113 §6.8: GOAWAY, streams in progress finish), as nginx does after its
//! `keepalive_timeout`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// Requests in progress on one connection, and since when it has had none.
pub struct StreamActivity {
    /// (requests in progress, when the count last dropped to zero or the connection started)
    state: Mutex<(usize, Instant)>,
}

impl StreamActivity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((0, Instant::now())),
        })
    }

    /// Counts a request in progress until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveStream {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
        ActiveStream(self.clone())
    }

    fn end(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0 {
            state.1 = Instant::now();
        }
    }

    /// When the connection last had no request in progress; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.0 == 0).then_some(state.1)
    }

    /// Resolves once no request has been in progress for `timeout`. Checks at most once per
    /// `timeout` while requests come and go, with one timer.
    pub async fn idle_expired(&self, timeout: Duration) {
        let mut deadline = Instant::now() + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            match next_check(self.idle_since(), Instant::now(), timeout) {
                None => return,
                Some(next) => deadline = next,
            }
        }
    }
}

/// At a check at `now`: `None` if the connection has been idle (no request in progress) since
/// `idle_since` for at least `timeout`, else when to check next: when it would expire if it stays
/// idle, or a whole `timeout` from now while a request is in progress.
fn next_check(idle_since: Option<Instant>, now: Instant, timeout: Duration) -> Option<Instant> {
    match idle_since {
        Some(since) if since + timeout <= now => None,
        Some(since) => Some(since + timeout),
        None => Some(now + timeout),
    }
}

/// One request in progress; ends when dropped.
pub struct ActiveStream(Arc<StreamActivity>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its request counted in progress until hyper drops it (after its
/// last frame is sent, or when the stream is reset).
pub struct ActiveBody<B> {
    body: B,
    _stream: ActiveStream,
}

impl<B> ActiveBody<B> {
    pub fn new(body: B, stream: ActiveStream) -> Self {
        Self { body, _stream: stream }
    }
}

impl<B: Body + Unpin> Body for ActiveBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_until_the_last_one_ends() {
        let activity = StreamActivity::new();
        assert!(activity.idle_since().is_some(), "a new connection is idle");
        let first = activity.begin();
        let second = activity.begin();
        assert!(activity.idle_since().is_none());
        drop(first);
        assert!(activity.idle_since().is_none(), "one request still runs");
        let before = Instant::now();
        drop(second);
        let since = activity.idle_since().expect("idle once both ended");
        assert!(since >= before, "idle from the end of the last request");
    }

    #[test]
    fn expires_a_whole_timeout_after_the_last_request() {
        let timeout = Duration::from_secs(10);
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        // Idle since 0: not yet at 9, expired at 10 and later.
        assert_eq!(next_check(Some(at(0)), at(9), timeout), Some(at(10)));
        assert_eq!(next_check(Some(at(0)), at(10), timeout), None);
        assert_eq!(next_check(Some(at(0)), at(25), timeout), None);
        // A request came and went at 8: the check at 10 waits until 18.
        assert_eq!(next_check(Some(at(8)), at(10), timeout), Some(at(18)));
        // A request in progress, however long: check again a whole timeout later.
        assert_eq!(next_check(None, at(30), timeout), Some(at(40)));
    }

    #[test]
    fn the_body_keeps_its_request_in_progress() {
        let activity = StreamActivity::new();
        let body = ActiveBody::new(crate::body::ProxyBody::full("x"), activity.begin());
        assert!(activity.idle_since().is_none());
        assert_eq!(body.size_hint().exact(), Some(1));
        drop(body);
        assert!(activity.idle_since().is_some());
    }
}
