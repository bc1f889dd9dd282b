//! Slow and hostile clients against `activator-sidecar inbound`: a head sent a byte at a time
//! is cut off with 408, idle connections close, and under a flood of 2,000 idle or half-sent
//! connections — with a file limit of 256 — new clients are still served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;

use support::{Sidecar, reserve_port};

/// A container that reads each request (head and `Content-Length` body) and answers 200 with
/// its path.
async fn container() -> u16 {
    container_counting().await.0
}

/// [`container`], and the number of request heads it has seen.
async fn container_counting() -> (u16, Arc<AtomicUsize>) {
    let port = reserve_port();
    let number = port.number;
    let listener: TcpListener = port.listen();
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut counted = 0;
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        if counted == 0 {
                            seen.fetch_add(1, Ordering::SeqCst);
                            counted = 1;
                        }
                        // Answer only once the whole body is here, as an application that
                        // reads its request does.
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                let (name, value) = l.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + length {
                            break;
                        }
                        counted = 0;
                        buf.drain(..end + 4 + length);
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
    (number, heads)
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

#[tokio::test]
async fn a_body_that_pauses_too_long_gets_408_on_both_paths() {
    let port = container().await;
    for fast_path in ["true", "false"] {
        let sidecar = Sidecar::start(
            port,
            &[
                ("SIDECAR_BODY_READ_TIMEOUT", "1s"),
                ("SIDECAR_FAST_PATH", fast_path),
            ],
        )
        .listening()
        .await;
        let mut slow = TcpStream::connect(sidecar.serving).await.expect("connect");
        slow.write_all(b"POST /upload HTTP/1.1\r\nHost: echo\r\nContent-Length: 100\r\n\r\nx")
            .await
            .expect("write");
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut slow))
            .await
            .expect("the paused body was cut off");
        let answer = String::from_utf8_lossy(&answer).to_string();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "fast path {fast_path}: {answer:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "fast path {fast_path}: cut off after {took:?}"
        );
    }
}

#[tokio::test]
async fn new_clients_are_served_while_hundreds_of_bodies_trickle_in_under_a_low_file_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
    for fast_path in ["true", "false"] {
        let (port, heads) = container_counting().await;
        let sidecar =
            Sidecar::start_with_file_limit(port, 256, &[("SIDECAR_FAST_PATH", fast_path)])
                .listening()
                .await;
        let target = sidecar.serving;
        // Requests whose bodies stop after their first byte (the pause allowed by default is
        // 30 s, far longer than this test), sent in batches until the container holds as many
        // as the sidecar can (its limit is 96 here): every place is in the middle of a body,
        // and only making room can serve anyone new.
        let mut held = Vec::new();
        for _batch in 0..6 {
            let before = heads.load(Ordering::SeqCst);
            let mut trickling = tokio::task::JoinSet::new();
            for _ in 0..50 {
                trickling.spawn(async move {
                    let mut stream = TcpStream::connect(target).await.ok()?;
                    stream
                        .write_all(
                            b"POST /slow HTTP/1.1\r\nHost: echo\r\nContent-Length: 100000\r\n\r\nx",
                        )
                        .await
                        .ok()?;
                    Some(stream)
                });
            }
            while let Some(connected) = trickling.join_next().await {
                held.extend(connected.ok().flatten());
            }
            // Wait (bounded) until the batch's heads reached the container.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while heads.load(Ordering::SeqCst) < before + 40
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(
            heads.load(Ordering::SeqCst) >= 90,
            "fast path {fast_path}: only {} slow bodies reached the container",
            heads.load(Ordering::SeqCst)
        );
        for i in 0..20 {
            let path = format!("/after/{i}");
            let answered = tokio::time::timeout(Duration::from_secs(5), get(target, &path)).await;
            assert_eq!(
                answered.map_err(|_| "no answer within 5 s".to_string()),
                Ok(Ok(path.clone())),
                "fast path {fast_path}, client {i}"
            );
        }
        drop(held);
    }
}
