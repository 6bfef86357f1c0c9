//! The reverse tunnel's gateway side: agents behind NAT dial out and
//! register under an id; the gateway relays HTTP requests, TCP connections
//! and UDP flows through them, each as one wsmux stream (`docs/tunnel.md`).
//!
//! The wire format and the allow patterns are the `wsgate-tunnel` crate's
//! (sans-IO, shared with `wsgate agent` and the fuzz targets), re-exported
//! here as [`proto`] and [`allow`]. The rest, by role:
//!
//! * [`registry`]: the agent connections this gateway holds, and opening a
//!   stream through one (least loaded first, retried on another connection
//!   when one dies before its agent answered);
//! * [`agents`]: serving a registered agent's WebSocket;
//! * [`http`]: `/request` and the forward proxy (absolute-form requests and
//!   CONNECT), HTTP/1.1 spoken over a stream;
//! * [`forward`]: `--forward` TCP and UDP listeners;
//! * [`mux`]: `/mux`, streams a client opens to any allowed destination;
//! * [`splice`], [`datagram`]: copying bytes and datagrams between a stream
//!   and a socket.
//!
//! Every request that reaches these goes through the request path's phases
//! (`open.rs`) like any other: routed, admitted, authenticated (an agent by
//! its token), then connected here.

use std::sync::Arc;
use std::time::Duration;

use ::http::request::Parts;

pub use wsgate_tunnel::{allow, proto};

pub mod agents;
pub mod datagram;
pub mod forward;
pub mod http;
pub mod mux;
pub mod registry;
pub mod splice;

use crate::auth::rules::Rules;
use crate::auth::{AuthRequest, AuthSet, Chain, Identity, IdentityHeaders};
use crate::config;
use crate::error::{Error, Kind};
use crate::limits::identity::{IdentityGate, IdentityPermit};
use crate::metrics::Metrics;
use allow::AllowList;
use proto::Destination;
use registry::{AgentStream, Registry};
use wsgate_tunnel::tokens::{Tokens, Verdict};

/// The tunnel's runtime: the registry, the token file, the `/mux` rules.
pub struct Tunnel {
    pub registry: Arc<Registry>,
    tokens: Tokens,
    pub mux_allow: AllowList,
    pub config: config::Tunnel,
    pub metrics: Metrics,
    /// `[tunnel] auth`: `/request`, the forward proxy and `/mux`.
    chain: Option<Arc<Chain>>,
    /// `[tunnel] agent_auth`, and the ids such an identity may register.
    agent_chain: Option<Arc<Chain>>,
    agent_ids: Rules,
    /// `[tunnel] allow`: what an identity's streams may reach.
    rules: Rules,
    /// `[tunnel] identity_headers`: set on `/request` and forward-proxy
    /// requests (client copies removed).
    pub identity_headers: IdentityHeaders,
    /// Per-subject stream caps (`per_identity_max_streams`).
    identities: Arc<IdentityGate>,
    stream_cap: Option<usize>,
}

/// The wsmux settings of agent and `/mux` sessions: keepalive every
/// `keepalive`, a link silent for two of them is dead; up to 4,096 streams,
/// and receive windows of at most 1 GiB in all (a stream's window is 256 KiB
/// to start: a stalled reader holds at most its window).
///
/// wsmux sends a PING one interval after the last answer and declares the
/// peer dead `keepalive_timeout` after the later of that PING and the last
/// frame received: a timeout of one interval is what makes "two intervals"
/// (as `wsgate agent` does).
pub fn mux_config(keepalive: Duration) -> wsmux::Config {
    wsmux::Config {
        keepalive_interval: Some(keepalive),
        keepalive_timeout: keepalive,
        max_streams: 4096,
        accept_backlog: 1024,
        max_session_memory: 1 << 30,
        ..wsmux::Config::default()
    }
}

impl Tunnel {
    /// The runtime of `config` (the token file is read here); a reload
    /// passes the running `registry`, so registered agents stay.
    pub fn new(
        config: &config::Tunnel,
        metrics: Metrics,
        auth: &AuthSet,
        identities: Arc<IdentityGate>,
        stream_cap: Option<usize>,
        registry: Option<Arc<Registry>>,
    ) -> anyhow::Result<Tunnel> {
        use anyhow::Context as _;
        let tokens = match &config.agent_tokens {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                Tokens::parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", p.display()))?
            }
            None => Tokens::default(),
        };
        Ok(Tunnel {
            registry: registry.unwrap_or_default(),
            tokens,
            mux_allow: AllowList::parse(&config.mux_allow)?,
            config: config.clone(),
            metrics,
            chain: auth.chain(&config.auth),
            agent_chain: auth.chain(&config::RouteAuth {
                methods: config.agent_auth.clone(),
                ..config::RouteAuth::default()
            }),
            agent_ids: Rules(config.agent_ids.clone()),
            rules: Rules(config.auth.allow.clone()),
            identity_headers: IdentityHeaders::new(&config.auth, auth),
            identities,
            stream_cap,
        })
    }

    /// The authentication phase of `/request`, the forward proxy and
    /// `/mux`: `[tunnel] auth`, or anonymous.
    pub async fn authenticate(&self, req: AuthRequest<'_>) -> Result<Identity, Error> {
        match &self.chain {
            Some(c) => c.run(req).await,
            None => Ok(Identity::anonymous()),
        }
    }

    /// What `identity`'s streams may reach (`[tunnel] allow` filled from
    /// it); `None`: no rule of its own.
    pub fn stream_rules(&self, identity: &Identity) -> Option<AllowList> {
        self.rules.allow_list(identity)
    }

    /// Checks one stream's destination against the identity's rules, and
    /// takes one of its stream slots (held by the permit).
    pub fn admit_stream(
        &self,
        identity: &Identity,
        rules: Option<&AllowList>,
        dest: &Destination,
        via: &'static str,
    ) -> Result<Option<IdentityPermit>, Error> {
        if rules.is_some_and(|r| !r.may_permit(dest)) {
            self.metrics.tunnel_stream(via, "not_allowed");
            return Err(Error::client(
                Kind::Forbidden,
                format!("{dest} is not allowed for this identity"),
            ));
        }
        match &identity.subject {
            Some(s) => self.identities.admit(s, None, self.stream_cap, true),
            None => Ok(None),
        }
    }

    /// One stream slot of `subject` (`per_identity_max_streams`).
    pub fn identities_admit(&self, subject: &Arc<str>) -> Result<Option<IdentityPermit>, Error> {
        self.identities.admit(subject, None, self.stream_cap, true)
    }

    /// The authentication phase of an agent's registration: a token of the
    /// token file that owns the id, or an identity of `agent_auth` whose
    /// `agent_ids` cover it.
    pub async fn authenticate_agent(&self, req: AuthRequest<'_>) -> Result<Identity, Error> {
        let head = req.head;
        let id = head
            .headers
            .get(proto::ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .trim();
        let credential = bearer(head).map(registry::token_fingerprint);
        if self.registry.is_revoked(id, credential.as_deref()) {
            self.metrics.auth("-", "revoked");
            return Err(Error::client(
                Kind::Forbidden,
                format!("agent id `{id}` or its token is revoked"),
            ));
        }
        let token_known = self.config.agent_tokens.is_some()
            && bearer(head).is_some_and(|t| self.tokens.knows(t));
        if token_known || self.agent_chain.is_none() {
            return self.authenticate_agent_token(head);
        }
        let chain = self.agent_chain.as_ref().expect("checked above");
        let identity = chain.run(req).await?;
        let id = head
            .headers
            .get(proto::ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if self.agent_ids.permits_glob(&identity, id) {
            Ok(identity)
        } else {
            self.metrics.auth(
                identity.method.as_deref().unwrap_or("-"),
                "agent_id_not_allowed",
            );
            Err(Error::client(
                Kind::Forbidden,
                format!("this identity may not register agent id `{id}`"),
            ))
        }
    }

    /// The authentication phase of an agent's registration: its Bearer token
    /// must own the id it registers (401 without a known token, 403 for an
    /// id the token does not own).
    fn authenticate_agent_token(&self, head: &Parts) -> Result<Identity, Error> {
        let challenge = "Bearer realm=\"wsgate-agent\"";
        let token = bearer(head);
        let Some(token) = token else {
            return Err(Error::client(
                Kind::Unauthenticated,
                "an agent registers with `Authorization: Bearer TOKEN`",
            )
            .challenge(challenge));
        };
        let id = head
            .headers
            .get(proto::ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match self.tokens.check(token, id) {
            Verdict::Owns => Ok(Identity::subject(id)),
            Verdict::UnknownToken => {
                Err(Error::client(Kind::Unauthenticated, "unknown agent token")
                    .challenge(challenge))
            }
            Verdict::NotOwner => Err(Error::client(
                Kind::Forbidden,
                format!("this token may not register agent id `{id}`"),
            )),
        }
    }

    /// Opens a stream to `dest` through agent `id` (or any agent whose allow
    /// list covers it), counting its outcome under `via`.
    pub async fn open(
        &self,
        id: Option<&str>,
        dest: &Destination,
        via: &'static str,
    ) -> Result<AgentStream, Error> {
        let r = self.registry.open(id, dest, self.config.open_timeout).await;
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => e.kind.label().unwrap_or("failed"),
        };
        self.metrics.tunnel_stream(via, outcome);
        r
    }
}

/// The `Authorization: Bearer` token of a request.
pub(crate) fn bearer(head: &Parts) -> Option<&str> {
    head.headers
        .get(::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
}
