//! `mecha up`: the whole platform in one process — desired state from YAML, the controller,
//! the process supervisor, the gateway on the ingress port and the admin API on loopback.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use activator_sidecar::body::ProxyBody;
use activator_sidecar::h1::codec::RequestHead;
use activator_sidecar::h1::{Decision, Failure, Role, Whole};
use activator_sidecar::rules::HopPolicy;
use activator_sidecar::{Gateway, ProxyError};
use autoscaler::logs::LogHub;
use autoscaler::{Controller, Supervisor, SupervisorConfig};
use eventing_broker::{BrokerConfig, EventBroker, EventLog, RedbLog};
use http_body_util::BodyExt;
use hyper::StatusCode;
use mecha_common::admin::Health;
use mecha_common::auth::{self, Credential, Refusals};
use mecha_common::outlier::OutlierConfig;
use mecha_common::{Activation, Shutdown, ShutdownSignal};
use prometheus::Registry;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState, DOMAIN};
use crate::output;
use crate::store::LocalStore;

/// How long waiting for a service's first ready replica goes before `mecha up` says so.
const SLOW_START: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct UpConfig {
    pub paths: Vec<PathBuf>,
    pub bind: IpAddr,
    pub port: u16,
    pub admin_port: u16,
    pub state_dir: PathBuf,
    pub grace_period: Duration,
    /// Largest request body the broker ingress accepts.
    pub max_event_size: usize,
    /// Deliveries in flight per trigger.
    pub delivery_concurrency: usize,
    /// Proxies in front of the gateway whose forwarding headers are believed.
    pub trusted_proxies: activator_sidecar::rules::TrustedProxies,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    /// The request bodies the gateway port holds at once for the broker ingress and the
    /// webhooks, and how long each may take to arrive.
    pub body_budget: mecha_common::BudgetSettings,
    /// Client connections of the gateway; by default from the file limit.
    pub max_connections: Option<usize>,
    /// When the gateway takes a failing replica out of rotation.
    pub outlier: OutlierConfig,
    /// The broker's log on NATS JetStream (`nats://…`, checked); `None`: the embedded log.
    pub event_log: Option<String>,
}

pub async fn run(config: UpConfig) -> ExitCode {
    // Listened for before anything starts: a SIGINT or SIGTERM during start-up drains what
    // started instead of killing the process with its event log open.
    let mut signals = Signals::new();
    // Everything is validated before anything starts: what the last run kept, then the YAML
    // given here on top of it.
    let (files, errors) = crds::load::yaml_files(&config.paths);
    if !errors.is_empty() {
        return output::refuse(&errors);
    }
    let mut contents = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(content) => contents.push((file, content)),
            Err(error) => {
                return output::refuse(&[crds::LoadError::file(
                    &file,
                    format!("cannot read: {error}"),
                )]);
            }
        }
    }
    // The credential exists before the admin API listens, so no request is ever unguarded
    // (and the state directory, owner-only, before anything is kept in it).
    let token = match auth::load_or_create(&config.state_dir) {
        Ok(token) => token,
        Err(error) => {
            eprintln!("error: the admin API's credential: {error}");
            return ExitCode::from(1);
        }
    };
    let store = match LocalStore::restore(&config.state_dir) {
        Ok(store) => Arc::new(store),
        Err(error) => {
            eprintln!("error: restoring what was applied before: {error}");
            eprintln!(
                "hint: fix the files named above, or move {} away to start without them",
                config.state_dir.join(crate::store::STATE_FILE).display()
            );
            return ExitCode::from(1);
        }
    };
    if let Err(errors) = store.apply_files(&contents) {
        return output::refuse(&errors);
    }
    raise_open_files_limit();
    let token_path = auth::token_path(&config.state_dir);
    let hint = format!(
        "run mecha commands from the directory `mecha up` runs in, or pass --state-dir; \
         they read the token from {} (or pass --token / {}; sidecars: AUTOSCALER_TOKEN or \
         AUTOSCALER_TOKEN_FILE)",
        std::path::absolute(&token_path)
            .unwrap_or_else(|_| token_path.clone())
            .display(),
        auth::TOKEN_ENV,
    );
    let gateway_listener = match bind(config.bind, config.port, "the gateway", "--port").await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let admin_listener = match bind(
        IpAddr::from([127, 0, 0, 1]),
        config.admin_port,
        "the admin API",
        "--admin-port",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    // The mesh proxy of meshed functions (`mecha.dev/mesh: "true"`): the outbound role, on
    // loopback only, like the admin API.
    let mesh_listener = match bind(
        IpAddr::from([127, 0, 0, 1]),
        0,
        "the mesh proxy",
        "a free port",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let (Ok(gateway_addr), Ok(admin_addr), Ok(mesh_addr)) = (
        gateway_listener.local_addr(),
        admin_listener.local_addr(),
        mesh_listener.local_addr(),
    ) else {
        eprintln!("error: cannot read the listening addresses");
        return ExitCode::from(1);
    };

    // The client commands run with the same state directory find this instance here.
    if let Err(error) = auth::write_private(
        &config.state_dir,
        crate::client::ADMIN_ADDR_FILE,
        format!("{admin_addr}\n").as_bytes(),
    ) {
        tracing::warn!(%error, "cannot record the admin address in the state directory; clients need --admin-addr");
    }
    let log = match open_event_log(&config).await {
        Ok(log) => log,
        Err(code) => return code,
    };
    let registry = Registry::new();
    let refusals = Refusals::register(&registry);
    let health = Health::default();
    let shutdown = Shutdown::new();
    mecha_common::memory::release_after_bursts(shutdown.signal());
    let logs = LogHub::new(true);
    let (activation, pokes) = Activation::new();
    let supervisor = Supervisor::new(
        SupervisorConfig {
            grace_period: config.grace_period,
            // Replicas run under this very binary's `__replica-guard`, so that nothing they
            // start outlives a SIGKILLed `mecha up` (see `autoscaler::guard`).
            guard: std::env::current_exe()
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot find the mecha binary to guard replicas with; a replica's children may outlive a crash of mecha up");
                })
                .ok(),
            mesh_proxy: Some(format!("http://{mesh_addr}")),
            ..SupervisorConfig::default()
        },
        logs.clone(),
        activation.clone(),
        &registry,
    );
    let controller = Controller::new(
        store.subscribe(),
        supervisor.clone(),
        activation.clone(),
        pokes,
        DOMAIN,
        &registry,
    );
    let scaling = controller.status_board();
    let controller_routes = controller.routes();
    // Standalone brokers (`eventing-broker`) read the Brokers and Triggers of this store, and
    // standalone importers (`importers`) its sources, with sinks resolved here.
    let (sources_tx, sources_rx) = tokio::sync::watch::channel(Arc::default());
    let control_api = controller
        .api(shutdown.signal())
        .with_eventing(store.subscribe_eventing())
        .with_sources(sources_rx);
    let gateway = Gateway::new(
        controller.routes(),
        supervisor.endpoints(),
        activation.clone(),
        DOMAIN,
        &registry,
    )
    .with_trusted_proxies(config.trusted_proxies.clone())
    .with_outlier_detection(config.outlier);
    // Meshed functions' calls: the same routes, holding and replica choice, and calls for
    // hosts outside Mecha passed on (as the outbound role in a cluster's pods does).
    let mesh = gateway
        .clone()
        .with_pass_through(MESH_PASS_THROUGH_TIMEOUT, mesh_addr);
    let broker = EventBroker::new(
        log,
        store.subscribe_eventing(),
        BrokerConfig {
            max_event_size: config.max_event_size,
            default_timeout: Duration::from_secs(60),
            concurrency: config.delivery_concurrency,
            ingress: gateway_addr,
            broker_ingress: None,
            domain: DOMAIN.to_string(),
            // The gateway, the way to most subscribers, has stopped by then.
            drain_timeout: std::time::Duration::ZERO,
        },
        &registry,
    );
    // A broker whose log cannot be read or written makes the whole of `mecha up` not ready.
    health.add_check({
        let broker = broker.clone();
        move || broker.problem().map(|why| format!("broker: {why}"))
    });
    // What ApiServerSources watch: every resource, Revisions with their readiness.
    let objects_tx = tokio::sync::watch::channel(Arc::new(importers::apiserver::Objects::new())).0;
    let objects_task = watch_task(
        &health,
        &shutdown,
        "resource feed (ApiServerSources)",
        tokio::spawn(crate::workloads::publish_objects(
            store.clone(),
            supervisor.clone(),
            objects_tx.clone(),
            shutdown.signal(),
        )),
    );
    // Triggers run before the gateway (and with it the ingress) takes a request.
    let importers = importers::Importers::new(
        store.subscribe_sources(),
        importers::ImportersConfig {
            processes: Some(Arc::new(crate::workloads::SupervisedProcesses::new(
                supervisor.clone(),
            ))),
            objects: Some(objects_tx.subscribe()),
            ..importers::ImportersConfig::new(gateway_addr, DOMAIN)
        },
        &registry,
    );
    let broker_task = watch_task(
        &health,
        &shutdown,
        "broker (trigger checkpoints and retention)",
        broker.clone().start(shutdown.signal()).await,
    );
    let controller_task = watch_task(
        &health,
        &shutdown,
        "controller",
        tokio::spawn(controller.run(shutdown.signal())),
    );
    let serve_options = activator_sidecar::server::ServeOptions {
        fast_path: true,
        drain_timeout: config.grace_period,
        // After raising the file limit, so the default follows the raised one.
        limits: activator_sidecar::limits::Limits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            body_read_timeout: config.body_read_timeout,
            max_connections: config
                .max_connections
                .unwrap_or_else(activator_sidecar::limits::max_from_file_limit),
        },
    };
    let gateway_task = watch_task(
        &health,
        &shutdown,
        "gateway",
        tokio::spawn(activator_sidecar::server::serve(
            gateway_listener,
            Arc::new(Front {
                gateway: gateway.clone(),
                broker: broker.clone(),
                importers: importers.clone(),
                budget: mecha_common::BodyBudget::new("gateway", config.body_budget, &registry),
            }),
            activator_sidecar::server::Workers::current(),
            shutdown.signal(),
            serve_options.clone(),
        )),
    );
    let mesh_task = watch_task(
        &health,
        &shutdown,
        "mesh proxy",
        tokio::spawn(activator_sidecar::server::serve(
            mesh_listener,
            Arc::new(mesh),
            activator_sidecar::server::Workers::current(),
            shutdown.signal(),
            serve_options,
        )),
    );
    // Sources send through the gateway's listener (bound above), so they start after it.
    let importers_task = watch_task(
        &health,
        &shutdown,
        "importers (event sources)",
        importers.clone().start(shutdown.signal()),
    );
    let snapshots_task = watch_task(
        &health,
        &shutdown,
        "source snapshots (standalone importers)",
        tokio::spawn(importers.clone().publish(sources_tx, shutdown.signal())),
    );
    let bindings_task = watch_task(
        &health,
        &shutdown,
        "sink bindings",
        tokio::spawn(crate::workloads::follow_bindings(
            importers.clone(),
            store.subscribe_sources(),
            store.subscribe(),
            supervisor.clone(),
            shutdown.signal(),
        )),
    );
    let admin_router = admin::router(
        AdminState {
            store: store.clone(),
            supervisor: supervisor.clone(),
            scaling: scaling.clone(),
            logs,
            gateway_port: gateway_addr.port(),
            shutdown: shutdown.signal(),
            broker: broker.clone(),
            importers: importers.clone(),
            routes: controller_routes.clone(),
        },
        control_api,
        health.clone(),
        registry.clone(),
        Credential::new(token, hint),
        refusals,
    );
    let admin_shutdown = shutdown.signal();
    let admin_task = watch_task(
        &health,
        &shutdown,
        "admin API",
        tokio::spawn(mecha_common::serve::serve(
            admin_listener,
            admin_router,
            mecha_common::serve::ServeLimits {
                drain_timeout: config.grace_period,
                ..mecha_common::serve::ServeLimits::default()
            },
            admin_shutdown,
        )),
    );

    println!("Mecha is running in local mode.");
    println!(
        "  gateway  http://{gateway_addr}  (services answer on http://{{name}}.{{namespace}}.{DOMAIN}:{})",
        gateway_addr.port()
    );
    println!(
        "  admin    http://{admin_addr}  (/metrics, /live, /ready; MECHA_ADMIN_ADDR={admin_addr})"
    );
    println!("  state    {}", config.state_dir.display());
    match &config.event_log {
        Some(url) => println!("  events   {url}  (NATS JetStream)"),
        None => println!(
            "  events   {}  (embedded log)",
            config.state_dir.join("events.redb").display()
        ),
    }
    println!(
        "  token    {}  (the admin API's credential; mecha commands read it from here)",
        token_path.display()
    );
    println!();
    output::print_services(&admin::service_views(
        &store,
        &supervisor,
        &scaling,
        &controller_routes.borrow().clone(),
        gateway_addr.port(),
    ));
    if !store.eventing().brokers.is_empty() {
        println!();
        output::print_brokers(&admin::broker_views(&broker));
        println!();
        output::print_triggers(&admin::trigger_views(&broker, &store.snapshot()));
    }
    if !store.sources().sources.is_empty() {
        println!();
        output::print_sources(&admin::source_views(
            &importers,
            &broker.state(),
            &store.snapshot(),
        ));
    }
    println!();
    println!("Press Ctrl-C to stop.");
    health.set_ready(true);
    watch_task(
        &health,
        &shutdown,
        "readiness reporter",
        tokio::spawn(report_readiness(
            store.clone(),
            supervisor.clone(),
            gateway_addr,
            shutdown.signal(),
        )),
    );

    signals.next().await;
    println!(
        "Stopping: finishing in-flight requests, then stopping replicas (Ctrl-C again to force)."
    );
    health.set_ready(false);
    shutdown.trigger();
    let graceful = async {
        let _ = importers_task.await;
        let _ = bindings_task.await;
        let _ = snapshots_task.await;
        let _ = objects_task.await;
        let _ = controller_task.await;
        let _ = gateway_task.await;
        let _ = mesh_task.await;
        // Deliveries in flight stop here; their events stay in the log for the next start.
        let _ = broker_task.await;
        supervisor.shutdown().await;
        let _ = admin_task.await;
    };
    tokio::select! {
        () = graceful => println!("Stopped."),
        () = signals.next() => {
            supervisor.kill_all();
            println!("Forced stop: replicas killed.");
        }
    }
    // Clients stop looking for this instance here (they check who listens anyway).
    let _ = std::fs::remove_file(config.state_dir.join(crate::client::ADMIN_ADDR_FILE));
    ExitCode::SUCCESS
}

/// Watches a background task that should run until shutdown: if it ends before (returns, or
/// panics), `mecha up` turns not ready with the reason and logs why, instead of going on
/// silently without it. The returned handle finishes when the task does.
fn watch_task<T: Send + 'static>(
    health: &Health,
    shutdown: &Shutdown,
    name: &'static str,
    task: tokio::task::JoinHandle<T>,
) -> tokio::task::JoinHandle<()> {
    let (health, stopping) = (health.clone(), shutdown.signal());
    tokio::spawn(async move {
        let why = match task.await {
            Ok(_) if stopping.is_triggered() => return,
            Ok(_) => "stopped unexpectedly".to_string(),
            Err(error) if error.is_panic() => {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("panicked: {message}")
            }
            Err(error) => format!("stopped: {error}"),
        };
        tracing::error!(task = name, reason = %why, "a background task of mecha up stopped; mecha up is not ready");
        health.set_problem(name, Some(why));
    })
}

/// Requests without a service host — `localhost`, an IP address, or no Host at all — are for
/// the broker ingress.
fn is_ingress_host<B>(request: &hyper::Request<B>) -> bool {
    activator_sidecar::gateway::request_host(request).is_none_or(|host| is_bare_host(&host))
}

/// `localhost` or an IP address: no service's host.
fn is_bare_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || bare.parse::<IpAddr>().is_ok()
}

/// The gateway port: service hosts are the gateway's; bare hosts and requests without a host
/// are answered here: the broker ingress (`localhost:8080/{namespace}/{broker}`) on the fast
/// path when the body is framed by `Content-Length` (`Decision::Whole`), by the general
/// server otherwise, and the webhook sources
/// (`localhost:8080/webhooks/{github|gitlab}/{namespace}/{name}`) by the general server.
#[derive(Debug)]
struct Front {
    gateway: Gateway,
    broker: eventing_broker::EventBroker,
    importers: importers::Importers,
    /// The port's budget for the bodies the broker ingress and the webhooks read whole.
    budget: mecha_common::BodyBudget,
}

impl Role for Front {
    type Ticket = <Gateway as Role>::Ticket;

    const NEEDS_HOST: bool = true;

    fn policy(&self) -> &HopPolicy {
        self.gateway.policy()
    }

    async fn handle(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> hyper::Response<ProxyBody> {
        if is_ingress_host(&request) && request.uri().path().starts_with("/webhooks/") {
            self.importers
                .handle_webhook(&self.budget, request)
                .await
                .map(|body| body.map_err(|never| match never {}).boxed_unsync())
        } else if is_ingress_host(&request) {
            eventing_broker::ingress::handle(&self.broker, &self.budget, request)
                .await
                .map(|body| body.map_err(|never| match never {}).boxed_unsync())
        } else {
            self.gateway.handle(request, peer).await
        }
    }

    async fn dispatch(&self, head: &RequestHead, retry: &[SocketAddr]) -> Decision<Self::Ticket> {
        if head.host.as_deref().is_none_or(is_bare_host) {
            // The broker ingress (and the webhooks, which `before_body` leaves to hyper).
            return Decision::Whole;
        }
        self.gateway.dispatch(head, retry).await
    }

    fn before_body(&self, parts: &hyper::http::request::Parts) -> Whole<'_> {
        if parts.uri.path().starts_with("/webhooks/") {
            // The webhooks are answered by hyper: few, and their receivers read the body
            // themselves.
            return Whole::Fallback;
        }
        match eventing_broker::ingress::route(&self.broker, parts) {
            None => Whole::Read {
                budget: &self.budget,
                max: self.broker.config().max_event_size,
            },
            Some(response) => Whole::Answer(response),
        }
    }

    async fn answer_whole(
        &self,
        parts: hyper::http::request::Parts,
        body: Result<mecha_common::Buffered, mecha_common::BodyError>,
        _peer: SocketAddr,
    ) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
        eventing_broker::ingress::answer(&self.broker, parts, body).await
    }

    fn may_retry(&self, ticket: &Self::Ticket, attempts: usize) -> bool {
        self.gateway.may_retry(ticket, attempts)
    }

    fn replied(&self, ticket: &Self::Ticket, reply: Result<(), &Failure>) {
        self.gateway.replied(ticket, reply);
    }

    fn failed(&self, ticket: &Self::Ticket, failure: Failure) -> ProxyError {
        self.gateway.failed(ticket, failure)
    }

    fn finished(&self, ticket: Option<Self::Ticket>, status: StatusCode) {
        self.gateway.finished(ticket, status);
    }
}

/// Every held or proxied request costs file descriptors (client and replica sockets); a burst
/// of a thousand requests needs more than the usual soft limit of 1024, so raise it to the
/// hard limit as Go programs and nginx do.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "cannot raise the open files limit");
        }
    }
}

/// The embedded log in the state directory, or JetStream with `--event-log`.
async fn open_event_log(config: &UpConfig) -> Result<Arc<dyn EventLog>, ExitCode> {
    if let Some(url) = &config.event_log {
        return open_jetstream(url).await;
    }
    let log_path = config.state_dir.join("events.redb");
    match RedbLog::open(&log_path) {
        Ok(log) => Ok(Arc::new(log)),
        Err(error) => {
            // The error says what is wrong and what to do; it blames another process only
            // when the file's lock really is held.
            eprintln!("error: {error}");
            Err(ExitCode::from(1))
        }
    }
}

#[cfg(feature = "nats")]
async fn open_jetstream(url: &str) -> Result<Arc<dyn EventLog>, ExitCode> {
    use eventing_broker::log::jetstream::{JetStreamConfig, JetStreamLog};
    let config = JetStreamConfig::from_url(url).map_err(|error| {
        eprintln!("error: --event-log: {error}");
        ExitCode::from(2)
    })?;
    match JetStreamLog::connect(config).await {
        Ok(log) => Ok(Arc::new(log)),
        Err(error) => {
            eprintln!("error: --event-log {url}: {error}");
            Err(ExitCode::from(1))
        }
    }
}

#[cfg(not(feature = "nats"))]
async fn open_jetstream(url: &str) -> Result<Arc<dyn EventLog>, ExitCode> {
    // The flag's parser refuses it already; this keeps the two builds' code paths whole.
    eprintln!("error: --event-log {url}: this mecha was built without NATS support");
    Err(ExitCode::from(2))
}

async fn bind(ip: IpAddr, port: u16, what: &str, flag: &str) -> Result<TcpListener, ExitCode> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr).await.map_err(|error| {
        eprintln!(
            "error: cannot listen on {addr} for {what}: {error} (choose another port with {flag})"
        );
        ExitCode::from(1)
    })
}

/// How long the mesh proxy waits for a host outside Mecha that a meshed function calls.
const MESH_PASS_THROUGH_TIMEOUT: Duration = Duration::from_secs(300);

/// Prints a line when each service's newest revision first becomes ready, and a hint when
/// that takes long: the user sees progress instead of silence.
async fn report_readiness(
    store: Arc<LocalStore>,
    supervisor: Supervisor,
    gateway: SocketAddr,
    shutdown: ShutdownSignal,
) {
    let mut announced = BTreeSet::new();
    let mut warned = BTreeSet::new();
    let mut endpoints = supervisor.endpoints();
    let mut state = store.subscribe();
    loop {
        for record in store.snapshot().services() {
            let Some(latest) = record.latest() else {
                continue;
            };
            if announced.contains(&latest.name) {
                continue;
            }
            // Measured from when this revision was created (at load or by an apply), not
            // from when `mecha up` started.
            let age = store
                .created(&latest.name)
                .and_then(|created| created.elapsed().ok())
                .unwrap_or_default();
            if supervisor.ever_ready(&latest.name) {
                println!(
                    "ready: {} ({}) at http://{}.{}.{DOMAIN}:{} after {} ms",
                    record.key,
                    latest.name,
                    record.key.name,
                    record.key.namespace,
                    gateway.port(),
                    age.as_millis()
                );
                announced.insert(latest.name.clone());
            } else if age > SLOW_START && warned.insert(latest.name.clone()) {
                println!(
                    "waiting: {} ({}) has no ready replica after {}s; its output is above (or `mecha logs {}`)",
                    record.key,
                    latest.name,
                    SLOW_START.as_secs(),
                    record.key.name
                );
            }
        }
        tokio::select! {
            _ = endpoints.changed() => {}
            _ = state.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.clone().recv() => return,
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, however many times they come; both handlers are installed
/// when this is made, so a signal before the first `next` is kept for it.
struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.int) => {}
            () = recv(&mut self.term) => {}
        }
    }
}
