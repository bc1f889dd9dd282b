//! The control loop: desired state, replica readiness and load in; routes and replica counts
//! out.
//!
//! Every second it records each active revision's load — the time-weighted concurrency (or
//! request count) of its replicas, plus the requests callers hold for it, plus what sidecars
//! in other processes reported through [`Controller::stats_intake`] — into that
//! revision's [`Kpa`]; every [`TICK`] it decides; a poke from a caller holding requests makes
//! it decide at once. Replica counts go to the [`Actuator`] — the process supervisor locally —
//! one revision at a time; a revision whose step fails shows the error in its status
//! ([`ScalingStatus::actuation_error`]) and in `mecha_autoscaler_actuation_failures_total`,
//! and is retried with backoff ([`RETRY_START`] doubling to [`RETRY_MAX`]) while the others
//! go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crds::autoscaling::Metric;
use mecha_common::activation::Poke;
use mecha_common::wire::Stat;
use mecha_common::{Activation, RoutingTable, ShutdownSignal};
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::actuator::{ActuationError, Actuator};
use crate::api::ApiState;
use crate::kpa::{DeciderSpec, Decision, Kpa, Scaler, TICK};
use crate::serving::{RevisionSpec, ServingState};
use crate::supervisor::Supervisor;

/// The first retry of a failed actuation step; doubled on every failure after that.
pub const RETRY_START: Duration = Duration::from_millis(100);
/// The longest wait between retries of a failed step.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Controller<A: Actuator = Supervisor> {
    state: watch::Receiver<Arc<ServingState>>,
    actuator: A,
    activation: Activation,
    pokes: mpsc::UnboundedReceiver<Poke>,
    routes: watch::Sender<Arc<RoutingTable>>,
    domain: String,
    revisions: HashMap<String, RevisionScaling>,
    started: Instant,
    board: StatusBoard,
    metrics: Metrics,
    /// Stats from sidecars outside this process, per revision and replica, with when they
    /// arrived.
    remote: HashMap<String, HashMap<String, (Stat, Duration)>>,
    remote_tx: mpsc::UnboundedSender<Stat>,
    remote_rx: mpsc::UnboundedReceiver<Stat>,
    /// Revisions no longer active whose replicas still have to go to zero.
    retired: HashMap<String, Arc<RevisionSpec>>,
    /// Revisions whose last step failed.
    failing: HashMap<String, Failing>,
}

/// A revision whose last actuation step failed.
#[derive(Debug)]
struct Failing {
    attempts: u32,
    retry_at: Instant,
    error: ActuationError,
}

/// A sidecar that has not reported for this long no longer counts.
const REMOTE_STAT_EXPIRY: Duration = Duration::from_secs(3);

/// The autoscaler of one active revision.
#[derive(Debug)]
struct RevisionScaling {
    revision: Arc<RevisionSpec>,
    spec: DeciderSpec,
    kpa: Kpa,
    scaler: Scaler,
    /// Whether the revision receives traffic (only then may the rate limit scale it down).
    reachable: bool,
    last: Option<Decision>,
}

/// What the autoscaler last decided, per revision, for `mecha get` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<HashMap<String, ScalingStatus>>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingStatus {
    pub desired: u32,
    pub panicking: bool,
    /// Stable-window average of the scaling metric.
    pub stable: f64,
    /// Panic-window average of the scaling metric.
    pub panic: f64,
    /// Why the runtime did not take the last replica count; retried with backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actuation_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Metrics {
    desired: IntGaugeVec,
    panic: IntGaugeVec,
    concurrency: GaugeVec,
    rps: GaugeVec,
    activations: IntCounterVec,
    actuation_failures: IntCounterVec,
    actuation_failing: IntGaugeVec,
}

// === impl Controller ===

impl<A: Actuator> Controller<A> {
    /// `domain` is the suffix of service hosts (`localhost` in local mode) unless the state
    /// names one ([`ServingState::domain`]); `pokes` is the receiving end of `activation`.
    pub fn new(
        state: watch::Receiver<Arc<ServingState>>,
        actuator: A,
        activation: Activation,
        pokes: mpsc::UnboundedReceiver<Poke>,
        domain: impl Into<String>,
        registry: &Registry,
    ) -> Self {
        let (remote_tx, remote_rx) = mpsc::unbounded_channel();
        Self {
            state,
            actuator,
            activation,
            pokes,
            routes: watch::channel(Arc::default()).0,
            domain: domain.into(),
            revisions: HashMap::new(),
            started: Instant::now(),
            board: StatusBoard::default(),
            metrics: Metrics::register(registry),
            remote: HashMap::new(),
            remote_tx,
            remote_rx,
            retired: HashMap::new(),
            failing: HashMap::new(),
        }
    }

    /// What the control plane's API (`crate::api::router`) serves from: this controller's
    /// routes and stats intake, the actuator's endpoints.
    pub fn api(&self, shutdown: ShutdownSignal) -> ApiState {
        ApiState {
            routes: self.routes(),
            endpoints: self.actuator.endpoints(),
            stats: self.stats_intake(),
            activation: self.activation.clone(),
            shutdown,
            // The controller does not own Brokers and Triggers; `ApiState::with_eventing`.
            eventing: None,
            sources: None,
        }
    }

    /// Where stats from sidecars in other processes go (the admin API's `/api/v1/stats`).
    pub fn stats_intake(&self) -> mpsc::UnboundedSender<Stat> {
        self.remote_tx.clone()
    }

    /// The routing table the gateway serves from.
    pub fn routes(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.routes.subscribe()
    }

    pub fn status_board(&self) -> StatusBoard {
        self.board.clone()
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Routes and the set of active revisions from the current state, then replica counts.
    pub async fn reconcile(&mut self) {
        let state = self.state.borrow().clone();
        let domain = state.domain().unwrap_or(&self.domain);
        let desired = state.desired(domain, |r| self.actuator.ever_ready(r));
        let routed: Vec<&str> = desired
            .routes
            .hosts()
            .flat_map(|(_, route)| route.targets.iter().map(|t| t.revision.as_str()))
            .collect();
        let gone: Vec<String> = self
            .revisions
            .keys()
            .filter(|name| !desired.active.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(scaling) = self.revisions.remove(&name) {
                self.retired.insert(name, scaling.revision);
            }
        }
        self.remote
            .retain(|name, _| desired.active.contains_key(name));
        for (name, revision) in &desired.active {
            self.retired.remove(name);
            let spec = state.decider_spec(revision);
            let reachable = routed.contains(&name.as_str());
            match self.revisions.get_mut(name) {
                Some(scaling) => {
                    if scaling.spec != spec {
                        scaling.kpa.update_spec(spec.clone());
                        scaling.scaler.update_spec(spec.clone());
                        scaling.spec = spec;
                    }
                    scaling.reachable = reachable;
                }
                None => {
                    self.revisions.insert(
                        name.clone(),
                        RevisionScaling {
                            revision: revision.clone(),
                            kpa: Kpa::new(spec.clone()),
                            scaler: match self.actuator.running(revision) {
                                Some(running) => Scaler::resume(
                                    spec.clone(),
                                    running,
                                    self.actuator.ever_ready(name),
                                ),
                                None => Scaler::new(spec.clone()),
                            },
                            spec,
                            reachable,
                            last: None,
                        },
                    );
                }
            }
        }
        self.activation
            .retain(|revision| self.revisions.contains_key(revision));
        self.routes.send_if_modified(|current| {
            if **current == desired.routes {
                false
            } else {
                *current = Arc::new(desired.routes);
                true
            }
        });
        self.actuate().await;
    }

    /// Records one second of load for every active revision.
    fn record(&mut self, now: Duration) {
        let endpoints = self.actuator.endpoints().borrow().clone();
        for (name, scaling) in &mut self.revisions {
            let mut concurrency = 0.0;
            let mut requests = 0u64;
            let mut seconds = 0.0f64;
            for endpoint in endpoints.ready(name) {
                let sample = endpoint.sample();
                concurrency += sample.concurrency;
                requests += sample.requests;
                seconds = seconds.max(sample.seconds);
            }
            // Requests held by callers count like requests in flight: a burst against too few
            // replicas scales out at once rather than one replica at a time.
            concurrency += self.activation.sample(name).concurrency;
            let mut rps = if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            };
            if let Some(replicas) = self.remote.get_mut(name) {
                replicas.retain(|_, (_, at)| now.saturating_sub(*at) <= REMOTE_STAT_EXPIRY);
                for (stat, _) in replicas.values() {
                    concurrency += stat.concurrency;
                    rps += stat.rps();
                }
            }
            let value = match scaling.spec.metric {
                Metric::Concurrency => concurrency,
                Metric::Rps => rps,
            };
            scaling.kpa.record(now, value);
            let labels = scaling.revision.metric_labels();
            self.metrics
                .concurrency
                .with_label_values(&labels)
                .set(concurrency);
            self.metrics.rps.with_label_values(&labels).set(rps);
        }
    }

    /// One KPA decision for every active revision.
    fn decide(&mut self, now: Duration) {
        let endpoints = self.actuator.endpoints().borrow().clone();
        for (name, scaling) in &mut self.revisions {
            let ready = endpoints.ready(name).len() as u32;
            scaling.scaler.observe_ready(ready);
            let decision = scaling.kpa.scale(now, ready, scaling.reachable);
            scaling.scaler.apply(now, &decision);
            scaling.last = Some(decision);
        }
    }

    /// Callers are holding requests: scale those revisions now, to as many replicas as the
    /// held requests need at the revision's target.
    fn activate(&mut self, pokes: Vec<Poke>) {
        let mut waiting: HashMap<String, u32> = HashMap::new();
        for poke in pokes {
            let entry = waiting.entry(poke.revision).or_default();
            *entry = (*entry).max(poke.waiting);
        }
        for (name, waiting) in waiting {
            let Some(scaling) = self.revisions.get_mut(&name) else {
                continue;
            };
            let before = scaling.scaler.current();
            let after = scaling.scaler.activate(waiting);
            if before == 0 && after > 0 {
                self.metrics
                    .activations
                    .with_label_values(&scaling.revision.metric_labels())
                    .inc();
                tracing::info!(revision = %name, waiting, replicas = after, "activating");
            }
        }
    }

    /// Sends every revision's replica count to the actuator — and zero to retired ones — one
    /// revision at a time, skipping those whose retry is not due yet; then publishes the
    /// status.
    async fn actuate(&mut self) {
        let now = Instant::now();
        let steps: Vec<(Arc<RevisionSpec>, u32)> = self
            .retired
            .values()
            .map(|revision| (revision.clone(), 0))
            .chain(
                self.revisions
                    .values()
                    .map(|s| (s.revision.clone(), s.scaler.current())),
            )
            .collect();
        for (revision, replicas) in steps {
            let name = revision.name.as_str();
            if self.failing.get(name).is_some_and(|f| f.retry_at > now) {
                continue;
            }
            match self.actuator.scale(&revision, replicas).await {
                Ok(()) => {
                    if replicas == 0 && self.retired.remove(name).is_some() {
                        // Retired and at zero: its series leave `/metrics` with it.
                        self.metrics.forget(&revision);
                    }
                    if let Some(failing) = self.failing.remove(name) {
                        tracing::info!(revision = %name, replicas, attempts = failing.attempts, "actuated after failures");
                        let _ = self
                            .metrics
                            .actuation_failing
                            .remove_label_values(&revision.metric_labels());
                    }
                }
                Err(error) => self.failed(&revision, error, now),
            }
        }
        // Forget failures of revisions that are neither active nor retired any more.
        let (revisions, retired) = (&self.revisions, &self.retired);
        self.failing
            .retain(|name, _| revisions.contains_key(name) || retired.contains_key(name));
        self.publish_status();
    }

    /// A revision's step failed: counted, logged, retried after the next backoff.
    fn failed(&mut self, revision: &RevisionSpec, error: ActuationError, now: Instant) {
        let name = revision.name.as_str();
        let failing = self.failing.entry(name.to_string()).or_insert(Failing {
            attempts: 0,
            retry_at: now,
            error: error.clone(),
        });
        failing.attempts += 1;
        let backoff = RETRY_START
            .saturating_mul(1 << (failing.attempts - 1).min(16))
            .min(RETRY_MAX);
        failing.retry_at = now + backoff;
        tracing::warn!(revision = %name, %error, attempts = failing.attempts, "actuation failed; retrying in {backoff:?}");
        failing.error = error;
        let [namespace, service, name] = revision.metric_labels();
        self.metrics
            .actuation_failures
            .with_label_values(&[namespace, service, name, failing.error.label()])
            .inc();
        self.metrics
            .actuation_failing
            .with_label_values(&revision.metric_labels())
            .set(1);
    }

    /// When the earliest failed step is due again.
    fn next_retry(&self) -> Option<Instant> {
        self.failing.values().map(|f| f.retry_at).min()
    }

    /// What the autoscaler decided per revision, for the status board and `/metrics`.
    fn publish_status(&self) {
        let mut board = self.board.lock();
        board.clear();
        for (name, scaling) in &self.revisions {
            let status = ScalingStatus {
                desired: scaling.scaler.current(),
                panicking: scaling.last.is_some_and(|d| d.panicking),
                stable: scaling.last.map_or(0.0, |d| d.stable_value),
                panic: scaling.last.map_or(0.0, |d| d.panic_value),
                actuation_error: self.failing.get(name).map(|f| f.error.to_string()),
            };
            let labels = scaling.revision.metric_labels();
            self.metrics
                .desired
                .with_label_values(&labels)
                .set(i64::from(status.desired));
            self.metrics
                .panic
                .with_label_values(&labels)
                .set(i64::from(status.panicking));
            board.insert(name.clone(), status);
        }
    }

    /// Reconciles on every change, records load every second, decides every tick and on
    /// every poke, until shutdown.
    pub async fn run(mut self, shutdown: ShutdownSignal) {
        let mut endpoints = self.actuator.endpoints();
        let mut second = tokio::time::interval(Duration::from_secs(1));
        second.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let stop = shutdown.recv();
        tokio::pin!(stop);
        self.reconcile().await;
        loop {
            let retry = self.next_retry();
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.reconcile().await;
                }
                _ = endpoints.changed() => self.reconcile().await,
                Some(stat) = self.remote_rx.recv() => {
                    // Only active revisions scale; stats for others are dropped.
                    if self.revisions.contains_key(&stat.revision) {
                        let now = self.now();
                        self.remote
                            .entry(stat.revision.clone())
                            .or_default()
                            .insert(stat.replica.clone(), (stat, now));
                    }
                }
                Some(poke) = self.pokes.recv() => {
                    let mut pokes = vec![poke];
                    while let Ok(more) = self.pokes.try_recv() {
                        pokes.push(more);
                    }
                    self.activate(pokes);
                    self.actuate().await;
                }
                _ = second.tick() => {
                    let now = self.now();
                    self.record(now);
                    if now.as_secs().is_multiple_of(TICK.as_secs()) {
                        self.decide(now);
                    }
                    self.actuate().await;
                }
                // A failed step is retried when its backoff is over, not at the next tick.
                () = sleep_until_some(retry) => self.actuate().await,
                () = &mut stop => break,
            }
        }
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// === impl StatusBoard ===

impl StatusBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ScalingStatus>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, revision: &str) -> Option<ScalingStatus> {
        self.lock().get(revision).cloned()
    }
}

// === impl Metrics ===

/// The labels of a revision's series, as [`RevisionSpec::metric_labels`] gives them (the
/// supervisor's series carry the same).
const REVISION_LABELS: [&str; 3] = ["namespace", "service", "revision"];

impl Metrics {
    /// Removes a revision's series (it left the active set and runs nothing).
    fn forget(&self, revision: &RevisionSpec) {
        let labels = revision.metric_labels();
        for gauge in [&self.desired, &self.panic, &self.actuation_failing] {
            let _ = gauge.remove_label_values(&labels);
        }
        for gauge in [&self.concurrency, &self.rps] {
            let _ = gauge.remove_label_values(&labels);
        }
        let _ = self.activations.remove_label_values(&labels);
    }

    fn register(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str| {
            let g =
                IntGaugeVec::new(Opts::new(name, help), &REVISION_LABELS).expect("valid metric");
            let _ = registry.register(Box::new(g.clone()));
            g
        };
        let float = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &REVISION_LABELS).expect("valid metric");
            let _ = registry.register(Box::new(g.clone()));
            g
        };
        let activations = IntCounterVec::new(
            Opts::new(
                "mecha_autoscaler_activations_total",
                "Scale-ups from zero replicas on a caller's poke",
            ),
            &REVISION_LABELS,
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(activations.clone()));
        let actuation_failures = IntCounterVec::new(
            Opts::new(
                "mecha_autoscaler_actuation_failures_total",
                "Replica counts the runtime did not take, by revision and reason; each is retried with backoff",
            ),
            &["namespace", "service", "revision", "reason"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(actuation_failures.clone()));
        Self {
            desired: gauge(
                "mecha_autoscaler_desired_replicas",
                "Replicas the autoscaler wants for a revision",
            ),
            panic: gauge(
                "mecha_autoscaler_panic_mode",
                "1 while the revision's autoscaler is in panic mode",
            ),
            concurrency: float(
                "mecha_autoscaler_observed_concurrency",
                "Requests in flight on the revision's replicas plus those held by callers, averaged over the last second",
            ),
            rps: float(
                "mecha_autoscaler_observed_rps",
                "Requests per second reaching the revision's replicas over the last second",
            ),
            activations,
            actuation_failures,
            actuation_failing: gauge(
                "mecha_autoscaler_actuation_failing",
                "1 while the revision's last replica count was not taken by the runtime",
            ),
        }
    }
}
