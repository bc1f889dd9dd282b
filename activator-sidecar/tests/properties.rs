//! Properties of the fast path's parser and framing, checked against an independent reading
//! of what it forwards:
//!
//! - a valid request split at any byte boundary parses the same as whole (the corpus, and
//!   generated requests in every framing);
//! - for any head, valid or mutated, that the fast path forwards, the head it writes is one
//!   that a strict independent parser frames exactly as the fast path did — the next hop can
//!   never see a different body length, which is what request smuggling needs.

use std::path::Path;

use activator_sidecar::h1::codec::{Chunked, Framing, ParsedRequest, RequestHead, parse_request};
use activator_sidecar::rules::{HopPolicy, Peer};
use proptest::prelude::*;

fn parse(input: &[u8]) -> (ParsedRequest, Vec<u8>) {
    let policy = HopPolicy::default();
    let peer = Peer::new("10.0.0.7".parse().expect("ip"), &policy);
    let mut out = Vec::new();
    let parsed = parse_request(input, &peer, &policy, true, &mut out);
    (parsed, out)
}

/// How the head `out` frames its body, read independently: httparse, then RFC 9112 §6.3.
/// `None`: the head is not one a strict recipient accepts as it is.
fn framing_of(out: &[u8]) -> Option<Framing> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = request.parse(out).ok()? else {
        return None;
    };
    if len != out.len() || request.version != Some(1) {
        return None;
    }
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).ok();
        match header.name.to_ascii_lowercase().as_str() {
            "host" => hosts += 1,
            "content-length" => {
                let n: u64 = value?.trim().parse().ok()?;
                if length.is_some_and(|l| l != n) {
                    return None;
                }
                length = Some(n);
            }
            "transfer-encoding" => codings.extend(
                value?
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            ),
            "connection" => {
                for option in value?.split(',').map(|o| o.trim().to_ascii_lowercase()) {
                    if ["content-length", "transfer-encoding", "host"].contains(&option.as_str()) {
                        return None;
                    }
                }
            }
            _ => {}
        }
    }
    if hosts != 1 {
        return None;
    }
    match (codings.as_slice(), length) {
        ([], Some(0) | None) => Some(Framing::Done),
        ([], Some(n)) => Some(Framing::Length(n)),
        ([only], None) if only == "chunked" => Some(Framing::Chunked(Chunked::Start)),
        _ => None,
    }
}

/// The forwarded head of a request the fast path relays frames the body as the fast path does.
fn assert_forwarded_framing(input: &[u8]) {
    if let (ParsedRequest::Head(head), out) = parse(input) {
        assert_eq!(
            framing_of(&out),
            Some(head.framing),
            "input {:?}\nforwarded {:?}",
            input.escape_ascii().to_string(),
            out.escape_ascii().to_string()
        );
    }
}

/// Feeds `input` in two parts at every boundary: the head parses the same, and the body's end
/// is found at the same byte.
fn assert_split_invariant(input: &[u8]) {
    let (whole, whole_out) = parse(input);
    let ParsedRequest::Head(head) = &whole else {
        return;
    };
    let end = body_end(head, &input[head.len..]);
    for at in 0..input.len() {
        let (prefix, out) = parse(&input[..at]);
        if at < head.len {
            assert_eq!(prefix, ParsedRequest::Partial, "split at {at}");
        } else {
            assert_eq!(prefix, whole, "split at {at}");
            assert_eq!(out, whole_out, "split at {at}");
        }
        if at > head.len {
            let mut framing = head.framing;
            let first = framing.consume(&input[head.len..at]);
            let rest = framing.consume(&input[at..]);
            let split = match (first, rest) {
                (Ok(a), Ok(b)) if framing.is_done() => Some(a + b),
                (Ok(a), _) if a < at - head.len => Some(a),
                _ => None,
            };
            assert_eq!(split, end, "body split at {at}");
        }
    }
}

fn body_end(head: &RequestHead, body: &[u8]) -> Option<usize> {
    let mut framing = head.framing;
    let n = framing.consume(body).ok()?;
    framing.is_done().then_some(n)
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(dir).expect("the corpus") {
        let text = std::fs::read_to_string(entry.expect("an entry").path()).expect("a case");
        let message: String = text
            .lines()
            .skip_while(|line| line.starts_with('#'))
            .collect();
        cases.push(unescape(&message));
    }
    cases
}

fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next().expect("an escape") {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'x' => {
                let hex = [bytes.next().expect("hex"), bytes.next().expect("hex")];
                out.push(
                    u8::from_str_radix(std::str::from_utf8(&hex).expect("hex"), 16).expect("hex"),
                );
            }
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_corpus_case_parses_the_same_split_anywhere_and_is_forwarded_framed_alike() {
    for case in corpus() {
        assert_split_invariant(&case);
        assert_forwarded_framing(&case);
    }
}

// === generated requests ===

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
}

fn value() -> impl Strategy<Value = String> {
    "[ -~]{0,20}".prop_map(|v| v.trim().to_string())
}

/// A valid request: method, target, headers, and a body in one of the framings (with chunk
/// extensions and trailers).
fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]);
    let path = "/[a-z0-9/?=&%]{0,20}";
    let headers = prop::collection::vec((token(), value()), 0..8);
    let body = prop::collection::vec(any::<u8>(), 0..200);
    let chunks = prop::collection::vec(1usize..40, 1..6);
    let extension = prop::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?");
    let trailers = prop::collection::vec((token(), value()), 0..3);
    let framing = 0u8..3;
    (
        method, path, headers, body, chunks, extension, trailers, framing,
    )
        .prop_map(
            |(method, path, headers, body, chunks, extension, trailers, framing)| {
                let mut out = format!("{method} {path} HTTP/1.1\r\nHost: echo\r\n").into_bytes();
                for (name, value) in headers {
                    let lower = name.to_ascii_lowercase();
                    if [
                        "host",
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "expect",
                        "upgrade",
                    ]
                    .contains(&lower.as_str())
                    {
                        continue;
                    }
                    out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                match framing {
                    0 => out.extend_from_slice(b"\r\n"),
                    1 => {
                        out.extend_from_slice(
                            format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                        );
                        out.extend_from_slice(&body);
                    }
                    _ => {
                        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        let mut rest = &body[..];
                        for size in chunks.iter().cycle() {
                            if rest.is_empty() {
                                break;
                            }
                            let (chunk, after) = rest.split_at((*size).min(rest.len()));
                            out.extend_from_slice(format!("{:x}", chunk.len()).as_bytes());
                            if let Some(extension) = &extension {
                                out.extend_from_slice(format!(";{extension}").as_bytes());
                            }
                            out.extend_from_slice(b"\r\n");
                            out.extend_from_slice(chunk);
                            out.extend_from_slice(b"\r\n");
                            rest = after;
                        }
                        out.extend_from_slice(b"0\r\n");
                        // Fields not allowed in trailers are refused by design.
                        for (name, value) in trailers.iter().filter(|(name, _)| {
                            ![
                                "content-length",
                                "transfer-encoding",
                                "host",
                                "trailer",
                                "connection",
                                "keep-alive",
                                "te",
                                "upgrade",
                                "expect",
                            ]
                            .contains(&name.to_ascii_lowercase().as_str())
                        }) {
                            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                        }
                        out.extend_from_slice(b"\r\n");
                    }
                }
                out
            },
        )
}

/// One edit of a request: replace, insert or delete a byte, or insert a piece that matters to
/// framing.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Splice(usize, &'static str),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let piece = prop::sample::select(vec![
        "\r\n",
        "\n",
        "\r",
        " ",
        "\t",
        ":",
        ",",
        "\0",
        "\r\nTransfer-Encoding: chunked",
        "\r\nContent-Length: 5",
        "\r\nContent-Length: 0",
        "\r\nHost: evil",
        "\r\nConnection: content-length",
        "\r\nConnection: transfer-encoding",
        "\r\n Transfer-Encoding: chunked",
        "chunked",
        ", chunked",
        "0\r\n\r\n",
        "5x",
        ";ext",
    ]);
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Replace(at, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), piece).prop_map(|(at, p)| Edit::Splice(at, p)),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply(mut input: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = input.len().max(1);
        match *edit {
            Edit::Replace(at, b) if !input.is_empty() => input[at % len] = b,
            Edit::Insert(at, b) => input.insert(at % (len + 1).min(input.len() + 1), b),
            Edit::Delete(at) if !input.is_empty() => {
                input.remove(at % len);
            }
            Edit::Splice(at, piece) => {
                let at = at % (input.len() + 1);
                input.splice(at..at, piece.bytes());
            }
            _ => {}
        }
    }
    input
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_requests_parse_the_same_split_anywhere(request in request()) {
        let (parsed, _) = parse(&request);
        let ParsedRequest::Head(head) = &parsed else {
            panic!("a valid request was not relayed: {parsed:?} {:?}", request.escape_ascii().to_string());
        };
        // The body ends exactly at the end of the message.
        prop_assert_eq!(head.len + body_end(head, &request[head.len..]).expect("complete"), request.len());
        assert_split_invariant(&request);
        assert_forwarded_framing(&request);
    }

    #[test]
    fn mutated_requests_are_refused_or_forwarded_with_the_same_framing(
        request in request(),
        edits in edits(),
    ) {
        let mutated = apply(request, &edits);
        assert_forwarded_framing(&mutated);
        assert_split_invariant(&mutated);
    }
}
