//! Slow and hostile clients against `activator-sidecar inbound`: a head sent a byte at a time
//! is cut off with 408, idle connections close, and under a flood of 2,000 idle or half-sent
//! connections — with a file limit of 256 — new clients are still served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;

use support::{Sidecar, reserve_port};

/// A container that answers every request with 200 and its path.
async fn container() -> u16 {
    let port = reserve_port();
    let number = port.number;
    let listener: TcpListener = port.listen();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("?").to_string();
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                            path.len()
                        );
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    number
}

/// One request on a new connection; the body of a 200, or what went wrong.
async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&response).to_string();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(text);
    }
    Ok(text
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Reads until the sidecar closes the connection; what it sent.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received).await;
    received
}

#[tokio::test]
async fn a_slow_head_gets_408_and_idle_connections_close() {
    let port = container().await;
    let sidecar = Sidecar::start(
        port,
        &[
            ("SIDECAR_HEADER_READ_TIMEOUT", "1s"),
            ("SIDECAR_IDLE_TIMEOUT", "2s"),
        ],
    )
    .listening()
    .await;

    // A head sent a byte every 100 ms never completes: cut off with 408 after 1 s.
    let mut slow = TcpStream::connect(sidecar.serving).await.expect("connect");
    let started = tokio::time::Instant::now();
    let trickle = async {
        for byte in b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    let answer = String::from_utf8_lossy(&until_closed(&mut slow).await).to_string();
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "cut off after {took:?}"
    );

    // A connection that never sends anything, and one kept alive after a request, close
    // after the idle timeout; meanwhile requests are served.
    let mut silent = TcpStream::connect(sidecar.serving).await.expect("connect");
    let mut kept = TcpStream::connect(sidecar.serving).await.expect("connect");
    kept.write_all(b"GET /kept HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 64];
    let n = kept.read(&mut first).await.expect("a response");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(
        get(sidecar.serving, "/meanwhile").await,
        Ok("/meanwhile".into())
    );
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        (
            until_closed(&mut silent).await,
            until_closed(&mut kept).await,
        )
    })
    .await
    .expect("both idle connections closed");
    assert_eq!(closed, (Vec::new(), Vec::new()), "closed without a word");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
}

#[tokio::test]
async fn new_clients_are_served_under_two_thousand_idle_or_slow_connections_and_a_low_file_limit() {
    // The test itself holds the flood: raise its own soft file limit to the hard one.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
    let port = container().await;
    // 256 descriptors: about 96 client connections fit.
    let sidecar = Sidecar::start_with_file_limit(port, 256, &[])
        .listening()
        .await;
    assert_eq!(get(sidecar.serving, "/before").await, Ok("/before".into()));

    let target = sidecar.serving;
    let mut flood = Vec::with_capacity(2000);
    for _batch in 0..20 {
        let mut connects = tokio::task::JoinSet::new();
        for i in 0..100 {
            connects.spawn(async move {
                let mut stream = TcpStream::connect(target).await.ok()?;
                if i % 2 == 0 {
                    // Half send part of a head and stop (slowloris); half send nothing.
                    let _ = stream
                        .write_all(b"GET /slow HTTP/1.1\r\nHost: echo\r\nX-A: ")
                        .await;
                }
                Some(stream)
            });
        }
        while let Some(connected) = connects.join_next().await {
            flood.extend(connected.ok().flatten());
        }
    }
    assert!(
        flood.len() >= 1900,
        "only {} flood connections",
        flood.len()
    );

    // Every new client is served, within seconds, while the flood is still open.
    for i in 0..20 {
        let path = format!("/after/{i}");
        let answered =
            tokio::time::timeout(Duration::from_secs(5), get(sidecar.serving, &path)).await;
        assert_eq!(
            answered.map_err(|_| "no answer within 5 s".to_string()),
            Ok(Ok(path.clone())),
            "client {i}"
        );
    }
    drop(flood);
}
