//! `autoscaler [--flag value ...]`: Mecha's control plane in a cluster.
//!
//! Every replica watches Services, Revisions, EndpointSlices and its ConfigMaps, runs the KPA
//! controller, and serves the control-plane API (`/api/v1/watch`, `/stats`, `/pokes`) to the
//! sidecars and gateways, who authenticate with projected service-account tokens checked by
//! `TokenReview`. Only the replica holding the `mecha-autoscaler` Lease writes: it runs the
//! serving reconcilers and sets Deployment replicas. `/live`, `/ready`, `/metrics` are on the
//! admin port; SIGTERM drains (unready, lease released, streams ended, servers closed).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use autoscaler::{Controller, ServingState};
use k8s::actuator::{EverReady, KubeActuator, Running};
use k8s::auth::TokenReviewer;
use k8s::desired::PodSettings;
use k8s::forward::ToLeader;
use k8s::leader::{Elector, LEASE_NAME, LeaseTimings};
use k8s::reconcile::{Metrics, ServingSettings};
use k8s::state::Caches;
use kube::Api;
use mecha_common::admin::Health;
use mecha_common::auth::Refusals;
use mecha_common::serve::ServeLimits;
use mecha_common::settings::{self, ConfigError, Table};
use mecha_common::{Activation, Shutdown};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The binary's settings, from the environment or the equivalent flags.
#[derive(Debug, Clone, PartialEq)]
struct Config {
    port: u16,
    admin_port: u16,
    pod_name: String,
    /// `host:port` where followers reach this replica while it leads.
    address: Option<String>,
    namespace: String,
    sidecar_image: String,
    autoscaler_addr: String,
    broker_base_url: String,
    cluster_domain: String,
    mesh_no_proxy: Vec<String>,
    /// How the importers reach Services (the gateway) and where providers reach webhooks.
    sinks: k8s::sources::SinkSettings,
    drain_timeout: Duration,
    lease: LeaseTimings,
    eventing: bool,
}

/// The gateway's Kubernetes Service in the installation namespace (`deploy/base/`), where
/// Services' cluster-local names point.
const GATEWAY_SERVICE: &str = "mecha-gateway";

const SETTINGS: Table = &[
    (
        "--port",
        "AUTOSCALER_PORT",
        "the control-plane API: /api/v1/watch, /stats, /pokes (8080)",
    ),
    (
        "--admin-port",
        "AUTOSCALER_ADMIN_PORT",
        "/live, /ready, /metrics (8022)",
    ),
    (
        "--pod-name",
        "POD_NAME",
        "this replica, the Lease holder's identity (required; the downward API's metadata.name)",
    ),
    (
        "--pod-ip",
        "POD_IP",
        "this replica's address (the downward API's status.podIP): followers pass stats and pokes on to the leader there (unset: not passed on)",
    ),
    (
        "--namespace",
        "POD_NAMESPACE",
        "where the Lease and the config-autoscaler, config-domain ConfigMaps are (mecha-system)",
    ),
    (
        "--sidecar-image",
        "SIDECAR_IMAGE",
        "the activator-sidecar image of revision pods (mecha/activator-sidecar)",
    ),
    (
        "--autoscaler-addr",
        "AUTOSCALER_ADDR",
        "host:port revision pods' sidecars report to (mecha-autoscaler.NAMESPACE.svc:8080)",
    ),
    (
        "--broker-base-url",
        "BROKER_BASE_URL",
        "the broker ingress in Brokers' addresses (http://mecha-broker.mecha-system.svc)",
    ),
    (
        "--cluster-domain",
        "CLUSTER_DOMAIN",
        "the cluster's DNS domain in Services' cluster-local names (from /etc/resolv.conf's search line, else cluster.local)",
    ),
    (
        "--mesh-no-proxy",
        "MESH_NO_PROXY",
        "comma-separated hosts meshed functions call without their proxy, besides their own pod (none)",
    ),
    (
        "--gateway-addr",
        "GATEWAY_ADDR",
        "host:port of the gateway Service, through which event sources reach Services (mecha-gateway.NAMESPACE.svc:80)",
    ),
    (
        "--webhook-base-url",
        "IMPORTERS_WEBHOOK_BASE_URL",
        "where GitHub and GitLab reach the importers' webhook port, in webhook sources' status.url (http://mecha-importers.NAMESPACE.svc)",
    ),
    (
        "--apiserver-adapter-image",
        "APISERVER_ADAPTER_IMAGE",
        "the image of ApiServerSources' adapters, which holds the apiserver-adapter binary (mecha/autoscaler, this image)",
    ),
    (
        "--drain-timeout",
        "DRAIN_TIMEOUT",
        "longest wait for open requests on SIGTERM (30s)",
    ),
    (
        "--lease-duration",
        "LEASE_DURATION",
        "how long others wait for an unrenewed Lease (15s)",
    ),
    (
        "--lease-renew-deadline",
        "LEASE_RENEW_DEADLINE",
        "the leader steps down when it could not renew for this long (10s)",
    ),
    (
        "--lease-retry-period",
        "LEASE_RETRY_PERIOD",
        "how often the Lease is renewed or tried (2s)",
    ),
    (
        "--eventing",
        "RECONCILE_EVENTING",
        "reconcile Brokers and Triggers too (true)",
    ),
];

fn usage() -> String {
    format!(
        "usage: autoscaler [--flag value ...]\n\n\
         Mecha's control plane in a Kubernetes cluster: the control-plane API for sidecars\n\
         and gateways, the KPA autoscaler, and (on the Lease's holder) the serving reconcilers.\n\
         The cluster is found as kubectl finds it (in a pod: its service account).\n\n{}\n\
         Logs: MECHA_LOG (tracing filter), MECHA_LOG_FORMAT=json.\n",
        settings::help(SETTINGS)
    )
}

// === impl Config ===

impl Config {
    fn from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = settings::overlay(args, SETTINGS, env)?;
        let pod_name = get("POD_NAME")
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError {
                setting: "POD_NAME",
                value: String::new(),
                reason: "required: the Lease names its holder by it (set it from the downward API)"
                    .into(),
            })?;
        let namespace = get("POD_NAMESPACE").unwrap_or_else(|| "mecha-system".into());
        let port = settings::number(&get, "AUTOSCALER_PORT", 8080u16, settings::port)?;
        let autoscaler_addr = get("AUTOSCALER_ADDR")
            .unwrap_or_else(|| format!("mecha-autoscaler.{namespace}.svc:{port}"));
        settings::host_port("AUTOSCALER_ADDR", &autoscaler_addr)?;
        let lease = LeaseTimings {
            duration: settings::duration(&get, "LEASE_DURATION", LeaseTimings::default().duration)?,
            renew_deadline: settings::duration(
                &get,
                "LEASE_RENEW_DEADLINE",
                LeaseTimings::default().renew_deadline,
            )?,
            renew_every: settings::duration(
                &get,
                "LEASE_RETRY_PERIOD",
                LeaseTimings::default().renew_every,
            )?,
        };
        if lease.renew_every.is_zero()
            || lease.renew_every >= lease.renew_deadline
            || lease.renew_deadline >= lease.duration
        {
            return Err(ConfigError {
                setting: "LEASE_RENEW_DEADLINE",
                value: format!("{:?}", lease.renew_deadline),
                reason: "must be between LEASE_RETRY_PERIOD and LEASE_DURATION (a leader must stop before another may start)".into(),
            });
        }
        let address = match get("POD_IP") {
            None => None,
            Some(ip) => {
                let parsed: std::net::IpAddr = ip.trim().parse().map_err(|_| ConfigError {
                    setting: "POD_IP",
                    value: ip.clone(),
                    reason: "not an IP address".into(),
                })?;
                Some(SocketAddr::new(parsed, port).to_string())
            }
        };
        let gateway =
            get("GATEWAY_ADDR").unwrap_or_else(|| format!("mecha-gateway.{namespace}.svc:80"));
        settings::host_port("GATEWAY_ADDR", &gateway)?;
        let broker_base_url =
            get("BROKER_BASE_URL").unwrap_or_else(|| k8s::status::DEFAULT_BROKER_BASE_URL.into());
        let webhook_base_url = get("IMPORTERS_WEBHOOK_BASE_URL")
            .unwrap_or_else(|| format!("http://mecha-importers.{namespace}.svc"));
        if !(webhook_base_url.starts_with("http://") || webhook_base_url.starts_with("https://")) {
            return Err(ConfigError {
                setting: "IMPORTERS_WEBHOOK_BASE_URL",
                value: webhook_base_url,
                reason: "must be an http:// or https:// URL".into(),
            });
        }
        let cluster_domain = match get("CLUSTER_DOMAIN").filter(|d| !d.trim().is_empty()) {
            Some(domain) => domain.trim().trim_end_matches('.').to_string(),
            None => k8s::status::cluster_domain_from_resolv_conf(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        };
        let sinks = k8s::sources::SinkSettings {
            broker_base_url: broker_base_url.clone(),
            gateway,
            cluster_domain: cluster_domain.clone(),
            webhook_base_url,
            adapter_image: get("APISERVER_ADAPTER_IMAGE")
                .filter(|i| !i.trim().is_empty())
                .unwrap_or_else(|| k8s::apiserver::DEFAULT_ADAPTER_IMAGE.into()),
            // Replaced by the client's own once the cluster is found (`main`).
            api_server_url: k8s::sources::SinkSettings::default().api_server_url,
        };
        Ok(Self {
            sinks,
            address,
            port,
            admin_port: settings::number(&get, "AUTOSCALER_ADMIN_PORT", 8022u16, settings::port)?,
            pod_name,
            namespace,
            sidecar_image: get("SIDECAR_IMAGE").unwrap_or_else(|| "mecha/activator-sidecar".into()),
            autoscaler_addr,
            broker_base_url,
            cluster_domain,
            mesh_no_proxy: get("MESH_NO_PROXY")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(String::from)
                .collect(),
            drain_timeout: settings::duration(&get, "DRAIN_TIMEOUT", Duration::from_secs(30))?,
            lease,
            eventing: settings::flag(&get, "RECONCILE_EVENTING", true)?,
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match mecha_common::settings::read(&args, usage, |args| {
        Config::from_args_and_env(args, mecha_common::settings::process_env)
    }) {
        Ok(config) => config,
        Err(code) => return code,
    };
    mecha_common::telemetry::init_tracing_from_env();
    let api_listener = match mecha_common::serve::listen_all(
        config.port,
        "the control-plane API (AUTOSCALER_PORT)",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let admin_listener = match mecha_common::serve::listen_all(
        config.admin_port,
        "/live, /ready, /metrics (AUTOSCALER_ADMIN_PORT)",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let mut config = config;
    let client = match kube::Config::infer().await {
        Ok(kube_config) => {
            // ApiServerSources' events name the API server as a pod's client sees it.
            config.sinks.api_server_url = kube_config
                .cluster_url
                .to_string()
                .trim_end_matches('/')
                .to_string();
            match kube::Client::try_from(kube_config) {
                Ok(client) => client,
                Err(error) => {
                    eprintln!("error: cannot make a client for the Kubernetes API server: {error}");
                    return ExitCode::from(1);
                }
            }
        }
        Err(error) => {
            eprintln!(
                "error: cannot find the Kubernetes API server (in-cluster service account or KUBECONFIG): {error}"
            );
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        pod = %config.pod_name,
        namespace = %config.namespace,
        api = config.port,
        admin = config.admin_port,
        "autoscaler starting"
    );
    run(config, client, api_listener, admin_listener).await
}

async fn run(
    config: Config,
    client: kube::Client,
    api_listener: TcpListener,
    admin_listener: TcpListener,
) -> ExitCode {
    let registry = Registry::new();
    let health = Health::default();
    let shutdown = Shutdown::new();
    mecha_common::memory::release_after_bursts(shutdown.signal());
    let caches = Caches::default();
    caches.report_to(&health);

    // Desired state and endpoints, from this replica's own caches.
    let (state_tx, state_rx) = watch::channel(Arc::<ServingState>::default());
    let ever_ready = EverReady::default();
    let running = Running::default();
    let state_task = tokio::spawn(k8s::state::run(
        client.clone(),
        k8s::state::Installation {
            namespace: config.namespace.clone(),
            cluster_domain: config.cluster_domain.clone(),
        },
        state_tx,
        ever_ready.clone(),
        running.clone(),
        caches.clone(),
        shutdown.signal(),
    ));
    let (endpoints_tx, endpoints_rx) = watch::channel(Arc::default());
    let endpoints_task = tokio::spawn(k8s::endpoints::run(
        Api::all(client.clone()),
        state_rx.clone(),
        endpoints_tx,
        ever_ready.clone(),
        caches.register("endpointslices"),
        shutdown.signal(),
    ));

    // Leadership.
    let elector = Elector::new(
        Api::namespaced(client.clone(), &config.namespace),
        LEASE_NAME,
        config.pod_name.clone(),
        config.lease,
    )
    .with_address(config.address.clone());
    let leading = elector.leading();
    let to_leader = ToLeader::new(leading.clone(), elector.leader_address(), &registry);
    let mut elector_task = tokio::spawn(elector.run(shutdown.signal()));

    // The KPA controller, on every replica (followers serve its routes, never write).
    let actuator = KubeActuator::new(
        client.clone(),
        endpoints_rx,
        ever_ready,
        running,
        leading.clone(),
    );
    let (activation, pokes) = Activation::new();
    let controller = Controller::new(
        state_rx.clone(),
        actuator,
        activation,
        pokes,
        k8s::status::DEFAULT_DOMAIN,
        &registry,
    );
    // Brokers and Triggers for the broker replicas, from this replica's own watches.
    let (eventing_tx, eventing_rx) = watch::channel(Arc::default());
    let eventing_task = tokio::spawn(k8s::state::run_eventing(
        client.clone(),
        eventing_tx,
        caches.clone(),
        shutdown.signal(),
    ));
    // The event sources, with their sinks resolved, for the importers.
    let (sources_tx, sources_rx) = watch::channel(Arc::default());
    let sources_task = tokio::spawn(k8s::sources::run(
        client.clone(),
        sources_tx,
        config.sinks.clone(),
        caches.clone(),
        shutdown.signal(),
    ));
    let api_state = controller
        .api(shutdown.signal())
        .with_eventing(eventing_rx)
        .with_sources(sources_rx);
    let controller_task = tokio::spawn(controller.run(shutdown.signal()));

    // The reconcilers, while leading.
    let reconcile_metrics = match Metrics::register(&registry) {
        Ok(metrics) => metrics,
        Err(error) => {
            eprintln!("error: cannot register the reconcilers' metrics: {error}");
            return ExitCode::from(1);
        }
    };
    // A reconciler that cannot watch (CRDs missing, RBAC refused) changes nothing: unready.
    let watching = reconcile_metrics.clone();
    health.add_check(move || watching.watch_problem());
    let pods = PodSettings {
        sidecar_image: config.sidecar_image.clone(),
        autoscaler_addr: config.autoscaler_addr.clone(),
        sidecar_requests: [("cpu".to_string(), "25m".to_string())].into(),
        mesh_no_proxy: config.mesh_no_proxy.clone(),
    };
    let mut serving = ServingSettings::new(pods);
    serving.eventing = config.eventing;
    serving.addresses.broker_base_url = config.broker_base_url.clone();
    serving.addresses.cluster_domain = config.cluster_domain.clone();
    serving.addresses.gateway_host = format!(
        "{GATEWAY_SERVICE}.{}.svc.{}",
        config.namespace, config.cluster_domain
    );
    serving.sources = Some(config.sinks.clone());
    let leader_task = tokio::spawn(k8s::leader::reconcile_while_leading(
        client.clone(),
        serving,
        reconcile_metrics,
        leading.clone(),
        state_rx,
        caches.clone(),
        health.clone(),
        shutdown.signal(),
    ));

    // Tasks that must not end before shutdown: their death makes the replica unready.
    for (name, task) in [
        ("desired state", state_task),
        ("endpoints", endpoints_task),
        ("brokers and triggers", eventing_task),
        ("event sources", sources_task),
        ("controller", controller_task),
        ("reconcilers", leader_task),
    ] {
        watch_task(&health, &shutdown, name, task);
    }

    // The control-plane API: a token the API server vouches for; nothing before the caches
    // are synced (a sidecar keeps its last tables rather than take empty ones).
    let refusals = Refusals::register(&registry);
    let reviewer = TokenReviewer::new(client, &registry);
    let api = k8s::auth::control_plane(api_state, reviewer, refusals, caches, Some(to_leader));
    let admin = mecha_common::admin::router(health.clone(), registry);

    let limits = ServeLimits {
        drain_timeout: config.drain_timeout,
        ..ServeLimits::default()
    };
    let api_server = tokio::spawn(mecha_common::serve::serve(
        api_listener,
        api,
        limits,
        shutdown.signal(),
    ));
    let admin_server = tokio::spawn(mecha_common::serve::serve(
        admin_listener,
        admin,
        limits,
        shutdown.signal(),
    ));
    health.set_ready(true);

    // The elector never ends before shutdown; if it dies, this replica can no longer know
    // whether it leads: it exits, and Kubernetes starts it again.
    let stopped = tokio::select! {
        stopped = async {
            match mecha_common::shutdown::stop_signals() {
                Ok(stop) => {
                    stop.await;
                    Ok(())
                }
                Err(error) => {
                    eprintln!("error: cannot listen for SIGTERM: {error}");
                    Err(ExitCode::from(1))
                }
            }
        } => stopped,
        ended = &mut elector_task => {
            tracing::error!(?ended, "leader election ended unexpectedly; exiting");
            shutdown.trigger();
            return ExitCode::from(1);
        }
    };
    if let Err(code) = stopped {
        return code;
    }
    tracing::info!("draining");
    health.set_ready(false);
    shutdown.trigger();
    let drained = tokio::time::timeout(config.drain_timeout, async {
        let _ = api_server.await;
        let _ = admin_server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?config.drain_timeout, "drain timed out");
    }
    // The elector releases the Lease on shutdown, so a successor need not wait it out.
    if tokio::time::timeout(Duration::from_secs(5), elector_task)
        .await
        .is_err()
    {
        tracing::warn!("the Lease was not released within 5s; it expires on its own");
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Logs and reports (as a readiness problem) a task that ends before shutdown.
fn watch_task(
    health: &Health,
    shutdown: &Shutdown,
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
) {
    let (health, stopping) = (health.clone(), shutdown.signal());
    tokio::spawn(async move {
        let why = match task.await {
            Ok(()) if stopping.is_triggered() => return,
            Ok(()) => "stopped unexpectedly".to_string(),
            Err(error) => format!("failed: {error}"),
        };
        tracing::error!(task = name, %why, "a background task ended");
        health.set_problem(name, Some(why));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_args_and_env(&[], move |k| env.get(k).cloned())
    }

    #[test]
    fn settings_have_the_contract_defaults_and_name_what_is_wrong() {
        let config = config(&[("POD_NAME", "autoscaler-0")]).expect("defaults");
        assert_eq!((config.port, config.admin_port), (8080, 8022));
        assert_eq!(config.namespace, "mecha-system");
        assert_eq!(
            config.autoscaler_addr,
            "mecha-autoscaler.mecha-system.svc:8080"
        );
        assert_eq!(config.lease, LeaseTimings::default());
        assert_eq!(config.address, None);
        assert_eq!(config.sinks.gateway, "mecha-gateway.mecha-system.svc:80");
        assert_eq!(
            config.sinks.webhook_base_url,
            "http://mecha-importers.mecha-system.svc"
        );
        assert_eq!(config.sinks.adapter_image, "mecha/autoscaler");
        let error = super::tests::config(&[("POD_NAME", "a"), ("GATEWAY_ADDR", "gateway")])
            .expect_err("no port");
        assert_eq!(error.setting, "GATEWAY_ADDR");
        let config =
            super::tests::config(&[("POD_NAME", "a"), ("POD_IP", "fd00::1")]).expect("IPv6");
        assert_eq!(config.address.as_deref(), Some("[fd00::1]:8080"));
        let error = super::tests::config(&[]).expect_err("no pod name");
        assert_eq!(error.setting, "POD_NAME");
        let error = super::tests::config(&[("POD_NAME", "a"), ("LEASE_RENEW_DEADLINE", "20s")])
            .expect_err("deadline past the duration");
        assert_eq!(error.setting, "LEASE_RENEW_DEADLINE");
        let error = super::tests::config(&[("POD_NAME", "a"), ("AUTOSCALER_PORT", "0")])
            .expect_err("port 0");
        assert_eq!(error.setting, "AUTOSCALER_PORT");
    }
}
