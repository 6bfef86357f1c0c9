//! TLS material from PEM files, for rustls: the server side of `wss://` /
//! `https://` listeners, and the client side towards `wss://` and `https://`
//! backends. A leaf: it knows files and rustls, nothing of the gateway, so
//! the config can use it to check the files it names and the runtime to
//! load them.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Client certificates a listener asks for: the CA (PEM) they must chain
/// to, whether one is required, and revocation lists (PEM).
#[derive(Debug, Clone, Copy)]
pub struct ClientCerts<'a> {
    pub ca: &'a Path,
    pub required: bool,
    pub crls: &'a [std::path::PathBuf],
}

/// Loads a PEM certificate chain and private key; a key that does not belong
/// to the certificate is a clear error. With `clients`, client certificates
/// are verified in the handshake (chain, dates, revocation): a bad one ends
/// the TLS session before any request, and without one the session goes on
/// only when they are optional.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
    clients: Option<ClientCerts<'_>>,
) -> anyhow::Result<TlsAcceptor> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(c) => builder.with_client_cert_verifier(client_verifier(c, provider)?),
    };
    let mut config = builder
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

/// The verifier of a listener's client certificates.
fn client_verifier(
    c: ClientCerts<'_>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let roots = client_roots(c.ca)?;
    let mut crls = vec![];
    for p in c.crls {
        let pem = std::fs::read(p).with_context(|| format!("cannot read CRL {}", p.display()))?;
        for crl in rustls_pemfile::crls(&mut &pem[..]) {
            crls.push(crl.with_context(|| format!("{}: invalid PEM CRL", p.display()))?);
        }
    }
    let mut b =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            // A CRL covers the client certificates its CA issued; the CA's own
            // status is not looked up.
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    if !c.required {
        b = b.allow_unauthenticated();
    }
    b.build()
        .map_err(|e| anyhow!("client certificates ({}): {e}", c.ca.display()))
}

fn client_roots(ca: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    Ok(roots)
}

/// Checks a client CA file: PEM certificates usable as trust anchors.
pub fn check_client_ca(ca: &Path) -> anyhow::Result<()> {
    client_roots(ca).map(|_| ())
}

/// The PEM certificates of `path`; none at all is an error.
fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read TLS certificate {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: invalid PEM certificate", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no CERTIFICATE block found", path.display()));
    }
    Ok(certs)
}

/// The PEM private key of `path`.
fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read TLS key {}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("{}: invalid PEM private key", path.display()))?
        .ok_or_else(|| anyhow!("{}: no PRIVATE KEY block found", path.display()))
}

/// The client configuration for TLS backends. Backend certificates are always
/// verified, against the CAs of `ca` or the built-in Mozilla roots, for the
/// host named in the backend URL (a DNS name or an IP address); `identity`
/// (certificate chain, key) is shown to backends that ask for one.
pub fn backend_client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                anyhow!(
                    "TLS client certificate {} / key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
