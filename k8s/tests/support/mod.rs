//! The scripted API server: a `kube::Client` over an in-memory `tower::Service` that keeps
//! objects as JSON and answers the calls Mecha's reconcilers and actuators make — GET, LIST,
//! WATCH, POST, PUT, PATCH (server-side apply, merge and strategic merge, on the object, its
//! `status` or a Deployment's `scale`), DELETE with the garbage collector's cascade — records
//! every request (verb, group, resource, subresource, namespace, name, field manager, body),
//! and fails the next matching request with a chosen code (409 Conflict, …) when asked.
//!
//! Shared by every test file of the crate (`mod support;`): `tests/reconcile.rs` runs the
//! serving reconcilers against it, `tests/rbac.rs` checks what it recorded against the
//! ClusterRole. Not a Kubernetes API server: see [`ApiServer`] for what it models and what
//! it does not.
//!
//! ```ignore
//! let server = ApiServer::new();
//! server.fail_next("patch", "deployments", Some("scale"), 409); // the next scale PATCH fails
//! server.on("create", "tokenreviews", Arc::new(|request| (201, json!({ /* a TokenReview */ }))));
//! let client = server.client();                   // hand it to the code under test
//! server.create(&lease);                          // objects as a user or controller writes them
//! let d = server.wait_for("3 replicas", |s| {     // awaits store changes, panics after WAIT
//!     s.get::<Deployment>("default", "hello-00001-deployment")
//!         .filter(|d| d.spec.as_ref().and_then(|s| s.replicas) == Some(3))
//! }).await;
//! let calls = server.requests();                  // verb, group, resource, subresource, …
//! ```
//!
//! A new group of scenarios goes in a module beside [`serving`] with its own `ALL` list, which
//! `tests/rbac.rs` runs too, so its requests are checked against the roles.
#![allow(
    dead_code,
    reason = "each test file uses the part of the shared harness it needs"
)]

pub mod process;
pub mod runtime;
pub mod serving;
pub mod sources;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

/// The longest a test waits for the reconcilers to reach a state.
pub const WAIT: Duration = Duration::from_secs(20);

/// A request as the API server saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Recorded {
    /// Kubernetes' verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// API group (`""` for the core group).
    pub group: String,
    pub version: String,
    /// Plural resource name (`deployments`).
    pub resource: String,
    /// `status`, `scale`, or `None` for the object itself.
    pub subresource: Option<String>,
    /// `None` for cluster-wide requests (a LIST or WATCH across namespaces).
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// The PATCH content type (`application/apply-patch+yaml`, …).
    pub content_type: Option<String>,
    /// The request body as JSON (`Null` without one).
    pub body: JsonEq,
    /// Whether a PATCH (a server-side apply) created the object, which the API server
    /// authorizes as `create` too.
    pub created: bool,
}

/// A JSON value that orders by its text (so [`Recorded`] can be sorted and deduplicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonEq(pub Value);

impl PartialOrd for JsonEq {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for JsonEq {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.to_string().cmp(&other.0.to_string())
    }
}

/// A canned answer for requests the store does not model (a `TokenReview`, …): given the
/// request and its body, the status code and the JSON body to answer with.
pub type Handler = Arc<dyn Fn(&Recorded) -> (u16, Value) + Send + Sync>;

/// The scripted API server. Cloning gives another handle on the same store.
///
/// What it models: objects keyed by (group, resource, namespace, name) with `uid`,
/// `resourceVersion` (one counter for the store), `generation` (bumped when anything but
/// `metadata` and `status` changes), `creationTimestamp`; the `status` subresource of every
/// kind (a write to the object keeps its status, a write to `status` changes only that); a
/// Deployment's `scale` subresource (`spec.replicas`); watches from a resource version, with
/// label selectors (`k`, `!k`, `k=v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`) and
/// `metadata.name`/`metadata.namespace` field selectors; the discovery documents
/// (`/api/v1`, `/apis/{group}/{version}`) of the kinds in [`DISCOVERY`], unrecorded; a
/// write that changes nothing neither bumps the version nor wakes watchers;
/// deleting an object deletes, transitively, every object whose `ownerReferences` name it,
/// and an object written with owners none of which exists is deleted at once.
///
/// What it does not: server-side apply's field ownership (an apply is a deep merge of the
/// applied object into the stored one, lists replaced; a field dropped from the applied
/// object stays), admission and schema validation, strategic merge's list keys, pagination,
/// bookmarks, watch timeouts.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
}

struct Shared {
    store: Mutex<Store>,
    /// The store's resource version after every change, for watches and waiters.
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    version: u64,
    uids: u64,
    events: Vec<Event>,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
    handlers: Vec<(String, String, Handler)>,
}

/// (group, resource, namespace, name); namespace `""` for cluster-scoped objects.
type Key = (String, String, String, String);

#[derive(Clone)]
struct Event {
    version: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

struct Fault {
    verb: String,
    resource: String,
    subresource: Option<String>,
    code: u16,
}

/// The parts of a request path.
struct Target {
    group: String,
    version: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

// === impl ApiServer ===

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").finish_non_exhaustive()
    }
}

impl ApiServer {
    pub fn new() -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                store: Mutex::default(),
                changes,
            }),
        }
    }

    /// A client whose every request this server answers (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    // --- the test's side: objects as a user or another controller writes them, unrecorded

    /// Creates `object` as a user would (`kubectl create`), status included.
    pub fn create<K>(&self, object: &K) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut value = serde_json::to_value(object).expect("serializable");
        value["apiVersion"] = K::api_version(&()).into();
        value["kind"] = K::kind(&()).into();
        let key = key_of::<K>(&value);
        let mut store = self.store();
        assert!(!store.objects.contains_key(&key), "{key:?} exists already");
        let stored = store.write(key, None, value);
        drop(store);
        self.notify();
        serde_json::from_value(stored).expect("stored object")
    }

    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let key = (
            K::group(&()).into_owned(),
            K::plural(&()).into_owned(),
            namespace.to_string(),
            name.to_string(),
        );
        let value = self.store().objects.get(&key).cloned()?;
        Some(serde_json::from_value(value).expect("a stored object of its kind"))
    }

    /// Every object of kind `K`, in every namespace, ordered by namespace and name.
    pub fn list<K>(&self) -> Vec<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let (group, resource) = (K::group(&()), K::plural(&()));
        self.store()
            .objects
            .iter()
            .filter(|((g, r, _, _), _)| *g == group && *r == resource)
            .map(|(_, v)| serde_json::from_value(v.clone()).expect("a stored object"))
            .collect()
    }

    /// Changes an object as a user or another controller would (a `PUT` of the whole object:
    /// spec, metadata and status), bumping `generation` when the spec changed.
    pub fn update<K>(&self, namespace: &str, name: &str, change: impl FnOnce(&mut K)) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut object: K = self
            .get(namespace, name)
            .unwrap_or_else(|| panic!("no {} {namespace}/{name}", K::kind(&())));
        change(&mut object);
        let mut value = serde_json::to_value(&object).expect("serializable");
        value["apiVersion"] = K::api_version(&()).into();
        value["kind"] = K::kind(&()).into();
        let key = key_of::<K>(&value);
        let mut store = self.store();
        let old = store.objects.get(&key).cloned();
        let stored = store.write(key, old.as_ref(), value);
        drop(store);
        self.notify();
        serde_json::from_value(stored).expect("stored object")
    }

    /// Deletes an object as a user would; the garbage collector deletes what it owned.
    pub fn delete<K>(&self, namespace: &str, name: &str) -> bool
    where
        K: Resource<DynamicType = ()>,
    {
        let key = (
            K::group(&()).into_owned(),
            K::plural(&()).into_owned(),
            namespace.to_string(),
            name.to_string(),
        );
        let deleted = self.store().delete(&key).is_some();
        self.notify();
        deleted
    }

    // --- scripting and inspection

    /// The next request with this verb on this resource (and subresource) is answered with
    /// `code` (409: a Conflict `Status`) instead of being served; queue several for several.
    pub fn fail_next(&self, verb: &str, resource: &str, subresource: Option<&str>, code: u16) {
        self.store().faults.push(Fault {
            verb: verb.into(),
            resource: resource.into(),
            subresource: subresource.map(Into::into),
            code,
        });
    }

    /// Answers every request with this verb on this resource with `handler` (for kinds the
    /// store does not model, such as a `TokenReview`); the request is still recorded.
    pub fn on(&self, verb: &str, resource: &str, handler: Handler) {
        self.store()
            .handlers
            .push((verb.into(), resource.into(), handler));
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.store().requests.clone()
    }

    /// Waits until `check` returns something (it is asked again after every change to the
    /// store), at most [`WAIT`]; panics naming `what` and the requests seen when it never does.
    pub async fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&Self) -> Option<T>) -> T {
        let mut changes = self.shared.changes.subscribe();
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(found) = check(self) {
                    return found;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        match waited {
            Ok(found) => found,
            Err(_) => {
                let requests: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {}/{}{} {}/{}",
                            r.verb,
                            r.group,
                            r.resource,
                            r.subresource
                                .as_deref()
                                .map(|s| format!("/{s}"))
                                .unwrap_or_default(),
                            r.namespace.as_deref().unwrap_or("*"),
                            r.name.as_deref().unwrap_or("")
                        )
                    })
                    .collect();
                panic!(
                    "timed out after {WAIT:?} waiting for {what}; requests seen:\n{}",
                    requests.join("\n")
                )
            }
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        // Waiters wake after every request, even one that changed nothing (a failed write
        // may be what a test waits for).
        let version = self.store().version;
        self.shared.changes.send_replace(version);
    }

    // --- the API's side

    /// Answers one request (what [`ApiServer::client`] sends, or a test's HTTP server).
    pub async fn handle(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        // Discovery documents are non-resource URLs every authenticated client may read
        // (Kubernetes' `system:discovery` role): answered, not recorded.
        if parts.method == Method::GET
            && let Some(group_version) = discovery_path(parts.uri.path())
        {
            return match discovery(&group_version) {
                Some(document) => respond(200, &document),
                None => status(
                    404,
                    "NotFound",
                    &format!("the server could not find the requested resource ({group_version})"),
                ),
            };
        }
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return status(400, "BadRequest", &format!("reading the body: {e}")),
        };
        let Some(target) = parse_path(parts.uri.path()) else {
            return status(
                404,
                "NotFound",
                &format!("no such path {}", parts.uri.path()),
            );
        };
        let query = parse_query(parts.uri.query().unwrap_or(""));
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (&parts.method, target.name.is_some()) {
            (&Method::GET, true) => "get",
            (&Method::GET, false) if watching => "watch",
            (&Method::GET, false) => "list",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => return status(405, "MethodNotAllowed", "method not allowed"),
        };
        let json_body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", &format!("body is not JSON: {e}")),
            }
        };
        let recorded = Recorded {
            verb: verb.into(),
            group: target.group.clone(),
            version: target.version.clone(),
            resource: target.resource.clone(),
            subresource: target.subresource.clone(),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            field_manager: query.get("fieldManager").cloned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .filter(|_| verb == "patch")
                .map(Into::into),
            body: JsonEq(json_body.clone()),
            created: false,
        };

        let mut store = self.store();
        let index = store.requests.len();
        store.requests.push(recorded.clone());
        let fault = store.faults.iter().position(|f| {
            f.verb == verb && f.resource == target.resource && f.subresource == target.subresource
        });
        if let Some(index) = fault {
            let fault = store.faults.remove(index);
            drop(store);
            self.notify();
            let reason = match fault.code {
                409 => "Conflict",
                404 => "NotFound",
                500 => "InternalError",
                _ => "Failure",
            };
            return status(
                fault.code,
                reason,
                &format!(
                    "Operation cannot be fulfilled on {} {:?}: scripted failure",
                    target.resource,
                    target.name.as_deref().unwrap_or("")
                ),
            );
        }
        let handler = store
            .handlers
            .iter()
            .find(|(v, r, _)| v == verb && *r == target.resource)
            .map(|(_, _, h)| h.clone());
        drop(store);
        if let Some(handler) = handler {
            let (code, body) = handler(&recorded);
            self.notify();
            return respond(code, &body);
        }

        let response = match verb {
            "get" => self.get_one(&target),
            "list" => self.list_all(&target, &query),
            "watch" => return self.watch(&target, &query),
            "create" => self.create_one(&target, json_body),
            "update" => self.update_one(&target, json_body),
            "patch" => {
                let content_type = recorded.content_type.as_deref().unwrap_or("");
                self.patch_one(&target, content_type, json_body)
            }
            "delete" => self.delete_one(&target),
            _ => status(405, "MethodNotAllowed", "method not allowed"),
        };
        if verb == "patch"
            && response.status() == StatusCode::CREATED
            && let Some(request) = self.store().requests.get_mut(index)
        {
            request.created = true;
        }
        self.notify();
        response
    }

    fn get_one(&self, target: &Target) -> Response<Body> {
        let store = self.store();
        let Some(object) = store.objects.get(&target.key()) else {
            return not_found(target);
        };
        match target.subresource.as_deref() {
            Some("scale") => respond(200, &scale_of(object)),
            _ => respond(200, object),
        }
    }

    fn list_all(&self, target: &Target, query: &BTreeMap<String, String>) -> Response<Body> {
        let store = self.store();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|(key, object)| target.matches(key) && selected(object, query))
            .map(|(_, v)| v.clone())
            .collect();
        respond(
            200,
            &json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": { "resourceVersion": store.version.to_string() },
                "items": items,
            }),
        )
    }

    fn watch(&self, target: &Target, query: &BTreeMap<String, String>) -> Response<Body> {
        let from: Option<u64> = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .filter(|v| *v > 0);
        let store = self.store();
        // Without a version: every current object as ADDED, then what follows.
        let mut initial = Vec::new();
        let start = match from {
            Some(version) => version,
            None => {
                for (key, object) in &store.objects {
                    if target.matches(key) && selected(object, query) {
                        initial.push(watch_line("ADDED", object));
                    }
                }
                store.version
            }
        };
        drop(store);
        let server = self.clone();
        let filter = Target {
            group: target.group.clone(),
            version: target.version.clone(),
            resource: target.resource.clone(),
            namespace: target.namespace.clone(),
            name: None,
            subresource: None,
        };
        let query = query.clone();
        let changes = self.shared.changes.subscribe();
        let stream = futures_util::stream::unfold(
            (start, changes, initial),
            move |(mut seen, mut changes, mut pending)| {
                let server = server.clone();
                let filter = Target {
                    group: filter.group.clone(),
                    version: filter.version.clone(),
                    resource: filter.resource.clone(),
                    namespace: filter.namespace.clone(),
                    name: None,
                    subresource: None,
                };
                let query = query.clone();
                async move {
                    loop {
                        if !pending.is_empty() {
                            let chunk: Vec<u8> = pending.concat();
                            pending.clear();
                            let frame = http_body::Frame::data(Bytes::from(chunk));
                            return Some((Ok::<_, Infallible>(frame), (seen, changes, pending)));
                        }
                        {
                            let store = server.store();
                            for event in store.events.iter().filter(|e| e.version > seen) {
                                if filter.matches(&event.key) && selected(&event.object, &query) {
                                    pending.push(watch_line(event.kind, &event.object));
                                }
                            }
                            seen = seen.max(store.version);
                        }
                        if pending.is_empty() && changes.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            },
        );
        let body = StreamBody::new(stream).boxed_unsync();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::OK;
        response
    }

    fn create_one(&self, target: &Target, mut body: Value) -> Response<Body> {
        let name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(String::from);
        let Some(name) = name else {
            return status(422, "Invalid", "metadata.name: Required value");
        };
        if let (Some(ns), Some(map)) = (&target.namespace, body.as_object_mut()) {
            let meta = map.entry("metadata").or_insert_with(|| json!({}));
            meta["namespace"] = ns.clone().into();
        }
        let key = (
            target.group.clone(),
            target.resource.clone(),
            target.namespace.clone().unwrap_or_default(),
            name,
        );
        let mut store = self.store();
        if store.objects.contains_key(&key) {
            return status(409, "AlreadyExists", &format!("{key:?} already exists"));
        }
        let stored = store.write(key, None, body);
        respond(201, &stored)
    }

    fn update_one(&self, target: &Target, body: Value) -> Response<Body> {
        let key = target.key();
        let mut store = self.store();
        let Some(old) = store.objects.get(&key).cloned() else {
            return not_found(target);
        };
        let asked = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        let held = old
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str);
        if asked.is_some() && asked != held {
            return status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
        let new = match target.subresource.as_deref() {
            Some("status") => with_status_of(&old, &body),
            Some("scale") => {
                let mut new = old.clone();
                new["spec"]["replicas"] =
                    body.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                new
            }
            _ => with_status_of(&body, &old),
        };
        let stored = store.write(key, Some(&old), new);
        match target.subresource.as_deref() {
            Some("scale") => respond(200, &scale_of(&stored)),
            _ => respond(200, &stored),
        }
    }

    fn patch_one(&self, target: &Target, content_type: &str, patch: Value) -> Response<Body> {
        if content_type.starts_with("application/json-patch") {
            return status(415, "UnsupportedMediaType", "JSON patch is not scripted");
        }
        let apply = content_type.starts_with("application/apply-patch");
        let key = target.key();
        let mut store = self.store();
        let old = store.objects.get(&key).cloned();
        let new = match (old.as_ref(), target.subresource.as_deref()) {
            (None, None) if apply => {
                let mut created = patch;
                if let (Some(ns), Some(map)) = (&target.namespace, created.as_object_mut()) {
                    let meta = map.entry("metadata").or_insert_with(|| json!({}));
                    meta["namespace"] = ns.clone().into();
                }
                if let Some(map) = created.as_object_mut() {
                    map.remove("status");
                }
                created
            }
            (None, _) => return not_found(target),
            (Some(old), Some("status")) => {
                let mut new = old.clone();
                if let Some(status) = patch.get("status") {
                    merge(
                        new.as_object_mut()
                            .map(|m| m.entry("status").or_insert_with(|| json!({})))
                            .expect("an object"),
                        status,
                    );
                }
                new
            }
            (Some(old), Some("scale")) => {
                let mut new = old.clone();
                if let Some(replicas) = patch.pointer("/spec/replicas") {
                    new["spec"]["replicas"] = replicas.clone();
                }
                new
            }
            (Some(old), _) => {
                let mut new = old.clone();
                let mut patch = patch;
                if let Some(map) = patch.as_object_mut() {
                    map.remove("status");
                }
                merge(&mut new, &patch);
                new
            }
        };
        let stored = store.write(key, old.as_ref(), new);
        match target.subresource.as_deref() {
            Some("scale") => respond(200, &scale_of(&stored)),
            _ => respond(if old.is_some() { 200 } else { 201 }, &stored),
        }
    }

    fn delete_one(&self, target: &Target) -> Response<Body> {
        match self.store().delete(&target.key()) {
            Some(object) => respond(200, &object),
            None => not_found(target),
        }
    }
}

// === impl Store ===

impl Store {
    /// Stores `new` under `key` (over `old`), filling in what the API server sets; a write
    /// that changes nothing is not one.
    fn write(&mut self, key: Key, old: Option<&Value>, mut new: Value) -> Value {
        let meta = new
            .as_object_mut()
            .map(|m| m.entry("metadata").or_insert_with(|| json!({})).clone())
            .unwrap_or_default();
        let mut meta = meta;
        let old_meta = old.and_then(|o| o.get("metadata")).cloned();
        match &old_meta {
            Some(old_meta) => {
                for kept in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
                    match old_meta.get(kept) {
                        Some(v) => meta[kept] = v.clone(),
                        None => {
                            if let Some(m) = meta.as_object_mut() {
                                m.remove(kept);
                            }
                        }
                    }
                }
            }
            None => {
                self.uids += 1;
                meta["uid"] = format!("00000000-0000-4000-8000-{:012}", self.uids).into();
                meta["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
                meta["generation"] = 1.into();
            }
        }
        new["metadata"] = meta;
        if let Some(old) = old {
            if *old == new {
                return new;
            }
            if without_meta_and_status(old) != without_meta_and_status(&new) {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                new["metadata"]["generation"] = (generation + 1).into();
            }
        }
        self.version += 1;
        new["metadata"]["resourceVersion"] = self.version.to_string().into();
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.objects.insert(key.clone(), new.clone());
        self.events.push(Event {
            version: self.version,
            key: key.clone(),
            kind,
            object: new.clone(),
        });
        // The garbage collector removes an object whose owners are all gone (made by a
        // reconcile that raced its owner's deletion).
        if self.orphaned(&new) {
            self.delete(&key);
        }
        new
    }

    /// Whether `object` has owners and none of them exists.
    fn orphaned(&self, object: &Value) -> bool {
        let Some(owners) = object
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .filter(|o| !o.is_empty())
        else {
            return false;
        };
        owners.iter().all(|owner| {
            !self
                .objects
                .values()
                .any(|o| o.pointer("/metadata/uid") == owner.get("uid"))
        })
    }

    /// Deletes the object and, as the garbage collector does, every object it owns.
    fn delete(&mut self, key: &Key) -> Option<Value> {
        let object = self.objects.remove(key)?;
        self.version += 1;
        let mut gone = object.clone();
        gone["metadata"]["resourceVersion"] = self.version.to_string().into();
        self.events.push(Event {
            version: self.version,
            key: key.clone(),
            kind: "DELETED",
            object: gone,
        });
        let uid = object.pointer("/metadata/uid").cloned();
        let owned: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r.get("uid") == uid.as_ref()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            self.delete(&key);
        }
        Some(object)
    }
}

// === impl Target ===

impl Target {
    fn key(&self) -> Key {
        (
            self.group.clone(),
            self.resource.clone(),
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }

    /// Whether a stored object's key is within this (collection) target.
    fn matches(&self, key: &Key) -> bool {
        key.0 == self.group
            && key.1 == self.resource
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.2)
    }
}

fn key_of<K: Resource<DynamicType = ()>>(value: &Value) -> Key {
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (
        K::group(&()).into_owned(),
        K::plural(&()).into_owned(),
        text("/metadata/namespace"),
        text("/metadata/name"),
    )
}

/// `/api/v1/...` or `/apis/{group}/{version}/...`, then `[namespaces/{ns}/]{resource}[/{name}[/{sub}]]`.
fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => (String::new(), (*version).to_string(), rest),
        ["apis", group, version, rest @ ..] => ((*group).to_string(), (*version).to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        rest => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (resource, None, None),
        [resource, name] => (resource, Some(*name), None),
        [resource, name, sub] => (resource, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Target {
        group,
        version,
        resource: (*resource).to_string(),
        namespace,
        name: name.map(percent_decode),
        subresource: subresource.map(String::from),
    })
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
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

/// Whether `object` passes the query's label and field selectors.
fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    let labels = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object);
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let labels_ok = query.get("labelSelector").is_none_or(|selector| {
        selector_terms(selector).iter().all(|term| {
            let set = |values: &str| -> Vec<String> {
                values
                    .trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect()
            };
            if let Some((k, values)) = term.split_once(" notin ") {
                label(k.trim()).is_none_or(|v| !set(values).iter().any(|x| x == v))
            } else if let Some((k, values)) = term.split_once(" in ") {
                label(k.trim()).is_some_and(|v| set(values).iter().any(|x| x == v))
            } else if let Some((k, v)) = term.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(term.trim()).is_some()
            }
        })
    });
    let fields_ok = query.get("fieldSelector").is_none_or(|selector| {
        selector.split(',').filter(|t| !t.is_empty()).all(|term| {
            let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) else {
                return false;
            };
            let pointer = format!("/{}", k.trim().replace('.', "/"));
            object.pointer(&pointer).and_then(Value::as_str) == Some(v.trim())
        })
    });
    labels_ok && fields_ok
}

/// A label selector's terms: split at the commas outside `( … )` (`a in (x,y),b`).
fn selector_terms(selector: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let (mut depth, mut current) = (0usize, String::new());
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms.retain(|t| !t.trim().is_empty());
    terms
}

/// `/api/v1` → `v1`, `/apis/{group}/{version}` → `{group}/{version}`: a discovery document.
fn discovery_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", version] => Some((*version).to_string()),
        ["apis", group, version] => Some(format!("{group}/{version}")),
        _ => None,
    }
}

/// The resources the scripted server describes in its discovery documents:
/// (group version, plural, kind, namespaced). Plurals are the API server's, not the kind
/// lower-cased plus `s` (`networkpolicies`).
pub const DISCOVERY: &[(&str, &str, &str, bool)] = &[
    ("v1", "pods", "Pod", true),
    ("v1", "namespaces", "Namespace", false),
    ("v1", "configmaps", "ConfigMap", true),
    ("v1", "services", "Service", true),
    ("v1", "secrets", "Secret", true),
    ("apps/v1", "deployments", "Deployment", true),
    ("apps/v1", "replicasets", "ReplicaSet", true),
    (
        "networking.k8s.io/v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
    ("serving.knative.dev/v1", "services", "Service", true),
    ("serving.knative.dev/v1", "revisions", "Revision", true),
];

/// The `APIResourceList` of a group version, as the API server serves it.
fn discovery(group_version: &str) -> Option<Value> {
    let resources: Vec<Value> = DISCOVERY
        .iter()
        .filter(|(gv, ..)| *gv == group_version)
        .map(|(_, plural, kind, namespaced)| {
            json!({
                "name": plural,
                "singularName": kind.to_ascii_lowercase(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    (!resources.is_empty()).then(|| {
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        })
    })
}

/// JSON merge (RFC 7386): objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge(target.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// `object` with the `status` of `source`.
fn with_status_of(object: &Value, source: &Value) -> Value {
    let mut new = object.clone();
    if let Some(map) = new.as_object_mut() {
        match source.get("status") {
            Some(status) => {
                map.insert("status".into(), status.clone());
            }
            None => {
                map.remove("status");
            }
        }
    }
    new
}

fn without_meta_and_status(object: &Value) -> Value {
    let mut rest = object.clone();
    if let Some(map) = rest.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    rest
}

/// A Deployment's `scale` subresource (`autoscaling/v1` `Scale`).
fn scale_of(deployment: &Value) -> Value {
    let selector = deployment
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": deployment.pointer("/metadata/name"),
            "namespace": deployment.pointer("/metadata/namespace"),
            "resourceVersion": deployment.pointer("/metadata/resourceVersion"),
            "uid": deployment.pointer("/metadata/uid"),
        },
        "spec": { "replicas": deployment.pointer("/spec/replicas").cloned().unwrap_or(json!(1)) },
        "status": {
            "replicas": deployment.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

fn watch_line(kind: &str, object: &Value) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({ "type": kind, "object": object })).expect("JSON serializes");
    line.push(b'\n');
    line
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON serializes");
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A `Status` failure, as the API server answers one.
fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

fn not_found(target: &Target) -> Response<Body> {
    status(
        404,
        "NotFound",
        &format!(
            "{} {:?} not found",
            target.resource,
            target.name.as_deref().unwrap_or("")
        ),
    )
}
