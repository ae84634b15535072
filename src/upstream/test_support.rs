//! A real local HTTP/1.1 upstream and real client connections to it, for this module's tests.
//!
//! The upstream answers every request `200` with an empty body and an `x-peer` field naming the
//! client port the request came from, so a test can tell which connection a pooled `Sender` is.
//! A request to `/hold` is answered only once the test calls [`TestServer::release`], which
//! keeps its connection busy meanwhile.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::connection::Sender;
use crate::body::ProxyBody;

pub(super) struct TestServer {
    pub addr: SocketAddr,
    /// One permit per `/hold` request allowed to be answered.
    answers: Arc<Semaphore>,
}

impl TestServer {
    /// Lets one `/hold` request be answered.
    pub fn release(&self) {
        self.answers.add_permits(1);
    }
}

/// Starts the upstream on `127.0.0.1`, serving until the test's runtime ends.
pub(super) async fn serve() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let answers = Arc::new(Semaphore::new(0));
    let server = TestServer {
        addr,
        answers: answers.clone(),
    };
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let answers = answers.clone();
            let service =
                hyper::service::service_fn(move |request: Request<Incoming>| answer(request, peer, answers.clone()));
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    server
}

async fn answer(
    request: Request<Incoming>,
    peer: SocketAddr,
    answers: Arc<Semaphore>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    if request.uri().path() == "/hold" {
        answers.acquire().await.expect("never closed").forget();
    }
    let response = Response::builder()
        .header("x-peer", peer.port())
        .body(Empty::new())
        .expect("a valid response");
    Ok(response)
}

/// An open client connection to the test upstream.
pub(super) struct TestConnection {
    pub sender: Sender,
    /// Its local port: what the upstream's `x-peer` names.
    pub port: u16,
    /// The task driving it; see [`close`].
    pub task: JoinHandle<()>,
}

/// A new connection to `addr`, ready for a request.
pub(super) async fn open(addr: SocketAddr) -> TestConnection {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let port = stream.local_addr().expect("local address").port();
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.ready().await.expect("a new connection is ready");
    TestConnection { sender, port, task }
}

/// Closes a connection as if the upstream had (the task driving it ends): its `Sender`s report
/// `is_closed()` from now on.
pub(super) async fn close(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

/// A request for `path`, without a body.
pub(super) fn get(path: &str) -> Request<ProxyBody> {
    Request::get(path).body(ProxyBody::Empty).expect("a valid request")
}

/// The local port of the connection `sender` sends over (asked of the upstream), the
/// connection idle again afterwards.
/// Asserts that `taken` is a connection, and the one whose client port is `port`.
pub(super) async fn assert_is(taken: Option<Sender>, port: u16, what: &str) {
    let mut sender = taken.unwrap_or_else(|| panic!("expected {what}, got none"));
    assert_eq!(port_of(&mut sender).await, port, "{what}");
}

pub(super) async fn port_of(sender: &mut Sender) -> u16 {
    let response = sender.send_request(get("/")).await.expect("an answer");
    let port = response.headers()["x-peer"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a port");
    response.into_body().collect().await.expect("the body");
    sender.ready().await.expect("idle again");
    port
}

/// Starts a `/hold` request on `sender`, which stays busy until the server releases it.
pub(super) fn hold(sender: &mut Sender) -> impl Future<Output = ()> + 'static {
    let response = sender.send_request(get("/hold"));
    async move {
        let response = response.await.expect("an answer");
        response.into_body().collect().await.expect("the body");
    }
}

/// What `check` returns once it returns something, looking again every few milliseconds (the
/// condition waits for another task; 5 s is only a bound for a broken test).
pub(super) async fn eventually<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within 5s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
