//! A scripted Kubernetes API server on 127.0.0.1 for the runtime's tests: a real HTTP server
//! (so both kube's `Client` in process and the `autoscaler` binary through a kubeconfig talk
//! to it) that keeps objects in memory, answers list, watch, get, create, replace, merge
//! patch, server-side apply (as a merge) and delete like the API server does for the kinds the
//! runtime uses, serves the Deployment `scale` subresource, answers `TokenReview`s from a
//! script, fails requests on demand, and records every request for the RBAC test.
//!
//! Not a conformance fake: no field managers, no strategic merge, no defaulting, label
//! selectors of the forms `k`, `!k`, `k=v`, `k!=v` only.
#![allow(dead_code, reason = "each test file uses a part of the fake")]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `watch=true` lists are recorded as watches.
    pub watch: bool,
    /// `Content-Type` of the body (which kind of patch).
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

/// What `TokenReview` says of a token.
#[derive(Debug, Clone)]
pub struct Review {
    pub authenticated: bool,
    pub username: String,
    pub audiences: Vec<String>,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    version: watch::Sender<u64>,
    pub addr: SocketAddr,
    server: Arc<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Inner {
    /// (prefix, resource, namespace, name) → object.
    objects: BTreeMap<Key, Value>,
    /// Every change: (resourceVersion, event type, key, object).
    events: Vec<(u64, &'static str, Key, Value)>,
    version: u64,
    requests: Vec<Recorded>,
    /// (method, path fragment) → (status, times left).
    failures: Vec<(Method, String, u16, u32)>,
    reviews: HashMap<String, Review>,
}

type Key = (String, String, String, String);

/// A path split as the API server routes it.
#[derive(Debug, Clone)]
struct ApiPath {
    prefix: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl FakeApi {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("address");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let version = watch::channel(0).0;
        let state = (inner.clone(), version.clone());
        let app = Router::new().fallback(handle).with_state(state);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            inner,
            version,
            addr,
            server: Arc::new(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (namespace `default`).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    /// A kubeconfig pointing at this server, for a process under test.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `object` at the collection `path` (e.g. `/apis/apps/v1/namespaces/default/deployments`)
    /// as if someone had created or changed it; watchers see the event.
    pub fn put(&self, collection: &str, object: Value) {
        let path = parse(collection).expect("a collection path");
        let mut inner = self.lock();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let key = key_of(&path, &name);
        let kind = if inner.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let version = inner.store(key, object, kind);
        drop(inner);
        self.version.send_replace(version);
    }

    /// Removes an object as if someone had deleted it.
    pub fn remove(&self, collection: &str, name: &str) {
        let path = parse(collection).expect("a collection path");
        let mut inner = self.lock();
        let key = key_of(&path, name);
        if let Some(object) = inner.objects.remove(&key) {
            inner.version += 1;
            let version = inner.version;
            inner.events.push((version, "DELETED", key, object));
            drop(inner);
            self.version.send_replace(version);
        }
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        let path = parse(collection).expect("a collection path");
        self.lock().objects.get(&key_of(&path, name)).cloned()
    }

    /// The next `times` requests whose path contains `fragment` answer `status`.
    pub fn fail(&self, method: Method, fragment: &str, status: u16, times: u32) {
        self.lock()
            .failures
            .push((method, fragment.to_string(), status, times));
    }

    /// What `TokenReview` answers for `token`; unknown tokens are not authenticated.
    pub fn review(&self, token: &str, review: Review) {
        self.lock().reviews.insert(token.to_string(), review);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Waits until a recorded request satisfies `pred`; panics after 10 s.
    pub async fn wait_for_request(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(found) = self.requests().into_iter().find(|r| pred(r)) {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no request {what} within 10s; saw {:#?}",
                self.requests()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if Arc::strong_count(&self.server) == 1 {
            self.server.abort();
        }
    }
}

impl Inner {
    fn store(&mut self, key: Key, mut object: Value, kind: &'static str) -> u64 {
        self.version += 1;
        let version = self.version;
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(version.to_string());
        if !key.2.is_empty() {
            meta["namespace"] = json!(key.2);
        }
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{version}"));
        }
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!("2026-11-30T12:00:00Z");
        }
        self.objects.insert(key.clone(), object.clone());
        self.events.push((version, kind, key, object));
        version
    }
}

type AppState = (Arc<Mutex<Inner>>, watch::Sender<u64>);

async fn handle(State((inner, version)): State<AppState>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let params: HashMap<String, String> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let watching = params.get("watch").is_some_and(|v| v == "true" || v == "1");
    let mut guard = inner.lock().unwrap_or_else(PoisonError::into_inner);
    guard.requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        watch: watching,
        content_type: content_type.clone(),
        body: body.clone(),
    });
    if let Some(failure) = guard
        .failures
        .iter_mut()
        .find(|(m, fragment, _, times)| *m == method && path.contains(fragment.as_str()) && *times > 0)
    {
        failure.3 -= 1;
        let code = failure.2;
        return status(code, "Injected", &format!("injected failure of {method} {path}"));
    }
    let Some(api) = parse(&path) else {
        return status(404, "NotFound", &format!("no such path {path}"));
    };
    if api.resource == "tokenreviews" && method == Method::POST {
        return token_review(&guard, body.unwrap_or_default());
    }
    let selector = params.get("labelSelector").cloned().unwrap_or_default();
    let field_name = params
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_string);
    match (&method, &api.name, &api.subresource) {
        (&Method::GET, None, None) if watching => {
            let since: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            drop(guard);
            watch_stream(inner, version, api, selector, field_name, since)
        }
        (&Method::GET, None, None) => {
            let items: Vec<Value> = guard
                .objects
                .iter()
                .filter(|(key, object)| {
                    in_collection(key, &api) && matches(object, &selector, field_name.as_deref())
                })
                .map(|(_, object)| object.clone())
                .collect();
            Json(json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": {"resourceVersion": guard.version.to_string()},
                "items": items,
            }))
        }
        (&Method::GET, Some(name), sub) => match guard.objects.get(&key_of(&api, name)) {
            None => not_found(&api, name),
            Some(object) if sub.as_deref() == Some("scale") => Json(scale_of(object)),
            Some(object) => Json(object.clone()),
        },
        (&Method::POST, None, None) => {
            let Some(object) = body else {
                return status(400, "BadRequest", "no JSON body");
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            let key = key_of(&api, &name);
            if guard.objects.contains_key(&key) {
                return status(409, "AlreadyExists", &format!("{} \"{name}\" already exists", api.resource));
            }
            let v = guard.store(key.clone(), object, "ADDED");
            let stored = guard.objects[&key].clone();
            drop(guard);
            version.send_replace(v);
            (StatusCode::CREATED, Json(stored)).into_response()
        }
        (&Method::PUT, Some(name), sub) => {
            let Some(object) = body else {
                return status(400, "BadRequest", "no JSON body");
            };
            let key = key_of(&api, name);
            let Some(current) = guard.objects.get(&key).cloned() else {
                return not_found(&api, name);
            };
            let wanted = object["metadata"]["resourceVersion"].as_str();
            if wanted.is_some_and(|w| Some(w) != current["metadata"]["resourceVersion"].as_str()) {
                return status(409, "Conflict", &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", api.resource));
            }
            let next = if sub.as_deref() == Some("status") {
                let mut next = current;
                next["status"] = object["status"].clone();
                next
            } else {
                object
            };
            let v = guard.store(key.clone(), next, "MODIFIED");
            let stored = guard.objects[&key].clone();
            drop(guard);
            version.send_replace(v);
            Json(stored)
        }
        (&Method::PATCH, Some(name), sub) => {
            let Some(patch) = body else {
                return status(400, "BadRequest", "no JSON body");
            };
            let key = key_of(&api, name);
            let apply = content_type.as_deref() == Some("application/apply-patch+yaml");
            let current = match guard.objects.get(&key).cloned() {
                Some(current) => current,
                None if apply => json!({}),
                None => return not_found(&api, name),
            };
            let next = if sub.as_deref() == Some("scale") {
                let mut next = current;
                if let Some(replicas) = patch["spec"]["replicas"].as_i64() {
                    next["spec"]["replicas"] = json!(replicas);
                }
                next
            } else {
                let mut next = current;
                merge(&mut next, &patch);
                next
            };
            let kind = if guard.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
            let v = guard.store(key.clone(), next, kind);
            let stored = guard.objects[&key].clone();
            drop(guard);
            version.send_replace(v);
            if sub.as_deref() == Some("scale") {
                Json(scale_of(&stored))
            } else {
                Json(stored)
            }
        }
        (&Method::DELETE, Some(name), None) => {
            let key = key_of(&api, name);
            let Some(object) = guard.objects.remove(&key) else {
                return not_found(&api, name);
            };
            guard.version += 1;
            let v = guard.version;
            guard.events.push((v, "DELETED", key, object.clone()));
            drop(guard);
            version.send_replace(v);
            Json(object)
        }
        _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
    }
}

#[allow(non_snake_case, reason = "reads like axum's Json")]
fn Json(value: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&value).unwrap_or_default(),
    )
        .into_response()
}

fn token_review(inner: &Inner, body: Value) -> Response {
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let status = match inner.reviews.get(token) {
        Some(review) => {
            // The API server answers the audiences both the token and the request name.
            let audiences: Vec<&String> =
                review.audiences.iter().filter(|a| wanted.contains(a)).collect();
            let authenticated = review.authenticated && (wanted.is_empty() || !audiences.is_empty());
            let mut status = json!({"authenticated": authenticated, "audiences": audiences});
            if authenticated {
                status["user"] = json!({"username": review.username});
            }
            if let Some(error) = &review.error {
                status["error"] = json!(error);
            }
            status
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    (
        StatusCode::CREATED,
        Json(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {},
            "spec": {"audiences": wanted},
            "status": status,
        })),
    )
        .into_response()
}

fn watch_stream(
    inner: Arc<Mutex<Inner>>,
    version: watch::Sender<u64>,
    api: ApiPath,
    selector: String,
    field_name: Option<String>,
    since: u64,
) -> Response {
    let changes = version.subscribe();
    let lines = futures_util::stream::unfold(
        (since, changes),
        move |(mut seen, mut changes)| {
            let inner = inner.clone();
            let api = api.clone();
            let selector = selector.clone();
            let field_name = field_name.clone();
            async move {
                loop {
                    let batch: Vec<(u64, Value)> = {
                        let inner = inner.lock().unwrap_or_else(PoisonError::into_inner);
                        inner
                            .events
                            .iter()
                            .filter(|(v, _, key, object)| {
                                *v > seen
                                    && in_collection(key, &api)
                                    && matches(object, &selector, field_name.as_deref())
                            })
                            .map(|(v, kind, _, object)| (*v, json!({"type": kind, "object": object})))
                            .collect()
                    };
                    if let Some(last) = batch.last() {
                        seen = last.0;
                        let mut text = Vec::new();
                        for (_, event) in batch {
                            text.extend(serde_json::to_vec(&event).unwrap_or_default());
                            text.push(b'\n');
                        }
                        return Some((Ok::<_, std::convert::Infallible>(Bytes::from(text)), (seen, changes)));
                    }
                    changes.changed().await.ok()?;
                }
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines.boxed()),
    )
        .into_response()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response()
}

fn not_found(api: &ApiPath, name: &str) -> Response {
    status(404, "NotFound", &format!("{} \"{name}\" not found", api.resource))
}

/// A Deployment's `autoscaling/v1` `Scale`.
fn scale_of(deployment: &Value) -> Value {
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": deployment["metadata"]["name"],
            "namespace": deployment["metadata"]["namespace"],
            "resourceVersion": deployment["metadata"]["resourceVersion"],
        },
        "spec": {"replicas": deployment["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": deployment["status"]["replicas"].as_i64().unwrap_or(0)},
    })
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in fields {
                if v.is_null() {
                    if let Some(map) = target.as_object_mut() {
                        map.remove(k);
                    }
                } else {
                    merge(&mut target[k.as_str()], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn parse(path: &str) -> Option<ApiPath> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.first()? {
        &"api" => (format!("/api/{}", parts.get(1)?), &parts[2..]),
        &"apis" => (
            format!("/apis/{}/{}", parts.get(1)?, parts.get(2)?),
            &parts[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    Some(ApiPath {
        prefix,
        namespace,
        resource: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn key_of(api: &ApiPath, name: &str) -> Key {
    (
        api.prefix.clone(),
        api.resource.clone(),
        api.namespace.clone().unwrap_or_default(),
        name.to_string(),
    )
}

fn in_collection(key: &Key, api: &ApiPath) -> bool {
    key.0 == api.prefix
        && key.1 == api.resource
        && api.namespace.as_ref().is_none_or(|ns| *ns == key.2)
}

fn matches(object: &Value, selector: &str, name: Option<&str>) -> bool {
    if name.is_some_and(|n| object["metadata"]["name"].as_str() != Some(n)) {
        return false;
    }
    let labels = &object["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k].as_str() == Some(v.trim_start_matches('='))
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else {
            labels.get(term).is_some()
        }
    })
}

fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
