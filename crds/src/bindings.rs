//! `ContainerSource` and `SinkBinding` (`sources.knative.dev/v1`): sources whose events come
//! from a program of the user's, told where to send them by `K_SINK` and `K_CE_OVERRIDES`.
//!
//! Locally a ContainerSource's container runs as a supervised process (as a Service's replica
//! does, without readiness probes), and a SinkBinding's subject is a Mecha Service (by name or
//! by labels): its replicas get the two variables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::eventing::Destination;
use crate::load::Mode;
use crate::meta::ObjectMeta;
pub use crate::selector::LabelSelector;
use crate::serving::Container;
use crate::sources::{CloudEventOverrides, validate_overrides};

pub const CONTAINER_KIND: &str = "ContainerSource";
pub const BINDING_KIND: &str = "SinkBinding";
/// The variables a bound program reads.
pub const K_SINK: &str = "K_SINK";
pub const K_CE_OVERRIDES: &str = "K_CE_OVERRIDES";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: ContainerSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerSourceSpec {
    /// Kubernetes' `PodTemplateSpec`, of which Mecha reads one container.
    pub template: PodTemplate,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ObjectMeta>,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PodSpec {
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkBinding {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: SinkBindingSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SinkBindingSpec {
    pub subject: Subject,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

/// Knative's `tracker.Reference`: one object by name, or every object its selector matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Subject {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

// === impl ContainerSource ===

impl ContainerSource {
    /// Its one container (validation makes sure there is exactly one).
    pub fn container(&self) -> Option<&Container> {
        self.spec.template.spec.containers.first()
    }

    /// A relative `workingDir` (or none) is relative to the YAML file's directory, as a
    /// Service's is: it is made absolute at load.
    pub fn anchor(&mut self, dir: &std::path::Path) {
        if let Some(container) = self.spec.template.spec.containers.first_mut() {
            let working = container.working_dir.as_deref().unwrap_or("");
            if std::path::Path::new(working).is_relative() {
                container.working_dir = Some(dir.join(working).display().to_string());
            }
        }
    }

    pub fn validate(&self, mode: Mode) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let containers = &self.spec.template.spec.containers;
        match containers.len() {
            1 => containers[0].validate("spec.template.spec.containers[0]", mode, &mut errors),
            n => errors.push(FieldError::new(
                "spec.template.spec.containers",
                format!("{n} containers given: Mecha runs exactly one container per source"),
            )),
        }
        for (i, env) in containers
            .first()
            .iter()
            .flat_map(|c| c.env.iter())
            .enumerate()
        {
            if env.name == K_SINK || env.name == K_CE_OVERRIDES {
                errors.push(FieldError::new(
                    format!("spec.template.spec.containers[0].env[{i}].name"),
                    format!(
                        "{} is set by Mecha from spec.sink and spec.ceOverrides",
                        env.name
                    ),
                ));
            }
        }
        self.spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(self.spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

// === impl SinkBinding ===

impl SinkBinding {
    /// Whether a Service (`namespace`, `name`, `labels`) is this binding's subject.
    pub fn selects(&self, namespace: &str, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let subject = &self.spec.subject;
        let ns = subject
            .namespace
            .as_deref()
            .unwrap_or(self.metadata.namespace());
        if ns != namespace {
            return false;
        }
        match (&subject.name, &subject.selector) {
            (Some(wanted), _) => wanted == name,
            (None, Some(selector)) => selector.matches(labels),
            (None, None) => false,
        }
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let subject = &self.spec.subject;
        if subject.api_version != crate::serving::API_VERSION
            || subject.kind != crate::serving::KIND
        {
            errors.push(FieldError::new(
                "spec.subject",
                format!(
                    "Mecha binds {} ({}) subjects, not {} ({}): its workloads are Services",
                    crate::serving::KIND,
                    crate::serving::API_VERSION,
                    subject.kind,
                    subject.api_version
                ),
            ));
        }
        match (&subject.name, &subject.selector) {
            (Some(_), Some(_)) => errors.push(FieldError::new(
                "spec.subject.selector",
                "give name or selector, not both",
            )),
            (None, None) => errors.push(FieldError::new("spec.subject", "needs name or selector")),
            (None, Some(selector)) if selector.is_empty() => errors.push(FieldError::new(
                "spec.subject.selector.matchLabels",
                "an empty selector would bind every Service: name at least one label",
            )),
            (None, Some(selector)) => selector.validate("spec.subject.selector", &mut errors),
            _ => {}
        }
        // As Knative's webhook: a binding reaches only into its own namespace.
        if let Some(namespace) = &subject.namespace
            && namespace != self.metadata.namespace()
        {
            errors.push(FieldError::new(
                "spec.subject.namespace",
                format!(
                    "{namespace:?} is not the binding's own namespace {:?}; a SinkBinding binds Services of its own namespace only",
                    self.metadata.namespace()
                ),
            ));
        }
        self.spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(self.spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

/// `K_CE_OVERRIDES`' value: `{"extensions":{…}}`, as Knative's adapters read it.
pub fn ce_overrides_json(extensions: &BTreeMap<String, String>) -> String {
    serde_json::json!({ "extensions": extensions }).to_string()
}

#[cfg(test)]
mod tests {
    use crate::Mode;

    #[test]
    fn a_sink_binding_reaches_only_into_its_own_namespace() {
        let yaml = |subject_namespace: &str| {
            format!(
                "apiVersion: sources.knative.dev/v1\nkind: SinkBinding\nmetadata:\n  name: b\n  namespace: team-a\nspec:\n  subject:\n    apiVersion: serving.knative.dev/v1\n    kind: Service\n    name: victim\n    namespace: {subject_namespace}\n  sink:\n    uri: http://127.0.0.1:9/\n"
            )
        };
        let (loaded, errors) =
            crate::load_str(std::path::Path::new("b.yaml"), &yaml("team-a"), Mode::Local);
        assert!(errors.is_empty() && loaded.len() == 1, "{errors:?}");
        let (_, errors) =
            crate::load_str(std::path::Path::new("b.yaml"), &yaml("team-b"), Mode::Local);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0]
                .to_string()
                .contains("(SinkBinding team-a/b): spec.subject.namespace: \"team-b\" is not the binding's own namespace"),
            "{}",
            errors[0]
        );
    }
}
