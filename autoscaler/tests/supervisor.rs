//! The process supervisor against real processes on 127.0.0.1.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use autoscaler::logs::LogHub;
use std::collections::BTreeMap;

use autoscaler::{RevisionSpec, ServingState, Supervisor, SupervisorConfig};
use crds::{Mode, Resource, load_str};
use mecha_common::EndpointTable;
use tokio::sync::watch;

const SERVER: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{os.environ['K_REVISION']} {os.getpid()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

fn state_with(command: &[&str], annotations: &str) -> ServingState {
    let command = serde_json::to_string(command).expect("json");
    let yaml = format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: sup\nspec:\n  template:\n    metadata:\n      annotations: {{{annotations}}}\n    spec:\n      containers:\n        - command: {command}\n"
    );
    let (mut loaded, errors) = load_str(Path::new("/tmp/sup.yaml"), &yaml, Mode::Local);
    assert!(errors.is_empty(), "{errors:?}");
    let loaded = loaded.remove(0);
    let Resource::Service(service) = loaded.resource else {
        panic!("not a service")
    };
    let mut state = ServingState::default();
    state.apply(service, loaded.source).expect("apply");
    state
}

/// Every active revision of `state` at `count` replicas.
fn replicas(state: &ServingState, count: u32) -> BTreeMap<String, (Arc<RevisionSpec>, u32)> {
    state
        .desired("localhost", |_| true)
        .active
        .into_iter()
        .map(|(name, revision)| (name, (revision, count)))
        .collect()
}

fn new_supervisor(grace: Duration) -> (Supervisor, LogHub) {
    let logs = LogHub::new(false);
    let config = SupervisorConfig {
        grace_period: grace,
        restart_backoff: Duration::from_millis(50),
        max_restart_backoff: Duration::from_millis(400),
        guard: None,
        mesh_proxy: None,
    };
    (
        Supervisor::new(
            config,
            logs.clone(),
            mecha_common::Activation::new().0,
            &prometheus::Registry::new(),
        ),
        logs,
    )
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<EndpointTable>>,
    what: &str,
    f: impl Fn(&EndpointTable) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|t| f(t)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("supervisor alive");
}

fn alive(pid: u32) -> bool {
    // A zombie is as good as gone: it only waits to be reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test]
async fn runs_probes_restarts_and_stops_replicas() {
    let state = state_with(
        &["python3", "-c", SERVER],
        "autoscaling.knative.dev/min-scale: \"2\"",
    );
    let (supervisor, logs) = new_supervisor(Duration::from_secs(5));
    let mut endpoints = supervisor.endpoints();
    let desired = replicas(&state, 2);
    supervisor.apply(&desired);
    wait_for(&mut endpoints, "two ready replicas", |t| {
        t.ready("sup-00001").len() == 2
    })
    .await;
    assert!(supervisor.ever_ready("sup-00001"));

    // Both replicas really serve, each on its own port with the Knative environment.
    let status = supervisor.status("sup-00001").expect("status");
    let pids: Vec<u32> = status
        .replicas
        .iter()
        .map(|r| r.pid.expect("pid"))
        .collect();
    for replica in &status.replicas {
        let addr = replica.addr.expect("addr");
        let body = get(addr).await;
        assert_eq!(body, format!("sup-00001 {}", replica.pid.expect("pid")));
    }
    let key = mecha_common::routing::ServiceKey::new("default", "sup");
    assert!(
        logs.follow(&key)
            .0
            .iter()
            .map(ToString::to_string)
            .any(|l| l.starts_with("[sup/sup-00001-") && l.ends_with("listening"))
    );

    // A killed replica is restarted with a new process.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pids[0] as i32).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill");
    wait_for(
        &mut endpoints,
        "the killed replica to leave rotation",
        |t| t.ready("sup-00001").len() == 1,
    )
    .await;
    wait_for(&mut endpoints, "the restarted replica", |t| {
        t.ready("sup-00001").len() == 2
    })
    .await;
    let status = supervisor.status("sup-00001").expect("status");
    assert_eq!(status.replicas.iter().map(|r| r.restarts).sum::<u32>(), 1);
    let new_pids: Vec<u32> = status
        .replicas
        .iter()
        .map(|r| r.pid.expect("pid"))
        .collect();
    assert!(!new_pids.contains(&pids[0]));

    // Scaling down to one stops one; stopping all leaves no process behind.
    let mut one = desired.clone();
    one.get_mut("sup-00001").expect("rev").1 = 1;
    supervisor.apply(&one);
    wait_for(&mut endpoints, "scale down to one", |t| {
        t.ready("sup-00001").len() == 1
    })
    .await;
    supervisor.shutdown().await;
    assert!(supervisor.status("sup-00001").is_none());
    for pid in new_pids {
        assert!(!alive(pid), "replica {pid} still running after shutdown");
    }
}

#[tokio::test]
async fn a_crashing_command_is_restarted_with_backoff_and_a_missing_one_is_reported() {
    let state = state_with(&["sh", "-c", "echo boom; exit 3"], "");
    let (supervisor, logs) = new_supervisor(Duration::from_secs(1));
    supervisor.apply(&replicas(&state, 1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let restarts: u32 = supervisor
            .status("sup-00001")
            .map(|s| s.replicas.iter().map(|r| r.restarts).sum())
            .unwrap_or(0);
        if restarts >= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no restarts seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!supervisor.ever_ready("sup-00001"));
    let key = mecha_common::routing::ServiceKey::new("default", "sup");
    let lines = logs.follow(&key).0;
    assert!(lines.iter().any(|l| &*l.text == "boom"), "{lines:?}");
    // Each crash leaves a marker with how the process ended.
    let marker = lines
        .iter()
        .find(|l| l.text.starts_with("mecha: process ended ("))
        .unwrap_or_else(|| panic!("no crash marker in {lines:?}"));
    assert!(marker.text.contains("exit status: 3"), "{marker}");
    let status = supervisor.status("sup-00001").expect("status");
    assert!(
        status.replicas[0].last_exit.as_deref() == Some("exit status: 3"),
        "{:?}",
        status.replicas
    );
    supervisor.shutdown().await;

    let state = state_with(&["./no-such-program"], "");
    let (supervisor, logs) = new_supervisor(Duration::from_secs(1));
    supervisor.apply(&replicas(&state, 1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = logs.follow(&key).0;
    assert!(
        lines
            .iter()
            .any(|l| l.text.contains("cannot start `./no-such-program`")),
        "{lines:?}"
    );
    supervisor.shutdown().await;
}

#[tokio::test]
async fn a_replica_ignoring_sigterm_is_killed_after_the_grace_period() {
    let script = "trap '' TERM; echo up; while true; do sleep 0.05; done";
    let state = state_with(&["sh", "-c", script], "");
    let (supervisor, _) = new_supervisor(Duration::from_millis(300));
    supervisor.apply(&replicas(&state, 1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = supervisor
            .status("sup-00001")
            .and_then(|s| s.replicas.first().and_then(|r| r.pid))
        {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    supervisor.shutdown().await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(!alive(pid));
}

async fn get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}
