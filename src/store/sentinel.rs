//! The master of a Redis Sentinel group, found through the sentinels and followed across
//! failovers without a restart (docs/behaviour.md §4.4).
//!
//! The master in use is kept with a generation number. A command that fails in a way that says
//! the master is gone or is no longer the master (a broken connection, a timeout, a `READONLY`
//! or `MASTERDOWN` reply: the node was demoted) makes the store [`forget`](SentinelMaster::forget)
//! that generation, and the next command asks the sentinels again: the redis crate asks them
//! for the master's address (`SENTINEL MASTERS`, skipping a master they flag down) and checks
//! with `ROLE` that the node it names is a master. During the failover those lookups fail and
//! guarded requests are a store failure (`503`, or forwarded unprotected per `store_failure`).
//! Lookups are one at a time, and a failed one is not repeated for [`LOOKUP_BACKOFF`]: a burst
//! of requests during a failover does not become a burst of lookups.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, ConnectionAddr, ErrorKind, RedisError, ServerErrorKind, TlsCertificates, TlsMode};

use crate::config::redis_url::SentinelUrl;
use crate::config::Secret;

/// How long a failed lookup answers for the next ones.
const LOOKUP_BACKOFF: Duration = Duration::from_millis(100);

/// The master in use: a connection for the store's commands, and a client to open the
/// connections of acknowledged writes to the same node.
#[derive(Clone)]
pub(super) struct Master {
    pub generation: u64,
    pub client: redis::Client,
    pub connection: MultiplexedConnection,
}

/// See the module documentation.
pub(super) struct SentinelMaster {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<Master>>,
    /// The last failed lookup, answered again until [`LOOKUP_BACKOFF`] has passed.
    last_failure: Mutex<Option<(Instant, RedisError)>>,
    generations: AtomicU64,
    /// Bounds a lookup, and the connection to the master it found.
    timeout: Duration,
    db: i64,
    master_name: String,
}

impl SentinelMaster {
    /// The group `url` names, its sentinels asked with `sentinel_password`; nothing is
    /// connected before the first command. `certificates`: the roots trusted for
    /// `rediss+sentinel://`, on the sentinels and the nodes alike (else the bundled roots).
    pub fn new(
        url: &SentinelUrl,
        sentinel_password: Option<&Secret>,
        certificates: Option<TlsCertificates>,
        timeout: Duration,
    ) -> Result<Self, RedisError> {
        let addresses = url.sentinels.iter().map(|(host, port)| match url.tls {
            false => ConnectionAddr::Tcp(host.clone(), *port),
            true => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            },
        });
        let mut builder = SentinelClientBuilder::new(addresses, &url.master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(url.db);
        if let Some(username) = &url.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &url.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(password) = sentinel_password {
            builder = builder.set_client_to_sentinel_password(password.expose());
        }
        if url.tls {
            builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(certificates) = certificates {
                builder = builder
                    .set_client_to_sentinel_certificates(certificates.clone())
                    .set_client_to_redis_certificates(certificates);
            }
        }
        Ok(Self {
            sentinels: tokio::sync::Mutex::new(builder.build()?),
            current: Mutex::new(None),
            last_failure: Mutex::new(None),
            generations: AtomicU64::new(0),
            timeout,
            db: url.db,
            master_name: url.master_name.clone(),
        })
    }

    pub fn db(&self) -> i64 {
        self.db
    }

    /// The master in use, asked of the sentinels first if there is none.
    pub async fn master(&self) -> Result<Master, RedisError> {
        if let Some(master) = self.in_use() {
            return Ok(master);
        }
        let mut sentinels = self.sentinels.lock().await;
        // Another caller may have found it while this one waited for the lock.
        if let Some(master) = self.in_use() {
            return Ok(master);
        }
        if let Some(err) = self.recent_failure() {
            return Err(err);
        }
        match self.look_up(&mut sentinels).await {
            Ok(master) => {
                let address = master.client.get_connection_info().addr().to_string();
                if master.generation == 1 {
                    tracing::info!(master = %self.master_name, %address, "using the Redis master the sentinels name");
                } else {
                    tracing::warn!(master = %self.master_name, %address, "following the Redis master the sentinels name now");
                }
                *lock(&self.current) = Some(master.clone());
                Ok(master)
            }
            Err(err) => {
                *lock(&self.last_failure) = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// The generation of the master in use, if there is one.
    pub fn generation(&self) -> Option<u64> {
        lock(&self.current).as_ref().map(|m| m.generation)
    }

    /// Stops using master `generation` (if it is still the one in use): the next command asks
    /// the sentinels again.
    pub fn forget(&self, generation: u64, why: &dyn std::fmt::Display) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|m| m.generation == generation) {
            *current = None;
            tracing::warn!(master = %self.master_name, reason = %why, "Redis master lost: asking the sentinels again");
        }
    }

    /// [`forget`](Self::forget)s `generation` if `err` says its node is gone or demoted.
    pub fn observe(&self, generation: u64, err: &RedisError) {
        if master_is_gone(err) {
            self.forget(generation, err);
        }
    }

    fn in_use(&self) -> Option<Master> {
        lock(&self.current).clone()
    }

    fn recent_failure(&self) -> Option<RedisError> {
        let failure = lock(&self.last_failure);
        let (at, err) = failure.as_ref()?;
        (at.elapsed() < LOOKUP_BACKOFF).then(|| err.clone())
    }

    /// Asks the sentinels for the master and connects to it, within the timeout.
    async fn look_up(&self, sentinels: &mut SentinelClient) -> Result<Master, RedisError> {
        let lookup = async {
            let client = sentinels.async_get_client().await?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(None);
            let connection = client.get_multiplexed_async_connection_with_config(&config).await?;
            Ok::<_, RedisError>((client, connection))
        };
        let (client, connection) = tokio::time::timeout(self.timeout, lookup)
            .await
            .map_err(|_| timed_out("no master found through the sentinels in time"))??;
        Ok(Master {
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            client,
            connection,
        })
    }
}

/// Whether `err` says the node it came from is unreachable or no longer a writable master.
pub(super) fn master_is_gone(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_unrecoverable_error()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly) | ErrorKind::Server(ServerErrorKind::MasterDown)
        )
}

/// An I/O timeout as a `RedisError`.
pub(super) fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// A poisoned lock still holds a usable value here (an `Option` replaced whole).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
