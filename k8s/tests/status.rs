//! Knative-compatible status as pure functions (`k8s::status`): each case is the observed
//! objects in, the status out — no client, no clock.

use std::time::Duration;

use k8s::crd::{Condition, Revision, RevisionStatus, Service, ServiceStatus};
use k8s::reconcile::Retry;
use k8s::status::{self, Addresses};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentSpec, DeploymentStatus,
};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T00:01:00Z";

fn service(traffic: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": "hello", "namespace": "web", "generation": 3, "uid": "u1" },
        "spec": {
            "template": { "spec": { "containers": [{ "image": "hello:1" }] } },
            "traffic": traffic,
        },
    }))
    .expect("a Service")
}

/// Revision `hello-{n:05}` whose `Ready` is `ready` (`None`: no status yet).
fn revision(n: u32, ready: Option<&str>) -> Revision {
    let mut revision: Revision = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Revision",
        "metadata": {
            "name": format!("hello-{n:05}"), "namespace": "web", "generation": 1,
            "labels": { "serving.knative.dev/service": "hello" },
        },
        "spec": { "containers": [{ "image": "hello:1" }] },
    }))
    .expect("a Revision");
    revision.status = ready.map(|state| RevisionStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: state.into(),
            message: (state == "False").then(|| "Back-off pulling image".into()),
            ..Condition::default()
        }],
        ..RevisionStatus::default()
    });
    revision
}

fn deployment(
    replicas: Option<i32>,
    ready: i32,
    conditions: Vec<DeploymentCondition>,
) -> Deployment {
    Deployment {
        spec: Some(DeploymentSpec {
            replicas,
            ..DeploymentSpec::default()
        }),
        status: Some(DeploymentStatus {
            ready_replicas: Some(ready),
            conditions: Some(conditions),
            ..DeploymentStatus::default()
        }),
        ..Deployment::default()
    }
}

fn get<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} in {conditions:?}"))
}

fn states(conditions: &[Condition]) -> Vec<(String, String, Option<String>)> {
    conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
        .collect()
}

fn triple(t: &str, s: &str, r: Option<&str>) -> (String, String, Option<String>) {
    (t.into(), s.into(), r.map(Into::into))
}

#[test]
fn a_revision_without_its_deployment_is_deploying() {
    let status = status::revision(&revision(1, None), None, &[], T0);
    assert_eq!(
        states(&status.conditions),
        [
            triple("Ready", "Unknown", Some("Deploying")),
            triple("ContainerHealthy", "Unknown", Some("Deploying")),
            triple("ResourcesAvailable", "Unknown", Some("Deploying")),
            triple("Active", "Unknown", Some("Deploying")),
        ]
    );
    assert_eq!(
        (status.actual_replicas, status.desired_replicas),
        (None, None)
    );
    assert_eq!(status.observed_generation, Some(1));
}

#[test]
fn a_revision_with_a_ready_pod_is_ready_and_active() {
    let status = status::revision(
        &revision(1, None),
        Some(&deployment(Some(2), 1, vec![])),
        &[],
        T0,
    );
    for type_ in ["Ready", "ContainerHealthy", "ResourcesAvailable", "Active"] {
        assert_eq!(get(&status.conditions, type_).status, "True", "{type_}");
    }
    assert_eq!(
        (status.actual_replicas, status.desired_replicas),
        (Some(1), Some(2))
    );
}

#[test]
fn scaled_to_zero_a_revision_stays_ready_but_inactive_and_wakes_queued() {
    let mut rev = revision(1, None);
    rev.status = Some(status::revision(
        &rev,
        Some(&deployment(Some(1), 1, vec![])),
        &[],
        T0,
    ));
    let idle = status::revision(&rev, Some(&deployment(Some(0), 0, vec![])), &[], T1);
    assert_eq!(get(&idle.conditions, "Ready").status, "True");
    let active = get(&idle.conditions, "Active");
    assert_eq!(
        (active.status.as_str(), active.reason.as_deref()),
        ("False", Some("NoTraffic"))
    );
    assert_eq!(
        (idle.actual_replicas, idle.desired_replicas),
        (Some(0), Some(0))
    );
    // Ready did not transition, so it keeps its time; Active did.
    assert_eq!(
        get(&idle.conditions, "Ready")
            .last_transition_time
            .as_deref(),
        Some(T0)
    );
    assert_eq!(active.last_transition_time.as_deref(), Some(T1));

    rev.status = Some(idle);
    let waking = status::revision(&rev, Some(&deployment(Some(1), 0, vec![])), &[], T1);
    let active = get(&waking.conditions, "Active");
    assert_eq!(
        (active.status.as_str(), active.reason.as_deref()),
        ("Unknown", Some("Queued"))
    );
    assert_eq!(get(&waking.conditions, "Ready").status, "True");
}

#[test]
fn a_stalled_or_failing_deployment_makes_the_revision_not_ready_saying_why() {
    let stalled = DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        message: Some("ReplicaSet \"hello-00001\" has timed out progressing.".into()),
        ..DeploymentCondition::default()
    };
    let status = status::revision(
        &revision(1, None),
        Some(&deployment(Some(1), 0, vec![stalled])),
        &[],
        T0,
    );
    let ready = get(&status.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("ProgressDeadlineExceeded"))
    );
    assert!(
        ready
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("timed out")
    );
    assert_eq!(
        get(&status.conditions, "ResourcesAvailable").status,
        "False"
    );

    let quota = DeploymentCondition {
        type_: "ReplicaFailure".into(),
        status: "True".into(),
        reason: Some("FailedCreate".into()),
        message: Some("exceeded quota: compute".into()),
        ..DeploymentCondition::default()
    };
    let status = status::revision(
        &revision(1, None),
        Some(&deployment(Some(1), 0, vec![quota])),
        &[],
        T0,
    );
    let ready = get(&status.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("FailedCreate"))
    );
    assert_eq!(ready.message.as_deref(), Some("exceeded quota: compute"));
}

fn pod(container: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": "hello-00001-deployment-abc", "namespace": "web" },
        "status": { "containerStatuses": [
            { "name": "activator-sidecar", "ready": false, "restartCount": 0, "image": "s", "imageID": "" },
            container,
        ] },
    }))
    .expect("a Pod")
}

#[test]
fn a_user_container_that_exits_is_not_healthy_naming_its_exit_code() {
    let crashed = pod(json!({
        "name": "user-container", "ready": false, "restartCount": 3, "image": "hello:1", "imageID": "",
        "state": { "waiting": { "reason": "CrashLoopBackOff" } },
        "lastState": { "terminated": { "exitCode": 1, "message": "panicked at main.rs:3" } },
    }));
    let status = status::revision(
        &revision(1, None),
        Some(&deployment(Some(1), 0, vec![])),
        &[crashed],
        T0,
    );
    let healthy = get(&status.conditions, "ContainerHealthy");
    assert_eq!(
        (healthy.status.as_str(), healthy.reason.as_deref()),
        ("False", Some("ExitCode1"))
    );
    assert_eq!(
        healthy.message.as_deref(),
        Some("Container failed with: panicked at main.rs:3")
    );
    let ready = get(&status.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("ExitCode1"))
    );
    // Waiting alone, before the Deployment stalls, is still deploying.
    assert_eq!(
        get(&status.conditions, "ResourcesAvailable").status,
        "Unknown"
    );
}

#[test]
fn an_image_that_cannot_be_pulled_names_why_once_the_deployment_stalls() {
    let pulling = pod(json!({
        "name": "user-container", "ready": false, "restartCount": 0, "image": "hello:nope", "imageID": "",
        "state": { "waiting": { "reason": "ImagePullBackOff", "message": "Back-off pulling image \"hello:nope\"" } },
    }));
    let stalled = DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        ..DeploymentCondition::default()
    };
    let status = status::revision(
        &revision(1, None),
        Some(&deployment(Some(1), 0, vec![stalled])),
        std::slice::from_ref(&pulling),
        T0,
    );
    let resources = get(&status.conditions, "ResourcesAvailable");
    assert_eq!(
        (resources.status.as_str(), resources.reason.as_deref()),
        ("False", Some("ImagePullBackOff"))
    );
    assert_eq!(
        resources.message.as_deref(),
        Some("Back-off pulling image \"hello:nope\"")
    );
    // Pods are not read once one is ready.
    let fine = status::revision(
        &revision(1, None),
        Some(&deployment(Some(2), 1, vec![])),
        &[pulling],
        T0,
    );
    assert_eq!(get(&fine.conditions, "Ready").status, "True");
}

#[test]
fn the_same_observations_give_the_same_status() {
    let mut rev = revision(1, None);
    let first = status::revision(&rev, Some(&deployment(Some(1), 1, vec![])), &[], T0);
    rev.status = Some(first.clone());
    assert_eq!(
        status::revision(&rev, Some(&deployment(Some(1), 1, vec![])), &[], T1),
        first
    );
}

#[test]
fn a_new_service_has_its_url_and_waits_for_a_ready_revision() {
    let status = status::service(
        &service(json!([])),
        &[revision(1, None)],
        &Addresses::default(),
        T0,
    );
    assert_eq!(status.url.as_deref(), Some("http://hello.web.example.com"));
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(
        status.latest_created_revision_name.as_deref(),
        Some("hello-00001")
    );
    assert_eq!(status.latest_ready_revision_name, None);
    assert!(status.traffic.is_empty(), "nothing served yet");
    let routes = get(&status.conditions, "RoutesReady");
    assert_eq!(
        (routes.status.as_str(), routes.reason.as_deref()),
        ("Unknown", Some("RevisionMissing"))
    );
    assert_eq!(get(&status.conditions, "Ready").status, "Unknown");
}

#[test]
fn latest_revision_resolves_to_the_latest_ready_one() {
    let addresses = Addresses {
        domain: "fn.example.org".into(),
        cluster_domain: "corp.internal".into(),
        ..Addresses::default()
    };
    let revisions = [
        revision(1, Some("True")),
        revision(2, Some("True")),
        revision(3, None),
    ];
    let status = status::service(&service(json!([])), &revisions, &addresses, T0);
    assert_eq!(
        status.url.as_deref(),
        Some("http://hello.web.fn.example.org")
    );
    assert_eq!(
        status.address.and_then(|a| a.url).as_deref(),
        Some("http://hello.web.svc.corp.internal"),
        "Knative's cluster-local address"
    );
    assert_eq!(
        status.latest_created_revision_name.as_deref(),
        Some("hello-00003")
    );
    assert_eq!(
        status.latest_ready_revision_name.as_deref(),
        Some("hello-00002")
    );
    assert_eq!(
        serde_json::to_value(&status.traffic).expect("json"),
        json!([{ "revisionName": "hello-00002", "latestRevision": true, "percent": 100 }])
    );
    assert_eq!(get(&status.conditions, "RoutesReady").status, "True");
    assert_eq!(
        get(&status.conditions, "ConfigurationsReady").status,
        "Unknown"
    );
    assert_eq!(get(&status.conditions, "Ready").status, "Unknown");
}

#[test]
fn a_failed_latest_revision_fails_the_configuration_and_traffic_stays() {
    let revisions = [revision(1, Some("True")), revision(2, Some("False"))];
    let status = status::service(&service(json!([])), &revisions, &Addresses::default(), T0);
    let configurations = get(&status.conditions, "ConfigurationsReady");
    assert_eq!(
        (
            configurations.status.as_str(),
            configurations.reason.as_deref()
        ),
        ("False", Some("RevisionFailed"))
    );
    assert_eq!(
        configurations.message.as_deref(),
        Some("Revision \"hello-00002\" failed with message: Back-off pulling image.")
    );
    assert_eq!(
        status.latest_ready_revision_name.as_deref(),
        Some("hello-00001")
    );
    assert_eq!(
        status.traffic[0].target.revision_name.as_deref(),
        Some("hello-00001")
    );
    assert_eq!(get(&status.conditions, "Ready").status, "False");
}

#[test]
fn a_tagged_split_resolves_names_and_tag_urls() {
    let svc = service(json!([
        { "revisionName": "hello-00001", "percent": 50, "tag": "blue" },
        { "latestRevision": true, "percent": 50, "tag": "green" },
    ]));
    let revisions = [revision(1, Some("True")), revision(2, Some("True"))];
    let status = status::service(&svc, &revisions, &Addresses::default(), T0);
    assert_eq!(
        serde_json::to_value(&status.traffic).expect("json"),
        json!([
            { "revisionName": "hello-00001", "latestRevision": false, "percent": 50,
              "tag": "blue", "url": "http://blue-hello.web.example.com" },
            { "revisionName": "hello-00002", "latestRevision": true, "percent": 50,
              "tag": "green", "url": "http://green-hello.web.example.com" },
        ])
    );
    assert_eq!(get(&status.conditions, "Ready").status, "True");
}

#[test]
fn traffic_to_a_missing_revision_is_refused_by_name_and_the_served_traffic_stays() {
    let svc = service(json!([{ "revisionName": "hello-00007", "percent": 100 }]));
    let mut with_previous = svc.clone();
    let served = status::service(
        &service(json!([])),
        &[revision(1, Some("True"))],
        &Addresses::default(),
        T0,
    );
    with_previous.status = Some(served.clone());
    let status = status::service(
        &with_previous,
        &[revision(1, Some("True"))],
        &Addresses::default(),
        T1,
    );
    let routes = get(&status.conditions, "RoutesReady");
    assert_eq!(
        (routes.status.as_str(), routes.reason.as_deref()),
        ("False", Some("RevisionMissing"))
    );
    assert_eq!(
        routes.message.as_deref(),
        Some("Revision \"hello-00007\" referenced in traffic not found.")
    );
    assert_eq!(status.traffic, served.traffic);
    assert_eq!(get(&status.conditions, "Ready").status, "False");
}

#[test]
fn revisions_of_other_services_do_not_count() {
    let mut other = revision(5, Some("True"));
    other.metadata.name = Some("hello-world-00005".into());
    let status = status::service(&service(json!([])), &[other], &Addresses::default(), T0);
    assert_eq!(status.latest_created_revision_name, None);
}

#[test]
fn a_refusal_and_a_failure_replace_ready_and_keep_the_rest() {
    let served = status::service(
        &service(json!([])),
        &[revision(1, Some("True"))],
        &Addresses::default(),
        T0,
    );
    let refusal = Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: Some("InvalidSpec".into()),
        message: Some("spec.traffic: percentages add up to 90, not 100".into()),
        ..Condition::default()
    };
    let refused: ServiceStatus = status::refused(served.clone(), &refusal, Some(4), T1);
    assert_eq!(refused.observed_generation, Some(4));
    assert_eq!(
        refused.latest_ready_revision_name,
        served.latest_ready_revision_name
    );
    assert_eq!(refused.traffic, served.traffic);
    for type_ in ["Ready", "ConfigurationsReady"] {
        let c = get(&refused.conditions, type_);
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some("InvalidSpec"))
        );
        assert_eq!(c.message, refusal.message);
        assert_eq!(c.last_transition_time.as_deref(), Some(T1));
    }
    assert_eq!(get(&refused.conditions, "RoutesReady").status, "True");

    let failed = status::failed(
        served.clone(),
        "ReconcileFailed",
        "apply Revision web/hello-00002: conflict",
        T1,
    );
    let ready = get(&failed.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("ReconcileFailed"))
    );
    assert_eq!(failed.observed_generation, served.observed_generation);
    assert_eq!(failed.url, served.url);
}

#[test]
fn a_broker_is_addressed_at_the_ingress() {
    let broker: k8s::Broker = serde_json::from_value(json!({
        "apiVersion": "eventing.knative.dev/v1", "kind": "Broker",
        "metadata": { "name": "orders", "namespace": "shop", "generation": 2 },
        "spec": {},
    }))
    .expect("a Broker");
    let status = status::broker(&broker, &Addresses::default(), T0);
    assert_eq!(
        status.address.and_then(|a| a.url).as_deref(),
        Some("http://mecha-broker.mecha-system.svc/shop/orders")
    );
    assert_eq!(get(&status.conditions, "Ready").status, "True");
    assert_eq!(status.observed_generation, Some(2));
}

#[test]
fn retries_double_up_to_the_cap() {
    let retry = Retry {
        first: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let delays: Vec<u128> = (1..=6).map(|n| retry.delay(n).as_millis()).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    assert_eq!(retry.delay(200), Duration::from_secs(1), "no overflow");
}

#[test]
fn the_cluster_domain_comes_from_resolv_conf_as_knative_reads_it() {
    let pod = "nameserver 10.96.0.10\nsearch web.svc.corp.internal svc.corp.internal corp.internal\noptions ndots:5\n";
    assert_eq!(
        status::cluster_domain_from_resolv_conf(pod),
        "corp.internal"
    );
    assert_eq!(
        status::cluster_domain_from_resolv_conf("nameserver 1.1.1.1\nsearch example.org\n"),
        "cluster.local"
    );
    assert_eq!(status::cluster_domain_from_resolv_conf(""), "cluster.local");
}
