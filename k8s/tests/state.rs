//! The desired state from the cluster's objects (`k8s::state::serving_state`), a pure
//! function: Revisions under their cluster names with their own templates, oldest first;
//! `config-autoscaler` and `config-domain` in Knative's formats; a revision name claimed by
//! two namespaces kept by the older.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s::crd::{Revision, Service};
use k8s::state::{domain_from, serving_state};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;

fn service(namespace: &str) -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": "hello", "namespace": namespace},
            "spec": {"template": {
                "metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "5"}},
                "spec": {"containers": [{"image": "hello:2"}]},
            }},
        }))
        .expect("a Service"),
    )
}

fn revision(namespace: &str, n: u32, created: &str, min_scale: &str) -> Arc<Revision> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Revision",
            "metadata": {
                "name": format!("hello-{n:05}"),
                "namespace": namespace,
                "creationTimestamp": created,
                "labels": {
                    "serving.knative.dev/service": "hello",
                    "serving.knative.dev/configuration": "hello",
                    "serving.knative.dev/configurationGeneration": n.to_string(),
                },
                "annotations": {"autoscaling.knative.dev/min-scale": min_scale},
            },
            "spec": {"containers": [{"image": format!("hello:{n}")}], "containerConcurrency": n},
        }))
        .expect("a Revision"),
    )
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("mecha-system".into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..ConfigMap::default()
    }
}

#[test]
fn revisions_keep_their_cluster_names_and_templates_oldest_first() {
    let (state, problems) = serving_state(
        &[service("default")],
        &[
            revision("default", 2, "2026-11-30T12:00:02Z", "2"),
            revision("default", 1, "2026-11-30T12:00:01Z", "1"),
        ],
        None,
        None,
    );
    assert!(problems.is_empty(), "{problems:?}");
    let record = state.services().next().expect("hello");
    let names: Vec<&str> = record.revisions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default/hello-00001", "default/hello-00002"]);
    // Each revision runs its own template, not the Service's current one.
    let first = &record.revisions[0];
    assert_eq!(first.container_concurrency, 1);
    assert_eq!(first.scaling.min_scale, Some(1));
    assert_eq!(first.generation, 1);
    assert_eq!(record.revisions[1].scaling.min_scale, Some(2));
    // Routes use the domain (Knative's default without config-domain).
    let desired = state.desired(state.domain().expect("a domain"), |_| true);
    assert!(desired.routes.lookup("hello.default.example.com").is_some());
    assert_eq!(
        desired
            .routes
            .lookup("hello.default.example.com")
            .expect("route")
            .targets[0]
            .revision,
        "default/hello-00002"
    );
}

#[test]
fn a_revision_name_in_two_namespaces_is_two_revisions() {
    let (state, problems) = serving_state(
        &[service("default"), service("staging")],
        &[
            revision("staging", 1, "2026-11-30T13:00:00Z", "1"),
            revision("default", 1, "2026-11-30T12:00:00Z", "1"),
        ],
        None,
        None,
    );
    assert!(problems.is_empty(), "{problems:?}");
    let keys: Vec<(String, Vec<String>)> = state
        .services()
        .map(|s| {
            (
                s.key.namespace.clone(),
                s.revisions.iter().map(|r| r.name.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            (
                "default".to_string(),
                vec!["default/hello-00001".to_string()]
            ),
            (
                "staging".to_string(),
                vec!["staging/hello-00001".to_string()]
            ),
        ]
    );
    // Each namespace's host routes to its own revision; both run.
    let desired = state.desired("example.com", |_| true);
    for namespace in ["default", "staging"] {
        let route = desired
            .routes
            .lookup(&format!("hello.{namespace}.example.com"))
            .expect("route");
        assert_eq!(
            route.targets[0].revision,
            format!("{namespace}/hello-00001")
        );
    }
    assert_eq!(desired.active.len(), 2);
    // Metrics still name the revision, with its namespace beside it.
    assert_eq!(
        desired.active["staging/hello-00001"].metric_labels(),
        ["staging", "hello", "hello-00001"]
    );
}

#[test]
fn config_autoscaler_is_read_with_knatives_keys_and_a_bad_one_keeps_the_defaults() {
    let good = config_map(
        "config-autoscaler",
        &[("stable-window", "2m"), ("enable-scale-to-zero", "false")],
    );
    let (state, problems) = serving_state(&[], &[], Some(&good), None);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(state.config().stable_window.as_secs(), 120);
    assert!(!state.config().enable_scale_to_zero);

    let bad = config_map("config-autoscaler", &[("stable-window", "soon")]);
    let (state, problems) = serving_state(&[], &[], Some(&bad), None);
    assert_eq!(state.config().stable_window.as_secs(), 60, "the defaults");
    assert!(
        problems[0].starts_with("config-autoscaler: data[\"stable-window\"]"),
        "{problems:?}"
    );
}

#[test]
fn config_domain_gives_the_default_domain_in_knatives_format() {
    let (domain, problems) = domain_from(None);
    assert_eq!((domain.as_str(), problems.len()), ("example.com", 0));
    let config = config_map(
        "config-domain",
        &[
            ("_example", "documentation"),
            ("prod.example.org", "selector:\n  app: prod\n"),
            ("fn.example.org", ""),
            ("Not A Domain", ""),
            ("bad.example", "[1, 2]"),
            ("empty.example.org", "selector: {}"),
        ],
    );
    let (domain, problems) = domain_from(Some(&config));
    // An empty selector is the default too; the first default by name wins.
    assert_eq!(domain, "empty.example.org");
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("has a selector")));
    assert!(problems.iter().any(|p| p.contains("not a DNS name")));
    assert!(
        problems
            .iter()
            .any(|p| p.contains("data[\"bad.example\"] is not a label selector")),
        "{problems:?}"
    );
    let (state, _) = serving_state(&[service("default")], &[], None, Some(&config));
    assert_eq!(state.domain(), Some("empty.example.org"));
}

fn broker(namespace: &str, name: &str) -> Arc<k8s::crd::Broker> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Broker",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {},
        }))
        .expect("a Broker"),
    )
}

fn trigger(name: &str, cesql: &str) -> Arc<k8s::crd::Trigger> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Trigger",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "broker": "default",
                "filters": [{"cesql": cesql}],
                "subscriber": {"uri": "http://sink.default.svc/"},
            },
        }))
        .expect("a Trigger"),
    )
}

#[test]
fn brokers_and_triggers_for_the_broker_replicas_leave_out_what_admission_refuses() {
    let state = k8s::state::eventing_state(
        &[broker("default", "default"), broker("team-b", "orders")],
        &[
            trigger("good", "type = 'a'"),
            trigger("bad", "type = 'a' AND"),
        ],
    );
    let keys: Vec<_> = state.brokers.keys().cloned().collect();
    assert_eq!(
        keys,
        [
            ("default".to_string(), "default".to_string()),
            ("team-b".to_string(), "orders".to_string())
        ]
    );
    let triggers: Vec<_> = state
        .triggers
        .keys()
        .map(|(_, name)| name.clone())
        .collect();
    assert_eq!(triggers, ["good"]);
    // The trigger as the broker runtime reads it: the cluster's spec, unchanged.
    let good = &state.triggers[&("default".to_string(), "good".to_string())];
    assert_eq!(good.spec.broker, "default");
    assert_eq!(good.metadata.namespace.as_deref(), Some("default"));
}
