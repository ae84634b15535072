use std::time::Duration;

use super::*;
use crate::config::UnknownOutcome;
use crate::idempotency::{Fingerprint, Print, StoredResponse};

fn open(dir: &Path, max_bytes: u64) -> DiskStore {
    DiskStore::open(dir, max_bytes, DiskStoreMetrics::default()).expect("the store opens")
}

fn key(i: u32) -> StorageKey {
    StorageKey::new("t:", "r", b"", &i.to_be_bytes())
}

fn request(key: &StorageKey, key_ttl: Duration) -> BeginRequest<'_> {
    BeginRequest {
        key,
        print: Print::Whole(Fingerprint::bytes([1; 32])),
        token: LeaseToken::random(),
        key_ttl,
        lock_ttl: Duration::from_secs(30),
        unknown_outcome: UnknownOutcome::Reject,
        now_ms: unix_ms(),
    }
}

fn completed(body: &'static [u8]) -> Record {
    Record::Completed {
        fingerprint: Fingerprint::bytes([1; 32]),
        response: StoredResponse {
            status: http::StatusCode::CREATED,
            headers: vec![],
            body: Some(bytes::Bytes::from_static(body)),
            completed_at_ms: 1,
        },
    }
}

async fn owned(store: &DiskStore, key: &StorageKey, key_ttl: Duration) -> LeaseToken {
    let begun = request(key, key_ttl);
    assert_eq!(store.begin(&begun).await, Ok(Begin::Owner(begun.token)));
    begun.token
}

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn what_was_acknowledged_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (done, running) = (key(1), key(2));
    {
        let store = open(dir.path(), 1 << 30);
        let token = owned(&store, &done, DAY).await;
        assert_eq!(store.complete(&done, token, &completed(b"first")).await, Ok(true));
        owned(&store, &running, DAY).await;
    }
    let store = open(dir.path(), 1 << 30);
    assert_eq!(store.len(), 2);
    let replay = store.begin(&request(&done, DAY)).await;
    assert!(matches!(replay, Ok(Begin::Replay(r)) if r.body.as_deref() == Some(&b"first"[..])));
    assert!(matches!(
        store.begin(&request(&running, DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
}

#[tokio::test]
async fn concurrent_writes_share_one_flush() {
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = DiskStoreMetrics::default();
    let store = DiskStore::open(dir.path(), 1 << 30, metrics.clone()).expect("opens");
    let keys: Vec<_> = (0..32).map(key).collect();
    let before = metrics.flushes.get();
    let begun = futures::future::join_all(keys.iter().map(|k| {
        let store = &store;
        async move { store.begin(&request(k, DAY)).await }
    }))
    .await;
    assert!(begun.iter().all(|b| matches!(b, Ok(Begin::Owner(_)))));
    let flushes = metrics.flushes.get() - before;
    assert!(flushes <= 4, "32 concurrent first writes took {flushes} flushes");
    assert_eq!(metrics.records.get(), 32);
}

#[tokio::test]
async fn expired_records_are_swept_while_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path(), 1 << 30);
    for i in 0..20 {
        owned(&store, &key(i), Duration::from_millis(100)).await;
    }
    owned(&store, &key(100), DAY).await;
    assert_eq!(store.len(), 21);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.len() > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.len(), 1, "the sweep removed the expired records, and only those");
    assert!(matches!(
        store.begin(&request(&key(100), DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
    owned(&store, &key(3), DAY).await;
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_and_keeps_the_live_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let in_flight_value = format::VALUE_HEAD + crate::idempotency::record::IN_FLIGHT_LEN;
    let store = open(dir.path(), 2 * footprint(in_flight_value) + 10);
    let first = owned(&store, &key(1), DAY).await;
    owned(&store, &key(2), DAY).await;
    assert_eq!(store.begin(&request(&key(3), DAY)).await, Err(StoreError::Full(2)));
    // Live keys still answer, and complete even though their record grows.
    assert_eq!(store.complete(&key(1), first, &completed(b"kept")).await, Ok(true));
    assert!(matches!(
        store.begin(&request(&key(1), DAY)).await,
        Ok(Begin::Replay(_))
    ));
    // The footprint is counted again from the file when it opens.
    drop(store);
    let store = open(dir.path(), 2 * footprint(in_flight_value) + 10);
    assert_eq!(store.begin(&request(&key(3), DAY)).await, Err(StoreError::Full(2)));
    assert_eq!(store.clear(&key(2)).await, Ok(true));
    owned(&store, &key(3), DAY).await;
}

#[tokio::test]
async fn a_damaged_record_answers_corrupt_and_can_be_cleared() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (damaged, intact) = (key(1), key(2));
    {
        let store = open(dir.path(), 1 << 30);
        let token = owned(&store, &damaged, DAY).await;
        assert_eq!(store.complete(&damaged, token, &completed(b"one")).await, Ok(true));
        owned(&store, &intact, DAY).await;
    }
    // Damage that redb's page checksums cannot see: a value changed under its key.
    {
        let db = Database::create(dir.path().join(DATA_FILE)).expect("redb opens");
        let tx = db.begin_write().expect("write");
        {
            let mut records = tx.open_table(RECORDS).expect("table");
            let (key, mut value) = records
                .iter()
                .expect("iterate")
                .map(|entry| entry.expect("entry"))
                .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                .find(|(k, _)| k.ends_with(damaged.digest()))
                .expect("stored");
            let last = value.len() - 1;
            value[last] ^= 0x20;
            records.insert(&key[..], &value[..]).expect("write");
        }
        tx.commit().expect("commit");
    }
    let store = open(dir.path(), 1 << 30);
    assert!(matches!(
        store.begin(&request(&damaged, DAY)).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(store.lookup(&damaged).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.complete(&damaged, LeaseToken::random(), &completed(b"x")).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.begin(&request(&intact, DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
    assert_eq!(store.clear(&damaged).await, Ok(true));
    owned(&store, &damaged, DAY).await;
}

#[tokio::test]
async fn a_second_store_on_the_same_directory_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _first = open(dir.path(), 1 << 30);
    let err = match DiskStore::open(dir.path(), 1 << 30, DiskStoreMetrics::default()) {
        Ok(_) => panic!("a second store opened the same directory"),
        Err(err) => crate::error::Chain(&err).to_string(),
    };
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("in use by another idemproxy process"), "{err}");
}

#[tokio::test]
async fn ping_fails_when_the_directory_is_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let store = open(&data, 1 << 30);
    assert_eq!(store.ping().await, Ok(()));
    std::fs::remove_dir_all(&data).expect("remove");
    let err = store.ping().await.expect_err("not ready");
    let text = crate::error::Chain(&err).to_string();
    assert!(text.contains(&data.display().to_string()), "{text}");
}
