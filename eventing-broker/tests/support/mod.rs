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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ids = Arc::new(Mutex::new(Vec::new()));
    let seen = ids.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
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
