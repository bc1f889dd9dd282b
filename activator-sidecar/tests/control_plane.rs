//! The gateway role against a control plane that goes away, and a credential that rotates:
//! warm traffic keeps flowing on the last tables while no autoscaler answers (DESIGN.md: only
//! cold starts wait), and a token file that changes is read again before the next request (as
//! kubelet rotates a projected service-account token).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use activator_sidecar::discovery::{ControlPlane, GatewayConfig, serve_gateway};
use mecha_common::admin::Health;
use mecha_common::auth::{ClientToken, TokenFile};
use mecha_common::routing::{ServiceKey, UpstreamProtocol};
use mecha_common::wire::{STATS_PATH, Snapshot};
use mecha_common::{
    BufferLimits, Endpoint, EndpointTable, RevisionEndpoints, Route, RouteTarget, RoutingTable,
    Shutdown,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "fn.default.localhost";

/// An upstream that answers every request with `warm`.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nwarm",
                    )
                    .await;
            });
        }
    });
    addr
}

/// The snapshot line an autoscaler sends: `fn` routed to one replica at `replica`.
fn snapshot_line(replica: SocketAddr) -> String {
    let mut routes = RoutingTable::default();
    routes.insert(
        HOST.into(),
        Route {
            service: ServiceKey::new("default", "fn"),
            tag: None,
            targets: vec![RouteTarget {
                revision: "fn-00001".into(),
                percent: 100,
                timeout: Duration::from_secs(5),
                protocol: UpstreamProtocol::Http1,
                container_concurrency: 0,
                buffer: BufferLimits::default(),
            }],
        },
    );
    let mut endpoints = EndpointTable::default();
    endpoints.set(
        "fn-00001".into(),
        RevisionEndpoints {
            ready: vec![Endpoint::standalone("fn-00001-a", replica)],
        },
    );
    let mut line =
        serde_json::to_string(&Snapshot::from_tables(&routes, &endpoints)).expect("json");
    line.push('\n');
    line
}

async fn get(addr: SocketAddr) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw).await;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

#[tokio::test]
async fn warm_traffic_keeps_flowing_on_the_last_tables_while_no_autoscaler_answers() {
    let replica = upstream().await;
    // An autoscaler that sends one snapshot, then dies: the stream breaks mid-way and its
    // port refuses every reconnection.
    let autoscaler = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let autoscaler_addr = autoscaler.local_addr().expect("addr");
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    let line = snapshot_line(replica);
    tokio::spawn(async move {
        let (mut stream, _) = autoscaler.accept().await.expect("the gateway connects");
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        stream
            .write_all(format!("{head}{chunk}").as_bytes())
            .await
            .expect("snapshot sent");
        let _ = sent_rx.await;
        // Dies: the connection and the listener close without ending the stream.
        drop(stream);
        drop(autoscaler);
    });

    let args: Vec<String> = vec![
        "--autoscaler-addr".into(),
        autoscaler_addr.to_string(),
        "--port".into(),
        "1".into(),
    ];
    let config = GatewayConfig::from_args_and_env(&args, |_| None).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gateway = listener.local_addr().expect("addr");
    let health = Health::default();
    let shutdown = Shutdown::new();
    let registry = prometheus::Registry::new();
    let ready = health.clone();
    let signal = shutdown.signal();
    let task = tokio::spawn(async move {
        serve_gateway(listener, config, &registry, ready, signal).await;
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while !health.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ready with the first snapshot");
    assert_eq!(get(gateway).await.0, 200);

    // The autoscaler goes away; the gateway tries to reconnect (refused) and keeps routing.
    sent_tx.send(()).expect("the autoscaler is waiting");
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if TcpStream::connect(autoscaler_addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "the autoscaler's port closes");
    for _ in 0..5 {
        let (status, raw) = get(gateway).await;
        assert_eq!(status, 200, "warm traffic on the last tables: {raw}");
        assert!(raw.ends_with("warm"), "{raw}");
        // Across reconnection attempts (100 ms, 200 ms, … apart).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(health.is_ready(), "still serving, so still ready");
    shutdown.trigger();
    task.await.expect("the gateway stops");
}

#[tokio::test]
async fn a_rotated_token_file_is_presented_from_the_next_request_on() {
    // An autoscaler that records the credential of every report.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        STATS_PATH,
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                record.lock().expect("lock").push(auth);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // A projected volume as kubelet writes it: `token` → `..data/token`, `..data` → a
    // timestamped directory, swapped on rotation; files readable by the pod's group.
    let dir = std::env::temp_dir().join(format!("sidecar-projected-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let project = |stamp: &str, token: &str| {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let data = dir.join(format!("..{stamp}"));
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("token"), token).expect("write");
        std::fs::set_permissions(data.join("token"), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        let next = dir.join("..data_tmp");
        symlink(format!("..{stamp}"), &next).expect("link");
        std::fs::rename(&next, dir.join("..data")).expect("swap");
        if std::fs::symlink_metadata(dir.join("token")).is_err() {
            symlink("..data/token", dir.join("token")).expect("link");
        }
    };
    let first = "eyJhbGciOiJSUzI1NiJ9.first-0123456789abcdef0123456789.sig";
    let second = "eyJhbGciOiJSUzI1NiJ9.second-0123456789abcdef0123456789.sig";
    project("2026_11_30_17_00_00.1", first);
    let token = TokenFile::open(&dir.join("token")).expect("the projected token");
    let control = ControlPlane::new(addr.to_string(), Some(ClientToken::File(token)));
    let stat = mecha_common::wire::Stat {
        revision: "fn-00001".into(),
        replica: "fn-00001-a".into(),
        concurrency: 1.0,
        requests: 1,
        seconds: 1.0,
    };
    control
        .send_stats(std::slice::from_ref(&stat))
        .await
        .expect("first report");
    project("2026_11_30_18_00_00.2", second);
    control
        .send_stats(std::slice::from_ref(&stat))
        .await
        .expect("second report");
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![format!("Bearer {first}"), format!("Bearer {second}")]
    );
}
