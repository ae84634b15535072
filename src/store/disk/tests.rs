use std::time::Duration;

use super::format::{Header, OVERHEAD};
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

async fn settle(store: &DiskStore, key: &StorageKey, body: &'static [u8]) {
    let token = owned(store, key, DAY).await;
    assert_eq!(store.complete(key, token, &completed(body)).await, Ok(true));
}

async fn replays(store: &DiskStore, key: &StorageKey, body: &[u8]) -> bool {
    matches!(store.begin(&request(key, DAY)).await, Ok(Begin::Replay(r)) if r.body.as_deref() == Some(body))
}

async fn is_corrupt(store: &DiskStore, key: &StorageKey) -> bool {
    matches!(store.begin(&request(key, DAY)).await, Err(StoreError::Corrupt(_)))
}

const DAY: Duration = Duration::from_secs(86_400);

/// Every intact frame in the data directory: its segment's path, offset and header.
fn frames(dir: &Path) -> Vec<(PathBuf, usize, Header)> {
    let mut found = Vec::new();
    for id in segment::list(dir).expect("list") {
        let path = segment::path(dir, id);
        let bytes = std::fs::read(&path).expect("read");
        for f in recover::scan(&bytes, false).found {
            if let recover::Found::Frame { offset, head } = f {
                found.push((path.clone(), offset, head));
            }
        }
    }
    found
}

/// The key's newest frame.
fn newest_frame(dir: &Path, key: &StorageKey) -> (PathBuf, usize, Header) {
    frames(dir)
        .into_iter()
        .rev()
        .find(|(_, _, head)| head.digest == *key.digest())
        .expect("the key has a frame")
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).expect("write");
}

#[tokio::test]
async fn what_was_acknowledged_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (done, running, released) = (key(1), key(2), key(3));
    {
        let store = open(dir.path(), 1 << 30);
        settle(&store, &done, b"first").await;
        owned(&store, &running, DAY).await;
        let token = owned(&store, &released, DAY).await;
        assert_eq!(store.release(&released, token).await, Ok(true));
    }
    let store = open(dir.path(), 1 << 30);
    assert_eq!(store.len(), 2);
    assert!(replays(&store, &done, b"first").await);
    assert!(matches!(
        store.begin(&request(&running, DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
    owned(&store, &released, DAY).await;
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

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn expired_records_are_forgotten_and_their_segments_deleted_while_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    // 1 MiB bound: 64 KiB segments, so that a few hundred records fill several.
    let store = open(dir.path(), 1 << 20);
    owned(&store, &key(100_000), DAY).await;
    for i in 0..1500 {
        owned(&store, &key(i), Duration::from_millis(300)).await;
    }
    let segments = segment::list(dir.path()).expect("list").len();
    assert!(segments >= 3, "{segments} segments");
    wait_until("the expired records are forgotten", || store.len() == 1).await;
    wait_until("their segments are deleted", || {
        segment::list(dir.path()).map(|s| s.len()).unwrap_or(0) <= 2
    })
    .await;
    assert!(matches!(
        store.begin(&request(&key(100_000), DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
    owned(&store, &key(3), DAY).await;
    drop(store);
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.len(), 2, "the long-lived record was copied forward, not lost");
    assert!(matches!(
        store.begin(&request(&key(100_000), DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_and_keeps_the_live_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let in_flight = OVERHEAD + crate::idempotency::record::IN_FLIGHT_LEN;
    let bound = 2 * footprint(in_flight) + 10;
    let store = open(dir.path(), bound);
    let first = owned(&store, &key(1), DAY).await;
    owned(&store, &key(2), DAY).await;
    assert_eq!(store.begin(&request(&key(3), DAY)).await, Err(StoreError::Full(2)));
    // Live keys still answer, and complete even though their record grows.
    assert_eq!(store.complete(&key(1), first, &completed(b"kept")).await, Ok(true));
    assert!(replays(&store, &key(1), b"kept").await);
    // The live bytes are counted again from the files when they open.
    drop(store);
    let store = open(dir.path(), bound);
    assert_eq!(store.begin(&request(&key(3), DAY)).await, Err(StoreError::Full(2)));
    assert_eq!(store.clear(&key(2)).await, Ok(true));
    owned(&store, &key(3), DAY).await;
}

/// docs/behaviour.md §11.4: a flipped byte anywhere in a key's newest frame (its header, its
/// record, its trailer) makes that key, and only it, answer `Corrupt`; the store opens.
#[tokio::test]
async fn a_flipped_byte_in_a_record_makes_its_key_corrupt_and_spares_the_others() {
    let template = tempfile::tempdir().expect("temp dir");
    {
        let store = open(template.path(), 1 << 30);
        for i in 0..3 {
            settle(&store, &key(i), b"done").await;
        }
    }
    for victim in [0, 2] {
        let (_, offset, head) = newest_frame(template.path(), &key(victim));
        let len = head.frame_len();
        for at in [0, 5, 20, 59, 60, 60 + head.len as usize / 2, len - 50, len - 1] {
            let dir = tempfile::tempdir().expect("temp dir");
            for id in segment::list(template.path()).expect("list") {
                std::fs::copy(segment::path(template.path(), id), segment::path(dir.path(), id)).expect("copy");
            }
            let (path, _, _) = newest_frame(dir.path(), &key(victim));
            flip(&path, offset + at);
            let store = open(dir.path(), 1 << 30);
            assert!(is_corrupt(&store, &key(victim)).await, "key {victim}, byte {at}");
            assert!(matches!(store.lookup(&key(victim)).await, Err(StoreError::Corrupt(_))));
            for other in (0..3).filter(|o| *o != victim) {
                assert!(
                    replays(&store, &key(other), b"done").await,
                    "key {other} after byte {at} of {victim}"
                );
            }
            drop(store);
            let store = open(dir.path(), 1 << 30);
            assert!(is_corrupt(&store, &key(victim)).await, "still after a second open");
        }
    }
}

#[tokio::test]
async fn a_damaged_record_answers_corrupt_until_cleared() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (damaged, intact) = (key(1), key(2));
    {
        let store = open(dir.path(), 1 << 30);
        settle(&store, &damaged, b"one").await;
        owned(&store, &intact, DAY).await;
    }
    let (path, offset, head) = newest_frame(dir.path(), &damaged);
    flip(&path, offset + format::HEADER + head.len as usize - 1);
    let store = open(dir.path(), 1 << 30);
    assert!(is_corrupt(&store, &damaged).await);
    assert!(matches!(
        store.complete(&damaged, LeaseToken::random(), &completed(b"x")).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.begin(&request(&intact, DAY)).await,
        Ok(Begin::InFlight { .. })
    ));
    assert_eq!(store.clear(&damaged).await, Ok(true));
    drop(store);
    let store = open(dir.path(), 1 << 30);
    owned(&store, &damaged, DAY).await;
}

/// docs/behaviour.md §11.4: a torn tail (a frame cut short, zeros, garbage after the last whole
/// frame) was never acknowledged: it is cut off at open and every other key stands.
#[tokio::test]
async fn a_torn_tail_is_discarded_and_the_rest_stands() {
    let template = tempfile::tempdir().expect("temp dir");
    {
        let store = open(template.path(), 1 << 30);
        settle(&store, &key(1), b"kept").await;
        owned(&store, &key(2), DAY).await;
    }
    let (path, offset, head) = newest_frame(template.path(), &key(2));
    // The frames, without the zeros the writer prepares ahead of them.
    let whole = std::fs::read(&path).expect("read")[..offset + head.frame_len()].to_vec();
    let mut torn_frame = Vec::new();
    format::encode(
        &mut torn_frame,
        format::Kind::Record,
        key(3).digest(),
        u64::MAX,
        &[7; 100],
    );
    let tails: [&[u8]; 4] = [
        &torn_frame[..torn_frame.len() - 1],
        &torn_frame[..30],
        &[0; 4096],
        &[0xAB; 77],
    ];
    for tail in tails {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join(path.file_name().expect("name"));
        std::fs::write(&file, [&whole[..], tail].concat()).expect("write");
        let store = open(dir.path(), 1 << 30);
        assert_eq!(
            std::fs::metadata(&file).expect("stat").len(),
            whole.len() as u64,
            "cut back"
        );
        assert!(replays(&store, &key(1), b"kept").await);
        assert!(matches!(
            store.begin(&request(&key(2), DAY)).await,
            Ok(Begin::InFlight { .. })
        ));
        owned(&store, &key(3), DAY).await;
        drop(store);
        let store = open(dir.path(), 1 << 30);
        assert_eq!(store.len(), 3, "what was written after the cut stands");
    }
}

#[tokio::test]
async fn a_directory_of_the_redb_store_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(LEGACY_FILE), b"redb").expect("write");
    let err = match DiskStore::open(dir.path(), 1 << 30, DiskStoreMetrics::default()) {
        Ok(_) => panic!("opened a directory of the redb store"),
        Err(err) => crate::error::Chain(&err).to_string(),
    };
    assert!(
        err.contains(&dir.path().join(LEGACY_FILE).display().to_string()),
        "{err}"
    );
    assert!(err.contains("cannot read"), "{err}");
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
