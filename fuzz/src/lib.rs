//! The properties the fuzz targets check, one `check_*` function per target. A check panics when
//! its property fails, which libFuzzer reports as a crash; it returns whether the input was
//! accepted (parsed, decoded, loaded), so a replay can also insist that seed inputs stay valid.
//!
//! `tests/fuzz_regressions.rs` in the main crate includes this very file (`#[path]`) and replays
//! every input under `fuzz/regressions/<target>/` through it, so CI checks the same properties
//! without cargo-fuzz. Keep it free of dependencies the main crate's tests do not have.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use idemproxy::config::JsonPointer;
use idemproxy::idempotency::canonical::canonical_json;
use idemproxy::idempotency::key::{self, MAX_KEY_LEN};
use idemproxy::idempotency::source::json_key;
use idemproxy::idempotency::Record;
use idemproxy::Config;
use serde_json::Value;

/// `key_parser`: an accepted key is 1 to 255 printable ASCII characters; serialised as an
/// sf-string (RFC 9651 §4.1.6) it parses back to itself; a bare key is the trimmed value.
pub fn check_key(data: &[u8]) -> bool {
    let Ok(parsed) = key::parse(data) else {
        return false;
    };
    let k = parsed.as_bytes();
    assert!(
        !k.is_empty() && k.len() <= MAX_KEY_LEN,
        "accepted a key of {} bytes",
        k.len()
    );
    assert!(
        k.iter().all(|b| (0x20..=0x7e).contains(b)),
        "accepted a key with a character outside printable ASCII: {k:?}"
    );
    let requoted = key::parse(&quote(k)).map(|k| k.as_bytes().to_vec());
    assert_eq!(requoted, Ok(k.to_vec()), "the key does not survive re-quoting");
    let trimmed = data.trim_ascii();
    if trimmed.first() != Some(&b'"') {
        assert_eq!(k, trimmed, "a bare key must be the trimmed field value");
    }
    true
}

/// Serialises a key as an RFC 9651 sf-string.
fn quote(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in raw {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// `record_decode`: decoding never panics, and a record that decodes re-encodes to the very same
/// bytes (the encoding is canonical: the Redis scripts compare stored bytes at fixed offsets).
pub fn check_record(data: &[u8]) -> bool {
    let bytes = Bytes::copy_from_slice(data);
    let Ok(record) = Record::decode(bytes.clone()) else {
        return false;
    };
    let encoded = record.encode();
    assert_eq!(
        encoded, bytes,
        "the decoded record {record:?} re-encodes to other bytes"
    );
    assert_eq!(Record::decode(encoded), Ok(record), "decode(encode(r)) != r");
    true
}

/// `json_canonical`: any bytes as a request body, to the canonicaliser of `fingerprint_body =
/// "json"` (docs/behaviour.md §13). Never panics; a canonical form is JSON that reads as the
/// same value as the input (numbers keep their text), and is its own canonical form.
pub fn check_canonical(data: &[u8]) -> bool {
    let Some(canonical) = canonical_json(data, &[]) else {
        return false;
    };
    let text = std::str::from_utf8(&canonical).expect("the canonical form is UTF-8");
    assert!(
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok(),
        "the canonical form is not JSON: {text}"
    );
    // Values whose numbers overflow a double do not parse as a `Value`; the rest must agree.
    if let (Ok(before), Ok(after)) = (
        serde_json::from_slice::<Value>(data),
        serde_json::from_str::<Value>(text),
    ) {
        assert_eq!(before, after, "the canonical form is another value: {text}");
    }
    assert_eq!(
        canonical_json(&canonical, &[]).as_deref(),
        Some(&canonical[..]),
        "the canonical form is not its own canonical form"
    );
    true
}

/// `json_pointer`: the first line as an RFC 6901 pointer, the rest as a JSON body. Never panics;
/// an accepted pointer reads back as written; the key found at it agrees with `serde_json`'s own
/// `Value::pointer`; a value left out of a fingerprint is gone from the canonical form. Returns
/// whether the pointer was accepted.
pub fn check_pointer(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (pointer_text, document) = text.split_once('\n').unwrap_or((&text, ""));
    let Ok(pointer) = JsonPointer::parse(pointer_text) else {
        return false;
    };
    assert_eq!(pointer.as_str(), pointer_text, "a pointer reads back as written");
    let value = serde_json::from_str::<Value>(document).ok();
    let expected = value.as_ref().and_then(|v| v.pointer(pointer_text));
    match json_key(document.as_bytes(), &pointer) {
        Ok(Some(key)) => {
            let key = std::str::from_utf8(key.as_bytes()).expect("a key is ASCII");
            match expected {
                Some(Value::String(s)) => assert_eq!(key, s, "another key than serde_json's pointer"),
                Some(Value::Number(n)) => {
                    let exact = n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
                    if let Some(exact) = exact {
                        assert_eq!(
                            key.parse::<i128>().ok(),
                            Some(exact),
                            "the integer {n} as the key `{key}`"
                        );
                    }
                }
                other => assert!(value.is_none(), "a key `{key}` where serde_json finds {other:?}"),
            }
        }
        Ok(None) => {
            let usable =
                |s: &str| !s.is_empty() && s.len() <= MAX_KEY_LEN && s.bytes().all(|b| (0x20..=0x7e).contains(&b));
            if let Some(Value::String(s)) = expected {
                assert!(!usable(s), "no key where serde_json finds the string {s:?}");
            }
        }
        Err(_) => {}
    }
    check_left_out(document, &pointer, pointer_text);
    true
}

/// With `pointer` ignored, the canonical form has nothing at it when its parent is an object
/// (an array shifts its later elements into the left-out place).
fn check_left_out(document: &str, pointer: &JsonPointer, pointer_text: &str) {
    let Some(canonical) = canonical_json(document.as_bytes(), std::slice::from_ref(pointer)) else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<Value>(&canonical) else {
        return;
    };
    let parent = pointer_text.rfind('/').map_or("", |at| &pointer_text[..at]);
    if value.pointer(parent).is_some_and(Value::is_object) {
        assert!(
            value.pointer(pointer_text).is_none(),
            "{pointer_text} is still in {value}"
        );
    }
}

/// `config_load`: arbitrary text (inputs that are not UTF-8 are skipped) never panics the loader,
/// its error renders, and a configuration it accepts keeps the invariants the proxy relies on.
pub fn check_config_bytes(data: &[u8]) -> bool {
    match std::str::from_utf8(data) {
        Ok(text) => check_config_text(text),
        Err(_) => false,
    }
}

/// `config_structured`: [`check_config_bytes`]'s property on TOML built by [`structured_toml`].
pub fn check_config_structured(data: &[u8]) -> bool {
    check_config_text(&structured_toml(data))
}

fn check_config_text(text: &str) -> bool {
    match Config::from_toml(text) {
        Ok(config) => {
            check_config_invariants(&config);
            true
        }
        Err(err) => {
            assert!(!err.to_string().is_empty());
            false
        }
    }
}

fn check_config_invariants(config: &Config) {
    assert!(!config.routes.is_empty(), "a loaded config has no route");
    let mut names = HashSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        assert_eq!(route.index, i, "route index is not its position");
        assert!(route.prefix.starts_with('/'), "prefix `{}` without `/`", route.prefix);
        assert!(names.insert(&*route.name), "route name `{}` twice", route.name);
        if i > 0 {
            assert!(
                config.routes[i - 1].prefix.len() >= route.prefix.len(),
                "routes not longest first"
            );
        }
        // A path equal to a prefix is served by that prefix's route (longest-prefix match).
        let served_by = config.route_for(&route.prefix).map(|r| r.index);
        assert_eq!(
            served_by,
            Some(i),
            "path `{}` not served by its own route",
            route.prefix
        );
        assert!(!route.timeout.is_zero(), "zero upstream timeout");
        let policy = &route.policy;
        assert!(!policy.methods.is_empty(), "no guarded method");
        assert!(policy.lock_ttl >= Duration::from_millis(100), "lock_ttl below 100ms");
        assert!(policy.lock_ttl <= policy.key_ttl, "lock_ttl above key_ttl");
        assert!(policy.max_body_bytes > 0, "zero max_body_bytes");
    }
    assert!(!config.key_prefix.contains(['{', '}']), "hash tag in key_prefix");
    assert!(config.server.max_connections >= 1);
    assert!(config.server.max_header_bytes >= 8192);
    assert!(config.server.max_headers >= 8);
    assert!(config.server.http2_max_concurrent_streams >= 1);
}

/// Table headers the structured generator emits.
pub const TABLES: &[&str] = &[
    "[[route]]",
    "[idempotency]",
    "[route.idempotency]",
    "[server]",
    "[store]",
    "[upstream]",
    "[log]",
    "[tls]",
];

/// Keys of `src/config/file.rs`, dotted where they sit in a table, plus the route's own keys.
pub const KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "admin_token",
    "log.format",
    "log.filter",
    "server.header_read_timeout",
    "server.body_read_timeout",
    "server.http2_keepalive_interval",
    "server.shutdown_grace",
    "server.max_connections",
    "server.max_header_bytes",
    "server.max_headers",
    "server.http2_max_concurrent_streams",
    "tls.cert",
    "tls.key",
    "store.redis",
    "store.ca_file",
    "store.key_prefix",
    "store.memory_max_entries",
    "store.command_timeout",
    "upstream.url",
    "upstream.connect_timeout",
    "upstream.timeout",
    "upstream.pool_idle_timeout",
    "upstream.pool_max_idle_per_host",
    "upstream.preserve_host",
    "upstream.ca_file",
    "idempotency.enabled",
    "idempotency.methods",
    "idempotency.require_key",
    "idempotency.scope_header",
    "idempotency.key_ttl",
    "idempotency.lock_ttl",
    "idempotency.on_conflict",
    "idempotency.wait_timeout",
    "idempotency.store_failure",
    "idempotency.max_body_bytes",
    "idempotency.max_response_bytes",
    "idempotency.record_server_errors",
    "idempotency.unknown_outcome",
    // Keys of a [[route]] (and of the table headers above, undotted).
    "name",
    "prefix",
    "upstream",
    "preserve_host",
    "timeout",
    "url",
    "format",
    "filter",
    "redis",
    "key_prefix",
    "cert",
    "key",
    "methods",
    "key_ttl",
    "lock_ttl",
    "on_conflict",
    "unknown_outcome",
    "max_headers",
    "enabled",
    // Appended, so that the indexes of the inputs kept in fuzz/regressions/ stay as they were.
    "idempotency.key_sources",
    "idempotency.buffer_bytes",
    "idempotency.fingerprint_body",
    "idempotency.fingerprint_ignore",
    "idempotency.replay_header",
    "idempotency.release_statuses",
    "idempotency.unknown_statuses",
    "key_sources",
    "fingerprint_ignore",
    "release_statuses",
    "unknown_statuses",
    // Appended: error forms, retry hints, Sentinel and replica acknowledgements.
    "idempotency.error_format",
    "idempotency.retry_hint_header",
    "error_format",
    "retry_hint_header",
    "store.sentinel_password",
    "store.min_replicas",
    "store.replica_timeout",
];

/// TOML values: the valid ones of every key, their edges, and near misses.
pub const VALUES: &[&str] = &[
    // Durations.
    "\"0s\"",
    "\"1ms\"",
    "\"99ms\"",
    "\"100ms\"",
    "\"30s\"",
    "\"24h\"",
    "\"1y\"",
    "\"584542046090years\"",
    "\"18446744073709551615s\"",
    "\"18446744073709551616s\"",
    "\"1s 999999999ns\"",
    "\"-1s\"",
    "\"\"",
    // Addresses and URLs.
    "\"127.0.0.1:8080\"",
    "\"0.0.0.0:9090\"",
    "\"[::1]:0\"",
    "\"localhost:80\"",
    "\"http://127.0.0.1:3000\"",
    "\"https://api.example:443/base/\"",
    "\"http://a:1?q=1\"",
    "\"http://\"",
    "\"http://user@[::1]:65536/\"",
    "\"ftp://a:1\"",
    "\"/relative\"",
    "\"redis://127.0.0.1:6379\"",
    "\"rediss://r:6380/0\"",
    "\"redis+cluster://a:1,b:2\"",
    "\"unix:///tmp/redis.sock\"",
    "\"memcached://x\"",
    // Prefixes and names.
    "\"/\"",
    "\"/pay\"",
    "\"/pay/\"",
    "\"/pay/refunds\"",
    "\"//\"",
    "\"pay\"",
    "\"default\"",
    "\"payments\"",
    // Enumerations and headers.
    "\"json\"",
    "\"pretty\"",
    "\"reject\"",
    "\"wait\"",
    "\"closed\"",
    "\"open\"",
    "\"retry\"",
    "\"authorization\"",
    "\" X-Tenant \"",
    "\"bad header\"",
    "\"idem:\"",
    "\"{tag}\"",
    "\"s3cret\"",
    "\"/etc/cert.pem\"",
    "\"info,idemproxy=debug\"",
    // Method lists.
    "[\"POST\"]",
    "[\"patch\", \" post \"]",
    "[]",
    "[\"GET\"]",
    "[1]",
    // Integers and booleans.
    "0",
    "1",
    "7",
    "8",
    "100",
    "8191",
    "8192",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-1",
    "1.5",
    "true",
    "false",
    // Tables.
    "{}",
    "{ require_key = true }",
    "{ enabled = false, methods = [\"PATCH\"] }",
    // Appended (see KEYS): key sources, pointers and status lists.
    "[\"header:X-Request-Id\", \"json:/client_order_id\"]",
    "[\"json:/a~1b/0\", \"query:rid\"]",
    "[\"json:nope\"]",
    "[\"cookie:sid\"]",
    "[\"/sent_at\", \"/meta/trace\"]",
    "[\"/a~2\"]",
    "[429, 503]",
    "[502, 504]",
    "[600]",
    "\"bytes\"",
    "\"X-Replayed\"",
    // Appended: error forms, retry hints, Sentinel URLs.
    "\"stripe\"",
    "\"problem\"",
    "\"Stripe-Should-Retry\"",
    "\"Idempotent-Replayed\"",
    "\"redis+sentinel://s1:26379,s2:26379/mymaster\"",
];

/// Builds a TOML document from `data`, so the fuzzer reaches the validation code behind the TOML
/// parser instead of spending itself on syntax. Read as a sequence of lines:
/// - `b % 8 == 0, t`: the table header `TABLES[t % len]`;
/// - `b % 8 != 0, k, v`: `KEYS[k % len] = VALUES[v % len]` when `v < 0xF0`; otherwise the value is
///   a TOML string of the next `n % 48` input bytes (`n` the byte after `v`, lossily UTF-8).
pub fn structured_toml(data: &[u8]) -> String {
    let mut out = String::new();
    let mut it = data.iter().copied();
    while let Some(op) = it.next() {
        if op % 8 == 0 {
            let Some(t) = it.next() else { break };
            out.push_str(TABLES[usize::from(t) % TABLES.len()]);
            out.push('\n');
            continue;
        }
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            break;
        };
        out.push_str(KEYS[usize::from(k) % KEYS.len()]);
        out.push_str(" = ");
        if v < 0xf0 {
            out.push_str(VALUES[usize::from(v) % VALUES.len()]);
        } else {
            let n = it.next().map_or(0, |n| usize::from(n) % 48);
            let raw: Vec<u8> = it.by_ref().take(n).collect();
            push_toml_string(&mut out, &String::from_utf8_lossy(&raw));
        }
        out.push('\n');
    }
    out
}

fn push_toml_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The disk store segment every `disk_recovery` input damages (built once: a clean store holding
/// completed, in-flight and Unknown records), each key's records in the order it held them, and
/// where its newest frame lies in the file.
struct DiskFixture {
    file: Vec<u8>,
    keys: Vec<DiskKey>,
}

struct DiskKey {
    key: idemproxy::idempotency::StorageKey,
    /// Every record the key held, oldest first: the last is what it holds.
    history: Vec<Record>,
    /// Its newest frame's header and trailer, as byte ranges of the file.
    header: std::ops::Range<usize>,
    trailer: std::ops::Range<usize>,
}

/// Keys in the `disk_recovery` fixture.
const DISK_KEYS: u32 = 12;

fn disk_fixture() -> &'static DiskFixture {
    static FIXTURE: std::sync::OnceLock<DiskFixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        use idemproxy::config::UnknownOutcome;
        use idemproxy::idempotency::{unix_ms, Fingerprint, LeaseToken, StorageKey, StoredResponse, UnknownCause};
        use idemproxy::store::{Begin, BeginRequest, DiskStore, Store};
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let records = runtime.block_on(async {
            let store = DiskStore::open(dir.path(), 1 << 30, Default::default()).expect("opens");
            let mut records = Vec::new();
            for i in 0..DISK_KEYS {
                let key = StorageKey::new("f:", "r", b"", &i.to_be_bytes());
                let request = BeginRequest {
                    key: &key,
                    print: idemproxy::idempotency::Print::Whole(Fingerprint::bytes([i as u8; 32])),
                    token: LeaseToken::random(),
                    key_ttl: Duration::from_secs(86_400),
                    lock_ttl: Duration::from_secs(3_600),
                    unknown_outcome: UnknownOutcome::Reject,
                    now_ms: unix_ms(),
                };
                assert_eq!(store.begin(&request).await, Ok(Begin::Owner(request.token)));
                let record = match i % 3 {
                    0 => request.in_flight_record(),
                    1 => Record::Completed {
                        fingerprint: request.print.fingerprint(),
                        response: StoredResponse {
                            status: http::StatusCode::CREATED,
                            headers: vec![(
                                http::HeaderName::from_static("content-type"),
                                http::HeaderValue::from_static("application/json"),
                            )],
                            body: Some(Bytes::from(format!("{{\"order\":{i}}}"))),
                            completed_at_ms: 1,
                        },
                    },
                    _ => Record::Unknown {
                        fingerprint: request.print.fingerprint(),
                        since_ms: 2,
                        cause: UnknownCause::Timeout,
                    },
                };
                let mut history = vec![request.in_flight_record()];
                if i % 3 != 0 {
                    assert_eq!(store.complete(&key, request.token, &record).await, Ok(true));
                    history.push(record);
                }
                records.push((key, history));
            }
            records
        });
        let mut file = std::fs::read(idemproxy::store::disk::segment::path(dir.path(), 1)).expect("the segment");
        // Without the zeros the writer prepares ahead of its appends: the damage goes to frames.
        file.truncate(frames_end(&file));
        let keys = records
            .into_iter()
            .map(|(key, history)| {
                let (header, trailer) = newest_frame(&file, key.digest());
                DiskKey {
                    key,
                    history,
                    header,
                    trailer,
                }
            })
            .collect();
        DiskFixture { file, keys }
    })
}

/// Where the frames of the undamaged `file` end.
fn frames_end(file: &[u8]) -> usize {
    let mut at = 0;
    while let Some(head) = idemproxy::store::disk::format::header(&file[at..]) {
        at += head.frame_len();
    }
    at
}

/// The header and trailer ranges of the last frame of `digest` in the undamaged `file`.
fn newest_frame(file: &[u8], digest: &[u8; 32]) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    use idemproxy::store::disk::format;
    let mut at = 0;
    let mut newest = None;
    while let Some(head) = format::header(&file[at..]) {
        let end = at + head.frame_len();
        if head.digest == *digest {
            newest = Some((at..at + format::HEADER, end - format::TRAILER..end));
        }
        at = end;
    }
    newest.expect("every fixture key has a frame")
}

/// Applies `data` to `file` as damage, 5 bytes per change: a kind byte and a little-endian
/// offset. Kind % 4: 0 flips one bit, 1 overwrites 512 bytes with the kind byte (a torn page),
/// 2 cuts the file's tail (a torn last write), 3 appends 64 bytes of garbage. Returns the byte
/// ranges of the original file it changed, and the shortest length the file was cut to.
fn damage(file: &mut Vec<u8>, data: &[u8]) -> (Vec<std::ops::Range<usize>>, usize) {
    let mut touched = Vec::new();
    let mut shortest = file.len();
    for change in data.chunks_exact(5) {
        let kind = change[0];
        let offset = u32::from_le_bytes([change[1], change[2], change[3], change[4]]) as usize;
        if file.is_empty() {
            break;
        }
        let at = offset % file.len();
        match kind % 4 {
            0 => {
                file[at] ^= 1 << ((kind >> 2) % 8);
                touched.push(at..at + 1);
            }
            1 => {
                let end = (at + 512).min(file.len());
                file[at..end].fill(kind);
                touched.push(at..end);
            }
            2 => {
                file.truncate(file.len() - (offset % 4096).min(file.len()));
                shortest = shortest.min(file.len());
            }
            _ => file.extend(std::iter::repeat_n(kind, 64)),
        }
    }
    (touched, shortest)
}

/// What a key answered, comparably.
#[derive(Debug, PartialEq)]
enum Answer {
    Held(usize),
    Absent,
    Corrupt,
}

/// Opens the store in `dir`, which this process just closed (or never opened). The directory's
/// lock is released when its file is closed, but a child process that another test of the
/// same binary forks at that moment holds a copy of the descriptor until it `exec`s (a
/// millisecond, longer on a loaded machine): only that wait is retried, for at most 2 s.
fn reopen(dir: &std::path::Path) -> Result<idemproxy::store::DiskStore, idemproxy::store::StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match idemproxy::store::DiskStore::open(dir, 1 << 30, Default::default()) {
            Err(err) if err.to_string().contains("in use by another") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return opened,
        }
    }
}

/// `disk_recovery`: a disk store whose segment was damaged by `data` (see [`damage`]) always
/// opens (docs/behaviour.md §11.4) and never panics. A key whose newest frame the damage did not
/// touch answers exactly its record. A touched key answers its record or `Corrupt`; it may lose
/// its newest record (to an older one it held, or none) only when the damage left nothing to name
/// it by (both its header and its trailer hit) or cut the file inside it (a torn tail). A new key
/// can be written after the damage, and a second open answers every key as the first did.
pub fn check_disk_recovery(data: &[u8]) -> bool {
    use idemproxy::store::{BeginRequest, DiskStore, Store, StoreError};
    let fixture = disk_fixture();
    let mut file = fixture.file.clone();
    let (touched, shortest) = damage(&mut file, data);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = idemproxy::store::disk::segment::path(dir.path(), 1);
    std::fs::write(&path, &file).expect("write the damaged file");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let hit = |range: &std::ops::Range<usize>| touched.iter().any(|t| t.start < range.end && range.start < t.end);
    let fresh = idemproxy::idempotency::StorageKey::new("f:", "r", b"", b"after the damage");
    let answers = |store: &DiskStore| {
        runtime.block_on(async {
            let mut answers = Vec::new();
            for k in &fixture.keys {
                let answer = match store.lookup(&k.key).await {
                    Ok(Some(state)) => match k.history.iter().position(|r| *r == state.existing.record) {
                        Some(i) => Answer::Held(i),
                        None => panic!("a damaged file changed a record: {:?}", state.existing.record),
                    },
                    Ok(None) => Answer::Absent,
                    Err(StoreError::Corrupt(_)) => Answer::Corrupt,
                    Err(other) => panic!("unexpected answer {other:?}"),
                };
                let newest = Answer::Held(k.history.len() - 1);
                let lost = answer != newest && answer != Answer::Corrupt;
                if !hit(&(k.header.start..k.trailer.end)) && k.trailer.end <= shortest {
                    assert_eq!(answer, newest, "an undamaged key changed");
                } else if lost {
                    let nameless = hit(&k.header) && hit(&k.trailer);
                    assert!(
                        nameless || k.trailer.end > shortest,
                        "a damaged key lost its record: {answer:?}"
                    );
                }
                answers.push(answer);
            }
            answers
        })
    };
    let first = {
        let store = reopen(dir.path()).expect("a damaged store opens");
        let answers = answers(&store);
        let request = BeginRequest {
            key: &fresh,
            print: idemproxy::idempotency::Print::Whole(idemproxy::idempotency::Fingerprint::bytes([7; 32])),
            token: idemproxy::idempotency::LeaseToken::random(),
            key_ttl: Duration::from_secs(86_400),
            lock_ttl: Duration::from_secs(3_600),
            unknown_outcome: idemproxy::config::UnknownOutcome::Reject,
            now_ms: idemproxy::idempotency::unix_ms(),
        };
        let begun = runtime.block_on(store.begin(&request));
        assert_eq!(
            begun,
            Ok(idemproxy::store::Begin::Owner(request.token)),
            "a new key after the damage"
        );
        answers
    };
    let store = reopen(dir.path()).expect("opens again");
    assert_eq!(answers(&store), first, "a second open answers as the first");
    let fresh_state = runtime.block_on(store.lookup(&fresh));
    assert!(
        matches!(fresh_state, Ok(Some(_))),
        "the new key stands: {fresh_state:?}"
    );
    true
}
