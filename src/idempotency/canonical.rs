//! The canonical form of a JSON request body, for fingerprints that ignore key order and
//! whitespace (docs/behaviour.md §13): RFC 8785 (JSON Canonicalization Scheme) with one
//! deliberate difference, numbers keep their text as sent.
//!
//! RFC 8785 §3.2.2.3 writes every number as the shortest text of its IEEE 754 double, so
//! `9007199254740993` and `9007199254740992` (or two 20-digit ids) would canonicalise alike, and
//! a changed amount or id would replay instead of getting `422`. Here a number is copied as it
//! was sent: `1.0`, `1` and `1e0` are three different requests (a client that re-serialises
//! its numbers differently gets `422`, never a wrong replay). Everything else is RFC 8785:
//! no whitespace (§3.2.1), strings re-escaped as ECMAScript's `JSON.stringify` does (§3.2.2.2),
//! object members sorted by the UTF-16 code units of their names (§3.2.3), array order kept.
//!
//! The body is validated by `serde_json` first (RFC 8259 grammar, nesting at most 128 deep),
//! and as UTF-8; escaped strings are decoded by `serde_json` too (a lone surrogate is refused).
//! The writer here only walks text known to be JSON. A body that is not JSON, or not I-JSON
//! (RFC 7493: a repeated member name, a lone surrogate), has no canonical form: its fingerprint
//! is taken over its bytes. Nothing here panics on any input (fuzzed: `fuzz/`).

use std::borrow::Cow;
use std::cmp::Ordering;

use serde::de::IgnoredAny;

use crate::config::{JsonPointer, PointerToken};

/// Deepest nesting walked; `serde_json` refuses deeper documents before this is reached.
const MAX_DEPTH: usize = 128;

/// The canonical form of `body` with the values at `ignore` left out, or `None` when `body` is
/// not I-JSON.
pub fn canonical_json(body: &[u8], ignore: &[JsonPointer]) -> Option<Vec<u8>> {
    serde_json::from_slice::<IgnoredAny>(body).ok()?;
    let text = std::str::from_utf8(body).ok()?;
    let mut writer = Writer {
        text,
        pos: 0,
        out: Vec::with_capacity(body.len()),
        members: Vec::new(),
        scratch: Vec::new(),
    };
    let filters: Vec<&[PointerToken]> = ignore.iter().map(JsonPointer::tokens).collect();
    writer.value(&filters, 0)?;
    writer.skip_whitespace();
    (writer.pos == text.len()).then_some(writer.out)
}

/// Walks JSON text that `serde_json` accepted, writing its canonical form to `out`.
struct Writer<'a> {
    text: &'a str,
    pos: usize,
    out: Vec<u8>,
    /// The members of the objects being written, innermost last: each object's own from the
    /// length this had when it began (a stack shared by all, so no object allocates its own).
    members: Vec<Member<'a>>,
    /// Where an object's members are copied while they are put in order (reused).
    scratch: Vec<u8>,
}

/// An object member: its name, and where `"name":value` was written in `out`.
type Member<'a> = (Cow<'a, str>, std::ops::Range<usize>);

/// What is left of the ignored pointers at the current depth: a value whose filter is empty is
/// the one to leave out.
type Filters<'p> = [&'p [PointerToken]];

impl<'a> Writer<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn value(&mut self, filters: &Filters<'_>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_whitespace();
        match self.peek()? {
            b'{' => self.object(filters, depth + 1),
            b'[' => self.array(filters, depth + 1),
            b'"' => {
                let string = self.string()?;
                write_string(string, &mut self.out);
                Some(())
            }
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        let rest = self.text.get(self.pos..)?;
        rest.starts_with(word).then_some(())?;
        self.out.extend_from_slice(word.as_bytes());
        self.pos += word.len();
        Some(())
    }

    /// A number, copied as written (the one departure from RFC 8785, see the module docs).
    fn number(&mut self) -> Option<()> {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')) {
            self.pos += 1;
        }
        let number = self.text.get(start..self.pos).filter(|n| !n.is_empty())?;
        self.out.extend_from_slice(number.as_bytes());
        Some(())
    }

    /// A string token, unescaped: borrowed when it has no escapes.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let bytes = self.text.as_bytes();
        let start = self.pos;
        let mut at = start + 1;
        let mut escaped = false;
        loop {
            at += bytes.get(at..)?.iter().position(|&b| b == b'"' || b == b'\\')?;
            if *bytes.get(at)? == b'"' {
                break;
            }
            escaped = true;
            at += 2;
        }
        self.pos = at + 1;
        if escaped {
            // serde_json decodes the escapes, surrogate pairs included (a lone one is refused).
            serde_json::from_str::<String>(self.text.get(start..=at)?)
                .ok()
                .map(Cow::Owned)
        } else {
            self.text.get(start + 1..at).map(Cow::Borrowed)
        }
    }

    fn consume(&mut self, byte: u8) -> Option<()> {
        self.skip_whitespace();
        (self.peek()? == byte).then_some(())?;
        self.pos += 1;
        Some(())
    }

    /// Ends one member or element: `,` (then `true`), or the closing `close` (then `false`).
    fn next_item(&mut self, close: u8) -> Option<bool> {
        self.skip_whitespace();
        match self.peek()? {
            b',' => {
                self.pos += 1;
                Some(true)
            }
            b if b == close => {
                self.pos += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// An object: its members written `"name":value` in arrival order, then, unless they
    /// already are, rewritten in RFC 8785 §3.2.3 order. A repeated name is not I-JSON.
    fn object(&mut self, filters: &Filters<'_>, depth: usize) -> Option<()> {
        self.pos += 1;
        self.out.push(b'{');
        let start = self.out.len();
        let base = self.members.len();
        self.skip_whitespace();
        let mut more = self.peek()? != b'}';
        if !more {
            self.pos += 1;
        }
        while more {
            self.skip_whitespace();
            let name = self.string()?;
            self.consume(b':')?;
            let inner: Vec<&[PointerToken]> = filters
                .iter()
                .filter(|p| p.first().is_some_and(|t| *t.name == *name))
                .map(|p| &p[1..])
                .collect();
            let mark = self.out.len();
            if self.members.len() > base {
                self.out.push(b',');
            }
            let member_start = self.out.len();
            match &name {
                Cow::Borrowed(unescaped) => write_string(Cow::Borrowed(unescaped), &mut self.out),
                Cow::Owned(decoded) => write_escaped(decoded, &mut self.out),
            }
            self.out.push(b':');
            self.value(&inner, depth)?;
            if inner.iter().any(|p| p.is_empty()) {
                self.out.truncate(mark);
            } else {
                self.members.push((name, member_start..self.out.len()));
            }
            more = self.next_item(b'}')?;
        }
        let in_order = self.members[base..]
            .windows(2)
            .all(|w| utf16_cmp(&w[0].0, &w[1].0) == Ordering::Less);
        if !in_order {
            self.reorder(start, base)?;
        }
        self.members.truncate(base);
        self.out.push(b'}');
        Some(())
    }

    /// Rewrites the members written from `start` (listed from `base` on) in sorted order;
    /// `None` on a repeated name.
    fn reorder(&mut self, start: usize, base: usize) -> Option<()> {
        let members = self.members.get_mut(base..)?;
        members.sort_by(|a, b| utf16_cmp(&a.0, &b.0));
        if members.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(self.out.get(start..)?);
        self.out.truncate(start);
        for (i, (_, range)) in members.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out
                .extend_from_slice(self.scratch.get(range.start - start..range.end - start)?);
        }
        Some(())
    }

    fn array(&mut self, filters: &Filters<'_>, depth: usize) -> Option<()> {
        self.pos += 1;
        self.out.push(b'[');
        self.skip_whitespace();
        let mut more = self.peek()? != b']';
        if !more {
            self.pos += 1;
        }
        let (mut index, mut written) = (0usize, 0usize);
        while more {
            let inner: Vec<&[PointerToken]> = filters
                .iter()
                .filter(|p| p.first().is_some_and(|t| t.index == Some(index)))
                .map(|p| &p[1..])
                .collect();
            let mark = self.out.len();
            if written > 0 {
                self.out.push(b',');
            }
            self.value(&inner, depth)?;
            if inner.iter().any(|p| p.is_empty()) {
                self.out.truncate(mark);
            } else {
                written += 1;
            }
            index += 1;
            more = self.next_item(b']')?;
        }
        self.out.push(b']');
        Some(())
    }
}

/// RFC 8785 §3.2.3: member names compare as arrays of UTF-16 code units. UTF-8 bytes compare
/// as code points do, which is the same order except between a character above U+FFFF (a
/// surrogate pair in UTF-16) and one in U+E000-U+FFFF: the bytes decide, unless the names
/// first differ at two non-ASCII bytes.
fn utf16_cmp(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    match x.iter().zip(y).position(|(p, q)| p != q) {
        None => x.len().cmp(&y.len()),
        Some(at) if x[at] < 0x80 || y[at] < 0x80 => x[at].cmp(&y[at]),
        Some(_) => a.encode_utf16().cmp(b.encode_utf16()),
    }
}

/// Writes a string token: one that had no escapes in the body (`Cow::Borrowed` from it) is
/// copied, as JSON allows the characters RFC 8785 escapes only escaped; a decoded one is
/// escaped again ([`write_escaped`]).
fn write_string(s: Cow<'_, str>, out: &mut Vec<u8>) {
    match s {
        Cow::Borrowed(unescaped) => {
            out.push(b'"');
            out.extend_from_slice(unescaped.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(decoded) => write_escaped(&decoded, out),
    }
}

/// RFC 8785 §3.2.2.2 (ECMAScript `JSON.stringify`): `"` and `\` escaped, control characters
/// as `\b \t \n \f \r` or `\u00xx` (lowercase hex), everything else as is.
fn write_escaped(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x09 => b't',
            0x0a => b'n',
            0x0c => b'f',
            0x0d => b'r',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        if short == 0 {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canonical(body: &str) -> Option<String> {
        canonical_json(body.as_bytes(), &[]).map(|c| String::from_utf8(c).expect("UTF-8"))
    }

    fn canonical_ignoring(body: &str, ignore: &[&str]) -> Option<String> {
        let ignore: Vec<JsonPointer> = ignore.iter().map(|p| JsonPointer::parse(p).expect("pointer")).collect();
        canonical_json(body.as_bytes(), &ignore).map(|c| String::from_utf8(c).expect("UTF-8"))
    }

    /// RFC 8785 §3.2.2's example, whose output is the RFC's except the numbers, kept as sent.
    #[test]
    fn rfc_8785_primitive_data_types_example() {
        let input = r#"{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"#;
        let rfc_except_numbers = concat!(
            r#"{"literals":[null,true,false],"#,
            r#""numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],"#,
            r#""string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
        assert_eq!(canonical(input).as_deref(), Some(rfc_except_numbers));
    }

    /// RFC 8785 §3.2.3's sorting example: UTF-16 code units, not code points or UTF-8 bytes
    /// (the emoji, a surrogate pair, sorts before U+FB33).
    #[test]
    fn rfc_8785_sorting_example() {
        let input = r#"{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}"#;
        let expected = concat!(
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",",
            "\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",",
            "\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        assert_eq!(canonical(input).as_deref(), Some(expected));
    }

    #[test]
    fn names_compare_as_utf16() {
        for (a, b) in [
            ("a", "b"),
            ("a", "ab"),
            ("Z", "a"),
            ("a", "\u{e9}"),
            ("\u{1f600}", "\u{fb33}"),
            ("x\u{1f600}", "x\u{ffff}"),
        ] {
            assert_eq!(utf16_cmp(a, b), Ordering::Less, "{a:?} < {b:?}");
            assert_eq!(utf16_cmp(b, a), Ordering::Greater, "{b:?} > {a:?}");
            assert_eq!(utf16_cmp(a, b), a.encode_utf16().cmp(b.encode_utf16()));
        }
        assert_eq!(utf16_cmp("\u{e9}t\u{e9}", "\u{e9}t\u{e9}"), Ordering::Equal);
    }

    #[test]
    fn numbers_keep_their_text() {
        // As doubles these are equal; as requests they are not.
        assert_ne!(
            canonical("{\"amount\":9007199254740993}"),
            canonical("{\"amount\":9007199254740992}")
        );
        assert_eq!(
            canonical("[ 12345678901234567890123, -0, 1.0, 1e0 ]").as_deref(),
            Some("[12345678901234567890123,-0,1.0,1e0]")
        );
    }

    #[test]
    fn ignored_pointers_are_left_out() {
        let body =
            r#"{"sent_at": 1, "order": {"id": "a", "meta": {"trace": "x"}}, "items": [{"ts": 1, "sku": "b"}, 7]}"#;
        assert_eq!(
            canonical_ignoring(
                body,
                &["/sent_at", "/order/meta/trace", "/items/0/ts", "/items/1", "/absent"]
            )
            .as_deref(),
            Some(r#"{"items":[{"sku":"b"}],"order":{"id":"a","meta":{}}}"#)
        );
        assert_eq!(canonical_ignoring(body, &["/items/-"]), canonical(body));
        assert_eq!(
            canonical_ignoring(r#"{"a/b": 1, "m~n": 2, "c": 3}"#, &["/a~1b", "/m~0n"]).as_deref(),
            Some(r#"{"c":3}"#)
        );
    }

    #[test]
    fn what_is_not_i_json_has_no_canonical_form() {
        for body in [
            "",
            "{",
            "{\"a\":1,}",
            "[1 2]",
            "{\"a\":1,\"a\":2}",
            "{\"a\":1,\"\\u0061\":2}",
            "\"\\ud800\"",
            "01",
            "NaN",
            "{} {}",
            "\"\u{1}\"",
        ] {
            assert_eq!(canonical(body), None, "{body:?}");
        }
        assert_eq!(canonical_json(b"\"\xff\"", &[]), None);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(canonical(&deep), None);
        assert_eq!(canonical(" \"x\" ").as_deref(), Some("\"x\""));
        assert_eq!(canonical("{ }").as_deref(), Some("{}"));
        assert_eq!(canonical("[ ]").as_deref(), Some("[]"));
    }

    /// A JSON value to serialise in different ways.
    #[derive(Debug, Clone)]
    enum Json {
        Null,
        Bool(bool),
        Number(String),
        Text(String),
        Array(Vec<Json>),
        Object(Vec<(String, Json)>),
    }

    fn json() -> impl Strategy<Value = Json> {
        let number = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "-?[1-9][0-9]{15,30}",
            "-?(0|[1-9][0-9]{0,5})\\.[0-9]{1,6}([eE][+-]?[0-9]{1,2})?",
        ];
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            number.prop_map(Json::Number),
            any::<String>().prop_map(Json::Text),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|members| Json::Object(members.into_iter().collect())),
            ]
        })
    }

    /// Serialises `value` with members in an order picked by `seed` and whitespace from `ws`.
    fn write(value: &Json, seed: &mut u64, ws: &str, out: &mut String) {
        let mut next = || {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*seed >> 33) as usize
        };
        match value {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(n),
            Json::Text(s) => out.push_str(&serde_json::to_string(s).expect("a string serialises")),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(ws);
                    write(item, seed, ws, out);
                }
                out.push(']');
            }
            Json::Object(members) => {
                let mut order: Vec<usize> = (0..members.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, next() % (i + 1));
                }
                out.push('{');
                for (n, &i) in order.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(ws);
                    out.push_str(&serde_json::to_string(&members[i].0).expect("a name serialises"));
                    out.push_str(ws);
                    out.push(':');
                    write(&members[i].1, seed, ws, out);
                    out.push_str(ws);
                }
                out.push('}');
            }
        }
    }

    proptest! {
        /// Key order and whitespace do not change the canonical form, which is JSON of the same
        /// value and its own canonical form.
        #[test]
        fn canonical_form_ignores_key_order_and_whitespace(
            value in json(), seed in any::<u64>(), ws in "[ \t\r\n]{0,3}"
        ) {
            let (mut plain, mut shuffled) = (String::new(), String::new());
            write(&value, &mut 0, "", &mut plain);
            write(&value, &mut seed.clone(), &ws, &mut shuffled);
            let expected = canonical(&plain).expect("canonical");
            prop_assert_eq!(canonical(&shuffled), Some(expected.clone()));
            prop_assert_eq!(canonical(&expected), Some(expected.clone()));
            let parsed: serde_json::Value = serde_json::from_str(&expected).expect("canonical form is JSON");
            prop_assert_eq!(parsed, serde_json::from_str::<serde_json::Value>(&plain).expect("JSON"));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = canonical_json(&bytes, &[]);
        }

        #[test]
        fn utf16_order_of_any_names(a in any::<String>(), b in any::<String>()) {
            prop_assert_eq!(utf16_cmp(&a, &b), a.encode_utf16().cmp(b.encode_utf16()));
        }
    }
}
