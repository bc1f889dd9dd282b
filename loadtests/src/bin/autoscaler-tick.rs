//! Autoscaler decision cost: one tick (a KPA decision and the scaler step) over 10,000
//! revisions that each have a full stable window of load, timed over repeated passes.
//!
//! cargo run --release -p loadtests --bin autoscaler-tick [-- --revisions 10000 --passes 20 --json PATH]

use std::time::{Duration, Instant};

use autoscaler::kpa::{DeciderSpec, Kpa, Scaler};
use crds::autoscaling::ScalingAnnotations;
use crds::config::AutoscalerConfig;

fn main() {
    let mut revisions = 10_000usize;
    let mut passes = 20usize;
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let number = value.as_deref().and_then(|v| v.parse().ok());
        match (flag.as_str(), number, value) {
            ("--revisions", Some(v), _) => revisions = v,
            ("--passes", Some(v), _) => passes = v.max(1),
            ("--json", _, Some(path)) => json = Some(std::path::PathBuf::from(path)),
            _ => {
                eprintln!("usage: autoscaler-tick [--revisions N] [--passes N] [--json PATH]");
                std::process::exit(2);
            }
        }
    }
    let spec = DeciderSpec::resolve(
        &AutoscalerConfig::default(),
        &ScalingAnnotations::default(),
        0,
    );
    let mut deciders: Vec<(Kpa, Scaler)> = (0..revisions)
        .map(|i| {
            let mut kpa = Kpa::new(spec.clone());
            // A full stable window of varied load per revision.
            for s in 0..60u64 {
                kpa.record(
                    Duration::from_secs(s),
                    ((i as u64 * 7 + s * 13) % 500) as f64,
                );
            }
            (kpa, Scaler::new(spec.clone()))
        })
        .collect();
    let mut times = Vec::with_capacity(passes);
    let mut total = 0u64;
    for pass in 0..passes {
        let now = Duration::from_secs(60 + 2 * pass as u64);
        for (kpa, _) in &mut deciders {
            kpa.record(now, 100.0);
        }
        let started = Instant::now();
        for (kpa, scaler) in &mut deciders {
            let decision = kpa.scale(now, scaler.current().max(1), true);
            total += u64::from(scaler.apply(now, &decision));
        }
        times.push(started.elapsed());
    }
    if let Some(path) = &json {
        let result = loadtests::results::AutoscalerTick {
            revisions: revisions as u64,
            tick_ms: times.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
        };
        if let Err(error) = loadtests::results::write_json(path, &result) {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "one tick over {revisions} revisions ({passes} passes): median {:.2} ms, max {:.2} ms (checksum {total})",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
}
