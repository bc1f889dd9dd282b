//! How an event is stored in the log: one versioned record format, the same for every log
//! backend (the redb file's values, the JetStream messages' payloads).
//!
//! Version 1 keeps what arrived: the attributes (with their CloudEvents types), and the data
//! either as the bytes binary mode carried (or `data_base64` decoded) or as the JSON text of
//! structured mode's `data` member, untouched. Layout, integers little-endian:
//!
//! ```text
//! 0xCE 0x01                      magic, version
//! u8  data form                  0 none, 1 bytes, 2 JSON text of structured `data`
//! u16 attribute count
//! per attribute:
//!   u16 name length, name (UTF-8)
//!   u8 type: 0 String (u32 length, UTF-8), 1 Integer (i32), 2 Boolean (u8)
//! u32 data length, data          when the data form is not 0
//! ```
//!
//! Records written before the format existed are structured-mode JSON objects (they begin
//! with `{`); [`decode`] still reads them.

use std::collections::BTreeMap;

use bytes::Bytes;
use cesql::Value;

use crate::event::{Event, json_data_bytes};

const MAGIC: u8 = 0xCE;
const VERSION: u8 = 1;

const NO_DATA: u8 = 0;
const BYTES: u8 = 1;
const JSON_TEXT: u8 = 2;

const STRING: u8 = 0;
const INTEGER: u8 = 1;
const BOOLEAN: u8 = 2;

/// The record of `event`.
pub fn encode(event: &Event) -> Vec<u8> {
    let (form, data) = match (&event.json_data, &event.data) {
        (Some(raw), _) => (JSON_TEXT, Some(raw)),
        (None, Some(data)) => (BYTES, Some(data)),
        (None, None) => (NO_DATA, None),
    };
    let attributes: usize = event
        .attributes
        .iter()
        .map(|(name, value)| {
            2 + name.len()
                + 1
                + match value {
                    Value::String(s) => 4 + s.len(),
                    Value::Integer(_) => 4,
                    Value::Boolean(_) => 1,
                }
        })
        .sum();
    let mut out = Vec::with_capacity(5 + attributes + data.map_or(0, |d| 4 + d.len()));
    out.extend_from_slice(&[MAGIC, VERSION, form]);
    // Attribute names and values are bounded by the ingress's event size limit, far below
    // these widths; a larger one would be cut, never misread.
    out.extend_from_slice(
        &(event.attributes.len().min(usize::from(u16::MAX)) as u16).to_le_bytes(),
    );
    for (name, value) in event.attributes.iter().take(usize::from(u16::MAX)) {
        let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        match value {
            Value::String(s) => {
                out.push(STRING);
                out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Integer(i) => {
                out.push(INTEGER);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Value::Boolean(b) => {
                out.push(BOOLEAN);
                out.push(u8::from(*b));
            }
        }
    }
    if let Some(data) = data {
        out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// The event stored in `record`; its data is a slice of `record`, not a copy.
pub fn decode(record: &Bytes) -> Result<Event, String> {
    match record.first() {
        Some(&MAGIC) => {}
        Some(b'{' | b' ' | b'\t' | b'\r' | b'\n') => {
            return Event::from_structured(record)
                .map_err(|e| format!("a record in the JSON format: {e}"));
        }
        Some(other) => return Err(format!("unknown record format (first byte {other:#04x})")),
        None => return Err("an empty record".into()),
    }
    let mut reader = Reader { record, at: 1 };
    let version = reader.u8()?;
    if version != VERSION {
        return Err(format!(
            "record format version {version} is newer than this broker reads ({VERSION})"
        ));
    }
    let form = reader.u8()?;
    let count = reader.u16()?;
    let mut attributes = BTreeMap::new();
    for _ in 0..count {
        let len = usize::from(reader.u16()?);
        let name = reader.text(len)?;
        let value = match reader.u8()? {
            STRING => {
                let len = reader.u32()? as usize;
                Value::String(reader.text(len)?)
            }
            INTEGER => Value::Integer(i32::from_le_bytes(reader.array()?)),
            BOOLEAN => Value::Boolean(reader.u8()? != 0),
            other => return Err(format!("attribute {name}: unknown value type {other}")),
        };
        attributes.insert(name, value);
    }
    let mut event = Event {
        attributes,
        data: None,
        json_data: None,
    };
    match form {
        NO_DATA => {}
        BYTES => {
            let len = reader.u32()? as usize;
            event.data = Some(reader.bytes(len)?);
        }
        JSON_TEXT => {
            let len = reader.u32()? as usize;
            let raw = reader.bytes(len)?;
            let content_type = event.string("datacontenttype");
            event.data =
                Some(json_data_bytes(&raw, content_type.as_deref()).map_err(|e| e.to_string())?);
            event.json_data = Some(raw);
        }
        other => return Err(format!("unknown data form {other}")),
    }
    if reader.at != record.len() {
        return Err(format!(
            "{} bytes after the end of the record",
            record.len() - reader.at
        ));
    }
    Ok(event)
}

struct Reader<'a> {
    record: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<std::ops::Range<usize>, String> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.record.len())
            .ok_or_else(|| format!("the record ends early (at byte {})", self.at))?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let range = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.record[range]);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, String> {
        let range = self.take(len)?;
        Ok(self.record.slice(range))
    }

    fn text(&mut self, len: usize) -> Result<String, String> {
        let range = self.take(len)?;
        std::str::from_utf8(&self.record[range])
            .map(str::to_string)
            .map_err(|_| "a name or value is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(event: &Event) -> Event {
        decode(&Bytes::from(encode(event))).expect("decodes")
    }

    #[test]
    fn binary_data_and_typed_attributes_come_back_as_they_were() {
        let mut event = Event::new("1", "/s", "t");
        event.set("note", "caf\u{e9} %");
        event.attributes.insert("count".into(), Value::Integer(-3));
        event.attributes.insert("flag".into(), Value::Boolean(true));
        event.set("datacontenttype", "application/octet-stream");
        event.data = Some(Bytes::from_static(&[0, 159, 255, b'{']));
        assert_eq!(round_trip(&event), event);
        let empty = Event::new("2", "/s", "t");
        assert_eq!(round_trip(&empty), empty);
    }

    #[test]
    fn structured_data_keeps_its_json_text() {
        let body = Bytes::from_static(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data": {"b": [1,  2], "a": "\u00e9"} }"#,
        );
        let event = Event::from_structured(&body).expect("parses");
        let back = round_trip(&event);
        assert_eq!(back, event);
        assert_eq!(
            back.data.as_deref(),
            Some(&br#"{"b": [1,  2], "a": "\u00e9"}"#[..])
        );
        let text = Bytes::from_static(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":"caf\u00e9"}"#,
        );
        let back = round_trip(&Event::from_structured(&text).expect("parses"));
        assert_eq!(back.data.as_deref(), Some("caf\u{e9}".as_bytes()));
        assert_eq!(back.json_data.as_deref(), Some(&br#""caf\u00e9""#[..]));
    }

    #[test]
    fn records_in_the_json_format_still_read() {
        // What brokers before the record format stored: the event re-serialized as
        // structured JSON.
        let old = Bytes::from_static(
            br#"{"data":{"a":1,"b":[1,2]},"datacontenttype":"application/json","id":"1","knativebrokerttl":254,"source":"/s","specversion":"1.0","type":"t"}"#,
        );
        let event = decode(&old).expect("decodes");
        assert_eq!(event.id(), "1");
        assert_eq!(event.attributes["knativebrokerttl"], Value::Integer(254));
        assert_eq!(event.data.as_deref(), Some(&br#"{"a":1,"b":[1,2]}"#[..]));
        let (_, body) = event.to_binary();
        assert_eq!(body, r#"{"a":1,"b":[1,2]}"#);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut event = Event::new("1", "/s", "t");
        event.data = Some(Bytes::from_static(b"hello"));
        let record = encode(&event);
        for cut in 0..record.len() {
            assert!(
                decode(&Bytes::copy_from_slice(&record[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut newer = record.clone();
        newer[1] = 9;
        assert!(
            decode(&Bytes::from(newer))
                .unwrap_err()
                .contains("version 9")
        );
        assert!(decode(&Bytes::from_static(b"\x00")).is_err());
    }
}
