//! `importers [--flag value ...]`: the event sources on their own — PingSource, the GitHub and
//! GitLab webhooks, Redis streams, NATS and MQTT — with the sources and their sinks read from
//! the control plane. Settings come from the environment or the equivalent flags (`--help`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use activator_sidecar::settings;
use importers::standalone::{self, StandaloneConfig};

fn usage() -> String {
    format!(
        "usage: importers [--flag value ...]\n\n\
         The event sources on their own: PingSource, GitHubSource, GitLabSource,\n\
         RedisStreamSource, NatsSource and MqttSource, read with their resolved sinks from the\n\
         control plane (AUTOSCALER_ADDR, e.g. `mecha up`'s admin address), send CloudEvents to\n\
         their sinks; webhook deliveries are taken on /webhooks/{{github|gitlab}}/{{namespace}}/{{name}}.\n\
         Run one replica: each replica fires every PingSource tick.\n\n{}\n\
         Webhook listener limits (environment): SIDECAR_HEADER_READ_TIMEOUT (10s),\n\
         SIDECAR_IDLE_TIMEOUT (60s), SIDECAR_BODY_READ_TIMEOUT (30s), SIDECAR_MAX_CONNECTIONS\n\
         (half the file limit). Logs: MECHA_LOG (tracing filter), MECHA_LOG_FORMAT=json.\n",
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
        (config.port, "the webhook receivers (IMPORTERS_PORT)"),
        (
            config.admin_port,
            "the admin endpoints (IMPORTERS_ADMIN_PORT)",
        ),
        |webhooks, admin, stop| standalone::run(config, webhooks, admin, stop),
    )
    .await
}
