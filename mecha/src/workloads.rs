//! Local mode's side of ContainerSource, SinkBinding and ApiServerSource: a ContainerSource's program runs under
//! the process supervisor (as a replica does, without probes), and SinkBindings' variables are
//! handed to the supervisor for the Services they select.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use autoscaler::Supervisor;
use autoscaler::serving::{RevisionSpec, ServingState, source_process};
use crds::serving::Container;
use importers::apiserver::{Object, Objects};
use importers::{Importers, SourcesState};
use mecha_common::ShutdownSignal;
use mecha_common::routing::ServiceKey;
use tokio::sync::watch;

/// Every resource `mecha up` holds, Knative-shaped, for ApiServerSources: the resources as
/// applied, and each Revision with its `Ready` condition (`True` once a replica was ready, as
/// `mecha get revisions` says).
pub fn objects(
    serving: &ServingState,
    eventing: &eventing_broker::EventingState,
    sources: &SourcesState,
    supervisor: &Supervisor,
) -> Objects {
    let mut objects = Objects::new();
    let mut put = |body: serde_json::Value, labels: &std::collections::BTreeMap<String, String>| {
        let text = |field: &str| body[field].as_str().unwrap_or_default().to_string();
        let metadata = &body["metadata"];
        let key = (
            text("apiVersion"),
            text("kind"),
            metadata["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            metadata["name"].as_str().unwrap_or_default().to_string(),
        );
        objects.insert(
            key,
            Object {
                labels: labels.clone(),
                body,
            },
        );
    };
    for record in serving.services() {
        let mut service = serde_json::to_value(&record.service).unwrap_or_default();
        service["metadata"]["namespace"] = record.key.namespace.clone().into();
        put(service, &record.service.metadata.labels);
        for revision in &record.revisions {
            let labels = std::collections::BTreeMap::from([
                (
                    "serving.knative.dev/service".to_string(),
                    record.key.name.clone(),
                ),
                (
                    "serving.knative.dev/configuration".to_string(),
                    record.key.name.clone(),
                ),
            ]);
            let ready = if supervisor.ever_ready(&revision.name) {
                "True"
            } else {
                "Unknown"
            };
            put(
                serde_json::json!({
                    "apiVersion": "serving.knative.dev/v1",
                    "kind": "Revision",
                    "metadata": {
                        "name": revision.name,
                        "namespace": record.key.namespace,
                        "labels": labels,
                        "ownerReferences": [{
                            "apiVersion": "serving.knative.dev/v1",
                            "kind": "Service",
                            "name": record.key.name,
                            "controller": true
                        }]
                    },
                    "spec": revision.template.spec,
                    "status": {"conditions": [{"type": "Ready", "status": ready}]}
                }),
                &labels,
            );
        }
    }
    for broker in eventing.brokers.values() {
        let mut body = serde_json::to_value(broker).unwrap_or_default();
        body["metadata"]["namespace"] = broker.metadata.namespace().into();
        put(body, &broker.metadata.labels);
    }
    for trigger in eventing.triggers.values() {
        let mut body = serde_json::to_value(trigger).unwrap_or_default();
        body["metadata"]["namespace"] = trigger.metadata.namespace().into();
        put(body, &trigger.metadata.labels);
    }
    for source in sources.sources.values() {
        let mut body = source.to_json();
        body["metadata"]["namespace"] = source.namespace().into();
        put(body, &source.metadata().labels);
    }
    objects
}

/// Publishes [`objects`] whenever resources or replicas' readiness change, until `shutdown`.
pub async fn publish_objects(
    store: Arc<crate::store::LocalStore>,
    supervisor: Supervisor,
    out: watch::Sender<Arc<Objects>>,
    shutdown: ShutdownSignal,
) {
    let mut serving = store.subscribe();
    let mut eventing = store.subscribe_eventing();
    let mut sources = store.subscribe_sources();
    let mut endpoints = supervisor.endpoints();
    loop {
        let now = objects(
            &serving.borrow_and_update().clone(),
            &eventing.borrow_and_update().clone(),
            &sources.borrow_and_update().clone(),
            &supervisor,
        );
        endpoints.borrow_and_update();
        out.send_if_modified(|current| {
            let changed = **current != now;
            if changed {
                *current = Arc::new(now);
            }
            changed
        });
        tokio::select! {
            changed = serving.changed() => if changed.is_err() { return },
            changed = eventing.changed() => if changed.is_err() { return },
            changed = sources.changed() => if changed.is_err() { return },
            changed = endpoints.changed() => if changed.is_err() { return },
            () = shutdown.clone().recv() => return,
        }
    }
}

/// The running ContainerSources' processes, by `(namespace, name)`.
type Running = HashMap<(String, String), Arc<RevisionSpec>>;

/// [`importers::Processes`] on the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisedProcesses {
    supervisor: Supervisor,
    running: Arc<Mutex<Running>>,
}

impl SupervisedProcesses {
    pub fn new(supervisor: Supervisor) -> Self {
        Self {
            supervisor,
            running: Arc::default(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl importers::Processes for SupervisedProcesses {
    fn run(&self, namespace: &str, name: &str, container: &Container, env: Vec<(String, String)>) {
        let spec = Arc::new(source_process(namespace, name, container.clone(), env));
        self.supervisor.set_replicas(&spec, 1);
        self.running()
            .insert((namespace.to_string(), name.to_string()), spec);
    }

    fn stop(&self, namespace: &str, name: &str) {
        let spec = self
            .running()
            .remove(&(namespace.to_string(), name.to_string()));
        if let Some(spec) = spec {
            self.supervisor.set_replicas(&spec, 0);
        }
    }

    fn problem(&self, namespace: &str, name: &str) -> Option<String> {
        let spec = self
            .running()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()?;
        let status = self.supervisor.status(&spec.name);
        let replicas = status.map(|s| s.replicas).unwrap_or_default();
        if replicas.iter().any(|r| r.ready) {
            return None;
        }
        let last = replicas.iter().find_map(|r| {
            r.last_exit
                .as_ref()
                .map(|exit| format!("{exit}; restarted {} times", r.restarts))
        });
        Some(match last {
            Some(last) => format!("its process is not running (it ended: {last})"),
            None => "its process is starting".to_string(),
        })
    }
}

/// Follows sources and Services: the variables of every SinkBinding reach the replicas of the
/// Services it selects (a change replaces their replicas), until `shutdown`.
pub async fn follow_bindings(
    importers: Importers,
    mut sources: watch::Receiver<Arc<SourcesState>>,
    mut serving: watch::Receiver<Arc<ServingState>>,
    supervisor: Supervisor,
    shutdown: ShutdownSignal,
) {
    loop {
        let state = sources.borrow_and_update().clone();
        let services = serving.borrow_and_update().clone();
        let listed: Vec<(String, String, std::collections::BTreeMap<String, String>)> = services
            .services()
            .map(|r| {
                (
                    r.key.namespace.clone(),
                    r.key.name.clone(),
                    r.service.metadata.labels.clone(),
                )
            })
            .collect();
        let bound = importers::bindings::bound_env(
            &state,
            listed.iter().map(|(ns, n, l)| (ns.as_str(), n.as_str(), l)),
            |resource| importers.sink(resource).ok().map(|t| t.url),
        );
        let bound: HashMap<ServiceKey, Vec<(String, String)>> = bound
            .into_iter()
            .map(|((ns, name), env)| (ServiceKey::new(ns, name), env))
            .collect();
        for key in supervisor.bind_env(bound) {
            tracing::info!(service = %format!("{}/{}", key.namespace, key.name), "the service's bound variables (K_SINK, K_CE_OVERRIDES) changed");
        }
        tokio::select! {
            changed = sources.changed() => if changed.is_err() { return },
            changed = serving.changed() => if changed.is_err() { return },
            () = shutdown.clone().recv() => return,
        }
    }
}
