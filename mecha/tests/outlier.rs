//! Outlier detection end to end: a replica that stops answering (SIGSTOP: its socket still
//! accepts connections, so its probe keeps passing) is taken out of rotation after a few
//! timeouts and comes back once its ejection time is over.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use support::{Mecha, Response, Workdir, echo_service, wait_until};

/// Failures in a row that eject a replica (the default).
const FAILURES: usize = 3;
/// The ejection time the test runs with (the default is 30 s).
const EJECTION: Duration = Duration::from_secs(4);

/// A stopped process, continued when dropped — also when an assertion fails.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Self {
        signal(pid, Signal::STOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal(self.0, Signal::CONT);
    }
}

fn signal(pid: u32, signal: Signal) -> rustix::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a pid");
    kill_process(pid, signal)
}

/// The value of a metric line that starts with `series` on the admin API's `/metrics`.
fn metric(mecha: &Mecha, series: &str) -> Option<f64> {
    let metrics = support::http(mecha.admin, "localhost", "/metrics");
    assert_eq!(metrics.status, 200);
    metrics
        .body
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Which of the gateway's two paths requests take.
#[derive(Clone, Copy)]
enum Path {
    /// HTTP/1.1: the fast path (`h1::serve`).
    Fast,
    /// HTTP/1.0: handed to hyper's server (`Gateway::forward`).
    Hyper,
}

/// A GET through the gateway on `path`.
fn get(mecha: &Mecha, host: &str, path: Path) -> Response {
    match path {
        Path::Fast => mecha.get(host, "/"),
        Path::Hyper => {
            let mut stream = TcpStream::connect(mecha.gateway).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            write!(stream, "GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
            let mut raw = String::new();
            let _ = stream.read_to_string(&mut raw);
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Response {
                status,
                headers: Vec::new(),
                body: body.to_string(),
            }
        }
    }
}

#[test]
fn a_stopped_replica_is_ejected_after_a_few_timeouts_and_restored_after_its_ejection_time() {
    stopped_replica_scenario(Path::Fast);
}

#[test]
fn on_hyper_s_path_too_a_stopped_replica_is_ejected_and_restored() {
    stopped_replica_scenario(Path::Hyper);
}

fn stopped_replica_scenario(path: Path) {
    let dir = Workdir::new("outlier");
    dir.write(
        "svc.yaml",
        &echo_service(
            "hung",
            &[("min-scale", "2")],
            "      timeoutSeconds: 2\n",
            "red",
        ),
    );
    let mecha = Mecha::start(
        &[&dir.path],
        &[],
        &["--outlier-ejection-time", "4s"],
        &Mecha::fresh_state_dir(),
    );
    mecha.wait_ready("hung", 2);
    let host = "hung.default.localhost";
    let pids = mecha.pids("hung");
    assert_eq!(pids.len(), 2, "{pids:?}");
    let (victim, healthy) = (pids[0], pids[1]);

    let stopped = Stopped::stop(victim);
    // Each request goes to either replica; those sent to the stopped one time out (504 after
    // the 2 s timeout) until it has failed FAILURES in a row.
    let mut timeouts = 0;
    let mut sent = 0;
    while timeouts < FAILURES {
        sent += 1;
        assert!(sent <= 200, "only {timeouts} of {sent} requests timed out");
        let response = get(&mecha, host, path);
        match response.status {
            200 => assert_eq!(response.echo().1, healthy, "{response:?}"),
            504 => timeouts += 1,
            status => panic!("unexpected {status}: {response:?}"),
        }
    }
    let ejected_at = Instant::now();
    // Every further request is answered by the other replica, at once.
    for _ in 0..30 {
        let started = Instant::now();
        let response = get(&mecha, host, path);
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.echo().1, healthy, "{response:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    let revision = "mecha_gateway_replica_ejections_total{namespace=\"default\",revision=\"hung-00001\",service=\"hung\"}";
    assert_eq!(metric(&mecha, revision), Some(1.0));
    let gauge = "mecha_gateway_ejected_replicas{namespace=\"default\",revision=\"hung-00001\",service=\"hung\"}";
    assert_eq!(metric(&mecha, gauge), Some(1.0));
    assert!(
        ejected_at.elapsed() < EJECTION,
        "the checks took longer than the ejection"
    );

    // Continued, it gets requests again once its ejection time is over, not before.
    drop(stopped);
    wait_until("the continued replica to answer again", || {
        let response = get(&mecha, host, path);
        assert_eq!(response.status, 200, "{response:?}");
        let back = response.echo().1 == victim;
        if back {
            assert!(
                ejected_at.elapsed() + Duration::from_millis(200) >= EJECTION,
                "answered {:?} after the ejection",
                ejected_at.elapsed()
            );
        }
        back
    });
    wait_until("the ejected gauge to drop", || {
        metric(&mecha, gauge) == Some(0.0)
    });
    // Back for good: both replicas share the requests again.
    let served: std::collections::BTreeSet<u32> =
        (0..40).map(|_| get(&mecha, host, path).echo().1).collect();
    assert_eq!(served, [victim, healthy].into_iter().collect());
    assert_eq!(metric(&mecha, revision), Some(1.0));
}
