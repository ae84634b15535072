//! The Redis store (standalone through a `ConnectionManager`, or Redis Cluster).
//!
//! Each key has two Redis keys sharing one hash tag, so they always live on one cluster slot:
//! the record `prefix{hash}` (expires `key_ttl` after creation; updates keep that expiry with
//! `KEEPTTL`) and the lease `prefix{hash}:lease` (holds the owner's token, expires `lock_ttl`
//! after its last renewal).
//!
//! Every operation is one round trip: `begin`, `complete`/`release` and `renew` are Lua scripts
//! run with `EVALSHA` (loaded on first use, re-loaded automatically after a `NOSCRIPT`), which
//! read the record's state byte, fingerprint and owner token at the fixed offsets of
//! [`record`](crate::idempotency::record). A replay costs one command, a first execution two,
//! plus one per lease renewal (spec §4).

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, Script, Value};

use super::{Begin, BeginRequest, KeyState, Store, StoreError};
use crate::config::UnknownOutcome;
use crate::idempotency::{decide, Existing, LeaseToken, Record, StorageKey};

/// Decides an arriving request atomically (spec §4's table; mirrors `decide`).
///
/// KEYS: record, lease. ARGV: new InFlight record, owner token, key_ttl ms, lock_ttl ms,
/// fingerprint, `retry`|`reject`, Unknown(lease lapsed) record.
/// Returns `{0}` when this request now owns a new record, else `{1, record, lease PTTL}` with
/// the record as it was before any takeover/mark-unknown this script applied. It only takes over
/// (or marks Unknown) a well-formed InFlight record (version 1, state 1, exactly 58 bytes, the
/// length `Record::decode` requires), so a record the caller will report as corrupt is never
/// overwritten behind its back.
const BEGIN_LUA: &str = r"
local rec = redis.call('GET', KEYS[1])
if not rec then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
  return {0}
end
local lease = redis.call('PTTL', KEYS[2])
if lease <= 0 and #rec == 58 and string.byte(rec, 1) == 1 and string.byte(rec, 2) == 1
   and string.sub(rec, 3, 34) == ARGV[5] then
  if ARGV[6] == 'retry' then
    redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[7], 'KEEPTTL')
    redis.call('DEL', KEYS[2])
  end
end
return {1, rec, lease}
";

/// Compare-and-set on the owner token: replace the InFlight record with ARGV[2] (keeping its
/// expiry) and drop the lease, or with an empty ARGV[2] delete both. Returns 1 if done.
const FINISH_LUA: &str = r"
local rec = redis.call('GET', KEYS[1])
if (not rec) or #rec ~= 58 or string.byte(rec, 1) ~= 1 or string.byte(rec, 2) ~= 1
   or string.sub(rec, 35, 50) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  redis.call('DEL', KEYS[2])
end
return 1
";

/// Compare-and-set on the owner token: (re)grant the lease for ARGV[2] ms. Returns 1 if done.
const RENEW_LUA: &str = r"
local rec = redis.call('GET', KEYS[1])
if (not rec) or #rec ~= 58 or string.byte(rec, 1) ~= 1 or string.byte(rec, 2) ~= 1
   or string.sub(rec, 35, 50) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
";

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
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
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Records in Redis, shared by every proxy pointed at it.
pub struct RedisStore {
    connection: Connection,
    command_timeout: Duration,
    begin: Script,
    finish: Script,
    renew: Script,
}

fn unavailable(err: RedisError) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn unexpected(what: &str, value: &Value) -> StoreError {
    StoreError::Unavailable(format!("unexpected reply to {what}: {value:?}"))
}

impl RedisStore {
    /// Connects to `url`: `redis://host:port[/db]` or `rediss://…` for one server (reconnects on
    /// its own; the first connection is made lazily, so the proxy starts while Redis is down),
    /// `redis+cluster://h1:p1,h2:p2` (or `rediss+cluster://…`) for a cluster. `rediss` servers
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
            Connection::Cluster(client.get_async_connection().await.map_err(unavailable)?)
        } else {
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url, certificates),
                None => redis::Client::open(url),
            }
            .map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(command_timeout))
                .set_response_timeout(Some(command_timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Connection::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?)
        };
        Ok(Self {
            connection,
            command_timeout,
            begin: Script::new(BEGIN_LUA),
            finish: Script::new(FINISH_LUA),
            renew: Script::new(RENEW_LUA),
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.connection, Connection::Cluster(_))
    }

    /// Runs one script with the record and lease keys, bounded by the command timeout.
    async fn run(&self, script: &Script, key: &StorageKey, args: &[&[u8]]) -> Result<Value, StoreError> {
        let mut invocation = script.key(key.record_key());
        invocation.key(key.lease_key());
        for arg in args {
            invocation.arg(*arg);
        }
        let mut connection = self.connection.clone();
        match tokio::time::timeout(self.command_timeout, invocation.invoke_async(&mut connection)).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.command_timeout
            ))),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        match tokio::time::timeout(self.command_timeout, pipeline.query_async(&mut connection)).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.command_timeout
            ))),
        }
    }
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

fn lease_left(pttl: i64) -> Option<Duration> {
    (pttl > 0).then(|| Duration::from_millis(pttl as u64))
}

impl Store for RedisStore {
    async fn begin(&self, request: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let in_flight = request.in_flight_record().encode();
        let lapsed = request.lapsed_record().encode();
        let mode: &[u8] = match request.unknown_outcome {
            UnknownOutcome::Retry => b"retry",
            UnknownOutcome::Reject => b"reject",
        };
        let reply = self
            .run(
                &self.begin,
                request.key,
                &[
                    &in_flight,
                    &request.token.0,
                    &millis(request.key_ttl),
                    &millis(request.lock_ttl),
                    &request.fingerprint.0,
                    mode,
                    &lapsed,
                ],
            )
            .await?;
        let Value::Array(items) = reply else {
            return Err(unexpected("begin", &reply));
        };
        match items.as_slice() {
            [Value::Int(0)] => Ok(Begin::Owner),
            [Value::Int(1), Value::BulkString(_), Value::Int(_)] => {
                let mut items = items.into_iter();
                let (Some(_), Some(Value::BulkString(bytes)), Some(pttl)) = (items.next(), items.next(), items.next())
                else {
                    return Err(StoreError::Unavailable("begin reply changed shape".into()));
                };
                let existing = Existing {
                    record: Record::decode(Bytes::from(bytes))?,
                    lease_left: as_int(&pttl).and_then(lease_left),
                };
                Ok(decide(Some(existing), &request.fingerprint, request.unknown_outcome).into())
            }
            _ => Err(unexpected("begin", &Value::Array(items))),
        }
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
        let reply = self.run(&self.renew, key, &[&token.0, &millis(lock_ttl)]).await?;
        Ok(as_int(&reply) == Some(1))
    }

    async fn lookup(&self, key: &StorageKey) -> Result<Option<KeyState>, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline
            .get(key.record_key())
            .pttl(key.record_key())
            .pttl(key.lease_key());
        let (record, record_pttl, lease_pttl): (Option<Vec<u8>>, i64, i64) = self.query(&pipeline).await?;
        let Some(record) = record else {
            return Ok(None);
        };
        Ok(Some(KeyState {
            existing: Existing {
                record: Record::decode(Bytes::from(record))?,
                lease_left: lease_left(lease_pttl),
            },
            expires_in: lease_left(record_pttl),
        }))
    }

    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.del(key.record_key()).del(key.lease_key());
        let (records, _leases): (i64, i64) = self.query(&pipeline).await?;
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

    /// The scripts recognise an InFlight record by its exact encoded length.
    #[test]
    fn scripts_know_the_in_flight_record_length() {
        let record = Record::InFlight {
            fingerprint: Fingerprint([1; 32]),
            owner: LeaseToken([2; 16]),
            started_at_ms: u64::MAX,
        };
        let len = record.encode().len();
        assert_eq!(len, 58);
        for script in [BEGIN_LUA, FINISH_LUA, RENEW_LUA] {
            assert!(script.contains(&format!("#rec == {len}")) || script.contains(&format!("#rec ~= {len}")));
        }
    }
}
