//! The Kubernetes [`Actuator`]: replica counts go to each revision's Deployment through its
//! `scale` subresource (a merge patch of `spec.replicas`, never a rewrite of the Deployment,
//! whose other fields belong to the serving reconciler); ready endpoints come from the
//! EndpointSlices of the per-revision headless Services ([`crate::endpoints`]).
//!
//! Only the leader writes: on a follower [`KubeActuator::scale`] changes nothing (the
//! controller still runs there, to serve routes from its own caches). Leadership gained
//! forgets what was applied before, so the new leader writes every count once. A controller
//! that meets a revision whose Deployment already runs goes on from its `spec.replicas`
//! ([`Running`]), not from the initial scale: a restart or a new leader neither wakes
//! scaled-to-zero revisions nor shrinks busy ones.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use autoscaler::{ActuationError, Actuator, RevisionSpec};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use mecha_common::EndpointTable;
use mecha_common::routing::revision_name;
use tokio::sync::watch;

/// The Deployment that runs a revision's pods (named as Knative names it, and as
/// [`crate::desired::deployment`] makes it).
pub fn deployment_name(revision: &str) -> String {
    format!("{revision}-deployment")
}

/// Revisions that have had a ready replica: seen in an EndpointSlice, or marked `Ready` in
/// their status by the reconciler (which survives a restart of the autoscaler, when a
/// scaled-to-zero revision has no endpoint to show).
#[derive(Debug, Clone, Default)]
pub struct EverReady(Arc<RwLock<HashSet<String>>>);

/// The replicas each revision's Deployment is set to (`spec.replicas`), by namespace and
/// revision, from the desired state's watch of Deployments: where a new leader goes on from.
#[derive(Debug, Clone, Default)]
pub struct Running(Arc<RwLock<HashMap<(String, String), u32>>>);

/// Sets Deployment replicas and reports ready endpoints.
#[derive(Clone)]
pub struct KubeActuator {
    client: kube::Client,
    endpoints: watch::Receiver<Arc<EndpointTable>>,
    ever_ready: EverReady,
    running: Running,
    leading: watch::Receiver<bool>,
    /// Revision → the replica count last written while leading (an unchanged count is not
    /// written again).
    applied: Arc<Mutex<HashMap<String, u32>>>,
}

// === impl EverReady ===

impl EverReady {
    pub fn mark(&self, revision: &str) {
        if !self.contains(revision) {
            self.0
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(revision.to_string());
        }
    }

    pub fn contains(&self, revision: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(revision)
    }
}

// === impl Running ===

impl Running {
    /// Replaces everything known with `counts` ((namespace, revision) → replicas).
    pub fn set_all(&self, counts: HashMap<(String, String), u32>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = counts;
    }

    pub fn get(&self, namespace: &str, revision: &str) -> Option<u32> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(namespace.to_string(), revision.to_string()))
            .copied()
    }
}

// === impl KubeActuator ===

impl std::fmt::Debug for KubeActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeActuator")
            .field("leading", &*self.leading.borrow())
            .field("applied", &*self.applied())
            .finish_non_exhaustive()
    }
}

impl KubeActuator {
    /// `endpoints` and `ever_ready` are fed by [`crate::endpoints::run`] (and `ever_ready`,
    /// `running` by [`crate::state::run`]); `leading` by [`crate::leader`].
    pub fn new(
        client: kube::Client,
        endpoints: watch::Receiver<Arc<EndpointTable>>,
        ever_ready: EverReady,
        running: Running,
        leading: watch::Receiver<bool>,
    ) -> Self {
        Self {
            client,
            endpoints,
            ever_ready,
            running,
            leading,
            applied: Arc::default(),
        }
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Actuator for KubeActuator {
    async fn scale(
        &self,
        revision: &Arc<RevisionSpec>,
        replicas: u32,
    ) -> Result<(), ActuationError> {
        if !*self.leading.borrow() {
            // A follower decides (to serve routes) but never writes; when it leads, it
            // writes every count once.
            self.applied().clear();
            return Ok(());
        }
        if self.applied().get(&revision.name) == Some(&replicas) {
            return Ok(());
        }
        let api: Api<Deployment> =
            Api::namespaced(self.client.clone(), &revision.service.namespace);
        let name = deployment_name(revision_name(&revision.name));
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        match api
            .patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(revision = %revision.name, replicas, "scaled");
                self.applied().insert(revision.name.clone(), replicas);
                Ok(())
            }
            Err(error) => {
                self.applied().remove(&revision.name);
                Err(actuation_error(
                    &format!(
                        "deployments/{name} in {}: scale to {replicas}",
                        revision.service.namespace
                    ),
                    error,
                ))
            }
        }
    }

    fn endpoints(&self) -> watch::Receiver<Arc<EndpointTable>> {
        self.endpoints.clone()
    }

    fn ever_ready(&self, revision: &str) -> bool {
        self.ever_ready.contains(revision)
    }

    fn running(&self, revision: &RevisionSpec) -> Option<u32> {
        self.running
            .get(&revision.service.namespace, revision_name(&revision.name))
    }
}

/// What a failed API call means for the controller: the API server refused the change
/// (missing Deployment, conflict, forbidden, invalid) or could not take it now (no answer, a
/// 5xx, throttling).
pub fn actuation_error(what: &str, error: kube::Error) -> ActuationError {
    match error {
        kube::Error::Api(status) if status.code == 429 || status.code >= 500 => {
            ActuationError::Unavailable(format!("{what}: {} ({})", status.message, status.code))
        }
        kube::Error::Api(status) => {
            ActuationError::Refused(format!("{what}: {} ({})", status.message, status.code))
        }
        other => ActuationError::Unavailable(format!("{what}: {other}")),
    }
}
