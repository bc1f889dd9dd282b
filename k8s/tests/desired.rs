//! The serving reconciler's desired objects: pure functions of the observed objects, pinned
//! by golden YAML under `tests/golden/` (`MECHA_UPDATE_GOLDEN=1` rewrites them), each of which
//! parses into its typed Kubernetes object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s::desired::{self, PodSettings};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service as KubeService;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn service() -> k8s::Service {
    let text = std::fs::read_to_string(golden("service.yaml")).expect("fixture");
    serde_saphyr::from_str(&text).expect("a Knative Service")
}

fn settings() -> PodSettings {
    PodSettings {
        sidecar_image: "mecha/activator-sidecar:dev".into(),
        autoscaler_addr: "mecha-autoscaler.mecha-system.svc:8080".into(),
        sidecar_requests: BTreeMap::from([
            ("cpu".into(), "25m".into()),
            ("memory".into(), "32Mi".into()),
        ]),
        mesh_no_proxy: vec!["db.internal".into()],
    }
}

/// `value` is what `tests/golden/{name}` holds, and the file parses back into `value`.
fn assert_golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    name: &str,
    value: &T,
) {
    let path = golden(name);
    let yaml = serde_saphyr::to_string(value).expect("yaml");
    if std::env::var_os("MECHA_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &yaml).expect("write golden");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == yaml,
        "tests/golden/{name} differs from what k8s::desired computes (rerun with MECHA_UPDATE_GOLDEN=1 and review the diff):\n{yaml}"
    );
    let parsed: T = serde_saphyr::from_str(&on_disk)
        .unwrap_or_else(|e| panic!("tests/golden/{name} is not a valid object: {e}"));
    assert_eq!(&parsed, value, "{name} parses back into the same object");
}

/// The first Revision, as the API server returns it once created.
fn created(mut revision: k8s::Revision) -> k8s::Revision {
    revision.metadata.uid = Some("6f1c2a9e-0000-4000-8000-000000000002".into());
    revision
}

#[test]
fn a_service_makes_its_first_revision() {
    let service = service();
    let revision = desired::next_revision(&service, &[]).expect("a first revision");
    assert_eq!(revision.metadata.name.as_deref(), Some("hello-00001"));
    let owner = &revision.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Service", Some(true))
    );
    assert_golden("hello-00001.revision.yaml", &revision);
}

#[test]
fn only_a_template_change_makes_a_new_revision() {
    let mut service = service();
    let first = created(desired::next_revision(&service, &[]).expect("first"));
    assert!(desired::next_revision(&service, std::slice::from_ref(&first)).is_none());

    // Traffic is not the template.
    service.spec.0.traffic = vec![crds::serving::TrafficTarget {
        latest_revision: Some(true),
        percent: Some(100),
        ..Default::default()
    }];
    assert!(desired::next_revision(&service, std::slice::from_ref(&first)).is_none());

    // An annotation is.
    service
        .spec
        .0
        .template
        .metadata
        .annotations
        .insert("autoscaling.knative.dev/target".into(), "30".into());
    let second = desired::next_revision(&service, std::slice::from_ref(&first)).expect("second");
    assert_eq!(second.metadata.name.as_deref(), Some("hello-00002"));
    assert_eq!(
        second.metadata.labels.as_ref().expect("labels")["serving.knative.dev/configurationGeneration"],
        "2"
    );
    // So is the container; numbering goes on from the highest, whatever the order.
    service.spec.0.template.spec.containers[0].args.clear();
    let third = desired::next_revision(&service, &[created(second), first]).expect("third");
    assert_eq!(third.metadata.name.as_deref(), Some("hello-00003"));
}

#[test]
fn a_revision_runs_as_a_deployment_with_the_sidecar() {
    let revision = created(desired::next_revision(&service(), &[]).expect("revision"));
    let deployment = desired::deployment(&revision, &settings()).expect("deployment");
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, None, "replicas belong to the autoscaler");
    let pod = spec.template.spec.as_ref().expect("pod");
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["user-container", "activator-sidecar"]);
    let env: BTreeMap<&str, &str> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
        .collect();
    assert_eq!(env["PORT"], "9000");
    assert_eq!(env["K_REVISION"], "hello-00001");
    assert_eq!(env["K_SERVICE"], "hello");
    assert_eq!(env["K_CONFIGURATION"], "hello");
    assert!(
        pod.containers[0].readiness_probe.is_none(),
        "probed through the sidecar"
    );
    // The sidecar, and only the sidecar, gets the projected token for the autoscaler.
    let sidecar = &pod.containers[1];
    let sidecar_env: BTreeMap<&str, &str> = sidecar
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
        .collect();
    assert_eq!(
        sidecar_env["AUTOSCALER_TOKEN_FILE"],
        "/var/run/secrets/mecha/token"
    );
    assert_eq!(
        sidecar_env["AUTOSCALER_ADDR"],
        "mecha-autoscaler.mecha-system.svc:8080"
    );
    let mount = &sidecar.volume_mounts.as_ref().expect("a mount")[0];
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/var/run/secrets/mecha", Some(true))
    );
    assert!(pod.containers[0].volume_mounts.is_none(), "not the user's");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume");
    let token = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.as_ref())
        .expect("a projected service-account token");
    assert_eq!(
        (token.audience.as_deref(), token.path.as_str()),
        (Some("mecha-autoscaler"), "token")
    );
    assert_golden::<Deployment>("hello-00001.deployment.yaml", &deployment);

    let headless = desired::headless_service(&revision).expect("service");
    assert_eq!(
        headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None")
    );
    assert_golden::<KubeService>("hello-00001.service.yaml", &headless);
}

#[test]
fn the_sidecar_probes_the_way_the_container_asks() {
    let env_of = |service: &k8s::Service| -> BTreeMap<String, String> {
        let revision = created(desired::next_revision(service, &[]).expect("revision"));
        let deployment = desired::deployment(&revision, &settings()).expect("deployment");
        let pod = deployment.spec.expect("spec").template.spec.expect("pod");
        let sidecar = pod
            .containers
            .into_iter()
            .find(|c| c.name == desired::SIDECAR_NAME)
            .expect("sidecar");
        sidecar
            .env
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect()
    };
    let mut service = service();
    let container = &mut service.spec.0.template.spec.containers[0];
    // An httpGet without a path probes `/`.
    container
        .readiness_probe
        .as_mut()
        .and_then(|p| p.http_get.as_mut())
        .expect("httpGet")
        .path = None;
    assert_eq!(env_of(&service)["SERVING_READINESS_PATH"], "/");
    // A TCP probe (or none) is a connect to the container's port.
    let container = &mut service.spec.0.template.spec.containers[0];
    container.readiness_probe = Some(crds::serving::Probe {
        tcp_socket: Some(crds::serving::TcpSocketAction::default()),
        ..Default::default()
    });
    let env = env_of(&service);
    assert!(!env.contains_key("SERVING_READINESS_PATH"), "{env:?}");
    assert_eq!(env["USER_PORT"], "9000");
    // No port declared: Knative's 8080.
    let container = &mut service.spec.0.template.spec.containers[0];
    container.ports.clear();
    container.readiness_probe = None;
    assert_eq!(env_of(&service)["USER_PORT"], "8080");
}

#[test]
fn a_meshed_function_gets_the_outbound_role_and_its_proxy() {
    let mut service = service();
    let template = &mut service.spec.0.template;
    template
        .metadata
        .annotations
        .insert(crds::serving::MESH.into(), "true".into());
    template.spec.containers[0].env.push(crds::serving::EnvVar {
        name: "NO_PROXY".into(),
        value: "metadata.internal, localhost".into(),
    });
    let revision = created(desired::next_revision(&service, &[]).expect("revision"));
    let deployment = desired::deployment(&revision, &settings()).expect("deployment");
    let pod = deployment
        .spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .clone()
        .expect("pod");
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["user-container", "activator-sidecar", "activator-outbound"]
    );
    let env_of = |container: &k8s_openapi::api::core::v1::Container| -> Vec<(String, String)> {
        container
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    };
    let user = env_of(&pod.containers[0]);
    let get = |key: &str| -> Vec<&str> {
        user.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("HTTP_PROXY"), ["http://127.0.0.1:15001"]);
    assert_eq!(get("http_proxy"), ["http://127.0.0.1:15001"]);
    assert!(get("HTTPS_PROXY").is_empty(), "TLS calls go directly");
    // The pod's own hosts, the installation's, then the container's own — once each, and the
    // container's own NO_PROXY replaced rather than listed twice.
    assert_eq!(
        get("NO_PROXY"),
        ["127.0.0.1,::1,db.internal,metadata.internal,localhost"]
    );
    assert_eq!(get("no_proxy"), get("NO_PROXY"));
    let outbound = &pod.containers[2];
    assert_eq!(
        outbound.args.as_deref(),
        Some(&["outbound".to_string()][..])
    );
    let outbound_env: BTreeMap<String, String> = env_of(outbound).into_iter().collect();
    assert_eq!(outbound_env["OUTBOUND_PORT"], "15001");
    assert_eq!(
        outbound_env["GATEWAY_ADMIN_PORT"], "8023",
        "the inbound sidecar has 8022"
    );
    assert_eq!(
        outbound_env["AUTOSCALER_TOKEN_FILE"],
        "/var/run/secrets/mecha/token"
    );
    assert_eq!(
        outbound.volume_mounts.as_ref().expect("the token")[0].mount_path,
        "/var/run/secrets/mecha"
    );
    assert_golden::<Deployment>("hello-00001.meshed.deployment.yaml", &deployment);

    // "false" and no annotation are the same pod.
    service
        .spec
        .0
        .template
        .metadata
        .annotations
        .insert(crds::serving::MESH.into(), "false".into());
    let revision = created(desired::next_revision(&service, &[]).expect("revision"));
    let pod = desired::deployment(&revision, &settings())
        .and_then(|d| d.spec?.template.spec)
        .expect("pod");
    assert_eq!(pod.containers.len(), 2);
}

#[test]
fn a_service_has_a_cluster_local_name_at_the_gateway() {
    let local =
        desired::cluster_local_service(&service(), "mecha-gateway.mecha-system.svc.cluster.local")
            .expect("service");
    let spec = local.spec.as_ref().expect("spec");
    assert_eq!(
        (spec.type_.as_deref(), spec.external_name.as_deref()),
        (
            Some("ExternalName"),
            Some("mecha-gateway.mecha-system.svc.cluster.local")
        )
    );
    assert_eq!(local.metadata.name.as_deref(), Some("hello"));
    let owner = &local.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Service", "hello")
    );
    assert_golden::<KubeService>("hello.cluster-local.service.yaml", &local);
}

/// An ApiServerSource's adapter Deployment: `apiserversource-{name}` under the source's
/// service account, the control plane's image running `apiserver-adapter` with `K_SINK`,
/// `K_CE_OVERRIDES` and `K_SOURCE_CONFIG`, probed on its admin port, unprivileged, owned by
/// the source.
#[test]
fn an_api_server_source_runs_as_its_adapter_deployment() {
    use k8s::apiserver::{AdapterConfig, Namespaces, adapter_deployment};
    let source: k8s::crd::ApiServerSource = serde_json::from_value(serde_json::json!({
        "apiVersion": "sources.knative.dev/v1",
        "kind": "ApiServerSource",
        "metadata": {
            "name": "pods", "namespace": "team-a",
            "uid": "6f1c2a9e-0000-4000-8000-000000000009",
        },
        "spec": {
            "resources": [{ "apiVersion": "v1", "kind": "Pod",
                            "selector": { "matchLabels": { "app": "web" } } }],
            "owner": { "apiVersion": "apps/v1", "kind": "ReplicaSet" },
            "serviceAccountName": "pod-watcher",
            "ceOverrides": { "extensions": { "team": "blue" } },
            "sink": { "ref": { "apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "default" } },
        },
    }))
    .expect("an ApiServerSource");
    let config = AdapterConfig::for_source(
        &source.local_source(),
        &Namespaces::Listed(vec!["team-a".into()]),
    );
    let deployment = adapter_deployment(
        &source,
        "http://mecha-broker.mecha-system.svc/team-a/default",
        "mecha/autoscaler:0.1.0",
        &config,
    )
    .expect("a Deployment");
    assert_golden::<Deployment>("apiserversource-pods.deployment.yaml", &deployment);
    let pod = deployment.spec.expect("spec").template.spec.expect("pod");
    assert_eq!(pod.service_account_name.as_deref(), Some("pod-watcher"));
    let env: BTreeMap<String, String> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        AdapterConfig::parse(&env["K_SOURCE_CONFIG"]).expect("valid"),
        config
    );
}
