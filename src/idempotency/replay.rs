//! Storing a first response and replaying it (docs/behaviour.md §6).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};

use super::record::StoredResponse;
use crate::body::ProxyBody;
use crate::headers::{is_replayed, IDEMPOTENT_REPLAYED};

/// What is kept of a first response: status, end-to-end headers, and the body when it fit.
pub fn store(
    status: http::StatusCode,
    headers: &HeaderMap,
    body: Option<Bytes>,
    completed_at_ms: u64,
) -> StoredResponse {
    StoredResponse {
        status,
        headers: headers
            .iter()
            .filter(|(name, _)| is_replayed(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        body,
        completed_at_ms,
    }
}

/// The replay of a stored response: its status, headers and body, plus
/// `Idempotent-Replayed: true`. `Content-Length` is recomputed and `Date` is fresh (hyper adds
/// both). `None` when the body was not stored (too large to replay).
pub fn replay(stored: StoredResponse) -> Option<Response<ProxyBody>> {
    let body = stored.body?;
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    headers.reserve(stored.headers.len() + 1);
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, SET_COOKIE};
    use http::StatusCode;

    #[test]
    fn store_keeps_end_to_end_fields_and_replay_marks_them() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.append(SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.append(SET_COOKIE, HeaderValue::from_static("b=2"));
        headers.insert(DATE, HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("2"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let stored = store(StatusCode::CREATED, &headers, Some(Bytes::from_static(b"{}")), 5);
        assert_eq!(stored.headers.len(), 3);
        let response = replay(stored).expect("replayable");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(response.headers().get_all(SET_COOKIE).iter().count(), 2);
        assert!(response.headers().get(DATE).is_none());
        assert!(response.headers().get(CONTENT_LENGTH).is_none());
    }

    #[test]
    fn bodiless_record_is_not_replayable() {
        assert!(replay(store(StatusCode::OK, &HeaderMap::new(), None, 0)).is_none());
    }
}
