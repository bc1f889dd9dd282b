//! The `autoscaler` binary as a process, against the scripted API server served over HTTP on
//! 127.0.0.1 (found through a kubeconfig, as `Client::try_default` finds any cluster): it
//! becomes ready once its caches are synced and it leads, holds the Lease, refuses the
//! control-plane API without a token the API server vouches for, streams the tables with
//! one, and on SIGTERM drains, releases the Lease and exits 0.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use support::ApiServer;
use support::runtime::{SIDECAR_TOKEN, SYSTEM, script_token_reviews};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves `server` over HTTP/1.1 on 127.0.0.1.
async fn serve_http(server: ApiServer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let server = server.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let server = server.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let bytes = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let request =
                                http::Request::from_parts(parts, kube::client::Body::from(bytes));
                            Ok::<_, Infallible>(server.handle(request).await)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A port free now on 127.0.0.1 (the binary binds the port it is given).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One HTTP/1.1 request; the status and what arrived of the body within `read_for`.
async fn http(port: u16, request: &str, read_for: Duration) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        // Not listening yet.
        return (0, String::new());
    };
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(read_for, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&bytes).contains("\"endpoints\"") {
                return;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nhost: mecha-autoscaler.mecha-system.svc\r\n{auth}connection: close\r\n\r\n"
    )
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_leads_serves_the_api_behind_token_review_and_drains_on_sigterm() {
    let server = ApiServer::new();
    script_token_reviews(&server);
    let addr = serve_http(server.clone()).await;
    let dir = std::env::temp_dir().join(format!("mecha-autoscaler-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: scripted\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: scripted\n  context:\n    cluster: scripted\n    user: scripted\n    namespace: {SYSTEM}\ncurrent-context: scripted\nusers:\n- name: scripted\n  user: {{}}\n"
        ),
    )
    .expect("kubeconfig");
    let (api_port, admin_port) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_autoscaler"))
        .env_clear()
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "autoscaler-0")
        .env("POD_NAMESPACE", SYSTEM)
        .env("AUTOSCALER_PORT", api_port.to_string())
        .env("AUTOSCALER_ADMIN_PORT", admin_port.to_string())
        .env("LEASE_RETRY_PERIOD", "200ms")
        .env("MECHA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the autoscaler binary starts");
    let mut process = Process(child);

    // Ready: caches synced, leading, reconcilers running.
    let ready = tokio::time::timeout(support::WAIT, async {
        loop {
            let (status, _) = http(admin_port, &get("/ready", None), Duration::from_secs(1)).await;
            if status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "the autoscaler never became ready");
    assert_eq!(
        http(admin_port, &get("/live", None), Duration::from_secs(1))
            .await
            .0,
        200
    );
    server
        .wait_for("the Lease held by autoscaler-0", |s| {
            let holder = s
                .get::<Lease>(SYSTEM, "mecha-autoscaler")
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity);
            (holder.as_deref() == Some("autoscaler-0")).then_some(())
        })
        .await;

    // The control-plane API: 401 without a token, the tables with one.
    let (status, text) = http(
        api_port,
        &get("/api/v1/watch", None),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = http(
        api_port,
        &get(
            "/api/v1/watch",
            Some("forged-0123456789abcdef0123456789abcdef"),
        ),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = http(
        api_port,
        &get("/api/v1/watch", Some(SIDECAR_TOKEN)),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("\"routes\"") && text.contains("\"endpoints\""),
        "{text}"
    );
    let (_, metrics) = http(admin_port, &get("/metrics", None), Duration::from_secs(2)).await;
    assert!(
        metrics.contains("mecha_autoscaler_token_reviews_total{result=\"accepted\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("mecha_admin_refused_requests_total{reason=\"credential\"} 2"));

    // SIGTERM: drains, releases the Lease, exits 0.
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(process.0.id()).expect("pid")).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let exited = tokio::time::timeout(support::WAIT, async {
        loop {
            if let Some(status) = process.0.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the autoscaler exits after SIGTERM");
    assert!(exited.success(), "{exited:?}");
    let holder = server
        .get::<Lease>(SYSTEM, "mecha-autoscaler")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the Lease is released");
    let _ = std::fs::remove_dir_all(&dir);
}
