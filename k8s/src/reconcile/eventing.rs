//! The Broker and Trigger reconcilers: status only. The broker (`mecha-broker`) serves every
//! Broker and Trigger it reads from the control plane; here each gets its `Ready` condition —
//! `False` with local mode's message when its validators refuse it — and a Broker its address.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mecha_common::ShutdownSignal;
use tracing::instrument;

use super::serving::{report, write_status};
use super::{Context, Error, RECONCILE_FAILED, drain, now};
use crate::crd::{Broker, Trigger};
use crate::{admission, status};

const BROKER: &str = "Broker";
const TRIGGER: &str = "Trigger";

pub(super) async fn brokers(context: Arc<Context>, shutdown: ShutdownSignal) {
    let stream = Controller::new(
        Api::<Broker>::all(context.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.recv())
    .run(reconcile_broker, broker_error, context.clone());
    drain(BROKER, context, stream).await;
}

pub(super) async fn triggers(context: Arc<Context>, shutdown: ShutdownSignal) {
    let stream = Controller::new(
        Api::<Trigger>::all(context.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.recv())
    .run(reconcile_trigger, trigger_error, context.clone());
    drain(TRIGGER, context, stream).await;
}

fn broker_error(broker: Arc<Broker>, error: &Error, context: Arc<Context>) -> Action {
    context.failed(BROKER, broker.as_ref(), error)
}

fn trigger_error(trigger: Arc<Trigger>, error: &Error, context: Arc<Context>) -> Action {
    context.failed(TRIGGER, trigger.as_ref(), error)
}

#[instrument(skip_all, fields(namespace = broker.namespace(), name = broker.name_any()))]
async fn reconcile_broker(broker: Arc<Broker>, context: Arc<Context>) -> Result<Action, Error> {
    if broker.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let computed = match admission::broker(&broker) {
        Some(refusal) => status::refused(
            broker.status.clone().unwrap_or_default(),
            &refusal,
            broker.metadata.generation,
            &now(),
        ),
        None => status::broker(&broker, &context.settings.addresses, &now()),
    };
    match write_status(
        &context.client,
        broker.as_ref(),
        broker.status.as_ref(),
        &computed,
    )
    .await
    {
        Ok(()) => {
            context.succeeded(BROKER, broker.as_ref());
            Ok(Action::requeue(context.settings.resync))
        }
        Err(error) => {
            let error = Error::from(error);
            let failed = status::failed(computed, RECONCILE_FAILED, &error.to_string(), &now());
            report(&context, broker.as_ref(), broker.status.as_ref(), &failed).await;
            Err(error)
        }
    }
}

#[instrument(skip_all, fields(namespace = trigger.namespace(), name = trigger.name_any()))]
async fn reconcile_trigger(trigger: Arc<Trigger>, context: Arc<Context>) -> Result<Action, Error> {
    if trigger.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let computed = match admission::trigger(&trigger) {
        Some(refusal) => status::refused(
            trigger.status.clone().unwrap_or_default(),
            &refusal,
            trigger.metadata.generation,
            &now(),
        ),
        None => status::trigger(&trigger, &now()),
    };
    match write_status(
        &context.client,
        trigger.as_ref(),
        trigger.status.as_ref(),
        &computed,
    )
    .await
    {
        Ok(()) => {
            context.succeeded(TRIGGER, trigger.as_ref());
            Ok(Action::requeue(context.settings.resync))
        }
        Err(error) => {
            let error = Error::from(error);
            let failed = status::failed(computed, RECONCILE_FAILED, &error.to_string(), &now());
            report(&context, trigger.as_ref(), trigger.status.as_ref(), &failed).await;
            Err(error)
        }
    }
}
