//! What every request handler (proxy and admin) shares, built once at start-up.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::config::{Config, StoreSettings};
use crate::error::ServeError;
use crate::store::{AnyStore, DiskStore, MemoryStore, RedisOptions, RedisStore};
use crate::telemetry::{DiskStoreMetrics, Metrics};
use crate::upstream::Upstream;

/// The proxy's shared state.
pub struct State {
    pub config: Config,
    pub upstream: Upstream,
    pub store: Arc<AnyStore>,
    pub metrics: Metrics,
    /// Guarded executions run as their own tasks (a client that leaves does not cancel them);
    /// shutdown waits for them too.
    pub executions: TaskTracker,
}

impl State {
    /// Builds the upstream client and the store `config` names. Redis is connected to lazily:
    /// only a malformed URL or an unusable CA file fails here. The disk store is opened here:
    /// a data directory that cannot be created, is locked by another process, or holds a file
    /// that cannot be opened fails start-up (docs/behaviour.md §11).
    pub async fn new(config: Config) -> Result<Self, ServeError> {
        let upstream = Upstream::new(&config.upstream, &config.routes)?;
        let mut metrics = Metrics::new(config.routes.iter().map(|r| &*r.name));
        let store = match &config.store {
            StoreSettings::Disk {
                data_dir,
                max_disk_bytes,
            } => {
                let disk_metrics = DiskStoreMetrics::default();
                metrics.register_disk_store(&disk_metrics);
                let (dir, max) = (data_dir.clone(), *max_disk_bytes);
                // Opening may repair the file after a crash: off the runtime's threads.
                let opened = tokio::task::spawn_blocking(move || DiskStore::open(&dir, max, disk_metrics))
                    .await
                    .map_err(|e| {
                        crate::store::StoreError::unreachable(format!("opening the disk store failed: {e}"))
                    })?;
                AnyStore::from(opened?)
            }
            StoreSettings::Memory { max_entries } => AnyStore::from(MemoryStore::new(*max_entries)),
            StoreSettings::Redis {
                url,
                command_timeout,
                ca_file,
                sentinel_password,
                replication,
                ..
            } => {
                let ca_pem = ca_file
                    .as_deref()
                    .map(|path| crate::tls::read_ca_pem("store.ca_file", path))
                    .transpose()?;
                let options = RedisOptions {
                    command_timeout: *command_timeout,
                    ca_pem,
                    sentinel_password: sentinel_password.clone(),
                    replication: *replication,
                    replica_acks: metrics.replica_acks(),
                    wait_metrics: metrics.wait().clone(),
                };
                AnyStore::from(RedisStore::connect_with(url, options).await?)
            }
        };
        for route in config.routes.iter().filter(|r| r.policy.enabled) {
            metrics.start_guarded(route.index, &route.policy.methods);
        }
        Ok(Self {
            metrics,
            upstream,
            store: Arc::new(store),
            executions: TaskTracker::new(),
            config,
        })
    }

    /// The store as the start-up log names it: its kind, and for Redis its URL without the
    /// password.
    pub fn store_description(&self) -> String {
        match &self.config.store {
            StoreSettings::Disk {
                data_dir,
                max_disk_bytes,
            } => format!("disk {} (at most {max_disk_bytes} bytes)", data_dir.display()),
            StoreSettings::Memory { max_entries } => format!("memory (at most {max_entries} records)"),
            StoreSettings::Redis { url, ignored, .. } => {
                let mut description = format!("{} {}", self.store.kind(), crate::config::redis_url::redacted_url(url));
                if !ignored.is_empty() {
                    description.push_str(&format!(" ({} ignored: Redis is configured)", ignored.join(", ")));
                }
                description
            }
        }
    }
}
