//! Loading resources from YAML files and directories.
//!
//! Documents are split at `---` lines the way kubectl splits them and numbered from 1,
//! counting only documents with content, so "document 2" is the second resource a reader sees
//! in the file. Each document is parsed, typed and validated on its own, and every problem is
//! reported: loading never stops at the first error.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bindings::{self, ContainerSource, SinkBinding};
use crate::config::{self, AutoscalerConfig, ConfigMap};
use crate::error::{FieldError, LoadError, Location};
use crate::eventing::{self, Broker, Trigger};
use crate::queues::{self, MqttSource, NatsSource, RedisStreamSource};
use crate::serving::{self, Service};
use crate::sources::{self, GitHubSource, GitLabSource, PingSource, SourceResource};

/// Which runtime the resources are validated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `mecha up`: containers run as local processes, so `command` is required.
    Local,
    /// A cluster: containers run from their `image`.
    Kubernetes,
}

/// Where a resource was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file as the user named it (for messages).
    pub file: PathBuf,
    /// 1-based document index within the file.
    pub document: usize,
    /// The file's directory, absolute: relative commands and working directories start here.
    pub dir: PathBuf,
}

/// A resource Mecha understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Service(Service),
    /// The `config-autoscaler` ConfigMap in `knative-serving`.
    AutoscalerConfig(AutoscalerConfig),
    Broker(Broker),
    Trigger(Trigger),
    /// An event source (`PingSource`, the webhook sources).
    Source(SourceResource),
}

/// A typed, validated resource and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub source: Source,
    pub resource: Resource,
}

/// Kinds Knative defines that Mecha does not run yet: named in the error so users know the
/// document was understood and deliberately refused.
const NOT_YET: &[(&str, &str)] = &[
    ("serving.knative.dev/v1", "Configuration"),
    ("serving.knative.dev/v1", "Route"),
    ("serving.knative.dev/v1", "Revision"),
];

// === impl Resource ===

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Service(_) => serving::KIND,
            Resource::AutoscalerConfig(_) => "ConfigMap",
            Resource::Broker(_) => eventing::BROKER_KIND,
            Resource::Trigger(_) => eventing::TRIGGER_KIND,
            Resource::Source(s) => s.kind(),
        }
    }

    pub fn namespace(&self) -> &str {
        match self {
            Resource::Service(s) => s.namespace(),
            Resource::AutoscalerConfig(_) => config::NAMESPACE,
            Resource::Broker(b) => b.namespace(),
            Resource::Trigger(t) => t.namespace(),
            Resource::Source(s) => s.namespace(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Service(s) => &s.metadata.name,
            Resource::AutoscalerConfig(_) => config::NAME,
            Resource::Broker(b) => &b.metadata.name,
            Resource::Trigger(t) => &t.metadata.name,
            Resource::Source(s) => s.name(),
        }
    }
}

/// Loads every YAML document under `paths`: files as given, directories recursively
/// (`*.yaml` and `*.yml`, in name order). Returns all resources, or every error found.
pub fn load_paths(paths: &[PathBuf], mode: Mode) -> Result<Vec<Loaded>, Vec<LoadError>> {
    let (files, mut errors) = yaml_files(paths);
    let mut loaded = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(content) => {
                let (ok, bad) = load_str(&file, &content, mode);
                loaded.extend(ok);
                errors.extend(bad);
            }
            Err(error) => errors.push(LoadError::file(&file, format!("cannot read: {error}"))),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// The files `paths` stands for: files as given, directories walked recursively for
/// `*.yaml` and `*.yml` in name order (hidden entries skipped). Paths that cannot be read, and
/// directories without YAML, are errors.
pub fn yaml_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<LoadError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                let before = files.len();
                if let Err(error) = collect_yaml_files(path, &mut files) {
                    errors.push(LoadError::file(
                        path,
                        format!("cannot read directory: {error}"),
                    ));
                } else if files.len() == before {
                    errors.push(LoadError::file(
                        path,
                        "no .yaml or .yml files in this directory",
                    ));
                }
            }
            Ok(_) => files.push(path.clone()),
            Err(error) => errors.push(LoadError::file(path, format!("cannot read: {error}"))),
        }
    }
    (files, errors)
}

fn collect_yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_yaml_files(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads the documents of one file's `content`; `file` names it in errors and sets the
/// directory that relative commands start from.
pub fn load_str(file: &Path, content: &str, mode: Mode) -> (Vec<Loaded>, Vec<LoadError>) {
    let dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
        .unwrap_or_default();
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (index, (first_line, text)) in split_documents(content).into_iter().enumerate() {
        let source = Source {
            file: file.to_path_buf(),
            document: index + 1,
            dir: dir.clone(),
        };
        match load_document(&source, first_line, &text, mode) {
            Ok(resource) => loaded.push(Loaded { source, resource }),
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    (loaded, errors)
}

/// Splits a YAML stream at `---` lines, dropping documents that hold only comments and
/// blank lines. Returns each document with the 1-based line it starts on.
fn split_documents(content: &str) -> Vec<(u64, String)> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut start = 1u64;
    let mut flush = |current: &mut String, start: u64| {
        let has_content = current.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if has_content {
            documents.push((start, std::mem::take(current)));
        }
        current.clear();
    };
    for (i, line) in content.lines().enumerate() {
        let line_no = i as u64 + 1;
        let is_separator =
            line.starts_with("---") && line[3..].chars().next().is_none_or(|c| c.is_whitespace());
        let is_end = line.trim_end() == "...";
        if is_separator || is_end {
            flush(&mut current, start);
            start = line_no + 1;
            // `--- key: value` starts the next document on the separator line itself.
            let rest = if is_separator { line[3..].trim() } else { "" };
            if !rest.is_empty() && !rest.starts_with('#') {
                current.push_str(rest);
                current.push('\n');
                start = line_no;
            }
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    flush(&mut current, start);
    documents
}

fn load_document(
    source_info: &Source,
    first_line: u64,
    text: &str,
    mode: Mode,
) -> Result<Resource, Vec<LoadError>> {
    let source = source_info;
    let at = |error: FieldError| LoadError::field(&source.file, source.document, error);
    let value: Value = serde_saphyr::from_str(text).map_err(|error| {
        let (line, column) = error
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        let message = error.without_snippet().to_string();
        vec![LoadError {
            file: source.file.clone(),
            document: Some(source.document),
            location: Location::Line {
                line: first_line + line.saturating_sub(1),
                column,
            },
            message: strip_location_suffix(&message),
            resource: None,
        }]
    })?;
    let Value::Object(map) = &value else {
        return Err(vec![at(FieldError::new(
            "",
            "a resource must be a mapping with apiVersion, kind, metadata and spec",
        ))]);
    };
    let field = |name: &str| match map.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(at(FieldError::new(name, "must be a non-empty string"))),
        None => Err(at(FieldError::new(name, "required"))),
    };
    let (api_version, kind) = match (field("apiVersion"), field("kind")) {
        (Ok(a), Ok(k)) => (a, k),
        (a, k) => return Err([a.err(), k.err()].into_iter().flatten().collect()),
    };
    // From here on every error names the resource, as far as its metadata says.
    let label = resource_label(&kind, map.get("metadata"));
    typed_document(source_info, &api_version, &kind, value.clone(), mode).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| match &label {
                Some(label) => e.with_resource(label.clone()),
                None => e,
            })
            .collect()
    })
}

/// `Kind namespace/name` from a document's raw metadata (namespace `default` when absent;
/// `None` without a name).
fn resource_label(kind: &str, metadata: Option<&Value>) -> Option<String> {
    let name = metadata?.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some(format!("{kind} {namespace}/{name}"))
}

/// The document as its kind's type, validated.
fn typed_document(
    source_info: &Source,
    api_version: &str,
    kind: &str,
    value: Value,
    mode: Mode,
) -> Result<Resource, Vec<LoadError>> {
    let source = source_info;
    let at = |error: FieldError| LoadError::field(&source.file, source.document, error);
    match (api_version, kind) {
        (serving::API_VERSION, serving::KIND) => {
            let service: Service = typed(value).map_err(|e| vec![at(e)])?;
            let errors = service.validate(mode);
            if errors.is_empty() {
                Ok(Resource::Service(service))
            } else {
                Err(errors.into_iter().map(at).collect())
            }
        }
        (eventing::API_VERSION, eventing::BROKER_KIND) => {
            let broker: Broker = typed(value).map_err(|e| vec![at(e)])?;
            valid(broker.validate(), Resource::Broker(broker), at)
        }
        (eventing::API_VERSION, eventing::TRIGGER_KIND) => {
            let trigger: Trigger = typed(value).map_err(|e| vec![at(e)])?;
            valid(trigger.validate(), Resource::Trigger(trigger), at)
        }
        (sources::API_VERSION, sources::PING_KIND) => {
            let source: PingSource = typed(value).map_err(|e| vec![at(e)])?;
            let source = SourceResource::Ping(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (sources::ALPHA_API_VERSION, sources::GITHUB_KIND) => {
            let mut source: GitHubSource = typed(value).map_err(|e| vec![at(e)])?;
            sources::anchor_secret_file(&mut source.metadata, &source_info.dir);
            let source = SourceResource::GitHub(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (sources::ALPHA_API_VERSION, sources::GITLAB_KIND) => {
            let mut source: GitLabSource = typed(value).map_err(|e| vec![at(e)])?;
            sources::anchor_secret_file(&mut source.metadata, &source_info.dir);
            let source = SourceResource::GitLab(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (sources::API_VERSION, bindings::CONTAINER_KIND) => {
            let mut source: ContainerSource = typed(value).map_err(|e| vec![at(e)])?;
            source.anchor(&source_info.dir);
            let source = SourceResource::Container(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (sources::API_VERSION, crate::apiserver::KIND) => {
            let source: crate::ApiServerSource = typed(value).map_err(|e| vec![at(e)])?;
            let source = SourceResource::ApiServer(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (sources::API_VERSION, bindings::BINDING_KIND) => {
            let source: SinkBinding = typed(value).map_err(|e| vec![at(e)])?;
            let source = SourceResource::Binding(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (sources::ALPHA_API_VERSION, queues::REDIS_KIND) => {
            let source: RedisStreamSource = typed(value).map_err(|e| vec![at(e)])?;
            let source = SourceResource::Redis(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (queues::MECHA_API_VERSION, queues::NATS_KIND) => {
            let source: NatsSource = typed(value).map_err(|e| vec![at(e)])?;
            let source = SourceResource::Nats(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        (queues::MECHA_API_VERSION, queues::MQTT_KIND) => {
            let source: MqttSource = typed(value).map_err(|e| vec![at(e)])?;
            let source = SourceResource::Mqtt(source);
            valid(source.validate(mode), Resource::Source(source), at)
        }
        ("v1", "ConfigMap") => {
            let map: ConfigMap = typed(value).map_err(|e| vec![at(e)])?;
            if map.metadata.name != config::NAME || map.metadata.namespace() != config::NAMESPACE {
                return Err(vec![at(FieldError::new(
                    "metadata",
                    format!(
                        "Mecha reads only the {}/{} ConfigMap, not {}/{}",
                        config::NAMESPACE,
                        config::NAME,
                        map.metadata.namespace(),
                        map.metadata.name
                    ),
                ))]);
            }
            AutoscalerConfig::from_data(&map.data)
                .map(Resource::AutoscalerConfig)
                .map_err(|errors| errors.into_iter().map(at).collect())
        }
        (api, kind) if NOT_YET.contains(&(api, kind)) => Err(vec![at(FieldError::new(
            "kind",
            format!("{kind} ({api}) is not supported by Mecha yet"),
        ))]),
        (api, kind) => Err(vec![at(FieldError::new(
            "kind",
            format!(
                "unsupported kind {kind} ({api}); Mecha understands {} ({}), {} and {} ({}), {}, {}, {}, {} ({}), {}, {} and {} ({}), {} and {} ({}) and the {}/{} ConfigMap",
                serving::KIND,
                serving::API_VERSION,
                eventing::BROKER_KIND,
                eventing::TRIGGER_KIND,
                eventing::API_VERSION,
                sources::PING_KIND,
                bindings::CONTAINER_KIND,
                bindings::BINDING_KIND,
                crate::apiserver::KIND,
                sources::API_VERSION,
                sources::GITHUB_KIND,
                sources::GITLAB_KIND,
                queues::REDIS_KIND,
                sources::ALPHA_API_VERSION,
                queues::NATS_KIND,
                queues::MQTT_KIND,
                queues::MECHA_API_VERSION,
                config::NAMESPACE,
                config::NAME
            ),
        ))]),
    }
}

fn valid(
    errors: Vec<FieldError>,
    resource: Resource,
    at: impl Fn(FieldError) -> LoadError,
) -> Result<Resource, Vec<LoadError>> {
    if errors.is_empty() {
        Ok(resource)
    } else {
        Err(errors.into_iter().map(at).collect())
    }
}

/// Deserializes a document into a typed resource, naming the field of the first mismatch.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = error.inner().to_string();
        // serde says "unknown field `x`, expected one of `a`, `b`": say plainly that the
        // field is not supported and which ones are.
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((name, expected)) = rest.split_once('`')
        {
            let expected = expected
                .trim_start_matches(", ")
                .replace("expected one of ", "")
                .replace("expected ", "")
                .replace('`', "");
            // The path already ends at the unknown key; make sure it names it.
            let full = if path.ends_with(name) {
                path
            } else if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
            return FieldError::new(
                full,
                format!("unknown or unsupported field (supported here: {expected})"),
            );
        }
        FieldError::new(path, message)
    })
}

/// serde-saphyr appends " at line L column C" to some messages; the location is reported
/// separately (adjusted to the whole file), so drop the document-relative one.
fn strip_location_suffix(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: hello
spec:
  template:
    spec:
      containers:
        - command: [python3, app.py]
";

    fn errors_of(content: &str) -> Vec<String> {
        let (_, errors) = load_str(Path::new("examples/bad.yaml"), content, Mode::Local);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn loads_a_service_with_defaults() {
        let (loaded, errors) = load_str(Path::new("x/hello.yaml"), HELLO, Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::Service(service) = &loaded[0].resource else {
            panic!("not a service")
        };
        assert_eq!(service.namespace(), "default");
        assert_eq!(service.timeout_seconds(), 300);
        assert_eq!(loaded[0].source.document, 1);
        assert!(loaded[0].source.dir.is_absolute());
        assert!(loaded[0].source.dir.ends_with("x"));
    }

    #[test]
    fn missing_command_names_file_document_and_field() {
        let doc2 = HELLO.replace(
            "        - command: [python3, app.py]\n",
            "        - image: x\n",
        );
        let errors = errors_of(&format!("{HELLO}---\n# second\n{doc2}"));
        assert_eq!(
            errors,
            vec![
                "examples/bad.yaml: document 2 (Service default/hello): spec.template.spec.containers[0].command: required in local mode: Mecha runs the command as a process and does not pull the image"
            ]
        );
    }

    #[test]
    fn unknown_field_is_rejected_by_name() {
        let errors = errors_of(&HELLO.replace("    spec:\n", "    spec:\n      volumes: []\n"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "examples/bad.yaml: document 1 (Service default/hello): spec.template.spec.volumes: unknown or unsupported field"
            ),
            "{errors:?}"
        );
        let errors = errors_of(&HELLO.replace(
            "        - command",
            "        - livenessProbe: {}\n          command",
        ));
        assert!(
            errors[0].contains("spec.template.spec.containers[0].livenessProbe: unknown"),
            "{errors:?}"
        );
    }

    #[test]
    fn unsupported_kinds_are_reported() {
        let errors = errors_of("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with(
                "examples/bad.yaml: document 1 (Deployment default/x): kind: unsupported kind Deployment (apps/v1)"
            ),
            "{errors:?}"
        );
        let errors = errors_of("apiVersion: serving.knative.dev/v1\nkind: Route\n");
        assert!(errors[0].contains("Route (serving.knative.dev/v1) is not supported by Mecha yet"));
    }

    #[test]
    fn the_autoscaler_config_map_loads_and_others_are_refused() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: config-autoscaler\n  namespace: knative-serving\ndata:\n  stable-window: 6s\n";
        let (loaded, errors) = load_str(Path::new("c.yaml"), yaml, Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::AutoscalerConfig(config) = &loaded[0].resource else {
            panic!("not the autoscaler config")
        };
        assert_eq!(config.stable_window.as_secs(), 6);
        let errors = errors_of(&yaml.replace("6s", "2s"));
        assert!(
            errors[0].contains(
                "document 1 (ConfigMap knative-serving/config-autoscaler): data[\"stable-window\"]: 2s is out of range"
            ),
            "{errors:?}"
        );
        let errors = errors_of(&yaml.replace("config-autoscaler", "config-network"));
        assert!(
            errors[0].contains("Mecha reads only the knative-serving/config-autoscaler ConfigMap"),
            "{errors:?}"
        );
    }

    #[test]
    fn yaml_syntax_errors_carry_the_file_line() {
        let errors = errors_of(&format!("{HELLO}---\napiVersion: v1\nkind: [unclosed\n"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("examples/bad.yaml: document 2: line 12"),
            "{errors:?}"
        );
    }

    #[test]
    fn type_mismatch_and_validation_errors_all_reported() {
        let bad = HELLO
            .replace("  name: hello", "  name: Hello_World")
            .replace("    spec:\n", "    spec:\n      timeoutSeconds: 900\n");
        let errors = errors_of(&bad);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("metadata.name: \"Hello_World\" is not a valid DNS label"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("spec.template.spec.timeoutSeconds: 900 is out of range"))
        );
        let errors =
            errors_of(&HELLO.replace("    spec:\n", "    spec:\n      timeoutSeconds: soon\n"));
        assert!(
            errors[0].contains("spec.template.spec.timeoutSeconds: invalid type"),
            "{errors:?}"
        );
    }

    #[test]
    fn traffic_is_checked() {
        let bad = format!(
            "{HELLO}  traffic:\n    - latestRevision: true\n      percent: 60\n    - percent: 30\n      tag: Blue\n"
        );
        let errors = errors_of(&bad);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("spec.traffic[1].revisionName: required")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("spec.traffic[1].tag:")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("spec.traffic: percents add up to 90")),
            "{errors:?}"
        );
    }

    #[test]
    fn documents_are_split_like_kubectl() {
        let docs = split_documents("# only a comment\n---\na: 1\n--- # c\n\n---\nb: 2\n...\n");
        assert_eq!(
            docs,
            vec![(3, "a: 1\n".to_string()), (7, "b: 2\n".to_string())]
        );
    }

    #[test]
    fn directories_load_recursively_and_missing_paths_fail() {
        let dir = std::env::temp_dir().join(format!("crds-load-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/a.yaml"), HELLO).expect("write");
        std::fs::write(dir.join("notes.txt"), "not yaml").expect("write");
        let loaded = load_paths(std::slice::from_ref(&dir), Mode::Local).expect("loads");
        assert_eq!(loaded.len(), 1);
        let errors = load_paths(&[dir.join("missing.yaml")], Mode::Local).expect_err("missing");
        assert!(errors[0].to_string().contains("missing.yaml: cannot read"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
