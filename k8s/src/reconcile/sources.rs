//! The event sources' reconcilers: status for every kind. The importers (`mecha-importers`)
//! run the sources they read from the control plane; here each gets Knative's status from
//! what the control plane knows ([`crate::sources::status`]): `Ready=False` with local mode's
//! message when its validators refuse it, or when its sink cannot be resolved; otherwise
//! `sinkUri`, `ceAttributes` and, for a webhook source, `url`. A ContainerSource's Deployment
//! ([`crate::sources::container_deployment`]) is applied here too.
//!
//! An ApiServerSource gets more ([`crate::apiserver`]): its namespaces resolved, its service
//! account's access checked with `SubjectAccessReview`s, its adapter Deployment applied once
//! the account may watch everything it lists, and Knative's conditions `SinkProvided`,
//! `Deployed`, `SufficientPermissions` under `Ready`. Its reconciler follows the adapter
//! Deployments, so `Deployed` turns `True` as soon as the adapter is available.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use mecha_common::ShutdownSignal;
use tracing::instrument;

use super::serving::{report, write_status};
use super::{Context, Error, RECONCILE_FAILED, drain, now};
use crate::apiserver::{self, Check};
use crate::crd::{ApiServerSource, SourceStatus};
use crate::sources::{SinkSettings, SourceKind, WorkloadInputs};
use crate::status;

/// Runs the status reconciler of one source kind until `shutdown`.
pub(super) async fn run<K: SourceKind>(
    kind: &'static str,
    context: Arc<Context>,
    sinks: SinkSettings,
    shutdown: ShutdownSignal,
) {
    let sinks = Arc::new(sinks);
    let mut controller = Controller::new(
        Api::<K>::all(context.client.clone()),
        watcher::Config::default(),
    );
    if K::OWNS_ADAPTER {
        controller = controller.owns(
            Api::<Deployment>::all(context.client.clone()),
            watcher::Config::default().labels(apiserver::ADAPTER_LABEL),
        );
    }
    let stream = controller.graceful_shutdown_on(shutdown.recv()).run(
        move |source, context| reconcile(kind, source, context, sinks.clone()),
        move |source: Arc<K>, error: &Error, context: Arc<Context>| {
            context.failed(kind, source.as_ref(), error)
        },
        context.clone(),
    );
    drain(kind, context, stream).await;
}

#[instrument(skip_all, fields(kind, namespace = source.namespace(), name = source.name_any()))]
async fn reconcile<K: SourceKind>(
    kind: &'static str,
    source: Arc<K>,
    context: Arc<Context>,
    sinks: Arc<SinkSettings>,
) -> Result<Action, Error> {
    if source.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let mut computed = crate::sources::status(
        &source.local(),
        source.source_status(),
        source.meta().generation,
        &sinks,
        &now(),
    );
    let current = source.source_status();
    let ready = computed
        .conditions
        .iter()
        .any(|c| c.type_ == status::READY && c.status == "True");
    if let Some(api_server) = source.as_api_server() {
        match api_server_conditions(&context, api_server, &computed, ready, &sinks).await {
            Ok(conditions) => {
                let previous = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
                computed.conditions = status::carry(conditions, previous, &now());
            }
            Err(error) => {
                let failed = status::failed(computed, RECONCILE_FAILED, &error.to_string(), &now());
                report(&context, source.as_ref(), current, &failed).await;
                return Err(error);
            }
        }
    } else if let (true, Some(sink)) = (ready, computed.sink_uri.as_deref())
        // A ContainerSource runs as a Deployment of its own, once it is valid and its sink
        // resolved (owned by the source: deleting the source deletes it).
        && let Some(deployment) = source.workload(&WorkloadInputs {
            sink_uri: sink,
            settings: &sinks,
            namespaces: None,
        })
        && let Err(error) = crate::apply::apply(&context.client, &deployment).await
    {
        let error = Error::from(error);
        let failed = status::failed(computed, RECONCILE_FAILED, &error.to_string(), &now());
        report(&context, source.as_ref(), current, &failed).await;
        return Err(error);
    }
    match write_status(&context.client, source.as_ref(), current, &computed).await {
        Ok(()) => {
            context.succeeded(kind, source.as_ref());
            Ok(Action::requeue(context.settings.resync))
        }
        Err(error) => {
            let error = Error::from(error);
            let failed = status::failed(computed, RECONCILE_FAILED, &error.to_string(), &now());
            report(&context, source.as_ref(), current, &failed).await;
            Err(error)
        }
    }
}

/// An ApiServerSource's conditions (Knative's), applying its adapter when it may run: a
/// source its validators refuse or whose sink is unresolved keeps that `Ready=False`; else
/// its namespaces are resolved, its resources discovered, its account's access reviewed, and
/// only then is the adapter applied (an adapter that may not watch would only fail).
async fn api_server_conditions(
    context: &Context,
    source: &ApiServerSource,
    computed: &SourceStatus,
    valid: bool,
    sinks: &SinkSettings,
) -> Result<Vec<crate::crd::Condition>, Error> {
    let base = computed
        .conditions
        .iter()
        .find(|c| c.type_ == status::READY)
        .cloned()
        .unwrap_or_default();
    let waiting = |why: &str| Check::Unknown {
        reason: "NotDeployed".into(),
        message: why.into(),
    };
    let (Some(sink), true) = (computed.sink_uri.as_deref(), valid) else {
        // Refused, or no sink: Ready says why, as for every other kind.
        let sink = if base.reason.as_deref() == Some(crate::sources::SINK_NOT_RESOLVED) {
            Check::False {
                reason: base.reason.clone().unwrap_or_default(),
                message: base.message.clone().unwrap_or_default(),
            }
        } else {
            waiting("the source's spec is refused")
        };
        let mut conditions = apiserver::conditions(
            sink,
            waiting("the source's spec is refused or its sink unresolved"),
            waiting("the source's spec is refused or its sink unresolved"),
        );
        if let Some(ready) = conditions.iter_mut().find(|c| c.type_ == status::READY) {
            *ready = base;
        }
        return Ok(conditions);
    };
    let client = &context.client;
    let local = source.local_source();
    let namespaces = match apiserver::watched_namespaces(client, &local).await? {
        Ok(namespaces) => namespaces,
        Err(why) => {
            return Ok(apiserver::conditions(
                Check::True,
                Check::False {
                    reason: "TooManyNamespaces".into(),
                    message: why,
                },
                waiting("the namespaces to check are not known"),
            ));
        }
    };
    let mut discovered = Vec::new();
    for (i, resource) in local.spec.resources.iter().enumerate() {
        match apiserver::discover(client, &resource.api_version, &resource.kind).await {
            Ok(found) => discovered.push(found),
            Err(why) => {
                return Ok(apiserver::conditions(
                    Check::True,
                    waiting("the adapter is deployed once every resource is served"),
                    Check::False {
                        reason: "ResourceNotFound".into(),
                        message: format!("spec.resources[{i}]: {why}"),
                    },
                ));
            }
        }
    }
    let account = local
        .spec
        .service_account_name
        .as_deref()
        .unwrap_or(apiserver::DEFAULT_SERVICE_ACCOUNT);
    let namespace = local.metadata.namespace();
    if let Some(denied) =
        apiserver::check_access(client, namespace, account, &discovered, &namespaces).await?
    {
        return Ok(apiserver::conditions(
            Check::True,
            waiting("the adapter is deployed once its service account may watch what it lists"),
            Check::False {
                reason: "InsufficientPermissions".into(),
                message: denied,
            },
        ));
    }
    let deployment = source
        .workload(&WorkloadInputs {
            sink_uri: sink,
            settings: sinks,
            namespaces: Some(&namespaces),
        })
        .ok_or_else(|| Error::Invalid {
            kind: "ApiServerSource",
            namespace: namespace.to_string(),
            name: local.metadata.name.clone(),
            message: "no adapter Deployment can be made for it".into(),
        })?;
    let applied = crate::apply::apply(client, &deployment).await?;
    Ok(apiserver::conditions(
        Check::True,
        apiserver::deployed(&applied),
        Check::True,
    ))
}
