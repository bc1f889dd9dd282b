//! Event sources: `sources.knative.dev/v1` `PingSource` and the `sources.knative.dev/v1alpha1`
//! webhook sources, with Knative's fields, defaults and validation.
//!
//! Everything a source needs to run is checked here, at load: a schedule croner cannot read, a
//! time zone the system does not know, JSON data that is not an object, a sink that names a
//! kind Mecha cannot address. The importers crate parses the same fields again with the same
//! functions ([`parse_schedule`], [`parse_timezone`], [`PingSourceSpec::payload`]), so what
//! loads is exactly what runs.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::eventing::Destination;
use crate::meta::ObjectMeta;

pub const API_VERSION: &str = "sources.knative.dev/v1";
pub const PING_KIND: &str = "PingSource";
/// Knative's default schedule: every minute.
pub const DEFAULT_SCHEDULE: &str = "* * * * *";

/// Attributes a `ceOverrides` extension may not replace: the ones that identify an event.
const RESERVED: &[&str] = &[
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// `spec.ceOverrides`: extensions set on every event the source sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudEventOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PingSource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PingSourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PingSourceSpec {
    /// Cron, five fields or six with seconds first; `* * * * *` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// An IANA time zone name; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    pub sink: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_overrides: Option<CloudEventOverrides>,
}

/// Any source Mecha runs.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceResource {
    Ping(PingSource),
}

// === impl SourceResource ===

impl SourceResource {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceResource::Ping(_) => PING_KIND,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            SourceResource::Ping(s) => &s.metadata,
        }
    }

    pub fn namespace(&self) -> &str {
        self.metadata().namespace()
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    pub fn sink(&self) -> &Destination {
        match self {
            SourceResource::Ping(s) => &s.spec.sink,
        }
    }

    /// `spec.ceOverrides.extensions`.
    pub fn extensions(&self) -> BTreeMap<String, String> {
        let overrides = match self {
            SourceResource::Ping(s) => s.spec.ce_overrides.as_ref(),
        };
        overrides.map(|o| o.extensions.clone()).unwrap_or_default()
    }

    /// The CloudEvents `source` of the events it sends.
    pub fn event_source(&self) -> String {
        match self {
            SourceResource::Ping(s) => s.event_source(),
        }
    }

    pub fn validate(&self) -> Vec<FieldError> {
        match self {
            SourceResource::Ping(s) => s.validate(),
        }
    }
}

// === impl PingSource ===

impl PingSource {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    /// Knative's source attribute: `/apis/v1/namespaces/{ns}/pingsources/{name}`.
    pub fn event_source(&self) -> String {
        format!(
            "/apis/v1/namespaces/{}/pingsources/{}",
            self.namespace(),
            self.metadata.name
        )
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.metadata.validate(63, &mut errors);
        let spec = &self.spec;
        if let Err(why) = parse_schedule(spec.schedule()) {
            errors.push(FieldError::new("spec.schedule", why));
        }
        if let Some(zone) = &spec.timezone
            && let Err(why) = parse_timezone(zone)
        {
            errors.push(FieldError::new("spec.timezone", why));
        }
        if let Err(error) = spec.payload() {
            errors.push(error);
        }
        spec.sink.validate("spec.sink", &mut errors);
        validate_overrides(spec.ce_overrides.as_ref(), &mut errors);
        errors
    }
}

// === impl PingSourceSpec ===

impl PingSourceSpec {
    pub fn schedule(&self) -> &str {
        self.schedule.as_deref().unwrap_or(DEFAULT_SCHEDULE)
    }

    /// The bytes each event carries: `data` as written, or `dataBase64` decoded. Both at once,
    /// bad base64, and JSON data that is not an object under a JSON content type are errors.
    pub fn payload(&self) -> Result<Option<Vec<u8>>, FieldError> {
        match (&self.data, &self.data_base64) {
            (Some(_), Some(_)) => Err(FieldError::new(
                "spec.data",
                "data and dataBase64 cannot both be set",
            )),
            (None, None) => Ok(None),
            (None, Some(encoded)) => BASE64.decode(encoded.trim()).map(Some).map_err(|error| {
                FieldError::new("spec.dataBase64", format!("not valid base64: {error}"))
            }),
            (Some(data), None) => {
                if self.content_type.as_deref().is_some_and(is_json) {
                    match serde_json::from_str::<serde_json::Value>(data) {
                        Ok(serde_json::Value::Object(_)) => {}
                        Ok(_) => {
                            return Err(FieldError::new(
                                "spec.data",
                                "with a JSON contentType, data must be a JSON object",
                            ));
                        }
                        Err(error) => {
                            return Err(FieldError::new(
                                "spec.data",
                                format!("with a JSON contentType, data must be JSON: {error}"),
                            ));
                        }
                    }
                }
                Ok(Some(data.clone().into_bytes()))
            }
        }
    }
}

/// Reads a cron schedule as Knative does: five fields, or six with seconds first; the
/// `@yearly`…`@hourly` shorthands; `@every` refused (Knative refuses it too). Day of month and
/// day of week combine with OR, as in Vixie cron.
pub fn parse_schedule(schedule: &str) -> Result<croner::Cron, String> {
    let trimmed = schedule.trim();
    if trimmed.to_ascii_lowercase().starts_with("@every") {
        return Err(format!(
            "{schedule:?}: @every is not supported; write a cron expression such as \"*/5 * * * *\""
        ));
    }
    let fields = trimmed.split_whitespace().count();
    if !trimmed.starts_with('@') && !(5..=6).contains(&fields) {
        return Err(format!(
            "{schedule:?} has {fields} fields; a schedule has five (minute hour day-of-month month day-of-week) or six with seconds first"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|error| format!("{schedule:?} is not a valid cron schedule: {error}"))
}

/// An IANA time zone from the system's database.
pub fn parse_timezone(name: &str) -> Result<jiff::tz::TimeZone, String> {
    jiff::tz::TimeZone::get(name)
        .map_err(|error| format!("{name:?} is not a known IANA time zone: {error}"))
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

fn validate_overrides(overrides: Option<&CloudEventOverrides>, errors: &mut Vec<FieldError>) {
    let Some(overrides) = overrides else {
        return;
    };
    for key in overrides.extensions.keys() {
        let path = format!("spec.ceOverrides.extensions.{key}");
        let valid = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            errors.push(FieldError::new(
                path,
                "extension names are lower-case letters and digits",
            ));
        } else if RESERVED.contains(&key.as_str()) {
            errors.push(FieldError::new(
                path,
                format!(
                    "{key} is a CloudEvents attribute the source sets; it cannot be overridden"
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_with_and_without_seconds() {
        assert!(parse_schedule("* * * * *").is_ok());
        assert!(parse_schedule("*/2 * * * * *").is_ok());
        assert!(parse_schedule("@hourly").is_ok());
        let every = parse_schedule("@every 1m").expect_err("@every");
        assert!(every.contains("@every is not supported"), "{every}");
        let short = parse_schedule("* * *").expect_err("three fields");
        assert!(short.contains("has 3 fields"), "{short}");
        assert!(parse_schedule("* * * * * * *").is_err());
        assert!(parse_schedule("61 * * * *").is_err());
    }

    #[test]
    fn time_zones() {
        assert!(parse_timezone("Asia/Tokyo").is_ok());
        assert!(parse_timezone("UTC").is_ok());
        assert!(parse_timezone("Mars/Olympus").is_err());
    }

    #[test]
    fn payloads() {
        let spec = |content_type: Option<&str>, data: Option<&str>, b64: Option<&str>| {
            PingSourceSpec {
                content_type: content_type.map(String::from),
                data: data.map(String::from),
                data_base64: b64.map(String::from),
                ..PingSourceSpec::default()
            }
            .payload()
        };
        assert_eq!(
            spec(Some("application/json"), Some(r#"{"a":1}"#), None),
            Ok(Some(br#"{"a":1}"#.to_vec()))
        );
        assert_eq!(spec(None, None, Some("aGk=")), Ok(Some(b"hi".to_vec())));
        assert_eq!(
            spec(Some("text/plain"), Some("[1]"), None),
            Ok(Some(b"[1]".to_vec()))
        );
        let error = spec(Some("application/json"), Some("[1]"), None).expect_err("array");
        assert_eq!(error.path, "spec.data");
        let error = spec(None, Some("x"), Some("eA==")).expect_err("both");
        assert_eq!(error.path, "spec.data");
        let error = spec(None, None, Some("!!")).expect_err("bad base64");
        assert_eq!(error.path, "spec.dataBase64");
    }
}
