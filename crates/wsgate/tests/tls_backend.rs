//! The reverse proxy towards backends spoken to over TLS (`wss://`,
//! `https://`): the real binary in front of a real TLS backend — another
//! `wsgate` serving `wss://` with a certificate from a test CA, and a rustls
//! server that requires a client certificate (mutual TLS).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsframe::{DecoderConfig, Message, WebSocket};

mod common;
use common::Gateway;

const LIMIT: Duration = Duration::from_secs(20);

/// A test CA and leaf certificates it signs, written as PEM files in `dir`.
struct Pki {
    dir: tempfile::TempDir,
    ca: Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca,
            ca_key: key,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Writes NAME.pem and NAME-key.pem for a leaf with `purpose`.
    fn leaf(&self, name: &str, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A `wss://` backend: wsgate's own `echo:` route behind a certificate of `pki`.
fn wss_echo_backend(pki: &Pki) -> Gateway {
    let (cert, key) = pki.leaf("backend", ExtendedKeyUsagePurpose::ServerAuth);
    Gateway::tls_echo(&cert, &key)
}

async fn raw_http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn websocket_and_http_through_to_a_wss_backend() {
    let pki = Pki::new();
    let backend = wss_echo_backend(&pki);
    let port = backend.addr().rsplit(':').next().unwrap().to_string();
    let ca = pki.path("ca.pem");
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &format!("wss://localhost:{port}"),
        "--backend-ca",
        &ca,
    ]);

    // A WebSocket through the proxy, over TLS towards the backend.
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut ws, _) = WebSocket::connect(tcp, &gw.addr(), "/", &[], DecoderConfig::default())
        .await
        .unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(Bytes::from(big.clone())))
        .await
        .unwrap();
    let back = tokio::time::timeout(LIMIT, ws.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::Binary(Bytes::from(big)));
    ws.send(Message::Text("hello".into())).await.unwrap();
    let back = tokio::time::timeout(LIMIT, ws.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::Text("hello".into()));

    // Plain HTTP through the same route: the pooled client speaks https, and
    // the backend (a bridge) answers a request that is no WebSocket with 400.
    let answer = raw_http(
        &gw.addr(),
        "GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("websocket"), "{answer}");
}

#[tokio::test]
async fn an_untrusted_backend_certificate_is_a_502() {
    let pki = Pki::new();
    let backend = wss_echo_backend(&pki);
    let port = backend.addr().rsplit(':').next().unwrap().to_string();
    // No --backend-ca: the test CA is not among the built-in roots. A fresh
    // gateway per request: the failure ejects the backend (then 503).
    let start = || {
        Gateway::start(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &format!("wss://localhost:{port}"),
        ])
    };
    let gw = start();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let handshake = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let answer = raw_http(&gw.addr(), &handshake).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("TLS handshake failed"), "{answer}");
    assert!(answer.contains("UnknownIssuer"), "{answer}");
    let answer = raw_http(&gw.addr(), &handshake).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "ejected: {answer}");

    let gw = start();
    let answer = raw_http(
        &gw.addr(),
        "GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
}

/// An `https://` backend that requires a client certificate from `pki`'s CA
/// and answers every request with 200 and the request line it saw.
async fn mtls_backend(pki: &Pki) -> u16 {
    let (cert, key) = pki.leaf("mtls-server", ExtendedKeyUsagePurpose::ServerAuth);
    let load = |p: &str| std::fs::read(p).unwrap();
    let certs = rustls_pemfile::certs(&mut &load(&cert)[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &load(&key)[..])
        .unwrap()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &load(&pki.path("ca.pem"))[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client without a certificate fails here.
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let line = line.lines().next().unwrap_or_default().to_string();
                let body = format!("saw {line}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn client_certificate_for_an_mtls_backend() {
    let pki = Pki::new();
    let port = mtls_backend(&pki).await;
    pki.leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, identity: &str| {
        let path = pki.path(name);
        std::fs::write(
            &path,
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n\n[backend_tls]\nca = \"ca.pem\"\n{identity}\n\
                 [[route]]\nproxy = \"https://localhost:{port}\"\n"
            ),
        )
        .unwrap();
        path
    };
    // With the client certificate: the backend answers.
    let with = write(
        "with.toml",
        "cert = \"client.pem\"\nkey = \"client-key.pem\"\n",
    );
    let gw = Gateway::start(&["serve", "--config", &with]);
    let answer = raw_http(
        &gw.addr(),
        "GET /app?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("saw GET /app?x=1 HTTP/1.1"), "{answer}");

    // Without it: the backend refuses the TLS handshake, the client gets 502.
    let without = write("without.toml", "");
    let gw = Gateway::start(&["serve", "--config", &without]);
    let answer = raw_http(
        &gw.addr(),
        "GET /app HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
}

#[test]
fn check_names_the_backend_tls_key_of_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\n[backend_tls]\nca = \"missing.pem\"\n\n\
         [[route]]\nproxy = \"wss://localhost:9443\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":5:"), "line of `ca`: {err}");
    assert!(err.contains("backend_tls.ca"), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
}

#[test]
fn a_bad_backend_ca_flag_is_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for ca in [garbage.to_str().unwrap(), "/nonexistent/ca.pem"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--to",
                "wss://localhost:9443",
                "--backend-ca",
                ca,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--backend-ca"), "{err}");
        assert!(err.contains(ca), "{err}");
        assert!(out.stdout.is_empty(), "nothing announced");
    }
}
