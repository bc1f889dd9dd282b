//! `activator-sidecar inbound` as a child process, the request corpus and the attack harness,
//! for the integration tests.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The request corpus (`tests/corpus/`), also used by `mecha`'s tests.
pub mod corpus;
/// Attacks from outside and the recording upstream, also used by `mecha`'s tests.
pub mod hostile;

/// A port held for the test: bound with `SO_REUSEADDR` but not listening. Nobody else's
/// `bind(0)` is handed it while it is held (a port that is picked and released can be, even to
/// the very next `bind(0)`), connections to it are refused, and a child that binds it with
/// `SO_REUSEADDR` (as tokio does) can still listen on it.
pub struct Port {
    socket: tokio::net::TcpSocket,
    pub number: u16,
}

pub fn reserve_port() -> Port {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let number = socket.local_addr().expect("local address").port();
    Port { socket, number }
}

impl Port {
    /// Starts listening on the held port (the test plays the container).
    pub fn listen(self) -> tokio::net::TcpListener {
        self.socket.listen(64).expect("listen on a held port")
    }
}

/// The inbound sidecar in front of `127.0.0.1:user_port`, serving service `default/echo`
/// unless `extra` says otherwise; killed on drop.
pub struct Sidecar {
    pub child: Child,
    pub serving: SocketAddr,
    pub admin: SocketAddr,
    /// Held for the sidecar's lifetime, so no other socket of the test process takes them.
    _ports: [Port; 2],
}

impl Sidecar {
    pub fn start(user_port: u16, extra: &[(&str, &str)]) -> Self {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_activator-sidecar")),
            user_port,
            extra,
        )
    }

    /// Started by a shell that first lowers the open file limit to `files`.
    pub fn start_with_file_limit(user_port: u16, files: u32, extra: &[(&str, &str)]) -> Self {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {files} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_activator-sidecar"),
        ]);
        Self::spawn(command, user_port, extra)
    }

    fn spawn(mut command: Command, user_port: u16, extra: &[(&str, &str)]) -> Self {
        let ports = [reserve_port(), reserve_port()];
        let (serving, admin) = (ports[0].number, ports[1].number);
        let child = command
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
            _ports: ports,
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
