//! `idemproxy key show|clear KEY`: the admin key endpoints (docs/behaviour.md §10.4) for an
//! operator who has only what the client sent: the key as sent, the scope header's value, the
//! route, and the key source it came from (`--source`, §13.4). The tool encodes them, calls the running proxy's admin listener (`--admin`, else the
//! `admin_listen` of the configuration) and prints a summary with the key's log hash.
//!
//! `clear` looks the key up before deleting it, so that it deletes only on a listener that
//! answers like idemproxy's admin listener (never, say, through the proxy to the upstream), and
//! can say what it cleared.
//!
//! Exit codes: `0` found (or cleared), `1` no such key, `2` a usage, configuration or
//! connection error, or any other refusal.

mod client;
mod report;

use std::process::ExitCode;

use http::{Method, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use crate::config::{Cli, Config, ConfigError, KeyCommand, KeySource, KeyTarget};
use crate::idempotency::{key, source};
pub use client::{AdminClient, AdminUrl, Answer};

/// Exit code for a key without a record.
const EXIT_NOT_FOUND: u8 = 1;
/// Exit code for every other failure.
const EXIT_ERROR: u8 = 2;

/// Everything but RFC 3986 unreserved characters is percent-encoded in the path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Why the tool could not answer (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum KeyToolError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot reach the admin listener at {admin}: {why}")]
    Connect { admin: String, why: String },
    #[error(
        "{admin} answered {status} ({content_type}): not an idemproxy admin listener; is it the proxy's own listener?"
    )]
    NotAdmin {
        admin: String,
        status: StatusCode,
        content_type: String,
    },
    #[error("{admin} refused: {status} {title}{detail}{hint}")]
    Refused {
        admin: String,
        status: StatusCode,
        title: String,
        detail: String,
        hint: &'static str,
    },
}

/// What the admin listener said about a key.
enum Lookup {
    /// Its record (`GET /keys/…` answer).
    Found(Value),
    /// The `admin-no-such-key` problem.
    NotFound(Value),
}

/// What a command found out.
enum Done {
    /// The key's record was shown, or the key cleared: what to print.
    Answered(String),
    /// The key has no record: what to print.
    NotFound(String),
}

/// Runs `idemproxy key …` to the end: the exit code.
pub fn run(cli: &Cli, command: &KeyCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("idemproxy key: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(execute(cli, command)) {
        Ok(Done::Answered(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(Done::NotFound(output)) => {
            println!("{output}");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(err) => {
            eprintln!("idemproxy key: {err}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn execute(cli: &Cli, command: &KeyCommand) -> Result<Done, KeyToolError> {
    let (target, body, clear) = match command {
        KeyCommand::Show { target, body } => (target, *body, false),
        KeyCommand::Clear { target } => (target, false, true),
    };
    check_key(target)?;
    let (url, token) = admin_of(cli, target)?;
    let mut client = AdminClient::connect(url.clone(), token).await?;
    let answer = client.send(Method::GET, &key_path(target, body)).await?;
    let record = match interpret(&url, answer)? {
        Lookup::Found(record) => record,
        Lookup::NotFound(problem) => return Ok(not_found(target, &problem)),
    };
    if !clear {
        return Ok(Done::Answered(if target.json {
            record.to_string()
        } else {
            report::record(target, &record)
        }));
    }
    let answer = client.send(Method::DELETE, &key_path(target, false)).await?;
    Ok(match interpret(&url, answer)? {
        Lookup::Found(cleared) if target.json => Done::Answered(cleared.to_string()),
        Lookup::Found(_) => Done::Answered(report::cleared(target, &record)),
        Lookup::NotFound(problem) => not_found(target, &problem),
    })
}

fn not_found(target: &KeyTarget, problem: &Value) -> Done {
    Done::NotFound(if target.json {
        problem.to_string()
    } else {
        report::not_found(target, problem)
    })
}

/// Refuses, before asking the proxy, a key that its source would refuse: without `--source`,
/// the key is checked as an `Idempotency-Key` header value; with it, by that source's rules
/// (docs/behaviour.md §13.1), and the source itself must be one.
fn check_key(target: &KeyTarget) -> Result<(), KeyToolError> {
    let Some(spec) = &target.source else {
        return key::parse(target.key.as_bytes()).map(drop).map_err(|err| {
            KeyToolError::Usage(format!(
                "`{}` is not a valid Idempotency-Key: {err} (a key from another of the route's key \
                 sources needs --source)",
                target.key
            ))
        });
    };
    let source = KeySource::parse(spec).map_err(|err| KeyToolError::Usage(format!("--source `{spec}`: {err}")))?;
    source::parse_as(&source, target.key.as_bytes())
        .map(drop)
        .map_err(|err| KeyToolError::Usage(format!("`{}` is not a valid key from `{source}`: {err}", target.key)))
}

/// The admin listener and token: `--admin` and `--token` when given, else those of the
/// configuration (`--config`, `IDEMPROXY_*`).
fn admin_of(cli: &Cli, target: &KeyTarget) -> Result<(AdminUrl, Option<String>), KeyToolError> {
    let access = if target.admin.is_some() && target.token.is_some() {
        Default::default()
    } else {
        Config::admin_access(cli)?
    };
    let url = match (&target.admin, access.listen) {
        (Some(admin), _) => AdminUrl::parse(admin)?,
        (None, Some(listen)) => AdminUrl::of_listener(listen)?,
        (None, None) => {
            return Err(KeyToolError::Usage(
                "no admin listener to ask: give --admin URL, or the proxy's configuration with \
                 --config FILE (or IDEMPROXY_CONFIG, IDEMPROXY_ADMIN_LISTEN) naming its `admin_listen`"
                    .into(),
            ))
        }
    };
    Ok((url, target.token.clone().or(access.token)))
}

/// `/keys/{key}?scope=…&route=…&source=…[&body=true]`, every value encoded.
fn key_path(target: &KeyTarget, body: bool) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(scope) = &target.scope {
        query.append_pair("scope", scope);
    }
    if let Some(route) = &target.route {
        query.append_pair("route", route);
    }
    if let Some(source) = &target.source {
        query.append_pair("source", source);
    }
    if body {
        query.append_pair("body", "true");
    }
    let query = query.finish();
    let key = utf8_percent_encode(&target.key, SEGMENT);
    if query.is_empty() {
        format!("/keys/{key}")
    } else {
        format!("/keys/{key}?{query}")
    }
}

/// Reads a key endpoint's answer: a record (or clearing) with its `key_hash`, the no-such-key
/// problem, or an error. Anything that is not one of the admin listener's answers is refused.
fn interpret(url: &AdminUrl, answer: Answer) -> Result<Lookup, KeyToolError> {
    let not_admin = || KeyToolError::NotAdmin {
        admin: url.to_string(),
        status: answer.status,
        content_type: answer.content_type.clone(),
    };
    let json = |expected: &str| {
        answer
            .content_type
            .starts_with(expected)
            .then(|| serde_json::from_slice::<Value>(&answer.body).ok())
            .flatten()
    };
    if answer.status == StatusCode::OK {
        let value = json("application/json").ok_or_else(not_admin)?;
        return match value.get("key_hash") {
            Some(Value::String(_)) => Ok(Lookup::Found(value)),
            _ => Err(not_admin()),
        };
    }
    let problem = json("application/problem+json").ok_or_else(not_admin)?;
    let text = |field: &str| {
        problem
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if text("type").ends_with("#admin-no-such-key") {
        return Ok(Lookup::NotFound(problem));
    }
    let detail = text("detail");
    Err(KeyToolError::Refused {
        admin: url.to_string(),
        status: answer.status,
        title: text("title"),
        detail: if detail.is_empty() {
            detail
        } else {
            format!(": {detail}")
        },
        hint: match answer.status {
            StatusCode::UNAUTHORIZED => " (give the admin token with --token or IDEMPROXY_ADMIN_TOKEN)",
            _ => "",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(key: &str, scope: Option<&str>, route: Option<&str>) -> KeyTarget {
        KeyTarget {
            key: key.to_owned(),
            scope: scope.map(str::to_owned),
            route: route.map(str::to_owned),
            source: None,
            admin: None,
            token: None,
            json: false,
        }
    }

    #[test]
    fn key_paths_encode_every_value() {
        assert_eq!(key_path(&target("order-1", None, None), false), "/keys/order-1");
        assert_eq!(
            key_path(&target("\"pay/42 x\"", Some("Bearer a+b=="), Some("pay ments")), true),
            "/keys/%22pay%2F42%20x%22?scope=Bearer+a%2Bb%3D%3D&route=pay+ments&body=true"
        );
        let from_body = KeyTarget {
            source: Some("json:/order/client id".to_owned()),
            ..target("ord 7/x", None, Some("pay"))
        };
        assert_eq!(
            key_path(&from_body, false),
            "/keys/ord%207%2Fx?route=pay&source=json%3A%2Forder%2Fclient+id"
        );
    }

    #[test]
    fn keys_are_checked_by_their_source() {
        let with = |key: &str, source: Option<&str>| KeyTarget {
            source: source.map(str::to_owned),
            ..target(key, None, None)
        };
        let message = |result: Result<(), KeyToolError>| result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(check_key(&with("\"pay/42\"", None)).is_ok());
        let spaced = message(check_key(&with("ord 7", None)));
        assert!(spaced.contains("is not a valid Idempotency-Key"), "{spaced}");
        assert!(spaced.contains("--source"), "{spaced}");
        assert!(check_key(&with("ord 7", Some("json:/client_order_id"))).is_ok());
        assert!(check_key(&with("ord 7", Some("query:rid"))).is_ok());
        assert!(check_key(&with("\"ord\"", Some("header:X-Request-Id"))).is_ok());
        let bad_source = message(check_key(&with("k", Some("cookie:sid"))));
        assert!(bad_source.starts_with("--source `cookie:sid`"), "{bad_source}");
        let too_long = "x".repeat(256);
        let refused = message(check_key(&with(&too_long, Some("json:/id"))));
        assert!(refused.contains("json:/id"), "{refused}");
    }

    fn answer(status: StatusCode, content_type: &str, body: &str) -> Answer {
        Answer {
            status,
            content_type: content_type.to_owned(),
            body: body.to_owned().into(),
        }
    }

    #[test]
    fn only_admin_answers_are_believed() {
        let url = AdminUrl::parse("127.0.0.1:9").expect("url");
        let found = interpret(
            &url,
            answer(StatusCode::OK, "application/json", r#"{"key_hash":"0123456789ab"}"#),
        );
        assert!(matches!(found, Ok(Lookup::Found(_))));
        let missing = r#"{"type":"https://x/docs/errors.md#admin-no-such-key","key_hash":"0123456789ab"}"#;
        let missing = interpret(&url, answer(StatusCode::NOT_FOUND, "application/problem+json", missing));
        assert!(matches!(missing, Ok(Lookup::NotFound(_))));
        let unauthorized =
            r#"{"type":"x#admin-unauthorized","title":"Unauthorized","detail":"a bearer token is required"}"#;
        let refused = interpret(
            &url,
            answer(StatusCode::UNAUTHORIZED, "application/problem+json", unauthorized),
        );
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("401 Unauthorized Unauthorized: a bearer token is required"),
            "{message}"
        );
        assert!(message.contains("--token"), "{message}");
        for (status, content_type, body) in [
            (StatusCode::OK, "application/json", r#"{"hit":1}"#),
            (StatusCode::CREATED, "application/json", r#"{"key_hash":"x"}"#),
            (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
            (StatusCode::OK, "text/html", "<html>"),
        ] {
            let result = interpret(&url, answer(status, content_type, body));
            assert!(matches!(result, Err(KeyToolError::NotAdmin { .. })), "{status} {body}");
        }
    }
}
