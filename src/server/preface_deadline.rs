//! A deadline on the first bytes of a client connection, which choose HTTP/1.1 or HTTP/2.
//!
//! A client that connects and sends nothing (or a prefix of the HTTP/2 preface) must not hold
//! its connection, and a `max_connections` permit, forever (slowloris, docs/behaviour.md §9); HTTP/1's
//! `header_read_timeout` and HTTP/2's keep-alive pings only take over once the protocol runs.
//!
//! - A plain TCP connection is not wrapped at all: [`sniff`] peeks at its first bytes under the
//!   deadline, and hyper's HTTP/1.1 or HTTP/2 server then serves it directly, with no extra layer
//!   on any later read or write.
//! - A TLS connection (protocol chosen by ALPN) is wrapped in [`PrefaceDeadline`], with the
//!   deadline set at accept, so the handshake and the first request bytes share one
//!   `header_read_timeout`: its reads fail with `TimedOut` at the deadline, and it steps aside
//!   for good as soon as the bytes read are the whole preface or differ from it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// RFC 9113 §3.4: the connection preface every HTTP/2 client sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client's first bytes chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (RFC 9113 §3.3): the client sent the preface.
    Http2,
}

/// How long [`sniff`] waits before looking again at a partial preface.
const PARTIAL_PREFACE_RETRY: Duration = Duration::from_millis(5);

/// Peeks (without consuming) at `stream`'s first bytes until they are the whole HTTP/2 preface
/// or differ from it, by `deadline` (`TimedOut` then). `UnexpectedEof` if the client closes first.
pub async fn sniff(stream: &tokio::net::TcpStream, deadline: Instant) -> io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
        let n = match peeked {
            Ok(result) => result?,
            Err(_) => return Err(timed_out()),
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a request"));
        }
        if first[..n] != H2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // A prefix of the preface: the same bytes would be peeked again at once, so wait a bit.
        if Instant::now() + PARTIAL_PREFACE_RETRY >= deadline {
            return Err(timed_out());
        }
        tokio::time::sleep(PARTIAL_PREFACE_RETRY).await;
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client sent no request within the header read timeout",
    )
}

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
                Poll::Ready(()) => Poll::Ready(Err(timed_out())),
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

    /// A connected pair of loopback TCP streams (client, server).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn sniff_tells_http1_from_the_h2_preface_without_consuming() {
        let (mut client, mut server) = tcp_pair().await;
        client.write_all(b"POST / HTTP/1.1\r\n").await.expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(sniff(&server, deadline).await.expect("decided"), Protocol::Http1);
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"POST", "sniffing must leave the bytes for the server");

        let (mut client, server) = tcp_pair().await;
        client.write_all(&H2_PREFACE[..10]).await.expect("write");
        let waiting = tokio::spawn(async move { sniff(&server, deadline).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.write_all(&H2_PREFACE[10..]).await.expect("write");
        assert_eq!(waiting.await.expect("join").expect("decided"), Protocol::Http2);
    }

    #[tokio::test]
    async fn sniff_times_out_on_silence_and_on_a_partial_preface() {
        let (_client, server) = tcp_pair().await;
        let err = sniff(&server, Instant::now() + Duration::from_millis(100))
            .await
            .expect_err("silent");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let (mut client, server) = tcp_pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        let err = sniff(&server, Instant::now() + Duration::from_millis(100))
            .await
            .expect_err("partial");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let (client, server) = tcp_pair().await;
        drop(client);
        let err = sniff(&server, Instant::now() + Duration::from_secs(5))
            .await
            .expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

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
