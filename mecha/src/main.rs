//! `mecha`: run Knative Services on one machine, and manage them while they run.
#![forbid(unsafe_code)]

mod admin;
mod api;
mod client;
mod output;
mod store;
mod up;
mod workloads;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use mecha_common::auth;
use mecha_common::outlier::OutlierConfig;
use mecha_common::telemetry::{LogFormat, init_tracing};

use crate::client::AdminClient;

/// Mecha: Knative-style serverless on one machine. `mecha up DIR` runs every Knative Service
/// in DIR as local processes behind one gateway; the other commands talk to it.
#[derive(Debug, Parser)]
#[command(name = "mecha", version, propagate_version = true)]
struct Cli {
    /// Admin API of the running `mecha up` that the client commands talk to (default: the
    /// address the `mecha up` using STATE_DIR wrote there, else 127.0.0.1:8081).
    #[arg(long, global = true, env = "MECHA_ADMIN_ADDR")]
    admin_addr: Option<String>,
    /// Where `mecha up` keeps its state (the event log and the admin API's credential,
    /// `admin-token`); the other commands read the credential from here.
    #[arg(long, global = true, env = "MECHA_STATE_DIR", default_value = auth::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The admin API's credential, instead of reading STATE_DIR/admin-token (a flag shows in
    /// every user's process list: prefer MECHA_ADMIN_TOKEN).
    #[arg(long, global = true, env = auth::TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// The longest a client command's request to `mecha up` may take, opening the
    /// connection included (`get -w` asks every second, each time within it); `logs -f`
    /// streams past it, but its answer must start within it.
    #[arg(long, global = true, env = "MECHA_REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    request_timeout: Duration,
    /// Log format on stderr (the filter is read from MECHA_LOG, e.g. MECHA_LOG=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    /// Columns, as kubectl prints them.
    Table,
    /// More columns.
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything applied before (kept in STATE_DIR) and every YAML document under
    /// PATH..., until Ctrl-C, then drain. With no PATH it starts with what was kept and waits
    /// for `mecha apply`.
    Up {
        /// Files or directories of Knative YAML (directories are read recursively).
        paths: Vec<PathBuf>,
        /// Ingress port of the gateway: http://{service}.{namespace}.localhost:PORT.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Loopback port of the admin API (0 picks a free one).
        #[arg(long, default_value_t = 8081)]
        admin_port: u16,
        /// Address the gateway listens on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: IpAddr,
        /// How long stopping replicas may take to finish requests before SIGKILL.
        #[arg(long, default_value = "30s", value_parser = humantime_duration)]
        grace_period: Duration,
        /// Largest event (request body) the broker ingress accepts, in bytes: 65536 to 16777216.
        #[arg(long, default_value_t = 1 << 20, value_parser = event_size)]
        max_event_size: usize,
        /// Deliveries each trigger has in flight at once.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
        delivery_concurrency: u16,
        /// Proxies in front of the gateway whose X-Forwarded-* and Forwarded headers are
        /// believed: none, private, or address[/prefix],... (by default nobody's: the gateway
        /// describes the client as it saw it).
        #[arg(long, default_value = "none", value_parser = trusted_proxies)]
        trusted_proxies: activator_sidecar::rules::TrustedProxies,
        /// How long a client may take to send a request head (then 408).
        #[arg(long, default_value = "10s", value_parser = positive_duration)]
        header_read_timeout: Duration,
        /// How long a kept-alive client connection may wait for its next request.
        #[arg(long, default_value = "60s", value_parser = positive_duration)]
        idle_timeout: Duration,
        /// How long a client may pause in the middle of a request body (then 408).
        #[arg(long, default_value = "30s", value_parser = positive_duration)]
        body_read_timeout: Duration,
        /// Bytes of request bodies the gateway port holds in memory at once for the broker
        /// ingress and the webhook receivers (each reads a body whole before checking it);
        /// a body that would pass it gets 503 with Retry-After. From the largest body taken
        /// (--max-event-size, 4 MiB for webhooks) to 1073741824.
        #[arg(long, default_value_t = mecha_common::budget::DEFAULT_BYTES, value_parser = body_budget)]
        body_budget: usize,
        /// How long such a request body may take to arrive whole (then 408, and its bytes
        /// are freed): 1s to 10m.
        #[arg(long, default_value = "60s", value_parser = body_timeout)]
        body_timeout: Duration,
        /// Client connections the gateway keeps at once; at the limit the longest idle one
        /// closes (default: half the file limit).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections: Option<u32>,
        /// Requests in a row a replica may fail (no response before the revision's timeout,
        /// or a refused connection) before the gateway takes it out of rotation; 0: never.
        #[arg(long, default_value_t = 3)]
        outlier_failures: u32,
        /// How long a replica's first ejection lasts; the n-th lasts n times this, up to
        /// --outlier-max-ejection-time.
        #[arg(long, default_value = "30s", value_parser = humantime_duration)]
        outlier_ejection_time: Duration,
        /// The longest ejection.
        #[arg(long, default_value = "300s", value_parser = humantime_duration)]
        outlier_max_ejection_time: Duration,
        /// Where the broker keeps events: the embedded log in the state directory (by
        /// default), or NATS JetStream:
        /// nats://HOST:PORT[,nats://HOST:PORT...][?replicas=3&max-age=168h&...] (needs a
        /// mecha built with `--features nats`).
        #[arg(long, value_name = "nats://HOST:PORT", value_parser = event_log)]
        event_log: Option<String>,
    },
    /// Create or update resources from YAML files or directories, then wait until every
    /// Service's new revision is ready (or has failed) and print its URL.
    Apply {
        /// Files or directories of Knative YAML.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Return once the resources are accepted, without waiting for new revisions.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for new revisions to become ready.
        #[arg(long, default_value = "600s", value_parser = positive_duration)]
        timeout: Duration,
    },
    /// Delete resources named in YAML files (-f), or one by kind and name
    /// (`mecha delete service hello`); their replicas stop.
    Delete {
        /// Files or directories of Knative YAML.
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        files: Vec<PathBuf>,
        /// What to delete: service (ksvc, svc), broker, trigger, pingsource, githubsource,
        /// gitlabsource, redisstreamsource, natssource, mqttsource, containersource,
        /// sinkbinding.
        #[arg(required_unless_present = "files", requires = "name")]
        kind: Option<String>,
        /// Its name.
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Show resources: services (ksvc, svc), revisions (rev), brokers, triggers, sources.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Show one resource in detail: conditions, revisions and their replicas, traffic and
    /// recent events (`mecha describe service hello`).
    Describe {
        /// service (ksvc, svc), revision (rev), broker, trigger or source.
        kind: String,
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Print the version of this client and of the `mecha up` it talks to.
    Version,
    /// Print a shell completion script: `source <(mecha completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Post one CloudEvent (binary mode) to a broker and print the answer.
    Send {
        /// The broker, as NAMESPACE/NAME.
        #[arg(long)]
        broker: String,
        /// The event's type attribute.
        #[arg(long = "type")]
        kind: String,
        /// The event's source attribute.
        #[arg(long)]
        source: String,
        /// The event's id (default: a unique one).
        #[arg(long)]
        id: Option<String>,
        /// JSON data, or @FILE to read it from a file.
        #[arg(long)]
        data: Option<String>,
        /// An extension attribute NAME=VALUE (repeatable).
        #[arg(long = "extension", short = 'e')]
        extensions: Vec<String>,
    },
    /// Print a service's replica output (prefixed with [service/replica]).
    Logs {
        /// The service's name.
        service: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of what is kept (`mecha up` keeps the last 1,000 per service).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only lines read in the last DURATION (e.g. 5m, 1h30m).
        #[arg(long, value_name = "DURATION", value_parser = humantime_duration)]
        since: Option<Duration>,
        /// Start each line with when `mecha up` read it (RFC 3339, UTC).
        #[arg(long)]
        timestamps: bool,
        /// Only the replicas of one revision (e.g. hello-00002).
        #[arg(long)]
        revision: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum GetWhat {
    /// Services: URL, latest revision, age, conditions, ready/desired replicas.
    #[command(visible_aliases = ["ksvc", "svc"], aliases = ["service", "kservice", "services.serving.knative.dev"])]
    Services(GetArgs),
    /// Revisions: service, traffic share, tags, generation, age, conditions, replicas.
    #[command(visible_alias = "rev", alias = "revision")]
    Revisions(GetArgs),
    /// Brokers with their ingress address and how many events wait in their log.
    #[command(alias = "broker")]
    Brokers(GetArgs),
    /// Triggers with their broker, subscriber URI and readiness.
    #[command(alias = "trigger")]
    Triggers(GetArgs),
    /// Event sources (PingSource, …) with their sink URI, readiness and events sent/failed.
    #[command(alias = "source")]
    Sources(GetArgs),
}

/// What every `mecha get` takes, as kubectl's.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Only the resource of this name.
    pub name: Option<String>,
    /// The namespace to list.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// Every namespace (adds a NAMESPACE column).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// After listing, keep printing what changes until interrupted.
    #[arg(short, long)]
    pub watch: bool,
}

fn humantime_duration(value: &str) -> Result<Duration, String> {
    crds::autoscaling::parse_go_duration(value)
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime_duration(value)? {
        zero if zero.is_zero() => Err("must be more than zero".into()),
        duration => Ok(duration),
    }
}

/// `--event-log`: checked whole before anything starts.
fn event_log(value: &str) -> Result<String, String> {
    #[cfg(feature = "nats")]
    {
        eventing_broker::log::jetstream::JetStreamConfig::from_url(value).map(|_| value.to_string())
    }
    #[cfg(not(feature = "nats"))]
    {
        Err(format!(
            "{value}: this mecha was built without NATS support; build it with `cargo build --release -p mecha --features nats`"
        ))
    }
}

fn trusted_proxies(value: &str) -> Result<activator_sidecar::rules::TrustedProxies, String> {
    activator_sidecar::rules::TrustedProxies::parse(value)
}

/// `--body-budget`: checked against the largest body at start, once --max-event-size is
/// known.
fn body_budget(value: &str) -> Result<usize, String> {
    let bytes: usize = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of bytes"))?;
    mecha_common::budget::check_bytes(bytes, 0)?;
    Ok(bytes)
}

fn body_timeout(value: &str) -> Result<Duration, String> {
    let timeout = humantime_duration(value)?;
    mecha_common::budget::check_timeout(timeout)?;
    Ok(timeout)
}

fn event_size(value: &str) -> Result<usize, String> {
    let size: usize = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of bytes"))?;
    eventing_broker::runtime::check_event_size(size)?;
    Ok(size)
}

#[tokio::main]
async fn main() -> ExitCode {
    // The replica guard is this binary too, so that `mecha up` needs no other program; it is
    // not a user command, hence not in the CLI's help.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = autoscaler::guard::from_args(&args).await {
        return code;
    }
    let cli = Cli::parse();
    let format = match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    init_tracing("MECHA_LOG", "info", format);
    let command = match cli.command {
        Command::Up {
            paths,
            port,
            admin_port,
            bind,
            grace_period,
            max_event_size,
            delivery_concurrency,
            trusted_proxies,
            header_read_timeout,
            idle_timeout,
            body_read_timeout,
            body_budget,
            body_timeout,
            max_connections,
            outlier_failures,
            outlier_ejection_time,
            outlier_max_ejection_time,
            event_log,
        } => {
            // The largest body the gateway port takes: an event, or a webhook delivery.
            let largest = max_event_size.max(importers::webhook::DEFAULT_MAX_BODY);
            if let Err(why) = mecha_common::budget::check_bytes(body_budget, largest) {
                eprintln!("error: --body-budget {body_budget}: {why}");
                return ExitCode::from(2);
            }
            if outlier_max_ejection_time < outlier_ejection_time {
                eprintln!(
                    "error: --outlier-max-ejection-time ({outlier_max_ejection_time:?}) must be at least --outlier-ejection-time ({outlier_ejection_time:?})"
                );
                return ExitCode::from(2);
            }
            return up::run(up::UpConfig {
                paths,
                bind,
                port,
                admin_port,
                state_dir: cli.state_dir,
                grace_period,
                max_event_size,
                delivery_concurrency: usize::from(delivery_concurrency),
                trusted_proxies,
                header_read_timeout,
                idle_timeout,
                body_read_timeout,
                body_budget: mecha_common::BudgetSettings {
                    bytes: body_budget,
                    body_timeout,
                },
                max_connections: max_connections.map(|n| n as usize),
                outlier: OutlierConfig {
                    consecutive_failures: outlier_failures,
                    base_ejection: outlier_ejection_time,
                    max_ejection: outlier_max_ejection_time,
                },
                event_log,
            })
            .await;
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "mecha", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        command => command,
    };
    let result = match client::find_token(cli.token.as_deref(), &cli.state_dir) {
        Ok(token) => {
            let addr = client::find_admin_addr(cli.admin_addr.as_deref(), &cli.state_dir);
            run_client(
                &AdminClient::new(&addr, token, cli.request_timeout),
                command,
            )
            .await
        }
        Err(error) => Err(error),
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error}");
        if let Some(hint) = error.hint() {
            eprintln!("hint: {hint}");
        }
        ExitCode::from(1)
    })
}

/// The commands that talk to a running `mecha up`.
async fn run_client(
    admin: &AdminClient,
    command: Command,
) -> Result<ExitCode, client::ClientError> {
    match command {
        Command::Up { .. } => Ok(ExitCode::SUCCESS),
        Command::Apply {
            files,
            no_wait,
            timeout,
        } => {
            let wait = client::Wait {
                enabled: !no_wait,
                timeout,
            };
            client::send_files(admin, &files, false, wait).await
        }
        Command::Delete {
            files,
            kind,
            name,
            namespace,
        } => match (kind, name) {
            (Some(kind), Some(name)) => client::delete_one(admin, &kind, &namespace, &name).await,
            _ => {
                let wait = client::Wait {
                    enabled: false,
                    timeout: Duration::ZERO,
                };
                client::send_files(admin, &files, true, wait).await
            }
        },
        Command::Get { what } => {
            let (kind, args) = match what {
                GetWhat::Services(args) => (output::Kind::Service, args),
                GetWhat::Revisions(args) => (output::Kind::Revision, args),
                GetWhat::Brokers(args) => (output::Kind::Broker, args),
                GetWhat::Triggers(args) => (output::Kind::Trigger, args),
                GetWhat::Sources(args) => (output::Kind::Source, args),
            };
            client::get(admin, kind, &args).await
        }
        Command::Describe {
            kind,
            name,
            namespace,
        } => client::describe(admin, &kind, &namespace, &name).await,
        Command::Version => client::version(admin).await,
        Command::Completion { .. } => Ok(ExitCode::SUCCESS),
        Command::Send {
            broker,
            kind,
            source,
            id,
            data,
            extensions,
        } => {
            client::send_event(
                admin,
                client::SendRequest {
                    broker,
                    kind,
                    source,
                    id,
                    data,
                    extensions,
                },
            )
            .await
        }
        Command::Logs {
            service,
            namespace,
            follow,
            tail,
            since,
            timestamps,
            revision,
        } => {
            client::logs(
                admin,
                &namespace,
                &service,
                &client::LogsOptions {
                    follow,
                    tail,
                    since,
                    timestamps,
                    revision,
                },
            )
            .await
        }
    }
}
