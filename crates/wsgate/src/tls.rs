//! TLS for `wss://` listeners: rustls through tokio-rustls, PEM files.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Loads a PEM certificate chain and private key; a key that does not belong
/// to the certificate is a clear error.
pub fn acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = {
        let pem = std::fs::read(cert)
            .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?;
        rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: invalid PEM certificate", cert.display()))?
    };
    if certs.is_empty() {
        return Err(anyhow!("{}: no CERTIFICATE block found", cert.display()));
    }
    let key_der: PrivateKeyDer<'static> = {
        let pem =
            std::fs::read(key).with_context(|| format!("cannot read TLS key {}", key.display()))?;
        rustls_pemfile::private_key(&mut &pem[..])
            .with_context(|| format!("{}: invalid PEM private key", key.display()))?
            .ok_or_else(|| anyhow!("{}: no PRIVATE KEY block found", key.display()))?
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => anyhow!(
                "TLS key {} does not match certificate {}",
                key.display(),
                cert.display()
            ),
            other => anyhow!(
                "TLS certificate {} / key {}: {other}",
                cert.display(),
                key.display()
            ),
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
