//! `apiserver-adapter [--flag value ...]`: one ApiServerSource's receive adapter.
//!
//! The reconciler runs it as the Deployment `apiserversource-{name}` under the source's
//! service account, so it sees exactly what the user's RBAC grants that account. It reads
//! `K_SINK`, `K_CE_OVERRIDES` and `K_SOURCE_CONFIG` (a bad one exits 2, naming the variable
//! and the field), finds the API server as kubectl does (in a pod: its service account),
//! discovers each resource's plural and scope, and runs one watch per resource and namespace
//! (or one across all namespaces) with the source's label selector sent to the API server.
//! A [`k8s::apiserver::Tracker`] per watch turns its events into `add`, `update` and
//! `delete`; the `owner` filter keeps the changes of objects with an `ownerReferences` entry of
//! that kind; the events go out one at a time, in order, with the importers' retries, and an
//! event whose retries all fail is counted (`mecha_source_events_failed_total`) and logged.
//!
//! `/live`, `/ready` (once every watch has listed once; a failing watch makes it not ready
//! with the reason while it is retried with backoff) and `/metrics` are on the admin port,
//! deliberately unauthenticated like every component's admin port (only health and
//! counters). SIGTERM: the watches stop, the events already queued are sent for at most
//! `DRAIN_TIMEOUT`, then it exits 0.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use eventing_broker::delivery::{HttpSender, Target};
use futures_util::StreamExt;
use importers::apiserver::{Change, EventAttributes, ObjectRef};
use importers::{HttpSink, SourceContext, SourceMetrics};
use k8s::apiserver::{AdapterConfig, Discovered, Tracker};
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use mecha_common::admin::Health;
use mecha_common::settings::{self, ConfigError, Table};
use mecha_common::{Shutdown, ShutdownSignal};
use prometheus::Registry;
use serde_json::Value;
use tokio::sync::mpsc;

/// The binary's settings, from the environment or the equivalent flags.
#[derive(Debug, Clone)]
struct Config {
    sink: Target,
    extensions: BTreeMap<String, String>,
    source: AdapterConfig,
    admin_port: u16,
    drain_timeout: Duration,
}

/// One change on its way to the sink.
#[derive(Debug)]
struct Pending {
    change: Change,
    object: Value,
    resource: Arc<Resource>,
}

/// A watched resource: what its events name.
#[derive(Debug)]
struct Resource {
    api_version: String,
    kind: String,
    plural: String,
    namespaced: bool,
}

/// Every watch's progress, for `/ready`: not ready until it has listed once, nor while its
/// last error is recent (within [`FAILING_FOR`]) and nothing has worked since.
#[derive(Debug, Clone, Default)]
struct Watches(Arc<Mutex<BTreeMap<String, WatchState>>>);

#[derive(Debug, Clone, Default)]
struct WatchState {
    listed: bool,
    error: Option<(tokio::time::Instant, String)>,
}

/// Longer than the watcher's longest backoff (30 s), so a watch that keeps failing never
/// looks healthy between two tries.
const FAILING_FOR: Duration = Duration::from_secs(60);
/// Changes queued for the sink at most; the watches wait while it is full.
const QUEUE: usize = 256;
/// The source kind in metrics and logs.
const KIND: &str = "ApiServerSource";

const SETTINGS: Table = &[
    (
        "--sink",
        "K_SINK",
        "where events go: an http:// URL (required; the reconciler sets it from spec.sink)",
    ),
    (
        "--ce-overrides",
        "K_CE_OVERRIDES",
        "{\"extensions\":{...}} set on every event (none)",
    ),
    (
        "--source-config",
        "K_SOURCE_CONFIG",
        "the source as JSON: name, namespace, mode, owner, namespaces or allNamespaces, resources (required)",
    ),
    (
        "--admin-port",
        "ADMIN_PORT",
        "/live, /ready, /metrics (8022)",
    ),
    (
        "--drain-timeout",
        "DRAIN_TIMEOUT",
        "longest wait on SIGTERM for the events already queued (30s)",
    ),
];

fn usage() -> String {
    format!(
        "usage: apiserver-adapter [--flag value ...]\n\n\
         One ApiServerSource's receive adapter: watches the resources it lists and sends\n\
         Knative's dev.knative.apiserver.* events to its sink. The cluster is found as\n\
         kubectl finds it (in a pod: its service account).\n\n{}\n\
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
        let required = |setting: &'static str| {
            get(setting)
                .filter(|v| !v.trim().is_empty())
                .ok_or(ConfigError {
                    setting,
                    value: String::new(),
                    reason: "required (the reconciler sets it)".into(),
                })
        };
        let sink = required("K_SINK")?;
        let error = |setting: &'static str, value: &str, reason: String| ConfigError {
            setting,
            value: value.chars().take(200).collect(),
            reason,
        };
        let uri: http::Uri = sink
            .parse()
            .map_err(|e| error("K_SINK", &sink, format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(error(
                "K_SINK",
                &sink,
                "must be an http:// URL with a host".into(),
            ));
        }
        let extensions = match get("K_CE_OVERRIDES").filter(|v| !v.trim().is_empty()) {
            None => BTreeMap::new(),
            Some(text) => {
                let overrides: crds::sources::CloudEventOverrides = serde_json::from_str(&text)
                    .map_err(|e| error("K_CE_OVERRIDES", &text, e.to_string()))?;
                let mut errors = Vec::new();
                crds::sources::validate_overrides(Some(&overrides), &mut errors);
                if let Some(first) = errors.first() {
                    return Err(error(
                        "K_CE_OVERRIDES",
                        &text,
                        first.to_string().replace("spec.ceOverrides.", ""),
                    ));
                }
                overrides.extensions
            }
        };
        let text = required("K_SOURCE_CONFIG")?;
        let source =
            AdapterConfig::parse(&text).map_err(|why| error("K_SOURCE_CONFIG", &text, why))?;
        Ok(Self {
            sink: Target {
                url: sink.clone(),
                uri,
                host: None,
            },
            extensions,
            source,
            admin_port: settings::number(&get, "ADMIN_PORT", 8022u16, settings::port)?,
            drain_timeout: settings::duration(&get, "DRAIN_TIMEOUT", Duration::from_secs(30))?,
        })
    }
}

// === impl Watches ===

impl Watches {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WatchState>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&self, part: &str) {
        self.lock().insert(part.to_string(), WatchState::default());
    }

    fn remove(&self, part: &str) {
        self.lock().remove(part);
    }

    fn failed(&self, part: &str, error: String) {
        let mut watches = self.lock();
        let state = watches.entry(part.to_string()).or_default();
        if state.error.as_ref().is_none_or(|(_, e)| *e != error) {
            tracing::warn!(watch = part, %error, "watching the API server fails; retrying with backoff");
        }
        state.error = Some((tokio::time::Instant::now(), error));
    }

    /// Something worked: `listed` after a whole list.
    fn worked(&self, part: &str, listed: bool) {
        let mut watches = self.lock();
        let state = watches.entry(part.to_string()).or_default();
        if listed && !state.listed {
            tracing::info!(watch = part, "listed");
        }
        state.listed |= listed;
        state.error = None;
    }

    /// What keeps the adapter from being ready, or `None`.
    fn problem(&self) -> Option<String> {
        let watches = self.lock();
        let problems: Vec<String> = watches
            .iter()
            .filter_map(|(part, state)| {
                let recent = state
                    .error
                    .as_ref()
                    .filter(|(at, _)| at.elapsed() < FAILING_FOR)
                    .map(|(_, e)| e.as_str());
                match (state.listed, recent) {
                    (_, Some(error)) => Some(format!("{part}: {error}")),
                    (false, None) => Some(format!("{part}: not listed yet")),
                    (true, None) => None,
                }
            })
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
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
    let admin = match mecha_common::serve::listen_all(
        config.admin_port,
        "/live, /ready, /metrics (ADMIN_PORT)",
    )
    .await
    {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let (client, api_server_url) = match kube::Config::infer().await {
        Ok(kube_config) => {
            let url = kube_config
                .cluster_url
                .to_string()
                .trim_end_matches('/')
                .to_string();
            match kube::Client::try_from(kube_config) {
                Ok(client) => (client, url),
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
        source = %format!("{}/{}", config.source.namespace, config.source.name),
        api_server = %api_server_url,
        resources = config.source.resources.len(),
        admin = config.admin_port,
        "apiserver-adapter starting"
    );
    run(config, client, api_server_url, admin).await
}

async fn run(
    config: Config,
    client: kube::Client,
    api_server_url: String,
    admin: tokio::net::TcpListener,
) -> ExitCode {
    // Before anything can report ready: a SIGTERM from then on drains.
    let stop = match mecha_common::shutdown::stop_signals() {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("error: cannot listen for SIGTERM: {error}");
            return ExitCode::from(1);
        }
    };
    let registry = Registry::new();
    let health = Health::default();
    let shutdown = Shutdown::new();
    // A re-list of many objects is a burst like any other.
    mecha_common::memory::release_after_bursts(shutdown.signal());
    let watches = Watches::default();
    let checked = watches.clone();
    health.add_check(move || checked.problem());

    let sink = HttpSink::new(
        config.sink.clone(),
        importers::runtime::sink_delivery(),
        importers::runtime::SEND_TIMEOUT,
        HttpSender::new(),
    );
    let source = Arc::new(config.source.clone());
    let cx = SourceContext::new(
        (KIND.into(), source.namespace.clone(), source.name.clone()),
        shutdown.signal(),
        Arc::new(sink),
        config.extensions.clone(),
        SourceMetrics::new(&registry),
    );

    let (tx, rx) = mpsc::channel(QUEUE);
    let mut tasks = Vec::new();
    for (i, resource) in source.resources.iter().enumerate() {
        let part = format!(
            "resources[{i}]: discovering {} ({})",
            resource.kind, resource.api_version
        );
        // Registered before `/ready` can answer, so it waits for every watch.
        watches.start(&part);
        tasks.push(tokio::spawn(watch_resource(
            client.clone(),
            source.clone(),
            (i, resource.clone()),
            part,
            watches.clone(),
            tx.clone(),
            shutdown.signal(),
        )));
    }
    drop(tx);
    let sender = tokio::spawn(send(rx, cx, api_server_url, source.clone()));
    let server = tokio::spawn(mecha_common::serve::serve_admin(
        admin,
        health.clone(),
        registry,
        shutdown.signal(),
    ));
    health.set_ready(true);

    stop.await;
    tracing::info!("draining");
    health.set_ready(false);
    shutdown.trigger();
    for task in tasks {
        let _ = task.await;
    }
    // The watches are stopped (their senders dropped): what is queued is sent, for a while.
    let mut sender = sender;
    if tokio::time::timeout(config.drain_timeout, &mut sender)
        .await
        .is_err()
    {
        sender.abort();
        tracing::warn!(timeout = ?config.drain_timeout, "events still queued after the drain timeout were not sent");
    }
    let _ = server.await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Discovers `resource` (retrying with backoff, not ready meanwhile), then watches it in each
/// namespace until shutdown.
async fn watch_resource(
    client: kube::Client,
    source: Arc<AdapterConfig>,
    (index, resource): (usize, crds::apiserver::ApiServerResource),
    part: String,
    watches: Watches,
    tx: mpsc::Sender<Pending>,
    shutdown: ShutdownSignal,
) {
    let mut pause = Duration::from_millis(500);
    let Discovered {
        resource: api_resource,
        namespaced,
    } = loop {
        let found = tokio::select! {
            found = k8s::apiserver::discover(&client, &resource.api_version, &resource.kind) => found,
            () = shutdown.clone().recv() => return,
        };
        match found {
            Ok(found) => break found,
            Err(error) => {
                watches.failed(&part, error);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.clone().recv() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    };
    let meta = Arc::new(Resource {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
        plural: api_resource.plural.clone(),
        namespaced,
    });
    let selector = k8s::apiserver::selector_query(resource.selector.as_ref());
    let mut running = Vec::new();
    for namespace in source.watch_namespaces(namespaced) {
        let label = format!(
            "resources[{index}]: watching {} in {}",
            api_resource.plural,
            namespace.as_deref().unwrap_or("all namespaces")
        );
        watches.start(&label);
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &api_resource),
            None => Api::all_with(client.clone(), &api_resource),
        };
        running.push(tokio::spawn(watch(
            api,
            selector.clone(),
            label,
            meta.clone(),
            source.clone(),
            watches.clone(),
            tx.clone(),
            shutdown.clone(),
        )));
    }
    watches.remove(&part);
    for task in running {
        let _ = task.await;
    }
}

/// One watch: its events through a [`Tracker`], the owner filter, onto the queue.
#[allow(
    clippy::too_many_arguments,
    reason = "one task's whole context, passed once"
)]
async fn watch(
    api: Api<DynamicObject>,
    selector: Option<String>,
    part: String,
    resource: Arc<Resource>,
    source: Arc<AdapterConfig>,
    watches: Watches,
    tx: mpsc::Sender<Pending>,
    shutdown: ShutdownSignal,
) {
    let mut config = watcher::Config::default();
    if let Some(selector) = &selector {
        config = config.labels(selector);
    }
    let stream = watcher::watcher(api, config).default_backoff();
    tokio::pin!(stream);
    let mut tracker = Tracker::new();
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = shutdown.clone().recv() => return,
        };
        let event = match item {
            None => return,
            Some(Err(error)) => {
                watches.failed(&part, error.to_string());
                continue;
            }
            Some(Ok(event)) => event,
        };
        match &event {
            Event::InitDone => watches.worked(&part, true),
            Event::Apply(_) | Event::Delete(_) => watches.worked(&part, false),
            Event::Init | Event::InitApply(_) => {}
        }
        for (change, object) in tracker.apply(as_json(event, &resource)) {
            if source
                .owner
                .as_ref()
                .is_some_and(|owner| !owner.owns(&object))
            {
                continue;
            }
            let pending = Pending {
                change,
                object,
                resource: resource.clone(),
            };
            tokio::select! {
                sent = tx.send(pending) => if sent.is_err() { return },
                () = shutdown.clone().recv() => return,
            }
        }
    }
}

/// A watch event with its object as JSON carrying `apiVersion` and `kind` (list items come
/// without them).
fn as_json(event: Event<DynamicObject>, resource: &Resource) -> Event<Value> {
    let json = |object: DynamicObject| {
        let mut value = serde_json::to_value(&object).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.entry("apiVersion")
                .or_insert_with(|| resource.api_version.clone().into());
            map.entry("kind")
                .or_insert_with(|| resource.kind.clone().into());
        }
        value
    };
    match event {
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(json(o)),
        Event::InitDone => Event::InitDone,
        Event::Apply(o) => Event::Apply(json(o)),
        Event::Delete(o) => Event::Delete(json(o)),
    }
}

/// Sends the queued changes one at a time, in order, until every watch has stopped and the
/// queue is empty.
async fn send(
    mut rx: mpsc::Receiver<Pending>,
    cx: SourceContext,
    api_server_url: String,
    source: Arc<AdapterConfig>,
) {
    while let Some(Pending {
        change,
        object,
        resource,
    }) = rx.recv().await
    {
        let id = k8s::apiserver::event_id(&source.namespace, &source.name, change, &object);
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (name, namespace) = (text("/metadata/name"), text("/metadata/namespace"));
        let event = importers::apiserver::event(
            &EventAttributes {
                source: &api_server_url,
                plural: &resource.plural,
                resource_mode: source.resource_mode(),
            },
            &id,
            change,
            ObjectRef {
                api_version: &resource.api_version,
                kind: &resource.kind,
                namespace: resource.namespaced.then_some(namespace.as_str()),
                name: &name,
            },
            &object,
        );
        // A failure is counted and logged by `emit`; the next change goes on.
        let _ = cx.emit(event).await;
    }
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

    const SOURCE: &str = r#"{"name":"s","namespace":"default","mode":"Resource","namespaces":["default"],"resources":[{"apiVersion":"v1","kind":"Pod"}]}"#;

    #[test]
    fn settings_are_checked_and_name_the_variable_and_field() {
        let good = config(&[
            ("K_SINK", "http://broker.mecha-system.svc/default/default"),
            ("K_CE_OVERRIDES", r#"{"extensions":{"team":"blue"}}"#),
            ("K_SOURCE_CONFIG", SOURCE),
        ])
        .expect("valid");
        assert_eq!(good.admin_port, 8022);
        assert_eq!(good.extensions["team"], "blue");
        assert!(good.source.resource_mode());

        let error = config(&[("K_SOURCE_CONFIG", SOURCE)]).expect_err("no sink");
        assert_eq!(error.setting, "K_SINK");
        let error =
            config(&[("K_SINK", "https://x/"), ("K_SOURCE_CONFIG", SOURCE)]).expect_err("https");
        assert_eq!(error.setting, "K_SINK");
        let error = config(&[
            ("K_SINK", "http://x/"),
            ("K_CE_OVERRIDES", r#"{"extensions":{"type":"x"}}"#),
            ("K_SOURCE_CONFIG", SOURCE),
        ])
        .expect_err("reserved");
        assert_eq!(error.setting, "K_CE_OVERRIDES");
        assert!(error.reason.starts_with("extensions.type:"), "{error}");
        let error = config(&[
            ("K_SINK", "http://x/"),
            (
                "K_SOURCE_CONFIG",
                &SOURCE.replace(r#""kind":"Pod""#, r#""kind":"pod""#),
            ),
        ])
        .expect_err("bad kind");
        assert_eq!(error.setting, "K_SOURCE_CONFIG");
        assert!(error.reason.contains("resources[0].kind"), "{error}");
        let error = config(&[("K_SINK", "http://x/")]).expect_err("no config");
        assert_eq!(error.setting, "K_SOURCE_CONFIG");
    }
}
