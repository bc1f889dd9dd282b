//! HTTP/1.1 message heads and body framing for the fast path: parse a head with `httparse`,
//! write the head to forward (hop-by-hop headers removed, `X-Forwarded-*` added) straight
//! into an output buffer, and find where a body ends without copying or re-encoding it.
//!
//! Everything here is pure: bytes in, bytes and decisions out.

use std::mem::MaybeUninit;
use std::net::IpAddr;

/// Longest request or response head the fast path reads; a longer request head goes to the
/// general server (which answers 431), a longer response head is a replica failure.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers per request the fast path parses; more go to the general server.
const MAX_REQUEST_HEADERS: usize = 64;
/// Headers per response (hyper's limit too).
const MAX_RESPONSE_HEADERS: usize = 100;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1). The fast path
/// keeps `Transfer-Encoding`: bodies are relayed in the framing they arrived in.
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

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Chunked {
    /// Reading the hex size; `digits` so far.
    #[default]
    Start,
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: whitespace or a `;extension` up to CR.
    Extension {
        size: u64,
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
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    TrailerLine,
    EndLf,
    /// After the final CRLF.
    End,
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
    /// The `Host` header, lowercase, without port.
    pub host: Option<String>,
    /// A Knative network probe (`K-Network-Probe`), answered by the sidecar itself.
    pub probe: bool,
    /// The declared `Content-Length`, for buffer accounting.
    pub content_length: u64,
}

/// The outcome of parsing what has arrived of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedRequest {
    /// The head is not complete yet.
    Partial,
    /// A head the fast path forwards; its rewritten form was written to the output.
    Head(RequestHead),
    /// Something the fast path leaves to the general server: HTTP/1.0, `CONNECT`, an absolute
    /// or `*` target, `Upgrade`, `Expect`, unusual framing, too many headers, HTTP/2's
    /// preface, or a malformed head (which the general server answers with 400).
    Unsupported,
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
            *self = match (*self, byte) {
                (Chunked::Start, _) => match hex(byte) {
                    Some(d) => Chunked::Size {
                        size: u64::from(d),
                        digits: 1,
                    },
                    None => return Err(FramingError("chunk size expected")),
                },
                (Chunked::Size { size, digits }, _) => match hex(byte) {
                    Some(_) if digits >= 15 => return Err(FramingError("chunk size too large")),
                    Some(d) => Chunked::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    None => after_size(size, byte)?,
                },
                (Chunked::Extension { size }, _) => after_size(size, byte)?,
                (Chunked::SizeLf { size: 0 }, b'\n') => Chunked::TrailerStart,
                (Chunked::SizeLf { size }, b'\n') => Chunked::Data { remaining: size },
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataLf, b'\n') => Chunked::Start,
                (Chunked::TrailerStart, b'\r') => Chunked::EndLf,
                (Chunked::TrailerStart, b'\n') => {
                    return Err(FramingError("bare LF in trailers"));
                }
                (Chunked::TrailerLine, b'\n') => Chunked::TrailerStart,
                (Chunked::TrailerStart | Chunked::TrailerLine, _) => Chunked::TrailerLine,
                (Chunked::EndLf, b'\n') => Chunked::End,
                (Chunked::SizeLf { .. } | Chunked::DataLf | Chunked::EndLf, _) => {
                    return Err(FramingError("LF expected"));
                }
                (Chunked::DataCr, _) => return Err(FramingError("CRLF expected after chunk data")),
                (Chunked::Data { .. } | Chunked::End, _) => unreachable!("handled above"),
            };
        }
        Ok(i)
    }
}

fn after_size(size: u64, byte: u8) -> Result<Chunked, FramingError> {
    match byte {
        b'\r' => Ok(Chunked::SizeLf { size }),
        b'\n' => Err(FramingError("bare LF after chunk size")),
        // Whitespace before an extension, and the extension itself, are skipped.
        _ => Ok(Chunked::Extension { size }),
    }
}

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

// === requests ===

/// Parses the request head at the start of `input`. When it is complete and supported, writes
/// the head to forward into `out`: the same method, target and headers, minus hop-by-hop
/// headers, with `peer` (the client's address, see [`peer_ip`]) appended to
/// `X-Forwarded-For` and `X-Forwarded-Proto: http` unless the client sent one. `want_host`:
/// fill in [`RequestHead::host`].
pub fn parse_request(
    input: &[u8],
    peer: &[u8],
    want_host: bool,
    out: &mut Vec<u8>,
) -> ParsedRequest {
    // Left uninitialized: only the headers found are written (no 2 KB fill per request).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(input, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return ParsedRequest::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return ParsedRequest::Unsupported,
    };
    let (Some(method), Some(path), Some(1)) = (request.method, request.path, request.version)
    else {
        return ParsedRequest::Unsupported;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return ParsedRequest::Unsupported;
    }
    let connection = Connection::of(request.headers);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut host = None;
    let mut probe = false;
    let mut forwarded_for: Option<&[u8]> = None;
    let mut forwarded_proto = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_length(header.value) else {
                return ParsedRequest::Unsupported;
            };
            if content_length.is_some_and(|seen| seen != n) {
                return ParsedRequest::Unsupported;
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return ParsedRequest::Unsupported;
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return ParsedRequest::Unsupported;
        } else if want_host && name.eq_ignore_ascii_case("host") {
            let Ok(value) = std::str::from_utf8(header.value) else {
                return ParsedRequest::Unsupported;
            };
            host = Some(mecha_common::routing::normalize_host(value));
        } else if name.eq_ignore_ascii_case("k-network-probe") {
            probe = true;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            if forwarded_for.is_some() {
                // Several X-Forwarded-For lines: leave joining them to the general server.
                return ParsedRequest::Unsupported;
            }
            forwarded_for = Some(header.value);
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            forwarded_proto = true;
        }
    }
    if chunked && content_length.is_some() {
        // Both framings at once is how requests are smuggled; the general server refuses it.
        return ParsedRequest::Unsupported;
    }
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("x-forwarded-for") || connection.drops(header.name) {
            continue;
        }
        push_header(out, header.name.as_bytes(), header.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(existing) = forwarded_for {
        out.extend_from_slice(existing);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer);
    out.extend_from_slice(b"\r\n");
    if !forwarded_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = match (chunked, content_length) {
        (true, _) => Framing::Chunked(Chunked::Start),
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Done,
    };
    ParsedRequest::Head(RequestHead {
        len,
        framing,
        close: connection.close,
        head_method: method == "HEAD",
        host,
        probe,
        content_length: content_length.unwrap_or(0),
    })
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
    let mut headers = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
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
    let connection = Connection::of(response.headers);
    let mut content_length = None;
    let mut transfer_encoding: Option<bool> = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(header.value)
                .ok_or_else(|| ResponseError::Malformed("invalid Content-Length".into()))?;
            if content_length.is_some_and(|seen| seen != n) {
                return Err(ResponseError::Malformed(
                    "conflicting Content-Length".into(),
                ));
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked only counts as the framing when it is the last coding.
            let last = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default();
            transfer_encoding = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
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
    let upstream_close = connection.close || (version == 0 && !connection.keep_alive);
    let close_client = close || framing == Framing::UntilEof;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name;
        let transfer = name.eq_ignore_ascii_case("transfer-encoding");
        if (connection.drops(name) && !transfer)
            || (transfer_encoding.is_some() && name.eq_ignore_ascii_case("content-length"))
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

/// What the `Connection` headers of a message say.
struct Connection<'a> {
    close: bool,
    keep_alive: bool,
    /// Further headers the sender named as hop-by-hop.
    named: Vec<&'a [u8]>,
}

impl<'a> Connection<'a> {
    fn of(headers: &[httparse::Header<'a>]) -> Self {
        let mut connection = Connection {
            close: false,
            keep_alive: false,
            named: Vec::new(),
        };
        for header in headers {
            if !header.name.eq_ignore_ascii_case("connection") {
                continue;
            }
            for token in header.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    connection.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    connection.keep_alive = true;
                } else if !token.is_empty() {
                    connection.named.push(token);
                }
            }
        }
        connection
    }

    /// Whether a header named `name` stays on this hop.
    fn drops(&self, name: &str) -> bool {
        HOP_BY_HOP
            .iter()
            .any(|h| h.len() == name.len() && name.eq_ignore_ascii_case(h))
            || self
                .named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A client address as it goes into `X-Forwarded-For` (formatted once per connection).
pub fn peer_ip(ip: IpAddr) -> Vec<u8> {
    ip.to_string().into_bytes()
}

/// A `Content-Length` value: digits only (no sign, no spaces inside, no list).
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
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
    use std::net::Ipv4Addr;

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

    fn request(input: &str) -> (ParsedRequest, String) {
        let mut out = Vec::new();
        let parsed = parse_request(input.as_bytes(), &peer_ip(PEER), true, &mut out);
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
    fn a_request_is_forwarded_without_hop_by_hop_headers() {
        let (head, out) = head(
            "GET /a?b=1 HTTP/1.1\r\nHost: Hello.Default.localhost:8080\r\n\
             Connection: keep-alive, x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\n\
             TE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\nNEXT",
        );
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: Hello.Default.localhost:8080\r\nAccept: */*\r\n\
             x-forwarded-for: 1.2.3.4, 10.0.0.7\r\nx-forwarded-proto: http\r\n\r\n"
        );
        assert_eq!(head.host.as_deref(), Some("hello.default.localhost"));
        assert_eq!(head.framing, Framing::Done);
        assert!(!head.close && !head.probe && !head.head_method);
    }

    #[test]
    fn request_framing() {
        let (h, _) = head("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.content_length, 5);
        let (h, out) =
            head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked(Chunked::Start));
        assert!(h.close);
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        assert!(!out.contains("Connection"), "{out}");
        let (h, _) = head("HEAD / HTTP/1.1\r\nK-Network-Probe: queue\r\n\r\n");
        assert!(h.head_method && h.probe);
    }

    #[test]
    fn unusual_requests_go_to_the_general_server() {
        for input in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nX-Forwarded-For: a\r\nX-Forwarded-For: b\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert_eq!(request(input).0, ParsedRequest::Unsupported, "{input}");
        }
        assert_eq!(
            request("GET / HTTP/1.1\r\nHost: a").0,
            ParsedRequest::Partial
        );
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(request(&huge).0, ParsedRequest::Unsupported);
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
        let body = b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n0\r\n\r\nGET / HTTP/1.1";
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
            b"0\r\n\n",
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
