//! What an execution's key records once its upstream exchange is over (docs/behaviour.md §5),
//! as one pure function: [`settle`] is to the end of an execution what
//! [`decide`](super::decide) is to its start. The owner applies the verdict through its lease.

use http::StatusCode;

use super::record::UnknownCause;
use crate::config::{Policy, UnknownOutcome};

/// How the upstream exchange of a guarded request ended, as far as its key is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// A complete response came back with this status.
    Answered(StatusCode),
    /// The request never reached the upstream (connect, DNS, TLS handshake failure).
    NotSent,
    /// The request was sent (or may have been) but no complete response came back.
    NoCompleteAnswer(UnknownCause),
    /// The request's body stopped before its end reached the upstream (the client broke it,
    /// it passed `max_body_bytes`, it did not match its `Content-Digest`, or the upstream
    /// connection failed mid-body), and no answer came back: the upstream never got a complete
    /// request (docs/behaviour.md §15.4).
    RequestCut,
}

/// What the owner does with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Store the response as the key's result: every retry replays it.
    Record,
    /// Delete the key: a retry executes again.
    Release,
    /// Mark the key `Unknown`: every retry gets the outcome-unknown problem.
    MarkUnknown(UnknownCause),
}

/// The settlement of `exchange` under the route's `policy` (docs/behaviour.md §5, §14):
/// - a response whose status is in `unknown_statuses` leaves the outcome unknown (below);
///   otherwise one in `release_statuses` (the upstream says it did not process the request,
///   default `429` and `503`) is released, and so is any 5xx when `record_server_errors` is off;
///   every other response is recorded. Precedence: unknown, then release, then record;
/// - a request that never reached the upstream, or never reached it whole, is released (it
///   cannot have acted);
/// - a request sent without a complete answer (or answered with an unknown status) is marked
///   `Unknown`, or released under `unknown_outcome = "retry"` (at-least-once by the operator's
///   choice).
pub fn settle(exchange: Exchange, policy: &Policy) -> Settlement {
    match exchange {
        Exchange::Answered(status) if policy.unknown_statuses.contains(status) => {
            unknown(UnknownCause::UpstreamStatus, policy)
        }
        Exchange::Answered(status)
            if policy.release_statuses.contains(status)
                || (status.is_server_error() && !policy.record_server_errors) =>
        {
            Settlement::Release
        }
        Exchange::Answered(_) => Settlement::Record,
        Exchange::NotSent | Exchange::RequestCut => Settlement::Release,
        Exchange::NoCompleteAnswer(cause) => unknown(cause, policy),
    }
}

/// An outcome that may or may not have taken effect, as `unknown_outcome` says.
fn unknown(cause: UnknownCause, policy: &Policy) -> Settlement {
    match policy.unknown_outcome {
        UnknownOutcome::Reject => Settlement::MarkUnknown(cause),
        UnknownOutcome::Retry => Settlement::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, StatusSet};
    use proptest::prelude::*;

    /// The default policy with these settings (status lists as in the configuration).
    fn policy(record_server_errors: bool, unknown_outcome: UnknownOutcome, release: &[u16], unknown: &[u16]) -> Policy {
        let config = Config::from_toml("upstream.url = \"http://127.0.0.1:1\"").expect("valid");
        let mut policy = config.routes[0].policy.clone();
        policy.record_server_errors = record_server_errors;
        policy.unknown_outcome = unknown_outcome;
        policy.release_statuses = StatusSet::of(release).expect("statuses");
        policy.unknown_statuses = StatusSet::of(unknown).expect("statuses");
        policy
    }

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).expect("valid status")
    }

    fn answered(code: u16) -> Exchange {
        Exchange::Answered(status(code))
    }

    #[test]
    fn defaults_release_429_and_503_and_record_the_rest() {
        use Settlement::*;
        let config = Config::from_toml("upstream.url = \"http://127.0.0.1:1\"").expect("valid");
        let defaults = &config.routes[0].policy;
        for (code, expected) in [
            (201, Record),
            (404, Record),
            (409, Record),
            (500, Record),
            (502, Record),
            (504, Record),
            (429, Release),
            (503, Release),
        ] {
            assert_eq!(settle(answered(code), defaults), expected, "{code}");
        }
        assert_eq!(settle(Exchange::NotSent, defaults), Release);
        assert_eq!(settle(Exchange::RequestCut, defaults), Release);
        for cause in [UnknownCause::Timeout, UnknownCause::UpstreamFailed] {
            assert_eq!(settle(Exchange::NoCompleteAnswer(cause), defaults), MarkUnknown(cause));
        }
    }

    /// One row of [`table_rows`]: record_server_errors, unknown_outcome, release_statuses,
    /// unknown_statuses, the answer's status, the settlement.
    type Row = (bool, UnknownOutcome, &'static [u16], &'static [u16], u16, Settlement);

    #[test]
    fn table_rows() {
        use Settlement::*;
        use UnknownOutcome::*;
        let unknown = MarkUnknown(UnknownCause::UpstreamStatus);
        let rows: &[Row] = &[
            (true, Reject, &[429, 503], &[], 503, Release),
            (true, Reject, &[], &[], 503, Record),
            (true, Reject, &[429], &[502, 504], 504, unknown),
            (true, Reject, &[429], &[502, 504], 502, unknown),
            (true, Reject, &[429], &[502, 504], 500, Record),
            (true, Retry, &[429], &[504], 504, Release),
            // Unknown wins over release, and over record_server_errors = false.
            (true, Reject, &[504], &[504], 504, unknown),
            (false, Reject, &[], &[504], 504, unknown),
            (false, Reject, &[], &[504], 500, Release),
            (false, Reject, &[], &[], 502, Release),
            (false, Reject, &[], &[], 499, Record),
            (false, Reject, &[404], &[], 404, Release),
            (true, Retry, &[], &[], 200, Record),
        ];
        for &(record_server_errors, outcome, release, unknown_list, code, expected) in rows {
            let policy = policy(record_server_errors, outcome, release, unknown_list);
            assert_eq!(
                settle(answered(code), &policy),
                expected,
                "{code} with record_server_errors = {record_server_errors}, {outcome}, release {release:?}, unknown {unknown_list:?}"
            );
        }
        let retry = policy(true, Retry, &[], &[]);
        assert_eq!(
            settle(Exchange::NoCompleteAnswer(UnknownCause::Timeout), &retry),
            Release
        );
    }

    fn exchanges() -> impl Strategy<Value = Exchange> {
        prop_oneof![
            (100u16..=599).prop_map(answered),
            Just(Exchange::NotSent),
            Just(Exchange::RequestCut),
            prop_oneof![
                Just(UnknownCause::Timeout),
                Just(UnknownCause::UpstreamFailed),
                Just(UnknownCause::Interrupted)
            ]
            .prop_map(Exchange::NoCompleteAnswer),
        ]
    }

    /// A policy with arbitrary settings: status lists drawn from a few interesting codes.
    fn policies() -> impl Strategy<Value = Policy> {
        let codes = proptest::sample::subsequence(vec![200, 404, 409, 429, 500, 502, 503, 504], 0..=4);
        (any::<bool>(), any::<bool>(), codes.clone(), codes).prop_map(|(record, retry, release, unknown)| {
            let outcome = if retry {
                UnknownOutcome::Retry
            } else {
                UnknownOutcome::Reject
            };
            policy(record, outcome, &release, &unknown)
        })
    }

    proptest! {
        /// At most once: a key is released only when the upstream cannot have acted, or said it
        /// did not, or when the operator chose at-least-once (a 5xx not recorded,
        /// `unknown_outcome = "retry"`).
        #[test]
        fn released_only_when_safe_or_chosen(exchange in exchanges(), policy in policies()) {
            if settle(exchange, &policy) == Settlement::Release {
                let safe = matches!(exchange, Exchange::NotSent | Exchange::RequestCut);
                let said_so = matches!(exchange, Exchange::Answered(s) if policy.release_statuses.contains(s));
                let chosen_5xx = matches!(exchange, Exchange::Answered(s) if s.is_server_error()) && !policy.record_server_errors;
                let chosen_retry = policy.unknown_outcome == UnknownOutcome::Retry
                    && match exchange {
                        Exchange::NoCompleteAnswer(_) => true,
                        Exchange::Answered(s) => policy.unknown_statuses.contains(s),
                        Exchange::NotSent | Exchange::RequestCut => false,
                    };
                prop_assert!(safe || said_so || chosen_5xx || chosen_retry, "{exchange:?} released");
            }
        }

        /// Only a complete answer is ever recorded, never one with an unknown status; `Unknown`
        /// keeps the exchange's cause.
        #[test]
        fn records_answers_and_keeps_causes(exchange in exchanges(), policy in policies()) {
            match settle(exchange, &policy) {
                Settlement::Record => {
                    let recordable = matches!(exchange, Exchange::Answered(s) if !policy.unknown_statuses.contains(s) && !policy.release_statuses.contains(s));
                    prop_assert!(recordable, "{exchange:?} recorded");
                }
                Settlement::MarkUnknown(cause) => {
                    prop_assert_eq!(policy.unknown_outcome, UnknownOutcome::Reject);
                    match exchange {
                        Exchange::Answered(s) => {
                            prop_assert!(policy.unknown_statuses.contains(s));
                            prop_assert_eq!(cause, UnknownCause::UpstreamStatus);
                        }
                        other => prop_assert_eq!(other, Exchange::NoCompleteAnswer(cause)),
                    }
                }
                Settlement::Release => {}
            }
        }
    }
}
