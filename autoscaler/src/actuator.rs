//! The workload-runtime seam: what the controller needs from whatever runs replicas.
//!
//! Local mode's implementation is the process [`Supervisor`](crate::Supervisor); Kubernetes
//! mode's sets a Deployment's replicas through its scale subresource and reads ready
//! endpoints from EndpointSlices. The controller holds an `A: Actuator`, never a concrete
//! runtime, so its tests run against a fake one under paused time.

use std::future::Future;
use std::sync::Arc;

use mecha_common::EndpointTable;
use tokio::sync::watch;

use crate::serving::RevisionSpec;

/// Runs revisions at the replica counts the controller decides, and reports which replicas are
/// ready.
pub trait Actuator: Send + Sync + 'static {
    /// Runs `replicas` replicas of `revision`; 0 stops them all (each drains first). The
    /// controller calls it on every actuation with the current count, so an unchanged count
    /// must be cheap and change nothing. An error means this revision's step did not happen:
    /// the controller shows it (status, metrics, log) and retries with backoff.
    fn scale(
        &self,
        revision: &Arc<RevisionSpec>,
        replicas: u32,
    ) -> impl Future<Output = Result<(), ActuationError>> + Send;

    /// Ready endpoints of every revision; changes whenever a replica enters or leaves
    /// rotation.
    fn endpoints(&self) -> watch::Receiver<Arc<EndpointTable>>;

    /// Whether the revision has had a ready replica (Knative's `Ready` condition, and what
    /// `latestRevision: true` routes to).
    fn ever_ready(&self, revision: &str) -> bool;

    /// The replica count the runtime already runs for a revision this controller has not
    /// scaled yet — in a cluster, what the previous leader set — so the controller goes on
    /// from there instead of from the initial scale. `None` (the default, and local mode's:
    /// a new process runs nothing) starts it at its initial scale.
    fn running(&self, revision: &RevisionSpec) -> Option<u32> {
        let _ = revision;
        None
    }
}

/// Why a revision's step failed; [`ActuationError::label`] is its metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActuationError {
    /// The runtime did not answer (a Kubernetes API server that cannot be reached).
    #[error("the runtime cannot be reached: {0}")]
    Unavailable(String),
    /// The runtime answered and refused or failed the change (a conflict, a missing
    /// Deployment, a forbidden request).
    #[error("the runtime refused the change: {0}")]
    Refused(String),
}

// === impl ActuationError ===

impl ActuationError {
    /// `reason` of `mecha_autoscaler_actuation_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Refused(_) => "refused",
        }
    }
}

// === impl Supervisor ===

impl Actuator for crate::Supervisor {
    async fn scale(
        &self,
        revision: &Arc<RevisionSpec>,
        replicas: u32,
    ) -> Result<(), ActuationError> {
        // Processes that fail to start are the supervisor's own business (restarted with
        // backoff, shown in `mecha logs`): setting the count itself cannot fail.
        self.set_replicas(revision, replicas);
        Ok(())
    }

    fn endpoints(&self) -> watch::Receiver<Arc<EndpointTable>> {
        crate::Supervisor::endpoints(self)
    }

    fn ever_ready(&self, revision: &str) -> bool {
        crate::Supervisor::ever_ready(self, revision)
    }
}
