//! The control loop: desired state and replica readiness in, routes and replica counts out.

use std::sync::Arc;

use mecha_common::{RoutingTable, ShutdownSignal};
use tokio::sync::watch;

use crate::serving::ServingState;
use crate::supervisor::Supervisor;

#[derive(Debug)]
pub struct Controller {
    state: watch::Receiver<Arc<ServingState>>,
    supervisor: Supervisor,
    routes: watch::Sender<Arc<RoutingTable>>,
    domain: String,
}

// === impl Controller ===

impl Controller {
    /// `domain` is the suffix of service hosts (`localhost` in local mode).
    pub fn new(
        state: watch::Receiver<Arc<ServingState>>,
        supervisor: Supervisor,
        domain: impl Into<String>,
    ) -> Self {
        Self {
            state,
            supervisor,
            routes: watch::channel(Arc::default()).0,
            domain: domain.into(),
        }
    }

    /// The routing table the gateway serves from.
    pub fn routes(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.routes.subscribe()
    }

    /// Computes routes and replica counts once, from the current state.
    pub fn reconcile(&self) {
        let state = self.state.borrow().clone();
        let desired = state.desired(&self.domain, |r| self.supervisor.ever_ready(r));
        self.routes.send_if_modified(|current| {
            if **current == desired.routes {
                false
            } else {
                *current = Arc::new(desired.routes);
                true
            }
        });
        self.supervisor.apply(&desired.replicas);
    }

    /// Reconciles on every change of desired state or readiness until shutdown.
    pub async fn run(mut self, shutdown: ShutdownSignal) {
        let mut endpoints = self.supervisor.endpoints();
        loop {
            self.reconcile();
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = endpoints.changed() => {}
                () = shutdown.clone().recv() => break,
            }
        }
    }
}
