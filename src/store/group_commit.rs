//! Writes acknowledged by replicas, group-committed: one Redis `WAIT` for every write waiting at
//! that moment on one master node (docs/behaviour.md §4.4).
//!
//! `WAIT n timeout` counts only the writes sent on its own connection, and blocks that
//! connection until it answers. So the writes to acknowledge never share the connection that
//! serves the store's other commands: a [`NodeQueue`] has connections of its own, and a batching
//! task that takes every write queued at that moment, sends them as one pipeline on an idle
//! connection with the `WAIT` pipelined right behind (one round trip as a request sees it),
//! hands each write its reply as soon as the pipeline answers (a `SET … NX GET` that found its
//! key and wrote nothing, a replay, does not wait for the `WAIT`), and the `WAIT`'s count when it
//! comes. A connection carries one batch at a time: nothing is ever queued behind a blocked
//! `WAIT`. Up to [`CONNECTIONS_PER_NODE`] batches are in flight at once; while all are, writes
//! queue for the next batch, which is what makes batches grow under load. A write that has not
//! left in a batch within the bound its caller gives (replicas that stopped acknowledging keep
//! every connection blocked on its `WAIT` until the replica timeout) is withdrawn, atomically
//! with respect to the batching task, and the caller sends it elsewhere.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::sentinel::{master_is_gone, timed_out, SentinelMaster};

/// Batches in flight at once on one node (each on its own connection).
pub(super) const CONNECTIONS_PER_NODE: usize = 4;

/// Most writes in one batch.
const MAX_BATCH: usize = 512;

/// A queued write's claim: taken by the batching task ([`DISPATCHED`]) or by its caller
/// ([`WITHDRAWN`]), whichever comes first.
const QUEUED: u8 = 0;
const DISPATCHED: u8 = 1;
const WITHDRAWN: u8 = 2;

/// Where a node's connections for acknowledged writes go.
pub(super) enum Connector {
    /// A fixed node: a single server, or one master of a Redis Cluster.
    Node(redis::Client),
    /// Whichever master the sentinels name now.
    Sentinel(Arc<SentinelMaster>),
    /// One master of a Redis Cluster: an error that says the slot map is out of date sets
    /// `stale`.
    ClusterNode {
        client: redis::Client,
        stale: Arc<AtomicBool>,
    },
}

impl Connector {
    /// A new connection, with the generation of the master it reaches.
    async fn connect(&self, config: &AsyncConnectionConfig) -> Result<(u64, MultiplexedConnection), RedisError> {
        match self {
            Connector::Node(client) | Connector::ClusterNode { client, .. } => {
                Ok((0, client.get_multiplexed_async_connection_with_config(config).await?))
            }
            Connector::Sentinel(sentinel) => {
                let master = sentinel.master().await?;
                let connection = master.client.get_multiplexed_async_connection_with_config(config).await;
                if let Err(err) = &connection {
                    sentinel.observe(master.generation, err);
                }
                Ok((master.generation, connection?))
            }
        }
    }

    /// Whether a connection to master `generation` still reaches the master in use.
    fn is_current(&self, generation: u64) -> bool {
        match self {
            Connector::Node(_) | Connector::ClusterNode { .. } => true,
            Connector::Sentinel(sentinel) => sentinel.generation() == Some(generation),
        }
    }

    fn failed(&self, generation: u64, err: &RedisError) {
        match self {
            Connector::Node(_) => {}
            Connector::Sentinel(sentinel) => sentinel.observe(generation, err),
            Connector::ClusterNode { stale, .. } => {
                if slot_map_is_stale(err) {
                    stale.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// Whether `err`, from a write to a cluster node, says the slot map is out of date (the slot
/// moved, the node failed or was demoted).
fn slot_map_is_stale(err: &RedisError) -> bool {
    master_is_gone(err)
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
            )
        )
}

/// Bounds of one batch: its writes answer within `command`, its `WAIT` within `replica`
/// (its own timeout, on the server) plus `command`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub command: Duration,
    pub replica: Duration,
}

/// The acknowledgement of one write: the count of replicas its batch's `WAIT` answered.
pub(super) struct PendingAck {
    ack: oneshot::Receiver<Result<i64, RedisError>>,
    queued_at: Instant,
}

impl PendingAck {
    /// How many replicas acknowledged the write (within the replica timeout), or why that is
    /// not known.
    pub async fn replicas(self) -> Result<i64, RedisError> {
        self.ack
            .await
            .unwrap_or_else(|_| Err(timed_out("the batch was dropped")))
    }

    /// When the write was queued: the start of its wait.
    pub fn queued_at(&self) -> Instant {
        self.queued_at
    }
}

/// One write waiting for its batch.
struct Job {
    write: Cmd,
    claim: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Value, RedisError>>,
    ack: oneshot::Sender<Result<i64, RedisError>>,
}

/// How a write went.
pub(super) enum Sent {
    /// In a batch: its reply, and its acknowledgement to come.
    Batched(Value, PendingAck),
    /// Not sent: no batch took it in time.
    Withdrawn,
}

/// The acknowledged writes of one master node. See the module documentation.
pub(super) struct NodeQueue {
    jobs: mpsc::UnboundedSender<Job>,
}

impl NodeQueue {
    /// Starts the node's batching task (it ends when the queue is dropped). Each batch's `WAIT`
    /// asks for `min_replicas`.
    pub fn start(connector: Connector, min_replicas: u32, timeouts: Timeouts) -> Self {
        let (jobs, queued) = mpsc::unbounded_channel();
        let batches = Arc::new(Semaphore::new(CONNECTIONS_PER_NODE));
        let mut wait = redis::cmd("WAIT");
        wait.arg(min_replicas).arg(timeouts.replica.as_millis().max(1) as u64);
        let node = Arc::new(Node {
            connector,
            idle: Mutex::new(Vec::new()),
            timeouts,
            wait,
        });
        tokio::spawn(batch_loop(queued, batches, node));
        Self { jobs }
    }

    /// Sends `write` in the next batch: its reply, and its pending acknowledgement; or
    /// [`Sent::Withdrawn`] if it has not been answered within `leave_within` and no batch took
    /// it. The caller bounds the whole wait; a write whose caller gave up is not sent either.
    pub async fn write(&self, write: Cmd, leave_within: Duration) -> Result<Sent, RedisError> {
        let (reply, mut replied) = oneshot::channel();
        let (ack, acked) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(QUEUED));
        let queued_at = Instant::now();
        let job = Job {
            write,
            claim: claim.clone(),
            reply,
            ack,
        };
        self.jobs
            .send(job)
            .map_err(|_| timed_out("the batching task has stopped"))?;
        let answer = match tokio::time::timeout(leave_within, &mut replied).await {
            Ok(answer) => answer,
            Err(_) => {
                if claim
                    .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(Sent::Withdrawn);
                }
                // A batch took it: its answer is on the way.
                replied.await
            }
        };
        let value = answer.unwrap_or_else(|_| Err(timed_out("the batch was dropped")))?;
        Ok(Sent::Batched(value, PendingAck { ack: acked, queued_at }))
    }
}

/// An idle connection, with the generation of the master it reaches.
struct Idle {
    generation: u64,
    connection: MultiplexedConnection,
}

/// What the batches of one node share.
struct Node {
    connector: Connector,
    idle: Mutex<Vec<Idle>>,
    timeouts: Timeouts,
    wait: Cmd,
}

/// Takes every write queued when a batch can leave, and sends them as one batch.
async fn batch_loop(mut queued: mpsc::UnboundedReceiver<Job>, batches: Arc<Semaphore>, node: Arc<Node>) {
    while let Some(first) = queued.recv().await {
        let Ok(permit) = batches.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A write its caller withdrew, or gave up on (its command timed out), is not sent.
        batch.retain(|job| {
            !job.reply.is_closed()
                && job
                    .claim
                    .compare_exchange(QUEUED, DISPATCHED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        });
        if !batch.is_empty() {
            tokio::spawn(node.clone().send(batch, permit));
        }
    }
}

impl Node {
    /// An idle connection to the master in use, or a new one.
    async fn connection(&self) -> Result<Idle, RedisError> {
        loop {
            let idle = lock(&self.idle).pop();
            match idle {
                Some(idle) if self.connector.is_current(idle.generation) => return Ok(idle),
                Some(_stale) => continue,
                None => break,
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.command))
            .set_response_timeout(None);
        let (generation, connection) = tokio::time::timeout(self.timeouts.command, self.connector.connect(&config))
            .await
            .map_err(|_| timed_out("no connection for acknowledged writes in time"))??;
        Ok(Idle { generation, connection })
    }

    /// Sends one batch: its writes as one pipeline, their `WAIT` right behind on the same
    /// connection; each write's reply as soon as the pipeline answers, the count when `WAIT` does.
    async fn send(self: Arc<Self>, batch: Vec<Job>, _permit: OwnedSemaphorePermit) {
        let idle = match self.connection().await {
            Ok(idle) => idle,
            Err(err) => {
                fail_all(batch.into_iter().map(|job| job.reply).collect(), &err);
                return;
            }
        };
        let mut pipeline = redis::pipe();
        let mut replies = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for job in batch {
            pipeline.add_command(job.write);
            replies.push(job.reply);
            acks.push(job.ack);
        }
        let (mut writer, mut waiter) = (idle.connection.clone(), idle.connection.clone());
        let count = replies.len();
        let writes = async {
            let written = tokio::time::timeout(self.timeouts.command, writer.req_packed_commands(&pipeline, 0, count))
                .await
                .unwrap_or_else(|_| Err(timed_out("no answer to the writes in time")));
            self.deliver(written, replies, idle.generation)
        };
        let wait = tokio::time::timeout(
            self.timeouts.replica + self.timeouts.command,
            waiter.req_packed_command(&self.wait),
        );
        // `biased`: the writes are queued on the connection before their `WAIT`.
        let (writes_ok, waited) = tokio::join!(biased; writes, wait);
        let replicas = match waited {
            Ok(Ok(value)) => value.extract_error().and_then(|v| match v {
                Value::Int(n) => Ok(n),
                other => Err(RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "WAIT answered",
                    format!("{other:?}"),
                ))),
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(timed_out("no answer to WAIT in time")),
        };
        if let Err(err) = &replicas {
            self.connector.failed(idle.generation, err);
        } else if writes_ok && self.connector.is_current(idle.generation) {
            lock(&self.idle).push(idle);
        }
        for ack in acks {
            let _ = ack.send(replicas.clone());
        }
    }

    /// Hands each write its reply; `false` if the connection is not to be used again.
    fn deliver(
        &self,
        written: Result<Vec<Value>, RedisError>,
        replies: Vec<oneshot::Sender<Result<Value, RedisError>>>,
        generation: u64,
    ) -> bool {
        let values = match written {
            Ok(values) if values.len() == replies.len() => values,
            Ok(values) => {
                let detail = format!("{} replies for {} writes", values.len(), replies.len());
                let err = RedisError::from((ErrorKind::UnexpectedReturnType, "pipeline", detail));
                fail_all(replies, &err);
                return false;
            }
            Err(err) => {
                self.connector.failed(generation, &err);
                fail_all(replies, &err);
                return false;
            }
        };
        let mut reusable = true;
        for (reply, value) in replies.into_iter().zip(values) {
            let value = value.extract_error();
            if let Err(err) = &value {
                if master_is_gone(err) {
                    self.connector.failed(generation, err);
                    reusable = false;
                }
            }
            let _ = reply.send(value);
        }
        reusable
    }
}

/// Hands every write of a batch the same error.
fn fail_all(replies: Vec<oneshot::Sender<Result<Value, RedisError>>>, err: &RedisError) {
    for reply in replies {
        let _ = reply.send(Err(err.clone()));
    }
}

/// A poisoned lock still holds a usable list of connections.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    //! The batching against a fake Redis that logs which connection carried which command, in
    //! order, and answers `WAIT` only after a delay, holding back that connection's later
    //! replies as a blocked Redis client would.

    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    type Log = Arc<Mutex<Vec<(usize, String)>>>;

    /// Serves on a loopback port: `WAIT` answers `:1` after `wait_delay`; `SET` a nil; anything
    /// else `+OK`. Logs `(connection, "COMMAND first-arg")`.
    async fn fake_redis(wait_delay: Duration) -> (SocketAddr, Log) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log: Log = Arc::default();
        let served = log.clone();
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, connection, served.clone(), wait_delay));
            }
        });
        (addr, log)
    }

    async fn serve(mut stream: tokio::net::TcpStream, connection: usize, log: Log, wait_delay: Duration) {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some((command, used)) = parse(&buffer) {
                buffer.drain(..used);
                let name = String::from_utf8_lossy(&command[0]).to_ascii_uppercase();
                let first = command.get(1).map(|a| String::from_utf8_lossy(a).into_owned());
                log.lock()
                    .expect("log")
                    .push((connection, format!("{name} {}", first.unwrap_or_default())));
                let reply: &[u8] = match name.as_str() {
                    "WAIT" => {
                        tokio::time::sleep(wait_delay).await;
                        b":1\r\n"
                    }
                    "SET" => b"$-1\r\n",
                    _ => b"+OK\r\n",
                };
                if stream.write_all(reply).await.is_err() {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One RESP array of bulk strings from the front of `buffer`, and its length.
    fn parse(buffer: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
        fn line(buffer: &[u8], at: usize) -> Option<(usize, usize)> {
            let end = at + buffer.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
            let number = std::str::from_utf8(&buffer[at + 1..end]).ok()?.parse().ok()?;
            Some((number, end + 2))
        }
        let (count, mut at) = line(buffer, 0)?;
        let mut args = Vec::with_capacity(count);
        for _ in 0..count {
            let (len, start) = line(buffer, at)?;
            args.push(buffer.get(start..start + len)?.to_vec());
            at = start + len + 2;
        }
        (buffer.len() >= at).then_some((args, at))
    }

    fn queue(addr: SocketAddr, replica: Duration) -> NodeQueue {
        let client = redis::Client::open(format!("redis://{addr}")).expect("client");
        let timeouts = Timeouts {
            command: Duration::from_secs(2),
            replica,
        };
        NodeQueue::start(Connector::Node(client), 1, timeouts)
    }

    fn set(key: &str) -> Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg("v").arg("NX").arg("GET");
        cmd
    }

    fn commands(log: &Log) -> Vec<(usize, String)> {
        log.lock()
            .expect("log")
            .iter()
            .filter(|(_, c)| c.starts_with("SET") || c.starts_with("WAIT"))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn writes_queued_together_share_one_wait_right_behind_them() {
        let (addr, log) = fake_redis(Duration::ZERO).await;
        let queue = queue(addr, Duration::from_secs(1));
        let writes = (0..10).map(|i| queue.write(set(&format!("k{i}")), Duration::from_secs(1)));
        for sent in futures::future::join_all(writes).await {
            let Ok(Sent::Batched(Value::Nil, pending)) = sent else {
                panic!("a batched write");
            };
            assert_eq!(pending.replicas().await.expect("WAIT answered"), 1);
        }
        let sent = commands(&log);
        let connection = sent[0].0;
        let expected: Vec<String> = (0..10)
            .map(|i| format!("SET k{i}"))
            .chain(["WAIT 1".to_owned()])
            .collect();
        assert_eq!(sent.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(), expected);
        assert!(sent.iter().all(|(c, _)| *c == connection), "one connection: {sent:?}");
    }

    #[tokio::test]
    async fn a_reply_does_not_wait_for_the_wait_nor_a_batch_for_a_blocked_connection() {
        let (addr, log) = fake_redis(Duration::from_millis(400)).await;
        let queue = queue(addr, Duration::from_secs(1));
        let started = Instant::now();
        let Ok(Sent::Batched(_, first)) = queue.write(set("a"), Duration::from_secs(1)).await else {
            panic!("a batched write");
        };
        let Ok(Sent::Batched(_, second)) = queue.write(set("b"), Duration::from_secs(1)).await else {
            panic!("a batched write");
        };
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(first.replicas().await.expect("answered"), 1);
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(second.replicas().await.expect("answered"), 1);
        let sent = commands(&log);
        let on = |command: &str| sent.iter().find(|(_, c)| c == command).map(|(c, _)| *c);
        assert_ne!(
            on("SET a"),
            on("SET b"),
            "the second batch took another connection: {sent:?}"
        );
    }

    #[tokio::test]
    async fn a_write_no_batch_takes_in_time_is_withdrawn_and_never_sent() {
        let (addr, log) = fake_redis(Duration::from_millis(300)).await;
        let queue = queue(addr, Duration::from_secs(1));
        let mut pending = Vec::new();
        for i in 0..CONNECTIONS_PER_NODE {
            let Ok(Sent::Batched(_, ack)) = queue.write(set(&format!("busy{i}")), Duration::from_secs(1)).await else {
                panic!("a batched write");
            };
            pending.push(ack);
        }
        let started = Instant::now();
        let withdrawn = queue.write(set("late"), Duration::from_millis(50)).await;
        assert!(matches!(withdrawn, Ok(Sent::Withdrawn)));
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        for ack in pending {
            ack.replicas().await.expect("answered");
        }
        let after = queue.write(set("after"), Duration::from_secs(1)).await;
        assert!(matches!(after, Ok(Sent::Batched(..))));
        let sent = commands(&log);
        assert!(!sent.iter().any(|(_, c)| c == "SET late"), "{sent:?}");
        assert!(sent.iter().any(|(_, c)| c == "SET after"), "{sent:?}");
    }
}
