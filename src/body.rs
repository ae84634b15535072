//! One body type for everything the proxy sends, client- or upstream-bound, without boxing:
//! a streamed `Incoming`, a buffered `Bytes`, or a buffered prefix followed by the rest of a
//! stream (an oversized guarded response, docs/behaviour.md §5), or a streamed guarded
//! request body ([`Upload`], §15).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::chain::BoxError;
use crate::upload::Upload;

/// A body the proxy sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// Nothing (`HEAD` answers, bodiless problems).
    Empty,
    /// Buffered bytes; taken on the first poll.
    Full(Option<Bytes>),
    /// A prefix already read from `rest`, then `rest` streamed.
    Stream { prefix: Option<Bytes>, rest: Incoming },
    /// A guarded request body streamed upstream while it is hashed (docs/behaviour.md §15).
    Upload(Box<Upload>),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self::Empty
        } else {
            Self::Full(Some(bytes))
        }
    }

    pub fn stream(body: Incoming) -> Self {
        Self::Stream {
            prefix: None,
            rest: body,
        }
    }
}

/// The chunks of a body read in pieces, as one buffer (no copy for zero or one chunk).
pub fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    }
}

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        Self::stream(body)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                Pin::new(rest)
                    .poll_frame(cx)
                    .map(|frame| frame.map(|result| result.map_err(Into::into)))
            }
            ProxyBody::Upload(upload) => Pin::new(upload.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            ProxyBody::Upload(upload) => upload.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
            ProxyBody::Upload(upload) => upload.size_hint(),
        }
    }
}
