//! `eventing.knative.dev/v1` `Broker` and `Trigger`: Knative's fields, defaults and validation.
//!
//! A Trigger's delivery settings are resolved here once ([`DeliverySpec::resolve`]) into
//! durations and numbers, and its `cesql` filters are compiled here, so a bad duration or a
//! bad expression is a load error that names the field (and the position in the expression).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::meta::{ObjectMeta, dns_label};

pub const API_VERSION: &str = "eventing.knative.dev/v1";
pub const BROKER_KIND: &str = "Broker";
pub const TRIGGER_KIND: &str = "Trigger";

/// Knative's default broker delivery: 10 retries, exponential, 0.2 s.
pub const DEFAULT_RETRY: u32 = 10;
pub const DEFAULT_BACKOFF_DELAY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Broker {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BrokerSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BrokerSpec {
    /// The broker class's configuration (Knative's `spec.config`); Mecha has one broker
    /// implementation, so it is accepted and not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::any_object")
    )]
    pub config: Option<serde_json::Value>,
    /// The default delivery of this broker's triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: TriggerSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TriggerSpec {
    pub broker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<AttributesFilter>,
    /// Subscriptions API filters; when present they replace `filter`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<SubscriptionsApiFilter>,
    pub subscriber: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AttributesFilter {
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// One entry of `filters`: exactly one dialect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SubscriptionsApiFilter {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exact: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prefix: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub suffix: BTreeMap<String, String>,
    // A structural schema cannot recurse: nested filters are checked when a trigger is
    // admitted, as local mode does, not by the API server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::any_object_list")
    )]
    pub all: Vec<SubscriptionsApiFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::any_object_list")
    )]
    pub any: Vec<SubscriptionsApiFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::any_object")
    )]
    pub not: Option<Box<SubscriptionsApiFilter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cesql: Option<String>,
}

/// Where events go: a reference to an addressable resource, a URI, or both (the URI then is
/// resolved against the resource's address).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Destination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#ref: Option<KReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct KReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Knative's `DeliverySpec`, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeliverySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_sink: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_max: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// How the wait before each retry grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackoffPolicy {
    /// d·(k−1): the first retry at once, then d, 2d, …
    Linear,
    /// d·2^(k−1): d, 2d, 4d, …
    Exponential,
}

/// The encoding events are delivered in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Binary,
    Json,
}

/// A `DeliverySpec` resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub retry: u32,
    pub backoff_policy: Option<BackoffPolicy>,
    pub backoff_delay: Option<Duration>,
    /// Per attempt; `None` means the dispatcher's default.
    pub timeout: Option<Duration>,
    pub retry_after_max: Option<Duration>,
    pub dead_letter_sink: Option<Destination>,
    pub format: Format,
}

/// `(namespace, name)`.
pub type Key = (String, String);

/// Every Broker and Trigger: what the broker runtime runs, published to it as an immutable
/// snapshot (`watch::Receiver<Arc<EventingState>>`). `mecha up` builds it from its store; the
/// control plane streams it to standalone brokers (`GET /api/v1/eventing/watch`), one JSON line
/// per change in its wire form `{"brokers": [Broker…], "triggers": [Trigger…]}` (the resources
/// as users write them; the keys are taken from their metadata).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "EventingWire", from = "EventingWire")]
pub struct EventingState {
    pub brokers: BTreeMap<Key, Broker>,
    pub triggers: BTreeMap<Key, Trigger>,
}

/// [`EventingState`] on the wire: lists, since JSON object keys cannot be pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventingWire {
    #[serde(default)]
    brokers: Vec<Broker>,
    #[serde(default)]
    triggers: Vec<Trigger>,
}

/// What applying one resource did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

// === impl EventingState ===

impl EventingState {
    pub fn apply_broker(&mut self, broker: Broker) -> Change {
        let key = (broker.namespace().to_string(), broker.metadata.name.clone());
        upsert(&mut self.brokers, key, broker)
    }

    pub fn apply_trigger(&mut self, trigger: Trigger) -> Change {
        let key = (
            trigger.namespace().to_string(),
            trigger.metadata.name.clone(),
        );
        upsert(&mut self.triggers, key, trigger)
    }

    pub fn broker(&self, namespace: &str, name: &str) -> Option<&Broker> {
        self.brokers.get(&(namespace.to_string(), name.to_string()))
    }

    /// The triggers of one broker.
    pub fn triggers_of<'a>(
        &'a self,
        namespace: &'a str,
        broker: &'a str,
    ) -> impl Iterator<Item = &'a Trigger> + 'a {
        self.triggers
            .values()
            .filter(move |t| t.namespace() == namespace && t.spec.broker == broker)
    }

    /// The resources that pass validation, and one error per resource that does not (`Broker
    /// ns/name: field: why`): a state that arrived over the wire is checked again before it
    /// is run, as a loaded one was.
    pub fn validated(self) -> (Self, Vec<String>) {
        let mut errors = Vec::new();
        let mut keep = |kind: &str, key: &Key, problems: Vec<FieldError>| {
            for problem in &problems {
                errors.push(format!("{kind} {}/{}: {problem}", key.0, key.1));
            }
            problems.is_empty()
        };
        let brokers = self
            .brokers
            .into_iter()
            .filter(|(key, broker)| keep(BROKER_KIND, key, broker.validate()))
            .collect();
        let triggers = self
            .triggers
            .into_iter()
            .filter(|(key, trigger)| keep(TRIGGER_KIND, key, trigger.validate()))
            .collect();
        (Self { brokers, triggers }, errors)
    }
}

impl From<EventingWire> for EventingState {
    fn from(wire: EventingWire) -> Self {
        let mut state = Self::default();
        for broker in wire.brokers {
            state.apply_broker(broker);
        }
        for trigger in wire.triggers {
            state.apply_trigger(trigger);
        }
        state
    }
}

impl From<EventingState> for EventingWire {
    fn from(state: EventingState) -> Self {
        Self {
            brokers: state.brokers.into_values().collect(),
            triggers: state.triggers.into_values().collect(),
        }
    }
}

fn upsert<T: PartialEq>(map: &mut BTreeMap<Key, T>, key: Key, value: T) -> Change {
    match map.get(&key) {
        None => {
            map.insert(key, value);
            Change::Created
        }
        Some(old) if *old == value => Change::Unchanged,
        Some(_) => {
            map.insert(key, value);
            Change::Configured
        }
    }
}

// === impl Broker ===

impl Broker {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        if let Some(delivery) = &self.spec.delivery
            && let Err(mut e) = delivery.resolve("spec.delivery")
        {
            errors.append(&mut e);
        }
        errors
    }

    /// The delivery its triggers inherit: `spec.delivery`, else Knative's default.
    pub fn default_delivery(&self) -> Delivery {
        self.spec
            .delivery
            .as_ref()
            .and_then(|d| d.resolve("spec.delivery").ok())
            .unwrap_or_else(Delivery::broker_default)
    }
}

// === impl Trigger ===

impl Trigger {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        if let Err(why) = dns_label(&self.spec.broker, false) {
            errors.push(FieldError::new("spec.broker", why));
        }
        if let Some(filter) = &self.spec.filter {
            for key in filter.attributes.keys() {
                if !is_attribute_name(key) {
                    errors.push(FieldError::new(
                        format!("spec.filter.attributes.{key}"),
                        "attribute names are lower-case letters and digits, starting with a letter",
                    ));
                }
            }
        }
        for (i, filter) in self.spec.filters.iter().enumerate() {
            filter.validate(&format!("spec.filters[{i}]"), &mut errors);
        }
        self.spec
            .subscriber
            .validate("spec.subscriber", &mut errors);
        if let Some(delivery) = &self.spec.delivery
            && let Err(mut e) = delivery.resolve("spec.delivery")
        {
            errors.append(&mut e);
        }
        errors
    }

    /// The trigger's delivery: its own `spec.delivery` when it sets any option (replacing the
    /// broker's completely, dead-letter sink included), else the broker's.
    pub fn delivery(&self, broker: Option<&Broker>) -> Delivery {
        match &self.spec.delivery {
            Some(own) if *own != DeliverySpec::default() => own
                .resolve("spec.delivery")
                .unwrap_or_else(|_| Delivery::broker_default()),
            _ => broker.map_or_else(Delivery::broker_default, Broker::default_delivery),
        }
    }
}

// === impl SubscriptionsApiFilter ===

impl SubscriptionsApiFilter {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let dialects = [
            !self.exact.is_empty(),
            !self.prefix.is_empty(),
            !self.suffix.is_empty(),
            !self.all.is_empty(),
            !self.any.is_empty(),
            self.not.is_some(),
            self.cesql.is_some(),
        ];
        let count = dialects.iter().filter(|d| **d).count();
        if count != 1 {
            errors.push(FieldError::new(
                path,
                format!(
                    "each filter holds exactly one dialect (exact, prefix, suffix, all, any, not or cesql); this one has {count}"
                ),
            ));
        }
        for (dialect, map) in [
            ("exact", &self.exact),
            ("prefix", &self.prefix),
            ("suffix", &self.suffix),
        ] {
            for (key, value) in map {
                if !is_attribute_name(key) {
                    errors.push(FieldError::new(
                        format!("{path}.{dialect}.{key}"),
                        "attribute names are lower-case letters and digits, starting with a letter",
                    ));
                }
                if value.is_empty() && dialect != "exact" {
                    errors.push(FieldError::new(
                        format!("{path}.{dialect}.{key}"),
                        "must not be empty",
                    ));
                }
            }
        }
        for (i, inner) in self.all.iter().enumerate() {
            inner.validate(&format!("{path}.all[{i}]"), errors);
        }
        for (i, inner) in self.any.iter().enumerate() {
            inner.validate(&format!("{path}.any[{i}]"), errors);
        }
        if let Some(inner) = &self.not {
            inner.validate(&format!("{path}.not"), errors);
        }
        if let Some(expression) = &self.cesql
            && let Err(error) = cesql::Expression::compile(expression)
        {
            errors.push(FieldError::new(
                format!("{path}.cesql"),
                format!("invalid CESQL expression at {error}"),
            ));
        }
    }
}

// === impl Destination ===

impl Destination {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        match (&self.r#ref, &self.uri) {
            (None, None) => errors.push(FieldError::new(path, "needs ref or uri")),
            (Some(reference), uri) => {
                let supported = (reference.api_version == crate::serving::API_VERSION
                    && reference.kind == crate::serving::KIND)
                    || (reference.api_version == API_VERSION && reference.kind == BROKER_KIND);
                if !supported {
                    errors.push(FieldError::new(
                        format!("{path}.ref"),
                        format!(
                            "Mecha resolves references to a Service ({}) or a Broker ({API_VERSION}), not {} ({})",
                            crate::serving::API_VERSION,
                            reference.kind,
                            reference.api_version
                        ),
                    ));
                }
                if reference.name.is_empty() {
                    errors.push(FieldError::new(format!("{path}.ref.name"), "required"));
                }
                if let Some(uri) = uri
                    && !uri.starts_with('/')
                    && !uri.starts_with("http://")
                {
                    errors.push(FieldError::new(
                        format!("{path}.uri"),
                        "with a ref, the uri is a path (starting with /) added to the ref's address",
                    ));
                }
            }
            (None, Some(uri)) => {
                if let Err(why) = http_uri(uri) {
                    errors.push(FieldError::new(format!("{path}.uri"), why));
                }
            }
        }
    }
}

// === impl DeliverySpec ===

impl DeliverySpec {
    /// Resolves durations and enums; errors name fields under `path`.
    pub fn resolve(&self, path: &str) -> Result<Delivery, Vec<FieldError>> {
        let mut errors = Vec::new();
        let retry = match self.retry {
            None => 0,
            Some(r) if (0..=i64::from(u32::MAX)).contains(&r) => r as u32,
            Some(r) => {
                errors.push(FieldError::new(
                    format!("{path}.retry"),
                    format!("must be 0 or more, not {r}"),
                ));
                0
            }
        };
        let backoff_policy = match self.backoff_policy.as_deref() {
            None => None,
            Some("linear") => Some(BackoffPolicy::Linear),
            Some("exponential") => Some(BackoffPolicy::Exponential),
            Some(other) => {
                errors.push(FieldError::new(
                    format!("{path}.backoffPolicy"),
                    format!("must be linear or exponential, not {other:?}"),
                ));
                None
            }
        };
        let mut duration = |field: &str, value: &Option<String>| -> Option<Duration> {
            let value = value.as_deref()?;
            match parse_iso8601_duration(value) {
                Ok(d) => Some(d),
                Err(why) => {
                    errors.push(FieldError::new(format!("{path}.{field}"), why));
                    None
                }
            }
        };
        let backoff_delay = duration("backoffDelay", &self.backoff_delay);
        let timeout = duration("timeout", &self.timeout);
        let retry_after_max = duration("retryAfterMax", &self.retry_after_max);
        if timeout == Some(Duration::ZERO) {
            errors.push(FieldError::new(
                format!("{path}.timeout"),
                "must be longer than zero",
            ));
        }
        let format = match self.format.as_deref() {
            None | Some("binary") => Format::Binary,
            Some("json") => Format::Json,
            Some(other) => {
                errors.push(FieldError::new(
                    format!("{path}.format"),
                    format!("must be json or binary, not {other:?}"),
                ));
                Format::Binary
            }
        };
        if let Some(sink) = &self.dead_letter_sink {
            sink.validate(&format!("{path}.deadLetterSink"), &mut errors);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Delivery {
            retry,
            backoff_policy,
            backoff_delay,
            timeout,
            retry_after_max,
            dead_letter_sink: self.dead_letter_sink.clone(),
            format,
        })
    }
}

// === impl Delivery ===

impl Delivery {
    /// Knative's broker default: retry 10, exponential, PT0.2S, no dead-letter sink.
    pub fn broker_default() -> Self {
        Self {
            retry: DEFAULT_RETRY,
            backoff_policy: Some(BackoffPolicy::Exponential),
            backoff_delay: Some(DEFAULT_BACKOFF_DELAY),
            timeout: None,
            retry_after_max: None,
            dead_letter_sink: None,
            format: Format::Binary,
        }
    }

    /// The wait before retry `k` (1-based): exponential d·2^(k−1), linear d·(k−1); no
    /// policy or no delay means no wait.
    pub fn backoff(&self, k: u32) -> Duration {
        let (Some(policy), Some(delay)) = (self.backoff_policy, self.backoff_delay) else {
            return Duration::ZERO;
        };
        let k = k.max(1);
        match policy {
            BackoffPolicy::Linear => delay.saturating_mul(k - 1),
            BackoffPolicy::Exponential => {
                delay.saturating_mul(2u32.checked_pow(k - 1).unwrap_or(u32::MAX))
            }
        }
    }
}

fn is_attribute_name(name: &str) -> bool {
    name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// An absolute `http://` URI with a host.
fn http_uri(uri: &str) -> Result<(), String> {
    let Some(rest) = uri.strip_prefix("http://") else {
        return Err(format!(
            "{uri:?} is not an http:// URI (https is not supported for local delivery yet)"
        ));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{uri:?} has no host"));
    }
    Ok(())
}

/// Parses an ISO-8601 duration as Knative reads them: `PT0.2S`, `PT1M30S`, `P1DT2H`, `P2W`.
/// Years and months are refused: they have no fixed length.
pub fn parse_iso8601_duration(text: &str) -> Result<Duration, String> {
    let bad =
        |why: &str| format!("{text:?} is not an ISO-8601 duration like PT0.2S or PT1M30S: {why}");
    let rest = text
        .strip_prefix('P')
        .ok_or_else(|| bad("it must start with P"))?;
    if rest.is_empty() {
        return Err(bad("nothing follows P"));
    }
    let mut seconds = 0f64;
    let mut in_time = false;
    let mut number = String::new();
    let mut any = false;
    for c in rest.chars() {
        match c {
            'T' if !in_time && number.is_empty() => in_time = true,
            '0'..='9' | '.' | ',' => number.push(if c == ',' { '.' } else { c }),
            unit => {
                let value: f64 = number
                    .parse()
                    .map_err(|_| bad(&format!("a number must come before {unit}")))?;
                number.clear();
                any = true;
                seconds += value
                    * match (in_time, unit) {
                        (false, 'W') => 7.0 * 86_400.0,
                        (false, 'D') => 86_400.0,
                        (false, 'Y' | 'M') => {
                            return Err(bad("years and months have no fixed length; use days"));
                        }
                        (true, 'H') => 3_600.0,
                        (true, 'M') => 60.0,
                        (true, 'S') => 1.0,
                        _ => return Err(bad(&format!("unexpected {unit:?}"))),
                    };
            }
        }
    }
    if !number.is_empty() || !any {
        return Err(bad("a number needs a unit"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| bad("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventing_state_goes_over_the_wire_whole_and_is_checked_on_arrival() {
        let yaml = r#"
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: default, namespace: shop}
spec:
  delivery: {retry: 3, backoffPolicy: linear, backoffDelay: PT0.5S}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: orders, namespace: shop}
spec:
  broker: default
  filter: {attributes: {type: order.created}}
  filters:
    - cesql: "source LIKE 'shop/%'"
  subscriber: {uri: "http://127.0.0.1:9/orders"}
"#;
        let (loaded, errors) =
            crate::load_str(std::path::Path::new("e.yaml"), yaml, crate::Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let mut state = EventingState::default();
        for resource in loaded {
            match resource.resource {
                crate::Resource::Broker(b) => assert_eq!(state.apply_broker(b), Change::Created),
                crate::Resource::Trigger(t) => assert_eq!(state.apply_trigger(t), Change::Created),
                other => panic!("unexpected {other:?}"),
            }
        }
        let line = serde_json::to_string(&state).expect("json");
        assert!(line.starts_with(r#"{"brokers":[{"#), "{line}");
        let back: EventingState = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, state, "nothing lost or changed on the way");
        let (checked, problems) = back.validated();
        assert_eq!((checked, problems), (state.clone(), Vec::new()));

        // A trigger the control plane should never have sent is dropped with the reason; the
        // rest runs.
        let mut bad = state.clone();
        let key = ("shop".to_string(), "orders".to_string());
        bad.triggers.get_mut(&key).expect("orders").spec.broker = "Not_A_Name".into();
        let (checked, problems) = bad.validated();
        assert!(checked.triggers.is_empty() && checked.brokers.len() == 1);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("Trigger shop/orders: spec.broker"),
            "{problems:?}"
        );
        assert!(serde_json::from_str::<EventingState>(r#"{"brokers":[],"colour":1}"#).is_err());
        assert_eq!(
            serde_json::from_str::<EventingState>("{}").expect("empty"),
            EventingState::default()
        );
    }

    #[test]
    fn iso8601_durations() {
        assert_eq!(
            parse_iso8601_duration("PT0.2S"),
            Ok(Duration::from_millis(200))
        );
        assert_eq!(
            parse_iso8601_duration("PT1M30S"),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(
            parse_iso8601_duration("P1DT1H"),
            Ok(Duration::from_secs(90_000))
        );
        assert_eq!(
            parse_iso8601_duration("P2W"),
            Ok(Duration::from_secs(1_209_600))
        );
        for bad in ["", "0.2S", "PT", "P1M", "PT1X", "PT1", "P", "PTS"] {
            assert!(parse_iso8601_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_follows_knative() {
        let mut delivery = Delivery::broker_default();
        delivery.backoff_delay = Some(Duration::from_millis(100));
        let waits: Vec<u128> = (1..=4).map(|k| delivery.backoff(k).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800]);
        delivery.backoff_policy = Some(BackoffPolicy::Linear);
        let waits: Vec<u128> = (1..=4).map(|k| delivery.backoff(k).as_millis()).collect();
        assert_eq!(waits, [0, 100, 200, 300]);
        delivery.backoff_policy = None;
        assert_eq!(delivery.backoff(3), Duration::ZERO);
    }
}
