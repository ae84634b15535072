//! The value types of the settings for clients that cannot change (docs/behaviour.md §13-§14):
//! where a request's key comes from ([`KeySource`]), RFC 6901 JSON pointers ([`JsonPointer`]),
//! and sets of upstream statuses ([`StatusSet`]). Parsed once at start-up; the request path
//! reads them as they are.

use std::fmt;

use http::{HeaderName, StatusCode};

/// The header every route takes its key from unless configured otherwise (docs/behaviour.md §2).
pub const DEFAULT_KEY_HEADER: &str = "idempotency-key";

/// An RFC 6901 JSON pointer to a value inside a document, other than the whole document:
/// `/client_order_id`, `/payment/id`, `/items/0/sku`. `~1` stands for `/` and `~0` for `~`
/// within a reference token (RFC 6901 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: Box<str>,
    tokens: Box<[PointerToken]>,
}

/// One reference token of a [`JsonPointer`], unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerToken {
    /// The member name it selects in an object.
    pub name: Box<str>,
    /// The element it selects in an array: set when the token is an RFC 6901 §4 array index
    /// (`0`, or digits without a leading zero); `-` and anything else select no element.
    pub index: Option<usize>,
}

impl JsonPointer {
    /// Parses `text` (RFC 6901 §3). The empty pointer (the whole document) is refused: every
    /// use here names a value inside the document.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err(
                "the empty pointer names the whole document; name a value inside it, like /client_order_id".into(),
            );
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "`{text}` is not a JSON pointer: it must start with `/` (RFC 6901)"
            ));
        };
        let tokens = rest
            .split('/')
            .map(|raw| {
                unescape_token(raw).map_err(|()| {
                    format!("`{text}` is not a JSON pointer: `~` must be followed by `0` or `1` (RFC 6901 §3)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            text: text.into(),
            tokens: tokens.into(),
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its reference tokens, outermost first (never empty).
    pub fn tokens(&self) -> &[PointerToken] {
        &self.tokens
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// RFC 6901 §4: `~1` becomes `/`, then `~0` becomes `~`; any other `~` is an error.
fn unescape_token(raw: &str) -> Result<PointerToken, ()> {
    let mut name = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '~' => match chars.next() {
                Some('0') => name.push('~'),
                Some('1') => name.push('/'),
                _ => return Err(()),
            },
            c => name.push(c),
        }
    }
    Ok(PointerToken {
        index: array_index(&name),
        name: name.into(),
    })
}

/// `array-index = %x30 / ( %x31-39 *(%x30-39) )` (RFC 6901 §4), if it fits a `usize`.
fn array_index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// Where a request's key is taken from (docs/behaviour.md §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    kind: SourceKind,
    /// The source as it scopes storage keys and as the admin `?source=` names it:
    /// `header:` + the lowercase header name, `json:` + the pointer, `query:` + the name.
    label: Box<str>,
}

/// The three kinds of [`KeySource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A request header, parsed as the `Idempotency-Key` is (docs/behaviour.md §2).
    Header(HeaderName),
    /// A string or integer in the JSON request body, at this pointer.
    Json(JsonPointer),
    /// A query parameter, percent-decoded.
    Query(Box<str>),
}

impl KeySource {
    /// Parses `header:NAME`, `json:/pointer` or `query:NAME`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let kind = match spec.split_once(':') {
            Some(("header", name)) => SourceKind::Header(
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("`{spec}`: `{name}` is not a header name"))?,
            ),
            Some(("json", pointer)) => {
                SourceKind::Json(JsonPointer::parse(pointer).map_err(|e| format!("`{spec}`: {e}"))?)
            }
            Some(("query", name)) if !name.is_empty() => SourceKind::Query(name.into()),
            Some(("query", _)) => return Err(format!("`{spec}`: the query parameter has no name")),
            Some((kind, _)) => {
                return Err(format!(
                    "`{spec}`: unknown key source kind `{kind}` (expected header:NAME, json:/pointer or query:NAME)"
                ))
            }
            None => {
                return Err(format!(
                    "`{spec}` is not a key source (expected header:NAME, json:/pointer or query:NAME)"
                ))
            }
        };
        Ok(Self::new(kind))
    }

    /// The `Idempotency-Key` header: the default source.
    pub fn default_header() -> Self {
        Self::new(SourceKind::Header(HeaderName::from_static(DEFAULT_KEY_HEADER)))
    }

    fn new(kind: SourceKind) -> Self {
        let label = match &kind {
            SourceKind::Header(name) => format!("header:{name}"),
            SourceKind::Json(pointer) => format!("json:{pointer}"),
            SourceKind::Query(name) => format!("query:{name}"),
        };
        Self {
            kind,
            label: label.into(),
        }
    }

    pub fn kind(&self) -> &SourceKind {
        &self.kind
    }

    /// `header:idempotency-key`, `json:/client_order_id`, `query:request_id`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether this is the default source, whose keys have exactly the storage key of
    /// docs/behaviour.md §3 (records written before key sources existed keep matching).
    pub fn is_default(&self) -> bool {
        matches!(&self.kind, SourceKind::Header(name) if name == DEFAULT_KEY_HEADER)
    }

    /// Whether the key is looked for in the request body.
    pub fn reads_body(&self) -> bool {
        matches!(self.kind, SourceKind::Json(_))
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A set of HTTP status codes (100-599), as one bit each: `contains` is a shift and a mask.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    /// The set of `codes`; each must lie within 100-599 (else that code is the error).
    pub fn of(codes: &[u16]) -> Result<Self, u16> {
        let mut set = Self::default();
        for &code in codes {
            if !(100..=599).contains(&code) {
                return Err(code);
            }
            set.0[usize::from(code / 64)] |= 1 << (code % 64);
        }
        Ok(set)
    }

    pub fn contains(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.0
            .get(usize::from(code / 64))
            .is_some_and(|word| word & (1 << (code % 64)) != 0)
    }

    /// The codes, ascending.
    pub fn codes(&self) -> impl Iterator<Item = u16> {
        let words = self.0;
        (100u16..=599).filter(move |&code| words[usize::from(code / 64)] & (1 << (code % 64)) != 0)
    }

    /// The lowest code in both `self` and `other`.
    pub fn overlap(&self, other: &StatusSet) -> Option<u16> {
        let mut both = *self;
        for (word, keep) in both.0.iter_mut().zip(other.0) {
            *word &= keep;
        }
        both.codes().next()
    }

    /// The codes of `self` that are not in `other`.
    pub fn without(&self, other: &StatusSet) -> StatusSet {
        let mut out = *self;
        for (word, remove) in out.0.iter_mut().zip(other.0) {
            *word &= !remove;
        }
        out
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.codes()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_follow_rfc_6901() {
        let pointer = JsonPointer::parse("/a~1b/m~0n/0/01/-").expect("valid");
        let names: Vec<&str> = pointer.tokens().iter().map(|t| &*t.name).collect();
        assert_eq!(names, ["a/b", "m~n", "0", "01", "-"]);
        let indexes: Vec<Option<usize>> = pointer.tokens().iter().map(|t| t.index).collect();
        assert_eq!(indexes, [None, None, Some(0), None, None]);
        assert_eq!(pointer.as_str(), "/a~1b/m~0n/0/01/-");
        assert_eq!(
            JsonPointer::parse("/").expect("the empty member name").tokens()[0]
                .name
                .as_ref(),
            ""
        );
        for bad in ["", "a", "/a~", "/a~2", "/~x"] {
            assert!(JsonPointer::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources_parse_and_label_themselves() {
        let header = KeySource::parse("header:X-Request-Id").expect("valid");
        assert_eq!(header.label(), "header:x-request-id");
        assert!(!header.is_default());
        assert!(KeySource::parse("header:Idempotency-Key").expect("valid").is_default());
        assert_eq!(KeySource::default_header().label(), "header:idempotency-key");
        let json = KeySource::parse("json:/client_order_id").expect("valid");
        assert!(json.reads_body());
        assert_eq!(json.to_string(), "json:/client_order_id");
        assert_eq!(KeySource::parse("query:rid").expect("valid").label(), "query:rid");
        for bad in [
            "cookie:x",
            "header:bad name",
            "json:client_order_id",
            "query:",
            "Idempotency-Key",
        ] {
            assert!(KeySource::parse(bad).is_err(), "{bad}");
        }
        assert!(KeySource::parse("cookie:x")
            .expect_err("unknown")
            .contains("unknown key source kind `cookie`"));
    }

    #[test]
    fn status_sets() {
        let set = StatusSet::of(&[429, 503, 100, 599]).expect("valid");
        for code in [100, 429, 503, 599] {
            assert!(set.contains(StatusCode::from_u16(code).expect("status")), "{code}");
        }
        assert!(!set.contains(StatusCode::from_u16(500).expect("status")));
        assert_eq!(set.codes().collect::<Vec<_>>(), [100, 429, 503, 599]);
        assert_eq!(StatusSet::of(&[99]), Err(99));
        assert_eq!(StatusSet::of(&[600]), Err(600));
        let fewer = set.without(&StatusSet::of(&[503]).expect("valid"));
        assert_eq!(fewer.codes().collect::<Vec<_>>(), [100, 429, 599]);
        assert_eq!(set.overlap(&StatusSet::of(&[503, 429]).expect("valid")), Some(429));
        assert_eq!(fewer.overlap(&StatusSet::of(&[503]).expect("valid")), None);
        assert!(!StatusSet::default().contains(StatusCode::from_u16(999).expect("status")));
    }
}
