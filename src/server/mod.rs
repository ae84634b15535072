//! The client-facing server: accept loop, connection limits and timeouts, graceful shutdown.
//!
//! Built as hyper-util's `server_graceful` example, every connection watched by a
//! `GracefulShutdown` (HTTP/2 ones close on its signal in their own loop, which also closes them
//! once idle: [`idle`]). HTTP/1.1 and HTTP/2 with prior knowledge share the port: a plain TCP
//! connection's first bytes are peeked at ([`preface_deadline::sniff`]) and hyper's server for
//! that protocol serves it directly. With `tls.cert` and `tls.key` every connection is a TLS one
//! first (rustls), and ALPN chooses the protocol (RFC 9113 §3.2: `h2`, otherwise HTTP/1.1).

pub mod idle;
pub mod preface_deadline;
pub mod stop;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{Config, ServerSettings};
use crate::error::ServeError;
use crate::proxy::ConnectionInfo;
use crate::state::State;
use crate::timer::ConnectionTimer;
use preface_deadline::{PrefaceDeadline, Protocol};
use stop::Stop;

/// Keeps a timer due within [`TIMER_ANCHOR_PERIOD`] armed in the runtime while the proxy serves.
///
/// tokio's timer driver wakes its own thread (an `eventfd` write, then an extra turn of the event
/// loop) whenever a timer is armed that is due sooner than every timer the driver held when it
/// last went to sleep. Every request arms timers (hyper's header read timeout, the upstream
/// response timeout, store command timeouts, the lease renewal tick), seconds away but of
/// different lengths: whenever the driver slept holding only longer ones, the next request paid
/// that wake-up (measured: 0.6 to 0.7 `eventfd` writes per keyed first execution or keyless POST).
/// With a timer always due within 100 ms, no request's timer is ever the soonest: those writes
/// are gone (first execution −2 µs CPU per request, keyless POST −0.4 µs), for 10 timer wake-ups
/// a second.
async fn keep_timer_driver_armed() {
    let mut tick = tokio::time::interval(TIMER_ANCHOR_PERIOD);
    loop {
        tick.tick().await;
    }
}

const TIMER_ANCHOR_PERIOD: Duration = Duration::from_millis(100);

/// HTTP/1.1 server settings.
fn http1_builder(settings: &ServerSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    // The timer is each connection's own (`timer::ConnectionTimer`, set in `serve_http`).
    builder
        // Also bounds how long an idle keep-alive connection waits for its next request.
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers)
        .keep_alive(true);
    builder
}

/// HTTP/2 server settings.
fn http2_builder(settings: &ServerSettings) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(settings.max_header_bytes as u32)
        .keep_alive_interval(settings.http2_keepalive_interval)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// How every accepted connection is served: the optional TLS handshake, then hyper's server for
/// the protocol the client chose.
struct ConnectionServer {
    state: Arc<State>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// `tls.cert` + `tls.key` (re-read when they change: [`crate::tls::ListenerCertificate`]).
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    http2_idle_timeout: Duration,
    /// Becomes `true` when shutdown starts (HTTP/2 connections, which are not watched by the
    /// `GracefulShutdown`, close on it; see [`serve_http`](Self::serve_http)).
    stopping: watch::Receiver<bool>,
    /// Tells HTTP/1.1 connections that shutdown started (cheaper to check on every poll than
    /// the `GracefulShutdown`'s watch, which then only counts the connections to drain).
    stop: Arc<Stop>,
}

impl ConnectionServer {
    /// Serves one accepted connection to its end; `permit` (a `max_connections` slot) is held
    /// until then.
    ///
    /// The client has `server.header_read_timeout` from its connect to the bytes that choose the
    /// protocol, the TLS handshake included: a client that connects and stays silent, before or
    /// after the handshake, is dropped then (slowloris, docs/behaviour.md §9).
    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        watcher: Watcher,
        permit: OwnedSemaphorePermit,
    ) {
        let deadline = Instant::now() + self.header_read_timeout;
        match &self.tls {
            None => self.serve_tcp(stream, peer, deadline, watcher).await,
            Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => self.serve_tls(stream, peer, deadline, watcher).await,
                Ok(Err(err)) => tracing::debug!(error = %err, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "no TLS handshake within the header read timeout"),
            },
        }
        drop(permit);
    }

    /// A plain TCP connection: its first bytes choose HTTP/1.1 or HTTP/2 (prior knowledge).
    async fn serve_tcp(&self, stream: TcpStream, peer: SocketAddr, deadline: Instant, watcher: Watcher) {
        match preface_deadline::sniff(&stream, deadline).await {
            Ok(protocol) => self.serve_http(stream, protocol, peer, watcher).await,
            Err(err) => tracing::debug!(error = %err, %peer, "no request"),
        }
    }

    /// A decrypted TLS stream: ALPN chose the protocol. Its first bytes are still due by
    /// `deadline` (a client silent after the handshake is dropped then).
    async fn serve_tls(&self, stream: TlsStream<TcpStream>, peer: SocketAddr, deadline: Instant, watcher: Watcher) {
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        let stream = PrefaceDeadline::until(stream, deadline);
        self.serve_http(stream, protocol, peer, watcher).await;
    }

    /// Serves `protocol` on `stream` with hyper's server, watched for graceful shutdown.
    async fn serve_http<I>(&self, stream: I, protocol: Protocol, peer: SocketAddr, watcher: Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connection = Arc::new(ConnectionInfo::new(peer, self.tls.is_some(), self.state.clone()));
        let io = TokioIo::new(stream);
        let served = match protocol {
            Protocol::Http1 => {
                let service =
                    hyper::service::service_fn(move |request| crate::proxy::handle(connection.clone(), request));
                // One lazily re-armed timer for all of the connection's header read timeouts.
                let mut http1 = self.http1.clone();
                http1.timer(ConnectionTimer::default());
                self.stop.watch(http1.serve_connection(io, service), watcher).await
            }
            Protocol::Http2 => {
                // Each request counts as activity until its response body ends.
                let activity = idle::StreamActivity::new();
                let streams = activity.clone();
                let service = hyper::service::service_fn(move |request| {
                    let stream = streams.begin();
                    let handling = crate::proxy::handle(connection.clone(), request);
                    async move {
                        let response = handling.await?;
                        Ok::<_, Infallible>(response.map(|body| idle::ActiveBody::new(body, stream)))
                    }
                });
                // hyper-util's `GracefulShutdown` cannot also close a connection for idleness
                // (its connection trait is sealed): the shutdown signal is watched here, and
                // `watcher` is only held so that the drain waits for this connection.
                let mut connection = pin!(self.http2.serve_connection(io, service));
                let mut stopping = self.stopping.clone();
                let mut closing = false;
                let served = loop {
                    tokio::select! {
                        biased;
                        served = connection.as_mut() => break served,
                        _ = stopping.wait_for(|stopping| *stopping), if !closing => {
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                        () = activity.idle_expired(self.http2_idle_timeout), if !closing => {
                            tracing::debug!(%peer, "closing an idle HTTP/2 connection");
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                };
                drop(watcher);
                served
            }
        };
        if let Err(err) = served {
            tracing::debug!(error = %err, %peer, "connection ended with an error");
        }
    }
}

/// Runs the proxy on `listener` until `shutdown` resolves, then drains: stops accepting, lets
/// in-flight requests finish within `server.shutdown_grace`, and returns. The admin listener
/// (`admin_listen`), when configured, is bound here.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let admin = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServeError::Bind {
            listener: "admin_listen",
            addr,
            source,
        })?),
        None => None,
    };
    serve_with_admin(config, listener, admin, shutdown).await
}

/// [`serve`] with an admin listener the caller bound (tests bind port 0).
pub async fn serve_with_admin(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let certificate = match &config.tls {
        Some(settings) => Some(crate::tls::ListenerCertificate::load(settings)?),
        None => None,
    };
    let tls = match &certificate {
        Some(certificate) => Some(TlsAcceptor::from(crate::tls::listener_config(certificate.clone())?)),
        None => None,
    };
    let state = Arc::new(State::new(config).await?);
    // Background work that stops with this function, also when its future is dropped.
    let _timer_anchor = AbortOnDropHandle::new(tokio::spawn(keep_timer_driver_armed()));
    let _idle_reaper = AbortOnDropHandle::new(tokio::spawn(state.upstream.idle_reaper()));
    let _certificate_reloader = certificate.map(|c| AbortOnDropHandle::new(tokio::spawn(c.keep_reloading())));
    let (stop_admin, admin_stopped) = watch::channel(false);
    log_start(&state, &listener, admin.as_ref(), tls.is_some());
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve(state.clone(), admin, admin_stopped));
    }
    let (stop_connections, stopping) = watch::channel(false);
    let settings = &state.config.server;
    let server = Arc::new(ConnectionServer {
        state: state.clone(),
        http1: http1_builder(settings),
        http2: http2_builder(settings),
        tls,
        header_read_timeout: settings.header_read_timeout,
        http2_idle_timeout: settings.http2_idle_timeout,
        stopping,
        stop: Arc::new(Stop::default()),
    });
    let graceful = GracefulShutdown::new();
    accept_until(&server, listener, &graceful, shutdown).await;
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight requests");
    state.executions.close();
    stop_connections.send_replace(true);
    server.stop.stop();
    let drained = async {
        graceful.shutdown().await;
        state.executions.wait().await;
    };
    if tokio::time::timeout(settings.shutdown_grace, drained).await.is_err() {
        tracing::warn!("grace period over: closing the connections still open");
    }
    let _ = stop_admin.send(true);
    Ok(())
}

/// The start-up line: where the proxy and the admin listen, and which store keeps the keys
/// (a Redis URL without its password).
fn log_start(state: &State, listener: &TcpListener, admin: Option<&TcpListener>, tls: bool) {
    let address = |listener: &TcpListener| listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        listen = %address(listener),
        admin_listen = admin.map(address).as_deref().unwrap_or("off"),
        tls,
        store = %state.store_description(),
        routes = state.config.routes.len(),
        "idemproxy listening"
    );
}

/// Accepts connections on `listener` and serves each in its own task, until `shutdown`.
/// At `server.max_connections` it stops accepting: new connections wait in the kernel backlog.
async fn accept_until(
    server: &Arc<ConnectionServer>,
    listener: TcpListener,
    graceful: &GracefulShutdown,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(server.state.config.server.max_connections));
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        // Watched from accept on: shutdown waits for a connection still in its TLS handshake too
        // (at most the header read timeout), and closes it gracefully once it is served.
        tokio::spawn(server.clone().serve(stream, peer, graceful.watcher(), permit));
    }
}
