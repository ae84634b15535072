//! Opening upstream connections: TCP, then TLS for `https://` origins, then hyper's HTTP/1.1
//! client handshake, the connection itself driven by a task of its own.
//!
//! `https://` upstreams are reached over rustls (`ring` provider, HTTP/1.1 only, no ALPN),
//! trusting the system's CA certificates (the bundled Mozilla roots where the system has none)
//! plus those in `upstream.ca_file`, the server's identity checked as RFC 9110 §4.3.4 requires.
//! The TLS handshake ends before any byte of a request is written, so its failure is an
//! [`UpstreamError::Connect`], like a refused connection.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use http::Uri;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tower_service::Service;

use super::error::{BoxError, UpstreamError};
use crate::body::ProxyBody;
use crate::config::{ConfigError, UpstreamSettings};
use crate::error::chain::Chain;

/// Largest read buffer of one upstream connection.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// TCP keep-alive probes on upstream connections, so a silently dead peer is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// One connection's sending half. The connection itself runs as its own task and ends when
/// every `Sender` of it is dropped (after finishing the exchange in progress) or the upstream
/// closes it.
pub(super) type Sender = http1::SendRequest<ProxyBody>;

/// A connected stream: plain TCP, or TLS over it.
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Opens connections to upstream origins: `upstream.connect_timeout` over the whole connect (TCP
/// and TLS handshake), then the HTTP/1.1 handshake with this proxy's connection settings.
#[derive(Clone)]
pub(super) struct Connector {
    /// `http://` and `https://` (the TLS layer hands plain `http://` URIs through).
    https: HttpsConnector<HttpConnector>,
    /// `upstream.connect_timeout`, over TCP connect and TLS handshake together:
    /// `HttpConnector`'s own timeout covers TCP only, and a handshake that stalls must still fail
    /// as a connect error (nothing was sent, the key is released) rather than run into the
    /// upstream timeout (outcome unknown).
    timeout: Duration,
    http1: http1::Builder,
}

impl Connector {
    /// The connector `settings` describe; fails (naming the key) if `upstream.ca_file` cannot be
    /// used.
    pub(super) fn new(settings: &UpstreamSettings) -> Result<Self, ConfigError> {
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
        tcp.set_keepalive(Some(TCP_KEEPALIVE));
        // The TLS layer on top takes `https://` URIs too; it hands plain `http://` ones through.
        tcp.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let mut http1 = http1::Builder::new();
        // Bounds what one upstream connection buffers while its client reads slowly
        // (backpressure holds the rest in the kernel): 64 KiB, not hyper's ~400 KiB.
        http1.max_buf_size(UPSTREAM_READ_BUFFER);
        Ok(Self {
            https,
            timeout: settings.connect_timeout,
            http1,
        })
    }

    /// A new connection to `origin` (`scheme://authority`), its connection task spawned.
    /// Every failure here is an [`UpstreamError::Connect`]: no request was written yet.
    pub(super) async fn connect(&self, origin: &Uri) -> Result<Sender, UpstreamError> {
        let stream = self.open(origin).await.map_err(UpstreamError::Connect)?;
        let (sender, connection) = self
            .http1
            .handshake(stream)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %Chain(&err), "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// TCP connect and, for `https://`, the TLS handshake, within [`Connector::timeout`].
    async fn open(&self, origin: &Uri) -> Result<Stream, BoxError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.https.clone().call(origin.clone())).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection (TCP and TLS handshake) within {timeout:?}"),
            )
            .into()),
        }
    }
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
