//! ApiServerSource in a cluster, the Knative way: a receive adapter of its own per source (a
//! Deployment, `apiserversource-{name}`), running under the source's `serviceAccountName`, so
//! what a source sees is what the user's RBAC grants that account — never the control
//! plane's rights.
//!
//! - The reconciler ([`crate::reconcile`]) resolves the watched namespaces
//!   ([`watched_namespaces`]: the source's own, those its `namespaceSelector` selects, or all),
//!   finds each resource's plural and scope by discovery ([`discover`]), asks the API server
//!   with a `SubjectAccessReview` per (verb, resource, namespace) whether the account may
//!   `get`, `list` and `watch` ([`check_access`]), applies [`adapter_deployment`], and writes
//!   Knative's conditions ([`conditions`]): `SinkProvided`, `Deployed` (the Deployment's
//!   `Available`), `SufficientPermissions`, and `Ready` over them.
//! - The adapter (the `apiserver-adapter` binary, in the `mecha/autoscaler` image) reads
//!   `K_SINK`, `K_CE_OVERRIDES` and `K_SOURCE_CONFIG` ([`AdapterConfig`]), watches each
//!   resource in each namespace with the label selector sent to the API server, turns the
//!   watch events into `add`/`update`/`delete` with a [`Tracker`], and sends Knative's events
//!   ([`importers::apiserver::event`], the same function local mode uses) with the importers'
//!   retries.
//!
//! Event ids are deterministic ([`event_id`]): a digest of the source, the object's `uid`, its
//! `resourceVersion` and the change. A re-list after an adapter restart sends an `add` for
//! every object it finds, with the same id as the `add` sent before for that version of the
//! object, so a consumer that deduplicates by id drops them.

use std::collections::{BTreeMap, BTreeSet};

use crds::apiserver::{ApiServerResource, ApiVersionKind};
use crds::bindings::LabelSelector;
use importers::apiserver::Change;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::Resource;
use kube::api::{Api, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher::Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::apply::ApiError;
use crate::crd::{self, Condition};

/// The label naming an ApiServerSource on its adapter's Deployment and pods.
pub const ADAPTER_LABEL: &str = "sources.knative.dev/apiServerSource";
/// The adapter's container, and the binary it runs in the `mecha/autoscaler` image.
pub const ADAPTER_CONTAINER: &str = "adapter";
pub const ADAPTER_BINARY: &str = "/usr/local/bin/apiserver-adapter";
/// The adapter's `/live`, `/ready`, `/metrics` (every Mecha component's admin port).
pub const ADAPTER_ADMIN_PORT: u16 = 8022;
/// The adapter's configuration ([`AdapterConfig`] as JSON).
pub const K_SOURCE_CONFIG: &str = "K_SOURCE_CONFIG";
/// The account an adapter runs as when the source names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The default adapter image: the control plane's own (`deploy/base/autoscaler.yaml` sets
/// `APISERVER_ADAPTER_IMAGE`, which kustomize's `images:` moves with it).
pub const DEFAULT_ADAPTER_IMAGE: &str = "mecha/autoscaler";
/// At most this many namespaces per source (a watch and three access reviews per resource
/// in each).
pub const MAX_NAMESPACES: usize = 64;
/// The verbs an adapter needs on every resource it watches.
pub const VERBS: [&str; 3] = ["get", "list", "watch"];

/// Knative's conditions of an ApiServerSource.
pub const SINK_PROVIDED: &str = "SinkProvided";
pub const DEPLOYED: &str = "Deployed";
pub const SUFFICIENT_PERMISSIONS: &str = "SufficientPermissions";

/// What the adapter is told in `K_SOURCE_CONFIG` (Knative's adapter gets the same facts:
/// namespaces or all, resources with their selectors, owner, mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterConfig {
    /// The source's name and namespace (metrics, logs, event ids).
    pub name: String,
    pub namespace: String,
    /// `Reference` or `Resource`.
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ApiVersionKind>,
    /// The namespaces watched; empty with `allNamespaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_namespaces: bool,
    pub resources: Vec<ApiServerResource>,
}

/// The namespaces a source watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    All,
    /// These, sorted (never empty for a source's own namespace; a selector may match none).
    Listed(Vec<String>),
}

/// A resource as discovery describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub resource: ApiResource,
    /// Whether its objects live in namespaces (else cluster-scoped).
    pub namespaced: bool,
}

/// A condition's state, before it becomes a [`Condition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    True,
    False { reason: String, message: String },
    Unknown { reason: String, message: String },
}

/// Turns a watch's events into changes of objects, keyed by `uid`: an `Apply` of an unknown
/// object is an `add`, of a known one with a new `resourceVersion` an `update` (the same
/// version: nothing); a `Delete` of a known object is a `delete`; after a re-list
/// (`Init` … `InitDone`) every known object the list did not bring again is a `delete`, since
/// it went away while the watch was down. Keeps the last version of every object it knows
/// (what a `delete` after a re-list carries as data).
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    known: BTreeMap<String, Value>,
    /// While re-listing: the uids listed so far.
    relisting: Option<BTreeSet<String>>,
}

// === impl AdapterConfig ===

impl AdapterConfig {
    /// The configuration of `source`'s adapter, watching `namespaces`.
    pub fn for_source(source: &crds::ApiServerSource, namespaces: &Namespaces) -> Self {
        let (namespaces, all_namespaces) = match namespaces {
            Namespaces::All => (Vec::new(), true),
            Namespaces::Listed(list) => (list.clone(), false),
        };
        Self {
            name: source.metadata.name.clone(),
            namespace: source.metadata.namespace().to_string(),
            mode: if source.resource_mode() {
                "Resource"
            } else {
                "Reference"
            }
            .into(),
            owner: source.spec.owner.clone(),
            namespaces,
            all_namespaces,
            resources: source.spec.resources.clone(),
        }
    }

    /// Reads and checks `K_SOURCE_CONFIG`'s JSON; the error names the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "))
        }
    }

    fn validate(&self) -> Vec<crds::FieldError> {
        use crds::FieldError;
        let mut errors = Vec::new();
        if let Err(why) = crds::meta::dns_label(&self.name, false) {
            errors.push(FieldError::new("name", why));
        }
        if let Err(why) = crds::meta::dns_label(&self.namespace, false) {
            errors.push(FieldError::new("namespace", why));
        }
        if self.mode != "Reference" && self.mode != "Resource" {
            errors.push(FieldError::new(
                "mode",
                format!("{:?} is not Reference or Resource", self.mode),
            ));
        }
        if let Some(owner) = &self.owner {
            crds::apiserver::validate_api_version_kind(
                &owner.api_version,
                &owner.kind,
                "owner",
                &mut errors,
            );
        }
        match (self.all_namespaces, self.namespaces.len()) {
            (true, 0) => {}
            (true, _) => errors.push(FieldError::new(
                "namespaces",
                "give namespaces or allNamespaces, not both",
            )),
            (false, n) if n > MAX_NAMESPACES => errors.push(FieldError::new(
                "namespaces",
                format!("at most {MAX_NAMESPACES} namespaces"),
            )),
            (false, _) => {}
        }
        for (i, namespace) in self.namespaces.iter().enumerate() {
            if let Err(why) = crds::meta::dns_label(namespace, false) {
                errors.push(FieldError::new(format!("namespaces[{i}]"), why));
            }
        }
        if self.resources.is_empty() {
            errors.push(FieldError::new("resources", "list at least one resource"));
        }
        if self.resources.len() > crds::apiserver::MAX_RESOURCES {
            errors.push(FieldError::new(
                "resources",
                format!("at most {} resources", crds::apiserver::MAX_RESOURCES),
            ));
        }
        for (i, resource) in self.resources.iter().enumerate() {
            let at = format!("resources[{i}]");
            crds::apiserver::validate_api_version_kind(
                &resource.api_version,
                &resource.kind,
                &at,
                &mut errors,
            );
            if let Some(selector) = &resource.selector {
                selector.validate(&format!("{at}.selector"), &mut errors);
            }
        }
        errors
    }

    pub fn resource_mode(&self) -> bool {
        self.mode == "Resource"
    }

    /// Where each resource is watched: `None` for all namespaces (or a cluster-scoped
    /// resource), else each namespace.
    pub fn watch_namespaces(&self, namespaced: bool) -> Vec<Option<String>> {
        if self.all_namespaces || !namespaced {
            vec![None]
        } else {
            self.namespaces.iter().cloned().map(Some).collect()
        }
    }
}

// === impl Tracker ===

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many objects it knows.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The changes one watch event makes, in order.
    pub fn apply(&mut self, event: Event<Value>) -> Vec<(Change, Value)> {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeSet::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                if let (Some(listed), Some(uid)) = (self.relisting.as_mut(), uid(&object)) {
                    listed.insert(uid.to_string());
                }
                self.upsert(object)
            }
            Event::InitDone => {
                let Some(listed) = self.relisting.take() else {
                    return Vec::new();
                };
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .filter_map(|uid| self.known.remove(&uid))
                    .map(|object| (Change::Delete, object))
                    .collect()
            }
            Event::Apply(object) => self.upsert(object),
            Event::Delete(object) => {
                let Some(uid) = uid(&object).map(str::to_string) else {
                    return Vec::new();
                };
                if let Some(listed) = self.relisting.as_mut() {
                    listed.remove(&uid);
                }
                match self.known.remove(&uid) {
                    Some(_) => vec![(Change::Delete, object)],
                    None => Vec::new(),
                }
            }
        }
    }

    fn upsert(&mut self, object: Value) -> Vec<(Change, Value)> {
        let Some(uid) = uid(&object).map(str::to_string) else {
            return Vec::new();
        };
        let change = match self.known.get(&uid) {
            None => Change::Add,
            Some(old) if resource_version(old) != resource_version(&object) => Change::Update,
            Some(_) => return Vec::new(),
        };
        self.known.insert(uid, object.clone());
        vec![(change, object)]
    }
}

fn uid(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
}

fn resource_version(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
}

/// A deterministic event id: the same source, object version and change always give the same
/// id (so the `add`s a re-list sends again after a restart can be deduplicated), two sources
/// watching one object give different ids.
pub fn event_id(namespace: &str, name: &str, change: Change, object: &Value) -> String {
    importers::ping::digest_id(&format!(
        "{namespace}/{name}\n{}\n{}\n{}",
        uid(object).unwrap_or_default(),
        resource_version(object).unwrap_or_default(),
        change.as_str()
    ))
}

/// `apiVersion` as (group, version): `v1` is the core group's.
pub fn group_version(api_version: &str) -> (&str, &str) {
    api_version.split_once('/').unwrap_or(("", api_version))
}

/// A resource's plural and scope, from the API server's discovery document of its group
/// version (`/api/v1` or `/apis/{group}/{version}`): the reconciler's access reviews and the
/// adapter's watches both use it.
pub async fn discover(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
) -> Result<Discovered, String> {
    let (group, version) = group_version(api_version);
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("{kind} ({api_version}) is not served by the API server: {e}"))?;
    Ok(Discovered {
        resource,
        namespaced: matches!(capabilities.scope, kube::discovery::Scope::Namespaced),
    })
}

/// The namespaces `source` watches: its own without a `namespaceSelector`, all with `{}`,
/// else those the selector matches (listed now; the resync lists again, so a new namespace
/// is picked up within a resync). `Err` names the problem when more than [`MAX_NAMESPACES`]
/// match.
pub async fn watched_namespaces(
    client: &kube::Client,
    source: &crds::ApiServerSource,
) -> Result<Result<Namespaces, String>, ApiError> {
    let Some(selector) = &source.spec.namespace_selector else {
        return Ok(Ok(Namespaces::Listed(vec![
            source.metadata.namespace().to_string(),
        ])));
    };
    if selector.is_empty() {
        return Ok(Ok(Namespaces::All));
    }
    let api: Api<Namespace> = Api::all(client.clone());
    let listed = api
        .list(&ListParams::default().labels(&selector.to_query()))
        .await
        .map_err(|e| ApiError::new::<Namespace>("list", "", "", e))?;
    let mut names: Vec<String> = listed
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    names.sort();
    if names.len() > MAX_NAMESPACES {
        return Ok(Err(format!(
            "spec.namespaceSelector matches {} namespaces; an ApiServerSource watches at most {MAX_NAMESPACES}",
            names.len()
        )));
    }
    Ok(Ok(Namespaces::Listed(names)))
}

/// Whether the source's service account may `get`, `list` and `watch` every resource in
/// every watched namespace, asked of the API server with one `SubjectAccessReview` each:
/// `None` when it may, else what is denied (verb, resource, namespace), the first in order.
pub async fn check_access(
    client: &kube::Client,
    account_namespace: &str,
    account: &str,
    resources: &[Discovered],
    namespaces: &Namespaces,
) -> Result<Option<String>, ApiError> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let user = format!("system:serviceaccount:{account_namespace}:{account}");
    for discovered in resources {
        let scopes: Vec<Option<String>> = match namespaces {
            _ if !discovered.namespaced => vec![None],
            Namespaces::All => vec![None],
            Namespaces::Listed(list) => list.iter().cloned().map(Some).collect(),
        };
        for namespace in scopes {
            for verb in VERBS {
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.clone()),
                        // What the API server puts in every service account's token.
                        groups: Some(vec![
                            "system:serviceaccounts".into(),
                            format!("system:serviceaccounts:{account_namespace}"),
                            "system:authenticated".into(),
                        ]),
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(discovered.resource.group.clone()),
                            version: Some(discovered.resource.version.clone()),
                            resource: Some(discovered.resource.plural.clone()),
                            namespace: namespace.clone(),
                            verb: Some(verb.into()),
                            ..ResourceAttributes::default()
                        }),
                        ..SubjectAccessReviewSpec::default()
                    },
                    ..SubjectAccessReview::default()
                };
                let answer = api
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| ApiError::new::<SubjectAccessReview>("create", "", "", e))?;
                let allowed = answer.status.as_ref().is_some_and(|s| s.allowed);
                if !allowed {
                    let group = match discovered.resource.group.as_str() {
                        "" => String::new(),
                        g => format!(".{g}"),
                    };
                    let place = match &namespace {
                        Some(ns) => format!("in namespace {ns}"),
                        None => "in all namespaces".into(),
                    };
                    let why = answer
                        .status
                        .and_then(|s| s.reason)
                        .filter(|r| !r.is_empty())
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    return Ok(Some(format!(
                        "service account {account_namespace}/{account} may not {verb} {}{group} {place}{why}: grant it get, list and watch (docs/kubernetes.md)",
                        discovered.resource.plural
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// `Deployed` from the adapter Deployment as the API server holds it: its `Available`
/// condition.
pub fn deployed(deployment: &Deployment) -> Check {
    let available = deployment
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Available"));
    let name = deployment.metadata.name.as_deref().unwrap_or_default();
    match available {
        Some(c) if c.status == "True" => Check::True,
        Some(c) if c.status == "False" => Check::False {
            reason: "DeploymentUnavailable".into(),
            message: format!(
                "the adapter Deployment {name} is not available: {}",
                c.message.as_deref().unwrap_or("no reason given")
            ),
        },
        _ => Check::Unknown {
            reason: "DeploymentUnavailable".into(),
            message: format!("waiting for the adapter Deployment {name} to become available"),
        },
    }
}

/// Knative's conditions: `SinkProvided`, `Deployed`, `SufficientPermissions`, and `Ready`
/// (the first of them that is `False`, else the first `Unknown`, else `True`).
pub fn conditions(sink: Check, deployed: Check, permissions: Check) -> Vec<Condition> {
    let checks = [
        (SINK_PROVIDED, sink),
        (DEPLOYED, deployed),
        (SUFFICIENT_PERMISSIONS, permissions),
    ];
    let first_false = checks
        .iter()
        .find(|(_, c)| matches!(c, Check::False { .. }));
    let first_unknown = checks
        .iter()
        .find(|(_, c)| matches!(c, Check::Unknown { .. }));
    let ready = match (first_false, first_unknown) {
        (Some((_, c)), _) | (None, Some((_, c))) => c.clone(),
        (None, None) => Check::True,
    };
    let mut out: Vec<Condition> = checks
        .into_iter()
        .map(|(type_, check)| condition(type_, check))
        .collect();
    out.push(condition(crate::status::READY, ready));
    out
}

fn condition(type_: &str, check: Check) -> Condition {
    let (status, reason, message) = match check {
        Check::True => ("True", None, None),
        Check::False { reason, message } => ("False", Some(reason), Some(message)),
        Check::Unknown { reason, message } => ("Unknown", Some(reason), Some(message)),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason,
        message,
        ..Condition::default()
    }
}

/// The adapter Deployment's name: `apiserversource-{name}` (the source's validators keep
/// names short enough for it to fit in 63 characters).
pub fn adapter_name(source: &str) -> String {
    format!("{}{source}", crds::apiserver::ADAPTER_PREFIX)
}

/// `source`'s adapter: one replica (`Recreate`: never two sending the same changes) of
/// `image`'s `apiserver-adapter` under the source's service account with `K_SINK`,
/// `K_CE_OVERRIDES` and `K_SOURCE_CONFIG`, probed on its admin port, unprivileged, owned by
/// the source (deleting the source deletes it). `None` without a name.
pub fn adapter_deployment(
    source: &crd::ApiServerSource,
    sink_uri: &str,
    image: &str,
    config: &AdapterConfig,
) -> Option<Deployment> {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStrategy};
    use k8s_openapi::api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, PodSecurityContext, PodSpec,
        PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let name = source.metadata.name.clone()?;
    let spec = &source.spec.0;
    let extensions = spec
        .ce_overrides
        .as_ref()
        .map(|o| o.extensions.clone())
        .unwrap_or_default();
    let config_json = serde_json::to_string(config).ok()?;
    let env = [
        (crds::bindings::K_SINK, sink_uri.to_string()),
        (
            crds::bindings::K_CE_OVERRIDES,
            crds::bindings::ce_overrides_json(&extensions),
        ),
        (K_SOURCE_CONFIG, config_json),
        ("ADMIN_PORT", ADAPTER_ADMIN_PORT.to_string()),
        ("MECHA_LOG_FORMAT", "json".into()),
    ]
    .into_iter()
    .map(|(key, value)| EnvVar {
        name: key.into(),
        value: Some(value),
        ..EnvVar::default()
    })
    .collect();
    let selector = BTreeMap::from([(ADAPTER_LABEL.to_string(), name.clone())]);
    let mut labels = selector.clone();
    labels.insert(
        "app.kubernetes.io/component".into(),
        "apiserver-adapter".into(),
    );
    labels.insert("app.kubernetes.io/part-of".into(), "mecha".into());
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let quantity = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        )
    };
    let adapter = Container {
        name: ADAPTER_CONTAINER.into(),
        image: Some(image.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![ADAPTER_BINARY.into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: ADAPTER_ADMIN_PORT.into(),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/live", 10)),
        readiness_probe: Some(probe("/ready", 5)),
        resources: Some(ResourceRequirements {
            requests: quantity(&[("cpu", "10m"), ("memory", "32Mi")]),
            limits: quantity(&[("memory", "256Mi")]),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Some(Deployment {
        metadata: ObjectMeta {
            name: Some(adapter_name(&name)),
            namespace: source.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: source.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(
                        spec.service_account_name
                            .clone()
                            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into()),
                    ),
                    enable_service_links: Some(false),
                    // The adapter drains within 30 s (one send's retries).
                    termination_grace_period_seconds: Some(40),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![adapter],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// A label selector's query as the adapter sends it (`None` for none or `{}`).
pub fn selector_query(selector: Option<&LabelSelector>) -> Option<String> {
    selector
        .map(LabelSelector::to_query)
        .filter(|q| !q.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(uid: &str, version: u32) -> Value {
        json!({"metadata": {"uid": uid, "resourceVersion": version.to_string(), "name": uid}})
    }

    fn changes(tracker: &mut Tracker, event: Event<Value>) -> Vec<(Change, String)> {
        tracker
            .apply(event)
            .into_iter()
            .map(|(c, o)| {
                (
                    c,
                    o["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_tracker_turns_watch_events_into_adds_updates_and_deletes() {
        let mut t = Tracker::new();
        assert_eq!(changes(&mut t, Event::Init), []);
        assert_eq!(
            changes(&mut t, Event::InitApply(object("a", 1))),
            [(Change::Add, "a".into())]
        );
        assert_eq!(
            changes(&mut t, Event::InitApply(object("b", 2))),
            [(Change::Add, "b".into())]
        );
        assert_eq!(changes(&mut t, Event::InitDone), []);
        // The same version again (a watch's replay): nothing.
        assert_eq!(changes(&mut t, Event::Apply(object("a", 1))), []);
        assert_eq!(
            changes(&mut t, Event::Apply(object("a", 3))),
            [(Change::Update, "a".into())]
        );
        assert_eq!(
            changes(&mut t, Event::Delete(object("b", 4))),
            [(Change::Delete, "b".into())]
        );
        // Unknown objects' deletes are not news.
        assert_eq!(changes(&mut t, Event::Delete(object("z", 5))), []);
        // A re-list: `a` is gone, `c` is new, nothing else changed.
        t.apply(Event::Apply(object("d", 6)));
        assert_eq!(changes(&mut t, Event::Init), []);
        assert_eq!(changes(&mut t, Event::InitApply(object("d", 6))), []);
        assert_eq!(
            changes(&mut t, Event::InitApply(object("c", 7))),
            [(Change::Add, "c".into())]
        );
        assert_eq!(
            changes(&mut t, Event::InitDone),
            [(Change::Delete, "a".into())]
        );
        assert_eq!(t.len(), 2);
        // An object without a uid is not tracked.
        assert_eq!(
            changes(&mut t, Event::Apply(json!({"metadata": {"name": "x"}}))),
            []
        );
    }

    #[test]
    fn ids_are_deterministic_per_source_version_and_change() {
        let a = event_id("default", "s", Change::Add, &object("u", 1));
        assert_eq!(a, event_id("default", "s", Change::Add, &object("u", 1)));
        assert_ne!(a, event_id("default", "s", Change::Update, &object("u", 1)));
        assert_ne!(a, event_id("default", "s", Change::Add, &object("u", 2)));
        assert_ne!(a, event_id("default", "t", Change::Add, &object("u", 1)));
    }

    #[test]
    fn ready_is_the_first_false_else_the_first_unknown() {
        let f = |r: &str| Check::False {
            reason: r.into(),
            message: r.into(),
        };
        let u = |r: &str| Check::Unknown {
            reason: r.into(),
            message: r.into(),
        };
        let ready = |c: Vec<Condition>| {
            let r = c
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .unwrap_or_default();
            (r.status, r.reason)
        };
        assert_eq!(
            ready(conditions(Check::True, Check::True, Check::True)),
            ("True".into(), None)
        );
        assert_eq!(
            ready(conditions(Check::True, u("Waiting"), f("Denied"))),
            ("False".into(), Some("Denied".into()))
        );
        assert_eq!(
            ready(conditions(Check::True, u("Waiting"), Check::True)),
            ("Unknown".into(), Some("Waiting".into()))
        );
    }

    #[test]
    fn the_config_names_the_bad_field() {
        let good = json!({
            "name": "s", "namespace": "default", "mode": "Reference",
            "namespaces": ["default"],
            "resources": [{"apiVersion": "v1", "kind": "Pod"}],
        });
        assert!(AdapterConfig::parse(&good.to_string()).is_ok());
        let mut bad = good.clone();
        bad["resources"][0]["apiVersion"] = "core".into();
        bad["allNamespaces"] = true.into();
        let error = AdapterConfig::parse(&bad.to_string()).expect_err("refused");
        assert!(error.contains("resources[0].apiVersion"), "{error}");
        assert!(
            error.contains("namespaces: give namespaces or allNamespaces"),
            "{error}"
        );
        let error = AdapterConfig::parse("{\"name\": 1}").expect_err("refused");
        assert!(error.contains("invalid type"), "{error}");
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// What happens in the API server, and whether the watch delivers it (a change not
        /// delivered is one that happened while the watch was down).
        #[derive(Debug, Clone)]
        enum Op {
            Create(bool),
            Update(usize, bool),
            Delete(usize, bool),
            /// The same version sent again.
            Replay(usize),
            /// The watch lists again.
            Relist,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => any::<bool>().prop_map(Op::Create),
                3 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Op::Update(i, d)),
                2 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Op::Delete(i, d)),
                1 => any::<usize>().prop_map(Op::Replay),
                1 => Just(Op::Relist),
            ]
        }

        /// Applies the changes to `downstream` as a consumer would, failing on a change that
        /// cannot follow what was sent before.
        fn consume(
            downstream: &mut BTreeMap<String, String>,
            changes: Vec<(Change, Value)>,
        ) -> Result<(), TestCaseError> {
            for (change, object) in changes {
                let uid = uid(&object).unwrap_or_default().to_string();
                let version = resource_version(&object).unwrap_or_default().to_string();
                match change {
                    Change::Add => {
                        prop_assert!(!downstream.contains_key(&uid), "add of known {uid}");
                        downstream.insert(uid, version);
                    }
                    Change::Update => {
                        let old = downstream.get(&uid).cloned();
                        prop_assert!(old.is_some(), "update of unknown {uid}");
                        prop_assert_ne!(old, Some(version.clone()), "update without a change");
                        downstream.insert(uid, version);
                    }
                    Change::Delete => {
                        prop_assert!(downstream.remove(&uid).is_some(), "delete of unknown {uid}");
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn what_was_sent_adds_up_to_the_world_whenever_the_watch_is_in_step(
                ops in proptest::collection::vec(op(), 0..60)
            ) {
                let mut world: BTreeMap<String, u32> = BTreeMap::new();
                let mut downstream = BTreeMap::new();
                let mut tracker = Tracker::new();
                let (mut next_uid, mut version) = (0u32, 0u32);
                // Whether a change was missed since the last re-list.
                let mut behind = false;
                let pick = |world: &BTreeMap<String, u32>, i: usize| {
                    (!world.is_empty()).then(|| world.keys().nth(i % world.len()).cloned()).flatten()
                };
                for op in ops.into_iter().chain([Op::Relist]) {
                    let event = match op {
                        Op::Create(delivered) => {
                            next_uid += 1;
                            version += 1;
                            let uid = format!("u{next_uid}");
                            world.insert(uid.clone(), version);
                            behind |= !delivered;
                            delivered.then(|| Event::Apply(object(&uid, version)))
                        }
                        Op::Update(i, delivered) => pick(&world, i).and_then(|uid| {
                            version += 1;
                            world.insert(uid.clone(), version);
                            behind |= !delivered;
                            delivered.then(|| Event::Apply(object(&uid, version)))
                        }),
                        Op::Delete(i, delivered) => pick(&world, i).and_then(|uid| {
                            version += 1;
                            world.remove(&uid);
                            behind |= !delivered;
                            delivered.then(|| Event::Delete(object(&uid, version)))
                        }),
                        Op::Replay(i) => pick(&world, i)
                            .filter(|_| !behind)
                            .map(|uid| Event::Apply(object(&uid, world[&uid]))),
                        Op::Relist => {
                            consume(&mut downstream, tracker.apply(Event::Init))?;
                            for (uid, v) in &world {
                                consume(
                                    &mut downstream,
                                    tracker.apply(Event::InitApply(object(uid, *v))),
                                )?;
                            }
                            behind = false;
                            Some(Event::InitDone)
                        }
                    };
                    if let Some(event) = event {
                        consume(&mut downstream, tracker.apply(event))?;
                    }
                    if !behind {
                        let expected: BTreeMap<String, String> =
                            world.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
                        prop_assert_eq!(&downstream, &expected);
                        prop_assert_eq!(tracker.len(), world.len());
                    }
                }
            }
        }
    }
}
