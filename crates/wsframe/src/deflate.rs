//! permessage-deflate (RFC 7692), sans-IO: the negotiation (offers parsed,
//! the answer built) and a connection's compressor and decompressor.
//!
//! A connection's life with the extension:
//!
//! 1. **Handshake.** The server reads every `Sec-WebSocket-Extensions` value
//!    of the request ([`negotiate`]): offers are tried in the client's
//!    order, the first whose parameters are valid and fit the server's
//!    [`Config`] is accepted, and its answer ([`Agreed::response`]) goes in
//!    the 101. An offer with an unknown parameter, a repeated one, a value
//!    out of range or a syntax error is declined (RFC 7692 §7: "MUST
//!    decline"), never answered 400: the client then gets an uncompressed
//!    WebSocket. A client offers with [`client_offer`] and checks the
//!    answer with [`accept_response`].
//! 2. **Messages.** The sender compresses a whole message with a sync flush
//!    and strips the trailing `00 00 ff ff` ([`Deflater::encode`]), setting
//!    RSV1 on the message's first frame; messages under
//!    [`Config::min_size`] go uncompressed. The receiver inflates a
//!    compressed message's pieces as they arrive, appending the 4 bytes
//!    after its last piece ([`Inflater::inflate`]); inflation stops with
//!    [`ProtocolError::MessageTooBig`] as soon as the output passes the
//!    message size limit (a 1 MB frame that would inflate to 1 GB allocates
//!    no more than the limit, in output chunks), and bad data is
//!    [`ProtocolError::BadDeflate`] (1007).
//! 3. **Idle.** [`Deflater::hibernate`] and [`Inflater::hibernate`] drop the
//!    zlib state (about 260 KiB for a 15-bit compressor, 40 KiB for a
//!    15-bit decompressor). Without context takeover nothing else is kept;
//!    with it, the last window's bytes (at most 2^bits) are kept, and the
//!    next message starts a fresh zlib state primed with them as a preset
//!    dictionary, so the peer sees the same stream as if nothing happened.
//!
//! Window bits: 8 to 15 are negotiated. zlib (and zlib-rs, which flate2 uses
//! here) cannot make a raw deflate stream with an 8-bit window and asks for
//! 9 instead; a 9-bit zlib compressor never emits a distance above 250
//! (512 − 262, its `MAX_DIST`), which a 256-byte window decodes, so an
//! agreed 8 is served by a 9-bit compressor, as zlib itself does for its
//! own header. A decompressor with a window larger than the peer's decodes
//! the peer's stream, so an agreed 8 is inflated with 9 bits.

use bytes::{BufMut, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::decode::{Decoder, DecoderConfig, Frame, Role};
use crate::frame::{apply_mask, write_header, OpCode};
use crate::utf8::Utf8Validator;
use crate::ProtocolError;

/// The extension's token.
pub const EXTENSION: &str = "permessage-deflate";

/// What a sync flush leaves at the end of every message; stripped by the
/// sender, appended by the receiver (RFC 7692 §7.2.1, §7.2.2).
const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// RSV1: set on the first frame of a compressed message.
pub const RSV1: u8 = 0x40;

/// What one side is willing to agree to (a route's settings). Plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The server resets its compressor after every message (and says so).
    pub server_no_context_takeover: bool,
    /// The client is asked to reset its compressor after every message, so
    /// the server's decompressor keeps no window between messages.
    pub client_no_context_takeover: bool,
    /// The largest window the server compresses with, 8..=15.
    pub server_max_window_bits: u8,
    /// The largest window the client may compress with, 8..=15. Below 15,
    /// an offer that cannot be limited (no `client_max_window_bits`) is
    /// declined.
    pub client_max_window_bits: u8,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub min_size: usize,
    /// zlib compression level, 0..=9.
    pub level: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            min_size: 64,
            level: 6,
        }
    }
}

impl Config {
    /// Checks the ranges of the window bits and the level.
    pub fn check(&self) -> Result<(), String> {
        for (key, v) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if !(8..=15).contains(&v) {
                return Err(format!("{key} must be 8 to 15, not {v}"));
            }
        }
        if self.level > 9 {
            return Err(format!("level must be 0 to 9, not {}", self.level));
        }
        Ok(())
    }

    /// Parses `KEY[=VALUE],...` (the command line's `--deflate-config`):
    /// `server_no_context_takeover`, `client_no_context_takeover`,
    /// `server_max_window_bits=N`, `client_max_window_bits=N`,
    /// `min_size=BYTES`, `level=N`.
    pub fn parse_list(s: &str) -> Result<Config, String> {
        let mut c = Config::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let num = |v: Option<&str>| -> Result<u64, String> {
                v.ok_or_else(|| format!("`{k}` needs a value"))?
                    .parse::<u64>()
                    .map_err(|_| format!("`{k}`: not a number"))
            };
            let bits = |v: Option<&str>| -> Result<u8, String> {
                let n = num(v)?;
                u8::try_from(n)
                    .ok()
                    .filter(|b| (8..=15).contains(b))
                    .ok_or_else(|| format!("{k} must be 8 to 15, not {n}"))
            };
            match k {
                "server_no_context_takeover" | "client_no_context_takeover" if v.is_some() => {
                    return Err(format!("`{k}` takes no value"))
                }
                "server_no_context_takeover" => c.server_no_context_takeover = true,
                "client_no_context_takeover" => c.client_no_context_takeover = true,
                "server_max_window_bits" => c.server_max_window_bits = bits(v)?,
                "client_max_window_bits" => c.client_max_window_bits = bits(v)?,
                "min_size" => c.min_size = num(v)? as usize,
                "level" => {
                    c.level = u8::try_from(num(v)?)
                        .ok()
                        .filter(|l| *l <= 9)
                        .ok_or_else(|| "level must be 0 to 9".to_string())?
                }
                _ => {
                    return Err(format!(
                        "unknown key `{k}` (expected server_no_context_takeover, \
                         client_no_context_takeover, server_max_window_bits, \
                         client_max_window_bits, min_size, level)"
                    ))
                }
            }
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------
// Negotiation.

/// One permessage-deflate offer of a client, its parameters checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value (the client can limit its
    /// window, and lets the server choose).
    pub client_max_window_bits: Option<Option<u8>>,
}

/// Why an offer (or a response) is declined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("malformed extension list")]
    Syntax,
    #[error("unknown parameter `{0}`")]
    Unknown(String),
    #[error("parameter `{0}` given twice")]
    Repeated(String),
    #[error("invalid value for `{0}`")]
    Value(String),
}

/// The parameters both sides agreed on, from the server's point of view
/// (`server_*` govern what the server sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: u8,
    pub client_max_window_bits: u8,
    /// The answer's `server_max_window_bits` is written.
    say_server_bits: bool,
    /// The answer's `client_max_window_bits` is written.
    say_client_bits: bool,
}

/// One `name; param[=value]; ...` element of an extension list.
#[derive(Debug, PartialEq, Eq)]
pub struct Element<'a> {
    pub name: &'a [u8],
    /// Parameters in order; values unquoted (a quoted value with an escape
    /// is kept as written between the quotes, and so never a valid number).
    pub params: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn skip_ows(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
        i += 1;
    }
    i
}

fn token(s: &[u8], i: usize) -> Option<(&[u8], usize)> {
    let mut j = i;
    while j < s.len() && is_tchar(s[j]) {
        j += 1;
    }
    (j > i).then(|| (&s[i..j], j))
}

/// Parses one element starting at `i`; returns it and the index after it
/// (at a `,` or the end).
fn element(s: &[u8], i: usize) -> Option<(Element<'_>, usize)> {
    let i = skip_ows(s, i);
    let (name, mut i) = token(s, i)?;
    let mut params = vec![];
    loop {
        i = skip_ows(s, i);
        if i == s.len() || s[i] == b',' {
            return Some((Element { name, params }, i));
        }
        if s[i] != b';' {
            return None;
        }
        i = skip_ows(s, i + 1);
        let (pname, j) = token(s, i)?;
        i = skip_ows(s, j);
        let value = if i < s.len() && s[i] == b'=' {
            i = skip_ows(s, i + 1);
            if i < s.len() && s[i] == b'"' {
                let start = i + 1;
                let mut j = start;
                loop {
                    match s.get(j)? {
                        b'"' => break,
                        b'\\' => j += 2,
                        _ => j += 1,
                    }
                }
                i = j + 1;
                Some(&s[start..j])
            } else {
                let (v, j) = token(s, i)?;
                i = j;
                Some(v)
            }
        } else {
            None
        };
        params.push((pname, value));
    }
}

/// Splits one header value into its elements; an element that does not
/// parse is `Err` (and the list goes on at the next top-level comma).
pub fn parse_list(value: &[u8]) -> Vec<Result<Element<'_>, OfferError>> {
    let mut out = vec![];
    let mut i = 0;
    while i <= value.len() {
        let at = skip_ows(value, i);
        if at == value.len() {
            break;
        }
        if value[at] == b',' {
            // An empty element (`a, , b`) is allowed by the list rule.
            i = at + 1;
            continue;
        }
        match element(value, at) {
            Some((e, end)) => {
                out.push(Ok(e));
                i = end + 1;
            }
            None => {
                out.push(Err(OfferError::Syntax));
                i = next_comma(value, at) + 1;
            }
        }
    }
    out
}

/// The index of the next `,` outside a quoted string (or the end).
fn next_comma(s: &[u8], mut i: usize) -> usize {
    let mut quoted = false;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b',' if !quoted => return i,
            _ => {}
        }
        i += 1;
    }
    s.len()
}

/// A window-bits value: exactly `8`..`15` (RFC 7692 §7.1.2.1's ABNF: no
/// sign, no leading zero).
fn window_bits(v: &[u8]) -> Option<u8> {
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

impl Offer {
    /// Reads a permessage-deflate element's parameters (RFC 7692 §7).
    pub fn from_element(e: &Element<'_>) -> Result<Offer, OfferError> {
        let mut o = Offer::default();
        let mut seen = [false; 4];
        for (name, value) in &e.params {
            let n = String::from_utf8_lossy(name).to_ascii_lowercase();
            let slot = match n.as_str() {
                "server_no_context_takeover" => 0,
                "client_no_context_takeover" => 1,
                "server_max_window_bits" => 2,
                "client_max_window_bits" => 3,
                _ => return Err(OfferError::Unknown(n)),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(OfferError::Repeated(n));
            }
            let bits = || value.and_then(window_bits);
            match slot {
                0 | 1 if value.is_some() => return Err(OfferError::Value(n)),
                0 => o.server_no_context_takeover = true,
                1 => o.client_no_context_takeover = true,
                2 => o.server_max_window_bits = Some(bits().ok_or(OfferError::Value(n))?),
                _ => {
                    o.client_max_window_bits = Some(match value {
                        None => None,
                        Some(_) => Some(bits().ok_or(OfferError::Value(n))?),
                    })
                }
            }
        }
        Ok(o)
    }
}

/// Every permessage-deflate offer in the request's
/// `Sec-WebSocket-Extensions` values, in order; other extensions are
/// skipped. For tests and the fuzz target; [`negotiate`] uses it.
pub fn offers<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Vec<Result<Offer, OfferError>> {
    let mut out = vec![];
    for v in values {
        for e in parse_list(v) {
            match e {
                Ok(e) if e.name.eq_ignore_ascii_case(EXTENSION.as_bytes()) => {
                    out.push(Offer::from_element(&e))
                }
                Ok(_) => {}
                // A malformed element may have been ours: decline it.
                Err(err) => out.push(Err(err)),
            }
        }
    }
    out
}

/// The server's side: the first offer (in the client's order) that is
/// valid and fits `config`, as agreed parameters; `None`: no compression.
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    config: &Config,
) -> Option<Agreed> {
    offers(values)
        .into_iter()
        .filter_map(Result::ok)
        .find_map(|o| accept(&o, config))
}

/// Accepts one valid offer under `config`, or declines it (`None`).
pub fn accept(o: &Offer, config: &Config) -> Option<Agreed> {
    let server_bits = match o.server_max_window_bits {
        Some(b) => b.min(config.server_max_window_bits),
        None => config.server_max_window_bits,
    };
    let client_bits = match o.client_max_window_bits {
        Some(offered) => offered.unwrap_or(15).min(config.client_max_window_bits),
        // The client cannot be held to a smaller window: decline.
        None if config.client_max_window_bits < 15 => return None,
        None => 15,
    };
    Some(Agreed {
        server_no_context_takeover: o.server_no_context_takeover
            || config.server_no_context_takeover,
        client_no_context_takeover: o.client_no_context_takeover
            || config.client_no_context_takeover,
        server_max_window_bits: server_bits,
        client_max_window_bits: client_bits,
        say_server_bits: o.server_max_window_bits.is_some() || server_bits < 15,
        // Only when offered (RFC 7692 §7.1.2.2), and only when it says
        // something the client did not already promise.
        say_client_bits: matches!(o.client_max_window_bits, Some(v) if client_bits < v.unwrap_or(15)),
    })
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the server's answer.
    pub fn response(&self) -> String {
        let mut s = String::from(EXTENSION);
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.say_server_bits {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        if self.say_client_bits {
            s.push_str(&format!(
                "; client_max_window_bits={}",
                self.client_max_window_bits
            ));
        }
        s
    }

    /// The compressor of the side playing `role`.
    pub fn deflater(&self, role: Role, config: &Config) -> Deflater {
        let (bits, reset) = match role {
            Role::Server => (self.server_max_window_bits, self.server_no_context_takeover),
            Role::Client => (self.client_max_window_bits, self.client_no_context_takeover),
        };
        Deflater::new(config.level, bits, reset, config.min_size, role)
    }

    /// The decompressor of the side playing `role`, bounded by
    /// `max_message_size` (0: no bound).
    pub fn inflater(&self, role: Role, max_message_size: u64) -> Inflater {
        let (bits, reset) = match role {
            Role::Server => (self.client_max_window_bits, self.client_no_context_takeover),
            Role::Client => (self.server_max_window_bits, self.server_no_context_takeover),
        };
        Inflater::new(bits, reset, max_message_size)
    }
}

/// The client's offer: one permessage-deflate element asking for what
/// `config` says, and letting the server limit the client's window.
pub fn client_offer(config: &Config) -> String {
    let mut s = String::from(EXTENSION);
    if config.server_no_context_takeover {
        s.push_str("; server_no_context_takeover");
    }
    if config.client_no_context_takeover {
        s.push_str("; client_no_context_takeover");
    }
    if config.server_max_window_bits < 15 {
        s.push_str(&format!(
            "; server_max_window_bits={}",
            config.server_max_window_bits
        ));
    }
    if config.client_max_window_bits < 15 {
        s.push_str(&format!(
            "; client_max_window_bits={}",
            config.client_max_window_bits
        ));
    } else {
        s.push_str("; client_max_window_bits");
    }
    s
}

/// The client's side: reads the server's answer to [`client_offer`].
/// `Ok(None)`: the server declined; `Err`: the answer is not one the offer
/// allows, and the client must fail the connection (RFC 7692 §5).
pub fn accept_response<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    config: &Config,
) -> Result<Option<Agreed>, OfferError> {
    let mut found = None;
    for v in values {
        for e in parse_list(v) {
            let e = e?;
            if !e.name.eq_ignore_ascii_case(EXTENSION.as_bytes()) || found.is_some() {
                return Err(OfferError::Unknown(
                    String::from_utf8_lossy(e.name).into_owned(),
                ));
            }
            let o = Offer::from_element(&e)?;
            let server = o.server_max_window_bits.unwrap_or(15);
            if server > config.server_max_window_bits {
                return Err(OfferError::Value("server_max_window_bits".into()));
            }
            if config.server_no_context_takeover && !o.server_no_context_takeover {
                return Err(OfferError::Value("server_no_context_takeover".into()));
            }
            let client = match o.client_max_window_bits {
                Some(Some(b)) if b <= config.client_max_window_bits => b,
                Some(_) => return Err(OfferError::Value("client_max_window_bits".into())),
                None => config.client_max_window_bits,
            };
            found = Some(Agreed {
                server_no_context_takeover: o.server_no_context_takeover,
                client_no_context_takeover: o.client_no_context_takeover
                    || config.client_no_context_takeover,
                server_max_window_bits: server,
                client_max_window_bits: client,
                say_server_bits: false,
                say_client_bits: false,
            });
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// The last window's bytes, kept to prime a fresh zlib state.

#[derive(Debug)]
struct History {
    buf: Vec<u8>,
    cap: usize,
}

impl History {
    fn new(bits: u8) -> History {
        History {
            buf: Vec::new(),
            cap: 1 << bits,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            return;
        }
        if self.buf.len() + data.len() > 2 * self.cap {
            let drop = self.buf.len() + data.len() - self.cap;
            self.buf.drain(..drop);
        }
        self.buf.extend_from_slice(data);
    }

    /// The last `cap` bytes, and nothing more held.
    fn trim(&mut self) {
        if self.buf.len() > self.cap {
            let drop = self.buf.len() - self.cap;
            self.buf.drain(..drop);
        }
        self.buf.shrink_to_fit();
    }

    fn window(&self) -> &[u8] {
        &self.buf[self.buf.len().saturating_sub(self.cap)..]
    }
}

/// zlib cannot make an 8-bit raw stream (see the module docs).
fn zlib_bits(bits: u8) -> u8 {
    bits.clamp(9, 15)
}

// ---------------------------------------------------------------------------
// Compression.

/// One connection's compressor: whole messages in, frames out. The zlib
/// state is made on the first compressed message, not before.
#[derive(Debug)]
pub struct Deflater {
    level: u8,
    bits: u8,
    no_context_takeover: bool,
    min_size: usize,
    role: Role,
    state: Option<Box<Compress>>,
    /// With context takeover: the last window's input, to start again
    /// after [`Deflater::hibernate`].
    history: Option<History>,
    scratch: Vec<u8>,
}

impl Deflater {
    pub fn new(
        level: u8,
        bits: u8,
        no_context_takeover: bool,
        min_size: usize,
        role: Role,
    ) -> Self {
        Deflater {
            level,
            bits,
            no_context_takeover,
            min_size,
            role,
            state: None,
            history: (!no_context_takeover).then(|| History::new(bits)),
            scratch: Vec::new(),
        }
    }

    /// Whether a message of `len` bytes is sent compressed.
    pub fn compresses(&self, len: usize) -> bool {
        len >= self.min_size
    }

    /// Whether a zlib state (or a scratch buffer) is held now.
    pub fn holds_state(&self) -> bool {
        self.state.is_some() || self.scratch.capacity() > 0
    }

    fn state(&mut self) -> &mut Compress {
        if self.state.is_none() {
            let mut c = Compress::new_with_window_bits(
                Compression::new(self.level.into()),
                false,
                zlib_bits(self.bits),
            );
            if let Some(h) = &self.history {
                if !h.buf.is_empty() {
                    c.set_dictionary(h.window())
                        .expect("a raw deflate stream takes a dictionary");
                }
            }
            self.state = Some(Box::new(c));
        }
        self.state.as_mut().expect("made above")
    }

    /// Compresses one whole message and appends its payload (without the
    /// trailing `00 00 ff ff`) to `out`.
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        self.compress_parts(&[payload], out);
    }

    /// [`Deflater::compress`] for a message held in pieces (`parts`, in
    /// order): compressed as one, without gathering them first.
    pub fn compress_parts<B: AsRef<[u8]>>(&mut self, parts: &[B], out: &mut Vec<u8>) {
        let reset = self.no_context_takeover;
        let c = self.state();
        let start = out.len();
        let mut left: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        let last = parts.len().saturating_sub(1);
        let pieces = parts.iter().map(AsRef::as_ref);
        // No parts: the empty message, flushed all the same.
        for (i, part) in pieces
            .chain(parts.is_empty().then_some(&[][..]))
            .enumerate()
        {
            let flush = if i == last {
                FlushCompress::Sync
            } else {
                FlushCompress::None
            };
            let mut consumed = 0;
            loop {
                out.reserve((left - consumed) / 2 + 64);
                let before = c.total_in();
                c.compress_vec(&part[consumed..], out, flush)
                    .expect("deflate with valid parameters does not fail");
                consumed += (c.total_in() - before) as usize;
                // Without a flush zlib keeps what it has not written yet;
                // a sync flush is complete once it stopped with room to
                // spare.
                if consumed == part.len()
                    && (flush == FlushCompress::None || out.len() < out.capacity())
                {
                    break;
                }
            }
            left -= part.len();
        }
        debug_assert!(out[start..].ends_with(&TRAILER));
        out.truncate(out.len() - TRAILER.len());
        if reset {
            c.reset();
        } else if let Some(h) = &mut self.history {
            for p in parts {
                h.push(p.as_ref());
            }
        }
    }

    /// Appends one whole message as a single frame: compressed with RSV1
    /// when it is at least `min_size` bytes, else as it is. Masked for a
    /// client.
    pub fn encode(&mut self, out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
        self.encode_parts(out, opcode, &[payload]);
    }

    /// [`Deflater::encode`] for a message held in pieces (`parts`, in
    /// order), which are not gathered first.
    pub fn encode_parts<B: AsRef<[u8]>>(
        &mut self,
        out: &mut BytesMut,
        opcode: OpCode,
        parts: &[B],
    ) {
        let mask = match self.role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        let len: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        let start = if self.compresses(len) {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            self.compress_parts(parts, &mut scratch);
            out.reserve(crate::MAX_HEADER_LEN + scratch.len());
            write_header(out, true, RSV1, opcode, mask, scratch.len());
            let start = out.len();
            out.put_slice(&scratch);
            self.scratch = scratch;
            start
        } else {
            out.reserve(crate::MAX_HEADER_LEN + len);
            write_header(out, true, 0, opcode, mask, len);
            let start = out.len();
            for p in parts {
                out.put_slice(p.as_ref());
            }
            start
        };
        if let Some(m) = mask {
            apply_mask(&mut out[start..], m, 0);
        }
        if self.scratch.capacity() > 64 * 1024 {
            self.scratch = Vec::new();
        }
    }

    /// Lets go of the zlib state and the scratch buffer; with context
    /// takeover the last window's bytes stay, to prime the next state.
    pub fn hibernate(&mut self) {
        self.state = None;
        self.scratch = Vec::new();
        if let Some(h) = &mut self.history {
            h.trim();
        }
    }
}

// ---------------------------------------------------------------------------
// Decompression.

/// What one call of [`Inflater::inflate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input piece consumed.
    pub consumed: usize,
    /// The message is whole: its last piece and the trailer are consumed
    /// and every byte of output is out.
    pub done: bool,
}

/// One connection's decompressor for compressed messages, fed in pieces.
#[derive(Debug)]
pub struct Inflater {
    bits: u8,
    no_context_takeover: bool,
    max_message_size: u64,
    state: Option<Box<Decompress>>,
    history: Option<History>,
    /// This message: bytes produced, trailer bytes fed, the stream ended
    /// (BFINAL), whether its text is checked.
    produced: u64,
    trailer: usize,
    ended: bool,
    utf8: Option<Utf8Validator>,
}

impl Inflater {
    pub fn new(bits: u8, no_context_takeover: bool, max_message_size: u64) -> Self {
        Inflater {
            bits,
            no_context_takeover,
            max_message_size,
            state: None,
            history: (!no_context_takeover).then(|| History::new(bits)),
            produced: 0,
            trailer: 0,
            ended: false,
            utf8: None,
        }
    }

    /// Whether a zlib state is held now.
    pub fn holds_state(&self) -> bool {
        self.state.is_some()
    }

    fn fresh_state(&self) -> Box<Decompress> {
        let mut d = Decompress::new_with_window_bits(false, zlib_bits(self.bits));
        if let Some(h) = &self.history {
            if !h.buf.is_empty() {
                d.set_dictionary(h.window())
                    .expect("a raw inflate stream takes a dictionary");
            }
        }
        Box::new(d)
    }

    /// Starts a compressed message (its first frame had RSV1); `text`:
    /// its inflated bytes are checked as UTF-8.
    pub fn begin(&mut self, text: bool) {
        self.produced = 0;
        self.trailer = 0;
        self.ended = false;
        self.utf8 = text.then(Utf8Validator::new);
    }

    /// Inflates from `input` (a piece of the message's payload; `last`: its
    /// final piece) into `out`, adding (and reserving) at most `room`
    /// bytes, and never more than the message size limit leaves: a message
    /// that would pass the limit fails with
    /// [`ProtocolError::MessageTooBig`] once its output reached the limit
    /// exactly, never a byte more of it handed out. Call again
    /// with the rest of the input (and, once it is all consumed with `last`,
    /// an empty input) until [`Step::done`].
    pub fn inflate(
        &mut self,
        input: &[u8],
        last: bool,
        out: &mut BytesMut,
        room: usize,
    ) -> Result<Step, ProtocolError> {
        if self.state.is_none() {
            self.state = Some(self.fresh_state());
        }
        let mut room = room.max(1);
        if self.max_message_size != 0 {
            // Never past the limit: once output reaches it, whether there is
            // more is asked for with a 1-byte probe of our own, so `out`
            // never grows past the limit.
            let left = self.max_message_size.saturating_sub(self.produced);
            room = room.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        let probing = room == 0;
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let start = out.len();
        out.reserve(room);
        let mut consumed = 0;
        let result = loop {
            let written = out.len() - start;
            let left = &input[consumed..];
            if self.ended {
                // Past a final block nothing may follow but our trailer.
                if !left.is_empty() {
                    break Err(ProtocolError::BadDeflate);
                }
                break Ok(last);
            }
            let trailer = left.is_empty() && last && self.trailer < TRAILER.len();
            let src: &[u8] = if trailer {
                &TRAILER[self.trailer..]
            } else {
                left
            };
            let d = self.state.as_mut().expect("made above");
            let (in0, out0) = (d.total_in(), d.total_out());
            let spare = if probing {
                &mut probe[..]
            } else {
                &mut out.spare_capacity_mut()[..room - written]
            };
            let status = d.decompress_uninit(src, spare, FlushDecompress::Sync);
            let used = (d.total_in() - in0) as usize;
            let made = (d.total_out() - out0) as usize;
            if !probing {
                // SAFETY: zlib initialised the first `made` bytes of `spare`.
                unsafe { out.set_len(out.len() + made) };
            }
            if trailer {
                self.trailer += used;
            } else {
                consumed += used;
            }
            self.produced += made as u64;
            match status {
                // A block with BFINAL (RFC 7692 §7.2.3.4): this zlib stream
                // is over; the next message starts a new one.
                Ok(Status::StreamEnd) => self.ended = true,
                Ok(_) => {}
                Err(_) => break Err(ProtocolError::BadDeflate),
            }
            if self.max_message_size != 0 && self.produced > self.max_message_size {
                break Err(ProtocolError::MessageTooBig {
                    limit: self.max_message_size,
                });
            }
            if !probing && out.len() - start == room {
                // Full: the caller takes this and calls again.
                break Ok(false);
            }
            // Room is left, so zlib gave out all it could from its input.
            let fed =
                consumed == input.len() && (!last || self.ended || self.trailer == TRAILER.len());
            if fed {
                break Ok(last);
            }
            if used == 0 && made == 0 {
                break Err(ProtocolError::BadDeflate);
            }
        };
        let done = match result {
            Ok(done) => done,
            Err(e) => {
                self.state = None;
                return Err(e);
            }
        };
        if let Some(v) = &mut self.utf8 {
            v.feed(&out[start..])
                .map_err(|_| ProtocolError::InvalidUtf8)?;
            if done {
                v.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
            }
        }
        if let Some(h) = &mut self.history {
            h.push(&out[start..]);
        }
        if done {
            self.end_message();
        }
        Ok(Step { consumed, done })
    }

    fn end_message(&mut self) {
        if self.no_context_takeover {
            // The next message starts from nothing: reset now, or drop the
            // state at the next hibernate.
            if let Some(d) = &mut self.state {
                d.reset(false);
            }
        } else if self.ended {
            // A final block ended the zlib stream; the window goes on.
            self.state = Some(self.fresh_state());
        }
        self.utf8 = None;
    }

    /// Lets go of the zlib state; with context takeover the last window's
    /// bytes stay, to prime the next state. Only between messages.
    pub fn hibernate(&mut self) {
        self.state = None;
        if let Some(h) = &mut self.history {
            h.trim();
        }
    }
}

// ---------------------------------------------------------------------------
// A decoder whose compressed messages come out inflated.

/// A [`Decoder`] with an optional [`Inflater`]: frames come out as the
/// decoder gives them, except that a compressed message's payload comes out
/// inflated, in pieces of at most `chunk` bytes, with `rsv` 0. Callers that
/// stream payloads on (the gateway's relay) or reassemble messages (clients)
/// need not know whether a message was compressed. Without an inflater,
/// RSV1 stays an error (the decoder's `allowed_rsv` is left as given).
#[derive(Debug)]
pub struct InflatingDecoder {
    decoder: Decoder,
    inflater: Option<Inflater>,
    chunk: usize,
    pending: Option<Pending>,
}

/// The compressed piece being inflated.
#[derive(Debug)]
struct Pending {
    input: BytesMut,
    text: bool,
    first: bool,
    last: bool,
}

impl InflatingDecoder {
    /// `inflater`: set when permessage-deflate was agreed; RSV1 is then
    /// allowed on a message's first frame. Text messages are checked as
    /// UTF-8 after inflation when the decoder checks text.
    pub fn new(
        role: Role,
        mut config: DecoderConfig,
        inflater: Option<Inflater>,
        chunk: usize,
    ) -> Self {
        if inflater.is_some() {
            config.allowed_rsv |= RSV1;
        }
        InflatingDecoder {
            decoder: Decoder::new(role, config),
            inflater,
            chunk: chunk.max(1),
            pending: None,
        }
    }

    /// Wraps a decoder that may already be in a message (uncompressed).
    pub fn from_decoder(decoder: Decoder) -> Self {
        InflatingDecoder {
            decoder,
            inflater: None,
            chunk: 64 * 1024,
            pending: None,
        }
    }

    /// The frame decoder underneath.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Like [`Decoder::next`], with compressed payloads inflated.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if let Some(p) = &mut self.pending {
                let inf = self.inflater.as_mut().expect("pending needs an inflater");
                let mut out = BytesMut::new();
                let step = inf.inflate(&p.input, p.last, &mut out, self.chunk)?;
                let _ = p.input.split_to(step.consumed);
                let first = std::mem::take(&mut p.first);
                let text = p.text;
                if step.done || (p.input.is_empty() && !p.last) {
                    self.pending = None;
                }
                if out.is_empty() && !first && !step.done {
                    continue;
                }
                return Ok(Some(Frame::Data {
                    payload: out,
                    text,
                    first,
                    last: step.done,
                    rsv: 0,
                }));
            }
            match self.decoder.next(buf)? {
                Some(Frame::Data {
                    payload,
                    text,
                    first,
                    last,
                    rsv,
                }) if rsv & RSV1 != 0 => {
                    let inf = self.inflater.as_mut().ok_or(ProtocolError::ReservedBits)?;
                    if first {
                        inf.begin(text && self.decoder.validates_utf8());
                    }
                    self.pending = Some(Pending {
                        input: payload,
                        text,
                        first,
                        last,
                    });
                }
                other => return Ok(other),
            }
        }
    }

    /// Whether an inflater holds a zlib state that [`Self::hibernate`]
    /// would let go of (never in the middle of a message).
    pub fn holds_state(&self) -> bool {
        self.pending.is_none()
            && !self.decoder.in_message()
            && self.inflater.as_ref().is_some_and(Inflater::holds_state)
    }

    /// Lets go of the inflater's zlib state between messages.
    pub fn hibernate(&mut self) {
        if self.pending.is_none() && !self.decoder.in_message() {
            if let Some(i) = &mut self.inflater {
                i.hibernate();
            }
        }
    }
}

#[cfg(test)]
mod tests;
