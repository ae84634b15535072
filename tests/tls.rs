//! TLS, end to end: `https://` upstreams (trusted through `upstream.ca_file`), the TLS listener
//! (`tls.cert`/`tls.key`: HTTP/1.1 and HTTP/2 chosen by ALPN, `X-Forwarded-Proto: https`, silent
//! and plain-text clients dropped), and Redis over TLS (`rediss://` trusted through
//! `store.ca_file`). Every certificate is made here by a throw-away CA (rcgen).

mod common;

use std::future::pending;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    assert_problem, assert_problem_type, assert_replay_of, free_port, start_harness, TestClient, TestProxy,
    TestResponse, TestUpstream,
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A certificate authority made for one test, with its PEM files in a temporary directory.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

/// A server certificate for `localhost` (and 127.0.0.1) the [`TestCa`] signed, as PEM files.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "idemproxy test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key")).expect("CA cert");
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write the CA");
        Self { issuer, dir }
    }

    /// The CA certificate's PEM file: what `upstream.ca_file` / `store.ca_file` name.
    fn pem_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `localhost` and 127.0.0.1, written as `name.pem` and `name.key`.
    fn issue(&self, name: &str) -> Issued {
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed by the CA");
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write the cert");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write the key");
        issued
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A rustls server configuration presenting `issued`.
    fn server_config(&self, issued: &Issued) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&issued.cert)
            .expect("cert file")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert PEM");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&issued.key).expect("key PEM");
        let config = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        Arc::new(config)
    }

    /// A TLS client trusting this CA only, offering `alpn`.
    fn connector(&self, alpn: &[u8]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("the CA is a trust anchor");
        let mut config = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    /// A TLS connection to `addr` as `localhost`, offering `alpn`.
    async fn connect(&self, addr: SocketAddr, alpn: &[u8]) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        self.connector(alpn)
            .connect(ServerName::try_from("localhost").expect("a name"), tcp)
            .await
            .expect("TLS handshake with the proxy")
    }
}

/// `backend` (a plain [`TestUpstream`]) behind TLS: a relay that terminates TLS with `config`
/// and pipes the decrypted bytes to it. Returns the TLS address.
async fn tls_front(config: Arc<rustls::ServerConfig>, backend: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the TLS front");
    let addr = listener.local_addr().expect("local addr");
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// Sends `request` over `tls` with HTTP/1.1 or HTTP/2, whichever ALPN chose, and reads the answer.
async fn send_over(tls: TlsStream<TcpStream>, request: Request<Full<Bytes>>) -> TestResponse {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let response = if h2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(connection);
        sender.send_request(request).await.expect("h2 response")
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.expect("h1 handshake");
        tokio::spawn(connection);
        sender.send_request(request).await.expect("h1 response")
    };
    let (parts, body) = response.into_parts();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("response body").to_bytes(),
    }
}

/// Reads until the peer closes (or fails) the connection; panics if it stays open.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let result = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
    assert!(result.is_ok(), "the proxy kept the connection open for {within:?}");
    received
}

/// The error `idemproxy::serve` fails with at start-up for `config_toml`.
async fn start_error(config_toml: &str) -> String {
    let (config_toml, _data_dir) = common::with_own_data_dir(config_toml);
    let config = idemproxy::Config::from_toml(&config_toml).expect("the config text itself is valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    match tokio::time::timeout(Duration::from_secs(10), idemproxy::serve(config, listener, pending())).await {
        Ok(Err(err)) => err.to_string(),
        Ok(Ok(())) => panic!("serve returned without an error"),
        Err(_) => panic!("serve started although the config names an unusable file"),
    }
}

fn toml_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "\\\\")
}

/// A [`TestUpstream`] behind a TLS front presenting a certificate of `ca` for `localhost`: the
/// upstream and the `https://localhost:<port>` URL that reaches it.
async fn https_upstream(ca: &TestCa) -> (TestUpstream, String) {
    let upstream = TestUpstream::start().await;
    let front = tls_front(ca.server_config(&ca.issue("upstream")), upstream.addr).await;
    (upstream, format!("https://localhost:{}", front.port()))
}

/// `GET path` with `Host: localhost`, for [`send_over`] and [`tls_request`].
fn get_localhost(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file() {
    let ca = TestCa::new();
    let (upstream, https_url) = https_upstream(&ca).await;
    let proxy = TestProxy::to_url(&https_url)
        .config(&format!("upstream.ca_file = \"{}\"", toml_path(&ca.pem_file())))
        .start()
        .await;
    let client = TestClient::new();

    let get = client.send(Method::GET, &proxy.url("/items"), &[], "").await;
    assert_eq!(get.status, StatusCode::CREATED, "{get:?}");
    assert_eq!(get.json()["path"], "/items");

    let first = client
        .post_keyed(&proxy.url("/pay"), "tls-key-1", "{\"amount\":1}")
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let retry = client
        .post_keyed(&proxy.url("/pay"), "tls-key-1", "{\"amount\":1}")
        .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_replay_of(&retry, &first);
    assert_eq!(upstream.hits(), 2, "the GET and one execution of the POST");
    let seen = upstream.requests();
    assert_eq!(
        seen[1].headers.get("host").map(|h| h.as_bytes()),
        https_url.strip_prefix("https://").map(str::as_bytes)
    );
}

#[tokio::test]
async fn https_upstream_with_an_unknown_ca_is_unreachable() {
    let ca = TestCa::new();
    let (upstream, https_url) = https_upstream(&ca).await;
    let proxy = TestProxy::to_url(https_url).start().await;
    let client = TestClient::new();

    let get = client.send(Method::GET, &proxy.url("/items"), &[], "").await;
    assert_problem(&get, StatusCode::BAD_GATEWAY, "upstream-unreachable");
    // A failed handshake is a connect error: the key is released, so a retry executes (and
    // fails the same way, not as an unknown outcome).
    for _attempt in ["first", "retry"] {
        let keyed = client.post_keyed(&proxy.url("/pay"), "tls-key-2", "{}").await;
        assert_problem_type(&keyed, "upstream-unreachable");
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_stalled_upstream_handshake_is_a_connect_failure() {
    // Accepts TCP connections and never answers the ClientHello.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let proxy = TestProxy::to_url(format!("https://localhost:{}", addr.port()))
        .config("upstream.connect_timeout = \"300ms\"\nupstream.timeout = \"10s\"")
        .start()
        .await;
    let started = Instant::now();
    let keyed = TestClient::new().post_keyed(&proxy.url("/pay"), "stalled", "{}").await;
    // Nothing was sent: not an unknown outcome.
    assert_problem(&keyed, StatusCode::BAD_GATEWAY, "upstream-unreachable");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// A proxy terminating TLS with a certificate of `ca`, in front of a plain `upstream`.
async fn tls_proxy(ca: &TestCa, upstream: &TestUpstream, extra: &str) -> TestProxy {
    let issued = ca.issue("proxy");
    TestProxy::to(upstream)
        .config(&format!(
            "tls.cert = \"{}\"\ntls.key = \"{}\"",
            toml_path(&issued.cert),
            toml_path(&issued.key)
        ))
        .config(extra)
        .start()
        .await
}

/// One request over a fresh TLS connection to `addr` offering `alpn`.
async fn tls_request(ca: &TestCa, addr: SocketAddr, alpn: &[u8], request: Request<Full<Bytes>>) -> TestResponse {
    send_over(ca.connect(addr, alpn).await, request).await
}

#[tokio::test]
async fn tls_listener_serves_http1_and_h2_and_says_https() {
    let ca = TestCa::new();
    let upstream = TestUpstream::start().await;
    let proxy = tls_proxy(&ca, &upstream, "").await;

    let tls = ca.connect(proxy.addr, b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let h1 = send_over(tls, get_localhost("/over-tls")).await;
    assert_eq!(h1.status, StatusCode::CREATED, "{h1:?}");
    assert_eq!(h1.json()["path"], "/over-tls");
    let seen = upstream.requests();
    assert_eq!(
        seen[0].headers.get("x-forwarded-proto").map(|v| v.as_bytes()),
        Some(&b"https"[..])
    );

    let tls = ca.connect(proxy.addr, b"h2").await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the listener offers h2"
    );
    let request = Request::post(format!("https://localhost:{}/h2-over-tls", proxy.addr.port()))
        .header("idempotency-key", "h2-tls-key")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let h2 = send_over(tls, request).await;
    assert_eq!(h2.status, StatusCode::CREATED, "{h2:?}");
    assert_eq!(h2.json()["path"], "/h2-over-tls");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].headers.get("x-forwarded-proto").map(|v| v.as_bytes()),
        Some(&b"https"[..])
    );

    let request = Request::post("/h2-over-tls")
        .header("host", "localhost")
        .header("idempotency-key", "h2-tls-key")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let replay = tls_request(&ca, proxy.addr, b"http/1.1", request).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"), "{replay:?}");
    assert_eq!(upstream.hits(), 2);
}

/// The end-entity certificate the listener at `addr` presents to a new handshake.
async fn served_certificate(ca: &TestCa, addr: SocketAddr) -> Vec<u8> {
    let tls = ca.connect(addr, b"http/1.1").await;
    let certificates = tls.get_ref().1.peer_certificates().expect("the server's certificates");
    certificates[0].as_ref().to_vec()
}

/// The certificate in a PEM file, as DER.
fn certificate_in(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .expect("a PEM certificate")
        .as_ref()
        .to_vec()
}

/// The listener re-reads `tls.cert` and `tls.key` when they change (`tls.reload_interval`): new
/// handshakes get a rotated pair without a restart, and files that cannot be used are refused
/// with the previous certificate kept.
#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let ca = TestCa::new();
    let upstream = TestUpstream::start().await;
    let proxy = tls_proxy(&ca, &upstream, "tls.reload_interval = \"100ms\"").await;
    let cert_file = ca.dir.path().join("proxy.pem");
    let first = served_certificate(&ca, proxy.addr).await;
    assert_eq!(first, certificate_in(&cert_file));

    // Unusable files (a certificate that is not PEM): refused, the previous pair stays.
    let issued_pem = std::fs::read(&cert_file).expect("read the cert");
    std::fs::write(&cert_file, b"not a certificate").expect("break the cert");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_certificate(&ca, proxy.addr).await,
        first,
        "still the first certificate"
    );
    std::fs::write(&cert_file, issued_pem).expect("restore the cert");

    // Rotation: a new pair under the same file names (certificate first, then key: for a moment
    // they do not go together, and that moment is refused too).
    let rotated = ca.issue("proxy");
    let expected = certificate_in(&rotated.cert);
    assert_ne!(expected, first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_certificate(&ca, proxy.addr).await != expected {
        assert!(Instant::now() < deadline, "the rotated certificate is served within 5s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = tls_request(&ca, proxy.addr, b"http/1.1", get_localhost("/after-rotation")).await;
    assert_eq!(response.status, StatusCode::CREATED);
}

#[tokio::test]
async fn plain_http_on_the_tls_listener_gets_no_answer() {
    let ca = TestCa::new();
    let upstream = TestUpstream::start().await;
    let proxy = tls_proxy(&ca, &upstream, "").await;

    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    plain
        .write_all(b"GET /plain HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let received = read_until_closed(&mut plain, Duration::from_secs(5)).await;
    assert!(
        !received.starts_with(b"HTTP/"),
        "a plain answer: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(upstream.hits(), 0);

    // A plain-HTTP client using h2c prior knowledge is refused the same way.
    let h2c = TestClient::http2()
        .try_send(Method::GET, &format!("http://{}/plain", proxy.addr), &[], "")
        .await;
    assert!(h2c.is_err(), "{h2c:?}");

    let after = tls_request(&ca, proxy.addr, b"http/1.1", get_localhost("/after")).await;
    assert_eq!(
        after.status,
        StatusCode::CREATED,
        "the listener still serves TLS clients"
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn silent_tls_clients_are_dropped_after_the_header_read_timeout() {
    let ca = TestCa::new();
    let upstream = TestUpstream::start().await;
    let proxy = tls_proxy(&ca, &upstream, "server.header_read_timeout = \"300ms\"").await;

    // Connects and never starts the handshake.
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    let received = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(received.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // Completes the handshake, then sends nothing.
    let started = Instant::now();
    let mut quiet = ca.connect(proxy.addr, b"http/1.1").await;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 64];
        loop {
            match quiet.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the proxy drops a client that sends no request after the handshake");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn unusable_tls_files_stop_start_up_naming_the_setting() {
    let ca = TestCa::new();
    let issued = ca.issue("proxy");
    let junk = ca.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let missing = ca.dir.path().join("missing.pem");
    let base = "upstream.url = \"http://127.0.0.1:9\"\n";

    let err = start_error(&format!("{base}upstream.ca_file = \"{}\"", toml_path(&missing))).await;
    assert!(err.contains("upstream.ca_file") && err.contains("missing.pem"), "{err}");
    let err = start_error(&format!("{base}upstream.ca_file = \"{}\"", toml_path(&junk))).await;
    assert!(
        err.contains("upstream.ca_file") && err.contains("no PEM certificate"),
        "{err}"
    );

    let err = start_error(&format!(
        "{base}tls.cert = \"{}\"\ntls.key = \"{}\"",
        toml_path(&missing),
        toml_path(&issued.key)
    ))
    .await;
    assert!(err.contains("tls.cert") && err.contains("missing.pem"), "{err}");
    let err = start_error(&format!(
        "{base}tls.cert = \"{}\"\ntls.key = \"{}\"",
        toml_path(&issued.cert),
        toml_path(&junk)
    ))
    .await;
    assert!(err.contains("tls.key") && err.contains("junk.pem"), "{err}");
    let other = ca.issue("other");
    let err = start_error(&format!(
        "{base}tls.cert = \"{}\"\ntls.key = \"{}\"",
        toml_path(&issued.cert),
        toml_path(&other.key)
    ))
    .await;
    assert!(
        err.contains("tls.key"),
        "a key that does not match the certificate: {err}"
    );

    let err = start_error(&format!(
        "{base}store.redis = \"rediss://localhost:1\"\nstore.ca_file = \"{}\"",
        toml_path(&junk)
    ))
    .await;
    assert!(err.contains("store.ca_file"), "{err}");
}

/// A `redis-server` serving TLS only, on an ephemeral port, with a certificate of a [`TestCa`];
/// killed on drop.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    /// `None` (after saying why) when the installed `redis-server` was built without TLS.
    fn start(ca: &TestCa) -> Option<Self> {
        let issued = ca.issue("redis");
        let port = free_port();
        let log = ca.dir.path().join("redis.log");
        let mut child = match Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(&issued.cert)
            .arg("--tls-key-file")
            .arg(&issued.key)
            .arg("--tls-ca-cert-file")
            .arg(ca.pem_file())
            .arg("--dir")
            .arg(ca.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                eprintln!("skipped: cannot run redis-server ({err})");
                return None;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self { port, child });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    output.to_ascii_lowercase().contains("tls"),
                    "redis-server exited ({status}) for another reason than TLS support:\n{output}"
                );
                eprintln!("skipped: this redis-server has no TLS support:\n{output}");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        panic!("redis-server did not listen for TLS on port {port}");
    }

    /// The `store.*` settings for this server, with its certificate's name.
    fn store_config(&self, command_timeout: &str) -> String {
        format!(
            "store.redis = \"rediss://localhost:{}\"\nstore.command_timeout = \"{command_timeout}\"",
            self.port
        )
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn rediss_store_trusted_through_store_ca_file() {
    let ca = TestCa::new();
    let Some(redis) = TlsRedis::start(&ca) else {
        return;
    };
    let ca_file = format!("store.ca_file = \"{}\"", toml_path(&ca.pem_file()));
    let (upstream, proxy, client) =
        start_harness(|up| TestProxy::to(up).config(&redis.store_config("2s")).config(&ca_file)).await;

    let url = proxy.url("/pay");
    let first = client.post_keyed(&url, "rediss-key", "{\"amount\":3}").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let retry = client.post_keyed(&url, "rediss-key", "{\"amount\":3}").await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_replay_of(&retry, &first);
    assert_eq!(upstream.hits(), 1, "executed once, replayed from Redis over TLS");
}

#[tokio::test]
async fn rediss_store_with_an_unknown_ca_is_unavailable() {
    let ca = TestCa::new();
    let Some(redis) = TlsRedis::start(&ca) else {
        return;
    };
    let (upstream, proxy, client) = start_harness(|up| TestProxy::to(up).config(&redis.store_config("500ms"))).await;

    let keyed = client.post_keyed(&proxy.url("/pay"), "rediss-key", "{}").await;
    assert_problem(&keyed, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(
        upstream.hits(),
        0,
        "nothing is forwarded while the store cannot be trusted"
    );
}

#[test]
fn store_ca_file_is_for_rediss_only() {
    let refused = |text: &str| match idemproxy::Config::from_toml(text) {
        Ok(_) => panic!("expected this config to be refused:\n{text}"),
        Err(err) => err.to_string(),
    };
    let base = "upstream.url = \"http://127.0.0.1:3000\"\n";
    let plain = refused(&format!(
        "{base}store.redis = \"redis://127.0.0.1:6379\"\nstore.ca_file = \"/ca.pem\""
    ));
    assert!(
        plain.contains("store.ca_file") && plain.contains("rediss://"),
        "{plain}"
    );
    let memory = refused(&format!("{base}store.ca_file = \"/ca.pem\""));
    assert!(memory.contains("store.ca_file"), "{memory}");
    for url in ["rediss://redis.internal:6380", "rediss+cluster://a:1,b:2"] {
        let config =
            idemproxy::Config::from_toml(&format!("{base}store.redis = \"{url}\"\nstore.ca_file = \"/ca.pem\""))
                .expect("valid");
        assert!(matches!(
            config.store,
            idemproxy::config::StoreSettings::Redis { ca_file: Some(ref path), .. } if path == Path::new("/ca.pem")
        ));
    }
}

#[test]
fn tls_flags_reach_the_config() {
    use clap::Parser;
    let cli = idemproxy::config::Cli::try_parse_from([
        "idemproxy",
        "--upstream",
        "https://api.internal",
        "--upstream-ca",
        "/up.pem",
        "--tls-cert",
        "/cert.pem",
        "--tls-key",
        "/key.pem",
        "--redis",
        "rediss://redis.internal:6380",
        "--redis-ca",
        "/redis.pem",
    ])
    .expect("flags parse");
    let config = idemproxy::Config::load(&cli).expect("valid");
    let tls = config.tls.expect("TLS listener");
    assert_eq!(
        (tls.cert.as_path(), tls.key.as_path()),
        (Path::new("/cert.pem"), Path::new("/key.pem"))
    );
    assert_eq!(config.upstream.ca_file.as_deref(), Some(Path::new("/up.pem")));
    assert!(matches!(
        config.store,
        idemproxy::config::StoreSettings::Redis { ca_file: Some(ref path), .. } if path == Path::new("/redis.pem")
    ));
}

/// Waiting retries across two proxies on Redis over TLS: the subscription connection is made
/// with the same TLS settings (`store.ca_file`), and the waiter on the second proxy is woken by
/// the first's completion (docs/behaviour.md §15.2).
#[tokio::test]
async fn rediss_store_wakes_waiters_across_proxies() {
    let ca = TestCa::new();
    let Some(redis) = TlsRedis::start(&ca) else {
        return;
    };
    let ca_file = format!("store.ca_file = \"{}\"", toml_path(&ca.pem_file()));
    let upstream = TestUpstream::start().await;
    let proxy = |admin: bool| {
        let builder = TestProxy::to(&upstream)
            .config(&redis.store_config("2s"))
            .config(&ca_file)
            .idempotency("on_conflict = \"wait\"\nwait_timeout = \"10s\"");
        if admin {
            builder.admin()
        } else {
            builder
        }
    };
    let a = proxy(false).start().await;
    let b = proxy(true).start().await;
    let send = |url: String, delay: &'static str| async move {
        let headers = [("idempotency-key", "rediss-wait"), ("x-upstream-delay-ms", delay)];
        TestClient::new().send(Method::POST, &url, &headers, "{}").await
    };
    let waiter = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(b.url("/pay"), "0").await
    };
    let (first, waiter) = tokio::join!(send(a.url("/pay"), "600"), waiter);
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_replay_of(&waiter, &first);
    assert_eq!(upstream.hits(), 1);
    let admin = b.admin.expect("an admin listener");
    let metrics = TestClient::new()
        .send(Method::GET, &format!("http://{admin}/metrics"), &[], "")
        .await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("idemproxy_wait_wakeups_total{reason=\"settled\"} 1"),
        "woken through the TLS subscription: {metrics}"
    );
}
