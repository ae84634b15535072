//! The decision table of docs/behaviour.md §4, as one pure function.
//!
//! Every store applies [`decide`]'s verdict atomically: the memory store calls it under its
//! lock; the Redis store calls it on the record its `SET … NX GET` read (a verdict that changes
//! that record, a takeover, is applied by a compare-and-set on it). The store contract tests
//! hold both stores to it.

use std::time::Duration;

use super::fingerprint::Fingerprint;
use super::record::{Record, StoredResponse, UnknownCause};
use crate::config::UnknownOutcome;

/// What the store holds for a key when a guarded request arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub record: Record,
    /// Time left on the owner's lease; `None` when the lease has lapsed (or there is none).
    pub lease_left: Option<Duration>,
}

/// The verdict for an arriving guarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No record: this request now owns the key (store writes InFlight + lease).
    Execute,
    /// InFlight whose owner's lease lapsed, `unknown_outcome = retry`: this request takes the
    /// key over (store replaces the owner and grants a new lease).
    TakeOver,
    /// InFlight whose owner's lease lapsed, `unknown_outcome = reject`: the store marks the key
    /// Unknown; this request and every retry get the outcome-unknown problem.
    MarkUnknown,
    /// InFlight, lease alive: `409` with `Retry-After` (or wait).
    InFlight { retry_after: Duration },
    /// The key was used with a different request: `422`.
    Mismatch,
    /// Completed: replay the stored response.
    Replay(StoredResponse),
    /// Unknown: the outcome-unknown problem.
    Unknown(UnknownCause),
}

impl Decision {
    /// Whether the store must write a fresh InFlight record and lease for this request.
    pub fn takes_ownership(&self) -> bool {
        matches!(self, Decision::Execute | Decision::TakeOver)
    }
}

/// Decides what an arriving guarded request with `fingerprint` gets (docs/behaviour.md §4's table).
/// Takes the existing record by value, so a replay moves the stored response out of it.
pub fn decide(existing: Option<Existing>, fingerprint: &Fingerprint, unknown_outcome: UnknownOutcome) -> Decision {
    let Some(existing) = existing else {
        return Decision::Execute;
    };
    if existing.record.fingerprint() != fingerprint {
        return Decision::Mismatch;
    }
    match existing.record {
        Record::InFlight { .. } => match existing.lease_left {
            Some(_) => Decision::InFlight {
                retry_after: CONFLICT_RETRY_AFTER,
            },
            None => match unknown_outcome {
                UnknownOutcome::Retry => Decision::TakeOver,
                UnknownOutcome::Reject => Decision::MarkUnknown,
            },
        },
        Record::Completed { response, .. } => Decision::Replay(response),
        Record::Unknown { cause, .. } => Decision::Unknown(cause),
    }
}

/// `Retry-After` (RFC 9110 §10.2.3) for a conflict: one second, the smallest whole number the
/// field can carry; most first requests finish within it, and the lease is renewed while they run.
pub const CONFLICT_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::record::LeaseToken;
    use bytes::Bytes;
    use proptest::prelude::*;

    const FP: Fingerprint = Fingerprint([1; 32]);
    const OTHER: Fingerprint = Fingerprint([2; 32]);

    fn in_flight(fingerprint: Fingerprint, lease_left: Option<Duration>) -> Existing {
        Existing {
            record: Record::InFlight {
                fingerprint,
                owner: LeaseToken([0; 16]),
                started_at_ms: 0,
                lease_until_ms: 0,
            },
            lease_left,
        }
    }

    fn completed(fingerprint: Fingerprint) -> Existing {
        Existing {
            record: Record::Completed {
                fingerprint,
                response: StoredResponse {
                    status: http::StatusCode::CREATED,
                    headers: vec![],
                    body: Some(Bytes::from_static(b"ok")),
                    completed_at_ms: 0,
                },
            },
            lease_left: None,
        }
    }

    fn unknown(fingerprint: Fingerprint) -> Existing {
        Existing {
            record: Record::Unknown {
                fingerprint,
                since_ms: 0,
                cause: UnknownCause::Timeout,
            },
            lease_left: None,
        }
    }

    #[test]
    fn table_rows() {
        use UnknownOutcome::*;
        assert_eq!(decide(None, &FP, Reject), Decision::Execute);
        let alive = in_flight(FP, Some(Duration::from_millis(2500)));
        assert_eq!(
            decide(Some(alive.clone()), &FP, Reject),
            Decision::InFlight {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(decide(Some(alive.clone()), &OTHER, Reject), Decision::Mismatch);
        let lapsed = in_flight(FP, None);
        assert_eq!(decide(Some(lapsed.clone()), &FP, Reject), Decision::MarkUnknown);
        assert_eq!(decide(Some(lapsed.clone()), &FP, Retry), Decision::TakeOver);
        assert_eq!(decide(Some(lapsed.clone()), &OTHER, Retry), Decision::Mismatch);
        assert!(matches!(decide(Some(completed(FP)), &FP, Reject), Decision::Replay(r) if r.status == 201));
        assert_eq!(decide(Some(completed(FP)), &OTHER, Reject), Decision::Mismatch);
        assert_eq!(
            decide(Some(unknown(FP)), &FP, Retry),
            Decision::Unknown(UnknownCause::Timeout)
        );
        assert_eq!(decide(Some(unknown(FP)), &OTHER, Reject), Decision::Mismatch);
    }

    proptest! {
        /// Ownership is granted only when there is no record or its owner's lease lapsed, and
        /// never to a request whose fingerprint differs from the record's.
        #[test]
        fn ownership_only_without_a_live_owner(
            state in 0u8..4, same in any::<bool>(), lease_ms in proptest::option::of(1u64..100_000), retry in any::<bool>()
        ) {
            let fp = if same { FP } else { OTHER };
            let existing = match state {
                0 => None,
                1 => Some(in_flight(FP, lease_ms.map(Duration::from_millis))),
                2 => Some(completed(FP)),
                _ => Some(unknown(FP)),
            };
            let outcome = if retry { UnknownOutcome::Retry } else { UnknownOutcome::Reject };
            let decision = decide(existing.clone(), &fp, outcome);
            if decision.takes_ownership() {
                let unowned = existing
                    .as_ref()
                    .is_none_or(|e| e.lease_left.is_none() && matches!(e.record, Record::InFlight { .. }));
                prop_assert!(unowned);
                prop_assert!(existing.is_none() || same);
            }
            if existing.is_some() && !same {
                prop_assert_eq!(decision, Decision::Mismatch);
            }
        }
    }
}
