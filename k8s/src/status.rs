//! Knative-compatible status as pure functions of what the reconcilers observed — no client,
//! no clock (the time of a transition is passed in), so unit tests pin every case:
//!
//! - [`revision`]: Revision + its observed Deployment (and, while none of its pods is ready,
//!   the pods) → `Ready`, `ContainerHealthy`, `ResourcesAvailable`, `Active`,
//!   `actualReplicas`, `desiredReplicas`;
//! - [`service`]: Service + the Revisions it owns → `url`, `latestCreatedRevisionName`,
//!   `latestReadyRevisionName`, `traffic` (with `latestRevision: true` resolved to the latest
//!   *ready* revision's name, as Knative's route does; while some target does not resolve,
//!   the traffic last resolved stays), `observedGeneration`, `Ready`, `ConfigurationsReady`,
//!   `RoutesReady`;
//! - [`refused`]: a resource its validators refuse ([`crate::admission`]): `Ready=False` with
//!   local mode's message, the rest of the status kept;
//! - [`failed`]: a reconcile step that failed (an API call): `Ready` says so until a retry
//!   succeeds;
//! - [`broker`] and [`trigger`]: their `Ready` (and the Broker's address).
//!
//! A condition keeps its `lastTransitionTime` while its status stays the same, so computing
//! the status twice from the same observations gives the same object and the reconciler
//! writes nothing (and wakes nobody).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::crd::{
    Addressable, Broker, BrokerStatus, Condition, Revision, RevisionStatus, Service, ServiceStatus,
    TrafficStatus, Trigger, TriggerStatus,
};
use crate::desired;

pub const READY: &str = "Ready";
pub const CONFIGURATIONS_READY: &str = "ConfigurationsReady";
pub const ROUTES_READY: &str = "RoutesReady";
pub const CONTAINER_HEALTHY: &str = "ContainerHealthy";
pub const RESOURCES_AVAILABLE: &str = "ResourcesAvailable";
pub const ACTIVE: &str = "Active";

/// Knative's reason while a revision's Deployment has not become ready yet.
pub const DEPLOYING: &str = "Deploying";
/// Knative's reason for a revision scaled to zero (`Active=False`).
pub const NO_TRAFFIC: &str = "NoTraffic";
/// Knative's reason for a revision scaling up from zero with requests waiting.
pub const QUEUED: &str = "Queued";
/// The reason when a Service names a Revision it has not got, or has none ready yet.
pub const REVISION_MISSING: &str = "RevisionMissing";
/// The reason when the latest created Revision failed.
pub const REVISION_FAILED: &str = "RevisionFailed";
/// Knative's reason when a Deployment stopped progressing.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// `True`, `False`, `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    True,
    False,
    Unknown,
}

/// Everything a status function needs besides the objects: the installation's domain and
/// where brokers take events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    /// `config-domain`'s domain: a Service's URL is `http://{name}.{namespace}.{domain}`.
    pub domain: String,
    /// The broker ingress's base URL (no trailing `/`); a Broker's address is
    /// `{base}/{namespace}/{name}` (the ingress's `POST /{namespace}/{broker}`).
    pub broker_base_url: String,
    /// The cluster's DNS domain: a Service's cluster-local address (`status.address`) is
    /// `http://{name}.{namespace}.svc.{cluster domain}`.
    pub cluster_domain: String,
    /// The gateway Service's DNS name, where every Service's cluster-local name points
    /// ([`crate::desired::cluster_local_service`]).
    pub gateway_host: String,
}

// === impl Addresses ===

impl Default for Addresses {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.into(),
            broker_base_url: DEFAULT_BROKER_BASE_URL.into(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            gateway_host: format!("mecha-gateway.mecha-system.svc.{DEFAULT_CLUSTER_DOMAIN}"),
        }
    }
}

/// Kubernetes' default cluster DNS domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The cluster's DNS domain as Knative finds it: the `svc.{domain}` entry of the `search` line
/// of a pod's `/etc/resolv.conf` (`resolv_conf`), else [`DEFAULT_CLUSTER_DOMAIN`].
pub fn cluster_domain_from_resolv_conf(resolv_conf: &str) -> String {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("search"))
        .flat_map(str::split_whitespace)
        .filter_map(|entry| entry.trim_end_matches('.').split_once(".svc."))
        .map(|(_, domain)| domain.to_string())
        .find(|domain| !domain.is_empty())
        .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.into())
}

/// `http://{name}.{namespace}.svc.{cluster domain}`: a Service's address inside the cluster.
pub fn cluster_local_url(name: &str, namespace: &str, cluster_domain: &str) -> String {
    format!("http://{name}.{namespace}.svc.{cluster_domain}")
}

/// Knative's default domain when `config-domain` names none.
pub const DEFAULT_DOMAIN: &str = "example.com";

/// The `mecha-broker` Service in the installation namespace (port 80 → the ingress).
pub const DEFAULT_BROKER_BASE_URL: &str = "http://mecha-broker.mecha-system.svc";

/// A Revision's status from its observed Deployment (`None`: not created yet) and its pods
/// (read while none is ready: a user container that exited makes `ContainerHealthy` `False`
/// with reason `ExitCode{n}`, and when the Deployment has stalled, a container waiting — an
/// image that cannot be pulled — names why in `ResourcesAvailable`, as Knative does). `now` is
/// the RFC 3339 time recorded on conditions that change.
pub fn revision(
    revision: &Revision,
    deployment: Option<&Deployment>,
    pods: &[Pod],
    now: &str,
) -> RevisionStatus {
    let previous = revision.status.clone().unwrap_or_default();
    let was = |type_: &str| state_of(&previous.conditions, type_);
    let spec = deployment.and_then(|d| d.spec.as_ref());
    let observed = deployment.and_then(|d| d.status.as_ref());
    let ready_replicas = observed.and_then(|s| s.ready_replicas).unwrap_or(0);
    let desired_replicas = spec.and_then(|s| s.replicas);
    let deployment_condition = |type_: &str| {
        observed
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == type_))
    };

    // ResourcesAvailable: the Deployment's own failure conditions first (Knative's
    // TransformDeploymentStatus), then "it has had a ready pod", which scaling to zero later
    // does not undo.
    let failure = deployment_condition("ReplicaFailure").filter(|c| c.status == "True");
    let stalled = deployment_condition("Progressing")
        .filter(|c| c.status == "False")
        .map(|c| {
            (
                c.reason
                    .clone()
                    .unwrap_or_else(|| PROGRESS_DEADLINE_EXCEEDED.into()),
                c.message.clone(),
            )
        });
    let (exited, waiting) = if ready_replicas > 0 {
        (None, None)
    } else {
        user_container_trouble(pods)
    };
    let resources = if deployment.is_none() {
        unknown(RESOURCES_AVAILABLE, DEPLOYING, None)
    } else if let (Some((reason, message)), Some(_)) = (&waiting, &stalled) {
        condition(
            RESOURCES_AVAILABLE,
            State::False,
            Some(reason),
            message.clone(),
        )
    } else if let Some(failure) = failure {
        condition(
            RESOURCES_AVAILABLE,
            State::False,
            failure.reason.as_deref(),
            failure.message.clone(),
        )
    } else if let Some((reason, message)) = stalled {
        condition(RESOURCES_AVAILABLE, State::False, Some(&reason), message)
    } else if ready_replicas > 0 || was(RESOURCES_AVAILABLE) == State::True {
        condition(RESOURCES_AVAILABLE, State::True, None, None)
    } else {
        unknown(RESOURCES_AVAILABLE, DEPLOYING, None)
    };

    // ContainerHealthy: a pod whose containers passed readiness (through the sidecar) once.
    let healthy = if let Some((reason, message)) = exited {
        condition(
            CONTAINER_HEALTHY,
            State::False,
            Some(&reason),
            Some(message),
        )
    } else if ready_replicas > 0 || was(CONTAINER_HEALTHY) == State::True {
        condition(CONTAINER_HEALTHY, State::True, None, None)
    } else {
        unknown(CONTAINER_HEALTHY, DEPLOYING, None)
    };

    // Active is not part of readiness: a revision scaled to zero is Ready and inactive.
    let active = match (desired_replicas, ready_replicas) {
        (_, ready) if ready > 0 => condition(ACTIVE, State::True, None, None),
        (Some(0), _) => condition(
            ACTIVE,
            State::False,
            Some(NO_TRAFFIC),
            Some("The target is not receiving traffic.".into()),
        ),
        (Some(_), _) => unknown(
            ACTIVE,
            QUEUED,
            Some("Requests to the target are being buffered as resources are provisioned.".into()),
        ),
        (None, _) => unknown(ACTIVE, DEPLOYING, None),
    };

    let ready = summarize(&[&resources, &healthy]);
    RevisionStatus {
        observed_generation: revision.metadata.generation,
        conditions: carried(
            vec![ready, healthy, resources, active],
            &previous.conditions,
            now,
        ),
        actual_replicas: deployment.map(|_| ready_replicas),
        desired_replicas,
    }
}

/// A Service's status from the Revisions it owns, its traffic resolved against them.
pub fn service(
    service: &Service,
    revisions: &[Revision],
    addresses: &Addresses,
    now: &str,
) -> ServiceStatus {
    let previous = service.status.clone().unwrap_or_default();
    let name = service.name_any();
    let namespace = service.namespace().unwrap_or_default();
    let mut owned: Vec<(u32, &Revision)> = revisions
        .iter()
        .filter_map(|r| Some((number(&name, r)?, r)))
        .collect();
    owned.sort_by_key(|(n, _)| *n);
    let latest_created = owned.last().map(|(_, r)| *r);
    let latest_ready = owned
        .iter()
        .rev()
        .map(|(_, r)| *r)
        .find(|r| revision_state(r) == State::True);

    let configurations = match latest_created {
        None => unknown(
            CONFIGURATIONS_READY,
            DEPLOYING,
            Some(format!("Configuration {name:?} has no Revision yet.")),
        ),
        Some(latest) => match revision_state(latest) {
            State::True => condition(CONFIGURATIONS_READY, State::True, None, None),
            State::False => condition(
                CONFIGURATIONS_READY,
                State::False,
                Some(REVISION_FAILED),
                Some(format!(
                    "Revision {:?} failed with message: {}.",
                    latest.name_any(),
                    ready_message(latest)
                )),
            ),
            State::Unknown => unknown(
                CONFIGURATIONS_READY,
                DEPLOYING,
                Some(format!(
                    "Revision {:?} is not ready yet.",
                    latest.name_any()
                )),
            ),
        },
    };

    let (resolved, routes) = traffic(service, &owned, latest_ready, addresses);
    // Traffic that does not resolve is not served: the status keeps showing what is (as
    // Knative's route keeps its last resolved targets).
    let traffic = if routes.status == "True" {
        resolved
    } else {
        previous.traffic
    };
    let ready = summarize(&[&configurations, &routes]);
    ServiceStatus {
        observed_generation: service.metadata.generation,
        conditions: carried(
            vec![ready, configurations, routes],
            &previous.conditions,
            now,
        ),
        url: Some(service_url(&name, &namespace, &addresses.domain)),
        address: Some(Addressable {
            url: Some(cluster_local_url(
                &name,
                &namespace,
                &addresses.cluster_domain,
            )),
        }),
        latest_created_revision_name: latest_created.map(ResourceExt::name_any),
        latest_ready_revision_name: latest_ready.map(ResourceExt::name_any),
        traffic,
    }
}

/// `http://{name}.{namespace}.{domain}`, Knative's default domain template.
pub fn service_url(name: &str, namespace: &str, domain: &str) -> String {
    format!("http://{name}.{namespace}.{domain}")
}

/// `http://{tag}-{name}.{namespace}.{domain}`, Knative's default tag template.
pub fn tag_url(tag: &str, name: &str, namespace: &str, domain: &str) -> String {
    format!("http://{tag}-{name}.{namespace}.{domain}")
}

/// The status of a resource its validators refuse: `refusal` (from [`crate::admission`]) as
/// `Ready` — and, for a Service, as `ConfigurationsReady` — the rest of `previous` kept, so a
/// Service that served before keeps its revisions and traffic in view.
pub fn refused<S: HasConditions>(
    mut previous: S,
    refusal: &crate::crd::Condition,
    generation: Option<i64>,
    now: &str,
) -> S {
    let mut conditions = vec![refusal.clone()];
    if previous.takes(CONFIGURATIONS_READY) {
        conditions.push(Condition {
            type_: CONFIGURATIONS_READY.into(),
            ..refusal.clone()
        });
    }
    previous.merge(conditions, generation, now);
    previous
}

/// The status after a reconcile step failed: `Ready` is `False` with `reason` and `message`
/// (what failed, where), the rest of `previous` kept; the next successful reconcile replaces
/// it with the observed status.
pub fn failed<S: HasConditions>(mut previous: S, reason: &str, message: &str, now: &str) -> S {
    let conditions = vec![condition(
        READY,
        State::False,
        Some(reason),
        Some(message.into()),
    )];
    previous.merge(conditions, None, now);
    previous
}

/// A Broker that passed its validators: ready at the broker ingress's address.
pub fn broker(broker: &Broker, addresses: &Addresses, now: &str) -> BrokerStatus {
    let previous = broker.status.clone().unwrap_or_default();
    BrokerStatus {
        observed_generation: broker.metadata.generation,
        conditions: carried(
            vec![condition(READY, State::True, None, None)],
            &previous.conditions,
            now,
        ),
        address: Some(Addressable {
            url: Some(format!(
                "{}/{}/{}",
                addresses.broker_base_url.trim_end_matches('/'),
                broker.namespace().unwrap_or_default(),
                broker.name_any()
            )),
        }),
    }
}

/// A Trigger that passed its validators: ready, its subscriber's URI as written when it is
/// one (a `ref` is resolved by the broker, which knows the addresses).
pub fn trigger(trigger: &Trigger, now: &str) -> TriggerStatus {
    let previous = trigger.status.clone().unwrap_or_default();
    TriggerStatus {
        observed_generation: trigger.metadata.generation,
        conditions: carried(
            vec![condition(READY, State::True, None, None)],
            &previous.conditions,
            now,
        ),
        subscriber_uri: previous.subscriber_uri,
    }
}

/// The status kinds whose conditions [`refused`] and [`failed`] rewrite.
pub trait HasConditions {
    /// Whether this kind reports `type_` (a Service reports `ConfigurationsReady`).
    fn takes(&self, type_: &str) -> bool;
    /// Replaces the conditions of the types in `conditions`, keeping transition times of
    /// those whose status did not change; sets `observedGeneration` when given.
    fn merge(&mut self, conditions: Vec<Condition>, generation: Option<i64>, now: &str);
}

macro_rules! has_conditions {
    ($($status:ty => [$($type_:expr),*]),* $(,)?) => {$(
        impl HasConditions for $status {
            fn takes(&self, type_: &str) -> bool {
                [READY $(, $type_)*].contains(&type_)
            }
            fn merge(&mut self, conditions: Vec<Condition>, generation: Option<i64>, now: &str) {
                let mut merged = carried(conditions, &self.conditions, now);
                for kept in &self.conditions {
                    if !merged.iter().any(|c| c.type_ == kept.type_) {
                        merged.push(kept.clone());
                    }
                }
                self.conditions = merged;
                if generation.is_some() {
                    self.observed_generation = generation;
                }
            }
        }
    )*};
}

has_conditions! {
    ServiceStatus => [CONFIGURATIONS_READY, ROUTES_READY],
    RevisionStatus => [CONTAINER_HEALTHY, RESOURCES_AVAILABLE, ACTIVE],
    BrokerStatus => [],
    TriggerStatus => [],
    crate::crd::SourceStatus => [],
}

/// Resolves `spec.traffic` (none: all to the latest ready revision, as Knative defaults it)
/// into status entries and `RoutesReady`.
fn traffic(
    service: &Service,
    owned: &[(u32, &Revision)],
    latest_ready: Option<&Revision>,
    addresses: &Addresses,
) -> (Vec<TrafficStatus>, Condition) {
    let name = service.name_any();
    let namespace = service.namespace().unwrap_or_default();
    let spec = if service.spec.0.traffic.is_empty() {
        vec![crds::serving::TrafficTarget {
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        }]
    } else {
        service.spec.0.traffic.clone()
    };
    let mut resolved = Vec::with_capacity(spec.len());
    let mut problem: Option<(State, String)> = None;
    for target in spec {
        let latest = target.latest_revision == Some(true) || target.revision_name.is_none();
        let revision_name = if latest {
            if latest_ready.is_none() && problem.is_none() {
                problem = Some((
                    State::Unknown,
                    format!("Configuration {name:?} is waiting for a Revision to become ready."),
                ));
            }
            latest_ready.map(ResourceExt::name_any)
        } else {
            let wanted = target.revision_name.clone().unwrap_or_default();
            match owned.iter().find(|(_, r)| r.name_any() == wanted) {
                None => {
                    problem = Some((
                        State::False,
                        format!("Revision {wanted:?} referenced in traffic not found."),
                    ));
                }
                Some((_, r)) if revision_state(r) != State::True && problem.is_none() => {
                    problem = Some((
                        revision_state(r),
                        format!("Revision {wanted:?} referenced in traffic is not ready."),
                    ));
                }
                Some(_) => {}
            }
            Some(wanted)
        };
        let url = target
            .tag
            .as_deref()
            .map(|tag| tag_url(tag, &name, &namespace, &addresses.domain));
        resolved.push(TrafficStatus {
            target: crds::serving::TrafficTarget {
                revision_name,
                latest_revision: Some(latest),
                percent: target.percent,
                tag: target.tag,
            },
            url,
        });
    }
    let routes = match problem {
        None => condition(ROUTES_READY, State::True, None, None),
        Some((state, message)) => {
            condition(ROUTES_READY, state, Some(REVISION_MISSING), Some(message))
        }
    };
    (resolved, routes)
}

/// The first pod's user container (any but the sidecar) that exited — `(ExitCode{n}, message)`
/// — and the first that is waiting to start — `(reason, message)`.
#[allow(
    clippy::type_complexity,
    reason = "two (reason, message) pairs, named at the call"
)]
fn user_container_trouble(
    pods: &[Pod],
) -> (Option<(String, String)>, Option<(String, Option<String>)>) {
    let statuses = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter(|c| c.name != desired::SIDECAR_NAME);
    let mut exited = None;
    let mut waiting = None;
    for status in statuses {
        if exited.is_none()
            && let Some(t) = status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
        {
            let message = match t.message.as_deref().filter(|m| !m.is_empty()) {
                Some(m) => m.to_string(),
                None if t.exit_code == 0 => "container exited with no error".into(),
                None => t.reason.clone().unwrap_or_else(|| "no message".into()),
            };
            exited = Some((
                format!("ExitCode{}", t.exit_code),
                format!("Container failed with: {message}"),
            ));
        }
        if waiting.is_none()
            && let Some(w) = status.state.as_ref().and_then(|s| s.waiting.as_ref())
            && let Some(reason) = w.reason.clone()
        {
            waiting = Some((reason, w.message.clone()));
        }
    }
    (exited, waiting)
}

/// A Revision's number when `service` owns it by name (`{service}-{n}`).
fn number(service: &str, revision: &Revision) -> Option<u32> {
    revision
        .metadata
        .name
        .as_deref()?
        .strip_prefix(service)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// A Revision's `Ready`, as far as it has observed its current spec.
fn revision_state(revision: &Revision) -> State {
    revision
        .status
        .as_ref()
        .map_or(State::Unknown, |s| state_of(&s.conditions, READY))
}

fn ready_message(revision: &Revision) -> String {
    revision
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .and_then(|c| c.message.clone().or_else(|| c.reason.clone()))
        .unwrap_or_default()
}

fn state_of(conditions: &[Condition], type_: &str) -> State {
    match conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
    {
        Some("True") => State::True,
        Some("False") => State::False,
        _ => State::Unknown,
    }
}

/// `Ready` from the conditions that decide it (Knative's living condition set): `False` if
/// any is (with its reason and message), else `Unknown` if any is, else `True`.
fn summarize(parts: &[&Condition]) -> Condition {
    let pick = |wanted: &str| parts.iter().find(|c| c.status == wanted);
    let source = pick("False").or_else(|| pick("Unknown"));
    match source {
        None => condition(READY, State::True, None, None),
        Some(c) => Condition {
            type_: READY.into(),
            ..(*c).clone()
        },
    }
}

fn condition(
    type_: &str,
    state: State,
    reason: Option<&str>,
    message: Option<String>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: match state {
            State::True => "True",
            State::False => "False",
            State::Unknown => "Unknown",
        }
        .into(),
        reason: reason.map(Into::into),
        message,
        ..Condition::default()
    }
}

fn unknown(type_: &str, reason: &str, message: Option<String>) -> Condition {
    condition(type_, State::Unknown, Some(reason), message)
}

/// `conditions` with their transition times: the previous one's when the status did not
/// change, `now` otherwise (for the status functions of other modules).
pub fn carry(conditions: Vec<Condition>, previous: &[Condition], now: &str) -> Vec<Condition> {
    carried(conditions, previous, now)
}

/// `conditions` with their transition times: the previous one's when the status did not
/// change, `now` otherwise.
fn carried(mut conditions: Vec<Condition>, previous: &[Condition], now: &str) -> Vec<Condition> {
    for condition in &mut conditions {
        let before = previous.iter().find(|p| p.type_ == condition.type_);
        condition.last_transition_time = match before {
            Some(p) if p.status == condition.status && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(now.into()),
        };
    }
    conditions
}

/// Whether `revision` belongs to `service` by its labels (as `next_revision` makes them).
pub fn belongs_to(revision: &Revision, service: &str) -> bool {
    revision
        .labels()
        .get(desired::SERVICE_LABEL)
        .is_some_and(|s| s == service)
}
