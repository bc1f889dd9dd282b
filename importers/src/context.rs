//! What a running source gets: its identity, the shutdown signal, and the sink behind the
//! rules every source shares (`ceOverrides` applied, counted per source).

use std::collections::BTreeMap;
use std::sync::Arc;

use eventing_broker::Event;
use mecha_common::ShutdownSignal;

use crate::metrics::SourceMetrics;
use crate::sink::{Sink, SinkError};

#[derive(Debug, Clone)]
pub struct SourceContext {
    /// `(kind, namespace, name)` of the source, for metrics and logs.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub shutdown: ShutdownSignal,
    sink: Arc<dyn Sink>,
    extensions: BTreeMap<String, String>,
    metrics: SourceMetrics,
}

// === impl SourceContext ===

impl SourceContext {
    pub fn new(
        (kind, namespace, name): (String, String, String),
        shutdown: ShutdownSignal,
        sink: Arc<dyn Sink>,
        extensions: BTreeMap<String, String>,
        metrics: SourceMetrics,
    ) -> Self {
        Self {
            kind,
            namespace,
            name,
            shutdown,
            sink,
            extensions,
            metrics,
        }
    }

    /// Counts a refused webhook delivery.
    pub fn rejected(&self, reason: &str) {
        self.metrics
            .rejected
            .with_label_values(&[&self.kind, &self.namespace, &self.name, reason])
            .inc();
    }

    /// Sends one event to the sink with the source's `ceOverrides.extensions` set, and counts
    /// the outcome. `Ok` once the sink accepted it.
    pub async fn emit(&self, mut event: Event) -> Result<(), SinkError> {
        for (name, value) in &self.extensions {
            event.set(name, value.clone());
        }
        let id = event.id();
        let labels = [
            self.kind.as_str(),
            self.namespace.as_str(),
            self.name.as_str(),
        ];
        match self.sink.send(event).await {
            Ok(()) => {
                self.metrics.sent.with_label_values(&labels).inc();
                Ok(())
            }
            Err(error) => {
                self.metrics.failed.with_label_values(&labels).inc();
                tracing::warn!(source = %format!("{}/{}", self.namespace, self.name), kind = %self.kind, %id, %error, "an event was not delivered to the sink");
                Err(error)
            }
        }
    }
}
