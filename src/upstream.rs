//! The pooled HTTP/1.1 client to the upstreams, and its errors.
//!
//! `retry_canceled_requests` stays on (hyper-util's default): hyper re-sends a request only when
//! it was *canceled before any byte of it was written*, i.e. the pooled connection it was queued
//! on closed first (the keep-alive race). Such a request never reached the upstream, so re-sending
//! it cannot execute a POST twice; turning it off would only turn that race into spurious 502s.
//! A request that was written, even partly, is never re-sent by the client.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::config::UpstreamSettings;

/// Why an upstream exchange failed, by whether the request may have reached the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Never sent: connection refused, DNS, connect timeout. Safe to run again.
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

/// The shared upstream client: one keep-alive pool for all routes.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, ProxyBody>,
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .retry_canceled_requests(true)
            .set_host(false)
            .build(connector);
        Self { client }
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
