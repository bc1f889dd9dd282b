//! The tables the control plane publishes to the data path: which host reaches which
//! revisions in which proportions ([`RoutingTable`]), and which replicas of each revision are
//! ready to take requests ([`EndpointTable`]).
//!
//! Both are immutable snapshots behind an `Arc`, swapped whole on every change, so the data
//! path reads them without locks.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::load::{LoadGuard, LoadSample, LoadTracker};
use crate::outlier::{OutlierCell, Routable};

/// A Service's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// Host name → route, for every Service and every traffic tag.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    hosts: HashMap<String, Arc<Route>>,
}

/// Where requests for one host go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub service: ServiceKey,
    /// The traffic tag this host belongs to, `None` for the Service's main host.
    pub tag: Option<String>,
    /// Revisions and their share of requests; the percents add up to 100.
    pub targets: Vec<RouteTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTarget {
    pub revision: String,
    pub percent: u32,
    /// How long a request for this revision may take (its `timeoutSeconds`).
    pub timeout: Duration,
    /// What the revision's container speaks.
    pub protocol: UpstreamProtocol,
    /// Most requests one replica takes at once (`containerConcurrency`); 0 is unlimited.
    pub container_concurrency: u32,
    /// How many requests callers may hold for this revision while it has no free replica.
    pub buffer: BufferLimits,
}

/// Bounds of the requests held for a revision that has no free replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BufferLimits {
    pub requests: u32,
    /// Sum of the held requests' declared body sizes (`Content-Length`).
    pub bytes: u64,
}

impl Default for BufferLimits {
    fn default() -> Self {
        Self {
            requests: 10_000,
            bytes: 64 * 1024 * 1024,
        }
    }
}

/// The protocol of a revision's container, from its port name (`http1` or `h2c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
}

/// Revision name → its ready replicas.
#[derive(Debug, Clone, Default)]
pub struct EndpointTable {
    revisions: HashMap<String, RevisionEndpoints>,
}

/// The ready replicas of one revision.
#[derive(Debug, Clone, Default)]
pub struct RevisionEndpoints {
    pub ready: Vec<Endpoint>,
}

/// One ready replica process. Clones share its load tracker, which is how the supervisor
/// knows a replica it has taken out of rotation has finished its last request, and how the
/// autoscaler reads the replica's concurrency.
#[derive(Clone)]
pub struct Endpoint {
    pub replica: Arc<str>,
    pub addr: SocketAddr,
    load: Arc<LoadTracker>,
    /// Whether callers have taken it out of rotation for failing ([`crate::outlier`]); kept
    /// across table updates with the endpoint, fresh for a restarted replica.
    outlier: Arc<OutlierCell>,
    /// Shared by the endpoints of one revision: notified (one waiter) whenever a request on
    /// any of them finishes, so a caller waiting for free capacity can look again.
    released: Arc<Notify>,
}

/// A revision's key in a cluster's tables (routes' targets, endpoints, stats, pokes, the
/// KPA's): `{namespace}/{name}`, because Knative names revisions `{service}-{n}` and so two
/// namespaces' Services of one name have revisions of one name. Local mode keys revisions by
/// name.
pub fn revision_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The revision's own name in a key (the key itself when it has no namespace).
pub fn revision_name(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, name)| name)
}

/// The host a Service answers on: `{name}.{namespace}.{domain}`.
pub fn service_host(service: &ServiceKey, domain: &str) -> String {
    format!("{}.{}.{domain}", service.name, service.namespace)
}

/// The host of a traffic tag: `{tag}-{name}.{namespace}.{domain}`, as Knative names it.
pub fn tag_host(tag: &str, service: &ServiceKey, domain: &str) -> String {
    format!("{tag}-{}.{}.{domain}", service.name, service.namespace)
}

/// Lower-cases a `Host` header or URI authority and strips the port and a trailing dot, so
/// `Hello.Default.localhost.:8080` and `hello.default.localhost` are the same route.
pub fn normalize_host(raw: &str) -> String {
    let raw = raw.trim();
    let without_port = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets, drop what follows the closing one.
        raw.split_once(']')
            .map_or(raw, |(ip, _)| &raw[..ip.len() + 1])
    } else {
        raw.rsplit_once(':').map_or(raw, |(host, _)| host)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

// === impl ServiceKey ===

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl RoutingTable ===

impl RoutingTable {
    pub fn insert(&mut self, host: String, route: Route) {
        self.hosts.insert(host, Arc::new(route));
    }

    /// The route for an already [normalized](normalize_host) host.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        self.hosts.get(host)
    }

    pub fn hosts(&self) -> impl Iterator<Item = (&String, &Arc<Route>)> {
        self.hosts.iter()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

impl PartialEq for RoutingTable {
    fn eq(&self, other: &Self) -> bool {
        self.hosts.len() == other.hosts.len()
            && self
                .hosts
                .iter()
                .all(|(host, route)| other.hosts.get(host).is_some_and(|o| o == route))
    }
}

// === impl Route ===

impl Route {
    /// The target for a roll in `0..100`: targets own consecutive slices of that range in
    /// proportion to their percent.
    pub fn pick(&self, roll: u32) -> Option<&RouteTarget> {
        let mut upper = 0;
        for target in &self.targets {
            upper += target.percent;
            if roll < upper {
                return Some(target);
            }
        }
        // Percents that add up to less than 100 (never produced by the control plane) still
        // route somewhere rather than nowhere.
        self.targets.iter().rev().find(|t| t.percent > 0)
    }
}

// === impl EndpointTable ===

impl EndpointTable {
    pub fn get(&self, revision: &str) -> Option<&RevisionEndpoints> {
        self.revisions.get(revision)
    }

    pub fn ready(&self, revision: &str) -> &[Endpoint] {
        self.revisions.get(revision).map_or(&[], |r| &r.ready)
    }

    pub fn set(&mut self, revision: String, endpoints: RevisionEndpoints) {
        if endpoints.ready.is_empty() {
            self.revisions.remove(&revision);
        } else {
            self.revisions.insert(revision, endpoints);
        }
    }

    pub fn revisions(&self) -> impl Iterator<Item = (&String, &RevisionEndpoints)> {
        self.revisions.iter()
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// A replica of a revision whose endpoints share `released`.
    pub fn new(replica: impl Into<Arc<str>>, addr: SocketAddr, released: Arc<Notify>) -> Self {
        Self {
            replica: replica.into(),
            addr,
            load: Arc::new(LoadTracker::new()),
            outlier: Arc::new(OutlierCell::default()),
            released,
        }
    }

    /// An endpoint not tied to other replicas (tests, single upstreams).
    pub fn standalone(replica: impl Into<Arc<str>>, addr: SocketAddr) -> Self {
        Self::new(replica, addr, Arc::new(Notify::new()))
    }

    pub fn in_flight(&self) -> u32 {
        self.load.in_flight()
    }

    /// What this endpoint notifies when one of its requests finishes, to share with new
    /// endpoints of the same revision.
    pub fn released(&self) -> Arc<Notify> {
        self.released.clone()
    }

    /// The replica's load since the last sample (the autoscaler is the one sampler).
    pub fn sample(&self) -> LoadSample {
        self.load.sample()
    }

    /// Whether both are the same published endpoint — one process of a replica: a restarted
    /// replica keeps its name but is a new endpoint.
    pub fn same(&self, other: &Endpoint) -> bool {
        Arc::ptr_eq(&self.load, &other.load)
    }

    /// Its outlier state (ejected for failing requests, or on trial after an ejection).
    pub fn outlier(&self) -> &OutlierCell {
        &self.outlier
    }

    /// Whether a caller may send it a request at `now`: not ejected, and, back from an
    /// ejection but not yet proven, only while nothing else is in flight on it.
    pub fn routable(&self, now: tokio::time::Instant) -> bool {
        match self.outlier.routable(now) {
            Routable::Yes => true,
            Routable::OnTrial => self.in_flight() == 0,
            Routable::No => false,
        }
    }

    /// Counts a request against this replica until the guard is dropped.
    pub fn track(&self) -> LoadGuard {
        self.load.start(Some(self.released.clone()))
    }

    /// Counts a request against this replica if it has fewer than `limit` in flight (0: no
    /// limit) — Knative's `containerConcurrency`.
    pub fn try_track(&self, limit: u32) -> Option<LoadGuard> {
        self.load.try_start(limit, Some(self.released.clone()))
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("replica", &self.replica)
            .field("addr", &self.addr)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(revision: &str, percent: u32) -> RouteTarget {
        RouteTarget {
            revision: revision.into(),
            percent,
            timeout: Duration::from_secs(300),
            protocol: UpstreamProtocol::Http1,
            container_concurrency: 0,
            buffer: BufferLimits::default(),
        }
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(
            normalize_host("Hello.Default.localhost:8080"),
            "hello.default.localhost"
        );
        assert_eq!(
            normalize_host("hello.default.localhost."),
            "hello.default.localhost"
        );
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
    }

    #[test]
    fn tag_and_service_hosts() {
        let key = ServiceKey::new("default", "hello");
        assert_eq!(service_host(&key, "localhost"), "hello.default.localhost");
        assert_eq!(
            tag_host("blue", &key, "localhost"),
            "blue-hello.default.localhost"
        );
    }

    #[test]
    fn pick_splits_by_percent() {
        let route = Route {
            service: ServiceKey::new("default", "hello"),
            tag: None,
            targets: vec![target("a", 30), target("b", 0), target("c", 70)],
        };
        let picks: Vec<_> = (0..100)
            .map(|roll| route.pick(roll).map(|t| t.revision.clone()))
            .collect();
        assert_eq!(
            picks.iter().filter(|p| p.as_deref() == Some("a")).count(),
            30
        );
        assert_eq!(
            picks.iter().filter(|p| p.as_deref() == Some("c")).count(),
            70
        );
        assert!(picks.iter().all(|p| p.as_deref() != Some("b")));
    }

    #[tokio::test]
    async fn in_flight_counts_until_guard_drops() {
        let endpoint = Endpoint::standalone("r1", "127.0.0.1:1".parse().expect("addr"));
        let clone = endpoint.clone();
        let guard = endpoint.track();
        assert_eq!(clone.in_flight(), 1);
        drop(guard);
        assert_eq!(clone.in_flight(), 0);
        assert!(clone.same(&endpoint));
        assert!(!Endpoint::standalone("r1", "127.0.0.1:1".parse().expect("addr")).same(&endpoint));
    }
}
