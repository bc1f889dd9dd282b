//! The Service and Revision reconcilers.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mecha_common::ShutdownSignal;
use tracing::instrument;

use super::{Context, Error, drain, now};
use crate::apply::{self, ApiError};
use crate::crd::{Revision, Service, SinkBinding};
use crate::{admission, desired, status};

const SERVICE: &str = "Service";
const REVISION: &str = "Revision";

/// The Service controller: watches Services and the Revisions they own.
pub(super) async fn services(context: Arc<Context>, shutdown: ShutdownSignal) {
    let client = context.client.clone();
    let stream = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Revision>::all(client.clone()),
        watcher::Config::default().labels(desired::SERVICE_LABEL),
    )
    .owns(
        Api::<KubeService>::all(client),
        watcher::Config::default().labels(desired::SERVICE_LABEL),
    )
    .graceful_shutdown_on(shutdown.recv())
    .run(reconcile_service, service_error, context.clone());
    drain(SERVICE, context, stream).await;
}

/// The Revision controller: watches Revisions, the Deployments and Services they own, and
/// their pods (which a ReplicaSet owns; the revision label leads back).
pub(super) async fn revisions(context: Arc<Context>, shutdown: ShutdownSignal) {
    let client = context.client.clone();
    let ours = || watcher::Config::default().labels(desired::REVISION_LABEL);
    let controller = Controller::new(
        Api::<Revision>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Deployment>::all(client.clone()), ours())
    .owns(Api::<KubeService>::all(client.clone()), ours())
    .watches(Api::<Pod>::all(client.clone()), ours(), |pod: Pod| {
        let revision = pod.labels().get(desired::REVISION_LABEL)?.clone();
        Some(ObjectRef::<Revision>::new(&revision).within(&pod.namespace()?))
    });
    // A SinkBinding's change reaches the revisions of its namespace (its subjects are there).
    let controller = if context.settings.sources.is_some() {
        let revisions = controller.store();
        controller.watches(
            Api::<SinkBinding>::all(client),
            watcher::Config::default(),
            move |binding: SinkBinding| {
                let namespace = binding.namespace();
                revisions
                    .state()
                    .iter()
                    .filter(|r| r.namespace() == namespace)
                    .map(|r| ObjectRef::from_obj(r.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
    } else {
        controller
    };
    let stream = controller.graceful_shutdown_on(shutdown.recv()).run(
        reconcile_revision,
        revision_error,
        context.clone(),
    );
    drain(REVISION, context, stream).await;
}

fn service_error(service: Arc<Service>, error: &Error, context: Arc<Context>) -> Action {
    context.failed(SERVICE, service.as_ref(), error)
}

fn revision_error(revision: Arc<Revision>, error: &Error, context: Arc<Context>) -> Action {
    context.failed(REVISION, revision.as_ref(), error)
}

#[instrument(skip_all, fields(namespace = service.namespace(), name = service.name_any()))]
async fn reconcile_service(service: Arc<Service>, context: Arc<Context>) -> Result<Action, Error> {
    if service.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    match service_steps(&service, &context).await {
        Ok(action) => {
            context.succeeded(SERVICE, service.as_ref());
            Ok(action)
        }
        // A name taken by someone else's object: the status already says so.
        Err(error @ Error::NotOwned { .. }) => Err(error),
        Err(error) => {
            let previous = service.status.clone().unwrap_or_default();
            let failed = status::failed(previous, error.reason(), &error.to_string(), &now());
            report(&context, service.as_ref(), service.status.as_ref(), &failed).await;
            Err(error)
        }
    }
}

/// Check, make the next Revision if the template changed, point the cluster-local name at the
/// gateway, write the status.
async fn service_steps(service: &Service, context: &Context) -> Result<Action, Error> {
    let client = &context.client;
    let namespace = service.namespace().unwrap_or_default();
    let name = service.name_any();

    if let Some(refusal) = admission::service(service) {
        let previous = service.status.clone().unwrap_or_default();
        let refused = status::refused(previous, &refusal, service.metadata.generation, &now());
        write_status(client, service, service.status.as_ref(), &refused).await?;
        // Nothing to retry: the user has to change the spec, which wakes us.
        return Ok(Action::await_change());
    }

    let api: Api<Revision> = Api::namespaced(client.clone(), &namespace);
    let listed = api
        .list(&ListParams::default().labels(&format!("{}={name}", desired::SERVICE_LABEL)))
        .await
        .map_err(|e| ApiError::new::<Revision>("list", &namespace, &format!("{name}-*"), e))?;
    let uid = service.uid();
    let mut revisions: Vec<Revision> = listed
        .items
        .into_iter()
        .filter(|r| {
            r.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .collect();

    if let Some(next) = desired::next_revision(service, &revisions) {
        tracing::info!(revision = next.name_any(), "new revision");
        let created = apply::apply(client, &next).await?;
        revisions.push(created);
    }

    let computed = status::service(service, &revisions, &context.settings.addresses, &now());
    // Knative's placeholder Service: a user's own Service of this name is left alone, and
    // the Service is not ready while it is there (revisions are still made).
    let cluster_local =
        desired::cluster_local_service(service, &context.settings.addresses.gateway_host)
            .ok_or_else(|| Error::Invalid {
                kind: SERVICE,
                namespace: namespace.clone(),
                name: name.clone(),
                message: "no name".into(),
            })?;
    if !apply::apply_if_ours(client, &cluster_local).await? {
        let error = Error::NotOwned {
            kind: "Service".into(),
            namespace,
            name,
        };
        let failed = status::failed(computed, error.reason(), &error.to_string(), &now());
        write_status(client, service, service.status.as_ref(), &failed).await?;
        return Err(error);
    }
    write_status(client, service, service.status.as_ref(), &computed).await?;
    Ok(Action::requeue(context.settings.resync))
}

#[instrument(skip_all, fields(namespace = revision.namespace(), name = revision.name_any()))]
async fn reconcile_revision(
    revision: Arc<Revision>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    if revision.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    match revision_steps(&revision, &context).await {
        Ok(action) => {
            context.succeeded(REVISION, revision.as_ref());
            Ok(action)
        }
        Err(error) => {
            let previous = revision.status.clone().unwrap_or_default();
            let failed = status::failed(previous, error.reason(), &error.to_string(), &now());
            report(
                &context,
                revision.as_ref(),
                revision.status.as_ref(),
                &failed,
            )
            .await;
            Err(error)
        }
    }
}

/// `K_SINK` and `K_CE_OVERRIDES` from the SinkBindings selecting the revision's Service (its
/// labels read from the Service itself, as a binding's selector means them).
async fn bound_env(
    client: &kube::Client,
    revision: &Revision,
    sinks: &crate::sources::SinkSettings,
) -> Result<Vec<(String, String)>, Error> {
    let namespace = revision.namespace().unwrap_or_default();
    let bindings = Api::<SinkBinding>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .map_err(|e| ApiError::new::<SinkBinding>("list", &namespace, "", e))?;
    if bindings.items.is_empty() {
        return Ok(Vec::new());
    }
    let service = revision
        .labels()
        .get(desired::SERVICE_LABEL)
        .cloned()
        .unwrap_or_default();
    let labels = Api::<Service>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().fields(&format!("metadata.name={service}")))
        .await
        .map_err(|e| ApiError::new::<Service>("list", &namespace, &service, e))?
        .items
        .first()
        .and_then(|s| s.metadata.labels.clone())
        .unwrap_or_default();
    Ok(crate::sources::binding_env(
        &bindings.items,
        &namespace,
        &service,
        &labels,
        sinks,
    ))
}

/// Apply the Deployment and the headless Service, write the status from what came back.
async fn revision_steps(revision: &Revision, context: &Context) -> Result<Action, Error> {
    let client = &context.client;
    let invalid = |message: &str| Error::Invalid {
        kind: REVISION,
        namespace: revision.namespace().unwrap_or_default(),
        name: revision.name_any(),
        message: message.into(),
    };
    let mut deployment = desired::deployment(revision, &context.settings.pods)
        .ok_or_else(|| invalid("spec.containers: a revision runs one container; it has none"))?;
    if let Some(sinks) = &context.settings.sources {
        let env = bound_env(client, revision, sinks).await?;
        crate::sources::bind_env(&mut deployment, &env);
    }
    let headless = desired::headless_service(revision).ok_or_else(|| invalid("no name"))?;
    // A revision that asks for another initial scale than the API server's default (1)
    // starts at it: the Deployment is created with those replicas the first time round, then
    // applied without them like any other (the autoscaler owns them from then on).
    if revision.status.is_none()
        && let Some(initial) = desired::initial_replicas(revision)
    {
        let mut first = deployment.clone();
        if let Some(spec) = first.spec.as_mut() {
            spec.replicas = Some(initial);
        }
        apply::create(client, &first).await?;
    }
    let observed = apply::apply(client, &deployment).await?;
    apply::apply(client, &headless).await?;

    // Pods say why none is ready; once one is, they are not read.
    let ready = observed
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let pods = if ready > 0 {
        Vec::new()
    } else {
        let namespace = revision.namespace().unwrap_or_default();
        let name = revision.name_any();
        Api::<Pod>::namespaced(client.clone(), &namespace)
            .list(&ListParams::default().labels(&format!("{}={name}", desired::REVISION_LABEL)))
            .await
            .map_err(|e| {
                ApiError::new::<Pod>("list", &namespace, &format!("{name}-deployment-*"), e)
            })?
            .items
    };
    let computed = status::revision(revision, Some(&observed), &pods, &now());
    write_status(client, revision, revision.status.as_ref(), &computed).await?;
    Ok(Action::requeue(context.settings.resync))
}

/// Applies `status` unless the object already has it (an unchanged status is not written,
/// so it wakes no watcher).
pub(super) async fn write_status<K, S>(
    client: &kube::Client,
    object: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), ApiError>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    S: serde::Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    apply::apply_status(client, object, status).await?;
    Ok(())
}

/// Writes a failure into the object's status; a status that cannot be written either is
/// logged (the failure is counted and retried regardless).
pub(super) async fn report<K, S>(context: &Context, object: &K, current: Option<&S>, status: &S)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    S: serde::Serialize + PartialEq,
{
    if let Err(error) = write_status(&context.client, object, current, status).await {
        tracing::warn!(%error, "the failure could not be written into the status either");
    }
}
