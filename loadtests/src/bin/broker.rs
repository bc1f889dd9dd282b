//! Broker benchmarks, each next to a same-run baseline:
//! - ingest: events/s a concurrent client gets `202` for (durable), against the same client
//!   posting to a plain HTTP receiver in the benchmark's own process (the loopback limit, the
//!   target's baseline) and to the same receiver in a process of its own (what a second
//!   process costs with nothing stored);
//! - end-to-end latency from POST to subscriber at a fixed rate, with 1 and with 10 triggers;
//! - memory of `mecha up` while a subscriber is down and 100,000 events wait in the log.
//!
//! `broker [--seconds 5] [--clients 32] [--rounds 3] [--rate 1000] [--backlog 100000] [--json PATH]`
//! (`broker --plain-receiver` is that receiver's process: it prints its address and serves
//! until its standard input closes.)
//!
//! `--clients` takes a comma-separated list (`1,8,32,128`) for ingest at each count; the
//! backlog uses the largest. Each count is measured `--rounds` times, the three back to back
//! in every round (a machine's speed drifts within minutes: a ratio is only fair between
//! measurements a few seconds apart), and reported as medians, with each process's CPU per
//! event while the broker was measured. `--backlog 0` skips the backlog. `--json PATH` also writes the
//! results and every latency sample there (see `loadtests::results`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loadtests::events::{Receiver, closed_loop, epoch, post, post_client};
use loadtests::results::{
    Backlog, Broker as BrokerResult, Delivery, Ingest, IngestRound, median, us, write_json,
};
use loadtests::{CpuSnapshot, Percentiles, Platform, main_with};

struct Args {
    seconds: u64,
    clients: Vec<usize>,
    rounds: usize,
    json: Option<PathBuf>,
    rate: u64,
    backlog: u64,
}

/// The plain receiver in a process of its own: started as `broker --plain-receiver`, says
/// where it listens on its first line, and ends with the benchmark (its standard input closes).
struct OwnProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl OwnProcess {
    fn start() -> Result<Self, String> {
        use std::io::BufRead;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = std::process::Command::new(exe)
            .arg("--plain-receiver")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the plain receiver's process: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .parse()
            .map_err(|_| format!("the plain receiver said {line:?}, not its address"))?;
        Ok(Self { child, addr })
    }
}

impl Drop for OwnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--plain-receiver`: serve as the plain receiver until standard input closes.
async fn plain_receiver() -> Result<(), String> {
    let addr = Receiver::default().start().await?;
    println!("{addr}");
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .map_err(|e| e.to_string())
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 5,
        clients: vec![32],
        rounds: 3,
        rate: 1000,
        backlog: 100_000,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err("usage: broker [--seconds 5] [--clients 32] [--rounds 3] [--rate 1000] [--backlog 100000] [--json PATH]; see loadtests/README.md".into());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        let within = |low: u64, high: u64| {
            number().and_then(|n| {
                if (low..=high).contains(&n) {
                    Ok(n)
                } else {
                    Err(format!("{flag}: {n} is not between {low} and {high}"))
                }
            })
        };
        match flag.as_str() {
            "--seconds" => args.seconds = within(1, 3600)?,
            "--clients" => {
                args.clients = value
                    .split(',')
                    .map(|v| v.trim().parse::<usize>().ok().filter(|&n| n > 0))
                    .collect::<Option<_>>()
                    .ok_or_else(|| format!("--clients: {value:?} is not a list of counts"))?
            }
            "--json" => args.json = Some(value.clone().into()),
            "--rate" => args.rate = number()?,
            "--rounds" => args.rounds = within(1, 100)? as usize,
            "--backlog" => args.backlog = number()?,
            other => return Err(format!("unknown flag {other}; see the file's header")),
        }
    }
    Ok(args)
}

fn write_yaml(
    dir: &std::path::Path,
    triggers: usize,
    subscriber: SocketAddr,
    delivery: &str,
) -> Result<PathBuf, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut yaml = String::from(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n",
    );
    for i in 0..triggers {
        yaml.push_str(&format!(
            "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: t{i}\nspec:\n  broker: default\n  subscriber:\n    uri: http://{subscriber}/t{i}\n{delivery}"
        ));
    }
    let file = dir.join("broker.yaml");
    std::fs::write(&file, yaml).map_err(|e| e.to_string())?;
    Ok(file)
}

async fn latency(
    mecha: &std::path::Path,
    dir: &std::path::Path,
    triggers: usize,
    args: &Args,
) -> Result<Delivery, String> {
    let receiver = Receiver::default();
    let addr = receiver.start().await?;
    let file = write_yaml(dir, triggers, addr, "")?;
    let platform = Platform::start(mecha, &[file])?;
    let uri = format!("http://{}/default/default", platform.gateway);
    let client = post_client();
    let total = args.rate * args.seconds;
    let interval = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for id in 0..total {
        ticker.tick().await;
        let (client, uri) = (client.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            (post(&client, &uri, id).await, started.elapsed())
        }));
    }
    let mut accepted = 0u64;
    let mut answered = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (status, took) = task.await.map_err(|e| e.to_string())?;
        if status == Ok(202) {
            accepted += 1;
        }
        answered.push(took);
    }
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let k = (answered.len() / 8).max(1);
        let chunks: Vec<String> = answered
            .chunks(k)
            .map(|c| {
                let mut c = c.to_vec();
                c.sort();
                format!("{:.2}", c[c.len() / 2].as_secs_f64() * 1e3)
            })
            .collect();
        eprintln!(
            "POST → 202 p50 by eighths of the run (ms): {}",
            chunks.join(" ")
        );
    }
    let expected = accepted * triggers as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut samples = receiver.latencies.lock().expect("lock").clone();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let k = (samples.len() / 8).max(1);
        let chunks: Vec<String> = samples
            .chunks(k)
            .map(|c| {
                let mut c = c.to_vec();
                c.sort();
                format!("{:.2}", c[c.len() / 2].as_secs_f64() * 1e3)
            })
            .collect();
        eprintln!(
            "POST → subscriber p50 by eighths of the run (ms): {}",
            chunks.join(" ")
        );
    }
    let p = Percentiles::of(&mut samples);
    println!(
        "latency, {triggers} trigger(s), {} events/s for {} s: {accepted} accepted, {} deliveries; POST → subscriber p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs",
        args.rate,
        args.seconds,
        samples.len(),
        p.p50,
        p.p90,
        p.p99
    );
    Ok(Delivery {
        triggers: triggers as u64,
        rate_per_s: args.rate,
        accepted,
        samples_us: samples.iter().copied().map(us).collect(),
    })
}

async fn run(args: Args) -> Result<(), String> {
    epoch();
    let mecha = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("mecha");
    let dir = std::env::temp_dir().join(format!("mecha-broker-bench-{}", std::process::id()));

    // Ingest: a broker with no trigger (retention keeps the log short) vs a plain receiver,
    // at each client count, the two back to back.
    let receiver = Receiver::default();
    let plain = receiver.start().await?;
    let file = write_yaml(&dir, 0, plain, "")?;
    let platform = Platform::start(&mecha, &[file])?;
    let own = OwnProcess::start()?;
    let mut result = BrokerResult {
        seconds: args.seconds,
        ..BrokerResult::default()
    };
    let (mecha_pid, bench_pid) = (platform.pid(), std::process::id());
    for &clients in &args.clients {
        let mut ingest = Ingest {
            clients: clients as u64,
            ..Ingest::default()
        };
        for round in 1..=args.rounds {
            let seconds = args.seconds as f64;
            let before = CpuSnapshot::of([bench_pid]);
            let plain_per_s =
                closed_loop(format!("http://{plain}/"), clients, args.seconds, 202).await?;
            let [plain_cpu_us] = CpuSnapshot::of([bench_pid]).since(&before, plain_per_s * seconds);
            let apart =
                closed_loop(format!("http://{}/", own.addr), clients, args.seconds, 202).await?;
            let before = CpuSnapshot::of([mecha_pid, bench_pid]);
            let broker_per_s = closed_loop(
                format!("http://{}/default/default", platform.gateway),
                clients,
                args.seconds,
                202,
            )
            .await?;
            let broker_cpu_us =
                CpuSnapshot::of([mecha_pid, bench_pid]).since(&before, broker_per_s * seconds);
            println!(
                "ingest, {clients} clients for {} s, round {round}: broker {broker_per_s:.0} events/s durable; plain receiver {plain_per_s:.0} requests/s in process (ratio {:.2}), {apart:.0} in its own process (ratio {:.2}); CPU per event: mecha {:.1} µs, clients {:.1} µs (plain receiver and clients: {plain_cpu_us:.1} µs)",
                args.seconds,
                broker_per_s / plain_per_s,
                broker_per_s / apart,
                broker_cpu_us[0],
                broker_cpu_us[1],
            );
            ingest.rounds.push(IngestRound {
                broker_per_s,
                plain_per_s,
                plain_apart_per_s: apart,
                broker_cpu_us,
                plain_cpu_us,
            });
        }
        let rounds = &ingest.rounds;
        ingest.broker_per_s = median(rounds.iter().map(|r| r.broker_per_s));
        ingest.plain_per_s = median(rounds.iter().map(|r| r.plain_per_s));
        ingest.plain_apart_per_s = Some(median(rounds.iter().map(|r| r.plain_apart_per_s)));
        let (ratio, low, high) = ingest.ratio();
        println!(
            "ingest, {clients} clients: median ratio broker / plain receiver {ratio:.2} over {} rounds ({low:.2}–{high:.2})",
            rounds.len()
        );
        result.ingest.push(ingest);
    }
    drop(own);
    drop(platform);

    result.delivery.push(latency(&mecha, &dir, 1, &args).await?);
    result
        .delivery
        .push(latency(&mecha, &dir, 10, &args).await?);
    if args.backlog > 0 {
        result.backlog = Some(backlog(&mecha, &dir, &args).await?);
    }
    if let Some(path) = &args.json {
        write_json(path, &result)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn backlog(
    mecha: &std::path::Path,
    dir: &std::path::Path,
    args: &Args,
) -> Result<Backlog, String> {
    // Backlog: the subscriber is down; events pile up in the log, not in memory.
    let receiver = Receiver::default();
    receiver.down.store(true, Ordering::Relaxed);
    let addr = receiver.start().await?;
    let file = write_yaml(
        dir,
        1,
        addr,
        "  delivery:\n    retry: 100\n    backoffPolicy: linear\n    backoffDelay: PT10S\n",
    )?;
    let platform = Platform::start(mecha, &[file])?;
    let idle = platform.rss_kib();
    let client = post_client();
    let uri = format!("http://{}/default/default", platform.gateway);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.clients.iter().copied().max().unwrap_or(32) {
        let (client, uri, next) = (client.clone(), uri.clone(), next.clone());
        let backlog = args.backlog;
        tasks.push(tokio::spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= backlog {
                    return;
                }
                let _ = post(&client, &uri, id).await;
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    // Every post was answered 202, so every event is in the log now.
    let loaded = platform.rss_kib();
    // What stays while the events wait: the load's connections closed, the process quiet.
    drop(client);
    tokio::time::sleep(loadtests::results::SETTLE).await;
    let settled = platform.rss_kib();
    let log = std::fs::metadata(
        std::env::temp_dir().join(format!("mecha-bench-{}/events.redb", std::process::id())),
    )
    .map_or(0, |m| m.len());
    println!(
        "backlog, subscriber down, {} events waiting: mecha RSS {:.1} MiB right after the load, {:.1} MiB {} s later (idle with the broker {:.1} MiB); log file {:.1} MiB",
        args.backlog,
        loaded as f64 / 1024.0,
        settled as f64 / 1024.0,
        loadtests::results::SETTLE.as_secs(),
        idle as f64 / 1024.0,
        log as f64 / 1_048_576.0
    );
    drop(platform);
    Ok(Backlog {
        events: args.backlog,
        rss_kib: loaded,
        settled_rss_kib: settled,
        idle_rss_kib: idle,
        log_bytes: log,
    })
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("--plain-receiver") {
        main_with(|| Ok(()), |()| plain_receiver()).await;
        return;
    }
    main_with(parse_args, run).await;
}
