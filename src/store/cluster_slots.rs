//! Redis Cluster: which master holds a key's slot, so that a write to acknowledge goes to that
//! master's own [`NodeQueue`] and its `WAIT` counts that node's replicas (docs/behaviour.md
//! §4.4: one `WAIT` per node written).
//!
//! The slot map is read with `CLUSTER SLOTS` through the store's cluster connection, on first
//! use and again after a write was refused or failed in a way that says the map is out of date
//! (`MOVED`, `ASK`, a lost node): that write is a store failure, the next one uses the new map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use redis::aio::ConnectionLike;
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, ServerErrorKind, TlsCertificates, Value};

use super::group_commit::{Connector, NodeQueue, Timeouts};

/// Redis Cluster's slot count.
const SLOTS: u16 = 16384;

/// A master's address as the cluster announces it.
type NodeAddr = (String, u16);

/// The masters of a cluster and their queues of acknowledged writes.
pub(super) struct ClusterNodes {
    /// A seed node's connection settings (credentials, TLS): every node's, with its address.
    template: ConnectionInfo,
    certificates: Option<TlsCertificates>,
    min_replicas: u32,
    timeouts: Timeouts,
    /// Sorted slot ranges, `(first, last, master)`.
    slots: Mutex<Vec<(u16, u16, NodeAddr)>>,
    /// Set when a write says the map is out of date.
    stale: Arc<AtomicBool>,
    refresh: tokio::sync::Mutex<()>,
    queues: Mutex<HashMap<NodeAddr, Arc<NodeQueue>>>,
}

impl ClusterNodes {
    pub fn new(
        template: ConnectionInfo,
        certificates: Option<TlsCertificates>,
        min_replicas: u32,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            template,
            certificates,
            min_replicas,
            timeouts,
            slots: Mutex::new(Vec::new()),
            stale: Arc::new(AtomicBool::new(true)),
            refresh: tokio::sync::Mutex::new(()),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// The queue of the master holding `key`'s slot, reading the slot map through `cluster`
    /// first if it is unknown or out of date.
    pub async fn queue_for<C: ConnectionLike + Send>(
        &self,
        key: &[u8],
        cluster: &mut C,
    ) -> Result<Arc<NodeQueue>, RedisError> {
        if self.stale.load(Ordering::Acquire) {
            let _one_at_a_time = self.refresh.lock().await;
            if self.stale.load(Ordering::Acquire) {
                let reply = cluster.req_packed_command(redis::cmd("CLUSTER").arg("SLOTS")).await?;
                let map = parse_slots(reply, &self.template)?;
                *lock(&self.slots) = map;
                self.stale.store(false, Ordering::Release);
            }
        }
        let node = master_of(&lock(&self.slots), key_slot(key)).ok_or_else(|| {
            self.stale.store(true, Ordering::Release);
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ClusterDown),
                "no master serves the slot",
            ))
        })?;
        let mut queues = lock(&self.queues);
        if let Some(queue) = queues.get(&node) {
            return Ok(queue.clone());
        }
        let connector = Connector::ClusterNode {
            client: self.client_for(&node)?,
            stale: self.stale.clone(),
        };
        let queue = Arc::new(NodeQueue::start(connector, self.min_replicas, self.timeouts));
        queues.insert(node, queue.clone());
        Ok(queue)
    }

    /// A client for `node` with the seed's credentials and TLS settings.
    fn client_for(&self, (host, port): &NodeAddr) -> Result<redis::Client, RedisError> {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.clone(), *port),
        };
        let info = self.template.clone().set_addr(addr);
        match &self.certificates {
            Some(certificates) => redis::Client::build_with_tls(info, certificates.clone()),
            None => redis::Client::open(info),
        }
    }
}

fn master_of(slots: &[(u16, u16, NodeAddr)], slot: u16) -> Option<NodeAddr> {
    let at = slots.partition_point(|(_, last, _)| *last < slot);
    slots
        .get(at)
        .filter(|(first, _, _)| *first <= slot)
        .map(|(_, _, node)| node.clone())
}

/// The `CLUSTER SLOTS` reply as sorted ranges: `[first, last, [host, port, id, …], replicas…]`.
/// A master that announces no host (`""`) is taken to be on the seed's host.
fn parse_slots(reply: Value, template: &ConnectionInfo) -> Result<Vec<(u16, u16, NodeAddr)>, RedisError> {
    let unexpected = |what: &str| RedisError::from((ErrorKind::UnexpectedReturnType, "CLUSTER SLOTS", what.to_owned()));
    let seed_host = match template.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => String::new(),
    };
    let Value::Array(ranges) = reply.extract_error()? else {
        return Err(unexpected("not an array"));
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(unexpected("a range is not an array"));
        };
        let (first, last, master) = match fields.as_slice() {
            [Value::Int(first), Value::Int(last), Value::Array(master), ..] => (*first, *last, master),
            _ => return Err(unexpected("a range is not [first, last, master, …]")),
        };
        let (host, port) = match master.as_slice() {
            [Value::BulkString(host), Value::Int(port), ..] => (String::from_utf8_lossy(host).into_owned(), *port),
            _ => return Err(unexpected("a master is not [host, port, …]")),
        };
        let host = if host.is_empty() { seed_host.clone() } else { host };
        let bounds = (u16::try_from(first), u16::try_from(last), u16::try_from(port));
        let (Ok(first), Ok(last), Ok(port)) = bounds else {
            return Err(unexpected("a slot or port out of range"));
        };
        map.push((first, last, (host, port)));
    }
    map.sort_by_key(|(first, _, _)| *first);
    Ok(map)
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part in the first
/// `{…}`, if not empty) or of the whole key, modulo 16384.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|b| *b == b'}').map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16_xmodem(tagged) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A poisoned lock still holds a usable map.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::IntoConnectionInfo;

    /// Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
    #[test]
    fn slots_are_redis_clusters() {
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot(b"idem:{abc}"), key_slot(b"abc"));
    }

    #[test]
    fn the_slot_map_is_read_from_cluster_slots() {
        let template = "redis://:pw@10.0.0.1:7000".into_connection_info().expect("valid");
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("10.0.0.2", 7001),
                node("10.0.0.9", 7009),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("", 7000)]),
        ]);
        let map = parse_slots(reply, &template).expect("parses");
        assert_eq!(master_of(&map, 0), Some(("10.0.0.1".to_owned(), 7000)));
        assert_eq!(master_of(&map, 5460), Some(("10.0.0.1".to_owned(), 7000)));
        assert_eq!(master_of(&map, 5461), Some(("10.0.0.2".to_owned(), 7001)));
        assert_eq!(master_of(&map, 16383), Some(("10.0.0.2".to_owned(), 7001)));
        let gap = vec![(10, 20, ("h".to_owned(), 1))];
        assert_eq!(master_of(&gap, 9), None);
        assert_eq!(master_of(&gap, 21), None);
        assert!(parse_slots(Value::Int(1), &template).is_err());
    }
}
