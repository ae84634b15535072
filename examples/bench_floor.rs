//! The floor of the load benchmark (`benches/load.sh`): the cheapest forwarder hyper allows, so
//! the report can show what the HTTP stack alone costs per request next to nginx and idemproxy.
//! It does none of idemproxy's own work: no routing, no header rewriting (hop-by-hop,
//! `X-Forwarded-*`, `Via`, `Host`), no timeouts, no metrics or logs, no pool (each client
//! connection opens its own upstream connection and keeps it). Not a proxy to deploy.
//!
//! Run: `cargo run --release --example bench_floor -- 127.0.0.1:8081 127.0.0.1:3000`
//! (listen address, upstream address). One current-thread runtime, as idemproxy's on one core.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// The allocator idemproxy's binary uses, so the comparison is of the work, not the allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = Either<Incoming, Full<Bytes>>;

fn address(position: usize, default: &str) -> SocketAddr {
    let text = std::env::args().nth(position).unwrap_or_else(|| default.to_owned());
    match text.parse() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("bench_floor: bad address `{text}`: {err}");
            std::process::exit(2);
        }
    }
}

/// Forwards one request over the client connection's upstream connection; 502 if it fails.
async fn forward(
    upstream: Arc<Mutex<SendRequest<Incoming>>>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut sender = upstream.lock().await;
    match sender.send_request(request).await {
        Ok(response) => Ok(response.map(Either::Left)),
        Err(err) => {
            eprintln!("bench_floor: upstream exchange failed: {err}");
            let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(b"upstream failed\n"))));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}

/// Serves one client connection with its own upstream connection.
async fn serve(client: TcpStream, upstream_addr: SocketAddr) {
    let upstream = match TcpStream::connect(upstream_addr).await {
        Ok(stream) => stream,
        Err(err) => {
            eprintln!("bench_floor: cannot connect to {upstream_addr}: {err}");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(pair) => pair,
        Err(err) => {
            eprintln!("bench_floor: upstream handshake: {err}");
            return;
        }
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |request| forward(sender.clone(), request));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
}

fn main() {
    let listen = address(1, "127.0.0.1:8081");
    let upstream = address(2, "127.0.0.1:3000");
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench_floor: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("bench_floor: cannot listen on {listen}: {err}");
                std::process::exit(1);
            }
        };
        eprintln!("bench_floor: listening on {listen}, forwarding to {upstream}");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, upstream));
                }
                Err(err) => {
                    eprintln!("bench_floor: accept: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    });
}
