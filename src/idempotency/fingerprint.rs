//! Scoped storage keys and request fingerprints (docs/behaviour.md §3).
//!
//! Both are SHA-256 digests over length-prefixed fields, so no two different inputs can
//! produce the same byte stream (`("ab", "c")` and `("a", "bc")` hash differently).

use std::fmt;

use sha2::{Digest, Sha256};

use super::canonical::canonical_json;
use crate::config::JsonPointer;

fn update_field(hasher: &mut Sha256, field: &[u8]) {
    hasher.update((field.len() as u64).to_be_bytes());
    hasher.update(field);
}

/// Where a key's record lives: `prefix + "{" + hex(sha256(route, scope, key)) + "}"`.
///
/// The braces are a Redis Cluster hash tag (any key derived from it maps to the record's slot).
/// Only the hash is stored: never the raw key nor the scope value.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorageKey {
    record: String,
    digest: [u8; 32],
}

impl StorageKey {
    /// Hashes the route name, the scope header's value (empty when absent) and the key: the
    /// storage key of a key from the `Idempotency-Key` header (docs/behaviour.md §3).
    pub fn new(prefix: &str, route: &str, scope: &[u8], key: &[u8]) -> Self {
        Self::of_fields(prefix, &[route.as_bytes(), scope, key])
    }

    /// The storage key of a key from another source (docs/behaviour.md §13): the source's label
    /// (`json:/client_order_id`) is hashed too, as a fourth field, so a key from one source
    /// never meets the same key from another, nor one from the header (three fields).
    pub fn sourced(prefix: &str, route: &str, scope: &[u8], source: &str, key: &[u8]) -> Self {
        Self::of_fields(prefix, &[route.as_bytes(), scope, source.as_bytes(), key])
    }

    fn of_fields(prefix: &str, fields: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        for field in fields {
            update_field(&mut hasher, field);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let mut hex = [0u8; 64];
        // 64 hex digits for 32 bytes: the buffer has exactly the room needed.
        let _ = hex::encode_to_slice(digest, &mut hex);
        let mut record = String::with_capacity(prefix.len() + 2 + 64);
        record.push_str(prefix);
        record.push('{');
        record.push_str(std::str::from_utf8(&hex).unwrap_or_default());
        record.push('}');
        Self { record, digest }
    }

    /// The record's key.
    pub fn record_key(&self) -> &str {
        &self.record
    }

    /// The key's SHA-256 digest (uniformly spread: picks a shard of the memory store).
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// A short hash for logs and metrics: the first 6 bytes of the digest, hex.
    pub fn short_hash(&self) -> ShortHash {
        let mut short = [0u8; 6];
        short.copy_from_slice(&self.digest[..6]);
        ShortHash(short)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StorageKey").field(&self.record).finish()
    }
}

/// A key's short, non-reversible hash, for logs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortHash([u8; 6]);

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How a fingerprint was made (docs/behaviour.md §15.2); a record names it in its version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `sha256(method, path, query, content-type, body)`: a body read whole (§3), and every
    /// record written before streamed bodies existed.
    Bytes,
    /// `sha256(head, sha256(body))`: a streamed body whose digest is known.
    Digest,
    /// The head's hash alone: a streamed body whose digest is not known ("body pending").
    Head,
}

/// What makes two requests "the same request" (docs/behaviour.md §3, §15.2): a SHA-256 digest
/// and the scheme it was made with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub scheme: Scheme,
    pub hash: [u8; 32],
}

/// Hashes a request's head (method, path, query, content type) into `hasher`, each field
/// length-prefixed; a query that is absent and one that is empty differ.
fn update_head(hasher: &mut Sha256, method: &http::Method, uri: &http::Uri, content_type: Option<&[u8]>) {
    update_field(hasher, method.as_str().as_bytes());
    update_field(hasher, uri.path().as_bytes());
    match uri.query() {
        Some(q) => {
            hasher.update([1]);
            update_field(hasher, q.as_bytes());
        }
        None => hasher.update([0]),
    }
    update_field(hasher, content_type.unwrap_or_default());
}

impl Fingerprint {
    /// A `bytes` fingerprint with this hash.
    pub const fn bytes(hash: [u8; 32]) -> Self {
        Self {
            scheme: Scheme::Bytes,
            hash,
        }
    }

    /// The `bytes` fingerprint of a request whose body was read whole (docs/behaviour.md §3).
    pub fn of(method: &http::Method, uri: &http::Uri, content_type: Option<&[u8]>, body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        update_head(&mut hasher, method, uri, content_type);
        update_field(&mut hasher, body);
        Self::bytes(hasher.finalize().into())
    }

    /// The fingerprint of a route with `fingerprint_body = "json"` (docs/behaviour.md §13):
    /// [`of`](Self::of) over the body's canonical JSON form without the values at `ignore`, or
    /// over its bytes when it is not JSON.
    pub fn of_json(
        method: &http::Method,
        uri: &http::Uri,
        content_type: Option<&[u8]>,
        body: &[u8],
        ignore: &[JsonPointer],
    ) -> Self {
        match canonical_json(body, ignore) {
            Some(canonical) => Self::of(method, uri, content_type, &canonical),
            None => Self::of(method, uri, content_type, body),
        }
    }

    /// The `bytes` fingerprint of a body of `len` bytes that is hashed as it arrives: feed it
    /// to the returned hasher, then [`finish_bytes`](Self::finish_bytes).
    pub fn start_bytes(method: &http::Method, uri: &http::Uri, content_type: Option<&[u8]>, len: u64) -> Sha256 {
        let mut hasher = Sha256::new();
        update_head(&mut hasher, method, uri, content_type);
        hasher.update(len.to_be_bytes());
        hasher
    }

    /// The fingerprint [`start_bytes`](Self::start_bytes) began, once the body went through it.
    pub fn finish_bytes(hasher: Sha256) -> Self {
        Self::bytes(hasher.finalize().into())
    }
}

/// The hash of a request's head (method, path, query, content type): what a streamed request's
/// fingerprint is known by before its body is (docs/behaviour.md §15.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HeadHash(pub [u8; 32]);

impl HeadHash {
    pub fn of(method: &http::Method, uri: &http::Uri, content_type: Option<&[u8]>) -> Self {
        let mut hasher = Sha256::new();
        update_head(&mut hasher, method, uri, content_type);
        Self(hasher.finalize().into())
    }

    /// The `digest` fingerprint of this head with a body whose SHA-256 is `body`.
    pub fn with_body(&self, body: &[u8; 32]) -> Fingerprint {
        let mut hasher = Sha256::new();
        hasher.update([2]);
        hasher.update(self.0);
        hasher.update(body);
        Fingerprint {
            scheme: Scheme::Digest,
            hash: hasher.finalize().into(),
        }
    }
}

/// What an arriving request knows of its fingerprint when its key is decided
/// (docs/behaviour.md §15.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Print {
    /// A body read whole: its fingerprint (`bytes`, or over canonical JSON, §13).
    Whole(Fingerprint),
    /// A streamed body: the head's hash, and the body's SHA-256 once known (`Content-Digest`, or
    /// hashed as it arrived).
    Streamed { head: HeadHash, body: Option<[u8; 32]> },
}

/// How a request's [`Print`] compares with a record's fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Same,
    Different,
    /// Not comparable yet: the request must hash its body in the record's scheme first.
    Undecided,
}

impl Print {
    /// The fingerprint a record written for this request carries.
    pub fn fingerprint(&self) -> Fingerprint {
        match self {
            Print::Whole(fingerprint) => *fingerprint,
            Print::Streamed { head, body: Some(body) } => head.with_body(body),
            Print::Streamed { head, body: None } => Fingerprint {
                scheme: Scheme::Head,
                hash: head.0,
            },
        }
    }

    /// The one comparison rule of every store (docs/behaviour.md §15.2).
    pub fn compare(&self, stored: &Fingerprint) -> Comparison {
        let same = |equal: bool| if equal { Comparison::Same } else { Comparison::Different };
        match (self, stored.scheme) {
            (Print::Whole(own), _) if own.scheme == stored.scheme => same(own.hash == stored.hash),
            (Print::Streamed { head, .. }, Scheme::Head) => same(head.0 == stored.hash),
            (Print::Streamed { head, body: Some(body) }, Scheme::Digest) => {
                same(head.with_body(body).hash == stored.hash)
            }
            _ => Comparison::Undecided,
        }
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:?} {})", self.scheme, hex::encode(&self.hash[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_key_has_prefix_and_hash_tag() {
        let key = StorageKey::new("idem:", "default", b"Bearer a", b"k1");
        let record = key.record_key();
        assert!(record.starts_with("idem:{") && record.ends_with('}'), "{record}");
        assert_eq!(record.len(), "idem:{}".len() + 64);
        assert!(!record.contains("k1") && !record.contains("Bearer"));
    }

    /// Records written before key sources existed keep matching: a key from the default source
    /// hashes exactly as it always has (this digest is fixed, not computed).
    #[test]
    fn storage_key_of_the_default_source_is_unchanged() {
        let key = StorageKey::new("idem:", "default", b"Bearer abc", b"order-1");
        assert_eq!(
            key.record_key(),
            "idem:{731691c1bdfd893d8c7a6162038699ab08516a592a9307d5563783a67cf74d29}"
        );
        let sourced = StorageKey::sourced("idem:", "default", b"Bearer abc", "header:x-request-id", b"order-1");
        assert_ne!(sourced, key);
        assert_ne!(
            sourced,
            StorageKey::sourced("idem:", "default", b"Bearer abc", "json:/id", b"order-1")
        );
    }

    #[test]
    fn byte_fingerprint_is_unchanged() {
        let fingerprint = fp("POST", "/orders?x=1", Some("application/json"), "{\"n\":1}");
        assert_eq!(
            hex::encode(fingerprint.hash),
            "da7d466ac123d38eb2ff9eb16a9aa7f5934210faa61dedf6390df7af685e0302"
        );
    }

    #[test]
    fn json_fingerprint_ignores_order_whitespace_and_ignored_fields() {
        let method = http::Method::POST;
        let uri: http::Uri = "/orders".parse().expect("uri");
        let ignore = [JsonPointer::parse("/sent_at").expect("pointer")];
        let json = |body: &str| Fingerprint::of_json(&method, &uri, None, body.as_bytes(), &ignore);
        let first = json(r#"{"amount": 10, "currency": "EUR", "sent_at": 1}"#);
        assert_eq!(first, json(r#"{ "sent_at": 2, "currency": "EUR", "amount": 10 }"#));
        assert_ne!(first, json(r#"{"amount": 11, "currency": "EUR", "sent_at": 1}"#));
        // A body that is not JSON is fingerprinted by its bytes; canonical JSON as itself.
        assert_eq!(json("not json"), Fingerprint::of(&method, &uri, None, b"not json"));
        assert_eq!(
            json(r#"{"amount":10}"#),
            Fingerprint::of(&method, &uri, None, br#"{"amount":10}"#)
        );
    }

    #[test]
    fn scope_and_route_separate_keys() {
        let a = StorageKey::new("p:", "r", b"Bearer a", b"k");
        assert_ne!(a, StorageKey::new("p:", "r", b"Bearer b", b"k"));
        assert_ne!(a, StorageKey::new("p:", "r2", b"Bearer a", b"k"));
        assert_ne!(
            StorageKey::new("p:", "ab", b"c", b"k"),
            StorageKey::new("p:", "a", b"bc", b"k")
        );
        assert_eq!(a, StorageKey::new("p:", "r", b"Bearer a", b"k"));
    }

    /// The fingerprint of a request given as text parts.
    fn fp(method: &str, target: &str, content_type: Option<&str>, body: &str) -> Fingerprint {
        let method: http::Method = method.parse().expect("method");
        let uri: http::Uri = target.parse().expect("uri");
        Fingerprint::of(&method, &uri, content_type.map(str::as_bytes), body.as_bytes())
    }

    #[test]
    fn fingerprint_covers_each_part() {
        let json = Some("application/json");
        let base = fp("POST", "/orders?x=1", json, "{}");
        assert_eq!(base, fp("POST", "/orders?x=1", json, "{}"));
        for (part, other) in [
            ("method", fp("PATCH", "/orders?x=1", json, "{}")),
            ("query", fp("POST", "/orders?x=2", json, "{}")),
            ("content type", fp("POST", "/orders?x=1", Some("text/plain"), "{}")),
            ("body", fp("POST", "/orders?x=1", json, "{ }")),
        ] {
            assert_ne!(base, other, "a different {part}");
        }
        assert_ne!(fp("POST", "/orders", None, ""), fp("POST", "/orders?", None, ""));
    }
}
