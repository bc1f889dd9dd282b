//! CloudEvents 1.0: the event model, validation, and the HTTP binding (binary, structured and
//! batched mode) in both directions.
//!
//! Attributes keep the CloudEvents type they arrived with (structured mode can carry Integer
//! and Boolean extensions; binary-mode headers are always strings), because CESQL filters see
//! those types. The log stores events as [`crate::record`]s, which keep the types and the data
//! as it arrived.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use cesql::Value;
use http::{HeaderMap, HeaderValue, header};
use serde_json::Value as Json;
use serde_json::value::RawValue;

pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";
/// The TTL extension Knative's broker uses to stop reply loops.
pub const TTL: &str = "knativebrokerttl";

const REQUIRED: [&str; 4] = ["id", "source", "specversion", "type"];

/// One CloudEvent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Context attributes and extensions, by name (`datacontenttype` included).
    pub attributes: BTreeMap<String, Value>,
    /// The data as binary mode carries it (the HTTP body).
    pub data: Option<Bytes>,
    /// The JSON text of structured mode's `data` member exactly as it arrived, when the event
    /// arrived that way: structured delivery writes it back unchanged. It shares its bytes with
    /// `data` unless `data` is a JSON string of a non-JSON content type (then `data` is the
    /// string's text). Whoever changes `data` clears it.
    pub json_data: Option<Bytes>,
}

/// Why a request or a reply is not a valid CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("{0}")]
    Invalid(String),
    /// A content type that is not a CloudEvents format Mecha reads (HTTP 415).
    #[error("{0}")]
    Unsupported(String),
}

// === impl Event ===

impl Event {
    pub fn new(id: &str, source: &str, kind: &str) -> Self {
        let mut attributes = BTreeMap::new();
        for (k, v) in [
            ("specversion", "1.0"),
            ("id", id),
            ("source", source),
            ("type", kind),
        ] {
            attributes.insert(k.to_string(), Value::String(v.to_string()));
        }
        Self {
            attributes,
            data: None,
            json_data: None,
        }
    }

    pub fn string(&self, name: &str) -> Option<String> {
        self.attributes.get(name).map(ToString::to_string)
    }

    /// A String attribute's value, borrowed (`None` for other types or when absent).
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.attributes.get(name) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.attributes
            .insert(name.to_string(), Value::String(value.into()));
    }

    pub fn id(&self) -> String {
        self.string("id").unwrap_or_default()
    }

    /// Checks what CloudEvents 1.0 requires of every event.
    pub fn validate(&self) -> Result<(), EventError> {
        let invalid = |m: String| Err(EventError::Invalid(m));
        for name in REQUIRED {
            match self.attributes.get(name) {
                None => return invalid(format!("the required attribute {name} is missing")),
                Some(Value::String(s)) if s.is_empty() => {
                    return invalid(format!("the attribute {name} must not be empty"));
                }
                Some(Value::String(_)) => {}
                Some(other) => {
                    return invalid(format!(
                        "the attribute {name} must be a string, not {other}"
                    ));
                }
            }
        }
        let specversion = self.text("specversion").unwrap_or_default();
        if specversion != "1.0" {
            return invalid(format!(
                "specversion {specversion:?} is not supported; Mecha reads CloudEvents 1.0"
            ));
        }
        if let Some(source) = self.text("source")
            && source.chars().any(char::is_whitespace)
        {
            return invalid(format!("source {source:?} is not a URI-reference"));
        }
        if let Some(time) = self.text("time")
            && !is_rfc3339(time)
        {
            return invalid(format!("time {time:?} is not an RFC 3339 timestamp"));
        }
        for (name, value) in &self.attributes {
            if let Value::String(text) = value
                && let Some((at, c)) = crds::sources::invalid_string_char(text)
            {
                return invalid(format!(
                    "attribute {name} contains U+{:04X} at byte {at}: CloudEvents String values exclude control characters (U+0000-U+001F, U+007F-U+009F) and Unicode noncharacters",
                    u32::from(c)
                ));
            }
        }
        for name in self.attributes.keys() {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return invalid(format!(
                    "attribute name {name:?} is invalid: CloudEvents attribute names are lower-case letters and digits"
                ));
            }
        }
        Ok(())
    }

    fn content_type(&self) -> Option<String> {
        self.string("datacontenttype")
    }

    // --- structured JSON ---

    /// The event as a structured-mode JSON object (for tests and diagnostics).
    pub fn to_json(&self) -> Json {
        serde_json::from_slice(&self.to_json_bytes()).unwrap_or(Json::Null)
    }

    /// The event in structured mode. Data that arrived as structured `data` is written back as
    /// the JSON text that arrived; binary-mode data as that text when it is JSON of a JSON
    /// content type, as a string when it is text, and as `data_base64` otherwise.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let data_len = self.data.as_ref().map_or(0, |d| d.len() * 4 / 3 + 16);
        let mut out = Vec::with_capacity(64 + 32 * self.attributes.len() + data_len);
        out.push(b'{');
        let mut first = true;
        let mut member = |out: &mut Vec<u8>, name: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            write_json_string(out, name);
            out.push(b':');
        };
        for (name, value) in &self.attributes {
            member(&mut out, name);
            match value {
                Value::String(s) => write_json_string(&mut out, s),
                Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
                Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            }
        }
        match (&self.json_data, &self.data) {
            (Some(raw), _) => {
                member(&mut out, "data");
                out.extend_from_slice(raw);
            }
            (None, Some(data)) => {
                let content_type = self.content_type();
                let is_json_text = is_json(content_type.as_deref())
                    && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
                match std::str::from_utf8(data) {
                    _ if is_json_text => {
                        member(&mut out, "data");
                        out.extend_from_slice(data);
                    }
                    Ok(text) if is_text(content_type.as_deref()) => {
                        member(&mut out, "data");
                        write_json_string(&mut out, text);
                    }
                    _ => {
                        member(&mut out, "data_base64");
                        out.push(b'"');
                        out.extend_from_slice(BASE64.encode(data).as_bytes());
                        out.push(b'"');
                    }
                }
            }
            (None, None) => {}
        }
        out.push(b'}');
        out
    }

    /// Reads one structured-mode JSON object (not yet validated).
    pub fn from_json(value: Json) -> Result<Self, EventError> {
        let text = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
        Self::from_structured(&text)
    }

    /// Reads one structured-mode event from its JSON text (not yet validated). The `data`
    /// member is kept as the text that arrived (a slice of `text`, not a copy).
    pub fn from_structured(text: &Bytes) -> Result<Self, EventError> {
        let raw: &RawValue = parse_json(text)?;
        Self::from_raw(text, raw)
    }

    /// One structured event whose JSON text `raw` lies inside `body`.
    fn from_raw(body: &Bytes, raw: &RawValue) -> Result<Self, EventError> {
        let members: Vec<(String, &RawValue)> =
            match serde_json::from_str::<RawObject<'_>>(raw.get()) {
                Ok(object) => object.0,
                Err(_) => {
                    return Err(EventError::Invalid(
                        "a structured CloudEvent must be a JSON object".into(),
                    ));
                }
            };
        // Two members of one name: which is the event? Refused rather than guessed, as binary
        // mode refuses a repeated ce- header (a parser that keeps the first one would disagree
        // about the event's identity). Names compare after JSON unescaping.
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        for (name, _) in &members {
            if !seen.insert(name.as_str()) {
                return Err(EventError::Invalid(format!(
                    "member {name:?} appears more than once; an attribute has one value"
                )));
            }
        }
        let mut attributes = BTreeMap::new();
        let mut data = None;
        let mut data_json: Option<&RawValue> = None;
        for (name, value) in members {
            match name.as_str() {
                "data" => data_json = Some(value),
                "data_base64" => {
                    let encoded: String = serde_json::from_str(value.get())
                        .map_err(|_| EventError::Invalid("data_base64 must be a string".into()))?;
                    data = Some(Bytes::from(BASE64.decode(encoded.as_bytes()).map_err(
                        |e| EventError::Invalid(format!("data_base64 is not base64: {e}")),
                    )?));
                }
                _ => {
                    let value = match serde_json::from_str::<Attribute>(value.get()) {
                        // A null attribute is an absent one.
                        Ok(Attribute::Null) => continue,
                        Ok(Attribute::Value(value)) => value,
                        Err(e) => {
                            return Err(EventError::Invalid(format!("attribute {name}: {e}")));
                        }
                    };
                    attributes.insert(name, value);
                }
            }
        }
        let mut json_data = None;
        if let Some(value) = data_json.filter(|v| v.get() != "null") {
            if data.is_some() {
                return Err(EventError::Invalid(
                    "an event carries data or data_base64, not both".into(),
                ));
            }
            let raw = body.slice_ref(value.get().as_bytes());
            let content_type = attributes.get("datacontenttype").map(ToString::to_string);
            data = Some(json_data_bytes(&raw, content_type.as_deref())?);
            // Without a datacontenttype, JSON `data` is application/json: binary-mode
            // delivery says so (`to_binary`); the attributes stay as they arrived.
            json_data = Some(raw);
        }
        Ok(Self {
            attributes,
            data,
            json_data,
        })
    }

    // --- HTTP binding ---

    /// Reads an HTTP message in binary, structured or batched mode. Returns the events (one,
    /// except in batched mode), not yet validated.
    pub fn from_http(headers: &HeaderMap, body: &Bytes) -> Result<Vec<Self>, EventError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = media_type(content_type);
        if media.starts_with(BATCH) {
            let raw: &RawValue = parse_json(body)?;
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| {
                EventError::Invalid("a batch must be a JSON array of events".into())
            })?;
            return items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    Self::from_raw(body, item)
                        .map_err(|e| EventError::Invalid(format!("event {i} of the batch: {e}")))
                })
                .collect();
        }
        if media.starts_with("application/cloudevents") {
            if !media.starts_with(STRUCTURED) {
                return Err(EventError::Unsupported(format!(
                    "event format {media} is not supported; use {STRUCTURED}, {BATCH} or binary mode"
                )));
            }
            return Ok(vec![Self::from_structured(body)?]);
        }
        Self::from_binary(headers, body).map(|e| vec![e])
    }

    fn from_binary(headers: &HeaderMap, body: &Bytes) -> Result<Self, EventError> {
        let mut attributes = BTreeMap::new();
        for (name, value) in headers {
            let Some(attribute) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            if attribute == "datacontenttype" {
                return Err(EventError::Invalid(
                    "ce-datacontenttype is not allowed in binary mode; use Content-Type".into(),
                ));
            }
            let decoded = percent_decode(value.as_bytes())
                .map_err(|why| EventError::Invalid(format!("header {name}: {why}")))?;
            // Two values for one attribute: which is the event? Refused rather than guessed
            // (an intermediary taking the other one would disagree about its identity).
            if attributes
                .insert(attribute.to_string(), Value::String(decoded))
                .is_some()
            {
                return Err(EventError::Invalid(format!(
                    "header {name} appears more than once; an attribute has one value"
                )));
            }
        }
        if attributes.is_empty() {
            return Err(EventError::Invalid(
                "not a CloudEvent: no ce-* headers (binary mode) and Content-Type is not application/cloudevents+json"
                    .into(),
            ));
        }
        if let Some(content_type) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            attributes.insert(
                "datacontenttype".into(),
                Value::String(content_type.to_string()),
            );
        }
        Ok(Self {
            attributes,
            data: (!body.is_empty()).then(|| body.clone()),
            json_data: None,
        })
    }

    /// Headers and body of the event in binary mode.
    pub fn to_binary(&self) -> (HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        // Structured `data` that is JSON and names no content type is `application/json`
        // (the JSON event format); binary mode says so in `Content-Type`, or the receiver
        // would not know.
        if self.json_data.is_some() && !self.attributes.contains_key("datacontenttype") {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        for (name, value) in &self.attributes {
            if name == "datacontenttype" {
                if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
                    headers.insert(header::CONTENT_TYPE, v);
                }
                continue;
            }
            let mut header_name = String::with_capacity(3 + name.len());
            header_name.push_str("ce-");
            header_name.push_str(name);
            let Ok(header_name) = http::HeaderName::try_from(header_name) else {
                continue;
            };
            let encoded = match value {
                Value::String(s) => percent_encode(s),
                other => percent_encode(&other.to_string()),
            };
            if let Ok(v) = HeaderValue::try_from(encoded) {
                headers.insert(header_name, v);
            }
        }
        (headers, self.data.clone().unwrap_or_default())
    }
}

fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, EventError> {
    serde_json::from_slice(body)
        .map_err(|e| EventError::Invalid(format!("the body is not valid JSON: {e}")))
}

/// A structured `data` member's value as binary mode carries it: a JSON string of a non-JSON
/// content type is its text; any other JSON value is its JSON text, unchanged.
pub(crate) fn json_data_bytes(
    raw: &Bytes,
    content_type: Option<&str>,
) -> Result<Bytes, EventError> {
    if raw.first() == Some(&b'"') && !is_json(content_type) {
        let text: String =
            serde_json::from_slice(raw).map_err(|e| EventError::Invalid(format!("data: {e}")))?;
        return Ok(Bytes::from(text.into_bytes()));
    }
    Ok(raw.clone())
}

/// Writes `text` as a JSON string.
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// A JSON object's members in order, values unparsed.
struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Members<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(member) = map.next_entry::<String, &'a RawValue>()? {
                    members.push(member);
                }
                Ok(RawObject(members))
            }
        }
        deserializer.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// A structured event's attribute value: a CloudEvents String, Integer or Boolean, or null
/// (absent). An array or an object is refused at its first byte, without being built: an
/// attribute's value is read before the event is known to be valid, from anyone.
enum Attribute {
    Null,
    Value(Value),
}

impl<'de> serde::Deserialize<'de> for Attribute {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl<'de> serde::de::Visitor<'de> for Scalar {
            type Value = Attribute;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, integer or boolean")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Attribute, E> {
                Ok(Attribute::Null)
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Attribute, E> {
                Ok(Attribute::Value(Value::Boolean(b)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Attribute, E> {
                Ok(Attribute::Value(Value::String(s.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Attribute, E> {
                Ok(Attribute::Value(Value::String(s)))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Attribute, E> {
                i32::try_from(n)
                    .map(|n| Attribute::Value(Value::Integer(n)))
                    .map_err(|_| E::custom(format!("{n} is not a CloudEvents Integer (32-bit)")))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Attribute, E> {
                i32::try_from(n)
                    .map(|n| Attribute::Value(Value::Integer(n)))
                    .map_err(|_| E::custom(format!("{n} is not a CloudEvents Integer (32-bit)")))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Attribute, E> {
                Err(E::custom(format!(
                    "{n} is not a CloudEvents Integer (32-bit)"
                )))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Attribute, A::Error> {
                Err(serde::de::Error::custom(
                    "must be a string, integer or boolean, not an array",
                ))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Attribute, A::Error> {
                Err(serde::de::Error::custom(
                    "must be a string, integer or boolean, not an object",
                ))
            }
        }
        deserializer.deserialize_any(Scalar)
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return true;
    };
    let media = media_type(content_type);
    media == "application/json" || media == "text/json" || media.ends_with("+json")
}

/// The media type of a `Content-Type` value, lower-cased and without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_text(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| {
        let c = c.to_ascii_lowercase();
        c.starts_with("text/") || c.contains("xml") || c.contains("json")
    })
}

/// Percent-encodes what the HTTP binding requires: space, `"`, `%`, and everything outside
/// printable ASCII (as UTF-8 bytes).
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    percent_encode_into(&mut out, value);
    out
}

/// [`percent_encode`], appending to `out`.
pub fn percent_encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for byte in value.bytes() {
        if byte == b' ' || byte == b'"' || byte == b'%' || !(0x21..=0x7e).contains(&byte) {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push(char::from(byte));
        }
    }
}

/// Decodes `%XY` sequences once and requires the result to be UTF-8.
pub fn percent_decode(value: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a % is not followed by two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(value[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the decoded value is not valid UTF-8".to_string())
}

/// RFC 3339 `date-time`: `2026-11-22T10:00:00Z`, optional fraction, `Z` or `±hh:mm`.
pub fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let number = |range: std::ops::Range<usize>| -> u32 {
        std::str::from_utf8(&b[range])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(99)
    };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let (month, day, hour, minute, second) = (
        number(5..7),
        number(8..10),
        number(11..13),
        number(14..16),
        number(17..19),
    );
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(pairs: &[(&str, &str)], body: &str) -> Result<Vec<Event>, EventError> {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        Event::from_http(&headers, &Bytes::from(body.to_string()))
    }

    #[test]
    fn binary_mode_decodes_percent_encoding_and_round_trips() {
        let events = binary(
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-note", "caf%C3%A9%20%25"),
                ("content-type", "application/json"),
            ],
            "{\"a\":1}",
        )
        .expect("parses");
        let event = &events[0];
        event.validate().expect("valid");
        assert_eq!(event.string("note").as_deref(), Some("café %"));
        assert_eq!(
            event.string("datacontenttype").as_deref(),
            Some("application/json")
        );
        let (headers, body) = event.to_binary();
        assert_eq!(headers["ce-note"], "caf%C3%A9%20%25");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(body, "{\"a\":1}");
        assert!(binary(&[("ce-id", "%FF")], "").is_err(), "invalid UTF-8");
        assert!(binary(&[("ce-id", "%4")], "").is_err(), "truncated escape");
        assert!(binary(&[("ce-datacontenttype", "x")], "").is_err());
        let mut twice = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "e17"),
            ("ce-id", "e17b"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ] {
            twice.append(k, HeaderValue::from_static(v));
        }
        let refused = Event::from_http(&twice, &Bytes::new()).expect_err("two ids");
        assert!(
            refused.to_string().contains("ce-id appears more than once"),
            "{refused}"
        );
        assert!(binary(&[], "hello").is_err(), "no ce- headers");
    }

    #[test]
    fn structured_mode_keeps_types_and_data_forms() {
        let json = serde_json::json!({
            "specversion": "1.0", "id": "1", "source": "/s", "type": "t",
            "count": 3, "flag": true, "data": {"x": 1}
        });
        let event = Event::from_json(json).expect("parses");
        event.validate().expect("valid");
        assert_eq!(event.attributes["count"], Value::Integer(3));
        assert_eq!(event.attributes["flag"], Value::Boolean(true));
        assert_eq!(event.data.as_deref(), Some(&b"{\"x\":1}"[..]));
        let back = Event::from_json(event.to_json()).expect("round trip");
        assert_eq!(back, event);

        let text = serde_json::json!({
            "specversion": "1.0", "id": "1", "source": "/s", "type": "t",
            "datacontenttype": "text/plain", "data": "hello"
        });
        let event = Event::from_json(text).expect("parses");
        assert_eq!(event.data.as_deref(), Some(&b"hello"[..]));
        assert_eq!(event.to_json()["data"], "hello");

        let mut raw = Event::new("1", "/s", "t");
        raw.set("datacontenttype", "application/octet-stream");
        raw.data = Some(Bytes::from_static(&[0, 159, 255]));
        let json = raw.to_json();
        assert_eq!(json["data_base64"], "AJ//");
        assert_eq!(Event::from_json(json).expect("parses"), raw);
    }

    #[test]
    fn a_structured_member_given_twice_is_refused_by_name() {
        for (body, name) in [
            (
                r#"{"specversion":"1.0","id":"a","id":"b","source":"/s","type":"t"}"#,
                "\"id\"",
            ),
            // Names compare unescaped, and `null` counts as given.
            (
                r#"{"specversion":"1.0","id":"a","source":"/s","type":"t","note":null,"not\u0065":"x"}"#,
                "\"note\"",
            ),
            (
                r#"{"specversion":"1.0","id":"a","source":"/s","type":"t","data":1,"data":2}"#,
                "\"data\"",
            ),
        ] {
            let refused = Event::from_structured(&Bytes::from(body)).expect_err(body);
            assert!(
                refused
                    .to_string()
                    .contains(&format!("member {name} appears more than once")),
                "{refused}"
            );
        }
        // Inside `data`, JSON is the sender's business.
        let fine =
            r#"{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"x":1,"x":2}}"#;
        assert!(Event::from_structured(&Bytes::from(fine)).is_ok());
    }

    #[test]
    fn json_data_without_a_content_type_is_sent_as_application_json() {
        let event = Event::from_structured(&Bytes::from_static(
            br#"{"specversion":"1.0","id":"a","source":"/s","type":"t","data":"hi"}"#,
        ))
        .expect("parses");
        let (headers, body) = event.to_binary();
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(body, r#""hi""#);
        // The attributes stay as they arrived: structured delivery adds no member.
        assert!(
            !event
                .to_json_bytes()
                .windows(15)
                .any(|w| w == b"datacontenttype")
        );
        // A named content type is kept; no data, no content type.
        let text = Event::from_structured(&Bytes::from_static(
            br#"{"specversion":"1.0","id":"a","source":"/s","type":"t","datacontenttype":"text/plain","data":"hi"}"#,
        ))
        .expect("parses");
        assert_eq!(text.to_binary().0[header::CONTENT_TYPE], "text/plain");
        let none = Event::new("1", "/s", "t");
        assert!(none.to_binary().0.get(header::CONTENT_TYPE).is_none());
    }

    #[test]
    fn validation_names_the_problem() {
        let check = |json: serde_json::Value| {
            Event::from_json(json)
                .and_then(|e| e.validate())
                .expect_err("invalid")
                .to_string()
        };
        let base = |extra: &[(&str, serde_json::Value)]| {
            let mut v =
                serde_json::json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"});
            for (k, x) in extra {
                v[*k] = x.clone();
            }
            v
        };
        assert!(
            check(serde_json::json!({"specversion": "1.0", "source": "/s", "type": "t"}))
                .contains("id is missing")
        );
        assert!(check(base(&[("specversion", "0.3".into())])).contains("specversion"));
        assert!(check(base(&[("type", "".into())])).contains("type must not be empty"));
        assert!(check(base(&[("time", "yesterday".into())])).contains("RFC 3339"));
        assert!(check(base(&[("Bad_Name", "x".into())])).contains("lower-case"));
        assert!(check(base(&[("big", serde_json::json!(5_000_000_000i64))])).contains("32-bit"));
        Event::from_json(base(&[("time", "2026-11-22T10:00:00.5+01:00".into())]))
            .expect("parses")
            .validate()
            .expect("valid time");
    }

    #[test]
    fn string_attributes_refuse_what_cloudevents_excludes() {
        // CloudEvents 1.0, Type System: a String excludes U+0000-U+001F, U+007F-U+009F and
        // noncharacters. Refused by attribute name, in either mode.
        for (name, text, code) in [
            ("subject", "a\nb", "U+000A"),
            ("id", "tab\there", "U+0009"),
            ("type", "nul\u{0}", "U+0000"),
            ("note", "del\u{7f}", "U+007F"),
            ("note", "c1\u{85}", "U+0085"),
            ("note", "non\u{fdd0}char", "U+FDD0"),
            ("note", "plane\u{1fffe}", "U+1FFFE"),
        ] {
            let mut event = Event::new("1", "/s", "t");
            event.set(name, text);
            let refused = event.validate().expect_err(text).to_string();
            assert!(
                refused.contains(&format!("attribute {name} contains {code}")),
                "{refused}"
            );
        }
        let fine = Event::from_structured(&Bytes::from_static(
            "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\",\"note\":\"caf\u{e9} \u{1f980} \u{a0}\"}".as_bytes(),
        ))
        .expect("parses");
        fine.validate().expect("printable Unicode is fine");
        // Structured mode: an escaped control character is refused the same way.
        let escaped = Event::from_structured(&Bytes::from_static(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"x\u0007"}"#,
        ))
        .expect("parses");
        let refused = escaped.validate().expect_err("BEL").to_string();
        assert!(
            refused.contains("attribute subject contains U+0007"),
            "{refused}"
        );
        // Binary mode: a percent-encoded one too.
        let events = binary(
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-trace", "line%0Abreak"),
            ],
            "",
        )
        .expect("parses");
        let refused = events[0].validate().expect_err("LF").to_string();
        assert!(
            refused.contains("attribute trace contains U+000A"),
            "{refused}"
        );
    }

    #[test]
    fn an_array_or_object_attribute_is_refused_without_being_read() {
        for (value, says) in [("[1,2,3]", "not an array"), (r#"{"a":1}"#, "not an object")] {
            let body = format!(
                r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":{value}}}"#
            );
            let refused = Event::from_structured(&Bytes::from(body))
                .expect_err(value)
                .to_string();
            assert!(
                refused.contains("attribute ext") && refused.contains(says),
                "{refused}"
            );
        }
        let float = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":1.5}"#;
        let refused = Event::from_structured(&Bytes::from(float)).expect_err("float");
        assert!(refused.to_string().contains("32-bit"), "{refused}");
    }

    #[test]
    fn rfc3339() {
        assert!(is_rfc3339("2018-04-26T14:48:09+02:00"));
        assert!(is_rfc3339("2018-04-26T14:48:09.123Z"));
        assert!(!is_rfc3339("2018-04-26 14:48"));
        assert!(!is_rfc3339("2018-13-26T14:48:09Z"));
        assert!(!is_rfc3339("2018-04-26T14:48:09"));
    }
}
