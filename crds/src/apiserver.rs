//! `ApiServerSource` (`sources.knative.dev/v1`). Locally it watches Mecha's own resources —
//! Services, Revisions, Brokers, Triggers and sources — and emits Knative's
//! `dev.knative.apiserver.{resource|ref}.{add|update|delete}` events; in a cluster a receive
//! adapter of its own watches any resource the source's service account may read.
//!
//! What the two modes accept differs only where they must: locally the resources are Mecha's
//! kinds ([`WATCHABLE`]) and namespaces have no labels (`namespaceSelector` is `{}` or absent);
//! in a cluster any well-formed `apiVersion` and `kind`, any valid selector.

use serde::{Deserialize, Serialize};

use crate::bindings::LabelSelector;
use crate::error::FieldError;
use crate::eventing::Destination;
use crate::load::Mode;
use crate::meta::ObjectMeta;
use crate::sources::{CloudEventOverrides, validate_overrides};

pub const KIND: &str = "ApiServerSource";
/// Knative's event types, by mode and change.
pub const RESOURCE_TYPE_PREFIX: &str = "dev.knative.apiserver.resource.";
pub const REF_TYPE_PREFIX: &str = "dev.knative.apiserver.ref.";

/// The kinds a local ApiServerSource can watch: `(apiVersion, kind)`.
pub const WATCHABLE: &[(&str, &str)] = &[
    ("serving.knative.dev/v1", "Service"),
    ("serving.knative.dev/v1", "Revision"),
    ("eventing.knative.dev/v1", "Broker"),
    ("eventing.knative.dev/v1", "Trigger"),
    ("sources.knative.dev/v1", "PingSource"),
    ("sources.knative.dev/v1", "ContainerSource"),
    ("sources.knative.dev/v1", "SinkBinding"),
    ("sources.knative.dev/v1", "ApiServerSource"),
    ("sources.knative.dev/v1alpha1", "GitHubSource"),
    ("sources.knative.dev/v1alpha1", "GitLabSource"),
    ("sources.knative.dev/v1alpha1", "RedisStreamSource"),
    ("sources.mecha.dev/v1alpha1", "NatsSource"),
    ("sources.mecha.dev/v1alpha1", "MqttSource"),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiServerSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: ApiServerSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiServerSourceSpec {
    pub resources: Vec<ApiServerResource>,
    /// `Reference` (the default: data is a reference) or `Resource` (data is the object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// What a cluster runs the adapter as (`default` when absent); not used locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Only objects with an `ownerReferences` entry of this `apiVersion` and `kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ApiVersionKind>,
    /// The namespaces watched, by their labels (`{}`: every namespace); absent: only the
    /// source's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiServerResource {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// An `apiVersion` and `kind` (the `owner` filter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiVersionKind {
    pub api_version: String,
    pub kind: String,
}

/// The prefix of the adapter Deployment's name, `apiserversource-{name}`.
pub const ADAPTER_PREFIX: &str = "apiserversource-";

// === impl ApiServerSource ===

impl ApiServerSource {
    /// Whether events carry the whole object (`Resource`) rather than a reference.
    pub fn resource_mode(&self) -> bool {
        self.spec.mode.as_deref() == Some("Resource")
    }

    /// Whether it watches every namespace (`namespaceSelector: {}`).
    pub fn all_namespaces(&self) -> bool {
        self.spec
            .namespace_selector
            .as_ref()
            .is_some_and(LabelSelector::is_empty)
    }

    pub fn validate(&self, mode: Mode) -> Vec<FieldError> {
        let mut errors = Vec::new();
        // Its adapter Deployment in a cluster is `apiserversource-{name}`.
        self.metadata
            .validate(63 - ADAPTER_PREFIX.len(), &mut errors);
        let spec = &self.spec;
        if spec.resources.is_empty() {
            errors.push(FieldError::new(
                "spec.resources",
                "list at least one resource to watch",
            ));
        }
        if spec.resources.len() > MAX_RESOURCES {
            errors.push(FieldError::new(
                "spec.resources",
                format!("at most {MAX_RESOURCES} resources per source"),
            ));
        }
        for (i, resource) in spec.resources.iter().enumerate() {
            let at = format!("spec.resources[{i}]");
            match mode {
                Mode::Local => {
                    let known = WATCHABLE
                        .iter()
                        .any(|(api, kind)| *api == resource.api_version && *kind == resource.kind);
                    if !known {
                        let kinds: Vec<String> = WATCHABLE
                            .iter()
                            .map(|(api, kind)| format!("{kind} ({api})"))
                            .collect();
                        errors.push(FieldError::new(
                            at.clone(),
                            format!(
                                "{} ({}) is not a Mecha resource; a local ApiServerSource watches {}",
                                resource.kind,
                                resource.api_version,
                                kinds.join(", ")
                            ),
                        ));
                    }
                }
                Mode::Kubernetes => {
                    validate_api_version_kind(
                        &resource.api_version,
                        &resource.kind,
                        &at,
                        &mut errors,
                    );
                }
            }
            if let Some(selector) = &resource.selector {
                selector.validate(&format!("{at}.selector"), &mut errors);
            }
        }
        if let Some(owner) = &spec.owner {
            validate_api_version_kind(&owner.api_version, &owner.kind, "spec.owner", &mut errors);
        }
        match (&spec.namespace_selector, mode) {
            (None, _) => {}
            (Some(selector), Mode::Local) if !selector.is_empty() => {
                errors.push(FieldError::new(
                    "spec.namespaceSelector",
                    "local namespaces have no labels: write {} to watch every namespace, or leave it out to watch the source's own",
                ))
            }
            (Some(selector), _) => selector.validate("spec.namespaceSelector", &mut errors),
        }
        if let Some(account) = &spec.service_account_name
            && let Err(why) = crate::meta::dns_subdomain(account)
        {
            errors.push(FieldError::new("spec.serviceAccountName", why));
        }
        if let Some(mode) = &spec.mode
            && mode != "Reference"
            && mode != "Resource"
        {
            errors.push(FieldError::new(
                "spec.mode",
                format!("{mode:?} is not Reference or Resource"),
            ));
        }
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

/// At most this many resources per source (each is a watch per namespace).
pub const MAX_RESOURCES: usize = 16;

// === impl ApiVersionKind ===

impl ApiVersionKind {
    /// Whether `object` (JSON with `metadata`) has an `ownerReferences` entry of this
    /// `apiVersion` and `kind`: the `owner` filter, locally and in a cluster.
    pub fn owns(&self, object: &serde_json::Value) -> bool {
        object
            .pointer("/metadata/ownerReferences")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|owners| {
                owners.iter().any(|owner| {
                    owner.get("apiVersion").and_then(serde_json::Value::as_str)
                        == Some(self.api_version.as_str())
                        && owner.get("kind").and_then(serde_json::Value::as_str)
                            == Some(self.kind.as_str())
                })
            })
    }
}

/// `apiVersion` is `v1`-like (the core group) or `group/version`; `kind` is a CamelCase name.
pub fn validate_api_version_kind(
    api_version: &str,
    kind: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (Some(group), version),
        None => (None, api_version),
    };
    let group_ok = group.is_none_or(|g| crate::meta::dns_subdomain(g).is_ok());
    let version_ok = version.strip_prefix('v').is_some_and(|rest| {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (major, level) = rest.split_at(digits);
        let level_ok = match level.strip_prefix("alpha").or(level.strip_prefix("beta")) {
            None => level.is_empty(),
            Some(n) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        };
        !major.is_empty() && level_ok
    });
    if !group_ok || !version_ok {
        errors.push(FieldError::new(
            format!("{path}.apiVersion"),
            format!(
                "{api_version:?} is not an API version: write `v1` for the core group or `group/version` (`apps/v1`, `example.com/v1beta1`)"
            ),
        ));
    }
    let kind_ok = kind.len() <= 63
        && kind.starts_with(|c: char| c.is_ascii_uppercase())
        && kind.bytes().all(|b| b.is_ascii_alphanumeric());
    if !kind_ok {
        errors.push(FieldError::new(
            format!("{path}.kind"),
            format!("{kind:?} is not a kind: a CamelCase name such as `Pod` or `Deployment`"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(spec: serde_json::Value) -> ApiServerSource {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sources.knative.dev/v1", "kind": "ApiServerSource",
            "metadata": {"name": "watch"},
            "spec": spec,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn paths(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn a_cluster_takes_any_well_formed_kind_locally_only_mechas() {
        let pods = source(serde_json::json!({
            "resources": [
                {"apiVersion": "v1", "kind": "Pod", "selector": {"matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["web"]}]}},
                {"apiVersion": "apps/v1", "kind": "Deployment"},
            ],
            "owner": {"apiVersion": "apps/v1", "kind": "ReplicaSet"},
            "namespaceSelector": {"matchLabels": {"team": "blue"}},
            "serviceAccountName": "watcher",
            "sink": {"uri": "http://example.com/"},
        }));
        assert_eq!(pods.validate(Mode::Kubernetes), []);
        assert_eq!(
            paths(pods.validate(Mode::Local)),
            [
                "spec.resources[0]",
                "spec.resources[1]",
                "spec.namespaceSelector"
            ]
        );
        let bad = source(serde_json::json!({
            "resources": [
                {"apiVersion": "apps", "kind": "Deployment"},
                {"apiVersion": "Apps/v1", "kind": "deployment"},
                {"apiVersion": "v1", "kind": "Pod", "selector": {"matchExpressions": [
                    {"key": "app", "operator": "Near"}]}},
            ],
            "owner": {"apiVersion": "v1beta", "kind": "Pod"},
            "namespaceSelector": {"matchLabels": {"team": "-"}},
            "sink": {"uri": "http://example.com/"},
        }));
        assert_eq!(
            paths(bad.validate(Mode::Kubernetes)),
            [
                "spec.resources[0].apiVersion",
                "spec.resources[1].apiVersion",
                "spec.resources[1].kind",
                "spec.resources[2].selector.matchExpressions[0].operator",
                "spec.owner.apiVersion",
                "spec.namespaceSelector.matchLabels.team",
            ]
        );
    }

    #[test]
    fn locally_an_empty_namespace_selector_means_every_namespace() {
        let every = source(serde_json::json!({
            "resources": [{"apiVersion": "serving.knative.dev/v1", "kind": "Revision"}],
            "owner": {"apiVersion": "serving.knative.dev/v1", "kind": "Service"},
            "namespaceSelector": {},
            "sink": {"uri": "http://example.com/"},
        }));
        assert_eq!(every.validate(Mode::Local), []);
        assert!(every.all_namespaces());
        let owner = every.spec.owner.clone().unwrap_or_default();
        assert!(
            owner.owns(&serde_json::json!({"metadata": {"ownerReferences": [
            {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "hello"}]}}))
        );
        assert!(
            !owner.owns(&serde_json::json!({"metadata": {"ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "Service", "name": "hello"}]}}))
        );
        assert!(!owner.owns(&serde_json::json!({"metadata": {}})));
    }

    #[test]
    fn the_name_leaves_room_for_the_adapters() {
        let mut long = source(serde_json::json!({
            "resources": [{"apiVersion": "v1", "kind": "Pod"}],
            "sink": {"uri": "http://example.com/"},
        }));
        long.metadata.name = "a".repeat(47);
        assert_eq!(long.validate(Mode::Kubernetes), []);
        long.metadata.name = "a".repeat(48);
        assert_eq!(paths(long.validate(Mode::Kubernetes)), ["metadata.name"]);
    }

    #[test]
    fn a_local_namespace_selector_with_labels_is_a_load_error_naming_the_field() {
        let yaml = "apiVersion: sources.knative.dev/v1\nkind: ApiServerSource\nmetadata:\n  name: every\nspec:\n  namespaceSelector:\n    matchLabels:\n      team: blue\n  resources:\n    - apiVersion: serving.knative.dev/v1\n      kind: Service\n  sink:\n    uri: http://127.0.0.1:9/\n";
        let path = std::path::Path::new("a.yaml");
        let (_, errors) = crate::load_str(path, yaml, Mode::Local);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().contains(
                "document 1 (ApiServerSource default/every): spec.namespaceSelector: local namespaces have no labels"
            ),
            "{}",
            errors[0]
        );
        let (loaded, errors) = crate::load_str(path, yaml, Mode::Kubernetes);
        assert!(errors.is_empty() && loaded.len() == 1, "{errors:?}");
        let (loaded, errors) = crate::load_str(
            path,
            &yaml.replace("    matchLabels:\n      team: blue\n", "    {}\n"),
            Mode::Local,
        );
        assert!(errors.is_empty() && loaded.len() == 1, "{errors:?}");
    }
}
