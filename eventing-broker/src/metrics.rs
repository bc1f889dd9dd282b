//! The broker's Prometheus metrics.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub received: IntCounterVec,
    pub rejected: IntCounterVec,
    pub stored: IntCounterVec,
    pub dropped_ttl: IntCounterVec,
    pub delivered: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub failed: IntCounterVec,
    pub latency: HistogramVec,
    pub log_events: IntGaugeVec,
    pub log_bytes: IntGauge,
    pub trigger_ready: IntGaugeVec,
    pub trigger_failures: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(g.clone()));
            g
        };
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "mecha_broker_delivery_latency_seconds",
                "Time from taking an event off the log to its successful delivery, retries included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["namespace", "trigger"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(latency.clone()));
        let broker = &["namespace", "broker"];
        let trigger = &["namespace", "trigger"];
        Self {
            received: counter(
                "mecha_broker_events_received_total",
                "Events that reached a broker's ingress (replies included).",
                broker,
            ),
            rejected: counter(
                "mecha_broker_events_rejected_total",
                "Requests refused by the ingress, by reason.",
                &["namespace", "broker", "reason"],
            ),
            stored: counter(
                "mecha_broker_events_stored_total",
                "Events durably appended to a broker's log.",
                broker,
            ),
            dropped_ttl: counter(
                "mecha_broker_events_dropped_ttl_total",
                "Events dropped because their knativebrokerttl ran out (reply loops).",
                broker,
            ),
            delivered: counter(
                "mecha_broker_events_delivered_total",
                "Events a trigger's subscriber accepted with a 2xx.",
                trigger,
            ),
            retried: counter(
                "mecha_broker_delivery_retries_total",
                "Delivery attempts after the first.",
                trigger,
            ),
            dead_lettered: counter(
                "mecha_broker_events_dead_lettered_total",
                "Events handed to a dead-letter sink after delivery failed.",
                trigger,
            ),
            failed: counter(
                "mecha_broker_events_failed_total",
                "Events whose delivery failed with no dead-letter sink (or the sink failed too).",
                trigger,
            ),
            latency,
            log_events: gauge(
                "mecha_broker_log_events",
                "Events held in a broker's log, waiting for at least one trigger.",
                broker,
            ),
            trigger_ready: gauge(
                "mecha_broker_trigger_ready",
                "1 while a trigger delivers, 0 while it cannot start or its task failed and is being retried.",
                trigger,
            ),
            trigger_failures: counter(
                "mecha_broker_trigger_failures_total",
                "Times a trigger turned not ready (its task failed, or it could not start).",
                trigger,
            ),
            log_bytes: {
                let g = IntGauge::new("mecha_broker_log_bytes", "Size of the event log file.")
                    .expect("valid metric");
                let _ = registry.register(Box::new(g.clone()));
                g
            },
        }
    }
}
