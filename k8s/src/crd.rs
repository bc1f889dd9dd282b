//! Knative's kinds as Kubernetes custom resources: `serving.knative.dev/v1` `Service` and
//! `Revision`, `eventing.knative.dev/v1` `Broker` and `Trigger`.
//!
//! Each spec wraps the `crds` crate's type (`#[serde(transparent)]`), so every field has one
//! definition, one set of defaults and one validator, in local mode and in a cluster alike.
//! The status types are Knative's, so `kubectl get ksvc` reads as it does with Knative.
#![allow(
    clippy::duplicated_attributes,
    reason = "every #[kube(printcolumn(..))] repeats the keys `type_` and `json_path` by design"
)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `serving.knative.dev/v1` `Service`'s spec: `crds::serving::ServiceSpec` as written.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "serving.knative.dev",
    version = "v1",
    kind = "Service",
    derive = "PartialEq",
    doc = "A Knative Service: a function that scales with its traffic, revisioned on every template change.",
    namespaced,
    status = "ServiceStatus",
    shortname = "ksvc",
    shortname = "kservice",
    category = "all",
    category = "knative",
    category = "serving",
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(
        name = "LatestCreated",
        type_ = "string",
        json_path = ".status.latestCreatedRevisionName"
    ),
    printcolumn(
        name = "LatestReady",
        type_ = "string",
        json_path = ".status.latestReadyRevisionName"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].reason"
    )
)]
pub struct ServiceSpec(pub crds::serving::ServiceSpec);

/// `serving.knative.dev/v1` `Revision`'s spec: the Service's `spec.template.spec` at the time
/// the Revision was made (immutable).
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "serving.knative.dev",
    version = "v1",
    kind = "Revision",
    derive = "PartialEq",
    doc = "An immutable snapshot of a Service's template, run as a Deployment with the Mecha sidecar.",
    namespaced,
    status = "RevisionStatus",
    shortname = "rev",
    category = "all",
    category = "knative",
    category = "serving",
    printcolumn(
        name = "Config Name",
        type_ = "string",
        json_path = ".metadata.labels['serving\\.knative\\.dev/configuration']"
    ),
    printcolumn(
        name = "Generation",
        type_ = "string",
        json_path = ".metadata.labels['serving\\.knative\\.dev/configurationGeneration']"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].reason"
    ),
    printcolumn(
        name = "Actual Replicas",
        type_ = "integer",
        json_path = ".status.actualReplicas"
    ),
    printcolumn(
        name = "Desired Replicas",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    )
)]
pub struct RevisionSpec(pub crds::serving::RevisionSpec);

/// `eventing.knative.dev/v1` `Broker`'s spec.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "eventing.knative.dev",
    version = "v1",
    kind = "Broker",
    derive = "PartialEq",
    doc = "An address for CloudEvents, stored durably and delivered to the triggers that match.",
    namespaced,
    status = "BrokerStatus",
    category = "all",
    category = "knative",
    category = "eventing",
    printcolumn(name = "URL", type_ = "string", json_path = ".status.address.url"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].reason"
    )
)]
pub struct BrokerSpec(pub crds::eventing::BrokerSpec);

/// `eventing.knative.dev/v1` `Trigger`'s spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[kube(
    group = "eventing.knative.dev",
    version = "v1",
    kind = "Trigger",
    derive = "PartialEq",
    doc = "Delivers the events of a broker that pass its filters to a subscriber.",
    namespaced,
    status = "TriggerStatus",
    category = "all",
    category = "knative",
    category = "eventing",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.broker"),
    printcolumn(
        name = "Subscriber_URI",
        type_ = "string",
        json_path = ".status.subscriberUri"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type=='Ready')].reason"
    )
)]
pub struct TriggerSpec(pub crds::eventing::TriggerSpec);

/// Knative's condition (`knative.dev/pkg/apis.Condition`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `ConfigurationsReady`, `RoutesReady`, `ContainerHealthy`, …
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Empty for conditions that decide readiness; `Warning` or `Info` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// One CamelCase word for machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For people: what is wrong, naming the field when a field is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An address (`duckv1.Addressable`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Addressable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_created_revision_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_ready_revision_name: Option<String>,
    /// The traffic as resolved: revision names filled in, tags with their URLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficStatus>,
}

/// A resolved `spec.traffic` entry: the spec's fields plus the tag's URL.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficStatus {
    #[serde(flatten)]
    pub target: crds::serving::TrafficTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_uri: Option<String>,
}

/// One event source kind as a custom resource: its spec is the `crds` type (one definition,
/// one validator, local mode and cluster alike), its status Knative's `SourceStatus`.
macro_rules! source_crd {
    ($spec:ident, $inner:ty, $group:tt, $version:tt, $kind:tt, $doc:tt) => {
        #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(transparent)]
        #[kube(
                    group = $group,
                    version = $version,
                    kind = $kind,
                    derive = "PartialEq",
                    doc = $doc,
                    namespaced,
                    status = "SourceStatus",
                    category = "all",
                    category = "knative",
                    category = "sources",
                    printcolumn(name = "Sink", type_ = "string", json_path = ".status.sinkUri"),
                    printcolumn(
                        name = "Age",
                        type_ = "date",
                        json_path = ".metadata.creationTimestamp"
                    ),
                    printcolumn(
                        name = "Ready",
                        type_ = "string",
                        json_path = ".status.conditions[?(@.type=='Ready')].status"
                    ),
                    printcolumn(
                        name = "Reason",
                        type_ = "string",
                        json_path = ".status.conditions[?(@.type=='Ready')].reason"
                    )
                )]
        pub struct $spec(pub $inner);
    };
}

source_crd!(
    PingSourceSpec,
    crds::sources::PingSourceSpec,
    "sources.knative.dev",
    "v1",
    "PingSource",
    "Sends an event on a cron schedule, in a time zone, to a sink."
);
source_crd!(
    GitHubSourceSpec,
    crds::sources::GitHubSourceSpec,
    "sources.knative.dev",
    "v1alpha1",
    "GitHubSource",
    "A webhook receiver for one GitHub repository or organization, checked by its signature."
);
source_crd!(
    GitLabSourceSpec,
    crds::sources::GitLabSourceSpec,
    "sources.knative.dev",
    "v1alpha1",
    "GitLabSource",
    "A webhook receiver for one GitLab project, checked by its token."
);
source_crd!(
    RedisStreamSourceSpec,
    crds::queues::RedisStreamSourceSpec,
    "sources.knative.dev",
    "v1alpha1",
    "RedisStreamSource",
    "Reads a Redis stream with a consumer group; entries are acknowledged after the sink took them."
);
source_crd!(
    NatsSourceSpec,
    crds::queues::NatsSourceSpec,
    "sources.mecha.dev",
    "v1alpha1",
    "NatsSource",
    "Reads a NATS subject (core, or a JetStream durable consumer acknowledged after the sink)."
);
source_crd!(
    MqttSourceSpec,
    crds::queues::MqttSourceSpec,
    "sources.mecha.dev",
    "v1alpha1",
    "MqttSource",
    "Subscribes to MQTT topic filters at QoS 1; messages are acknowledged after the sink took them."
);
source_crd!(
    ContainerSourceSpec,
    crds::bindings::ContainerSourceSpec,
    "sources.knative.dev",
    "v1",
    "ContainerSource",
    "Runs a container told where to send its events (K_SINK, K_CE_OVERRIDES)."
);
source_crd!(
    SinkBindingSpec,
    crds::bindings::SinkBindingSpec,
    "sources.knative.dev",
    "v1",
    "SinkBinding",
    "Gives the workloads it selects K_SINK and K_CE_OVERRIDES."
);
source_crd!(
    ApiServerSourceSpec,
    crds::apiserver::ApiServerSourceSpec,
    "sources.knative.dev",
    "v1",
    "ApiServerSource",
    "Sends an event for each change of the resources it watches."
);

/// Knative's `duckv1.SourceStatus`, and a webhook source's address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where the events go, resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_uri: Option<String>,
    /// The types and sources of the events the source sends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ce_attributes: Vec<CloudEventAttributes>,
    /// GitHubSource and GitLabSource: where the provider posts deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Knative's `duckv1.CloudEventAttributes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEventAttributes {
    #[serde(rename = "type")]
    pub type_: String,
    pub source: String,
}
