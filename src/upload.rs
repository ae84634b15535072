//! A streamed guarded request body (docs/behaviour.md §15): forwarded upstream as it arrives,
//! hashed on the way (SHA-256), bounded by `max_body_bytes`, and checked against the
//! `Content-Digest` it declared before its end is handed over. How it ended, complete (with its
//! digest) or cut, is kept in an [`UploadEnd`] that the key's owner reads to settle the key;
//! the owner can also cut an upload still in progress, atomically with its completion, so a
//! key released for a cut request never sees that request complete upstream afterwards.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::error::chain::BoxError;

/// Why an upload did not reach its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Cut {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the request body does not match its Content-Digest")]
    DigestMismatch,
    /// The client's body failed (it went away, broke the framing).
    #[error("the client's request body failed")]
    Client,
    /// The upstream stopped reading it (its connection failed, or it answered first), or the
    /// key's owner cut it.
    #[error("the request body was not sent to its end")]
    Abandoned,
}

/// Where an upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    /// Still being sent.
    Streaming,
    /// Every byte, and the end, handed to the upstream connection; the body's SHA-256.
    Complete([u8; 32]),
    Cut(Cut),
}

/// How an [`Upload`] ended, shared with the key's owner.
#[derive(Debug)]
pub struct UploadEnd {
    shared: Mutex<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: UploadState,
    /// The task sending the body, woken when the owner cuts it.
    sender: Option<Waker>,
}

impl UploadEnd {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where the upload stands now.
    pub fn state(&self) -> UploadState {
        self.lock().state
    }

    /// Cuts the upload unless it is complete already, and tells which it is: never
    /// `Streaming`. An upload cut here errors on its next poll, so the upstream never gets its
    /// end.
    pub fn complete_or_cut(&self) -> UploadState {
        let mut shared = self.lock();
        if shared.state == UploadState::Streaming {
            shared.state = UploadState::Cut(Cut::Abandoned);
            if let Some(sender) = shared.sender.take() {
                sender.wake();
            }
        }
        shared.state
    }

    /// Moves a streaming upload to `state`; `false` when it had ended already.
    fn end(&self, state: UploadState) -> bool {
        let mut shared = self.lock();
        if shared.state != UploadState::Streaming {
            return false;
        }
        shared.state = state;
        true
    }
}

/// The body: what was read of it before its key was decided, then the rest of the stream.
#[derive(Debug)]
pub struct Upload {
    prefix: std::vec::IntoIter<Bytes>,
    rest: Incoming,
    hasher: Sha256,
    /// Bytes handed over so far.
    sent: u64,
    limit: u64,
    /// The whole body's length, when `Content-Length` gave it.
    length: Option<u64>,
    declared: Option<[u8; 32]>,
    end: Arc<UploadEnd>,
    /// The end was handed over (or the upload failed): nothing more to send.
    done: bool,
}

impl Upload {
    /// The body made of `prefix` (already read) and `rest`, at most `limit` bytes, whose
    /// SHA-256 must be `declared` when given; and where its end will be told.
    pub fn new(prefix: Vec<Bytes>, rest: Incoming, limit: u64, declared: Option<[u8; 32]>) -> (Self, Arc<UploadEnd>) {
        let read: u64 = prefix.iter().map(|b| b.len() as u64).sum();
        let length = rest.size_hint().exact().map(|n| n + read);
        let end = Arc::new(UploadEnd {
            shared: Mutex::new(Shared {
                state: UploadState::Streaming,
                sender: None,
            }),
        });
        let upload = Self {
            prefix: prefix.into_iter(),
            rest,
            hasher: Sha256::new(),
            sent: 0,
            limit,
            length,
            declared,
            end: end.clone(),
            done: false,
        };
        (upload, end)
    }

    /// Ends the upload as `cut`, with the error to give the upstream connection.
    fn fail(&mut self, cut: Cut) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.end.end(UploadState::Cut(cut));
        Poll::Ready(Some(Err(Box::new(cut))))
    }

    /// The body's end: verified against its declared digest, then recorded complete (unless
    /// the owner cut it first); `last` (its last bytes, or its trailers, which end a chunked
    /// body) is handed over only then.
    fn finish(&mut self, last: Option<Frame<Bytes>>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let digest: [u8; 32] = self.hasher.finalize_reset().into();
        if self.declared.is_some_and(|declared| declared != digest) {
            return self.fail(Cut::DigestMismatch);
        }
        if !self.end.end(UploadState::Complete(digest)) {
            return self.fail(Cut::Abandoned);
        }
        self.done = true;
        Poll::Ready(last.map(Ok))
    }

    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.prefix.next() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        {
            let mut shared = this.end.lock();
            if shared.state != UploadState::Streaming {
                drop(shared);
                return this.fail(Cut::Abandoned);
            }
            if !shared.sender.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                shared.sender = Some(cx.waker().clone());
            }
        }
        let frame = match this.next_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match frame {
            None => this.finish(None),
            Some(Err(err)) => {
                this.done = true;
                this.end.end(UploadState::Cut(Cut::Client));
                Poll::Ready(Some(Err(err.into())))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    this.sent += data.len() as u64;
                    if this.sent > this.limit {
                        return this.fail(Cut::TooLarge { limit: this.limit });
                    }
                    this.hasher.update(&data);
                    // The last bytes of a body of known length: verified before they go.
                    if this.length == Some(this.sent) {
                        return this.finish(Some(Frame::data(data)));
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(trailers) => this.finish(Some(trailers)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Upload {
    /// A body dropped before its end (the upstream connection failed or stopped reading) was
    /// cut.
    fn drop(&mut self) {
        self.end.end(UploadState::Cut(Cut::Abandoned));
    }
}
