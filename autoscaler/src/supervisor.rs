//! The local actuator: runs each revision's replicas as OS processes.
//!
//! A replica is the container's `command` + `args`, started in the YAML file's directory with
//! the container's `env`, a free `PORT`, and Knative's `K_SERVICE`, `K_REVISION` and
//! `K_CONFIGURATION`. It is probed until ready (see [`crate::probe`]), then published as an
//! endpoint. A replica that exits is restarted with exponential backoff, as Kubernetes restarts
//! a container but shorter, since a local process starts in milliseconds: by default 100 ms
//! doubling to 30 s (Kubernetes: 10 s to 5 min), reset once a process has run [`STABLE_RUN`];
//! one that keeps ending before that ([`ReplicaStatus::recent_exits`]) is crash looping
//! (Kubernetes' `CrashLoopBackOff`; `mecha up` makes its revision `ContainerHealthy=False`). A
//! replica that is stopped is first taken out of rotation, then allowed to finish its
//! in-flight requests, then sent SIGTERM, and SIGKILL after the grace period.
//!
//! Every replica runs in its own process group, so stopping it stops whatever it spawned, and
//! with `PR_SET_PDEATHSIG` so the kernel kills it if Mecha itself dies without cleaning up.
//! With [`SupervisorConfig::guard`] set (as `mecha up` does), each replica runs under the
//! [`crate::guard`], which also stops its grandchildren when Mecha is SIGKILLed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mecha_common::routing::ServiceKey;
use mecha_common::{Activation, Endpoint, EndpointTable, RevisionEndpoints};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::logs::LogHub;
use crate::probe::ProbeSpec;
use crate::serving::RevisionSpec;

/// A replica that ran at least this long before exiting starts its backoff afresh, and its
/// earlier exits no longer count as a crash loop (Kubernetes forgets a container's backoff
/// after 10 minutes; local processes start in milliseconds, so a tenth of that).
pub const STABLE_RUN: Duration = Duration::from_secs(60);
/// How often a replica being stopped checks whether its last request has finished.
const DRAIN_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Between SIGTERM and SIGKILL, and the longest a stopping replica may take to finish its
    /// in-flight requests.
    pub grace_period: Duration,
    /// Wait before the first restart of a crashed replica; doubled on every crash after that,
    /// up to `max_restart_backoff`, until a process runs [`STABLE_RUN`].
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    /// A program that runs [`crate::guard`] (`mecha` itself): each replica's command is started
    /// under it. Without one, replicas are started directly and a grandchild can outlive a
    /// SIGKILLed Mecha.
    pub guard: Option<std::path::PathBuf>,
    /// The mesh proxy's URL (`http://127.0.0.1:PORT`, the outbound role `mecha up` runs):
    /// replicas of revisions annotated `mecha.dev/mesh: "true"` get it as `HTTP_PROXY`
    /// ([`crds::serving::mesh_env`]).
    pub mesh_proxy: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SupervisorConfig,
    logs: LogHub,
    /// Where a revision's endpoints get their shared "request finished" signal.
    activation: Activation,
    endpoints: watch::Sender<Arc<EndpointTable>>,
    revisions: Mutex<HashMap<String, RevisionRunner>>,
    ever_ready: Mutex<HashSet<String>>,
    /// `PORT`s handed to replica processes that have not exited yet (see [`PortLease`]).
    ports: Arc<Mutex<HashSet<u16>>>,
    /// Replica tasks still running; shutdown waits for zero.
    live: watch::Sender<usize>,
    /// Variables added to the replicas of a Service (a SinkBinding's `K_SINK`, …).
    bound_env: Mutex<HashMap<ServiceKey, Vec<(String, String)>>>,
    /// By revision, the last replica that was stopped while it kept crashing
    /// ([`Supervisor::last_crash`]): scaling a crash-looping revision to zero must not make
    /// it look healthy.
    last_crash: Mutex<HashMap<String, ReplicaStatus>>,
    metrics: Metrics,
}

#[derive(Debug)]
struct RevisionRunner {
    spec: Arc<RevisionSpec>,
    desired: u32,
    next_index: u32,
    replicas: Vec<Arc<Replica>>,
}

#[derive(Debug)]
struct Replica {
    name: Arc<str>,
    stop: watch::Sender<bool>,
    state: Mutex<ReplicaState>,
}

#[derive(Debug, Default)]
struct ReplicaState {
    pid: Option<u32>,
    addr: Option<SocketAddr>,
    /// Set while the replica is ready and in rotation.
    endpoint: Option<Endpoint>,
    restarts: u32,
    /// Exits in a row, none after running [`STABLE_RUN`].
    crash_streak: u32,
    /// When the running process started.
    started: Option<Instant>,
    /// How the process last ended (`exit status: 1`, `signal: 9 (SIGKILL)`, or why it could
    /// not start).
    last_exit: Option<String>,
}

/// A revision's replicas as `mecha get` shows them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RevisionStatus {
    pub desired: u32,
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub name: String,
    pub pid: Option<u32>,
    pub addr: Option<SocketAddr>,
    pub ready: bool,
    pub stopping: bool,
    pub restarts: u32,
    /// Times in a row the process ended before running [`STABLE_RUN`]; 0 once the running
    /// process has lasted that long. What makes a replica crash looping.
    #[serde(default)]
    pub recent_exits: u32,
    pub in_flight: u32,
    /// How the replica's process last ended, when it has crashed before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone)]
struct Metrics {
    desired: IntGaugeVec,
    ready: IntGaugeVec,
    restarts: IntCounterVec,
}

enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    Stop,
}

// === impl SupervisorConfig ===

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(30),
            restart_backoff: Duration::from_millis(100),
            max_restart_backoff: Duration::from_secs(30),
            guard: None,
            mesh_proxy: None,
        }
    }
}

// === impl Supervisor ===

impl Supervisor {
    pub fn new(
        config: SupervisorConfig,
        logs: LogHub,
        activation: Activation,
        registry: &Registry,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                logs,
                activation,
                endpoints: watch::channel(Arc::default()).0,
                revisions: Mutex::default(),
                ever_ready: Mutex::default(),
                ports: Arc::default(),
                live: watch::channel(0).0,
                bound_env: Mutex::default(),
                last_crash: Mutex::default(),
                metrics: Metrics::register(registry),
            }),
        }
    }

    /// Ready endpoints of every revision; changes whenever a replica enters or leaves rotation.
    pub fn endpoints(&self) -> watch::Receiver<Arc<EndpointTable>> {
        self.inner.endpoints.subscribe()
    }

    /// Forgets a deleted Service's revisions: a new Service of that name starts unready, and
    /// their restart counts leave `/metrics`.
    pub fn forget_service(&self, service: &ServiceKey) {
        let ours = |revision: &str| {
            revision
                .strip_prefix(service.name.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        lock(&self.inner.ever_ready).retain(|revision| !ours(revision));
        for metric in prometheus::core::Collector::collect(&self.inner.metrics.restarts) {
            for sample in metric.get_metric() {
                let labels: Vec<&str> = sample.get_label().iter().map(|l| l.value()).collect();
                if let [namespace, name, revision] = labels[..]
                    && namespace == service.namespace
                    && name == service.name
                {
                    let _ = self
                        .inner
                        .metrics
                        .restarts
                        .remove_label_values(&[namespace, name, revision]);
                }
            }
        }
    }

    /// Sets the variables bound to each Service's replicas (Services not named get none).
    /// New replicas start with them; the replicas of a Service whose variables changed are
    /// replaced: new ones are started and the old ones drained and stopped, as a scale-down
    /// stops them. Returns the Services whose replicas were replaced.
    pub fn bind_env(
        &self,
        bindings: HashMap<ServiceKey, Vec<(String, String)>>,
    ) -> Vec<ServiceKey> {
        let changed: Vec<ServiceKey> = {
            let mut bound = lock(&self.inner.bound_env);
            let keys: HashSet<&ServiceKey> = bound.keys().chain(bindings.keys()).collect();
            let changed = keys
                .into_iter()
                .filter(|key| bound.get(*key) != bindings.get(*key))
                .cloned()
                .collect();
            *bound = bindings;
            changed
        };
        let mut revisions = lock(&self.inner.revisions);
        for runner in revisions.values_mut() {
            if !runner.spec.serves_requests || !changed.contains(&runner.spec.service) {
                continue;
            }
            let old: Vec<_> = runner
                .replicas
                .iter()
                .filter(|r| !r.is_stopping())
                .cloned()
                .collect();
            if old.is_empty() {
                continue;
            }
            self.inner.logs.event(
                &runner.spec.service,
                &runner.spec.name,
                &runner.spec.name,
                "replacing replicas: the variables bound to the service changed",
            );
            for replica in &old {
                replica.stop.send_replace(true);
            }
            self.inner.scale(runner);
            self.inner.publish(runner);
        }
        changed
    }

    /// Whether the revision has had a ready replica (Knative's Ready condition).
    pub fn ever_ready(&self, revision: &str) -> bool {
        lock(&self.inner.ever_ready).contains(revision)
    }

    /// Sets how many replicas each revision should run. Revisions not named go to zero.
    pub fn apply(&self, desired: &BTreeMap<String, (Arc<RevisionSpec>, u32)>) {
        let mut revisions = lock(&self.inner.revisions);
        for (spec, replicas) in desired.values() {
            self.inner.runner(&mut revisions, spec).desired = *replicas;
        }
        for (name, runner) in revisions.iter_mut() {
            if !desired.contains_key(name) {
                runner.desired = 0;
            }
        }
        for runner in revisions.values_mut() {
            self.inner.scale(runner);
        }
        self.inner.forget_idle(&mut revisions);
    }

    /// Sets how many replicas one revision should run (the [`crate::Actuator`] step).
    pub fn set_replicas(&self, revision: &Arc<RevisionSpec>, replicas: u32) {
        let mut revisions = lock(&self.inner.revisions);
        if replicas == 0 && !revisions.contains_key(&revision.name) {
            return;
        }
        let runner = self.inner.runner(&mut revisions, revision);
        runner.desired = replicas;
        self.inner.scale(runner);
        self.inner.forget_idle(&mut revisions);
    }

    pub fn status(&self, revision: &str) -> Option<RevisionStatus> {
        let revisions = lock(&self.inner.revisions);
        let runner = revisions.get(revision)?;
        Some(RevisionStatus {
            desired: runner.desired,
            replicas: runner
                .replicas
                .iter()
                .map(|r| r.status(self.inner.config.guard.is_some()))
                .collect(),
        })
    }

    /// The last replica of `revision` that was stopped (scaled away) while it kept ending
    /// before [`STABLE_RUN`] — what it was when it went — until a replica of the revision runs
    /// that long. Kept after the revision has no replica left.
    pub fn last_crash(&self, revision: &str) -> Option<ReplicaStatus> {
        lock(&self.inner.last_crash).get(revision).cloned()
    }

    /// Stops every replica (drain, SIGTERM, SIGKILL after the grace period) and waits until
    /// all have exited.
    pub async fn shutdown(&self) {
        self.apply(&BTreeMap::new());
        let mut live = self.inner.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// SIGKILLs every replica's process group at once: the second Ctrl-C.
    pub fn kill_all(&self) {
        let revisions = lock(&self.inner.revisions);
        for replica in revisions.values().flat_map(|r| &r.replicas) {
            if let Some(pid) = lock(&replica.state).pid {
                signal_group(pid, Signal::KILL);
            }
        }
    }
}

// === impl Inner ===

impl Inner {
    /// Starts or stops replicas until the revision runs as many as it should.
    fn scale(self: &Arc<Self>, runner: &mut RevisionRunner) {
        let running: Vec<_> = runner
            .replicas
            .iter()
            .filter(|r| !r.is_stopping())
            .cloned()
            .collect();
        let desired = runner.desired as usize;
        if running.len() != desired {
            self.logs.event(
                &runner.spec.service,
                &runner.spec.name,
                &runner.spec.name,
                &format!("scaled from {} to {desired} replicas", running.len()),
            );
        }
        if running.len() < desired {
            for _ in running.len()..desired {
                let name: Arc<str> = format!("{}-{}", runner.spec.name, runner.next_index).into();
                runner.next_index += 1;
                let replica = Arc::new(Replica {
                    name,
                    stop: watch::channel(false).0,
                    state: Mutex::default(),
                });
                runner.replicas.push(replica.clone());
                self.live.send_modify(|n| *n += 1);
                tokio::spawn(self.clone().watch_replica(runner.spec.clone(), replica));
            }
        } else if running.len() > desired {
            // Stop the replicas that cost least to lose: not ready first, then the least
            // busy, then the newest.
            let mut victims = running;
            victims.sort_by_key(|r| {
                let state = lock(&r.state);
                let in_flight = state.endpoint.as_ref().map_or(0, Endpoint::in_flight);
                (state.endpoint.is_some(), in_flight)
            });
            for replica in victims.iter().take(victims.len() - desired) {
                replica.stop.send_replace(true);
            }
            self.publish(runner);
        }
        self.metrics
            .desired
            .with_label_values(&runner.spec.metric_labels())
            .set(i64::from(runner.desired));
    }

    /// The revision's runner, made when it has none yet.
    fn runner<'a>(
        &self,
        revisions: &'a mut HashMap<String, RevisionRunner>,
        spec: &Arc<RevisionSpec>,
    ) -> &'a mut RevisionRunner {
        revisions
            .entry(spec.name.clone())
            .or_insert_with(|| RevisionRunner {
                spec: spec.clone(),
                desired: 0,
                next_index: 1,
                replicas: Vec::new(),
            })
    }

    /// Drops revisions that should run nothing and no longer do.
    fn forget_idle(&self, revisions: &mut HashMap<String, RevisionRunner>) {
        let idle: Vec<_> = revisions
            .iter()
            .filter(|(_, r)| r.desired == 0 && r.replicas.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        // A revision scaled to zero stays Ready (as in Knative): `ever_ready` keeps it until
        // its Service is deleted (`forget_service`).
        for name in idle {
            if let Some(runner) = revisions.remove(&name) {
                let labels = runner.spec.metric_labels();
                let _ = self.metrics.desired.remove_label_values(&labels);
                let _ = self.metrics.ready.remove_label_values(&labels);
            }
        }
    }

    /// Publishes the revision's ready replicas as its endpoints.
    fn publish(&self, runner: &RevisionRunner) {
        let ready: Vec<Endpoint> = runner
            .replicas
            .iter()
            .filter(|r| !r.is_stopping())
            .filter_map(|r| lock(&r.state).endpoint.clone())
            .collect();
        self.metrics
            .ready
            .with_label_values(&runner.spec.metric_labels())
            .set(ready.len() as i64);
        let name = runner.spec.name.clone();
        self.endpoints.send_modify(|table| {
            Arc::make_mut(table).set(name, RevisionEndpoints { ready });
        });
    }

    fn with_runner(&self, revision: &str, f: impl FnOnce(&mut RevisionRunner)) {
        if let Some(runner) = lock(&self.revisions).get_mut(revision) {
            f(runner);
        }
    }

    fn set_endpoint(&self, spec: &RevisionSpec, replica: &Replica, endpoint: Option<Endpoint>) {
        let becomes_ready = endpoint.is_some();
        lock(&replica.state).endpoint = endpoint;
        if becomes_ready {
            lock(&self.ever_ready).insert(spec.name.clone());
        }
        self.with_runner(&spec.name, |runner| self.publish(runner));
    }

    fn log(&self, service: &ServiceKey, replica: &str, line: &str) {
        self.logs.push(service, replica, line);
    }

    /// Runs [`Self::run_replica`] in a task of its own and cleans up after it if it panics: the
    /// replica's processes are killed, it leaves the revision (so the next apply starts a
    /// replacement) and shutdown does not wait for it forever.
    async fn watch_replica(self: Arc<Self>, spec: Arc<RevisionSpec>, replica: Arc<Replica>) {
        let task = tokio::spawn(self.clone().run_replica(spec.clone(), replica.clone()));
        // Cancelled only when the runtime itself stops: nothing is left to clean up for.
        let Err(error) = task.await else {
            return;
        };
        if !error.is_panic() {
            return;
        }
        let panic = error.into_panic();
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(replica = %replica.name, reason = %why, "the task running this replica panicked; its processes are killed and it is replaced");
        self.log(
            &spec.service,
            &replica.name,
            &format!("mecha: the task running this replica failed ({why}); replacing it"),
        );
        let pid = {
            let mut state = lock(&replica.state);
            state.endpoint = None;
            state.pid.take()
        };
        if let Some(pid) = pid {
            signal_group(pid, Signal::KILL);
        }
        self.metrics
            .restarts
            .with_label_values(&spec.metric_labels())
            .inc();
        tokio::time::sleep(self.config.restart_backoff).await;
        {
            let mut revisions = lock(&self.revisions);
            if let Some(runner) = revisions.get_mut(&spec.name) {
                runner.replicas.retain(|r| !Arc::ptr_eq(r, &replica));
                self.publish(runner);
                self.scale(runner);
            }
            self.forget_idle(&mut revisions);
        }
        self.live.send_modify(|n| *n -= 1);
    }

    /// One replica from first start to final exit.
    async fn run_replica(self: Arc<Self>, spec: Arc<RevisionSpec>, replica: Arc<Replica>) {
        let probe = if spec.serves_requests {
            crate::probe::for_container(&spec.container)
        } else {
            mecha_common::probe::ProbeSpec {
                kind: mecha_common::probe::ProbeKind::Running,
                ..mecha_common::probe::ProbeSpec::tcp()
            }
        };
        let mut stop = replica.stop.subscribe();
        let mut backoff = self.config.restart_backoff;
        loop {
            if *stop.borrow() {
                break;
            }
            let started = Instant::now();
            let spawned = PortLease::take(&self.ports, free_port).and_then(|lease| {
                let addr = SocketAddr::from(([127, 0, 0, 1], lease.port));
                let mut bound = lock(&self.bound_env)
                    .get(&spec.service)
                    .filter(|_| spec.serves_requests)
                    .cloned()
                    .unwrap_or_default();
                if let Some(proxy) = &self.config.mesh_proxy
                    && crds::serving::meshed(&spec.template.metadata.annotations)
                {
                    bound.extend(crds::serving::mesh_env(proxy, &spec.container, &[]));
                }
                spawn_process(
                    &spec,
                    &replica.name,
                    lease.port,
                    &bound,
                    self.config.guard.as_deref(),
                )
                .map(|child| (child, addr, lease))
            });
            let outcome = match spawned {
                Err(error) => {
                    let program = spec.container.command.first().map_or("", String::as_str);
                    tracing::error!(replica = %replica.name, %error, "cannot start `{program}`");
                    self.log(
                        &spec.service,
                        &replica.name,
                        &format!("cannot start `{program}`: {error}"),
                    );
                    Outcome::Exited(Err(error))
                }
                // The lease is held until the process has exited.
                Ok((mut child, addr, _lease)) => {
                    // One endpoint per process: its in-flight count outlives readiness flaps,
                    // and a restart is a new endpoint that callers have not given up on.
                    let endpoint = Endpoint::new(
                        replica.name.clone(),
                        addr,
                        self.activation.released(&spec.name),
                    );
                    let pid = child.id();
                    {
                        let mut state = lock(&replica.state);
                        state.pid = pid;
                        state.addr = Some(addr);
                        state.started = Some(started);
                    }
                    self.forward_output(&spec.service, &replica.name, &mut child);
                    self.logs.event(
                        &spec.service,
                        &spec.name,
                        &replica.name,
                        &format!(
                            "started (pid {}, port {})",
                            pid.map_or_else(|| "?".into(), |p| p.to_string()),
                            addr.port()
                        ),
                    );
                    tracing::debug!(replica = %replica.name, ?pid, %addr, "started");
                    let outcome = tokio::select! {
                        status = child.wait() => Outcome::Exited(status),
                        never = self.keep_ready(&spec, &replica, &probe, &endpoint, started) => match never {},
                        _ = stop.wait_for(|s| *s) => Outcome::Stop,
                    };
                    self.set_endpoint(&spec, &replica, None);
                    match outcome {
                        Outcome::Stop => {
                            self.stop_process(&replica, &endpoint, child).await;
                            self.logs
                                .event(&spec.service, &spec.name, &replica.name, "stopped");
                            break;
                        }
                        exited => {
                            // Whatever the replica started must not outlive it.
                            if let Some(pid) = pid {
                                signal_group(pid, Signal::KILL);
                            }
                            exited
                        }
                    }
                }
            };
            if let Outcome::Exited(status) = outcome {
                let stable = started.elapsed() >= STABLE_RUN;
                if stable {
                    backoff = self.config.restart_backoff;
                }
                let status = match status {
                    Ok(status) => status.to_string(),
                    Err(error) => error.to_string(),
                };
                self.logs.event(
                    &spec.service,
                    &spec.name,
                    &replica.name,
                    &format!("ended ({status}); restarting in {} ms", backoff.as_millis()),
                );
                let restarts = {
                    let mut state = lock(&replica.state);
                    state.restarts += 1;
                    state.crash_streak = if stable { 1 } else { state.crash_streak + 1 };
                    state.pid = None;
                    state.started = None;
                    state.last_exit = Some(status.clone());
                    state.restarts
                };
                self.metrics
                    .restarts
                    .with_label_values(&spec.metric_labels())
                    .inc();
                // The marker `mecha logs` shows between a crashed process's last line and
                // its successor's first.
                self.log(
                    &spec.service,
                    &replica.name,
                    &format!(
                        "mecha: process ended ({status}); restart {restarts} in {} ms",
                        backoff.as_millis()
                    ),
                );
                tracing::warn!(
                    replica = %replica.name,
                    %status,
                    restarts,
                    "replica crashed; restarting in {backoff:?}"
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(self.config.max_restart_backoff);
            }
        }
        lock(&replica.state).pid = None;
        let gone = replica.status(self.config.guard.is_some());
        {
            let mut crashes = lock(&self.last_crash);
            if gone.recent_exits > 0 {
                crashes.insert(spec.name.clone(), gone);
            } else {
                // It ran long enough, or never ended: the revision is past its crashes.
                crashes.remove(&spec.name);
            }
        }
        self.with_runner(&spec.name, |runner| {
            runner.replicas.retain(|r| !Arc::ptr_eq(r, &replica));
            self.publish(runner);
        });
        self.forget_idle(&mut lock(&self.revisions));
        self.live.send_modify(|n| *n -= 1);
    }

    /// Probes until ready, publishes the endpoint, then keeps probing; a replica that fails
    /// `failureThreshold` probes in a row leaves rotation until it passes again. Runs until
    /// the caller stops polling it (the replica exited or is being stopped).
    async fn keep_ready(
        &self,
        spec: &RevisionSpec,
        replica: &Replica,
        probe: &ProbeSpec,
        endpoint: &Endpoint,
        started: Instant,
    ) -> Infallible {
        let addr = endpoint.addr;
        tokio::time::sleep(probe.initial_delay).await;
        loop {
            let mut successes = 0;
            loop {
                if probe.check(addr).await {
                    successes += 1;
                    if successes >= probe.success_threshold {
                        break;
                    }
                } else {
                    successes = 0;
                }
                tokio::time::sleep(probe.startup_period(started.elapsed())).await;
            }
            tracing::info!(
                replica = %replica.name,
                %addr,
                "ready in {} ms",
                started.elapsed().as_millis()
            );
            self.logs.event(
                &spec.service,
                &spec.name,
                &replica.name,
                &format!("ready in {} ms", started.elapsed().as_millis()),
            );
            self.set_endpoint(spec, replica, Some(endpoint.clone()));
            let mut failures = 0;
            while failures < probe.failure_threshold {
                tokio::time::sleep(probe.ready_period()).await;
                if probe.check(addr).await {
                    failures = 0;
                } else {
                    failures += 1;
                }
            }
            tracing::warn!(replica = %replica.name, failures, "failed readiness; out of rotation");
            self.logs.event(
                &spec.service,
                &spec.name,
                &replica.name,
                &format!("failed {failures} readiness probes in a row; out of rotation"),
            );
            self.set_endpoint(spec, replica, None);
        }
    }

    /// Lets in-flight requests finish (the replica is already out of rotation), then SIGTERM,
    /// then SIGKILL once the grace period is over.
    async fn stop_process(&self, replica: &Replica, endpoint: &Endpoint, mut child: Child) {
        let deadline = Instant::now() + self.config.grace_period;
        while endpoint.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let Some(pid) = child.id() else {
            return; // already reaped
        };
        signal_group(pid, Signal::TERM);
        match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(status) => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::info!(replica = %replica.name, %status, "stopped");
                // Children it left behind go too.
                signal_group(pid, Signal::KILL);
            }
            Err(_) => {
                tracing::warn!(replica = %replica.name, "did not stop within the grace period; killing");
                signal_group(pid, Signal::KILL);
                let _ = child.wait().await;
            }
        }
    }

    fn forward_output(&self, service: &ServiceKey, replica: &Arc<str>, child: &mut Child) {
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward_lines(
                self.logs.clone(),
                service.clone(),
                replica.clone(),
                stdout,
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_lines(
                self.logs.clone(),
                service.clone(),
                replica.clone(),
                stderr,
            ));
        }
    }
}

// === impl Replica ===

impl Replica {
    fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// `guarded`: the pid kept is the guard's; the one shown is the command's, the process
    /// users know (it answers their requests, it is in their logs).
    fn status(&self, guarded: bool) -> ReplicaStatus {
        let state = lock(&self.state);
        ReplicaStatus {
            name: self.name.to_string(),
            pid: state
                .pid
                .map(|pid| if guarded { guarded_pid(pid) } else { pid }),
            addr: state.addr,
            ready: state.endpoint.is_some(),
            stopping: self.is_stopping(),
            restarts: state.restarts,
            recent_exits: if state.started.is_some_and(|at| at.elapsed() >= STABLE_RUN) {
                0
            } else {
                state.crash_streak
            },
            in_flight: state.endpoint.as_ref().map_or(0, Endpoint::in_flight),
            last_exit: state.last_exit.clone(),
        }
    }
}

// === impl Metrics ===

impl Metrics {
    fn register(registry: &Registry) -> Self {
        let desired = IntGaugeVec::new(
            Opts::new(
                "mecha_revision_desired_replicas",
                "Replicas a revision should run",
            ),
            &["namespace", "service", "revision"],
        )
        .expect("valid metric");
        let ready = IntGaugeVec::new(
            Opts::new(
                "mecha_revision_ready_replicas",
                "Replicas of a revision in rotation",
            ),
            &["namespace", "service", "revision"],
        )
        .expect("valid metric");
        let restarts = IntCounterVec::new(
            Opts::new(
                "mecha_replica_restarts_total",
                "Replica crashes followed by a restart",
            ),
            &["namespace", "service", "revision"],
        )
        .expect("valid metric");
        // Registering twice (two supervisors on one registry in tests) keeps the first.
        let _ = registry.register(Box::new(desired.clone()));
        let _ = registry.register(Box::new(ready.clone()));
        let _ = registry.register(Box::new(restarts.clone()));
        Self {
            desired,
            ready,
            restarts,
        }
    }
}

async fn forward_lines(
    logs: LogHub,
    service: ServiceKey,
    replica: Arc<str>,
    output: impl AsyncRead + Unpin,
) {
    let mut reader = BufReader::new(output);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                logs.push(&service, &replica, text.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A replica's `PORT`, kept out of other replicas' hands until its process has exited.
///
/// A port is found free by binding port 0 and closing it, and the kernel may hand the same
/// port to the very next `bind(0)` — for example for the next replica of a scale-out, while
/// the first is still starting and has not bound it. Two replicas with one port would make one
/// fail to start and, worse, let the second replica's readiness probe reach the first.
#[derive(Debug)]
struct PortLease {
    ports: Arc<Mutex<HashSet<u16>>>,
    port: u16,
}

impl PortLease {
    /// How many ports in a row may turn out to be leased before giving up.
    const ATTEMPTS: usize = 64;

    fn take(
        ports: &Arc<Mutex<HashSet<u16>>>,
        mut free_port: impl FnMut() -> std::io::Result<u16>,
    ) -> std::io::Result<Self> {
        for _ in 0..Self::ATTEMPTS {
            let port = free_port()?;
            if lock(ports).insert(port) {
                return Ok(Self {
                    ports: ports.clone(),
                    port,
                });
            }
        }
        Err(std::io::Error::other(format!(
            "no free port: {} in a row were already given to other replicas",
            Self::ATTEMPTS
        )))
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        lock(&self.ports).remove(&self.port);
    }
}

fn spawn_process(
    spec: &RevisionSpec,
    replica: &str,
    port: u16,
    bound: &[(String, String)],
    guard: Option<&std::path::Path>,
) -> std::io::Result<Child> {
    let container = &spec.container;
    let (program, command_args) = container
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("the container has no command"))?;
    // A relative path with a slash is relative to the YAML file's directory, not to ours.
    let program = if program.contains('/') {
        spec.workdir.join(program).into_os_string()
    } else {
        program.into()
    };
    let mut command = match guard {
        Some(guard) => {
            let mut line = vec![program];
            line.extend(command_args.iter().map(Into::into));
            line.extend(container.args.iter().map(Into::into));
            let mut command = Command::new(guard);
            command.args(crate::guard::args(std::process::id(), &line));
            command
        }
        None => {
            let mut command = Command::new(program);
            command.args(command_args).args(&container.args);
            command
        }
    };
    command
        .current_dir(&spec.workdir)
        .envs(container.env.iter().map(|e| (&e.name, &e.value)))
        .env("PORT", port.to_string())
        .env("K_SERVICE", &spec.service.name)
        .env("K_CONFIGURATION", &spec.service.name)
        .env("K_REVISION", &spec.name)
        .env("MECHA_REPLICA", replica)
        .envs(bound.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // The guard must hear of Mecha's death with a signal it can act on; a bare replica is
    // simply killed.
    die_with_parent(
        &mut command,
        if guard.is_some() {
            Signal::TERM
        } else {
            Signal::KILL
        },
    );
    command.spawn()
}

/// Has the kernel send `signal` to the replica when Mecha dies, even by SIGKILL.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command, signal: Signal) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec. It only makes the prctl and
    // getppid system calls, which are async-signal-safe, and allocates nothing (errors are
    // raw OS errors).
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(signal))?;
            // The parent may have died between fork and prctl: then nobody would kill us.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(
                    rustix::io::Errno::SRCH.raw_os_error(),
                ));
            }
            Ok(())
        });
    }
}

/// The command a guard runs: the guard's first child, or the guard itself while it has none.
fn guarded_pid(guard: u32) -> u32 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{guard}/task")) else {
        return guard;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .find_map(|children| children.split_whitespace().next()?.parse().ok())
        .unwrap_or(guard)
}

/// Signals a replica's whole process group (its pid is the group id); a group that is already
/// gone is fine.
fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leased_port_is_not_given_to_another_replica_until_released() {
        let ports = Arc::default();
        // The kernel handing out the same port twice in a row, then another one.
        let mut offered = [40_001, 40_001, 40_003].into_iter();
        let mut next = || Ok(offered.next().expect("asked for more ports than offered"));
        let first = PortLease::take(&ports, &mut next).expect("first");
        let second = PortLease::take(&ports, &mut next).expect("second");
        assert_eq!((first.port, second.port), (40_001, 40_003));

        drop(first);
        let again = PortLease::take(&ports, || Ok(40_001)).expect("released port");
        assert_eq!(again.port, 40_001);
        let error = PortLease::take(&ports, || Ok(40_003)).expect_err("always leased");
        assert!(
            error
                .to_string()
                .contains("already given to other replicas"),
            "{error}"
        );
        drop((again, second));
        assert!(lock(&ports).is_empty());
    }
}
