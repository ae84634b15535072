//! The Redis store: a single server, Redis Cluster, or the master of a Sentinel group followed
//! across failovers (the connection kinds are in `redis_connection`).
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
//! With `store.min_replicas` > 0 (docs/behaviour.md §4.4), the `SET … NX GET` of `begin`, a
//! takeover and a completion travel in their master's next group-committed batch, each batch
//! with its `WAIT` pipelined right behind ([`group_commit`](super::group_commit)): the round
//! trips stay the same as the request sees them. A request owns its key only once its
//! `InFlight` record is acknowledged; otherwise the key is released and the request is not
//! forwarded. A completion not acknowledged in time is still answered (counted, logged at warn).
//! A `begin` that no batch has taken within [`BEGIN_LEAVES_WITHIN`] (replicas that stopped
//! acknowledging hold every batch connection on its `WAIT`) goes on the store's own connection
//! instead, so that a replay never waits out those `WAIT`s; a key it takes is then re-written in
//! a batch, and acknowledged, before it is owned.
//!
//! Lease deadlines are wall-clock milliseconds written by the owning proxy and read by the
//! others: proxies sharing a Redis need clocks in sync to well within `lock_ttl` (NTP).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::{Cmd, Pipeline, RedisError, Script, Value};

use super::group_commit::{PendingAck, Sent};
use super::redis_connection::{Connection, Setup};
use super::replication::Replication;
use super::subscriber::{channel_of, Subscriber, Subscription};
use super::waiters::Waiters;
use super::{lease_left_at, Begin, BeginRequest, KeyState, Store, StoreError, StoreFault};
use crate::config::{Replication as ReplicationSettings, Secret};
use crate::error::Chain;
use crate::idempotency::{decide, unix_ms, Decision, Existing, LeaseToken, Record, StorageKey, CONFLICT_RETRY_AFTER};
use crate::telemetry::{ReplicaAcks, WaitMetrics};

/// How many times `begin` re-reads a key whose lapsed owner another proxy took over first.
const TAKEOVER_ATTEMPTS: usize = 3;

/// How often a key whose record was not acknowledged is released again, while that fails.
const RELEASE_RETRY: Duration = Duration::from_millis(200);

/// With acknowledged writes, how long a `begin` waits for a batch to take its `SET … NX GET`
/// before sending it on the store's connection: the longest a replay waits for other writes'
/// `WAIT` (healthy replicas answer a `WAIT` within a round trip to them).
const BEGIN_LEAVES_WITHIN: Duration = Duration::from_millis(20);

/// Compare-and-set on the whole record: replace ARGV[1] (an InFlight record whose lease lapsed,
/// as `begin` read it) with ARGV[2], keeping the expiry. Returns 1 if done, 0 if the record
/// changed meanwhile (renewed, completed, or taken over by another proxy). With ARGV[2] equal to
/// ARGV[1] it re-writes a record as it is (so that a `WAIT` on this connection covers it).
const TAKEOVER_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
";

/// The start of every owner's script: unless KEYS[1] holds an InFlight record (a version byte of
/// 2 to 4, whatever its fingerprint's scheme, its state byte and exact length) owned by the
/// token ARGV[1], return 0 (`rec` is the record).
macro_rules! owner_guard {
    () => {
        r"
local rec = redis.call('GET', KEYS[1])
if (not rec) or #rec ~= 66 or string.byte(rec, 1) < 2 or string.byte(rec, 1) > 4 or string.byte(rec, 2) ~= 1
   or string.sub(rec, 35, 50) ~= ARGV[1] then
  return 0
end
"
    };
}

/// Compare-and-set on the owner token: replace the InFlight record with ARGV[2] (keeping its
/// expiry), or with an empty ARGV[2] delete it; then wake the key's waiters, in this proxy and
/// others, on the key's own channel (sharded pub/sub on the key's slot, docs/behaviour.md §15):
/// `c` completed, `r` released. Returns 1 if done.
const FINISH_LUA: &str = concat!(
    owner_guard!(),
    r"if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SPUBLISH', KEYS[1] .. ':settled', 'r')
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  redis.call('SPUBLISH', KEYS[1] .. ':settled', 'c')
end
return 1
"
);

/// Compare-and-set on the owner token: set the lease deadline (8 bytes, big-endian Unix ms) to
/// ARGV[2]. Returns 1 if done.
const RENEW_LUA: &str = concat!(
    owner_guard!(),
    r"redis.call('SET', KEYS[1], string.sub(rec, 1, 58) .. ARGV[2], 'KEEPTTL')
return 1
"
);

/// How the Redis store connects, besides its URL.
#[derive(Clone, Default)]
pub struct RedisOptions {
    /// Longest a command may take before the store counts as unavailable (`store.command_timeout`).
    pub command_timeout: Duration,
    /// `rediss`: CA certificates (PEM) trusted instead of the bundled Mozilla roots
    /// (`store.ca_file`), on every node (and every sentinel).
    pub ca_pem: Option<Vec<u8>>,
    /// `redis+sentinel://`: the sentinels' password (`store.sentinel_password`).
    pub sentinel_password: Option<Secret>,
    /// `store.min_replicas` and `store.replica_timeout`.
    pub replication: ReplicationSettings,
    /// Where replica acknowledgements are counted.
    pub replica_acks: ReplicaAcks,
    /// Where the subscription's losses are counted.
    pub wait_metrics: WaitMetrics,
}

impl RedisOptions {
    /// The defaults, with `command_timeout`.
    pub fn new(command_timeout: Duration) -> Self {
        Self {
            command_timeout,
            replication: ReplicationSettings {
                min_replicas: 0,
                replica_timeout: command_timeout.min(ReplicationSettings::default().replica_timeout),
            },
            ..Self::default()
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
    /// Acknowledged writes, when `store.min_replicas` > 0.
    replication: Option<Box<Replication>>,
    /// This proxy's requests waiting for keys, woken by `subscriber`'s messages.
    waiters: Arc<Waiters>,
    subscriber: Subscriber,
}

/// How a write that may need acknowledging was sent.
enum Written {
    /// No acknowledgement asked for.
    Unacknowledged,
    /// In a batch: its `WAIT` answers for it.
    Pending(PendingAck),
    /// On the store's connection, its master's batches all stuck on their `WAIT`: it counts
    /// only once re-written in a batch and acknowledged.
    Unconfirmed,
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
    /// Connects to `url` with the default [`RedisOptions`] but `command_timeout`. See
    /// [`connect_with`](Self::connect_with).
    pub async fn connect(url: &str, command_timeout: Duration) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisOptions::new(command_timeout)).await
    }

    /// Connects to `url`: `redis://host:port[/db]` or `rediss://…` for one server,
    /// `redis+cluster://h1:p1,h2:p2` (or `rediss+cluster://…`) for a cluster,
    /// `redis+sentinel://[user:password@]h1:p1,h2:p2/<master-name>[/<db>]` (or
    /// `rediss+sentinel://…`) for the master of a Sentinel group. Either way the first
    /// connection is made on first use and lost ones are made again, so the proxy starts while
    /// Redis is down; only a malformed URL fails here.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        // The redis crate builds its rustls configuration on the process-wide crypto provider.
        crate::tls::crypto_provider();
        let certificates = options.ca_pem.map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
        let setup = Setup {
            command_timeout: options.command_timeout,
            certificates: certificates.clone(),
            sentinel_password: options.sentinel_password.as_ref(),
            min_replicas: options.replication.min_replicas,
            replica_timeout: options.replication.replica_timeout,
            replica_acks: options.replica_acks,
        };
        let (connection, replication) = Connection::open(url, setup).map_err(unavailable)?;
        let waiters = Waiters::new();
        let subscriber = Subscriber::new(
            url,
            &connection,
            certificates,
            options.command_timeout,
            waiters.clone(),
            options.wait_metrics,
        )
        .map_err(unavailable)?;
        Ok(Self {
            connection,
            command_timeout: options.command_timeout,
            takeover: Script::new(TAKEOVER_LUA),
            finish: Script::new(FINISH_LUA),
            renew: Script::new(RENEW_LUA),
            replication: replication.map(Box::new),
            waiters,
            subscriber,
        })
    }

    /// The registry of this proxy's requests waiting for keys of this store.
    pub fn waiters(&self) -> &Arc<Waiters> {
        &self.waiters
    }

    /// Subscribes to `key`'s channel for a waiting request (docs/behaviour.md §15).
    pub async fn subscribe(&self, key: &StorageKey) -> Result<Subscription, StoreError> {
        self.subscriber.subscribe(key).await
    }

    pub fn is_cluster(&self) -> bool {
        self.connection.is_cluster()
    }

    pub fn is_sentinel(&self) -> bool {
        self.connection.is_sentinel()
    }

    /// Runs one script on the record key with `EVALSHA`, bounded by the command timeout; a
    /// `NOSCRIPT` reply (a server that has not loaded it yet, or restarted) loads it with
    /// `SCRIPT LOAD` and sends the command again.
    async fn run(&self, script: &Script, key: &StorageKey, args: &[&[u8]]) -> Result<Value, StoreError> {
        let invocation = evalsha(script, key, args);
        self.bounded(async {
            match self.connection.send(&invocation).await {
                Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    script.load_async(&mut self.connection.clone()).await?;
                    self.connection.send(&invocation).await
                }
                reply => reply,
            }
        })
        .await
    }

    /// Runs one command, bounded by the command timeout.
    async fn command(&self, cmd: &Cmd) -> Result<Value, StoreError> {
        self.bounded(self.connection.send(cmd)).await
    }

    async fn query<T: redis::FromRedisValue>(&self, pipeline: &Pipeline) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(pipeline.query_async(&mut connection)).await
    }

    /// `request`'s answer within `command_timeout`, or `Unavailable`. A command with no answer
    /// in time makes a Sentinel store ask the sentinels again.
    async fn bounded<T>(&self, request: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        let answer = self.within(request).await;
        if matches!(answer, Err(StoreError::Unavailable(StoreFault::Timeout(_)))) {
            self.connection.timed_out();
        }
        answer
    }

    /// [`bounded`](Self::bounded) for a write queued for a batch: a timeout may be the queue's,
    /// not the master's (the batch's own failures are seen by its connection).
    async fn within<T>(&self, request: impl Future<Output = Result<T, RedisError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, request).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::timeout(self.command_timeout)),
        }
    }

    /// Sends `write` (a command on `key`'s record) so that it can be acknowledged: in its
    /// master's next batch, or, if no batch took it within `leave_within` (its master's
    /// batches are all blocked on their `WAIT`), on the store's connection, to be confirmed
    /// later. Without replication, simply on the store's connection.
    async fn write(
        &self,
        key: &StorageKey,
        write: &Cmd,
        leave_within: Duration,
    ) -> Result<(Value, Written), StoreError> {
        let Some(replication) = &self.replication else {
            return Ok((self.command(write).await?, Written::Unacknowledged));
        };
        let mut connection = self.connection.clone();
        let batched = replication.write(
            key.record_key().as_bytes(),
            write.clone(),
            &mut connection,
            leave_within,
        );
        match self.within(batched).await? {
            Sent::Batched(value, pending) => Ok((value, Written::Pending(pending))),
            Sent::Withdrawn => Ok((self.command(write).await?, Written::Unconfirmed)),
        }
    }

    /// `Owner` of `request`'s key once its `InFlight` record (`record`, as written) is
    /// acknowledged as `store.min_replicas` asks. If it is not, the key is released and the
    /// request gets the store failure: it is not forwarded (docs/behaviour.md §4.4).
    async fn owned(
        &self,
        request: &BeginRequest<'_>,
        record: &[u8],
        written: Written,
    ) -> Result<Begin<LeaseToken>, StoreError> {
        let acknowledged = match (&self.replication, written) {
            (None, _) | (_, Written::Unacknowledged) => return Ok(Begin::Owner(request.token)),
            (Some(replication), Written::Pending(pending)) => replication.acknowledged(pending).await,
            (Some(_), Written::Unconfirmed) => self.confirm(request.key, record).await,
        };
        let Err(err) = acknowledged else {
            return Ok(Begin::Owner(request.token));
        };
        if self.release_unboxed(request.key, request.token).await.is_err() {
            self.release_in_background(request.key.clone(), request.token, request.lock_ttl);
        }
        Err(err)
    }

    /// Keeps trying to release `key` (owned by `token`, never forwarded) for `within`, the
    /// lease's length: its master may be failing over. Released, a retry executes; not, its
    /// retries get outcome-unknown once the lease lapses.
    fn release_in_background(&self, key: StorageKey, token: LeaseToken, within: Duration) {
        let mut connection = self.connection.clone();
        let finish = self.finish.clone();
        let command_timeout = self.command_timeout;
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + within;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(RELEASE_RETRY).await;
                let mut release = finish.key(key.record_key());
                release.arg(&token.0[..]).arg(b"");
                let released = tokio::time::timeout(command_timeout, release.invoke_async::<Value>(&mut connection));
                if let Ok(Ok(_)) = released.await {
                    return;
                }
            }
            tracing::warn!(key = %key.short_hash(), "a key not acknowledged by replicas could not be released: its retries get outcome-unknown");
        });
    }

    /// Re-writes `record` (the key's record as this request wrote it) in a batch, and waits for
    /// its acknowledgement.
    async fn confirm(&self, key: &StorageKey, record: &[u8]) -> Result<(), StoreError> {
        let Some(replication) = &self.replication else {
            return Ok(());
        };
        let mut connection = self.connection.clone();
        let rewrite = eval(TAKEOVER_LUA, key, &[record, record]);
        let batched = replication.write(
            key.record_key().as_bytes(),
            rewrite,
            &mut connection,
            self.command_timeout / 2,
        );
        let Sent::Batched(reply, pending) = self.within(batched).await? else {
            return Err(replication.not_waited_for());
        };
        if as_int(&reply) != Some(1) {
            return Err(unexpected("confirm", &reply));
        }
        replication.acknowledged(pending).await
    }

    /// Runs a script that writes `key`'s record through [`write`](Self::write) (`EVAL`, so
    /// that it runs on any master, loaded or not), or with `EVALSHA` on the store's connection
    /// when acknowledgements are off.
    async fn run_acknowledged(
        &self,
        script: (&Script, &str),
        key: &StorageKey,
        args: &[&[u8]],
        leave_within: Duration,
    ) -> Result<(Value, Written), StoreError> {
        match &self.replication {
            None => Ok((self.run(script.0, key, args).await?, Written::Unacknowledged)),
            Some(_) => self.write(key, &eval(script.1, key, args), leave_within).await,
        }
    }

    /// Waits for a completion's acknowledgement. One that does not come in time is counted and
    /// logged, not an error: the client is answered anyway (docs/behaviour.md §4.4).
    async fn completion_acknowledged(&self, key: &StorageKey, written: Written) {
        let Some(replication) = &self.replication else {
            return;
        };
        let acknowledged = match written {
            Written::Unacknowledged => return,
            Written::Pending(pending) => replication.acknowledged(pending).await,
            Written::Unconfirmed => Err(replication.not_waited_for()),
        };
        if let Err(err) = acknowledged {
            tracing::warn!(key = %key.short_hash(), error = %Chain(&err), "completion not acknowledged by store.min_replicas replicas in time: answered anyway; a failover now could lose it");
        }
    }

    /// Readiness with `store.min_replicas` (single server or Sentinel): the master answers
    /// `ROLE` as a master with at least that many replicas attached.
    async fn replicas_attached(&self, wanted: u32) -> Result<(), StoreError> {
        let role = self.command(&redis::cmd("ROLE")).await?;
        let attached = match &role {
            Value::Array(fields) => match fields.as_slice() {
                [Value::BulkString(kind), _, Value::Array(replicas)] if kind == b"master" => replicas.len(),
                _ => return Err(unexpected("ROLE (a master was expected)", &role)),
            },
            _ => return Err(unexpected("ROLE", &role)),
        };
        if attached < wanted as usize {
            return Err(StoreError::Unavailable(StoreFault::TooFewReplicas { attached, wanted }));
        }
        Ok(())
    }
}

/// `EVALSHA sha1 1 key args…`, its buffers sized once.
fn evalsha(script: &Script, key: &StorageKey, args: &[&[u8]]) -> Cmd {
    let key = key.record_key();
    let hash = script.get_hash();
    let data = 16 + hash.len() + key.len() + args.iter().map(|a| a.len()).sum::<usize>();
    let mut cmd = Cmd::with_capacity(4 + args.len(), data);
    cmd.arg("EVALSHA").arg(hash).arg(1).arg(key);
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

/// `EVAL script 1 key args…`.
fn eval(script: &str, key: &StorageKey, args: &[&[u8]]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(key.record_key());
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// The commands of a request's lease. Each is boxed by [`Store`]'s methods once, so that the
/// redis crate's futures they hold inline (called directly, not through `ConnectionLike`'s
/// boxed calls) do not enlarge the request's own future, moved as it is awaited.
impl RedisStore {
    async fn begin_unboxed(&self, request: &BeginRequest<'_>) -> Result<Begin<LeaseToken>, StoreError> {
        let in_flight = request.in_flight_record().encode();
        let key = request.key.record_key();
        let mut set = Cmd::with_capacity(7, 32 + key.len() + in_flight.len());
        set.arg("SET")
            .arg(key)
            .arg(&in_flight[..])
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(request.key_ttl));
        for _ in 0..TAKEOVER_ATTEMPTS {
            let (reply, written) = self.write(request.key, &set, BEGIN_LEAVES_WITHIN).await?;
            let existing = match reply {
                Value::Nil => return self.owned(request, &in_flight, written).await,
                Value::BulkString(bytes) => Bytes::from(bytes),
                other => return Err(unexpected("SET NX GET", &other)),
            };
            let record = Record::decode(existing.clone())?;
            let lease_left = lease_left_at(&record, request.now_ms);
            let decision = decide(
                Some(Existing { record, lease_left }),
                &request.print,
                request.unknown_outcome,
            );
            let replacement = match decision {
                Decision::TakeOver => in_flight.clone(),
                Decision::MarkUnknown => request.lapsed_record().encode(),
                decision => return Ok(Begin::applied(decision, request.token)),
            };
            // The owner died (its lease lapsed): replace its record, unless it changed meanwhile.
            // A record taken over is acknowledged like a new one before the request is forwarded.
            let args: [&[u8]; 2] = [&existing, &replacement];
            let (reply, written) = match decision {
                Decision::TakeOver => {
                    let script = (&self.takeover, TAKEOVER_LUA);
                    self.run_acknowledged(script, request.key, &args, BEGIN_LEAVES_WITHIN)
                        .await?
                }
                _ => (
                    self.run(&self.takeover, request.key, &args).await?,
                    Written::Unacknowledged,
                ),
            };
            if as_int(&reply) == Some(1) {
                if matches!(decision, Decision::TakeOver) {
                    return self.owned(request, &replacement, written).await;
                }
                return Ok(Begin::applied(decision, request.token));
            }
        }
        // Other proxies keep changing this key's record: it is busy; the client retries later.
        Ok(Begin::InFlight {
            retry_after: CONFLICT_RETRY_AFTER,
        })
    }

    async fn complete_unboxed(&self, key: &StorageKey, token: LeaseToken, record: &Record) -> Result<bool, StoreError> {
        let args: [&[u8]; 2] = [&token.0, &record.encode()];
        // A completion waits for a batch as long as it would wait for its acknowledgement, and
        // leaves half the command timeout to be sent on the store's connection if none takes it.
        let leave_within = self
            .replication
            .as_ref()
            .map_or(Duration::ZERO, |r| r.replica_timeout().min(self.command_timeout / 2));
        let (reply, written) = self
            .run_acknowledged((&self.finish, FINISH_LUA), key, &args, leave_within)
            .await?;
        let completed = as_int(&reply) == Some(1);
        if completed {
            self.completion_acknowledged(key, written).await;
        }
        Ok(completed)
    }

    async fn release_unboxed(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let reply = self.run(&self.finish, key, &[&token.0, b""]).await?;
        Ok(as_int(&reply) == Some(1))
    }

    async fn renew_unboxed(&self, key: &StorageKey, token: LeaseToken, lock_ttl: Duration) -> Result<bool, StoreError> {
        let lease_until = unix_ms().saturating_add(lock_ttl.as_millis() as u64);
        let reply = self
            .run(&self.renew, key, &[&token.0, &lease_until.to_be_bytes()])
            .await?;
        Ok(as_int(&reply) == Some(1))
    }
}

impl Store for RedisStore {
    fn begin(&self, request: &BeginRequest<'_>) -> impl Future<Output = Result<Begin<LeaseToken>, StoreError>> + Send {
        Box::pin(self.begin_unboxed(request))
    }

    fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: &Record,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Box::pin(self.complete_unboxed(key, token, record))
    }

    fn release(&self, key: &StorageKey, token: LeaseToken) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Box::pin(self.release_unboxed(key, token))
    }

    fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Box::pin(self.renew_unboxed(key, token, lock_ttl))
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

    /// Deletes the record and, in the same round trip, wakes the key's waiters in every proxy
    /// (docs/behaviour.md §15.5).
    async fn clear(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline
            .del(key.record_key())
            .cmd("SPUBLISH")
            .arg(channel_of(key))
            .arg("r");
        let (records, _receivers): (i64, i64) = self.query(&pipeline).await?;
        Ok(records > 0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if let Some(replication) = self.replication.as_ref().filter(|_| !self.is_cluster()) {
            return self.replicas_attached(replication.min_replicas()).await;
        }
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

    /// The scripts recognise an InFlight record by its version, state and exact length, find
    /// the token at its offset, and rewrite the lease deadline that ends it.
    #[test]
    fn scripts_know_the_in_flight_record_layout() {
        use crate::idempotency::record::{IN_FLIGHT_LEN, LAST_VERSION, LEASE_OFFSET, TOKEN_OFFSET, VERSION};
        let record = Record::InFlight {
            fingerprint: Fingerprint::bytes([1; 32]),
            owner: LeaseToken([2; 16]),
            started_at_ms: u64::MAX,
            lease_until_ms: u64::MAX,
        };
        assert_eq!(record.encode().len(), IN_FLIGHT_LEN);
        for script in [FINISH_LUA, RENEW_LUA] {
            assert!(script.contains(&format!("#rec ~= {IN_FLIGHT_LEN}")));
            assert!(script.contains(&format!("string.byte(rec, 1) < {VERSION}")));
            assert!(script.contains(&format!("string.byte(rec, 1) > {LAST_VERSION}")));
            // Lua strings are 1-based and `sub` is inclusive.
            assert!(script.contains(&format!("string.sub(rec, {}, {})", TOKEN_OFFSET + 1, TOKEN_OFFSET + 16)));
        }
        assert!(RENEW_LUA.contains(&format!("string.sub(rec, 1, {LEASE_OFFSET})")));
    }

    /// The completion script publishes on the channel waiters subscribe to.
    #[test]
    fn the_finish_script_publishes_on_the_keys_channel() {
        use super::super::subscriber::CHANNEL_SUFFIX;
        let publish = format!("redis.call('SPUBLISH', KEYS[1] .. '{CHANNEL_SUFFIX}'");
        assert_eq!(FINISH_LUA.matches(&publish).count(), 2, "on completion and on release");
    }
}
