//! Scale-from-zero benchmarks against `mecha up`:
//!
//! - **cold start**: time to the first response from a zero-scaled Python hello function, next
//!   to that same function's own spawn-to-listening time measured in the same run (interleaved,
//!   run by run); the difference is the platform's overhead;
//! - **burst**: 1,000 concurrent requests against a zero-scaled service — every status, the time
//!   until all are answered, and the peak replicas;
//! - **ramp** (`--ramp SECONDS`, a phase's length; 0 skips it): closed-loop clients on one
//!   zero-scaled service (target 10 per replica) stepped 2 → 8 → 16, then a jump to 64 (panic
//!   mode), then none until it is back at zero replicas, with `mecha up`'s `/metrics` sampled
//!   every 100 ms: observed concurrency, desired and ready replicas, panic mode.
//!
//! cargo build --release -p mecha -p loadtests
//! target/release/scale-from-zero [--runs 10] [--burst 1000] [--ramp 10] [--mecha target/release/mecha]
//!     [--json PATH]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loadtests::results::{Burst, ColdStart, Ramp, RampSample, ScaleFromZero, write_json};
use loadtests::{Percentiles, Platform, admin_get, client, get};

struct Args {
    mecha: PathBuf,
    runs: usize,
    burst: usize,
    ramp: u64,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        mecha: root.join("target/release/mecha"),
        runs: 10,
        burst: 1000,
        ramp: 10,
        json: None,
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
            "--ramp" => args.ramp = number()? as u64,
            "--json" => args.json = Some(value.clone().into()),
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
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: config-autoscaler\n  namespace: knative-serving\ndata:\n  allow-zero-initial-scale: \"true\"\n  stable-window: \"6s\"\n  scale-to-zero-grace-period: \"2s\"\n",
    );
    for i in 0..args.runs {
        yaml.push_str("---\n");
        yaml.push_str(&service(&format!("cold-{i}"), &app, ""));
    }
    yaml.push_str("---\n");
    yaml.push_str(&service("burst", &app, ""));
    yaml.push_str("---\n");
    yaml.push_str(&service(
        "ramp",
        &app,
        &format!("        autoscaling.knative.dev/target: \"{RAMP_TARGET}\"\n"),
    ));
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
    let mut result = ScaleFromZero {
        cold_starts: bare
            .iter()
            .zip(&cold)
            .map(|(b, c)| ColdStart {
                process_start_ms: b.as_secs_f64() * 1e3,
                first_response_ms: c.as_secs_f64() * 1e3,
            })
            .collect(),
        ..ScaleFromZero::default()
    };
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
    result.burst = Some(Burst {
        requests: args.burst as u64,
        statuses: statuses
            .iter()
            .map(|(k, v)| (k.clone(), *v as u64))
            .collect(),
        all_answered_ms: all.as_secs_f64() * 1e3,
        p50_ms: l.p50 / 1e3,
        p99_ms: l.p99 / 1e3,
        peak_desired: peak_desired.load(Ordering::Relaxed),
        peak_ready: peak_ready.load(Ordering::Relaxed),
    });

    if args.ramp > 0 {
        let ramp = ramp(&platform, Duration::from_secs(args.ramp)).await?;
        let peak = |f: fn(&RampSample) -> f64| ramp.samples.iter().map(f).fold(0.0, f64::max);
        let back_to_zero = ramp
            .samples
            .iter()
            .rev()
            .take_while(|s| s.ready == 0)
            .last()
            .map(|s| s.t_s);
        println!(
            "ramp on one service (target {RAMP_TARGET}), {} s phases: peak observed concurrency {:.1}, peak desired {}, peak ready {}, panic seen: {}, back at zero replicas at {}",
            args.ramp,
            peak(|s| s.observed_concurrency),
            peak(|s| s.desired as f64),
            peak(|s| s.ready as f64),
            ramp.samples.iter().any(|s| s.panic),
            back_to_zero.map_or("never (timed out)".into(), |t| format!("{t:.1} s")),
        );
        result.ramp = Some(ramp);
    }
    if let Some(path) = &args.json {
        write_json(path, &result)?;
    }
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The ramp service's concurrency target per replica.
const RAMP_TARGET: u32 = 10;

/// Closed-loop clients on the `ramp` service: 2, 8 and 16 for a phase each, 64 for a phase (a
/// jump to four times the replicas: panic mode), then none until the service is back at zero
/// replicas (at most a minute more); `/metrics` sampled every 100 ms throughout.
async fn ramp(platform: &Platform, phase: Duration) -> Result<Ramp, String> {
    const STEPS: [u64; 4] = [2, 8, 16, 64];
    let http = client();
    let clients = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let max = STEPS.iter().copied().max().unwrap_or(0);
    let mut loaders = Vec::new();
    for index in 0..max {
        let (http, clients, stop) = (http.clone(), clients.clone(), stop.clone());
        let gateway = platform.gateway;
        loaders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if index < clients.load(Ordering::Relaxed) {
                    let _ = get(&http, gateway, "ramp.default.localhost", "/").await;
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    let sample = async |samples: &mut Vec<RampSample>| -> Result<(), String> {
        let (status, body) =
            admin_get(&http, platform.admin, &platform.admin_token, "/metrics").await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        let text = String::from_utf8_lossy(&body);
        samples.push(RampSample {
            t_s: started.elapsed().as_secs_f64(),
            clients: clients.load(Ordering::Relaxed),
            observed_concurrency: metric(&text, "mecha_autoscaler_observed_concurrency", "ramp"),
            desired: metric(&text, "mecha_autoscaler_desired_replicas", "ramp") as u64,
            ready: metric(&text, "mecha_revision_ready_replicas", "ramp") as u64,
            panic: metric(&text, "mecha_autoscaler_panic_mode", "ramp") > 0.0,
        });
        Ok(())
    };
    let tick = Duration::from_millis(100);
    for step in STEPS {
        clients.store(step, Ordering::Relaxed);
        let until = Instant::now() + phase;
        while Instant::now() < until {
            sample(&mut samples).await?;
            tokio::time::sleep(tick).await;
        }
    }
    clients.store(0, Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(60);
    let mut zero_since = None;
    while Instant::now() < until {
        sample(&mut samples).await?;
        let at_zero = samples
            .last()
            .is_some_and(|s| s.ready == 0 && s.desired == 0);
        // A second at zero, so the plot shows it stays there.
        match (at_zero, zero_since) {
            (true, None) => zero_since = Some(Instant::now()),
            (true, Some(since)) if since.elapsed() > Duration::from_secs(1) => break,
            (false, _) => zero_since = None,
            _ => {}
        }
        tokio::time::sleep(tick).await;
    }
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        let _ = loader.await;
    }
    Ok(Ramp {
        target: f64::from(RAMP_TARGET),
        stable_window_s: 6.0,
        scale_to_zero_grace_s: 2.0,
        samples,
    })
}

/// The sum of `name`'s samples whose labels mention `service`, from Prometheus' text format.
fn metric(text: &str, name: &str, service: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix('{'))
        .filter_map(|rest| rest.split_once('}'))
        .filter(|(labels, _)| labels.contains(service))
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
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
