//! Real `nats-server` processes with JetStream on loopback: one node, or a cluster of three,
//! each with a store directory of its own; stopped, killed and restarted on the same ports and
//! store by the tests, and killed (their stores removed) on drop.
//!
//! `nats-server` must be installed (`scripts/test.sh` installs Debian's package when it is
//! missing); without it the tests fail and say how to install it, they are never skipped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// One `nats-server` process, which may be stopped and started again.
#[derive(Debug)]
pub struct NatsServer {
    pub name: String,
    pub port: u16,
    monitor: u16,
    /// This node's cluster port and its peers' (empty for a single node).
    cluster: Option<(u16, Vec<u16>)>,
    store: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// A single node with JetStream, listening and ready.
    pub fn start() -> Self {
        let [port, monitor] = crate::free_ports();
        let mut server = Self::new("n0".into(), port, monitor, None);
        server.spawn();
        server.wait_ready();
        server
    }

    /// Three nodes clustered on loopback, each ready (JetStream has a leader).
    pub fn cluster() -> Vec<Self> {
        let ports: [u16; 9] = crate::free_ports();
        let cluster_ports = [ports[6], ports[7], ports[8]];
        let mut nodes: Vec<Self> = (0..3)
            .map(|i| {
                let peers = cluster_ports
                    .iter()
                    .copied()
                    .filter(|p| *p != cluster_ports[i])
                    .collect();
                Self::new(
                    format!("n{i}"),
                    ports[i],
                    ports[3 + i],
                    Some((cluster_ports[i], peers)),
                )
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &nodes {
            node.wait_ready();
        }
        nodes
    }

    fn new(name: String, port: u16, monitor: u16, cluster: Option<(u16, Vec<u16>)>) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store =
            std::env::temp_dir().join(format!("mecha-nats-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store).unwrap();
        Self {
            name,
            port,
            monitor,
            cluster,
            store,
            child: None,
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string()])
            .args(["-js", "-sd"])
            .arg(&self.store)
            .args(["--server_name", &self.name]);
        if let Some((port, peers)) = &self.cluster {
            let routes: Vec<String> = peers
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            command
                .args(["--cluster_name", "mecha-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{port}")])
                .args(["--routes", &routes.join(",")]);
        }
        // Its log goes to the test's output only when asked for: it is chatty.
        let quiet = std::env::var_os("MECHA_TEST_NATS_LOG").is_none();
        command
            .stdin(Stdio::null())
            .stdout(if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .stderr(if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            });
        match command.spawn() {
            Ok(child) => self.child = Some(child),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
                "nats-server is not installed: `apt-get install -y nats-server` (scripts/test.sh installs it)"
            ),
            Err(error) => panic!("cannot start nats-server: {error}"),
        }
    }

    /// Waits until the server answers its health check (JetStream included) with 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not become healthy on port {}",
                self.name,
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.monitor)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
    }

    /// Stops the server with SIGTERM (it shuts down cleanly) and waits for it.
    pub fn stop(&mut self) {
        self.signal(Signal::TERM);
    }

    /// Kills the server with SIGKILL, as a crash of its machine would.
    pub fn kill(&mut self) {
        self.signal(Signal::KILL);
    }

    fn signal(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
            if let Some(pid) = pid {
                let _ = kill_process(pid, signal);
            }
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports with the same store, and waits until it is
    /// ready.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
