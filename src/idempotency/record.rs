//! A key's record (docs/behaviour.md §4) and its compact, versioned byte encoding.
//!
//! Layout (all integers big-endian), versions 2 to 4:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 1 | version: `2`, `3` or `4`, which also names the fingerprint's scheme (below) |
//! | 1 | 1 | state: `1` InFlight, `2` Completed, `3` Unknown |
//! | 2 | 32 | request fingerprint |
//! | 34 | … | state fields |
//!
//! - InFlight: owner token (16), started_at ms (8), lease_until ms (8): exactly
//!   [`IN_FLIGHT_LEN`] bytes. The lease lives in the record (version 1 kept it in a second key),
//!   so that a request is decided by one plain `SET … NX GET` (docs/behaviour.md §4).
//! - Completed: completed_at ms (8), status (2), flags (1; bit 0: body stored), header count (2),
//!   then per header name length (2), name, value length (4), value; then the body (the rest).
//! - Unknown: since ms (8), cause (1: `1` timeout, `2` upstream failed, `3` lease lapsed, `4`
//!   interrupted, `5` upstream status). Causes are only ever added: a record written by an
//!   earlier build keeps decoding.
//!
//! The version byte names the fingerprint's scheme (docs/behaviour.md §15.2), the layout being
//! the same: `2` `bytes` (every record written before streamed bodies existed, so they decode and
//! compare as they always did), `3` `digest`, `4` `head` (a streamed body not hashed yet).
//! A record of a body read whole is still written as version 2, byte for byte as before.
//!
//! The Redis scripts read the state byte and the owner token at these fixed offsets
//! (`store::redis`), so they can compare-and-set without decoding. Decoding never panics:
//! any byte string that is not a valid record is [`RecordError`].

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};

use super::fingerprint::{Fingerprint, Scheme};

/// Encoding version of a record whose fingerprint is of the `bytes` scheme (and the first
/// version byte of the layout above); `digest` and `head` are the next two.
pub const VERSION: u8 = 2;
/// The highest version byte this build reads and writes.
pub const LAST_VERSION: u8 = 4;
pub const STATE_IN_FLIGHT: u8 = 1;
pub const STATE_COMPLETED: u8 = 2;
pub const STATE_UNKNOWN: u8 = 3;
/// Offset of the owner token in an InFlight record.
pub const TOKEN_OFFSET: usize = 34;
/// Offset of the lease deadline in an InFlight record.
pub const LEASE_OFFSET: usize = 58;
/// Length of every InFlight record.
pub const IN_FLIGHT_LEN: usize = 66;
const HEADER_LEN: usize = 34;

/// Identifies the proxy request that owns a key while it executes. Random, 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub [u8; 16]);

impl LeaseToken {
    /// A fresh token: SipHash of a process-wide counter under `std`'s `RandomState` keys, which
    /// are seeded from the OS per process, so tokens are unique across calls and across proxies.
    pub fn random() -> Self {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut out = [0u8; 16];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(count);
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        Self(out)
    }
}

impl std::fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseToken({})", hex::encode(&self.0[..4]))
    }
}

/// Why a key's outcome is unknown (docs/behaviour.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownCause {
    /// Sent upstream, no complete answer within the upstream timeout.
    Timeout,
    /// Sent upstream, the connection failed before a complete answer (reset, truncated body).
    UpstreamFailed,
    /// The owning proxy stopped renewing its lease (it died mid-request).
    LeaseLapsed,
    /// The execution was cut short inside the proxy (a panic, a task dropped) after the
    /// request may have been sent upstream (docs/behaviour.md §5).
    Interrupted,
    /// The upstream answered with a status the route lists in `unknown_statuses` (a gateway's
    /// `504` in front of the service, docs/behaviour.md §14).
    UpstreamStatus,
}

impl UnknownCause {
    fn to_byte(self) -> u8 {
        match self {
            Self::Timeout => 1,
            Self::UpstreamFailed => 2,
            Self::LeaseLapsed => 3,
            Self::Interrupted => 4,
            Self::UpstreamStatus => 5,
        }
    }

    fn from_byte(b: u8) -> Result<Self, RecordError> {
        match b {
            1 => Ok(Self::Timeout),
            2 => Ok(Self::UpstreamFailed),
            3 => Ok(Self::LeaseLapsed),
            4 => Ok(Self::Interrupted),
            5 => Ok(Self::UpstreamStatus),
            _ => Err(RecordError::Corrupt("unknown cause")),
        }
    }
}

/// The first response to a key, as replayed (docs/behaviour.md §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: StatusCode,
    /// End-to-end headers only (no hop-by-hop, `Date`, `Content-Length`, `Transfer-Encoding`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `None` when the body was larger than `max_response_bytes`: the response cannot be replayed.
    pub body: Option<Bytes>,
    pub completed_at_ms: u64,
}

/// A key's state in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    InFlight {
        fingerprint: Fingerprint,
        owner: LeaseToken,
        started_at_ms: u64,
        /// Wall clock (Unix ms) at which the owner's lease lapses unless renewed.
        lease_until_ms: u64,
    },
    Completed {
        fingerprint: Fingerprint,
        response: StoredResponse,
    },
    Unknown {
        fingerprint: Fingerprint,
        since_ms: u64,
        cause: UnknownCause,
    },
}

/// A stored byte string that is not a record this build can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record encoding version {0} is not supported")]
    Version(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record is corrupt: {0}")]
    Corrupt(&'static str),
}

impl Record {
    pub fn fingerprint(&self) -> &Fingerprint {
        match self {
            Record::InFlight { fingerprint, .. }
            | Record::Completed { fingerprint, .. }
            | Record::Unknown { fingerprint, .. } => fingerprint,
        }
    }

    /// A copy that shares no memory with anything else. A response's body and header values
    /// are usually slices of the connection's read buffer; a record kept in memory for hours
    /// must not pin whole buffers (kilobytes) for a few bytes.
    pub fn detached(&self) -> Record {
        match self {
            Record::Completed { fingerprint, response } => Record::Completed {
                fingerprint: *fingerprint,
                response: StoredResponse {
                    status: response.status,
                    headers: response
                        .headers
                        .iter()
                        .map(|(name, value)| {
                            let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
                            copy.set_sensitive(value.is_sensitive());
                            (name.clone(), copy)
                        })
                        .collect(),
                    body: response.body.as_ref().map(|b| Bytes::copy_from_slice(b)),
                    completed_at_ms: response.completed_at_ms,
                },
            },
            other => other.clone(),
        }
    }

    /// Name of the state, as the admin endpoint and logs show it.
    pub fn state_name(&self) -> &'static str {
        match self {
            Record::InFlight { .. } => "InFlight",
            Record::Completed { .. } => "Completed",
            Record::Unknown { .. } => "Unknown",
        }
    }

    /// Encodes the record (see the module docs for the layout).
    pub fn encode(&self) -> Bytes {
        match self {
            Record::InFlight {
                fingerprint,
                owner,
                started_at_ms,
                lease_until_ms,
            } => {
                let mut out = BytesMut::with_capacity(IN_FLIGHT_LEN);
                put_head(&mut out, STATE_IN_FLIGHT, fingerprint);
                out.put_slice(&owner.0);
                out.put_u64(*started_at_ms);
                out.put_u64(*lease_until_ms);
                out.freeze()
            }
            Record::Completed { fingerprint, response } => {
                let headers_len: usize = response
                    .headers
                    .iter()
                    .map(|(n, v)| 6 + n.as_str().len() + v.len())
                    .sum();
                let body_len = response.body.as_ref().map_or(0, Bytes::len);
                let mut out = BytesMut::with_capacity(HEADER_LEN + 13 + headers_len + body_len);
                put_head(&mut out, STATE_COMPLETED, fingerprint);
                out.put_u64(response.completed_at_ms);
                out.put_u16(response.status.as_u16());
                out.put_u8(u8::from(response.body.is_some()));
                let count = response.headers.len().min(u16::MAX as usize);
                out.put_u16(count as u16);
                for (name, value) in response.headers.iter().take(count) {
                    out.put_u16(name.as_str().len() as u16);
                    out.put_slice(name.as_str().as_bytes());
                    out.put_u32(value.len() as u32);
                    out.put_slice(value.as_bytes());
                }
                if let Some(body) = &response.body {
                    out.put_slice(body);
                }
                out.freeze()
            }
            Record::Unknown {
                fingerprint,
                since_ms,
                cause,
            } => {
                let mut out = BytesMut::with_capacity(HEADER_LEN + 9);
                put_head(&mut out, STATE_UNKNOWN, fingerprint);
                out.put_u64(*since_ms);
                out.put_u8(cause.to_byte());
                out.freeze()
            }
        }
    }

    /// Decodes a stored record. The body and header values of a Completed record are zero-copy
    /// slices of `bytes`.
    pub fn decode(bytes: Bytes) -> Result<Record, RecordError> {
        let mut r = Reader { bytes: &bytes, pos: 0 };
        let scheme = scheme_of(r.u8()?)?;
        let state = r.u8()?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(r.take(32)?);
        let fingerprint = Fingerprint { scheme, hash };
        let record = match state {
            STATE_IN_FLIGHT => {
                let mut owner = [0u8; 16];
                owner.copy_from_slice(r.take(16)?);
                Record::InFlight {
                    fingerprint,
                    owner: LeaseToken(owner),
                    started_at_ms: r.u64()?,
                    lease_until_ms: r.u64()?,
                }
            }
            STATE_COMPLETED => {
                let completed_at_ms = r.u64()?;
                let status = StatusCode::from_u16(r.u16()?).map_err(|_| RecordError::Corrupt("status"))?;
                let flags = r.u8()?;
                if flags > 1 {
                    return Err(RecordError::Corrupt("flags"));
                }
                let count = r.u16()? as usize;
                let mut headers = Vec::with_capacity(count.min(64));
                for _ in 0..count {
                    let name_len = r.u16()? as usize;
                    // Lowercase only, as `encode` writes it: `from_bytes` would lowercase the
                    // name and the record would no longer re-encode to its stored bytes.
                    let name = HeaderName::from_lowercase(r.take(name_len)?)
                        .map_err(|_| RecordError::Corrupt("header name"))?;
                    let value_len = r.u32()? as usize;
                    let start = r.pos;
                    r.take(value_len)?;
                    // A zero-copy slice of the stored record, like the body.
                    let value = HeaderValue::from_maybe_shared(bytes.slice(start..r.pos))
                        .map_err(|_| RecordError::Corrupt("header value"))?;
                    headers.push((name, value));
                }
                let body = if flags & 1 == 1 {
                    Some(bytes.slice(r.pos..))
                } else if r.pos != bytes.len() {
                    return Err(RecordError::Corrupt("trailing bytes"));
                } else {
                    None
                };
                return Ok(Record::Completed {
                    fingerprint,
                    response: StoredResponse {
                        status,
                        headers,
                        body,
                        completed_at_ms,
                    },
                });
            }
            STATE_UNKNOWN => Record::Unknown {
                fingerprint,
                since_ms: r.u64()?,
                cause: UnknownCause::from_byte(r.u8()?)?,
            },
            _ => return Err(RecordError::Corrupt("state")),
        };
        if r.pos != bytes.len() {
            return Err(RecordError::Corrupt("trailing bytes"));
        }
        Ok(record)
    }
}

fn put_head(out: &mut BytesMut, state: u8, fingerprint: &Fingerprint) {
    out.put_u8(match fingerprint.scheme {
        Scheme::Bytes => VERSION,
        Scheme::Digest => VERSION + 1,
        Scheme::Head => VERSION + 2,
    });
    out.put_u8(state);
    out.put_slice(&fingerprint.hash);
}

/// The fingerprint scheme a record's version byte names.
fn scheme_of(version: u8) -> Result<Scheme, RecordError> {
    match version {
        VERSION => Ok(Scheme::Bytes),
        3 => Ok(Scheme::Digest),
        LAST_VERSION => Ok(Scheme::Head),
        other => Err(RecordError::Version(other)),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.pos.checked_add(n).ok_or(RecordError::Truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or(RecordError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

/// Milliseconds since the Unix epoch: the clock records carry, comparable across proxies.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fingerprint_strategy() -> impl Strategy<Value = Fingerprint> {
        let scheme = prop_oneof![Just(Scheme::Bytes), Just(Scheme::Digest), Just(Scheme::Head)];
        (scheme, any::<[u8; 32]>()).prop_map(|(scheme, hash)| Fingerprint { scheme, hash })
    }

    fn header_strategy() -> impl Strategy<Value = (HeaderName, HeaderValue)> {
        ("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}").prop_map(|(n, v)| {
            (
                HeaderName::from_bytes(n.as_bytes()).expect("valid name"),
                HeaderValue::from_str(&v).expect("valid value"),
            )
        })
    }

    fn record_strategy() -> impl Strategy<Value = Record> {
        prop_oneof![
            (fingerprint_strategy(), any::<[u8; 16]>(), any::<u64>(), any::<u64>()).prop_map(
                |(fingerprint, t, started_at_ms, lease_until_ms)| Record::InFlight {
                    fingerprint,
                    owner: LeaseToken(t),
                    started_at_ms,
                    lease_until_ms,
                }
            ),
            (
                fingerprint_strategy(),
                100u16..=999,
                proptest::collection::vec(header_strategy(), 0..8),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..2048)),
                any::<u64>()
            )
                .prop_map(
                    |(fingerprint, status, headers, body, completed_at_ms)| Record::Completed {
                        fingerprint,
                        response: StoredResponse {
                            status: StatusCode::from_u16(status).expect("valid status"),
                            headers,
                            body: body.map(Bytes::from),
                            completed_at_ms,
                        },
                    }
                ),
            (fingerprint_strategy(), any::<u64>(), 0usize..5).prop_map(|(fingerprint, since_ms, c)| Record::Unknown {
                fingerprint,
                since_ms,
                cause: [
                    UnknownCause::Timeout,
                    UnknownCause::UpstreamFailed,
                    UnknownCause::LeaseLapsed,
                    UnknownCause::Interrupted,
                    UnknownCause::UpstreamStatus,
                ][c],
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(record in record_strategy()) {
            prop_assert_eq!(Record::decode(record.encode()), Ok(record));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Record::decode(Bytes::from(bytes));
        }

        #[test]
        fn truncated_records_are_errors(record in record_strategy(), cut in 1usize..64) {
            let bytes = record.encode();
            let keep = bytes.len().saturating_sub(cut);
            if let Ok(decoded) = Record::decode(bytes.slice(..keep)) {
                // Only a Completed body may shrink and still decode.
                let is_completed = matches!(decoded, Record::Completed { .. });
                prop_assert!(is_completed);
            }
        }
    }

    #[test]
    fn fixed_offsets_used_by_the_redis_scripts() {
        let owner = LeaseToken([7; 16]);
        let bytes = Record::InFlight {
            fingerprint: Fingerprint::bytes([9; 32]),
            owner,
            started_at_ms: 1,
            lease_until_ms: 0x0102_0304_0506_0708,
        }
        .encode();
        assert_eq!(bytes.len(), IN_FLIGHT_LEN);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(bytes[1], STATE_IN_FLIGHT);
        assert_eq!(&bytes[2..34], &[9; 32]);
        assert_eq!(&bytes[TOKEN_OFFSET..TOKEN_OFFSET + 16], &owner.0);
        assert_eq!(&bytes[LEASE_OFFSET..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn corrupt_bytes_are_errors() {
        assert_eq!(Record::decode(Bytes::new()), Err(RecordError::Truncated));
        assert_eq!(
            Record::decode(Bytes::from_static(&[1, 1])),
            Err(RecordError::Version(1))
        );
        let mut bad_state = vec![VERSION, 9];
        bad_state.extend([0; 40]);
        assert_eq!(
            Record::decode(Bytes::from(bad_state)),
            Err(RecordError::Corrupt("state"))
        );
    }

    /// Records written by earlier builds (causes 1-4) decode as they did; cause bytes are fixed.
    #[test]
    fn unknown_cause_bytes_are_stable() {
        let causes = [
            (1, UnknownCause::Timeout),
            (2, UnknownCause::UpstreamFailed),
            (3, UnknownCause::LeaseLapsed),
            (4, UnknownCause::Interrupted),
            (5, UnknownCause::UpstreamStatus),
        ];
        for (byte, cause) in causes {
            let mut bytes = vec![VERSION, STATE_UNKNOWN];
            bytes.extend([9; 32]);
            bytes.extend(7u64.to_be_bytes());
            bytes.push(byte);
            let expected = Record::Unknown {
                fingerprint: Fingerprint::bytes([9; 32]),
                since_ms: 7,
                cause,
            };
            assert_eq!(Record::decode(Bytes::from(bytes.clone())), Ok(expected.clone()));
            assert_eq!(expected.encode(), Bytes::from(bytes));
        }
    }

    /// A `Completed` record exactly as builds before streamed bodies wrote it (a fixed
    /// fixture, not encoded here): the answer `201 ok` to `POST /orders?x=1`,
    /// `application/json`, `{"n":1}`. It decodes as a `bytes` fingerprint, re-encodes to the
    /// same bytes, and its retries match it whether they are read whole or streamed
    /// (docs/behaviour.md §15.2): no 422, no second execution across the upgrade.
    #[test]
    fn records_written_before_streaming_keep_matching_their_retries() {
        use crate::config::UnknownOutcome;
        use crate::idempotency::{decide, Decision, Existing, HeadHash, Print};
        let fixture = hex::decode(concat!(
            "0202",
            "da7d466ac123d38eb2ff9eb16a9aa7f5934210faa61dedf6390df7af685e0302",
            "0000000000000001",
            "00c9",
            "01",
            "0000",
            "6f6b"
        ))
        .expect("hex");
        let record = Record::decode(Bytes::from(fixture.clone())).expect("decodes");
        assert_eq!(record.fingerprint().scheme, Scheme::Bytes);
        assert_eq!(record.encode(), Bytes::from(fixture));
        let method = http::Method::POST;
        let uri: http::Uri = "/orders?x=1".parse().expect("uri");
        let json = Some(&b"application/json"[..]);
        let decided = |print: &Print| {
            let existing = Existing {
                record: record.clone(),
                lease_left: None,
            };
            decide(Some(existing), print, UnknownOutcome::Reject)
        };
        // Read whole, as before.
        let whole = Print::Whole(Fingerprint::of(&method, &uri, json, b"{\"n\":1}"));
        assert!(matches!(decided(&whole), Decision::Replay(r) if r.body.as_deref() == Some(&b"ok"[..])));
        assert_eq!(
            decided(&Print::Whole(Fingerprint::of(&method, &uri, json, b"{\"n\":2}"))),
            Decision::Mismatch
        );
        // Streamed now (a larger buffer_bytes elsewhere, or this body over it): verified in the
        // record's scheme, hashed as it arrives.
        let streamed = Print::Streamed {
            head: HeadHash::of(&method, &uri, json),
            body: None,
        };
        assert!(matches!(decided(&streamed), Decision::Verify(_)));
        let mut hasher = Fingerprint::start_bytes(&method, &uri, json, 7);
        sha2::Digest::update(&mut hasher, b"{\"n\":");
        sha2::Digest::update(&mut hasher, b"1}");
        let verified = Print::Whole(Fingerprint::finish_bytes(hasher));
        assert!(matches!(decided(&verified), Decision::Replay(_)));
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(LeaseToken::random(), LeaseToken::random());
    }
}
