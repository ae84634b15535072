//! `Idempotency-Key` semantics (draft-ietf-httpapi-idempotency-key-header, docs/behaviour.md §2-§6): the key,
//! the scoped storage key and fingerprint, the record, the pure decision, and replays.
//! No I/O happens here; the store and the upstream sit at the edges (`store`, `proxy`).

pub mod canonical;
pub mod content_digest;
pub mod decision;
pub mod fingerprint;
pub mod key;
pub mod outcome;
pub mod record;
pub mod replay;
pub mod source;

pub use decision::{decide, Decision, Existing, CONFLICT_RETRY_AFTER};
pub use fingerprint::{Comparison, Fingerprint, HeadHash, Print, Scheme, ShortHash, StorageKey};
pub use key::{IdempotencyKey, KeyError, IDEMPOTENCY_KEY};
pub use outcome::{settle, Exchange, Settlement};
pub use record::{unix_ms, LeaseToken, Record, RecordError, StoredResponse, UnknownCause};
