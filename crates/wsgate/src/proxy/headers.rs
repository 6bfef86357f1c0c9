//! The proxy's header rules: which headers stay behind at a hop, and the
//! forwarding headers (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`,
//! RFC 7239) the gateway adds.
//!
//! Hop-by-hop headers (`Connection` and every header it names, `Keep-Alive`,
//! `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are dropped and
//! regenerated. Forwarding values a client sent are kept (and appended to)
//! only when the client is a trusted proxy.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::config::Forwarding;
use crate::http::handshake;

/// Forwarding headers for one request. Proto and host borrow from the
/// request unless a trusted client sent its own to append to: on the path of
/// every proxied handshake, two strings are built, not four.
pub(super) struct ForwardedValues<'a> {
    xff: String,
    proto: Cow<'a, str>,
    host: Option<Cow<'a, str>>,
    forwarded: String,
}

impl ForwardedValues<'_> {
    /// Header names with their values (`None`: the header is left out).
    pub(super) fn pairs(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("x-forwarded-for", Some(&self.xff)),
            ("x-forwarded-proto", Some(&self.proto)),
            ("x-forwarded-host", self.host.as_deref()),
            ("forwarded", Some(&self.forwarded)),
        ]
    }
}

/// Whether a header names something the proxy itself sets on a WebSocket
/// request to a backend (or strips): hop-by-hop headers, those `Connection`
/// names, `Host`, the key and version (always regenerated), and — when
/// `forwarding` — the forwarding headers.
pub(super) fn regenerated(
    name: &str,
    connection_named: impl Fn(&str) -> bool,
    forwarding: bool,
) -> bool {
    hop_by_hop(name, connection_named)
        || name == "sec-websocket-key"
        || name == "sec-websocket-version"
        || (forwarding
            && matches!(
                name,
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "forwarded"
            ))
}

/// Copies the end-to-end headers of `src` into `dst`: hop-by-hop headers, the
/// headers `Connection` names, and `Host` (set by the caller) stay behind.
pub fn copy_end_to_end(src: &HeaderMap, dst: &mut HeaderMap) {
    let named = connection_names(src);
    for (k, v) in src {
        if !hop_by_hop(k.as_str(), &named) {
            dst.append(k.clone(), v.clone());
        }
    }
}

/// Whether header `name` stays behind at a hop: the hop-by-hop headers,
/// `Proxy-*`, those `Connection` names (`named`), and `Host` (set anew).
pub(super) fn hop_by_hop(name: &str, named: impl Fn(&str) -> bool) -> bool {
    // One `match` (dispatched on the length first), not a scan of a list:
    // it runs for every header of every proxied request.
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade" | "host"
    ) || name.starts_with("proxy-")
        || named(name)
}

/// Whether `Connection` in `h` names a header (RFC 9110 §7.6.1: that header
/// is hop-by-hop too).
pub(super) fn connection_names(h: &HeaderMap) -> impl Fn(&str) -> bool + '_ {
    // Looked up once, not once per header asked about.
    let values = h.get_all(header::CONNECTION);
    move |name: &str| {
        values
            .iter()
            .any(|v| handshake::list_has_token(v.as_bytes(), name))
    }
}

/// The host the client asked for: `Host`, or HTTP/2's `:authority`.
pub(super) fn request_host(parts: &Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Appends `ip` as text. An IPv4 address is written digit by digit: on the
/// path of every proxied handshake (twice), `fmt` costs several times more.
fn push_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write as _;
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if o >= 100 {
                    out.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    out.push(char::from(b'0' + o / 10 % 10));
                }
                out.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `v` as an RFC 7239 value: a token as it is, anything else quoted.
fn push_quoted_if_needed(out: &mut String, v: &str) {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !v.is_empty() && v.bytes().all(tchar) {
        out.push_str(v);
        return;
    }
    out.push('"');
    // Runs without a backslash or a quote are copied whole (a host is one).
    let mut rest = v;
    while let Some(i) = rest.find(['\\', '"']) {
        out.push_str(&rest[..i]);
        out.push('\\');
        out.push_str(&rest[i..=i]);
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

/// The `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` values for a
/// request with headers `h` (None when forwarding headers are off).
pub(super) fn forwarded<'a>(
    policy: &Forwarding,
    h: &HeaderMap,
    remote: SocketAddr,
    secure: bool,
    host: Option<&'a HeaderValue>,
) -> Option<ForwardedValues<'a>> {
    use std::fmt::Write as _;
    if !policy.enabled {
        return None;
    }
    let trusted =
        !policy.trusted.is_empty() && policy.trusted.iter().any(|n| n.contains(remote.ip()));
    // What a trusted client sent is kept and appended to; anything else
    // a client sent is replaced.
    let prior = |name: &'static str| -> Option<String> {
        let mut joined: Option<String> = None;
        if trusted {
            for v in h.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
                match &mut joined {
                    Some(j) => {
                        j.push_str(", ");
                        j.push_str(v);
                    }
                    None => joined = Some(v.to_string()),
                }
            }
        }
        joined
    };
    let ip = remote.ip().to_canonical();
    let proto = if secure { "https" } else { "http" };
    let host = host.and_then(|v| v.to_str().ok()).unwrap_or("");

    let mut xff = String::with_capacity(48);
    if let Some(p) = prior("x-forwarded-for") {
        let _ = write!(xff, "{p}, ");
    }
    push_ip(&mut xff, ip);
    let proto_value = prior("x-forwarded-proto").map_or(Cow::Borrowed(proto), Cow::Owned);
    let host_value = match prior("x-forwarded-host") {
        Some(p) => Some(Cow::Owned(p)),
        None if !host.is_empty() => Some(Cow::Borrowed(host)),
        None => None,
    };
    let mut fwd = String::with_capacity(64);
    if let Some(p) = prior("forwarded") {
        let _ = write!(fwd, "{p}, ");
    }
    if ip.is_ipv6() {
        fwd.push_str("for=\"[");
        push_ip(&mut fwd, ip);
        fwd.push_str("]\"");
    } else {
        fwd.push_str("for=");
        push_ip(&mut fwd, ip);
    }
    fwd.push_str(";proto=");
    fwd.push_str(proto);
    if !host.is_empty() {
        fwd.push_str(";host=");
        push_quoted_if_needed(&mut fwd, host);
    }
    Some(ForwardedValues {
        xff,
        proto: proto_value,
        host: host_value,
        forwarded: fwd,
    })
}

/// Replaces the forwarding headers of `h` with ours.
pub(crate) fn add_forwarded(
    policy: &Forwarding,
    h: &mut HeaderMap,
    remote: SocketAddr,
    secure: bool,
    host: Option<&HeaderValue>,
) {
    let Some(f) = forwarded(policy, h, remote, secure, host) else {
        return;
    };
    for (name, v) in f.pairs() {
        h.remove(name);
        if let Some(v) = v.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_fmt_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "192.0.2.7",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
        }
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut src = HeaderMap::new();
        src.insert(
            "connection",
            "keep-alive, X-Secret, Upgrade".parse().unwrap(),
        );
        src.insert("x-secret", "1".parse().unwrap());
        src.insert("keep-alive", "timeout=5".parse().unwrap());
        src.insert("proxy-authorization", "Basic x".parse().unwrap());
        src.insert("proxy-connection", "keep-alive".parse().unwrap());
        src.insert("te", "trailers".parse().unwrap());
        src.insert("trailer", "x-checksum".parse().unwrap());
        src.insert("transfer-encoding", "chunked".parse().unwrap());
        src.insert("upgrade", "websocket".parse().unwrap());
        src.insert("host", "a".parse().unwrap());
        src.insert("sec-websocket-protocol", "chat".parse().unwrap());
        src.insert(
            "sec-websocket-extensions",
            "permessage-deflate".parse().unwrap(),
        );
        src.insert("cookie", "a=b".parse().unwrap());
        let mut dst = HeaderMap::new();
        copy_end_to_end(&src, &mut dst);
        let mut names: Vec<&str> = dst.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "cookie",
                "sec-websocket-extensions",
                "sec-websocket-protocol"
            ]
        );
    }

    #[test]
    fn forwarded_values_are_tokens_or_quoted_strings() {
        for (v, want) in [
            ("example.com", "example.com"),
            ("example.com:8080", "\"example.com:8080\""),
            ("[::1]:80", "\"[::1]:80\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("\"", "\"\\\"\""),
            ("", "\"\""),
        ] {
            let mut s = String::from(";host=");
            push_quoted_if_needed(&mut s, v);
            assert_eq!(s, format!(";host={want}"), "{v:?}");
        }
    }

    #[test]
    fn forwarded_headers_replace_untrusted_and_append_trusted() {
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let host = HeaderValue::from_static("example.com:8080");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        add_forwarded(&Forwarding::default(), &mut h, remote, true, Some(&host));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=\"example.com:8080\""
        );

        let trusting = Forwarding {
            enabled: true,
            trusted: vec!["192.0.2.0/24".parse().unwrap()],
        };
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        add_forwarded(&trusting, &mut h, remote, false, None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.0.2.7");
    }
}
