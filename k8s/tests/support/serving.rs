//! The serving reconcilers' scenarios against the scripted API server. `tests/reconcile.rs`
//! runs each as a test; `tests/rbac.rs` runs them all ([`all`]) and checks every request they
//! made against the ClusterRole in `deploy/base/rbac.yaml`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s::crd::{Condition, Revision, Service};
use k8s::reconcile::{Metrics, Retry, ServingSettings};
use k8s::{Broker, Trigger};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::Service as KubeService;
use kube::ResourceExt;
use mecha_common::Shutdown;
use serde_json::Value;

use super::{ApiServer, Recorded};

pub const NAMESPACE: &str = "default";

/// The reconcilers running against a scripted API server.
#[derive(Debug)]
pub struct Reconcilers {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
    pub metrics: Metrics,
}

// === impl Reconcilers ===

impl Reconcilers {
    /// Starts [`k8s::reconcile::run`] on `server`'s client, retrying failures after 20 ms.
    pub fn start(server: &ApiServer) -> Self {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics register once");
        let mut settings = ServingSettings::new(pod_settings());
        settings.retry = Retry {
            first: Duration::from_millis(20),
            max: Duration::from_millis(500),
        };
        let shutdown = Shutdown::new();
        let task = tokio::spawn(k8s::reconcile::run(
            server.client(),
            settings,
            metrics.clone(),
            shutdown.signal(),
        ));
        Self {
            shutdown,
            task,
            metrics,
        }
    }

    /// Asks the reconcilers to stop and waits until `run` has returned.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(super::WAIT, self.task)
            .await
            .expect("run returns once shutdown fires")
            .expect("run does not panic");
    }
}

pub fn pod_settings() -> k8s::desired::PodSettings {
    k8s::desired::PodSettings {
        sidecar_image: "mecha/activator-sidecar:test".into(),
        autoscaler_addr: "mecha-autoscaler.mecha-system.svc:8080".into(),
        sidecar_requests: BTreeMap::from([("cpu".into(), "25m".into())]),
        mesh_no_proxy: Vec::new(),
    }
}

/// The Service `hello` in `default`, as a user writes it.
pub fn hello() -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": "hello", "namespace": NAMESPACE },
        "spec": {
            "template": {
                "spec": {
                    "containers": [{
                        "image": "ghcr.io/example/hello:1.0",
                        "env": [{ "name": "TARGET", "value": "blue" }],
                    }],
                },
            },
        },
    }))
    .expect("a Service")
}

/// The condition `type_` of a status's conditions.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn is(conditions: &[Condition], type_: &str, status: &str) -> bool {
    condition(conditions, type_).is_some_and(|c| c.status == status)
}

fn service_conditions(server: &ApiServer, name: &str) -> Vec<Condition> {
    server
        .get::<Service>(NAMESPACE, name)
        .and_then(|s| s.status)
        .map(|s| s.conditions)
        .unwrap_or_default()
}

fn revision_conditions(server: &ApiServer, name: &str) -> Vec<Condition> {
    server
        .get::<Revision>(NAMESPACE, name)
        .and_then(|s| s.status)
        .map(|s| s.conditions)
        .unwrap_or_default()
}

/// Waits for `{revision}-deployment`, then plays the Deployment controller and the
/// autoscaler: one replica wanted (through `spec.replicas`, as the scale subresource sets
/// it) and ready.
pub async fn make_ready(server: &ApiServer, revision: &str) {
    let name = format!("{revision}-deployment");
    server
        .wait_for(&format!("Deployment {name}"), |s| {
            s.get::<Deployment>(NAMESPACE, &name)
        })
        .await;
    server.update::<Deployment>(NAMESPACE, &name, |d| {
        if let Some(spec) = d.spec.as_mut() {
            spec.replicas = Some(1);
        }
        d.status = Some(DeploymentStatus {
            replicas: Some(1),
            ready_replicas: Some(1),
            available_replicas: Some(1),
            ..DeploymentStatus::default()
        });
    });
    server
        .wait_for(&format!("Revision {revision} Ready"), |s| {
            is(&revision_conditions(s, revision), "Ready", "True").then_some(())
        })
        .await;
}

/// Creating a Service makes Revision `hello-00001`, its Deployment and headless Service,
/// each owned by its maker; once the Deployment is ready, both statuses say so, Knative's way.
pub async fn create(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    let service = server.create(&hello());

    let revision = server
        .wait_for("Revision hello-00001", |s| {
            s.get::<Revision>(NAMESPACE, "hello-00001")
        })
        .await;
    let owner = &revision.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Service", "hello", Some(true))
    );
    assert_eq!(Some(&owner.uid), service.uid().as_ref());
    assert_eq!(
        revision.labels()["serving.knative.dev/configurationGeneration"],
        "1"
    );

    let deployment = server
        .wait_for("Deployment hello-00001-deployment", |s| {
            s.get::<Deployment>(NAMESPACE, "hello-00001-deployment")
        })
        .await;
    let headless = server
        .wait_for("Service hello-00001", |s| {
            s.get::<KubeService>(NAMESPACE, "hello-00001")
        })
        .await;
    for owners in [deployment.owner_references(), headless.owner_references()] {
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (
                owners[0].kind.as_str(),
                owners[0].name.as_str(),
                owners[0].controller
            ),
            ("Revision", "hello-00001", Some(true))
        );
        assert_eq!(Some(&owners[0].uid), revision.uid().as_ref());
    }
    assert_eq!(
        headless.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    // The Knative Service's cluster-local name points at the gateway, owned by the Service.
    let cluster_local = server
        .wait_for("Service hello (ExternalName)", |s| {
            s.get::<KubeService>(NAMESPACE, "hello")
        })
        .await;
    assert_eq!(
        cluster_local
            .spec
            .as_ref()
            .and_then(|s| s.external_name.as_deref()),
        Some("mecha-gateway.mecha-system.svc.cluster.local")
    );
    assert_eq!(
        Some(&cluster_local.owner_references()[0].uid),
        service.uid().as_ref()
    );

    // Every write was a server-side apply by `mecha`, and no Deployment apply carried
    // `replicas`.
    for request in server.requests().iter().filter(|r| r.verb == "patch") {
        assert_eq!(
            request.field_manager.as_deref(),
            Some("mecha"),
            "{request:?}"
        );
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{request:?}"
        );
        if request.resource == "deployments" {
            assert_eq!(
                request.body.0.pointer("/spec/replicas"),
                None,
                "{request:?}"
            );
        }
    }
    // Before any pod is ready: not ready, and saying why.
    let waiting = server
        .wait_for("Service status with a latest created revision", |s| {
            s.get::<Service>(NAMESPACE, "hello")
                .and_then(|s| s.status)
                .filter(|st| st.latest_created_revision_name.is_some())
        })
        .await;
    assert_eq!(waiting.latest_ready_revision_name, None);
    assert!(is(&waiting.conditions, "Ready", "Unknown"), "{waiting:?}");

    make_ready(&server, "hello-00001").await;
    let status = server
        .wait_for("Service hello Ready", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            is(&status.conditions, "Ready", "True").then_some(status)
        })
        .await;
    assert_eq!(
        status.url.as_deref(),
        Some("http://hello.default.example.com")
    );
    assert_eq!(
        status.address.as_ref().and_then(|a| a.url.as_deref()),
        Some("http://hello.default.svc.cluster.local")
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.latest_created_revision_name.as_deref(),
        Some("hello-00001")
    );
    assert_eq!(
        status.latest_ready_revision_name.as_deref(),
        Some("hello-00001")
    );
    for type_ in ["Ready", "ConfigurationsReady", "RoutesReady"] {
        assert!(is(&status.conditions, type_, "True"), "{type_}: {status:?}");
    }
    let traffic: Vec<Value> = status
        .traffic
        .iter()
        .map(|t| serde_json::to_value(t).expect("json"))
        .collect();
    assert_eq!(
        traffic,
        [
            serde_json::json!({"revisionName": "hello-00001", "latestRevision": true, "percent": 100})
        ]
    );

    let revision = server
        .get::<Revision>(NAMESPACE, "hello-00001")
        .and_then(|r| r.status)
        .expect("revision status");
    for type_ in ["Ready", "ContainerHealthy", "ResourcesAvailable", "Active"] {
        assert!(
            is(&revision.conditions, type_, "True"),
            "{type_}: {revision:?}"
        );
    }
    assert_eq!(
        (revision.actual_replicas, revision.desired_replicas),
        (Some(1), Some(1))
    );

    // Scaled to zero by the autoscaler: still Ready, no longer Active.
    server.update::<Deployment>(NAMESPACE, "hello-00001-deployment", |d| {
        if let Some(spec) = d.spec.as_mut() {
            spec.replicas = Some(0);
        }
        d.status = Some(DeploymentStatus::default());
    });
    let idle = server
        .wait_for("Revision hello-00001 inactive", |s| {
            let status = s.get::<Revision>(NAMESPACE, "hello-00001")?.status?;
            is(&status.conditions, "Active", "False").then_some(status)
        })
        .await;
    assert!(is(&idle.conditions, "Ready", "True"), "{idle:?}");
    assert_eq!(
        condition(&idle.conditions, "Active").and_then(|c| c.reason.as_deref()),
        Some("NoTraffic")
    );
    assert_eq!(
        (idle.actual_replicas, idle.desired_replicas),
        (Some(0), Some(0))
    );
    // The reconciler did not take replicas back.
    let deployment = server
        .get::<Deployment>(NAMESPACE, "hello-00001-deployment")
        .expect("deployment");
    assert_eq!(deployment.spec.and_then(|s| s.replicas), Some(0));
    reconcilers.stop().await;
}

/// Changing `spec.template` makes `hello-00002`; the Service points at it once it is ready,
/// and serves the ready `hello-00001` until then.
pub async fn template_change(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    server.create(&hello());
    make_ready(&server, "hello-00001").await;

    server.update::<Service>(NAMESPACE, "hello", |s| {
        s.spec.0.template.spec.containers[0].env[0].value = "green".into();
    });
    let second = server
        .wait_for("Revision hello-00002", |s| {
            s.get::<Revision>(NAMESPACE, "hello-00002")
        })
        .await;
    assert_eq!(
        second.labels()["serving.knative.dev/configurationGeneration"],
        "2"
    );
    assert_eq!(second.spec.0.containers[0].env[0].value, "green");
    let first = server
        .get::<Revision>(NAMESPACE, "hello-00001")
        .expect("the first revision stays");
    assert_eq!(
        first.spec.0.containers[0].env[0].value, "blue",
        "revisions are immutable"
    );

    let status = server
        .wait_for("Service hello observing generation 2", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            (status.observed_generation == Some(2)
                && status.latest_created_revision_name.as_deref() == Some("hello-00002"))
            .then_some(status)
        })
        .await;
    assert_eq!(
        status.latest_ready_revision_name.as_deref(),
        Some("hello-00001")
    );
    assert_eq!(
        status.traffic[0].target.revision_name.as_deref(),
        Some("hello-00001"),
        "traffic stays on the ready revision"
    );
    assert!(
        is(&status.conditions, "ConfigurationsReady", "Unknown"),
        "{status:?}"
    );

    make_ready(&server, "hello-00002").await;
    let status = server
        .wait_for("Service hello on hello-00002", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            (status.latest_ready_revision_name.as_deref() == Some("hello-00002")
                && is(&status.conditions, "Ready", "True"))
            .then_some(status)
        })
        .await;
    assert_eq!(
        status.traffic[0].target.revision_name.as_deref(),
        Some("hello-00002")
    );
    assert_eq!(server.list::<Revision>().len(), 2);
    // Reconciling again makes nothing new.
    server.update::<Service>(NAMESPACE, "hello", |s| {
        s.metadata
            .annotations
            .get_or_insert_default()
            .insert("note".into(), "not the template".into());
    });
    server
        .wait_for("the annotated Service reconciled", |s| {
            let seen = s
                .requests()
                .iter()
                .filter(|r| r.resource == "revisions" && r.verb == "list")
                .count();
            (seen >= 3).then_some(())
        })
        .await;
    assert_eq!(
        server.list::<Revision>().len(),
        2,
        "metadata is not the template"
    );
    reconcilers.stop().await;
}

/// A 50/50 split between a pinned revision and the latest, each tagged: the status has both
/// with names resolved and tag URLs.
pub async fn traffic_split(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    server.create(&hello());
    make_ready(&server, "hello-00001").await;
    server.update::<Service>(NAMESPACE, "hello", |s| {
        s.spec.0.template.spec.containers[0].env[0].value = "green".into();
        s.spec.0.traffic = serde_json::from_value(serde_json::json!([
            { "revisionName": "hello-00001", "percent": 50, "tag": "blue" },
            { "latestRevision": true, "percent": 50, "tag": "green" },
        ]))
        .expect("traffic");
    });
    make_ready(&server, "hello-00002").await;
    let status = server
        .wait_for("Service hello split", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            (status.latest_ready_revision_name.as_deref() == Some("hello-00002")
                && is(&status.conditions, "RoutesReady", "True"))
            .then_some(status)
        })
        .await;
    let traffic: Vec<Value> = status
        .traffic
        .iter()
        .map(|t| serde_json::to_value(t).expect("json"))
        .collect();
    assert_eq!(
        traffic,
        [
            serde_json::json!({
                "revisionName": "hello-00001", "latestRevision": false, "percent": 50,
                "tag": "blue", "url": "http://blue-hello.default.example.com",
            }),
            serde_json::json!({
                "revisionName": "hello-00002", "latestRevision": true, "percent": 50,
                "tag": "green", "url": "http://green-hello.default.example.com",
            }),
        ]
    );
    assert!(is(&status.conditions, "Ready", "True"), "{status:?}");

    // Naming a revision that does not exist: RoutesReady and Ready are False, naming it.
    server.update::<Service>(NAMESPACE, "hello", |s| {
        s.spec.0.traffic[0].revision_name = Some("hello-00009".into());
    });
    let status = server
        .wait_for("Service hello with a missing revision", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            is(&status.conditions, "RoutesReady", "False").then_some(status)
        })
        .await;
    let ready = condition(&status.conditions, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason.as_deref(), Some("RevisionMissing"));
    assert!(
        ready
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("hello-00009"),
        "{ready:?}"
    );
    reconcilers.stop().await;
}

/// Deleting the Service deletes its Revisions and their Deployments and Services: the
/// garbage collector follows the owner references the reconcilers set.
pub async fn delete_cascades(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    server.create(&hello());
    make_ready(&server, "hello-00001").await;
    server
        .wait_for("Service hello-00001", |s| {
            s.get::<KubeService>(NAMESPACE, "hello-00001")
        })
        .await;

    assert!(server.delete::<Service>(NAMESPACE, "hello"));
    assert!(server.list::<Revision>().is_empty());
    assert!(server.list::<Deployment>().is_empty());
    assert!(server.list::<KubeService>().is_empty());
    // And the reconcilers, told of the deletions, make nothing again. Watch events come in
    // order, so once they have made another Service's objects they have seen the deletions.
    let mut other = hello();
    other.metadata.name = Some("other".into());
    server.create(&other);
    server
        .wait_for("Deployment other-00001-deployment", |s| {
            s.get::<Deployment>(NAMESPACE, "other-00001-deployment")
        })
        .await;
    reconcilers.stop().await;
    let revisions: Vec<String> = server
        .list::<Revision>()
        .iter()
        .map(|r| r.name_any())
        .collect();
    assert_eq!(revisions, ["other-00001"]);
    let deployments: Vec<String> = server
        .list::<Deployment>()
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(deployments, ["other-00001-deployment"]);
}

/// A 409 Conflict on applying the Deployment fails the Revision's reconcile: the status
/// says what failed, the failure is counted, and retries go on until one succeeds. Three
/// conflicts in a row: the first failure's status write wakes the reconciler once, the
/// status does not change after that, so the later retries come from the backoff alone.
pub async fn conflict_retried(server: ApiServer) {
    for _ in 0..3 {
        server.fail_next("patch", "deployments", None, 409);
    }
    // And the Service's first status write.
    server.fail_next("patch", "services", Some("status"), 409);
    let reconcilers = Reconcilers::start(&server);
    server.create(&hello());
    make_ready(&server, "hello-00001").await;
    assert_eq!(reconcilers.metrics.failures("Revision", "conflict"), 3);

    let requests = server.requests();
    let deployment_applies: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.resource == "deployments" && r.verb == "patch")
        .collect();
    assert!(
        deployment_applies.len() >= 2,
        "applied again after the conflict"
    );
    let reported = requests.iter().find(|r| {
        r.resource == "revisions"
            && r.subresource.as_deref() == Some("status")
            && r.body.0.to_string().contains("ReconcileFailed")
    });
    let reported = reported.expect("the failure was written into the Revision's status");
    let text = reported.body.0.to_string();
    assert!(
        text.contains("apply Deployment default/hello-00001-deployment"),
        "the status names the step and the object: {text}"
    );
    // Ready again once the retry went through.
    let status = server
        .get::<Revision>(NAMESPACE, "hello-00001")
        .and_then(|r| r.status)
        .expect("status");
    let ready = condition(&status.conditions, "Ready").expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("True", None)
    );
    server
        .wait_for("Service hello Ready after its status conflict", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            is(&status.conditions, "Ready", "True").then_some(())
        })
        .await;
    assert_eq!(reconcilers.metrics.failures("Service", "conflict"), 1);
    reconcilers.stop().await;
}

/// A user container that keeps exiting: the pods' status (watched through the revision label)
/// makes the Revision's `ContainerHealthy` `False` with its exit code, and the Service says the
/// latest revision failed.
pub async fn crash_loop(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    server.create(&hello());
    server
        .wait_for("Deployment hello-00001-deployment", |s| {
            s.get::<Deployment>(NAMESPACE, "hello-00001-deployment")
        })
        .await;
    // The kubelet's report on the Deployment's one pod.
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "hello-00001-deployment-7d9f-x2x", "namespace": NAMESPACE,
            "labels": { "serving.knative.dev/revision": "hello-00001" },
        },
        "status": { "containerStatuses": [{
            "name": "user-container", "ready": false, "restartCount": 2,
            "image": "ghcr.io/example/hello:1.0", "imageID": "",
            "state": { "waiting": { "reason": "CrashLoopBackOff" } },
            "lastState": { "terminated": { "exitCode": 2, "message": "no TARGET" } },
        }] },
    }))
    .expect("a Pod");
    server.create(&pod);

    let status = server
        .wait_for("Revision hello-00001 unhealthy", |s| {
            let status = s.get::<Revision>(NAMESPACE, "hello-00001")?.status?;
            is(&status.conditions, "ContainerHealthy", "False").then_some(status)
        })
        .await;
    let healthy = condition(&status.conditions, "ContainerHealthy").expect("ContainerHealthy");
    assert_eq!(healthy.reason.as_deref(), Some("ExitCode2"));
    assert_eq!(
        healthy.message.as_deref(),
        Some("Container failed with: no TARGET")
    );
    let service = server
        .wait_for("Service hello's configuration failed", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            is(&status.conditions, "ConfigurationsReady", "False").then_some(status)
        })
        .await;
    let configurations =
        condition(&service.conditions, "ConfigurationsReady").expect("ConfigurationsReady");
    assert_eq!(configurations.reason.as_deref(), Some("RevisionFailed"));
    assert!(
        configurations
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("no TARGET"),
        "{configurations:?}"
    );
    reconcilers.stop().await;
}

/// A watch that fails (the Service CRD not installed yet: 404 on the first LIST) is counted
/// and reported for readiness, and retried until it works.
pub async fn watch_fails(server: ApiServer) {
    server.fail_next("list", "services", None, 404);
    let reconcilers = Reconcilers::start(&server);
    let problem = server
        .wait_for("the failed watch reported", |_| {
            reconcilers.metrics.watch_problem()
        })
        .await;
    assert!(
        problem.starts_with("watching Services fails: "),
        "{problem}"
    );
    server.create(&hello());
    server
        .wait_for("Revision hello-00001 once the watch works", |s| {
            s.get::<Revision>(NAMESPACE, "hello-00001")
        })
        .await;
    reconcilers.stop().await;
}

/// What a schema lets through but local mode refuses: `Ready=False`, reason `InvalidSpec`,
/// local mode's message naming the field; no Revision is made.
pub async fn invalid_service(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    let mut service = hello();
    let annotations = &mut service.spec.0.template.metadata.annotations;
    annotations.insert("autoscaling.knative.dev/min-scale".into(), "5".into());
    annotations.insert("autoscaling.knative.dev/max-scale".into(), "2".into());
    let expected = k8s::admission::service(&service).expect("refused");
    server.create(&service);

    let status = server
        .wait_for("Service hello refused", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            is(&status.conditions, "Ready", "False").then_some(status)
        })
        .await;
    let ready = condition(&status.conditions, "Ready").expect("Ready");
    assert_eq!(ready.reason.as_deref(), Some("InvalidSpec"));
    assert_eq!(ready.message, expected.message);
    assert!(
        ready
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("autoscaling.knative.dev/min-scale"),
        "{ready:?}"
    );
    assert_eq!(status.observed_generation, Some(1));
    assert!(server.list::<Revision>().is_empty());
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.resource == "revisions" && r.verb == "patch"),
        "no revision applied"
    );

    // Fixed: the Revision comes.
    server.update::<Service>(NAMESPACE, "hello", |s| {
        s.spec.0.template.metadata.annotations.clear();
    });
    server
        .wait_for("Revision hello-00001 after the fix", |s| {
            s.get::<Revision>(NAMESPACE, "hello-00001")
        })
        .await;
    reconcilers.stop().await;
}

/// A Broker is Ready at the broker ingress's address; a Trigger its validators refuse is
/// `Ready=False` with local mode's message.
pub async fn eventing(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    let broker: Broker = serde_json::from_value(serde_json::json!({
        "apiVersion": "eventing.knative.dev/v1", "kind": "Broker",
        "metadata": { "name": "default", "namespace": NAMESPACE },
        "spec": {},
    }))
    .expect("a Broker");
    server.create(&broker);
    let trigger: Trigger = serde_json::from_value(serde_json::json!({
        "apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
        "metadata": { "name": "bad", "namespace": NAMESPACE },
        "spec": {
            "broker": "default",
            "filters": [{ "cesql": "type LIKE 'order.%' AND" }],
            "subscriber": { "uri": "http://example.com/" },
        },
    }))
    .expect("a Trigger");
    let expected = k8s::admission::trigger(&trigger).expect("refused");
    server.create(&trigger);

    let status = server
        .wait_for("Broker default ready", |s| {
            let status = s.get::<Broker>(NAMESPACE, "default")?.status?;
            is(&status.conditions, "Ready", "True").then_some(status)
        })
        .await;
    assert_eq!(
        status.address.as_ref().and_then(|a| a.url.as_deref()),
        Some("http://mecha-broker.mecha-system.svc/default/default")
    );
    let status = server
        .wait_for("Trigger bad refused", |s| {
            let status = s.get::<Trigger>(NAMESPACE, "bad")?.status?;
            is(&status.conditions, "Ready", "False").then_some(status)
        })
        .await;
    let ready = condition(&status.conditions, "Ready").expect("Ready");
    assert_eq!(ready.reason.as_deref(), Some("InvalidSpec"));
    assert_eq!(ready.message, expected.message);
    reconcilers.stop().await;
}

type Scenario = fn(ApiServer) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every scenario above, by name.
pub const ALL: &[(&str, Scenario)] = &[
    ("create", |s| Box::pin(create(s))),
    ("initial_scale", |s| Box::pin(initial_scale(s))),
    ("not_owned", |s| Box::pin(not_owned(s))),
    ("template_change", |s| Box::pin(template_change(s))),
    ("traffic_split", |s| Box::pin(traffic_split(s))),
    ("delete_cascades", |s| Box::pin(delete_cascades(s))),
    ("conflict_retried", |s| Box::pin(conflict_retried(s))),
    ("crash_loop", |s| Box::pin(crash_loop(s))),
    ("watch_fails", |s| Box::pin(watch_fails(s))),
    ("invalid_service", |s| Box::pin(invalid_service(s))),
    ("eventing", |s| Box::pin(eventing(s))),
];

/// A template with `initial-scale: "0"`: its Deployment is created at zero replicas (by the
/// creation manager, once), and no apply ever carries `replicas`, so none resets it.
pub async fn initial_scale(server: ApiServer) {
    let reconcilers = Reconcilers::start(&server);
    let mut service = hello();
    service
        .spec
        .0
        .template
        .metadata
        .annotations
        .insert("autoscaling.knative.dev/initial-scale".into(), "0".into());
    server.create(&service);
    let deployment = server
        .wait_for("Deployment hello-00001-deployment", |s| {
            s.get::<Deployment>(NAMESPACE, "hello-00001-deployment")
        })
        .await;
    assert_eq!(deployment.spec.and_then(|s| s.replicas), Some(0));
    // Reconciled again (a status change of the Revision), still at zero.
    server
        .wait_for("Revision hello-00001 with a status", |s| {
            s.get::<Revision>(NAMESPACE, "hello-00001")?.status
        })
        .await;
    reconcilers.stop().await;
    let requests = server.requests();
    let created: Vec<_> = requests
        .iter()
        .filter(|r| r.verb == "create" && r.resource == "deployments")
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(
        created[0].field_manager.as_deref(),
        Some("mecha-initial-scale")
    );
    assert_eq!(
        created[0].body.0.pointer("/spec/replicas"),
        Some(&serde_json::json!(0))
    );
    for apply in requests
        .iter()
        .filter(|r| r.verb == "patch" && r.resource == "deployments")
    {
        assert_eq!(apply.body.0.pointer("/spec/replicas"), None, "{apply:?}");
    }
    assert_eq!(
        server
            .get::<Deployment>(NAMESPACE, "hello-00001-deployment")
            .and_then(|d| d.spec?.replicas),
        Some(0)
    );
}

/// A user's own Service `hello` is in the way of the Knative Service's cluster-local name: it
/// is left as it was, the revision is still made, and the Service is `Ready=False`/`NotOwned`
/// until the user's Service is gone.
pub async fn not_owned(server: ApiServer) {
    let theirs: KubeService = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "hello", "namespace": NAMESPACE},
        "spec": {"selector": {"app": "legacy"}, "ports": [{"port": 80}]},
    }))
    .expect("a Service");
    server.create(&theirs);
    let reconcilers = Reconcilers::start(&server);
    server.create(&hello());
    let status = server
        .wait_for("Service hello NotOwned", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason.as_deref() == Some("NotOwned")).then_some(status)
        })
        .await;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "False");
    assert!(
        ready
            .message
            .as_deref()
            .is_some_and(|m| m.contains("existing Service default/hello")),
        "{ready:?}"
    );
    assert_eq!(
        status.latest_created_revision_name.as_deref(),
        Some("hello-00001")
    );
    let untouched = server
        .get::<KubeService>(NAMESPACE, "hello")
        .expect("still there");
    assert_eq!(
        untouched.spec.as_ref().and_then(|s| s.type_.as_deref()),
        None
    );
    assert!(untouched.owner_references().is_empty());
    assert!(
        !server.requests().iter().any(|r| r.verb == "patch"
            && r.resource == "services"
            && r.group.is_empty()
            && r.name.as_deref() == Some("hello")),
        "never applied over theirs"
    );

    // Once theirs is gone, the name is made and the Service is ready.
    assert!(server.delete::<KubeService>(NAMESPACE, "hello"));
    make_ready(&server, "hello-00001").await;
    server
        .wait_for("Service hello Ready", |s| {
            let status = s.get::<Service>(NAMESPACE, "hello")?.status?;
            is(&status.conditions, "Ready", "True").then_some(())
        })
        .await;
    assert!(
        server
            .get::<KubeService>(NAMESPACE, "hello")
            .and_then(|s| s.spec?.external_name)
            .is_some()
    );
    reconcilers.stop().await;
}

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
