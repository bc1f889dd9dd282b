//! The CRDs in `deploy/crds/` are exactly what the types generate, parse as Kubernetes
//! `CustomResourceDefinition`s, carry structural schemas, and read Knative YAML as local mode
//! does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
}

fn checked_in() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(crd_dir())
        .expect("deploy/crds exists (run `cargo run -p k8s --bin crdgen`)")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        // kustomize's list of these files (k8s/tests/manifests.rs checks it), not a CRD.
        .filter(|path| !path.ends_with("kustomization.yaml"))
        .map(|path| {
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).expect("readable");
            (name, text)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_checked_in_crds_are_what_the_types_generate() {
    let generated = k8s::crds();
    for crd in &generated {
        let name = k8s::file_name(crd);
        let path = crd_dir().join(&name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let expected = k8s::to_yaml(crd).expect("yaml");
        assert!(
            on_disk == expected,
            "deploy/crds/{name} differs from what k8s/src/crd.rs generates; run `cargo run -p k8s --bin crdgen`"
        );
    }
    let expected: BTreeSet<String> = generated.iter().map(k8s::file_name).collect();
    let found: BTreeSet<String> = checked_in().into_iter().map(|(name, _)| name).collect();
    assert_eq!(found, expected, "no stale or missing CRD files");
}

#[test]
fn every_checked_in_crd_parses_as_a_custom_resource_definition() {
    let files = checked_in();
    assert_eq!(files.len(), 13);
    let mut kinds = BTreeSet::new();
    for (name, text) in files {
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            crd,
            k8s::crds()
                .into_iter()
                .find(|c| k8s::file_name(c) == name)
                .expect("generated"),
            "{name} round-trips"
        );
        assert_eq!(crd.spec.scope, "Namespaced", "{name}");
        let [version] = &crd.spec.versions[..] else {
            panic!("{name}: one version")
        };
        // Knative's webhook and Redis sources, and Mecha's own NATS and MQTT sources, are
        // v1alpha1 kinds; the rest v1.
        let expected = if crd.spec.group == "sources.mecha.dev"
            || ["GitHubSource", "GitLabSource", "RedisStreamSource"]
                .contains(&crd.spec.names.kind.as_str())
        {
            "v1alpha1"
        } else {
            "v1"
        };
        assert_eq!(
            (version.name.as_str(), version.served, version.storage),
            (expected, true, true),
            "{name}"
        );
        let status = version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref());
        assert!(status.is_some(), "{name}: status subresource");
        kinds.insert(format!("{}/{}", crd.spec.group, crd.spec.names.kind));
    }
    assert_eq!(
        kinds,
        BTreeSet::from([
            "eventing.knative.dev/Broker".to_string(),
            "eventing.knative.dev/Trigger".to_string(),
            "serving.knative.dev/Revision".to_string(),
            "serving.knative.dev/Service".to_string(),
            "sources.knative.dev/PingSource".to_string(),
            "sources.knative.dev/GitHubSource".to_string(),
            "sources.knative.dev/GitLabSource".to_string(),
            "sources.knative.dev/RedisStreamSource".to_string(),
            "sources.knative.dev/ContainerSource".to_string(),
            "sources.knative.dev/SinkBinding".to_string(),
            "sources.knative.dev/ApiServerSource".to_string(),
            "sources.mecha.dev/NatsSource".to_string(),
            "sources.mecha.dev/MqttSource".to_string(),
        ])
    );
}

/// What the API server demands of a structural schema (and rejects a CRD for): no `$ref`,
/// a type on every node (or int-or-string, or preserve-unknown-fields), and never
/// `additionalProperties: false` next to `properties`.
fn check_structural(node: &Value, at: &str, problems: &mut Vec<String>) {
    let Some(object) = node.as_object() else {
        return;
    };
    if object.contains_key("$ref") {
        problems.push(format!("{at}: $ref"));
    }
    let typed = object.contains_key("type")
        || object.contains_key("x-kubernetes-int-or-string")
        || object.contains_key("x-kubernetes-preserve-unknown-fields");
    if !typed {
        problems.push(format!("{at}: no type"));
    }
    if object.contains_key("properties")
        && object.get("additionalProperties") == Some(&Value::Bool(false))
    {
        problems.push(format!("{at}: additionalProperties: false with properties"));
    }
    if let Some(properties) = object.get("properties").and_then(Value::as_object) {
        for (name, schema) in properties {
            check_structural(schema, &format!("{at}.{name}"), problems);
        }
    }
    if let Some(items) = object.get("items") {
        check_structural(items, &format!("{at}[]"), problems);
    }
    if let Some(values) = object.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(values, &format!("{at}{{}}"), problems);
    }
}

#[test]
fn every_schema_is_structural() {
    for crd in k8s::crds() {
        let name = k8s::file_name(&crd);
        let version = &crd.spec.versions[0];
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a schema");
        let schema = serde_json::to_value(schema).expect("json");
        let mut problems = Vec::new();
        check_structural(&schema, "", &mut problems);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
        let properties = &schema["properties"];
        assert!(properties["spec"].is_object(), "{name}: spec");
        assert!(properties["status"].is_object(), "{name}: status");
        // Knative's Broker is usually written without a spec; the API server defaults it.
        let spec_required = schema["required"]
            .as_array()
            .is_some_and(|r| r.contains(&Value::from("spec")));
        if crd.spec.names.kind == "Broker" {
            assert!(!spec_required, "{name}");
            assert_eq!(
                properties["spec"]["default"],
                serde_json::json!({}),
                "{name}"
            );
        } else {
            assert!(spec_required, "{name}");
        }
    }
}

#[test]
fn knative_yaml_reads_the_same_as_in_local_mode() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/traffic-split/service.yaml");
    let text = std::fs::read_to_string(&path).expect("example");
    let second = text.split("\n---\n").nth(1).expect("two documents");
    let resource: k8s::Service = serde_saphyr::from_str(second).expect("a Knative Service");
    let (loaded, errors) = crds::load_str(&path, &text, crds::Mode::Local);
    assert!(errors.is_empty(), "{errors:?}");
    let crds::Resource::Service(local) = &loaded[1].resource else {
        panic!("a service")
    };
    assert_eq!(resource.spec.0, local.spec, "one definition of every field");
    assert_eq!(resource.metadata.name.as_deref(), Some("colors"));

    // An unknown field is an error, as in local mode.
    let typo = second.replace("tag: blue", "tagg: blue");
    let error = serde_saphyr::from_str::<k8s::Service>(&typo).expect_err("unknown field");
    assert!(error.to_string().contains("tagg"), "{error}");
}

#[test]
fn status_traffic_carries_the_spec_fields_and_a_url() {
    let status: k8s::crd::ServiceStatus = serde_json::from_value(serde_json::json!({
        "url": "http://colors.default.example.com",
        "latestReadyRevisionName": "colors-00002",
        "conditions": [{"type": "Ready", "status": "True"}],
        "traffic": [{"revisionName": "colors-00001", "percent": 50, "tag": "blue",
                     "url": "http://blue-colors.default.example.com"}],
    }))
    .expect("status");
    let entry = &status.traffic[0];
    assert_eq!(entry.target.revision_name.as_deref(), Some("colors-00001"));
    assert_eq!(entry.target.percent, Some(50));
    assert_eq!(
        entry.url.as_deref(),
        Some("http://blue-colors.default.example.com")
    );
    assert_eq!(status.conditions[0].type_, "Ready");
}
