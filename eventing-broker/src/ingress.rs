//! The broker ingress: `POST /{namespace}/{broker}` with one CloudEvent (binary or structured
//! mode) or a batch, answered `202` once the events are durably in the log.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::Full;
use mecha_common::budget::{BodyBudget, BodyError};

use crate::event::{Event, EventError};
use crate::runtime::{EventBroker, IngestError};

/// The `namespace` and `broker` labels of a refusal addressed to no broker.
pub const UNKNOWN: &str = "(unknown)";

/// Handles one ingress request, its body read within `budget` (the listener's).
pub async fn handle<B>(
    broker: &EventBroker,
    budget: &BodyBudget,
    request: Request<B>,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (namespace, name) = match segments.as_slice() {
        [""] => {
            return answer(
                StatusCode::NOT_FOUND,
                "no broker here: post events to /{namespace}/{broker}",
            );
        }
        [namespace, name] if !namespace.is_empty() && !name.is_empty() => {
            (namespace.to_string(), name.to_string())
        }
        _ => {
            return answer(
                StatusCode::BAD_REQUEST,
                &format!(
                    "{path} is not a broker address: post events to /{{namespace}}/{{broker}}"
                ),
            );
        }
    };
    // Refusals are counted under the broker's name only when it is one: names from the path
    // of a request for no broker would make a new series each, kept for good (found from
    // outside: 2,000 requests with 60,000-character names took 120 MB and a 132 MB /metrics).
    let reject = |reason: &str| {
        let known = broker.state().broker(&namespace, &name).is_some();
        let (ns, broker_name) = if known {
            (namespace.as_str(), name.as_str())
        } else {
            (UNKNOWN, UNKNOWN)
        };
        broker
            .metrics()
            .rejected
            .with_label_values(&[ns, broker_name, reason])
            .inc();
    };
    if request.method() == Method::OPTIONS {
        // CloudEvents webhook abuse protection: any origin may deliver, at any rate.
        let mut response = answer(StatusCode::OK, "");
        let headers = response.headers_mut();
        headers.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        headers.insert("webhook-allowed-origin", HeaderValue::from_static("*"));
        headers.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
        return response;
    }
    if request.method() != Method::POST {
        reject("method");
        let mut response = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed: post events", request.method()),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        return response;
    }
    if broker.state().broker(&namespace, &name).is_none() {
        reject("unknown-broker");
        return answer(
            StatusCode::NOT_FOUND,
            &format!("broker {namespace}/{name} not found"),
        );
    }
    // Read whole within the listener's budget and time; held until the answer, so what the
    // events make of the body is bounded by the budget too.
    let (parts, body) = request.into_parts();
    let body = match budget
        .collect(&parts.headers, body, broker.config().max_event_size)
        .await
    {
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
            return answer(StatusCode::UNSUPPORTED_MEDIA_TYPE, &why);
        }
        Err(EventError::Invalid(why)) => {
            reject("invalid");
            return answer(StatusCode::BAD_REQUEST, &why);
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
            return answer(StatusCode::BAD_REQUEST, &message);
        }
    }
    match broker.ingest(&namespace, &name, events).await {
        Ok(_) => answer(StatusCode::ACCEPTED, ""),
        Err(IngestError::UnknownBroker(which)) => {
            reject("unknown-broker");
            answer(StatusCode::NOT_FOUND, &format!("broker {which} not found"))
        }
        Err(error @ (IngestError::Invalid(_) | IngestError::Expired)) => {
            reject(if matches!(error, IngestError::Expired) {
                "ttl"
            } else {
                "invalid"
            });
            answer(StatusCode::BAD_REQUEST, &error.to_string())
        }
        Err(IngestError::Log(error)) => {
            reject("storage");
            tracing::error!(%error, "cannot store events");
            let mut response = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the event was not stored: {error}"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

fn answer(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
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
