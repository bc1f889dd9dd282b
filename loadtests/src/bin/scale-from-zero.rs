//! Scale-from-zero benchmarks against `mecha up`:
//!
//! - **cold start**: time to the first response from a zero-scaled Python hello function, next
//!   to that same function's own spawn-to-listening time measured in the same run (interleaved,
//!   run by run); the difference is the platform's overhead;
//! - **burst**: 1,000 concurrent requests against a zero-scaled service — every status, the time
//!   until all are answered, and the peak replicas.
//!
//! cargo build --release -p mecha -p loadtests
//! target/release/scale-from-zero [--runs 10] [--burst 1000] [--mecha target/release/mecha]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loadtests::{Percentiles, Platform, admin_get, client, get};

struct Args {
    mecha: PathBuf,
    runs: usize,
    burst: usize,
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        mecha: root.join("target/release/mecha"),
        runs: 10,
        burst: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--mecha" => args.mecha = value.clone().into(),
            "--runs" => args.runs = number()?,
            "--burst" => args.burst = number()?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    loadtests::main_with(parse_args, run).await;
}

fn service(name: &str, app: &Path, extra_annotations: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/initial-scale: \"0\"\n{extra_annotations}    spec:\n      containers:\n        - command: [python3, {}]\n",
        app.display()
    )
}

async fn run(args: Args) -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let example =
        std::path::absolute(root.join("examples/hello-python")).map_err(|e| e.to_string())?;
    let app = example.join("app.py");
    let dir = std::env::temp_dir().join(format!("mecha-scale-from-zero-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut yaml = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: config-autoscaler\n  namespace: knative-serving\ndata:\n  allow-zero-initial-scale: \"true\"\n",
    );
    for i in 0..args.runs {
        yaml.push_str("---\n");
        yaml.push_str(&service(&format!("cold-{i}"), &app, ""));
    }
    yaml.push_str("---\n");
    yaml.push_str(&service("burst", &app, ""));
    std::fs::write(dir.join("services.yaml"), yaml).map_err(|e| e.to_string())?;

    let http = client();
    let platform = Platform::start(&args.mecha, std::slice::from_ref(&dir))?;
    // Wait until the platform answers (a 404 for an unknown host is an answer).
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&http, platform.gateway, "nobody.default.localhost", "/")
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("the gateway did not answer".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Cold starts, interleaved with the bare process's start-up time.
    let mut bare = Vec::new();
    let mut cold = Vec::new();
    for i in 0..args.runs {
        bare.push(spawn_to_listening(&example)?);
        let host = format!("cold-{i}.default.localhost");
        let started = Instant::now();
        let status = get(&http, platform.gateway, &host, "/").await?;
        cold.push(started.elapsed());
        if status != 200 {
            return Err(format!("cold start of cold-{i} answered {status}"));
        }
    }
    let overheads: Vec<Duration> = cold
        .iter()
        .zip(&bare)
        .map(|(c, b)| c.saturating_sub(*b))
        .collect();
    let b = Percentiles::of(&mut bare.clone());
    let c = Percentiles::of(&mut cold.clone());
    let o = Percentiles::of(&mut overheads.clone());
    println!(
        "cold start, {} runs (ms)        p50      p90      max",
        args.runs
    );
    let max = |v: &[Duration]| v.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3);
    println!(
        "  python3 app.py to listening {:>8.1} {:>8.1} {:>8.1}",
        b.p50 / 1e3,
        b.p90 / 1e3,
        max(&bare)
    );
    println!(
        "  first response through mecha{:>8.1} {:>8.1} {:>8.1}",
        c.p50 / 1e3,
        c.p90 / 1e3,
        max(&cold)
    );
    println!(
        "  platform overhead (per run) {:>8.1} {:>8.1} {:>8.1}",
        o.p50 / 1e3,
        o.p90 / 1e3,
        max(&overheads)
    );

    // Burst: N concurrent requests against zero replicas.
    let done = Arc::new(AtomicBool::new(false));
    let peak_desired = Arc::new(AtomicU64::new(0));
    let peak_ready = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (done, peak_desired, peak_ready) =
            (done.clone(), peak_desired.clone(), peak_ready.clone());
        let http = http.clone();
        let admin = platform.admin;
        let token = platform.admin_token.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok((_, body)) = admin_get(&http, admin, &token, "/api/v1/services").await
                    && let Ok(services) = serde_json::from_slice::<serde_json::Value>(&body)
                {
                    for s in services
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|s| s["name"] == "burst")
                    {
                        peak_desired
                            .fetch_max(s["desired"].as_u64().unwrap_or(0), Ordering::Relaxed);
                        peak_ready.fetch_max(s["ready"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let requests: Vec<_> = (0..args.burst)
        .map(|_| {
            let http = http.clone();
            let gateway = platform.gateway;
            tokio::spawn(async move {
                let status = get(&http, gateway, "burst.default.localhost", "/").await;
                (status, started.elapsed())
            })
        })
        .collect();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::new();
    for request in requests {
        let (status, elapsed) = request.await.map_err(|e| e.to_string())?;
        let key = match status {
            Ok(code) => code.to_string(),
            Err(error) => format!("error: {error}"),
        };
        *statuses.entry(key).or_default() += 1;
        latencies.push(elapsed);
    }
    let all = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    let l = Percentiles::of(&mut latencies);
    println!(
        "burst of {} concurrent requests against zero replicas",
        args.burst
    );
    println!("  statuses: {statuses:?}");
    println!(
        "  all answered after {:.0} ms (p50 {:.0} ms, p99 {:.0} ms)",
        all.as_secs_f64() * 1e3,
        l.p50 / 1e3,
        l.p99 / 1e3
    );
    println!(
        "  peak replicas: {} desired, {} ready",
        peak_desired.load(Ordering::Relaxed),
        peak_ready.load(Ordering::Relaxed)
    );
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Spawns the function as `mecha` would (same command, directory and PORT) and returns the
/// time until its port accepts a connection, polled every 100 µs.
fn spawn_to_listening(example: &Path) -> Result<Duration, String> {
    let [port] = loadtests::free_ports()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let mut child = Command::new("python3")
        .arg("app.py")
        .current_dir(example)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start python3: {e}"))?;
    let result = loop {
        if TcpStream::connect(addr).is_ok() {
            break Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            break Err("python3 app.py did not listen within 30 s".to_string());
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}
