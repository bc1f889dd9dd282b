//! Knative-style autoscaler scenarios as data: each `kpa/*.yaml` scripts load over time and
//! says what replica counts (and panic mode) to expect. The KPA runs under exact simulated
//! time: load is recorded every second and a decision is made every tick (2 s), as in Knative.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use autoscaler::kpa::{DeciderSpec, Kpa, Scaler, TICK};
use crds::autoscaling::{PREFIX, ScalingAnnotations, parse_go_duration};
use crds::config::AutoscalerConfig;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Scenario {
    description: String,
    /// `config-autoscaler` data.
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// `autoscaling.knative.dev/*` annotations without the prefix.
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    container_concurrency: u32,
    phases: Vec<Phase>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Phase {
    duration: String,
    /// Total load per second over all replicas (concurrency, or requests for rps).
    load: f64,
    /// A request arrives for the revision at the start of the phase (the activation poke).
    #[serde(default)]
    activate: bool,
    #[serde(default)]
    checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Check {
    /// Time into the phase at which to check (the phase's end when absent).
    #[serde(default)]
    after: Option<String>,
    /// Inclusive range of replicas.
    replicas: [u32; 2],
    #[serde(default)]
    panic: Option<bool>,
}

struct Sim {
    kpa: Kpa,
    scaler: Scaler,
    now: Duration,
    replicas: u32,
    panicking: bool,
}

impl Sim {
    fn new(spec: DeciderSpec) -> Self {
        let scaler = Scaler::new(spec.clone());
        Self {
            replicas: scaler.current(),
            kpa: Kpa::new(spec),
            scaler,
            now: Duration::ZERO,
            panicking: false,
        }
    }

    /// One simulated second: record the load, and decide on tick boundaries. Replicas are
    /// ready at the next decision (the scenarios model the algorithm, not start-up time).
    fn second(&mut self, load: f64) {
        self.kpa.record(self.now, load);
        if self.now.as_secs().is_multiple_of(TICK.as_secs()) {
            let ready = self.replicas;
            self.scaler.observe_ready(ready);
            let decision = self.kpa.scale(self.now, ready, ready > 0);
            self.panicking = decision.panicking;
            self.replicas = self.scaler.apply(self.now, &decision);
        }
        self.now += Duration::from_secs(1);
    }
}

fn run(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let scenario: Scenario = serde_saphyr::from_str(&text).map_err(|e| e.to_string())?;
    let config = AutoscalerConfig::from_data(&scenario.config).map_err(|e| format!("{e:?}"))?;
    let annotations: BTreeMap<String, String> = scenario
        .annotations
        .iter()
        .map(|(k, v)| (format!("{PREFIX}{k}"), v.clone()))
        .collect();
    let mut errors = Vec::new();
    let parsed = ScalingAnnotations::parse(&annotations, "annotations", &mut errors);
    if !errors.is_empty() {
        return Err(format!("{errors:?}"));
    }
    let spec = DeciderSpec::resolve(&config, &parsed, scenario.container_concurrency);
    let mut sim = Sim::new(spec);
    let fail = |message: String| format!("{message}\n    ({})", scenario.description.trim());
    for (i, phase) in scenario.phases.iter().enumerate() {
        let length = parse_go_duration(&phase.duration)?.as_secs();
        if phase.activate {
            sim.replicas = sim.scaler.activate(1);
        }
        let mut checks: Vec<(u64, &Check)> = phase
            .checks
            .iter()
            .map(|c| {
                let at = c
                    .after
                    .as_deref()
                    .map_or(Ok(length), |a| parse_go_duration(a).map(|d| d.as_secs()));
                at.map(|at| (at, c))
            })
            .collect::<Result<_, _>>()?;
        checks.sort_by_key(|(at, _)| *at);
        let mut pending = checks.into_iter().peekable();
        for second in 0..=length {
            while let Some((_, check)) = pending.next_if(|(at, _)| *at == second) {
                let [lo, hi] = check.replicas;
                let at = format!("phase {} at {second}s (t={}s)", i + 1, sim.now.as_secs());
                if sim.replicas < lo || sim.replicas > hi {
                    return Err(fail(format!(
                        "{at}: {} replicas, expected {lo}..={hi}",
                        sim.replicas
                    )));
                }
                if let Some(panic) = check.panic
                    && sim.panicking != panic
                {
                    return Err(fail(format!(
                        "{at}: panic mode {}, expected {panic}",
                        sim.panicking
                    )));
                }
            }
            if second < length {
                sim.second(phase.load);
            }
        }
    }
    Ok(())
}

#[test]
fn kpa_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kpa");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenario directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the scenario set, found {files:?}"
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| {
            run(f).err().map(|e| {
                format!(
                    "{}: {e}",
                    f.file_name().unwrap_or_default().to_string_lossy()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n")
    );
}
