//! Finding a request's key in its route's key sources, first match wins (docs/behaviour.md
//! §13): a header (parsed as the `Idempotency-Key` is, §2), a query parameter, or a string or
//! integer at an RFC 6901 pointer in a JSON body; and the storage key of a key by its source.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, Uri};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::fingerprint::StorageKey;
use super::key::{self, IdempotencyKey, KeyError};
use crate::config::{JsonPointer, KeySource, PointerToken, SourceKind};

/// What of the request body a lookup can see.
#[derive(Debug, Clone, Copy)]
pub enum BodyView<'b> {
    /// Not read yet: a `json:` source stops the lookup ([`Lookup::NeedsBody`]).
    NotRead,
    /// The whole body.
    Read(&'b [u8]),
    /// Larger than `buffer_bytes`: `json:` sources find nothing in it.
    TooLarge,
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup<'r, 's> {
    /// The first source that has a key, and the key.
    Found {
        key: IdempotencyKey<'r>,
        source: &'s KeySource,
    },
    /// Source number `from` reads the body and no earlier source has a key: read the body,
    /// then look again from there.
    NeedsBody { from: usize },
    /// No source has a key.
    Missing,
}

/// Looks for the key in `sources` from number `from` on. A source that has a malformed key is
/// an error (`400`); an absent one passes to the next source.
pub fn find<'r, 's>(
    sources: &'s [KeySource],
    from: usize,
    headers: &'r HeaderMap,
    uri: &'r Uri,
    body: BodyView<'r>,
) -> Result<Lookup<'r, 's>, KeyError> {
    for (i, source) in sources.iter().enumerate().skip(from) {
        let found = match source.kind() {
            SourceKind::Header(name) => key::from_fields(headers.get_all(name)),
            SourceKind::Query(name) => from_query(uri.query(), name),
            SourceKind::Json(pointer) => match body {
                BodyView::NotRead => return Ok(Lookup::NeedsBody { from: i }),
                BodyView::TooLarge => Ok(None),
                BodyView::Read(bytes) => json_key(bytes, pointer),
            },
        };
        match found {
            Ok(Some(key)) => return Ok(Lookup::Found { key, source }),
            Ok(None) => {}
            Err(err) if source.is_default() => return Err(err),
            Err(err) => return Err(err.from_source(source.label())),
        }
    }
    Ok(Lookup::Missing)
}

/// The storage key of `key` found in `source`: exactly that of docs/behaviour.md §3 for the
/// default source, and scoped by the source too for any other (§13).
pub fn storage_key(source: &KeySource, prefix: &str, route: &str, scope: &[u8], key: &[u8]) -> StorageKey {
    if source.is_default() {
        StorageKey::new(prefix, route, scope, key)
    } else {
        StorageKey::sourced(prefix, route, scope, source.label(), key)
    }
}

/// A key as an operator types it for `source` (the admin key endpoints): as the header value
/// for a header source, as the value itself for the others.
pub fn parse_as(source: &KeySource, text: &[u8]) -> Result<IdempotencyKey<'static>, KeyError> {
    let parsed = match source.kind() {
        SourceKind::Header(_) => key::parse(text).map(IdempotencyKey::into_owned),
        SourceKind::Json(_) | SourceKind::Query(_) => IdempotencyKey::raw(Cow::Owned(text.to_vec())),
    };
    parsed.map_err(|err| {
        if source.is_default() {
            err
        } else {
            err.from_source(source.label())
        }
    })
}

/// The query parameter `name`, percent-decoded (`+` is a space); more than one is an error.
fn from_query<'q>(query: Option<&'q str>, name: &str) -> Result<Option<IdempotencyKey<'q>>, KeyError> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found = None;
    for (param, value) in form_urlencoded::parse(query.as_bytes()) {
        if param == name {
            if found.is_some() {
                return Err(KeyError::Multiple);
            }
            found = Some(value);
        }
    }
    found
        .map(|value| {
            IdempotencyKey::raw(match value {
                Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
                Cow::Owned(text) => Cow::Owned(text.into_bytes()),
            })
        })
        .transpose()
}

/// The key at `pointer` in a JSON body: a string, or an integer kept as its digits. A body
/// that is not JSON (RFC 8259, UTF-8), or has nothing (or `null`) there, has no key; a member
/// on the way that appears twice, or a value of another type, is an error.
pub fn json_key<'b>(body: &'b [u8], pointer: &JsonPointer) -> Result<Option<IdempotencyKey<'b>>, KeyError> {
    if std::str::from_utf8(body).is_err() {
        return Ok(None);
    }
    let mut reader = serde_json::Deserializer::from_slice(body);
    let leaf = Seek(pointer.tokens()).deserialize(&mut reader);
    let leaf = match leaf.and_then(|leaf| reader.end().map(|()| leaf)) {
        Ok(leaf) => leaf,
        Err(_) => return Ok(None),
    };
    let raw = match leaf {
        Leaf::Absent => return Ok(None),
        Leaf::Repeated => return Err(KeyError::Multiple),
        Leaf::Value(raw) => raw.get(),
    };
    match raw.as_bytes().first() {
        Some(b'"') => match serde_json::from_str::<String>(raw) {
            Ok(text) => IdempotencyKey::raw(Cow::Owned(text.into_bytes())).map(Some),
            // A lone surrogate: not I-JSON, not a key.
            Err(_) => Ok(None),
        },
        Some(b'n') => Ok(None),
        _ if is_integer(raw) => IdempotencyKey::raw(Cow::Borrowed(raw.as_bytes())).map(Some),
        _ => Err(KeyError::NotStringOrInteger),
    }
}

/// `-?[0-9]+`: a JSON number that is an integer as written (RFC 8259 §6, no fraction or
/// exponent).
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// What a walk down a pointer found.
enum Leaf<'de> {
    Absent,
    /// A member on the way appeared more than once: which one counts is ambiguous.
    Repeated,
    Value(&'de RawValue),
}

/// Walks the rest of a pointer through the value being deserialized, skipping (but still
/// parsing, so the whole body is checked) everything off the path.
struct Seek<'p>(&'p [PointerToken]);

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = Leaf<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Leaf<'de>, D::Error> {
        match self.0.split_first() {
            None => serde::Deserialize::deserialize(deserializer).map(Leaf::Value),
            Some((token, rest)) => deserializer.deserialize_any(Step { token, rest }),
        }
    }
}

/// One step of a [`Seek`]: the member or element `token` of the current value.
struct Step<'p> {
    token: &'p PointerToken,
    rest: &'p [PointerToken],
}

impl<'de> Visitor<'de> for Step<'_> {
    type Value = Leaf<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Absent)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Absent)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Absent)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Absent)
    }

    fn visit_str<E>(self, _: &str) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Absent)
    }

    fn visit_unit<E>(self) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Absent)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Leaf<'de>, A::Error> {
        let mut found = Leaf::Absent;
        let mut seen = false;
        while let Some(matches) = map.next_key_seed(NameIs(&self.token.name))? {
            if !matches {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let leaf = map.next_value_seed(Seek(self.rest))?;
            found = if seen { Leaf::Repeated } else { leaf };
            seen = true;
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Leaf<'de>, A::Error> {
        let mut found = Leaf::Absent;
        let mut index = 0usize;
        loop {
            if Some(index) == self.token.index {
                match seq.next_element_seed(Seek(self.rest))? {
                    Some(leaf) => found = leaf,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(found)
    }
}

/// Reads a member name and tells whether it is the one sought.
struct NameIs<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for NameIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for NameIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<bool, E> {
        Ok(name == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn sources(specs: &[&str]) -> Vec<KeySource> {
        specs.iter().map(|s| KeySource::parse(s).expect("a source")).collect()
    }

    /// The key `sources` find (its bytes and its source's label), reading `body` when asked.
    fn lookup(
        specs: &[&str],
        headers: &[(&str, &str)],
        target: &str,
        body: &str,
    ) -> Result<Option<(String, String)>, KeyError> {
        let sources = sources(specs);
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        let uri: Uri = target.parse().expect("uri");
        let found = match find(&sources, 0, &map, &uri, BodyView::NotRead)? {
            Lookup::NeedsBody { from } => find(&sources, from, &map, &uri, BodyView::Read(body.as_bytes()))?,
            other => other,
        };
        Ok(match found {
            Lookup::Found { key, source } => Some((
                String::from_utf8(key.as_bytes().to_vec()).expect("ascii"),
                source.label().to_owned(),
            )),
            Lookup::Missing => None,
            Lookup::NeedsBody { .. } => panic!("the body was read"),
        })
    }

    fn found(key: &str, source: &str) -> Result<Option<(String, String)>, KeyError> {
        Ok(Some((key.to_owned(), source.to_owned())))
    }

    #[test]
    fn first_source_with_a_key_wins() {
        let specs = ["header:X-Request-Id", "json:/client_order_id", "query:rid"];
        let body = r#"{"client_order_id": "ord-1"}"#;
        assert_eq!(
            lookup(&specs, &[("x-request-id", "\"r-1\"")], "/o?rid=q", body),
            found("r-1", "header:x-request-id")
        );
        assert_eq!(
            lookup(&specs, &[], "/o?rid=q", body),
            found("ord-1", "json:/client_order_id")
        );
        assert_eq!(lookup(&specs, &[], "/o?a=1&rid=q%20x", "{}"), found("q x", "query:rid"));
        assert_eq!(lookup(&specs, &[], "/o", "{}"), Ok(None));
        // A json source before a header source is looked at first.
        let body_first = ["json:/id", "header:Idempotency-Key"];
        assert_eq!(
            lookup(&body_first, &[("idempotency-key", "h")], "/", r#"{"id":7}"#),
            found("7", "json:/id")
        );
        assert_eq!(
            lookup(&body_first, &[("idempotency-key", "h")], "/", "[]"),
            found("h", "header:idempotency-key")
        );
    }

    #[test]
    fn json_keys_are_strings_or_integers_at_the_pointer() {
        let at = |pointer: &str, body: &str| {
            lookup(&[&format!("json:{pointer}")], &[], "/", body).map(|k| k.map(|(key, _)| key))
        };
        assert_eq!(at("/id", r#"{"id": "a\"b\u0041"}"#), Ok(Some("a\"bA".to_owned())));
        assert_eq!(
            at("/id", r#"{"id": 12345678901234567890123}"#),
            Ok(Some("12345678901234567890123".to_owned()))
        );
        assert_eq!(at("/id", r#"{"id": -7}"#), Ok(Some("-7".to_owned())));
        assert_eq!(
            at("/order/items/1/sku", r#"{"order":{"items":[{"sku":"a"},{"sku":"b"}]}}"#),
            Ok(Some("b".to_owned()))
        );
        assert_eq!(at("/a~1b", r#"{"a/b": "x"}"#), Ok(Some("x".to_owned())));
        // No key: not JSON, not there, null, off the end of an array, a scalar on the way.
        for body in [
            "not json",
            "{\"id\": \"x\"",
            "{\"other\": 1}",
            "{\"id\": null}",
            "[]",
            "\"id\"",
            "{\"id\":\"x\"} trailing",
            "{\"id\":\"\\ud800\"}",
        ] {
            assert_eq!(at("/id", body), Ok(None), "{body}");
        }
        assert_eq!(at("/a/0", r#"{"a": [], "b": 1}"#), Ok(None));
        assert_eq!(at("/a/-", r#"{"a": [1]}"#), Ok(None));
        assert_eq!(
            lookup(&["json:/id"], &[], "/", "{\"id\":\"\u{e9}\"}").map(|_| ()),
            Err(KeyError::InvalidCharacter(0).from_source("json:/id"))
        );
    }

    #[test]
    fn bad_json_keys_are_errors_naming_the_source() {
        let err = |body: &str| lookup(&["json:/id"], &[], "/", body).expect_err(body);
        assert_eq!(
            err(r#"{"id": 1.5}"#),
            KeyError::NotStringOrInteger.from_source("json:/id")
        );
        assert_eq!(
            err(r#"{"id": true}"#),
            KeyError::NotStringOrInteger.from_source("json:/id")
        );
        assert_eq!(
            err(r#"{"id": {"x": 1}}"#),
            KeyError::NotStringOrInteger.from_source("json:/id")
        );
        assert_eq!(err(r#"{"id": ""}"#), KeyError::Empty.from_source("json:/id"));
        assert_eq!(
            err(&format!(r#"{{"id": "{}"}}"#, "k".repeat(256))),
            KeyError::TooLong.from_source("json:/id")
        );
        assert_eq!(
            err(r#"{"id": "a", "id": "b"}"#),
            KeyError::Multiple.from_source("json:/id")
        );
        let text = err(r#"{"id": 1e3}"#).to_string();
        assert_eq!(
            text,
            "the idempotency key from `json:/id` is neither a string nor an integer"
        );
    }

    #[test]
    fn header_and_query_errors() {
        assert_eq!(
            lookup(&["header:X-Request-Id"], &[("x-request-id", "a b")], "/", ""),
            Err(KeyError::Whitespace(1).from_source("header:x-request-id"))
        );
        // The default source's errors read as they always have.
        assert_eq!(
            lookup(&["header:Idempotency-Key"], &[("idempotency-key", "")], "/", ""),
            Err(KeyError::Empty)
        );
        assert_eq!(
            lookup(&["query:rid"], &[], "/?rid=a&rid=b", ""),
            Err(KeyError::Multiple.from_source("query:rid"))
        );
    }

    #[test]
    fn storage_keys_by_source() {
        let default = KeySource::default_header();
        let request_id = KeySource::parse("header:X-Request-Id").expect("source");
        assert_eq!(
            storage_key(&default, "idem:", "r", b"s", b"k"),
            StorageKey::new("idem:", "r", b"s", b"k")
        );
        assert_ne!(
            storage_key(&request_id, "idem:", "r", b"s", b"k"),
            StorageKey::new("idem:", "r", b"s", b"k")
        );
        let parsed = parse_as(&KeySource::parse("json:/id").expect("source"), b"\"quoted\"").expect("raw");
        assert_eq!(parsed.as_bytes(), b"\"quoted\"");
        assert_eq!(
            parse_as(&default, b"\"quoted\"").expect("sf-string").as_bytes(),
            b"quoted"
        );
    }
}
