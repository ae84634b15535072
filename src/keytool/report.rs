//! The readable summaries `idemproxy key` prints. The scope value (often a credential) is never
//! printed; the key hash is, so the key's log lines can be found (their `key` field).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::config::KeyTarget;

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("?")
}

/// `1500` → `1s 500ms`; from a minute on, whole seconds (`2h 3m 4s`).
fn duration_ms(ms: u64) -> String {
    let shown = if ms >= 60_000 { ms / 1000 * 1000 } else { ms };
    humantime::format_duration(Duration::from_millis(shown)).to_string()
}

fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{name:<12}{value}");
}

/// What the record's state means for the next request with the key.
fn state_line(record: &Value) -> String {
    match text(record, "state") {
        "InFlight" => "InFlight: a request with this key is executing upstream; retries get 409".to_owned(),
        "Completed" => "Completed: retries get the stored response".to_owned(),
        "Unknown" => format!(
            "Unknown (cause {}): every retry gets outcome-unknown until the key is cleared or expires",
            text(record, "cause")
        ),
        other => other.to_owned(),
    }
}

/// The summary of a `GET /keys/…` answer.
pub fn record(target: &KeyTarget, record: &Value) -> String {
    let mut out = String::new();
    line(&mut out, "key", &target.key);
    line(
        &mut out,
        "scope",
        if target.scope.is_some() {
            "given (not shown)"
        } else {
            "none"
        },
    );
    line(&mut out, "route", text(record, "route"));
    if let Some(source) = record.get("source").and_then(Value::as_str) {
        line(&mut out, "source", source);
    }
    line(
        &mut out,
        "key hash",
        format!("{}  (the `key` field of its log lines)", text(record, "key_hash")),
    );
    line(&mut out, "state", state_line(record));
    if let Some(status) = record.get("status").and_then(Value::as_u64) {
        let body = match (
            record.get("replayable").and_then(Value::as_bool),
            record.get("body_bytes"),
        ) {
            (Some(true), Some(Value::Number(bytes))) => format!("{bytes} body bytes, replayable"),
            _ => "body not kept (over max_response_bytes): retries get response-not-replayable".to_owned(),
        };
        line(&mut out, "response", format!("{status}, {body}"));
    }
    let durations = [
        ("age", "age_ms"),
        ("lease left", "lease_left_ms"),
        ("expires in", "expires_in_ms"),
    ];
    for (name, field) in durations {
        if let Some(ms) = record.get(field).and_then(Value::as_u64) {
            line(&mut out, name, duration_ms(ms));
        }
    }
    if let Some(body) = record.get("body").and_then(Value::as_str) {
        let _ = write!(out, "body ({}):\n{body}", text(record, "body_encoding"));
    }
    out.trim_end().to_owned()
}

/// The summary of a cleared key, `record` being what it was before.
pub fn cleared(target: &KeyTarget, record: &Value) -> String {
    let mut was = text(record, "state").to_owned();
    if let Some(cause) = record.get("cause").and_then(Value::as_str) {
        let _ = write!(was, ", cause {cause}");
    }
    format!(
        "cleared key {} on route {} (key hash {}; it was {was}): the next request with this key executes upstream",
        target.key,
        text(record, "route"),
        text(record, "key_hash"),
    )
}

/// The summary of the no-such-key problem.
pub fn not_found(target: &KeyTarget, problem: &Value) -> String {
    let route = target
        .route
        .as_deref()
        .map(|r| format!(" on route {r}"))
        .unwrap_or_default();
    let source = target
        .source
        .as_deref()
        .map(|s| format!(" from {s}"))
        .unwrap_or_default();
    let scope = if target.scope.is_some() {
        "with this scope"
    } else {
        "without a scope"
    };
    format!(
        "no record for key {}{source}{route} {scope} (key hash {}): never used so, expired, or cleared",
        target.key,
        text(problem, "key_hash"),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn target() -> KeyTarget {
        KeyTarget {
            key: "\"pay/42\"".to_owned(),
            scope: Some("Bearer secret-token".to_owned()),
            route: None,
            source: None,
            admin: None,
            token: None,
            json: false,
        }
    }

    #[test]
    fn an_unknown_key_reads_as_what_to_do() {
        let record = json!({
            "key_hash": "5c5f3aa938de", "route": "default", "state": "Unknown", "cause": "Timeout",
            "age_ms": 1500, "lease_left_ms": null, "expires_in_ms": 86_398_500u64,
        });
        let summary = super::record(&target(), &record);
        let expected = "\
key         \"pay/42\"
scope       given (not shown)
route       default
key hash    5c5f3aa938de  (the `key` field of its log lines)
state       Unknown (cause Timeout): every retry gets outcome-unknown until the key is cleared or expires
age         1s 500ms
expires in  23h 59m 58s";
        assert_eq!(summary, expected);
        assert!(!summary.contains("secret-token"));
        let cleared = super::cleared(&target(), &record);
        assert!(
            cleared.starts_with(
                "cleared key \"pay/42\" on route default (key hash 5c5f3aa938de; it was Unknown, cause Timeout)"
            ),
            "{cleared}"
        );
    }

    #[test]
    fn a_completed_key_shows_its_response() {
        let record = json!({
            "key_hash": "5c5f3aa938de", "route": "default", "state": "Completed", "status": 201,
            "replayable": true, "body_bytes": 9, "body": "{\"id\":1}", "body_encoding": "utf-8",
            "age_ms": 10, "lease_left_ms": null, "expires_in_ms": 1000,
        });
        let summary = super::record(&target(), &record);
        assert!(
            summary.contains("\nresponse    201, 9 body bytes, replayable\n"),
            "{summary}"
        );
        assert!(summary.ends_with("body (utf-8):\n{\"id\":1}"), "{summary}");
        let record = json!({"key_hash": "x", "state": "Completed", "status": 200, "replayable": false});
        assert!(super::record(&target(), &record).contains("response-not-replayable"));
    }

    #[test]
    fn a_missing_key_names_its_hash() {
        let problem = json!({"type": "x#admin-no-such-key", "key_hash": "0123456789ab"});
        let summary = not_found(&target(), &problem);
        assert_eq!(
            summary,
            "no record for key \"pay/42\" with this scope (key hash 0123456789ab): never used so, expired, or cleared"
        );
        let from_body = KeyTarget {
            source: Some("json:/client_order_id".to_owned()),
            ..target()
        };
        assert!(
            not_found(&from_body, &problem).starts_with("no record for key \"pay/42\" from json:/client_order_id with")
        );
    }

    #[test]
    fn a_key_from_another_source_shows_it() {
        let record = json!({
            "key_hash": "5c5f3aa938de", "route": "pay", "source": "json:/client_order_id",
            "state": "Completed", "status": 201, "replayable": true, "body_bytes": 2,
        });
        let summary = super::record(&target(), &record);
        assert!(
            summary.contains("\nroute       pay\nsource      json:/client_order_id\n"),
            "{summary}"
        );
    }
}
