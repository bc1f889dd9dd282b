//! Broker benchmarks, each next to a same-run baseline:
//! - ingest: events/s a concurrent client gets `202` for (durable), against the same client
//!   posting to a plain HTTP receiver (the loopback limit);
//! - end-to-end latency from POST to subscriber at a fixed rate, with 1 and with 10 triggers;
//! - memory of `mecha up` while a subscriber is down and 100,000 events wait in the log.
//!
//! `broker [--seconds 5] [--clients 32] [--rate 1000] [--backlog 100000]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use loadtests::{Percentiles, Platform, main_with};
use tokio::net::TcpListener;

type PostClient = Client<HttpConnector, Full<Bytes>>;

struct Args {
    seconds: u64,
    clients: usize,
    rate: u64,
    backlog: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 5,
        clients: 32,
        rate: 1000,
        backlog: 100_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--seconds" => args.seconds = number()?,
            "--clients" => args.clients = number()? as usize,
            "--rate" => args.rate = number()?,
            "--backlog" => args.backlog = number()?,
            other => return Err(format!("unknown flag {other}; see the file's header")),
        }
    }
    Ok(args)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A subscriber that answers 202 (or 503 while `down`) and records POST-to-arrival latency
/// from the `ce-sentns` extension.
#[derive(Clone, Default)]
struct Receiver {
    down: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

impl Receiver {
    async fn start(&self) -> Result<SocketAddr, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.handle(request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(addr)
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let sent = request
            .headers()
            .get("ce-sentns")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let _ = request.into_body().collect().await;
        let status = if self.down.load(Ordering::Relaxed) {
            503
        } else {
            202
        };
        if status == 202 {
            self.received.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = sent {
                let now = epoch().elapsed();
                self.latencies
                    .lock()
                    .expect("lock")
                    .push(now.saturating_sub(Duration::from_nanos(sent)));
            }
        }
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
        response
    }
}

fn post_client() -> PostClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

async fn post(client: &PostClient, uri: &str, id: u64) -> Result<u16, String> {
    let request = Request::post(uri)
        .header("host", "localhost")
        .header("ce-specversion", "1.0")
        .header("ce-id", id.to_string())
        .header("ce-source", "/bench")
        .header("ce-type", "bench.event")
        .header("ce-sentns", epoch().elapsed().as_nanos().to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// `clients` closed loops posting for `seconds`; returns events/s answered with `want`.
async fn closed_loop(uri: String, clients: usize, seconds: u64, want: u16) -> Result<f64, String> {
    let client = post_client();
    let ok = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, uri, ok, next) = (client.clone(), uri.clone(), ok.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if post(&client, &uri, id).await == Ok(want) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    Ok(ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
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
) -> Result<(), String> {
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
        tasks.push(tokio::spawn(async move { post(&client, &uri, id).await }));
    }
    let mut accepted = 0u64;
    for task in tasks {
        if task.await.map_err(|e| e.to_string())? == Ok(202) {
            accepted += 1;
        }
    }
    let expected = accepted * triggers as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut samples = receiver.latencies.lock().expect("lock").clone();
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
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    epoch();
    let mecha = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("mecha");
    let dir = std::env::temp_dir().join(format!("mecha-broker-bench-{}", std::process::id()));

    // Ingest: a broker with no trigger (retention keeps the log short) vs a plain receiver.
    let receiver = Receiver::default();
    let plain = receiver.start().await?;
    let baseline = closed_loop(format!("http://{plain}/"), args.clients, args.seconds, 202).await?;
    let file = write_yaml(&dir, 0, plain, "")?;
    let platform = Platform::start(&mecha, &[file])?;
    let ingest = closed_loop(
        format!("http://{}/default/default", platform.gateway),
        args.clients,
        args.seconds,
        202,
    )
    .await?;
    drop(platform);
    println!(
        "ingest, {} clients for {} s: broker {ingest:.0} events/s durable; plain receiver {baseline:.0} requests/s; ratio {:.2}",
        args.clients,
        args.seconds,
        ingest / baseline
    );

    latency(&mecha, &dir, 1, &args).await?;
    latency(&mecha, &dir, 10, &args).await?;

    // Backlog: the subscriber is down; events pile up in the log, not in memory.
    let receiver = Receiver::default();
    receiver.down.store(true, Ordering::Relaxed);
    let addr = receiver.start().await?;
    let file = write_yaml(
        &dir,
        1,
        addr,
        "  delivery:\n    retry: 100\n    backoffPolicy: linear\n    backoffDelay: PT10S\n",
    )?;
    let platform = Platform::start(&mecha, &[file])?;
    let idle = platform.rss_kib();
    let client = post_client();
    let uri = format!("http://{}/default/default", platform.gateway);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
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
    let log = std::fs::metadata(
        std::env::temp_dir().join(format!("mecha-bench-{}/events.redb", std::process::id())),
    )
    .map_or(0, |m| m.len());
    println!(
        "backlog, subscriber down, {} events waiting: mecha RSS {:.1} MiB (idle with the broker {:.1} MiB); log file {:.1} MiB",
        args.backlog,
        loaded as f64 / 1024.0,
        idle as f64 / 1024.0,
        log as f64 / 1_048_576.0
    );
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() {
    main_with(parse_args, run).await;
}
