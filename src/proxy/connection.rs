//! What a handler knows of the client connection a request came on ([`ConnectionInfo`]),
//! shared by the request path's modules: its own module, so that they need nothing from
//! `proxy/mod.rs`, which calls into them.

use std::net::SocketAddr;

use http::HeaderValue;

use crate::upstream::{Affinity, Upstream};

/// What a handler knows of the connection a request came on, computed once per connection.
pub struct ConnectionInfo {
    /// The peer's IP, ready for `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: HeaderValue,
    /// The upstream connection this client connection used last, kept for its next request.
    pub affinity: Affinity,
}

impl ConnectionInfo {
    pub fn new(peer: SocketAddr, tls: bool, upstream: &Upstream) -> Self {
        let ip = peer.ip().to_canonical().to_string();
        Self {
            client_ip: HeaderValue::from_str(&ip).unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            affinity: upstream.affinity(),
        }
    }
}
