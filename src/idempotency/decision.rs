//! The decision table of docs/behaviour.md §4, as one pure function.
//!
//! Every store applies [`decide`]'s verdict atomically: the memory store calls it under its
//! lock; the Redis store calls it on the record its `SET … NX GET` read (a verdict that changes
//! that record, a takeover, is applied by a compare-and-set on it). The store contract tests
//! hold both stores to it.

use std::time::Duration;

use super::fingerprint::{Comparison, Print};
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
    /// A Completed or Unknown record the request cannot be compared with yet (docs/behaviour.md
    /// §15.2): the request hashes its body in the record's scheme, then [`decide`]s again on
    /// this record (no further store step).
    Verify(Record),
}

impl Decision {
    /// Whether the store must write a fresh InFlight record and lease for this request.
    pub fn takes_ownership(&self) -> bool {
        matches!(self, Decision::Execute | Decision::TakeOver)
    }
}

/// Decides what an arriving guarded request with `print` gets (docs/behaviour.md §4's table),
/// comparing fingerprints by the one rule of §15.2 ([`Print::compare`]): a request that cannot
/// be compared yet gets `409` while the key is in flight, is taken for the same request when
/// the owner's lease lapsed, and is sent to [`Decision::Verify`] against a finished record.
/// Takes the existing record by value, so a replay moves the stored response out of it.
pub fn decide(existing: Option<Existing>, print: &Print, unknown_outcome: UnknownOutcome) -> Decision {
    let Some(existing) = existing else {
        return Decision::Execute;
    };
    let undecided = match print.compare(existing.record.fingerprint()) {
        Comparison::Different => return Decision::Mismatch,
        Comparison::Same => false,
        Comparison::Undecided => true,
    };
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
        record if undecided => Decision::Verify(record),
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
    use crate::idempotency::fingerprint::{Fingerprint, HeadHash, Scheme};
    use crate::idempotency::record::LeaseToken;
    use bytes::Bytes;
    use proptest::prelude::*;

    const FP: Fingerprint = Fingerprint::bytes([1; 32]);
    const OTHER: Fingerprint = Fingerprint::bytes([2; 32]);

    fn whole(fingerprint: Fingerprint) -> Print {
        Print::Whole(fingerprint)
    }

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
        assert_eq!(decide(None, &whole(FP), Reject), Decision::Execute);
        let alive = in_flight(FP, Some(Duration::from_millis(2500)));
        assert_eq!(
            decide(Some(alive.clone()), &whole(FP), Reject),
            Decision::InFlight {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(decide(Some(alive.clone()), &whole(OTHER), Reject), Decision::Mismatch);
        let lapsed = in_flight(FP, None);
        assert_eq!(decide(Some(lapsed.clone()), &whole(FP), Reject), Decision::MarkUnknown);
        assert_eq!(decide(Some(lapsed.clone()), &whole(FP), Retry), Decision::TakeOver);
        assert_eq!(decide(Some(lapsed.clone()), &whole(OTHER), Retry), Decision::Mismatch);
        assert!(matches!(decide(Some(completed(FP)), &whole(FP), Reject), Decision::Replay(r) if r.status == 201));
        assert_eq!(decide(Some(completed(FP)), &whole(OTHER), Reject), Decision::Mismatch);
        assert_eq!(
            decide(Some(unknown(FP)), &whole(FP), Retry),
            Decision::Unknown(UnknownCause::Timeout)
        );
        assert_eq!(decide(Some(unknown(FP)), &whole(OTHER), Reject), Decision::Mismatch);
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
            let decision = decide(existing.clone(), &whole(fp), outcome);
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

    /// A request, as its three possible prints: read whole, streamed with its body's digest
    /// known, streamed with it pending. `body` and `head` pick one of two of each.
    fn prints(head: bool, body: bool) -> [Print; 3] {
        let method = http::Method::POST;
        let uri: http::Uri = if head { "/a" } else { "/b" }.parse().expect("uri");
        let bytes: &[u8] = if body { b"one" } else { b"two" };
        let head = HeadHash::of(&method, &uri, None);
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(bytes).into();
        [
            Print::Whole(Fingerprint::of(&method, &uri, None, bytes)),
            Print::Streamed {
                head,
                body: Some(digest),
            },
            Print::Streamed { head, body: None },
        ]
    }

    /// What a request gets when it hashes its body in `record`'s scheme after a
    /// [`Decision::Verify`]: its print complete in that scheme.
    fn verified(prints: &[Print; 3], record: &Record) -> Print {
        match record.fingerprint().scheme {
            Scheme::Bytes => prints[0],
            Scheme::Digest | Scheme::Head => prints[1],
        }
    }

    fn record_in(state: u8, fingerprint: Fingerprint, lease_left: Option<Duration>) -> Existing {
        let mut existing = match state {
            0 => in_flight(fingerprint, lease_left),
            1 => completed(fingerprint),
            _ => unknown(fingerprint),
        };
        if let Record::InFlight { fingerprint: f, .. } = &mut existing.record {
            *f = fingerprint;
        }
        existing
    }

    #[test]
    fn schemes_rows() {
        use UnknownOutcome::*;
        let [whole, known, pending] = prints(true, true);
        let [_, other_known, other_pending] = prints(true, false);
        let alive = Some(Duration::from_secs(5));
        // An owner streaming without Content-Digest: its record is head-only.
        let pending_owner = in_flight(pending.fingerprint(), alive);
        assert!(matches!(
            decide(Some(pending_owner.clone()), &other_pending, Reject),
            Decision::InFlight { .. }
        ));
        assert!(matches!(
            decide(Some(pending_owner.clone()), &other_known, Reject),
            Decision::InFlight { .. }
        ));
        let [_, _, other_head] = prints(false, true);
        assert_eq!(decide(Some(pending_owner), &other_head, Reject), Decision::Mismatch);
        // An owner with Content-Digest: a retry with another digest is 422 at once.
        let known_owner = in_flight(known.fingerprint(), alive);
        assert_eq!(
            decide(Some(known_owner.clone()), &other_known, Reject),
            Decision::Mismatch
        );
        assert!(matches!(
            decide(Some(known_owner), &pending, Reject),
            Decision::InFlight { .. }
        ));
        // A finished streamed record: a retry whose digest is pending verifies, then decides.
        let done = completed(known.fingerprint());
        let Decision::Verify(record) = decide(Some(done.clone()), &pending, Reject) else {
            panic!("expected Verify");
        };
        assert!(matches!(
            decide(
                Some(Existing {
                    record,
                    lease_left: None
                }),
                &known,
                Reject
            ),
            Decision::Replay(_)
        ));
        assert_eq!(decide(Some(done.clone()), &other_known, Reject), Decision::Mismatch);
        // A record written before streaming existed (`bytes`) and a retry that now streams.
        let legacy = completed(whole.fingerprint());
        assert!(matches!(
            decide(Some(legacy.clone()), &known, Reject),
            Decision::Verify(_)
        ));
        assert!(matches!(decide(Some(legacy), &whole, Reject), Decision::Replay(_)));
    }

    proptest! {
        /// The same request is never refused as another, whatever print each side had, and a
        /// Verify is always settled by the print complete in the record's scheme; a request
        /// with another body is never replayed unless the record had only its head.
        #[test]
        fn one_comparison_rule(
            state in 0u8..3, first in 0usize..3, retry in 0usize..3, same_head in any::<bool>(),
            same_body in any::<bool>(), lease_ms in proptest::option::of(1u64..100_000), take_over in any::<bool>()
        ) {
            let original = prints(true, true);
            let arriving = prints(same_head, same_body);
            let stored = original[first].fingerprint();
            let existing = record_in(state, stored, lease_ms.map(Duration::from_millis));
            let outcome = if take_over { UnknownOutcome::Retry } else { UnknownOutcome::Reject };
            let mut decision = decide(Some(existing.clone()), &arriving[retry], outcome);
            if let Decision::Verify(record) = decision {
                let in_flight = matches!(record, Record::InFlight { .. });
                prop_assert!(!in_flight);
                let print = verified(&arriving, &record);
                decision = decide(Some(Existing { record, lease_left: None }), &print, outcome);
                prop_assert!(!matches!(decision, Decision::Verify(_)), "verified yet undecided");
            }
            if same_head && same_body {
                prop_assert_ne!(decision.clone(), Decision::Mismatch);
            }
            // A request that cannot be compared with an InFlight record gets 409, or is taken
            // for the same when its owner's lease lapsed (docs/behaviour.md §15.2); every other
            // request with another head is refused.
            let undecided_in_flight = state == 0 && arriving[retry].compare(&stored) == Comparison::Undecided;
            if undecided_in_flight && lease_ms.is_some() {
                let conflict = matches!(decision, Decision::InFlight { .. });
                prop_assert!(conflict);
            }
            if !same_head && !undecided_in_flight {
                prop_assert_eq!(decision.clone(), Decision::Mismatch);
            }
            let replayed = matches!(decision, Decision::Replay(_) | Decision::Unknown(_));
            if replayed && !same_body {
                prop_assert_eq!(stored.scheme, Scheme::Head);
            }
        }
    }
}
