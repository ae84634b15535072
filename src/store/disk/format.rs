//! How a record lies in the disk store's tables (docs/behaviour.md §11).
//!
//! `records`: key = creation time (Unix ms, 8 bytes big-endian) then the storage key's 32-byte
//! digest (time first, so that new records are written side by side: `index`); value =
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | CRC-32 (IEEE, `crc32fast`) of the key and of bytes 4.. |
//! | 4 | 8 | expiry, Unix ms, big-endian |
//! | 12 | … | the record ([`Record::encode`]) |
//!
//! The checksum covers the key too, so a value that a damaged page moved under another key is
//! caught as well as a flipped byte. `expiry`: key = expiry (8, big-endian) then the record's
//! key; value empty: the sweep walks it in expiry order.

use bytes::Bytes;

use crate::idempotency::{Record, RecordError};

/// Bytes before the record in a value.
pub const VALUE_HEAD: usize = 12;

/// A record's key in the `records` table.
pub type RecordKey = [u8; 40];

/// The `records` key of the record of `digest` created at `created_ms`.
pub fn record_key(created_ms: u64, digest: &[u8; 32]) -> RecordKey {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&created_ms.to_be_bytes());
    out[8..].copy_from_slice(digest);
    out
}

/// The creation time and digest of a `records` key, if it has the right length.
pub fn split_record_key(key: &[u8]) -> Option<(u64, [u8; 32])> {
    let created: [u8; 8] = key.get(..8)?.try_into().ok()?;
    let digest: [u8; 32] = key.get(8..)?.try_into().ok()?;
    Some((u64::from_be_bytes(created), digest))
}

/// The stored value of `record` under `key`, expiring at `expires_at_ms`.
pub fn encode_value(key: &RecordKey, expires_at_ms: u64, record: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(VALUE_HEAD + record.len());
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&expires_at_ms.to_be_bytes());
    value.extend_from_slice(record);
    let crc = checksum(key, &value[4..]);
    value[..4].copy_from_slice(&crc.to_be_bytes());
    value
}

fn checksum(key: &RecordKey, rest: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(rest);
    hasher.finalize()
}

/// The expiry of a stored value, after checking its checksum.
pub fn value_expiry(key: &RecordKey, value: &[u8]) -> Result<u64, RecordError> {
    if value.len() < VALUE_HEAD {
        return Err(RecordError::Truncated);
    }
    let (crc, rest) = value.split_at(4);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if stored != checksum(key, rest) {
        return Err(RecordError::Corrupt("checksum mismatch on disk"));
    }
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&rest[..8]);
    Ok(u64::from_be_bytes(expiry))
}

/// A stored value's expiry and record; any damage is a [`RecordError`], never a panic.
pub fn decode_value(key: &RecordKey, value: &[u8]) -> Result<(u64, Record), RecordError> {
    let expires_at_ms = value_expiry(key, value)?;
    let record = Record::decode(Bytes::copy_from_slice(&value[VALUE_HEAD..]))?;
    Ok((expires_at_ms, record))
}

/// The `expiry` table's key of the record at `key`.
pub fn expiry_key(expires_at_ms: u64, key: &RecordKey) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    out[8..].copy_from_slice(key);
    out
}

/// The expiry and record key of an `expiry` key, if it has the right length.
pub fn split_expiry_key(key: &[u8]) -> Option<(u64, RecordKey)> {
    let expires: [u8; 8] = key.get(..8)?.try_into().ok()?;
    let record: RecordKey = key.get(8..)?.try_into().ok()?;
    Some((u64::from_be_bytes(expires), record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::{Fingerprint, UnknownCause};

    fn record() -> Record {
        Record::Unknown {
            fingerprint: Fingerprint::bytes([3; 32]),
            since_ms: 7,
            cause: UnknownCause::Timeout,
        }
    }

    #[test]
    fn values_round_trip_and_every_flipped_bit_is_caught() {
        let key = record_key(77, &[9u8; 32]);
        let value = encode_value(&key, 1234, &record().encode());
        assert_eq!(decode_value(&key, &value), Ok((1234, record())));
        for i in 0..value.len() * 8 {
            let mut damaged = value.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(decode_value(&key, &damaged).is_err(), "bit {i}");
        }
        assert!(
            decode_value(&record_key(77, &[8u8; 32]), &value).is_err(),
            "a value under another key"
        );
        assert!(
            decode_value(&record_key(78, &[9u8; 32]), &value).is_err(),
            "a value under another time"
        );
        for len in 0..value.len() {
            assert!(decode_value(&key, &value[..len]).is_err(), "cut at {len}");
        }
    }

    #[test]
    fn keys_sort_by_time_and_split_back() {
        assert!(record_key(5, &[0xff; 32]) < record_key(6, &[0; 32]));
        assert_eq!(split_record_key(&record_key(6, &[3; 32])), Some((6, [3; 32])));
        assert_eq!(split_record_key(&[0; 39]), None);
        let early = expiry_key(5, &record_key(9, &[0xff; 32]));
        let late = expiry_key(6, &record_key(1, &[0; 32]));
        assert!(early < late);
        assert_eq!(split_expiry_key(&late), Some((6, record_key(1, &[0; 32]))));
        assert_eq!(split_expiry_key(&late[..47]), None);
    }
}
