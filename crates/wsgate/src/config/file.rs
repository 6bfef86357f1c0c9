//! The config file: its TOML shape, and the validation that turns it into a
//! [`Config`]. Every error reads `FILE:LINE:COLUMN: KEY: MESSAGE`.
//!
//! The TOML file is deserialised with `deny_unknown_fields` everywhere; values
//! that have a grammar (peers, framings, durations, sizes, addresses) are
//! parsed during deserialisation, so their errors carry the exact position.
//! Checks that span several keys run afterwards and point at the key they
//! blame. Files the config names (certificates, keys, CAs) are read here too,
//! to be checked, and nothing read is kept: the runtime loads them again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wsgate_framing::FramingSpec;

use super::values::{ByteSize, Dur};
use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default, rename = "listener")]
    listeners: Vec<ListenerFile>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default, rename = "route")]
    routes: Vec<RouteFile>,
    health_path: Option<String>,
    #[serde(default)]
    forwarding: ForwardingFile,
    admin: Option<AdminFile>,
    workers: Option<usize>,
    backend_tls: Option<BackendTlsFile>,
    #[serde(default)]
    tunnel: TunnelFile,
    /// `[auth.NAME]`.
    #[serde(default)]
    auth: BTreeMap<String, AuthFile>,
    cluster: Option<ClusterFile>,
}

/// `[cluster]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    redis: Option<String>,
    node_id: Option<String>,
    advertise: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    lease: Option<Dur>,
    path: Option<String>,
}

/// `[auth.NAME]`: one method; which keys apply depends on its `type`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(rename = "type")]
    kind: String,
    // jwt
    public_key: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    jwks: Option<PathBuf>,
    jwks_url: Option<String>,
    algorithms: Option<Vec<String>>,
    issuers: Option<Vec<String>>,
    audiences: Option<Vec<String>>,
    leeway: Option<Dur>,
    require_exp: Option<bool>,
    max_token_bytes: Option<usize>,
    sources: Option<Vec<String>>,
    subject_claim: Option<String>,
    refresh: Option<Dur>,
    // basic
    htpasswd: Option<PathBuf>,
    realm: Option<String>,
    cache_ttl: Option<Dur>,
    cache_size: Option<usize>,
    // hook
    url: Option<String>,
    send_headers: Option<Vec<String>>,
    copy_headers: Option<Vec<String>>,
    subject_header: Option<String>,
    timeout: Option<Dur>,
    // mtls
    subject: Option<String>,
}

/// `[tunnel]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelFile {
    agent_tokens: Option<PathBuf>,
    agent_path: Option<String>,
    request_path: Option<String>,
    forward_proxy: Option<bool>,
    mux_path: Option<String>,
    #[serde(default)]
    mux_allow: Vec<String>,
    #[serde(default, rename = "forward")]
    forwards: Vec<ForwardFile>,
    keepalive: Option<Dur>,
    open_timeout: Option<Dur>,
    #[serde(default)]
    auth: Vec<String>,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    agent_auth: Vec<String>,
    #[serde(default)]
    agent_ids: Vec<String>,
    #[serde(default)]
    identity_headers: BTreeMap<String, String>,
    deflate: Option<DeflateFile>,
}

/// `[[tunnel.forward]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardFile {
    listen: String,
    to: String,
}

/// `[backend_tls]`: how the gateway verifies (and shows itself to) TLS backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTlsFile {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardingFile {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for ForwardingFile {
    fn default() -> Self {
        Self {
            enabled: true,
            trusted_proxies: vec![],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    address: String,
}

/// One string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    address: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    handshake_timeout: Option<Dur>,
    #[serde(default)]
    limits: LimitsFile,
    client_ca: Option<PathBuf>,
    client_auth: Option<String>,
    crl: Option<OneOrManyPaths>,
}

/// One path or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrManyPaths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_message_size: Option<ByteSize>,
    handshake_timeout: Option<Dur>,
    idle_timeout: Option<Dur>,
    ping_interval: Option<Dur>,
    pong_timeout: Option<Dur>,
    max_connections: Option<usize>,
    connect_timeout: Option<Dur>,
    close_timeout: Option<Dur>,
    drain_timeout: Option<Dur>,
    backend_timeout: Option<Dur>,
    backend_idle_timeout: Option<Dur>,
    max_lifetime: Option<Dur>,
    eject_for: Option<Dur>,
    per_ip_rate: Option<RateSpec>,
    per_ip_max_connections: Option<usize>,
    bandwidth: Option<ByteSize>,
    per_identity_rate: Option<RateSpec>,
    per_identity_max_connections: Option<usize>,
    per_identity_max_streams: Option<usize>,
    per_identity_bandwidth: Option<ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: Option<String>,
    path: Option<String>,
    path_prefix: Option<String>,
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    cookies: BTreeMap<String, String>,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default)]
    protocols: Vec<String>,
    to: Option<PeerAddr>,
    #[serde(rename = "static")]
    static_dir: Option<PathBuf>,
    proxy: Option<OneOrMany>,
    balance: Option<String>,
    framing: Option<String>,
    framing_config: Option<String>,
    discovery: Option<DiscoveryFile>,
    #[serde(default)]
    limits: LimitsFile,
    health_check: Option<String>,
    health_interval: Option<Dur>,
    #[serde(default)]
    auth: Vec<String>,
    #[serde(default)]
    origins: Vec<String>,
    allow_missing_origin: Option<bool>,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    identity_headers: BTreeMap<String, String>,
    #[serde(default)]
    allow: Vec<String>,
    deflate: Option<DeflateFile>,
}

/// `deflate = true|false`, or a `[route.deflate]` (`[tunnel.deflate]`)
/// table: permessage-deflate on a WebSocket the gateway terminates.
#[derive(Debug)]
enum DeflateFile {
    Off,
    On(DeflateTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeflateTable {
    server_no_context_takeover: Option<bool>,
    client_no_context_takeover: Option<bool>,
    server_max_window_bits: Option<Bounded<8, 15>>,
    client_max_window_bits: Option<Bounded<8, 15>>,
    min_size: Option<ByteSize>,
    level: Option<Bounded<0, 9>>,
}

/// An integer from `LO` to `HI`, checked where it is written.
#[derive(Debug, Clone, Copy)]
struct Bounded<const LO: u8, const HI: u8>(u8);

impl<'de, const LO: u8, const HI: u8> Deserialize<'de> for Bounded<LO, HI> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        u8::try_from(n)
            .ok()
            .filter(|n| (LO..=HI).contains(n))
            .map(Bounded)
            .ok_or_else(|| serde::de::Error::custom(format!("must be {LO} to {HI}, not {n}")))
    }
}

impl<'de> Deserialize<'de> for DeflateFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DeflateFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a table of permessage-deflate settings")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<DeflateFile, E> {
                Ok(if on {
                    DeflateFile::On(DeflateTable::default())
                } else {
                    DeflateFile::Off
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DeflateFile, A::Error> {
                DeflateTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(DeflateFile::On)
            }
        }
        d.deserialize_any(V)
    }
}

impl DeflateFile {
    /// The settings, or `None` when off.
    fn settings(self) -> Option<wsframe::deflate::Config> {
        let DeflateFile::On(t) = self else {
            return None;
        };
        let d = wsframe::deflate::Config::default();
        Some(wsframe::deflate::Config {
            server_no_context_takeover: t
                .server_no_context_takeover
                .unwrap_or(d.server_no_context_takeover),
            client_no_context_takeover: t
                .client_no_context_takeover
                .unwrap_or(d.client_no_context_takeover),
            server_max_window_bits: t
                .server_max_window_bits
                .map_or(d.server_max_window_bits, |b| b.0),
            client_max_window_bits: t
                .client_max_window_bits
                .map_or(d.client_max_window_bits, |b| b.0),
            min_size: t.min_size.map_or(d.min_size, |s| s.0 as usize),
            level: t.level.map_or(d.level, |l| l.0),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoveryFile {
    #[serde(rename = "type")]
    kind: String,
    lookups: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

/// Checks a templated identity rule: its placeholders, and — with each
/// filled by a plain name — that it is an allow pattern (`pattern`) or a
/// glob of plain characters (peers, agent ids).
fn check_identity_pattern(p: &str, pattern: bool) -> Result<(), String> {
    wsgate_auth::template::check(p)?;
    // A stand-in that fits a name, a port and an address octet alike.
    let filled = wsgate_auth::template::expand(p, |_| Some("1".into()))
        .ok_or_else(|| format!("`{p}`: a placeholder is not closed"))?;
    if pattern {
        check_mux_allow(std::slice::from_ref(&filled)).map_err(|e| format!("`{p}`: {e}"))
    } else if filled.is_empty() || filled.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("`{p}` is not a glob"))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Loading.

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&file, &text, path.parent().unwrap_or(Path::new(".")))
}

/// Parses and validates configuration text. Relative paths in it are taken
/// relative to `base`.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let de = toml::Deserializer::new(text);
    let raw: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = inner
            .span()
            .map(|s| line_col(text, s.start))
            .unwrap_or((1, 1));
        let key = if key == "." { String::new() } else { key };
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line,
            column,
            key,
            message: inner.message().trim().to_string(),
        }])
    })?;
    let mut v = Validator {
        file,
        text,
        errors: vec![],
    };
    let config = v.build(raw, base);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(v.errors))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `base` with the keys `l` sets replaced.
fn merge_limits(base: &Limits, l: &LimitsFile) -> Limits {
    let d = base;
    Limits {
        max_message_size: l.max_message_size.map_or(d.max_message_size, |b| b.0),
        handshake_timeout: l.handshake_timeout.map_or(d.handshake_timeout, |x| {
            x.0.unwrap_or(Duration::from_secs(3600))
        }),
        idle_timeout: l.idle_timeout.map_or(d.idle_timeout, |x| x.0),
        ping_interval: l.ping_interval.map_or(d.ping_interval, |x| x.0),
        pong_timeout: l.pong_timeout.and_then(|x| x.0).unwrap_or(d.pong_timeout),
        max_connections: l.max_connections.unwrap_or(d.max_connections),
        connect_timeout: l
            .connect_timeout
            .and_then(|x| x.0)
            .unwrap_or(d.connect_timeout),
        close_timeout: l.close_timeout.and_then(|x| x.0).unwrap_or(d.close_timeout),
        drain_timeout: l.drain_timeout.and_then(|x| x.0).unwrap_or(d.drain_timeout),
        backend_timeout: l
            .backend_timeout
            .and_then(|x| x.0)
            .unwrap_or(d.backend_timeout),
        backend_idle_timeout: l
            .backend_idle_timeout
            .map_or(d.backend_idle_timeout, |x| x.0),
        max_lifetime: l.max_lifetime.map_or(d.max_lifetime, |x| x.0),
        eject_for: l.eject_for.and_then(|x| x.0).unwrap_or(d.eject_for),
        per_ip_rate: l.per_ip_rate.or(d.per_ip_rate),
        per_ip_max_connections: l.per_ip_max_connections.or(d.per_ip_max_connections),
        bandwidth: l
            .bandwidth
            .map_or(d.bandwidth, |b| Some(b.0).filter(|b| *b > 0)),
        per_identity_rate: l.per_identity_rate.or(d.per_identity_rate),
        per_identity_max_connections: l
            .per_identity_max_connections
            .or(d.per_identity_max_connections),
        per_identity_max_streams: l.per_identity_max_streams.or(d.per_identity_max_streams),
        per_identity_bandwidth: l
            .per_identity_bandwidth
            .map_or(d.per_identity_bandwidth, |b| Some(b.0).filter(|b| *b > 0)),
    }
}

impl LimitsFile {
    /// Whether any key is set.
    fn sets_any(&self) -> bool {
        *self != LimitsFile::default()
    }
}

/// Takes the admission keys out of a listener's or route's limits: they are
/// not merged into [`Limits`] but counted by a gate of that listener's or
/// route's own (`limits::Gates`).
fn take_scope_limits(l: &mut LimitsFile) -> ScopeLimits {
    ScopeLimits {
        per_ip_rate: l.per_ip_rate.take(),
        per_ip_max_connections: l.per_ip_max_connections.take(),
        max_connections: l.max_connections.take(),
    }
}

/// Limits that belong to the whole gateway, not to one route or listener.
fn global_only_keys(l: &LimitsFile) -> Vec<&'static str> {
    [
        ("handshake_timeout", l.handshake_timeout.is_some()),
        ("drain_timeout", l.drain_timeout.is_some()),
        ("eject_for", l.eject_for.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect()
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    /// Records an error at `key` of the `index`-th `[[table]]` (or at the
    /// table header when the key is not written in the file).
    fn error(&mut self, table: &str, index: usize, key: &str, message: String) {
        let (line, column) = self.locate(table, index, key);
        let key_path = if key.is_empty() {
            format!("{table}[{index}]")
        } else {
            format!("{table}[{index}].{key}")
        };
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            key: key_path,
            message,
        });
    }

    /// Reports every key of the `index`-th `[[table]]`'s `[table.limits]`
    /// that belongs to the whole gateway (or, for `handshake_timeout`, to a
    /// listener), saying where it goes instead.
    fn misplaced_limits(&mut self, table: &str, index: usize, l: &LimitsFile) {
        for key in global_only_keys(l) {
            let message = match (key, table) {
                ("handshake_timeout", "listener") => {
                    "set a listener's handshake timeout on the listener itself \
                     (handshake_timeout = ...), not in [listener.limits]"
                        .to_string()
                }
                ("handshake_timeout", _) => {
                    "a route is chosen once the request head is read, too late for its \
                     timeout: set handshake_timeout on a [[listener]] or in [limits]"
                        .to_string()
                }
                _ => format!("`{key}` applies to the whole gateway: set it in [limits]"),
            };
            self.error(table, index, &format!("limits.{key}"), message);
        }
    }

    fn locate(&self, table: &str, index: usize, key: &str) -> (usize, usize) {
        let header = format!("[[{table}]]");
        let lines: Vec<&str> = self.text.lines().collect();
        let mut seen = 0;
        for (i, l) in lines.iter().enumerate() {
            if l.trim() != header {
                continue;
            }
            if seen == index {
                if !key.is_empty() {
                    let sub = format!("[{table}.");
                    // `limits.max_connections` is written `max_connections`
                    // in `[route.limits]`.
                    let key = key.rsplit('.').next().unwrap_or(key);
                    for (j, k) in lines.iter().enumerate().skip(i + 1) {
                        let t = k.trim_start();
                        // This entry's own sub-tables (`[route.limits]`) are
                        // searched too; any other table ends the entry.
                        if t.starts_with('[') && !t.starts_with(&sub) {
                            break;
                        }
                        if let Some(rest) = t.strip_prefix(key) {
                            if rest.trim_start().starts_with('=') {
                                return (j + 1, k.len() - t.len() + 1);
                            }
                        }
                    }
                }
                return (i + 1, 1);
            }
            seen += 1;
        }
        (1, 1)
    }

    fn build(&mut self, raw: FileConfig, base: &Path) -> Config {
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let mut listeners = vec![];
        // Each listener's `[listener.limits]`, applied between the gateway's
        // and a route's own.
        let mut listener_limits = vec![];
        for (i, mut l) in raw.listeners.into_iter().enumerate() {
            let admission = take_scope_limits(&mut l.limits);
            self.misplaced_limits("listener", i, &l.limits);
            listener_limits.push(l.limits.clone());
            let tls = match (l.tls_cert, l.tls_key) {
                (Some(cert), Some(key)) => {
                    let (cert, key) = (resolve(cert), resolve(key));
                    // Load them now: a missing file or a key that does not
                    // belong to the certificate is a configuration error.
                    if let Err(e) = crate::tls::acceptor(&cert, &key, &[], None) {
                        self.error("listener", i, "tls_cert", format!("{e:#}"));
                    }
                    Some(TlsFiles { cert, key })
                }
                (None, None) => None,
                (Some(_), None) => {
                    self.error(
                        "listener",
                        i,
                        "tls_cert",
                        "tls_cert needs tls_key too".into(),
                    );
                    None
                }
                (None, Some(_)) => {
                    self.error(
                        "listener",
                        i,
                        "tls_key",
                        "tls_key needs tls_cert too".into(),
                    );
                    None
                }
            };
            let client_auth =
                self.client_auth(i, &tls, l.client_ca, l.client_auth, l.crl, &resolve);
            if !l.address.contains(':') {
                self.error(
                    "listener",
                    i,
                    "address",
                    format!("`{}` is not HOST:PORT", l.address),
                );
            }
            listeners.push(ListenerConfig {
                address: l.address,
                tls,
                handshake_timeout: l
                    .handshake_timeout
                    .map(|d| d.0.unwrap_or(Duration::from_secs(3600))),
                admission,
                client_auth,
            });
        }
        if listeners.is_empty() {
            self.errors.push(ConfigError {
                file: self.file.to_string(),
                line: 1,
                column: 1,
                key: "listener".into(),
                message: "no [[listener]] configured".into(),
            });
        }

        let limits = merge_limits(&Limits::default(), &raw.limits);

        let mut trusted = vec![];
        for t in &raw.forwarding.trusted_proxies {
            match t.parse::<IpNet>() {
                Ok(n) => trusted.push(n),
                Err(e) => self.errors.push(ConfigError {
                    file: self.file.to_string(),
                    line: self.key_line("trusted_proxies"),
                    column: 1,
                    key: "forwarding.trusted_proxies".into(),
                    message: e.to_string(),
                }),
            }
        }
        let forwarding = Forwarding {
            enabled: raw.forwarding.enabled,
            trusted,
        };

        let auth = self.auth_methods(raw.auth, &resolve);
        let mut routes = vec![];
        let any_listener_limits = listener_limits.iter().any(LimitsFile::sets_any);
        for (i, mut r) in raw.routes.into_iter().enumerate() {
            let admission = take_scope_limits(&mut r.limits);
            let own = r.limits.clone();
            if let Some(mut route) = self.route(i, r, base, &limits) {
                route.admission = admission;
                if any_listener_limits {
                    route.limits_by_listener = listener_limits
                        .iter()
                        .map(|l| merge_limits(&merge_limits(&limits, l), &own))
                        .collect();
                }
                routes.push(route);
            }
        }
        let tunnel = self.tunnel(raw.tunnel, &resolve);
        self.check_auth_use(&auth, &routes, &tunnel, &listeners);
        if routes.is_empty() && self.errors.is_empty() && !(tunnel.agents() || tunnel.mux()) {
            self.errors.push(ConfigError {
                file: self.file.to_string(),
                line: 1,
                column: 1,
                key: "route".into(),
                message: "no [[route]] configured".into(),
            });
        }
        let health_path = raw.health_path.unwrap_or_else(|| "/healthz".into());
        let backend_tls = raw.backend_tls.and_then(|t| self.backend_tls(t, &resolve));
        if let Some(n) = raw.workers {
            if !(1..=MAX_WORKERS).contains(&n) {
                self.errors.push(ConfigError {
                    file: self.file.to_string(),
                    line: self.key_line("workers"),
                    column: 1,
                    key: "workers".into(),
                    message: format!("must be between 1 and {MAX_WORKERS}, not {n}"),
                });
            }
        }
        let agent_peers = routes
            .iter()
            .any(|r| matches!(&r.target, Target::Static(PeerAddr::Agent(_))));
        if agent_peers && !tunnel.agents() {
            let i = routes
                .iter()
                .position(|r| matches!(&r.target, Target::Static(PeerAddr::Agent(_))))
                .unwrap_or(0);
            self.error(
                "route",
                i,
                "to",
                "an agent:// peer needs agents: set [tunnel] agent_tokens or agent_auth".into(),
            );
        }
        let cluster = raw.cluster.and_then(|c| self.cluster(c, &tunnel, &resolve));
        Config {
            listeners,
            limits,
            routes,
            health_path,
            forwarding,
            admin: raw.admin.map(|a| a.address),
            workers: raw.workers,
            backend_tls,
            tunnel,
            auth,
            cluster,
        }
    }

    /// Records an error at `key` of a plain table `[table]` (at the table's
    /// header when the key is not written).
    fn table_error(&mut self, table: &str, key: &str, message: String) {
        let header = format!("[{table}]");
        let lines: Vec<&str> = self.text.lines().collect();
        let mut at = (1, 1);
        if let Some(i) = lines.iter().position(|l| l.trim() == header) {
            at = (i + 1, 1);
            for (j, l) in lines.iter().enumerate().skip(i + 1) {
                let t = l.trim_start();
                if t.starts_with('[') {
                    break;
                }
                if let Some(rest) = t.strip_prefix(key).filter(|_| !key.is_empty()) {
                    if rest.trim_start().starts_with('=') {
                        at = (j + 1, l.len() - t.len() + 1);
                        break;
                    }
                }
            }
        }
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: at.0,
            column: at.1,
            key: if key.is_empty() {
                table.to_string()
            } else {
                format!("{table}.{key}")
            },
            message,
        });
    }

    /// Checks `[cluster]`: every key but `lease` and `path` is required
    /// (the secret as `secret` or `secret_file`, read now); it needs agents.
    fn cluster(
        &mut self,
        c: ClusterFile,
        tunnel: &Tunnel,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Option<Cluster> {
        let before = self.errors.len();
        let required = |v: &mut Self, key: &str, value: Option<String>, what: &str| {
            if value.is_none() {
                v.table_error("cluster", key, format!("required: {what}"));
            }
            value.unwrap_or_default()
        };
        let redis = required(
            self,
            "redis",
            c.redis,
            "the Redis URL, e.g. \"redis://127.0.0.1:6379/0\"",
        );
        let node_id = required(
            self,
            "node_id",
            c.node_id,
            "this node's id, unique in the cluster",
        );
        let advertise = required(
            self,
            "advertise",
            c.advertise,
            "where other nodes dial this one, e.g. \"ws://10.0.0.1:8080\"",
        );
        if !redis.is_empty() {
            if let Err(e) = check_redis_url(&redis) {
                self.table_error("cluster", "redis", e);
            }
        }
        if !node_id.is_empty() && !wsgate_tunnel::proto::valid_id(&node_id) {
            self.table_error(
                "cluster",
                "node_id",
                format!(
                    "invalid node id `{node_id}`: 1-64 of A-Z a-z 0-9 . _ -, not starting with `.`"
                ),
            );
        }
        if !advertise.is_empty() {
            if let Err(e) = check_advertise(&advertise) {
                self.table_error("cluster", "advertise", e);
            }
        }
        let secret = match (c.secret, c.secret_file) {
            (Some(s), None) => Some(ClusterSecret::Inline(s)),
            (None, Some(p)) => Some(ClusterSecret::File(resolve(p))),
            (Some(_), Some(_)) => {
                self.table_error(
                    "cluster",
                    "secret_file",
                    "give `secret` or `secret_file`, not both".into(),
                );
                None
            }
            (None, None) => {
                self.table_error(
                    "cluster",
                    "secret",
                    "required: the secret node links prove (`secret`, or `secret_file`)".into(),
                );
                None
            }
        };
        if let Some(s) = &secret {
            if let Err(e) = s.load() {
                let key = match s {
                    ClusterSecret::Inline(_) => "secret",
                    ClusterSecret::File(_) => "secret_file",
                };
                self.table_error("cluster", key, e);
            }
        }
        let lease = match c.lease {
            None => Duration::from_secs(5),
            Some(Dur(Some(d))) if d >= Duration::from_secs(1) && d <= Duration::from_secs(300) => d,
            Some(_) => {
                self.table_error(
                    "cluster",
                    "lease",
                    "must be between 1s and 5m (entries are renewed every third of it)".into(),
                );
                Duration::from_secs(5)
            }
        };
        let path = match c.path {
            None => "/cluster".to_string(),
            Some(p) if p.starts_with('/') => p,
            Some(p) => {
                self.table_error("cluster", "path", format!("`{p}` must start with `/`"));
                p
            }
        };
        if !tunnel.agents() {
            self.table_error(
                "cluster",
                "",
                "a cluster shares agents: set [tunnel] agent_tokens or agent_auth".into(),
            );
        } else if [&tunnel.agent_path, &tunnel.request_path, &tunnel.mux_path].contains(&&path) {
            self.table_error(
                "cluster",
                "path",
                format!("`{path}` is already a [tunnel] path"),
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Cluster {
            redis,
            node_id,
            advertise,
            secret: secret?,
            lease,
            path,
        })
    }

    /// Checks `[tunnel]`: the token file is read and parsed now (its bad
    /// line is named), patterns and forwards parsed, paths checked.
    fn tunnel(&mut self, t: TunnelFile, resolve: &dyn Fn(PathBuf) -> PathBuf) -> Tunnel {
        let fail = |v: &mut Self, key: &str, message: String| {
            v.errors.push(ConfigError {
                file: v.file.to_string(),
                line: v.key_line(key),
                column: 1,
                key: format!("tunnel.{key}"),
                message,
            });
        };
        let d = Tunnel::default();
        let agent_tokens = t.agent_tokens.map(resolve);
        if let Some(p) = &agent_tokens {
            if let Err(e) = check_tokens(p) {
                fail(self, "agent_tokens", e);
            }
        }
        let path = |v: &mut Self, key: &str, p: Option<String>, default: String| match p {
            Some(p) if !p.starts_with('/') => {
                fail(v, key, format!("`{p}` must start with `/`"));
                default
            }
            Some(p) => p,
            None => default,
        };
        let agent_path = path(self, "agent_path", t.agent_path, d.agent_path);
        let request_path = path(self, "request_path", t.request_path, d.request_path);
        let mux_path = path(self, "mux_path", t.mux_path, d.mux_path);
        if let Err(e) = check_mux_allow(&t.mux_allow) {
            fail(self, "mux_allow", e);
        }
        let mut forwards = vec![];
        for (i, f) in t.forwards.into_iter().enumerate() {
            match Forward::new(&f.listen, &f.to) {
                Ok(f) => forwards.push(f),
                Err(e) => self.error("tunnel.forward", i, "to", e.to_string()),
            }
        }
        let tunnel_auth = RouteAuth {
            methods: t.auth,
            subjects: t.subjects,
            allow: t.allow,
            identity_headers: t
                .identity_headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            ..RouteAuth::default()
        };
        for (h, field) in &tunnel_auth.identity_headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                fail(
                    self,
                    "identity_headers",
                    format!("`{h}` is not a header name"),
                );
            }
            if let Err(e) = super::auth::check_identity_field(field) {
                fail(self, "identity_headers", e);
            }
        }
        for (key, items) in [("allow", &tunnel_auth.allow), ("agent_ids", &t.agent_ids)] {
            for item in items {
                if let Err(e) = check_identity_pattern(item, key == "allow") {
                    fail(self, key, e);
                }
            }
        }
        if !t.agent_auth.is_empty() && t.agent_ids.is_empty() {
            fail(
                self,
                "agent_auth",
                "agent_auth needs agent_ids: the ids an identity may register, e.g. \
                 [\"{cert:cn}\"]"
                    .into(),
            );
        }
        if !forwards.is_empty() && agent_tokens.is_none() && t.agent_auth.is_empty() {
            self.error(
                "tunnel.forward",
                0,
                "to",
                "forwarding through agents needs agents: set [tunnel] agent_tokens".into(),
            );
        }
        Tunnel {
            agent_tokens,
            agent_path,
            request_path,
            forward_proxy: t.forward_proxy.unwrap_or(d.forward_proxy),
            mux_path,
            mux_allow: t.mux_allow,
            forwards,
            keepalive: t.keepalive.and_then(|k| k.0).unwrap_or(d.keepalive),
            open_timeout: t.open_timeout.and_then(|k| k.0).unwrap_or(d.open_timeout),
            auth: tunnel_auth,
            agent_auth: t.agent_auth,
            agent_ids: t.agent_ids,
            deflate: t.deflate.and_then(DeflateFile::settings),
        }
    }

    /// Checks `[backend_tls]` now (the files are read, then dropped): an
    /// unreadable CA or a key that does not belong to its certificate is a
    /// configuration error.
    fn backend_tls(
        &mut self,
        t: BackendTlsFile,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Option<BackendTlsFiles> {
        let mut fail = |key: &str, message: String| {
            self.errors.push(ConfigError {
                file: self.file.to_string(),
                line: self.key_line(key),
                column: 1,
                key: format!("backend_tls.{key}"),
                message,
            });
        };
        let identity = match (t.cert, t.key) {
            (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
            (None, None) => None,
            (Some(_), None) => {
                fail("cert", "cert needs key too".into());
                return None;
            }
            (None, Some(_)) => {
                fail("key", "key needs cert too".into());
                return None;
            }
        };
        let files = BackendTlsFiles {
            ca: t.ca.map(resolve),
            identity,
        };
        let identity = files
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        match crate::tls::backend_client_config(files.ca.as_deref(), identity) {
            Ok(_) => Some(files),
            Err(e) => {
                let message = format!("{e:#}");
                let names = |p: &PathBuf| message.contains(&*p.to_string_lossy());
                let key = match &files.identity {
                    Some((c, k)) if names(c) || names(k) => "cert",
                    _ => "ca",
                };
                fail(key, message);
                None
            }
        }
    }

    /// Records an error at `key` of `[auth.NAME]`.
    fn auth_error(&mut self, name: &str, key: &str, message: String) {
        let header = format!("[auth.{name}]");
        let lines: Vec<&str> = self.text.lines().collect();
        let mut at = (1, 1);
        if let Some(i) = lines.iter().position(|l| l.trim() == header) {
            at = (i + 1, 1);
            for (j, l) in lines.iter().enumerate().skip(i + 1) {
                let t = l.trim_start();
                if t.starts_with('[') {
                    break;
                }
                if let Some(rest) = t.strip_prefix(key) {
                    if !key.is_empty() && rest.trim_start().starts_with('=') {
                        at = (j + 1, l.len() - t.len() + 1);
                        break;
                    }
                }
            }
        }
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: at.0,
            column: at.1,
            key: if key.is_empty() {
                format!("auth.{name}")
            } else {
                format!("auth.{name}.{key}")
            },
            message,
        });
    }

    /// Checks `[auth.NAME]` tables: each type's keys, and the files they
    /// name (read now, then dropped: the runtime reads them again).
    fn auth_methods(
        &mut self,
        raw: BTreeMap<String, AuthFile>,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Vec<AuthMethod> {
        use super::auth::{Basic, JwtKeys, Mtls};
        let mut out = vec![];
        for (name, a) in raw {
            let before = self.errors.len();
            if name.is_empty()
                || name == "origin"
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                self.auth_error(
                    &name,
                    "",
                    "a method's name is letters, digits, `_` and `-` (and not `origin`)".into(),
                );
                continue;
            }
            let set: Vec<&str> = [
                ("public_key", a.public_key.is_some()),
                ("secret_file", a.secret_file.is_some()),
                ("jwks", a.jwks.is_some()),
                ("jwks_url", a.jwks_url.is_some()),
                ("algorithms", a.algorithms.is_some()),
                ("issuers", a.issuers.is_some()),
                ("audiences", a.audiences.is_some()),
                ("leeway", a.leeway.is_some()),
                ("require_exp", a.require_exp.is_some()),
                ("max_token_bytes", a.max_token_bytes.is_some()),
                ("sources", a.sources.is_some()),
                ("subject_claim", a.subject_claim.is_some()),
                ("refresh", a.refresh.is_some()),
                ("htpasswd", a.htpasswd.is_some()),
                ("realm", a.realm.is_some()),
                ("cache_ttl", a.cache_ttl.is_some()),
                ("cache_size", a.cache_size.is_some()),
                ("url", a.url.is_some()),
                ("send_headers", a.send_headers.is_some()),
                ("copy_headers", a.copy_headers.is_some()),
                ("subject_header", a.subject_header.is_some()),
                ("timeout", a.timeout.is_some()),
                ("subject", a.subject.is_some()),
            ]
            .into_iter()
            .filter_map(|(k, on)| on.then_some(k))
            .collect();
            let allowed: &[&str] = match a.kind.as_str() {
                "jwt" => &[
                    "public_key",
                    "secret_file",
                    "jwks",
                    "jwks_url",
                    "algorithms",
                    "issuers",
                    "audiences",
                    "leeway",
                    "require_exp",
                    "max_token_bytes",
                    "sources",
                    "subject_claim",
                    "refresh",
                ],
                "basic" => &["htpasswd", "realm", "cache_ttl", "cache_size"],
                "hook" => &[
                    "url",
                    "send_headers",
                    "copy_headers",
                    "subject_header",
                    "timeout",
                    "cache_ttl",
                    "cache_size",
                ],
                "mtls" => &["subject"],
                other => {
                    let m = format!("unknown type `{other}` (expected jwt, basic, hook or mtls)");
                    self.auth_error(&name, "type", m);
                    continue;
                }
            };
            for k in set.iter().filter(|k| !allowed.contains(k)) {
                let m = format!("`{k}` does not apply to type `{}`", a.kind);
                self.auth_error(&name, k, m);
            }
            let cache_ttl = a
                .cache_ttl
                .map_or(Duration::from_secs(300), |d| d.0.unwrap_or_default());
            let cache_size = a.cache_size.unwrap_or(10_000);
            let kind = match a.kind.clone().as_str() {
                "jwt" => self.jwt_method(&name, a, resolve),
                "basic" => match a.htpasswd {
                    Some(p) => Some(AuthKind::Basic(Basic {
                        htpasswd: resolve(p),
                        realm: a.realm.unwrap_or_else(|| "wsgate".into()),
                        cache_ttl,
                        cache_size,
                    })),
                    None => {
                        self.auth_error(&name, "type", "a basic method needs htpasswd".into());
                        None
                    }
                },
                "hook" => self.hook_method(&name, a, cache_ttl, cache_size),
                _ => {
                    let subject = a.subject.unwrap_or_else(|| "cn".into());
                    if !wsgate_auth::cert::FIELDS.contains(&subject.as_str()) {
                        self.auth_error(
                            &name,
                            "subject",
                            format!("`{subject}` is not cn, dns, uri or email"),
                        );
                    }
                    Some(AuthKind::Mtls(Mtls { subject }))
                }
            };
            let Some(kind) = kind else { continue };
            if self.errors.len() == before {
                if let Err(e) = super::auth::check_method_files(&kind) {
                    let key = match &kind {
                        AuthKind::Jwt(j) => match j.keys {
                            JwtKeys::Pem(_) => "public_key",
                            JwtKeys::Secret(_) => "secret_file",
                            _ => "jwks",
                        },
                        _ => "htpasswd",
                    };
                    self.auth_error(&name, key, e);
                }
            }
            out.push(AuthMethod { name, kind });
        }
        out
    }

    /// A `type = "jwt"` method: exactly one key source, algorithms, token
    /// sources.
    fn jwt_method(
        &mut self,
        name: &str,
        a: AuthFile,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Option<AuthKind> {
        use super::auth::{Jwt, JwtKeys};
        let keys = match (a.public_key, a.secret_file, a.jwks, a.jwks_url) {
            (Some(p), None, None, None) => Some(JwtKeys::Pem(resolve(p))),
            (None, Some(p), None, None) => Some(JwtKeys::Secret(resolve(p))),
            (None, None, Some(p), None) => Some(JwtKeys::JwksFile(resolve(p))),
            (None, None, None, Some(u)) => {
                self.check_http_url(name, "jwks_url", &u);
                Some(JwtKeys::JwksUrl(u))
            }
            _ => {
                self.auth_error(
                    name,
                    "type",
                    "a jwt method needs exactly one of public_key, secret_file, \
                     jwks and jwks_url"
                        .into(),
                );
                None
            }
        };
        for alg in a.algorithms.iter().flatten() {
            if let Err(e) = wsgate_auth::jwt::parse_algorithm(alg) {
                self.auth_error(name, "algorithms", e.to_string());
            }
        }
        let mut sources = vec![];
        for src in a.sources.unwrap_or_else(|| vec!["bearer".into()]) {
            match src.parse::<TokenSource>() {
                Ok(t) => sources.push(t),
                Err(e) => self.auth_error(name, "sources", e),
            }
        }
        if sources.is_empty() {
            self.auth_error(name, "sources", "no token source".into());
        }
        keys.map(|keys| {
            AuthKind::Jwt(Jwt {
                keys,
                algorithms: a.algorithms.unwrap_or_default(),
                issuers: a.issuers.unwrap_or_default(),
                audiences: a.audiences.unwrap_or_default(),
                leeway: a
                    .leeway
                    .map_or(Duration::from_secs(30), |d| d.0.unwrap_or_default()),
                require_exp: a.require_exp.unwrap_or(true),
                max_token_bytes: a.max_token_bytes.unwrap_or(8192),
                sources,
                subject_claim: a.subject_claim.unwrap_or_else(|| "sub".into()),
                refresh: a
                    .refresh
                    .and_then(|d| d.0)
                    .unwrap_or(Duration::from_secs(300))
                    .max(Duration::from_secs(1)),
            })
        })
    }

    /// A `type = "hook"` method: its URL and header names.
    fn hook_method(
        &mut self,
        name: &str,
        a: AuthFile,
        cache_ttl: Duration,
        cache_size: usize,
    ) -> Option<AuthKind> {
        use super::auth::Hook;
        match a.url {
            Some(u) => {
                self.check_http_url(name, "url", &u);
                let lower = |v: Option<Vec<String>>| {
                    v.unwrap_or_default()
                        .into_iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect::<Vec<_>>()
                };
                let send = lower(
                    a.send_headers
                        .or_else(|| Some(vec!["authorization".into(), "cookie".into()])),
                );
                let copy = lower(a.copy_headers);
                // Each bad name is reported at its own key.
                let named = [
                    ("send_headers", &send[..]),
                    ("copy_headers", &copy[..]),
                    ("subject_header", a.subject_header.as_slice()),
                ];
                for (key, names) in named {
                    for h in names {
                        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                            self.auth_error(name, key, format!("`{h}` is not a header name"));
                        }
                    }
                }
                Some(AuthKind::Hook(Hook {
                    url: u,
                    send_headers: send,
                    copy_headers: copy,
                    subject_header: a.subject_header.map(|h| h.to_ascii_lowercase()),
                    timeout: a
                        .timeout
                        .and_then(|d| d.0)
                        .unwrap_or(Duration::from_secs(5)),
                    cache_ttl,
                    cache_size,
                }))
            }
            None => {
                self.auth_error(name, "type", "a hook method needs url".into());
                None
            }
        }
    }

    /// Records an error at `key` unless `u` is an http:// or https:// URL.
    fn check_http_url(&mut self, name: &str, key: &str, u: &str) {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || u.parse::<http::Uri>().is_err()
        {
            self.auth_error(
                name,
                key,
                format!("`{u}` is not an http:// or https:// URL"),
            );
        }
    }

    /// A listener's client certificates: the CA and CRLs read now.
    fn client_auth(
        &mut self,
        i: usize,
        tls: &Option<TlsFiles>,
        ca: Option<PathBuf>,
        mode: Option<String>,
        crl: Option<OneOrManyPaths>,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Option<ClientAuth> {
        let Some(ca) = ca else {
            for (key, set) in [("client_auth", mode.is_some()), ("crl", crl.is_some())] {
                if set {
                    self.error("listener", i, key, format!("`{key}` needs client_ca"));
                }
            }
            return None;
        };
        if tls.is_none() {
            self.error(
                "listener",
                i,
                "client_ca",
                "client certificates need TLS: set tls_cert and tls_key".into(),
            );
        }
        let required = match mode.as_deref() {
            None | Some("required") => true,
            Some("optional") => false,
            Some(m) => {
                let m = format!("`{m}` is not \"required\" or \"optional\"");
                self.error("listener", i, "client_auth", m);
                true
            }
        };
        let ca = resolve(ca);
        if let Err(e) = crate::tls::check_client_ca(&ca) {
            self.error("listener", i, "client_ca", format!("{e:#}"));
        }
        let crls: Vec<PathBuf> = match crl {
            None => vec![],
            Some(OneOrManyPaths::One(p)) => vec![resolve(p)],
            Some(OneOrManyPaths::Many(v)) => v.into_iter().map(resolve).collect(),
        };
        for c in &crls {
            if let Err(e) = super::auth::check_crl(c) {
                self.error("listener", i, "crl", e);
            }
        }
        Some(ClientAuth { ca, required, crls })
    }

    /// A route's `origins`, `subjects`, `identity_headers` and `allow`.
    fn route_auth(&mut self, i: usize, a: RouteAuth) -> RouteAuth {
        if let Err(e) = wsgate_auth::origin::Origins::parse(&a.origins) {
            self.error("route", i, "origins", e);
        }
        for (h, field) in &a.identity_headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                self.error(
                    "route",
                    i,
                    "identity_headers",
                    format!("`{h}` is not a header name"),
                );
            }
            if let Err(e) = super::auth::check_identity_field(field) {
                self.error("route", i, "identity_headers", e);
            }
        }
        for p in &a.allow {
            if let Err(e) = check_identity_pattern(p, false) {
                self.error("route", i, "allow", e);
            }
        }
        a
    }

    /// Every method a route or the tunnel names exists; an `mtls` method
    /// has a listener with client certificates.
    fn check_auth_use(
        &mut self,
        methods: &[AuthMethod],
        routes: &[Route],
        tunnel: &Tunnel,
        listeners: &[ListenerConfig],
    ) {
        let find = |n: &str| methods.iter().find(|m| m.name == n);
        let mtls_listener = listeners.iter().any(|l| l.client_auth.is_some());
        let check = |v: &mut Self, names: &[String], at: &dyn Fn(&mut Self, String)| {
            for n in names {
                match find(n) {
                    None => at(v, format!("no method `{n}`: define it in [auth.{n}]")),
                    Some(m) if matches!(m.kind, AuthKind::Mtls(_)) && !mtls_listener => at(
                        v,
                        format!(
                            "method `{n}` reads client certificates: give a [[listener]] \
                             client_ca"
                        ),
                    ),
                    Some(_) => {}
                }
            }
        };
        for (i, r) in routes.iter().enumerate() {
            check(self, &r.auth.methods, &|v, m| {
                v.error("route", i, "auth", m)
            });
        }
        let tunnel_at = |key: &'static str| {
            move |v: &mut Self, message: String| {
                v.errors.push(ConfigError {
                    file: v.file.to_string(),
                    line: v.key_line(key),
                    column: 1,
                    key: format!("tunnel.{key}"),
                    message,
                })
            }
        };
        check(self, &tunnel.auth.methods, &tunnel_at("auth"));
        check(self, &tunnel.agent_auth, &tunnel_at("agent_auth"));
    }

    /// The line of the first `key =` in the file (for keys of plain tables).
    fn key_line(&self, key: &str) -> usize {
        self.text
            .lines()
            .position(|l| l.trim_start().starts_with(key))
            .map_or(1, |i| i + 1)
    }

    fn route(&mut self, i: usize, r: RouteFile, base: &Path, limits: &Limits) -> Option<Route> {
        let before = self.errors.len();
        for (key, p) in [("path", &r.path), ("path_prefix", &r.path_prefix)] {
            if let Some(p) = p {
                if !p.starts_with('/') {
                    self.error("route", i, key, format!("`{p}` must start with `/`"));
                }
            }
        }
        if r.path.is_some() && r.path_prefix.is_some() {
            self.error(
                "route",
                i,
                "path_prefix",
                "give either path (exact) or path_prefix, not both".into(),
            );
        }
        for p in &r.protocols {
            if p.is_empty() || p.contains([',', ' ']) {
                self.error(
                    "route",
                    i,
                    "protocols",
                    format!("invalid subprotocol `{p}`"),
                );
            }
        }
        let framing = match FramingSpec::parse(
            r.framing.as_deref().unwrap_or("auto"),
            r.framing_config.as_deref().unwrap_or(""),
        ) {
            Ok(f) => Some(f),
            Err(e) => {
                let key = if r.framing_config.is_some() && r.framing.is_some() {
                    "framing_config"
                } else {
                    "framing"
                };
                self.error("route", i, key, e.to_string());
                None
            }
        };
        let balance = match r.balance.as_deref().map(str::parse::<Balance>) {
            None => Balance::RoundRobin,
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                self.error("route", i, "balance", e.to_string());
                Balance::RoundRobin
            }
        };
        self.misplaced_limits("route", i, &r.limits);
        let route_limits = merge_limits(limits, &r.limits);
        let health_check = match (&r.health_check, r.proxy.is_some()) {
            (Some(p), true) if p.starts_with('/') => Some((
                p.clone(),
                r.health_interval
                    .and_then(|d| d.0)
                    .unwrap_or(Duration::from_secs(5)),
            )),
            (Some(p), true) => {
                self.error(
                    "route",
                    i,
                    "health_check",
                    format!("`{p}` must start with `/`"),
                );
                None
            }
            (Some(_), false) => {
                self.error(
                    "route",
                    i,
                    "health_check",
                    "`health_check` applies to `proxy` routes only".into(),
                );
                None
            }
            (None, _) => None,
        };
        if r.balance.is_some() && r.proxy.is_none() {
            self.error(
                "route",
                i,
                "balance",
                "`balance` applies to `proxy` routes only".into(),
            );
        }
        let target = match (r.to, r.discovery, r.proxy, r.static_dir) {
            (None, None, None, Some(dir)) => {
                let dir = if dir.is_relative() {
                    base.join(dir)
                } else {
                    dir
                };
                match std::fs::metadata(&dir) {
                    Ok(m) if m.is_dir() => Some(Target::Files(dir)),
                    Ok(_) => {
                        let m = format!("`{}` is not a directory", dir.display());
                        self.error("route", i, "static", m);
                        None
                    }
                    Err(e) => {
                        let m = format!("cannot read `{}`: {e}", dir.display());
                        self.error("route", i, "static", m);
                        None
                    }
                }
            }
            (None, None, Some(p), None) => {
                let urls = match p {
                    OneOrMany::One(u) => vec![u],
                    OneOrMany::Many(v) => v,
                };
                let mut addrs = vec![];
                for u in &urls {
                    match u.parse::<BackendAddr>() {
                        Ok(a) => addrs.push(a),
                        Err(e) => self.error("route", i, "proxy", e.to_string()),
                    }
                }
                if urls.is_empty() {
                    self.error("route", i, "proxy", "an empty backend list".into());
                }
                (!addrs.is_empty()).then_some(Target::Proxy(Backends { addrs, balance }))
            }
            (Some(peer), None, None, None) => Some(Target::Static(peer)),
            (None, Some(d), None, None) => {
                if d.kind != "file" {
                    self.error(
                        "route",
                        i,
                        "type",
                        format!("unknown discovery type `{}` (expected `file`)", d.kind),
                    );
                    None
                } else if d.lookups.is_empty() {
                    self.error(
                        "route",
                        i,
                        "lookups",
                        "discovery needs at least one lookup".into(),
                    );
                    None
                } else if let Some(e) = d.lookups.iter().find_map(|l| check_lookup(l).err()) {
                    self.error("route", i, "lookups", e);
                    None
                } else {
                    Some(Target::Discovery(Discovery {
                        lookups: d.lookups,
                        allow: d.allow,
                        base: base.to_path_buf(),
                    }))
                }
            }
            (None, None, None, None) => {
                self.error(
                    "route",
                    i,
                    "",
                    "route needs a peer: `to = \"tcp://host:port\"`, a [route.discovery] table, \
                     `proxy = \"ws://host:port\"` or `static = \"dir\"`"
                        .into(),
                );
                None
            }
            _ => {
                self.error(
                    "route",
                    i,
                    "to",
                    "give only one of `to`, `proxy`, `static` and a [route.discovery] table".into(),
                );
                None
            }
        };
        let deflate = r.deflate.and_then(DeflateFile::settings);
        if deflate.is_some() && matches!(target, Some(Target::Proxy(_) | Target::Files(_))) {
            self.error(
                "route",
                i,
                "deflate",
                "`deflate` applies to routes the gateway terminates (`to`, [route.discovery]); \
                 a proxy route passes permessage-deflate through to its backend"
                    .into(),
            );
        }
        let auth = self.route_auth(
            i,
            RouteAuth {
                methods: r.auth,
                origins: r.origins,
                allow_missing_origin: r.allow_missing_origin.unwrap_or(true),
                subjects: r.subjects,
                identity_headers: r
                    .identity_headers
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
                allow: r.allow,
            },
        );
        if self.errors.len() != before {
            return None;
        }
        Some(Route {
            name: r.name.unwrap_or_else(|| format!("route{i}")),
            matcher: Matcher {
                path: r.path,
                path_prefix: r.path_prefix,
                host: r.host.map(|h| h.to_ascii_lowercase()),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
                cookies: r.cookies,
                query: r.query,
            },
            protocols: r.protocols,
            target: target?,
            framing: framing?,
            limits: route_limits,
            limits_by_listener: vec![],
            admission: Default::default(),
            health_check,
            auth,
            deflate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse("t.toml", text, Path::new("."))
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn listener_limits_sit_between_the_gateways_and_a_routes() {
        let c = parse(
            "t.toml",
            r#"
[limits]
idle_timeout = "10s"

[[listener]]
address = "127.0.0.1:0"
[listener.limits]
idle_timeout = "1s"
max_lifetime = "1h"

[[listener]]
address = "127.0.0.1:0"

[[route]]
name = "plain"
path_prefix = "/a"
to = "echo:"

[[route]]
name = "own"
path_prefix = "/"
to = "echo:"
[route.limits]
idle_timeout = "5s"
"#,
            Path::new("."),
        )
        .unwrap();
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
        let (plain, own) = (&c.routes[0], &c.routes[1]);
        assert_eq!(secs(plain.limits_for(0).idle_timeout), Some(1));
        assert_eq!(secs(plain.limits_for(0).max_lifetime), Some(3600));
        assert_eq!(secs(plain.limits_for(1).idle_timeout), Some(10));
        assert_eq!(secs(plain.limits_for(1).max_lifetime), None);
        // The route's own value wins over the listener's.
        assert_eq!(secs(own.limits_for(0).idle_timeout), Some(5));
        assert_eq!(secs(own.limits_for(0).max_lifetime), Some(3600));
        assert_eq!(secs(own.limits_for(1).idle_timeout), Some(5));
        // Without listener limits nothing is precomputed.
        let c = parse(
            "t.toml",
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\npath_prefix = \"/\"\nto = \"echo:\"\n",
            Path::new("."),
        )
        .unwrap();
        assert!(c.routes[0].limits_by_listener.is_empty());
        assert_eq!(
            c.routes[0].limits_for(0).idle_timeout,
            c.limits.idle_timeout
        );
    }

    #[test]
    fn auth_method_errors_name_file_line_and_key() {
        // `[auth.x]` is line 4 of each text, its `type` line 5, the keys after
        // it lines 6 and 7.
        let head = "[[listener]]\naddress = \"127.0.0.1:0\"\n\n";
        for (table, want) in [
            (
                "type = \"jwt\"\njwks_url = \"ftp://idp/keys\"\n",
                "t.toml:6:1: auth.x.jwks_url: `ftp://idp/keys` is not an http:// or https:// URL",
            ),
            (
                "type = \"jwt\"\njwks = \"k.json\"\njwks_url = \"https://idp/keys\"\n",
                "t.toml:5:1: auth.x.type: a jwt method needs exactly one of public_key, \
                 secret_file, jwks and jwks_url",
            ),
            (
                "type = \"jwt\"\nsecret_file = \"s\"\nsources = [\"carrier-pigeon\"]\n",
                "t.toml:7:1: auth.x.sources: ",
            ),
            (
                "type = \"hook\"\nurl = \"not a url\"\n",
                "t.toml:6:1: auth.x.url: `not a url` is not an http:// or https:// URL",
            ),
            (
                "type = \"hook\"\nsend_headers = [\"bad header\"]\n",
                "t.toml:5:1: auth.x.type: a hook method needs url",
            ),
            (
                "type = \"hook\"\nurl = \"http://h/check\"\nsend_headers = [\"bad header\"]\n",
                "t.toml:7:1: auth.x.send_headers: `bad header` is not a header name",
            ),
            (
                "type = \"hook\"\nurl = \"http://h/check\"\ncopy_headers = [\"x:y\"]\n",
                "t.toml:7:1: auth.x.copy_headers: `x:y` is not a header name",
            ),
            (
                "type = \"hook\"\nurl = \"http://h/check\"\nsubject_header = \"x user\"\n",
                "t.toml:7:1: auth.x.subject_header: `x user` is not a header name",
            ),
            (
                "type = \"basic\"\nrealm = \"r\"\n",
                "t.toml:5:1: auth.x.type: a basic method needs htpasswd",
            ),
            (
                "type = \"mtls\"\nurl = \"http://h\"\n",
                "t.toml:6:1: auth.x.url: `url` does not apply to type `mtls`",
            ),
            (
                "type = \"saml\"\n",
                "t.toml:5:1: auth.x.type: unknown type `saml` (expected jwt, basic, hook or mtls)",
            ),
        ] {
            let text = format!("{head}[auth.x]\n{table}");
            let e = errors(&text);
            assert!(e.iter().any(|m| m.starts_with(want)), "{want}\n{e:?}");
        }
    }

    #[test]
    fn gateway_wide_limits_are_refused_on_a_listener() {
        let e = errors(
            r#"
[[listener]]
address = "127.0.0.1:0"
[listener.limits]
drain_timeout = "10s"
handshake_timeout = "1s"

[[route]]
path_prefix = "/"
to = "echo:"
"#,
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter().any(
                |m| m.starts_with("t.toml:5:1: listener[0].limits.drain_timeout: ")
                    && m.contains("set it in [limits]")
            ),
            "{e:?}"
        );
        assert!(
            e.iter().any(
                |m| m.starts_with("t.toml:6:1: listener[0].limits.handshake_timeout: ")
                    && m.contains("on the listener itself")
            ),
            "{e:?}"
        );
    }

    #[test]
    fn admission_limits_belong_to_their_listener_or_route() {
        let c = parse(
            "t.toml",
            r#"
[limits]
per_ip_rate = "20/s"
max_connections = 100

[[listener]]
address = "127.0.0.1:0"
[listener.limits]
per_ip_max_connections = 4
max_connections = 50

[[listener]]
address = "127.0.0.1:0"

[[route]]
path = "/a"
to = "echo:"
[route.limits]
per_ip_rate = "1/s burst 2"
max_connections = 3
idle_timeout = "1s"

[[route]]
path_prefix = "/"
to = "echo:"
"#,
            Path::new("."),
        )
        .unwrap();
        let listener = ScopeLimits {
            per_ip_rate: None,
            per_ip_max_connections: Some(4),
            max_connections: Some(50),
        };
        assert_eq!(c.listeners[0].admission, listener);
        assert!(!c.listeners[1].admission.sets_any());
        let a = &c.routes[0].admission;
        assert_eq!(a.per_ip_rate, Some("1/s burst 2".parse().unwrap()));
        assert_eq!(a.max_connections, Some(3));
        assert_eq!(a.per_ip_max_connections, None);
        assert!(!c.routes[1].admission.sets_any());
        // Not merged into the per-connection limits: those stay the gateway's.
        for r in &c.routes {
            for l in 0..2 {
                assert_eq!(r.limits_for(l).max_connections, 100);
                assert_eq!(r.limits_for(l).per_ip_rate, c.limits.per_ip_rate);
                assert_eq!(r.limits_for(l).per_ip_max_connections, None);
            }
        }
        assert_eq!(
            c.routes[0].limits_for(1).idle_timeout,
            Some(Duration::from_secs(1))
        );
        // Garbage there names file, line and key like anywhere else.
        let e = errors(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\npath_prefix = \"/\"\nto = \"echo:\"\n\
             [route.limits]\nper_ip_rate = \"lots\"\nmax_connections = -1\n",
        );
        assert!(
            e.len() == 1 && e[0].starts_with("t.toml:7:15: route[0].limits.per_ip_rate: "),
            "{e:?}"
        );
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            "t.toml",
            r#"
health_path = "/health"
[limits]
max_message_size = "1MiB"
idle_timeout = "5m"
ping_interval = "30s"
max_connections = 100

[[listener]]
address = "127.0.0.1:0"

[[route]]
path = "/redis"
protocols = ["redis"]
to = "tcp://127.0.0.1:6379"
framing = "resp"

[[route]]
path_prefix = "/lines/"
headers = { "X-Tenant" = "acme" }
to = "unix:/tmp/s.sock"
framing = "lines"
framing_config = 'separator=\r\n'
"#,
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.limits.max_message_size, 1 << 20);
        assert_eq!(c.limits.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[1].matcher.headers["x-tenant"], "acme");
        assert_eq!(c.health_path, "/health");
    }

    /// A config with agents and the given `[cluster]` table.
    fn with_cluster(dir: &Path, table: &str) -> String {
        let tokens = dir.join("agents.txt");
        std::fs::write(&tokens, "site-a 0123456789abcdef\n").unwrap();
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[tunnel]\nagent_tokens = \"{}\"\n{table}",
            tokens.display()
        )
    }

    #[test]
    fn a_cluster_table_is_read_with_its_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.key"), "0123456789abcdef0123\n").unwrap();
        let text = with_cluster(
            dir.path(),
            "[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\nnode_id = \"node-a\"\n\
             advertise = \"ws://10.0.0.1:8080\"\nsecret_file = \"s.key\"\n",
        );
        let c = parse("t.toml", &text, dir.path()).unwrap().cluster.unwrap();
        assert_eq!(
            (c.node_id.as_str(), c.path.as_str(), c.lease),
            ("node-a", "/cluster", Duration::from_secs(5))
        );
        assert_eq!(c.secret.load().unwrap(), b"0123456789abcdef0123");
        // No [cluster]: no cluster.
        let text = with_cluster(dir.path(), "");
        assert!(parse("t.toml", &text, dir.path())
            .unwrap()
            .cluster
            .is_none());
    }

    #[test]
    fn cluster_errors_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let ok = "redis = \"redis://127.0.0.1:6379/0\"\nnode_id = \"node-a\"\n\
                  advertise = \"ws://10.0.0.1:8080\"\nsecret = \"0123456789abcdef\"\n";
        // In with_cluster's text `[cluster]` is line 5, and `ok`'s keys
        // lines 6 to 9.
        for (table, want) in [
            (
                "redis = \"redis://h\"\n",
                "t.toml:5:1: cluster.node_id: required",
            ),
            (
                &*ok.replace("node-a", "../a"),
                "t.toml:7:1: cluster.node_id: invalid node id `../a`",
            ),
            (
                &*ok.replace("ws://10.0.0.1:8080", "ws://10.0.0.1:8080/x"),
                "t.toml:8:1: cluster.advertise: `ws://10.0.0.1:8080/x`: give HOST:PORT only",
            ),
            (
                &*ok.replace("ws://10.0.0.1:8080", "http://h:1"),
                "cluster.advertise: `http://h:1` is not a ws:// or wss:// URL",
            ),
            (
                &*ok.replace("ws://10.0.0.1:8080", "ws://h"),
                "cluster.advertise: `ws://h` needs HOST:PORT",
            ),
            (
                &*ok.replace("redis://127.0.0.1:6379/0", "rediss://h"),
                "t.toml:6:1: cluster.redis: `rediss://h`: TLS to Redis",
            ),
            (
                &*ok.replace("redis://127.0.0.1:6379/0", "http://h"),
                "cluster.redis: `http://h` is not a redis:// URL",
            ),
            (
                &*ok.replace("0123456789abcdef", "short"),
                "t.toml:9:1: cluster.secret: the secret has 5 bytes: at least 16",
            ),
            (
                &format!("{ok}secret_file = \"x\"\n"),
                "cluster.secret_file: give `secret` or `secret_file`, not both",
            ),
            (
                &*ok.replace("secret = \"0123456789abcdef\"", "secret_file = \"missing\""),
                "cluster.secret_file: cannot read",
            ),
            (
                &*ok.replace("secret = \"0123456789abcdef\"\n", ""),
                "cluster.secret: required",
            ),
            (
                &format!("{ok}lease = \"100ms\"\n"),
                "cluster.lease: must be between 1s and 5m",
            ),
            (
                &format!("{ok}path = \"/agent\"\n"),
                "cluster.path: `/agent` is already a [tunnel] path",
            ),
            (
                &format!("{ok}path = \"x\"\n"),
                "cluster.path: `x` must start with `/`",
            ),
            (&format!("{ok}nodes = 3\n"), "unknown field `nodes`"),
        ] {
            let text = with_cluster(dir.path(), &format!("[cluster]\n{table}"));
            let errs = parse("t.toml", &text, dir.path()).unwrap_err().to_string();
            assert!(errs.contains(want), "{table}\nwant {want}\ngot  {errs}");
        }
        // A cluster shares agents: without any, it is an error.
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nto = \"echo:\"\n[cluster]\n{ok}"
        );
        let errs = parse("t.toml", &text, dir.path()).unwrap_err().to_string();
        assert!(
            errs.contains("t.toml:5:1: cluster: a cluster shares agents"),
            "{errs}"
        );
    }

    #[test]
    fn workers_are_counted_and_checked() {
        let base = "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nto = \"echo:\"\n";
        let c = parse("t.toml", &format!("workers = 4\n{base}"), Path::new(".")).unwrap();
        assert_eq!(c.workers, Some(4));
        let c = parse("t.toml", base, Path::new(".")).unwrap();
        assert_eq!(c.workers, None);
        let e = errors(&format!("# comment\nworkers = 0\n{base}"));
        assert!(
            e[0].starts_with("t.toml:2:1: workers: must be between 1 and"),
            "{e:?}"
        );
        let e = errors(&format!("workers = -1\n{base}"));
        assert!(e[0].starts_with("t.toml:1:"), "{e:?}");
    }

    #[test]
    fn deflate_is_a_switch_or_a_table_on_terminated_routes() {
        let base = "[[listener]]\naddress = \"127.0.0.1:1\"\n";
        let c = parse(
            "t.toml",
            &format!(
                "{base}[[route]]\npath = \"/a\"\nto = \"echo:\"\ndeflate = true\n\
                 [[route]]\npath = \"/b\"\nto = \"echo:\"\ndeflate = false\n\
                 [[route]]\npath = \"/c\"\nto = \"tcp://127.0.0.1:9\"\n[route.deflate]\n\
                 server_no_context_takeover = true\nclient_max_window_bits = 9\n\
                 min_size = \"1KiB\"\nlevel = 1\n\
                 [tunnel]\nmux_allow = [\"tcp://127.0.0.1:*\"]\ndeflate = {{ server_max_window_bits = 8 }}\n"
            ),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            c.routes[0].deflate,
            Some(wsframe::deflate::Config::default())
        );
        assert_eq!(c.routes[1].deflate, None);
        let d = c.routes[2].deflate.unwrap();
        assert!(d.server_no_context_takeover && !d.client_no_context_takeover);
        assert_eq!(
            (d.client_max_window_bits, d.min_size, d.level),
            (9, 1024, 1)
        );
        assert_eq!(c.tunnel.deflate.unwrap().server_max_window_bits, 8);

        let e = errors(&format!(
            "{base}[[route]]\npath = \"/c\"\nto = \"echo:\"\n[route.deflate]\nserver_max_window_bits = 7\n"
        ));
        assert_eq!(
            e,
            ["t.toml:7:26: route[0].deflate.server_max_window_bits: must be 8 to 15, not 7"]
        );
        let e = errors(&format!(
            "{base}[[route]]\npath = \"/c\"\nto = \"echo:\"\n[route.deflate]\nwindow = 9\n"
        ));
        assert!(
            e[0].starts_with("t.toml:7:1: route[0].deflate.window: unknown field `window`"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{base}[[route]]\npath = \"/c\"\nto = \"echo:\"\ndeflate = 1\n"
        ));
        assert!(
            e[0].starts_with("t.toml:6:11: route[0].deflate: invalid type"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{base}[[route]]\npath = \"/p\"\nproxy = \"ws://127.0.0.1:9\"\ndeflate = true\n"
        ));
        assert!(
            e[0].starts_with(
                "t.toml:6:1: route[0].deflate: `deflate` applies to routes the gateway terminates"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = errors("[[listener]]\naddress = \"127.0.0.1:1\"\nbogus = 1\n");
        assert!(e[0].starts_with("t.toml:3:1: listener[0]"), "{e:?}");
        assert!(e[0].contains("unknown field `bogus`"), "{e:?}");
    }

    #[test]
    fn bad_peer_points_at_value() {
        let e = errors("[[listener]]\naddress = \"127.0.0.1:1\"\n[[route]]\nto = \"tcp:/nope\"\n");
        assert!(e[0].starts_with("t.toml:4:6: route[0].to: "), "{e:?}");
        assert!(e[0].contains("tcp:/nope"), "{e:?}");
    }

    #[test]
    fn cross_field_errors_are_all_reported() {
        let e = errors(
            "[[listener]]\naddress = \"127.0.0.1:1\"\n[[route]]\npath = \"x\"\nto = \"echo:\"\nframing = \"nope\"\n[[route]]\npath = \"/y\"\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("t.toml:4:1: route[0].path: "), "{e:?}");
        assert!(
            e[1].starts_with("t.toml:6:1: route[0].framing: unknown framing"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("t.toml:7:1: route[1]: route needs a peer"),
            "{e:?}"
        );
    }

    #[test]
    fn proxy_routes_with_pools_limits_and_health() {
        let c = parse(
            "t.toml",
            r#"
[[listener]]
address = "127.0.0.1:0"
[limits]
idle_timeout = "1m"
per_ip_rate = "20/s burst 40"
[forwarding]
trusted_proxies = ["10.0.0.0/8"]
[admin]
address = "127.0.0.1:0"
[[route]]
path = "/chat"
proxy = ["ws://127.0.0.1:9000", "ws://127.0.0.1:9001"]
balance = "least-connections"
health_check = "/health"
[route.limits]
idle_timeout = "5s"
max_lifetime = "1h"
[[route]]
path_prefix = "/"
proxy = "http://127.0.0.1:8000"
"#,
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            c.routes[0].limits.idle_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            c.routes[1].limits.idle_timeout,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            c.routes[0].limits.max_lifetime,
            Some(Duration::from_secs(3600))
        );
        assert!(c.routes[0].health_check.is_some());
        assert!(matches!(&c.routes[0].target, Target::Proxy(p) if p.addrs.len() == 2));
        assert_eq!(c.admin.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(c.forwarding.trusted.len(), 1);
        assert!(c.limits.per_ip_rate.is_some());
    }

    #[test]
    fn proxy_route_errors() {
        let e = errors(
            "[[listener]]\naddress = \"127.0.0.1:1\"\n[[route]]\nproxy = \"wsx://x:1\"\n\
             [[route]]\nto = \"echo:\"\nbalance = \"random\"\n\
             [[route]]\nproxy = \"ws://a:1\"\n[route.limits]\neject_for = \"5s\"\nhandshake_timeout = \"1s\"\n",
        );
        assert!(
            e[0].contains("route[0].proxy: invalid backend `wsx://x:1`"),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|x| x.contains("route[1].balance: unknown balance")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|x| x.contains("`eject_for` applies to the whole gateway")),
            "{e:?}"
        );
        // Pointed at the key's own line in `[route.limits]`.
        assert!(
            e.iter()
                .any(|x| x.starts_with("t.toml:11:1: route[2].limits.eject_for: ")),
            "{e:?}"
        );
        assert!(
            e.iter().any(
                |x| x.starts_with("t.toml:12:1: route[2].limits.handshake_timeout: ")
                    && x.contains("set handshake_timeout on a [[listener]] or in [limits]")
            ),
            "{e:?}"
        );
    }

    #[test]
    fn garbage_in_listener_limits_names_file_line_and_key() {
        let e = errors(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.limits]\nidle_timeout = \"soon\"\n\
             [[route]]\npath_prefix = \"/\"\nto = \"echo:\"\n",
        );
        assert!(
            e.len() == 1
                && e[0]
                    .starts_with("t.toml:4:16: listener[0].limits.idle_timeout: invalid duration"),
            "{e:?}"
        );
        let e = errors(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.limits]\nidle_timout = \"1s\"\n\
             [[route]]\npath_prefix = \"/\"\nto = \"echo:\"\n",
        );
        assert!(
            e.len() == 1
                && e[0].starts_with("t.toml:4:1: listener[0].limits.idle_timout: unknown field"),
            "{e:?}"
        );
    }

    #[test]
    fn backend_tls_table() {
        let route = "[[listener]]\naddress = \"127.0.0.1:1\"\n[[route]]\nproxy = \"wss://x:1\"\n";
        let c = parse("t.toml", route, Path::new(".")).unwrap();
        assert!(c.backend_tls.is_none(), "built-in roots by default");
        let e = errors(&format!("{route}[backend_tls]\ncert = \"c.pem\"\n"));
        assert!(
            e[0].contains("t.toml:6:1: backend_tls.cert: cert needs key too"),
            "{e:?}"
        );
        let e = errors(&format!("{route}[backend_tls]\nca = \"nope.pem\"\n"));
        assert!(
            e[0].contains("t.toml:6:1: backend_tls.ca: cannot read"),
            "{e:?}"
        );
        let e = errors(&format!("{route}[backend_tls]\nverify = false\n"));
        assert!(e[0].contains("unknown field `verify`"), "{e:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in [
            "\u{0}\u{1}",
            "[[route]",
            "route = 5",
            "[[listener]]\naddress = 5",
            "[limits]\nmax_message_size = \"-1\"",
        ] {
            assert!(parse("t.toml", text, Path::new(".")).is_err(), "{text:?}");
        }
    }
}
