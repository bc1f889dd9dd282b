//! The `apiserver-adapter` binary as a process against the scripted API server served over
//! HTTP on 127.0.0.1 (found through a kubeconfig), sending to a real HTTP receiver on
//! 127.0.0.1: objects created, updated and deleted in the API server arrive as binary-mode
//! CloudEvents with Knative's type, source (the API server's URL), subject (the plural from
//! discovery), deterministic id, extensions and data, in mode Reference and Resource; the
//! label selector (sent to the API server) and the owner filter leave objects out; `/ready`
//! turns true once every watch has listed (not while a list fails); SIGTERM exits 0; a
//! restart sends the same `add` with the same id.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use importers::apiserver::Change;
use k8s::apiserver::{AdapterConfig, event_id};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};
use support::ApiServer;
use support::process::{Process, free_port, kubeconfig, serve_http};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const NAMESPACE: &str = "default";

/// One request the receiver got: its headers (lower-case names) and body.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Value,
}

/// An HTTP receiver on 127.0.0.1 that keeps every request and answers 202.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let receiver = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let kept = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request: http::Request<Incoming>| {
                            let kept = kept.clone();
                            async move {
                                let (parts, body) = request.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let headers = parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_string(),
                                            v.to_str().unwrap_or_default().to_string(),
                                        )
                                    })
                                    .collect();
                                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                                kept.received
                                    .lock()
                                    .expect("lock")
                                    .push(Received { headers, body });
                                kept.arrived.notify_waiters();
                                let mut response = http::Response::new(http_body_util::Empty::<
                                    bytes::Bytes,
                                >::new(
                                ));
                                *response.status_mut() = http::StatusCode::ACCEPTED;
                                Ok::<_, Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (receiver, addr)
    }

    fn events(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits (at most `support::WAIT`) for `count` events in all.
    async fn wait_for(&self, count: usize) -> Vec<Received> {
        let waited = tokio::time::timeout(support::WAIT, async {
            loop {
                let arrived = self.arrived.notified();
                let events = self.events();
                if events.len() >= count {
                    return events;
                }
                arrived.await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| panic!("{count} events did not arrive; got {:#?}", self.events()))
    }
}

/// Starts the adapter for `config`, sending to `sink`, against the scripted server at `api`.
fn adapter(
    dir: &Path,
    api: SocketAddr,
    sink: SocketAddr,
    config: &AdapterConfig,
) -> (Process, u16) {
    let kubeconfig = kubeconfig(dir, api, NAMESPACE);
    let admin_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_apiserver-adapter"))
        .env_clear()
        .env("KUBECONFIG", &kubeconfig)
        .env("K_SINK", format!("http://{sink}/"))
        .env("K_CE_OVERRIDES", r#"{"extensions":{"team":"blue"}}"#)
        .env(
            "K_SOURCE_CONFIG",
            serde_json::to_string(config).expect("JSON"),
        )
        .env("ADMIN_PORT", admin_port.to_string())
        .env("MECHA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the apiserver-adapter binary starts");
    (Process(child), admin_port)
}

fn header<'a>(event: &'a Received, name: &str) -> &'a str {
    event
        .headers
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no {name} header in {event:#?}"))
}

/// A Pod labelled `app`, owned by the ReplicaSet `owner` (its uid) when given.
fn pod(name: &str, app: &str, owner: Option<&str>) -> Pod {
    let owners = match owner {
        Some(uid) => json!([{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d4f",
                              "uid": uid }]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": NAMESPACE, "labels": { "app": app },
                      "ownerReferences": owners },
        "spec": { "containers": [{ "name": "web", "image": "example.com/web:1" }] },
    }))
    .expect("a Pod")
}

/// The object as the adapter saw it (for its id).
fn as_json<K: serde::Serialize>(object: &K) -> Value {
    serde_json::to_value(object).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_mode_sends_the_selected_owned_pods_changes_and_drains_on_sigterm() {
    let server = ApiServer::new();
    // The pods' owner (the scripted garbage collector deletes pods whose owners are gone).
    let replica_set: ReplicaSet = serde_json::from_value(json!({
        "metadata": { "name": "web-6d4f", "namespace": NAMESPACE },
        "spec": { "selector": { "matchLabels": { "app": "web" } } },
    }))
    .expect("a ReplicaSet");
    let owner = server.create(&replica_set).metadata.uid.expect("a uid");
    let owner = Some(owner.as_str());
    // Pods made before the adapter starts are listed, the rest watched.
    server.create(&pod("web-1", "web", owner));
    server.create(&pod("web-2", "web", None)); // not owned by a ReplicaSet
    server.create(&pod("db", "db", owner)); // not selected
    // The first two lists fail: not ready meanwhile, with the reason.
    server.fail_next("list", "pods", None, 500);
    server.fail_next("list", "pods", None, 500);
    let api = serve_http(server.clone()).await;
    let (receiver, sink) = Receiver::start().await;
    let config: AdapterConfig = serde_json::from_value(json!({
        "name": "pods", "namespace": NAMESPACE, "mode": "Reference",
        "owner": { "apiVersion": "apps/v1", "kind": "ReplicaSet" },
        "namespaces": [NAMESPACE],
        "resources": [{ "apiVersion": "v1", "kind": "Pod",
                        "selector": { "matchExpressions": [
                            { "key": "app", "operator": "In", "values": ["web"] }] } }],
    }))
    .expect("a config");
    let dir = std::env::temp_dir().join(format!("mecha-adapter-ref-{}", std::process::id()));
    let (mut process, admin) = adapter(&dir, api, sink, &config);

    // Not ready while the list fails, saying which watch fails.
    process
        .wait_answer(admin, "/ready", |code, text| {
            code == 503
                && text.contains("watching pods in default: ")
                && !text.contains("watching pods in default: not listed yet")
        })
        .await;
    process.wait_http(admin, "/ready", 200).await;
    process.wait_http(admin, "/live", 200).await;
    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.verb == "list" && r.resource == "pods")
        .collect();
    assert!(lists.len() >= 3, "two failed lists and one that worked");

    // Changes after the list: an update, a new pod, a deletion.
    let web_1 = server.update::<Pod>(NAMESPACE, "web-1", |p| {
        p.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("rollout".into(), "2".into());
    });
    let first = receiver.wait_for(1).await;
    server.create(&pod("web-3", "web", owner));
    assert!(server.delete::<Pod>(NAMESPACE, "web-1"));
    let events = receiver.wait_for(4).await;
    assert_eq!(
        events.len(),
        4,
        "nothing for web-2 (no owner) or db (app=db)"
    );
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                header(e, "ce-type").to_string(),
                header(e, "ce-name").to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "dev.knative.apiserver.ref.add".to_string(),
                "web-1".to_string()
            ),
            ("dev.knative.apiserver.ref.update".into(), "web-1".into()),
            ("dev.knative.apiserver.ref.add".into(), "web-3".into()),
            ("dev.knative.apiserver.ref.delete".into(), "web-1".into()),
        ]
    );
    let add = &first[0];
    assert_eq!(header(add, "ce-specversion"), "1.0");
    assert_eq!(header(add, "ce-source"), format!("http://{api}"));
    assert_eq!(
        header(add, "ce-subject"),
        "/apis/v1/namespaces/default/pods/web-1"
    );
    assert_eq!(header(add, "ce-apiversion"), "v1");
    assert_eq!(header(add, "ce-kind"), "Pod");
    assert_eq!(header(add, "ce-namespace"), NAMESPACE);
    assert_eq!(header(add, "ce-team"), "blue");
    assert_eq!(header(add, "content-type"), "application/json");
    assert!(!add.headers.contains_key("ce-datacontenttype"));
    assert_eq!(
        add.body,
        json!({ "apiVersion": "v1", "kind": "Pod", "name": "web-1", "namespace": NAMESPACE })
    );
    assert_eq!(
        header(&events[1], "ce-id"),
        event_id(NAMESPACE, "pods", Change::Update, &as_json(&web_1))
    );
    let ids: std::collections::BTreeSet<&str> = events.iter().map(|e| header(e, "ce-id")).collect();
    assert_eq!(ids.len(), 4, "every change has its own id");

    // The receiver records an event before it answers; the adapter counts it after the answer.
    let counted = "mecha_source_events_sent_total{kind=\"ApiServerSource\",name=\"pods\",namespace=\"default\"} 4";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = process.wait_http(admin, "/metrics", 200).await;
        if metrics.contains(counted) || tokio::time::Instant::now() >= deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(metrics.contains(counted), "{metrics}");
    let exited = process.terminate().await;
    assert!(exited.success(), "{exited:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_mode_sends_the_object_with_its_real_plural_and_the_same_id_after_a_restart() {
    let server = ApiServer::new();
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "metadata": { "name": "deny-all", "namespace": "team-a" },
        "spec": { "podSelector": {} },
    }))
    .expect("a NetworkPolicy");
    let policy = server.create(&policy);
    let api = serve_http(server.clone()).await;
    let (receiver, sink) = Receiver::start().await;
    let config: AdapterConfig = serde_json::from_value(json!({
        "name": "policies", "namespace": NAMESPACE, "mode": "Resource",
        "allNamespaces": true,
        "resources": [{ "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy" }],
    }))
    .expect("a config");
    let dir = std::env::temp_dir().join(format!("mecha-adapter-res-{}", std::process::id()));

    let (mut process, admin) = adapter(&dir, api, sink, &config);
    process.wait_http(admin, "/ready", 200).await;
    let events = receiver.wait_for(1).await;
    let add = &events[0];
    assert_eq!(header(add, "ce-type"), "dev.knative.apiserver.resource.add");
    assert_eq!(
        header(add, "ce-subject"),
        "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/deny-all"
    );
    assert_eq!(header(add, "ce-apiversion"), "networking.k8s.io/v1");
    assert_eq!(header(add, "ce-namespace"), "team-a");
    assert_eq!(add.body["kind"], "NetworkPolicy");
    assert_eq!(add.body["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(add.body["metadata"]["name"], "deny-all");
    assert_eq!(add.body["metadata"]["uid"], json!(policy.metadata.uid));
    assert_eq!(
        header(add, "ce-id"),
        event_id(NAMESPACE, "policies", Change::Add, &as_json(&policy))
    );
    let id = header(add, "ce-id").to_string();
    assert!(process.terminate().await.success());

    // A restart lists again: the same add, with the same id (dedupable downstream).
    let (mut process, admin) = adapter(&dir, api, sink, &config);
    process.wait_http(admin, "/ready", 200).await;
    let events = receiver.wait_for(2).await;
    assert_eq!(
        header(&events[1], "ce-type"),
        "dev.knative.apiserver.resource.add"
    );
    assert_eq!(header(&events[1], "ce-id"), id);
    assert!(process.terminate().await.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_source_config_exits_2_naming_the_variable_and_field() {
    let output = Command::new(env!("CARGO_BIN_EXE_apiserver-adapter"))
        .env_clear()
        .env("K_SINK", "http://127.0.0.1:9/")
        .env(
            "K_SOURCE_CONFIG",
            r#"{"name":"s","namespace":"default","mode":"Reference","namespaces":["default"],"resources":[{"apiVersion":"v1","kind":"pod"}]}"#,
        )
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("K_SOURCE_CONFIG") && stderr.contains("resources[0].kind"),
        "{stderr}"
    );
}
