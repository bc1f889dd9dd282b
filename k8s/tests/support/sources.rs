//! The event sources' scenarios against the scripted API server: their status from the
//! reconcilers, and the snapshot the importers read (`k8s::sources::run`). `tests/sources.rs`
//! runs each as a test; `tests/rbac.rs` runs them all ([`all`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use k8s::crd::{
    ApiServerSource, ContainerSource, GitHubSource, GitLabSource, MqttSource, NatsSource,
    PingSource, RedisStreamSource, SinkBinding, SourceStatus,
};
use k8s::sources::SinkSettings;
use k8s::state::Caches;
use kube::Resource;
use mecha_common::Shutdown;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::serving::{NAMESPACE, Reconcilers, condition};
use k8s_openapi::api::apps::v1::Deployment;

use super::{ApiServer, Recorded};

const BROKER_SINK: &str = "http://mecha-broker.mecha-system.svc/default/default";

fn object<K: DeserializeOwned>(api_version: &str, kind: &str, name: &str, spec: Value) -> K {
    serde_json::from_value(json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("a {kind}: {e}"))
}

fn broker_sink() -> Value {
    json!({ "ref": { "apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "default" } })
}

/// Creates a `K` and waits for its status to be `Ready` as `ready` says.
async fn created<K>(server: &ApiServer, object: K, ready: &str) -> SourceStatus
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + HasStatus,
{
    let name = object.meta().name.clone().unwrap_or_default();
    server.create(&object);
    server
        .wait_for(&format!("{} {name} Ready={ready}", K::kind(&())), |s| {
            let status = s.get::<K>(NAMESPACE, &name)?.status()?;
            condition(&status.conditions, "Ready")
                .is_some_and(|c| c.status == ready)
                .then_some(status)
        })
        .await
}

/// The status of a source CRD (they all have the same).
pub trait HasStatus {
    fn status(self) -> Option<SourceStatus>;
}

macro_rules! has_status {
    ($($kind:ty),*) => {$(
        impl HasStatus for $kind {
            fn status(self) -> Option<SourceStatus> {
                self.status
            }
        }
    )*};
}

has_status!(
    PingSource,
    GitHubSource,
    GitLabSource,
    RedisStreamSource,
    NatsSource,
    MqttSource,
    ContainerSource,
    SinkBinding,
    ApiServerSource
);

/// Every kind gets its status: ready with its sink URI, the webhook sources their URL; a
/// source its validators refuse is `Ready=False` naming the field, as local mode says it.
pub async fn status(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    let v1 = "sources.knative.dev/v1";
    let alpha = "sources.knative.dev/v1alpha1";
    let mecha = "sources.mecha.dev/v1alpha1";

    let ping = created(
        &server,
        object::<PingSource>(
            v1,
            "PingSource",
            "tick",
            json!({ "schedule": "*/5 * * * * *", "sink": broker_sink() }),
        ),
        "True",
    )
    .await;
    assert_eq!(ping.sink_uri.as_deref(), Some(BROKER_SINK));
    assert_eq!(ping.ce_attributes[0].type_, "dev.knative.sources.ping");
    assert_eq!(
        ping.ce_attributes[0].source,
        "/apis/v1/namespaces/default/pingsources/tick"
    );

    let bad = created(
        &server,
        object::<PingSource>(
            v1,
            "PingSource",
            "bad",
            json!({ "schedule": "@every 1m", "sink": broker_sink() }),
        ),
        "False",
    )
    .await;
    let ready = condition(&bad.conditions, "Ready").expect("Ready");
    assert_eq!(ready.reason.as_deref(), Some("InvalidSpec"));
    assert!(
        ready
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("spec.schedule"),
        "{ready:?}"
    );

    let secret = json!({ "secretKeyRef": { "name": "hook", "key": "secret" } });
    let github = created(
        &server,
        object::<GitHubSource>(
            alpha,
            "GitHubSource",
            "repo",
            json!({
                "ownerAndRepository": "octo/hello", "eventTypes": ["push"],
                "secretToken": secret, "sink": broker_sink(),
            }),
        ),
        "True",
    )
    .await;
    assert_eq!(
        github.url.as_deref(),
        Some("http://mecha-importers.mecha-system.svc/webhooks/github/default/repo")
    );
    created(
        &server,
        object::<GitLabSource>(
            alpha,
            "GitLabSource",
            "project",
            json!({
                "projectUrl": "https://gitlab.com/group/project", "eventTypes": ["push_events"],
                "secretToken": secret, "sink": broker_sink(),
            }),
        ),
        "True",
    )
    .await;
    created(
        &server,
        object::<RedisStreamSource>(
            alpha,
            "RedisStreamSource",
            "stream",
            json!({
                "address": "redis://redis.default.svc:6379", "stream": "orders", "group": "mecha",
                "sink": broker_sink(),
            }),
        ),
        "True",
    )
    .await;
    created(
        &server,
        object::<NatsSource>(
            mecha,
            "NatsSource",
            "nats",
            json!({
                "url": "nats://nats.nats.svc:4222", "subject": "orders", "sink": broker_sink(),
            }),
        ),
        "True",
    )
    .await;
    created(
        &server,
        object::<MqttSource>(
            mecha,
            "MqttSource",
            "mqtt",
            json!({
                "brokerUrl": "mqtt://mosquitto.default.svc:1883", "topics": ["sensors/#"],
                "sink": broker_sink(),
            }),
        ),
        "True",
    )
    .await;
    let service_sink = json!({ "ref": { "apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "fn" } });
    let container = created(
        &server,
        object::<ContainerSource>(
            v1,
            "ContainerSource",
            "heartbeat",
            json!({
                "template": { "spec": { "containers": [{ "image": "example.com/heartbeat:1" }] } },
                "sink": service_sink,
            }),
        ),
        "True",
    )
    .await;
    assert_eq!(
        container.sink_uri.as_deref(),
        Some("http://fn.default.svc.cluster.local/")
    );
    created(
        &server,
        object::<SinkBinding>(v1, "SinkBinding", "bind", json!({
            "subject": { "apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "fn" },
            "sink": broker_sink(),
        })),
        "True",
    )
    .await;
    // An ApiServerSource is ready once its adapter is available too (see `api_server_source`).
    script_access_reviews(&server, Arc::new(|_: &Value| None::<String>));
    let changes = created(
        &server,
        object::<ApiServerSource>(
            v1,
            "ApiServerSource",
            "changes",
            json!({
                "resources": [{ "apiVersion": "serving.knative.dev/v1", "kind": "Service" }],
                "sink": broker_sink(),
            }),
        ),
        "Unknown",
    )
    .await;
    assert_eq!(
        changes.ce_attributes[0].type_,
        "dev.knative.apiserver.ref.add"
    );
    assert_eq!(
        changes.ce_attributes[0].source,
        "https://kubernetes.default.svc"
    );
    reconcilers.stop().await;
}

/// Decides a `SubjectAccessReview`: `None` allows, `Some(reason)` denies.
pub type Reviewer = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;

/// Answers `SubjectAccessReview`s with `review` (given the review's spec).
pub fn script_access_reviews(server: &ApiServer, review: Reviewer) {
    server.on(
        "create",
        "subjectaccessreviews",
        Arc::new(move |request: &Recorded| {
            let spec = request.body.0.get("spec").cloned().unwrap_or_default();
            let denied = review(&spec);
            let mut answer = request.body.0.clone();
            answer["status"] = json!({
                "allowed": denied.is_none(),
                "reason": denied.unwrap_or_else(|| "RBAC: allowed".into()),
            });
            (201, answer)
        }),
    );
}

/// An ApiServerSource in a cluster: its `namespaceSelector` resolved by listing namespaces,
/// its service account's access reviewed per (verb, resource, namespace) — denied, it is
/// `SufficientPermissions=False` naming what, and no adapter runs; allowed, its adapter
/// Deployment runs under that account with `K_SINK`, `K_CE_OVERRIDES` and `K_SOURCE_CONFIG`,
/// `Deployed` follows the Deployment's `Available`, and deleting the source deletes it.
pub async fn api_server_source(server: ApiServer) {
    use k8s::apiserver::AdapterConfig;
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
    use k8s_openapi::api::core::v1::Namespace;
    use std::sync::atomic::{AtomicBool, Ordering};

    for (name, team) in [("team-a", "blue"), ("team-b", "blue"), ("other", "red")] {
        server.create(
            &serde_json::from_value::<Namespace>(json!({
                "metadata": { "name": name, "labels": { "team": team } },
            }))
            .expect("a Namespace"),
        );
    }
    let deny = Arc::new(AtomicBool::new(true));
    let denying = deny.clone();
    script_access_reviews(
        &server,
        Arc::new(move |spec: &Value| {
            let attributes = &spec["resourceAttributes"];
            (denying.load(Ordering::SeqCst)
                && attributes["resource"] == "networkpolicies"
                && attributes["namespace"] == "team-b"
                && attributes["verb"] == "watch")
                .then(|| "no RBAC policy matched".to_string())
        }),
    );
    let reconcilers = Reconcilers::start(&server);
    let source = object::<ApiServerSource>(
        "sources.knative.dev/v1",
        "ApiServerSource",
        "policies",
        json!({
            "resources": [
                { "apiVersion": "v1", "kind": "Pod",
                  "selector": { "matchExpressions": [{ "key": "app", "operator": "In", "values": ["web"] }] } },
                { "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy" },
            ],
            "owner": { "apiVersion": "apps/v1", "kind": "ReplicaSet" },
            "mode": "Resource",
            "serviceAccountName": "watcher",
            "namespaceSelector": { "matchLabels": { "team": "blue" } },
            "ceOverrides": { "extensions": { "team": "blue" } },
            "sink": broker_sink(),
        }),
    );
    server.create(&source);

    // Denied: named, and no adapter.
    let status = server
        .wait_for(
            "ApiServerSource policies SufficientPermissions=False",
            |s| {
                let status = s.get::<ApiServerSource>(NAMESPACE, "policies")?.status?;
                condition(&status.conditions, "SufficientPermissions")
                    .is_some_and(|c| c.status == "False")
                    .then_some(status)
            },
        )
        .await;
    let permissions = condition(&status.conditions, "SufficientPermissions").expect("condition");
    assert_eq!(
        permissions.reason.as_deref(),
        Some("InsufficientPermissions")
    );
    let message = permissions.message.clone().unwrap_or_default();
    assert!(
        message.contains(
            "service account default/watcher may not watch networkpolicies.networking.k8s.io in namespace team-b"
        ),
        "{message}"
    );
    let ready = condition(&status.conditions, "Ready").expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("InsufficientPermissions"))
    );
    assert_eq!(
        condition(&status.conditions, "SinkProvided").map(|c| c.status.as_str()),
        Some("True")
    );
    assert!(
        server
            .get::<Deployment>(NAMESPACE, "apiserversource-policies")
            .is_none()
    );
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.verb == "list" && r.resource == "namespaces"),
        "the namespaces were listed"
    );
    let reviews: Vec<&Value> = requests
        .iter()
        .filter(|r| r.verb == "create" && r.resource == "subjectaccessreviews")
        .map(|r| &r.body.0)
        .collect();
    assert!(!reviews.is_empty());
    assert_eq!(
        reviews[0]["spec"]["user"],
        "system:serviceaccount:default:watcher"
    );
    let reviewed: std::collections::BTreeSet<String> = reviews
        .iter()
        .map(|r| {
            let a = &r["spec"]["resourceAttributes"];
            format!(
                "{} {} {}",
                a["verb"].as_str().unwrap_or_default(),
                a["resource"].as_str().unwrap_or_default(),
                a["namespace"].as_str().unwrap_or_default()
            )
        })
        .collect();
    for wanted in ["get pods team-a", "list pods team-b", "watch pods team-a"] {
        assert!(reviewed.contains(wanted), "{wanted} in {reviewed:?}");
    }
    assert!(
        !reviewed.iter().any(|r| r.ends_with(" other")),
        "the red namespace is not watched: {reviewed:?}"
    );

    // Allowed (the user granted the role): the adapter runs as the account.
    deny.store(false, Ordering::SeqCst);
    server.update::<ApiServerSource>(NAMESPACE, "policies", |s| {
        s.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("granted".into(), "yes".into());
    });
    let deployment = owned_deployment(
        &server,
        "apiserversource-policies",
        ("ApiServerSource", "policies"),
    )
    .await;
    let pod = deployment.spec.as_ref().expect("spec").template.clone();
    let pod = pod.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("watcher"));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("mecha/autoscaler"));
    assert_eq!(
        container.command.as_deref(),
        Some(&["/usr/local/bin/apiserver-adapter".to_string()][..])
    );
    let env: std::collections::BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["K_SINK"], BROKER_SINK);
    assert_eq!(env["K_CE_OVERRIDES"], r#"{"extensions":{"team":"blue"}}"#);
    let config = AdapterConfig::parse(&env["K_SOURCE_CONFIG"]).expect("a valid config");
    assert_eq!(config.namespaces, ["team-a", "team-b"]);
    assert!(!config.all_namespaces);
    assert!(config.resource_mode());
    assert_eq!(
        config.owner.as_ref().map(|o| o.kind.as_str()),
        Some("ReplicaSet")
    );
    assert_eq!(config.resources.len(), 2);
    let status = server
        .wait_for(
            "ApiServerSource policies SufficientPermissions=True, Deployed=Unknown",
            |s| {
                let status = s.get::<ApiServerSource>(NAMESPACE, "policies")?.status?;
                let is = |type_: &str, state: &str| {
                    condition(&status.conditions, type_).is_some_and(|c| c.status == state)
                };
                (is("SufficientPermissions", "True") && is("Deployed", "Unknown"))
                    .then_some(status.clone())
            },
        )
        .await;
    assert_eq!(
        condition(&status.conditions, "Deployed").and_then(|c| c.reason.as_deref()),
        Some("DeploymentUnavailable")
    );
    assert_eq!(
        condition(&status.conditions, "Ready").map(|c| c.status.as_str()),
        Some("Unknown")
    );

    // The adapter becomes available: the reconciler follows its Deployment.
    server.update::<Deployment>(NAMESPACE, "apiserversource-policies", |d| {
        d.status = Some(DeploymentStatus {
            conditions: Some(vec![DeploymentCondition {
                type_: "Available".into(),
                status: "True".into(),
                ..DeploymentCondition::default()
            }]),
            ..DeploymentStatus::default()
        });
    });
    created_ready(&server, "policies").await;

    assert!(server.delete::<ApiServerSource>(NAMESPACE, "policies"));
    assert!(
        server
            .get::<Deployment>(NAMESPACE, "apiserversource-policies")
            .is_none()
    );

    // A kind the API server does not serve: named, and no adapter.
    server.create(&object::<ApiServerSource>(
        "sources.knative.dev/v1",
        "ApiServerSource",
        "widgets",
        json!({
            "resources": [{ "apiVersion": "example.com/v1", "kind": "Widget" }],
            "sink": broker_sink(),
        }),
    ));
    let status = server
        .wait_for("ApiServerSource widgets SufficientPermissions=False", |s| {
            let status = s.get::<ApiServerSource>(NAMESPACE, "widgets")?.status?;
            condition(&status.conditions, "SufficientPermissions")
                .is_some_and(|c| c.status == "False")
                .then_some(status)
        })
        .await;
    let missing = condition(&status.conditions, "SufficientPermissions").expect("condition");
    assert_eq!(missing.reason.as_deref(), Some("ResourceNotFound"));
    assert!(
        missing
            .message
            .as_deref()
            .unwrap_or_default()
            .starts_with("spec.resources[0]: Widget (example.com/v1) is not served"),
        "{missing:?}"
    );
    assert!(
        server
            .get::<Deployment>(NAMESPACE, "apiserversource-widgets")
            .is_none()
    );
    reconcilers.stop().await;
}

/// Waits for the ApiServerSource `name` to be `Ready=True` with every condition `True`.
async fn created_ready(server: &ApiServer, name: &str) {
    let status = server
        .wait_for(&format!("ApiServerSource {name} Ready=True"), |s| {
            let status = s.get::<ApiServerSource>(NAMESPACE, name)?.status?;
            condition(&status.conditions, "Ready")
                .is_some_and(|c| c.status == "True")
                .then_some(status)
        })
        .await;
    for type_ in ["SinkProvided", "Deployed", "SufficientPermissions"] {
        assert_eq!(
            condition(&status.conditions, type_).map(|c| c.status.as_str()),
            Some("True"),
            "{type_}: {status:?}"
        );
    }
}

/// The importers' snapshot: every valid source with its resolved sink, a refused one left
/// out, a deleted one gone.
pub async fn snapshot(server: ApiServer) {
    let shutdown = Shutdown::new();
    let (tx, mut rx) = watch::channel(Arc::new(crds::sources::SourcesSnapshot::default()));
    let caches = Caches::default();
    let task = tokio::spawn(k8s::sources::run(
        server.client(),
        tx,
        SinkSettings::default(),
        caches.clone(),
        shutdown.signal(),
    ));
    server.create(&object::<PingSource>(
        "sources.knative.dev/v1",
        "PingSource",
        "tick",
        json!({ "sink": broker_sink() }),
    ));
    server.create(&object::<PingSource>(
        "sources.knative.dev/v1",
        "PingSource",
        "bad",
        json!({ "timezone": "Mars/Olympus", "sink": broker_sink() }),
    ));
    server.create(&object::<NatsSource>(
        "sources.mecha.dev/v1alpha1",
        "NatsSource",
        "nats",
        json!({ "url": "nats://nats.nats.svc:4222", "subject": "orders", "sink": { "uri": "http://example.com/in" } }),
    ));
    let names = |snapshot: &crds::sources::SourcesSnapshot| -> Vec<String> {
        snapshot
            .sources
            .iter()
            .map(|p| format!("{} {}", p.resource.kind(), p.resource.name()))
            .collect()
    };
    let snapshot = tokio::time::timeout(super::WAIT, rx.wait_for(|s| s.sources.len() == 2))
        .await
        .expect("the snapshot within the wait")
        .expect("the channel")
        .clone();
    assert_eq!(names(&snapshot), ["NatsSource nats", "PingSource tick"]);
    assert!(caches.synced());
    let ping = &snapshot.sources[1];
    assert_eq!(
        ping.sink.as_ref().map(|s| s.uri.as_str()),
        Some(BROKER_SINK)
    );
    assert_eq!(
        snapshot.sources[0].sink.as_ref().map(|s| s.url.as_str()),
        Some("http://example.com/in")
    );
    assert!(server.delete::<PingSource>(NAMESPACE, "tick"));
    let snapshot = tokio::time::timeout(super::WAIT, rx.wait_for(|s| s.sources.len() == 1))
        .await
        .expect("the deletion within the wait")
        .expect("the channel")
        .clone();
    assert_eq!(names(&snapshot), ["NatsSource nats"]);
    shutdown.trigger();
    task.await.expect("run returns on shutdown");
}

/// A ContainerSource runs as a Deployment of its own with `K_SINK` and `K_CE_OVERRIDES`,
/// owned by the source: deleting the source deletes it.
pub async fn container_source(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    let source = object::<ContainerSource>(
        "sources.knative.dev/v1",
        "ContainerSource",
        "heartbeat",
        json!({
            "template": {
                "metadata": { "labels": { "app": "heartbeat" } },
                "spec": { "containers": [{
                    "image": "example.com/heartbeat:1",
                    "args": ["--period", "5"],
                    "env": [{ "name": "POD", "value": "x" }],
                }] },
            },
            "ceOverrides": { "extensions": { "team": "blue" } },
            "sink": broker_sink(),
        }),
    );
    server.create(&source);
    let deployment = owned_deployment(
        &server,
        "heartbeat-deployment",
        ("ContainerSource", "heartbeat"),
    )
    .await;
    let pod = deployment.spec.as_ref().expect("spec").template.clone();
    let labels = pod.metadata.and_then(|m| m.labels).unwrap_or_default();
    assert_eq!(labels.get("app").map(String::as_str), Some("heartbeat"));
    let container = &pod.spec.expect("pod spec").containers[0];
    assert_eq!(container.image.as_deref(), Some("example.com/heartbeat:1"));
    assert_eq!(
        container.args.as_deref(),
        Some(&["--period".to_string(), "5".to_string()][..])
    );
    let env: std::collections::BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["K_SINK"], BROKER_SINK);
    assert_eq!(env["K_CE_OVERRIDES"], r#"{"extensions":{"team":"blue"}}"#);
    assert_eq!(env["POD"], "x");
    let status = server
        .wait_for("ContainerSource heartbeat ready", |s| {
            let status = s.get::<ContainerSource>(NAMESPACE, "heartbeat")?.status?;
            status.sink_uri.is_some().then_some(status)
        })
        .await;
    assert_eq!(status.sink_uri.as_deref(), Some(BROKER_SINK));

    assert!(server.delete::<ContainerSource>(NAMESPACE, "heartbeat"));
    assert!(
        server
            .get::<Deployment>(NAMESPACE, "heartbeat-deployment")
            .is_none()
    );
    reconcilers.stop().await;
}

/// The user container's environment of a revision's Deployment, once it exists.
fn user_env(
    server: &ApiServer,
    deployment: &str,
) -> Option<std::collections::BTreeMap<String, String>> {
    let deployment = server.get::<Deployment>(NAMESPACE, deployment)?;
    let pod = deployment.spec?.template.spec?;
    let user = pod
        .containers
        .iter()
        .find(|c| c.name != k8s::desired::SIDECAR_NAME)?;
    Some(
        user.env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect(),
    )
}

/// A SinkBinding selecting a Knative Service by its labels puts `K_SINK` and
/// `K_CE_OVERRIDES` into its revision's Deployment (not into a Service it does not select,
/// nor into the sidecar), and takes them out again when it is deleted.
pub async fn sink_binding(server: ApiServer) {
    use k8s::crd::Service;
    let reconcilers = Reconcilers::start(&server);
    server.create(&object::<SinkBinding>(
        "sources.knative.dev/v1",
        "SinkBinding",
        "bind",
        json!({
            "subject": {
                "apiVersion": "serving.knative.dev/v1", "kind": "Service",
                "selector": { "matchLabels": { "team": "blue" } },
            },
            "ceOverrides": { "extensions": { "team": "blue" } },
            "sink": broker_sink(),
        }),
    ));
    let mut bound = super::serving::hello();
    bound.metadata.labels = Some([("team".to_string(), "blue".to_string())].into());
    server.create(&bound);
    let mut other = super::serving::hello();
    other.metadata.name = Some("other".into());
    server.create(&other);

    let env = server
        .wait_for("hello's Deployment with K_SINK", |s| {
            user_env(s, "hello-00001-deployment").filter(|env| env.contains_key("K_SINK"))
        })
        .await;
    assert_eq!(env["K_SINK"], BROKER_SINK);
    assert_eq!(env["K_CE_OVERRIDES"], r#"{"extensions":{"team":"blue"}}"#);
    assert_eq!(env["TARGET"], "blue", "the container's own variables stay");
    let other_env = server
        .wait_for("other's Deployment", |s| {
            user_env(s, "other-00001-deployment")
        })
        .await;
    assert!(!other_env.contains_key("K_SINK"), "{other_env:?}");

    assert!(server.delete::<SinkBinding>(NAMESPACE, "bind"));
    let env = server
        .wait_for("hello's Deployment without K_SINK", |s| {
            user_env(s, "hello-00001-deployment").filter(|env| !env.contains_key("K_SINK"))
        })
        .await;
    assert_eq!(env["TARGET"], "blue");
    let _ = server
        .get::<Service>(NAMESPACE, "hello")
        .expect("hello stays");
    reconcilers.stop().await;
}

type Scenario = fn(ApiServer) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every scenario above, by name.
pub const ALL: &[(&str, Scenario)] = &[
    ("source_status", |s| Box::pin(status(s))),
    ("source_snapshot", |s| Box::pin(snapshot(s))),
    ("container_source", |s| Box::pin(container_source(s))),
    ("sink_binding", |s| Box::pin(sink_binding(s))),
    ("api_server_source", |s| Box::pin(api_server_source(s))),
];

/// Runs every scenario on a server of its own; the requests they made, by scenario.
pub async fn all() -> Vec<(&'static str, Vec<Recorded>)> {
    let mut recorded = Vec::new();
    for (name, scenario) in ALL {
        let server = ApiServer::new();
        scenario(server.clone()).await;
        recorded.push((*name, server.requests()));
    }
    recorded
}

/// Waits for the Deployment `name` a source made, and checks that the source (`kind`, `source`)
/// controls it.
async fn owned_deployment(
    server: &ApiServer,
    name: &str,
    (kind, source): (&str, &str),
) -> Deployment {
    let deployment = server
        .wait_for(&format!("Deployment {name}"), |s| {
            s.get::<Deployment>(NAMESPACE, name)
        })
        .await;
    let owner = &deployment
        .metadata
        .owner_references
        .as_ref()
        .expect("an owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        (kind, source, Some(true))
    );
    deployment
}
