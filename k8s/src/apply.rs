//! Server-side apply with Mecha's one field manager ([`FIELD_MANAGER`], `mecha`).
//!
//! Every object the reconcilers make is applied whole, with `force`: Mecha owns what it
//! writes, and a field another manager took (an operator's `kubectl edit`) is taken back on
//! the next reconcile. What Mecha does not write stays with its owner — above all a
//! Deployment's `replicas`, which the autoscaler sets through the `scale` subresource and
//! [`crate::desired::deployment`] never includes. Status goes through the `status`
//! subresource, applied the same way.

use std::fmt::Debug;

use kube::api::{Api, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The field manager of everything Mecha applies.
pub const FIELD_MANAGER: &str = "mecha";
/// The field manager of a Deployment's first `replicas` (the revision's initial scale), set
/// once by [`create`]: an owner apart from [`FIELD_MANAGER`], so that applying the Deployment
/// without `replicas` afterwards does not remove the field.
pub const CREATE_MANAGER: &str = "mecha-initial-scale";

/// A failed API call: what was asked, of which object, and the API's answer.
#[derive(Debug, thiserror::Error)]
#[error("{action} {kind} {namespace}/{name}: {source}")]
pub struct ApiError {
    /// `apply`, `apply status`, `list`, …
    pub action: &'static str,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: Box<kube::Error>,
}

// === impl ApiError ===

impl ApiError {
    pub fn new<K: Resource<DynamicType = ()>>(
        action: &'static str,
        namespace: &str,
        name: &str,
        source: kube::Error,
    ) -> Self {
        Self {
            action,
            kind: K::kind(&()).into_owned(),
            namespace: namespace.into(),
            name: name.into(),
            source: Box::new(source),
        }
    }

    /// The HTTP status the API server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self.source.as_ref() {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        }
    }

    /// A short label for metrics: `conflict`, `not_found`, `api_{code}`, or `transport`.
    pub fn metric_label(&self) -> String {
        match self.code() {
            Some(409) => "conflict".into(),
            Some(404) => "not_found".into(),
            Some(code) => format!("api_{code}"),
            None => "transport".into(),
        }
    }
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies `object` (which names its namespace) and returns it as the API server now holds it.
pub async fn apply<K>(client: &kube::Client, object: &K) -> Result<K, ApiError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let body = with_type_meta::<K, _>(object)?;
    api.patch(&name, &params(), &Patch::Apply(body))
        .await
        .map_err(|e| ApiError::new::<K>("apply", &namespace, &name, e))
}

/// Applies `object` unless an object of its name exists that its controlling owner does not
/// control (a user's own Service of that name): `false`, and nothing is written.
pub async fn apply_if_ours<K>(client: &kube::Client, object: &K) -> Result<bool, ApiError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(|e| ApiError::new::<K>("get", &namespace, &name, e))?;
    let controller = |o: &K| {
        o.owner_references()
            .iter()
            .find(|r| r.controller == Some(true))
            .map(|r| r.uid.clone())
    };
    if let Some(existing) = existing
        && controller(&existing) != controller(object)
    {
        return Ok(false);
    }
    apply(client, object).await?;
    Ok(true)
}

/// Creates `object` (by [`CREATE_MANAGER`]) unless something of its name exists already.
pub async fn create<K>(client: &kube::Client, object: &K) -> Result<(), ApiError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let params = kube::api::PostParams {
        field_manager: Some(CREATE_MANAGER.into()),
        ..kube::api::PostParams::default()
    };
    match api.create(&params, object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(ApiError::new::<K>("create", &namespace, &name, e)),
    }
}

/// Applies `status` to `object`'s status subresource.
pub async fn apply_status<K, S>(
    client: &kube::Client,
    object: &K,
    status: &S,
) -> Result<K, ApiError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
    S: Serialize,
{
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name, "namespace": namespace },
        "status": status,
    });
    api.patch_status(&name, &params(), &Patch::Apply(body))
        .await
        .map_err(|e| ApiError::new::<K>("apply status", &namespace, &name, e))
}

/// An apply body must carry `apiVersion` and `kind`; k8s-openapi's types leave them out of
/// the struct, so they are set here from the type.
fn with_type_meta<K, T>(object: &T) -> Result<serde_json::Value, ApiError>
where
    K: Resource<DynamicType = ()>,
    T: Serialize + ResourceExt,
{
    let mut value = serde_json::to_value(object).map_err(|e| {
        ApiError::new::<K>(
            "serialize",
            &object.namespace().unwrap_or_default(),
            &object.name_any(),
            kube::Error::SerdeError(e),
        )
    })?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
        // Status is never applied with the object: it has its own subresource.
        map.remove("status");
    }
    Ok(value)
}
