//! What each benchmark writes with `--json PATH`, and what the report reads back: the samples
//! and the summaries the text output prints, with the same-run baseline beside each.
//! Times are in the unit their field's name ends with (`_us`, `_ms`, `_s`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every benchmark's result of one report run, and the machine it ran on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    /// Whether the report ran in `--quick` mode (fewer, shorter rounds).
    pub quick: bool,
    pub gateway: Option<GatewayLatency>,
    pub proxy: Option<ProxyThroughput>,
    pub scale: Option<ScaleFromZero>,
    pub broker: Option<Broker>,
    pub autoscaler_tick: Option<AutoscalerTick>,
    #[serde(default)]
    pub jetstream: Option<JetStream>,
    /// Benchmarks that failed in this run, each with why.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// The machine a run took place on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    /// `/proc/loadavg`'s one-minute load when the run started and when it ended: the machine
    /// is shared, and this says how busy it was with other work.
    pub load_before: f64,
    pub load_after: f64,
}

impl Machine {
    /// This machine, now.
    pub fn here() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            date: utc_now(),
            load_before: load_average(),
            load_after: 0.0,
        }
    }

    /// The line every plot carries.
    pub fn caption(&self) -> String {
        format!(
            "{} cores, {}, {} UTC; baseline measured in the same run",
            self.cores, self.cpu_model, self.date
        )
    }
}

/// `/proc/loadavg`'s one-minute figure (0 where it cannot be read).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The current time as `YYYY-MM-DD HH:MM` in UTC.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// `gateway-latency`: every request's latency on each path, interleaved in one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GatewayLatency {
    pub service: String,
    /// Requests per second over all paths (open loop), or none for back-to-back requests.
    pub rate: Option<f64>,
    /// From spawning `mecha up` to the first 200 through the gateway.
    pub up_to_first_200_ms: f64,
    /// `direct` first (the replica itself); then `gateway`, `inbound sidecar` and, when
    /// installed, `nginx` (the baseline hop).
    pub paths: Vec<PathSamples>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathSamples {
    pub name: String,
    pub samples_us: Vec<f64>,
}

/// `proxy-throughput.sh`: each proxy in front of the same upstream, loaded by the same `wrk`
/// at each connection count, in alternating rounds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyThroughput {
    pub seconds: u64,
    pub rounds: u64,
    pub sidecar_idle_rss_kib: u64,
    pub points: Vec<ProxyPoint>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyPoint {
    /// `nginx-reverse-proxy` (the baseline), `mecha-inbound-sidecar`, `mecha-inbound-hyper-only`.
    pub proxy: String,
    pub connections: u64,
    pub round: u64,
    pub requests_per_s: f64,
    /// The proxy's CPU (user + system, its children included) over the requests it served.
    pub cpu_us_per_request: f64,
    /// As `wrk` prints them (`812.00us`, `1.20ms`).
    pub latency_p50: String,
    pub latency_p99: String,
}

/// `scale-from-zero`: cold starts next to the bare process's start, a burst, and a load ramp.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleFromZero {
    pub cold_starts: Vec<ColdStart>,
    pub burst: Option<Burst>,
    pub ramp: Option<Ramp>,
}

/// One cold start, interleaved with a bare start of the same process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdStart {
    /// `python3 app.py` spawned by the benchmark until its port accepts (the baseline).
    pub process_start_ms: f64,
    /// A request to the zero-scaled service through `mecha up` until its response.
    pub first_response_ms: f64,
}

impl ColdStart {
    /// What the platform adds: the poke, the spawn, readiness probing, forwarding. Negative
    /// when the bare start happened to be slower than the start through the platform (two
    /// starts of the same process vary by tens of milliseconds on a busy machine).
    pub fn platform_overhead_ms(&self) -> f64 {
        self.first_response_ms - self.process_start_ms
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Burst {
    pub requests: u64,
    pub statuses: BTreeMap<String, u64>,
    pub all_answered_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub peak_desired: u64,
    pub peak_ready: u64,
}

/// A load ramp on one service: closed-loop clients stepped up, then a jump (panic), then none,
/// and `mecha up`'s `/metrics` sampled throughout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ramp {
    /// The service's concurrency target per replica.
    pub target: f64,
    pub stable_window_s: f64,
    pub scale_to_zero_grace_s: f64,
    pub samples: Vec<RampSample>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RampSample {
    /// Since the ramp started.
    pub t_s: f64,
    /// Closed-loop clients the benchmark runs at that moment (the offered concurrency).
    pub clients: u64,
    /// `mecha_autoscaler_observed_concurrency`.
    pub observed_concurrency: f64,
    /// `mecha_autoscaler_desired_replicas`.
    pub desired: u64,
    /// `mecha_revision_ready_replicas`.
    pub ready: u64,
    /// `mecha_autoscaler_panic_mode`.
    pub panic: bool,
}

/// `broker`: ingest across client counts against a plain receiver, delivery latency, backlog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Broker {
    pub seconds: u64,
    pub ingest: Vec<Ingest>,
    pub delivery: Vec<Delivery>,
    pub backlog: Option<Backlog>,
}

/// Ingest at one client count: medians over its rounds (one round in older results, which
/// hold no `rounds`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ingest {
    pub clients: u64,
    /// Events/s answered `202` by the broker (each committed to the log first).
    pub broker_per_s: f64,
    /// Requests/s the same clients get from a plain HTTP receiver in the benchmark's process
    /// (the baseline).
    pub plain_per_s: f64,
    /// The same receiver in a process of its own (absent from older results).
    #[serde(default)]
    pub plain_apart_per_s: Option<f64>,
    /// Each round: the three measured back to back.
    #[serde(default)]
    pub rounds: Vec<IngestRound>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IngestRound {
    pub broker_per_s: f64,
    pub plain_per_s: f64,
    pub plain_apart_per_s: f64,
    /// CPU µs per event while the broker was measured: `mecha up`, the clients.
    pub broker_cpu_us: [f64; 2],
    /// CPU µs per request while the in-process receiver was measured: the receiver and
    /// clients together (one process).
    pub plain_cpu_us: f64,
}

impl Ingest {
    /// The median over rounds of the broker's ratio to the in-process receiver, and the
    /// lowest and highest; from the medians when there are no rounds.
    pub fn ratio(&self) -> (f64, f64, f64) {
        let ratios: Vec<f64> = self
            .rounds
            .iter()
            .map(|r| r.broker_per_s / r.plain_per_s.max(f64::MIN_POSITIVE))
            .collect();
        if ratios.is_empty() {
            let ratio = self.broker_per_s / self.plain_per_s.max(f64::MIN_POSITIVE);
            return (ratio, ratio, ratio);
        }
        let ratios = sorted(&ratios);
        (
            median(ratios.iter().copied()),
            ratios[0],
            ratios[ratios.len() - 1],
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delivery {
    pub triggers: u64,
    pub rate_per_s: u64,
    pub accepted: u64,
    /// POST → subscriber, one per delivery.
    pub samples_us: Vec<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Backlog {
    pub events: u64,
    /// Resident right after the last event was accepted (the load's connections still open).
    pub rss_kib: u64,
    /// Resident once the load has been over for [`SETTLE`] (what stays while the events wait;
    /// 0 in results kept from before it was measured).
    #[serde(default)]
    pub settled_rss_kib: u64,
    pub idle_rss_kib: u64,
    pub log_bytes: u64,
}

/// How long after the load `Backlog::settled_rss_kib` is read.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// `broker-jetstream`: the standalone broker on JetStream against raw JetStream publishing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JetStream {
    pub seconds: u64,
    pub clients: u64,
    pub rounds: Vec<JetStreamRound>,
    pub delivery: Delivery,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JetStreamRound {
    /// Events/s through the broker, each `202` after the stream's acknowledgement.
    pub broker_per_s: f64,
    /// Messages/s raw publishers get acknowledged (the baseline).
    pub raw_per_s: f64,
    /// CPU µs per event through the broker: the broker, nats-server, the HTTP clients.
    pub broker_cpu_us: [f64; 3],
    /// CPU µs per message of raw publishing: (unused), nats-server, the publishers.
    pub raw_cpu_us: [f64; 3],
}

/// `autoscaler-tick`: one tick over many revisions, per pass.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AutoscalerTick {
    pub revisions: u64,
    pub tick_ms: Vec<f64>,
}

/// Microseconds of a duration, as the sample fields hold them.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Writes `value` as JSON to `path`, saying where on failure.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads JSON written by [`write_json`] from `path`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `q` quantile (0–1) of sorted `samples`, nearest rank; 0 for none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
    sorted[index]
}

/// The median of `values` (for an even count, the upper of the middle two, as [`quantile`]).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    quantile(&sorted(&v), 0.5)
}

/// `samples` sorted ascending (NaNs last).
pub fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v
}
