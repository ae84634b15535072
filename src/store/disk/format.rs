//! How a record lies in the disk store's tables (docs/behaviour.md §11).
//!
//! `records`: key = the storage key's 32-byte digest; value =
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | CRC-32 (IEEE, `crc32fast`) of the key and of bytes 4.. |
//! | 4 | 8 | expiry, Unix ms, big-endian |
//! | 12 | … | the record ([`Record::encode`]) |
//!
//! The checksum covers the key too, so a value that a damaged page moved under another key is
//! caught as well as a flipped byte. `expiry`: key = expiry (8, big-endian) then the digest;
//! value empty: the sweep walks it in expiry order.

use bytes::Bytes;

use crate::idempotency::{Record, RecordError};

/// Bytes before the record in a value.
pub const VALUE_HEAD: usize = 12;

/// The stored value of `record` under `key`, expiring at `expires_at_ms`.
pub fn encode_value(key: &[u8; 32], expires_at_ms: u64, record: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(VALUE_HEAD + record.len());
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&expires_at_ms.to_be_bytes());
    value.extend_from_slice(record);
    let crc = checksum(key, &value[4..]);
    value[..4].copy_from_slice(&crc.to_be_bytes());
    value
}

fn checksum(key: &[u8; 32], rest: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(rest);
    hasher.finalize()
}

/// The expiry of a stored value, after checking its checksum.
pub fn value_expiry(key: &[u8; 32], value: &[u8]) -> Result<u64, RecordError> {
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
pub fn decode_value(key: &[u8; 32], value: &[u8]) -> Result<(u64, Record), RecordError> {
    let expires_at_ms = value_expiry(key, value)?;
    let record = Record::decode(Bytes::copy_from_slice(&value[VALUE_HEAD..]))?;
    Ok((expires_at_ms, record))
}

/// The `expiry` table's key of a record.
pub fn expiry_key(expires_at_ms: u64, key: &[u8; 32]) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    out[8..].copy_from_slice(key);
    out
}

/// The digest in an `expiry` key, if it has the right length.
pub fn digest_of_expiry_key(key: &[u8]) -> Option<[u8; 32]> {
    key.get(8..40)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::{Fingerprint, UnknownCause};

    fn record() -> Record {
        Record::Unknown {
            fingerprint: Fingerprint([3; 32]),
            since_ms: 7,
            cause: UnknownCause::Timeout,
        }
    }

    #[test]
    fn values_round_trip_and_every_flipped_bit_is_caught() {
        let key = [9u8; 32];
        let value = encode_value(&key, 1234, &record().encode());
        assert_eq!(decode_value(&key, &value), Ok((1234, record())));
        for i in 0..value.len() * 8 {
            let mut damaged = value.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(decode_value(&key, &damaged).is_err(), "bit {i}");
        }
        assert!(decode_value(&[8u8; 32], &value).is_err(), "a value under another key");
        for len in 0..value.len() {
            assert!(decode_value(&key, &value[..len]).is_err(), "cut at {len}");
        }
    }

    #[test]
    fn expiry_keys_sort_by_time() {
        let early = expiry_key(5, &[0xff; 32]);
        let late = expiry_key(6, &[0; 32]);
        assert!(early < late);
        assert_eq!(digest_of_expiry_key(&late), Some([0; 32]));
        assert_eq!(digest_of_expiry_key(&late[..39]), None);
    }
}
