//! Queue sources: `RedisStreamSource` (Knative's `sources.knative.dev/v1alpha1` kind from
//! knative-extensions/eventing-redis) and Mecha's own `NatsSource` and `MqttSource`
//! (`sources.mecha.dev/v1alpha1`; Knative has no NATS or MQTT source kind).
//!
//! Every one acknowledges upstream only after its sink answered 2xx; the fields here are what
//! the importers crate connects with, checked at load by the same parser ([`Endpoint::parse`]).

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::eventing::Destination;
use crate::meta::ObjectMeta;
use crate::sources::{CloudEventOverrides, validate_overrides};

/// Mecha's own source kinds' group version.
pub const MECHA_API_VERSION: &str = "sources.mecha.dev/v1alpha1";
pub const REDIS_KIND: &str = "RedisStreamSource";
pub const NATS_KIND: &str = "NatsSource";
pub const MQTT_KIND: &str = "MqttSource";
/// Knative's RedisStreamSource event type.
pub const REDIS_EVENT_TYPE: &str = "dev.knative.sources.redisstream";
/// Mecha's own event types.
pub const NATS_EVENT_TYPE: &str = "dev.mecha.sources.nats";
pub const MQTT_EVENT_TYPE: &str = "dev.mecha.sources.mqtt";
/// Most consumers one RedisStreamSource runs.
pub const MAX_CONSUMERS: i32 = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisStreamSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: RedisStreamSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RedisStreamSourceSpec {
    /// `host:port`, or `redis://[user:password@]host[:port][/db]`.
    pub address: String,
    /// Knative's TLS and password options (Kubernetes Secrets): refused, by name, until built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::any_object")
    )]
    pub dial_options: Option<serde_json::Value>,
    pub stream: String,
    /// The consumer group; `mecha.{namespace}.{name}` when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Consumers in the group (each reads and acknowledges on its own); 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<i32>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: NatsSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NatsSourceSpec {
    /// `nats://host:port` (or `host:port`).
    pub url: String,
    /// The subject (wildcards allowed) the source reads.
    pub subject: String,
    /// A JetStream stream: when set the source reads through a durable pull consumer and acks
    /// each message after the sink's 2xx (the stream is created for `subject` when missing).
    /// Without it the subscription is core NATS: at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The durable consumer's name; `mecha-{namespace}-{name}` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Seconds the server waits for an acknowledgement before it delivers a message again
    /// (after a crash of the importer); 30 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait_seconds: Option<u32>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: MqttSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MqttSourceSpec {
    /// `mqtt://host:port` (or `tcp://`, or `host:port`; port 1883 when absent).
    pub broker_url: String,
    /// Topic filters, subscribed at QoS 1.
    pub topics: Vec<String>,
    /// The client id of the persistent session; `mecha-{namespace}-{name}` when absent. Two
    /// clients with one id take the session from each other: keep it unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

/// A server address: `scheme://[user[:password]@]host[:port][/path]` or `host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    /// What follows the authority, without the leading `/`.
    pub path: String,
}

// === impl Endpoint ===

impl Endpoint {
    /// Reads `text`, whose scheme must be one of `schemes` (the first is assumed when there
    /// is none); `default_port` when no port is given.
    pub fn parse(text: &str, schemes: &[&str], default_port: u16) -> Result<Self, String> {
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None => (schemes[0].to_string(), text),
        };
        if !schemes.contains(&scheme.as_str()) {
            return Err(format!(
                "{:?}: the scheme must be {}",
                redacted(text),
                schemes.join(" or ")
            ));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || hostport.starts_with('[') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{:?}: {port:?} is not a port", redacted(text)))?;
                (host, port)
            }
            _ => (hostport, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("{:?}: no host", redacted(text)));
        }
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((user, password)) => (
                    Some(user.to_string()).filter(|u| !u.is_empty()),
                    Some(password.to_string()),
                ),
                None => (Some(info.to_string()), None),
            },
        };
        Ok(Self {
            scheme,
            host: host.to_string(),
            port,
            user,
            password,
            path: path.to_string(),
        })
    }

    /// `scheme://host:port`: what logs, statuses and event sources show (no credentials).
    pub fn display(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{}://{host}:{}", self.scheme, self.port)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.display())
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("path", &self.path)
            .finish()
    }
}

/// `text` with any password replaced, for error messages.
fn redacted(text: &str) -> String {
    match (text.split_once("://"), text.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        (None, Some((_, host))) => format!("…@{host}"),
        _ => text.to_string(),
    }
}

// === impl RedisStreamSource ===

impl RedisStreamSource {
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        let endpoint = Endpoint::parse(&self.spec.address, &["redis"], 6379)?;
        if !endpoint.path.is_empty() && endpoint.path.parse::<u32>().is_err() {
            return Err(format!(
                "{:?}: the path is a database number",
                redacted(&self.spec.address)
            ));
        }
        Ok(endpoint)
    }

    /// The consumer group: `spec.group`, or `mecha.{namespace}.{name}`.
    pub fn group(&self) -> String {
        if self.spec.group.is_empty() {
            format!("mecha.{}.{}", self.metadata.namespace(), self.metadata.name)
        } else {
            self.spec.group.clone()
        }
    }

    pub fn consumers(&self) -> i32 {
        self.spec.consumers.unwrap_or(1)
    }

    /// Knative's source attribute, `{address}/{stream}` (the address without credentials).
    pub fn event_source(&self) -> String {
        let address = self
            .endpoint()
            .map(|e| format!("{}:{}", e.host, e.port))
            .unwrap_or_else(|_| self.spec.address.clone());
        format!("{address}/{}", self.spec.stream)
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        if let Err(why) = self.endpoint() {
            errors.push(FieldError::new("spec.address", why));
        }
        if spec.dial_options.is_some() {
            errors.push(FieldError::new(
                "spec.dialOptions",
                "TLS and Secret passwords are not supported yet; put a password in the address (redis://:PASSWORD@host:port)",
            ));
        }
        if spec.stream.is_empty() {
            errors.push(FieldError::new("spec.stream", "required"));
        }
        if let Some(consumers) = spec.consumers
            && !(1..=MAX_CONSUMERS).contains(&consumers)
        {
            errors.push(FieldError::new(
                "spec.consumers",
                format!("{consumers} is not between 1 and {MAX_CONSUMERS}"),
            ));
        }
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

// === impl NatsSource ===

impl NatsSource {
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        Endpoint::parse(&self.spec.url, &["nats"], 4222)
    }

    /// The durable consumer: `spec.consumer`, or `mecha-{namespace}-{name}`.
    pub fn consumer(&self) -> String {
        self.spec.consumer.clone().unwrap_or_else(|| {
            format!("mecha-{}-{}", self.metadata.namespace(), self.metadata.name)
        })
    }

    /// `/apis/v1alpha1/namespaces/{ns}/natssources/{name}`, in PingSource's style.
    pub fn event_source(&self) -> String {
        format!(
            "/apis/v1alpha1/namespaces/{}/natssources/{}",
            self.metadata.namespace(),
            self.metadata.name
        )
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        if let Err(why) = self.endpoint() {
            errors.push(FieldError::new("spec.url", why));
        }
        let subject_ok = !spec.subject.is_empty()
            && spec.subject.split('.').all(|token| {
                !token.is_empty() && !token.contains(|c: char| c.is_whitespace() || c.is_control())
            });
        if !subject_ok {
            errors.push(FieldError::new(
                "spec.subject",
                format!(
                    "{:?} is not a NATS subject (dot-separated tokens, * and > as wildcards)",
                    spec.subject
                ),
            ));
        }
        // JetStream's names: no whitespace, `.`, `*`, `>`, path separators.
        let name_ok = |name: &str| {
            !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if let Some(stream) = &spec.stream
            && !name_ok(stream)
        {
            errors.push(FieldError::new(
                "spec.stream",
                format!("{stream:?} is not a JetStream name (letters, digits, - and _)"),
            ));
        }
        if let Some(consumer) = &spec.consumer {
            if spec.stream.is_none() {
                errors.push(FieldError::new(
                    "spec.consumer",
                    "a durable consumer needs spec.stream (JetStream)",
                ));
            } else if !name_ok(consumer) {
                errors.push(FieldError::new(
                    "spec.consumer",
                    format!("{consumer:?} is not a JetStream name (letters, digits, - and _)"),
                ));
            }
        }
        if let Some(seconds) = spec.ack_wait_seconds
            && !(3..=3600).contains(&seconds)
        {
            errors.push(FieldError::new(
                "spec.ackWaitSeconds",
                format!("{seconds} is not between 3 and 3600"),
            ));
        }
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

// === impl MqttSource ===

impl MqttSource {
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        Endpoint::parse(&self.spec.broker_url, &["mqtt", "tcp"], 1883)
    }

    /// The session's client id: `spec.clientId`, or `mecha-{namespace}-{name}`.
    pub fn client_id(&self) -> String {
        self.spec.client_id.clone().unwrap_or_else(|| {
            format!("mecha-{}-{}", self.metadata.namespace(), self.metadata.name)
        })
    }

    /// `/apis/v1alpha1/namespaces/{ns}/mqttsources/{name}`, in PingSource's style.
    pub fn event_source(&self) -> String {
        format!(
            "/apis/v1alpha1/namespaces/{}/mqttsources/{}",
            self.metadata.namespace(),
            self.metadata.name
        )
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        if let Err(why) = self.endpoint() {
            errors.push(FieldError::new("spec.brokerUrl", why));
        }
        if spec.topics.is_empty() {
            errors.push(FieldError::new(
                "spec.topics",
                "list at least one topic filter",
            ));
        }
        for (i, topic) in spec.topics.iter().enumerate() {
            if let Err(why) = topic_filter(topic) {
                errors.push(FieldError::new(format!("spec.topics[{i}]"), why));
            }
        }
        if let Some(id) = &spec.client_id
            && (id.is_empty() || id.len() > 65535)
        {
            errors.push(FieldError::new("spec.clientId", "must not be empty"));
        }
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

/// MQTT 3.1.1's rules for a topic filter: `#` only as the whole last level, `+` only as a
/// whole level, no NUL.
fn topic_filter(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.contains('\0') {
        return Err("a topic filter is not empty and has no NUL".into());
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("{topic:?}: # is only allowed as the last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{topic:?}: + stands for a whole level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("127.0.0.1:6380", &["redis"], 6379).unwrap();
        assert_eq!(e.display(), "redis://127.0.0.1:6380");
        let e = Endpoint::parse("redis://:s3cret@cache/2", &["redis"], 6379).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("cache", 6379, "2")
        );
        assert_eq!(e.password.as_deref(), Some("s3cret"));
        assert!(!format!("{e:?}").contains("s3cret"));
        let error = Endpoint::parse("rediss://:s3cret@cache", &["redis"], 6379).unwrap_err();
        assert!(
            error.contains("scheme") && !error.contains("s3cret"),
            "{error}"
        );
        assert!(Endpoint::parse("mqtt://broker:99999", &["mqtt"], 1883).is_err());
        assert!(Endpoint::parse("nats://:4222", &["nats"], 4222).is_err());
        let e = Endpoint::parse("tcp://[::1]:1884", &["mqtt", "tcp"], 1883).unwrap();
        assert_eq!(e.display(), "tcp://[::1]:1884");
    }

    #[test]
    fn topic_filters() {
        assert!(topic_filter("sensors/+/temp").is_ok());
        assert!(topic_filter("sensors/#").is_ok());
        assert!(topic_filter("#").is_ok());
        assert!(topic_filter("sensors/#/x").is_err());
        assert!(topic_filter("sensors/a+").is_err());
        assert!(topic_filter("").is_err());
    }
}
