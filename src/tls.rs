//! TLS plumbing shared by the listener, the upstream client and the Redis store: rustls with the
//! pure-Rust `ring` crypto provider, and PEM files read once, at start-up, into errors that name
//! the setting at fault.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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

/// The rustls server configuration of the TLS listener (`tls.cert`, `tls.key`), with ALPN
/// offering `h2` and `http/1.1`.
pub fn listener_config(settings: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let chain = read_certificates("tls.cert", &settings.cert)?;
    let key_pem = read("tls.key", &settings.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            "tls.key",
            format!("{}: no usable PEM private key: {e}", settings.key.display()),
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls.cert", format!("no usable TLS protocol version: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            invalid(
                "tls.key",
                format!(
                    "{} does not go with the certificate in {}: {e}",
                    settings.key.display(),
                    settings.cert.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
