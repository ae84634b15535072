//! The Redis store's connection, one of three kinds made from its URL (docs/behaviour.md §4.4),
//! and, when `store.min_replicas` asks for acknowledged writes, their [`Replication`] to the
//! same masters:
//!
//! - a single server (`redis://`, `rediss://`, `unix://`): a `ConnectionManager`, which
//!   reconnects on its own;
//! - Redis Cluster (`redis+cluster://`): a cluster connection made on first use, which follows
//!   the cluster's topology on its own;
//! - a Sentinel-monitored master (`redis+sentinel://`): the master the sentinels name, asked
//!   again after a failure that says it is gone or demoted ([`SentinelMaster`]).
//!
//! Every kind connects on first use, so the proxy starts (and serves pass-through traffic) while
//! Redis is down; only a malformed URL fails here.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, TlsCertificates, Value};
use tokio::sync::OnceCell;

use super::cluster_slots::ClusterNodes;
use super::group_commit::{Connector, Timeouts};
use super::replication::Replication;
use super::sentinel::SentinelMaster;
use crate::config::redis_url::SentinelUrl;
use crate::config::Secret;
use crate::telemetry::ReplicaAcks;

/// See the module documentation.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
    Sentinel(Arc<SentinelMaster>),
}

/// What a connection is made with besides its URL.
pub(super) struct Setup<'a> {
    pub command_timeout: Duration,
    pub certificates: Option<TlsCertificates>,
    pub sentinel_password: Option<&'a Secret>,
    pub min_replicas: u32,
    pub replica_timeout: Duration,
    pub replica_acks: ReplicaAcks,
}

impl Setup<'_> {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            command: self.command_timeout,
            replica: self.replica_timeout,
        }
    }

    /// The acknowledged writes to one master, if `min_replicas` asks for them.
    fn replication(self, connector: impl FnOnce() -> Connector) -> Option<Replication> {
        (self.min_replicas > 0).then(|| {
            let timeouts = self.timeouts();
            Replication::master(connector(), self.min_replicas, timeouts, self.replica_acks)
        })
    }
}

impl Connection {
    /// The connection `url` names, and its replication.
    pub fn open(url: &str, setup: Setup<'_>) -> Result<(Self, Option<Replication>), RedisError> {
        if let Some(parsed) = SentinelUrl::parse(url) {
            let parsed = parsed.map_err(|why| RedisError::from((redis::ErrorKind::InvalidClientConfig, "URL", why)))?;
            let sentinel = Arc::new(SentinelMaster::new(
                &parsed,
                setup.sentinel_password,
                setup.certificates.clone(),
                setup.command_timeout,
            )?);
            let replication = setup.replication(|| Connector::Sentinel(sentinel.clone()));
            return Ok((Connection::Sentinel(sentinel), replication));
        }
        if let Some((scheme, nodes)) = cluster_nodes(url) {
            return Self::cluster(scheme, nodes, setup);
        }
        let client = match setup.certificates.clone() {
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
            None => redis::Client::open(url),
        }?;
        // No response timeout of the client's own: every command is bounded by
        // `command_timeout` by the store (one timer per command, not two).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(setup.command_timeout))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let replication = setup.replication(|| Connector::Node(client));
        Ok((Connection::Single(manager), replication))
    }

    fn cluster(scheme: &str, nodes: &str, setup: Setup<'_>) -> Result<(Self, Option<Replication>), RedisError> {
        let template = nodes
            .split(',')
            .next()
            .map(|n| format!("{scheme}://{n}"))
            .unwrap_or_default()
            .into_connection_info()?;
        let builder = cluster_builder(scheme, nodes, setup.certificates.clone(), setup.command_timeout);
        let lazy = LazyCluster {
            client: builder.build()?,
            connection: OnceCell::new(),
        };
        let replication = (setup.min_replicas > 0).then(|| {
            let timeouts = setup.timeouts();
            let nodes = ClusterNodes::new(template, setup.certificates, setup.min_replicas, timeouts);
            Replication::cluster(nodes, setup.min_replicas, timeouts, setup.replica_acks)
        });
        Ok((Connection::Cluster(Arc::new(lazy)), replication))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self, Connection::Sentinel(_))
    }

    /// Sends one command and reads its reply, a server error reply as `Err`. On a single server
    /// this calls the `ConnectionManager` itself rather than through `ConnectionLike`, whose
    /// every call boxes its future; the other kinds go through [`ConnectionLike`] (a Sentinel
    /// store sees the outcome there).
    pub async fn send(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let reply = match self {
            Connection::Single(manager) => manager.clone().send_packed_command(cmd).await,
            other => other.clone().req_packed_command(cmd).await,
        };
        reply?.extract_error()
    }

    /// Forgets the Sentinel master in use, after one of its commands got no answer in time (a
    /// node that vanished without closing its connections looks like this).
    pub fn timed_out(&self) {
        if let Connection::Sentinel(sentinel) = self {
            if let Some(generation) = sentinel.generation() {
                sentinel.forget(generation, &"a command got no answer in time");
            }
        }
    }
}

/// A cluster client builder for `nodes` (`a:1,b:2`) reached with `scheme`, each command and
/// connection bounded by `timeout`.
pub(super) fn cluster_builder(
    scheme: &str,
    nodes: &str,
    certificates: Option<TlsCertificates>,
    timeout: Duration,
) -> redis::cluster::ClusterClientBuilder {
    let nodes: Vec<String> = nodes.split(',').map(|n| format!("{scheme}://{n}")).collect();
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(timeout)
        .response_timeout(timeout);
    if let Some(certificates) = certificates {
        builder = builder.certs(certificates);
    }
    builder
}

/// `redis+cluster://a:1,b:2` → `("redis", "a:1,b:2")`.
pub(super) fn cluster_nodes(url: &str) -> Option<(&'static str, &str)> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        return Some(("redis", rest));
    }
    url.strip_prefix("rediss+cluster://").map(|rest| ("rediss", rest))
}

/// A cluster connection made on first use, like the single server's `ConnectionManager`: the
/// proxy starts (and serves pass-through traffic) while the cluster is unreachable, and
/// guarded requests count as a store failure until it answers. Once made, redis-rs follows the
/// cluster's topology and reconnects to its nodes on its own.
pub(super) struct LazyCluster {
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

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(lazy) => Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await }),
            Connection::Sentinel(sentinel) => Box::pin(async move {
                let master = sentinel.master().await?;
                let reply = master.connection.clone().req_packed_command(cmd).await;
                observe(sentinel, master.generation, reply.as_ref().map(std::slice::from_ref));
                reply
            }),
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
            Connection::Sentinel(sentinel) => Box::pin(async move {
                let master = sentinel.master().await?;
                let replies = master.connection.clone().req_packed_commands(cmd, offset, count).await;
                observe(sentinel, master.generation, replies.as_ref().map(Vec::as_slice));
                replies
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            // Redis Cluster has database 0 only.
            Connection::Cluster(_) => 0,
            Connection::Sentinel(sentinel) => sentinel.db(),
        }
    }
}

/// Lets `sentinel` see the outcome of a command on master `generation`: a failed connection, or
/// a reply that says the node is no longer a writable master (`READONLY`, `MASTERDOWN`).
fn observe(sentinel: &SentinelMaster, generation: u64, outcome: Result<&[Value], &RedisError>) {
    match outcome {
        Err(err) => sentinel.observe(generation, err),
        Ok(values) => {
            for value in values {
                if let Value::ServerError(err) = value {
                    sentinel.observe(generation, &RedisError::from(err.clone()));
                }
            }
        }
    }
}
