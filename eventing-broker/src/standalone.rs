//! The broker on its own (feature `standalone`, the `eventing-broker` binary): the ingress on a
//! port of its own, its triggers' deliveries, the event log from `BROKER_EVENT_LOG`, and the
//! Brokers and Triggers read from the control plane (`GET /api/v1/eventing/watch` on
//! `AUTOSCALER_ADDR`, with the sidecars' credential settings), like the sidecars read routes.
//!
//! - **Several replicas** on one JetStream log share each trigger's durable pull consumer: the
//!   stream hands each event to one of them per trigger, and an event one replica took and did
//!   not acknowledge (it died, or drained) goes to another. An embedded log file serves one
//!   replica only (its lock refuses a second).
//! - **The control plane away**: the last Brokers and Triggers stay in force and the watch is
//!   opened again with backoff ([`activator_sidecar::discovery::follow`]). Until the first
//!   state has arrived and its triggers have their consumers, the ingress answers 503 with
//!   `Retry-After` and `/ready` says why.
//! - **Ready** when the log is reachable, the first state has arrived, and the runtime runs.
//! - **Drain** on SIGTERM: not ready, the ingress stops accepting and finishes the requests in
//!   flight (each answered once its events are stored), then the triggers take no more events,
//!   hand back what they took and did not start, and their deliveries in flight get the drain
//!   timeout; events still unacknowledged then are delivered again by another replica.
//!
//! The ingress is deliberately public (as Knative's broker ingress is: events come from
//! anywhere); it runs behind the data path's HTTP rules and limits (the sidecar's listener).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use activator_sidecar::answering::{Answer, Answering};
use activator_sidecar::discovery::{self, ControlPlane};
use activator_sidecar::h1::Whole;
use activator_sidecar::server;
use activator_sidecar::settings::{self, ConfigError};
use mecha_common::admin::Health;
use mecha_common::auth::ClientToken;
use mecha_common::budget::{BodyBudget, BodyError, BudgetSettings, Buffered};
use mecha_common::wire::EVENTING_WATCH_PATH;
use mecha_common::{Shutdown, ShutdownSignal};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::log::RedbOptions;
use crate::log::jetstream::{JetStreamConfig, JetStreamLog};
use crate::{BrokerConfig, EventBroker, EventLog, EventingState, RedbLog};

/// The binary's settings, from the environment or the equivalent flags.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// `BROKER_PORT` (8080): the ingress.
    pub port: u16,
    /// `BROKER_ADMIN_PORT` (8022): `/live`, `/ready`, `/metrics`.
    pub admin_port: u16,
    /// `BROKER_EVENT_LOG` (required).
    pub event_log: EventLogSetting,
    /// `AUTOSCALER_ADDR` (required): the control plane serving Brokers and Triggers.
    pub autoscaler: String,
    /// `AUTOSCALER_TOKEN` or `AUTOSCALER_TOKEN_FILE`.
    pub token: Option<ClientToken>,
    /// `BROKER_GATEWAY_ADDR` (`127.0.0.1:8080`): Service and Broker `ref`s are reached
    /// through the gateway, which wakes zero-scaled functions.
    pub gateway: String,
    /// `GATEWAY_DOMAIN` (`localhost`).
    pub domain: String,
    /// `BROKER_MAX_EVENT_SIZE` (1 MiB; 64 KiB to 16 MiB).
    pub max_event_size: usize,
    /// `BROKER_DELIVERY_CONCURRENCY` (32).
    pub delivery_concurrency: usize,
    /// `BROKER_DELIVERY_TIMEOUT` (60s): per attempt, when a trigger sets none.
    pub delivery_timeout: Duration,
    /// `BROKER_TAIL_BYTES` (4 MiB) and `BROKER_LOG_CACHE_BYTES` (2 MiB): the embedded log's
    /// memory (its in-memory tail of recent events, its page cache).
    pub redb: RedbOptions,
    /// The ingress listener: `SIDECAR_FAST_PATH` (`true`), `DRAIN_TIMEOUT` (30s: after
    /// SIGTERM, for ingress requests, then for deliveries), `SIDECAR_HEADER_READ_TIMEOUT`,
    /// `SIDECAR_IDLE_TIMEOUT`, `SIDECAR_BODY_READ_TIMEOUT`, `SIDECAR_MAX_CONNECTIONS`.
    pub serve: server::ServeOptions,
    /// `BROKER_BODY_BUDGET` (64 MiB) and `BROKER_BODY_TIMEOUT` (60s): the request bodies the
    /// ingress holds at once, and how long each may take to arrive.
    pub body_budget: BudgetSettings,
}

/// Where the events live.
#[derive(Debug, Clone, PartialEq)]
pub enum EventLogSetting {
    /// NATS JetStream: replicas share it.
    JetStream(JetStreamConfig),
    /// An embedded log file: one replica.
    File(std::path::PathBuf),
}

// === impl StandaloneConfig ===

impl StandaloneConfig {
    pub const SETTINGS: settings::Table = &[
        (
            "--port",
            "BROKER_PORT",
            "event ingress, POST /{namespace}/{broker}; public (8080)",
        ),
        (
            "--admin-port",
            "BROKER_ADMIN_PORT",
            "/live, /ready, /metrics (8022)",
        ),
        (
            "--event-log",
            "BROKER_EVENT_LOG",
            "nats://HOST:PORT[,...][?replicas=3&max-age=168h&ack-wait=30s...] (NATS JetStream, shared by replicas), or the path of an embedded log file (one replica) (required)",
        ),
        (
            "--autoscaler-addr",
            "AUTOSCALER_ADDR",
            "host:port of the control plane serving Brokers and Triggers, e.g. mecha up's admin address (required)",
        ),
        discovery::TOKEN_FILE_HELP,
        (
            "--gateway-addr",
            "BROKER_GATEWAY_ADDR",
            "host:port of the gateway, through which Service and Broker refs are reached (127.0.0.1:8080)",
        ),
        (
            "--domain",
            "GATEWAY_DOMAIN",
            "services answer on {name}.{namespace}.DOMAIN at the gateway (localhost)",
        ),
        (
            "--max-event-size",
            "BROKER_MAX_EVENT_SIZE",
            "largest request body in bytes, 65536 to 16777216 (1048576)",
        ),
        (
            "--body-budget",
            "BROKER_BODY_BUDGET",
            "bytes of request bodies the ingress holds at once, across connections; a body that would pass it gets 503 with Retry-After; from BROKER_MAX_EVENT_SIZE to 1073741824 (67108864)",
        ),
        (
            "--body-timeout",
            "BROKER_BODY_TIMEOUT",
            "time a request body may take to arrive whole, then 408 and its bytes are freed; 1s to 10m (60s)",
        ),
        (
            "--delivery-concurrency",
            "BROKER_DELIVERY_CONCURRENCY",
            "deliveries in flight per trigger (32)",
        ),
        (
            "--delivery-timeout",
            "BROKER_DELIVERY_TIMEOUT",
            "per-attempt timeout of a delivery whose trigger sets none (60s)",
        ),
        (
            "--drain-timeout",
            "DRAIN_TIMEOUT",
            "after SIGTERM: time for ingress requests, then for deliveries in flight (30s)",
        ),
        (
            "--tail-bytes",
            "BROKER_TAIL_BYTES",
            "embedded log: memory for recent events (each counts its length and 96 bytes), from which every trigger takes new events without reading the file, at most 1073741824 (4194304)",
        ),
        (
            "--log-cache-bytes",
            "BROKER_LOG_CACHE_BYTES",
            "embedded log: the store's page cache in bytes, 1048576 to 1073741824 (2097152)",
        ),
        settings::FAST_PATH_HELP,
    ];

    /// Reads the settings: flags over the environment `env`.
    pub fn from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_env(settings::overlay(args, Self::SETTINGS, env)?)
    }

    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let (port, admin_port) =
            settings::listener_ports(&get, ("BROKER_PORT", 8080), "BROKER_ADMIN_PORT")?;
        let event_log = match get("BROKER_EVENT_LOG") {
            None => {
                return Err(ConfigError {
                    setting: "BROKER_EVENT_LOG",
                    value: String::new(),
                    reason: "required: nats://HOST:PORT for NATS JetStream, or a file path for an embedded log".into(),
                });
            }
            Some(url) if url.starts_with("nats://") => {
                EventLogSetting::JetStream(JetStreamConfig::from_url(&url).map_err(|reason| {
                    ConfigError {
                        setting: "BROKER_EVENT_LOG",
                        value: url.clone(),
                        reason,
                    }
                })?)
            }
            Some(other) if other.contains("://") => {
                return Err(ConfigError {
                    setting: "BROKER_EVENT_LOG",
                    value: other,
                    reason: "only nats:// URLs and file paths are logs".into(),
                });
            }
            Some(path) => EventLogSetting::File(path.into()),
        };
        let autoscaler = settings::autoscaler_addr(&get, "the broker's Brokers and Triggers")?;
        let gateway = get("BROKER_GATEWAY_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into());
        settings::host_port("BROKER_GATEWAY_ADDR", &gateway)?;
        let max_event_size = settings::number(&get, "BROKER_MAX_EVENT_SIZE", 1usize << 20, |n| {
            crate::runtime::check_event_size(*n)
        })?;
        let body_budget = BudgetSettings::from_env(
            &get,
            "BROKER_BODY_BUDGET",
            "BROKER_BODY_TIMEOUT",
            max_event_size,
        )?;
        let delivery_concurrency =
            settings::number(&get, "BROKER_DELIVERY_CONCURRENCY", 32usize, |n| {
                if (1..=10_000).contains(n) {
                    Ok(())
                } else {
                    Err("must be between 1 and 10000".into())
                }
            })?;
        let delivery_timeout =
            settings::duration(&get, "BROKER_DELIVERY_TIMEOUT", Duration::from_secs(60))?;
        if delivery_timeout.is_zero() {
            return Err(ConfigError {
                setting: "BROKER_DELIVERY_TIMEOUT",
                value: "0".into(),
                reason: "must be more than zero".into(),
            });
        }
        Ok(Self {
            port,
            admin_port,
            event_log,
            autoscaler,
            token: discovery::autoscaler_token(&get)?,
            gateway,
            domain: get("GATEWAY_DOMAIN").unwrap_or_else(|| "localhost".into()),
            max_event_size,
            delivery_concurrency,
            delivery_timeout,
            redb: RedbOptions {
                tail_bytes: settings::number(
                    &get,
                    "BROKER_TAIL_BYTES",
                    RedbOptions::default().tail_bytes,
                    |n| {
                        if *n <= 1 << 30 {
                            Ok(())
                        } else {
                            Err("must be at most 1073741824 (1 GiB)".into())
                        }
                    },
                )?,
                cache_bytes: settings::number(
                    &get,
                    "BROKER_LOG_CACHE_BYTES",
                    RedbOptions::default().cache_bytes,
                    |n| {
                        if (1 << 20..=1 << 30).contains(n) {
                            Ok(())
                        } else {
                            Err("must be between 1048576 and 1073741824 (1 GiB)".into())
                        }
                    },
                )?,
                ..RedbOptions::default()
            },
            serve: settings::serving(&get)?,
            body_budget,
        })
    }
}

/// Runs the broker on `ingress` and `admin` until `stop` resolves, then drains (see the
/// module's documentation). An error is a start-up failure, said in full.
pub async fn run(
    config: StandaloneConfig,
    ingress: TcpListener,
    admin: TcpListener,
    stop: impl Future<Output = ()>,
) -> Result<(), String> {
    let gateway = resolve_gateway(&config.gateway).await?;
    let own_ingress = ingress
        .local_addr()
        .map_err(|e| format!("the ingress listener's address: {e}"))?;
    let log = open_log(&config.event_log, config.redb).await?;
    let registry = Registry::new();
    let health = Health::default();
    let (state_tx, state_rx) = watch::channel(Arc::new(EventingState::default()));
    let broker = EventBroker::new(
        log,
        state_rx,
        BrokerConfig {
            max_event_size: config.max_event_size,
            default_timeout: config.delivery_timeout,
            concurrency: config.delivery_concurrency,
            ingress: gateway,
            // A Broker `ref` is this broker's own ingress: every replica shares the log.
            broker_ingress: Some(SocketAddr::from(([127, 0, 0, 1], own_ingress.port()))),
            domain: config.domain.clone(),
            drain_timeout: config.serve.drain_timeout,
        },
        &registry,
    );
    health.add_check({
        let broker = broker.clone();
        move || broker.problem().map(|why| format!("event log: {why}"))
    });
    let configured = Arc::new(AtomicBool::new(false));
    health.add_check({
        let (configured, autoscaler) = (configured.clone(), config.autoscaler.clone());
        move || {
            (!configured.load(Ordering::Acquire)).then(|| {
                format!("no Brokers and Triggers from the control plane at {autoscaler} yet")
            })
        }
    });

    let (admin_stop, ingress_stop, broker_stop, watch_stop) = (
        Shutdown::new(),
        Shutdown::new(),
        Shutdown::new(),
        Shutdown::new(),
    );
    mecha_common::memory::release_after_bursts(admin_stop.signal());
    let admin_task = tokio::spawn(mecha_common::serve::serve_admin(
        admin,
        health.clone(),
        registry.clone(),
        admin_stop.signal(),
    ));
    let ingress_task = tokio::spawn(server::serve(
        ingress,
        Arc::new(Answering::new(
            Ingress(
                broker.clone(),
                BodyBudget::new("broker-ingress", config.body_budget, &registry),
            ),
            configured.clone(),
            "the broker has not received its Brokers and Triggers from the control plane yet\n",
        )),
        server::Workers::current(),
        ingress_stop.signal(),
        config.serve.clone(),
    ));
    if config.token.is_none() {
        tracing::warn!(autoscaler = %config.autoscaler, "no AUTOSCALER_TOKEN or AUTOSCALER_TOKEN_FILE: a control plane that wants a credential (mecha up does) will refuse this broker");
    }
    let (received_tx, mut received) = watch::channel(false);
    let watcher = tokio::spawn(follow_state(
        ControlPlane::new(config.autoscaler.clone(), config.token.clone()),
        state_tx,
        received_tx,
        watch_stop.signal(),
    ));
    health.set_ready(true);
    tracing::info!(
        ingress = config.port,
        admin = config.admin_port,
        autoscaler = %config.autoscaler,
        "eventing broker starting; waiting for Brokers and Triggers"
    );

    tokio::pin!(stop);
    // The triggers start with the first state, and the ingress takes events only once they
    // have their consumers: an event accepted before would fall before a new trigger's start.
    let first = tokio::select! {
        _ = received.wait_for(|received| *received) => true,
        () = &mut stop => false,
    };
    let mut runtime = None;
    let mut failure = None;
    if first {
        let mut task = broker.clone().start(broker_stop.signal()).await;
        configured.store(true, Ordering::Release);
        tracing::info!("Brokers and Triggers received; taking events");
        tokio::select! {
            () = &mut stop => runtime = Some(task),
            ended = &mut task => {
                // The runtime never ends by itself: not ready, said, and stopped as on
                // SIGTERM, so that the platform starts a fresh process.
                let why = match ended {
                    Err(error) if error.is_panic() => "the broker runtime panicked",
                    _ => "the broker runtime stopped unexpectedly",
                };
                tracing::error!(reason = why, "stopping");
                health.set_problem("runtime", Some(why.to_string()));
                failure = Some(why.to_string());
            }
        }
    }
    drain(
        &health,
        &ingress_stop,
        ingress_task,
        &broker_stop,
        runtime,
        &watch_stop,
        watcher,
        &admin_stop,
        admin_task,
    )
    .await;
    failure.map_or(Ok(()), Err)
}

/// Stops in order: not ready; the ingress drains; the triggers drain and the log closes; the
/// watch and the admin endpoints go last.
#[allow(clippy::too_many_arguments)]
async fn drain(
    health: &Health,
    ingress_stop: &Shutdown,
    ingress_task: tokio::task::JoinHandle<()>,
    broker_stop: &Shutdown,
    runtime: Option<tokio::task::JoinHandle<()>>,
    watch_stop: &Shutdown,
    watcher: tokio::task::JoinHandle<()>,
    admin_stop: &Shutdown,
    admin_task: tokio::task::JoinHandle<()>,
) {
    tracing::info!("draining: the ingress finishes its requests, then the deliveries in flight");
    health.set_ready(false);
    ingress_stop.trigger();
    let _ = ingress_task.await;
    broker_stop.trigger();
    if let Some(runtime) = runtime {
        let _ = runtime.await;
    }
    watch_stop.trigger();
    let _ = watcher.await;
    admin_stop.trigger();
    let _ = admin_task.await;
    tracing::info!("stopped");
}

/// Keeps `state` current from the control plane; `received` turns true with the first state.
/// Resources that fail validation are left out, and said (once per change of what is wrong).
async fn follow_state(
    control: ControlPlane,
    state: watch::Sender<Arc<EventingState>>,
    received: watch::Sender<bool>,
    shutdown: ShutdownSignal,
) {
    let mut said = Vec::new();
    discovery::follow(
        control,
        EVENTING_WATCH_PATH,
        "Brokers and Triggers",
        |line| {
            let next: EventingState =
                serde_json::from_slice(line).map_err(|e| format!("bad eventing state: {e}"))?;
            let (next, problems) = next.validated();
            if problems != said {
                for problem in &problems {
                    tracing::error!(%problem, "the control plane sent a resource that is not valid; it is left out");
                }
                said = problems;
            }
            state.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    tracing::info!(
                        brokers = next.brokers.len(),
                        triggers = next.triggers.len(),
                        "Brokers and Triggers updated"
                    );
                    *current = Arc::new(next);
                }
                changed
            });
            received.send_replace(true);
            Ok(())
        },
        shutdown,
    )
    .await;
}

/// The gateway's address, looked up once (a Kubernetes Service's name resolves to its stable
/// cluster IP).
async fn resolve_gateway(gateway: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(gateway)
        .await
        .map_err(|e| format!("BROKER_GATEWAY_ADDR={gateway}: cannot resolve it: {e}"))?
        .next()
        .ok_or_else(|| format!("BROKER_GATEWAY_ADDR={gateway}: resolves to no address"))
}

async fn open_log(
    setting: &EventLogSetting,
    redb: RedbOptions,
) -> Result<Arc<dyn EventLog>, String> {
    match setting {
        EventLogSetting::JetStream(config) => {
            let servers = config.servers.clone();
            let log = JetStreamLog::connect(config.clone())
                .await
                .map_err(|e| format!("BROKER_EVENT_LOG={servers}: {e}"))?;
            Ok(Arc::new(log))
        }
        EventLogSetting::File(path) => {
            let log =
                RedbLog::open_with(path, redb).map_err(|e| format!("BROKER_EVENT_LOG: {e}"))?;
            Ok(Arc::new(log))
        }
    }
}

/// The ingress port: every request is answered by the broker's ingress, after the data
/// path's rules and limits — on the fast path when its body is framed by `Content-Length`,
/// by hyper otherwise; the same functions either way.
struct Ingress(EventBroker, BodyBudget);

impl Answer for Ingress {
    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        crate::ingress::handle(&self.0, &self.1, request).await
    }

    fn before_body(&self, parts: &http::request::Parts) -> Whole<'_> {
        match crate::ingress::route(&self.0, parts) {
            None => Whole::Read {
                budget: &self.1,
                max: self.0.config().max_event_size,
            },
            Some(response) => Whole::Answer(response),
        }
    }

    async fn answer_whole(
        &self,
        parts: http::request::Parts,
        body: Result<Buffered, BodyError>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        crate::ingress::answer(&self.0, parts, body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<StandaloneConfig, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        StandaloneConfig::from_env(move |key| env.get(key).cloned())
    }

    #[test]
    fn settings_have_defaults_and_every_error_names_its_setting() {
        let config = read(&[
            ("BROKER_EVENT_LOG", "nats://10.0.0.1:4222?replicas=3"),
            ("AUTOSCALER_ADDR", "mecha-autoscaler.mecha-system.svc:8080"),
        ])
        .expect("valid");
        assert_eq!((config.port, config.admin_port), (8080, 8022));
        let EventLogSetting::JetStream(js) = &config.event_log else {
            panic!("a nats:// log is JetStream");
        };
        assert_eq!(
            (js.servers.as_str(), js.replicas),
            ("nats://10.0.0.1:4222", 3)
        );
        assert_eq!(config.gateway, "127.0.0.1:8080");
        assert_eq!(config.max_event_size, 1 << 20);
        assert_eq!(config.delivery_concurrency, 32);
        assert_eq!(config.body_budget, BudgetSettings::default());
        assert_eq!(config.serve.drain_timeout, Duration::from_secs(30));
        assert!(config.token.is_none());

        let file = read(&[
            ("BROKER_EVENT_LOG", "/var/lib/broker/events.redb"),
            ("AUTOSCALER_ADDR", "127.0.0.1:8081"),
            ("BROKER_PORT", "9000"),
            ("DRAIN_TIMEOUT", "5s"),
        ])
        .expect("valid");
        assert_eq!(
            file.event_log,
            EventLogSetting::File("/var/lib/broker/events.redb".into())
        );
        assert_eq!(
            (file.port, file.serve.drain_timeout),
            (9000, Duration::from_secs(5))
        );

        let base = [
            ("BROKER_EVENT_LOG", "nats://127.0.0.1:4222"),
            ("AUTOSCALER_ADDR", "127.0.0.1:8081"),
        ];
        for (setting, value) in [
            ("BROKER_EVENT_LOG", "nats://x:1?replicas=9"),
            ("BROKER_EVENT_LOG", "kafka://x:1"),
            ("AUTOSCALER_ADDR", "no-port"),
            ("BROKER_ADMIN_PORT", "8080"),
            ("BROKER_MAX_EVENT_SIZE", "1000"),
            ("BROKER_MAX_EVENT_SIZE", "16777217"),
            ("BROKER_MAX_EVENT_SIZE", "18446744073709551615"),
            ("BROKER_TAIL_BYTES", "1073741825"),
            ("BROKER_LOG_CACHE_BYTES", "1000"),
            ("BROKER_LOG_CACHE_BYTES", "1073741825"),
            ("BROKER_DELIVERY_CONCURRENCY", "0"),
            ("BROKER_BODY_BUDGET", "1048575"),
            ("BROKER_BODY_BUDGET", "1073741825"),
            ("BROKER_BODY_TIMEOUT", "0s"),
            ("BROKER_GATEWAY_ADDR", "gateway"),
            ("DRAIN_TIMEOUT", "soon"),
            ("AUTOSCALER_TOKEN", "short"),
        ] {
            let mut pairs = base.to_vec();
            pairs.retain(|(k, _)| *k != setting);
            pairs.push((setting, value));
            let error = read(&pairs).expect_err(value);
            assert_eq!(error.setting, setting, "{error}");
        }
        for missing in ["BROKER_EVENT_LOG", "AUTOSCALER_ADDR"] {
            let pairs: Vec<_> = base
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            assert_eq!(read(&pairs).expect_err(missing).setting, missing);
        }
    }

    #[test]
    fn flags_override_the_environment() {
        let args: Vec<String> = ["--port", "9100", "--event-log=nats://127.0.0.1:1"]
            .iter()
            .map(ToString::to_string)
            .collect();
        let config = StandaloneConfig::from_args_and_env(&args, |key| match key {
            "BROKER_PORT" => Some("9000".into()),
            "BROKER_EVENT_LOG" => Some("/tmp/x.redb".into()),
            "AUTOSCALER_ADDR" => Some("127.0.0.1:8081".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(config.port, 9100);
        assert!(matches!(config.event_log, EventLogSetting::JetStream(_)));
        let unknown = StandaloneConfig::from_args_and_env(&["--colour".into()], |_| None);
        assert!(unknown.is_err());
        // Every setting has a flag and a row of help.
        let help = settings::help(StandaloneConfig::SETTINGS);
        for name in [
            "BROKER_EVENT_LOG",
            "AUTOSCALER_TOKEN_FILE",
            "DRAIN_TIMEOUT",
            "BROKER_BODY_BUDGET",
            "BROKER_BODY_TIMEOUT",
        ] {
            assert!(help.contains(name), "{name}");
        }
    }
}
