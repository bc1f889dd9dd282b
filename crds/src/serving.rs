//! `serving.knative.dev/v1` `Service`: the documented subset of Knative's fields, Knative's
//! defaults and validation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::autoscaling::ScalingAnnotations;
use crate::error::FieldError;
use crate::load::Mode;
use crate::meta::{ObjectMeta, dns_label};

pub const API_VERSION: &str = "serving.knative.dev/v1";
pub const KIND: &str = "Service";

/// Knative's default and maximum `timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
pub const MAX_TIMEOUT_SECONDS: u64 = 600;
/// Knative's default upper bound on `containerConcurrency`.
pub const MAX_CONTAINER_CONCURRENCY: u32 = 1000;

/// Prefix of Mecha's own template annotations.
pub const MECHA_PREFIX: &str = "mecha.dev/";
/// Most requests callers hold for a revision that has no free replica.
pub const MAX_BUFFERED_REQUESTS: &str = "mecha.dev/max-buffered-requests";
/// Most declared body bytes (`Content-Length`) of the requests held for a revision.
pub const MAX_BUFFERED_BYTES: &str = "mecha.dev/max-buffered-bytes";

/// `"true"`: the function joins the mesh — its calls to other functions go through a proxy
/// of its own (the sidecar's outbound role in a cluster) straight to a replica of the callee,
/// waking it from zero, with `HTTP_PROXY` set for it ([`mesh_env`]).
pub const MESH: &str = "mecha.dev/mesh";
/// Where a meshed function's proxy listens: the outbound role's loopback port in its pod.
pub const MESH_PROXY_PORT: u16 = 15001;
/// Hosts a meshed function reaches without its proxy (its own pod). Not `localhost`: HTTP
/// clients read a name in `NO_PROXY` as that domain and all below it, and local mode's
/// Services are `{name}.{namespace}.localhost`; a call to `localhost:PORT` goes through the
/// proxy to the same place.
pub const MESH_NO_PROXY: &[&str] = &["127.0.0.1", "::1"];

/// The variables that send a meshed function's HTTP calls through `proxy`
/// (`http://127.0.0.1:15001`): `HTTP_PROXY` and `http_proxy` (curl reads only the lower-case
/// one), and `NO_PROXY`/`no_proxy` — [`MESH_NO_PROXY`], then `extra_no_proxy` (the
/// installation's), then what the container's own `NO_PROXY` lists. `HTTPS_PROXY` is left
/// alone: TLS calls go directly.
pub fn mesh_env(
    proxy: &str,
    container: &Container,
    extra_no_proxy: &[String],
) -> Vec<(String, String)> {
    let mut no_proxy: Vec<String> = MESH_NO_PROXY.iter().map(|h| (*h).to_string()).collect();
    no_proxy.extend(extra_no_proxy.iter().cloned());
    for own in container
        .env
        .iter()
        .filter(|e| e.name == "NO_PROXY" || e.name == "no_proxy")
    {
        no_proxy.extend(
            own.value
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(String::from),
        );
    }
    let mut seen = std::collections::HashSet::new();
    no_proxy.retain(|h| seen.insert(h.clone()));
    let no_proxy = no_proxy.join(",");
    vec![
        ("HTTP_PROXY".into(), proxy.into()),
        ("http_proxy".into(), proxy.into()),
        ("NO_PROXY".into(), no_proxy.clone()),
        ("no_proxy".into(), no_proxy),
    ]
}

/// Environment variables Mecha sets itself; a container may not set them.
pub const RESERVED_ENV: &[&str] = &["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServiceSpec {
    pub template: RevisionTemplate,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// `spec.template`: every change to it makes a new Revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RevisionTemplate {
    #[serde(default)]
    pub metadata: TemplateMeta,
    pub spec: RevisionSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TemplateMeta {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RevisionSpec {
    pub containers: Vec<Container>,
    /// Most requests a replica takes at once; 0 means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Container {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Required in Kubernetes mode; in local mode it is not pulled and may be omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<u32>,
    /// 0 (Knative's default for readiness) probes aggressively until ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HttpGetAction {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TcpSocketAction {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
}

/// Kubernetes' IntOrString for probe ports: a number or a port name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u32),
    Name(String),
}

/// Accepted for portability; local mode does not enforce resource limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TrafficTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_revision: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The protocol a container speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1 (port name `http1` or no name).
    Http1,
    /// HTTP/2 without TLS, prior knowledge (port name `h2c`).
    H2c,
}

// === impl Service ===

impl Service {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    pub fn container(&self) -> Option<&Container> {
        self.spec.template.spec.containers.first()
    }

    pub fn timeout_seconds(&self) -> u64 {
        self.spec
            .template
            .spec
            .timeout_seconds
            .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
    }

    pub fn scaling(&self) -> ScalingAnnotations {
        ScalingAnnotations::parse(
            &self.spec.template.metadata.annotations,
            "",
            &mut Vec::new(),
        )
    }

    /// The `mecha.dev/max-buffered-*` annotations: (requests, bytes), `None` when not set.
    pub fn buffer_annotations(&self) -> (Option<u32>, Option<u64>) {
        let annotations = &self.spec.template.metadata.annotations;
        (
            annotations
                .get(MAX_BUFFERED_REQUESTS)
                .and_then(|v| v.trim().parse().ok()),
            annotations
                .get(MAX_BUFFERED_BYTES)
                .and_then(|v| v.trim().parse().ok()),
        )
    }

    /// Whether the template joins the mesh ([`MESH`]).
    pub fn meshed(&self) -> bool {
        meshed(&self.spec.template.metadata.annotations)
    }

    /// Checks everything that can be checked on the Service alone. Traffic targets that name
    /// revisions are checked against the existing revisions when the Service is applied.
    pub fn validate(&self, mode: Mode) -> Vec<FieldError> {
        let mut errors = Vec::new();
        // Revision names are `{name}-00001`: keep them within 63 characters.
        self.metadata.validate(63 - 6, &mut errors);
        let template = &self.spec.template;
        ScalingAnnotations::parse(
            &template.metadata.annotations,
            "spec.template.metadata.annotations",
            &mut errors,
        );
        validate_mecha_annotations(&template.metadata.annotations, &mut errors);
        if meshed(&template.metadata.annotations) {
            validate_meshed_env(template, &mut errors);
        }
        template
            .spec
            .validate("spec.template.spec", mode, &mut errors);
        validate_traffic(&self.spec.traffic, &mut errors);
        errors
    }
}

// === impl RevisionSpec ===

impl RevisionSpec {
    fn validate(&self, path: &str, mode: Mode, errors: &mut Vec<FieldError>) {
        match self.containers.len() {
            1 => self.containers[0].validate(&format!("{path}.containers[0]"), mode, errors),
            0 => errors.push(FieldError::new(
                format!("{path}.containers"),
                "exactly one container is required",
            )),
            n => errors.push(FieldError::new(
                format!("{path}.containers"),
                format!("{n} containers given: Mecha runs exactly one container per revision"),
            )),
        }
        if let Some(cc) = self.container_concurrency
            && cc > MAX_CONTAINER_CONCURRENCY
        {
            errors.push(FieldError::new(
                format!("{path}.containerConcurrency"),
                format!("{cc} is out of range: must be between 0 and {MAX_CONTAINER_CONCURRENCY}"),
            ));
        }
        if let Some(timeout) = self.timeout_seconds
            && !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout)
        {
            errors.push(FieldError::new(
                format!("{path}.timeoutSeconds"),
                format!("{timeout} is out of range: must be between 1 and {MAX_TIMEOUT_SECONDS}"),
            ));
        }
    }
}

// === impl Container ===

impl Container {
    pub(crate) fn validate(&self, path: &str, mode: Mode, errors: &mut Vec<FieldError>) {
        match mode {
            Mode::Local => {
                if self.command.first().is_none_or(|c| c.trim().is_empty()) {
                    errors.push(FieldError::new(
                        format!("{path}.command"),
                        "required in local mode: Mecha runs the command as a process and does not pull the image",
                    ));
                }
            }
            Mode::Kubernetes => {
                if self.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
                    errors.push(FieldError::new(format!("{path}.image"), "required"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, env) in self.env.iter().enumerate() {
            let at = format!("{path}.env[{i}].name");
            if !valid_env_name(&env.name) {
                errors.push(FieldError::new(
                    at,
                    format!("{:?} is not a valid environment variable name", env.name),
                ));
            } else if RESERVED_ENV.contains(&env.name.as_str()) {
                errors.push(FieldError::new(
                    at,
                    format!("{} is set by Mecha and may not be set here", env.name),
                ));
            } else if !seen.insert(env.name.as_str()) {
                errors.push(FieldError::new(at, format!("{} is set twice", env.name)));
            }
        }
        if self.ports.len() > 1 {
            errors.push(FieldError::new(
                format!("{path}.ports"),
                "at most one port may be given",
            ));
        }
        for (i, port) in self.ports.iter().enumerate() {
            if !(1..=65535).contains(&port.container_port) {
                errors.push(FieldError::new(
                    format!("{path}.ports[{i}].containerPort"),
                    format!("{} is not a port number (1-65535)", port.container_port),
                ));
            }
            if let Some(name) = &port.name
                && name != "http1"
                && name != "h2c"
            {
                errors.push(FieldError::new(
                    format!("{path}.ports[{i}].name"),
                    format!("{name:?} is not supported: use \"http1\" or \"h2c\""),
                ));
            }
            if let Some(protocol) = &port.protocol
                && protocol != "TCP"
            {
                errors.push(FieldError::new(
                    format!("{path}.ports[{i}].protocol"),
                    format!("{protocol:?} is not supported: only \"TCP\""),
                ));
            }
        }
        if let Some(probe) = &self.readiness_probe {
            probe.validate(&format!("{path}.readinessProbe"), self, errors);
        }
    }

    /// The protocol the container serves, from its port name.
    pub fn protocol(&self) -> PortProtocol {
        match self.ports.first().and_then(|p| p.name.as_deref()) {
            Some("h2c") => PortProtocol::H2c,
            _ => PortProtocol::Http1,
        }
    }
}

// === impl Probe ===

impl Probe {
    fn validate(&self, path: &str, container: &Container, errors: &mut Vec<FieldError>) {
        match (&self.http_get, &self.tcp_socket) {
            (Some(_), Some(_)) => errors.push(FieldError::new(
                path,
                "give one of httpGet or tcpSocket, not both",
            )),
            (None, None) => errors.push(FieldError::new(
                path,
                "one of httpGet or tcpSocket is required (exec probes are not supported)",
            )),
            _ => {}
        }
        let port = self
            .http_get
            .as_ref()
            .and_then(|h| h.port.as_ref())
            .map(|p| (p, "httpGet.port"))
            .or_else(|| {
                self.tcp_socket
                    .as_ref()
                    .and_then(|t| t.port.as_ref())
                    .map(|p| (p, "tcpSocket.port"))
            });
        if let Some((port, field)) = port {
            // Knative probes the serving port only; a probe on any other port is an error.
            let declared = container.ports.first();
            let matches = match port {
                PortRef::Number(n) => declared.is_none_or(|d| d.container_port == *n),
                PortRef::Name(name) => declared.and_then(|d| d.name.as_ref()) == Some(name),
            };
            if !matches {
                errors.push(FieldError::new(
                    format!("{path}.{field}"),
                    "may only name the container's own port",
                ));
            }
        }
        if let Some(http) = &self.http_get {
            if let Some(scheme) = &http.scheme
                && !scheme.eq_ignore_ascii_case("http")
            {
                errors.push(FieldError::new(
                    format!("{path}.httpGet.scheme"),
                    format!("{scheme:?} is not supported: only HTTP"),
                ));
            }
            if let Some(probe_path) = &http.path
                && !probe_path.starts_with('/')
            {
                errors.push(FieldError::new(
                    format!("{path}.httpGet.path"),
                    "must start with '/'",
                ));
            }
        }
        for (field, value) in [
            ("timeoutSeconds", self.timeout_seconds),
            ("successThreshold", self.success_threshold),
            ("failureThreshold", self.failure_threshold),
        ] {
            if value == Some(0) {
                errors.push(FieldError::new(
                    format!("{path}.{field}"),
                    "must be at least 1",
                ));
            }
        }
    }
}

/// A meshed container's proxy variables are the mesh's: its own `HTTP_PROXY` would be
/// silently replaced, and `*` in its `NO_PROXY` would take it out of the mesh.
fn validate_meshed_env(template: &RevisionTemplate, errors: &mut Vec<FieldError>) {
    for (c, container) in template.spec.containers.iter().enumerate() {
        for (i, env) in container.env.iter().enumerate() {
            let at = format!("spec.template.spec.containers[{c}].env[{i}]");
            if env.name == "HTTP_PROXY" || env.name == "http_proxy" {
                errors.push(FieldError::new(
                    format!("{at}.name"),
                    format!(
                        "{} is set by the mesh ({MESH}: \"true\"); remove it",
                        env.name
                    ),
                ));
            }
            if (env.name == "NO_PROXY" || env.name == "no_proxy")
                && env.value.split(',').any(|h| h.trim() == "*")
            {
                errors.push(FieldError::new(
                    format!("{at}.value"),
                    format!("\"*\" would take every call out of the mesh ({MESH}: \"true\")"),
                ));
            }
        }
    }
}

/// Whether template `annotations` join the mesh ([`MESH`] is `"true"`).
pub fn meshed(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(MESH).is_some_and(|v| v.trim() == "true")
}

fn validate_mecha_annotations(
    annotations: &BTreeMap<String, String>,
    errors: &mut Vec<FieldError>,
) {
    for (key, value) in annotations {
        if !key.starts_with(MECHA_PREFIX) {
            continue;
        }
        let at = format!("spec.template.metadata.annotations[\"{key}\"]");
        let valid = match key.as_str() {
            MAX_BUFFERED_REQUESTS => value.trim().parse::<u32>().is_ok_and(|n| n > 0),
            MAX_BUFFERED_BYTES => value.trim().parse::<u64>().is_ok(),
            MESH => {
                if !matches!(value.trim(), "true" | "false") {
                    errors.push(FieldError::new(
                        at,
                        format!("{value:?} is not \"true\" or \"false\""),
                    ));
                }
                continue;
            }
            _ => {
                errors.push(FieldError::new(
                    at,
                    format!("unknown Mecha annotation; supported: {MAX_BUFFERED_REQUESTS}, {MAX_BUFFERED_BYTES}, {MESH}"),
                ));
                continue;
            }
        };
        if !valid {
            errors.push(FieldError::new(
                at,
                format!("{value:?} is not a whole number (requests: at least 1)"),
            ));
        }
    }
}

fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-' || b == b'.')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn validate_traffic(traffic: &[TrafficTarget], errors: &mut Vec<FieldError>) {
    if traffic.is_empty() {
        return;
    }
    let mut total = 0;
    let mut tags = BTreeSet::new();
    for (i, target) in traffic.iter().enumerate() {
        let at = |field: &str| format!("spec.traffic[{i}].{field}");
        match (&target.revision_name, target.latest_revision) {
            (Some(_), Some(true)) => errors.push(FieldError::new(
                at("latestRevision"),
                "may not be true when revisionName is set",
            )),
            (None, Some(true)) => {}
            (None, _) => errors.push(FieldError::new(
                at("revisionName"),
                "required unless latestRevision is true",
            )),
            (Some(_), _) => {}
        }
        total += target.percent.unwrap_or(0);
        if target.percent.is_some_and(|p| p > 100) {
            errors.push(FieldError::new(at("percent"), "must be between 0 and 100"));
        }
        if let Some(tag) = &target.tag {
            if let Err(why) = dns_label(tag, true) {
                errors.push(FieldError::new(at("tag"), why));
            } else if !tags.insert(tag.as_str()) {
                errors.push(FieldError::new(
                    at("tag"),
                    format!("tag {tag:?} is used twice"),
                ));
            }
        }
    }
    if total != 100 {
        errors.push(FieldError::new(
            "spec.traffic",
            format!("percents add up to {total}, must add up to 100"),
        ));
    }
}
