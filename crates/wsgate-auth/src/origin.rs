//! Origin patterns against cross-site WebSocket hijacking: a browser sends
//! the page's `Origin` with every WebSocket handshake, and a page on another
//! site must not ride on the user's cookies or client certificate.
//!
//! A pattern is `SCHEME://HOST[:PORT]`, compared with the request's `Origin`
//! case-insensitively and with default ports made explicit
//! (`https://a.example` is `https://a.example:443`). A HOST of
//! `*.example.com` matches any name below `example.com` (one label or more),
//! never `example.com` itself. The literal `null` (sandboxed frames, `file:`
//! pages) matches only a pattern `null`.

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// Lower case; for a wildcard, the suffix with its leading dot.
    host: String,
    wildcard: bool,
    port: u16,
    null: bool,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `SCHEME://HOST[:PORT]` split, lower-cased, with the port made explicit.
fn split(s: &str) -> Option<(String, String, u16)> {
    let s = s.trim();
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
        return None;
    }
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r.split_once(']')?;
        (format!("[{h}]"), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
        None => default_port(&scheme)?,
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme, host.to_ascii_lowercase(), port))
}

impl std::str::FromStr for OriginPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "null" {
            return Ok(OriginPattern {
                scheme: String::new(),
                host: String::new(),
                wildcard: false,
                port: 0,
                null: true,
            });
        }
        let bad = || {
            format!(
                "invalid origin `{}` (expected SCHEME://HOST[:PORT], HOST may start with `*.`)",
                s.chars().take(80).collect::<String>()
            )
        };
        let (scheme, host, port) = split(s).ok_or_else(bad)?;
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(suffix) => (true, format!(".{suffix}")),
            None => (false, host),
        };
        let label_ok = |h: &str| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        };
        if host.contains('*') || !label_ok(&host) || host == "." {
            return Err(bad());
        }
        Ok(OriginPattern {
            scheme,
            host,
            wildcard,
            port,
            null: false,
        })
    }
}

impl OriginPattern {
    /// Whether the `Origin` value `origin` is allowed by this pattern.
    pub fn matches(&self, origin: &str) -> bool {
        if origin.trim() == "null" {
            return self.null;
        }
        if self.null {
            return false;
        }
        let Some((scheme, host, port)) = split(origin) else {
            return false;
        };
        if scheme != self.scheme || port != self.port {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() && host.ends_with(&self.host)
        } else {
            host == self.host
        }
    }
}

/// A route's allowed origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(pub Vec<OriginPattern>);

impl Origins {
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Origins, String> {
        items
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()
            .map(Origins)
    }

    pub fn allows(&self, origin: &str) -> bool {
        self.0.iter().any(|p| p.matches(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_wildcard_ports_and_null() {
        let o = Origins::parse(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:8080",
            "null",
        ])
        .unwrap();
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("HTTPS://App.Example.com:443"));
        assert!(!o.allows("http://app.example.com"));
        assert!(!o.allows("https://app.example.com:8443"));
        assert!(!o.allows("https://app.example.com.evil.net"));
        assert!(o.allows("https://a.example.org"));
        assert!(o.allows("https://a.b.example.org"));
        assert!(
            !o.allows("https://example.org"),
            "the apex is not below itself"
        );
        assert!(!o.allows("https://evilexample.org"));
        assert!(o.allows("http://localhost:8080"));
        assert!(!o.allows("http://localhost"));
        assert!(o.allows("null"));
        assert!(!o.allows(""));
        assert!(!o.allows("garbage"));
        assert!(!Origins::parse(&["https://app.example.com"])
            .unwrap()
            .allows("null"));
        for bad in [
            "example.com",
            "https://",
            "https://a/b",
            "https://*",
            "https://a*.b",
            "https://a:0",
            "https://u@a",
        ] {
            assert!(bad.parse::<OriginPattern>().is_err(), "{bad}");
        }
    }
}
