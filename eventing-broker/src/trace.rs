//! W3C trace context through the broker, as the CloudEvents distributed-tracing extension
//! carries it: the ingress copies a request's `traceparent`/`tracestate` headers into an
//! event that has no `traceparent` attribute, and every delivery of the event (to a
//! subscriber, to a dead-letter sink, of a reply) sends them back as HTTP headers — so a
//! function, the events it posts and the functions those reach share one trace id.

use http::{HeaderMap, HeaderValue};

use crate::event::Event;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (W3C: 32 members of at most 256 characters each, plus commas).
const MAX_TRACESTATE: usize = 8192 + 31;

// === impl Event ===

impl Event {
    /// Takes the trace context of the HTTP request the event came in: only when the event
    /// carries no `traceparent` of its own (a client that set one chose it) and the header is
    /// a valid W3C `traceparent`, given once. `tracestate` comes with it when given once.
    pub fn adopt_trace(&mut self, headers: &HeaderMap) {
        if self.attributes.contains_key(TRACEPARENT) {
            return;
        }
        let Some(traceparent) = single(headers, TRACEPARENT).filter(|v| trace_id(v).is_some())
        else {
            return;
        };
        self.set(TRACEPARENT, traceparent);
        if !self.attributes.contains_key(TRACESTATE)
            && let Some(tracestate) = single(headers, TRACESTATE).filter(|v| valid_tracestate(v))
        {
            self.set(TRACESTATE, tracestate);
        }
    }

    /// Adds the event's trace context to the headers of a request that delivers it (when its
    /// `traceparent` is valid, with its `tracestate`).
    pub fn trace_headers(&self, headers: &mut HeaderMap) {
        let Some(traceparent) = self.string(TRACEPARENT).filter(|v| trace_id(v).is_some()) else {
            return;
        };
        if let Ok(value) = HeaderValue::from_str(&traceparent) {
            headers.insert(TRACEPARENT, value);
        }
        if let Some(tracestate) = self.string(TRACESTATE).filter(|v| valid_tracestate(v))
            && let Ok(value) = HeaderValue::from_str(&tracestate)
        {
            headers.insert(TRACESTATE, value);
        }
    }

    /// The trace id of the event's `traceparent`, for logs.
    pub fn trace_id(&self) -> Option<String> {
        let traceparent = self.string(TRACEPARENT)?;
        trace_id(&traceparent).map(str::to_string)
    }

    /// Gives a reply without a trace context of its own the one of the event it answers.
    pub fn inherit_trace(&mut self, from: &Event) {
        if self.attributes.contains_key(TRACEPARENT) {
            return;
        }
        for name in [TRACEPARENT, TRACESTATE] {
            if let Some(value) = from.attributes.get(name) {
                self.attributes.insert(name.to_string(), value.clone());
            }
        }
    }
}

/// A header's value when it is given exactly once and is text.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok().map(str::trim)
}

/// The trace id of a W3C `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`; later versions may
/// append fields), when it is a valid one: lower-case hex, ids not all zero, version not `ff`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = traceparent.splitn(5, '-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || rest.is_none())
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace)
}

/// A `tracestate` we pass on: printable ASCII, not too long.
fn valid_tracestate(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_TRACESTATE
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        headers
    }

    #[test]
    fn trace_ids_of_valid_traceparents_only() {
        assert_eq!(trace_id(PARENT), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_event_takes_the_request_trace_unless_it_has_its_own() {
        let mut event = Event::new("1", "/s", "t");
        event.adopt_trace(&headers(&[
            ("traceparent", PARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        assert_eq!(event.string("traceparent").as_deref(), Some(PARENT));
        assert_eq!(
            event.string("tracestate").as_deref(),
            Some("congo=t61rcWkgMzE")
        );
        assert_eq!(
            event.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );

        // Its own (binary-mode ce-traceparent) stays as it is.
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let mut event = Event::new("1", "/s", "t");
        event.set("traceparent", own);
        let before = event.clone();
        event.adopt_trace(&headers(&[("traceparent", PARENT), ("tracestate", "a=b")]));
        assert_eq!(event, before);

        // Invalid or repeated headers are not taken; nothing else changes.
        for bad in [
            headers(&[("traceparent", "garbage"), ("tracestate", "a=b")]),
            headers(&[("traceparent", PARENT), ("traceparent", PARENT)]),
            headers(&[("tracestate", "a=b")]),
        ] {
            let mut event = Event::new("1", "/s", "t");
            event.adopt_trace(&bad);
            assert_eq!(event, Event::new("1", "/s", "t"));
        }
    }

    #[test]
    fn deliveries_and_replies_carry_the_trace() {
        let mut event = Event::new("1", "/s", "t");
        let mut out = HeaderMap::new();
        event.trace_headers(&mut out);
        assert!(out.is_empty());
        event.set("traceparent", PARENT);
        event.set("tracestate", "a=b");
        event.trace_headers(&mut out);
        assert_eq!(out["traceparent"], PARENT);
        assert_eq!(out["tracestate"], "a=b");

        let mut reply = Event::new("2", "/r", "reply");
        reply.inherit_trace(&event);
        assert_eq!(reply.string("traceparent").as_deref(), Some(PARENT));
        assert_eq!(reply.string("tracestate").as_deref(), Some("a=b"));
        let mut own = Event::new("3", "/r", "reply");
        own.set(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-00",
        );
        own.inherit_trace(&event);
        assert_eq!(own.string("tracestate"), None);
    }
}
