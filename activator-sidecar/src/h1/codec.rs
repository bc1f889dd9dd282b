//! HTTP/1.1 message heads and body framing for the fast path: parse a head with `httparse`,
//! write the head to forward (hop-by-hop headers removed, `X-Forwarded-*` added) straight
//! into an output buffer, and find where a body ends without copying or re-encoding it.
//!
//! Everything here is pure: bytes in, bytes and decisions out.

use std::mem::MaybeUninit;

use crate::rules::{self, HopPolicy, MAX_HEAD, MAX_HEADERS, Peer, Refusal, TraceId, is_tchar};

/// How a message body is delimited, and how much of it is still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`: this many bytes remain.
    Length(u64),
    /// `Transfer-Encoding: chunked`, relayed as is while the decoder follows the chunks.
    Chunked(Chunked),
    /// A response without length: everything until the replica closes.
    UntilEof,
    /// Complete (or never had a body).
    Done,
}

/// Where a chunked body's decoder stands (RFC 9112 §7.1, strictly: a size is 1 to 16 hex
/// digits and nothing else, whitespace may only precede an extension or the CR, extensions
/// are tokens and quoted strings, every line ends in CRLF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Chunked {
    /// Reading the hex size; `digits` so far.
    #[default]
    Start,
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    SizeWs {
        size: u64,
    },
    /// In `;name=value` extensions, up to CR; `len` bytes so far.
    Extension {
        size: u64,
        quoted: bool,
        escaped: bool,
        len: u16,
    },
    /// Saw the CR ending the size line.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer field line, or of the final empty line; `len`: trailer bytes
    /// so far.
    TrailerStart {
        len: u32,
    },
    /// In a trailer field's name (tokens only; its first bytes lowercased in `name`).
    TrailerName {
        len: u32,
        name: TrailerName,
    },
    /// In a trailer field's value, up to CR.
    TrailerValue {
        len: u32,
    },
    TrailerLf {
        len: u32,
    },
    EndLf,
    /// After the final CRLF.
    End,
}

/// Longest chunk extension on one size line.
const MAX_CHUNK_EXTENSION: u16 = 4096;

/// The start of a trailer field's name, lowercased: enough to recognise the fields a trailer
/// must not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrailerName {
    bytes: [u8; 20],
    len: u8,
}

/// Fields that frame, route or control the message: not allowed in trailers (RFC 9110
/// §6.5.1), where a later hop might honour them.
const FORBIDDEN_TRAILERS: &[&[u8]] = &[
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"trailer",
    b"connection",
    b"keep-alive",
    b"te",
    b"upgrade",
    b"expect",
];

impl TrailerName {
    fn push(mut self, byte: u8) -> Self {
        if usize::from(self.len) < self.bytes.len() {
            self.bytes[usize::from(self.len)] = byte.to_ascii_lowercase();
        }
        self.len = self.len.saturating_add(1);
        self
    }

    fn forbidden(&self) -> bool {
        let len = usize::from(self.len);
        len <= self.bytes.len() && FORBIDDEN_TRAILERS.contains(&&self.bytes[..len])
    }
}

/// A body that is not framed the way it says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct FramingError(&'static str);

/// What the fast path learned from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head in the input, including the empty line.
    pub len: usize,
    pub framing: Framing,
    /// The client asked to close after this exchange (`Connection: close`).
    pub close: bool,
    /// `HEAD`: the response has no body whatever its headers say.
    pub head_method: bool,
    /// The host (the `Host` header, or an absolute target's authority), lowercase, without
    /// port; only when the role asked for it.
    pub host: Option<String>,
    /// A Knative network probe (`K-Network-Probe`), answered by the sidecar itself.
    pub probe: bool,
    /// The declared `Content-Length`, for buffer accounting.
    pub content_length: u64,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before its body.
    pub expect_continue: bool,
    /// The request's trace (its own `traceparent`, or the one this hop started), for logs.
    pub trace: Option<TraceId>,
}

/// The outcome of parsing what has arrived of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedRequest {
    /// The head is not complete yet.
    Partial,
    /// A head the fast path forwards; its rewritten form was written to the output.
    Head(RequestHead),
    /// A valid request the general server answers: HTTP/1.0, `OPTIONS *`, an upgrade.
    /// `close`: the connection ends after it; `upgrade`: it asks to switch protocols.
    General { close: bool, upgrade: bool },
    /// HTTP/2's connection preface: the connection is the general server's.
    Http2,
    /// A request the rules refuse; answered with its status, then the connection closes.
    Refused(Refusal),
}

/// What the fast path learned from a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The replica closes the connection after this response.
    pub close: bool,
    /// A 1xx interim response: relay it and read the next head.
    pub interim: bool,
}

/// A response head the fast path cannot relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the replica sent a malformed response head: {0}")]
    Malformed(String),
    #[error("the replica sent a response head over {MAX_HEAD} bytes")]
    TooLarge,
    #[error("the replica switched protocols without being asked to")]
    UnexpectedUpgrade,
}

// === impl Framing ===

impl Framing {
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done)
    }

    /// How many bytes at the start of `data` belong to this body; advances past them. The rest
    /// belongs to the next message.
    pub fn consume(&mut self, data: &[u8]) -> Result<usize, FramingError> {
        match self {
            Framing::Done => Ok(0),
            Framing::UntilEof => Ok(data.len()),
            Framing::Length(remaining) => {
                let n = data
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = Framing::Done;
                }
                Ok(n)
            }
            Framing::Chunked(state) => {
                let n = state.consume(data)?;
                if *state == Chunked::End {
                    *self = Framing::Done;
                }
                Ok(n)
            }
        }
    }

    /// The body ended with the connection: complete only if it was delimited by that.
    pub fn end_of_stream(&mut self) -> bool {
        match self {
            Framing::UntilEof | Framing::Done => {
                *self = Framing::Done;
                true
            }
            _ => false,
        }
    }
}

// === impl Chunked ===

impl Chunked {
    /// Advances over `data`; returns the bytes consumed, stopping right after the final CRLF.
    fn consume(&mut self, data: &[u8]) -> Result<usize, FramingError> {
        let mut i = 0;
        while i < data.len() && *self != Chunked::End {
            if let Chunked::Data { remaining } = self {
                let n = (data.len() - i).min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= n as u64;
                i += n;
                if *remaining == 0 {
                    *self = Chunked::DataCr;
                }
                continue;
            }
            let byte = data[i];
            i += 1;
            *self = self.step(byte)?;
        }
        Ok(i)
    }

    fn step(self, byte: u8) -> Result<Chunked, FramingError> {
        Ok(match (self, byte) {
            (Chunked::Start, _) => match hex(byte) {
                Some(d) => Chunked::Size {
                    size: u64::from(d),
                    digits: 1,
                },
                None => return Err(FramingError("chunk size expected")),
            },
            (Chunked::Size { size, digits }, _) => match hex(byte) {
                Some(_) if digits >= 16 => return Err(FramingError("chunk size too long")),
                Some(d) => Chunked::Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                },
                None => after_size(size, byte)?,
            },
            (Chunked::SizeWs { size }, _) => after_size(size, byte)?,
            (
                Chunked::Extension {
                    size,
                    quoted,
                    escaped,
                    len,
                },
                _,
            ) => {
                if len >= MAX_CHUNK_EXTENSION {
                    return Err(FramingError("chunk extension too long"));
                }
                let len = len + 1;
                let visible = byte == b'\t' || byte == b' ' || (byte >= 0x21 && byte != 0x7f);
                match (quoted, escaped, byte) {
                    (false, _, b'\r') => Chunked::SizeLf { size },
                    (false, _, b'"') => extension(size, true, false, len),
                    (false, _, b';' | b'=' | b' ' | b'\t') => extension(size, false, false, len),
                    (false, _, _) if is_tchar(byte) => extension(size, false, false, len),
                    (true, true, _) if visible => extension(size, true, false, len),
                    (true, false, b'\\') => extension(size, true, true, len),
                    (true, false, b'"') => extension(size, false, false, len),
                    (true, false, _) if visible => extension(size, true, false, len),
                    _ => return Err(FramingError("invalid chunk extension")),
                }
            }
            (Chunked::SizeLf { size: 0 }, b'\n') => Chunked::TrailerStart { len: 0 },
            (Chunked::SizeLf { size }, b'\n') => Chunked::Data { remaining: size },
            (Chunked::DataCr, b'\r') => Chunked::DataLf,
            (Chunked::DataLf, b'\n') => Chunked::Start,
            (Chunked::TrailerStart { .. }, b'\r') => Chunked::EndLf,
            (
                Chunked::TrailerStart { len }
                | Chunked::TrailerName { len, .. }
                | Chunked::TrailerValue { len },
                _,
            ) if len as usize >= MAX_HEAD => {
                return Err(FramingError("trailers too large"));
            }
            // A field line starts with a name: no obs-fold, no bare request line.
            (Chunked::TrailerStart { len }, _) if is_tchar(byte) => Chunked::TrailerName {
                len: len + 1,
                name: TrailerName::default().push(byte),
            },
            (Chunked::TrailerName { len, name }, _) if is_tchar(byte) => Chunked::TrailerName {
                len: len + 1,
                name: name.push(byte),
            },
            (Chunked::TrailerName { name, .. }, b':') if name.forbidden() => {
                return Err(FramingError("a framing or routing field in trailers"));
            }
            (Chunked::TrailerName { len, .. }, b':') => Chunked::TrailerValue { len: len + 1 },
            (Chunked::TrailerValue { len }, b'\r') => Chunked::TrailerLf { len: len + 1 },
            (Chunked::TrailerValue { len }, _) if byte == b'\t' || byte >= 0x20 && byte != 0x7f => {
                Chunked::TrailerValue { len: len + 1 }
            }
            (Chunked::TrailerLf { len }, b'\n') => Chunked::TrailerStart { len: len + 1 },
            (
                Chunked::TrailerStart { .. }
                | Chunked::TrailerName { .. }
                | Chunked::TrailerValue { .. },
                _,
            ) => {
                return Err(FramingError("invalid trailer field"));
            }
            (Chunked::EndLf, b'\n') => Chunked::End,
            (
                Chunked::SizeLf { .. }
                | Chunked::DataLf
                | Chunked::EndLf
                | Chunked::TrailerLf { .. },
                _,
            ) => {
                return Err(FramingError("LF expected after CR"));
            }
            (Chunked::DataCr, _) => return Err(FramingError("CRLF expected after chunk data")),
            (Chunked::Data { .. } | Chunked::End, _) => {
                return Err(FramingError("internal: no byte expected"));
            }
        })
    }
}

fn extension(size: u64, quoted: bool, escaped: bool, len: u16) -> Chunked {
    Chunked::Extension {
        size,
        quoted,
        escaped,
        len,
    }
}

fn after_size(size: u64, byte: u8) -> Result<Chunked, FramingError> {
    match byte {
        b'\r' => Ok(Chunked::SizeLf { size }),
        b' ' | b'\t' => Ok(Chunked::SizeWs { size }),
        b';' => Ok(extension(size, false, false, 1)),
        b'\n' => Err(FramingError("bare LF after chunk size")),
        _ => Err(FramingError("invalid chunk size")),
    }
}

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

// === requests ===

/// The start of HTTP/2's connection preface (h2c with prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Parses the request head at the start of `input` and checks it against [`rules`]. When the
/// fast path relays it, writes the head to forward into `out`: the same method and target
/// (an absolute-form target in origin form, its authority as `Host`), the headers minus
/// hop-by-hop ones, and the forwarding headers of `policy` for `peer`. `want_host`: fill in
/// [`RequestHead::host`].
pub fn parse_request(
    input: &[u8],
    peer: &Peer,
    policy: &HopPolicy,
    want_host: bool,
    out: &mut Vec<u8>,
) -> ParsedRequest {
    if input.starts_with(&H2_PREFACE[..input.len().min(H2_PREFACE.len())]) {
        return if input.len() >= H2_PREFACE.len() {
            ParsedRequest::Http2
        } else {
            ParsedRequest::Partial
        };
    }
    // Left uninitialized: only the headers found are written (no 2 KB fill per request).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(input, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return ParsedRequest::Partial,
        Ok(httparse::Status::Partial) => return ParsedRequest::Refused(Refusal::HeadTooLarge),
        Err(error) => return ParsedRequest::Refused(Refusal::from_parse(error)),
    };
    if len > MAX_HEAD {
        return ParsedRequest::Refused(Refusal::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return ParsedRequest::Refused(Refusal::Malformed("incomplete request line"));
    };
    let facts = match rules::check_request(
        method,
        version,
        request.headers.iter().map(|h| (h.name, h.value)),
    ) {
        Ok(facts) => facts,
        Err(refusal) => return ParsedRequest::Refused(refusal),
    };
    let close = facts.close || (version == 0 && !facts.keep_alive);
    if facts.upgrade {
        // The connection becomes the upgraded protocol's: the general server splices it.
        return ParsedRequest::General {
            close: true,
            upgrade: true,
        };
    }
    let absolute;
    let (host, path): (&[u8], &str) = if target.starts_with('/') {
        (facts.host, target)
    } else if let Some((authority, path)) = rules::authority(target) {
        absolute = path;
        (authority.as_bytes(), &absolute)
    } else if target == "*" && method == "OPTIONS" {
        return ParsedRequest::General {
            close,
            upgrade: false,
        };
    } else {
        return ParsedRequest::Refused(Refusal::Malformed("unsupported request target"));
    };
    if version == 0 {
        // HTTP/1.0's keep-alive rules and bodies without length: the general server's job.
        return ParsedRequest::General {
            close,
            upgrade: false,
        };
    }
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !host.is_empty() {
        push_header(out, b"host", host);
    }
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("host")
            || header.name.eq_ignore_ascii_case("transfer-encoding")
            || !rules::forwards(header.name, &facts.connection)
        {
            continue;
        }
        push_header(out, header.name.as_bytes(), header.value);
    }
    if facts.chunked {
        // The framing the body is relayed in, spelled one way for the next hop.
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    let trace = rules::forwarding_headers(&facts, peer, policy, host, out);
    out.extend_from_slice(b"\r\n");
    let framing = match (facts.chunked, facts.content_length) {
        (true, _) => Framing::Chunked(Chunked::Start),
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Done,
    };
    let host = match std::str::from_utf8(host) {
        Ok(host) if want_host => Some(mecha_common::routing::normalize_host(host)),
        _ => None,
    };
    ParsedRequest::Head(RequestHead {
        len,
        framing,
        close,
        head_method: method == "HEAD",
        host,
        probe: facts.probe,
        content_length: facts.content_length.unwrap_or(0),
        expect_continue: facts.expect,
        trace,
    })
}

/// How far the request at the start of `input` (checked by [`parse_request`]) reaches: its
/// head's length and its body's framing, for the general server's [`crate::h1::Guarded`].
pub fn request_extent(input: &[u8]) -> Option<(usize, Framing)> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(len)) =
        request.parse_with_uninit_headers(input, &mut headers)
    else {
        return None;
    };
    let facts = rules::check_request(
        request.method?,
        request.version?,
        request.headers.iter().map(|h| (h.name, h.value)),
    )
    .ok()?;
    let framing = match (facts.chunked, facts.content_length) {
        (true, _) => Framing::Chunked(Chunked::Start),
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Done,
    };
    Some((len, framing))
}

/// The request head `head` (checked by [`parse_request`]) as hyper would give it to a
/// handler: method, target (origin or absolute form), version and every header field as sent.
/// Like hyper, the target and the field values are slices of `head`, not copies. `None` if
/// hyper would not take it either.
pub fn request_parts(head: &bytes::Bytes) -> Option<http::request::Parts> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(_)) = request.parse_with_uninit_headers(head, &mut headers)
    else {
        return None;
    };
    let method = http::Method::from_bytes(request.method?.as_bytes()).ok()?;
    let uri = http::Uri::from_maybe_shared(head.slice_ref(request.path?.as_bytes())).ok()?;
    let version = match request.version? {
        1 => http::Version::HTTP_11,
        _ => http::Version::HTTP_10,
    };
    let mut map = http::HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        map.append(
            http::HeaderName::from_bytes(header.name.as_bytes()).ok()?,
            http::HeaderValue::from_maybe_shared(head.slice_ref(header.value)).ok()?,
        );
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = map;
    Some(parts)
}

// === responses ===

/// Parses the response head at the start of `input` (`Ok(None)`: not complete yet) and
/// writes the head to relay into `out`. `head_method`: the request was `HEAD`; `close`: the
/// client's connection closes after this response, which the relayed head then says.
pub fn parse_response(
    input: &[u8],
    head_method: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        input,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(ResponseError::TooLarge),
        Err(error) => return Err(ResponseError::Malformed(error.to_string())),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err(ResponseError::Malformed("no status".into()));
    };
    if status == 101 {
        return Err(ResponseError::UnexpectedUpgrade);
    }
    let facts = rules::check_response(response.headers.iter().map(|h| (h.name, h.value)))
        .map_err(|reason| ResponseError::Malformed(reason.into()))?;
    let transfer_encoding = facts.chunked;
    let content_length = facts.content_length;
    let interim = (100..200).contains(&status);
    let framing = if interim || head_method || status == 204 || status == 304 {
        Framing::Done
    } else {
        match (transfer_encoding, content_length) {
            (Some(true), _) => Framing::Chunked(Chunked::Start),
            (Some(false), _) => Framing::UntilEof,
            (None, Some(0)) => Framing::Done,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilEof,
        }
    };
    // HTTP/1.0 replicas close unless they say otherwise.
    // Both framings at once is faulty framing (RFC 9112 §6.3): relay it as chunked, then
    // never reuse the connection.
    let upstream_close = facts.close
        || (version == 0 && !facts.keep_alive)
        || (transfer_encoding.is_some() && content_length.is_some());
    let close_client = close || framing == Framing::UntilEof;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name;
        let framing_header = name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding");
        if !rules::forwards_response(name, &facts.connection)
            || (transfer_encoding.is_some() && name.eq_ignore_ascii_case("content-length"))
            // 1xx and 204 have no body and must not say otherwise (RFC 9110 §8.6, §6.1).
            || (framing_header && (interim || status == 204))
        {
            continue;
        }
        push_header(out, name.as_bytes(), header.value);
    }
    if close_client && !interim {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        close: upstream_close || framing == Framing::UntilEof,
        interim,
    }))
}

/// Writes a complete response of the sidecar's own (errors, probe answers).
pub fn write_answer(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        push_header(out, name.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

// === helpers ===

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn itoa3(status: u16) -> [u8; 3] {
    let status = status.min(999);
    [
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(input: &str) -> (ParsedRequest, String) {
        let mut out = Vec::new();
        let policy = HopPolicy::default();
        let peer = Peer::new("10.0.0.7".parse().expect("ip"), &policy);
        let parsed = parse_request(input.as_bytes(), &peer, &policy, true, &mut out);
        (parsed, String::from_utf8(out).expect("utf-8"))
    }

    fn head(input: &str) -> (RequestHead, String) {
        match request(input) {
            (ParsedRequest::Head(head), out) => {
                let end = input.find("\r\n\r\n").expect("a head") + 4;
                assert_eq!(head.len, end, "the head ends after the empty line");
                (head, out)
            }
            (other, _) => panic!("expected a head, got {other:?}"),
        }
    }

    #[test]
    fn request_parts_are_what_hyper_would_give_a_handler() {
        let parts = request_parts(&bytes::Bytes::from_static(
            b"POST http://Broker:8080/default/b?x=1 HTTP/1.1\r\nHost: broker\r\n\
              Ce-Id: 1\r\nce-note: a%20b\r\nCe-Id: 2\r\ncontent-length: 0\r\n\r\nNEXT",
        ))
        .expect("parts");
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(parts.uri.path(), "/default/b");
        assert_eq!(parts.uri.query(), Some("x=1"));
        assert_eq!(
            parts.uri.authority().map(|a| a.as_str()),
            Some("Broker:8080")
        );
        assert_eq!(parts.version, http::Version::HTTP_11);
        let ids: Vec<_> = parts.headers.get_all("ce-id").iter().collect();
        assert_eq!(ids, ["1", "2"], "repeated fields kept, in order");
        assert_eq!(parts.headers["ce-note"], "a%20b");
        assert_eq!(parts.headers["host"], "broker");
        let origin = request_parts(&bytes::Bytes::from_static(b"OPTIONS /a HTTP/1.1\r\n\r\n"))
            .expect("parts");
        assert_eq!(
            (origin.method, origin.uri.to_string()),
            (http::Method::OPTIONS, "/a".into())
        );
        assert!(
            request_parts(&bytes::Bytes::from_static(
                b"GET /a HTTP/1.1\r\nhost: x\r\n"
            ))
            .is_none(),
            "incomplete"
        );
    }

    #[test]
    fn a_request_is_forwarded_without_hop_by_hop_headers() {
        let (head, out) = head(
            "GET /a?b=1 HTTP/1.1\r\nHost: Hello.Default.localhost:8080\r\n\
             Connection: keep-alive, x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\n\
             TE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\nAccept: a/b\r\n\r\nNEXT",
        );
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nhost: Hello.Default.localhost:8080\r\nAccept: */*\r\n\
             Accept: a/b\r\nx-forwarded-for: 10.0.0.7\r\nx-forwarded-proto: http\r\n\
             forwarded: for=10.0.0.7;proto=http;host=\"Hello.Default.localhost:8080\"\r\n\r\n"
        );
        assert_eq!(head.host.as_deref(), Some("hello.default.localhost"));
        assert_eq!(head.framing, Framing::Done);
        assert!(!head.close && !head.probe && !head.head_method);
    }

    #[test]
    fn an_absolute_target_is_forwarded_in_origin_form_with_its_authority_as_host() {
        let (head, out) = head("GET http://b.default.localhost/x?y HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(
            out.starts_with("GET /x?y HTTP/1.1\r\nhost: b.default.localhost\r\nx-forwarded-for"),
            "{out}"
        );
        assert_eq!(head.host.as_deref(), Some("b.default.localhost"));
    }

    #[test]
    fn request_framing() {
        let (h, _) = head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.content_length, 5);
        let (h, out) = head(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked(Chunked::Start));
        assert!(h.close);
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(!out.contains("Connection"), "{out}");
        let (h, _) = head("HEAD / HTTP/1.1\r\nHost: a\r\nK-Network-Probe: queue\r\n\r\n");
        assert!(h.head_method && h.probe);
        let (h, _) =
            head("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn requests_for_the_general_server_and_refusals() {
        for input in [
            "GET / HTTP/1.0\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(
                matches!(
                    request(input).0,
                    ParsedRequest::General { upgrade: false, .. }
                ),
                "{input}"
            );
        }
        assert_eq!(
            request(
                "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
            )
            .0,
            ParsedRequest::General {
                close: true,
                upgrade: true
            }
        );
        assert_eq!(
            request("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").0,
            ParsedRequest::Http2
        );
        assert_eq!(request("PRI * HTTP/2.0\r\n").0, ParsedRequest::Partial);
        for (input, status) in [
            (
                "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                405,
            ),
            ("GET https://example.com/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400),
        ] {
            match request(input).0 {
                ParsedRequest::Refused(refusal) => {
                    assert_eq!(refusal.status(), status, "{input:?}: {refusal}");
                }
                other => panic!("{input:?}: expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(
            request("GET / HTTP/1.1\r\nHost: a").0,
            ParsedRequest::Partial
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            request(&huge).0,
            ParsedRequest::Refused(Refusal::HeadTooLarge)
        );
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: 1\r\n".repeat(MAX_HEADERS)
        );
        assert_eq!(
            request(&many).0,
            ParsedRequest::Refused(Refusal::TooManyHeaders)
        );
    }

    fn response(input: &str, head_method: bool, close: bool) -> (ResponseHead, String) {
        let mut out = Vec::new();
        let head = parse_response(input.as_bytes(), head_method, close, &mut out)
            .expect("valid")
            .expect("complete");
        (head, String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn response_heads_and_framing() {
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
            false,
            false,
        );
        assert_eq!(
            (h.status, h.framing, h.close),
            (200, Framing::Length(2), false)
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(
            h.len,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n".len()
        );
        // HEAD and 304 have no body whatever the length says.
        let (h, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false);
        assert_eq!(h.framing, Framing::Done);
        let (h, _) = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
            false,
        );
        assert_eq!(h.framing, Framing::Done);
        // Chunked wins over a length, which is dropped.
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        assert_eq!(h.framing, Framing::Chunked(Chunked::Start));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        // No length: until the replica closes, and the client's connection closes too.
        let (h, out) = response("HTTP/1.1 200 OK\r\n\r\n", false, false);
        assert_eq!((h.framing, h.close), (Framing::UntilEof, true));
        assert!(out.ends_with("connection: close\r\n\r\n"));
        // HTTP/1.0 replicas close unless they keep alive; Connection: close is honoured.
        let (h, _) = response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false, false);
        assert!(h.close);
        let (h, _) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            false,
            false,
        );
        assert!(h.close);
        let (h, out) = response(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            false,
            true,
        );
        assert!(h.interim);
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n");
    }

    #[test]
    fn a_response_keeps_its_framing_and_bodiless_statuses_carry_none() {
        // Connection naming the framing header does not take it away.
        let (h, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n",
            false,
            false,
        );
        assert_eq!(h.framing, Framing::Length(3));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        // 204 and 1xx never say they have a body.
        let (h, out) = response(
            "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            false,
            false,
        );
        assert_eq!(h.framing, Framing::Done);
        assert_eq!(out, "HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn bad_responses_are_errors() {
        let mut out = Vec::new();
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                false,
                false,
                &mut out
            ),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(b"garbage\r\n\r\n", false, false, &mut out),
            Err(ResponseError::Malformed(_))
        ));
        assert_eq!(
            parse_response(
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                false,
                false,
                &mut out
            ),
            Err(ResponseError::UnexpectedUpgrade)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n", false, false, &mut out),
            Ok(None)
        );
    }

    #[test]
    fn length_framing_stops_at_the_end() {
        let mut framing = Framing::Length(5);
        assert_eq!(framing.consume(b"abc"), Ok(3));
        assert_eq!(framing.consume(b"defgh"), Ok(2));
        assert!(framing.is_done());
        assert_eq!(framing.consume(b"more"), Ok(0));
    }

    /// Feeds `body` in pieces of every size; the end must be found at the same byte.
    fn chunked_end(body: &[u8]) -> Result<usize, FramingError> {
        let mut expected = None;
        for piece in 1..=body.len() {
            let mut framing = Framing::Chunked(Chunked::Start);
            let mut consumed = 0;
            for part in body.chunks(piece) {
                let n = framing.consume(part)?;
                consumed += n;
                if framing.is_done() {
                    break;
                }
                assert_eq!(n, part.len(), "an unfinished body consumes everything");
            }
            assert!(framing.is_done(), "piece size {piece}: end not found");
            assert!(expected.is_none_or(|e| e == consumed), "piece size {piece}");
            expected = Some(consumed);
        }
        Ok(expected.unwrap_or(0))
    }

    #[test]
    fn chunked_framing_finds_the_end_in_any_split() {
        let body = b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n3 ; a=\"q\\\"; x\" ;b\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1";
        assert_eq!(chunked_end(body), Ok(body.len() - "GET / HTTP/1.1".len()));
        let trailers = b"3\r\nabc\r\n0\r\nx-sum: 1\r\ny: 2\r\n\r\nnext";
        assert_eq!(chunked_end(trailers), Ok(trailers.len() - 4));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for body in [
            &b"x\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"1234567890abcdef0\r\n",
            b"00000000000000005\r\n",
            b"0\r\n\n",
            b"5x\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"1_0\r\n",
            b"-1\r\n",
            b" 5\r\n",
            b"5 x\r\n",
            b"5;a\0b\r\n",
            b"5;a\nb\r\n",
            b"5;a=\"b\r\n",
            b"5;a\rb\r\n",
            b"5;a@b\r\nhello\r\n",
            b"0\r\nx: 1\nmore\r\n\r\n",
            b"0\r\nx: 1\r\r\n",
            b"0\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
            b"0\r\nX: y\r\n z\r\n\r\n",
            b"0\r\nContent-Length: 5\r\n\r\n",
            b"0\r\ntransfer-encoding: chunked\r\n\r\n",
            b"0\r\n: novalue\r\n\r\n",
            b"0\r\nx y: 1\r\n\r\n",
        ] {
            let mut framing = Framing::Chunked(Chunked::Start);
            assert!(
                framing.consume(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn answers_are_complete_responses() {
        let mut out = Vec::new();
        write_answer(
            &mut out,
            http::StatusCode::SERVICE_UNAVAILABLE,
            &[("retry-after", "1")],
            b"busy\n",
            true,
        );
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 5\r\n\
             connection: close\r\n\r\nbusy\n"
        );
    }
}
