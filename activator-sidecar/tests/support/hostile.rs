//! Attacks from outside with real processes, shared by the end-to-end tests of this crate (the
//! `activator-sidecar` binary) and of `mecha` (`mecha up`; it includes this file by path):
//! a raw client, the recording upstream `recorder.py` and its log, and the check that after an
//! attack the upstream saw exactly what the client meant and 20 innocent clients each get
//! their own response over the same pooled replica connections.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::corpus::{Case, case, cases_starting_with};

/// The recording upstream (see its docstring): every request it parses goes to `RECORD_LOG`.
pub const RECORDER: &str = include_str!("recorder.py");

/// How many innocent clients follow each attack.
pub const INNOCENTS: usize = 20;

/// One request as the recording upstream parsed it.
#[derive(Clone, PartialEq, Eq)]
pub struct Seen {
    pub seq: u64,
    pub conn: u64,
    /// The request line as received.
    pub line: String,
    pub method: String,
    pub target: String,
    /// Names as sent, values as bytes, in the order received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body bytes, when the framing held.
    pub body: Option<u64>,
    /// Set when the upstream could not parse what it got (a body that broke its framing, or
    /// a head `http.server` refused).
    pub malformed: Option<String>,
    /// The connection ended inside the body: the proxy streamed a body whose client went away
    /// (and closed this connection). Not a request, and never answered.
    pub incomplete: bool,
}

/// The recording upstream's log.
#[derive(Debug, Clone)]
pub struct RecordLog {
    pub path: PathBuf,
}

/// A response as the client read it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// The recorder run directly as a process on a port the caller holds (it binds with
/// `SO_REUSEADDR`); killed on drop.
#[derive(Debug)]
pub struct Upstream {
    child: Child,
    pub addr: SocketAddr,
    pub log: RecordLog,
    dir: PathBuf,
}

// === impl Seen ===

impl Seen {
    fn from_json(value: &serde_json::Value) -> Self {
        let text = |key: &str| value[key].as_str().unwrap_or_default().to_string();
        let headers = value["headers"]
            .as_array()
            .map(|headers| {
                headers
                    .iter()
                    .map(|pair| {
                        (
                            pair[0].as_str().unwrap_or_default().to_string(),
                            latin1(&pair[1]),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let malformed = match (&value["malformed"], &value["error"]) {
            (serde_json::Value::String(why), _) => Some(why.clone()),
            (_, serde_json::Value::Number(status)) => Some(format!("answered {status}")),
            _ => None,
        };
        Self {
            seq: value["seq"].as_u64().expect("seq"),
            conn: value["conn"].as_u64().expect("conn"),
            line: text("line"),
            method: text("method"),
            target: text("target"),
            headers,
            body: value["body"].as_u64(),
            malformed,
            incomplete: value["incomplete"].is_string(),
        }
    }

    /// Every value of the header `name`, one per line received.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The one value of the header `name` as text; panics when it came on several lines.
    pub fn one(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        assert!(
            all.len() <= 1,
            "{name} came on {} lines: {self:?}",
            all.len()
        );
        all.first().map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

impl std::fmt::Debug for Seen {
    // Header values as text with the bytes outside printable ASCII escaped.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.escape_ascii()))
            .collect();
        f.debug_struct("Seen")
            .field("seq", &self.seq)
            .field("conn", &self.conn)
            .field("line", &self.line)
            .field("headers", &headers)
            .field("body", &self.body)
            .field("malformed", &self.malformed)
            .field("incomplete", &self.incomplete)
            .finish()
    }
}

/// A JSON string of code points up to U+00FF back to the bytes they stand for.
fn latin1(value: &serde_json::Value) -> Vec<u8> {
    value
        .as_str()
        .unwrap_or_default()
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("latin-1"))
        .collect()
}

// === impl RecordLog ===

impl RecordLog {
    /// Every complete line so far.
    pub fn entries(&self) -> Vec<Seen> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| Seen::from_json(&serde_json::from_str(line).expect("a JSON line")))
            .collect()
    }

    /// The latest request (the recorder logs a request before it answers it).
    pub fn last(&self) -> Seen {
        self.entries().pop().expect("the upstream saw nothing")
    }
}

// === impl Reply ===

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The request the recording upstream answered with this response, if it did.
    pub fn seen(&self) -> Option<Seen> {
        self.header("x-recorded")?;
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        Some(Seen::from_json(&value))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

// === impl Upstream ===

impl Upstream {
    /// Starts `recorder.py` on `port` (held by the caller) and waits until it listens.
    pub fn start(port: u16) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mecha-recorder-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory");
        std::fs::write(dir.join("recorder.py"), RECORDER).expect("write recorder.py");
        let log = RecordLog {
            path: dir.join("requests.jsonl"),
        };
        let child = Command::new("python3")
            .arg(dir.join("recorder.py"))
            .env("PORT", port.to_string())
            .env("RECORD_LOG", &log.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr);
        Self {
            child,
            addr,
            log,
            dir,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === the client ===

/// Waits until `addr` accepts connections.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listened on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `bytes`, closes the sending side, and reads every response until the server closes.
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<Reply> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // The server may answer and close before everything is written: that is an answer too.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut chunk = [0u8; 16384];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server never closed the connection: {e}"),
        }
        assert!(Instant::now() < deadline, "the server kept talking");
    }
    let mut replies = Vec::new();
    let mut rest = &received[..];
    while !rest.is_empty() {
        let (reply, used) = parse_reply(rest)
            .unwrap_or_else(|| panic!("not a response: {:?}", String::from_utf8_lossy(rest)));
        replies.push(reply);
        rest = &rest[used..];
    }
    replies
}

/// Writes `bytes` on `stream` and reads one response (the connection stays open).
pub fn send(stream: &mut TcpStream, bytes: &[u8]) -> Reply {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut received = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some((reply, used)) = parse_reply(&received) {
            assert_eq!(
                used,
                received.len(),
                "bytes after the response: {:?}",
                String::from_utf8_lossy(&received[used..])
            );
            return reply;
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!(
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("no response: {e}"),
        }
    }
}

/// Writes `bytes` into an open tunnel and reads as many bytes back.
pub fn through_tunnel(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    stream.write_all(bytes).expect("write");
    let mut back = vec![0u8; bytes.len()];
    stream.read_exact(&mut back).expect("the tunnel's answer");
    back
}

/// One request on a fresh connection, one response.
pub fn request(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    send(&mut stream, bytes)
}

/// The first whole response in `bytes` and its length. A response without `Content-Length`
/// (other than 1xx, 204 and 304) runs to the end of `bytes`, which must then be closed.
pub fn parse_reply(bytes: &[u8]) -> Option<(Reply, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(bytes).ok()? else {
        return None;
    };
    let status = response.code?;
    let headers: Vec<(String, Vec<u8>)> = response
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok());
    let body = match (status, length) {
        (100..=199 | 204 | 304, _) => 0,
        (_, Some(length)) => length,
        (_, None) => bytes.len() - head,
    };
    if bytes.len() < head + body {
        return None;
    }
    let reply = Reply {
        status,
        headers,
        body: bytes[head..head + body].to_vec(),
    };
    Some((reply, head + body))
}

/// User headers a function must see exactly as they were sent: several lines of one header
/// kept apart and in order, bytes outside ASCII untouched.
pub const USER_HEADERS: &[(&str, &[u8])] = &[
    ("X-Multi", b"one"),
    ("Accept", b"text/plain;q=0.9, */*"),
    ("X-Multi", b"two,  three"),
    ("X-Bytes", b"caf\xc3\xa9 \xff\x80 end"),
    ("Cookie", b"a=1"),
    ("Cookie", b"b=2"),
];

/// A W3C trace context a client sends, which must arrive unchanged.
pub const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
pub const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// A GET of `path` on `host` with [`USER_HEADERS`] and `extra` headers, on a fresh connection:
/// the request as the recording upstream saw it.
pub fn with_user_headers(addr: SocketAddr, host: &str, path: &str, extra: &[(&str, &str)]) -> Seen {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
    let extra = extra.iter().map(|(n, v)| (*n, v.as_bytes()));
    for (name, value) in USER_HEADERS.iter().copied().chain(extra) {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let reply = request(addr, &head);
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.seen().expect("the upstream's answer");
    assert_eq!(seen.target, path);
    assert_user_headers(&seen);
    seen
}

/// Every header of [`USER_HEADERS`] arrived as sent, byte for byte, line for line.
pub fn assert_user_headers(seen: &Seen) {
    for (name, _) in USER_HEADERS {
        let sent: Vec<&[u8]> = USER_HEADERS
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(seen.all(name), sent, "{name} in {seen:?}");
    }
}

/// A valid W3C `traceparent` (version 00) with non-zero trace and parent ids.
pub fn assert_valid_traceparent(value: &str) {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2),
        "not a traceparent: {value:?}"
    );
    assert_ne!(parts[1], "0".repeat(32), "an all-zero trace id: {value}");
    assert_ne!(parts[2], "0".repeat(16), "an all-zero parent id: {value}");
}

/// [`INNOCENTS`] clients at once, each on its own kept-alive connection, each asking for
/// `/innocent/{tag}/{i}` on `host`: their paths and responses.
pub fn innocents(addr: SocketAddr, host: &str, tag: &str) -> Vec<(String, Reply)> {
    let start = Arc::new(Barrier::new(INNOCENTS));
    let clients: Vec<_> = (0..INNOCENTS)
        .map(|i| {
            let start = start.clone();
            let path = format!("/innocent/{tag}/{i}");
            let head =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: innocent\r\n\r\n");
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                start.wait();
                let reply = send(&mut stream, head.as_bytes());
                (path, reply)
            })
        })
        .collect();
    clients
        .into_iter()
        .map(|client| client.join().expect("an innocent client"))
        .collect()
}

/// Sends `case` (its `Host: echo` lines naming `host`, when given) and checks what followed:
/// the client got the statuses the case expects; the upstream saw exactly the requests the
/// client meant (as many as the 2xx statuses it expects, each one answered to this client; for
/// a refused case none at all); then [`INNOCENTS`] clients each got their own response.
/// `pooled`: the upstream connections seen so far, updated.
pub fn attack(
    addr: SocketAddr,
    host: Option<&str>,
    log: &RecordLog,
    case: &Case,
    pooled: &mut HashSet<u64>,
) -> Verdict {
    let mut problems = Vec::new();
    let before = log.entries().len();
    let bytes = host.map_or_else(|| case.bytes.clone(), |host| case.with_host(host));
    let replies = exchange(addr, &bytes);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    if let Some(expect) = &case.expect
        && &statuses != expect
    {
        problems.push(format!(
            "statuses {statuses:?}, expected {expect:?}: {:?}",
            replies.iter().map(Reply::text).collect::<Vec<_>>()
        ));
    }
    let meant = case
        .expect
        .as_ref()
        .map_or(0, |e| e.iter().filter(|s| (200..300).contains(*s)).count());
    let answered: Vec<Seen> = replies.iter().filter_map(Reply::seen).collect();

    let tag = case.name.as_str();
    let innocent_host = host.unwrap_or("echo");
    let mut innocent_conns = HashSet::new();
    for (path, reply) in innocents(addr, innocent_host, tag) {
        match reply.seen() {
            Some(seen) if reply.status == 200 && seen.target == path => {
                innocent_conns.insert(seen.conn);
            }
            _ => problems.push(format!(
                "innocent {path} got {} {:?}",
                reply.status,
                reply.text()
            )),
        }
    }

    let entries = log.entries();
    let prefix = format!("/innocent/{tag}/");
    let (innocent, others): (Vec<Seen>, Vec<Seen>) = entries[before..]
        .iter()
        .filter(|s| !s.incomplete)
        .cloned()
        .partition(|s| s.target.starts_with(&prefix));
    if innocent.len() != INNOCENTS {
        problems.push(format!(
            "the upstream saw {} innocent requests, not {INNOCENTS}",
            innocent.len()
        ));
    }
    if others.len() != meant || others != answered {
        problems.push(format!(
            "the client meant {meant} request(s) and was answered for {:?}; the upstream saw {:?}",
            answered.iter().map(|s| &s.line).collect::<Vec<_>>(),
            others
        ));
    }
    let unpooled = innocent_conns.is_disjoint(pooled).then(|| {
        let attack_conns: Vec<(u64, &str, bool)> = entries[before..]
            .iter()
            .filter(|s| !s.target.starts_with(&prefix))
            .map(|s| (s.conn, s.line.as_str(), s.incomplete))
            .collect();
        format!(
            "{}: no innocent came over a pooled replica connection (theirs: {innocent_conns:?}; pooled before: {pooled:?}; the attack's: {attack_conns:?})",
            case.name
        )
    });
    pooled.extend(entries.iter().map(|s| s.conn));
    Verdict { problems, unpooled }
}

/// What [`attack`] found.
#[derive(Debug)]
pub struct Verdict {
    /// Everything that went wrong.
    pub problems: Vec<String>,
    /// Set when no innocent came over a replica connection pooled before the attack, saying
    /// which connections were used: the round then did not test the pool.
    pub unpooled: Option<String>,
}

/// Every case in `cases` through [`attack`] at `addr` after a [`warm_up`], with `label` in
/// the messages: the problems found. Most rounds must have reused pooled replica connections
/// (a proxy thread may find its idle list empty now and then: the pool is per thread), or the
/// attacks did not test the pool at all.
pub fn attack_all(
    addr: SocketAddr,
    host: Option<&str>,
    log: &RecordLog,
    cases: &[Case],
    label: &str,
) -> Vec<String> {
    let mut pooled = warm_up(addr, host.unwrap_or("echo"));
    let mut failures = Vec::new();
    let mut unpooled = Vec::new();
    for case in cases {
        let verdict = attack(addr, host, log, case, &mut pooled);
        if !verdict.problems.is_empty() {
            failures.push(format!(
                "{label}, {}:\n  {}",
                case.name,
                verdict.problems.join("\n  ")
            ));
        }
        unpooled.extend(verdict.unpooled);
    }
    if unpooled.len() * 10 > cases.len() {
        failures.push(format!(
            "{label}: {} of {} rounds never used a pooled replica connection:\n  {}",
            unpooled.len(),
            cases.len(),
            unpooled.join("\n  ")
        ));
    }
    failures
}

/// Fills the proxy's pool: [`INNOCENTS`] requests at once, each answered with its own path.
/// Returns the upstream connections they came over.
pub fn warm_up(addr: SocketAddr, host: &str) -> HashSet<u64> {
    innocents(addr, host, "warm-up")
        .into_iter()
        .map(|(path, reply)| {
            let seen = reply
                .seen()
                .unwrap_or_else(|| panic!("warm-up {path}: {reply:?}"));
            assert_eq!(seen.target, path);
            seen.conn
        })
        .collect()
}

/// The attacks: every smuggling, chunk-size, `Content-Length` and `Host` case of the corpus
/// (the proof of concept and the chunk sizes `5x`, `0x5`, `1_0` among them), and valid
/// messages whose bodies look like requests (the upstream must see one request each, proof
/// that the harness sees what is forwarded).
pub fn attacks() -> Vec<Case> {
    let mut cases = cases_starting_with(&["smuggle-", "chunk-", "cl-", "host-"]);
    for name in [
        "smuggle-connection-content-length",
        "chunk-size-5x",
        "chunk-size-0x5",
        "chunk-size-underscore",
    ] {
        assert!(
            cases.iter().any(|c| c.name == name),
            "the corpus lost {name}"
        );
    }
    for name in [
        "valid-post-body-looks-like-request",
        "valid-chunked-body-looks-like-request",
        "valid-pipelined-post-then-get",
    ] {
        cases.push(case(name));
    }
    cases
}

/// Requests in `log` that neither an innocent nor a valid case of [`attacks`] sent, leaving
/// out bodies cut short by a client that went away.
pub fn strays(log: &RecordLog) -> Vec<Seen> {
    log.entries()
        .into_iter()
        .filter(|s| {
            !s.incomplete
                && !s.target.starts_with("/innocent/")
                && !["/p", "/c", "/1", "/2", "/ready"].contains(&s.target.as_str())
        })
        .collect()
}
