//! The pooled HTTP/1.1 client to the upstreams (`http://` and `https://`), and its errors.
//!
//! Connections are hyper's `client::conn::http1`, kept in this module's own pool: one idle list
//! per upstream origin (scheme + authority), resolved per route at start-up (no hashing per
//! request), plus a per-client-connection [`Affinity`] slot: the upstream connection a client
//! connection used last is kept for its next request, so a keep-alive client's requests reuse
//! one upstream connection without touching the shared pool (as nginx's keepalive upstreams and
//! Pingora's connection reuse do). Idle connections are closed after `upstream.pool_idle_timeout`
//! and at most `upstream.pool_max_idle_per_host` are kept per origin.
//!
//! `https://` upstreams are reached over rustls (`ring` provider, HTTP/1.1 only, no ALPN), trusting
//! the system's CA certificates (the bundled Mozilla roots where the system has none) plus those
//! in `upstream.ca_file`. A failed TLS handshake happens before any byte of the request is
//! written: hyper-util reports it as a connect error, so it counts as [`UpstreamError::Connect`].
//!
//! The keep-alive race (a pooled connection closed by the upstream just as a request is queued
//! on it): hyper hands such a request back *unwritten* (`try_send_request`), and it is sent once
//! more on a fresh connection. It never reached the upstream, so this cannot execute a POST
//! twice. A request that was written, even partly, is never re-sent.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::body::ProxyBody;
use crate::config::{ConfigError, Route, UpstreamSettings};

/// Largest read buffer of one upstream connection.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// Why an upstream exchange failed, by whether the request may have reached the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Never sent: connection refused, DNS, connect timeout, TLS handshake. Safe to run again.
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    /// Possibly sent: no complete response within the timeout.
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// Sent (or possibly sent): the exchange failed before a complete response (reset, truncation).
    #[error("the upstream connection failed: {0}")]
    Failed(String),
    /// The client's request body failed while it was streamed upstream (malformed chunked
    /// coding, a client gone mid-upload): the request's fault, answered `400`. The upstream may
    /// have received part of it, never a complete request: hyper aborts it without its end.
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
}

impl UpstreamError {
    /// Whether the upstream may have received (and acted on) the request.
    pub fn maybe_sent(&self) -> bool {
        !matches!(self, UpstreamError::Connect(_))
    }
}

/// `err: cause: cause…`, for messages that say what actually went wrong.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The system's CA certificates or, where none can be loaded, the Mozilla roots bundled in
/// `webpki-roots` (a machine without a CA store still starts). Loaded once per process.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let system = rustls_native_certs::load_native_certs();
        for err in &system.errors {
            tracing::debug!(error = %err, "cannot load a system CA certificate");
        }
        let (loaded, unusable) = roots.add_parsable_certificates(system.certs);
        if loaded == 0 {
            tracing::info!(
                unusable,
                "no system CA certificates: https upstreams are checked against the bundled Mozilla roots"
            );
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

/// The CA certificates `https://` upstreams are checked against: [`system_roots`] plus every
/// certificate in `ca_file`.
fn trusted_roots(ca_file: Option<&Path>) -> Result<RootCertStore, ConfigError> {
    let mut roots = system_roots().clone();
    if let Some(path) = ca_file {
        for certificate in crate::tls::read_certificates("upstream.ca_file", path)? {
            roots.add(certificate).map_err(|e| ConfigError::Invalid {
                key: "upstream.ca_file".to_owned(),
                message: format!("{}: unusable CA certificate: {e}", path.display()),
            })?;
        }
    }
    Ok(roots)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `http`/`https` connector with `upstream.connect_timeout` over the whole connect, TCP and
/// TLS handshake: `HttpConnector`'s own timeout covers TCP only, and a handshake that stalls must
/// still fail as a connect error (nothing was sent, the key is released) rather than run into the
/// upstream timeout (outcome unknown).
#[derive(Clone)]
struct Connector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection (TCP and TLS handshake) within {timeout:?}"),
                )
                .into()),
            }
        })
    }
}

/// One connection's sending half. The connection itself runs as its own task and ends when
/// every `Sender` of it is dropped (after finishing the exchange in progress) or the upstream
/// closes it.
type Sender = http1::SendRequest<ProxyBody>;

/// The idle connections to one upstream origin, most recently used last.
struct Pool {
    /// `scheme://authority` the connector dials.
    origin: Uri,
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// What every pool shares: the idle lists and their limits.
struct Pools {
    pools: Box<[Pool]>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pools {
    /// An idle, still open connection to `pool`, the most recently used first.
    fn take(&self, pool: usize) -> Option<Sender> {
        let mut idle = self.pools[pool].idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(entry) = idle.pop_back() {
            if entry.sender.is_ready() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Keeps an idle connection (closed ones, and any over `max_idle`, are dropped).
    fn put(&self, pool: usize, sender: Sender) {
        if !sender.is_ready() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.pools[pool].idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Keeps `sender` once its exchange in progress is over (its response body read).
    fn put_when_ready(self: &Arc<Self>, pool: usize, mut sender: Sender) {
        if sender.is_ready() {
            self.put(pool, sender);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pools = Arc::downgrade(self);
        runtime.spawn(async move {
            if sender.ready().await.is_ok() {
                if let Some(pools) = pools.upgrade() {
                    pools.put(pool, sender);
                }
            }
        });
    }

    /// Closes the connections idle for longer than `idle_timeout` (the oldest are first).
    fn close_expired(&self) {
        for pool in &*self.pools {
            let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
            while idle
                .front()
                .is_some_and(|entry| entry.since.elapsed() >= self.idle_timeout || entry.sender.is_closed())
            {
                idle.pop_front();
            }
        }
    }
}

/// The upstream connection a client connection used last, kept for that connection's next
/// request: a keep-alive client's requests then go over one upstream connection without a
/// trip through the shared pool. Given back to the pool when the client connection ends.
pub struct Affinity {
    pools: Arc<Pools>,
    held: Mutex<Option<(usize, Sender)>>,
}

impl Affinity {
    /// The held connection if it goes to `pool` and is idle now.
    fn take(&self, pool: usize) -> Option<Sender> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
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
    /// goes back to the pool, unless it goes to the same origin (a concurrent HTTP/2 stream's
    /// connection, still busy): then `sender` goes back instead.
    fn keep(&self, pool: usize, sender: Sender) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let returned = match held.take() {
            Some((held_pool, held_sender)) if held_pool == pool && !held_sender.is_closed() => {
                *held = Some((held_pool, held_sender));
                (pool, sender)
            }
            previous => {
                *held = Some((pool, sender));
                match previous {
                    Some(previous) => previous,
                    None => return,
                }
            }
        };
        drop(held);
        self.pools.put_when_ready(returned.0, returned.1);
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

/// The shared upstream client: keep-alive pools for all routes and both schemes.
#[derive(Clone)]
pub struct Upstream {
    connector: Connector,
    builder: http1::Builder,
    pools: Arc<Pools>,
    /// Route index → pool index (routes to one origin share its pool).
    route_pool: Arc<[usize]>,
}

impl Upstream {
    /// Builds the client for `routes`; fails (naming `upstream.ca_file`) if that file cannot be
    /// used. Inside a Tokio runtime, also starts the task that closes expired idle connections.
    pub fn new(settings: &UpstreamSettings, routes: &[Arc<Route>]) -> Result<Self, ConfigError> {
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Invalid {
                key: "upstream.url".to_owned(),
                message: format!("no TLS protocol version for https upstreams: {e}"),
            })?
            .with_root_certificates(trusted_roots(settings.ca_file.as_deref())?)
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(settings.connect_timeout));
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        // The TLS layer on top takes `https://` URIs too; it hands plain `http://` ones through.
        tcp.enforce_http(false);
        let connector = Connector {
            inner: HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(tcp),
            timeout: settings.connect_timeout,
        };
        let mut builder = http1::Builder::new();
        // Bounds what one upstream connection buffers while its client reads slowly
        // (backpressure holds the rest in the kernel): 64 KiB, not hyper's ~400 KiB.
        builder.max_buf_size(UPSTREAM_READ_BUFFER);

        let mut origins: Vec<Uri> = Vec::new();
        let mut route_pool = Vec::with_capacity(routes.len());
        for route in routes {
            let origin = Uri::builder()
                .scheme(route.upstream.scheme.clone())
                .authority(route.upstream.authority.clone())
                .path_and_query("/")
                .build()
                .map_err(|e| ConfigError::Invalid {
                    key: "upstream.url".to_owned(),
                    message: format!("route `{}`: {e}", route.name),
                })?;
            let index = match origins.iter().position(|o| *o == origin) {
                Some(index) => index,
                None => {
                    origins.push(origin);
                    origins.len() - 1
                }
            };
            route_pool.push(index);
        }
        let pools = Arc::new(Pools {
            pools: origins
                .into_iter()
                .map(|origin| Pool {
                    origin,
                    idle: Mutex::new(VecDeque::new()),
                })
                .collect(),
            idle_timeout: settings.pool_idle_timeout,
            max_idle: settings.pool_max_idle_per_host,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_expired_connections(Arc::downgrade(&pools)));
        }
        Ok(Self {
            connector,
            builder,
            pools,
            route_pool: route_pool.into(),
        })
    }

    /// A new, empty affinity slot for one client connection.
    pub fn affinity(&self) -> Affinity {
        Affinity {
            pools: self.pools.clone(),
            held: Mutex::new(None),
        }
    }

    /// Sends `request` (origin-form target) to `route`'s upstream, waiting at most `timeout` for
    /// the response head. `affinity` is the client connection's slot, if it has one.
    pub async fn send(
        &self,
        route: &Route,
        affinity: Option<&Affinity>,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(timeout, self.send_untimed(route, affinity, request)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        }
    }

    /// [`Upstream::send`] without its own timeout, for callers that bound a longer exchange.
    pub async fn send_untimed(
        &self,
        route: &Route,
        affinity: Option<&Affinity>,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pool = self.route_pool.get(route.index).copied().unwrap_or(0);
        loop {
            let reused = affinity.and_then(|a| a.take(pool)).or_else(|| self.pools.take(pool));
            let (mut sender, fresh) = match reused {
                Some(sender) => (sender, false),
                // Boxed: the connect state (TCP, TLS handshake) is large and rarely needed, and
                // every request's future would otherwise carry (and move) it.
                None => (Box::pin(self.connect(pool)).await?, true),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    match affinity {
                        Some(affinity) => affinity.keep(pool, sender),
                        None => self.pools.put_when_ready(pool, sender),
                    }
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    // Not written: the keep-alive race on a reused connection; a fresh one next.
                    Some(unsent) if !fresh => request = unsent,
                    Some(_) => return Err(UpstreamError::Connect(error_chain(err.error()))),
                    None if is_client_body_error(err.error()) => {
                        return Err(UpstreamError::ClientBody(error_chain(err.error())))
                    }
                    None => return Err(UpstreamError::Failed(error_chain(err.error()))),
                },
            }
        }
    }

    /// A new connection to pool `pool`'s origin, its connection task spawned.
    async fn connect(&self, pool: usize) -> Result<Sender, UpstreamError> {
        let origin = self.pools.pools[pool].origin.clone();
        let io = self
            .connector
            .clone()
            .call(origin)
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&*e)))?;
        let (sender, connection) = self
            .builder
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %error_chain(&err), "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Whether the exchange failed on the request body the proxy was streaming: hyper reports an
/// error from the outgoing body as a user error caused by it, and the only body that can fail is
/// the client's (a streamed `Incoming`, whose errors are hyper's own).
fn is_client_body_error(err: &hyper::Error) -> bool {
    use std::error::Error as _;
    err.is_user() && err.source().is_some_and(|cause| cause.is::<hyper::Error>())
}

/// Closes idle connections past `pool_idle_timeout`, until the pools are dropped.
async fn close_expired_connections(pools: Weak<Pools>) {
    let period = match pools.upgrade() {
        Some(pools) => (pools.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match pools.upgrade() {
            Some(pools) => pools.close_expired(),
            None => return,
        }
    }
}
