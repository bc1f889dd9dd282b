//! The sidecar's one control-plane connection, to the autoscaler: routes and ready endpoints
//! come down as a stream of snapshots ([`watch`]); pokes and the load of held requests go up
//! ([`report_activation`]). If the autoscaler is unreachable, the last known tables stay in
//! force, so warm traffic keeps flowing and only cold starts wait.
//!
//! [`serve_gateway`] puts it together: the gateway role in a process of its own.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mecha_common::activation::Poke;
use mecha_common::wire::{POKE_PATH, STATS_PATH, Snapshot, SnapshotReader, Stat, WATCH_PATH};
use mecha_common::{Activation, EndpointTable, RoutingTable, ShutdownSignal};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::gateway::Gateway;
use crate::settings::{self, ConfigError};

/// The gateway role's settings, from the environment or the equivalent flags.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// `GATEWAY_PORT` (8080): external traffic.
    pub port: u16,
    /// `GATEWAY_ADMIN_PORT` (8022): `/live`, `/ready`, `/metrics`.
    pub admin_port: u16,
    /// `AUTOSCALER_ADDR` (required): `host:port` of the autoscaler (`mecha up`'s admin API).
    pub autoscaler: String,
    /// `GATEWAY_DOMAIN` (`localhost`): services answer on `{name}.{namespace}.{domain}`.
    pub domain: String,
    /// `DRAIN_TIMEOUT` (30s).
    pub drain_timeout: Duration,
    /// `POD_NAME`: this gateway's name in its reports.
    pub name: String,
    /// `SIDECAR_TRUSTED_PROXIES` (`none`): proxies in front whose forwarding headers are
    /// believed; the gateway and the outbound role are where requests enter, so nobody's.
    pub trusted_proxies: crate::rules::TrustedProxies,
    /// `SIDECAR_FAST_PATH` (`true`): relay plain HTTP/1.1 on the fast path, or all through
    /// hyper.
    pub fast_path: bool,
}

impl GatewayConfig {
    pub const SETTINGS: settings::Table = &[
        ("--port", "GATEWAY_PORT", "external traffic (8080)"),
        (
            "--admin-port",
            "GATEWAY_ADMIN_PORT",
            "/live, /ready, /metrics (8022)",
        ),
        (
            "--autoscaler-addr",
            "AUTOSCALER_ADDR",
            "host:port of the autoscaler (required)",
        ),
        (
            "--domain",
            "GATEWAY_DOMAIN",
            "services answer on {name}.{namespace}.DOMAIN (localhost)",
        ),
        (
            "--drain-timeout",
            "DRAIN_TIMEOUT",
            "time for in-flight requests after SIGTERM (30s)",
        ),
        ("--pod-name", "POD_NAME", "this gateway's name in reports"),
        (
            "--trusted-proxies",
            "SIDECAR_TRUSTED_PROXIES",
            "address[/prefix],... whose forwarding headers are believed; none; private (none)",
        ),
        (
            "--fast-path",
            "SIDECAR_FAST_PATH",
            "relay plain HTTP/1.1 on the fast path (true) or all through hyper (false)",
        ),
    ];

    /// The outbound (mesh client) role: the same gateway on a loopback port that the caller
    /// uses as its HTTP proxy (`HTTP_PROXY=http://127.0.0.1:15001`).
    pub const OUTBOUND_SETTINGS: settings::Table = &[
        (
            "--port",
            "OUTBOUND_PORT",
            "the caller's HTTP proxy, on 127.0.0.1 (15001)",
        ),
        (
            "--admin-port",
            "GATEWAY_ADMIN_PORT",
            "/live, /ready, /metrics (8022)",
        ),
        (
            "--autoscaler-addr",
            "AUTOSCALER_ADDR",
            "host:port of the autoscaler (required)",
        ),
        (
            "--domain",
            "GATEWAY_DOMAIN",
            "services answer on {name}.{namespace}.DOMAIN (localhost)",
        ),
        (
            "--drain-timeout",
            "DRAIN_TIMEOUT",
            "time for in-flight requests after SIGTERM (30s)",
        ),
        ("--pod-name", "POD_NAME", "this sidecar's name in reports"),
        (
            "--trusted-proxies",
            "SIDECAR_TRUSTED_PROXIES",
            "address[/prefix],... whose forwarding headers are believed; none; private (none)",
        ),
        (
            "--fast-path",
            "SIDECAR_FAST_PATH",
            "relay plain HTTP/1.1 on the fast path (true) or all through hyper (false)",
        ),
    ];

    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(get, "GATEWAY_PORT", 8080)
    }

    pub fn outbound_from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::read(
            settings::overlay(args, Self::OUTBOUND_SETTINGS, env)?,
            "OUTBOUND_PORT",
            15001,
        )
    }

    fn read(
        get: impl Fn(&str) -> Option<String>,
        port_setting: &'static str,
        default_port: u16,
    ) -> Result<Self, ConfigError> {
        let port = settings::number(&get, port_setting, default_port, settings::port)?;
        let admin_port = settings::number(&get, "GATEWAY_ADMIN_PORT", 8022u16, settings::port)?;
        if admin_port == port {
            return Err(ConfigError {
                setting: "GATEWAY_ADMIN_PORT",
                value: admin_port.to_string(),
                reason: format!("must differ from {port_setting}"),
            });
        }
        let autoscaler = get("AUTOSCALER_ADDR").ok_or_else(|| ConfigError {
            setting: "AUTOSCALER_ADDR",
            value: String::new(),
            reason: "required: the gateway learns routes and endpoints from the autoscaler".into(),
        })?;
        settings::host_port("AUTOSCALER_ADDR", &autoscaler)?;
        let drain_timeout = settings::duration(&get, "DRAIN_TIMEOUT", Duration::from_secs(30))?;
        Ok(Self {
            port,
            admin_port,
            autoscaler,
            domain: get("GATEWAY_DOMAIN").unwrap_or_else(|| "localhost".into()),
            drain_timeout,
            name: get("POD_NAME").unwrap_or_else(|| format!("gateway-{}", std::process::id())),
            trusted_proxies: settings::trusted_proxies(&get, crate::rules::TrustedProxies::none())?,
            fast_path: settings::flag(&get, "SIDECAR_FAST_PATH", true)?,
        })
    }

    pub fn from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_env(settings::overlay(args, Self::SETTINGS, env)?)
    }
}

/// Reconnect backoff of the watch stream.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps `routes` and `endpoints` current from the autoscaler at `autoscaler` (`host:port`)
/// until shutdown.
pub async fn watch(
    autoscaler: String,
    activation: Activation,
    routes: watch::Sender<Arc<RoutingTable>>,
    endpoints: watch::Sender<Arc<EndpointTable>>,
    shutdown: ShutdownSignal,
) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{autoscaler}{WATCH_PATH}");
    let mut reader = SnapshotReader::default();
    let mut backoff = BACKOFF_START;
    let stop = shutdown.recv();
    tokio::pin!(stop);
    loop {
        let session = async {
            let request = Request::get(&uri)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            tracing::info!(%autoscaler, "watching routes and endpoints");
            let mut body = response.into_body();
            let mut pending = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line = pending.split_to(end + 1);
                    let snapshot: Snapshot = serde_json::from_slice(&line[..end])
                        .map_err(|e| format!("bad snapshot: {e}"))?;
                    let (r, e) = reader.read(snapshot, |revision| activation.released(revision));
                    routes.send_replace(Arc::new(r));
                    endpoints.send_replace(Arc::new(e));
                }
            }
            Err::<(), String>("the stream ended".into())
        };
        tokio::select! {
            result = session => {
                if let Err(error) = result {
                    tracing::warn!(%autoscaler, %error, "watch interrupted; keeping the last tables, retrying in {backoff:?}");
                }
            }
            () = &mut stop => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut stop => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sends the autoscaler every poke at once, and every second the load of the requests held
/// here, as stats of replica `name`.
pub async fn report_activation(
    autoscaler: String,
    name: String,
    activation: Activation,
    mut pokes: mpsc::UnboundedReceiver<Poke>,
    routes: watch::Receiver<Arc<RoutingTable>>,
    shutdown: ShutdownSignal,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let post = |path: &'static str, body: Vec<u8>| {
        let client = client.clone();
        let uri = format!("http://{autoscaler}{path}");
        async move {
            let request = Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let response = tokio::time::timeout(Duration::from_secs(1), client.request(request))
                .await
                .map_err(|_| "no answer within 1s".to_string())?
                .map_err(|e| e.to_string())?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("answered {}", response.status()))
            }
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut loaded: HashSet<String> = HashSet::new();
    let stop = shutdown.recv();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Some(poke) = pokes.recv() => {
                let mut batch = vec![poke];
                while let Ok(more) = pokes.try_recv() {
                    batch.push(more);
                }
                if let Err(error) = post(POKE_PATH, serde_json::to_vec(&batch).unwrap_or_default()).await {
                    tracing::warn!(%error, "cannot poke the autoscaler");
                }
            }
            _ = tick.tick() => {
                let revisions: HashSet<String> = routes
                    .borrow()
                    .hosts()
                    .flat_map(|(_, route)| route.targets.iter().map(|t| t.revision.clone()))
                    .collect();
                let mut stats = Vec::new();
                for revision in revisions {
                    let sample = activation.sample(&revision);
                    // Report while there is held load, and once more when it is gone.
                    if sample.concurrency > 0.0 || loaded.contains(&revision) {
                        if sample.concurrency > 0.0 {
                            loaded.insert(revision.clone());
                        } else {
                            loaded.remove(&revision);
                        }
                        if sample.seconds > 0.0 {
                            stats.push(Stat::new(&revision, &name, sample));
                        }
                    }
                }
                if !stats.is_empty()
                    && let Err(error) = post(STATS_PATH, serde_json::to_vec(&stats).unwrap_or_default()).await {
                        tracing::debug!(%error, "cannot report held load");
                    }
            }
            () = &mut stop => return,
        }
    }
}

/// The gateway role in its own process: serves `listener`, routes and endpoints from the
/// autoscaler `config` names, activation through it. Returns once shutdown has drained.
pub async fn serve_gateway(
    listener: TcpListener,
    config: &GatewayConfig,
    registry: &Registry,
    shutdown: ShutdownSignal,
) {
    let (autoscaler, name) = (config.autoscaler.clone(), config.name.clone());
    let (activation, pokes) = Activation::new();
    let (routes_tx, routes_rx) = watch::channel(Arc::<RoutingTable>::default());
    let (endpoints_tx, endpoints_rx) = watch::channel(Arc::<EndpointTable>::default());
    let gateway = Gateway::new(
        routes_rx.clone(),
        endpoints_rx,
        activation.clone(),
        &config.domain,
        registry,
    )
    .with_trusted_proxies(config.trusted_proxies.clone());
    let watcher = tokio::spawn(watch(
        autoscaler.clone(),
        activation.clone(),
        routes_tx,
        endpoints_tx,
        shutdown.clone(),
    ));
    let reporter = tokio::spawn(report_activation(
        autoscaler,
        name,
        activation,
        pokes,
        routes_rx,
        shutdown.clone(),
    ));
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?local, "gateway serving");
    crate::server::serve(
        listener,
        Arc::new(gateway),
        crate::server::Workers::current(),
        shutdown,
        crate::server::ServeOptions {
            fast_path: config.fast_path,
            drain_timeout: config.drain_timeout,
        },
    )
    .await;
    let _ = watcher.await;
    let _ = reporter.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_autoscaler_address_is_required() {
        let error = GatewayConfig::from_env(|_| None).expect_err("required");
        assert_eq!(error.setting, "AUTOSCALER_ADDR");
        let args = vec![
            "--autoscaler-addr".to_string(),
            "127.0.0.1:8081".to_string(),
        ];
        let config = GatewayConfig::from_args_and_env(&args, |_| None).expect("ok");
        assert_eq!((config.port, config.domain.as_str()), (8080, "localhost"));
        let outbound = GatewayConfig::outbound_from_args_and_env(&args, |_| None).expect("ok");
        assert_eq!(outbound.port, 15001);
        let error = GatewayConfig::outbound_from_args_and_env(&args, |k| {
            (k == "OUTBOUND_PORT").then(|| "8022".to_string())
        })
        .expect_err("clash");
        assert_eq!(
            error.to_string(),
            "GATEWAY_ADMIN_PORT=\"8022\": must differ from OUTBOUND_PORT"
        );
    }
}
