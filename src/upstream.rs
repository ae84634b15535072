//! The pooled HTTP/1.1 client to the upstreams (`http://` and `https://`), and its errors.
//!
//! `https://` upstreams are reached over rustls (`ring` provider, HTTP/1.1 only, no ALPN), trusting
//! the system's CA certificates (the bundled Mozilla roots where the system has none) plus those
//! in `upstream.ca_file`. A failed TLS handshake happens before any byte of the request is
//! written: hyper-util reports it as a connect error, so it counts as [`UpstreamError::Connect`].
//!
//! `retry_canceled_requests` stays on (hyper-util's default): hyper re-sends a request only when
//! it was *canceled before any byte of it was written*, i.e. the pooled connection it was queued
//! on closed first (the keep-alive race). Such a request never reached the upstream, so re-sending
//! it cannot execute a POST twice; turning it off would only turn that race into spurious 502s.
//! A request that was written, even partly, is never re-sent by the client.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::config::{ConfigError, UpstreamSettings};

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
}

impl UpstreamError {
    /// Whether the upstream may have received (and acted on) the request.
    pub fn maybe_sent(&self) -> bool {
        !matches!(self, UpstreamError::Connect(_))
    }

    fn from_client(err: hyper_util::client::legacy::Error) -> Self {
        if err.is_connect() {
            return UpstreamError::Connect(error_chain(&err));
        }
        UpstreamError::Failed(error_chain(&err))
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

impl tower_service::Service<Uri> for Connector {
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

/// The shared upstream client: one keep-alive pool for all routes and both schemes.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, ProxyBody>,
}

impl Upstream {
    /// Builds the client; fails (naming `upstream.ca_file`) if that file cannot be used.
    pub fn new(settings: &UpstreamSettings) -> Result<Self, ConfigError> {
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
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .retry_canceled_requests(true)
            .set_host(false)
            // Bounds what one upstream connection buffers while its client reads slowly
            // (backpressure holds the rest in the kernel): 64 KiB, not hyper's ~400 KiB.
            .http1_max_buf_size(UPSTREAM_READ_BUFFER)
            .build(connector);
        Ok(Self { client })
    }

    /// Sends `request`, waiting at most `timeout` for the response head.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(UpstreamError::from_client(err)),
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        }
    }
}
