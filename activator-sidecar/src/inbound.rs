//! The inbound role (Knative's queue-proxy): in front of one user container, on the serving
//! port. It enforces `containerConcurrency` — at most CC requests reach the container at once,
//! at most 10 × CC wait, the rest get 503 with `Retry-After` — probes the container's readiness
//! itself, answers Knative's `K-Network-Probe` requests, and keeps the time-weighted
//! concurrency and request rate the autoscaler scales on (exported on `/metrics`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use mecha_common::admin::Health;
use mecha_common::auth::ClientToken;
use mecha_common::probe::{ProbeKind, ProbeSpec};
use mecha_common::routing::{ServiceKey, UpstreamProtocol};
use mecha_common::wire::Stat;
use mecha_common::{Endpoint, LoadGuard};
use prometheus::{Gauge, IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{ProxyBody, full};
use crate::discovery::{self, ControlPlane};
use crate::error::Failure;
use crate::error::ProxyError;
use crate::h1::{Answer, Decision, Role, codec::RequestHead};
use crate::proxy::Forwarder;
use crate::rules::{HopPolicy, TrustedProxies};
use crate::settings::{self, ConfigError};

/// Knative's queue depth per allowed concurrent request.
pub const QUEUE_DEPTH_PER_SLOT: u32 = 10;

/// The inbound role's settings, read from the environment like Knative's queue-proxy (flags
/// of the binary set the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct InboundConfig {
    /// `QUEUE_SERVING_PORT` (8012): where requests for the container arrive.
    pub serving_port: u16,
    /// `QUEUE_ADMIN_PORT` (8022): `/live`, `/ready`, `/metrics`.
    pub admin_port: u16,
    /// `USER_PORT` (8080): where the container listens, on 127.0.0.1.
    pub user_port: u16,
    /// `CONTAINER_CONCURRENCY` (0 = unlimited).
    pub container_concurrency: u32,
    /// `REVISION_TIMEOUT_SECONDS` (300): longest a request may take.
    pub timeout: Duration,
    /// `SERVING_READINESS_PATH`: probe the container with an HTTP GET of this path; a TCP
    /// connect when unset.
    pub readiness_path: Option<String>,
    /// `DRAIN_TIMEOUT` (30s): how long in-flight requests may take after SIGTERM.
    pub drain_timeout: Duration,
    /// `SERVING_NAMESPACE`, `SERVING_SERVICE`: named in error messages.
    pub service: ServiceKey,
    /// `SIDECAR_THREADS` (the CPUs this process may use): threads serving requests, each
    /// with connections of its own.
    pub threads: usize,
    /// `AUTOSCALER_ADDR` (`host:port`): where to post the load every second; with it,
    /// `SERVING_REVISION` is required and `POD_NAME` names this replica.
    pub report: Option<Report>,
    /// `SIDECAR_TRUSTED_PROXIES` (`private`): peers whose forwarding headers are extended
    /// rather than replaced. The inbound role sits behind the gateway or a meshed caller, in
    /// the cluster's own networks, so by default it believes loopback and private addresses.
    pub trusted_proxies: TrustedProxies,
    /// `SIDECAR_FAST_PATH` (`true`): relay plain HTTP/1.1 on the fast path, or every request
    /// through hyper.
    pub fast_path: bool,
    /// `SIDECAR_HEADER_READ_TIMEOUT`, `SIDECAR_IDLE_TIMEOUT`, `SIDECAR_MAX_CONNECTIONS`.
    pub limits: crate::limits::Limits,
}

/// Where and as what the sidecar reports its load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub autoscaler: String,
    pub revision: String,
    pub replica: String,
    /// `AUTOSCALER_TOKEN` or `AUTOSCALER_TOKEN_FILE`: the autoscaler's credential.
    pub token: Option<ClientToken>,
}

/// The running inbound proxy.
#[derive(Debug, Clone)]
pub struct Inbound {
    config: Arc<InboundConfig>,
    user: Endpoint,
    released: Arc<Notify>,
    queued: Arc<AtomicU32>,
    forwarder: Forwarder,
    policy: Arc<HopPolicy>,
    health: Health,
    metrics: Metrics,
}

#[derive(Debug, Clone)]
struct Metrics {
    requests: IntCounterVec,
    /// `requests` for 200, looked up once: most answers are.
    ok: IntCounter,
    concurrency: Gauge,
    rps: Gauge,
}

// === impl InboundConfig ===

impl InboundConfig {
    /// Reads every setting through `get` (the environment, or a map in tests).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let port = settings::port;
        let serving_port = settings::number(&get, "QUEUE_SERVING_PORT", 8012u16, port)?;
        let admin_port = settings::number(&get, "QUEUE_ADMIN_PORT", 8022u16, port)?;
        let user_port = settings::number(&get, "USER_PORT", 8080u16, port)?;
        for (setting, value) in [("QUEUE_ADMIN_PORT", admin_port), ("USER_PORT", user_port)] {
            if value == serving_port {
                return Err(ConfigError {
                    setting,
                    value: value.to_string(),
                    reason: "must differ from QUEUE_SERVING_PORT".into(),
                });
            }
        }
        let container_concurrency = settings::number(&get, "CONTAINER_CONCURRENCY", 0u32, |cc| {
            if *cc > 1000 {
                Err("must be between 0 and 1000".into())
            } else {
                Ok(())
            }
        })?;
        let timeout = settings::number(&get, "REVISION_TIMEOUT_SECONDS", 300u64, |t| {
            if (1..=600).contains(t) {
                Ok(())
            } else {
                Err("must be between 1 and 600".into())
            }
        })?;
        let readiness_path = get("SERVING_READINESS_PATH");
        if let Some(path) = &readiness_path
            && !path.starts_with('/')
        {
            return Err(ConfigError {
                setting: "SERVING_READINESS_PATH",
                value: path.clone(),
                reason: "must start with '/'".into(),
            });
        }
        let drain_timeout = settings::duration(&get, "DRAIN_TIMEOUT", Duration::from_secs(30))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = settings::number(&get, "SIDECAR_THREADS", cpus, |t| {
            if (1..=256).contains(t) {
                Ok(())
            } else {
                Err("must be between 1 and 256".into())
            }
        })?;
        let report = match get("AUTOSCALER_ADDR") {
            None => None,
            Some(addr) => {
                settings::host_port("AUTOSCALER_ADDR", &addr)?;
                let revision = get("SERVING_REVISION")
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| ConfigError {
                        setting: "SERVING_REVISION",
                        value: String::new(),
                        reason:
                            "required with AUTOSCALER_ADDR: the revision the load is reported for"
                                .into(),
                    })?;
                let replica =
                    get("POD_NAME").unwrap_or_else(|| format!("{revision}-{}", std::process::id()));
                // In a cluster the autoscaler's tables name revisions by namespace too.
                let key = get("SERVING_REVISION_KEY")
                    .filter(|k| !k.is_empty())
                    .unwrap_or(revision);
                Some(Report {
                    autoscaler: addr,
                    revision: key,
                    replica,
                    token: discovery::autoscaler_token(&get)?,
                })
            }
        };
        let trusted_proxies = settings::trusted_proxies(&get, TrustedProxies::private())?;
        let fast_path = settings::flag(&get, "SIDECAR_FAST_PATH", true)?;
        let limits = settings::limits(&get)?;
        Ok(Self {
            report,
            trusted_proxies,
            fast_path,
            limits,
            serving_port,
            admin_port,
            user_port,
            container_concurrency,
            timeout: Duration::from_secs(timeout),
            readiness_path,
            drain_timeout,
            threads,
            service: ServiceKey::new(
                get("SERVING_NAMESPACE").unwrap_or_else(|| "default".into()),
                get("SERVING_SERVICE").unwrap_or_else(|| "unknown".into()),
            ),
        })
    }

    /// The settings and their flags, for `--help` and for mapping flags to settings.
    pub const SETTINGS: &'static [(&'static str, &'static str, &'static str)] = &[
        (
            "--serving-port",
            "QUEUE_SERVING_PORT",
            "where requests arrive (8012)",
        ),
        (
            "--admin-port",
            "QUEUE_ADMIN_PORT",
            "/live, /ready, /metrics (8022)",
        ),
        (
            "--user-port",
            "USER_PORT",
            "the container's port on 127.0.0.1 (8080)",
        ),
        (
            "--container-concurrency",
            "CONTAINER_CONCURRENCY",
            "requests at once, 0 = unlimited (0)",
        ),
        (
            "--timeout-seconds",
            "REVISION_TIMEOUT_SECONDS",
            "longest request (300)",
        ),
        (
            "--readiness-path",
            "SERVING_READINESS_PATH",
            "HTTP probe path (TCP probe when unset)",
        ),
        (
            "--drain-timeout",
            "DRAIN_TIMEOUT",
            "time for in-flight requests after SIGTERM (30s)",
        ),
        (
            "--threads",
            "SIDECAR_THREADS",
            "threads serving requests (one per CPU)",
        ),
        (
            "--autoscaler-addr",
            "AUTOSCALER_ADDR",
            "host:port to post load to every second (off)",
        ),
        (
            "--revision",
            "SERVING_REVISION",
            "the revision reported for (with AUTOSCALER_ADDR)",
        ),
        (
            "--revision-key",
            "SERVING_REVISION_KEY",
            "the revision's key in the autoscaler's tables, when not its name (in a cluster: NAMESPACE/REVISION)",
        ),
        ("--pod-name", "POD_NAME", "this replica's name in reports"),
        discovery::TOKEN_FILE_HELP,
        (
            "--trusted-proxies",
            "SIDECAR_TRUSTED_PROXIES",
            "address[/prefix],... whose forwarding headers are believed; none; private (private)",
        ),
        settings::FAST_PATH_HELP,
        (
            "--namespace",
            "SERVING_NAMESPACE",
            "named in errors (default)",
        ),
        ("--service", "SERVING_SERVICE", "named in errors"),
    ];

    /// Settings from `--flag value` pairs over the environment's; an unknown flag is an error.
    pub fn from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_env(settings::overlay(args, Self::SETTINGS, env)?)
    }
}

// === impl Inbound ===

impl Inbound {
    pub fn new(config: InboundConfig, health: Health, registry: &Registry) -> Self {
        let released = Arc::new(Notify::new());
        let user = Endpoint::new(
            "user-container",
            SocketAddr::from(([127, 0, 0, 1], config.user_port)),
            released.clone(),
        );
        let policy = Arc::new(HopPolicy {
            trusted: config.trusted_proxies.clone(),
            start_trace: false,
        });
        Self {
            config: Arc::new(config),
            user,
            released,
            queued: Arc::default(),
            forwarder: Forwarder::new(),
            policy,
            health,
            metrics: Metrics::register(registry),
        }
    }

    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        // Knative's network probes ask the queue-proxy itself, not the container.
        if request.headers().contains_key("k-network-probe") {
            let (status, body) = self.probe_answer();
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            return response;
        }
        let response = match self.forward(request, peer).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        };
        self.metrics.count(response.status());
        response
    }

    /// The answer to a `K-Network-Probe`: whether this sidecar (and its container) is ready.
    fn probe_answer(&self) -> (StatusCode, &'static str) {
        if self.health.is_ready() {
            (StatusCode::OK, "queue")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready")
        }
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let deadline = Instant::now() + self.config.timeout;
        let guard = self.admit(deadline).await?;
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Either::Left(body));
        let service = &self.config.service;
        let forwarded = tokio::time::timeout_at(
            deadline,
            self.forwarder.forward(
                request,
                &self.user,
                guard,
                UpstreamProtocol::Http1,
                peer,
                &self.policy,
                deadline,
            ),
        )
        .await
        .map_err(|_| ProxyError::Timeout {
            service: service.clone(),
            timeout: self.config.timeout,
        })?;
        forwarded.map_err(|failure| {
            ProxyError::from_failure(service.clone(), self.config.timeout, failure)
        })
    }

    /// A slot at the container: at once when fewer than CC requests are in flight, else after
    /// waiting in a queue of at most 10 × CC; 503 when the queue is full, 504 at the deadline.
    async fn admit(&self, deadline: Instant) -> Result<LoadGuard, ProxyError> {
        let limit = self.config.container_concurrency;
        if let Some(guard) = self.user.try_track(limit) {
            return Ok(guard);
        }
        let depth = limit * QUEUE_DEPTH_PER_SLOT;
        if self.queued.fetch_add(1, Ordering::AcqRel) >= depth {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::Overloaded {
                service: self.config.service.clone(),
                queue: depth,
            });
        }
        let result = loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(guard) = self.user.try_track(limit) {
                break Ok(guard);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    break Err(ProxyError::Timeout {
                        service: self.config.service.clone(),
                        timeout: self.config.timeout,
                    });
                }
            }
        };
        self.queued.fetch_sub(1, Ordering::AcqRel);
        result
    }

    /// Probes the container until ready (every 5 ms at first), marks the sidecar ready, then
    /// re-probes every second: three failures in a row make it unready until it passes again.
    /// Also samples the load for `/metrics` every second. Runs until dropped.
    pub async fn run_background(self) {
        let mut probe = ProbeSpec::tcp();
        if let Some(path) = &self.config.readiness_path {
            probe.kind = ProbeKind::Http {
                path: path.clone(),
                headers: vec![],
            };
        }
        probe.period = None;
        let started = Instant::now();
        let sampler = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let reporter = self.config.report.as_ref().map(Reporter::new);
            loop {
                tick.tick().await;
                let sample = self.user.sample();
                self.metrics.concurrency.set(sample.concurrency);
                if sample.seconds > 0.0 {
                    self.metrics
                        .rps
                        .set(sample.requests as f64 / sample.seconds);
                    if let Some(reporter) = &reporter {
                        reporter.send(sample).await;
                    }
                }
            }
        };
        let prober = async {
            let addr = self.user.addr;
            loop {
                while !probe.check(addr).await {
                    tokio::time::sleep(probe.startup_period(started.elapsed())).await;
                }
                tracing::info!(%addr, "user container ready");
                self.health.set_ready(true);
                let mut failures = 0;
                while failures < probe.failure_threshold {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    failures = if probe.check(addr).await {
                        0
                    } else {
                        failures + 1
                    };
                }
                tracing::warn!(%addr, "user container failed readiness");
                self.health.set_ready(false);
            }
        };
        tokio::join!(sampler, prober);
    }

    pub fn config(&self) -> &InboundConfig {
        &self.config
    }
}

/// Plain HTTP/1.1 requests take the fast path: admitted like any other, relayed over one
/// container connection per client connection.
impl Role for Inbound {
    type Ticket = LoadGuard;

    const NEEDS_HOST: bool = false;

    fn policy(&self) -> &HopPolicy {
        &self.policy
    }

    async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        Inbound::handle(self, request, peer).await
    }

    async fn dispatch(&self, head: &RequestHead, _retry: &[SocketAddr]) -> Decision<LoadGuard> {
        if head.probe {
            let (status, body) = self.probe_answer();
            return Decision::Answer(Answer::new(status, body));
        }
        let deadline = Instant::now() + self.config.timeout;
        match self.admit(deadline).await {
            Ok(guard) => Decision::Forward {
                addr: self.user.addr,
                deadline,
                ticket: guard,
            },
            Err(error) => Decision::Answer(Answer::from(&error)),
        }
    }

    /// One container behind this sidecar: nothing to eject it in favour of.
    fn replied(&self, _guard: &LoadGuard, _reply: Result<(), &Failure>) {}

    fn failed(&self, _guard: &LoadGuard, failure: Failure) -> ProxyError {
        ProxyError::from_failure(self.config.service.clone(), self.config.timeout, failure)
    }

    fn finished(&self, _guard: Option<LoadGuard>, status: StatusCode) {
        self.metrics.count(status);
    }
}

/// Posts the load to the autoscaler, once a second, over a kept-alive connection.
#[derive(Debug)]
struct Reporter {
    report: Report,
    control: ControlPlane,
    failing: AtomicBool,
}

impl Reporter {
    fn new(report: &Report) -> Self {
        if report.token.is_none() {
            tracing::warn!(
                autoscaler = %report.autoscaler,
                "no AUTOSCALER_TOKEN or AUTOSCALER_TOKEN_FILE: an autoscaler that wants a credential (mecha up does) will refuse the load reports"
            );
        }
        Self {
            control: ControlPlane::new(report.autoscaler.clone(), report.token.clone()),
            report: report.clone(),
            failing: AtomicBool::new(false),
        }
    }

    async fn send(&self, sample: mecha_common::LoadSample) {
        let stat = Stat::new(&self.report.revision, &self.report.replica, sample);
        let outcome = self.control.send_stats(&[stat]).await;
        // Say so once when reporting starts failing and once when it recovers, not every second.
        match outcome {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(autoscaler = %self.report.autoscaler, "reporting load again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(autoscaler = %self.report.autoscaler, %error, "cannot report load");
                }
            }
        }
    }
}

// === impl Metrics ===

impl Metrics {
    fn count(&self, status: StatusCode) {
        if status == StatusCode::OK {
            self.ok.inc();
        } else {
            self.requests.with_label_values(&[status.as_str()]).inc();
        }
    }

    fn register(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "mecha_inbound_requests_total",
                "Requests answered by the inbound sidecar",
            ),
            &["code"],
        )
        .expect("valid metric");
        let concurrency = Gauge::new(
            "mecha_inbound_concurrency",
            "Requests in flight at the container, time-weighted over the last second",
        )
        .expect("valid metric");
        let rps = Gauge::new(
            "mecha_inbound_requests_per_second",
            "Requests that reached the container over the last second",
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(concurrency.clone()));
        let _ = registry.register(Box::new(rps.clone()));
        Self {
            ok: requests.with_label_values(&["200"]),
            requests,
            concurrency,
            rps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn defaults_are_knatives() {
        let config = InboundConfig::from_env(env(&[])).expect("defaults");
        assert_eq!(
            (config.serving_port, config.admin_port, config.user_port),
            (8012, 8022, 8080)
        );
        assert_eq!(config.container_concurrency, 0);
        assert_eq!(config.timeout, Duration::from_secs(300));
    }

    #[test]
    fn bad_settings_are_named() {
        let error = InboundConfig::from_env(env(&[("USER_PORT", "http")])).expect_err("bad");
        assert_eq!(error.to_string(), "USER_PORT=\"http\": not a valid number");
        let error =
            InboundConfig::from_env(env(&[("CONTAINER_CONCURRENCY", "5000")])).expect_err("bad");
        assert!(
            error
                .to_string()
                .starts_with("CONTAINER_CONCURRENCY=\"5000\": must be between")
        );
        let error = InboundConfig::from_env(env(&[("USER_PORT", "8012")])).expect_err("clash");
        assert_eq!(error.setting, "USER_PORT");
        let error = InboundConfig::from_env(env(&[("DRAIN_TIMEOUT", "soon")])).expect_err("bad");
        assert_eq!(error.setting, "DRAIN_TIMEOUT");
        let error = InboundConfig::from_env(env(&[("SIDECAR_THREADS", "0")])).expect_err("bad");
        assert_eq!(error.setting, "SIDECAR_THREADS");
    }

    #[test]
    fn reporting_needs_the_revision() {
        let error = InboundConfig::from_env(env(&[("AUTOSCALER_ADDR", "127.0.0.1:8081")]))
            .expect_err("no revision");
        assert_eq!(error.setting, "SERVING_REVISION");
        let error =
            InboundConfig::from_env(env(&[("AUTOSCALER_ADDR", "nowhere")])).expect_err("bad addr");
        assert_eq!(error.setting, "AUTOSCALER_ADDR");
        let config = InboundConfig::from_env(env(&[
            ("AUTOSCALER_ADDR", "autoscaler:8081"),
            ("SERVING_REVISION", "hello-00001"),
            ("POD_NAME", "pod-a"),
        ]))
        .expect("ok");
        assert_eq!(
            config.report,
            Some(Report {
                autoscaler: "autoscaler:8081".into(),
                revision: "hello-00001".into(),
                replica: "pod-a".into(),
                token: None,
            })
        );
        // In a cluster the load is reported under the revision's key.
        let config = InboundConfig::from_env(env(&[
            ("AUTOSCALER_ADDR", "autoscaler:8081"),
            ("SERVING_REVISION", "hello-00001"),
            ("SERVING_REVISION_KEY", "staging/hello-00001"),
        ]))
        .expect("ok");
        let report = config.report.expect("reporting");
        assert_eq!(report.revision, "staging/hello-00001");
        assert!(
            report.replica.starts_with("hello-00001-"),
            "{}",
            report.replica
        );
    }

    #[test]
    fn flags_override_the_environment() {
        let args: Vec<String> = ["--user-port", "9000", "--container-concurrency=2"]
            .iter()
            .map(ToString::to_string)
            .collect();
        let config =
            InboundConfig::from_args_and_env(&args, env(&[("USER_PORT", "7000")])).expect("ok");
        assert_eq!((config.user_port, config.container_concurrency), (9000, 2));
        let error =
            InboundConfig::from_args_and_env(&["--nope".into()], env(&[])).expect_err("unknown");
        assert_eq!(error.value, "--nope");
    }
}
