//! The `Content-Digest` field (RFC 9530): an RFC 9651 Dictionary whose members are byte
//! sequences, one per algorithm. Only `sha-256` is used (docs/behaviour.md §15.3); other
//! members are parsed, to tell a valid field from a malformed one, and ignored.

use http::HeaderMap;

/// The field's name (RFC 9530 §2).
pub const CONTENT_DIGEST: &str = "content-digest";

/// The `sha-256` digest a request declares for its body: `Ok(None)` without a
/// `Content-Digest`, or with one that has no `sha-256` member. `Err` names what is malformed.
pub fn declared_sha256(headers: &HeaderMap) -> Result<Option<[u8; 32]>, &'static str> {
    let mut values = headers.get_all(CONTENT_DIGEST).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut sha256 = None;
    // Several field lines are one list, joined by commas (RFC 9110 §5.3; RFC 9651 §4.2).
    for value in values {
        let mut parser = Parser {
            input: value.as_bytes(),
            pos: 0,
        };
        parser.skip_sp();
        while !parser.at_end() {
            let is_sha256 = parser.key()? == b"sha-256";
            let member = parser.member_value()?;
            // A later member of the same name wins (RFC 9651 §4.2.2).
            if is_sha256 {
                sha256 = Some(member);
            }
            parser.skip_ows();
            if parser.at_end() {
                break;
            }
            parser.expect(b',', "members must be separated by commas")?;
            parser.skip_ows();
            if parser.at_end() {
                return Err("a trailing comma");
            }
        }
    }
    match sha256 {
        None => Ok(None),
        Some(Member::Bytes(bytes)) => bytes
            .try_into()
            .map(Some)
            .map_err(|_| "the sha-256 digest is not 32 bytes long"),
        Some(Member::Other) => Err("the sha-256 member is not a byte sequence (:base64:)"),
    }
}

/// A dictionary member's value, as far as this field needs it.
enum Member {
    Bytes(Vec<u8>),
    Other,
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn expect(&mut self, byte: u8, problem: &'static str) -> Result<(), &'static str> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(problem)
        }
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// A key (RFC 9651 §4.2.3.3): `lcalpha / "*"`, then `lcalpha / DIGIT / "_-.*"`.
    fn key(&mut self) -> Result<&[u8], &'static str> {
        let start = self.pos;
        match self.peek() {
            Some(b'a'..=b'z' | b'*') => self.pos += 1,
            _ => return Err("a member name must start with a lowercase letter or '*'"),
        }
        while matches!(self.peek(), Some(b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')) {
            self.pos += 1;
        }
        Ok(&self.input[start..self.pos])
    }

    /// After a key: `=` and an item or inner list, or parameters alone (the value `true`).
    fn member_value(&mut self) -> Result<Member, &'static str> {
        if self.peek() != Some(b'=') {
            self.parameters()?;
            return Ok(Member::Other);
        }
        self.pos += 1;
        let member = if self.peek() == Some(b'(') {
            self.inner_list()?;
            Member::Other
        } else {
            self.bare_item()?
        };
        self.parameters()?;
        Ok(member)
    }

    fn inner_list(&mut self) -> Result<(), &'static str> {
        self.pos += 1;
        loop {
            self.skip_sp();
            if self.peek() == Some(b')') {
                self.pos += 1;
                return Ok(());
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return Err("an inner list is malformed");
            }
        }
    }

    fn parameters(&mut self) -> Result<(), &'static str> {
        while self.peek() == Some(b';') {
            self.pos += 1;
            self.skip_sp();
            self.key()?;
            if self.peek() == Some(b'=') {
                self.pos += 1;
                self.bare_item()?;
            }
        }
        Ok(())
    }

    /// A bare item (RFC 9651 §4.2.3.1); only a byte sequence keeps its value.
    fn bare_item(&mut self) -> Result<Member, &'static str> {
        match self.peek() {
            Some(b':') => self.byte_sequence().map(Member::Bytes),
            Some(b'"') => self.string().map(|()| Member::Other),
            Some(b'%') => {
                self.pos += 1;
                self.string().map(|()| Member::Other)
            }
            Some(b'?') => {
                self.pos += 1;
                match self.peek() {
                    Some(b'0' | b'1') => {
                        self.pos += 1;
                        Ok(Member::Other)
                    }
                    _ => Err("a boolean must be ?0 or ?1"),
                }
            }
            Some(b'@') => {
                self.pos += 1;
                self.number().map(|()| Member::Other)
            }
            Some(b'-' | b'0'..=b'9') => self.number().map(|()| Member::Other),
            Some(b'A'..=b'Z' | b'a'..=b'z' | b'*') => {
                while matches!(self.peek(), Some(c) if is_tchar(c) || c == b':' || c == b'/') {
                    self.pos += 1;
                }
                Ok(Member::Other)
            }
            _ => Err("a member value is not a valid structured field item"),
        }
    }

    fn number(&mut self) -> Result<(), &'static str> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9' | b'.')) {
            self.pos += 1;
        }
        if self.pos == start || !self.input[start].is_ascii_digit() {
            return Err("a number is malformed");
        }
        Ok(())
    }

    fn string(&mut self) -> Result<(), &'static str> {
        self.expect(b'"', "a string must be quoted")?;
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => self.pos += 2,
                Some(0x20..=0x7e) => self.pos += 1,
                _ => return Err("a string is not terminated or has characters outside ASCII"),
            }
        }
    }

    /// `:base64:` (RFC 9651 §4.2.7), padding optional.
    fn byte_sequence(&mut self) -> Result<Vec<u8>, &'static str> {
        self.pos += 1;
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c != b':') {
            self.pos += 1;
        }
        let encoded = &self.input[start..self.pos];
        self.expect(b':', "a byte sequence is not terminated by ':'")?;
        base64_decode(encoded).ok_or("a byte sequence is not valid base64")
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Standard base64 (RFC 4648 §4), with or without its `=` padding.
fn base64_decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let unpadded = encoded
        .strip_suffix(b"==")
        .or_else(|| encoded.strip_suffix(b"="))
        .unwrap_or(encoded);
    if unpadded.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(unpadded.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in unpadded {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn declared(values: &[&str]) -> Result<Option<[u8; 32]>, &'static str> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(CONTENT_DIGEST, HeaderValue::from_str(value).expect("value"));
        }
        declared_sha256(&headers)
    }

    /// RFC 9530 Appendix D's example: `{"hello": "world"}` and its SHA-256.
    const HELLO: &str = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:";

    #[test]
    fn reads_the_sha256_member() {
        let expected: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"{\"hello\": \"world\"}").into();
        assert_eq!(declared(&[HELLO]), Ok(Some(expected)));
        // Among others, with parameters, over several lines, unpadded.
        let other =
            "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";
        assert_eq!(declared(&[&format!("{other}, {HELLO};x=1")]), Ok(Some(expected)));
        assert_eq!(declared(&["md5=:AAAA:", HELLO]), Ok(Some(expected)));
        assert_eq!(
            declared(&["sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE:"]),
            Ok(Some(expected))
        );
    }

    #[test]
    fn no_sha256_is_none() {
        assert_eq!(declared(&[]), Ok(None));
        assert_eq!(declared(&["sha-512=:AAAA:, unixsum=:AAAA:"]), Ok(None));
        assert_eq!(
            declared(&["a=1, b=?0, c=\"x\", d=(1 2);p, e, f=tok/en, g=@12, h=%\"x\""]),
            Ok(None)
        );
    }

    #[test]
    fn malformed_fields_name_the_problem() {
        for (value, problem) in [
            ("sha-256=abc", "the sha-256 member is not a byte sequence (:base64:)"),
            ("sha-256=:AAAA:", "the sha-256 digest is not 32 bytes long"),
            ("sha-256=:not base64!:", "a byte sequence is not valid base64"),
            ("sha-256=:AAAA", "a byte sequence is not terminated by ':'"),
            (
                "SHA-256=:AAAA:",
                "a member name must start with a lowercase letter or '*'",
            ),
            ("sha-256=:AAAA: x", "members must be separated by commas"),
            ("a=1,", "a trailing comma"),
            ("a=\"open", "a string is not terminated or has characters outside ASCII"),
        ] {
            assert_eq!(declared(&[value]), Err(problem), "{value}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(value in "[ -~]{0,80}") {
            if let Ok(header) = HeaderValue::from_str(&value) {
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_DIGEST, header);
                let _ = declared_sha256(&headers);
            }
        }

        #[test]
        fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut encoded = Vec::new();
            for chunk in bytes.chunks(3) {
                let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    encoded.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
                }
                encoded.extend(std::iter::repeat_n(b'=', 3 - chunk.len()));
            }
            prop_assert_eq!(base64_decode(&encoded), Some(bytes));
        }
    }
}
