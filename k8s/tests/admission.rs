//! What a structural schema lets through but local mode refuses is refused in a cluster too,
//! with the message `mecha up` prints, in the resource's `Ready` condition.

use std::path::Path;

use k8s::admission;
use serde::de::DeserializeOwned;

/// The errors local mode reports for `yaml` (one document), without the file and document
/// that only a file has.
fn local_errors(yaml: &str) -> String {
    let file = Path::new("resource.yaml");
    let (loaded, errors) = crds::load_str(file, yaml, crds::Mode::Kubernetes);
    assert!(loaded.is_empty(), "local mode refuses it too");
    errors
        .iter()
        .map(|e| {
            // `resource.yaml: document 1 (Kind namespace/name): field: message`
            let text = e.to_string();
            let rest = text
                .strip_prefix("resource.yaml: document 1 (")
                .expect("placed in the document, naming the resource");
            rest.split_once("): ")
                .expect("the resource, then the field")
                .1
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn parse<T: DeserializeOwned>(yaml: &str) -> T {
    serde_saphyr::from_str(yaml).expect("the schema lets it through")
}

fn assert_refused(condition: k8s::crd::Condition, yaml: &str, names: &str) {
    assert_eq!(
        (condition.type_.as_str(), condition.status.as_str()),
        ("Ready", "False")
    );
    assert_eq!(condition.reason.as_deref(), Some(admission::INVALID_SPEC));
    let message = condition.message.expect("a message");
    assert_eq!(message, local_errors(yaml), "the same words as mecha up");
    assert!(message.contains(names), "{message}");
}

#[test]
fn a_service_is_checked_as_local_mode_checks_it() {
    let valid = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/service.yaml"),
    )
    .expect("fixture");
    assert_eq!(admission::service(&parse(&valid)), None);

    let yaml = r#"apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: hello
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/min-scale: "5"
        autoscaling.knative.dev/max-scale: "2"
        autoscaling.knative.dev/window: "2s"
    spec:
      containers:
        - command: [serve]
"#;
    let condition = admission::service(&parse(yaml)).expect("refused");
    assert_refused(
        condition,
        yaml,
        "spec.template.metadata.annotations[\"autoscaling.knative.dev/window\"]",
    );
}

#[test]
fn a_trigger_with_bad_cesql_is_refused_naming_the_filter() {
    let yaml = r#"apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: orders
spec:
  broker: default
  filters:
    - cesql: "type LIKE 'order.%' AND"
  subscriber:
    uri: http://example.com/
"#;
    let condition = admission::trigger(&parse(yaml)).expect("refused");
    assert_refused(condition, yaml, "spec.filters[0].cesql");
}

#[test]
fn a_broker_with_a_bad_duration_is_refused() {
    let yaml = r#"apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: default
spec:
  delivery:
    backoffDelay: "200ms"
"#;
    let condition = admission::broker(&parse(yaml)).expect("refused");
    assert_refused(condition, yaml, "spec.delivery.backoffDelay");
    // Written without `spec`, a Broker gets `spec: {}` from the API server (the CRD's default).
    let fine =
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\nspec: {}\n";
    assert_eq!(admission::broker(&parse(fine)), None);
}
