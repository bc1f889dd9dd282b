//! Per-source counters: events the sink accepted and events given up on.

use prometheus::{IntCounterVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct SourceMetrics {
    /// `mecha_source_events_sent_total{kind,namespace,name}`.
    pub sent: IntCounterVec,
    /// `mecha_source_events_failed_total{kind,namespace,name}`: every retry failed.
    pub failed: IntCounterVec,
    /// `mecha_source_webhook_rejected_total{kind,namespace,name,reason}`: deliveries refused
    /// (bad or missing signature, bad payload, too large, the sink failed).
    pub rejected: IntCounterVec,
}

// === impl SourceMetrics ===

impl SourceMetrics {
    pub fn new(registry: &Registry) -> Self {
        let labels = ["kind", "namespace", "name"];
        let counter = |name: &str, help: &str| {
            let counter = IntCounterVec::new(Opts::new(name, help), &labels)
                .unwrap_or_else(|_| unreachable!("constant metric options are valid"));
            // A second registration (two runtimes on one registry in tests) keeps the first.
            let _ = registry.register(Box::new(counter.clone()));
            counter
        };
        let rejected = IntCounterVec::new(
            Opts::new(
                "mecha_source_webhook_rejected_total",
                "Webhook deliveries a source refused, by reason.",
            ),
            &["kind", "namespace", "name", "reason"],
        )
        .unwrap_or_else(|_| unreachable!("constant metric options are valid"));
        let _ = registry.register(Box::new(rejected.clone()));
        Self {
            rejected,
            sent: counter(
                "mecha_source_events_sent_total",
                "Events a source sent that its sink accepted (2xx).",
            ),
            failed: counter(
                "mecha_source_events_failed_total",
                "Events a source gave up on after every retry.",
            ),
        }
    }

    /// `(sent, failed)` of one source.
    pub fn counts(&self, kind: &str, namespace: &str, name: &str) -> (u64, u64) {
        let labels = [kind, namespace, name];
        (
            self.sent.with_label_values(&labels).get(),
            self.failed.with_label_values(&labels).get(),
        )
    }
}
