//! A binary of the crate as a real process against the scripted API server, served over
//! HTTP on 127.0.0.1 and found through a kubeconfig (as `kube::Config::infer` finds any
//! cluster): `tests/autoscaler_bin.rs` and `tests/apiserver_adapter_bin.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::ApiServer;

/// Serves `server` over HTTP/1.1 on 127.0.0.1.
pub async fn serve_http(server: ApiServer) -> SocketAddr {
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

/// Writes a kubeconfig for the scripted server at `addr` (default namespace `namespace`)
/// into `dir`.
pub fn kubeconfig(dir: &Path, addr: SocketAddr, namespace: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: scripted\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: scripted\n  context:\n    cluster: scripted\n    user: scripted\n    namespace: {namespace}\ncurrent-context: scripted\nusers:\n- name: scripted\n  user: {{}}\n"
        ),
    )
    .expect("kubeconfig");
    path
}

/// A port free now on 127.0.0.1 (the binary binds the port it is given).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One HTTP/1.1 request; the status and what arrived of the body within `read_for` (until
/// the body holds `until`, when given).
pub async fn http(
    port: u16,
    request: &str,
    read_for: Duration,
    until: Option<&str>,
) -> (u16, String) {
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
            if until.is_some_and(|u| String::from_utf8_lossy(&bytes).contains(u)) {
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

/// A `GET` with an optional bearer token, closing the connection after the answer.
pub fn get(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n")
}

/// A child process, killed if the test ends before it exits.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Sends SIGTERM and waits (at most [`super::WAIT`]) for the exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.0.id()).expect("pid"))
            .expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        tokio::time::timeout(super::WAIT, async {
            loop {
                if let Some(status) = self.0.try_wait().expect("wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the process exits after SIGTERM")
    }

    /// Waits (at most [`super::WAIT`]) until `GET path` on `port` answers `status`; the body.
    pub async fn wait_http(&self, port: u16, path: &str, status: u16) -> String {
        self.wait_answer(port, path, |code, _| code == status).await
    }

    /// Waits (at most [`super::WAIT`]) until `GET path` on `port` answers as `wanted` says
    /// (given the status and the whole answer); the answer.
    pub async fn wait_answer(
        &self,
        port: u16,
        path: &str,
        wanted: impl Fn(u16, &str) -> bool,
    ) -> String {
        let mut last = String::new();
        let found = tokio::time::timeout(super::WAIT, async {
            loop {
                let (code, text) = http(port, &get(path, None), Duration::from_secs(1), None).await;
                if wanted(code, &text) {
                    return text;
                }
                last = text;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("GET {path} never answered as wanted; last: {last}"))
    }
}
