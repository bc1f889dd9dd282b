//! The admin API's JSON shapes, shared by the server in `mecha up` and the CLI client.

use autoscaler::ScalingStatus;
use autoscaler::supervisor::ReplicaStatus;
use serde::{Deserialize, Serialize};

use crate::store::Outcome;

/// `POST /api/v1/apply` and `/api/v1/delete`: YAML files by path (for messages and the
/// working directory of relative commands) and content.
#[derive(Debug, Serialize, Deserialize)]
pub struct FilesRequest {
    pub files: Vec<FileContent>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileContent {
    pub path: String,
    pub content: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OutcomesResponse {
    pub results: Vec<Outcome>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorsResponse {
    pub errors: Vec<String>,
}

/// `GET /api/v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub url: String,
    pub latest_revision: Option<String>,
    pub latest_ready_revision: Option<String>,
    /// When its first revision was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Ready and desired replicas over all revisions that serve traffic.
    pub ready: u32,
    pub desired: u32,
    /// Whether the autoscaler of any serving revision is in panic mode.
    pub panicking: bool,
    /// `Ready`, `ConfigurationsReady`, `RoutesReady`, as Knative's.
    pub conditions: Vec<ConditionView>,
    /// One entry per traffic target, as Knative's `status.traffic`: percents add up to 100.
    pub traffic: Vec<TrafficView>,
    /// Newest first.
    pub revisions: Vec<RevisionView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficView {
    pub revision: String,
    pub percent: u32,
    /// The entry follows the newest ready revision.
    #[serde(default)]
    pub latest_revision: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionView {
    pub name: String,
    pub generation: u32,
    /// When it was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Knative's Ready condition: it has served at least once.
    pub ready: bool,
    /// `initial-scale: 0` and no request yet: nothing runs until one arrives.
    #[serde(default)]
    pub waiting_for_request: bool,
    /// Why it is failing (`CrashLoop: …`), while it is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its share of the service's main route, in percent.
    pub traffic: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `Ready`, `ContainerHealthy`, `Active`, as Knative's.
    pub conditions: Vec<ConditionView>,
    /// The gateway's routes send it requests now (its traffic share or a tag took effect).
    #[serde(default)]
    pub routed: bool,
    pub desired: u32,
    pub replicas: Vec<ReplicaStatus>,
    /// The autoscaler's last decision for the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<ScalingStatus>,
}

/// `GET /api/v1/brokers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerView {
    pub namespace: String,
    pub name: String,
    /// Where to post events.
    pub address: String,
    pub ready: bool,
    pub triggers: usize,
    /// Events in the log that at least one trigger has not handled yet.
    pub waiting_events: u64,
}

/// `GET /api/v1/triggers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerView {
    pub namespace: String,
    pub name: String,
    pub broker: String,
    pub subscriber_uri: Option<String>,
    pub ready: bool,
    /// Why the trigger is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /api/v1/sources`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Where its events go.
    pub sink_uri: Option<String>,
    /// Where a webhook source takes deliveries (register it with GitHub or GitLab).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub ready: bool,
    /// Why the source is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Events the sink accepted, and events given up on after every retry.
    pub sent: u64,
    pub failed: u64,
    /// The types and sources of the events it sends (Knative's `status.ceAttributes`).
    #[serde(default)]
    pub ce_attributes: Vec<crds::sources::CeAttributes>,
}

/// `GET /api/v1/version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionView {
    pub version: String,
}

impl VersionView {
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// `GET …/services/{name}/events`: one thing that happened to a replica or revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventView {
    /// RFC 3339.
    pub at: Option<String>,
    pub revision: String,
    /// `{replica or revision} {what}`, e.g. `hello-00001-1 ready in 212 ms`.
    pub message: String,
}

/// A Knative-style status condition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ConditionView {
    pub fn new(kind: &str, status: Option<bool>, reason: Option<(&str, String)>) -> Self {
        let (reason, message) = match reason {
            Some((reason, message)) => (Some(reason.to_string()), Some(message)),
            None => (None, None),
        };
        Self {
            kind: kind.to_string(),
            status: match status {
                Some(true) => "True",
                Some(false) => "False",
                None => "Unknown",
            }
            .to_string(),
            reason,
            message,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}
