//! The broker ingress: `POST /{namespace}/{broker}` with one CloudEvent (binary or structured
//! mode) or a batch, answered `202` once the events are durably in the log.

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::Full;
use mecha_common::budget::{BodyBudget, BodyError, Buffered};

use crate::event::{Event, EventError};
use crate::runtime::{EventBroker, IngestError};

/// The `namespace` and `broker` labels of a refusal addressed to no broker.
pub const UNKNOWN: &str = "(unknown)";

/// Handles one ingress request through the general server (hyper): [`route`], then its body
/// read within `budget` (the listener's), then [`answer`]. The fast path calls the same two
/// with the body it read itself (`activator_sidecar::h1::whole`).
pub async fn handle<B>(
    broker: &EventBroker,
    budget: &BodyBudget,
    request: Request<B>,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    if let Some(response) = route(broker, &parts) {
        return response;
    }
    // Read whole within the listener's budget and time; held until the answer, so what the
    // events make of the body is bounded by the budget too.
    let body = budget
        .collect(&parts.headers, body, broker.config().max_event_size)
        .await;
    answer(broker, parts, body).await
}

/// What is answered before the body is read: a path that names no broker, `OPTIONS`, another
/// method than `POST`, an unknown broker — each refusal counted. `None`: the body is to be
/// read, at most the broker's `max_event_size`, and given to [`answer`].
pub fn route(broker: &EventBroker, parts: &Parts) -> Option<Response<Full<Bytes>>> {
    target(broker, parts).err().map(|response| *response)
}

/// The broker a request is for, or the answer without reading its body.
fn target<'a>(
    broker: &EventBroker,
    parts: &'a Parts,
) -> Result<(&'a str, &'a str), Box<Response<Full<Bytes>>>> {
    let path = parts.uri.path();
    let mut segments = path.trim_matches('/').split('/');
    let (namespace, name) = match (segments.next(), segments.next(), segments.next()) {
        (Some(""), None, None) => {
            return Err(Box::new(plain(
                StatusCode::NOT_FOUND,
                "no broker here: post events to /{namespace}/{broker}",
            )));
        }
        (Some(namespace), Some(name), None) if !namespace.is_empty() && !name.is_empty() => {
            (namespace, name)
        }
        _ => {
            return Err(Box::new(plain(
                StatusCode::BAD_REQUEST,
                &format!(
                    "{path} is not a broker address: post events to /{{namespace}}/{{broker}}"
                ),
            )));
        }
    };
    if parts.method == Method::OPTIONS {
        // CloudEvents webhook abuse protection: any origin may deliver, at any rate.
        let mut response = plain(StatusCode::OK, "");
        let headers = response.headers_mut();
        headers.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        headers.insert("webhook-allowed-origin", HeaderValue::from_static("*"));
        headers.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
        return Err(Box::new(response));
    }
    if parts.method != Method::POST {
        reject(broker, namespace, name, "method");
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed: post events", parts.method),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        return Err(Box::new(response));
    }
    if broker.state().broker(namespace, name).is_none() {
        reject(broker, namespace, name, "unknown-broker");
        return Err(Box::new(plain(
            StatusCode::NOT_FOUND,
            &format!("broker {namespace}/{name} not found"),
        )));
    }
    Ok((namespace, name))
}

/// Counts a refusal: under the broker's name only when it is one — names from the path of a
/// request for no broker would make a new series each, kept for good (found from outside:
/// 2,000 requests with 60,000-character names took 120 MB and a 132 MB /metrics).
fn reject(broker: &EventBroker, namespace: &str, name: &str, reason: &str) {
    let known = broker.state().broker(namespace, name).is_some();
    let (ns, broker_name) = if known {
        (namespace, name)
    } else {
        (UNKNOWN, UNKNOWN)
    };
    broker
        .metrics()
        .rejected
        .with_label_values(&[ns, broker_name, reason])
        .inc();
}

/// Answers an ingress request with its whole body, or with why there is none (`Err`: its
/// refusal, counted): the events parsed, validated and stored, `202` once they are durable.
/// Checks [`route`] again (a broker may have gone while the body arrived); the body is held,
/// with its budget, until the answer.
pub async fn answer(
    broker: &EventBroker,
    parts: Parts,
    body: Result<Buffered, BodyError>,
) -> Response<Full<Bytes>> {
    let (namespace, name) = match target(broker, &parts) {
        Ok(target) => target,
        Err(response) => return *response,
    };
    let reject = |reason: &str| reject(broker, namespace, name, reason);
    let body = match body {
        Ok(body) => body,
        Err(error) => {
            reject(error.reason());
            if matches!(error, BodyError::Busy { .. }) {
                tracing::debug!(%namespace, broker = %name, "request refused: the body budget is used up");
            }
            return error.response();
        }
    };
    let mut events = match Event::from_http(&parts.headers, body.bytes()) {
        Ok(events) => events,
        Err(EventError::Unsupported(why)) => {
            reject("unsupported-format");
            return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, &why);
        }
        Err(EventError::Invalid(why)) => {
            reject("invalid");
            return plain(StatusCode::BAD_REQUEST, &why);
        }
    };
    // The request's trace context travels with its events (the distributed-tracing
    // extension), unless an event names its own.
    for event in &mut events {
        event.adopt_trace(&parts.headers);
    }
    let batch = events.len() != 1;
    for (i, event) in events.iter().enumerate() {
        if let Err(error) = event.validate() {
            reject("invalid");
            let message = if batch {
                format!("event {i} of the batch: {error}")
            } else {
                error.to_string()
            };
            return plain(StatusCode::BAD_REQUEST, &message);
        }
    }
    match broker.ingest(namespace, name, events).await {
        Ok(_) => plain(StatusCode::ACCEPTED, ""),
        Err(IngestError::UnknownBroker(which)) => {
            reject("unknown-broker");
            plain(StatusCode::NOT_FOUND, &format!("broker {which} not found"))
        }
        Err(error @ (IngestError::Invalid(_) | IngestError::Expired)) => {
            reject(if matches!(error, IngestError::Expired) {
                "ttl"
            } else {
                "invalid"
            });
            plain(StatusCode::BAD_REQUEST, &error.to_string())
        }
        Err(IngestError::Log(error)) => {
            reject("storage");
            // The log reports its failures itself (and readiness says why); the client is
            // told what to do, not the log's files and errors (this port is public).
            tracing::debug!(%error, "cannot store events");
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the event was not stored: the event log cannot take events right now; try again",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(if message.is_empty() {
        String::new()
    } else {
        format!("{message}\n")
    })));
    *response.status_mut() = status;
    if !message.is_empty() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}
