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

/// The settlement of `exchange` under the route's `policy`:
/// - a response is recorded, except a 5xx when `record_server_errors` is off (released);
/// - a request that never reached the upstream is released (it cannot have acted);
/// - a request sent without a complete answer is marked `Unknown`, or released under
///   `unknown_outcome = "retry"` (at-least-once by the operator's choice).
pub fn settle(exchange: Exchange, policy: &Policy) -> Settlement {
    match exchange {
        Exchange::Answered(status) if status.is_server_error() && !policy.record_server_errors => Settlement::Release,
        Exchange::Answered(_) => Settlement::Record,
        Exchange::NotSent => Settlement::Release,
        Exchange::NoCompleteAnswer(cause) => match policy.unknown_outcome {
            UnknownOutcome::Reject => Settlement::MarkUnknown(cause),
            UnknownOutcome::Retry => Settlement::Release,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;

    fn policy(record_server_errors: bool, unknown_outcome: UnknownOutcome) -> Policy {
        let config = Config::from_toml("upstream.url = \"http://127.0.0.1:1\"").expect("valid");
        let mut policy = config.routes[0].policy.clone();
        policy.record_server_errors = record_server_errors;
        policy.unknown_outcome = unknown_outcome;
        policy
    }

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).expect("valid status")
    }

    #[test]
    fn table_rows() {
        use Settlement::*;
        use UnknownOutcome::*;
        let defaults = policy(true, Reject);
        assert_eq!(settle(Exchange::Answered(status(201)), &defaults), Record);
        assert_eq!(settle(Exchange::Answered(status(404)), &defaults), Record);
        assert_eq!(settle(Exchange::Answered(status(500)), &defaults), Record);
        assert_eq!(settle(Exchange::Answered(status(503)), &defaults), Record);
        assert_eq!(settle(Exchange::NotSent, &defaults), Release);
        assert_eq!(
            settle(Exchange::NoCompleteAnswer(UnknownCause::Timeout), &defaults),
            MarkUnknown(UnknownCause::Timeout)
        );
        assert_eq!(
            settle(Exchange::NoCompleteAnswer(UnknownCause::UpstreamFailed), &defaults),
            MarkUnknown(UnknownCause::UpstreamFailed)
        );
        let release_5xx = policy(false, Reject);
        assert_eq!(settle(Exchange::Answered(status(502)), &release_5xx), Release);
        assert_eq!(settle(Exchange::Answered(status(499)), &release_5xx), Record);
        let retry = policy(true, Retry);
        assert_eq!(
            settle(Exchange::NoCompleteAnswer(UnknownCause::Timeout), &retry),
            Release
        );
        assert_eq!(settle(Exchange::Answered(status(200)), &retry), Record);
    }

    fn exchanges() -> impl Strategy<Value = Exchange> {
        prop_oneof![
            (100u16..=599).prop_map(|code| Exchange::Answered(status(code))),
            Just(Exchange::NotSent),
            prop_oneof![
                Just(UnknownCause::Timeout),
                Just(UnknownCause::UpstreamFailed),
                Just(UnknownCause::Interrupted)
            ]
            .prop_map(Exchange::NoCompleteAnswer),
        ]
    }

    proptest! {
        /// At most once: a key is released only when the upstream cannot have acted, or when
        /// the operator chose at-least-once (a 5xx not recorded, `unknown_outcome = "retry"`).
        #[test]
        fn released_only_when_safe_or_chosen(
            exchange in exchanges(), record_server_errors in any::<bool>(), retry in any::<bool>()
        ) {
            let unknown = if retry { UnknownOutcome::Retry } else { UnknownOutcome::Reject };
            let settlement = settle(exchange, &policy(record_server_errors, unknown));
            if settlement == Settlement::Release {
                let safe = exchange == Exchange::NotSent;
                let chosen_5xx = matches!(exchange, Exchange::Answered(s) if s.is_server_error()) && !record_server_errors;
                let chosen_retry = matches!(exchange, Exchange::NoCompleteAnswer(_)) && retry;
                prop_assert!(safe || chosen_5xx || chosen_retry, "{exchange:?} released");
            }
        }

        /// Only a complete answer is ever recorded, and `Unknown` keeps the exchange's cause.
        #[test]
        fn records_answers_and_keeps_causes(
            exchange in exchanges(), record_server_errors in any::<bool>(), retry in any::<bool>()
        ) {
            let unknown = if retry { UnknownOutcome::Retry } else { UnknownOutcome::Reject };
            match settle(exchange, &policy(record_server_errors, unknown)) {
                Settlement::Record => prop_assert!(matches!(exchange, Exchange::Answered(_))),
                Settlement::MarkUnknown(cause) => {
                    prop_assert_eq!(exchange, Exchange::NoCompleteAnswer(cause));
                    prop_assert!(!retry);
                }
                Settlement::Release => {}
            }
        }
    }
}
