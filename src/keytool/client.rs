//! A minimal HTTP/1.1 client for the admin listener: one connection, requests without a body,
//! answers read whole, every step bounded by [`TIMEOUT`].

use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::KeyToolError;

/// Longest wait for the connection, and for each answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read (a stored body is at most `max_response_bytes`, hex-encoded in JSON).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Where the admin listener is: `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    pub authority: Authority,
}

impl AdminUrl {
    /// Parses `http://host:port` or `host:port` (a path or query is refused: the tool builds them).
    pub fn parse(text: &str) -> Result<Self, KeyToolError> {
        let bad = |why: &str| KeyToolError::Usage(format!("--admin `{text}`: {why}"));
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| bad("not a URL like http://127.0.0.1:9090"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(bad("the admin listener speaks plain http://"));
        }
        if uri.path() != "/" || uri.query().is_some() {
            return Err(bad("give the listener only, without a path"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if authority.port_u16().is_none() {
            return Err(bad("no port"));
        }
        Ok(Self { authority })
    }

    /// The address of a listener as configured: an unspecified address (`0.0.0.0`, `[::]`) is
    /// reached on loopback.
    pub fn of_listener(addr: std::net::SocketAddr) -> Result<Self, KeyToolError> {
        let ip = match addr.ip() {
            ip if !ip.is_unspecified() => ip,
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        let authority = std::net::SocketAddr::new(ip, addr.port()).to_string();
        Self::parse(&authority)
    }
}

impl std::fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
}

/// One HTTP/1.1 connection to the admin listener.
pub struct AdminClient {
    url: AdminUrl,
    token: Option<String>,
    sender: SendRequest<Empty<Bytes>>,
}

impl AdminClient {
    /// Connects to `url`; `token` is sent as `Authorization: Bearer`.
    pub async fn connect(url: AdminUrl, token: Option<String>) -> Result<Self, KeyToolError> {
        let unreachable = |why: String| KeyToolError::Connect {
            admin: url.to_string(),
            why,
        };
        let host = url.authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = url.authority.port_u16().unwrap_or(80);
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| unreachable(format!("no connection within {TIMEOUT:?}")))?
            .map_err(|err| unreachable(err.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { url, token, sender })
    }

    /// `method path_and_query`, answered whole.
    pub async fn send(&mut self, method: Method, path_and_query: &str) -> Result<Answer, KeyToolError> {
        let failed = |why: String| KeyToolError::Connect {
            admin: self.url.to_string(),
            why,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, self.url.authority.as_str())
            .header(ACCEPT, "application/json, application/problem+json")
            .header(USER_AGENT, concat!("idemproxy-key/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|err| KeyToolError::Usage(format!("cannot build the request: {err}")))?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| KeyToolError::Usage("the admin token is not a valid header value".into()))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body.collect().await?.to_bytes()))
        };
        let (parts, body) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| failed(format!("no answer within {TIMEOUT:?}")))?
            .map_err(|err| failed(err.to_string()))?;
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Answer {
            status: parts.status,
            content_type,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        for (text, expected) in [
            ("http://127.0.0.1:9090", Some("127.0.0.1:9090")),
            ("127.0.0.1:9090", Some("127.0.0.1:9090")),
            ("http://[::1]:9090/", Some("[::1]:9090")),
            ("localhost:9090", Some("localhost:9090")),
            ("https://127.0.0.1:9090", None),
            ("http://127.0.0.1:9090/keys", None),
            ("http://127.0.0.1", None),
            ("not a url", None),
        ] {
            let parsed = AdminUrl::parse(text).ok().map(|u| u.authority.to_string());
            assert_eq!(parsed.as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn unspecified_listeners_are_reached_on_loopback() {
        let url = AdminUrl::of_listener("0.0.0.0:9090".parse().expect("addr")).expect("url");
        assert_eq!(url.to_string(), "http://127.0.0.1:9090");
        let url = AdminUrl::of_listener("[::]:9090".parse().expect("addr")).expect("url");
        assert_eq!(url.to_string(), "http://[::1]:9090");
        let url = AdminUrl::of_listener("10.1.2.3:9090".parse().expect("addr")).expect("url");
        assert_eq!(url.to_string(), "http://10.1.2.3:9090");
    }
}
