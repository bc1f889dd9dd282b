//! Runs the real `mecha` binary against YAML in a temporary directory and talks to it over
//! real sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use activator_sidecar::discovery::{GatewayConfig, serve_gateway};
use mecha_common::Shutdown;
use mecha_common::admin::Health;
use mecha_common::auth::AdminToken;

// The corpus and the attack harness live with the data path's own tests; `mecha up` is attacked
// with the same ones.
#[path = "../../../activator-sidecar/tests/support/corpus.rs"]
pub mod corpus;
#[path = "../../../activator-sidecar/tests/support/hostile.rs"]
pub mod hostile;
// The recording subscriber is shared with the importers' tests (test-support); not every
// test file that includes this module uses it.
#[allow(unused_imports)]
pub use test_support::subscriber;

pub const ECHO: &str = include_str!("echo.py");

/// A function that appends the `ce-id` of every event POSTed to it to `received.txt` in its
/// working directory and answers 202.
pub const CE_ID_RECORDER: &str = "import http.server, os\n\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_POST(self):\n        body = self.rfile.read(int(self.headers.get('Content-Length', 0)))\n        with open('received.txt', 'a') as f:\n            f.write(self.headers.get('ce-id', '') + '\\n')\n        self.send_response(202)\n        self.send_header('Content-Length', '0')\n        self.end_headers()\n\n    def log_message(self, *args):\n        pass\n\nhttp.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n";

/// A `config-autoscaler` with windows short enough for tests: a 6 s stable window, a 1 s grace
/// period, and zero initial scale allowed.
pub const FAST_CONFIG: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: config-autoscaler
  namespace: knative-serving
data:
  stable-window: 6s
  scale-to-zero-grace-period: 1s
  allow-zero-initial-scale: \"true\"
";

/// A scratch directory with the echo function in it, removed on drop.
pub struct Workdir {
    pub path: PathBuf,
}

impl Workdir {
    pub fn new(name: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mecha-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("echo.py"), ECHO).unwrap();
        Self { path }
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A Service running `echo.py`, with optional template annotations, spec lines and env.
pub fn echo_service(
    name: &str,
    annotations: &[(&str, &str)],
    spec_extra: &str,
    color: &str,
) -> String {
    let annotations: String = annotations
        .iter()
        .map(|(k, v)| format!("        autoscaling.knative.dev/{k}: \"{v}\"\n"))
        .collect();
    let metadata = if annotations.is_empty() {
        String::new()
    } else {
        format!("    metadata:\n      annotations:\n{annotations}")
    };
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  template:\n{metadata}    spec:\n{spec_extra}      containers:\n        - command: [python3, echo.py]\n          env:\n            - name: COLOR\n              value: {color}\n"
    )
}

/// A Service running the recording upstream (`hostile::RECORDER`, which the caller writes as
/// `recorder.py`) on exactly one replica, logging to `log`.
pub fn recorder_service(name: &str, log: &Path) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/min-scale: \"1\"\n        autoscaling.knative.dev/max-scale: \"1\"\n    spec:\n      containers:\n        - command: [python3, recorder.py]\n          env:\n            - name: RECORD_LOG\n              value: {}\n",
        log.display()
    )
}

/// `mecha up FILE` that must refuse to start (a load error): its stderr.
pub fn refused_up(file: &Path, state_dir: &Path) -> String {
    let output = Command::new(mecha_bin())
        .arg("up")
        .arg(file)
        .args(["--port", "0", "--admin-port", "0", "--state-dir"])
        .arg(state_dir)
        .output()
        .expect("run mecha up");
    assert!(!output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn mecha_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mecha")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A running `mecha up`.
pub struct Mecha {
    pub child: Child,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// Its log lines (also echoed to the test's output).
    pub stderr: Arc<Mutex<Vec<String>>>,
    state_dir: PathBuf,
    /// A state directory inside the test's own directory outlives this run (a restart in
    /// the same directory finds it); others are removed with it.
    keep_state: bool,
}

impl Mecha {
    /// Starts `mecha up PATHS` on free ports and waits until it listens.
    pub fn up(paths: &[&Path]) -> Self {
        Self::up_with(paths, &[])
    }

    pub fn up_with(paths: &[&Path], envs: &[(&str, &str)]) -> Self {
        Self::start(paths, envs, &[], &Self::fresh_state_dir())
    }

    /// A state directory no other run uses.
    pub fn fresh_state_dir() -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("mecha-state-{}-{n}", std::process::id()))
    }

    /// `mecha up PATHS ARGS` with `envs`, keeping its state in `state_dir`.
    pub fn start(paths: &[&Path], envs: &[(&str, &str)], args: &[&str], state_dir: &Path) -> Self {
        let mut command = Command::new(mecha_bin());
        command
            .arg("up")
            .args(paths)
            .args(["--port", "0", "--admin-port", "0", "--grace-period", "3s"])
            .args(args)
            .arg("--state-dir")
            .arg(state_dir)
            .envs(envs.iter().copied());
        Self::spawn(command, state_dir)
    }

    /// `mecha up .` in `dir` with the default state directory (`dir/.mecha`), as a user
    /// would start it.
    pub fn start_in(dir: &Path) -> Self {
        let mut command = Command::new(mecha_bin());
        command
            .args([
                "up",
                ".",
                "--port",
                "0",
                "--admin-port",
                "0",
                "--grace-period",
                "3s",
            ])
            .current_dir(dir)
            .env_remove("MECHA_STATE_DIR")
            .env_remove("MECHA_ADMIN_TOKEN");
        let mut mecha = Self::spawn(command, &dir.join(".mecha"));
        mecha.keep_state = true;
        mecha
    }

    fn spawn(mut command: Command, state_dir: &Path) -> Self {
        let state_dir = state_dir.to_path_buf();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("mecha: {line}");
                log.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (gateway, admin) = loop {
            let found = {
                let lines = stdout.lock().unwrap();
                let addr = |prefix: &str| {
                    lines.iter().find_map(|l| {
                        let rest = l
                            .strip_prefix(prefix)?
                            .trim_start()
                            .strip_prefix("http://")?;
                        rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
                    })
                };
                addr("  gateway").zip(addr("  admin"))
            };
            if let Some(found) = found {
                break found;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mecha up exited early with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "mecha up did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            gateway,
            admin,
            stdout,
            stderr,
            state_dir,
            keep_state: false,
        }
    }

    /// GET `path` on `host` through the gateway.
    pub fn get(&self, host: &str, path: &str) -> Response {
        http(self.gateway, host, path)
    }

    /// Runs a `mecha` client command against this instance (which finds the credential in
    /// the state directory, as it would in the directory `mecha up` runs in).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(mecha_bin())
            .args(args)
            .env("MECHA_ADMIN_ADDR", self.admin.to_string())
            .env("MECHA_STATE_DIR", &self.state_dir)
            .env_remove("MECHA_ADMIN_TOKEN")
            .output()
            .unwrap()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Leaves the state directory behind when this instance goes, for the next one.
    pub fn keep_state(&mut self) {
        self.keep_state = true;
    }

    /// The admin API's credential, as `mecha up` wrote it.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// POSTs a JSON body to the admin API with the credential.
    pub fn admin_post(&self, path: &str, body: &str) -> Response {
        let bearer = format!("Bearer {}", self.token());
        request_with(
            self.admin,
            "POST",
            "localhost",
            path,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &bearer),
            ],
            body,
        )
    }

    pub fn services_json(&self) -> serde_json::Value {
        let output = self.cli(&["get", "services", "-o", "json"]);
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Waits until every replica the service wants is ready.
    pub fn wait_ready(&self, service: &str, replicas: u64) {
        wait_until(
            &format!("{service} to have {replicas} ready replicas"),
            || {
                let services = self.services_json();
                services.as_array().unwrap().iter().any(|s| {
                    s["name"] == service
                        && s["ready"].as_u64() == Some(replicas)
                        && s["desired"].as_u64() == Some(replicas)
                })
            },
        );
    }

    /// All replica pids of a service, as the admin API reports them.
    pub fn pids(&self, service: &str) -> Vec<u32> {
        let services = self.services_json();
        services
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["revisions"].as_array().unwrap().clone())
            .flat_map(|r| r["replicas"].as_array().unwrap().clone())
            .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
            .collect()
    }

    /// SIGKILL, as a crash: nothing gets to clean up.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Sends SIGINT (Ctrl-C) and waits for exit.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::INT);
        self.wait_exit(Duration::from_secs(20))
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "mecha did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a log line contains every one of `needles`.
    pub fn log_contains(&self, needles: &[&str]) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    }

    pub fn stdout_contains(&self, needle: &str) -> bool {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Mecha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_state {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The echo function's answer: (revision, pid, color).
    pub fn echo(&self) -> (String, u32, String) {
        let mut parts = self.body.split(' ');
        let revision = parts.next().unwrap_or("").to_string();
        let pid = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let color = parts.next().unwrap_or("").to_string();
        (revision, pid, color)
    }
}

/// A one-shot HTTP/1.1 GET over a fresh connection.
pub fn http(addr: SocketAddr, host: &str, path: &str) -> Response {
    request(addr, "GET", host, path, "")
}

/// A one-shot HTTP/1.1 POST of a JSON body over a fresh connection.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> Response {
    request(addr, "POST", "localhost", path, body)
}

fn request(addr: SocketAddr, method: &str, host: &str, path: &str, body: &str) -> Response {
    request_with(
        addr,
        method,
        host,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}

/// A one-shot HTTP/1.1 request with the given headers over a fresh connection. A server may
/// answer before reading the whole body (413) and close: the rest of the body is then not sent.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body.as_bytes());
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The gateway role in-process against `mecha` (as `activator-sidecar gateway` or `outbound`
/// runs it beside a remote `mecha up`), with `token` as its credential, on the fast path or
/// hyper only.
pub fn start_gateway(
    runtime: &tokio::runtime::Runtime,
    mecha: &Mecha,
    token: Option<AdminToken>,
    fast_path: bool,
    shutdown: &Shutdown,
) -> (SocketAddr, Health, tokio::task::JoinHandle<()>) {
    start_data_path(runtime, mecha, token, fast_path, None, shutdown)
}

/// The outbound role in-process against `mecha`: the gateway that passes calls for other
/// hosts on (within 10 s), as `activator-sidecar outbound` runs in a meshed pod.
#[allow(dead_code)]
pub fn start_outbound(
    runtime: &tokio::runtime::Runtime,
    mecha: &Mecha,
    token: Option<AdminToken>,
    fast_path: bool,
    shutdown: &Shutdown,
) -> (SocketAddr, Health, tokio::task::JoinHandle<()>) {
    start_data_path(
        runtime,
        mecha,
        token,
        fast_path,
        Some(Duration::from_secs(10)),
        shutdown,
    )
}

fn start_data_path(
    runtime: &tokio::runtime::Runtime,
    mecha: &Mecha,
    token: Option<AdminToken>,
    fast_path: bool,
    pass_through: Option<Duration>,
    shutdown: &Shutdown,
) -> (SocketAddr, Health, tokio::task::JoinHandle<()>) {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = GatewayConfig {
        port: addr.port(),
        admin_port: 0,
        autoscaler: mecha.admin.to_string(),
        domain: "localhost".into(),
        drain_timeout: Duration::from_secs(1),
        name: "test-gateway".into(),
        token: token.map(Into::into),
        trusted_proxies: activator_sidecar::rules::TrustedProxies::none(),
        fast_path,
        limits: activator_sidecar::limits::Limits::default(),
        outlier: Default::default(),
        pass_through,
    };
    let health = Health::default();
    let ready = health.clone();
    let signal = shutdown.signal();
    let served = runtime.spawn(async move {
        serve_gateway(
            listener,
            config,
            &prometheus::Registry::new(),
            ready,
            signal,
        )
        .await;
    });
    (addr, health, served)
}

/// Polls `condition` every 50 ms for up to 30 s.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process is alive (a zombie awaiting its reaper counts as gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}
