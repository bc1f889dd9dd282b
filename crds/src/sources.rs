//! Event sources: `sources.knative.dev/v1` `PingSource` and the `sources.knative.dev/v1alpha1`
//! webhook sources, with Knative's fields, defaults and validation.
//!
//! Everything a source needs to run is checked here, at load: a schedule croner cannot read, a
//! time zone the system does not know, JSON data that is not an object, a sink that names a
//! kind Mecha cannot address. The importers crate parses the same fields again with the same
//! functions ([`parse_schedule`], [`parse_timezone`], [`PingSourceSpec::payload`]), so what
//! loads is exactly what runs.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::apiserver::{self, ApiServerSource};
use crate::bindings::{self, ContainerSource, SinkBinding};
use crate::error::FieldError;
use crate::eventing::Destination;
use crate::load::Mode;
use crate::meta::ObjectMeta;
use crate::queues::{self, MqttSource, NatsSource, RedisStreamSource};

pub const API_VERSION: &str = "sources.knative.dev/v1";
pub const PING_KIND: &str = "PingSource";
/// The webhook sources' group version (knative-extensions eventing-github/-gitlab).
pub const ALPHA_API_VERSION: &str = "sources.knative.dev/v1alpha1";
pub const GITHUB_KIND: &str = "GitHubSource";
pub const GITLAB_KIND: &str = "GitLabSource";
/// Local mode's stand-in for `secretToken.secretKeyRef` (a Kubernetes Secret cannot be read
/// locally): a file holding the webhook secret...
pub const SECRET_FILE_ANNOTATION: &str = "mecha.dev/secret-token-file";
/// ...or the name of an environment variable of `mecha up` holding it.
pub const SECRET_ENV_ANNOTATION: &str = "mecha.dev/secret-token-env";

/// GitLab's webhook kinds as Knative's GitLabSource names them in `eventTypes`, with the
/// `X-Gitlab-Event` header that carries each and the event type suffix Mecha sends.
pub const GITLAB_EVENTS: &[(&str, &str, &str)] = &[
    ("push_events", "Push Hook", "push"),
    ("tag_push_events", "Tag Push Hook", "tag_push"),
    ("issues_events", "Issue Hook", "issue"),
    (
        "confidential_issues_events",
        "Confidential Issue Hook",
        "confidential_issue",
    ),
    (
        "merge_requests_events",
        "Merge Request Hook",
        "merge_request",
    ),
    ("note_events", "Note Hook", "note"),
    (
        "confidential_note_events",
        "Confidential Note Hook",
        "confidential_note",
    ),
    ("job_events", "Job Hook", "job"),
    ("pipeline_events", "Pipeline Hook", "pipeline"),
    ("wiki_page_events", "Wiki Page Hook", "wiki_page"),
    ("deployment_events", "Deployment Hook", "deployment"),
    ("releases_events", "Release Hook", "release"),
];
/// Knative's event types: PingSource's...
pub const PING_EVENT_TYPE: &str = "dev.knative.sources.ping";
/// ...GitHubSource's, followed by the `X-GitHub-Event`...
pub const GITHUB_TYPE_PREFIX: &str = "dev.knative.source.github.";
/// ...and GitLabSource's, followed by the event's suffix in [`GITLAB_EVENTS`].
pub const GITLAB_TYPE_PREFIX: &str = "dev.knative.sources.gitlab.";

/// The `source` of a local ApiServerSource's events (Knative: the API server's URL).
pub const API_SERVER_EVENT_SOURCE: &str = "mecha://local";

/// One kind of event a source sends: Knative's `status.ceAttributes` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeAttributes {
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
}

/// Knative's default schedule: every minute.
pub const DEFAULT_SCHEDULE: &str = "* * * * *";

/// Attributes a `ceOverrides` extension may not replace: the ones that identify an event.
const RESERVED: &[&str] = &[
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// `spec.ceOverrides`: extensions set on every event the source sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CloudEventOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PingSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PingSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PingSourceSpec {
    /// Cron, five fields or six with seconds first; `* * * * *` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// An IANA time zone name; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

/// Knative's `SecretValueFromSource`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SecretValueFromSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SecretKeySelector {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitHubSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: GitHubSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitHubSourceSpec {
    /// `owner/repository` (or an organization alone).
    pub owner_and_repository: String,
    /// GitHub event names (`push`, `pull_request`, …); others are answered and dropped.
    pub event_types: Vec<String>,
    /// Used by Knative to register the webhook with GitHub; Mecha does not register it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<SecretValueFromSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_token: Option<SecretValueFromSource>,
    /// GitHub Enterprise's API; only used to register the webhook.
    #[serde(
        default,
        rename = "githubAPIURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub github_api_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitLabSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: GitLabSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GitLabSourceSpec {
    /// `https://gitlab.com/group/project`: the events' source.
    pub project_url: String,
    /// Knative's names: `push_events`, `merge_requests_events`, … (see [`GITLAB_EVENTS`]).
    pub event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<SecretValueFromSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_token: Option<SecretValueFromSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslverify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

/// Where a webhook source's secret comes from in local mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    File(String),
    Env(String),
}

/// Any source Mecha runs.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceResource {
    Ping(PingSource),
    GitHub(GitHubSource),
    GitLab(GitLabSource),
    Redis(RedisStreamSource),
    Nats(NatsSource),
    Mqtt(MqttSource),
    Container(ContainerSource),
    Binding(SinkBinding),
    ApiServer(ApiServerSource),
}

// === impl SourceResource ===

impl SourceResource {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceResource::Ping(_) => PING_KIND,
            SourceResource::GitHub(_) => GITHUB_KIND,
            SourceResource::GitLab(_) => GITLAB_KIND,
            SourceResource::Redis(_) => queues::REDIS_KIND,
            SourceResource::Nats(_) => queues::NATS_KIND,
            SourceResource::Mqtt(_) => queues::MQTT_KIND,
            SourceResource::Container(_) => bindings::CONTAINER_KIND,
            SourceResource::Binding(_) => bindings::BINDING_KIND,
            SourceResource::ApiServer(_) => apiserver::KIND,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            SourceResource::Ping(s) => &s.metadata,
            SourceResource::GitHub(s) => &s.metadata,
            SourceResource::GitLab(s) => &s.metadata,
            SourceResource::Redis(s) => &s.metadata,
            SourceResource::Nats(s) => &s.metadata,
            SourceResource::Mqtt(s) => &s.metadata,
            SourceResource::Container(s) => &s.metadata,
            SourceResource::Binding(s) => &s.metadata,
            SourceResource::ApiServer(s) => &s.metadata,
        }
    }

    pub fn namespace(&self) -> &str {
        self.metadata().namespace()
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    pub fn sink(&self) -> &Destination {
        match self {
            SourceResource::Ping(s) => &s.spec.sink,
            SourceResource::GitHub(s) => &s.spec.sink,
            SourceResource::GitLab(s) => &s.spec.sink,
            SourceResource::Redis(s) => &s.spec.sink,
            SourceResource::Nats(s) => &s.spec.sink,
            SourceResource::Mqtt(s) => &s.spec.sink,
            SourceResource::Container(s) => &s.spec.sink,
            SourceResource::Binding(s) => &s.spec.sink,
            SourceResource::ApiServer(s) => &s.spec.sink,
        }
    }

    /// `spec.ceOverrides.extensions`.
    pub fn extensions(&self) -> BTreeMap<String, String> {
        let overrides = match self {
            SourceResource::Ping(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::GitHub(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::GitLab(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::Redis(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::Nats(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::Mqtt(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::Container(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::Binding(s) => s.spec.ce_overrides.as_ref(),
            SourceResource::ApiServer(s) => s.spec.ce_overrides.as_ref(),
        };
        overrides.map(|o| o.extensions.clone()).unwrap_or_default()
    }

    /// The CloudEvents `source` of the events it sends.
    pub fn event_source(&self) -> String {
        match self {
            SourceResource::Ping(s) => s.event_source(),
            SourceResource::GitHub(s) => s.event_source(),
            SourceResource::GitLab(s) => s.spec.project_url.clone(),
            SourceResource::Redis(s) => s.event_source(),
            SourceResource::Nats(s) => s.event_source(),
            SourceResource::Mqtt(s) => s.event_source(),
            // The program chooses its events' sources.
            SourceResource::Container(_) | SourceResource::Binding(_) => String::new(),
            SourceResource::ApiServer(_) => API_SERVER_EVENT_SOURCE.to_string(),
        }
    }

    /// The resource as written (what an ApiServerSource in mode `Resource` sends).
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            SourceResource::Ping(s) => serde_json::to_value(s),
            SourceResource::GitHub(s) => serde_json::to_value(s),
            SourceResource::GitLab(s) => serde_json::to_value(s),
            SourceResource::Redis(s) => serde_json::to_value(s),
            SourceResource::Nats(s) => serde_json::to_value(s),
            SourceResource::Mqtt(s) => serde_json::to_value(s),
            SourceResource::Container(s) => serde_json::to_value(s),
            SourceResource::Binding(s) => serde_json::to_value(s),
            SourceResource::ApiServer(s) => serde_json::to_value(s),
        };
        value.unwrap_or_default()
    }

    /// The types and sources of the events it sends (Knative's `status.ceAttributes`).
    pub fn ce_attributes(&self) -> Vec<CeAttributes> {
        let source = self.event_source();
        let one = |kind: &str| {
            vec![CeAttributes {
                kind: kind.to_string(),
                source: source.clone(),
            }]
        };
        match self {
            SourceResource::Ping(_) => one(PING_EVENT_TYPE),
            SourceResource::GitHub(s) => s
                .spec
                .event_types
                .iter()
                .map(|event| CeAttributes {
                    kind: format!("{GITHUB_TYPE_PREFIX}{event}"),
                    source: source.clone(),
                })
                .collect(),
            SourceResource::GitLab(s) => s
                .spec
                .event_types
                .iter()
                .filter_map(|name| GITLAB_EVENTS.iter().find(|(known, _, _)| known == name))
                .map(|(_, _, suffix)| CeAttributes {
                    kind: format!("{GITLAB_TYPE_PREFIX}{suffix}"),
                    source: source.clone(),
                })
                .collect(),
            SourceResource::Redis(_) => one(queues::REDIS_EVENT_TYPE),
            SourceResource::Nats(_) => one(queues::NATS_EVENT_TYPE),
            SourceResource::Mqtt(_) => one(queues::MQTT_EVENT_TYPE),
            // Knative leaves these empty too: the program decides.
            SourceResource::Container(_) | SourceResource::Binding(_) => Vec::new(),
            SourceResource::ApiServer(s) => {
                let prefix = if s.resource_mode() {
                    apiserver::RESOURCE_TYPE_PREFIX
                } else {
                    apiserver::REF_TYPE_PREFIX
                };
                ["add", "update", "delete"]
                    .iter()
                    .map(|change| CeAttributes {
                        kind: format!("{prefix}{change}"),
                        source: source.clone(),
                    })
                    .collect()
            }
        }
    }

    pub fn validate(&self, mode: Mode) -> Vec<FieldError> {
        match self {
            SourceResource::Ping(s) => s.validate(),
            SourceResource::GitHub(s) => s.validate(mode),
            SourceResource::GitLab(s) => s.validate(mode),
            SourceResource::Redis(s) => s.validate(),
            SourceResource::Nats(s) => s.validate(),
            SourceResource::Mqtt(s) => s.validate(),
            SourceResource::Container(s) => s.validate(mode),
            SourceResource::Binding(s) => s.validate(),
            SourceResource::ApiServer(s) => s.validate(mode),
        }
    }

    /// The path of a webhook source's receiver on the gateway port.
    pub fn webhook_path(&self) -> Option<String> {
        let provider = match self {
            SourceResource::Ping(_)
            | SourceResource::Redis(_)
            | SourceResource::Nats(_)
            | SourceResource::Mqtt(_)
            | SourceResource::Container(_)
            | SourceResource::Binding(_)
            | SourceResource::ApiServer(_) => return None,
            SourceResource::GitHub(_) => "github",
            SourceResource::GitLab(_) => "gitlab",
        };
        Some(format!(
            "/webhooks/{provider}/{}/{}",
            self.namespace(),
            self.name()
        ))
    }

    /// Where a webhook source's secret is read from in local mode.
    pub fn secret_ref(&self) -> Option<SecretRef> {
        let annotations = &self.metadata().annotations;
        if let Some(path) = annotations.get(SECRET_FILE_ANNOTATION) {
            return Some(SecretRef::File(path.clone()));
        }
        annotations
            .get(SECRET_ENV_ANNOTATION)
            .map(|name| SecretRef::Env(name.clone()))
    }
}

/// Every source and where its events go, as the control plane streams it to the standalone
/// importers (`GET /api/v1/sources/watch`, one JSON line per change, `{"sources": [...]}`).
/// The sinks are resolved by the control plane, which knows what a `ref` names in its runtime
/// (the gateway and the broker ingress locally; the broker Service and the gateway in a
/// cluster).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesSnapshot {
    #[serde(default)]
    pub sources: Vec<PlacedSource>,
}

/// One source of a [`SourcesSnapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacedSource {
    /// The resource as written.
    pub resource: SourceResource,
    /// Where its events go; absent when the sink cannot be resolved (then `problem` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A resolved sink: the address users know, where requests actually go, and the `Host`
/// header to send when it differs (a Service reached through the gateway by host name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkAddress {
    pub url: String,
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

// === impl SourceResource (wire) ===

impl Serialize for SourceResource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SourceResource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        SourceResource::from_json(value).map_err(serde::de::Error::custom)
    }
}

impl SourceResource {
    /// A source from its JSON (what [`to_json`](Self::to_json) wrote), typed by its
    /// `apiVersion` and `kind`; not validated (see [`validate`](Self::validate)).
    pub fn from_json(value: serde_json::Value) -> Result<Self, String> {
        let field = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let typed = |e: serde_json::Error| format!("{kind} ({api_version}): {e}");
        Ok(match (api_version.as_str(), kind.as_str()) {
            (API_VERSION, PING_KIND) => Self::Ping(serde_json::from_value(value).map_err(typed)?),
            (ALPHA_API_VERSION, GITHUB_KIND) => {
                Self::GitHub(serde_json::from_value(value).map_err(typed)?)
            }
            (ALPHA_API_VERSION, GITLAB_KIND) => {
                Self::GitLab(serde_json::from_value(value).map_err(typed)?)
            }
            (ALPHA_API_VERSION, queues::REDIS_KIND) => {
                Self::Redis(serde_json::from_value(value).map_err(typed)?)
            }
            (queues::MECHA_API_VERSION, queues::NATS_KIND) => {
                Self::Nats(serde_json::from_value(value).map_err(typed)?)
            }
            (queues::MECHA_API_VERSION, queues::MQTT_KIND) => {
                Self::Mqtt(serde_json::from_value(value).map_err(typed)?)
            }
            (API_VERSION, bindings::CONTAINER_KIND) => {
                Self::Container(serde_json::from_value(value).map_err(typed)?)
            }
            (API_VERSION, bindings::BINDING_KIND) => {
                Self::Binding(serde_json::from_value(value).map_err(typed)?)
            }
            (API_VERSION, apiserver::KIND) => {
                Self::ApiServer(serde_json::from_value(value).map_err(typed)?)
            }
            _ => return Err(format!("{kind} ({api_version}) is not a source kind")),
        })
    }
}

// === impl GitHubSource ===

impl GitHubSource {
    /// Knative's source attribute: `https://github.com/{ownerAndRepository}`.
    pub fn event_source(&self) -> String {
        format!("https://github.com/{}", self.spec.owner_and_repository)
    }

    pub fn validate(&self, mode: Mode) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        let parts: Vec<&str> = spec.owner_and_repository.split('/').collect();
        let part_ok = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if parts.len() > 2 || !parts.iter().all(part_ok) {
            errors.push(FieldError::new(
                "spec.ownerAndRepository",
                format!(
                    "{:?} is not OWNER/REPOSITORY (or an organization)",
                    spec.owner_and_repository
                ),
            ));
        }
        if spec.event_types.is_empty() {
            errors.push(FieldError::new(
                "spec.eventTypes",
                "list at least one GitHub event (push, pull_request, …)",
            ));
        }
        for (i, name) in spec.event_types.iter().enumerate() {
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if !valid {
                errors.push(FieldError::new(
                    format!("spec.eventTypes[{i}]"),
                    format!("{name:?} is not a GitHub event name (lower case and _)"),
                ));
            }
        }
        validate_secret(
            &self.metadata,
            spec.secret_token.as_ref(),
            mode,
            &mut errors,
        );
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

// === impl GitLabSource ===

impl GitLabSource {
    pub fn validate(&self, mode: Mode) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        let url_ok = ["https://", "http://"].iter().any(|scheme| {
            spec.project_url
                .strip_prefix(scheme)
                .is_some_and(|rest| rest.contains('/') && !rest.starts_with('/'))
        });
        if !url_ok {
            errors.push(FieldError::new(
                "spec.projectUrl",
                format!(
                    "{:?} is not a project URL such as https://gitlab.com/group/project",
                    spec.project_url
                ),
            ));
        }
        if spec.event_types.is_empty() {
            errors.push(FieldError::new(
                "spec.eventTypes",
                "list at least one GitLab event (push_events, merge_requests_events, …)",
            ));
        }
        for (i, name) in spec.event_types.iter().enumerate() {
            if !GITLAB_EVENTS.iter().any(|(known, _, _)| known == name) {
                let known: Vec<&str> = GITLAB_EVENTS.iter().map(|(k, _, _)| *k).collect();
                errors.push(FieldError::new(
                    format!("spec.eventTypes[{i}]"),
                    format!("{name:?} is not one of {}", known.join(", ")),
                ));
            }
        }
        validate_secret(
            &self.metadata,
            spec.secret_token.as_ref(),
            mode,
            &mut errors,
        );
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

/// A relative `mecha.dev/secret-token-file` is relative to the YAML file's directory (`dir`),
/// as a Service's relative command is: it is made absolute at load.
pub fn anchor_secret_file(metadata: &mut ObjectMeta, dir: &std::path::Path) {
    if let Some(path) = metadata.annotations.get_mut(SECRET_FILE_ANNOTATION)
        && !path.is_empty()
        && std::path::Path::new(path.as_str()).is_relative()
    {
        *path = dir.join(path.as_str()).display().to_string();
    }
}

/// A webhook source must have a secret: unsigned webhooks would let anyone inject events. In
/// a cluster that is `secretToken.secretKeyRef`; locally a Secret cannot be read, so one of the
/// `mecha.dev/secret-token-{file,env}` annotations says where the secret is.
fn validate_secret(
    metadata: &ObjectMeta,
    secret_token: Option<&SecretValueFromSource>,
    mode: Mode,
    errors: &mut Vec<FieldError>,
) {
    let file = metadata.annotations.get(SECRET_FILE_ANNOTATION);
    let env = metadata.annotations.get(SECRET_ENV_ANNOTATION);
    if file.is_some() && env.is_some() {
        errors.push(FieldError::new(
            format!("metadata.annotations.{SECRET_ENV_ANNOTATION}"),
            format!("set {SECRET_FILE_ANNOTATION} or {SECRET_ENV_ANNOTATION}, not both"),
        ));
    }
    if file.is_some_and(|f| f.is_empty()) || env.is_some_and(|e| e.is_empty()) {
        errors.push(FieldError::new(
            "metadata.annotations",
            "the secret's file or variable name is empty",
        ));
    }
    if let Some(reference) = secret_token.and_then(|s| s.secret_key_ref.as_ref())
        && (reference.name.is_empty() || reference.key.is_empty())
    {
        errors.push(FieldError::new(
            "spec.secretToken.secretKeyRef",
            "name and key are required",
        ));
    }
    match mode {
        Mode::Local if file.is_none() && env.is_none() => errors.push(FieldError::new(
            "spec.secretToken",
            format!(
                "local mode cannot read a Kubernetes Secret: name the webhook secret's file with the {SECRET_FILE_ANNOTATION} annotation or its environment variable with {SECRET_ENV_ANNOTATION}"
            ),
        )),
        Mode::Kubernetes
            if secret_token
                .and_then(|s| s.secret_key_ref.as_ref())
                .is_none() =>
        {
            errors.push(FieldError::new(
                "spec.secretToken.secretKeyRef",
                "required: webhooks are only accepted when signed with the secret",
            ));
        }
        _ => {}
    }
}

// === impl PingSource ===

impl PingSource {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    /// Knative's source attribute: `/apis/v1/namespaces/{ns}/pingsources/{name}`.
    pub fn event_source(&self) -> String {
        format!(
            "/apis/v1/namespaces/{}/pingsources/{}",
            self.namespace(),
            self.metadata.name
        )
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        if let Err(why) = parse_schedule(spec.schedule()) {
            errors.push(FieldError::new("spec.schedule", why));
        }
        if let Some(zone) = &spec.timezone
            && let Err(why) = parse_timezone(zone)
        {
            errors.push(FieldError::new("spec.timezone", why));
        }
        if let Err(error) = spec.payload() {
            errors.push(error);
        }
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

// === impl PingSourceSpec ===

impl PingSourceSpec {
    pub fn schedule(&self) -> &str {
        self.schedule.as_deref().unwrap_or(DEFAULT_SCHEDULE)
    }

    /// The bytes each event carries: `data` as written, or `dataBase64` decoded. Both at once,
    /// bad base64, and JSON data that is not an object under a JSON content type are errors.
    pub fn payload(&self) -> Result<Option<Vec<u8>>, FieldError> {
        match (&self.data, &self.data_base64) {
            (Some(_), Some(_)) => Err(FieldError::new(
                "spec.data",
                "data and dataBase64 cannot both be set",
            )),
            (None, None) => Ok(None),
            (None, Some(encoded)) => BASE64.decode(encoded.trim()).map(Some).map_err(|error| {
                FieldError::new("spec.dataBase64", format!("not valid base64: {error}"))
            }),
            (Some(data), None) => {
                if self.content_type.as_deref().is_some_and(is_json) {
                    match serde_json::from_str::<serde_json::Value>(data) {
                        Ok(serde_json::Value::Object(_)) => {}
                        Ok(_) => {
                            return Err(FieldError::new(
                                "spec.data",
                                "with a JSON contentType, data must be a JSON object",
                            ));
                        }
                        Err(error) => {
                            return Err(FieldError::new(
                                "spec.data",
                                format!("with a JSON contentType, data must be JSON: {error}"),
                            ));
                        }
                    }
                }
                Ok(Some(data.clone().into_bytes()))
            }
        }
    }
}

/// Reads a cron schedule as Knative does: five fields, or six with seconds first; the
/// `@yearly`…`@hourly` shorthands; `@every` refused (Knative refuses it too). Day of month and
/// day of week combine with OR, as in Vixie cron.
pub fn parse_schedule(schedule: &str) -> Result<croner::Cron, String> {
    let trimmed = schedule.trim();
    if trimmed.to_ascii_lowercase().starts_with("@every") {
        return Err(format!(
            "{schedule:?}: @every is not supported; write a cron expression such as \"*/5 * * * *\""
        ));
    }
    let fields = trimmed.split_whitespace().count();
    if !trimmed.starts_with('@') && !(5..=6).contains(&fields) {
        return Err(format!(
            "{schedule:?} has {fields} fields; a schedule has five (minute hour day-of-month month day-of-week) or six with seconds first"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|error| format!("{schedule:?} is not a valid cron schedule: {error}"))
}

/// An IANA time zone from the system's database.
pub fn parse_timezone(name: &str) -> Result<jiff::tz::TimeZone, String> {
    jiff::tz::TimeZone::get(name)
        .map_err(|error| format!("{name:?} is not a known IANA time zone: {error}"))
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// The first character CloudEvents does not allow in a String value, with its byte offset:
/// control characters (U+0000-U+001F, U+007F-U+009F) and Unicode noncharacters (U+FDD0-U+FDEF,
/// and the last two code points of every plane). Unpaired surrogates cannot be in a Rust
/// string. The broker's ingress and every source's `ceOverrides` apply this one rule.
pub fn invalid_string_char(text: &str) -> Option<(usize, char)> {
    text.char_indices().find(|(_, c)| {
        let n = u32::from(*c);
        n <= 0x1f
            || (0x7f..=0x9f).contains(&n)
            || (0xfdd0..=0xfdef).contains(&n)
            || n & 0xfffe == 0xfffe
    })
}

/// Most `ceOverrides` extensions a source may set: each becomes a header of every event, and
/// the next hop takes at most 100 fields and 64 KiB of head.
pub const MAX_OVERRIDES: usize = 32;
/// Most bytes of all `ceOverrides` extension values together.
pub const MAX_OVERRIDES_BYTES: usize = 16 * 1024;

pub fn validate_overrides(overrides: Option<&CloudEventOverrides>, errors: &mut Vec<FieldError>) {
    let Some(overrides) = overrides else {
        return;
    };
    if overrides.extensions.len() > MAX_OVERRIDES {
        errors.push(FieldError::new(
            "spec.ceOverrides.extensions",
            format!(
                "{} extensions; at most {MAX_OVERRIDES} (each is a header of every event)",
                overrides.extensions.len()
            ),
        ));
    }
    let total: usize = overrides.extensions.values().map(String::len).sum();
    if total > MAX_OVERRIDES_BYTES {
        errors.push(FieldError::new(
            "spec.ceOverrides.extensions",
            format!(
                "{total} bytes of values; at most {MAX_OVERRIDES_BYTES} (each is a header of every event)"
            ),
        ));
    }
    for (key, value) in &overrides.extensions {
        if let Some((at, c)) = invalid_string_char(value) {
            errors.push(FieldError::new(
                format!("spec.ceOverrides.extensions.{key}"),
                format!(
                    "contains U+{:04X} at byte {at}: CloudEvents String values exclude control characters and Unicode noncharacters",
                    u32::from(c)
                ),
            ));
        }
    }
    for key in overrides.extensions.keys() {
        let path = format!("spec.ceOverrides.extensions.{key}");
        let valid = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            errors.push(FieldError::new(
                path,
                "extension names are lower-case letters and digits",
            ));
        } else if RESERVED.contains(&key.as_str()) {
            errors.push(FieldError::new(
                path,
                format!(
                    "{key} is a CloudEvents attribute the source sets; it cannot be overridden"
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_cloudevents_strings_within_a_header_budget() {
        let check = |extensions: Vec<(String, String)>| {
            let overrides = CloudEventOverrides {
                extensions: extensions.into_iter().collect(),
            };
            let mut errors = Vec::new();
            validate_overrides(Some(&overrides), &mut errors);
            errors.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert!(check(vec![("team".into(), "é 🎉 数据".into())]).is_empty());
        for bad in [
            "a\u{1}b",
            "\u{7f}",
            "\u{85}",
            "\u{fdd0}",
            "\u{ffff}",
            "\u{10fffe}",
        ] {
            let errors = check(vec![("team".into(), bad.into())]);
            assert!(
                errors.len() == 1 && errors[0].contains("spec.ceOverrides.extensions.team"),
                "{bad:?}: {errors:?}"
            );
        }
        assert!(check(vec![("team".into(), "\u{2028}".into())]).is_empty());
        let many = (0..=MAX_OVERRIDES)
            .map(|i| (format!("x{i}"), "v".into()))
            .collect();
        assert_eq!(check(many).len(), 1);
        let large = vec![("big".into(), "v".repeat(MAX_OVERRIDES_BYTES + 1))];
        assert_eq!(check(large).len(), 1);
    }

    #[test]
    fn schedules_with_and_without_seconds() {
        assert!(parse_schedule("* * * * *").is_ok());
        assert!(parse_schedule("*/2 * * * * *").is_ok());
        assert!(parse_schedule("@hourly").is_ok());
        let every = parse_schedule("@every 1m").expect_err("@every");
        assert!(every.contains("@every is not supported"), "{every}");
        let short = parse_schedule("* * *").expect_err("three fields");
        assert!(short.contains("has 3 fields"), "{short}");
        assert!(parse_schedule("* * * * * * *").is_err());
        assert!(parse_schedule("61 * * * *").is_err());
    }

    #[test]
    fn time_zones() {
        assert!(parse_timezone("Asia/Tokyo").is_ok());
        assert!(parse_timezone("UTC").is_ok());
        assert!(parse_timezone("Mars/Olympus").is_err());
    }

    fn github(annotations: &[(&str, &str)], secret_key_ref: bool) -> GitHubSource {
        GitHubSource {
            api_version: ALPHA_API_VERSION.into(),
            kind: GITHUB_KIND.into(),
            metadata: ObjectMeta {
                name: "repo".into(),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..ObjectMeta::default()
            },
            spec: GitHubSourceSpec {
                owner_and_repository: "octo/hello".into(),
                event_types: vec!["push".into()],
                secret_token: secret_key_ref.then(|| SecretValueFromSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "github".into(),
                        key: "secretToken".into(),
                        optional: None,
                    }),
                }),
                sink: Destination {
                    r#ref: None,
                    uri: Some("http://127.0.0.1:1/".into()),
                },
                ..GitHubSourceSpec::default()
            },
        }
    }

    fn paths(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn ce_attributes_list_each_event_type_with_the_source() {
        let source = SourceResource::GitHub(github(&[(SECRET_ENV_ANNOTATION, "GH")], false));
        assert_eq!(
            source.ce_attributes(),
            [CeAttributes {
                kind: "dev.knative.source.github.push".into(),
                source: "https://github.com/octo/hello".into(),
            }]
        );
        let json = serde_json::to_value(&source.ce_attributes()[0]).unwrap_or_default();
        assert_eq!(json["type"], "dev.knative.source.github.push");
    }

    #[test]
    fn webhook_secrets_per_mode() {
        let env = [(SECRET_ENV_ANNOTATION, "GH")];
        let file = [(SECRET_FILE_ANNOTATION, "secret")];
        assert!(github(&env, false).validate(Mode::Local).is_empty());
        assert!(github(&file, true).validate(Mode::Local).is_empty());
        assert_eq!(
            paths(github(&[], true).validate(Mode::Local)),
            ["spec.secretToken"]
        );
        assert!(github(&[], true).validate(Mode::Kubernetes).is_empty());
        assert_eq!(
            paths(github(&env, false).validate(Mode::Kubernetes)),
            ["spec.secretToken.secretKeyRef"]
        );
        let both = [env[0], file[0]];
        assert_eq!(
            paths(github(&both, false).validate(Mode::Local)),
            [format!("metadata.annotations.{SECRET_ENV_ANNOTATION}")]
        );
    }

    #[test]
    fn relative_secret_files_start_at_the_yaml_directory() {
        let mut source = github(&[(SECRET_FILE_ANNOTATION, "keys/gh")], false);
        anchor_secret_file(&mut source.metadata, std::path::Path::new("/srv/app"));
        assert_eq!(
            source.metadata.annotations[SECRET_FILE_ANNOTATION],
            "/srv/app/keys/gh"
        );
        anchor_secret_file(&mut source.metadata, std::path::Path::new("/elsewhere"));
        assert_eq!(
            source.metadata.annotations[SECRET_FILE_ANNOTATION],
            "/srv/app/keys/gh"
        );
    }

    #[test]
    fn payloads() {
        let spec = |content_type: Option<&str>, data: Option<&str>, b64: Option<&str>| {
            PingSourceSpec {
                content_type: content_type.map(String::from),
                data: data.map(String::from),
                data_base64: b64.map(String::from),
                ..PingSourceSpec::default()
            }
            .payload()
        };
        assert_eq!(
            spec(Some("application/json"), Some(r#"{"a":1}"#), None),
            Ok(Some(br#"{"a":1}"#.to_vec()))
        );
        assert_eq!(spec(None, None, Some("aGk=")), Ok(Some(b"hi".to_vec())));
        assert_eq!(
            spec(Some("text/plain"), Some("[1]"), None),
            Ok(Some(b"[1]".to_vec()))
        );
        let error = spec(Some("application/json"), Some("[1]"), None).expect_err("array");
        assert_eq!(error.path, "spec.data");
        let error = spec(None, Some("x"), Some("eA==")).expect_err("both");
        assert_eq!(error.path, "spec.data");
        let error = spec(None, None, Some("!!")).expect_err("bad base64");
        assert_eq!(error.path, "spec.dataBase64");
    }

    #[test]
    fn snapshots_carry_every_kind_as_written_and_refuse_unknown_kinds() {
        let yaml = r#"
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {name: tick, namespace: team}
spec:
  schedule: "*/5 * * * * *"
  data: hello
  sink: {ref: {apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}
---
apiVersion: sources.mecha.dev/v1alpha1
kind: NatsSource
metadata: {name: orders}
spec:
  url: nats://127.0.0.1:4222
  subject: orders
  sink: {uri: "http://example.com/"}
"#;
        let (loaded, errors) =
            crate::load_str(std::path::Path::new("/tmp/s.yaml"), yaml, Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let snapshot = SourcesSnapshot {
            sources: loaded
                .into_iter()
                .map(|l| match l.resource {
                    crate::Resource::Source(resource) => PlacedSource {
                        resource,
                        sink: Some(SinkAddress {
                            url: "http://broker/team/default".into(),
                            uri: "http://10.0.0.1/team/default".into(),
                            host: None,
                        }),
                        problem: None,
                    },
                    other => panic!("{other:?}"),
                })
                .collect(),
        };
        let line = serde_json::to_string(&snapshot).expect("serializes");
        let back: SourcesSnapshot = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, snapshot);
        assert_eq!(back.sources[1].resource.kind(), queues::NATS_KIND);

        let unknown = serde_json::from_str::<SourcesSnapshot>(
            r#"{"sources":[{"resource":{"apiVersion":"v1","kind":"Pod"}}]}"#,
        )
        .expect_err("not a source");
        assert!(
            unknown
                .to_string()
                .contains("Pod (v1) is not a source kind"),
            "{unknown}"
        );
        let bad = serde_json::from_str::<SourcesSnapshot>(
            r#"{"sources":[{"resource":{"apiVersion":"sources.knative.dev/v1","kind":"PingSource","spec":{"sink":{},"colour":1}}}]}"#,
        )
        .expect_err("an unknown field");
        assert!(bad.to_string().contains("colour"), "{bad}");
    }
}
