//! How records lie in the disk store's segment files (docs/behaviour.md §11.1).
//!
//! A segment is a sequence of frames, appended and never changed in place. A frame:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `IDPF` |
//! | 4 | 1 | kind: 1 a record, 2 a deletion, 3 a damaged-record marker |
//! | 5 | 3 | zero |
//! | 8 | 32 | the storage key's digest |
//! | 40 | 8 | expiry, Unix ms, little-endian |
//! | 48 | 4 | payload length |
//! | 52 | 4 | CRC-32 of the payload |
//! | 56 | 4 | CRC-32 of bytes 0..56 (the header) |
//! | 60 | n | payload: the record ([`Record::encode`]), empty for the other kinds |
//! | 60+n | 32 | trailer: the digest again |
//! | 92+n | 8 | expiry again |
//! | 100+n | 4 | payload length again |
//! | 104+n | 4 | CRC-32 of the payload again |
//! | 108+n | 4 | magic `FPDI` |
//! | 112+n | 4 | CRC-32 of the trailer's first 48 bytes |
//!
//! The header and the trailer each check themselves, and each names the key: damage confined to
//! one region of a frame (its header, its payload or its trailer) still says whose record it
//! was, so that key answers `Corrupt` instead of being forgotten.

use crate::idempotency::RecordError;

/// Bytes before the payload.
pub const HEADER: usize = 60;
/// Bytes after the payload.
pub const TRAILER: usize = 56;
/// A frame's bytes beyond its payload.
pub const OVERHEAD: usize = HEADER + TRAILER;

const MAGIC: [u8; 4] = *b"IDPF";
const TRAILER_MAGIC: [u8; 4] = *b"FPDI";

/// What a frame says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The key's record (the payload).
    Record = 1,
    /// The key was deleted (released, cleared): records before this frame are gone.
    Deleted = 2,
    /// The key's record was found damaged; kept so that the key stays `Corrupt` after the
    /// damaged frame itself is compacted away.
    Damaged = 3,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Kind::Record),
            2 => Some(Kind::Deleted),
            3 => Some(Kind::Damaged),
            _ => None,
        }
    }
}

/// A frame's header fields, once its checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub digest: [u8; 32],
    pub expires_at_ms: u64,
    pub len: u32,
    pub payload_crc: u32,
}

impl Header {
    /// The whole frame's length.
    pub fn frame_len(&self) -> usize {
        OVERHEAD + self.len as usize
    }
}

/// Appends the frame of `payload` to `out`.
pub fn encode(out: &mut Vec<u8>, kind: Kind, digest: &[u8; 32], expires_at_ms: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let payload_crc = crc32fast::hash(payload);
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[kind as u8, 0, 0, 0]);
    out.extend_from_slice(digest);
    out.extend_from_slice(&expires_at_ms.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(payload);
    let trailer = out.len();
    out.extend_from_slice(digest);
    out.extend_from_slice(&expires_at_ms.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload_crc.to_le_bytes());
    out.extend_from_slice(&TRAILER_MAGIC);
    let trailer_crc = crc32fast::hash(&out[trailer..]);
    out.extend_from_slice(&trailer_crc.to_le_bytes());
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn digest_at(bytes: &[u8], at: usize) -> [u8; 32] {
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&bytes[at..at + 32]);
    digest
}

/// The header at the start of `bytes`, if it is whole and its checksum holds.
pub fn header(bytes: &[u8]) -> Option<Header> {
    let bytes = bytes.get(..HEADER)?;
    if bytes[..4] != MAGIC || u32_at(bytes, 56) != crc32fast::hash(&bytes[..56]) {
        return None;
    }
    Some(Header {
        kind: Kind::from_byte(bytes[4])?,
        digest: digest_at(bytes, 8),
        expires_at_ms: u64_at(bytes, 40),
        len: u32_at(bytes, 48),
        payload_crc: u32_at(bytes, 52),
    })
}

/// A trailer's fields, once its checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub digest: [u8; 32],
    pub expires_at_ms: u64,
    pub len: u32,
    pub payload_crc: u32,
}

/// The trailer at the start of `bytes`, if it is whole and its checksum holds.
pub fn trailer(bytes: &[u8]) -> Option<Trailer> {
    let bytes = bytes.get(..TRAILER)?;
    if bytes[48..52] != TRAILER_MAGIC || u32_at(bytes, 52) != crc32fast::hash(&bytes[..52]) {
        return None;
    }
    Some(Trailer {
        digest: digest_at(bytes, 0),
        expires_at_ms: u64_at(bytes, 32),
        len: u32_at(bytes, 40),
        payload_crc: u32_at(bytes, 44),
    })
}

/// The payload of the whole frame `frame` (whose header is `head`), once its payload checksum
/// and its trailer hold and agree with the header.
pub fn payload<'f>(head: &Header, frame: &'f [u8]) -> Result<&'f [u8], RecordError> {
    if frame.len() != head.frame_len() {
        return Err(RecordError::Truncated);
    }
    let (payload, tail) = frame[HEADER..].split_at(head.len as usize);
    if crc32fast::hash(payload) != head.payload_crc {
        return Err(RecordError::Corrupt("checksum mismatch on disk"));
    }
    let same = |t: Trailer| {
        t.digest == head.digest
            && t.expires_at_ms == head.expires_at_ms
            && t.len == head.len
            && t.payload_crc == head.payload_crc
    };
    match trailer(tail) {
        Some(t) if same(t) => Ok(payload),
        _ => Err(RecordError::Corrupt("damaged frame trailer on disk")),
    }
}

/// Where the next frame whose header holds starts in `bytes`, at or after `from`.
pub fn next_header(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(found) = find(bytes, at, &MAGIC) {
        if header(&bytes[found..]).is_some() {
            return Some(found);
        }
        at = found + 1;
    }
    None
}

/// Every trailer that holds in `bytes`, with where it ends.
pub fn trailers(bytes: &[u8]) -> Vec<(usize, Trailer)> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(magic) = find(bytes, at, &TRAILER_MAGIC) {
        if let Some(start) = magic.checked_sub(48) {
            if let Some(t) = trailer(&bytes[start..]) {
                found.push((start + TRAILER, t));
            }
        }
        at = magic + 1;
    }
    found
}

fn find(bytes: &[u8], from: usize, needle: &[u8; 4]) -> Option<usize> {
    let rest = bytes.get(from..)?;
    rest.windows(4).position(|w| w == needle).map(|i| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, kind, &[9; 32], 1234, payload);
        out
    }

    #[test]
    fn frames_round_trip_and_every_flipped_bit_is_caught_and_named() {
        let bytes = frame(Kind::Record, b"a record's bytes");
        let head = header(&bytes).expect("header");
        assert_eq!(
            (head.kind, head.digest, head.expires_at_ms),
            (Kind::Record, [9; 32], 1234)
        );
        assert_eq!(payload(&head, &bytes), Ok(&b"a record's bytes"[..]));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let intact = header(&damaged).and_then(|h| payload(&h, &damaged).ok().map(|_| h));
            assert!(intact.is_none(), "bit {bit} went unnoticed");
            let named_by_header = header(&damaged).map(|h| h.digest);
            let named_by_trailer = trailers(&damaged).first().map(|(_, t)| t.digest);
            assert!(
                named_by_header == Some([9; 32]) || named_by_trailer == Some([9; 32]),
                "bit {bit}: the damaged frame no longer names its key"
            );
        }
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            assert!(
                header(cut).and_then(|h| payload(&h, cut).ok()).is_none(),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn resynchronises_on_the_next_frame_and_finds_trailers() {
        let mut bytes = frame(Kind::Deleted, b"");
        let second = bytes.len();
        bytes.extend(frame(Kind::Record, b"xyz"));
        bytes[2] ^= 0xff;
        assert_eq!(next_header(&bytes, 0), Some(second));
        let found = trailers(&bytes);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, second);
        assert_eq!(found[1].0, bytes.len());
    }
}
