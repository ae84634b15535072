//! The Redis store's subscription to the channels of keys waited for (docs/behaviour.md §15):
//! Redis sharded pub/sub. An owner's completion or release script publishes on its key's own
//! channel (`SPUBLISH <record key>:settled`, whose hash tag puts it on the key's slot) in the
//! same step; a proxy with requests waiting for that key has subscribed to it (`SSUBSCRIBE`)
//! and wakes them through its [`Waiters`].
//!
//! One subscription connection per proxy multiplexes every key waited for (per node on a
//! cluster: the redis crate's cluster connection sends each `SSUBSCRIBE` to the master of its
//! slot and subscribes again after a reconnection or a slot move). With Sentinel it is a
//! connection to the master in use, made again when the store follows a new one. Channels are
//! counted: subscribed for the first waiter of a key, unsubscribed after its last. A lost
//! connection wakes every waiter ([`Waiters::lost`]): a message may have been missed, so each
//! looks at its key once more after the subscription is made again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection, SendError};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisError, Value};

use super::redis_connection::{cluster_builder, cluster_nodes, Connection};
use super::sentinel::SentinelMaster;
use super::waiters::Waiters;
use super::StoreError;
use crate::idempotency::StorageKey;
use crate::telemetry::WaitMetrics;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, RedisError>> + Send + 'a>>;

/// What a key's channel is named after: its record key, then this (Lua: `KEYS[1] .. SUFFIX`).
pub(super) const CHANNEL_SUFFIX: &str = ":settled";

/// Where the subscription connection goes.
enum Source {
    /// One server, with the store's connection settings but RESP3 (pushes).
    Node(Box<redis::Client>),
    /// The master the store's sentinels name now.
    Sentinel(Arc<SentinelMaster>),
    /// A cluster client (RESP3, pushes to this subscriber).
    Cluster(Box<ClusterClient>),
}

/// The subscription connection in use.
enum Link {
    Node {
        connection: MultiplexedConnection,
        /// Cleared when the connection ends (its `Disconnection` push).
        alive: Arc<AtomicBool>,
        /// With Sentinel, the master generation it goes to.
        generation: u64,
    },
    Cluster(ClusterConnection),
}

impl Link {
    fn is_usable(&self, generation: Option<u64>) -> bool {
        match self {
            Link::Node {
                alive, generation: g, ..
            } => alive.load(Ordering::Acquire) && generation.is_none_or(|now| now == *g),
            Link::Cluster(_) => true,
        }
    }

    async fn send(&mut self, command: &'static str, channel: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd(command);
        cmd.arg(channel);
        let reply = match self {
            Link::Node { connection, .. } => connection.req_packed_command(&cmd).await?,
            Link::Cluster(connection) if command == "SSUBSCRIBE" => return connection.ssubscribe(channel).await,
            Link::Cluster(connection) => return connection.sunsubscribe(channel).await,
        };
        reply.extract_error().map(drop)
    }
}

/// The subscription connection and the channels subscribed, with how many waiters each.
#[derive(Default)]
struct Links {
    link: Option<Link>,
    channels: HashMap<String, usize>,
}

struct Inner {
    source: Source,
    waiters: Arc<Waiters>,
    metrics: WaitMetrics,
    links: tokio::sync::Mutex<Links>,
    timeout: Duration,
}

/// See the module documentation.
pub(super) struct Subscriber {
    inner: Arc<Inner>,
}

/// Receives a subscription connection's pushes: a message wakes its key's waiters, the end of
/// the connection wakes every waiter.
struct Pushes {
    waiters: Arc<Waiters>,
    metrics: WaitMetrics,
    /// The node connection's liveness (none for a cluster connection, which reconnects itself).
    alive: Option<Arc<AtomicBool>>,
}

impl AsyncPushSender for Pushes {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::SMessage | PushKind::Message => {
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    if let Some(digest) = digest_of(channel) {
                        self.waiters.settled(&digest);
                    }
                }
            }
            PushKind::Disconnection => {
                if let Some(alive) = &self.alive {
                    alive.store(false, Ordering::Release);
                }
                self.metrics.subscription_lost();
                tracing::debug!("the Redis subscription connection was lost: waiters look again");
                self.waiters.lost();
            }
            _ => {}
        }
        Ok(())
    }
}

/// The channel of `key`: its record key (`prefix{hex}`) and [`CHANNEL_SUFFIX`].
pub(super) fn channel_of(key: &StorageKey) -> String {
    let record = key.record_key();
    let mut channel = String::with_capacity(record.len() + CHANNEL_SUFFIX.len());
    channel.push_str(record);
    channel.push_str(CHANNEL_SUFFIX);
    channel
}

/// The key digest a channel name carries (`…{64 hex digits}:settled`).
fn digest_of(channel: &[u8]) -> Option<[u8; 32]> {
    let tagged = channel.strip_suffix(CHANNEL_SUFFIX.as_bytes())?;
    let hex = tagged.strip_suffix(b"}")?;
    let hex = hex.get(hex.len().checked_sub(64)?..)?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex, &mut digest).ok()?;
    Some(digest)
}

impl Subscriber {
    /// The subscriber of a store connected as `connection` (made from `url` with
    /// `certificates`), waking `waiters`. Nothing connects before the first waiter.
    pub fn new(
        url: &str,
        connection: &Connection,
        certificates: Option<redis::TlsCertificates>,
        timeout: Duration,
        waiters: Arc<Waiters>,
        metrics: WaitMetrics,
    ) -> Result<Self, RedisError> {
        let source = match connection {
            Connection::Sentinel(sentinel) => Source::Sentinel(sentinel.clone()),
            Connection::Cluster(_) => {
                let pushes = Pushes {
                    waiters: waiters.clone(),
                    metrics: metrics.clone(),
                    alive: None,
                };
                let (scheme, nodes) = cluster_nodes(url).ok_or_else(no_link)?;
                let builder = cluster_builder(scheme, nodes, certificates, timeout)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes);
                Source::Cluster(Box::new(builder.build()?))
            }
            Connection::Single(_) => {
                let client = match certificates {
                    Some(certificates) => redis::Client::build_with_tls(url, certificates)?,
                    None => redis::Client::open(url)?,
                };
                Source::Node(Box::new(resp3(&client)?))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                waiters,
                metrics,
                links: tokio::sync::Mutex::new(Links::default()),
                timeout,
            }),
        })
    }

    /// Subscribes to `key`'s channel (at once if another waiter of this proxy has), confirmed
    /// by the server when this returns: from now on a settlement of `key` wakes its waiters.
    pub async fn subscribe(&self, key: &StorageKey) -> Result<Subscription, StoreError> {
        let channel = channel_of(key);
        let inner = &self.inner;
        // Boxed (waiters only): the type of a future that may connect is too deep to nest
        // in every request's.
        let add: BoxFuture<'_, _> = Box::pin(inner.add(&channel));
        inner.bounded(add).await?;
        Ok(Subscription {
            inner: self.inner.clone(),
            channel,
        })
    }
}

/// A waiter's share of its key's channel: the channel is unsubscribed after the last one goes.
pub struct Subscription {
    inner: Arc<Inner>,
    channel: String,
}

impl Subscription {
    /// After a lost connection: makes the subscription again (every channel, on a new
    /// connection), so that the waiter's next look is covered.
    pub async fn renew(&self) -> Result<(), StoreError> {
        let renew: BoxFuture<'_, _> = Box::pin(self.inner.renew(&self.channel));
        self.inner.bounded(renew).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let channel = std::mem::take(&mut self.channel);
        runtime.spawn(async move {
            let _ = tokio::time::timeout(inner.timeout, inner.remove(&channel)).await;
        });
    }
}

impl Inner {
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(done) => done.map_err(StoreError::unreachable),
            Err(_) => Err(StoreError::timeout(self.timeout)),
        }
    }

    async fn add(&self, channel: &str) -> Result<(), RedisError> {
        let mut links = self.links.lock().await;
        let first = !links.channels.contains_key(channel);
        let link = self.link(&mut links).await?;
        if first {
            link.send("SSUBSCRIBE", channel).await?;
        }
        *links.channels.entry(channel.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    async fn renew(&self, channel: &str) -> Result<(), RedisError> {
        let mut links = self.links.lock().await;
        let link = self.link(&mut links).await?;
        if let Link::Cluster(_) = link {
            // The cluster connection subscribes again by itself; make sure of this one.
            link.send("SSUBSCRIBE", channel).await?;
        }
        Ok(())
    }

    async fn remove(&self, channel: &str) {
        let mut links = self.links.lock().await;
        let Some(count) = links.channels.get_mut(channel) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        links.channels.remove(channel);
        if let Some(link) = links.link.as_mut().filter(|l| l.is_usable(None)) {
            if let Err(err) = link.send("SUNSUBSCRIBE", channel).await {
                tracing::debug!(error = %err, "SUNSUBSCRIBE failed");
            }
        }
    }

    /// The usable subscription connection in `links`, made now (and every channel subscribed
    /// again on it) if there is none.
    async fn link<'a>(&self, links: &'a mut Links) -> Result<&'a mut Link, RedisError> {
        let master = match &self.source {
            Source::Sentinel(sentinel) => Some(sentinel.master().await?),
            _ => None,
        };
        let generation = master.as_ref().map(|m| m.generation);
        if !links.link.as_ref().is_some_and(|l| l.is_usable(generation)) {
            if links.link.take().is_some_and(|l| l.is_usable(None)) {
                // Still connected, to a master the store no longer uses (a failover that left it
                // running, demoted): its waiters hear nothing from the new one; they look again.
                self.waiters.lost();
            }
            let mut link = match (&self.source, master) {
                (Source::Node(client), _) => self.node(client, 0).await?,
                (Source::Sentinel(_), Some(master)) => self.node(&resp3(&master.client)?, master.generation).await?,
                (Source::Sentinel(_), None) => return Err(no_link()),
                (Source::Cluster(client), _) => Link::Cluster(client.get_async_connection().await?),
            };
            for channel in links.channels.keys() {
                link.send("SSUBSCRIBE", channel).await?;
            }
            links.link = Some(link);
        }
        links.link.as_mut().ok_or_else(no_link)
    }

    async fn node(&self, client: &redis::Client, generation: u64) -> Result<Link, RedisError> {
        let alive = Arc::new(AtomicBool::new(true));
        let pushes = Pushes {
            waiters: self.waiters.clone(),
            metrics: self.metrics.clone(),
            alive: Some(alive.clone()),
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None)
            .set_push_sender(pushes);
        let connection = client.get_multiplexed_async_connection_with_config(&config).await?;
        Ok(Link::Node {
            connection,
            alive,
            generation,
        })
    }
}

fn no_link() -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "no subscription connection"))
}

/// `client`'s connection settings (address, credentials, database, TLS) speaking RESP3, whose
/// pushes carry the subscription's messages.
fn resp3(client: &redis::Client) -> Result<redis::Client, RedisError> {
    let info = client.get_connection_info().clone();
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_names_its_key() {
        let key = StorageKey::new("idem:", "orders", b"", b"k1");
        let channel = channel_of(&key);
        assert!(channel.starts_with(key.record_key()));
        assert_eq!(digest_of(channel.as_bytes()), Some(*key.digest()));
        assert_eq!(
            super::super::cluster_slots::key_slot(channel.as_bytes()),
            super::super::cluster_slots::key_slot(key.record_key().as_bytes()),
            "the channel is on its key's slot"
        );
        assert_eq!(digest_of(b"idem:{zz}:settled"), None);
        assert_eq!(digest_of(b"other"), None);
    }
}
