//! The autoscaler's runtime against the scripted API server: the desired state from the
//! cluster ([`k8s::state`]), the KPA controller with the Kubernetes actuator
//! ([`k8s::actuator`]), endpoints from EndpointSlices ([`k8s::endpoints`]), the leader Lease
//! ([`k8s::leader`]) and the control-plane API behind `TokenReview` ([`k8s::auth`]).
//! `tests/runtime.rs` runs each scenario as a test; `tests/rbac.rs` runs them all ([`all`]) and
//! checks every request they made against the roles in `deploy/`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use autoscaler::{Controller, ServingState};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use k8s::actuator::{EverReady, KubeActuator, Running};
use k8s::auth::TokenReviewer;
use k8s::crd::Revision;
use k8s::forward::ToLeader;
use k8s::leader::{Attempt, Elector, LeaseTimings};
use k8s::state::Caches;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use mecha_common::auth::{Refusals, Verdict, Verify};
use mecha_common::{Activation, EndpointTable, Shutdown};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;

use super::serving::hello;
use super::{ApiServer, Recorded};

/// The installation's namespace (the Lease, the ConfigMaps).
pub const SYSTEM: &str = "mecha-system";
/// A token the scripted `TokenReview` accepts for the audience, as a revision pod's sidecar.
pub const SIDECAR_TOKEN: &str = "sidecar-token-0123456789abcdef0123456789";
/// A token for another audience (e.g. the API server's own).
pub const OTHER_AUDIENCE_TOKEN: &str = "other-audience-0123456789abcdef01234567";
/// A user's token, not a service account's.
pub const USER_TOKEN: &str = "user-token-0123456789abcdef0123456789abcd";

/// The runtime of one autoscaler replica against a scripted API server.
pub struct Runtime {
    shutdown: Shutdown,
    pub leading: watch::Sender<bool>,
    pub state: watch::Receiver<Arc<ServingState>>,
    pub endpoints: watch::Receiver<Arc<EndpointTable>>,
    pub ever_ready: EverReady,
    pub caches: Caches,
    /// The control-plane API, as the binary serves it.
    pub api: Router,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

// === impl Runtime ===

impl Runtime {
    /// Starts the caches, the controller (leading) and the guarded API on `server`.
    pub fn start(server: &ApiServer) -> Self {
        Self::start_with(server, None)
    }

    /// The same as a follower of the leader at `leader`: reports go on there.
    pub fn follower_of(server: &ApiServer, leader: SocketAddr) -> Self {
        Self::start_with(server, Some(leader))
    }

    fn start_with(server: &ApiServer, leader: Option<SocketAddr>) -> Self {
        let client = server.client();
        let registry = prometheus::Registry::new();
        let shutdown = Shutdown::new();
        let caches = Caches::default();
        let ever_ready = EverReady::default();
        let running = Running::default();
        let (state_tx, state) = watch::channel(Arc::<ServingState>::default());
        let (endpoints_tx, endpoints) = watch::channel(Arc::<EndpointTable>::default());
        let (leading, leading_rx) = watch::channel(leader.is_none());
        let to_leader = leader.map(|addr| {
            let (address, address_rx) = watch::channel(Some(addr.to_string()));
            std::mem::forget(address);
            ToLeader::new(leading_rx.clone(), address_rx, &registry)
        });
        let mut tasks = vec![
            tokio::spawn(k8s::state::run(
                client.clone(),
                k8s::state::Installation {
                    namespace: SYSTEM.into(),
                    cluster_domain: "cluster.local".into(),
                },
                state_tx,
                ever_ready.clone(),
                running.clone(),
                caches.clone(),
                shutdown.signal(),
            )),
            tokio::spawn(k8s::endpoints::run(
                Api::all(client.clone()),
                state.clone(),
                endpoints_tx,
                ever_ready.clone(),
                caches.register("endpointslices"),
                shutdown.signal(),
            )),
        ];
        let actuator = KubeActuator::new(
            client.clone(),
            endpoints.clone(),
            ever_ready.clone(),
            running,
            leading_rx,
        );
        let (activation, pokes) = Activation::new();
        let controller = Controller::new(
            state.clone(),
            actuator,
            activation,
            pokes,
            k8s::status::DEFAULT_DOMAIN,
            &registry,
        );
        let api = k8s::auth::control_plane(
            controller.api(shutdown.signal()),
            TokenReviewer::new(client, &registry),
            Refusals::register(&registry),
            caches.clone(),
            to_leader,
        );
        tasks.push(tokio::spawn(controller.run(shutdown.signal())));
        Self {
            shutdown,
            leading,
            state,
            endpoints,
            ever_ready,
            caches,
            api,
            tasks,
        }
    }

    /// Waits until the desired state holds `revision`.
    pub async fn wait_for_revision(&mut self, revision: &str) {
        tokio::time::timeout(super::WAIT, async {
            loop {
                let known = self
                    .state
                    .borrow_and_update()
                    .services()
                    .any(|s| s.revisions.iter().any(|r| r.name == revision));
                if known {
                    return;
                }
                self.state.changed().await.expect("the state task runs");
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "revision {revision} never reached the desired state; caches synced: {}",
                self.caches.synced()
            )
        });
    }

    /// One request to the control-plane API: its status and body.
    pub async fn call(&self, request: Request<Body>) -> (StatusCode, String) {
        let response = self.api.clone().oneshot(request).await.expect("response");
        let status = response.status();
        let body = if status == StatusCode::OK {
            // The watch streams: its first line is enough.
            let mut body = response.into_body();
            match body.frame().await {
                Some(Ok(frame)) => {
                    String::from_utf8_lossy(&frame.into_data().unwrap_or_default()).into_owned()
                }
                _ => String::new(),
            }
        } else {
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        (status, body)
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        for task in self.tasks {
            tokio::time::timeout(super::WAIT, task)
                .await
                .expect("the runtime stops on shutdown")
                .expect("no panic");
        }
    }
}

/// A POST of `body` to the control-plane API, with `token` if any.
pub fn post(path: &str, token: Option<&str>, body: &str) -> Request<Body> {
    let mut request = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    request.body(Body::from(body.to_string())).expect("request")
}

/// Answers `TokenReview`s as the API server would for the test's tokens: the sidecar's is a
/// service account's with the audience; another is for another audience; a user's token is
/// not a service account's; anything else is not authenticated.
pub fn script_token_reviews(server: &ApiServer) {
    server.on(
        "create",
        "tokenreviews",
        Arc::new(|request: &Recorded| {
            let spec = &request.body.0["spec"];
            let wanted: Vec<String> = spec["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let token = spec["token"].as_str().unwrap_or_default();
            let (authenticated, username, audiences): (bool, &str, Vec<&str>) = match token {
                SIDECAR_TOKEN => (
                    true,
                    "system:serviceaccount:default:default",
                    vec!["mecha-autoscaler"],
                ),
                OTHER_AUDIENCE_TOKEN => (
                    true,
                    "system:serviceaccount:default:default",
                    vec!["https://kubernetes.default.svc"],
                ),
                USER_TOKEN => (true, "alice@example.com", vec!["mecha-autoscaler"]),
                _ => (false, "", vec![]),
            };
            // The API server answers the audiences both the token and the review name, and
            // does not authenticate a token for none of them.
            let audiences: Vec<&str> = audiences
                .into_iter()
                .filter(|a| wanted.iter().any(|w| w == a))
                .collect();
            let authenticated = authenticated && !audiences.is_empty();
            let mut status = json!({"authenticated": authenticated, "audiences": audiences});
            if authenticated {
                status["user"] = json!({"username": username});
            } else {
                status["error"] = json!("invalid bearer token");
            }
            (
                201,
                json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "metadata": {},
                    "spec": spec,
                    "status": status,
                }),
            )
        }),
    );
}

/// `hello`'s first Revision as the reconciler makes it, with `annotations` on its template,
/// marked `Ready`; and its Deployment at `replicas`.
pub fn revision_with_deployment(
    server: &ApiServer,
    namespace: &str,
    annotations: &[(&str, &str)],
    replicas: i32,
) {
    let mut service = hello();
    service.metadata.namespace = Some(namespace.into());
    for (k, v) in annotations {
        service
            .spec
            .0
            .template
            .metadata
            .annotations
            .insert((*k).into(), (*v).into());
    }
    server.create(&service);
    let revision: Revision = serde_json::from_value(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Revision",
        "metadata": {
            "name": "hello-00001",
            "namespace": namespace,
            "labels": {
                "serving.knative.dev/service": "hello",
                "serving.knative.dev/configuration": "hello",
                "serving.knative.dev/configurationGeneration": "1",
            },
            "annotations": annotations.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        },
        "spec": service.spec.0.template.spec,
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("a Revision");
    server.create(&revision);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {
            "name": "hello-00001-deployment",
            "namespace": namespace,
            "labels": {"serving.knative.dev/revision": "hello-00001"},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"serving.knative.dev/revision": "hello-00001"}},
            "template": {"spec": {"containers": [{"name": "user-container", "image": "hello"}]}},
        },
    }))
    .expect("a Deployment");
    server.create(&deployment);
}

/// `config-autoscaler` in the installation's namespace.
pub fn autoscaler_config(server: &ApiServer, data: &[(&str, &str)]) {
    let config = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("config-autoscaler".into()),
            namespace: Some(SYSTEM.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        ),
        ..ConfigMap::default()
    };
    server.create(&config);
}

/// The replica counts written through `deployments/scale`, in order.
pub fn scale_patches(server: &ApiServer) -> Vec<i64> {
    server
        .requests()
        .iter()
        .filter(|r| r.resource == "deployments" && r.subresource.as_deref() == Some("scale"))
        .filter(|r| r.verb == "patch")
        .filter_map(|r| r.body.0["spec"]["replicas"].as_i64())
        .collect()
}

/// The Deployment's `spec.replicas` in the store.
pub fn replicas(server: &ApiServer, namespace: &str) -> Option<i32> {
    server
        .get::<Deployment>(namespace, "hello-00001-deployment")
        .and_then(|d| d.spec)
        .and_then(|s| s.replicas)
}

/// A zero-scaled revision gets a replica as soon as a caller pokes through the control-plane
/// API (one `PATCH` of `deployments/scale`, the Deployment itself never rewritten); a poke or a
/// report without a valid token is refused (401) and scales nothing.
pub async fn scale_from_zero_on_a_poke(server: ApiServer) {
    script_token_reviews(&server);
    autoscaler_config(&server, &[("allow-zero-initial-scale", "true")]);
    revision_with_deployment(
        &server,
        "default",
        &[("autoscaling.knative.dev/initial-scale", "0")],
        0,
    );
    let mut runtime = Runtime::start(&server);
    runtime.wait_for_revision("default/hello-00001").await;
    server
        .wait_for("the first count (0) written once", |s| {
            (scale_patches(s) == [0]).then_some(())
        })
        .await;

    let poke = r#"[{"revision":"default/hello-00001","waiting":1}]"#;
    for token in [
        None,
        Some("not-a-token-0123456789abcdef0123456789"),
        Some(OTHER_AUDIENCE_TOKEN),
        Some(USER_TOKEN),
    ] {
        let (status, body) = runtime.call(post("/api/v1/pokes", token, poke)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert!(
            body.contains("audience mecha-autoscaler"),
            "the hint: {body}"
        );
    }
    assert_eq!(scale_patches(&server), [0], "a refused poke scales nothing");

    let (status, body) = runtime
        .call(post("/api/v1/pokes", Some(SIDECAR_TOKEN), poke))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    server
        .wait_for("a PATCH of deployments/scale to 1", |s| {
            (replicas(s, "default") == Some(1)).then_some(())
        })
        .await;
    assert_eq!(scale_patches(&server), [0, 1]);
    let writes: Vec<Recorded> = server
        .requests()
        .into_iter()
        .filter(|r| r.resource == "deployments" && r.subresource.is_none())
        .filter(|r| !matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .collect();
    assert!(
        writes.is_empty(),
        "the Deployment itself is never written: {writes:?}"
    );
    let patch = server
        .requests()
        .into_iter()
        .rfind(|r| r.subresource.as_deref() == Some("scale"))
        .expect("the scale patch");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    runtime.stop().await;
}

/// Without traffic, a revision at one replica goes to zero once the scale-to-zero grace
/// period has passed, and a follower writes nothing.
pub async fn scale_to_zero_after_the_grace_period(server: ApiServer) {
    autoscaler_config(
        &server,
        &[
            ("stable-window", "6s"),
            ("scale-to-zero-grace-period", "2s"),
        ],
    );
    revision_with_deployment(&server, "default", &[], 1);
    // Its one replica is ready (until then the KPA keeps the initial scale).
    server.create(&slice(
        "default",
        "hello-00001-abcde",
        &[("hello-00001-deployment-a", "10.0.0.1", Some(true))],
    ));
    let mut runtime = Runtime::start(&server);
    runtime.wait_for_revision("default/hello-00001").await;
    server
        .wait_for("the revision scaled to zero", |s| {
            (replicas(s, "default") == Some(0)).then_some(())
        })
        .await;
    let patches = scale_patches(&server);
    assert_eq!(patches.last(), Some(&0), "{patches:?}");
    assert!(
        patches.windows(2).all(|w| w[0] != w[1]),
        "an unchanged count is not written again: {patches:?}"
    );

    // A follower decides but writes nothing, even when the count changes.
    runtime.leading.send_replace(false);
    let before = scale_patches(&server).len();
    let (status, _) = runtime
        .call(post(
            "/api/v1/pokes",
            None,
            r#"[{"revision":"default/hello-00001","waiting":1}]"#,
        ))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    script_token_reviews(&server);
    let (status, _) = runtime
        .call(post(
            "/api/v1/pokes",
            Some(SIDECAR_TOKEN),
            r#"[{"revision":"default/hello-00001","waiting":1}]"#,
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Let the controller act on the poke and tick (paused time passes at once).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        scale_patches(&server).len(),
        before,
        "a follower never writes"
    );
    assert_eq!(replicas(&server, "default"), Some(0));
    runtime.stop().await;
}

/// An EndpointSlice of the revision's headless Service.
pub fn slice(
    namespace: &str,
    name: &str,
    endpoints: &[(&str, &str, Option<bool>)],
) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": "hello-00001",
                "serving.knative.dev/revision": "hello-00001",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8012, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(pod, ip, ready)| {
            let mut endpoint = json!({
                "addresses": [ip],
                "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace},
            });
            if let Some(ready) = ready {
                endpoint["conditions"] = json!({"ready": ready});
            }
            endpoint
        }).collect::<Vec<_>>(),
    }))
    .expect("an EndpointSlice")
}

fn listed(table: &EndpointTable) -> Vec<(String, String, String)> {
    let mut all: Vec<_> = table
        .revisions()
        .flat_map(|(revision, e)| {
            e.ready
                .iter()
                .map(|e| (revision.clone(), e.replica.to_string(), e.addr.to_string()))
        })
        .collect();
    all.sort();
    all
}

/// Ready endpoints of a revision's slices (pod IP, the sidecar's port 8012) reach the table
/// the sidecars are sent; endpoints not ready, and slices in another namespace for a revision
/// of the same name, do not; a slice removed takes its endpoints with it.
pub async fn endpoint_slices_feed_the_table(server: ApiServer) {
    revision_with_deployment(&server, "default", &[], 2);
    let mut runtime = Runtime::start(&server);
    runtime.wait_for_revision("default/hello-00001").await;
    server.create(&slice(
        "default",
        "hello-00001-abcde",
        &[
            ("hello-00001-deployment-a", "10.0.0.1", Some(true)),
            ("hello-00001-deployment-b", "10.0.0.2", Some(false)),
            ("hello-00001-deployment-c", "10.0.0.3", None),
        ],
    ));
    // Another namespace's slice for a revision of the same name: not this revision's.
    server.create(&slice(
        "intruder",
        "hello-00001-zzzzz",
        &[("evil", "10.9.9.9", Some(true))],
    ));
    let wanted = vec![
        (
            "default/hello-00001".to_string(),
            "hello-00001-deployment-a".to_string(),
            "10.0.0.1:8012".to_string(),
        ),
        (
            "default/hello-00001".to_string(),
            "hello-00001-deployment-c".to_string(),
            "10.0.0.3:8012".to_string(),
        ),
    ];
    wait_for_table(&mut runtime, &wanted).await;
    assert!(runtime.ever_ready.contains("default/hello-00001"));
    // Once that namespace has its own `hello-00001`, the slice is that revision's, apart.
    revision_with_deployment(&server, "intruder", &[], 1);
    runtime.wait_for_revision("intruder/hello-00001").await;
    let mut both = wanted.clone();
    both.push((
        "intruder/hello-00001".to_string(),
        "evil".to_string(),
        "10.9.9.9:8012".to_string(),
    ));
    both.sort();
    wait_for_table(&mut runtime, &both).await;
    server.delete::<EndpointSlice>("intruder", "hello-00001-zzzzz");
    wait_for_table(&mut runtime, &wanted).await;

    // The API sends it to sidecars.
    script_token_reviews(&server);
    let (status, line) = runtime
        .call(
            Request::get("/api/v1/watch")
                .header(header::AUTHORIZATION, format!("Bearer {SIDECAR_TOKEN}"))
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        line.contains("10.0.0.1:8012") && !line.contains("10.9.9.9"),
        "{line}"
    );

    server.delete::<EndpointSlice>("default", "hello-00001-abcde");
    wait_for_table(&mut runtime, &[]).await;
    runtime.stop().await;
}

async fn wait_for_table(runtime: &mut Runtime, wanted: &[(String, String, String)]) {
    tokio::time::timeout(super::WAIT, async {
        loop {
            if listed(&runtime.endpoints.borrow_and_update()) == wanted {
                return;
            }
            runtime
                .endpoints
                .changed()
                .await
                .expect("endpoints task runs");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the table never became {wanted:?}; it is {:?}",
            listed(&runtime.endpoints.borrow())
        )
    });
}

fn holder(server: &ApiServer) -> Option<String> {
    server
        .get::<Lease>(SYSTEM, "mecha-autoscaler")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

fn elector(server: &ApiServer, identity: &str) -> Elector {
    Elector::new(
        Api::namespaced(server.client(), SYSTEM),
        "mecha-autoscaler",
        identity,
        LeaseTimings::default(),
    )
    .with_address(Some(format!("{identity}.pods:8080")))
}

/// The Lease: the first replica creates it and leads, renews it, and keeps it from a second;
/// a leader that cannot renew steps down before the lease could expire; a lease not renewed
/// for its duration is taken over (one winner of two); a leader that shuts down releases it,
/// and the next takes it at once.
pub async fn lease_acquire_renew_takeover(server: ApiServer) {
    let mut a = elector(&server, "autoscaler-a");
    let mut b = elector(&server, "autoscaler-b");
    let (a_leads, b_leads) = (a.leading(), b.leading());
    assert_eq!(a.attempt().await, Attempt::Leading, "created");
    assert_eq!(holder(&server).as_deref(), Some("autoscaler-a"));
    assert!(*a_leads.borrow());
    let renewed_before = server
        .get::<Lease>(SYSTEM, "mecha-autoscaler")
        .and_then(|l| l.spec)
        .and_then(|s| s.renew_time);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(a.attempt().await, Attempt::Leading, "renewed");
    let lease = server
        .get::<Lease>(SYSTEM, "mecha-autoscaler")
        .and_then(|l| l.spec)
        .expect("lease");
    assert_ne!(lease.renew_time, renewed_before, "renewTime moves");
    assert_eq!(lease.lease_transitions, Some(0));
    assert_eq!(
        b.attempt().await,
        Attempt::Following(Some("autoscaler-a".into()))
    );
    assert!(!*b_leads.borrow());
    assert_eq!(
        b.leader_address().borrow().as_deref(),
        Some("autoscaler-a.pods:8080"),
        "followers learn where the leader takes reports"
    );
    assert_eq!(
        *a.leader_address().borrow(),
        None,
        "the leader forwards nothing"
    );

    // a cannot renew: it keeps leading within the renew deadline, then steps down.
    server.fail_next("update", "leases", None, 500);
    assert!(matches!(a.attempt().await, Attempt::Failed(_)));
    assert!(*a_leads.borrow(), "still within the renew deadline");
    tokio::time::advance(Duration::from_secs(11)).await;
    server.fail_next("update", "leases", None, 500);
    assert!(matches!(a.attempt().await, Attempt::Failed(_)));
    assert!(!*a_leads.borrow(), "stepped down after the renew deadline");

    // b has seen the same record since its first look: once that is older than the lease's
    // duration, b takes over.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(b.attempt().await, Attempt::Leading, "took over");
    assert!(*b_leads.borrow());
    let lease = server
        .get::<Lease>(SYSTEM, "mecha-autoscaler")
        .and_then(|l| l.spec)
        .expect("lease");
    assert_eq!(lease.lease_transitions, Some(1), "a takeover counts");
    assert_eq!(holder(&server).as_deref(), Some("autoscaler-b"));
    assert_eq!(
        a.attempt().await,
        Attempt::Following(Some("autoscaler-b".into())),
        "the old leader follows"
    );

    // b stops renewing; two others race for the expired lease: one wins.
    let mut c = elector(&server, "autoscaler-c");
    let mut d = elector(&server, "autoscaler-d");
    assert!(matches!(c.attempt().await, Attempt::Following(_)));
    assert!(matches!(d.attempt().await, Attempt::Following(_)));
    tokio::time::advance(Duration::from_secs(15)).await;
    let (rc, rd) = tokio::join!(c.attempt(), d.attempt());
    let winners = [&rc, &rd]
        .iter()
        .filter(|r| ***r == Attempt::Leading)
        .count();
    assert_eq!(winners, 1, "exactly one leader: {rc:?} {rd:?}");
    let (mut leader, mut other, other_identity) = if rd == Attempt::Leading {
        (d, c, "autoscaler-c")
    } else {
        (c, d, "autoscaler-d")
    };
    drop((a, b));

    // Released on shutdown: the other takes it at once, without waiting out the duration.
    leader.release().await;
    assert_eq!(holder(&server), None);
    assert_eq!(other.attempt().await, Attempt::Leading);
    assert_eq!(holder(&server).as_deref(), Some(other_identity));
    drop(leader);
}

/// `TokenReview` decides: the sidecar's token is accepted and then answered from the cache
/// for a while; refused tokens are refused (and cached briefly); an API server that fails
/// makes the answer "unavailable" (503), never "refused".
pub async fn token_reviews(server: ApiServer) {
    script_token_reviews(&server);
    let reviewer = TokenReviewer::new(server.client(), &prometheus::Registry::new());
    let reviews = || {
        server
            .requests()
            .iter()
            .filter(|r| r.resource == "tokenreviews")
            .count()
    };
    assert_eq!(reviewer.verify(SIDECAR_TOKEN).await, Verdict::Accepted);
    assert_eq!(reviewer.verify(SIDECAR_TOKEN).await, Verdict::Accepted);
    assert_eq!(reviews(), 1, "the second answer came from the cache");
    let review = server
        .requests()
        .into_iter()
        .find(|r| r.resource == "tokenreviews")
        .expect("a review");
    assert_eq!(
        review.body.0["spec"]["audiences"],
        json!(["mecha-autoscaler"])
    );
    tokio::time::advance(k8s::auth::ACCEPTED_FOR + Duration::from_millis(1)).await;
    assert_eq!(reviewer.verify(SIDECAR_TOKEN).await, Verdict::Accepted);
    assert_eq!(reviews(), 2, "asked again once the cache expired");

    for (token, why) in [
        (
            "nobody-0123456789abcdef0123456789abcdef",
            "wrong credential",
        ),
        (OTHER_AUDIENCE_TOKEN, "wrong credential"),
        (USER_TOKEN, "not a service account"),
    ] {
        match reviewer.verify(token).await {
            Verdict::Refused(reason) => assert!(reason.contains(why), "{token}: {reason}"),
            other => panic!("{token}: {other:?}"),
        }
    }
    let before = reviews();
    assert!(matches!(
        reviewer.verify(USER_TOKEN).await,
        Verdict::Refused(_)
    ));
    assert_eq!(reviews(), before, "a refusal is cached too");

    server.fail_next("create", "tokenreviews", None, 500);
    assert!(matches!(
        reviewer
            .verify("fresh-token-0123456789abcdef0123456789ab")
            .await,
        Verdict::Unavailable(_)
    ));
}

/// A follower passes reports and pokes on to the leader with the caller's credential and
/// answers what the leader answered; a report already passed on is not passed again; an
/// unreachable leader makes it 503 (the sidecar reports again); a caller without a valid
/// token is refused before anything is passed on.
pub async fn a_follower_passes_reports_to_the_leader(server: ApiServer) {
    script_token_reviews(&server);
    revision_with_deployment(&server, "default", &[], 1);
    // The leader: records what reaches it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let leader = listener.local_addr().expect("addr");
    let seen: Arc<std::sync::Mutex<Vec<(String, String, bool)>>> = Arc::default();
    let record = seen.clone();
    let app = Router::new().fallback(move |request: Request<Body>| {
        let record = record.clone();
        async move {
            let auth = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let forwarded = request.headers().contains_key(k8s::forward::FORWARDED);
            record
                .lock()
                .expect("lock")
                .push((request.uri().path().to_string(), auth, forwarded));
            StatusCode::ACCEPTED
        }
    });
    let leader_task = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut follower = Runtime::follower_of(&server, leader);
    follower.wait_for_revision("default/hello-00001").await;

    let stats = r#"[{"revision":"default/hello-00001","replica":"p1","concurrency":2.0,"requests":3,"seconds":1.0}]"#;
    let (status, body) = follower.call(post("/api/v1/stats", None, stats)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        seen.lock().expect("lock").is_empty(),
        "refused before passing on"
    );
    let (status, body) = follower
        .call(post("/api/v1/stats", Some(SIDECAR_TOKEN), stats))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = follower
        .call(post(
            "/api/v1/pokes",
            Some(SIDECAR_TOKEN),
            r#"[{"revision":"default/hello-00001","waiting":1}]"#,
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut again = post("/api/v1/stats", Some(SIDECAR_TOKEN), stats);
    again
        .headers_mut()
        .insert(k8s::forward::FORWARDED, "1".parse().expect("value"));
    let (status, _) = follower.call(again).await;
    assert_eq!(status, StatusCode::ACCEPTED, "taken here, not passed on");
    let bearer = format!("Bearer {SIDECAR_TOKEN}");
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![
            ("/api/v1/stats".to_string(), bearer.clone(), true),
            ("/api/v1/pokes".to_string(), bearer, true),
        ]
    );

    // The leader goes away: 503, and the sidecar reports again.
    leader_task.abort();
    let _ = leader_task.await;
    let (status, body) = follower
        .call(post("/api/v1/stats", Some(SIDECAR_TOKEN), stats))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("did not take the report"), "{body}");
    assert!(scale_patches(&server).is_empty(), "a follower never writes");
    follower.stop().await;
}

/// A restarted autoscaler (or a new leader) goes on from the replicas each Deployment runs:
/// a scaled-to-zero revision is not woken to its initial scale, a busy one is not shrunk to it.
pub async fn a_new_leader_goes_on_from_the_running_replicas(server: ApiServer) {
    revision_with_deployment(&server, "default", &[], 0);
    let mut runtime = Runtime::start(&server);
    runtime.wait_for_revision("default/hello-00001").await;
    server
        .wait_for("the count the Deployment runs, written once", |s| {
            (!scale_patches(s).is_empty()).then_some(())
        })
        .await;
    // Ticks and decisions pass (paused time): nothing wakes it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        scale_patches(&server),
        [0],
        "not woken to the initial scale"
    );
    runtime.stop().await;

    // Meanwhile the revision was scaled to three ready replicas; the next autoscaler keeps them.
    server.update::<Deployment>("default", "hello-00001-deployment", |d| {
        if let Some(spec) = d.spec.as_mut() {
            spec.replicas = Some(3);
        }
    });
    server.create(&slice(
        "default",
        "hello-00001-abcde",
        &[
            ("hello-00001-deployment-a", "10.0.0.1", Some(true)),
            ("hello-00001-deployment-b", "10.0.0.2", Some(true)),
            ("hello-00001-deployment-c", "10.0.0.3", Some(true)),
        ],
    ));
    let mut runtime = Runtime::start(&server);
    runtime.wait_for_revision("default/hello-00001").await;
    server
        .wait_for("a count written by the new autoscaler", |s| {
            (scale_patches(s).len() > 1).then_some(())
        })
        .await;
    assert_eq!(
        scale_patches(&server)[1],
        3,
        "goes on from the running count, not from the initial scale"
    );
    runtime.stop().await;
}

/// The reconcilers run only while leading: nothing is reconciled by a follower; once it leads,
/// the Service gets its Revision and a URL in the domain of the desired state; a new domain
/// (`config-domain` changed) restarts them with it.
pub async fn reconcilers_run_while_leading(server: ApiServer) {
    server.create(&hello());
    let (leading_tx, leading) = watch::channel(false);
    let with_domain = |domain: &str| {
        let mut state = ServingState::default();
        state.set_domain(Some(domain.into()));
        Arc::new(state)
    };
    let (state_tx, state) = watch::channel(with_domain("one.example"));
    let health = mecha_common::admin::Health::default();
    health.set_ready(true);
    let shutdown = Shutdown::new();
    let mut settings = k8s::reconcile::ServingSettings::new(super::serving::pod_settings());
    settings.retry = k8s::reconcile::Retry {
        first: Duration::from_millis(20),
        max: Duration::from_millis(500),
    };
    let task = tokio::spawn(k8s::leader::reconcile_while_leading(
        server.client(),
        settings,
        k8s::reconcile::Metrics::register(&prometheus::Registry::new()).expect("metrics"),
        leading,
        state,
        Caches::default(),
        health.clone(),
        shutdown.signal(),
    ));
    // A follower: some time passes (paused), nothing is asked of the API server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    leading_tx.send_replace(true);
    let url = |s: &ApiServer| {
        s.get::<k8s::crd::Service>("default", "hello")
            .and_then(|s| s.status)
            .and_then(|s| s.url)
    };
    server
        .wait_for("the URL in the first domain", |s| {
            (url(s).as_deref() == Some("http://hello.default.one.example")).then_some(())
        })
        .await;
    assert!(server.get::<Revision>("default", "hello-00001").is_some());
    assert!(health.is_ready(), "{:?}", health.problems());

    state_tx.send_replace(with_domain("two.example"));
    server
        .wait_for("the URL in the new domain", |s| {
            (url(s).as_deref() == Some("http://hello.default.two.example")).then_some(())
        })
        .await;

    // Leadership lost: the reconcilers stop (a new Service gets no Revision); taken again,
    // they run again.
    leading_tx.send_replace(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut other = hello();
    other.metadata.name = Some("other".into());
    server.create(&other);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        server.get::<Revision>("default", "other-00001").is_none(),
        "a follower reconciles nothing"
    );
    leading_tx.send_replace(true);
    server
        .wait_for("the new Service's Revision once leading again", |s| {
            s.get::<Revision>("default", "other-00001")
        })
        .await;
    shutdown.trigger();
    tokio::time::timeout(super::WAIT, task)
        .await
        .expect("returns on shutdown")
        .expect("no panic");
}

type Scenario = fn(ApiServer) -> Pin<Box<dyn Future<Output = ()>>>;

/// Every scenario, by name, and whether it runs under paused time (the scripted server
/// answers at once, and the KPA's and the Lease's clocks then pass without waiting); those
/// that talk to a real socket run in real time, so no timeout fires while the socket works.
pub const ALL: &[(&str, bool, Scenario)] = &[
    ("scale_from_zero_on_a_poke", true, |s| {
        Box::pin(scale_from_zero_on_a_poke(s))
    }),
    ("scale_to_zero_after_the_grace_period", true, |s| {
        Box::pin(scale_to_zero_after_the_grace_period(s))
    }),
    ("endpoint_slices_feed_the_table", true, |s| {
        Box::pin(endpoint_slices_feed_the_table(s))
    }),
    ("lease_acquire_renew_takeover", true, |s| {
        Box::pin(lease_acquire_renew_takeover(s))
    }),
    ("token_reviews", true, |s| Box::pin(token_reviews(s))),
    (
        "a_new_leader_goes_on_from_the_running_replicas",
        true,
        |s| Box::pin(a_new_leader_goes_on_from_the_running_replicas(s)),
    ),
    ("reconcilers_run_while_leading", true, |s| {
        Box::pin(reconcilers_run_while_leading(s))
    }),
    ("a_follower_passes_reports_to_the_leader", false, |s| {
        Box::pin(a_follower_passes_reports_to_the_leader(s))
    }),
];

/// Runs every scenario on a server of its own, each with its clock (pausing and resuming
/// the test's, which must be a current-thread runtime); the requests they made, by scenario.
pub async fn all() -> Vec<(&'static str, Vec<Recorded>)> {
    let mut recorded = Vec::new();
    for (name, paused, scenario) in ALL {
        if *paused {
            tokio::time::pause();
        }
        let server = ApiServer::new();
        scenario(server.clone()).await;
        recorded.push((*name, server.requests()));
        if *paused {
            tokio::time::resume();
        }
    }
    recorded
}
