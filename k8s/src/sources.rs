//! Event sources in a cluster: the source CRDs as the `crds` types the importers run
//! ([`local`]), their sinks resolved to cluster addresses ([`resolve_sink`]), the
//! [`SourcesSnapshot`] the `mecha-importers` Deployment reads from the control plane
//! (`GET /api/v1/sources/watch`, [`snapshot`], kept current by [`run`]), and each source's
//! Knative status ([`status`]). The kinds that run as workloads of their own say so through
//! [`SourceKind::workload`]: a ContainerSource's Deployment, an ApiServerSource's adapter
//! ([`crate::apiserver`]).
//!
//! Sinks, as the rest of the cluster addresses them:
//! - a `Broker` `ref`: the broker Service's ingress, `{broker base URL}/{namespace}/{name}`
//!   (`http://mecha-broker.mecha-system.svc/…`, the Broker's own `status.address.url`);
//! - a `serving.knative.dev/v1` `Service` `ref`: its cluster-local address
//!   `http://{name}.{namespace}.svc.{cluster domain}` (the Service's `status.address.url`, as
//!   Knative resolves a Service sink), which resolves in any pod to the gateway; the importers
//!   send to the gateway Service with that `Host` (so a zero-scaled Service is woken as any
//!   request wakes it), with the destination's `uri` as path;
//! - a `uri`: as written.

use std::sync::Arc;

use crds::SourceResource;
use crds::sources::{PlacedSource, SinkAddress, SourcesSnapshot};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, Resource};
use mecha_common::ShutdownSignal;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::crd::{
    ApiServerSource, CloudEventAttributes, Condition, ContainerSource, GitHubSource, GitLabSource,
    MqttSource, NatsSource, PingSource, RedisStreamSource, SinkBinding, SourceStatus,
};
use crate::state::{CacheFlag, Caches};

/// Where the importers send, as the control plane resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSettings {
    /// The broker ingress's base URL (`BROKER_BASE_URL`, no trailing `/`).
    pub broker_base_url: String,
    /// `host:port` of the gateway Service, through which Services are reached.
    pub gateway: String,
    /// The cluster's DNS domain: a Service sink is its cluster-local address.
    pub cluster_domain: String,
    /// Where providers reach the importers' webhook port (`IMPORTERS_WEBHOOK_BASE_URL`; the
    /// `mecha-importers` Service inside the cluster by default).
    pub webhook_base_url: String,
    /// The image of ApiServerSources' adapters (`APISERVER_ADAPTER_IMAGE`; the control
    /// plane's own, which holds the `apiserver-adapter` binary).
    pub adapter_image: String,
    /// The API server's URL as a pod's client sees it: ApiServerSources' event `source` in
    /// their `ceAttributes`.
    pub api_server_url: String,
}

/// What a source's workload is made from besides the source itself.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadInputs<'a> {
    /// The resolved sink (`K_SINK`).
    pub sink_uri: &'a str,
    pub settings: &'a SinkSettings,
    /// An ApiServerSource's watched namespaces, as the reconciler resolved them.
    pub namespaces: Option<&'a crate::apiserver::Namespaces>,
}

/// The reason of a source's `Ready=False` when its sink cannot be resolved.
pub const SINK_NOT_RESOLVED: &str = "SinkNotResolved";

/// A source CRD: its kind's `crds` type and its status.
pub trait SourceKind:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + DeserializeOwned
    + serde::Serialize
    + Send
    + Sync
    + 'static
{
    /// The source as local mode reads it.
    fn local(&self) -> SourceResource;
    fn source_status(&self) -> Option<&SourceStatus>;
    /// The workload the source runs as in the cluster, given its resolved sink (a
    /// ContainerSource's Deployment, an ApiServerSource's adapter); `None` for the kinds the
    /// importers run.
    fn workload(
        &self,
        _inputs: &WorkloadInputs<'_>,
    ) -> Option<k8s_openapi::api::apps::v1::Deployment> {
        None
    }
    /// The source as an ApiServerSource, whose reconcile also resolves namespaces, checks
    /// access and reports its adapter (`None` for every other kind).
    fn as_api_server(&self) -> Option<&ApiServerSource> {
        None
    }
    /// Whether its reconciler follows the Deployments it owns (labelled
    /// [`crate::apiserver::ADAPTER_LABEL`]), so a change of theirs reconciles it at once.
    const OWNS_ADAPTER: bool = false;
}

// === impl SinkSettings ===

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            broker_base_url: crate::status::DEFAULT_BROKER_BASE_URL.into(),
            gateway: "mecha-gateway.mecha-system.svc:80".into(),
            cluster_domain: crate::status::DEFAULT_CLUSTER_DOMAIN.into(),
            webhook_base_url: "http://mecha-importers.mecha-system.svc".into(),
            adapter_image: crate::apiserver::DEFAULT_ADAPTER_IMAGE.into(),
            api_server_url: "https://kubernetes.default.svc".into(),
        }
    }
}

macro_rules! source_kind {
    ($($kind:ident => $variant:ident($local:ident, $api_version:expr)),* $(,)?) => {$(
        impl SourceKind for $kind {
            fn local(&self) -> SourceResource {
                SourceResource::$variant(crds::$local {
                    api_version: $api_version.into(),
                    kind: <$kind as Resource>::kind(&()).into_owned(),
                    metadata: local_meta(&self.metadata),
                    spec: self.spec.0.clone(),
                })
            }
            fn source_status(&self) -> Option<&SourceStatus> {
                self.status.as_ref()
            }
        }
    )*};
}

source_kind! {
    PingSource => Ping(PingSource, crds::sources::API_VERSION),
    GitHubSource => GitHub(GitHubSource, crds::sources::ALPHA_API_VERSION),
    GitLabSource => GitLab(GitLabSource, crds::sources::ALPHA_API_VERSION),
    RedisStreamSource => Redis(RedisStreamSource, crds::sources::ALPHA_API_VERSION),
    NatsSource => Nats(NatsSource, crds::queues::MECHA_API_VERSION),
    MqttSource => Mqtt(MqttSource, crds::queues::MECHA_API_VERSION),
    SinkBinding => Binding(SinkBinding, crds::sources::API_VERSION),
}

impl SourceKind for ApiServerSource {
    fn local(&self) -> SourceResource {
        SourceResource::ApiServer(self.local_source())
    }
    fn source_status(&self) -> Option<&SourceStatus> {
        self.status.as_ref()
    }
    fn workload(
        &self,
        inputs: &WorkloadInputs<'_>,
    ) -> Option<k8s_openapi::api::apps::v1::Deployment> {
        let config =
            crate::apiserver::AdapterConfig::for_source(&self.local_source(), inputs.namespaces?);
        crate::apiserver::adapter_deployment(
            self,
            inputs.sink_uri,
            &inputs.settings.adapter_image,
            &config,
        )
    }
    fn as_api_server(&self) -> Option<&ApiServerSource> {
        Some(self)
    }
    const OWNS_ADAPTER: bool = true;
}

impl ApiServerSource {
    /// The source as local mode's type reads it.
    pub fn local_source(&self) -> crds::ApiServerSource {
        crds::ApiServerSource {
            api_version: crds::sources::API_VERSION.into(),
            kind: crds::apiserver::KIND.into(),
            metadata: local_meta(&self.metadata),
            spec: self.spec.0.clone(),
        }
    }
}

impl SourceKind for ContainerSource {
    fn local(&self) -> SourceResource {
        SourceResource::Container(crds::ContainerSource {
            api_version: crds::sources::API_VERSION.into(),
            kind: crds::bindings::CONTAINER_KIND.into(),
            metadata: local_meta(&self.metadata),
            spec: self.spec.0.clone(),
        })
    }
    fn source_status(&self) -> Option<&SourceStatus> {
        self.status.as_ref()
    }
    fn workload(
        &self,
        inputs: &WorkloadInputs<'_>,
    ) -> Option<k8s_openapi::api::apps::v1::Deployment> {
        container_deployment(self, inputs.sink_uri)
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

/// The source as a cluster checks it: local mode's validators in Kubernetes mode; every
/// problem names its field.
pub fn refusal(source: &SourceResource) -> Option<String> {
    let errors = source.validate(crds::Mode::Kubernetes);
    (!errors.is_empty()).then(|| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Where a source's events go in the cluster (see the module's documentation).
pub fn resolve_sink(
    source: &SourceResource,
    settings: &SinkSettings,
) -> Result<SinkAddress, String> {
    let destination = source.sink();
    let path = destination.uri.as_deref().unwrap_or("/");
    match &destination.r#ref {
        Some(reference) => {
            let namespace = reference
                .namespace
                .as_deref()
                .unwrap_or_else(|| source.namespace());
            match (reference.api_version.as_str(), reference.kind.as_str()) {
                (crds::eventing::API_VERSION, crds::eventing::BROKER_KIND) => {
                    let url = format!(
                        "{}/{namespace}/{}",
                        settings.broker_base_url.trim_end_matches('/'),
                        reference.name
                    );
                    Ok(SinkAddress {
                        url: url.clone(),
                        uri: url,
                        host: None,
                    })
                }
                (crds::serving::API_VERSION, crds::serving::KIND) => {
                    let host = format!(
                        "{}.{namespace}.svc.{}",
                        reference.name, settings.cluster_domain
                    );
                    let path = if path.starts_with('/') { path } else { "/" };
                    Ok(SinkAddress {
                        url: format!("http://{host}{path}"),
                        uri: format!("http://{}{path}", settings.gateway),
                        host: Some(host),
                    })
                }
                (api_version, kind) => Err(format!(
                    "spec.sink.ref: {kind} ({api_version}) is not addressable here: name a Broker ({}) or a Service ({})",
                    crds::eventing::API_VERSION,
                    crds::serving::API_VERSION
                )),
            }
        }
        None => match destination.uri.as_deref() {
            Some(uri) if uri.starts_with("http://") => Ok(SinkAddress {
                url: uri.into(),
                uri: uri.into(),
                host: None,
            }),
            Some(uri) => Err(format!(
                "spec.sink.uri: {uri:?} is not an http:// URL (sources do not send over https yet)"
            )),
            None => Err("spec.sink: a ref or a uri is required".into()),
        },
    }
}

/// What the importers read: every source that passes its validators, with its sink (or why
/// it has none). Refused sources are left out; their status says why.
pub fn snapshot(sources: &[SourceResource], settings: &SinkSettings) -> SourcesSnapshot {
    let mut placed: Vec<PlacedSource> = sources
        .iter()
        .filter(|source| refusal(source).is_none())
        .map(|source| {
            let (sink, problem) = match resolve_sink(source, settings) {
                Ok(sink) => (Some(sink), None),
                Err(why) => (None, Some(why)),
            };
            PlacedSource {
                resource: source.clone(),
                sink,
                problem,
            }
        })
        .collect();
    placed.sort_by(|a, b| {
        let key = |p: &PlacedSource| {
            (
                p.resource.kind(),
                p.resource.namespace().to_string(),
                p.resource.name().to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
    SourcesSnapshot { sources: placed }
}

/// A source's Knative status from what the control plane knows: `Ready=False` with reason
/// `InvalidSpec` and local mode's message (each problem naming its field) when its
/// validators refuse it, with [`SINK_NOT_RESOLVED`] when its sink cannot be resolved;
/// otherwise `Ready=True`, `sinkUri`, `ceAttributes`, and a webhook source's `url`.
/// Transition times are kept while a condition's status stays.
pub fn status(
    source: &SourceResource,
    previous: Option<&SourceStatus>,
    generation: Option<i64>,
    settings: &SinkSettings,
    now: &str,
) -> SourceStatus {
    let previous = previous.cloned().unwrap_or_default();
    let (ready, sink_uri) = match refusal(source) {
        Some(message) => (
            ready("False", Some(crate::admission::INVALID_SPEC), Some(message)),
            None,
        ),
        None => match resolve_sink(source, settings) {
            Ok(sink) => (ready("True", None, None), Some(sink.url)),
            Err(why) => (ready("False", Some(SINK_NOT_RESOLVED), Some(why)), None),
        },
    };
    let conditions = crate::status::carry(vec![ready], &previous.conditions, now);
    SourceStatus {
        observed_generation: generation,
        conditions,
        sink_uri,
        ce_attributes: source
            .ce_attributes()
            .into_iter()
            .map(|a| CloudEventAttributes {
                type_: a.kind,
                // An adapter's events come from the API server it watches.
                source: match source {
                    SourceResource::ApiServer(_) => settings.api_server_url.clone(),
                    _ => a.source,
                },
            })
            .collect(),
        url: source
            .webhook_path()
            .map(|path| format!("{}{path}", settings.webhook_base_url.trim_end_matches('/'))),
    }
}

fn ready(status: &str, reason: Option<&str>, message: Option<String>) -> Condition {
    Condition {
        type_: crate::status::READY.into(),
        status: status.into(),
        reason: reason.map(Into::into),
        message,
        ..Condition::default()
    }
}

/// The label naming a ContainerSource on the Deployment (and pods) made for it.
pub const CONTAINER_SOURCE_LABEL: &str = "sources.knative.dev/containerSource";

/// A ContainerSource's Deployment, `{name}-deployment` (Knative's name): one replica of its
/// template's container with `K_SINK` (the resolved sink) and `K_CE_OVERRIDES`
/// (`{"extensions":{…}}`) added to its environment, controlled by the source (deleting the
/// source deletes it). `None` without a name or a container (its validators refuse that).
pub fn container_deployment(
    source: &ContainerSource,
    sink_uri: &str,
) -> Option<k8s_openapi::api::apps::v1::Deployment> {
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    let name = source.metadata.name.clone()?;
    let spec = &source.spec.0;
    let container = spec.template.spec.containers.first()?;
    let extensions = spec
        .ce_overrides
        .as_ref()
        .map(|o| o.extensions.clone())
        .unwrap_or_default();
    let mut env: Vec<EnvVar> = container
        .env
        .iter()
        .map(|e| EnvVar {
            name: e.name.clone(),
            value: Some(e.value.clone()),
            ..EnvVar::default()
        })
        .collect();
    for (key, value) in [
        (crds::bindings::K_SINK, sink_uri.to_string()),
        (
            crds::bindings::K_CE_OVERRIDES,
            crds::bindings::ce_overrides_json(&extensions),
        ),
    ] {
        env.push(EnvVar {
            name: key.into(),
            value: Some(value),
            ..EnvVar::default()
        });
    }
    let mut labels = spec
        .template
        .metadata
        .as_ref()
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(CONTAINER_SOURCE_LABEL.into(), name.clone());
    let selector =
        std::collections::BTreeMap::from([(CONTAINER_SOURCE_LABEL.to_string(), name.clone())]);
    let user = Container {
        name: container.name.clone().unwrap_or_else(|| "source".into()),
        image: container.image.clone(),
        command: (!container.command.is_empty()).then(|| container.command.clone()),
        args: (!container.args.is_empty()).then(|| container.args.clone()),
        working_dir: container.working_dir.clone(),
        env: Some(env),
        resources: container.resources.as_ref().map(|r| {
            let quantities = |m: &std::collections::BTreeMap<String, String>| {
                (!m.is_empty()).then(|| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                k8s_openapi::apimachinery::pkg::api::resource::Quantity(v.clone()),
                            )
                        })
                        .collect()
                })
            };
            k8s_openapi::api::core::v1::ResourceRequirements {
                limits: quantities(&r.limits),
                requests: quantities(&r.requests),
                ..Default::default()
            }
        }),
        ..Container::default()
    };
    Some(Deployment {
        metadata: ObjectMeta {
            name: Some(format!("{name}-deployment")),
            namespace: source.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: source.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![user],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// `K_SINK` and `K_CE_OVERRIDES` for the Knative Service `service` (with `labels`) in
/// `namespace`, from the SinkBindings that select it — by name or by labels, in its own
/// namespace, valid, with a resolvable sink; when several do, the last by name wins, as
/// locally. Empty when none does.
pub fn binding_env(
    bindings: &[SinkBinding],
    namespace: &str,
    service: &str,
    labels: &std::collections::BTreeMap<String, String>,
    settings: &SinkSettings,
) -> Vec<(String, String)> {
    let mut ordered: Vec<SourceResource> = bindings.iter().map(SourceKind::local).collect();
    ordered.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    let mut env = Vec::new();
    for local in &ordered {
        let SourceResource::Binding(binding) = local else {
            continue;
        };
        if refusal(local).is_some() || !binding.selects(namespace, service, labels) {
            continue;
        }
        if let Ok(sink) = resolve_sink(local, settings) {
            env = vec![
                (crds::bindings::K_SINK.to_string(), sink.url),
                (
                    crds::bindings::K_CE_OVERRIDES.to_string(),
                    crds::bindings::ce_overrides_json(&local.extensions()),
                ),
            ];
        }
    }
    env
}

/// Adds `env` to the user's container of a revision's desired Deployment (every container
/// but the sidecar), replacing variables of the same names: how a SinkBinding reaches the
/// Services it selects. A changed environment changes the pod template, so the Deployment
/// rolls its pods, as Knative's SinkBinding does.
pub fn bind_env(deployment: &mut k8s_openapi::api::apps::v1::Deployment, env: &[(String, String)]) {
    use k8s_openapi::api::core::v1::EnvVar;
    if env.is_empty() {
        return;
    }
    let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|spec| spec.template.spec.as_mut())
    else {
        return;
    };
    for container in &mut pod.containers {
        if container.name == crate::desired::SIDECAR_NAME {
            continue;
        }
        let vars = container.env.get_or_insert_with(Vec::new);
        vars.retain(|v| !env.iter().any(|(name, _)| *name == v.name));
        vars.extend(env.iter().map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            ..EnvVar::default()
        }));
    }
}

/// One kind's reflector: its store read as local sources, and its events.
struct Reflected {
    read: Box<dyn Fn() -> Vec<SourceResource> + Send>,
    events: BoxStream<'static, Result<bool, watcher::Error>>,
}

fn reflect<K: SourceKind>(client: &kube::Client) -> Reflected {
    let (store, writer) = reflector::store::<K>();
    let events = watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .map(|e| e.map(|e| matches!(e, Event::InitDone)))
        .boxed();
    Reflected {
        read: Box::new(move || store.state().iter().map(|s| s.local()).collect()),
        events,
    }
}

/// Keeps `sources_tx` current from every source CRD in every namespace until shutdown;
/// nothing is published until each kind has listed once (until then the importers wait),
/// and a failing watch is retried with backoff, keeping the last state (reported by
/// `caches`, so the control plane is not ready meanwhile).
pub async fn run(
    client: kube::Client,
    sources_tx: watch::Sender<Arc<SourcesSnapshot>>,
    settings: SinkSettings,
    caches: Caches,
    shutdown: ShutdownSignal,
) {
    let kinds: Vec<(&'static str, Reflected)> = vec![
        ("pingsources", reflect::<PingSource>(&client)),
        ("githubsources", reflect::<GitHubSource>(&client)),
        ("gitlabsources", reflect::<GitLabSource>(&client)),
        ("redisstreamsources", reflect::<RedisStreamSource>(&client)),
        ("natssources", reflect::<NatsSource>(&client)),
        ("mqttsources", reflect::<MqttSource>(&client)),
        ("containersources", reflect::<ContainerSource>(&client)),
        ("sinkbindings", reflect::<SinkBinding>(&client)),
        ("apiserversources", reflect::<ApiServerSource>(&client)),
    ];
    let mut flags: Vec<CacheFlag> = Vec::new();
    let mut names = Vec::new();
    let mut reads = Vec::new();
    let mut streams = Vec::new();
    for (i, (name, reflected)) in kinds.into_iter().enumerate() {
        flags.push(caches.register(name));
        names.push(name);
        reads.push(reflected.read);
        streams.push(reflected.events.map(move |e| (i, e)).boxed());
    }
    let events = futures_util::stream::select_all(streams).ready_chunks(1024);
    tokio::pin!(events);
    let stop = shutdown.recv();
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            batch = events.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
            () = &mut stop => return,
        };
        if !crate::state::absorb(batch, &flags, &names) {
            continue;
        }
        let all: Vec<SourceResource> = reads.iter().flat_map(|read| read()).collect();
        let next = snapshot(&all, &settings);
        // Each change is a line to every importers replica: only real changes are sent.
        sources_tx.send_if_modified(|current| {
            if **current == next {
                false
            } else {
                *current = Arc::new(next);
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> SourceResource {
        let (mut loaded, errors) = crds::load_str(
            std::path::Path::new("/tmp/s.yaml"),
            yaml,
            crds::Mode::Kubernetes,
        );
        assert!(errors.is_empty(), "{errors:?}");
        match loaded.remove(0).resource {
            crds::Resource::Source(source) => source,
            other => panic!("{other:?}"),
        }
    }

    const PING: &str = "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata: {name: tick, namespace: team}\nspec:\n  sink: {ref: {apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}\n";

    #[test]
    fn sinks_resolve_to_the_broker_service_the_gateway_or_the_uri() {
        let settings = SinkSettings::default();
        let broker = resolve_sink(&load(PING), &settings).expect("a broker");
        assert_eq!(
            broker.url,
            "http://mecha-broker.mecha-system.svc/team/default"
        );
        assert_eq!(broker.uri, broker.url);
        let service = load(&PING.replace(
            "{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}",
            "{apiVersion: serving.knative.dev/v1, kind: Service, name: fn, namespace: other}, uri: /hook",
        ));
        let service = resolve_sink(&service, &settings).expect("a service");
        assert_eq!(service.url, "http://fn.other.svc.cluster.local/hook");
        assert_eq!(service.uri, "http://mecha-gateway.mecha-system.svc:80/hook");
        assert_eq!(service.host.as_deref(), Some("fn.other.svc.cluster.local"));
        let uri = load(&PING.replace(
            "{ref: {apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}",
            "{uri: \"http://example.com/in\"}",
        ));
        assert_eq!(
            resolve_sink(&uri, &settings).expect("a uri").uri,
            "http://example.com/in"
        );
    }

    #[test]
    fn status_says_ready_with_the_sink_or_names_the_refused_field() {
        let settings = SinkSettings::default();
        let source = load(PING);
        let status = status(&source, None, Some(3), &settings, "2026-01-01T00:00:00Z");
        assert_eq!(status.conditions[0].status, "True");
        assert_eq!(
            status.sink_uri.as_deref(),
            Some("http://mecha-broker.mecha-system.svc/team/default")
        );
        assert_eq!(status.ce_attributes[0].type_, "dev.knative.sources.ping");
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.url, None);

        // A bad schedule (a cluster's schema cannot check it) refuses it, naming the field.
        let SourceResource::Ping(mut bad) = source else {
            panic!()
        };
        bad.spec.schedule = Some("@every 1m".into());
        let bad = SourceResource::Ping(bad);
        let refused = super::status(
            &bad,
            Some(&status),
            Some(4),
            &settings,
            "2026-01-02T00:00:00Z",
        );
        let ready = &refused.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("InvalidSpec"))
        );
        assert!(
            ready.message.as_deref().unwrap().contains("spec.schedule"),
            "{ready:?}"
        );
        assert_eq!(refused.sink_uri, None);
        assert!(snapshot(&[bad], &settings).sources.is_empty());
    }

    #[test]
    fn a_webhook_source_has_its_url() {
        let github = load(
            "apiVersion: sources.knative.dev/v1alpha1\nkind: GitHubSource\nmetadata: {name: repo, namespace: team}\nspec:\n  ownerAndRepository: octo/hello\n  eventTypes: [push]\n  secretToken: {secretKeyRef: {name: gh, key: secret}}\n  sink: {uri: \"http://example.com/\"}\n",
        );
        let status = status(
            &github,
            None,
            None,
            &SinkSettings::default(),
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            status.url.as_deref(),
            Some("http://mecha-importers.mecha-system.svc/webhooks/github/team/repo")
        );
    }
}
