//! Stripe's error dialect (docs/behaviour.md §16): the object Stripe's SDKs parse,
//! `{"error": {"type", "code", "message", "doc_url"}}`. Which error gets which type is the
//! error's own business (`Problem::stripe_type`); this file knows the shape and the statuses.

use http::StatusCode;
use serde_json::{json, Value};

/// Stripe's error `type`, which its SDKs turn into their exception classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeType {
    /// `invalid_request_error`: the request is at fault (a bad or missing key, a body too
    /// large, a retry while the first request runs).
    InvalidRequest,
    /// `idempotency_error`: the key belongs to another request.
    Idempotency,
    /// `api_error`: the store, the upstream or the proxy failed.
    Api,
}

impl StripeType {
    pub fn as_str(self) -> &'static str {
        match self {
            StripeType::InvalidRequest => "invalid_request_error",
            StripeType::Idempotency => "idempotency_error",
            StripeType::Api => "api_error",
        }
    }

    /// The status an error of this type is answered with, given its problem status: an
    /// idempotency error is a `400`, as Stripe sends it (its SDKs raise their idempotency error
    /// only for `400` and `404`); every other status is kept.
    pub fn status(self, problem_status: StatusCode) -> StatusCode {
        match self {
            StripeType::Idempotency => StatusCode::BAD_REQUEST,
            StripeType::InvalidRequest | StripeType::Api => problem_status,
        }
    }
}

/// The error object. `code` is the problem's slug and `doc_url` its section of
/// `docs/errors.md`; an extension member, if any, goes inside `error`.
pub fn body(
    kind: StripeType,
    code: &str,
    message: &str,
    doc_url: &str,
    extension: Option<(&'static str, Value)>,
) -> Value {
    let mut error = json!({
        "type": kind.as_str(),
        "code": code,
        "message": message,
        "doc_url": doc_url,
    });
    if let Some((name, value)) = extension {
        error[name] = value;
    }
    json!({ "error": error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_idempotency_error_changes_its_status() {
        assert_eq!(
            StripeType::Idempotency.status(StatusCode::UNPROCESSABLE_ENTITY),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            StripeType::Api.status(StatusCode::GATEWAY_TIMEOUT),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            StripeType::InvalidRequest.status(StatusCode::CONFLICT),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn the_object_is_nested_under_error() {
        let value = body(
            StripeType::Api,
            "store-unavailable",
            "down",
            "https://x#store-unavailable",
            None,
        );
        assert_eq!(value["error"]["type"], "api_error");
        assert_eq!(value["error"]["code"], "store-unavailable");
        assert_eq!(value["error"]["message"], "down");
        assert_eq!(value["error"]["doc_url"], "https://x#store-unavailable");
        assert_eq!(value.as_object().map(|o| o.len()), Some(1));
    }
}
