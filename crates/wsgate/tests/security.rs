//! Authentication on the request path, seen from outside with a gateway
//! started in-process: a JWT route (header, query, Sec-WebSocket-Protocol),
//! a Basic route, the Origin rule and identity headers, each refusal a 401
//! or 403 and never a 101, and refusals counted by method and reason.

use std::path::Path;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

/// A backend that answers each request with its own request head as body.
async fn mirror() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let body = &buf[..n];
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
            });
        }
    });
    port
}

/// One request on a fresh connection: the status and the whole answer.
async fn request(addr: &str, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![];
    let read = async {
        loop {
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            if n == 0 || (text.starts_with("http/1.1 101") && text.contains("\r\n\r\n")) {
                return;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text[9..12].parse().unwrap(), text)
}

fn ws(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn plain(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_passwords_and_origins_decide_before_anything_connects() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let hash = bcrypt::hash("s3cret", 4)
        .unwrap()
        .replacen("$2b$", "$2y$", 1);
    std::fs::write(dir.path().join("users"), format!("ada:{hash}\n")).unwrap();
    let port = mirror().await;
    let text = format!(
        r#"
workers = 1
[[listener]]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[auth.token]
type = "jwt"
secret_file = "secret"
audiences = ["wsgate"]
sources = ["bearer", "query:access_token", "protocol:bearer."]
[auth.users]
type = "basic"
htpasswd = "users"
[[route]]
name = "api"
path_prefix = "/api"
proxy = "http://127.0.0.1:{port}"
auth = ["token", "users"]
identity_headers = {{ "x-user" = "subject", "x-tenant" = "claim:tenant", "x-via" = "method" }}
[[route]]
name = "chat"
path = "/chat"
protocols = ["chat"]
to = "echo:"
auth = ["token"]
origins = ["https://app.example.com", "https://*.example.org"]
allow_missing_origin = false
"#
    );
    let config = wsgate::config::parse("security.toml", &text, dir.path()).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let good = token(
        serde_json::json!({"sub": "ada", "tenant": "t1", "aud": "wsgate", "exp": now() + 300}),
    );

    // No credential: 401 with both challenges, the backend never asked.
    let (status, text) = request(&addr, &plain("/api/x", "X-User: forged\r\n")).await;
    assert_eq!(status, 401, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("www-authenticate: bearer realm=\"wsgate\", basic realm="),
        "{text}"
    );
    // A token: admitted, the backend sees the identity and not the client's copy.
    let (status, text) = request(
        &addr,
        &plain(
            "/api/x",
            &format!("Authorization: Bearer {good}\r\nX-User: forged\r\n"),
        ),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("x-user: ada\r\n"), "{text}");
    assert!(lower.contains("x-tenant: t1\r\n"), "{text}");
    assert!(lower.contains("x-via: token\r\n"), "{text}");
    assert!(!lower.contains("forged"), "{text}");
    // In the query.
    let (status, _) = request(&addr, &plain(&format!("/api/x?access_token={good}"), "")).await;
    assert_eq!(status, 200);
    // Wrong audience, expired, tampered: 401 with invalid_token.
    for bad in [
        token(serde_json::json!({"sub": "ada", "aud": "other", "exp": now() + 300})),
        token(serde_json::json!({"sub": "ada", "aud": "wsgate", "exp": now() - 3600})),
        {
            // One signature character changed.
            let i = good.len() - 10;
            let c = if &good[i..=i] == "A" { "B" } else { "A" };
            format!("{}{c}{}", &good[..i], &good[i + 1..])
        },
    ] {
        let (status, text) = request(
            &addr,
            &plain("/api/x", &format!("Authorization: Bearer {bad}\r\n")),
        )
        .await;
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("invalid_token"), "{text}");
    }
    // Basic, right and wrong (twice right: the second from the cache).
    use base64::Engine as _;
    let b = |up: &str| base64::engine::general_purpose::STANDARD.encode(up);
    for _ in 0..2 {
        let (status, text) = request(
            &addr,
            &plain(
                "/api/x",
                &format!("Authorization: Basic {}\r\n", b("ada:s3cret")),
            ),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("x-user: ada\r\n"),
            "{text}"
        );
    }
    let (status, _) = request(
        &addr,
        &plain(
            "/api/x",
            &format!("Authorization: Basic {}\r\n", b("ada:nope")),
        ),
    )
    .await;
    assert_eq!(status, 401);

    // The token in Sec-WebSocket-Protocol: admitted, and only `chat` echoed.
    let offer = format!(
        "Sec-WebSocket-Protocol: chat, bearer.{good}\r\nOrigin: https://app.example.com\r\n"
    );
    let (status, text) = request(&addr, &ws("/chat", &offer)).await;
    assert_eq!(status, 101, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("sec-websocket-protocol: chat\r\n"), "{text}");
    assert!(
        !lower.contains("bearer."),
        "the token is never echoed: {text}"
    );
    // A cross-site page, and no Origin at all: 403, never a 101.
    for origin in [
        "Origin: https://evil.example.net\r\n",
        "Origin: https://example.org\r\n",
        "",
    ] {
        let offer = format!("Sec-WebSocket-Protocol: chat, bearer.{good}\r\n{origin}");
        let (status, text) = request(&addr, &ws("/chat", &offer)).await;
        assert_eq!(status, 403, "{origin}: {text}");
    }
    let offer = format!(
        "Sec-WebSocket-Protocol: chat, bearer.{good}\r\nOrigin: https://a.b.example.org\r\n"
    );
    assert_eq!(request(&addr, &ws("/chat", &offer)).await.0, 101);
    // Without a token: 401.
    let (status, _) = request(
        &addr,
        &ws(
            "/chat",
            "Sec-WebSocket-Protocol: chat\r\nOrigin: https://app.example.com\r\n",
        ),
    )
    .await;
    assert_eq!(status, 401);

    // Counted by method and reason, never with the credential.
    let admin = server.admin().unwrap().to_string();
    let (_, metrics) = request(&admin, &plain("/metrics", "")).await;
    for line in [
        "wsgate_auth_total{method=\"token\",outcome=\"ok\"}",
        "wsgate_auth_total{method=\"token\",outcome=\"wrong_audience\"}",
        "wsgate_auth_total{method=\"token\",outcome=\"expired\"}",
        "wsgate_auth_total{method=\"token\",outcome=\"bad_signature\"}",
        "wsgate_auth_total{method=\"users\",outcome=\"bad_password\"}",
        "wsgate_auth_total{method=\"origin\",outcome=\"origin_not_allowed\"}",
        "wsgate_auth_total{method=\"origin\",outcome=\"origin_missing\"}",
        "wsgate_handshake_refusals_total{reason=\"unauthenticated\"}",
        "wsgate_handshake_refusals_total{reason=\"forbidden\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }
    assert!(!metrics.contains(&good[..20]));
    server.stop().await;
}

#[test]
fn check_names_the_bad_line_of_every_file_a_method_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users"), "ada:$apr1$x$y\n").unwrap();
    std::fs::write(dir.path().join("short"), "tooshort").unwrap();
    std::fs::write(dir.path().join("jwks.json"), "{\"keys\": []}").unwrap();
    let text = r#"
[[listener]]
address = "127.0.0.1:0"
[auth.users]
type = "basic"
htpasswd = "users"
[auth.hs]
type = "jwt"
secret_file = "short"
[auth.set]
type = "jwt"
jwks = "jwks.json"
[auth.certs]
type = "mtls"
[[route]]
path = "/"
to = "echo:"
auth = ["users", "nope", "certs"]
[[route]]
path = "/o"
to = "echo:"
origins = ["example.com"]
"#;
    let e = wsgate::config::parse("t.toml", text, dir.path()).unwrap_err();
    let all = e.to_string();
    for want in [
        "t.toml:6:1: auth.users.htpasswd: ",
        "users:1: MD5",
        "t.toml:9:1: auth.hs.secret_file: ",
        "at least 32",
        "t.toml:12:1: auth.set.jwks: ",
        "no usable signature key",
        "route[1].origins: invalid origin `example.com`",
        "route[0].auth: no method `nope`",
        "route[0].auth: method `certs` reads client certificates",
    ] {
        assert!(all.contains(want), "{want} missing in:\n{all}");
    }
    let _ = Path::new(".");
}
