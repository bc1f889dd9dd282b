//! The inbound sidecar's HTTP/1.1 fast path, byte for byte: `activator-sidecar inbound` in
//! front of a raw TCP upstream that answers in every framing (length, chunked, until close,
//! interim 1xx), closes connections on purpose, and reports what it received; the client
//! side is raw bytes too, so pipelining and connection reuse are visible.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use activator_sidecar::h1::codec::{Chunked, Framing, parse_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;

use support::{Sidecar, reserve_port};

/// A raw HTTP/1.1 upstream. By path: `/eof` answers without a length and closes, `/close`
/// answers with `Connection: close` and closes, `/chunked` answers in chunks, `/hints` sends a
/// 103 first, `/early` answers 413 without reading the body and closes, `/drop` answers and
/// then closes the kept-alive connection silently, `/hang` never answers; anything else echoes the request line,
/// headers and raw body. Counts the connections that carried requests.
async fn upstream() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_upstream(stream, counter.clone()));
        }
    });
    (port, connections)
}

/// What became of the upstream's `/hang…` requests: `(path, "started" | "ended")`.
static HANGS: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());

fn note_hang(path: &str, what: &'static str) {
    HANGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((path.to_string(), what));
}

/// Waits (up to 10 s) until the upstream noted `what` for `path`.
async fn hang_noted(path: &str, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let noted = HANGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|(p, w)| p == path && *w == what);
        if noted || Instant::now() >= deadline {
            return noted;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where a request head ends and how its body is framed, as any HTTP/1.1 server sees it.
fn request_head(buf: &[u8]) -> Option<(usize, Framing)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = request.parse(buf).expect("a valid request") else {
        return None;
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_string())
    };
    let framing = if header("transfer-encoding").is_some() {
        Framing::Chunked(Chunked::default())
    } else {
        match header("content-length").map(|v| v.parse::<u64>().expect("a length")) {
            Some(n) if n > 0 => Framing::Length(n),
            _ => Framing::Done,
        }
    };
    Some((len, framing))
}

/// Connections the upstream closed after answering `/drop` (one test uses it).
static DROPPED: AtomicUsize = AtomicUsize::new(0);

async fn serve_upstream(mut stream: TcpStream, connections: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    for served in 0.. {
        let head = loop {
            if let Some(head) = request_head(&buf) {
                break head;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if served == 0 {
            // Counted once it carries a request: the sidecar's TCP readiness probes do not.
            connections.fetch_add(1, Ordering::SeqCst);
        }
        let (len, mut framing) = head;
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
        buf.drain(..len);
        if path == "/early" {
            let _ = stream
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig\n")
                .await;
            return;
        }
        let mut body = Vec::new();
        loop {
            let n = framing.consume(&buf).expect("valid body");
            body.extend(buf.drain(..n));
            if framing.is_done() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        if path.starts_with("/hang") {
            // Holds the request and never answers; notes when it arrived and when the
            // connection it came on ended (by its path, so tests can tell theirs apart).
            note_hang(&path, "started");
            let mut rest = [0u8; 1024];
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
            note_hang(&path, "ended");
            return;
        }
        let echo = format!("{text}{}", String::from_utf8_lossy(&body));
        let response = match path.as_str() {
            "/eof" => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil-close")
                    .await;
                return;
            }
            "/close" => "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nclosed"
                .to_string(),
            "/chunked" => {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
                           5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
                    .to_string()
            }
            "/hints" => "HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n\
                         HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints"
                .to_string(),
            "/head" => "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_string(),
            _ => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n{echo}",
                echo.len()
            ),
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        if path == "/close" {
            return;
        }
        if path == "/drop" {
            drop(stream);
            DROPPED.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

/// A raw client connection that reads whole responses (framed with the same codec).
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).await.expect("send");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("a response within 10 s");
        match read {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next complete response; `head_method` when it answers a HEAD request.
    async fn reply(&mut self, head_method: bool) -> Reply {
        let mut scratch = Vec::new();
        let parsed = loop {
            if let Some(parsed) =
                parse_response(&self.buf, head_method, false, &mut scratch).expect("valid head")
            {
                break parsed;
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
            scratch.clear();
        };
        let head = String::from_utf8_lossy(&self.buf[..parsed.len]).to_string();
        self.buf.drain(..parsed.len);
        let mut framing = parsed.framing;
        let mut body = Vec::new();
        loop {
            let n = framing.consume(&self.buf).expect("valid body");
            body.extend(self.buf.drain(..n));
            if framing.is_done() {
                break;
            }
            if !self.fill().await {
                assert!(framing.end_of_stream(), "body cut short: {head}");
                break;
            }
        }
        Reply {
            status: parsed.status,
            head,
            body: String::from_utf8_lossy(&body).to_string(),
        }
    }

    /// Whether the sidecar closed the connection (after everything sent was read).
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

#[tokio::test]
async fn requests_and_bodies_share_one_upstream_connection() {
    let (port, connections) = upstream().await;
    let sidecar = Sidecar::start(port, &[]).listening().await;
    let mut client = Client::connect(sidecar.serving).await;

    client
        .send("GET /a?b=1 HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\nTE: trailers\r\n\r\n")
        .await;
    let reply = client.reply(false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.body.starts_with("GET /a?b=1 HTTP/1.1\r\n"),
        "{reply:?}"
    );
    assert!(
        reply.body.contains("x-forwarded-for: 127.0.0.1\r\n"),
        "{reply:?}"
    );
    assert!(
        reply.body.contains("x-forwarded-proto: http\r\n"),
        "{reply:?}"
    );
    for hop in ["x-secret", "TE:", "Connection"] {
        assert!(!reply.body.contains(hop), "{hop} was forwarded: {reply:?}");
    }
    // The replica's own hop-by-hop headers do not reach the client either.
    assert!(!reply.head.contains("Keep-Alive"), "{reply:?}");

    // A body by length, then a chunked body sent in pieces, then a pipelined pair.
    client
        .send("POST /len HTTP/1.1\r\nHost: echo\r\nContent-Length: 11\r\n\r\nhello world")
        .await;
    let reply = client.reply(false).await;
    assert!(reply.body.ends_with("\r\n\r\nhello world"), "{reply:?}");

    client
        .send("POST /chunks HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki")
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.send("\r\n5\r\npedia\r\n0\r\n\r\n").await;
    let reply = client.reply(false).await;
    assert!(
        reply
            .body
            .ends_with("\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n"),
        "chunks relayed as sent: {reply:?}"
    );

    client
        .send("GET /one HTTP/1.1\r\nHost: echo\r\n\r\nGET /two HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert!(client.reply(false).await.body.starts_with("GET /one "));
    assert!(client.reply(false).await.body.starts_with("GET /two "));
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one replica connection"
    );

    // Connection: close from the client is honoured after the response.
    client
        .send("GET /last HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await;
    let reply = client.reply(false).await;
    assert!(reply.head.contains("connection: close"), "{reply:?}");
    assert!(client.closed().await);
}

#[tokio::test]
async fn every_response_framing_reaches_the_client() {
    let (port, connections) = upstream().await;
    let sidecar = Sidecar::start(port, &[]).listening().await;
    let mut client = Client::connect(sidecar.serving).await;

    client
        .send("GET /chunked HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let reply = client.reply(false).await;
    assert!(
        reply.head.contains("Transfer-Encoding: chunked"),
        "{reply:?}"
    );
    assert_eq!(
        reply.body,
        "5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
    );

    client
        .send("HEAD /head HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let reply = client.reply(true).await;
    assert!(reply.head.contains("Content-Length: 100"), "{reply:?}");
    assert_eq!(reply.body, "");

    client
        .send("GET /hints HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let interim = client.reply(false).await;
    assert_eq!(interim.status, 103, "{interim:?}");
    let reply = client.reply(false).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "hints"));

    // The replica closes after this one; the client's connection stays.
    client
        .send("GET /close HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let reply = client.reply(false).await;
    assert_eq!(reply.body, "closed");
    assert!(
        !reply.head.to_lowercase().contains("connection"),
        "{reply:?}"
    );
    client
        .send("GET /after HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert!(client.reply(false).await.body.starts_with("GET /after "));
    assert_eq!(connections.load(Ordering::SeqCst), 2);

    // No length: relayed until the replica closes, and the client is told it closes too.
    client.send("GET /eof HTTP/1.1\r\nHost: echo\r\n\r\n").await;
    let reply = client.reply(false).await;
    assert_eq!(reply.body, "until-close");
    assert!(reply.head.contains("connection: close"), "{reply:?}");
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_replica_connection_closed_while_idle_is_replaced_transparently() {
    let (port, connections) = upstream().await;
    let sidecar = Sidecar::start(port, &[]).listening().await;
    let mut client = Client::connect(sidecar.serving).await;
    // `/drop` answers as if keeping the connection alive, then closes it.
    client
        .send("GET /drop HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert_eq!(client.reply(false).await.status, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .send("GET /next HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let reply = client.reply(false).await;
    assert_eq!(reply.status, 200, "retried on a new connection: {reply:?}");
    assert!(reply.body.starts_with("GET /next "));
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_early_response_is_relayed_and_both_connections_close() {
    let (port, _) = upstream().await;
    let sidecar = Sidecar::start(port, &[]).listening().await;
    let mut client = Client::connect(sidecar.serving).await;
    client
        .send("POST /early HTTP/1.1\r\nHost: echo\r\nContent-Length: 1000000\r\n\r\nstart")
        .await;
    let reply = client.reply(false).await;
    assert_eq!((reply.status, reply.body.as_str()), (413, "big\n"));
    assert!(client.closed().await);
}

#[tokio::test]
async fn unreachable_container_is_a_502_and_the_connection_stays() {
    let container = reserve_port();
    let sidecar = Sidecar::start(container.number, &[]).listening().await;
    let mut client = Client::connect(sidecar.serving).await;
    for _ in 0..2 {
        client.send("GET / HTTP/1.1\r\nHost: echo\r\n\r\n").await;
        let reply = client.reply(false).await;
        assert_eq!(reply.status, 502, "{reply:?}");
        assert!(
            reply.body.starts_with("service default/echo failed: "),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn unusual_requests_are_served_by_the_general_server() {
    let (port, _) = upstream().await;
    let sidecar = Sidecar::start(port, &[]).listening().await;

    // HTTP/1.0, after a fast-path request on the same connection.
    let mut client = Client::connect(sidecar.serving).await;
    client
        .send("GET /fast HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert_eq!(client.reply(false).await.status, 200);
    client.send("GET /old HTTP/1.0\r\nHost: echo\r\n\r\n").await;
    let reply = client.reply(false).await;
    assert!(reply.body.starts_with("GET /old HTTP/1.1"), "{reply:?}");

    // Expect: 100-continue gets its interim answer before the body is sent.
    let mut client = Client::connect(sidecar.serving).await;
    client
        .send("POST /expect HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .await;
    assert_eq!(client.reply(false).await.status, 100);
    client.send("body").await;
    let reply = client.reply(false).await;
    assert!(reply.body.ends_with("body"), "{reply:?}");

    // h2c with prior knowledge.
    let stream = TcpStream::connect(sidecar.serving).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::get("http://echo/h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), 200);

    // A malformed head gets hyper's 400.
    let mut client = Client::connect(sidecar.serving).await;
    client.send("GET / HTTP/1.1\r\nBad Header\r\n\r\n").await;
    assert_eq!(client.reply(false).await.status, 400);
}

#[tokio::test]
async fn a_replica_that_never_answers_times_out_with_504() {
    let (port, _) = upstream().await;
    let sidecar = Sidecar::start(port, &[("REVISION_TIMEOUT_SECONDS", "1")])
        .listening()
        .await;
    let mut client = Client::connect(sidecar.serving).await;
    // A quick exchange first: the connection's timer must still catch the slow one after it.
    client
        .send("GET /quick HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert_eq!(client.reply(false).await.status, 200);
    let started = Instant::now();
    client
        .send("GET /hang HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let reply = client.reply(false).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(
        reply.body,
        "service default/echo did not answer within its timeout of 1s\n"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );
    // The next request, on a new connection, is answered normally.
    let mut client = Client::connect(sidecar.serving).await;
    client
        .send("GET /again HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert_eq!(client.reply(false).await.status, 200);
}

#[tokio::test]
async fn a_client_that_leaves_before_the_response_takes_the_replica_connection_with_it() {
    clients_leave(&[], "fast").await;
}

#[tokio::test]
async fn on_hypers_path_too_a_client_that_leaves_takes_the_replica_connection_with_it() {
    clients_leave(&[("SIDECAR_FAST_PATH", "false")], "hyper").await;
}

/// Clients that wait, close, half-close and pipeline behind a request the replica never
/// answers; `tag` keeps each run's paths its own.
async fn clients_leave(env: &[(&str, &str)], tag: &str) {
    let (port, _) = upstream().await;
    // The revision's timeout is the default five minutes: only the client's leaving can end
    // the exchange within the test's wait.
    let sidecar = Sidecar::start(port, env).listening().await;
    let path = |name: &str| format!("/hang-{tag}-{name}");

    // A client that waits is left waiting (its request stays with the replica)...
    let mut stays = Client::connect(sidecar.serving).await;
    stays
        .send(&format!(
            "GET {} HTTP/1.1\r\nHost: echo\r\n\r\n",
            path("stays")
        ))
        .await;
    assert!(hang_noted(&path("stays"), "started").await);

    // ...one that closes, or half-closes, after its request ends the replica's connection.
    for (path, half) in [(path("closes"), false), (path("half-closes"), true)] {
        let mut client = TcpStream::connect(sidecar.serving).await.expect("connect");
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: echo\r\n\r\n").as_bytes())
            .await
            .expect("write");
        assert!(
            hang_noted(&path, "started").await,
            "{path} reached the replica"
        );
        if half {
            client.shutdown().await.expect("half-close");
        } else {
            drop(client);
        }
        assert!(
            hang_noted(&path, "ended").await,
            "the replica's connection for {path} is still open 10 s after the client left"
        );
    }

    // A pipelined second request is not a client leaving: the first still waits.
    let mut pipelined = TcpStream::connect(sidecar.serving).await.expect("connect");
    pipelined
        .write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: echo\r\n\r\nGET /next HTTP/1.1\r\nHost: echo\r\n\r\n",
                path("pipelined")
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    assert!(hang_noted(&path("pipelined"), "started").await);
    // A whole exchange on another connection: time for a wrong reading of either client to
    // have shown.
    let mut other = Client::connect(sidecar.serving).await;
    other
        .send("GET /quick HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    assert_eq!(other.reply(false).await.status, 200);
    let noted = HANGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert!(
        !noted
            .iter()
            .any(|(p, w)| (*p == path("stays") || *p == path("pipelined")) && *w == "ended"),
        "a waiting client's request was dropped: {noted:?}"
    );
    drop((stays, pipelined));
}

#[tokio::test]
async fn large_bodies_stream_through_in_both_directions() {
    let (port, connections) = upstream().await;
    let sidecar = Sidecar::start(port, &[]).listening().await;
    let mut client = Client::connect(sidecar.serving).await;
    let body: String = (0..4_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for _ in 0..2 {
        client
            .send(&format!(
                "POST /big HTTP/1.1\r\nHost: echo\r\nContent-Length: {}\r\n\r\n",
                body.len()
            ))
            .await;
        // Sent in pieces, as a client streaming an upload would.
        for piece in body.as_bytes().chunks(1 << 20) {
            client.stream.write_all(piece).await.expect("send a piece");
        }
        let reply = client.reply(false).await;
        assert_eq!(reply.status, 200);
        assert!(reply.body.ends_with(&body), "the whole body came back");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}
