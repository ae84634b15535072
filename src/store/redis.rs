//! The Redis store (standalone through a `ConnectionManager`, or Redis Cluster).
//!
//! Each key is one Redis key, the record `prefix{hash}` (expires `key_ttl` after creation;
//! updates keep that expiry with `KEEPTTL`). While the key executes, the record is InFlight and
//! carries its owner's token and lease deadline (`record`'s layout), so:
//!
//! - `begin` is one native `SET record <InFlight> NX GET PX key_ttl` (Redis 7.0 or later): a nil
//!   reply means this request now owns the key; otherwise the reply is the existing record,
//!   decided by [`decide`] here. Only when that record is InFlight with a lapsed lease does a
//!   second step follow (take over or mark Unknown, a compare-and-set script), since its
//!   owner died: the rare path.
//! - `complete`/`release` and `renew` are compare-and-set scripts on the owner token, run with
//!   `EVALSHA` (loaded on first use, re-loaded automatically after a `NOSCRIPT`), which read the
//!   record's state byte and token at the fixed offsets of [`record`](crate::idempotency::record).
//!
//! A replay costs one command (the `SET … NX GET`, which writes nothing when the key exists), a
//! first execution two, plus one per lease renewal (docs/behaviour.md §4).
//!
//! Lease deadlines are wall-clock milliseconds written by the owning proxy and read by the
//! others: proxies sharing a Redis need clocks in sync to well within `lock_ttl` (NTP).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, Script, Value};
use tokio::sync::OnceCell;

use super::{lease_left_at, Begin, BeginRequest, KeyState, Store, StoreError, StoreFault};
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Record, StorageKey, CONFLICT_RETRY_AFTER};

/// How many times `begin` re-reads a key whose lapsed owner another proxy took over first.
const TAKEOVER_ATTEMPTS: usize = 3;

/// Compare-and-set on the whole record: replace ARGV[1] (an InFlight record whose lease lapsed,
/// as `begin` read it) with ARGV[2], keeping the expiry. Returns 1 if done, 0 if the record
/// changed meanwhile (renewed, completed, or taken over by another proxy).
const TAKEOVER_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
";

/// Compare-and-set on the owner token: replace the InFlight record with ARGV[2] (keeping its
/// expiry), or with an empty ARGV[2] delete it. Returns 1 if done.
const FINISH_LUA: &str = r"
local rec = redis.call('GET', KEYS[1])
if (not rec) or #rec ~= 66 or string.byte(rec, 1) ~= 2 or string.byte(rec, 2) ~= 1
   or string.sub(rec, 35, 50) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
";

/// Compare-and-set on the owner token: set the lease deadline (8 bytes, big-endian Unix ms) to
/// ARGV[2]. Returns 1 if done.
const RENEW_LUA: &str = r"
local rec = redis.call('GET', KEYS[1])
if (not rec) or #rec ~= 66 or string.byte(rec, 1) ~= 2 or string.byte(rec, 2) ~= 1
   or string.sub(rec, 35, 50) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], string.sub(rec, 1, 58) .. ARGV[2], 'KEEPTTL')
return 1
";

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use, like the single server's `ConnectionManager`: the
/// proxy starts (and serves pass-through traffic) while the cluster is unreachable, and
/// guarded requests count as a store failure until it answers. Once made, redis-rs follows the
/// cluster's topology and reconnects to its nodes on its own.
struct LazyCluster {
    client: ClusterClient,
    connection: OnceCell<ClusterConnection>,
}

impl LazyCluster {
    /// The connection, made now if no attempt has succeeded yet (concurrent callers wait for one
    /// attempt; after a failure the next caller tries again).
    async fn get(&self) -> Result<ClusterConnection, RedisError> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(lazy) => Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(lazy) => {
                Box::pin(async move { lazy.get().await?.req_packed_commands(cmd, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            // Redis Cluster has database 0 only.
            Connection::Cluster(_) => 0,
        }
    }
}

/// Records in Redis, shared by every proxy pointed at it.
pub struct RedisStore {
    connection: Connection,
    command_timeout: Duration,
    takeover: Script,
    finish: Script,
    renew: Script,
}

fn unavailable(err: RedisError) -> StoreError {
    StoreError::unreachable(err)
}

fn unexpected(what: &'static str, value: &Value) -> StoreError {
    StoreError::Unavailable(StoreFault::UnexpectedReply {
        command: what,
        reply: format!("{value:?}"),
    })
}

impl RedisStore {
    /// Connects to `url`: `redis://host:port[/db]` or `rediss://…` for one server,
    /// `redis+cluster://h1:p1,h2:p2` (or `rediss+cluster://…`) for a cluster. Either way the
    /// first connection is made on first use and lost ones are made again, so the proxy starts
    /// while Redis is down; only a malformed URL fails here. `rediss` servers
    /// are checked against the bundled Mozilla roots; see [`connect_with_ca`](Self::connect_with_ca).
    pub async fn connect(url: &str, command_timeout: Duration) -> Result<Self, StoreError> {
        Self::connect_with_ca(url, command_timeout, None).await
    }

    /// [`connect`](Self::connect), with `ca_pem` (PEM certificates, `store.ca_file`) trusted for
    /// `rediss` instead of the bundled roots, on a single server and on every cluster node.
    pub async fn connect_with_ca(
        url: &str,
        command_timeout: Duration,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        // The redis crate builds its rustls configuration on the process-wide crypto provider.
        crate::tls::crypto_provider();
        let certificates = ca_pem.map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
        let connection = if let Some((scheme, nodes)) = cluster_nodes(url) {
            let nodes: Vec<String> = nodes.split(',').map(|n| format!("{scheme}://{n}")).collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(command_timeout)
                .response_timeout(command_timeout);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            let client = builder.build().map_err(unavailable)?;
            Connection::Cluster(Arc::new(LazyCluster {
                client,
                connection: OnceCell::new(),
            }))
        } else {
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url, certificates),
                None => redis::Client::open(url),
            }
            .map_err(unavailable)?;
            // No response timeout of the client's own: every command is bounded by
            // `command_timeout` here (one timer per command, not two).
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(command_timeout))
                .set_response_timeout(None)
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Connection::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?)
        };
        Ok(Self {
            connection,
            command_timeout,
            takeover: Script::new(TAKEOVER_LUA),
            finish: Script::new(FINISH_LUA),
            renew: Script::new(RENEW_LUA),
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.connection, Connection::Cluster(_))
    }

    /// Runs one script on the record key, bounded by the command timeout.
    async fn run(&self, script: &Script, key: &StorageKey, args: &[&[u8]]) -> Result<Value, StoreError> {
        let mut invocation = script.key(key.record_key());
        for arg in args {
            invocation.arg(*arg);
        }
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async(&mut connection)).await
    }

    /// Runs one command, bounded by the command timeout.
    async fn command(&self, cmd: &Cmd) -> Result<Value, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(cmd.query_async(&mut connection)).await
    }

    async fn query<T: redis::FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(pipeline.query_async(&mut connection)).await
    }

    /// `request`'s answer within `command_timeout`, or `Unavailable`.
    async fn bounded<T>(&self, request: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, request).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::timeout(self.command_timeout)),
        }
    }
}

/// `url` with the password of its user information replaced by `***`, for logs:
/// `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => rest[..at].to_owned(),
    };
    format!("{scheme}://{user}@{}", &rest[at + 1..])
}

/// `redis+cluster://a:1,b:2` → `("redis", "a:1,b:2")`.
fn cluster_nodes(url: &str) -> Option<(&'static str, &str)> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        return Some(("redis", rest));
    }
    url.strip_prefix("rediss+cluster://").map(|rest| ("rediss", rest))
}

fn millis(d: Duration) -> Vec<u8> {
    d.as_millis().max(1).to_string().into_bytes()
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

impl Store for RedisStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
        let in_flight = request.in_flight_record().encode();
        let mut set = redis::cmd("SET");
        set.arg(request.key.record_key())
            .arg(&in_flight[..])
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(request.key_ttl));
        for _ in 0..TAKEOVER_ATTEMPTS {
            let existing = match self.command(&set).await? {
                Value::Nil => return Ok(Begin::Owner(request.token)),
                Value::BulkString(bytes) => Bytes::from(bytes),
                other => return Err(unexpected("SET NX GET", &other)),
            };
            let record = Record::decode(existing.clone())?;
            let lease_left = lease_left_at(&record, request.now_ms);
            let decision = decide(
                Some(Existing { record, lease_left }),
                &request.fingerprint,
                request.unknown_outcome,
            );
            let replacement = match decision {
                Decision::TakeOver => in_flight.clone(),
                Decision::MarkUnknown => request.lapsed_record().encode(),
                decision => return Ok(Begin::applied(decision, request.token)),
            };
            // The owner died (its lease lapsed): replace its record, unless it changed meanwhile.
            let reply = self
                .run(&self.takeover, request.key, &[&existing, &replacement])
                .await?;
            if as_int(&reply) == Some(1) {
                return Ok(Begin::applied(decision, request.token));
            }
        }
        // Other proxies keep changing this key's record: it is busy; the client retries later.
        Ok(Begin::InFlight {
            retry_after: CONFLICT_RETRY_AFTER,
        })
    }

    async fn complete(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        let reply = self.run(&self.finish, key, &[&token.0, &record.encode()]).await?;
        Ok(as_int(&reply) == Some(1))
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let reply = self.run(&self.finish, key, &[&token.0, b""]).await?;
        Ok(as_int(&reply) == Some(1))
    }

    async fn renew(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        let lease_until = unix_ms().saturating_add(lock_ttl.as_millis() as u64);
        let reply = self
            .run(&self.renew, key, &[&token.0, &lease_until.to_be_bytes()])
            .await?;
        Ok(as_int(&reply) == Some(1))
    }

    async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.get(key.record_key()).pttl(key.record_key());
        let (record, record_pttl): (Option<Vec<u8>>, i64) = self.query(&pipeline).await?;
        let Some(record) = record else {
            return Ok(None);
        };
        let record = Record::decode(Bytes::from(record))?;
        Ok(Some(KeyState {
            existing: Existing {
                lease_left: lease_left_at(&record, unix_ms()),
                record,
            },
            expires_in: (record_pttl > 0).then(|| Duration::from_millis(record_pttl as u64)),
        }))
    }

    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.del(key.record_key());
        let (records,): (i64,) = self.query(&pipeline).await?;
        Ok(records > 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("PING");
        let (_pong,): (String,) = self.query(&pipeline).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::Fingerprint;

    #[test]
    fn urls_are_logged_without_their_password() {
        assert_eq!(
            redacted_url("redis://user:s3cret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redacted_url("rediss://:s3cret@h:6380"), "rediss://:***@h:6380");
        assert_eq!(redacted_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redacted_url("redis+cluster://a:1,b:2"), "redis+cluster://a:1,b:2");
        assert_eq!(redacted_url("redis://u:p@ss@h:1/2"), "redis://u:***@h:1/2");
    }

    /// The scripts recognise an InFlight record by its version, state and exact length, find
    /// the token at its offset, and rewrite the lease deadline that ends it.
    #[test]
    fn scripts_know_the_in_flight_record_layout() {
        use crate::idempotency::record::{IN_FLIGHT_LEN, LEASE_OFFSET, TOKEN_OFFSET, VERSION};
        let record = Record::InFlight {
            fingerprint: Fingerprint([1; 32]),
            owner: LeaseToken([2; 16]),
            started_at_ms: u64::MAX,
            lease_until_ms: u64::MAX,
        };
        assert_eq!(record.encode().len(), IN_FLIGHT_LEN);
        for script in [FINISH_LUA, RENEW_LUA] {
            assert!(script.contains(&format!("#rec ~= {IN_FLIGHT_LEN}")));
            assert!(script.contains(&format!("string.byte(rec, 1) ~= {VERSION}")));
            // Lua strings are 1-based and `sub` is inclusive.
            assert!(script.contains(&format!("string.sub(rec, {}, {})", TOKEN_OFFSET + 1, TOKEN_OFFSET + 16)));
        }
        assert!(RENEW_LUA.contains(&format!("string.sub(rec, 1, {LEASE_OFFSET})")));
    }
}
