//! What sidecars and the autoscaler tell each other. Local mode shares these values
//! in-process; across processes they travel as JSON over the sidecar's one control-plane
//! connection:
//!
//! - sidecar → autoscaler: [`Stat`]s posted to [`STATS_PATH`] once a second, and [`Poke`]s
//!   posted to [`POKE_PATH`] when a request is held for a revision without a free replica;
//! - autoscaler → sidecar: [`Snapshot`]s of routes and ready endpoints, one JSON line each,
//!   on the long-lived response of [`WATCH_PATH`], whenever either changes;
//! - autoscaler → standalone broker: every Broker and Trigger (`crds::eventing::EventingState`,
//!   one JSON line each) on the long-lived response of [`EVENTING_WATCH_PATH`], whenever they
//!   change;
//! - autoscaler → standalone importers: every source with its resolved sink
//!   (`crds::sources::SourcesSnapshot`, one JSON line each) on the long-lived response of
//!   [`SOURCES_WATCH_PATH`], whenever they change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use crate::activation::Poke;
use crate::load::LoadSample;
use crate::routing::{Endpoint, EndpointTable, RevisionEndpoints, Route, RoutingTable};

/// Where the autoscaler takes stats.
pub const STATS_PATH: &str = "/api/v1/stats";
/// Where the autoscaler takes activation pokes.
pub const POKE_PATH: &str = "/api/v1/pokes";
/// Where sidecars watch routes and endpoints.
pub const WATCH_PATH: &str = "/api/v1/watch";
/// Where standalone brokers watch Brokers and Triggers.
pub const EVENTING_WATCH_PATH: &str = "/api/v1/eventing/watch";
/// Where the standalone importers watch the sources they run, with their sinks resolved.
pub const SOURCES_WATCH_PATH: &str = "/api/v1/sources/watch";

/// Everything a caller needs to route: every host's route and every revision's ready replicas.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub routes: Vec<HostRoute>,
    pub endpoints: Vec<ReadyReplicas>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRoute {
    pub host: String,
    pub route: Route,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyReplicas {
    pub revision: String,
    pub replicas: Vec<ReplicaAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaAddr {
    pub replica: String,
    pub addr: SocketAddr,
}

/// Turns snapshots back into tables on the receiving side. A replica that stays in the
/// snapshot keeps its [`Endpoint`] (and so its in-flight count) from one snapshot to the next.
#[derive(Debug, Default)]
pub struct SnapshotReader {
    known: HashMap<(String, ReplicaAddr), Endpoint>,
}

/// One replica's load over one reporting interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stat {
    /// The revision the replica belongs to (`hello-00001`).
    pub revision: String,
    /// Which replica (pod) reports, so a second report replaces the first.
    pub replica: String,
    /// Time-weighted average of requests in flight over the interval.
    pub concurrency: f64,
    /// Requests started in the interval.
    pub requests: u64,
    /// Length of the interval in seconds.
    pub seconds: f64,
}

// === impl Snapshot ===

impl Snapshot {
    pub fn from_tables(routes: &RoutingTable, endpoints: &EndpointTable) -> Self {
        let mut snapshot = Snapshot {
            routes: routes
                .hosts()
                .map(|(host, route)| HostRoute {
                    host: host.clone(),
                    route: (**route).clone(),
                })
                .collect(),
            endpoints: endpoints
                .revisions()
                .map(|(revision, ready)| ReadyReplicas {
                    revision: revision.clone(),
                    replicas: ready
                        .ready
                        .iter()
                        .map(|e| ReplicaAddr {
                            replica: e.replica.to_string(),
                            addr: e.addr,
                        })
                        .collect(),
                })
                .collect(),
        };
        // Stable order, so equal tables give equal lines.
        snapshot.routes.sort_by(|a, b| a.host.cmp(&b.host));
        snapshot
            .endpoints
            .sort_by(|a, b| a.revision.cmp(&b.revision));
        snapshot
    }
}

// === impl SnapshotReader ===

impl SnapshotReader {
    /// The tables of `snapshot`; `released` gives each revision's shared release signal.
    pub fn read(
        &mut self,
        snapshot: Snapshot,
        released: impl Fn(&str) -> Arc<Notify>,
    ) -> (RoutingTable, EndpointTable) {
        let mut routes = RoutingTable::default();
        for host_route in snapshot.routes {
            routes.insert(host_route.host, host_route.route);
        }
        let mut endpoints = EndpointTable::default();
        let mut known = HashMap::new();
        for ready in snapshot.endpoints {
            let list = ready
                .replicas
                .into_iter()
                .map(|replica| {
                    let key = (ready.revision.clone(), replica);
                    let endpoint = self.known.remove(&key).unwrap_or_else(|| {
                        Endpoint::new(
                            key.1.replica.as_str(),
                            key.1.addr,
                            released(&ready.revision),
                        )
                    });
                    known.insert(key, endpoint.clone());
                    endpoint
                })
                .collect();
            endpoints.set(ready.revision, RevisionEndpoints { ready: list });
        }
        self.known = known;
        (routes, endpoints)
    }
}

// === impl Stat ===

impl Stat {
    pub fn new(revision: &str, replica: &str, sample: LoadSample) -> Self {
        Self {
            revision: revision.to_string(),
            replica: replica.to_string(),
            concurrency: sample.concurrency,
            requests: sample.requests,
            seconds: sample.seconds,
        }
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.revision.is_empty() {
            return Err("revision: required".into());
        }
        if self.replica.is_empty() {
            return Err("replica: required".into());
        }
        if !self.concurrency.is_finite() || self.concurrency < 0.0 {
            return Err(format!(
                "concurrency: {} must be a number ≥ 0",
                self.concurrency
            ));
        }
        if !self.seconds.is_finite() || self.seconds <= 0.0 {
            return Err(format!("seconds: {} must be a number > 0", self.seconds));
        }
        Ok(())
    }

    /// Requests per second over the interval.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{RouteTarget, ServiceKey, UpstreamProtocol};

    #[tokio::test]
    async fn snapshots_round_trip_and_keep_endpoints() {
        let mut routes = RoutingTable::default();
        routes.insert(
            "a.default.localhost".into(),
            Route {
                service: ServiceKey::new("default", "a"),
                tag: None,
                targets: vec![RouteTarget {
                    revision: "a-00001".into(),
                    percent: 100,
                    timeout: std::time::Duration::from_secs(30),
                    protocol: UpstreamProtocol::Http1,
                    container_concurrency: 2,
                    buffer: Default::default(),
                }],
            },
        );
        let mut endpoints = EndpointTable::default();
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        endpoints.set(
            "a-00001".into(),
            RevisionEndpoints {
                ready: vec![Endpoint::standalone("a-00001-1", addr)],
            },
        );
        let snapshot = Snapshot::from_tables(&routes, &endpoints);
        let line = serde_json::to_string(&snapshot).expect("json");
        let back: Snapshot = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, snapshot);
        let mut reader = SnapshotReader::default();
        let (r, e) = reader.read(back.clone(), |_| Arc::new(Notify::new()));
        assert_eq!(r, routes);
        let first = e.ready("a-00001")[0].clone();
        let _busy = first.track();
        // The same replica in the next snapshot is the same endpoint, in-flight count and all.
        let (_, e) = reader.read(back, |_| Arc::new(Notify::new()));
        assert!(e.ready("a-00001")[0].same(&first));
        assert_eq!(e.ready("a-00001")[0].in_flight(), 1);
    }

    #[test]
    fn round_trips_and_validates() {
        let stat = Stat::new(
            "hello-00001",
            "pod-a",
            LoadSample {
                concurrency: 2.5,
                requests: 30,
                seconds: 1.5,
            },
        );
        let json = serde_json::to_string(&stat).expect("json");
        assert_eq!(serde_json::from_str::<Stat>(&json).expect("back"), stat);
        assert_eq!(stat.rps(), 20.0);
        assert!(stat.validate().is_ok());
        let bad = Stat {
            seconds: 0.0,
            ..stat
        };
        assert!(bad.validate().expect_err("zero").starts_with("seconds:"));
    }
}
