//! `activator-sidecar inbound` as a child process, for the integration tests.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The inbound sidecar in front of `127.0.0.1:user_port`, serving service `default/echo`
/// unless `extra` says otherwise; killed on drop.
pub struct Sidecar {
    pub child: Child,
    pub serving: SocketAddr,
    pub admin: SocketAddr,
}

impl Sidecar {
    pub fn start(user_port: u16, extra: &[(&str, &str)]) -> Self {
        let (serving, admin) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_activator-sidecar"))
            .arg("inbound")
            .env("QUEUE_SERVING_PORT", serving.to_string())
            .env("QUEUE_ADMIN_PORT", admin.to_string())
            .env("USER_PORT", user_port.to_string())
            .env("SERVING_SERVICE", "echo")
            .env("MECHA_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sidecar");
        Self {
            child,
            serving: SocketAddr::from(([127, 0, 0, 1], serving)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        }
    }

    /// Waits until the serving port accepts connections.
    pub async fn listening(self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(self.serving).await.is_err() {
            assert!(Instant::now() < deadline, "the sidecar never listened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
