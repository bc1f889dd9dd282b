//! ApiServerSource, locally: Mecha's own resources as Knative's API server events.
//!
//! `mecha up` publishes every resource it holds — Services, Revisions (with their `Ready`
//! condition), Brokers, Triggers, sources — as Knative-shaped JSON objects on a `watch`
//! channel ([`Objects`]). Each ApiServerSource diffs consecutive snapshots: an object that
//! appears is `add`, one whose JSON changed is `update` (so "a revision became ready" is an
//! update of that Revision), one that disappears is `delete`. As a Kubernetes informer does,
//! the first snapshot after the source starts is all `add`s.
//!
//! Events (Knative's, made by [`event`], which a cluster's receive adapter calls too): type
//! `dev.knative.apiserver.resource.{add,update,delete}` with the object as data (mode
//! `Resource`), or `dev.knative.apiserver.ref.{…}` with `{apiVersion, kind, name, namespace}`
//! (mode `Reference`, the default); subject `/apis/{apiVersion}/namespaces/{ns}/{plural}/{name}`
//! (locally the plural is the kind lower-cased plus `s`, right for every Mecha kind);
//! extensions `apiversion`, `kind`, `name`, `namespace`; source
//! [`crds::sources::API_SERVER_EVENT_SOURCE`]. Sent with the usual retries, one at a time in
//! order; an event whose retries all fail is lost (counted), and changes while `mecha up` is
//! not running are not replayed (the next start sends `add`s).
//!
//! Which objects: the source's resources (kind and label selector), in its own namespace or,
//! with `namespaceSelector: {}`, in every namespace, and with `owner`, only those with an
//! `ownerReferences` entry of that kind (a Service's Revisions).

use std::collections::BTreeMap;
use std::sync::Arc;

use crds::ApiServerSource;
use crds::apiserver::{REF_TYPE_PREFIX, RESOURCE_TYPE_PREFIX};
use eventing_broker::Event;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::SourceContext;

/// `(apiVersion, kind, namespace, name)`.
pub type ObjectKey = (String, String, String, String);

/// Every resource, by key.
pub type Objects = BTreeMap<ObjectKey, Object>;

/// One resource as an ApiServerSource sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub labels: BTreeMap<String, String>,
    /// The whole object, Knative-shaped (`apiVersion`, `kind`, `metadata`, `spec`, `status`).
    pub body: serde_json::Value,
}

/// What happened to an object between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Update,
    Delete,
}

#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    source: ApiServerSource,
}

/// The object an event is about, as its key names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectRef<'a> {
    pub api_version: &'a str,
    pub kind: &'a str,
    /// `None` for a cluster-scoped object.
    pub namespace: Option<&'a str>,
    pub name: &'a str,
}

/// How the events of one source are made: the attributes that do not depend on the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventAttributes<'a> {
    /// The `source` attribute: [`crds::sources::API_SERVER_EVENT_SOURCE`] locally, the API
    /// server's URL in a cluster.
    pub source: &'a str,
    /// The resource's plural in the subject (locally [`local_plural`], in a cluster from
    /// discovery).
    pub plural: &'a str,
    /// Whether data is the object (`Resource`) or a reference (`Reference`).
    pub resource_mode: bool,
}

// === impl Change ===

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Add => "add",
            Change::Update => "update",
            Change::Delete => "delete",
        }
    }
}

/// The changes from `before` to `after`, in key order (deletions with the object as it was).
pub fn changes<'a>(
    before: &'a Objects,
    after: &'a Objects,
) -> Vec<(Change, &'a ObjectKey, &'a Object)> {
    let mut out = Vec::new();
    for (key, object) in after {
        match before.get(key) {
            None => out.push((Change::Add, key, object)),
            Some(old) if old != object => out.push((Change::Update, key, object)),
            Some(_) => {}
        }
    }
    for (key, object) in before {
        if !after.contains_key(key) {
            out.push((Change::Delete, key, object));
        }
    }
    out
}

/// A Mecha kind's plural, as its subject names it: the kind lower-cased plus `s`.
pub fn local_plural(kind: &str) -> String {
    format!("{}s", kind.to_ascii_lowercase())
}

/// The CloudEvent for one `change` of `object` (`body` its whole JSON): Knative's type for the
/// mode and change, the attributes' `source`, subject
/// `/apis/{apiVersion}/namespaces/{ns}/{plural}/{name}` (`/apis/{apiVersion}/{plural}/{name}`
/// for a cluster-scoped object, which has no `namespace` extension either), extensions
/// `apiversion`, `kind`, `name`, `namespace`, JSON data. Both modes make their events here.
pub fn event(
    attributes: &EventAttributes<'_>,
    id: &str,
    change: Change,
    object: ObjectRef<'_>,
    body: &serde_json::Value,
) -> Event {
    let prefix = if attributes.resource_mode {
        RESOURCE_TYPE_PREFIX
    } else {
        REF_TYPE_PREFIX
    };
    let mut event = Event::new(
        id,
        attributes.source,
        &format!("{prefix}{}", change.as_str()),
    );
    let ObjectRef {
        api_version,
        kind,
        namespace,
        name,
    } = object;
    let plural = attributes.plural;
    let subject = match namespace {
        Some(ns) => format!("/apis/{api_version}/namespaces/{ns}/{plural}/{name}"),
        None => format!("/apis/{api_version}/{plural}/{name}"),
    };
    event.set("subject", subject);
    event.set("apiversion", api_version.to_string());
    event.set("kind", kind.to_string());
    event.set("name", name.to_string());
    if let Some(ns) = namespace {
        event.set("namespace", ns.to_string());
    }
    event.set("datacontenttype", "application/json");
    let data = if attributes.resource_mode {
        body.clone()
    } else {
        let mut reference = serde_json::json!({
            "apiVersion": api_version, "kind": kind, "name": name,
        });
        if let Some(ns) = namespace {
            reference["namespace"] = ns.into();
        }
        reference
    };
    event.data = Some(serde_json::to_vec(&data).unwrap_or_default().into());
    event
}

// === impl ApiServerConfig ===

impl ApiServerConfig {
    pub fn from_resource(source: &ApiServerSource) -> Self {
        Self {
            source: source.clone(),
        }
    }

    /// Whether the source watches this object: one of its resources (kind and labels), in
    /// its namespace (or any, with `namespaceSelector: {}`), owned as `owner` says.
    pub fn watches(&self, (api_version, kind, namespace, _): &ObjectKey, object: &Object) -> bool {
        let spec = &self.source.spec;
        (self.source.all_namespaces() || namespace == self.source.metadata.namespace())
            && spec
                .owner
                .as_ref()
                .is_none_or(|owner| owner.owns(&object.body))
            && spec.resources.iter().any(|resource| {
                resource.api_version == *api_version
                    && resource.kind == *kind
                    && resource
                        .selector
                        .as_ref()
                        .is_none_or(|selector| selector.matches(&object.labels))
            })
    }

    pub fn event(&self, change: Change, key: &ObjectKey, object: &Object) -> Event {
        let (api_version, kind, namespace, name) = key;
        let source = crds::sources::API_SERVER_EVENT_SOURCE;
        let plural = local_plural(kind);
        event(
            &EventAttributes {
                source,
                plural: &plural,
                resource_mode: self.source.resource_mode(),
            },
            &crate::ping::unique_id(source),
            change,
            ObjectRef {
                api_version,
                kind,
                namespace: Some(namespace),
                name,
            },
            &object.body,
        )
    }

    /// Follows `objects` until the context's shutdown, sending an event per change it watches.
    pub fn build(
        self,
        cx: SourceContext,
        mut objects: watch::Receiver<Arc<Objects>>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut seen = Arc::new(Objects::new());
            loop {
                let now = objects.borrow_and_update().clone();
                for (change, key, object) in changes(&seen, &now) {
                    if !self.watches(key, object) {
                        continue;
                    }
                    let event = self.event(change, key, object);
                    tokio::select! {
                        _ = cx.emit(event) => {}
                        () = cx.shutdown.clone().recv() => return,
                    }
                }
                seen = now;
                tokio::select! {
                    changed = objects.changed() => if changed.is_err() {
                        cx.set_problem(Some("the resource feed ended".into()));
                        cx.shutdown.clone().recv().await;
                        return;
                    },
                    () = cx.shutdown.clone().recv() => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str, name: &str) -> ObjectKey {
        (
            "serving.knative.dev/v1".into(),
            kind.into(),
            "default".into(),
            name.into(),
        )
    }

    fn object(ready: &str) -> Object {
        Object {
            labels: BTreeMap::from([("app".into(), "hello".into())]),
            body: serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": ready}]}}),
        }
    }

    #[test]
    fn snapshots_differ_by_adds_updates_and_deletes() {
        let before = Objects::from([
            (key("Revision", "a-00001"), object("Unknown")),
            (key("Service", "gone"), object("True")),
        ]);
        let after = Objects::from([
            (key("Revision", "a-00001"), object("True")),
            (key("Revision", "a-00002"), object("Unknown")),
        ]);
        let found: Vec<(Change, &str)> = changes(&before, &after)
            .into_iter()
            .map(|(change, key, _)| (change, key.3.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (Change::Update, "a-00001"),
                (Change::Add, "a-00002"),
                (Change::Delete, "gone")
            ]
        );
    }

    #[test]
    fn events_have_knatives_types_subject_extensions_and_data() {
        let source: ApiServerSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "sources.knative.dev/v1", "kind": "ApiServerSource",
            "metadata": {"name": "watch"},
            "spec": {
                "resources": [{"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                               "selector": {"matchLabels": {"app": "hello"}}}],
                "sink": {"uri": "http://127.0.0.1:9/"}
            }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let config = ApiServerConfig::from_resource(&source);
        let key = key("Revision", "a-00001");
        assert!(config.watches(&key, &object("True")));
        assert!(!config.watches(
            &key,
            &Object {
                labels: BTreeMap::new(),
                body: serde_json::Value::Null
            }
        ));
        let event = config.event(Change::Update, &key, &object("True"));
        assert_eq!(
            event.string("type").as_deref(),
            Some("dev.knative.apiserver.ref.update")
        );
        assert_eq!(
            event.string("subject").as_deref(),
            Some("/apis/serving.knative.dev/v1/namespaces/default/revisions/a-00001")
        );
        assert_eq!(event.string("kind").as_deref(), Some("Revision"));
        assert_eq!(
            event.string("apiversion").as_deref(),
            Some("serving.knative.dev/v1")
        );
        let data: serde_json::Value =
            serde_json::from_slice(event.data.as_deref().unwrap_or_default()).unwrap_or_default();
        assert_eq!(data["name"], "a-00001");
        assert_eq!(data["namespace"], "default");
    }

    #[test]
    fn owner_and_namespace_selector_filter_locally() {
        let source: ApiServerSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "sources.knative.dev/v1", "kind": "ApiServerSource",
            "metadata": {"name": "watch"},
            "spec": {
                "resources": [{"apiVersion": "serving.knative.dev/v1", "kind": "Revision"}],
                "owner": {"apiVersion": "serving.knative.dev/v1", "kind": "Service"},
                "namespaceSelector": {},
                "sink": {"uri": "http://127.0.0.1:9/"}
            }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let config = ApiServerConfig::from_resource(&source);
        let owned = Object {
            labels: BTreeMap::new(),
            body: serde_json::json!({"metadata": {"ownerReferences": [
                {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "hello"}]}}),
        };
        let mut elsewhere = key("Revision", "a-00001");
        elsewhere.2 = "team-b".into();
        assert!(config.watches(&elsewhere, &owned));
        let orphan = Object {
            labels: BTreeMap::new(),
            body: serde_json::json!({"metadata": {}}),
        };
        assert!(!config.watches(&elsewhere, &orphan));
    }

    #[test]
    fn a_cluster_scoped_object_has_no_namespace_in_its_subject_or_extensions() {
        let event = event(
            &EventAttributes {
                source: "https://10.96.0.1:443",
                plural: "namespaces",
                resource_mode: false,
            },
            "id-1",
            Change::Delete,
            ObjectRef {
                api_version: "v1",
                kind: "Namespace",
                namespace: None,
                name: "team-a",
            },
            &serde_json::Value::Null,
        );
        assert_eq!(
            event.string("subject").as_deref(),
            Some("/apis/v1/namespaces/team-a")
        );
        assert_eq!(event.string("namespace"), None);
        assert_eq!(
            event.string("source").as_deref(),
            Some("https://10.96.0.1:443")
        );
        assert_eq!(
            event.string("type").as_deref(),
            Some("dev.knative.apiserver.ref.delete")
        );
    }
}
