//! The standalone broker (`eventing-broker`) on NATS JetStream against raw JetStream publishing
//! from the same number of clients, in the same run:
//! - **ingest**: `--clients` closed loops posting events to the broker (each answered `202`
//!   only once the stream acknowledged it), against `--clients` tasks publishing the same bytes
//!   (the event as the broker stores it, with a `Nats-Msg-Id`) to a stream of the same settings
//!   over one async-nats connection, awaiting each acknowledgement — the broker's own overhead
//!   on top of JetStream is the difference. Rounds alternate between the two; the ratio is the
//!   median of the rounds' ratios.
//! - **latency**: POST → subscriber at `--rate` events/s (open loop), one trigger.
//!
//! `broker-jetstream [--seconds 5] [--clients 32] [--rounds 3] [--rate 1000] [--json PATH]`
//!
//! Starts its own `nats-server` (JetStream, one node, a temporary store), `mecha up` as the
//! control plane (Brokers and Triggers), and one `eventing-broker` reading them from it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use loadtests::events::{Receiver, closed_loop, epoch, fresh_ids, post, post_client};
use loadtests::results::{Delivery, JetStream, JetStreamRound, us, write_json};
use loadtests::{Percentiles, Platform, main_with};
use test_support::nats::NatsServer;

struct Args {
    seconds: u64,
    clients: usize,
    rounds: usize,
    rate: u64,
    json: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 5,
        clients: 32,
        rounds: 3,
        rate: 1000,
        json: None,
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
            "--rounds" => args.rounds = number()?.max(1) as usize,
            "--rate" => args.rate = number()?,
            "--json" => args.json = Some(value.clone().into()),
            other => return Err(format!("unknown flag {other}; see the file's header")),
        }
    }
    Ok(args)
}

/// The processes whose CPU time each round accounts.
struct Pids {
    broker: u32,
    nats: u32,
    bench: u32,
}

impl Pids {
    /// CPU time of (broker, nats-server, this benchmark) now.
    fn cpu(&self) -> loadtests::CpuSnapshot<3> {
        loadtests::CpuSnapshot::of([self.broker, self.nats, self.bench])
    }
}

/// An `eventing-broker` process, killed on drop.
struct Broker {
    child: Child,
    ingress: std::net::SocketAddr,
}

impl Broker {
    async fn start(binary: &Path, nats: &str, platform: &Platform) -> Result<Self, String> {
        let [ingress, admin] = loadtests::free_ports::<2>()?;
        let child = Command::new(binary)
            .env("BROKER_PORT", ingress.to_string())
            .env("BROKER_ADMIN_PORT", admin.to_string())
            .env("BROKER_EVENT_LOG", nats)
            .env("AUTOSCALER_ADDR", platform.admin.to_string())
            .env("AUTOSCALER_TOKEN", &platform.admin_token)
            .env("MECHA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let broker = Self {
            child,
            ingress: std::net::SocketAddr::from(([127, 0, 0, 1], ingress)),
        };
        let client = loadtests::client();
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
        let deadline = Instant::now() + Duration::from_secs(30);
        while loadtests::get(&client, admin, "localhost", "/ready").await != Ok(200) {
            if Instant::now() > deadline {
                return Err("eventing-broker was not ready within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The event the ingress stores for the benchmark's posts (structured JSON with its TTL), so
/// the raw publisher sends as many bytes.
fn stored_event(id: u64) -> Bytes {
    let json = serde_json::json!({
        "specversion": "1.0",
        "id": id.to_string(),
        "source": "/bench",
        "type": "bench.event",
        "datacontenttype": "application/json",
        "sentns": epoch().elapsed().as_nanos().to_string(),
        "knativebrokerttl": 254,
        "data": {"n": 1},
    });
    Bytes::from(serde_json::to_vec(&json).unwrap_or_default())
}

/// `clients` tasks publishing to `subject` for `seconds`, each publish's acknowledgement
/// awaited before the next; acknowledged publishes per second.
async fn raw_publish(
    context: &jetstream::Context,
    subject: &str,
    clients: usize,
    seconds: u64,
    next: &Arc<AtomicU64>,
) -> Result<f64, String> {
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (context, subject, ok, next) = (
            context.clone(),
            subject.to_string(),
            ok.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let id = next.fetch_add(1, Ordering::Relaxed);
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("%2Fbench raw-{id}").as_str());
                let Ok(ack) = context
                    .publish_with_headers(subject.clone(), headers, stored_event(id))
                    .await
                else {
                    continue;
                };
                if ack.await.is_ok() {
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
    dir: &Path,
    subscriber: Option<std::net::SocketAddr>,
) -> Result<std::path::PathBuf, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut yaml = String::from(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n",
    );
    if let Some(subscriber) = subscriber {
        yaml.push_str(&format!(
            "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: t0\nspec:\n  broker: default\n  subscriber:\n    uri: http://{subscriber}/t0\n"
        ));
    }
    let file = dir.join("broker.yaml");
    std::fs::write(&file, yaml).map_err(|e| e.to_string())?;
    Ok(file)
}

async fn run(args: Args) -> Result<(), String> {
    epoch();
    let here = std::env::current_exe().map_err(|e| e.to_string())?;
    let (mecha, broker_bin) = (
        here.with_file_name("mecha"),
        here.with_file_name("eventing-broker"),
    );
    let dir = std::env::temp_dir().join(format!("mecha-js-bench-{}", std::process::id()));
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .map_err(|e| format!("nats-server: {e}"))?;

    // Ingest: a broker without triggers, and a raw stream of the same settings (file
    // storage, one replica, the broker's duplicate window).
    let file = write_yaml(&dir, None)?;
    let platform = Platform::start(&mecha, &[file])?;
    let broker = Broker::start(&broker_bin, &nats.url(), &platform).await?;
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| format!("connecting to NATS: {e}"))?;
    let context = jetstream::new(client);
    context
        .get_or_create_stream(stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["BENCH_RAW".into()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating the raw stream: {e}"))?;
    let uri = format!("http://{}/default/default", broker.ingress);
    // Warm both paths (connections, the broker's stream) before measuring.
    let next = Arc::new(AtomicU64::new(0));
    raw_publish(&context, "BENCH_RAW", args.clients, 1, &next).await?;
    closed_loop(uri.clone(), args.clients, 1, 202).await?;
    let mut ratios = Vec::new();
    let mut result = JetStream {
        seconds: args.seconds,
        clients: args.clients as u64,
        ..JetStream::default()
    };
    let pids = Pids {
        broker: broker.child.id(),
        nats: nats.pid().unwrap_or(0),
        bench: std::process::id(),
    };
    for round in 1..=args.rounds {
        let before = pids.cpu();
        let raw = raw_publish(&context, "BENCH_RAW", args.clients, args.seconds, &next).await?;
        let raw_cpu = pids.cpu().since(&before, raw * args.seconds as f64);
        let before = pids.cpu();
        let through = closed_loop(uri.clone(), args.clients, args.seconds, 202).await?;
        let broker_cpu = pids.cpu().since(&before, through * args.seconds as f64);
        println!(
            "round {round}, {} clients for {} s each: broker on JetStream {through:.0} events/s (202 after the publish ack); raw JetStream publish {raw:.0} msg/s (ack awaited); ratio {:.2}",
            args.clients,
            args.seconds,
            through / raw
        );
        println!(
            "  CPU per event: through the broker: broker {:.1} µs, nats-server {:.1} µs, HTTP clients {:.1} µs; raw: nats-server {:.1} µs, publishers {:.1} µs",
            broker_cpu[0], broker_cpu[1], broker_cpu[2], raw_cpu[1], raw_cpu[2]
        );
        ratios.push(through / raw);
        result.rounds.push(JetStreamRound {
            broker_per_s: through,
            raw_per_s: raw,
            broker_cpu_us: broker_cpu,
            raw_cpu_us: raw_cpu,
        });
    }
    println!(
        "ingest: median ratio broker / raw publish {:.2} over {} rounds (target ≥ 0.70)",
        loadtests::results::median(ratios.iter().copied()),
        ratios.len()
    );
    drop(broker);
    drop(platform);

    // Latency with one trigger, open loop.
    let receiver = Receiver::default();
    let subscriber = receiver.start().await?;
    let file = write_yaml(&dir, Some(subscriber))?;
    let platform = Platform::start(&mecha, &[file])?;
    let broker = Broker::start(&broker_bin, &nats.url(), &platform).await?;
    let uri = format!("http://{}/default/default", broker.ingress);
    let post_client = post_client();
    let total = args.rate * args.seconds;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let base = fresh_ids(total);
    for n in 0..total {
        ticker.tick().await;
        let (client, uri) = (post_client.clone(), uri.clone());
        tasks.push(tokio::spawn(
            async move { post(&client, &uri, base + n).await },
        ));
    }
    let mut accepted = 0u64;
    for task in tasks {
        if task.await.map_err(|e| e.to_string())? == Ok(202) {
            accepted += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.received.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut samples = receiver
        .latencies
        .lock()
        .map_err(|e| e.to_string())?
        .clone();
    let p = Percentiles::of(&mut samples);
    println!(
        "latency on JetStream, 1 trigger, {} events/s for {} s: {accepted} accepted, {} delivered; POST → subscriber p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs",
        args.rate,
        args.seconds,
        samples.len(),
        p.p50,
        p.p90,
        p.p99
    );
    result.delivery = Delivery {
        triggers: 1,
        rate_per_s: args.rate,
        accepted,
        samples_us: samples.iter().copied().map(us).collect(),
    };
    if let Some(path) = &args.json {
        write_json(path, &result)?;
    }
    drop(broker);
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() {
    main_with(parse_args, run).await;
}
