//! The loopback admin API of `mecha up`: what `mecha get/apply/delete/logs` talk to, next to
//! `/live`, `/ready` and `/metrics`.
//!
//! Every route answers only to a loopback `Host`, and every route but `/live`, `/ready` and
//! `/metrics` needs the credential (`mecha_common::auth`): applying a Service runs its command.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use autoscaler::logs::LogHub;
use autoscaler::{ServingState, StatusBoard, Supervisor};
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crds::{LoadError, Loaded, Mode};
use futures_util::StreamExt;
use mecha_common::ShutdownSignal;
use mecha_common::admin::Health;
use mecha_common::auth::{self, Credential, Refusals};
use mecha_common::routing::{ServiceKey, service_host, tag_host};
use prometheus::Registry;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::api::{
    BrokerView, ConditionView, ErrorsResponse, FilesRequest, OutcomesResponse, RevisionView,
    ServiceView, SourceView, TrafficView, TriggerView,
};
use crate::store::LocalStore;

/// The domain services answer on in local mode.
pub const DOMAIN: &str = "localhost";

#[derive(Debug, Clone)]
pub struct AdminState {
    pub store: Arc<LocalStore>,
    pub supervisor: Supervisor,
    pub scaling: StatusBoard,
    pub logs: LogHub,
    pub gateway_port: u16,
    pub shutdown: ShutdownSignal,
    pub broker: eventing_broker::EventBroker,
    pub importers: importers::Importers,
    /// The routes the controller publishes to the gateway: what is served, not what should be.
    pub routes: tokio::sync::watch::Receiver<Arc<mecha_common::RoutingTable>>,
}

/// `GET …/logs`: `follow`, `tail` (the last N lines of the history), `since_ms` (how far back),
/// `timestamps` (each line starts with when it was read, RFC 3339), `revision` (one
/// revision's replicas only).
#[derive(Debug, Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
    since_ms: Option<u64>,
    #[serde(default)]
    timestamps: bool,
    revision: Option<String>,
}

impl LogsQuery {
    fn wants(
        &self,
        line: &autoscaler::logs::LogLine,
        since: Option<std::time::SystemTime>,
    ) -> bool {
        self.revision
            .as_deref()
            .is_none_or(|revision| &*line.revision == revision)
            && since.is_none_or(|since| line.at >= since)
    }

    fn render(&self, line: &autoscaler::logs::LogLine) -> String {
        if self.timestamps {
            let at = timestamp(line.at).unwrap_or_default();
            format!("{at} {line}\n")
        } else {
            format!("{line}\n")
        }
    }
}

/// The admin API with the control plane's (`autoscaler::api`) mounted beside it, all behind
/// the credential and the loopback `Host` rule (`mecha_common::auth::guard`).
pub fn router(
    state: AdminState,
    control: autoscaler::api::ApiState,
    health: Health,
    registry: Registry,
    credential: Credential,
    refusals: Refusals,
) -> Router {
    let api = Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/brokers", get(brokers))
        .route("/api/v1/triggers", get(triggers))
        .route("/api/v1/sources", get(sources))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/delete", post(delete))
        .route(
            "/api/v1/namespaces/{namespace}/{kind}/{name}",
            axum::routing::delete(delete_one),
        )
        .route(
            "/api/v1/namespaces/{namespace}/services/{name}/events",
            get(events),
        )
        .route("/api/v1/version", get(version))
        .route(
            "/api/v1/namespaces/{namespace}/services/{name}/logs",
            get(logs),
        )
        .with_state(state)
        .merge(autoscaler::api::router(control));
    auth::guard(
        mecha_common::admin::router(health, registry),
        api,
        credential,
        refusals,
    )
}

async fn services(State(state): State<AdminState>) -> Json<Vec<ServiceView>> {
    let routes = state.routes.borrow().clone();
    Json(service_views(
        &state.store,
        &state.supervisor,
        &state.scaling,
        &routes,
        state.gateway_port,
    ))
}

async fn brokers(State(state): State<AdminState>) -> Json<Vec<BrokerView>> {
    Json(broker_views(&state.broker))
}

async fn triggers(State(state): State<AdminState>) -> Json<Vec<TriggerView>> {
    Json(trigger_views(&state.broker, &state.store.snapshot()))
}

async fn sources(State(state): State<AdminState>) -> Json<Vec<SourceView>> {
    Json(source_views(
        &state.importers,
        &state.broker.state(),
        &state.store.snapshot(),
    ))
}

/// Whether what `destination` refers to exists: `Some(reason)` when it does not.
fn missing_ref(
    destination: &crds::eventing::Destination,
    namespace: &str,
    eventing: &eventing_broker::EventingState,
    serving: &ServingState,
) -> Option<String> {
    let reference = destination.r#ref.as_ref()?;
    let ns = reference.namespace.as_deref().unwrap_or(namespace);
    let exists = if reference.kind == crds::eventing::BROKER_KIND {
        eventing.broker(ns, &reference.name).is_some()
    } else {
        serving
            .services()
            .any(|r| r.key.namespace == ns && r.key.name == reference.name)
    };
    (!exists).then(|| format!("{} {ns}/{} not found", reference.kind, reference.name))
}

/// A source is ready when what its sink refers to exists and the source runs.
pub fn source_views(
    importers: &importers::Importers,
    eventing: &eventing_broker::EventingState,
    serving: &ServingState,
) -> Vec<SourceView> {
    importers
        .state()
        .sources
        .values()
        .map(|source| {
            let status = importers.status(source);
            let reason = missing_ref(source.sink(), source.namespace(), eventing, serving)
                .map(|why| format!("sink: {why}"))
                .or(status.problem);
            SourceView {
                kind: source.kind().to_string(),
                namespace: source.namespace().to_string(),
                name: source.name().to_string(),
                sink_uri: status.sink_uri,
                url: status.url,
                ready: reason.is_none(),
                reason,
                sent: status.sent,
                failed: status.failed,
                ce_attributes: source.ce_attributes(),
            }
        })
        .collect()
}

pub fn broker_views(broker: &eventing_broker::EventBroker) -> Vec<BrokerView> {
    let eventing = broker.state();
    eventing
        .brokers
        .keys()
        .map(|(namespace, name)| BrokerView {
            namespace: namespace.clone(),
            name: name.clone(),
            address: broker.address(namespace, name),
            ready: broker.problem().is_none(),
            triggers: eventing.triggers_of(namespace, name).count(),
            waiting_events: u64::try_from(
                broker
                    .metrics()
                    .log_events
                    .with_label_values(&[namespace.as_str(), name.as_str()])
                    .get(),
            )
            .unwrap_or(0),
        })
        .collect()
}

/// A trigger is ready when its broker exists, what its subscriber (and dead-letter sink)
/// refer to exists, and its delivery task runs.
pub fn trigger_views(
    broker: &eventing_broker::EventBroker,
    serving: &ServingState,
) -> Vec<TriggerView> {
    let eventing = broker.state();
    let missing = |destination: &crds::eventing::Destination, namespace: &str| {
        missing_ref(destination, namespace, &eventing, serving)
    };
    eventing
        .triggers
        .values()
        .map(|trigger| {
            let namespace = trigger.namespace();
            let owner = eventing.broker(namespace, &trigger.spec.broker);
            let dead_letter = trigger.delivery(owner).dead_letter_sink;
            let reason = if owner.is_none() {
                Some(format!(
                    "Broker {namespace}/{} not found",
                    trigger.spec.broker
                ))
            } else {
                missing(&trigger.spec.subscriber, namespace)
                    .or_else(|| {
                        dead_letter
                            .as_ref()
                            .and_then(|sink| missing(sink, namespace))
                            .map(|why| format!("dead-letter sink: {why}"))
                    })
                    // What the broker itself found: the trigger's task failed or cannot start.
                    .or_else(|| broker.trigger_problem(namespace, &trigger.metadata.name))
            };
            TriggerView {
                namespace: namespace.to_string(),
                name: trigger.metadata.name.clone(),
                broker: trigger.spec.broker.clone(),
                subscriber_uri: broker
                    .resolve(&trigger.spec.subscriber, namespace)
                    .ok()
                    .map(|t| t.url),
                ready: reason.is_none(),
                reason,
            }
        })
        .collect()
}

async fn apply(State(state): State<AdminState>, Json(request): Json<FilesRequest>) -> Response {
    let files: Vec<(std::path::PathBuf, String)> = request
        .files
        .into_iter()
        .map(|file| (file.path.into(), file.content))
        .collect();
    match state.store.apply_files(&files) {
        Ok(results) => Json(OutcomesResponse { results }).into_response(),
        Err(errors) => unprocessable(errors),
    }
}

async fn delete(State(state): State<AdminState>, Json(request): Json<FilesRequest>) -> Response {
    match load(&request) {
        Ok(loaded) => {
            let results = state.store.delete(&loaded);
            forget_deleted(&state, &results);
            Json(OutcomesResponse { results }).into_response()
        }
        Err(errors) => unprocessable(errors),
    }
}

/// `DELETE /api/v1/namespaces/{namespace}/{kind}/{name}`: `kind` as in YAML (`Service`,
/// `Broker`, `Trigger`, `PingSource`, …).
async fn delete_one(
    State(state): State<AdminState>,
    UrlPath((namespace, kind, name)): UrlPath<(String, String, String)>,
) -> Json<OutcomesResponse> {
    let results = state.store.delete_keys(&[crate::store::ResourceKey {
        kind,
        namespace,
        name,
    }]);
    forget_deleted(&state, &results);
    Json(OutcomesResponse { results })
}

/// A deleted Service's output and events go with it.
fn forget_deleted(state: &AdminState, results: &[crate::store::Outcome]) {
    for outcome in results {
        if outcome.kind == "Service" && outcome.action == "deleted" {
            let key = ServiceKey::new(&outcome.namespace, &outcome.name);
            state.logs.forget(&key);
            state.supervisor.forget_service(&key);
        }
    }
}

/// `GET /api/v1/version`: this `mecha up`'s version, for `mecha version`.
async fn version() -> Json<crate::api::VersionView> {
    Json(crate::api::VersionView::current())
}

/// `GET …/services/{name}/events`: what happened to the service's replicas, oldest first.
async fn events(
    State(state): State<AdminState>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    let key = ServiceKey::new(namespace, name);
    if state.store.snapshot().get(&key).is_none() {
        return (StatusCode::NOT_FOUND, format!("service {key} not found\n")).into_response();
    }
    let events: Vec<crate::api::EventView> = state
        .logs
        .events(&key)
        .iter()
        .map(|event| crate::api::EventView {
            at: timestamp(event.at),
            revision: event.revision.to_string(),
            message: event.to_string(),
        })
        .collect();
    Json(events).into_response()
}

/// RFC 3339, UTC.
pub fn timestamp(at: std::time::SystemTime) -> Option<String> {
    jiff::Timestamp::try_from(at).ok().map(|t| t.to_string())
}

async fn logs(
    State(state): State<AdminState>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    Query(query): Query<LogsQuery>,
) -> Response {
    let key = ServiceKey::new(namespace, name);
    if state.store.snapshot().get(&key).is_none() {
        return (StatusCode::NOT_FOUND, format!("service {key} not found\n")).into_response();
    }
    let (recent, rx) = state.logs.follow(&key);
    let since = query
        .since_ms
        .and_then(|ms| std::time::SystemTime::now().checked_sub(Duration::from_millis(ms)));
    let mut recent: Vec<_> = recent
        .into_iter()
        .filter(|line| query.wants(line, since))
        .collect();
    if let Some(tail) = query.tail {
        recent.drain(..recent.len().saturating_sub(tail));
    }
    let query = Arc::new(query);
    let history = futures_util::stream::iter(
        recent
            .iter()
            .map(|line| Ok::<_, Infallible>(query.render(line)))
            .collect::<Vec<_>>(),
    );
    let body = if query.follow {
        let live = futures_util::stream::unfold((rx, query), move |(mut rx, query)| async move {
            loop {
                match rx.recv().await {
                    Ok(line) if query.wants(&line, None) => {
                        let text = query.render(&line);
                        return Some((Ok(text), (rx, query)));
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        // A follower must not keep `mecha up` from shutting down.
        Body::from_stream(
            history
                .chain(live)
                .take_until(state.shutdown.clone().recv()),
        )
    } else {
        Body::from_stream(history)
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn load(request: &FilesRequest) -> Result<Vec<Loaded>, Vec<LoadError>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for file in &request.files {
        let (ok, bad) = crds::load_str(Path::new(&file.path), &file.content, Mode::Local);
        loaded.extend(ok);
        errors.extend(bad);
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

fn unprocessable(errors: Vec<LoadError>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(ErrorsResponse {
            errors: errors.iter().map(ToString::to_string).collect(),
        }),
    )
        .into_response()
}

/// A revision with a replica whose process has ended this many times in a row, each before
/// running `autoscaler::supervisor::STABLE_RUN`, is crash looping: `ContainerHealthy=False`
/// and `Ready=False`, whether or not it was ready before (Knative reports the container's
/// exit once a Deployment has no available pod; a local process has no other signal).
pub const CRASH_LOOP_RESTARTS: u32 = 3;

/// What `mecha get services|revisions` and `describe` show, from the desired state and the
/// supervisor's view.
pub fn service_views(
    store: &LocalStore,
    supervisor: &Supervisor,
    scaling: &StatusBoard,
    served: &mecha_common::RoutingTable,
    port: u16,
) -> Vec<ServiceView> {
    let state = store.snapshot();
    let desired = state.desired(DOMAIN, |r| supervisor.ever_ready(r));
    let url = |host: String| format!("http://{host}:{port}");
    state
        .services()
        .map(|record| {
            let main_host = service_host(&record.key, DOMAIN);
            // One entry per traffic target, as Knative's status.traffic: the main route's
            // split (with each entry's tag), then tags that take no share of the main route.
            let targets = desired
                .routes
                .lookup(&main_host)
                .map(|route| route.targets.clone())
                .unwrap_or_default();
            let spec_traffic = &record.service.spec.traffic;
            let mut traffic: Vec<TrafficView> = Vec::new();
            let tagged = |tag: &str| {
                desired
                    .routes
                    .lookup(&tag_host(tag, &record.key, DOMAIN))
                    .map(|route| route.targets[0].revision.clone())
            };
            if spec_traffic.is_empty() {
                traffic.extend(targets.iter().map(|t| TrafficView {
                    revision: t.revision.clone(),
                    percent: t.percent,
                    latest_revision: true,
                    tag: None,
                    url: None,
                }));
            } else {
                for entry in spec_traffic {
                    let revision = match (&entry.tag, &entry.revision_name) {
                        (Some(tag), _) => tagged(tag),
                        (None, Some(name)) => Some(name.clone()),
                        (None, None) => record
                            .latest_ready(|r| supervisor.ever_ready(r))
                            .or(record.latest())
                            .map(|r| r.name.clone()),
                    };
                    let Some(revision) = revision else { continue };
                    traffic.push(TrafficView {
                        revision,
                        percent: entry.percent.unwrap_or(0),
                        latest_revision: entry.latest_revision.unwrap_or(false),
                        tag: entry.tag.clone(),
                        url: entry
                            .tag
                            .as_ref()
                            .map(|tag| url(tag_host(tag, &record.key, DOMAIN))),
                    });
                }
            }
            let revisions: Vec<RevisionView> = record
                .revisions
                .iter()
                .rev()
                .map(|revision| {
                    let status = supervisor.status(&revision.name);
                    let replicas = status
                        .as_ref()
                        .map(|s| s.replicas.clone())
                        .unwrap_or_default();
                    // The running replicas say; with none left (scaled to zero), the last
                    // one stopped while crashing does.
                    let stopped_crashing = replicas
                        .is_empty()
                        .then(|| supervisor.last_crash(&revision.name))
                        .flatten();
                    let reason = replicas
                        .iter()
                        .filter(|r| !r.stopping)
                        .chain(stopped_crashing.as_ref())
                        .filter(|r| r.recent_exits >= CRASH_LOOP_RESTARTS)
                        .max_by_key(|r| r.recent_exits)
                        .map(|r| {
                            format!(
                                "CrashLoop: replica {} ended {} times in a row, each within {}s of starting, last: {}",
                                r.name,
                                r.recent_exits,
                                autoscaler::supervisor::STABLE_RUN.as_secs(),
                                r.last_exit.as_deref().unwrap_or("unknown")
                            )
                        });
                    // Ready once it has served, until it crash loops (routing still follows
                    // the latest revision that has been ready, as Knative's
                    // latestReadyRevisionName does not go back).
                    let ready = supervisor.ever_ready(&revision.name) && reason.is_none();
                    let waiting_for_request =
                        !ready && revision.scaling.initial_scale == Some(0) && replicas.is_empty();
                    let serving = replicas.iter().any(|r| r.ready && !r.stopping);
                    let crash = reason.clone().map(|message| ("ExitCode", message));
                    let conditions = vec![
                        ConditionView::new(
                            "Ready",
                            if ready {
                                Some(true)
                            } else if crash.is_some() {
                                Some(false)
                            } else {
                                None
                            },
                            crash.clone().or_else(|| {
                                (!ready).then(|| {
                                    if waiting_for_request {
                                        (
                                            "NoTraffic",
                                            "initial-scale 0: starts on the first request"
                                                .to_string(),
                                        )
                                    } else {
                                        (
                                            "Deploying",
                                            "waiting for a replica to pass its readiness probe"
                                                .to_string(),
                                        )
                                    }
                                })
                            }),
                        ),
                        ConditionView::new(
                            "ContainerHealthy",
                            if crash.is_some() {
                                Some(false)
                            } else if ready {
                                Some(true)
                            } else {
                                None
                            },
                            crash,
                        ),
                        ConditionView::new(
                            "Active",
                            if serving {
                                Some(true)
                            } else if ready || waiting_for_request {
                                Some(false)
                            } else {
                                None
                            },
                            (!serving && (ready || waiting_for_request)).then(|| {
                                (
                                    "NoTraffic",
                                    "scaled to zero; the next request starts a replica".to_string(),
                                )
                            }),
                        ),
                    ];
                    RevisionView {
                        conditions,
                        name: revision.name.clone(),
                        generation: revision.generation,
                        created: store.created(&revision.name).and_then(timestamp),
                        ready,
                        waiting_for_request,
                        reason,
                        traffic: traffic
                            .iter()
                            .filter(|t| t.revision == revision.name)
                            .map(|t| t.percent)
                            .sum(),
                        tags: traffic
                            .iter()
                            .filter(|t| t.revision == revision.name)
                            .filter_map(|t| t.tag.clone())
                            .collect(),
                        routed: served.hosts().any(|(_, route)| {
                            route.service == record.key
                                && route.targets.iter().any(|t| t.revision == revision.name)
                        }),
                        desired: status.as_ref().map_or(0, |s| s.desired),
                        replicas,
                        autoscaler: scaling.get(&revision.name),
                    }
                })
                .collect();
            let conditions = service_conditions(&revisions, &traffic);
            ServiceView {
                conditions,
                namespace: record.key.namespace.clone(),
                name: record.key.name.clone(),
                url: url(main_host),
                latest_revision: record.latest().map(|r| r.name.clone()),
                latest_ready_revision: record
                    .latest_ready(|r| supervisor.ever_ready(r))
                    .map(|r| r.name.clone()),
                created: record
                    .revisions
                    .first()
                    .and_then(|r| store.created(&r.name))
                    .and_then(timestamp),
                ready: revisions
                    .iter()
                    .map(|r| r.replicas.iter().filter(|x| x.ready && !x.stopping).count() as u32)
                    .sum(),
                desired: revisions.iter().map(|r| r.desired).sum(),
                panicking: revisions
                    .iter()
                    .any(|r| r.autoscaler.as_ref().is_some_and(|a| a.panicking)),
                traffic,
                revisions,
            }
        })
        .collect()
}

/// A Service's conditions from its revisions' (newest first) and its traffic: the latest
/// revision's readiness is `ConfigurationsReady`; `RoutesReady` needs every revision traffic
/// names ready and in the gateway's routes; `Ready` is both.
fn service_conditions(revisions: &[RevisionView], traffic: &[TrafficView]) -> Vec<ConditionView> {
    let ready_of = |revision: &RevisionView| {
        revision
            .conditions
            .iter()
            .find(|c| c.kind == "Ready")
            .cloned()
    };
    let configurations = match revisions.first().and_then(ready_of) {
        Some(ready) => ConditionView {
            kind: "ConfigurationsReady".into(),
            ..ready
        },
        None => ConditionView::new("ConfigurationsReady", None, None),
    };
    let mut routes = ConditionView::new("RoutesReady", Some(true), None);
    for target in traffic {
        let Some(revision) = revisions.iter().find(|r| r.name == target.revision) else {
            continue;
        };
        let ready = ready_of(revision);
        if ready.as_ref().is_some_and(|c| c.status == "False") {
            routes = ConditionView::new(
                "RoutesReady",
                Some(false),
                Some((
                    "RevisionFailed",
                    format!("revision {} failed", revision.name),
                )),
            );
            break;
        }
        if !revision.routed || !ready.as_ref().is_some_and(ConditionView::is_true) {
            routes = ConditionView::new(
                "RoutesReady",
                None,
                Some((
                    "RevisionMissing",
                    format!(
                        "waiting for revision {} to be ready and routed",
                        revision.name
                    ),
                )),
            );
        }
    }
    let first_not_true = [&configurations, &routes]
        .into_iter()
        .find(|c| !c.is_true())
        .cloned();
    let ready = match first_not_true {
        None => ConditionView::new("Ready", Some(true), None),
        Some(condition) => ConditionView {
            kind: "Ready".into(),
            ..condition
        },
    };
    vec![ready, configurations, routes]
}

#[cfg(test)]
mod tests {
    use super::*;
    use autoscaler::{Controller, SupervisorConfig};
    use axum::http::Request;
    use eventing_broker::{BrokerConfig, RedbLog};
    use http_body_util::BodyExt;
    use mecha_common::auth::AdminToken;
    use mecha_common::wire::{EVENTING_WATCH_PATH, POKE_PATH, Poke, STATS_PATH, WATCH_PATH};
    use mecha_common::{Activation, Shutdown};
    use tower::ServiceExt;

    /// The real admin router over a store and a supervisor that run nothing: requests are
    /// handled, but no replica is ever started.
    struct Fixture {
        app: Router,
        store: Arc<LocalStore>,
        token: AdminToken,
        dir: std::path::PathBuf,
        _shutdown: Shutdown,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "mecha-admin-router-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let registry = Registry::new();
        let store = Arc::new(LocalStore::new());
        let (activation, pokes) = Activation::new();
        let logs = LogHub::new(false);
        let supervisor = Supervisor::new(
            SupervisorConfig::default(),
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
        let broker = eventing_broker::EventBroker::new(
            std::sync::Arc::new(RedbLog::open(&dir.join("events.redb")).expect("log")),
            store.subscribe_eventing(),
            BrokerConfig {
                max_event_size: 1 << 20,
                default_timeout: std::time::Duration::from_secs(1),
                concurrency: 1,
                ingress: "127.0.0.1:9".parse().expect("addr"),
                broker_ingress: None,
                domain: DOMAIN.into(),
                drain_timeout: std::time::Duration::ZERO,
            },
            &registry,
        );
        let shutdown = Shutdown::new();
        let control = controller
            .api(shutdown.signal())
            .with_eventing(store.subscribe_eventing());
        let token = AdminToken::generate().expect("token");
        let refusals = Refusals::register(&registry);
        let app = router(
            AdminState {
                store: store.clone(),
                supervisor,
                scaling: controller.status_board(),
                logs,
                gateway_port: 8080,
                shutdown: shutdown.signal(),
                broker,
                importers: importers::Importers::new(
                    store.subscribe_sources(),
                    importers::ImportersConfig::new("127.0.0.1:9".parse().expect("addr"), DOMAIN),
                    &registry,
                ),
                routes: controller.routes(),
            },
            control,
            Health::default(),
            registry,
            Credential::new(token.clone(), "read .mecha/admin-token"),
            refusals,
        );
        Fixture {
            app,
            store,
            token,
            dir,
            _shutdown: shutdown,
        }
    }

    fn service_files() -> String {
        serde_json::json!({"files": [{
            "path": "/nowhere/svc.yaml",
            "content": "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: evil\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"touch /tmp/evil\"]\n",
        }]})
        .to_string()
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        host: &str,
        authorization: Option<&str>,
        body: String,
    ) -> (StatusCode, String) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body)).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        // The watch streams never end: read only what is there at once.
        let body = if (path == WATCH_PATH || path == EVENTING_WATCH_PATH) && status.is_success() {
            String::new()
        } else {
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        (status, body)
    }

    #[tokio::test]
    async fn every_admin_route_needs_the_credential_and_a_loopback_host() {
        let fixture = fixture();
        let app = &fixture.app;
        let bearer = format!("Bearer {}", fixture.token.as_str());
        let poke = serde_json::to_string(&[Poke {
            revision: "evil-00001".into(),
            waiting: 3,
        }])
        .expect("json");
        let routes: Vec<(&str, &str, String)> = vec![
            ("POST", "/api/v1/apply", service_files()),
            ("POST", "/api/v1/delete", service_files()),
            ("GET", "/api/v1/services", String::new()),
            ("GET", "/api/v1/brokers", String::new()),
            ("GET", "/api/v1/triggers", String::new()),
            (
                "GET",
                "/api/v1/namespaces/default/services/evil/logs",
                String::new(),
            ),
            ("GET", WATCH_PATH, String::new()),
            ("GET", EVENTING_WATCH_PATH, String::new()),
            ("POST", STATS_PATH, "[]".into()),
            ("POST", POKE_PATH, poke),
        ];
        for (method, path, body) in &routes {
            let (status, text) =
                call(app, method, path, "localhost:8081", None, body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(text, "missing credential: read .mecha/admin-token\n");
            let wrong = format!("Bearer {}", "f".repeat(64));
            let (status, _) =
                call(app, method, path, "localhost", Some(&wrong), body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            for host in ["evil.example", "127.0.0.1.nip.io"] {
                let (status, _) = call(app, method, path, host, Some(&bearer), body.clone()).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path} {host}");
            }
        }
        assert_eq!(
            fixture.store.snapshot().services().count(),
            0,
            "nothing applied"
        );

        // With both, every route answers as before.
        for (method, path, body) in &routes {
            let (status, text) = call(
                app,
                method,
                path,
                "127.0.0.1:8081",
                Some(&bearer),
                body.clone(),
            )
            .await;
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {text}");
            assert_ne!(status, StatusCode::FORBIDDEN, "{method} {path}: {text}");
        }
        assert_eq!(
            fixture.store.snapshot().services().count(),
            0,
            "applied, then deleted"
        );
        let (status, text) = call(
            app,
            "POST",
            "/api/v1/apply",
            "[::1]:8081",
            Some(&bearer),
            service_files(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(fixture.store.snapshot().services().count(), 1);

        // Health and metrics need no credential, only a loopback host.
        for path in ["/live", "/ready", "/metrics"] {
            let (status, _) = call(app, "GET", path, "localhost", None, String::new()).await;
            assert!(
                status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                "{path}: {status}"
            );
            let (status, _) = call(app, "GET", path, "evil.example", None, String::new()).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        }
        let (_, metrics) = call(app, "GET", "/metrics", "localhost", None, String::new()).await;
        assert!(
            metrics.contains("mecha_admin_refused_requests_total{reason=\"credential\"} 20"),
            "{metrics}"
        );
    }
}
