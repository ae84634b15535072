//! Errors of the request path, and the one place that turns them into responses.
//!
//! Every response the proxy makes itself is an RFC 9457 problem (`application/problem+json`)
//! with a stable `type`, a `title`, the `status` and a `detail`, plus a
//! `Link: <…>; rel="describedby"` to the section of `docs/errors.md` that explains it.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::idempotency::key::KeyError;
use crate::idempotency::record::UnknownCause;
use crate::store::StoreError;
use crate::telemetry::Outcome;
use crate::upstream::UpstreamError;

/// Where the problem types are documented; each `type` is this plus `#slug`.
macro_rules! docs_url {
    () => {
        "https://github.com/idemproxy/idemproxy/blob/main/docs/errors.md"
    };
}

/// Everything that can end a request with a response the proxy makes itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    InvalidKey(#[from] KeyError),
    #[error("this endpoint requires an Idempotency-Key header")]
    MissingKey,
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
    #[error("the request could not be proxied: {0}")]
    BadRequest(&'static str),
    #[error("no route serves this path")]
    NoRoute,
    #[error("a request with this Idempotency-Key is still being processed; retry later")]
    Conflict { retry_after: Duration },
    #[error("this Idempotency-Key was already used with a different request")]
    Mismatch,
    #[error("{}", unknown_detail(*.0))]
    OutcomeUnknown(UnknownCause),
    #[error("the first response to this Idempotency-Key was too large to store, so it cannot be replayed")]
    NotReplayable,
    #[error("the idempotency store is unavailable: {0}")]
    StoreUnavailable(#[from] StoreError),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
}

fn unknown_detail(cause: UnknownCause) -> &'static str {
    match cause {
        UnknownCause::Timeout => "the request was sent upstream but no complete response came back in time; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
        UnknownCause::UpstreamFailed => "the request was sent upstream but the connection failed before a complete response; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
        UnknownCause::LeaseLapsed => "the proxy executing this request stopped before it finished; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
    }
}

/// The fixed parts of one problem type.
struct ProblemType {
    status: StatusCode,
    /// `docs_url#slug`
    type_uri: &'static str,
    title: &'static str,
    /// `<type_uri>; rel="describedby"`, prebuilt.
    link: &'static str,
}

macro_rules! problem_type {
    ($status:expr, $slug:literal, $title:literal) => {
        ProblemType {
            status: $status,
            type_uri: concat!(docs_url!(), "#", $slug),
            title: $title,
            link: concat!("<", docs_url!(), "#", $slug, ">; rel=\"describedby\""),
        }
    };
}

impl ProxyError {
    fn problem_type(&self) -> ProblemType {
        match self {
            ProxyError::InvalidKey(_) => {
                problem_type!(StatusCode::BAD_REQUEST, "invalid-key", "Invalid Idempotency-Key")
            }
            ProxyError::MissingKey => problem_type!(StatusCode::BAD_REQUEST, "missing-key", "Idempotency-Key required"),
            ProxyError::BodyTooLarge { .. } => {
                problem_type!(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "Request body too large"
                )
            }
            ProxyError::ClientBody(_) | ProxyError::Upstream(UpstreamError::ClientBody(_)) => {
                problem_type!(StatusCode::BAD_REQUEST, "bad-request", "Bad request")
            }
            ProxyError::BadRequest(_) => problem_type!(StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ProxyError::NoRoute => problem_type!(StatusCode::NOT_FOUND, "no-route", "No route"),
            ProxyError::Conflict { .. } => {
                problem_type!(StatusCode::CONFLICT, "request-in-progress", "Request in progress")
            }
            ProxyError::Mismatch => problem_type!(
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency-Key reused with a different request"
            ),
            ProxyError::OutcomeUnknown(UnknownCause::Timeout) => {
                problem_type!(StatusCode::GATEWAY_TIMEOUT, "outcome-unknown", "Outcome unknown")
            }
            ProxyError::OutcomeUnknown(_) => {
                problem_type!(StatusCode::BAD_GATEWAY, "outcome-unknown", "Outcome unknown")
            }
            ProxyError::NotReplayable => problem_type!(
                StatusCode::BAD_GATEWAY,
                "response-not-replayable",
                "Response cannot be replayed"
            ),
            ProxyError::StoreUnavailable(_) => problem_type!(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable"
            ),
            ProxyError::Upstream(UpstreamError::Connect(_)) => {
                problem_type!(StatusCode::BAD_GATEWAY, "upstream-unreachable", "Upstream unreachable")
            }
            ProxyError::Upstream(UpstreamError::Timeout(_)) => {
                problem_type!(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout", "Upstream timeout")
            }
            ProxyError::Upstream(UpstreamError::Failed(_)) => {
                problem_type!(StatusCode::BAD_GATEWAY, "upstream-error", "Upstream error")
            }
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.problem_type().status
    }

    /// The metrics/log outcome this error counts as.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::InvalidKey(_) | ProxyError::MissingKey => Outcome::InvalidKey,
            ProxyError::BodyTooLarge { .. } => Outcome::TooLarge,
            ProxyError::ClientBody(_)
            | ProxyError::Upstream(UpstreamError::ClientBody(_))
            | ProxyError::BadRequest(_)
            | ProxyError::NoRoute => Outcome::BadRequest,
            ProxyError::Conflict { .. } => Outcome::Conflict,
            ProxyError::Mismatch => Outcome::Mismatch,
            ProxyError::OutcomeUnknown(_) => Outcome::OutcomeUnknown,
            ProxyError::NotReplayable => Outcome::Replayed,
            ProxyError::StoreUnavailable(_) => Outcome::StoreUnavailable,
            ProxyError::Upstream(_) => Outcome::UpstreamError,
        }
    }

    /// `Retry-After` to send with the answer, if any.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::Conflict { retry_after } => Some(*retry_after),
            ProxyError::StoreUnavailable(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The problem+json response for this error: the only place error responses are built.
    pub fn into_response(self) -> Response<ProxyBody> {
        let problem = self.problem_type();
        let body = serde_json::json!({
            "type": problem.type_uri,
            "title": problem.title,
            "status": problem.status.as_u16(),
            "detail": self.to_string(),
        });
        let body = serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default();
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = problem.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert(LINK, HeaderValue::from_static(problem.link));
        if let Some(after) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn conflict_is_problem_json_with_retry_after_and_link() {
        let response = ProxyError::Conflict {
            retry_after: Duration::from_secs(1),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert!(response.headers()[LINK]
            .to_str()
            .expect("ascii")
            .ends_with("errors.md#request-in-progress>; rel=\"describedby\""));
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["status"], 409);
        assert!(json["type"].as_str().expect("type").ends_with("#request-in-progress"));
        assert_eq!(json["title"], "Request in progress");
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::Mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            ProxyError::BodyTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ProxyError::OutcomeUnknown(UnknownCause::Timeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ProxyError::OutcomeUnknown(UnknownCause::LeaseLapsed).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(ProxyError::from(KeyError::Empty).status(), StatusCode::BAD_REQUEST);
        // The client's streamed body failing is the client's error, not the upstream's.
        let client_body = ProxyError::from(UpstreamError::ClientBody("invalid chunk size".into()));
        assert_eq!(client_body.status(), StatusCode::BAD_REQUEST);
        assert_eq!(client_body.outcome(), Outcome::BadRequest);
        let failed = ProxyError::from(UpstreamError::Failed("reset".into()));
        assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(failed.outcome(), Outcome::UpstreamError);
    }
}
