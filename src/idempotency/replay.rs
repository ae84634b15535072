//! Storing a first response and replaying it (docs/behaviour.md §6).

use bytes::Bytes;
use http::header::{ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS};
use http::{HeaderMap, HeaderName, HeaderValue, Response};

use super::record::StoredResponse;
use crate::body::ProxyBody;
use crate::headers::is_replayed;

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

/// The replay of a stored response: its status, headers and body, plus `marker: true`
/// (`Idempotent-Replayed` unless the route renames it, docs/behaviour.md §13). `Content-Length`
/// is recomputed and `Date` is fresh (hyper adds both). `None` when the body was not stored
/// (too large to replay).
pub fn replay(stored: StoredResponse, marker: &HeaderName) -> Option<Response<ProxyBody>> {
    let body = stored.body?;
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    headers.reserve(stored.headers.len() + 1);
    for (name, value) in stored.headers {
        headers.append(name, value);
    }
    headers.insert(marker.clone(), HeaderValue::from_static("true"));
    expose_to_browsers(headers, marker);
    Some(response)
}

/// A browser's script reads only the response fields CORS exposes (Fetch standard, "CORS
/// protocol"): on a response that carries `Access-Control-Allow-Origin`, `marker` is added to
/// `Access-Control-Expose-Headers` unless that already names it.
fn expose_to_browsers(headers: &mut HeaderMap, marker: &HeaderName) {
    if !headers.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) {
        return;
    }
    let exposed = headers
        .get_all(ACCESS_CONTROL_EXPOSE_HEADERS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case(marker.as_str()));
    if !exposed {
        headers.append(ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_name(marker.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, SET_COOKIE};
    use http::StatusCode;

    use crate::headers::IDEMPOTENT_REPLAYED;

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
        let response = replay(stored, &IDEMPOTENT_REPLAYED).expect("replayable");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(response.headers().get_all(SET_COOKIE).iter().count(), 2);
        assert!(response.headers().get(DATE).is_none());
        assert!(response.headers().get(CONTENT_LENGTH).is_none());
        assert!(
            response.headers().get(ACCESS_CONTROL_EXPOSE_HEADERS).is_none(),
            "no CORS, nothing exposed"
        );
    }

    #[test]
    fn a_renamed_marker_is_exposed_to_browsers_on_cors_responses() {
        let marker = HeaderName::from_static("x-replayed");
        let replayed = |fields: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in fields {
                headers.append(*name, HeaderValue::from_static(value));
            }
            let stored = store(StatusCode::OK, &headers, Some(Bytes::from_static(b"{}")), 0);
            let response = replay(stored, &marker).expect("replayable");
            assert_eq!(response.headers()["x-replayed"], "true");
            assert!(response.headers().get(IDEMPOTENT_REPLAYED).is_none());
            let exposed: Vec<String> = response
                .headers()
                .get_all(ACCESS_CONTROL_EXPOSE_HEADERS)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_owned())
                .collect();
            exposed
        };
        assert!(replayed(&[]).is_empty());
        assert_eq!(replayed(&[("access-control-allow-origin", "*")]), ["x-replayed"]);
        assert_eq!(
            replayed(&[
                ("access-control-allow-origin", "https://a.example"),
                ("access-control-expose-headers", "Location")
            ]),
            ["Location", "x-replayed"]
        );
        assert_eq!(
            replayed(&[
                ("access-control-allow-origin", "*"),
                ("access-control-expose-headers", "location, X-Replayed")
            ]),
            ["location, X-Replayed"]
        );
    }

    #[test]
    fn bodiless_record_is_not_replayable() {
        assert!(replay(store(StatusCode::OK, &HeaderMap::new(), None, 0), &IDEMPOTENT_REPLAYED).is_none());
    }
}
