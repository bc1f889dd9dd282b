//! The checks a structural schema cannot express — annotation ranges and their relations,
//! durations, CESQL, traffic that adds up to 100, reserved environment names — run by the very
//! validators local mode runs (`crds`), with their refusal as the resource's `Ready`
//! condition: status `False`, reason [`INVALID_SPEC`], and as message what `mecha up` prints
//! for the same YAML, each problem naming its field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{Broker, Condition, Service, Trigger};

/// The `Ready` condition's reason for a resource its validators refuse.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Each check returns the `Ready` condition that refuses the resource, `None` when it passes.
///
/// A Service is checked as a cluster runs it (an `image` is required, a `command` is not).
pub fn service(service: &Service) -> Option<Condition> {
    let local = crds::Service {
        api_version: crds::serving::API_VERSION.into(),
        kind: crds::serving::KIND.into(),
        metadata: local_meta(&service.metadata),
        spec: service.spec.0.clone(),
    };
    refuse(local.validate(crds::Mode::Kubernetes))
}

pub fn broker(broker: &Broker) -> Option<Condition> {
    refuse(local_broker(broker).validate())
}

pub fn trigger(trigger: &Trigger) -> Option<Condition> {
    refuse(local_trigger(trigger).validate())
}

/// The cluster's Broker as the `crds` type the broker runtime reads.
pub fn local_broker(broker: &Broker) -> crds::Broker {
    crds::Broker {
        api_version: crds::eventing::API_VERSION.into(),
        kind: crds::eventing::BROKER_KIND.into(),
        metadata: local_meta(&broker.metadata),
        spec: broker.spec.0.clone(),
    }
}

/// The cluster's Trigger as the `crds` type the broker runtime reads.
pub fn local_trigger(trigger: &Trigger) -> crds::Trigger {
    crds::Trigger {
        api_version: crds::eventing::API_VERSION.into(),
        kind: crds::eventing::TRIGGER_KIND.into(),
        metadata: local_meta(&trigger.metadata),
        spec: trigger.spec.0.clone(),
    }
}

/// The part of Kubernetes' metadata that users write, as local mode reads it.
fn local_meta(meta: &ObjectMeta) -> crds::ObjectMeta {
    crds::ObjectMeta {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
    }
}

fn refuse(errors: Vec<crds::FieldError>) -> Option<Condition> {
    if errors.is_empty() {
        return None;
    }
    let message = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Some(Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: Some(INVALID_SPEC.into()),
        message: Some(message),
        ..Condition::default()
    })
}
