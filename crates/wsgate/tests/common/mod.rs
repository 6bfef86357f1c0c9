//! The real `wsgate` binary for integration tests, on ephemeral loopback
//! ports, killed on drop.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub struct Gateway {
    child: Child,
    /// `ws://HOST:PORT` (or `wss://`) per listener, as printed.
    pub urls: Vec<String>,
    /// `HOST:PORT` of the admin listener (`--admin`).
    pub admin: Option<String>,
}

impl Gateway {
    /// Starts `wsgate ARGS` and waits for its `listening on` lines (one per
    /// `--listen`, one for `--config`) and, with `--admin`, its `admin on` line.
    pub fn start(args: &[&str]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(args)
            .env("WSGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start wsgate");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut next = || {
            lines
                .next()
                .expect("wsgate exited before listening")
                .unwrap()
        };
        let listeners = args.iter().filter(|a| **a == "--listen").count().max(1);
        let urls = (0..listeners)
            .map(|_| {
                let line = next();
                line.strip_prefix("listening on ")
                    .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                    .to_string()
            })
            .collect();
        let admin = args.contains(&"--admin").then(|| {
            let line = next();
            line.strip_prefix("admin on http://")
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .to_string()
        });
        Gateway { child, urls, admin }
    }

    /// `wsgate serve` with the `echo:` route on a `wss://` listener with
    /// the PEM files `cert` and `key`.
    pub fn tls_echo(cert: &str, key: &str) -> Gateway {
        Gateway::start(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "echo:",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ])
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `HOST:PORT` of the first listener.
    pub fn addr(&self) -> String {
        self.urls[0].split("://").nth(1).unwrap().to_string()
    }

    /// The text of `GET /metrics` on the admin listener (`--admin`).
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let admin = self.admin.as_deref().expect("started without --admin");
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP echo server on an ephemeral loopback port, for the life of the
/// test's runtime; each connection is echoed until EOF, then half-closed.
pub async fn tcp_echo() -> u16 {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

pub mod tunnel;
