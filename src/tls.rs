//! TLS plumbing shared by the listener, the upstream client and the Redis store: rustls with the
//! pure-Rust `ring` crypto provider, and PEM files read into errors that name the setting at
//! fault: CA files once at start-up, the listener's certificate and key again whenever they
//! change.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{ConfigError, TlsSettings};

fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message,
    }
}

/// The process-wide rustls crypto provider, installing `ring` as that default first if nobody
/// has installed one yet.
///
/// Idempotent, and called wherever a TLS configuration is built (not only by the binary): the
/// Redis client builds its rustls configuration with `ClientConfig::builder()`, which needs a
/// process-wide default, and tests call [`serve`](crate::serve) directly. A provider the
/// embedding program installed first is respected.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    if let Some(provider) = CryptoProvider::get_default() {
        return provider.clone();
    }
    // Err: another thread installed one in between; either way there is a default now.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Every PEM certificate in `pem`, which came from `path`; an error naming `key` if there are
/// none or one is malformed.
fn parse_certificates(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{}: not a valid PEM file: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(invalid(
            key,
            format!(
                "{} contains no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
                path.display()
            ),
        ));
    }
    Ok(certificates)
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// The PEM certificates in the file `path`, the value of setting `key`.
pub fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    parse_certificates(key, path, &read(key, path)?)
}

/// The file `path` (setting `key`) as PEM text, after checking that it holds at least one
/// certificate and nothing malformed: for clients that take the PEM text itself (Redis).
pub fn read_ca_pem(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read(key, path)?;
    parse_certificates(key, path, &pem)?;
    Ok(pem)
}

/// The listener's certificate and key, re-read when their files change (`tls.reload_interval`):
/// each handshake gets the pair current at its start, so a rotated certificate is served without
/// a restart, and connections already open keep theirs.
#[derive(Debug)]
pub struct ListenerCertificate {
    settings: TlsSettings,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like at the last load attempt, good or bad (a pair that cannot be
    /// used is reported once, not on every check).
    seen: Mutex<FilesStamp>,
}

/// Modification time and length of the certificate and key files.
type FilesStamp = [(Option<SystemTime>, u64); 2];

fn stamp(settings: &TlsSettings) -> FilesStamp {
    [&settings.cert, &settings.key].map(|path| match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    })
}

impl ListenerCertificate {
    /// Loads the pair now; an error names the setting at fault.
    pub fn load(settings: &TlsSettings) -> Result<Arc<Self>, ConfigError> {
        let seen = stamp(settings);
        let key = certified_key(settings)?;
        Ok(Arc::new(Self {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(seen),
        }))
    }

    /// Re-reads the pair if the files changed since the last attempt. `Ok(true)`: new handshakes
    /// get the new pair; `Err`: the changed files cannot be used, the previous pair stays.
    pub fn reload_if_changed(&self) -> Result<bool, ConfigError> {
        let now = stamp(&self.settings);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let key = certified_key(&self.settings)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        Ok(true)
    }

    /// Checks the files every `tls.reload_interval` for as long as the future runs.
    pub async fn keep_reloading(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded"),
                Ok(false) => {}
                Err(err) => tracing::warn!(
                    error = %err,
                    "TLS certificate files changed but cannot be used: still serving the previous certificate"
                ),
            }
        }
    }
}

impl ResolvesServerCert for ListenerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// The certificate chain and private key of `settings`, checked to go together.
fn certified_key(settings: &TlsSettings) -> Result<CertifiedKey, ConfigError> {
    let chain = read_certificates("tls.cert", &settings.cert)?;
    let key_pem = read("tls.key", &settings.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            "tls.key",
            format!("{}: no usable PEM private key: {e}", settings.key.display()),
        )
    })?;
    CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|e| {
        invalid(
            "tls.key",
            format!(
                "{} does not go with the certificate in {}: {e}",
                settings.key.display(),
                settings.cert.display()
            ),
        )
    })
}

/// The rustls server configuration of the TLS listener (`tls.cert`, `tls.key`), with ALPN
/// offering `h2` and `http/1.1`, presenting `certificate`'s current pair.
pub fn listener_config(certificate: Arc<ListenerCertificate>) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls.cert", format!("no usable TLS protocol version: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
