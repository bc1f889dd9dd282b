//! Gateway benchmark: the time from `mecha up` to the first 200 of the Python hello example,
//! and the latency the gateway adds over calling the same replica directly, measured in the
//! same run, interleaved request by request so both see the same machine noise.
//!
//! cargo build --release -p mecha -p loadtests
//! target/release/gateway-latency [--requests 5000] [--mecha target/release/mecha] [--example examples/hello-python --service hello]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use loadtests::{Percentiles, Platform, client, get};

struct Args {
    mecha: PathBuf,
    example: PathBuf,
    service: String,
    requests: usize,
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        mecha: root.join("target/release/mecha"),
        example: root.join("examples/hello-python"),
        service: "hello".into(),
        requests: 5000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mecha" => args.mecha = value.into(),
            "--example" => args.example = value.into(),
            "--service" => args.service = value,
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

    // Warm both paths (connection pools, the replica's threads), then interleave.
    for _ in 0..200 {
        get(&http, replica, &host, "/").await?;
        get(&http, platform.gateway, &host, "/").await?;
    }
    let mut direct = Vec::with_capacity(args.requests);
    let mut gateway = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let t = Instant::now();
        get(&http, replica, &host, "/").await?;
        direct.push(t.elapsed());
        let t = Instant::now();
        get(&http, platform.gateway, &host, "/").await?;
        gateway.push(t.elapsed());
    }
    let d = Percentiles::of(&mut direct);
    let g = Percentiles::of(&mut gateway);
    println!(
        "mecha up -> first 200 ({}): {:.1} ms",
        args.service,
        first_ok.as_secs_f64() * 1e3
    );
    println!(
        "{} sequential requests per path, keep-alive, interleaved",
        args.requests
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "latency (µs)", "p50", "p90", "p99"
    );
    println!(
        "{:<22} {:>10.1} {:>10.1} {:>10.1}",
        "direct to replica", d.p50, d.p90, d.p99
    );
    println!(
        "{:<22} {:>10.1} {:>10.1} {:>10.1}",
        "through the gateway", g.p50, g.p90, g.p99
    );
    println!(
        "{:<22} {:>10.1} {:>10.1} {:>10.1}",
        "added by the gateway",
        g.p50 - d.p50,
        g.p90 - d.p90,
        g.p99 - d.p99
    );
    println!("ratio gateway/direct at p50: {:.2}", g.p50 / d.p50);
    Ok(())
}
