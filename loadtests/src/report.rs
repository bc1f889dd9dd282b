//! The benchmark report: [`Results`] to a Markdown page (`README.md`) and SVG plots beside it.
//! Every plot carries the machine, the date and that the baseline ran in the same run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::results::{
    Broker, GatewayLatency, ProxyThroughput, Results, ScaleFromZero, median, quantile, sorted,
};

const WIDTH: u32 = 860;
const HEIGHT: u32 = 500;
/// Height of the caption line under each plot.
const FOOTER: u32 = 26;
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];
const BASELINE: RGBColor = RGBColor(110, 110, 110);

/// Writes `README.md` and its plots into `dir` (created if missing); returns the files written.
pub fn write(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let caption = results.machine.caption();
    let mut md = String::new();
    let mut files = Vec::new();
    header(&mut md, results);
    for failure in &results.failures {
        let _ = writeln!(md, "**Not measured in this run:** {failure}\n");
    }
    if let Some(proxy) = &results.proxy {
        proxy_section(&mut md, proxy, dir, &caption, &mut files)?;
    }
    if let Some(gateway) = &results.gateway {
        hops_section(&mut md, gateway, dir, &caption, &mut files)?;
    }
    if let Some(scale) = &results.scale {
        scale_section(&mut md, scale, dir, &caption, &mut files)?;
    }
    if let Some(broker) = &results.broker {
        broker_section(&mut md, broker, dir, &caption, &mut files)?;
    }
    if let Some(js) = &results.jetstream {
        jetstream_section(&mut md, js);
    }
    if let Some(tick) = &results.autoscaler_tick {
        let t = sorted(&tick.tick_ms);
        let _ = writeln!(
            md,
            "## Autoscaler tick\n\nOne tick (a KPA decision and the scaler step) over {} revisions, {} passes: \
             median {:.2} ms, max {:.2} ms. No baseline: this is the cost of the decision loop itself.\n",
            tick.revisions,
            t.len(),
            quantile(&t, 0.5),
            t.last().copied().unwrap_or(0.0)
        );
    }
    md.push_str(HOW_TO);
    let readme = dir.join("README.md");
    std::fs::write(&readme, md).map_err(|e| format!("cannot write {}: {e}", readme.display()))?;
    files.push(readme);
    Ok(files)
}

const HOW_TO: &str = "## Making your own\n\n\
```sh\n\
cargo build --release -p mecha -p activator-sidecar -p loadtests\n\
target/release/report --quick        # a few minutes; without --quick, longer and repeated rounds (about ten minutes)\n\
```\n\n\
It runs every benchmark of `loadtests/` with its baseline (nginx and wrk are installed from \
Debian when missing), keeps each one's JSON in `loadtests/report/results/`, and rewrites this \
page and its plots. `target/release/report --from loadtests/report/results` redraws them from \
kept JSON without running anything. Absolute numbers move from machine to machine and minute \
to minute on a shared VM; compare each figure with the baseline measured beside it.\n";

fn header(md: &mut String, results: &Results) {
    let m = &results.machine;
    let _ = writeln!(
        md,
        "# Mecha benchmark report\n\n\
         Run on {} UTC on {} cores ({}){}. The machine is shared with other work: the one-minute \
         load average was {:.2} when the run started and {:.2} when it ended, so absolute figures \
         carry that noise; each baseline was measured in the same run, interleaved or back to \
         back with what it is compared with, and the comparison is the figure to read.\n",
        m.date,
        m.cores,
        m.cpu_model,
        if results.quick {
            ", in `--quick` mode (short rounds, one round each)"
        } else {
            ""
        },
        m.load_before,
        m.load_after,
    );
}

fn proxy_section(
    md: &mut String,
    proxy: &ProxyThroughput,
    dir: &Path,
    caption: &str,
    files: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let mut counts: Vec<u64> = proxy.points.iter().map(|p| p.connections).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut proxies: Vec<&str> = Vec::new();
    for p in &proxy.points {
        if !proxies.contains(&p.proxy.as_str()) {
            proxies.push(&p.proxy);
        }
    }
    let at = |name: &str, c: u64, f: fn(&crate::results::ProxyPoint) -> f64| {
        median(
            proxy
                .points
                .iter()
                .filter(|p| p.proxy == name && p.connections == c)
                .map(f),
        )
    };
    let series = |f: fn(&crate::results::ProxyPoint) -> f64| -> Vec<Series> {
        proxies
            .iter()
            .map(|name| Series {
                name: (*name).to_string(),
                baseline: name.starts_with("nginx"),
                points: counts
                    .iter()
                    .map(|&c| ((c as f64).log2(), at(name, c, f)))
                    .collect(),
            })
            .collect()
    };
    let pow2 = |v: &f64| format!("{:.0}", 2f64.powf(*v));
    let throughput = dir.join("proxy-throughput.svg");
    line_chart(
        &throughput,
        "Proxy throughput (wrk, keep-alive)",
        "connections",
        "requests/s",
        &series(|p| p.requests_per_s),
        Some(&pow2),
        caption,
    )?;
    let cpu = dir.join("proxy-cpu.svg");
    line_chart(
        &cpu,
        "Proxy CPU per request (user + system)",
        "connections",
        "µs of CPU per request",
        &series(|p| p.cpu_us_per_request),
        Some(&pow2),
        caption,
    )?;
    files.extend([throughput, cpu]);
    let _ = writeln!(
        md,
        "## Proxy throughput and CPU per request\n\n\
         The inbound sidecar (`activator-sidecar inbound`), the same sidecar with its fast path \
         off (every request through hyper) and nginx as a reverse proxy (the baseline), each in \
         front of the same nginx returning a static 200, loaded by the same `wrk` for {} s per \
         point, {} round(s) alternating the proxies; medians over rounds. All processes share \
         the machine's cores, so CPU per request is the fairer comparison. Sidecar idle RSS \
         {:.1} MiB.\n\n\
         ![proxy throughput](proxy-throughput.svg)\n\n![proxy CPU per request](proxy-cpu.svg)\n",
        proxy.seconds,
        proxy.rounds,
        proxy.sidecar_idle_rss_kib as f64 / 1024.0
    );
    md.push_str("| connections | proxy | requests/s | CPU µs/request | p50 | p99 |\n|---|---|---|---|---|---|\n");
    for &c in &counts {
        for name in &proxies {
            let last = proxy
                .points
                .iter()
                .rfind(|p| p.proxy == *name && p.connections == c);
            let _ = writeln!(
                md,
                "| {c} | {name} | {:.0} | {:.1} | {} | {} |",
                at(name, c, |p| p.requests_per_s),
                at(name, c, |p| p.cpu_us_per_request),
                last.map_or("", |p| &p.latency_p50),
                last.map_or("", |p| &p.latency_p99),
            );
        }
        let (s, n) = (
            at("mecha-inbound-sidecar", c, |p| p.cpu_us_per_request),
            at("nginx-reverse-proxy", c, |p| p.cpu_us_per_request),
        );
        if s > 0.0 && n > 0.0 {
            let _ = writeln!(
                md,
                "| {c} | **sidecar / nginx** | {:.2}× | {:.2}× requests per CPU-second | | |",
                at("mecha-inbound-sidecar", c, |p| p.requests_per_s)
                    / at("nginx-reverse-proxy", c, |p| p.requests_per_s),
                n / s
            );
        }
    }
    md.push('\n');
    Ok(())
}

fn hops_section(
    md: &mut String,
    gateway: &GatewayLatency,
    dir: &Path,
    caption: &str,
    files: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let sorted_paths: Vec<(String, Vec<f64>)> = gateway
        .paths
        .iter()
        .map(|p| (p.name.clone(), sorted(&p.samples_us)))
        .collect();
    // The x axis ends at the slowest path's 95th percentile, where the paths differ; the tail
    // beyond is in the table.
    let x_max = sorted_paths
        .iter()
        .map(|(_, s)| quantile(s, 0.95))
        .fold(0.0, f64::max);
    let series: Vec<Series> = sorted_paths
        .iter()
        .map(|(name, s)| Series {
            name: name.clone(),
            baseline: name == "nginx",
            points: cdf(s, x_max),
        })
        .collect();
    let path = dir.join("hop-latency-cdf.svg");
    line_chart(
        &path,
        "Request latency per path (CDF, to the slowest path's p95)",
        "latency (µs)",
        "fraction of requests",
        &series,
        None,
        caption,
    )?;
    files.push(path);
    let _ = writeln!(
        md,
        "## Added latency per hop\n\n\
         Keep-alive GETs to the `{}` function, interleaved one by one over four paths: straight \
         to the replica, through the gateway, through the inbound sidecar, and through nginx as \
         a reverse proxy (the baseline hop), {}. `mecha up` answered its first 200 {:.0} ms \
         after it was spawned.\n\n![latency CDF per path](hop-latency-cdf.svg)\n",
        gateway.service,
        gateway.rate.map_or("back to back".to_string(), |r| format!(
            "open loop at {r:.0} requests/s in all"
        )),
        gateway.up_to_first_200_ms
    );
    md.push_str("| path | requests | p50 µs | p90 µs | p99 µs | added p50 | added p90 | added p99 |\n|---|---|---|---|---|---|---|---|\n");
    let direct = sorted_paths
        .first()
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    for (name, s) in &sorted_paths {
        let q = |v: &[f64], x| quantile(v, x);
        let added = |x| q(s, x) - q(&direct, x);
        let _ = writeln!(
            md,
            "| {name}{} | {} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:+.0} |",
            if name == "nginx" { " (baseline)" } else { "" },
            s.len(),
            q(s, 0.5),
            q(s, 0.9),
            q(s, 0.99),
            added(0.5),
            added(0.9),
            added(0.99)
        );
    }
    md.push('\n');
    Ok(())
}

fn scale_section(
    md: &mut String,
    scale: &ScaleFromZero,
    dir: &Path,
    caption: &str,
    files: &mut Vec<PathBuf>,
) -> Result<(), String> {
    if !scale.cold_starts.is_empty() {
        let path = dir.join("cold-start.svg");
        cold_start_chart(&path, scale, caption)?;
        files.push(path);
        let col = |f: &dyn Fn(&crate::results::ColdStart) -> f64| {
            let v = sorted(&scale.cold_starts.iter().map(f).collect::<Vec<_>>());
            format!(
                "{:.1} | {:.1} | {:.1}",
                quantile(&v, 0.5),
                quantile(&v, 0.9),
                v.last().copied().unwrap_or(0.0)
            )
        };
        let _ = writeln!(
            md,
            "## Cold start\n\n\
             {} zero-scaled copies of the Python hello function, each hit once through the \
             gateway; before each, the benchmark spawns the same `python3 app.py` itself and \
             times it until its port accepts (the process start, the baseline). The platform's \
             overhead is the difference, run by run: the poke, the spawn, readiness probing, \
             forwarding. A negative overhead means that run's bare start was the slower one: \
             two starts of the same process differ by that much on this machine.\n\n\
             ![cold start breakdown](cold-start.svg)\n\n\
             | ms | p50 | p90 | max |\n|---|---|---|---|\n\
             | process start (baseline) | {} |\n| first response through mecha | {} |\n\
             | platform overhead | {} |\n",
            scale.cold_starts.len(),
            col(&|c| c.process_start_ms),
            col(&|c| c.first_response_ms),
            col(&|c| c.platform_overhead_ms()),
        );
    }
    if let Some(b) = &scale.burst {
        let _ = writeln!(
            md,
            "Burst: {} concurrent requests against zero replicas: statuses {:?}, all answered \
             after {:.0} ms (p50 {:.0} ms, p99 {:.0} ms), peak {} desired / {} ready replicas.\n",
            b.requests,
            b.statuses,
            b.all_answered_ms,
            b.p50_ms,
            b.p99_ms,
            b.peak_desired,
            b.peak_ready
        );
    }
    if let Some(ramp) = &scale.ramp {
        let path = dir.join("ramp.svg");
        ramp_chart(&path, ramp, caption)?;
        files.push(path);
        let peak = |f: fn(&crate::results::RampSample) -> f64| {
            ramp.samples.iter().map(f).fold(0.0, f64::max)
        };
        let panic: Vec<f64> = ramp
            .samples
            .iter()
            .filter(|s| s.panic)
            .map(|s| s.t_s)
            .collect();
        let load_end = ramp
            .samples
            .iter()
            .rfind(|s| s.clients > 0)
            .map_or(0.0, |s| s.t_s);
        let zero_at = ramp
            .samples
            .iter()
            .rev()
            .take_while(|s| s.ready == 0)
            .last()
            .filter(|s| s.t_s > load_end)
            .map(|s| s.t_s);
        let _ = writeln!(
            md,
            "## Load ramp on one service\n\n\
             Closed-loop clients on one zero-scaled service (target {} requests in flight per \
             replica, stable window {} s, scale-to-zero grace {} s): 2, 8 and 16 clients, then a \
             jump to 64, then none; `mecha up`'s `/metrics` sampled every 100 ms \
             (`mecha_autoscaler_observed_concurrency`, `mecha_autoscaler_desired_replicas`, \
             `mecha_revision_ready_replicas`, `mecha_autoscaler_panic_mode`). Peak observed \
             concurrency {:.1}, peak desired {:.0}, peak ready {:.0}; panic mode {}; {}.\n\n\
             ![ramp](ramp.svg)\n",
            ramp.target,
            ramp.stable_window_s,
            ramp.scale_to_zero_grace_s,
            peak(|s| s.observed_concurrency),
            peak(|s| s.desired as f64),
            peak(|s| s.ready as f64),
            match (panic.first(), panic.last()) {
                (Some(a), Some(b)) => format!("from {a:.1} s to {b:.1} s"),
                _ => "never entered".into(),
            },
            zero_at.map_or(
                "not back at zero replicas when sampling stopped".into(),
                |t| {
                    format!(
                        "back at zero replicas {:.1} s after the load stopped",
                        t - load_end
                    )
                }
            ),
        );
    }
    Ok(())
}

fn broker_section(
    md: &mut String,
    broker: &Broker,
    dir: &Path,
    caption: &str,
    files: &mut Vec<PathBuf>,
) -> Result<(), String> {
    if !broker.ingest.is_empty() {
        let points = |f: fn(&crate::results::Ingest) -> f64| {
            broker
                .ingest
                .iter()
                .map(|i| ((i.clients as f64).log2(), f(i)))
                .collect()
        };
        let mut series = vec![
            Series {
                name: "broker (durable, 202 after commit)".into(),
                baseline: false,
                points: points(|i| i.broker_per_s),
            },
            Series {
                name: "plain HTTP receiver (baseline)".into(),
                baseline: true,
                points: points(|i| i.plain_per_s),
            },
        ];
        if broker.ingest.iter().all(|i| i.plain_apart_per_s.is_some()) {
            series.push(Series {
                name: "plain HTTP receiver, own process".into(),
                baseline: true,
                points: points(|i| i.plain_apart_per_s.unwrap_or_default()),
            });
        }
        let path = dir.join("broker-ingest.svg");
        line_chart(
            &path,
            "Broker ingest vs a plain HTTP receiver",
            "concurrent keep-alive clients",
            "events/s (requests/s)",
            &series,
            Some(&|v: &f64| format!("{:.0}", 2f64.powf(*v))),
            caption,
        )?;
        files.push(path);
        let rounds = broker
            .ingest
            .iter()
            .map(|i| i.rounds.len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "## Broker ingest\n\n\
             Closed-loop clients posting binary-mode events to `mecha up`'s broker (each `202` \
             after the event is committed to the log) for {} s per point, and the same clients \
             posting to a plain HTTP receiver in the benchmark process (the baseline: the \
             loopback limit) and to the same receiver in a process of its own (what a second \
             process costs on this machine with nothing stored), back to back; {} round(s) per \
             client count, medians over rounds (the ratio: the median of each round's, with the \
             lowest and highest). CPU per event: `mecha up` and the clients while the broker \
             was measured; the in-process receiver with its clients (one process).\n\n\
             ![broker ingest](broker-ingest.svg)\n\n\
             | clients | broker events/s | plain requests/s | ratio (range) | plain, own process | ratio | CPU µs/event: mecha + clients | plain + clients |\n\
             |---|---|---|---|---|---|---|---|",
            broker.seconds,
            rounds.max(1)
        );
        for i in &broker.ingest {
            let apart = i.plain_apart_per_s.map_or_else(
                || "| — | — |".to_string(),
                |apart| {
                    format!(
                        "| {apart:.0} | {:.2} |",
                        i.broker_per_s / apart.max(f64::MIN_POSITIVE)
                    )
                },
            );
            let (ratio, low, high) = i.ratio();
            let cpu = if i.rounds.is_empty() {
                " — | — |".to_string()
            } else {
                format!(
                    " {:.1} + {:.1} | {:.1} |",
                    median(i.rounds.iter().map(|r| r.broker_cpu_us[0])),
                    median(i.rounds.iter().map(|r| r.broker_cpu_us[1])),
                    median(i.rounds.iter().map(|r| r.plain_cpu_us)),
                )
            };
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {ratio:.2} ({low:.2}–{high:.2}) {apart}{cpu}",
                i.clients, i.broker_per_s, i.plain_per_s,
            );
        }
        if let Some(one) = broker
            .ingest
            .iter()
            .find(|i| i.clients == 1 && i.broker_per_s > 0.0)
        {
            let _ = writeln!(
                md,
                "\nWith one client every event waits for its own group commit: {:.2} ms per \
                 event, an upper bound on what the disk's fsync costs on this machine.",
                1e3 / one.broker_per_s
            );
        }
        md.push('\n');
    }
    if !broker.delivery.is_empty() {
        let sorted_runs: Vec<(u64, Vec<f64>)> = broker
            .delivery
            .iter()
            .map(|d| (d.triggers, sorted(&d.samples_us)))
            .collect();
        let x_max = sorted_runs
            .iter()
            .map(|(_, s)| quantile(s, 0.99))
            .fold(0.0, f64::max);
        let series: Vec<Series> = sorted_runs
            .iter()
            .map(|(t, s)| Series {
                name: format!("{t} trigger(s)"),
                baseline: false,
                points: cdf(s, x_max),
            })
            .collect();
        let path = dir.join("delivery-cdf.svg");
        line_chart(
            &path,
            "Broker POST → subscriber latency (CDF, to the slower p99)",
            "latency (µs)",
            "fraction of deliveries",
            &series,
            None,
            caption,
        )?;
        files.push(path);
        let _ = writeln!(
            md,
            "## Broker delivery latency\n\n\
             Events posted open loop at a fixed rate; each carries its send time, and the \
             subscriber (in the benchmark process) records the time to arrival, per trigger. \
             No baseline hop here: the figure is the broker's whole path, log included.\n\n\
             ![delivery latency CDF](delivery-cdf.svg)\n\n\
             | triggers | events/s | accepted | deliveries | p50 µs | p90 µs | p99 µs |\n|---|---|---|---|---|---|---|"
        );
        for (d, (_, s)) in broker.delivery.iter().zip(&sorted_runs) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                d.triggers,
                d.rate_per_s,
                d.accepted,
                s.len(),
                quantile(s, 0.5),
                quantile(s, 0.9),
                quantile(s, 0.99)
            );
        }
        md.push('\n');
    }
    if let Some(b) = &broker.backlog {
        let ratio = |kib: u64| kib as f64 / (b.idle_rss_kib.max(1)) as f64;
        // Results kept from before the settled reading have none.
        let (settled, ratios) = if b.settled_rss_kib > 0 {
            (
                format!(
                    " right after the last was accepted and {:.1} MiB {} s later",
                    b.settled_rss_kib as f64 / 1024.0,
                    crate::results::SETTLE.as_secs()
                ),
                format!(
                    "ratios {:.2} and {:.2}",
                    ratio(b.rss_kib),
                    ratio(b.settled_rss_kib)
                ),
            )
        } else {
            (String::new(), format!("ratio {:.2}", ratio(b.rss_kib)))
        };
        let _ = writeln!(
            md,
            "Backlog: with the subscriber answering 503 and {} events waiting in the log, \
             `mecha up` held {:.1} MiB resident{settled}, against {:.1} MiB idle with the \
             broker ({ratios}); the log file was {:.1} MiB.\n",
            b.events,
            b.rss_kib as f64 / 1024.0,
            b.idle_rss_kib as f64 / 1024.0,
            b.log_bytes as f64 / 1_048_576.0
        );
    }
    Ok(())
}

fn jetstream_section(md: &mut String, js: &crate::results::JetStream) {
    let _ = writeln!(
        md,
        "## Standalone broker on JetStream\n\n\
         `eventing-broker` on a one-node JetStream, {} closed-loop HTTP clients for {} s per \
         round, against {} tasks publishing the same stored bytes straight to a stream of the \
         same settings (the baseline), alternating.\n\n\
         | round | broker events/s | raw publish msg/s | ratio | CPU µs/event: broker, nats-server, clients | raw: nats-server, publishers |\n\
         |---|---|---|---|---|---|",
        js.clients, js.seconds, js.clients
    );
    for (i, r) in js.rounds.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {:.1}, {:.1}, {:.1} | {:.1}, {:.1} |",
            i + 1,
            r.broker_per_s,
            r.raw_per_s,
            r.broker_per_s / r.raw_per_s.max(f64::MIN_POSITIVE),
            r.broker_cpu_us[0],
            r.broker_cpu_us[1],
            r.broker_cpu_us[2],
            r.raw_cpu_us[1],
            r.raw_cpu_us[2]
        );
    }
    let s = sorted(&js.delivery.samples_us);
    let _ = writeln!(
        md,
        "\nPOST → subscriber at {} events/s, one trigger: {} accepted, {} delivered, p50 {:.0} µs, \
         p90 {:.0} µs, p99 {:.0} µs.\n",
        js.delivery.rate_per_s,
        js.delivery.accepted,
        s.len(),
        quantile(&s, 0.5),
        quantile(&s, 0.9),
        quantile(&s, 0.99)
    );
}

/// At most ~400 points of the empirical CDF of sorted `samples`, up to `x_max`.
fn cdf(samples: &[f64], x_max: f64) -> Vec<(f64, f64)> {
    let n = samples.len();
    let step = (n / 400).max(1);
    samples
        .iter()
        .enumerate()
        .filter(|(i, x)| (i % step == 0 || *i == n - 1) && **x <= x_max)
        .map(|(i, x)| (*x, (i + 1) as f64 / n as f64))
        .collect()
}

struct Series {
    name: String,
    /// Drawn dashed in grey: what the others are compared with.
    baseline: bool,
    points: Vec<(f64, f64)>,
}

type Fmt<'a> = &'a dyn Fn(&f64) -> String;

fn err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("cannot draw {}: {e}", path.display())
}

/// The drawing area above the caption line, with the caption drawn.
fn canvas<'a>(
    path: &'a Path,
    caption: &str,
) -> Result<DrawingArea<SVGBackend<'a>, plotters::coord::Shift>, String> {
    let e = err(path);
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (area, footer) = root.split_vertically(HEIGHT - FOOTER);
    footer
        .draw_text(
            caption,
            &TextStyle::from(("sans-serif", 13).into_font()).color(&BLACK),
            (10, 6),
        )
        .map_err(|x| e(&x))?;
    Ok(area)
}

fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    x_labels: Option<Fmt<'_>>,
    caption: &str,
) -> Result<(), String> {
    let e = err(path);
    let area = canvas(path, caption)?;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    let pad = ((x1 - x0) * 0.05).max(0.5);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..(y1 * 1.1).max(1e-9))
        .map_err(|x| e(&x))?;
    let default_fmt = |v: &f64| format!("{v:.0}");
    let fmt: Fmt<'_> = x_labels.unwrap_or(&default_fmt);
    let y_fmt = |v: &f64| {
        if y1 <= 1.0 {
            format!("{v:.2}")
        } else if y1 < 100.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(fmt)
        .y_label_formatter(&y_fmt);
    if x_labels.is_some() {
        // Powers of two on a log2 axis: one label per integer.
        mesh.x_labels(((x1 - x0).round() as usize + 1).max(2));
    }
    mesh.draw().map_err(|x| e(&x))?;
    for (i, s) in series.iter().enumerate() {
        let color = if s.baseline {
            BASELINE
        } else {
            COLORS[i % COLORS.len()]
        };
        let style = color.stroke_width(2);
        if s.baseline {
            chart
                .draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, style))
                .map_err(|x| e(&x))?
                .label(if s.name.contains("baseline") {
                    s.name.clone()
                } else {
                    format!("{} (baseline)", s.name)
                })
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|x| e(&x))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        if s.points.len() <= 12 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|x| e(&x))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    area.present().map_err(|x| e(&x))?;
    Ok(())
}

fn cold_start_chart(path: &Path, scale: &ScaleFromZero, caption: &str) -> Result<(), String> {
    let e = err(path);
    let area = canvas(path, caption)?;
    let runs = &scale.cold_starts;
    let y1 = runs
        .iter()
        .map(|c| c.first_response_ms.max(c.process_start_ms))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&area)
        .caption(
            "Cold start: process start and platform overhead, per run",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.6f64..(runs.len() as f64 - 0.4), 0f64..y1 * 1.15)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("run")
        .y_desc("ms to the first response")
        .x_labels(runs.len().max(2))
        .x_label_formatter(&|v| format!("{:.0}", v + 1.0))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|x| e(&x))?;
    let base = BASELINE.mix(0.8).filled();
    let over = COLORS[0].mix(0.85).filled();
    chart
        .draw_series(runs.iter().enumerate().map(|(i, c)| {
            let x = i as f64;
            Rectangle::new([(x - 0.35, 0.0), (x + 0.35, c.process_start_ms)], base)
        }))
        .map_err(|x| e(&x))?
        .label("process start: python3 app.py to listening (baseline)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], base));
    chart
        .draw_series(runs.iter().enumerate().map(|(i, c)| {
            let x = i as f64;
            // A negative overhead (noise) draws no bar.
            let top = c.process_start_ms + c.platform_overhead_ms().max(0.0);
            Rectangle::new([(x - 0.35, c.process_start_ms), (x + 0.35, top)], over)
        }))
        .map_err(|x| e(&x))?
        .label("platform overhead (first response − process start)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], over));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    area.present().map_err(|x| e(&x))?;
    Ok(())
}

fn ramp_chart(path: &Path, ramp: &crate::results::Ramp, caption: &str) -> Result<(), String> {
    let e = err(path);
    let area = canvas(path, caption)?;
    let s = &ramp.samples;
    let t1 = s.last().map_or(1.0, |x| x.t_s).max(1.0);
    let c1 = s
        .iter()
        .map(|x| x.observed_concurrency.max(x.clients as f64))
        .fold(1.0, f64::max)
        * 1.1;
    let r1 = s
        .iter()
        .map(|x| x.desired.max(x.ready) as f64)
        .fold(1.0, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(&area)
        .caption(
            "Load ramp: concurrency and replicas over time",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..t1, 0f64..c1)
        .map_err(|x| e(&x))?
        .set_secondary_coord(0f64..t1, 0f64..r1);
    chart
        .configure_mesh()
        .x_desc("seconds since the ramp started")
        .y_desc("requests in flight")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .configure_secondary_axes()
        .y_desc("replicas")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|x| e(&x))?;
    // Panic mode shaded, sample to sample.
    let shade = RGBColor(255, 160, 160).mix(0.35).filled();
    chart
        .draw_series(
            s.windows(2)
                .filter(|w| w[0].panic)
                .map(|w| Rectangle::new([(w[0].t_s, 0.0), (w[1].t_s, c1)], shade)),
        )
        .map_err(|x| e(&x))?
        .label("panic mode")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], shade));
    let clients = BASELINE.stroke_width(2);
    chart
        .draw_series(DashedLineSeries::new(
            s.iter().map(|x| (x.t_s, x.clients as f64)),
            6,
            4,
            clients,
        ))
        .map_err(|x| e(&x))?
        .label("clients (offered concurrency)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], clients));
    let observed = COLORS[0].stroke_width(2);
    chart
        .draw_series(LineSeries::new(
            s.iter().map(|x| (x.t_s, x.observed_concurrency)),
            observed,
        ))
        .map_err(|x| e(&x))?
        .label("observed concurrency (left)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], observed));
    let desired = COLORS[3].stroke_width(2);
    chart
        .draw_secondary_series(LineSeries::new(
            s.iter().map(|x| (x.t_s, x.desired as f64)),
            desired,
        ))
        .map_err(|x| e(&x))?
        .label("desired replicas (right)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], desired));
    let ready = COLORS[2].stroke_width(3);
    chart
        .draw_secondary_series(LineSeries::new(
            s.iter().map(|x| (x.t_s, x.ready as f64)),
            ready,
        ))
        .map_err(|x| e(&x))?
        .label("ready replicas (right)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], ready));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    area.present().map_err(|x| e(&x))?;
    Ok(())
}
