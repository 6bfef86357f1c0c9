//! The values a config file writes as strings, each parsed once with a typed
//! error: durations, sizes, rates, peer and backend addresses, address blocks.
//! Plain data: nothing here touches a socket or the runtime.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A value that does not parse: what it was meant to be, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValueError {
    pub kind: ValueKind,
    message: String,
}

/// Which kind of value failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Duration,
    Size,
    Peer,
    Backend,
    Balance,
    Forward,
}

impl ValueError {
    pub(crate) fn new(kind: ValueKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Deserialises any [`FromStr`] value from a string, its error as the message.
macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Durations and sizes.

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dur(pub Option<Duration>);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`; `0` and `off` mean "disabled".
pub fn parse_duration(s: &str) -> Result<Option<Duration>, ValueError> {
    let err = |m: String| ValueError::new(ValueKind::Duration, m);
    let s = s.trim();
    if s == "0" || s == "off" {
        return Ok(None);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        err(format!(
            "invalid duration `{s}` (expected e.g. 250ms, 10s, 5m, 1h, or off)"
        ))
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(err(format!(
                "invalid duration `{s}`: unit must be ms, s, m or h"
            )))
        }
    };
    Ok(if secs == 0.0 {
        None
    } else {
        Some(Duration::from_secs_f64(secs))
    })
}

/// A size written as a number of bytes or with a unit: `64KiB`, `16MiB`, `1GiB`, `1MB`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s).map(ByteSize).map_err(de::Error::custom),
        }
    }
}

/// Parses `1048576`, `64KiB`, `16MiB`, `1GiB`, `10KB`, `1MB`.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let err = |m: String| ValueError::new(ValueKind::Size, m);
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        err(format!(
            "invalid size `{s}` (expected e.g. 65536, 64KiB, 16MiB)"
        ))
    })?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(err(format!(
                "invalid size `{s}`: unit must be B, KiB, MiB, GiB, KB, MB or GB"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| err(format!("size `{s}` is too large")))
}

// ---------------------------------------------------------------------------
// Bridge peers.

/// Where a bridged connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    Tcp {
        host: String,
        port: u16,
    },
    Udp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    UnixDgram(PathBuf),
    /// Built in: every message comes back unchanged.
    Echo,
    /// A destination behind an agent of the reverse tunnel.
    Agent(wsgate_tunnel::proto::AgentDestination),
}

impl PeerAddr {
    /// Stream peers get a framing function; datagram peers and `echo:` keep
    /// message boundaries as they are.
    pub fn is_stream(&self) -> bool {
        match self {
            PeerAddr::Tcp { .. } | PeerAddr::Unix(_) => true,
            PeerAddr::Agent(a) => a.dest.scheme != wsgate_tunnel::proto::Scheme::Udp,
            _ => false,
        }
    }
}

const PEER_FORMS: &str = "expected tcp://HOST:PORT, udp://HOST:PORT, unix:/PATH, \
     unix-dgram:/PATH, echo: or agent://ID/tcp://HOST:PORT";

impl FromStr for PeerAddr {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ValueError::new(
                ValueKind::Peer,
                format!("invalid peer `{s}`: {why} ({PEER_FORMS})"),
            )
        };
        if s == "echo:" || s == "echo" || s == "echo://" {
            return Ok(PeerAddr::Echo);
        }
        if s.starts_with("agent://") {
            return s
                .parse()
                .map(PeerAddr::Agent)
                .map_err(|e: wsgate_tunnel::proto::ProtoError| bad(&e.to_string()));
        }
        let host_port = |rest: &str| -> Result<(String, u16), ValueError> {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || host.contains('/') {
                return Err(bad("missing host"));
            }
            let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
            if port == 0 {
                return Err(bad("port 0"));
            }
            Ok((host.to_string(), port))
        };
        let path = |rest: &str| -> Result<PathBuf, ValueError> {
            if rest.is_empty() {
                return Err(bad("missing path"));
            }
            Ok(PathBuf::from(rest))
        };
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = host_port(rest)?;
            Ok(PeerAddr::Tcp { host, port })
        } else if let Some(rest) = s.strip_prefix("udp://") {
            let (host, port) = host_port(rest)?;
            Ok(PeerAddr::Udp { host, port })
        } else if let Some(rest) = s
            .strip_prefix("unix-dgram://")
            .or_else(|| s.strip_prefix("unix-dgram:"))
        {
            Ok(PeerAddr::UnixDgram(path(rest)?))
        } else if let Some(rest) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            Ok(PeerAddr::Unix(path(rest)?))
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            PeerAddr::Tcp { host: h, port } => write!(f, "tcp://{}:{port}", host(h)),
            PeerAddr::Udp { host: h, port } => write!(f, "udp://{}:{port}", host(h)),
            PeerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            PeerAddr::UnixDgram(p) => write!(f, "unix-dgram:{}", p.display()),
            PeerAddr::Echo => f.write_str("echo:"),
            PeerAddr::Agent(a) => a.fmt(f),
        }
    }
}

deserialize_from_str!(PeerAddr);

// ---------------------------------------------------------------------------
// Proxy backends.

/// A backend's address, from `ws://HOST:PORT` or `http://HOST:PORT`, or
/// `wss://` / `https://` for a backend spoken to over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
    /// Over TLS, its certificate verified for `host`.
    pub tls: bool,
}

impl FromStr for BackendAddr {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ValueError::new(
                ValueKind::Backend,
                format!(
                    "invalid backend `{s}`: {why} (expected ws://, wss://, http:// or https:// HOST:PORT)"
                ),
            )
        };
        let (rest, tls) = if let Some(r) = s
            .strip_prefix("ws://")
            .or_else(|| s.strip_prefix("http://"))
        {
            (r, false)
        } else if let Some(r) = s
            .strip_prefix("wss://")
            .or_else(|| s.strip_prefix("https://"))
        {
            (r, true)
        } else {
            return Err(bad("unknown scheme"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(bad(
                "a backend URL has no path; the client's path is passed on",
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("bad port"))?)
            }
            _ => (rest, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(BackendAddr {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How a pool chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
}

impl FromStr for Balance {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Balance::RoundRobin),
            "least-connections" => Ok(Balance::LeastConnections),
            _ => Err(ValueError::new(
                ValueKind::Balance,
                format!("unknown balance `{s}` (expected round-robin or least-connections)"),
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Admission rates.

/// The admission limits one listener or route sets for itself; `None` leaves
/// the key to the enclosing scope (`limits::Gates` says who checks what).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeLimits {
    /// New WebSocket handshakes and plain HTTP requests per client.
    pub per_ip_rate: Option<RateSpec>,
    /// Concurrent WebSockets per client.
    pub per_ip_max_connections: Option<usize>,
    /// Concurrent WebSockets through this listener or route.
    pub max_connections: Option<usize>,
}

impl ScopeLimits {
    /// Whether any key is set.
    pub fn sets_any(&self) -> bool {
        *self != Self::default()
    }
}

/// A rate with a burst: `count` events per `period` on average, and up to
/// `burst` at once from an idle start.
///
/// Written `COUNT/UNIT [burst N]`, with UNIT `s`, `m` or `h` (also `sec`,
/// `second`, `min`, `minute`, `hour`): `"20/s"`, `"600/m"`, `"5/s burst 10"`.
/// Without `burst`, the burst is `count` (one period's worth, as `governor`'s
/// quotas do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    count: u32,
    period: Duration,
    burst: u32,
}

/// A rate that does not parse or makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate {input:?}: {problem}; expected COUNT/UNIT [burst N] with UNIT s, m or h, \
     e.g. \"20/s\", \"600/m\" or \"5/s burst 10\""
)]
pub struct RateSpecError {
    input: String,
    problem: &'static str,
}

impl RateSpec {
    /// `count` events per `period`, up to `burst` at once.
    pub fn new(count: u32, period: Duration, burst: u32) -> Result<Self, RateSpecError> {
        let err = |problem| RateSpecError {
            input: format!("{count}/{period:?} burst {burst}"),
            problem,
        };
        if count == 0 {
            return Err(err("the count must be at least 1"));
        }
        if burst == 0 {
            return Err(err("the burst must be at least 1"));
        }
        if period.as_nanos() / u128::from(count) == 0 {
            return Err(err("more than one event per nanosecond"));
        }
        Ok(Self {
            count,
            period,
            burst,
        })
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The average rate in events per second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.period.as_secs_f64()
    }

    /// Time between two events at the average rate (at least 1 ns).
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns())
    }

    pub(crate) fn interval_ns(&self) -> u64 {
        let ns = self.period.as_nanos() / u128::from(self.count);
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }
}

impl FromStr for RateSpec {
    type Err = RateSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |problem| RateSpecError {
            input: s.to_owned(),
            problem,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(err("it is empty"));
        }
        let (rate, burst) = match text.split_once("burst") {
            Some((rate, burst)) => (rate.trim(), Some(burst.trim())),
            None => (text, None),
        };
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| err("there is no '/' between the count and the unit"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| err("the count is not a whole number"))?;
        let secs = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            "" => return Err(err("the unit is missing")),
            _ => return Err(err("the unit is not s, m or h")),
        };
        let burst = match burst {
            None => count,
            Some("") => return Err(err("'burst' needs a number after it")),
            Some(b) => b
                .parse()
                .map_err(|_| err("the burst is not a whole number"))?,
        };
        if count == 0 {
            return Err(err("the count must be at least 1"));
        }
        if burst == 0 {
            return Err(err("the burst must be at least 1"));
        }
        Self::new(count, Duration::from_secs(secs), burst).map_err(|e| err(e.problem))
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s".to_owned(),
            60 => "m".to_owned(),
            3600 => "h".to_owned(),
            _ => format!("{:?}", self.period),
        };
        write!(f, "{}/{} burst {}", self.count, unit, self.burst)
    }
}

deserialize_from_str!(RateSpec);

// ---------------------------------------------------------------------------
// Forwarding headers and address blocks.

/// `X-Forwarded-*` / `Forwarded` policy.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// Add the forwarding headers at all.
    pub enabled: bool,
    /// Clients whose own forwarding headers are believed and appended to.
    pub trusted: Vec<IpNet>,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            enabled: true,
            trusted: vec![],
        }
    }
}

pub use wsgate_tunnel::IpNet;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(
            parse_duration("250ms").unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("off").unwrap(), None);
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1XB").is_err());
    }

    #[test]
    fn parses_every_form() {
        let cases = [
            ("tcp://127.0.0.1:6379", "tcp://127.0.0.1:6379"),
            ("tcp://[::1]:80", "tcp://[::1]:80"),
            ("udp://localhost:53", "udp://localhost:53"),
            ("unix:/run/x.sock", "unix:/run/x.sock"),
            ("unix:///run/x.sock", "unix:/run/x.sock"),
            ("unix-dgram:/run/d.sock", "unix-dgram:/run/d.sock"),
            ("echo:", "echo:"),
            (
                "agent://site-a/tcp://127.0.0.1:6379",
                "agent://site-a/tcp://127.0.0.1:6379",
            ),
        ];
        for (input, shown) in cases {
            let p: PeerAddr = input.parse().unwrap();
            assert_eq!(p.to_string(), shown);
        }
    }

    #[test]
    fn rejects_garbage_with_the_forms() {
        for bad in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://host:x",
            "tcp://:80",
            "http://a:1",
            "unix:",
            "tcp://h:0",
            "agent://site-a",
            "agent://../tcp://h:1",
        ] {
            let e = bad.parse::<PeerAddr>().unwrap_err();
            let e = e.to_string();
            assert!(e.contains("expected tcp://"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_backend_urls() {
        let a: BackendAddr = "ws://10.0.0.5:9000".parse().unwrap();
        assert_eq!(a.to_string(), "10.0.0.5:9000");
        let a: BackendAddr = "http://[::1]:80/".parse().unwrap();
        assert_eq!(a.host, "::1");
        let a: BackendAddr = "http://app".parse().unwrap();
        assert_eq!((a.port, a.tls), (80, false));
        let a: BackendAddr = "wss://app.internal".parse().unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("app.internal", 443, true)
        );
        let a: BackendAddr = "https://10.0.0.5:8443/".parse().unwrap();
        assert_eq!((a.port, a.tls), (8443, true));
        for bad in [
            "wsx://x:1",
            "tcp://x:1",
            "https://x:1/path",
            "http://x:1/path",
            "http://:1",
            "ws://x:port",
        ] {
            assert!(bad.parse::<BackendAddr>().is_err(), "{bad}");
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rate_spec_parses_the_documented_forms() {
        let r: RateSpec = "20/s".parse().unwrap();
        assert_eq!(
            (r.count(), r.period(), r.burst()),
            (20, Duration::from_secs(1), 20)
        );
        assert_eq!(r.interval(), 50 * MS);
        let r: RateSpec = "600/m".parse().unwrap();
        assert_eq!(
            (r.count(), r.period(), r.burst()),
            (600, Duration::from_secs(60), 600)
        );
        assert_eq!(r.per_second(), 10.0);
        let r: RateSpec = "5/s burst 10".parse().unwrap();
        assert_eq!((r.count(), r.burst()), (5, 10));
        let r: RateSpec = "  5 / second   burst  1 ".parse().unwrap();
        assert_eq!((r.count(), r.burst()), (5, 1));
        let r: RateSpec = "1/h".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_secs(3600));
        assert_eq!(r.to_string(), "1/h burst 1");
        assert_eq!(
            "5/s burst 10".parse::<RateSpec>().unwrap().to_string(),
            "5/s burst 10"
        );
    }

    #[test]
    fn rate_spec_rejects_garbage_with_clear_text() {
        for (input, problem) in [
            ("", "it is empty"),
            ("fast", "no '/'"),
            ("20", "no '/'"),
            ("x/s", "count is not a whole number"),
            ("-1/s", "count is not a whole number"),
            ("1.5/s", "count is not a whole number"),
            ("20/", "unit is missing"),
            ("20/d", "not s, m or h"),
            ("0/s", "count must be at least 1"),
            ("5/s burst", "needs a number"),
            ("5/s burst x", "burst is not a whole number"),
            ("5/s burst 0", "burst must be at least 1"),
        ] {
            let e = input.parse::<RateSpec>().unwrap_err().to_string();
            assert!(e.contains(problem), "{input:?}: {e}");
            assert!(e.contains(&format!("{input:?}")), "{input:?}: {e}");
            assert!(e.contains("\"5/s burst 10\""), "{input:?}: {e}");
        }
        assert!(RateSpec::new(2_000_000_000, Duration::from_secs(1), 1).is_err());
    }

    #[test]
    fn rate_spec_deserializes_from_a_string() {
        #[derive(serde::Deserialize)]
        struct T {
            rate: RateSpec,
        }
        let t: T = toml::from_str(r#"rate = "20/s burst 40""#).unwrap();
        assert_eq!((t.rate.count(), t.rate.burst()), (20, 40));
        let e = toml::from_str::<T>(r#"rate = "20 per second""#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("invalid rate"), "{e}");
    }
}
