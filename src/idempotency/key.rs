//! The `Idempotency-Key` request header (draft-ietf-httpapi-idempotency-key-header-07 §2).
//!
//! The draft defines the field as an RFC 9651 Item whose value is an sf-string (§3.3.3):
//! `DQUOTE *( unescaped / escaped ) DQUOTE`, where `unescaped` is `%x20-21 / %x23-5B / %x5D-7E`
//! and `escaped` is `"\" ( DQUOTE / "\" )`. Stripe-style clients send the value bare, so a bare
//! value of visible ASCII (`%x21-7E`) without `"`, `\` or whitespace is accepted too.

use std::borrow::Cow;

use http::header::{GetAll, HeaderValue};

/// Name of the request field.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// Longest key accepted, in characters after unquoting.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key was refused. Each is answered with `400` and never forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The field (or query parameter, or body member) appears more than once.
    Multiple,
    Empty,
    TooLong,
    InvalidCharacter(usize),
    Whitespace(usize),
    Unterminated,
    BadEscape(usize),
    TrailingCharacters,
    /// A body member that is a key source holds something other than a string or an integer.
    NotStringOrInteger,
    /// A key from another source than the `Idempotency-Key` header (docs/behaviour.md §13):
    /// `fault`, with the source named (`header:x-request-id`, `json:/client_order_id`).
    Sourced {
        from: Box<str>,
        fault: Box<KeyError>,
    },
}

impl KeyError {
    /// `self` as a fault of the key from `source`.
    pub fn from_source(self, source: &str) -> Self {
        KeyError::Sourced {
            from: source.into(),
            fault: Box::new(self),
        }
    }

    /// What is wrong, without the subject ("is empty").
    fn fault(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow::{Borrowed, Owned};
        match self {
            KeyError::Multiple => Borrowed("appears more than once"),
            KeyError::Empty => Borrowed("is empty"),
            KeyError::TooLong => Owned(format!("is longer than {MAX_KEY_LEN} characters")),
            KeyError::InvalidCharacter(at) => {
                Owned(format!("has a character outside printable ASCII at position {at}"))
            }
            KeyError::Whitespace(at) => Owned(format!(
                "has whitespace at position {at}; a space is allowed only inside a quoted key (\"...\"), a tab nowhere"
            )),
            KeyError::Unterminated => Borrowed("string has no closing quote"),
            KeyError::BadEscape(at) => Owned(format!(
                "string has a bad escape at position {at} (only \\\" and \\\\ are allowed)"
            )),
            KeyError::TrailingCharacters => Borrowed("has characters after its closing quote"),
            KeyError::NotStringOrInteger => Borrowed("is neither a string nor an integer"),
            KeyError::Sourced { fault, .. } => fault.fault(),
        }
    }
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Multiple => f.write_str("the Idempotency-Key header appears more than once"),
            KeyError::Sourced { from, fault } => write!(f, "the idempotency key from `{from}` {}", fault.fault()),
            other => write!(f, "the Idempotency-Key {}", other.fault()),
        }
    }
}

impl std::error::Error for KeyError {}

/// A parsed key: the unquoted characters, borrowed from the header when no unescaping was needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey<'a>(Cow<'a, [u8]>);

impl IdempotencyKey<'_> {
    /// The key's characters (printable ASCII, 1 to 255 of them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl<'a> IdempotencyKey<'a> {
    /// A key taken as it is, without sf-string unquoting: a JSON string or integer, a decoded
    /// query parameter (docs/behaviour.md §13). The rules of a key after unquoting apply: 1 to
    /// 255 printable ASCII characters.
    pub fn raw(value: Cow<'a, [u8]>) -> Result<Self, KeyError> {
        if value.is_empty() {
            return Err(KeyError::Empty);
        }
        if value.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        match value.iter().position(|b| !(0x20..=0x7e).contains(b)) {
            Some(at) => Err(KeyError::InvalidCharacter(at)),
            None => Ok(IdempotencyKey(value)),
        }
    }

    /// The key, owning its characters.
    pub fn into_owned(self) -> IdempotencyKey<'static> {
        IdempotencyKey(Cow::Owned(self.0.into_owned()))
    }
}

/// Reads the key from a request's `Idempotency-Key` fields: `Ok(None)` when there is none,
/// an error when there are several or the one is malformed.
pub fn from_fields(fields: GetAll<'_, HeaderValue>) -> Result<Option<IdempotencyKey<'_>>, KeyError> {
    let mut iter = fields.iter();
    let Some(first) = iter.next() else {
        return Ok(None);
    };
    if iter.next().is_some() {
        return Err(KeyError::Multiple);
    }
    parse(first.as_bytes()).map(Some)
}

/// Parses one field value (RFC 9651 §4.2.5 for the quoted form; OWS around it is trimmed).
pub fn parse(value: &[u8]) -> Result<IdempotencyKey<'_>, KeyError> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = if value[0] == b'"' {
        parse_sf_string(value)?
    } else {
        parse_bare(value)?
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(IdempotencyKey(key))
}

fn parse_bare(value: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    if value.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    match value
        .iter()
        .position(|&b| !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'\\')
    {
        Some(pos) if value[pos].is_ascii_whitespace() => Err(KeyError::Whitespace(pos)),
        Some(pos) => Err(KeyError::InvalidCharacter(pos)),
        None => Ok(Cow::Borrowed(value)),
    }
}

fn parse_sf_string(value: &[u8]) -> Result<Cow<'_, [u8]>, KeyError> {
    let inner = &value[1..];
    // Fast path: no escapes, the closing quote ends the value.
    let mut owned: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        match b {
            b'"' => {
                if i + 1 != inner.len() {
                    return Err(KeyError::TrailingCharacters);
                }
                return Ok(match owned {
                    Some(v) => Cow::Owned(v),
                    None => Cow::Borrowed(&inner[..i]),
                });
            }
            b'\\' => {
                let next = *inner.get(i + 1).ok_or(KeyError::Unterminated)?;
                if next != b'"' && next != b'\\' {
                    return Err(KeyError::BadEscape(i + 2));
                }
                let buf = owned.get_or_insert_with(|| inner[..i].to_vec());
                buf.push(next);
                i += 2;
                continue;
            }
            0x20..=0x7e => {
                if let Some(buf) = owned.as_mut() {
                    buf.push(b);
                }
            }
            b'\t' => return Err(KeyError::Whitespace(i + 1)),
            _ => return Err(KeyError::InvalidCharacter(i + 1)),
        }
        if owned.as_ref().is_some_and(|v| v.len() > MAX_KEY_LEN) || i >= MAX_KEY_LEN * 2 + 2 {
            return Err(KeyError::TooLong);
        }
        i += 1;
    }
    Err(KeyError::Unterminated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> Result<Vec<u8>, KeyError> {
        parse(s.as_bytes()).map(|k| k.as_bytes().to_vec())
    }

    #[test]
    fn quoted_and_bare_forms() {
        assert_eq!(
            key("\"8e03978e-40d5-43e8-bc93-6894a57f9324\""),
            Ok(b"8e03978e-40d5-43e8-bc93-6894a57f9324".to_vec())
        );
        assert_eq!(key("order-42"), Ok(b"order-42".to_vec()));
        assert_eq!(key("  \"a b\"  "), Ok(b"a b".to_vec()));
        assert_eq!(key(r#""a\"b\\c""#), Ok(br#"a"b\c"#.to_vec()));
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(key(""), Err(KeyError::Empty));
        assert_eq!(key("\"\""), Err(KeyError::Empty));
        assert_eq!(key("\"abc"), Err(KeyError::Unterminated));
        assert_eq!(key("\"abc\\"), Err(KeyError::Unterminated));
        assert_eq!(key("\"a\\nb\""), Err(KeyError::BadEscape(3)));
        assert_eq!(key("\"abc\";x=1"), Err(KeyError::TrailingCharacters));
        assert_eq!(key("\"a\", \"b\""), Err(KeyError::TrailingCharacters));
        assert_eq!(key("a b"), Err(KeyError::Whitespace(1)));
        assert_eq!(key("\"a\tb\""), Err(KeyError::Whitespace(2)));
        assert!(KeyError::Whitespace(1).to_string().contains("whitespace at position 1"));
        assert!(matches!(key("ab\"c"), Err(KeyError::InvalidCharacter(2))));
        assert_eq!(key(&"k".repeat(256)), Err(KeyError::TooLong));
        assert_eq!(key(&format!("\"{}\"", "k".repeat(256))), Err(KeyError::TooLong));
        assert_eq!(key(&"k".repeat(255)).map(|k| k.len()), Ok(255));
        assert_eq!(
            parse(b"\"caf\xc3\xa9\"").map(|_| ()),
            Err(KeyError::InvalidCharacter(4))
        );
    }

    #[test]
    fn raw_keys_follow_the_unquoted_rules() {
        let raw = |s: &str| IdempotencyKey::raw(Cow::Owned(s.as_bytes().to_vec())).map(|k| k.as_bytes().to_vec());
        assert_eq!(raw("ord 42"), Ok(b"ord 42".to_vec()));
        assert_eq!(raw("\"q\\"), Ok(b"\"q\\".to_vec()));
        assert_eq!(raw(""), Err(KeyError::Empty));
        assert_eq!(raw(&"k".repeat(256)), Err(KeyError::TooLong));
        assert_eq!(raw("a\tb"), Err(KeyError::InvalidCharacter(1)));
        assert_eq!(raw("caf\u{e9}"), Err(KeyError::InvalidCharacter(3)));
    }

    #[test]
    fn errors_name_their_source() {
        assert_eq!(KeyError::Empty.to_string(), "the Idempotency-Key is empty");
        assert_eq!(
            KeyError::Multiple.to_string(),
            "the Idempotency-Key header appears more than once"
        );
        let sourced = KeyError::TooLong.from_source("json:/client_order_id");
        assert_eq!(
            sourced.to_string(),
            "the idempotency key from `json:/client_order_id` is longer than 255 characters"
        );
        assert!(KeyError::Whitespace(1)
            .from_source("header:x-request-id")
            .to_string()
            .ends_with("a tab nowhere"));
    }

    #[test]
    fn several_fields_are_refused() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(from_fields(headers.get_all(IDEMPOTENCY_KEY)), Ok(None));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert!(matches!(from_fields(headers.get_all(IDEMPOTENCY_KEY)), Ok(Some(_))));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(from_fields(headers.get_all(IDEMPOTENCY_KEY)), Err(KeyError::Multiple));
    }

    /// Serialises a key as an RFC 9651 sf-string (§4.1.6).
    fn quote(raw: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in raw {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
        out
    }

    proptest! {
        #[test]
        fn any_printable_key_round_trips_through_sf_string(raw in proptest::collection::vec(0x20u8..=0x7e, 1..=255)) {
            let quoted = quote(&raw);
            let parsed = parse(&quoted);
            prop_assert_eq!(parsed.map(|k| k.as_bytes().to_vec()), Ok(raw));
        }

        #[test]
        fn bare_tokens_parse_to_themselves(raw in "[!#-\\[\\]-~]{1,255}") {
            prop_assert_eq!(key(&raw), Ok(raw.into_bytes()));
        }

        #[test]
        fn parser_never_panics_and_accepts_only_valid_keys(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(k) = parse(&bytes) {
                let k = k.as_bytes();
                prop_assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN);
                prop_assert!(k.iter().all(|b| (0x20..=0x7e).contains(b)));
            }
        }

        #[test]
        fn longer_than_255_is_always_refused(raw in proptest::collection::vec(0x21u8..=0x7e, 256..400)) {
            prop_assert!(parse(&quote(&raw)).is_err());
        }
    }
}
