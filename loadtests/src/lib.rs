//! Shared pieces of Mecha's benchmarks: starting `mecha up`, timing requests, percentiles.
//! Every benchmark reports its result next to a baseline measured in the same run.
#![forbid(unsafe_code)]

pub mod events;
pub mod report;
pub mod results;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A benchmark binary's `main`: bad arguments exit with 2, a failed run with 1, each with a
/// message on stderr.
pub async fn main_with<A, F, Fut>(parse_args: fn() -> Result<A, String>, run: F)
where
    F: FnOnce(A) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(args).await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/PID/stat` (in clock
/// ticks of 10 ms, Linux's `USER_HZ`); zero if it cannot be read.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are the 14th and 15th fields, the 12th and 13th after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of some processes at one moment; two of them give each process's CPU per event
/// between them.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot<const N: usize>([Duration; N]);

impl<const N: usize> CpuSnapshot<N> {
    /// The CPU time `pids` have used so far (see [`cpu_time`]).
    pub fn of(pids: [u32; N]) -> Self {
        Self(pids.map(cpu_time))
    }

    /// Microseconds of CPU per event of each process since `before`, over `events`.
    pub fn since(&self, before: &Self, events: f64) -> [f64; N] {
        let mut out = [0.0; N];
        for (i, slot) in out.iter_mut().enumerate() {
            let spent = self.0[i].saturating_sub(before.0[i]);
            *slot = spent.as_secs_f64() * 1e6 / events.max(1.0);
        }
        out
    }
}

/// `N` distinct ports on 127.0.0.1 that were free a moment ago, for processes the benchmark
/// starts. All `N` are held until all are picked: a port picked and released can be handed
/// out again by the very next `bind(0)`.
pub fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener
            .local_addr()
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
    }
    Ok(ports)
}

/// A `mecha up` started for a benchmark; killed (with its replicas) on drop.
#[derive(Debug)]
pub struct Platform {
    child: Child,
    pub started: Instant,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    /// The admin API's credential (`STATE_DIR/admin-token`).
    pub admin_token: String,
    state_dir: PathBuf,
}

impl Platform {
    /// Starts `mecha up PATHS` on free ports; `started` is taken just before the spawn.
    pub fn start(mecha: &Path, paths: &[PathBuf]) -> Result<Self, String> {
        let state_dir = std::env::temp_dir().join(format!("mecha-bench-{}", std::process::id()));
        let started = Instant::now();
        let mut child = Command::new(mecha)
            .arg("up")
            .args(paths)
            .args(["--port", "0", "--admin-port", "0", "--grace-period", "2s"])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("MECHA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", mecha.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    // Keep draining so the platform never blocks on a full pipe.
                    continue;
                }
            }
        });
        let mut gateway = None;
        let mut admin = None;
        while gateway.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| "mecha up did not print its addresses")?;
            let addr = |prefix: &str| -> Option<SocketAddr> {
                let rest = line
                    .strip_prefix(prefix)?
                    .trim_start()
                    .strip_prefix("http://")?;
                rest.split_whitespace().next()?.parse().ok()
            };
            gateway = gateway.or(addr("  gateway"));
            admin = admin.or(addr("  admin"));
        }
        // Written before the admin API listens, so it is there once the address is printed.
        let admin_token = std::fs::read_to_string(state_dir.join("admin-token"))
            .map_err(|e| format!("cannot read the admin API's credential: {e}"))?
            .trim()
            .to_string();
        Ok(Self {
            child,
            started,
            gateway: gateway.ok_or("no gateway address")?,
            admin: admin.ok_or("no admin address")?,
            admin_token,
            state_dir,
        })
    }

    /// The `mecha up` process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the `mecha up` process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The address of the first ready replica of `service`, from the admin API.
    pub async fn replica_addr(
        &self,
        client: &HttpClient,
        service: &str,
    ) -> Result<SocketAddr, String> {
        let (_, body) =
            admin_get(client, self.admin, &self.admin_token, "/api/v1/services").await?;
        let services: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        services
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["revisions"].as_array().cloned().unwrap_or_default())
            .flat_map(|r| r["replicas"].as_array().cloned().unwrap_or_default())
            .find(|r| r["ready"] == true)
            .and_then(|r| r["addr"].as_str().and_then(|a| a.parse().ok()))
            .ok_or_else(|| format!("no ready replica of {service}"))
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // SIGKILL: the replicas die with mecha (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(connector)
}

/// One GET; returns the status (the body is read and dropped).
pub async fn get(
    client: &HttpClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<u16, String> {
    get_body(client, addr, host, path)
        .await
        .map(|(status, _)| status)
}

/// One GET; returns the status and the body.
/// GET `path` on `mecha up`'s admin API with its credential.
pub async fn admin_get(
    client: &HttpClient,
    admin: SocketAddr,
    token: &str,
    path: &str,
) -> Result<(u16, Bytes), String> {
    let request = Request::get(format!("http://{admin}{path}"))
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    read_body(client, request).await
}

pub async fn get_body(
    client: &HttpClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, Bytes), String> {
    let request = Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    read_body(client, request).await
}

async fn read_body(
    client: &HttpClient,
    request: Request<Empty<Bytes>>,
) -> Result<(u16, Bytes), String> {
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes()))
}

/// Latency percentiles of a sample, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort();
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!(
            (p.p50.round(), p.p90.round(), p.p99.round()),
            (51.0, 90.0, 99.0)
        );
    }
}
