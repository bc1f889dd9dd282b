//! `eventing-broker [--flag value ...]`: the Knative Broker data plane on its own — ingress,
//! triggers and deliveries — with Brokers and Triggers from the control plane and its events
//! in NATS JetStream (several replicas share it) or an embedded file (one replica). Settings
//! come from the environment or the equivalent flags (`--help`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use activator_sidecar::settings;
use eventing_broker::standalone::{self, StandaloneConfig};

fn usage() -> String {
    format!(
        "usage: eventing-broker [--flag value ...]\n\n\
         The broker on its own: events posted to /{{namespace}}/{{broker}} on the ingress port are\n\
         stored in the event log and delivered to the matching triggers. Brokers and Triggers\n\
         come from the control plane (AUTOSCALER_ADDR, e.g. `mecha up`'s admin address).\n\
         Replicas on one nats:// log share the work; each event reaches each trigger once.\n\n{}\n\
         Ingress limits (environment): SIDECAR_HEADER_READ_TIMEOUT (10s), SIDECAR_IDLE_TIMEOUT\n\
         (60s), SIDECAR_BODY_READ_TIMEOUT (30s), SIDECAR_MAX_CONNECTIONS (half the file limit).\n\
         Logs: MECHA_LOG (tracing filter), MECHA_LOG_FORMAT=json.\n",
        settings::help(StandaloneConfig::SETTINGS)
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match mecha_common::settings::read(&args, usage, |args| {
        StandaloneConfig::from_args_and_env(args, mecha_common::settings::process_env)
    }) {
        Ok(config) => config,
        Err(code) => return code,
    };
    mecha_common::telemetry::init_tracing_from_env();
    mecha_common::serve::run_component(
        (config.port, "the ingress (BROKER_PORT)"),
        (config.admin_port, "the admin endpoints (BROKER_ADMIN_PORT)"),
        |ingress, admin, stop| standalone::run(config, ingress, admin, stop),
    )
    .await
}
