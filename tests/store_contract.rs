mod common;

// The store contract (docs/behaviour.md §4-§5): one suite, run against every store.
//
// Each contract is a generic `async fn(&S) where S: Store` in `contract`; `per_store!` (in
// `common`) instantiates it once per store (`memory_store::<name>` on a fresh `MemoryStore`,
// `disk_store::<name>` on a fresh `DiskStore` in its own temporary directory,
// `redis_store::<name>` on a fresh `RedisStore` backed by its own `redis-server`,
// `replicated_redis_store::<name>` on one with `min_replicas = 1` over a primary and its
// replica, whose writes travel in group-committed batches with their `WAIT`). Every contract
// uses keys of its own, so the suite could also share one server. Store-specific behaviour (the
// memory store's bound; Redis corrupt records, command budget and outages) follows at the end.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use idemproxy::config::UnknownOutcome;
use idemproxy::idempotency::{
    unix_ms, Fingerprint, HeadHash, LeaseToken, Print, Record, RecordError, Scheme, StorageKey, StoredResponse,
    UnknownCause, CONFLICT_RETRY_AFTER,
};
use idemproxy::store::{
    Begin, BeginRequest, DiskStore, KeyState, MemoryStore, RedisOptions, RedisStore, Store, StoreError,
};
use idemproxy::telemetry::DiskStoreMetrics;

use common::{per_store, RedisServer};
use contract::*;

const KEY_TTL: Duration = Duration::from_secs(60);
const LOCK_TTL: Duration = Duration::from_secs(30);
const FP: u8 = 1;
const OTHER_FP: u8 = 2;

/// A storage key of its own for each test (`key-<name>`).
fn key(name: &str) -> StorageKey {
    StorageKey::new("test:", "route", b"scope", format!("key-{name}").as_bytes())
}

/// An arriving request with fingerprint `[fp; 32]` and a fresh token.
fn request(
    key: &StorageKey,
    fp: u8,
    key_ttl: Duration,
    lock_ttl: Duration,
    outcome: UnknownOutcome,
) -> BeginRequest<'_> {
    BeginRequest {
        key,
        print: Print::Whole(Fingerprint::bytes([fp; 32])),
        token: LeaseToken::random(),
        key_ttl,
        lock_ttl,
        unknown_outcome: outcome,
        now_ms: unix_ms(),
    }
}

/// A request with the default TTLs and `unknown_outcome = reject`.
fn req(key: &StorageKey, fp: u8) -> BeginRequest<'_> {
    request(key, fp, KEY_TTL, LOCK_TTL, UnknownOutcome::Reject)
}

fn response(status: u16, body: Option<&[u8]>) -> StoredResponse {
    StoredResponse {
        status: StatusCode::from_u16(status).expect("status"),
        headers: vec![
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("x-request-id"),
                HeaderValue::from_static("abc-123"),
            ),
            (HeaderName::from_static("set-cookie"), HeaderValue::from_static("a=1")),
            (HeaderName::from_static("set-cookie"), HeaderValue::from_static("b=2")),
        ],
        body: body.map(Bytes::copy_from_slice),
        completed_at_ms: unix_ms(),
    }
}

fn completed(fp: u8, response: &StoredResponse) -> Record {
    Record::Completed {
        fingerprint: Fingerprint::bytes([fp; 32]),
        response: response.clone(),
    }
}

fn in_flight() -> Begin<LeaseToken> {
    Begin::InFlight {
        retry_after: CONFLICT_RETRY_AFTER,
    }
}

async fn begin<S: Store>(store: &S, request: &BeginRequest<'_>) -> Begin<LeaseToken> {
    store.begin(request).await.expect("begin answers")
}

async fn lookup<S: Store>(store: &S, key: &StorageKey) -> Option<KeyState> {
    store.lookup(key).await.expect("lookup answers")
}

/// The key's record, asserting it exists.
async fn record<S: Store>(store: &S, key: &StorageKey) -> Record {
    lookup(store, key).await.expect("the key has a record").existing.record
}

/// The contracts, generic over the store.
mod contract {
    use super::*;

    /// A new key is owned by the first request; the same request again conflicts while the lease
    /// lives (whatever `unknown_outcome` says); a different request is a mismatch.
    pub async fn new_key_owner_then_in_flight_then_mismatch<S: Store>(store: &S) {
        let k = key("new-key");
        let first = req(&k, FP);
        assert_eq!(begin(store, &first).await, Begin::Owner(first.token));
        assert_eq!(begin(store, &req(&k, FP)).await, in_flight());
        let retry = request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry);
        assert_eq!(begin(store, &retry).await, in_flight());
        assert_eq!(begin(store, &req(&k, OTHER_FP)).await, Begin::Mismatch);
        let other_retry = request(&k, OTHER_FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry);
        assert_eq!(begin(store, &other_retry).await, Begin::Mismatch);
        // None of them touched the first request's record.
        assert_eq!(record(store, &k).await, first.in_flight_record());
        // Keys are independent.
        let fresh_key = key("new-key-2");
        let attempt = req(&fresh_key, FP);
        assert_eq!(begin(store, &attempt).await, Begin::Owner(attempt.token));
    }

    /// Streamed bodies (docs/behaviour.md §15.2) in every store: an owner known by its head only
    /// conflicts with a retry of the same head (whatever its body) and is a mismatch for another
    /// head; its lease renews (the Redis scripts accept its record version); its result recorded
    /// with the body's digest replays for that digest, is a mismatch for another, and sends a
    /// retry whose digest is not known yet to verify it.
    pub async fn streamed_prints_share_one_comparison_rule<S: Store>(store: &S) {
        let method = http::Method::POST;
        let uri: http::Uri = "/uploads".parse().expect("uri");
        let head = HeadHash::of(&method, &uri, None);
        let other_head = HeadHash::of(&method, &"/other".parse().expect("uri"), None);
        let streamed = |k, head, body| BeginRequest {
            print: Print::Streamed { head, body },
            ..req(k, FP)
        };
        let k = key("streamed");
        let owner = streamed(&k, head, None);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        assert_eq!(record(store, &k).await.fingerprint().scheme, Scheme::Head);
        assert_eq!(begin(store, &streamed(&k, head, Some([2; 32]))).await, in_flight());
        assert_eq!(begin(store, &streamed(&k, head, None)).await, in_flight());
        assert_eq!(begin(store, &streamed(&k, other_head, None)).await, Begin::Mismatch);
        assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(true));
        let done = Record::Completed {
            fingerprint: head.with_body(&[1; 32]),
            response: response(201, Some(b"done")),
        };
        assert_eq!(store.complete(&k, owner.token, &done).await, Ok(true));
        assert!(matches!(begin(store, &streamed(&k, head, Some([1; 32]))).await, Begin::Replay(r) if r.status == 201));
        assert_eq!(begin(store, &streamed(&k, head, Some([2; 32]))).await, Begin::Mismatch);
        assert_eq!(
            begin(store, &streamed(&k, head, None)).await,
            Begin::Verify(done.clone())
        );
        // A body read whole against it: verified too (its bytes hash to a digest).
        assert_eq!(begin(store, &req(&k, FP)).await, Begin::Verify(done));
    }

    /// A completed key replays exactly what was stored (status, headers in order, body), every
    /// time; a different request is a mismatch.
    pub async fn completed_key_replays<S: Store>(store: &S) {
        let mut binary = vec![0u8; 100 * 1024];
        for (i, b) in binary.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let cases: [(&str, StoredResponse); 4] = [
            ("replay-json", response(201, Some(br#"{"id":1}"#))),
            ("replay-binary", response(200, Some(&binary))),
            ("replay-5xx-empty", response(503, Some(b""))),
            ("replay-too-large", response(200, None)),
        ];
        for (name, stored) in cases {
            let k = key(name);
            let owner = req(&k, FP);
            assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token), "{name}");
            assert_eq!(
                store.complete(&k, owner.token, &completed(FP, &stored)).await,
                Ok(true),
                "{name}"
            );
            for _ in 0..2 {
                match begin(store, &req(&k, FP)).await {
                    Begin::Replay(replayed) => {
                        assert_eq!(replayed, stored, "{name}");
                        assert_eq!(replayed.status, stored.status);
                        assert_eq!(replayed.headers, stored.headers);
                        assert_eq!(replayed.body, stored.body);
                    }
                    other => panic!("{name}: expected a replay, got {other:?}"),
                }
            }
            let retry = request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry);
            assert_eq!(begin(store, &retry).await, Begin::Replay(stored.clone()), "{name}");
            assert_eq!(begin(store, &req(&k, OTHER_FP)).await, Begin::Mismatch, "{name}");
            let state = lookup(store, &k).await.expect("record");
            assert_eq!(state.existing.record, completed(FP, &stored), "{name}");
            assert_eq!(state.existing.lease_left, None, "{name}: completion drops the lease");
        }
    }

    /// complete/release/renew are compare-and-set on the owner token: a wrong token changes
    /// nothing, and once completed, the former owner's token owns nothing either.
    pub async fn wrong_or_stale_token_is_refused<S: Store>(store: &S) {
        let k = key("wrong-token");
        let owner = req(&k, FP);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        let intruder = LeaseToken::random();
        let stored = response(201, Some(b"ok"));
        assert_eq!(store.complete(&k, intruder, &completed(FP, &stored)).await, Ok(false));
        assert_eq!(store.release(&k, intruder).await, Ok(false));
        assert_eq!(store.renew(&k, intruder, Duration::from_secs(600)).await, Ok(false));
        let state = lookup(store, &k).await.expect("record");
        assert_eq!(state.existing.record, owner.in_flight_record());
        let lease = state.existing.lease_left.expect("the owner's lease lives");
        assert!(lease <= LOCK_TTL, "a wrong token did not renew the lease: {lease:?}");
        assert_eq!(begin(store, &req(&k, FP)).await, in_flight());

        // On a missing key nobody owns anything.
        let missing = key("wrong-token-missing");
        assert_eq!(
            store.complete(&missing, intruder, &completed(FP, &stored)).await,
            Ok(false)
        );
        assert_eq!(store.release(&missing, intruder).await, Ok(false));
        assert_eq!(store.renew(&missing, intruder, LOCK_TTL).await, Ok(false));
        assert_eq!(
            lookup(store, &missing).await,
            None,
            "a refused operation creates nothing"
        );

        // Completed: the owner's token is stale now.
        assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
        let other = response(500, Some(b"overwritten"));
        assert_eq!(store.complete(&k, owner.token, &completed(FP, &other)).await, Ok(false));
        assert_eq!(store.release(&k, owner.token).await, Ok(false));
        assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(false));
        let state = lookup(store, &k).await.expect("record");
        assert_eq!(state.existing.record, completed(FP, &stored));
        assert_eq!(state.existing.lease_left, None, "a stale renew grants no lease");
        assert_eq!(begin(store, &req(&k, FP)).await, Begin::Replay(stored));
    }

    /// `unknown_outcome = retry`: A's lease lapses, B takes over; A can then neither complete,
    /// release nor renew, and B's record stays B's; B completes.
    pub async fn takeover_fences_the_lapsed_owner<S: Store>(store: &S) {
        let k = key("takeover");
        let lock_ttl = Duration::from_millis(200);
        let a = request(&k, FP, KEY_TTL, lock_ttl, UnknownOutcome::Retry);
        assert_eq!(begin(store, &a).await, Begin::Owner(a.token));
        tokio::time::sleep(Duration::from_millis(350)).await;
        // A different request still cannot take a lapsed key.
        let other = request(&k, OTHER_FP, KEY_TTL, lock_ttl, UnknownOutcome::Retry);
        assert_eq!(begin(store, &other).await, Begin::Mismatch);
        assert_eq!(record(store, &k).await, a.in_flight_record());

        let b = request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry);
        assert_eq!(begin(store, &b).await, Begin::Owner(b.token));
        let b_record = b.in_flight_record();

        let late = response(201, Some(b"from A"));
        assert_eq!(store.complete(&k, a.token, &completed(FP, &late)).await, Ok(false));
        assert_eq!(store.renew(&k, a.token, LOCK_TTL).await, Ok(false));
        assert_eq!(store.release(&k, a.token).await, Ok(false));
        let state = lookup(store, &k).await.expect("record");
        assert_eq!(state.existing.record, b_record, "B still owns the key");
        assert!(state.existing.lease_left.is_some(), "B's lease lives");
        assert_eq!(
            begin(store, &request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry)).await,
            in_flight()
        );

        let stored = response(201, Some(b"from B"));
        assert_eq!(store.renew(&k, b.token, LOCK_TTL).await, Ok(true));
        assert_eq!(store.complete(&k, b.token, &completed(FP, &stored)).await, Ok(true));
        assert_eq!(begin(store, &req(&k, FP)).await, Begin::Replay(stored));
    }

    /// The owner's release deletes the key: a retry executes.
    pub async fn release_lets_a_retry_execute<S: Store>(store: &S) {
        let k = key("release");
        let a = req(&k, FP);
        assert_eq!(begin(store, &a).await, Begin::Owner(a.token));
        assert_eq!(store.release(&k, a.token).await, Ok(true));
        assert_eq!(lookup(store, &k).await, None);
        assert_eq!(store.release(&k, a.token).await, Ok(false));
        // The retry may even be a different request: the key is free.
        let b = req(&k, OTHER_FP);
        assert_eq!(begin(store, &b).await, Begin::Owner(b.token));
        // A's token owns nothing of B's.
        assert_eq!(store.release(&k, a.token).await, Ok(false));
        assert_eq!(record(store, &k).await, b.in_flight_record());
        assert_eq!(store.release(&k, b.token).await, Ok(true));
        let attempt = req(&k, FP);
        assert_eq!(begin(store, &attempt).await, Begin::Owner(attempt.token));
    }

    /// Holds a 300ms lease for a second by renewing it every 100ms; a concurrent retry conflicts
    /// the whole time. Returns the owner's request.
    async fn renew_for_a_second<'k, S: Store>(
        store: &S,
        k: &'k StorageKey,
        outcome: UnknownOutcome,
    ) -> BeginRequest<'k> {
        let lock_ttl = Duration::from_millis(300);
        let owner = request(k, FP, KEY_TTL, lock_ttl, outcome);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(store.renew(k, owner.token, lock_ttl).await, Ok(true));
            let retry = request(k, FP, KEY_TTL, lock_ttl, outcome);
            assert_eq!(
                begin(store, &retry).await,
                in_flight(),
                "renewed at {:?}",
                started.elapsed()
            );
        }
        let state = lookup(store, k).await.expect("record");
        // Still the owner's record; the renewals moved its lease deadline on.
        let Record::InFlight {
            lease_until_ms: renewed_until,
            ..
        } = state.existing.record
        else {
            panic!("not InFlight: {:?}", state.existing.record);
        };
        let Record::InFlight {
            lease_until_ms: first_until,
            ..
        } = owner.in_flight_record()
        else {
            unreachable!("in_flight_record is InFlight");
        };
        assert!(renewed_until >= first_until + 900, "{renewed_until} vs {first_until}");
        let mut as_begun = state.existing.record.clone();
        if let Record::InFlight { lease_until_ms, .. } = &mut as_begun {
            *lease_until_ms = first_until;
        }
        assert_eq!(as_begun, owner.in_flight_record());
        assert!(state.existing.lease_left.is_some_and(|left| left <= lock_ttl));
        owner
    }

    /// `unknown_outcome = reject`: once the renewals stop and the lease lapses, the key is
    /// Unknown(LeaseLapsed) for this and every later request; the old owner is fenced off.
    pub async fn lapsed_lease_with_reject_marks_unknown<S: Store>(store: &S) {
        let k = key("lapse-reject");
        let owner = renew_for_a_second(store, &k, UnknownOutcome::Reject).await;
        tokio::time::sleep(Duration::from_millis(450)).await;
        let finder = req(&k, FP);
        assert_eq!(begin(store, &finder).await, Begin::Unknown(UnknownCause::LeaseLapsed));
        let state = lookup(store, &k).await.expect("record");
        assert_eq!(state.existing.record, finder.lapsed_record());
        assert_eq!(state.existing.lease_left, None);
        for outcome in [UnknownOutcome::Reject, UnknownOutcome::Retry, UnknownOutcome::Reject] {
            let later = request(&k, FP, KEY_TTL, LOCK_TTL, outcome);
            assert_eq!(begin(store, &later).await, Begin::Unknown(UnknownCause::LeaseLapsed));
        }
        assert_eq!(begin(store, &req(&k, OTHER_FP)).await, Begin::Mismatch);
        let late = response(201, Some(b"late"));
        assert_eq!(store.complete(&k, owner.token, &completed(FP, &late)).await, Ok(false));
        assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(false));
        assert_eq!(store.release(&k, owner.token).await, Ok(false));
        assert_eq!(record(store, &k).await, finder.lapsed_record());
    }

    /// `unknown_outcome = retry`: once the renewals stop and the lease lapses, the next request
    /// takes the key over.
    pub async fn lapsed_lease_with_retry_takes_over<S: Store>(store: &S) {
        let k = key("lapse-retry");
        let owner = renew_for_a_second(store, &k, UnknownOutcome::Retry).await;
        tokio::time::sleep(Duration::from_millis(450)).await;
        let next = request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry);
        assert_eq!(begin(store, &next).await, Begin::Owner(next.token));
        assert_eq!(record(store, &k).await, next.in_flight_record());
        assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(false));
        assert_eq!(
            begin(store, &request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry)).await,
            in_flight()
        );
    }

    /// Completing with an Unknown record makes every later request get that cause.
    pub async fn unknown_record_is_sticky<S: Store>(store: &S) {
        for cause in [
            UnknownCause::Timeout,
            UnknownCause::UpstreamFailed,
            UnknownCause::LeaseLapsed,
        ] {
            let k = key(&format!("unknown-{cause:?}"));
            let owner = req(&k, FP);
            assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
            let unknown = Record::Unknown {
                fingerprint: Fingerprint::bytes([FP; 32]),
                since_ms: unix_ms(),
                cause,
            };
            assert_eq!(store.complete(&k, owner.token, &unknown).await, Ok(true));
            for outcome in [UnknownOutcome::Reject, UnknownOutcome::Retry] {
                for _ in 0..2 {
                    let later = request(&k, FP, KEY_TTL, LOCK_TTL, outcome);
                    assert_eq!(begin(store, &later).await, Begin::Unknown(cause));
                }
            }
            assert_eq!(begin(store, &req(&k, OTHER_FP)).await, Begin::Mismatch);
            let state = lookup(store, &k).await.expect("record");
            assert_eq!(state.existing.record, unknown);
            assert_eq!(state.existing.lease_left, None);
            assert_eq!(store.release(&k, owner.token).await, Ok(false));
        }
    }

    /// A record lives `key_ttl` from its creation (completion keeps that expiry); afterwards the
    /// key is fresh.
    pub async fn key_ttl_expiry<S: Store>(store: &S) {
        // Long enough that a loaded machine (a replicated store waits for its replica's
        // acknowledgement) completes the key before it expires.
        let key_ttl = Duration::from_millis(1000);
        let k = key("key-ttl");
        let owner = request(&k, FP, key_ttl, LOCK_TTL, UnknownOutcome::Reject);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        let stored = response(201, Some(b"expiring"));
        assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
        let expires_in = lookup(store, &k).await.expect("record").expires_in.expect("an expiry");
        assert!(expires_in <= key_ttl && !expires_in.is_zero(), "{expires_in:?}");
        assert_eq!(begin(store, &req(&k, FP)).await, Begin::Replay(stored));
        tokio::time::sleep(key_ttl + Duration::from_millis(100)).await;
        assert_eq!(lookup(store, &k).await, None);
        // Fresh: even a different request may use the key now.
        let fresh = request(&k, OTHER_FP, key_ttl, LOCK_TTL, UnknownOutcome::Reject);
        assert_eq!(begin(store, &fresh).await, Begin::Owner(fresh.token));
        assert_eq!(record(store, &k).await, fresh.in_flight_record());

        // Completion keeps the expiry set at creation (it does not restart `key_ttl`).
        let k = key("key-ttl-kept");
        let owner = request(&k, FP, key_ttl, LOCK_TTL, UnknownOutcome::Reject);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        let half = key_ttl / 2;
        tokio::time::sleep(half).await;
        assert_eq!(
            store
                .complete(&k, owner.token, &completed(FP, &response(200, None)))
                .await,
            Ok(true)
        );
        let expires_in = lookup(store, &k).await.expect("record").expires_in.expect("an expiry");
        assert!(
            expires_in <= key_ttl - half,
            "completion kept the expiry: {expires_in:?}"
        );
        tokio::time::sleep(key_ttl - half + Duration::from_millis(100)).await;
        assert_eq!(lookup(store, &k).await, None);
        let attempt = req(&k, FP);
        assert_eq!(begin(store, &attempt).await, Begin::Owner(attempt.token));

        // An InFlight record expires too (its owner's lease outliving it changes nothing).
        let k = key("key-ttl-in-flight");
        let owner = request(&k, FP, key_ttl, LOCK_TTL, UnknownOutcome::Reject);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        tokio::time::sleep(key_ttl + Duration::from_millis(100)).await;
        assert_eq!(lookup(store, &k).await, None);
        assert_eq!(
            store
                .complete(&k, owner.token, &completed(FP, &response(200, None)))
                .await,
            Ok(false)
        );
        let attempt = req(&k, FP);
        assert_eq!(begin(store, &attempt).await, Begin::Owner(attempt.token));
    }

    /// Lookups show the record, the lease and the expiry; clear deletes a key whoever owns it.
    pub async fn lookup_and_clear<S: Store>(store: &S) {
        let k = key("lookup");
        assert_eq!(lookup(store, &k).await, None);
        assert_eq!(store.clear(&k).await, Ok(false), "clearing a missing key");

        let owner = req(&k, FP);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        let state = lookup(store, &k).await.expect("record");
        assert_eq!(state.existing.record, owner.in_flight_record());
        let lease = state.existing.lease_left.expect("leased");
        assert!(
            lease <= LOCK_TTL && lease > LOCK_TTL - Duration::from_secs(5),
            "{lease:?}"
        );
        let expires_in = state.expires_in.expect("an expiry");
        assert!(
            expires_in <= KEY_TTL && expires_in > KEY_TTL - Duration::from_secs(5),
            "{expires_in:?}"
        );

        let stored = response(201, Some(b"looked up"));
        assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
        let state = lookup(store, &k).await.expect("record");
        assert_eq!(state.existing.record, completed(FP, &stored));
        assert_eq!(state.existing.lease_left, None);
        assert!(state
            .expires_in
            .is_some_and(|e| e <= KEY_TTL && e > KEY_TTL - Duration::from_secs(5)));

        assert_eq!(store.clear(&k).await, Ok(true));
        assert_eq!(lookup(store, &k).await, None);
        assert_eq!(store.clear(&k).await, Ok(false));
        let again = req(&k, OTHER_FP);
        assert_eq!(begin(store, &again).await, Begin::Owner(again.token));

        // Clearing an InFlight key fences its owner off.
        assert_eq!(store.clear(&k).await, Ok(true));
        assert_eq!(
            store.complete(&k, again.token, &completed(OTHER_FP, &stored)).await,
            Ok(false)
        );
        assert_eq!(store.renew(&k, again.token, LOCK_TTL).await, Ok(false));
        assert_eq!(lookup(store, &k).await, None);

        // Clearing an Unknown key (the operator's way out) lets the retry execute.
        let owner = req(&k, FP);
        assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
        let unknown = Record::Unknown {
            fingerprint: Fingerprint::bytes([FP; 32]),
            since_ms: unix_ms(),
            cause: UnknownCause::Timeout,
        };
        assert_eq!(store.complete(&k, owner.token, &unknown).await, Ok(true));
        assert_eq!(begin(store, &req(&k, FP)).await, Begin::Unknown(UnknownCause::Timeout));
        assert_eq!(store.clear(&k).await, Ok(true));
        let attempt = req(&k, FP);
        assert_eq!(begin(store, &attempt).await, Begin::Owner(attempt.token));
        assert_eq!(store.ping().await, Ok(()));
    }
}

/// A `RedisStore` on its own server (the server must outlive the store's use).
async fn connect_redis(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url(), Duration::from_millis(500))
        .await
        .expect("connect to redis")
}

/// A `RedisStore` on a `redis-server` of its own (dropped after the store).
struct FreshRedisStore {
    store: RedisStore,
    _server: RedisServer,
}

impl FreshRedisStore {
    async fn start() -> Self {
        let server = RedisServer::start();
        let store = connect_redis(&server).await;
        Self { store, _server: server }
    }
}

/// A `DiskStore` in a temporary directory of its own (removed after the store is dropped).
struct FreshDiskStore {
    store: DiskStore,
    _dir: tempfile::TempDir,
}

impl FreshDiskStore {
    fn open() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = DiskStore::open(dir.path(), 1 << 30, DiskStoreMetrics::default()).expect("the disk store opens");
        Self { store, _dir: dir }
    }
}

/// A `RedisStore` with `min_replicas = 1` on a primary with one replica (dropped after the
/// store).
struct FreshReplicatedStore {
    store: RedisStore,
    replica: RedisServer,
    primary: RedisServer,
}

impl FreshReplicatedStore {
    async fn start() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_replica_of(&primary);
        // Generous: 200 concurrent begins on a loaded 2-core machine must all be acknowledged.
        let mut options = RedisOptions::new(Duration::from_secs(2));
        options.replication.min_replicas = 1;
        options.replication.replica_timeout = Duration::from_secs(2);
        let store = RedisStore::connect_with(&primary.url(), options)
            .await
            .expect("connect to redis");
        Self {
            store,
            replica,
            primary,
        }
    }
}

// Each test makes its own store (the temporary lives until the contract is done).
per_store! {
    stores {
        memory_store => &MemoryStore::new(1024),
        disk_store => &FreshDiskStore::open().store,
        redis_store => &FreshRedisStore::start().await.store,
        replicated_redis_store => &FreshReplicatedStore::start().await.store,
    }
    tests {
        new_key_owner_then_in_flight_then_mismatch,
        streamed_prints_share_one_comparison_rule,
        completed_key_replays,
        wrong_or_stale_token_is_refused,
        takeover_fences_the_lapsed_owner,
        release_lets_a_retry_execute,
        lapsed_lease_with_reject_marks_unknown,
        lapsed_lease_with_retry_takes_over,
        unknown_record_is_sticky,
        key_ttl_expiry,
        lookup_and_clear,
    }
}

// ---- Memory store only ----------------------------------------------------------------------
//
// Corrupt records do not apply to the memory store: it keeps `Record` values, never bytes, so
// there is nothing to decode and nothing that can be corrupted from outside the process.

/// The store is bounded: a third live key is refused (not a live one forgotten); a released or
/// expired key frees its slot.
#[tokio::test]
async fn memory_store_refuses_a_key_beyond_its_bound() {
    let store = MemoryStore::new(2);
    let (k1, k2, k3) = (key("full-1"), key("full-2"), key("full-3"));
    let short = Duration::from_millis(200);
    let first = request(&k1, FP, short, LOCK_TTL, UnknownOutcome::Reject);
    assert_eq!(begin(&store, &first).await, Begin::Owner(first.token));
    let second = req(&k2, FP);
    assert_eq!(begin(&store, &second).await, Begin::Owner(second.token));
    assert_eq!(store.begin(&req(&k3, FP)).await, Err(StoreError::Full(2)));
    assert_eq!(store.len(), 2);
    // Existing keys are still decided as usual.
    assert_eq!(begin(&store, &req(&k1, FP)).await, in_flight());
    assert_eq!(begin(&store, &req(&k2, OTHER_FP)).await, Begin::Mismatch);
    assert_eq!(lookup(&store, &k3).await, None);
    // A released key frees its slot.
    assert_eq!(store.release(&k2, second.token).await, Ok(true));
    let attempt = req(&k3, FP);
    assert_eq!(begin(&store, &attempt).await, Begin::Owner(attempt.token));
    assert_eq!(store.begin(&req(&k2, FP)).await, Err(StoreError::Full(2)));
    // So does an expired one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempt = req(&k2, FP);
    assert_eq!(begin(&store, &attempt).await, Begin::Owner(attempt.token));
    assert_eq!(store.len(), 2);
}

// ---- Redis store only -----------------------------------------------------------------------

/// Unreadable bytes in a record key are a `Corrupt` error (no panic, nothing overwritten), and the
/// operator can clear the key.
#[tokio::test]
async fn redis_corrupt_record_is_an_error() {
    let server = RedisServer::start();
    let store = connect_redis(&server).await;
    let k = key("corrupt");
    let garbage: &[u8] = b"\x02\x02garbage";
    let _: () = server.query(redis::cmd("SET").arg(k.record_key()).arg(garbage));
    assert_eq!(
        store.begin(&req(&k, FP)).await,
        Err(StoreError::Corrupt(RecordError::Truncated))
    );
    let retry = request(&k, FP, KEY_TTL, LOCK_TTL, UnknownOutcome::Retry);
    assert!(matches!(store.begin(&retry).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(store.lookup(&k).await, Err(StoreError::Corrupt(_))));
    let token = LeaseToken::random();
    assert_eq!(
        store.complete(&k, token, &completed(FP, &response(200, None))).await,
        Ok(false)
    );
    assert_eq!(store.renew(&k, token, LOCK_TTL).await, Ok(false));
    assert_eq!(store.release(&k, token).await, Ok(false));
    let left: Vec<u8> = server.query(redis::cmd("GET").arg(k.record_key()));
    assert_eq!(left, garbage, "nothing overwrote the corrupt record");

    // Other shapes of garbage: empty, a future version, InFlight records (this request's
    // fingerprint, no lease: what a takeover or mark-unknown looks for) cut short or with
    // trailing bytes. Each stays an error, and none is taken over or overwritten.
    let in_flight = Record::InFlight {
        fingerprint: Fingerprint::bytes([FP; 32]),
        owner: LeaseToken::random(),
        started_at_ms: 1,
        lease_until_ms: 2,
    }
    .encode();
    let short_in_flight = in_flight[..34].to_vec();
    let cut_in_flight = in_flight[..in_flight.len() - 1].to_vec();
    let long_in_flight = [&in_flight[..], b"x"].concat();
    for (name, bytes) in [
        ("corrupt-empty", Vec::new()),
        ("corrupt-version", vec![9u8; 60]),
        ("corrupt-short-in-flight", short_in_flight),
        ("corrupt-cut-in-flight", cut_in_flight),
        ("corrupt-long-in-flight", long_in_flight),
    ] {
        let k = key(name);
        let _: () = server.query(redis::cmd("SET").arg(k.record_key()).arg(&bytes));
        for outcome in [UnknownOutcome::Reject, UnknownOutcome::Retry, UnknownOutcome::Reject] {
            let result = store.begin(&request(&k, FP, KEY_TTL, LOCK_TTL, outcome)).await;
            assert!(matches!(result, Err(StoreError::Corrupt(_))), "{name}: {result:?}");
        }
        let left: Vec<u8> = server.query(redis::cmd("GET").arg(k.record_key()));
        assert_eq!(left, bytes, "{name}: the corrupt record was left as it was");
    }

    assert_eq!(store.clear(&k).await, Ok(true));
    let attempt = req(&k, FP);
    assert_eq!(begin(&store, &attempt).await, Begin::Owner(attempt.token));
    let fresh_key = key("corrupt-after");
    let attempt = req(&fresh_key, FP);
    assert_eq!(begin(&store, &attempt).await, Begin::Owner(attempt.token));
}

/// A `Completed` record exactly as builds before streamed bodies wrote it (fixed bytes: `201 ok`
/// to `POST /orders?x=1`, `application/json`, `{"n":1}`), put in Redis as a shared Redis holds it
/// across a rolling upgrade: its retry read whole replays it, another body is a mismatch, and a
/// retry that streams is sent to verify it in its (`bytes`) scheme (docs/behaviour.md §15.2).
#[tokio::test]
async fn redis_records_written_before_streaming_keep_matching() {
    let server = RedisServer::start();
    let store = connect_redis(&server).await;
    let k = key("pre-upgrade");
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
    let _: () = server.query(redis::cmd("SET").arg(k.record_key()).arg(&fixture));
    let method = http::Method::POST;
    let uri: http::Uri = "/orders?x=1".parse().expect("uri");
    let json = Some(&b"application/json"[..]);
    let retry = |body: &[u8]| BeginRequest {
        print: Print::Whole(Fingerprint::of(&method, &uri, json, body)),
        ..req(&k, FP)
    };
    assert!(
        matches!(begin(&store, &retry(b"{\"n\":1}")).await, Begin::Replay(r) if r.status == 201 && r.body.as_deref() == Some(&b"ok"[..]))
    );
    assert_eq!(begin(&store, &retry(b"{\"n\":2}")).await, Begin::Mismatch);
    let streamed = BeginRequest {
        print: Print::Streamed {
            head: HeadHash::of(&method, &uri, json),
            body: None,
        },
        ..req(&k, FP)
    };
    match begin(&store, &streamed).await {
        Begin::Verify(record) => assert_eq!(record.fingerprint().scheme, Scheme::Bytes),
        other => panic!("expected Verify, got {other:?}"),
    }
    let left: Vec<u8> = server.query(redis::cmd("GET").arg(k.record_key()));
    assert_eq!(left, fixture, "the record is untouched");
}

/// Calls per command name, sorted by name.
type Calls = Vec<(String, u64)>;

/// Calls per command since the last reset (`INFO commandstats`), leaving out the measuring
/// itself. Commandstats also counts what the Lua scripts run inside Redis (no round trip): the
/// finish and renew scripts each run exactly one GET and one SET (or DEL), and the finish script
/// one SPUBLISH on the key's channel (waking its waiters, docs/behaviour.md §15.5), so the exact
/// maps below pin down the round trips too: any extra command sent would show up as a surplus.
fn store_calls(server: &RedisServer) -> Calls {
    let mut calls: Calls = server
        .command_calls()
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "config|resetstat" | "info"))
        .collect();
    calls.sort();
    calls
}

fn pairs(expected: &[(&str, u64)]) -> Calls {
    expected.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

/// Spec §4's budget, measured with `INFO commandstats`: a replay is one native `SET … NX GET`,
/// a first execution that plus one `EVALSHA`, a renewal one `EVALSHA`; loading the scripts is a
/// one-time cost per server.
#[tokio::test]
async fn redis_command_budget() {
    let server = RedisServer::start();
    let store = connect_redis(&server).await;
    let stored = response(201, Some(b"budget"));

    // The very first use of each script on a fresh server also loads it, once: EVALSHA answered
    // NOSCRIPT, SCRIPT LOAD, EVALSHA again.
    server.reset_stats();
    let k = key("budget-warm-up");
    let owner = req(&k, FP);
    assert_eq!(begin(&store, &owner).await, Begin::Owner(owner.token));
    assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(true));
    assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
    // Sent: SET NX GET; EVALSHA, SCRIPT LOAD, EVALSHA twice. In the scripts: GET + SET twice,
    // and the completion's SPUBLISH.
    assert_eq!(
        store_calls(&server),
        pairs(&[
            ("evalsha", 4),
            ("get", 2),
            ("script|load", 2),
            ("set", 3),
            ("spublish", 1)
        ])
    );

    // First execution: begin + complete, two round trips.
    server.reset_stats();
    let k = key("budget-first");
    let owner = req(&k, FP);
    assert_eq!(begin(&store, &owner).await, Begin::Owner(owner.token));
    assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
    // Sent: SET NX GET, EVALSHA. In the script: GET, SET KEEPTTL, SPUBLISH.
    assert_eq!(
        store_calls(&server),
        pairs(&[("evalsha", 1), ("get", 1), ("set", 2), ("spublish", 1)])
    );

    // Replay: one SET NX GET (which writes nothing: the key exists), one round trip.
    server.reset_stats();
    assert_eq!(begin(&store, &req(&k, FP)).await, Begin::Replay(stored.clone()));
    assert_eq!(store_calls(&server), pairs(&[("set", 1)]));

    // Conflict and mismatch: one each.
    let k = key("budget-conflict");
    let owner = req(&k, FP);
    assert_eq!(begin(&store, &owner).await, Begin::Owner(owner.token));
    server.reset_stats();
    assert_eq!(begin(&store, &req(&k, FP)).await, in_flight());
    assert_eq!(begin(&store, &req(&k, OTHER_FP)).await, Begin::Mismatch);
    assert_eq!(store_calls(&server), pairs(&[("set", 2)]));

    // A renewal: one; a release: one.
    server.reset_stats();
    assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(true));
    assert_eq!(store.release(&k, owner.token).await, Ok(true));
    // Sent: two EVALSHA. In the scripts: GET + SET (renew), GET + DEL + SPUBLISH (release).
    assert_eq!(
        store_calls(&server),
        pairs(&[("del", 1), ("evalsha", 2), ("get", 2), ("set", 1), ("spublish", 1)])
    );
}

/// Redis killed: operations fail fast with `Unavailable`; Redis back on the same port: the same
/// store object works again on its own (scripts reloaded after the restart emptied the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_then_back() {
    let mut server = RedisServer::start();
    let store = connect_redis(&server).await;
    let fresh_key = key("down-before");
    let attempt = req(&fresh_key, FP);
    assert_eq!(begin(&store, &attempt).await, Begin::Owner(attempt.token));

    server.kill();
    for i in 0..3 {
        let k = key(&format!("down-{i}"));
        let started = Instant::now();
        let result = store.begin(&req(&k, FP)).await;
        let took = started.elapsed();
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        assert!(
            took < Duration::from_millis(1200),
            "begin took {took:?} with Redis down"
        );
    }
    let started = Instant::now();
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
    assert!(matches!(
        store
            .complete(
                &key("down-before"),
                LeaseToken::random(),
                &completed(FP, &response(200, None))
            )
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.lookup(&key("down-before")).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_millis(3600),
        "{:?}",
        started.elapsed()
    );

    server.restart();
    let k = key("down-after");
    let deadline = Instant::now() + Duration::from_secs(5);
    let owner = loop {
        let attempt = req(&k, FP);
        match store.begin(&attempt).await {
            Ok(decision) => {
                assert_eq!(decision, Begin::Owner(attempt.token));
                break attempt;
            }
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover within 5s: {e:?}"),
        }
    };
    let stored = response(201, Some(b"after restart"));
    assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
    assert_eq!(begin(&store, &req(&k, FP)).await, Begin::Replay(stored));
    assert_eq!(store.ping().await, Ok(()));
}

// ---- Redis with min_replicas -----------------------------------------------------------------

/// With `min_replicas = 1`, a key owned is a key its replica holds: every `begin` that answers
/// `Owner` (the `WAIT` pipelined behind its write said so) finds its record on the replica at
/// once, and so does every completion. Many at once share `WAIT`s (group commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_owner_records_are_on_the_replica() {
    let fresh = FreshReplicatedStore::start().await;
    let store = &fresh.store;
    let keys: Vec<StorageKey> = (0..200).map(|i| key(&format!("acked-{i}"))).collect();
    let begins = keys.iter().map(|k| async move {
        let attempt = req(k, FP);
        let begun = begin(store, &attempt).await;
        (begun == Begin::Owner(attempt.token), attempt.token)
    });
    fresh.primary.reset_stats();
    let owned = futures::future::join_all(begins).await;
    let waits = fresh.primary.command_calls().get("wait").copied().unwrap_or(0);
    for (k, (is_owner, token)) in keys.iter().zip(&owned) {
        assert!(is_owner, "{k:?}");
        let on_replica: Option<Vec<u8>> = fresh.replica.query(redis::cmd("GET").arg(k.record_key()));
        assert!(on_replica.is_some(), "an owned key is on the replica");
        let stored = response(201, Some(b"acked"));
        assert_eq!(store.complete(k, *token, &completed(FP, &stored)).await, Ok(true));
        let on_replica: Vec<u8> = fresh.replica.query(redis::cmd("GET").arg(k.record_key()));
        assert_eq!(
            on_replica,
            completed(FP, &stored).encode().to_vec(),
            "the completion too"
        );
    }
    assert!(waits < 200, "200 concurrent begins shared their WAITs: {waits}");
}

/// [`store_calls`] without the replica's own `REPLCONF` acknowledgements.
fn proxy_calls(server: &RedisServer) -> Calls {
    store_calls(server)
        .into_iter()
        .filter(|(name, _)| !name.starts_with("replconf"))
        .collect()
}

/// Spec §4's budget with `min_replicas = 1`, as the request sees it: a write and the `WAIT`
/// pipelined behind it are one round trip. A replay: one `SET … NX GET` (its batch's `WAIT` is
/// sent, but the replay does not wait for it); a first execution: that and one `EVAL`, each with
/// its `WAIT`.
#[tokio::test]
async fn replicated_command_budget() {
    let fresh = FreshReplicatedStore::start().await;
    let (store, server) = (&fresh.store, &fresh.primary);
    let stored = response(201, Some(b"budget"));

    server.reset_stats();
    let k = key("replicated-budget");
    let owner = req(&k, FP);
    assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
    assert_eq!(store.complete(&k, owner.token, &completed(FP, &stored)).await, Ok(true));
    // Sent: SET NX GET + WAIT, EVAL + WAIT. In the script: GET, SET KEEPTTL, SPUBLISH.
    assert_eq!(
        proxy_calls(server),
        pairs(&[("eval", 1), ("get", 1), ("set", 2), ("spublish", 1), ("wait", 2)])
    );

    server.reset_stats();
    let started = Instant::now();
    assert_eq!(begin(store, &req(&k, FP)).await, Begin::Replay(stored.clone()));
    assert!(started.elapsed() < Duration::from_millis(100));
    let calls = proxy_calls(server);
    assert_eq!(
        calls.iter().find(|(n, _)| n == "set"),
        Some(&("set".to_owned(), 1)),
        "{calls:?}"
    );
    assert!(calls.iter().all(|(n, _)| n == "set" || n == "wait"), "{calls:?}");

    // A renewal and a release wait for no replica: one EVALSHA each on the store's connection
    // (once the renewal script is loaded).
    let k = key("replicated-budget-2");
    let owner = req(&k, FP);
    assert_eq!(begin(store, &owner).await, Begin::Owner(owner.token));
    assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(true));
    server.reset_stats();
    assert_eq!(store.renew(&k, owner.token, LOCK_TTL).await, Ok(true));
    assert_eq!(store.release(&k, owner.token).await, Ok(true));
    let calls = proxy_calls(server);
    assert!(!calls.iter().any(|(n, _)| n == "wait"), "{calls:?}");
    assert_eq!(
        calls
            .iter()
            .filter(|(n, _)| n == "evalsha")
            .map(|(_, c)| c)
            .sum::<u64>(),
        2,
        "{calls:?}"
    );
}

/// The replica gone: a new key is not owned (the store failure, the key released), a replay is
/// still answered, and a completion that cannot be acknowledged is still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_store_without_its_replica() {
    let mut fresh = FreshReplicatedStore::start().await;
    let stored = response(201, Some(b"before"));
    let k = key("replica-gone-done");
    let owner = req(&k, FP);
    assert_eq!(begin(&fresh.store, &owner).await, Begin::Owner(owner.token));
    let running = key("replica-gone-running");
    let runner = req(&running, FP);
    assert_eq!(begin(&fresh.store, &runner).await, Begin::Owner(runner.token));
    assert_eq!(
        fresh.store.complete(&k, owner.token, &completed(FP, &stored)).await,
        Ok(true)
    );

    fresh.replica.kill();
    let fresh_key = key("replica-gone-new");
    let refused = fresh.store.begin(&req(&fresh_key, FP)).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    assert_eq!(lookup(&fresh.store, &fresh_key).await, None, "released");
    assert_eq!(begin(&fresh.store, &req(&k, FP)).await, Begin::Replay(stored));
    let late = response(201, Some(b"late"));
    assert_eq!(
        fresh
            .store
            .complete(&running, runner.token, &completed(FP, &late))
            .await,
        Ok(true),
        "answered anyway"
    );
    assert_eq!(record(&fresh.store, &running).await, completed(FP, &late));
    assert!(matches!(fresh.store.ping().await, Err(StoreError::Unavailable(_))));
}
