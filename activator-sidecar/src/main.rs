//! `activator-sidecar ROLE [--flag value ...]`: one data-path role on its own.
//!
//! `inbound` is Knative's queue-proxy role, configured like it from the environment
//! (`QUEUE_SERVING_PORT`, `USER_PORT`, `CONTAINER_CONCURRENCY`, …) or the equivalent flags.
//! `gateway` routes external traffic with routes and endpoints streamed from the autoscaler;
//! `outbound` is the same on loopback, as a caller's HTTP proxy (the mesh client).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use activator_sidecar::discovery::{GatewayConfig, serve_gateway};
use activator_sidecar::inbound::{Inbound, InboundConfig};
use activator_sidecar::server::Workers;
use activator_sidecar::settings;
use mecha_common::Shutdown;
use mecha_common::admin::Health;
use tokio::net::TcpListener;

fn usage() -> String {
    format!(
        "usage: activator-sidecar ROLE [--flag value ...]\n\n\
         inbound: Knative's queue-proxy role in front of one container (containerConcurrency,\n\
         readiness probing, load metrics and reports).\n\n{}\n\
         gateway: external traffic routed by Host, with routes, endpoints and activation from\n\
         the autoscaler (e.g. `mecha up`'s admin address).\n\n{}\n\
         outbound: the mesh client of one caller: the gateway on 127.0.0.1, used as the\n\
         caller's HTTP proxy (HTTP_PROXY=http://127.0.0.1:15001).\n\n{}\n\
         Logs: MECHA_LOG (tracing filter), MECHA_LOG_FORMAT=json.\n",
        settings::help(InboundConfig::SETTINGS),
        settings::help(GatewayConfig::SETTINGS),
        settings::help(GatewayConfig::OUTBOUND_SETTINGS)
    )
}

// One thread: a sidecar runs next to every replica, where CPU per request matters more than
// spreading over cores; measured with loadtests/proxy-throughput.sh, the single-threaded
// runtime costs about a fifth less CPU per request than the multi-threaded one.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    mecha_common::telemetry::init_tracing_from_env();
    match args.first().map(String::as_str) {
        Some("inbound") => run_inbound(&args[1..]).await,
        Some("gateway") => run_gateway(&args[1..], Role::Gateway).await,
        Some("-h" | "--help") | None => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        Some("outbound") => run_gateway(&args[1..], Role::Outbound).await,
        Some(other) => {
            eprintln!("error: unknown role {other:?}\n\n{}", usage());
            ExitCode::from(2)
        }
    }
}

async fn run_inbound(args: &[String]) -> ExitCode {
    let config = match mecha_common::settings::read(args, usage, |args| {
        InboundConfig::from_args_and_env(args, mecha_common::settings::process_env)
    }) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let serving = match mecha_common::serve::listen(
        all_interfaces(config.serving_port),
        "requests (QUEUE_SERVING_PORT)",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let admin = match mecha_common::serve::listen(
        all_interfaces(config.admin_port),
        "the admin endpoints (QUEUE_ADMIN_PORT)",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let registry = prometheus::Registry::new();
    let health = Health::default();
    let drain_timeout = config.drain_timeout;
    tracing::info!(
        serving = config.serving_port,
        admin = config.admin_port,
        user = config.user_port,
        container_concurrency = config.container_concurrency,
        threads = config.threads,
        "inbound sidecar starting"
    );
    let workers = match Workers::start(config.threads) {
        Ok(workers) => workers,
        Err(error) => {
            eprintln!(
                "error: cannot start {} threads (SIDECAR_THREADS): {error}",
                config.threads
            );
            return ExitCode::from(1);
        }
    };
    let inbound = Inbound::new(config, health.clone(), &registry);
    let shutdown = Shutdown::new();
    mecha_common::memory::release_after_bursts(shutdown.signal());
    let background = tokio::spawn(inbound.clone().run_background());
    let options = activator_sidecar::server::ServeOptions {
        fast_path: inbound.config().fast_path,
        drain_timeout,
        limits: inbound.config().limits.clone(),
    };
    let server = tokio::spawn(activator_sidecar::server::serve(
        serving,
        std::sync::Arc::new(inbound.clone()),
        workers,
        shutdown.signal(),
        options,
    ));
    let admin_task = serve_admin(admin, health.clone(), registry, shutdown.signal());

    match mecha_common::shutdown::stop_signals() {
        Ok(stop) => stop.await,
        Err(error) => {
            eprintln!("error: cannot listen for SIGTERM: {error}");
            return ExitCode::from(1);
        }
    }
    tracing::info!("draining");
    // Unready first, so nothing new is routed here, then finish what is in flight.
    background.abort();
    health.set_ready(false);
    shutdown.trigger();
    let _ = server.await;
    let _ = admin_task.await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The gateway serves everyone on all interfaces; the outbound role serves its own pod's
/// caller on loopback only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Gateway,
    Outbound,
}

async fn run_gateway(args: &[String], role: Role) -> ExitCode {
    let env = mecha_common::settings::process_env;
    let config = match mecha_common::settings::read(args, usage, |args| match role {
        Role::Gateway => GatewayConfig::from_args_and_env(args, env),
        Role::Outbound => GatewayConfig::outbound_from_args_and_env(args, env),
    }) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let listener = match role {
        Role::Gateway => {
            mecha_common::serve::listen(
                all_interfaces(config.port),
                "external traffic (GATEWAY_PORT)",
            )
            .await
        }
        Role::Outbound => {
            let loopback = SocketAddr::from(([127, 0, 0, 1], config.port));
            mecha_common::serve::listen(loopback, "the caller (OUTBOUND_PORT)").await
        }
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let admin = match mecha_common::serve::listen(
        all_interfaces(config.admin_port),
        "the admin endpoints (GATEWAY_ADMIN_PORT)",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let registry = prometheus::Registry::new();
    let health = Health::default();
    let shutdown = Shutdown::new();
    mecha_common::memory::release_after_bursts(shutdown.signal());
    let admin_task = serve_admin(admin, health.clone(), registry.clone(), shutdown.signal());
    let signal = shutdown.signal();
    // Ready once the first routes arrive from the autoscaler, not before: a gateway that
    // cannot watch (refused credential, no autoscaler) routes nothing.
    let ready = health.clone();
    let gateway = tokio::spawn(async move {
        serve_gateway(listener, config, &registry, ready, signal).await;
    });
    match mecha_common::shutdown::stop_signals() {
        Ok(stop) => stop.await,
        Err(error) => {
            eprintln!("error: cannot listen for SIGTERM: {error}");
            return ExitCode::from(1);
        }
    }
    tracing::info!("draining");
    health.set_ready(false);
    shutdown.trigger();
    let _ = gateway.await;
    let _ = admin_task.await;
    ExitCode::SUCCESS
}

fn all_interfaces(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// `/live`, `/ready`, `/metrics` until shutdown.
fn serve_admin(
    listener: TcpListener,
    health: Health,
    registry: prometheus::Registry,
    shutdown: mecha_common::ShutdownSignal,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(mecha_common::serve::serve_admin(
        listener, health, registry, shutdown,
    ))
}
