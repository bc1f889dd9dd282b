//! The scripted API server itself (`tests/support`), through kube's own client: what other
//! tests rely on it for — the scale subresource, optimistic concurrency, injected failures,
//! canned answers, watches, the garbage collector, the request log — behaves as the API
//! server does.

mod support;

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use support::ApiServer;

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": name, "namespace": "default", "labels": { "app": name } },
        "spec": {
            "selector": { "matchLabels": { "app": name } },
            "template": { "metadata": { "labels": { "app": name } } },
        },
    }))
    .expect("a Deployment")
}

fn code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[tokio::test]
async fn the_scale_subresource_sets_replicas_and_nothing_else() {
    let server = ApiServer::new();
    let created = server.create(&deployment("web"));
    let api: Api<Deployment> = Api::namespaced(server.client(), "default");
    let scale = api
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 3 } })),
        )
        .await
        .expect("scaled");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    let read = api.get_scale("web").await.expect("scale");
    assert_eq!(
        read.status.map(|s| s.selector),
        Some(Some("app=web".into()))
    );
    let stored = server.get::<Deployment>("default", "web").expect("stored");
    assert_eq!(stored.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(
        stored.metadata.generation,
        created.metadata.generation.map(|g| g + 1)
    );
    let recorded = server.requests();
    assert_eq!(
        recorded
            .iter()
            .map(|r| (
                r.verb.as_str(),
                r.resource.as_str(),
                r.subresource.as_deref()
            ))
            .collect::<Vec<_>>(),
        [
            ("patch", "deployments", Some("scale")),
            ("get", "deployments", Some("scale"))
        ]
    );
}

#[tokio::test]
async fn a_stale_update_conflicts_and_a_scripted_failure_happens_once() {
    let server = ApiServer::new();
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "mecha-autoscaler", "namespace": "mecha-system" },
        "spec": { "holderIdentity": "a" },
    }))
    .expect("a Lease");
    let api: Api<Lease> = Api::namespaced(server.client(), "mecha-system");
    let mine = api
        .create(&PostParams::default(), &lease)
        .await
        .expect("created");
    // Someone else renews first: my copy is stale.
    server.update::<Lease>("mecha-system", "mecha-autoscaler", |l| {
        l.spec.get_or_insert_default().holder_identity = Some("b".into());
    });
    let stale = api
        .replace("mecha-autoscaler", &PostParams::default(), &mine)
        .await
        .expect_err("stale");
    assert_eq!(code(&stale), Some(409));

    server.fail_next("get", "leases", None, 500);
    let failed = api.get("mecha-autoscaler").await.expect_err("scripted");
    assert_eq!(code(&failed), Some(500));
    let fresh = api.get("mecha-autoscaler").await.expect("only once");
    assert_eq!(
        fresh.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn a_handler_answers_kinds_the_store_does_not_keep() {
    let server = ApiServer::new();
    server.on(
        "create",
        "tokenreviews",
        Arc::new(|request| {
            let token = request.body.0.pointer("/spec/token").cloned();
            (
                201,
                json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": { "token": token },
                    "status": { "authenticated": token == Some(json!("good")) },
                }),
            )
        }),
    );
    let api: Api<TokenReview> = Api::all(server.client());
    let review = |token: &str| -> TokenReview {
        serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": { "name": "review" },
            "spec": { "token": token, "audiences": ["mecha-autoscaler"] },
        }))
        .expect("a TokenReview")
    };
    let good = api
        .create(&PostParams::default(), &review("good"))
        .await
        .expect("answered");
    assert_eq!(good.status.and_then(|s| s.authenticated), Some(true));
    let bad = api
        .create(&PostParams::default(), &review("bad"))
        .await
        .expect("answered");
    assert_eq!(bad.status.and_then(|s| s.authenticated), Some(false));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(server.requests()[0].namespace, None, "cluster-scoped");
}

#[tokio::test]
async fn a_watch_sees_changes_and_the_garbage_collector_follows_owners() {
    let server = ApiServer::new();
    let owner = server.create(&deployment("owner"));
    let mut owned = deployment("owned");
    owned.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "owner".into(),
            uid: owner.metadata.uid.clone().expect("a uid"),
            controller: Some(true),
            ..Default::default()
        },
    ]);
    server.create(&owned);

    let api: Api<Deployment> = Api::all(server.client());
    let mut events = watcher(api, watcher::Config::default().labels("app=owned")).boxed();
    let mut seen = Vec::new();
    let mut deleted = false;
    while let Some(event) = tokio::time::timeout(support::WAIT, events.next())
        .await
        .expect("events come")
    {
        match event.expect("no watch error") {
            watcher::Event::InitApply(d) | watcher::Event::Apply(d) => {
                seen.push(d.metadata.name.clone().unwrap_or_default());
                if seen.len() == 1 && !deleted {
                    deleted = true;
                    assert!(server.delete::<Deployment>("default", "owner"));
                }
            }
            watcher::Event::Delete(d) => {
                assert_eq!(d.metadata.name.as_deref(), Some("owned"));
                break;
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
    assert_eq!(seen, ["owned"], "the selector keeps the owner out");
    assert!(server.list::<Deployment>().is_empty());
    let verbs: Vec<String> = server.requests().iter().map(|r| r.verb.clone()).collect();
    assert_eq!(verbs, ["list", "watch"]);
}
