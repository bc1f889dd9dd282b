//! Local mode's desired state: what `mecha up` loaded and `mecha apply` sent, in memory,
//! published to the controller as immutable snapshots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use autoscaler::{Applied, ServingState};
use crds::{LoadError, Loaded, Resource};
use eventing_broker::{Change, EventingState};
use importers::SourcesState;
use mecha_common::routing::ServiceKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug)]
pub struct LocalStore {
    state: Mutex<(ServingState, EventingState, SourcesState)>,
    tx: watch::Sender<Arc<ServingState>>,
    eventing: watch::Sender<Arc<EventingState>>,
    sources: watch::Sender<Arc<SourcesState>>,
    /// When each revision was created (by `mecha up`'s load or an apply).
    created: Mutex<HashMap<String, SystemTime>>,
}

/// What happened to one resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured`, `unchanged`, `deleted` or `not found`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

// === impl LocalStore ===

impl LocalStore {
    pub fn new() -> Self {
        Self {
            state: Mutex::default(),
            tx: watch::channel(Arc::default()).0,
            eventing: watch::channel(Arc::default()).0,
            sources: watch::channel(Arc::default()).0,
            created: Mutex::default(),
        }
    }

    /// When `revision` was created; `None` for a name this store never made.
    pub fn created(&self, revision: &str) -> Option<SystemTime> {
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(revision)
            .copied()
    }

    pub fn subscribe_sources(&self) -> watch::Receiver<Arc<SourcesState>> {
        self.sources.subscribe()
    }

    pub fn sources(&self) -> Arc<SourcesState> {
        self.sources.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ServingState>> {
        self.tx.subscribe()
    }

    pub fn snapshot(&self) -> Arc<ServingState> {
        self.tx.borrow().clone()
    }

    pub fn subscribe_eventing(&self) -> watch::Receiver<Arc<EventingState>> {
        self.eventing.subscribe()
    }

    pub fn eventing(&self) -> Arc<EventingState> {
        self.eventing.borrow().clone()
    }

    /// Applies every resource in order, as successive `kubectl apply`s would. All or
    /// nothing: if any resource is refused, none is applied and every error is returned.
    pub fn apply(&self, resources: Vec<Loaded>) -> Result<Vec<Outcome>, Vec<LoadError>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut next, mut eventing, mut sources) = state.clone();
        let mut outcomes = Vec::new();
        let mut errors = Vec::new();
        for loaded in resources {
            let kind = loaded.resource.kind();
            let (namespace, name) = (
                loaded.resource.namespace().to_string(),
                loaded.resource.name().to_string(),
            );
            let change = match loaded.resource {
                Resource::Service(service) => Err(service),
                Resource::Broker(broker) => Ok(eventing.apply_broker(broker)),
                Resource::Trigger(trigger) => Ok(eventing.apply_trigger(trigger)),
                Resource::Source(source) => Ok(match sources.apply(source) {
                    (true, _) => Change::Created,
                    (false, true) => Change::Configured,
                    (false, false) => Change::Unchanged,
                }),
                Resource::AutoscalerConfig(config) => {
                    let action = if next.config() == &config {
                        "unchanged"
                    } else {
                        "configured"
                    };
                    next.set_config(Some(config));
                    outcomes.push(Outcome {
                        kind: "ConfigMap".into(),
                        namespace: crds::config::NAMESPACE.into(),
                        name: crds::config::NAME.into(),
                        action: action.into(),
                        revision: None,
                    });
                    continue;
                }
            };
            let service = match change {
                Err(service) => service,
                Ok(change) => {
                    let action = match change {
                        Change::Created => "created",
                        Change::Configured => "configured",
                        Change::Unchanged => "unchanged",
                    };
                    outcomes.push(Outcome {
                        kind: kind.into(),
                        namespace,
                        name,
                        action: action.into(),
                        revision: None,
                    });
                    continue;
                }
            };
            let (namespace, name) = (
                service.namespace().to_string(),
                service.metadata.name.clone(),
            );
            match next.apply(service, loaded.source.clone()) {
                Ok(applied) => {
                    let (action, revision) = match applied {
                        Applied::Created { revision } => ("created", Some(revision)),
                        Applied::NewRevision { revision } => ("configured", Some(revision)),
                        Applied::Configured => ("configured", None),
                        Applied::Unchanged => ("unchanged", None),
                    };
                    outcomes.push(Outcome {
                        kind: "Service".into(),
                        namespace,
                        name,
                        action: action.into(),
                        revision,
                    });
                }
                Err(field_errors) => errors.extend(
                    field_errors
                        .into_iter()
                        .map(|e| LoadError::field(&loaded.source.file, loaded.source.document, e)),
                ),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let now = SystemTime::now();
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(
                outcomes
                    .iter()
                    .filter_map(|o| o.revision.clone())
                    .map(|revision| (revision, now)),
            );
        *state = (next.clone(), eventing.clone(), sources.clone());
        self.tx.send_replace(Arc::new(next));
        self.eventing.send_if_modified(|current| {
            let changed = **current != eventing;
            *current = Arc::new(eventing);
            changed
        });
        self.sources.send_if_modified(|current| {
            let changed = **current != sources;
            *current = Arc::new(sources);
            changed
        });
        Ok(outcomes)
    }

    /// Deletes the resources named by `resources` (their content beyond kind, namespace and
    /// name does not matter).
    pub fn delete(&self, resources: &[Loaded]) -> Vec<Outcome> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut next, mut eventing, mut sources) = state.clone();
        let outcomes = resources
            .iter()
            .map(|loaded| {
                let key = ServiceKey::new(loaded.resource.namespace(), loaded.resource.name());
                let found = match loaded.resource {
                    Resource::Service(_) => next.delete(&key),
                    Resource::AutoscalerConfig(_) => {
                        next.set_config(None);
                        true
                    }
                    Resource::Broker(_) => eventing
                        .brokers
                        .remove(&(key.namespace.clone(), key.name.clone()))
                        .is_some(),
                    Resource::Trigger(_) => eventing
                        .triggers
                        .remove(&(key.namespace.clone(), key.name.clone()))
                        .is_some(),
                    Resource::Source(ref source) => {
                        sources.remove(source.kind(), &key.namespace, &key.name)
                    }
                };
                Outcome {
                    kind: loaded.resource.kind().into(),
                    namespace: key.namespace,
                    name: key.name,
                    action: if found { "deleted" } else { "not found" }.into(),
                    revision: None,
                }
            })
            .collect();
        *state = (next.clone(), eventing.clone(), sources.clone());
        self.tx.send_replace(Arc::new(next));
        self.eventing.send_replace(Arc::new(eventing));
        self.sources.send_replace(Arc::new(sources));
        outcomes
    }
}

impl Default for LocalStore {
    fn default() -> Self {
        Self::new()
    }
}
