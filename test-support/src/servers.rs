//! Real `redis-server` and `mosquitto` processes on loopback, on free ports, for the queue
//! sources' tests; killed on drop.
//!
//! Both must be installed (`scripts/test.sh` installs Debian's `redis-server`, `mosquitto` and
//! `mosquitto-clients` when missing); without them the tests fail and say how to install them,
//! they are never skipped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One server process, killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct Server {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Server {
    /// `redis-server` on 127.0.0.1 without persistence, answering `PING`.
    pub fn redis() -> Self {
        let [port] = crate::free_ports();
        let dir = scratch("redis");
        let child = spawn(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir),
            "redis-server",
            "redis-server",
        );
        let server = Self { port, dir, child };
        server.wait_until(|stream| {
            stream.write_all(b"PING\r\n").ok()?;
            let mut answer = [0u8; 7];
            stream.read_exact(&mut answer).ok()?;
            (&answer == b"+PONG\r\n").then_some(())
        });
        server
    }

    /// `mosquitto` on 127.0.0.1 (anonymous clients allowed, sessions in memory).
    pub fn mosquitto() -> Self {
        let [port] = crate::free_ports();
        let dir = scratch("mosquitto");
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = spawn(
            Command::new("mosquitto").arg("-c").arg(&config),
            "mosquitto",
            "mosquitto",
        );
        let server = Self { port, dir, child };
        server.wait_until(|_| Some(()));
        server
    }

    /// `redis-cli -p PORT ARGS…`: its output, trimmed; panics when it fails.
    pub fn redis_cli(&self, args: &[&str]) -> String {
        let output = run(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(args),
            "redis-cli",
            "redis-server",
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Publishes `payload` to `topic` at QoS 1 with `mosquitto_pub`.
    pub fn mqtt_publish(&self, topic: &str, payload: &str) {
        run(
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-q", "1", "-t", topic, "-m", payload]),
            "mosquitto_pub",
            "mosquitto-clients",
        );
    }

    fn wait_until(&self, mut ready: impl FnMut(&mut TcpStream) -> Option<()>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                if ready(&mut stream).is_some() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server on port {} did not become ready",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mecha-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn spawn(command: &mut Command, program: &str, package: &str) -> Child {
    let quiet = std::env::var_os("MECHA_TEST_SERVER_LOG").is_none();
    command.stdin(Stdio::null());
    if quiet {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    }
    match command.spawn() {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} is not installed: `apt-get install -y {package}` (scripts/test.sh installs it)"
        ),
        Err(error) => panic!("cannot start {program}: {error}"),
    }
}

fn run(command: &mut Command, program: &str, package: &str) -> Output {
    let output = match command.stdin(Stdio::null()).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} is not installed: `apt-get install -y {package}` (scripts/test.sh installs it)"
        ),
        Err(error) => panic!("cannot run {program}: {error}"),
    };
    assert!(output.status.success(), "{program} failed: {output:?}");
    output
}
