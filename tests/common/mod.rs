//! Shared integration-test helpers: ephemeral ports only, processes owned (and killed) by the
//! test, a real in-process upstream that records every request, and the proxy started through
//! the same `idemproxy::serve` the binary uses, configured in a line or two
//! (`TestProxy::to(&upstream).redis(&redis).start().await`) and keeping its keys in a
//! [`Backend`] for the suites that run once per store.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A port nobody listens on right now (bound then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// A `redis-server` on an ephemeral port, killed on drop. No persistence unless asked.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut server = Self {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            // A replica's first sync starts at once (Redis waits 5 s for more replicas by default).
            "--repl-diskless-sync-delay".into(),
            "0".into(),
        ];
        if !self.extra.iter().any(|a| a == "--appendonly") {
            args.extend(["--appendonly".into(), "no".into()]);
        }
        args.extend(self.extra.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        client.get_connection_with_timeout(Duration::from_millis(500))
    }

    pub fn ping(&self) -> bool {
        self.connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (and the same data directory).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A replica of `primary` on a port of its own, once it has synchronised.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let port = primary.port.to_string();
        let replica = Self::start_with(&["--replicaof", "127.0.0.1", &port]);
        replica.wait_synced(primary.port);
        replica
    }

    /// Starts it again on the same port as a replica of the server on `primary_port` (as an
    /// operator brings a failed primary back after a failover), once it has synchronised.
    pub fn restart_as_replica_of(&mut self, primary_port: u16) {
        self.rejoin_as_replica_of(primary_port);
        self.wait_synced(primary_port);
    }

    /// Starts it again on the same port as a replica of the server on `primary_port`, without
    /// waiting for it to synchronise (under Sentinel, which may reconfigure it meanwhile).
    pub fn rejoin_as_replica_of(&mut self, primary_port: u16) {
        if let Some(at) = self.extra.iter().position(|a| a == "--replicaof") {
            self.extra.drain(at..(at + 3).min(self.extra.len()));
        }
        self.extra.extend([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary_port.to_string(),
        ]);
        self.restart();
    }

    /// Waits until this replica acknowledges writes to the primary on `primary_port` (what a
    /// `WAIT` counts; for a moment after a sync the primary lists it online before it does),
    /// 10 s at most. The probe write is deleted again.
    pub fn wait_synced(&self, primary_port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if replica_acknowledges_writes_to(primary_port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} never acknowledged writes to {primary_port}",
            self.port
        );
    }

    /// `INFO section` as text (empty if the server does not answer).
    pub fn info(&self, section: &str) -> String {
        self.connection()
            .and_then(|mut c| redis::cmd("INFO").arg(section).query::<String>(&mut c))
            .unwrap_or_default()
    }

    /// `INFO commandstats` as command name → calls.
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let mut connection = self.connection().expect("redis reachable");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut connection)
            .expect("INFO works");
        info.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect()
    }

    /// Resets `INFO commandstats`.
    pub fn reset_stats(&self) {
        let mut connection = self.connection().expect("redis reachable");
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut connection)
            .expect("CONFIG RESETSTAT works");
    }

    /// Runs a command, for assertions on what the proxy stored.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut connection = self.connection().expect("redis reachable");
        cmd.query(&mut connection).expect("redis command works")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The name the sentinels of a [`SentinelSet`] monitor their primary under.
pub const MASTER_NAME: &str = "idem";

/// `redis-server --sentinel` processes on ephemeral ports, monitoring one primary as
/// [`MASTER_NAME`] with quorum 2, killed on drop. Failure detection is cut down for tests:
/// a primary is down after 500 ms without an answer, and a failover gives up after 2 s.
pub struct SentinelSet {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    /// `count` sentinels watching `primary`; returns once they know each other and see
    /// `replicas` replicas of it.
    pub fn start(primary: &RedisServer, count: usize, replicas: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let children = ports
            .iter()
            .map(|port| {
                let config = dir.path().join(format!("sentinel-{port}.conf"));
                let text = format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel announce-ip 127.0.0.1\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 500\n\
                     sentinel failover-timeout {MASTER_NAME} 2000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = dir.path().display(),
                    primary = primary.port,
                );
                std::fs::write(&config, text).expect("sentinel config written");
                Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel starts")
            })
            .collect();
        let set = Self {
            ports,
            children,
            _dir: dir,
        };
        set.wait_until(
            Duration::from_secs(20),
            "the sentinels to know each other and the replicas",
            |s| {
                s.iter().all(|fields| {
                    field(fields, "num-other-sentinels") == Some(count - 1)
                        && field(fields, "num-slaves") >= Some(replicas)
                })
            },
        );
        set
    }

    /// `redis+sentinel://127.0.0.1:p1,…/idem`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", nodes.join(","))
    }

    /// The primary's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.ports.iter().find_map(|port| {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
            let mut connection = client.get_connection_with_timeout(Duration::from_millis(500)).ok()?;
            let (_ip, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME)
                .query(&mut connection)
                .ok()?;
            Some(port)
        })
    }

    /// Waits until every sentinel names the server on `port` as the primary (a failover done).
    pub fn wait_for_master(&self, port: u16, within: Duration) {
        self.wait_until(within, "the sentinels to name the new primary", |all| {
            all.iter().all(|fields| field(fields, "port") == Some(port as usize))
        });
    }

    /// Polls `SENTINEL MASTER` on every sentinel until `done` holds of their answers.
    fn wait_until(&self, within: Duration, what: &str, done: impl Fn(&[HashMap<String, String>]) -> bool) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let answers: Option<Vec<HashMap<String, String>>> =
                self.ports.iter().map(|p| sentinel_master(*p)).collect();
            if answers.is_some_and(|a| done(&a)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("waited {within:?} for {what}");
    }
}

/// A sentinel's `SENTINEL MASTER` fields for [`MASTER_NAME`].
fn sentinel_master(port: u16) -> Option<HashMap<String, String>> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut connection = client.get_connection_with_timeout(Duration::from_millis(500)).ok()?;
    redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(MASTER_NAME)
        .query(&mut connection)
        .ok()
}

fn field(fields: &HashMap<String, String>, name: &str) -> Option<usize> {
    fields.get(name)?.parse().ok()
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How the upstream answers, chosen per request by `x-upstream-*` request headers:
/// - `x-upstream-delay-ms: N` wait before answering;
/// - `x-upstream-status: N` answer with that status;
/// - `x-upstream-body-bytes: N` answer with a body of N bytes (streamed in 64 KiB chunks);
/// - `x-upstream-reset: 1` read the request, then drop the connection without answering;
/// - `x-upstream-header: name=value` add a response header.
///
/// Otherwise 201 with a JSON body naming the hit number, unique per execution.
#[derive(Clone)]
pub struct TestUpstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// TCP connections accepted (on this address, since the first start).
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Extra delay applied to every answer (a stalled upstream), in ms.
    stall_ms: Arc<AtomicU64>,
    stop: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on a given address (to bring an upstream back on the same port).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        Self::serve_on(
            listener,
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
        )
    }

    /// Serves again on the same address after [`stop`](Self::stop), keeping the counters.
    pub async fn restart(&self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("cannot rebind upstream {}: {err}", self.addr),
            }
        };
        Self::serve_on(
            listener,
            self.hits.clone(),
            self.connections.clone(),
            self.requests.clone(),
            self.stall_ms.clone(),
        )
    }

    /// Delays every answer by `stall` from now on (zero: no stall).
    pub fn set_stall(&self, stall: Duration) {
        self.stall_ms.store(stall.as_millis() as u64, Ordering::SeqCst);
    }

    fn serve_on(
        listener: TcpListener,
        hits: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<Recorded>>>,
        stall_ms: Arc<AtomicU64>,
    ) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let upstream = Self {
            addr,
            hits: hits.clone(),
            connections: connections.clone(),
            requests: requests.clone(),
            stall_ms: stall_ms.clone(),
            stop: Arc::new(Mutex::new(Some(stop_tx))),
        };
        let connections_accepted = connections;
        tokio::spawn(async move {
            let mut connections = Vec::new();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => break,
                };
                connections_accepted.fetch_add(1, Ordering::SeqCst);
                let hits = hits.clone();
                let requests = requests.clone();
                let stall_ms = stall_ms.clone();
                connections.push(tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let hits = hits.clone();
                        let requests = requests.clone();
                        let stall = Duration::from_millis(stall_ms.load(Ordering::SeqCst));
                        async move { answer(request, hits, requests, stall).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }));
            }
            for c in connections {
                c.abort();
            }
        });
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that reached the upstream (executions).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// TCP connections the upstream accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    /// Stops accepting and drops every open connection (a dead upstream).
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().expect("lock").take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if Arc::strong_count(&self.stop) == 1 {
            self.stop();
        }
    }
}

fn header_num(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn answer(
    request: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stall: Duration,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>, std::io::Error> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    let hit = hits.fetch_add(1, Ordering::SeqCst) + 1;
    requests.lock().expect("lock").push(Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if let Some(ms) = header_num(&parts.headers, "x-upstream-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }
    if parts.headers.contains_key("x-upstream-reset") {
        return Err(std::io::Error::other("reset requested"));
    }
    let status = header_num(&parts.headers, "x-upstream-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-hit", hit.to_string());
    for value in parts.headers.get_all("x-upstream-header") {
        if let Some((n, v)) = value.to_str().ok().and_then(|s| s.split_once('=')) {
            builder = builder.header(n, v);
        }
    }
    let body = match header_num(&parts.headers, "x-upstream-body-bytes") {
        Some(size) => {
            let chunks = futures_chunks(size);
            http_body_util::StreamBody::new(chunks).boxed()
        }
        None => Full::new(Bytes::from(format!(
            "{{\"hit\":{hit},\"method\":\"{}\",\"path\":\"{}\",\"body_bytes\":{}}}",
            parts.method,
            parts.uri.path(),
            body.len()
        )))
        .map_err(|never| match never {})
        .boxed(),
    };
    builder.body(body).map_err(std::io::Error::other)
}

/// A body of `size` bytes, produced in 64 KiB chunks as the reader pulls them.
fn futures_chunks(
    size: u64,
) -> impl futures_core::Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>> + Send + Sync + 'static {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let mut left = size;
    let iter = std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK);
        left -= n;
        Some(Ok(hyper::body::Frame::data(chunk.slice(..n as usize))))
    });
    tokio_stream_iter(iter)
}

fn tokio_stream_iter<I: Iterator + Unpin + Send + Sync + 'static>(
    iter: I,
) -> impl futures_core::Stream<Item = I::Item> + Send + Sync {
    struct Iter<I>(I);
    impl<I: Iterator + Unpin> futures_core::Stream for Iter<I> {
        type Item = I::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<I::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(iter)
}

/// A proxy running in this process through `idemproxy::serve`.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), idemproxy::ServeError>>>,
    /// The disk store's directory when the test named none (removed after the proxy).
    data_dir: Option<tempfile::TempDir>,
}

/// `config_toml` with a `store.data_dir` of its own when it would use the disk store without
/// naming a directory, so that two proxies never share one by accident; and that directory.
pub fn with_own_data_dir(config_toml: &str) -> (String, Option<tempfile::TempDir>) {
    let file = idemproxy::config::FileConfig::parse(config_toml).expect("test config parses");
    let store = &file.store;
    let memory = store.embedded == Some(idemproxy::config::EmbeddedStore::Memory);
    if store.redis.is_some() || store.data_dir.is_some() || memory {
        return (config_toml.to_owned(), None);
    }
    let dir = tempfile::tempdir().expect("a temp data dir");
    let setting = format!("data_dir = \"{}\"", dir.path().display());
    let text = match config_toml.find("[store]\n") {
        Some(at) => {
            let (before, after) = config_toml.split_at(at + "[store]\n".len());
            format!("{before}{setting}\n{after}")
        }
        None => format!("store.{setting}\n{config_toml}"),
    };
    (text, Some(dir))
}

impl TestProxy {
    /// Starts a proxy from a whole config text (for configurations [`to`](Self::to) cannot build,
    /// such as several routes); `listen` is chosen here.
    pub async fn start(config_toml: &str) -> Self {
        Self::start_inner(config_toml, false).await
    }

    /// A catch-all proxy to `upstream`, to configure and then [`start`](ProxyBuilder::start):
    /// `TestProxy::to(&upstream).idempotency("lock_ttl = \"300ms\"").start().await`.
    pub fn to(upstream: &TestUpstream) -> ProxyBuilder {
        Self::to_url(upstream.url())
    }

    /// Like [`to`](Self::to), for an upstream that is not a [`TestUpstream`] (a relay, an
    /// address nobody listens on, a hand-written server).
    pub fn to_url(upstream_url: impl Into<String>) -> ProxyBuilder {
        ProxyBuilder {
            upstream_url: upstream_url.into(),
            settings: Vec::new(),
            idempotency: Vec::new(),
            admin: false,
        }
    }

    async fn start_inner(config_toml: &str, admin: bool) -> Self {
        let (config_toml, data_dir) = with_own_data_dir(config_toml);
        let config = idemproxy::Config::from_toml(&config_toml).expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("local addr");
        let admin_listener = if admin {
            Some(TcpListener::bind("127.0.0.1:0").await.expect("bind admin"))
        } else {
            None
        };
        let admin_addr = admin_listener.as_ref().map(|l| l.local_addr().expect("local addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(idemproxy::serve_with_admin(
            config,
            listener,
            admin_listener,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            admin: admin_addr,
            shutdown: Some(tx),
            task: Some(task),
            data_dir,
        }
    }

    /// The disk store directory the proxy was given because its configuration named none.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.data_dir.as_ref().map(|d| d.path())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Starts graceful shutdown and returns the task, to await its end.
    pub fn shutdown(&mut self) -> JoinHandle<Result<(), idemproxy::ServeError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running")
    }

    /// Stops it abruptly (its in-flight work is dropped), as a crash would for in-process state.
    pub fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A proxy's configuration, built up before it starts: the catch-all route to one upstream, the
/// embedded store (on disk, in a temporary directory of its own) unless told otherwise. See
/// [`TestProxy::to`].
#[must_use = "a proxy runs only once started"]
pub struct ProxyBuilder {
    upstream_url: String,
    /// Top-level TOML lines (dotted keys).
    settings: Vec<String>,
    /// Lines of the `[idempotency]` table.
    idempotency: Vec<String>,
    admin: bool,
}

impl ProxyBuilder {
    /// Extra top-level settings as dotted keys (`upstream.timeout = "300ms"`,
    /// `server.max_headers = 20`); not `idempotency.*`: see [`idempotency`](Self::idempotency).
    pub fn config(mut self, toml: &str) -> Self {
        self.settings.push(toml.to_owned());
        self
    }

    /// Settings of the `[idempotency]` table (`key_ttl = "1s"`, `on_conflict = "wait"`).
    pub fn idempotency(mut self, toml: &str) -> Self {
        self.idempotency.push(toml.to_owned());
        self
    }

    /// Keeps the keys in `redis` (commands time out after 500ms).
    pub fn redis(self, redis: &RedisServer) -> Self {
        self.config(&format!(
            "store.redis = \"{}\"\nstore.command_timeout = \"500ms\"",
            redis.url()
        ))
    }

    /// Keeps the keys in `store`.
    pub fn store(self, store: &Backend) -> Self {
        match store {
            Backend::Memory => self.config("store.embedded = \"memory\""),
            Backend::Disk(dir) => {
                // A directory of its own per proxy: two disk stores never share one (a second
                // would be refused), as two memory stores share nothing.
                static PROXIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = PROXIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let data_dir = dir.path().join(format!("proxy-{n}"));
                self.config(&format!("store.data_dir = \"{}\"", data_dir.display()))
            }
            Backend::Redis(redis) => self.redis(redis),
        }
    }

    /// Writes the proxy's own errors in `form` (and, for Stripe's, with its retry hint).
    pub fn error_form(self, form: ErrorForm) -> Self {
        self.idempotency(form.settings())
    }

    /// Adds an admin listener on an ephemeral port ([`TestProxy::admin`]).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// The configuration text.
    pub fn toml(&self) -> String {
        let mut toml = format!("upstream.url = \"{}\"\nlog.filter = \"warn\"\n", self.upstream_url);
        for line in &self.settings {
            toml.push_str(line);
            toml.push('\n');
        }
        if !self.idempotency.is_empty() {
            toml.push_str("[idempotency]\n");
            for line in &self.idempotency {
                toml.push_str(line);
                toml.push('\n');
            }
        }
        toml
    }

    /// Starts the proxy with this configuration.
    pub async fn start(self) -> TestProxy {
        TestProxy::start_inner(&self.toml(), self.admin).await
    }
}

/// The store a proxy under test keeps its keys in (a Redis store owns its `redis-server`). The
/// per-store suites run each behaviour once per variant.
pub enum Backend {
    /// The volatile embedded store (`store.embedded = "memory"`).
    Memory,
    /// The durable embedded store, in a temporary directory of its own: each proxy started on
    /// it gets a fresh subdirectory (like the memory store, nothing is shared between proxies).
    Disk(tempfile::TempDir),
    Redis(RedisServer),
}

impl Backend {
    pub fn memory() -> Self {
        Backend::Memory
    }

    /// The disk store in a fresh temporary directory.
    pub fn disk() -> Self {
        Backend::Disk(tempfile::tempdir().expect("a temp data dir"))
    }

    /// A Redis store on a `redis-server` of its own.
    pub fn redis() -> Self {
        Backend::Redis(RedisServer::start())
    }

    /// A catch-all proxy to `upstream` keeping its keys in this store.
    pub fn proxy(&self, upstream: &TestUpstream) -> ProxyBuilder {
        TestProxy::to(upstream).store(self)
    }

    /// The keys as the store holds them, where they can be read from outside the proxy (Redis:
    /// `KEYS *`); `None` for the embedded stores.
    pub fn stored_keys(&self) -> Option<Vec<String>> {
        match self {
            Backend::Memory | Backend::Disk(_) => None,
            Backend::Redis(redis) => Some(redis.query(redis::cmd("KEYS").arg("*"))),
        }
    }
}

/// One suite run per store: instantiates each test as `<store>::<test>`, a `#[tokio::test]` that
/// runs `super::<test>(<store expression>)`. The expression is evaluated inside the test, so each
/// test gets a fresh store; another store is one more `name => expression` line.
///
/// ```ignore
/// per_store! {
///     stores { memory => Backend::memory(), redis => Backend::redis() }
///     tests { replay_is_identical_and_marked, keys_expire_after_key_ttl }
/// }
/// ```
#[allow(unused_macros)]
macro_rules! per_store {
    (stores { $($store:ident => $fresh:expr),* $(,)? } tests $tests:tt) => {
        $( $crate::common::per_store!(@store $store => $fresh, $tests); )*
    };
    (@store $store:ident => $fresh:expr, { $($test:ident),* $(,)? }) => {
        mod $store {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($fresh).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_store;

/// [`per_store!`] once per [`ErrorForm`] too, for the suites about the proxy's own errors:
/// each test as `<form>::<store>::<test>`, a `#[tokio::test]` running
/// `super::super::<test>(<store expression>, <form expression>)`.
#[allow(unused_macros)]
macro_rules! per_store_and_form {
    (forms { $($form:ident => $form_value:expr),* $(,)? } stores $stores:tt tests $tests:tt) => {
        $(
            mod $form {
                #[allow(unused_imports)]
                use super::*;
                $crate::common::per_store_and_form!(@stores $form_value, $stores, $tests);
            }
        )*
    };
    (@stores $form_value:expr, { $($store:ident => $fresh:expr),* $(,)? }, $tests:tt) => {
        $( $crate::common::per_store_and_form!(@store $form_value, $store => $fresh, $tests); )*
    };
    (@store $form_value:expr, $store:ident => $fresh:expr, { $($test:ident),* $(,)? }) => {
        mod $store {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    super::super::$test($fresh, $form_value).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_store_and_form;

/// How the proxy writes its own errors (`idempotency.error_format`, docs/behaviour.md §8, §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorForm {
    /// RFC 9457 problem+json, no retry hint: the default.
    Problem,
    /// Stripe's `{"error": {...}}`, with `retry_hint_header = "Stripe-Should-Retry"`.
    Stripe,
}

impl ErrorForm {
    /// The `[idempotency]` lines that select it.
    pub fn settings(self) -> &'static str {
        match self {
            ErrorForm::Problem => "error_format = \"problem\"",
            ErrorForm::Stripe => "error_format = \"stripe\"\nretry_hint_header = \"Stripe-Should-Retry\"",
        }
    }

    /// The status of a key reused with another request: `422`, or `400` as Stripe sends it.
    pub fn key_reused_status(self) -> StatusCode {
        match self {
            ErrorForm::Problem => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorForm::Stripe => StatusCode::BAD_REQUEST,
        }
    }

    /// The `Stripe-Should-Retry` value expected where a retry with the same key can (`true`)
    /// or cannot help: none in the problem form, which names no hint header.
    pub fn hint(self, retry: bool) -> Option<&'static str> {
        match self {
            ErrorForm::Problem => None,
            ErrorForm::Stripe => Some(if retry { "true" } else { "false" }),
        }
    }
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The [`TestUpstream`]'s hit number in its JSON answer: which execution answered.
    pub fn hit(&self) -> u64 {
        self.json()["hit"].as_u64().expect("upstream answer has a hit number")
    }

    /// The slug (`key-reused`) of one of the proxy's own errors written in `form`, after
    /// checking the form's shape: problem+json with its `type`, `title`, `status`, `detail`; or
    /// Stripe's `{"error": {"type", "code", "message", "doc_url"}}` whose `type` fits the slug;
    /// and in both the `Link` to the documentation.
    pub fn error_slug(&self, form: ErrorForm) -> String {
        let json = self.json();
        let doc_url = match form {
            ErrorForm::Problem => {
                let problem_type = self.problem_type();
                assert_eq!(json["status"], self.status.as_u16(), "{json}");
                assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()), "{json}");
                assert!(json["detail"].as_str().is_some_and(|d| !d.is_empty()), "{json}");
                problem_type
            }
            ErrorForm::Stripe => {
                assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
                let error = &json["error"];
                assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
                let code = error["code"].as_str().expect("a code").to_string();
                let expected_type = match code.as_str() {
                    "key-reused" => "idempotency_error",
                    _ if self.status.is_server_error() => "api_error",
                    _ => "invalid_request_error",
                };
                assert_eq!(error["type"], expected_type, "{json}");
                let doc_url = error["doc_url"].as_str().expect("a doc_url").to_string();
                assert!(doc_url.ends_with(&format!("#{code}")), "{json}");
                doc_url
            }
        };
        assert_eq!(
            self.header("link"),
            Some(format!("<{doc_url}>; rel=\"describedby\"").as_str())
        );
        doc_url
            .rsplit_once('#')
            .map(|(_, slug)| slug.to_string())
            .unwrap_or_default()
    }

    /// The retry hint the proxy sets in the [`ErrorForm::Stripe`] setup.
    pub fn retry_hint(&self) -> Option<&str> {
        self.header("stripe-should-retry")
    }

    /// The `type` of a problem+json answer.
    pub fn problem_type(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        self.json()["type"].as_str().unwrap_or_default().to_string()
    }
}

/// A plain HTTP/1.1 client with its own pool.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self::new()
    }
}

impl TestClient {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// An HTTP/2-only client (prior knowledge, h2c).
    pub fn http2() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).http2_only(true).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> TestResponse {
        self.try_send(method, url, headers, body)
            .await
            .expect("request completes")
    }

    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<TestResponse, String> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        let request = request.body(Full::new(body.into())).expect("request");
        let response = self.client.request(request).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `POST url` with an `Idempotency-Key` and a body.
    pub async fn post_keyed(&self, url: &str, key: &str, body: &str) -> TestResponse {
        self.send(Method::POST, url, &[("idempotency-key", key)], body.to_string())
            .await
    }
}

/// The `idemproxy` binary run as a child process (for crashes and per-process RSS), killed on drop.
pub struct ProxyProcess {
    pub addr: SocketAddr,
    child: Child,
    /// The disk store's directory when the arguments named none (removed after the process).
    data_dir: Option<tempfile::TempDir>,
}

/// Whether `args` choose the store themselves (Redis, a data directory, or the memory store),
/// directly or in the file `--config` names.
fn args_choose_the_store(args: &[&str]) -> bool {
    args.iter()
        .any(|a| a.starts_with("--redis") || a.starts_with("--data-dir"))
        || args.windows(2).any(|w| w[0] == "--embedded-store" && w[1] == "memory")
        || args.contains(&"--embedded-store=memory")
        || args
            .windows(2)
            .filter_map(|w| (w[0] == "--config").then_some(w[1]))
            .chain(args.iter().filter_map(|a| a.strip_prefix("--config=")))
            .any(config_file_chooses_the_store)
}

/// Whether the config file at `path` chooses the store (as [`with_own_data_dir`] decides); a
/// file that cannot be read or parsed is left to the proxy to refuse.
fn config_file_chooses_the_store(path: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return true;
    };
    match idemproxy::config::FileConfig::parse(&text) {
        Ok(file) => {
            let store = &file.store;
            store.redis.is_some()
                || store.data_dir.is_some()
                || store.embedded == Some(idemproxy::config::EmbeddedStore::Memory)
        }
        Err(_) => true,
    }
}

impl ProxyProcess {
    /// Spawns the binary with `args` plus `--listen` on a free port; waits until it accepts.
    pub fn spawn(args: &[&str]) -> Self {
        let port = free_port();
        Self::spawn_on(format!("127.0.0.1:{port}").parse().expect("address"), args)
    }

    /// Spawns it listening on `addr` (to bring a killed proxy back on the same port). Unless
    /// `args` choose the store, it gets a `--data-dir` of its own (two processes never share
    /// one by accident); to restart on the same directory, pass `--data-dir` explicitly.
    pub fn spawn_on(addr: SocketAddr, args: &[&str]) -> Self {
        let data_dir = (!args_choose_the_store(args)).then(|| tempfile::tempdir().expect("a temp data dir"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_idemproxy"));
        command.args(args);
        if let Some(dir) = &data_dir {
            command.arg("--data-dir").arg(dir.path());
        }
        let child = command
            .args(["--listen", &addr.to_string(), "--log-filter", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the idemproxy binary starts");
        let mut process = Self { addr, child, data_dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(addr).is_ok() {
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("idemproxy exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        process.kill();
        panic!("idemproxy did not start listening on {addr}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The data directory it was given because its arguments chose no store.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.data_dir.as_ref().map(|d| d.path())
    }

    /// A field of its `/proc/<pid>/status` in KiB (`VmHWM`: peak resident set; `VmRSS`: current).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("idemproxy exited: {status}");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL: the process dies mid-whatever, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM`: peak resident set; `VmRSS`: current).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc status"))
}

/// Reads a raw socket until EOF (or a reset, which also closes the connection); `None` if it is
/// still open after `limit`.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(received)
}

/// Reads one HTTP/1.1 response framed by `Content-Length` from a raw socket (the connection stays
/// open); `None` if it did not arrive whole within `limit`.
pub async fn read_one_response(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    use tokio::io::AsyncReadExt;
    let read = async {
        loop {
            if let Some(end) = find(&received, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("the response has a content-length");
                if received.len() >= end + 4 + length {
                    return true;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    match tokio::time::timeout(limit, read).await {
        Ok(true) => Some(received),
        _ => None,
    }
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Starts a keyed `POST {}` to `url` in the background whose upstream answer takes `delay_ms`
/// (the "first request still running" of many tests).
pub fn spawn_slow_keyed_post(url: &str, key: &str, delay_ms: u64) -> JoinHandle<TestResponse> {
    let (url, key) = (url.to_owned(), key.to_owned());
    tokio::spawn(async move {
        let delay = delay_ms.to_string();
        TestClient::new()
            .send(
                Method::POST,
                &url,
                &[("idempotency-key", &key), ("x-upstream-delay-ms", &delay)],
                "{}",
            )
            .await
    })
}

/// A fresh [`TestUpstream`], a proxy to it built by `proxy` and a [`TestClient`]: where most
/// end-to-end tests start. `proxy` is `TestProxy::to`, `|up| store.proxy(up)` or
/// `|up| TestProxy::to(up).config("upstream.timeout = \"300ms\"")`.
pub async fn start_harness(proxy: impl FnOnce(&TestUpstream) -> ProxyBuilder) -> (TestUpstream, TestProxy, TestClient) {
    let upstream = TestUpstream::start().await;
    let proxy = proxy(&upstream).start().await;
    (upstream, proxy, TestClient::new())
}

/// `response` is a problem+json answer of `status` whose `type` ends with `#slug`.
pub fn assert_problem(response: &TestResponse, status: StatusCode, slug: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_problem_type(response, slug);
}

/// `response` is the proxy's own error of `status` and `slug`, written in `form` with the form's
/// members and a `Link` to its documentation ([`TestResponse::error_slug`]).
pub fn assert_error(response: &TestResponse, form: ErrorForm, status: StatusCode, slug: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.error_slug(form), slug, "{response:?}");
}

/// `response` is a problem+json answer whose `type` ends with `#slug` (whatever its status).
pub fn assert_problem_type(response: &TestResponse, slug: &str) {
    let problem_type = response.problem_type();
    assert!(
        problem_type.ends_with(&format!("#{slug}")),
        "type {problem_type}, not #{slug}: {response:?}"
    );
}

/// `replay` is marked as a replay and carries `original`'s body.
pub fn assert_replay_of(replay: &TestResponse, original: &TestResponse) {
    assert_eq!(replay.header("idempotent-replayed"), Some("true"), "{replay:?}");
    assert_eq!(replay.body, original.body);
}

/// How many of `responses` have `status`.
pub fn count_status(responses: &[TestResponse], status: StatusCode) -> usize {
    responses.iter().filter(|r| r.status == status).count()
}

/// `response` comes from an execution upstream: `201` and not marked as a replay.
pub fn assert_executed(response: &TestResponse) {
    assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
    assert_eq!(response.header("idempotent-replayed"), None, "{response:?}");
}

/// Whether a replica acknowledges a write to the server on `primary_port` within 100 ms (what a
/// `WAIT 1` counts; the probe write is deleted again).
pub fn replica_acknowledges_writes_to(primary_port: u16) -> bool {
    let Ok(primary) = redis::Client::open(format!("redis://127.0.0.1:{primary_port}")) else {
        return false;
    };
    let mut probe = redis::pipe();
    probe
        .set("idemproxy-test:sync", 1)
        .del("idemproxy-test:sync")
        .cmd("WAIT")
        .arg(1)
        .arg(100);
    let acknowledged = primary
        .get_connection_with_timeout(Duration::from_millis(500))
        .and_then(|mut c| probe.query::<((), i64, i64)>(&mut c));
    matches!(acknowledged, Ok((_, _, n)) if n >= 1)
}
