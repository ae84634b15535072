//! A deadline on the first bytes of a client connection, read to choose HTTP/1.1 or HTTP/2.
//!
//! hyper-util's `auto::Builder` first reads until it has either the 24-byte HTTP/2 client
//! preface or bytes that differ from it, and that read has no timeout of its own: HTTP/1's
//! `header_read_timeout` only starts once the protocol is chosen. A client that connects and
//! sends nothing (or a prefix of the preface) would hold its connection, and a
//! `max_connections` permit, forever (slowloris, spec §9). [`PrefaceDeadline`] fails those reads
//! with `TimedOut` at the deadline, and steps aside for good as soon as the bytes read decide the
//! protocol, exactly when the auto builder stops its own detection; from then on HTTP/1's header
//! timer and HTTP/2's keep-alive pings are in charge.
//!
//! On the TLS listener it wraps the decrypted stream, with the deadline set at accept: the
//! handshake and the first request bytes share one `header_read_timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// RFC 9113 §3.4: the connection preface every HTTP/2 client sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An I/O stream whose reads time out until its first bytes have decided the protocol.
pub struct PrefaceDeadline<S> {
    inner: S,
    /// While undecided: the deadline, and how many bytes read so far matched the preface.
    undecided: Option<(Pin<Box<Sleep>>, usize)>,
}

impl<S> PrefaceDeadline<S> {
    /// Wraps `inner`; its reads fail with `TimedOut` if the protocol is not decided within `limit`.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self::until(inner, Instant::now() + limit)
    }

    /// Wraps `inner`; its reads fail with `TimedOut` if the protocol is not decided by `deadline`.
    pub fn until(inner: S, deadline: Instant) -> Self {
        Self {
            inner,
            undecided: Some((Box::pin(tokio::time::sleep_until(deadline)), 0)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((deadline, matched)) = &mut this.undecided else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                let end = (*matched + new.len()).min(H2_PREFACE.len());
                let still_preface = new[..end - *matched] == H2_PREFACE[*matched..end];
                // End of stream, bytes that are not the preface, or the whole preface: decided.
                if new.is_empty() || !still_preface || end == H2_PREFACE.len() {
                    this.undecided = None;
                } else {
                    *matched = end;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent no request within the header read timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_some(stream: &mut PrefaceDeadline<tokio::io::DuplexStream>) -> io::Result<Vec<u8>> {
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await?;
        Ok(buf[..n].to_vec())
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (_client, server) = tokio::io::duplex(64);
        let mut stream = PrefaceDeadline::new(server, Duration::from_millis(100));
        let err = read_some(&mut stream).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_prefix_of_the_preface_still_times_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = PrefaceDeadline::new(server, Duration::from_millis(100));
        client.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        assert_eq!(read_some(&mut stream).await.expect("bytes"), b"PRI * HTTP/2.0\r\n");
        let err = read_some(&mut stream).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn http1_bytes_lift_the_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = PrefaceDeadline::new(server, Duration::from_millis(100));
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        read_some(&mut stream).await.expect("bytes");
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"Host: x\r\n").await.expect("write");
        assert_eq!(
            read_some(&mut stream).await.expect("no deadline any more"),
            b"Host: x\r\n"
        );
    }

    #[tokio::test]
    async fn the_whole_preface_lifts_the_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = PrefaceDeadline::new(server, Duration::from_millis(100));
        client.write_all(&H2_PREFACE[..10]).await.expect("write");
        read_some(&mut stream).await.expect("bytes");
        client.write_all(&H2_PREFACE[10..]).await.expect("write");
        read_some(&mut stream).await.expect("bytes");
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"frames").await.expect("write");
        assert_eq!(read_some(&mut stream).await.expect("no deadline any more"), b"frames");
    }
}
