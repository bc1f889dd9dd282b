//! The event sources' reconcilers: status for every kind. The importers (`mecha-importers`)
//! run the sources they read from the control plane; here each gets Knative's status from
//! what the control plane knows ([`crate::sources::status`]): `Ready=False` with local mode's
//! message when its validators refuse it, or when its sink cannot be resolved; otherwise
//! `sinkUri`, `ceAttributes` and, for a webhook source, `url`. A ContainerSource's Deployment
//! ([`crate::sources::container_deployment`]) is applied here too.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use mecha_common::ShutdownSignal;
use tracing::instrument;

use super::serving::{report, write_status};
use super::{Context, Error, RECONCILE_FAILED, drain, now};
use crate::sources::{SinkSettings, SourceKind};
use crate::status;

/// Runs the status reconciler of one source kind until `shutdown`.
pub(super) async fn run<K: SourceKind>(
    kind: &'static str,
    context: Arc<Context>,
    sinks: SinkSettings,
    shutdown: ShutdownSignal,
) {
    let sinks = Arc::new(sinks);
    let stream = Controller::new(
        Api::<K>::all(context.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.recv())
    .run(
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
    let computed = crate::sources::status(
        &source.local(),
        source.source_status(),
        source.meta().generation,
        &sinks,
        &now(),
    );
    let current = source.source_status();
    // A ContainerSource runs as a Deployment of its own, once it is valid and its sink
    // resolved (owned by the source: deleting the source deletes it).
    let ready = computed
        .conditions
        .iter()
        .any(|c| c.type_ == status::READY && c.status == "True");
    if let (true, Some(sink)) = (ready, computed.sink_uri.as_deref())
        && let Some(deployment) = source.workload(sink)
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
