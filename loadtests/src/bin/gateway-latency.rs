//! Warm-path benchmark: the time from `mecha up` to the first 200 of the Python hello example,
//! and the latency each hop adds over calling the same replica directly — the gateway, and the
//! inbound sidecar (`activator-sidecar inbound` started in front of the same replica), and nginx
//! as a reverse proxy in front of it when installed (the reference hop) — measured in the same
//! run, interleaved request by request so all paths see the same machine noise.
//! With `--rate`, requests are sent open-loop at that many per second (all paths together).
//!
//! cargo build --release -p mecha -p activator-sidecar -p loadtests
//! target/release/gateway-latency [--requests 5000] [--rate 1000] [--mecha target/release/mecha]
//!     [--sidecar target/release/activator-sidecar] [--example examples/hello-python --service hello]
//!     [--json PATH]
//!
//! `--json PATH` also writes every sample of every path there (see `loadtests::results`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use loadtests::results::{GatewayLatency, PathSamples, us, write_json};
use loadtests::{Percentiles, Platform, client, free_ports, get};

struct Args {
    mecha: PathBuf,
    sidecar: PathBuf,
    rate: Option<f64>,
    example: PathBuf,
    service: String,
    requests: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        mecha: root.join("target/release/mecha"),
        sidecar: root.join("target/release/activator-sidecar"),
        rate: None,
        example: root.join("examples/hello-python"),
        service: "hello".into(),
        requests: 5000,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mecha" => args.mecha = value.into(),
            "--sidecar" => args.sidecar = value.into(),
            "--rate" => {
                args.rate = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--rate: {value:?} is not a number"))?,
                )
            }
            "--example" => args.example = value.into(),
            "--service" => args.service = value,
            "--json" => args.json = Some(value.into()),
            "--requests" => {
                args.requests = value
                    .parse()
                    .map_err(|_| format!("--requests: {value:?} is not a number"))?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    loadtests::main_with(parse_args, run).await;
}

async fn run(args: Args) -> Result<(), String> {
    let host = format!("{}.default.localhost", args.service);
    let http = client();
    let platform = Platform::start(&args.mecha, std::slice::from_ref(&args.example))?;

    // Time to first 200: poll every millisecond from the moment `mecha up` was spawned.
    let first_ok = loop {
        if let Ok(200) = get(&http, platform.gateway, &host, "/").await {
            break platform.started.elapsed();
        }
        if platform.started.elapsed() > Duration::from_secs(60) {
            return Err("no 200 within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let replica = platform.replica_addr(&http, &args.service).await?;

    // The inbound sidecar in front of the same replica, as it would sit in a pod.
    let sidecar = Sidecar::start(&args.sidecar, replica.port())?;
    let inbound = sidecar.serving;
    let ready_by = Instant::now() + Duration::from_secs(10);
    while get(&http, inbound, &host, "/").await != Ok(200) {
        if Instant::now() > ready_by {
            return Err("the inbound sidecar did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // nginx as a reverse proxy in front of the same replica, when installed: the reference for
    // what one well-built proxy hop costs on this machine.
    let nginx = match which("nginx") {
        Some(binary) => Some(Nginx::start(&binary, replica)?),
        None => None,
    };
    let mut paths = vec![replica, platform.gateway, inbound];
    if let Some(nginx) = &nginx {
        let ready_by = Instant::now() + Duration::from_secs(10);
        while get(&http, nginx.listen, &host, "/").await != Ok(200) {
            if Instant::now() > ready_by {
                return Err("nginx did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        paths.push(nginx.listen);
    }

    // Warm every path (connection pools, the replica's threads), then interleave.
    for _ in 0..200 {
        for &addr in &paths {
            get(&http, addr, &host, "/").await?;
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    let interval = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let start = Instant::now();
    let mut sent = 0u32;
    for _ in 0..args.requests {
        for (path, addr) in paths.iter().enumerate() {
            if let Some(interval) = interval {
                // Open loop: each request leaves at its slot, however long the last one took.
                tokio::time::sleep_until((start + interval * sent).into()).await;
            }
            sent += 1;
            let t = Instant::now();
            get(&http, *addr, &host, "/").await?;
            samples[path].push(t.elapsed());
        }
    }
    if let Some(path) = &args.json {
        let names = ["direct", "gateway", "inbound sidecar", "nginx"];
        let result = GatewayLatency {
            service: args.service.clone(),
            rate: args.rate,
            up_to_first_200_ms: first_ok.as_secs_f64() * 1e3,
            paths: names
                .iter()
                .zip(&samples)
                .map(|(name, samples)| PathSamples {
                    name: (*name).into(),
                    samples_us: samples.iter().copied().map(us).collect(),
                })
                .collect(),
        };
        write_json(path, &result)?;
    }
    let mut percentiles = samples.iter_mut().map(|s| Percentiles::of(s));
    let (Some(d), Some(g), Some(i)) = (percentiles.next(), percentiles.next(), percentiles.next())
    else {
        unreachable!("three paths at least");
    };
    let n = percentiles.next();
    println!(
        "mecha up -> first 200 ({}): {:.1} ms",
        args.service,
        first_ok.as_secs_f64() * 1e3
    );
    match args.rate {
        Some(rate) => println!(
            "{} requests per path, keep-alive, interleaved, open loop at {rate} requests/s in all",
            args.requests
        ),
        None => println!(
            "{} sequential requests per path, keep-alive, interleaved",
            args.requests
        ),
    }
    println!(
        "{:<30} {:>10} {:>10} {:>10}",
        "latency (µs)", "p50", "p90", "p99"
    );
    let row = |name: &str, p: &Percentiles| {
        println!("{name:<30} {:>10.1} {:>10.1} {:>10.1}", p.p50, p.p90, p.p99)
    };
    row("direct to replica", &d);
    row("through the gateway", &g);
    row("through the inbound sidecar", &i);
    if let Some(n) = &n {
        row("through nginx (reference)", n);
    }
    let added = |p: &Percentiles| Percentiles {
        p50: p.p50 - d.p50,
        p90: p.p90 - d.p90,
        p99: p.p99 - d.p99,
    };
    row("added by the gateway", &added(&g));
    row("added by the inbound sidecar", &added(&i));
    if let Some(n) = &n {
        row("added by nginx (reference)", &added(n));
    }
    let (ag, ai) = (added(&g), added(&i));
    row(
        "gateway + inbound (sum)",
        &Percentiles {
            p50: ag.p50 + ai.p50,
            p90: ag.p90 + ai.p90,
            p99: ag.p99 + ai.p99,
        },
    );
    Ok(())
}

/// `activator-sidecar inbound` in front of one replica; killed on drop.
struct Sidecar {
    child: std::process::Child,
    serving: std::net::SocketAddr,
}

impl Sidecar {
    fn start(binary: &std::path::Path, user_port: u16) -> Result<Self, String> {
        let [serving, admin] = free_ports()?;
        let child = std::process::Command::new(binary)
            .arg("inbound")
            .env("QUEUE_SERVING_PORT", serving.to_string())
            .env("QUEUE_ADMIN_PORT", admin.to_string())
            .env("USER_PORT", user_port.to_string())
            .env("MECHA_LOG", "warn")
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Self {
            child,
            serving: std::net::SocketAddr::from(([127, 0, 0, 1], serving)),
        })
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first executable named `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// nginx as a keep-alive reverse proxy in front of one replica (one worker per CPU, like the
/// sidecar's threads); stopped on drop.
struct Nginx {
    child: std::process::Child,
    listen: std::net::SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start(binary: &std::path::Path, replica: std::net::SocketAddr) -> Result<Self, String> {
        let [port] = free_ports()?;
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let dir = std::env::temp_dir().join(format!("mecha-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
             upstream app {{ server {replica}; keepalive 64; }}\n\
             server {{ listen {listen}; location / {{ proxy_pass http://app; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Self { child, listen, dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; a bare kill would leave them running.
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
