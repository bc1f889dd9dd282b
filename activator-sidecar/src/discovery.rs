//! The sidecar's one control-plane connection, to the autoscaler: routes and ready endpoints
//! come down as a stream of snapshots ([`watch`]); pokes and the load of held requests go up
//! ([`report_activation`]). If the autoscaler is unreachable, the last known tables stay in
//! force, so warm traffic keeps flowing and only cold starts wait.
//!
//! Every request to the autoscaler carries its credential ([`ControlPlane`]): `mecha up`'s
//! admin token, given as `AUTOSCALER_TOKEN` or `AUTOSCALER_TOKEN_FILE`; in a cluster, the
//! pod's projected service-account token in `AUTOSCALER_TOKEN_FILE`, read again whenever
//! kubelet rotates it.
//!
//! [`serve_gateway`] puts it together: the gateway role in a process of its own.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mecha_common::activation::Poke;
use mecha_common::admin::Health;
use mecha_common::auth::{AdminToken, ClientToken, TokenFile};
use mecha_common::outlier::OutlierConfig;
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
    /// `SIDECAR_HEADER_READ_TIMEOUT`, `SIDECAR_IDLE_TIMEOUT`, `SIDECAR_MAX_CONNECTIONS`.
    pub limits: crate::limits::Limits,
    /// `AUTOSCALER_TOKEN` or `AUTOSCALER_TOKEN_FILE`: the autoscaler's credential.
    pub token: Option<ClientToken>,
    /// `GATEWAY_OUTLIER_FAILURES` (3; 0: off), `GATEWAY_OUTLIER_EJECTION_TIME` (30s),
    /// `GATEWAY_OUTLIER_MAX_EJECTION_TIME` (300s): replicas that fail that many requests in a
    /// row (timeouts, refused connections) leave the rotation for the ejection time × times
    /// ejected, capped.
    pub outlier: OutlierConfig,
    /// The outbound role only: `OUTBOUND_PASS_THROUGH_TIMEOUT` (300s) — calls for hosts that
    /// are no Service's go on to those hosts, within this time
    /// ([`Gateway::with_pass_through`](crate::gateway::Gateway::with_pass_through)).
    pub pass_through: Option<Duration>,
}

/// The sidecar's one control-plane client: the autoscaler's address, the credential every
/// request carries, and one connection pool for everything said to it — the watch stream
/// down, stats and pokes up. Clones share the pool. (Over HTTP/1.1 the long-lived watch
/// response keeps one connection to itself; reports share another, kept alive.)
#[derive(Debug, Clone)]
pub struct ControlPlane {
    addr: String,
    token: Option<ClientToken>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Where the settings tables say how to give a sidecar its credential.
pub const TOKEN_FILE_HELP: (&str, &str, &str) = (
    "--autoscaler-token-file",
    "AUTOSCALER_TOKEN_FILE",
    "file with the autoscaler's credential, read again when it changes: mecha up's STATE_DIR/admin-token, or in a cluster the pod's projected token (or the token itself in AUTOSCALER_TOKEN, never a flag: arguments are visible to every user)",
);

/// Who the gateway and outbound roles believe: nobody by default, since requests enter there.
const EDGE_TRUSTED_PROXIES_HELP: (&str, &str, &str) = (
    "--trusted-proxies",
    "SIDECAR_TRUSTED_PROXIES",
    "address[/prefix],... whose forwarding headers are believed; none; private (none)",
);

/// The outlier detection settings, the same in the gateway and outbound roles.
const OUTLIER_HELP: [(&str, &str, &str); 3] = [
    (
        "--outlier-failures",
        "GATEWAY_OUTLIER_FAILURES",
        "failed requests in a row (timeouts, refused connections) that eject a replica; 0: never (3)",
    ),
    (
        "--outlier-ejection-time",
        "GATEWAY_OUTLIER_EJECTION_TIME",
        "first ejection's length, times the ejection count after that (30s)",
    ),
    (
        "--outlier-max-ejection-time",
        "GATEWAY_OUTLIER_MAX_EJECTION_TIME",
        "longest ejection (300s)",
    ),
];

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
        EDGE_TRUSTED_PROXIES_HELP,
        settings::FAST_PATH_HELP,
        OUTLIER_HELP[0],
        OUTLIER_HELP[1],
        OUTLIER_HELP[2],
        TOKEN_FILE_HELP,
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
            "--pass-through-timeout",
            "OUTBOUND_PASS_THROUGH_TIMEOUT",
            "calls for hosts that are no Service's go on to them, within this time (300s)",
        ),
        EDGE_TRUSTED_PROXIES_HELP,
        settings::FAST_PATH_HELP,
        OUTLIER_HELP[0],
        OUTLIER_HELP[1],
        OUTLIER_HELP[2],
        TOKEN_FILE_HELP,
    ];

    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::read(get, "GATEWAY_PORT", 8080)
    }

    pub fn outbound_from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = settings::overlay(args, Self::OUTBOUND_SETTINGS, env)?;
        let mut config = Self::read(&get, "OUTBOUND_PORT", 15001)?;
        config.pass_through = Some(settings::duration(
            &get,
            "OUTBOUND_PASS_THROUGH_TIMEOUT",
            Duration::from_secs(300),
        )?);
        Ok(config)
    }

    fn read(
        get: impl Fn(&str) -> Option<String>,
        port_setting: &'static str,
        default_port: u16,
    ) -> Result<Self, ConfigError> {
        let (port, admin_port) =
            settings::listener_ports(&get, (port_setting, default_port), "GATEWAY_ADMIN_PORT")?;
        let autoscaler = settings::autoscaler_addr(&get, "the gateway's routes and endpoints")?;
        let serve = settings::serving(&get)?;
        Ok(Self {
            port,
            admin_port,
            autoscaler,
            domain: get("GATEWAY_DOMAIN").unwrap_or_else(|| "localhost".into()),
            drain_timeout: serve.drain_timeout,
            name: get("POD_NAME").unwrap_or_else(|| format!("gateway-{}", std::process::id())),
            trusted_proxies: settings::trusted_proxies(&get, crate::rules::TrustedProxies::none())?,
            fast_path: serve.fast_path,
            limits: serve.limits,
            token: autoscaler_token(&get)?,
            outlier: outlier_config(&get)?,
            pass_through: None,
        })
    }

    pub fn from_args_and_env(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_env(settings::overlay(args, Self::SETTINGS, env)?)
    }
}

/// The outlier detection settings; the longest ejection is at least the first.
fn outlier_config(get: &impl Fn(&str) -> Option<String>) -> Result<OutlierConfig, ConfigError> {
    let defaults = OutlierConfig::DEFAULT;
    let config = OutlierConfig {
        consecutive_failures: settings::number(
            get,
            "GATEWAY_OUTLIER_FAILURES",
            defaults.consecutive_failures,
            |_| Ok(()),
        )?,
        base_ejection: settings::duration(
            get,
            "GATEWAY_OUTLIER_EJECTION_TIME",
            defaults.base_ejection,
        )?,
        max_ejection: settings::duration(
            get,
            "GATEWAY_OUTLIER_MAX_EJECTION_TIME",
            defaults.max_ejection,
        )?,
    };
    if config.max_ejection < config.base_ejection {
        return Err(ConfigError {
            setting: "GATEWAY_OUTLIER_MAX_EJECTION_TIME",
            value: get("GATEWAY_OUTLIER_MAX_EJECTION_TIME").unwrap_or_default(),
            reason: format!(
                "must be at least GATEWAY_OUTLIER_EJECTION_TIME ({:?})",
                config.base_ejection
            ),
        });
    }
    Ok(config)
}

/// Reconnect backoff of the watch stream.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The autoscaler's credential from `AUTOSCALER_TOKEN` (the token) or `AUTOSCALER_TOKEN_FILE`
/// (a file holding it, read again whenever it changes; checked like `mecha`'s own — this
/// user's, readable by nobody else — unless kubelet projected it, see
/// [`mecha_common::auth::read_any`]). Without either the sidecar still starts, and says why
/// the autoscaler refuses it.
pub fn autoscaler_token(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<ClientToken>, ConfigError> {
    match (get("AUTOSCALER_TOKEN"), get("AUTOSCALER_TOKEN_FILE")) {
        (Some(_), Some(file)) => Err(ConfigError {
            setting: "AUTOSCALER_TOKEN_FILE",
            value: file,
            reason: "set AUTOSCALER_TOKEN or AUTOSCALER_TOKEN_FILE, not both".into(),
        }),
        (Some(token), None) => AdminToken::parse(&token)
            .map(|token| Some(ClientToken::Fixed(token)))
            .map_err(|reason| ConfigError {
                setting: "AUTOSCALER_TOKEN",
                // Never echo a secret back.
                value: "…".into(),
                reason,
            }),
        (None, Some(file)) => TokenFile::open(std::path::Path::new(&file))
            .map(|file| Some(ClientToken::File(file)))
            .map_err(|error| ConfigError {
                setting: "AUTOSCALER_TOKEN_FILE",
                value: file,
                reason: error.to_string(),
            }),
        (None, None) => Ok(None),
    }
}

// === impl ControlPlane ===

impl ControlPlane {
    pub fn new(addr: impl Into<String>, token: Option<ClientToken>) -> Self {
        Self {
            addr: addr.into(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Reports load (`POST /api/v1/stats`).
    pub async fn send_stats(&self, stats: &[Stat]) -> Result<(), String> {
        let body = serde_json::to_vec(stats).map_err(|e| e.to_string())?;
        self.post(STATS_PATH, body).await
    }

    /// Asks for replicas for held requests (`POST /api/v1/pokes`).
    pub async fn send_pokes(&self, pokes: &[Poke]) -> Result<(), String> {
        let body = serde_json::to_vec(pokes).map_err(|e| e.to_string())?;
        self.post(POKE_PATH, body).await
    }

    /// Opens a stream the autoscaler answers at `path` (`GET`). The error says whether the
    /// credential was refused (which does not fix itself) and why.
    async fn open_stream(&self, path: &str) -> Result<hyper::body::Incoming, (bool, String)> {
        let request = self
            .request(http::Method::GET, path)
            .body(Full::new(Bytes::new()))
            .map_err(|e| (false, e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| (false, e.to_string()))?;
        if !response.status().is_success() {
            let refused = matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            );
            return Err((refused, self.refused(response).await));
        }
        Ok(response.into_body())
    }

    /// A request for `path` on the autoscaler, with the credential.
    fn request(&self, method: http::Method, path: &str) -> http::request::Builder {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        match &self.token {
            Some(token) => {
                request.header(http::header::AUTHORIZATION, token.current().header_value())
            }
            None => request,
        }
    }

    /// Why the autoscaler did not take a request: for a refused credential, what to do.
    async fn refused(&self, response: http::Response<hyper::body::Incoming>) -> String {
        let status = response.status();
        // The autoscaler's own explanation, bounded: it is only quoted.
        let said = Limited::new(response.into_body(), 1024)
            .collect()
            .await
            .map(|body| String::from_utf8_lossy(&body.to_bytes()).trim().to_string())
            .unwrap_or_default();
        // The autoscaler's hint is written for the CLI; a sidecar's own says what to set.
        let problem = said
            .split_once(':')
            .map_or(said.as_str(), |(first, _)| first);
        match (status, &self.token) {
            (StatusCode::UNAUTHORIZED, None) => format!(
                "the autoscaler wants a credential and this sidecar has none ({status}: {problem}); set AUTOSCALER_TOKEN_FILE to mecha up's STATE_DIR/admin-token, or AUTOSCALER_TOKEN"
            ),
            (StatusCode::UNAUTHORIZED, Some(_)) => format!(
                "the autoscaler refused this sidecar's credential ({status}: {problem}); AUTOSCALER_TOKEN or AUTOSCALER_TOKEN_FILE must hold the token of the mecha up at {}",
                self.addr
            ),
            _ if said.is_empty() => format!("answered {status}"),
            _ => format!("answered {status}: {said}"),
        }
    }

    /// Posts a JSON `body` to `path`; an answer within 1 s that is not a success is an error.
    async fn post(&self, path: &str, body: Vec<u8>) -> Result<(), String> {
        let request = self
            .request(http::Method::POST, path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(1), self.client.request(request))
            .await
            .map_err(|_| "no answer within 1s".to_string())?
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.refused(response).await)
        }
    }
}

/// Keeps `routes` and `endpoints` current from the autoscaler until shutdown; `health` turns
/// ready with the first snapshot (a gateway that never got one, e.g. one whose credential is
/// refused, routes nothing).
pub async fn watch(
    control: ControlPlane,
    activation: Activation,
    routes: watch::Sender<Arc<RoutingTable>>,
    endpoints: watch::Sender<Arc<EndpointTable>>,
    health: Health,
    shutdown: ShutdownSignal,
) {
    let mut reader = SnapshotReader::default();
    follow(
        control,
        WATCH_PATH,
        "routes and endpoints",
        |line| {
            let snapshot: Snapshot =
                serde_json::from_slice(line).map_err(|e| format!("bad snapshot: {e}"))?;
            let (r, e) = reader.read(snapshot, |revision| activation.released(revision));
            routes.send_replace(Arc::new(r));
            endpoints.send_replace(Arc::new(e));
            health.set_ready(true);
            Ok(())
        },
        shutdown,
    )
    .await;
}

/// The longest line [`follow`] takes: a whole state in one line, far above what a control
/// plane of this size sends, and a bound on what a broken one can make a client buffer.
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// Follows a stream of JSON lines the autoscaler serves at `path` (`what` names it in logs)
/// until shutdown, handing each line to `on_line`; a line it refuses ends the session. When a
/// session breaks, whatever `on_line` made of the last lines stays in force, and the stream is
/// opened again after a backoff (100 ms doubling to 5 s, from the start again after a session
/// that delivered a line). The sidecar's route watch and the standalone broker's watch of
/// Brokers and Triggers both run on it.
pub async fn follow(
    control: ControlPlane,
    path: &'static str,
    what: &'static str,
    on_line: impl FnMut(&[u8]) -> Result<(), String>,
    shutdown: ShutdownSignal,
) {
    follow_with(control, path, what, on_line, |_| {}, shutdown).await;
}

/// [`follow`], telling `on_break` why each session ended (before the backoff), so that a
/// process whose readiness depends on the watch can say it is lost; the next line a new
/// session delivers is the sign it is back.
pub async fn follow_with(
    control: ControlPlane,
    path: &'static str,
    what: &'static str,
    mut on_line: impl FnMut(&[u8]) -> Result<(), String>,
    mut on_break: impl FnMut(&str),
    shutdown: ShutdownSignal,
) {
    let autoscaler = control.addr.clone();
    let mut backoff = BACKOFF_START;
    let stop = shutdown.recv();
    tokio::pin!(stop);
    loop {
        // A refused credential is not an interruption that fixes itself: said as an error.
        let mut refused = false;
        let mut lines = 0_usize;
        let session = async {
            let mut body = control
                .open_stream(path)
                .await
                .map_err(|(was_refused, error)| {
                    refused = was_refused;
                    error
                })?;
            tracing::info!(%autoscaler, "watching {what}");
            let mut pending = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line = pending.split_to(end + 1);
                    on_line(&line[..end])?;
                    lines += 1;
                }
                if pending.len() > MAX_LINE {
                    return Err(format!("a line longer than {MAX_LINE} bytes"));
                }
            }
            Err::<(), String>("the stream ended".into())
        };
        tokio::select! {
            result = session => {
                if lines > 0 {
                    backoff = BACKOFF_START;
                }
                match result {
                    Err(error) if refused => {
                        tracing::error!(%autoscaler, %error, "cannot watch {what}; retrying in {backoff:?}");
                        on_break(&error);
                    }
                    Err(error) => {
                        tracing::warn!(%autoscaler, %error, "watch of {what} interrupted; keeping the last state, retrying in {backoff:?}");
                        on_break(&error);
                    }
                    Ok(()) => {}
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
    control: ControlPlane,
    name: String,
    activation: Activation,
    mut pokes: mpsc::UnboundedReceiver<Poke>,
    routes: watch::Receiver<Arc<RoutingTable>>,
    shutdown: ShutdownSignal,
) {
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
                if let Err(error) = control.send_pokes(&batch).await {
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
                    && let Err(error) = control.send_stats(&stats).await {
                        tracing::debug!(%error, "cannot report held load");
                    }
            }
            () = &mut stop => return,
        }
    }
}

/// The gateway role in its own process: serves `listener`, routes and endpoints from the
/// autoscaler `config` names, activation through it; `health` turns ready once the first
/// routes have arrived. Returns once shutdown has drained.
pub async fn serve_gateway(
    listener: TcpListener,
    config: GatewayConfig,
    registry: &Registry,
    health: Health,
    shutdown: ShutdownSignal,
) {
    let GatewayConfig {
        autoscaler,
        domain,
        name,
        drain_timeout,
        token,
        trusted_proxies,
        fast_path,
        limits,
        outlier,
        pass_through,
        ..
    } = config;
    if token.is_none() {
        tracing::warn!(
            %autoscaler,
            "no AUTOSCALER_TOKEN or AUTOSCALER_TOKEN_FILE: an autoscaler that wants a credential (mecha up does) will refuse this gateway"
        );
    }
    let control = ControlPlane::new(autoscaler, token);
    let (activation, pokes) = Activation::new();
    let (routes_tx, routes_rx) = watch::channel(Arc::<RoutingTable>::default());
    let (endpoints_tx, endpoints_rx) = watch::channel(Arc::<EndpointTable>::default());
    let gateway = Gateway::new(
        routes_rx.clone(),
        endpoints_rx,
        activation.clone(),
        &domain,
        registry,
    )
    .with_trusted_proxies(trusted_proxies)
    .with_outlier_detection(outlier);
    let gateway = match (pass_through, listener.local_addr()) {
        (Some(timeout), Ok(own)) => gateway.with_pass_through(timeout, own),
        _ => gateway,
    };
    let watcher = tokio::spawn(watch(
        control.clone(),
        activation.clone(),
        routes_tx,
        endpoints_tx,
        health,
        shutdown.clone(),
    ));
    let reporter = tokio::spawn(report_activation(
        control,
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
            fast_path,
            drain_timeout,
            limits,
        },
    )
    .await;
    let _ = watcher.await;
    let _ = reporter.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use axum::serve::ListenerExt;
    use futures_util::StreamExt;
    use mecha_common::Shutdown;
    use mecha_common::auth;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stream that delivers a line and then breaks is opened again after the first backoff
    /// step every time (a good session starts the backoff afresh); the lines reach the
    /// handler in order and one it refuses ends the session.
    #[tokio::test]
    async fn follow_reconnects_at_once_after_a_good_session() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sessions = Arc::new(AtomicUsize::new(0));
        let counted = sessions.clone();
        let app = axum::Router::new().route(
            "/stream",
            get(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                // One line, then the stream ends: a session that went well, then broke.
                async move { format!("{{\"session\":{n}}}\n") }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let shutdown = Shutdown::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let follower = tokio::spawn(follow(
            ControlPlane::new(addr.to_string(), None),
            "/stream",
            "test lines",
            move |line| {
                let value: serde_json::Value =
                    serde_json::from_slice(line).map_err(|e| e.to_string())?;
                record.lock().expect("lock").push(value["session"].as_u64());
                Ok(())
            },
            shutdown.signal(),
        ));
        // Without the reset the 8th session would come after 100+200+…+5,000 ms (about 15 s);
        // with it, about every 100 ms.
        let started = tokio::time::Instant::now();
        while sessions.load(Ordering::SeqCst) < 8 {
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "only {} sessions in 4 s: the backoff grew after good sessions",
                sessions.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.trigger();
        follower.await.expect("follow ends on shutdown");
        let seen = seen.lock().expect("lock").clone();
        assert!(seen.len() >= 7, "{seen:?}");
        assert!(
            seen.iter().enumerate().all(|(i, n)| *n == Some(i as u64)),
            "{seen:?}"
        );
    }

    /// Watch, stats and pokes all go through one `ControlPlane`: every request carries the
    /// credential, and the reports share one kept-alive connection beside the watch stream's.
    #[tokio::test]
    async fn one_client_carries_the_watch_stats_and_pokes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        // (path, Authorization) of every request the autoscaler saw.
        type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
        let seen: Seen = Arc::default();
        let line = format!(
            "{}\n",
            serde_json::to_string(&Snapshot::default()).expect("json")
        );
        let record = seen.clone();
        let app = axum::Router::new()
            .route(
                WATCH_PATH,
                get(move || async move {
                    // One snapshot, then the stream stays open, as the autoscaler's does.
                    let first = futures_util::stream::once(async move {
                        Ok::<_, std::convert::Infallible>(line)
                    });
                    axum::body::Body::from_stream(first.chain(futures_util::stream::pending()))
                }),
            )
            .route(STATS_PATH, post(|| async { StatusCode::ACCEPTED }))
            .route(POKE_PATH, post(|| async { StatusCode::ACCEPTED }))
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    let record = record.clone();
                    async move {
                        let auth = request
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        record
                            .lock()
                            .expect("lock")
                            .push((request.uri().path().to_string(), auth));
                        next.run(request).await
                    }
                },
            ));
        let counted = connections.clone();
        let listener = listener.tap_io(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let control = ControlPlane::new(
            addr.to_string(),
            Some(ClientToken::Fixed(
                AdminToken::parse("s3cret-0123456789abcdef0123456789ab").expect("token"),
            )),
        );
        let (activation, _pokes) = Activation::new();
        let (routes_tx, mut routes) = watch::channel(Arc::<RoutingTable>::default());
        let (endpoints_tx, _endpoints) = watch::channel(Arc::<EndpointTable>::default());
        let health = Health::default();
        let shutdown = Shutdown::new();
        let watcher = tokio::spawn(watch(
            control.clone(),
            activation,
            routes_tx,
            endpoints_tx,
            health.clone(),
            shutdown.signal(),
        ));
        tokio::time::timeout(Duration::from_secs(10), routes.changed())
            .await
            .expect("the first snapshot in time")
            .expect("the watch runs");
        assert!(health.is_ready(), "ready with the first snapshot");
        let stat = Stat {
            revision: "hello-00001".into(),
            replica: "gateway-1".into(),
            concurrency: 1.0,
            requests: 1,
            seconds: 1.0,
        };
        let poke = Poke {
            revision: "hello-00001".into(),
            waiting: 1,
        };
        for _ in 0..5 {
            control
                .send_stats(std::slice::from_ref(&stat))
                .await
                .expect("stats");
            control
                .send_pokes(std::slice::from_ref(&poke))
                .await
                .expect("pokes");
        }
        shutdown.trigger();
        watcher.await.expect("the watch stops");
        server.abort();

        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 11, "{seen:?}");
        assert_eq!(seen[0].0, WATCH_PATH);
        assert!(
            seen.iter()
                .all(|(_, auth)| auth.as_deref()
                    == Some("Bearer s3cret-0123456789abcdef0123456789ab")),
            "{seen:?}"
        );
        assert_eq!(
            connections.load(Ordering::SeqCst),
            2,
            "the watch stream's connection and one for every report"
        );
    }

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

    #[test]
    fn outlier_detection_is_set_by_flag_or_variable() {
        let args = |extra: &[&str]| {
            let mut args = vec!["--autoscaler-addr".to_string(), "127.0.0.1:1".to_string()];
            args.extend(extra.iter().map(ToString::to_string));
            args
        };
        let config = GatewayConfig::from_args_and_env(&args(&[]), |_| None).expect("ok");
        assert_eq!(config.outlier, OutlierConfig::DEFAULT);
        let config = GatewayConfig::outbound_from_args_and_env(
            &args(&["--outlier-failures", "5", "--outlier-ejection-time=2s"]),
            |k| (k == "GATEWAY_OUTLIER_MAX_EJECTION_TIME").then(|| "1m".to_string()),
        )
        .expect("ok");
        assert_eq!(
            config.outlier,
            OutlierConfig {
                consecutive_failures: 5,
                base_ejection: Duration::from_secs(2),
                max_ejection: Duration::from_secs(60),
            }
        );
        let error =
            GatewayConfig::from_args_and_env(&args(&["--outlier-ejection-time", "10m"]), |_| None)
                .expect_err("max below base");
        assert_eq!(error.setting, "GATEWAY_OUTLIER_MAX_EJECTION_TIME");
        let error =
            GatewayConfig::from_args_and_env(&args(&["--outlier-failures", "-1"]), |_| None)
                .expect_err("negative");
        assert_eq!(error.setting, "GATEWAY_OUTLIER_FAILURES");
    }

    #[test]
    fn the_credential_comes_from_a_variable_or_a_private_file() {
        let none = autoscaler_token(&|_: &str| None).expect("optional");
        assert!(none.is_none());
        let token = autoscaler_token(&|k: &str| {
            (k == "AUTOSCALER_TOKEN").then(|| "s3cret-0123456789abcdef0123456789ab\n".into())
        })
        .expect("ok")
        .expect("some");
        assert_eq!(
            token.current().as_str(),
            "s3cret-0123456789abcdef0123456789ab"
        );
        let error = autoscaler_token(&|k: &str| (k == "AUTOSCALER_TOKEN").then(|| " ".into()))
            .expect_err("empty");
        assert_eq!(error.setting, "AUTOSCALER_TOKEN");
        let error =
            autoscaler_token(&|_: &str| Some("/nonexistent/admin-token".into())).expect_err("both");
        assert!(error.reason.contains("not both"), "{error}");
        let error = autoscaler_token(&|k: &str| {
            (k == "AUTOSCALER_TOKEN_FILE").then(|| "/nonexistent/admin-token".into())
        })
        .expect_err("missing file");
        assert_eq!(error.setting, "AUTOSCALER_TOKEN_FILE");
        assert!(
            error.reason.contains("no admin credential found"),
            "{error}"
        );

        let dir = std::env::temp_dir().join(format!("sidecar-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let made = auth::load_or_create(&dir).expect("token");
        let file = auth::token_path(&dir).to_string_lossy().into_owned();
        let read =
            autoscaler_token(&|k: &str| (k == "AUTOSCALER_TOKEN_FILE").then(|| file.clone()))
                .expect("ok");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read.map(|t| t.current()), Some(made));
    }
}
