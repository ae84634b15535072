//! The errors of each layer that reach a client, and the one place that turns them into
//! responses (linkerd2-proxy's error rescue).
//!
//! Every response the proxy makes itself is an RFC 9457 problem (`application/problem+json`)
//! with a stable `type`, a `title`, the `status` and a `detail`, plus a
//! `Link: <…>; rel="describedby"` to the section of `docs/errors.md` that explains it
//! (docs/behaviour.md §8); on a route with `error_format = "stripe"` it is Stripe's error
//! object instead (`stripe`, docs/behaviour.md §16). Request-path errors ([`ProxyError`]) and
//! admin errors (`crate::admin::AdminError`) both describe themselves through [`Problem`];
//! [`problem_response`] alone builds the response, in the route's [`ErrorStyle`]. A problem's
//! `detail` is written for the client: causes from inside the proxy (OS errors, Redis replies)
//! go to the log, never to it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

pub mod chain;
pub mod stripe;

pub use self::chain::{BoxError, Chain};
pub use self::stripe::StripeType;

use crate::body::ProxyBody;
use crate::config::{ConfigError, ErrorFormat, Policy};
use crate::headers::set_retry_hint;
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
pub(crate) use docs_url;

/// Who caused a failure (as Pingora's `ErrorSource`): what logs and alerts need to tell a
/// client's mistake from an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The request itself: a bad key, a body too large, a reused key.
    Client,
    /// The upstream, or the exchange with it.
    Upstream,
    /// The idempotency store.
    Store,
    /// The proxy itself (a bug).
    Internal,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Store => "store",
            ErrorSource::Internal => "internal",
        }
    }
}

/// Everything that can end a proxied request with a response the proxy makes itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    #[error("this endpoint requires an Idempotency-Key header")]
    MissingKey,
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body could not be read")]
    ClientBody(#[source] BoxError),
    #[error("the request body was not received within {0:?}")]
    ClientBodyTimeout(Duration),
    #[error("the request could not be proxied: {0}")]
    BadRequest(&'static str),
    /// A `Content-Digest` field that cannot be used (docs/behaviour.md §15.3).
    #[error("the Content-Digest field is invalid: {0}")]
    BadContentDigest(&'static str),
    /// A body whose SHA-256 is not its `Content-Digest` (docs/behaviour.md §15.3).
    #[error("the request body does not match its Content-Digest (sha-256); the upstream did not get the complete request and the key is free")]
    DigestMismatch,
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
    #[error("the idempotency store is unavailable")]
    StoreUnavailable(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The execution of a guarded request failed inside the proxy (it panicked): a bug. Its
    /// key was released, or marked per `unknown_outcome` if the request may have been sent.
    #[error("the request failed inside the proxy")]
    ExecutionFailed(#[source] tokio::task::JoinError),
}

fn unknown_detail(cause: UnknownCause) -> &'static str {
    match cause {
        UnknownCause::Timeout => "the request was sent upstream but no complete response came back in time; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
        UnknownCause::UpstreamFailed => "the request was sent upstream but the connection failed before a complete response; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
        UnknownCause::LeaseLapsed => "the proxy executing this request stopped before it finished; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
        UnknownCause::Interrupted => "the proxy's execution of this request was interrupted after it may have been sent upstream; it may or may not have taken effect, so it will not be sent again: reconcile with the service before retrying with a new key",
        UnknownCause::UpstreamStatus => "the upstream answered with a status that does not tell whether the request took effect (the route's unknown_statuses); it will not be sent again: reconcile with the service before retrying with a new key",
    }
}

/// The fixed parts of one problem type.
#[derive(Debug, Clone, Copy)]
pub struct ProblemType {
    pub status: StatusCode,
    /// Its anchor in `docs/errors.md`; the `code` of the Stripe form.
    pub slug: &'static str,
    /// `docs_url#slug`
    pub type_uri: &'static str,
    pub title: &'static str,
    /// `<type_uri>; rel="describedby"`, prebuilt.
    pub link: &'static str,
}

/// A [`ProblemType`] documented under `slug` in `docs/errors.md`.
macro_rules! problem_type {
    ($status:expr, $slug:literal, $title:literal) => {
        $crate::error::ProblemType {
            status: $status,
            slug: $slug,
            type_uri: concat!($crate::error::docs_url!(), "#", $slug),
            title: $title,
            link: concat!("<", $crate::error::docs_url!(), "#", $slug, ">; rel=\"describedby\""),
        }
    };
}
pub(crate) use problem_type;

/// An error that is answered with an RFC 9457 problem.
pub trait Problem: std::error::Error {
    /// Status, type, title and link.
    fn problem_type(&self) -> ProblemType;

    /// The `detail` member: what the client may read (never an internal cause).
    fn detail(&self) -> Cow<'static, str> {
        Cow::Owned(self.to_string())
    }

    /// An extension member (RFC 9457 §3.2), if any.
    fn extension(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }

    /// Fields the response carries besides the problem's own (`Retry-After`, …).
    fn add_headers(&self, _headers: &mut HeaderMap) {}

    /// Its `type` in Stripe's dialect (docs/behaviour.md §16): by default `api_error` for a
    /// 5xx, `invalid_request_error` otherwise.
    fn stripe_type(&self) -> StripeType {
        if self.problem_type().status.is_server_error() {
            StripeType::Api
        } else {
            StripeType::InvalidRequest
        }
    }

    /// Whether a retry with the same key can get another answer, for the route's retry hint
    /// header (docs/behaviour.md §16); `None`: no hint.
    fn retry_hint(&self) -> Option<bool> {
        None
    }
}

/// How a route writes the errors the proxy makes (docs/behaviour.md §8, §16): its
/// `error_format` and `retry_hint_header`.
#[derive(Debug, Clone, Copy)]
pub struct ErrorStyle<'a> {
    pub format: ErrorFormat,
    pub retry_hint: Option<&'a HeaderName>,
}

impl ErrorStyle<'static> {
    /// Problem+json without a retry hint: before a route is known, and on the admin listener.
    pub const PLAIN: Self = ErrorStyle {
        format: ErrorFormat::Problem,
        retry_hint: None,
    };
}

impl<'a> ErrorStyle<'a> {
    /// The style of the route with `policy`.
    pub fn of(policy: &'a Policy) -> Self {
        ErrorStyle {
            format: policy.error_format,
            retry_hint: policy.retry_hint_header.as_ref(),
        }
    }

    /// The status `problem` is answered with in this style.
    pub fn status(&self, problem: &dyn Problem) -> StatusCode {
        let status = problem.problem_type().status;
        match self.format {
            ErrorFormat::Problem => status,
            ErrorFormat::Stripe => problem.stripe_type().status(status),
        }
    }
}

/// The response for `problem` in `style`: the only place error responses are built. Either
/// form carries the `Link` to the documentation and the problem's own fields (`Retry-After`).
pub fn problem_response(problem: &dyn Problem, style: ErrorStyle<'_>) -> Response<ProxyBody> {
    let kind = problem.problem_type();
    let (content_type, body) = match style.format {
        ErrorFormat::Problem => ("application/problem+json", problem_body(problem, &kind)),
        ErrorFormat::Stripe => (
            "application/json",
            stripe::body(
                problem.stripe_type(),
                kind.slug,
                &problem.detail(),
                kind.type_uri,
                problem.extension(),
            ),
        ),
    };
    let body = serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = style.status(problem);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(LINK, HeaderValue::from_static(kind.link));
    problem.add_headers(headers);
    if let Some(retry) = problem.retry_hint() {
        set_retry_hint(headers, style.retry_hint, retry);
    }
    response
}

/// The RFC 9457 object.
fn problem_body(problem: &dyn Problem, kind: &ProblemType) -> serde_json::Value {
    let mut body = serde_json::json!({
        "type": kind.type_uri,
        "title": kind.title,
        "status": kind.status.as_u16(),
        "detail": problem.detail(),
    });
    if let Some((name, value)) = problem.extension() {
        body[name] = value;
    }
    body
}

/// `Retry-After` (RFC 9110 §10.2.3) in whole seconds, at least one.
pub fn insert_retry_after(headers: &mut HeaderMap, after: Duration) {
    headers.insert(RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
}

/// How long a client waits before retrying when the store is unavailable.
pub const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

impl Problem for ProxyError {
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
            ProxyError::ClientBody(_)
            | ProxyError::ClientBodyTimeout(_)
            | ProxyError::BadRequest(_)
            | ProxyError::Upstream(UpstreamError::ClientBody(_)) => {
                problem_type!(StatusCode::BAD_REQUEST, "bad-request", "Bad request")
            }
            ProxyError::BadContentDigest(_) => {
                problem_type!(StatusCode::BAD_REQUEST, "bad-content-digest", "Invalid Content-Digest")
            }
            ProxyError::DigestMismatch => problem_type!(
                StatusCode::BAD_REQUEST,
                "digest-mismatch",
                "Body does not match its Content-Digest"
            ),
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
            ProxyError::ExecutionFailed(_) => {
                problem_type!(StatusCode::INTERNAL_SERVER_ERROR, "internal-error", "Internal error")
            }
        }
    }

    fn detail(&self) -> Cow<'static, str> {
        match self {
            // The store's own error (an OS error, a Redis reply) is logged, not shown.
            ProxyError::StoreUnavailable(StoreError::Full(_)) => Cow::Borrowed(
                "the idempotency store is full; nothing was forwarded: retry later",
            ),
            ProxyError::StoreUnavailable(StoreError::Corrupt(_)) => Cow::Borrowed(
                "the record of this Idempotency-Key cannot be read; it may have been executed, so it is not forwarded: contact the operator",
            ),
            ProxyError::StoreUnavailable(_) => Cow::Borrowed(
                "the idempotency store is unavailable; nothing was forwarded: retry later",
            ),
            other => Cow::Owned(other.to_string()),
        }
    }

    fn add_headers(&self, headers: &mut HeaderMap) {
        match self {
            ProxyError::Conflict { retry_after } => insert_retry_after(headers, *retry_after),
            ProxyError::StoreUnavailable(_) => insert_retry_after(headers, STORE_RETRY_AFTER),
            _ => {}
        }
    }

    /// A key reused with another request is Stripe's `idempotency_error`; the client's other
    /// mistakes are `invalid_request_error`; failures of the store, the upstream or the proxy
    /// are `api_error`.
    fn stripe_type(&self) -> StripeType {
        match (self, self.source_of_error()) {
            (ProxyError::Mismatch, _) => StripeType::Idempotency,
            (_, ErrorSource::Client) => StripeType::InvalidRequest,
            (_, ErrorSource::Upstream | ErrorSource::Store | ErrorSource::Internal) => StripeType::Api,
        }
    }

    /// `true` where a retry with the same key will be answered differently once the first
    /// request ends or the store is back (409, 503); `false` where every retry gets this very
    /// answer (outcome unknown, not replayable).
    fn retry_hint(&self) -> Option<bool> {
        match self {
            ProxyError::Conflict { .. } | ProxyError::StoreUnavailable(_) => Some(true),
            ProxyError::OutcomeUnknown(_) | ProxyError::NotReplayable => Some(false),
            _ => None,
        }
    }
}

impl ProxyError {
    /// The HTTP status of its problem (in Stripe's form a reused key is a `400`:
    /// [`ErrorStyle::status`]).
    pub fn status(&self) -> StatusCode {
        self.problem_type().status
    }

    /// Who caused it.
    pub fn source_of_error(&self) -> ErrorSource {
        match self {
            ProxyError::InvalidKey(_)
            | ProxyError::MissingKey
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::ClientBodyTimeout(_)
            | ProxyError::BadRequest(_)
            | ProxyError::BadContentDigest(_)
            | ProxyError::DigestMismatch
            | ProxyError::NoRoute
            | ProxyError::Conflict { .. }
            | ProxyError::Mismatch
            | ProxyError::Upstream(UpstreamError::ClientBody(_)) => ErrorSource::Client,
            ProxyError::OutcomeUnknown(_) | ProxyError::NotReplayable | ProxyError::Upstream(_) => {
                ErrorSource::Upstream
            }
            ProxyError::StoreUnavailable(_) => ErrorSource::Store,
            ProxyError::ExecutionFailed(_) => ErrorSource::Internal,
        }
    }

    /// The metrics/log outcome this error counts as.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::InvalidKey(_) | ProxyError::MissingKey => Outcome::InvalidKey,
            ProxyError::BodyTooLarge { .. } => Outcome::TooLarge,
            ProxyError::ClientBody(_)
            | ProxyError::ClientBodyTimeout(_)
            | ProxyError::Upstream(UpstreamError::ClientBody(_))
            | ProxyError::BadRequest(_)
            | ProxyError::BadContentDigest(_)
            | ProxyError::DigestMismatch
            | ProxyError::NoRoute => Outcome::BadRequest,
            ProxyError::Conflict { .. } => Outcome::Conflict,
            ProxyError::Mismatch => Outcome::Mismatch,
            ProxyError::OutcomeUnknown(_) => Outcome::OutcomeUnknown,
            ProxyError::NotReplayable => Outcome::NotReplayable,
            ProxyError::StoreUnavailable(_) => Outcome::StoreUnavailable,
            ProxyError::Upstream(_) => Outcome::UpstreamError,
            ProxyError::ExecutionFailed(_) => Outcome::Internal,
        }
    }

    /// Whether the operator should hear of it (logged at warn or error with its cause).
    pub fn is_operational(&self) -> bool {
        !matches!(self.source_of_error(), ErrorSource::Client) && !matches!(self, ProxyError::NotReplayable)
    }

    /// The response for this error, in `style`.
    pub fn into_response(self, style: ErrorStyle<'_>) -> Response<ProxyBody> {
        problem_response(&self, style)
    }
}

/// A failure to start or run the server (exit code 2 for configuration, 1 otherwise).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot set up the store")]
    Store(#[from] StoreError),
    /// A file named by the configuration (TLS certificate or key, CA bundle) is unusable.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// `listener` is the setting that names the address (`listen`, `admin_listen`).
    #[error("cannot listen on {addr} (`{listener}`)")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// Whether the configuration is at fault (exit code 2) rather than the environment (1).
    pub fn is_config(&self) -> bool {
        matches!(self, ServeError::Config(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn problem_json(response: Response<ProxyBody>) -> serde_json::Value {
        let body = response.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&body).expect("json")
    }

    #[tokio::test]
    async fn conflict_is_problem_json_with_retry_after_and_link() {
        let response = ProxyError::Conflict {
            retry_after: Duration::from_secs(1),
        }
        .into_response(ErrorStyle::PLAIN);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert!(response.headers()[LINK]
            .to_str()
            .expect("ascii")
            .ends_with("errors.md#request-in-progress>; rel=\"describedby\""));
        let json = problem_json(response).await;
        assert_eq!(json["status"], 409);
        assert!(json["type"].as_str().expect("type").ends_with("#request-in-progress"));
        assert_eq!(json["title"], "Request in progress");
    }

    #[tokio::test]
    async fn store_unavailable_keeps_the_cause_out_of_the_answer() {
        let cause = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let err = ProxyError::StoreUnavailable(StoreError::unreachable(cause));
        assert_eq!(err.source_of_error(), ErrorSource::Store);
        assert!(
            Chain(&err).to_string().contains("os error 111"),
            "the log has the cause"
        );
        let response = err.into_response(ErrorStyle::PLAIN);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let json = problem_json(response).await;
        let detail = json["detail"].as_str().expect("detail");
        assert!(!detail.contains("os error"), "{detail}");
        assert!(detail.contains("nothing was forwarded"), "{detail}");
    }

    #[tokio::test]
    async fn a_failed_execution_is_an_internal_500() {
        let join = tokio::spawn(async { panic!("boom") }).await.expect_err("panicked");
        let err = ProxyError::ExecutionFailed(join);
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.outcome(), Outcome::Internal);
        assert_eq!(err.source_of_error(), ErrorSource::Internal);
        let json = problem_json(err.into_response(ErrorStyle::PLAIN)).await;
        assert!(json["type"].as_str().expect("type").ends_with("#internal-error"));
        assert!(!json["detail"].as_str().expect("detail").contains("boom"));
    }

    const HINT: HeaderName = HeaderName::from_static("stripe-should-retry");

    #[tokio::test]
    async fn stripe_form_has_the_type_code_message_and_doc_url() {
        let cases: Vec<(ProxyError, u16, &str, &str)> = vec![
            (ProxyError::Mismatch, 400, "idempotency_error", "key-reused"),
            (
                ProxyError::from(KeyError::Empty),
                400,
                "invalid_request_error",
                "invalid-key",
            ),
            (ProxyError::MissingKey, 400, "invalid_request_error", "missing-key"),
            (
                ProxyError::BodyTooLarge { limit: 1 },
                413,
                "invalid_request_error",
                "body-too-large",
            ),
            (
                ProxyError::Conflict {
                    retry_after: Duration::from_secs(1),
                },
                409,
                "invalid_request_error",
                "request-in-progress",
            ),
            (
                ProxyError::OutcomeUnknown(UnknownCause::Timeout),
                504,
                "api_error",
                "outcome-unknown",
            ),
            (ProxyError::NotReplayable, 502, "api_error", "response-not-replayable"),
            (
                ProxyError::StoreUnavailable(StoreError::unreachable(std::io::Error::other("down"))),
                503,
                "api_error",
                "store-unavailable",
            ),
            (
                ProxyError::from(UpstreamError::Timeout(Duration::from_secs(1))),
                504,
                "api_error",
                "upstream-timeout",
            ),
        ];
        let stripe = ErrorStyle {
            format: ErrorFormat::Stripe,
            retry_hint: None,
        };
        for (err, status, stripe_type, code) in cases {
            let detail = err.detail().into_owned();
            let response = err.into_response(stripe);
            assert_eq!(response.status().as_u16(), status, "{code}");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json", "{code}");
            let link = response.headers()[LINK].to_str().expect("ascii").to_owned();
            let json = problem_json(response).await;
            let error = &json["error"];
            assert_eq!(error["type"], stripe_type, "{code}");
            assert_eq!(error["code"], code);
            assert_eq!(error["message"], detail.as_str(), "{code}");
            let doc_url = error["doc_url"].as_str().expect("doc_url");
            assert!(doc_url.ends_with(&format!("docs/errors.md#{code}")), "{doc_url}");
            assert_eq!(link, format!("<{doc_url}>; rel=\"describedby\""));
        }
    }

    #[tokio::test]
    async fn retry_hints_in_either_form() {
        let name = HINT;
        for format in [ErrorFormat::Problem, ErrorFormat::Stripe] {
            let style = ErrorStyle {
                format,
                retry_hint: Some(&name),
            };
            let hint = |err: ProxyError| {
                let response = err.into_response(style);
                response
                    .headers()
                    .get(HINT)
                    .map(|v| v.to_str().expect("ascii").to_owned())
            };
            let conflict = ProxyError::Conflict {
                retry_after: Duration::from_secs(1),
            };
            let store = ProxyError::StoreUnavailable(StoreError::unreachable(std::io::Error::other("down")));
            assert_eq!(hint(conflict).as_deref(), Some("true"), "{format}");
            assert_eq!(hint(store).as_deref(), Some("true"), "{format}");
            let unknown = ProxyError::OutcomeUnknown(UnknownCause::UpstreamFailed);
            assert_eq!(hint(unknown).as_deref(), Some("false"), "{format}");
            assert_eq!(hint(ProxyError::NotReplayable).as_deref(), Some("false"), "{format}");
            assert_eq!(hint(ProxyError::Mismatch), None, "{format}");
        }
        let unnamed = ProxyError::Conflict {
            retry_after: Duration::from_secs(1),
        }
        .into_response(ErrorStyle::PLAIN);
        assert!(
            unnamed.headers().get(HINT).is_none(),
            "no header unless the route names one"
        );
        assert_eq!(unnamed.headers()[RETRY_AFTER], "1", "Retry-After is kept");
    }

    #[tokio::test]
    async fn statuses_outcomes_and_sources() {
        assert_eq!(ProxyError::Mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ProxyError::Mismatch.source_of_error(), ErrorSource::Client);
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
        // Not replayable counts as itself, not as a replay.
        assert_eq!(ProxyError::NotReplayable.outcome(), Outcome::NotReplayable);
        let timeout = ProxyError::from(UpstreamError::Timeout(Duration::from_secs(1)));
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.outcome(), Outcome::UpstreamError);
        assert_eq!(timeout.source_of_error(), ErrorSource::Upstream);
        // The client's streamed body failing is the client's error, not the upstream's.
        let client_body = ProxyError::from(UpstreamError::ClientBody(crate::upstream::hyper_error().await));
        assert_eq!(client_body.status(), StatusCode::BAD_REQUEST);
        assert_eq!(client_body.outcome(), Outcome::BadRequest);
        assert_eq!(client_body.source_of_error(), ErrorSource::Client);
        let failed = ProxyError::from(UpstreamError::Failed(crate::upstream::hyper_error().await));
        assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(failed.outcome(), Outcome::UpstreamError);
        let body_timeout = ProxyError::ClientBodyTimeout(Duration::from_secs(1));
        assert_eq!(body_timeout.status(), StatusCode::BAD_REQUEST);
        assert_eq!(body_timeout.outcome(), Outcome::BadRequest);
    }
}
