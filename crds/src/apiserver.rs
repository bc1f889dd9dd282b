//! `ApiServerSource` (`sources.knative.dev/v1`). Locally it watches Mecha's own resources —
//! Services, Revisions, Brokers, Triggers and sources — and emits Knative's
//! `dev.knative.apiserver.{resource|ref}.{add|update|delete}` events.

use serde::{Deserialize, Serialize};

use crate::bindings::LabelSelector;
use crate::error::FieldError;
use crate::eventing::Destination;
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
    /// What a cluster runs the adapter as; not used locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
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

// === impl ApiServerSource ===

impl ApiServerSource {
    /// Whether events carry the whole object (`Resource`) rather than a reference.
    pub fn resource_mode(&self) -> bool {
        self.spec.mode.as_deref() == Some("Resource")
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        if spec.resources.is_empty() {
            errors.push(FieldError::new(
                "spec.resources",
                "list at least one resource to watch",
            ));
        }
        for (i, resource) in spec.resources.iter().enumerate() {
            let known = WATCHABLE
                .iter()
                .any(|(api, kind)| *api == resource.api_version && *kind == resource.kind);
            if !known {
                let kinds: Vec<String> = WATCHABLE
                    .iter()
                    .map(|(api, kind)| format!("{kind} ({api})"))
                    .collect();
                errors.push(FieldError::new(
                    format!("spec.resources[{i}]"),
                    format!(
                        "{} ({}) is not a Mecha resource; a local ApiServerSource watches {}",
                        resource.kind,
                        resource.api_version,
                        kinds.join(", ")
                    ),
                ));
            }
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
