//! What a Redis write must reach before it counts: `store.min_replicas` replicas, acknowledged
//! with `WAIT` (docs/behaviour.md §4.4), in every Redis mode.
//!
//! The writes that need it (a key's `InFlight` record, which must be acknowledged before its
//! request is forwarded, and its completion) go through the [`NodeQueue`] of the master they
//! are written on, group-committed under one `WAIT` per batch; on Redis Cluster, the queue of the
//! master holding the key's slot. Everything else keeps the store's own connection.

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError};

use super::cluster_slots::ClusterNodes;
use super::group_commit::{Connector, NodeQueue, PendingAck, Sent, Timeouts};
use super::{StoreError, StoreFault};
use crate::telemetry::ReplicaAcks;

/// Where acknowledged writes go.
enum Route {
    /// The one master (a single server, or the master a Sentinel group names).
    Master(NodeQueue),
    /// The master holding each key's slot.
    Cluster(Box<ClusterNodes>),
}

/// See the module documentation.
pub(super) struct Replication {
    min_replicas: u32,
    replica_timeout: Duration,
    metrics: ReplicaAcks,
    route: Route,
}

impl Replication {
    /// Acknowledged writes to one master, reached through `connector`.
    pub fn master(connector: Connector, min_replicas: u32, timeouts: Timeouts, metrics: ReplicaAcks) -> Self {
        Self {
            min_replicas,
            replica_timeout: timeouts.replica,
            metrics,
            route: Route::Master(NodeQueue::start(connector, min_replicas, timeouts)),
        }
    }

    /// Acknowledged writes to the masters of a cluster.
    pub fn cluster(nodes: ClusterNodes, min_replicas: u32, timeouts: Timeouts, metrics: ReplicaAcks) -> Self {
        Self {
            min_replicas,
            replica_timeout: timeouts.replica,
            metrics,
            route: Route::Cluster(Box::new(nodes)),
        }
    }

    pub fn min_replicas(&self) -> u32 {
        self.min_replicas
    }

    pub fn replica_timeout(&self) -> Duration {
        self.replica_timeout
    }

    /// Counts a write that was not waited for (sent while its master's batches were stuck), and
    /// says why it is not acknowledged.
    pub fn not_waited_for(&self) -> StoreError {
        self.metrics.not_waited_for();
        StoreError::Unavailable(StoreFault::Unreplicated {
            acknowledged: 0,
            wanted: self.min_replicas,
        })
    }

    /// Sends `write`, a command on `key`, in its master's next batch: its reply at once and
    /// its pending acknowledgement, or [`Sent::Withdrawn`] if no batch took it within
    /// `leave_within`. `cluster`: the store's cluster connection, to read the slot map with
    /// (unused otherwise).
    pub async fn write<C: ConnectionLike + Send>(
        &self,
        key: &[u8],
        write: Cmd,
        cluster: &mut C,
        leave_within: Duration,
    ) -> Result<Sent, RedisError> {
        match &self.route {
            Route::Master(queue) => queue.write(write, leave_within).await,
            Route::Cluster(nodes) => nodes.queue_for(key, cluster).await?.write(write, leave_within).await,
        }
    }

    /// Waits for `pending`: `Ok` once `min_replicas` replicas acknowledged the write, else why
    /// not (too few within the replica timeout, or no answer). Counted either way.
    pub async fn acknowledged(&self, pending: PendingAck) -> Result<(), StoreError> {
        let queued_at: Instant = pending.queued_at();
        let replicas = pending.replicas().await;
        let acknowledged = matches!(replicas, Ok(n) if n >= i64::from(self.min_replicas));
        self.metrics.observe(queued_at.elapsed(), acknowledged);
        match replicas {
            Ok(_) if acknowledged => Ok(()),
            Ok(n) => Err(StoreError::Unavailable(StoreFault::Unreplicated {
                acknowledged: n,
                wanted: self.min_replicas,
            })),
            Err(err) => Err(StoreError::unreachable(err)),
        }
    }
}
