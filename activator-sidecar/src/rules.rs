//! The one set of HTTP/1.1 rules every path of the data path applies: what a proxy hop refuses,
//! what it removes, and what it adds. The fast path ([`crate::h1`]) and hyper's path
//! ([`crate::proxy`], [`crate::server`]) both call these functions; nothing about framing,
//! hop-by-hop headers, forwarding headers or limits is decided anywhere else.
//!
//! - **Refusals** (RFC 9112): no `Host` or more than one (§3.2), a `Host` that is not a
//!   `host[:port]`, differing or malformed `Content-Length`s (§6.3), `Content-Length` together
//!   with `Transfer-Encoding`, a `Transfer-Encoding` whose codings are not exactly `chunked`
//!   (last not `chunked`: 400; another coding: 501, §6.1), `Transfer-Encoding` in HTTP/1.0, a
//!   `Connection` option that names a framing or routing header (`Content-Length`,
//!   `Transfer-Encoding`, `Host`): dropping such a header would change how the next hop
//!   frames or routes the message, which is how requests are smuggled, so the request is
//!   refused instead of forwarded with the header either kept or removed. `CONNECT` is refused
//!   (405): the sidecar forwards HTTP, it does not tunnel. Malformed heads (obs-fold, NUL, CR or
//!   LF in a value, a bad request line) are refused by the parser with 400.
//! - **Limits**: one head size and one header count on every path, 431 beyond.
//! - **Hop-by-hop headers** (RFC 9110 §7.6.1) are removed, with every header `Connection`
//!   names, except the validated framing headers: bodies travel in the framing they came in.
//! - **Forwarding headers**: `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` (RFC 7239)
//!   describe the client as this hop saw it. From a trusted proxy the incoming values are
//!   extended; from anyone else they are replaced, so a client cannot claim another address or
//!   scheme. A role that starts traces adds a W3C `traceparent` to requests without one.

use std::net::IpAddr;

use http::StatusCode;

/// Longest request or response head, on every path.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head, on every path.
pub const MAX_HEADERS: usize = 100;

/// Headers that describe one connection (RFC 9110 §7.6.1), never forwarded. `Transfer-Encoding`
/// is one too, but it is framing: the hop keeps it (validated) and relays the body as framed.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Headers this hop answers itself: `Expect: 100-continue` gets its `100 Continue` from the
/// hop that wants the body, so the replica never sees it.
const ANSWERED: &[&str] = &["expect"];

/// Headers every hop writes afresh (see [`forwarding_headers`]).
const FORWARDING: &[&str] = &["x-forwarded-for", "x-forwarded-proto", "forwarded"];

/// Headers a `Connection` option must not name: removing them changes framing or routing.
const PROTECTED: &[&str] = &["content-length", "transfer-encoding", "host"];

/// Why a request is refused; [`Refusal::status`] is the one place it becomes a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("transfer coding {0:?} is not supported; only chunked is")]
    UnsupportedCoding(String),
    #[error("method {0} is not supported by this proxy")]
    Method(&'static str),
    #[error("only the expectation 100-continue is supported")]
    Expectation,
    #[error("the request body paused longer than {0:?}")]
    SlowBody(std::time::Duration),
}

/// What the checks learned about a request, for framing, routing and forwarding.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    /// The `Host` value as sent (the absolute-form authority replaces it, see [`authority`]).
    pub host: &'a [u8],
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (matters for HTTP/1.0).
    pub keep_alive: bool,
    /// `Upgrade` together with `Connection: upgrade`.
    pub upgrade: bool,
    /// `Expect: 100-continue` (any other expectation is refused).
    pub expect: bool,
    /// Knative's `K-Network-Probe`: answered by the sidecar.
    pub probe: bool,
    /// The incoming `traceparent`, if any.
    pub traceparent: Option<&'a [u8]>,
    /// Header names the `Connection` header lists, lowercase comparisons only.
    pub connection: Vec<&'a [u8]>,
    /// The incoming forwarding headers, in order (several lines of one header kept apart).
    pub forwarded_for: Vec<&'a [u8]>,
    pub forwarded_proto: Option<&'a [u8]>,
    pub forwarded: Vec<&'a [u8]>,
}

/// What a role does to the forwarding headers of the requests it relays.
#[derive(Debug, Clone, Default)]
pub struct HopPolicy {
    /// Peers whose `X-Forwarded-*` and `Forwarded` claims are extended rather than replaced.
    pub trusted: TrustedProxies,
    /// Add a `traceparent` when a request has none (the gateway: where requests enter).
    pub start_trace: bool,
}

/// IP networks (`address/prefix`) whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

/// The client of one connection as the forwarding headers name it; formatted once per
/// connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// For `X-Forwarded-For`: the address.
    pub address: String,
    /// For `Forwarded`: `for=` node, quoted for IPv6.
    pub node: String,
    /// Its claims are extended, not replaced.
    pub trusted: bool,
}

// === requests ===

/// Checks a request head (`version`: the minor version of HTTP/1.x; `headers`: name and value
/// of each field line, as parsed) and collects what the hop needs. Any `Err` is answered with
/// its status and the connection closed.
pub fn check_request<'a>(
    method: &str,
    version: u8,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<RequestFacts<'a>, Refusal> {
    check(method, version, version >= 1, headers)
}

/// [`check_request`] for a request hyper parsed: HTTP/2 requests name their host in
/// `:authority`, which must agree with a `Host` if both are present (RFC 9113 §8.3.1).
pub fn check_parsed<B>(request: &http::Request<B>) -> Result<(), Refusal> {
    let version = match request.version() {
        http::Version::HTTP_10 => 0,
        http::Version::HTTP_11 => 1,
        http::Version::HTTP_2 => 2,
        _ => return Err(Refusal::Malformed("unsupported HTTP version")),
    };
    let authority = request.uri().authority().map(|a| a.as_str().as_bytes());
    // HTTP/1.1 needs a Host; HTTP/2 a `:authority` or a Host.
    let host_required = version == 1 || (version == 2 && authority.is_none());
    let facts = check(
        request.method().as_str(),
        version,
        host_required,
        request
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes())),
    )?;
    if version == 2
        && let Some(authority) = authority
        && !facts.host.is_empty()
        && !facts.host.eq_ignore_ascii_case(authority)
    {
        return Err(Refusal::Malformed("Host and :authority differ"));
    }
    Ok(())
}

fn check<'a>(
    method: &str,
    version: u8,
    host_required: bool,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<RequestFacts<'a>, Refusal> {
    if method == "CONNECT" {
        return Err(Refusal::Method("CONNECT"));
    }
    let mut facts = RequestFacts::default();
    let mut hosts = 0usize;
    let mut codings: Vec<&[u8]> = Vec::new();
    let mut upgrade_header = false;
    let mut count = 0usize;
    for (name, value) in headers {
        count += 1;
        if count > MAX_HEADERS {
            return Err(Refusal::TooManyHeaders);
        }
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            facts.host = value;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value)
                .ok_or(Refusal::Malformed("Content-Length is not a decimal number"))?;
            if facts.content_length.is_some_and(|seen| seen != n) {
                return Err(Refusal::Malformed("differing Content-Length values"));
            }
            facts.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Empty elements (`chunked,`) are read differently by different parsers.
            if value
                .split(|b| *b == b',')
                .any(|c| c.trim_ascii().is_empty())
            {
                return Err(Refusal::Malformed("empty element in Transfer-Encoding"));
            }
            codings.extend(list(value));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in list(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    facts.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    facts.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    facts.upgrade = true;
                } else if PROTECTED
                    .iter()
                    .any(|p| token.eq_ignore_ascii_case(p.as_bytes()))
                {
                    return Err(Refusal::Malformed(
                        "Connection names a framing or routing header",
                    ));
                } else {
                    facts.connection.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_header = true;
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                return Err(Refusal::Expectation);
            }
            facts.expect = true;
        } else if name.eq_ignore_ascii_case("k-network-probe") {
            facts.probe = true;
        } else if name.eq_ignore_ascii_case("traceparent") {
            facts.traceparent = Some(value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            facts.forwarded_for.push(value);
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            facts.forwarded_proto = Some(value);
        } else if name.eq_ignore_ascii_case("forwarded") {
            facts.forwarded.push(value);
        }
    }
    facts.upgrade &= upgrade_header;
    match hosts {
        0 if host_required => return Err(Refusal::Malformed("no Host header")),
        0 => {}
        1 if valid_host(facts.host) => {}
        1 => return Err(Refusal::Malformed("Host is not a valid host[:port]")),
        _ => return Err(Refusal::Malformed("more than one Host header")),
    }
    if !codings.is_empty() {
        if version == 0 {
            return Err(Refusal::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if facts.content_length.is_some() {
            return Err(Refusal::Malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        let last = codings.last().copied().unwrap_or_default();
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::Malformed(
                "Transfer-Encoding does not end with chunked",
            ));
        }
        if let Some(other) = codings[..codings.len() - 1].first() {
            return Err(if other.eq_ignore_ascii_case(b"chunked") {
                Refusal::Malformed("chunked applied more than once")
            } else {
                Refusal::UnsupportedCoding(String::from_utf8_lossy(other).into_owned())
            });
        }
        facts.chunked = true;
    }
    Ok(facts)
}

/// What the framing and `Connection` headers of a response say.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseFacts<'a> {
    pub content_length: Option<u64>,
    /// `Transfer-Encoding` present: whether its last coding is `chunked` (otherwise the body
    /// runs until the connection closes, RFC 9112 §6.3).
    pub chunked: Option<bool>,
    pub close: bool,
    pub keep_alive: bool,
    /// Further header names `Connection` lists: not relayed.
    pub connection: Vec<&'a [u8]>,
}

/// Checks a replica's response head; `Err` names what is wrong (a replica failure, 502).
pub fn check_response<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<ResponseFacts<'a>, &'static str> {
    let mut facts = ResponseFacts::default();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value).ok_or("invalid Content-Length")?;
            if facts.content_length.is_some_and(|seen| seen != n) {
                return Err("conflicting Content-Length");
            }
            facts.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if let Some(last) = list(value).last() {
                facts.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in list(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    facts.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    facts.keep_alive = true;
                } else if !PROTECTED
                    .iter()
                    .any(|p| token.eq_ignore_ascii_case(p.as_bytes()))
                {
                    // A replica naming its own framing header must not lose it on the way:
                    // the client would get a response without a length on a kept-alive
                    // connection.
                    facts.connection.push(token);
                }
            }
        }
    }
    Ok(facts)
}

/// The authority of an absolute-form target (`http://host:port/path`) and its origin-form
/// path; `None` for any other form. The authority replaces `Host` (RFC 9112 §3.2.2), so
/// routing and the replica see the same host.
pub fn authority(target: &str) -> Option<(&str, std::borrow::Cow<'_, str>)> {
    let rest = target
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') || !valid_host(authority.as_bytes()) {
        return None;
    }
    // An empty path is "/" (RFC 9112 §3.2.1), also in front of a query.
    let path = if path.starts_with('/') {
        std::borrow::Cow::Borrowed(path)
    } else {
        std::borrow::Cow::Owned(format!("/{path}"))
    };
    Some((authority, path))
}

/// Whether a header of a request or response goes on to the next hop. Framing headers pass
/// (checked before); forwarding headers are rewritten by [`forwarding_headers`].
pub fn forwards(name: &str, connection: &[&[u8]]) -> bool {
    !is_listed(name, HOP_BY_HOP)
        && !is_listed(name, FORWARDING)
        && !is_listed(name, ANSWERED)
        && !connection
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// Whether a response header goes back to the client: hop-by-hop headers and those its
/// `Connection` names stay behind; forwarding headers are the replica's own business.
pub fn forwards_response(name: &str, connection: &[&[u8]]) -> bool {
    !is_listed(name, HOP_BY_HOP)
        && !connection
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// Emits the forwarding headers of a request: `X-Forwarded-For`, `X-Forwarded-Proto`,
/// `Forwarded` and, when the policy starts traces and it has none, a `traceparent`. `host` is
/// the request's host as forwarded. Returns the request's trace, for logs.
pub fn forwarding_headers(
    facts: &RequestFacts<'_>,
    peer: &Peer,
    policy: &HopPolicy,
    host: &[u8],
    out: &mut impl HeaderSink,
) -> Option<TraceId> {
    out.begin("x-forwarded-for");
    if peer.trusted {
        for previous in &facts.forwarded_for {
            out.push(previous);
            out.push(b", ");
        }
    }
    out.push(peer.address.as_bytes());
    out.end();
    out.begin("x-forwarded-proto");
    out.push(match facts.forwarded_proto {
        Some(claimed) if peer.trusted => claimed,
        _ => b"http",
    });
    out.end();
    out.begin("forwarded");
    if peer.trusted {
        for previous in &facts.forwarded {
            out.push(previous);
            out.push(b", ");
        }
    }
    out.push(b"for=");
    out.push(peer.node.as_bytes());
    out.push(b";proto=http");
    if !host.is_empty() {
        out.push(b";host=");
        if host.iter().all(|b| is_tchar(*b)) {
            out.push(host);
        } else {
            // Host is validated: no quote or backslash can be inside.
            out.push(b"\"");
            out.push(host);
            out.push(b"\"");
        }
    }
    out.end();
    let (trace, started) = trace(policy, facts.traceparent);
    if let Some(traceparent) = started {
        out.begin("traceparent");
        out.push(&traceparent);
        out.end();
    }
    trace
}

/// Where [`forwarding_headers`] writes: each header's value comes in pieces, so the fast path
/// writes them straight into the outgoing head without building the value first.
pub trait HeaderSink {
    fn begin(&mut self, name: &'static str);
    fn push(&mut self, piece: &[u8]);
    fn end(&mut self);
}

/// Header lines written straight into a head being built (`name: value\r\n`).
impl HeaderSink for Vec<u8> {
    fn begin(&mut self, name: &'static str) {
        self.extend_from_slice(name.as_bytes());
        self.extend_from_slice(b": ");
    }

    fn push(&mut self, piece: &[u8]) {
        self.extend_from_slice(piece);
    }

    fn end(&mut self) {
        self.extend_from_slice(b"\r\n");
    }
}

/// Whole headers, collected: (name, value) pairs.
#[derive(Debug, Default)]
pub struct Collected {
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl HeaderSink for Collected {
    fn begin(&mut self, name: &'static str) {
        self.headers.push((name, Vec::new()));
    }

    fn push(&mut self, piece: &[u8]) {
        if let Some((_, value)) = self.headers.last_mut() {
            value.extend_from_slice(piece);
        }
    }

    fn end(&mut self) {}
}

/// The trace a request belongs to: its own `traceparent`'s, or — when the policy starts
/// traces and it has none — a new one, returned to be added as its `traceparent`.
pub fn trace(policy: &HopPolicy, existing: Option<&[u8]>) -> (Option<TraceId>, Option<[u8; 55]>) {
    match existing {
        Some(traceparent) => (TraceId::of(traceparent), None),
        None if policy.start_trace => {
            let traceparent = new_traceparent();
            (TraceId::of(&traceparent), Some(traceparent))
        }
        None => (None, None),
    }
}

/// A new W3C trace context: version 00, random trace and parent ids, sampled.
pub fn new_traceparent() -> [u8; 55] {
    let mut out = [0u8; 55];
    let mut cursor = &mut out[..];
    let trace = fastrand::u128(1..);
    let parent = fastrand::u64(1..);
    let _ = std::io::Write::write_fmt(
        &mut cursor,
        format_args!("00-{trace:032x}-{parent:016x}-01"),
    );
    out
}

/// The trace id of a W3C trace context, for logs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    /// The trace id of a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`), when it is one.
    pub fn of(traceparent: &[u8]) -> Option<Self> {
        let id = traceparent.get(3..35)?;
        let valid = traceparent.get(2) == Some(&b'-')
            && traceparent.get(35) == Some(&b'-')
            && id.iter().all(u8::is_ascii_hexdigit)
            && id.iter().any(|b| *b != b'0');
        let mut out = [0u8; 32];
        out.copy_from_slice(id);
        valid.then_some(Self(out))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Refusal ===

impl Refusal {
    /// A body that breaks its framing, or ends before it.
    pub const BAD_BODY: Refusal = Refusal::Malformed("incomplete or malformed request body");

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::HeadTooLarge | Refusal::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Refusal::UnsupportedCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Refusal::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Expectation => StatusCode::EXPECTATION_FAILED,
            Refusal::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// What a parser error of a request head means.
    pub fn from_parse(error: httparse::Error) -> Self {
        match error {
            httparse::Error::TooManyHeaders => Refusal::TooManyHeaders,
            httparse::Error::HeaderName => Refusal::Malformed("invalid header name"),
            httparse::Error::HeaderValue => Refusal::Malformed("invalid header value"),
            httparse::Error::NewLine => Refusal::Malformed("invalid line ending"),
            httparse::Error::Version => Refusal::Malformed("unsupported HTTP version"),
            httparse::Error::Token | httparse::Error::Status => {
                Refusal::Malformed("invalid request line")
            }
        }
    }
}

// === impl Peer ===

impl Peer {
    pub fn new(ip: IpAddr, policy: &HopPolicy) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        Self {
            address: ip.to_string(),
            node: match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("\"[{v6}]\""),
            },
            trusted: policy.trusted.contains(ip),
        }
    }
}

// === impl TrustedProxies ===

impl TrustedProxies {
    /// Nobody.
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// Loopback, private and link-local networks: where other hops of a cluster live.
    pub fn private() -> Self {
        Self::parse("127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,169.254.0.0/16,::1/128,fc00::/7,fe80::/10")
            .unwrap_or_default()
    }

    /// A comma-separated list of `address[/prefix]`; `none` for nobody, `private` for
    /// [`TrustedProxies::private`].
    pub fn parse(list: &str) -> Result<Self, String> {
        let list = list.trim();
        if list.eq_ignore_ascii_case("none") || list.is_empty() {
            return Ok(Self::none());
        }
        if list.eq_ignore_ascii_case("private") {
            return Ok(Self::private());
        }
        let mut networks = Vec::new();
        for item in list.split(',').map(str::trim) {
            let (address, prefix) = item.split_once('/').unwrap_or((item, ""));
            let ip: IpAddr = address
                .parse()
                .map_err(|_| format!("{item:?} is not an IP address or network"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = if prefix.is_empty() {
                max
            } else {
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("{item:?}: the prefix must be 0 to {max}"))?
            };
            networks.push((ip, prefix));
        }
        Ok(Self(networks))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|(network, prefix)| match (network, ip) {
            (IpAddr::V4(n), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(*n)), 32, *prefix)
                    == masked(u128::from(u32::from(ip)), 32, *prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(ip)) => {
                masked(u128::from(*n), 128, *prefix) == masked(u128::from(ip), 128, *prefix)
            }
            _ => false,
        })
    }
}

fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    let shift = u32::from(width - prefix.min(width));
    bits.checked_shr(shift).unwrap_or(0)
}

// === helpers ===

fn is_listed(name: &str, list: &[&str]) -> bool {
    list.iter()
        .any(|h| h.len() == name.len() && name.eq_ignore_ascii_case(h))
}

/// The elements of a comma-separated field value, trimmed, empty ones skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `Content-Length` value: digits only (no sign, no spaces inside, no list).
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): a registered name of unreserved, sub-delims and
/// percent-encoded characters, or a bracketed IP literal, and an optional decimal port.
pub fn valid_host(host: &[u8]) -> bool {
    let (name, port) = if host.first() == Some(&b'[') {
        let Some(close) = host.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &host[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &host[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&b""[..], port),
            _ => return false,
        }
    } else {
        match host.iter().rposition(|b| *b == b':') {
            Some(colon) => (&host[..colon], &host[colon + 1..]),
            None => (host, &b""[..]),
        }
    };
    let port_ok = port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
    let name_ok = name.iter().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    });
    port_ok && name_ok && (host.first() == Some(&b'[') || !name.is_empty())
}

/// A `tchar` of RFC 9110 §5.6.2.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(version: u8, headers: &[(&'static str, &'static str)]) -> Result<(), Refusal> {
        check_request(
            "POST",
            version,
            headers.iter().map(|(n, v)| (*n, v.as_bytes())),
        )
        .map(|_| ())
    }

    #[test]
    fn framing_and_routing_refusals() {
        let host = ("Host", "a.b");
        assert_eq!(check(1, &[host]), Ok(()));
        assert_eq!(check(1, &[]), Err(Refusal::Malformed("no Host header")));
        assert_eq!(check(0, &[]), Ok(()));
        assert!(check(1, &[host, ("host", "c.d")]).is_err());
        assert!(check(1, &[host, ("host", "a.b")]).is_err(), "even equal");
        assert!(check(1, &[("Host", "a b")]).is_err());
        assert!(check(1, &[("Host", "a.b:80x")]).is_err());
        assert!(check(1, &[("Host", "[::1]:8080")]).is_ok());
        assert!(check(1, &[host, ("Content-Length", "3"), ("Content-Length", "3")]).is_ok());
        assert!(check(1, &[host, ("Content-Length", "3"), ("Content-Length", "4")]).is_err());
        assert!(check(1, &[host, ("Content-Length", "3, 3")]).is_err());
        assert!(check(1, &[host, ("Content-Length", "-1")]).is_err());
        assert!(
            check(
                1,
                &[
                    host,
                    ("Transfer-Encoding", "chunked"),
                    ("Content-Length", "3")
                ]
            )
            .is_err()
        );
        assert!(check(1, &[host, ("Transfer-Encoding", "chunked, identity")]).is_err());
        assert_eq!(
            check(1, &[host, ("Transfer-Encoding", "gzip, chunked")]),
            Err(Refusal::UnsupportedCoding("gzip".into()))
        );
        assert!(
            check(
                1,
                &[
                    host,
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "chunked")
                ]
            )
            .is_err()
        );
        assert!(check(1, &[host, ("Transfer-Encoding", "xchunked")]).is_err());
        assert!(check(1, &[host, ("Transfer-Encoding", "chunked,")]).is_err());
        assert!(check(1, &[host, ("Transfer-Encoding", ", chunked")]).is_err());
        assert!(check(1, &[host, ("Transfer-Encoding", "cHuNkEd")]).is_ok());
        assert!(check(0, &[("Transfer-Encoding", "chunked")]).is_err());
        for named in ["content-length", "Transfer-Encoding", "HOST"] {
            let connection: &'static str =
                Box::leak(format!("keep-alive, {named}").into_boxed_str());
            assert_eq!(
                check(1, &[host, ("Connection", connection)]),
                Err(Refusal::Malformed(
                    "Connection names a framing or routing header"
                )),
                "{named}"
            );
        }
        assert_eq!(
            check_request("CONNECT", 1, [("Host", &b"a:443"[..])]).map(|_| ()),
            Err(Refusal::Method("CONNECT"))
        );
        let many: Vec<(&'static str, &'static str)> = std::iter::once(host)
            .chain((0..MAX_HEADERS).map(|_| ("x", "1")))
            .collect();
        assert_eq!(check(1, &many), Err(Refusal::TooManyHeaders));
    }

    #[test]
    fn statuses() {
        assert_eq!(Refusal::Malformed("x").status(), 400);
        assert_eq!(Refusal::TooManyHeaders.status(), 431);
        assert_eq!(Refusal::UnsupportedCoding("gzip".into()).status(), 501);
        assert_eq!(Refusal::Method("CONNECT").status(), 405);
    }

    #[test]
    fn absolute_form_targets() {
        assert_eq!(
            authority("http://Hello.default.localhost:8080/a?b"),
            Some(("Hello.default.localhost:8080", "/a?b".into()))
        );
        assert_eq!(authority("http://h"), Some(("h", "/".into())));
        assert_eq!(authority("http://h?x"), Some(("h", "/?x".into())));
        assert_eq!(authority("/a"), None);
        assert_eq!(authority("https://h/"), None);
        assert_eq!(authority("http://user@h/"), None);
        assert_eq!(authority("http:///a"), None);
    }

    fn forwarded(
        facts: &RequestFacts<'_>,
        ip: &str,
        policy: &HopPolicy,
        host: &str,
    ) -> Vec<(&'static str, String)> {
        let peer = Peer::new(ip.parse().expect("ip"), policy);
        let mut out = Collected::default();
        forwarding_headers(facts, &peer, policy, host.as_bytes(), &mut out);
        out.headers
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8(v).expect("utf-8")))
            .collect()
    }

    #[test]
    fn forwarding_headers_replace_untrusted_claims_and_extend_trusted_ones() {
        let facts = RequestFacts {
            forwarded_for: vec![b"1.1.1.1", b"2.2.2.2"],
            forwarded_proto: Some(b"https"),
            forwarded: vec![b"for=1.1.1.1;proto=https"],
            traceparent: Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ..RequestFacts::default()
        };
        let edge = HopPolicy::default();
        assert_eq!(
            forwarded(&facts, "10.0.0.7", &edge, "a.b:8080"),
            vec![
                ("x-forwarded-for", "10.0.0.7".to_string()),
                ("x-forwarded-proto", "http".to_string()),
                (
                    "forwarded",
                    "for=10.0.0.7;proto=http;host=\"a.b:8080\"".to_string()
                ),
            ]
        );
        let inner = HopPolicy {
            trusted: TrustedProxies::private(),
            start_trace: true,
        };
        assert_eq!(
            forwarded(&facts, "::1", &inner, "a.b"),
            vec![
                ("x-forwarded-for", "1.1.1.1, 2.2.2.2, ::1".to_string()),
                ("x-forwarded-proto", "https".to_string()),
                (
                    "forwarded",
                    "for=1.1.1.1;proto=https, for=\"[::1]\";proto=http;host=a.b".to_string()
                ),
            ]
        );
        let fresh = forwarded(&RequestFacts::default(), "::ffff:10.1.2.3", &inner, "");
        assert_eq!(fresh[0].1, "10.1.2.3");
        assert_eq!(fresh[3].0, "traceparent");
        let started = TraceId::of(fresh[3].1.as_bytes()).expect("a valid traceparent");
        assert!(
            fresh[3].1.starts_with("00-") && fresh[3].1.ends_with("-01"),
            "{}",
            fresh[3].1
        );
        assert_eq!(fresh[3].1.len(), 55);
        assert_ne!(started.as_str(), "0".repeat(32));
        assert_eq!(
            TraceId::of(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                .map(|t| t.to_string()),
            Some("0af7651916cd43dd8448eb211c80319c".to_string())
        );
        assert_eq!(
            TraceId::of(b"00-00000000000000000000000000000000-b7ad6b7169203331-01"),
            None
        );
        assert_eq!(TraceId::of(b"garbage"), None);
    }

    #[test]
    fn hop_by_hop_and_connection_options() {
        let named: Vec<&[u8]> = vec![b"x-secret"];
        for name in [
            "Connection",
            "keep-alive",
            "TE",
            "Upgrade",
            "x-secret",
            "X-Forwarded-For",
            "forwarded",
        ] {
            assert!(!forwards(name, &named), "{name}");
        }
        for name in ["Content-Length", "Transfer-Encoding", "Host", "Accept"] {
            assert!(forwards(name, &named), "{name}");
        }
        assert!(forwards_response("x-forwarded-for", &[]));
        let facts = check_response([
            ("Connection", &b"close, X-A"[..]),
            ("content-length", b"3"),
            ("Transfer-Encoding", b"gzip, chunked"),
        ])
        .expect("valid");
        assert_eq!(facts.connection, vec![&b"X-A"[..]]);
        assert!(facts.close && facts.chunked == Some(true) && facts.content_length == Some(3));
        // A response's Connection never takes its framing header away.
        let facts = check_response([
            ("Connection", &b"Content-Length, transfer-encoding, x-b"[..]),
            ("Content-Length", b"3"),
        ])
        .expect("valid");
        assert_eq!(facts.connection, vec![&b"x-b"[..]]);
        assert!(forwards_response("content-length", &facts.connection));
        assert!(check_response([("content-length", &b"3"[..]), ("content-length", b"4")]).is_err());
    }

    #[test]
    fn trusted_networks() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1, ::1").expect("valid");
        assert!(trusted.contains("10.200.0.1".parse().expect("ip")));
        assert!(!trusted.contains("11.0.0.1".parse().expect("ip")));
        assert!(trusted.contains("192.168.1.1".parse().expect("ip")));
        assert!(!trusted.contains("192.168.1.2".parse().expect("ip")));
        assert!(trusted.contains("::1".parse().expect("ip")));
        assert!(
            TrustedProxies::parse("0.0.0.0/0")
                .expect("all")
                .contains("8.8.8.8".parse().expect("ip"))
        );
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("example.com").is_err());
        assert!(
            !TrustedProxies::parse("none")
                .expect("none")
                .contains("127.0.0.1".parse().expect("ip"))
        );
    }
}
