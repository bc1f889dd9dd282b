//! Helpers shared by this crate's integration tests (each test file includes this module).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

/// Waits (up to 30 s) until `condition` holds.
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many times each id arrived.
pub fn counts(ids: &Mutex<Vec<String>>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in ids.lock().unwrap().iter() {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    counts
}

/// A keep-alive subscriber that answers 202 and records each event's id.
pub async fn subscriber() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    slow_subscriber(Duration::ZERO).await
}

/// A keep-alive subscriber that records each event's id as it arrives and answers 202 after
/// `delay`.
pub async fn slow_subscriber(delay: Duration) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    // Always open: the gate's value is read before its sender is looked at.
    let (_, gate) = tokio::sync::watch::channel(true);
    answering_subscriber(delay, gate).await
}

/// A keep-alive subscriber that records each event's id as it arrives and holds every answer
/// until the returned gate is opened (`send(true)`): deliveries stay in flight as long as a
/// test needs them to.
#[allow(dead_code)]
pub async fn gated_subscriber() -> (
    SocketAddr,
    Arc<Mutex<Vec<String>>>,
    tokio::sync::watch::Sender<bool>,
) {
    let (open, gate) = tokio::sync::watch::channel(false);
    let (addr, ids) = answering_subscriber(Duration::ZERO, gate).await;
    (addr, ids, open)
}

async fn answering_subscriber(
    delay: Duration,
    gate: tokio::sync::watch::Receiver<bool>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ids = Arc::new(Mutex::new(Vec::new()));
    let seen = ids.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let mut gate = gate.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut length = 0;
                    let mut id = String::new();
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if let Some(v) = lower.strip_prefix("ce-id:") {
                            id = v.trim().to_string();
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    seen.lock().unwrap().push(id);
                    tokio::time::sleep(delay).await;
                    if gate.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let answer = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, ids)
}

/// The server name of the node leading `broker`'s stream, asked of the cluster directly.
#[cfg(feature = "jetstream")]
pub async fn stream_leader(servers: &[String], broker: &str) -> String {
    let client = async_nats::connect(servers.to_vec()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let name = eventing_broker::log::jetstream::stream_name(broker);
    let mut stream = context.get_stream(&name).await.unwrap();
    let info = stream.info().await.unwrap();
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("an R3 stream has a leader")
}

/// One request as a [`raw_subscriber`] read it off the socket.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Header names lower-cased, values as the bytes that arrived.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A keep-alive subscriber that keeps every request's headers and body bytes exactly as they
/// arrived (Content-Length bodies, as the broker sends) and answers 202.
pub async fn raw_subscriber() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let all = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let all = all.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut headers = Vec::new();
                    let mut length = 0;
                    let mut first = true;
                    loop {
                        let mut line = Vec::new();
                        if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == b"\r\n" {
                            break;
                        }
                        if std::mem::take(&mut first) {
                            continue; // the request line
                        }
                        let line = line.strip_suffix(b"\r\n").unwrap_or(&line);
                        let colon = line.iter().position(|b| *b == b':').unwrap();
                        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
                        let value = line[colon + 1..].trim_ascii().to_vec();
                        if name == "content-length" {
                            length = String::from_utf8_lossy(&value).parse().unwrap();
                        }
                        headers.push((name, value));
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    all.lock().unwrap().push(Seen { headers, body });
                    let answer = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) over a plain socket; the
/// status code of the answer.
pub async fn raw_post(addr: SocketAddr, request: &[u8]) -> u16 {
    raw_exchange(addr, request).await.0
}

/// Sends `request` as it is on a connection of its own; the answer's status and whole text.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    (status, text)
}
