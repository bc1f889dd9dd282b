//! The objects the serving reconciler wants, as pure functions of what it observed — no client,
//! no clock — so unit tests and golden files pin them:
//!
//! - [`next_revision`]: Service (and the Revisions it owns) → the Revision its template calls
//!   for, if the newest one is not it yet;
//! - [`deployment`]: Revision → the Deployment running its pods: the user container with
//!   Knative's environment, and the inbound sidecar in queue-proxy's place;
//! - [`headless_service`]: Revision → the headless Service whose EndpointSlices the
//!   autoscaler watches.
//!
//! The sidecar alone mounts a projected service-account token (audience
//! [`AUTOSCALER_TOKEN_AUDIENCE`], at [`AUTOSCALER_TOKEN_FILE`], named by
//! `AUTOSCALER_TOKEN_FILE`), with which it authenticates to the autoscaler.
//!
//! The Deployment never sets `replicas`: the autoscaler owns that field, through the scale
//! subresource, and server-side apply of these objects must not take it back.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, Service as KubeService,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec as KubeServiceSpec, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{Revision, RevisionSpec, Service};

pub const SERVICE_LABEL: &str = "serving.knative.dev/service";
pub const CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";
pub const CONFIGURATION_GENERATION_LABEL: &str = "serving.knative.dev/configurationGeneration";
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";

/// The user container's port when the Service names none (Knative's default).
pub const DEFAULT_USER_PORT: i32 = 8080;
/// Where the inbound sidecar takes requests (Knative's queue-proxy port).
pub const SIDECAR_SERVING_PORT: i32 = 8012;
/// The inbound sidecar's `/live`, `/ready`, `/metrics`.
pub const SIDECAR_ADMIN_PORT: i32 = 8022;
/// The sidecar's container name.
pub const SIDECAR_NAME: &str = "activator-sidecar";
/// The outbound role's container in a meshed revision's pod (`mecha.dev/mesh: "true"`).
pub const OUTBOUND_NAME: &str = "activator-outbound";
/// The outbound role's `/live`, `/ready`, `/metrics` (the inbound sidecar has 8022).
pub const OUTBOUND_ADMIN_PORT: i32 = 8023;

/// The audience of the service-account token a sidecar presents to the autoscaler, which
/// checks it with a `TokenReview` naming this audience.
pub const AUTOSCALER_TOKEN_AUDIENCE: &str = "mecha-autoscaler";
/// Where the projected token is mounted in the sidecar (the kubelet rotates the file).
pub const AUTOSCALER_TOKEN_DIR: &str = "/var/run/secrets/mecha";
/// The token file inside [`AUTOSCALER_TOKEN_DIR`], given to the sidecar as
/// `AUTOSCALER_TOKEN_FILE`.
pub const AUTOSCALER_TOKEN_FILE: &str = "/var/run/secrets/mecha/token";
/// The projected token's lifetime; the kubelet renews it at 80 % of that.
pub const AUTOSCALER_TOKEN_SECONDS: i64 = 3600;
/// The pod volume holding the token.
const TOKEN_VOLUME: &str = "mecha-autoscaler-token";

/// What every revision's pod gets from the installation rather than from the Service.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    /// The `activator-sidecar` image.
    pub sidecar_image: String,
    /// `host:port` of the autoscaler's Service, where the sidecar reports load.
    pub autoscaler_addr: String,
    /// The sidecar's resource requests (`cpu`, `memory`).
    pub sidecar_requests: BTreeMap<String, String>,
    /// Hosts meshed functions reach without the proxy, besides their own pod's
    /// ([`crds::serving::mesh_env`]).
    pub mesh_no_proxy: Vec<String>,
}

/// The Revision `service`'s template calls for, or `None` when the newest of `revisions`
/// (those the Service owns) already has that template. Named as Knative does:
/// `{service}-{n:05}`, one past the highest number in use.
pub fn next_revision(service: &Service, revisions: &[Revision]) -> Option<Revision> {
    let name = service.metadata.name.as_deref()?;
    let template = &service.spec.0.template;
    let numbered = |revision: &Revision| -> Option<u32> {
        revision
            .metadata
            .name
            .as_deref()?
            .strip_prefix(name)?
            .strip_prefix('-')?
            .parse()
            .ok()
    };
    let newest = revisions
        .iter()
        .filter_map(|r| Some((numbered(r)?, r)))
        .max_by_key(|(n, _)| *n);
    if let Some((_, latest)) = newest {
        let labels_now = template_labels(latest);
        let annotations_now = latest.metadata.annotations.clone().unwrap_or_default();
        if latest.spec.0 == template.spec
            && labels_now == template.metadata.labels
            && annotations_now == template.metadata.annotations
        {
            return None;
        }
    }
    let generation = newest.map_or(1, |(n, _)| n + 1);
    let revision_name = format!("{name}-{generation:05}");
    let mut labels = template.metadata.labels.clone();
    labels.insert(SERVICE_LABEL.into(), name.into());
    labels.insert(CONFIGURATION_LABEL.into(), name.into());
    labels.insert(
        CONFIGURATION_GENERATION_LABEL.into(),
        generation.to_string(),
    );
    Some(Revision {
        metadata: ObjectMeta {
            name: Some(revision_name),
            namespace: service.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: non_empty(template.metadata.annotations.clone()),
            owner_references: service.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: RevisionSpec(template.spec.clone()),
        status: None,
    })
}

/// The template's own labels on a Revision: its labels less those Mecha adds.
fn template_labels(revision: &Revision) -> BTreeMap<String, String> {
    let mut labels = revision.metadata.labels.clone().unwrap_or_default();
    for ours in [
        SERVICE_LABEL,
        CONFIGURATION_LABEL,
        CONFIGURATION_GENERATION_LABEL,
    ] {
        labels.remove(ours);
    }
    labels
}

/// The Deployment that runs `revision`'s pods. `None` for a Revision without a name or a
/// container (which validation has refused before).
pub fn deployment(revision: &Revision, settings: &PodSettings) -> Option<Deployment> {
    let name = revision.metadata.name.clone()?;
    let spec = &revision.spec.0;
    let container = spec.containers.first()?;
    let labels = pod_labels(revision, &name);
    let service = label(revision, SERVICE_LABEL);
    let configuration = label(revision, CONFIGURATION_LABEL);
    let namespace = revision
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| crds::meta::DEFAULT_NAMESPACE.into());
    let user_port = container
        .ports
        .first()
        .and_then(|p| i32::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_USER_PORT);
    let timeout = spec
        .timeout_seconds
        .unwrap_or(crds::serving::DEFAULT_TIMEOUT_SECONDS);

    let mut env: Vec<EnvVar> = container
        .env
        .iter()
        .map(|e| value(&e.name, &e.value))
        .collect();
    env.extend([
        value("PORT", &user_port.to_string()),
        value("K_SERVICE", &service),
        value("K_CONFIGURATION", &configuration),
        value("K_REVISION", &name),
    ]);
    let meshed = crds::serving::meshed(&revision.metadata.annotations.clone().unwrap_or_default());
    if meshed {
        let proxy = format!("http://127.0.0.1:{}", crds::serving::MESH_PROXY_PORT);
        for (key, proxy_value) in
            crds::serving::mesh_env(&proxy, container, &settings.mesh_no_proxy)
        {
            env.retain(|e| e.name != key);
            env.push(value(&key, &proxy_value));
        }
    }
    let user = Container {
        name: container
            .name
            .clone()
            .unwrap_or_else(|| "user-container".into()),
        image: container.image.clone(),
        command: non_empty_vec(container.command.clone()),
        args: non_empty_vec(container.args.clone()),
        working_dir: container.working_dir.clone(),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("user-port".into()),
            container_port: user_port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: container.resources.as_ref().map(|r| ResourceRequirements {
            limits: non_empty(quantities(&r.limits)),
            requests: non_empty(quantities(&r.requests)),
            ..ResourceRequirements::default()
        }),
        // Readiness goes through the sidecar, as Knative rewrites it for queue-proxy: the
        // kubelet asks the sidecar, which probes the container itself.
        readiness_probe: None,
        ..Container::default()
    };

    let probe = container.readiness_probe.as_ref();
    let readiness_path = probe
        .and_then(|p| p.http_get.as_ref())
        .map(|h| h.path.clone().unwrap_or_else(|| "/".into()));
    let mut sidecar_env = vec![
        value("QUEUE_SERVING_PORT", &SIDECAR_SERVING_PORT.to_string()),
        value("QUEUE_ADMIN_PORT", &SIDECAR_ADMIN_PORT.to_string()),
        value("USER_PORT", &user_port.to_string()),
        value(
            "CONTAINER_CONCURRENCY",
            &spec.container_concurrency.unwrap_or(0).to_string(),
        ),
        value("REVISION_TIMEOUT_SECONDS", &timeout.to_string()),
        value("SERVING_NAMESPACE", &namespace),
        value("SERVING_SERVICE", &service),
        value("SERVING_REVISION", &name),
        // The autoscaler's tables key revisions by namespace too.
        value(
            "SERVING_REVISION_KEY",
            &mecha_common::routing::revision_key(&namespace, &name),
        ),
        value("AUTOSCALER_ADDR", &settings.autoscaler_addr),
        value("AUTOSCALER_TOKEN_FILE", AUTOSCALER_TOKEN_FILE),
        pod_name(),
    ];
    if let Some(path) = readiness_path {
        sidecar_env.push(value("SERVING_READINESS_PATH", &path));
    }
    let period = |f: fn(&crds::serving::Probe) -> Option<u32>| {
        probe.and_then(f).and_then(|v| i32::try_from(v).ok())
    };
    let sidecar = Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.sidecar_image.clone()),
        args: Some(vec!["inbound".into()]),
        env: Some(sidecar_env),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: SIDECAR_SERVING_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: SIDECAR_ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(SIDECAR_ADMIN_PORT),
                ..HTTPGetAction::default()
            }),
            initial_delay_seconds: period(|p| p.initial_delay_seconds),
            // The sidecar probes the container every 50 ms until it is ready; the kubelet
            // only needs to see the result soon.
            period_seconds: period(|p| p.period_seconds).filter(|p| *p > 0).or(Some(1)),
            timeout_seconds: period(|p| p.timeout_seconds),
            success_threshold: period(|p| p.success_threshold),
            failure_threshold: period(|p| p.failure_threshold),
            ..Probe::default()
        }),
        resources: Some(sidecar_resources(settings)),
        // Only the sidecars see the token: the user's code never gets a credential for the
        // control plane.
        volume_mounts: Some(vec![token_mount()]),
        ..Container::default()
    };
    let mut containers = vec![user, sidecar];
    if meshed {
        containers.push(outbound_container(settings));
    }
    let token_volume = Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(AUTOSCALER_TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(AUTOSCALER_TOKEN_SECONDS),
                    path: "token".into(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };

    let timeout = i64::try_from(timeout).unwrap_or(i64::MAX);
    Some(Deployment {
        metadata: ObjectMeta {
            name: Some(format!("{name}-deployment")),
            namespace: revision.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: owner(revision),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(REVISION_LABEL.into(), name.clone())])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: revision.metadata.annotations.clone(),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    volumes: Some(vec![token_volume]),
                    enable_service_links: Some(false),
                    // Requests may take the revision's timeout to finish after SIGTERM.
                    termination_grace_period_seconds: Some(timeout),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// The replicas a new revision's Deployment starts with when its template sets
/// `autoscaling.knative.dev/initial-scale` (otherwise the API server's default, 1, which is
/// Knative's default initial scale too). The autoscaler bounds it once it runs the revision.
pub fn initial_replicas(revision: &Revision) -> Option<i32> {
    let annotations = revision.metadata.annotations.clone().unwrap_or_default();
    let scaling = crds::autoscaling::ScalingAnnotations::parse(&annotations, "", &mut Vec::new());
    scaling.initial_scale.and_then(|n| i32::try_from(n).ok())
}

/// The outbound role in a meshed pod: the function's HTTP proxy on `127.0.0.1:15001`, routing
/// calls to other functions straight to their replicas (holding and poking for one at zero),
/// passing other plain-HTTP calls through to where they were going.
fn outbound_container(settings: &PodSettings) -> Container {
    Container {
        name: OUTBOUND_NAME.into(),
        image: Some(settings.sidecar_image.clone()),
        args: Some(vec!["outbound".into()]),
        env: Some(vec![
            value("OUTBOUND_PORT", &crds::serving::MESH_PROXY_PORT.to_string()),
            value("GATEWAY_ADMIN_PORT", &OUTBOUND_ADMIN_PORT.to_string()),
            value("AUTOSCALER_ADDR", &settings.autoscaler_addr),
            value("AUTOSCALER_TOKEN_FILE", AUTOSCALER_TOKEN_FILE),
            pod_name(),
        ]),
        // Ready once the first routes have arrived: until then calls would find no function.
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(OUTBOUND_ADMIN_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(1),
            ..Probe::default()
        }),
        resources: Some(sidecar_resources(settings)),
        volume_mounts: Some(vec![token_mount()]),
        ..Container::default()
    }
}

/// What a sidecar container (inbound or outbound) requests.
fn sidecar_resources(settings: &PodSettings) -> ResourceRequirements {
    ResourceRequirements {
        requests: non_empty(quantities(&settings.sidecar_requests)),
        ..ResourceRequirements::default()
    }
}

fn token_mount() -> VolumeMount {
    VolumeMount {
        name: TOKEN_VOLUME.into(),
        mount_path: AUTOSCALER_TOKEN_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// `POD_NAME` from the downward API: the sidecars' name in reports.
fn pod_name() -> EnvVar {
    EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The Kubernetes Service named after a Knative Service, as Knative makes it: an
/// `ExternalName` pointing at the gateway (`gateway_host`), so
/// `{name}.{namespace}.svc.{cluster domain}` — the Service's `status.address` — resolves
/// inside the cluster, and the gateway routes it by its `Host`. Meshed callers never resolve
/// it: their proxy routes the name itself.
pub fn cluster_local_service(service: &Service, gateway_host: &str) -> Option<KubeService> {
    let name = service.metadata.name.clone()?;
    Some(KubeService {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: service.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([(SERVICE_LABEL.into(), name)])),
            owner_references: service.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(KubeServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(gateway_host.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..KubeServiceSpec::default()
        }),
        status: None,
    })
}

/// The headless Service of `revision`'s pods: its EndpointSlices
/// (`kubernetes.io/service-name` = the revision's name) are how the autoscaler learns ready
/// endpoints, which it pushes to every gateway and caller.
pub fn headless_service(revision: &Revision) -> Option<KubeService> {
    let name = revision.metadata.name.clone()?;
    Some(KubeService {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: revision.metadata.namespace.clone(),
            labels: Some(pod_labels(revision, &name)),
            owner_references: owner(revision),
            ..ObjectMeta::default()
        },
        spec: Some(KubeServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(REVISION_LABEL.into(), name)])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SIDECAR_SERVING_PORT,
                target_port: Some(IntOrString::Int(SIDECAR_SERVING_PORT)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..KubeServiceSpec::default()
        }),
        status: None,
    })
}

/// The revision's labels plus `serving.knative.dev/revision`.
fn pod_labels(revision: &Revision, name: &str) -> BTreeMap<String, String> {
    let mut labels = revision.metadata.labels.clone().unwrap_or_default();
    labels.insert(REVISION_LABEL.into(), name.into());
    labels
}

fn label(revision: &Revision, key: &str) -> String {
    revision
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .cloned()
        .unwrap_or_default()
}

/// The Revision as its children's controlling owner, so deleting it deletes them.
fn owner(revision: &Revision) -> Option<Vec<OwnerReference>> {
    revision.controller_owner_ref(&()).map(|o| vec![o])
}

fn value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn quantities(map: &BTreeMap<String, String>) -> BTreeMap<String, Quantity> {
    map.iter()
        .map(|(k, v)| (k.clone(), Quantity(v.clone())))
        .collect()
}

fn non_empty<K: Ord, V>(map: BTreeMap<K, V>) -> Option<BTreeMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

fn non_empty_vec<T>(list: Vec<T>) -> Option<Vec<T>> {
    (!list.is_empty()).then_some(list)
}
