//! The importers on their own (feature `standalone`, the `importers` binary): the sources a
//! control plane streams (`GET /api/v1/sources/watch` on `AUTOSCALER_ADDR`, with the sidecars'
//! credential settings), each with the sink the control plane resolved, run by the same
//! [`Importers`] as `mecha up` runs them; the webhook receivers on a port of their own.
//!
//! - **What runs here**: PingSource, GitHubSource, GitLabSource, RedisStreamSource, NatsSource
//!   and MqttSource ([`runs_here`]). ContainerSource and SinkBinding are workloads (a
//!   Deployment of their own, env in the bound Services' pods) and ApiServerSource needs an API
//!   server to watch: the control plane streams them too, and they are left to whoever runs
//!   them (said once in the log).
//! - **One replica**: a PingSource fires once per tick per process, so two replicas would send
//!   each tick twice (with the same id, so a deduplicating receiver drops one; Knative's
//!   `pingsource-mt-adapter` elects a leader instead). Deployed with `replicas: 1`.
//! - **The control plane away**: the last sources keep running and the watch is opened again
//!   with backoff ([`activator_sidecar::discovery::follow_with`]); `/ready` says the watch is
//!   lost and why until a new session delivers a state. Until the first state, nothing runs
//!   and `/ready` says so.
//! - **Drain** on SIGTERM: not ready, the webhook listener stops accepting and finishes the
//!   requests in flight (each answered once the sink took its event, or not), then every
//!   source stops (queue sources acknowledge nothing they have not delivered).
//!
//! The webhook port is deliberately public (GitHub and GitLab post to it; each receiver checks
//! its provider's signature or token) and runs behind the data path's HTTP rules and limits
//! (the sidecar's listener); unknown paths get 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use activator_sidecar::answering::{Answer, Answering};
use activator_sidecar::discovery::{self, ControlPlane};
use activator_sidecar::server;
use activator_sidecar::settings::{self, ConfigError};
use crds::SourceResource;
use crds::sources::SourcesSnapshot;
use mecha_common::admin::Health;
use mecha_common::auth::ClientToken;
use mecha_common::budget::{BodyBudget, BudgetSettings};
use mecha_common::wire::SOURCES_WATCH_PATH;
use mecha_common::{Shutdown, ShutdownSignal};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{Importers, ImportersConfig, SourcesState};

/// The binary's settings, from the environment or the equivalent flags.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// `IMPORTERS_PORT` (8080): the webhook receivers.
    pub port: u16,
    /// `IMPORTERS_ADMIN_PORT` (8022): `/live`, `/ready`, `/metrics`.
    pub admin_port: u16,
    /// `AUTOSCALER_ADDR` (required): the control plane serving the sources.
    pub autoscaler: String,
    /// `AUTOSCALER_TOKEN` or `AUTOSCALER_TOKEN_FILE`.
    pub token: Option<ClientToken>,
    /// `IMPORTERS_WEBHOOK_BASE_URL`: where providers reach the webhook port, for the logs
    /// (`http://localhost:{port}`).
    pub webhook_base: String,
    /// The webhook listener: `SIDECAR_FAST_PATH` (`true`), `DRAIN_TIMEOUT` (30s: after
    /// SIGTERM, for webhook requests in flight), `SIDECAR_HEADER_READ_TIMEOUT`,
    /// `SIDECAR_IDLE_TIMEOUT`, `SIDECAR_BODY_READ_TIMEOUT`, `SIDECAR_MAX_CONNECTIONS`.
    pub serve: server::ServeOptions,
    /// `IMPORTERS_BODY_BUDGET` (64 MiB) and `IMPORTERS_BODY_TIMEOUT` (60s): the webhook bodies
    /// held at once (each read whole before its signature is checked), and how long each may
    /// take to arrive.
    pub body_budget: BudgetSettings,
}

// === impl StandaloneConfig ===

impl StandaloneConfig {
    pub const SETTINGS: settings::Table = &[
        (
            "--port",
            "IMPORTERS_PORT",
            "webhook receivers, POST /webhooks/{github|gitlab}/{namespace}/{name}; public, each checks its provider's signature (8080)",
        ),
        (
            "--admin-port",
            "IMPORTERS_ADMIN_PORT",
            "/live, /ready, /metrics (8022)",
        ),
        (
            "--autoscaler-addr",
            "AUTOSCALER_ADDR",
            "host:port of the control plane serving the sources and their sinks, e.g. mecha up's admin address (required)",
        ),
        discovery::TOKEN_FILE_HELP,
        (
            "--webhook-base-url",
            "IMPORTERS_WEBHOOK_BASE_URL",
            "where GitHub and GitLab reach the webhook port, as logged for each webhook source (http://localhost:PORT)",
        ),
        (
            "--body-budget",
            "IMPORTERS_BODY_BUDGET",
            "bytes of webhook bodies held at once, across connections (each is read whole before its signature is checked); a body that would pass it gets 503 with Retry-After; 4194304 to 1073741824 (67108864)",
        ),
        (
            "--body-timeout",
            "IMPORTERS_BODY_TIMEOUT",
            "time a webhook body may take to arrive whole, then 408 and its bytes are freed; 1s to 10m (60s)",
        ),
        (
            "--drain-timeout",
            "DRAIN_TIMEOUT",
            "after SIGTERM: time for webhook requests in flight (30s)",
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
            settings::listener_ports(&get, ("IMPORTERS_PORT", 8080), "IMPORTERS_ADMIN_PORT")?;
        let autoscaler = settings::autoscaler_addr(&get, "the importers' sources")?;
        let webhook_base = match get("IMPORTERS_WEBHOOK_BASE_URL") {
            None => format!("http://localhost:{port}"),
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                url.trim_end_matches('/').to_string()
            }
            Some(other) => {
                return Err(ConfigError {
                    setting: "IMPORTERS_WEBHOOK_BASE_URL",
                    value: other,
                    reason: "must be an http:// or https:// URL".into(),
                });
            }
        };
        Ok(Self {
            port,
            admin_port,
            autoscaler,
            token: discovery::autoscaler_token(&get)?,
            webhook_base,
            serve: settings::serving(&get)?,
            body_budget: BudgetSettings::from_env(
                &get,
                "IMPORTERS_BODY_BUDGET",
                "IMPORTERS_BODY_TIMEOUT",
                crate::webhook::DEFAULT_MAX_BODY,
            )?,
        })
    }
}

/// Whether the standalone importers run a source of this kind (see the module's
/// documentation for the others).
pub fn runs_here(source: &SourceResource) -> bool {
    !matches!(
        source,
        SourceResource::Container(_) | SourceResource::Binding(_) | SourceResource::ApiServer(_)
    )
}

/// Runs the importers on `webhooks` and `admin` until `stop` resolves, then drains (see the
/// module's documentation). An error is a start-up failure, said in full.
pub async fn run(
    config: StandaloneConfig,
    webhooks: TcpListener,
    admin: TcpListener,
    stop: impl Future<Output = ()>,
) -> Result<(), String> {
    let own = webhooks
        .local_addr()
        .map_err(|e| format!("the webhook listener's address: {e}"))?;
    let registry = Registry::new();
    let health = Health::default();
    let (state_tx, state_rx) = watch::channel(Arc::new(SourcesState::default()));
    let importers = Importers::new(
        state_rx,
        ImportersConfig {
            webhook_base: config.webhook_base.clone(),
            // Sinks come resolved from the control plane; this address is never sent to.
            ..ImportersConfig::new(SocketAddr::from(([127, 0, 0, 1], own.port())), "localhost")
        },
        &registry,
    );
    let received = Arc::new(AtomicBool::new(false));
    let autoscaler = config.autoscaler.clone();
    health.add_check({
        let (received, autoscaler) = (received.clone(), autoscaler.clone());
        move || {
            (!received.load(Ordering::Acquire))
                .then(|| format!("no sources from the control plane at {autoscaler} yet"))
        }
    });

    let (admin_stop, webhook_stop, sources_stop, watch_stop) = (
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
    if config.token.is_none() {
        tracing::warn!(%autoscaler, "no AUTOSCALER_TOKEN or AUTOSCALER_TOKEN_FILE: a control plane that wants a credential (mecha up does) will refuse the importers");
    }
    let (first_tx, mut first) = watch::channel(false);
    let watcher = tokio::spawn(follow_sources(
        ControlPlane::new(autoscaler.clone(), config.token.clone()),
        state_tx,
        first_tx,
        health.clone(),
        watch_stop.signal(),
    ));
    let webhook_task = tokio::spawn(server::serve(
        webhooks,
        Arc::new(Answering::new(
            Webhooks(
                importers.clone(),
                BodyBudget::new("webhooks", config.body_budget, &registry),
            ),
            received.clone(),
            "the importers have not received their sources from the control plane yet\n",
        )),
        server::Workers::current(),
        webhook_stop.signal(),
        config.serve.clone(),
    ));
    health.set_ready(true);
    tracing::info!(
        webhooks = config.port,
        admin = config.admin_port,
        %autoscaler,
        "importers starting; waiting for their sources"
    );

    tokio::pin!(stop);
    let started = tokio::select! {
        _ = first.wait_for(|first| *first) => true,
        () = &mut stop => false,
    };
    let mut runtime = None;
    let mut failure = None;
    if started {
        let mut task = importers.clone().start(sources_stop.signal());
        received.store(true, Ordering::Release);
        tracing::info!("sources received; running them");
        tokio::select! {
            () = &mut stop => runtime = Some(task),
            ended = &mut task => {
                // The runtime never ends by itself: not ready, said, and stopped as on
                // SIGTERM, so that the platform starts a fresh process.
                let why = match ended {
                    Err(error) if error.is_panic() => "the importers' runtime panicked",
                    _ => "the importers' runtime stopped unexpectedly",
                };
                tracing::error!(reason = why, "stopping");
                health.set_problem("runtime", Some(why.to_string()));
                failure = Some(why.to_string());
            }
        }
    }
    tracing::info!("draining: webhook requests in flight finish, then every source stops");
    health.set_ready(false);
    webhook_stop.trigger();
    let _ = webhook_task.await;
    sources_stop.trigger();
    if let Some(runtime) = runtime {
        let _ = runtime.await;
    }
    watch_stop.trigger();
    let _ = watcher.await;
    admin_stop.trigger();
    let _ = admin_task.await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// Keeps `state` current from the control plane; `first` turns true with the first state.
/// Sources that fail validation are left out, and said (once per change of what is wrong);
/// `/ready` says when the watch is lost, until a new session delivers a state.
async fn follow_sources(
    control: ControlPlane,
    state: watch::Sender<Arc<SourcesState>>,
    first: watch::Sender<bool>,
    health: Health,
    shutdown: ShutdownSignal,
) {
    let mut said = Vec::new();
    let mut elsewhere = Vec::new();
    let autoscaler = control.addr().to_string();
    let lost = health.clone();
    discovery::follow_with(
        control,
        SOURCES_WATCH_PATH,
        "sources",
        |line| {
            let snapshot: SourcesSnapshot =
                serde_json::from_slice(line).map_err(|e| format!("bad sources: {e}"))?;
            let mut problems = Vec::new();
            let mut others = Vec::new();
            let next = SourcesState::from_snapshot(snapshot, |source| {
                if !runs_here(source) {
                    others.push(format!(
                        "{} {}/{}",
                        source.kind(),
                        source.namespace(),
                        source.name()
                    ));
                    return false;
                }
                // The control plane checked it for its own mode (mecha up: local, a cluster:
                // Kubernetes, where a webhook's secret is a secretKeyRef): either will do.
                let errors = match source.validate(crds::Mode::Local) {
                    local if local.is_empty() => local,
                    _ => source.validate(crds::Mode::Kubernetes),
                };
                for error in &errors {
                    problems.push(format!(
                        "{} {}/{}: {error}",
                        source.kind(),
                        source.namespace(),
                        source.name()
                    ));
                }
                errors.is_empty()
            });
            if problems != said {
                for problem in &problems {
                    tracing::error!(%problem, "the control plane sent a source that is not valid; it is left out");
                }
                said = problems;
            }
            if others != elsewhere {
                if !others.is_empty() {
                    tracing::info!(sources = %others.join(", "), "left to their own workloads (ContainerSource, SinkBinding, ApiServerSource do not run in the importers)");
                }
                elsewhere = others;
            }
            state.send_if_modified(|current| {
                let changed = **current != next;
                if changed {
                    tracing::info!(sources = next.sources.len(), "sources updated");
                    *current = Arc::new(next);
                }
                changed
            });
            health.set_problem("watch", None);
            first.send_replace(true);
            Ok(())
        },
        |why| {
            lost.set_problem(
                "watch",
                Some(format!(
                    "the watch of sources at {autoscaler} is lost ({why}); the last sources keep running, retrying"
                )),
            );
        },
        shutdown,
    )
    .await;
}

/// The webhook port: every request is answered by the webhook receivers, after the data
/// path's rules and limits.
struct Webhooks(Importers, BodyBudget);

impl Answer for Webhooks {
    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        self.0.handle_webhook(&self.1, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn read(pairs: &[(&str, &str)]) -> Result<StandaloneConfig, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        StandaloneConfig::from_env(move |key| env.get(key).cloned())
    }

    #[test]
    fn settings_have_defaults_and_every_error_names_its_setting() {
        let config =
            read(&[("AUTOSCALER_ADDR", "mecha-autoscaler.mecha-system.svc:8080")]).expect("valid");
        assert_eq!((config.port, config.admin_port), (8080, 8022));
        assert_eq!(config.webhook_base, "http://localhost:8080");
        assert_eq!(config.serve.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.body_budget, BudgetSettings::default());
        assert!(config.token.is_none());
        let set = read(&[
            ("AUTOSCALER_ADDR", "127.0.0.1:1"),
            ("IMPORTERS_PORT", "9000"),
            ("IMPORTERS_WEBHOOK_BASE_URL", "https://hooks.example.com/"),
        ])
        .expect("valid");
        assert_eq!(set.port, 9000);
        assert_eq!(set.webhook_base, "https://hooks.example.com");
        for (setting, value) in [
            ("AUTOSCALER_ADDR", "no-port"),
            ("IMPORTERS_ADMIN_PORT", "8080"),
            ("IMPORTERS_PORT", "http"),
            ("IMPORTERS_WEBHOOK_BASE_URL", "hooks.example.com"),
            ("DRAIN_TIMEOUT", "soon"),
            ("AUTOSCALER_TOKEN", "short"),
            // Below the largest webhook body, or above 1 GiB.
            ("IMPORTERS_BODY_BUDGET", "4194303"),
            ("IMPORTERS_BODY_BUDGET", "1073741825"),
            ("IMPORTERS_BODY_TIMEOUT", "11m"),
        ] {
            let mut pairs = vec![("AUTOSCALER_ADDR", "127.0.0.1:1")];
            pairs.retain(|(k, _)| *k != setting);
            pairs.push((setting, value));
            assert_eq!(read(&pairs).expect_err(value).setting, setting);
        }
        assert_eq!(read(&[]).expect_err("missing").setting, "AUTOSCALER_ADDR");
        let help = settings::help(StandaloneConfig::SETTINGS);
        for name in [
            "IMPORTERS_PORT",
            "AUTOSCALER_TOKEN_FILE",
            "DRAIN_TIMEOUT",
            "IMPORTERS_BODY_BUDGET",
            "IMPORTERS_BODY_TIMEOUT",
        ] {
            assert!(help.contains(name), "{name}");
        }
        let flags = StandaloneConfig::from_args_and_env(&["--port".into(), "9100".into()], |k| {
            (k == "AUTOSCALER_ADDR").then(|| "127.0.0.1:1".to_string())
        })
        .expect("valid");
        assert_eq!(flags.port, 9100);
    }
}
