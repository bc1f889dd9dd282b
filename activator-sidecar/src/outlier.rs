//! Outlier detection in the gateway roles: which outcomes count against a replica, the rule
//! that a revision never loses its last routable replica, and what is said about it (logs,
//! metrics). The state machine itself is [`mecha_common::outlier`], kept on each
//! [`Endpoint`] so it survives table updates and is shared by every caller in the process.
//!
//! Both paths report through [`Outliers::record`] — the fast path from its
//! [`Role::replied`](crate::h1::Role::replied) hook, hyper's path from `Gateway::forward` —
//! so they cannot count differently.

use mecha_common::Endpoint;
use mecha_common::outlier::{Outcome, OutlierConfig, Routable, Transition};
use mecha_common::routing::ServiceKey;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;

use crate::error::Failure;

/// The gateway's outlier detector: its settings and metrics (the state is on the endpoints).
#[derive(Debug, Clone)]
pub struct Outliers {
    config: OutlierConfig,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
}

// === impl Outliers ===

impl Outliers {
    pub fn new(config: OutlierConfig, registry: &Registry) -> Self {
        let ejections = IntCounterVec::new(
            Opts::new(
                "mecha_gateway_replica_ejections_total",
                "Replicas taken out of rotation for failing requests in a row (timeouts, refused connections)",
            ),
            &crate::gateway::REVISION_LABELS,
        )
        .expect("valid metric");
        let ejected = IntGaugeVec::new(
            Opts::new(
                "mecha_gateway_ejected_replicas",
                "Replicas out of rotation now for failing requests",
            ),
            &crate::gateway::REVISION_LABELS,
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(ejections.clone()));
        let _ = registry.register(Box::new(ejected.clone()));
        Self {
            config,
            ejections,
            ejected,
        }
    }

    /// The same detector (and metrics) with other settings.
    pub fn with_config(mut self, config: OutlierConfig) -> Self {
        self.config = config;
        self
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// What a reply (or its absence) says about the replica: no response head before the
    /// deadline, or no connection, count against it; a replica that answers with a broken
    /// response, or a request the rules refused, says nothing about whether it is hung.
    pub fn judge(reply: Result<(), &Failure>) -> Option<Outcome> {
        match reply {
            Ok(()) => Some(Outcome::Answered),
            Err(Failure::Timeout | Failure::Connect(_)) => Some(Outcome::Failed),
            Err(Failure::Upstream(_) | Failure::Refused(_)) => None,
        }
    }

    /// Records one attempt at `endpoint`, a replica of `service`'s `revision` whose ready
    /// replicas are `peers` (itself included or not).
    pub fn record(
        &self,
        service: &ServiceKey,
        revision: &str,
        endpoint: &Endpoint,
        peers: &[Endpoint],
        reply: Result<(), &Failure>,
    ) {
        if !self.config.enabled() {
            return;
        }
        let Some(outcome) = Self::judge(reply) else {
            return;
        };
        let now = Instant::now();
        // Read before this endpoint's lock is taken: never two outlier locks at once. Two
        // replicas ejected at the same moment may still both go; the picker then uses them
        // anyway (see `routable`).
        let others = outcome == Outcome::Failed
            && peers
                .iter()
                .any(|peer| !peer.same(endpoint) && peer.outlier().routable(now) != Routable::No);
        let (returned, transition) = endpoint.outlier().update(|outlier| {
            (
                outlier.settle(now),
                outlier.record(now, outcome, others, &self.config),
            )
        });
        let labels = [
            service.namespace.as_str(),
            service.name.as_str(),
            mecha_common::routing::revision_name(revision),
        ];
        if returned.is_some() {
            self.returned(&labels, endpoint);
        }
        match transition {
            Some(Transition::Ejected {
                ejected_for,
                times,
                failures,
            }) => {
                tracing::warn!(
                    revision,
                    replica = %endpoint.replica,
                    addr = %endpoint.addr,
                    failures,
                    times,
                    ejected_for = ?ejected_for,
                    "replica ejected: it failed requests in a row (no response before the timeout, or no connection); other replicas take its requests until it is tried again"
                );
                self.ejections.with_label_values(&labels).inc();
                self.ejected.with_label_values(&labels).inc();
                // Said when its time is over even if no request comes to try it.
                let (outliers, labels, endpoint) =
                    (self.clone(), labels.map(String::from), endpoint.clone());
                tokio::spawn(async move {
                    tokio::time::sleep_until(now + ejected_for).await;
                    let returned = endpoint
                        .outlier()
                        .update(|outlier| outlier.settle(Instant::now()));
                    if returned.is_some() {
                        outliers.returned(&labels.each_ref().map(String::as_str), &endpoint);
                    }
                });
            }
            Some(Transition::Spared { failures }) => tracing::warn!(
                revision,
                replica = %endpoint.replica,
                addr = %endpoint.addr,
                failures,
                "replica fails requests in a row but is the revision's only routable replica; it stays in rotation"
            ),
            Some(Transition::Recovered) => tracing::info!(
                revision,
                replica = %endpoint.replica,
                "replica answered again after its ejection; fully back in rotation"
            ),
            Some(Transition::Returned) | None => {}
        }
    }

    /// `labels`: namespace, service, revision.
    fn returned(&self, labels: &[&str; 3], endpoint: &Endpoint) {
        self.ejected.with_label_values(labels).dec();
        tracing::info!(
            revision = labels[2],
            replica = %endpoint.replica,
            addr = %endpoint.addr,
            "ejected replica back in rotation, on trial: one request at a time until one is answered"
        );
    }

    /// The candidates a picker may use: those in rotation; when that is none of them (every
    /// one ejected, or the only ones in rotation went away), all of them — as Envoy's panic
    /// threshold does, a revision never routes to nothing because of ejections.
    pub fn routable<'a>(&self, candidates: Vec<&'a Endpoint>) -> Vec<&'a Endpoint> {
        if !self.config.enabled() {
            return candidates;
        }
        let now = Instant::now();
        if candidates.iter().all(|e| e.routable(now)) {
            return candidates;
        }
        let routable: Vec<&Endpoint> = candidates
            .iter()
            .copied()
            .filter(|e| e.routable(now))
            .collect();
        if routable.is_empty() {
            candidates
        } else {
            routable
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const CONFIG: OutlierConfig = OutlierConfig {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(10),
        max_ejection: Duration::from_secs(60),
    };

    fn endpoint(name: &str, port: u16) -> Endpoint {
        Endpoint::standalone(name, ([127, 0, 0, 1], port).into())
    }

    fn svc() -> ServiceKey {
        ServiceKey::new("default", "svc")
    }

    fn gauge(outliers: &Outliers) -> i64 {
        outliers
            .ejected
            .with_label_values(&["default", "svc", "rev"])
            .get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_replica_is_ejected_and_tried_again_after_its_time() {
        let outliers = Outliers::new(CONFIG, &Registry::new());
        let (hung, good) = (endpoint("hung", 1), endpoint("good", 2));
        let peers = [hung.clone(), good.clone()];
        // Refused requests and broken answers say nothing; timeouts and refused connects do.
        let refused = Failure::Upstream("reset".into());
        outliers.record(&svc(), "rev", &hung, &peers, Err(&refused));
        outliers.record(&svc(), "rev", &hung, &peers, Err(&Failure::Timeout));
        outliers.record(
            &svc(),
            "rev",
            &hung,
            &peers,
            Err(&Failure::Connect("refused".into())),
        );
        assert_eq!(outliers.routable(vec![&hung, &good]).len(), 2);
        outliers.record(&svc(), "rev", &hung, &peers, Err(&Failure::Timeout));
        let picked = outliers.routable(vec![&hung, &good]);
        assert_eq!(picked.len(), 1);
        assert_eq!(&*picked[0].replica, "good");
        assert_eq!(gauge(&outliers), 1);
        assert_eq!(
            outliers
                .ejections
                .with_label_values(&["default", "svc", "rev"])
                .get(),
            1
        );
        // Alone among the candidates (the good one is excluded after a failed connect, say),
        // an ejected replica is still used: never zero.
        assert_eq!(outliers.routable(vec![&hung]).len(), 1);
        // Its time over, the timer says so and it takes one request at a time.
        tokio::time::sleep(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(gauge(&outliers), 0);
        assert_eq!(outliers.routable(vec![&hung, &good]).len(), 2);
        let trial = hung.track();
        assert_eq!(outliers.routable(vec![&hung, &good]).len(), 1);
        drop(trial);
        outliers.record(&svc(), "rev", &hung, &peers, Ok(()));
        let _busy = hung.track();
        assert_eq!(outliers.routable(vec![&hung, &good]).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_routable_replica_is_never_ejected() {
        let outliers = Outliers::new(CONFIG, &Registry::new());
        let (a, b) = (endpoint("a", 1), endpoint("b", 2));
        let peers = [a.clone(), b.clone()];
        for _ in 0..3 {
            outliers.record(&svc(), "rev", &a, &peers, Err(&Failure::Timeout));
        }
        assert_eq!(gauge(&outliers), 1);
        // b hangs too, but a is out: b stays.
        for _ in 0..5 {
            outliers.record(&svc(), "rev", &b, &peers, Err(&Failure::Timeout));
        }
        assert_eq!(gauge(&outliers), 1);
        assert!(b.routable(Instant::now()));
        // A lone replica is never ejected either.
        let lone = endpoint("lone", 3);
        for _ in 0..5 {
            outliers.record(
                &svc(),
                "rev",
                &lone,
                std::slice::from_ref(&lone),
                Err(&Failure::Timeout),
            );
        }
        assert!(lone.routable(Instant::now()));
    }
}
