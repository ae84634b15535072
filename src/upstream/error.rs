//! Why an upstream exchange failed, sorted by whether the request may have reached the upstream:
//! what decides whether a guarded request's key is released (never sent, a retry may execute)
//! or its outcome recorded as unknown (RFC 9110 §9.2.2: a non-idempotent request that may have
//! been applied is not sent again).
//!
//! Each variant's `Display` is one short sentence; what actually went wrong is its
//! [`source`](std::error::Error::source) chain, which [`Chain`](crate::error::chain::Chain) spells out for logs.

use std::time::Duration;

pub use crate::error::chain::BoxError;

/// Why an upstream exchange failed, by whether the request may have reached the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Never sent: connection refused, DNS, connect timeout, TLS handshake. Safe to run again.
    #[error("could not connect to the upstream")]
    Connect(#[source] BoxError),
    /// Possibly sent: no complete response within the timeout.
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// Sent (or possibly sent): the exchange failed before a complete response (reset,
    /// truncation, including while reading the response body).
    #[error("the upstream connection failed")]
    Failed(#[source] hyper::Error),
    /// The client's request body failed while it was streamed upstream (malformed chunked
    /// coding, a client gone mid-upload): the request's fault, answered `400`. The upstream may
    /// have received part of it, never a complete request: hyper aborts it without its end.
    #[error("the request body could not be read")]
    ClientBody(#[source] hyper::Error),
}

impl UpstreamError {
    /// The failure of an exchange whose request was written, even partly: the client's body
    /// ([`ClientBody`](Self::ClientBody)) or the exchange itself ([`Failed`](Self::Failed)).
    pub(super) fn written(err: hyper::Error) -> Self {
        if is_client_body_error(&err) {
            UpstreamError::ClientBody(err)
        } else {
            UpstreamError::Failed(err)
        }
    }
}

/// Whether the exchange failed on the request body the proxy was streaming: hyper reports an
/// error from the outgoing body as a user error caused by it, and the only body that can fail is
/// the client's (a streamed `Incoming`, whose errors are hyper's own, or a guarded
/// [`Upload`](crate::upload::Upload) cut short).
fn is_client_body_error(err: &hyper::Error) -> bool {
    use std::error::Error as _;
    err.is_user()
        && err
            .source()
            .is_some_and(|cause| cause.is::<hyper::Error>() || cause.is::<crate::upload::Cut>())
}

/// A real `hyper::Error` (hyper has no public constructor): the parse error of a response that
/// is not HTTP.
#[cfg(test)]
pub(crate) async fn hyper_error() -> hyper::Error {
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt as _;

    let (client, mut server) = tokio::io::duplex(4096);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .expect("handshake over a duplex pipe");
    tokio::spawn(connection);
    server.write_all(b"not HTTP\r\n\r\n").await.expect("write");
    let request = http::Request::new(crate::body::ProxyBody::Empty);
    match sender.send_request(request).await {
        Ok(response) => panic!("a response to a non-HTTP answer: {response:?}"),
        Err(err) => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::chain::Chain;

    #[test]
    fn display_is_one_sentence_and_the_chain_names_the_cause() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = UpstreamError::Connect(refused.into());
        assert_eq!(err.to_string(), "could not connect to the upstream");
        assert_eq!(
            Chain(&err).to_string(),
            "could not connect to the upstream: connection refused"
        );
    }

    #[test]
    fn a_timeout_has_no_cause() {
        let err = UpstreamError::Timeout(Duration::from_millis(300));
        assert_eq!(Chain(&err).to_string(), "the upstream did not answer within 300ms");
    }

    #[tokio::test]
    async fn a_written_exchange_that_fails_on_its_own_is_failed_not_client_body() {
        let err = UpstreamError::written(hyper_error().await);
        assert!(matches!(err, UpstreamError::Failed(_)), "{err:?}");
        let chain = Chain(&err).to_string();
        assert!(chain.starts_with("the upstream connection failed: "), "{chain}");
    }
}
