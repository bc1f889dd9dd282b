//! The `activator-sidecar inbound` binary against a real upstream on 127.0.0.1.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod support;

use support::{Sidecar, reserve_port};

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw))
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that answers after `delay`, recording the most requests it saw at once.
async fn slow_upstream(listener: TcpListener, delay: Duration) -> Arc<AtomicUsize> {
    let max_seen = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(AtomicUsize::new(0));
    let seen = max_seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (current, seen) = (current.clone(), seen.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    max_seen
}

#[test]
fn bad_configuration_exits_naming_the_setting() {
    let output = Command::new(env!("CARGO_BIN_EXE_activator-sidecar"))
        .arg("inbound")
        .env("CONTAINER_CONCURRENCY", "lots")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CONTAINER_CONCURRENCY=\"lots\": not a valid number"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_activator-sidecar"))
        .args(["inbound", "--user-prot", "1"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--user-prot"));

    // A credential file other users can read is refused, naming the setting and the fix.
    let file = std::env::temp_dir().join(format!("sidecar-exposed-token-{}", std::process::id()));
    std::fs::write(&file, "secret\n").expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let output = Command::new(env!("CARGO_BIN_EXE_activator-sidecar"))
        .args(["gateway", "--autoscaler-addr", "127.0.0.1:8081"])
        .arg("--autoscaler-token-file")
        .arg(&file)
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&file);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("AUTOSCALER_TOKEN_FILE=") && stderr.contains("can be read by other users"),
        "{stderr}"
    );
}

#[tokio::test]
async fn enforces_container_concurrency_with_a_bounded_queue() {
    // Held, not picked and released: a released port can go to another socket (another
    // sidecar's serving port, say) whose answers would make this sidecar ready too early.
    let user_port = reserve_port();
    let sidecar = Sidecar::start(user_port.number, &[("CONTAINER_CONCURRENCY", "1")]);
    // Not ready until the container listens.
    wait_for("the admin port", async || {
        get(sidecar.admin, "/live").await.is_some()
    })
    .await;
    assert_eq!(get(sidecar.admin, "/ready").await.map(|r| r.0), Some(503));
    let listener = user_port.listen();
    let max_seen = slow_upstream(listener, Duration::from_millis(100)).await;
    wait_for("readiness", async || {
        get(sidecar.admin, "/ready").await.map(|r| r.0) == Some(200)
    })
    .await;

    // 1 in flight + a queue of 10; the rest are turned away at once.
    let requests: Vec<_> = (0..16)
        .map(|_| tokio::spawn(get(sidecar.serving, "/")))
        .collect();
    let mut ok = 0;
    let mut rejected = 0;
    for request in requests {
        let (status, raw) = request.await.expect("join").expect("answer");
        match status {
            200 => ok += 1,
            503 => {
                assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
                assert!(raw.contains("service default/echo is overloaded"), "{raw}");
                rejected += 1;
            }
            other => panic!("unexpected {other}: {raw}"),
        }
    }
    assert_eq!(
        max_seen.load(Ordering::SeqCst),
        1,
        "containerConcurrency 1 was exceeded"
    );
    assert!(ok >= 11, "1 running + 10 queued should be served, got {ok}");
    assert_eq!(ok + rejected, 16);
    assert!(rejected >= 1, "16 at once cannot all fit");
    let (_, metrics) = get(sidecar.admin, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("mecha_inbound_requests_total{code=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("mecha_inbound_concurrency"), "{metrics}");
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let user_port = listener.local_addr().expect("addr").port();
    slow_upstream(listener, Duration::from_millis(500)).await;
    let mut sidecar = Sidecar::start(user_port, &[]);
    wait_for("readiness", async || {
        get(sidecar.admin, "/ready").await.map(|r| r.0) == Some(200)
    })
    .await;
    let in_flight = tokio::spawn(get(sidecar.serving, "/"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid = rustix::process::Pid::from_raw(sidecar.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    assert_eq!(in_flight.await.expect("join").map(|r| r.0), Some(200));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = sidecar.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "sidecar did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn reports_its_load_to_the_autoscaler_every_second() {
    // A stand-in autoscaler that records every stats body posted to it with the credential,
    // and refuses the others as `mecha up` does.
    let intake = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let intake_addr = intake.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = intake.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // One request at a time: headers, then Content-Length bytes of body.
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    assert!(head.starts_with("POST /api/v1/stats "), "{head}");
                    let authorized = head.lines().any(|l| {
                        l.eq_ignore_ascii_case(
                            "authorization: Bearer test-token-0123456789abcdef0123456789",
                        )
                    });
                    let answer: &[u8] = if authorized {
                        let _ = tx.send(body[..length].to_string());
                        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
                    };
                    buf.drain(..head.len() + 4 + length);
                    let _ = stream.write_all(answer).await;
                }
            });
        }
    });
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let user_port = upstream.local_addr().expect("addr").port();
    slow_upstream(upstream, Duration::from_millis(1)).await;
    let intake_env = intake_addr.to_string();
    let sidecar = Sidecar::start(
        user_port,
        &[
            ("AUTOSCALER_ADDR", &intake_env),
            ("SERVING_REVISION", "fn-00001"),
            ("POD_NAME", "pod-a"),
            ("AUTOSCALER_TOKEN", "test-token-0123456789abcdef0123456789"),
        ],
    );
    wait_for("readiness", async || {
        get(sidecar.admin, "/ready").await.map(|r| r.0) == Some(200)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(get(sidecar.serving, "/").await.map(|r| r.0), Some(200));
        let body = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report within 5 s")
            .expect("intake alive");
        let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let stat = &stats[0];
        assert_eq!(stat["revision"], "fn-00001");
        assert_eq!(stat["replica"], "pod-a");
        assert!(stat["seconds"].as_f64().expect("seconds") > 0.0);
        if stat["requests"].as_u64().expect("requests") > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no report counted the requests: {body}"
        );
    }
}
