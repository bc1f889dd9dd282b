//! Readiness probing of a user container, as the kubelet and Knative's queue-proxy do it: a
//! TCP connect by default, or an HTTP GET judged by its status. Shared by the local supervisor
//! and the inbound sidecar.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Probing until first ready: every 5 ms for the first [`FAST_STARTUP`] of a replica's life
/// (a refused loopback connect costs microseconds, and a cold request waits for this), then
/// Knative's 50 ms. Timeout 100 ms, as in Knative.
pub const FAST_PERIOD: Duration = Duration::from_millis(5);
pub const FAST_STARTUP: Duration = Duration::from_secs(5);
pub const AGGRESSIVE_PERIOD: Duration = Duration::from_millis(50);
pub const AGGRESSIVE_TIMEOUT: Duration = Duration::from_millis(100);
/// How often a ready replica is re-probed when the probe sets no period (Kubernetes' default).
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    /// Ready while the process runs: a program that serves nothing (a ContainerSource).
    Running,
    Http {
        path: String,
        headers: Vec<(String, String)>,
    },
}

/// How to judge a replica ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    pub initial_delay: Duration,
    /// `None`: probe aggressively until ready, then every [`DEFAULT_PERIOD`].
    pub period: Option<Duration>,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

// === impl ProbeSpec ===

impl ProbeSpec {
    /// Kubernetes' defaults with a TCP connect: what a container without a
    /// `readinessProbe` gets.
    pub fn tcp() -> Self {
        Self {
            kind: ProbeKind::Tcp,
            initial_delay: Duration::ZERO,
            period: None,
            timeout: AGGRESSIVE_TIMEOUT,
            success_threshold: 1,
            failure_threshold: 3,
        }
    }

    /// Interval between probes before the replica is first ready, `running` after its start.
    pub fn startup_period(&self, running: Duration) -> Duration {
        match self.period {
            Some(period) => period,
            None if running < FAST_STARTUP => FAST_PERIOD,
            None => AGGRESSIVE_PERIOD,
        }
    }

    /// Interval between probes once the replica is ready.
    pub fn ready_period(&self) -> Duration {
        self.period.unwrap_or(DEFAULT_PERIOD)
    }

    /// One probe of the replica at `addr`.
    pub async fn check(&self, addr: SocketAddr) -> bool {
        if self.kind == ProbeKind::Running {
            return true;
        }
        let attempt = async {
            let mut stream = TcpStream::connect(addr).await.ok()?;
            match &self.kind {
                ProbeKind::Tcp | ProbeKind::Running => Some(true),
                ProbeKind::Http { path, headers } => {
                    http_get(&mut stream, addr, path, headers).await.ok()
                }
            }
        };
        matches!(
            tokio::time::timeout(self.timeout, attempt).await,
            Ok(Some(true))
        )
    }
}

/// A minimal HTTP/1.1 GET: success is a 2xx or 3xx status, as for the kubelet.
async fn http_get(
    stream: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> std::io::Result<bool> {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mecha-probe\r\nK-Kubelet-Probe: queue\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    // "HTTP/1.1 200"
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    Ok((200..400).contains(&status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_status(status: u16) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_probe_needs_a_listener() {
        let spec = ProbeSpec::tcp();
        assert_eq!(spec.kind, ProbeKind::Tcp);
        assert_eq!(spec.startup_period(Duration::ZERO), FAST_PERIOD);
        assert_eq!(spec.startup_period(FAST_STARTUP), AGGRESSIVE_PERIOD);
        let addr = serve_status(200).await;
        assert!(spec.check(addr).await);
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        assert!(!spec.check(closed_addr).await);
    }

    #[tokio::test]
    async fn http_probe_judges_by_status() {
        let spec = ProbeSpec {
            kind: ProbeKind::Http {
                path: "/healthz".into(),
                headers: vec![],
            },
            ..ProbeSpec::tcp()
        };
        assert!(spec.check(serve_status(200).await).await);
        assert!(spec.check(serve_status(302).await).await);
        assert!(!spec.check(serve_status(503).await).await);
    }
}
