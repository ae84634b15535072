//! The client-facing server: accept loop, connection limits and timeouts, graceful shutdown.
//!
//! Built as hyper-util's `server_graceful` example: one auto builder (HTTP/1.1 and HTTP/2 with
//! prior knowledge on the same port), every connection watched by a `GracefulShutdown`.

pub mod guarded;
pub mod headers;
pub mod preface_deadline;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServerSettings, StoreSettings};
use crate::store::{AnyStore, MemoryStore, RedisStore, StoreError};
use crate::telemetry::Metrics;
use crate::upstream::Upstream;
use preface_deadline::PrefaceDeadline;

/// A failure to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot set up the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Everything a request handler needs, built once at start-up.
pub struct State {
    pub config: Config,
    pub upstream: Upstream,
    pub store: AnyStore,
    pub metrics: Metrics,
    /// Guarded executions run as their own tasks (a client that leaves does not cancel them);
    /// shutdown waits for them too.
    pub executions: TaskTracker,
}

impl State {
    pub async fn new(config: Config) -> Result<Self, ServeError> {
        let store = match &config.store {
            StoreSettings::Memory { max_entries } => AnyStore::Memory(MemoryStore::new(*max_entries)),
            StoreSettings::Redis { url, command_timeout } => {
                AnyStore::Redis(RedisStore::connect(url, *command_timeout).await?)
            }
        };
        Ok(Self {
            metrics: Metrics::new(config.routes.iter().map(|r| &*r.name)),
            upstream: Upstream::new(&config.upstream),
            store,
            executions: TaskTracker::new(),
            config,
        })
    }
}

/// What a handler knows of the connection a request came on, computed once per connection.
pub struct ConnectionInfo {
    /// The peer's IP, ready for `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: HeaderValue,
}

impl ConnectionInfo {
    fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip().to_canonical().to_string();
        Self {
            client_ip: HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        }
    }
}

fn server_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also bounds how long an idle keep-alive connection waits for its next request.
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(settings.max_header_bytes as u32)
        .keep_alive_interval(settings.http2_keepalive_interval)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
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
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        ),
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
    let state = Arc::new(State::new(config).await?);
    let (stop_admin, admin_stopped) = watch::channel(false);
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve(state.clone(), admin, admin_stopped));
    }
    let settings = state.config.server.clone();
    let builder = server_builder(&settings);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let tls = state.config.tls.is_some();
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        store = state.store.kind(),
        routes = state.config.routes.len(),
        "idemproxy listening"
    );
    let mut shutdown = pin!(shutdown);
    loop {
        // At the connection limit, stop accepting: new connections wait in the kernel backlog.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
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
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = Arc::new(ConnectionInfo::new(peer, tls));
        let state = state.clone();
        let service =
            hyper::service::service_fn(move |request| service::handle(state.clone(), connection.clone(), request));
        // The protocol sniffing of the auto builder has no deadline of its own: bound it by the
        // header read timeout, after which HTTP/1's own header timer takes over.
        let stream = PrefaceDeadline::new(stream, settings.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight requests");
    state.executions.close();
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
